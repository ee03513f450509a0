//! Writes the small seed inputs in `seeds/<target>/`, made with clip-index itself:
//!
//! ```text
//! cd index/fuzz && cargo run --example make_seeds
//! ```
//!
//! `decode_chunks` needs none: its input is a list of edits to a fixed layer.

use std::fs;
use std::io::Read;
use std::path::Path;

use clip_index::format::{HEADER_LEN, encode_version};
use clip_index::{ImageSource, LayerSpec, assemble, encode, index_layer};
use clip_index_fuzz::{GZIP, TAR, fuzz_options, gzip, sample_tar, upper_tar, zstd_frames};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) -> Result<()> {
    let dir = dir.join(target);
    fs::create_dir_all(&dir)?;
    fs::write(dir.join(name), bytes)?;
    println!("{target}/{name}: {} bytes", bytes.len());
    Ok(())
}

fn main() -> Result<()> {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let lower = sample_tar(300, 1)?;
    let upper = upper_tar()?;

    write(&seeds, "tar_reader", "sample.tar", &lower)?;
    write(&seeds, "tar_reader", "upper.tar", &upper)?;
    write(&seeds, "index_layer_tar", "sample.tar", &lower)?;
    write(&seeds, "index_layer_tar", "upper.tar", &upper)?;
    write(
        &seeds,
        "index_layer_gzip",
        "one-member.tar.gz",
        &gzip(&lower, 1, 0)?,
    )?;
    write(
        &seeds,
        "index_layer_gzip",
        "flushed.tar.gz",
        &gzip(&lower, 1, 700)?,
    )?;
    write(
        &seeds,
        "index_layer_gzip",
        "two-members.tar.gz",
        &gzip(&lower, 2, 0)?,
    )?;
    write(
        &seeds,
        "index_layer_zstd",
        "one-frame.tar.zst",
        &zstd_frames(&lower, 1)?,
    )?;
    write(
        &seeds,
        "index_layer_zstd",
        "three-frames.tar.zst",
        &zstd_frames(&lower, 3)?,
    )?;

    // An image of two layers, encoded; and its payload alone, which the decode_index target
    // also feeds through as a payload to seal.
    let mut builds = Vec::new();
    for (tar, media_type, blob) in [
        (&lower, GZIP, gzip(&lower, 1, 700)?),
        (&upper, TAR, upper.clone()),
    ] {
        let spec = LayerSpec {
            media_type: media_type.into(),
            digest: None,
            diff_id: Some(clip_index::Digest::of(tar)),
        };
        builds.push(index_layer(blob.as_slice(), &spec, &fuzz_options())?);
    }
    let source = ImageSource {
        repository: "registry.example/fuzz/app".into(),
        platform: "linux/amd64".into(),
        ..ImageSource::default()
    };
    let index = assemble(source, builds)?;
    let encoded = encode(&index)?;
    // The payload seed is version 2's (one frame, windows and block digests inline), which
    // is what the fuzz target seals payloads as.
    let mut payload = Vec::new();
    zstd::stream::read::Decoder::new(&encode_version(&index, 2)?[HEADER_LEN..])?
        .read_to_end(&mut payload)?;
    write(&seeds, "decode_index", "image.clip", &encoded)?;
    write(&seeds, "decode_index", "image.payload", &payload)?;
    Ok(())
}
