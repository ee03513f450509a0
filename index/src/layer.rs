//! Per-layer index data: compression, digests, seek checkpoints and verified chunks.

use std::ops::Range;

use serde::Serialize;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::part::Part;

/// The default size of a chunk, the unit of caching and verification. It is just under
/// 1 MiB because allocators round exact powers of two up (design notes, Redis).
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024 - 4096;

/// The default distance between seek checkpoints, in uncompressed bytes. Chosen by
/// `bench/index_size`: 4 MiB keeps the index near 1% of the image.
pub const DEFAULT_CHECKPOINT_SPAN: u64 = 4 * 1024 * 1024;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// A plain tar: uncompressed offsets are blob offsets.
    None,
    /// One or more gzip members; checkpoints at deflate block boundaries.
    Gzip,
    /// One or more zstd frames; checkpoints only at frame starts, so a single-frame layer
    /// is read from its start up to the wanted chunk.
    Zstd,
}

impl Compression {
    /// The compression an OCI or Docker layer media type implies.
    pub fn from_media_type(media_type: &str) -> Result<Self> {
        let base = media_type.trim();
        match base {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Ok(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Ok(Self::Zstd),
            _ => Err(Error::UnsupportedMediaType(media_type.to_owned())),
        }
    }

    pub(crate) fn tag(self) -> u8 {
        match self {
            Self::None => 0,
            Self::Gzip => 1,
            Self::Zstd => 2,
        }
    }

    pub(crate) fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            0 => Some(Self::None),
            1 => Some(Self::Gzip),
            2 => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// A place where decompression can resume without reading the blob from its start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Checkpoint {
    /// Offset in the compressed blob of the first whole byte after the resume point.
    pub compressed_offset: u64,
    /// Bits of the byte before `compressed_offset` that belong to the next block (gzip).
    pub bits: u8,
    /// Offset in the uncompressed stream.
    pub uncompressed_offset: u64,
    /// Where a raw inflate resumes (true) or a fresh gzip member / zstd frame starts (false).
    pub raw_deflate: bool,
    /// The 32 KiB of output before the checkpoint, zstd-compressed (empty if not needed). It
    /// may be a part of, and keep alive, the buffer the index was decoded from, or be left
    /// in the index file until first needed.
    #[serde(skip)]
    pub window: Part,
}

/// A verified unit of uncompressed layer bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Chunk {
    /// sha256 of the chunk's uncompressed bytes.
    pub digest: Digest,
    /// Compressed bytes up to here suffice to produce the whole chunk.
    pub compressed_end: u64,
}

/// Everything the index knows about one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerIndex {
    pub media_type: String,
    pub compression: Compression,
    /// Digest of the compressed blob (the manifest's layer digest).
    pub digest: Digest,
    pub compressed_size: u64,
    /// Digest of the uncompressed tar (the config's diff_id).
    pub diff_id: Digest,
    pub uncompressed_size: u64,
    pub chunk_size: u32,
    pub checkpoints: Vec<Checkpoint>,
    pub chunks: Vec<Chunk>,
    /// Size of the blocks each chunk is cut into for [`Self::blocks`] (0: no block digests,
    /// an index of format version 1).
    pub block_size: u32,
    /// sha256 of every block of every chunk (32 bytes each), chunk after chunk: block `j` of
    /// chunk `i` is bytes `j * block_size..` of that chunk. A reader of a few KiB verifies
    /// the blocks it read instead of the whole chunk. Possibly left in the index file until
    /// first needed, as the windows.
    #[serde(skip)]
    pub blocks: Part,
}

/// Which compressed bytes to fetch to produce a run of chunks, and how to start decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPlan {
    pub chunks: Range<u32>,
    /// Index into the layer's checkpoints; `None` means the blob's start (or a plain tar).
    pub checkpoint: Option<usize>,
    /// Compressed byte range to fetch.
    pub compressed: Range<u64>,
}

/// Bytes per block digest.
pub const BLOCK_SIZE: u32 = 64 * 1024;

impl LayerIndex {
    /// Blocks in chunk `i`.
    pub fn blocks_in_chunk(&self, i: u32) -> u32 {
        if self.block_size == 0 {
            return 0;
        }
        let r = self.chunk_range(i);
        (r.end - r.start).div_ceil(u64::from(self.block_size)) as u32
    }

