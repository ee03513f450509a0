//! [`ImageIndex`]: the decoded index of one image, with path lookup and listing that never
//! scan the whole tree.

use serde::Serialize;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::layer::LayerIndex;
use crate::node::{Content, Dirent, Inode, Node, NodeKind};

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
    pub(crate) nodes: Vec<Node>,
    pub(crate) dirents: Vec<Dirent>,
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
            nodes,
            dirents,
        }
    }

    pub fn node(&self, ino: Inode) -> Option<&Node> {
        let i = usize::try_from(ino.0.checked_sub(1)?).ok()?;
        self.nodes.get(i)
    }

    /// Number of inodes; valid inode numbers are `1..=inode_count()`.
    pub fn inode_count(&self) -> u64 {
        self.nodes.len() as u64
    }

    /// The entries of directory `dir`, sorted by name (empty for non-directories).
    pub fn children(&self, dir: Inode) -> &[Dirent] {
        match self.node(dir).map(|n| &n.content) {
            Some(Content::Directory { first, count }) => {
                let start = *first as usize;
                self.dirents
                    .get(start..start + *count as usize)
                    .unwrap_or_default()
            }
            _ => &[],
        }
    }

    /// Looks `name` up in directory `dir` by binary search.
    pub fn lookup(&self, dir: Inode, name: &[u8]) -> Option<Inode> {
        let children = self.children(dir);
        children
            .binary_search_by(|d| (*d.name).cmp(name))
            .ok()
            .map(|i| children[i].inode)
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
            match self.node(next).map(|n| &n.content) {
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
    pub fn walk<'a>(&'a self, mut visit: impl FnMut(&[u8], Inode, &'a Node)) {
        let mut todo: Vec<(Vec<u8>, Inode)> = vec![(b"/".to_vec(), Inode::ROOT)];
        while let Some((path, ino)) = todo.pop() {
            let Some(node) = self.node(ino) else { continue };
            visit(&path, ino, node);
            for d in self.children(ino).iter().rev() {
                let mut p = path.clone();
                if p.len() > 1 {
                    p.push(b'/');
                }
                p.extend_from_slice(&d.name);
                todo.push((p, d.inode));
            }
        }
    }

    pub fn stats(&self) -> IndexStats {
        let mut s = IndexStats {
            layers: self.layers.len(),
            inodes: self.nodes.len(),
            ..IndexStats::default()
        };
        for n in &self.nodes {
            match n.kind {
                NodeKind::Regular => {
                    s.files += 1;
                    s.file_bytes = s.file_bytes.saturating_add(n.size);
                }
                NodeKind::Directory => s.directories += 1,
                NodeKind::Symlink => s.symlinks += 1,
                _ => s.other += 1,
            }
        }
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
