//! Reconciling a ClipImage: resolve the reference, build the index once (shared by every
//! ClipImage of the same digest), publish it to Redis, optionally warm Redis with every
//! chunk, and report progress and the outcome in the status.
//!
//! Builds run as background jobs so a reconcile never blocks for minutes: it starts or
//! joins the job for the resolved digest, writes progress, and asks to be called again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clip_api::{ClipImage, ClipImageStatus, Phase, Progress as StatusProgress};
use clip_index::Digest;
use clip_storage::cache::ChunkCache;
use clip_storage::cache::redis::RedisCache;
use clip_storage::{
    ChunkStore, DockerConfig, Platform, Progress, RegistryClient, RegistryConfig, ResolvedImage,
    StoreConfig,
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalized, finalizer};
use kube::{Resource, ResourceExt};
use tokio::sync::{Semaphore, watch};
use tracing::{info, instrument, warn};

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::status;

pub const FINALIZER: &str = "clip.dev/index";

/// How a finished build went.
#[derive(Debug, Clone)]
pub enum BuildOutcome {
    Done(BuiltIndex),
    /// The image cannot be indexed as it is (corrupt, unsupported): do not retry soon.
    Permanent(String),
    /// The registry or Redis failed; a later reconcile starts a new build.
    Transient(String),
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct BuiltIndex {
    pub digest: Digest,
    pub size: u64,
    pub stats: clip_index::IndexStats,
}

/// A build in progress, shared by every ClipImage of the same manifest digest.
struct Job {
    progress: Arc<Progress>,
    result: watch::Receiver<Option<BuildOutcome>>,
    cancel: watch::Sender<bool>,
    interested: HashSet<String>,
    /// Whether a ClipImage that joined wants Redis warmed; read once the index is published.
    warm: Arc<AtomicBool>,
}

/// What every reconcile shares.
pub struct Context {
    pub client: kube::Client,
    pub redis: Arc<RedisCache>,
    pub registry: RegistryConfig,
    /// Bounds concurrent index builds across ClipImages.
    pub builds: Arc<Semaphore>,
    /// How often a Ready ClipImage is checked again (moved tags, flushed Redis).
    pub resync: Duration,
    /// How often progress is written while indexing.
    pub progress_interval: Duration,
    pub default_platform: Option<Platform>,
    pub metrics: Arc<Metrics>,
    pub reporter: Reporter,
    jobs: Mutex<HashMap<Digest, Job>>,
    /// Builds whose outcome has been taken out of `jobs` (counted under its lock).
    finished_builds: AtomicU64,
    /// Consecutive transient failures per ClipImage, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(
        client: kube::Client,
        redis: Arc<RedisCache>,
        registry: RegistryConfig,
        max_builds: usize,
        resync: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            redis,
            registry,
            builds: Arc::new(Semaphore::new(max_builds.max(1))),
            resync,
            progress_interval: Duration::from_secs(2),
            default_platform: None,
            metrics: Arc::default(),
            reporter: Reporter {
                controller: "clip-controller".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
            jobs: Mutex::new(HashMap::new()),
            finished_builds: AtomicU64::new(0),
            failures: Mutex::new(HashMap::new()),
        })
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of builds in flight (for tests and metrics).
    pub fn running_builds(&self) -> usize {
        self.jobs().len()
    }

    /// Drops `key`'s interest in every job; jobs nobody wants any more are cancelled.
    fn forget(&self, key: &str) {
        Self::leave(&mut self.jobs(), key, None);
    }

    /// Drops `key`'s interest in every job but `keep`'s (a spec change away from a digest);
    /// jobs nobody wants any more are cancelled.
    fn leave(jobs: &mut HashMap<Digest, Job>, key: &str, keep: Option<&Digest>) {
        jobs.retain(|d, j| {
            if Some(d) != keep {
                j.interested.remove(key);
            }
            if j.interested.is_empty() {
                let _ = j.cancel.send(true);
                false
            } else {
                true
            }
        });
    }

    /// Leaves `key`'s other builds and joins the build of `manifest`, if there is one
    /// (asking it to warm Redis too when `warm`).
    fn join_build(
        &self,
        manifest: &Digest,
        key: &str,
        warm: bool,
    ) -> Option<(Arc<Progress>, watch::Receiver<Option<BuildOutcome>>)> {
        let mut jobs = self.jobs();
        Self::leave(&mut jobs, key, Some(manifest));
        let job = jobs.get_mut(manifest)?;
        job.interested.insert(key.to_owned());
        if warm {
            job.warm.store(true, Ordering::SeqCst);
        }
        Some((job.progress.clone(), job.result.clone()))
    }
}

