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
    pub read_errors: AtomicU64,
    pub read_latency: Histogram,
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
            read_errors: AtomicU64::new(0),
            read_latency: Histogram::default(),
        }
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
            read_errors: self.read_errors.load(Ordering::Relaxed),
            read_latency: self.read_latency.snapshot(),
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
    pub read_errors: u64,
    pub read_latency: HistogramSnapshot,
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
        let mut cumulative = 0;
        for (i, c) in self.read_latency.bucket_counts.iter().enumerate() {
            cumulative += c;
            let le = LATENCY_BUCKETS_US
                .get(i)
                .map_or("+Inf".to_owned(), |us| format!("{}", *us as f64 / 1e6));
            s.push_str(&format!(
                "clip_read_latency_seconds_bucket{{le=\"{le}\"{sep}{labels}}} {cumulative}\n"
            ));
        }
        s.push_str(&format!(
            "clip_read_latency_seconds_sum{{{labels}}} {}\nclip_read_latency_seconds_count{{{labels}}} {}\n",
            self.read_latency.sum_us as f64 / 1e6,
            self.read_latency.count
        ));
        s
    }
}
