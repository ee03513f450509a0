//! An OCI registry as a blob source: reference resolution (tags, digests, image indexes and
//! platforms), authentication, streaming whole blobs and HTTP range reads.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use clip_index::Digest;
use futures::{Stream, StreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::{Client, Reference, RegistryOperation};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::warn;

use crate::auth::{Credentials, DockerConfig};
use crate::error::{Error, Result};
use crate::source::BlobSource;

const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
/// Largest manifest or config we accept: real ones are kilobytes.
const MAX_METADATA: usize = 16 << 20;
const RANGE_ATTEMPTS: u32 = 3;

/// `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of this machine, as OCI names it.
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Self {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: None,
        }
    }

    fn matches(&self, os: &str, arch: &str, variant: Option<&str>) -> bool {
        self.os == os
            && self.architecture == arch
            && match (&self.variant, variant) {
                (None, _) => true,
                (Some(want), Some(have)) => want == have,
                // arm64 images often omit the (only) variant v8.
                (Some(want), None) => want == "v8" && arch == "arm64",
            }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok =
            |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Self {
                os: (*os).into(),
                architecture: (*arch).into(),
                variant: None,
            }),
            [os, arch, v] if ok(os) && ok(arch) && ok(v) => Ok(Self {
                os: (*os).into(),
                architecture: (*arch).into(),
                variant: Some((*v).into()),
            }),
            _ => Err(Error::Platform(s.to_owned())),
        }
    }
}

/// How to reach registries.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Hosts (with port) spoken to over plain HTTP. Loopback hosts always are.
    pub insecure: Vec<String>,
    /// Credentials per registry, e.g. from a pull secret.
    pub docker_config: DockerConfig,
    /// Credentials that override `docker_config` for every registry.
    pub credentials: Option<Credentials>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            insecure: Vec::new(),
            docker_config: DockerConfig::default(),
            credentials: None,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// A layer as the manifest and config describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDescriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    pub diff_id: Option<Digest>,
}

/// A reference resolved to one platform's manifest.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// What the user asked for.
    pub requested: String,
    /// `registry/repository`, the form stored in indexes.
    pub repository: String,
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    pub platform: Platform,
    pub layers: Vec<LayerDescriptor>,
}

