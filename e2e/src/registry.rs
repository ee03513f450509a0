//! Debian's `docker-registry` on a random loopback port, in its own temporary directory.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::free_port;
use crate::http;

/// A running registry; stopped and its storage deleted on drop.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    port: u16,
    auth: Option<(String, String)>,
    extra: Option<String>,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// An anonymous registry.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(None)
    }

    /// A registry that requires HTTP Basic auth with this user and password.
    pub fn start_with_auth(user: &str, password: &str) -> anyhow::Result<Self> {
        Self::start_with(Some((user.to_owned(), password.to_owned())))
    }

    /// A registry that requires Bearer tokens from `tokens` (the distribution token flow).
    pub fn start_with_token_auth(tokens: &crate::token::TokenServer) -> anyhow::Result<Self> {
        let section = format!(
            "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
            tokens.realm(),
            crate::token::SERVICE,
            crate::token::ISSUER,
            tokens.cert_path().display()
        );
        Self::start_with_config(None, Some(section))
    }

    fn start_with(auth: Option<(String, String)>) -> anyhow::Result<Self> {
        Self::start_with_config(auth, None)
    }

    fn start_with_config(
        auth: Option<(String, String)>,
        extra: Option<String>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut last_err = None;
        for _ in 0..5 {
            let port = free_port()?;
            match Self::spawn(dir.path(), port, auth.as_ref(), extra.as_deref()) {
                Ok(child) => {
                    let mut reg = Self {
                        child,
                        port,
                        auth: auth.clone(),
                        extra: extra.clone(),
                        _dir: dir,
                    };
                    reg.wait_ready()?;
                    return Ok(reg);
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("registry did not start")))
    }

    fn spawn(
        dir: &Path,
        port: u16,
        auth: Option<&(String, String)>,
        extra: Option<&str>,
    ) -> anyhow::Result<Child> {
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage)?;
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        if let Some((user, password)) = auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .context("running htpasswd (apt-get install apache2-utils)")?;
            if !out.status.success() {
                bail!("htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let file = dir.join("htpasswd");
            std::fs::write(&file, out.stdout)?;
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: clip-test\n    path: {}\n",
                file.display()
            ));
        }
        if let Some(extra) = extra {
            config.push_str(extra);
        }
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config)?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting docker-registry (apt-get install docker-registry)")?;
        Ok(child)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("docker-registry exited early: {status}");
            }
            if let Ok(r) = http::request("GET", &format!("{}/v2/", self.url()), &[], &[])
                && (r.status == 200 || r.status == 401)
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("docker-registry on port {} did not become ready", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, the registry part of image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// The Basic credentials this registry requires, if any.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.auth.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// Stops the registry process (its data stays until drop); see [`Registry::restart`].
    pub fn stop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }

    /// Starts the registry again on the same port with the same data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.child = Self::spawn(
            self._dir.path(),
            self.port,
            self.auth.as_ref(),
            self.extra.as_deref(),
        )?;
        self.wait_ready()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
