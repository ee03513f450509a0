//! clip-index: the image index format and the indexer.
//!
//! An index maps every file of a merged OCI image to (layer, offset, length) in the
//! uncompressed layer stream, and carries per-layer seek checkpoints and chunk digests so that
//! any byte range can be produced from a small compressed range, verified. This crate is
//! synchronous and I/O-agnostic: it reads from `Read` and `&[u8]` and knows nothing of
//! registries, FUSE or Kubernetes.
//!
//! - [`digest`]: sha256 digests, the identity of layers, chunks and indexes.
//! - [`tar`]: a streaming tar reader that reports data offsets (ustar, GNU, PAX).
//! - [`stream`]: decompression that records checkpoints and chunks; chunk decoding.
//! - [`layer`]: per-layer index data and read planning.
//! - [`node`]: inodes, directory entries and their metadata.
//! - [`tree`]: merging layers (whiteouts, opaque directories, hard links).
//! - [`image`]: the decoded [`ImageIndex`] with lookup, resolve and listing.
//! - `table`: the tree's nodes and entries as the file encodes them, used in place.
//! - [`format`]: the versioned binary encoding with a body digest.
//! - [`part`]: index bytes that may be read from the file only when first needed.
//! - [`builder`]: the indexer that ties the above together.
//! - [`error`]: the crate's error type.

pub mod builder;
mod codec;
pub mod digest;
pub mod error;
pub mod format;
pub mod image;
pub mod layer;
pub mod node;
pub mod part;
pub mod stream;
mod table;
pub mod tar;
pub mod tree;
mod zlib;

pub use builder::{IndexOptions, LayerBuild, LayerSpec, assemble, index_layer};
pub use digest::Digest;
pub use error::{Error, Result};
pub use format::{ReadIndex, decode, decode_owned, encode, index_digest};
pub use image::{ChildIter, Children, ImageIndex, ImageSource, IndexStats};
pub use layer::{BLOCK_SIZE, Checkpoint, Chunk, Compression, LayerIndex, ReadPlan};
pub use node::{Child, Content, Dirent, Inode, Node, NodeKind, Xattr};
pub use part::Part;
pub use stream::{decode_chunks, decode_stream};
