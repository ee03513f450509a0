//! Serving the CSI services on a unix socket, as kubelet expects.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use super::identity::IdentityService;
use super::node::{NodeContext, NodeService};
use super::proto::identity_server::IdentityServer;
use super::proto::node_server::NodeServer;

/// Binds the plugin socket, replacing a stale socket file from an earlier run.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    crate::socket::clear_for_bind(path)?;
    UnixListener::bind(path)
}

/// Serves Identity and Node on `listener` until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    ctx: Arc<NodeContext>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService::new(ctx.clone())))
        .add_service(NodeServer::new(NodeService::new(ctx)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}

/// A gRPC channel to a plugin socket, opened the way kubelet does (for tools and tests).
pub async fn connect(socket: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let socket = socket.to_owned();
    tonic::transport::Endpoint::from_static("http://[::1]:50051")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
}
