//! `clip-bench publish`: from kubelet's NodePublishVolume to the first successful read of a
//! file in the volume, on a cold node, against a full pull and extraction of the same image
//! measured in the same run.
//!
//! The node plugin is `clip node` as a process (kube access off, a direct `image:` volume)
//! on a unix socket; this benchmark plays kubelet with the CSI client, retrying UNAVAILABLE
//! ("indexing, retry") with kubelet's backoff (500 ms, doubling). The registry sits behind
//! the emulated link of `clip-bench mount`; a Redis Cluster runs on loopback. Each run, with
//! a fresh Redis key prefix and the page cache dropped before each measurement:
//!
//! 1. full pull: download every layer through the link, extract them, read the file;
//! 2. node A (new process, empty state and disk cache), empty Redis: publish indexes the
//!    image through the link (the build's own time is taken from the node's log), mounts,
//!    then the first read; A shares the index and the chunks it read through Redis;
//! 3. node B (new process, empty state and disk cache), Redis warm from node A.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use clip_driver::csi::kubelet;
use clip_driver::csi::proto::NodePublishVolumeRequest;
use clip_driver::csi::proto::node_client::NodeClient;
use tonic::transport::Channel;

use crate::host::{drop_page_cache, fresh_dir, require_tools, stop_child, umount_lazy};
use crate::image;
use crate::link::{Link, Profile};
use crate::mount::{Best, load_average, mb, secs};
use crate::teardown::{Guard, Teardown};

#[derive(Debug, Args)]
pub struct PublishBench {
    /// Link profile of the registry: default = 1 Gbit/s + 2 ms RTT, slow = + 20 ms RTT.
    #[arg(long, value_enum, default_value = "slow")]
    profile: Profile,
    /// Runs of each measurement; the fastest is reported.
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// The file read, a path inside the numpy image.
    #[arg(
        long,
        default_value = "usr/lib/python3/dist-packages/numpy/core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so"
    )]
    file: String,
    /// Bytes of the first read (from the file's start).
    #[arg(long, default_value_t = 128 << 10)]
    first_read: usize,
    /// The node's --publish-wait: seconds a publish waits for an index build before
    /// answering UNAVAILABLE (kubelet then retries).
    #[arg(long, default_value_t = 20)]
    publish_wait: u64,
    /// Where generated data is kept between runs (shared with `clip-bench mount`).
    #[arg(long, default_value = "target/bench-data")]
    data_dir: PathBuf,
    /// The clip binary (default: beside this benchmark's binary).
    #[arg(long)]
    clip: Option<PathBuf>,
}

const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("docker-registry", "docker-registry"),
    ("gzip", "gzip"),
    ("tar", "tar"),
    ("redis-server", "redis-server"),
    ("redis-cli", "redis-tools"),
    ("/usr/bin/python3", "python3-numpy"),
];

/// kubelet's retry of a failed volume operation: 500 ms, doubling, at most 2 min 2 s.
const KUBELET_FIRST_RETRY: Duration = Duration::from_millis(500);
const KUBELET_MAX_RETRY: Duration = Duration::from_secs(122);

/// What one cold-node measurement saw.
#[derive(Debug, Clone, Copy, Default)]
struct Publish {
    /// NodePublishVolume calls until one succeeded.
    attempts: u32,
    /// From the first call until the successful one returned.
    published: Duration,
    /// From the first call until the first read returned its bytes.
    first_read: Duration,
    /// From the first call until the whole file was read.
    whole_file: Duration,
    /// The node's index build (from its log), when it built one.
    index_build: Option<Duration>,
    /// Bytes the registry sent through the link.
    link_bytes: u64,
    /// From the node's metrics: range requests to the registry, bytes from Redis.
    source_requests: u64,
    from_redis: u64,
}

/// The full pull baseline.
#[derive(Debug, Clone, Copy, Default)]
struct Pull {
    download: Duration,
    extract: Duration,
    first_read: Duration,
    link_bytes: u64,
}

