//! Leader election against a mocked API server: one holder at a time, expiry honoured.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use std::time::Duration;

use clip_controller::leader::LeaderElection;
use http::{Request, Response};
use kube::Api;
use kube::client::Body;
use serde_json::json;

fn reply(status: u16, v: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Body::from(serde_json::to_vec(&v).unwrap()))
        .unwrap()
}

fn lease(holder: &str, renew: &str) -> serde_json::Value {
    json!({"apiVersion":"coordination.k8s.io/v1","kind":"Lease",
           "metadata":{"name":"clip-controller","namespace":"clip","resourceVersion":"7"},
           "spec":{"holderIdentity":holder,"leaseDurationSeconds":15,"renewTime":renew,"leaseTransitions":0}})
}

#[tokio::test]
async fn a_held_lease_is_respected_and_an_expired_one_is_taken() -> anyhow::Result<()> {
    let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(mock, "clip");
    let election = LeaderElection {
        api: Api::namespaced(client, "clip"),
        name: "clip-controller".into(),
        identity: "replica-b".into(),
        duration: Duration::from_secs(15),
    };
    let now = k8s_openapi::jiff::Timestamp::now();
    let fresh = now.to_string();
    let stale = (now - k8s_openapi::jiff::SignedDuration::from_secs(60)).to_string();
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        // 1: no lease yet -> created.
        let (r, s) = handle.next_request().await.unwrap();
        seen.push(format!("{} {}", r.method(), r.uri().path()));
        s.send_response(reply(404, json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404})));
        let (r, s) = handle.next_request().await.unwrap();
        seen.push(format!("{} {}", r.method(), r.uri().path()));
        s.send_response(reply(201, lease("replica-b", &fresh)));
        // 2: held by another replica, renewed just now -> not ours.
        let (_, s) = handle.next_request().await.unwrap();
        s.send_response(reply(200, lease("replica-a", &fresh)));
        // 3: held by another replica that stopped renewing -> taken over with a replace.
        let (_, s) = handle.next_request().await.unwrap();
        s.send_response(reply(200, lease("replica-a", &stale)));
        let (r, s) = handle.next_request().await.unwrap();
        seen.push(format!("{} {}", r.method(), r.uri().path()));
        let body: serde_json::Value =
            serde_json::from_slice(&r.into_body().collect_bytes().await.unwrap()).unwrap();
        assert_eq!(body["spec"]["holderIdentity"], "replica-b");
        assert_eq!(body["spec"]["leaseTransitions"], 1);
        s.send_response(reply(200, body));
        seen
    });
    assert!(election.try_acquire().await?, "no lease: created");
    assert!(!election.try_acquire().await?, "held by a live replica");
    assert!(election.try_acquire().await?, "expired: taken over");
    let seen = server.await?;
    assert_eq!(
        seen,
        vec![
            "GET /apis/coordination.k8s.io/v1/namespaces/clip/leases/clip-controller",
            "POST /apis/coordination.k8s.io/v1/namespaces/clip/leases",
            "PUT /apis/coordination.k8s.io/v1/namespaces/clip/leases/clip-controller",
        ]
    );
    Ok(())
}
