//! The `clip` command line. Every flag can also be set with a `CLIP_*` environment variable.

mod cat;
mod index;
mod inspect;
mod keeper;
mod mount;
mod node;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};
use clip_index::ImageIndex;
use clip_storage::{Credentials, DockerConfig, Platform, RegistryClient, RegistryConfig};
use tracing_subscriber::EnvFilter;

use crate::error::{Error, Result};

#[derive(Debug, Parser)]
#[command(
    name = "clip",
    version,
    about = "Mount container images lazily: index once, read only what you touch"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "CLIP_LOG_FORMAT"
    )]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `clip_storage=debug`.
    #[arg(long, global = true, default_value = "warn", env = "CLIP_LOG")]
    pub log: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build the index of an image: stream every layer once, record files and seek points.
    Index(index::IndexArgs),
    /// Show what an index file holds.
    Inspect(inspect::InspectArgs),
    /// Print one file of an image, reading only the bytes it needs from the registry.
    Cat(cat::CatArgs),
    /// Mount an image read-only with FUSE, in the foreground.
    Mount(mount::MountArgs),
    /// Unmount a clip mount (also one whose process died).
    Umount(mount::UmountArgs),
    /// Run the CSI node plugin (kubelet talks to it over a unix socket).
    Node(node::NodeArgs),
    /// Hold the node's FUSE connections so that mounts survive a restart of the node plugin.
    Keeper(keeper::KeeperArgs),
}

/// How to reach registries; shared by every command that talks to one.
#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// Registry host (with port) to use over plain HTTP; loopback hosts always are.
    #[arg(
        long = "insecure-registry",
        env = "CLIP_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    pub insecure: Vec<String>,

    /// Registry user name (with --password or CLIP_REGISTRY_PASSWORD).
    #[arg(long, env = "CLIP_REGISTRY_USERNAME")]
    pub username: Option<String>,

    /// Registry password. Prefer the environment variable over the flag.
    #[arg(long, env = "CLIP_REGISTRY_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,

    /// A docker config.json (or the body of a kubernetes.io/dockerconfigjson Secret).
    /// Default: $DOCKER_CONFIG/config.json or ~/.docker/config.json when present.
    #[arg(long, env = "CLIP_DOCKER_CONFIG")]
    pub docker_config: Option<PathBuf>,

    /// Platform to pick from a multi-platform image, os/arch[/variant]; default this host's.
    #[arg(long, env = "CLIP_PLATFORM")]
    pub platform: Option<String>,
}

impl RegistryArgs {
    pub fn platform(&self) -> Result<Option<Platform>> {
        Ok(match &self.platform {
            Some(p) => Some(p.parse()?),
            None => None,
        })
    }

    pub fn client(&self) -> Result<RegistryClient> {
        Ok(RegistryClient::new(self.client_config()?))
    }

    /// The registry settings these flags describe.
    pub fn client_config(&self) -> Result<RegistryConfig> {
        let credentials = match (&self.username, &self.password) {
            (Some(u), Some(p)) => Some(Credentials::Basic {
                username: u.clone(),
                password: p.clone(),
            }),
            (Some(_), None) => {
                return Err(Error::Config(
                    "--username needs --password (or CLIP_REGISTRY_PASSWORD)".into(),
                ));
            }
            (None, Some(_)) => return Err(Error::Config("--password needs --username".into())),
            (None, None) => None,
        };
        let docker_config = match &self.docker_config {
            Some(path) => DockerConfig::load(path)?,
            None => default_docker_config()
                .filter(|p| p.is_file())
                .map(|p| DockerConfig::load(&p))
                .transpose()?
                .unwrap_or_default(),
        };
        Ok(RegistryConfig {
            insecure: self.insecure.clone(),
            docker_config,
            credentials,
            ..RegistryConfig::default()
        })
    }
}

