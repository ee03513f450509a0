//! `clip-bench redis`: the shared Redis Cluster tier, against baselines from the same run.
//!
//! A 6-process Redis Cluster (3 masters, 3 replicas) runs on loopback, started the way the
//! e2e tests start it; the registry sits behind the emulated link of `clip-bench mount`.
//!
//! 1. `latency`: GETRANGE of 4 KiB, 64 KiB and 1 MiB of stored chunks, p50/p99, against a
//!    verified GET of the whole chunk (what the read path does) and a local file `pread`.
//! 2. `read`: `cat` of the 1 GiB file through `clip mount --redis` with an empty disk cache
//!    while Redis holds every chunk, against the same read from a warm disk cache and from
//!    the registry.
//! 3. `startup`: the numpy start-up command on node B (empty disk, warm Redis) against node A
//!    (empty disk, empty Redis, registry over the link) and a warm local disk cache.
//! 4. `nodes`: N in-process chunk stores (each its own Redis connection, no disk tier) read
//!    the same bytes at once; registry bytes as a multiple of what the bytes need and of
//!    one node alone.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use clip_index::{Content, Digest, ImageIndex};
use clip_storage::cache::redis::{RedisCache, RedisConfig};
use clip_storage::cache::{ChunkCache, ChunkKey};
use clip_storage::{ChunkStore, RegistryClient, RegistryConfig, StoreConfig};

use crate::host::require_tools;
use crate::image::{self, BIG_FILE, ImageFiles};
use crate::link::{Link, Profile};
use crate::mount::{Bench, Best, ClipMount, load_average, mb, mbps, run_in_root, secs, time_cat};
use crate::teardown::Teardown;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Part {
    /// GETRANGE latency (1a).
    Latency,
    /// Sequential 1 GiB read from Redis (1b).
    Read,
    /// Start-up command on a node with a warm Redis (1c).
    Startup,
    /// N simulated nodes starting together (1d).
    Nodes,
}

#[derive(Debug, Args)]
pub struct RedisBench {
    /// Link profile of the registry: default = 1 Gbit/s + 2 ms RTT, slow = + 20 ms RTT.
    #[arg(long, value_enum, default_value = "slow")]
    profile: Profile,
    /// Runs of each timed measurement; the fastest is reported.
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// Only this measurement (default: all).
    #[arg(long, value_enum)]
    only: Option<Part>,
    /// GETRANGE samples per size.
    #[arg(long, default_value_t = 1000)]
    samples: usize,
    /// Simulated node counts for `nodes`.
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    nodes: Vec<usize>,
    /// MiB of the 1 GiB file every simulated node reads.
    #[arg(long, default_value_t = 256)]
    shared_mib: u64,
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
    ("chroot", "coreutils"),
    ("redis-server", "redis-server"),
    ("redis-cli", "redis-tools"),
    ("/usr/bin/python3", "python3-numpy"),
];

/// A chunk as the default index cuts them: 1 MiB - 4 KiB.
const CHUNK: usize = (1 << 20) - 4096;