fn key_of(ci: &ClipImage) -> Result<(String, String)> {
    Ok((
        ci.namespace().ok_or(Error::Unnamed)?,
        ci.metadata.name.clone().ok_or(Error::Unnamed)?,
    ))
}

/// The entry point the kube runtime calls.
#[instrument(skip_all, fields(clip_image = %ci.name_any(), image = %ci.spec.image))]
pub async fn reconcile(ci: Arc<ClipImage>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics
        .reconciles
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (ns, _) = key_of(&ci)?;
    let api: Api<ClipImage> = Api::namespaced(ctx.client.clone(), &ns);
    let c = ctx.clone();
    finalizer(&api, FINALIZER, ci, |event| async move {
        match event {
            Finalized::Apply(ci) => apply(ci, c).await,
            Finalized::Cleanup(ci) => cleanup(ci, c).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

/// Retries transient failures with exponential backoff per object: 5 s, 10 s, 20 s ... up
/// to 5 minutes; a successful reconcile resets it.
pub fn error_policy(ci: Arc<ClipImage>, e: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failure(e.metric_label());
    let delay = backoff(&ctx, &ci.name_any(), ci.namespace().as_deref());
    warn!(error = %e, retry_in_s = delay.as_secs(), "reconcile failed; retrying");
    Action::requeue(delay)
}

/// The next retry delay for an object, doubling with each consecutive failure.
pub fn backoff(ctx: &Context, name: &str, namespace: Option<&str>) -> Duration {
    let key = format!("{}/{name}", namespace.unwrap_or_default());
    let mut f = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
    let n = f.entry(key).or_default();
    *n = n.saturating_add(1);
    Duration::from_secs(5u64.saturating_mul(1 << (*n - 1).min(6)).min(300))
}

fn reset_backoff(ctx: &Context, key: &str) {
    ctx.failures
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(key);
}

async fn event(ctx: &Context, ci: &ClipImage, type_: EventType, reason: &str, note: String) {
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Index".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, &ci.object_ref(&())).await {
        warn!(error = %e, "publishing an event failed");
    }
}

/// Records a permanent failure: status Failed with the reason, an Event, a slow requeue.
async fn fail(
    ctx: &Context,
    ci: &ClipImage,
    api: &Api<ClipImage>,
    reason: &str,
    message: String,
) -> Result<Action> {
    let (_, name) = key_of(ci)?;
    let mut st = ci.status.clone().unwrap_or_default();
    let changed = st.phase != Some(Phase::Failed)
        || ci.ready_condition().map(|c| c.message.as_str()) != Some(message.as_str());
    st.phase = Some(Phase::Failed);
    st.progress = None;
    st.observed_generation = ci.metadata.generation;
    st.conditions = vec![status::ready_condition(
        ci.ready_condition(),
        Phase::Failed,
        reason,
        &message,
        ci.metadata.generation,
    )];
    status::apply(api, &name, &st).await?;
    ctx.metrics.failure(reason);
    if changed {
        event(ctx, ci, EventType::Warning, reason, message.clone()).await;
        warn!(reason, %message, "ClipImage failed");
    }
    Ok(Action::requeue(ctx.resync))
}

/// Reads the pull secrets the spec names; a missing one is a clear, permanent error.
async fn pull_credentials(
    ctx: &Context,
    ns: &str,
    names: &[String],
) -> std::result::Result<DockerConfig, String> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut merged = DockerConfig::default();
    for name in names {
        let secret = match secrets.get_opt(name).await {
            Ok(Some(s)) => s,
            Ok(None) => return Err(format!("pull secret {ns}/{name} not found")),
            Err(e) => return Err(format!("reading pull secret {ns}/{name}: {e}")),
        };
        let data = secret.data.unwrap_or_default();
        let Some(bytes) = data
            .get(".dockerconfigjson")
            .or_else(|| data.get(".dockercfg"))
        else {
            return Err(format!(
                "pull secret {ns}/{name} has no .dockerconfigjson (type kubernetes.io/dockerconfigjson expected)"
            ));
        };
        let parsed = DockerConfig::parse(&bytes.0, &format!("pull secret {ns}/{name}"))
            .map_err(|e| e.to_string())?;
        merged.merge(parsed);
    }
    Ok(merged)
}

fn permanent(e: &clip_storage::Error) -> Option<&'static str> {
    use clip_storage::Error as E;
    match e {
        E::NotFound { .. } => Some("ImageNotFound"),
        E::Unauthorized { .. } | E::Credentials { .. } => Some("Unauthorized"),
        E::Reference { .. } | E::Platform(_) => Some("InvalidReference"),
        E::NoMatchingPlatform { .. } => Some("NoMatchingPlatform"),
        E::Manifest { .. } => Some("UnsupportedImage"),
        E::IndexLayer { .. } | E::Index(_) => Some("IndexFailed"),
        E::Shared(inner) => permanent(inner),
        _ => None,
    }
}

async fn apply(ci: Arc<ClipImage>, ctx: Arc<Context>) -> Result<Action> {
    let (ns, name) = key_of(&ci)?;
    let key = format!("{ns}/{name}");
    let action = apply_inner(&ci, &ctx, &ns, &name, &key).await?;
    reset_backoff(&ctx, &key);
    Ok(action)
}

async fn apply_inner(
    ci: &Arc<ClipImage>,
    ctx: &Arc<Context>,
    ns: &str,
    name: &str,
    key: &str,
) -> Result<Action> {
    let api: Api<ClipImage> = Api::namespaced(ctx.client.clone(), ns);
    let generation = ci.metadata.generation;
    let mut st = ci.status.clone().unwrap_or_default();
    let ready_now = st.phase == Some(Phase::Ready) && st.observed_generation == generation;
    if !ready_now && st.phase != Some(Phase::Indexing) && st.phase != Some(Phase::Resolving) {
        st.phase = Some(Phase::Resolving);
        st.observed_generation = generation;
        st.conditions = vec![status::ready_condition(
            ci.ready_condition(),
            Phase::Resolving,
            "Resolving",
            "resolving the image reference",
            generation,
        )];
        status::apply(&api, name, &st).await?;
    }

    let docker = match pull_credentials(ctx, ns, &ci.spec.pull_secrets).await {
        Ok(d) => d,
        Err(message) => return fail(ctx, ci, &api, "PullSecret", message).await,
    };
    let mut registry_config = ctx.registry.clone();
    registry_config.docker_config.merge(docker);
    let registry = RegistryClient::new(registry_config);
    let platform = match ci
        .spec
        .platform
        .as_deref()
        .map(str::parse::<Platform>)
        .transpose()
    {
        Ok(p) => p.or_else(|| ctx.default_platform.clone()),
        Err(e) => return fail(ctx, ci, &api, "InvalidPlatform", e.to_string()).await,
    };
    let resolved = match registry.resolve(&ci.spec.image, platform.as_ref()).await {
        Ok(r) => r,
        Err(e) => match permanent(&e) {
            Some(reason) => return fail(ctx, ci, &api, reason, e.to_string()).await,
            None => return Err(e.into()),
        },
    };
    let manifest = resolved.manifest_digest;

    // Already Ready for this digest, and the index is still in Redis: nothing to do.
    if ready_now
        && st.resolved_digest.as_deref() == Some(manifest.to_string().as_str())
        && let Some(d) = st
            .index_digest
            .as_deref()
            .and_then(|d| d.parse::<Digest>().ok())
        && ctx.redis.has_index(&d).await?
    {
        return Ok(Action::requeue(ctx.resync));
    }

    let (progress, mut result) = loop {
        let finished = ctx.finished_builds.load(Ordering::SeqCst);
        // A build of this digest that is under way (or done, its outcome not yet taken) is
        // joined before Redis is asked: it publishes the index before it warms Redis, and
        // its outcome says when it is done with both.
        if let Some(joined) = ctx.join_build(&manifest, key, ci.spec.warm) {
            break joined;
        }
        // Indexed before (by another ClipImage, or by us before a restart): reuse it, once
        // Redis holds every chunk if this ClipImage asks for that (else a job warms it).
        if let Some(d) = ctx.redis.index_for_manifest(&manifest).await?
            && ctx.redis.has_index(&d).await?
            && (!ci.spec.warm || ctx.redis.is_warm(&d).await?)
        {
            let bytes = ctx.redis.fetch_index(&d).await?;
            let index = clip_index::decode(&bytes)?;
            let built = BuiltIndex {
                digest: d,
                size: bytes.len() as u64,
                stats: index.stats(),
            };
            return ready(ctx, ci, &api, &resolved, &built, key).await;
        }

        // Start the build of this digest.
        let mut jobs = ctx.jobs();
        // Another reconcile started one since we looked (join it), or a build of it ended
        // and published its index (ask Redis again rather than build the image twice).
        if jobs.contains_key(&manifest) || ctx.finished_builds.load(Ordering::SeqCst) != finished {
            continue;
        }
        let job = jobs
            .entry(manifest)
            .or_insert_with(|| start_build(ctx, resolved.clone(), registry.clone(), ci.spec.warm));
        if ci.spec.warm {
            job.warm.store(true, Ordering::SeqCst);
        }
        job.interested.insert(key.to_owned());
        break (job.progress.clone(), job.result.clone());
    };
    let outcome = {
        let waited =
            tokio::time::timeout(ctx.progress_interval, result.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(v)) => v.clone(),
            _ => None,
        }
    };
    match outcome {
        None => {
            let (done, total) = progress.bytes();
            st.phase = Some(Phase::Indexing);
            st.resolved_digest = Some(manifest.to_string());
            st.platform = Some(resolved.platform.to_string());
            st.layers = Some(resolved.layers.len() as u32);
            st.compressed_size = Some(resolved.compressed_size());
            st.progress = Some(StatusProgress {
                bytes_done: done,
                bytes_total: total,
            });
            st.observed_generation = generation;
            let pct = (100 * done).checked_div(total).unwrap_or(0);
            st.conditions = vec![status::ready_condition(
                ci.ready_condition(),
                Phase::Indexing,
                "Indexing",
                &format!("indexing {manifest}: {pct}%"),
                generation,
            )];
            status::apply(&api, name, &st).await?;
            Ok(Action::requeue(Duration::from_millis(100)))
        }
        Some(outcome) => {
            {
                // Each ClipImage that joined the build may get its outcome: the first takes
                // the job out, a later one must not take out a newer build of the digest.
                let mut jobs = ctx.jobs();
                if jobs
                    .get(&manifest)
                    .is_some_and(|j| j.result.borrow().is_some())
                {
                    jobs.remove(&manifest);
                }
                ctx.finished_builds.fetch_add(1, Ordering::SeqCst);
            }
            match outcome {
                // Joined a build that had decided not to warm before we asked: the next
                // reconcile starts a job that only warms.
                BuildOutcome::Done(built)
                    if ci.spec.warm && !ctx.redis.is_warm(&built.digest).await? =>
                {
                    Ok(Action::requeue(Duration::from_millis(100)))
                }
                BuildOutcome::Done(built) => ready(ctx, ci, &api, &resolved, &built, key).await,
                BuildOutcome::Permanent(m) => fail(ctx, ci, &api, "IndexFailed", m).await,
                BuildOutcome::Transient(m) => {
                    ctx.metrics.failure("build_transient");
                    let delay = backoff(ctx, name, Some(ns));
                    warn!(message = %m, retry_in_s = delay.as_secs(), "index build failed; will retry");
                    Ok(Action::requeue(delay))
                }
                BuildOutcome::Cancelled => Ok(Action::requeue(Duration::from_secs(1))),
            }
        }
    }
}

