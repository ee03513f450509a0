//! The index file format.
//!
//! ```text
//! header (56 bytes): magic "CLIPINDX" | version u32 LE | flags u32 LE (0)
//!                    | body length u64 LE | sha256 of the head (version 5; before: of the body)
//! body (version 5):  head | bulk
//! head:              metadata length u64 LE | zstd frame of the metadata
//!                    | entries length u64 LE | zstd frame of the directory entries
//!                    | sha256 of the bulk (32 bytes)
//! metadata:          source | layers (checkpoints, chunks, block digests) | nodes
//! entries:           directory entries (name, inode), directory after directory
//! bulk:              layer after layer: its checkpoints' windows, then its block
//!                    digests, in the order the metadata names them
//! ```
//!
//! The bulk is what does not compress (the windows are zstd frames of their own, the block
//! digests are sha256 digests): kept out of the metadata's frame, it costs no inflating when
//! an index is read, which a mount waits for; sealed by a digest of its own, it can be left
//! in the file until a fetch needs it ([`open`]). The directory entries have a frame of
//! their own so that they are inflated, parsed and their names checked on a second thread
//! while the nodes are parsed: a mount waits for the longer of the two, not for both. The
//! digests are computed beside the parse, on another thread. [`decode_owned`] leaves the
//! windows where they are in the file it is given (the index keeps the file's buffer), and
//! [`read`] of a file parses the frames while a thread reads and hashes the bulk. A frame
//! that records a believable size is inflated into one buffer of that size.
//!
//! Older versions are still read. Version 4 had no bulk digest (the header's was of the
//! whole body); version 3 kept the entries in the metadata's frame; version 1 had no block
//! digests; versions 1 and 2 kept everything in one zstd frame (body = the frame, windows
//! and block digests in it).
//!
//! Integers in the metadata are LEB128 varints. Decoding checks the digest, every bound and
//! the tree's shape before an [`ImageIndex`] is handed out, so a corrupt or hostile file gives
//! an error, never a panic or an out-of-range access later.

use std::io::Read;
use std::ops::Range;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use crate::codec::{Reader, Writer};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::image::{ImageIndex, ImageSource};
use crate::layer::{Checkpoint, Chunk, Compression, LayerIndex};
#[cfg(test)]
use crate::node::Dirent;
use crate::part::{Deferred, Part};
use crate::table::{EntryScan, NodeScan, Table, scan_entries, scan_nodes};

pub const MAGIC: &[u8; 8] = b"CLIPINDX";
pub const VERSION: u32 = 5;
/// The oldest version [`decode`] reads.
pub const OLDEST_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 56;
/// Largest payload we inflate: far above any real image, far below memory trouble.
const MAX_PAYLOAD: u64 = 4 << 30;
/// A metadata frame that claims to inflate more than this many times its length, plus 1 MiB
/// (real ones: about 4x), is inflated piece by piece, so that a false claim allocates nothing
/// up front.
const MAX_PAYLOAD_RATIO: u64 = 64;
const PAYLOAD_LEVEL: i32 = 3;

/// Serialises an index to bytes.
pub fn encode(index: &ImageIndex) -> Result<Vec<u8>> {
    encode_version(index, VERSION)
}

/// Serialises an index in format `version` ([`OLDEST_VERSION`]..=[`VERSION`]; 1 drops the
/// block digests), for tests and tools that need an older file.
pub fn encode_version(index: &ImageIndex, version: u32) -> Result<Vec<u8>> {
    if !(OLDEST_VERSION..=VERSION).contains(&version) {
        return Err(Error::UnsupportedVersion {
            found: version,
            supported: VERSION,
        });
    }
    // From version 3 the windows and block digests go to the bulk, after the metadata.
    let split = version >= 3;
    let mut bulk = Vec::new();
    let mut w = Writer::default();
    let s = &index.source;
    w.bytes(s.repository.as_bytes());
    w.digest(&s.manifest_digest);
    w.digest(&s.config_digest);
    w.bytes(s.platform.as_bytes());
    w.uint(index.layers.len() as u64);
    for l in &index.layers {
        w.bytes(l.media_type.as_bytes());
        w.u8(l.compression.tag());
        w.digest(&l.digest);
        w.uint(l.compressed_size);
        w.digest(&l.diff_id);
        w.uint(l.uncompressed_size);
        w.uint(u64::from(l.chunk_size));
        w.uint(l.checkpoints.len() as u64);
        for c in &l.checkpoints {
            w.uint(c.compressed_offset);
            w.u8(c.bits);
            w.uint(c.uncompressed_offset);
            w.u8(u8::from(c.raw_deflate));
            let window = c.window.get()?;
            w.uint(window.len() as u64);
            let out = if split { &mut bulk } else { &mut w.0 };
            out.extend_from_slice(&window);
        }
        w.uint(l.chunks.len() as u64);
        let mut prev = 0;
        for c in &l.chunks {
            w.digest(&c.digest);
            w.uint(c.compressed_end.saturating_sub(prev));
            prev = c.compressed_end;
        }
        if version >= 2 {
            w.uint(u64::from(l.block_size));
            let blocks = l.blocks.get()?;
            w.uint((blocks.len() / 32) as u64);
            let out = if split { &mut bulk } else { &mut w.0 };
            out.extend_from_slice(&blocks);
        }
    }
    let table = &index.table;
    w.uint(table.len() as u64);
    w.0.extend_from_slice(table.node_records());
    // From version 4 the directory entries have a frame of their own.
    let mut apart = Writer::default();
    let e = if version >= 4 { &mut apart } else { &mut w };
    e.uint(table.entry_count() as u64);
    e.0.extend_from_slice(table.entry_records());
    let frame = zstd::bulk::compress(&w.0, PAYLOAD_LEVEL)?;
    let (body, head) = if split {
        let mut body = Vec::new();
        body.extend_from_slice(&(frame.len() as u64).to_le_bytes());
        body.extend_from_slice(&frame);
        if version >= 4 {
            let entries = zstd::bulk::compress(&apart.0, PAYLOAD_LEVEL)?;
            body.extend_from_slice(&(entries.len() as u64).to_le_bytes());
            body.extend_from_slice(&entries);
        }
        if version >= 5 {
            body.extend_from_slice(&Digest::of(&bulk).0);
        }
        let head = body.len();
        body.extend_from_slice(&bulk);
        (body, head)
    } else {
        let head = frame.len();
        (frame, head)
    };
    // From version 5 the header's digest seals the head alone (the frames and the bulk's
    // digest), so that the bulk can be left in the file until it is needed.
    let sealed = if version >= 5 { &body[..head] } else { &body };
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&Digest::of(sealed).0);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Parses and validates an index file. For version 3 the bulk (windows and block digests)
/// is copied out of `bytes` in one piece, which the windows share; [`decode_owned`] shares
/// the file's own buffer instead. Older versions' windows are copied one by one.
pub fn decode(bytes: &[u8]) -> Result<ImageIndex> {
    decode_with(bytes, Bytes::copy_from_slice)
}

/// [`decode`] of a file read into memory: for version 3 the windows stay where they are in
/// `bytes` (no copy, no allocation each), and the index keeps all of `bytes` alive.
pub fn decode_owned(bytes: Vec<u8>) -> Result<ImageIndex> {
    let shared = Bytes::from(bytes);
    decode_with(&shared, |part| shared.slice_ref(part))
}

/// An index read by [`read`].
#[derive(Debug)]
pub struct ReadIndex {
    pub index: ImageIndex,
    /// The digest that names the file ([`index_digest`]), when asked for.
    pub digest: Option<Digest>,
}

/// How much of the bulk [`read`] reads (and hashes) at a time.
const READ_PIECE: usize = 1 << 20;

