//! The range reader: produce exact, verified bytes of a layer's uncompressed stream by
//! fetching only the compressed bytes between the nearest checkpoint and the wanted chunks.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use clip_index::{Content, ImageIndex, Inode};
use tokio::sync::mpsc;

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
        let (tx, mut rx) = mpsc::unbounded_channel();
        let decode = self.stream_chunks(layer, chunks, move |_, chunk| {
            // The receiver lives until the decode ends.
            let _ = tx.send(chunk);
        });
        let collect = async {
            let mut out = Vec::new();
            while let Some(chunk) = rx.recv().await {
                out.push(chunk);
            }
            out
        };
        let (decoded, out) = tokio::join!(decode, collect);
        decoded?;
        Ok(out)
    }

    /// Fetches a run of chunks of `layer` and hands each to `emit` as soon as it is decoded
    /// and verified, while the rest of the range is still arriving.
    pub async fn stream_chunks(
        &self,
        layer: usize,
        chunks: Range<u32>,
        mut emit: impl FnMut(u32, Bytes) + Send + 'static,
    ) -> Result<()> {
        let index = self.index.clone();
        let l = index.layers.get(layer).ok_or(Error::NoSuchLayer(layer))?;
        let plan = l.plan(chunks);
        let digest = l.digest;
        let range = plan.compressed.clone();
        let (tx, rx) = mpsc::channel::<Bytes>(32);
        let decode = tokio::task::spawn_blocking(move || {
            let mut input = ChannelInput::new(rx);
            clip_index::decode_stream(&index.layers[layer], &plan, &mut input, &mut |i, c| {
                emit(i, Bytes::from(c));
                Ok(())
            })
        });
        let fetched = self.source.stream_range(&digest, range.clone(), tx).await;
        let decoded = decode.await.map_err(|e| Error::Task(e.to_string()))?;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes
            .fetch_add(range.end - range.start, Ordering::Relaxed);
        // A failed fetch starves the decoder, so its error is the cause; a decoder that
        // failed (a digest mismatch) makes the fetch give up, so its error is.
        match (fetched, decoded) {
            (Err(Error::Task(_)), Err(d)) => Err(d.into()),
            (Err(f), _) => Err(f),
            (Ok(()), d) => Ok(d?),
        }
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

/// The blocking side of a channel of byte pieces, as the decoder reads it.
struct ChannelInput {
    rx: mpsc::Receiver<Bytes>,
    piece: Bytes,
}

impl ChannelInput {
    fn new(rx: mpsc::Receiver<Bytes>) -> Self {
        Self {
            rx,
            piece: Bytes::new(),
        }
    }
}

impl std::io::Read for ChannelInput {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = {
            let have = std::io::BufRead::fill_buf(self)?;
            let n = have.len().min(buf.len());
            buf[..n].copy_from_slice(&have[..n]);
            n
        };
        std::io::BufRead::consume(self, n);
        Ok(n)
    }
}

impl std::io::BufRead for ChannelInput {
    /// Waits for the next piece; empty at the end of the range (or if the fetch failed).
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.piece.is_empty() {
            match self.rx.blocking_recv() {
                Some(p) => self.piece = p,
                None => break,
            }
        }
        Ok(&self.piece)
    }

    fn consume(&mut self, n: usize) {
        let _ = self.piece.split_to(n.min(self.piece.len()));
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
