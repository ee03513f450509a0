//! The merged tree as the index file encodes it, used in place.
//!
//! Each node and each directory entry stays the record the metadata holds (LEB128 varints,
//! see [`crate::format`]); a table of where each record starts finds it, and it is decoded
//! when asked for. Loading an index scans the records once, checking each and noting where
//! it starts, instead of building a node and a name per inode: a mount of an image of
//! 60,000 files waits for two arrays of offsets, not for 120,000 allocations and the memory
//! they first touch.
//!
//! A table is only handed out checked ([`Table::assemble`]) or built from nodes and entries
//! that [`crate::format::validate`] checks before they are used, so a record that no longer
//! decodes cannot happen; the accessors still give `None` rather than panic if one did.

use std::ops::Range;

use bytes::Bytes;

use crate::codec::{Reader, Writer};
use crate::error::{Error, Result};
use crate::layer::LayerIndex;
use crate::node::{Child, Content, Dirent, Inode, Node, NodeKind, Xattr};

/// Totals of the tree, counted when it is scanned or built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub files: usize,
    pub directories: usize,
    pub symlinks: usize,
    pub other: usize,
    /// Bytes of regular file content (each inode counted once).
    pub file_bytes: u64,
}

impl Counts {
    fn add(&mut self, kind: NodeKind, size: u64) {
        match kind {
            NodeKind::Regular => {
                self.files += 1;
                self.file_bytes = self.file_bytes.saturating_add(size);
            }
            NodeKind::Directory => self.directories += 1,
            NodeKind::Symlink => self.symlinks += 1,
            _ => self.other += 1,
        }
    }
}

/// Nodes (inode `i + 1` is record `i`) and directory entries as records, with where each
/// starts, and each directory's parent.
#[derive(Clone, Default)]
pub(crate) struct Table {
    nodes: Bytes,
    node_at: Vec<u32>,
    entries: Bytes,
    entry_at: Vec<u32>,
    /// The inode of the directory that lists each inode (the root's own for the root).
    parents: Vec<u32>,
    counts: Counts,
}

/// A node record decoded without copying: names, values and targets borrow the record.
struct RawNode<'a> {
    kind: NodeKind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    mtime_nsec: u32,
    size: u64,
    nlink: u32,
    rdev_major: u32,
    rdev_minor: u32,
    /// The extended attributes' records (name, value), `n_xattrs` of them.
    xattrs: &'a [u8],
    n_xattrs: usize,
    content: RawContent<'a>,
}

enum RawContent<'a> {
    None,
    File { layer: u32, offset: u64 },
    Symlink(&'a [u8]),
    Directory { first: u32, count: u32 },
}

fn corrupt(m: String) -> Error {
    Error::CorruptIndex(m)
}

fn read_node<'a>(r: &mut Reader<'a>) -> Result<RawNode<'a>> {
    let kind = NodeKind::from_tag(r.u8()?).ok_or_else(|| corrupt("unknown node kind".into()))?;
    let mode = r.u32()?;
    let uid = r.u32()?;
    let gid = r.u32()?;
    let mtime = r.int()?;
    let mtime_nsec = r.u32()?;
    let size = r.uint()?;
    let nlink = r.u32()?;
    let rdev_major = r.u32()?;
    let rdev_minor = r.u32()?;
    let n_xattrs = r.count(2)?;
    let start = r.pos;
    for _ in 0..n_xattrs {
        r.bytes()?;
        r.bytes()?;
    }
    let xattrs = &r.buf[start..r.pos];
    let content = match r.u8()? {
        0 => RawContent::None,
        1 => RawContent::File {
            layer: r.u32()?,
            offset: r.uint()?,
        },
        2 => RawContent::Symlink(r.bytes()?),
        3 => RawContent::Directory {
            first: r.u32()?,
            count: r.u32()?,
        },
        _ => return Err(corrupt("unknown content tag".into())),
    };
    Ok(RawNode {
        kind,
        mode,
        uid,
        gid,
        mtime,
        mtime_nsec,
        size,
        nlink,
        rdev_major,
        rdev_minor,
        xattrs,
        n_xattrs,
        content,
    })
}

