//! Builds an image index by streaming every layer once from the registry, layers in
//! parallel, with memory bounded by a few buffers per layer.

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use clip_index::{ImageIndex, ImageSource, IndexOptions, LayerBuild, LayerSpec};
use futures::{StreamExt, TryStreamExt};
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::source::registry::{RegistryClient, ResolvedImage, parse_reference};

/// Blob pieces in flight between the network and the indexer, per layer.
const PIPE_DEPTH: usize = 16;

/// Progress of an index build, readable while it runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Compressed bytes streamed so far, all layers together.
    pub bytes_done: AtomicU64,
    /// Compressed size of the whole image.
    pub bytes_total: AtomicU64,
    pub layers_done: AtomicUsize,
    pub layers_total: AtomicUsize,
}

impl Progress {
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.bytes_done.load(Ordering::Relaxed),
            self.bytes_total.load(Ordering::Relaxed),
        )
    }
}

/// A synchronous reader over the blob pieces a network task sends.
struct Pipe {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
    progress: Arc<Progress>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => {
                    self.progress
                        .bytes_done
                        .fetch_add(b.len() as u64, Ordering::Relaxed);
                    self.current = b;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

/// Indexes a resolved image: every layer streamed once, up to `parallel` at a time.
pub async fn build_index(
    registry: &RegistryClient,
    image: &ResolvedImage,
    opts: IndexOptions,
    parallel: usize,
    progress: Arc<Progress>,
) -> Result<ImageIndex> {
    progress
        .bytes_total
        .store(image.compressed_size(), Ordering::Relaxed);
    progress
        .layers_total
        .store(image.layers.len(), Ordering::Relaxed);
    let blobs = registry.blob(parse_reference(&format!(
        "{}@{}",
        image.repository, image.manifest_digest
    ))?);
    // Owned items and a `move` closure: the future stays `Send` for any caller that spawns it.
    let layers: Vec<(usize, crate::LayerDescriptor)> =
        image.layers.iter().cloned().enumerate().collect();
    let builds: Vec<LayerBuild> = futures::stream::iter(layers)
        .map(move |(i, layer)| {
            let blobs = blobs.clone();
            let progress = progress.clone();
            async move {
                let spec = LayerSpec {
                    media_type: layer.media_type.clone(),
                    digest: Some(layer.digest),
                    diff_id: layer.diff_id,
                };
                let mut stream = blobs.stream(&layer.digest).await?;
                let (tx, rx) = mpsc::channel(PIPE_DEPTH);
                let pump = async move {
                    while let Some(piece) = stream.next().await {
                        if tx.send(piece).await.is_err() {
                            break;
                        }
                    }
                };
                let pipe = Pipe {
                    rx,
                    current: Bytes::new(),
                    progress: progress.clone(),
                };
                let work = tokio::task::spawn_blocking(move || {
                    clip_index::index_layer(pipe, &spec, &opts)
                });
                let ((), built) = tokio::join!(pump, work);
                let built = built
                    .map_err(|e| Error::Task(e.to_string()))?
                    .map_err(|source| Error::IndexLayer {
                        layer: i,
                        digest: layer.digest.to_string(),
                        source,
                    })?;
                progress.layers_done.fetch_add(1, Ordering::Relaxed);
                Ok::<_, Error>(built)
            }
        })
        .buffered(parallel.max(1))
        .try_collect()
        .await?;
    let source = ImageSource {
        repository: image.repository.clone(),
        manifest_digest: image.manifest_digest,
        config_digest: image.config_digest,
        platform: image.platform.to_string(),
    };
    tokio::task::spawn_blocking(move || clip_index::assemble(source, builds))
        .await
        .map_err(|e| Error::Task(e.to_string()))?
        .map_err(Error::from)
}
