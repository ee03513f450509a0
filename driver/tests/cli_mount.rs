//! `clip mount` and `clip umount` as processes: clean unmounts on signals, dead mounts
//! detached by `clip umount`, statistics and metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clip_driver::fs::is_mounted;
use clip_e2e::cleanup::MountProcess;
use clip_e2e::fixtures;
use clip_e2e::image::{Pusher, build_image};
use clip_e2e::registry::Registry;
use clip_e2e::wait;

fn clip() -> Command {
    Command::new(env!("CARGO_BIN_EXE_clip"))
}

/// `clip index REFERENCE -o OUT`.
fn index_to(reference: &str, out: &Path) -> anyhow::Result<()> {
    let done = clip().args(["index", reference, "-o"]).arg(out).output()?;
    anyhow::ensure!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    Ok(())
}

struct Fixture {
    _registry: Registry,
    /// The image's reference, and its index.
    reference: String,
    index_file: std::path::PathBuf,
    _work: tempfile::TempDir,
    cache: std::path::PathBuf,
}

fn fixture() -> anyhow::Result<Fixture> {
    let registry = Registry::start()?;
    let image = build_image(&fixtures::complex_layers(), "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("cli/mount", "v1", &image)?;
    let work = tempfile::tempdir()?;
    let index_file = work.path().join("image.clipidx");
    index_to(&reference, &index_file)?;
    let cache = work.path().join("cache");
    Ok(Fixture {
        _registry: registry,
        reference,
        index_file,
        cache,
        _work: work,
    })
}

fn spawn_mount(f: &Fixture, dir: &Path, extra: &[&str]) -> anyhow::Result<MountProcess> {
    spawn_mount_of(&f.index_file, &f.cache, dir, extra)
}

fn spawn_mount_of(
    index: &Path,
    cache: &Path,
    dir: &Path,
    extra: &[&str],
) -> anyhow::Result<MountProcess> {
    let child = mount_command(index, cache, dir).args(extra).spawn()?;
    let child = MountProcess {
        child,
        dir: dir.to_owned(),
    };
    // An index file is mounted before it is read: this waits until the filesystem serves
    // (a stat of an early mount waits for it, and fails if the mount is given up).
    wait::until("the mount to serve", Duration::from_secs(60), || {
        is_mounted(dir) && std::fs::metadata(dir).is_ok()
    })?;
    Ok(child)
}

/// `clip mount INDEX DIR --cache-dir CACHE`, its stderr piped.
fn mount_command(index: &Path, cache: &Path, dir: &Path) -> Command {
    let mut c = clip();
    c.arg("mount")
        .arg(index)
        .arg(dir)
        .arg("--cache-dir")
        .arg(cache)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

#[test]
fn sigterm_unmounts_cleanly_and_prints_statistics() -> anyhow::Result<()> {
    let f = fixture()?;
    let dir = tempfile::tempdir()?;
    let mut child = spawn_mount(&f, dir.path(), &["--stats"])?;
    let passwd = std::fs::read_to_string(dir.path().join("etc/passwd"))?;
    assert!(passwd.starts_with("root:x:0:0:root:/root:/bin/ash"));
    signal(&child, libc::SIGTERM);
    let status = child.wait()?;
    assert!(status.success(), "{status}");
    assert!(!is_mounted(dir.path()), "nothing stays mounted");
    let mut err = String::new();
    child.stderr.take().map(|mut s| s.read_to_string(&mut err));
    assert!(err.contains("mounted "), "{err}");
    // What each tier served: the file came from the registry, and every read was timed.
    let number = |prefix: &str| -> u64 {
        err.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split([' ', ',']).find(|w| !w.is_empty()))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix:?} in {err}"))
    };
    assert!(number("clip: source ") >= 1, "{err}");
    assert!(number("clip: source requests ") >= 1, "{err}");
    assert!(err.contains("read errors 0"), "{err}");
    assert!(number("clip: reads ") >= 1, "{err}");
    assert!(err.contains("mean latency "), "{err}");

    // Again on the same cache: the disk tier serves it, the registry is not asked.
    let child = spawn_mount(&f, dir.path(), &["--stats"])?;
    assert_eq!(
        std::fs::read_to_string(dir.path().join("etc/passwd"))?,
        passwd
    );
    let err = stop(child)?;
    // A tier's line: its chunks, then its bytes (such as `68 B` or `1.2 MiB`).
    let served = |tier: &str| -> (String, String) {
        let line = err
            .lines()
            .find_map(|l| l.strip_prefix(&format!("clip: {tier} ")))
            .unwrap_or_else(|| panic!("no {tier} line in {err}"));
        let mut words = line.split_whitespace();
        let chunks = words.next().unwrap_or_default().to_owned();
        (chunks, words.collect::<Vec<_>>().join(" "))
    };
    assert_ne!(served("disk").1, "0 B", "{err}");
    assert_eq!(
        served("source"),
        ("0".to_owned(), "0 B".to_owned()),
        "{err}"
    );
    assert!(err.contains("source requests 0,"), "{err}");
    Ok(())
}

