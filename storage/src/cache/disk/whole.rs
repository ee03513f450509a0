//! Whole files of an image, kept beside the chunks so that the kernel can read them itself
//! (FUSE passthrough) instead of asking the filesystem for every read.
//!
//! A whole file is copied from chunks this cache already holds, each part checked against
//! its chunk's block checksums on the way, and holds exactly the file's bytes (the kernel
//! serves it as the file, so nothing may follow them). What it should hold is sealed in an
//! extended attribute written with it: the file's key, its length and the CRC-32C of all its
//! bytes. The kernel's reads cannot be checked one by one, so the whole file is read and
//! matched against its seal before it is handed out; a damaged, torn or foreign file is
//! removed and counted like a damaged chunk. Whole files share the cache's cap and
//! least-recently-used order with the chunks.
//!
//! A file written or checked is recorded in `checked/`: this boot's id, the file's device,
//! inode, change time (ctime) and length. A later process of the same boot that finds the
//! record true hands the file out without reading it again: any write, truncation or
//! attribute change through the filesystem moves the ctime (which no program can set back),
//! and a new boot (a power loss may tear unsynced files) or a replaced file does not match.
//! What such a record cannot see is damage beneath the filesystem within one boot (a disk
//! returning wrong bytes without an error), as for every file the kernel reads.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use clip_index::Digest;
use tracing::{debug, warn};

use super::{CHECKED_DIR, DiskCache, Reservation};
use crate::cache::ChunkKey;
use crate::error::{Error, Result};

/// The extended attribute that seals a whole file.
const SEAL: &std::ffi::CStr = c"user.clip.whole";
/// The seal: the file's key, its length (little-endian), the CRC-32C of its bytes.
const SEAL_LEN: usize = 32 + 8 + 4;
/// Bytes read at a time when a whole file is copied or checked (memory stays flat).
const STEP: u32 = 4 << 20;

/// The key of the whole file that is `len` bytes at uncompressed `offset` of the layer with
/// digest `layer`: the same bytes in every image that shares the layer.
pub fn whole_key(layer: &Digest, offset: u64, len: u64) -> Digest {
    let mut id = Vec::with_capacity(64);
    id.extend_from_slice(b"clip whole file\0");
    id.extend_from_slice(&layer.0);
    id.extend_from_slice(&offset.to_le_bytes());
    id.extend_from_slice(&len.to_le_bytes());
    Digest::of(&id)
}

fn seal(key: &Digest, len: u64, crc: u32) -> [u8; SEAL_LEN] {
    let mut s = [0u8; SEAL_LEN];
    s[..32].copy_from_slice(&key.0);
    s[32..40].copy_from_slice(&len.to_le_bytes());
    s[40..].copy_from_slice(&crc.to_le_bytes());
    s
}

/// The seal stored on `file`, if it has one of the right size.
fn read_seal(file: &File) -> Option<[u8; SEAL_LEN]> {
    let mut s = [0u8; SEAL_LEN];
    // SAFETY: the descriptor is open and `s` is a writable buffer of SEAL_LEN bytes.
    let n = unsafe {
        libc::fgetxattr(
            file.as_raw_fd(),
            SEAL.as_ptr(),
            s.as_mut_ptr().cast(),
            SEAL_LEN,
        )
    };
    (n == SEAL_LEN as isize).then_some(s)
}

