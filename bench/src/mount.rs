//! `clip-bench mount`: the lazy mount against pulling the whole image, through a registry
//! behind an emulated link (`link`), with the baselines measured in the same run.
//!
//! 1. Start-up: `chroot ROOT python3 -c 'import numpy'` on a lazy clip mount (time from
//!    starting `clip mount` to the command's end), against a full pull and extraction, clip
//!    with a warm disk cache, squashfuse over a local squashfs, and the extracted tree on
//!    local disk.
//! 2. Sequential read of a 1 GiB file: cold, warm (disk cache), hot (page cache) against
//!    `cat` from local disk.
//! 3. Peak RSS of the `clip mount` process during that read and while 32 threads read random
//!    ranges.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

use crate::host::{
    cpu_seconds, drop_page_cache, is_mounted, proc_status_bytes, require_tools, stop_child,
    umount_lazy, wait_mounted,
};
use crate::image::{self, BIG_FILE, ImageFiles};
use crate::link::{Link, Profile};
use crate::reads::{fetch_floor, whole_layer_runs, working_set};
use crate::teardown::{Guard, Teardown};

/// Which measurements to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Part {
    /// The start-up command (measurement 1).
    Startup,
    /// The 1 GiB file: sequential read and peak RSS (measurements 2 and 3).
    Read,
}

#[derive(Debug, Args)]
pub struct MountBench {
    /// Link profile: default = 1 Gbit/s + 2 ms RTT, slow = 1 Gbit/s + 20 ms RTT.
    #[arg(long, value_enum, default_value = "default")]
    profile: Profile,
    /// Runs of each measurement; the fastest is reported (the least disturbed by neighbours).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Only these measurements (default: all).
    #[arg(long, value_enum)]
    only: Option<Part>,
    /// Threads reading random ranges in the memory test.
    #[arg(long, default_value_t = 32)]
    threads: usize,
    /// Random reads per thread (4 KiB to 1 MiB each).
    #[arg(long, default_value_t = 64)]
    reads_per_thread: u64,
    /// Where generated data is kept between runs.
    #[arg(long, default_value = "target/bench-data")]
    data_dir: PathBuf,
    /// The clip binary to measure (default: beside this benchmark's binary).
    #[arg(long)]
    clip: Option<PathBuf>,
    /// The start-up command, run as `chroot ROOT COMMAND...` (default: python3 -c 'import numpy').
    #[arg(last = true)]
    command: Vec<String>,
}

const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("docker-registry", "docker-registry"),
    ("chroot", "coreutils"),
    ("gzip", "gzip"),
    ("tar", "tar"),
    ("mksquashfs", "squashfs-tools"),
    ("squashfuse", "squashfuse"),
    ("/usr/bin/python3", "python3-numpy"),
];

/// The command's PATH (also where `chroot` itself is looked up).
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub(crate) fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

pub(crate) fn mbps(bytes: u64, d: Duration) -> f64 {
    mb(bytes) / d.as_secs_f64()
}

pub(crate) fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Runs `root`'s `cmd` chrooted, with a clean environment; fails with its stderr.
pub(crate) fn run_in_root(root: &Path, cmd: &[String]) -> anyhow::Result<()> {
    let out = Command::new("chroot")
        .arg(root)
        .args(cmd)
        .env_clear()
        .env("PATH", PATH)
        .env("LANG", "C.UTF-8")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("running chroot")?;
    if !out.status.success() {
        bail!(
            "chroot {} {cmd:?}: {}: {}",
            root.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `cat FILE > /dev/null`, timed.
pub(crate) fn time_cat(path: &Path) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let st = Command::new("cat")
        .arg(path)
        .stdout(std::fs::File::create("/dev/null")?)
        .status()?;
    if !st.success() {
        bail!("cat {}: {st}", path.display());
    }
    Ok(t.elapsed())
}

/// Waits until a file of `len` bytes is kept whole under the disk cache `cache`; false if
/// none is within `limit`.
fn wait_for_whole_file(cache: &Path, len: u64, limit: Duration) -> bool {
    let files = cache.join("chunks").join("files");
    let t = Instant::now();
    while t.elapsed() < limit {
        // (No such directory until the first whole file.)
        let found = clip_e2e::check::list(&files).is_ok_and(|paths| {
            paths.iter().any(|p| {
                std::fs::metadata(files.join(p.trim_start_matches('/')))
                    .is_ok_and(|m| m.is_file() && m.len() == len)
            })
        });
        if found {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Opens `path` and reads 4 KiB from the middle: what a program that wants a little of a
/// large file waits for.
fn time_middle_read(path: &Path) -> anyhow::Result<Duration> {
    use std::os::unix::fs::FileExt;
    let t = Instant::now();
    let f = std::fs::File::open(path)?;
    let mut buf = [0u8; 4096];
    f.read_exact_at(&mut buf, (f.metadata()?.len() / 2) & !4095)?;
    Ok(t.elapsed())
}

/// `threads` threads each read `reads` random ranges of 4 KiB..1 MiB; returns bytes read.
fn random_reads(path: &Path, threads: usize, reads: u64) -> anyhow::Result<u64> {
    let size = std::fs::metadata(path)?.len();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> anyhow::Result<u64> {
                    let f = std::fs::File::open(path)?;
                    let mut rng = clip_e2e::Rng(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1));
                    let mut buf = vec![0u8; 1 << 20];
                    let mut total = 0;
                    for _ in 0..reads {
                        let len = (rng.below(256) + 1) * 4096;
                        let off = rng.below(size - len) & !4095;
                        f.read_exact_at(&mut buf[..len as usize], off)?;
                        total += len;
                    }
                    Ok(total)
                })
            })
            .collect();
        let mut total = 0;
        for w in workers {
            total += w
                .join()
                .map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
        }
        Ok(total)
    })
}

