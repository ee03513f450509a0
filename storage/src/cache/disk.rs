//! The local disk chunk cache: one file per chunk named by its digest, written to a temporary
//! file and renamed into place (a crash leaves no half-written chunk under a real name),
//! checked on every read, capped in size with least-recently-used eviction that never
//! removes a chunk while it is being read.
//!
//! A chunk is verified against its sha256 before it is stored. On disk it is followed by the
//! CRC-32C of each 64 KiB block and a footer naming the chunk's digest, so a read checks only
//! the blocks it returns, at memory speed, instead of hashing the whole chunk again: damage on
//! disk (a flipped bit, a torn or truncated file, another chunk's file under this name) is
//! caught and the chunk refetched. Files from before the checksums (exactly the chunk's
//! length) are verified by sha256 when read whole and rewritten with checksums.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use clip_index::Digest;
use futures::FutureExt;
use futures::future::BoxFuture;
use tracing::{debug, warn};

use super::{ChunkCache, ChunkKey};
use crate::error::{Error, Result};

mod whole;

pub use whole::whole_key;

/// Where chunk files are, under the cache directory.
const CHUNK_DIR: &str = "chunks";
/// Where whole files are, under the cache directory.
const WHOLE_DIR: &str = "files";
/// Where the records of whole files checked in this boot are (see [`whole`]).
const CHECKED_DIR: &str = "checked";

/// Eviction ranks below this go to the files found by the walk at open, oldest first; the
/// files used meanwhile rank above.
const WALKED_TICKS: u64 = 1 << 48;

/// Bytes of chunk data covered by one stored checksum.
const CHECK_BLOCK: u64 = 64 * 1024;
/// Ends every chunk file with checksums, after the chunk's digest.
const MAGIC: &[u8; 8] = b"CLIPCRC1";
/// The footer: the chunk's sha256, then [`MAGIC`].
const FOOTER_LEN: u64 = 32 + MAGIC.len() as u64;

/// Puts the calling thread's disk reads behind everyone else's of its class (best effort,
/// lowest level, where the device's scheduler honours it; not the idle class, which a busy
/// disk could starve for good) and its CPU time too: background upkeep must not slow the
/// reads of a program that is starting.
fn background_priority() {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_BE: libc::c_long = 2;
    const IOPRIO_CLASS_SHIFT: u32 = 13;
    const LOWEST_LEVEL: libc::c_long = 7;
    // SAFETY: plain syscalls on the calling thread (0), with no memory passed.
    unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            (IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | LOWEST_LEVEL,
        );
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
}

/// The digest a cache file is named by (its hex), if the name is one.
fn digest_named(name: &OsStr) -> Option<Digest> {
    format!("sha256:{}", name.to_str()?).parse().ok()
}

/// Who drops a cache entry ([`DiskCache::drop_entry`]).
#[derive(Clone, Copy)]
enum Dropper {
    /// The writer that reserved it.
    Writer,
    /// A reader that found its copy damaged or unreadable; with the (device, inode) of the
    /// chunk file it had open, if it had one.
    Reader(Option<(u64, u64)>),
}

/// Which file `meta` is: (device, inode).
fn identity(meta: std::io::Result<std::fs::Metadata>) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    meta.ok().map(|m| (m.dev(), m.ino()))
}

/// Size on disk of a chunk of `len` bytes: the bytes, a CRC-32C per block, the footer.
fn stored_len(len: u32) -> u64 {
    u64::from(len) + 4 * u64::from(len).div_ceil(CHECK_BLOCK) + FOOTER_LEN
}

/// Asks the kernel to read `len` bytes of `file` from `offset` (0: to its end) into the
/// page cache, without waiting for them. One request reads at most the device's read-ahead
/// or largest I/O (128 KiB on many disks), so a longer range is asked in steps of that.
pub(crate) fn will_need(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    const STEP: u64 = 128 << 10;
    let end = if len == 0 {
        file.metadata().map_or(offset, |m| m.len())
    } else {
        offset.saturating_add(len)
    };
    let mut at = offset;
    while at < end {
        let n = (end - at).min(STEP);
        let (Ok(from), Ok(n)) = (i64::try_from(at), i64::try_from(n)) else {
            return;
        };
        // SAFETY: a hint about an open descriptor; no memory is passed.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), from, n, libc::POSIX_FADV_WILLNEED) };
        at += STEP;
    }
}

/// Where a part read of bytes `range` of `key`'s chunk reads in its file: the 64 KiB blocks
/// around them, and from where the rest of the file (these blocks' checksums on, then the
/// footer) starts.
fn part_extent(key: &ChunkKey, range: &std::ops::Range<u32>) -> (std::ops::Range<u64>, u64) {
    let first = u64::from(range.start) / CHECK_BLOCK;
    let last = u64::from(range.end).div_ceil(CHECK_BLOCK);
    let to = (last * CHECK_BLOCK).min(u64::from(key.len));
    (first * CHECK_BLOCK..to, u64::from(key.len) + 4 * first)
}

/// The footer of `key`'s file.
fn footer(key: &ChunkKey) -> Vec<u8> {
    [&key.digest.0[..], &MAGIC[..]].concat()
}

