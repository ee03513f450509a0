//! Filling a new mount's kernel caches from the image's start-up profile.
//!
//! A program starting on a fresh mount asks the filesystem for every name it looks up
//! (found or not), every symlink it follows and every small file it opens: hundreds of
//! round trips, one after the other, even when all the data is on local disk. The profile
//! of an earlier start names them ([`clip_storage::profile::Profile::paths`]), so as soon as
//! the mount is up, a few helper processes look them up, in about the same order
//! ([`THREADS`] at a time: a lookup is a round trip), and read the symlinks among them;
//! the server puts the data of the small files the profile read in the page cache
//! ([`super::pages`]) as each is found. The kernel keeps all of it (long timeouts, cached
//! symlinks, FOPEN_KEEP_CACHE), and the program, a little behind, finds it there.
//!
//! The lookups are made by processes of their own, not by threads of the server: a thread
//! waiting for its own filesystem would keep a killed server from ever exiting (see
//! [`Helper`]). Only paths whose every component but the last is a directory of the index
//! are looked up, from a descriptor of the mount's root, without following a symlink: the
//! prefill never leaves the mount. It stops when the mount or its server is gone, or when
//! this process unmounts it; a path that fails otherwise is skipped.

use std::ffi::CStr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use clip_index::{Content, NodeKind};
use clip_storage::BlobSource;
use clip_storage::profile::{Profile, ReadSpans, parent_directory};

use super::filesystem::FsCounters;
use super::pages::Pages;

/// How long a new mount waits for its store to know the profile it replays.
pub(super) const PROFILE_WAIT: Duration = Duration::from_secs(5);

/// Longest wait for a stopped prefill to let go of the mount.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// Stops a mount's prefill, and tells when it holds no descriptor of the mount any more (an
/// open descriptor keeps a detached filesystem alive and makes a plain unmount fail).
#[derive(Debug, Default)]
pub(super) struct Control {
    stop: AtomicBool,
    running: Mutex<bool>,
    ended: Condvar,
    /// The helper processes running (not waited for yet).
    helpers: Mutex<Vec<libc::pid_t>>,
}

