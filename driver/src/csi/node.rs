//! The CSI Node service: publish images as read-only FUSE volumes at kubelet's target paths.

use crate::lock;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clip_index::{Digest, ImageIndex};
use clip_storage::cache::ChunkCache;
use clip_storage::cache::disk::DiskCache;
use clip_storage::cache::redis::RedisCache;
use clip_storage::{
    ChunkStore, Credentials, DockerConfig, Platform, Progress, RegistryBlobs, RegistryClient,
    RegistryConfig, StoreConfig,
};
use tonic::{Request, Response, Status};
use tracing::{Instrument, info, info_span, warn};

use super::error::CsiError;
use super::idle::{IdleIndexes, IdleLimits};
use super::lookup::ClipImageLookup;
use super::proto::node_server::Node;
use super::proto::node_service_capability::{Rpc, rpc};
use super::proto::volume_capability::AccessType;
use super::proto::volume_capability::access_mode::Mode;
use super::proto::volume_usage::Unit;
use super::proto::*;
use crate::fs::{Mount, MountOptions, is_mounted, mount, mounted_device, resume, unmount_path};
use crate::keeper::{Adopted, Event, KeeperClient, Secrets, Welcome};
use crate::mounts::{MountTable, VolumeRecord};

/// volume_context keys kubelet adds with `podInfoOnMount: true`.
pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
pub const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
/// Attributes a pod sets on its volume.
pub const ATTR_CLIP_IMAGE: &str = "clipImage";
pub const ATTR_IMAGE: &str = "image";

/// How the node plugin runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: String,
    pub max_volumes: i64,
    /// Mount table and local indexes.
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub cache_bytes: u64,
    pub store: StoreConfig,
    pub fuse_threads: usize,
    /// Refuse `image:` attributes; only ClipImages may be mounted.
    pub require_clip_images: bool,
    /// Mount again, at start, the volumes of the table whose mounts died with the last process.
    pub reserve_on_start: bool,
    pub registry: RegistryConfig,
    pub platform: Option<Platform>,
    /// How long a publish waits for a direct image being indexed before asking kubelet to retry.
    pub publish_wait: Duration,
    /// The keeper (`clip keeper`) that holds mounts while this plugin restarts.
    pub keeper_socket: Option<PathBuf>,
    /// Decoded indexes of images no volume uses any more, kept for the image's next publish.
    pub idle_indexes: IdleLimits,
}

struct ImageEntry {
    store: Arc<ChunkStore<RegistryBlobs>>,
    refs: usize,
    /// Made for a pod that starts (not for one already running, re-served after a
    /// restart): its reads are a start-up, worth keeping as the image's profile.
    profiled: bool,
}

struct Active {
    mount: Option<Mount>,
    index_digest: Digest,
    /// The pull secrets it was published with (memory only), for the keeper.
    secrets: Secrets,
}

/// A background index build of a directly referenced image.
struct IndexJob {
    progress: Arc<Progress>,
    result: tokio::sync::watch::Receiver<Option<Result<Digest, String>>>,
}

/// Everything the node services share.
pub struct NodeContext {
    pub config: NodeConfig,
    disk: Arc<DiskCache>,
    redis: Option<Arc<RedisCache>>,
    lookup: Option<Arc<dyn ClipImageLookup>>,
    runtime: tokio::runtime::Handle,
    table: Mutex<MountTable>,
    active: Mutex<HashMap<String, Active>>,
    images: Mutex<HashMap<Digest, ImageEntry>>,
    /// Indexes of images whose last volume went, for a quick next publish.
    idle: IdleIndexes,
    busy: Mutex<HashSet<String>>,
    jobs: Mutex<HashMap<Digest, Arc<IndexJob>>>,
    /// Registry clients by credentials (a digest of the secret), so tokens and connections
    /// are reused across publishes.
    registries: Mutex<HashMap<Digest, RegistryClient>>,
    keeper: std::sync::OnceLock<Arc<KeeperClient>>,
}

impl std::fmt::Debug for NodeContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeContext")
            .field("node_id", &self.config.node_id)
            .finish_non_exhaustive()
    }
}

/// Holds a volume's "operation in progress" mark; released on drop.
struct OpGuard<'a> {
    ctx: &'a NodeContext,
    volume: String,
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        lock(&self.ctx.busy).remove(&self.volume);
    }
}

/// Replays the start-up profile at `path`, or else the one published in Redis, on the
/// store (if it is still in use).
async fn replay_profile(
    store: &std::sync::Weak<ChunkStore<RegistryBlobs>>,
    index: Arc<ImageIndex>,
    path: &Path,
    redis: Option<&Arc<RedisCache>>,
    budget: u64,
) {
    let manifest = index.source.manifest_digest;
    let mut profile = crate::profile::load(path, &index);
    if profile.is_none()
        && let Some(r) = redis
    {
        match r
            .fetch_profile(&manifest, clip_storage::profile::MAX_PROFILE_BYTES)
            .await
        {
            Ok(Some(text)) => profile = crate::profile::parse(&text, &index, "redis"),
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "no start-up profile from redis"),
        }
    }
    let Some(store) = store.upgrade() else {
        return;
    };
    let profile = profile.unwrap_or_default();
    if !profile.is_empty() {
        info!(image = %manifest, chunks = profile.chunks.len(), reads = profile.reads.len(), paths = profile.paths.len(), "bringing ahead what the start-up profile names");
    }
    // Also an empty one: the image's mounts then know there is nothing to prefill.
    store.replay(&profile, budget);
}

/// Writes an image's start-up profile to `path` and publishes it in Redis for the other
/// nodes (in the background, off the runtime's threads: naming the recorded lookups walks
/// the index; a profile is an optimisation, so failures are only logged).
fn keep_profile(
    store: Arc<ChunkStore<RegistryBlobs>>,
    path: PathBuf,
    redis: Option<Arc<RedisCache>>,
    runtime: &tokio::runtime::Handle,
) {
    let manifest = store.index().source.manifest_digest;
    runtime.spawn(async move {
        let written = tokio::task::spawn_blocking(move || {
            let profile = store.profile_to_save();
            if profile.is_empty() {
                return None;
            }
            let text = clip_storage::profile::encode(store.index(), &profile);
            crate::profile::save_text(&path, &text);
            Some(text)
        })
        .await;
        if let (Some(r), Ok(Some(text))) = (redis, written)
            && let Err(e) = r.publish_profile(&manifest, &text).await
        {
            tracing::debug!(error = %e, "publishing the start-up profile to redis failed");
        }
    });
}