/// How a chunk store reads: memory, parallelism and read-ahead.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Decoded chunks kept in memory.
    #[arg(long, default_value = "16MiB", env = "CLIP_MEMORY_CACHE")]
    pub memory_cache: String,

    /// Registry range requests in flight at once, per image.
    #[arg(long, default_value_t = 8, env = "CLIP_FETCH_CONCURRENCY")]
    pub fetch_concurrency: usize,

    /// Checkpoint spans (at least 4 MiB of uncompressed layer each) fetched ahead of a
    /// sequential reader, in parallel; 0 turns read-ahead off.
    #[arg(long, default_value_t = 4, env = "CLIP_READAHEAD_SPANS")]
    pub readahead_spans: usize,

    /// Bytes from the start of a file fetched as soon as it is opened, and of a file a
    /// start-up profile says was handed to the kernel whole, read into the page cache at a
    /// warm start (0: none).
    #[arg(long, default_value = "16MiB", env = "CLIP_OPEN_PREFETCH")]
    pub open_prefetch: String,

    /// Files at least this large are kept whole in the disk cache once all their chunks
    /// are there, and later opens hand them to the kernel, which reads them itself at
    /// local-disk speed (FUSE passthrough: Linux 6.9 and CAP_SYS_ADMIN, else unused).
    /// 0 turns it off.
    #[arg(long, default_value = "1MiB", env = "CLIP_PASSTHROUGH_MIN_SIZE")]
    pub passthrough_min_size: String,
}

impl StoreArgs {
    pub fn config(&self) -> Result<clip_storage::StoreConfig> {
        Ok(clip_storage::StoreConfig {
            memory_bytes: parse_size(&self.memory_cache)?,
            fetch_concurrency: self.fetch_concurrency,
            readahead_runs: self.readahead_spans,
            open_prefetch_bytes: parse_size(&self.open_prefetch)?,
            whole_file_min_bytes: parse_size(&self.passthrough_min_size)?,
            ..clip_storage::StoreConfig::default()
        })
    }
}

/// The shared Redis Cluster content cache.
#[derive(Debug, Clone, Args)]
pub struct RedisArgs {
    /// Redis Cluster seed nodes, host:port (comma-separated). Unset: no Redis tier.
    #[arg(long = "redis", env = "CLIP_REDIS_SEEDS", value_delimiter = ',')]
    pub seeds: Vec<String>,

    /// Redis ACL user.
    #[arg(long, env = "CLIP_REDIS_USERNAME")]
    pub redis_username: Option<String>,

    /// Redis password. Prefer the environment variable over the flag.
    #[arg(long, env = "CLIP_REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,

    /// Connect with TLS (rediss://).
    #[arg(long, env = "CLIP_REDIS_TLS")]
    pub redis_tls: bool,

    /// Accept any TLS certificate (testing only).
    #[arg(long, env = "CLIP_REDIS_TLS_INSECURE")]
    pub redis_tls_insecure: bool,

    /// CA certificates (PEM file) that signed the Redis servers' certificates; trusted instead
    /// of the system's. Implies --redis-tls.
    #[arg(long, env = "CLIP_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// Expiry of cached chunks in seconds (0: no expiry); lets `volatile-lru` evict them.
    #[arg(long, default_value_t = 7 * 24 * 3600, env = "CLIP_REDIS_TTL")]
    pub redis_ttl: u64,

    /// Bound on each Redis command, in milliseconds; past it reads go to the registry.
    #[arg(long, default_value_t = 1500, env = "CLIP_REDIS_TIMEOUT_MS")]
    pub redis_timeout_ms: u64,

    /// Prefix of every key clip writes.
    #[arg(long, default_value = "clip", env = "CLIP_REDIS_PREFIX")]
    pub redis_prefix: String,

    /// Start without Redis (logging why) when it cannot be reached, instead of failing.
    #[arg(long, env = "CLIP_REDIS_OPTIONAL")]
    pub redis_optional: bool,
}

impl RedisArgs {
    pub fn config(&self) -> clip_storage::cache::redis::RedisConfig {
        use std::time::Duration;
        clip_storage::cache::redis::RedisConfig {
            seeds: self.seeds.clone(),
            username: self.redis_username.clone(),
            password: self.redis_password.clone(),
            tls: self.redis_tls,
            tls_insecure: self.redis_tls_insecure,
            ca_file: self.redis_ca_file.clone(),
            op_timeout: Duration::from_millis(self.redis_timeout_ms.max(1)),
            ttl: (self.redis_ttl > 0).then(|| Duration::from_secs(self.redis_ttl)),
            key_prefix: self.redis_prefix.clone(),
            ..Default::default()
        }
    }

