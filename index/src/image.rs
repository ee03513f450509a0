//! [`ImageIndex`]: the decoded index of one image, with path lookup and listing that never
//! scan the whole tree.

use serde::Serialize;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::layer::LayerIndex;
use crate::node::{Child, Content, Dirent, Inode, Node, NodeKind};
use crate::table::Table;

/// Linux gives up after 40 symlinks in one lookup.
const MAX_SYMLINKS: usize = 40;

/// Where the indexed image came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct ImageSource {
    /// Registry and repository, e.g. `registry.example.com/team/app`.
    pub repository: String,
    /// The manifest digest the index was built from.
    pub manifest_digest: Digest,
    /// The config blob digest.
    pub config_digest: Digest,
    /// `os/arch[/variant]` of the manifest.
    pub platform: String,
}

/// The index of one image: layers with their checkpoints and chunks, and the merged tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageIndex {
    pub source: ImageSource,
    pub layers: Vec<LayerIndex>,
    /// The nodes and directory entries, used in place (see [`crate::table`]).
    pub(crate) table: Table,
}

/// Totals for summaries and status reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct IndexStats {
    pub layers: usize,
    pub inodes: usize,
    pub files: usize,
    pub directories: usize,
    pub symlinks: usize,
    pub other: usize,
    /// Bytes of regular file content (each inode counted once).
    pub file_bytes: u64,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub checkpoints: usize,
    pub chunks: usize,
}

impl ImageIndex {
    /// Assembles an index from parts; `validate` is run by [`crate::decode`] on untrusted input.
    pub fn new(
        source: ImageSource,
        layers: Vec<LayerIndex>,
        nodes: Vec<Node>,
        dirents: Vec<Dirent>,
    ) -> Self {
        Self {
            source,
            layers,
            table: Table::new(&nodes, &dirents),
        }
    }

    /// Inode `ino`, decoded from its record.
    pub fn node(&self, ino: Inode) -> Option<Node> {
        self.table.node(slot(ino)?)
    }

    /// Number of inodes; valid inode numbers are `1..=inode_count()`.
    pub fn inode_count(&self) -> u64 {
        self.table.len() as u64
    }