/// Reads, parses and validates an index from a stream, a file: [`decode_owned`] of its
/// bytes, sooner. The header and the frames are read first and parsed while a second
/// thread reads the bulk (the windows and block digests, most of the file) and hashes it
/// as it comes, so the parse waits neither for the bulk's disk reads nor for the digest.
/// Only the bulk is kept (the windows are parts of it). With `digest`, the same pass also
/// computes the file's [`index_digest`]. [`open`] leaves the bulk in the file instead.
pub fn read(mut r: impl Read + Send, digest: bool) -> Result<ReadIndex> {
    let io = Error::ReadIndex;
    let (header, version, body_len) = read_header(&mut r)?;
    if body_len > MAX_PAYLOAD {
        return Err(too_large(body_len));
    }
    if version < 3 {
        // One frame holds it all: nothing to read beside the parse.
        let mut bytes = header.to_vec();
        r.take(body_len.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(io)?;
        let digest = digest.then(|| index_digest(&bytes));
        let index = decode(&bytes)?;
        return Ok(ReadIndex { index, digest });
    }
    let (head, bulk_len) = read_head(&mut r, version, body_len)?;
    let frames = split_body(&head, version)?;
    // The bulk, checked against the digests (the head's too), and the file's digest, from
    // a second thread.
    let rest = || -> Result<(Vec<u8>, Option<Digest>)> {
        let mut sealed = Sha256::new();
        let mut file = digest.then(|| {
            let mut h = Sha256::new();
            h.update(header);
            h.update(&head);
            h
        });
        if version < 5 {
            sealed.update(&head);
        }
        let mut bulk = Vec::new();
        bulk.try_reserve_exact(bulk_len)
            .map_err(|e| Error::CorruptIndex(format!("bulk of {bulk_len} bytes: {e}")))?;
        loop {
            let at = bulk.len();
            // One byte past the bulk: a longer file is an error, found here.
            let want = (bulk_len + 1 - at).min(READ_PIECE);
            let n = (&mut r)
                .take(want as u64)
                .read_to_end(&mut bulk)
                .map_err(io)?;
            let piece = &bulk[at..at + n];
            sealed.update(piece);
            if let Some(h) = &mut file {
                h.update(piece);
            }
            if n < want || bulk.len() > bulk_len {
                break;
            }
        }
        if bulk.len() > bulk_len {
            return Err(Error::CorruptIndex(format!(
                "body runs past the {body_len} bytes the header says"
            )));
        }
        if bulk.len() < bulk_len {
            return Err(body_length(HEADER_LEN + head.len() + bulk.len(), body_len));
        }
        let got = Digest(sealed.finalize().into());
        match frames.bulk_digest {
            Some(want) => {
                check_digest(Digest::of(&head), &header)?;
                check_bulk(got, want)?;
            }
            None => check_digest(got, &header)?,
        }
        Ok((bulk, file.map(|h| Digest(h.finalize().into()))))
    };
    let (rest, parsed) = beside("clip-index-read", "the index reader", rest, || {
        parse_frames(&frames, Some(bulk_len), version)
    });
    let (bulk, file) = rest?;
    let mut parsed = parsed?;
    let bulk = Bytes::from(bulk);
    attach_bulk(&mut parsed.index, parsed.parts, |r| bulk.slice(r).into());
    validate_layers(&parsed.index)?;
    Ok(ReadIndex {
        index: parsed.index,
        digest: file,
    })
}

/// Reads, parses and validates an index file, but from version 5 leaves its bulk (the
/// checkpoint windows and block digests, most of the file) where it is: the first fetch
/// that needs a window or a block digest reads it, whole, and checks it against the digest
/// in the file's head (see [`Part`]). Only the head (the frames and the bulk's digest) is
/// read and checked here, and the file's length. A mount whose chunks are all on local
/// disk never reads the rest. Older versions are [`read`] whole.
pub fn open(file: std::fs::File) -> Result<ImageIndex> {
    use std::io::{Seek, SeekFrom};
    let io = Error::ReadIndex;
    let mut r = &file;
    r.seek(SeekFrom::Start(0)).map_err(io)?;
    let (header, version, body_len) = read_header(&mut r)?;
    if version < 5 {
        r.seek(SeekFrom::Start(0)).map_err(io)?;
        return Ok(read(r, false)?.index);
    }
    let file_len = file.metadata().map_err(io)?.len();
    if file_len != HEADER_LEN as u64 + body_len {
        return Err(Error::CorruptIndex(format!(
            "the file has {file_len} bytes, its header says {}",
            HEADER_LEN as u64 + body_len
        )));
    }
    let (head, bulk_len) = read_head(&mut r, version, body_len)?;
    let frames = split_body(&head, version)?;
    let (sealed, parsed) = beside(
        "clip-index-digest",
        "the head's digest",
        || check_digest(Digest::of(&head), &header),
        || parse_frames(&frames, Some(bulk_len), version),
    );
    sealed?;
    let mut parsed = parsed?;
    let bulk_digest = frames.bulk_digest.unwrap_or_default();
    let bulk = Deferred::new(
        file,
        (HEADER_LEN + head.len()) as u64,
        bulk_len,
        bulk_digest,
    );
    attach_bulk(&mut parsed.index, parsed.parts, |r| Part::later(&bulk, r));
    validate_layers(&parsed.index)?;
    Ok(parsed.index)
}

/// The head of a version-3-or-later body off a stream: its frames, each after its length
/// (and from version 5 the bulk's digest), all checked to lie inside the `body_len` bytes
/// the header gives; and the length of the bulk that follows.
fn read_head(r: &mut impl Read, version: u32, body_len: u64) -> Result<(Vec<u8>, usize)> {
    if body_len > MAX_PAYLOAD {
        return Err(too_large(body_len));
    }
    let mut head = Vec::new();
    for what in frames_of(version) {
        let len = read_frame_len(r, what)?;
        let frame_len = u64::from_le_bytes(len);
        let end = (head.len() as u64 + 8)
            .checked_add(frame_len)
            .filter(|&e| e <= body_len)
            .ok_or_else(|| runs_past(what))?;
        head.try_reserve_exact(8 + frame_len as usize)
            .map_err(|e| Error::CorruptIndex(format!("{what} of {frame_len} bytes: {e}")))?;
        head.extend_from_slice(&len);
        r.take(frame_len)
            .read_to_end(&mut head)
            .map_err(Error::ReadIndex)?;
        if head.len() as u64 != end {
            return Err(body_length(HEADER_LEN + head.len(), body_len));
        }
    }
    if version >= 5 {
        if head.len() as u64 + 32 > body_len {
            return Err(runs_past("the bulk's digest"));
        }
        let mut digest = [0u8; 32];
        read_full(r, &mut digest, || {
            Error::CorruptIndex("body ends before its bulk's digest".into())
        })?;
        head.extend_from_slice(&digest);
    }
    let bulk_len = usize::try_from(body_len - head.len() as u64)
        .map_err(|_| Error::CorruptIndex("bulk too large".into()))?;
    Ok((head, bulk_len))
}

/// Runs `side` on a thread named `name` while `here` runs on this one, and gives both
/// results; with no thread to be had (a pid limit), `side` runs here, after `here`. A side
/// that panics is an error naming `what` it did.
fn beside<A: Send, B>(
    name: &str,
    what: &str,
    side: impl FnOnce() -> Result<A> + Send,
    here: impl FnOnce() -> B,
) -> (Result<A>, B) {
    // Kept outside the thread's closure, which a failed spawn drops.
    let side = std::sync::Mutex::new(Some(side));
    let run = || {
        let side = side.lock().unwrap_or_else(|p| p.into_inner()).take();
        side.map(|f| f())
    };
    let failed = || Error::CorruptIndex(format!("{what} failed"));
    std::thread::scope(|s| {
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn_scoped(s, run);
        let b = here();
        let a = match thread {
            Ok(t) => t.join().unwrap_or_else(|_| Some(Err(failed()))),
            Err(_) => run(),
        };
        (a.unwrap_or_else(|| Err(failed())), b)
    })
}

fn too_large(body_len: u64) -> Error {
    Error::CorruptIndex(format!(
        "a body of {body_len} bytes is larger than any index"
    ))
}

/// Refuses a bulk whose digest `got` is not the one its head records.
fn check_bulk(got: Digest, want: Digest) -> Result<()> {
    if got != want {
        return Err(Error::CorruptIndex(format!(
            "bulk digest {got} does not match the head's {want}"
        )));
    }
    Ok(())
}

/// The frames a version-3-or-later body starts with, each after its length, by what they
/// hold.
fn frames_of(version: u32) -> &'static [&'static str] {
    if version >= 4 {
        &["metadata", "directory entries"]
    } else {
        &["metadata"]
    }
}