async fn ready(
    ctx: &Context,
    ci: &ClipImage,
    api: &Api<ClipImage>,
    resolved: &ResolvedImage,
    built: &BuiltIndex,
    key: &str,
) -> Result<Action> {
    let (_, name) = key_of(ci)?;
    ctx.redis.add_index_owner(&built.digest, key).await?;
    let previous = ci.status.clone().unwrap_or_default();
    let st = ClipImageStatus {
        phase: Some(Phase::Ready),
        resolved_digest: Some(resolved.manifest_digest.to_string()),
        index_digest: Some(built.digest.to_string()),
        index_size: Some(built.size),
        platform: Some(resolved.platform.to_string()),
        layers: Some(built.stats.layers as u32),
        files: Some(built.stats.files as u64),
        compressed_size: Some(built.stats.compressed_size),
        uncompressed_size: Some(built.stats.uncompressed_size),
        progress: None,
        conditions: vec![status::ready_condition(
            ci.ready_condition(),
            Phase::Ready,
            "Indexed",
            &format!(
                "index {} published ({} files)",
                built.digest, built.stats.files
            ),
            ci.metadata.generation,
        )],
        observed_generation: ci.metadata.generation,
        last_indexed: if previous.index_digest.as_deref() == Some(built.digest.to_string().as_str())
        {
            previous
                .last_indexed
                .clone()
                .or_else(|| Some(status::now()))
        } else {
            Some(status::now())
        },
    };
    status::apply(api, &name, &st).await?;
    if previous.phase != Some(Phase::Ready) || previous.index_digest != st.index_digest {
        event(
            ctx,
            ci,
            EventType::Normal,
            "Indexed",
            format!("{} is ready as index {}", ci.spec.image, built.digest),
        )
        .await;
        info!(index = %built.digest, "ClipImage ready");
    }
    // Release the previous index if the tag moved.
    if let Some(old) = previous
        .index_digest
        .as_deref()
        .and_then(|d| d.parse::<Digest>().ok())
        && old != built.digest
    {
        let old_manifest = previous
            .resolved_digest
            .as_deref()
            .and_then(|d| d.parse::<Digest>().ok());
        if let Err(e) = ctx
            .redis
            .release_index(&old, key, old_manifest.as_ref())
            .await
        {
            warn!(error = %e, "releasing the previous index failed");
        }
    }
    Ok(Action::requeue(ctx.resync))
}

