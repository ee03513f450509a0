//! A real Redis Cluster (Debian's redis-server in cluster mode) on loopback, started and
//! torn down by the tests; plus a plain Redis for "not a cluster" cases.
//!
//! [`ClusterOptions`] chooses the cluster's shape and how it is secured: a password for the
//! default user, extra ACL users, TLS only (with a CA and server certificate made for the
//! test). The harness itself talks to the servers as the default user.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
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

/// The certificate files of a TLS deployment, made by [`TlsFiles::generate`].
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The test CA's certificate (PEM): what a client must trust.
    pub ca: PathBuf,
    /// The servers' certificate (PEM), for 127.0.0.1 and localhost, signed by the CA.
    pub cert: PathBuf,
    /// The servers' private key (PEM).
    pub key: PathBuf,
}

impl TlsFiles {
    /// A fresh CA and a server certificate it signed, written into `dir`.
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name
            .push(DnType::CommonName, "clip test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let key = KeyPair::generate()?;
        let mut server =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        server
            .distinguished_name
            .push(DnType::CommonName, "clip test redis");
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Cluster nodes also connect to each other (bus, replication) with this certificate.
        server.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let server_cert = server.signed_by(&key, &issuer)?;

        let files = Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("redis.pem"),
            key: dir.join("redis-key.pem"),
        };
        std::fs::write(&files.ca, ca_cert.pem())?;
        std::fs::write(&files.cert, server_cert.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }
}

/// How every server of one deployment is started and reached.
#[derive(Debug, Clone, Default)]
struct Settings {
    cluster: bool,
    /// The default user's password (`requirepass`, also `masterauth` for replicas).
    password: Option<String>,
    /// ACL rules of extra users, one user each (`user` directives).
    users: Vec<String>,
    /// TLS only: no plaintext port, TLS on the cluster bus and for replication.
    tls: Option<TlsFiles>,
}

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
    fn spawn(dir: PathBuf, settings: &Settings) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let port = server_port(settings.cluster)?;
        let child = spawn_server(port, &dir, settings)?;
        Ok(Self {
            port,
            dir,
            child: Some(child),
        })
    }

    /// Waits until the server answers. A port is only free when [`server_port`] looks, so
    /// another process can take it (or a cluster node's bus port) before redis-server binds
    /// it; the server then exits, and this starts it again, afresh, on another port.
    fn wait_started(&mut self, settings: &Settings) -> anyhow::Result<()> {
        for attempt in 1.. {
            let child = self.child.as_mut().context("the node is stopped")?;
            match wait_started(child, self.port, settings)? {
                Started::Answering => break,
                Started::Exited(status) if attempt == PORT_ATTEMPTS => {
                    let log =
                        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
                    bail!("redis-server exited ({status}) on {attempt} ports in a row:\n{log}");
                }
                Started::Exited(_) => {
                    std::fs::remove_dir_all(&self.dir)?;
                    *self = Self::spawn(self.dir.clone(), settings)?;
                }
            }
        }
        Ok(())
    }
}