fn write_seal(file: &File, seal: &[u8; SEAL_LEN]) -> std::io::Result<()> {
    // SAFETY: the descriptor is open and `seal` is a readable buffer of SEAL_LEN bytes.
    let r = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            SEAL.as_ptr(),
            seal.as_ptr().cast(),
            SEAL_LEN,
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether `file` holds the `len` bytes its seal names for `key`: its length, every byte
/// read and summed, and the seal compared.
fn matches_seal(file: &File, key: &Digest, len: u64) -> std::io::Result<bool> {
    if file.metadata()?.len() != len {
        return Ok(false);
    }
    let Some(stored) = read_seal(file) else {
        return Ok(false);
    };
    // SAFETY: a hint about the open descriptor; no memory is passed.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
    let mut buf = vec![0u8; STEP as usize];
    let (mut at, mut crc) = (0u64, 0u32);
    while at < len {
        let n = (len - at).min(u64::from(STEP)) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        at += n as u64;
    }
    Ok(stored == seal(key, len, crc))
}

/// What a check record says of `file` for `key`: the boot, the file's identity and last
/// change, and its length.
fn check_record(boot: &str, key: &Digest, file: &File) -> std::io::Result<String> {
    let m = file.metadata()?;
    Ok(format!(
        "clip whole file checked\n{boot}\n{}\n{} {} {} {} {}\n",
        key.hex(),
        m.dev(),
        m.ino(),
        m.ctime(),
        m.ctime_nsec(),
        m.len()
    ))
}

impl DiskCache {
    /// Where the record that the whole file under `key` was checked in this boot is.
    pub(super) fn checked_path(&self, key: &Digest) -> PathBuf {
        self.dir.join(CHECKED_DIR).join(key.hex())
    }

    /// Records that `file` (the whole file under `key`, in place) holds what its seal says,
    /// for later processes of this boot. Best effort: without a record they check it.
    fn record_checked(&self, key: &Digest, file: &File) {
        let Some(boot) = &self.boot_id else { return };
        let tmp = self.temp_path(key);
        let written = check_record(boot, key, file)
            .and_then(|r| std::fs::write(&tmp, r))
            .and_then(|()| std::fs::rename(&tmp, self.checked_path(key)));
        if let Err(e) = written {
            debug!(key = %key, error = %e, "recording a checked whole file failed");
            std::fs::remove_file(&tmp).ok();
        }
    }

    /// Whether `file` (the whole file under `key`) was checked in this boot and has not
    /// changed since.
    fn checked_this_boot(&self, key: &Digest, file: &File) -> bool {
        let Some(boot) = &self.boot_id else {
            return false;
        };
        let Ok(stored) = std::fs::read_to_string(self.checked_path(key)) else {
            return false;
        };
        check_record(boot, key, file).is_ok_and(|now| now == stored)
    }

    /// Whether a whole file is kept under `key` (in place, not being written).
    pub fn has_whole(&self, key: &Digest) -> bool {
        self.adopt(key, true);
        self.lock()
            .entries
            .get(key)
            .is_some_and(|e| e.whole && !e.writing)
    }

    /// The whole file kept under `key`, which must be `len` bytes, opened read-only and
    /// checked: the first time this process opens it, every byte is read and matched
    /// against its seal, unless a record says it was checked in this boot and has not
    /// changed since. `None` on a miss, and for a damaged file, which is removed.
    pub fn open_whole(&self, key: &Digest, len: u64) -> Option<File> {
        if !self.has_whole(key) || !self.pin(key) {
            return None;
        }
        let found = self.open_whole_pinned(key, len);
        self.unpin(key);
        found
    }

    fn open_whole_pinned(&self, key: &Digest, len: u64) -> Option<File> {
        let path = self.path_of(key, true);
        let file = self.open_copy(key, &path)?;
        let verified = self.lock().entries.get(key).is_some_and(|e| e.verified);
        let right_length = file.metadata().is_ok_and(|m| m.len() == len);
        if verified && right_length {
            return Some(file);
        }
        let mark_verified = || {
            if let Some(e) = self.lock().entries.get_mut(key) {
                e.verified = true;
            }
        };
        if right_length && self.checked_this_boot(key, &file) {
            self.stats.whole_trusted.fetch_add(1, Ordering::Relaxed);
            mark_verified();
            return Some(file);
        }
        self.stats.whole_checked.fetch_add(1, Ordering::Relaxed);
        match matches_seal(&file, key, len) {
            Ok(true) => {
                mark_verified();
                self.record_checked(key, &file);
                Some(file)
            }
            Ok(false) => {
                self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                warn!(path = %path.display(), "damaged whole file in the disk cache; discarding it");
                self.discard(key);
                None
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "disk cache read failed");
                self.discard(key);
                None
            }
        }
    }

    /// Keeps a whole file under `key`, `len` bytes made of `parts` (chunk, bytes of it) in
    /// order, copied from the chunks this cache holds. `Ok(false)` when it is not kept: a
    /// chunk is missing or damaged, the file would take more than a quarter of the cap, or
    /// it does not fit beside what is being read. Every part is checked as it is copied.
    pub fn store_whole(
        &self,
        key: &Digest,
        len: u64,
        parts: &[(ChunkKey, Range<u32>)],
    ) -> Result<bool> {
        let total: u64 = parts.iter().map(|(_, r)| u64::from(r.end - r.start)).sum();
        if total != len {
            return Ok(false);
        }
        // The chunks stay while they are copied, whatever the reservation below evicts.
        let mut pinned = Vec::with_capacity(parts.len());
        for (k, _) in parts {
            if !self.pin(&k.digest) {
                pinned.iter().for_each(|d| self.unpin(d));
                return Ok(false);
            }
            pinned.push(k.digest);
        }
        let kept = self.copy_parts(key, len, parts);
        pinned.iter().for_each(|d| self.unpin(d));
        kept
    }

    fn copy_parts(&self, key: &Digest, len: u64, parts: &[(ChunkKey, Range<u32>)]) -> Result<bool> {
        let Some(mut writer) = self.begin_whole(key, len)? else {
            return Ok(self.has_whole(key));
        };
        for (chunk, range) in parts {
            if !writer.append(chunk, range.clone())? {
                return Ok(false);
            }
        }
        writer.finish()
    }

    /// Starts writing the whole file `key` of `len` bytes, part after part
    /// ([`WholeWriter::append`]), with its room in the cap reserved. `None` when it is kept
    /// already or being written, would take more than a quarter of the cap, or does not fit
    /// beside what is being read.
    pub(crate) fn begin_whole(&self, key: &Digest, len: u64) -> Result<Option<WholeWriter<'_>>> {
        if len == 0 || len > self.capacity / 4 {
            return Ok(None);
        }
        match self.reserve(key, len, true) {
            Reservation::Made => {}
            Reservation::Present { .. } | Reservation::Skipped => return Ok(None),
        }
        let tmp = self.temp_path(key);
        let file = match File::create(&tmp) {
            Ok(file) => file,
            Err(e) => {
                self.settle(key, true, false);
                return Err(whole_error(key, e));
            }
        };
        Ok(Some(WholeWriter {
            cache: self,
            key: *key,
            len,
            tmp,
            file,
            crc: 0,
            at: 0,
            placed: false,
        }))
    }
}

