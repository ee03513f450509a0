//! Decoded indexes of images that no volume of the node uses any more, kept in memory for a
//! while, so that the image's next publish on this node (a restarted pod, the next job of a
//! series, a rolling update) neither reads nor decodes its index again.
//!
//! Bounded twice: at most `count` indexes, each for `linger` after its last volume went
//! (let go of by the next sweep after that); the oldest goes first. An index kept here is
//! taken out when the image is served again (its store holds it from then on).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clip_index::{Digest, ImageIndex};

use crate::lock;

/// How many released indexes a node keeps, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleLimits {
    /// Most indexes kept; 0 keeps none.
    pub count: usize,
    /// How long an index is kept after the last volume of its image went.
    pub linger: Duration,
}

impl Default for IdleLimits {
    fn default() -> Self {
        Self {
            count: 4,
            linger: Duration::from_secs(600),
        }
    }
}

/// An idle index: the image's index digest, the index, and when its last volume went.
type Idle = (Digest, Arc<ImageIndex>, Instant);

/// The idle indexes, oldest first.
#[derive(Debug)]
pub struct IdleIndexes {
    limits: IdleLimits,
    kept: Mutex<Vec<Idle>>,
}

impl IdleIndexes {
    pub fn new(limits: IdleLimits) -> Self {
        Self {
            limits,
            kept: Mutex::new(Vec::new()),
        }
    }

    /// Keeps the index of an image whose last volume just went.
    pub fn keep(&self, digest: Digest, index: Arc<ImageIndex>) {
        let now = Instant::now();
        let mut kept = lock(&self.kept);
        kept.retain(|(d, _, _)| *d != digest);
        kept.push((digest, index, now));
        let over = kept.len().saturating_sub(self.limits.count);
        kept.drain(..over);
        self.expire_locked(&mut kept, now);
    }

    /// The kept index with this digest, left in the keep, unless its time is over.
    pub fn get(&self, digest: &Digest) -> Option<Arc<ImageIndex>> {
        let mut kept = lock(&self.kept);
        self.expire_locked(&mut kept, Instant::now());
        kept.iter()
            .find(|(d, _, _)| d == digest)
            .map(|(_, index, _)| index.clone())
    }

    /// Takes the index with this digest out of the keep: its image is served again.
    pub fn take(&self, digest: &Digest) -> Option<Arc<ImageIndex>> {
        let mut kept = lock(&self.kept);
        let at = kept.iter().position(|(d, _, _)| d == digest)?;
        Some(kept.remove(at).1)
    }

    /// Whether anything can be kept at all.
    pub fn keeps(&self) -> bool {
        self.limits.count > 0 && !self.limits.linger.is_zero()
    }

    /// Lets go of the indexes kept longer than the linger.
    pub fn expire(&self) {
        self.expire_locked(&mut lock(&self.kept), Instant::now());
    }

    fn expire_locked(&self, kept: &mut Vec<Idle>, now: Instant) {
        kept.retain(|(_, _, since)| now.duration_since(*since) < self.limits.linger);
    }

    pub fn len(&self) -> usize {
        lock(&self.kept).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How often [`IdleIndexes::expire`] should run: half the linger, at least 100 ms and at
    /// most 30 s (so an index stays in memory past its linger by at most that).
    pub fn sweep_every(&self) -> Duration {
        (self.limits.linger / 2).clamp(Duration::from_millis(100), Duration::from_secs(30))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(n: u8) -> (Digest, Arc<ImageIndex>) {
        let source = clip_index::ImageSource {
            repository: format!("repo/{n}"),
            ..Default::default()
        };
        let index = ImageIndex::new(source, Vec::new(), Vec::new(), Vec::new());
        (Digest::of(&[n]), Arc::new(index))
    }

    fn keep(count: usize, linger: Duration) -> IdleIndexes {
        IdleIndexes::new(IdleLimits { count, linger })
    }

    #[test]
    fn an_index_is_taken_once_and_the_oldest_goes_first_when_full() {
        let k = keep(2, Duration::from_secs(60));
        let (a, b, c) = (index(1), index(2), index(3));
        k.keep(a.0, a.1.clone());
        k.keep(b.0, b.1.clone());
        k.keep(c.0, c.1.clone());
        assert_eq!(k.len(), 2);
        assert!(k.get(&a.0).is_none(), "the oldest went when a third came");
        let got = k.get(&b.0).expect("kept");
        assert!(Arc::ptr_eq(&got, &b.1));
        assert_eq!(k.len(), 2, "looked at, still kept");
        assert!(Arc::ptr_eq(&k.take(&b.0).expect("kept"), &b.1));
        assert!(k.get(&b.0).is_none(), "taken out");
        assert_eq!(k.len(), 1);
    }

    #[test]
    fn keeping_an_index_again_makes_it_the_newest() {
        let k = keep(2, Duration::from_secs(60));
        let (a, b, c) = (index(1), index(2), index(3));
        k.keep(a.0, a.1.clone());
        k.keep(b.0, b.1.clone());
        k.keep(a.0, a.1.clone());
        k.keep(c.0, c.1.clone());
        assert!(k.take(&b.0).is_none());
        assert!(k.take(&a.0).is_some());
        assert!(k.take(&c.0).is_some());
    }

    #[test]
    fn nothing_is_kept_with_a_count_of_zero_or_past_the_linger() {
        let none = keep(0, Duration::from_secs(60));
        let a = index(1);
        none.keep(a.0, a.1.clone());
        assert!(none.is_empty());
        assert!(none.get(&a.0).is_none());
        assert!(!none.keeps());
        assert!(!keep(4, Duration::ZERO).keeps());

        let short = keep(4, Duration::from_millis(30));
        assert!(short.keeps());
        short.keep(a.0, a.1.clone());
        assert_eq!(short.len(), 1);
        std::thread::sleep(Duration::from_millis(60));
        short.expire();
        assert!(short.is_empty());
        short.keep(a.0, a.1);
        std::thread::sleep(Duration::from_millis(60));
        assert!(short.get(&a.0).is_none(), "expired when asked for");
        assert_eq!(short.sweep_every(), Duration::from_millis(100));
        assert_eq!(
            keep(4, Duration::from_secs(3600)).sweep_every(),
            Duration::from_secs(30)
        );
    }
}
