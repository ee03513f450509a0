//! The indexer: one streaming pass over each layer blob (inflate -> tar walk), then a merge
//! of all layers into one tree.

use std::io::Read;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::image::{ImageIndex, ImageSource};
use crate::layer::{Compression, DEFAULT_CHECKPOINT_SPAN, DEFAULT_CHUNK_SIZE, LayerIndex};
use crate::stream::LayerStream;
use crate::tar::{TarEntry, TarReader};
use crate::tree::TreeBuilder;

/// Tunables of the indexer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexOptions {
    /// Size of a verified chunk of uncompressed bytes.
    pub chunk_size: u32,
    /// Minimum distance between seek checkpoints, in uncompressed bytes.
    pub checkpoint_span: u64,
    /// Hash the uncompressed stream to check the config's diff_id. The compressed digest is
    /// always checked and already pins the content, so this only costs time by default.
    pub verify_diff_id: bool,
}

impl Default for IndexOptions {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            checkpoint_span: DEFAULT_CHECKPOINT_SPAN,
            verify_diff_id: false,
        }
    }
}

/// What the manifest and config say a layer should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSpec {
    pub media_type: String,
    /// The manifest's digest of the compressed blob, checked after streaming.
    pub digest: Option<Digest>,
    /// The config's diff_id, checked after streaming.
    pub diff_id: Option<Digest>,
}

/// One indexed layer: its index and its tar entries, ready to merge.
#[derive(Debug, Clone)]
pub struct LayerBuild {
    pub layer: LayerIndex,
    pub entries: Vec<TarEntry>,
}

/// Streams one layer blob once and indexes it. Memory is bounded by fixed buffers plus the
/// entry list; the blob's size does not matter.
pub fn index_layer<R: Read>(blob: R, spec: &LayerSpec, opts: &IndexOptions) -> Result<LayerBuild> {
    let compression = Compression::from_media_type(&spec.media_type)?;
    let hash_diff_id = opts.verify_diff_id || spec.diff_id.is_none();
    let stream = LayerStream::new(
        blob,
        compression,
        opts.chunk_size,
        opts.checkpoint_span,
        hash_diff_id,
    )?;
    let mut tar = TarReader::new(stream);
    let mut entries = Vec::new();
    while let Some(e) = tar.next_entry().map_err(unwrap_stream_error)? {
        entries.push(e);
    }
    let summary = tar.into_inner().finish()?;
    if let Some(want) = spec.digest
        && want != summary.digest
    {
        return Err(Error::DigestMismatch {
            what: "layer blob".into(),
            expected: want.to_string(),
            actual: summary.digest.to_string(),
        });
    }
    let diff_id = match (spec.diff_id, summary.diff_id) {
        (Some(want), Some(got)) if want != got => {
            return Err(Error::DigestMismatch {
                what: format!("uncompressed layer {} (diff_id)", summary.digest),
                expected: want.to_string(),
                actual: got.to_string(),
            });
        }
        (_, Some(got)) => got,
        (Some(want), None) => want,
        (None, None) => Digest::default(),
    };
    Ok(LayerBuild {
        layer: LayerIndex {
            media_type: spec.media_type.clone(),
            compression,
            digest: summary.digest,
            compressed_size: summary.compressed_size,
            diff_id,
            uncompressed_size: summary.uncompressed_size,
            chunk_size: opts.chunk_size,
            checkpoints: summary.checkpoints,
            chunks: summary.chunks,
            // A chunk smaller than a block is one block (the digests restart at every chunk).
            block_size: crate::layer::BLOCK_SIZE.min(opts.chunk_size),
            blocks: crate::Part::of_digests(&summary.blocks),
        },
        entries,
    })
}

/// Decompression errors travel through `io::Read` inside the tar reader: bring back the
/// original error so the message names the gzip/zstd problem, not a generic I/O failure.
fn unwrap_stream_error(e: Error) -> Error {
    match e {
        Error::Io(io) if io.get_ref().is_some_and(|i| i.is::<Error>()) => {
            match io.into_inner().map(|i| i.downcast::<Error>()) {
                Some(Ok(inner)) => *inner,
                Some(Err(other)) => Error::Io(std::io::Error::other(other)),
                None => Error::Truncated { what: "layer" },
            }
        }
        e => e,
    }
}

/// Merges indexed layers (bottom-up) into the image index.
pub fn assemble(source: ImageSource, layers: Vec<LayerBuild>) -> Result<ImageIndex> {
    let mut tree = TreeBuilder::new();
    for (i, l) in layers.iter().enumerate() {
        tree.apply_layer(i, &l.entries)?;
    }
    let (nodes, dirents) = tree.finish();
    let index = ImageIndex::new(
        source,
        layers.into_iter().map(|l| l.layer).collect(),
        nodes,
        dirents,
    );
    crate::format::validate(&index)?;
    Ok(index)
}
