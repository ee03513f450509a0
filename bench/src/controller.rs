//! `clip-bench controller`: the controller indexing a multi-layer image, its time, throughput
//! and memory, against baselines measured in the same run.
//!
//! The image is the four gzip layers `clip-bench index` splits its 1 GiB tar of this
//! machine's files into, pushed to a local registry; a Redis Cluster runs on loopback (both
//! started as the e2e tests start them). The controller runs in a child process (this binary
//! again, with a hidden flag) doing what `clip-controller` does for a new ClipImage: its
//! `reconcile` against a fake API server (the one the controller tests use), called again
//! whenever it asks to be, until the ClipImage is Ready. That resolves the image, builds the
//! index (every layer streamed from the registry, as many at once as there are cores),
//! publishes it to Redis and writes status. This process samples the child's VmRSS and VmHWM
//! from /proc while it works.
//!
//! Baselines, one after another in the same run: `gzip -dc` of the four layers one at a time
//! (the speed of plain decompression), and `clip index` of the same image through the same
//! registry with one layer at a time and with the default parallelism (the same indexer
//! without the controller around it).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use clip_api::{ClipImage, ClipImageSpec, Phase};
use clip_controller::{Context, reconcile};
use clip_e2e::kube_api::FakeApi;
use clip_e2e::redis::RedisCluster;
use clip_e2e::registry::Registry;
use clip_storage::RegistryConfig;
use clip_storage::cache::redis::{RedisCache, RedisConfig};

use crate::host::proc_status_bytes;
use crate::image::{ImageFiles, LayerFile};
use crate::mount::load_average;

/// How long the controller may take to make the ClipImage Ready (a loaded machine is slow).
const PATIENCE: Duration = Duration::from_secs(600);
/// How often the child's memory is sampled.
const SAMPLE: Duration = Duration::from_millis(5);

