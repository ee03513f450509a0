//! `clip mount IMAGE DIR` and `clip umount DIR`

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use clip_index::{ImageIndex, ImageSource};
use clip_storage::cache::ChunkCache;
use clip_storage::cache::disk::DiskCache;
use clip_storage::cache::redis::RedisCache;
use clip_storage::{ChunkStore, RegistryClient};
use tracing::info;

use super::{
    RegistryArgs, default_parallelism, human_bytes, load_index, load_whole_index, parse_size,
    read_index_file, read_whole_index_file,
};
use crate::error::{Error, Result};
use crate::fs::{MountOptions, Premount, is_mounted, mount, premount, serve, unmount_path};

#[derive(Debug, Args)]
pub struct MountArgs {
    /// An index file, or an image reference (indexed on first use, then kept in the cache).
    pub image: String,

    /// Where to mount (an existing empty directory).
    pub dir: PathBuf,

    /// Local chunk cache directory.
    #[arg(long, env = "CLIP_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Most bytes the chunk cache may hold on disk (e.g. 10GiB, 512MiB).
    #[arg(long, default_value = "10GiB", env = "CLIP_CACHE_SIZE")]
    pub cache_size: String,

    /// FUSE worker threads.
    #[arg(long, default_value_t = 8, env = "CLIP_FUSE_THREADS")]
    pub threads: usize,

    /// The kernel's read-ahead on the mount (0: the kernel's default of 128KiB).
    #[arg(long, default_value = "1MiB", env = "CLIP_KERNEL_READAHEAD")]
    pub kernel_readahead: String,

    /// Fetch the whole image into the cache in the background after mounting, at low
    /// priority: it waits while reads fetch.
    #[arg(long, env = "CLIP_PREFETCH")]
    pub prefetch: bool,

    /// Print per-tier statistics when the mount ends.
    #[arg(long)]
    pub stats: bool,

    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9100).
    #[arg(long, env = "CLIP_METRICS_ADDR")]
    pub metrics_addr: Option<String>,

    /// Start-up profile file: the chunks this mount's readers ask for first (in the first
    /// minute), written when the mount ends. A later mount that finds the file fetches them
    /// ahead, several at a time, instead of one miss after another. Default:
    /// profiles/MANIFEST-DIGEST in the cache directory.
    #[arg(long, env = "CLIP_STARTUP_PROFILE")]
    pub startup_profile: Option<PathBuf>,

    /// Neither use nor record a start-up profile.
    #[arg(
        long,
        conflicts_with = "startup_profile",
        env = "CLIP_NO_STARTUP_PROFILE"
    )]
    pub no_startup_profile: bool,

    /// Do not look up the start-up profile's names and put its small files in the page
    /// cache as soon as the mount is up (the program then asks for each itself).
    #[arg(long, env = "CLIP_NO_PREFILL")]
    pub no_prefill: bool,

    #[command(flatten)]
    pub store: super::StoreArgs,

    #[command(flatten)]
    pub registry: RegistryArgs,

    #[command(flatten)]
    pub redis: super::RedisArgs,
}

#[derive(Debug, Args)]
pub struct UmountArgs {
    /// The mount point; a dead mount (its process killed) is detached too.
    pub dir: PathBuf,
}

fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("clip");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache/clip"),
        None => PathBuf::from("/var/cache/clip"),
    }
}

