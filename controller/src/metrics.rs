//! Controller metrics, served as Prometheus text.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters of reconciles and index builds.
#[derive(Debug, Default)]
pub struct Metrics {
    pub reconciles: AtomicU64,
    failures: Mutex<BTreeMap<String, u64>>,
    pub builds: AtomicU64,
    pub build_failures: AtomicU64,
    build_ms_sum: AtomicU64,
    pub bytes_indexed: AtomicU64,
}

impl Metrics {
    pub fn failure(&self, reason: &str) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        *f.entry(reason.to_owned()).or_default() += 1;
    }

    pub fn build_done(&self, took: Duration, bytes: u64) {
        self.builds.fetch_add(1, Ordering::Relaxed);
        self.build_ms_sum.fetch_add(
            u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.bytes_indexed.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "# HELP clip_controller_reconciles_total Reconciles run.\n# TYPE clip_controller_reconciles_total counter\nclip_controller_reconciles_total {}\n",
            self.reconciles.load(Ordering::Relaxed)
        ));
        s.push_str("# HELP clip_controller_failures_total Failed reconciles and builds by reason.\n# TYPE clip_controller_failures_total counter\n");
        for (reason, n) in self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            s.push_str(&format!(
                "clip_controller_failures_total{{reason=\"{reason}\"}} {n}\n"
            ));
        }
        let builds = self.builds.load(Ordering::Relaxed);
        s.push_str(&format!(
            "# HELP clip_controller_index_build_seconds Index build durations.\n# TYPE clip_controller_index_build_seconds summary\nclip_controller_index_build_seconds_sum {}\nclip_controller_index_build_seconds_count {builds}\n",
            self.build_ms_sum.load(Ordering::Relaxed) as f64 / 1000.0
        ));
        s.push_str(&format!(
            "# HELP clip_controller_index_build_failures_total Index builds that failed.\n# TYPE clip_controller_index_build_failures_total counter\nclip_controller_index_build_failures_total {}\n",
            self.build_failures.load(Ordering::Relaxed)
        ));
        s.push_str(&format!(
            "# HELP clip_controller_indexed_bytes_total Compressed bytes streamed by index builds.\n# TYPE clip_controller_indexed_bytes_total counter\nclip_controller_indexed_bytes_total {}\n",
            self.bytes_indexed.load(Ordering::Relaxed)
        ));
        s
    }
}
