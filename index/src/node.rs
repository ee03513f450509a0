//! The merged file tree as stored in an index: nodes addressed by inode number and
//! directory entries sorted by name.

use serde::Serialize;

/// An inode number. Derived from the index (a depth-first walk of the merged tree), never
/// from lookup order, so it is the same in every process that loads the same index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Inode(pub u64);

impl Inode {
    pub const ROOT: Inode = Inode(1);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeKind {
    Directory,
    Regular,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
}

impl NodeKind {
    pub(crate) fn tag(self) -> u8 {
        match self {
            Self::Directory => 0,
            Self::Regular => 1,
            Self::Symlink => 2,
            Self::CharDevice => 3,
            Self::BlockDevice => 4,
            Self::Fifo => 5,
        }
    }

    pub(crate) fn from_tag(t: u8) -> Option<Self> {
        Some(match t {
            0 => Self::Directory,
            1 => Self::Regular,
            2 => Self::Symlink,
            3 => Self::CharDevice,
            4 => Self::BlockDevice,
            5 => Self::Fifo,
            _ => return None,
        })
    }

    /// The `S_IFMT` bits of this kind.
    pub fn file_type_bits(self) -> u32 {
        match self {
            Self::Directory => 0o040000,
            Self::Regular => 0o100000,
            Self::Symlink => 0o120000,
            Self::CharDevice => 0o020000,
            Self::BlockDevice => 0o060000,
            Self::Fifo => 0o010000,
        }
    }
}

/// Where a node's data lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Content {
    None,
    /// A regular file: `size` bytes at `offset` of layer `layer`'s uncompressed stream.
    File {
        layer: u32,
        offset: u64,
    },
    Symlink {
        #[serde(serialize_with = "lossy")]
        target: Box<[u8]>,
    },
    /// Children are `dirents[first..first + count]`, sorted by name.
    Directory {
        first: u32,
        count: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Xattr {
    #[serde(serialize_with = "lossy")]
    pub name: Box<[u8]>,
    #[serde(serialize_with = "lossy")]
    pub value: Box<[u8]>,
}

/// One inode of the merged image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    pub kind: NodeKind,
    /// Permission and special bits (`0o7777`), without the file type.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// File size; the target length for symlinks; 0 otherwise.
    pub size: u64,
    pub nlink: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    pub xattrs: Vec<Xattr>,
    pub content: Content,
}

impl Node {
    /// `st_mode`: file type and permission bits.
    pub fn st_mode(&self) -> u32 {
        self.kind.file_type_bits() | self.mode
    }

    /// Linux `dev_t` encoding of the device number.
    pub fn rdev(&self) -> u64 {
        let (ma, mi) = (u64::from(self.rdev_major), u64::from(self.rdev_minor));
        ((ma & 0xffff_f000) << 32) | ((ma & 0xfff) << 8) | ((mi & 0xffff_ff00) << 12) | (mi & 0xff)
    }
}

/// A directory entry: a name and the inode it points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dirent {
    #[serde(serialize_with = "lossy")]
    pub name: Box<[u8]>,
    pub inode: Inode,
}

/// A directory entry as an index holds it: a name borrowed from the index and the inode it
/// points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Child<'a> {
    pub name: &'a [u8],
    pub inode: Inode,
}

fn lossy<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(b))
}