fn whole_error(key: &Digest, e: std::io::Error) -> Error {
    Error::Cache {
        tier: "disk",
        detail: format!("keeping whole file {key}: {e}"),
    }
}

/// A whole file being written under a temporary name ([`DiskCache::begin_whole`]), its
/// room reserved in the cap. Dropped before [`Self::finish`] placed it, it goes, and its
/// room with it.
#[derive(Debug)]
pub(crate) struct WholeWriter<'a> {
    cache: &'a DiskCache,
    key: Digest,
    len: u64,
    tmp: PathBuf,
    file: File,
    crc: u32,
    at: u64,
    placed: bool,
}

impl WholeWriter<'_> {
    /// Appends bytes `range` of `chunk`'s file in this cache, checked against the chunk's
    /// block checksums as they are read. `Ok(false)` when the chunk is not there or is
    /// damaged (the file cannot be finished then).
    pub(crate) fn append(&mut self, chunk: &ChunkKey, range: Range<u32>) -> Result<bool> {
        let cache = self.cache;
        if !cache.pin(&chunk.digest) {
            return Ok(false);
        }
        let copied = self.copy(chunk, range);
        cache.unpin(&chunk.digest);
        copied
    }

    fn copy(&mut self, chunk: &ChunkKey, range: Range<u32>) -> Result<bool> {
        let mut from = range.start;
        while from < range.end {
            let to = range.end.min(from.saturating_add(STEP));
            let Some(bytes) = self.cache.read_part(chunk, from..to) else {
                debug!(chunk = %chunk.digest, "a chunk of a whole file is gone; not kept");
                return Ok(false);
            };
            if self.at + bytes.len() as u64 > self.len {
                return Ok(false);
            }
            self.crc = crc32c::crc32c_append(self.crc, &bytes);
            self.file
                .write_all_at(&bytes, self.at)
                .map_err(|e| whole_error(&self.key, e))?;
            self.at += bytes.len() as u64;
            from = to;
        }
        Ok(true)
    }

    /// Seals the file and puts it in place. `Ok(false)` (and nothing kept) unless all its
    /// bytes were appended.
    pub(crate) fn finish(mut self) -> Result<bool> {
        if self.at != self.len {
            return Ok(false);
        }
        let cache = self.cache;
        let dest = cache.path_of(&self.key, true);
        write_seal(&self.file, &seal(&self.key, self.len, self.crc))
            .and_then(|()| std::fs::create_dir_all(dest.parent().unwrap_or(&cache.dir)))
            .and_then(|()| std::fs::rename(&self.tmp, &dest))
            .map_err(|e| whole_error(&self.key, e))?;
        self.placed = true;
        cache.settle(&self.key, true, true);
        cache.stats.whole_kept.fetch_add(1, Ordering::Relaxed);
        // Written from checked chunks just now: as good as read and matched in full.
        cache.record_checked(&self.key, &self.file);
        Ok(true)
    }
}