impl NodeContext {
    /// Opens the caches and the mount table. Volumes of the table are re-served (when
    /// configured) by [`NodeContext::restore`].
    pub fn new(
        config: NodeConfig,
        redis: Option<Arc<RedisCache>>,
        lookup: Option<Arc<dyn ClipImageLookup>>,
        runtime: tokio::runtime::Handle,
    ) -> crate::Result<Arc<Self>> {
        let disk = DiskCache::open_in_background(&config.cache_dir, config.cache_bytes)?;
        let table = MountTable::load(&config.state_dir.join("volumes.json"))?;
        let idle = IdleIndexes::new(config.idle_indexes);
        let ctx = Arc::new(Self {
            config,
            disk,
            redis,
            lookup,
            runtime,
            table: Mutex::new(table),
            active: Mutex::new(HashMap::new()),
            images: Mutex::new(HashMap::new()),
            idle,
            busy: Mutex::new(HashSet::new()),
            jobs: Mutex::new(HashMap::new()),
            registries: Mutex::new(HashMap::new()),
            keeper: std::sync::OnceLock::new(),
        });
        // Idle indexes are let go of when their time is over, also on a node left idle.
        if ctx.idle.keeps() {
            let weak = Arc::downgrade(&ctx);
            let every = ctx.idle.sweep_every();
            ctx.runtime.spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    match weak.upgrade() {
                        Some(ctx) => ctx.idle.expire(),
                        None => return,
                    }
                }
            });
        }
        Ok(ctx)
    }

    /// Ready to serve: FUSE is available and the configured caches answer.
    pub async fn ready(&self) -> Result<(), String> {
        if !Path::new("/dev/fuse").exists() {
            return Err("/dev/fuse is missing".into());
        }
        if let Some(r) = &self.redis
            && r.is_degraded()
        {
            // Redis trouble degrades speed, not correctness: still ready.
            warn!("redis is degraded; serving through the registry");
        }
        Ok(())
    }

    fn begin(&self, volume: &str) -> Result<OpGuard<'_>, CsiError> {
        if !lock(&self.busy).insert(volume.to_owned()) {
            return Err(CsiError::Busy(volume.to_owned()));
        }
        Ok(OpGuard {
            ctx: self,
            volume: volume.to_owned(),
        })
    }

    fn index_path(&self, digest: &Digest) -> PathBuf {
        self.config
            .state_dir
            .join("indexes")
            .join(format!("{}.clipidx", digest.hex()))
    }

    fn manifest_pointer(&self, manifest: &Digest) -> PathBuf {
        self.config
            .state_dir
            .join("indexes")
            .join(format!("manifest-{}", manifest.hex()))
    }

    fn save_index(&self, digest: &Digest, encoded: &[u8]) {
        let path = self.index_path(digest);
        let tmp = path.with_extension("tmp");
        let r = std::fs::create_dir_all(path.parent().unwrap_or(Path::new("/")))
            .and_then(|()| std::fs::write(&tmp, encoded))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = r {
            warn!(path = %path.display(), error = %e, "keeping the index locally failed");
        }
    }

    /// The index with this digest: the one in memory (of an image this node serves, or
    /// kept since its last volume went), else the local copy, else Redis. The copies are
    /// verified.
    async fn load_index(&self, digest: &Digest, volume: &str) -> Result<Arc<ImageIndex>, CsiError> {
        if let Some(e) = lock(&self.images).get(digest) {
            return Ok(e.store.index().clone());
        }
        if let Some(index) = self.idle.get(digest) {
            return Ok(index);
        }
        let path = self.index_path(digest);
        // Read, hashed and parsed at once, off the runtime's threads.
        let local = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(path).ok()?;
            clip_index::format::read(file, true).ok()
        });
        if let Ok(Some(read)) = local.await
            && read.digest == Some(*digest)
        {
            return Ok(Arc::new(read.index));
        }
        let redis = self.redis.as_ref().ok_or_else(|| {
            CsiError::FailedPrecondition(format!(
                "volume {volume}: index {digest} is not on this node and no Redis is configured"
            ))
        })?;
        let bytes = redis
            .fetch_index(digest)
            .await
            .map_err(|e| CsiError::from_storage(volume, &e))?;
        let index = clip_index::decode(&bytes).map_err(|e| {
            CsiError::FailedPrecondition(format!("volume {volume}: index {digest} is corrupt: {e}"))
        })?;
        self.save_index(digest, &bytes);
        Ok(Arc::new(index))
    }

    /// The shared store of an image (one index and one chunk cache per image per node).
    /// A new store for a pod that `starts` replays and records the image's start-up profile.
    fn store_for(
        &self,
        digest: Digest,
        index: Arc<ImageIndex>,
        registry: &RegistryClient,
        volume: &str,
        starts: bool,
    ) -> Result<Arc<ChunkStore<RegistryBlobs>>, CsiError> {
        let mut images = lock(&self.images);
        if let Some(e) = images.get_mut(&digest) {
            e.refs += 1;
            return Ok(e.store.clone());
        }
        let source = registry
            .repository(&index.source.repository, &index.source.manifest_digest)
            .map_err(|e| CsiError::from_storage(volume, &e))?;
        // Connection, TLS and credentials while the mount comes up, not at the first read.
        source.warm_up_for(&index, |d| self.disk.contains(d), self.redis.is_some());
        let mut tiers: Vec<Arc<dyn ChunkCache>> = vec![self.disk.clone()];
        if let Some(r) = &self.redis {
            tiers.push(r.clone());
        }
        let store = ChunkStore::new(
            index,
            Arc::new(source),
            tiers,
            self.redis.clone(),
            self.config.store.clone(),
        );
        store.keep_whole_files(self.disk.clone());
        if starts {
            self.start_profile(&store);
        }
        // Served again: out of the idle keep (under the images lock, as release_image keeps
        // it, so an image is always in one or the other).
        self.idle.take(&digest);
        images.insert(
            digest,
            ImageEntry {
                store: store.clone(),
                refs: 1,
                profiled: starts,
            },
        );
        Ok(store)
    }

    fn release_image(&self, digest: &Digest) {
        let gone = {
            let mut images = lock(&self.images);
            match images.get_mut(digest) {
                Some(e) if e.refs > 1 => {
                    e.refs -= 1;
                    None
                }
                Some(_) => {
                    let gone = images.remove(digest);
                    if let Some(e) = &gone {
                        self.idle.keep(*digest, e.store.index().clone());
                    }
                    gone
                }
                None => None,
            }
        };
        if let Some(e) = gone.filter(|e| e.profiled) {
            let path = self.profile_path(&e.store);
            keep_profile(e.store, path, self.redis.clone(), &self.runtime);
        }
    }

    /// Where this node keeps the start-up profile of an image.
    fn profile_path(&self, store: &ChunkStore<RegistryBlobs>) -> PathBuf {
        crate::profile::path_in(
            &self.config.state_dir.join("profiles"),
            &store.index().source.manifest_digest,
        )
    }

    /// For a new image store: replays the image's start-up profile (this node's, else the
    /// one a node published in Redis) and keeps what the store records once the recording
    /// window is over (or earlier, when the image's last volume goes).
    fn start_profile(&self, store: &Arc<ChunkStore<RegistryBlobs>>) {
        let path = self.profile_path(store);
        let redis = self.redis.clone();
        let weak = Arc::downgrade(store);
        let index = store.index().clone();
        let runtime = self.runtime.clone();
        let budget = self.config.cache_bytes / 4;
        self.runtime.spawn(async move {
            replay_profile(&weak, index, &path, redis.as_ref(), budget).await;
            // Kept when the recording window (from the first read) is over.
            loop {
                let end = match weak.upgrade() {
                    Some(store) => store.profile_window_end(),
                    None => return,
                };
                let now = std::time::Instant::now();
                match end {
                    Some(end) if end <= now => break,
                    Some(end) => tokio::time::sleep(end - now).await,
                    None => tokio::time::sleep(clip_storage::profile::RECORD_WINDOW).await,
                }
            }
            if let Some(store) = weak.upgrade() {
                keep_profile(store, path, redis, &runtime);
            }
        });
    }

    /// Registry access with the pod's pull secret, if it gave one. Clients are reused per
    /// distinct secret, so tokens and connections survive across publishes.
    fn registry_for(
        &self,
        secrets: &HashMap<String, String>,
        volume: &str,
    ) -> Result<RegistryClient, CsiError> {
        let mut canonical: Vec<(&String, &String)> = secrets.iter().collect();
        canonical.sort();
        let key = Digest::of(format!("{canonical:?}").as_bytes());
        if let Some(c) = lock(&self.registries).get(&key) {
            return Ok(c.clone());
        }
        let client = self.new_registry(secrets, volume)?;
        lock(&self.registries).insert(key, client.clone());
        Ok(client)
    }

    fn new_registry(
        &self,
        secrets: &HashMap<String, String>,
        volume: &str,
    ) -> Result<RegistryClient, CsiError> {
        let mut config = self.config.registry.clone();
        if let Some(json) = secrets
            .get(".dockerconfigjson")
            .or_else(|| secrets.get(".dockercfg"))
        {
            let parsed = DockerConfig::parse(json.as_bytes(), "the volume's nodePublishSecretRef")
                .map_err(|e| CsiError::InvalidArgument(format!("volume {volume}: {e}")))?;
            config.docker_config.merge(parsed);
        } else if let (Some(u), Some(p)) = (secrets.get("username"), secrets.get("password")) {
            config.credentials = Some(Credentials::Basic {
                username: u.clone(),
                password: p.clone(),
            });
        }
        Ok(RegistryClient::new(config))
    }

    /// Resolves what a volume asks for to an index digest (and the index).
    async fn resolve_volume(
        &self,
        volume: &str,
        ctx: &HashMap<String, String>,
        registry: &RegistryClient,
    ) -> Result<(Digest, Arc<ImageIndex>), CsiError> {
        match (ctx.get(ATTR_CLIP_IMAGE), ctx.get(ATTR_IMAGE)) {
            (Some(_), Some(_)) => Err(CsiError::InvalidArgument(format!(
                "volume {volume}: set either volumeAttributes.clipImage or volumeAttributes.image, not both"
            ))),
            (None, None) => Err(CsiError::InvalidArgument(format!(
                "volume {volume}: volumeAttributes must name a clipImage (a ClipImage in the pod's namespace) or an image"
            ))),
            (Some(name), None) => self.resolve_clip_image(volume, ctx, name).await,
            (None, Some(image)) => {
                if self.config.require_clip_images {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {volume}: this driver only mounts ClipImages (direct image references are disabled); create a ClipImage for {image}"
                    )));
                }
                self.resolve_direct(volume, image, registry).await
            }
        }
    }

    async fn resolve_clip_image(
        &self,
        volume: &str,
        ctx: &HashMap<String, String>,
        name: &str,
    ) -> Result<(Digest, Arc<ImageIndex>), CsiError> {
        let namespace = ctx
            .get(POD_NAMESPACE)
            .map(String::as_str)
            .unwrap_or("default");
        let lookup = self.lookup.as_ref().ok_or_else(|| {
            CsiError::FailedPrecondition(format!(
                "volume {volume}: ClipImage {namespace}/{name} cannot be looked up: the plugin runs without Kubernetes access"
            ))
        })?;
        let ci = lookup
            .get(namespace, name)
            .await
            .map_err(|e| {
                CsiError::Unavailable(format!(
                    "volume {volume}: reading ClipImage {namespace}/{name}: {e}"
                ))
            })?
            .ok_or_else(|| {
                CsiError::NotFound(format!(
                    "volume {volume}: ClipImage {namespace}/{name} not found"
                ))
            })?;
        let status = ci.status.clone().unwrap_or_default();
        if status.phase != Some(clip_api::Phase::Ready) {
            let why = ci
                .ready_condition()
                .map(|c| format!("{}: {}", c.reason, c.message))
                .unwrap_or_else(|| "not indexed yet".into());
            let phase = status.phase.map_or("Pending".to_owned(), |p| p.to_string());
            return Err(CsiError::FailedPrecondition(format!(
                "volume {volume}: ClipImage {namespace}/{name} is {phase}, not Ready ({why})"
            )));
        }
        let digest: Digest = status
            .index_digest
            .as_deref()
            .unwrap_or_default()
            .parse()
            .map_err(|_| {
                CsiError::FailedPrecondition(format!(
                    "volume {volume}: ClipImage {namespace}/{name} is Ready but has no valid index digest"
                ))
            })?;
        let index = self.load_index(&digest, volume).await?;
        Ok((digest, index))
    }

    /// A direct image: its index comes from this node, from Redis, or is built once in the
    /// background (publish asks kubelet to retry meanwhile rather than blocking it).
    async fn resolve_direct(
        &self,
        volume: &str,
        image: &str,
        registry: &RegistryClient,
    ) -> Result<(Digest, Arc<ImageIndex>), CsiError> {
        let resolved = registry
            .resolve(image, self.config.platform.as_ref())
            .await
            .map_err(|e| CsiError::from_storage(volume, &e))?;
        let manifest = resolved.manifest_digest;
        if let Ok(text) = std::fs::read_to_string(self.manifest_pointer(&manifest))
            && let Ok(d) = text.trim().parse::<Digest>()
            && let Ok(index) = self.load_index(&d, volume).await
        {
            return Ok((d, index));
        }
        if let Some(r) = &self.redis
            && let Ok(Some(d)) = r.index_for_manifest(&manifest).await
            && let Ok(index) = self.load_index(&d, volume).await
        {
            self.remember_manifest(&manifest, &d);
            return Ok((d, index));
        }
        let job = {
            let mut jobs = lock(&self.jobs);
            match jobs.get(&manifest) {
                Some(j) => j.clone(),
                None => {
                    let j = self.start_index_job(resolved, registry.clone());
                    jobs.insert(manifest, j.clone());
                    j
                }
            }
        };
        let mut rx = job.result.clone();
        let outcome = {
            let waited =
                tokio::time::timeout(self.config.publish_wait, rx.wait_for(Option::is_some)).await;
            match waited {
                Ok(Ok(v)) => v.clone(),
                _ => None,
            }
        };
        match outcome {
            Some(Ok(d)) => {
                lock(&self.jobs).remove(&manifest);
                let index = self.load_index(&d, volume).await?;
                Ok((d, index))
            }
            Some(Err(e)) => {
                lock(&self.jobs).remove(&manifest);
                Err(CsiError::FailedPrecondition(format!(
                    "volume {volume}: indexing {image} failed: {e}"
                )))
            }
            None => {
                let (done, total) = job.progress.bytes();
                Err(CsiError::Unavailable(format!(
                    "volume {volume}: indexing {image} ({} of {} MB); kubelet will retry",
                    done / 1_000_000,
                    total / 1_000_000
                )))
            }
        }
    }

    fn remember_manifest(&self, manifest: &Digest, index: &Digest) {
        let p = self.manifest_pointer(manifest);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).ok();
        }
        std::fs::write(p, index.to_string()).ok();
    }

    fn start_index_job(
        &self,
        resolved: clip_storage::ResolvedImage,
        registry: RegistryClient,
    ) -> Arc<IndexJob> {
        let progress = Arc::new(Progress::default());
        let (tx, rx) = tokio::sync::watch::channel(None);
        let job = Arc::new(IndexJob {
            progress: progress.clone(),
            result: rx,
        });
        let redis = self.redis.clone();
        let state_indexes = self.config.state_dir.join("indexes");
        let span = info_span!("index", image = %resolved.requested);
        self.runtime.spawn(
            async move {
                info!("indexing a directly referenced image");
                let built = clip_storage::build_index(
                    &registry,
                    &resolved,
                    clip_index::IndexOptions::default(),
                    std::thread::available_parallelism().map_or(2, |n| n.get()),
                    progress,
                )
                .await;
                let result =
                    match built.and_then(|index| clip_index::encode(&index).map_err(Into::into)) {
                        Ok(encoded) => {
                            let digest = clip_index::index_digest(&encoded);
                            std::fs::create_dir_all(&state_indexes).ok();
                            let path = state_indexes.join(format!("{}.clipidx", digest.hex()));
                            std::fs::write(&path, &encoded).ok();
                            std::fs::write(
                                state_indexes
                                    .join(format!("manifest-{}", resolved.manifest_digest.hex())),
                                digest.to_string(),
                            )
                            .ok();
                            if let Some(r) = &redis
                                && let Err(e) = r
                                    .publish_index(&encoded, Some(&resolved.manifest_digest))
                                    .await
                            {
                                warn!(error = %e, "sharing the index through redis failed");
                            }
                            info!(index = %digest, "indexed");
                            Ok(digest)
                        }
                        Err(e) => {
                            warn!(error = %e, "indexing failed");
                            Err(e.to_string())
                        }
                    };
                let _ = tx.send(Some(result));
            }
            .instrument(span),
        );
        job
    }

    fn fingerprint(req: &NodePublishVolumeRequest) -> String {
        let mut attrs: Vec<(&String, &String)> = req
            .volume_context
            .iter()
            .filter(|(k, _)| k.as_str() == ATTR_CLIP_IMAGE || k.as_str() == ATTR_IMAGE)
            .collect();
        attrs.sort();
        let text = format!("{}|{}|{attrs:?}", req.target_path, req.readonly);
        Digest::of(text.as_bytes()).to_string()
    }

    fn mount_options(&self, store: &ChunkStore<RegistryBlobs>, volume: &str) -> MountOptions {
        let index = store.index();
        MountOptions {
            backing_record: Some(self.backing_record(volume)),
            fsname: format!(
                "clip:{}@{}",
                index.source.repository, index.source.manifest_digest
            ),
            threads: self.config.fuse_threads,
            // Requests read on one shared descriptor can be sent again to the next server.
            clone_fd: self.config.keeper_socket.is_none(),
            ..MountOptions::default()
        }
    }

    /// Where a volume's mount records the backing files it handed to the kernel.
    fn backing_record(&self, volume: &str) -> PathBuf {
        self.config
            .state_dir
            .join("backing")
            .join(Digest::of(volume.as_bytes()).hex())
    }

    fn mount_at(
        &self,
        store: Arc<ChunkStore<RegistryBlobs>>,
        target: &Path,
        volume: &str,
        secrets: &Secrets,
    ) -> Result<Mount, CsiError> {
        std::fs::create_dir_all(target).map_err(|e| {
            CsiError::Internal(format!(
                "volume {volume}: creating {}: {e}",
                target.display()
            ))
        })?;
        let options = self.mount_options(&store, volume);
        let m = mount(store, target, &options, self.runtime.clone()).map_err(|e| {
            CsiError::Internal(format!(
                "volume {volume}: mounting at {}: {e}",
                target.display()
            ))
        })?;
        self.keep(volume, &m, secrets);
        Ok(m)
    }

    /// Gives the keeper a descriptor of the mount, so that it outlives this process.
    fn keep(&self, volume: &str, m: &Mount, secrets: &Secrets) {
        self.give_keeper(volume, m.device(), m.dir(), secrets);
    }

    /// Hands `fd`, a descriptor of the mount at `dir`, and its pull secrets to the keeper.
    fn give_keeper(
        &self,
        volume: &str,
        fd: std::io::Result<std::os::fd::OwnedFd>,
        dir: &Path,
        secrets: &Secrets,
    ) {
        let Some(k) = self.keeper.get() else {
            return;
        };
        let device = mounted_device(dir).unwrap_or(0);
        let kept = fd.and_then(|fd| k.keep(volume, std::os::fd::AsFd::as_fd(&fd), device, secrets));
        if let Err(e) = kept {
            warn!(volume_id = %volume, error = %e, "the keeper does not hold this mount; it will not survive a restart of the plugin");
        }
    }

    fn release_kept(&self, volume: &str) {
        if let Some(k) = self.keeper.get()
            && k.connected()
            && let Err(e) = k.release(volume)
        {
            warn!(volume_id = %volume, error = %e, "telling the keeper to release the mount failed");
        }
    }

    /// Publishes a volume.
    pub async fn publish(&self, req: NodePublishVolumeRequest) -> Result<(), CsiError> {
        let volume = req.volume_id.clone();
        if volume.is_empty() {
            return Err(CsiError::InvalidArgument("volume_id is required".into()));
        }
        if req.target_path.is_empty() {
            return Err(CsiError::InvalidArgument(format!(
                "volume {volume}: target_path is required"
            )));
        }
        let target = PathBuf::from(&req.target_path);
        if !target.is_absolute() {
            return Err(CsiError::InvalidArgument(format!(
                "volume {volume}: target_path {} is not absolute",
                target.display()
            )));
        }
        let cap = req.volume_capability.as_ref().ok_or_else(|| {
            CsiError::InvalidArgument(format!("volume {volume}: volume_capability is required"))
        })?;
        match cap.access_type {
            Some(AccessType::Mount(_)) => {}
            Some(AccessType::Block(_)) => {
                return Err(CsiError::InvalidArgument(format!(
                    "volume {volume}: block access is not supported; clip volumes are filesystems"
                )));
            }
            None => {
                return Err(CsiError::InvalidArgument(format!(
                    "volume {volume}: volume_capability needs an access type (mount)"
                )));
            }
        }
        let mode = cap.access_mode.as_ref().map(|m| m.mode());
        let read_only_mode = matches!(
            mode,
            Some(Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
        );
        if !req.readonly && !read_only_mode {
            return Err(CsiError::InvalidArgument(format!(
                "volume {volume}: clip volumes are read-only; set readOnly: true on the pod's csi volume"
            )));
        }
        let _guard = self.begin(&volume)?;
        let fingerprint = Self::fingerprint(&req);
        // Idempotency: the same publish again is fine; different arguments are a conflict.
        let existing = lock(&self.table).get(&volume).cloned();
        if let Some(rec) = &existing {
            if rec.fingerprint != fingerprint {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {volume} is already published at {} with other arguments",
                    rec.target_path.display()
                )));
            }
            // Served by this process and still mounted there: asked of its own state, not
            // of the mount (a request to itself; see `fs::Mount::serving`).
            if lock(&self.active)
                .get(&volume)
                .is_some_and(|a| a.mount.as_ref().is_some_and(|m| m.serving()))
            {
                return Ok(());
            }
        }
        if let Some(other) = lock(&self.table).by_target(&target)
            && other.volume_id != volume
        {
            return Err(CsiError::AlreadyExists(format!(
                "volume {volume}: target {} is used by volume {}",
                target.display(),
                other.volume_id
            )));
        }
        if existing.is_none() && lock(&self.table).len() as i64 >= self.config.max_volumes {
            return Err(CsiError::ResourceExhausted(format!(
                "volume {volume}: this node already serves {} volumes (the maximum)",
                self.config.max_volumes
            )));
        }
        let registry = self.registry_for(&req.secrets, &volume)?;
        let (digest, index) = self
            .resolve_volume(&volume, &req.volume_context, &registry)
            .await?;
        // A dead mount from an earlier life is detached before mounting again.
        if is_mounted(&target) {
            let _ = unmount_path(&target);
        }
        let store = self.store_for(digest, index, &registry, &volume, true)?;
        let secrets = Secrets(req.secrets.clone().into_iter().collect());
        let mounted = match self.mount_at(store, &target, &volume, &secrets) {
            Ok(m) => m,
            Err(e) => {
                self.release_image(&digest);
                return Err(e);
            }
        };
        let record = VolumeRecord {
            volume_id: volume.clone(),
            target_path: target.clone(),
            source: match (
                req.volume_context.get(ATTR_CLIP_IMAGE),
                req.volume_context.get(ATTR_IMAGE),
            ) {
                (Some(n), _) => format!(
                    "clipImage {}/{n}",
                    req.volume_context
                        .get(POD_NAMESPACE)
                        .map_or("default", String::as_str)
                ),
                (_, Some(i)) => format!("image {i}"),
                _ => String::new(),
            },
            fingerprint,
            index_digest: digest.to_string(),
            pod_namespace: req
                .volume_context
                .get(POD_NAMESPACE)
                .cloned()
                .unwrap_or_default(),
            pod_name: req
                .volume_context
                .get(POD_NAME)
                .cloned()
                .unwrap_or_default(),
        };
        if let Err(e) = lock(&self.table).insert(record) {
            self.release_kept(&volume);
            let _ = mounted.unmount();
            self.release_image(&digest);
            return Err(CsiError::Internal(format!(
                "volume {volume}: saving the mount table: {e}"
            )));
        }
        self.activate(&volume, mounted, digest, secrets);
        info!(target = %target.display(), index = %digest, "published");
        Ok(())
    }

    /// Unpublishes a volume; unknown volumes and unmounted targets succeed.
    pub async fn unpublish(&self, req: NodeUnpublishVolumeRequest) -> Result<(), CsiError> {
        let volume = req.volume_id.clone();
        if volume.is_empty() {
            return Err(CsiError::InvalidArgument("volume_id is required".into()));
        }
        if req.target_path.is_empty() {
            return Err(CsiError::InvalidArgument(format!(
                "volume {volume}: target_path is required"
            )));
        }
        let target = PathBuf::from(&req.target_path);
        let _guard = self.begin(&volume)?;
        let active = lock(&self.active).remove(&volume);
        if let Some(a) = active {
            if let Some(m) = a.mount {
                // A live session ends cleanly; a wedged one is detached below.
                let handle = tokio::task::spawn_blocking(move || m.unmount());
                if tokio::time::timeout(Duration::from_secs(10), handle)
                    .await
                    .is_err()
                {
                    warn!("unmount did not finish; detaching");
                }
            }
            self.release_image(&a.index_digest);
        }
        if is_mounted(&target) {
            unmount_path(&target).map_err(|e| {
                CsiError::Internal(format!(
                    "volume {volume}: unmounting {}: {e}",
                    target.display()
                ))
            })?;
        }
        // The target directory is ours to remove (kubelet created its parent).
        match std::fs::remove_dir(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(target = %target.display(), error = %e, "removing the target directory failed")
            }
        }
        self.release_kept(&volume);
        let _ = std::fs::remove_file(self.backing_record(&volume));
        lock(&self.table).remove(&volume).map_err(|e| {
            CsiError::Internal(format!("volume {volume}: saving the mount table: {e}"))
        })?;
        info!(target = %target.display(), "unpublished");
        Ok(())
    }

    /// Usage of a published volume and whether its mount is healthy.
    pub async fn volume_stats(
        &self,
        req: NodeGetVolumeStatsRequest,
    ) -> Result<NodeGetVolumeStatsResponse, CsiError> {
        let volume = req.volume_id.clone();
        if volume.is_empty() || req.volume_path.is_empty() {
            return Err(CsiError::InvalidArgument(
                "volume_id and volume_path are required".into(),
            ));
        }
        let record = lock(&self.table).get(&volume).cloned().ok_or_else(|| {
            CsiError::NotFound(format!("volume {volume} is not published on this node"))
        })?;
        let path = PathBuf::from(&req.volume_path);
        if path != record.target_path {
            return Err(CsiError::NotFound(format!(
                "volume {volume} is not published at {}",
                path.display()
            )));
        }
        let serving = lock(&self.active)
            .get(&volume)
            .and_then(|a| a.mount.as_ref().map(|m| m.serving()));
        let served = serving.is_some();
        // A mount this process serves is asked of its own state, not probed (a request to
        // itself; see `fs::Mount::serving`); one it does not serve is not probed either when
        // a keeper may hold it for the next server (the probe would wait).
        let probe = if let Some(serving) = serving {
            if serving {
                Ok(())
            } else {
                Err(std::io::Error::other("its server session has ended"))
            }
        } else if self.keeper.get().is_some() {
            Ok(())
        } else {
            crate::fs::mount_responds(&path)
        };
        let condition = match probe {
            Ok(()) if served && is_mounted(&path) => VolumeCondition {
                abnormal: false,
                message: "mounted and serving".into(),
            },
            Ok(_) => VolumeCondition {
                abnormal: true,
                message: format!(
                    "{} is not served by this plugin (dead, or waiting to be handed over)",
                    path.display()
                ),
            },
            Err(e) => VolumeCondition {
                abnormal: true,
                message: format!("{} is not usable: {e}", path.display()),
            },
        };
        let digest: Option<Digest> = record.index_digest.parse().ok();
        let stats =
            digest.and_then(|d| lock(&self.images).get(&d).map(|e| e.store.index().stats()));
        let (bytes, inodes) = stats.map_or((0, 0), |s| (s.file_bytes as i64, s.inodes as i64));
        Ok(NodeGetVolumeStatsResponse {
            usage: vec![
                VolumeUsage {
                    available: 0,
                    total: bytes,
                    used: bytes,
                    unit: Unit::Bytes as i32,
                },
                VolumeUsage {
                    available: 0,
                    total: inodes,
                    used: inodes,
                    unit: Unit::Inodes as i32,
                },
            ],
            volume_condition: Some(condition),
        })
    }

    /// Takes over, or mounts again, the volumes of the previous process: those a keeper
    /// held are served on their live connections (their readers never notice); the others
    /// died with that process and are mounted again (when configured).
    pub async fn restore(self: &Arc<Self>) {
        let mut adopted: HashMap<String, Adopted> = HashMap::new();
        let mut elsewhere: HashSet<String> = HashSet::new();
        // A keeper is configured but not reached yet: a mount still at its target may be one
        // it holds, to be handed over once it answers; mounting over it would break its pod.
        let mut keeper_pending = self.config.keeper_socket.is_some();
        if let Some(path) = self.config.keeper_socket.clone() {
            if !crate::fs::kernel_resends() {
                warn!(
                    "this kernel is older than Linux 6.9: a read in progress when this plugin crashes is not sent again to the next one and waits until interrupted (a stopped plugin answers its reads first)"
                );
            }
            let started = tokio::task::spawn_blocking(move || KeeperClient::start(&path)).await;
            match started {
                Ok(Ok((client, welcome, events))) => {
                    let _ = self.keeper.set(client);
                    if let Some(w) = welcome {
                        keeper_pending = false;
                        elsewhere.extend(w.held_elsewhere);
                        adopted.extend(w.adopted.into_iter().map(|a| (a.volume.clone(), a)));
                    }
                    let ctx = self.clone();
                    tokio::spawn(async move { ctx.keeper_events(events).await });
                }
                Ok(Err(e)) => warn!(error = %e, "cannot start the keeper client"),
                Err(e) => warn!(error = %e, "cannot start the keeper client"),
            }
        }
        let records = lock(&self.table).records();
        for rec in records {
            let span = info_span!("restore", volume_id = %rec.volume_id, pod = %format!("{}/{}", rec.pod_namespace, rec.pod_name));
            async {
                if let Some(a) = adopted.remove(&rec.volume_id)
                    && self.take_over(&rec, a).await
                {
                    return;
                }
                if elsewhere.contains(&rec.volume_id) {
                    info!("still served by the previous plugin; taken over when it exits");
                    return;
                }
                if keeper_pending && is_mounted(&rec.target_path) {
                    info!("the keeper is not reachable yet and may hold this mount; left for it");
                    return;
                }
                if !self.config.reserve_on_start {
                    info!("volume from the previous process left as is (re-serving is off)");
                    return;
                }
                self.remount(&rec).await;
            }
            .instrument(span)
            .await;
        }
        for volume in adopted.into_keys() {
            info!(volume_id = %volume, "the keeper held a volume this node no longer publishes; released");
            self.release_kept(&volume);
        }
    }

    /// Hand-overs after start (the previous plugin exited later than this one started) and
    /// a keeper reached again.
    async fn keeper_events(
        self: Arc<Self>,
        mut events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    ) {
        while let Some(ev) = events.recv().await {
            match ev {
                Event::Adopt(a) => self.adopt(a).await,
                Event::Reconnected(Welcome {
                    adopted,
                    held_elsewhere,
                }) => {
                    for a in adopted {
                        self.adopt(a).await;
                    }
                    // Volumes left at start for a keeper that could not be reached: those it
                    // did not hand over now are dead mounts, mounted again as at start.
                    if self.config.reserve_on_start {
                        let records = lock(&self.table).records();
                        for rec in records {
                            let served = lock(&self.active)
                                .get(&rec.volume_id)
                                .is_some_and(|a| a.mount.is_some());
                            if served || held_elsewhere.contains(&rec.volume_id) {
                                continue;
                            }
                            let Ok(_guard) = self.begin(&rec.volume_id) else {
                                continue;
                            };
                            let span = info_span!("restore", volume_id = %rec.volume_id);
                            self.remount(&rec).instrument(span).await;
                        }
                    }
                    // A restarted keeper holds nothing: give it every mount again.
                    // (Collected first: the keeper is not written to under the table's lock.)
                    type Served = (
                        String,
                        std::io::Result<std::os::fd::OwnedFd>,
                        PathBuf,
                        Secrets,
                    );
                    let served: Vec<Served> = lock(&self.active)
                        .iter()
                        .filter_map(|(v, a)| {
                            a.mount.as_ref().map(|m| {
                                (v.clone(), m.device(), m.dir().to_owned(), a.secrets.clone())
                            })
                        })
                        .collect();
                    for (volume, fd, dir, secrets) in served {
                        self.give_keeper(&volume, fd, &dir, &secrets);
                    }
                }
            }
        }
    }

    async fn adopt(&self, a: Adopted) {
        let volume = a.volume.clone();
        let span = info_span!("adopt", volume_id = %volume);
        async {
            let Ok(_guard) = self.begin(&volume) else {
                // A publish or unpublish of the volume is running; it decides. Dropping the
                // descriptor keeps the keeper's newer one, if any.
                info!("the volume is busy; the handed-over descriptor is dropped");
                return;
            };
            let rec = lock(&self.table).get(&volume).cloned();
            let served = lock(&self.active)
                .get(&volume)
                .is_some_and(|x| x.mount.is_some());
            match rec {
                // Already served here: what the keeper holds is this process's own newer
                // descriptor (a Release would drop it); this stale one is just closed.
                Some(_) if served => {
                    info!("already served here; the handed-over descriptor is dropped")
                }
                Some(rec) => {
                    if !self.take_over(&rec, a).await {
                        self.remount(&rec).await;
                    }
                }
                None => {
                    info!("handed a volume this plugin does not publish; released");
                    self.release_kept(&volume);
                }
            }
        }
        .instrument(span)
        .await;
    }

    /// Records `mount` as `volume`'s, releasing the image of whatever it replaces.
    fn activate(&self, volume: &str, mount: Mount, digest: Digest, secrets: Secrets) {
        let previous = lock(&self.active).insert(
            volume.to_owned(),
            Active {
                mount: Some(mount),
                index_digest: digest,
                secrets,
            },
        );
        if let Some(p) = previous {
            self.release_image(&p.index_digest);
        }
    }

    /// The index digest and chunk store for serving `rec` again (taken over or mounted
    /// again), reading the registry with the pull `secrets` it was published with.
    async fn record_store(
        &self,
        rec: &VolumeRecord,
        secrets: &Secrets,
    ) -> Result<(Digest, Arc<ChunkStore<RegistryBlobs>>), String> {
        let digest = rec
            .index_digest
            .parse::<Digest>()
            .map_err(|_| "bad index digest in the mount table".to_owned())?;
        let index = self
            .load_index(&digest, &rec.volume_id)
            .await
            .map_err(|e| format!("index unavailable: {e}"))?;
        let secrets: HashMap<String, String> = secrets.0.clone().into_iter().collect();
        let registry = match self.registry_for(&secrets, &rec.volume_id) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "the kept pull secrets are unusable; reading without them");
                RegistryClient::new(self.config.registry.clone())
            }
        };
        let store = self
            .store_for(digest, index, &registry, &rec.volume_id, false)
            .map_err(|e| e.to_string())?;
        Ok((digest, store))
    }

    /// Serves a kept connection of `rec`'s mount. False (and the keeper told to release it)
    /// when it cannot: the mount at the target is another one now, or the index is gone.
    async fn take_over(&self, rec: &VolumeRecord, a: Adopted) -> bool {
        let here = mounted_device(&rec.target_path);
        if here.is_none() || (a.device != 0 && here != Some(a.device)) {
            warn!(target = %rec.target_path.display(), "the kept connection is not the mount at the target any more; released");
            self.release_kept(&rec.volume_id);
            return false;
        }
        let (digest, store) = match self.record_store(rec, &a.secrets).await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "cannot take over");
                self.release_kept(&rec.volume_id);
                return false;
            }
        };
        let options = self.mount_options(&store, &rec.volume_id);
        let scratch = self.config.state_dir.join("handover");
        match resume(
            store,
            &rec.target_path,
            a.fd,
            &scratch,
            &options,
            self.runtime.clone(),
        ) {
            Ok(m) => {
                self.activate(&rec.volume_id, m, digest, a.secrets);
                info!(target = %rec.target_path.display(), "took over the live mount");
                true
            }
            Err(e) => {
                self.release_image(&digest);
                warn!(error = %e, "cannot take over the live mount");
                self.release_kept(&rec.volume_id);
                false
            }
        }
    }

    /// Mounts `rec` again after its mount died with the previous process.
    async fn remount(&self, rec: &VolumeRecord) {
        // None when already ours (an adoption that fell back here holds it).
        let _guard = self.begin(&rec.volume_id).ok();
        // Its pull secrets died with the previous process (the table on disk keeps none).
        let (digest, store) = match self.record_store(rec, &Secrets::default()).await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "cannot re-serve");
                return;
            }
        };
        if is_mounted(&rec.target_path) {
            let _ = unmount_path(&rec.target_path);
        }
        match self.mount_at(store, &rec.target_path, &rec.volume_id, &Secrets::default()) {
            Ok(m) => {
                self.activate(&rec.volume_id, m, digest, Secrets::default());
                info!(target = %rec.target_path.display(), "re-served after restart");
            }
            Err(e) => {
                self.release_image(&digest);
                warn!(error = %e, "cannot re-serve");
            }
        }
    }

    /// Prometheus text for every image served and every volume: each image's store, the
    /// requests each volume's filesystem had from the kernel, and what is published.
    pub fn metrics(&self) -> String {
        let mut parts = Vec::new();
        let images: Vec<(Digest, Arc<ChunkStore<RegistryBlobs>>, usize)> = lock(&self.images)
            .iter()
            .map(|(d, e)| (*d, e.store.clone(), e.refs))
            .collect();
        for (d, store, refs) in images {
            let src = &store.index().source;
            let labels = format!(
                "index=\"{d}\",image=\"{}@{}\"",
                src.repository, src.manifest_digest
            );
            parts.push(store.snapshot().to_prometheus(&labels));
            parts.push(format!(
                "# HELP clip_image_volumes Volumes published of an image.\n# TYPE clip_image_volumes gauge\nclip_image_volumes{{{labels}}} {refs}\n"
            ));
        }
        parts.push(format!(
            "# HELP clip_idle_indexes Decoded indexes of images no volume uses, kept in memory for their next publish.\n# TYPE clip_idle_indexes gauge\nclip_idle_indexes {}\n",
            self.idle.len()
        ));
        for (volume, a) in lock(&self.active).iter() {
            if let Some(m) = &a.mount {
                let labels = format!("volume_id=\"{volume}\",index=\"{}\"", a.index_digest);
                parts.push(m.counters().to_prometheus(&labels));
            }
        }
        let mut out = String::from(
            "# HELP clip_volume_info A published volume.\n# TYPE clip_volume_info gauge\n",
        );
        for r in lock(&self.table).records() {
            let alive = lock(&self.active)
                .get(&r.volume_id)
                .is_some_and(|a| a.mount.is_some());
            out.push_str(&format!(
                "clip_volume_info{{volume_id=\"{}\",pod_namespace=\"{}\",pod_name=\"{}\",index=\"{}\",serving=\"{alive}\"}} 1\n",
                r.volume_id, r.pod_namespace, r.pod_name, r.index_digest
            ));
        }
        parts.push(out);
        crate::metrics::merge(parts)
    }

    /// The pod and image of a published volume, for log lines.
    pub fn describe(&self, volume: &str) -> (String, String) {
        lock(&self.table)
            .get(volume)
            .map_or_else(Default::default, |r| {
                (
                    format!("{}/{}", r.pod_namespace, r.pod_name),
                    r.source.clone(),
                )
            })
    }

    /// On shutdown: leaves every served volume to the keeper when one holds them, so that
    /// the next plugin takes them over; otherwise unmounts them. The table is kept for the
    /// next start either way. True when mounts were left: the process must then end at once
    /// (`std::process::exit`), since dropping a read in progress would answer it with EIO,
    /// while a process that just ends leaves it to the kernel to send again to the next.
    pub fn shutdown(&self) -> bool {
        let active: Vec<(String, Active)> = lock(&self.active).drain().collect();
        let keeper = self.keeper.get().is_some_and(|k| k.connected());
        // Reads in progress are sent again to the next plugin by Linux 6.9 and later; on an
        // older kernel they are answered first, as far as they finish within the drain time.
        let drain = if crate::fs::kernel_resends() {
            Duration::ZERO
        } else {
            Duration::from_secs(10)
        };
        if keeper {
            info!(
                volumes = active.len(),
                drain_secs = drain.as_secs(),
                "leaving the mounts to the keeper for the next plugin"
            );
        }
        for (_, a) in active {
            if let Some(m) = a.mount {
                if keeper {
                    m.leave(drain);
                } else {
                    let _ = m.unmount();
                }
            }
        }
        keeper
    }
}

