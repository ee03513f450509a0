//! Decompression with bookkeeping: while a layer blob streams through once, record seek
//! checkpoints, chunk digests and both layer digests; later, decode any run of chunks from
//! the compressed bytes between a checkpoint and the run's end.

use std::io::{self, BufRead, Read};
use std::ops::Range;

use bytes::Bytes;
use zstd::stream::raw::{Decoder as ZstdDecoder, InBuffer, Operation, OutBuffer};

use crate::digest::{Digest, Hasher};
use crate::error::{Error, Result};
use crate::layer::{BLOCK_SIZE, Checkpoint, Chunk, Compression, LayerIndex, ReadPlan};
use crate::zlib::{Inflater, Wrapper};

/// Deflate needs at most this much preceding output to resume.
const WINDOW: usize = 32 * 1024;
const INPUT_BUFFER: usize = 128 * 1024;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// zstd level for stored windows: good ratio, well under a millisecond per window.
const WINDOW_LEVEL: i32 = 9;
/// How far before a chunk boundary a deflate block boundary may be to become the checkpoint
/// in front of that chunk (at most a quarter of a chunk).
const NEAR_CHUNK_END: u64 = 256 * 1024;

/// A place a checkpoint can go: the current position, or a deflate block boundary just
/// before a chunk boundary, remembered until that chunk ends (see
/// `LayerStream::place_checkpoint`; its window is kept beside it).
#[derive(Debug, Clone, Copy)]
struct Candidate {
    compressed_offset: u64,
    bits: u8,
    uncompressed_offset: u64,
}

/// Output bytes handed to the hashing thread at a time.
const HASH_BATCH: usize = 256 * 1024;

enum HashMsg {
    Data(Vec<u8>),
    EndChunk,
}

/// What the hashing thread computed.
struct Hashed {
    chunks: Vec<Digest>,
    blocks: Vec<Digest>,
    diff_id: Option<Digest>,
}

/// Chunk and block digests (and optionally the diff_id) computed on a second thread, so
/// hashing overlaps inflating instead of adding to it.
struct HashPipe {
    tx: Option<std::sync::mpsc::SyncSender<HashMsg>>,
    handle: Option<std::thread::JoinHandle<Hashed>>,
    pending: Vec<u8>,
}

impl HashPipe {
    fn new(diff_id: bool) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<HashMsg>(8);
        let handle = std::thread::Builder::new()
            .name("clip-hash".into())
            .spawn(move || {
                let block_size = BLOCK_SIZE as usize;
                let mut chunks = Vec::new();
                let mut blocks = Vec::new();
                let mut chunk = Hasher::new();
                let mut block = Hasher::new();
                let mut in_block = 0usize;
                let mut whole = diff_id.then(Hasher::new);
                for msg in rx {
                    match msg {
                        HashMsg::Data(d) => {
                            chunk.update(&d);
                            if let Some(w) = whole.as_mut() {
                                w.update(&d);
                            }
                            let mut rest = d.as_slice();
                            while !rest.is_empty() {
                                let n = (block_size - in_block).min(rest.len());
                                block.update(&rest[..n]);
                                in_block += n;
                                rest = &rest[n..];
                                if in_block == block_size {
                                    blocks.push(std::mem::take(&mut block).finish());
                                    in_block = 0;
                                }
                            }
                        }
                        HashMsg::EndChunk => {
                            chunks.push(std::mem::take(&mut chunk).finish());
                            if in_block > 0 {
                                blocks.push(std::mem::take(&mut block).finish());
                                in_block = 0;
                            }
                        }
                    }
                }
                Hashed {
                    chunks,
                    blocks,
                    diff_id: whole.map(Hasher::finish),
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            handle: Some(handle),
            pending: Vec::with_capacity(HASH_BATCH),
        })
    }

    fn send(&mut self, msg: HashMsg) {
        if let Some(tx) = &self.tx {
            // A send fails only if the thread died; finish() reports that.
            let _ = tx.send(msg);
        }
    }

    fn update(&mut self, out: &[u8]) {
        self.pending.extend_from_slice(out);
        if self.pending.len() >= HASH_BATCH {
            let full = std::mem::replace(&mut self.pending, Vec::with_capacity(HASH_BATCH));
            self.send(HashMsg::Data(full));
        }
    }

