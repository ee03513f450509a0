//! clip-driver: everything that runs on a node.
//!
//! - [`cli`]: the `clip` command line (index, inspect, cat).
//! - [`error`]: the crate's error type.

pub mod cli;
pub mod error;

pub use error::{Error, Result};