/// The CRC-32C of each block of `data`, little-endian, as stored after it.
fn checksums(data: &[u8]) -> Vec<u8> {
    data.chunks(CHECK_BLOCK as usize)
        .flat_map(|b| crc32c::crc32c(b).to_le_bytes())
        .collect()
}

/// Whether `data` (whole blocks of `key`'s chunk) is intact: `rest`, the rest of its file
/// from these blocks' checksums on, ends with the chunk's footer, and every block matches
/// its checksum.
fn intact(key: &ChunkKey, data: &[u8], rest: &[u8]) -> bool {
    rest.ends_with(&footer(key)) && blocks_match(data, rest)
}

/// Whether every block of `data` matches its stored checksum in `table`.
fn blocks_match(data: &[u8], table: &[u8]) -> bool {
    let blocks = data.chunks(CHECK_BLOCK as usize);
    blocks.len() * 4 <= table.len()
        && blocks
            .zip(table.chunks_exact(4))
            .all(|(b, c)| crc32c::crc32c(b).to_le_bytes() == c)
}

#[derive(Debug)]
struct Entry {
    size: u64,
    tick: u64,
    pins: u32,
    /// Reserved by a writer whose file is not in place yet: not readable.
    writing: bool,
    /// A whole file of an image (see [`whole`]), not a chunk.
    whole: bool,
    /// A whole file checked in full by this process (its checksum matched).
    verified: bool,
}

impl Entry {
    fn new(size: u64, tick: u64, whole: bool) -> Self {
        Self {
            size,
            tick,
            pins: 0,
            writing: false,
            whole,
            verified: false,
        }
    }
}

/// What [`DiskCache::reserve`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reservation {
    /// Space reserved: write the file, then [`DiskCache::settle`].
    Made,
    /// Already there (`readable`), or being written by someone else.
    Present { readable: bool },
    /// No room beside what is being read.
    Skipped,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<Digest, Entry>,
    order: BTreeMap<u64, Digest>,
    tick: u64,
    bytes: u64,
    /// Files removed while the walk at open goes on, which it may still have seen.
    gone: HashSet<Digest>,
}

impl State {
    /// The next rank in the eviction order: used most recently.
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Counts `entry` under `digest`, ranked at its tick.
    fn add(&mut self, digest: Digest, entry: Entry) {
        self.order.insert(entry.tick, digest);
        self.bytes += entry.size;
        self.entries.insert(digest, entry);
    }

    /// Uncounts `digest`, whose file is about to go; while the walk at open goes on
    /// (`stocking`) it is remembered, so that the walk does not count it again.
    fn remove(&mut self, digest: &Digest, stocking: bool) -> Option<Entry> {
        if stocking {
            self.gone.insert(*digest);
        }
        let e = self.entries.remove(digest)?;
        self.order.remove(&e.tick);
        self.bytes -= e.size;
        Some(e)
    }
}

/// Counters of what the disk cache did.
#[derive(Debug, Default)]
pub struct DiskStats {
    pub corrupt: AtomicU64,
    pub evicted: AtomicU64,
    /// Chunks not stored because every other chunk was being read and the cap was reached.
    pub skipped: AtomicU64,
    /// Whole files kept (see [`whole`]).
    pub whole_kept: AtomicU64,
    /// Whole files read in full and matched against their seal.
    pub whole_checked: AtomicU64,
    /// Whole files handed out on the record that they were checked in this boot and have
    /// not changed since.
    pub whole_trusted: AtomicU64,
}

/// Chunks on local disk under `dir`, at most `capacity` bytes.
#[derive(Debug)]
pub struct DiskCache {
    dir: PathBuf,
    capacity: u64,
    state: Mutex<State>,
    /// The walk at open has not counted every file yet (see [`Self::adopt`]).
    stocking: AtomicBool,
    temp_seq: AtomicU64,
    /// This boot's id (`/proc/sys/kernel/random/boot_id`); `None` if unreadable, and then
    /// every process checks every whole file itself.
    boot_id: Option<String>,
    pub stats: DiskStats,
}

impl DiskCache {
    /// Opens (or creates) a cache directory and takes stock of what it holds (a walk of
    /// every file, which on a large cache with a cold page cache takes a while: see
    /// [`Self::open_in_background`]).
    pub fn open(dir: &Path, capacity: u64) -> Result<Self> {
        let cache = Self::open_unstocked(dir, capacity)?;
        cache.take_stock();
        Ok(cache)
    }

