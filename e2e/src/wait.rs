//! Waiting, in tests, for something another process does.

use std::time::{Duration, Instant};

/// Polls `done` every 20 ms until it holds; an error naming `what` after `timeout`.
pub fn until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
