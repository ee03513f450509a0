//! A registry behind an emulated network link: Debian's `docker-registry` runs in a network
//! namespace of its own, reached over a veth pair whose two ends are shaped with `tc tbf`
//! (bandwidth), and a [`DelayProxy`] on 127.0.0.1 adds the round-trip time. Traffic goes only
//! to loopback and to that namespace; everything is removed again through [`Teardown`].

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::ValueEnum;

use crate::delay::DelayProxy;
use crate::host::stop_child;
use crate::teardown::{Guard, Teardown};

/// Link profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    /// 1 Gbit/s, 2 ms round trip: a registry in the same region.
    Default,
    /// 1 Gbit/s, 20 ms round trip: a registry a few hundred kilometres away.
    Slow,
}

impl Profile {
    pub fn rate_mbit(self) -> u64 {
        1000
    }

    /// Link rate in bytes per second.
    pub fn rate_bytes(self) -> u64 {
        self.rate_mbit() * 1_000_000 / 8
    }

    pub fn rtt(self) -> Duration {
        match self {
            Profile::Default => Duration::from_millis(2),
            Profile::Slow => Duration::from_millis(20),
        }
    }

    pub fn describe(self) -> String {
        format!(
            "{} Mbit/s, {} ms RTT",
            self.rate_mbit(),
            self.rtt().as_millis()
        )
    }
}

const NS_PREFIX: &str = "clip-bench-";
const REGISTRY_PORT: u16 = 5000;

/// A running registry behind the emulated link. Dropping it stops the proxy, the registry and
/// removes the namespace and veth pair.
#[derive(Debug)]
pub struct Link {
    proxy: DelayProxy,
    ns_addr: Ipv4Addr,
    registry_pid: u32,
    // Field order is teardown order: the registry goes before its namespace.
    _registry: Guard,
    _netns: Guard,
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("ip").args(args))
}

fn in_ns(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("ip").args(["netns", "exec", ns]).args(args))
}

/// Removes namespaces left by benchmark runs that were killed before they could clean up.
fn remove_stale_namespaces() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("removing the stale network namespace {name}");
        if let Ok(pids) = ip(&["netns", "pids", name]) {
            for p in pids.split_whitespace() {
                Command::new("kill").args(["-9", p]).status().ok();
            }
        }
        ip(&["netns", "del", name]).ok();
    }
}

/// A /30 in 10.203.0.0/16 that no interface on this machine uses yet.
fn free_subnet() -> anyhow::Result<(Ipv4Addr, Ipv4Addr)> {
    let used = ip(&["-4", "-o", "addr", "show"])?;
    let start = std::process::id() as usize;
    for i in 0..16384usize {
        let n = (start + i) % 16384;
        let (b, c) = ((n / 64) as u8, ((n % 64) * 4) as u8);
        let host = Ipv4Addr::new(10, 203, b, c + 1);
        let ns = Ipv4Addr::new(10, 203, b, c + 2);
        if !used.contains(&format!("10.203.{b}.{c}/"))
            && !used.contains(&format!("{host}/"))
            && !used.contains(&format!("{ns}/"))
        {
            return Ok((host, ns));
        }
    }
    bail!("no free /30 in 10.203.0.0/16")
}