fn start_build(
    ctx: &Arc<Context>,
    resolved: ResolvedImage,
    registry: RegistryClient,
    warm: bool,
) -> Job {
    let progress = Arc::new(Progress::default());
    let (tx, rx) = watch::channel(None);
    let (cancel_tx, mut cancel_rx) = watch::channel(false);
    let ctx = ctx.clone();
    let p = progress.clone();
    let warm = Arc::new(AtomicBool::new(warm));
    let wants_warm = warm.clone();
    tokio::spawn(async move {
        let work = async {
            let _permit = ctx
                .builds
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| clip_storage::Error::Task(e.to_string()))?;
            // Indexed already (a job that only warms): reuse the published index.
            let published = match ctx
                .redis
                .index_for_manifest(&resolved.manifest_digest)
                .await?
            {
                Some(d) if ctx.redis.has_index(&d).await? => {
                    let bytes = ctx.redis.fetch_index(&d).await?;
                    Some((clip_index::decode(&bytes)?, d, bytes.len()))
                }
                _ => None,
            };
            let (index, digest, size) = match published {
                Some(p) => p,
                None => {
                    let started = Instant::now();
                    let index = clip_storage::build_index(
                        &registry,
                        &resolved,
                        clip_index::IndexOptions::default(),
                        std::thread::available_parallelism().map_or(2, |n| n.get()),
                        p.clone(),
                    )
                    .await?;
                    let encoded = clip_index::encode(&index)?;
                    let digest = ctx
                        .redis
                        .publish_index(&encoded, Some(&resolved.manifest_digest))
                        .await?;
                    ctx.metrics
                        .build_done(started.elapsed(), resolved.compressed_size());
                    (index, digest, encoded.len())
                }
            };
            if wants_warm.load(Ordering::SeqCst) && !ctx.redis.is_warm(&digest).await? {
                let source =
                    registry.repository(&index.source.repository, &index.source.manifest_digest)?;
                let tiers: Vec<Arc<dyn ChunkCache>> = vec![ctx.redis.clone()];
                let store = ChunkStore::new(
                    Arc::new(index.clone()),
                    Arc::new(source),
                    tiers,
                    Some(ctx.redis.clone()),
                    StoreConfig::default(),
                );
                let n = store.prefetch_all(4).await?;
                ctx.redis.mark_warm(&digest).await?;
                info!(chunks = n, "warmed redis with every chunk");
            }
            Ok::<_, clip_storage::Error>(BuiltIndex {
                digest,
                size: size as u64,
                stats: index.stats(),
            })
        };
        let outcome = tokio::select! {
            r = work => match r {
                Ok(b) => BuildOutcome::Done(b),
                Err(e) => {
                    ctx.metrics.build_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    match permanent(&e) {
                        Some(_) => BuildOutcome::Permanent(e.to_string()),
                        None => BuildOutcome::Transient(e.to_string()),
                    }
                }
            },
            _ = cancel_rx.wait_for(|c| *c) => {
                info!("index build cancelled");
                BuildOutcome::Cancelled
            }
        };
        // The build's buffers are freed by now; without this the allocator keeps them and
        // the controller idles at its peak until the next build.
        release_freed_memory();
        let _ = tx.send(Some(outcome));
    });
    Job {
        progress,
        result: rx,
        cancel: cancel_tx,
        interested: HashSet::new(),
        warm,
    }
}

/// Gives the heap's free memory back to the system: glibc keeps what a build freed in its
/// per-thread arenas otherwise.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The object is being deleted: stop its builds and release its index.
async fn cleanup(ci: Arc<ClipImage>, ctx: Arc<Context>) -> Result<Action> {
    let (ns, name) = key_of(&ci)?;
    let key = format!("{ns}/{name}");
    ctx.forget(&key);
    if let Some(st) = &ci.status
        && let Some(d) = st
            .index_digest
            .as_deref()
            .and_then(|d| d.parse::<Digest>().ok())
    {
        let manifest = st
            .resolved_digest
            .as_deref()
            .and_then(|d| d.parse::<Digest>().ok());
        let left = ctx.redis.release_index(&d, &key, manifest.as_ref()).await?;
        info!(index = %d, owners_left = left, "released the index");
    }
    Ok(Action::await_change())
}
