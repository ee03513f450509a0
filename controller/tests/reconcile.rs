//! Reconcile scenarios against a mocked API server (tower-test), with the indexing path run
//! for real against a registry and a Redis Cluster started by the test.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clip_api::{ClipImage, ClipImageSpec, ClipImageStatus, Phase};
use clip_controller::reconcile::FINALIZER;
use clip_controller::{Context, error_policy, reconcile};
use clip_e2e::fixtures;
use clip_e2e::image::{Pusher, build_image};
use clip_e2e::kube_api::FakeApi;
use clip_e2e::proxy::Proxy;
use clip_e2e::redis::RedisCluster;
use clip_e2e::registry::Registry;
use clip_index::Digest;
use clip_storage::RegistryConfig;
use clip_storage::cache::redis::{Lease, RedisCache, RedisConfig};
use clip_storage::cache::{ChunkCache, ChunkKey};

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
    /// Reconciles run through [`drive`] and [`reconcile_until`] (the metrics test counts the
    /// rest itself).
    driven: AtomicU64,
}

async fn world() -> anyhow::Result<World> {
    world_with(2).await
}

/// A world whose controller runs at most `max_builds` index builds at once.
async fn world_with(max_builds: usize) -> anyhow::Result<World> {
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
        max_builds,
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
        driven: AtomicU64::new(0),
    })
}

fn create(w: &World, name: &str, image: &str, pull_secrets: Vec<String>) {
    create_spec(
        w,
        name,
        ClipImageSpec {
            image: image.into(),
            pull_secrets,
            platform: None,
            warm: false,
        },
    );
}

fn create_spec(w: &World, name: &str, spec: ClipImageSpec) {
    let mut ci = ClipImage::new(name, spec);
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
        w.driven.fetch_add(1, Ordering::SeqCst);
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
            keeper_socket: None,
            idle_indexes: clip_driver::csi::idle::IdleLimits::default(),
        },
        Some(w.redis.clone()),
        Some(Arc::new(OneImage(current(&w, "app")))),
        tokio::runtime::Handle::current(),
    )?;
    let target = dir.path().join("target");
    node.publish(clip_driver::csi::kubelet::ephemeral_volume(
        "v",
        &target,
        "team",
        "pod",
        &[("clipImage", "app")],
    ))
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

