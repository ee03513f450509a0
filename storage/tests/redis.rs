//! The Redis Cluster tier against a real 6-process cluster and a real registry.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use std::sync::Arc;
use std::time::{Duration, Instant};

use clip_e2e::image::{Entry, Layer, Pusher, build_image};
use clip_e2e::proxy::Proxy;
use clip_e2e::redis::{PlainRedis, RedisCluster};
use clip_e2e::registry::Registry;
use clip_e2e::{Rng, text_bytes};
use clip_index::{Content, ImageIndex, IndexOptions};
use clip_storage::cache::ChunkCache;
use clip_storage::cache::disk::DiskCache;
use clip_storage::cache::redis::{RedisCache, RedisConfig};
use clip_storage::{ChunkStore, RegistryBlobs, RegistryClient, RegistryConfig, StoreConfig};

/// The tests of this file each start a 6-process cluster and a registry: run them one at a
/// time, so timing-sensitive assertions (single-flight across nodes) do not depend on how
/// many clusters share the two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct World {
    _registry: Registry,
    proxy: Proxy,
    cluster: RedisCluster,
    client: RegistryClient,
    index: Arc<ImageIndex>,
    files: Vec<(String, Vec<u8>)>,
}

async fn world() -> anyhow::Result<World> {
    let registry = Registry::start()?;
    let proxy = Proxy::start(&registry.host())?;
    let cluster = RedisCluster::start()?;
    let mut entries = Vec::new();
    let mut files = Vec::new();
    for i in 0..6u64 {
        let data = if i % 2 == 0 {
            text_bytes(3 << 20, i)
        } else {
            Rng(i).bytes(2 << 20)
        };
        let path = format!("lib/f{i}.so");
        entries.push(Entry::file(&path, data.clone()));
        files.push((format!("/{path}"), data));
    }
    for i in 0..50u64 {
        let data = text_bytes(2000 + i as usize * 37, 100 + i);
        let path = format!("py/m{i}.py");
        entries.push(Entry::file(&path, data.clone()));
        files.push((format!("/{path}"), data));
    }
    let image = build_image(&[Layer::gzip(entries)], "linux", "amd64")?;
    Pusher::new(&registry.host(), None).push_image("redis/app", "v1", &image)?;
    let client = RegistryClient::new(RegistryConfig::default());
    let resolved = client
        .resolve(&format!("{}/redis/app:v1", proxy.host()), None)
        .await?;
    let index = clip_storage::build_index(
        &client,
        &resolved,
        IndexOptions::default(),
        2,
        Arc::default(),
    )
    .await?;
    Ok(World {
        _registry: registry,
        proxy,
        cluster,
        client,
        index: Arc::new(index),
        files,
    })
}

fn redis_config(seeds: Vec<String>) -> RedisConfig {
    RedisConfig {
        seeds,
        op_timeout: Duration::from_millis(800),
        breaker_cooldown: Duration::from_millis(1500),
        ..RedisConfig::default()
    }
}

struct Node {
    store: Arc<ChunkStore<RegistryBlobs>>,
    redis: Arc<RedisCache>,
    _disk: Option<tempfile::TempDir>,
}

/// An independent "node": its own registry client, Redis connection, caches.
async fn node(w: &World, with_disk: bool, memory_bytes: u64) -> anyhow::Result<Node> {
    let redis = Arc::new(RedisCache::connect(redis_config(w.cluster.seeds())).await?);
    node_with(w, with_disk, memory_bytes, redis).await
}

async fn node_with(
    w: &World,
    with_disk: bool,
    memory_bytes: u64,
    redis: Arc<RedisCache>,
) -> anyhow::Result<Node> {
    let client = RegistryClient::new(RegistryConfig::default());
    let source = client.repository(&w.index.source.repository, &w.index.source.manifest_digest)?;
    let mut tiers: Vec<Arc<dyn ChunkCache>> = Vec::new();
    let mut disk_dir = None;
    if with_disk {
        let d = tempfile::tempdir()?;
        tiers.push(Arc::new(DiskCache::open(d.path(), 1 << 30)?));
        disk_dir = Some(d);
    }
    tiers.push(redis.clone());
    let store = ChunkStore::new(
        w.index.clone(),
        Arc::new(source),
        tiers,
        Some(redis.clone()),
        StoreConfig {
            memory_bytes,
            readahead_runs: 0,
            ..StoreConfig::default()
        },
    );
    let _ = &w.client;
    Ok(Node {
        store,
        redis,
        _disk: disk_dir,
    })
}

