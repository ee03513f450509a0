//! The local disk chunk cache: one file per chunk named by its digest, written to a temporary
//! file and renamed into place (a crash leaves no half-written chunk under a real name),
//! verified on every read, capped in size with least-recently-used eviction that never
//! removes a chunk while it is being read.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use clip_index::Digest;
use futures::FutureExt;
use futures::future::BoxFuture;
use tracing::{debug, warn};

use super::{ChunkCache, ChunkKey};
use crate::error::{Error, Result};

#[derive(Debug)]
struct Entry {
    size: u64,
    tick: u64,
    pins: u32,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<Digest, Entry>,
    order: BTreeMap<u64, Digest>,
    tick: u64,
    bytes: u64,
}

/// Counters of what the disk cache did.
#[derive(Debug, Default)]
pub struct DiskStats {
    pub corrupt: AtomicU64,
    pub evicted: AtomicU64,
    /// Chunks not stored because every other chunk was being read and the cap was reached.
    pub skipped: AtomicU64,
}

/// Chunks on local disk under `dir`, at most `capacity` bytes.
#[derive(Debug)]
pub struct DiskCache {
    dir: PathBuf,
    capacity: u64,
    state: Mutex<State>,
    temp_seq: AtomicU64,
    pub stats: DiskStats,
}

impl DiskCache {
    /// Opens (or creates) a cache directory and takes stock of what it holds.
    pub fn open(dir: &Path, capacity: u64) -> Result<Self> {
        let io = |e: std::io::Error| Error::Cache {
            tier: "disk",
            detail: format!("{}: {e}", dir.display()),
        };
        std::fs::create_dir_all(dir.join("chunks")).map_err(io)?;
        let tmp = dir.join("tmp");
        // Leftovers of a crash are never valid chunks.
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io)?;
        }
        std::fs::create_dir_all(&tmp).map_err(io)?;
        let mut found = Vec::new();
        for shard in std::fs::read_dir(dir.join("chunks")).map_err(io)? {
            let shard = shard.map_err(io)?.path();
            let Ok(files) = std::fs::read_dir(&shard) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                let Ok(digest) = format!("sha256:{name}").parse::<Digest>() else {
                    std::fs::remove_file(f.path()).ok();
                    continue;
                };
                let Ok(meta) = f.metadata() else { continue };
                let used = meta.modified().ok();
                found.push((used, digest, meta.len()));
            }
        }
        found.sort_by_key(|(used, _, _)| *used);
        let cache = Self {
            dir: dir.to_owned(),
            capacity: capacity.max(1),
            state: Mutex::new(State::default()),
            temp_seq: AtomicU64::new(0),
            stats: DiskStats::default(),
        };
        {
            let mut s = cache.lock();
            for (_, digest, size) in found {
                s.tick += 1;
                let tick = s.tick;
                s.entries.insert(
                    digest,
                    Entry {
                        size,
                        tick,
                        pins: 0,
                    },
                );
                s.order.insert(tick, digest);
                s.bytes += size;
            }
        }
        cache.evict();
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.dir.join("chunks").join(&hex[..2]).join(hex)
    }

    /// Bytes of chunks on disk.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.lock().entries.contains_key(digest)
    }

    /// Marks a chunk used and pinned; `false` if absent.
    fn pin(&self, digest: &Digest) -> bool {
        let mut s = self.lock();
        s.tick += 1;
        let tick = s.tick;
        let Some(e) = s.entries.get_mut(digest) else {
            return false;
        };
        e.pins += 1;
        let old = std::mem::replace(&mut e.tick, tick);
        s.order.remove(&old);
        s.order.insert(tick, *digest);
        true
    }

    fn unpin(&self, digest: &Digest) {
        let evict = {
            let mut s = self.lock();
            match s.entries.get_mut(digest) {
                Some(e) => {
                    e.pins = e.pins.saturating_sub(1);
                    s.bytes > self.capacity
                }
                None => false,
            }
        };
        if evict {
            self.evict();
        }
    }

    fn forget(&self, digest: &Digest) {
        let mut s = self.lock();
        if let Some(e) = s.entries.remove(digest) {
            s.order.remove(&e.tick);
            s.bytes -= e.size;
        }
        drop(s);
        std::fs::remove_file(self.path(digest)).ok();
    }

    /// Removes least recently used, unpinned chunks until under the cap. The files go while
    /// the lock is held: a concurrent writer that counts on the freed space must not write
    /// its chunk before they are gone, or the directory would briefly exceed the cap.
    fn evict(&self) {
        let mut victims = Vec::new();
        let s = {
            let mut s = self.lock();
            let mut skipped = Vec::new();
            while s.bytes > self.capacity {
                let Some((tick, digest)) = s.order.pop_first() else {
                    break;
                };
                let pinned = s.entries.get(&digest).is_some_and(|e| e.pins > 0);
                if pinned {
                    skipped.push((tick, digest));
                    continue;
                }
                if let Some(e) = s.entries.remove(&digest) {
                    s.bytes -= e.size;
                    victims.push(digest);
                }
            }
            for (tick, digest) in skipped {
                s.order.insert(tick, digest);
            }
            s
        };
        for d in victims {
            self.stats.evicted.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = std::fs::remove_file(self.path(&d)) {
                debug!(digest = %d, error = %e, "evicted chunk file already gone");
            }
        }
        drop(s);
    }

    fn read_verified(&self, key: &ChunkKey) -> Option<Bytes> {
        let path = self.path(&key.digest);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "disk cache read failed");
                self.forget(&key.digest);
                return None;
            }
        };
        if data.len() != key.len as usize || Digest::of(&data) != key.digest {
            self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
            warn!(
                path = %path.display(),
                digest = %key.digest,
                "corrupt chunk in the disk cache; discarding it"
            );
            self.forget(&key.digest);
            return None;
        }
        Some(Bytes::from(data))
    }

    /// Bytes `range` of a chunk file of the right length (unverified: see `get_range`).
    fn read_part(&self, key: &ChunkKey, range: std::ops::Range<u32>) -> Option<Bytes> {
        use std::os::unix::fs::FileExt;
        let path = self.path(&key.digest);
        let file = std::fs::File::open(&path).ok()?;
        if file.metadata().ok()?.len() != u64::from(key.len) {
            return None;
        }
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        match file.read_exact_at(&mut buf, u64::from(range.start)) {
            Ok(()) => Some(Bytes::from(buf)),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "disk cache read failed");
                None
            }
        }
    }

    fn write(&self, key: &ChunkKey, data: &[u8]) -> Result<()> {
        let io = |e: std::io::Error| Error::Cache {
            tier: "disk",
            detail: format!("writing chunk {}: {e}", key.digest),
        };
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp =
            self.dir
                .join("tmp")
                .join(format!("{}.{}.{seq}", key.digest.hex(), std::process::id()));
        std::fs::write(&tmp, data).map_err(io)?;
        let dest = self.path(&key.digest);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        if let Err(e) = std::fs::rename(&tmp, &dest) {
            std::fs::remove_file(&tmp).ok();
            return Err(io(e));
        }
        Ok(())
    }
}

