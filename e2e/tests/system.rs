//! The whole system on one machine, without Kubernetes: a registry, a Redis Cluster, the
//! controller's reconcile publishing an index, and two simulated nodes whose CSI plugins
//! serve a kubelet-playing client over unix sockets, mounting the image with FUSE and
//! running a program from it. The second node must not touch the registry.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clip_api::{ClipImage, ClipImageSpec, Phase};
use clip_driver::csi::kubelet;
use clip_driver::csi::lookup::KubeLookup;
use clip_driver::csi::node::{NodeConfig, NodeContext};
use clip_driver::csi::proto::node_client::NodeClient;
use clip_driver::csi::proto::*;
use clip_e2e::image::{Entry, Layer, Meta, Pusher, build_image};
use clip_e2e::kube_api::FakeApi;
use clip_e2e::proxy::Proxy;
use clip_e2e::redis::RedisCluster;
use clip_e2e::registry::Registry;
use clip_storage::cache::redis::{RedisCache, RedisConfig};
use clip_storage::{RegistryConfig, StoreConfig};
use tonic::transport::Channel;

struct SimNode {
    ctx: Arc<NodeContext>,
    socket: PathBuf,
    dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start_node(name: &str, cluster: &RedisCluster, api: &FakeApi) -> anyhow::Result<SimNode> {
    let dir = tempfile::tempdir()?;
    let redis = Arc::new(
        RedisCache::connect(RedisConfig {
            seeds: cluster.seeds(),
            ..RedisConfig::default()
        })
        .await?,
    );
    let ctx = NodeContext::new(
        NodeConfig {
            node_id: name.into(),
            max_volumes: 16,
            state_dir: dir.path().join("state"),
            cache_dir: dir.path().join("cache"),
            cache_bytes: 1 << 30,
            store: StoreConfig::default(),
            fuse_threads: 4,
            require_clip_images: true,
            reserve_on_start: true,
            registry: RegistryConfig::default(),
            platform: None,
            publish_wait: Duration::from_secs(10),
            keeper_socket: None,
            idle_indexes: clip_driver::csi::idle::IdleLimits::default(),
        },
        Some(redis),
        Some(Arc::new(KubeLookup::new(api.client.clone()))),
        tokio::runtime::Handle::current(),
    )?;
    let socket = dir.path().join("csi.sock");
    let listener = clip_driver::csi::server::bind(&socket)?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let c = ctx.clone();
    tokio::spawn(async move {
        let _ = clip_driver::csi::server::serve(listener, c, async {
            let _ = rx.await;
        })
        .await;
    });
    Ok(SimNode {
        ctx,
        socket,
        dir,
        _stop: tx,
    })
}

async fn kubelet(socket: &Path) -> anyhow::Result<NodeClient<Channel>> {
    Ok(NodeClient::new(
        clip_driver::csi::server::connect(socket).await?,
    ))
}

fn pod_volume(volume: &str, target: &Path, clip_image: &str) -> NodePublishVolumeRequest {
    let pod = format!("pod-{volume}");
    kubelet::ephemeral_volume(volume, target, "ml", &pod, &[("clipImage", clip_image)])
}

/// What the "pod" runs: a shell from the image that reads a config and a large data file.
async fn run_in(target: &Path) -> anyhow::Result<String> {
    let t = target.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("chroot")
            .arg(&t)
            .args([
                "/bin/sh",
                "-c",
                "busybox cat /app/config.txt; busybox wc -c /app/model.bin; busybox md5sum /app/model.bin",
            ])
            .output()
    })
    .await??;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_serve_a_clip_image_and_the_second_never_touches_the_registry()