    /// The digests of chunk `i`'s blocks (empty without block digests); an error if they
    /// were left in the index file and cannot be read from it.
    pub fn chunk_blocks(&self, i: u32) -> Result<Vec<Digest>> {
        if self.block_size == 0 {
            return Ok(Vec::new());
        }
        let per_chunk = self.chunk_size.div_ceil(self.block_size) as usize;
        let start = i as usize * per_chunk;
        let n = self.blocks_in_chunk(i) as usize;
        let blocks = self.blocks.get()?;
        Ok(blocks
            .get(start * 32..(start + n) * 32)
            .unwrap_or(&[])
            .chunks_exact(32)
            .map(|d| Digest(d.try_into().unwrap_or_default()))
            .collect())
    }

    /// How many block digests the layer has.
    pub fn block_count(&self) -> usize {
        self.blocks.len() / 32
    }

    /// The block-aligned byte range of chunk `i` that holds `want` (offsets within the
    /// chunk), and the index of its first block; `None` without block digests.
    pub fn block_span(&self, i: u32, want: Range<u32>) -> Option<(Range<u32>, usize)> {
        if self.block_size == 0 || want.is_empty() {
            return None;
        }
        let r = self.chunk_range(i);
        let len = u32::try_from(r.end - r.start).ok()?;
        if want.end > len {
            return None;
        }
        let bs = self.block_size;
        let first = want.start / bs;
        let end = (want.end.div_ceil(bs) * bs).min(len);
        Some((first * bs..end, first as usize))
    }

    /// Uncompressed byte range of chunk `i`.
    pub fn chunk_range(&self, i: u32) -> Range<u64> {
        let size = u64::from(self.chunk_size);
        let start = u64::from(i) * size;
        start..(start + size).min(self.uncompressed_size)
    }

