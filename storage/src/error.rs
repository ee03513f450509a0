//! The one error type of clip-storage.

/// Everything that can go wrong fetching or keeping image bytes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid image reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },

    #[error("invalid platform {0:?}: expected os/arch[/variant], e.g. linux/amd64")]
    Platform(String),

    #[error("image {reference} not found: {detail}")]
    NotFound { reference: String, detail: String },

    #[error("registry {registry} refused the credentials for {reference}: {detail}")]
    Unauthorized {
        registry: String,
        reference: String,
        detail: String,
    },

    #[error("registry {registry} unreachable: {detail}")]
    Unreachable { registry: String, detail: String },

    #[error("registry {registry} failed while {operation}: {detail}")]
    Registry {
        registry: String,
        operation: String,
        detail: String,
    },

    #[error("image {reference} has no manifest for platform {platform} (available: {available})")]
    NoMatchingPlatform {
        reference: String,
        platform: String,
        available: String,
    },

    #[error("malformed {what} of {reference}: {detail}")]
    Manifest {
        reference: String,
        what: &'static str,
        detail: String,
    },

    #[error("fetching {len} bytes at {offset} of blob {digest}: {detail}")]
    FetchRange {
        digest: String,
        offset: u64,
        len: u64,
        detail: String,
    },

    #[error("{tier} cache: {detail}")]
    Cache { tier: &'static str, detail: String },

    #[error("the index has no layer {0}")]
    NoSuchLayer(usize),

    #[error("credentials file {path}: {detail}")]
    Credentials { path: String, detail: String },

    #[error("indexing layer {layer} ({digest}): {source}")]
    IndexLayer {
        layer: usize,
        digest: String,
        #[source]
        source: clip_index::Error,
    },

    #[error(transparent)]
    Index(#[from] clip_index::Error),

    /// A failure of a fetch that several readers shared.
    #[error("{0}")]
    Shared(std::sync::Arc<Error>),

    #[error("start-up profile, line {line}: {reason}")]
    Profile { line: usize, reason: String },

    #[error("background task failed: {0}")]
    Task(String),

    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Failures worth retrying: the registry or the network may recover.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unreachable { .. } | Error::Registry { .. })
    }
}

/// Result with clip-storage's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
