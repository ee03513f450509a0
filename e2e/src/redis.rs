//! A real Redis Cluster (Debian's redis-server in cluster mode) on loopback, started and
//! torn down by the tests; plus a plain Redis for "not a cluster" cases.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::free_port;

/// How long a redis-server may take to answer once started (a loaded machine is slow).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Ports tried for one server whose port was taken before it could bind it.
const PORT_ATTEMPTS: usize = 10;
/// redis-server in cluster mode also binds this much above its port (the cluster bus).
const BUS_OFFSET: u16 = 10000;

#[derive(Debug)]
struct Node {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

impl Node {
    /// Starts redis-server in `dir` (created) on a free port; see [`Node::wait_started`].
    fn spawn(dir: PathBuf, cluster: bool, password: Option<&str>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let port = server_port(cluster)?;
        let child = spawn_server(port, &dir, cluster, password)?;
        Ok(Self {
            port,
            dir,
            child: Some(child),
        })
    }

    /// Waits until the server answers. A port is only free when [`server_port`] looks, so
    /// another process can take it (or a cluster node's bus port) before redis-server binds
    /// it; the server then exits, and this starts it again, afresh, on another port.
    fn wait_started(&mut self, cluster: bool, password: Option<&str>) -> anyhow::Result<()> {
        for attempt in 1.. {
            let child = self.child.as_mut().context("the node is stopped")?;
            match wait_started(child, self.port, password)? {
                Started::Answering => break,
                Started::Exited(status) if attempt == PORT_ATTEMPTS => {
                    let log =
                        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
                    bail!("redis-server exited ({status}) on {attempt} ports in a row:\n{log}");
                }
                Started::Exited(_) => {
                    std::fs::remove_dir_all(&self.dir)?;
                    *self = Self::spawn(self.dir.clone(), cluster, password)?;
                }
            }
        }
        Ok(())
    }
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

/// A port that is free now and, for a cluster node, whose cluster bus port is free too.
/// Another process may still take either before redis-server binds them: see
/// [`Node::wait_started`].
fn server_port(cluster: bool) -> anyhow::Result<u16> {
    for _ in 0..100 {
        let port = free_port()?;
        if !cluster {
            return Ok(port);
        }
        if let Some(bus) = port.checked_add(BUS_OFFSET)
            && TcpListener::bind(("127.0.0.1", bus)).is_ok()
        {
            return Ok(port);
        }
    }
    bail!("no free port with a free cluster bus port (port + {BUS_OFFSET})")
}

/// How a started redis-server came up.
enum Started {
    /// It answers, as itself (its `process_id`), on its port.
    Answering,
    /// It exited, typically because its port or cluster bus port was taken.
    Exited(ExitStatus),
}

/// Waits until `child` itself answers on `port`: a PING answered by another process that
/// holds the port does not count.
fn wait_started(child: &mut Child, port: u16, password: Option<&str>) -> anyhow::Result<Started> {
    let me = format!("process_id:{}", child.id());
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(Started::Exited(status));
        }
        if cli(port, password, &["info", "server"]).is_ok_and(|s| s.lines().any(|l| l.trim() == me))
        {
            return Ok(Started::Answering);
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    bail!("redis-server on port {port} did not answer within {START_TIMEOUT:?}")
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
            nodes.push(Node::spawn(dir, true, password.as_deref())?);
        }
        let mut cluster = Self {
            nodes,
            password,
            _dir: root,
        };
        for n in &mut cluster.nodes {
            n.wait_started(true, cluster.password.as_deref())?;
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
        let deadline = Instant::now() + START_TIMEOUT;
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
        // The cluster's configuration names the ports, so a taken port is an error here.
        for n in &mut self.nodes {
            if let Some(child) = n.child.as_mut()
                && let Started::Exited(status) =
                    wait_started(child, n.port, self.password.as_deref())?
            {
                bail!(
                    "redis-server on port {} exited on restart ({status}): is the port taken?",
                    n.port
                );
            }
        }
        self.wait_healthy()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// A plain (non-cluster) Redis; stopped on drop.
#[derive(Debug)]
pub struct PlainRedis {
    node: Node,
    _dir: tempfile::TempDir,
}

impl PlainRedis {
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let node = Node::spawn(dir.path().join("node"), false, None)?;
        let mut plain = Self { node, _dir: dir };
        plain.node.wait_started(false, None)?;
        Ok(plain)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.node.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node spawned on `port` by hand, as if another process had taken the port (or its
    /// cluster bus port) after [`server_port`] found it free.
    fn node_on(port: u16, dir: &tempfile::TempDir, cluster: bool) -> anyhow::Result<Node> {
        let dir = dir.path().join("node");
        std::fs::create_dir_all(&dir)?;
        let child = spawn_server(port, &dir, cluster, None)?;
        Ok(Node {
            port,
            dir,
            child: Some(child),
        })
    }

    #[test]
    fn a_node_whose_port_another_redis_holds_starts_on_another_port() -> anyhow::Result<()> {
        let other = PlainRedis::start()?;
        let dir = tempfile::tempdir()?;
        let mut node = node_on(other.node.port, &dir, false)?;
        node.wait_started(false, None)?;
        assert_ne!(
            node.port, other.node.port,
            "the other server's answer counted"
        );
        let pid = node.child.as_ref().map(Child::id).unwrap_or_default();
        let info = cli(node.port, None, &["info", "server"])?;
        assert!(info.contains(&format!("process_id:{pid}")), "{info}");
        Ok(())
    }

    #[test]
    fn a_cluster_node_whose_bus_port_is_taken_starts_on_another_port() -> anyhow::Result<()> {
        let port = server_port(true)?;
        let _bus = TcpListener::bind(("127.0.0.1", port + BUS_OFFSET))?;
        let dir = tempfile::tempdir()?;
        let mut node = node_on(port, &dir, true)?;
        node.wait_started(true, None)?;
        assert_ne!(node.port, port);
        assert_eq!(cli(node.port, None, &["ping"])?.trim(), "PONG");
        Ok(())
    }
}