    /// Connects when seeds are configured; with `--redis-optional` a failure is logged.
    pub async fn connect(&self) -> Result<Option<Arc<clip_storage::cache::redis::RedisCache>>> {
        if self.seeds.is_empty() {
            return Ok(None);
        }
        match clip_storage::cache::redis::RedisCache::connect(self.config()).await {
            Ok(r) => Ok(Some(Arc::new(r))),
            Err(e) if self.redis_optional => {
                tracing::warn!(error = %e, "redis unavailable; continuing without the shared cache");
                eprintln!("clip: warning: {e}; continuing without the shared cache");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn default_docker_config() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

fn init_logging(cli: &Cli) -> Result<()> {
    let filter = EnvFilter::try_new(&cli.log)
        .map_err(|e| Error::Config(format!("--log {:?}: {e}", cli.log)))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    Ok(())
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    init_logging(&cli)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Index(args) => index::run(args).await?,
            Command::Inspect(args) => inspect::run(args)?,
            Command::Cat(args) => cat::run(args).await?,
            Command::Mount(args) => mount::run(args).await?,
            Command::Umount(args) => mount::umount(args)?,
            Command::Node(args) => node::run(args).await?,
            Command::Keeper(args) => keeper::run(args).await?,
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Reads and validates an index file.
pub fn load_index(path: &Path) -> Result<ImageIndex> {
    read_index_file(open_file(path)?, path)
}

/// Reads and validates an index file whole (see [`read_whole_index_file`]).
pub fn load_whole_index(path: &Path) -> Result<ImageIndex> {
    read_whole_index_file(open_file(path)?, path)
}

fn open_file(path: &Path) -> Result<std::fs::File> {
    std::fs::File::open(path).map_err(|source| Error::File {
        path: path.to_owned(),
        source,
    })
}

/// Reads and validates the index file `path` opened as `file`, from its start; its bulk
/// (checkpoint windows, block digests) is read when a fetch first needs it.
pub fn read_index_file(file: std::fs::File, path: &Path) -> Result<ImageIndex> {
    clip_index::format::open(file).map_err(|source| Error::IndexFile {
        path: path.to_owned(),
        source,
    })
}

/// Reads and validates the index file `path` opened as `file` whole, from its start, its
/// bulk included and checked (an index clip keeps itself, which it can build again if the
/// bulk is damaged, rather than finding out at the first fetch that needs it).
pub fn read_whole_index_file(file: std::fs::File, path: &Path) -> Result<ImageIndex> {
    clip_index::format::read(file, false)
        .map(|read| read.index)
        .map_err(|source| Error::IndexFile {
            path: path.to_owned(),
            source,
        })
}

/// `IMAGE` arguments name an index file when one exists at that path, else a reference.
pub async fn index_for(
    image: &str,
    registry: &RegistryArgs,
    client: &RegistryClient,
) -> Result<Arc<ImageIndex>> {
    let path = Path::new(image);
    if path.is_file() {
        return Ok(Arc::new(load_index(path)?));
    }
    let resolved = client.resolve(image, registry.platform()?.as_ref()).await?;
    let index = clip_storage::build_index(
        client,
        &resolved,
        clip_index::IndexOptions::default(),
        default_parallelism(),
        Arc::default(),
    )
    .await?;
    Ok(Arc::new(index))
}

pub fn default_parallelism() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Parses `10GiB`, `512MiB`, `64K`, `1000000`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| Error::Config(format!("{s:?} is not a size (try 10GiB)")))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => {
            return Err(Error::Config(format!(
                "{s:?}: unknown unit (use KiB, MiB, GiB, TiB)"
            )));
        }
    };
    Ok((n * mult as f64) as u64)
}

/// `1.5 MiB`-style sizes for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    struct RedisOnly {
        #[command(flatten)]
        redis: RedisArgs,
    }

    #[test]
    fn a_redis_ca_file_reaches_the_cache_config() {
        let args = RedisOnly::try_parse_from([
            "clip",
            "--redis",
            "redis-0:6379",
            "--redis-ca-file",
            "/etc/clip/redis-ca.pem",
        ]);
        let config = args.map(|a| a.redis.config());
        assert_eq!(
            config.ok().and_then(|c| c.ca_file),
            Some(PathBuf::from("/etc/clip/redis-ca.pem"))
        );
    }
}