-> anyhow::Result<()> {
    let registry = Registry::start()?;
    let proxy = Proxy::start(&registry.host())?;
    let cluster = RedisCluster::start()?;
    let model = clip_e2e::Rng(77).bytes(12 << 20);
    let layers = vec![
        Layer::gzip(vec![
            Entry::File {
                path: "bin/busybox".into(),
                meta: Meta::new(0o755),
                data: std::fs::read("/bin/busybox")?,
            },
            Entry::symlink("bin/sh", "busybox"),
        ]),
        Layer::gzip(vec![
            Entry::file("app/config.txt", b"model=resnet\n".to_vec()),
            Entry::file("app/model.bin", model.clone()),
        ]),
    ];
    let image = build_image(&layers, "linux", "amd64")?;
    Pusher::new(&registry.host(), None).push_image("ml/app", "v1", &image)?;

    // The platform team declares the image; the controller indexes and publishes it.
    let api = FakeApi::start();
    let mut ci = ClipImage::new(
        "app",
        ClipImageSpec {
            image: format!("{}/ml/app:v1", proxy.host()),
            pull_secrets: vec![],
            platform: None,
            warm: false,
        },
    );
    ci.metadata.namespace = Some("ml".into());
    ci.metadata.generation = Some(1);
    api.put_object("ml", "app", serde_json::to_value(&ci)?);
    let redis = Arc::new(
        RedisCache::connect(RedisConfig {
            seeds: cluster.seeds(),
            ..RedisConfig::default()
        })
        .await?,
    );
    let ctx = clip_controller::Context::new(
        api.client.clone(),
        redis,
        RegistryConfig::default(),
        2,
        Duration::from_secs(600),
    );
    let mut ready = false;
    for _ in 0..200 {
        let current: ClipImage = serde_json::from_value(api.object("ml", "app").unwrap())?;
        clip_controller::reconcile(Arc::new(current), ctx.clone()).await?;
        let current: ClipImage = serde_json::from_value(api.object("ml", "app").unwrap())?;
        if current.status.and_then(|s| s.phase) == Some(Phase::Ready) {
            ready = true;
            break;
        }
    }
    assert!(ready, "the ClipImage became Ready");

    // Node A: kubelet publishes the pod's volume; the pod's program runs from the image.
    let a = start_node("node-a", &cluster, &api).await?;
    let mut kubelet_a = kubelet(&a.socket).await?;
    let target_a = a.dir.path().join("pods/uid-a/volumes/model/mount");
    let started = std::time::Instant::now();
    kubelet_a
        .node_publish_volume(pod_volume("vol-a", &target_a, "app"))
        .await?;
    let publish_a = started.elapsed();
    let out_a = run_in(&target_a).await?;
    let expected_md5 = {
        let out = std::process::Command::new("md5sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut out = out;
        std::io::Write::write_all(out.stdin.as_mut().unwrap(), &model)?;
        drop(out.stdin.take());
        String::from_utf8_lossy(&out.wait_with_output()?.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(out_a.starts_with("model=resnet\n"), "{out_a}");
    assert!(
        out_a.contains(&format!("{} /app/model.bin", model.len())),
        "{out_a}"
    );
    assert!(out_a.contains(&expected_md5), "{out_a}");
    eprintln!("node A: publish {publish_a:?}");
    // Node A publishes what it fetched to Redis in the background: wait until every chunk
    // it took from the registry has been written there.
    let metric = |text: &str, prefix: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = a.ctx.metrics();
        let fetched = metric(&m, "clip_tier_chunks_total{tier=\"source\"");
        let written = metric(&m, "clip_tier_events_total{tier=\"redis\",event=\"write\"");
        if fetched > 0 && written >= fetched {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "node A never published its chunks: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Node B: the registry refuses everything; the same pod runs from Redis alone.
    proxy.set_refuse(true);
    proxy.clear_log();
    let b = start_node("node-b", &cluster, &api).await?;
    let mut kubelet_b = kubelet(&b.socket).await?;
    let target_b = b.dir.path().join("pods/uid-b/volumes/model/mount");
    kubelet_b
        .node_publish_volume(pod_volume("vol-b", &target_b, "app"))
        .await?;
    let out_b = run_in(&target_b).await?;
    assert_eq!(out_b, out_a, "node B saw the same bytes");
    assert!(
        proxy.log().is_empty(),
        "node B fetched from the registry: {:?}",
        proxy.log()
    );
    let metrics = b.ctx.metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("clip_tier_chunks_total{tier=\"redis\"") && !l.ends_with(" 0")),
        "{metrics}"
    );

    for (k, v, t) in [
        (&mut kubelet_a, "vol-a", &target_a),
        (&mut kubelet_b, "vol-b", &target_b),
    ] {
        k.node_unpublish_volume(kubelet::unpublish(v, t)).await?;
        assert!(!clip_driver::fs::is_mounted(t));
    }
    Ok(())
}
