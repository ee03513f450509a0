//! Index a layer, then decode chunk runs from the compressed bytes a plan names, and compare
//! with the tar stream itself.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use std::io::Write;

use clip_index::{
    Compression, Error, IndexOptions, LayerSpec, decode_chunks, decode_stream, index_layer,
    layer::ReadPlan,
};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn add_file(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, name, data).unwrap_or_default();
}

/// A tar of files with text-like and random content, `total` bytes of data or so.
fn sample_tar(total: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut b = tar::Builder::new(Vec::new());
    let mut written = 0;
    let mut i = 0;
    while written < total {
        let len = rng.below(3 * 1024 * 1024) as usize + 1;
        let data: Vec<u8> = if i % 2 == 0 {
            (0..len).map(|_| (rng.next() & 0xff) as u8).collect()
        } else {
            (0..len)
                .map(|j| b"the quick brown fox jumps over the lazy dog\n"[j % 44])
                .collect()
        };
        add_file(&mut b, &format!("f{i}"), &data);
        written += len;
        i += 1;
    }
    b.into_inner().unwrap_or_default()
}

fn gzip(data: &[u8], members: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let part = data.len().div_ceil(members.max(1));
    for piece in data.chunks(part.max(1)) {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(piece).unwrap_or_default();
        out.extend(e.finish().unwrap_or_default());
    }
    out
}

fn zstd_frames(data: &[u8], frames: usize) -> Vec<u8> {
    let part = data.len().div_ceil(frames.max(1));
    data.chunks(part.max(1))
        .flat_map(|p| zstd::bulk::compress(p, 3).unwrap_or_default())
        .collect()
}

const MEDIA: [&str; 3] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
];

fn check_random_ranges(
    blob: &[u8],
    tar_bytes: &[u8],
    media: &str,
    span: u64,
) -> anyhow::Result<()> {
    let opts = IndexOptions {
        chunk_size: 256 * 1024 - 100,
        checkpoint_span: span,
        verify_diff_id: true,
    };
    let spec = LayerSpec {
        media_type: media.into(),
        digest: Some(clip_index::Digest::of(blob)),
        diff_id: Some(clip_index::Digest::of(tar_bytes)),
    };
    let built = index_layer(blob, &spec, &opts)?;
    let layer = &built.layer;
    assert_eq!(layer.uncompressed_size, tar_bytes.len() as u64);
    if Compression::from_media_type(media)? == Compression::Gzip {
        assert!(
            layer.checkpoints.len() as u64 >= tar_bytes.len() as u64 / span / 2,
            "too few checkpoints: {}",
            layer.checkpoints.len()
        );
    }
    let mut rng = Rng(7);
    let n = layer.chunks.len() as u64;
    for _ in 0..40 {
        let first = rng.below(n) as u32;
        let last = (u64::from(first) + rng.below(3)).min(n - 1) as u32;
        let plan: ReadPlan = layer.plan(first..last + 1);
        let comp = &blob[plan.compressed.start as usize..plan.compressed.end as usize];
        let chunks = decode_chunks(layer, &plan, comp)?;
        // Each chunk's block digests are those of its 64 KiB blocks.
        for (i, chunk) in (first..=last).zip(&chunks) {
            let blocks: Vec<clip_index::Digest> = chunk
                .chunks(clip_index::BLOCK_SIZE as usize)
                .map(clip_index::Digest::of)
                .collect();
            assert_eq!(layer.chunk_blocks(i)?, blocks, "chunk {i}");
        }
        let start = layer.chunk_range(first).start as usize;
        let got: Vec<u8> = chunks.concat();
        assert_eq!(got.as_slice(), &tar_bytes[start..start + got.len()]);
        assert_eq!(start + got.len(), layer.chunk_range(last).end as usize);
        // Streamed in pieces of a few bytes (as a network delivers them, split anywhere:
        // inside the priming byte, a gzip trailer, a member header), the same chunks come
        // out one by one, in order.
        let mut pieces = Trickle {
            data: comp,
            pos: 0,
            step: 1 + rng.below(7) as usize,
        };
        let mut streamed = Vec::new();
        decode_stream(layer, &plan, &mut pieces, &mut |i, chunk| {
            streamed.push((i, chunk));
            Ok(())
        })?;
        let order: Vec<u32> = streamed.iter().map(|(i, _)| *i).collect();
        assert_eq!(order, (first..last + 1).collect::<Vec<_>>());
        assert!(streamed.into_iter().map(|(_, c)| c).eq(chunks));
    }
    Ok(())
}

/// A reader that hands out its data `step` bytes at a time.
struct Trickle<'a> {
    data: &'a [u8],
    pos: usize,
    step: usize,
}

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = std::io::BufRead::fill_buf(self)?.len().min(buf.len());
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl std::io::BufRead for Trickle<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        let end = (self.pos + self.step).min(self.data.len());
        Ok(&self.data[self.pos..end])
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
    }
}