impl RawNode<'_> {
    fn to_node(&self) -> Node {
        let mut r = Reader::new(self.xattrs);
        let xattrs = (0..self.n_xattrs)
            .map_while(|_| {
                let name = r.bytes().ok()?;
                let value = r.bytes().ok()?;
                Some(Xattr {
                    name: name.into(),
                    value: value.into(),
                })
            })
            .collect();
        Node {
            kind: self.kind,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
            mtime_nsec: self.mtime_nsec,
            size: self.size,
            nlink: self.nlink,
            rdev_major: self.rdev_major,
            rdev_minor: self.rdev_minor,
            xattrs,
            content: match self.content {
                RawContent::None => Content::None,
                RawContent::File { layer, offset } => Content::File { layer, offset },
                RawContent::Symlink(target) => Content::Symlink {
                    target: target.into(),
                },
                RawContent::Directory { first, count } => Content::Directory { first, count },
            },
        }
    }
}

fn write_node(w: &mut Writer, n: &Node) {
    w.u8(n.kind.tag());
    w.uint(u64::from(n.mode));
    w.uint(u64::from(n.uid));
    w.uint(u64::from(n.gid));
    w.int(n.mtime);
    w.uint(u64::from(n.mtime_nsec));
    w.uint(n.size);
    w.uint(u64::from(n.nlink));
    w.uint(u64::from(n.rdev_major));
    w.uint(u64::from(n.rdev_minor));
    w.uint(n.xattrs.len() as u64);
    for x in &n.xattrs {
        w.bytes(&x.name);
        w.bytes(&x.value);
    }
    match &n.content {
        Content::None => w.u8(0),
        Content::File { layer, offset } => {
            w.u8(1);
            w.uint(u64::from(*layer));
            w.uint(*offset);
        }
        Content::Symlink { target } => {
            w.u8(2);
            w.bytes(target);
        }
        Content::Directory { first, count } => {
            w.u8(3);
            w.uint(u64::from(*first));
            w.uint(u64::from(*count));
        }
    }
}

fn read_entry<'a>(r: &mut Reader<'a>) -> Result<Child<'a>> {
    Ok(Child {
        name: r.bytes()?,
        inode: Inode(r.uint()?),
    })
}

/// Where a record starts, relative to the first record.
fn offset(at: usize, start: usize) -> Result<u32> {
    u32::try_from(at - start).map_err(|_| corrupt("metadata too large".into()))
}

/// What a scan of the node records found, for [`Table::assemble`].
pub(crate) struct NodeScan {
    /// The records, in the buffer scanned.
    span: Range<usize>,
    at: Vec<u32>,
    /// The links each inode must have: its `nlink`, 1 for a directory.
    links: Vec<u32>,
    /// Each directory: its record, first entry and number of entries.
    dirs: Vec<(u32, u32, u32)>,
    counts: Counts,
}

/// Scans `n` node records from `r`, checking each on its own (kind and content agree, bits
/// and times in range, file data inside its layer of `layers`, symlink sizes).
pub(crate) fn scan_nodes(r: &mut Reader<'_>, n: usize, layers: &[LayerIndex]) -> Result<NodeScan> {
    let start = r.pos;
    let mut at = Vec::with_capacity(n);
    let mut links = Vec::with_capacity(n);
    let mut dirs = Vec::new();
    let mut counts = Counts::default();
    for i in 0..n {
        at.push(offset(r.pos, start)?);
        let node = read_node(r)?;
        let bad = |what: &str| Err(corrupt(format!("inode {}: {what}", i + 1)));
        let ok_kind = matches!(
            (node.kind, &node.content),
            (NodeKind::Directory, RawContent::Directory { .. })
                | (
                    NodeKind::Regular,
                    RawContent::File { .. } | RawContent::None
                )
                | (NodeKind::Symlink, RawContent::Symlink(_))
                | (
                    NodeKind::CharDevice | NodeKind::BlockDevice | NodeKind::Fifo,
                    RawContent::None
                )
        );
        if !ok_kind || node.mode > 0o7777 || node.mtime_nsec >= 1_000_000_000 {
            return bad("malformed node");
        }
        if i == 0 && node.kind != NodeKind::Directory {
            return Err(corrupt("root is not a directory".into()));
        }
        match node.content {
            RawContent::File { layer, offset } => {
                let Some(l) = layers.get(layer as usize) else {
                    return bad(&format!("no layer {layer}"));
                };
                if node.size == 0
                    || offset
                        .checked_add(node.size)
                        .is_none_or(|e| e > l.uncompressed_size)
                {
                    return bad("data outside its layer");
                }
            }
            RawContent::None if node.kind == NodeKind::Regular && node.size != 0 => {
                return bad("file without data");
            }
            RawContent::Symlink(target) if target.len() as u64 != node.size => {
                return bad("symlink size mismatch");
            }
            RawContent::Directory { first, count } => dirs.push((i as u32, first, count)),
            _ => {}
        }
        let want = match node.kind {
            NodeKind::Directory => 1,
            _ if i > 0 && node.nlink == 0 => return bad("wrong number of links"),
            _ => node.nlink,
        };
        links.push(want);
        counts.add(node.kind, node.size);
    }
    if n == 0 {
        return Err(corrupt("no root directory".into()));
    }
    Ok(NodeScan {
        span: start..r.pos,
        at,
        links,
        dirs,
        counts,
    })
}