/// Counters scraped from `clip mount --metrics-addr`.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Metrics {
    pub(crate) source_requests: u64,
    /// Compressed bytes fetched from the registry.
    pub(crate) source_bytes: u64,
    /// Uncompressed bytes served by each tier.
    pub(crate) from_source: u64,
    pub(crate) from_disk: u64,
    pub(crate) from_memory: u64,
    pub(crate) from_redis: u64,
    /// Redis tier events: chunks written, hits, misses.
    pub(crate) redis_writes: u64,
    pub(crate) redis_hits: u64,
    pub(crate) redis_misses: u64,
    prefetched_chunks: u64,
    /// Reads through the chunk store (FUSE reads that reached clip) and their total time.
    reads: u64,
    read_seconds: f64,
    /// Opens answered with a whole file on local disk (FUSE passthrough).
    whole_files: u64,
}

impl Metrics {
    fn mean_read_ms(&self) -> f64 {
        1000.0 * self.read_seconds / self.reads.max(1) as f64
    }

    fn parse(text: &str) -> Self {
        let mut m = Self::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let name = key.split('{').next().unwrap_or(key);
            if name == "clip_read_latency_seconds_sum" {
                m.read_seconds = value.parse().unwrap_or(0.0);
                continue;
            }
            let Ok(v) = value.parse::<u64>() else {
                continue;
            };
            let tier = key
                .split("tier=\"")
                .nth(1)
                .and_then(|r| r.split('"').next());
            if name == "clip_tier_events_total" && tier == Some("redis") {
                let event = key
                    .split("event=\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next());
                match event {
                    Some("write") => m.redis_writes = v,
                    Some("hit") => m.redis_hits = v,
                    Some("miss") => m.redis_misses = v,
                    _ => {}
                }
                continue;
            }
            match (name, tier) {
                ("clip_source_requests_total", _) => m.source_requests = v,
                ("clip_source_bytes_total", _) => m.source_bytes = v,
                ("clip_tier_bytes_total", Some("source")) => m.from_source = v,
                ("clip_tier_bytes_total", Some("disk")) => m.from_disk = v,
                ("clip_tier_bytes_total", Some("memory")) => m.from_memory = v,
                ("clip_tier_bytes_total", Some("redis")) => m.from_redis = v,
                ("clip_prefetched_chunks_total", _) => m.prefetched_chunks = v,
                ("clip_read_latency_seconds_count", _) => m.reads = v,
                ("clip_whole_files_opened_total", _) => m.whole_files = v,
                _ => {}
            }
        }
        m
    }
}

/// A `clip mount` process serving `dir`; unmounted (and the process ended) on drop.
pub(crate) struct ClipMount {
    child: Arc<Mutex<Child>>,
    pid: u32,
    dir: PathBuf,
    metrics_port: u16,
    _guard: Guard,
}

impl ClipMount {
    /// Starts `clip mount` and returns once `dir` is mounted.
    fn start(
        clip: &Path,
        index: &Path,
        dir: &Path,
        cache: &Path,
        log: &Path,
        extra: &[String],
        teardown: &Arc<Teardown>,
    ) -> anyhow::Result<Self> {
        let metrics_port = clip_e2e::free_port()?;
        let log = std::fs::File::create(log)?;
        let child = Command::new(clip)
            .arg("mount")
            .arg(index)
            .arg(dir)
            .arg("--cache-dir")
            .arg(cache)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", clip.display()))?;
        let pid = child.id();
        let child = Arc::new(Mutex::new(child));
        let guard = {
            let (child, dir) = (child.clone(), dir.to_owned());
            teardown.add(format!("clip mount at {}", dir.display()), move || {
                stop_child(
                    &mut child.lock().unwrap_or_else(|p| p.into_inner()),
                    Duration::from_secs(10),
                );
                umount_lazy(&dir);
            })
        };
        let alive = || {
            child
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .try_wait()
                .is_ok_and(|s| s.is_none())
        };
        wait_mounted(dir, Duration::from_secs(60), alive)?;
        Ok(Self {
            child,
            pid,
            dir: dir.to_owned(),
            metrics_port,
            _guard: guard,
        })
    }