/// What a test cluster looks like and how it is secured; [`ClusterOptions::start`] starts it.
///
/// ```no_run
/// # fn main() -> anyhow::Result<()> {
/// let _cluster = clip_e2e::redis::ClusterOptions::new()
///     .user("clip on >secret ~clip:* +@all")
///     .tls()
///     .start()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    masters: usize,
    replicas: usize,
    password: Option<String>,
    users: Vec<String>,
    tls: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl ClusterOptions {
    /// Three masters with one replica each, no password, no TLS.
    pub fn new() -> Self {
        Self {
            masters: 3,
            replicas: 1,
            password: None,
            users: Vec::new(),
            tls: false,
        }
    }

    /// How many masters, and replicas per master.
    pub fn shape(mut self, masters: usize, replicas: usize) -> Self {
        self.masters = masters;
        self.replicas = replicas;
        self
    }

    /// A password for the default user; the harness authenticates with it.
    pub fn password(mut self, password: &str) -> Self {
        self.password = Some(password.to_owned());
        self
    }

    /// An ACL user, as a `user` directive's arguments, e.g. `clip on >secret ~clip:* +@all`.
    pub fn user(mut self, rule: &str) -> Self {
        self.users.push(rule.to_owned());
        self
    }

    /// TLS only, with a CA and certificate made for this cluster (see
    /// [`RedisCluster::ca_file`]). Clients need not present a certificate.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Starts the processes, creates the cluster and waits until it is healthy.
    pub fn start(self) -> anyhow::Result<RedisCluster> {
        let root = tempfile::tempdir()?;
        let settings = Settings {
            cluster: true,
            password: self.password,
            users: self.users,
            tls: if self.tls {
                Some(TlsFiles::generate(root.path())?)
            } else {
                None
            },
        };
        let (masters, replicas) = (self.masters, self.replicas);
        let mut nodes = Vec::new();
        for i in 0..masters * (1 + replicas) {
            let dir = root.path().join(format!("node{i}"));
            nodes.push(Node::spawn(dir, &settings)?);
        }
        // Built before waiting, so the processes are stopped if a node never comes up.
        let mut cluster = RedisCluster {
            nodes,
            settings,
            _dir: root,
        };
        for n in &mut cluster.nodes {
            n.wait_started(&cluster.settings)?;
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut cmd = cli_command(&cluster.settings);
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
}

/// A running Redis Cluster; every process is stopped on drop.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<Node>,
    settings: Settings,
    _dir: tempfile::TempDir,
}

fn spawn_server(port: u16, dir: &Path, settings: &Settings) -> anyhow::Result<Child> {
    let mut cmd = Command::new("redis-server");
    let port = port.to_string();
    match &settings.tls {
        None => cmd.args(["--port", &port]),
        Some(tls) => cmd
            .args(["--port", "0", "--tls-port", &port])
            .arg("--tls-cert-file")
            .arg(&tls.cert)
            .arg("--tls-key-file")
            .arg(&tls.key)
            .arg("--tls-ca-cert-file")
            .arg(&tls.ca)
            .args(["--tls-auth-clients", "no"])
            .args(["--tls-replication", "yes"])
            .args(["--tls-cluster", if settings.cluster { "yes" } else { "no" }]),
    };
    cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
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
    if settings.cluster {
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
    if let Some(p) = &settings.password {
        cmd.args(["--requirepass", p, "--masterauth", p]);
    }
    for rule in &settings.users {
        // redis-server quotes each argument after `--user` as one token of the directive.
        cmd.arg("--user").args(rule.split_whitespace());
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.spawn()
        .context("starting redis-server (apt-get install redis-server)")
}

/// redis-cli, authenticated as the default user and speaking TLS when the servers do.
fn cli_command(settings: &Settings) -> Command {
    let mut cmd = Command::new("redis-cli");
    if let Some(p) = &settings.password {
        cmd.args(["-a", p, "--no-auth-warning"]);
    }
    if let Some(tls) = &settings.tls {
        cmd.arg("--tls").arg("--cacert").arg(&tls.ca);
    }
    cmd
}

fn cli(port: u16, settings: &Settings, args: &[&str]) -> anyhow::Result<String> {
    let out = cli_command(settings)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
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
fn wait_started(child: &mut Child, port: u16, settings: &Settings) -> anyhow::Result<Started> {
    let me = format!("process_id:{}", child.id());
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(Started::Exited(status));
        }
        if cli(port, settings, &["info", "server"]).is_ok_and(|s| s.lines().any(|l| l.trim() == me))
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
        ClusterOptions::new().start()
    }

    /// A cluster that requires a password.
    pub fn start_with_password(password: &str) -> anyhow::Result<Self> {
        ClusterOptions::new().password(password).start()
    }

    /// Waits until every running node reports `cluster_state:ok`.
    pub fn wait_healthy(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            let ok = self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                cli(n.port, &self.settings, &["cluster", "info"])
                    .is_ok_and(|s| s.contains("cluster_state:ok"))
            });
            if ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the Redis Cluster did not become healthy")
    }

    /// Seed addresses, `127.0.0.1:PORT` (TLS ports for a TLS cluster).
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    /// The CA certificate (PEM) that signed a TLS cluster's certificates.
    pub fn ca_file(&self) -> Option<&Path> {
        self.settings.tls.as_ref().map(|t| t.ca.as_path())
    }

    /// Runs redis-cli in cluster mode (-c) against a live node, as the default user.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let n = self
            .nodes
            .iter()
            .find(|n| n.child.is_some())
            .context("no live node")?;
        let mut full = vec!["-c"];
        full.extend_from_slice(args);
        cli(n.port, &self.settings, &full)
    }

    /// Runs redis-cli against the node on `port` alone (no redirections), as the default user.
    pub fn cli_on(&self, port: u16, args: &[&str]) -> anyhow::Result<String> {
        cli(port, &self.settings, args)
    }

    /// Ports of the live nodes that are masters. Each node is asked for its own role: other
    /// nodes' views (`CLUSTER NODES`) learn of new replicas by gossip, a moment later.
    pub fn masters(&self) -> anyhow::Result<Vec<u16>> {
        let mut masters = Vec::new();
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let role = cli(n.port, &self.settings, &["role"])?;
            if role.lines().next().map(str::trim) == Some("master") {
                masters.push(n.port);
            }
        }
        Ok(masters)
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
                n.child = Some(spawn_server(n.port, &n.dir, &self.settings)?);
            }
        }
        // The cluster's configuration names the ports, so a taken port is an error here.
        for n in &mut self.nodes {
            if let Some(child) = n.child.as_mut()
                && let Started::Exited(status) = wait_started(child, n.port, &self.settings)?
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
        let settings = Settings::default();
        let node = Node::spawn(dir.path().join("node"), &settings)?;
        let mut plain = Self { node, _dir: dir };
        plain.node.wait_started(&settings)?;
        Ok(plain)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.node.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(cluster: bool) -> Settings {
        Settings {
            cluster,
            ..Settings::default()
        }
    }

    /// A node spawned on `port` by hand, as if another process had taken the port (or its
    /// cluster bus port) after [`server_port`] found it free.
    fn node_on(port: u16, dir: &tempfile::TempDir, cluster: bool) -> anyhow::Result<Node> {
        let dir = dir.path().join("node");
        std::fs::create_dir_all(&dir)?;
        let child = spawn_server(port, &dir, &settings(cluster))?;
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
        node.wait_started(&settings(false))?;
        assert_ne!(
            node.port, other.node.port,
            "the other server's answer counted"
        );
        let pid = node.child.as_ref().map(Child::id).unwrap_or_default();
        let info = cli(node.port, &settings(false), &["info", "server"])?;
        assert!(info.contains(&format!("process_id:{pid}")), "{info}");
        Ok(())
    }

    #[test]
    fn a_cluster_node_whose_bus_port_is_taken_starts_on_another_port() -> anyhow::Result<()> {
        let port = server_port(true)?;
        let _bus = TcpListener::bind(("127.0.0.1", port + BUS_OFFSET))?;
        let dir = tempfile::tempdir()?;
        let mut node = node_on(port, &dir, true)?;
        node.wait_started(&settings(true))?;
        assert_ne!(node.port, port);
        assert_eq!(cli(node.port, &settings(true), &["ping"])?.trim(), "PONG");
        Ok(())
    }
}