    /// The chunks that hold `len` bytes at uncompressed `offset`.
    pub fn chunks_covering(&self, offset: u64, len: u64) -> Result<Range<u32>> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.uncompressed_size);
        let Some(end) = end else {
            return Err(Error::RangeOutOfBounds {
                layer: 0,
                offset,
                len,
                size: self.uncompressed_size,
            });
        };
        if len == 0 {
            return Ok(0..0);
        }
        let size = u64::from(self.chunk_size);
        // Both fit in u32: decode checked that chunks.len() covers uncompressed_size.
        let first = u32::try_from(offset / size).unwrap_or(u32::MAX);
        let last = u32::try_from((end - 1) / size).unwrap_or(u32::MAX);
        Ok(first..last + 1)
    }

    /// The chunks decoded from the same checkpoint as chunk `c` (its *span run*): one fetch
    /// produces them all. Plain tar layers need no checkpoint: a chunk is its own run.
    pub fn span_run(&self, c: u32) -> Range<u32> {
        let n = self.chunks.len() as u32;
        if self.compression == Compression::None {
            return c..(c + 1).min(n);
        }
        let size = u64::from(self.chunk_size);
        let start = self.chunk_range(c).start;
        let i = self
            .checkpoints
            .partition_point(|cp| cp.uncompressed_offset <= start);
        let from = match i.checked_sub(1) {
            Some(k) => self.checkpoints[k].uncompressed_offset.div_ceil(size) as u32,
            None => 0,
        };
        let to = match self.checkpoints.get(i) {
            Some(next) => (next.uncompressed_offset.div_ceil(size) as u32).min(n),
            None => n,
        };
        from.min(c)..to.max(c + 1)
    }

    /// The span runs that cover `chunks`, in order, each cut to `chunks`: one fetch each.
    pub fn span_runs(&self, chunks: Range<u32>) -> impl Iterator<Item = Range<u32>> + '_ {
        let end = chunks.end.min(self.chunks.len() as u32);
        let mut next = chunks.start;
        std::iter::from_fn(move || {
            if next >= end {
                return None;
            }
            let run = self.span_run(next);
            let piece = next..run.end.min(end);
            next = piece.end;
            Some(piece)
        })
    }

    /// How to produce `chunks` (a non-empty run of this layer's chunks).
    pub fn plan(&self, chunks: Range<u32>) -> ReadPlan {
        let last = chunks.end.saturating_sub(1) as usize;
        let end = self
            .chunks
            .get(last)
            .map_or(self.compressed_size, |c| c.compressed_end);
        if self.compression == Compression::None {
            let start = self.chunk_range(chunks.start).start;
            return ReadPlan {
                chunks,
                checkpoint: None,
                compressed: start..end,
            };
        }
        let want = self.chunk_range(chunks.start).start;
        let cp = self
            .checkpoints
            .partition_point(|c| c.uncompressed_offset <= want)
            .checked_sub(1);
        let start = match cp.map(|i| &self.checkpoints[i]) {
            // Saturating: an unvalidated checkpoint may claim spare bits at offset 0.
            Some(c) => c.compressed_offset.saturating_sub(u64::from(c.bits > 0)),
            None => 0,
        };
        ReadPlan {
            chunks,
            checkpoint: cp,
            compressed: start..end.max(start),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(size: u64, chunk: u32) -> LayerIndex {
        let n = size.div_ceil(u64::from(chunk));
        LayerIndex {
            media_type: String::new(),
            compression: Compression::Gzip,
            digest: Digest::default(),
            compressed_size: size / 2,
            diff_id: Digest::default(),
            uncompressed_size: size,
            chunk_size: chunk,
            block_size: 0,
            blocks: Part::default(),
            checkpoints: vec![Checkpoint {
                compressed_offset: 100,
                bits: 3,
                uncompressed_offset: 250,
                raw_deflate: true,
                window: Part::default(),
            }],
            chunks: (0..n)
                .map(|i| Chunk {
                    digest: Digest::default(),
                    compressed_end: (i + 1) * u64::from(chunk) / 2,
                })
                .collect(),
        }
    }

    #[test]
    fn chunks_covering_spans_boundaries() -> Result<()> {
        let l = layer(1000, 100);
        assert_eq!(l.chunks_covering(0, 1)?, 0..1);
        assert_eq!(l.chunks_covering(99, 2)?, 0..2);
        assert_eq!(l.chunks_covering(950, 50)?, 9..10);
        assert_eq!(l.chunks_covering(5, 0)?, 0..0);
        assert!(l.chunks_covering(950, 51).is_err());
        assert!(l.chunks_covering(u64::MAX, 2).is_err());
        Ok(())
    }

    #[test]
    fn span_runs_cover_a_range_one_fetch_each() {
        // The checkpoint at 250 splits the 10 chunks into runs 0..3 and 3..10.
        let l = layer(1000, 100);
        let runs = |r: Range<u32>| l.span_runs(r).collect::<Vec<_>>();
        assert_eq!(runs(0..10), [0..3, 3..10]);
        assert_eq!(runs(1..5), [1..3, 3..5]);
        assert_eq!(runs(8..20), vec![8..10], "cut to the layer");
        assert!(runs(4..4).is_empty());
    }

    #[test]
    fn plan_starts_at_the_last_checkpoint_before_the_chunk() {
        let l = layer(1000, 100);
        let p = l.plan(1..2);
        assert_eq!(p.checkpoint, None);
        assert_eq!(p.compressed, 0..100);
        let p = l.plan(3..5);
        assert_eq!(p.checkpoint, Some(0));
        // bits > 0: the byte before the checkpoint is needed too.
        assert_eq!(p.compressed, 99..250);
    }

    #[test]
    fn plan_of_a_checkpoint_claiming_bits_at_offset_zero_starts_at_zero() {
        // Found by the decode_chunks fuzz target: `0 - 1` panicked. decode rejects such a
        // table, but a LayerIndex can be built by hand.
        let mut l = layer(1000, 100);
        l.checkpoints[0].compressed_offset = 0;
        let p = l.plan(3..5);
        assert_eq!(p.checkpoint, Some(0));
        assert_eq!(p.compressed, 0..250);
    }

    #[test]
    fn media_types_map_to_compression() {
        assert_eq!(
            Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip").ok(),
            Some(Compression::Gzip)
        );
        assert!(Compression::from_media_type("application/json").is_err());
    }
}