/// The index for `image`: a file; `sha256:...`, an index digest published in Redis; or a
/// reference, whose index comes from Redis (when published there), the local index cache,
/// or is built once (then kept locally and published to Redis).
///
/// An index file kept in the local cache is mounted early when `early` can (see
/// [`premount_index`]); the early mount is then returned with the index.
async fn index_for_mount(
    image: &str,
    cache_dir: &Path,
    registry: &RegistryArgs,
    client: &RegistryClient,
    redis: Option<&Arc<RedisCache>>,
    early: &(dyn Fn(&Path) -> Option<(Premount, std::fs::File)> + Sync),
) -> Result<(Arc<ImageIndex>, Option<Premount>)> {
    let path = Path::new(image);
    if path.is_file() {
        return Ok((Arc::new(load_index(path)?), None));
    }
    if image.starts_with("sha256:") {
        let digest: clip_index::Digest = image.parse()?;
        let redis = redis.ok_or_else(|| {
            Error::Config(format!("{image}: mounting by index digest needs --redis"))
        })?;
        let bytes = redis.fetch_index(&digest).await?;
        return Ok((Arc::new(clip_index::decode_owned(bytes)?), None));
    }
    let resolved = client.resolve(image, registry.platform()?.as_ref()).await?;
    if let Some(r) = redis
        && let Ok(Some(d)) = r.index_for_manifest(&resolved.manifest_digest).await
        && let Ok(bytes) = r.fetch_index(&d).await
        && let Ok(index) = clip_index::decode_owned(bytes)
    {
        return Ok((Arc::new(index), None));
    }
    let dir = cache_dir.join("indexes");
    let file = dir.join(format!("{}.clipidx", resolved.manifest_digest.hex()));
    if file.is_file() {
        // A kept index is read whole, its bulk checked too; one that is damaged or cannot be
        // read is built again (an early mount of it undone) and replaced.
        let kept = match early(&file) {
            Some((pre, opened)) => read_index_off_runtime(opened, &file, Read::Whole)
                .await
                .map(|index| (index, Some(pre))),
            None => load_whole_index(&file).map(|index| (Arc::new(index), None)),
        };
        match kept {
            Ok(found) => return Ok(found),
            Err(e) => {
                tracing::warn!(error = %e, "the kept index cannot be used; building it again")
            }
        }
    }
    eprintln!(
        "clip: indexing {image} ({}) once; later mounts reuse the index",
        resolved.manifest_digest
    );
    let index = clip_storage::build_index(
        client,
        &resolved,
        clip_index::IndexOptions::default(),
        default_parallelism(),
        Arc::default(),
    )
    .await?;
    std::fs::create_dir_all(&dir).map_err(|source| Error::File {
        path: dir.clone(),
        source,
    })?;
    let encoded = clip_index::encode(&index)?;
    if let Some(r) = redis
        && let Err(e) = r
            .publish_index(&encoded, Some(&resolved.manifest_digest))
            .await
    {
        tracing::warn!(error = %e, "publishing the index to redis failed");
    }
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, &encoded)
        .and_then(|()| std::fs::rename(&tmp, &file))
        .map_err(|source| Error::File {
            path: file.clone(),
            source,
        })?;
    Ok((Arc::new(index), None))
}

/// The name a mount of the image `source` shows as its source.
fn fsname(source: &ImageSource) -> String {
    format!("clip:{}@{}", source.repository, source.manifest_digest)
}

/// How much of an index file is read before the mount serves.
#[derive(Debug, Clone, Copy)]
enum Read {
    /// The head; the bulk when a fetch first needs it (a file the user named).
    Head,
    /// All of it, the bulk checked (an index kept in the cache, built again if damaged).
    Whole,
}

/// Reads the index file `path`, opened as `file`, off the runtime (a signal meanwhile is
/// seen at once). The read starts at once, not when the future is first awaited.
fn read_index_off_runtime(
    file: std::fs::File,
    path: &Path,
    how: Read,
) -> impl Future<Output = Result<Arc<ImageIndex>>> + use<> {
    let path = path.to_owned();
    let read = tokio::task::spawn_blocking(move || match how {
        Read::Head => read_index_file(file, &path),
        Read::Whole => read_whole_index_file(file, &path),
    });
    async move { Ok(Arc::new(read.await.map_err(std::io::Error::other)??)) }
}

/// Mounts `dir` at once for the index file `path`, named from the first bytes of the
/// index (see [`premount`]): the index is read while the mount is already there, and a
/// program started on it waits for the filesystem rather than for the mount. The index is
/// then read from the file opened here, before the mount (a path inside `dir` would wait
/// for the mount itself); it is returned with the mount. `None` (mount once the index is
/// read) when a file the loading reads (the index, or one of `inputs`: the cache, the
/// start-up profile) lies inside `dir`, or where the mount cannot be made early (not
/// allowed to call mount(2)).
fn premount_index(
    path: &Path,
    dir: &Path,
    inputs: &[&Path],
    options: &MountOptions,
) -> Option<(Premount, std::fs::File)> {
    use std::io::{Seek, SeekFrom};
    if !path.is_file() {
        return None;
    }
    let dir = dir.canonicalize().ok()?;
    let inside = |p: &Path| {
        // What does not exist yet: its absolute path, as it will be created.
        p.canonicalize()
            .or_else(|_| std::path::absolute(p))
            .is_ok_and(|p| p.starts_with(&dir))
    };
    if inside(path) || inputs.iter().any(|p| inside(p)) {
        return None;
    }
    let mut file = std::fs::File::open(path).ok()?;
    let source = clip_index::format::read_source(std::io::BufReader::new(&file)).ok()?;
    file.seek(SeekFrom::Start(0)).ok()?;
    let options = MountOptions {
        fsname: fsname(&source),
        ..options.clone()
    };
    premount(&dir, &options)
        .inspect(|_| info!(dir = %dir.display(), "mounted early; served once the index is read"))
        .inspect_err(|e| {
            tracing::debug!(dir = %dir.display(), error = %e, "no early mount; mounting once the index is read");
        })
        .ok()
        .map(|mount| (mount, file))
}

