//! The CSI Identity service: who the plugin is and whether it can serve.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::node::NodeContext;
use super::proto::identity_server::Identity;
use super::proto::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, ProbeRequest, ProbeResponse,
};

/// The driver name kubelet and the CSIDriver object know the plugin by.
pub const DRIVER_NAME: &str = "csi.clip.dev";

#[derive(Debug, Clone)]
pub struct IdentityService {
    ctx: Arc<NodeContext>,
}

impl IdentityService {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        Self { ctx }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _req: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: [(
                "url".to_owned(),
                "https://github.com/clip-dev/clip".to_owned(),
            )]
            .into_iter()
            .collect(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        // A node-only plugin: no controller service, no topology constraints.
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn probe(&self, _req: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let ready = self.ctx.ready().await;
        if let Err(why) = &ready {
            tracing::warn!(reason = %why, "probe: not ready");
        }
        Ok(Response::new(ProbeResponse {
            ready: Some(ready.is_ok()),
        }))
    }
}
