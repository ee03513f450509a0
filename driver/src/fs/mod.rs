//! The read-only FUSE filesystem over an image index and a chunk store.
//!
//! fuser is used only inside this module: the rest of the driver sees [`MountOptions`] and
//! [`Mount`]. Inode numbers are the index's, and file handles carry no state, so a later
//! server process can take over a live `/dev/fuse` session without a translation table.

mod attr;
mod error;
mod filesystem;
mod pages;
mod passthrough;
mod prefill;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clip_storage::{BlobSource, ChunkStore};

pub use filesystem::{ClipFs, FsCounters};
pub use pages::PUSH_MAX;
use passthrough::Backings;

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Shown as the mount source, e.g. `clip:registry/app@sha256:...`.
    pub fsname: String,
    /// FUSE worker threads.
    pub threads: usize,
    /// Give each worker thread its own /dev/fuse descriptor (less contention). Off when the
    /// session may be handed to another process: requests read on a cloned descriptor are
    /// failed by the kernel when the process dies, while those read on the shared one can be
    /// sent again to the next server.
    pub clone_fd: bool,
    /// Let other users (a pod's user) use the mount.
    pub allow_other: bool,
    /// The kernel's read-ahead for files of the mount, KiB (0: the kernel's default,
    /// 128 KiB). Larger read-ahead means fewer, larger FUSE reads of a sequential reader.
    pub readahead_kb: u32,
    /// Hand files kept whole on local disk to the kernel, which reads them itself (FUSE
    /// passthrough, Linux 6.9, CAP_SYS_ADMIN; see [`clip_storage::ChunkStore::keep_whole_files`]).
    /// A mount taken over from another process hands over only the files the previous
    /// process had.
    pub passthrough: bool,
    /// Where the mount records the backing files it handed to the kernel, for a process
    /// that takes it over (see [`resume`]). Without it, a taken-over mount fails new
    /// opens of files the previous process had handed over while they are still open.
    pub backing_record: Option<PathBuf>,
    /// How long a file's backing file stays registered after its last open closed.
    pub backing_idle: std::time::Duration,
    /// Fill the kernel's caches from the start-up profile the store replays, as soon as
    /// the mount is up (see [`prefill`]).
    pub prefill: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            fsname: "clip".into(),
            threads: 8,
            clone_fd: true,
            allow_other: true,
            readahead_kb: 1024,
            passthrough: true,
            backing_record: None,
            backing_idle: passthrough::IDLE,
            prefill: true,
        }
    }
}

/// A mounted filesystem; unmounted on [`Mount::unmount`] or drop, or left to a later server
/// with [`Mount::leave`].
pub struct Mount {
    session: Option<fuser::BackgroundSession>,
    dir: PathBuf,
    counters: Arc<FsCounters>,
    /// A duplicate of the session's /dev/fuse descriptor, for a keeper to hold.
    device: OwnedFd,
    /// Mounted by clip itself (taken over from another process, or mounted before its
    /// server, see [`premount`]): fuser holds no mount handle, so unmount by path, and
    /// only while the mount there is still this one (device number `dev`).
    by_path: bool,
    /// The mount's device number when it started serving (from /proc/self/mountinfo).
    dev: Option<u64>,
    /// Stops the prefill of the kernel's caches, if one was started.
    prefill: Option<Arc<prefill::Control>>,
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