/// Waits until `done` holds, failing after [`PATIENCE`] with `what`.
async fn eventually(
    what: &str,
    mut done: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + PATIENCE;
    while !done().await? {
        if Instant::now() > deadline {
            anyhow::bail!("{what}: not within {PATIENCE:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Reconciles until the status shows one of `phases`.
async fn reconcile_until(w: &World, name: &str, phases: &[Phase]) -> anyhow::Result<()> {
    eventually(&format!("{name} reaching {phases:?}"), async || {
        w.driven.fetch_add(1, Ordering::SeqCst);
        reconcile(Arc::new(current(w, name)), w.ctx.clone()).await?;
        Ok(current(w, name)
            .status
            .and_then(|s| s.phase)
            .is_some_and(|p| phases.contains(&p)))
    })
    .await
}

fn spec(image: String, warm: bool) -> ClipImageSpec {
    ClipImageSpec {
        image,
        pull_secrets: vec![],
        platform: None,
        warm,
    }
}

/// The index a Ready status names, read back from Redis.
async fn published_index(
    w: &World,
    st: &ClipImageStatus,
) -> anyhow::Result<clip_index::ImageIndex> {
    let digest: Digest = st.index_digest.as_deref().unwrap_or_default().parse()?;
    Ok(clip_index::decode(&w.redis.fetch_index(&digest).await?)?)
}

/// The cache key of every chunk of every layer of `index`.
fn chunk_keys(index: &clip_index::ImageIndex) -> Vec<ChunkKey> {
    let mut keys = Vec::new();
    for layer in &index.layers {
        for (c, chunk) in layer.chunks.iter().enumerate() {
            let range = layer.chunk_range(c as u32);
            keys.push(ChunkKey {
                digest: chunk.digest,
                len: (range.end - range.start) as u32,
            });
        }
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warming_puts_every_chunk_of_the_image_in_redis_and_not_warming_puts_none()
-> anyhow::Result<()> {
    let w = world().await?;
    let pusher = Pusher::new(&w._registry.host(), None);
    // The two images share no content, so they share no chunk.
    let cold = build_image(&fixtures::big_layers(8 << 20), "linux", "amd64")?;
    pusher.push_image("ctl/cold", "v1", &cold)?;
    // Multi-member gzip, plain tar and zstd: every way chunks are fetched from a layer.
    let hot = build_image(&fixtures::format_layers(), "linux", "amd64")?;
    pusher.push_image("ctl/hot", "v1", &hot)?;

    create_spec(&w, "cold", spec(format!("{}/ctl/cold:v1", w.host), false));
    let st = drive(&w, "cold").await?.status.unwrap();
    assert_eq!(st.phase, Some(Phase::Ready));
    let keys = chunk_keys(&published_index(&w, &st).await?);
    assert!(keys.len() >= 8, "8 MiB in chunks of 1 MiB: {}", keys.len());
    for k in &keys {
        assert!(
            !w.redis.contains(k).await,
            "chunk {} of an image that was not warmed is in Redis",
            k.digest
        );
    }

    // A second ClipImage of the same image asks for warming: it reuses the index (no layer
    // is streamed again) and is Ready only once every chunk is in Redis.
    w.proxy.clear_log();
    create_spec(
        &w,
        "cold-warm",
        spec(format!("{}/ctl/cold:v1", w.host), true),
    );
    let st2 = drive(&w, "cold-warm").await?.status.unwrap();
    assert_eq!(st2.phase, Some(Phase::Ready));
    assert_eq!(st2.index_digest, st.index_digest, "the same index");
    for k in &keys {
        assert!(
            w.redis.get(k).await?.is_some(),
            "chunk {} is not in Redis although a ClipImage of it asked for warming",
            k.digest
        );
    }
    eventually("the proxy has logged every request", async || {
        Ok(w.proxy.in_flight() == 0)
    })
    .await?;
    let streams = w
        .proxy
        .blob_reads()
        .iter()
        .filter(|l| l.range.is_none())
        .count();
    assert_eq!(
        streams,
        0,
        "the image was indexed again: {:?}",
        w.proxy.log()
    );

    // "Another node" holds the fetch lease of the first layer's first span: warming waits
    // for it (RedisConfig::lease_wait) before fetching that span itself, so warming lasts
    // through many reconciles.
    let lease = format!("{}-0", hot.layers[0].digest.trim_start_matches("sha256:"));
    assert!(matches!(
        w.redis.try_lease(&lease).await,
        Lease::Acquired(_)
    ));
    create_spec(&w, "hot", spec(format!("{}/ctl/hot:v1", w.host), true));
    let st = drive(&w, "hot").await?.status.unwrap();
    assert_eq!(st.phase, Some(Phase::Ready));
    let index = published_index(&w, &st).await?;
    assert_eq!(index.layers.len(), 3);
    let keys = chunk_keys(&index);
    for layer in &index.layers {
        assert!(!layer.chunks.is_empty(), "{layer:?}");
    }
    // Ready means warmed: every chunk is there already, and `get` checks its digest and length.
    for k in &keys {
        assert!(
            w.redis.get(k).await?.is_some(),
            "chunk {} of the warmed image is not in Redis",
            k.digest
        );
    }
    assert_eq!(w.ctx.running_builds(), 0, "the finished build was let go");
    Ok(())
}

/// How long the proxy holds the old image's layer request: far longer than a reconcile that
/// changes the image takes, even on a loaded machine.
const HOLD: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changing_the_image_while_indexing_cancels_the_old_build_and_indexes_the_new_one()
-> anyhow::Result<()> {
    let w = world().await?;
    let pusher = Pusher::new(&w._registry.host(), None);
    let old = build_image(&fixtures::big_layers(24 << 20), "linux", "amd64")?;
    pusher.push_image("ctl/old", "v1", &old)?;
    let new = build_image(
        &fixtures::platform_layers("the new image"),
        "linux",
        "amd64",
    )?;
    pusher.push_image("ctl/new", "v1", &new)?;
    // The old image is read through a proxy of its own, which will hold its layer request.
    let slow = Proxy::start(&w._registry.host())?;

    // Every build slot is taken: the old image resolves, and its build waits for a slot.
    let slots = w.ctx.builds.clone().acquire_many_owned(2).await?;
    create(&w, "app", &format!("{}/ctl/old:v1", slow.host()), vec![]);
    reconcile_until(&w, "app", &[Phase::Indexing]).await?;
    eventually("the old image's resolve requests end", async || {
        Ok(slow.in_flight() == 0)
    })
    .await?;
    slow.set_delay(HOLD);
    drop(slots);
    eventually("the old build asks for its layer", async || {
        Ok(slow.in_flight() > 0)
    })
    .await?;

    // The image changes (a new generation) while the old build waits for its layer.
    let mut ci = current(&w, "app");
    ci.spec.image = format!("{}/ctl/new:v1", w.host);
    ci.metadata.generation = Some(2);
    w.api.put_object("team", "app", serde_json::to_value(&ci)?);
    let ci = drive(&w, "app").await?;
    let st = ci.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Ready), "{st:?}");
    assert_eq!(
        st.resolved_digest.as_deref(),
        Some(new.manifest.digest.as_str())
    );
    assert_eq!(st.observed_generation, Some(2));
    assert_eq!(ci.ready_condition().unwrap().observed_generation, Some(2));
    let new_manifest: Digest = new.manifest.digest.parse()?;
    assert_eq!(
        w.redis
            .index_for_manifest(&new_manifest)
            .await?
            .map(|d| d.to_string()),
        st.index_digest
    );
    assert_eq!(w.ctx.running_builds(), 0);

    // Once its hold is over the proxy forwards the old request, to a client that hung up.
    eventually("the proxy is done with the old layer request", async || {
        Ok(slow.in_flight() == 0)
    })
    .await?;
    let layer = &old.layers[0];
    let relayed: Vec<_> = slow
        .blob_reads()
        .into_iter()
        .filter(|l| l.path.ends_with(&layer.digest))
        .collect();
    assert!(
        relayed
            .iter()
            .all(|l| l.body_bytes < layer.data.len() as u64),
        "the old layer went through in full: {relayed:?}"
    );
    let old_manifest: Digest = old.manifest.digest.parse()?;
    assert_eq!(
        w.redis.index_for_manifest(&old_manifest).await?,
        None,
        "the cancelled build published an index"
    );
    assert_eq!(
        w.ctx.metrics.builds.load(Ordering::Relaxed),
        1,
        "only the new image's build finished"
    );
    assert!(
        !w.api
            .statuses()
            .iter()
            .any(|s| s["phase"] == "Ready" && s["resolvedDigest"] == old.manifest.digest),
        "the old image was reported Ready"
    );
    Ok(())
}

/// Watches one proxy per image until `stop`: when a proxy first has a request in flight (its
/// image's build has started streaming), checks that every image whose build started before
/// has published its index, so its build is over. Returns the images in the order their
/// builds started.
async fn watch_builds(
    proxies: Arc<Vec<Proxy>>,
    redis: Arc<RedisCache>,
    manifests: Vec<Digest>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<usize>> {
    let mut started = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        for (i, p) in proxies.iter().enumerate() {
            if p.in_flight() == 0 || started.contains(&i) {
                continue;
            }
            for &before in &started {
                anyhow::ensure!(
                    redis
                        .index_for_manifest(&manifests[before])
                        .await?
                        .is_some(),
                    "image {i}'s build started while image {before}'s was still running"
                );
            }
            started.push(i);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(started)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_one_build_slot_images_are_indexed_one_at_a_time_and_all_become_ready()
-> anyhow::Result<()> {
    let w = world_with(1).await?;
    let pusher = Pusher::new(&w._registry.host(), None);
    // One proxy per image: a request in flight on a proxy is that image's build at work.
    let proxies = Arc::new(
        (0..3)
            .map(|_| Proxy::start(&w._registry.host()))
            .collect::<anyhow::Result<Vec<_>>>()?,
    );
    let mut manifests = Vec::new();
    for i in 0..3 {
        let image = build_image(
            &fixtures::platform_layers(&format!("image {i}")),
            "linux",
            "amd64",
        )?;
        pusher.push_image(&format!("ctl/q{i}"), "v1", &image)?;
        manifests.push(image.manifest.digest.parse::<Digest>()?);
    }

    // The only slot is taken while all three resolve and queue their builds ...
    let slot = w.ctx.builds.clone().acquire_owned().await?;
    for (i, p) in proxies.iter().enumerate() {
        let name = format!("q{i}");
        create(&w, &name, &format!("{}/ctl/q{i}:v1", p.host()), vec![]);
        // (Ready too, so that a controller that does not wait for the slot fails below.)
        reconcile_until(&w, &name, &[Phase::Indexing, Phase::Ready]).await?;
    }
    eventually("the resolve requests end", async || {
        Ok(proxies.iter().all(|p| p.in_flight() == 0))
    })
    .await?;
    // ... then each build's layer request lasts long enough for an overlap to be seen.
    for p in proxies.iter() {
        p.set_delay(Duration::from_millis(500));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch_builds(
        proxies.clone(),
        w.redis.clone(),
        manifests.clone(),
        stop.clone(),
    ));
    drop(slot);
    // No reconcile runs meanwhile: the builds are background jobs, and only they use the proxies.
    eventually("all three builds publish their index", async || {
        for m in &manifests {
            if w.redis.index_for_manifest(m).await?.is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;
    stop.store(true, Ordering::SeqCst);
    let started = watcher.await??;
    assert_eq!(
        started.len(),
        3,
        "every build was seen at work: {started:?}"
    );

    for p in proxies.iter() {
        p.set_delay(Duration::ZERO);
    }
    for (i, m) in manifests.iter().enumerate() {
        let st = drive(&w, &format!("q{i}")).await?.status.unwrap();
        assert_eq!(st.phase, Some(Phase::Ready));
        assert_eq!(st.resolved_digest, Some(m.to_string()));
    }
    assert_eq!(w.ctx.metrics.builds.load(Ordering::Relaxed), 3);
    assert_eq!(w.ctx.running_builds(), 0);
    Ok(())
}

/// Prometheus text as `name{labels}` to value; comments left out.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_reconciles_failures_by_reason_and_index_builds() -> anyhow::Result<()> {
    let started = Instant::now();
    let w = world().await?;
    let image = build_image(&fixtures::big_layers(8 << 20), "linux", "amd64")?;
    Pusher::new(&w._registry.host(), None).push_image("ctl/counted", "v1", &image)?;
    let reference = format!("{}/ctl/counted:v1", w.host);
    // Every registry request waits this long, so the build takes at least as long.
    let delay = Duration::from_millis(300);
    w.proxy.set_delay(delay);
    create(&w, "app", &reference, vec![]);
    assert_eq!(
        drive(&w, "app").await?.status.and_then(|s| s.phase),
        Some(Phase::Ready)
    );
    w.proxy.set_delay(Duration::ZERO);

    create(&w, "ghost", &format!("{}/no/such:image", w.host), vec![]);
    assert_eq!(
        drive(&w, "ghost").await?.status.and_then(|s| s.phase),
        Some(Phase::Failed)
    );

    // The registry stops answering: the reconcile fails, and the runtime's error policy
    // counts it (the first reconcile only adds the finalizer).
    w.proxy.set_refuse(true);
    create(&w, "down", &reference, vec![]);
    let mut failed = None;
    for _ in 0..3 {
        w.driven.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = reconcile(Arc::new(current(&w, "down")), w.ctx.clone()).await {
            failed = Some(e);
            break;
        }
    }
    let e = failed.expect("a registry that refuses every request fails the reconcile");
    error_policy(Arc::new(current(&w, "down")), &e, w.ctx.clone());
    w.proxy.set_refuse(false);

    let text = w.ctx.metrics.render();
    for (family, kind) in [
        ("clip_controller_reconciles_total", "counter"),
        ("clip_controller_failures_total", "counter"),
        ("clip_controller_index_build_seconds", "summary"),
        ("clip_controller_index_build_failures_total", "counter"),
        ("clip_controller_indexed_bytes_total", "counter"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} {kind}\n"))
                && text.contains(&format!("# HELP {family} ")),
            "no HELP and TYPE {kind} for {family}:\n{text}"
        );
    }
    let m = samples(&text);
    let get = |k: &str| {
        m.get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in:\n{text}"))
    };
    assert_eq!(
        get("clip_controller_reconciles_total"),
        w.driven.load(Ordering::SeqCst) as f64
    );
    assert_eq!(
        get(r#"clip_controller_failures_total{reason="ImageNotFound"}"#),
        1.0
    );
    assert_eq!(
        get(r#"clip_controller_failures_total{reason="registry_unavailable"}"#),
        1.0,
        "{e}"
    );
    assert_eq!(
        m.keys()
            .filter(|k| k.starts_with("clip_controller_failures_total"))
            .count(),
        2,
        "{text}"
    );
    assert_eq!(get("clip_controller_index_build_seconds_count"), 1.0);
    let secs = get("clip_controller_index_build_seconds_sum");
    assert!(
        secs >= delay.as_secs_f64() && secs < started.elapsed().as_secs_f64(),
        "build took {secs} s"
    );
    assert_eq!(get("clip_controller_index_build_failures_total"), 0.0);
    assert_eq!(
        get("clip_controller_indexed_bytes_total"),
        image.layers[0].data.len() as f64
    );
    Ok(())
}
