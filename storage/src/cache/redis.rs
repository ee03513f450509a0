//! The shared content cache on a Redis Cluster: one node's registry fetch serves every node.
//!
//! - Chunk keys are `PREFIX:c:<digest hex>`: no `{hash tag}`, so a layer's chunks spread over
//!   every slot and shard. Values are whole chunks (just under 1 MiB by default, never an exact
//!   power of two), with a TTL so `volatile-lru` can evict them.
//! - Cluster-wide single-flight: before a registry fetch a node takes a lease
//!   (`SET PREFIX:l:<run> token NX PX lease`); others wait a bounded time for the chunks to
//!   appear, then fetch themselves. A crashed holder delays others by at most the lease.
//! - Failure: every operation has a timeout; a circuit breaker stops calling a failing
//!   cluster. While it is open a background probe builds a fresh connection from the seed
//!   nodes every cool-down; the first that answers replaces the old one and closes the
//!   breaker, so a cluster restarted whole is used again. Redis trouble is a cache miss,
//!   never a failed read, and no read waits for a probe.
//! - Every chunk read is verified; a mismatch deletes the key and reports a miss.
//! - Indexes are stored under their digest in parts of under 1 MiB, with no TTL.
//! - TLS trusts the system's CAs, or only those of a configured CA file (a private CA).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clip_index::Digest;
use futures::FutureExt;
use futures::future::BoxFuture;
use redis::AsyncCommands;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use tracing::{debug, info, warn};

use super::{ChunkCache, ChunkKey};
use crate::error::{Error, Result};

/// Largest value we write: index parts are cut to this size.
const PART: usize = 1024 * 1024 - 4096;

/// How to reach and use the cluster.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// Seed nodes, `host:port`.
    pub seeds: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// `rediss://`: TLS to every node.
    pub tls: bool,
    /// Accept any certificate (testing only).
    pub tls_insecure: bool,
    /// CA certificates (PEM) to trust instead of the system's, for a cluster whose
    /// certificates a private CA signed. Implies `tls`.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// Bound on every command; past it the read falls back to the next tier.
    pub op_timeout: Duration,
    /// Expiry of chunk keys (`None`: keep until evicted).
    pub ttl: Option<Duration>,
    pub key_prefix: String,
    /// How long a registry-fetch lease lasts.
    pub lease: Duration,
    /// How long a node waits for another node's lease before fetching itself.
    pub lease_wait: Duration,
    /// Consecutive failures that open the circuit breaker.
    pub breaker_threshold: u32,
    /// Pause between probes (fresh connections from the seeds) while the breaker is open.
    pub breaker_cooldown: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            seeds: Vec::new(),
            username: None,
            password: None,
            tls: false,
            tls_insecure: false,
            ca_file: None,
            connect_timeout: Duration::from_secs(2),
            op_timeout: Duration::from_millis(1500),
            ttl: Some(Duration::from_secs(7 * 24 * 3600)),
            key_prefix: "clip".into(),
            lease: Duration::from_secs(10),
            lease_wait: Duration::from_secs(5),
            breaker_threshold: 3,
            breaker_cooldown: Duration::from_secs(2),
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct RedisStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub errors: AtomicU64,
    pub skipped_open_breaker: AtomicU64,
    pub verify_failures: AtomicU64,
    pub writes: AtomicU64,
    pub leases_taken: AtomicU64,
    pub lease_waits: AtomicU64,
    pub lease_wait_hits: AtomicU64,
    pub latency_us: AtomicU64,
    pub ops: AtomicU64,
    /// Fresh connections built from the seeds while the breaker was open.
    pub reconnects: AtomicU64,
}

#[derive(Debug, Default)]
struct BreakerState {
    failures: u32,
    open: bool,
}

/// Stops calling a failing cluster: after `threshold` consecutive failures every operation
/// is skipped, and reads go to the next tier, until the background probe
/// ([`probe_until_answered`]) gets an answer on a fresh connection.
#[derive(Debug)]
struct Breaker {
    state: Mutex<BreakerState>,
    threshold: u32,
}

impl Breaker {
    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn allow(&self) -> bool {
        !self.lock().open
    }