/// Reads a whole file through a store.
async fn read_file(store: &Arc<ChunkStore<RegistryBlobs>>, path: &str) -> anyhow::Result<Vec<u8>> {
    let index = store.index();
    let node = index.node(index.resolve(path.as_bytes(), false)?).unwrap();
    let Content::File { layer, offset } = node.content else {
        return Ok(Vec::new());
    };
    Ok(store
        .read(layer as usize, offset, node.size)
        .await?
        .to_vec())
}

async fn read_all(w: &World, store: &Arc<ChunkStore<RegistryBlobs>>) -> anyhow::Result<()> {
    for (path, data) in &w.files {
        let got = read_file(store, path).await?;
        assert!(got == *data, "{path}: wrong bytes");
    }
    Ok(())
}

async fn wait_for_writes(n: &Node, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let writes = n
            .redis
            .counters()
            .iter()
            .find(|(k, _)| *k == "write")
            .map_or(0, |c| c.1);
        if writes >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn counter(n: &Node, name: &str) -> u64 {
    n.redis
        .counters()
        .iter()
        .find(|(k, _)| *k == name)
        .map_or(0, |c| c.1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_node_reads_everything_from_redis_with_the_registry_blocked() -> anyhow::Result<()>
{
    let w = world().await?;
    let a = node(&w, true, 32 << 20).await?;
    read_all(&w, &a.store).await?;
    let chunks = w.index.layers[0].chunks.len() as u64;
    wait_for_writes(&a, chunks).await;

    w.proxy.set_refuse(true);
    w.proxy.clear_log();
    let b = node(&w, true, 32 << 20).await?;
    read_all(&w, &b.store).await?;
    assert!(
        w.proxy.log().is_empty(),
        "node B went to the registry: {:?}",
        w.proxy.log()
    );
    let s = b.store.snapshot();
    let redis = s.tiers.iter().find(|t| t.tier == "redis").unwrap();
    assert!(redis.chunks > 0, "{s:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_nodes_starting_together_fetch_each_span_from_the_registry_once() -> anyhow::Result<()>
{
    let w = world().await?;
    let mut nodes = Vec::new();
    for _ in 0..8 {
        // Generous bounds: eight nodes and a cluster share two cores here.
        let redis = Arc::new(
            RedisCache::connect(RedisConfig {
                op_timeout: Duration::from_secs(5),
                lease_wait: Duration::from_secs(20),
                lease: Duration::from_secs(30),
                ..redis_config(w.cluster.seeds())
            })
            .await?,
        );
        nodes.push(node_with(&w, true, 32 << 20, redis).await?);
    }
    w.proxy.clear_log();
    let reads = nodes.iter().map(|n| read_all(&w, &n.store));
    futures::future::try_join_all(reads).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reads = w.proxy.blob_reads();
    let mut ranges: Vec<_> = reads.iter().filter_map(|l| l.range.clone()).collect();
    let total = ranges.len();
    ranges.sort();
    ranges.dedup();
    assert_eq!(
        ranges.len(),
        total,
        "a span was fetched by two nodes: {reads:?}"
    );
    let spans = w.index.layers[0].checkpoints.len() + 1;
    assert!(total <= spans, "{total} registry reads for {spans} spans");
    let waits: u64 = nodes.iter().map(|n| counter(n, "lease_wait_hit")).sum();
    assert!(waits > 0, "nodes waited for each other's fetches");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_master_never_fails_a_read() -> anyhow::Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut w = world().await?;
    // No disk and no memory tier: every read goes to Redis (or past it).
    let warm = node(&w, false, 0).await?;
    read_all(&w, &warm.store).await?;
    wait_for_writes(&warm, w.index.layers[0].chunks.len() as u64).await;
    let reader = node(&w, false, 0).await?;
    let masters = w.cluster.masters()?;
    let started = Instant::now();
    let mut killed = false;
    let mut rounds = 0;
    while started.elapsed() < Duration::from_secs(8) || rounds < 3 {
        read_all(&w, &reader.store).await?;
        rounds += 1;
        if !killed && started.elapsed() > Duration::from_millis(300) {
            w.cluster.kill(masters[0]);
            killed = true;
        }
    }
    w.cluster.wait_healthy()?;
    let hits_before = counter(&reader, "hit");
    for _ in 0..3 {
        read_all(&w, &reader.store).await?;
    }
    assert!(
        counter(&reader, "hit") > hits_before,
        "reads came back to redis after failover"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_whole_cluster_down_reads_use_the_registry_then_return_to_redis()
-> anyhow::Result<()> {
    let mut w = world().await?;
    let n = node(&w, false, 0).await?;
    read_all(&w, &n.store).await?;
    w.cluster.stop_all();
    let t = Instant::now();
    read_all(&w, &n.store).await?;
    read_all(&w, &n.store).await?;
    assert!(
        counter(&n, "breaker_skip") > 0,
        "the breaker opened and skipped the dead cluster"
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "fallback is bounded: {:?}",
        t.elapsed()
    );
    w.cluster.restart_all()?;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let before = counter(&n, "hit");
        read_all(&w, &n.store).await?;
        if counter(&n, "hit") > before {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "reads never came back to redis");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_chunk_in_redis_is_deleted_and_refetched() -> anyhow::Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let w = world().await?;
    let a = node(&w, false, 0).await?;
    read_all(&w, &a.store).await?;
    wait_for_writes(&a, w.index.layers[0].chunks.len() as u64).await;
    let digest = w.index.layers[0].chunks[1].digest;
    let key = format!("clip:c:{}", digest.hex());
    let out = w.cluster.cli(&["SETRANGE", &key, "100", "XYZ"])?;
    assert!(out.trim().parse::<u64>().is_ok(), "{out}");
    w.proxy.clear_log();
    let b = node(&w, false, 0).await?;
    read_all(&w, &b.store).await?;
    assert!(counter(&b, "verify_failure") >= 1);
    assert!(
        !w.proxy.blob_reads().is_empty(),
        "the damaged chunk was refetched"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn indexes_are_published_and_fetched_by_digest() -> anyhow::Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let w = world().await?;
    let redis = RedisCache::connect(redis_config(w.cluster.seeds())).await?;
    let encoded = clip_index::encode(&w.index)?;
    let manifest = w.index.source.manifest_digest;
    let digest = redis.publish_index(&encoded, Some(&manifest)).await?;
    assert_eq!(digest, clip_index::index_digest(&encoded));
    assert_eq!(redis.index_for_manifest(&manifest).await?, Some(digest));
    let fetched = redis.fetch_index(&digest).await?;
    assert_eq!(clip_index::decode(&fetched)?, *w.index);
    let ttl = w
        .cluster
        .cli(&["TTL", &format!("clip:i:{}", digest.hex())])?;
    assert_eq!(ttl.trim(), "-1", "indexes never expire");
    let missing = redis.fetch_index(&clip_index::Digest::of(b"nothing")).await;
    assert!(missing.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_redis_settings_fail_at_start_with_a_clear_reason() -> anyhow::Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let closed = clip_e2e::free_port()?;
    let e = RedisCache::connect(RedisConfig {
        connect_timeout: Duration::from_millis(500),
        ..redis_config(vec![format!("127.0.0.1:{closed}")])
    })
    .await
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(e.contains("reachable"), "{e}");

    let secured = RedisCluster::start_with_password("sesame")?;
    let e = RedisCache::connect(RedisConfig {
        password: Some("wrong".into()),
        ..redis_config(secured.seeds())
    })
    .await
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(e.contains("password"), "{e}");
    assert!(
        RedisCache::connect(RedisConfig {
            password: Some("sesame".into()),
            ..redis_config(secured.seeds())
        })
        .await
        .is_ok()
    );

    let plain = PlainRedis::start()?;
    let e = RedisCache::connect(redis_config(vec![plain.addr()]))
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("Redis Cluster"), "{e}");
    Ok(())
}
