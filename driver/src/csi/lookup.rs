//! Finding a pod's ClipImage in the API server.

use clip_api::ClipImage;
use futures::FutureExt;
use futures::future::BoxFuture;

/// Reads ClipImages; the API server in production, a mock in tests.
pub trait ClipImageLookup: Send + Sync + 'static {
    /// `Ok(None)` when it does not exist; `Err` when the API server cannot be asked.
    fn get<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<ClipImage>, String>>;
}

/// ClipImage lookups through a kube client.
#[derive(Clone)]
pub struct KubeLookup {
    client: kube::Client,
}

impl std::fmt::Debug for KubeLookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeLookup")
    }
}

impl KubeLookup {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }
}

impl ClipImageLookup for KubeLookup {
    fn get<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<ClipImage>, String>> {
        async move {
            let api: kube::Api<ClipImage> = kube::Api::namespaced(self.client.clone(), namespace);
            api.get_opt(name).await.map_err(|e| e.to_string())
        }
        .boxed()
    }
}