#[derive(Debug, Args)]
pub struct ControllerBench {
    /// Size of the tar `clip-bench index` made, MiB (names the layer files to read).
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Number of layers `clip-bench index` split it into.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Where `clip-bench index` keeps its data.
    #[arg(long, default_value = "target/bench-data")]
    data_dir: PathBuf,
    /// The clip binary of the baseline (default: beside this benchmark's binary).
    #[arg(long)]
    clip: Option<PathBuf>,
    /// Child mode: reconcile a ClipImage of this reference until Ready.
    #[arg(long, hide = true, requires = "child_redis")]
    child_image: Option<String>,
    /// Child mode: the Redis Cluster seed nodes.
    #[arg(long, hide = true, value_delimiter = ',')]
    child_redis: Vec<String>,
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

impl ControllerBench {
    pub fn run(self) -> anyhow::Result<()> {
        if let Some(image) = &self.child_image {
            return run_child(image, &self.child_redis);
        }
        let clip = crate::host::clip_binary(self.clip.as_deref())?;
        let image = self.image()?;
        let tar_bytes = image.uncompressed();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!(
            "image: {} gzip layers, {:.0} MB tar, {:.0} MB gzip; {cores} cores; load average {}",
            image.layers.len(),
            tar_bytes as f64 / 1e6,
            image.compressed() as f64 / 1e6,
            load_average()
        );

        let registry = Registry::start()?;
        let cluster = RedisCluster::start()?;
        let reference = format!("{}/{}", registry.host(), image.push(&registry.host())?);

        // 1. gzip -dc of every layer, one at a time.
        let mut gzip = Measured::default();
        for l in &image.layers {
            let m = measure(Command::new("gzip").arg("-dc").arg(&l.path))?;
            gzip.secs += m.secs;
            gzip.peak = gzip.peak.max(m.peak);
        }
        // 2. clip index of the image, one layer at a time and then as many as there are cores.
        let out = tempfile::tempdir()?;
        let index = |parallel: usize| {
            measure(
                Command::new(&clip)
                    .args([
                        "index",
                        &reference,
                        "--parallel",
                        &parallel.to_string(),
                        "-o",
                    ])
                    .arg(out.path().join("image.clipidx")),
            )
        };
        let sequential = index(1)?;
        let parallel = index(cores)?;
        // 3. The controller, until the ClipImage is Ready.
        let controller = measure_controller(&reference, &cluster.seeds())?;

        println!("\n## index build of {reference}");
        println!(
            "{:<44} {:>8} {:>10} {:>9} {:>10}",
            "", "seconds", "MB/s tar", "vs gzip", "peak RSS"
        );
        let row = |name: &str, secs: f64, peak: u64| {
            println!(
                "{name:<44} {secs:>8.2} {:>10.0} {:>8.2}x {:>6.1} MiB",
                mbps(tar_bytes, secs),
                gzip.secs / secs,
                mib(peak)
            );
        };
        row("gzip -dc, one layer at a time", gzip.secs, gzip.peak);
        row("clip index --parallel 1", sequential.secs, sequential.peak);
        row(
            &format!("clip index --parallel {cores}"),
            parallel.secs,
            parallel.peak,
        );
        row(
            "controller: index build (its metric)",
            controller.build_secs,
            controller.peak,
        );
        row(
            "controller: reconcile until Ready",
            controller.ready_secs,
            controller.peak,
        );
        println!(
            "\nlayers in parallel against one at a time (clip index): {:.2}x faster, {:.2}x the peak RSS",
            sequential.secs / parallel.secs,
            parallel.peak as f64 / sequential.peak as f64
        );
        println!(
            "controller against clip index --parallel {cores}: build {:.2}x the time, peak RSS {:.1} MiB = {:.2}x",
            controller.build_secs / parallel.secs,
            mib(controller.peak),
            controller.peak as f64 / parallel.peak as f64
        );
        println!(
            "controller RSS: {:.1} MiB idle (connected, before the ClipImage), {:.1} MiB at its peak, {:.1} MiB after Ready",
            mib(controller.idle),
            mib(controller.peak),
            mib(controller.after)
        );
        println!(
            "index: {} files, {} bytes published to Redis",
            controller.files, controller.index_size
        );
        Ok(())
    }

    /// The layers `clip-bench index` wrote, with their digests (kept beside them once known).
    fn image(&self) -> anyhow::Result<ImageFiles> {
        let mut layers = Vec::new();
        for i in 0..self.layers {
            let path = self.data_dir.join(format!(
                "part-{}m-{i}-of-{}.tar.gz",
                self.size_mib, self.layers
            ));
            if !path.is_file() {
                bail!(
                    "{} not found: run `clip-bench index --size-mib {} --layers {}` first, which writes the layers",
                    path.display(),
                    self.size_mib,
                    self.layers
                );
            }
            layers.push(layer_file(path)?);
        }
        crate::image::assemble("bench/layers", layers)
    }
}

/// A gzip layer file's digest, diff_id and sizes, computed once and kept in `PATH.json`.
fn layer_file(path: PathBuf) -> anyhow::Result<LayerFile> {
    let meta = path.with_extension("json");
    if let Ok(text) = std::fs::read_to_string(&meta)
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        && let (Some(digest), Some(diff_id), Some(size), Some(uncompressed)) = (
            v["digest"].as_str(),
            v["diff_id"].as_str(),
            v["size"].as_u64(),
            v["uncompressed"].as_u64(),
        )
        && std::fs::metadata(&path)?.len() == size
    {
        return Ok(LayerFile {
            digest: digest.to_owned(),
            diff_id: diff_id.to_owned(),
            size,
            uncompressed,
            entries: 0,
            path,
        });
    }
    eprintln!("hashing {}...", path.display());
    let digest = sha256_of(std::fs::File::open(&path)?)?;
    let mut tar = Counted(
        flate2::read::MultiGzDecoder::new(BufReader::with_capacity(
            1 << 20,
            std::fs::File::open(&path)?,
        )),
        0,
    );
    let diff_id = sha256_of(&mut tar)?;
    let layer = LayerFile {
        digest,
        diff_id,
        size: std::fs::metadata(&path)?.len(),
        uncompressed: tar.1,
        entries: 0,
        path,
    };
    std::fs::write(
        &meta,
        serde_json::to_vec_pretty(&serde_json::json!({
            "digest": layer.digest, "diff_id": layer.diff_id, "size": layer.size,
            "uncompressed": layer.uncompressed,
        }))?,
    )?;
    Ok(layer)
}

/// A reader that counts the bytes read through it.
struct Counted<R>(R, u64);

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1 += n as u64;
        Ok(n)
    }
}