/// Runs file I/O without stalling other tasks on a multi-threaded runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl ChunkCache for DiskCache {
    fn get<'a>(&'a self, key: &'a ChunkKey) -> BoxFuture<'a, Result<Option<Bytes>>> {
        async move {
            if !self.pin(&key.digest) {
                return Ok(None);
            }
            let found = blocking(|| self.read_verified(key));
            self.unpin(&key.digest);
            Ok(found)
        }
        .boxed()
    }

    fn get_range<'a>(
        &'a self,
        key: &'a ChunkKey,
        range: std::ops::Range<u32>,
    ) -> BoxFuture<'a, Result<Option<Bytes>>> {
        async move {
            if range.end > key.len || !self.pin(&key.digest) {
                return Ok(None);
            }
            let found = blocking(|| self.read_part(key, range));
            self.unpin(&key.digest);
            Ok(found)
        }
        .boxed()
    }

    fn put<'a>(&'a self, key: &'a ChunkKey, data: Bytes) -> BoxFuture<'a, Result<()>> {
        async move {
            if u64::from(key.len) > self.capacity {
                return Ok(());
            }
            // Reserve the space (pinned) and evict first, so the directory never holds more
            // than the cap, not even while this chunk is being written.
            {
                let mut s = self.lock();
                if s.entries.contains_key(&key.digest) {
                    return Ok(());
                }
                s.tick += 1;
                let tick = s.tick;
                s.entries.insert(
                    key.digest,
                    Entry {
                        size: data.len() as u64,
                        tick,
                        pins: 1,
                    },
                );
                s.order.insert(tick, key.digest);
                s.bytes += data.len() as u64;
            }
            self.evict();
            // Everything else is being read (pinned): skip this chunk rather than exceed
            // the cap; it stays in memory and the next miss stores it.
            if self.lock().bytes > self.capacity {
                self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                self.forget(&key.digest);
                return Ok(());
            }
            let written = blocking(|| self.write(key, &data));
            if let Err(e) = written {
                self.forget(&key.digest);
                return Err(e);
            }
            self.unpin(&key.digest);
            Ok(())
        }
        .boxed()
    }

    fn contains<'a>(&'a self, key: &'a ChunkKey) -> BoxFuture<'a, bool> {
        futures::future::ready(self.contains(&key.digest)).boxed()
    }

    fn name(&self) -> &'static str {
        "disk"
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("verify_failure", self.stats.corrupt.load(Ordering::Relaxed)),
            ("evicted", self.stats.evicted.load(Ordering::Relaxed)),
            ("skipped_full", self.stats.skipped.load(Ordering::Relaxed)),
        ]
    }

    fn is_local(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(i: u8, len: usize) -> (ChunkKey, Bytes) {
        let data = Bytes::from(vec![i; len]);
        (
            ChunkKey {
                digest: Digest::of(&data),
                len: len as u32,
            },
            data,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stores_verifies_and_reopens() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (k, d) = chunk(1, 1000);
        {
            let c = DiskCache::open(dir.path(), 10_000)?;
            assert!(c.get(&k).await?.is_none());
            c.put(&k, d.clone()).await?;
            assert_eq!(c.get(&k).await?, Some(d.clone()));
        }
        let c = DiskCache::open(dir.path(), 10_000)?;
        assert_eq!(c.bytes(), 1000, "a reopened cache knows what it holds");
        assert_eq!(c.get(&k).await?, Some(d));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn evicts_least_recently_used_but_never_a_pinned_chunk() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let c = DiskCache::open(dir.path(), 3000)?;
        let chunks: Vec<_> = (0..3).map(|i| chunk(i, 1000)).collect();
        for (k, d) in &chunks {
            c.put(k, d.clone()).await?;
        }
        // Chunk 0 is being read (pinned) and chunk 1 was used recently.
        assert!(c.pin(&chunks[0].0.digest));
        assert!(c.get(&chunks[1].0).await?.is_some());
        let (k3, d3) = chunk(3, 1000);
        c.put(&k3, d3).await?;
        assert!(c.bytes() <= 3000);
        assert!(c.contains(&chunks[0].0.digest), "pinned chunk kept");
        assert!(c.contains(&chunks[1].0.digest), "recently used chunk kept");
        assert!(
            !c.contains(&chunks[2].0.digest),
            "least recently used chunk evicted"
        );
        assert!(c.contains(&k3.digest));
        c.unpin(&chunks[0].0.digest);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_or_truncated_file_is_a_miss_and_is_removed() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let c = DiskCache::open(dir.path(), 1 << 20)?;
        let (k, d) = chunk(7, 4096);
        c.put(&k, d.clone()).await?;
        let path = c.path(&k.digest);
        let mut bytes = std::fs::read(&path)?;
        bytes[10] ^= 1;
        std::fs::write(&path, &bytes)?;
        assert!(c.get(&k).await?.is_none());
        assert!(!path.exists(), "corrupt file removed");
        assert_eq!(c.stats.corrupt.load(Ordering::Relaxed), 1);
        c.put(&k, d.clone()).await?;
        std::fs::write(&path, &d[..100])?;
        assert!(c.get(&k).await?.is_none(), "a short file is not served");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leftover_temporary_files_are_cleared_on_open() -> Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("tmp"))?;
        std::fs::write(dir.path().join("tmp/half-written"), b"partial")?;
        std::fs::create_dir_all(dir.path().join("chunks/zz"))?;
        std::fs::write(dir.path().join("chunks/zz/not-a-digest"), b"x")?;
        let c = DiskCache::open(dir.path(), 1 << 20)?;
        assert!(!dir.path().join("tmp/half-written").exists());
        assert!(!dir.path().join("chunks/zz/not-a-digest").exists());
        assert_eq!(c.bytes(), 0);
        Ok(())
    }
}