    fn success(&self) {
        let mut s = self.lock();
        if s.open {
            info!("redis is answering again; closing the circuit breaker");
        }
        s.failures = 0;
        s.open = false;
    }

    /// Records a failure; true when this one opened the breaker.
    fn failure(&self) -> bool {
        let mut s = self.lock();
        s.failures = s.failures.saturating_add(1);
        if s.failures < self.threshold || s.open {
            return false;
        }
        s.open = true;
        warn!(
            failures = s.failures,
            "redis keeps failing; opening the circuit breaker and reading from the registry"
        );
        true
    }

    fn is_open(&self) -> bool {
        self.lock().open
    }
}

/// What a lease attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// We hold it: fetch from the registry, then release.
    Acquired(String),
    /// Another node is fetching; wait for its chunks.
    HeldElsewhere,
    /// Redis cannot say (down, breaker open): go to the registry.
    Unavailable,
}

/// What the cache and its background probe share.
struct Shared {
    client: ClusterClient,
    /// The connection in use; replaced by the probe's fresh one when the breaker closes.
    conn: RwLock<ClusterConnection>,
    breaker: Breaker,
    /// Pause between probes while the breaker is open.
    cooldown: Duration,
    /// Bound on building a fresh connection (the probe).
    connect_limit: Duration,
    stats: Arc<RedisStats>,
}

impl Shared {
    fn conn(&self) -> ClusterConnection {
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A new connection from the seed nodes that answered a PING within `limit`; `None` when the
/// limit passed first.
async fn answering(
    client: &ClusterClient,
    limit: Duration,
) -> Option<redis::RedisResult<ClusterConnection>> {
    let build = async {
        let mut conn = client.get_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        Ok(conn)
    };
    tokio::time::timeout(limit, build).await.ok()
}

/// While the breaker is open: every cool-down, builds a fresh connection from the seed nodes;
/// the first that answers replaces the old connection and closes the breaker. Reads never
/// wait for a probe. The old connection is not trusted to come back by itself: its repair of
/// node connections can stall when all of them went stale at once (the whole cluster
/// restarted), which would leave the cache unused for good. Ends when the cache is dropped.
async fn probe_until_answered(shared: std::sync::Weak<Shared>) {
    loop {
        let Some(cooldown) = shared.upgrade().map(|s| s.cooldown) else {
            return;
        };
        tokio::time::sleep(cooldown).await;
        let Some(s) = shared.upgrade() else {
            return;
        };
        match answering(&s.client, s.connect_limit).await {
            Some(Ok(conn)) => {
                *s.conn.write().unwrap_or_else(|p| p.into_inner()) = conn;
                s.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                s.breaker.success();
                return;
            }
            Some(Err(e)) => debug!(error = %e, "the redis cluster is still unreachable"),
            None => debug!("the redis cluster is still unreachable (no answer in time)"),
        }
    }
}

/// The Redis Cluster tier.
pub struct RedisCache {
    shared: Arc<Shared>,
    config: RedisConfig,
    pub stats: Arc<RedisStats>,
    token_seq: AtomicU64,
}

impl std::fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCache")
            .field("seeds", &self.config.seeds)
            .finish_non_exhaustive()
    }
}

fn redis_error(config: &RedisConfig, e: &redis::RedisError) -> Error {
    let text = e.to_string();
    let hint = if text.contains("cluster support disabled") || text.contains("unknown command") {
        " (is this a Redis Cluster? clip needs cluster mode)"
    } else if text.contains("WRONGPASS")
        || text.contains("NOAUTH")
        || text.to_ascii_lowercase().contains("authentication")
        || text.contains("invalid username-password")
    {
        " (check the Redis user and password)"
    } else if text.contains("invalid peer certificate") {
        if config.ca_file.is_some() {
            " (was the servers' certificate signed by the CA in the CA file, for the seed addresses?)"
        } else {
            " (is the servers' certificate signed by a CA the system trusts? if not, give its CA file)"
        }
    } else if e.is_connection_refusal() || e.is_io_error() || e.is_timeout() {
        " (are the seed addresses right and reachable?)"
    } else {
        ""
    };
    Error::Cache {
        tier: "redis",
        detail: format!("cluster {}: {text}{hint}", config.seeds.join(",")),
    }
}