impl ResolvedImage {
    pub fn compressed_size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestJson {
    media_type: Option<String>,
    config: Option<DescriptorJson>,
    layers: Option<Vec<DescriptorJson>>,
    manifests: Option<Vec<IndexEntryJson>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DescriptorJson {
    media_type: String,
    digest: String,
    size: i64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntryJson {
    digest: String,
    platform: Option<PlatformJson>,
}

#[derive(Debug, Deserialize)]
struct PlatformJson {
    os: String,
    architecture: String,
    variant: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ConfigJson {
    os: Option<String>,
    architecture: Option<String>,
    variant: Option<String>,
    rootfs: Option<RootfsJson>,
}

#[derive(Debug, Deserialize)]
struct RootfsJson {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// Parses a reference the way `docker pull` does (`alpine` is `docker.io/library/alpine:latest`).
pub fn parse_reference(reference: &str) -> Result<Reference> {
    Reference::from_str(reference).map_err(|e| Error::Reference {
        reference: reference.to_owned(),
        reason: e.to_string(),
    })
}

/// Indexes store `registry/repository` as a parsed reference gave them. Splitting that
/// skips the reference grammar (a regex compiled on first use: tens of milliseconds at
/// mount); `None` for anything outside a plain subset, which goes through the full parser
/// and its errors.
fn indexed_reference(repository: &str, manifest: &Digest) -> Option<Reference> {
    let (host, path) = repository.split_once('/')?;
    let plain = plain_host(host) && path.len() <= 255 && path.split('/').all(plain_component);
    plain.then(|| Reference::with_digest(host.to_owned(), path.to_owned(), manifest.to_string()))
}

/// `name(.name)*(:port)?` with names of letters and digits joined by single dashes, that the
/// reference grammar reads as a registry host (it has a dot or a port, or is `localhost`)
/// and that the parser does not rename (Docker Hub's names): a subset of its hosts.
fn plain_host(host: &str) -> bool {
    let (name, port) = host.split_once(':').unwrap_or((host, "1"));
    (host.contains('.') || host.contains(':') || host == "localhost")
        && !matches!(name, "docker.io" | "index.docker.io")
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && name
            .split('.')
            .all(|label| separated(label, |b| b.is_ascii_alphanumeric(), b"-"))
}

/// Lower-case letters and digits joined by single `.`, `_` or `-`: a subset of the
/// reference grammar's path components.
fn plain_component(part: &str) -> bool {
    separated(
        part,
        |b| b.is_ascii_lowercase() || b.is_ascii_digit(),
        b"._-",
    )
}

/// Non-empty runs of `word` bytes, each pair joined by exactly one of `separators`.
fn separated(s: &str, word: impl Fn(u8) -> bool, separators: &[u8]) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && word(b[0])
        && word(b[b.len() - 1])
        && b.windows(2).all(|w| word(w[0]) || word(w[1]))
        && b.iter().all(|&c| word(c) || separators.contains(&c))
}

fn is_loopback(host: &str) -> bool {
    let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
    name == "localhost" || name.starts_with("127.") || name == "[::1]"
}

/// How long a mount's registry warm-up may take (see [`RegistryBlobs::warm_up`]).
pub const WARM_UP_LIMIT: Duration = Duration::from_secs(5);

/// Connections a mount's warm-up leaves open to the registry (HTTP/1.1: one per concurrent
/// fetch; over HTTP/2 they share one).
pub const WARM_UP_CONNECTIONS: usize = 4;

/// A value built once, on first use, outside any lock.
type Lazy<T> = Arc<OnceLock<T>>;

/// Talks to registries. Cheap to clone; one HTTP client (and token cache) per registry host.
#[derive(Clone)]
pub struct RegistryClient {
    config: Arc<RegistryConfig>,
    clients: Arc<Mutex<HashMap<String, Lazy<Arc<Client>>>>>,
    /// Plain HTTP clients for range reads, one per registry host (connection pools).
    http: Arc<Mutex<HashMap<String, Lazy<reqwest::Client>>>>,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient")
            .field("insecure", &self.config.insecure)
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    pub fn new(config: RegistryConfig) -> Self {
        // reqwest is built without a default TLS provider; install ring once per process.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self {
            config: Arc::new(config),
            clients: Arc::new(Mutex::new(HashMap::new())),
            http: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn credentials_for(&self, registry: &str) -> Credentials {
        self.config
            .credentials
            .clone()
            .unwrap_or_else(|| self.config.docker_config.credentials_for(registry))
    }

    fn insecure(&self, registry: &str) -> bool {
        is_loopback(registry) || self.config.insecure.iter().any(|h| h == registry)
    }

    /// The cell of `registry`'s client in `map`; building it is up to the caller, so the
    /// map's lock is never held while a client loads the system's TLS roots.
    fn cell<T>(map: &Mutex<HashMap<String, Lazy<T>>>, registry: &str) -> Lazy<T> {
        let mut map = match map.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(registry.to_owned()).or_default().clone()
    }

    fn build_http(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .connect_timeout(self.config.connect_timeout)
            .read_timeout(self.config.read_timeout)
            .pool_max_idle_per_host(32)
            .user_agent(concat!("clip/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default()
    }

    fn client_for(&self, registry: &str) -> Arc<Client> {
        Self::cell(&self.clients, registry)
            .get_or_init(|| self.build_client(registry))
            .clone()
    }

    fn build_client(&self, registry: &str) -> Arc<Client> {
        let protocol = if self.insecure(registry) {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        Arc::new(Client::new(ClientConfig {
            protocol,
            platform_resolver: None,
            connect_timeout: Some(self.config.connect_timeout),
            read_timeout: Some(self.config.read_timeout),
            ..ClientConfig::default()
        }))
    }

    fn classify(&self, e: OciDistributionError, reference: &Reference, operation: &str) -> Error {
        let registry = reference.resolve_registry().to_owned();
        let shown = reference.whole();
        match e {
            OciDistributionError::UnauthorizedError { url } => Error::Unauthorized {
                registry,
                reference: shown,
                detail: format!("401 Unauthorized from {url}"),
            },
            OciDistributionError::AuthenticationFailure(detail) => Error::Unauthorized {
                registry,
                reference: shown,
                detail,
            },
            OciDistributionError::ImageManifestNotFoundError(detail) => Error::NotFound {
                reference: shown,
                detail,
            },
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                let detail = envelope
                    .errors
                    .iter()
                    .map(|e| e.message.clone())
                    .collect::<Vec<_>>()
                    .join("; ");
                if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::BlobUnknown
                            | OciErrorCode::NotFound
                    )
                }) {
                    Error::NotFound {
                        reference: shown,
                        detail,
                    }
                } else if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    Error::Unauthorized {
                        registry,
                        reference: shown,
                        detail,
                    }
                } else {
                    Error::Registry {
                        registry,
                        operation: operation.into(),
                        detail,
                    }
                }
            }
            OciDistributionError::ServerError {
                code: 404, message, ..
            } => Error::NotFound {
                reference: shown,
                detail: message,
            },
            OciDistributionError::RequestError(e) if e.is_connect() || e.is_timeout() => {
                Error::Unreachable {
                    registry,
                    detail: error_chain(&e),
                }
            }
            other => Error::Registry {
                registry,
                operation: operation.into(),
                detail: error_chain(&other),
            },
        }
    }

    /// Resolves `reference` to one platform's manifest, its config and its layers.
    pub async fn resolve(
        &self,
        reference: &str,
        platform: Option<&Platform>,
    ) -> Result<ResolvedImage> {
        let parsed = parse_reference(reference)?;
        let registry = parsed.resolve_registry().to_owned();
        let client = self.client_for(&registry);
        let auth = self.credentials_for(&registry).to_oci();
        let (body, _) = client
            .pull_manifest_raw(&parsed, &auth, MANIFEST_TYPES)
            .await
            .map_err(|e| self.classify(e, &parsed, "pulling the manifest"))?;
        let mut digest = Digest::of(&body);
        if let Some(want) = parsed.digest()
            && want != digest.to_string()
        {
            return Err(Error::Manifest {
                reference: reference.into(),
                what: "manifest",
                detail: format!("content digest {digest} does not match the reference"),
            });
        }
        let mut manifest = parse_manifest(&body, reference)?;
        let want = platform.cloned().unwrap_or_else(Platform::host);
        if let Some(entries) = &manifest.manifests {
            let chosen = entries
                .iter()
                .find(|m| {
                    m.platform
                        .as_ref()
                        .is_some_and(|p| want.matches(&p.os, &p.architecture, p.variant.as_deref()))
                })
                .ok_or_else(|| Error::NoMatchingPlatform {
                    reference: reference.into(),
                    platform: want.to_string(),
                    available: entries
                        .iter()
                        .filter_map(|m| m.platform.as_ref())
                        .map(|p| match &p.variant {
                            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                            None => format!("{}/{}", p.os, p.architecture),
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            let by_digest = Reference::with_digest(
                parsed.registry().to_owned(),
                parsed.repository().to_owned(),
                chosen.digest.clone(),
            );
            let (body, _) = client
                .pull_manifest_raw(&by_digest, &auth, MANIFEST_TYPES)
                .await
                .map_err(|e| self.classify(e, &by_digest, "pulling the platform manifest"))?;
            digest = Digest::of(&body);
            if digest.to_string() != chosen.digest {
                return Err(Error::Manifest {
                    reference: reference.into(),
                    what: "platform manifest",
                    detail: format!("content digest {digest} does not match {}", chosen.digest),
                });
            }
            manifest = parse_manifest(&body, reference)?;
            if manifest.manifests.is_some() {
                return Err(Error::Manifest {
                    reference: reference.into(),
                    what: "image index",
                    detail: "an index entry points at another index".into(),
                });
            }
        }
        let bad = |detail: String| Error::Manifest {
            reference: reference.into(),
            what: "manifest",
            detail,
        };
        let config = manifest
            .config
            .ok_or_else(|| bad("no config descriptor".into()))?;
        let config_digest: Digest = config
            .digest
            .parse()
            .map_err(|_| bad(format!("config digest {:?} is not sha256", config.digest)))?;
        let layers = manifest.layers.unwrap_or_default();
        let config_bytes = self
            .fetch_small_blob(&parsed, &config_digest, config.size)
            .await?;
        let config_json: ConfigJson =
            serde_json::from_slice(&config_bytes).map_err(|e| Error::Manifest {
                reference: reference.into(),
                what: "image config",
                detail: e.to_string(),
            })?;
        let diff_ids: Vec<String> = config_json.rootfs.map(|r| r.diff_ids).unwrap_or_default();
        if !diff_ids.is_empty() && diff_ids.len() != layers.len() {
            return Err(bad(format!(
                "{} layers but {} diff_ids in the config",
                layers.len(),
                diff_ids.len()
            )));
        }
        let mut out = Vec::with_capacity(layers.len());
        for (i, l) in layers.iter().enumerate() {
            clip_index::Compression::from_media_type(&l.media_type).map_err(|_| {
                bad(format!(
                    "layer {i} has unsupported media type {:?}",
                    l.media_type
                ))
            })?;
            out.push(LayerDescriptor {
                media_type: l.media_type.clone(),
                digest: l
                    .digest
                    .parse()
                    .map_err(|_| bad(format!("layer {i} digest {:?} is not sha256", l.digest)))?,
                size: u64::try_from(l.size)
                    .map_err(|_| bad(format!("layer {i} has a negative size")))?,
                diff_id: match diff_ids.get(i) {
                    Some(d) => Some(
                        d.parse()
                            .map_err(|_| bad(format!("diff_id {d:?} is not sha256")))?,
                    ),
                    None => None,
                },
            });
        }
        let platform = match (config_json.os, config_json.architecture) {
            (Some(os), Some(architecture)) => Platform {
                os,
                architecture,
                variant: config_json.variant,
            },
            _ => want,
        };
        let _ = manifest.media_type;
        Ok(ResolvedImage {
            requested: reference.into(),
            repository: format!("{}/{}", parsed.registry(), parsed.repository()),
            manifest_digest: digest,
            config_digest,
            platform,
            layers: out,
        })
    }

    async fn fetch_small_blob(
        &self,
        image: &Reference,
        digest: &Digest,
        size: i64,
    ) -> Result<Bytes> {
        let len = u64::try_from(size).unwrap_or(0);
        if len as usize > MAX_METADATA {
            return Err(Error::Manifest {
                reference: image.whole(),
                what: "image config",
                detail: format!("{len} bytes is too large"),
            });
        }
        let bytes = self.blob(image.clone()).fetch_range(digest, 0..len).await?;
        if Digest::of(&bytes) != *digest {
            return Err(Error::Manifest {
                reference: image.whole(),
                what: "image config",
                detail: format!("content does not match {digest}"),
            });
        }
        Ok(bytes)
    }

    /// A blob source bound to one repository.
    pub fn blob(&self, repository: Reference) -> RegistryBlobs {
        let registry = repository.resolve_registry().to_owned();
        let scheme = if self.insecure(&registry) {
            "http"
        } else {
            "https"
        };
        let mut base = format!(
            "{scheme}://{registry}/v2/{}/blobs/",
            repository.repository()
        );
        if let Some(ns) = repository.namespace() {
            base = format!("{base}{{digest}}?ns={ns}");
        }
        RegistryBlobs {
            client: Self::cell(&self.clients, &registry),
            http: Self::cell(&self.http, &registry),
            base,
            authorization: Arc::new(Mutex::new(None)),
            credentials: self.credentials_for(&registry),
            registry: self.clone(),
            host: registry,
            repository,
        }
    }

    /// A blob source for `registry/repository` as stored in an index.
    pub fn repository(&self, repository: &str, manifest: &Digest) -> Result<RegistryBlobs> {
        let reference = match indexed_reference(repository, manifest) {
            Some(r) => r,
            None => parse_reference(&format!("{repository}@{manifest}"))?,
        };
        Ok(self.blob(reference))
    }
}

/// The blobs of one repository, read through a registry.
#[derive(Clone)]
pub struct RegistryBlobs {
    /// The registry host; its HTTP clients (shared with every source of the host) are built
    /// on first use (see [`Self::prepare`]).
    host: String,
    client: Lazy<Arc<Client>>,
    http: Lazy<reqwest::Client>,
    base: String,
    /// The Authorization header that last worked (None: anonymous so far).
    authorization: Arc<Mutex<Option<String>>>,
    credentials: Credentials,
    registry: RegistryClient,
    repository: Reference,
}

impl fmt::Debug for RegistryBlobs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RegistryBlobs({})", self.describe())
    }
}

impl RegistryBlobs {
    /// The registry API client (manifests, tokens, whole blobs).
    fn client(&self) -> Arc<Client> {
        self.client
            .get_or_init(|| self.registry.build_client(&self.host))
            .clone()
    }

    /// The client for range reads: they go straight over HTTP, with no auth round trip
    /// unless the registry asks.
    fn http(&self) -> reqwest::Client {
        self.http.get_or_init(|| self.registry.build_http()).clone()
    }

    /// Builds the HTTP clients now. Building one loads the system's TLS roots (tens of
    /// milliseconds), so a mount calls this on another thread instead of before mounting,
    /// and the first fetch finds them ready.
    pub fn prepare(&self) {
        self.client();
        self.http();
    }

    /// Starts getting ready for a mount of `index` in the background: [`Self::warm_up`], or
    /// only the clients ([`Self::prepare`]) when a request would be wasted: the first chunk
    /// is cached locally already (`cached`), or a shared cache answers reads first
    /// (`shared`: a thousand nodes should not each ask the registry).
    pub fn warm_up_for(
        &self,
        index: &clip_index::ImageIndex,
        cached: impl Fn(&Digest) -> bool,
        shared: bool,
    ) {
        let first = index.layers.first();
        let warm =
            first.filter(|l| !shared && !l.chunks.first().is_some_and(|c| cached(&c.digest)));
        let this = self.clone();
        match (warm, tokio::runtime::Handle::try_current()) {
            (Some(layer), Ok(runtime)) => {
                let digest = layer.digest;
                runtime.spawn(async move { this.warm_up(&digest).await });
            }
            _ => {
                std::thread::spawn(move || this.prepare());
            }
        }
    }

    /// Gets ready for the first read while the mount comes up: builds the HTTP clients (on
    /// a blocking thread) and reads one byte of `digest`, which opens a pooled connection
    /// (TCP and TLS) and, if the registry asks for credentials, negotiates them (a 401, the
    /// token flow, the retry). A program's first read then pays none of those round trips.
    /// One attempt, at most [`WARM_UP_LIMIT`], logged at debug only: the reads themselves
    /// retry and report what goes wrong.
    pub async fn warm_up(&self, digest: &Digest) {
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || this.prepare()).await;
        let d = digest.to_string();
        let probe = async {
            let mut got = self.first_byte(&d).await;
            if matches!(got, Err(FetchError::Unauthorized)) {
                self.authorize().await.map_err(|e| e.to_string())?;
                got = self.first_byte(&d).await;
            }
            got.map_err(|e| match e {
                FetchError::Http(e) => error_chain(&e),
                FetchError::Status(code, body) => format!("HTTP {code}: {body}"),
                other => format!("{other:?}"),
            })
        };
        let outcome = match tokio::time::timeout(WARM_UP_LIMIT, probe).await {
            Ok(Ok(())) => {
                // More pooled connections, for the fetches a start-up makes in parallel (a
                // file's first spans at open, read-ahead): each would otherwise pay for its
                // connection (and TLS) on the first read that needs it. Each request keeps
                // its connection until all have their answers, so that none is done and
                // handing its connection to the next before that one is sent (a busy
                // machine runs them one after the other).
                let all = tokio::sync::Barrier::new(WARM_UP_CONNECTIONS);
                let more = (0..WARM_UP_CONNECTIONS).map(|_| async {
                    let answer = self.range_request(&d, &(0..1)).send().await;
                    all.wait().await;
                    if let Ok(answer) = answer {
                        let _ = answer.bytes().await;
                    }
                });
                let _ = tokio::time::timeout(WARM_UP_LIMIT, futures::future::join_all(more)).await;
                return;
            }
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {WARM_UP_LIMIT:?}"),
        };
        tracing::debug!(source = %self.describe(), error = %outcome, "warming up the registry failed");
    }

    /// One request for the first byte of blob `d` (the warm-up's probe).
    async fn first_byte(&self, d: &str) -> std::result::Result<(), FetchError> {
        // Room for the whole (one byte) body: nothing needs to drain it.
        let (tx, _rx) = mpsc::channel(4);
        let mut sent = 0;
        self.fetch_once(d, &(0..1), &tx, &mut sent).await
    }

    /// Makes sure credentials are known to the client before the first blob request.
    async fn ensure_auth(&self) {
        self.client()
            .store_auth_if_needed(
                self.repository.resolve_registry(),
                &self.credentials.to_oci(),
            )
            .await;
    }

    /// Forces a fresh token after a 401: tokens expire under long-lived mounts.
    async fn reauthenticate(&self) -> Result<()> {
        self.client()
            .auth(
                &self.repository,
                &self.credentials.to_oci(),
                RegistryOperation::Pull,
            )
            .await
            .map(|_| ())
            .map_err(|e| {
                self.registry
                    .classify(e, &self.repository, "authenticating")
            })
    }

    /// Streams a whole blob.
    pub async fn stream(
        &self,
        digest: &Digest,
    ) -> Result<impl Stream<Item = std::io::Result<Bytes>> + Send + 'static> {
        self.ensure_auth().await;
        let d = digest.to_string();
        let mut reauthed = false;
        loop {
            match self
                .client()
                .pull_blob_stream(&self.repository, d.as_str())
                .await
            {
                Ok(s) => return Ok(s.stream),
                Err(OciDistributionError::UnauthorizedError { .. }) if !reauthed => {
                    reauthed = true;
                    self.reauthenticate().await?;
                }
                Err(e) => {
                    return Err(self
                        .registry
                        .classify(e, &self.repository, "streaming a blob"));
                }
            }
        }
    }

    fn blob_url(&self, digest: &str) -> String {
        if self.base.contains("{digest}") {
            self.base.replace("{digest}", digest)
        } else {
            format!("{}{digest}", self.base)
        }
    }

    /// Gets an Authorization header after a 401: a Bearer token from the realm the registry
    /// names (oci-client runs the token flow), or Basic credentials.
    async fn authorize(&self) -> Result<()> {
        let token = self
            .client()
            .auth(
                &self.repository,
                &self.credentials.to_oci(),
                RegistryOperation::Pull,
            )
            .await
            .map_err(|e| {
                self.registry
                    .classify(e, &self.repository, "authenticating")
            })?;
        let header = match (token, &self.credentials) {
            (Some(t), _) => Some(format!("Bearer {t}")),
            (None, Credentials::Basic { username, password }) => {
                use base64::Engine as _;
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD
                        .encode(format!("{username}:{password}"))
                ))
            }
            (None, Credentials::Bearer(t)) => Some(format!("Bearer {t}")),
            (None, Credentials::Anonymous) => None,
        };
        *self.authorization.lock().unwrap_or_else(|p| p.into_inner()) = header;
        Ok(())
    }

    /// A GET of `range` of blob `digest`, with the credentials the client has.
    fn range_request(&self, digest: &str, range: &Range<u64>) -> reqwest::RequestBuilder {
        let req = self.http().get(self.blob_url(digest)).header(
            reqwest::header::RANGE,
            format!("bytes={}-{}", range.start, range.end.saturating_sub(1)),
        );
        let auth = self
            .authorization
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match auth {
            Some(h) => req.header(reqwest::header::AUTHORIZATION, h),
            None => req,
        }
    }

    /// One range request; its body goes to `sink` piece by piece as it arrives, and `sent`
    /// counts the bytes that went (so a retry can resume after them).
    async fn fetch_once(
        &self,
        digest: &str,
        range: &Range<u64>,
        sink: &mpsc::Sender<Bytes>,
        sent: &mut u64,
    ) -> Result<(), FetchError> {
        let len = range.end - range.start;
        let resp = self
            .range_request(digest, range)
            .send()
            .await
            .map_err(FetchError::Http)?;
        let mut skip = match resp.status().as_u16() {
            206 => 0,
            // The registry ignored Range: read past the prefix ourselves.
            200 => range.start,
            401 => return Err(FetchError::Unauthorized),
            code => {
                let body = resp.text().await.unwrap_or_default();
                return Err(FetchError::Status(code, body.chars().take(300).collect()));
            }
        };
        let mut stream = resp.bytes_stream();
        let mut got = 0u64;
        while got < len {
            let Some(piece) = stream.next().await else {
                break;
            };
            let mut piece = piece.map_err(FetchError::Http)?;
            if skip > 0 {
                let n = skip.min(piece.len() as u64);
                skip -= n;
                piece = piece.slice(n as usize..);
            }
            let want = (len - got) as usize;
            piece.truncate(want);
            if piece.is_empty() {
                continue;
            }
            got += piece.len() as u64;
            *sent += piece.len() as u64;
            sink.send(piece).await.map_err(|_| FetchError::Abandoned)?;
        }
        if got != len {
            return Err(FetchError::Short(got, len));
        }
        Ok(())
    }
}

/// Why one range request failed.
#[derive(Debug)]
enum FetchError {
    Http(reqwest::Error),
    Unauthorized,
    Status(u16, String),
    Short(u64, u64),
    /// The receiver of the bytes went away (its decoder failed or was dropped).
    Abandoned,
}

impl BlobSource for RegistryBlobs {
    async fn fetch_range(&self, digest: &Digest, range: Range<u64>) -> Result<Bytes> {
        let (tx, mut rx) = mpsc::channel(16);
        let mut out = BytesMut::with_capacity((range.end.saturating_sub(range.start)) as usize);
        let fetch = self.stream_range(digest, range, tx);
        let collect = async {
            while let Some(piece) = rx.recv().await {
                out.extend_from_slice(&piece);
            }
        };
        let (fetched, ()) = tokio::join!(fetch, collect);
        fetched?;
        Ok(out.freeze())
    }

