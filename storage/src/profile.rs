//! Start-up profiles: the chunks a mount's readers asked for first, in the order they asked.
//!
//! A program's start-up reads one file after another, so a cold mount serves it one miss at a
//! time, a round trip each. A mount records which chunks its readers wanted during its first
//! [`RECORD_WINDOW`]; a later mount of the same image (a restarted pod, a cache that was
//! emptied) replays that list: it fetches the spans holding those chunks ahead of the
//! program, several at a time, while the program still reads its first files.
//!
//! It also records which bytes of files were read ([`FileRead`]: the data of small files
//! and the parts of larger ones the readers asked for, and the files handed to the kernel
//! whole). A later mount whose cache holds them already (a warm start) reads those bytes off
//! its disk ahead of the program, all at once: the program then finds them in memory
//! instead of waiting for the disk at each file it opens.
//!
//! And it records which names the readers looked up, found or not ([`Profile::paths`]): a
//! later mount looks them up itself as soon as it is up, and puts the data of the small
//! files among them in the kernel's page cache, so that the program finds names,
//! attributes, missing names and small files cached in the kernel and asks the filesystem
//! for none of them.
//!
//! On disk a profile is text: a header line, then one line per chunk, `LAYER-DIGEST CHUNK`,
//! one per read, `LAYER-DIGEST read OFFSET LEN` or `LAYER-DIGEST whole OFFSET LEN`, and one
//! per name looked up, `path PATH` (from the image's root, bytes other than printable ASCII,
//! space and `%` written `%XX`). That is format 3; format 2 has no path lines and format 1
//! chunk lines only, and both are still read. Layers are named by digest, not position, so
//! a profile still helps an image that shares layers with the one that recorded it, and
//! lines of layers an image does not have, or of paths it does not have a directory for,
//! are skipped.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clip_index::{Digest, ImageIndex};

use crate::error::{Error, Result};

/// How long after its first read or lookup a mount records.
pub const RECORD_WINDOW: Duration = Duration::from_secs(60);
/// Most chunks a profile holds (1 KiB chunks would be 4 MiB; clip's default is about 1 MiB),
/// and most reads.
pub const RECORD_LIMIT: usize = 4096;
/// Largest profile file read: above [`RECORD_LIMIT`] lines of chunks and of reads, and path
/// lines up to it ([`encode`] leaves out the names that would not fit).
pub const MAX_PROFILE_BYTES: u64 = 4 << 20;

const HEADER: &str = "clip-startup-profile 3";
/// Profiles without paths, as written before lookups were recorded.
const HEADER_2: &str = "clip-startup-profile 2";
/// Profiles of chunks only, as written before reads were recorded.
const HEADER_1: &str = "clip-startup-profile 1";
/// Longest path a profile keeps (the kernel's PATH_MAX).
const MAX_PATH: usize = 4096;

/// Bytes of a file a reader wanted: `len` bytes at uncompressed `offset` of `layer`, or with
/// `whole` the file of those bytes, handed to the kernel whole (FUSE passthrough).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileRead {
    pub layer: usize,
    pub offset: u64,
    pub len: u64,
    pub whole: bool,
}

/// What a mount's readers asked for first: chunks (for a cold start, fetched ahead), reads
/// of files (for a warm one, read off the local disk ahead) and names, first touch first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    pub chunks: Vec<(usize, u32)>,
    pub reads: Vec<FileRead>,
    /// Names looked up, found or not, as paths from the image's root without a leading
    /// slash (`usr/lib/os.py`); every component but the last is a directory of the image.
    pub paths: Vec<Vec<u8>>,
}

impl Profile {
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.reads.is_empty() && self.paths.is_empty()
    }

    /// The bytes the profile's reads (not those of files handed over whole) cover, to ask
    /// which files they touch.
    pub fn read_spans(&self) -> ReadSpans {
        ReadSpans(Covered::of(self.reads.iter().filter(|r| !r.whole)))
    }

    /// The reads to bring ahead: those of files handed over whole, and the others unless a
    /// file handed over whole holds their bytes (read before it was kept whole: the kernel
    /// now reads the whole copy, not the chunks).
    pub fn reads_to_bring(&self) -> Vec<FileRead> {
        let wholes = Covered::of(self.reads.iter().filter(|r| r.whole));
        self.reads
            .iter()
            .filter(|r| r.whole || !wholes.holds(r, true))
            .copied()
            .collect()
    }
}

