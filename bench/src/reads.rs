//! What a start-up command reads and what those reads cost in compressed bytes, from an
//! strace of the command and the image's index.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::mount::PATH;

/// What a command opened: regular files (each once, as paths inside the image) and their
/// bytes.
#[derive(Debug)]
pub struct WorkingSet {
    pub paths: Vec<PathBuf>,
    pub bytes: u64,
    pub failed: usize,
}

/// Runs `cmd` in `root` under strace and sums the sizes of the regular files it opened or
/// executed. None when strace is missing or fails.
pub fn working_set(root: &Path, cmd: &[String]) -> Option<WorkingSet> {
    let trace = root.parent()?.join("strace.out");
    let st = Command::new("strace")
        .args(["-f", "-qq", "-y", "-e", "trace=open,openat,execve", "-o"])
        .arg(&trace)
        .arg("chroot")
        .arg(root)
        .args(cmd)
        .env_clear()
        .env("PATH", PATH)
        .env("LANG", "C.UTF-8")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?;
    if !st.success() {
        return None;
    }
    let text = std::fs::read_to_string(&trace).ok()?;
    let mut seen = std::collections::HashSet::new();
    let (mut bytes, mut failed) = (0u64, 0usize);
    for line in text.lines() {
        if line.contains("ENOENT") {
            failed += 1;
            continue;
        }
        // `-y` prints the opened file's real path after the descriptor: `= 3</path>`.
        let path = if let Some(rest) = line.split(") = ").nth(1) {
            match rest.split_once('<') {
                Some((_, p)) => Some(PathBuf::from(p.trim_end_matches('>'))),
                None if line.contains("execve(") => exec_path(line, root),
                None => None,
            }
        } else {
            None
        };
        let Some(path) = path else { continue };
        if let Ok(m) = std::fs::metadata(&path)
            && m.is_file()
            && let Ok(inside) = path.strip_prefix(root)
            && seen.insert(Path::new("/").join(inside))
        {
            bytes += m.len();
        }
    }
    let mut paths: Vec<PathBuf> = seen.into_iter().collect();
    paths.sort();
    Some(WorkingSet {
        paths,
        bytes,
        failed,
    })
}

/// The program a successful execve inside the chroot ran (chroot itself runs outside it).
fn exec_path(line: &str, root: &Path) -> Option<PathBuf> {
    let p = line.split("execve(\"").nth(1)?.split('"').next()?;
    if p.ends_with("/chroot") {
        return None;
    }
    Some(root.join(p.trim_start_matches('/')))
}

/// Compressed bytes needed to read some files whole, overlaps counted once.
#[derive(Debug, Default)]
pub struct FetchFloor {
    /// Each chunk from its nearest checkpoint: the least this index allows.
    pub chunks: u64,
    /// Whole checkpoint spans: what a miss fetches in clip's chunk store.
    pub spans: u64,
}

pub fn fetch_floor(index: &clip_index::ImageIndex, paths: &[PathBuf]) -> FetchFloor {
    use std::os::unix::ffi::OsStrExt;
    let mut chunk_ranges = Vec::new();
    let mut span_ranges = Vec::new();
    for p in paths {
        let Ok(ino) = index.resolve(p.as_os_str().as_bytes(), true) else {
            continue;
        };
        let Some(node) = index.node(ino) else {
            continue;
        };
        let clip_index::Content::File { layer, offset } = node.content else {
            continue;
        };
        let Some(l) = index.layers.get(layer as usize) else {
            continue;
        };
        let Ok(chunks) = l.chunks_covering(offset, node.size) else {
            continue;
        };
        for c in chunks {
            chunk_ranges.push((layer, l.plan(c..c + 1).compressed));
            span_ranges.push((layer, l.plan(l.span_run(c)).compressed));
        }
    }
    FetchFloor {
        chunks: union_len(chunk_ranges),
        spans: union_len(span_ranges),
    }
}

/// Requests and compressed bytes to fetch a whole layer as consecutive span runs, as
/// read-ahead and `ChunkStore::prefetch_all` do.
pub fn whole_layer_runs(l: &clip_index::LayerIndex) -> (u64, u64) {
    let (mut requests, mut bytes) = (0, 0);
    for run in l.span_runs(0..l.chunks.len() as u32) {
        let plan = l.plan(run);
        requests += 1;
        bytes += plan.compressed.end - plan.compressed.start;
    }
    (requests, bytes)
}

/// Total length of the union of per-layer byte ranges.
fn union_len(mut ranges: Vec<(u32, std::ops::Range<u64>)>) -> u64 {
    ranges.sort_by_key(|(layer, r)| (*layer, r.start));
    let mut total = 0;
    let mut cur: Option<(u32, std::ops::Range<u64>)> = None;
    for (layer, r) in ranges {
        match &mut cur {
            Some((l, c)) if *l == layer && r.start <= c.end => c.end = c.end.max(r.end),
            _ => {
                if let Some((_, c)) = cur.take() {
                    total += c.end - c.start;
                }
                cur = Some((layer, r));
            }
        }
    }
    total + cur.map_or(0, |(_, c)| c.end - c.start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_len_counts_overlaps_once_per_layer() {
        let ranges = vec![(0, 0..10), (0, 5..20), (0, 30..40), (1, 0..10)];
        assert_eq!(union_len(ranges), 20 + 10 + 10);
        assert_eq!(union_len(Vec::new()), 0);
    }
}
