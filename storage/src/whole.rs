//! Whole files for FUSE passthrough: which files a store keeps whole on local disk, and
//! copying them there from the chunks on disk in the background, part after part as the
//! reads bring them (see [`crate::cache::disk::DiskCache::begin_whole`]), so that a file
//! read through is kept whole moments after its last chunk arrived.

use std::collections::HashSet;
use std::fs::File;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use clip_index::Digest;
use tracing::{debug, warn};

use crate::cache::ChunkKey;
use crate::cache::disk::{DiskCache, whole_key};
use crate::source::BlobSource;
use crate::tiered::ChunkStore;

/// How long a copy waits for the next chunk of its file to reach the disk before it gives
/// up (its reader stopped, or wants only some of the file).
const STALL: Duration = Duration::from_secs(3);
/// How often a copy looks for the next chunk.
const POLL: Duration = Duration::from_millis(5);
/// How long an open waits for a copy whose chunks are all here to end.
const OPEN_WAIT: Duration = Duration::from_millis(500);

/// Where a store keeps whole files, and which.
#[derive(Debug)]
pub(crate) struct WholeFiles {
    disk: Arc<DiskCache>,
    /// Files smaller than this are not kept whole (a request per read costs them little).
    min_len: u64,
    /// Files being copied now.
    busy: Mutex<HashSet<Digest>>,
    /// Told when a copy ends.
    ended: Condvar,
    /// Files whose copy failed (not tried again by this store).
    failed: Mutex<HashSet<Digest>>,
    /// One part copied at a time: copies compete with the program for the disk.
    copying: Mutex<()>,
}

impl WholeFiles {
    fn busy(&self) -> std::sync::MutexGuard<'_, HashSet<Digest>> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<S: BlobSource> ChunkStore<S> {
    /// Keeps files of at least [`crate::StoreConfig::whole_file_min_bytes`] whole in `disk`
    /// (the store's disk tier) once every chunk of them is there, for
    /// [`ChunkStore::whole_file`]. Nothing when that is 0; only the first call counts.
    pub fn keep_whole_files(&self, disk: Arc<DiskCache>) {
        let min_len = self.config().whole_file_min_bytes;
        if min_len == 0 {
            return;
        }
        let _ = self.whole.set(WholeFiles {
            disk,
            min_len,
            busy: Mutex::default(),
            ended: Condvar::new(),
            failed: Mutex::default(),
            copying: Mutex::default(),
        });
    }

    /// Whether any file is kept whole (see [`Self::keep_whole_files`]).
    pub fn keeps_whole_files(&self) -> bool {
        self.whole.get().is_some()
    }

    /// Whether a file of `len` bytes may be kept whole (see [`Self::keep_whole_files`]).
    pub fn keeps_whole(&self, len: u64) -> bool {
        self.whole.get().is_some_and(|w| len >= w.min_len)
    }

    fn whole_key(&self, layer: usize, offset: u64, len: u64) -> Option<Digest> {
        let l = self.index().layers.get(layer)?;
        Some(whole_key(&l.digest, offset, len))
    }

    /// The file of `len` bytes at uncompressed `offset` of `layer`, kept whole on local
    /// disk and checked, opened read-only; `None` if it is not kept (or was found damaged
    /// and removed). When its copy is under way with all its chunks on local disk or on
    /// their way there (a reader just read it through), waits for it, up to [`OPEN_WAIT`].
    /// Blocking: the first call in a process reads the whole file.
    pub fn whole_file(&self, layer: usize, offset: u64, len: u64) -> Option<File> {
        let file = self
            .kept_whole(layer, offset, len)
            .or_else(|| self.copied_soon(layer, offset, len))?;
        self.recorder.note_read(crate::profile::FileRead {
            layer,
            offset,
            len,
            whole: true,
        });
        Some(file)
    }

    /// [`Self::whole_file`], not recorded in the start-up profile.
    pub(crate) fn kept_whole(&self, layer: usize, offset: u64, len: u64) -> Option<File> {
        let w = self.whole.get().filter(|w| len >= w.min_len)?;
        let key = self.whole_key(layer, offset, len)?;
        w.disk.open_whole(&key, len)
    }