pub async fn run(args: MountArgs) -> Result<()> {
    let started = Instant::now();
    let cache_dir = args.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let cache_size = parse_size(&args.cache_size)?;
    let store_config = args.store.config()?;
    if !args.dir.is_dir() {
        return Err(Error::Config(format!(
            "{} is not a directory",
            args.dir.display()
        )));
    }
    let options = MountOptions {
        fsname: String::new(),
        threads: args.threads,
        clone_fd: true,
        allow_other: true,
        readahead_kb: u32::try_from(parse_size(&args.kernel_readahead)? / 1024).unwrap_or(u32::MAX),
        passthrough: true,
        backing_record: None,
        prefill: !args.no_prefill,
        ..MountOptions::default()
    };
    // Listen before mounting: a signal that comes as soon as the mount appears must unmount
    // it, not kill the process and leave it dead.
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    // Bound before anything is mounted: failing later would leave a mount to undo.
    let metrics_listener = match &args.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Error::Config(format!("--metrics-addr {addr}: {e}")))?,
        ),
        None => None,
    };
    let inputs: Vec<&Path> = [Some(cache_dir.as_path()), args.startup_profile.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    let early_for = |path: &Path| premount_index(path, &args.dir, &inputs, &options);
    // An index file is mounted before anything else is done, and read from then on while
    // the rest gets ready.
    let first = early_for(Path::new(&args.image)).map(|(pre, file)| {
        (
            pre,
            read_index_off_runtime(file, Path::new(&args.image), Read::Head),
        )
    });
    // Everything until the filesystem serves; a signal meanwhile ends it (dropping an early
    // mount unmounts it).
    let loading = async {
        // The disk cache takes stock of its files (a walk of its directories) in the
        // background: the mount does not wait for it.
        let chunk_dir = cache_dir.join("chunks");
        let disk = tokio::task::spawn_blocking(move || {
            DiskCache::open_in_background(&chunk_dir, cache_size)
        })
        .await
        .map_err(std::io::Error::other)??;
        let client = args.registry.client()?;
        let redis = args.redis.connect().await?;
        let (index, early) = match first {
            Some((pre, reading)) => (reading.await?, Some(pre)),
            None => {
                index_for_mount(
                    &args.image,
                    &cache_dir,
                    &args.registry,
                    &client,
                    redis.as_ref(),
                    &early_for,
                )
                .await?
            }
        };
        let source = client.repository(&index.source.repository, &index.source.manifest_digest)?;
        // Connection, TLS and credentials while the mount comes up, not at the first read.
        source.warm_up_for(&index, |d| disk.contains(d), redis.is_some());
        let mut tiers: Vec<Arc<dyn ChunkCache>> = vec![disk.clone()];
        if let Some(r) = &redis {
            tiers.push(r.clone());
        }
        let store = ChunkStore::new(
            index.clone(),
            Arc::new(source),
            tiers,
            redis.clone(),
            store_config,
        );
        store.keep_whole_files(disk);
        let profile = (!args.no_startup_profile).then(|| {
            args.startup_profile.clone().unwrap_or_else(|| {
                crate::profile::path_in(&cache_dir.join("profiles"), &index.source.manifest_digest)
            })
        });
        let replayed = profile
            .as_deref()
            .and_then(|p| crate::profile::load(p, &index))
            .unwrap_or_default();
        if !replayed.is_empty() {
            info!(
                chunks = replayed.chunks.len(),
                reads = replayed.reads.len(),
                paths = replayed.paths.len(),
                "bringing ahead what the start-up profile names"
            );
        }
        // Also an empty one: the mount then knows there is nothing to prefill.
        store.replay(&replayed, cache_size / 4);
        let handle = tokio::runtime::Handle::current();
        // The name an early mount has too: it read this source from the same file.
        let options = MountOptions {
            fsname: fsname(&index.source),
            ..options.clone()
        };
        let mounted = match early {
            Some(pre) => serve(pre, store.clone(), &options, handle),
            None => mount(store.clone(), &args.dir, &options, handle),
        }
        .map_err(|source| Error::File {
            path: args.dir.clone(),
            source,
        })?;
        Ok::<_, Error>((index, store, profile, mounted, options.fsname))
    };
    let (index, store, profile, mounted, fsname) = tokio::select! {
        loaded = loading => loaded?,
        _ = sigint.recv() => return Err(Error::Interrupted),
        _ = sigterm.recv() => return Err(Error::Interrupted),
    };
    eprintln!(
        "clip: mounted {} at {} in {:.2}s; Ctrl-C or `clip umount {}` to unmount",
        args.image,
        args.dir.display(),
        started.elapsed().as_secs_f64(),
        args.dir.display()
    );
    info!(image = %args.image, dir = %args.dir.display(), "mounted");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(listener) = metrics_listener {
        let metrics_store = store.clone();
        let labels = format!("image=\"{}\"", fsname.replace('"', ""));
        let fs_counters = mounted.counters().clone();
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
            metrics_store.snapshot().to_prometheus(&labels) + &fs_counters.to_prometheus(&labels)
        });
        let mut rx = stop_rx.clone();
        tokio::spawn(crate::metrics::serve(listener, render, async move {
            let _ = rx.changed().await;
        }));
    }
    if args.prefetch {
        let store = store.clone();
        tokio::spawn(async move {
            match store.prefetch_all(2).await {
                Ok(n) => info!(chunks = n, "prefetch finished"),
                Err(e) => tracing::warn!(error = %e, "prefetch stopped"),
            }
        });
    }
    let dir = args.dir.clone();
    let mut waiter = tokio::task::spawn_blocking(move || mounted.join());
    let signalled = tokio::select! {
        _ = sigint.recv() => true,
        _ = sigterm.recv() => true,
        _ = &mut waiter => false,
    };
    if signalled {
        // Unmounting from here ends the session; the waiter then returns.
        unmount_path(&dir).map_err(|source| Error::File {
            path: dir.clone(),
            source,
        })?;
        let _ = waiter.await;
    }
    let _ = stop_tx.send(true);
    // Leave what this mount fetched in the shared cache for the next node.
    if !store.flush(std::time::Duration::from_secs(10)).await {
        tracing::warn!("some chunks were not written to the caches before exit");
    }
    if let Some(path) = &profile {
        crate::profile::save(path, &index, &store.profile_to_save());
    }
    if args.stats {
        print_stats(&store.snapshot());
    }
    Ok(())
}

fn print_stats(s: &clip_storage::stats::StatsSnapshot) {
    eprintln!("clip: tier      chunks        bytes");
    for t in &s.tiers {
        eprintln!(
            "clip: {:<8} {:>8} {:>12}",
            t.tier,
            t.chunks,
            human_bytes(t.bytes)
        );
    }
    eprintln!(
        "clip: source requests {}, compressed bytes {}, prefetched chunks {}, read errors {}",
        s.source_requests,
        human_bytes(s.source_bytes),
        s.prefetched_chunks,
        s.read_errors
    );
    for (tier, event, v) in &s.events {
        eprintln!("clip: {tier} {event}: {v}");
    }
    if s.read_latency.count > 0 {
        eprintln!(
            "clip: reads {}, mean latency {:.2} ms",
            s.read_latency.count,
            s.read_latency.sum_us as f64 / s.read_latency.count as f64 / 1000.0
        );
    }
}

pub fn umount(args: UmountArgs) -> Result<()> {
    if !is_mounted(&args.dir) {
        return Err(Error::Config(format!(
            "{} is not mounted",
            args.dir.display()
        )));
    }
    unmount_path(&args.dir).map_err(|source| Error::File {
        path: args.dir.clone(),
        source,
    })
}
