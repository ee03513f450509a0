//! `clip index --publish` and `clip mount` with the Redis Cluster tier, as processes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clip_driver::fs::is_mounted;
use clip_e2e::cleanup::MountProcess;
use clip_e2e::fixtures;
use clip_e2e::image::{Pusher, build_image};
use clip_e2e::proxy::Proxy;
use clip_e2e::redis::RedisCluster;
use clip_e2e::registry::Registry;

fn clip() -> Command {
    Command::new(env!("CARGO_BIN_EXE_clip"))
}

fn mount(args: &[&str], dir: &Path) -> anyhow::Result<MountProcess> {
    let child = clip()
        .arg("mount")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut child = MountProcess {
        child,
        dir: dir.to_owned(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_mounted(dir) {
        if let Some(status) = child.try_wait()? {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err)?;
            anyhow::bail!("clip mount exited with {status}: {err}");
        }
        anyhow::ensure!(Instant::now() < deadline, "mount did not appear");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

fn stop(mut child: MountProcess) -> anyhow::Result<String> {
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait()?;
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err)?;
    anyhow::ensure!(status.success(), "{err}");
    Ok(err)
}

#[test]
fn an_index_published_to_redis_mounts_by_digest_on_another_node() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let proxy = Proxy::start(&registry.host())?;
    let cluster = RedisCluster::start()?;
    let seeds = cluster.seeds().join(",");
    let image = build_image(&fixtures::complex_layers(), "linux", "amd64")?;
    Pusher::new(&registry.host(), None).push_image("cli/redis", "v1", &image)?;
    let reference = format!("{}/cli/redis:v1", proxy.host());
    let work = tempfile::tempdir()?;
    let out = clip()
        .args(["index", &reference, "--publish", "--redis", &seeds, "-o"])
        .arg(work.path().join("idx"))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();
    let digest = summary
        .lines()
        .find_map(|l| l.trim().strip_prefix("published:"))
        .and_then(|l| l.split_whitespace().next())
        .expect("published digest")
        .to_owned();

    // Node A mounts by index digest and reads: chunks land in Redis.
    let dir_a = tempfile::tempdir()?;
    let cache_a = work.path().join("cache-a");
    let a = mount(
        &[
            &digest,
            dir_a.path().to_str().unwrap(),
            "--redis",
            &seeds,
            "--cache-dir",
            cache_a.to_str().unwrap(),
        ],
        dir_a.path(),
    )?;
    let passwd = std::fs::read(dir_a.path().join("etc/passwd"))?;
    let tool = std::fs::read(dir_a.path().join("usr/bin/tool-link"))?;
    std::thread::sleep(Duration::from_millis(500));
    stop(a)?;

    // Node B, registry blocked, reads the same files from Redis.
    proxy.set_refuse(true);
    proxy.clear_log();
    let dir_b = tempfile::tempdir()?;
    let cache_b = work.path().join("cache-b");
    let b = mount(
        &[
            &digest,
            dir_b.path().to_str().unwrap(),
            "--redis",
            &seeds,
            "--cache-dir",
            cache_b.to_str().unwrap(),
            "--stats",
        ],
        dir_b.path(),
    )?;
    assert_eq!(std::fs::read(dir_b.path().join("etc/passwd"))?, passwd);
    assert_eq!(std::fs::read(dir_b.path().join("usr/bin/tool-link"))?, tool);
    let stats = stop(b)?;
    assert!(
        proxy.log().is_empty(),
        "node B used the registry: {:?}",
        proxy.log()
    );
    assert!(stats.contains("redis hit:"), "{stats}");
    Ok(())
}

#[test]
fn an_unreachable_optional_redis_is_logged_and_the_mount_works() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let image = build_image(&fixtures::platform_layers("linux/amd64"), "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("cli/opt", "v1", &image)?;
    let work = tempfile::tempdir()?;
    let closed = format!("127.0.0.1:{}", clip_e2e::free_port()?);
    let cache = work.path().join("cache");
    let dir = tempfile::tempdir()?;

    // Required Redis that cannot be reached: a clear error at start.
    let out = clip()
        .args(["mount", &reference])
        .arg(dir.path())
        .args(["--redis", &closed, "--cache-dir", cache.to_str().unwrap()])
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("redis") && err.contains(&closed), "{err}");
    assert!(!is_mounted(dir.path()));

    // Optional: a warning, and the image is served from the registry.
    let child = mount(
        &[
            &reference,
            dir.path().to_str().unwrap(),
            "--redis",
            &closed,
            "--redis-optional",
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
        dir.path(),
    )?;
    assert_eq!(
        std::fs::read(dir.path().join("platform.txt"))?,
        b"built for linux/amd64\n"
    );
    let err = stop(child)?;
    assert!(err.contains("continuing without the shared cache"), "{err}");
    Ok(())
}
