//! Mounts survive a restart of the node plugin when a keeper (`clip keeper`) holds their
//! FUSE connections: a reader with a file open goes on reading, a read in flight while the
//! plugin dies is answered by the next one, and a keeper whose plugin never comes back
//! releases the mounts so that readers fail instead of waiting forever.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clip_driver::csi::kubelet;
use clip_driver::csi::proto::node_client::NodeClient;
use clip_driver::fs::{is_mounted, mounted_device};
use clip_e2e::fixtures;
use clip_e2e::image::{Entry, Pusher, build_image};
use clip_e2e::node::Process;
use clip_e2e::proxy::Proxy;
use clip_e2e::registry::Registry;
use clip_e2e::wait;
use tonic::transport::Channel;

const BIG: usize = 24 << 20;

struct DetachOnDrop(PathBuf);

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        clip_e2e::cleanup::detach(&self.0);
    }
}

fn nix_mkfifo(path: &Path) -> anyhow::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: c is a valid NUL-terminated path.
    anyhow::ensure!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o600) } == 0,
        "mkfifo failed"
    );
    Ok(())
}

/// Writes a line to the FIFO at `path` without waiting for its reader. The line stays
/// readable while the returned handle is open (a FIFO nobody holds drops its data).
fn signal_fifo(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::io::Write;
    let mut fifo = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    fifo.write_all(b"go\n")?;
    Ok(fifo)
}

fn clip() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_clip"))
}

fn keeper_socket(dir: &Path) -> PathBuf {
    dir.join("keeper.sock")
}

fn start_keeper(dir: &Path, hold_seconds: u64) -> anyhow::Result<Process> {
    let socket = keeper_socket(dir);
    let args = vec![
        "--log".into(),
        "info".into(),
        "keeper".into(),
        "--socket".into(),
        socket.clone().into(),
        "--hold-seconds".into(),
        hold_seconds.to_string().into(),
    ];
    Process::start(clip(), args, &socket)
}

fn start_node(dir: &Path) -> anyhow::Result<Process> {
    start_node_with(dir, &[])
}

fn start_node_with(dir: &Path, extra: &[&str]) -> anyhow::Result<Process> {
    let mut args = clip_e2e::node::node_args(dir, "n1");
    args.push("--keeper-socket".into());
    args.push(keeper_socket(dir).into());
    args.extend(extra.iter().map(Into::into));
    Process::start(clip(), args, &clip_e2e::node::socket(dir))
}

/// The value of metric `name` (summed over its series that contain `label`) on a
/// plugin's metrics endpoint.
fn metric(port: u16, name: &str, label: &str) -> anyhow::Result<u64> {
    let r = clip_e2e::http::request("GET", &format!("http://127.0.0.1:{port}/metrics"), &[], &[])?;
    Ok(String::from_utf8_lossy(&r.body)
        .lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum())
}

async fn client(dir: &Path) -> anyhow::Result<NodeClient<Channel>> {
    Ok(NodeClient::new(
        clip_driver::csi::server::connect(&clip_e2e::node::socket(dir)).await?,
    ))
}

