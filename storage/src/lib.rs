//! clip-storage: where image bytes come from and where they are kept.
//!
//! Sources serve byte ranges of blobs named by digest; the range reader turns an index plus a
//! source into exact, verified bytes of any file. Nothing here knows about inodes beyond what
//! the index says, FUSE, or Kubernetes.
//!
//! - [`source`]: the [`source::BlobSource`] trait and the OCI registry source.
//! - [`auth`]: registry credentials and docker `config.json` parsing.
//! - [`cache`]: the [`cache::ChunkCache`] trait, the disk cache and the memory tier.
//! - [`tiered`]: the chunk store that reads through memory, cache tiers and the source.
//! - [`stats`]: per-tier counters and read latency, with Prometheus text output.
//! - [`indexer`]: builds an index by streaming layers from a registry in parallel.
//! - [`reader`]: the range reader (checkpoint-based fetch, decode and verify).
//! - [`profile`]: start-up profiles: the chunks a mount's readers asked for first.
//! - [`error`]: the crate's error type.

pub mod auth;
pub mod cache;
pub mod error;
pub mod indexer;
pub mod profile;
pub mod reader;
pub mod source;
pub mod stats;
pub mod tiered;
mod whole;

pub use auth::{Credentials, DockerConfig};
pub use error::{Error, Result};
pub use indexer::{Progress, build_index};
pub use reader::{FetchStats, RangeReader};
pub use source::BlobSource;
pub use source::registry::{
    LayerDescriptor, Platform, RegistryBlobs, RegistryClient, RegistryConfig, ResolvedImage,
};
pub use tiered::{ChunkStore, ReadNow, StoreConfig};
