//! Compares a real directory tree (a mount) with the model, or with a real extraction of
//! the same image, the way a user's tools see it: lstat, readlink, listxattr/getxattr, read.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::model::{Kind, Tree};

/// Extended attributes of `path` (not following symlinks).
pub fn xattrs(path: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut names = vec![0u8; 64 * 1024];
    // SAFETY: c is a valid path; names is a writable buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    ensure!(
        n >= 0,
        "listxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name)?;
        let mut value = vec![0u8; 64 * 1024];
        // SAFETY: as above.
        let len = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        ensure!(
            len >= 0,
            "getxattr {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        value.truncate(len as usize);
        out.push((String::from_utf8_lossy(name).into_owned(), value));
    }
    out.sort();
    Ok(out)
}

/// Every path under `root`, relative, as "/a/b".
pub fn list(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = vec!["/".to_owned()];
    let mut todo = vec![(root.to_owned(), String::new())];
    while let Some((dir, rel)) = todo.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let p = format!("{rel}/{name}");
            if e.file_type()?.is_dir() {
                todo.push((e.path(), p.clone()));
            }
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Asserts that the tree at `root` is exactly the model: the same paths, and for each its
/// type, mode, owner, mtime (with nanoseconds), link count, size, symlink target, device
/// numbers, xattrs and bytes.
pub fn assert_dir_matches(root: &Path, expected: &Tree) -> anyhow::Result<()> {
    let got = list(root)?;
    let want: Vec<String> = expected.keys().cloned().collect();
    if got != want {
        let extra: Vec<_> = got.iter().filter(|p| !expected.contains_key(*p)).collect();
        let missing: Vec<_> = want.iter().filter(|p| !got.contains(p)).collect();
        bail!("paths differ: extra {extra:?}, missing {missing:?}");
    }
    let mut inodes: BTreeMap<usize, u64> = BTreeMap::new();
    for (rel, e) in expected {
        let path = root.join(rel.trim_start_matches('/'));
        let m = std::fs::symlink_metadata(&path).with_context(|| rel.clone())?;
        let ft = m.file_type();
        let kind_ok = match &e.kind {
            Kind::Dir => ft.is_dir(),
            Kind::File(data) => {
                ensure!(ft.is_file(), "{rel}: not a file");
                ensure!(
                    m.len() == data.len() as u64,
                    "{rel}: size {} != {}",
                    m.len(),
                    data.len()
                );
                let bytes = std::fs::read(&path).with_context(|| rel.clone())?;
                ensure!(bytes == *data, "{rel}: bytes differ");
                true
            }
            Kind::Symlink(t) => {
                ensure!(ft.is_symlink(), "{rel}: not a symlink");
                let target = std::fs::read_link(&path)?;
                ensure!(
                    target.as_os_str().as_bytes() == t.as_bytes(),
                    "{rel}: target {target:?}"
                );
                true
            }
            Kind::CharDevice(ma, mi) | Kind::BlockDevice(ma, mi) => {
                let dev = m.rdev();
                let (gma, gmi) = (libc::major(dev), libc::minor(dev));
                ensure!((gma, gmi) == (*ma, *mi), "{rel}: rdev {gma}:{gmi}");
                match e.kind {
                    Kind::CharDevice(..) => ft.is_char_device(),
                    _ => ft.is_block_device(),
                }
            }
            Kind::Fifo => ft.is_fifo(),
        };
        ensure!(kind_ok, "{rel}: wrong file type {ft:?}");
        ensure!(
            m.mode() & 0o7777 == e.meta.mode,
            "{rel}: mode {:o} != {:o}",
            m.mode() & 0o7777,
            e.meta.mode
        );
        ensure!(
            (m.uid(), m.gid()) == (e.meta.uid, e.meta.gid),
            "{rel}: owner {}:{}",
            m.uid(),
            m.gid()
        );
        ensure!(
            (m.mtime(), m.mtime_nsec()) == (e.meta.mtime, i64::from(e.meta.mtime_nsec)),
            "{rel}: mtime {}.{:09}",
            m.mtime(),
            m.mtime_nsec()
        );
        ensure!(
            m.nlink() == u64::from(e.nlink),
            "{rel}: nlink {} != {}",
            m.nlink(),
            e.nlink
        );
        let mut want_x = e.meta.xattrs.clone();
        want_x.sort();
        ensure!(xattrs(&path)? == want_x, "{rel}: xattrs differ");
        if e.kind != Kind::Dir {
            let prev = inodes.insert(e.identity, m.ino());
            ensure!(
                prev.is_none_or(|i| i == m.ino()),
                "{rel}: hard link on another inode"
            );
        }
    }
    Ok(())
}

/// Asserts that the tree at `root` (a mount) is the tree at `reference` (a real
/// extraction), entry by entry as `lstat`, `readlink`, the xattr calls and `read` see them:
/// the same paths and, for each but the root, its type, mode, owner, mtime with
/// nanoseconds, link count, size, symlink target, device numbers, xattrs and bytes, and the
/// same entries sharing an inode. A directory that the extraction itself changed after
/// `extracted_from` (one a layer wrote into or removed from without naming it, or a parent
/// no layer named) has the time of the extraction there, which no image defines, so its
/// mtime alone is not compared. Returns how many entries were compared.
pub fn assert_same_tree(
    root: &Path,
    reference: &Path,
    extracted_from: std::time::SystemTime,
) -> anyhow::Result<usize> {
    let got = list(root)?;
    let want = list(reference)?;
    if got != want {
        let extra: Vec<_> = got.iter().filter(|p| !want.contains(p)).collect();
        let missing: Vec<_> = want.iter().filter(|p| !got.contains(p)).collect();
        bail!("paths differ from the extraction: extra {extra:?}, missing {missing:?}");
    }
    let mut inodes: BTreeMap<u64, u64> = BTreeMap::new();
    for rel in want.iter().filter(|p| *p != "/") {
        let (g, w) = (
            root.join(rel.trim_start_matches('/')),
            reference.join(rel.trim_start_matches('/')),
        );
        let gm = std::fs::symlink_metadata(&g).with_context(|| rel.clone())?;
        let wm = std::fs::symlink_metadata(&w).with_context(|| rel.clone())?;
        ensure!(
            gm.mode() == wm.mode(),
            "{rel}: type and mode {:o}, extracted {:o}",
            gm.mode(),
            wm.mode()
        );
        ensure!(
            (gm.uid(), gm.gid()) == (wm.uid(), wm.gid()),
            "{rel}: owner {}:{}, extracted {}:{}",
            gm.uid(),
            gm.gid(),
            wm.uid(),
            wm.gid()
        );
        let made_by_extraction = wm.is_dir() && wm.modified()? >= extracted_from;
        ensure!(
            made_by_extraction || (gm.mtime(), gm.mtime_nsec()) == (wm.mtime(), wm.mtime_nsec()),
            "{rel}: mtime {}.{:09}, extracted {}.{:09}",
            gm.mtime(),
            gm.mtime_nsec(),
            wm.mtime(),
            wm.mtime_nsec()
        );
        ensure!(
            gm.nlink() == wm.nlink(),
            "{rel}: nlink {}, extracted {}",
            gm.nlink(),
            wm.nlink()
        );
        ensure!(
            xattrs(&g)? == xattrs(&w)?,
            "{rel}: xattrs {:?}, extracted {:?}",
            xattrs(&g)?,
            xattrs(&w)?
        );
        let ft = wm.file_type();
        if ft.is_dir() {
            continue;
        }
        ensure!(
            gm.len() == wm.len(),
            "{rel}: size {}, extracted {}",
            gm.len(),
            wm.len()
        );
        if ft.is_file() {
            ensure!(
                std::fs::read(&g).with_context(|| rel.clone())? == std::fs::read(&w)?,
                "{rel}: bytes differ from the extraction"
            );
        } else if ft.is_symlink() {
            ensure!(
                std::fs::read_link(&g)? == std::fs::read_link(&w)?,
                "{rel}: symlink target differs from the extraction"
            );
        } else if ft.is_char_device() || ft.is_block_device() {
            ensure!(gm.rdev() == wm.rdev(), "{rel}: device numbers differ");
        }
        let prev = inodes.insert(wm.ino(), gm.ino());
        ensure!(
            prev.is_none_or(|i| i == gm.ino()),
            "{rel}: the extraction's hard links are not one inode here"
        );
    }
    let distinct: std::collections::BTreeSet<_> = inodes.values().collect();
    ensure!(
        distinct.len() == inodes.len(),
        "entries that are separate in the extraction share an inode here"
    );
    Ok(want.len())
}

/// Bytes of the files under `dir`, however deep (0 if it does not exist).
pub fn bytes_under(dir: &Path) -> u64 {
    files_under(dir).values().map(|(_, len)| len).sum()
}

/// Every file under `dir`, however deep (none if it does not exist), with its inode
/// number and size.
pub fn files_under(dir: &Path) -> BTreeMap<PathBuf, (u64, u64)> {
    let mut found = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => todo.push(e.path()),
                Ok(m) => {
                    found.insert(e.path(), (m.ino(), m.len()));
                }
                Err(_) => {}
            }
        }
    }
    found
}