/// The bytes some reads cover ([`Profile::read_spans`]).
#[derive(Debug)]
pub struct ReadSpans(Covered);

impl ReadSpans {
    /// Whether any of the `len` bytes at `offset` of `layer` was read.
    pub fn touch(&self, layer: usize, offset: u64, len: u64) -> bool {
        let Some(spans) = self.0.0.get(&(layer, false)) else {
            return false;
        };
        // The first span ending after `offset`: it starts before the end of the bytes, or
        // none touches them.
        let i = spans.partition_point(|&(_, end)| end <= offset);
        spans
            .get(i)
            .is_some_and(|&(start, _)| len > 0 && start < offset.saturating_add(len))
    }
}

thread_local! {
    /// Set while this thread works for the mount itself, not for a program.
    static UNRECORDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `work` with nothing it reads on this thread recorded (nor opening the recording
/// window): for a mount's own reads ahead of a program, such as the prefill's.
pub fn unrecorded<T>(work: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            UNRECORDED.with(|u| u.set(self.0));
        }
    }
    let _reset = Reset(UNRECORDED.with(|u| u.replace(true)));
    work()
}

/// The chunks and reads so far, first touch first, within the window and the limit.
#[derive(Debug, Default)]
pub struct Recorder {
    state: Mutex<RecorderState>,
    /// The window or the limit is behind: reads no longer take the lock.
    closed: AtomicBool,
}

#[derive(Debug, Default)]
struct RecorderState {
    first: Option<Instant>,
    seen: HashSet<(usize, u32)>,
    order: Vec<(usize, u32)>,
    reads: Vec<FileRead>,
    /// Where each read recorded ends (layer, end offset) and where it starts, to the read's
    /// position: a read that goes on from one, or starts where one did, extends it.
    ends: HashMap<(usize, u64, bool), usize>,
    starts: HashMap<(usize, u64, bool), usize>,
    /// Names looked up: (directory inode, name), first lookup first.
    lookups: Vec<(u64, Box<[u8]>)>,
    seen_lookups: HashSet<(u64, Box<[u8]>)>,
}

impl Recorder {
    /// The state while recording (within the window, which the first call opens).
    fn recording(&self) -> Option<std::sync::MutexGuard<'_, RecorderState>> {
        if self.closed.load(Ordering::Relaxed) || UNRECORDED.with(std::cell::Cell::get) {
            return None;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let first = *s.first.get_or_insert(now);
        if now.duration_since(first) > RECORD_WINDOW {
            self.closed.store(true, Ordering::Relaxed);
            return None;
        }
        Some(s)
    }

    /// Stops recording once all three lists are full (until then another may still have
    /// room, and the lock stays taken).
    fn close_if_full(&self, s: &RecorderState) {
        if s.order.len() >= RECORD_LIMIT
            && s.reads.len() >= RECORD_LIMIT
            && s.lookups.len() >= RECORD_LIMIT
        {
            self.closed.store(true, Ordering::Relaxed);
        }
    }

    /// A reader wanted bytes of a file (see [`FileRead`]). A read that continues one
    /// recorded before (a sequential reader) or starts where one did (the same file read
    /// again) extends it instead of taking a line.
    pub fn note_read(&self, read: FileRead) {
        if read.len == 0 {
            return;
        }
        let Some(mut s) = self.recording() else {
            return;
        };
        let end = read.offset.saturating_add(read.len);
        let at = s
            .ends
            .remove(&(read.layer, read.offset, read.whole))
            .or_else(|| {
                s.starts
                    .get(&(read.layer, read.offset, read.whole))
                    .copied()
            });
        if let Some(i) = at {
            let start = s.reads[i].offset;
            let old_end = start + s.reads[i].len;
            let new_end = end.max(old_end);
            s.reads[i].len = new_end - start;
            s.ends.remove(&(read.layer, old_end, read.whole));
            s.ends.insert((read.layer, new_end, read.whole), i);
            return;
        }
        if s.reads.len() >= RECORD_LIMIT {
            self.close_if_full(&s);
            return;
        }
        let i = s.reads.len();
        s.reads.push(read);
        s.starts.insert((read.layer, read.offset, read.whole), i);
        s.ends.insert((read.layer, end, read.whole), i);
    }

