//! Where compressed layer bytes come from. Every source serves byte ranges of blobs named
//! by digest; the range reader and the caches sit on top of this trait.

pub mod registry;

use std::future::Future;
use std::ops::Range;

use bytes::Bytes;
use clip_index::Digest;

use crate::error::Result;

/// A place that serves byte ranges of content-addressed blobs.
pub trait BlobSource: Send + Sync + 'static {
    /// Returns exactly the bytes `range` of blob `digest`.
    fn fetch_range(
        &self,
        digest: &Digest,
        range: Range<u64>,
    ) -> impl Future<Output = Result<Bytes>> + Send;

    /// A short name for logs and errors (e.g. the registry host).
    fn describe(&self) -> String;
}
