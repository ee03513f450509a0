//! `clip keeper`: holds the node's FUSE connections while node plugins come and go.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::error::{Error, Result};
use crate::keeper::KeeperConfig;

#[derive(Debug, Args)]
pub struct KeeperArgs {
    /// The unix socket node plugins hand their mounts to (`clip node --keeper-socket`).
    #[arg(
        long,
        default_value = "/var/lib/clip/keeper.sock",
        env = "CLIP_KEEPER_SOCKET"
    )]
    pub socket: PathBuf,

    /// Seconds a mount whose plugin is gone waits for the next plugin before it is released
    /// (released mounts fail reads with ENOTCONN instead of making them wait).
    #[arg(long, default_value_t = 600, env = "CLIP_KEEPER_HOLD_SECONDS")]
    pub hold_seconds: u64,
}

pub async fn run(args: KeeperArgs) -> Result<()> {
    if args.hold_seconds == 0 {
        return Err(Error::Config("--hold-seconds must be at least 1".into()));
    }
    let config = KeeperConfig {
        socket: args.socket.clone(),
        hold: Duration::from_secs(args.hold_seconds),
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let serving = tokio::task::spawn_blocking(move || crate::keeper::run(config));
    tokio::select! {
        ended = serving => ended
            .map_err(|e| Error::Config(format!("keeper: {e}")))?
            .map_err(|source| Error::File {
                path: args.socket,
                source,
            }),
        // The serving thread blocks in accept; the process ends here, closing what it held
        // (mounts whose plugin runs keep working; those waiting for one are released).
        _ = sigterm.recv() => {
            tracing::info!("keeper stopping");
            std::process::exit(0);
        }
        _ = tokio::signal::ctrl_c() => std::process::exit(0),
    }
}