impl Control {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn helpers(&self) -> std::sync::MutexGuard<'_, Vec<libc::pid_t>> {
        self.helpers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops the prefill, ends its helpers and waits (up to [`STOP_WAIT`]) until they are
    /// gone, and with them their descriptors of the mount. A helper killed inside a lookup
    /// goes once the server answers it.
    pub(super) fn stop_and_wait(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for &pid in self.helpers().iter() {
            // SAFETY: a child not waited for yet: its pid is still its own.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self
            .ended
            .wait_timeout_while(running, STOP_WAIT, |r| *r)
            .unwrap_or_else(|p| p.into_inner());
    }

    /// Starts a helper with `spawn`, unless the prefill was stopped; `None` then, or if it
    /// could not start.
    fn spawn(&self, spawn: impl FnOnce() -> std::io::Result<Helper>) -> Option<Helper> {
        let mut helpers = self.helpers();
        if self.stopped() {
            return None;
        }
        match spawn() {
            Ok(h) => {
                helpers.push(h.pid);
                Some(h)
            }
            Err(e) => {
                tracing::debug!(error = %e, "no helper process for the prefill");
                None
            }
        }
    }

    /// Ends `helper` (done or not) and waits for it.
    fn end(&self, helper: Helper) {
        self.helpers().retain(|&p| p != helper.pid);
        drop(helper.channel);
        // SAFETY: our child, not waited for yet (only this call waits for it).
        unsafe {
            libc::kill(helper.pid, libc::SIGKILL);
            libc::waitpid(helper.pid, std::ptr::null_mut(), 0);
        }
    }

    /// Marks the prefill running, unless it was stopped already.
    fn enter(&self) -> bool {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        *running = !self.stopped();
        *running
    }

    fn leave(&self) {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = false;
        self.ended.notify_all();
    }
}

/// Helper processes that look up at once.
pub(super) const THREADS: usize = 4;

/// What a helper reports of each path it looked up (one byte each, in order).
mod code {
    /// Found (a symlink also read).
    pub const FOUND: u8 = 0;
    /// Not there: now a cached miss in the kernel.
    pub const MISSING: u8 = 1;
    /// Failed for this path only (a name too long, a directory this user may not search).
    pub const SKIPPED: u8 = 2;
}

/// A path of the profile to look up, and what the server does once it is found.
struct Step {
    path: std::ffi::CString,
    symlink: bool,
    /// A small file the profile read: its inode, layer, offset and size.
    file: Option<(u64, usize, u64, u64)>,
}

/// The profile's paths that the prefill looks up (every component but the last a directory
/// of the index), in order.
fn steps<S: BlobSource>(profile: &Profile, read: &ReadSpans, pages: &Pages<S>) -> Vec<Step> {
    let store = pages.store();
    let index = store.index();
    profile
        .paths
        .iter()
        .filter_map(|path| {
            let parent = parent_directory(index, path)?;
            let c = std::ffi::CString::new(path.as_slice()).ok()?;
            let name = path.rsplit(|&b| b == b'/').next().unwrap_or_default();
            let node = index
                .lookup(parent, name)
                .and_then(|ino| Some((ino, index.node(ino)?)));
            let (symlink, file) = match node {
                Some((_, n)) if matches!(n.content, Content::Symlink { .. }) => (true, None),
                Some((ino, n)) => match n.content {
                    Content::File { layer, offset }
                        if n.kind == NodeKind::Regular
                            && read.touch(layer as usize, offset, n.size)
                            && !store.keeps_whole(n.size) =>
                    {
                        (false, Some((ino.0, layer as usize, offset, n.size)))
                    }
                    _ => (false, None),
                },
                None => (false, None),
            };
            Some(Step {
                path: c,
                symlink,
                file,
            })
        })
        .collect()
}

/// A process of its own that looks up a share of the paths in the mount, so that no
/// thread of the server ever waits for its own filesystem: a server killed (SIGKILL) while
/// one of its threads waits for a request its dead workers had taken could never exit.
/// Its death ends the connection instead, and with it the helper's lookup (ENOTCONN); the
/// helper is also killed when the server dies.
struct Helper {
    pid: libc::pid_t,
    /// The server's end of the pair: a byte to the helper starts it, and it answers one
    /// [`code`] per path.
    channel: std::os::unix::net::UnixStream,
}

/// Starts a helper that opens the mount at `dir` (which must be on `device`) and looks up
/// `share` from its root, once the server says go. Everything it needs is prepared before
/// the fork: the new process, a copy of a multi-threaded one, makes system calls only.
fn spawn_helper(dir: &CStr, device: u64, share: &[&Step]) -> std::io::Result<Helper> {
    let (server, helper) = std::os::unix::net::UnixStream::pair()?;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit it is given room for; getpid has no preconditions.
    let max_fd = match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } {
        0 => limit.rlim_cur.min(1 << 20) as libc::c_int,
        _ => 1 << 16,
    };
    let parent = unsafe { libc::getpid() };
    let job = HelperJob {
        parent,
        channel: helper.as_raw_fd(),
        max_fd,
        dir,
        device,
        share,
    };
    // SAFETY: the child runs only `run_helper` (system calls on memory prepared above: no
    // allocation, no lock) and ends with `_exit`.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => unsafe { run_helper(&job) },
        pid => Ok(Helper {
            pid,
            channel: server,
        }),
    }
}

/// What a helper process is given.
struct HelperJob<'a> {
    /// The server, whose death ends the helper.
    parent: libc::pid_t,
    /// The helper's end of its pair with the server.
    channel: libc::c_int,
    /// Descriptors below this are closed in the helper (if `close_range` is missing).
    max_fd: libc::c_int,
    dir: &'a CStr,
    device: u64,
    share: &'a [&'a Step],
}

/// The life of a helper process, just forked: it keeps only its channel (as descriptor
/// 1), so that no descriptor of the FUSE connection outlives the server in it, waits for
/// the server's go, opens the mount's root (if it is still the mount on `device`), looks
/// up every path, reads the symlinks among them, and tells what each lookup found.
///
/// # Safety
/// Called only in the child of a `fork`, with `job` prepared before it.
unsafe fn run_helper(job: &HelperJob<'_>) -> ! {
    // SAFETY: system calls only, on the job's memory and buffers on this stack.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        if libc::getppid() != job.parent {
            libc::_exit(0);
        }
        // The server's signal handlers are not this process's.
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(sig, libc::SIG_DFL);
        }
        if job.channel != 1 && libc::dup2(job.channel, 1) != 1 {
            libc::_exit(1);
        }
        libc::close(0);
        if libc::syscall(libc::SYS_close_range, 2u32, u32::MAX, 0u32) != 0 {
            for fd in 2..job.max_fd {
                libc::close(fd);
            }
        }
        let mut byte = 0u8;
        if libc::read(1, (&raw mut byte).cast(), 1) != 1 {
            libc::_exit(0);
        }
        let root = libc::open(
            job.dir.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        let mut st: libc::stat = std::mem::zeroed();
        if root < 0 || libc::fstat(root, &mut st) != 0 || st.st_dev as u64 != job.device {
            libc::_exit(0);
        }
        let mut link = [0u8; 4096];
        for step in job.share {
            let path = &step.path;
            let found = libc::fstatat(root, path.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW);
            byte = if found == 0 {
                // Only the kernel's symlink cache is wanted.
                if step.symlink {
                    libc::readlinkat(root, path.as_ptr(), link.as_mut_ptr().cast(), link.len());
                }
                code::FOUND
            } else {
                match *libc::__errno_location() {
                    libc::ENOENT | libc::ENOTDIR => code::MISSING,
                    // The mount is gone or its server with it.
                    libc::ENOTCONN | libc::ENODEV | libc::ECONNABORTED => libc::_exit(0),
                    _ => code::SKIPPED,
                }
            };
            if libc::write(1, (&raw const byte).cast(), 1) != 1 {
                libc::_exit(0);
            }
        }
        libc::_exit(0)
    }
}

