//! The chunk store over a real registry: single-flight, read-ahead, prefetch, tiers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clip_e2e::check::resident;
use clip_e2e::image::{Entry, Layer, Pusher, build_image};
use clip_e2e::registry::Registry;
use clip_e2e::{Rng, text_bytes};
use clip_index::{Digest, IndexOptions};
use clip_storage::cache::disk::DiskCache;
use clip_storage::{
    BlobSource, ChunkStore, RegistryBlobs, RegistryClient, RegistryConfig, StoreConfig,
};

/// The registry, slowed down a little, with every fetched range counted; with a gate, a
/// streamed range stops after `gate.0` bytes until the gate opens.
struct Counting {
    inner: RegistryBlobs,
    gate: Mutex<Option<(u64, Arc<tokio::sync::Semaphore>)>>,
    streams_done: std::sync::atomic::AtomicUsize,
    /// Ranges being fetched now, and the most there have been at once.
    in_flight: AtomicUsize,
    peak: AtomicUsize,
    /// Every range fetched, in the order the fetches started: when it started and ended.
    log: Mutex<Vec<Logged>>,
    /// The fetch that starts `n`-th (from 0) takes this much longer.
    slow: Mutex<Option<(usize, Duration)>>,
}

/// A range fetched: when it started, and when it ended.
type Logged = (Range<u64>, Instant, Option<Instant>);

/// Counts a range in [`Counting::in_flight`] while it is fetched, and logs it.
struct Fetching<'a>(&'a Counting, usize);

impl<'a> Fetching<'a> {
    fn new(source: &'a Counting, range: &Range<u64>) -> Self {
        let now = source.in_flight.fetch_add(1, SeqCst) + 1;
        source.peak.fetch_max(now, SeqCst);
        let mut log = source.log.lock().unwrap();
        log.push((range.clone(), Instant::now(), None));
        Self(source, log.len() - 1)
    }

    /// The test's 30 ms of latency, and more for the fetch [`Counting::slow`] names.
    async fn wait(&self) {
        let slow = *self.0.slow.lock().unwrap();
        let extra = slow
            .filter(|(n, _)| *n == self.1)
            .map_or(Duration::ZERO, |s| s.1);
        tokio::time::sleep(Duration::from_millis(30) + extra).await;
    }
}

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        self.0.log.lock().unwrap()[self.1].2 = Some(Instant::now());
        self.0.in_flight.fetch_sub(1, SeqCst);
    }
}

impl Counting {
    /// How many times each range was fetched (from [`Counting::log`]).
    fn fetched(&self) -> HashMap<Range<u64>, u32> {
        let mut counts = HashMap::new();
        for (range, _, _) in self.log.lock().unwrap().iter() {
            *counts.entry(range.clone()).or_default() += 1;
        }
        counts
    }
}

impl BlobSource for Counting {
    async fn fetch_range(&self, digest: &Digest, range: Range<u64>) -> clip_storage::Result<Bytes> {
        let fetching = Fetching::new(self, &range);
        fetching.wait().await;
        self.inner.fetch_range(digest, range).await
    }

    async fn stream_range(
        &self,
        digest: &Digest,
        range: Range<u64>,
        sink: tokio::sync::mpsc::Sender<Bytes>,
    ) -> clip_storage::Result<()> {
        let fetching = Fetching::new(self, &range);
        fetching.wait().await;
        let gate = self.gate.lock().unwrap().clone();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let forward = async {
            let mut sent = 0u64;
            let mut held = false;
            while let Some(piece) = rx.recv().await {
                if let Some((after, open)) = &gate
                    && !held
                    && sent + piece.len() as u64 > *after
                {
                    let cut = (*after - sent) as usize;
                    let first = piece.slice(..cut);
                    sent += first.len() as u64;
                    if !first.is_empty() && sink.send(first).await.is_err() {
                        return;
                    }
                    let _ = open.acquire().await;
                    held = true;
                    let rest = piece.slice(cut..);
                    sent += rest.len() as u64;
                    if sink.send(rest).await.is_err() {
                        return;
                    }
                    continue;
                }
                sent += piece.len() as u64;
                if sink.send(piece).await.is_err() {
                    return;
                }
            }
        };
        let (r, ()) = tokio::join!(self.inner.stream_range(digest, range, tx), forward);
        self.streams_done
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        r
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
    cache: tempfile::TempDir,
}

/// [`setup`] with the default configuration but no read-ahead: only what reads ask for.
async fn setup_without_readahead() -> anyhow::Result<Setup> {
    setup(StoreConfig {
        readahead_runs: 0,
        ..StoreConfig::default()
    })
    .await
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
        gate: Mutex::new(None),
        streams_done: Default::default(),
        in_flight: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
        log: Mutex::default(),
        slow: Mutex::default(),
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
        cache,
    })
}