    /// Whether this mount is still served by this process and still the one at its
    /// directory: its session runs, and /proc/self/mountinfo shows the device it started
    /// with there. Asks the mount nothing (see `start_session` for why this process must
    /// not): a `statvfs` of it would be a request to this very process.
    pub fn serving(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| !s.guard.is_finished())
            && self.dev.is_some()
            && mounted_device(&self.dir) == self.dev
    }

    /// A new descriptor of this mount's FUSE connection. Whoever holds it keeps the
    /// connection open after this process ends, so that a later server can take it over.
    pub fn device(&self) -> std::io::Result<OwnedFd> {
        self.device.try_clone()
    }

    /// Ends the prefill and waits for it to close its descriptor of the mount's root (which
    /// keeps the filesystem alive and would make an unmount fail as busy).
    fn stop_prefill(&self) {
        if let Some(control) = &self.prefill {
            control.stop_and_wait();
        }
    }

    /// Unmounts and waits for the session to end.
    pub fn unmount(mut self) -> std::io::Result<()> {
        self.stop_prefill();
        match self.session.take() {
            Some(s) if self.by_path => {
                if self.dev == mounted_device(&self.dir) {
                    unmount_path(&self.dir)?;
                }
                s.join()
            }
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }

    /// Leaves the mount in place without unmounting: the worker threads go on serving
    /// until the process exits, and the kernel keeps the connection for whoever holds a
    /// descriptor of it (see [`Mount::device`] and [`resume`]). Waits up to `drain` for the
    /// reads in progress to be answered (for kernels that cannot send them again).
    pub fn leave(mut self, drain: std::time::Duration) {
        self.stop_prefill();
        let deadline = std::time::Instant::now() + drain;
        while self
            .counters
            .pending_reads
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        if let Some(s) = self.session.take() {
            std::mem::forget(s);
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
        self.stop_prefill();
        if let Some(s) = self.session.take() {
            if self.by_path {
                // Another mount may have replaced this one at the path: leave it be.
                if self.dev == mounted_device(&self.dir) {
                    let _ = unmount_path(&self.dir);
                    let _ = s.join();
                }
            } else {
                let _ = s.umount_and_join();
            }
        }
    }
}

fn session_config(options: &MountOptions) -> fuser::Config {
    use fuser::MountOption as O;
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
    config.clone_fd = options.clone_fd && options.threads > 1;
    config
}

/// Mounts the image of `store` read-only at `dir`. Reads are served on `runtime`.
pub fn mount<S: BlobSource>(
    store: Arc<ChunkStore<S>>,
    dir: &Path,
    options: &MountOptions,
    runtime: tokio::runtime::Handle,
) -> std::io::Result<Mount> {
    // Resolved now, before anything is mounted there (fuser mounts at the resolved path,
    // which is the one /proc/self/mountinfo shows: a symlink to it would not be found).
    let dir = dir.canonicalize()?;
    start_session(store, Connection::New(&dir), options, runtime)
}

/// A FUSE mount whose server is not there yet (see [`premount`]); unmounted on drop unless
/// [`serve`] took it.
pub struct Premount {
    dir: PathBuf,
    device: Option<OwnedFd>,
    /// The device number of the mount, to unmount only this one.
    dev: u64,
}

impl std::fmt::Debug for Premount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Premount({})", self.dir.display())
    }
}

impl Drop for Premount {
    fn drop(&mut self) {
        if self.device.is_some() {
            if mounted_device(&self.dir) == Some(self.dev) {
                let _ = unmount_path(&self.dir);
            }
            // Closing the connection ends it: whoever waited on the mount gets ENOTCONN.
            self.device = None;
        }
    }
}

/// Mounts a FUSE connection at `dir` before the filesystem that will serve it exists (its
/// index still being read), with the options [`mount`] would use. The mount is visible at
/// once, and the kernel holds every request to it (INIT first) until [`serve`] answers
/// them: a program started on it meanwhile waits instead of failing, and its start overlaps
/// the index read. Dropping the result unmounts; whoever waited gets ENOTCONN. Needs the
/// right to call mount(2) (CAP_SYS_ADMIN); without it, [`mount`] after the index is the way.
pub fn premount(dir: &Path, options: &MountOptions) -> std::io::Result<Premount> {
    let mut data = String::from("default_permissions");
    if options.allow_other {
        data.push_str(",allow_other");
    }
    use std::os::unix::fs::MetadataExt;
    let root_mode = std::fs::metadata(dir)?.mode();
    // SAFETY: getuid and getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let device = mount_connection(dir, &options.fsname, root_mode, (uid, gid), &data)?;
    let Some(dev) = mounted_device(dir) else {
        let _ = unmount_path(dir);
        return Err(std::io::Error::other(format!(
            "the mount at {} is not in /proc/self/mountinfo",
            dir.display()
        )));
    };
    Ok(Premount {
        dir: dir.to_owned(),
        device: Some(device),
        dev,
    })
}

/// Serves the premounted `pre` with the image of `store`, as [`mount`] would have. If the
/// session cannot start, `pre` is dropped: the mount does not stay behind, dead.
pub fn serve<S: BlobSource>(
    mut pre: Premount,
    store: Arc<ChunkStore<S>>,
    options: &MountOptions,
    runtime: tokio::runtime::Handle,
) -> std::io::Result<Mount> {
    let device = match &pre.device {
        Some(device) => device.try_clone()?,
        None => return Err(std::io::Error::other("the premount was served already")),
    };
    let mount = start_session(
        store,
        Connection::Premounted {
            dir: &pre.dir,
            device,
            dev: pre.dev,
        },
        options,
        runtime,
    )?;
    // The session holds the connection and `mount` unmounts it now.
    pre.device = None;
    Ok(mount)
}

