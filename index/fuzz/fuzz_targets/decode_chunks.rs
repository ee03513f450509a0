//! `decode_chunks` against a real gzip layer whose index and bytes the fuzzer tampers with:
//! the checkpoint table (offsets, bits, raw flag, window bytes), which chunks are asked
//! for, which checkpoint and range the plan names, and the compressed bytes themselves.
//! The answer must be an error or the chunks' true bytes, never a panic.
#![no_main]

use std::sync::OnceLock;

use clip_index::{LayerIndex, LayerSpec, decode_chunks, index_layer};
use clip_index_fuzz::{GZIP, fuzz_options, gzip, sample_tar};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    tar: Vec<u8>,
    blob: Vec<u8>,
    layer: LayerIndex,
}

/// A ~40 KiB tar in two gzip members, indexed with 1000-byte chunks and a 2 KiB span: a
/// few dozen chunks and checkpoints, with and without spare bits, in both members.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let tar = sample_tar(16 * 1024, 7).unwrap_or_default();
        let blob = gzip(&tar, 2, 1500).unwrap_or_default();
        let spec = LayerSpec {
            media_type: GZIP.into(),
            digest: None,
            diff_id: None,
        };
        let layer = match index_layer(blob.as_slice(), &spec, &fuzz_options()) {
            Ok(b) => b.layer,
            Err(e) => panic!("the fixture layer does not index: {e}"),
        };
        assert!(
            layer.checkpoints.len() >= 4,
            "fixture has too few checkpoints"
        );
        Fixture { tar, blob, layer }
    })
}

#[derive(Arbitrary, Debug)]
enum CheckpointEdit {
    CompressedOffset(u64),
    NudgeCompressed(i16),
    UncompressedOffset(u64),
    NudgeUncompressed(i16),
    Bits(u8),
    RawDeflate(bool),
    /// Raw bytes in place of the zstd-compressed window.
    Window(Vec<u8>),
    /// A well-formed zstd frame holding the fuzzer's window.
    WindowContent(Vec<u8>),
    FlipWindow {
        at: u16,
        xor: u8,
    },
    Remove,
    Duplicate,
}

#[derive(Arbitrary, Debug)]
enum ByteEdit {
    Flip { at: u16, xor: u8 },
    Truncate(u16),
    DropFront(u8),
    Extend(Vec<u8>),
    Replace(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Case {
    first: u16,
    count: u8,
    checkpoints: Vec<(u8, CheckpointEdit)>,
    /// Overrides the checkpoint the plan names.
    plan_checkpoint: Option<Option<u8>>,
    bytes: Vec<ByteEdit>,
    /// Keep the plan's range even when the edited bytes no longer match its length.
    keep_range: bool,
}

fn nudge(v: u64, by: i16) -> u64 {
    v.saturating_add_signed(i64::from(by))
}

fn edit_checkpoints(layer: &mut LayerIndex, edits: Vec<(u8, CheckpointEdit)>) {
    for (which, edit) in edits {
        let n = layer.checkpoints.len();
        if n == 0 {
            return;
        }
        let i = usize::from(which) % n;
        let cp = &mut layer.checkpoints[i];
        match edit {
            CheckpointEdit::CompressedOffset(v) => cp.compressed_offset = v,
            CheckpointEdit::NudgeCompressed(by) => {
                cp.compressed_offset = nudge(cp.compressed_offset, by);
            }
            CheckpointEdit::UncompressedOffset(v) => cp.uncompressed_offset = v,
            CheckpointEdit::NudgeUncompressed(by) => {
                cp.uncompressed_offset = nudge(cp.uncompressed_offset, by);
            }
            CheckpointEdit::Bits(b) => cp.bits = b,
            CheckpointEdit::RawDeflate(r) => cp.raw_deflate = r,
            CheckpointEdit::Window(w) => cp.window = w.into(),
            CheckpointEdit::WindowContent(w) => {
                cp.window = zstd::bulk::compress(&w, 1).unwrap_or_default().into();
            }
            CheckpointEdit::FlipWindow { at, xor } => {
                let mut window = cp.window.get().map(|w| w.to_vec()).unwrap_or_default();
                let len = window.len();
                if len > 0 {
                    window[usize::from(at) % len] ^= xor;
                }
                cp.window = window.into();
            }
            CheckpointEdit::Remove => {
                layer.checkpoints.remove(i);
            }
            CheckpointEdit::Duplicate => {
                let copy = cp.clone();
                layer.checkpoints.insert(i, copy);
            }
        }
    }
}

fn edit_bytes(bytes: &mut Vec<u8>, edits: Vec<ByteEdit>) {
    for edit in edits {
        match edit {
            ByteEdit::Flip { at, xor } => {
                let len = bytes.len();
                if len > 0 {
                    bytes[usize::from(at) % len] ^= xor;
                }
            }
            ByteEdit::Truncate(n) => bytes.truncate(usize::from(n)),
            ByteEdit::DropFront(n) => {
                bytes.drain(..usize::from(n).min(bytes.len()));
            }
            ByteEdit::Extend(more) => bytes.extend(more),
            ByteEdit::Replace(all) => *bytes = all,
        }
    }
}

fuzz_target!(|case: Case| {
    let fx = fixture();
    let mut layer = fx.layer.clone();
    edit_checkpoints(&mut layer, case.checkpoints);
    // Two past the end, and empty runs, are asked for too.
    let n = layer.chunks.len() as u32;
    let first = u32::from(case.first) % (n + 2);
    let end = first.saturating_add(u32::from(case.count % 5));
    let mut plan = layer.plan(first..end);
    if let Some(cp) = case.plan_checkpoint {
        plan.checkpoint = cp.map(usize::from);
    }
    let blob_len = fx.blob.len() as u64;
    let start = plan.compressed.start.min(blob_len);
    let stop = plan.compressed.end.clamp(start, blob_len);
    let mut bytes = fx.blob[start as usize..stop as usize].to_vec();
    edit_bytes(&mut bytes, case.bytes);
    if !case.keep_range {
        plan.compressed = start..start + bytes.len() as u64;
    }
    let Ok(chunks) = decode_chunks(&layer, &plan, &bytes) else {
        return;
    };
    // Whatever comes back must be the layer's true bytes for those chunks.
    assert_eq!(chunks.len(), plan.chunks.len());
    for (i, chunk) in plan.chunks.clone().zip(&chunks) {
        let range = layer.chunk_range(i);
        let want = &fx.tar[range.start as usize..range.end as usize];
        assert!(chunk.as_slice() == want, "chunk {i} decoded to wrong bytes");
    }
});
