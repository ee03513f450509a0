//! The range reader: produce exact, verified bytes of a layer's uncompressed stream by
//! fetching only the compressed bytes between the nearest checkpoint and the wanted chunks.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use clip_index::{Content, ImageIndex, Inode};

use crate::error::{Error, Result};
use crate::source::BlobSource;

/// What a reader fetched from its source.
#[derive(Debug, Default)]
pub struct FetchStats {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
}

impl FetchStats {
    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// Reads layer ranges and files of an indexed image from a blob source.
#[derive(Debug)]
pub struct RangeReader<S> {
    index: Arc<ImageIndex>,
    source: Arc<S>,
    stats: Arc<FetchStats>,
}

impl<S> Clone for RangeReader<S> {
    fn clone(&self) -> Self {
        Self {
            index: self.index.clone(),
            source: self.source.clone(),
            stats: self.stats.clone(),
        }
    }
}

impl<S: BlobSource> RangeReader<S> {
    pub fn new(index: Arc<ImageIndex>, source: Arc<S>) -> Self {
        Self {
            index,
            source,
            stats: Arc::default(),
        }
    }

    pub fn index(&self) -> &Arc<ImageIndex> {
        &self.index
    }

    pub fn stats(&self) -> &Arc<FetchStats> {
        &self.stats
    }

    /// Fetches, decodes and verifies a run of chunks of `layer`.
    pub async fn read_chunks(&self, layer: usize, chunks: Range<u32>) -> Result<Vec<Bytes>> {
        let index = self.index.clone();
        let l = index.layers.get(layer).ok_or(Error::NoSuchLayer(layer))?;
        let plan = l.plan(chunks);
        let compressed = self
            .source
            .fetch_range(&l.digest, plan.compressed.clone())
            .await?;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes
            .fetch_add(compressed.len() as u64, Ordering::Relaxed);
        let chunks = plan.chunks.clone();
        let (run, offsets) = tokio::task::spawn_blocking(move || {
            let l = &index.layers[layer];
            let base = l.chunk_range(chunks.start).start;
            let offsets: Vec<std::ops::Range<usize>> = chunks
                .clone()
                .map(|i| {
                    let r = l.chunk_range(i);
                    (r.start - base) as usize..(r.end - base) as usize
                })
                .collect();
            clip_index::decode_run(l, &plan, &compressed).map(|run| (run, offsets))
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
        // One buffer for the run; chunks are slices of it (no copy).
        let run = Bytes::from(run);
        Ok(offsets.into_iter().map(|r| run.slice(r)).collect())
    }

    /// Exactly `len` bytes at uncompressed `offset` of `layer`, verified.
    pub async fn read(&self, layer: usize, offset: u64, len: u64) -> Result<Bytes> {
        let l = self
            .index
            .layers
            .get(layer)
            .ok_or(Error::NoSuchLayer(layer))?;
        let chunks = l.chunks_covering(offset, len)?;
        if chunks.is_empty() {
            return Ok(Bytes::new());
        }
        let start = l.chunk_range(chunks.start).start;
        let pieces = self.read_chunks(layer, chunks).await?;
        Ok(splice(&pieces, start, offset, len))
    }

    /// Reads `len` bytes at `offset` of the file `ino` (clamped to its size).
    pub async fn read_file(&self, ino: Inode, offset: u64, len: u64) -> Result<Bytes> {
        let node = self
            .index
            .node(ino)
            .ok_or_else(|| Error::Index(clip_index::Error::NotFound(format!("inode {}", ino.0))))?;
        let (layer, base) = match node.content {
            Content::File { layer, offset } => (layer as usize, offset),
            _ => return Ok(Bytes::new()),
        };
        if offset >= node.size {
            return Ok(Bytes::new());
        }
        let len = len.min(node.size - offset);
        self.read(layer, base + offset, len).await
    }
}

/// The `len` bytes at layer offset `offset` out of consecutive chunks whose first byte is at
/// layer offset `first`: a slice when one chunk holds them all, a copy otherwise.
pub(crate) fn splice(pieces: &[Bytes], first: u64, offset: u64, len: u64) -> Bytes {
    if let [only] = pieces {
        let from = (offset - first) as usize;
        return only.slice(from..from + len as usize);
    }
    let mut out = BytesMut::with_capacity(len as usize);
    let mut pos = first;
    for p in pieces {
        let end = pos + p.len() as u64;
        let from = offset.max(pos);
        let to = (offset + len).min(end);
        if from < to {
            out.extend_from_slice(&p[(from - pos) as usize..(to - pos) as usize]);
        }
        pos = end;
    }
    out.freeze()
}
