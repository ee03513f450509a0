//! clip-driver: everything that runs on a node.
//!
//! - [`cli`]: the `clip` command line (index, inspect, cat, mount, umount).
//! - [`fs`]: the read-only FUSE filesystem over an index and a chunk store.
//! - [`metrics`]: a minimal Prometheus text endpoint.
//! - [`csi`]: the CSI node plugin (Identity and Node services).
//! - [`mounts`]: the node's persisted mount table.
//! - [`keeper`]: holds FUSE connections across restarts of the node plugin.
//! - [`socket`]: unix socket files the node's processes serve on.
//! - [`profile`]: start-up profile files, read at mount and written when recorded.
//! - [`error`]: the crate's error type.

pub mod cli;
pub mod csi;
pub mod error;
pub mod fs;
pub mod keeper;
pub mod metrics;
pub mod mounts;
pub mod profile;
pub mod socket;

pub use error::{Error, Result};

/// Locks `m`, also after a thread panicked while holding it: the data guarded in this crate
/// (tables, maps of handles) stays consistent between statements.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
