//! How tests and benchmarks start `clip node` as a process, as the DaemonSet runs it.

use std::ffi::OsString;
use std::path::Path;

/// The arguments of `clip node` with JSON logs, no Kubernetes API (direct `image:` volumes
/// only), node id `node_id`, and its socket (`csi.sock`), state and cache under `dir`.
pub fn node_args(dir: &Path, node_id: &str) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "--log-format",
        "json",
        "--log",
        "info",
        "node",
        "--kube",
        "off",
        "--node-id",
        node_id,
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    args.push("--endpoint".into());
    args.push(format!("unix://{}", socket(dir).display()).into());
    args.push("--state-dir".into());
    args.push(dir.join("state").into());
    args.push("--cache-dir".into());
    args.push(dir.join("cache").into());
    args
}

/// Where [`node_args`] puts the plugin's socket.
pub fn socket(dir: &Path) -> std::path::PathBuf {
    dir.join("csi.sock")
}