    fn end_chunk(&mut self) {
        if !self.pending.is_empty() {
            let part = std::mem::replace(&mut self.pending, Vec::with_capacity(HASH_BATCH));
            self.send(HashMsg::Data(part));
        }
        self.send(HashMsg::EndChunk);
    }

    fn finish(mut self) -> Result<Hashed> {
        if !self.pending.is_empty() {
            let part = std::mem::take(&mut self.pending);
            self.send(HashMsg::Data(part));
        }
        self.tx = None;
        match self.handle.take().map(std::thread::JoinHandle::join) {
            Some(Ok(r)) => Ok(r),
            _ => Err(Error::Io(io::Error::other("the hashing thread failed"))),
        }
    }
}

impl Drop for HashPipe {
    fn drop(&mut self) {
        // Close the channel so the thread ends even when the stream is abandoned.
        self.tx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// What [`LayerStream`] learned about a layer by streaming it once.
#[derive(Debug, Clone)]
pub struct StreamSummary {
    pub compressed_size: u64,
    pub digest: Digest,
    pub uncompressed_size: u64,
    /// sha256 of the uncompressed stream, when it was asked for.
    pub diff_id: Option<Digest>,
    pub checkpoints: Vec<Checkpoint>,
    pub chunks: Vec<Chunk>,
    /// Digests of each chunk's [`BLOCK_SIZE`] blocks, chunk after chunk.
    pub blocks: Vec<Digest>,
}

/// Counts and hashes the compressed bytes as they are read.
#[derive(Debug)]
struct Source<R> {
    inner: R,
    count: u64,
    hasher: Hasher,
    eof: bool,
}

impl<R: Read> Source<R> {
    fn read_into(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(0);
                }
                Ok(n) => {
                    self.count += n as u64;
                    self.hasher.update(&buf[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

enum Codec {
    Plain,
    Gzip {
        inflater: Inflater,
        in_member: bool,
        members: u64,
    },
    Zstd {
        decoder: ZstdDecoder<'static>,
        frame_done: bool,
        frames: u64,
    },
}

/// A decompressing reader over a layer blob that records checkpoints and chunk digests.
/// Memory is bounded by its buffers, whatever the layer size.
pub struct LayerStream<R> {
    src: Source<R>,
    codec: Codec,
    input: Box<[u8]>,
    in_start: usize,
    in_end: usize,
    /// Compressed bytes consumed by the decoder.
    comp_pos: u64,
    out_pos: u64,
    window: Vec<u8>,
    chunk_size: u64,
    span: u64,
    last_checkpoint_out: u64,
    candidate: Option<Candidate>,
    /// The 32 KiB of output before `candidate`, as is.
    candidate_window: Vec<u8>,
    hashes: HashPipe,
    chunk_fill: u64,
    comp_at_last_output: u64,
    /// 1 while the zstd decoder holds a frame's last byte "hostage": read, and needed for the
    /// output it still has to hand out, but not reported as consumed until that is flushed.
    held: u64,
    /// Compressed end of each chunk; digests come from the hashing thread.
    chunk_ends: Vec<u64>,
    checkpoints: Vec<Checkpoint>,
    finished: bool,
}

impl<R> std::fmt::Debug for LayerStream<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerStream")
            .field("comp_pos", &self.comp_pos)
            .field("out_pos", &self.out_pos)
            .finish_non_exhaustive()
    }
}

impl<R: Read> LayerStream<R> {
    /// `diff_id`: also hash the whole uncompressed stream (not needed when the manifest's
    /// compressed digest is checked: it already pins every uncompressed byte).
    pub fn new(
        inner: R,
        compression: Compression,
        chunk_size: u32,
        span: u64,
        diff_id: bool,
    ) -> Result<Self> {
        let codec = match compression {
            Compression::None => Codec::Plain,
            Compression::Gzip => Codec::Gzip {
                inflater: Inflater::new(Wrapper::Gzip)
                    .map_err(|reason| Error::Gzip { offset: 0, reason })?,
                in_member: false,
                members: 0,
            },
            Compression::Zstd => Codec::Zstd {
                decoder: ZstdDecoder::new().map_err(|e| Error::Zstd {
                    offset: 0,
                    reason: e.to_string(),
                })?,
                frame_done: true,
                frames: 0,
            },
        };
        Ok(Self {
            src: Source {
                inner,
                count: 0,
                hasher: Hasher::new(),
                eof: false,
            },
            codec,
            input: vec![0u8; INPUT_BUFFER].into_boxed_slice(),
            in_start: 0,
            in_end: 0,
            comp_pos: 0,
            out_pos: 0,
            window: Vec::with_capacity(2 * WINDOW),
            chunk_size: u64::from(chunk_size.max(1)),
            span: span.max(1),
            last_checkpoint_out: 0,
            candidate: None,
            candidate_window: Vec::new(),
            hashes: HashPipe::new(diff_id)?,
            chunk_fill: 0,
            comp_at_last_output: 0,
            held: 0,
            chunk_ends: Vec::new(),
            checkpoints: Vec::new(),
            finished: false,
        })
    }

    /// Uncompressed bytes produced so far.
    pub fn uncompressed_position(&self) -> u64 {
        self.out_pos
    }

    /// Compressed bytes read from the source so far.
    pub fn compressed_position(&self) -> u64 {
        self.src.count
    }

    /// Reads the rest of the stream and returns what was learned.
    pub fn finish(mut self) -> Result<StreamSummary> {
        let mut sink = vec![0u8; 64 * 1024];
        while self.produce(&mut sink)? > 0 {}
        if self.chunk_fill > 0 {
            self.hashes.end_chunk();
            self.chunk_ends.push(self.comp_at_last_output);
        }
        let Hashed {
            chunks: digests,
            blocks,
            diff_id,
        } = self.hashes.finish()?;
        if digests.len() != self.chunk_ends.len() {
            return Err(Error::Io(io::Error::other(
                "the hashing thread lost chunks",
            )));
        }
        let chunks = digests
            .into_iter()
            .zip(self.chunk_ends)
            .map(|(digest, compressed_end)| Chunk {
                digest,
                compressed_end,
            })
            .collect();
        Ok(StreamSummary {
            compressed_size: self.src.count,
            digest: self.src.hasher.finish(),
            uncompressed_size: self.out_pos,
            diff_id,
            checkpoints: self.checkpoints,
            chunks,
            blocks,
        })
    }

    fn refill(&mut self) -> Result<()> {
        if self.in_start > 0 {
            self.input.copy_within(self.in_start..self.in_end, 0);
            self.in_end -= self.in_start;
            self.in_start = 0;
        }
        if self.in_end < self.input.len() && !self.src.eof {
            let n = self.src.read_into(&mut self.input[self.in_end..])?;
            self.in_end += n;
        }
        Ok(())
    }

    fn consume(&mut self, n: usize) {
        self.in_start += n;
        self.comp_pos += n as u64;
    }

    fn available(&self) -> usize {
        self.in_end - self.in_start
    }

    /// Records output: digests, the deflate window, chunk boundaries.
    fn account(&mut self, out: &[u8]) {
        if out.is_empty() {
            return;
        }
        self.hashes.update(out);
        if matches!(self.codec, Codec::Gzip { .. }) {
            if out.len() >= WINDOW {
                self.window.clear();
                self.window.extend_from_slice(&out[out.len() - WINDOW..]);
            } else {
                if self.window.len() + out.len() > 2 * WINDOW {
                    let drop = self.window.len() + out.len() - WINDOW;
                    self.window.drain(..drop.min(self.window.len()));
                }
                self.window.extend_from_slice(out);
            }
        }
        self.out_pos += out.len() as u64;
        self.chunk_fill += out.len() as u64;
        self.comp_at_last_output = self.comp_pos + self.held;
        if self.chunk_fill == self.chunk_size {
            self.hashes.end_chunk();
            self.chunk_ends.push(self.comp_pos + self.held);
            self.chunk_fill = 0;
        }
    }

    /// A checkpoint here (the current position).
    fn checkpoint(&mut self, bits: u8, raw_deflate: bool) -> Result<()> {
        let window = if raw_deflate {
            Self::stored_window(self.window_tail())?
        } else {
            Bytes::new()
        };
        self.push_checkpoint(self.here(bits), raw_deflate, window);
        Ok(())
    }

    /// The current position, with `bits` of the byte before it to resume from.
    fn here(&self, bits: u8) -> Candidate {
        Candidate {
            compressed_offset: self.comp_pos,
            bits,
            uncompressed_offset: self.out_pos,
        }
    }

    /// The last 32 KiB of output: what a raw inflate resuming here needs.
    fn window_tail(&self) -> &[u8] {
        &self.window[self.window.len().saturating_sub(WINDOW)..]
    }

    /// `window` (the output before a raw deflate checkpoint) as the index stores it.
    fn stored_window(window: &[u8]) -> Result<Bytes> {
        Ok(zstd::bulk::compress(window, WINDOW_LEVEL)?.into())
    }

    fn push_checkpoint(&mut self, at: Candidate, raw_deflate: bool, window: Bytes) {
        self.checkpoints.push(Checkpoint {
            compressed_offset: at.compressed_offset,
            bits: at.bits,
            uncompressed_offset: at.uncompressed_offset,
            raw_deflate,
            window: window.into(),
        });
        self.last_checkpoint_out = at.uncompressed_offset;
        self.candidate = None;
    }

    /// Where gzip checkpoints go. A span run (the chunks decoded from one checkpoint) ends
    /// with the chunk that holds the next checkpoint, and the next run starts at that
    /// checkpoint: the compressed bytes between the two are fetched by both. So a checkpoint
    /// goes on the last block boundary before a chunk boundary (or on the chunk boundary),
    /// about `span` after the previous one: runs then overlap by less than a deflate block
    /// instead of half a chunk on average. A stretch without such a boundary (blocks of
    /// megabytes, as runs of zeros make) gets one at its first block boundary past
    /// `span + chunk_size`.
    ///
    /// Called after each inflate step: `block_bits` when it stopped at a block boundary,
    /// `chunk_end` when its output completed a chunk.
    fn place_checkpoint(&mut self, block_bits: Option<u8>, chunk_end: bool) -> Result<()> {
        let since = self.out_pos - self.last_checkpoint_out;
        let due = since > 0 && since >= self.span.saturating_sub(self.chunk_size / 2);
        let near = NEAR_CHUNK_END.min(self.chunk_size / 4);
        if let Some(bits) = block_bits {
            if (due && self.chunk_fill == 0) || since >= self.span + self.chunk_size {
                return self.checkpoint(bits, true);
            }
            if due && self.chunk_fill >= self.chunk_size - near {
                let mut window = std::mem::take(&mut self.candidate_window);
                window.clear();
                window.extend_from_slice(self.window_tail());
                self.candidate_window = window;
                self.candidate = Some(self.here(bits));
            }
        }
        if chunk_end
            && let Some(c) = self.candidate.take()
            && self.out_pos - c.uncompressed_offset <= near
        {
            let window = Self::stored_window(&self.candidate_window)?;
            self.push_checkpoint(c, true, window);
        }
        Ok(())
    }

    /// Produces up to `buf.len()` bytes, never crossing a chunk boundary.
    fn produce(&mut self, buf: &mut [u8]) -> Result<usize> {
        if self.finished || buf.is_empty() {
            return Ok(0);
        }
        let room = buf.len().min((self.chunk_size - self.chunk_fill) as usize);
        let buf = &mut buf[..room];
        // Each codec accounts its output itself: a checkpoint must see the output of the
        // step that reached it.
        match self.codec {
            Codec::Plain => self.produce_plain(buf),
            Codec::Gzip { .. } => self.produce_gzip(buf),
            Codec::Zstd { .. } => self.produce_zstd(buf),
        }
    }

    fn produce_plain(&mut self, buf: &mut [u8]) -> Result<usize> {
        if self.available() == 0 {
            self.refill()?;
            if self.available() == 0 {
                self.finished = true;
                return Ok(0);
            }
        }
        let n = buf.len().min(self.available());
        buf[..n].copy_from_slice(&self.input[self.in_start..self.in_start + n]);
        self.consume(n);
        self.account(&buf[..n]);
        Ok(n)
    }

    fn produce_gzip(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut idle = 0;
        loop {
            if self.available() < 2 && !self.src.eof {
                self.refill()?;
            }
            let Codec::Gzip {
                inflater,
                in_member,
                members,
            } = &mut self.codec
            else {
                return Ok(0);
            };
            if !*in_member {
                let rest = &self.input[self.in_start..self.in_end];
                if rest.is_empty() {
                    if *members == 0 {
                        return Err(Error::Truncated {
                            what: "gzip stream (no data)",
                        });
                    }
                    self.finished = true;
                    return Ok(0);
                }
                if rest.len() >= 2 && rest[..2] == GZIP_MAGIC {
                    if *members > 0 {
                        inflater
                            .reset(Wrapper::Gzip)
                            .map_err(|reason| Error::Gzip {
                                offset: self.comp_pos,
                                reason,
                            })?;
                    }
                    *in_member = true;
                    *members += 1;
                } else if rest.iter().all(|&b| b == 0) && *members > 0 {
                    // Zero padding after the last member, which some writers add.
                    let n = rest.len();
                    self.consume(n);
                    continue;
                } else if rest.len() < 2 && !self.src.eof {
                    continue;
                } else {
                    return Err(Error::Gzip {
                        offset: self.comp_pos,
                        reason: if *members == 0 {
                            "not a gzip stream (bad magic)".into()
                        } else {
                            "unexpected data after a gzip member".into()
                        },
                    });
                }
            }
            let step = inflater
                .inflate(&self.input[self.in_start..self.in_end], buf, true)
                .map_err(|reason| Error::Gzip {
                    offset: self.comp_pos,
                    reason,
                })?;
            if step.stream_end {
                *in_member = false;
            }
            self.consume(step.consumed);
            self.account(&buf[..step.produced]);
            let block = (step.at_block_boundary() && !step.stream_end).then(|| step.bits());
            self.place_checkpoint(block, step.produced > 0 && self.chunk_fill == 0)?;
            if step.produced > 0 {
                return Ok(step.produced);
            }
            if step.consumed == 0 {
                if self.src.eof && self.available() == 0 {
                    return Err(Error::Truncated {
                        what: "gzip member",
                    });
                }
                idle += 1;
                if idle > 2 {
                    if self.available() == self.input.len() || self.src.eof {
                        return Err(Error::Gzip {
                            offset: self.comp_pos,
                            reason: "inflate made no progress".into(),
                        });
                    }
                    self.refill()?;
                }
            } else {
                idle = 0;
            }
        }
    }

    fn produce_zstd(&mut self, buf: &mut [u8]) -> Result<usize> {
        loop {
            if self.available() == 0 {
                self.refill()?;
            }
            let Codec::Zstd {
                decoder,
                frame_done,
                frames,
            } = &mut self.codec
            else {
                return Ok(0);
            };
            if self.in_end == self.in_start && self.src.eof {
                if *frame_done && *frames > 0 {
                    self.finished = true;
                    return Ok(0);
                }
                // The decoder may still hold output of a complete frame.
                if *frames == 0 {
                    return Err(Error::Truncated {
                        what: "zstd stream (no data)",
                    });
                }
            }
            let starting_frame = *frame_done && self.in_end > self.in_start;
            let mut input = InBuffer::around(&self.input[self.in_start..self.in_end]);
            let mut output = OutBuffer::around(&mut *buf);
            let hint = decoder
                .run(&mut input, &mut output)
                .map_err(|e| Error::Zstd {
                    offset: self.comp_pos,
                    reason: e.to_string(),
                })?;
            let (consumed, produced) = (input.pos, output.pos());
            if starting_frame && consumed > 0 {
                *frames += 1;
            }
            *frame_done = hint == 0;
            let done = *frame_done;
            self.consume(consumed);
            // The hostage byte is still in our buffer; the decoder answers 1 while it holds it.
            self.held = u64::from(hint == 1 && self.available() > 0);
            self.account(&buf[..produced]);
            if done
                && (self.available() > 0 || !self.src.eof)
                && self.out_pos - self.last_checkpoint_out >= self.span
            {
                self.checkpoint(0, false)?;
            }
            if produced > 0 {
                return Ok(produced);
            }
            if consumed == 0 && self.src.eof && self.available() == 0 && !done {
                return Err(Error::Truncated { what: "zstd frame" });
            }
        }
    }
}

impl<R: Read> Read for LayerStream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.produce(buf).map_err(io::Error::other)
    }
}

/// Decodes and verifies the chunks of `plan` from `compressed`, the blob bytes of
/// `plan.compressed`. Returns one buffer per chunk, each checked against its digest.
pub fn decode_chunks(
    layer: &LayerIndex,
    plan: &ReadPlan,
    compressed: &[u8],
) -> Result<Vec<Vec<u8>>> {
    let want = plan.compressed.end.saturating_sub(plan.compressed.start);
    if compressed.len() as u64 != want {
        return Err(Error::ShortInput(format!(
            "got {} bytes for compressed range {:?}",
            compressed.len(),
            plan.compressed
        )));
    }
    let mut chunks = Vec::with_capacity(plan.chunks.len());
    let mut input = compressed;
    decode_stream(layer, plan, &mut input, &mut |_, chunk| {
        chunks.push(chunk);
        Ok(())
    })?;
    Ok(chunks)
}

/// Decodes the chunks of `plan` from `input`, which yields the blob bytes of
/// `plan.compressed` in order (it may block until more arrive), and hands each chunk to
/// `emit` as soon as it is complete and matches its digest: a reader of the run's first
/// chunk need not wait for the rest of the fetch. Stops at the first error; the chunks
/// emitted before it are good.
pub fn decode_stream(
    layer: &LayerIndex,
    plan: &ReadPlan,
    input: &mut dyn BufRead,
    emit: &mut dyn FnMut(u32, Vec<u8>) -> Result<()>,
) -> Result<()> {
    if plan.chunks.is_empty() {
        return Ok(());
    }
    if plan.chunks.end as usize > layer.chunks.len()
        || layer.chunk_range(plan.chunks.end - 1).is_empty()
    {
        return Err(Error::ShortInput(format!(
            "chunks {:?} are not in the layer",
            plan.chunks
        )));
    }
    match layer.compression {
        Compression::None => {
            let mut sink = Sink::new(layer, plan.chunks.clone(), None, emit)?;
            while !sink.done() {
                let got = input
                    .read(sink.room(&mut []))
                    .map_err(|e| Error::ShortInput(format!("plain range: {e}")))?;
                if got == 0 {
                    return Err(Error::ShortInput("plain range ended early".into()));
                }
                sink.advance(got)?;
            }
            Ok(())
        }
        Compression::Gzip => inflate_stream(layer, plan, input, emit),
        Compression::Zstd => unzstd_stream(layer, plan, input, emit),
    }
}

/// Collects decoded output into chunks, dropping what precedes the first one, and hands
/// each chunk on once it is whole and verified.
struct Sink<'a> {
    layer: &'a LayerIndex,
    /// Uncompressed offset of the next decoded byte.
    pos: u64,
    /// Uncompressed offset of the first wanted byte.
    first: u64,
    next: u32,
    end: u32,
    chunk: Vec<u8>,
    filled: usize,
    emit: &'a mut dyn FnMut(u32, Vec<u8>) -> Result<()>,
}

impl<'a> Sink<'a> {
    /// Decoding resumes at uncompressed offset `start` (the first chunk's start if `None`).
    fn new(
        layer: &'a LayerIndex,
        chunks: Range<u32>,
        start: Option<u64>,
        emit: &'a mut dyn FnMut(u32, Vec<u8>) -> Result<()>,
    ) -> Result<Self> {
        let first = layer.chunk_range(chunks.start).start;
        let start = start.unwrap_or(first);
        // A checkpoint past the first wanted byte cannot produce it, and its offset could
        // overflow `pos`: only an index that lies about its checkpoints gets here.
        if start > first {
            return Err(Error::ShortInput(format!(
                "decoding would start at uncompressed offset {start}, after the chunks at {first}"
            )));
        }
        let mut sink = Self {
            layer,
            pos: start,
            first,
            next: chunks.start,
            end: chunks.end,
            chunk: Vec::new(),
            filled: 0,
            emit,
        };
        sink.start_chunk();
        Ok(sink)
    }

