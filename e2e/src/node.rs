//! How tests and benchmarks start `clip node` as a process, as the DaemonSet runs it.

use std::ffi::OsString;
use std::path::Path;

/// The arguments of `clip node` with JSON logs, no Kubernetes API (direct `image:` volumes
/// only), node id `node_id`, and its socket (`csi.sock`), state and cache under `dir`.
pub fn node_args(dir: &Path, node_id: &str) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "--log-format",
        "json",
        "--log",
        "info",
        "node",
        "--kube",
        "off",
        "--node-id",
        node_id,
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    args.push("--endpoint".into());
    args.push(format!("unix://{}", socket(dir).display()).into());
    args.push("--state-dir".into());
    args.push(dir.join("state").into());
    args.push("--cache-dir".into());
    args.push(dir.join("cache").into());
    args
}

/// Where [`node_args`] puts the plugin's socket.
pub fn socket(dir: &Path) -> std::path::PathBuf {
    dir.join("csi.sock")
}

/// A process a test started (`clip node`, `clip keeper`), killed on drop.
#[derive(Debug)]
pub struct Process {
    child: std::process::Child,
}

impl Process {
    /// Starts `bin args` with its output appended to `SOCKET.log` and waits up to 20 s for
    /// `socket`, which the process creates when it serves (the error shows the log's end).
    pub fn start(bin: &Path, args: Vec<OsString>, socket: &Path) -> anyhow::Result<Self> {
        use std::time::{Duration, Instant};
        let _ = std::fs::remove_file(socket);
        let log_path = socket.with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let child = std::process::Command::new(bin)
            .args(args)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let process = Self { child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if Instant::now() >= deadline {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail = &log[log.floor_char_boundary(log.len().saturating_sub(4000))..];
                anyhow::bail!("{} did not appear; the log ends:\n{tail}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(process)
    }

    /// Sends `sig` and waits for the process to end.
    pub fn signal(&mut self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
    }
}