#[test]
fn sigint_unmounts_and_clip_umount_ends_the_process() -> anyhow::Result<()> {
    let f = fixture()?;
    let dir = tempfile::tempdir()?;
    let mut child = spawn_mount(&f, dir.path(), &[])?;
    signal(&child, libc::SIGINT);
    assert!(child.wait()?.success());
    assert!(!is_mounted(dir.path()));

    // An unmount from outside ends the serving process too (the directory named relative
    // to the working directory).
    let mut child = spawn_mount(&f, dir.path(), &[])?;
    let out = clip()
        .current_dir(dir.path().parent().unwrap())
        .arg("umount")
        .arg(dir.path().file_name().unwrap())
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait()? {
            assert!(status.success());
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "clip mount did not exit after umount"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!is_mounted(dir.path()));
    Ok(())
}

/// Kills the `clip mount` serving `dir` (SIGKILL) and waits for it to die; panics if it
/// does not within 20 s, after aborting its connection (which lets it die, and the test
/// end, rather than wait for ever).
fn kill_and_see_it_die(child: &mut MountProcess, dir: &Path) {
    signal(child, libc::SIGKILL);
    let died = wait::until("clip mount to die", Duration::from_secs(20), || {
        child.try_wait().is_ok_and(|s| s.is_some())
    });
    if died.is_err() {
        clip_e2e::cleanup::abort_connection(dir);
        panic!("a killed clip mount did not die: one of its threads waited on its own mount");
    }
}

/// `clip umount DIR` of the dead mount at `dir`: it succeeds and nothing is mounted there
/// after.
fn umount_dead(dir: &Path) -> anyhow::Result<()> {
    let out = clip().arg("umount").arg(dir).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(!is_mounted(dir), "{} is still mounted", dir.display());
    Ok(())
}

#[test]
fn a_killed_mount_is_detached_by_clip_umount() -> anyhow::Result<()> {
    let f = fixture()?;
    let dir = tempfile::tempdir()?;
    let mut child = spawn_mount(&f, dir.path(), &[])?;
    // Killed at once, just as it starts serving: a server that asked its own mount
    // something then could never exit (its thread would wait for its own answer).
    kill_and_see_it_die(&mut child, dir.path());
    assert!(
        is_mounted(dir.path()),
        "a killed server leaves a dead mount"
    );
    let err = std::fs::metadata(dir.path().join("etc")).err();
    assert_eq!(err.and_then(|e| e.raw_os_error()), Some(libc::ENOTCONN));
    umount_dead(dir.path())?;
    assert!(
        std::fs::read_dir(dir.path())?.next().is_none(),
        "the directory is usable again"
    );
    let out = clip().arg("umount").arg(dir.path()).output()?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not mounted"));
    Ok(())
}

/// The processes whose parent is `pid` (any of its threads).
fn children_of(pid: u32) -> Vec<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Whether process `pid` is gone or dead (a zombie nobody waits for).
fn dead(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    })
}