    /// A reader looked up `name` in directory `dir` (an inode of the index).
    pub fn note_lookup(&self, dir: u64, name: &[u8]) {
        let Some(mut s) = self.recording() else {
            return;
        };
        if s.lookups.len() >= RECORD_LIMIT {
            self.close_if_full(&s);
            return;
        }
        let key: (u64, Box<[u8]>) = (dir, name.into());
        if s.seen_lookups.insert(key.clone()) {
            s.lookups.push(key);
        }
    }

    /// A reader wanted `chunks` of `layer`.
    pub fn note(&self, layer: usize, chunks: Range<u32>) {
        let Some(mut s) = self.recording() else {
            return;
        };
        for c in chunks {
            if s.order.len() >= RECORD_LIMIT {
                self.close_if_full(&s);
                return;
            }
            if s.seen.insert((layer, c)) {
                s.order.push((layer, c));
            }
        }
    }

    /// When recording stops: [`RECORD_WINDOW`] after the first read (none yet: unknown).
    pub fn window_end(&self) -> Option<Instant> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.first.map(|f| f + RECORD_WINDOW)
    }

    /// The chunks and reads recorded, first touch first (no paths: see
    /// [`Self::recorded_paths`]).
    pub fn recorded(&self) -> Profile {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Profile {
            chunks: s.order.clone(),
            reads: s.reads.clone(),
            paths: Vec::new(),
        }
    }

    /// The names looked up, first lookup first, as paths of `index` (whose inodes the
    /// lookups named).
    pub fn recorded_paths(&self, index: &ImageIndex) -> Vec<Vec<u8>> {
        let lookups = {
            let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            s.lookups.clone()
        };
        lookup_paths(index, &lookups)
    }
}

/// The paths of names looked up in directories of `index` (one walk of the tree, for the
/// directories' own paths); names in inodes that are not directories of it are left out.
fn lookup_paths(index: &ImageIndex, lookups: &[(u64, Box<[u8]>)]) -> Vec<Vec<u8>> {
    if lookups.is_empty() {
        return Vec::new();
    }
    let wanted: HashSet<u64> = lookups.iter().map(|(dir, _)| *dir).collect();
    let mut dirs: HashMap<u64, Vec<u8>> = HashMap::new();
    index.walk(|path, ino, node| {
        if node.kind == clip_index::NodeKind::Directory && wanted.contains(&ino.0) {
            dirs.insert(ino.0, path.strip_prefix(b"/").unwrap_or(path).to_vec());
        }
    });
    lookups
        .iter()
        .filter_map(|(dir, name)| {
            let mut path = dirs.get(dir)?.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(name);
            (path.len() <= MAX_PATH).then_some(path)
        })
        .collect()
}

/// `path` as a profile writes it: bytes other than printable ASCII, space and `%` as `%XX`.
fn escape_path(path: &[u8]) -> String {
    let mut out = String::with_capacity(path.len());
    for &b in path {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The path a profile's `path` field names, if it is one a mount may look up: escapes
/// well formed, relative, no empty, `.` or `..` component, no NUL, at most [`MAX_PATH`]
/// bytes.
fn unescape_path(field: &str) -> Option<Vec<u8>> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let clean = out.len() <= MAX_PATH
        && !out.contains(&0)
        && out
            .split(|&b| b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b"..");
    clean.then_some(out)
}

/// The directory of `index` that holds `path`'s last component, when every component but
/// the last is a directory (found by name, never through a symlink): the only paths a
/// mount looks up for a profile.
pub fn parent_directory(index: &ImageIndex, path: &[u8]) -> Option<clip_index::Inode> {
    let mut dir = clip_index::Inode::ROOT;
    let mut parts = path.split(|&b| b == b'/').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            return Some(dir);
        }
        let next = index.lookup(dir, part)?;
        if index.node(next)?.kind != clip_index::NodeKind::Directory {
            return None;
        }
        dir = next;
    }
    None
}

