//! clip-controller: indexes each ClipImage once, ahead of any pod.
//!
//! - [`args`]: the `clip-controller` command line.
//! - [`reconcile`]: resolve, build (shared per digest, bounded, cancellable), publish, status.
//! - [`status`]: server-side apply of the status subresource and the Ready condition.
//! - [`leader`]: leader election on a Lease so replicas never reconcile at once.
//! - [`metrics`]: reconcile and build counters as Prometheus text.
//! - [`error`]: the controller's error type and its metric labels.

pub mod args;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod status;

pub use error::{Error, Result};
pub use reconcile::{Context, error_policy, reconcile};