/// What a scan of the directory entries found, for [`Table::assemble`].
pub(crate) struct EntryScan {
    span: Range<usize>,
    at: Vec<u32>,
    /// The inode each entry points at (the tree's check wants each, twice).
    inodes: Vec<u64>,
    /// The entries whose name does not sort after the one before (the first is one): a
    /// directory's entries are sorted when none but its first is such a break.
    breaks: Vec<usize>,
}

/// Scans `n` directory entry records from `r`, checking each name on its own.
pub(crate) fn scan_entries(r: &mut Reader<'_>, n: usize) -> Result<EntryScan> {
    let start = r.pos;
    let mut at = Vec::with_capacity(n);
    let mut inodes = Vec::with_capacity(n);
    let mut breaks = Vec::new();
    let mut prev: &[u8] = &[];
    for j in 0..n {
        at.push(offset(r.pos, start)?);
        let Child { name, inode } = read_entry(r)?;
        inodes.push(inode.0);
        if name.is_empty()
            || name == b"."
            || name == b".."
            || name.contains(&b'/')
            || name.contains(&0)
        {
            return Err(corrupt(format!("directory entry {j}: invalid name")));
        }
        if j == 0 || prev >= name {
            breaks.push(j);
        }
        prev = name;
    }
    Ok(EntryScan {
        span: start..r.pos,
        at,
        inodes,
        breaks,
    })
}

impl Table {
    /// Encodes `nodes` and `dirents` (unchecked: see [`crate::format::validate`]).
    pub(crate) fn new(nodes: &[Node], dirents: &[Dirent]) -> Self {
        let mut w = Writer::default();
        let mut node_at = Vec::with_capacity(nodes.len());
        let mut counts = Counts::default();
        let mut parents = vec![0u32; nodes.len()];
        if let Some(root) = parents.first_mut() {
            *root = 1;
        }
        for (i, n) in nodes.iter().enumerate() {
            node_at.push(w.0.len() as u32);
            write_node(&mut w, n);
            counts.add(n.kind, n.size);
            if let Content::Directory { first, count } = n.content {
                let (first, count) = (first as usize, count as usize);
                for d in dirents.iter().skip(first).take(count) {
                    if let Some(p) = (d.inode.0 as usize)
                        .checked_sub(1)
                        .and_then(|k| parents.get_mut(k))
                    {
                        *p = i as u32 + 1;
                    }
                }
            }
        }
        let mut e = Writer::default();
        let mut entry_at = Vec::with_capacity(dirents.len());
        for d in dirents {
            entry_at.push(e.0.len() as u32);
            e.bytes(&d.name);
            e.uint(d.inode.0);
        }
        Self {
            nodes: w.0.into(),
            node_at,
            entries: e.0.into(),
            entry_at,
            parents,
            counts,
        }
    }