fn sha256_of(mut r: impl Read) -> anyhow::Result<String> {
    let mut h = clip_index::digest::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finish().to_string());
        }
        h.update(&buf[..n]);
    }
}

/// Wall time and peak resident memory of one process.
#[derive(Debug, Default, Clone, Copy)]
struct Measured {
    secs: f64,
    peak: u64,
}

/// Runs `cmd` to the end, sampling its VmHWM (its stdout is discarded).
fn measure(cmd: &mut Command) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).ok();
        s
    });
    let mut peak = 0;
    loop {
        if let Some(b) = proc_status_bytes(child.id(), "VmHWM") {
            peak = u64::max(peak, b);
        }
        if let Some(status) = child.try_wait()? {
            let secs = started.elapsed().as_secs_f64();
            if !status.success() {
                bail!("{cmd:?} failed: {}", errors.join().unwrap_or_default());
            }
            return Ok(Measured { secs, peak });
        }
        std::thread::sleep(SAMPLE);
    }
}

/// What the controller child reports, and its memory as sampled from here.
#[derive(Debug)]
struct ControllerRun {
    /// The controller's own index build duration (permit to published).
    build_secs: f64,
    /// From the first reconcile to Ready.
    ready_secs: f64,
    idle: u64,
    peak: u64,
    after: u64,
    files: u64,
    index_size: u64,
}

/// Kills the child if the benchmark stops early.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.0.kill().ok();
        }
        self.0.wait().ok();
    }
}

/// Starts the controller child, waits until it is set up, lets it go and samples its memory
/// until it reports the ClipImage Ready.
fn measure_controller(reference: &str, seeds: &[String]) -> anyhow::Result<ControllerRun> {
    let mut child = ChildGuard(
        Command::new(std::env::current_exe()?)
            .args(["controller", "--child-image", reference, "--child-redis"])
            .arg(seeds.join(","))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?,
    );
    let pid = child.0.id();
    let stdout = child.0.stdout.take().context("stdout")?;
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_line = |timeout: Duration| -> anyhow::Result<String> {
        Ok(lines
            .recv_timeout(timeout)
            .context("the controller child stopped answering")??)
    };
    let ready = next_line(PATIENCE)?;
    anyhow::ensure!(ready == "ready", "unexpected line from the child: {ready}");
    let idle = proc_status_bytes(pid, "VmRSS").context("child RSS")?;
    let mut stdin: ChildStdin = child.0.stdin.take().context("stdin")?;
    writeln!(stdin, "go")?;
    let deadline = Instant::now() + PATIENCE;
    let mut peak = 0;
    let report = loop {
        if let Some(b) = proc_status_bytes(pid, "VmHWM") {
            peak = u64::max(peak, b);
        }
        match lines.recv_timeout(SAMPLE) {
            Ok(line) => break line?,
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(e) => bail!("no report from the controller child: {e}"),
        }
    };
    // The child waits for its stdin to close before exiting, so its memory can still be read.
    if let Some(b) = proc_status_bytes(pid, "VmHWM") {
        peak = u64::max(peak, b);
    }
    let after = proc_status_bytes(pid, "VmRSS").context("child RSS")?;
    drop(stdin);
    let status = child.0.wait()?;
    anyhow::ensure!(status.success(), "the controller child failed: {status}");
    let v: serde_json::Value = serde_json::from_str(
        report
            .strip_prefix("report ")
            .context("no report from the child")?,
    )?;
    let f = |k: &str| v[k].as_f64().with_context(|| format!("{k} in {report}"));
    Ok(ControllerRun {
        build_secs: f("build_seconds")?,
        ready_secs: f("ready_seconds")?,
        idle,
        peak,
        after,
        files: f("files")? as u64,
        index_size: f("index_size")? as u64,
    })
}