fn redis_config(seeds: &[String], prefix: &str) -> RedisConfig {
    RedisConfig {
        seeds: seeds.to_vec(),
        key_prefix: prefix.to_owned(),
        ..RedisConfig::default()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl RedisBench {
    pub fn run(self) -> anyhow::Result<()> {
        let clip = crate::host::root_and_clip("redis", self.clip.as_deref())?;
        require_tools(TOOLS)?;
        let want = |p: Part| self.only.is_none_or(|o| o == p);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let cluster = clip_e2e::redis::RedisCluster::start()?;
        let seeds = cluster.seeds();
        println!(
            "## Redis Cluster on loopback: 3 masters + 3 replicas ({}); load average {}",
            seeds.join(","),
            load_average()
        );
        if want(Part::Latency) {
            rt.block_on(latency(&seeds, self.samples.max(10), &self.data_dir))?;
        }
        if !(want(Part::Read) || want(Part::Startup) || want(Part::Nodes)) {
            return Ok(());
        }

        let dir = self.data_dir.join("mount");
        let numpy = want(Part::Startup)
            .then(|| image::numpy_image(&dir.join("numpy")))
            .transpose()?;
        let big = (want(Part::Read) || want(Part::Nodes))
            .then(|| image::bigfile_image(&dir.join("bigfile")))
            .transpose()?;
        let teardown = Teardown::new();
        teardown.on_signals()?;
        let work = crate::host::fresh_dir(&dir.join("run-redis"))?;
        let mnt = work.join("mnt");
        std::fs::create_dir_all(&mnt)?;
        let link = Link::up(
            self.profile,
            &dir.join("registry"),
            &work.join("registry.log"),
            &teardown,
        )?;
        println!(
            "## registry link: {} (tbf on a veth pair into a network namespace, delaying proxy)",
            self.profile.describe()
        );
        let mut bench = Bench {
            clip,
            link,
            teardown: teardown.clone(),
            work,
            mnt,
            runs: self.runs.max(1),
            threads: 1,
            reads_per_thread: 1,
            warned: false,
            mounts: 0,
            mount_args: Vec::new(),
        };
        let result = (|| {
            if let Some((image, local)) = &big
                && want(Part::Read)
            {
                let size = std::fs::metadata(local)?.len();
                read(&mut bench, image, size, &seeds)?;
            }
            if let Some(image) = &numpy {
                startup(&mut bench, image, &seeds)?;
            }
            if let Some((image, _)) = &big
                && want(Part::Nodes)
            {
                rt.block_on(nodes(&bench, image, &seeds, &self.nodes, self.shared_mib))?;
            }
            Ok::<_, anyhow::Error>(())
        })();
        println!("load average at the end: {}", load_average());
        drop(bench);
        teardown.run_all();
        drop(cluster);
        result
    }
}

/// (a) GETRANGE latency by size against a whole verified GET and a local pread.
async fn latency(seeds: &[String], samples: usize, data_dir: &Path) -> anyhow::Result<()> {
    let redis = RedisCache::connect(redis_config(seeds, "bench-lat")).await?;
    let mut keys = Vec::new();
    let mut all = Vec::new();
    for i in 0..16u64 {
        let data = clip_e2e::Rng(i + 1).bytes(CHUNK);
        let key = ChunkKey {
            digest: Digest::of(&data),
            len: CHUNK as u32,
        };
        redis.put(&key, Bytes::from(data.clone())).await?;
        all.extend_from_slice(&data);
        keys.push(key);
    }
    if redis
        .stats
        .writes
        .load(std::sync::atomic::Ordering::Relaxed)
        != 16
    {
        bail!("storing the test chunks in redis failed");
    }
    std::fs::create_dir_all(data_dir)?;
    let file = tempfile::NamedTempFile::new_in(data_dir)?;
    file.as_file().write_all_at(&all, 0)?;
    let f = file.as_file();
    let mut buf = vec![0u8; CHUNK];
    f.read_exact_at(&mut buf, 0)?; // page cache warm

    // Baseline: GET of the whole chunk, verified (sha256), as the read path does.
    let mut whole = Vec::with_capacity(samples);
    for s in 0..samples {
        let t = Instant::now();
        let got = redis.get(&keys[s % keys.len()]).await?;
        whole.push(t.elapsed());
        if got.is_none() {
            bail!("GET of a stored chunk missed");
        }
    }
    whole.sort();
    let base = percentile(&whole, 0.5);
    println!(
        "\n## GETRANGE latency, one request at a time ({samples} samples per size, 16 chunks of {CHUNK} B over the cluster's shards)"
    );
    println!(
        "{:<10} {:>13} {:>13} {:>15} {:>16} {:>16}",
        "size",
        "GETRANGE p50",
        "GETRANGE p99",
        "p50 x whole GET",
        "local pread p50",
        "local pread p99"
    );
    let mut rng = clip_e2e::Rng(7);
    for size in [4096usize, 64 << 10, CHUNK] {
        let mut remote = Vec::with_capacity(samples);
        let mut local = Vec::with_capacity(samples);
        for s in 0..samples {
            let i = s % keys.len();
            let off = if size >= CHUNK {
                0
            } else {
                rng.below((CHUNK - size) as u64) as usize
            };
            let t = Instant::now();
            let got = redis
                .get_range_unverified(&keys[i], off, off + size - 1)
                .await;
            remote.push(t.elapsed());
            if got.map(|v| v.len()) != Some(size) {
                bail!("GETRANGE of {size} bytes returned the wrong length");
            }
            let t = Instant::now();
            f.read_exact_at(&mut buf[..size], (i * CHUNK + off) as u64)?;
            local.push(t.elapsed());
        }
        remote.sort();
        local.sort();
        let label = if size >= CHUNK {
            "1 MiB".to_owned()
        } else {
            format!("{} KiB", size >> 10)
        };
        println!(
            "{label:<10} {:>10.3} ms {:>10.3} ms {:>14.2}x {:>13.4} ms {:>13.4} ms",
            ms(percentile(&remote, 0.5)),
            ms(percentile(&remote, 0.99)),
            ms(percentile(&remote, 0.5)) / ms(base),
            ms(percentile(&local, 0.5)),
            ms(percentile(&local, 0.99)),
        );
    }
    println!(
        "baseline, GET of the whole 1 MiB chunk + sha256 verify: p50 {:.3} ms, p99 {:.3} ms ({:.0} MB/s at p50)",
        ms(base),
        ms(percentile(&whole, 0.99)),
        CHUNK as f64 / 1e6 / base.as_secs_f64()
    );
    Ok(())
}

fn redis_args(seeds: &[String], prefix: &str) -> Vec<String> {
    vec![
        "--redis".into(),
        seeds.join(","),
        "--redis-prefix".into(),
        prefix.into(),
    ]
}

/// Waits until the mount's Redis writes stop growing (its background publish is done).
fn wait_published(m: &ClipMount) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = u64::MAX;
    let mut stable = 0;
    while Instant::now() < deadline {
        let w = m.metrics()?.redis_writes;
        if w == last {
            stable += 1;
            if stable >= 3 {
                return Ok(w);
            }
        } else {
            stable = 0;
            last = w;
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    Ok(last)
}

/// (b) Sequential read of the 1 GiB file: cold disk + warm Redis against a warm disk cache.
fn read(bench: &mut Bench, image: &ImageFiles, size: u64, seeds: &[String]) -> anyhow::Result<()> {
    let (_, index) = bench.index(image)?;
    let in_mount = bench.mnt.join(BIG_FILE);
    let mut from_registry = Best::new();
    let mut from_redis = Best::new();
    let mut warm = Best::new();
    for run in 0..bench.runs {
        bench.mount_args = redis_args(seeds, &format!("read{run}-{}", std::process::id()));
        let cache_a = bench.fresh_cache(&format!("read-a-{run}"))?;
        let cache_b = bench.fresh_cache(&format!("read-b-{run}"))?;

        // Node A: empty disk, empty Redis: the registry over the link; publishes to Redis.
        bench.drop_caches();
        let m = bench.mount(&index, &cache_a)?;
        let before = bench.link_bytes();
        let t = time_cat(&in_mount)?;
        let link = bench.link_bytes() - before;
        let written = wait_published(&m)?;
        m.stop()?;
        from_registry.offer(t, (link, written));

        // Node B: empty disk, Redis holds every chunk.
        bench.drop_caches();
        let m = bench.mount(&index, &cache_b)?;
        let before = bench.link_bytes();
        let t = time_cat(&in_mount)?;
        let link = bench.link_bytes() - before;
        let metrics = m.metrics()?;
        m.stop()?;
        from_redis.offer(t, (link, metrics));

        // Warm local disk: node A's cache, new process.
        bench.drop_caches();
        let m = bench.mount(&index, &cache_a)?;
        let t = time_cat(&in_mount)?;
        let metrics = m.metrics()?;
        m.stop()?;
        warm.offer(t, metrics);
        std::fs::remove_dir_all(&cache_a)?;
        std::fs::remove_dir_all(&cache_b)?;
    }
    bench.mount_args.clear();
    let (reg_t, (reg_link, reg_written)) = from_registry.get()?;
    let (redis_t, (redis_link, redis_m)) = from_redis.get()?;
    let (warm_t, warm_m) = warm.get()?;
    println!(
        "\n## sequential read of the 1 GiB file through `clip mount --redis`, cat > /dev/null (best of {}; page cache dropped before each)",
        bench.runs
    );
    println!("                                            MB/s   x warm disk");
    let row = |name: &str, d: Duration, note: String| {
        println!(
            "{name:<42} {:>6.0}   {:>6.2}x  {note}",
            mbps(size, d),
            secs(warm_t) / secs(d)
        );
    };
    row(
        "warm disk cache (new process)",
        warm_t,
        format!(
            "({:.0} MB from disk, {:.0} MB from memory)",
            mb(warm_m.from_disk),
            mb(warm_m.from_memory)
        ),
    );
    row(
        "cold disk, warm Redis (node B)",
        redis_t,
        format!(
            "({:.0} MB from Redis in {} hits, {:.1} MB over the registry link, {} source requests)",
            mb(redis_m.from_redis),
            redis_m.redis_hits,
            mb(redis_link),
            redis_m.source_requests
        ),
    );
    row(
        "cold disk, empty Redis (node A, registry)",
        reg_t,
        format!(
            "({:.0} MB over the link; {} chunks published to Redis)",
            mb(reg_link),
            reg_written
        ),
    );
    Ok(())
}

/// (c) The start-up command: node B (warm Redis, empty disk) against node A and warm disk.
fn startup(bench: &mut Bench, image: &ImageFiles, seeds: &[String]) -> anyhow::Result<()> {
    let (_, index) = bench.index(image)?;
    let cmd: Vec<String> = ["/usr/bin/python3", "-c", "import numpy"]
        .map(String::from)
        .to_vec();
    let mut node_a = Best::new();
    let mut node_b = Best::new();
    let mut warm = Best::new();
    for run in 0..bench.runs {
        bench.mount_args = redis_args(seeds, &format!("startup{run}-{}", std::process::id()));
        let cache_a = bench.fresh_cache(&format!("startup-a-{run}"))?;
        let cache_b = bench.fresh_cache(&format!("startup-b-{run}"))?;

        bench.drop_caches();
        let before = bench.link_bytes();
        let t = Instant::now();
        let m = bench.mount(&index, &cache_a)?;
        run_in_root(&bench.mnt, &cmd)?;
        let took = t.elapsed();
        let link = bench.link_bytes() - before;
        let written = wait_published(&m)?;
        m.stop()?;
        node_a.offer(took, (link, written));

        bench.drop_caches();
        let before = bench.link_bytes();
        let t = Instant::now();
        let m = bench.mount(&index, &cache_b)?;
        run_in_root(&bench.mnt, &cmd)?;
        let took = t.elapsed();
        let link = bench.link_bytes() - before;
        let metrics = m.metrics()?;
        m.stop()?;
        node_b.offer(took, (link, metrics));

        bench.drop_caches();
        let t = Instant::now();
        let m = bench.mount(&index, &cache_a)?;
        run_in_root(&bench.mnt, &cmd)?;
        let took = t.elapsed();
        m.stop()?;
        warm.offer(took, ());
        std::fs::remove_dir_all(&cache_a)?;
        std::fs::remove_dir_all(&cache_b)?;
    }
    bench.mount_args.clear();
    let (a_t, (a_link, a_written)) = node_a.get()?;
    let (b_t, (b_link, b_m)) = node_b.get()?;
    let (w_t, ()) = warm.get()?;
    println!(
        "\n## start-up with a shared Redis: chroot ROOT python3 -c 'import numpy', from starting `clip mount` to the command's end (best of {}; page cache dropped before each)",
        bench.runs
    );
    println!("                                            seconds   x warm local");
    let row = |name: &str, d: Duration, note: String| {
        println!(
            "{name:<42} {:>8.2}   {:>7.2}x  {note}",
            secs(d),
            secs(d) / secs(w_t)
        );
    };
    row("warm local disk cache (new process)", w_t, String::new());
    row(
        "node B: empty disk, warm Redis",
        b_t,
        format!(
            "({:.1} MB from Redis in {} hits, {} misses; {:.1} MB over the registry link, {} source requests)",
            mb(b_m.from_redis),
            b_m.redis_hits,
            b_m.redis_misses,
            mb(b_link),
            b_m.source_requests
        ),
    );
    row(
        "node A: empty disk, empty Redis",
        a_t,
        format!(
            "({:.1} MB over the link; {a_written} chunks published to Redis)",
            mb(a_link)
        ),
    );
    println!(
        "node B is {:.1}x faster than node A (goal >= 10x) and {:.2}x warm local (goal <= 2x)",
        secs(a_t) / secs(b_t),
        secs(b_t) / secs(w_t)
    );
    Ok(())
}

/// (d) N chunk stores, each with its own Redis connection and no disk, read the same bytes
/// at once; registry bytes against what those bytes need and against one node alone.
async fn nodes(
    bench: &Bench,
    image: &ImageFiles,
    seeds: &[String],
    counts: &[usize],
    shared_mib: u64,
) -> anyhow::Result<()> {
    let (_, index_file) = bench.index(image)?;
    let index = Arc::new(clip_index::decode(&std::fs::read(&index_file)?)?);
    let ino = index.resolve(format!("/{BIG_FILE}").as_bytes(), true)?;
    let node = index.node(ino).context("no node for the big file")?;
    let Content::File { layer, offset } = node.content else {
        bail!("{BIG_FILE} is not a file");
    };
    let layer = layer as usize;
    let len = (shared_mib << 20).min(node.size);
    let l = &index.layers[layer];
    let covering = l.chunks_covering(offset, len)?;
    let plan = l.plan(covering.clone()).compressed;
    let need = plan.end - plan.start;
    println!(
        "\n## {shared_mib} MiB of the 1 GiB file read sequentially (1 MiB reads) by N nodes at once: in-process chunk stores, each with its own Redis connection, no disk tier, 32 MiB memory (best of {} runs)",
        bench.runs
    );
    println!(
        "compressed bytes those {} chunks need from the registry: {:.1} MB",
        covering.len(),
        mb(need)
    );
    println!(
        "{:>4} {:>10} {:>12} {:>10} {:>10} {:>12}",
        "N", "seconds", "registry MB", "x need", "x 1 node", "requests"
    );
    let mut single: Option<u64> = None;
    let mut all = vec![1usize];
    all.extend(counts.iter().copied().filter(|&n| n > 1));
    for n in all {
        let mut best = Best::new();
        for run in 0..bench.runs {
            let prefix = format!("nodes{n}-{run}-{}", std::process::id());
            let before = bench.link_bytes();
            let (took, counted, requests, leases) =
                simulate(&index, seeds, &prefix, n, layer, offset, len).await?;
            let link = bench.link_bytes() - before;
            best.offer(took, (link, counted, requests, leases));
            // Let lease holders finish publishing before the next run.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let (took, (link, counted, requests, (taken, waits, wait_hits))) = best.get()?;
        let one = *single.get_or_insert(counted);
        println!(
            "{n:>4} {:>10.2} {:>12.1} {:>9.2}x {:>9.2}x {:>12}  (link carried {:.1} MB incl. headers; leases taken {taken}, waits {waits}, of which served from Redis {wait_hits})",
            secs(took),
            mb(counted),
            counted as f64 / need as f64,
            counted as f64 / one as f64,
            requests,
            mb(link),
        );
    }
    Ok(())
}

type SimResult = (Duration, u64, u64, (u64, u64, u64));

async fn simulate(
    index: &Arc<ImageIndex>,
    seeds: &[String],
    prefix: &str,
    n: usize,
    layer: usize,
    offset: u64,
    len: u64,
) -> anyhow::Result<SimResult> {
    let client = RegistryClient::new(RegistryConfig::default());
    let mut stores = Vec::new();
    let mut caches = Vec::new();
    for _ in 0..n {
        let redis = Arc::new(RedisCache::connect(redis_config(seeds, prefix)).await?);
        let source = client.repository(&index.source.repository, &index.source.manifest_digest)?;
        let tiers: Vec<Arc<dyn ChunkCache>> = vec![redis.clone()];
        stores.push(ChunkStore::new(
            index.clone(),
            Arc::new(source),
            tiers,
            Some(redis.clone()),
            StoreConfig::default(),
        ));
        caches.push(redis);
    }
    let t = Instant::now();
    let tasks: Vec<_> = stores
        .iter()
        .map(|s| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut pos = 0;
                while pos < len {
                    let n = (1u64 << 20).min(len - pos);
                    s.read(layer, offset + pos, n).await?;
                    pos += n;
                }
                Ok::<_, clip_storage::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let took = t.elapsed();
    use std::sync::atomic::Ordering::Relaxed;
    let counted = stores
        .iter()
        .map(|s| s.stats().source_bytes.load(Relaxed))
        .sum();
    let requests = stores
        .iter()
        .map(|s| s.stats().source_requests.load(Relaxed))
        .sum();
    let leases = caches.iter().fold((0, 0, 0), |(a, b, c), r| {
        (
            a + r.stats.leases_taken.load(Relaxed),
            b + r.stats.lease_waits.load(Relaxed),
            c + r.stats.lease_wait_hits.load(Relaxed),
        )
    });
    Ok((took, counted, requests, leases))
}
