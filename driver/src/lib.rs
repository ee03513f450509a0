//! clip-driver: everything that runs on a node.
//!
//! - [`cli`]: the `clip` command line (index, inspect, cat, mount, umount).
//! - [`fs`]: the read-only FUSE filesystem over an index and a chunk store.
//! - [`metrics`]: a minimal Prometheus text endpoint.
//! - [`csi`]: the CSI node plugin (Identity and Node services).
//! - [`mounts`]: the node's persisted mount table.
//! - [`error`]: the crate's error type.

pub mod cli;
pub mod csi;
pub mod error;
pub mod fs;
pub mod keeper;
pub mod metrics;
pub mod mounts;

pub use error::{Error, Result};
