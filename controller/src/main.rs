//! `clip-controller`: watches ClipImages and indexes them.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use clip_api::ClipImage;
use clip_controller::leader::LeaderElection;
use clip_controller::{Context, error_policy, reconcile};
use clip_storage::RegistryConfig;
use clip_storage::cache::redis::{RedisCache, RedisConfig};
use futures::StreamExt;
use kube::Api;
use kube::runtime::{Controller, watcher};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "clip-controller",
    version,
    about = "Indexes ClipImages once and publishes the indexes to Redis"
)]
struct Args {
    /// Redis Cluster seed nodes (host:port, comma-separated).
    #[arg(
        long = "redis",
        env = "CLIP_REDIS_SEEDS",
        value_delimiter = ',',
        required = true
    )]
    redis: Vec<String>,
    #[arg(long, env = "CLIP_REDIS_USERNAME")]
    redis_username: Option<String>,
    #[arg(long, env = "CLIP_REDIS_PASSWORD", hide_env_values = true)]
    redis_password: Option<String>,
    #[arg(long, env = "CLIP_REDIS_TLS")]
    redis_tls: bool,
    /// Expiry of warmed chunks in seconds (0: none).
    #[arg(long, default_value_t = 7 * 24 * 3600, env = "CLIP_REDIS_TTL")]
    redis_ttl: u64,
    /// Registry hosts spoken to over plain HTTP.
    #[arg(
        long = "insecure-registry",
        env = "CLIP_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    insecure: Vec<String>,
    /// Default platform for multi-platform images (os/arch[/variant]).
    #[arg(long, env = "CLIP_PLATFORM")]
    platform: Option<String>,
    /// Index builds running at once across all ClipImages.
    #[arg(long, default_value_t = 2, env = "CLIP_MAX_BUILDS")]
    max_builds: usize,
    /// Seconds between checks of Ready ClipImages (moved tags, indexes missing from Redis).
    #[arg(long, default_value_t = 600, env = "CLIP_RESYNC_SECONDS")]
    resync_seconds: u64,
    /// Elect a leader on a Lease, so several replicas can run.
    #[arg(long, default_value_t = true, env = "CLIP_LEADER_ELECT", action = clap::ArgAction::Set)]
    leader_elect: bool,
    #[arg(long, default_value = "clip-controller", env = "CLIP_LEASE_NAME")]
    lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace, then "default").
    #[arg(long, env = "CLIP_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Serve Prometheus metrics (and /healthz) here.
    #[arg(long, default_value = "0.0.0.0:9090", env = "CLIP_METRICS_ADDR")]
    metrics_addr: String,
    #[arg(long, default_value = "json", env = "CLIP_LOG_FORMAT")]
    log_format: String,
    #[arg(long, default_value = "info", env = "CLIP_LOG")]
    log: String,
}

async fn serve_metrics(addr: String, ctx: Arc<Context>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    loop {
        let (mut conn, _) = listener.accept().await?;
        let body = ctx.metrics.render();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
        });
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_new(&args.log)?;
    let fmt = tracing_subscriber::fmt().with_env_filter(filter);
    if args.log_format == "json" {
        fmt.json().init();
    } else {
        fmt.with_ansi(std::io::stderr().is_terminal()).init();
    }
    let client = kube::Client::try_default().await?;
    let redis = Arc::new(
        RedisCache::connect(RedisConfig {
            seeds: args.redis.clone(),
            username: args.redis_username.clone(),
            password: args.redis_password.clone(),
            tls: args.redis_tls,
            ttl: (args.redis_ttl > 0).then(|| Duration::from_secs(args.redis_ttl)),
            ..RedisConfig::default()
        })
        .await?,
    );
    let registry = RegistryConfig {
        insecure: args.insecure.clone(),
        ..RegistryConfig::default()
    };
    let ctx = Context::new(
        client.clone(),
        redis,
        registry,
        args.max_builds,
        Duration::from_secs(args.resync_seconds),
    );
    if let Some(p) = &args.platform {
        // Validated at start: a typo should stop the controller, not fail every image.
        let _: clip_storage::Platform = p.parse()?;
    }
    tokio::spawn(serve_metrics(args.metrics_addr.clone(), ctx.clone()));

    let election = args.leader_elect.then(|| {
        let ns = args
            .lease_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".into());
        LeaderElection {
            api: Api::namespaced(client.clone(), &ns),
            name: args.lease_name.clone(),
            identity: std::env::var("POD_NAME")
                .unwrap_or_else(|_| format!("clip-controller-{}", std::process::id())),
            duration: Duration::from_secs(15),
        }
    });
    if let Some(e) = &election {
        e.acquire().await;
    }
    let api: Api<ClipImage> = Api::all(client);
    let controller = Controller::new(api, watcher::Config::default())
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            match r {
                Ok((obj, _)) => info!(object = %obj.name, "reconciled"),
                Err(e) => warn!(error = %e, "reconcile error"),
            }
        });
    match &election {
        Some(e) => {
            tokio::select! {
                () = controller => {}
                () = e.keep() => {
                    error!("leadership lost; exiting so another replica takes over");
                    std::process::exit(1);
                }
            }
        }
        None => controller.await,
    }
    Ok(())
}