/// Child mode: the controller's reconcile of one ClipImage of `image`, from creation to
/// Ready, on a runtime like `clip-controller`'s (`#[tokio::main]`: one worker per core).
fn run_child(image: &str, seeds: &[String]) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let redis = Arc::new(
            RedisCache::connect(RedisConfig {
                seeds: seeds.to_vec(),
                ..RedisConfig::default()
            })
            .await?,
        );
        let api = FakeApi::start();
        // The controller's defaults: two builds at once, a resync every ten minutes.
        let ctx = Context::new(
            api.client.clone(),
            redis,
            RegistryConfig::default(),
            2,
            Duration::from_secs(600),
        );
        let mut ci = ClipImage::new(
            "bench",
            ClipImageSpec {
                image: image.to_owned(),
                pull_secrets: vec![],
                platform: None,
                warm: false,
            },
        );
        ci.metadata.namespace = Some("bench".into());
        ci.metadata.generation = Some(1);
        ci.metadata.uid = Some("uid-bench".into());
        api.put_object("bench", "bench", serde_json::to_value(&ci)?);
        let current = || -> anyhow::Result<ClipImage> {
            Ok(serde_json::from_value(
                api.object("bench", "bench").context("the ClipImage")?,
            )?)
        };

        println!("ready");
        let mut go = String::new();
        std::io::stdin().read_line(&mut go)?;
        let started = Instant::now();
        // The runtime would call again after the requeue the reconcile asks for (100 ms
        // while indexing); calling at once leaves that idle time out.
        let status = loop {
            reconcile(Arc::new(current()?), ctx.clone()).await?;
            let st = current()?.status.unwrap_or_default();
            match st.phase {
                Some(Phase::Ready) => break st,
                Some(Phase::Failed) => bail!("the ClipImage failed: {:?}", st.conditions),
                _ if started.elapsed() > PATIENCE => bail!("not Ready in {PATIENCE:?}"),
                _ => {}
            }
        };
        let ready_seconds = started.elapsed().as_secs_f64();
        let metrics = ctx.metrics.render();
        let build_seconds: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("clip_controller_index_build_seconds_sum "))
            .context("no build duration in the metrics")?
            .parse()?;
        println!(
            "report {}",
            serde_json::json!({
                "build_seconds": build_seconds,
                "ready_seconds": ready_seconds,
                "files": status.files,
                "index_size": status.index_size,
            })
        );
        std::io::stdout().flush()?;
        // Stay (with everything still allocated) until the parent has read our memory.
        let mut rest = String::new();
        std::io::stdin().read_to_string(&mut rest)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_streams_what_digest_of_hashes_at_once() {
        let data = vec![7u8; (3 << 20) + 5];
        assert_eq!(
            sha256_of(data.as_slice()).ok(),
            Some(clip_index::Digest::of(&data).to_string())
        );
    }

    #[test]
    fn layer_files_are_named_as_clip_bench_index_writes_them() {
        let b = ControllerBench {
            size_mib: 8,
            layers: 2,
            data_dir: PathBuf::from("/nonexistent"),
            clip: None,
            child_image: None,
            child_redis: vec![],
        };
        let e = b.image().map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/part-8m-0-of-2.tar.gz"), "{e}");
        assert!(
            e.contains("clip-bench index --size-mib 8 --layers 2"),
            "{e}"
        );
    }
}
