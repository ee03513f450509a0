//! `clip-controller` flags; every one also readable from a `CLIP_*` environment variable.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "clip-controller",
    version,
    about = "Indexes ClipImages once and publishes the indexes to Redis"
)]
pub struct Args {
    /// Redis Cluster seed nodes (host:port, comma-separated).
    #[arg(
        long = "redis",
        env = "CLIP_REDIS_SEEDS",
        value_delimiter = ',',
        required = true
    )]
    pub redis: Vec<String>,
    #[arg(long, env = "CLIP_REDIS_USERNAME")]
    pub redis_username: Option<String>,
    #[arg(long, env = "CLIP_REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,
    #[arg(long, env = "CLIP_REDIS_TLS")]
    pub redis_tls: bool,
    /// PEM file of the CA that signed the Redis Cluster's certificates (implies TLS; only
    /// that CA is trusted).
    #[arg(long, env = "CLIP_REDIS_CA_FILE")]
    pub redis_ca_file: Option<std::path::PathBuf>,
    /// Expiry of warmed chunks in seconds (0: none).
    #[arg(long, default_value_t = 7 * 24 * 3600, env = "CLIP_REDIS_TTL")]
    pub redis_ttl: u64,
    /// Registry hosts spoken to over plain HTTP.
    #[arg(
        long = "insecure-registry",
        env = "CLIP_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    pub insecure: Vec<String>,
    /// Default platform for multi-platform images (os/arch[/variant]).
    #[arg(long, env = "CLIP_PLATFORM")]
    pub platform: Option<String>,
    /// Index builds running at once across all ClipImages.
    #[arg(long, default_value_t = 2, env = "CLIP_MAX_BUILDS")]
    pub max_builds: usize,
    /// Seconds between checks of Ready ClipImages (moved tags, indexes missing from Redis).
    #[arg(long, default_value_t = 600, env = "CLIP_RESYNC_SECONDS")]
    pub resync_seconds: u64,
    /// Elect a leader on a Lease, so several replicas can run.
    #[arg(long, default_value_t = true, env = "CLIP_LEADER_ELECT", action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    #[arg(long, default_value = "clip-controller", env = "CLIP_LEASE_NAME")]
    pub lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace, then "default").
    #[arg(long, env = "CLIP_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Serve Prometheus metrics (and /healthz) here.
    #[arg(long, default_value = "0.0.0.0:9090", env = "CLIP_METRICS_ADDR")]
    pub metrics_addr: String,
    #[arg(long, default_value = "json", env = "CLIP_LOG_FORMAT")]
    pub log_format: String,
    #[arg(long, default_value = "info", env = "CLIP_LOG")]
    pub log: String,
}
