//! [`ClipFs`]: fuser callbacks answered from the index; file data from the chunk store.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::Duration;

use clip_index::{Content, ImageIndex, Inode, NodeKind};
use clip_storage::{BlobSource, ChunkStore};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, IoctlFlags, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request,
};
use tracing::warn;

use super::attr::{attr, file_type};
use super::error::read_errno;
use super::pages::Pages;
use super::passthrough::{Backings, Opened};
use clip_storage::ReadNow;

/// The image never changes under a mount: let the kernel cache names and attributes,
/// including failed lookups (an interpreter probes hundreds of missing paths).
const TTL: Duration = Duration::from_secs(24 * 3600);

/// Asynchronous requests (read-ahead) the kernel keeps in flight to the filesystem.
const MAX_BACKGROUND: u16 = 64;

/// A read-only filesystem over one indexed image.
pub struct ClipFs<S> {
    index: Arc<ImageIndex>,
    store: Arc<ChunkStore<S>>,
    runtime: tokio::runtime::Handle,
    /// Blocks of file data and inodes, for statfs (the image never changes).
    totals: (u64, u64),
    name: String,
    counters: Arc<FsCounters>,
    /// The kernel skips opens once told so (FUSE_NO_OPEN_SUPPORT): the prefetch at open
    /// then starts at a file's first read instead.
    no_open: bool,
    no_opendir: bool,
    /// Hand files the store keeps whole to the kernel (FUSE passthrough), if it agrees.
    want_passthrough: bool,
    backings: Arc<Backings>,
    /// Small files' data put in the page cache, at their first open or by the prefill.
    pages: Arc<Pages<S>>,
}

/// What the kernel asked of the filesystem (for metrics and tests).
#[derive(Debug, Default)]
pub struct FsCounters {
    pub lookups: std::sync::atomic::AtomicU64,
    pub negative_lookups: std::sync::atomic::AtomicU64,
    pub reads: std::sync::atomic::AtomicU64,
    /// Reads answered on the worker that took them (their data in memory or on local disk).
    pub reads_at_once: std::sync::atomic::AtomicU64,
    /// Files whose data was put in the page cache at their first open.
    pub pushes: std::sync::atomic::AtomicU64,
    /// Names the mount looked up itself from the start-up profile, before the program.
    pub prefilled_names: std::sync::atomic::AtomicU64,
    /// Files whose data the mount put in the page cache from the start-up profile.
    pub prefilled_files: std::sync::atomic::AtomicU64,
    /// Opens of files and directories that reached the filesystem (none once the kernel
    /// has been told it need not ask).
    pub opens: std::sync::atomic::AtomicU64,
    /// Opens answered with a whole file on local disk, which the kernel then reads itself.
    pub passthrough_opens: std::sync::atomic::AtomicU64,
    pub readlinks: std::sync::atomic::AtomicU64,
    pub getattrs: std::sync::atomic::AtomicU64,
    pub releases: std::sync::atomic::AtomicU64,
    /// getxattr and listxattr.
    pub xattrs: std::sync::atomic::AtomicU64,
    /// ioctls (a program asking whether a file is a terminal); the kernel sends every one.
    pub ioctls: std::sync::atomic::AtomicU64,
    /// Reads taken from the kernel and not answered yet.
    pub pending_reads: std::sync::atomic::AtomicU64,
    /// Backing files registered with the kernel now (a gauge).
    pub backing_files: std::sync::atomic::AtomicU64,
}

impl FsCounters {
    /// Prometheus text of the requests the kernel sent, by kind, with `labels`.
    pub fn to_prometheus(&self, labels: &str) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let sep = if labels.is_empty() { "" } else { "," };
        let mut s = String::from(
            "# HELP clip_fs_requests_total Requests the kernel sent to the filesystem, by kind (lookup_miss: lookups of missing names, also counted as lookups; open_passthrough: opens answered with a whole file the kernel reads itself, also counted as opens; read_at_once: reads answered without waiting, their data in memory or on local disk, also counted as reads; open_pushed: opens of small files whose data was put in the page cache before the answer, so that no read comes, also counted as opens; prefill_lookup and prefill_pushed: names the mount looked up itself and small files whose data it put in the page cache, from the start-up profile, ahead of the program: not requests of the program's, and its own lookups are also counted as lookups).\n# TYPE clip_fs_requests_total counter\n",
        );
        for (op, v) in [
            ("lookup", &self.lookups),
            ("lookup_miss", &self.negative_lookups),
            ("getattr", &self.getattrs),
            ("open", &self.opens),
            ("open_passthrough", &self.passthrough_opens),
            ("open_pushed", &self.pushes),
            ("prefill_lookup", &self.prefilled_names),
            ("prefill_pushed", &self.prefilled_files),
            ("read", &self.reads),
            ("read_at_once", &self.reads_at_once),
            ("release", &self.releases),
            ("readlink", &self.readlinks),
            ("xattr", &self.xattrs),
            ("ioctl", &self.ioctls),
        ] {
            s.push_str(&format!(
                "clip_fs_requests_total{{op=\"{op}\"{sep}{labels}}} {}\n",
                v.load(Relaxed)
            ));
        }
        s.push_str(&format!(
            "# HELP clip_fs_backing_files Files handed to the kernel (FUSE passthrough) whose backing files are registered now.\n# TYPE clip_fs_backing_files gauge\nclip_fs_backing_files{{{labels}}} {}\n",
            self.backing_files.load(Relaxed)
        ));
        s
    }
}

