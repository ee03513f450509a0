//! The CSI node plugin over a real unix socket, with a test client playing kubelet, real
//! FUSE mounts, a real registry and (for ClipImages) a lookup that plays the API server.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clip_api::{ClipImage, ClipImageSpec, ClipImageStatus, Condition, Phase};
use clip_driver::csi::lookup::ClipImageLookup;
use clip_driver::csi::node::{NodeConfig, NodeContext};
use clip_driver::csi::proto::identity_client::IdentityClient;
use clip_driver::csi::proto::node_client::NodeClient;
use clip_driver::csi::proto::volume_capability::access_mode::Mode;
use clip_driver::csi::proto::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume,
};
use clip_driver::csi::proto::*;
use clip_driver::fs::is_mounted;
use clip_e2e::fixtures;
use clip_e2e::image::{Entry, Layer, Meta, Pusher, build_image};
use clip_e2e::proxy::Proxy;
use clip_e2e::registry::Registry;
use clip_storage::{RegistryConfig, StoreConfig};
use futures::FutureExt;
use futures::future::BoxFuture;
use tonic::Code;
use tonic::transport::Channel;

/// ClipImages served from a map, as the API server would.
#[derive(Default)]
struct FakeApi(Mutex<HashMap<(String, String), ClipImage>>);

impl ClipImageLookup for FakeApi {
    fn get<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<ClipImage>, String>> {
        let found = self
            .0
            .lock()
            .unwrap()
            .get(&(ns.to_owned(), name.to_owned()))
            .cloned();
        futures::future::ready(Ok(found)).boxed()
    }
}

struct Plugin {
    ctx: Arc<NodeContext>,
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
    dir: tempfile::TempDir,
    api: Arc<FakeApi>,
}

impl Plugin {
    async fn start(require_clip_images: bool) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let api = Arc::new(FakeApi::default());
        let config = NodeConfig {
            node_id: "test-node".into(),
            max_volumes: 64,
            state_dir: dir.path().join("state"),
            cache_dir: dir.path().join("cache"),
            cache_bytes: 1 << 30,
            store: StoreConfig::default(),
            fuse_threads: 2,
            require_clip_images,
            reserve_on_start: true,
            registry: RegistryConfig::default(),
            platform: None,
            publish_wait: Duration::from_secs(30),
        };
        let lookup: Arc<dyn ClipImageLookup> = api.clone();
        let ctx = NodeContext::new(
            config,
            None,
            Some(lookup),
            tokio::runtime::Handle::current(),
        )?;
        let socket = dir.path().join("csi.sock");
        let listener = clip_driver::csi::server::bind(&socket)?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let c = ctx.clone();
        let served = tokio::spawn(async move {
            clip_driver::csi::server::serve(listener, c, rx.map(|_| ()))
                .await
                .unwrap();
        });
        Ok(Self {
            ctx,
            socket,
            stop: Some(tx),
            served: Some(served),
            dir,
            api,
        })
    }

    async fn node(&self) -> anyhow::Result<NodeClient<Channel>> {
        Ok(NodeClient::new(channel(&self.socket).await?))
    }

    fn target(&self, name: &str) -> PathBuf {
        self.dir.path().join("pods").join(name).join("mount")
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.served.take() {
            h.abort();
        }
        self.ctx.shutdown();
    }
}

/// A gRPC channel over the plugin's unix socket, as kubelet opens it.
async fn channel(socket: &Path) -> anyhow::Result<Channel> {
    Ok(clip_driver::csi::server::connect(socket).await?)
}

fn mount_capability() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeReaderOnly as i32,
        }),
    }
}

fn publish(volume: &str, target: &Path, attrs: &[(&str, &str)]) -> NodePublishVolumeRequest {
    let mut ctx: HashMap<String, String> = attrs
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect();
    ctx.insert("csi.storage.k8s.io/pod.namespace".into(), "team".into());
    ctx.insert(
        "csi.storage.k8s.io/pod.name".into(),
        format!("pod-{volume}"),
    );
    ctx.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
    NodePublishVolumeRequest {
        volume_id: volume.into(),
        target_path: target.to_string_lossy().into_owned(),
        volume_capability: Some(mount_capability()),
        readonly: true,
        volume_context: ctx,
        ..Default::default()
    }
}

fn unpublish(volume: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: volume.into(),
        target_path: target.to_string_lossy().into_owned(),
    }
}

