//! The images of `clip-bench mount`, built once from this machine's own files and kept under
//! the data directory, pushed to the benchmark registry, and pulled whole for the baseline.
//!
//! - `numpy`: Debian's python3 and python3-numpy with the libraries and /etc bits they need,
//!   padded with the rest of /usr/bin, /usr/lib/x86_64-linux-gnu and /usr/share; four gzip
//!   layers, 1.5-2 GB uncompressed.
//! - `bigfile`: one layer holding one 1 GiB file of mixed text-like and random data.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{Context, bail};
use clip_e2e::image::{Blob, Pusher, sha256};

const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// One built layer: the gzip blob on disk and its digests.
#[derive(Debug, Clone)]
pub struct LayerFile {
    pub path: PathBuf,
    pub digest: String,
    pub diff_id: String,
    pub size: u64,
    pub uncompressed: u64,
    pub entries: u64,
}

/// An image whose layers are files under the data directory.
#[derive(Debug, Clone)]
pub struct ImageFiles {
    pub repo: &'static str,
    pub layers: Vec<LayerFile>,
    pub config: Blob,
    pub manifest: Blob,
}

impl ImageFiles {
    pub fn compressed(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }

    pub fn uncompressed(&self) -> u64 {
        self.layers.iter().map(|l| l.uncompressed).sum()
    }

    pub fn entries(&self) -> u64 {
        self.layers.iter().map(|l| l.entries).sum()
    }

    /// Pushes the image to `host` unless the registry already has this exact manifest there;
    /// returns `repo:TAG`.
    pub fn push(&self, host: &str) -> anyhow::Result<String> {
        let tag = "v1";
        let url = format!("http://{host}/v2/{}/manifests/{tag}", self.repo);
        let have = clip_e2e::http::request("GET", &url, &[("Accept", MANIFEST)], &[])?;
        if have.status == 200 && sha256(&have.body) == self.manifest.digest {
            return Ok(format!("{}:{tag}", self.repo));
        }
        eprintln!(
            "pushing {} ({:.0} MB)...",
            self.repo,
            self.compressed() as f64 / 1e6
        );
        let pusher = Pusher::new(host, None);
        for l in &self.layers {
            let blob = Blob {
                media_type: GZIP.into(),
                digest: l.digest.clone(),
                data: std::fs::read(&l.path)?,
            };
            pusher.push_blob(self.repo, &blob)?;
        }
        pusher.push_blob(self.repo, &self.config)?;
        pusher.push_manifest(self.repo, tag, &self.manifest)?;
        Ok(format!("{}:{tag}", self.repo))
    }
}

/// Writes tar entries for `paths` (recursively, symlinks as symlinks, regular files and
/// directories; nothing else) with their parent directories.
struct TreeTar {
    builder: tar::Builder<Vec<u8>>,
    dirs_done: std::collections::HashSet<PathBuf>,
    entries: u64,
}

impl TreeTar {
    fn new() -> Self {
        let mut builder = tar::Builder::new(Vec::new());
        builder.follow_symlinks(false);
        Self {
            builder,
            dirs_done: Default::default(),
            entries: 0,
        }
    }

    fn append(&mut self, path: &Path) -> anyhow::Result<()> {
        let meta = path.symlink_metadata()?;
        let name = path.strip_prefix("/").unwrap_or(path);
        let ft = meta.file_type();
        if !(ft.is_dir() || ft.is_file() || ft.is_symlink()) {
            return Ok(());
        }
        if ft.is_dir() && !self.dirs_done.insert(path.to_owned()) {
            return Ok(());
        }
        self.builder
            .append_path_with_name(path, name)
            .with_context(|| path.display().to_string())?;
        self.entries += 1;
        Ok(())
    }

    fn add_root(&mut self, root: &Path) -> anyhow::Result<()> {
        let Ok(meta) = root.symlink_metadata() else {
            return Ok(());
        };
        let mut parents: Vec<&Path> = root.ancestors().skip(1).collect();
        parents.reverse();
        for p in parents.into_iter().filter(|p| *p != Path::new("/")) {
            self.append(p)?;
        }
        self.append(root)?;
        if !meta.is_dir() {
            return Ok(());
        }
        let mut todo = vec![root.to_owned()];
        while let Some(dir) = todo.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut names: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            names.sort();
            for p in names.into_iter().rev() {
                let Ok(m) = p.symlink_metadata() else {
                    continue;
                };
                self.append(&p)?;
                if m.is_dir() {
                    todo.push(p);
                }
            }
        }
        Ok(())
    }

    fn finish(self) -> anyhow::Result<(Vec<u8>, u64)> {
        Ok((self.builder.into_inner()?, self.entries))
    }
}