impl Setup {
    /// A second store over the same index, source and disk cache (a new process on the node).
    /// [`Self::reopen`] without read-ahead or preloading: what a read costs on its own.
    fn reopen_quiet(&self) -> anyhow::Result<Arc<ChunkStore<Counting>>> {
        self.reopen(StoreConfig {
            readahead_runs: 0,
            preload_chunks: 0,
            ..StoreConfig::default()
        })
    }

    /// Files of `config.whole_file_min_bytes` or more (none by default) are kept whole.
    fn reopen(&self, config: StoreConfig) -> anyhow::Result<Arc<ChunkStore<Counting>>> {
        let disk = Arc::new(DiskCache::open(self.cache.path(), 1 << 30)?);
        let store = ChunkStore::new(
            self.store.index().clone(),
            self.source.clone(),
            vec![disk.clone()],
            None,
            config,
        );
        store.keep_whole_files(disk);
        Ok(store)
    }

    /// A store over the same index and source with an empty disk cache of its own (a new
    /// node), and that cache's directory.
    fn on_empty_cache(
        &self,
        config: StoreConfig,
    ) -> anyhow::Result<(Arc<ChunkStore<Counting>>, tempfile::TempDir)> {
        let empty = tempfile::tempdir()?;
        let disk = DiskCache::open(empty.path(), 1 << 30)?;
        let store = ChunkStore::new(
            self.store.index().clone(),
            self.source.clone(),
            vec![Arc::new(disk)],
            None,
            config,
        );
        Ok((store, empty))
    }

    /// The end of the compressed bytes fetched so far (0 if nothing was).
    fn fetched_up_to(&self) -> u64 {
        let log = self.source.log.lock().unwrap();
        log.iter().map(|(r, _, _)| r.end).max().unwrap_or(0)
    }

    fn requests(&self) -> u32 {
        self.source.log.lock().unwrap().len() as u32
    }
}

/// Reads `len` bytes from `from` of the file in 128 KiB reads, for a reader of a file that
/// ends at `file_end` bytes, checking every byte; then lets background work finish.
/// A store whose disk cache holds every chunk of the image, without read-ahead.
async fn warm_cache() -> anyhow::Result<Setup> {
    let s = setup_without_readahead().await?;
    s.store.prefetch_all(2).await?;
    Ok(s)
}

async fn read_sequentially(
    s: &Setup,
    store: &Arc<ChunkStore<Counting>>,
    from: u64,
    len: u64,
    file_end: u64,
) -> anyhow::Result<()> {
    read_paced(s, store, from, len, file_end, 128 * 1024, Duration::ZERO).await
}

/// [`read_sequentially`] in reads of `step` bytes, by a reader that spends `pause` on each.
async fn read_paced(
    s: &Setup,
    store: &Arc<ChunkStore<Counting>>,
    from: u64,
    len: u64,
    file_end: u64,
    step: u64,
    pause: Duration,
) -> anyhow::Result<()> {
    let base = file_offset(s);
    let mut off = from;
    while off < from + len {
        let n = step.min(from + len - off);
        let got = store
            .read_in_file(0, base + off, n, base + file_end)
            .await?;
        assert!(got[..] == s.data[off as usize..(off + n) as usize]);
        off += n;
        tokio::time::sleep(pause).await;
    }
    settle(s).await;
    Ok(())
}

/// Waits until the source has seen no new request for a while.
async fn settle(s: &Setup) {
    let mut last = s.requests();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = s.requests();
        if now == last {
            return;
        }
        last = now;
    }
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
    let s = setup_without_readahead().await?;
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
    let fetched = s.source.fetched();
    assert_eq!(fetched.len(), 1, "{fetched:?}");
    assert!(fetched.values().all(|&n| n == 1), "{fetched:?}");
    Ok(())
}