/// A frame whose length takes it past its body.
fn runs_past(what: &str) -> Error {
    Error::CorruptIndex(format!("{what} runs past the body"))
}

/// A body cut into its parts: the metadata's frame, the entries' own frame (from version 4),
/// the bulk's digest (from version 5) and the bulk (from version 3; what follows).
struct Frames<'a> {
    metadata: &'a [u8],
    entries: Option<&'a [u8]>,
    bulk_digest: Option<Digest>,
    bulk: Option<&'a [u8]>,
}

impl Frames<'_> {
    /// How many bytes of the body come before the bulk.
    fn head_len(&self, body: &[u8]) -> usize {
        body.len() - self.bulk.map_or(0, <[u8]>::len)
    }
}

/// The parts of `body`, each frame inside it.
fn split_body(body: &[u8], version: u32) -> Result<Frames<'_>> {
    if version < 3 {
        return Ok(Frames {
            metadata: body,
            entries: None,
            bulk_digest: None,
            bulk: None,
        });
    }
    let mut rest = body;
    let mut frames = Vec::with_capacity(2);
    for what in frames_of(version) {
        let len = rest
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
            .ok_or_else(|| Error::CorruptIndex(format!("body ends before its {what}")))?;
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_add(8))
            .filter(|&e| e <= rest.len())
            .ok_or_else(|| runs_past(what))?;
        frames.push(&rest[8..end]);
        rest = &rest[end..];
    }
    let bulk_digest = if version >= 5 {
        let digest = rest
            .get(..32)
            .ok_or_else(|| Error::CorruptIndex("body ends before its bulk's digest".into()))?;
        rest = &rest[32..];
        Some(Digest(digest.try_into().unwrap_or_default()))
    } else {
        None
    };
    Ok(Frames {
        metadata: frames[0],
        entries: frames.get(1).copied(),
        bulk_digest,
        bulk: Some(rest),
    })
}

/// The most of a metadata frame [`read_source`] inflates looking for the source.
const SOURCE_PEEK: u64 = 64 << 10;

/// The image an index describes, from the first bytes of its metadata alone: to name what
/// is being loaded before [`read`] has read (and checked) the rest, which it may still
/// refuse.
pub fn read_source(mut r: impl Read) -> Result<ImageSource> {
    let (_, version, body_len) = read_header(&mut r)?;
    let frame_len = if version >= 3 {
        u64::from_le_bytes(read_frame_len(&mut r, "metadata")?)
    } else {
        body_len
    };
    let corrupt = |e: std::io::Error| Error::CorruptIndex(format!("payload: {e}"));
    let mut payload = zstd::stream::read::Decoder::new(r.take(frame_len))
        .map_err(corrupt)?
        .take(SOURCE_PEEK);
    // Inflated piece by piece until the source is whole: the rest may be missing.
    let mut start = Vec::new();
    let mut piece = [0u8; 1024];
    loop {
        let n = payload.read(&mut piece).map_err(corrupt)?;
        start.extend_from_slice(&piece[..n]);
        let source = Reader::new(&start).source();
        if source.is_ok() || n == 0 {
            return source;
        }
    }
}

/// A stream's header, checked, with the version and body length it gives. A stream
/// shorter than a header is not an index at all, as for `decode`.
fn read_header(r: &mut impl Read) -> Result<([u8; HEADER_LEN], u32, u64)> {
    let mut header = [0u8; HEADER_LEN];
    read_full(r, &mut header, || {
        Error::NotAnIndex("missing CLIPINDX header".into())
    })?;
    let (version, body_len) = check_header(&header)?;
    Ok((header, version, body_len))
}

/// The length of a frame of a version-3-or-later body, as stored (8 bytes, little-endian);
/// `what` the frame holds.
fn read_frame_len(r: &mut impl Read, what: &str) -> Result<[u8; 8]> {
    let mut len = [0u8; 8];
    read_full(r, &mut len, || {
        Error::CorruptIndex(format!("body ends before its {what}"))
    })?;
    Ok(len)
}

/// Fills `buf` from `r`; an end of the stream first is the error `short` makes.
fn read_full(r: &mut impl Read, buf: &mut [u8], short: impl FnOnce() -> Error) -> Result<()> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => short(),
        _ => Error::ReadIndex(e),
    })
}

/// `keep` turns the bulk (a part of `bytes`) into what the windows are cut from.
fn decode_with(bytes: &[u8], keep: impl Fn(&[u8]) -> Bytes) -> Result<ImageIndex> {
    let header: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| Error::NotAnIndex("missing CLIPINDX header".into()))?;
    let (version, body_len) = check_header(header)?;
    let body = &bytes[HEADER_LEN..];
    if body.len() as u64 != body_len {
        return Err(body_length(bytes.len(), body_len));
    }
    // The digests on a second thread while the body is parsed; a body that does not match
    // them is refused whatever the parse found.
    let (sealed, parsed) = beside(
        "clip-index-digest",
        "the body's digest",
        || check_body(body, version, header),
        || parse_body(body, version, &keep),
    );
    sealed?;
    let parsed = parsed?;
    validate_layers(&parsed.index)?;
    Ok(parsed.index)
}

/// The version and body length a header gives, once its magic, version and flags are good.
fn check_header(header: &[u8; HEADER_LEN]) -> Result<(u32, u64)> {
    if &header[..8] != MAGIC {
        return Err(Error::NotAnIndex("missing CLIPINDX header".into()));
    }
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let version = word(8);
    if !(OLDEST_VERSION..=VERSION).contains(&version) {
        return Err(Error::UnsupportedVersion {
            found: version,
            supported: VERSION,
        });
    }
    let flags = word(12);
    if flags != 0 {
        return Err(Error::CorruptIndex(format!(
            "unknown header flags {flags:#x}"
        )));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[16..24]);
    Ok((version, u64::from_le_bytes(len)))
}

/// A file of `file_len` bytes whose header says its body is `body_len`.
fn body_length(file_len: usize, body_len: u64) -> Error {
    Error::CorruptIndex(format!(
        "body is {} bytes, header says {body_len}",
        file_len.saturating_sub(HEADER_LEN)
    ))
}

/// Refuses a body that does not match the header's digest: of the whole body before version
/// 5; from version 5, of its head, and the bulk of the digest the head gives.
fn check_body(body: &[u8], version: u32, header: &[u8; HEADER_LEN]) -> Result<()> {
    if version < 5 {
        return check_digest(Digest::of(body), header);
    }
    let frames = split_body(body, version)?;
    check_digest(Digest::of(&body[..frames.head_len(body)]), header)?;
    match (frames.bulk, frames.bulk_digest) {
        (Some(bulk), Some(want)) => check_bulk(Digest::of(bulk), want),
        _ => Ok(()),
    }
}

/// Refuses a body whose digest `got` is not the one the header records.
fn check_digest(got: Digest, header: &[u8; HEADER_LEN]) -> Result<()> {
    let mut want = [0u8; 32];
    want.copy_from_slice(&header[24..56]);
    if got.0 != want {
        return Err(Error::CorruptIndex(format!(
            "body digest {got} does not match the header's {}",
            Digest(want)
        )));
    }
    Ok(())
}

/// The index in a body whose digest matched (or is being checked beside this), with its
/// windows and block digests attached.
fn parse_body(body: &[u8], version: u32, keep: &dyn Fn(&[u8]) -> Bytes) -> Result<Parsed> {
    let frames = split_body(body, version)?;
    // Versions 1 and 2: the windows are in the payload, and copied out of it (it would be
    // four times their size to keep).
    let mut parsed = parse_frames(&frames, frames.bulk.map(<[u8]>::len), version)?;
    if let Some(bulk) = frames.bulk {
        let bulk = keep(bulk);
        attach_bulk(&mut parsed.index, std::mem::take(&mut parsed.parts), |r| {
            bulk.slice(r).into()
        });
    }
    Ok(parsed)
}

