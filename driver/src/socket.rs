//! Unix socket files the node's processes serve on (the CSI socket, the keeper's).

use std::path::Path;

/// Makes `path` ready to bind: creates its directory and removes a stale socket file left
/// by an earlier run.
pub fn clear_for_bind(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
