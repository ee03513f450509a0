//! Malformed and hostile layers give clear errors (never a panic), and the odd-but-legal
//! ones merge the way a container runtime extracts them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use clip_e2e::image::{Entry, Layer, layer_tar, raw_entry};
use clip_index::{Error, ImageIndex, ImageSource, IndexOptions, LayerSpec, assemble, index_layer};

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";

fn build(layers: &[Vec<Entry>]) -> Result<ImageIndex, Error> {
    let mut builds = Vec::new();
    for entries in layers {
        let tar = layer_tar(&Layer::with(
            entries.clone(),
            clip_e2e::image::Compression::Plain,
        ))
        .map_err(|e| Error::CorruptIndex(e.to_string()))?;
        let spec = LayerSpec {
            media_type: TAR.into(),
            digest: None,
            diff_id: None,
        };
        builds.push(index_layer(
            tar.as_slice(),
            &spec,
            &IndexOptions::default(),
        )?);
    }
    assemble(ImageSource::default(), builds)
}

fn file_text(index: &ImageIndex, path: &str) -> Option<u64> {
    let ino = index.resolve(path.as_bytes(), false).ok()?;
    index.node(ino).map(|n| n.size)
}

#[test]
fn dot_dot_escaping_the_root_is_refused() {
    let r = build(&[vec![raw_entry(b"a/../../etc/passwd", b'0', b"", b"evil")]]);
    assert!(matches!(r, Err(Error::PathEscapesRoot { .. })), "{r:?}");
}

#[test]
fn dot_dot_inside_the_root_and_absolute_paths_are_normalised() -> Result<(), Error> {
    let index = build(&[vec![
        raw_entry(b"/abs/file", b'0', b"", b"abs"),
        raw_entry(b"./x/../y/./z", b'0', b"", b"zz"),
    ]])?;
    assert_eq!(file_text(&index, "/abs/file"), Some(3));
    assert_eq!(file_text(&index, "/y/z"), Some(2));
    assert!(index.resolve(b"/x", false).is_err());
    Ok(())
}

#[test]
fn a_hard_link_to_a_missing_target_is_an_error() {
    let r = build(&[vec![Entry::hardlink("link", "nowhere/file")]]);
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("\"link\"") && msg.contains("nowhere/file"),
        "{msg}"
    );
}

#[test]
fn a_hard_link_to_a_directory_is_an_error() {
    let r = build(&[vec![Entry::dir("d"), raw_entry(b"l", b'1', b"d", b"")]]);
    assert!(matches!(r, Err(Error::HardlinkToDirectory { .. })), "{r:?}");
}

#[test]
fn a_symlink_loop_is_an_error_when_walked_through() -> Result<(), Error> {
    let looped = vec![Entry::symlink("a", "b"), Entry::symlink("b", "a")];
    // The loop alone is a legal image; resolving through it is ELOOP.
    let index = build(std::slice::from_ref(&looped))?;
    assert!(matches!(index.resolve(b"/a", true), Err(Error::Loop(_))));
    assert!(index.resolve(b"/a", false).is_ok());
    // An entry whose parent goes through the loop cannot be placed.
    let mut with_child = looped;
    with_child.push(Entry::file("a/x", b"x".to_vec()));
    let r = build(&[with_child]);
    assert!(matches!(r, Err(Error::SymlinkLoop { .. })), "{r:?}");
    Ok(())
}

#[test]
fn entries_under_a_symlinked_directory_land_in_its_target() -> Result<(), Error> {
    let index = build(&[
        vec![Entry::dir("real"), Entry::symlink("lnk", "/real")],
        vec![Entry::file("lnk/file", b"abc".to_vec())],
    ])?;
    assert_eq!(file_text(&index, "/real/file"), Some(3));
    Ok(())
}

#[test]
fn a_file_used_as_a_directory_is_an_error() {
    let r = build(&[vec![
        Entry::file("f", b"x".to_vec()),
        Entry::file("f/child", b"y".to_vec()),
    ]]);
    assert!(matches!(r, Err(Error::NotADirectory { .. })), "{r:?}");
}

#[test]
fn duplicate_entries_resolve_to_the_last_one_like_tar_extraction() -> Result<(), Error> {
    let index = build(&[vec![
        Entry::file("dup", b"first".to_vec()),
        Entry::file("dup", b"second!".to_vec()),
        Entry::file("d/child", b"c".to_vec()),
        Entry::file("d", b"now a file".to_vec()),
    ]])?;
    assert_eq!(file_text(&index, "/dup"), Some(7));
    assert_eq!(file_text(&index, "/d"), Some(10));
    assert!(index.resolve(b"/d/child", false).is_err());
    Ok(())
}

#[test]
fn unknown_and_sparse_entry_types_are_named_in_the_error() {
    let r = build(&[vec![raw_entry(b"weird", b'Z', b"", b"")]]);
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("unsupported entry type 'Z'"), "{msg}");
    let r = build(&[vec![raw_entry(b"sparse", b'S', b"", b"")]]);
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("sparse"), "{msg}");
}

#[test]
fn truncated_and_lying_tar_streams_are_errors() {
    let spec = LayerSpec {
        media_type: TAR.into(),
        digest: None,
        diff_id: None,
    };
    let Entry::Raw(big) = raw_entry(b"big", b'0', b"", &[7u8; 5000]) else {
        return;
    };
    let r = index_layer(&big[..2000], &spec, &IndexOptions::default());
    assert!(matches!(r, Err(Error::Truncated { .. })), "{r:?}");
    // A header claiming 8 GiB of data in a tiny stream: an error, not an allocation.
    let Entry::Raw(mut lying) = raw_entry(b"liar", b'0', b"", b"") else {
        return;
    };
    lying[124..136].copy_from_slice(b"77777777777\0");
    lying[148..156].copy_from_slice(b"        ");
    let sum: u32 = lying[..512].iter().map(|&b| u32::from(b)).sum();
    lying[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let r = index_layer(lying.as_slice(), &spec, &IndexOptions::default());
    assert!(matches!(r, Err(Error::Truncated { .. })), "{r:?}");
    // Garbage where a header should be.
    let garbage = vec![0x41u8; 1024];
    let r = index_layer(garbage.as_slice(), &spec, &IndexOptions::default());
    assert!(matches!(r, Err(Error::Tar { .. })), "{r:?}");
}

#[test]
fn corrupt_index_files_are_rejected_with_a_reason() -> Result<(), Error> {
    let index = build(&[vec![Entry::file("a", b"x".to_vec())]])?;
    let good = clip_index::encode(&index)?;
    assert_eq!(clip_index::decode(&good)?, index);
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    assert!(matches!(
        clip_index::decode(&flipped),
        Err(Error::CorruptIndex(_))
    ));
    assert!(matches!(
        clip_index::decode(b"not an index"),
        Err(Error::NotAnIndex(_))
    ));
    let mut future = good.clone();
    future[8] = 99;
    assert!(matches!(
        clip_index::decode(&future),
        Err(Error::UnsupportedVersion { found: 99, .. })
    ));
    for cut in [0, 10, 56, good.len() - 1] {
        assert!(clip_index::decode(&good[..cut]).is_err());
    }
    Ok(())
}