#[test]
fn a_stream_that_ends_early_or_lies_is_an_error() -> anyhow::Result<()> {
    let t = sample_tar(6 << 20, 3);
    let blob = gzip(&t, 1);
    let spec = LayerSpec {
        media_type: MEDIA[1].into(),
        digest: Some(clip_index::Digest::of(&blob)),
        diff_id: None,
    };
    let opts = IndexOptions {
        chunk_size: 256 * 1024 - 100,
        checkpoint_span: 1 << 20,
        verify_diff_id: false,
    };
    let layer = index_layer(blob.as_slice(), &spec, &opts)?.layer;
    let plan = layer.plan(2..6);
    let comp = &blob[plan.compressed.start as usize..plan.compressed.end as usize];
    // Cut short: the chunks before the cut come out, then an error.
    let mut cut = &comp[..comp.len() / 2];
    let mut got = 0;
    let r = decode_stream(&layer, &plan, &mut cut, &mut |_, _| {
        got += 1;
        Ok(())
    });
    assert!(matches!(r, Err(Error::ShortInput(_))), "{r:?}");
    assert!(got < 4, "{got} chunks from half the input");
    // One flipped byte: never a wrong chunk, always an error.
    let mut bad = comp.to_vec();
    // Inside what chunk 4 is decoded from (bytes before chunk 2 are decoded and dropped).
    let at = ((layer.chunks[3].compressed_end + layer.chunks[4].compressed_end) / 2
        - plan.compressed.start) as usize;
    bad[at] ^= 0x55;
    let mut good = Vec::new();
    let r = decode_stream(&layer, &plan, &mut bad.as_slice(), &mut |i, c| {
        good.push((i, c));
        Ok(())
    });
    assert!(r.is_err(), "a corrupt stream decoded");
    for (i, c) in good {
        let range = layer.chunk_range(i);
        assert_eq!(c, t[range.start as usize..range.end as usize]);
    }
    Ok(())
}

#[test]
fn an_index_of_chunks_smaller_than_a_block_is_read_back() -> anyhow::Result<()> {
    // `clip index --chunk-size` takes 4 KiB and up: below the 64 KiB block, every chunk is
    // one block, and the index must still pass its own validation.
    let t = sample_tar(1 << 20, 5);
    let blob = gzip(&t, 1);
    for chunk_size in [4096, 50_000, 65_535] {
        let opts = IndexOptions {
            chunk_size,
            checkpoint_span: 1 << 18,
            verify_diff_id: false,
        };
        let spec = LayerSpec {
            media_type: MEDIA[1].into(),
            digest: None,
            diff_id: None,
        };
        let built = index_layer(blob.as_slice(), &spec, &opts)?;
        let index = clip_index::assemble(clip_index::ImageSource::default(), vec![built])?;
        let back = clip_index::decode(&clip_index::encode(&index)?)?;
        assert_eq!(back, index, "chunk size {chunk_size}");
        let layer = &back.layers[0];
        let n = layer.chunks.len() as u32;
        let plan = layer.plan(0..n);
        let chunks = decode_chunks(layer, &plan, &blob[..plan.compressed.end as usize])?;
        for (i, chunk) in chunks.iter().enumerate() {
            assert_eq!(
                layer.chunk_blocks(i as u32)?,
                [clip_index::Digest::of(chunk)]
            );
        }
    }
    Ok(())
}

#[test]
fn gzip_chunks_decode_from_checkpoints() -> anyhow::Result<()> {
    let t = sample_tar(12 << 20, 1);
    check_random_ranges(&gzip(&t, 1), &t, MEDIA[1], 1 << 20)
}

#[test]
fn multi_member_gzip_chunks_decode_across_members() -> anyhow::Result<()> {
    let t = sample_tar(10 << 20, 2);
    check_random_ranges(&gzip(&t, 7), &t, MEDIA[1], 1 << 20)
}

#[test]
fn zstd_chunks_decode_from_frame_starts() -> anyhow::Result<()> {
    let t = sample_tar(6 << 20, 3);
    check_random_ranges(&zstd_frames(&t, 1), &t, MEDIA[2], 1 << 20)?;
    check_random_ranges(&zstd_frames(&t, 9), &t, MEDIA[2], 1 << 20)
}

#[test]
fn plain_tar_chunks_are_blob_ranges() -> anyhow::Result<()> {
    let t = sample_tar(3 << 20, 4);
    check_random_ranges(&t, &t, MEDIA[0], 1 << 20)
}

