//! Reconcile scenarios against a mocked API server (tower-test), with the indexing path run
//! for real against a registry and a Redis Cluster started by the test.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clip_api::{ClipImage, ClipImageSpec, Phase};
use clip_controller::reconcile::FINALIZER;
use clip_controller::{Context, reconcile};
use clip_e2e::fixtures;
use clip_e2e::image::{Pusher, build_image};
use clip_e2e::kube_api::FakeApi;
use clip_e2e::proxy::Proxy;
use clip_e2e::redis::RedisCluster;
use clip_e2e::registry::Registry;
use clip_storage::RegistryConfig;
use clip_storage::cache::redis::{RedisCache, RedisConfig};

/// How long a ClipImage may take to settle, or the proxy to finish with its connections: far
/// more than they take (seconds), so a loaded machine does not fail the tests.
const PATIENCE: Duration = Duration::from_secs(120);

struct World {
    _registry: Registry,
    proxy: Proxy,
    cluster: RedisCluster,
    redis: Arc<RedisCache>,
    api: FakeApi,
    ctx: Arc<Context>,
    host: String,
}

async fn world() -> anyhow::Result<World> {
    let registry = Registry::start()?;
    let proxy = Proxy::start(&registry.host())?;
    let cluster = RedisCluster::start()?;
    let redis = Arc::new(
        RedisCache::connect(RedisConfig {
            seeds: cluster.seeds(),
            // A reconcile fails on a Redis error, and a loaded machine can be slow to answer.
            connect_timeout: Duration::from_secs(10),
            op_timeout: Duration::from_secs(10),
            ..RedisConfig::default()
        })
        .await?,
    );
    let api = FakeApi::start();
    let mut ctx = Context::new(
        api.client.clone(),
        redis.clone(),
        RegistryConfig::default(),
        2,
        Duration::from_secs(600),
    );
    Arc::get_mut(&mut ctx).unwrap().progress_interval = Duration::from_millis(200);
    let host = proxy.host();
    Ok(World {
        host,
        _registry: registry,
        proxy,
        cluster,
        redis,
        api,
        ctx,
    })
}

fn create(w: &World, name: &str, image: &str, pull_secrets: Vec<String>) {
    let mut ci = ClipImage::new(
        name,
        ClipImageSpec {
            image: image.into(),
            pull_secrets,
            platform: None,
            warm: false,
        },
    );
    ci.metadata.namespace = Some("team".into());
    ci.metadata.generation = Some(1);
    ci.metadata.uid = Some(format!("uid-{name}"));
    w.api
        .put_object("team", name, serde_json::to_value(&ci).unwrap());
}

fn current(w: &World, name: &str) -> ClipImage {
    serde_json::from_value(w.api.object("team", name).unwrap()).unwrap()
}

/// Reconciles (as the runtime would on requeue) until the phase settles.
async fn drive(w: &World, name: &str) -> anyhow::Result<ClipImage> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let ci = current(w, name);
        reconcile(Arc::new(ci), w.ctx.clone()).await?;
        let ci = current(w, name);
        if matches!(
            ci.status.as_ref().and_then(|s| s.phase),
            Some(Phase::Ready | Phase::Failed)
        ) {
            return Ok(ci);
        }
        if Instant::now() > deadline {
            anyhow::bail!("{name} did not settle in {PATIENCE:?}: {:?}", ci.status);
        }
    }
}

