//! Where compressed layer bytes come from. Every source serves byte ranges of blobs named
//! by digest; the range reader and the caches sit on top of this trait.

pub mod registry;

use std::future::Future;
use std::ops::Range;

use bytes::Bytes;
use clip_index::Digest;
use tokio::sync::mpsc;

use crate::error::Result;

/// A place that serves byte ranges of content-addressed blobs.
pub trait BlobSource: Send + Sync + 'static {
    /// Returns exactly the bytes `range` of blob `digest`.
    fn fetch_range(
        &self,
        digest: &Digest,
        range: Range<u64>,
    ) -> impl Future<Output = Result<Bytes>> + Send;

    /// Sends the bytes `range` of blob `digest` to `sink`, in order, piece by piece as they
    /// arrive, so decoding can start before the last byte is in. The default fetches the
    /// whole range first.
    fn stream_range(
        &self,
        digest: &Digest,
        range: Range<u64>,
        sink: mpsc::Sender<Bytes>,
    ) -> impl Future<Output = Result<()>> + Send {
        async move {
            let bytes = self.fetch_range(digest, range).await?;
            sink.send(bytes)
                .await
                .map_err(|_| crate::error::Error::Task("the reader of a range went away".into()))
        }
    }

    /// A short name for logs and errors (e.g. the registry host).
    fn describe(&self) -> String;
}