    fn start_chunk(&mut self) {
        let r = self.layer.chunk_range(self.next);
        self.chunk = vec![0u8; (r.end - r.start) as usize];
        self.filled = 0;
    }

    fn done(&self) -> bool {
        self.next >= self.end
    }

    /// A buffer to decode into: the current chunk once skipping is over.
    fn room<'b>(&'b mut self, scratch: &'b mut [u8]) -> &'b mut [u8] {
        if self.pos >= self.first {
            &mut self.chunk[self.filled..]
        } else {
            let skip = (self.first - self.pos).min(scratch.len() as u64) as usize;
            &mut scratch[..skip]
        }
    }

    fn advance(&mut self, n: usize) -> Result<()> {
        if self.pos >= self.first {
            self.filled += n;
        }
        self.pos += n as u64;
        if self.filled == self.chunk.len() && !self.done() {
            let i = self.next;
            let chunk = std::mem::take(&mut self.chunk);
            let expected = self.layer.chunks[i as usize].digest;
            let actual = Digest::of(&chunk);
            if actual != expected {
                return Err(Error::DigestMismatch {
                    what: format!("chunk {i} of layer {}", self.layer.digest),
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                });
            }
            (self.emit)(i, chunk)?;
            self.next += 1;
            if !self.done() {
                self.start_chunk();
            }
        }
        Ok(())
    }
}

fn read_err(e: io::Error) -> Error {
    Error::ShortInput(format!("reading the compressed range: {e}"))
}

/// Consumes `n` bytes of `input`, however it is split into buffers.
fn skip(input: &mut dyn BufRead, mut n: usize, what: &str) -> Result<()> {
    while n > 0 {
        let have = input.fill_buf().map_err(read_err)?.len();
        if have == 0 {
            return Err(Error::ShortInput(what.to_owned()));
        }
        let k = have.min(n);
        input.consume(k);
        n -= k;
    }
    Ok(())
}

fn inflate_stream(
    layer: &LayerIndex,
    plan: &ReadPlan,
    input: &mut dyn BufRead,
    emit: &mut dyn FnMut(u32, Vec<u8>) -> Result<()>,
) -> Result<()> {
    let err = |reason: String| Error::Gzip {
        offset: plan.compressed.start,
        reason,
    };
    let checkpoint = match plan.checkpoint {
        Some(i) => Some(
            layer
                .checkpoints
                .get(i)
                .ok_or_else(|| err(format!("no checkpoint {i}")))?,
        ),
        None => None,
    };
    let (mut inflater, mut raw, start) = match checkpoint {
        Some(cp) if cp.raw_deflate => {
            let mut inf = Inflater::new(Wrapper::Raw).map_err(err)?;
            if cp.bits > 0 {
                let byte = *input
                    .fill_buf()
                    .map_err(read_err)?
                    .first()
                    .ok_or_else(|| Error::ShortInput("no byte to prime".into()))?;
                input.consume(1);
                inf.prime(cp.bits, byte).map_err(err)?;
            }
            let window = zstd::bulk::decompress(&cp.window.get()?, WINDOW)
                .map_err(|e| err(format!("checkpoint window: {e}")))?;
            inf.set_dictionary(&window).map_err(err)?;
            (inf, true, cp.uncompressed_offset)
        }
        Some(cp) => (
            Inflater::new(Wrapper::Gzip).map_err(err)?,
            false,
            cp.uncompressed_offset,
        ),
        None => (Inflater::new(Wrapper::Gzip).map_err(err)?, false, 0),
    };
    let mut sink = Sink::new(layer, plan.chunks.clone(), Some(start), emit)?;
    let mut scratch = vec![0u8; 64 * 1024];
    let mut member_open = true;
    while !sink.done() {
        if !member_open {
            // Between gzip members: a raw resume leaves the 8-byte trailer to us.
            if raw {
                skip(input, 8, "gzip trailer")?;
                raw = false;
            }
            let next = input.fill_buf().map_err(read_err)?;
            if next.is_empty() || (next.len() >= 2 && next[..2] != GZIP_MAGIC) {
                return Err(Error::ShortInput("input ended before the chunks".into()));
            }
            inflater.reset(Wrapper::Gzip).map_err(err)?;
            member_open = true;
        }
        let available = input.fill_buf().map_err(read_err)?;
        let room = sink.room(&mut scratch);
        let step = inflater.inflate(available, room, false).map_err(err)?;
        let ended = available.is_empty();
        input.consume(step.consumed);
        sink.advance(step.produced)?;
        if step.stream_end {
            member_open = false;
        } else if step.consumed == 0 && step.produced == 0 {
            return Err(Error::ShortInput(if ended {
                "input ended before the chunks".into()
            } else {
                "the inflater made no progress".into()
            }));
        }
    }
    Ok(())
}

fn unzstd_stream(
    layer: &LayerIndex,
    plan: &ReadPlan,
    input: &mut dyn BufRead,
    emit: &mut dyn FnMut(u32, Vec<u8>) -> Result<()>,
) -> Result<()> {
    let err = |e: io::Error| Error::Zstd {
        offset: plan.compressed.start,
        reason: e.to_string(),
    };
    let start = plan
        .checkpoint
        .and_then(|i| layer.checkpoints.get(i))
        .map_or(0, |cp| cp.uncompressed_offset);
    let mut decoder = ZstdDecoder::new().map_err(err)?;
    let mut sink = Sink::new(layer, plan.chunks.clone(), Some(start), emit)?;
    let mut scratch = vec![0u8; 64 * 1024];
    while !sink.done() {
        let available = input.fill_buf().map_err(read_err)?;
        let mut inbuf = InBuffer::around(available);
        let room = sink.room(&mut scratch);
        let mut output = OutBuffer::around(room);
        decoder.run(&mut inbuf, &mut output).map_err(err)?;
        let (consumed, produced) = (inbuf.pos, output.pos());
        input.consume(consumed);
        sink.advance(produced)?;
        if produced == 0 && consumed == 0 {
            return Err(Error::ShortInput("input ended before the chunks".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text of a few kilobytes that zstd packs into one frame of one block.
    fn text(len: usize) -> Vec<u8> {
        let mut x: u32 = 1;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                b"abcdefgh \n"[(x >> 16) as usize % 10]
            })
            .collect()
    }

    #[test]
    fn a_checkpoint_after_the_wanted_chunks_is_an_error() -> Result<()> {
        // Found by the decode_chunks fuzz target: a checkpoint claiming uncompressed offset
        // u64::MAX made the output position overflow.
        let data = text(100);
        for (compression, blob) in [
            (Compression::Gzip, gzip(&data)?),
            (Compression::Zstd, zstd::bulk::compress(&data, 3)?),
        ] {
            let layer = LayerIndex {
                media_type: String::new(),
                compression,
                digest: Digest::of(&blob),
                compressed_size: blob.len() as u64,
                diff_id: Digest::of(&data),
                uncompressed_size: 100,
                chunk_size: 100,
                block_size: 0,
                blocks: crate::Part::default(),
                checkpoints: vec![Checkpoint {
                    compressed_offset: 0,
                    bits: 0,
                    uncompressed_offset: u64::MAX,
                    raw_deflate: false,
                    window: crate::Part::default(),
                }],
                chunks: vec![Chunk {
                    digest: Digest::of(&data),
                    compressed_end: blob.len() as u64,
                }],
            };
            let plan = ReadPlan {
                chunks: 0..1,
                checkpoint: Some(0),
                compressed: 0..blob.len() as u64,
            };
            let r = decode_chunks(&layer, &plan, &blob);
            assert!(matches!(r, Err(Error::ShortInput(_))), "{r:?}");
        }
        Ok(())
    }

    fn gzip(data: &[u8]) -> Result<Vec<u8>> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data)?;
        Ok(e.finish()?)
    }

    #[test]
    fn zstd_chunks_decode_from_their_planned_range_when_the_frame_ends_inside_them() -> Result<()> {
        // Found by the index_layer_zstd fuzz target: zstd reports a frame's last byte as
        // unconsumed until the frame's output is flushed, so chunks that end before that
        // flush were planned one byte short and could not be decoded.
        let data = text(9000);
        let blob = zstd::bulk::compress(&data, 3)?;
        let chunk_size = 1000;
        let s = LayerStream::new(
            blob.as_slice(),
            Compression::Zstd,
            chunk_size,
            1 << 20,
            false,
        )?
        .finish()?;
        let layer = LayerIndex {
            media_type: String::new(),
            compression: Compression::Zstd,
            digest: s.digest,
            compressed_size: s.compressed_size,
            diff_id: s.diff_id.unwrap_or_default(),
            uncompressed_size: s.uncompressed_size,
            chunk_size,
            checkpoints: s.checkpoints,
            chunks: s.chunks,
            block_size: BLOCK_SIZE,
            blocks: crate::Part::of_digests(&s.blocks),
        };
        assert_eq!(layer.chunks.len(), 9);
        for i in 0..9 {
            let plan = layer.plan(i..i + 1);
            let range = plan.compressed.start as usize..plan.compressed.end as usize;
            let got = decode_chunks(&layer, &plan, &blob[range])?;
            let want = layer.chunk_range(i);
            assert_eq!(got, [&data[want.start as usize..want.end as usize]]);
        }
        Ok(())
    }
}
