//! The read-only FUSE filesystem over an image index and a chunk store.
//!
//! fuser is used only inside this module: the rest of the driver sees [`MountOptions`] and
//! [`Mount`]. Inode numbers are the index's, and file handles carry no state, so a later
//! server process can take over a live `/dev/fuse` session without a translation table.

mod attr;
mod error;
mod filesystem;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clip_storage::{BlobSource, ChunkStore};

pub use filesystem::{ClipFs, FsCounters};

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Shown as the mount source, e.g. `clip:registry/app@sha256:...`.
    pub fsname: String,
    /// FUSE worker threads (each with its own /dev/fuse descriptor).
    pub threads: usize,
    /// Let other users (a pod's user) use the mount.
    pub allow_other: bool,
    /// The kernel's read-ahead for files of the mount, KiB (0: the kernel's default,
    /// 128 KiB). Larger read-ahead means fewer, larger FUSE reads of a sequential reader.
    pub readahead_kb: u32,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            fsname: "clip".into(),
            threads: 8,
            allow_other: true,
            readahead_kb: 1024,
        }
    }
}

/// A mounted filesystem; unmounted on [`Mount::unmount`] or drop.
pub struct Mount {
    session: Option<fuser::BackgroundSession>,
    dir: PathBuf,
    counters: Arc<FsCounters>,
}

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mount({})", self.dir.display())
    }
}

impl Mount {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the kernel has asked of this mount so far.
    pub fn counters(&self) -> &Arc<FsCounters> {
        &self.counters
    }

    /// Unmounts and waits for the session to end.
    pub fn unmount(mut self) -> std::io::Result<()> {
        match self.session.take() {
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }

    /// Waits until the filesystem is unmounted from outside (`umount`, `clip umount`).
    pub fn join(mut self) -> std::io::Result<()> {
        match self.session.take() {
            Some(s) => s.join(),
            None => Ok(()),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

/// Mounts the image of `store` read-only at `dir`. Reads are served on `runtime`.
pub fn mount<S: BlobSource>(
    store: Arc<ChunkStore<S>>,
    dir: &Path,
    options: &MountOptions,
    runtime: tokio::runtime::Handle,
) -> std::io::Result<Mount> {
    use fuser::MountOption as O;
    let fs = ClipFs::new(store, runtime, options.fsname.clone());
    let counters = fs.counters();
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        O::RO,
        O::NoSuid,
        O::NoDev,
        O::DefaultPermissions,
        O::FSName(options.fsname.clone()),
        O::Subtype("clip".into()),
    ];
    if options.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(options.threads.max(1));
    config.clone_fd = options.threads > 1;
    let session = fuser::spawn_mount(fs, dir, &config)?;
    if options.readahead_kb > 0
        && let Err(e) = set_readahead(dir, options.readahead_kb)
    {
        tracing::warn!(dir = %dir.display(), error = %e, "setting the mount's read-ahead failed; the kernel's default applies");
    }
    Ok(Mount {
        session: Some(session),
        dir: dir.to_owned(),
        counters,
    })
}

/// Sets the read-ahead of the mount at `dir` (its backing device in /sys/class/bdi). The
/// kernel caps what FUSE negotiated at mount time to 128 KiB; the sysfs knob lifts it for
/// files opened afterwards.
fn set_readahead(dir: &Path, kb: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir)?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    std::fs::write(
        format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"),
        kb.to_string(),
    )
}

/// Detaches whatever is mounted at `dir`, also a dead FUSE mount whose server is gone
/// (readers of a dead mount get ENOTCONN until it is detached).
pub fn unmount_path(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: c is a valid NUL-terminated path.
    let r = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if r == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EPERM) {
        // Not root: the setuid helper may unmount what this user mounted.
        let status = std::process::Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(dir)
            .status()?;
        if status.success() {
            return Ok(());
        }
    }
    Err(err)
}

/// Whether `dir` is a mount point (per /proc/self/mountinfo).
pub fn is_mounted(dir: &Path) -> bool {
    let Ok(canon) = std::fs::canonicalize(dir).or_else(|_| Ok::<_, ()>(dir.to_owned())) else {
        return false;
    };
    let want = canon.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| {
            s.lines()
                .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
        })
        .unwrap_or(false)
}

/// Whether the filesystem at `dir` answers. `statfs` always reaches the FUSE server (unlike
/// `stat`, which the kernel may answer from its caches), so a dead mount shows ENOTCONN.
pub fn mount_responds(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: a zeroed statvfs is a valid out-parameter; c is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
