//! The CSI node plugin over a real unix socket, with a test client playing kubelet, real
//! FUSE mounts, a real registry and (for ClipImages) a lookup that plays the API server.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clip_api::{ClipImage, ClipImageSpec, ClipImageStatus, Condition, Phase};
use clip_driver::csi::idle::IdleLimits;
use clip_driver::csi::kubelet;
use clip_driver::csi::lookup::ClipImageLookup;
use clip_driver::csi::node::{NodeConfig, NodeContext};
use clip_driver::csi::proto::identity_client::IdentityClient;
use clip_driver::csi::proto::node_client::NodeClient;
use clip_driver::csi::proto::volume_capability::access_mode::Mode;
use clip_driver::csi::proto::volume_capability::{AccessMode, AccessType, BlockVolume};
use clip_driver::csi::proto::*;
use clip_driver::fs::is_mounted;
use clip_e2e::fixtures;
use clip_e2e::image::{Entry, Layer, Meta, Pusher, build_image};
use clip_e2e::proxy::Proxy;
use clip_e2e::redis::RedisCluster;
use clip_e2e::registry::Registry;
use clip_storage::cache::redis::{RedisCache, RedisConfig};
use clip_storage::cache::{ChunkCache, ChunkKey};
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

/// How a test plugin differs from the default one.
#[derive(Default)]
struct Options {
    require_clip_images: bool,
    /// The shared cache, connected by the test (which keeps a handle to look at it).
    redis: Option<Arc<RedisCache>>,
    store: StoreConfig,
    idle: IdleLimits,
}

impl Plugin {
    async fn start(require_clip_images: bool) -> anyhow::Result<Self> {
        Self::start_with(Options {
            require_clip_images,
            ..Options::default()
        })
        .await
    }

    /// A plugin with its own state, cache and socket in a temporary directory.
    async fn start_with(options: Options) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let api = Arc::new(FakeApi::default());
        let config = NodeConfig {
            node_id: "test-node".into(),
            max_volumes: 64,
            state_dir: dir.path().join("state"),
            cache_dir: dir.path().join("cache"),
            cache_bytes: 1 << 30,
            store: options.store,
            fuse_threads: 2,
            require_clip_images: options.require_clip_images,
            reserve_on_start: true,
            registry: RegistryConfig::default(),
            platform: None,
            publish_wait: Duration::from_secs(30),
            keeper_socket: None,
            idle_indexes: options.idle,
        };
        let lookup: Arc<dyn ClipImageLookup> = api.clone();
        let ctx = NodeContext::new(
            config,
            options.redis,
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

    async fn identity(&self) -> anyhow::Result<IdentityClient<Channel>> {
        Ok(IdentityClient::new(channel(&self.socket).await?))
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

fn publish(volume: &str, target: &Path, attrs: &[(&str, &str)]) -> NodePublishVolumeRequest {
    kubelet::ephemeral_volume(volume, target, "team", &format!("pod-{volume}"), attrs)
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
        clip_e2e::check::run_in_root(&t, "echo ran from the volume; busybox cat /etc/shadow")
    })
    .await??;
    assert_eq!(
        out,
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
        .node_get_volume_stats(kubelet::volume_stats("vol-a", &target))
        .await?
        .into_inner();
    assert!(!stats.volume_condition.unwrap().abnormal);
    assert!(stats.usage.iter().any(|u| u.total > 0));

    node.node_unpublish_volume(kubelet::unpublish("vol-a", &target))
        .await?;
    node.node_unpublish_volume(kubelet::unpublish("vol-a", &target))
        .await?;
    assert!(!is_mounted(&target), "nothing stays mounted");
    assert!(!target.exists(), "the target directory is removed");
    node.node_unpublish_volume(kubelet::unpublish("never-published", &plugin.target("zz")))
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
    // A second image beside it: the node's metrics stay one valid exposition, each
    // family once, and each volume's filesystem has its own requests.
    let other = build_image(&busybox_layers()?, "linux", "amd64")?;
    Pusher::new(&registry.host(), None).push_image("csi/other", "v1", &other)?;
    let mut node = plugin.node().await?;
    let other_target = plugin.target("other");
    node.node_publish_volume(publish(
        "vol-other",
        &other_target,
        &[("image", &format!("{}/csi/other:v1", proxy.host()))],
    ))
    .await?;
    assert_eq!(read(other_target.join("etc/passwd")).await?.len(), 68);
    let metrics = plugin.ctx.metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("clip_image_volumes{") && l.ends_with(" 20")),
        "{metrics}"
    );
    let images = metrics
        .lines()
        .filter(|l| l.starts_with("clip_image_volumes{"))
        .count();
    assert_eq!(images, 2, "{metrics}");
    assert_well_formed(&metrics);
    let lookups = metric(
        &metrics,
        "clip_fs_requests_total{op=\"lookup\",volume_id=\"vol-other\"",
    );
    assert!(lookups.is_some_and(|n| n > 0), "{metrics}");
    node.node_unpublish_volume(kubelet::unpublish("vol-other", &other_target))
        .await?;
    for (i, t) in targets.iter().enumerate() {
        node.node_unpublish_volume(kubelet::unpublish(&format!("vol-{i}"), t))
            .await?;
        assert!(!is_mounted(t));
    }
    Ok(())
}

