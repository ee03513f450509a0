//! The chunk store: memory, then each cache tier, then the blob source. Misses for the same
//! chunk are fetched once (single-flight), source fetches are bounded, sequential reading
//! triggers read-ahead, and every chunk is verified before anyone sees it.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clip_index::{Compression, ImageIndex, LayerIndex};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::cache::memory::MemoryCache;
use crate::cache::redis::{Lease, RedisCache};
use crate::cache::{ChunkCache, ChunkKey};
use crate::error::{Error, Result};
use crate::reader::RangeReader;
use crate::source::BlobSource;
use crate::stats::StoreStats;

/// Most bytes a start-up profile's reads bring into the page cache ahead of a warm start
/// (see [`ChunkStore::replay`]): memory the kernel may reclaim, but taken from other files'
/// cached pages.
pub const WARM_UP_LIMIT: u64 = 1 << 30;

/// Tunables of a chunk store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Bytes of decoded chunks kept in memory.
    pub memory_bytes: u64,
    /// Source fetches in flight at once.
    pub fetch_concurrency: usize,
    /// Checkpoint spans fetched ahead of a sequential reader.
    pub readahead_runs: usize,
    /// Chunks already on local disk read into memory ahead of a sequential reader, so disk
    /// reads and verification overlap with serving.
    pub preload_chunks: u32,
    /// Uncompressed bytes from the start of a file fetched when it is opened, and read into
    /// the page cache at a warm start for each file a start-up profile says was handed over
    /// whole ([`ChunkStore::replay`]; the kernel reads the rest ahead itself as a program
    /// reads on). 0: none.
    pub open_prefetch_bytes: u64,
    /// Files at least this large are kept whole on local disk, for FUSE passthrough, once
    /// the store is given a disk cache for them ([`Self::keep_whole_files`]); 0: none.
    pub whole_file_min_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            memory_bytes: 16 << 20,
            fetch_concurrency: 8,
            readahead_runs: 4,
            preload_chunks: 8,
            open_prefetch_bytes: 16 << 20,
            whole_file_min_bytes: 0,
        }
    }
}

/// Work in flight (background writes, readers' fetches), counted so that others can wait
/// for none to be left.
type Counter = Arc<tokio::sync::watch::Sender<usize>>;

/// Counts one piece of work in its [`Counter`] while it lives.
struct Counted(Counter);