impl Link {
    /// Creates the namespace and veth pair, shapes both ends, starts the registry (its data
    /// in `storage`, kept between runs) and the delaying proxy in front of it.
    pub fn up(
        profile: Profile,
        storage: &Path,
        log: &Path,
        teardown: &Arc<Teardown>,
    ) -> anyhow::Result<Self> {
        remove_stale_namespaces();
        let pid = std::process::id();
        let ns = format!("{NS_PREFIX}{pid}");
        let (host_veth, ns_veth) = (format!("cbh{pid}"), format!("cbn{pid}"));
        let (host_addr, ns_addr) = free_subnet()?;

        ip(&["netns", "add", &ns])?;
        let netns = {
            let (ns, host_veth) = (ns.clone(), host_veth.clone());
            teardown.add(format!("network namespace {ns}"), move || {
                if let Ok(pids) = ip(&["netns", "pids", &ns]) {
                    for p in pids.split_whitespace() {
                        Command::new("kill").args(["-9", p]).status().ok();
                    }
                }
                // Deleting a namespace removes its veth end, and so the pair, but the kernel
                // does it later; delete the host end now so nothing lingers.
                ip(&["link", "del", &host_veth]).ok();
                if let Err(e) = ip(&["netns", "del", &ns]) {
                    eprintln!("teardown: {e}");
                }
            })
        };
        ip(&[
            "link", "add", &host_veth, "type", "veth", "peer", "name", &ns_veth,
        ])?;
        ip(&["link", "set", &ns_veth, "netns", &ns])?;
        ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &host_veth])?;
        ip(&["link", "set", &host_veth, "up"])?;
        in_ns(
            &ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("{ns_addr}/30"),
                "dev",
                &ns_veth,
            ],
        )?;
        in_ns(&ns, &["ip", "link", "set", &ns_veth, "up"])?;
        in_ns(&ns, &["ip", "link", "set", "lo", "up"])?;
        // Shape both directions; the burst holds a few 64 KiB GSO segments.
        let rate = format!("{}mbit", profile.rate_mbit());
        let tbf = [
            "qdisc", "add", "dev", "DEV", "root", "tbf", "rate", &rate, "burst", "256kb",
            "latency", "50ms",
        ];
        let with_dev = |dev: &str| -> Vec<String> {
            tbf.iter()
                .map(|a| if *a == "DEV" { dev } else { a }.to_owned())
                .collect()
        };
        run(Command::new("tc").args(with_dev(&host_veth)))?;
        run(Command::new("ip")
            .args(["netns", "exec", &ns, "tc"])
            .args(with_dev(&ns_veth)))?;

        let (registry, registry_pid) = start_registry(&ns, ns_addr, storage, log, teardown)?;
        let upstream = SocketAddr::from((ns_addr, REGISTRY_PORT));
        let proxy = DelayProxy::start(upstream, profile.rtt(), profile.rate_bytes())?;
        Ok(Self {
            proxy,
            ns_addr,
            registry_pid,
            _registry: registry,
            _netns: netns,
        })
    }

    /// The registry through the emulated link (`127.0.0.1:PORT`): what clip talks to.
    pub fn registry_host(&self) -> String {
        self.proxy.host()
    }

    /// The registry without the added latency (shaped bandwidth only), for pushing.
    pub fn direct_host(&self) -> String {
        format!("{}:{REGISTRY_PORT}", self.ns_addr)
    }

    pub fn proxy(&self) -> &DelayProxy {
        &self.proxy
    }

    /// The registry process (for its CPU time).
    pub fn registry_pid(&self) -> u32 {
        self.registry_pid
    }
}

fn start_registry(
    ns: &str,
    addr: Ipv4Addr,
    storage: &Path,
    log: &Path,
    teardown: &Arc<Teardown>,
) -> anyhow::Result<(Guard, u32)> {
    std::fs::create_dir_all(storage)?;
    let storage = std::fs::canonicalize(storage)?;
    let dir = storage.parent().context("registry storage has no parent")?;
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}:{REGISTRY_PORT}\n",
            storage.display()
        ),
    )?;
    let log = std::fs::File::create(log)?;
    // `ip netns exec` execs the registry, so the child is the registry itself.
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "docker-registry", "serve"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting docker-registry (apt-get install docker-registry)")?;
    let pid = child.id();
    let child = Arc::new(Mutex::new(child));
    let guard = {
        let child = child.clone();
        teardown.add("registry", move || {
            let mut c = child.lock().unwrap_or_else(|p| p.into_inner());
            stop_child(&mut c, Duration::from_secs(2));
        })
    };
    let url = format!("http://{addr}:{REGISTRY_PORT}/v2/");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.lock().unwrap_or_else(|p| p.into_inner()).try_wait()? {
            bail!("docker-registry exited early: {status}");
        }
        if clip_e2e::http::request("GET", &url, &[], &[]).is_ok_and(|r| r.status == 200) {
            return Ok((guard, pid));
        }
        if Instant::now() > deadline {
            bail!("docker-registry at {addr} did not become ready");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