#[test]
fn a_mount_killed_while_it_fills_its_caches_from_a_profile_dies() -> anyhow::Result<()> {
    let f = fixture()?;
    let work = tempfile::tempdir()?;
    let profile = work.path().join("start.profile");
    let args = ["--startup-profile", profile.to_str().unwrap()];
    // A start-up that looks for thousands of names that are not there (as an interpreter's
    // search path does), recorded for the next mount to look up ahead of its program.
    let dir = tempfile::tempdir()?;
    let child = spawn_mount(&f, dir.path(), &args)?;
    let names = 3000;
    for i in 0..names {
        assert!(std::fs::metadata(dir.path().join(format!("usr/bin/missing{i}.so"))).is_err());
    }
    stop(child)?;
    let text = std::fs::read_to_string(&profile)?;
    assert!(text.lines().count() > names, "{text}");

    // The next mount looks them up in helper processes; killed while they do, it dies.
    let mut child = spawn_mount(&f, dir.path(), &args)?;
    let pid = child.id();
    let mut helpers = Vec::new();
    wait::until("the prefill's helpers", Duration::from_secs(20), || {
        helpers = children_of(pid);
        !helpers.is_empty()
    })?;
    kill_and_see_it_die(&mut child, dir.path());
    // Its helpers go with it (their lookups end with the connection).
    wait::until("the helpers to die", Duration::from_secs(20), || {
        helpers.iter().all(|&h| dead(h))
    })?;
    umount_dead(dir.path())?;
    Ok(())
}