impl Drop for WholeWriter<'_> {
    fn drop(&mut self) {
        if !self.placed {
            std::fs::remove_file(&self.tmp).ok();
            self.cache.settle(&self.key, true, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::cache::ChunkCache;

    fn chunk(seed: u32, len: u32) -> (ChunkKey, Bytes) {
        let data: Vec<u8> = (0..len)
            .map(|i| (i.wrapping_mul(31).wrapping_add(seed) % 251) as u8)
            .collect();
        let data = Bytes::from(data);
        (
            ChunkKey {
                digest: Digest::of(&data),
                len,
            },
            data,
        )
    }

    /// Two chunks in the cache and a file made of the end of one and the start of the
    /// other: its parts and its bytes.
    async fn two_chunks(c: &DiskCache) -> Result<(Vec<(ChunkKey, Range<u32>)>, Vec<u8>)> {
        let (a, da) = chunk(1, 300_000);
        let (b, db) = chunk(2, 200_000);
        c.put(&a, da.clone()).await?;
        c.put(&b, db.clone()).await?;
        let parts = vec![(a, 100_000..300_000), (b, 0..150_000)];
        let want = [&da[100_000..], &db[..150_000]].concat();
        Ok((parts, want))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keeps_checks_and_reopens_a_whole_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let key = whole_key(&Digest::of(b"layer"), 100_000, 350_000);
        {
            let c = DiskCache::open(dir.path(), 10 << 20)?;
            let (parts, want) = two_chunks(&c).await?;
            assert!(c.open_whole(&key, 350_000).is_none(), "a miss");
            assert!(c.store_whole(&key, 350_000, &parts)?);
            assert!(c.has_whole(&key));
            let got = std::fs::read(c.path_of(&key, true))?;
            assert_eq!(got, want, "the file holds exactly the file's bytes");
            assert!(c.open_whole(&key, 350_000).is_some());
        }
        // A new process counts it in the cap and hands it out checked.
        let c = DiskCache::open(dir.path(), 10 << 20)?;
        assert!(c.bytes() >= 350_000);
        let f = c.open_whole(&key, 350_000).expect("kept across processes");
        let mut got = vec![0u8; 350_000];
        f.read_exact_at(&mut got, 0)?;
        assert!(c.lock().entries.get(&key).is_some_and(|e| e.verified));
        assert!(c.open_whole(&key, 349_999).is_none(), "not that length");
        Ok(())
    }

    /// A cache directory holding one whole file (written by a process that has ended), and
    /// the file's key.
    async fn one_whole_file_kept() -> Result<(tempfile::TempDir, Digest)> {
        let dir = tempfile::tempdir()?;
        let key = whole_key(&Digest::of(b"layer"), 0, 350_000);
        let c = DiskCache::open(dir.path(), 10 << 20)?;
        let (parts, _) = two_chunks(&c).await?;
        assert!(c.store_whole(&key, 350_000, &parts)?);
        Ok((dir, key))
    }

    /// Reads and checks in full: (checked, trusted on this boot's record).
    fn checks(c: &DiskCache) -> (u64, u64) {
        (
            c.stats.whole_checked.load(Ordering::Relaxed),
            c.stats.whole_trusted.load(Ordering::Relaxed),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn read_in_full_once_per_boot_unless_the_file_changed() -> Result<()> {
        let (dir, key) = one_whole_file_kept().await?;
        // Written from checked chunks in this boot: a later process trusts it unread.
        let c = DiskCache::open(dir.path(), 10 << 20)?;
        let path = c.path_of(&key, true);
        assert!(c.open_whole(&key, 350_000).is_some());
        assert_eq!(checks(&c), (0, 1));
        // Damage after this process took the file goes unseen by it (the cost of not reading
        // the whole file at every open)...
        let seal = read_seal(&File::open(&path)?).expect("sealed");
        let mut bytes = std::fs::read(&path)?;
        bytes[5] ^= 1;
        std::fs::write(&path, &bytes)?;
        write_seal(&File::open(&path)?, &seal)?;
        assert!(c.open_whole(&key, 350_000).is_some());
        // ...but a write moved the file's ctime, so the next process reads it in full.
        let c = DiskCache::open(dir.path(), 10 << 20)?;
        assert!(c.open_whole(&key, 350_000).is_none());
        assert_eq!(checks(&c), (1, 0));
        assert!(!path.exists() && !c.checked_path(&key).exists());
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_boot_or_a_lost_record_means_a_full_check() -> Result<()> {
        let (dir, key) = one_whole_file_kept().await?;
        // Another boot: read in full, then recorded for that boot.
        let mut c = DiskCache::open(dir.path(), 10 << 20)?;
        c.boot_id = Some("another boot".into());
        assert!(c.open_whole(&key, 350_000).is_some());
        assert_eq!(checks(&c), (1, 0));
        let mut c = DiskCache::open(dir.path(), 10 << 20)?;
        c.boot_id = Some("another boot".into());
        assert!(c.open_whole(&key, 350_000).is_some());
        assert_eq!(checks(&c), (0, 1));
        // No record (or no boot id to match it against): read in full.
        std::fs::remove_file(c.checked_path(&key))?;
        let c = DiskCache::open(dir.path(), 10 << 20)?;
        assert!(c.open_whole(&key, 350_000).is_some());
        assert_eq!(checks(&c), (1, 0));
        let mut c = DiskCache::open(dir.path(), 10 << 20)?;
        c.boot_id = None;
        assert!(c.open_whole(&key, 350_000).is_some());
        assert_eq!(checks(&c), (1, 0));
        // A record of another file (a copy put in its place) does not match.
        let c = DiskCache::open(dir.path(), 10 << 20)?;
        let path = c.path_of(&key, true);
        let copy = dir.path().join("copy");
        std::fs::copy(&path, &copy)?;
        write_seal(
            &File::open(&copy)?,
            &read_seal(&File::open(&path)?).expect("sealed"),
        )?;
        std::fs::rename(&copy, &path)?;
        assert!(c.open_whole(&key, 350_000).is_some(), "same bytes, sealed");
        assert_eq!(checks(&c), (1, 0));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn served_before_the_walk_which_sweeps_records_of_files_gone() -> Result<()> {
        let (dir, key) = one_whole_file_kept().await?;
        // A record left by a crash between removing a whole file and its record.
        let stale = whole_key(&Digest::of(b"layer"), 1, 2);
        let c = DiskCache::open_unstocked(dir.path(), 10 << 20)?;
        std::fs::write(c.checked_path(&stale), "boot")?;
        assert!(c.has_whole(&key), "found where its key puts it");
        let f = c.open_whole(&key, 350_000).expect("served before the walk");
        assert_eq!(f.metadata()?.len(), 350_000);
        assert_eq!(checks(&c), (0, 1), "and trusted on this boot's record");
        c.take_stock();
        assert!(
            !c.checked_path(&stale).exists(),
            "the stale record is swept"
        );
        assert!(c.checked_path(&key).exists(), "a kept file's record stays");
        assert!(c.open_whole(&key, 350_000).is_some());
        let walked_at_open = DiskCache::open(dir.path(), 10 << 20)?;
        assert_eq!(c.bytes(), walked_at_open.bytes(), "nothing counted twice");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_torn_or_unsealed_whole_file_is_removed() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let key = whole_key(&Digest::of(b"layer"), 0, 350_000);
        let path;
        {
            let c = DiskCache::open(dir.path(), 10 << 20)?;
            let (parts, _) = two_chunks(&c).await?;
            assert!(c.store_whole(&key, 350_000, &parts)?);
            path = c.path_of(&key, true);
        }
        let good = std::fs::read(&path)?;
        let seal_of = |p: &std::path::Path| read_seal(&File::open(p).unwrap());
        let stored = seal_of(&path).expect("sealed");
        for damage in ["flip", "truncate", "unseal", "other key"] {
            let mut bytes = good.clone();
            match damage {
                "flip" => bytes[123_456] ^= 1,
                "truncate" => bytes.truncate(349_000),
                _ => {}
            }
            std::fs::write(&path, &bytes)?;
            match damage {
                "unseal" => {}
                "other key" => {
                    let other = whole_key(&Digest::of(b"another layer"), 0, 350_000);
                    write_seal(&File::open(&path)?, &seal(&other, 350_000, 0))?
                }
                _ => write_seal(&File::open(&path)?, &stored)?,
            }
            let c = DiskCache::open(dir.path(), 10 << 20)?;
            assert!(c.has_whole(&key));
            assert!(c.open_whole(&key, 350_000).is_none(), "{damage} is caught");
            assert!(!path.exists(), "{damage}: the file is removed");
            assert!(!c.has_whole(&key));
            assert_eq!(c.stats.corrupt.load(Ordering::Relaxed), 1);
        }
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn not_kept_without_every_chunk_or_room() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let c = DiskCache::open(dir.path(), 10 << 20)?;
        let (parts, _) = two_chunks(&c).await?;
        let key = whole_key(&Digest::of(b"layer"), 0, 350_000);
        let (missing, _) = chunk(3, 1000);
        let with_missing = [parts[0].clone(), (missing, 0..1000)];
        assert!(!c.store_whole(&key, 201_000, &with_missing)?);
        assert!(!c.has_whole(&key));
        assert!(!c.store_whole(&key, 1, &parts)?, "parts must add up");
        // Damage in a chunk is caught on the way: no whole file, and the chunk goes.
        let chunk_path = c.path(&parts[1].0.digest);
        let mut bytes = std::fs::read(&chunk_path)?;
        bytes[10] ^= 1;
        std::fs::write(&chunk_path, &bytes)?;
        assert!(!c.store_whole(&key, 350_000, &parts)?);
        assert!(!c.has_whole(&key));
        assert!(!c.contains(&parts[1].0.digest));
        assert!(
            !std::fs::read_dir(dir.path().join("tmp"))?.any(|_| true),
            "no temporary file left"
        );

        let small = tempfile::tempdir()?;
        let c = DiskCache::open(small.path(), 1_200_000)?;
        let (parts, _) = two_chunks(&c).await?;
        assert!(
            !c.store_whole(&key, 350_000, &parts)?,
            "over a quarter of the cap"
        );
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn whole_files_share_the_cap_and_are_evicted_like_chunks() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let c = DiskCache::open(dir.path(), 1_600_000)?;
        let (parts, _) = two_chunks(&c).await?;
        let key = whole_key(&Digest::of(b"layer"), 0, 350_000);
        assert!(c.store_whole(&key, 350_000, &parts)?);
        assert!(c.checked_path(&key).exists(), "recorded as checked");
        // Newer chunks push the older entries out, the whole file among them.
        for seed in 10..20 {
            let (k, d) = chunk(seed, 150_000);
            c.put(&k, d).await?;
        }
        assert!(c.bytes() <= 1_600_000);
        assert!(!c.has_whole(&key));
        assert!(!c.path_of(&key, true).exists());
        assert!(!c.checked_path(&key).exists(), "its record went with it");
        Ok(())
    }
}
