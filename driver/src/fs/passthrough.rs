//! FUSE passthrough (Linux 6.9): a file the store keeps whole on local disk is handed to
//! the kernel at open as a backing file, and the kernel reads it (and maps it) itself,
//! with no request per read and its own read-ahead, at local-disk speed.
//!
//! The kernel puts each inode in one mode at a time: while any open of it uses a backing
//! file, every other open must use the same backing file, and while any open of it is
//! served the usual way (reads asked of this filesystem), none may use one; an open that
//! breaks the rule fails with EIO. So opens are counted per inode here: a file goes
//! through a backing file only when no usual open of it is left, and one backing file is
//! registered per inode and reused. It is released some time after the last open of it
//! closes (the kernel may still be finishing that close when the release reaches us).
//!
//! A server that takes over a live connection must answer new opens of an inode the
//! previous server had handed to the kernel with that same backing file, or the kernel
//! fails them. So each mount records the backing ids it registered, inode by inode, in a
//! file (written before an open is answered with a new one, and before one is released);
//! the next server reads it and answers opens of those inodes with those ids, and never
//! registers new ones (it cannot know which inodes the previous server had open the usual
//! way).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fuser::{BackingId, FileHandle, FopenFlags, ReplyOpen};
use tracing::{debug, warn};

use super::filesystem::FsCounters;

/// Handle of an open served through a backing file.
pub const FH_BACKING: FileHandle = FileHandle(1);
/// Handle of an open served the usual way, of a file that may later get a backing file.
pub const FH_COUNTED: FileHandle = FileHandle(2);

/// How long a backing file stays registered after its inode's last open closed, by
/// default. Checked at opens and releases, and by a task every second (or half of a
/// shorter idle time), so that on a mount nobody uses the backing files go too. A backing
/// file whose whole file the cache has evicted goes at the first check after its last
/// open closed: the kernel holds the file open, and with it its disk space.
pub const IDLE: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Slot {
    backing: Option<BackingId>,
    /// The kernel's number for `backing` (or for a previous server's backing file, until
    /// an open wraps it).
    raw: Option<u32>,
    /// Registered by a previous server: kept for the life of the mount.
    inherited: bool,
    /// Opens answered with the backing file and not released.
    backed: u32,
    /// Opens answered the usual way and not released.
    usual: u32,
    /// When `backed` last fell to zero.
    idle_since: Option<Instant>,
    /// The whole file behind `backing` (registered by this server), to see whether the
    /// cache evicted it.
    file: Option<std::fs::File>,
}

impl Slot {
    fn unused(&self) -> bool {
        self.raw.is_none() && self.backed == 0 && self.usual == 0
    }

    /// Whether the backing file may go: registered by this server, no open of it left, and
    /// idle for `idle` or its whole file evicted from the cache (the kernel would hold its
    /// disk space until the backing file goes).
    fn done(&self, now: Instant, idle: Duration) -> bool {
        let evicted = || {
            self.file
                .as_ref()
                .is_some_and(|f| f.metadata().is_ok_and(|m| m.nlink() == 0))
        };
        !self.inherited
            && self.backed == 0
            && self.raw.is_some()
            && self
                .idle_since
                .is_some_and(|t| now.duration_since(t) >= idle || evicted())
    }

    /// Answers an open with the backing file if there is one, else the usual way with
    /// `flags`, and counts it. (The kernel refuses a backing open with `FOPEN_KEEP_CACHE`
    /// (EIO to the program), so the first one drops the pages that usual opens left in
    /// the page cache, inside the program's open(): about 150 ms for 1 GiB.)
    fn answer(&mut self, flags: FopenFlags, reply: ReplyOpen) -> Opened {
        match &self.backing {
            Some(id) => {
                self.backed += 1;
                self.idle_since = None;
                reply.opened_passthrough(FH_BACKING, FopenFlags::empty(), id);
                Opened::Backing
            }
            None => {
                self.usual += 1;
                reply.opened(FH_COUNTED, flags);
                Opened::Usual
            }
        }
    }
}

/// The backing files of one mount and the opens of each inode.
#[derive(Debug)]
pub struct Backings {
    enabled: AtomicBool,
    slots: Mutex<HashMap<u64, Slot>>,
    last_sweep: Mutex<Instant>,
    /// Where the registered ids are recorded for a later server.
    record: Option<PathBuf>,
    /// Taken over: only the previous server's backing files are used.
    inherited_only: bool,
    /// How long a backing file stays registered after its last open closed.
    idle: Duration,
    /// Where the number of registered backing files is shown.
    counters: Option<Arc<FsCounters>>,
}

