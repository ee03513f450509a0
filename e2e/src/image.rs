//! Declarative test images: build layer blobs from known content and push them.

use std::io::Write;

use anyhow::{Context, bail};
use sha2::{Digest as _, Sha256};

use crate::http;

/// Metadata shared by every kind of entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Meta {
    pub fn new(mode: u32) -> Self {
        Self {
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
            mtime_nsec: 0,
            xattrs: Vec::new(),
        }
    }

    pub fn owner(mut self, uid: u32, gid: u32) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    pub fn time(mut self, secs: i64, nsec: u32) -> Self {
        self.mtime = secs;
        self.mtime_nsec = nsec;
        self
    }

    pub fn xattr(mut self, name: &str, value: &[u8]) -> Self {
        self.xattrs.push((name.to_owned(), value.to_vec()));
        self
    }
}

/// One tar entry of a test layer. Paths are written as given (no leading slash needed).
#[derive(Debug, Clone)]
pub enum Entry {
    Dir {
        path: String,
        meta: Meta,
    },
    File {
        path: String,
        meta: Meta,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        meta: Meta,
        target: String,
    },
    Hardlink {
        path: String,
        target: String,
    },
    CharDevice {
        path: String,
        meta: Meta,
        major: u32,
        minor: u32,
    },
    BlockDevice {
        path: String,
        meta: Meta,
        major: u32,
        minor: u32,
    },
    Fifo {
        path: String,
        meta: Meta,
    },
    /// `.wh.NAME` next to `path`: deletes `path` from lower layers.
    Whiteout {
        path: String,
    },
    /// `.wh..wh..opq` inside `dir`: hides everything lower layers put in it.
    Opaque {
        dir: String,
    },
    /// Raw bytes appended to the tar stream as-is (for hostile archives).
    Raw(Vec<u8>),
}

impl Entry {
    pub fn file(path: &str, data: impl Into<Vec<u8>>) -> Self {
        Entry::File {
            path: path.into(),
            meta: Meta::new(0o644),
            data: data.into(),
        }
    }

    pub fn dir(path: &str) -> Self {
        Entry::Dir {
            path: path.into(),
            meta: Meta::new(0o755),
        }
    }

    pub fn symlink(path: &str, target: &str) -> Self {
        Entry::Symlink {
            path: path.into(),
            meta: Meta::new(0o777),
            target: target.into(),
        }
    }

    pub fn hardlink(path: &str, target: &str) -> Self {
        Entry::Hardlink {
            path: path.into(),
            target: target.into(),
        }
    }
}

/// A tar entry written byte by byte, bypassing the tar writer's path checks, for hostile
/// archives (`..`, absolute paths) and odd types. `typeflag` is the raw type byte.
pub fn raw_entry(path: &[u8], typeflag: u8, link: &[u8], data: &[u8]) -> Entry {
    let mut h = [0u8; 512];
    let name_len = path.len().min(100);
    h[..name_len].copy_from_slice(&path[..name_len]);
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    h[136..148].copy_from_slice(b"14540000000\0");
    h[156] = typeflag;
    let link_len = link.len().min(100);
    h[157..157 + link_len].copy_from_slice(&link[..link_len]);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    Entry::Raw(out)
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// gzip in this many members (1 = ordinary).
    Gzip {
        members: usize,
    },
    Plain,
    Zstd,
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub entries: Vec<Entry>,
    pub compression: Compression,
}

impl Layer {
    pub fn gzip(entries: Vec<Entry>) -> Self {
        Self {
            entries,
            compression: Compression::Gzip { members: 1 },
        }
    }

    pub fn with(entries: Vec<Entry>, compression: Compression) -> Self {
        Self {
            entries,
            compression,
        }
    }
}

/// A blob ready to push.
#[derive(Debug, Clone)]
pub struct Blob {
    pub media_type: String,
    pub digest: String,
    pub data: Vec<u8>,
}

impl Blob {
    pub fn new(media_type: &str, data: Vec<u8>) -> Self {
        Self {
            media_type: media_type.to_owned(),
            digest: sha256(&data),
            data,
        }
    }
}

pub fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    let mut s = String::from("sha256:");
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The uncompressed tar stream of a layer.
pub fn layer_tar(layer: &Layer) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for e in &layer.entries {
        append(&mut b, e)?;
    }
    b.finish()?;
    Ok(b.into_inner()?)
}

fn header(meta: &Meta, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(meta.mode);
    h.set_uid(u64::from(meta.uid));
    h.set_gid(u64::from(meta.gid));
    h.set_mtime(meta.mtime.max(0) as u64);
    h.set_size(size);
    h
}

