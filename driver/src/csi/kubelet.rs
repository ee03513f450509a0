//! Requests as kubelet sends them, for programs that play kubelet against the plugin (tests,
//! `clip-bench publish`).

use std::path::Path;

use super::node::{EPHEMERAL, POD_NAME, POD_NAMESPACE};
use super::proto::volume_capability::access_mode::Mode;
use super::proto::volume_capability::{AccessMode, AccessType, MountVolume};
use super::proto::{
    NodeGetVolumeStatsRequest, NodePublishVolumeRequest, NodeUnpublishVolumeRequest,
    VolumeCapability,
};

/// The capability kubelet asks for on a read-only inline `csi:` volume.
pub fn mount_capability() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeReaderOnly as i32,
        }),
    }
}

/// NodePublishVolume for a pod's read-only inline `csi:` volume: `attributes` are the
/// volume's `volumeAttributes` (e.g. `clipImage` or `image`); kubelet adds the pod's
/// namespace and name (podInfoOnMount) and the ephemeral flag.
pub fn ephemeral_volume(
    volume: &str,
    target: &Path,
    pod_namespace: &str,
    pod_name: &str,
    attributes: &[(&str, &str)],
) -> NodePublishVolumeRequest {
    let mut context: std::collections::HashMap<String, String> = attributes
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    context.insert(POD_NAMESPACE.into(), pod_namespace.into());
    context.insert(POD_NAME.into(), pod_name.into());
    context.insert(EPHEMERAL.into(), "true".into());
    NodePublishVolumeRequest {
        volume_id: volume.into(),
        target_path: target.to_string_lossy().into_owned(),
        volume_capability: Some(mount_capability()),
        readonly: true,
        volume_context: context,
        ..Default::default()
    }
}

/// NodeUnpublishVolume of `volume` at `target`, as kubelet sends it when the pod goes.
pub fn unpublish(volume: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: volume.into(),
        target_path: target.to_string_lossy().into_owned(),
    }
}

/// NodeGetVolumeStats of `volume` published at `path`, as kubelet asks for it.
pub fn volume_stats(volume: &str, path: &Path) -> NodeGetVolumeStatsRequest {
    NodeGetVolumeStatsRequest {
        volume_id: volume.into(),
        volume_path: path.to_string_lossy().into_owned(),
        ..Default::default()
    }
}