/// The image: the big file of `fixtures::big_layers` and a second layer with another one.
fn layers() -> (Vec<clip_e2e::image::Layer>, Vec<u8>, Vec<u8>) {
    let mut layers = fixtures::big_layers(BIG);
    let other: Vec<u8> = (0..BIG as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    layers.push(clip_e2e::image::Layer::gzip(vec![Entry::file(
        "data/other.bin",
        other.clone(),
    )]));
    let big = match &layers[0].entries[0] {
        Entry::File { data, .. } => data.clone(),
        _ => unreachable!("big_layers starts with its big file"),
    };
    (layers, big, other)
}

/// The test image pushed to `host` as `handover/app:v1`: its reference and the bytes of its
/// two big files (`data/big.bin`, `data/other.bin`).
fn push_image(
    host: &str,
    credentials: Option<(&str, &str)>,
) -> anyhow::Result<(String, Vec<u8>, Vec<u8>)> {
    let (layers, big, other) = layers();
    let image = build_image(&layers, "linux", "amd64")?;
    let reference = Pusher::new(host, credentials).push_image("handover/app", "v1", &image)?;
    Ok((reference, big, other))
}

/// A test's work directory (kept when KEEP_TEST_DIR is set, to read the processes' logs)
/// and the volume's target in it, detached when the guard drops (before the directory).
fn work_dir() -> anyhow::Result<(tempfile::TempDir, PathBuf, DetachOnDrop)> {
    let dir = tempfile::Builder::new()
        .disable_cleanup(std::env::var_os("KEEP_TEST_DIR").is_some())
        .tempdir()?;
    let target = dir.path().join("pods/one/mount");
    let detach = DetachOnDrop(target.clone());
    Ok((dir, target, detach))
}

/// Waits up to `wait` for `child` to end; its exit status, or None if it still runs.
fn ended(child: &mut Child, wait: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A reader process, as a pod's program would be: `sh -c SCRIPT sh ARGS...`.
fn sh(script: &str, args: &[&Path]) -> anyhow::Result<Child> {
    Ok(Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?)
}

/// Waits until `child` has descriptor `fd` open (its program opened the file).
fn wait_open(child: &Child, fd: u32) -> anyhow::Result<()> {
    let link = format!("/proc/{}/fd/{fd}", child.id());
    wait::until(
        "the reader to open its file",
        Duration::from_secs(30),
        || std::fs::read_link(&link).is_ok(),
    )
}

/// `child` ended well within `wait`.
fn succeeded(child: &mut Child, wait: Duration, what: &str) {
    let status = ended(child, wait).unwrap_or_else(|| panic!("{what}: still waiting"));
    let mut err = String::new();
    if let Some(e) = child.stderr.as_mut() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "{what}: {status}: {err}");
}

async fn publish(node: &mut NodeClient<Channel>, target: &Path, image: &str) -> anyhow::Result<()> {
    node.node_publish_volume(kubelet::ephemeral_volume(
        "vol-1",
        target,
        "default",
        "pod-1",
        &[("image", image)],
    ))
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounts_survive_restarts_of_the_plugin() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let proxy = Proxy::start(&registry.host())?;
    let (reference, big, other) = push_image(&proxy.host(), None)?;
    let (dir, target, _detach) = work_dir()?;
    let _keeper = start_keeper(dir.path(), 60)?;

    let mut first = start_node(dir.path())?;
    publish(&mut client(dir.path()).await?, &target, &reference).await?;
    let device = mounted_device(&target).expect("mounted");

    // A pod's program opens the big file, reads its first MiB from the first plugin and
    // keeps the file open, then reads the rest when told (a FIFO).
    let out = dir.path().join("out");
    let go = dir.path().join("go");
    nix_mkfifo(&go)?;
    let mut reader = sh(
        r#"exec 3<"$1" && dd bs=1M count=1 iflag=fullblock status=none <&3 >"$2.head" && read x <"$3" && cat <&3 >"$2""#,
        &[&target.join("data/big.bin"), &out, &go],
    )?;
    wait::until("the first MiB to be read", Duration::from_secs(30), || {
        std::fs::metadata(out.with_extension("head")).map_or(0, |m| m.len()) >= 1 << 20
    })?;
    assert_eq!(std::fs::read(out.with_extension("head"))?, big[..1 << 20]);

    // The plugin is killed. The mount stays, and the rest of the read waits instead of
    // failing; so does a program that starts now.
    first.signal(libc::SIGKILL);
    assert!(is_mounted(&target));
    assert_eq!(mounted_device(&target), Some(device), "the same mount");
    let _go = signal_fifo(&go)?;
    let late_out = dir.path().join("late");
    let mut late = sh(
        r#"cat "$1" >"$2""#,
        &[&target.join("data/small-at-end.txt"), &late_out],
    )?;
    assert!(
        ended(&mut reader, Duration::from_millis(500)).is_none(),
        "a read while no plugin serves waits for the next one"
    );

    // The next plugin takes the live mount over: the open file reads on, to the last byte.
    let mut second = start_node(dir.path())?;
    succeeded(
        &mut reader,
        Duration::from_secs(60),
        "the open file's reader",
    );
    assert!(
        std::fs::read(&out)? == big[1 << 20..],
        "every byte after the hand-over is right"
    );
    succeeded(
        &mut late,
        Duration::from_secs(60),
        "the program that started meanwhile",
    );
    assert_eq!(std::fs::read(&late_out)?, b"the last file of the layer\n");
    assert_eq!(mounted_device(&target), Some(device), "never re-mounted");
    let listed = std::fs::read_dir(target.join("data"))?.count();
    assert_eq!(listed, 3, "new lookups are served too");
    let mut node = client(dir.path()).await?;
    let stats = node
        .node_get_volume_stats(kubelet::volume_stats("vol-1", &target))
        .await?
        .into_inner();
    let condition = stats.volume_condition.unwrap_or_default();
    assert!(!condition.abnormal, "{condition:?}");

    // A read in flight (its chunk held up at a slow registry) when the plugin is stopped
    // the way a rolling update stops it: the kernel sends it again to the next plugin.
    proxy.set_delay(Duration::from_secs(2));
    let tail_out = dir.path().join("tail");
    let mut tail = sh(
        &format!(
            r#"dd bs=256K skip={} count=1 iflag=skip_bytes,fullblock status=none <"$1" >"$2""#,
            BIG / 2
        ),
        &[&target.join("data/other.bin"), &tail_out],
    )?;
    wait::until(
        "the read to reach the registry",
        Duration::from_secs(20),
        || proxy.in_flight() > 0,
    )?;
    second.signal(libc::SIGTERM);
    assert!(
        is_mounted(&target),
        "a stopped plugin leaves its mounts to the keeper"
    );
    assert!(
        ended(&mut tail, Duration::ZERO).is_none(),
        "the read is still waiting"
    );
    let _third = start_node(dir.path())?;
    succeeded(&mut tail, Duration::from_secs(60), "the read in flight");
    assert!(std::fs::read(&tail_out)? == other[BIG / 2..BIG / 2 + (256 << 10)]);
    proxy.set_delay(Duration::ZERO);

    // Unpublishing a taken-over volume unmounts it for good.
    let mut node = client(dir.path()).await?;
    node.node_unpublish_volume(kubelet::unpublish("vol-1", &target))
        .await?;
    assert!(!is_mounted(&target));
    assert!(!target.exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_no_plugin_takes_over_fails_reads_after_the_hold_time() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let (reference, _, _) = push_image(&registry.host(), None)?;
    let (dir, target, _detach) = work_dir()?;
    let _keeper = start_keeper(dir.path(), 2)?;
    let mut node = start_node(dir.path())?;
    publish(&mut client(dir.path()).await?, &target, &reference).await?;
    // A program holds the file open across the plugin's death and reads it afterwards.
    let go = dir.path().join("go");
    nix_mkfifo(&go)?;
    let mut reader = sh(
        r#"exec 3<"$1" && read x <"$2" && cat <&3"#,
        &[&target.join("data/small-at-end.txt"), &go],
    )?;
    wait_open(&reader, 3)?;
    node.signal(libc::SIGKILL);
    let started = Instant::now();
    let _go = signal_fifo(&go)?;
    let status =
        ended(&mut reader, Duration::from_secs(30)).expect("the read ends once the keeper lets go");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the read waited for a plugin first"
    );
    let mut err = String::new();
    reader.stderr.take().unwrap().read_to_string(&mut err)?;
    assert!(!status.success(), "nobody serves the mount");
    assert!(
        err.contains("not connected") || err.contains("connection abort"),
        "{err}"
    );
    Ok(())
}

/// Waits until the file at `path` contains `text` `count` times.
fn wait_log(path: &Path, text: &str, count: usize) -> anyhow::Result<()> {
    let what = format!("{} to say {text:?}", path.display());
    wait::until(&what, Duration::from_secs(30), || {
        std::fs::read_to_string(path).map_or(0, |l| l.matches(text).count()) >= count
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_keeper_is_given_the_mounts_again() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let (reference, _, _) = push_image(&registry.host(), None)?;
    let (dir, target, _detach) = work_dir()?;
    let keeper_log = keeper_socket(dir.path()).with_extension("log");
    let mut keeper = start_keeper(dir.path(), 60)?;
    let mut node = start_node(dir.path())?;
    publish(&mut client(dir.path()).await?, &target, &reference).await?;
    wait_log(&keeper_log, "holding the mount", 1)?;

    // The keeper dies: the plugin goes on serving with its own descriptors.
    keeper.signal(libc::SIGKILL);
    let small = target.join("data/small-at-end.txt");
    assert_eq!(std::fs::read(&small)?, b"the last file of the layer\n");

    // A new keeper is given the mount again, so the plugin can still be replaced.
    let _keeper = start_keeper(dir.path(), 60)?;
    wait_log(&keeper_log, "holding the mount", 2)?;
    node.signal(libc::SIGKILL);
    let out = dir.path().join("out");
    let mut reader = sh(r#"cat "$1" >"$2""#, &[&small, &out])?;
    let _next = start_node(dir.path())?;
    succeeded(
        &mut reader,
        Duration::from_secs(60),
        "the reader after the hand-over",
    );
    assert_eq!(std::fs::read(&out)?, b"the last file of the layer\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_starts_before_its_keeper_waits_for_it() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let (reference, _, _) = push_image(&registry.host(), None)?;
    let (dir, target, _detach) = work_dir()?;
    let small = target.join("data/small-at-end.txt");
    let mut keeper = start_keeper(dir.path(), 60)?;
    let mut node = start_node(dir.path())?;
    publish(&mut client(dir.path()).await?, &target, &reference).await?;

    // Keeper and plugin both die: the mount is dead.
    keeper.signal(libc::SIGKILL);
    node.signal(libc::SIGKILL);
    let dead = clip_driver::fs::mount_responds(&target)
        .err()
        .and_then(|e| e.raw_os_error());
    assert_eq!(dead, Some(libc::ENOTCONN));

    // A plugin that cannot reach its keeper leaves mounted targets alone (the keeper may hold
    // them); once the keeper answers without them, they are mounted again.
    let csi_log = clip_e2e::node::socket(dir.path()).with_extension("log");
    let _node = start_node(dir.path())?;
    wait_log(
        &csi_log,
        "the keeper is not reachable yet and may hold this mount",
        1,
    )?;
    let _keeper = start_keeper(dir.path(), 60)?;
    wait_log(&csi_log, "re-served after restart", 1)?;
    assert_eq!(std::fs::read(&small)?, b"the last file of the layer\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_image_reads_on_after_the_hand_over() -> anyhow::Result<()> {
    let registry = Registry::start_with_auth("kube", "letmein")?;
    let (reference, big, _) = push_image(&registry.host(), registry.credentials())?;
    let (dir, target, _detach) = work_dir()?;
    let _keeper = start_keeper(dir.path(), 60)?;
    let mut node = start_node(dir.path())?;
    let mut req = kubelet::ephemeral_volume(
        "vol-1",
        &target,
        "default",
        "pod-1",
        &[("image", &reference)],
    );
    req.secrets.insert(
        ".dockerconfigjson".into(),
        format!(
            r#"{{"auths":{{"{}":{{"username":"kube","password":"letmein"}}}}}}"#,
            registry.host()
        ),
    );
    client(dir.path()).await?.node_publish_volume(req).await?;
    assert_eq!(
        std::fs::read(target.join("data/small-at-end.txt"))?,
        b"the last file of the layer\n"
    );

    // After the hand-over, chunks nobody has fetched yet still come from the registry,
    // with the pod's pull secret the keeper held for the volume.
    node.signal(libc::SIGKILL);
    let _next = start_node(dir.path())?;
    let out = dir.path().join("middle");
    let mut reader = sh(
        &format!(
            r#"dd bs=1M skip={} count=2 iflag=skip_bytes,fullblock status=none <"$1" >"$2""#,
            BIG / 2
        ),
        &[&target.join("data/big.bin"), &out],
    )?;
    succeeded(
        &mut reader,
        Duration::from_secs(60),
        "the read of uncached chunks",
    );
    assert!(std::fs::read(&out)? == big[BIG / 2..BIG / 2 + (2 << 20)]);
    Ok(())
}

/// Files the kernel reads itself (FUSE passthrough of a whole copy on local disk) under
/// the first plugin stay right after a hand-over: open ones read on, and new opens of them
/// (and of files open the usual way) succeed, though the next plugin knows nothing of
/// what the first one had open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_read_by_the_kernel_itself_survive_a_hand_over() -> anyhow::Result<()> {
    if !clip_driver::fs::kernel_resends() {
        return Ok(()); // passthrough and FUSE_NOTIFY_RESEND: Linux 6.9
    }
    let registry = Registry::start()?;
    let (reference, big, other) = push_image(&registry.host(), None)?;
    let (dir, target, _detach) = work_dir()?;
    let _keeper = start_keeper(dir.path(), 60)?;
    let port = clip_e2e::free_port()?;
    let metrics_addr = format!("127.0.0.1:{port}");
    let with_metrics = ["--metrics-addr", metrics_addr.as_str()];
    let mut first = start_node_with(dir.path(), &with_metrics)?;
    publish(&mut client(dir.path()).await?, &target, &reference).await?;

    // Read once through clip, big.bin is then kept whole; the next open hands it to the
    // kernel, and a reader keeps that open. other.bin is held open the usual way.
    assert!(std::fs::read(target.join("data/big.bin"))? == big);
    wait::until("big.bin to be kept whole", Duration::from_secs(30), || {
        metric(port, "clip_tier_events_total", "whole_files_kept").unwrap_or(0) >= 1
    })?;
    let out = dir.path().join("out");
    let other_out = dir.path().join("other-out");
    let go = dir.path().join("go");
    nix_mkfifo(&go)?;
    let mut reader = sh(
        r#"exec 3<"$1" 4<"$2" && dd bs=1M count=1 iflag=fullblock status=none <&3 >"$3.head" && read x <"$5" && cat <&3 >"$3" && cat <&4 >"$4""#,
        &[
            &target.join("data/big.bin"),
            &target.join("data/other.bin"),
            &out,
            &other_out,
            &go,
        ],
    )?;
    wait::until("the first MiB to be read", Duration::from_secs(30), || {
        std::fs::metadata(out.with_extension("head")).map_or(0, |m| m.len()) >= 1 << 20
    })?;
    wait_open(&reader, 4)?;
    assert!(
        metric(port, "clip_whole_files_opened_total", "")? >= 1,
        "big.bin was handed to the kernel"
    );

    // The plugin is killed and the next one takes the mount over. New opens of both files
    // while the old ones are still open get the right bytes (a backing file of its own
    // for big.bin, or none for other.bin, would make the kernel fail them with EIO).
    first.signal(libc::SIGKILL);
    let _second = start_node(dir.path())?;
    for _ in 0..2 {
        assert!(std::fs::read(target.join("data/big.bin"))? == big);
        assert!(std::fs::read(target.join("data/other.bin"))? == other);
    }
    let _go = signal_fifo(&go)?;
    succeeded(
        &mut reader,
        Duration::from_secs(60),
        "the held files' reader",
    );
    assert!(std::fs::read(&out)? == big[1 << 20..]);
    assert!(std::fs::read(&other_out)? == other);
    // And once they are closed.
    assert!(std::fs::read(target.join("data/big.bin"))? == big);
    let mut node = client(dir.path()).await?;
    node.node_unpublish_volume(kubelet::unpublish("vol-1", &target))
        .await?;
    assert!(!is_mounted(&target));
    Ok(())
}