impl<S> std::fmt::Debug for ClipFs<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClipFs({})", self.name)
    }
}

impl<S: BlobSource> ClipFs<S> {
    /// A filesystem over `store`; with `passthrough`, files the store keeps whole are handed
    /// to the kernel (when it supports that and this process may), through `backings`.
    pub(super) fn new(
        store: Arc<ChunkStore<S>>,
        runtime: tokio::runtime::Handle,
        name: String,
        passthrough: bool,
        backings: Backings,
    ) -> Self {
        let index = store.index().clone();
        let stats = index.stats();
        let pages = Arc::new(Pages::new(store.clone(), runtime.clone(), passthrough));
        let counters = Arc::<FsCounters>::default();
        let backings = Arc::new(backings.reporting_to(counters.clone()));
        backings.watch(&runtime);
        Self {
            totals: (stats.file_bytes.div_ceil(4096), stats.inodes as u64),
            index,
            store,
            runtime,
            name,
            counters,
            no_open: false,
            no_opendir: false,
            want_passthrough: passthrough,
            backings,
            pages,
        }
    }

    /// What puts pages in the kernel's cache for this filesystem (shared with the prefill).
    pub(super) fn pages(&self) -> Arc<Pages<S>> {
        self.pages.clone()
    }

    pub fn counters(&self) -> Arc<FsCounters> {
        self.counters.clone()
    }

    fn attr_of(&self, ino: u64) -> Option<FileAttr> {
        self.index.node(Inode(ino)).map(|n| attr(Inode(ino), &n))
    }

    fn negative_entry() -> FileAttr {
        let mut a = attr(
            Inode(0),
            &clip_index::Node {
                kind: NodeKind::Regular,
                mode: 0,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
                size: 0,
                nlink: 0,
                rdev_major: 0,
                rdev_minor: 0,
                xattrs: Vec::new(),
                content: Content::None,
            },
        );
        a.ino = INodeNo(0);
        a
    }

    fn xattr_reply(data: &[u8], size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(data.len() as u32);
        } else if (size as usize) < data.len() {
            reply.error(Errno::ERANGE);
        } else {
            reply.data(data);
        }
    }
}

/// A path for `ino`, for log messages only (a walk of the tree, on the error path).
fn path_of(index: &ImageIndex, ino: u64) -> String {
    let mut found = None;
    index.walk(|path, i, _| {
        if found.is_none() && i.0 == ino {
            found = Some(String::from_utf8_lossy(path).into_owned());
        }
    });
    found.unwrap_or_else(|| format!("inode {ino}"))
}

