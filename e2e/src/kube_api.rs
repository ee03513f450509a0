//! A fake Kubernetes API server behind a tower-test mock: enough of the API for the
//! controller and the node plugin (ClipImages with finalizers and status, Secrets, Events),
//! with every status write recorded for assertions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};

/// What the fake API server holds and saw.
#[derive(Debug, Default)]
pub struct ApiState {
    /// ClipImages by `namespace/name`, as JSON.
    pub objects: HashMap<String, Value>,
    /// Secrets by `namespace/name`, as JSON.
    pub secrets: HashMap<String, Value>,
    pub events: Vec<Value>,
    /// Every status written, in order.
    pub statuses: Vec<Value>,
    pub finalizer_removed: bool,
}

/// A running fake API server and a client for it.
#[derive(Clone)]
pub struct FakeApi {
    pub state: Arc<Mutex<ApiState>>,
    pub client: kube::Client,
}

impl std::fmt::Debug for FakeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeApi")
    }
}

fn respond(status: u16, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut r = Response::new(Body::from(bytes));
    *r.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn not_found(what: &str) -> Response<Body> {
    respond(
        404,
        &json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
                "message":format!("{what} not found"),"reason":"NotFound","code":404}),
    )
}

impl FakeApi {
    /// Starts serving on the current tokio runtime.
    pub fn start() -> Self {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let state: Arc<Mutex<ApiState>> = Arc::default();
        let s = state.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                send.send_response(handle_request(&s, req).await);
            }
        });
        Self {
            state,
            client: kube::Client::new(mock, "default"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ApiState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores an object (a ClipImage) as the API server would after `kubectl apply`.
    pub fn put_object(&self, namespace: &str, name: &str, object: Value) {
        self.lock()
            .objects
            .insert(format!("{namespace}/{name}"), object);
    }

    pub fn object(&self, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&format!("{namespace}/{name}"))
            .cloned()
    }

    /// Marks an object deleted (sets deletionTimestamp), as `kubectl delete` would while
    /// finalizers remain.
    pub fn mark_deleted(&self, namespace: &str, name: &str) {
        if let Some(o) = self.lock().objects.get_mut(&format!("{namespace}/{name}")) {
            o["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
    }

    pub fn put_secret(&self, namespace: &str, name: &str, secret: Value) {
        self.lock()
            .secrets
            .insert(format!("{namespace}/{name}"), secret);
    }

    pub fn events(&self) -> Vec<Value> {
        self.lock().events.clone()
    }

    pub fn statuses(&self) -> Vec<Value> {
        self.lock().statuses.clone()
    }

    pub fn finalizer_removed(&self) -> bool {
        self.lock().finalizer_removed
    }
}

async fn handle_request(state: &Arc<Mutex<ApiState>>, req: Request<Body>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let body = req.into_body().collect_bytes().await.unwrap_or_default();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    match (method.as_str(), parts.as_slice()) {
        (
            "GET",
            [
                "apis",
                "clip.dev",
                "v1alpha1",
                "namespaces",
                ns,
                "clipimages",
                name,
            ],
        ) => match s.objects.get(&format!("{ns}/{name}")) {
            Some(o) => respond(200, o),
            None => not_found(&format!("clipimage {ns}/{name}")),
        },
        (
            "PATCH",
            [
                "apis",
                "clip.dev",
                "v1alpha1",
                "namespaces",
                ns,
                "clipimages",
                name,
                "status",
            ],
        ) => {
            let key = format!("{ns}/{name}");
            let patch: Value = serde_json::from_slice(&body).unwrap_or_default();
            s.statuses.push(patch["status"].clone());
            match s.objects.get_mut(&key) {
                Some(obj) => {
                    obj["status"] = patch["status"].clone();
                    let out = obj.clone();
                    respond(200, &out)
                }
                None => not_found(&key),
            }
        }
        (
            "PATCH",
            [
                "apis",
                "clip.dev",
                "v1alpha1",
                "namespaces",
                ns,
                "clipimages",
                name,
            ],
        ) => {
            let key = format!("{ns}/{name}");
            let ops: Vec<Value> = serde_json::from_slice(&body).unwrap_or_default();
            let Some(obj) = s.objects.get_mut(&key) else {
                return not_found(&key);
            };
            let mut removed = false;
            for op in ops {
                let p = op["path"].as_str().unwrap_or_default();
                match op["op"].as_str() {
                    Some("add") if p == "/metadata/finalizers" => {
                        obj["metadata"]["finalizers"] = op["value"].clone();
                    }
                    Some("add") if p == "/metadata/finalizers/-" => {
                        if let Some(a) = obj["metadata"]["finalizers"].as_array_mut() {
                            a.push(op["value"].clone());
                        }
                    }
                    Some("remove") if p.starts_with("/metadata/finalizers/") => {
                        let i: usize = p
                            .rsplit('/')
                            .next()
                            .and_then(|i| i.parse().ok())
                            .unwrap_or(usize::MAX);
                        if let Some(a) = obj["metadata"]["finalizers"].as_array_mut()
                            && i < a.len()
                        {
                            a.remove(i);
                            removed = true;
                        }
                    }
                    _ => {}
                }
            }
            let out = obj.clone();
            if removed {
                s.finalizer_removed = true;
            }
            respond(200, &out)
        }
        ("GET", ["api", "v1", "namespaces", ns, "secrets", name]) => {
            match s.secrets.get(&format!("{ns}/{name}")) {
                Some(v) => respond(200, v),
                None => not_found(&format!("secret {ns}/{name}")),
            }
        }
        ("POST", ["apis", "events.k8s.io", "v1", "namespaces", _, "events"]) => {
            let ev: Value = serde_json::from_slice(&body).unwrap_or_default();
            s.events.push(ev.clone());
            respond(201, &ev)
        }
        _ => not_found(&format!("{method} {path}")),
    }
}