/// An index as parsed and its tree checked, before its layers are ([`validate_layers`], once
/// the bulk is attached): where its windows and block digests lie in the bulk (for
/// [`attach_bulk`]).
struct Parsed {
    index: ImageIndex,
    parts: Vec<LayerParts>,
}

/// Inflates the frames of a body, scans their records and checks the tree they make (see
/// [`Table`]). Entries in a frame of their own (version 4) are inflated, scanned and their
/// names checked on a second thread meanwhile.
fn parse_frames(frames: &Frames<'_>, bulk_len: Option<usize>, version: u32) -> Result<Parsed> {
    type Scanned = (Bytes, EntryScan);
    let metadata = || -> Result<(Meta, Bytes, NodeScan, Option<Scanned>)> {
        let payload = Bytes::from(inflate_payload(frames.metadata)?);
        let mut r = Reader::new(&payload);
        let meta = parse_meta(&mut r, bulk_len, version)?;
        let n = r.count(12)?;
        let nodes = scan_nodes(&mut r, n, &meta.layers)?;
        // Before version 4, the entries follow in the same payload.
        let entries = match frames.entries {
            Some(_) => None,
            None => {
                let n = r.count(2)?;
                Some((payload.clone(), scan_entries(&mut r, n)?))
            }
        };
        r.end()?;
        Ok((meta, payload, nodes, entries))
    };
    let entries = |frame: &[u8]| -> Result<Scanned> {
        let payload = Bytes::from(inflate_payload(frame)?);
        let mut r = Reader::new(&payload);
        let n = r.count(2)?;
        let scan = scan_entries(&mut r, n)?;
        r.end()?;
        Ok((payload, scan))
    };
    let (meta, payload, nodes, entries) = match frames.entries {
        None => {
            let (meta, payload, nodes, entries) = metadata()?;
            let entries =
                entries.ok_or_else(|| Error::CorruptIndex("no directory entries".into()))?;
            (meta, payload, nodes, entries)
        }
        Some(frame) => {
            let (apart, meta) = beside(
                "clip-index-entries",
                "the entries' scan",
                || entries(frame),
                metadata,
            );
            let (meta, payload, nodes, _) = meta?;
            (meta, payload, nodes, apart?)
        }
    };
    let table = Table::assemble(&payload, nodes, &entries.0, entries.1)?;
    Ok(Parsed {
        index: ImageIndex {
            source: meta.source,
            layers: meta.layers,
            table,
        },
        parts: meta.parts,
    })
}

/// The size to inflate `frame` into in one go: the size it records when it is one frame
/// that records one (every frame clip writes) and the size is believable for its length;
/// `None` (inflate it piece by piece) for anything else.
fn one_shot_size(frame: &[u8]) -> Option<usize> {
    let believable = (frame.len() as u64)
        .saturating_mul(MAX_PAYLOAD_RATIO)
        .saturating_add(1 << 20)
        .min(MAX_PAYLOAD);
    let one_frame = zstd::zstd_safe::find_frame_compressed_size(frame).ok() == Some(frame.len());
    let size = zstd::zstd_safe::get_frame_content_size(frame).ok()??;
    (one_frame && size <= believable)
        .then(|| usize::try_from(size).ok())
        .flatten()
}

/// The metadata frame, inflated: into one buffer of the size it records
/// ([`one_shot_size`]), else streamed, at most [`MAX_PAYLOAD`]. Memory that cannot be had
/// is an error, not an abort.
fn inflate_payload(frame: &[u8]) -> Result<Vec<u8>> {
    let corrupt = |e: std::io::Error| Error::CorruptIndex(format!("payload: {e}"));
    if let Some(size) = one_shot_size(frame) {
        let mut out = Vec::new();
        out.try_reserve_exact(size)
            .map_err(|e| Error::CorruptIndex(format!("payload of {size} bytes: {e}")))?;
        let n = zstd::bulk::Decompressor::new()
            .and_then(|mut d| d.decompress_to_buffer(frame, &mut out))
            .map_err(corrupt)?;
        if n != size {
            return Err(Error::CorruptIndex(format!(
                "payload is {n} bytes, its frame says {size}"
            )));
        }
        return Ok(out);
    }
    let mut payload = Vec::new();
    zstd::stream::read::Decoder::new(frame)
        .map_err(corrupt)?
        .take(MAX_PAYLOAD + 1)
        .read_to_end(&mut payload)
        .map_err(corrupt)?;
    if payload.len() as u64 > MAX_PAYLOAD {
        return Err(Error::CorruptIndex("payload too large".into()));
    }
    Ok(payload)
}

/// The digest that names an encoded index (sha256 of the whole file).
pub fn index_digest(encoded: &[u8]) -> Digest {
    Digest::of(encoded)
}

/// Where a version-3 metadata puts one layer's parts of the bulk: each checkpoint's window
/// and the block digests, as ranges of the bulk.
#[derive(Debug, Default)]
struct LayerParts {
    windows: Vec<Range<usize>>,
    blocks: Range<usize>,
}

/// What a metadata payload holds before the directory entries.
struct Meta {
    source: ImageSource,
    layers: Vec<LayerIndex>,
    /// Each layer's parts of the bulk.
    parts: Vec<LayerParts>,
}

/// Parses a metadata payload up to its directory entries. From version 3 the windows and
/// block digests are in a bulk of `bulk_len` bytes, which the payload only locates (see
/// [`attach_bulk`]: the windows are empty until then); before (`None`), they are in the
/// payload and copied out of it.
fn parse_meta(r: &mut Reader<'_>, bulk_len: Option<usize>, version: u32) -> Result<Meta> {
    let split = bulk_len.is_some();
    let mut b = Span {
        len: bulk_len.unwrap_or(0),
        pos: 0,
    };
    let mut parts = Vec::new();
    let source = r.source()?;
    let n_layers = r.count(40)?;
    let mut layers = Vec::with_capacity(n_layers);
    for _ in 0..n_layers {
        let media_type = r.string()?;
        let compression = Compression::from_tag(r.u8()?)
            .ok_or_else(|| Error::CorruptIndex("unknown compression".into()))?;
        let digest = r.digest()?;
        let compressed_size = r.uint()?;
        let diff_id = r.digest()?;
        let uncompressed_size = r.uint()?;
        let chunk_size = r.u32()?;
        let n_cp = r.count(5)?;
        let mut checkpoints = Vec::with_capacity(n_cp);
        let mut layer_parts = LayerParts::default();
        for _ in 0..n_cp {
            checkpoints.push(Checkpoint {
                compressed_offset: r.uint()?,
                bits: r.u8()?,
                uncompressed_offset: r.uint()?,
                raw_deflate: r.u8()? != 0,
                window: {
                    let n = r.uint()?;
                    if split {
                        layer_parts.windows.push(b.take(n, 1)?);
                        Part::default()
                    } else {
                        Bytes::copy_from_slice(r.fixed(n, 1)?).into()
                    }
                },
            });
        }
        let n_chunks = r.count(33)?;
        let mut chunks = Vec::with_capacity(n_chunks);
        let mut end: u64 = 0;
        for _ in 0..n_chunks {
            let digest = r.digest()?;
            end = end
                .checked_add(r.uint()?)
                .ok_or_else(|| Error::CorruptIndex("chunk offset overflow".into()))?;
            chunks.push(Chunk {
                digest,
                compressed_end: end,
            });
        }
        let (block_size, blocks) = if version >= 2 {
            let size = u32::try_from(r.uint()?)
                .map_err(|_| Error::CorruptIndex("block size too large".into()))?;
            let n = r.uint()?;
            let blocks = if split {
                layer_parts.blocks = b.take(n, 32)?;
                Part::default()
            } else {
                Bytes::copy_from_slice(r.fixed(n, 32)?).into()
            };
            (size, blocks)
        } else {
            (0, Part::default())
        };
        parts.push(layer_parts);
        layers.push(LayerIndex {
            media_type,
            compression,
            digest,
            compressed_size,
            diff_id,
            uncompressed_size,
            chunk_size,
            checkpoints,
            chunks,
            block_size,
            blocks,
        });
    }
    if b.pos != b.len {
        return Err(Error::CorruptIndex(
            "bulk bytes that the metadata does not place".into(),
        ));
    }
    Ok(Meta {
        source,
        layers,
        parts,
    })
}