    /// The file kept whole once its copy under way ends, if all its chunks are in memory
    /// (written to disk soon) or on local disk, waiting up to [`OPEN_WAIT`].
    fn copied_soon(&self, layer: usize, offset: u64, len: u64) -> Option<File> {
        let w = self.whole.get().filter(|w| len >= w.min_len)?;
        let key = self.whole_key(layer, offset, len)?;
        let under_way = w.busy().contains(&key);
        if !under_way || !self.is_local(layer, offset, len) {
            debug!(
                layer,
                offset, len, under_way, "not kept whole yet: opened the usual way"
            );
            return None;
        }
        drop(
            w.ended
                .wait_timeout_while(w.busy(), OPEN_WAIT, |b| b.contains(&key))
                .unwrap_or_else(|p| p.into_inner()),
        );
        let file = w.disk.open_whole(&key, len);
        debug!(
            layer,
            offset,
            len,
            kept = file.is_some(),
            "waited for a whole-file copy"
        );
        file
    }

    /// Starts keeping the file of `len` bytes at `offset` of `layer` whole, in the
    /// background, if it is not kept or being copied yet: each part is copied once its
    /// chunk is on local disk, in order, as a reader's reads bring them (nothing is
    /// fetched for it). Nothing is written before the file's first quarter is there (a
    /// program that wants a little of a large file leaves it be), and the copy gives up
    /// when its next chunk has not come for [`STALL`]. Returns at once.
    pub fn keep_whole(self: &Arc<Self>, layer: usize, offset: u64, len: u64) {
        let Some(w) = self.whole.get().filter(|w| len >= w.min_len) else {
            return;
        };
        let Some(key) = self.whole_key(layer, offset, len) else {
            return;
        };
        let failed = w
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key);
        if failed || w.disk.has_whole(&key) {
            return;
        }
        let Some(parts) = self.parts(layer, offset, len) else {
            return;
        };
        if !w.busy().insert(key) {
            return;
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let Some(w) = this.whole.get() else { return };
            match follow(w, &key, len, &parts) {
                Ok(true) => debug!(layer, offset, len, "whole file"),
                Ok(false) => {}
                Err(e) => {
                    // (A cache directory without user xattrs fails every copy.)
                    warn!(layer, offset, len, error = %e, "keeping a whole file failed; not tried again");
                    w.failed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key);
                }
            }
            w.busy().remove(&key);
            w.ended.notify_all();
        });
    }

    /// The chunks holding `len` bytes at `offset` of `layer`, with the bytes of each.
    pub(crate) fn parts(
        &self,
        layer: usize,
        offset: u64,
        len: u64,
    ) -> Option<Vec<(ChunkKey, Range<u32>)>> {
        let l = self.index().layers.get(layer)?;
        l.chunks_covering(offset, len)
            .ok()?
            .map(|c| {
                let key = self.key(layer, c).ok()?;
                Some((key, self.bytes_in_chunk(layer, c, offset, len).ok()?))
            })
            .collect()
    }
}

/// Copies the file `key` (`len` bytes of `parts`) into a whole file in `w`'s disk cache,
/// each part once its chunk is there: [`ChunkStore::keep_whole`]. `Ok(false)` when it gave
/// up or the file is not kept (no room, a chunk gone).
fn follow(
    w: &WholeFiles,
    key: &Digest,
    len: u64,
    parts: &[(ChunkKey, Range<u32>)],
) -> crate::Result<bool> {
    let part_len = |i: usize| u64::from(parts[i].1.end - parts[i].1.start);
    // Parts [..here] are on disk; [..copied] are in the file.
    let (mut here, mut here_bytes, mut copied) = (0, 0u64, 0);
    let mut writer = None;
    let mut moved = Instant::now();
    loop {
        while here < parts.len() && w.disk.contains(&parts[here].0.digest) {
            here_bytes += part_len(here);
            here += 1;
            moved = Instant::now();
        }
        if writer.is_none() && here == parts.len() {
            // All there already: pinned at once, so that making room for the copy evicts
            // none of them.
            let _one = w.copying.lock().unwrap_or_else(|p| p.into_inner());
            return w.disk.store_whole(key, len, parts);
        }
        if writer.is_none() && here_bytes >= len / 4 {
            match w.disk.begin_whole(key, len)? {
                Some(began) => writer = Some(began),
                None => return Ok(w.disk.has_whole(key)),
            }
        }
        if let Some(file) = writer.as_mut() {
            while copied < here {
                let _one = w.copying.lock().unwrap_or_else(|p| p.into_inner());
                if !file.append(&parts[copied].0, parts[copied].1.clone())? {
                    return Ok(false);
                }
                copied += 1;
                moved = Instant::now();
            }
            if copied == parts.len() {
                return writer.take().map_or(Ok(false), |f| f.finish());
            }
        }
        if moved.elapsed() >= STALL {
            debug!(key = %key, here_bytes, len, "not kept whole: its reads stopped");
            return Ok(false);
        }
        std::thread::sleep(POLL);
    }
}
