//! Where verified chunks are kept. Every tier stores chunks under their digest (content
//! addressed), so one cache serves every image that shares a layer.

pub mod disk;
pub mod memory;
pub mod redis;

use bytes::Bytes;
use clip_index::Digest;
use futures::future::BoxFuture;

use crate::error::Result;

/// A chunk's identity: the sha256 of its bytes, and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    pub digest: Digest,
    pub len: u32,
}

/// A cache tier between the memory tier and the blob source.
///
/// `get` returns only the bytes that were stored under the key: a tier either verifies them
/// against the key's digest or (the disk tier) checks them against checksums it computed
/// when they were stored, which is why `put` must only ever be given verified chunks. A tier
/// that finds a damaged entry discards it and reports a miss. Boxed futures keep the trait
/// object-safe, so the store holds a list of tiers.
pub trait ChunkCache: Send + Sync + 'static {
    /// The chunk's bytes, verified, or `None` on a miss.
    fn get<'a>(&'a self, key: &'a ChunkKey) -> BoxFuture<'a, Result<Option<Bytes>>>;

    /// Stores a chunk that the caller has verified against the key's digest (a contract: a
    /// tier may serve it later without hashing it again).
    fn put<'a>(&'a self, key: &'a ChunkKey, data: Bytes) -> BoxFuture<'a, Result<()>>;

    /// Bytes `range` of the chunk, or `None` on a miss or when the tier cannot read part of
    /// a chunk. Unless [`ChunkCache::checks_ranges`], not verified: the caller checks them
    /// against the index's block digests (and falls back to [`ChunkCache::get`], which
    /// verifies and discards, on a mismatch).
    fn get_range<'a>(
        &'a self,
        key: &'a ChunkKey,
        range: std::ops::Range<u32>,
    ) -> BoxFuture<'a, Result<Option<Bytes>>> {
        let _ = (key, range);
        Box::pin(futures::future::ready(Ok(None)))
    }

    /// Whether [`ChunkCache::get_range`] returns only checked bytes (the tier keeps its own
    /// checksums of what it stored verified), so the caller need not hash them.
    fn checks_ranges(&self) -> bool {
        false
    }

    /// Whether the tier holds the chunk (without reading or verifying it).
    fn contains<'a>(&'a self, key: &'a ChunkKey) -> BoxFuture<'a, bool>;

    /// The tier's name in metrics and logs (`disk`, `redis`).
    fn name(&self) -> &'static str;

    /// Asks the tier to bring bytes `range` of the chunk closer without waiting for them (the
    /// disk tier: into the kernel's page cache), for a reader that will soon want them;
    /// whether the tier holds the chunk.
    fn warm(&self, key: &ChunkKey, range: std::ops::Range<u32>) -> bool {
        let _ = (key, range);
        false
    }

    /// Whether the tier is on this machine (fast, written before a fetch completes).
    fn is_local(&self) -> bool {
        false
    }

    /// Tier-specific event counters for metrics (name, value).
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}