/// The commands clip sends, as ACL rules: what a Redis user needs on clip's keys (besides
/// `~PREFIX:*`). The node plugin's are probed at connect; the set commands are the
/// controller's (the owners of an index), probed by [`RedisCache::may_keep_owners`].
pub const REDIS_COMMANDS: &str = "+get +set +setex +getrange +exists +del +evalsha +eval +script|load +sadd +srem +scard +ping +cluster|slots";

/// Runs once each kind of command clip sends (the writes of a lease and of an expiring
/// chunk, a read, a range read, an existence check, the lease's release script, a delete)
/// on a key of its own under `prefix`, so that a user whose ACL does not allow them, or a
/// cluster that refuses writes, fails at start rather than turning every later read into
/// a quiet fallback. The failing command on error.
async fn may_use_keys(
    conn: &mut ClusterConnection,
    prefix: &str,
) -> std::result::Result<(), (&'static str, redis::RedisError)> {
    let key = probe_key(prefix);
    let lease: redis::RedisResult<Option<String>> =
        lease_command(&key, "1", 60_000).query_async(conn).await;
    lease.map_err(|e| ("SET", e))?;
    let used = async {
        let write: redis::RedisResult<()> = conn.set_ex(&key, "1", 60).await;
        write.map_err(|e| ("SETEX", e))?;
        let read: redis::RedisResult<Option<Vec<u8>>> = conn.get(&key).await;
        read.map_err(|e| ("GET", e))?;
        let part: redis::RedisResult<Vec<u8>> = conn.getrange(&key, 0, 0).await;
        part.map_err(|e| ("GETRANGE", e))?;
        let exists: redis::RedisResult<i64> = conn.exists(&key).await;
        exists.map_err(|e| ("EXISTS", e))?;
        let script: redis::RedisResult<i64> = redis::Script::new(RELEASE_SCRIPT)
            .key(&key)
            .arg("1")
            .invoke_async(conn)
            .await;
        script.map_err(|e| ("EVALSHA/EVAL", e))
    }
    .await;
    // Removed whatever failed (it would expire within a minute anyway).
    let del: redis::RedisResult<i64> = conn.del(&key).await;
    used?;
    del.map_err(|e| ("DEL", e))?;
    Ok(())
}

/// A key of its own under `prefix` for a probe of the commands clip sends.
fn probe_key(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let nonce = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("{prefix}:probe:{nonce:016x}")
}

/// Takes the lease `key` for `ms` milliseconds with `token`, if nobody holds it.
fn lease_command(key: &str, token: &str, ms: u64) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key).arg(token).arg("NX").arg("PX").arg(ms);
    cmd
}

/// Deletes a lease if its value is still the caller's token.
const RELEASE_SCRIPT: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

/// What [`may_use_keys`] found: an error of the settings (`Err`, with what to change), or
/// `Ok` for trouble of the moment (a timeout, a cluster failing over), which the circuit
/// breaker deals with like any other.
fn access_error(
    config: &RedisConfig,
    command: &str,
    e: &redis::RedisError,
) -> std::result::Result<(), Error> {
    let text = e.to_string();
    let prefix = &config.key_prefix;
    let code = e.code().unwrap_or_default().to_ascii_uppercase();
    let hint = match code.as_str() {
        "NOPERM" => format!(
            " (the Redis user{} may not run it on clip's keys: grant it ~{prefix}:* {REDIS_COMMANDS}, or +@all)",
            config
                .username
                .as_deref()
                .map(|u| format!(" {u}"))
                .unwrap_or_default()
        ),
        "OOM" => {
            " (the cluster is full and evicts nothing: clip expects maxmemory-policy allkeys-lru)"
                .to_owned()
        }
        "READONLY" => " (a seed node is a replica that refuses writes)".to_owned(),
        _ => {
            warn!(command, error = %text, "redis: checking clip's commands at start failed; going on");
            return Ok(());
        }
    };
    Err(Error::Cache {
        tier: "redis",
        detail: format!(
            "cluster {}: {command} on {prefix}:probe:... failed: {text}{hint}",
            config.seeds.join(",")
        ),
    })
}