/// A `clip node` process; on drop (or a signal) its volume is unmounted and it is stopped.
pub(crate) struct NodePlugin {
    child: Arc<Mutex<Child>>,
    dir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    metrics_port: u16,
    _guard: Guard,
}

impl NodePlugin {
    /// `clip node` with its socket, state and cache under `dir`, metrics on a free port, and
    /// `extra` arguments.
    pub(crate) fn start(
        clip: &Path,
        dir: &Path,
        extra: &[String],
        teardown: &Arc<Teardown>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let socket = clip_e2e::node::socket(dir);
        let log = dir.join("node.log");
        let metrics_port = clip_e2e::free_port()?;
        let node_id = dir.file_name().unwrap_or_default().to_string_lossy();
        let child = Command::new(clip)
            .args(clip_e2e::node::node_args(dir, &node_id))
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {} node", clip.display()))?;
        let child = Arc::new(Mutex::new(child));
        let guard = {
            let (child, pods) = (child.clone(), dir.join("pods"));
            teardown.add(format!("clip node in {}", dir.display()), move || {
                // A plugin that stops leaves its mounts dead (kubelet would unpublish
                // first): detach whatever is left under its pods directory.
                for target in crate::host::mounts_under(&pods) {
                    umount_lazy(&target);
                }
                stop_child(
                    &mut child.lock().unwrap_or_else(|p| p.into_inner()),
                    Duration::from_secs(10),
                );
            })
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !socket.exists() {
            if let Some(status) = child.lock().unwrap_or_else(|p| p.into_inner()).try_wait()? {
                bail!(
                    "clip node exited with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("clip node did not open {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Self {
            child,
            dir: dir.to_owned(),
            socket,
            log,
            metrics_port,
            _guard: guard,
        })
    }

    /// A CSI Node client on the plugin's socket, as kubelet connects.
    pub(crate) fn client(
        &self,
        rt: &tokio::runtime::Runtime,
    ) -> anyhow::Result<NodeClient<Channel>> {
        let channel = rt.block_on(clip_driver::csi::server::connect(&self.socket))?;
        Ok(NodeClient::new(channel))
    }

    /// The target path of pod `name`'s volume, under a volume directory that exists, as
    /// kubelet creates it (the plugin creates the target in it).
    pub(crate) fn pod_target(&self, name: &str) -> anyhow::Result<PathBuf> {
        let target = self
            .dir
            .join(format!("pods/{name}/volumes/kubernetes.io~csi/vol/mount"));
        std::fs::create_dir_all(target.parent().context("target parent")?)?;
        Ok(target)
    }

    fn metrics(&self) -> anyhow::Result<String> {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        let r = clip_e2e::http::request("GET", &url, &[], &[])?;
        if r.status != 200 {
            bail!("{url}: HTTP {}", r.status);
        }
        Ok(String::from_utf8_lossy(&r.body).into_owned())
    }

    /// Waits until the node's Redis writes stop growing (its background publish is done).
    fn wait_published(&self) -> anyhow::Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let (mut last, mut stable) = (u64::MAX, 0);
        while Instant::now() < deadline {
            let w = metric_sum(
                &self.metrics()?,
                "clip_tier_events_total",
                &["tier=\"redis\"", "event=\"write\""],
            );
            if w == last {
                stable += 1;
                if stable >= 3 {
                    return Ok(w);
                }
            } else {
                (last, stable) = (w, 0);
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(last)
    }

    /// How long the node's index build took, from its log.
    fn index_build(&self) -> Option<Duration> {
        let log = std::fs::read_to_string(&self.log).ok()?;
        let at = |message: &str| {
            log.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["fields"]["message"] == message)
                .and_then(|v| v["timestamp"].as_str().and_then(seconds_of_day))
        };
        let (start, end) = (at("indexing a directly referenced image")?, at("indexed")?);
        Some(Duration::from_secs_f64((end - start).rem_euclid(86_400.0)))
    }

    /// SIGTERM; fails if the plugin does not exit cleanly.
    pub(crate) fn stop(self) -> anyhow::Result<()> {
        let mut c = self.child.lock().unwrap_or_else(|p| p.into_inner());
        stop_child(&mut c, Duration::from_secs(10));
        let status = c.wait()?;
        if !status.success() {
            bail!("clip node exited with {status}");
        }
        Ok(())
    }
}

/// Seconds since midnight of an RFC 3339 UTC timestamp (`...T10:26:52.123456Z`).
fn seconds_of_day(ts: &str) -> Option<f64> {
    let time = ts.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Sum of the samples of metric `name` whose labels contain every one of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(key, _)| {
            key.split('{').next() == Some(name) && labels.iter().all(|want| key.contains(want))
        })
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum()
}

/// What kubelet sends for a pod's inline `csi:` volume with `volumeAttributes.image`.
pub(crate) fn publish_request(
    volume: &str,
    target: &Path,
    image: &str,
) -> NodePublishVolumeRequest {
    kubelet::ephemeral_volume(volume, target, "bench", volume, &[("image", image)])
}

/// Calls NodePublishVolume until it succeeds, retrying what kubelet retries with its
/// backoff; returns the number of calls.
pub(crate) async fn publish_like_kubelet(
    node: &mut NodeClient<Channel>,
    req: &NodePublishVolumeRequest,
) -> anyhow::Result<u32> {
    let mut wait = KUBELET_FIRST_RETRY;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match node.node_publish_volume(req.clone()).await {
            Ok(_) => return Ok(attempt),
            Err(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Aborted) => {
                eprintln!("  publish attempt {attempt}: {}", s.message());
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(KUBELET_MAX_RETRY);
            }
            Err(s) => bail!("NodePublishVolume: {s}"),
        }
    }
}

/// Opens `path` and reads `len` bytes from its start: a program's first read.
fn first_read(path: &Path, len: usize) -> anyhow::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match f.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// Everything one invocation shares.
struct Run {
    clip: PathBuf,
    link: Link,
    teardown: Arc<Teardown>,
    rt: tokio::runtime::Runtime,
    seeds: Vec<String>,
    work: PathBuf,
    file: String,
    first_read: usize,
    publish_wait: u64,
    warned: bool,
}

impl Run {
    fn link_bytes(&self) -> u64 {
        self.link
            .proxy()
            .stats()
            .down_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn drop_caches(&mut self) {
        drop_page_cache(&mut self.warned);
    }

    /// Full pull and extraction, then the first read of the file; returns its bytes too.
    fn full_pull(&mut self, reference: &str, run: usize) -> anyhow::Result<(Pull, Vec<u8>)> {
        let (root, pulled) = (self.work.join("root"), self.work.join("pull"));
        for d in [&root, &pulled] {
            if d.exists() {
                std::fs::remove_dir_all(d)?;
            }
        }
        self.drop_caches();
        let before = self.link_bytes();
        let t = Instant::now();
        let files = image::pull_layers(&self.link.registry_host(), reference, &pulled, 3)?;
        let download = t.elapsed();
        image::extract_layers(&files, &root)?;
        let extracted = t.elapsed();
        first_read(&root.join(&self.file), self.first_read)?;
        let first = t.elapsed();
        let whole = std::fs::read(root.join(&self.file))?;
        eprintln!("  run {run}: full pull + extraction + first read {first:.2?}");
        Ok((
            Pull {
                download,
                extract: extracted - download,
                first_read: first,
                link_bytes: self.link_bytes() - before,
            },
            whole,
        ))
    }

    /// A cold node publishes `image` and reads the file; `expected` is its content.
    fn cold_node(
        &mut self,
        name: &str,
        prefix: &str,
        image: &str,
        expected: &[u8],
    ) -> anyhow::Result<Publish> {
        let dir = self.work.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        let extra = [
            "--publish-wait".to_owned(),
            self.publish_wait.to_string(),
            "--redis".to_owned(),
            self.seeds.join(","),
            "--redis-prefix".to_owned(),
            prefix.to_owned(),
        ];
        let node = NodePlugin::start(&self.clip, &dir, &extra, &self.teardown)?;
        let mut client = node.client(&self.rt)?;
        let target = node.pod_target(name)?;
        let req = publish_request(name, &target, image);
        self.drop_caches();
        let before = self.link_bytes();
        let t = Instant::now();
        let attempts = self.rt.block_on(publish_like_kubelet(&mut client, &req))?;
        let published = t.elapsed();
        let path = target.join(&self.file);
        let got = first_read(&path, self.first_read)?;
        let first = t.elapsed();
        let whole = std::fs::read(&path)?;
        let whole_file = t.elapsed();
        if got[..] != expected[..got.len().min(expected.len())] || whole != expected {
            bail!(
                "{name}: the volume's {} differs from the pulled one",
                self.file
            );
        }
        let metrics = node.metrics()?;
        let result = Publish {
            attempts,
            published,
            first_read: first,
            whole_file,
            index_build: node.index_build(),
            link_bytes: self.link_bytes() - before,
            source_requests: metric_sum(&metrics, "clip_source_requests_total", &[]),
            from_redis: metric_sum(&metrics, "clip_tier_bytes_total", &["tier=\"redis\""]),
        };
        let unpublish = kubelet::unpublish(name, &target);
        // Node A's chunks reach Redis in the background: wait for them before unpublishing.
        node.wait_published()?;
        self.rt
            .block_on(client.node_unpublish_volume(unpublish))
            .context("NodeUnpublishVolume")?;
        node.stop()?;
        eprintln!(
            "  {name}: published after {published:.2?} ({attempts} calls), first read {first:.2?}"
        );
        Ok(result)
    }
}

impl PublishBench {
    pub fn run(self) -> anyhow::Result<()> {
        let clip = crate::host::root_and_clip("publish", self.clip.as_deref())?;
        require_tools(TOOLS)?;
        let dir = self.data_dir.join("mount");
        let numpy = image::numpy_image(&dir.join("numpy"))?;
        let teardown = Teardown::new();
        teardown.on_signals()?;
        let cluster = Arc::new(Mutex::new(clip_e2e::redis::RedisCluster::start()?));
        let _cluster_guard = {
            let cluster = cluster.clone();
            teardown.add("redis cluster", move || {
                cluster.lock().unwrap_or_else(|p| p.into_inner()).stop_all();
            })
        };
        let seeds = cluster.lock().unwrap_or_else(|p| p.into_inner()).seeds();
        let work = fresh_dir(&dir.join("run-publish"))?;
        let link = Link::up(
            self.profile,
            &dir.join("registry"),
            &work.join("registry.log"),
            &teardown,
        )?;
        let mut run = Run {
            clip,
            link,
            teardown: teardown.clone(),
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?,
            seeds,
            work,
            file: self.file.trim_start_matches('/').to_owned(),
            first_read: self.first_read.max(1),
            publish_wait: self.publish_wait,
            warned: false,
        };
        let result = measure(&mut run, &numpy, self.runs.max(1), self.profile);
        println!("load average at the end: {}", load_average());
        drop(run);
        teardown.run_all();
        result
    }
}

fn measure(
    run: &mut Run,
    numpy: &image::ImageFiles,
    runs: usize,
    profile: Profile,
) -> anyhow::Result<()> {
    let reference = numpy.push(&run.link.direct_host())?;
    let through = format!("{}/{reference}", run.link.registry_host());
    println!(
        "## image {}: {} gzip layers, {:.0} MB uncompressed, {:.0} MB compressed; registry link {} (tbf on a veth pair into a network namespace, delaying proxy); Redis Cluster 3+3 on loopback; load average {}",
        numpy.repo,
        numpy.layers.len(),
        mb(numpy.uncompressed()),
        mb(numpy.compressed()),
        profile.describe(),
        load_average()
    );
    let mut pull = Best::new();
    let mut empty = Best::new();
    let mut warm = Best::new();
    for r in 0..runs {
        let (p, content) = run.full_pull(&reference, r)?;
        pull.offer(p.first_read, p);
        // A fresh key prefix: Redis is empty for node A.
        let prefix = format!("publish{r}-{}", std::process::id());
        let a = run.cold_node(&format!("node-a{r}"), &prefix, &through, &content)?;
        empty.offer(a.first_read, a);
        let b = run.cold_node(&format!("node-b{r}"), &prefix, &through, &content)?;
        warm.offer(b.first_read, b);
    }
    let (pull_t, p) = pull.get()?;
    let (empty_t, a) = empty.get()?;
    let (warm_t, b) = warm.get()?;
    let size = std::fs::metadata(run.work.join("root").join(&run.file))?.len();
    println!(
        "\n## NodePublishVolume -> first successful read ({} KiB) of /{} ({:.1} MB), cold node: new `clip node` process, empty state and disk cache, page cache dropped (best of {runs})",
        run.first_read >> 10,
        run.file,
        mb(size)
    );
    println!(
        "{:<46} {:>10} {:>11} {:>12} {:>12} {:>12}",
        "", "first read", "x full pull", "publish OK", "whole file", "link MB"
    );
    let row = |name: &str, first: Duration, published: String, whole: String, link: u64| {
        println!(
            "{name:<46} {:>9.2}s {:>10.3}x {published:>12} {whole:>12} {:>12.1}",
            secs(first),
            secs(first) / secs(pull_t),
            mb(link)
        );
    };
    let s = |d: Duration| format!("{:.2}s", secs(d));
    row(
        "cold node, warm Redis (node B)",
        warm_t,
        s(b.published),
        s(b.whole_file),
        b.link_bytes,
    );
    row(
        "cold node, empty Redis (node A indexes)",
        empty_t,
        s(a.published),
        s(a.whole_file),
        a.link_bytes,
    );
    row(
        "full pull + extraction, then the read",
        pull_t,
        String::new(),
        String::new(),
        p.link_bytes,
    );
    println!(
        "node B: {} NodePublishVolume call(s), {:.1} MB from Redis, {} range requests to the registry, {:.1} KB over the link (manifest and config)",
        b.attempts,
        mb(b.from_redis),
        b.source_requests,
        b.link_bytes as f64 / 1e3
    );
    println!(
        "node A: {} NodePublishVolume calls (--publish-wait {}s, kubelet backoff from 500 ms); index build through the link {} (node log); publish to first read {:.2}s; {} range requests",
        a.attempts,
        run.publish_wait,
        a.index_build
            .map_or_else(|| "unknown".to_owned(), |d| format!("{:.2}s", secs(d))),
        secs(a.first_read.saturating_sub(a.published)),
        a.source_requests
    );
    println!(
        "full pull: download {:.2}s, extraction {:.2}s, first read {:.3}s",
        secs(p.download),
        secs(p.extract),
        secs(p.first_read.saturating_sub(p.download + p.extract))
    );
    println!(
        "ratios: full pull / warm Redis = {:.1}x; full pull / empty Redis = {:.2}x; empty Redis / warm Redis = {:.1}x",
        secs(pull_t) / secs(warm_t),
        secs(pull_t) / secs(empty_t),
        secs(empty_t) / secs(warm_t)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_by_name_and_labels() {
        let text = "# HELP x\nclip_tier_bytes_total{tier=\"redis\",index=\"a\"} 5\nclip_tier_bytes_total{tier=\"disk\",index=\"a\"} 7\nclip_tier_bytes_total{tier=\"redis\",index=\"b\"} 6\nclip_tier_bytes_totalx{tier=\"redis\"} 100\n";
        assert_eq!(
            metric_sum(text, "clip_tier_bytes_total", &["tier=\"redis\""]),
            11
        );
        assert_eq!(metric_sum(text, "clip_tier_bytes_total", &[]), 18);
    }

    #[test]
    fn log_timestamps_are_read_as_seconds_of_the_day() {
        assert_eq!(seconds_of_day("2026-11-21T10:26:52.5Z"), Some(37_612.5));
        assert_eq!(seconds_of_day("no time"), None);
    }
}