/// The bytes some reads cover, per layer and kind (whole or not), as sorted spans that
/// neither touch nor overlap.
#[derive(Debug)]
struct Covered(HashMap<(usize, bool), Vec<(u64, u64)>>);

impl Covered {
    fn of<'a>(reads: impl IntoIterator<Item = &'a FileRead>) -> Self {
        let mut spans: HashMap<(usize, bool), Vec<(u64, u64)>> = HashMap::new();
        for r in reads {
            spans
                .entry((r.layer, r.whole))
                .or_default()
                .push((r.offset, r.offset.saturating_add(r.len)));
        }
        for s in spans.values_mut() {
            s.sort_unstable();
            let mut joined: Vec<(u64, u64)> = Vec::with_capacity(s.len());
            for &(start, end) in s.iter() {
                match joined.last_mut() {
                    Some(last) if start <= last.1 => last.1 = last.1.max(end),
                    _ => joined.push((start, end)),
                }
            }
            *s = joined;
        }
        Self(spans)
    }

    /// Whether reads of kind `whole` cover every byte of `r`.
    fn holds(&self, r: &FileRead, whole: bool) -> bool {
        let Some(spans) = self.0.get(&(r.layer, whole)) else {
            return false;
        };
        // The last span starting at or before the read: it holds the read, or none does.
        let i = spans.partition_point(|&(start, _)| start <= r.offset);
        i > 0 && spans[i - 1].1 >= r.offset.saturating_add(r.len)
    }
}

/// What a mount leaves for the next: the chunks and reads its readers asked for first, then
/// those of the profile it replayed that they did not ask for (up to the limit), so a short
/// mount does not make a profile forget what a longer one learnt.
pub fn merge(recorded: &Profile, replayed: &Profile) -> Profile {
    fn after<T: Copy + Eq + std::hash::Hash>(first: &[T], then: &[T]) -> Vec<T> {
        let seen: HashSet<&T> = first.iter().collect();
        let mut out = first.to_vec();
        out.extend(then.iter().filter(|c| !seen.contains(c)));
        out.truncate(RECORD_LIMIT);
        out
    }
    // A replayed read whose bytes this mount read too (perhaps in other pieces: the kernel's
    // requests do not come in the same order every time) is not kept twice.
    let covered = Covered::of(&recorded.reads);
    let new: Vec<FileRead> = replayed
        .reads
        .iter()
        .filter(|r| !covered.holds(r, r.whole))
        .copied()
        .collect();
    Profile {
        chunks: after(&recorded.chunks, &replayed.chunks),
        reads: after(&recorded.reads, &new),
        paths: {
            let seen: HashSet<&Vec<u8>> = recorded.paths.iter().collect();
            let mut out = recorded.paths.clone();
            out.extend(replayed.paths.iter().filter(|p| !seen.contains(p)).cloned());
            out.truncate(RECORD_LIMIT);
            out
        },
    }
}

/// The text of `profile` of `index`.
pub fn encode(index: &ImageIndex, profile: &Profile) -> String {
    let mut out = format!("{HEADER}\n");
    for &(layer, c) in &profile.chunks {
        if let Some(l) = index.layers.get(layer) {
            out.push_str(&format!("{} {c}\n", l.digest));
        }
    }
    for r in &profile.reads {
        if let Some(l) = index.layers.get(r.layer) {
            let kind = if r.whole { "whole" } else { "read" };
            out.push_str(&format!("{} {kind} {} {}\n", l.digest, r.offset, r.len));
        }
    }
    for p in &profile.paths {
        let line = format!("path {}\n", escape_path(p));
        // The names last: those past the size a reader takes are left out, not the file.
        if (out.len() + line.len()) as u64 > MAX_PROFILE_BYTES {
            break;
        }
        out.push_str(&line);
    }
    out
}

