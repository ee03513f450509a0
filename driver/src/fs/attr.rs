//! Index nodes as FUSE attributes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clip_index::{Inode, Node, NodeKind};
use fuser::{FileAttr, FileType, INodeNo};

pub fn file_type(kind: NodeKind) -> FileType {
    match kind {
        NodeKind::Directory => FileType::Directory,
        NodeKind::Regular => FileType::RegularFile,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::CharDevice => FileType::CharDevice,
        NodeKind::BlockDevice => FileType::BlockDevice,
        NodeKind::Fifo => FileType::NamedPipe,
    }
}

fn time(secs: i64, nsec: u32) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs.unsigned_abs(), nsec)
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))
            .map_or(UNIX_EPOCH, |t| t + Duration::from_nanos(u64::from(nsec)))
    }
}

/// The attributes `stat` shows for `node`.
pub fn attr(ino: Inode, node: &Node) -> FileAttr {
    let t = time(node.mtime, node.mtime_nsec);
    FileAttr {
        ino: INodeNo(ino.0),
        size: node.size,
        blocks: node.size.div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(node.kind),
        perm: (node.mode & 0o7777) as u16,
        nlink: node.nlink,
        uid: node.uid,
        gid: node.gid,
        rdev: node.rdev() as u32,
        blksize: 128 * 1024,
        flags: 0,
    }
}
