//! The expected merged tree of a test image, computed from its declaration with plain
//! path maps, independently of clip's merge code.

use std::collections::BTreeMap;

use crate::image::{Entry, Layer, Meta};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    CharDevice(u32, u32),
    BlockDevice(u32, u32),
    Fifo,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    pub kind: Kind,
    pub meta: Meta,
    /// Paths with the same identity are hard links to one inode.
    pub identity: usize,
    pub nlink: u32,
}

/// Absolute path ("/a/b") to what must be there.
pub type Tree = BTreeMap<String, Expect>;

fn abs(p: &str) -> String {
    let trimmed = p.trim_matches('/');
    format!("/{trimmed}")
}

fn remove_below(tree: &mut Tree, dir: &str) {
    let prefix = if dir == "/" {
        "/".to_owned()
    } else {
        format!("{dir}/")
    };
    tree.retain(|k, _| !k.starts_with(&prefix) || k == dir);
}

fn remove_subtree(tree: &mut Tree, path: &str) {
    remove_below(tree, path);
    tree.remove(path);
}

fn parent(p: &str) -> &str {
    match p.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &p[..i],
    }
}

/// Applies the layers bottom-up and returns the tree a runtime would extract.
pub fn expected_tree(layers: &[Layer]) -> Tree {
    let mut tree = Tree::new();
    let mut next_id = 1;
    let synthesised = Meta::new(0o755).time(0, 0);
    tree.insert(
        "/".into(),
        Expect {
            kind: Kind::Dir,
            meta: synthesised.clone(),
            identity: 0,
            nlink: 0,
        },
    );
    for layer in layers {
        for e in &layer.entries {
            match e {
                Entry::Whiteout { path } => remove_subtree(&mut tree, &abs(path)),
                Entry::Opaque { dir } => remove_below(&mut tree, &abs(dir)),
                _ => {}
            }
        }
        for e in &layer.entries {
            let (path, kind, meta) = match e {
                Entry::Dir { path, meta } => (abs(path), Kind::Dir, meta.clone()),
                Entry::File { path, meta, data } => {
                    (abs(path), Kind::File(data.clone()), meta.clone())
                }
                Entry::Symlink { path, meta, target } => {
                    (abs(path), Kind::Symlink(target.clone()), meta.clone())
                }
                Entry::CharDevice {
                    path,
                    meta,
                    major,
                    minor,
                } => (abs(path), Kind::CharDevice(*major, *minor), meta.clone()),
                Entry::BlockDevice {
                    path,
                    meta,
                    major,
                    minor,
                } => (abs(path), Kind::BlockDevice(*major, *minor), meta.clone()),
                Entry::Fifo { path, meta } => (abs(path), Kind::Fifo, meta.clone()),
                Entry::Hardlink { path, target } => {
                    let path = abs(path);
                    if let Some(t) = tree.get(&abs(target)).cloned() {
                        ensure_parents(&mut tree, &path, &synthesised);
                        remove_subtree(&mut tree, &path);
                        tree.insert(path, t);
                    }
                    continue;
                }
                Entry::Whiteout { .. } | Entry::Opaque { .. } | Entry::Raw(_) => continue,
            };
            ensure_parents(&mut tree, &path, &synthesised);
            if kind == Kind::Dir
                && let Some(existing) = tree.get_mut(&path)
                && existing.kind == Kind::Dir
            {
                existing.meta = meta;
                continue;
            }
            remove_subtree(&mut tree, &path);
            tree.insert(
                path,
                Expect {
                    kind,
                    meta,
                    identity: next_id,
                    nlink: 0,
                },
            );
            next_id += 1;
        }
    }
    // Link counts: names per identity for non-directories, 2 + subdirectories for dirs.
    let mut names: BTreeMap<usize, u32> = BTreeMap::new();
    let mut subdirs: BTreeMap<String, u32> = BTreeMap::new();
    for (p, e) in &tree {
        if e.kind == Kind::Dir {
            if p != "/" {
                *subdirs.entry(parent(p).to_owned()).or_default() += 1;
            }
        } else {
            *names.entry(e.identity).or_default() += 1;
        }
    }
    for (p, e) in tree.iter_mut() {
        e.nlink = if e.kind == Kind::Dir {
            2 + subdirs.get(p).copied().unwrap_or(0)
        } else {
            names.get(&e.identity).copied().unwrap_or(1)
        };
    }
    tree
}

fn ensure_parents(tree: &mut Tree, path: &str, synthesised: &Meta) {
    let mut p = parent(path).to_owned();
    let mut missing = Vec::new();
    while p != "/" && !tree.contains_key(&p) {
        missing.push(p.clone());
        p = parent(&p).to_owned();
    }
    for m in missing {
        tree.insert(
            m,
            Expect {
                kind: Kind::Dir,
                meta: synthesised.clone(),
                identity: 0,
                nlink: 0,
            },
        );
    }
}