/// The numpy image's layers, bottom first: (name, roots).
const NUMPY_LAYERS: &[(&str, &[&str])] = &[
    (
        "base",
        &[
            "/bin",
            "/lib",
            "/lib64",
            "/sbin",
            "/etc/alternatives",
            "/etc/ld.so.cache",
            "/etc/ld.so.conf",
            "/etc/ld.so.conf.d",
            "/etc/passwd",
            "/etc/group",
            "/etc/nsswitch.conf",
            "/etc/python3",
            "/etc/python3.11",
            "/usr/lib64",
            "/usr/lib/locale",
            "/usr/sbin",
            "/usr/bin",
        ],
    ),
    ("libs", &["/usr/lib/x86_64-linux-gnu"]),
    ("python", &["/usr/lib/python3", "/usr/lib/python3.11"]),
    ("share", &["/usr/share"]),
];

/// gzip-compresses `data` to `path` at level 6, as `docker build` does.
fn write_gzip(data: &[u8], path: &Path) -> anyhow::Result<u64> {
    let tmp = path.with_extension("tmp");
    let out = std::fs::File::create(&tmp)?;
    let mut enc =
        flate2::write::GzEncoder::new(std::io::BufWriter::new(out), flate2::Compression::new(6));
    enc.write_all(data)?;
    enc.finish()?.flush()?;
    std::fs::rename(&tmp, path)?;
    Ok(std::fs::metadata(path)?.len())
}

/// Builds (or loads) the layer `name` of image `dir` from a tar produced by `make`.
fn layer_file(
    dir: &Path,
    name: &str,
    make: impl FnOnce() -> anyhow::Result<(Vec<u8>, u64)>,
) -> anyhow::Result<LayerFile> {
    let path = dir.join(format!("{name}.tar.gz"));
    let meta = dir.join(format!("{name}.json"));
    if path.is_file()
        && let Ok(text) = std::fs::read_to_string(&meta)
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
    {
        let s = |k: &str| v[k].as_str().map(str::to_owned).context("layer metadata");
        let n = |k: &str| v[k].as_u64().context("layer metadata");
        return Ok(LayerFile {
            path,
            digest: s("digest")?,
            diff_id: s("diff_id")?,
            size: n("size")?,
            uncompressed: n("uncompressed")?,
            entries: n("entries")?,
        });
    }
    eprintln!("building layer {}...", path.display());
    let (tar, entries) = make()?;
    let diff_id = sha256(&tar);
    let size = write_gzip(&tar, &path)?;
    let digest = sha256(&std::fs::read(&path)?);
    let layer = LayerFile {
        path,
        digest,
        diff_id,
        size,
        uncompressed: tar.len() as u64,
        entries,
    };
    std::fs::write(
        &meta,
        serde_json::to_vec_pretty(&serde_json::json!({
            "digest": layer.digest, "diff_id": layer.diff_id, "size": layer.size,
            "uncompressed": layer.uncompressed, "entries": layer.entries,
        }))?,
    )?;
    Ok(layer)
}

/// An image of gzip `layers`: its config and manifest.
pub(crate) fn assemble(repo: &'static str, layers: Vec<LayerFile>) -> anyhow::Result<ImageFiles> {
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>()},
        "config": {"Cmd": ["/usr/bin/python3"]},
    });
    let config = Blob::new(
        "application/vnd.oci.image.config.v1+json",
        serde_json::to_vec(&config)?,
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": config.media_type, "digest": config.digest, "size": config.data.len()},
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": GZIP, "digest": l.digest, "size": l.size
        })).collect::<Vec<_>>(),
    });
    let manifest = Blob::new(MANIFEST, serde_json::to_vec(&manifest)?);
    Ok(ImageFiles {
        repo,
        layers,
        config,
        manifest,
    })
}

/// The numpy image, built on first use under `dir`.
pub fn numpy_image(dir: &Path) -> anyhow::Result<ImageFiles> {
    std::fs::create_dir_all(dir)?;
    let mut layers = Vec::new();
    for (i, (name, roots)) in NUMPY_LAYERS.iter().enumerate() {
        layers.push(layer_file(dir, &format!("{i}-{name}"), || {
            let mut t = TreeTar::new();
            for r in *roots {
                t.add_root(Path::new(r))?;
            }
            t.finish()
        })?);
    }
    assemble("bench/numpy", layers)
}

/// Path of the big file inside the `bigfile` image.
pub const BIG_FILE: &str = "data/big.bin";
const BIG_SIZE: u64 = 1 << 30;
const BLOCK: usize = 256 << 10;

/// Deterministic 1 GiB: of every three 256 KiB blocks one is random and two are text-like
/// (compressing about 3.5x), so the file gzips to a bit over half its size.
fn write_big_file(path: &Path) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    let mut rng = clip_e2e::Rng(0x5eed_b16f);
    for i in 0..(BIG_SIZE as usize / BLOCK) {
        let block = if i % 3 == 0 {
            rng.bytes(BLOCK)
        } else {
            clip_e2e::text_bytes(BLOCK, i as u64)
        };
        out.write_all(&block)?;
    }
    out.flush()?;
    drop(out);
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The bigfile image and the same file on local disk, built on first use under `dir`.
pub fn bigfile_image(dir: &Path) -> anyhow::Result<(ImageFiles, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let local = dir.join("big.bin");
    if std::fs::metadata(&local).map(|m| m.len()).ok() != Some(BIG_SIZE) {
        eprintln!("writing {}...", local.display());
        write_big_file(&local)?;
    }
    let layer = layer_file(dir, "0-big", || {
        let mut b = tar::Builder::new(Vec::with_capacity(BIG_SIZE as usize + (1 << 20)));
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        b.append_data(&mut h, "data", std::io::empty())?;
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_size(BIG_SIZE);
        b.append_data(&mut h, BIG_FILE, std::fs::File::open(&local)?)?;
        Ok((b.into_inner()?, 2))
    })?;
    Ok((assemble("bench/bigfile", vec![layer])?, local))
}

