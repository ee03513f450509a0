//! Benchmark data: tar streams of real files from this machine (package content: shared
//! objects, Python, docs), so compression ratios and inflate speed are those of real layers.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Regular files under `roots`, sorted, until `budget` bytes.
fn collect(roots: &[&str], budget: u64) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut total = 0;
    let mut todo: Vec<PathBuf> = roots.iter().rev().map(PathBuf::from).collect();
    while let Some(dir) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = rd.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        let mut subdirs = Vec::new();
        for e in entries {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                subdirs.push(e.path());
            } else if meta.is_file() && meta.len() > 0 {
                out.push((e.path(), meta.len()));
                total += meta.len();
                if total >= budget {
                    return out;
                }
            }
        }
        todo.extend(subdirs.into_iter().rev());
    }
    out
}

/// Writes a tar of about `budget` bytes of real files to `path`.
pub fn write_tar(path: &Path, budget: u64) -> anyhow::Result<u64> {
    let files = collect(
        &["/usr/lib", "/usr/share", "/usr/bin", "/root/.rustup"],
        budget,
    );
    let f = std::fs::File::create(path)?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(f));
    b.follow_symlinks(false);
    for (p, _) in &files {
        let name = p.strip_prefix("/").unwrap_or(p);
        if b.append_path_with_name(p, name).is_err() {
            continue;
        }
    }
    b.into_inner()?.flush()?;
    Ok(std::fs::metadata(path)?.len())
}

/// gzip-compresses `src` to `dst` at level 6, as `docker build` does.
pub fn gzip_file(src: &Path, dst: &Path) -> anyhow::Result<u64> {
    let mut input = std::fs::File::open(src).with_context(|| src.display().to_string())?;
    let out = std::fs::File::create(dst)?;
    let mut enc =
        flate2::write::GzEncoder::new(std::io::BufWriter::new(out), flate2::Compression::new(6));
    std::io::copy(&mut input, &mut enc)?;
    enc.finish()?.flush()?;
    Ok(std::fs::metadata(dst)?.len())
}
