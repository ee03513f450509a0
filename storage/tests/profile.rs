//! Start-up profiles' names: recorded as inodes, written as paths, read back only where the
//! image has the directories they name.

use clip_e2e::image::{Entry, Layer, build_image};
use clip_index::{Digest, ImageIndex, ImageSource, IndexOptions, Inode, LayerSpec};
use clip_storage::profile::{self, Profile, Recorder};

/// The index of an image of `entries`, built here from its layer blob (no registry).
fn index_of(entries: Vec<Entry>) -> anyhow::Result<ImageIndex> {
    let image = build_image(&[Layer::gzip(entries)], "linux", "amd64")?;
    let blob = &image.layers[0];
    let spec = LayerSpec {
        media_type: blob.media_type.clone(),
        digest: None,
        diff_id: None,
    };
    let layer = clip_index::index_layer(&blob.data[..], &spec, &IndexOptions::default())?;
    let source = ImageSource {
        repository: "test/profile".into(),
        manifest_digest: Digest::of(&image.manifest.data),
        config_digest: Digest::of(&image.config.data),
        platform: "linux/amd64".into(),
    };
    Ok(clip_index::assemble(source, vec![layer])?)
}

fn ino(index: &ImageIndex, path: &str) -> u64 {
    index.resolve(path.as_bytes(), false).map_or(0, |i| i.0)
}

fn paths(p: &Profile) -> Vec<String> {
    p.paths
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect()
}

#[test]
fn names_looked_up_are_kept_as_paths_and_read_back_where_the_image_has_their_directory()
-> anyhow::Result<()> {
    let index = index_of(vec![
        Entry::dir("usr"),
        Entry::dir("usr/lib"),
        Entry::file("usr/lib/a b%.py", b"print(1)\n".to_vec()),
        Entry::file("usr/lib/os.py", b"import sys\n".to_vec()),
        Entry::symlink("lib", "usr/lib"),
        Entry::file("etc", b"not a directory".to_vec()),
    ])?;
    // What a program's lookups look like to the recorder: a directory inode and a name.
    let r = Recorder::default();
    let usr = ino(&index, "usr");
    let lib = ino(&index, "usr/lib");
    for (dir, name) in [
        (Inode::ROOT.0, &b"usr"[..]),
        (usr, b"lib"),
        (lib, b"a b%.py"),
        (lib, b"missing.so"),
        (Inode::ROOT.0, b"lib"),
        (lib, b"a b%.py"),
        // Not a directory of the image: left out.
        (ino(&index, "etc"), b"x"),
        (999_999, b"y"),
    ] {
        r.note_lookup(dir, name);
    }
    let recorded = Profile {
        paths: r.recorded_paths(&index),
        ..Profile::default()
    };
    assert_eq!(
        paths(&recorded),
        [
            "usr",
            "usr/lib",
            "usr/lib/a b%.py",
            "usr/lib/missing.so",
            "lib"
        ]
    );
    let text = profile::encode(&index, &recorded);
    assert!(text.starts_with("clip-startup-profile 3\n"), "{text}");
    assert!(text.contains("\npath usr/lib/a%20b%25.py\n"), "{text}");
    assert_eq!(profile::decode(&text, &index)?, recorded);

    // Read back: only paths under directories of the image, found by name (never through
    // a symlink or a file), each once.
    let text = "clip-startup-profile 3\npath usr/lib/os.py\npath lib/os.py\npath etc/x\npath nowhere/x\npath usr/lib/gone\npath usr/lib/os.py\npath lib\n";
    assert_eq!(
        paths(&profile::decode(text, &index)?),
        ["usr/lib/os.py", "usr/lib/gone", "lib"]
    );
    assert_eq!(
        profile::parent_directory(&index, b"usr/lib/os.py").map(|i| i.0),
        Some(lib)
    );
    assert_eq!(profile::parent_directory(&index, b"lib/os.py"), None);

    // Hostile or malformed path lines are refused with their line number; a format 2
    // profile has no path lines.
    for bad in [
        "clip-startup-profile 3\npath ../../etc/passwd\n",
        "clip-startup-profile 3\npath /etc/passwd\n",
        "clip-startup-profile 3\npath usr//lib\n",
        "clip-startup-profile 3\npath usr/./lib\n",
        "clip-startup-profile 3\npath usr%00x\n",
        "clip-startup-profile 3\npath %4\n",
        "clip-startup-profile 3\npath\n",
        "clip-startup-profile 3\npath usr lib\n",
        "clip-startup-profile 2\npath usr\n",
    ] {
        let err = profile::decode(bad, &index).expect_err(bad).to_string();
        assert!(err.contains("line 2"), "{bad}: {err}");
    }
    Ok(())
}
