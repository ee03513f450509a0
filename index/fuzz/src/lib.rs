//! Shared pieces of the clip-index fuzz targets.
//!
//! - [`sample_tar`], [`gzip`], [`zstd_frames`]: small valid layers, for the seeds that
//!   `examples/make_seeds.rs` writes and for the fixed layer of the `decode_chunks` target.
//! - [`check_layer`]: what the three `index_layer_*` targets do with their bytes.
//! - [`Trickle`]: a reader that hands out a few bytes per call, so the decoders meet short
//!   reads the way they do on a network stream.

use std::io::{Read, Write};

use clip_index::{
    Digest, ImageSource, IndexOptions, LayerBuild, LayerSpec, assemble, decode, decode_chunks,
    encode, index_layer,
};

pub const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// Small enough that a fuzzer-sized layer has several chunks and checkpoints.
pub fn fuzz_options() -> IndexOptions {
    IndexOptions {
        chunk_size: 1000,
        checkpoint_span: 2048,
        ..IndexOptions::default()
    }
}

/// Deterministic xorshift, so seeds and the fixed layer are the same on every run.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Random bytes: stored or poorly compressed deflate blocks.
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }

    /// Text of random words: Huffman blocks that end at odd bit positions.
    fn words(&mut self, len: usize) -> Vec<u8> {
        const WORDS: [&[u8]; 8] = [
            b"layer ",
            b"chunk ",
            b"index ",
            b"gzip ",
            b"tar ",
            b"window\n",
            b"mount ",
            b"zstd ",
        ];
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(WORDS[(self.next_u64() % 8) as usize]);
        }
        out.truncate(len);
        out
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h
}

/// A tar with every entry kind the reader knows: directories, files (text and random),
/// a GNU long name, PAX time and xattr records, a symlink, a hard link, a device and a
/// fifo. `file_len` sets the size of the two data files.
pub fn sample_tar(file_len: usize, seed: u64) -> std::io::Result<Vec<u8>> {
    let mut rng = Rng(seed | 1);
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = header(tar::EntryType::Directory, 0o755, 0);
    b.append_data(&mut dir, "etc/", std::io::empty())?;
    let hosts = b"127.0.0.1 localhost\n";
    let mut h = header(tar::EntryType::Regular, 0o644, hosts.len() as u64);
    b.append_data(&mut h, "etc/hosts", &hosts[..])?;
    let random = rng.bytes(file_len);
    let mut h = header(tar::EntryType::Regular, 0o755, random.len() as u64);
    b.append_data(&mut h, "bin/app", random.as_slice())?;
    let text = rng.words(file_len);
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o644);
    h.set_size(text.len() as u64);
    b.append_pax_extensions([
        ("mtime", b"1700000000.25".as_slice()),
        ("SCHILY.xattr.user.note", b"fuzz".as_slice()),
    ])?;
    b.append_data(&mut h, "doc/readme", text.as_slice())?;
    let long = format!("{}name", "deep/".repeat(25));
    let mut h = header(tar::EntryType::Regular, 0o600, 3);
    b.append_data(&mut h, &long, &b"abc"[..])?;
    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
    b.append_link(&mut h, "bin/link", "app")?;
    let mut h = header(tar::EntryType::Link, 0o644, 0);
    b.append_link(&mut h, "etc/hosts2", "etc/hosts")?;
    let mut h = header(tar::EntryType::Char, 0o666, 0);
    h.set_device_major(1)?;
    h.set_device_minor(3)?;
    b.append_data(&mut h, "dev/null", std::io::empty())?;
    let mut h = header(tar::EntryType::Fifo, 0o644, 0);
    b.append_data(&mut h, "run/pipe", std::io::empty())?;
    b.into_inner()
}

/// An upper layer for [`sample_tar`]: a whiteout, an opaque directory and a replaced file.
pub fn upper_tar() -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Regular, 0o644, 0);
    b.append_data(&mut h, "etc/.wh.hosts2", std::io::empty())?;
    let mut h = header(tar::EntryType::Regular, 0o644, 0);
    b.append_data(&mut h, "run/.wh..wh..opq", std::io::empty())?;
    let mut h = header(tar::EntryType::Regular, 0o644, 4);
    b.append_data(&mut h, "etc/hosts", &b"new\n"[..])?;
    b.into_inner()
}

