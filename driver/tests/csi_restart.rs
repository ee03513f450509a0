//! `clip node` as a process: after it dies, a new one reloads the mount table, reports dead
//! mounts, cleans them up on unpublish, and re-serves what it can.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use std::path::{Path, PathBuf};

use clip_driver::csi::kubelet;
use clip_driver::csi::proto::node_client::NodeClient;
use clip_driver::csi::proto::*;
use clip_driver::fs::is_mounted;
use clip_e2e::fixtures;
use clip_e2e::image::{Pusher, build_image};
use clip_e2e::node::Process;
use clip_e2e::registry::Registry;
use tonic::transport::Channel;

struct DetachOnDrop(Vec<PathBuf>);

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            clip_e2e::cleanup::detach(p);
        }
    }
}

fn start_node(dir: &Path, extra: &[&str]) -> anyhow::Result<Process> {
    let mut args = clip_e2e::node::node_args(dir, "n1");
    args.extend(extra.iter().map(Into::into));
    Process::start(
        Path::new(env!("CARGO_BIN_EXE_clip")),
        args,
        &clip_e2e::node::socket(dir),
    )
}

async fn client(dir: &Path) -> anyhow::Result<NodeClient<Channel>> {
    Ok(NodeClient::new(
        clip_driver::csi::server::connect(&dir.join("csi.sock")).await?,
    ))
}

fn publish(volume: &str, target: &Path, image: &str) -> NodePublishVolumeRequest {
    let pod = format!("pod-{volume}");
    kubelet::ephemeral_volume(volume, target, "default", &pod, &[("image", image)])
}

async fn condition(
    node: &mut NodeClient<Channel>,
    volume: &str,
    target: &Path,
) -> anyhow::Result<VolumeCondition> {
    let r = node
        .node_get_volume_stats(kubelet::volume_stats(volume, target))
        .await?
        .into_inner();
    Ok(r.volume_condition.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_plugin_knows_its_volumes() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let image = build_image(&fixtures::complex_layers(), "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("restart/app", "v1", &image)?;
    let dir = tempfile::tempdir()?;
    let t1: PathBuf = dir.path().join("pods/one/mount");
    let t2: PathBuf = dir.path().join("pods/two/mount");

    // Whatever happens, no mount of this test outlives it.
    let _detach = DetachOnDrop(vec![t1.clone(), t2.clone()]);
    let mut first = start_node(dir.path(), &[])?;
    let mut node = client(dir.path()).await?;
    node.node_publish_volume(publish("vol-1", &t1, &reference))
        .await?;
    node.node_publish_volume(publish("vol-2", &t2, &reference))
        .await?;
    assert!(std::fs::read(t1.join("etc/passwd"))?.len() > 10);
    first.signal(libc::SIGKILL);
    let dead = clip_driver::fs::mount_responds(&t1)
        .err()
        .and_then(|e| e.raw_os_error());
    assert_eq!(dead, Some(libc::ENOTCONN), "the mount died with its server");

    // A plugin that does not re-serve reports the dead mounts and cleans them up.
    let mut second = start_node(dir.path(), &["--no-reserve-on-start"])?;
    let mut node = client(dir.path()).await?;
    let c = condition(&mut node, "vol-1", &t1).await?;
    assert!(c.abnormal, "dead mount reported abnormal: {c:?}");
    assert!(!c.message.is_empty());
    node.node_unpublish_volume(kubelet::unpublish("vol-1", &t1))
        .await?;
    assert!(!is_mounted(&t1), "the dead mount was detached");
    assert!(!t1.exists());
    second.signal(libc::SIGTERM);

    // A plugin that re-serves brings the other volume back.
    let _third = start_node(dir.path(), &[])?;
    let mut node = client(dir.path()).await?;
    let c = condition(&mut node, "vol-2", &t2).await?;
    assert!(!c.abnormal, "re-served: {c:?}");
    let passwd = tokio::task::spawn_blocking({
        let t2 = t2.clone();
        move || std::fs::read(t2.join("etc/passwd"))
    })
    .await??;
    assert!(passwd.starts_with(b"root:x:0:0"));
    node.node_unpublish_volume(kubelet::unpublish("vol-2", &t2))
        .await?;
    assert!(!is_mounted(&t2));
    // A re-served volume's reads are not a start-up: no profile is kept for them (the
    // first plugin, killed, kept none either).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let profiles = dir.path().join("state/profiles");
    let kept = std::fs::read_dir(&profiles).map_or(0, |d| d.count());
    assert_eq!(kept, 0, "profiles kept in {}", profiles.display());
    Ok(())
}