#[test]
fn metrics_show_bytes_served_per_tier() -> anyhow::Result<()> {
    let f = fixture()?;
    let dir = tempfile::tempdir()?;
    let port = clip_e2e::free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let mut child = spawn_mount(&f, dir.path(), &["--metrics-addr", &addr])?;
    std::fs::read(dir.path().join("usr/bin/ping"))?;
    // A fetch is timed when it is over: a moment after its reader got the chunk it needed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (r, body) = loop {
        let r = clip_e2e::http::request("GET", &format!("http://{addr}/metrics"), &[], &[])?;
        let body = String::from_utf8_lossy(&r.body).into_owned();
        let fetched = body.lines().any(|l| {
            l.starts_with("clip_tier_read_seconds_count{tier=\"source\"") && !l.ends_with(" 0")
        });
        if fetched || std::time::Instant::now() > deadline {
            break (r, body);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(r.status, 200);
    let source_bytes: u64 = body
        .lines()
        .find(|l| l.starts_with("clip_tier_bytes_total{tier=\"source\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(source_bytes > 0, "{body}");
    assert!(body.contains("clip_read_latency_seconds_count"), "{body}");
    // Per-tier latency: the disk was asked (and missed) and the registry answered.
    let count = |tier: &str| -> u64 {
        body.lines()
            .find(|l| l.starts_with(&format!("clip_tier_read_seconds_count{{tier=\"{tier}\"")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert!(count("disk") > 0 && count("source") > 0, "{body}");
    signal(&child, libc::SIGTERM);
    assert!(child.wait()?.success());
    Ok(())
}

#[test]
fn prefetch_fills_the_cache_so_the_image_reads_without_the_registry() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let proxy = clip_e2e::proxy::Proxy::start(&registry.host())?;
    let layers = fixtures::format_layers();
    let image = build_image(&layers, "linux", "amd64")?;
    Pusher::new(&registry.host(), None).push_image("cli/prefetch", "v1", &image)?;
    let work = tempfile::tempdir()?;
    let index_file = work.path().join("p.clipidx");
    let reference = format!("{}/cli/prefetch:v1", proxy.host());
    index_to(&reference, &index_file)?;
    let f = Fixture {
        _registry: registry,
        reference,
        index_file,
        cache: work.path().join("cache"),
        _work: work,
    };
    let compressed: u64 = image.layers.iter().map(|l| l.data.len() as u64).sum();
    proxy.clear_log();
    let dir = tempfile::tempdir()?;
    let mut child = spawn_mount(&f, dir.path(), &["--prefetch"])?;
    // Wait until the whole image has been fetched in the background, nothing read yet.
    // Every layer up to its last data byte (gzip trailers are never needed).
    let waited = wait::until("the prefetch", Duration::from_secs(30), || {
        proxy.blob_bytes() + 64 >= compressed
    });
    anyhow::ensure!(
        waited.is_ok(),
        "prefetch fetched {} of {compressed} bytes: {:?}",
        proxy.blob_bytes(),
        proxy.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    proxy.set_refuse(true);
    clip_e2e::check::assert_dir_matches(dir.path(), &clip_e2e::model::expected_tree(&layers))?;
    assert!(
        proxy.log().iter().all(|l| l.status != 503),
        "no read needed the registry"
    );
    signal(&child, libc::SIGTERM);
    assert!(child.wait()?.success());
    Ok(())
}

/// How many descriptors of /dev/fuse process `pid` holds.
fn fuse_descriptors(pid: u32) -> anyhow::Result<usize> {
    let mut n = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        if std::fs::read_link(fd?.path()).is_ok_and(|t| t == Path::new("/dev/fuse")) {
            n += 1;
        }
    }
    Ok(n)
}

#[test]
fn cache_size_and_threads_flags_take_effect() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    // About 10 MB of files, read whole through a 4 MiB cache.
    let layers = fixtures::format_layers();
    let image = build_image(&layers, "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("cli/flags", "v1", &image)?;
    let work = tempfile::tempdir()?;
    let index_file = work.path().join("flags.clipidx");
    index_to(&reference, &index_file)?;
    let cap = 4u64 << 20;
    let mut fuse_fds = Vec::new();
    for threads in ["2", "5"] {
        let cache = work.path().join(format!("cache-{threads}"));
        let dir = tempfile::tempdir()?;
        let child = spawn_mount_of(
            &index_file,
            &cache,
            dir.path(),
            &["--cache-size", "4MiB", "--threads", threads],
        )?;
        clip_e2e::check::assert_dir_matches(dir.path(), &clip_e2e::model::expected_tree(&layers))?;
        // Each worker thread reads its own clone of the FUSE connection (counted once the
        // mount serves for sure: the early mount's own descriptor is closed by then).
        fuse_fds.push(fuse_descriptors(child.id())?);
        // The disk cache: chunks, whole files, their records, files being written.
        let held = clip_e2e::check::bytes_under(&cache.join("chunks"));
        assert!(
            held > 0 && held <= cap,
            "--cache-size 4MiB: {held} bytes kept"
        );
        stop(child)?;
    }
    assert_eq!(
        fuse_fds[1] - fuse_fds[0],
        3,
        "/dev/fuse descriptors: {fuse_fds:?}"
    );
    Ok(())
}

/// Flips a byte of an index file's directory entries: in the head that the header's digest
/// seals, after the metadata, so the image's source still reads.
fn damage_entries(bytes: &mut [u8]) {
    let header = clip_index::format::HEADER_LEN;
    let meta = u64::from_le_bytes(bytes[header..header + 8].try_into().unwrap()) as usize;
    bytes[header + 8 + meta + 8 + 4] ^= 0xff;
}

/// Stops a mount with SIGTERM and returns what it printed.
fn stop(mut child: MountProcess) -> anyhow::Result<String> {
    signal(&child, libc::SIGTERM);
    anyhow::ensure!(child.wait()?.success(), "clip mount failed");
    let mut err = String::new();
    child.stderr.take().map(|mut s| s.read_to_string(&mut err));
    Ok(err)
}

#[test]
fn a_start_up_profile_recorded_by_one_mount_is_fetched_ahead_by_the_next() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let proxy = clip_e2e::proxy::Proxy::start(&registry.host())?;
    let files: Vec<Vec<u8>> = (0..8)
        .map(|i| clip_e2e::Rng(40 + i).bytes(3 << 20))
        .collect();
    let layers = vec![clip_e2e::image::Layer::gzip(
        files
            .iter()
            .enumerate()
            .map(|(i, d)| clip_e2e::image::Entry::file(&format!("f{i}"), d.clone()))
            .collect(),
    )];
    let image = build_image(&layers, "linux", "amd64")?;
    Pusher::new(&registry.host(), None).push_image("cli/profile", "v1", &image)?;
    let work = tempfile::tempdir()?;
    let index = work.path().join("p.clipidx");
    index_to(&format!("{}/cli/profile:v1", proxy.host()), &index)?;
    let profile = work.path().join("start.profile");
    let profile_arg = profile.to_str().unwrap();
    let dir = tempfile::tempdir()?;
    let head = |i: usize| -> anyhow::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; 4096];
        std::fs::File::open(dir.path().join(format!("f{i}")))?.read_exact_at(&mut buf, 1 << 20)?;
        anyhow::ensure!(buf[..] == files[i][1 << 20..(1 << 20) + 4096], "f{i}");
        Ok(())
    };
    // A start-up that reads a little of two files, far apart in the layer.
    let no_open_prefetch = ["--open-prefetch", "0", "--readahead-spans", "0"];
    let mut args = vec!["--startup-profile", profile_arg];
    args.extend(no_open_prefetch);
    let child = spawn_mount_of(&index, &work.path().join("cache-a"), dir.path(), &args)?;
    head(6)?;
    head(1)?;
    stop(child)?;
    let text = std::fs::read_to_string(&profile)?;
    // The chunks (for a cold start) and the reads of both files (for a warm one).
    assert!(text.starts_with("clip-startup-profile 3\n"), "{text}");
    assert!(
        text.lines()
            .skip(1)
            .filter(|l| l.ends_with(|c: char| c.is_ascii_digit()) && l.split(' ').count() == 2)
            .count()
            >= 2,
        "{text}"
    );
    assert!(
        text.lines().filter(|l| l.contains(" read ")).count() >= 2,
        "{text}"
    );

    // The next mount, on an empty cache: the spans those reads need are fetched before
    // anything is read, and the same start-up then needs no registry request of its own.
    wait::until("the proxy", Duration::from_secs(10), || {
        proxy.in_flight() == 0
    })?;
    proxy.clear_log();
    let child = spawn_mount_of(&index, &work.path().join("cache-b"), dir.path(), &args)?;
    // (Not counting the warm-up's one-byte reads.)
    wait::until("the profile's fetches", Duration::from_secs(30), || {
        proxy
            .blob_reads()
            .iter()
            .filter(|l| l.body_bytes > 1)
            .count()
            >= 2
    })?;
    std::thread::sleep(Duration::from_millis(500));
    wait::until("the proxy", Duration::from_secs(10), || {
        proxy.in_flight() == 0
    })?;
    let fetched = proxy.blob_reads().len();
    head(6)?;
    head(1)?;
    // (The proxy logs a request once its whole response has gone through.)
    std::thread::sleep(Duration::from_millis(300));
    wait::until("the proxy", Duration::from_secs(10), || {
        proxy.in_flight() == 0
    })?;
    assert_eq!(
        proxy.blob_reads().len(),
        fetched,
        "the reads found their chunks fetched: {:?}",
        proxy.log()
    );
    // A file the profile does not name is still read from the registry.
    head(3)?;
    wait::until(
        "a read of f3 from the registry",
        Duration::from_secs(10),
        || proxy.blob_reads().len() > fetched,
    )?;
    stop(child)?;
    let merged = std::fs::read_to_string(&profile)?;
    assert!(merged.lines().count() > text.lines().count(), "{merged}");

    // A damaged profile is reported and ignored: the mount serves the right bytes.
    std::fs::write(&profile, "clip-startup-profile 1\nsha256:zz 1\n")?;
    let child = spawn_mount_of(&index, &work.path().join("cache-c"), dir.path(), &args)?;
    head(5)?;
    let err = stop(child)?;
    assert!(
        err.contains("start-up profile not used") && err.contains("line 2"),
        "{err}"
    );
    Ok(())
}

#[test]
fn an_index_refused_after_the_early_mount_leaves_no_mount_behind() -> anyhow::Result<()> {
    let f = fixture()?;
    // The metadata is whole (the mount is made from it at once); the directory entries are
    // not.
    let mut bytes = std::fs::read(&f.index_file)?;
    damage_entries(&mut bytes);
    let bad = f._work.path().join("bad.clipidx");
    std::fs::write(&bad, &bytes)?;
    let dir = tempfile::tempdir()?;
    let out = mount_command(&bad, &f.cache, dir.path())
        .args(["--log", "info"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("mounted early"), "{err}");
    assert!(
        err.contains("corrupt clip index") && err.contains("digest"),
        "{err}"
    );
    assert!(!is_mounted(dir.path()), "nothing stays mounted");
    Ok(())
}

#[test]
fn an_index_inside_the_mount_directory_is_read_before_the_mount_covers_it() -> anyhow::Result<()> {
    let f = fixture()?;
    let dir = tempfile::tempdir()?;
    let inside = dir.path().join("image.clipidx");
    std::fs::copy(&f.index_file, &inside)?;
    let child = mount_command(&inside, &f.cache, dir.path()).spawn()?;
    let mut child = MountProcess {
        child,
        dir: dir.path().to_owned(),
    };
    wait::until("the mount", Duration::from_secs(30), || {
        is_mounted(dir.path())
    })?;
    // A mount made before its index is read would wait for itself: the read would hang.
    let (tx, rx) = std::sync::mpsc::channel();
    let passwd = dir.path().join("etc/passwd");
    std::thread::spawn(move || tx.send(std::fs::read_to_string(passwd)));
    let got = rx.recv_timeout(Duration::from_secs(30));
    if got.is_err() {
        child.kill()?;
    }
    let passwd = got.map_err(|_| anyhow::anyhow!("the mount never served"))??;
    assert!(passwd.starts_with("root:x:0:0:root:/root:/bin/ash"));
    signal(&child, libc::SIGTERM);
    assert!(child.wait()?.success());
    assert!(!is_mounted(dir.path()));
    Ok(())
}

#[test]
fn a_reference_is_indexed_once_and_its_kept_index_is_mounted_early_after() -> anyhow::Result<()> {
    let f = fixture()?;
    let layers = fixtures::complex_layers();
    let cache = &f.cache;
    let dir = tempfile::tempdir()?;
    let mount_ref = || -> anyhow::Result<String> {
        let child = spawn_mount_of(
            Path::new(&f.reference),
            cache,
            dir.path(),
            &["--log", "info"],
        )?;
        clip_e2e::check::assert_dir_matches(dir.path(), &clip_e2e::model::expected_tree(&layers))?;
        let err = stop(child)?;
        anyhow::ensure!(!is_mounted(dir.path()), "unmounted");
        Ok(err)
    };

    // First: indexed, and the index kept in the cache directory.
    let err = mount_ref()?;
    assert!(
        err.contains("indexing") && !err.contains("mounted early"),
        "{err}"
    );
    let kept: Vec<_> = std::fs::read_dir(cache.join("indexes"))?.collect::<Result<_, _>>()?;
    assert_eq!(kept.len(), 1, "{kept:?}");
    let kept = kept[0].path();

    // Then: the kept index, mounted before it is read.
    let err = mount_ref()?;
    assert!(
        err.contains("mounted early") && !err.contains("indexing"),
        "{err}"
    );

    // A kept index that turns out corrupt is built again, its early mount undone.
    let good = std::fs::read(&kept)?;
    let mut bytes = good.clone();
    damage_entries(&mut bytes);
    std::fs::write(&kept, &bytes)?;
    let err = mount_ref()?;
    assert!(
        err.contains("mounted early") && err.contains("indexing"),
        "{err}"
    );
    assert!(
        std::fs::read(&kept)? == good,
        "the kept index is whole again"
    );

    // So is one whose bulk alone (checkpoint windows, block digests: the file's last
    // byte) is damaged, with the tree intact: found before the mount serves, not by a
    // fetch failing with EIO; every file of the tree reads right from an empty chunk cache.
    let mut bytes = good.clone();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&kept, &bytes)?;
    std::fs::remove_dir_all(cache.join("chunks"))?;
    let err = mount_ref()?;
    assert!(
        err.contains("mounted early")
            && err.contains("bulk digest")
            && err.contains("kept index cannot be used; building it again")
            && err.contains("indexing"),
        "{err}"
    );
    assert!(
        std::fs::read(&kept)? == good,
        "the kept index is whole again"
    );
    Ok(())
}

#[test]
fn a_registry_that_goes_away_fails_only_uncached_reads_and_is_used_again_when_back()
-> anyhow::Result<()> {
    let mut registry = Registry::start()?;
    let warm = clip_e2e::text_bytes(3 << 20, 71);
    let cold = clip_e2e::Rng(72).bytes(24 << 20);
    let layers = vec![clip_e2e::image::Layer::gzip(vec![
        clip_e2e::image::Entry::file("warm", warm.clone()),
        clip_e2e::image::Entry::file("cold", cold.clone()),
    ])];
    let image = build_image(&layers, "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("cli/gone", "v1", &image)?;
    let work = tempfile::tempdir()?;
    let index = work.path().join("gone.clipidx");
    index_to(&reference, &index)?;
    let dir = tempfile::tempdir()?;
    // No read-ahead: only what is read is fetched.
    let args = ["--open-prefetch", "0", "--readahead-spans", "0"];
    let child = spawn_mount_of(&index, &work.path().join("cache"), dir.path(), &args)?;
    assert!(std::fs::read(dir.path().join("warm"))? == warm);

    // The registry process is gone (connections refused): the cached file reads, an
    // uncached range gets EIO, and the mount goes on serving.
    registry.stop();
    assert!(std::fs::read(dir.path().join("warm"))? == warm);
    let file = std::fs::File::open(dir.path().join("cold"))?;
    let mut buf = vec![0u8; 4096];
    let at = 20 << 20;
    let err = std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, at).err();
    assert_eq!(err.and_then(|e| e.raw_os_error()), Some(libc::EIO));
    assert!(is_mounted(dir.path()));

    // Back on the same port: the same read now gets the right bytes, as does the rest.
    registry.restart()?;
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, at)?;
    assert!(buf[..] == cold[at as usize..at as usize + 4096]);
    assert!(std::fs::read(dir.path().join("cold"))? == cold);
    drop(file);
    // The failed read was logged with the image, the file and the cause.
    let err = stop(child)?;
    assert!(
        err.lines().any(|l| l.contains("read failed")
            && l.contains("image=clip:127.0.0.1:")
            && l.contains("path=/cold ")
            && l.to_lowercase().contains("connect")),
        "{err}"
    );
    Ok(())
}

#[test]
fn an_index_whose_bulk_is_damaged_fails_only_the_reads_that_need_it() -> anyhow::Result<()> {
    let mut registry = Registry::start()?;
    let layers = fixtures::format_layers();
    let image = build_image(&layers, "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("cli/bulk", "v1", &image)?;
    let work = tempfile::tempdir()?;
    let good = work.path().join("good.clipidx");
    // Checkpoints every 64 KiB: reads inside a layer resume from one, with its window.
    let done = clip()
        .args(["index", &reference, "--checkpoint-span", "65536", "-o"])
        .arg(&good)
        .output()?;
    anyhow::ensure!(done.status.success(), "{done:?}");
    // The file's last byte is its bulk's (the last layer's last block digest): the head,
    // and with it the tree, is intact.
    let mut bytes = std::fs::read(&good)?;
    *bytes.last_mut().unwrap() ^= 1;
    let damaged = work.path().join("damaged.clipidx");
    std::fs::write(&damaged, &bytes)?;
    let expected = clip_e2e::model::expected_tree(&layers);

    let warm = work.path().join("warm");
    let good_dir = tempfile::tempdir()?;
    let good_mount = spawn_mount_of(&good, &warm, good_dir.path(), &[])?;
    clip_e2e::check::assert_dir_matches(good_dir.path(), &expected)?;

    // A fresh cache: the tree is all there; a read that resumes inside a layer needs the
    // bulk and gets EIO, the others read right, and the mount goes on serving.
    let bad_dir = tempfile::tempdir()?;
    let bad_mount = spawn_mount_of(&damaged, &work.path().join("fresh"), bad_dir.path(), &[])?;
    assert_eq!(
        clip_e2e::check::list(bad_dir.path())?,
        clip_e2e::check::list(good_dir.path())?
    );
    let (mut right, mut failed) = (0, Vec::new());
    for path in clip_e2e::check::list(good_dir.path())? {
        let want = good_dir.path().join(&path[1..]);
        if !std::fs::symlink_metadata(&want)?.is_file() {
            continue;
        }
        match std::fs::read(bad_dir.path().join(&path[1..])) {
            Ok(got) => {
                assert!(got == std::fs::read(&want)?, "{path}: the same bytes");
                right += 1;
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{path}: {e}");
                failed.push(path);
            }
        }
    }
    assert!(
        right > 0 && !failed.is_empty(),
        "{right} read, {failed:?} failed"
    );
    // Each failed read is logged with the image, the file and the cause.
    let err = stop(bad_mount)?;
    for path in &failed {
        assert!(
            err.lines().any(|l| l.contains("read failed")
                && l.contains("image=clip:127.0.0.1:")
                && l.contains(&format!("path={path} "))
                && l.contains("does not match its digest")),
            "{path}: {err}"
        );
    }

    // With the chunks on local disk, the damaged index serves every byte, the registry gone:
    // no read needs the bulk.
    stop(good_mount)?;
    registry.stop();
    let again = tempfile::tempdir()?;
    let mount = spawn_mount_of(&damaged, &warm, again.path(), &[])?;
    clip_e2e::check::assert_dir_matches(again.path(), &expected)?;
    stop(mount)?;
    Ok(())
}