/// `data` as `members` concatenated gzip members. With `flush_every > 0` the encoder
/// syncs after every that many bytes, which ends a deflate block at an odd bit position
/// (a checkpoint with spare bits) in a small layer.
pub fn gzip(data: &[u8], members: usize, flush_every: usize) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let part = data.len().div_ceil(members.max(1)).max(1);
    for piece in data.chunks(part) {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        if flush_every == 0 {
            e.write_all(piece)?;
        } else {
            for bit in piece.chunks(flush_every) {
                e.write_all(bit)?;
                e.flush()?;
            }
        }
        out.extend(e.finish()?);
    }
    Ok(out)
}

/// `data` as `frames` concatenated zstd frames.
pub fn zstd_frames(data: &[u8], frames: usize) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let part = data.len().div_ceil(frames.max(1)).max(1);
    for piece in data.chunks(part) {
        out.extend(zstd::bulk::compress(piece, 3)?);
    }
    Ok(out)
}

/// A reader that returns 1, 2, ... `max` bytes per call, in turn.
#[derive(Debug)]
pub struct Trickle<'a> {
    data: &'a [u8],
    next: usize,
    max: usize,
}

impl<'a> Trickle<'a> {
    pub fn new(data: &'a [u8], max: usize) -> Self {
        Self {
            data,
            next: 0,
            max: max.max(1),
        }
    }
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.next = self.next % self.max + 1;
        let n = self.next.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// What an `index_layer_*` target checks for one blob of `media_type`:
///
/// - indexing never panics, whether the blob arrives in one read or in short reads;
/// - an indexed layer's chunks cover it, and each chunk decodes from the compressed range
///   its plan names to bytes that match the chunk's digest;
/// - a layer that indexes merges into an image (or gives an error), and that image survives
///   `decode(encode(x)) == x`.
pub fn check_layer(blob: &[u8], media_type: &str) {
    let spec = LayerSpec {
        media_type: media_type.to_owned(),
        digest: None,
        diff_id: None,
    };
    let whole = index_layer(blob, &spec, &fuzz_options());
    let trickled = index_layer(Trickle::new(blob, 7), &spec, &fuzz_options());
    if let (Ok(a), Ok(b)) = (&whole, &trickled) {
        assert_eq!(a.layer.digest, b.layer.digest);
        assert_eq!(a.layer.uncompressed_size, b.layer.uncompressed_size);
        assert_eq!(a.layer.diff_id, b.layer.diff_id);
        assert_eq!(a.entries, b.entries);
    }
    for build in [whole, trickled].into_iter().flatten() {
        check_build(blob, build);
    }
}

fn check_build(blob: &[u8], build: LayerBuild) {
    let layer = &build.layer;
    assert_eq!(layer.digest, Digest::of(blob));
    assert_eq!(layer.compressed_size, blob.len() as u64);
    let chunk = u64::from(layer.chunk_size);
    assert_eq!(
        layer.chunks.len() as u64,
        layer.uncompressed_size.div_ceil(chunk)
    );
    let n = layer.chunks.len() as u32;
    for i in 0..n {
        let plan = layer.plan(i..i + 1);
        let range = plan.compressed.start as usize..plan.compressed.end as usize;
        let Some(compressed) = blob.get(range) else {
            panic!("chunk {i}: plan {plan:?} is outside the blob");
        };
        match decode_chunks(layer, &plan, compressed) {
            Ok(chunks) => assert_eq!(chunks.len(), 1),
            Err(e) => panic!("chunk {i} of an indexed layer does not decode: {e} ({plan:?})"),
        }
    }
    let Ok(index) = assemble(ImageSource::default(), vec![build]) else {
        return;
    };
    let encoded = match encode(&index) {
        Ok(e) => e,
        Err(e) => panic!("encoding an assembled index failed: {e}"),
    };
    match decode(&encoded) {
        Ok(back) => assert_eq!(back, index),
        Err(e) => panic!("an assembled index does not decode: {e}"),
    }
}
