//! What the mount benchmark asks of this machine: the page cache, the mount table, the
//! memory of a running process, the tools it runs.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::bail;

/// Writes dirty pages back and drops the page cache, dentries and inodes. False (with a
/// warning, once) where this process may not.
pub fn drop_page_cache(warned: &mut bool) -> bool {
    // SAFETY: sync(2) has no arguments and cannot fail.
    unsafe { libc::sync() };
    match std::fs::write("/proc/sys/vm/drop_caches", "3") {
        Ok(()) => true,
        Err(e) => {
            if !*warned {
                eprintln!("warning: cannot drop the page cache ({e}); cold figures are warm");
                *warned = true;
            }
            false
        }
    }
}

/// Whether something is mounted exactly at `dir`.
pub fn is_mounted(dir: &Path) -> bool {
    let canon = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let want = canon.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|s| {
        s.lines()
            .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
    })
}

/// Polls the mount table every millisecond until `dir` is mounted; `alive` says whether the
/// process serving it is still there.
pub fn wait_mounted(
    dir: &Path,
    timeout: Duration,
    mut alive: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !is_mounted(dir) {
        if !alive() {
            bail!(
                "the filesystem process exited before mounting {}",
                dir.display()
            );
        }
        if Instant::now() > deadline {
            bail!("{} was not mounted within {timeout:?}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Detaches whatever is mounted at `dir`, if anything.
pub fn umount_lazy(dir: &Path) {
    if is_mounted(dir) {
        Command::new("umount")
            .arg("-l")
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .ok();
    }
}

/// A `kB` field of `/proc/PID/status` (VmHWM: peak resident set; VmRSS: current), in bytes.
///
/// Read from the running process: `wait4`'s `ru_maxrss` would also count the parent's
/// memory that a vfork-style spawn shares.
pub fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// User plus system CPU time a process has used so far, in seconds (all its threads).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Some(ticks as f64 / hz as f64)
}

/// Fails with the Debian packages to install when a tool is missing.
pub fn require_tools(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for (tool, package) in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found && !missing.contains(package) {
            missing.push(*package);
        }
    }
    if !missing.is_empty() {
        bail!("missing tools: apt-get install {}", missing.join(" "));
    }
    Ok(())
}

/// SIGTERM, then SIGKILL after `grace`. Does nothing once the child has been reaped (its pid
/// may belong to another process by then).
pub fn stop_child(child: &mut Child, grace: Duration) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    // SAFETY: signalling our own child, which has not been reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().ok();
    child.wait().ok();
}

/// Checks the benchmark runs as root and finds the `clip` binary to measure (by default the
/// one built beside this benchmark).
pub fn root_and_clip(
    bench: &str,
    clip: Option<&std::path::Path>,
) -> anyhow::Result<std::path::PathBuf> {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("clip-bench {bench} needs root (network namespaces, tc, chroot, FUSE)");
    }
    clip_binary(clip)
}

/// The clip binary to measure: `clip` if given, else the one beside this benchmark's binary.
pub fn clip_path(clip: Option<&std::path::Path>) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context as _;
    Ok(match clip {
        Some(p) => p.to_owned(),
        None => std::env::current_exe()?
            .parent()
            .context("exe dir")?
            .join("clip"),
    })
}

/// [`clip_path`], which must exist.
pub fn clip_binary(clip: Option<&std::path::Path>) -> anyhow::Result<std::path::PathBuf> {
    let clip = clip_path(clip)?;
    if !clip.is_file() {
        anyhow::bail!(
            "{} not found: cargo build --release -p clip-driver",
            clip.display()
        );
    }
    Ok(clip)
}

/// Mount points below `dir`.
pub fn mounts_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let prefix = format!("{}/", dir.display());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .map(std::path::PathBuf::from)
        .collect()
}

/// An empty directory `work` for one run (whatever an earlier run left there, mounts
/// included, is removed), canonicalised.
pub fn fresh_dir(work: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context as _;
    if work.exists() {
        for m in mounts_under(work) {
            umount_lazy(&m);
        }
        std::fs::remove_dir_all(work).with_context(|| format!("removing {}", work.display()))?;
    }
    std::fs::create_dir_all(work)?;
    Ok(std::fs::canonicalize(work)?)
}
