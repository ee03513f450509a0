//! The Redis Cluster tier against a real 6-process cluster and a real registry.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use std::sync::Arc;
use std::time::{Duration, Instant};

use clip_e2e::image::{Entry, Layer, Pusher, build_image};
use clip_e2e::proxy::Proxy;
use clip_e2e::redis::{ClusterOptions, PlainRedis, RedisCluster};
use clip_e2e::registry::Registry;
use clip_e2e::{Rng, text_bytes};
use clip_index::{Content, Digest, ImageIndex, IndexOptions};
use clip_storage::cache::disk::DiskCache;
use clip_storage::cache::redis::{Lease, REDIS_COMMANDS, RedisCache, RedisConfig};
use clip_storage::cache::{ChunkCache, ChunkKey};
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
    counter_of(&n.redis, name)
}

fn counter_of(redis: &RedisCache, name: &str) -> u64 {
    redis
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
    // The store's and the Redis client's logs are printed if this test fails.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("clip_storage=debug,redis=info")
        .try_init();
    let _serial = ONE_AT_A_TIME.lock().await;
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
        anyhow::ensure!(
            Instant::now() < deadline,
            "reads never came back to redis: {:?}",
            n.redis.counters()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        counter(&n, "reconnect") > 0,
        "a fresh connection was built from the seeds while the breaker was open"
    );
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

/// Where a file's bytes are in the image: (layer, uncompressed offset in the layer).
fn file_at(index: &ImageIndex, path: &str) -> anyhow::Result<(usize, u64)> {
    let node = index.node(index.resolve(path.as_bytes(), false)?).unwrap();
    let Content::File { layer, offset } = node.content else {
        anyhow::bail!("{path} is not a regular file");
    };
    Ok((layer as usize, offset))
}

/// Waits until the proxy has logged at least one blob read (a request is logged once its
/// response has gone through, which may be after the reader already has its chunk).
async fn wait_for_blob_reads(proxy: &Proxy) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.blob_reads().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.blob_reads().len()
}

/// `PTTL key` through the cluster: ms left, -1 without expiry, -2 when there is no such key.
fn pttl(cluster: &RedisCluster, key: &str) -> anyhow::Result<i64> {
    let out = cluster.cli(&["PTTL", key])?;
    out.trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("PTTL {key}: {out:?}"))
}