/// Where a new session's connection comes from.
enum Connection<'a> {
    /// fuser mounts one at `dir`.
    New(&'a Path),
    /// [`premount`] mounted `device` at `dir` (device number `dev`).
    Premounted {
        dir: &'a Path,
        device: OwnedFd,
        dev: u64,
    },
}

fn start_session<S: BlobSource>(
    store: Arc<ChunkStore<S>>,
    connection: Connection<'_>,
    options: &MountOptions,
    runtime: tokio::runtime::Handle,
) -> std::io::Result<Mount> {
    let fs = ClipFs::new(
        store,
        runtime.clone(),
        options.fsname.clone(),
        options.passthrough,
        Backings::fresh(options.backing_record.clone()).with_idle(options.backing_idle),
    );
    let counters = fs.counters();
    let pages = fs.pages();
    let notifier = pages.notifier_slot();
    let config = session_config(options);
    let (session, dir, premounted) = match connection {
        Connection::New(dir) => (fuser::Session::new(fs, dir, &config)?, dir, None),
        Connection::Premounted { dir, device, dev } => {
            let acl = config.acl;
            // Reads and answers the INIT the kernel queued at the mount.
            let session = fuser::Session::from_fd(fs, device, acl, config)?;
            (session, dir, Some(dev))
        }
    };
    let _ = notifier.set(session.notifier());
    let device = session.as_fd().try_clone_to_owned()?;
    let session = session.spawn()?;
    // Never a stat of `dir` from here on: a stat is a request to this very process, and a
    // process killed (SIGKILL) while one of its threads waits for its own answer can never
    // exit (the wait is uninterruptible once a worker has read the request, and the
    // connection ends only when the process has exited). The device number comes from
    // /proc/self/mountinfo instead.
    let dev = premounted.or_else(|| mounted_device(dir));
    if options.readahead_kb > 0
        && let Err(e) = set_readahead(dir, dev, options.readahead_kb)
    {
        tracing::warn!(dir = %dir.display(), error = %e, "setting the mount's read-ahead failed; the kernel's default applies");
    }
    let prefill = options
        .prefill
        .then_some(dev)
        .flatten()
        .map(|dev| prefill::start(dir, dev, pages, counters.clone(), &runtime));
    if prefill.is_none() && options.prefill {
        tracing::debug!(dir = %dir.display(), "no prefill: the mount is not in /proc/self/mountinfo");
    }
    Ok(Mount {
        session: Some(session),
        dir: dir.to_owned(),
        counters,
        device,
        by_path: premounted.is_some(),
        dev,
        prefill,
    })
}

/// Serves a live FUSE connection that another process mounted at `dir` and can no longer
/// serve (it exited; `device` is a descriptor of the connection that a keeper held on to).
///
/// The kernel sends INIT only when a filesystem is mounted, and fuser answers requests only
/// after INIT, so the session is first initialised on a scratch mount under `scratch` (same
/// kernel, same options), then its descriptor is swapped for `device` with dup3 and the
/// scratch mount removed. Requests the old server had read and not answered are then sent
/// again by the kernel (FUSE_NOTIFY_RESEND, Linux 6.9), so no reader waits forever.
pub fn resume<S: BlobSource>(
    store: Arc<ChunkStore<S>>,
    dir: &Path,
    device: OwnedFd,
    scratch: &Path,
    options: &MountOptions,
    runtime: tokio::runtime::Handle,
) -> std::io::Result<Mount> {
    let here = mounted_device(dir).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("nothing is mounted at {}", dir.display()),
        )
    })?;
    // The previous server's usual opens are unknown here, and a new backing file for an
    // inode it had open would make the open fail: only its own are used (`passthrough`).
    let fs = ClipFs::new(
        store,
        runtime,
        options.fsname.clone(),
        false,
        Backings::inherited(options.backing_record.clone()).with_idle(options.backing_idle),
    );
    let counters = fs.counters();
    let notifier = fs.pages().notifier_slot();
    let mut config = session_config(options);
    config.mount_options.clear();
    let session = initialised_on_scratch(fs, scratch, config)?;
    // SAFETY: both descriptors are open; dup3 atomically makes the session's descriptor
    // number refer to the kept connection and closes the scratch connection it referred to.
    let r = unsafe {
        libc::dup3(
            device.as_raw_fd(),
            session.as_fd().as_raw_fd(),
            libc::O_CLOEXEC,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let _ = notifier.set(session.notifier());
    if let Err(e) = resend(&device) {
        tracing::warn!(dir = %dir.display(), error = %e, "the kernel cannot send unanswered requests again (Linux 6.9 can); a read in flight at the hand-over may wait until it is interrupted");
    }
    let session = session.spawn()?;
    Ok(Mount {
        session: Some(session),
        dir: dir.to_owned(),
        counters,
        device,
        by_path: true,
        dev: Some(here),
        prefill: None,
    })
}

/// A fuser session that has answered INIT on a scratch mount, which is gone on return.
fn initialised_on_scratch<S: BlobSource>(
    fs: ClipFs<S>,
    scratch: &Path,
    config: fuser::Config,
) -> std::io::Result<fuser::Session<ClipFs<S>>> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = scratch.join(format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    let dev = match mount_connection(&dir, "clip-handover", 0o40000, (0, 0), "") {
        Ok(dev) => dev,
        Err(e) => {
            let _ = std::fs::remove_dir(&dir);
            return Err(e);
        }
    };
    let acl = config.acl;
    let session = fuser::Session::from_fd(fs, dev, acl, config);
    let _ = unmount_path(&dir);
    let _ = std::fs::remove_dir(&dir);
    session
}

/// Opens a new FUSE connection and mounts it at `dir` read-only, nosuid and nodev, from
/// `source`, with the root's mode `root_mode` until the server tells it, for the user and
/// group `owner`, with the further options `extra` (comma-separated kernel options): the
/// mount(2) call fuser makes for root, so that both mounts look the same.
fn mount_connection(
    dir: &Path,
    source: &str,
    root_mode: u32,
    (uid, gid): (u32, u32),
    extra: &str,
) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let invalid = |_| std::io::Error::from(std::io::ErrorKind::InvalidInput);
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let target = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(invalid)?;
    let source = std::ffi::CString::new(source).map_err(invalid)?;
    let mut data = format!(
        "fd={},rootmode={root_mode:o},user_id={uid},group_id={gid}",
        dev.as_raw_fd()
    );
    if !extra.is_empty() {
        data.push(',');
        data.push_str(extra);
    }
    let data = std::ffi::CString::new(data).map_err(invalid)?;
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            c"fuse".as_ptr(),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(OwnedFd::from(dev))
}