#[test]
fn corrupt_and_truncated_gzip_give_errors() {
    let t = sample_tar(2 << 20, 5);
    let blob = gzip(&t, 1);
    let spec = LayerSpec {
        media_type: MEDIA[1].into(),
        digest: None,
        diff_id: None,
    };
    let opts = IndexOptions::default();
    let truncated = index_layer(&blob[..blob.len() / 2], &spec, &opts);
    assert!(
        matches!(truncated, Err(Error::Truncated { .. })),
        "{truncated:?}"
    );
    let mut corrupt = blob.clone();
    for b in &mut corrupt[1000..1100] {
        *b ^= 0x5a;
    }
    let r = index_layer(corrupt.as_slice(), &spec, &opts);
    assert!(r.is_err(), "corrupt gzip indexed");
    let not_gzip = index_layer(t.as_slice(), &spec, &opts);
    assert!(matches!(not_gzip, Err(Error::Gzip { .. })), "{not_gzip:?}");
}

#[test]
fn wrong_digest_is_reported() {
    let t = sample_tar(100_000, 6);
    let blob = gzip(&t, 1);
    let spec = LayerSpec {
        media_type: MEDIA[1].into(),
        digest: Some(clip_index::Digest::of(b"other")),
        diff_id: None,
    };
    let r = index_layer(blob.as_slice(), &spec, &IndexOptions::default());
    assert!(matches!(r, Err(Error::DigestMismatch { .. })), "{r:?}");
}

/// A tar of text files as source trees hold: words drawn from a small vocabulary, which gzip
/// compresses in blocks of tens of KiB, as it does real layers.
fn words_tar(total: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "import", "numpy", "def", "return", "self", "class", "for", "in", "range", "None", "if",
        "else", "array", "dtype", "shape", "value",
    ];
    let mut rng = Rng(seed);
    let mut b = tar::Builder::new(Vec::new());
    let (mut written, mut i) = (0, 0);
    while written < total {
        let len = rng.below(400 * 1024) as usize + 1;
        let mut data = Vec::with_capacity(len + 16);
        while data.len() < len {
            data.extend_from_slice(WORDS[rng.below(16) as usize].as_bytes());
            data.push(if rng.below(8) == 0 { b'\n' } else { b' ' });
            if rng.below(32) == 0 {
                data.extend_from_slice(format!("{}", rng.next() % 100_000).as_bytes());
            }
        }
        data.truncate(len);
        add_file(&mut b, &format!("src/m{i}.py"), &data);
        written += len;
        i += 1;
    }
    b.into_inner().unwrap_or_default()
}

#[test]
fn reading_a_layer_as_its_span_runs_fetches_each_compressed_byte_about_once() -> anyhow::Result<()>
{
    // Read-ahead and prefetch fetch a layer as consecutive span runs, one request each: a
    // run ends with the chunk that holds the next checkpoint, and the next run starts at
    // that checkpoint. Checkpoints just before chunk boundaries keep that overlap under a
    // deflate block (here 1.8%; checkpoints anywhere in a chunk refetched 13.7%).
    let t = words_tar(24 << 20, 11);
    let blob = gzip(&t, 1);
    let opts = IndexOptions::default();
    let spec = LayerSpec {
        media_type: MEDIA[1].into(),
        digest: None,
        diff_id: None,
    };
    let layer = index_layer(blob.as_slice(), &spec, &opts)?.layer;
    let span = opts.checkpoint_span;
    let chunk = u64::from(opts.chunk_size);
    assert!(
        layer.checkpoints.len() as u64 + 1 >= layer.uncompressed_size / span,
        "{} checkpoints for {} bytes",
        layer.checkpoints.len(),
        layer.uncompressed_size
    );
    let mut last = 0;
    for cp in &layer.checkpoints {
        let gap = cp.uncompressed_offset - last;
        assert!(gap <= span + 2 * chunk, "checkpoints {gap} bytes apart");
        last = cp.uncompressed_offset;
    }
    let (mut fetched, mut runs) = (0, 0);
    for run in layer.span_runs(0..layer.chunks.len() as u32) {
        let plan = layer.plan(run.clone());
        let comp = &blob[plan.compressed.start as usize..plan.compressed.end as usize];
        let got = decode_chunks(&layer, &plan, comp)?.concat();
        let start = layer.chunk_range(run.start).start as usize;
        assert_eq!(got.as_slice(), &t[start..start + got.len()], "run {run:?}");
        fetched += comp.len();
        runs += 1;
    }
    assert!(runs > 4, "{runs} runs");
    let extra = fetched as f64 / blob.len() as f64 - 1.0;
    assert!(
        (0.0..0.04).contains(&extra),
        "{runs} runs fetch {fetched} bytes of a {} byte blob: {:.1}% twice",
        blob.len(),
        100.0 * extra
    );
    Ok(())
}