fn busybox_layers() -> anyhow::Result<Vec<Layer>> {
    let mut layers = fixtures::complex_layers();
    layers.push(Layer::gzip(vec![
        Entry::File {
            path: "bin/busybox".into(),
            meta: Meta::new(0o755),
            data: std::fs::read("/bin/busybox")?,
        },
        Entry::symlink("bin/sh", "busybox"),
    ]));
    Ok(layers)
}

async fn read(path: PathBuf) -> std::io::Result<Vec<u8>> {
    tokio::task::spawn_blocking(move || std::fs::read(path)).await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubelet_publishes_reads_runs_and_unpublishes_idempotently() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let layers = busybox_layers()?;
    let image = build_image(&layers, "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("csi/app", "v1", &image)?;
    let plugin = Plugin::start(false).await?;
    let mut node = plugin.node().await?;
    let mut identity = IdentityClient::new(channel(&plugin.socket).await?);
    let info = identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await?
        .into_inner();
    assert_eq!(info.name, "csi.clip.dev");
    assert!(!info.vendor_version.is_empty());
    let probe = identity.probe(ProbeRequest {}).await?.into_inner();
    assert_eq!(probe.ready, Some(true));
    let caps = node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await?
        .into_inner();
    assert_eq!(caps.capabilities.len(), 2);
    let ninfo = node
        .node_get_info(NodeGetInfoRequest {})
        .await?
        .into_inner();
    assert_eq!(
        (ninfo.node_id.as_str(), ninfo.max_volumes_per_node),
        ("test-node", 64)
    );

    let target = plugin.target("a");
    let req = publish("vol-a", &target, &[("image", &reference)]);
    let started = std::time::Instant::now();
    node.node_publish_volume(req.clone()).await?;
    eprintln!("publish (indexing included) took {:?}", started.elapsed());
    assert!(is_mounted(&target));
    let passwd = read(target.join("etc/passwd")).await?;
    assert!(passwd.starts_with(b"root:x:0:0:root:/root:/bin/ash"));
    let t = target.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("chroot")
            .arg(&t)
            .args([
                "/bin/sh",
                "-c",
                "echo ran from the volume; busybox cat /etc/shadow",
            ])
            .output()
    })
    .await??;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ran from the volume\nrecreated in the same layer as its whiteout"
    );

    // The same publish again is fine; other arguments for the same volume are a conflict.
    node.node_publish_volume(req.clone()).await?;
    let mut other = req.clone();
    other
        .volume_context
        .insert("image".into(), format!("{}/csi/other:v1", registry.host()));
    let err = node.node_publish_volume(other).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    assert!(err.message().contains("vol-a"));

    let stats = node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "vol-a".into(),
            volume_path: target.to_string_lossy().into_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(!stats.volume_condition.unwrap().abnormal);
    assert!(stats.usage.iter().any(|u| u.total > 0));

    node.node_unpublish_volume(unpublish("vol-a", &target))
        .await?;
    node.node_unpublish_volume(unpublish("vol-a", &target))
        .await?;
    assert!(!is_mounted(&target), "nothing stays mounted");
    assert!(!target.exists(), "the target directory is removed");
    node.node_unpublish_volume(unpublish("never-published", &plugin.target("zz")))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_volumes_of_one_image_share_one_index_build() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let proxy = Proxy::start(&registry.host())?;
    let layers = fixtures::complex_layers();
    let image = build_image(&layers, "linux", "amd64")?;
    Pusher::new(&registry.host(), None).push_image("csi/shared", "v1", &image)?;
    let reference = format!("{}/csi/shared:v1", proxy.host());
    let plugin = Plugin::start(false).await?;
    let calls = (0..20).map(|i| {
        let p = &plugin;
        let reference = reference.clone();
        async move {
            let mut node = p.node().await?;
            let target = p.target(&format!("v{i}"));
            node.node_publish_volume(publish(
                &format!("vol-{i}"),
                &target,
                &[("image", &reference)],
            ))
            .await?;
            Ok::<_, anyhow::Error>(target)
        }
    });
    let targets = futures::future::try_join_all(calls).await?;
    for t in &targets {
        assert_eq!(read(t.join("etc/passwd")).await?.len(), 68);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Indexing streams each layer whole (a GET without Range): once for all 20 volumes.
    let whole_blob_reads = proxy
        .blob_reads()
        .iter()
        .filter(|l| l.range.is_none() && l.path.contains("/blobs/"))
        .count();
    assert_eq!(
        whole_blob_reads,
        image.layers.len(),
        "each layer streamed once: {:?}",
        proxy.log()
    );
    let metrics = plugin.ctx.metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("clip_image_volumes{") && l.ends_with(" 20")),
        "{metrics}"
    );
    let mut node = plugin.node().await?;
    for (i, t) in targets.iter().enumerate() {
        node.node_unpublish_volume(unpublish(&format!("vol-{i}"), t))
            .await?;
        assert!(!is_mounted(t));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_call_on_a_busy_volume_is_aborted_and_nothing_leaks() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let proxy = Proxy::start(&registry.host())?;
    let image = build_image(&fixtures::complex_layers(), "linux", "amd64")?;
    Pusher::new(&registry.host(), None).push_image("csi/slow", "v1", &image)?;
    // A slow registry keeps the first publish busy for seconds.
    proxy.set_delay(Duration::from_millis(700));
    let reference = format!("{}/csi/slow:v1", proxy.host());
    let plugin = Plugin::start(false).await?;
    let target = plugin.target("busy");
    let mut a = plugin.node().await?;
    let mut b = plugin.node().await?;
    let req = publish("vol-busy", &target, &[("image", &reference)]);
    // The first publish indexes the image (seconds); meanwhile the volume is busy.
    let first = tokio::spawn(async move { a.node_publish_volume(req).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = b
        .node_unpublish_volume(unpublish("vol-busy", &target))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err}");
    assert!(err.message().contains("vol-busy"));
    first.await??;
    assert!(is_mounted(&target));
    proxy.set_delay(Duration::ZERO);
    b.node_unpublish_volume(unpublish("vol-busy", &target))
        .await?;
    assert!(!is_mounted(&target));

    // Publish and unpublish racing: each ends OK or ABORTED, and no mount is left behind.
    for round in 0..5 {
        let mut x = plugin.node().await?;
        let mut y = plugin.node().await?;
        let req = publish("vol-race", &target, &[("image", &reference)]);
        let u = unpublish("vol-race", &target);
        let (p, q) = tokio::join!(x.node_publish_volume(req), y.node_unpublish_volume(u));
        for r in [p.err(), q.err()].into_iter().flatten() {
            assert_eq!(r.code(), Code::Aborted, "round {round}: {r}");
        }
        y.node_unpublish_volume(unpublish("vol-race", &target))
            .await?;
        assert!(!is_mounted(&target), "round {round}: leaked mount");
    }
    Ok(())
}

fn ready_clip_image(name: &str, digest: &str, phase: Phase, reason: &str) -> ClipImage {
    let mut ci = ClipImage::new(
        name,
        ClipImageSpec {
            image: "registry.example/app:v1".into(),
            pull_secrets: vec![],
            platform: None,
            warm: false,
        },
    );
    ci.metadata.namespace = Some("team".into());
    ci.status = Some(ClipImageStatus {
        phase: Some(phase),
        index_digest: Some(digest.into()),
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: if phase == Phase::Ready {
                "True"
            } else {
                "False"
            }
            .into(),
            reason: reason.into(),
            message: format!("{reason} for the test"),
            last_transition_time: "2026-11-21T00:00:00Z".into(),
            observed_generation: None,
        }],
        ..ClipImageStatus::default()
    });
    ci
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clip_image_volumes_and_every_bad_request_get_the_right_code() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let secured = Registry::start_with_auth("kube", "letmein")?;
    let layers = fixtures::complex_layers();
    let image = build_image(&layers, "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("csi/ci", "v1", &image)?;
    let private = Pusher::new(&secured.host(), secured.credentials()).push_image(
        "csi/private",
        "v1",
        &image,
    )?;
    let plugin = Plugin::start(false).await?;

    // A Ready ClipImage whose index this node has.
    let client = clip_storage::RegistryClient::new(RegistryConfig::default());
    let resolved = client.resolve(&reference, None).await?;
    let index = clip_storage::build_index(
        &client,
        &resolved,
        clip_index::IndexOptions::default(),
        2,
        Arc::default(),
    )
    .await?;
    let encoded = clip_index::encode(&index)?;
    let digest = clip_index::index_digest(&encoded);
    let dir = plugin.dir.path().join("state/indexes");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("{}.clipidx", digest.hex())), &encoded)?;
    {
        let mut api = plugin.api.0.lock().unwrap();
        let d = digest.to_string();
        api.insert(
            ("team".into(), "app".into()),
            ready_clip_image("app", &d, Phase::Ready, "Indexed"),
        );
        api.insert(
            ("team".into(), "pending".into()),
            ready_clip_image("pending", &d, Phase::Indexing, "Indexing"),
        );
        api.insert(
            ("team".into(), "broken".into()),
            ready_clip_image("broken", &d, Phase::Failed, "ImageNotFound"),
        );
    }
    let mut node = plugin.node().await?;
    let target = plugin.target("ci");
    node.node_publish_volume(publish("vol-ci", &target, &[("clipImage", "app")]))
        .await?;
    assert_eq!(
        read(target.join("usr/share/doc/readme")).await?,
        b"documentation\n"
    );
    node.node_unpublish_volume(unpublish("vol-ci", &target))
        .await?;

    let t = plugin.target("bad");
    let mut cases: Vec<(&str, NodePublishVolumeRequest, Code, &str)> = Vec::new();
    let mut r = publish("", &t, &[("image", &reference)]);
    cases.push((
        "missing volume id",
        r.clone(),
        Code::InvalidArgument,
        "volume_id",
    ));
    r = publish("v1", Path::new(""), &[("image", &reference)]);
    cases.push(("missing target", r, Code::InvalidArgument, "target_path"));
    r = publish("v1", &t, &[("image", &reference)]);
    r.volume_capability = None;
    cases.push((
        "missing capability",
        r,
        Code::InvalidArgument,
        "volume_capability",
    ));
    r = publish("v1", &t, &[("image", &reference)]);
    r.volume_capability = Some(VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeReaderOnly as i32,
        }),
    });
    cases.push(("block access", r, Code::InvalidArgument, "block"));
    r = publish("v1", &t, &[("image", &reference)]);
    r.readonly = false;
    r.volume_capability.as_mut().unwrap().access_mode = Some(AccessMode {
        mode: Mode::SingleNodeWriter as i32,
    });
    cases.push(("not read-only", r, Code::InvalidArgument, "read-only"));
    cases.push((
        "no image named",
        publish("v1", &t, &[]),
        Code::InvalidArgument,
        "clipImage",
    ));
    cases.push((
        "unknown ClipImage",
        publish("v1", &t, &[("clipImage", "nope")]),
        Code::NotFound,
        "team/nope not found",
    ));
    cases.push((
        "ClipImage not Ready",
        publish("v1", &t, &[("clipImage", "pending")]),
        Code::FailedPrecondition,
        "Indexing",
    ));
    cases.push((
        "ClipImage failed",
        publish("v1", &t, &[("clipImage", "broken")]),
        Code::FailedPrecondition,
        "ImageNotFound",
    ));
    cases.push((
        "malformed reference",
        publish("v1", &t, &[("image", "Not A Reference!")]),
        Code::InvalidArgument,
        "invalid image reference",
    ));
    let closed = clip_e2e::free_port()?;
    cases.push((
        "unreachable registry",
        publish("v1", &t, &[("image", &format!("127.0.0.1:{closed}/a/b:c"))]),
        Code::Unavailable,
        "unreachable",
    ));
    let mut wrong = publish("v1", &t, &[("image", &private)]);
    wrong.secrets.insert(
        ".dockerconfigjson".into(),
        format!(
            r#"{{"auths":{{"{}":{{"username":"kube","password":"WRONG"}}}}}}"#,
            secured.host()
        ),
    );
    cases.push((
        "wrong credentials",
        wrong,
        Code::PermissionDenied,
        "refused the credentials",
    ));
    for (what, req, code, text) in cases {
        let err = node
            .node_publish_volume(req)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"));
        assert_eq!(err.code(), code, "{what}: {err}");
        assert!(err.message().contains(text), "{what}: {:?}", err.message());
        assert!(!err.message().contains("WRONG"), "{what}: a secret leaked");
        assert!(!is_mounted(&t), "{what}: mounted anyway");
    }

    // The right pull secret works.
    let mut good = publish(
        "v-private",
        &plugin.target("private"),
        &[("image", &private)],
    );
    good.secrets.insert(
        ".dockerconfigjson".into(),
        format!(
            r#"{{"auths":{{"{}":{{"username":"kube","password":"letmein"}}}}}}"#,
            secured.host()
        ),
    );
    node.node_publish_volume(good).await?;
    assert_eq!(
        read(plugin.target("private").join("etc/passwd"))
            .await?
            .len(),
        68
    );
    node.node_unpublish_volume(unpublish("v-private", &plugin.target("private")))
        .await?;

    // Stats of unknown volumes; direct images refused when ClipImages are required.
    let err = node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "ghost".into(),
            volume_path: "/x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let strict = Plugin::start(true).await?;
    let err = strict
        .node()
        .await?
        .node_publish_volume(publish("v1", &strict.target("s"), &[("image", &reference)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("only mounts ClipImages"),
        "{}",
        err.message()
    );
    Ok(())
}