fn phases(w: &World) -> Vec<String> {
    let mut out: Vec<String> = w
        .api
        .statuses()
        .iter()
        .filter_map(|s| s["phase"].as_str().map(String::from))
        .collect();
    out.dedup();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_clip_image_goes_resolving_indexing_ready_and_a_node_mounts_it() -> anyhow::Result<()>
{
    let w = world().await?;
    let layers = fixtures::big_layers(24 << 20);
    let image = build_image(&layers, "linux", "amd64")?;
    Pusher::new(&w._registry.host(), None).push_image("ctl/app", "v1", &image)?;
    let reference = format!("{}/ctl/app:v1", w.host);
    // A slow registry makes the Indexing phase long enough to be reported.
    w.proxy.set_delay(Duration::from_millis(300));
    create(&w, "app", &reference, vec![]);
    let ci = drive(&w, "app").await?;
    w.proxy.set_delay(Duration::ZERO);
    assert_eq!(
        current(&w, "app").metadata.finalizers,
        Some(vec![FINALIZER.to_owned()])
    );
    let st = ci.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Ready));
    assert_eq!(
        st.resolved_digest.as_deref(),
        Some(image.manifest.digest.as_str())
    );
    assert_eq!(st.layers, Some(1));
    assert_eq!(st.files, Some(2));
    assert_eq!(st.compressed_size, Some(image.layers[0].data.len() as u64));
    assert_eq!(st.uncompressed_size, Some(image.tars[0].len() as u64));
    assert_eq!(st.observed_generation, Some(1));
    assert!(st.last_indexed.is_some());
    let cond = ci.ready_condition().unwrap();
    assert_eq!(
        (cond.status.as_str(), cond.reason.as_str()),
        ("True", "Indexed")
    );
    let p = phases(&w);
    assert_eq!(p.first().map(String::as_str), Some("Resolving"), "{p:?}");
    assert!(p.contains(&"Indexing".to_owned()), "{p:?}");
    assert_eq!(p.last().map(String::as_str), Some("Ready"));
    let index_digest: clip_index::Digest = st.index_digest.unwrap().parse()?;
    assert!(w.redis.has_index(&index_digest).await?);
    assert!(w.api.events().iter().any(|e| e["reason"] == "Indexed"));

    // The node side mounts the index the controller published.
    let dir = tempfile::tempdir()?;
    let node = clip_driver::csi::node::NodeContext::new(
        clip_driver::csi::node::NodeConfig {
            node_id: "n".into(),
            max_volumes: 8,
            state_dir: dir.path().join("state"),
            cache_dir: dir.path().join("cache"),
            cache_bytes: 1 << 30,
            store: clip_storage::StoreConfig::default(),
            fuse_threads: 2,
            require_clip_images: true,
            reserve_on_start: false,
            registry: RegistryConfig::default(),
            platform: None,
            publish_wait: Duration::from_secs(5),
        },
        Some(w.redis.clone()),
        Some(Arc::new(OneImage(current(&w, "app")))),
        tokio::runtime::Handle::current(),
    )?;
    let target = dir.path().join("target");
    node.publish(clip_driver::csi::proto::NodePublishVolumeRequest {
        volume_id: "v".into(),
        target_path: target.to_string_lossy().into_owned(),
        volume_capability: Some(clip_driver::csi::proto::VolumeCapability {
            access_type: Some(
                clip_driver::csi::proto::volume_capability::AccessType::Mount(Default::default()),
            ),
            access_mode: None,
        }),
        readonly: true,
        volume_context: HashMap::from([
            ("clipImage".to_owned(), "app".to_owned()),
            (
                "csi.storage.k8s.io/pod.namespace".to_owned(),
                "team".to_owned(),
            ),
        ]),
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let t = target.clone();
    let got = tokio::task::spawn_blocking(move || std::fs::read(t.join("data/small-at-end.txt")))
        .await??;
    assert_eq!(got, b"the last file of the layer\n");
    node.shutdown();
    Ok(())
}

struct OneImage(ClipImage);

impl clip_driver::csi::lookup::ClipImageLookup for OneImage {
    fn get<'a>(
        &'a self,
        _ns: &'a str,
        _name: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<ClipImage>, String>> {
        Box::pin(futures::future::ready(Ok(Some(self.0.clone()))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_reference_and_a_missing_pull_secret_fail_with_an_event() -> anyhow::Result<()> {
    let w = world().await?;
    create(&w, "ghost", &format!("{}/no/such:image", w.host), vec![]);
    let ci = drive(&w, "ghost").await?;
    assert_eq!(
        ci.status.as_ref().and_then(|s| s.phase),
        Some(Phase::Failed)
    );
    let cond = ci.ready_condition().unwrap();
    assert_eq!(cond.reason, "ImageNotFound");
    assert!(cond.message.contains("no/such"), "{}", cond.message);
    assert!(
        w.api
            .events()
            .iter()
            .any(|e| e["reason"] == "ImageNotFound" && e["type"] == "Warning")
    );
    // Permanent: a second reconcile writes the same status and no new event.
    let events_before = w.api.events().len();
    reconcile(Arc::new(current(&w, "ghost")), w.ctx.clone()).await?;
    assert_eq!(w.api.events().len(), events_before);

    create(
        &w,
        "private",
        &format!("{}/x/y:z", w.host),
        vec!["regcred".into()],
    );
    let ci = drive(&w, "private").await?;
    let cond = ci.ready_condition().unwrap();
    assert_eq!(
        ci.status.as_ref().and_then(|s| s.phase),
        Some(Phase::Failed)
    );
    assert!(
        cond.message.contains("pull secret team/regcred not found"),
        "{}",
        cond.message
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_during_indexing_cancels_the_build_and_removes_the_finalizer() -> anyhow::Result<()>
{
    let w = world().await?;
    let image = build_image(&fixtures::big_layers(24 << 20), "linux", "amd64")?;
    Pusher::new(&w._registry.host(), None).push_image("ctl/slow", "v1", &image)?;
    w.proxy.set_delay(Duration::from_millis(400));
    create(&w, "slow", &format!("{}/ctl/slow:v1", w.host), vec![]);
    // Drive until Indexing.
    for _ in 0..50 {
        reconcile(Arc::new(current(&w, "slow")), w.ctx.clone()).await?;
        if current(&w, "slow").status.and_then(|s| s.phase) == Some(Phase::Indexing) {
            break;
        }
    }
    assert_eq!(
        current(&w, "slow").status.and_then(|s| s.phase),
        Some(Phase::Indexing)
    );
    assert_eq!(w.ctx.running_builds(), 1);
    // The API server marks it for deletion; the next reconcile cleans up.
    w.api.mark_deleted("team", "slow");
    reconcile(Arc::new(current(&w, "slow")), w.ctx.clone()).await?;
    assert_eq!(w.ctx.running_builds(), 0, "the build was cancelled");
    assert!(w.api.finalizer_removed());
    assert_eq!(current(&w, "slow").metadata.finalizers, Some(vec![]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_moved_tag_and_a_flushed_redis_are_reindexed_and_two_images_share_a_build()
-> anyhow::Result<()> {
    let w = world().await?;
    let pusher = Pusher::new(&w._registry.host(), None);
    let v1 = build_image(&fixtures::platform_layers("first"), "linux", "amd64")?;
    pusher.push_image("ctl/tag", "latest", &v1)?;
    let reference = format!("{}/ctl/tag:latest", w.host);
    w.proxy.clear_log();
    create(&w, "a", &reference, vec![]);
    create(&w, "b", &reference, vec![]);
    let (a, b) = tokio::join!(drive(&w, "a"), drive(&w, "b"));
    let (a, b) = (a?, b?);
    let sa = a.status.unwrap();
    assert_eq!(
        sa.index_digest,
        b.status.unwrap().index_digest,
        "one index for one digest"
    );
    // Both builds are over, so the controller has every response; the proxy logs a request
    // a moment later, once it has relayed the whole response.
    let deadline = Instant::now() + PATIENCE;
    while w.proxy.in_flight() > 0 {
        assert!(
            Instant::now() < deadline,
            "the proxy still relays {} responses",
            w.proxy.in_flight()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let streams = w
        .proxy
        .blob_reads()
        .iter()
        .filter(|l| l.range.is_none())
        .count();
    assert_eq!(
        streams, 1,
        "the layer was streamed once for both ClipImages"
    );

    // The tag moves: the next resync re-resolves and re-indexes.
    let v2 = build_image(&fixtures::platform_layers("second"), "linux", "amd64")?;
    pusher.push_image("ctl/tag", "latest", &v2)?;
    reconcile(Arc::new(current(&w, "a")), w.ctx.clone()).await?;
    let a2 = drive(&w, "a").await?.status.unwrap();
    assert_eq!(
        a2.resolved_digest.as_deref(),
        Some(v2.manifest.digest.as_str())
    );
    assert_ne!(a2.index_digest, sa.index_digest);

    // Redis flushed: the index is noticed missing on resync and rebuilt.
    w.cluster.cli(&["FLUSHALL"])?;
    for port in w.cluster.masters()? {
        let _ = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "FLUSHALL"])
            .output();
    }
    let d: clip_index::Digest = a2.index_digest.clone().unwrap().parse()?;
    assert!(!w.redis.has_index(&d).await?);
    reconcile(Arc::new(current(&w, "a")), w.ctx.clone()).await?;
    let a3 = drive(&w, "a").await?.status.unwrap();
    assert_eq!(a3.phase, Some(Phase::Ready));
    let d3: clip_index::Digest = a3.index_digest.unwrap().parse()?;
    assert!(w.redis.has_index(&d3).await?, "rebuilt and republished");
    Ok(())
}
