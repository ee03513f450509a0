//! The one error type of clip-driver.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Storage(#[from] clip_storage::Error),

    #[error(transparent)]
    Index(#[from] clip_index::Error),

    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: {source}")]
    IndexFile {
        path: PathBuf,
        #[source]
        source: clip_index::Error,
    },

    #[error("{0:?} is a directory")]
    IsDirectory(String),

    #[error("{0:?} is not a regular file")]
    NotRegular(String),

    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),

    #[error("interrupted before the mount was ready")]
    Interrupted,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
