//! The one error type of clip-index.

use std::io;

/// Everything that can go wrong while building, encoding, decoding or reading an index.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the layer stream: {0}")]
    Io(#[from] io::Error),

    #[error("reading the index: {0}")]
    ReadIndex(io::Error),

    #[error("corrupt gzip stream at compressed offset {offset}: {reason}")]
    Gzip { offset: u64, reason: String },

    #[error("corrupt zstd stream at compressed offset {offset}: {reason}")]
    Zstd { offset: u64, reason: String },

    #[error("layer stream ended early: {what}")]
    Truncated { what: &'static str },

    #[error("malformed tar entry at uncompressed offset {offset}: {reason}")]
    Tar { offset: u64, reason: String },

    #[error("tar entry {path:?} at uncompressed offset {offset}: path escapes the image root")]
    PathEscapesRoot { path: String, offset: u64 },

    #[error("layer {layer}: hard link {path:?} names {target:?}, which does not exist")]
    HardlinkTargetMissing {
        layer: usize,
        path: String,
        target: String,
    },

    #[error("layer {layer}: hard link {path:?} names directory {target:?}")]
    HardlinkToDirectory {
        layer: usize,
        path: String,
        target: String,
    },

    #[error("layer {layer}: resolving {path:?} met too many symbolic links (a symlink loop?)")]
    SymlinkLoop { layer: usize, path: String },

    #[error("layer {layer}: entry {path:?} needs {parent:?} to be a directory, but it is not")]
    NotADirectory {
        layer: usize,
        path: String,
        parent: String,
    },

    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },

    #[error("invalid digest {0:?}: expected sha256:<64 hex digits>")]
    InvalidDigest(String),

    #[error("unsupported layer media type {0:?}")]
    UnsupportedMediaType(String),

    #[error("not a clip index: {0}")]
    NotAnIndex(String),

    #[error("clip index format version {found} is not supported (this build reads {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },

    #[error("corrupt clip index: {0}")]
    CorruptIndex(String),

    #[error("no such file or directory: {0:?}")]
    NotFound(String),

    #[error("not a directory: {0:?}")]
    NotDirectory(String),

    #[error("too many levels of symbolic links resolving {0:?}")]
    Loop(String),

    #[error("range {offset}+{len} is outside layer {layer} ({size} bytes)")]
    RangeOutOfBounds {
        layer: usize,
        offset: u64,
        len: u64,
        size: u64,
    },

    #[error("compressed bytes handed to the chunk decoder do not cover the plan: {0}")]
    ShortInput(String),
}

/// Result with clip-index's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
