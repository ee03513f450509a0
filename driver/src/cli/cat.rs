//! `clip cat IMAGE PATH`

use std::io::Write;

use clap::Args;
use clip_index::{Content, NodeKind};
use clip_storage::{BlobSource, RangeReader};

use super::{RegistryArgs, index_for};
use crate::error::{Error, Result};

/// Bytes read from the registry per request while streaming a file out.
const PIECE: u64 = 16 << 20;

#[derive(Debug, Args)]
pub struct CatArgs {
    /// An index file, or an image reference (indexed in memory first).
    pub image: String,

    /// Path of the file inside the image.
    pub path: String,

    /// Report on stderr how many bytes were fetched from the registry.
    #[arg(short, long)]
    pub verbose: bool,

    #[command(flatten)]
    pub registry: RegistryArgs,
}

pub async fn run(args: CatArgs) -> Result<()> {
    let client = args.registry.client()?;
    let index = index_for(&args.image, &args.registry, &client).await?;
    let ino = index.resolve(args.path.as_bytes(), true)?;
    let node = index
        .node(ino)
        .ok_or_else(|| clip_index::Error::NotFound(args.path.clone()))?;
    match node.kind {
        NodeKind::Regular => {}
        NodeKind::Directory => return Err(Error::IsDirectory(args.path)),
        _ => return Err(Error::NotRegular(args.path)),
    }
    let source = client.repository(&index.source.repository, &index.source.manifest_digest)?;
    let described = source.describe();
    let reader = RangeReader::new(index.clone(), std::sync::Arc::new(source));
    let size = node.size;
    let mut out = std::io::stdout().lock();
    if let Content::File { .. } = node.content {
        let mut offset = 0;
        while offset < size {
            let bytes = reader.read_file(ino, offset, PIECE).await?;
            if bytes.is_empty() {
                break;
            }
            out.write_all(&bytes)?;
            offset += bytes.len() as u64;
        }
    }
    out.flush()?;
    if args.verbose {
        let (requests, bytes) = reader.stats().snapshot();
        eprintln!(
            "clip: read {size} bytes of {} with {requests} range requests, {bytes} compressed bytes from {described}",
            args.path
        );
    }
    Ok(())
}