fn pax_for(b: &mut tar::Builder<Vec<u8>>, meta: &Meta) -> anyhow::Result<()> {
    let mut recs: Vec<(String, Vec<u8>)> = meta
        .xattrs
        .iter()
        .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.clone()))
        .collect();
    if meta.mtime_nsec != 0 {
        recs.push((
            "mtime".into(),
            format!("{}.{:09}", meta.mtime, meta.mtime_nsec).into_bytes(),
        ));
    }
    if !recs.is_empty() {
        b.append_pax_extensions(recs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    }
    Ok(())
}

fn append(b: &mut tar::Builder<Vec<u8>>, e: &Entry) -> anyhow::Result<()> {
    match e {
        Entry::Dir { path, meta } => {
            pax_for(b, meta)?;
            let mut h = header(meta, tar::EntryType::Directory, 0);
            b.append_data(&mut h, path, &[][..])?;
        }
        Entry::File { path, meta, data } => {
            pax_for(b, meta)?;
            let mut h = header(meta, tar::EntryType::Regular, data.len() as u64);
            b.append_data(&mut h, path, data.as_slice())?;
        }
        Entry::Symlink { path, meta, target } => {
            pax_for(b, meta)?;
            let mut h = header(meta, tar::EntryType::Symlink, 0);
            b.append_link(&mut h, path, target)?;
        }
        Entry::Hardlink { path, target } => {
            let mut h = header(&Meta::new(0o644), tar::EntryType::Link, 0);
            b.append_link(&mut h, path, target)?;
        }
        Entry::CharDevice {
            path,
            meta,
            major,
            minor,
        }
        | Entry::BlockDevice {
            path,
            meta,
            major,
            minor,
        } => {
            let kind = if matches!(e, Entry::CharDevice { .. }) {
                tar::EntryType::Char
            } else {
                tar::EntryType::Block
            };
            pax_for(b, meta)?;
            let mut h = header(meta, kind, 0);
            h.set_device_major(*major)?;
            h.set_device_minor(*minor)?;
            b.append_data(&mut h, path, &[][..])?;
        }
        Entry::Fifo { path, meta } => {
            pax_for(b, meta)?;
            let mut h = header(meta, tar::EntryType::Fifo, 0);
            b.append_data(&mut h, path, &[][..])?;
        }
        Entry::Whiteout { path } => {
            let (dir, name) = match path.rsplit_once('/') {
                Some((d, n)) => (format!("{d}/"), n),
                None => (String::new(), path.as_str()),
            };
            let mut h = header(&Meta::new(0o644), tar::EntryType::Regular, 0);
            b.append_data(&mut h, format!("{dir}.wh.{name}"), &[][..])?;
        }
        Entry::Opaque { dir } => {
            let mut h = header(&Meta::new(0o644), tar::EntryType::Regular, 0);
            b.append_data(&mut h, format!("{dir}/.wh..wh..opq"), &[][..])?;
        }
        Entry::Raw(bytes) => {
            b.get_mut().extend_from_slice(bytes);
        }
    }
    Ok(())
}

/// Compresses a tar stream as the layer asks.
pub fn compress(tar_bytes: &[u8], c: Compression) -> anyhow::Result<(String, Vec<u8>)> {
    Ok(match c {
        Compression::Plain => (
            "application/vnd.oci.image.layer.v1.tar".into(),
            tar_bytes.to_vec(),
        ),
        Compression::Gzip { members } => {
            let part = tar_bytes.len().div_ceil(members.max(1)).max(1);
            let mut out = Vec::new();
            for piece in tar_bytes.chunks(part) {
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
                enc.write_all(piece)?;
                out.extend(enc.finish()?);
            }
            if tar_bytes.is_empty() {
                let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
                out = enc.finish()?;
            }
            ("application/vnd.oci.image.layer.v1.tar+gzip".into(), out)
        }
        Compression::Zstd => (
            "application/vnd.oci.image.layer.v1.tar+zstd".into(),
            zstd::bulk::compress(tar_bytes, 3)?,
        ),
    })
}

/// A built single-platform image: layer blobs, config and manifest.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub layers: Vec<Blob>,
    /// The uncompressed tar of each layer.
    pub tars: Vec<Vec<u8>>,
    pub config: Blob,
    pub manifest: Blob,
    pub platform: (String, String),
}

/// Builds layers, a config naming their diff_ids, and an OCI manifest.
pub fn build_image(layers: &[Layer], os: &str, arch: &str) -> anyhow::Result<BuiltImage> {
    let mut blobs = Vec::new();
    let mut tars = Vec::new();
    for l in layers {
        let t = layer_tar(l)?;
        let (media, data) = compress(&t, l.compression)?;
        blobs.push(Blob::new(&media, data));
        tars.push(t);
    }
    build_from_blobs(blobs, tars, os, arch)
}

