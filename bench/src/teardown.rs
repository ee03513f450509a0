//! Undo steps for what a benchmark sets up on the machine: network namespaces, processes,
//! mounts. Each step runs exactly once, in reverse order of setup: when its [`Guard`] drops
//! (normal end, error, panic) or, on SIGINT/SIGTERM/SIGHUP, from a watcher thread just
//! before the process exits, so an interrupted run leaves nothing behind.

use std::io::Read;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

type Undo = Box<dyn FnOnce() + Send>;

/// The undo steps of one benchmark run.
pub struct Teardown {
    steps: Mutex<Vec<(u64, String, Undo)>>,
    next: AtomicU64,
}

impl std::fmt::Debug for Teardown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let steps = self.lock();
        f.debug_list()
            .entries(steps.iter().map(|(_, what, _)| what))
            .finish()
    }
}

/// Runs its undo step when dropped (unless a signal already did).
#[derive(Debug)]
pub struct Guard {
    teardown: Arc<Teardown>,
    id: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.teardown.run(self.id);
    }
}

impl Teardown {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            steps: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, String, Undo)>> {
        self.steps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `undo` for something just set up; it runs when the guard drops.
    pub fn add(
        self: &Arc<Self>,
        what: impl Into<String>,
        undo: impl FnOnce() + Send + 'static,
    ) -> Guard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().push((id, what.into(), Box::new(undo)));
        Guard {
            teardown: self.clone(),
            id,
        }
    }

    fn run(&self, id: u64) {
        let step = {
            let mut steps = self.lock();
            steps
                .iter()
                .position(|(i, _, _)| *i == id)
                .map(|p| steps.remove(p))
        };
        if let Some((_, _, undo)) = step {
            undo();
        }
    }

    /// Runs every step not yet run, newest first.
    pub fn run_all(&self) {
        loop {
            let Some((_, what, undo)) = self.lock().pop() else {
                return;
            };
            eprintln!("teardown: {what}");
            undo();
        }
    }

    /// On SIGINT, SIGTERM or SIGHUP: run every remaining step, then exit with 128 + signal.
    ///
    /// The handler only writes the signal number to a pipe; a thread does the work. Handlers
    /// are reset to the default by `exec`, so child processes are not affected.
    pub fn on_signals(self: &Arc<Self>) -> anyhow::Result<()> {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 fills the two-element array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        SIGNAL_PIPE.store(fds[1], Ordering::SeqCst);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: the handler is async-signal-safe (one write(2) to a pipe).
            let old = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
            if old == libc::SIG_ERR {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        // SAFETY: the read end is ours alone from here on.
        let mut pipe = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        let this = self.clone();
        std::thread::spawn(move || {
            let mut sig = [0u8; 1];
            if pipe.read_exact(&mut sig).is_ok() {
                eprintln!("\ninterrupted (signal {}): tearing down", sig[0]);
                this.run_all();
                std::process::exit(128 + i32::from(sig[0]));
            }
        });
        Ok(())
    }
}

/// The write end of the signal pipe; a signal handler can reach nothing else.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::SeqCst);
    let byte = sig as u8;
    // SAFETY: write(2) is async-signal-safe; the buffer is one byte on this stack.
    unsafe {
        libc::write(fd, (&raw const byte).cast(), 1);
    }
}