/// Gives each checkpoint its window and each layer its block digests, where
/// [`parse_meta`] found them in the bulk: `part` of each range (a slice of the bulk, shared,
/// not copied, or a range of a bulk left in its file). The ranges lie inside a bulk of the
/// length the parse was given.
fn attach_bulk(
    index: &mut ImageIndex,
    parts: Vec<LayerParts>,
    part: impl Fn(Range<usize>) -> Part,
) {
    for (layer, parts) in index.layers.iter_mut().zip(parts) {
        for (cp, range) in layer.checkpoints.iter_mut().zip(parts.windows) {
            cp.window = part(range);
        }
        layer.blocks = part(parts.blocks);
    }
}

/// Checks every invariant the rest of clip relies on.
pub fn validate(index: &ImageIndex) -> Result<()> {
    validate_layers(index)?;
    index.table.check(&index.layers)
}

/// Checks each layer's sizes, chunks, block digests and checkpoints (the tree is checked
/// when it is scanned: [`Table::assemble`]).
fn validate_layers(index: &ImageIndex) -> Result<()> {
    let bad = |m: String| Err(Error::CorruptIndex(m));
    for (i, l) in index.layers.iter().enumerate() {
        if l.chunk_size == 0 {
            return bad(format!("layer {i}: zero chunk size"));
        }
        if l.chunks.len() as u64 != l.uncompressed_size.div_ceil(u64::from(l.chunk_size)) {
            return bad(format!("layer {i}: chunk count does not cover the layer"));
        }
        if l.chunks
            .iter()
            .any(|c| c.compressed_end > l.compressed_size)
        {
            return bad(format!("layer {i}: chunk ends beyond the blob"));
        }
        if l.block_size == 0 && !l.blocks.is_empty() {
            return bad(format!("layer {i}: block digests without a block size"));
        }
        if l.block_size > 0 {
            if l.block_size < 512 || l.block_size > l.chunk_size {
                return bad(format!(
                    "layer {i}: block size {} out of range",
                    l.block_size
                ));
            }
            let per_chunk = u64::from(l.chunk_size.div_ceil(l.block_size));
            let n = l.chunks.len() as u64;
            let want = match n.checked_sub(1) {
                Some(full) => full * per_chunk + u64::from(l.blocks_in_chunk(full as u32)),
                None => 0,
            };
            if l.block_count() as u64 != want || l.blocks.len() % 32 != 0 {
                return bad(format!(
                    "layer {i}: {} block digests, the chunks have {want} blocks",
                    l.block_count()
                ));
            }
        }
        let mut prev: Option<&Checkpoint> = None;
        for c in &l.checkpoints {
            let ordered = prev.is_none_or(|p| {
                p.uncompressed_offset < c.uncompressed_offset
                    && p.compressed_offset < c.compressed_offset
            });
            if !ordered
                || c.bits > 7
                || (c.bits > 0 && c.compressed_offset == 0)
                || c.compressed_offset > l.compressed_size
                || c.uncompressed_offset > l.uncompressed_size
            {
                return bad(format!("layer {i}: malformed checkpoint table"));
            }
            prev = Some(c);
        }
        if l.compression == Compression::None && l.compressed_size != l.uncompressed_size {
            return bad(format!("layer {i}: plain tar sizes differ"));
        }
    }
    Ok(())
}

/// A position in a part of the file that is not at hand yet (the bulk): what is taken from
/// it is a range, checked against its length as [`Reader::fixed`] checks a slice.
struct Span {
    len: usize,
    pos: usize,
}

