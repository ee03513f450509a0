//! Putting file data in the kernel's page cache without being asked (FUSE_NOTIFY_STORE):
//! at a small file's first open, and ahead of a program from its start-up profile
//! ([`super::prefill`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU64};
use std::time::Duration;

use clip_index::ImageIndex;
use clip_storage::{BlobSource, ChunkStore, ReadNow};
use fuser::INodeNo;

/// Files up to this size, their data on local disk, are put in the kernel's page cache when
/// first opened (FUSE_NOTIFY_STORE), so their reads need no request.
/// (Larger files are often read in part: an interpreter maps a library and touches some of
/// its pages; in the numpy benchmark, 128 KiB did better than 1 MiB.)
pub const PUSH_MAX: u64 = 128 << 10;

/// The pages a mount puts in the kernel's cache, once per inode.
pub(super) struct Pages<S> {
    store: Arc<ChunkStore<S>>,
    runtime: tokio::runtime::Handle,
    /// Off for a session taken over from another process, whose opens are unknown.
    enabled: bool,
    /// Where the mount puts the session's notifier once the session exists.
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    /// One bit per inode: its data was claimed for the page cache (once, whatever came of
    /// it).
    claimed: Vec<AtomicU64>,
    /// One bit per inode: whoever claimed it is done with the page cache.
    settled: Vec<AtomicU64>,
    /// The processes filling the kernel's caches from the start-up profile, while they do
    /// (their lookups are not the program's, so they are not recorded); 0 otherwise.
    pub(super) prefill_helpers: [AtomicI32; super::prefill::THREADS],
}

impl<S: BlobSource> Pages<S> {
    pub(super) fn new(
        store: Arc<ChunkStore<S>>,
        runtime: tokio::runtime::Handle,
        enabled: bool,
    ) -> Self {
        let bits = || {
            (0..=index_words(store.index()))
                .map(|_| AtomicU64::default())
                .collect()
        };
        Self {
            claimed: bits(),
            settled: bits(),
            store,
            runtime,
            enabled,
            notifier: Arc::default(),
            prefill_helpers: Default::default(),
        }
    }

    pub(super) fn store(&self) -> &Arc<ChunkStore<S>> {
        &self.store
    }

    /// Where the session's notifier goes, once there is a session.
    pub(super) fn notifier_slot(&self) -> Arc<std::sync::OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    /// Puts the data of file `ino` (`size` bytes at `offset` of `layer`) in the kernel's page
    /// cache when all of it is in memory or on local disk: its reads then need no request
    /// (opens are answered with FOPEN_KEEP_CACHE, so the kernel keeps the pages). Anything
    /// else, and the reads come as usual. Whether this call put it there: not when it is too
    /// large, pushing is off, another caller claimed it first, or its data is not all in
    /// memory or on local disk (then loaded in the background, for the reads to come).
    ///
    /// Once per inode, and other callers for the inode meanwhile wait for it. The kernel
    /// writes the pages under their locks, which a read in progress holds until it is
    /// answered: the first open of an inode calls this before it is answered (so no reader
    /// exists), and the prefill calls it before the program opens the file, from a thread
    /// that is no FUSE worker (so a read it meets is answered by a worker).
    pub(super) fn push(&self, ino: u64, layer: usize, offset: u64, size: u64) -> bool {
        use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};
        if !self.enabled || size == 0 || size > PUSH_MAX {
            return false;
        }
        let Some(notifier) = self.notifier.get() else {
            return false;
        };
        let (word, bit) = ((ino / 64) as usize, 1u64 << (ino % 64));
        let (Some(claimed), Some(settled)) = (self.claimed.get(word), self.settled.get(word))
        else {
            return false;
        };
        if claimed.fetch_or(bit, AcqRel) & bit != 0 {
            // A local read of at most PUSH_MAX bytes, then the pages: soon over.
            while settled.load(Acquire) & bit == 0 {
                std::thread::sleep(Duration::from_micros(50));
            }
            return false;
        }
        // Settled however this ends, a panic included: other callers wait for it.
        struct Settle<'a>(&'a AtomicU64, u64);
        impl Drop for Settle<'_> {
            fn drop(&mut self) {
                self.0.fetch_or(self.1, Release);
            }
        }
        let _settle = Settle(settled, bit);
        let _runtime = self.runtime.enter();
        match self.store.read_now(layer, offset, size, offset + size) {
            Some(ReadNow::Done(Ok(bytes))) => notifier.store(INodeNo(ino), 0, &bytes).is_ok(),
            // Finished in the background (the chunks it loads serve the reads to come), not
            // waited for here.
            Some(ReadNow::Later(read)) => {
                self.runtime.spawn(read);
                false
            }
            Some(ReadNow::Done(Err(_))) | None => false,
        }
    }
}

/// Words of one bit per inode number (0 to the last).
fn index_words(index: &ImageIndex) -> usize {
    (index.inode_count() / 64) as usize
}
