//! A small bounded LRU of recently used chunks. The kernel asks for at most 128 KiB at a
//! time; without this tier every such read of a 1 MiB chunk would re-read and re-verify the
//! whole chunk from disk.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bytes::Bytes;
use clip_index::Digest;

#[derive(Debug)]
struct State {
    entries: HashMap<Digest, (Bytes, u64)>,
    order: BTreeMap<u64, Digest>,
    /// Ticks of use count up from `DEMOTED_SPACE`; demoted entries take ticks below it, so
    /// they go first.
    tick: u64,
    demoted: u64,
    bytes: u64,
}

const DEMOTED_SPACE: u64 = 1 << 48;

impl Default for State {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            tick: DEMOTED_SPACE,
            demoted: 0,
            bytes: 0,
        }
    }
}

/// Chunks in memory, at most `capacity` bytes.
#[derive(Debug)]
pub struct MemoryCache {
    capacity: u64,
    state: Mutex<State>,
}

impl MemoryCache {
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, digest: &Digest) -> Option<Bytes> {
        let mut s = self.lock();
        s.tick += 1;
        let tick = s.tick;
        let (bytes, old) = {
            let e = s.entries.get_mut(digest)?;
            let old = std::mem::replace(&mut e.1, tick);
            (e.0.clone(), old)
        };
        s.order.remove(&old);
        s.order.insert(tick, *digest);
        Some(bytes)
    }

    /// Makes `digest` the next to go: a sequential reader that has moved past a chunk will
    /// not read it again (the kernel's page cache holds it), while the chunks read ahead of
    /// it must stay.
    pub fn demote(&self, digest: &Digest) {
        let mut s = self.lock();
        let tick = s.demoted;
        let Some(e) = s.entries.get_mut(digest) else {
            return;
        };
        let old = std::mem::replace(&mut e.1, tick);
        s.demoted += 1;
        s.order.remove(&old);
        s.order.insert(tick, *digest);
    }

    /// Whether `digest` is held, without making it more recently used.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.lock().entries.contains_key(digest)
    }

    pub fn put(&self, digest: Digest, data: Bytes) {
        if data.len() as u64 > self.capacity {
            return;
        }
        let mut s = self.lock();
        s.tick += 1;
        let tick = s.tick;
        if let Some((_, old)) = s.entries.insert(digest, (data.clone(), tick)) {
            s.order.remove(&old);
        } else {
            s.bytes += data.len() as u64;
        }
        s.order.insert(tick, digest);
        while s.bytes > self.capacity {
            let Some((_, victim)) = s.order.pop_first() else {
                break;
            };
            if let Some((b, _)) = s.entries.remove(&victim) {
                s.bytes -= b.len() as u64;
            }
        }
    }

    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_chunks_go_first() {
        let m = MemoryCache::new(30);
        let d = |i: u8| Digest([i; 32]);
        m.put(d(1), Bytes::from(vec![1; 10]));
        m.put(d(2), Bytes::from(vec![2; 10]));
        m.put(d(3), Bytes::from(vec![3; 10]));
        assert!(m.get(&d(1)).is_some());
        m.put(d(4), Bytes::from(vec![4; 10]));
        assert!(m.get(&d(2)).is_none(), "2 was the least recently used");
        assert!(m.get(&d(1)).is_some() && m.get(&d(3)).is_some() && m.get(&d(4)).is_some());
        assert!(m.bytes() <= 30);
        m.put(d(5), Bytes::from(vec![5; 31]));
        assert!(m.get(&d(5)).is_none(), "larger than the whole cache");
    }

    #[test]
    fn demoted_chunks_go_before_older_ones() {
        let m = MemoryCache::new(30);
        let d = |i: u8| Digest([i; 32]);
        m.put(d(1), Bytes::from(vec![1; 10]));
        m.put(d(2), Bytes::from(vec![2; 10]));
        m.put(d(3), Bytes::from(vec![3; 10]));
        m.demote(&d(3));
        m.put(d(4), Bytes::from(vec![4; 10]));
        assert!(!m.contains(&d(3)), "the demoted chunk went first");
        assert!(m.contains(&d(1)) && m.contains(&d(2)) && m.contains(&d(4)));
        m.demote(&d(9));
        assert!(m.bytes() <= 30);
    }
}