    /// Opens a cache directory at once and takes stock of it on a thread of its own. Until
    /// that walk ends, a file it has not reached yet is looked for where its digest puts
    /// it, so every file already there serves reads from the start; the cap counts the
    /// files seen so far, and the walk ends with an eviction down to the cap.
    pub fn open_in_background(dir: &Path, capacity: u64) -> Result<Arc<Self>> {
        let cache = Arc::new(Self::open_unstocked(dir, capacity)?);
        let this = cache.clone();
        // Only the walk goes at low priority: counting and evicting hold the lock every
        // read needs, so they run at the usual priority, on the thread that waits for it.
        let stock = move || {
            let found = std::thread::scope(|s| {
                let walk = std::thread::Builder::new()
                    .name("clip-disk-walk".into())
                    .spawn_scoped(s, || {
                        background_priority();
                        this.walk()
                    });
                match walk {
                    Ok(walk) => walk.join().unwrap_or_else(|_| this.walk()),
                    Err(_) => this.walk(),
                }
            });
            this.count(found);
        };
        let started = std::thread::Builder::new()
            .name("clip-disk-stock".into())
            .spawn(stock);
        if let Err(e) = started {
            warn!(dir = %dir.display(), error = %e, "no thread for the disk cache's walk; walking it now");
            cache.take_stock();
        }
        Ok(cache)
    }