impl Counted {
    fn new(counter: &Counter) -> Self {
        counter.send_modify(|n| *n += 1);
        Self(counter.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Where a chunk is, for read-ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Whereabouts {
    /// In memory or being loaded: nothing to do.
    Near,
    /// In a local tier.
    Local,
    /// Only in the shared tier or the source.
    Far,
}

/// One chunk, once a load or a fetch produces it; shared by everyone who waits for it.
type ChunkFuture = Shared<BoxFuture<'static, Result<Bytes, Arc<Error>>>>;

/// Where a fetch hands each decoded chunk: to whoever waits for it.
type ChunkSender = tokio::sync::oneshot::Sender<Result<Bytes, Arc<Error>>>;

/// What [`ChunkStore::read_now`] made of a read it could start.
pub enum ReadNow {
    /// Read, right away.
    Done(Result<Bytes>),
    /// Started, and waiting after all: spawn it to finish it.
    Later(BoxFuture<'static, Result<Bytes>>),
}

impl std::fmt::Debug for ReadNow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Done(r) => f.debug_tuple("Done").field(r).finish(),
            Self::Later(_) => f.write_str("Later(..)"),
        }
    }
}

/// Reads chunks of one image through the tiers.
pub struct ChunkStore<S> {
    index: Arc<ImageIndex>,
    reader: RangeReader<S>,
    memory: MemoryCache,
    tiers: Vec<Arc<dyn ChunkCache>>,
    /// Source fetches in flight: one future per chunk of their run, resolved as soon as
    /// that chunk is decoded.
    inflight: Mutex<HashMap<(usize, u32), ChunkFuture>>,
    /// Chunk loads in flight (tiers, then the source): concurrent readers of one chunk
    /// share one disk read and one verification.
    loading: Mutex<HashMap<(usize, u32), ChunkFuture>>,
    permits: Arc<Semaphore>,
    /// Source fetches for readers (their misses and read-ahead) in flight: the whole-image
    /// prefetch starts a run only when there are none.
    reading: Counter,
    last_chunk: Mutex<HashMap<usize, u32>>,
    /// Cluster-wide single-flight of registry fetches, when Redis is configured.
    lease: Option<Arc<RedisCache>>,
    /// Background writes to the tiers not finished yet.
    pending_puts: Counter,
    config: StoreConfig,
    stats: Arc<StoreStats>,
    /// The chunks readers asked for first (a start-up profile, for a later mount).
    pub(crate) recorder: crate::profile::Recorder,
    /// The profile this store replayed (empty when there was none to replay), once it has.
    replayed: tokio::sync::watch::Sender<Option<Arc<crate::profile::Profile>>>,
    /// Whole files for passthrough, when kept ([`Self::keep_whole_files`]).
    pub(crate) whole: std::sync::OnceLock<crate::whole::WholeFiles>,
}

impl<S> std::fmt::Debug for ChunkStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkStore")
            .field(
                "tiers",
                &self.tiers.iter().map(|t| t.name()).collect::<Vec<_>>(),
            )
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S: BlobSource> ChunkStore<S> {
    /// A store over `tiers` (fastest first) and `source`. With `lease`, registry fetches are
    /// coordinated across nodes through that Redis cluster.
    pub fn new(
        index: Arc<ImageIndex>,
        source: Arc<S>,
        tiers: Vec<Arc<dyn ChunkCache>>,
        lease: Option<Arc<RedisCache>>,
        config: StoreConfig,
    ) -> Arc<Self> {
        let names: Vec<&'static str> = tiers.iter().map(|t| t.name()).collect();
        Arc::new(Self {
            reader: RangeReader::new(index.clone(), source),
            index,
            memory: MemoryCache::new(config.memory_bytes),
            tiers,
            inflight: Mutex::new(HashMap::new()),
            loading: Mutex::new(HashMap::new()),
            permits: Arc::new(Semaphore::new(config.fetch_concurrency.max(1))),
            reading: Arc::new(tokio::sync::watch::Sender::new(0)),
            last_chunk: Mutex::new(HashMap::new()),
            lease,
            pending_puts: Arc::new(tokio::sync::watch::Sender::new(0)),
            stats: Arc::new(StoreStats::new(&names)),
            config,
            recorder: crate::profile::Recorder::default(),
            replayed: tokio::sync::watch::Sender::new(None),
            whole: std::sync::OnceLock::new(),
        })
    }

    pub fn index(&self) -> &Arc<ImageIndex> {
        &self.index
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    pub fn stats(&self) -> &Arc<StoreStats> {
        &self.stats
    }

    /// Counters of the store and every tier's events.
    pub fn snapshot(&self) -> crate::stats::StatsSnapshot {
        let mut events = Vec::new();
        for t in &self.tiers {
            for (event, v) in t.counters() {
                events.push((t.name().to_owned(), event.to_owned(), v));
            }
        }
        self.stats.snapshot_with(events)
    }

    fn layer(&self, layer: usize) -> Result<&LayerIndex> {
        self.index
            .layers
            .get(layer)
            .ok_or(Error::NoSuchLayer(layer))
    }

    pub(crate) fn key(&self, layer: usize, c: u32) -> Result<ChunkKey> {
        let l = self.layer(layer)?;
        let chunk = l.chunks.get(c as usize).ok_or(Error::NoSuchLayer(layer))?;
        let r = l.chunk_range(c);
        Ok(ChunkKey {
            digest: chunk.digest,
            len: (r.end - r.start) as u32,
        })
    }

    /// Exactly `len` bytes at uncompressed `offset` of `layer`; read-ahead follows the layer.
    pub async fn read(self: &Arc<Self>, layer: usize, offset: u64, len: u64) -> Result<Bytes> {
        self.read_in_file(layer, offset, len, u64::MAX).await
    }

    /// Exactly `len` bytes at uncompressed `offset` of `layer`, for a reader of a file that
    /// ends at layer offset `file_end`: read-ahead stops at the file's end, since the next
    /// file in the layer is rarely the next one a program reads.
    pub async fn read_in_file(
        self: &Arc<Self>,
        layer: usize,
        offset: u64,
        len: u64,
        file_end: u64,
    ) -> Result<Bytes> {
        let started = Instant::now();
        let result = self.read_inner(layer, offset, len, file_end).await;
        self.stats.read_latency.observe(started.elapsed());
        if result.is_err() {
            self.stats
                .read_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        result
    }

    /// Whether every chunk holding the `len` bytes at `offset` of `layer` is in memory or
    /// in a local tier with no fetch or load of it under way (which `whereabouts` calls
    /// near, like memory: that would be a wait), so that reading them costs at most local
    /// disk reads.
    pub fn is_local(&self, layer: usize, offset: u64, len: u64) -> bool {
        let Ok(l) = self.layer(layer) else {
            return false;
        };
        let Ok(chunks) = l.chunks_covering(offset, len) else {
            return false;
        };
        chunks.into_iter().all(|c| {
            self.key(layer, c).is_ok_and(|key| {
                self.memory.contains(&key.digest)
                    || self.whereabouts(layer, c).now_or_never() == Some(Whereabouts::Local)
            })
        })
    }

    /// [`Self::read_in_file`] without waiting, when every chunk it needs is in memory or in
    /// a local tier and no fetch or load of them is under way, so that it costs at most
    /// local disk reads: polled once here, it is [`ReadNow::Done`], or [`ReadNow::Later`] in
    /// the rare race (a chunk evicted meanwhile) that leaves it waiting, for the caller to
    /// spawn. `None` (nothing started) otherwise. For a caller on a thread that must not
    /// wait for the network, such as a FUSE worker, which saves the hand-over to the
    /// runtime that an async read takes. Call it inside the runtime's context
    /// ([`tokio::runtime::Handle::enter`]): a read may start read-ahead.
    pub fn read_now(
        self: &Arc<Self>,
        layer: usize,
        offset: u64,
        len: u64,
        file_end: u64,
    ) -> Option<ReadNow> {
        if !self.is_local(layer, offset, len) {
            return None;
        }
        let this = self.clone();
        let mut read: BoxFuture<'static, Result<Bytes>> =
            Box::pin(async move { this.read_in_file(layer, offset, len, file_end).await });
        let waker = futures::task::noop_waker();
        match read
            .as_mut()
            .poll(&mut std::task::Context::from_waker(&waker))
        {
            std::task::Poll::Ready(result) => Some(ReadNow::Done(result)),
            std::task::Poll::Pending => Some(ReadNow::Later(read)),
        }
    }

    async fn read_inner(
        self: &Arc<Self>,
        layer: usize,
        offset: u64,
        len: u64,
        file_end: u64,
    ) -> Result<Bytes> {
        let l = self.layer(layer)?;
        let chunks = l.chunks_covering(offset, len)?;
        if chunks.is_empty() {
            return Ok(Bytes::new());
        }
        self.recorder.note(layer, chunks.clone());
        self.recorder.note_read(crate::profile::FileRead {
            layer,
            offset,
            len,
            whole: false,
        });
        let end = file_end.min(l.uncompressed_size).max(offset + len);
        let last = l.chunks_covering(end - 1, 1)?.start;
        self.note_access(layer, chunks.end - 1, last);
        let mut parts =
            futures::future::try_join_all(chunks.map(|c| self.part(layer, c, offset, len))).await?;
        if parts.len() == 1 {
            return Ok(parts.remove(0));
        }
        let mut out = bytes::BytesMut::with_capacity(len as usize);
        for p in parts {
            out.extend_from_slice(&p);
        }
        Ok(out.freeze())
    }

    /// The bytes of `offset..offset + len` of `layer` that lie in chunk `c`.
    async fn part(self: &Arc<Self>, layer: usize, c: u32, offset: u64, len: u64) -> Result<Bytes> {
        let Range {
            start: from,
            end: to,
        } = self.bytes_in_chunk(layer, c, offset, len)?;
        if let Some(b) = self.partial(layer, c, from..to).await {
            return Ok(b);
        }
        Ok(self
            .chunk(layer, c)
            .await?
            .slice(from as usize..to as usize))
    }

    /// Where the bytes of `offset..offset + len` of `layer` that lie in chunk `c` are in
    /// that chunk.
    pub(crate) fn bytes_in_chunk(
        &self,
        layer: usize,
        c: u32,
        offset: u64,
        len: u64,
    ) -> Result<Range<u32>> {
        let r = self.layer(layer)?.chunk_range(c);
        // Both fit in u32 (a chunk is at most chunk_size, a u32, long) unless the range
        // misses the chunk.
        let within = |at: u64| {
            u32::try_from(at.clamp(r.start, r.end) - r.start)
                .map_err(|_| Error::Task(format!("chunk {c} of layer {layer} too long")))
        };
        Ok(within(offset)?..within(offset + len)?)
    }

    /// A small read of chunk `c` (bytes `want` of it) served from part of the chunk in a
    /// tier (a `pread` of the disk file, a Redis GETRANGE): a few KiB read and checked
    /// instead of the whole chunk, by the disk tier's own block checksums or against the
    /// index's block digests (so a tier that checks its own serves indexes without block
    /// digests too). `None` means the whole-chunk path serves it: the read is large,
    /// the chunk is in memory or on its way, no tier has it, or what a tier had did not
    /// match (the whole-chunk path then verifies the chunk, discards the damaged copy and
    /// fetches it again).
    async fn partial(self: &Arc<Self>, layer: usize, c: u32, want: Range<u32>) -> Option<Bytes> {
        let l = self.layer(layer).ok()?;
        let r = l.chunk_range(c);
        if u64::from(want.end - want.start) * 4 > r.end - r.start {
            return None;
        }
        let key = self.key(layer, c).ok()?;
        if self.is_near(layer, c, &key) {
            return None;
        }
        let len = (want.end - want.start) as usize;
        for (i, tier) in self.tiers.iter().enumerate() {
            if tier.is_local() && !tier.contains(&key).await {
                continue;
            }
            let bytes = if tier.checks_ranges() {
                match self.range_from(tier, &key, want.clone()).await {
                    Some(bytes) => bytes,
                    // A local copy it cannot read in part (an old file without checksums,
                    // or one found damaged and dropped): the whole-chunk path reads,
                    // verifies and repairs it, or fetches it again.
                    None if tier.is_local() => return None,
                    None => continue,
                }
            } else {
                let Some((span, first_block)) = l.block_span(c, want.clone()) else {
                    continue;
                };
                let blocks = match l.chunk_blocks(c) {
                    Ok(blocks) => blocks,
                    Err(e) => {
                        warn!(layer, chunk = c, error = %e, "no block digests; reading the whole chunk");
                        return None;
                    }
                };
                let Some(blocks) = blocks.get(first_block..) else {
                    continue;
                };
                let Some(bytes) = self.range_from(tier, &key, span.clone()).await else {
                    continue;
                };
                let matches = bytes
                    .chunks(l.block_size as usize)
                    .zip(blocks)
                    .all(|(b, d)| clip_index::Digest::of(b) == *d);
                if !matches {
                    warn!(
                        tier = tier.name(),
                        layer,
                        chunk = c,
                        "part of a chunk does not match its block digests; reading the whole chunk"
                    );
                    return None;
                }
                let at = (want.start - span.start) as usize;
                bytes.slice(at..at + len)
            };
            if bytes.len() != len {
                return None;
            }
            self.stats.tiers[i].1.bytes.fetch_add(
                (want.end - want.start).into(),
                std::sync::atomic::Ordering::Relaxed,
            );
            self.stats
                .range_reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Some(bytes);
        }
        None
    }

    /// Bytes `range` of a chunk from one tier, timed; `None` on a miss or an error.
    async fn range_from(
        &self,
        tier: &Arc<dyn ChunkCache>,
        key: &ChunkKey,
        range: Range<u32>,
    ) -> Option<Bytes> {
        self.timed(tier.name(), tier.get_range(key, range))
            .await
            .ok()
            .flatten()
    }

    /// Runs a tier's lookup and records how long it took in the tier's latency histogram.
    async fn timed<T>(&self, tier: &str, work: impl std::future::Future<Output = T>) -> T {
        let asked = Instant::now();
        let got = work.await;
        if let Some(h) = self.stats.tier_latency(tier) {
            h.observe(asked.elapsed());
        }
        got
    }

    /// One verified chunk, from the fastest tier that has it.
    pub async fn chunk(self: &Arc<Self>, layer: usize, c: u32) -> Result<Bytes> {
        self.chunk_for(layer, c, false).await
    }

    /// [`Self::chunk`], for a reader (`ahead` false) or ahead of one (counted as prefetched).
    async fn chunk_for(self: &Arc<Self>, layer: usize, c: u32, ahead: bool) -> Result<Bytes> {
        let key = self.key(layer, c)?;
        if let Some(b) = self.memory.get(&key.digest) {
            self.stats.memory.add(b.len());
            return Ok(b);
        }
        let load = {
            let mut loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
            match loading.get(&(layer, c)) {
                Some(f) => f.clone(),
                None => {
                    let this = self.clone();
                    let f = async move {
                        let r = this.load(layer, c, key, ahead).await;
                        this.loading
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&(layer, c));
                        r.map_err(Arc::new)
                    }
                    .boxed()
                    .shared();
                    loading.insert((layer, c), f.clone());
                    f
                }
            }
        };
        load.await.map_err(Error::Shared)
    }

    /// One chunk from a source fetch already under way, the cache tiers, or a new fetch.
    async fn load(
        self: &Arc<Self>,
        layer: usize,
        c: u32,
        key: ChunkKey,
        ahead: bool,
    ) -> Result<Bytes> {
        let pending = self.lock_inflight().get(&(layer, c)).cloned();
        if let Some(chunk) = pending {
            return chunk.await.map_err(Error::Shared);
        }
        for (i, tier) in self.tiers.iter().enumerate() {
            match self.timed(tier.name(), tier.get(&key)).await {
                Ok(Some(b)) => {
                    self.stats.tiers[i].1.add(b.len());
                    if ahead {
                        self.stats
                            .preloaded_chunks
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    self.memory.put(key.digest, b.clone());
                    for upper in &self.tiers[..i] {
                        self.spawn_put(upper.clone(), key, b.clone());
                    }
                    return Ok(b);
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(tier = tier.name(), error = %e, "cache tier failed; trying the next")
                }
            }
        }
        let run = self.miss_run(layer, c)?;
        let chunk = self
            .fetch(layer, run.clone(), ahead, true)
            .into_iter()
            .nth((c - run.start) as usize)
            .ok_or_else(|| Error::Task(format!("chunk {c} missing from its run")))?;
        chunk.await.map_err(Error::Shared)
    }

    fn lock_inflight(&self) -> std::sync::MutexGuard<'_, HashMap<(usize, u32), ChunkFuture>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts (or joins) the source fetch of `chunks`; one future per chunk, each resolved
    /// as soon as its chunk is decoded and verified. `for_reader`: a read or its read-ahead
    /// wants it (counted in [`Self::reading`] while it runs), not the whole-image prefetch.
    fn fetch(
        self: &Arc<Self>,
        layer: usize,
        chunks: Range<u32>,
        ahead: bool,
        for_reader: bool,
    ) -> Vec<ChunkFuture> {
        let mut inflight = self.lock_inflight();
        let joined: Option<Vec<ChunkFuture>> = chunks
            .clone()
            .map(|c| inflight.get(&(layer, c)).cloned())
            .collect();
        if let Some(all) = joined {
            return all;
        }
        let mut senders = Vec::with_capacity(chunks.len());
        let mut mine = Vec::new();
        let mut futures = Vec::with_capacity(chunks.len());
        for c in chunks.clone() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let fut = async move {
                rx.await.unwrap_or_else(|_| {
                    Err(Arc::new(Error::Task(
                        "a fetch ended without its chunk".into(),
                    )))
                })
            }
            .boxed()
            .shared();
            senders.push(Some(tx));
            // A chunk already in flight in another fetch stays with it.
            let entry = inflight.entry((layer, c)).or_insert_with(|| {
                mine.push(c);
                fut.clone()
            });
            futures.push(entry.clone());
        }
        drop(inflight);
        let this = self.clone();
        // Counted until the chunks are in the local tiers too (after their waiters got them).
        let pending = Counted::new(&self.pending_puts);
        let reading = for_reader.then(|| Counted::new(&self.reading));
        tokio::spawn(async move {
            let _reading = reading;
            let result = this
                .fetch_run(layer, chunks.clone(), ahead, &mut senders)
                .await;
            if let Err(e) = result {
                let e = Arc::new(e);
                for tx in senders.iter_mut().filter_map(Option::take) {
                    let _ = tx.send(Err(e.clone()));
                }
            }
            let mut inflight = this.lock_inflight();
            for c in mine {
                inflight.remove(&(layer, c));
            }
            drop(pending);
        });
        futures
    }

    /// Produces a run of chunks for the waiters in `senders` (one per chunk): from Redis if
    /// another node is fetching it, else from the source under a cluster-wide lease.
    async fn fetch_run(
        self: &Arc<Self>,
        layer: usize,
        chunks: Range<u32>,
        ahead: bool,
        senders: &mut [Option<ChunkSender>],
    ) -> Result<()> {
        let Some(redis) = self.lease.clone() else {
            self.stream_from_source(layer, chunks, ahead, senders, None)
                .await?;
            return Ok(());
        };
        // One lease per checkpoint span: every fetch that decodes from the same checkpoint
        // (a miss, a read-ahead) on any node asks for the same lease.
        let span = self.span_run(layer, chunks.start)?;
        let name = format!("{}-{}", self.layer(layer)?.digest.hex(), span.start);
        match redis.try_lease(&name).await {
            Lease::HeldElsewhere => {
                if let Some(data) = self
                    .wait_for_peer(layer, chunks.clone(), &redis, &name)
                    .await
                {
                    self.deliver_from_redis(layer, chunks, data, senders).await;
                    return Ok(());
                }
                self.stream_from_source(layer, chunks, ahead, senders, None)
                    .await?;
                Ok(())
            }
            Lease::Acquired(token) => {
                // The holder before us may have published the span and let go between our
                // look in Redis and our lease: look again before going to the source.
                if let Some(data) = self.run_in_redis(layer, chunks.clone(), &redis).await {
                    redis.release_lease(&name, &token).await;
                    self.deliver_from_redis(layer, chunks, data, senders).await;
                    return Ok(());
                }
                let fetched = self
                    .stream_from_source(layer, chunks.clone(), ahead, senders, Some("redis"))
                    .await;
                let data = match fetched {
                    Ok(d) => d,
                    Err(e) => {
                        redis.release_lease(&name, &token).await;
                        return Err(e);
                    }
                };
                // Publish to Redis off the reader's path, then let waiting nodes go.
                let items: Vec<(ChunkKey, Bytes)> = chunks
                    .filter_map(|c| self.key(layer, c).ok())
                    .zip(data)
                    .collect();
                let pending = Counted::new(&self.pending_puts);
                tokio::spawn(async move {
                    for (k, b) in items {
                        if let Err(e) = redis.put(&k, b).await {
                            warn!(error = %e, "storing a chunk in redis failed");
                        }
                    }
                    redis.release_lease(&name, &token).await;
                    drop(pending);
                });
                Ok(())
            }
            Lease::Unavailable => {
                self.stream_from_source(layer, chunks, ahead, senders, None)
                    .await?;
                Ok(())
            }
        }
    }

    /// Another node holds lease `name`: poll Redis for the run's chunks, for at most the
    /// lease wait, and no longer than the lease lives (a holder that crashed or gave up lets
    /// the others go at once).
    async fn wait_for_peer(
        &self,
        layer: usize,
        chunks: Range<u32>,
        redis: &Arc<RedisCache>,
        name: &str,
    ) -> Option<Vec<Bytes>> {
        let deadline = Instant::now() + redis.lease_wait();
        while Instant::now() < deadline && !redis.is_degraded() {
            tokio::time::sleep(Duration::from_millis(25)).await;
            if let Some(data) = self.run_in_redis(layer, chunks.clone(), redis).await {
                redis
                    .stats
                    .lease_wait_hits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Some(data);
            }
            if !redis.lease_held(name).await {
                // Published just before the holder let go, or never: one last look.
                return self.run_in_redis(layer, chunks.clone(), redis).await;
            }
        }
        None
    }

    /// Every chunk of a run from Redis (verified), if its last one is there already (the
    /// publisher writes them in order).
    async fn run_in_redis(
        &self,
        layer: usize,
        chunks: Range<u32>,
        redis: &Arc<RedisCache>,
    ) -> Option<Vec<Bytes>> {
        let last = self.key(layer, chunks.end - 1).ok()?;
        if !redis.contains(&last).await {
            return None;
        }
        let mut data = Vec::with_capacity(chunks.len());
        for c in chunks {
            let key = self.key(layer, c).ok()?;
            match redis.get(&key).await {
                Ok(Some(b)) => data.push(b),
                _ => return None,
            }
        }
        if let Some(i) = self.stats.tiers.iter().position(|(n, _)| *n == "redis") {
            for b in &data {
                self.stats.tiers[i].1.add(b.len());
            }
        }
        Some(data)
    }

    /// One bounded source fetch of a run, decoded as it arrives: each chunk goes to its
    /// waiter, memory and the tiers but `skip` as soon as it is verified. Returns the run's
    /// chunks when a tier was skipped (the caller publishes them there), else nothing: the
    /// fetch holds no more of the run than its waiters and the memory tier do.
    async fn stream_from_source(
        &self,
        layer: usize,
        chunks: Range<u32>,
        ahead: bool,
        senders: &mut [Option<ChunkSender>],
        skip: Option<&str>,
    ) -> Result<Vec<Bytes>> {
        let _permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| Error::Task(e.to_string()))?;
        // Count this fetch's own bytes: the reader's totals are shared by concurrent fetches.
        let planned = self.layer(layer)?.plan(chunks.clone()).compressed;
        let started = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let decode = self
            .reader
            .stream_chunks(layer, chunks.clone(), move |c, b| {
                // The receiver lives until the decode ends.
                let _ = tx.send((c, b));
            });
        let deliver = async {
            let mut run = Vec::with_capacity(chunks.len());
            while let Some((c, b)) = rx.recv().await {
                self.stats.source.add(b.len());
                if ahead {
                    self.stats
                        .prefetched_chunks
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let mut none = None;
                let tx = senders
                    .get_mut((c - chunks.start) as usize)
                    .unwrap_or(&mut none);
                self.deliver(layer, c, b.clone(), tx, skip).await;
                if skip.is_some() {
                    run.push(b);
                }
            }
            run
        };
        let (decoded, run) = tokio::join!(decode, deliver);
        if let Some(h) = self.stats.tier_latency("source") {
            h.observe(started.elapsed());
        }
        self.stats
            .source_requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.stats.source_bytes.fetch_add(
            planned.end.saturating_sub(planned.start),
            std::sync::atomic::Ordering::Relaxed,
        );
        decoded?;
        debug!(
            layer,
            ?chunks,
            ahead,
            "fetched a run of chunks from the source"
        );
        Ok(run)
    }

    /// Hands a verified chunk to its waiter, then keeps it in memory and every tier but
    /// `skip`: local tiers before the fetch is over (its in-flight entries stay until then,
    /// so no reader looks for the chunk in a tier too early), remote ones in the background
    /// (so they never delay the reader).
    async fn deliver(
        &self,
        layer: usize,
        c: u32,
        data: Bytes,
        waiter: &mut Option<ChunkSender>,
        skip: Option<&str>,
    ) {
        let Ok(key) = self.key(layer, c) else {
            return;
        };
        self.memory.put(key.digest, data.clone());
        if let Some(tx) = waiter.take() {
            let _ = tx.send(Ok(data.clone()));
        }
        for tier in &self.tiers {
            if Some(tier.name()) == skip {
                continue;
            }
            if tier.is_local() {
                if let Err(e) = tier.put(&key, data.clone()).await {
                    warn!(tier = tier.name(), error = %e, "storing a chunk failed");
                }
            } else {
                self.spawn_put(tier.clone(), key, data.clone());
            }
        }
    }

    /// [`Self::deliver`] for a run read from Redis (so not written back there).
    async fn deliver_from_redis(
        &self,
        layer: usize,
        chunks: Range<u32>,
        data: Vec<Bytes>,
        senders: &mut [Option<ChunkSender>],
    ) {
        for ((c, b), tx) in chunks.zip(data).zip(senders.iter_mut()) {
            self.deliver(layer, c, b, tx, Some("redis")).await;
        }
    }

    fn spawn_put(&self, tier: Arc<dyn ChunkCache>, key: ChunkKey, data: Bytes) {
        let pending = Counted::new(&self.pending_puts);
        tokio::spawn(async move {
            if let Err(e) = tier.put(&key, data).await {
                warn!(tier = tier.name(), error = %e, "storing a chunk failed");
            }
            drop(pending);
        });
    }

    /// Waits (at most `limit`) for fetches and background writes to the tiers to finish,
    /// so a process that stops leaves what it fetched in the caches.
    pub async fn flush(&self, limit: Duration) -> bool {
        // (The sender lives in `self`: the wait cannot fail.)
        let mut pending = self.pending_puts.subscribe();
        tokio::time::timeout(limit, pending.wait_for(|n| *n == 0))
            .await
            .is_ok()
    }

    /// The chunks that share chunk `c`'s checkpoint: decoding them costs one fetch.
    pub fn span_run(&self, layer: usize, c: u32) -> Result<Range<u32>> {
        Ok(self.layer(layer)?.span_run(c))
    }

    /// What a miss on chunk `c` fetches. gzip: the whole span run, so every compressed byte
    /// is fetched once and later misses in the run are hits. zstd (few or no checkpoints):
    /// from the run's start up to `c` only, since decoding must start there anyway and the
    /// rest of a single-frame layer may be the whole image.
    fn miss_run(&self, layer: usize, c: u32) -> Result<Range<u32>> {
        let run = self.span_run(layer, c)?;
        match self.layer(layer)?.compression {
            Compression::Zstd => Ok(run.start..c + 1),
            _ => Ok(run),
        }
    }

    /// Sequential readers get the next spans fetched ahead of them, up to chunk `last` (the
    /// end of the file they read), and the next chunks on local disk read into memory.
    fn note_access(self: &Arc<Self>, layer: usize, c: u32, last: u32) {
        let prev = {
            let mut last = self.last_chunk.lock().unwrap_or_else(|p| p.into_inner());
            last.insert(layer, c)
        };
        // Only on entering the next chunk: the kernel asks for a chunk in several reads.
        let sequential = prev.is_some_and(|p| p + 1 == c);
        if !sequential {
            return;
        }
        // Drop-behind: the chunk left behind goes before the chunks read ahead (not the one
        // just before c: a read that straddles the boundary still wants it).
        if let Some(Ok(key)) = c.checked_sub(2).map(|b| self.key(layer, b)) {
            self.memory.demote(&key.digest);
        }
        if c >= last {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let Ok(l) = this.layer(layer) else { return };
            let end = (last + 1).min(l.chunks.len() as u32);
            // Whole spans, like a miss fetches: the same fetch on every node, so the in-flight
            // map and the cluster-wide lease recognise it.
            let spans = l
                .span_runs(c + 1..end)
                .take(this.config.readahead_runs)
                .collect();
            let preload = c + 1..(c + 1 + this.config.preload_chunks).min(end);
            this.bring(layer, spans, preload).await;
        });
    }

    /// A file occupying `extent` of `layer` was opened: fetch the spans of its first
    /// `open_prefetch_bytes` that no local tier holds, all at once, before its reads ask.
    /// A program that opens a file almost always reads it, and over a long round trip one
    /// parallel fetch at open beats a miss per read.
    pub fn opened(self: &Arc<Self>, layer: usize, extent: Range<u64>) {
        let Ok(l) = self.layer(layer) else { return };
        let len = (extent.end.saturating_sub(extent.start)).min(self.config.open_prefetch_bytes);
        let Ok(chunks) = l.chunks_covering(extent.start, len) else {
            return;
        };
        // On a warm cache there is nothing to bring: answered here, which spares the opener
        // the wake-up of a runtime thread on every open.
        let local = |c| {
            matches!(
                self.whereabouts(layer, c).now_or_never(),
                Some(Whereabouts::Near | Whereabouts::Local)
            )
        };
        if chunks.clone().all(local) {
            return;
        }
        let spans = l.span_runs(chunks).collect();
        let this = self.clone();
        tokio::spawn(async move { this.bring(layer, spans, 0..0).await });
    }

    /// The chunks and reads readers have asked for so far, first touch first (see
    /// [`crate::profile`]).
    pub fn recorded_profile(&self) -> crate::profile::Profile {
        let mut p = self.recorder.recorded();
        p.paths = self.recorder.recorded_paths(&self.index);
        p
    }

    /// A reader looked up `name` in directory `dir` (an inode of the index): recorded for
    /// the start-up profile.
    pub fn note_lookup(&self, dir: u64, name: &[u8]) {
        self.recorder.note_lookup(dir, name);
    }

    /// The profile this store replayed ([`Self::replay`]; empty if there was none), waiting
    /// up to `wait` for it to be known; nothing if it is not by then.
    pub async fn replayed_profile(&self, wait: Duration) -> Option<Arc<crate::profile::Profile>> {
        let mut rx = self.replayed.subscribe();
        let known = tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await;
        known.ok()?.ok()?.clone()
    }

    /// When this store stops recording its start-up profile (none before its first read).
    pub fn profile_window_end(&self) -> Option<Instant> {
        self.recorder.window_end()
    }

    /// The profile to leave for the next mount: what was recorded, then what the replayed
    /// profile named besides ([`crate::profile::merge`]); empty when nothing was read.
    pub fn profile_to_save(&self) -> crate::profile::Profile {
        let recorded = self.recorded_profile();
        if recorded.is_empty() {
            return recorded;
        }
        let replayed = self.replayed.borrow().clone().unwrap_or_default();
        crate::profile::merge(&recorded, &replayed)
    }

    /// Replays a start-up profile: fetches the spans holding its chunks that no local tier
    /// holds, `readahead_runs` at a time, so that a program reading them finds them
    /// fetched or on their way (the other fetch permits stay free for reads the profile
    /// did not foresee; spans are taken in order while their decoded bytes fit in `budget`,
    /// a share of the disk cache, so a profile never evicts what it brought); and has the
    /// bytes of its reads that are on local disk read into the kernel's page cache
    /// ([`Self::warm_up`]). Returns at once; the work goes on in the background. Mounts
    /// learn the profile from [`Self::replayed_profile`] (an empty one when there is none
    /// to replay).
    pub fn replay(self: &Arc<Self>, profile: &crate::profile::Profile, budget: u64) {
        self.replayed.send_replace(Some(Arc::new(profile.clone())));
        self.warm_up(profile.reads_to_bring(), budget);
        let chunks = &profile.chunks;
        // The profile's chunks grouped by span, spans in the order the profile first wants
        // them.
        let mut spans: Vec<(usize, Vec<u32>)> = Vec::new();
        let mut at: HashMap<(usize, u32), usize> = HashMap::new();
        let mut planned = 0u64;
        for &(layer, c) in chunks {
            let (Ok(run), Ok(l)) = (self.span_run(layer, c), self.layer(layer)) else {
                continue;
            };
            match at.get(&(layer, run.start)) {
                Some(&i) => spans[i].1.push(c),
                None => {
                    let bytes = l.chunk_range(run.end.saturating_sub(1)).end
                        - l.chunk_range(run.start).start;
                    if planned + bytes > budget {
                        continue;
                    }
                    planned += bytes;
                    at.insert((layer, run.start), spans.len());
                    spans.push((layer, vec![c]));
                }
            }
        }
        if spans.is_empty() {
            return;
        }
        // Weak: a store whose last reader went does not live on to finish the profile.
        let weak = Arc::downgrade(self);
        let width = self.config.readahead_runs.max(1);
        tokio::spawn(async move {
            use futures::StreamExt;
            futures::stream::iter(spans)
                .map(|(layer, mut wanted)| {
                    let weak = weak.clone();
                    async move {
                        // Last chunk first: a miss on it fetches the whole span (zstd: up
                        // to it), after which the others are near; from Redis each comes
                        // on its own.
                        wanted.sort_unstable_by(|a, b| b.cmp(a));
                        for c in wanted {
                            let Some(this) = weak.upgrade() else {
                                return;
                            };
                            if this.whereabouts(layer, c).await != Whereabouts::Far {
                                continue;
                            }
                            if let Err(e) = this.chunk_for(layer, c, true).await {
                                debug!(layer, chunk = c, error = %e, "start-up profile fetch failed");
                                return;
                            }
                        }
                    }
                })
                .buffer_unordered(width)
                .collect::<Vec<()>>()
                .await;
        });
    }

    /// Has the bytes of `reads` (a start-up profile's, first wanted first, as
    /// [`crate::profile::Profile::reads_to_bring`] leaves them: reads whose bytes a file kept
    /// whole holds are left to it) that are on local disk read into the kernel's page cache
    /// ahead of the program, up to `budget` bytes (and [`WARM_UP_LIMIT`]): the blocks of the
    /// chunk files they lie in, and the heads of the files kept whole
    /// ([`StoreConfig::open_prefetch_bytes`]; their check at their first open in this
    /// process, when one is due, then happens here, off the program's path). The kernel is asked
    /// (`posix_fadvise(WILLNEED)`) without waiting, from a blocking thread; nothing is
    /// fetched, kept in memory or recorded. With every byte of a warm start-up in the page
    /// cache, the program's opens and reads wait for no disk.
    fn warm_up(self: &Arc<Self>, reads: Vec<crate::profile::FileRead>, budget: u64) {
        if reads.is_empty() {
            return;
        }
        let budget = budget.min(WARM_UP_LIMIT);
        let weak = Arc::downgrade(self);
        tokio::task::spawn_blocking(move || {
            let mut planned = 0u64;
            for r in reads {
                let Some(this) = weak.upgrade() else {
                    return;
                };
                if planned.saturating_add(r.len) > budget {
                    return;
                }
                if r.whole {
                    // Which bytes of it the program read, the kernel alone knows: its head
                    // only, or a program wanting a little of a large file would wait for a
                    // disk busy reading all of it.
                    let head = r.len.min(this.config.open_prefetch_bytes);
                    if let Some(file) = this.kept_whole(r.layer, r.offset, r.len)
                        && head > 0
                    {
                        crate::cache::disk::will_need(&file, 0, head);
                        planned += head;
                    }
                    continue;
                }
                for (key, part) in this.parts(r.layer, r.offset, r.len).unwrap_or_default() {
                    if this.memory.contains(&key.digest) {
                        continue;
                    }
                    let asked = this
                        .tiers
                        .iter()
                        .filter(|t| t.is_local())
                        .any(|t| t.warm(&key, part.clone()));
                    if asked {
                        planned += u64::from(part.end - part.start);
                    }
                }
            }
        });
    }

    /// Brings chunks closer ahead of a reader: the chunks of `spans` that no local tier holds
    /// from the shared tier or the source (the spans concurrently, `readahead_runs` at a
    /// time; a miss fetches its whole span), and the chunks of `preload` that are on local
    /// disk into memory.
    async fn bring(self: &Arc<Self>, layer: usize, spans: Vec<Range<u32>>, preload: Range<u32>) {
        use futures::StreamExt;
        let mut remote: Vec<Vec<u32>> = Vec::new();
        let mut local = Vec::new();
        for span in spans {
            let mut missing = Vec::new();
            for c in span {
                match self.whereabouts(layer, c).await {
                    Whereabouts::Near => {}
                    Whereabouts::Local if preload.contains(&c) => local.push(c),
                    Whereabouts::Local => {}
                    Whereabouts::Far => missing.push(c),
                }
            }
            if !missing.is_empty() {
                remote.push(missing);
            }
        }
        for c in preload {
            if !local.contains(&c) && self.whereabouts(layer, c).await == Whereabouts::Local {
                local.push(c);
            }
        }
        let width = self.config.readahead_runs.max(1);
        let remote = futures::stream::iter(remote)
            .map(|chunks| async move {
                // One after the other within a span: the first miss fetches the whole span,
                // the rest find it in memory.
                for c in chunks {
                    if let Err(e) = self.chunk_for(layer, c, true).await {
                        debug!(layer, chunk = c, error = %e, "read-ahead failed");
                        return;
                    }
                }
            })
            .buffer_unordered(width)
            .collect::<Vec<()>>();
        let local = futures::stream::iter(local)
            .map(|c| async move {
                if let Err(e) = self.chunk_for(layer, c, true).await {
                    debug!(layer, chunk = c, error = %e, "preload failed");
                }
            })
            .buffer_unordered(2)
            .collect::<Vec<()>>();
        futures::future::join(remote, local).await;
    }

    /// Whether chunk `c` is in memory or on its way there (being loaded or fetched).
    fn is_near(&self, layer: usize, c: u32, key: &ChunkKey) -> bool {
        self.memory.contains(&key.digest)
            || self.lock_inflight().contains_key(&(layer, c))
            || self
                .loading
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&(layer, c))
    }

