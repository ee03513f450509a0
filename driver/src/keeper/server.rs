//! `clip keeper`: holds FUSE descriptors for node plugins that come and go.

use crate::lock;
use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{Message, Secrets, accept, listen, recv, send};

#[derive(Debug, Clone)]
pub struct KeeperConfig {
    /// The unix socket node plugins connect to.
    pub socket: PathBuf,
    /// How long a descriptor whose server is gone waits for a new server before it is
    /// closed (its mount then fails reads with ENOTCONN instead of making them wait).
    pub hold: Duration,
}

struct Held {
    fd: OwnedFd,
    device: u64,
    secrets: Secrets,
    /// The connection of the server serving it; None while it waits for one.
    owner: Option<u64>,
    orphaned: Option<Instant>,
}

#[derive(Default)]
struct State {
    held: HashMap<String, Held>,
    /// Live server connections by id (ids grow: the highest is the newest).
    conns: BTreeMap<u64, OwnedFd>,
    next: u64,
}

impl State {
    /// Hands every descriptor without a server to connection `id`.
    fn adopt_orphans(&mut self, id: u64) {
        let Some(sock) = self.conns.get(&id) else {
            return;
        };
        for (volume, h) in self.held.iter_mut().filter(|(_, h)| h.owner.is_none()) {
            let msg = Message::Adopt {
                volume: volume.clone(),
                device: h.device,
                secrets: h.secrets.clone(),
            };
            match send(sock.as_fd(), &msg, Some(h.fd.as_fd())) {
                Ok(()) => {
                    info!(volume = %volume, server = id, "handed over to a new server");
                    h.owner = Some(id);
                    h.orphaned = None;
                }
                Err(e) => {
                    warn!(volume = %volume, server = id, error = %e, "handing over failed");
                    return;
                }
            }
        }
    }
}

/// Serves until the process is stopped.
pub fn run(config: KeeperConfig) -> std::io::Result<()> {
    let listener = listen(&config.socket)?;
    let state = Arc::new(Mutex::new(State::default()));
    info!(socket = %config.socket.display(), hold_secs = config.hold.as_secs(), "keeper serving");
    {
        let state = state.clone();
        let hold = config.hold;
        std::thread::Builder::new()
            .name("keeper-expiry".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_millis(250).min(hold));
                    let mut s = lock(&state);
                    s.held.retain(|volume, h| match h.orphaned {
                        Some(t) if t.elapsed() >= hold => {
                            warn!(volume = %volume, "no server took the mount over within the hold time; releasing it (its readers now get ENOTCONN)");
                            false
                        }
                        _ => true,
                    });
                }
            })?;
    }
    loop {
        let conn = match accept(listener.as_fd()) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!(error = %e, "accepting a server failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let state = state.clone();
        std::thread::Builder::new()
            .name("keeper-conn".into())
            .spawn(move || serve(&state, conn))?;
    }
}

fn serve(state: &Mutex<State>, conn: OwnedFd) {
    let id = {
        let mut s = lock(state);
        let id = s.next;
        s.next += 1;
        match conn.try_clone() {
            Ok(c) => {
                s.conns.insert(id, c);
            }
            Err(e) => {
                warn!(error = %e, "cannot keep a server connection");
                return;
            }
        }
        s.adopt_orphans(id);
        let held_elsewhere: Vec<String> = s
            .held
            .iter()
            .filter(|(_, h)| h.owner.is_some_and(|o| o != id))
            .map(|(v, _)| v.clone())
            .collect();
        for volume in held_elsewhere {
            let _ = send(conn.as_fd(), &Message::Held { volume }, None);
        }
        let _ = send(conn.as_fd(), &Message::Synced, None);
        id
    };
    info!(server = id, "server connected");
    loop {
        match recv(conn.as_fd()) {
            Ok(Some((
                Message::Keep {
                    volume,
                    device,
                    secrets,
                },
                Some(fd),
            ))) => {
                info!(server = id, volume = %volume, "holding the mount");
                lock(state).held.insert(
                    volume,
                    Held {
                        fd,
                        device,
                        secrets,
                        owner: Some(id),
                        orphaned: None,
                    },
                );
            }
            Ok(Some((Message::Release { volume }, _))) => {
                lock(state).held.remove(&volume);
            }
            Ok(Some((msg, _))) => {
                warn!(server = id, ?msg, "unexpected message ignored");
            }
            Ok(None) => break,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                warn!(server = id, error = %e, "ignored");
            }
            Err(e) => {
                warn!(server = id, error = %e, "connection failed");
                break;
            }
        }
    }
    let mut s = lock(state);
    s.conns.remove(&id);
    let now = Instant::now();
    let mut left = 0;
    for h in s.held.values_mut().filter(|h| h.owner == Some(id)) {
        h.owner = None;
        h.orphaned = Some(now);
        left += 1;
    }
    info!(
        server = id,
        mounts = left,
        "server gone; its mounts wait for the next one"
    );
    if let Some(&newest) = s.conns.keys().next_back() {
        s.adopt_orphans(newest);
    }
}
