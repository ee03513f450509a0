//! Index a layer, then decode chunk runs from the compressed bytes a plan names, and compare
//! with the tar stream itself.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use std::io::Write;

use clip_index::{
    Compression, Error, IndexOptions, LayerSpec, decode_chunks, index_layer, layer::ReadPlan,
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
        let mut h = tar::Header::new_gnu();
        h.set_size(len as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, format!("f{i}"), data.as_slice())
            .unwrap_or_default();
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
        let start = layer.chunk_range(first).start as usize;
        let got: Vec<u8> = chunks.concat();
        assert_eq!(got.as_slice(), &tar_bytes[start..start + got.len()]);
        assert_eq!(start + got.len(), layer.chunk_range(last).end as usize);
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
