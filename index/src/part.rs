//! Bytes of an index that may be read only when first needed: the checkpoint windows and
//! the block digests (the file format's "bulk", most of an index file). A mount that finds
//! its chunks on local disk never needs them, so [`crate::format::open`] leaves them in
//! the file, and the first fetch from the registry (or range read from a shared cache)
//! reads them, checked against the digest the verified head of the file gives.

use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::digest::Digest;
use crate::error::{Error, Result};

/// A piece of an index's bytes: at hand, or a range of a bulk still in its file.
#[derive(Clone, Default)]
pub struct Part(Repr);

#[derive(Clone)]
enum Repr {
    Here(Bytes),
    Later(Arc<Deferred>, Range<usize>),
}

impl Default for Repr {
    fn default() -> Self {
        Self::Here(Bytes::new())
    }
}

impl Part {
    /// The bytes, read (once for the whole bulk, and checked) if they are still in the file.
    pub fn get(&self) -> Result<Bytes> {
        match &self.0 {
            Repr::Here(b) => Ok(b.clone()),
            Repr::Later(bulk, range) => Ok(bulk.get()?.slice(range.clone())),
        }
    }

    pub fn len(&self) -> usize {
        match &self.0 {
            Repr::Here(b) => b.len(),
            Repr::Later(_, range) => range.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the bytes are at hand (not left in a file).
    pub fn is_loaded(&self) -> bool {
        match &self.0 {
            Repr::Here(_) => true,
            Repr::Later(bulk, _) => bulk.loaded(),
        }
    }

    /// Raw digests, one after the other.
    pub fn of_digests(digests: &[Digest]) -> Self {
        Self::from(digests.iter().flat_map(|d| d.0).collect::<Vec<u8>>())
    }

    pub(crate) fn later(bulk: &Arc<Deferred>, range: Range<usize>) -> Self {
        Self(Repr::Later(bulk.clone(), range))
    }
}

impl From<Bytes> for Part {
    fn from(b: Bytes) -> Self {
        Self(Repr::Here(b))
    }
}

impl From<Vec<u8>> for Part {
    fn from(b: Vec<u8>) -> Self {
        Self(Repr::Here(b.into()))
    }
}

impl From<&'static [u8]> for Part {
    fn from(b: &'static [u8]) -> Self {
        Self(Repr::Here(Bytes::from_static(b)))
    }
}

/// Parts are equal when their bytes are (both read if need be); one that cannot be read
/// equals nothing.
impl PartialEq for Part {
    fn eq(&self, other: &Self) -> bool {
        match (self.get(), other.get()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Part {}

impl fmt::Debug for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Here(b) => write!(f, "Part({} bytes)", b.len()),
            Repr::Later(_, range) => write!(f, "Part(bytes {range:?} of a bulk in its file)"),
        }
    }
}

/// A bulk left in its file: `len` bytes at `at`, whose sha256 is `digest`. Read whole the
/// first time a part of it is asked for; a failure is kept and given to every later ask
/// (the file is the index's: what was wrong once stays wrong).
pub(crate) struct Deferred {
    file: File,
    at: u64,
    len: usize,
    digest: Digest,
    state: Mutex<Option<std::result::Result<Bytes, String>>>,
}

impl Deferred {
    pub(crate) fn new(file: File, at: u64, len: usize, digest: Digest) -> Arc<Self> {
        Arc::new(Self {
            file,
            at,
            len,
            digest,
            state: Mutex::new(None),
        })
    }

    fn loaded(&self) -> bool {
        matches!(*self.lock(), Some(Ok(_)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<std::result::Result<Bytes, String>>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self) -> Result<Bytes> {
        // Under the lock: the many readers of a first fetch wait for one read of the bulk.
        let mut state = self.lock();
        let got = state.get_or_insert_with(|| self.load());
        got.clone().map_err(Error::CorruptIndex)
    }

    fn load(&self) -> std::result::Result<Bytes, String> {
        let what = format!("its bulk ({} bytes at {})", self.len, self.at);
        let mut bulk = Vec::new();
        bulk.try_reserve_exact(self.len)
            .map_err(|e| format!("{what}: {e}"))?;
        bulk.resize(self.len, 0);
        self.file
            .read_exact_at(&mut bulk, self.at)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => format!("the file ends inside {what}"),
                _ => format!("reading {what}: {e}"),
            })?;
        let got = Digest::of(&bulk);
        if got != self.digest {
            return Err(format!(
                "{what} (checkpoint windows, block digests) does not match its digest: \
                 expected {}, got {got}",
                self.digest
            ));
        }
        Ok(bulk.into())
    }
}