/// Readers that miss in many places at once get their bytes, through at most
/// `fetch_concurrency` registry fetches at a time, and that many run side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn misses_everywhere_at_once_fetch_at_most_the_configured_number_of_ranges_at_a_time()
-> anyhow::Result<()> {
    let s = setup(StoreConfig {
        readahead_runs: 0,
        preload_chunks: 0,
        fetch_concurrency: 2,
        ..StoreConfig::default()
    })
    .await?;
    let base = file_offset(&s);
    let len = s.data.len() as u64;
    let offsets: Vec<u64> = (0..16).map(|i| i * (len - 4096) / 15).collect();
    let reads = offsets.iter().map(|&off| {
        let store = s.store.clone();
        async move { store.read(0, base + off, 4096).await }
    });
    let results = futures::future::try_join_all(reads).await?;
    for (r, &off) in results.iter().zip(&offsets) {
        assert!(
            r[..] == s.data[off as usize..off as usize + 4096],
            "at {off}"
        );
    }
    settle(&s).await;
    let ranges = s.source.fetched().len();
    assert!(
        ranges >= 3,
        "the readers needed {ranges} ranges: too few to test a limit of 2"
    );
    assert_eq!(
        s.source.peak.load(SeqCst),
        2,
        "fetches at once ({ranges} ranges)"
    );
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
    let fetched = s.source.fetched();
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
    let before = s.source.fetched().len();
    let base = file_offset(&s);
    let got = s.store.read(0, base + 15_000_000, 3_000_000).await?;
    assert!(got[..] == s.data[15_000_000..18_000_000]);
    assert_eq!(s.source.fetched().len(), before, "served from the caches");
    assert_eq!(
        s.store.prefetch_all(2).await?,
        0,
        "nothing left to prefetch"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefetch_starts_no_fetch_while_a_reader_fetches() -> anyhow::Result<()> {
    let s = setup_without_readahead().await?;
    let store = s.store.clone();
    let prefetch = tokio::spawn(async move { store.prefetch_all(1).await });
    while s.source.in_flight.load(SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // A read of uncached bytes while the prefetch fetches its first run: a slow one, which
    // the prefetch outlasts.
    *s.source.slow.lock().unwrap() = Some((1, Duration::from_millis(300)));
    let off = 10_000_000;
    let got = s.store.read(0, file_offset(&s) + off, 4096).await?;
    assert!(got[..] == s.data[off as usize..off as usize + 4096]);
    let chunks = prefetch.await??;
    let layer = &s.store.index().layers[0];
    assert!(chunks > 0 && chunks < layer.chunks.len() as u64, "{chunks}");
    let log = s.source.log.lock().unwrap().clone();
    assert_eq!(
        log.len(),
        layer.span_runs(0..layer.chunks.len() as u32).count(),
        "every run fetched once: {log:?}"
    );
    // The read's fetch started second; none started until it ended.
    let read_end = log[1].2.context("the read's fetch ended")?;
    let third = log.get(2).context("the prefetch went on")?;
    assert!(
        third.1 >= read_end,
        "a prefetch fetch started {:?} before the reader's ended",
        read_end - third.1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_ahead_stops_at_the_end_of_the_file() -> anyhow::Result<()> {
    // The first 3 MiB of the layer's file, read as if the file ended there.
    let s = setup(StoreConfig::default()).await?;
    let layer = &s.store.index().layers[0];
    let base = file_offset(&s);
    let last = layer.chunks_covering(base + (3 << 20) - 1, 1)?.start;
    let bound = layer.plan(layer.span_run(last)).compressed.end;
    read_sequentially(&s, &s.store, 0, 3 << 20, 3 << 20).await?;
    assert!(
        s.fetched_up_to() <= bound,
        "read-ahead went past the file's last span: fetched up to {}, its span ends at {bound}",
        s.fetched_up_to()
    );
    // The same reads by a reader of the whole layer do read ahead past it.
    let s = setup(StoreConfig::default()).await?;
    read_sequentially(&s, &s.store, 0, 3 << 20, u64::MAX / 2).await?;
    assert!(s.fetched_up_to() > bound, "layer readers read ahead");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn opening_a_file_fetches_its_first_bytes_before_any_read() -> anyhow::Result<()> {
    let s = setup(StoreConfig {
        readahead_runs: 0,
        open_prefetch_bytes: 6 << 20,
        ..StoreConfig::default()
    })
    .await?;
    let base = file_offset(&s);
    let size = s.data.len() as u64;
    s.store.opened(0, base..base + size);
    settle(&s).await;
    let fetched = s.requests();
    assert!(fetched > 0, "opening fetched nothing");
    let layer = &s.store.index().layers[0];
    let last = layer.chunks_covering(base + (6 << 20) - 1, 1)?.start;
    assert!(
        s.fetched_up_to() <= layer.plan(layer.span_run(last)).compressed.end,
        "fetched past the first 6 MiB's spans"
    );
    // The reads of those bytes find them: no request, right bytes.
    read_sequentially(&s, &s.store, 0, 6 << 20, size).await?;
    assert_eq!(
        s.requests(),
        fetched,
        "reads after the open went to the source"
    );
    // Opening again costs nothing, not even a task: it is answered on the opener's thread,
    // here one outside the runtime (where a task could not be started).
    let store = s.store.clone();
    std::thread::spawn(move || store.opened(0, base..base + size))
        .join()
        .expect("an open of local chunks starts no task");
    settle(&s).await;
    assert_eq!(s.requests(), fetched);
    // With open prefetch off, opening fetches nothing.
    let s = setup(StoreConfig {
        open_prefetch_bytes: 0,
        ..StoreConfig::default()
    })
    .await?;
    s.store.opened(0, base..base + size);
    settle(&s).await;
    assert_eq!(s.requests(), 0, "open prefetch is off");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warm_sequential_reads_find_the_next_chunks_in_memory() -> anyhow::Result<()> {
    let s = setup(StoreConfig::default()).await?;
    let size = s.data.len() as u64;
    s.store.prefetch_all(2).await?;
    let chunks = s.store.index().layers[0].chunks.len() as u64;
    let s = &s;
    let requests = s.requests();
    // Chunks a reader had to wait for the disk for.
    let waited_for_disk = |preload: u32| async move {
        let store = s.reopen(StoreConfig {
            preload_chunks: preload,
            ..StoreConfig::default()
        })?;
        // A reader that works on what it reads (a debug build verifies slowly: without a
        // pause, reads from memory would outrun any preloading).
        // 512 KiB reads, as the kernel's read-ahead asks (small ones would be range reads).
        read_paced(
            s,
            &store,
            0,
            size,
            size,
            512 * 1024,
            Duration::from_millis(20),
        )
        .await?;
        let stats = store.stats().snapshot();
        let disk = stats.tiers.iter().find(|t| t.tier == "disk").unwrap();
        assert_eq!(
            disk.chunks, chunks,
            "each chunk read from disk once: {stats:?}"
        );
        anyhow::Ok(disk.chunks - stats.preloaded_chunks)
    };
    // Without preloading, each chunk's first read waits for the disk and the verification.
    assert_eq!(waited_for_disk(0).await?, chunks);
    // With it, only the first chunk or two: the rest are in memory before the reader asks.
    let waited = waited_for_disk(8).await?;
    assert!(
        waited <= 2,
        "{waited} of {chunks} chunks waited for the disk"
    );
    assert_eq!(s.requests(), requests, "warm reads went to the source");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_gets_its_chunk_before_the_rest_of_its_fetch_arrives() -> anyhow::Result<()> {
    let s = setup_without_readahead().await?;
    let layer = &s.store.index().layers[0];
    let base = file_offset(&s);
    // A span of several chunks, and the compressed bytes its first chunk needs.
    let c = layer.chunks_covering(base + (6 << 20), 1)?.start;
    let span = layer.span_run(c);
    assert!(span.len() >= 3, "span {span:?}");
    let plan = layer.plan(span.clone());
    let first_needs = layer.chunks[span.start as usize].compressed_end - plan.compressed.start;
    let open = Arc::new(tokio::sync::Semaphore::new(0));
    *s.source.gate.lock().unwrap() = Some((first_needs + 64 * 1024, open.clone()));
    // The first chunk arrives while the fetch is held after the bytes it needs.
    let first = layer.chunk_range(span.start);
    let off = first.start - base;
    let got = tokio::time::timeout(
        Duration::from_secs(20),
        s.store.read(0, first.start, first.end - first.start),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the first chunk waited for the whole fetch"))??;
    assert!(got[..] == s.data[off as usize..(off + first.end - first.start) as usize]);
    assert_eq!(
        s.source
            .streams_done
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the fetch was still held"
    );
    // The rest of the span comes from the same fetch once it goes on.
    open.add_permits(1);
    let last = layer.chunk_range(span.end - 1);
    let off = last.start - base;
    let got = s.store.read(0, last.start, last.end - last.start).await?;
    assert!(got[..] == s.data[off as usize..(off + last.end - last.start) as usize]);
    assert_eq!(s.requests(), 1, "one fetch for the span");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_warm_reads_verify_only_the_blocks_they_read() -> anyhow::Result<()> {
    let s = warm_cache().await?;
    let base = file_offset(&s);
    let fresh = || s.reopen_quiet();
    let tier = |store: &Arc<ChunkStore<Counting>>, name: &str| {
        let stats = store.stats().snapshot();
        let t = stats.tiers.iter().find(|t| t.tier == name).unwrap().clone();
        (t.chunks, t.bytes, stats.range_reads)
    };
    let at = 5_000_100u64;
    let want = &s.data[at as usize..at as usize + 4096];

    // 4 KiB from a chunk on disk: read and verified as one 64 KiB block, not the chunk.
    let store = fresh()?;
    assert!(&store.read(0, base + at, 4096).await?[..] == want);
    assert_eq!(tier(&store, "disk"), (0, 4096, 1));
    assert_eq!(tier(&store, "memory").0, 0, "the chunk was not loaded");
    // A large read (here 300 KB of one chunk) takes the whole chunk, kept in memory.
    let store = fresh()?;
    let layer = &s.store.index().layers[0];
    let c = layer.chunks_covering(base + (6 << 20), 1)?.start;
    let from = layer.chunk_range(c).start + 100 - base;
    let big = store.read(0, base + from, 300_000).await?;
    assert!(big[..] == s.data[from as usize..from as usize + 300_000]);
    assert_eq!(
        tier(&store, "disk"),
        (1, layer.chunk_range(c).end - layer.chunk_range(c).start, 0)
    );

    // A damaged block on disk: never served; the whole chunk is checked, dropped and
    // fetched again.
    let layer = &s.store.index().layers[0];
    let c = layer.chunks_covering(base + at, 1)?.start;
    let hex = layer.chunks[c as usize].digest.hex();
    let file = s.cache.path().join("chunks").join(&hex[..2]).join(&hex);
    let inside = base + at - layer.chunk_range(c).start + 10;
    let mut bytes = std::fs::read(&file)?;
    bytes[inside as usize] ^= 0xff;
    std::fs::write(&file, &bytes)?;
    let before = s.requests();
    let store = fresh()?;
    assert!(&store.read(0, base + at, 4096).await?[..] == want);
    assert_eq!(tier(&store, "disk").2, 0, "no range read was served");
    assert!(
        s.requests() > before,
        "the chunk came from the registry again"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunk_file_from_before_checksums_is_verified_whole_then_read_in_part()
-> anyhow::Result<()> {
    let s = warm_cache().await?;
    let base = file_offset(&s);
    let fresh = || s.reopen_quiet();
    let at = 5_000_100u64;
    let want = &s.data[at as usize..at as usize + 4096];
    let layer = &s.store.index().layers[0];
    let c = layer.chunks_covering(base + at, 1)?.start;
    let range = layer.chunk_range(c);
    let chunk_len = range.end - range.start;
    let hex = layer.chunks[c as usize].digest.hex();
    let file = s.cache.path().join("chunks").join(&hex[..2]).join(&hex);

    // What an earlier version stored: the chunk's bytes alone.
    let whole = std::fs::read(&file)?;
    std::fs::write(&file, &whole[..chunk_len as usize])?;
    let before = s.requests();
    let store = fresh()?;
    assert!(&store.read(0, base + at, 4096).await?[..] == want);
    let stats = store.stats().snapshot();
    let disk = stats.tiers.iter().find(|t| t.tier == "disk").unwrap();
    assert_eq!(
        (disk.chunks, stats.range_reads),
        (1, 0),
        "read whole from disk and verified, not in part"
    );
    assert_eq!(s.requests(), before, "nothing fetched again");
    assert_eq!(
        std::fs::read(&file)?,
        whole,
        "the file was rewritten with its checksums"
    );

    // Now a small read takes only its blocks.
    let store = fresh()?;
    assert!(&store.read(0, base + at, 4096).await?[..] == want);
    assert_eq!(store.stats().snapshot().range_reads, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_start_up_profile_fetches_what_the_reads_will_need_on_an_empty_cache()
-> anyhow::Result<()> {
    use clip_storage::profile;
    let quiet = StoreConfig {
        readahead_runs: 2,
        preload_chunks: 0,
        open_prefetch_bytes: 0,
        ..StoreConfig::default()
    };
    let s = setup(quiet.clone()).await?;
    let base = file_offset(&s);
    let size = s.data.len() as u64;
    let layer = s.store.index().layers[0].clone();
    // A start-up reads a little here and there: three places in three spans.
    let reads = [(15u64 << 20, 65536u64), (1 << 20, 4096), (9 << 20, 200_000)];
    let mut want = Vec::new();
    for &(off, len) in &reads {
        let got = s
            .store
            .read_in_file(0, base + off, len, base + size)
            .await?;
        assert!(got[..] == s.data[off as usize..(off + len) as usize]);
        for c in layer.chunks_covering(base + off, len)? {
            want.push((0usize, c));
        }
    }
    let recorded = s.store.recorded_profile();
    assert_eq!(recorded.chunks, want, "first touch first, each chunk once");
    let read_at = |&(off, len): &(u64, u64)| profile::FileRead {
        layer: 0,
        offset: base + off,
        len,
        whole: false,
    };
    assert_eq!(
        recorded.reads,
        reads.iter().map(read_at).collect::<Vec<_>>(),
        "and each read"
    );
    let text = profile::encode(s.store.index(), &recorded);
    assert_eq!(profile::decode(&text, s.store.index())?, recorded);

    // A new mount with an empty cache replays it: one fetch per span, before any read.
    settle(&s).await;
    let before = s.requests();
    let (store, _empty) = s.on_empty_cache(quiet)?;
    store.replay(&recorded, u64::MAX);
    settle(&s).await;
    let spans: std::collections::HashSet<Range<u32>> = recorded
        .chunks
        .iter()
        .map(|&(_, c)| layer.span_run(c))
        .collect();
    assert_eq!(
        s.requests() - before,
        spans.len() as u32,
        "one fetch per span the profile names"
    );
    for &(off, len) in &reads {
        let got = store.read_in_file(0, base + off, len, base + size).await?;
        assert!(got[..] == s.data[off as usize..(off + len) as usize]);
    }
    settle(&s).await;
    assert_eq!(
        s.requests() - before,
        spans.len() as u32,
        "the reads found everything fetched"
    );

    // A budget of one span's bytes (a quarter of a small disk cache): one fetch, the first
    // span the profile names.
    let before = s.requests();
    let first = layer.span_run(recorded.chunks[0].1);
    let one = layer.chunk_range(first.end - 1).end - layer.chunk_range(first.start).start;
    let (store, _empty) = s.on_empty_cache(StoreConfig::default())?;
    store.replay(&recorded, one);
    settle(&s).await;
    assert_eq!(s.requests() - before, 1, "only what fits in the budget");
    let (off, len) = reads[0];
    let got = store.read_in_file(0, base + off, len, base + size).await?;
    assert!(got[..] == s.data[off as usize..(off + len) as usize]);
    settle(&s).await;
    assert_eq!(s.requests() - before, 1, "and it was the first span read");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_start_up_profile_is_refused_and_foreign_lines_are_skipped() -> anyhow::Result<()> {
    use clip_storage::profile;
    let s = setup(StoreConfig::default()).await?;
    let index = s.store.index();
    let layer = index.layers[0].digest;
    let chunks = index.layers[0].chunks.len();
    let other = Digest::of(b"another image's layer");
    for bad in [
        "",
        "not a profile\n",
        &format!("clip-startup-profile 1\n{layer}\n"),
        "clip-startup-profile 1\nsha256:12 3\n",
        &format!("clip-startup-profile 1\n{layer} -1\n"),
        &format!("clip-startup-profile 1\n{layer} 99999999999\n"),
        &format!("clip-startup-profile 1\n{layer} 1 2\n"),
        // Reads are format 2's, with an offset and a length.
        &format!("clip-startup-profile 1\n{layer} read 0 10\n"),
        &format!("clip-startup-profile 2\n{layer} read 0\n"),
        &format!("clip-startup-profile 2\n{layer} read -1 10\n"),
        &format!("clip-startup-profile 2\n{layer} whole 0 x\n"),
        &format!("clip-startup-profile 2\n{layer} read 0 10 3\n"),
        &format!("clip-startup-profile 4\n{layer} 1\n"),
    ] {
        let err = profile::decode(bad, index).expect_err(bad);
        assert!(err.to_string().contains("line"), "{err}");
    }
    let text = format!(
        "clip-startup-profile 1\n{layer} 2\n{other} 1\n{layer} {chunks}\n\n{layer} 0\n{layer} 2\n"
    );
    assert_eq!(
        profile::decode(&text, index)?.chunks,
        [(0, 2), (0, 0)],
        "another layer's line, a chunk past the end and a repeat are skipped"
    );
    let end = index.layers[0].uncompressed_size;
    let text = format!(
        "clip-startup-profile 2\n{layer} 1\n{layer} read 10 20\n{other} read 0 5\n{layer} whole 0 {end}\n{layer} read {end} 1\n{layer} read 0 0\n{layer} read 18446744073709551615 2\n{layer} read 10 20\n"
    );
    let read = |offset, len, whole| profile::FileRead {
        layer: 0,
        offset,
        len,
        whole,
    };
    assert_eq!(
        profile::decode(&text, index)?,
        profile::Profile {
            chunks: vec![(0, 1)],
            reads: vec![read(10, 20, false), read(0, end, true)],
            paths: Vec::new(),
        },
        "another layer's read, reads past the layer's end or empty, and a repeat are skipped"
    );
    Ok(())
}

/// The file under `dir` (at any depth) named `name`.
fn file_named(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = file_named(&path, name) {
                return Some(found);
            }
        } else if entry.file_name().to_str() == Some(name) {
            return Some(path);
        }
    }
    None
}

/// Drops every file under `dir` from the page cache (written out first), as a new boot or
/// `drop_caches` would.
fn drop_from_page_cache(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            drop_from_page_cache(&path)?;
            continue;
        }
        let file = std::fs::File::open(&path)?;
        file.sync_all()?;
        // SAFETY: a hint about an open descriptor; no memory is passed.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_warm_start_up_finds_the_bytes_its_profile_read_in_the_page_cache() -> anyhow::Result<()>
{
    use clip_storage::profile::{FileRead, Profile};
    let s = warm_cache().await?;
    let base = file_offset(&s);
    let size = s.data.len() as u64;
    let layer = s.store.index().layers[0].clone();
    // What an earlier start-up read: a small file's worth here, more there (two chunks).
    let reads = [(3u64 << 20, 20_000u64), ((9 << 20) - 100_000, 300_000)];
    let profile = Profile {
        chunks: Vec::new(),
        reads: reads
            .iter()
            .map(|&(off, len)| FileRead {
                layer: 0,
                offset: base + off,
                len,
                whole: false,
            })
            .collect(),
        paths: Vec::new(),
    };
    // Where those bytes are in the cache's chunk files.
    let mut places = Vec::new();
    for &(off, len) in &reads {
        for c in layer.chunks_covering(base + off, len)? {
            let chunk = layer.chunk_range(c);
            let from = (base + off).max(chunk.start) - chunk.start;
            let to = (base + off + len).min(chunk.end) - chunk.start;
            let path = file_named(
                &s.cache.path().join("chunks"),
                &layer.chunks[c as usize].digest.hex(),
            )
            .expect("the chunk is in the cache");
            assert!(std::fs::metadata(&path)?.len() > to);
            places.push((path, from..to));
        }
    }
    assert_eq!(places.len(), 3);

    // A new process after the page cache was dropped: none of it is in memory.
    let store = s.reopen_quiet()?;
    drop_from_page_cache(s.cache.path())?;
    for (path, range) in &places {
        assert_eq!(resident(path, range.clone())?.0, 0, "{}", path.display());
    }
    let before = s.requests();
    store.replay(&profile, u64::MAX);
    clip_e2e::wait::until(
        "the profile's reads in the page cache",
        Duration::from_secs(10),
        || {
            places
                .iter()
                .all(|(path, range)| resident(path, range.clone()).is_ok_and(|(n, of)| n == of))
        },
    )?;
    assert_eq!(s.requests(), before, "nothing fetched");
    assert!(
        store.recorded_profile().is_empty(),
        "reading ahead is not the program's reading"
    );
    for &(off, len) in &reads {
        let got = store.read_in_file(0, base + off, len, base + size).await?;
        assert!(got[..] == s.data[off as usize..(off + len) as usize]);
    }

    // Within a budget: only what fits of the reads, in their order.
    let store = s.reopen_quiet()?;
    drop_from_page_cache(s.cache.path())?;
    store.replay(&profile, reads[0].1);
    let (first, _) = &places[0];
    clip_e2e::wait::until("the first read's bytes", Duration::from_secs(10), || {
        resident(first, places[0].1.clone()).is_ok_and(|(n, of)| n == of)
    })?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (path, range) in &places[1..] {
        assert_eq!(
            resident(path, range.clone())?.0,
            0,
            "past the budget: {}",
            path.display()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_handed_over_whole_is_recorded_and_read_ahead_by_the_next_start()
-> anyhow::Result<()> {
    use clip_storage::profile::{FileRead, Profile};
    let s = warm_cache().await?;
    let base = file_offset(&s);
    let size = s.data.len() as u64;
    // A process whose disk cache keeps files whole (for passthrough).
    let keeping_whole = || {
        s.reopen(StoreConfig {
            readahead_runs: 0,
            preload_chunks: 0,
            whole_file_min_bytes: 1 << 20,
            ..StoreConfig::default()
        })
    };
    let store = keeping_whole()?;
    store.keep_whole(0, base, size);
    clip_e2e::wait::until("the file kept whole", Duration::from_secs(30), || {
        store.whole_file(0, base, size).is_some()
    })?;
    let whole = FileRead {
        layer: 0,
        offset: base,
        len: size,
        whole: true,
    };
    assert_eq!(
        store.recorded_profile().reads,
        [whole],
        "handing it over is recorded"
    );
    let key = clip_storage::cache::disk::whole_key(&s.store.index().layers[0].digest, base, size);
    // (Under `files/`: `checked/` holds a record of the same name.)
    let path = file_named(&s.cache.path().join("files"), &key.hex()).expect("the whole file");
    assert_eq!(std::fs::metadata(&path)?.len(), size);

    // The next start reads its head ahead, not all of it (which bytes the program read,
    // the kernel alone knows).
    let head = 4 << 20;
    let next = s.reopen(StoreConfig {
        readahead_runs: 0,
        preload_chunks: 0,
        whole_file_min_bytes: 1 << 20,
        open_prefetch_bytes: head,
        ..StoreConfig::default()
    })?;
    drop_from_page_cache(s.cache.path())?;
    assert_eq!(resident(&path, 0..size)?.0, 0);
    next.replay(
        &Profile {
            chunks: Vec::new(),
            reads: vec![whole],
            paths: Vec::new(),
        },
        u64::MAX,
    );
    clip_e2e::wait::until(
        "the whole file's head in the page cache",
        Duration::from_secs(10),
        || resident(&path, 0..head).is_ok_and(|(n, of)| n == of),
    )?;
    std::thread::sleep(Duration::from_millis(200));
    assert!(size > 2 * head);
    assert_eq!(
        resident(&path, 2 * head..size)?.0,
        0,
        "the rest is left for the kernel to read as the program asks"
    );
    assert!(next.recorded_profile().is_empty());
    Ok(())
}

/// A store over `s`'s source and disk cache that keeps files of 1 MiB or more whole, and
/// fetches what is read only.
fn keeping_whole(s: &Setup) -> anyhow::Result<Arc<ChunkStore<Counting>>> {
    s.reopen(StoreConfig {
        whole_file_min_bytes: 1 << 20,
        readahead_runs: 0,
        ..StoreConfig::default()
    })
}

/// Reads `len` bytes of the file from its start through `store` in reads of 128 KiB,
/// checking each, and returns as soon as the last read does.
async fn read_head(s: &Setup, store: &Arc<ChunkStore<Counting>>, len: u64) -> anyhow::Result<()> {
    let (base, size) = (file_offset(s), s.data.len() as u64);
    let mut off = 0;
    while off < len {
        let n = (128 << 10).min(len - off);
        let got = store.read_in_file(0, base + off, n, base + size).await?;
        assert!(got[..] == s.data[off as usize..(off + n) as usize]);
        off += n;
    }
    Ok(())
}

/// The file kept whole, as an open asks for it (on a blocking thread: it may wait).
async fn open_whole(
    s: &Setup,
    store: &Arc<ChunkStore<Counting>>,
) -> anyhow::Result<Option<std::fs::File>> {
    let (base, size) = (file_offset(s), s.data.len() as u64);
    let store = store.clone();
    Ok(tokio::task::spawn_blocking(move || store.whole_file(0, base, size)).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_read_through_is_kept_whole_as_its_chunks_arrive() -> anyhow::Result<()> {
    let s = setup_without_readahead().await?;
    let store = keeping_whole(&s)?;
    let (base, size) = (file_offset(&s), s.data.len() as u64);
    // Opened (the filesystem asks to keep it whole at each open), then read through once.
    store.keep_whole(0, base, size);
    read_head(&s, &store, size).await?;
    // An open right after the last read finds it whole: the copy followed the reads, and
    // the open waits for its last parts.
    let opened = open_whole(&s, &store).await?;
    let file = opened.expect("kept whole by the time the reads ended");
    let mut got = vec![0u8; size as usize];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut got, 0)?;
    assert!(got == s.data, "the whole file holds the file's bytes");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_whose_reader_stopped_gives_up_and_leaves_nothing() -> anyhow::Result<()> {
    let s = setup_without_readahead().await?;
    let store = keeping_whole(&s)?;
    let (base, size) = (file_offset(&s), s.data.len() as u64);
    let tmp = s.cache.path().join("tmp");
    let temp_files = || std::fs::read_dir(&tmp).map_or(0, |d| d.count());
    store.keep_whole(0, base, size);
    // A third of it, past the quarter after which the copy starts writing; then no more.
    read_head(&s, &store, size / 3).await?;
    clip_e2e::wait::until("the copy started", Duration::from_secs(10), || {
        temp_files() == 1
    })?;
    clip_e2e::wait::until("the copy gave up", Duration::from_secs(20), || {
        temp_files() == 0
    })?;
    let opened = open_whole(&s, &store).await?;
    assert!(opened.is_none(), "not kept: a third of it was read");
    // Its room in the cap went with it: read through by a later open, it is kept.
    store.keep_whole(0, base, size);
    read_head(&s, &store, size).await?;
    clip_e2e::wait::until("kept whole", Duration::from_secs(20), || {
        store.whole_file(0, base, size).is_some()
    })?;
    assert_eq!(temp_files(), 0);
    Ok(())
}
