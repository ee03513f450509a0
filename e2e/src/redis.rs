//! A real Redis Cluster (Debian's redis-server in cluster mode) on loopback, started and
//! torn down by the tests; plus a plain Redis for "not a cluster" cases.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::free_port;

#[derive(Debug)]
struct Node {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// A running Redis Cluster; every process is stopped on drop.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<Node>,
    password: Option<String>,
    _dir: tempfile::TempDir,
}

fn spawn_server(
    port: u16,
    dir: &PathBuf,
    cluster: bool,
    password: Option<&str>,
) -> anyhow::Result<Child> {
    let mut cmd = Command::new("redis-server");
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ])
    .args([
        "--protected-mode",
        "no",
        "--daemonize",
        "no",
        "--logfile",
        "redis.log",
    ])
    .arg("--dir")
    .arg(dir);
    if cluster {
        cmd.args([
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "1500",
            // Fail over however long the replica has been apart from its master: the tests
            // kill masters of freshly created clusters.
            "--cluster-replica-validity-factor",
            "0",
        ]);
    }
    if let Some(p) = password {
        cmd.args(["--requirepass", p, "--masterauth", p]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.spawn()
        .context("starting redis-server (apt-get install redis-server)")
}

fn cli(port: u16, password: Option<&str>, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    if let Some(p) = password {
        cmd.args(["-a", p, "--no-auth-warning"]);
    }
    let out = cmd
        .args(args)
        .output()
        .context("running redis-cli (apt-get install redis-tools)")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_ping(port: u16, password: Option<&str>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if cli(port, password, &["ping"]).is_ok_and(|s| s.trim() == "PONG") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    bail!("redis-server on port {port} did not answer")
}

impl RedisCluster {
    /// Three masters and three replicas.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(3, 1, None)
    }

    /// A cluster that requires a password.
    pub fn start_with_password(password: &str) -> anyhow::Result<Self> {
        Self::start_with(3, 1, Some(password.to_owned()))
    }

    pub fn start_with(
        masters: usize,
        replicas: usize,
        password: Option<String>,
    ) -> anyhow::Result<Self> {
        let root = tempfile::tempdir()?;
        let mut nodes = Vec::new();
        for i in 0..masters * (1 + replicas) {
            let dir = root.path().join(format!("node{i}"));
            std::fs::create_dir_all(&dir)?;
            let port = free_port()?;
            let child = spawn_server(port, &dir, true, password.as_deref())?;
            nodes.push(Node {
                port,
                dir,
                child: Some(child),
            });
        }
        let cluster = Self {
            nodes,
            password,
            _dir: root,
        };
        for n in &cluster.nodes {
            wait_ping(n.port, cluster.password.as_deref())?;
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut cmd = Command::new("redis-cli");
        if let Some(p) = &cluster.password {
            cmd.args(["-a", p, "--no-auth-warning"]);
        }
        let out = cmd
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        cluster.wait_healthy()?;
        Ok(cluster)
    }

    /// Waits until every running node reports `cluster_state:ok`.
    pub fn wait_healthy(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let ok = self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                cli(n.port, self.password.as_deref(), &["cluster", "info"])
                    .is_ok_and(|s| s.contains("cluster_state:ok"))
            });
            if ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the Redis Cluster did not become healthy")
    }

    /// Seed addresses, `127.0.0.1:PORT`.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    /// Runs redis-cli in cluster mode (-c) against a live node.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let n = self
            .nodes
            .iter()
            .find(|n| n.child.is_some())
            .context("no live node")?;
        let mut full = vec!["-c"];
        full.extend_from_slice(args);
        cli(n.port, self.password.as_deref(), &full)
    }

    /// Ports of the current masters.
    pub fn masters(&self) -> anyhow::Result<Vec<u16>> {
        let nodes = self.cli(&["cluster", "nodes"])?;
        Ok(nodes
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter_map(|a| a.split('@').next()?.rsplit(':').next()?.parse().ok())
            .collect())
    }

    /// Kills (SIGKILL) the node on `port`; its replica takes over after the node timeout.
    pub fn kill(&mut self, port: u16) {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.port == port)
            && let Some(mut c) = n.child.take()
        {
            c.kill().ok();
            c.wait().ok();
        }
    }

    /// Stops every node (the cluster is gone).
    pub fn stop_all(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                c.kill().ok();
                c.wait().ok();
            }
        }
    }

    /// Starts every stopped node again on its port with its cluster config.
    pub fn restart_all(&mut self) -> anyhow::Result<()> {
        for n in &mut self.nodes {
            if n.child.is_none() {
                n.child = Some(spawn_server(
                    n.port,
                    &n.dir,
                    true,
                    self.password.as_deref(),
                )?);
            }
        }
        for n in &self.nodes {
            wait_ping(n.port, self.password.as_deref())?;
        }
        self.wait_healthy()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// A plain (non-cluster) Redis.
#[derive(Debug)]
pub struct PlainRedis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PlainRedis {
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let child = spawn_server(port, &dir.path().to_owned(), false, None)?;
        wait_ping(port, None)?;
        Ok(Self {
            child,
            port,
            _dir: dir,
        })
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for PlainRedis {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}