/// The chunks and reads of `index` a profile names, in its order. Lines of layers the
/// image does not have, past a layer's last chunk or its end, are skipped; a file that is
/// not a profile, or a line that is not one of the forms above, is an error.
pub fn decode(text: &str, index: &ImageIndex) -> Result<Profile> {
    let bad = |line: usize, reason: &str| Error::Profile {
        line,
        reason: reason.to_owned(),
    };
    let mut lines = text.lines();
    let (reads_allowed, paths_allowed) = match lines.next().map(str::trim_end) {
        Some(HEADER) => (true, true),
        Some(HEADER_2) => (true, false),
        Some(HEADER_1) => (false, false),
        _ => return Err(bad(1, "not a clip start-up profile")),
    };
    let mut out = Profile::default();
    let mut seen = HashSet::new();
    let mut seen_reads = HashSet::new();
    let mut seen_paths = HashSet::new();
    for (i, line) in lines.enumerate() {
        let n = i + 2;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split(' ').filter(|f| !f.is_empty());
        if paths_allowed && line.starts_with("path ") {
            fields.next();
            let (Some(field), None) = (fields.next(), fields.next()) else {
                return Err(bad(n, "expected one path"));
            };
            let path = unescape_path(field).ok_or_else(|| bad(n, "not a clean relative path"))?;
            if parent_directory(index, &path).is_some()
                && out.paths.len() < RECORD_LIMIT
                && seen_paths.insert(path.clone())
            {
                out.paths.push(path);
            }
            continue;
        }
        let (Some(digest), Some(second)) = (fields.next(), fields.next()) else {
            return Err(bad(n, "expected a layer digest and a chunk number"));
        };
        let digest: Digest = digest.parse().map_err(|_| bad(n, "not a sha256 digest"))?;
        let layer = index.layers.iter().position(|l| l.digest == digest);
        if let kind @ ("read" | "whole") = second {
            if !reads_allowed {
                return Err(bad(n, "not a chunk number"));
            }
            let mut number = |what: &str| {
                fields
                    .next()
                    .and_then(|f| f.parse::<u64>().ok())
                    .ok_or_else(|| bad(n, what))
            };
            let (offset, len) = (number("not an offset")?, number("not a length")?);
            if fields.next().is_some() {
                return Err(bad(n, "more than a read's offset and length"));
            }
            let Some(layer) = layer else { continue };
            let inside = offset
                .checked_add(len)
                .is_some_and(|end| len > 0 && end <= index.layers[layer].uncompressed_size);
            let read = FileRead {
                layer,
                offset,
                len,
                whole: kind == "whole",
            };
            if inside && out.reads.len() < RECORD_LIMIT && seen_reads.insert(read) {
                out.reads.push(read);
            }
            continue;
        }
        let chunk: u32 = second.parse().map_err(|_| bad(n, "not a chunk number"))?;
        if fields.next().is_some() {
            return Err(bad(n, "more than a layer digest and a chunk number"));
        }
        let Some(layer) = layer else { continue };
        if (chunk as usize) < index.layers[layer].chunks.len()
            && out.chunks.len() < RECORD_LIMIT
            && seen.insert((layer, chunk))
        {
            out.chunks.push((layer, chunk));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_keeps_first_touches_up_to_the_limit() {
        let r = Recorder::default();
        r.note(1, 5..7);
        r.note(0, 6..8);
        r.note(1, 4..6);
        assert_eq!(
            r.recorded().chunks,
            [(1, 5), (1, 6), (0, 6), (0, 7), (1, 4)]
        );
        r.note(2, 0..(RECORD_LIMIT as u32 * 2));
        assert_eq!(r.recorded().chunks.len(), RECORD_LIMIT);
    }

    fn read(layer: usize, offset: u64, len: u64) -> FileRead {
        FileRead {
            layer,
            offset,
            len,
            whole: false,
        }
    }

    #[test]
    fn reads_that_go_on_or_start_again_extend_the_one_recorded() {
        let r = Recorder::default();
        r.note_read(read(0, 100, 50));
        r.note_read(read(1, 0, 10));
        // A sequential reader's next request, then the same file read again from its start.
        r.note_read(read(0, 150, 50));
        r.note_read(read(0, 100, 20));
        r.note_read(read(0, 200, 10));
        // The same bytes handed over whole are another record; an empty read is none.
        r.note_read(FileRead {
            whole: true,
            ..read(1, 0, 10)
        });
        r.note_read(read(2, 5, 0));
        assert_eq!(
            r.recorded().reads,
            [
                read(0, 100, 110),
                read(1, 0, 10),
                FileRead {
                    whole: true,
                    ..read(1, 0, 10)
                }
            ]
        );
        for i in 0..RECORD_LIMIT as u64 * 2 {
            r.note_read(read(3, i * 10, 5));
        }
        assert_eq!(r.recorded().reads.len(), RECORD_LIMIT);
    }

    #[test]
    fn reads_of_a_file_now_handed_over_whole_are_not_brought_again() {
        let whole = FileRead {
            whole: true,
            ..read(0, 100, 50)
        };
        let p = Profile {
            chunks: Vec::new(),
            reads: vec![
                read(0, 100, 20),
                read(0, 140, 10),
                read(0, 140, 11),
                whole,
                read(1, 100, 20),
            ],
            paths: Vec::new(),
        };
        assert_eq!(
            p.reads_to_bring(),
            [read(0, 140, 11), whole, read(1, 100, 20)]
        );
    }

    #[test]
    fn a_saved_profile_keeps_what_this_mount_did_not_read() {
        let p = |chunks: &[(usize, u32)], reads: &[FileRead]| Profile {
            chunks: chunks.to_vec(),
            reads: reads.to_vec(),
            paths: Vec::new(),
        };
        assert_eq!(
            merge(
                &p(&[(0, 3), (1, 1)], &[read(0, 1, 2)]),
                &p(&[(1, 1), (0, 9), (0, 3)], &[read(0, 5, 1), read(0, 1, 2)])
            ),
            p(&[(0, 3), (1, 1), (0, 9)], &[read(0, 1, 2), read(0, 5, 1)])
        );
        // Bytes this mount read in other pieces are not kept twice; a read reaching past
        // them, another layer's, or the same bytes handed over whole are.
        let whole = FileRead {
            whole: true,
            ..read(0, 10, 20)
        };
        assert_eq!(
            merge(
                &p(&[], &[read(0, 10, 10), read(0, 20, 10), read(0, 50, 5)]),
                &p(
                    &[],
                    &[read(0, 12, 15), read(0, 25, 10), read(1, 10, 5), whole]
                )
            )
            .reads,
            [
                read(0, 10, 10),
                read(0, 20, 10),
                read(0, 50, 5),
                read(0, 25, 10),
                read(1, 10, 5),
                whole
            ]
        );
        let long: Vec<(usize, u32)> = (0..RECORD_LIMIT as u32).map(|c| (0, c)).collect();
        assert_eq!(
            merge(&p(&[(1, 0)], &[]), &p(&long, &[])).chunks.len(),
            RECORD_LIMIT
        );
    }

    #[test]
    fn a_saved_profile_keeps_the_names_this_mount_did_not_look_up() {
        let named = |paths: &[&str]| Profile {
            paths: paths.iter().map(|p| p.as_bytes().to_vec()).collect(),
            ..Profile::default()
        };
        assert_eq!(
            merge(
                &named(&["usr", "usr/lib"]),
                &named(&["etc", "usr", "etc/x"])
            ),
            named(&["usr", "usr/lib", "etc", "etc/x"])
        );
        let many: Vec<String> = (0..RECORD_LIMIT).map(|i| format!("f{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            merge(&named(&["a"]), &named(&many)).paths.len(),
            RECORD_LIMIT
        );
    }

    #[test]
    fn paths_are_written_escaped_and_only_clean_ones_are_read_back() {
        for path in [&b"usr/lib/a b%.py"[..], b"caf\xc3\xa9/\x01\x7f", b"x"] {
            let text = escape_path(path);
            assert!(!text.contains([' ', '\n']), "{text}");
            assert_eq!(unescape_path(&text).as_deref(), Some(path));
        }
        assert_eq!(escape_path(b"a b%"), "a%20b%25");
        for bad in [
            "", "/etc", "a//b", "a/", "./a", "a/../b", "..", "%zz", "%0", "a%00b", "%2F..", "%+F",
        ] {
            assert_eq!(unescape_path(bad), None, "{bad}");
        }
        // An escaped slash is a slash: "a%2Fb" is the path a/b.
        assert_eq!(unescape_path("a%2Fb").as_deref(), Some(&b"a/b"[..]));
        assert_eq!(unescape_path(&"a".repeat(MAX_PATH + 1)), None);
    }

    #[test]
    fn lookups_are_recorded_once_each_first_one_first_up_to_the_limit() {
        let r = Recorder::default();
        r.note_lookup(1, b"usr");
        r.note_lookup(2, b"lib");
        r.note_lookup(1, b"usr");
        r.note_lookup(2, b"missing");
        let s = r.state.lock().unwrap();
        let names: Vec<(u64, &[u8])> = s.lookups.iter().map(|(d, n)| (*d, &n[..])).collect();
        assert_eq!(names, [(1, &b"usr"[..]), (2, b"lib"), (2, b"missing")]);
        drop(s);
        for i in 0..RECORD_LIMIT * 2 {
            r.note_lookup(3, format!("n{i}").as_bytes());
        }
        assert_eq!(r.state.lock().unwrap().lookups.len(), RECORD_LIMIT);
    }

    #[test]
    fn reads_touch_the_files_whose_bytes_they_cover() {
        let whole = FileRead {
            whole: true,
            ..read(0, 1000, 100)
        };
        let p = Profile {
            reads: vec![read(0, 100, 50), read(0, 140, 20), read(1, 0, 10), whole],
            ..Profile::default()
        };
        let spans = p.read_spans();
        assert!(spans.touch(0, 100, 1));
        assert!(spans.touch(0, 90, 11));
        assert!(spans.touch(0, 159, 100));
        assert!(!spans.touch(0, 90, 10));
        assert!(!spans.touch(0, 160, 10));
        assert!(!spans.touch(0, 120, 0));
        assert!(spans.touch(1, 5, 1));
        assert!(!spans.touch(2, 0, u64::MAX));
        // Bytes of a file handed over whole: not pushed, the kernel reads the copy.
        assert!(!spans.touch(0, 1000, 100));
    }

    #[test]
    fn reads_of_a_mounts_own_are_not_recorded() {
        let r = Recorder::default();
        unrecorded(|| {
            r.note_read(read(0, 0, 10));
            r.note(0, 0..2);
            r.note_lookup(1, b"usr");
        });
        assert!(r.recorded().is_empty());
        assert_eq!(r.window_end(), None, "no window opened");
        r.note_read(read(0, 0, 10));
        assert_eq!(r.recorded().reads, [read(0, 0, 10)]);
    }

    #[test]
    fn names_past_the_size_a_reader_takes_are_left_out() {
        let long = vec![b'n'; MAX_PATH];
        let p = Profile {
            paths: (0..RECORD_LIMIT).map(|_| long.clone()).collect(),
            ..Profile::default()
        };
        let index = ImageIndex::new(
            clip_index::ImageSource {
                repository: "r".into(),
                manifest_digest: clip_index::Digest::of(b"m"),
                config_digest: clip_index::Digest::of(b"c"),
                platform: "linux/amd64".into(),
            },
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        let text = encode(&index, &p);
        assert!(text.len() as u64 <= MAX_PROFILE_BYTES);
        assert!(text.lines().count() > 900, "as many as fit");
    }
}