/// Bytes of the files under `dirs` at one moment, while something may be changing them: a
/// walk is not a snapshot (a file removed after the walk counted it, to make room for one
/// written where the walk has not been yet, would count both), so the dirs are walked
/// until two walks in a row find the same files (same names, inodes and sizes). An error
/// if they never settle within `within`.
pub fn settled_bytes_under(dirs: &[PathBuf], within: Duration) -> anyhow::Result<u64> {
    let walk = || -> Vec<_> { dirs.iter().map(|d| files_under(d)).collect() };
    let started = Instant::now();
    let mut last = walk();
    loop {
        let now = walk();
        if now == last {
            return Ok(now
                .iter()
                .flat_map(|f| f.values())
                .map(|(_, len)| len)
                .sum());
        }
        ensure!(
            started.elapsed() < within,
            "the files under {dirs:?} kept changing for {within:?}"
        );
        last = now;
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Runs `script` with `/bin/sh` of the tree at `root` (chroot; root only) and returns what
/// it printed; an error, with its stderr, if it failed.
pub fn run_in_root(root: &Path, script: &str) -> anyhow::Result<String> {
    let out = std::process::Command::new("chroot")
        .arg(root)
        .args(["/bin/sh", "-c", script])
        .output()
        .context("running chroot")?;
    ensure!(
        out.status.success(),
        "{script}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// How many of the pages of `path` that hold bytes `range` are in the page cache, of how
/// many: asked of the kernel (mincore of a mapping of the file), without reading them.
pub fn resident(path: &Path, range: std::ops::Range<u64>) -> anyhow::Result<(usize, usize)> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len() as usize;
    let page = 4096u64;
    let first = (range.start / page) as usize;
    let last = (range.end.div_ceil(page) as usize).min(len.div_ceil(page as usize));
    // SAFETY: a read-only shared mapping of an open file of `len` bytes, unmapped below;
    // mincore writes one byte per page of the mapping into `pages`.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        anyhow::ensure!(map != libc::MAP_FAILED, "mmap of {}", path.display());
        let mut pages = vec![0u8; len.div_ceil(page as usize)];
        let r = libc::mincore(map, len, pages.as_mut_ptr());
        libc::munmap(map, len);
        anyhow::ensure!(r == 0, "mincore of {}", path.display());
        let wanted = &pages[first..last];
        Ok((wanted.iter().filter(|p| *p & 1 == 1).count(), wanted.len()))
    }
}