    /// The entries of directory `dir`, sorted by name (none for non-directories).
    pub fn children(&self, dir: Inode) -> Children<'_> {
        let range = slot(dir).map_or(0..0, |i| self.table.children(i));
        Children {
            table: &self.table,
            range,
        }
    }

    /// The directory that lists `dir` (the root for the root): what `..` is in it.
    pub fn parent(&self, dir: Inode) -> Inode {
        slot(dir).map_or(Inode::ROOT, |i| Inode(self.table.parent(i)))
    }

    /// Looks `name` up in directory `dir` by binary search.
    pub fn lookup(&self, dir: Inode, name: &[u8]) -> Option<Inode> {
        self.children(dir).find(name)
    }

    /// Every node, decoded (for tests and tools: a mount decodes one at a time).
    pub fn nodes(&self) -> Vec<Node> {
        (0..self.table.len())
            .filter_map(|i| self.table.node(i))
            .collect()
    }

    /// Every directory entry, directory after directory, owned.
    pub fn dirents(&self) -> Vec<Dirent> {
        (0..self.table.entry_count())
            .filter_map(|j| self.table.entry(j))
            .map(|c| Dirent {
                name: c.name.into(),
                inode: c.inode,
            })
            .collect()
    }

    /// Resolves an absolute or root-relative path inside the image. Symlinks in the middle
    /// are always followed (within the image root); the last one only with `follow`.
    pub fn resolve(&self, path: &[u8], follow: bool) -> Result<Inode> {
        let shown = || String::from_utf8_lossy(path).into_owned();
        let mut todo: Vec<Vec<u8>> = path
            .split(|&b| b == b'/')
            .rev()
            .map(<[u8]>::to_vec)
            .collect();
        let mut stack = vec![Inode::ROOT];
        let mut hops = 0;
        while let Some(comp) = todo.pop() {
            let cur = *stack.last().unwrap_or(&Inode::ROOT);
            match comp.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    if stack.len() > 1 {
                        stack.pop();
                    }
                    continue;
                }
                _ => {}
            }
            let node = self.node(cur).ok_or_else(|| Error::NotFound(shown()))?;
            if node.kind != NodeKind::Directory {
                return Err(Error::NotDirectory(shown()));
            }
            let next = self
                .lookup(cur, &comp)
                .ok_or_else(|| Error::NotFound(shown()))?;
            let last = todo.iter().all(|c| c.is_empty() || c == b".");
            match self.node(next).map(|n| n.content) {
                Some(Content::Symlink { target }) if follow || !last => {
                    hops += 1;
                    if hops > MAX_SYMLINKS {
                        return Err(Error::Loop(shown()));
                    }
                    if target.first() == Some(&b'/') {
                        stack.truncate(1);
                    }
                    todo.extend(target.split(|&b| b == b'/').rev().map(<[u8]>::to_vec));
                }
                _ => stack.push(next),
            }
        }
        let ino = *stack.last().unwrap_or(&Inode::ROOT);
        // A trailing slash demands a directory, like the kernel does.
        if path.ends_with(b"/")
            && self
                .node(ino)
                .is_some_and(|n| n.kind != NodeKind::Directory)
        {
            return Err(Error::NotDirectory(shown()));
        }
        Ok(ino)
    }

    /// Visits every path of the tree depth-first (hard links once per name).
    pub fn walk(&self, mut visit: impl FnMut(&[u8], Inode, &Node)) {
        let mut todo: Vec<(Vec<u8>, Inode)> = vec![(b"/".to_vec(), Inode::ROOT)];
        while let Some((path, ino)) = todo.pop() {
            let Some(node) = self.node(ino) else { continue };
            visit(&path, ino, &node);
            for d in self.children(ino).iter().rev() {
                let mut p = path.clone();
                if p.len() > 1 {
                    p.push(b'/');
                }
                p.extend_from_slice(d.name);
                todo.push((p, d.inode));
            }
        }
    }

    pub fn stats(&self) -> IndexStats {
        let c = self.table.counts();
        let mut s = IndexStats {
            layers: self.layers.len(),
            inodes: self.table.len(),
            files: c.files,
            directories: c.directories,
            symlinks: c.symlinks,
            other: c.other,
            file_bytes: c.file_bytes,
            ..IndexStats::default()
        };
        for l in &self.layers {
            // Sizes come from (validated, but possibly hostile) index files: never overflow.
            s.compressed_size = s.compressed_size.saturating_add(l.compressed_size);
            s.uncompressed_size = s.uncompressed_size.saturating_add(l.uncompressed_size);
            s.checkpoints += l.checkpoints.len();
            s.chunks += l.chunks.len();
        }
        s
    }
}

/// Where inode `ino`'s record is in the index's table (inode numbers start at 1).
fn slot(ino: Inode) -> Option<usize> {
    usize::try_from(ino.0.checked_sub(1)?).ok()
}

/// The entries of one directory, sorted by name, decoded as they are asked for.
#[derive(Debug, Clone)]
pub struct Children<'a> {
    table: &'a Table,
    range: std::ops::Range<usize>,
}

impl<'a> Children<'a> {
    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// The `k`th entry.
    pub fn get(&self, k: usize) -> Option<Child<'a>> {
        let j = self.range.start.checked_add(k)?;
        (j < self.range.end).then(|| self.table.entry(j)).flatten()
    }

    /// The inode named `name`, by binary search.
    pub fn find(&self, name: &[u8]) -> Option<Inode> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let child = self.get(mid)?;
            match child.name.cmp(name) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(child.inode),
            }
        }
        None
    }

    pub fn iter(&self) -> ChildIter<'a> {
        ChildIter {
            table: self.table,
            range: self.range.clone(),
        }
    }
}

impl<'a> IntoIterator for Children<'a> {
    type Item = Child<'a>;
    type IntoIter = ChildIter<'a>;

    fn into_iter(self) -> ChildIter<'a> {
        self.iter()
    }
}

/// An iterator over a directory's entries.
#[derive(Debug, Clone)]
pub struct ChildIter<'a> {
    table: &'a Table,
    range: std::ops::Range<usize>,
}

impl<'a> Iterator for ChildIter<'a> {
    type Item = Child<'a>;

    fn next(&mut self) -> Option<Child<'a>> {
        let j = self.range.next()?;
        self.table.entry(j)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.range.size_hint()
    }
}

impl DoubleEndedIterator for ChildIter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        let j = self.range.next_back()?;
        self.table.entry(j)
    }
}

impl ExactSizeIterator for ChildIter<'_> {}