    async fn stream_range(
        &self,
        digest: &Digest,
        range: Range<u64>,
        sink: mpsc::Sender<Bytes>,
    ) -> Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        let d = digest.to_string();
        let registry = self.repository.resolve_registry().to_owned();
        let mut reauthed = false;
        let mut attempt = 0;
        let mut sent = 0u64;
        loop {
            attempt += 1;
            // A retry resumes after the bytes already handed on.
            let rest = range.start + sent..range.end;
            let err = match self.fetch_once(&d, &rest, &sink, &mut sent).await {
                Ok(()) => return Ok(()),
                Err(FetchError::Abandoned) => {
                    return Err(Error::Task("the reader of a range went away".into()));
                }
                Err(FetchError::Unauthorized) if !reauthed => {
                    // First contact with an auth registry, or an expired token.
                    reauthed = true;
                    self.authorize().await?;
                    continue;
                }
                Err(FetchError::Unauthorized) => Error::Unauthorized {
                    registry: registry.clone(),
                    reference: self.repository.whole(),
                    detail: format!("401 Unauthorized reading blob {d}"),
                },
                Err(FetchError::Status(404, body)) => Error::NotFound {
                    reference: format!("{}@{d}", self.describe()),
                    detail: body,
                },
                Err(FetchError::Status(code, body)) => Error::Registry {
                    registry: registry.clone(),
                    operation: "reading a blob range".into(),
                    detail: format!("HTTP {code}: {body}"),
                },
                Err(FetchError::Http(e)) if e.is_connect() || e.is_timeout() => {
                    Error::Unreachable {
                        registry: registry.clone(),
                        detail: error_chain(&e),
                    }
                }
                Err(FetchError::Http(e)) => Error::Registry {
                    registry: registry.clone(),
                    operation: "reading a blob range".into(),
                    detail: error_chain(&e),
                },
                Err(FetchError::Short(got, want)) => Error::Registry {
                    registry: registry.clone(),
                    operation: "reading a blob range".into(),
                    detail: format!("short read: {got} of {want} bytes"),
                },
            };
            if !err.is_transient() || attempt >= RANGE_ATTEMPTS {
                return Err(match err {
                    Error::NotFound { .. } | Error::Unauthorized { .. } => err,
                    other => Error::FetchRange {
                        digest: d,
                        offset: range.start,
                        len: range.end - range.start,
                        detail: other.to_string(),
                    },
                });
            }
            warn!(digest = %d, attempt, error = %err, "range read failed; retrying");
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
        }
    }