/// How an open was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// With a backing file: the kernel reads the file itself.
    Backing,
    /// The usual way; the caller may start keeping the file whole for a later open.
    Usual,
}

impl Backings {
    /// For a new mount, recording its backing ids in `record` (an old record there is
    /// removed).
    pub fn fresh(record: Option<PathBuf>) -> Self {
        if let Some(path) = &record {
            let _ = std::fs::remove_file(path);
        }
        Self::with_slots(HashMap::new(), record, false)
    }

    /// For a mount taken over from a server that recorded its backing ids in `record`.
    pub fn inherited(record: Option<PathBuf>) -> Self {
        let slots: HashMap<u64, Slot> = record
            .as_deref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (ino, id) = l.split_once(' ')?;
                Some((ino.parse().ok()?, id.parse().ok()?))
            })
            .map(|(ino, id)| {
                let slot = Slot {
                    raw: Some(id),
                    inherited: true,
                    ..Slot::default()
                };
                (ino, slot)
            })
            .collect();
        Self::with_slots(slots, record, true)
    }

    fn with_slots(
        slots: HashMap<u64, Slot>,
        record: Option<PathBuf>,
        inherited_only: bool,
    ) -> Self {
        Self {
            enabled: AtomicBool::new(false),
            slots: Mutex::new(slots),
            last_sweep: Mutex::new(Instant::now()),
            record,
            inherited_only,
            idle: IDLE,
            counters: None,
        }
    }

    /// With backing files released `idle` after their last open closed.
    pub fn with_idle(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// Showing the number of registered backing files in `counters`.
    pub(super) fn reporting_to(mut self, counters: Arc<FsCounters>) -> Self {
        self.counters = Some(counters);
        self.report(&self.lock());
        self
    }

    /// Sweeps every second (or half of a shorter idle time) on `runtime`, until the
    /// mount's filesystem (the last holder of these backings) is gone.
    pub(super) fn watch(self: &Arc<Self>, runtime: &tokio::runtime::Handle) {
        let this = Arc::downgrade(self);
        // Also soon after the cache evicted the whole file of an idle backing file.
        let every = (self.idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(1));
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(backings) = this.upgrade() else {
                    return;
                };
                backings.sweep();
            }
        });
    }

    fn report(&self, slots: &HashMap<u64, Slot>) {
        if let Some(c) = &self.counters {
            let n = slots.values().filter(|s| s.raw.is_some()).count();
            c.backing_files.store(n as u64, Ordering::Relaxed);
        }
    }

    /// Whether a previous server left backing files that opens must keep using.
    pub fn has_inherited(&self) -> bool {
        self.lock().values().any(|s| s.inherited)
    }

    /// Whether `ino` has a backing file (opens of it must use it).
    pub fn knows(&self, ino: u64) -> bool {
        self.lock().get(&ino).is_some_and(|s| s.raw.is_some())
    }

    /// Writes the registered ids, but those of `leaving`, to the record (called with the
    /// slots locked, so records are written in the order of the changes). False if the
    /// record could not be written: the change must then not happen.
    fn write_record(&self, slots: &HashMap<u64, Slot>, leaving: &[u64]) -> bool {
        let Some(path) = &self.record else {
            return true;
        };
        let mut text = String::new();
        for (ino, slot) in slots {
            if let Some(id) = slot.raw.filter(|_| !leaving.contains(ino)) {
                text.push_str(&format!("{ino} {id}\n"));
            }
        }
        let tmp = path.with_extension("tmp");
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, text))
            .and_then(|()| std::fs::rename(&tmp, path));
        match written {
            Ok(()) => true,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "recording backing files failed; files are read through clip until it works");
                false
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Turns passthrough on (the kernel agreed at INIT) or off.
    pub fn enable(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Answers an open of `ino`: with its registered backing file, or one from `whole`
    /// (called without the lock held, as it may read the whole file to check it) when no
    /// usual open of it is left, else the usual way with `flags`.
    pub fn open(
        &self,
        ino: u64,
        flags: FopenFlags,
        whole: impl FnOnce() -> Option<std::fs::File>,
        reply: ReplyOpen,
    ) -> Opened {
        self.sweep();
        {
            let mut slots = self.lock();
            let slot = slots.entry(ino).or_default();
            if let (None, Some(raw)) = (&slot.backing, slot.raw) {
                // SAFETY: the previous server registered this id on this connection and
                // never closed it (its record says so); it is closed only when this
                // wrapper drops.
                slot.backing = Some(unsafe { reply.wrap_backing(raw) });
            }
            if slot.backing.is_some() || slot.usual > 0 || self.inherited_only {
                if slot.backing.is_none() {
                    debug!(
                        ino,
                        usual = slot.usual,
                        "opened the usual way, as its other opens"
                    );
                }
                return self.answer(slot, flags, reply);
            }
        }
        let file = if self.enabled() { whole() } else { None };
        let mut slots = self.lock();
        let slot = slots.entry(ino).or_default();
        // Another open of the inode may have been answered meanwhile: follow it.
        let mut registered = false;
        if slot.backing.is_none()
            && slot.usual == 0
            && self.enabled()
            && let Some(file) = file
        {
            match reply.open_backing(&file) {
                Ok(id) => {
                    let raw = id.into_raw();
                    // SAFETY: just registered on this connection; closed when dropped.
                    slot.backing = Some(unsafe { reply.wrap_backing(raw) });
                    slot.raw = Some(raw);
                    slot.file = Some(file);
                    registered = true;
                }
                Err(e) => {
                    warn!(error = %e, "the kernel refused a backing file; files are read through clip from now on");
                    self.enable(false);
                }
            }
        }
        // A backing file a later server would not know of must not be handed out.
        if registered
            && !self.write_record(&slots, &[])
            && let Some(slot) = slots.get_mut(&ino)
        {
            slot.backing = None;
            slot.raw = None;
            slot.file = None;
        }
        self.report(&slots);
        let slot = slots.entry(ino).or_default();
        self.answer(slot, flags, reply)
    }

    /// [`Slot::answer`], counting an open answered with a backing file before the answer
    /// (a program sees the count once its open returns).
    fn answer(&self, slot: &mut Slot, flags: FopenFlags, reply: ReplyOpen) -> Opened {
        if slot.backing.is_some()
            && let Some(c) = &self.counters
        {
            c.passthrough_opens.fetch_add(1, Ordering::Relaxed);
        }
        slot.answer(flags, reply)
    }

    /// An open of `ino` answered with `fh` was closed. True when it was the last usual
    /// open of a file with no backing file (the next open may get one).
    pub fn release(&self, ino: u64, fh: FileHandle) -> bool {
        let mut last_usual = false;
        {
            let mut slots = self.lock();
            if let Some(slot) = slots.get_mut(&ino) {
                if fh == FH_BACKING {
                    slot.backed = slot.backed.saturating_sub(1);
                    if slot.backed == 0 {
                        slot.idle_since = Some(Instant::now());
                    }
                } else if fh == FH_COUNTED {
                    slot.usual = slot.usual.saturating_sub(1);
                    last_usual = slot.usual == 0 && slot.backing.is_none();
                }
                if slot.unused() {
                    slots.remove(&ino);
                }
            }
        }
        self.sweep();
        last_usual
    }

    /// Releases backing files idle for the idle time, or idle with their whole file
    /// evicted (at most one sweep a second, or per half of a shorter idle time).
    fn sweep(&self) {
        let now = Instant::now();
        {
            let mut last = self.last_sweep.lock().unwrap_or_else(|p| p.into_inner());
            if now.duration_since(*last) < (self.idle / 2).min(Duration::from_secs(1)) {
                return;
            }
            *last = now;
        }
        let mut slots = self.lock();
        let idle: Vec<u64> = slots
            .iter()
            .filter(|(_, s)| s.done(now, self.idle))
            .map(|(ino, _)| *ino)
            .collect();
        // Out of the record before the kernel forgets them (else kept, and tried again).
        if idle.is_empty() || !self.write_record(&slots, &idle) {
            return;
        }
        for ino in idle {
            if let Some(slot) = slots.get_mut(&ino) {
                // Dropping the id closes it.
                slot.backing = None;
                slot.raw = None;
                slot.idle_since = None;
                slot.file = None;
            }
        }
        slots.retain(|_, s| !s.unused());
        self.report(&slots);
    }
}

/// Whether this process may register backing files: the kernel asks for CAP_SYS_ADMIN.
pub fn may_register() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}