    /// A table of the records that `nodes` and `entries` (buffers that were scanned)
    /// hold, once the tree they make is checked: each directory's entries in range, sorted,
    /// its own and pointing at inodes of the index; every inode listed as many times as
    /// its links say (a directory once); every inode reachable from the root.
    pub(crate) fn assemble(
        nodes: &Bytes,
        scan: NodeScan,
        entries: &Bytes,
        listed: EntryScan,
    ) -> Result<Self> {
        let mut table = Self {
            nodes: nodes.slice(scan.span),
            node_at: scan.at,
            entries: entries.slice(listed.span),
            entry_at: listed.at,
            parents: Vec::new(),
            counts: scan.counts,
        };
        let n = table.node_at.len() as u64;
        let inodes = &listed.inodes;
        let inode_at = |j: usize| -> Result<usize> {
            match inodes.get(j) {
                Some(&ino) if ino >= 2 && ino <= n => Ok((ino - 1) as usize),
                _ => Err(corrupt("directory entry points outside the index".into())),
            }
        };
        let mut links = scan.links;
        let mut owned = vec![false; table.entry_at.len()];
        let breaks = &listed.breaks;
        for &(i, first, count) in &scan.dirs {
            let bad = |what: &str| corrupt(format!("inode {}: {what}", i + 1));
            let (start, len) = (first as usize, count as usize);
            if start.saturating_add(len) > owned.len() {
                return Err(bad("entries out of range"));
            }
            // Sorted: no break after the first entry.
            let after_first = breaks.partition_point(|&b| b <= start);
            if breaks.get(after_first).is_some_and(|&b| b < start + len) {
                return Err(bad("entries not sorted"));
            }
            for (j, own) in owned.iter_mut().enumerate().skip(start).take(len) {
                if std::mem::replace(own, true) {
                    return Err(corrupt(
                        "directory entries shared by two directories".into(),
                    ));
                }
                let k = inode_at(j).map_err(|_| bad("entry points outside the index"))?;
                match links[k].checked_sub(1) {
                    Some(left) => links[k] = left,
                    None => return Err(corrupt(format!("inode {}: wrong number of links", k + 1))),
                }
            }
        }
        if owned.iter().any(|&o| !o) {
            return Err(corrupt(
                "directory entries that belong to no directory".into(),
            ));
        }
        if let Some(k) = links.iter().skip(1).position(|&l| l != 0) {
            return Err(corrupt(format!("inode {}: wrong number of links", k + 2)));
        }
        // Every directory listed once does not rule out detached cycles: walk from the
        // root, noting each inode's parent (0: not reached yet).
        let mut parents = vec![0u32; table.node_at.len()];
        parents[0] = 1;
        let mut reached = 1;
        let mut todo = vec![0usize];
        while let Some(d) = todo.pop() {
            let (i, first, count) = scan.dirs[d];
            for j in first as usize..first as usize + count as usize {
                let k = inode_at(j)?;
                if parents[k] == 0 {
                    parents[k] = i + 1;
                    reached += 1;
                    if let Ok(sub) = scan.dirs.binary_search_by_key(&(k as u32), |d| d.0) {
                        todo.push(sub);
                    }
                }
            }
        }
        if reached != parents.len() {
            return Err(corrupt("nodes unreachable from the root".into()));
        }
        table.parents = parents;
        Ok(table)
    }

    /// Checks a table that was built, not scanned ([`Table::new`]): scans its own records
    /// as [`Table::assemble`] checks a file's.
    pub(crate) fn check(&self, layers: &[LayerIndex]) -> Result<()> {
        let mut r = Reader::new(&self.nodes);
        let nodes = scan_nodes(&mut r, self.node_at.len(), layers)?;
        r.end()?;
        let mut r = Reader::new(&self.entries);
        let entries = scan_entries(&mut r, self.entry_at.len())?;
        r.end()?;
        Self::assemble(&self.nodes, nodes, &self.entries, entries).map(drop)
    }

    pub(crate) fn len(&self) -> usize {
        self.node_at.len()
    }

    pub(crate) fn counts(&self) -> Counts {
        self.counts
    }

    /// The node records, back to back, as the metadata stores them.
    pub(crate) fn node_records(&self) -> &[u8] {
        &self.nodes
    }

    pub(crate) fn entry_count(&self) -> usize {
        self.entry_at.len()
    }

    /// The directory entry records, back to back.
    pub(crate) fn entry_records(&self) -> &[u8] {
        &self.entries
    }

    fn raw(&self, i: usize) -> Option<RawNode<'_>> {
        let at = *self.node_at.get(i)? as usize;
        read_node(&mut Reader::at(&self.nodes, at)).ok()
    }

    /// Node `i` (inode `i + 1`).
    pub(crate) fn node(&self, i: usize) -> Option<Node> {
        self.raw(i).map(|n| n.to_node())
    }

    /// The entries of node `i` when it is a directory, as a range of entry numbers.
    pub(crate) fn children(&self, i: usize) -> Range<usize> {
        match self.raw(i).map(|n| n.content) {
            Some(RawContent::Directory { first, count }) => {
                let start = (first as usize).min(self.entry_at.len());
                start..(start + count as usize).min(self.entry_at.len())
            }
            _ => 0..0,
        }
    }

    pub(crate) fn entry(&self, j: usize) -> Option<Child<'_>> {
        let at = *self.entry_at.get(j)? as usize;
        read_entry(&mut Reader::at(&self.entries, at)).ok()
    }

    /// The inode of the directory that lists node `i` (1 for the root, and for what the
    /// table does not know).
    pub(crate) fn parent(&self, i: usize) -> u64 {
        match self.parents.get(i) {
            Some(&p) if p > 0 => u64::from(p),
            _ => 1,
        }
    }
}

