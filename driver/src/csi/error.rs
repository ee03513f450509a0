//! Node plugin errors and their gRPC codes: the one place they are mapped.

use tonic::{Code, Status};

/// Why a CSI call failed. Messages name the volume and the cause; secrets never appear.
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("volume {0}: another operation on this volume is in progress")]
    Busy(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Internal(String),
}

impl CsiError {
    /// Classifies a storage error met while preparing `volume`.
    pub fn from_storage(volume: &str, e: &clip_storage::Error) -> Self {
        use clip_storage::Error as E;
        let msg = format!("volume {volume}: {e}");
        match e {
            E::Reference { .. } | E::Platform(_) => CsiError::InvalidArgument(msg),
            E::NotFound { .. } | E::NoMatchingPlatform { .. } => CsiError::NotFound(msg),
            E::Unauthorized { .. } | E::Credentials { .. } => CsiError::PermissionDenied(msg),
            E::Unreachable { .. } | E::Registry { .. } | E::FetchRange { .. } | E::Cache { .. } => {
                CsiError::Unavailable(msg)
            }
            E::Manifest { .. } | E::IndexLayer { .. } | E::Index(_) => {
                CsiError::FailedPrecondition(msg)
            }
            E::Shared(inner) => Self::from_storage(volume, inner),
            _ => CsiError::Internal(msg),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            CsiError::InvalidArgument(_) => Code::InvalidArgument,
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::FailedPrecondition(_) => Code::FailedPrecondition,
            CsiError::Busy(_) => Code::Aborted,
            CsiError::AlreadyExists(_) => Code::AlreadyExists,
            CsiError::Unavailable(_) => Code::Unavailable,
            CsiError::PermissionDenied(_) => Code::PermissionDenied,
            CsiError::ResourceExhausted(_) => Code::ResourceExhausted,
            CsiError::Internal(_) => Code::Internal,
        }
    }
}

impl From<CsiError> for Status {
    fn from(e: CsiError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}
