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

impl Drop for MountProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        detach(&self.dir);
    }
}