impl RedisCache {
    /// Connects to the cluster and checks it answers, so bad settings fail at start.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        if config.seeds.is_empty() {
            return Err(Error::Cache {
                tier: "redis",
                detail: "no seed nodes configured".into(),
            });
        }
        let tls = config.tls || config.ca_file.is_some();
        let scheme = if tls { "rediss" } else { "redis" };
        let mut urls = Vec::new();
        for s in &config.seeds {
            let mut url = format!("{scheme}://{s}");
            if tls && config.tls_insecure {
                url.push('#');
                url.push_str("insecure");
            }
            urls.push(url);
        }
        let mut builder = ClusterClientBuilder::new(urls)
            .connection_timeout(config.connect_timeout)
            .response_timeout(config.op_timeout)
            .retries(1);
        if let Some(path) = config.ca_file.as_ref().filter(|_| !config.tls_insecure) {
            let root_cert = std::fs::read(path).map_err(|e| Error::Cache {
                tier: "redis",
                detail: format!("reading the CA file {}: {e}", path.display()),
            })?;
            // An empty trust store would fail every handshake with a less telling error.
            if !String::from_utf8_lossy(&root_cert).contains("-----BEGIN CERTIFICATE-----") {
                return Err(Error::Cache {
                    tier: "redis",
                    detail: format!("the CA file {} holds no PEM certificate", path.display()),
                });
            }
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            });
        }
        if let Some(p) = &config.password {
            builder = builder.password(p);
        }
        if let Some(u) = &config.username {
            builder = builder.username(u);
        }
        let client = builder.build().map_err(|e| redis_error(&config, &e))?;
        let connect_limit = config.connect_timeout * 3;
        let mut conn = match answering(&client, connect_limit).await {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(redis_error(&config, &e)),
            None => {
                return Err(Error::Cache {
                    tier: "redis",
                    detail: format!(
                        "cluster {}: no answer within {:?} (are the seed addresses right and reachable?)",
                        config.seeds.join(","),
                        connect_limit
                    ),
                });
            }
        };
        if let Err((command, e)) = may_use_keys(&mut conn, &config.key_prefix).await {
            access_error(&config, command, &e)?;
        }
        let stats = Arc::<RedisStats>::default();
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                conn: RwLock::new(conn),
                breaker: Breaker {
                    state: Mutex::new(BreakerState::default()),
                    threshold: config.breaker_threshold.max(1),
                },
                cooldown: config.breaker_cooldown,
                connect_limit,
                stats: stats.clone(),
            }),
            config,
            stats,
            token_seq: AtomicU64::new(0),
        })
    }

    fn chunk_key(&self, d: &Digest) -> String {
        format!("{}:c:{}", self.config.key_prefix, d.hex())
    }

    /// Runs one command with the timeout and the breaker; `None` when skipped or failed.
    async fn run<T, F>(&self, what: &str, op: impl FnOnce(ClusterConnection) -> F) -> Option<T>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if !self.shared.breaker.allow() {
            self.stats
                .skipped_open_breaker
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let started = Instant::now();
        let result = tokio::time::timeout(self.config.op_timeout, op(self.shared.conn())).await;
        self.stats.ops.fetch_add(1, Ordering::Relaxed);
        self.stats.latency_us.fetch_add(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        match result {
            Ok(Ok(v)) => {
                self.shared.breaker.success();
                Some(v)
            }
            Ok(Err(e)) => {
                self.failed();
                warn!(op = what, error = %e, "redis operation failed; falling back");
                None
            }
            Err(_) => {
                self.failed();
                warn!(
                    op = what,
                    timeout_ms = self.config.op_timeout.as_millis() as u64,
                    "redis operation timed out; falling back"
                );
                None
            }
        }
    }

    /// Counts a failed operation; the one that opens the breaker starts the probe.
    fn failed(&self) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if self.shared.breaker.failure() {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(probe_until_answered(Arc::downgrade(&self.shared)));
                }
                // No runtime to probe on (not reached from the async operations): try the
                // old connection again rather than stay open for good.
                Err(_) => self.shared.breaker.success(),
            }
        }
    }

    /// Whether the breaker currently keeps clip away from the cluster.
    pub fn is_degraded(&self) -> bool {
        self.shared.breaker.is_open()
    }

    /// Tries to take the registry-fetch lease for `name` (a run of chunks).
    pub async fn try_lease(&self, name: &str) -> Lease {
        let key = format!("{}:l:{name}", self.config.key_prefix);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let token = format!(
            "{}-{}-{nanos}",
            std::process::id(),
            self.token_seq.fetch_add(1, Ordering::Relaxed),
        );
        let ms = self.config.lease.as_millis() as u64;
        let t = token.clone();
        let got: Option<Option<String>> = self
            .run("lease", |mut c| async move {
                lease_command(&key, &t, ms).query_async(&mut c).await
            })
            .await;
        match got {
            Some(Some(_)) => {
                self.stats.leases_taken.fetch_add(1, Ordering::Relaxed);
                Lease::Acquired(token)
            }
            Some(None) => {
                self.stats.lease_waits.fetch_add(1, Ordering::Relaxed);
                Lease::HeldElsewhere
            }
            None => Lease::Unavailable,
        }
    }

    /// Releases a lease we hold (only if it is still ours).
    pub async fn release_lease(&self, name: &str, token: &str) {
        let key = format!("{}:l:{name}", self.config.key_prefix);
        let token = token.to_owned();
        let _: Option<i64> = self
            .run("release", |mut c| async move {
                redis::Script::new(RELEASE_SCRIPT)
                    .key(&key)
                    .arg(&token)
                    .invoke_async(&mut c)
                    .await
            })
            .await;
    }

    /// How long to wait for another node's lease.
    /// Whether lease `name` is still held by someone (false also when Redis cannot say).
    pub async fn lease_held(&self, name: &str) -> bool {
        let key = format!("{}:l:{name}", self.config.key_prefix);
        let n: Option<i64> = self
            .run("lease_check", |mut c| async move { c.exists(&key).await })
            .await;
        n.unwrap_or(0) > 0
    }

    pub fn lease_wait(&self) -> Duration {
        self.config.lease_wait
    }

    fn index_key(&self, d: &Digest) -> String {
        format!("{}:i:{}", self.config.key_prefix, d.hex())
    }

    /// The index published for an image manifest, if any.
    pub async fn index_for_manifest(&self, manifest: &Digest) -> Result<Option<Digest>> {
        let mut c = self.shared.conn();
        let key = format!("{}:m:{}", self.config.key_prefix, manifest.hex());
        let v: redis::RedisResult<Option<String>> = c.get(&key).await;
        match v.map_err(|e| redis_error(&self.config, &e))? {
            Some(d) => Ok(d.parse().ok()),
            None => Ok(None),
        }
    }

    /// Stores an encoded index under its digest (no expiry), in parts of under 1 MiB, and
    /// points the image's manifest digest at it.
    pub async fn publish_index(&self, encoded: &[u8], manifest: Option<&Digest>) -> Result<Digest> {
        let digest = clip_index::index_digest(encoded);
        let base = self.index_key(&digest);
        let parts: Vec<&[u8]> = encoded.chunks(PART).collect();
        let timeout = self.config.op_timeout * 4;
        for (i, p) in parts.iter().enumerate() {
            let key = format!("{base}:{i}");
            let mut c = self.shared.conn();
            let set: redis::RedisResult<()> =
                match tokio::time::timeout(timeout, c.set(&key, *p)).await {
                    Ok(r) => r,
                    Err(_) => {
                        return Err(Error::Cache {
                            tier: "redis",
                            detail: format!("storing {key}: timed out"),
                        });
                    }
                };
            set.map_err(|e| redis_error(&self.config, &e))?;
        }
        let head = format!("{} {}", parts.len(), encoded.len());
        let mut c = self.shared.conn();
        let set: redis::RedisResult<()> = c.set(&base, head).await;
        set.map_err(|e| redis_error(&self.config, &e))?;
        if let Some(m) = manifest {
            let key = format!("{}:m:{}", self.config.key_prefix, m.hex());
            let set: redis::RedisResult<()> = c.set(&key, digest.to_string()).await;
            set.map_err(|e| redis_error(&self.config, &e))?;
        }
        Ok(digest)
    }

    /// Fetches and verifies an index published under `digest`.
    pub async fn fetch_index(&self, digest: &Digest) -> Result<Vec<u8>> {
        let base = self.index_key(digest);
        let mut c = self.shared.conn();
        let head: redis::RedisResult<Option<String>> = c.get(&base).await;
        let head = head
            .map_err(|e| redis_error(&self.config, &e))?
            .ok_or_else(|| Error::NotFound {
                reference: digest.to_string(),
                detail: "no index with this digest in Redis".into(),
            })?;
        let bad = || Error::Cache {
            tier: "redis",
            detail: format!("malformed index header {head:?} for {digest}"),
        };
        let (parts, size) = head.split_once(' ').ok_or_else(bad)?;
        let parts: usize = parts.parse().map_err(|_| bad())?;
        let size: usize = size.parse().map_err(|_| bad())?;
        if parts > (size / PART) + 1 || size > 4 << 30 {
            return Err(bad());
        }
        let mut out = Vec::with_capacity(size);
        for i in 0..parts {
            let part: redis::RedisResult<Option<Vec<u8>>> = c.get(format!("{base}:{i}")).await;
            let part = part
                .map_err(|e| redis_error(&self.config, &e))?
                .ok_or_else(|| Error::Cache {
                    tier: "redis",
                    detail: format!("index {digest} is missing part {i}"),
                })?;
            out.extend_from_slice(&part);
        }
        if clip_index::index_digest(&out) != *digest {
            return Err(Error::Cache {
                tier: "redis",
                detail: format!("index stored under {digest} does not match its digest"),
            });
        }
        Ok(out)
    }

    /// Checks, once at start, that the set commands which keep the owners of an index
    /// (the controller's) may run on clip's keys: SADD, SCARD and SREM on a probe key of
    /// its own. An error names the command and what to grant, as at connect; trouble of the
    /// moment (a timeout, a failover) is logged and not an error.
    pub async fn may_keep_owners(&self) -> Result<()> {
        let mut c = self.shared.conn();
        let key = probe_key(&self.config.key_prefix);
        let used = async {
            let add: redis::RedisResult<i64> = c.sadd(&key, "probe").await;
            add.map_err(|e| ("SADD", e))?;
            let count: redis::RedisResult<u64> = c.scard(&key).await;
            count.map_err(|e| ("SCARD", e))?;
            let remove: redis::RedisResult<i64> = c.srem(&key, "probe").await;
            remove.map_err(|e| ("SREM", e))
        }
        .await;
        if used.is_err() {
            // A set left by a refused SREM (its last member removed, it is gone).
            let _: redis::RedisResult<i64> = c.del(&key).await;
        }
        match used {
            Ok(_) => Ok(()),
            Err((command, e)) => access_error(&self.config, command, &e),
        }
    }

    /// Records `owner` (e.g. a ClipImage `namespace/name`) as a user of an index.
    pub async fn add_index_owner(&self, digest: &Digest, owner: &str) -> Result<()> {
        let mut c = self.shared.conn();
        let key = format!("{}:o:{}", self.config.key_prefix, digest.hex());
        let r: redis::RedisResult<i64> = c.sadd(&key, owner).await;
        r.map(|_| ()).map_err(|e| redis_error(&self.config, &e))
    }

    /// Drops `owner` from an index; when no owner is left the index and its manifest pointer
    /// are deleted. Returns how many owners remain.
    pub async fn release_index(
        &self,
        digest: &Digest,
        owner: &str,
        manifest: Option<&Digest>,
    ) -> Result<u64> {
        let mut c = self.shared.conn();
        let key = format!("{}:o:{}", self.config.key_prefix, digest.hex());
        let _: redis::RedisResult<i64> = c.srem(&key, owner).await;
        let left: redis::RedisResult<u64> = c.scard(&key).await;
        let left = left.map_err(|e| redis_error(&self.config, &e))?;
        if left > 0 {
            return Ok(left);
        }
        let base = self.index_key(digest);
        let head: redis::RedisResult<Option<String>> = c.get(&base).await;
        if let Ok(Some(head)) = head
            && let Some(parts) = head
                .split_once(' ')
                .and_then(|(p, _)| p.parse::<usize>().ok())
        {
            for i in 0..parts.min(1 << 16) {
                let _: redis::RedisResult<i64> = c.del(format!("{base}:{i}")).await;
            }
        }
        let _: redis::RedisResult<i64> = c.del(&base).await;
        if let Some(m) = manifest {
            let pointer = format!("{}:m:{}", self.config.key_prefix, m.hex());
            let current: redis::RedisResult<Option<String>> = c.get(&pointer).await;
            if current.ok().flatten().as_deref() == Some(digest.to_string().as_str()) {
                let _: redis::RedisResult<i64> = c.del(&pointer).await;
            }
        }
        Ok(0)
    }

    /// Records that every chunk of index `digest` was copied into Redis (expires with the
    /// chunks' TTL, since evicted chunks make it untrue).
    pub async fn mark_warm(&self, digest: &Digest) -> Result<()> {
        let key = format!("{}:w:{}", self.config.key_prefix, digest.hex());
        self.set_expiring(&key, b"1").await
    }

    /// SET that expires with the chunks' TTL (never, when none is configured).
    async fn set_expiring(&self, key: &str, value: &[u8]) -> Result<()> {
        let mut c = self.shared.conn();
        let r: redis::RedisResult<()> = match self.config.ttl {
            Some(t) => c.set_ex(key, value, t.as_secs().max(1)).await,
            None => c.set(key, value).await,
        };
        r.map_err(|e| redis_error(&self.config, &e))
    }

    /// Whether every chunk of index `digest` was copied into Redis (see [`Self::mark_warm`]).
    pub async fn is_warm(&self, digest: &Digest) -> Result<bool> {
        let mut c = self.shared.conn();
        let key = format!("{}:w:{}", self.config.key_prefix, digest.hex());
        let n: redis::RedisResult<i64> = c.exists(&key).await;
        n.map(|n| n > 0).map_err(|e| redis_error(&self.config, &e))
    }

    /// Stores the start-up profile of an image (by manifest digest), for every node;
    /// expires with the chunks' TTL.
    pub async fn publish_profile(&self, manifest: &Digest, text: &str) -> Result<()> {
        self.set_expiring(&self.profile_key(manifest), text.as_bytes())
            .await
    }

    /// The start-up profile a node published for an image, if any and if it is at most
    /// `limit` bytes.
    pub async fn fetch_profile(&self, manifest: &Digest, limit: u64) -> Result<Option<String>> {
        let mut c = self.shared.conn();
        let key = self.profile_key(manifest);
        // One byte past the limit at most, so an oversized value is never read whole.
        let end = isize::try_from(limit).unwrap_or(isize::MAX);
        let got: redis::RedisResult<Vec<u8>> = c.getrange(&key, 0, end).await;
        let got = got.map_err(|e| redis_error(&self.config, &e))?;
        if got.is_empty() || got.len() as u64 > limit {
            return Ok(None);
        }
        Ok(String::from_utf8(got).ok())
    }

    fn profile_key(&self, manifest: &Digest) -> String {
        format!("{}:p:{}", self.config.key_prefix, manifest.hex())
    }

    /// Whether an index with this digest is in Redis.
    pub async fn has_index(&self, digest: &Digest) -> Result<bool> {
        let mut c = self.shared.conn();
        let n: redis::RedisResult<i64> = c.exists(self.index_key(digest)).await;
        n.map(|n| n > 0).map_err(|e| redis_error(&self.config, &e))
    }

    /// Partial read of a stored chunk (GETRANGE), for latency measurements and tools. Not
    /// verified on its own: the read path verifies whole chunks.
    pub async fn get_range_unverified(
        &self,
        key: &ChunkKey,
        start: usize,
        end_inclusive: usize,
    ) -> Option<Vec<u8>> {
        let k = self.chunk_key(&key.digest);
        self.run("getrange", |mut c| async move {
            c.getrange(&k, start as isize, end_inclusive as isize).await
        })
        .await
    }

    /// Event counters for metrics, as (name, value).
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = &self.stats;
        vec![
            ("hit", s.hits.load(Ordering::Relaxed)),
            ("miss", s.misses.load(Ordering::Relaxed)),
            ("error", s.errors.load(Ordering::Relaxed)),
            (
                "breaker_skip",
                s.skipped_open_breaker.load(Ordering::Relaxed),
            ),
            ("verify_failure", s.verify_failures.load(Ordering::Relaxed)),
            ("write", s.writes.load(Ordering::Relaxed)),
            ("lease_taken", s.leases_taken.load(Ordering::Relaxed)),
            ("lease_wait", s.lease_waits.load(Ordering::Relaxed)),
            ("lease_wait_hit", s.lease_wait_hits.load(Ordering::Relaxed)),
            ("reconnect", s.reconnects.load(Ordering::Relaxed)),
        ]
    }
}

