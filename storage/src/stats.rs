//! Counters of the read path: per tier hits and bytes, source traffic, latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Hits and bytes served by one tier.
#[derive(Debug, Default)]
pub struct TierCounter {
    pub chunks: AtomicU64,
    pub bytes: AtomicU64,
}

impl TierCounter {
    pub fn add(&self, bytes: usize) {
        self.chunks.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn snapshot(&self, tier: &str) -> TierSnapshot {
        TierSnapshot {
            tier: tier.to_owned(),
            chunks: self.chunks.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

/// Upper bounds of the read latency histogram buckets, in microseconds.
pub const LATENCY_BUCKETS_US: [u64; 10] = [
    100, 500, 1_000, 5_000, 10_000, 50_000, 100_000, 500_000, 1_000_000, 10_000_000,
];

/// A fixed-bucket latency histogram (cumulative counts are computed on export).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 11],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bucket_counts: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

/// Everything a chunk store counts.
#[derive(Debug)]
pub struct StoreStats {
    pub memory: TierCounter,
    /// One counter per cache tier, in tier order.
    pub tiers: Vec<(&'static str, TierCounter)>,
    /// Chunks decoded from source fetches.
    pub source: TierCounter,
    pub source_requests: AtomicU64,
    /// Compressed bytes fetched from the source.
    pub source_bytes: AtomicU64,
    pub prefetched_chunks: AtomicU64,
    /// Chunks read from a cache tier into memory ahead of a reader.
    pub preloaded_chunks: AtomicU64,
    /// Small reads served from part of a chunk in a tier, verified by block digests.
    pub range_reads: AtomicU64,
    /// Files handed to the kernel whole from local disk (FUSE passthrough), which it then
    /// reads without asking.
    pub whole_files_opened: AtomicU64,
    pub read_errors: AtomicU64,
    pub read_latency: Histogram,
    /// Latency of each cache tier's lookups (hits and misses), in tier order, then of
    /// source fetches (a whole range request, decoded).
    pub tier_latency: Vec<(&'static str, Histogram)>,
}

impl StoreStats {
    pub fn new(tiers: &[&'static str]) -> Self {
        Self {
            memory: TierCounter::default(),
            tiers: tiers.iter().map(|&n| (n, TierCounter::default())).collect(),
            source: TierCounter::default(),
            source_requests: AtomicU64::new(0),
            source_bytes: AtomicU64::new(0),
            prefetched_chunks: AtomicU64::new(0),
            preloaded_chunks: AtomicU64::new(0),
            range_reads: AtomicU64::new(0),
            whole_files_opened: AtomicU64::new(0),
            read_errors: AtomicU64::new(0),
            read_latency: Histogram::default(),
            tier_latency: tiers
                .iter()
                .chain(std::iter::once(&"source"))
                .map(|&n| (n, Histogram::default()))
                .collect(),
        }
    }

    /// The latency histogram of tier `name` ("source" for the blob source).
    pub fn tier_latency(&self, name: &str) -> Option<&Histogram> {
        self.tier_latency
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, h)| h)
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        self.snapshot_with(Vec::new())
    }

    /// A snapshot that also carries tier event counters (tier, event, value).
    pub fn snapshot_with(&self, events: Vec<(String, String, u64)>) -> StatsSnapshot {
        let mut tiers = vec![self.memory.snapshot("memory")];
        tiers.extend(self.tiers.iter().map(|(n, c)| c.snapshot(n)));
        tiers.push(self.source.snapshot("source"));
        StatsSnapshot {
            tiers,
            source_requests: self.source_requests.load(Ordering::Relaxed),
            source_bytes: self.source_bytes.load(Ordering::Relaxed),
            prefetched_chunks: self.prefetched_chunks.load(Ordering::Relaxed),
            preloaded_chunks: self.preloaded_chunks.load(Ordering::Relaxed),
            range_reads: self.range_reads.load(Ordering::Relaxed),
            whole_files_opened: self.whole_files_opened.load(Ordering::Relaxed),
            read_errors: self.read_errors.load(Ordering::Relaxed),
            read_latency: self.read_latency.snapshot(),
            tier_latency: self
                .tier_latency
                .iter()
                .map(|(n, h)| ((*n).to_owned(), h.snapshot()))
                .collect(),
            events,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TierSnapshot {
    pub tier: String,
    pub chunks: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Per-bucket (not cumulative) counts; the last bucket is +Inf.
    pub bucket_counts: Vec<u64>,
    pub sum_us: u64,
    pub count: u64,
}

/// A point-in-time copy of [`StoreStats`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub tiers: Vec<TierSnapshot>,
    pub source_requests: u64,
    pub source_bytes: u64,
    pub prefetched_chunks: u64,
    pub preloaded_chunks: u64,
    pub range_reads: u64,
    pub whole_files_opened: u64,
    pub read_errors: u64,
    pub read_latency: HistogramSnapshot,
    /// Per tier ("source" last): latency of its lookups or fetches.
    pub tier_latency: Vec<(String, HistogramSnapshot)>,
    /// Tier events: (tier, event, count), e.g. ("redis", "lease_wait", 3).
    pub events: Vec<(String, String, u64)>,
}

impl StatsSnapshot {
    /// Prometheus text exposition of these counters, with `labels` (e.g. `image="..."`).
    pub fn to_prometheus(&self, labels: &str) -> String {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut s = String::new();
        s.push_str("# HELP clip_tier_chunks_total Chunks served by each tier.\n# TYPE clip_tier_chunks_total counter\n");
        for t in &self.tiers {
            s.push_str(&format!(
                "clip_tier_chunks_total{{tier=\"{}\"{sep}{labels}}} {}\n",
                t.tier, t.chunks
            ));
        }
        s.push_str("# HELP clip_tier_bytes_total Uncompressed bytes served by each tier.\n# TYPE clip_tier_bytes_total counter\n");
        for t in &self.tiers {
            s.push_str(&format!(
                "clip_tier_bytes_total{{tier=\"{}\"{sep}{labels}}} {}\n",
                t.tier, t.bytes
            ));
        }
        for (name, help, v) in [
            (
                "clip_source_requests_total",
                "Range requests sent to the blob source.",
                self.source_requests,
            ),
            (
                "clip_source_bytes_total",
                "Compressed bytes fetched from the blob source.",
                self.source_bytes,
            ),
            (
                "clip_prefetched_chunks_total",
                "Chunks fetched from the source ahead of readers (also counted in the source tier).",
                self.prefetched_chunks,
            ),
            (
                "clip_preloaded_chunks_total",
                "Chunks read from a cache tier into memory ahead of readers.",
                self.preloaded_chunks,
            ),
            (
                "clip_range_reads_total",
                "Small reads served from part of a chunk in a cache tier, verified by block digests.",
                self.range_reads,
            ),
            (
                "clip_whole_files_opened_total",
                "Opens answered with a whole file on local disk that the kernel reads itself (FUSE passthrough).",
                self.whole_files_opened,
            ),
            (
                "clip_read_errors_total",
                "Reads that failed (EIO to the reader).",
                self.read_errors,
            ),
        ] {
            s.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{labels}}} {v}\n"
            ));
        }
        if !self.events.is_empty() {
            s.push_str("# HELP clip_tier_events_total Tier events: misses, errors, leases, verification failures.\n# TYPE clip_tier_events_total counter\n");
            for (tier, event, v) in &self.events {
                s.push_str(&format!(
                    "clip_tier_events_total{{tier=\"{tier}\",event=\"{event}\"{sep}{labels}}} {v}\n"
                ));
            }
        }
        s.push_str("# HELP clip_read_latency_seconds Latency of reads through the store.\n# TYPE clip_read_latency_seconds histogram\n");
        histogram(
            &mut s,
            "clip_read_latency_seconds",
            "",
            labels,
            &self.read_latency,
        );
        s.push_str("# HELP clip_tier_read_seconds Latency of each tier's lookups (hits and misses) and of source fetches.\n# TYPE clip_tier_read_seconds histogram\n");
        for (tier, h) in &self.tier_latency {
            let own = format!("tier=\"{tier}\"{sep}{labels}");
            histogram(&mut s, "clip_tier_read_seconds", &own, "", h);
        }
        s
    }
}

/// Appends the Prometheus lines of histogram `h` named `name` with labels `own` and `labels`
/// (either may be empty).
fn histogram(s: &mut String, name: &str, own: &str, labels: &str, h: &HistogramSnapshot) {
    let all = match (own.is_empty(), labels.is_empty()) {
        (true, _) => labels.to_owned(),
        (false, true) => own.to_owned(),
        (false, false) => format!("{own},{labels}"),
    };
    let sep = if all.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (i, c) in h.bucket_counts.iter().enumerate() {
        cumulative += c;
        let le = LATENCY_BUCKETS_US
            .get(i)
            .map_or("+Inf".to_owned(), |us| format!("{}", *us as f64 / 1e6));
        s.push_str(&format!(
            "{name}_bucket{{le=\"{le}\"{sep}{all}}} {cumulative}\n"
        ));
    }
    s.push_str(&format!(
        "{name}_sum{{{all}}} {}\n{name}_count{{{all}}} {}\n",
        h.sum_us as f64 / 1e6,
        h.count
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, line_start: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    #[test]
    fn each_tier_has_its_own_latency_histogram() {
        let stats = StoreStats::new(&["disk", "redis"]);
        let disk = stats.tier_latency("disk").unwrap();
        disk.observe(Duration::from_micros(300));
        disk.observe(Duration::from_millis(3));
        stats
            .tier_latency("source")
            .unwrap()
            .observe(Duration::from_millis(40));
        assert!(stats.tier_latency("memory").is_none());
        let text = stats.snapshot().to_prometheus("image=\"x\"");
        let b = |tier: &str, le: &str| {
            value(
                &text,
                &format!(
                    "clip_tier_read_seconds_bucket{{le=\"{le}\",tier=\"{tier}\",image=\"x\"}}"
                ),
            )
        };
        // Cumulative buckets: one lookup under 0.5 ms, both under 5 ms.
        assert_eq!(b("disk", "0.0001"), Some(0.0));
        assert_eq!(b("disk", "0.0005"), Some(1.0));
        assert_eq!(b("disk", "0.005"), Some(2.0));
        assert_eq!(b("disk", "+Inf"), Some(2.0));
        assert_eq!(b("redis", "+Inf"), Some(0.0));
        assert_eq!(b("source", "0.01"), Some(0.0));
        assert_eq!(b("source", "0.05"), Some(1.0));
        let count = value(
            &text,
            "clip_tier_read_seconds_count{tier=\"disk\",image=\"x\"}",
        );
        assert_eq!(count, Some(2.0));
        let sum = value(
            &text,
            "clip_tier_read_seconds_sum{tier=\"disk\",image=\"x\"}",
        );
        assert!((sum.unwrap() - 0.0033).abs() < 1e-9, "{text}");
        // The overall read latency keeps its name and labels.
        assert_eq!(
            value(&text, "clip_read_latency_seconds_count{image=\"x\"}"),
            Some(0.0)
        );
    }
}