impl Span {
    /// The next `n` items of `size` bytes.
    fn take(&mut self, n: u64, size: usize) -> Result<Range<usize>> {
        let left = (self.len - self.pos) as u64;
        let len =
            n.checked_mul(size as u64)
                .filter(|&l| l <= left)
                .ok_or_else(|| Error::CorruptIndex("bulk ends early".into()))? as usize;
        let range = self.pos..self.pos + len;
        self.pos += len;
        Ok(range)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A stream that hands out at most 7 bytes a read, as a pipe or a slow disk may.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(7).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    /// The non-empty windows of an index's checkpoints, layer after layer.
    fn windows_of(index: &ImageIndex) -> Vec<Bytes> {
        index
            .layers
            .iter()
            .flat_map(|l| &l.checkpoints)
            .map(|c| c.window.get().unwrap())
            .filter(|w| !w.is_empty())
            .collect()
    }

    /// [`decode`] of `file`, once [`read`] of it as a stream is seen to agree: the same
    /// index and the file's digest, or an error as well.
    fn decode_both(file: &[u8]) -> Result<ImageIndex> {
        let whole = decode(file);
        let streamed = read(Trickle(file), true);
        match (&whole, &streamed) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a, &b.index);
                assert_eq!(b.digest, Some(index_digest(file)));
            }
            (Err(_), Err(_)) => {}
            _ => panic!("decode gave {whole:?} but read {streamed:?}"),
        }
        whole
    }
    use crate::{IndexOptions, LayerSpec, assemble, index_layer};
    use clip_e2e::image::{Compression as TarCompression, Entry, Layer, compress, layer_tar};

    fn sample() -> ImageIndex {
        sample_in(
            TarCompression::Plain,
            "application/vnd.oci.image.layer.v1.tar",
        )
    }

    fn sample_in(compression: TarCompression, media_type: &str) -> ImageIndex {
        let entries = vec![
            Entry::file("small", b"hello".to_vec()),
            Entry::file("big", clip_e2e::Rng(5).bytes(1_000_000)),
        ];
        let tar = layer_tar(&Layer::with(entries, compression)).unwrap();
        let (_, blob) = compress(&tar, compression).unwrap();
        let spec = LayerSpec {
            media_type: media_type.into(),
            digest: None,
            diff_id: None,
        };
        let opts = IndexOptions {
            chunk_size: 300_000,
            checkpoint_span: 200_000,
            ..IndexOptions::default()
        };
        let build = index_layer(blob.as_slice(), &spec, &opts).unwrap();
        assemble(ImageSource::default(), vec![build]).unwrap()
    }

    #[test]
    fn block_digests_round_trip_and_version_1_files_still_read() -> Result<()> {
        let index = sample();
        let l = &index.layers[0];
        assert_eq!(l.block_size, crate::BLOCK_SIZE);
        // 300,000-byte chunks hold 5 blocks; the last chunk holds the rest.
        assert_eq!(l.chunk_blocks(0)?.len(), 5);
        let n = l.chunks.len() as u32;
        assert_eq!(
            l.block_count(),
            5 * (n as usize - 1) + l.blocks_in_chunk(n - 1) as usize
        );
        assert_eq!(decode_both(&encode(&index)?)?, index);
        let old = decode_both(&encode_version(&index, 1)?)?;
        assert_eq!(old.layers[0].block_size, 0);
        assert!(old.layers[0].blocks.is_empty() && old.layers[0].chunk_blocks(0)?.is_empty());
        assert_eq!(old.layers[0].chunks, l.chunks);
        assert_eq!(old.nodes(), index.nodes());
        Ok(())
    }

    /// A gzip image with several checkpoints (windows) and block digests.
    fn gzip_sample() -> ImageIndex {
        let index = sample_in(
            TarCompression::Gzip { members: 1 },
            "application/vnd.oci.image.layer.v1.tar+gzip",
        );
        assert!(index.layers[0].checkpoints.len() > 2);
        assert!(!index.layers[0].blocks.is_empty());
        index
    }

    /// A file of `version` around `body`, with the header's length and digest right (from
    /// version 5, the digest of the head, as far as `body` has one).
    fn sealed(version: u32, body: &[u8]) -> Vec<u8> {
        let head = match split_body(body, version) {
            Ok(f) if version >= 5 => f.head_len(body),
            _ => body.len(),
        };
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&Digest::of(&body[..head]).0);
        out.extend_from_slice(body);
        out
    }

    /// Two layers, so that the bulk's order (layer after layer) shows.
    fn two_layer_sample() -> ImageIndex {
        let mut index = gzip_sample();
        let mut second = index.layers[0].clone();
        second
            .checkpoints
            .iter_mut()
            .for_each(|c| c.window = reversed(&c.window.get().unwrap(), 1));
        second.blocks = reversed(&second.blocks.get().unwrap(), 32);
        index.layers.push(second);
        index
    }

    /// `bytes`' pieces of `size` in the opposite order.
    fn reversed(bytes: &[u8], size: usize) -> Part {
        Part::from(
            bytes
                .chunks(size)
                .rev()
                .flatten()
                .copied()
                .collect::<Vec<u8>>(),
        )
    }

    #[test]
    fn the_bulk_follows_the_compressed_frames_and_the_entries_have_their_own() -> Result<()> {
        let index = two_layer_sample();
        let mut bulk: Vec<u8> = Vec::new();
        for l in &index.layers {
            bulk.extend(l.checkpoints.iter().flat_map(|c| c.window.get().unwrap()));
            bulk.extend(l.blocks.get()?);
        }
        // The entries as version 4 writes them: a count, then each name and inode.
        let mut entries = Writer::default();
        entries.uint(index.dirents().len() as u64);
        for d in &index.dirents() {
            entries.bytes(&d.name);
            entries.uint(d.inode.0);
        }
        for version in [3, 4, 5] {
            let file = encode_version(&index, version)?;
            assert_eq!(u32::from_le_bytes(file[8..12].try_into().unwrap()), version);
            let (frames, got_bulk) = body_parts(&file);
            assert_eq!(
                got_bulk,
                &bulk[..],
                "version {version}: the bulk, after the frames"
            );
            let metadata = zstd::bulk::decompress(frames[0], 1 << 30)?;
            let tail = &metadata[metadata.len() - entries.0.len()..];
            if version == 3 {
                assert_eq!(frames.len(), 1);
                assert_eq!(
                    tail,
                    &entries.0[..],
                    "version 3: the entries end the metadata"
                );
            } else {
                assert_eq!(frames.len(), 2);
                assert_ne!(tail, &entries.0[..], "version 4: not in the metadata");
                assert_eq!(zstd::bulk::decompress(frames[1], 1 << 30)?, entries.0);
            }
            // Version 5: the bulk's digest between the frames and the bulk, and the header's
            // digest of all before the bulk.
            let body = &file[HEADER_LEN..];
            let head = &body[..body.len() - bulk.len()];
            if version == 5 {
                assert_eq!(&head[head.len() - 32..], &Digest::of(&bulk).0);
                assert_eq!(&file[24..56], &Digest::of(head).0);
            } else {
                assert_eq!(&file[24..56], &Digest::of(body).0);
            }
            assert_eq!(decode_both(&file)?, index, "version {version}");
        }
        assert_eq!(
            u32::from_le_bytes(encode(&index)?[8..12].try_into().unwrap()),
            5
        );
        // Files of the versions before are still read.
        assert_eq!(decode_both(&encode_version(&index, 2)?)?, index);
        assert!(encode_version(&index, 6).is_err());
        Ok(())
    }

    /// A file holding `bytes`, for [`open`].
    fn file_with(bytes: &[u8]) -> Result<tempfile::NamedTempFile> {
        let mut f = tempfile::NamedTempFile::new()?;
        std::io::Write::write_all(&mut f, bytes)?;
        Ok(f)
    }

    fn opened(file: &tempfile::NamedTempFile) -> Result<ImageIndex> {
        open(std::fs::File::open(file.path())?)
    }

    /// Every window and block digest part of `index`.
    fn parts_of(index: &ImageIndex) -> Vec<&Part> {
        index
            .layers
            .iter()
            .flat_map(|l| l.checkpoints.iter().map(|c| &c.window).chain([&l.blocks]))
            .collect()
    }

    /// The first checkpoint with a window: (layer, checkpoint).
    fn with_window(index: &ImageIndex) -> (usize, usize) {
        index
            .layers
            .iter()
            .enumerate()
            .find_map(|(i, l)| {
                let k = l.checkpoints.iter().position(|c| !c.window.is_empty())?;
                Some((i, k))
            })
            .expect("a window")
    }

    #[test]
    fn an_opened_index_reads_its_bulk_only_when_a_window_or_block_digest_is_needed() -> Result<()> {
        let index = two_layer_sample();
        let file = file_with(&encode(&index)?)?;
        let got = opened(&file)?;
        // All but the bulk is at hand, and checked.
        assert_eq!(got.source, index.source);
        assert_eq!(got.nodes(), index.nodes());
        assert_eq!(got.dirents(), index.dirents());
        assert_eq!(got.layers[1].chunks, index.layers[1].chunks);
        assert!(parts_of(&got).iter().all(|p| !p.is_loaded()));
        // The first window asked for reads the whole bulk, once.
        let (l, k) = with_window(&index);
        let (l, k) = (l + 1, k);
        assert_eq!(
            got.layers[l].checkpoints[k].window.get()?,
            index.layers[l].checkpoints[k].window.get()?
        );
        assert!(parts_of(&got).iter().all(|p| p.is_loaded()));
        assert_eq!(
            got.layers[0].chunk_blocks(0)?,
            index.layers[0].chunk_blocks(0)?
        );
        assert_eq!(got, index);
        // Files of the versions before are read whole.
        for version in [2, 3, 4] {
            let older = opened(&file_with(&encode_version(&index, version)?)?)?;
            assert!(parts_of(&older).iter().all(|p| p.is_loaded()), "{version}");
            assert_eq!(older, index, "version {version}");
        }
        Ok(())
    }

    #[test]
    fn a_damaged_bulk_is_found_when_first_needed_and_the_rest_of_the_index_still_serves()
    -> Result<()> {
        let index = gzip_sample();
        let mut bytes = encode(&index)?;
        // The last byte: of the last block digest.
        *bytes.last_mut().unwrap() ^= 1;
        let file = file_with(&bytes)?;
        let got = opened(&file)?;
        assert_eq!(got.nodes(), index.nodes());
        let (l, k) = with_window(&index);
        // Asked twice: the failure is kept, not read again.
        for _ in 0..2 {
            match got.layers[l].checkpoints[k].window.get() {
                Err(Error::CorruptIndex(m)) => assert!(m.contains("digest"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
        let blocks = got.layers[0].chunk_blocks(0);
        assert!(matches!(blocks, Err(Error::CorruptIndex(_))), "{blocks:?}");
        assert_ne!(got, index);
        // Read whole, the same file is refused.
        let whole = decode_both(&bytes);
        assert!(matches!(whole, Err(Error::CorruptIndex(_))), "{whole:?}");
        Ok(())
    }

    #[test]
    fn an_index_file_cut_grown_or_damaged_is_refused_when_opened_and_one_cut_later_when_its_bulk_is_read()
    -> Result<()> {
        let index = gzip_sample();
        let bytes = encode(&index)?;
        let mut longer = bytes.clone();
        longer.push(0);
        let mut head = bytes.clone();
        head[HEADER_LEN + 20] ^= 0x55;
        for (what, bad) in [
            ("cut", &bytes[..bytes.len() - 1]),
            ("grown", &longer[..]),
            ("damaged before its bulk", &head[..]),
            ("no more than a header", &bytes[..HEADER_LEN]),
        ] {
            let r = opened(&file_with(bad)?);
            assert!(matches!(r, Err(Error::CorruptIndex(_))), "{what}: {r:?}");
        }
        // Cut once it is open: the read of the bulk finds it.
        let file = file_with(&bytes)?;
        let got = opened(&file)?;
        std::fs::OpenOptions::new()
            .write(true)
            .open(file.path())?
            .set_len(bytes.len() as u64 - 10)?;
        let (l, k) = with_window(&index);
        match got.layers[l].checkpoints[k].window.get() {
            Err(Error::CorruptIndex(m)) => assert!(m.contains("ends inside"), "{m}"),
            other => panic!("{other:?}"),
        }
        Ok(())
    }

    #[test]
    fn bodies_that_lie_about_their_parts_are_refused() -> Result<()> {
        let index = gzip_sample();
        for version in [3, 4, 5] {
            let file = encode_version(&index, version)?;
            let body = &file[HEADER_LEN..];
            let (frames, _) = body_parts(&file);
            let meta = frames[0].len() as u64;
            // The body with the length at `at` set to `len`.
            let with_len = |at: usize, len: u64| {
                let mut b = body.to_vec();
                b[at..at + 8].copy_from_slice(&len.to_le_bytes());
                b
            };
            let frames_end = body.len() - body_parts(&file).1.len();
            let mut longer_bulk = body.to_vec();
            longer_bulk.push(0);
            let mut cases: Vec<(&str, Vec<u8>)> = vec![
                ("metadata past the body", with_len(0, u64::MAX)),
                (
                    "metadata just past the body",
                    with_len(0, body.len() as u64 - 7),
                ),
                ("metadata into what follows", with_len(0, meta + 1)),
                ("metadata cut short", with_len(0, meta - 1)),
                ("no metadata length", body[..5].to_vec()),
                ("bulk cut short", body[..body.len() - 1].to_vec()),
                ("bulk with a byte more", longer_bulk),
                ("no bulk", body[..frames_end].to_vec()),
            ];
            if version == 5 {
                let mut damaged_bulk = body.to_vec();
                *damaged_bulk.last_mut().unwrap() ^= 1;
                cases.extend([
                    ("bulk's digest cut short", body[..frames_end - 5].to_vec()),
                    ("a damaged bulk under its digest", damaged_bulk),
                ]);
            }
            if version >= 4 {
                let at = 8 + meta as usize;
                let entries = frames[1].len() as u64;
                cases.extend([
                    ("entries past the body", with_len(at, u64::MAX)),
                    (
                        "entries just past the body",
                        with_len(at, (body.len() - at - 7) as u64),
                    ),
                    ("entries into the bulk", with_len(at, entries + 1)),
                    ("entries cut short", with_len(at, entries - 1)),
                    ("no entries length", body[..at + 5].to_vec()),
                    ("no entries", body[..at].to_vec()),
                ]);
            }
            for (what, b) in cases {
                let r = decode_both(&sealed(version, &b));
                assert!(
                    matches!(r, Err(Error::CorruptIndex(_))),
                    "version {version}, {what}: {r:?}"
                );
            }
            // A damaged frame under the old digest: the digest is what is reported.
            let mut damaged = file.clone();
            damaged[HEADER_LEN + 20] ^= 0x55;
            match decode_both(&damaged) {
                Err(Error::CorruptIndex(m)) => assert!(m.contains("digest"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
        Ok(())
    }

    /// The frames (each without its length) and the bulk (after its digest, from version
    /// 5) of a file of version 3 or later.
    fn body_parts(file: &[u8]) -> (Vec<&[u8]>, &[u8]) {
        let version = u32::from_le_bytes(file[8..12].try_into().unwrap());
        let mut rest = &file[HEADER_LEN..];
        let mut frames = Vec::new();
        for _ in 0..version.min(4) - 2 {
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            frames.push(&rest[8..8 + len]);
            rest = &rest[8 + len..];
        }
        if version >= 5 {
            rest = &rest[32..];
        }
        (frames, rest)
    }

    /// The file of `index` with its metadata frame replaced by `frame` (resealed).
    fn with_frame(index: &ImageIndex, frame: &[u8]) -> Result<Vec<u8>> {
        let file = encode(index)?;
        let (frames, bulk) = body_parts(&file);
        let mut b = Vec::new();
        for f in std::iter::once(frame).chain(frames[1..].iter().copied()) {
            b.extend_from_slice(&(f.len() as u64).to_le_bytes());
            b.extend_from_slice(f);
        }
        b.extend_from_slice(&Digest::of(bulk).0);
        b.extend_from_slice(bulk);
        Ok(sealed(VERSION, &b))
    }

    /// The metadata of `index`, inflated.
    fn metadata_of(index: &ImageIndex) -> Result<Vec<u8>> {
        let file = encode(index)?;
        Ok(zstd::bulk::decompress(body_parts(&file).0[0], 1 << 30)?)
    }

    /// `frame` (one without a recorded size, as a streaming writer makes) claiming `size`.
    fn claiming(frame: &[u8], size: u64) -> Vec<u8> {
        let descriptor = frame[4];
        assert_eq!(
            descriptor & 0xe3,
            0,
            "a frame without size, window or dictionary"
        );
        let mut out = frame[..4].to_vec();
        out.push(descriptor | 0xc0); // an eight-byte content size
        out.push(frame[5]); // the window descriptor
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&frame[6..]);
        out
    }

    #[test]
    fn the_source_is_read_from_the_start_of_an_index_of_every_version() -> Result<()> {
        let mut index = gzip_sample();
        index.source.repository = "registry.example:5000/team/app".into();
        index.source.platform = "linux/arm64/v8".into();
        for version in 1..=VERSION {
            let file = encode_version(&index, version)?;
            assert_eq!(read_source(&file[..])?, index.source, "version {version}");
        }
        // Only the metadata is read: the bulk may be missing.
        let file = encode(&index)?;
        let metadata = HEADER_LEN + 8 + body_parts(&file).0[0].len();
        assert!(metadata < file.len());
        assert_eq!(read_source(&file[..metadata])?, index.source);
        assert!(matches!(
            read_source(&b"not an index at all, just words"[..]),
            Err(Error::NotAnIndex(_))
        ));
        assert!(matches!(
            read_source(&file[..HEADER_LEN + 4]),
            Err(Error::CorruptIndex(_))
        ));
        let mut flipped = file.clone();
        flipped[HEADER_LEN + 8 + 4] ^= 0xff;
        assert!(read_source(&flipped[..]).is_err(), "a broken frame");
        Ok(())
    }

    #[test]
    fn an_index_read_as_a_stream_keeps_only_its_bulk_and_refuses_what_decode_refuses() -> Result<()>
    {
        let index = gzip_sample();
        let file = encode(&index)?;
        let got = read(&file[..], false)?;
        assert_eq!(got.index, index);
        assert_eq!(got.digest, None, "not asked for");
        // The windows are parts of one buffer: the bulk, which starts after the metadata.
        let windows = windows_of(&got.index);
        assert!(windows.len() > 1, "the sample has windows");
        let total: usize = windows.iter().map(|w| w.len()).sum();
        let first = windows[0].as_ptr() as usize;
        let last = &windows[windows.len() - 1];
        assert_eq!(
            last.as_ptr() as usize + last.len() - first,
            total,
            "one buffer, back to back"
        );
        let (frames, bulk) = body_parts(&file);
        assert_eq!(&bulk[..windows[0].len()], &windows[0][..]);

        // Cut anywhere: in the header, a frame's length, a frame, the bulk.
        let metadata_end = HEADER_LEN + 8 + frames[0].len();
        let entries_end = metadata_end + 8 + frames[1].len();
        for cut in [0, 20] {
            let r = read(Trickle(&file[..cut]), true);
            assert!(
                matches!(r, Err(Error::NotAnIndex(_))),
                "cut at {cut}: {r:?}"
            );
        }
        for cut in [
            HEADER_LEN + 3,
            HEADER_LEN + 8 + 1,
            metadata_end,
            metadata_end + 4,
            metadata_end + 8 + 1,
            entries_end,
            file.len() - 1,
        ] {
            let r = read(Trickle(&file[..cut]), true);
            assert!(
                matches!(r, Err(Error::CorruptIndex(_))),
                "cut at {cut}: {r:?}"
            );
        }
        // Longer than its header says.
        let mut longer = file.clone();
        longer.push(0);
        let r = read(Trickle(&longer), false);
        assert!(
            matches!(&r, Err(Error::CorruptIndex(m)) if m.contains("runs past")),
            "{r:?}"
        );
        // A byte of the bulk changed: the body's digest.
        let mut flipped = file.clone();
        let at = file.len() - 1;
        flipped[at] ^= 1;
        let r = read(Trickle(&flipped), false);
        assert!(
            matches!(&r, Err(Error::CorruptIndex(m)) if m.contains("digest")),
            "{r:?}"
        );
        // A header that claims a body larger than any index allocates nothing.
        let mut huge = file.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        let r = read(&huge[..], false);
        assert!(
            matches!(&r, Err(Error::CorruptIndex(m)) if m.contains("larger than any")),
            "{r:?}"
        );
        // A stream that fails is an error of reading, not a corrupt index.
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk gone"))
            }
        }
        let r = read(Failing, false);
        assert!(matches!(r, Err(Error::ReadIndex(_))), "{r:?}");
        let r = read((&file[..HEADER_LEN + 8 + 5]).chain(Failing), false);
        assert!(matches!(r, Err(Error::ReadIndex(_))), "{r:?}");
        Ok(())
    }

    #[test]
    fn a_file_read_into_memory_decodes_the_same_and_its_windows_stay_in_it() -> Result<()> {
        let index = gzip_sample();
        assert!(
            index.layers[0]
                .checkpoints
                .iter()
                .any(|c| !c.window.is_empty()),
            "the sample has windows"
        );
        for version in OLDEST_VERSION..=VERSION {
            let file = encode_version(&index, version)?;
            let want = decode_both(&file)?;
            let owned = decode_owned(file.clone())?;
            assert_eq!(owned, want, "version {version}");
        }
        // Version 3: the windows are the file's own bytes (a buffer whose capacity is its
        // length becomes the index's without moving); earlier versions' are copies.
        let inside = |file: Vec<u8>| -> Result<bool> {
            let mut file = file;
            file.shrink_to_fit();
            let (start, end) = (file.as_ptr() as usize, file.as_ptr() as usize + file.len());
            let decoded = decode_owned(file)?;
            let windows = windows_of(&decoded);
            assert!(!windows.is_empty());
            let at = |w: &Bytes| w.as_ptr() as usize;
            Ok(windows
                .iter()
                .all(|w| start <= at(w) && at(w) + w.len() <= end))
        };
        assert!(inside(encode(&index)?)?, "version 3: in the file");
        assert!(!inside(encode_version(&index, 2)?)?, "version 2: copies");
        Ok(())
    }

    #[test]
    fn metadata_frames_are_read_whether_or_not_they_record_their_size_and_refused_when_it_lies()
    -> Result<()> {
        let index = gzip_sample();
        let payload = metadata_of(&index)?;
        // A frame from a streaming writer records no size: it is streamed, and reads the same.
        let sizeless = zstd::stream::encode_all(&payload[..], 3)?;
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&sizeless).ok(),
            Some(None)
        );
        assert_eq!(decode_both(&with_frame(&index, &sizeless)?)?, index);
        assert_eq!(one_shot_size(&sizeless), None);
        let n = payload.len() as u64;
        let mut two_frames = claiming(&sizeless, n);
        two_frames.extend_from_slice(&zstd::bulk::compress(b"more", 3)?);
        // (what, frame, whether it is inflated in one go as it claims)
        let cases = [
            ("a size too large", claiming(&sizeless, n + 1), true),
            ("a size too small", claiming(&sizeless, n - 1), true),
            // Past what a frame of this length can believably hold: streamed, not allocated.
            ("a terabyte", claiming(&sizeless, 1 << 40), false),
            // The first frame's size is not the whole's: streamed.
            ("a second frame", two_frames, false),
        ];
        for (what, frame, one_go) in cases {
            let claim = u64::from_le_bytes(frame[6..14].try_into().unwrap());
            assert_eq!(
                zstd::zstd_safe::get_frame_content_size(&frame)
                    .ok()
                    .flatten(),
                Some(claim),
                "{what}: the claim is where zstd reads it"
            );
            let want = one_go.then(|| usize::try_from(claim).unwrap());
            assert_eq!(one_shot_size(&frame), want, "{what}");
            let r = decode_both(&with_frame(&index, &frame)?);
            assert!(matches!(r, Err(Error::CorruptIndex(_))), "{what}: {r:?}");
        }
        // The truth, recorded the same way, reads in one go.
        let true_claim = claiming(&sizeless, n);
        assert_eq!(one_shot_size(&true_claim), Some(payload.len()));
        assert_eq!(decode_both(&with_frame(&index, &true_claim)?)?, index);
        // So does what clip writes.
        let file = encode(&index)?;
        assert_eq!(one_shot_size(body_parts(&file).0[0]), Some(payload.len()));
        Ok(())
    }

    #[test]
    fn block_digests_that_do_not_fit_the_chunks_are_refused() -> Result<()> {
        let index = sample();
        let mut short = index.clone();
        let blocks = short.layers[0].blocks.get()?;
        short.layers[0].blocks = blocks.slice(..blocks.len() - 32).into();
        let mut sizeless = index.clone();
        sizeless.layers[0].block_size = 0;
        let mut tiny = index;
        tiny.layers[0].block_size = 1;
        for bad in [short, sizeless, tiny] {
            let r = decode_both(&encode(&bad)?);
            assert!(matches!(r, Err(Error::CorruptIndex(_))), "{r:?}");
        }
        Ok(())
    }

    /// An index with two directories whose entries, read one after the other, are not in
    /// order ("zz" then "aa"): each directory's are.
    fn nested_sample() -> ImageIndex {
        let entries = vec![
            Entry::file("d1/yy", b"1".to_vec()),
            Entry::file("d1/zz", b"2".to_vec()),
            Entry::file("d2/aa", b"3".to_vec()),
        ];
        let tar = layer_tar(&Layer::with(entries, TarCompression::Plain)).unwrap();
        let spec = LayerSpec {
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            digest: None,
            diff_id: None,
        };
        let build = index_layer(tar.as_slice(), &spec, &IndexOptions::default()).unwrap();
        assemble(ImageSource::default(), vec![build]).unwrap()
    }

    #[test]
    fn entries_out_of_order_or_badly_named_are_refused_in_every_version() -> Result<()> {
        let index = nested_sample();
        let dirents = index.dirents();
        let names: Vec<&[u8]> = dirents.iter().map(|d| &*d.name).collect();
        let zz = names.iter().position(|n| n == b"zz").unwrap();
        assert_eq!(
            names[zz + 1],
            b"aa",
            "a directory starts after another: {names:?}"
        );
        for version in OLDEST_VERSION..=VERSION {
            let got = decode_both(&encode_version(&index, version)?)?;
            assert_eq!(
                (got.nodes(), got.dirents()),
                (index.nodes(), index.dirents())
            );
        }
        let with = |change: &dyn Fn(&mut Vec<Dirent>)| {
            let mut dirents = index.dirents();
            change(&mut dirents);
            let layers = index.layers.clone();
            ImageIndex::new(index.source.clone(), layers, index.nodes(), dirents)
        };
        let named = |name: &'static [u8]| with(&move |d| d[zz].name = name.into());
        let cases = [
            (with(&|d| d.swap(zz - 1, zz)), "not sorted"),
            (named(b"z/z"), "invalid name"),
            (named(b".."), "invalid name"),
            (named(b"z\0"), "invalid name"),
        ];
        for (bad, why) in cases {
            refused_with(&bad, why)?;
        }
        Ok(())
    }

    /// `bad` is refused by `validate`, and decoding it in every version fails, with `why`.
    pub(crate) fn refused_with(bad: &ImageIndex, why: &str) -> Result<()> {
        let r = validate(bad);
        assert!(
            matches!(&r, Err(Error::CorruptIndex(m)) if m.contains(why)),
            "{why}: {r:?}"
        );
        for version in OLDEST_VERSION..=VERSION {
            let r = decode_both(&encode_version(bad, version)?);
            assert!(
                matches!(&r, Err(Error::CorruptIndex(m)) if m.contains(why)),
                "version {version}, {why}: {r:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn block_spans_cover_a_read_with_whole_blocks() {
        let index = sample();
        let l = &index.layers[0];
        let bs = crate::BLOCK_SIZE;
        assert_eq!(l.block_span(0, 10..20), Some((0..bs, 0)));
        assert_eq!(l.block_span(0, bs - 1..bs + 1), Some((0..2 * bs, 0)));
        // The last block of a chunk is short.
        assert_eq!(
            l.block_span(0, 4 * bs + 5..300_000),
            Some((4 * bs..300_000, 4))
        );
        assert_eq!(l.block_span(0, 0..300_001), None, "past the chunk");
        assert_eq!(l.block_span(0, 7..7), None, "empty");
    }
}
