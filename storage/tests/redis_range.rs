//! Small reads from the Redis tier: GETRANGE of the blocks they need, verified against the
//! index's block digests, against a real 6-process cluster and a real registry.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use std::sync::Arc;
use std::time::Duration;

use clip_e2e::image::{Entry, Layer, Pusher, build_image};
use clip_e2e::proxy::Proxy;
use clip_e2e::redis::RedisCluster;
use clip_e2e::registry::Registry;
use clip_e2e::text_bytes;
use clip_index::{Content, IndexOptions};
use clip_storage::cache::ChunkCache;
use clip_storage::cache::redis::{RedisCache, RedisConfig};
use clip_storage::{ChunkStore, RegistryBlobs, RegistryClient, RegistryConfig, StoreConfig};

/// GETRANGE calls the cluster's masters have served.
fn getrange_calls(cluster: &RedisCluster) -> anyhow::Result<u64> {
    let mut total = 0;
    for port in cluster.masters()? {
        let info = cluster.cli_on(port, &["INFO", "commandstats"])?;
        total += info
            .lines()
            .find(|l| l.starts_with("cmdstat_getrange:"))
            .and_then(|l| l.split("calls=").nth(1))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_read_from_redis_is_a_verified_getrange() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let proxy = Proxy::start(&registry.host())?;
    let cluster = RedisCluster::start()?;
    let data = text_bytes(5 << 20, 9);
    let image = build_image(
        &[Layer::gzip(vec![Entry::file("lib.txt", data.clone())])],
        "linux",
        "amd64",
    )?;
    Pusher::new(&registry.host(), None).push_image("range/app", "v1", &image)?;
    let client = RegistryClient::new(RegistryConfig::default());
    let resolved = client
        .resolve(&format!("{}/range/app:v1", proxy.host()), None)
        .await?;
    let index = Arc::new(
        clip_storage::build_index(
            &client,
            &resolved,
            IndexOptions::default(),
            2,
            Arc::default(),
        )
        .await?,
    );
    let ino = index.resolve(b"/lib.txt", false)?;
    let Content::File { offset: base, .. } = index.node(ino).unwrap().content else {
        panic!("not a file");
    };
    let config = RedisConfig {
        seeds: cluster.seeds(),
        op_timeout: Duration::from_secs(5),
        ..RedisConfig::default()
    };
    let node = |redis: Arc<RedisCache>| -> anyhow::Result<Arc<ChunkStore<RegistryBlobs>>> {
        let source = client.repository(&index.source.repository, &index.source.manifest_digest)?;
        let tiers: Vec<Arc<dyn ChunkCache>> = vec![redis.clone()];
        Ok(ChunkStore::new(
            index.clone(),
            Arc::new(source),
            tiers,
            Some(redis),
            StoreConfig {
                readahead_runs: 0,
                open_prefetch_bytes: 0,
                ..StoreConfig::default()
            },
        ))
    };
    // Node A reads the file from the registry and publishes its chunks.
    let a = node(Arc::new(RedisCache::connect(config.clone()).await?))?;
    let all = a.read(0, base, data.len() as u64).await?;
    assert!(all[..] == data[..]);
    assert!(
        a.flush(Duration::from_secs(30)).await,
        "chunks reached Redis"
    );

    // Node B, registry refused: 4 KiB is one GETRANGE of one 64 KiB block, not a whole chunk.
    proxy.set_refuse(true);
    proxy.clear_log();
    let b = node(Arc::new(RedisCache::connect(config.clone()).await?))?;
    let calls = getrange_calls(&cluster)?;
    let at = 3_000_000usize;
    let got = b.read(0, base + at as u64, 4096).await?;
    assert!(got[..] == data[at..at + 4096]);
    let stats = b.stats().snapshot();
    let redis = stats.tiers.iter().find(|t| t.tier == "redis").unwrap();
    assert_eq!((stats.range_reads, redis.bytes), (1, 4096), "{stats:?}");
    assert_eq!(getrange_calls(&cluster)? - calls, 1);
    assert!(
        proxy.log().is_empty(),
        "the registry was asked: {:?}",
        proxy.log()
    );

    // A damaged value in Redis: the block does not verify, the whole chunk is read, found
    // wrong, deleted, and fetched from the registry again; the reader gets the right bytes.
    let layer = &index.layers[0];
    let c = layer.chunks_covering(base + at as u64, 1)?.start;
    let key = format!(
        "{}:c:{}",
        config.key_prefix,
        layer.chunks[c as usize].digest.hex()
    );
    let inside = (base + at as u64 - layer.chunk_range(c).start + 5).to_string();
    cluster.cli(&["SETRANGE", &key, &inside, "X"])?;
    proxy.set_refuse(false);
    let c2 = node(Arc::new(RedisCache::connect(config).await?))?;
    let got = c2.read(0, base + at as u64, 4096).await?;
    assert!(got[..] == data[at..at + 4096]);
    assert_eq!(c2.stats().snapshot().range_reads, 0);
    assert!(
        !proxy.blob_reads().is_empty(),
        "refetched from the registry"
    );
    Ok(())
}