    /// The directories made and leftovers of a crash cleared, nothing counted yet: files
    /// are found by [`Self::adopt`] until [`Self::take_stock`] has walked them all.
    fn open_unstocked(dir: &Path, capacity: u64) -> Result<Self> {
        let io = |e: std::io::Error| Error::Cache {
            tier: "disk",
            detail: format!("{}: {e}", dir.display()),
        };
        std::fs::create_dir_all(dir.join(CHUNK_DIR)).map_err(io)?;
        let tmp = dir.join("tmp");
        // Leftovers of a crash are never valid chunks.
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io)?;
        }
        std::fs::create_dir_all(&tmp).map_err(io)?;
        std::fs::create_dir_all(dir.join(WHOLE_DIR)).map_err(io)?;
        std::fs::create_dir_all(dir.join(CHECKED_DIR)).map_err(io)?;
        Ok(Self {
            dir: dir.to_owned(),
            capacity: capacity.max(1),
            // Files used while the walk goes on rank above every file it finds.
            state: Mutex::new(State {
                tick: WALKED_TICKS,
                ..State::default()
            }),
            stocking: AtomicBool::new(true),
            temp_seq: AtomicU64::new(0),
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .ok()
                .map(|b| b.trim().to_owned())
                .filter(|b| !b.is_empty()),
            stats: DiskStats::default(),
        })
    }

    /// Walks the cache's files and counts those not counted yet, least recently modified
    /// first in the eviction order; removes files with names that are no digest and check
    /// records whose whole file is gone; then evicts down to the cap.
    fn take_stock(&self) {
        let found = self.walk();
        self.count(found);
    }

    /// Every file under the cache's directories: when it was last modified, its digest,
    /// its size and whether it is a whole file. Files named by no digest are removed.
    fn walk(&self) -> Vec<(Option<std::time::SystemTime>, Digest, u64, bool)> {
        let mut found = Vec::new();
        for (sub, whole) in [(CHUNK_DIR, false), (WHOLE_DIR, true)] {
            let Ok(shards) = std::fs::read_dir(self.dir.join(sub)) else {
                warn!(dir = %self.dir.join(sub).display(), "disk cache directory unreadable");
                continue;
            };
            for shard in shards.flatten() {
                let Ok(files) = std::fs::read_dir(shard.path()) else {
                    continue;
                };
                for f in files.flatten() {
                    let Some(digest) = digest_named(&f.file_name()) else {
                        std::fs::remove_file(f.path()).ok();
                        continue;
                    };
                    let Ok(meta) = f.metadata() else { continue };
                    found.push((meta.modified().ok(), digest, meta.len(), whole));
                }
            }
        }
        found
    }

    /// Ends the stock-taking with what [`Self::walk`] found.
    fn count(&self, mut found: Vec<(Option<std::time::SystemTime>, Digest, u64, bool)>) {
        found.sort_by_key(|(used, _, _, _)| *used);
        {
            let mut s = self.lock();
            let mut tick = 0;
            for (_, digest, size, whole) in found {
                // Counted already (found by adopt, or written meanwhile), or removed
                // meanwhile (its file gone after the walk saw it).
                if s.entries.contains_key(&digest) || s.gone.contains(&digest) {
                    continue;
                }
                tick += 1;
                s.add(digest, Entry::new(size, tick, whole));
            }
            s.gone = HashSet::new();
            self.stocking.store(false, Ordering::Release);
        }
        self.sweep_records();
        self.evict();
    }

    /// Removes check records (see [`whole`]) whose whole file is not kept.
    fn sweep_records(&self) {
        let Ok(records) = std::fs::read_dir(self.dir.join(CHECKED_DIR)) else {
            return;
        };
        for r in records.flatten() {
            let kept = digest_named(&r.file_name())
                .is_some_and(|d| self.lock().entries.get(&d).is_some_and(|e| e.whole));
            if !kept {
                std::fs::remove_file(r.path()).ok();
            }
        }
    }

    /// While the walk of [`Self::take_stock`] goes on: counts the file of `digest` (a chunk,
    /// or with `whole` a whole file) if it is there and not counted yet, so that it serves
    /// reads before the walk reaches it.
    fn adopt(&self, digest: &Digest, whole: bool) {
        if !self.stocking.load(Ordering::Acquire) || self.lock().entries.contains_key(digest) {
            return;
        }
        let Ok(meta) = std::fs::symlink_metadata(self.path_of(digest, whole)) else {
            return;
        };
        let mut s = self.lock();
        if !meta.is_file()
            || !self.stocking.load(Ordering::Acquire)
            || s.entries.contains_key(digest)
            || s.gone.contains(digest)
        {
            return;
        }
        let tick = s.next_tick();
        s.add(*digest, Entry::new(meta.len(), tick, whole));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where a chunk's file is.
    fn path(&self, digest: &Digest) -> PathBuf {
        self.path_of(digest, false)
    }

    /// Where a chunk's file (or, `whole`, a whole file's) is.
    fn path_of(&self, digest: &Digest, whole: bool) -> PathBuf {
        let hex = digest.hex();
        let sub = if whole { WHOLE_DIR } else { CHUNK_DIR };
        self.dir.join(sub).join(&hex[..2]).join(hex)
    }

    /// Bytes the chunk files take on disk (chunks, checksums and footers).
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the chunk's file is in place (not still being written).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.adopt(digest, false);
        self.lock().entries.get(digest).is_some_and(|e| !e.writing)
    }

    /// Marks a chunk (or a whole file adopted before) used and pinned; `false` if absent.
    fn pin(&self, digest: &Digest) -> bool {
        self.adopt(digest, false);
        let mut s = self.lock();
        let tick = s.next_tick();
        let Some(e) = s.entries.get_mut(digest).filter(|e| !e.writing) else {
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

    /// Reserves `size` bytes for `digest` (a chunk, or with `whole` a whole file) before
    /// its file is written: a pinned entry nobody reads yet, with what the cap needs
    /// evicted first, so the directory never holds more than the cap (once the walk at
    /// open has counted every file), not even while the file is written. Finish with
    /// [`Self::settle`] when [`Reservation::Made`].
    fn reserve(&self, digest: &Digest, size: u64, whole: bool) -> Reservation {
        self.adopt(digest, whole);
        {
            let mut s = self.lock();
            if let Some(e) = s.entries.get(digest) {
                return Reservation::Present {
                    readable: !e.writing,
                };
            }
            let tick = s.next_tick();
            s.add(
                *digest,
                Entry {
                    pins: 1,
                    writing: true,
                    ..Entry::new(size, tick, whole)
                },
            );
        }
        self.evict();
        // Everything else is being read (pinned): skip this one rather than exceed the cap.
        if self.lock().bytes > self.capacity {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            self.forget(digest);
            return Reservation::Skipped;
        }
        Reservation::Made
    }

    /// Ends a reservation of [`Self::reserve`] (with the same `whole`): with `written`, the
    /// file is in place and readable (and, written from checked bytes by this process,
    /// counts as checked); else the entry goes.
    fn settle(&self, digest: &Digest, whole: bool, written: bool) {
        if !written {
            self.forget(digest);
            return;
        }
        {
            let mut s = self.lock();
            match s.entries.get_mut(digest) {
                Some(e) => {
                    e.writing = false;
                    e.verified = true;
                }
                // Dropped while it was written: its file must not stay uncounted.
                None => self.remove_file_of(digest, whole),
            }
        }
        self.unpin(digest);
    }

    /// A new temporary file name for `digest`'s file, in the directory cleared at open.
    fn temp_path(&self, digest: &Digest) -> PathBuf {
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join("tmp")
            .join(format!("{}.{}.{seq}", digest.hex(), std::process::id()))
    }

    /// Drops the writer's own reservation of `digest` (not written, or no room for it) and
    /// whatever file is under its name.
    fn forget(&self, digest: &Digest) {
        self.drop_entry(digest, Dropper::Writer);
    }

    /// Drops a copy of `digest` found damaged or unreadable, unless a writer is placing a
    /// new one meanwhile (its rename replaces the damaged file).
    fn discard(&self, digest: &Digest) {
        self.drop_entry(digest, Dropper::Reader(None));
    }

    /// [`Self::discard`] of the chunk copy a reader has open as `read`: nothing goes when the
    /// name is another file's by now (a new copy was placed since the reader opened it: by
    /// [`Self::upgrade`], or by another process sharing the directory). Best effort: a
    /// rename that lands between this check and the removal still loses the new copy, which
    /// costs a fetch, never a wrong byte. Writers of this process are kept out by their
    /// reservation.
    fn discard_read(&self, digest: &Digest, read: &std::fs::File) {
        self.drop_entry(digest, Dropper::Reader(identity(read.metadata())));
    }

    /// The entry and its file go under the lock: a writer that reserves the same digest
    /// next must not have its new file removed by this.
    fn drop_entry(&self, digest: &Digest, by: Dropper) {
        let stocking = self.stocking.load(Ordering::Acquire);
        let mut s = self.lock();
        if let Dropper::Reader(read) = by {
            if s.entries.get(digest).is_some_and(|e| e.writing) {
                return;
            }
            if let Some(read) = read {
                let here = identity(std::fs::metadata(self.path(digest)));
                if here.is_some_and(|here| here != read) {
                    return;
                }
            }
        }
        let removed = s.remove(digest, stocking);
        self.remove_file_of(digest, removed.is_some_and(|e| e.whole));
    }

    /// Removes a chunk's or whole file's file, and a whole file's check record.
    fn remove_file_of(&self, digest: &Digest, whole: bool) {
        if let Err(e) = std::fs::remove_file(self.path_of(digest, whole)) {
            debug!(digest = %digest, error = %e, "cache file already gone");
        }
        if whole {
            std::fs::remove_file(self.checked_path(digest)).ok();
        }
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
                let pinned = s
                    .entries
                    .get(&digest)
                    .is_some_and(|e| e.pins > 0 || e.writing);
                if pinned {
                    skipped.push((tick, digest));
                    continue;
                }
                if let Some(e) = s.remove(&digest, self.stocking.load(Ordering::Acquire)) {
                    victims.push((digest, e.whole));
                }
            }
            for (tick, digest) in skipped {
                s.order.insert(tick, digest);
            }
            s
        };
        for (d, whole) in victims {
            self.stats.evicted.fetch_add(1, Ordering::Relaxed);
            self.remove_file_of(&d, whole);
        }
        drop(s);
    }

    fn read_verified(&self, key: &ChunkKey) -> Option<Bytes> {
        use std::io::Read;
        let path = self.path(&key.digest);
        let file = self.open_copy(&key.digest, &path)?;
        let mut data = Vec::new();
        if let Err(e) = (&file).read_to_end(&mut data) {
            warn!(path = %path.display(), error = %e, "disk cache read failed");
            self.discard_read(&key.digest, &file);
            return None;
        }
        let len = key.len as usize;
        if data.len() as u64 == stored_len(key.len) {
            let (body, rest) = data.split_at(len);
            if !intact(key, body, rest) {
                self.discard_corrupt(key, &path, &file);
                return None;
            }
            data.truncate(len);
            return Some(Bytes::from(data));
        }
        // Written before checksums were stored: the chunk's own digest checks it, and the
        // file is rewritten with them so later reads (and part reads) need not hash.
        if data.len() != len || Digest::of(&data) != key.digest {
            self.discard_corrupt(key, &path, &file);
            return None;
        }
        self.upgrade(key, &data);
        Some(Bytes::from(data))
    }

    /// Rewrites a verified chunk stored without checksums in the current format, if its
    /// entry is still the old file and the checksums fit under the cap (else it stays as it
    /// is, verified by digest when read whole).
    fn upgrade(&self, key: &ChunkKey, data: &[u8]) {
        let (old, new) = (u64::from(key.len), stored_len(key.len));
        {
            let mut s = self.lock();
            let fits = s.bytes + (new - old) <= self.capacity;
            match s.entries.get_mut(&key.digest) {
                Some(e) if e.size == old && !e.writing && fits => e.size = new,
                _ => return,
            }
            s.bytes += new - old;
        }
        let written = self.write(key, data);
        let mut s = self.lock();
        match s.entries.get_mut(&key.digest) {
            Some(e) if written.is_err() => {
                // The old file is still in place (a write goes to a temporary file first).
                e.size = old;
                s.bytes -= new - old;
            }
            Some(_) => {}
            // Forgotten meanwhile (found damaged by another reader): nothing may stay
            // behind uncounted.
            None => {
                std::fs::remove_file(self.path(&key.digest)).ok();
            }
        }
        if let Err(e) = written {
            debug!(digest = %key.digest, error = %e, "rewriting a chunk with checksums failed");
        }
    }

    /// Opens the copy of `digest` at `path` for a reader. A file that is gone takes its entry
    /// with it (removed by hand, or by another process); any other failure (no descriptor to
    /// be had, no access) is a miss this time, and the copy stays.
    pub(super) fn open_copy(&self, digest: &Digest, path: &Path) -> Option<std::fs::File> {
        match std::fs::File::open(path) {
            Ok(f) => Some(f),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "disk cache read failed");
                if e.kind() == std::io::ErrorKind::NotFound {
                    self.discard(digest);
                }
                None
            }
        }
    }

    /// A reader found the copy it has open as `file` damaged.
    fn discard_corrupt(&self, key: &ChunkKey, path: &Path, file: &std::fs::File) {
        self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
        warn!(
            path = %path.display(),
            digest = %key.digest,
            "corrupt chunk in the disk cache; discarding it"
        );
        self.discard_read(&key.digest, file);
    }

    /// Bytes `range` of a chunk, read with the 64 KiB blocks around them and checked against
    /// their stored checksums and the footer. `None` for a file without checksums: the
    /// whole-chunk path verifies those by digest (and rewrites them with checksums).
    fn read_part(&self, key: &ChunkKey, range: std::ops::Range<u32>) -> Option<Bytes> {
        use std::os::unix::fs::FileExt;
        let path = self.path(&key.digest);
        let file = std::fs::File::open(&path).ok()?;
        if file.metadata().ok()?.len() != stored_len(key.len) {
            return None;
        }
        let (blocks, table_at) = part_extent(key, &range);
        let from = blocks.start;
        let mut data = vec![0u8; blocks.end.saturating_sub(from) as usize];
        // These blocks' checksums and the rest of the file (the footer is checked too).
        let mut tail = vec![0u8; (stored_len(key.len) - table_at) as usize];
        let read = file
            .read_exact_at(&mut data, from)
            .and_then(|()| file.read_exact_at(&mut tail, table_at));
        if let Err(e) = read {
            warn!(path = %path.display(), error = %e, "disk cache read failed");
            return None;
        }
        if !intact(key, &data, &tail) {
            self.discard_corrupt(key, &path, &file);
            return None;
        }
        let at = (u64::from(range.start) - from) as usize;
        Some(Bytes::from(data).slice(at..at + (range.end - range.start) as usize))
    }

    fn write(&self, key: &ChunkKey, data: &[u8]) -> Result<()> {
        let io = |e: std::io::Error| Error::Cache {
            tier: "disk",
            detail: format!("writing chunk {}: {e}", key.digest),
        };
        let tmp = self.temp_path(&key.digest);
        let table = checksums(data);
        let written = std::fs::File::create(&tmp).and_then(|mut f| {
            use std::io::Write;
            f.write_all(data)?;
            f.write_all(&table)?;
            f.write_all(&footer(key))
        });
        if let Err(e) = written {
            std::fs::remove_file(&tmp).ok();
            return Err(io(e));
        }
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
            if range.start > range.end || range.end > key.len || !self.pin(&key.digest) {
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
            debug_assert_eq!(Digest::of(&data), key.digest, "put of an unverified chunk");
            let size = stored_len(key.len);
            // A chunk that does not match its key (the caller's bug) is not stored.
            if size > self.capacity || data.len() != key.len as usize {
                return Ok(());
            }
            // (Skipped: the chunk stays in memory and the next miss stores it.)
            if self.reserve(&key.digest, size, false) != Reservation::Made {
                return Ok(());
            }
            let written = blocking(|| self.write(key, &data));
            self.settle(&key.digest, false, written.is_ok());
            written
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
            (
                "whole_files_kept",
                self.stats.whole_kept.load(Ordering::Relaxed),
            ),
        ]
    }

    fn is_local(&self) -> bool {
        true
    }

    fn checks_ranges(&self) -> bool {
        true
    }

    /// The blocks of `range` (which a part read checks) and the checksums after them.
    fn warm(&self, key: &ChunkKey, range: std::ops::Range<u32>) -> bool {
        if !self.contains(&key.digest) {
            return false;
        }
        let Ok(file) = std::fs::File::open(self.path(&key.digest)) else {
            return false;
        };
        let (blocks, table_at) = part_extent(key, &range);
        will_need(&file, blocks.start, blocks.end.saturating_sub(blocks.start));
        will_need(&file, table_at, 0);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flips the bits `xor` of byte `at` of the file at `path`.
    fn damage(path: &Path, at: usize, xor: u8) -> std::io::Result<()> {
        let mut bytes = std::fs::read(path)?;
        bytes[at] ^= xor;
        std::fs::write(path, &bytes)
    }

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
        assert_eq!(
            c.bytes(),
            stored_len(1000),
            "a reopened cache knows what it holds"
        );
        assert_eq!(c.get(&k).await?, Some(d));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn evicts_least_recently_used_but_never_a_pinned_chunk() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let cap = 3 * stored_len(1000);
        let c = DiskCache::open(dir.path(), cap)?;
        let chunks: Vec<_> = (0..3).map(|i| chunk(i, 1000)).collect();
        for (k, d) in &chunks {
            c.put(k, d.clone()).await?;
        }
        // Chunk 0 is being read (pinned) and chunk 1 was used recently.
        assert!(c.pin(&chunks[0].0.digest));
        assert!(c.get(&chunks[1].0).await?.is_some());
        let (k3, d3) = chunk(3, 1000);
        c.put(&k3, d3).await?;
        assert!(c.bytes() <= cap);
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
        damage(&path, 10, 1)?;
        assert!(c.get(&k).await?.is_none());
        assert!(!path.exists(), "corrupt file removed");
        assert_eq!(c.stats.corrupt.load(Ordering::Relaxed), 1);
        c.put(&k, d.clone()).await?;
        std::fs::write(&path, &d[..100])?;
        assert!(c.get(&k).await?.is_none(), "a short file is not served");
        Ok(())
    }

    /// A chunk of 200 KiB (four checksum blocks, the last one short) of varied bytes.
    fn varied_chunk() -> (ChunkKey, Bytes) {
        let data: Vec<u8> = (0..200 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        let data = Bytes::from(data);
        let key = ChunkKey {
            digest: Digest::of(&data),
            len: data.len() as u32,
        };
        (key, data)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn part_reads_check_the_blocks_they_return() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let c = DiskCache::open(dir.path(), 1 << 20)?;
        let (k, d) = varied_chunk();
        c.put(&k, d.clone()).await?;
        let path = c.path(&k.digest);
        assert_eq!(std::fs::metadata(&path)?.len(), stored_len(k.len));
        for range in [
            0..1,
            65_535..65_537,
            100_000..204_800,
            0..204_800,
            204_799..204_800,
        ] {
            let got = c.get_range(&k, range.clone()).await?;
            assert_eq!(
                got.as_deref(),
                Some(&d[range.start as usize..range.end as usize])
            );
        }
        assert!(c.get_range(&k, 0..204_801).await?.is_none(), "past the end");
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = 9..3;
        assert!(c.get_range(&k, reversed).await?.is_none());
        assert_eq!(c.get_range(&k, 5..5).await?.as_deref(), Some(&[][..]));

        // Damage in the third block: a read of the first block does not touch it, a read
        // of the third finds it, discards the file and counts it.
        damage(&path, 140_000, 0x40)?;
        assert_eq!(c.get_range(&k, 10..20).await?.as_deref(), Some(&d[10..20]));
        assert!(c.get_range(&k, 131_072..131_080).await?.is_none());
        assert!(!path.exists(), "the damaged file is removed");
        assert!(!c.contains(&k.digest));
        assert_eq!(c.stats.corrupt.load(Ordering::Relaxed), 1);

        // A damaged footer (magic or digest) or checksum table is damage too.
        let stored = stored_len(k.len) as usize;
        for at in [stored - 1, stored - 20, d.len() + 2] {
            c.put(&k, d.clone()).await?;
            damage(&path, at, 1)?;
            assert!(c.get(&k).await?.is_none(), "damage at byte {at} is caught");
        }
        assert_eq!(c.stats.corrupt.load(Ordering::Relaxed), 4);

        // A truncated file serves no part.
        c.put(&k, d.clone()).await?;
        let whole = std::fs::read(&path)?;
        std::fs::write(&path, &whole[..whole.len() - 1])?;
        assert!(c.get_range(&k, 0..10).await?.is_none());
        assert!(c.get(&k).await?.is_none());
        assert_eq!(c.stats.corrupt.load(Ordering::Relaxed), 5);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_chunks_file_under_this_name_is_caught() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let c = DiskCache::open(dir.path(), 1 << 20)?;
        let (a, da) = chunk(1, 70_000);
        let (b, db) = chunk(2, 70_000);
        c.put(&a, da).await?;
        c.put(&b, db).await?;
        // A well-formed file of the same length, for the other chunk.
        std::fs::copy(c.path(&b.digest), c.path(&a.digest))?;
        assert!(c.get_range(&a, 0..10).await?.is_none());
        assert!(!c.contains(&a.digest));
        assert!(c.get_range(&b, 0..10).await?.is_some());
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_empty_chunk_is_stored_and_read() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let c = DiskCache::open(dir.path(), 1 << 20)?;
        let (k, d) = chunk(0, 0);
        c.put(&k, d).await?;
        assert_eq!(c.get(&k).await?.as_deref(), Some(&[][..]));
        assert_eq!(c.get_range(&k, 0..0).await?.as_deref(), Some(&[][..]));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_from_before_checksums_are_checked_by_digest() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (k, d) = varied_chunk();
        let hex = k.digest.hex();
        let shard = dir.path().join("chunks").join(&hex[..2]);
        std::fs::create_dir_all(&shard)?;
        std::fs::write(shard.join(&hex), &d)?;
        let c = DiskCache::open(dir.path(), 1 << 20)?;
        assert!(
            c.get_range(&k, 0..10).await?.is_none(),
            "no part reads without checksums: the whole-chunk path verifies it"
        );
        assert_eq!(c.get(&k).await?, Some(d.clone()));
        assert_eq!(
            std::fs::metadata(shard.join(&hex))?.len(),
            stored_len(k.len),
            "rewritten with checksums"
        );
        assert_eq!(c.bytes(), stored_len(k.len), "and counted at its new size");
        assert_eq!(c.get_range(&k, 0..10).await?.as_deref(), Some(&d[..10]));

        let mut bad = d.to_vec();
        bad[5] ^= 1;
        std::fs::write(shard.join(&hex), &bad)?;
        assert!(c.get(&k).await?.is_none());
        assert_eq!(c.stats.corrupt.load(Ordering::Relaxed), 1);

        // Where the checksums would not fit under the cap, the old file stays as it is.
        std::fs::write(shard.join(&hex), &d)?;
        let c = DiskCache::open(dir.path(), u64::from(k.len))?;
        assert_eq!(c.get(&k).await?, Some(d.clone()));
        assert_eq!(std::fs::metadata(shard.join(&hex))?.len(), u64::from(k.len));
        assert_eq!(c.bytes(), u64::from(k.len));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunk_being_written_is_neither_read_nor_evicted() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let c = DiskCache::open(dir.path(), stored_len(1000))?;
        let (k, d) = chunk(4, 1000);
        c.put(&k, d).await?;
        // As `put` leaves it between reserving the space and renaming the file into place.
        c.lock().entries.get_mut(&k.digest).unwrap().writing = true;
        assert!(!c.contains(&k.digest));
        assert!(c.get(&k).await?.is_none());
        assert!(c.get_range(&k, 0..10).await?.is_none());
        assert!(c.path(&k.digest).exists(), "a miss, not damage");
        let (k2, d2) = chunk(5, 1000);
        c.put(&k2, d2).await?;
        assert!(
            c.lock().entries.contains_key(&k.digest),
            "not evicted while written"
        );
        assert!(!c.contains(&k2.digest), "the newcomer did not fit");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_found_damaged_late_leaves_the_new_copy_being_written() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let c = DiskCache::open(dir.path(), 1 << 20)?;
        let (k, d) = chunk(6, 1000);
        // A writer reserves the chunk (its last copy was found damaged and dropped), and a
        // reader that had read that damaged copy too reports it only now.
        assert_eq!(
            c.reserve(&k.digest, stored_len(k.len), false),
            Reservation::Made
        );
        c.discard(&k.digest);
        c.write(&k, &d)?;
        c.settle(&k.digest, false, true);
        assert_eq!(c.get(&k).await?, Some(d), "the new copy is kept");
        assert_eq!(c.bytes(), stored_len(1000));
        // A damaged copy with no writer about goes, as before.
        let path = c.path(&k.digest);
        damage(&path, 3, 1)?;
        assert!(c.get(&k).await?.is_none());
        assert!(!path.exists());
        assert_eq!(c.bytes(), 0);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_found_damaged_after_a_new_one_was_placed_leaves_the_new_one() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let c = DiskCache::open(dir.path(), 1 << 20)?;
        let (k, d) = chunk(7, 1000);
        c.put(&k, d.clone()).await?;
        let path = c.path(&k.digest);
        // A reader has the copy open and finds it damaged; before it reports that, a good
        // copy was placed under the name (by another process sharing the directory, or by
        // a rewrite with checksums: both rename a new file over the old without a
        // reservation).
        damage(&path, 3, 1)?;
        let read = std::fs::File::open(&path)?;
        c.write(&k, &d)?;
        c.discard_read(&k.digest, &read);
        assert!(path.exists(), "the new copy stays");
        assert_eq!(c.get(&k).await?, Some(d), "and reads");
        assert_eq!(c.bytes(), stored_len(1000), "still counted");
        // The copy that is under the name when its reader reports it goes.
        damage(&path, 3, 1)?;
        let read = std::fs::File::open(&path)?;
        c.discard_read(&k.digest, &read);
        assert!(!path.exists());
        assert_eq!(c.bytes(), 0);
        assert!(c.get(&k).await?.is_none());
        Ok(())
    }

    /// A cache holding `n` chunks of 1000 bytes, reopened without its walk.
    async fn reopened_unwalked(
        n: u8,
        cap: u64,
    ) -> Result<(tempfile::TempDir, DiskCache, Vec<(ChunkKey, Bytes)>)> {
        let dir = tempfile::tempdir()?;
        let chunks: Vec<_> = (0..n).map(|i| chunk(i, 1000)).collect();
        {
            let c = DiskCache::open(dir.path(), 1 << 20)?;
            for (k, d) in &chunks {
                c.put(k, d.clone()).await?;
            }
        }
        let c = DiskCache::open_unstocked(dir.path(), cap)?;
        Ok((dir, c, chunks))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_serve_reads_before_the_walk_reaches_them() -> Result<()> {
        let (_dir, c, chunks) = reopened_unwalked(3, 1 << 20).await?;
        assert_eq!(c.bytes(), 0, "nothing counted before the walk");
        assert_eq!(c.get(&chunks[0].0).await?, Some(chunks[0].1.clone()));
        assert!(c.contains(&chunks[1].0.digest));
        assert_eq!(
            c.bytes(),
            2 * stored_len(1000),
            "the files used are counted"
        );
        let (absent, _) = chunk(9, 1000);
        assert!(!c.contains(&absent.digest));
        c.take_stock();
        assert_eq!(
            c.bytes(),
            3 * stored_len(1000),
            "the walk counts the rest, and nothing twice"
        );
        assert_eq!(c.get(&chunks[2].0).await?, Some(chunks[2].1.clone()));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_walk_ends_under_the_cap_keeping_what_was_used_meanwhile() -> Result<()> {
        let (dir, c, chunks) = reopened_unwalked(4, 2 * stored_len(1000)).await?;
        // Used while the walk goes on: it outranks every file the walk finds.
        assert!(c.get(&chunks[0].0).await?.is_some());
        c.take_stock();
        assert!(c.bytes() <= 2 * stored_len(1000));
        assert!(
            c.contains(&chunks[0].0.digest),
            "the chunk read meanwhile stays"
        );
        let files = walkdir_count(&dir.path().join(CHUNK_DIR));
        assert_eq!(files, 2, "evicted files are gone from the disk");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_removed_during_the_walk_is_not_counted_again() -> Result<()> {
        let (_dir, c, chunks) = reopened_unwalked(2, 1 << 20).await?;
        let found = c.walk();
        // Found damaged by a read after the walk saw it: removed, and must stay uncounted.
        let path = c.path(&chunks[0].0.digest);
        damage(&path, 3, 1)?;
        assert!(c.get(&chunks[0].0).await?.is_none());
        c.count(found);
        assert!(!c.contains(&chunks[0].0.digest));
        assert_eq!(c.bytes(), stored_len(1000));
        Ok(())
    }

    fn walkdir_count(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|shard| std::fs::read_dir(shard.path()).map_or(0, |f| f.count()))
            .sum()
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