/// The gRPC face of the node context.
#[derive(Debug, Clone)]
pub struct NodeService {
    ctx: Arc<NodeContext>,
}

impl NodeService {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        Self { ctx }
    }
}

fn pod_of(ctx: &HashMap<String, String>) -> String {
    match (ctx.get(POD_NAMESPACE), ctx.get(POD_NAME)) {
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        _ => String::new(),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        _req: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "clip does not stage volumes (no STAGE_UNSTAGE_VOLUME capability)",
        ))
    }

    async fn node_unstage_volume(
        &self,
        _req: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "clip does not stage volumes (no STAGE_UNSTAGE_VOLUME capability)",
        ))
    }

    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let image = req
            .volume_context
            .get(ATTR_CLIP_IMAGE)
            .or_else(|| req.volume_context.get(ATTR_IMAGE))
            .cloned()
            .unwrap_or_default();
        let span = info_span!("NodePublishVolume", volume_id = %req.volume_id, pod = %pod_of(&req.volume_context), image = %image);
        let result = self.ctx.publish(req).instrument(span.clone()).await;
        if let Err(e) = &result {
            span.in_scope(|| warn!(code = ?e.code(), error = %e, "publish failed"));
        }
        result
            .map(|()| Response::new(NodePublishVolumeResponse {}))
            .map_err(Into::into)
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let (pod, image) = self.ctx.describe(&req.volume_id);
        let span = info_span!("NodeUnpublishVolume", volume_id = %req.volume_id, pod = %pod, image = %image);
        let result = self.ctx.unpublish(req).instrument(span.clone()).await;
        if let Err(e) = &result {
            span.in_scope(|| warn!(code = ?e.code(), error = %e, "unpublish failed"));
        }
        result
            .map(|()| Response::new(NodeUnpublishVolumeResponse {}))
            .map_err(Into::into)
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = req.into_inner();
        let (pod, image) = self.ctx.describe(&req.volume_id);
        let span = info_span!("NodeGetVolumeStats", volume_id = %req.volume_id, pod = %pod, image = %image);
        self.ctx
            .volume_stats(req)
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(Into::into)
    }

    async fn node_expand_volume(
        &self,
        _req: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "clip volumes are read-only images and cannot be expanded",
        ))
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let cap = |t: rpc::Type| NodeServiceCapability {
            r#type: Some(node_service_capability::Type::Rpc(Rpc { r#type: t as i32 })),
        };
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: vec![
                cap(rpc::Type::GetVolumeStats),
                cap(rpc::Type::VolumeCondition),
            ],
        }))
    }

    async fn node_get_info(
        &self,
        _req: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.ctx.config.node_id.clone(),
            max_volumes_per_node: self.ctx.config.max_volumes,
            accessible_topology: None,
        }))
    }
}