/// A Prometheus text exposition that a scrape accepts: at most one `# HELP` and one `# TYPE`
/// per family, and the lines of a family together (a family left is never met again).
fn assert_well_formed(text: &str) {
    let mut typed = std::collections::HashSet::new();
    let mut headers = std::collections::HashSet::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            typed.insert(rest.split(' ').next().unwrap_or_default().to_owned());
        }
        if l.starts_with("# ") {
            assert!(headers.insert(l.to_owned()), "header twice: {l}\n{text}");
        }
    }
    let family = |l: &str| -> String {
        let name = l
            .strip_prefix("# HELP ")
            .or_else(|| l.strip_prefix("# TYPE "))
            .unwrap_or(l)
            .split(['{', ' '])
            .next()
            .unwrap_or_default();
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && typed.contains(base)
            {
                return base.to_owned();
            }
        }
        name.to_owned()
    };
    let mut left = std::collections::HashSet::new();
    let mut current = String::new();
    for l in text.lines().filter(|l| !l.is_empty()) {
        let f = family(l);
        if f != current {
            assert!(!left.contains(&f), "family {f} split\n{text}");
            left.insert(std::mem::replace(&mut current, f));
        }
    }
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
        .node_unpublish_volume(kubelet::unpublish("vol-busy", &target))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err}");
    assert!(err.message().contains("vol-busy"));
    first.await??;
    assert!(is_mounted(&target));
    proxy.set_delay(Duration::ZERO);
    b.node_unpublish_volume(kubelet::unpublish("vol-busy", &target))
        .await?;
    assert!(!is_mounted(&target));

    // Publish and unpublish racing: each ends OK or ABORTED, and no mount is left behind.
    for round in 0..5 {
        let mut x = plugin.node().await?;
        let mut y = plugin.node().await?;
        let req = publish("vol-race", &target, &[("image", &reference)]);
        let u = kubelet::unpublish("vol-race", &target);
        let (p, q) = tokio::join!(x.node_publish_volume(req), y.node_unpublish_volume(u));
        for r in [p.err(), q.err()].into_iter().flatten() {
            assert_eq!(r.code(), Code::Aborted, "round {round}: {r}");
        }
        y.node_unpublish_volume(kubelet::unpublish("vol-race", &target))
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

/// Builds the index of `reference`, keeps it in the plugin's state directory as the node
/// keeps the ones it is given, and returns its file.
async fn index_on_node(plugin: &Plugin, reference: &str) -> anyhow::Result<(String, PathBuf)> {
    let client = clip_storage::RegistryClient::new(RegistryConfig::default());
    let resolved = client.resolve(reference, None).await?;
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
    let file = dir.join(format!("{}.clipidx", digest.hex()));
    std::fs::write(&file, &encoded)?;
    Ok((digest.to_string(), file))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_image_published_again_soon_reuses_its_index_from_memory_until_its_time_is_over()
-> anyhow::Result<()> {
    let registry = Registry::start()?;
    let layers = fixtures::complex_layers();
    let image = build_image(&layers, "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("csi/idle", "v1", &image)?;
    let plugin = Plugin::start_with(Options {
        idle: IdleLimits {
            count: 4,
            linger: Duration::from_secs(5),
        },
        ..Options::default()
    })
    .await?;
    let (digest, file) = index_on_node(&plugin, &reference).await?;
    plugin.api.0.lock().unwrap().insert(
        ("team".into(), "app".into()),
        ready_clip_image("app", &digest, Phase::Ready, "Indexed"),
    );
    let idle = || metric(&plugin.ctx.metrics(), "clip_idle_indexes");
    let mut node = plugin.node().await?;
    let readme = "usr/share/doc/readme";
    let mut serve = async |volume: &str| -> anyhow::Result<PathBuf> {
        let target = plugin.target(volume);
        node.node_publish_volume(publish(volume, &target, &[("clipImage", "app")]))
            .await?;
        assert_eq!(read(target.join(readme)).await?, b"documentation\n");
        Ok(target)
    };
    let a = serve("vol-a").await?;
    // From here on the index is not on disk: only memory can serve the image.
    std::fs::remove_file(&file)?;
    let b = serve("vol-b").await?;
    assert_eq!(idle(), Some(0));
    for (v, t) in [("vol-a", &a), ("vol-b", &b)] {
        node.node_unpublish_volume(kubelet::unpublish(v, t)).await?;
    }
    assert_eq!(idle(), Some(1), "{}", plugin.ctx.metrics());
    let c = plugin.target("vol-c");
    node.node_publish_volume(publish("vol-c", &c, &[("clipImage", "app")]))
        .await?;
    assert_eq!(read(c.join(readme)).await?, b"documentation\n");
    assert_eq!(idle(), Some(0), "in use again");
    node.node_unpublish_volume(kubelet::unpublish("vol-c", &c))
        .await?;
    assert_eq!(idle(), Some(1));
    // Let go of once its time is over, without any call to the node.
    let deadline = Instant::now() + Duration::from_secs(30);
    while idle() != Some(0) {
        assert!(Instant::now() < deadline, "{}", plugin.ctx.metrics());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let d = plugin.target("vol-d");
    let err = node
        .node_publish_volume(publish("vol-d", &d, &[("clipImage", "app")]))
        .await
        .expect_err("the index is neither in memory nor on disk");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("not on this node"), "{err:?}");
    assert!(!is_mounted(&d));
    Ok(())
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
    let (d, _) = index_on_node(&plugin, &reference).await?;
    {
        let mut api = plugin.api.0.lock().unwrap();
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
    node.node_unpublish_volume(kubelet::unpublish("vol-ci", &target))
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
    node.node_unpublish_volume(kubelet::unpublish("v-private", &plugin.target("private")))
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

// Readiness. `NodeContext::ready` (Probe) checks that /dev/fuse exists; Redis trouble is
// logged but keeps the plugin ready, since reads fall back to the registry and the chart's
// livenessprobe sidecar turns a failed Probe into a restart that kills every FUSE mount of
// the node. A required Redis that cannot be reached at start stops the process instead.

/// Runs the plugin in a mount namespace of its own whose /dev is an empty tmpfs: a node
/// plugin container that was not given /dev/fuse.
const WITHOUT_DEV_FUSE: &[&str] = &[
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "sh",
    "-c",
    "mount -t tmpfs none /dev && exec \"$@\"",
    "sh",
];

/// `clip node` as its own process, as the DaemonSet runs it, logging JSON to a file;
/// stopped on drop.
struct NodeProcess {
    child: std::process::Child,
    socket: PathBuf,
    log: PathBuf,
}

impl NodeProcess {
    /// Starts `clip node` with its state in `dir`; `wrapper` (if any) runs first and execs
    /// the plugin.
    fn spawn(dir: &Path, wrapper: &[&str], extra: &[&str]) -> anyhow::Result<Self> {
        let socket = clip_e2e::node::socket(dir);
        let log = dir.join("node.log");
        let clip = env!("CARGO_BIN_EXE_clip");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = std::process::Command::new(first);
                c.args(rest).arg(clip);
                c
            }
            None => std::process::Command::new(clip),
        };
        cmd.args(clip_e2e::node::node_args(dir, "probe-node"))
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        Ok(Self {
            child: cmd.spawn()?,
            socket,
            log,
        })
    }

    /// Waits until the plugin socket appears; fails with the log if the process exits.
    fn wait_serving(&mut self) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !self.socket.exists() {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("clip node exited with {status}:\n{}", self.log());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the plugin socket did not appear:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "clip node still runs after {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as kubelet stops a container; fails if the plugin does not exit cleanly.
    fn stop(&mut self) -> anyhow::Result<()> {
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let status = self.wait_exit(Duration::from_secs(10))?;
        anyhow::ensure!(status.success(), "clip node exited with {status}");
        Ok(())
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn probe(identity: &mut IdentityClient<Channel>) -> anyhow::Result<Option<bool>> {
    Ok(identity.probe(ProbeRequest {}).await?.into_inner().ready)
}

/// `len` bytes at `offset` of a file, read as a program would (pread on the FUSE mount).
async fn read_at(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        std::fs::File::open(path)?.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    })
    .await?
}

/// What the image declares at `path` (the model, computed independently of clip).
fn expected_file(layers: &[Layer], path: &str) -> Vec<u8> {
    match clip_e2e::model::expected_tree(layers)
        .remove(path)
        .map(|e| e.kind)
    {
        Some(clip_e2e::model::Kind::File(data)) => data,
        other => panic!("{path} is not a file of the image: {other:?}"),
    }
}

/// The keys of the chunks that hold `len` bytes at `offset` of the image file `path`.
fn chunk_keys(
    index: &clip_index::ImageIndex,
    path: &str,
    offset: u64,
    len: u64,
) -> anyhow::Result<Vec<ChunkKey>> {
    let ino = index.resolve(path.as_bytes(), true)?;
    let node = index.node(ino).unwrap();
    let clip_index::Content::File { layer, offset: at } = node.content else {
        anyhow::bail!("{path} is not a file");
    };
    let l = &index.layers[layer as usize];
    let len = len.min(node.size.saturating_sub(offset));
    Ok(l.chunks_covering(at + offset, len)?
        .map(|c| {
            let r = l.chunk_range(c);
            ChunkKey {
                digest: l.chunks[c as usize].digest,
                len: (r.end - r.start) as u32,
            }
        })
        .collect())
}

/// Waits until Redis holds every chunk of `keys` (nodes publish in the background).
async fn wait_in_redis(redis: &RedisCache, keys: &[ChunkKey]) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut missing = 0;
        for k in keys {
            if !redis.contains(k).await {
                missing += 1;
            }
        }
        if missing == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{missing} of {} chunks never reached Redis",
            keys.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start_cluster() -> anyhow::Result<RedisCluster> {
    tokio::task::spawn_blocking(RedisCluster::start).await?
}

async fn connect_redis(
    cluster: &RedisCluster,
    tune: impl FnOnce(&mut RedisConfig),
) -> anyhow::Result<Arc<RedisCache>> {
    let mut config = RedisConfig {
        seeds: cluster.seeds(),
        ..RedisConfig::default()
    };
    tune(&mut config);
    Ok(Arc::new(RedisCache::connect(config).await?))
}

/// The value of the first metric line that starts with `prefix` (a name and labels).
fn metric(text: &str, prefix: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probe_is_not_ready_without_dev_fuse_and_logs_why() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let image = build_image(&fixtures::platform_layers("linux/amd64"), "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("csi/nofuse", "v1", &image)?;
    let dir = tempfile::tempdir()?;
    let target = dir.path().join("pods/nofuse/mount");
    let mut plugin = NodeProcess::spawn(dir.path(), WITHOUT_DEV_FUSE, &[])?;
    plugin.wait_serving()?;
    let mut identity = IdentityClient::new(channel(&plugin.socket).await?);
    assert_eq!(probe(&mut identity).await?, Some(false));
    let log = plugin.log();
    assert!(
        log.lines()
            .any(|l| l.contains("probe: not ready") && l.contains("/dev/fuse is missing")),
        "the reason is logged:\n{log}"
    );

    // Not ready is right: it cannot serve a volume.
    let mut node = NodeClient::new(channel(&plugin.socket).await?);
    let err = node
        .node_publish_volume(publish("vol-nofuse", &target, &[("image", &reference)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err}");
    assert!(
        err.message().contains("vol-nofuse") && err.message().contains("mounting"),
        "{}",
        err.message()
    );
    assert!(!is_mounted(&target));
    plugin.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_required_redis_that_cannot_be_reached_stops_the_plugin_and_an_optional_one_does_not()
-> anyhow::Result<()> {
    // Port 1: privileged, never an ephemeral port another test's server could take.
    let seeds = "127.0.0.1:1".to_owned();
    let dir = tempfile::tempdir()?;
    let mut required = NodeProcess::spawn(dir.path(), &[], &["--redis", &seeds])?;
    let status = required.wait_exit(Duration::from_secs(30))?;
    let log = required.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("redis") && log.contains(&seeds),
        "the error names the cluster:\n{log}"
    );
    assert!(!required.socket.exists(), "it never served");

    let mut optional =
        NodeProcess::spawn(dir.path(), &[], &["--redis", &seeds, "--redis-optional"])?;
    optional.wait_serving()?;
    let mut identity = IdentityClient::new(channel(&optional.socket).await?);
    assert_eq!(probe(&mut identity).await?, Some(true));
    assert!(
        optional
            .log()
            .contains("continuing without the shared cache"),
        "{}",
        optional.log()
    );
    optional.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probe_stays_ready_while_redis_is_down_and_reads_go_to_the_registry() -> anyhow::Result<()>
{
    let registry = Registry::start()?;
    let layers = fixtures::big_layers(64 << 20);
    let image = build_image(&layers, "linux", "amd64")?;
    let reference =
        Pusher::new(&registry.host(), None).push_image("csi/redis-down", "v1", &image)?;
    let expected = expected_file(&layers, "/data/big.bin");
    let mut cluster = start_cluster().await?;
    let cooldown = Duration::from_millis(500);
    let redis = connect_redis(&cluster, |c| {
        c.op_timeout = Duration::from_millis(300);
        c.breaker_cooldown = cooldown;
    })
    .await?;
    // No read-ahead and no prefetch on open: each read below fetches only its own span,
    // so every one of them asks Redis first.
    let plugin = Plugin::start_with(Options {
        redis: Some(redis.clone()),
        store: StoreConfig {
            readahead_runs: 0,
            open_prefetch_bytes: 0,
            ..StoreConfig::default()
        },
        ..Options::default()
    })
    .await?;
    let mut identity = plugin.identity().await?;
    let mut node = plugin.node().await?;
    let target = plugin.target("down");
    node.node_publish_volume(publish("vol-down", &target, &[("image", &reference)]))
        .await?;
    let file = target.join("data/big.bin");
    // Offsets 5 MiB apart lie in different checkpoint spans (at most ~4 MiB each).
    let mut offsets = (0..expected.len() as u64 - 4096).step_by(5 << 20);
    let mut read_next = async || -> anyhow::Result<u64> {
        let at = offsets.next().expect("enough spans left to read");
        let got = read_at(&file, at, 4096).await?;
        assert!(
            got == expected[at as usize..at as usize + 4096],
            "wrong bytes at {at}"
        );
        Ok(at)
    };
    read_next().await?;
    assert_eq!(probe(&mut identity).await?, Some(true));

    cluster.stop_all();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !redis.is_degraded() {
        assert!(
            std::time::Instant::now() < deadline,
            "failing Redis calls never opened the breaker"
        );
        read_next().await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    read_next().await?;
    assert_eq!(
        probe(&mut identity).await?,
        Some(true),
        "Redis down costs speed, not readiness"
    );
    // And the plugin still serves: a new volume of the image (its index is on this node).
    let second = plugin.target("down-2");
    node.node_publish_volume(publish("vol-down-2", &second, &[("image", &reference)]))
        .await?;
    assert_eq!(
        read(second.join("data/small-at-end.txt")).await?,
        expected_file(&layers, "/data/small-at-end.txt")
    );

    // Redis comes back (empty): the breaker closes on a read and fetches are shared again.
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.restart_all()?;
        Ok::<_, anyhow::Error>(cluster)
    })
    .await??;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut last;
    loop {
        tokio::time::sleep(cooldown).await;
        last = read_next().await?;
        if !redis.is_degraded() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the breaker never closed after Redis came back"
        );
    }
    assert_eq!(probe(&mut identity).await?, Some(true));
    let at = read_next().await?;
    let indexes = plugin.dir.path().join("state/indexes");
    let index_file = std::fs::read_dir(&indexes)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "clipidx"))
        .unwrap();
    let index = clip_index::decode(&std::fs::read(index_file)?)?;
    wait_in_redis(&redis, &chunk_keys(&index, "/data/big.bin", at, 4096)?).await?;
    eprintln!("breaker closed on the read at {last}; the read at {at} was shared through Redis");

    for (v, t) in [("vol-down", &target), ("vol-down-2", &second)] {
        node.node_unpublish_volume(kubelet::unpublish(v, t)).await?;
        assert!(!is_mounted(t));
    }
    drop(cluster);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_direct_image_indexed_on_one_node_is_read_on_another_from_redis_alone()
-> anyhow::Result<()> {
    let registry = Registry::start()?;
    let proxy = Proxy::start(&registry.host())?;
    // A large gzip file over several checkpoint spans, a multi-member gzip layer, a plain
    // tar layer and a single-frame zstd layer.
    let mut layers = fixtures::big_layers(24 << 20);
    layers.extend(fixtures::format_layers());
    let image = build_image(&layers, "linux", "amd64")?;
    Pusher::new(&registry.host(), None).push_image("csi/shared-redis", "v1", &image)?;
    let reference = format!("{}/csi/shared-redis:v1", proxy.host());
    let files = [
        "/data/big.bin",
        "/data/small-at-end.txt",
        "/multi/f7",
        "/plain/f11",
        "/zstd/f20",
    ];
    let cluster = start_cluster().await?;
    // Two nodes: each its own state, disk cache and Redis connection; one Redis Cluster.
    let redis_a = connect_redis(&cluster, |_| {}).await?;
    let redis_b = connect_redis(&cluster, |_| {}).await?;
    let a = Plugin::start_with(Options {
        redis: Some(redis_a.clone()),
        ..Options::default()
    })
    .await?;
    let b = Plugin::start_with(Options {
        redis: Some(redis_b.clone()),
        ..Options::default()
    })
    .await?;
    let layer_blob = |l: &clip_e2e::proxy::Logged| {
        image
            .layers
            .iter()
            .any(|blob| l.path.ends_with(&format!("/blobs/{}", blob.digest)))
    };

    // Node A: the image is new to the cluster, so A indexes it and reads from the registry.
    let target_a = a.target("a");
    a.node()
        .await?
        .node_publish_volume(publish("vol-a", &target_a, &[("image", &reference)]))
        .await?;
    for f in files {
        let got = read(target_a.join(&f[1..])).await?;
        assert!(got == expected_file(&layers, f), "node A read {f} wrong");
    }
    let manifest: clip_index::Digest = image.manifest.digest.parse()?;
    let index_digest = redis_a
        .index_for_manifest(&manifest)
        .await?
        .expect("node A shared the index it built");
    let index = clip_index::decode(&redis_a.fetch_index(&index_digest).await?)?;
    let mut keys = Vec::new();
    for f in files {
        keys.extend(chunk_keys(&index, f, 0, u64::MAX)?);
    }
    wait_in_redis(&redis_a, &keys).await?;
    while proxy.in_flight() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a_log: Vec<_> = proxy.blob_reads().into_iter().filter(layer_blob).collect();
    assert_eq!(
        a_log.iter().filter(|l| l.range.is_none()).count(),
        image.layers.len(),
        "node A streamed each layer once to index it: {a_log:?}"
    );
    assert!(
        a_log.iter().any(|l| l.range.is_some()),
        "node A read chunks from the registry: {a_log:?}"
    );

    // Node B: same image, cold disk. The index and every chunk come from Redis.
    proxy.clear_log();
    let target_b = b.target("b");
    let started = std::time::Instant::now();
    b.node()
        .await?
        .node_publish_volume(publish("vol-b", &target_b, &[("image", &reference)]))
        .await?;
    let published = started.elapsed();
    for f in files {
        let got = read(target_b.join(&f[1..])).await?;
        assert!(got == expected_file(&layers, f), "node B read {f} wrong");
    }
    while proxy.in_flight() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b_log: Vec<_> = proxy.blob_reads().into_iter().filter(layer_blob).collect();
    assert!(
        b_log.is_empty(),
        "node B neither indexed (whole-layer streams) nor fetched chunks (range reads): {b_log:?}"
    );
    assert!(
        proxy.log().iter().any(|l| l.path.contains("/manifests/")),
        "node B did ask the registry what the tag points at"
    );
    let metrics = b.ctx.metrics();
    assert_eq!(
        metric(&metrics, "clip_source_requests_total{"),
        Some(0),
        "{metrics}"
    );
    assert!(
        metric(&metrics, "clip_tier_bytes_total{tier=\"redis\"").unwrap_or(0) > 24 << 20,
        "{metrics}"
    );
    eprintln!("node B published in {published:?} with the index from Redis");

    a.node()
        .await?
        .node_unpublish_volume(kubelet::unpublish("vol-a", &target_a))
        .await?;
    b.node()
        .await?
        .node_unpublish_volume(kubelet::unpublish("vol-b", &target_b))
        .await?;
    assert!(!is_mounted(&target_a) && !is_mounted(&target_b));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_start_up_profile_learnt_on_one_node_is_fetched_ahead_on_the_next() -> anyhow::Result<()>
{
    let registry = Registry::start()?;
    let files: Vec<Vec<u8>> = (0..8)
        .map(|i| clip_e2e::Rng(60 + i).bytes(3 << 20))
        .collect();
    let layers = vec![Layer::gzip(
        files
            .iter()
            .enumerate()
            .map(|(i, d)| Entry::file(&format!("f{i}"), d.clone()))
            .collect(),
    )];
    let image = build_image(&layers, "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("csi/profile", "v1", &image)?;
    let cluster = start_cluster().await?;
    let redis_a = connect_redis(&cluster, |_| {}).await?;
    let redis_b = connect_redis(&cluster, |_| {}).await?;
    // No read-ahead of its own on either node: what is fetched ahead is the profile's doing.
    let quiet = StoreConfig {
        readahead_runs: 0,
        preload_chunks: 0,
        open_prefetch_bytes: 0,
        ..StoreConfig::default()
    };
    let a = Plugin::start_with(Options {
        redis: Some(redis_a.clone()),
        store: quiet.clone(),
        ..Options::default()
    })
    .await?;
    // 2 MiB from 1 MiB into a file: several chunks, in one span or two.
    const READ: usize = 2 << 20;
    let head = |target: &Path, i: usize| {
        let path = target.join(format!("f{i}"));
        let want = files[i][1 << 20..(1 << 20) + READ].to_vec();
        async move {
            let got = read_at(&path, 1 << 20, READ).await?;
            anyhow::ensure!(got == want, "f{i}");
            Ok::<(), anyhow::Error>(())
        }
    };

    // Node A: a pod starts, reads a little of two files, and goes.
    let target_a = a.target("a");
    let mut node_a = a.node().await?;
    node_a
        .node_publish_volume(publish("vol-a", &target_a, &[("image", &reference)]))
        .await?;
    head(&target_a, 6).await?;
    head(&target_a, 1).await?;
    node_a
        .node_unpublish_volume(kubelet::unpublish("vol-a", &target_a))
        .await?;
    let manifest: clip_index::Digest = image.manifest.digest.parse()?;
    let kept = a.dir.path().join("state/profiles").join(manifest.hex());
    // Written and published in the background once the volume is gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !kept.is_file() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "node A never kept the profile"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        std::fs::read_to_string(&kept)?.lines().count() >= 3,
        "the profile names the chunks node A read"
    );
    while redis_a.fetch_profile(&manifest, 1 << 20).await?.is_none() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "node A never published the profile"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Node A left the chunks it read in Redis too (in the background).
    let index_digest = redis_a
        .index_for_manifest(&manifest)
        .await?
        .expect("node A shared the index it built");
    let index = clip_index::decode(&redis_a.fetch_index(&index_digest).await?)?;
    let mut keys = chunk_keys(&index, "/f6", 1 << 20, READ as u64)?;
    keys.extend(chunk_keys(&index, "/f1", 1 << 20, READ as u64)?);
    wait_in_redis(&redis_a, &keys).await?;

    // Node B, cold: publishing alone brings the profile's chunks to its disk (from Redis,
    // where node A left them); the same start-up then finds them there.
    let b = Plugin::start_with(Options {
        redis: Some(redis_b.clone()),
        store: quiet,
        ..Options::default()
    })
    .await?;
    let target_b = b.target("b");
    b.node()
        .await?
        .node_publish_volume(publish("vol-b", &target_b, &[("image", &reference)]))
        .await?;
    let from_redis = |m: &str| metric(m, "clip_tier_bytes_total{tier=\"redis\"").unwrap_or(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while from_redis(&b.ctx.metrics()) == 0 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "node B fetched nothing ahead: {}",
            b.ctx.metrics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Until the profile's fetches are over: the counter holds still.
    let mut before = from_redis(&b.ctx.metrics());
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = from_redis(&b.ctx.metrics());
        if now == before {
            break;
        }
        before = now;
    }
    // The volume's mount looked up the names node A's pod looked up (f6, f1) as soon as
    // it was up: the pod's own opens then ask the filesystem for no name.
    let fs = |m: &str, op: &str| metric(m, &format!("clip_fs_requests_total{{op=\"{op}\""));
    while fs(&b.ctx.metrics(), "prefill_lookup") != Some(2) {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "node B's mount never looked up the profile's names: {}",
            b.ctx.metrics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lookups = fs(&b.ctx.metrics(), "lookup");
    head(&target_b, 6).await?;
    head(&target_b, 1).await?;
    let metrics = b.ctx.metrics();
    assert_eq!(fs(&metrics, "lookup"), lookups, "{metrics}");
    assert_eq!(
        from_redis(&metrics),
        before,
        "the start-up's reads were served on the node: {metrics}"
    );
    assert_eq!(
        metric(&metrics, "clip_source_requests_total{"),
        Some(0),
        "{metrics}"
    );
    Ok(())
}
