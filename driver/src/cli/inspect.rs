//! `clip inspect FILE [--tree] [--json]`

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use clip_index::{Content, NodeKind};
use serde::Serialize;

use super::{human_bytes, load_index};
use crate::error::Result;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// An index file written by `clip index`.
    pub file: PathBuf,

    /// List every path with its metadata.
    #[arg(long)]
    pub tree: bool,

    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct JsonEntry {
    path: String,
    inode: u64,
    #[serde(flatten)]
    node: clip_index::Node,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let index = load_index(&args.file)?;
    let size = std::fs::metadata(&args.file)?.len();
    let stats = index.stats();
    let mut out = std::io::stdout().lock();
    if args.json {
        let mut entries = Vec::new();
        if args.tree {
            index.walk(|path, ino, node| {
                entries.push(JsonEntry {
                    path: String::from_utf8_lossy(path).into_owned(),
                    inode: ino.0,
                    node: node.clone(),
                });
            });
        }
        let doc = serde_json::json!({
            "source": index.source,
            "index_bytes": size,
            "stats": stats,
            "layers": index.layers.iter().map(|l| serde_json::json!({
                "media_type": l.media_type,
                "compression": l.compression,
                "digest": l.digest,
                "compressed_size": l.compressed_size,
                "diff_id": l.diff_id,
                "uncompressed_size": l.uncompressed_size,
                "chunk_size": l.chunk_size,
                "checkpoints": l.checkpoints.len(),
                "chunks": l.chunks.len(),
            })).collect::<Vec<_>>(),
            "entries": if args.tree { serde_json::to_value(&entries).ok() } else { None },
        });
        serde_json::to_writer_pretty(&mut out, &doc).map_err(std::io::Error::other)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "image:      {}@{}",
        index.source.repository, index.source.manifest_digest
    )?;
    writeln!(out, "platform:   {}", index.source.platform)?;
    writeln!(
        out,
        "files:      {} files, {} directories, {} symlinks, {} other ({} in files)",
        stats.files,
        stats.directories,
        stats.symlinks,
        stats.other,
        human_bytes(stats.file_bytes)
    )?;
    writeln!(
        out,
        "index:      {} ({:.2}% of {} compressed)",
        human_bytes(size),
        100.0 * size as f64 / stats.compressed_size.max(1) as f64,
        human_bytes(stats.compressed_size)
    )?;
    for (i, l) in index.layers.iter().enumerate() {
        writeln!(
            out,
            "layer {i}:    {} {:?} {} -> {}, {} checkpoints, {} chunks",
            l.digest,
            l.compression,
            human_bytes(l.compressed_size),
            human_bytes(l.uncompressed_size),
            l.checkpoints.len(),
            l.chunks.len()
        )?;
    }
    if args.tree {
        let mut result = Ok(());
        index.walk(|path, _, node| {
            if result.is_err() {
                return;
            }
            let kind = match node.kind {
                NodeKind::Directory => 'd',
                NodeKind::Regular => '-',
                NodeKind::Symlink => 'l',
                NodeKind::CharDevice => 'c',
                NodeKind::BlockDevice => 'b',
                NodeKind::Fifo => 'p',
            };
            let target = match &node.content {
                Content::Symlink { target } => format!(" -> {}", String::from_utf8_lossy(target)),
                _ => String::new(),
            };
            result = writeln!(
                out,
                "{kind}{:04o} {:>5} {:>5}:{:<5} {:>12} {}{target}",
                node.mode,
                node.nlink,
                node.uid,
                node.gid,
                node.size,
                String::from_utf8_lossy(path)
            );
        });
        result?;
    }
    Ok(())
}