/// Whether this kernel can queue again the requests a gone server had read and not answered
/// (FUSE_NOTIFY_RESEND, Linux 6.9).
pub fn kernel_resends() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 9)
}

/// Asks the kernel to queue again every request of the connection that was read and not
/// answered (FUSE_NOTIFY_RESEND).
fn resend(device: &OwnedFd) -> std::io::Result<()> {
    const FUSE_NOTIFY_RESEND: i32 = 7;
    let mut msg = [0u8; 16];
    msg[0..4].copy_from_slice(&16u32.to_ne_bytes());
    msg[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // SAFETY: msg is a valid buffer of 16 bytes: a fuse_out_header with unique 0 (a notice).
    let n = unsafe { libc::write(device.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The device number (major, minor) of the filesystem mounted at `dir`, read from
/// /proc/self/mountinfo so that a mount whose server is gone is never asked.
pub fn mounted_device(dir: &Path) -> Option<u64> {
    let line = mount_line(dir)?;
    let (major, minor) = line.split(' ').nth(2)?.split_once(':')?;
    Some(libc::makedev(major.parse().ok()?, minor.parse().ok()?))
}

/// Sets the read-ahead of the mount at `dir` (its backing device in /sys/class/bdi), whose
/// device number is `dev` (from /proc/self/mountinfo: not a stat of the mount, see
/// `start_session`). The kernel caps what FUSE negotiated at mount time to 128 KiB; the
/// sysfs knob lifts it for files opened afterwards.
fn set_readahead(dir: &Path, dev: Option<u64>, kb: u32) -> std::io::Result<()> {
    let dev = dev.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} is not in /proc/self/mountinfo", dir.display()),
        )
    })?;
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

/// Whether `dir` is a mount point (per /proc/self/mountinfo). Only the parent is resolved,
/// so the mount itself is never asked (a FUSE mount waiting for its next server would make
/// the question wait).
pub fn is_mounted(dir: &Path) -> bool {
    mount_line(dir).is_some()
}

/// The last line of /proc/self/mountinfo that mounts at `dir` (the visible mount there).
pub fn mount_line(dir: &Path) -> Option<String> {
    let resolved = match (dir.parent(), dir.file_name()) {
        // A relative name's parent is "": the working directory.
        (Some(parent), Some(name)) => std::fs::canonicalize(if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        })
        .map(|p| p.join(name))
        .unwrap_or_else(|_| dir.to_owned()),
        _ => dir.to_owned(),
    };
    let want = resolved.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(want.as_str()))
        .map(str::to_owned)
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
