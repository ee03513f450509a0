//! Whole files for FUSE passthrough: which files a store keeps whole on local disk, and
//! copying them there from the chunks already on disk, one file at a time in the
//! background (see [`crate::cache::disk::DiskCache::store_whole`]).

use std::collections::HashSet;
use std::fs::File;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use clip_index::Digest;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::cache::ChunkKey;
use crate::cache::disk::{DiskCache, whole_key};
use crate::source::BlobSource;
use crate::tiered::ChunkStore;

/// How long keeping a file whole waits for chunk writes under way.
const WRITES_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where a store keeps whole files, and which.
#[derive(Debug)]
pub(crate) struct WholeFiles {
    disk: Arc<DiskCache>,
    /// Files smaller than this are not kept whole (a request per read costs them little).
    min_len: u64,
    /// Files being copied now.
    busy: Mutex<HashSet<Digest>>,
    /// Files whose copy failed (not tried again by this store).
    failed: Mutex<HashSet<Digest>>,
    /// One copy at a time: it competes with the program for the disk.
    permit: Arc<Semaphore>,
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
            failed: Mutex::default(),
            permit: Arc::new(Semaphore::new(1)),
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
    /// and removed). Blocking: the first call in a process reads the whole file.
    pub fn whole_file(&self, layer: usize, offset: u64, len: u64) -> Option<File> {
        let file = self.kept_whole(layer, offset, len)?;
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

    /// Starts keeping the file of `len` bytes at `offset` of `layer` whole, in the
    /// background, if it is not kept yet and every chunk of it is on local disk once the
    /// chunks being written there are (nothing is fetched for it). Returns at once.
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
        if !w.busy.lock().unwrap_or_else(|p| p.into_inner()).insert(key) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let Some(w) = this.whole.get() else { return };
            this.copy_whole(w, key, len, parts, (layer, offset)).await;
            w.busy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        });
    }

    /// Copies the file `key` (`len` bytes of `parts`; `at` is its layer and offset, for
    /// logs) into a whole file, once the chunks on their way to the disk are there, if all
    /// of them are.
    async fn copy_whole(
        &self,
        w: &WholeFiles,
        key: Digest,
        len: u64,
        parts: Vec<(ChunkKey, Range<u32>)>,
        (layer, offset): (usize, u64),
    ) {
        // The reads that just ended may have left chunks on their way to the disk.
        self.flush(WRITES_WAIT).await;
        if !parts.iter().all(|(k, _)| w.disk.contains(&k.digest)) {
            return;
        }
        let Ok(_permit) = w.permit.clone().acquire_owned().await else {
            return;
        };
        let disk = w.disk.clone();
        let kept = tokio::task::spawn_blocking(move || disk.store_whole(&key, len, &parts)).await;
        match kept {
            Ok(Ok(kept)) => debug!(layer, offset, len, kept, "whole file"),
            Ok(Err(e)) => {
                // (A cache directory without user xattrs fails every copy.)
                warn!(layer, offset, len, error = %e, "keeping a whole file failed; not tried again");
                w.failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key);
            }
            Err(e) => debug!(error = %e, "the whole-file copy ended early"),
        }
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