/// Follows `helper` through `share`: starts it, counts the names it looked up, and pushes
/// the small files found whose data is on local disk; until it is done, stopped or gone.
/// Ends it and waits for it.
fn follow<S: BlobSource>(
    helper: &Helper,
    share: &[&Step],
    pages: &Pages<S>,
    counters: &FsCounters,
    control: &Control,
) {
    use std::io::{Read, Write};
    let store = pages.store();
    let mut channel = std::io::BufReader::new(&helper.channel);
    if (&helper.channel).write_all(&[1]).is_err() {
        return;
    }
    for step in share {
        let mut byte = [0u8];
        if control.stopped() || channel.read_exact(&mut byte).is_err() {
            break;
        }
        if byte[0] == code::SKIPPED {
            continue;
        }
        counters.prefilled_names.fetch_add(1, Ordering::Relaxed);
        // Pushed only with its data on local disk, so that, when it is not, the program's
        // first open can still push it once the profile's fetches bring it.
        if byte[0] == code::FOUND
            && let Some((ino, layer, offset, size)) = step.file
            && store.is_local(layer, offset, size)
            && pages.push(ino, layer, offset, size)
        {
            counters.prefilled_files.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Runs the prefill of the mount at `dir` (on `device`) in [`THREADS`] helper processes,
/// each followed by a thread of the server and known to `pages` while it runs (its lookups
/// are not recorded as the program's).
fn prefill<S: BlobSource>(
    dir: &CStr,
    device: u64,
    profile: &Profile,
    pages: &Pages<S>,
    counters: &FsCounters,
    control: &Control,
) {
    let read = profile.read_spans();
    let steps = steps(profile, &read, pages);
    std::thread::scope(|scope| {
        for k in 0..THREADS {
            let share: Vec<&Step> = steps.iter().skip(k).step_by(THREADS).collect();
            if share.is_empty() {
                continue;
            }
            let Some(helper) = control.spawn(|| spawn_helper(dir, device, &share)) else {
                break;
            };
            pages.prefill_helpers[k].store(helper.pid, Ordering::Relaxed);
            scope.spawn(move || {
                clip_storage::profile::unrecorded(|| {
                    follow(&helper, &share, pages, counters, control)
                });
                control.end(helper);
                pages.prefill_helpers[k].store(0, Ordering::Relaxed);
            });
        }
    })
}

/// Starts the prefill of a new mount at `dir`, whose device number is `device` (the
/// prefill works only on that mount), in the background: waits (up to [`PROFILE_WAIT`])
/// for the profile the store replays, then runs [`prefill`] on blocking threads. Returns
/// what stops it.
pub(super) fn start<S: BlobSource>(
    dir: &std::path::Path,
    device: u64,
    pages: Arc<Pages<S>>,
    counters: Arc<FsCounters>,
    runtime: &tokio::runtime::Handle,
) -> Arc<Control> {
    use std::os::unix::ffi::OsStrExt;
    let stop = Arc::new(Control::default());
    let dir = dir.to_owned();
    let flag = stop.clone();
    runtime.spawn(async move {
        let Some(profile) = pages.store().replayed_profile(PROFILE_WAIT).await else {
            return;
        };
        if profile.paths.is_empty() || flag.stopped() {
            return;
        }
        let started = std::time::Instant::now();
        let done = counters.clone();
        let ran = tokio::task::spawn_blocking(move || {
            let c_dir = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
            if !flag.enter() {
                return None;
            }
            prefill(&c_dir, device, &profile, &pages, &counters, &flag);
            flag.leave();
            Some(dir)
        })
        .await;
        if let Ok(Some(dir)) = ran {
            let names = done.prefilled_names.load(Ordering::Relaxed);
            let files = done.prefilled_files.load(Ordering::Relaxed);
            let ms = started.elapsed().as_millis() as u64;
            tracing::debug!(dir = %dir.display(), names, files, ms, "kernel caches filled from the start-up profile");
        }
    });
    stop
}