impl ChunkCache for RedisCache {
    fn get<'a>(&'a self, key: &'a ChunkKey) -> BoxFuture<'a, Result<Option<Bytes>>> {
        async move {
            let k = self.chunk_key(&key.digest);
            let k2 = k.clone();
            let got: Option<Option<Vec<u8>>> = self
                .run("get", |mut c| async move { c.get(&k2).await })
                .await;
            let Some(found) = got else {
                return Ok(None);
            };
            let Some(data) = found else {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            };
            if data.len() != key.len as usize || Digest::of(&data) != key.digest {
                self.stats.verify_failures.fetch_add(1, Ordering::Relaxed);
                warn!(key = %k, "chunk in redis does not match its digest; deleting it");
                let _: Option<i64> = self
                    .run("del", |mut c| async move { c.del(&k).await })
                    .await;
                return Ok(None);
            }
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            Ok(Some(Bytes::from(data)))
        }
        .boxed()
    }

    fn get_range<'a>(
        &'a self,
        key: &'a ChunkKey,
        range: std::ops::Range<u32>,
    ) -> BoxFuture<'a, Result<Option<Bytes>>> {
        async move {
            if range.is_empty() || range.end > key.len {
                return Ok(None);
            }
            let k = self.chunk_key(&key.digest);
            let (from, to) = (range.start as isize, range.end as isize - 1);
            let got: Option<Vec<u8>> = self
                .run(
                    "getrange",
                    |mut c| async move { c.getrange(&k, from, to).await },
                )
                .await;
            // A missing key reads as empty; a short value is a damaged or foreign one.
            match got {
                Some(data) if data.len() == range.len() => {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    Ok(Some(Bytes::from(data)))
                }
                Some(_) => {
                    self.stats.misses.fetch_add(1, Ordering::Relaxed);
                    Ok(None)
                }
                None => Ok(None),
            }
        }
        .boxed()
    }

    fn put<'a>(&'a self, key: &'a ChunkKey, data: Bytes) -> BoxFuture<'a, Result<()>> {
        async move {
            let k = self.chunk_key(&key.digest);
            let ttl = self.config.ttl;
            let stored: Option<()> = self
                .run("set", |mut c| async move {
                    match ttl {
                        Some(t) => c.set_ex(&k, data.as_ref(), t.as_secs().max(1)).await,
                        None => c.set(&k, data.as_ref()).await,
                    }
                })
                .await;
            if stored.is_some() {
                self.stats.writes.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }
        .boxed()
    }

    fn contains<'a>(&'a self, key: &'a ChunkKey) -> BoxFuture<'a, bool> {
        async move {
            let k = self.chunk_key(&key.digest);
            let n: Option<i64> = self
                .run("exists", |mut c| async move { c.exists(&k).await })
                .await;
            n.is_some_and(|n| n > 0)
        }
        .boxed()
    }

    fn name(&self) -> &'static str {
        "redis"
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        RedisCache::counters(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_of_the_settings_stop_the_start() {
        let config = RedisConfig {
            seeds: vec!["127.0.0.1:1".into()],
            ..RedisConfig::default()
        };
        // Trouble of the moment: left to the breaker.
        let timeout = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no answer",
        ));
        assert!(access_error(&config, "SET", &timeout).is_ok());
        let refused = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        assert!(access_error(&config, "GET", &refused).is_ok());
    }
}