/// Streams one blob to `path` with a plain HTTP/1.1 GET; returns the bytes written.
fn download(host: &str, url_path: &str, path: &Path) -> anyhow::Result<u64> {
    let stream = TcpStream::connect(host).with_context(|| format!("connecting to {host}"))?;
    let mut w = stream.try_clone()?;
    write!(
        w,
        "GET {url_path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut r = BufReader::with_capacity(1 << 20, stream);
    let mut status = String::new();
    r.read_line(&mut status)?;
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("GET {url_path}: {}", status.trim());
    }
    let mut length = None;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            bail!("GET {url_path}: connection closed in headers");
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse::<u64>().ok();
        }
    }
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let n = std::io::copy(&mut r.take(length.unwrap_or(u64::MAX)), &mut out)?;
    out.flush()?;
    if length.is_some_and(|l| l != n) {
        bail!("GET {url_path}: {n} of {length:?} bytes");
    }
    Ok(n)
}

/// Downloads every layer of `repo:tag` from `host` into `dir`, `parallel` at a time (docker's
/// default is 3), as `docker pull` would; returns the files bottom first. Digests are not
/// checked, which favours this baseline.
pub fn pull_layers(
    host: &str,
    reference: &str,
    dir: &Path,
    parallel: usize,
) -> anyhow::Result<Vec<PathBuf>> {
    let (repo, tag) = reference.rsplit_once(':').context("repo:tag")?;
    let m = clip_e2e::http::request(
        "GET",
        &format!("http://{host}/v2/{repo}/manifests/{tag}"),
        &[("Accept", MANIFEST)],
        &[],
    )?;
    if m.status != 200 {
        bail!("manifest {reference}: HTTP {}", m.status);
    }
    let manifest: serde_json::Value = serde_json::from_slice(&m.body)?;
    let digests: Vec<String> = manifest["layers"]
        .as_array()
        .context("manifest layers")?
        .iter()
        .filter_map(|l| l["digest"].as_str().map(str::to_owned))
        .collect();
    std::fs::create_dir_all(dir)?;
    let files: Vec<PathBuf> = digests
        .iter()
        .map(|d| dir.join(d.replace(':', "-")))
        .collect();
    let todo = Mutex::new(digests.iter().zip(&files));
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..parallel.max(1))
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let next = todo.lock().unwrap_or_else(|p| p.into_inner()).next();
                        let Some((digest, file)) = next else {
                            return Ok(());
                        };
                        download(host, &format!("/v2/{repo}/blobs/{digest}"), file)?;
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("download thread panicked"))??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(files)
}

/// Applies gzip layers in order into `root` with `gzip -dc LAYER | tar -x`.
pub fn extract_layers(layers: &[PathBuf], root: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(root)?;
    for l in layers {
        let mut gzip = Command::new("gzip")
            .arg("-dc")
            .arg(l)
            .stdout(Stdio::piped())
            .spawn()?;
        let gz_out = gzip.stdout.take().context("gzip stdout")?;
        let tar = Command::new("tar")
            .arg("-x")
            .arg("-C")
            .arg(root)
            .stdin(gz_out)
            .status()?;
        let gz = gzip.wait()?;
        if !tar.success() || !gz.success() {
            bail!("extracting {}: gzip {gz}, tar {tar}", l.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_tar_keeps_symlinks_and_parent_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("a/b");
        std::fs::create_dir_all(root.join("c")).unwrap();
        std::fs::write(root.join("c/file"), b"hello").unwrap();
        std::os::unix::fs::symlink("c/file", root.join("link")).unwrap();
        let mut t = TreeTar::new();
        t.add_root(&root).unwrap();
        let (tar, entries) = t.finish().unwrap();
        let mut names = Vec::new();
        for e in tar::Archive::new(tar.as_slice()).entries().unwrap() {
            let e = e.unwrap();
            names.push((
                e.path().unwrap().to_string_lossy().into_owned(),
                e.header().entry_type(),
            ));
        }
        let prefix = dir.path().strip_prefix("/").unwrap().to_string_lossy();
        assert!(names.contains(&(format!("{prefix}/a/b/link"), tar::EntryType::Symlink)));
        assert!(names.contains(&(format!("{prefix}/a/b/c/file"), tar::EntryType::Regular)));
        assert!(
            names
                .iter()
                .any(|(n, t)| n.trim_end_matches('/') == format!("{prefix}/a")
                    && *t == tar::EntryType::Directory)
        );
        assert_eq!(entries as usize, names.len());
    }
}
