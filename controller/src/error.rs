//! The controller's error type. Transient errors are retried with backoff; permanent ones are
//! written to the status (phase Failed) and an Event, and are not retried in a hot loop.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    #[error(transparent)]
    Storage(#[from] clip_storage::Error),

    #[error(transparent)]
    Index(#[from] clip_index::Error),

    #[error("ClipImage has no namespace or name")]
    Unnamed,

    #[error("{0}")]
    Finalizer(String),
}

impl Error {
    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Storage(e) if e.is_transient() => "registry_unavailable",
            Error::Storage(_) => "storage",
            Error::Index(_) => "index",
            Error::Unnamed => "unnamed",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
