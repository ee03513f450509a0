//! The reference extraction of a test image: each layer as pushed, unpacked by GNU `tar`
//! (which finds the compression itself and calls `gzip` or `zstd`), with whiteouts and
//! replaced paths applied first as a container runtime applies them. Root only: owners,
//! device nodes and `security.*` xattrs need it.

use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};

use crate::image::BuiltImage;

/// Unpacks every layer of `image`, bottom-up, into the empty directory `dest`. Returns a
/// time no later than any timestamp the extraction itself gave (the mtime of a file made
/// just before it: file times come from the kernel's coarse clock, which may lag the
/// system time by a tick).
pub fn extract_image(image: &BuiltImage, dest: &Path) -> anyhow::Result<std::time::SystemTime> {
    let scratch = tempfile::tempdir()?;
    let probe = scratch.path().join("probe");
    std::fs::write(&probe, b"")?;
    let began = std::fs::metadata(&probe)?.modified()?;
    for (i, (blob, tar_bytes)) in image.layers.iter().zip(&image.tars).enumerate() {
        prepare_layer(tar_bytes, dest).with_context(|| format!("layer {i}"))?;
        let file = scratch.path().join(format!("layer-{i}"));
        std::fs::write(&file, &blob.data)?;
        unpack(&file, dest).with_context(|| format!("layer {i}"))?;
    }
    Ok(began)
}

/// `dest/path` for a path as a layer names it, refusing any that would leave `dest`.
fn inside(dest: &Path, path: &Path) -> anyhow::Result<PathBuf> {
    let mut out = dest.to_owned();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            _ => bail!("{}: leaves the tree", path.display()),
        }
    }
    Ok(out)
}

fn remove(path: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path)?,
        Ok(_) => std::fs::remove_file(path)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// What a runtime does before it writes a layer's entries: `.wh.NAME` removes NAME and
/// `.wh..wh..opq` empties its directory (both apply to the layers below only), and an
/// entry replaces what is at its path unless both are directories.
fn prepare_layer(tar_bytes: &[u8], dest: &Path) -> anyhow::Result<()> {
    let mut archive = tar::Archive::new(tar_bytes);
    let mut whiteouts = Vec::new();
    let mut written = Vec::new();
    for entry in archive.entries()? {
        let entry = entry?;
        let path = entry.path()?.into_owned();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let parent = path.parent().unwrap_or(Path::new(""));
        match name.as_deref() {
            Some(".wh..wh..opq") => whiteouts.push((inside(dest, parent)?, true)),
            Some(n) if n.starts_with(".wh.") => {
                whiteouts.push((inside(dest, &parent.join(&n[4..]))?, false));
            }
            _ => written.push((inside(dest, &path)?, entry.header().entry_type().is_dir())),
        }
    }
    for (path, opaque) in whiteouts {
        if !opaque {
            remove(&path)?;
        } else if path.is_dir() {
            for child in std::fs::read_dir(&path)? {
                remove(&child?.path())?;
            }
        }
    }
    for (path, is_dir) in written {
        if let Ok(m) = std::fs::symlink_metadata(&path)
            && !(is_dir && m.is_dir())
        {
            remove(&path)?;
        }
    }
    Ok(())
}

/// GNU tar as root keeping owners, modes, nanosecond times and every xattr; the whiteout
/// markers themselves are not written.
fn unpack(file: &Path, dest: &Path) -> anyhow::Result<()> {
    let out = Command::new("sh")
        .args(["-c", "umask 022; exec tar \"$@\"", "tar"])
        .arg("-x")
        .arg("-f")
        .arg(file)
        .arg("-C")
        .arg(dest)
        .args([
            "--same-owner",
            "--same-permissions",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--exclude=.wh.*",
        ])
        .output()
        .context("running tar")?;
    ensure!(
        out.status.success(),
        "tar -x: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