    fn describe(&self) -> String {
        format!(
            "{}/{}",
            self.repository.resolve_registry(),
            self.repository.repository()
        )
    }
}

fn parse_manifest(body: &[u8], reference: &str) -> Result<ManifestJson> {
    if body.len() > MAX_METADATA {
        return Err(Error::Manifest {
            reference: reference.into(),
            what: "manifest",
            detail: "too large".into(),
        });
    }
    serde_json::from_slice(body).map_err(|e| Error::Manifest {
        reference: reference.into(),
        what: "manifest",
        detail: e.to_string(),
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_and_match() -> Result<()> {
        let p: Platform = "linux/arm64/v8".parse()?;
        assert!(p.matches("linux", "arm64", None));
        assert!(!p.matches("linux", "amd64", None));
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux/amd64/v1/x".parse::<Platform>().is_err());
        assert_eq!(
            "linux/amd64".parse::<Platform>()?.to_string(),
            "linux/amd64"
        );
        Ok(())
    }

    #[test]
    fn an_indexed_repository_gives_the_same_source_as_a_parsed_reference() -> Result<()> {
        let client = RegistryClient::new(RegistryConfig::default());
        let digest = Digest::of(b"manifest");
        let long = format!("registry.example.com/{}", "a".repeat(256));
        for (repository, split) in [
            ("127.0.0.1:5000/team/tools", true),
            ("localhost:5000/a", true),
            ("localhost/a-b.c_d/e", true),
            ("registry.example.com/team/app", true),
            // The parser renames or completes these: they must go through it.
            ("docker.io/library/busybox", false),
            ("docker.io/busybox", false),
            ("index.docker.io/x/y", false),
            ("registry/app", false),
            ("registry.example.com/a__b", false),
        ] {
            assert_eq!(
                indexed_reference(repository, &digest).is_some(),
                split,
                "{repository}"
            );
            let fast = client.repository(repository, &digest)?;
            let parsed = parse_reference(&format!("{repository}@{digest}"))?;
            assert_eq!(
                fast.repository.registry(),
                parsed.registry(),
                "{repository}"
            );
            assert_eq!(fast.repository.repository(), parsed.repository());
            assert_eq!(fast.repository.digest(), parsed.digest());
            assert_eq!(fast.base, client.blob(parsed).base);
        }
        for bad in [
            "host/UPPER",
            "host/a//b",
            "/path",
            "a b/c",
            "[::1]:5000/a",
            "host:/a",
            "host/a..b",
            long.as_str(),
        ] {
            assert!(
                client.repository(bad, &digest).is_err(),
                "{bad:?} must be rejected"
            );
        }
        Ok(())
    }

    #[test]
    fn loopback_hosts_are_plain_http() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost:1"));
        assert!(!is_loopback("registry.example.com"));
    }
}