impl PartialEq for Table {
    /// The same nodes and entries, whatever their records' bytes.
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len()
            && self.entry_count() == other.entry_count()
            && (0..self.len()).all(|i| self.node(i) == other.node(i))
            && (0..self.entry_count()).all(|j| self.entry(j) == other.entry(j))
    }
}

impl Eq for Table {}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("nodes", &self.len())
            .field("entries", &self.entry_count())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::tests::refused_with;
    use crate::format::{OLDEST_VERSION, VERSION, decode, encode_version, validate};
    use crate::image::{ImageIndex, ImageSource};

    fn node(kind: NodeKind, content: Content) -> Node {
        let size = match &content {
            Content::Symlink { target } => target.len() as u64,
            _ => 0,
        };
        Node {
            kind,
            mode: 0o755,
            uid: 1,
            gid: 2,
            mtime: -5,
            mtime_nsec: 7,
            size,
            nlink: 1,
            rdev_major: 0,
            rdev_minor: 0,
            xattrs: Vec::new(),
            content,
        }
    }

    fn dir(first: u32, count: u32) -> Node {
        node(NodeKind::Directory, Content::Directory { first, count })
    }

    fn entry(name: &str, inode: u64) -> Dirent {
        Dirent {
            name: name.as_bytes().into(),
            inode: Inode(inode),
        }
    }

    /// `/a/` (inode 2) holding the symlink `/a/l -> ../f` (4), and the empty file `/f` (3)
    /// with an extended attribute.
    fn tree() -> (Vec<Node>, Vec<Dirent>) {
        let mut file = node(NodeKind::Regular, Content::None);
        file.xattrs.push(Xattr {
            name: b"user.k".as_slice().into(),
            value: b"v".as_slice().into(),
        });
        let link = node(
            NodeKind::Symlink,
            Content::Symlink {
                target: b"../f".as_slice().into(),
            },
        );
        let nodes = vec![dir(0, 2), dir(2, 1), file, link];
        let dirents = vec![entry("a", 2), entry("f", 3), entry("l", 4)];
        (nodes, dirents)
    }

    fn index_of(nodes: Vec<Node>, dirents: Vec<Dirent>) -> ImageIndex {
        ImageIndex::new(ImageSource::default(), Vec::new(), nodes, dirents)
    }

    #[test]
    fn a_decoded_tree_answers_as_the_built_one_in_every_version() -> Result<()> {
        let (nodes, dirents) = tree();
        let built = index_of(nodes.clone(), dirents.clone());
        validate(&built)?;
        for version in OLDEST_VERSION..=VERSION {
            let got = decode(&encode_version(&built, version)?)?;
            for index in [&built, &got] {
                assert_eq!(index.nodes(), nodes, "version {version}");
                assert_eq!(index.dirents(), dirents);
                assert_eq!(index.inode_count(), 4);
                assert_eq!(index.node(Inode(5)), None);
                assert_eq!(index.node(Inode(0)), None);
                let root: Vec<_> = index.children(Inode::ROOT).into_iter().collect();
                assert_eq!(
                    root,
                    [
                        Child {
                            name: b"a",
                            inode: Inode(2)
                        },
                        Child {
                            name: b"f",
                            inode: Inode(3)
                        }
                    ]
                );
                assert_eq!(index.children(Inode(3)).len(), 0, "a file lists nothing");
                assert_eq!(index.lookup(Inode(2), b"l"), Some(Inode(4)));
                assert_eq!(index.lookup(Inode::ROOT, b"b"), None);
                assert_eq!(index.lookup(Inode::ROOT, b"0"), None);
                assert_eq!(index.lookup(Inode::ROOT, b"g"), None);
                assert_eq!(index.parent(Inode(2)), Inode::ROOT);
                assert_eq!(index.parent(Inode::ROOT), Inode::ROOT);
                assert_eq!(index.resolve(b"/a/l", true)?, Inode(3));
                let stats = index.stats();
                assert_eq!(
                    (stats.inodes, stats.directories, stats.files, stats.symlinks),
                    (4, 2, 1, 1)
                );
            }
        }
        Ok(())
    }

    #[test]
    fn a_nested_directory_knows_its_parent() -> Result<()> {
        // / -> a (2) -> b (3) -> c (4)
        let nodes = vec![dir(0, 1), dir(1, 1), dir(2, 1), dir(3, 0)];
        let dirents = vec![entry("a", 2), entry("b", 3), entry("c", 4)];
        let built = index_of(nodes, dirents);
        validate(&built)?;
        let got = decode(&encode_version(&built, VERSION)?)?;
        for index in [&built, &got] {
            let parents: Vec<_> = (1..=4).map(|i| index.parent(Inode(i)).0).collect();
            assert_eq!(parents, [1, 1, 2, 3]);
        }
        Ok(())
    }

    /// Each way a tree can be wrong, refused by `validate` and by a decode (whole and as a
    /// stream) of every version, with the reason.
    #[test]
    fn trees_of_the_wrong_shape_are_refused_with_the_reason() -> Result<()> {
        let (nodes, dirents) = tree();
        let with_nodes = |change: &dyn Fn(&mut Vec<Node>)| {
            let mut n = nodes.clone();
            change(&mut n);
            (n, dirents.clone())
        };
        let with_dirents = |change: &dyn Fn(&mut Vec<Dirent>)| {
            let mut d = dirents.clone();
            change(&mut d);
            (nodes.clone(), d)
        };
        type Tree = (Vec<Node>, Vec<Dirent>);
        let cases: Vec<(Tree, &str)> = vec![
            ((Vec::new(), Vec::new()), "no root directory"),
            (
                with_nodes(&|n| n[0] = node(NodeKind::Regular, Content::None)),
                "root is not a directory",
            ),
            (
                with_nodes(&|n| n[2].kind = NodeKind::Symlink),
                "malformed node",
            ),
            (with_nodes(&|n| n[2].mode = 0o10000), "malformed node"),
            (
                with_nodes(&|n| n[2].mtime_nsec = 1_000_000_000),
                "malformed node",
            ),
            (with_nodes(&|n| n[2].size = 3), "file without data"),
            (
                with_nodes(&|n| {
                    n[2].content = Content::File {
                        layer: 0,
                        offset: 0,
                    }
                }),
                "no layer 0",
            ),
            (with_nodes(&|n| n[3].size = 2), "symlink size mismatch"),
            (with_nodes(&|n| n[1] = dir(2, 2)), "entries out of range"),
            (
                with_dirents(&|d| d[1].inode = Inode(1)),
                "outside the index",
            ),
            (
                with_dirents(&|d| d[1].inode = Inode(5)),
                "outside the index",
            ),
            (with_dirents(&|d| d.swap(0, 1)), "not sorted"),
            (
                with_dirents(&|d| d[2].name = b"a/b".as_slice().into()),
                "invalid name",
            ),
            (
                with_nodes(&|n| n[1] = dir(1, 2)),
                "shared by two directories",
            ),
            (with_nodes(&|n| n[1] = dir(2, 0)), "belong to no directory"),
            (
                with_nodes(&|n| n[2].nlink = 2),
                "inode 3: wrong number of links",
            ),
            (
                with_nodes(&|n| n[2].nlink = 0),
                "inode 3: wrong number of links",
            ),
            // `f` listed twice with one link; `l` not at all.
            (
                with_dirents(&|d| d[2].inode = Inode(3)),
                "wrong number of links",
            ),
            // A directory listed twice: `/a` and `/a/l`.
            (
                with_dirents(&|d| d[2].inode = Inode(2)),
                "inode 2: wrong number of links",
            ),
            // A cycle apart from the root: two directories that list each other.
            (
                (
                    vec![dir(0, 0), dir(0, 1), dir(1, 1)],
                    vec![entry("b", 3), entry("a", 2)],
                ),
                "unreachable from the root",
            ),
        ];
        for ((nodes, dirents), why) in cases {
            refused_with(&index_of(nodes, dirents), why)?;
        }
        Ok(())
    }
}
