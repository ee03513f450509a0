//! The CSI node plugin: Identity and Node services over a unix socket, as kubelet calls them.
//!
//! - [`identity`]: GetPluginInfo, GetPluginCapabilities, Probe.
//! - [`node`]: publish/unpublish of ephemeral image volumes, stats, capabilities, info; the
//!   shared [`node::NodeContext`] (mount table, per-image stores, op guards).
//! - [`idle`]: decoded indexes of images no volume uses, kept a while for their next publish.
//! - [`lookup`]: ClipImage lookups (the API server, or a mock in tests).
//! - [`error`]: node plugin errors and their gRPC codes.
//! - [`server`]: binding the socket and serving.

pub mod error;
pub mod identity;
pub mod idle;
pub mod kubelet;
pub mod lookup;
pub mod node;
pub mod server;
/// Code generated from `proto/csi.proto` (CSI v1).
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    missing_debug_implementations
)]
pub mod proto {
    tonic::include_proto!("csi.v1");
}

/// Prints a request without its secrets: only the secret names appear.
macro_rules! redacted_debug {
    ($t:ty, $($field:ident),*) => {
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let mut names: Vec<&String> = self.secrets.keys().collect();
                names.sort();
                f.debug_struct(stringify!($t))
                    $(.field(stringify!($field), &self.$field))*
                    .field("secrets", &format_args!("<redacted: {names:?}>"))
                    .finish()
            }
        }
    };
}

redacted_debug!(
    proto::NodePublishVolumeRequest,
    volume_id,
    target_path,
    volume_capability,
    readonly,
    volume_context
);
redacted_debug!(
    proto::NodeStageVolumeRequest,
    volume_id,
    staging_target_path,
    volume_capability,
    volume_context
);
redacted_debug!(
    proto::NodeExpandVolumeRequest,
    volume_id,
    volume_path,
    capacity_range
);