impl<S: BlobSource> Filesystem for ClipFs<S> {
    /// What the kernel may do without asking: lookups in one directory in parallel, keep
    /// symlink targets in its cache, learn every entry of a directory it lists (with its
    /// attributes: READDIRPLUS, so a program that lists and then opens or stats causes no
    /// lookup), skip every later opendir (answered with ENOSYS on the first), and either
    /// read files kept whole itself (passthrough, which needs every open) or skip every
    /// later open and release (answered with ENOSYS on the first open: a handle carries
    /// nothing here, and without an open the kernel keeps a file's pages cached). More
    /// read-ahead requests in flight than fuser's default (16), for fetches that overlap.
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        use fuser::InitFlags as F;
        let offered = config.capabilities();
        let _ = config.add_capabilities(
            (F::FUSE_PARALLEL_DIROPS | F::FUSE_CACHE_SYMLINKS | F::FUSE_DO_READDIRPLUS) & offered,
        );
        let _ = config.set_max_background(MAX_BACKGROUND);
        self.no_opendir = offered.contains(F::FUSE_NO_OPENDIR_SUPPORT);
        // Taken over from a server that handed files to the kernel: opens of those must
        // be answered with their backing files (so no no-open mode either).
        if self.backings.has_inherited() {
            self.backings.enable(true);
            return Ok(());
        }
        // Passthrough needs every open (to hand over the backing file), so it replaces
        // the no-open mode; the backing files must not be on a stacked filesystem.
        if self.want_passthrough
            && self.store.keeps_whole_files()
            && offered.contains(F::FUSE_PASSTHROUGH)
            && super::passthrough::may_register()
            && config.set_max_stack_depth(1).is_ok()
            && config.add_capabilities(F::FUSE_PASSTHROUGH).is_ok()
        {
            self.backings.enable(true);
            return Ok(());
        }
        self.no_open = offered.contains(F::FUSE_NO_OPEN_SUPPORT);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        use std::sync::atomic::Ordering::Relaxed;
        self.counters.lookups.fetch_add(1, Relaxed);
        match self.index.node(Inode(parent.0)) {
            Some(n) if n.kind == NodeKind::Directory => {}
            Some(_) => return reply.error(Errno::ENOTDIR),
            None => return reply.error(Errno::ENOENT),
        }
        // The program's lookups, not the prefill's, make the next start-up profile.
        // (The kernel gives 0 for a process outside the server's pid namespace, such as a
        // pod's: never a prefill helper.)
        let pid = req.pid() as i32;
        if pid == 0
            || !self
                .pages
                .prefill_helpers
                .iter()
                .any(|t| t.load(Relaxed) == pid)
        {
            self.store.note_lookup(parent.0, name.as_bytes());
        }
        match self.index.lookup(Inode(parent.0), name.as_bytes()) {
            Some(ino) => match self.attr_of(ino.0) {
                Some(a) => reply.entry(&TTL, &a, Generation(0)),
                None => reply.error(Errno::EIO),
            },
            // Inode 0 with a timeout: the kernel caches the miss.
            None => {
                self.counters.negative_lookups.fetch_add(1, Relaxed);
                reply.entry(&TTL, &Self::negative_entry(), Generation(0))
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.counters
            .getattrs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.attr_of(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.counters
            .readlinks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.index.node(Inode(ino.0)).map(|n| n.content) {
            Some(Content::Symlink { target }) => reply.data(&target),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.counters
            .opens
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.index.node(Inode(ino.0)) {
            Some(n) if n.kind == NodeKind::Directory => reply.error(Errno::EISDIR),
            // Answered once: the kernel then opens files without asking (see init).
            Some(_) if self.no_open => reply.error(Errno::ENOSYS),
            Some(n) => {
                let Content::File { layer, offset } = n.content else {
                    return reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
                };
                let (layer, size) = (layer as usize, n.size);
                let _runtime = self.runtime.enter();
                // An inode with a backing file: every open must use it.
                let known = self.backings.knows(ino.0);
                if known || (self.backings.enabled() && self.store.keeps_whole(size)) {
                    let (backings, store) = (self.backings.clone(), self.store.clone());
                    let open = move || {
                        let began = std::time::Instant::now();
                        let whole = || store.whole_file(layer, offset, size);
                        let opened =
                            backings.open(ino.0, FopenFlags::FOPEN_KEEP_CACHE, whole, reply);
                        tracing::debug!(ino = ino.0, ?opened, took = ?began.elapsed(), "opened");
                        if opened == Opened::Backing {
                            use std::sync::atomic::Ordering::Relaxed;
                            store.stats().whole_files_opened.fetch_add(1, Relaxed);
                            return;
                        }
                        // Kept whole for a later open, if its chunks are all on local disk.
                        store.keep_whole(layer, offset, size);
                        store.opened(layer, offset..offset + size);
                    };
                    if known {
                        open();
                    } else {
                        // Its first open in this process reads the whole copy to check it:
                        // not on a FUSE worker, which other readers are waiting for.
                        self.runtime.spawn_blocking(open);
                    }
                    return;
                }
                // At the first open, before the answer: no reader of it exists yet.
                if self.pages.push(ino.0, layer, offset, size) {
                    self.counters
                        .pushes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                // No per-open state: the handle is 0, and the page cache survives reopening.
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
                self.store.opened(layer, offset..offset + size);
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.counters
            .reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(node) = self.index.node(Inode(ino.0)) else {
            return reply.error(Errno::ENOENT);
        };
        let (layer, base) = match node.content {
            Content::File { layer, offset } => (layer as usize, offset),
            _ if node.kind == NodeKind::Regular => return reply.data(&[]),
            _ => return reply.error(Errno::EINVAL),
        };
        if offset >= node.size {
            return reply.data(&[]);
        }
        let len = u64::from(size).min(node.size - offset);
        let _runtime = self.runtime.enter();
        // Where an open would have started the prefetch of the file's first bytes.
        if offset == 0 && self.no_open {
            self.store.opened(layer, base..base + node.size);
        }
        let (from, end) = (base + offset, base + node.size);
        let answer = {
            let image = self.name.clone();
            let index = self.index.clone();
            move |result: clip_storage::Result<bytes::Bytes>| match result {
                Ok(bytes) => reply.data(&bytes),
                Err(e) => {
                    let path = path_of(&index, ino.0);
                    warn!(%image, %path, offset, len, error = %e, "read failed");
                    reply.error(read_errno(&e));
                }
            }
        };
        // Data on local disk or in memory: read here, which spares the hand-over to the
        // runtime (a wake-up of another thread) that the kernel's reader would wait for.
        let read = match self.store.read_now(layer, from, len, end) {
            Some(ReadNow::Done(result)) => {
                self.counters
                    .reads_at_once
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return answer(result);
            }
            Some(ReadNow::Later(read)) => read,
            None => {
                let store = self.store.clone();
                Box::pin(async move { store.read_in_file(layer, from, len, end).await })
            }
        };
        // The worker thread goes back to the kernel at once; a slow fetch blocks only this read.
        let counters = self.counters.clone();
        counters
            .pending_reads
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.runtime.spawn(async move {
            answer(read.await);
            counters
                .pending_reads
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
        let last_usual = self.backings.release(ino.0, fh);
        // Counted once the open is forgotten (a later open finds it gone).
        self.counters
            .releases
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !last_usual {
            return;
        }
        // Its reads brought its chunks: keep it whole for the next open.
        if let Some(n) = self.index.node(Inode(ino.0))
            && let Content::File { layer, offset } = n.content
        {
            let _runtime = self.runtime.enter();
            self.store.keep_whole(layer as usize, offset, n.size);
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.counters
            .opens
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.index.node(Inode(ino.0)) {
            Some(n) if n.kind == NodeKind::Directory && self.no_opendir => {
                reply.error(Errno::ENOSYS)
            }
            Some(n) if n.kind == NodeKind::Directory => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if self.index.node(Inode(ino.0)).is_none() {
            return reply.error(Errno::ENOENT);
        }
        let parent = self.index.parent(Inode(ino.0)).0;
        let children = self.index.children(Inode(ino.0));
        let total = children.len() as u64 + 2;
        for i in offset..total {
            let full = match i {
                0 => reply.add(ino, 1, FileType::Directory, "."),
                1 => reply.add(INodeNo(parent), 2, FileType::Directory, ".."),
                _ => {
                    let Some(d) = children.get((i - 2) as usize) else {
                        break;
                    };
                    let kind = self
                        .index
                        .node(d.inode)
                        .map_or(FileType::RegularFile, |n| file_type(n.kind));
                    reply.add(INodeNo(d.inode.0), i + 1, kind, OsStr::from_bytes(d.name))
                }
            };
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(dir_attr) = self.attr_of(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let parent = self.index.parent(Inode(ino.0)).0;
        let parent_attr = self.attr_of(parent).unwrap_or(dir_attr);
        let children = self.index.children(Inode(ino.0));
        let total = children.len() as u64 + 2;
        for i in offset..total {
            let full = match i {
                0 => reply.add(ino, 1, ".", &TTL, &dir_attr, Generation(0)),
                1 => reply.add(INodeNo(parent), 2, "..", &TTL, &parent_attr, Generation(0)),
                _ => {
                    let Some(d) = children.get((i - 2) as usize) else {
                        break;
                    };
                    let Some(a) = self.attr_of(d.inode.0) else {
                        continue;
                    };
                    reply.add(
                        INodeNo(d.inode.0),
                        i + 1,
                        OsStr::from_bytes(d.name),
                        &TTL,
                        &a,
                        Generation(0),
                    )
                }
            };
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (blocks, inodes) = self.totals;
        reply.statfs(blocks, 0, 0, inodes, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.counters
            .xattrs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(node) = self.index.node(Inode(ino.0)) else {
            return reply.error(Errno::ENOENT);
        };
        match node.xattrs.iter().find(|x| &*x.name == name.as_bytes()) {
            Some(x) => Self::xattr_reply(&x.value, size, reply),
            None => reply.error(Errno::ENODATA),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.counters
            .xattrs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(node) = self.index.node(Inode(ino.0)) else {
            return reply.error(Errno::ENOENT);
        };
        let mut names = Vec::new();
        for x in &node.xattrs {
            names.extend_from_slice(&x.name);
            names.push(0);
        }
        Self::xattr_reply(&names, size, reply);
    }

    /// Nothing to write back: ENOSYS, and the kernel stops sending flushes.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    /// No file here is a terminal or takes ioctls. The kernel asks for every one (an
    /// interpreter's `isatty` on each file it opens), so answer at once, unlogged.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        self.counters
            .ioctls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        reply.error(Errno::ENOTTY);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if self.index.node(Inode(ino.0)).is_none() {
            return reply.error(Errno::ENOENT);
        }
        if mask.contains(AccessFlags::W_OK) {
            return reply.error(Errno::EROFS);
        }
        // default_permissions has the kernel check mode bits itself.
        reply.ok();
    }
}