/// Config and manifest around already-built layer blobs.
pub fn build_from_blobs(
    layers: Vec<Blob>,
    tars: Vec<Vec<u8>>,
    os: &str,
    arch: &str,
) -> anyhow::Result<BuiltImage> {
    let diff_ids: Vec<String> = tars.iter().map(|t| sha256(t)).collect();
    let config = serde_json::json!({
        "architecture": arch,
        "os": os,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": {"Cmd": ["/bin/sh"]},
    });
    let config = Blob::new(
        "application/vnd.oci.image.config.v1+json",
        serde_json::to_vec(&config)?,
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": config.media_type, "digest": config.digest, "size": config.data.len()},
        "layers": layers.iter().map(|b| serde_json::json!({
            "mediaType": b.media_type, "digest": b.digest, "size": b.data.len()
        })).collect::<Vec<_>>(),
    });
    let manifest = Blob::new(
        "application/vnd.oci.image.manifest.v1+json",
        serde_json::to_vec(&manifest)?,
    );
    Ok(BuiltImage {
        layers,
        tars,
        config,
        manifest,
        platform: (os.to_owned(), arch.to_owned()),
    })
}

/// Pushes blobs and manifests to a registry at `host` (`127.0.0.1:PORT`).
#[derive(Debug, Clone)]
pub struct Pusher {
    pub host: String,
    pub auth: Option<String>,
}

impl Pusher {
    pub fn new(host: &str, credentials: Option<(&str, &str)>) -> Self {
        use base64::Engine as _;
        Self {
            host: host.to_owned(),
            auth: credentials.map(|(u, p)| {
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
                )
            }),
        }
    }

    /// A pusher that sends this Authorization header (e.g. `Bearer TOKEN`).
    pub fn with_authorization(host: &str, header: &str) -> Self {
        Self {
            host: host.to_owned(),
            auth: Some(header.to_owned()),
        }
    }

    fn headers<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut h = extra.to_vec();
        if let Some(a) = &self.auth {
            h.push(("Authorization", a.as_str()));
        }
        h
    }

    pub fn push_blob(&self, repo: &str, blob: &Blob) -> anyhow::Result<()> {
        let start = http::request(
            "POST",
            &format!("http://{}/v2/{repo}/blobs/uploads/", self.host),
            &self.headers(&[]),
            &[],
        )?;
        if start.status != 202 {
            bail!("starting upload: HTTP {}", start.status);
        }
        let location = start.header("location").context("upload location")?;
        let mut url = if location.starts_with("http") {
            location.to_owned()
        } else {
            format!("http://{}{location}", self.host)
        };
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("digest={}", blob.digest));
        let put = http::request(
            "PUT",
            &url,
            &self.headers(&[("Content-Type", "application/octet-stream")]),
            &blob.data,
        )?;
        if put.status != 201 {
            bail!(
                "uploading {}: HTTP {} {}",
                blob.digest,
                put.status,
                String::from_utf8_lossy(&put.body)
            );
        }
        Ok(())
    }

    pub fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        manifest: &Blob,
    ) -> anyhow::Result<()> {
        let r = http::request(
            "PUT",
            &format!("http://{}/v2/{repo}/manifests/{reference}", self.host),
            &self.headers(&[("Content-Type", manifest.media_type.as_str())]),
            &manifest.data,
        )?;
        if r.status != 201 {
            bail!(
                "pushing manifest {repo}:{reference}: HTTP {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
        Ok(())
    }

    /// Pushes an image's blobs and its manifest under `tag`; returns `host/repo:tag`.
    pub fn push_image(&self, repo: &str, tag: &str, image: &BuiltImage) -> anyhow::Result<String> {
        for b in image.layers.iter().chain([&image.config]) {
            self.push_blob(repo, b)?;
        }
        self.push_manifest(repo, tag, &image.manifest)?;
        Ok(format!("{}/{repo}:{tag}", self.host))
    }

    /// Pushes several platform images and an OCI image index over them under `tag`.
    pub fn push_index(
        &self,
        repo: &str,
        tag: &str,
        images: &[BuiltImage],
    ) -> anyhow::Result<String> {
        let mut manifests = Vec::new();
        for img in images {
            for b in img.layers.iter().chain([&img.config]) {
                self.push_blob(repo, b)?;
            }
            self.push_manifest(repo, &img.manifest.digest, &img.manifest)?;
            manifests.push(serde_json::json!({
                "mediaType": img.manifest.media_type,
                "digest": img.manifest.digest,
                "size": img.manifest.data.len(),
                "platform": {"os": img.platform.0, "architecture": img.platform.1},
            }));
        }
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        let index = Blob::new(
            "application/vnd.oci.image.index.v1+json",
            serde_json::to_vec(&index)?,
        );
        self.push_manifest(repo, tag, &index)?;
        Ok(format!("{}/{repo}:{tag}", self.host))
    }
}
