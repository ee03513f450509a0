//! Start-up profiles: the chunks a mount's readers asked for first, in the order they asked.
//!
//! A program's start-up reads one file after another, so a cold mount serves it one miss at a
//! time, a round trip each. A mount records which chunks its readers wanted during its first
//! [`RECORD_WINDOW`]; a later mount of the same image (a restarted pod, a cache that was
//! emptied) replays that list: it fetches the spans holding those chunks ahead of the
//! program, several at a time, while the program still reads its first files.
//!
//! On disk a profile is text: a header line, then one line per chunk, `LAYER-DIGEST CHUNK`.
//! Chunks are named by their layer's digest, not its position, so a profile still helps an
//! image that shares layers with the one that recorded it, and lines of layers an image does
//! not have are skipped.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clip_index::{Digest, ImageIndex};

use crate::error::{Error, Result};

/// How long after its first read a mount records.
pub const RECORD_WINDOW: Duration = Duration::from_secs(60);
/// Most chunks a profile holds (1 KiB chunks would be 4 MiB; clip's default is about 1 MiB).
pub const RECORD_LIMIT: usize = 4096;
/// Largest profile file read: far above [`RECORD_LIMIT`] lines.
pub const MAX_PROFILE_BYTES: u64 = 1 << 20;

const HEADER: &str = "clip-startup-profile 1";

/// The chunks read so far, first touch first, within the window and the limit.
#[derive(Debug, Default)]
pub struct Recorder {
    state: Mutex<RecorderState>,
    /// The window or the limit is behind: reads no longer take the lock.
    closed: AtomicBool,
}

#[derive(Debug, Default)]
struct RecorderState {
    first: Option<Instant>,
    seen: HashSet<(usize, u32)>,
    order: Vec<(usize, u32)>,
}

impl Recorder {
    /// A reader wanted `chunks` of `layer`.
    pub fn note(&self, layer: usize, chunks: Range<u32>) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let first = *s.first.get_or_insert(now);
        if now.duration_since(first) > RECORD_WINDOW {
            self.closed.store(true, Ordering::Relaxed);
            return;
        }
        for c in chunks {
            if s.order.len() >= RECORD_LIMIT {
                self.closed.store(true, Ordering::Relaxed);
                return;
            }
            if s.seen.insert((layer, c)) {
                s.order.push((layer, c));
            }
        }
    }

    /// When recording stops: [`RECORD_WINDOW`] after the first read (none yet: unknown).
    pub fn window_end(&self) -> Option<Instant> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.first.map(|f| f + RECORD_WINDOW)
    }

    /// What was recorded: (layer number, chunk number), first touch first.
    pub fn recorded(&self) -> Vec<(usize, u32)> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .order
            .clone()
    }
}

/// What a mount leaves for the next: the chunks its readers asked for first, then those of
/// the profile it replayed that they did not ask for (up to the limit), so a short mount
/// does not make a profile forget what a longer one learnt.
pub fn merge(recorded: &[(usize, u32)], replayed: &[(usize, u32)]) -> Vec<(usize, u32)> {
    let seen: HashSet<_> = recorded.iter().collect();
    let mut out = recorded.to_vec();
    out.extend(replayed.iter().filter(|c| !seen.contains(c)));
    out.truncate(RECORD_LIMIT);
    out
}

/// The text of a profile of `chunks` of `index`.
pub fn encode(index: &ImageIndex, chunks: &[(usize, u32)]) -> String {
    let mut out = format!("{HEADER}\n");
    for &(layer, c) in chunks {
        if let Some(l) = index.layers.get(layer) {
            out.push_str(&format!("{} {c}\n", l.digest));
        }
    }
    out
}

/// The chunks of `index` a profile names, in its order. Lines of layers the image does not
/// have, or past a layer's last chunk, are skipped; a file that is not a profile, or a
/// line that is not `DIGEST NUMBER`, is an error.
pub fn decode(text: &str, index: &ImageIndex) -> Result<Vec<(usize, u32)>> {
    let bad = |line: usize, reason: &str| Error::Profile {
        line,
        reason: reason.to_owned(),
    };
    let mut lines = text.lines();
    if lines.next().map(str::trim_end) != Some(HEADER) {
        return Err(bad(1, "not a clip start-up profile"));
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in lines.enumerate() {
        let n = i + 2;
        if out.len() >= RECORD_LIMIT {
            break;
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (digest, chunk) = line
            .split_once(' ')
            .ok_or_else(|| bad(n, "expected a layer digest and a chunk number"))?;
        let digest: Digest = digest.parse().map_err(|_| bad(n, "not a sha256 digest"))?;
        let chunk: u32 = chunk
            .trim()
            .parse()
            .map_err(|_| bad(n, "not a chunk number"))?;
        let Some(layer) = index.layers.iter().position(|l| l.digest == digest) else {
            continue;
        };
        if (chunk as usize) < index.layers[layer].chunks.len() && seen.insert((layer, chunk)) {
            out.push((layer, chunk));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_keeps_first_touches_up_to_the_limit() {
        let r = Recorder::default();
        r.note(1, 5..7);
        r.note(0, 6..8);
        r.note(1, 4..6);
        assert_eq!(r.recorded(), [(1, 5), (1, 6), (0, 6), (0, 7), (1, 4)]);
        r.note(2, 0..(RECORD_LIMIT as u32 * 2));
        assert_eq!(r.recorded().len(), RECORD_LIMIT);
    }

    #[test]
    fn a_saved_profile_keeps_what_this_mount_did_not_read() {
        assert_eq!(
            merge(&[(0, 3), (1, 1)], &[(1, 1), (0, 9), (0, 3)]),
            [(0, 3), (1, 1), (0, 9)]
        );
        let long: Vec<(usize, u32)> = (0..RECORD_LIMIT as u32).map(|c| (0, c)).collect();
        assert_eq!(merge(&[(1, 0)], &long).len(), RECORD_LIMIT);
    }
}