/// Like [`pttl`], after waiting (bounded) for the key to be written in the background.
async fn pttl_once_written(cluster: &RedisCluster, key: &str) -> anyhow::Result<i64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = pttl(cluster, key)?;
        if t != -2 || Instant::now() >= deadline {
            return Ok(t);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A chunk that is not part of any image.
fn loose_chunk(seed: u64) -> (ChunkKey, bytes::Bytes) {
    let data = Rng(seed).bytes(200 << 10);
    let key = ChunkKey {
        digest: Digest::of(&data),
        len: data.len() as u32,
    };
    (key, data.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_lease_holder_delays_a_read_by_at_most_the_lease() -> anyhow::Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let w = world().await?;
    // Waiters would wait up to 10 s for a live holder; a dead one's lease ends in 2 s.
    let lease = Duration::from_secs(2);
    let lease_wait = Duration::from_secs(10);
    let config = RedisConfig {
        lease,
        lease_wait,
        ..redis_config(w.cluster.seeds())
    };
    let reader = node_with(
        &w,
        false,
        0,
        Arc::new(RedisCache::connect(config.clone()).await?),
    )
    .await?;

    // The span that holds the start of a file in the middle of the layer.
    let (path, data) = &w.files[2];
    let (layer, offset) = file_at(&w.index, path)?;
    let len = 64 << 10;
    let chunk = w.index.layers[layer].chunks_covering(offset, len)?.start;
    let span = reader.store.span_run(layer, chunk)?;
    // The lease name the store uses for a span: layer digest and the span's first chunk.
    let name = format!("{}-{}", w.index.layers[layer].digest.hex(), span.start);
    {
        let holder = RedisCache::connect(config.clone()).await?;
        let got = holder.try_lease(&name).await;
        assert!(matches!(got, Lease::Acquired(_)), "{got:?}");
        // The holder dies here, lease taken and never released.
    }

    w.proxy.clear_log();
    let started = Instant::now();
    let got = reader.store.read(layer, offset, len).await?;
    let elapsed = started.elapsed();
    assert!(got == data[..len as usize], "{path}: wrong bytes");
    assert!(
        counter(&reader, "lease_wait") >= 1,
        "the reader found the span leased by the dead holder"
    );
    assert!(
        wait_for_blob_reads(&w.proxy).await > 0,
        "the reader fetched the span from the registry itself"
    );
    assert!(
        elapsed >= lease / 2,
        "the reader waited for the holder while its lease lived: {elapsed:?}"
    );
    assert!(
        elapsed < lease + Duration::from_secs(2),
        "a dead holder delayed the read by {elapsed:?}, more than the {lease:?} lease"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chunk_keys_carry_the_configured_ttl_and_index_keys_none() -> anyhow::Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let w = world().await?;
    let ttl = Duration::from_secs(120);
    let redis = Arc::new(
        RedisCache::connect(RedisConfig {
            ttl: Some(ttl),
            ..redis_config(w.cluster.seeds())
        })
        .await?,
    );
    let n = node_with(&w, false, 0, redis.clone()).await?;
    let (path, data) = &w.files[1];
    assert!(
        read_file(&n.store, path).await? == *data,
        "{path}: wrong bytes"
    );
    let (layer, offset) = file_at(&w.index, path)?;
    let chunks = w.index.layers[layer].chunks_covering(offset, data.len() as u64)?;
    assert!(!chunks.is_empty());
    for c in chunks.clone() {
        let key = format!(
            "clip:c:{}",
            w.index.layers[layer].chunks[c as usize].digest.hex()
        );
        let left = pttl_once_written(&w.cluster, &key).await?;
        assert!(
            left > 0 && left <= ttl.as_millis() as i64,
            "{key}: PTTL {left} ms, configured TTL {ttl:?}"
        );
    }

    // A TTL of none (`--redis-ttl 0`) keeps chunks until evicted by other means.
    let keep = Arc::new(
        RedisCache::connect(RedisConfig {
            ttl: None,
            key_prefix: "keep".into(),
            ..redis_config(w.cluster.seeds())
        })
        .await?,
    );
    let k = node_with(&w, false, 0, keep).await?;
    assert!(
        read_file(&k.store, path).await? == *data,
        "{path}: wrong bytes"
    );
    let c = chunks.start as usize;
    let key = format!("keep:c:{}", w.index.layers[layer].chunks[c].digest.hex());
    assert_eq!(pttl_once_written(&w.cluster, &key).await?, -1, "{key}");

    // Indexes must outlive any eviction: no TTL on the header, its parts, the manifest
    // pointer or the owner set.
    let encoded = clip_index::encode(&w.index)?;
    let manifest = w.index.source.manifest_digest;
    let digest = redis.publish_index(&encoded, Some(&manifest)).await?;
    redis.add_index_owner(&digest, "default/app").await?;
    for key in [
        format!("clip:i:{}", digest.hex()),
        format!("clip:i:{}:0", digest.hex()),
        format!("clip:m:{}", manifest.hex()),
        format!("clip:o:{}", digest.hex()),
    ] {
        assert_eq!(pttl(&w.cluster, &key)?, -1, "{key}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_reads_and_writes_and_a_wrong_password_fails_at_start() -> anyhow::Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    // The user may touch only clip's keys; the default user (the harness) has a password.
    let cluster = ClusterOptions::new()
        .password("harness-only")
        .user("clip on >clip-secret ~clip:* +@all")
        .start()?;
    let as_clip = |password: &str| RedisConfig {
        username: Some("clip".into()),
        password: Some(password.into()),
        ..redis_config(cluster.seeds())
    };

    let cache = RedisCache::connect(as_clip("clip-secret")).await?;
    for seed in 1..=12 {
        let (key, data) = loose_chunk(seed);
        cache.put(&key, data.clone()).await?;
        assert_eq!(cache.get(&key).await?, Some(data), "chunk {seed}");
    }
    assert_eq!(counter_of(&cache, "error"), 0, "{:?}", cache.counters());
    assert_eq!(counter_of(&cache, "hit"), 12, "{:?}", cache.counters());
    // Leases, released by a script, stay within the user's keys too.
    let Lease::Acquired(token) = cache.try_lease("span").await else {
        panic!("no lease: {:?}", cache.counters());
    };
    cache.release_lease("span", &token).await;
    assert!(matches!(cache.try_lease("span").await, Lease::Acquired(_)));

    for (what, config) in [
        ("a wrong password", as_clip("wrong")),
        ("no credentials", redis_config(cluster.seeds())),
    ] {
        let e = RedisCache::connect(config)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("password"), "{what}: {e}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_whose_acl_does_not_cover_clips_commands_fails_at_start() -> anyhow::Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    // The rules the error message and the chart name, exactly.
    let exact = format!("clip on >s ~clip:* -@all {REDIS_COMMANDS}");
    let cluster = ClusterOptions::new()
        .password("harness-only")
        .user("elsewhere on >s ~other:* +@all")
        .user("nowrites on >s ~clip:* +@all -set")
        .user("noexpiry on >s ~clip:* +@all -setex")
        .user("noscripts on >s ~clip:* +@all -@scripting")
        .user("nosets on >s ~clip:* +@all -sadd")
        .user("noremove on >s ~clip:* +@all -srem")
        .user(&exact)
        .start()?;
    let as_user = |user: &str| RedisConfig {
        username: Some(user.into()),
        password: Some("s".into()),
        ..redis_config(cluster.seeds())
    };
    for (user, command) in [
        ("elsewhere", "SET"),
        ("nowrites", "SET"),
        ("noexpiry", "SETEX"),
        ("noscripts", "EVALSHA/EVAL"),
    ] {
        let e = RedisCache::connect(as_user(user))
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains(command), "{user}: {e}");
        assert!(
            e.contains(&format!("the Redis user {user} may not")) && e.contains("~clip:*"),
            "{user}: {e}"
        );
    }
    // The node plugin needs no set commands; the controller's check of them says which.
    for (user, command) in [("nosets", "SADD"), ("noremove", "SREM")] {
        let e = RedisCache::connect(as_user(user))
            .await?
            .may_keep_owners()
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains(command) && e.contains(&format!("the Redis user {user} may not")),
            "{user}: {e}"
        );
    }
    // Granted exactly those, clip works; and the checks leave nothing behind.
    let cache = RedisCache::connect(as_user("clip")).await?;
    cache.may_keep_owners().await?;
    for seed in 1..=6 {
        let (key, data) = loose_chunk(seed);
        cache.put(&key, data.clone()).await?;
        assert_eq!(cache.get(&key).await?, Some(data), "chunk {seed}");
    }
    let Lease::Acquired(token) = cache.try_lease("span").await else {
        panic!("no lease: {:?}", cache.counters());
    };
    assert!(cache.lease_held("span").await);
    cache.release_lease("span", &token).await;
    assert!(!cache.lease_held("span").await, "released by the script");
    assert_eq!(counter_of(&cache, "error"), 0, "{:?}", cache.counters());
    for port in cluster.masters()? {
        let keys = cluster.cli_on(port, &["KEYS", "clip:probe:*"])?;
        assert!(keys.trim().is_empty(), "master {port}: {keys}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_is_used_with_its_ca_file_and_refused_without_it() -> anyhow::Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = ClusterOptions::new().tls().start()?;
    let ca = cluster.ca_file().unwrap().to_owned();
    let tls = RedisConfig {
        tls: true,
        connect_timeout: Duration::from_secs(1),
        ..redis_config(cluster.seeds())
    };

    let cache = RedisCache::connect(RedisConfig {
        ca_file: Some(ca.clone()),
        ..tls.clone()
    })
    .await?;
    // Enough keys to land on every master: each node is reached over TLS.
    for seed in 1..=30 {
        let (key, data) = loose_chunk(seed);
        cache.put(&key, data.clone()).await?;
        assert_eq!(cache.get(&key).await?, Some(data), "chunk {seed}");
    }
    assert_eq!(counter_of(&cache, "hit"), 30, "{:?}", cache.counters());
    let masters = cluster.masters()?;
    assert_eq!(masters.len(), 3);
    for port in masters {
        let keys = cluster.cli_on(port, &["DBSIZE"])?;
        assert!(keys.trim().parse::<u64>()? > 0, "master {port}: {keys}");
    }

    // The system's CAs do not know the test CA: a clear error at start.
    let e = RedisCache::connect(tls.clone())
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("certificate") && e.contains("CA file"), "{e}");

    let missing = ca.with_file_name("no-such-ca.pem");
    let e = RedisCache::connect(RedisConfig {
        ca_file: Some(missing.clone()),
        ..tls.clone()
    })
    .await
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(e.contains(&missing.display().to_string()), "{e}");
    Ok(())
}
