//! `clip node`: the CSI node plugin.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tracing::{info, warn};

use super::{RedisArgs, RegistryArgs, parse_size};
use crate::csi::idle::IdleLimits;
use crate::csi::lookup::{ClipImageLookup, KubeLookup};
use crate::csi::node::{NodeConfig, NodeContext};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KubeAccess {
    /// In-cluster config, or KUBECONFIG / ~/.kube/config.
    Auto,
    /// No API server: only `image:` volumes can be served.
    Off,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The CSI socket kubelet talks to (unix:///path or /path).
    #[arg(
        long,
        default_value = "unix:///csi/csi.sock",
        env = "CLIP_CSI_ENDPOINT"
    )]
    pub endpoint: String,

    /// This node's id (default: NODE_NAME, then the host name).
    #[arg(long, env = "CLIP_NODE_ID")]
    pub node_id: Option<String>,

    /// Most volumes this node serves at once.
    #[arg(long, default_value_t = 256, env = "CLIP_MAX_VOLUMES")]
    pub max_volumes: i64,

    /// Mount table and local indexes.
    #[arg(long, default_value = "/var/lib/clip", env = "CLIP_STATE_DIR")]
    pub state_dir: PathBuf,

    /// Local chunk cache directory (shared by every volume of the node).
    #[arg(long, default_value = "/var/cache/clip", env = "CLIP_CACHE_DIR")]
    pub cache_dir: PathBuf,

    /// Most bytes the chunk cache may hold on disk.
    #[arg(long, default_value = "20GiB", env = "CLIP_CACHE_SIZE")]
    pub cache_size: String,

    #[command(flatten)]
    pub store: super::StoreArgs,

    /// FUSE worker threads per volume.
    #[arg(long, default_value_t = 4, env = "CLIP_FUSE_THREADS")]
    pub fuse_threads: usize,

    /// Serve only ClipImages; refuse `image:` volume attributes.
    #[arg(long, env = "CLIP_REQUIRE_CLIP_IMAGES")]
    pub require_clip_images: bool,

    /// Do not mount again, at start, the volumes of the previous process.
    #[arg(long, env = "CLIP_NO_RESERVE_ON_START")]
    pub no_reserve_on_start: bool,

    /// Seconds a publish waits for a direct image being indexed before kubelet retries.
    #[arg(long, default_value_t = 20, env = "CLIP_PUBLISH_WAIT")]
    pub publish_wait: u64,

    /// Decoded indexes of images that no volume uses any more, kept in memory so that the
    /// image's next publish on this node neither reads nor decodes its index; 0 keeps none.
    #[arg(long, default_value_t = IdleLimits::default().count, env = "CLIP_IDLE_INDEXES")]
    pub idle_indexes: usize,

    /// Seconds an idle index is kept after the last volume of its image went.
    #[arg(long, default_value_t = IdleLimits::default().linger.as_secs(), env = "CLIP_IDLE_INDEXES_FOR")]
    pub idle_indexes_for: u64,

    /// How to reach the API server for ClipImage lookups.
    #[arg(long, value_enum, default_value = "auto", env = "CLIP_KUBE")]
    pub kube: KubeAccess,

    /// The keeper's socket (`clip keeper`): mounts handed to it survive a restart of this
    /// plugin, and a new plugin takes them over. Without it, a restart breaks them.
    #[arg(long, env = "CLIP_KEEPER_SOCKET")]
    pub keeper_socket: Option<PathBuf>,

    /// Serve Prometheus metrics on this address.
    #[arg(long, env = "CLIP_METRICS_ADDR")]
    pub metrics_addr: Option<String>,

    #[command(flatten)]
    pub registry: RegistryArgs,

    #[command(flatten)]
    pub redis: RedisArgs,
}

fn socket_path(endpoint: &str) -> Result<PathBuf> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(Error::Config(format!(
            "--endpoint {endpoint:?}: expected unix:///absolute/path"
        )));
    }
    Ok(PathBuf::from(path))
}

fn default_node_id() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown-node".into())
}

pub async fn run(args: NodeArgs) -> Result<()> {
    let socket = socket_path(&args.endpoint)?;
    if args.max_volumes < 1 {
        return Err(Error::Config("--max-volumes must be at least 1".into()));
    }
    let lookup: Option<Arc<dyn ClipImageLookup>> = match args.kube {
        KubeAccess::Off => None,
        KubeAccess::Auto => match kube::Client::try_default().await {
            Ok(c) => Some(Arc::new(KubeLookup::new(c))),
            Err(e) => {
                warn!(error = %e, "no Kubernetes access; ClipImage volumes cannot be served");
                None
            }
        },
    };
    let redis = args.redis.connect().await?;
    let registry = args.registry.client_config()?;
    let config = NodeConfig {
        node_id: args.node_id.clone().unwrap_or_else(default_node_id),
        max_volumes: args.max_volumes,
        state_dir: args.state_dir.clone(),
        cache_dir: args.cache_dir.clone(),
        cache_bytes: parse_size(&args.cache_size)?,
        store: args.store.config()?,
        fuse_threads: args.fuse_threads,
        require_clip_images: args.require_clip_images,
        reserve_on_start: !args.no_reserve_on_start,
        registry,
        platform: args.registry.platform()?,
        publish_wait: Duration::from_secs(args.publish_wait),
        keeper_socket: args.keeper_socket.clone(),
        idle_indexes: IdleLimits {
            count: args.idle_indexes,
            linger: Duration::from_secs(args.idle_indexes_for),
        },
    };
    let ctx = NodeContext::new(config, redis, lookup, tokio::runtime::Handle::current())?;
    ctx.restore().await;
    let listener = crate::csi::server::bind(&socket).map_err(|source| Error::File {
        path: socket.clone(),
        source,
    })?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(addr) = &args.metrics_addr {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Config(format!("--metrics-addr {addr}: {e}")))?;
        let c = ctx.clone();
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || c.metrics());
        let mut rx = stop_rx.clone();
        tokio::spawn(crate::metrics::serve(l, render, async move {
            let _ = rx.changed().await;
        }));
    }
    info!(socket = %socket.display(), node_id = %ctx.config.node_id, "CSI node plugin serving");
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm.recv() => {}
        }
        info!("shutting down; volumes stay in the mount table for the next start");
    };
    let served = crate::csi::server::serve(listener, ctx.clone(), shutdown).await;
    let _ = stop_tx.send(true);
    let c = ctx.clone();
    if let Ok(true) = tokio::task::spawn_blocking(move || c.shutdown()).await {
        // Reads in progress stay unanswered; the kernel sends them to the next plugin.
        std::process::exit(0);
    }
    served.map_err(|e| Error::Config(format!("serving {}: {e}", socket.display())))?;
    Ok(())
}