    pub(crate) fn metrics(&self) -> anyhow::Result<Metrics> {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        let mut last = None;
        // The endpoint starts just after the mount.
        for _ in 0..50 {
            match clip_e2e::http::request("GET", &url, &[], &[]) {
                Ok(r) if r.status == 200 => {
                    return Ok(Metrics::parse(&String::from_utf8_lossy(&r.body)));
                }
                Ok(r) => last = Some(anyhow::anyhow!("HTTP {}", r.status)),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no metrics")))
    }

    /// Peak resident set of the `clip mount` process so far.
    fn peak_rss(&self) -> u64 {
        proc_status_bytes(self.pid, "VmHWM").unwrap_or(0)
    }

    fn rss(&self) -> u64 {
        proc_status_bytes(self.pid, "VmRSS").unwrap_or(0)
    }

    fn cpu(&self) -> f64 {
        cpu_seconds(self.pid).unwrap_or(0.0)
    }

    /// SIGTERM: clip unmounts and exits; fails if it did not exit cleanly.
    pub(crate) fn stop(self) -> anyhow::Result<()> {
        {
            let mut c = self.child.lock().unwrap_or_else(|p| p.into_inner());
            stop_child(&mut c, Duration::from_secs(10));
            let status = c.wait()?;
            if !status.success() {
                bail!("clip mount exited with {status}");
            }
        }
        if is_mounted(&self.dir) {
            bail!("{} is still mounted after clip exited", self.dir.display());
        }
        Ok(())
    }
}

/// CPU seconds used by clip, the registry and this process (the link proxy).
#[derive(Debug, Default, Clone, Copy)]
struct CpuSplit {
    clip: f64,
    registry: f64,
    proxy: f64,
}

impl CpuSplit {
    fn since(&self, before: &Self) -> Self {
        Self {
            clip: self.clip - before.clip,
            registry: self.registry - before.registry,
            proxy: self.proxy - before.proxy,
        }
    }
}

/// A warm start-up `took` against the command on local disk in runs alternating with its
/// own (`local`): the ratio that the machine's swings between parts of a run do not move.
fn alternately(took: Duration, local: Duration) -> String {
    format!(
        "{:.2}x of local disk run alternately ({:.2} s)",
        secs(took) / secs(local),
        secs(local)
    )
}

/// Best (lowest) of a series of timings, with what came with it.
pub(crate) struct Best<T> {
    best: Option<(Duration, T)>,
}

impl<T> Best<T> {
    pub(crate) fn new() -> Self {
        Self { best: None }
    }

    pub(crate) fn offer(&mut self, d: Duration, v: T) {
        if self.best.as_ref().is_none_or(|(b, _)| d < *b) {
            self.best = Some((d, v));
        }
    }

    pub(crate) fn get(self) -> anyhow::Result<(Duration, T)> {
        self.best.context("no runs")
    }
}

/// Everything one invocation shares.
pub(crate) struct Bench {
    pub(crate) clip: PathBuf,
    pub(crate) link: Link,
    pub(crate) teardown: Arc<Teardown>,
    pub(crate) work: PathBuf,
    pub(crate) mnt: PathBuf,
    pub(crate) runs: usize,
    pub(crate) threads: usize,
    pub(crate) reads_per_thread: u64,
    pub(crate) warned: bool,
    pub(crate) mounts: u32,
    /// Extra arguments to every `clip mount` (e.g. `--redis SEEDS`).
    pub(crate) mount_args: Vec<String>,
}

impl MountBench {
    pub fn run(self) -> anyhow::Result<()> {
        let clip = crate::host::root_and_clip("mount", self.clip.as_deref())?;
        require_tools(TOOLS)?;
        let command = if self.command.is_empty() {
            ["/usr/bin/python3", "-c", "import numpy"]
                .map(String::from)
                .to_vec()
        } else {
            self.command.clone()
        };
        let dir = self.data_dir.join("mount");
        let want = |p: Part| self.only.is_none_or(|o| o == p);
        let numpy = want(Part::Startup)
            .then(|| image::numpy_image(&dir.join("numpy")))
            .transpose()?;
        let big = want(Part::Read)
            .then(|| image::bigfile_image(&dir.join("bigfile")))
            .transpose()?;

        let teardown = Teardown::new();
        teardown.on_signals()?;
        let work = crate::host::fresh_dir(&dir.join("run"))?;
        let mnt = work.join("mnt");
        std::fs::create_dir_all(&mnt)?;
        let link = Link::up(
            self.profile,
            &dir.join("registry"),
            &work.join("registry.log"),
            &teardown,
        )?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!(
            "## link: {} (tbf on a veth pair into a network namespace, delaying proxy); {cores} cores; load average {}",
            self.profile.describe(),
            load_average()
        );
        let mut bench = Bench {
            clip,
            link,
            teardown: teardown.clone(),
            work,
            mnt,
            runs: self.runs.max(1),
            threads: self.threads.max(1),
            reads_per_thread: self.reads_per_thread.max(1),
            warned: false,
            mounts: 0,
            mount_args: Vec::new(),
        };
        let result = (|| {
            if let Some(image) = &numpy {
                bench.startup(image, &command)?;
            }
            if let Some((image, local)) = &big {
                bench.read(image, local, self.profile)?;
            }
            Ok::<_, anyhow::Error>(())
        })();
        let stats = bench.link.proxy().stats();
        println!(
            "\nthrough the link in this run: {:.0} MB down, {:.1} MB up, {} connections",
            mb(stats.down_bytes.load(std::sync::atomic::Ordering::Relaxed)),
            mb(stats.up_bytes.load(std::sync::atomic::Ordering::Relaxed)),
            stats.connections.load(std::sync::atomic::Ordering::Relaxed)
        );
        println!("load average at the end: {}", load_average());
        drop(bench);
        teardown.run_all();
        result
    }
}

impl Bench {
    /// Bytes the registry has sent through the link so far (bodies and headers), counted
    /// by the proxy.
    pub(crate) fn link_bytes(&self) -> u64 {
        self.link
            .proxy()
            .stats()
            .down_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// HTTP GETs sent through the link so far: (all, of which `GET /v2/`).
    fn link_gets(&self) -> (u64, u64) {
        let s = self.link.proxy().stats();
        (
            s.gets.load(std::sync::atomic::Ordering::Relaxed),
            s.v2_checks.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    pub(crate) fn drop_caches(&mut self) {
        drop_page_cache(&mut self.warned);
    }

    fn cpu_split(&self, m: &ClipMount) -> CpuSplit {
        CpuSplit {
            clip: m.cpu(),
            registry: cpu_seconds(self.link.registry_pid()).unwrap_or(0.0),
            proxy: cpu_seconds(std::process::id()).unwrap_or(0.0),
        }
    }

    pub(crate) fn mount(&mut self, index: &Path, cache: &Path) -> anyhow::Result<ClipMount> {
        self.mounts += 1;
        let log = self.work.join(format!("clip-mount-{}.log", self.mounts));
        ClipMount::start(
            &self.clip,
            index,
            &self.mnt,
            cache,
            &log,
            &self.mount_args,
            &self.teardown,
        )
    }

    pub(crate) fn fresh_cache(&self, name: &str) -> anyhow::Result<PathBuf> {
        let cache = self.work.join(name);
        if cache.exists() {
            std::fs::remove_dir_all(&cache)?;
        }
        Ok(cache)
    }

    /// Pushes `image` (once; the registry keeps it between runs) and indexes it through the
    /// link; returns (reference through the link, index file).
    pub(crate) fn index(&self, image: &ImageFiles) -> anyhow::Result<(String, PathBuf)> {
        let reference = image.push(&self.link.direct_host())?;
        let through = format!("{}/{reference}", self.link.registry_host());
        let out = self
            .work
            .join(format!("{}.clipidx", image.repo.replace('/', "-")));
        let t = Instant::now();
        let result = Command::new(&self.clip)
            .args(["index", &through, "-o"])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()?;
        if !result.status.success() {
            bail!(
                "clip index {through}: {}",
                String::from_utf8_lossy(&result.stderr)
            );
        }
        let took = t.elapsed();
        let size = std::fs::metadata(&out)?.len();
        println!(
            "\n## image {}: {} gzip layers, {:.0} MB uncompressed, {:.0} MB compressed, {} tar entries",
            image.repo,
            image.layers.len(),
            mb(image.uncompressed()),
            mb(image.compressed()),
            image.entries()
        );
        println!(
            "clip index through the link (once per image, not in the figures below): {:.1} s, index {:.0} KiB ({:.2}% of the compressed image)",
            secs(took),
            size as f64 / 1024.0,
            100.0 * size as f64 / image.compressed() as f64
        );
        print_index_load(&self.clip, &out, self.runs)?;
        Ok((reference, out))
    }

    fn startup(&mut self, image: &ImageFiles, cmd: &[String]) -> anyhow::Result<()> {
        let (reference, index) = self.index(image)?;
        let encoded = std::fs::read(&index)?;
        let decoded = clip_index::decode(&encoded)?;
        let root = self.work.join("root");
        let pulled = self.work.join("pull");
        let host = self.link.registry_host();

        // (b) Full pull: download every layer through the link, extract in order, run.
        let mut pull = Best::new();
        for _ in 0..self.runs {
            for d in [&root, &pulled] {
                if d.exists() {
                    std::fs::remove_dir_all(d)?;
                }
            }
            self.drop_caches();
            let t = Instant::now();
            let files = image::pull_layers(&host, &reference, &pulled, 3)?;
            let downloaded = t.elapsed();
            image::extract_layers(&files, &root)?;
            let extracted = t.elapsed();
            run_in_root(&root, cmd)?;
            let total = t.elapsed();
            pull.offer(
                total,
                (downloaded, extracted - downloaded, total - extracted),
            );
        }
        let (pull_total, (pull_dl, pull_ex, pull_cmd)) = pull.get()?;

        // (e) The extracted tree on local disk, cold and hot page cache.
        let mut local = Best::new();
        for _ in 0..self.runs {
            self.drop_caches();
            let t = Instant::now();
            run_in_root(&root, cmd)?;
            local.offer(t.elapsed(), ());
        }
        let (local_cold, ()) = local.get()?;
        let mut hot = Best::new();
        for _ in 0..self.runs {
            let t = Instant::now();
            run_in_root(&root, cmd)?;
            hot.offer(t.elapsed(), ());
        }
        let (local_hot, ()) = hot.get()?;
        let opened = working_set(&root, cmd);

        // (d) squashfuse over a local squashfs of the same tree.
        let sqfs = self.squashfs(image, &root)?;
        let mut squash = Best::new();
        for _ in 0..self.runs {
            self.drop_caches();
            let t = Instant::now();
            let mut child = Command::new("squashfuse")
                .arg("-f")
                .arg(&sqfs)
                .arg(&self.mnt)
                .stdin(Stdio::null())
                .spawn()?;
            let guard = {
                let mnt = self.mnt.clone();
                self.teardown
                    .add(format!("squashfuse at {}", mnt.display()), move || {
                        umount_lazy(&mnt)
                    })
            };
            let waited = wait_mounted(&self.mnt, Duration::from_secs(30), || {
                child.try_wait().is_ok_and(|s| s.is_none())
            });
            let ran = waited.and_then(|()| run_in_root(&self.mnt, cmd));
            let took = t.elapsed();
            drop(guard);
            stop_child(&mut child, Duration::from_secs(5));
            ran?;
            squash.offer(took, ());
        }
        let (squash_secs, ()) = squash.get()?;

        // (a) clip, lazy: a fresh cache, from starting `clip mount` to the command's end.
        let mut lazy = Best::new();
        let mut cache = PathBuf::new();
        for run in 0..self.runs {
            cache = self.fresh_cache(&format!("cache-startup-{run}"))?;
            self.drop_caches();
            let before = (self.link_bytes(), self.link_gets());
            let t = Instant::now();
            let m = self.mount(&index, &cache)?;
            let mounted = t.elapsed();
            run_in_root(&self.mnt, cmd)?;
            let took = t.elapsed();
            let metrics = m.metrics()?;
            let rss = m.peak_rss();
            m.stop()?;
            let gets = self.link_gets();
            let link = (
                self.link_bytes() - before.0,
                (gets.0 - before.1.0, gets.1 - before.1.1),
            );
            lazy.offer(took, (mounted, metrics, rss, link));
            if run > 0 {
                std::fs::remove_dir_all(self.work.join(format!("cache-startup-{}", run - 1)))?;
            }
        }
        let (lazy_secs, (lazy_mounted, lazy_metrics, lazy_rss, (lazy_link, lazy_gets))) =
            lazy.get()?;

        // (a') clip, cold cache, with the start-up profile the last lazy run recorded (a pod
        // restarted on an emptied cache, or another node given the profile).
        let recorded = std::fs::read_dir(cache.join("profiles"))?
            .next()
            .context("the lazy run recorded no start-up profile")??
            .path();
        let profile = self.work.join("startup.profile");
        let profile_chunks =
            clip_storage::profile::decode(&std::fs::read_to_string(&recorded)?, &decoded)?
                .chunks
                .len();
        self.mount_args.extend([
            "--startup-profile".to_owned(),
            profile.display().to_string(),
        ]);
        let mut profiled = Best::new();
        for run in 0..self.runs {
            std::fs::copy(&recorded, &profile)?;
            let fresh = self.fresh_cache(&format!("cache-profiled-{run}"))?;
            self.drop_caches();
            let before = (self.link_bytes(), self.link_gets());
            let t = Instant::now();
            let m = self.mount(&index, &fresh)?;
            run_in_root(&self.mnt, cmd)?;
            let took = t.elapsed();
            m.stop()?;
            let gets = self.link_gets();
            profiled.offer(took, (self.link_bytes() - before.0, gets.0 - before.1.0));
            std::fs::remove_dir_all(&fresh)?;
        }
        self.mount_args.truncate(self.mount_args.len() - 2);
        let (profiled_secs, (profiled_link, profiled_gets)) = profiled.get()?;

        // (c) clip with a warm disk cache: a new process on the last run's cache; and the
        // same without the prefill of the kernel's caches from the start-up profile.
        let (warm_secs, (warm_mounted, warm_link, warm_m, warm_local)) =
            self.warm(&index, &cache, cmd)?;
        self.mount_args.push("--no-prefill".to_owned());
        let unfilled = self.warm(&index, &cache, cmd);
        self.mount_args.pop();
        let (unfilled_secs, (unfilled_mounted, _, _, unfilled_local)) = unfilled?;

        // (c') The same warm cache served by the node plugin, as a pod gets it: a running
        // `clip node` publishes the volume (kubelet's NodePublishVolume), then the command.
        let image_ref = format!("{}/{reference}", self.link.registry_host());
        let manifest = decoded.source.manifest_digest;
        let from_file = self.node_warm(&image_ref, &encoded, manifest, &cache, cmd, false)?;
        let from_memory = self.node_warm(&image_ref, &encoded, manifest, &cache, cmd, true)?;
        std::fs::remove_dir_all(&cache)?;

        println!(
            "\n## start-up: chroot ROOT {} (best of {}; page cache dropped before each run except \"hot\")",
            shell_words(cmd),
            self.runs
        );
        println!("                                             seconds   x local disk");
        let row = |name: &str, d: Duration, note: String| {
            println!(
                "{name:<42} {:>8.2}   {:>7.2}x  {note}",
                secs(d),
                secs(d) / secs(local_cold)
            );
        };
        row("local disk (extracted tree)", local_cold, String::new());
        row(
            "local disk, page cache hot",
            local_hot,
            String::from("(not dropped)"),
        );
        row("squashfuse, local squashfs", squash_secs, String::new());
        row(
            "clip, warm disk cache (remount)",
            warm_secs,
            format!(
                "(mounted after {:.2} s, command {:.2} s; {}; {:.1} MB from the registry; {} files read by the kernel from whole copies, {} reads through clip)",
                secs(warm_mounted),
                secs(warm_secs.saturating_sub(warm_mounted)),
                alternately(warm_secs, warm_local),
                mb(warm_link),
                warm_m.whole_files,
                warm_m.reads
            ),
        );
        row(
            "clip, warm disk cache, no prefill",
            unfilled_secs,
            format!(
                "(mounted after {:.2} s, command {:.2} s; {}; `--no-prefill`: the program asks for every name and small file itself)",
                secs(unfilled_mounted),
                secs(unfilled_secs.saturating_sub(unfilled_mounted)),
                alternately(unfilled_secs, unfilled_local),
            ),
        );
        for (name, (took, published)) in [
            ("clip node, warm, index read", from_file),
            ("clip node, warm, index in memory", from_memory),
        ] {
            row(
                name,
                took,
                format!(
                    "(NodePublishVolume {:.3} s, command {:.2} s)",
                    secs(published),
                    secs(took.saturating_sub(published))
                ),
            );
        }
        row(
            "clip lazy, cold (mount + command)",
            lazy_secs,
            format!("(mounted after {:.2} s)", secs(lazy_mounted)),
        );
        row(
            "clip lazy, cold, start-up profile",
            profiled_secs,
            format!(
                "(profile of {profile_chunks} chunks from an earlier mount; {:.1} MB in {profiled_gets} GETs)",
                mb(profiled_link)
            ),
        );
        row(
            "full pull + extract + command",
            pull_total,
            format!(
                "(download {:.1} s, extract {:.1} s, command {:.2} s)",
                secs(pull_dl),
                secs(pull_ex),
                secs(pull_cmd)
            ),
        );
        println!(
            "clip lazy against full pull: {:.1}x faster; download alone {:.1}x clip's time",
            secs(pull_total) / secs(lazy_secs),
            secs(pull_dl) / secs(lazy_secs)
        );
        println!(
            "clip lazy with a start-up profile against full pull: {:.1}x faster ({:.1}%)",
            secs(pull_total) / secs(profiled_secs),
            100.0 * secs(profiled_secs) / secs(pull_total)
        );
        println!(
            "clip lazy: {:.1} MB over the link = {:.2}% of the compressed image ({:.0} MB), {} GETs of which {} `GET /v2/`; clip counted {:.1} MB in {} range requests; {:.1} MB of chunks came from the registry, {} chunks of them fetched ahead of readers; {} reads, mean {:.2} ms; peak RSS {:.0} MiB",
            mb(lazy_link),
            100.0 * lazy_link as f64 / image.compressed() as f64,
            mb(image.compressed()),
            lazy_gets.0,
            lazy_gets.1,
            mb(lazy_metrics.source_bytes),
            lazy_metrics.source_requests,
            mb(lazy_metrics.from_source),
            lazy_metrics.prefetched_chunks,
            lazy_metrics.reads,
            lazy_metrics.mean_read_ms(),
            lazy_rss as f64 / f64::from(1 << 20),
        );
        if let Some(w) = opened {
            println!(
                "the command opened {} files of {:.1} MB = {:.2}% of the uncompressed image (strace); {} failed lookups",
                w.paths.len(),
                mb(w.bytes),
                100.0 * w.bytes as f64 / image.uncompressed() as f64,
                w.failed
            );
            let floor = fetch_floor(&decoded, &w.paths);
            println!(
                "compressed bytes those files need: {:.1} MB as their chunks, each from its nearest checkpoint; {:.1} MB as whole checkpoint spans (what a miss fetches)",
                mb(floor.chunks),
                mb(floor.spans)
            );
        }
        Ok(())
    }

    /// Best of the runs of a warm start-up: `clip mount` (with the extra arguments of the
    /// moment) on the warm disk cache `cache`, page cache dropped; returns (mount and
    /// command, (the mount, bytes over the link, the mount's metrics, the best of the same
    /// command on local disk, run before each of these)). The machine's slow swings (minutes
    /// long here) then fall on both sides of that ratio alike.
    fn warm(
        &mut self,
        index: &Path,
        cache: &Path,
        cmd: &[String],
    ) -> anyhow::Result<(Duration, (Duration, u64, Metrics, Duration))> {
        let root = self.work.join("root");
        let mut warm = Best::new();
        let mut local = Best::new();
        for _ in 0..self.runs {
            self.drop_caches();
            let t = Instant::now();
            run_in_root(&root, cmd)?;
            local.offer(t.elapsed(), ());
            self.drop_caches();
            let before = self.link_bytes();
            let t = Instant::now();
            let m = self.mount(index, cache)?;
            let mounted = t.elapsed();
            run_in_root(&self.mnt, cmd)?;
            let took = t.elapsed();
            let metrics = m.metrics()?;
            m.stop()?;
            warm.offer(took, (mounted, self.link_bytes() - before, metrics));
        }
        let (alongside, ()) = local.get()?;
        let (took, (mounted, link, metrics)) = warm.get()?;
        Ok((took, (mounted, link, metrics, alongside)))
    }

    /// Best of the runs of a warm start-up through the node plugin: a running `clip node`
    /// whose disk cache is `cache` (moved in for the runs, then back), with the index
    /// `encoded` (of image `manifest`) and the start-up profile in its state as if it had
    /// served the image before. Each run drops the page cache, publishes the volume as
    /// kubelet does and runs `cmd` in it; returns (the publish and the command, the
    /// publish). With `idle`, the node keeps the index in memory between volumes
    /// (`--idle-indexes 1`); without (0), every publish reads and decodes the index file.
    /// One untimed run first, as on a node that has published volumes before.
    fn node_warm(
        &mut self,
        image: &str,
        encoded: &[u8],
        manifest: clip_index::Digest,
        cache: &Path,
        cmd: &[String],
        idle: bool,
    ) -> anyhow::Result<(Duration, Duration)> {
        let dir = crate::host::fresh_dir(&self.work.join("node"))?;
        let digest = clip_index::index_digest(encoded);
        let indexes = dir.join("state/indexes");
        std::fs::create_dir_all(&indexes)?;
        std::fs::write(indexes.join(format!("{}.clipidx", digest.hex())), encoded)?;
        std::fs::write(
            indexes.join(format!("manifest-{}", manifest.hex())),
            digest.to_string(),
        )?;
        let profiles = dir.join("state/profiles");
        std::fs::create_dir_all(&profiles)?;
        let profile = clip_driver::profile::path_in(&cache.join("profiles"), &manifest);
        std::fs::copy(
            &profile,
            clip_driver::profile::path_in(&profiles, &manifest),
        )
        .with_context(|| format!("the start-up profile {}", profile.display()))?;
        let node_cache = dir.join("cache");
        std::fs::rename(cache, &node_cache)?;
        let result = (|| {
            let extra = ["--idle-indexes".to_owned(), u8::from(idle).to_string()];
            let node = crate::publish::NodePlugin::start(&self.clip, &dir, &extra, &self.teardown)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let mut client = node.client(&rt)?;
            let mut best = Best::new();
            for run in 0..=self.runs {
                let name = format!("warm-{run}");
                let target = node.pod_target(&name)?;
                let req = crate::publish::publish_request(&name, &target, image);
                self.drop_caches();
                let t = Instant::now();
                rt.block_on(crate::publish::publish_like_kubelet(&mut client, &req))?;
                let published = t.elapsed();
                let ran = run_in_root(&target, cmd);
                let took = t.elapsed();
                rt.block_on(
                    client.node_unpublish_volume(clip_driver::csi::kubelet::unpublish(
                        &name, &target,
                    )),
                )?;
                ran?;
                if run > 0 {
                    best.offer(took, published);
                }
            }
            // The plugin's graceful stop waits for its clients to hang up.
            drop(client);
            drop(rt);
            node.stop()?;
            best.get()
        })();
        let moved_back = std::fs::rename(&node_cache, cache);
        let result = result?;
        moved_back?;
        Ok(result)
    }

    /// A squashfs of `root`, built once per image version.
    fn squashfs(&self, image: &ImageFiles, root: &Path) -> anyhow::Result<PathBuf> {
        let dir = self.work.parent().context("work dir")?;
        let out = dir.join("numpy.sqfs");
        let stamp = dir.join("numpy.sqfs.digest");
        if out.is_file()
            && std::fs::read_to_string(&stamp).is_ok_and(|s| s == image.manifest.digest)
        {
            return Ok(out);
        }
        eprintln!("building {} (once)...", out.display());
        let st = Command::new("mksquashfs")
            .arg(root)
            .arg(&out)
            .args(["-noappend", "-quiet", "-no-progress"])
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("mksquashfs: {st}");
        }
        std::fs::write(&stamp, &image.manifest.digest)?;
        Ok(out)
    }

    fn read(&mut self, image: &ImageFiles, local: &Path, profile: Profile) -> anyhow::Result<()> {
        let (_, index) = self.index(image)?;
        let size = std::fs::metadata(local)?.len();
        let in_mount = self.mnt.join(BIG_FILE);

        let mut local_cold = Best::new();
        for _ in 0..self.runs {
            self.drop_caches();
            local_cold.offer(time_cat(local)?, ());
        }
        let (local_cold, ()) = local_cold.get()?;
        let mut local_hot = Best::new();
        for _ in 0..self.runs {
            local_hot.offer(time_cat(local)?, ());
        }
        let (local_hot, ()) = local_hot.get()?;
        let mut local_middle = Best::new();
        for _ in 0..self.runs {
            self.drop_caches();
            local_middle.offer(time_middle_read(local)?, ());
        }
        let (local_middle, ()) = local_middle.get()?;

        // Cold, then hot in the same mount.
        let mut cold = Best::new();
        let mut hot = Best::new();
        let mut steady = Best::new();
        let mut kept_whole = true;
        let mut seq_peak = 0u64;
        let mut idle = 0u64;
        let mut cache = PathBuf::new();
        for run in 0..self.runs {
            cache = self.fresh_cache(&format!("cache-read-{run}"))?;
            self.drop_caches();
            let m = self.mount(&index, &cache)?;
            idle = idle.max(m.rss());
            let before = (self.link_bytes(), self.link_gets());
            let cpu_before = self.cpu_split(&m);
            let took = time_cat(&in_mount)?;
            let cpu = self.cpu_split(&m).since(&cpu_before);
            let link = self.link_bytes() - before.0;
            let gets = self.link_gets();
            let gets = (gets.0 - before.1.0, gets.1 - before.1.1);
            let metrics = m.metrics()?;
            seq_peak = seq_peak.max(m.peak_rss());
            cold.offer(took, (metrics, link, cpu, gets));
            hot.offer(time_cat(&in_mount)?, ());
            // Once the mount has kept the file whole on disk (in the background, after
            // the cold read), an open hands it to the kernel (passthrough).
            // (The first such open in a process checks the file: best of three.)
            kept_whole &= wait_for_whole_file(&cache, size, Duration::from_secs(30));
            for _ in 0..3 {
                steady.offer(time_cat(&in_mount)?, ());
            }
            m.stop()?;
            if run > 0 {
                std::fs::remove_dir_all(self.work.join(format!("cache-read-{}", run - 1)))?;
            }
        }
        let (cold_t, (cold_m, cold_link, cold_cpu, cold_gets)) = cold.get()?;
        let (hot_t, ()) = hot.get()?;
        let (steady_t, ()) = steady.get()?;

        let mut warm = Best::new();
        let mut warm_middle = Best::new();
        for _ in 0..self.runs {
            // A new process on the warm cache that wants 4 KiB of the file...
            self.drop_caches();
            let m = self.mount(&index, &cache)?;
            warm_middle.offer(time_middle_read(&in_mount)?, ());
            m.stop()?;
            // ...and one that reads all of it.
            self.drop_caches();
            let before = self.link_bytes();
            let m = self.mount(&index, &cache)?;
            let cpu_before = self.cpu_split(&m);
            let took = time_cat(&in_mount)?;
            let cpu = self.cpu_split(&m).since(&cpu_before);
            let metrics = m.metrics()?;
            m.stop()?;
            warm.offer(took, (metrics, self.link_bytes() - before, cpu));
        }
        let (warm_t, (warm_m, warm_link, warm_cpu)) = warm.get()?;
        let (warm_middle, ()) = warm_middle.get()?;
        std::fs::remove_dir_all(&cache)?;

        println!(
            "\n## sequential read of a 1 GiB file ({:.0} MB gzip), cat > /dev/null (best of {})",
            mb(image.compressed()),
            self.runs
        );
        println!("                                     MB/s   x local disk");
        let row = |name: &str, d: Duration, note: String| {
            println!(
                "{name:<34} {:>6.0}   {:>6.2}x  {note}",
                mbps(size, d),
                secs(local_cold) / secs(d)
            );
        };
        row("local disk (cold page cache)", local_cold, String::new());
        row("local disk, page cache hot", local_hot, String::new());
        row(
            "clip cold (registry over the link)",
            cold_t,
            format!(
                "({:.0} MB over the link = {:.0} MB/s, {:.0}% of the {} Mbit/s link, {} GETs of which {} `GET /v2/`; clip counted {:.0} MB in {} requests, {} chunks read ahead)",
                mb(cold_link),
                mbps(cold_link, cold_t),
                100.0 * mbps(cold_link, cold_t) * 1e6 / profile.rate_bytes() as f64,
                profile.rate_mbit(),
                cold_gets.0,
                cold_gets.1,
                mb(cold_m.source_bytes),
                cold_m.source_requests,
                cold_m.prefetched_chunks,
            ),
        );
        row(
            "clip warm (disk cache, remounted)",
            warm_t,
            format!(
                "({:.0} MB served from disk, {:.0} MB from memory, {:.0} MB over the link)",
                mb(warm_m.from_disk),
                mb(warm_m.from_memory),
                mb(warm_link)
            ),
        );
        row(
            "clip hot, re-read at once",
            hot_t,
            "(same mount, right after the cold read: the mount's page cache)".into(),
        );
        row(
            "clip hot, settled",
            steady_t,
            if kept_whole {
                "(same mount, once it kept the file whole on disk: passthrough; best of 3 re-reads)"
                    .into()
            } else {
                "(same mount; the file was not kept whole within 30 s)".into()
            },
        );
        println!(
            "open and read 4 KiB at the middle, new process, cold page cache: local disk {:.1} ms, clip warm {:.1} ms ({:.2}x the local time)",
            1e3 * secs(local_middle),
            1e3 * secs(warm_middle),
            secs(warm_middle) / secs(local_middle)
        );
        let decoded = clip_index::decode(&std::fs::read(&index)?)?;
        let (runs, run_bytes) = whole_layer_runs(&decoded.layers[0]);
        println!(
            "reading the layer as clip's span runs (one request each): {runs} requests, {:.0} MB for a {:.0} MB blob ({:.1}% fetched twice: each run ends past the next run's checkpoint)",
            mb(run_bytes),
            mb(image.compressed()),
            100.0 * (run_bytes as f64 / image.compressed() as f64 - 1.0)
        );
        println!(
            "CPU seconds during the cold read of {:.1} s: clip {:.1}, registry {:.1}, link proxy {:.1} (of {:.1} on 2 cores); clip {} reads, mean {:.2} ms",
            secs(cold_t),
            cold_cpu.clip,
            cold_cpu.registry,
            cold_cpu.proxy,
            2.0 * secs(cold_t),
            cold_m.reads,
            cold_m.mean_read_ms()
        );
        println!(
            "CPU seconds during the warm read of {:.1} s: clip {:.1} (of {:.1} on 2 cores); clip {} reads, mean {:.2} ms",
            secs(warm_t),
            warm_cpu.clip,
            2.0 * secs(warm_t),
            warm_m.reads,
            warm_m.mean_read_ms()
        );

        // Random ranges from many threads: memory under concurrency, cold cache.
        self.drop_caches();
        let t = Instant::now();
        let local_bytes = random_reads(local, self.threads, self.reads_per_thread)?;
        let local_random = t.elapsed();
        let mut random = Best::new();
        let mut random_peak = 0u64;
        for run in 0..self.runs {
            let cache = self.fresh_cache(&format!("cache-random-{run}"))?;
            self.drop_caches();
            let m = self.mount(&index, &cache)?;
            idle = idle.max(m.rss());
            let before = self.link_bytes();
            let t = Instant::now();
            let bytes = random_reads(&in_mount, self.threads, self.reads_per_thread)?;
            let took = t.elapsed();
            let link = self.link_bytes() - before;
            let metrics = m.metrics()?;
            random_peak = random_peak.max(m.peak_rss());
            m.stop()?;
            std::fs::remove_dir_all(&cache)?;
            random.offer(took, (bytes, metrics, link));
        }
        let (random_t, (random_bytes, random_m, random_link)) = random.get()?;
        println!(
            "\n## {} threads x {} random reads of 4 KiB-1 MiB of the 1 GiB file, cold",
            self.threads, self.reads_per_thread
        );
        println!(
            "local disk                         {:>6.0} MB/s   1.00x",
            mbps(local_bytes, local_random)
        );
        println!(
            "clip cold                          {:>6.0} MB/s   {:.2}x  ({:.0} MB read; {:.0} MB over the link; clip counted {:.0} MB in {} requests)",
            mbps(random_bytes, random_t),
            mbps(random_bytes, random_t) / mbps(local_bytes, local_random),
            mb(random_bytes),
            mb(random_link),
            mb(random_m.source_bytes),
            random_m.source_requests
        );

        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        println!("\n## peak RSS of the clip mount process (VmHWM, max over runs)");
        println!(
            "just mounted (VmRSS)               {:>6.1} MiB   1.00x",
            mib(idle)
        );
        println!(
            "sequential 1 GiB read, cold        {:>6.1} MiB   {:.2}x",
            mib(seq_peak),
            seq_peak as f64 / idle as f64
        );
        println!(
            "{:>2} threads random reads, cold    {:>6.1} MiB   {:.2}x",
            self.threads,
            mib(random_peak),
            random_peak as f64 / idle as f64
        );
        Ok(())
    }
}

/// The 1-minute load average: other work on this machine disturbs the figures.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

pub(crate) fn shell_words(cmd: &[String]) -> String {
    cmd.iter()
        .map(|w| {
            if w.contains(' ') {
                format!("'{w}'")
            } else {
                w.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a mount waits for to load the index, in a new process as a mount is (page cache
/// hot, best of `runs`): `clip inspect INDEX` (start, read, decode, check, print) against
/// `clip --version` (start only), measured in the same run.
fn print_index_load(clip: &Path, index: &Path, runs: usize) -> anyhow::Result<()> {
    let best = |args: &[&std::ffi::OsStr]| -> anyhow::Result<Duration> {
        let mut best = Duration::MAX;
        // The first run, untimed, brings `clip` and the index into the page cache.
        for run in 0..=runs.max(1) {
            let t = Instant::now();
            let out = Command::new(clip).args(args).output()?;
            if run > 0 {
                best = best.min(t.elapsed());
            }
            if !out.status.success() {
                bail!("clip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        Ok(best)
    };
    let started = best(&["--version".as_ref()])?;
    let loaded = best(&["inspect".as_ref(), index.as_os_str()])?;
    println!(
        "loading the index in a new process (page cache hot, best of {runs}): `clip inspect` {:.1} ms against {:.1} ms for `clip --version`: {:.1} ms to read, decode and check it",
        1e3 * secs(loaded),
        1e3 * secs(started),
        1e3 * secs(loaded.saturating_sub(started))
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_read_from_the_prometheus_text() {
        let text = "# HELP x\nclip_tier_bytes_total{tier=\"source\",image=\"a\"} 7\nclip_source_bytes_total{image=\"a\"} 9\nclip_prefetched_chunks_total{image=\"a\"} 3\n";
        let m = Metrics::parse(text);
        assert_eq!(
            (m.from_source, m.source_bytes, m.prefetched_chunks),
            (7, 9, 3)
        );
    }
}
