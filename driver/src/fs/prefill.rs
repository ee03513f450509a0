//! Filling a new mount's kernel caches from the image's start-up profile.
//!
//! A program starting on a fresh mount asks the filesystem for every name it looks up
//! (found or not), every symlink it follows and every small file it opens: hundreds of
//! round trips, one after the other, even when all the data is on local disk. The profile
//! of an earlier start names them ([`clip_storage::profile::Profile::paths`]), so as soon as
//! the mount is up, a few threads of the server look them up themselves, in about the same
//! order ([`THREADS`] at a time: a lookup is a round trip), read the symlinks among them,
//! and put the data of the small files the profile read in the page cache
//! ([`super::pages`]). The kernel keeps all of it (long timeouts, cached
//! symlinks, FOPEN_KEEP_CACHE), and the program, a little behind, finds it there.
//!
//! Only paths whose every component but the last is a directory of the index are looked
//! up, from a descriptor of the mount's root, without following a symlink: the prefill
//! never leaves the mount. It stops when the mount or its server is gone, or when this
//! process unmounts it; a path that fails otherwise is skipped.

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
}

impl Control {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Stops the prefill and waits (up to [`STOP_WAIT`]) until it has closed its descriptor
    /// of the mount. Each of its steps is a lookup or a small file: soon over.
    pub(super) fn stop_and_wait(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self
            .ended
            .wait_timeout_while(running, STOP_WAIT, |r| *r)
            .unwrap_or_else(|p| p.into_inner());
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

/// Threads that look up at once.
pub(super) const THREADS: usize = 4;

/// Looks up `profile`'s paths in the mount whose root is `root`, every [`THREADS`]th from
/// `first`, reads the symlinks among them, and pushes the small files whose bytes the
/// profile's reads (`read`) touched and that are on local disk; until done, stopped, or
/// the mount is gone. Counts what it does in `counters`.
fn prefill_share<S: BlobSource>(
    root: &std::fs::File,
    profile: &Profile,
    read: &ReadSpans,
    first: usize,
    pages: &Pages<S>,
    counters: &FsCounters,
    control: &Control,
) {
    let store = pages.store();
    let index = store.index().clone();
    for path in profile.paths.iter().skip(first).step_by(THREADS) {
        if control.stopped() {
            break;
        }
        let Some(parent) = parent_directory(&index, path) else {
            continue;
        };
        let Ok(c) = std::ffi::CString::new(path.as_slice()) else {
            continue;
        };
        // SAFETY: a zeroed stat is a valid out-parameter; c is NUL-terminated and relative,
        // so it is resolved under the mount's root.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::fstatat(
                root.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r != 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                // A name the program looked for and did not find: now a cached miss.
                Some(libc::ENOENT | libc::ENOTDIR) => {}
                // The mount is gone or its server with it.
                Some(libc::ENOTCONN | libc::ENODEV | libc::ECONNABORTED) => break,
                // This path only (a name too long, a directory this user may not search).
                _ => continue,
            }
        }
        counters.prefilled_names.fetch_add(1, Ordering::Relaxed);
        let name = path.rsplit(|&b| b == b'/').next().unwrap_or_default();
        let Some(node) = index
            .lookup(parent, name)
            .and_then(|ino| Some((ino, index.node(ino)?)))
        else {
            continue;
        };
        match node.1.content {
            Content::Symlink { .. } => {
                let mut buf = [0u8; 4096];
                // SAFETY: buf is writable for its length; c as above. Only the kernel's
                // symlink cache is wanted.
                unsafe {
                    libc::readlinkat(
                        root.as_raw_fd(),
                        c.as_ptr(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                };
            }
            // Pushed only with its data on local disk, so that, when it is not, the program's
            // first open can still push it once the profile's fetches bring it.
            Content::File { layer, offset }
                if node.1.kind == NodeKind::Regular
                    && read.touch(layer as usize, offset, node.1.size)
                    && !store.keeps_whole(node.1.size)
                    && store.is_local(layer as usize, offset, node.1.size)
                    && pages.push(node.0.0, layer as usize, offset, node.1.size) =>
            {
                counters.prefilled_files.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

/// Runs the prefill of the mount whose root is `root` on [`THREADS`] threads, each known
/// to `pages` while it runs (its lookups are not recorded as the program's, nor its reads).
fn prefill<S: BlobSource>(
    root: &std::fs::File,
    profile: &Profile,
    pages: &Pages<S>,
    counters: &FsCounters,
    control: &Control,
) {
    let read = profile.read_spans();
    let read = &read;
    std::thread::scope(|scope| {
        for k in 0..THREADS {
            scope.spawn(move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                pages.prefill_threads[k].store(tid, Ordering::Relaxed);
                clip_storage::profile::unrecorded(|| {
                    prefill_share(root, profile, read, k, pages, counters, control)
                });
                pages.prefill_threads[k].store(0, Ordering::Relaxed);
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
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
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
            if !flag.enter() {
                return None;
            }
            // Lookups start from this descriptor (it keeps the filesystem, even
            // detached, until the prefill ends; an unmount by this process stops it
            // and waits for that). O_PATH: no open request of its own.
            let ran = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
                .open(&dir)
                .ok()
                .filter(|root| root.metadata().is_ok_and(|m| m.dev() == device))
                .map(|root| prefill(&root, &profile, &pages, &counters, &flag));
            flag.leave();
            ran.map(|()| dir)
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
