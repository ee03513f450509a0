//! Guards that stop what a test started even when the test fails half-way.

use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::process::Child;

/// A child process that serves a mount at `dir`: on drop the process is killed (if it still
/// runs) and whatever is still mounted at `dir` is detached.
#[derive(Debug)]
pub struct MountProcess {
    pub child: Child,
    pub dir: PathBuf,
}

impl Deref for MountProcess {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl DerefMut for MountProcess {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

/// Detaches whatever is mounted at `dir` (lazily, so a busy or dead mount goes too).
pub fn detach(dir: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) {
        // SAFETY: c is a valid NUL-terminated path; a failure (not mounted) is ignored.
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
}

/// Aborts the FUSE connection mounted at `dir` (through the fusectl filesystem, mounted for
/// it if need be): every wait on it ends with an error, also a server's wait on its own
/// mount that keeps it from dying. Whether there was one to abort.
pub fn abort_connection(dir: &std::path::Path) -> bool {
    // The parent resolved, not `dir`: a stat of the mount would wait on it too.
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return false;
    };
    let Ok(dir) = parent.canonicalize().map(|p| p.join(name)) else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = dir.to_string_lossy().replace(' ', "\\040");
    let Some(minor) = info
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(want.as_str()))
        .filter_map(|l| {
            l.split(' ')
                .nth(2)?
                .split_once(':')
                .map(|(_, m)| m.to_owned())
        })
        .next_back()
    else {
        return false;
    };
    let connections = std::path::Path::new("/sys/fs/fuse/connections");
    if !connections.join(&minor).exists() {
        let _ = std::process::Command::new("mount")
            .args(["-t", "fusectl", "none"])
            .arg(connections)
            .status();
    }
    std::fs::write(connections.join(&minor).join("abort"), "1").is_ok()
}

impl Drop for MountProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        detach(&self.dir);
    }
}
