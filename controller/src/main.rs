//! `clip-controller`: watches ClipImages and indexes them.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use clip_api::ClipImage;
use clip_controller::args::Args;
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
            ca_file: args.redis_ca_file.clone(),
            ttl: (args.redis_ttl > 0).then(|| Duration::from_secs(args.redis_ttl)),
            ..RedisConfig::default()
        })
        .await?,
    );
    redis.may_keep_owners().await?;
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
