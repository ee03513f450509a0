//! Merging layers into one file tree: whiteouts, opaque directories, hard links, symlinked
//! parents and synthesised parent directories, as a container runtime would extract them.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};
use crate::node::{Content, Dirent, Inode, Node, NodeKind, Xattr};
use crate::tar::{EntryKind, TarEntry};

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
/// Linux gives up after 40 symlinks in one lookup.
const MAX_SYMLINKS: usize = 40;

type NodeId = usize;

#[derive(Debug, Clone)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    mtime_nsec: u32,
    xattrs: Vec<Xattr>,
}

impl Meta {
    fn synthesised_dir() -> Self {
        Self {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            xattrs: Vec::new(),
        }
    }

    fn of(e: &TarEntry) -> Self {
        Self {
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            mtime_nsec: e.mtime_nsec,
            xattrs: e
                .xattrs
                .iter()
                .map(|(n, v)| Xattr {
                    name: n.clone().into_boxed_slice(),
                    value: v.clone().into_boxed_slice(),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone)]
enum Kind {
    Dir(BTreeMap<Box<[u8]>, NodeId>),
    File { layer: u32, offset: u64, size: u64 },
    Symlink(Box<[u8]>),
    Device { block: bool, major: u32, minor: u32 },
    Fifo,
}

#[derive(Debug, Clone)]
struct BuildNode {
    meta: Meta,
    kind: Kind,
}

/// Builds the merged tree one layer at a time, bottom-up.
#[derive(Debug)]
pub struct TreeBuilder {
    nodes: Vec<BuildNode>,
}

impl Default for TreeBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// A path split into components, normalised lexically.
fn components(path: &[u8], offset: u64) -> Result<Vec<&[u8]>> {
    let mut out: Vec<&[u8]> = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() {
                    return Err(Error::PathEscapesRoot {
                        path: String::from_utf8_lossy(path).into_owned(),
                        offset,
                    });
                }
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

impl TreeBuilder {
    pub fn new() -> Self {
        Self {
            nodes: vec![BuildNode {
                meta: Meta::synthesised_dir(),
                kind: Kind::Dir(BTreeMap::new()),
            }],
        }
    }

    /// Applies one layer's entries on top of the tree built so far.
    pub fn apply_layer(&mut self, layer: usize, entries: &[TarEntry]) -> Result<()> {
        // Whiteouts hide only what lower layers hold, whatever their order in this layer.
        for e in entries {
            let comps = components(&e.path, e.header_offset)?;
            let Some((&name, parent)) = comps.split_last() else {
                continue;
            };
            if name == OPAQUE {
                if let Some(dir) = self.walk(parent, false, layer, &e.path)?
                    && let Kind::Dir(children) = &mut self.nodes[dir].kind
                {
                    children.clear();
                }
            } else if name.starts_with(b".wh..wh.") {
                // aufs bookkeeping (.wh..wh.plnk and friends): not part of the image.
            } else if let Some(hidden) = name.strip_prefix(WHITEOUT)
                && let Some(dir) = self.walk(parent, false, layer, &e.path)?
                && let Kind::Dir(children) = &mut self.nodes[dir].kind
            {
                children.remove(hidden);
            }
        }
        for e in entries {
            let comps = components(&e.path, e.header_offset)?;
            let Some((&name, parent)) = comps.split_last() else {
                // The root itself ("./"): only its metadata can change.
                if e.kind == EntryKind::Directory {
                    self.nodes[0].meta = Meta::of(e);
                }
                continue;
            };
            if name.starts_with(WHITEOUT) {
                continue;
            }
            let dir = self
                .walk(parent, true, layer, &e.path)?
                .ok_or_else(|| Error::NotFound(show(&e.path)))?;
            let new = match e.kind {
                EntryKind::Directory => {
                    let existing = self.child(dir, name);
                    if let Some(id) = existing
                        && matches!(self.nodes[id].kind, Kind::Dir(_))
                    {
                        self.nodes[id].meta = Meta::of(e);
                        continue;
                    }
                    self.push(Meta::of(e), Kind::Dir(BTreeMap::new()))
                }
                EntryKind::Hardlink => self.link_target(layer, e)?,
                EntryKind::Regular => self.push(
                    Meta::of(e),
                    Kind::File {
                        layer: u32::try_from(layer).unwrap_or(u32::MAX),
                        offset: e.data_offset,
                        size: e.size,
                    },
                ),
                EntryKind::Symlink => self.push(
                    Meta::of(e),
                    Kind::Symlink(e.link.clone().into_boxed_slice()),
                ),
                EntryKind::CharDevice | EntryKind::BlockDevice => self.push(
                    Meta::of(e),
                    Kind::Device {
                        block: e.kind == EntryKind::BlockDevice,
                        major: e.dev_major,
                        minor: e.dev_minor,
                    },
                ),
                EntryKind::Fifo => self.push(Meta::of(e), Kind::Fifo),
            };
            if let Kind::Dir(children) = &mut self.nodes[dir].kind {
                children.insert(name.into(), new);
            }
        }
        Ok(())
    }

    fn push(&mut self, meta: Meta, kind: Kind) -> NodeId {
        self.nodes.push(BuildNode { meta, kind });
        self.nodes.len() - 1
    }

    fn child(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        match &self.nodes[dir].kind {
            Kind::Dir(children) => children.get(name).copied(),
            _ => None,
        }
    }

    fn link_target(&mut self, layer: usize, e: &TarEntry) -> Result<NodeId> {
        let missing = || Error::HardlinkTargetMissing {
            layer,
            path: show(&e.path),
            target: show(&e.link),
        };
        let comps = components(&e.link, e.header_offset)?;
        let (&name, parent) = comps.split_last().ok_or_else(missing)?;
        let dir = self
            .walk(parent, false, layer, &e.link)?
            .ok_or_else(missing)?;
        let target = self.child(dir, name).ok_or_else(missing)?;
        if matches!(self.nodes[target].kind, Kind::Dir(_)) {
            return Err(Error::HardlinkToDirectory {
                layer,
                path: show(&e.path),
                target: show(&e.link),
            });
        }
        Ok(target)
    }

    /// Walks `path` from the root treating every component as a directory and following
    /// symlinks inside the image root. With `create`, missing directories are synthesised.
    fn walk(
        &mut self,
        path: &[&[u8]],
        create: bool,
        layer: usize,
        full: &[u8],
    ) -> Result<Option<NodeId>> {
        let mut todo: Vec<Box<[u8]>> = path.iter().rev().map(|&c| c.into()).collect();
        let mut stack: Vec<NodeId> = vec![0];
        let mut hops = 0;
        while let Some(comp) = todo.pop() {
            let cur = *stack.last().unwrap_or(&0);
            match &*comp {
                b"" | b"." => continue,
                b".." => {
                    if stack.len() > 1 {
                        stack.pop();
                    }
                    continue;
                }
                _ => {}
            }
            let next = match self.child(cur, &comp) {
                Some(id) => id,
                None if create => {
                    let id = self.push(Meta::synthesised_dir(), Kind::Dir(BTreeMap::new()));
                    if let Kind::Dir(children) = &mut self.nodes[cur].kind {
                        children.insert(comp.clone(), id);
                    }
                    id
                }
                None => return Ok(None),
            };
            match &self.nodes[next].kind {
                Kind::Dir(_) => stack.push(next),
                Kind::Symlink(target) => {
                    hops += 1;
                    if hops > MAX_SYMLINKS {
                        return Err(Error::SymlinkLoop {
                            layer,
                            path: show(full),
                        });
                    }
                    if target.first() == Some(&b'/') {
                        stack.truncate(1);
                    }
                    let target = target.clone();
                    todo.extend(target.split(|&b| b == b'/').rev().map(Box::from));
                }
                _ if create => {
                    return Err(Error::NotADirectory {
                        layer,
                        path: show(full),
                        parent: show(&comp),
                    });
                }
                _ => return Ok(None),
            }
        }
        Ok(stack.last().copied())
    }

    /// Numbers the reachable nodes depth-first and lays out sorted directory entries.
    pub fn finish(self) -> (Vec<Node>, Vec<Dirent>) {
        let mut ino: HashMap<NodeId, u64> = HashMap::new();
        let mut order: Vec<NodeId> = Vec::new();
        let mut links: HashMap<NodeId, u32> = HashMap::new();
        // Depth-first pre-order, children in name order.
        let mut todo = vec![0usize];
        ino.insert(0, 1);
        order.push(0);
        while let Some(id) = todo.pop() {
            if let Kind::Dir(children) = &self.nodes[id].kind {
                let mut subdirs = Vec::new();
                for &child in children.values() {
                    *links.entry(child).or_default() += 1;
                    if let std::collections::hash_map::Entry::Vacant(slot) = ino.entry(child) {
                        slot.insert(order.len() as u64 + 1);
                        order.push(child);
                        if matches!(self.nodes[child].kind, Kind::Dir(_)) {
                            subdirs.push(child);
                        }
                    }
                }
                todo.extend(subdirs.into_iter().rev());
            }
        }
        let mut nodes = Vec::with_capacity(order.len());
        let mut dirents = Vec::new();
        for &id in &order {
            let n = &self.nodes[id];
            let (kind, size, content, nlink, dev) = match &n.kind {
                Kind::Dir(children) => {
                    let first = dirents.len() as u32;
                    let mut subdirs = 0;
                    for (name, child) in children {
                        if matches!(self.nodes[*child].kind, Kind::Dir(_)) {
                            subdirs += 1;
                        }
                        dirents.push(Dirent {
                            name: name.clone(),
                            inode: Inode(ino[child]),
                        });
                    }
                    let content = Content::Directory {
                        first,
                        count: children.len() as u32,
                    };
                    (NodeKind::Directory, 0, content, 2 + subdirs, (0, 0))
                }
                Kind::File {
                    layer,
                    offset,
                    size,
                } => {
                    let content = if *size == 0 {
                        Content::None
                    } else {
                        Content::File {
                            layer: *layer,
                            offset: *offset,
                        }
                    };
                    (
                        NodeKind::Regular,
                        *size,
                        content,
                        links.get(&id).copied().unwrap_or(1),
                        (0, 0),
                    )
                }
                Kind::Symlink(t) => (
                    NodeKind::Symlink,
                    t.len() as u64,
                    Content::Symlink { target: t.clone() },
                    links.get(&id).copied().unwrap_or(1),
                    (0, 0),
                ),
                Kind::Device {
                    block,
                    major,
                    minor,
                } => (
                    if *block {
                        NodeKind::BlockDevice
                    } else {
                        NodeKind::CharDevice
                    },
                    0,
                    Content::None,
                    links.get(&id).copied().unwrap_or(1),
                    (*major, *minor),
                ),
                Kind::Fifo => (
                    NodeKind::Fifo,
                    0,
                    Content::None,
                    links.get(&id).copied().unwrap_or(1),
                    (0, 0),
                ),
            };
            nodes.push(Node {
                kind,
                mode: n.meta.mode,
                uid: n.meta.uid,
                gid: n.meta.gid,
                mtime: n.meta.mtime,
                mtime_nsec: n.meta.mtime_nsec,
                size,
                nlink,
                rdev_major: dev.0,
                rdev_minor: dev.1,
                xattrs: n.meta.xattrs.clone(),
                content,
            });
        }
        (nodes, dirents)
    }
}
