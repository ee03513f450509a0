//! The chunk store over a real registry: single-flight, read-ahead, prefetch, tiers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clip_e2e::image::{Entry, Layer, Pusher, build_image};
use clip_e2e::registry::Registry;
use clip_e2e::{Rng, text_bytes};
use clip_index::{Digest, IndexOptions};
use clip_storage::cache::disk::DiskCache;
use clip_storage::{
    BlobSource, ChunkStore, RegistryBlobs, RegistryClient, RegistryConfig, StoreConfig,
};

/// The registry, slowed down a little, with every fetched range counted.
struct Counting {
    inner: RegistryBlobs,
    fetched: Mutex<HashMap<Range<u64>, u32>>,
}

impl BlobSource for Counting {
    async fn fetch_range(&self, digest: &Digest, range: Range<u64>) -> clip_storage::Result<Bytes> {
        *self
            .fetched
            .lock()
            .unwrap()
            .entry(range.clone())
            .or_default() += 1;
        tokio::time::sleep(Duration::from_millis(30)).await;
        self.inner.fetch_range(digest, range).await
    }

    fn describe(&self) -> String {
        "counting".into()
    }
}

struct Setup {
    _registry: Registry,
    data: Vec<u8>,
    store: Arc<ChunkStore<Counting>>,
    source: Arc<Counting>,
    _cache: tempfile::TempDir,
}

async fn setup(config: StoreConfig) -> anyhow::Result<Setup> {
    let registry = Registry::start()?;
    let mut data = text_bytes(12 << 20, 3);
    data.extend(Rng(4).bytes(8 << 20));
    let layers = vec![Layer::gzip(vec![Entry::file("big", data.clone())])];
    let image = build_image(&layers, "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("store/x", "v1", &image)?;
    let client = RegistryClient::new(RegistryConfig::default());
    let resolved = client.resolve(&reference, None).await?;
    let index = clip_storage::build_index(
        &client,
        &resolved,
        IndexOptions::default(),
        2,
        Arc::default(),
    )
    .await?;
    let inner = client.repository(&index.source.repository, &index.source.manifest_digest)?;
    let source = Arc::new(Counting {
        inner,
        fetched: Mutex::new(HashMap::new()),
    });
    let cache = tempfile::tempdir()?;
    let disk = DiskCache::open(cache.path(), 1 << 30)?;
    let store = ChunkStore::new(
        Arc::new(index),
        source.clone(),
        vec![Arc::new(disk)],
        None,
        config,
    );
    Ok(Setup {
        _registry: registry,
        data,
        store,
        source,
        _cache: cache,
    })
}

fn file_offset(s: &Setup) -> u64 {
    let index = s.store.index();
    let ino = index.resolve(b"/big", false).unwrap();
    match index.node(ino).unwrap().content {
        clip_index::Content::File { offset, .. } => offset,
        _ => panic!("not a file"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_for_one_chunk_fetch_it_once() -> anyhow::Result<()> {
    let s = setup(StoreConfig {
        readahead_runs: 0,
        ..StoreConfig::default()
    })
    .await?;
    let base = file_offset(&s);
    let reads = (0..64).map(|i| {
        let store = s.store.clone();
        async move { store.read(0, base + 9_000_000 + i * 100, 1000).await }
    });
    let results = futures::future::try_join_all(reads).await?;
    for (i, r) in results.iter().enumerate() {
        let off = 9_000_000 + i * 100;
        assert_eq!(&r[..], &s.data[off..off + 1000]);
    }
    let fetched = s.source.fetched.lock().unwrap().clone();
    assert_eq!(fetched.len(), 1, "{fetched:?}");
    assert!(fetched.values().all(|&n| n == 1), "{fetched:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sequential_reads_fetch_ahead_and_never_twice() -> anyhow::Result<()> {
    let s = setup(StoreConfig::default()).await?;
    let base = file_offset(&s);
    let mut off = 0u64;
    while off < s.data.len() as u64 {
        let len = (128 * 1024).min(s.data.len() as u64 - off);
        let got = s.store.read(0, base + off, len).await?;
        assert!(got[..] == s.data[off as usize..(off + len) as usize]);
        off += len;
    }
    let stats = s.store.stats().snapshot();
    assert!(stats.prefetched_chunks > 0, "read-ahead ran: {stats:?}");
    let fetched = s.source.fetched.lock().unwrap().clone();
    assert!(
        fetched.values().all(|&n| n == 1),
        "a range fetched twice: {fetched:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefetch_fills_the_cache_so_reads_need_no_source() -> anyhow::Result<()> {
    let s = setup(StoreConfig::default()).await?;
    let n = s.store.prefetch_all(2).await?;
    assert_eq!(n, s.store.index().layers[0].chunks.len() as u64);
    let before = s.source.fetched.lock().unwrap().len();
    let base = file_offset(&s);
    let got = s.store.read(0, base + 15_000_000, 3_000_000).await?;
    assert!(got[..] == s.data[15_000_000..18_000_000]);
    assert_eq!(
        s.source.fetched.lock().unwrap().len(),
        before,
        "served from the caches"
    );
    assert_eq!(
        s.store.prefetch_all(2).await?,
        0,
        "nothing left to prefetch"
    );
    Ok(())
}