    /// Where chunk `c` is now, as far as read-ahead cares.
    async fn whereabouts(&self, layer: usize, c: u32) -> Whereabouts {
        let Ok(key) = self.key(layer, c) else {
            return Whereabouts::Near;
        };
        if self.is_near(layer, c, &key) {
            return Whereabouts::Near;
        }
        for t in self.tiers.iter().filter(|t| t.is_local()) {
            if t.contains(&key).await {
                return Whereabouts::Local;
            }
        }
        Whereabouts::Far
    }

    /// Whether every chunk of `run` is already in memory, in flight or in a tier.
    async fn cached(&self, layer: usize, run: Range<u32>) -> bool {
        for c in run {
            let Ok(key) = self.key(layer, c) else {
                return true;
            };
            if self.memory.get(&key.digest).is_some()
                || self.lock_inflight().contains_key(&(layer, c))
            {
                continue;
            }
            let mut found = false;
            for t in &self.tiers {
                if t.contains(&key).await {
                    found = true;
                    break;
                }
            }
            if !found {
                return false;
            }
        }
        true
    }

    /// Fetches every chunk of the image that no tier holds, `parallel` runs at a time.
    /// For `--prefetch`: the whole image lands in the caches at low priority. A run starts
    /// only while no reader's fetch is in flight, so reads have the link to themselves (the
    /// runs already under way finish).
    pub async fn prefetch_all(self: &Arc<Self>, parallel: usize) -> Result<u64> {
        let mut runs = Vec::new();
        for (layer, l) in self.index.layers.iter().enumerate() {
            runs.extend(
                l.span_runs(0..l.chunks.len() as u32)
                    .map(|run| (layer, run)),
            );
        }
        use futures::StreamExt;
        let mut fetched = 0u64;
        let mut results = futures::stream::iter(runs)
            .map(|(layer, run)| async move {
                // Readers first (the sender lives in `self`: the wait cannot fail); then
                // whatever they fetched meanwhile is cached.
                let _ = self.reading.subscribe().wait_for(|n| *n == 0).await;
                if self.cached(layer, run.clone()).await {
                    return Ok(0);
                }
                let n = run.len() as u64;
                futures::future::try_join_all(self.fetch(layer, run, true, false))
                    .await
                    .map_err(Error::Shared)?;
                Ok::<u64, Error>(n)
            })
            .buffer_unordered(parallel.max(1));
        while let Some(r) = results.next().await {
            fetched += r?;
        }
        // Readers get chunks before the tiers do: wait until the tiers have them all.
        while !self.flush(std::time::Duration::from_secs(60)).await {}
        Ok(fetched)
    }
}
