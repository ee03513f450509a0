//! The node plugin's side of the keeper.

use crate::lock;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{info, warn};

use super::{Message, Secrets, connect, recv, send, set_recv_timeout};

/// A descriptor handed over by the keeper.
#[derive(Debug)]
pub struct Adopted {
    pub volume: String,
    /// The device number the mount had when it was kept.
    pub device: u64,
    /// The volume's pull secrets, as kept.
    pub secrets: Secrets,
    pub fd: OwnedFd,
}

/// What the keeper says on connecting.
#[derive(Debug, Default)]
pub struct Welcome {
    /// Descriptors whose server is gone, now this server's.
    pub adopted: Vec<Adopted>,
    /// Volumes another live server still serves (they arrive as [`Event::Adopt`] when it goes).
    pub held_elsewhere: Vec<String>,
}

/// What the keeper says later.
#[derive(Debug)]
pub enum Event {
    Adopt(Adopted),
    /// The keeper restarted and was reached again; it holds nothing of this server's.
    Reconnected(Welcome),
}

/// A connection to the keeper, re-established in the background if the keeper restarts.
#[derive(Debug)]
pub struct KeeperClient {
    path: PathBuf,
    sock: Mutex<Option<OwnedFd>>,
}

const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

fn welcome(sock: &OwnedFd) -> std::io::Result<Welcome> {
    set_recv_timeout(sock, Some(WELCOME_TIMEOUT))?;
    let mut w = Welcome::default();
    loop {
        match recv(sock.as_fd())? {
            Some((
                Message::Adopt {
                    volume,
                    device,
                    secrets,
                },
                Some(fd),
            )) => {
                w.adopted.push(Adopted {
                    volume,
                    device,
                    secrets,
                    fd,
                });
            }
            Some((Message::Held { volume }, _)) => w.held_elsewhere.push(volume),
            Some((Message::Synced, _)) => break,
            Some((msg, _)) => warn!(?msg, "unexpected keeper message ignored"),
            None => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the keeper closed the connection",
                ));
            }
        }
    }
    set_recv_timeout(sock, None)?;
    Ok(w)
}

impl KeeperClient {
    /// Connects to the keeper at `path` and reads what it holds for this server (None if the
    /// keeper cannot be reached now: it is then tried every second, and its welcome arrives
    /// as [`Event::Reconnected`]). Later hand-overs arrive on the receiver.
    pub fn start(
        path: &Path,
    ) -> std::io::Result<(
        Arc<Self>,
        Option<Welcome>,
        tokio::sync::mpsc::UnboundedReceiver<Event>,
    )> {
        let first = connect(path).and_then(|sock| {
            let w = welcome(&sock)?;
            let reader = sock.try_clone()?;
            Ok((sock, w, reader))
        });
        let (sock, w, reader) = match first {
            Ok((sock, w, reader)) => (Some(sock), Some(w), Some(reader)),
            Err(e) => {
                warn!(socket = %path.display(), error = %e, "the keeper is not reachable; mounts are not kept until it is");
                (None, None, None)
            }
        };
        let client = Arc::new(Self {
            path: path.to_owned(),
            sock: Mutex::new(sock),
        });
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let c = client.clone();
        std::thread::Builder::new()
            .name("keeper-client".into())
            .spawn(move || c.listen(reader, tx))?;
        Ok((client, w, rx))
    }

    fn listen(&self, mut reader: Option<OwnedFd>, tx: tokio::sync::mpsc::UnboundedSender<Event>) {
        loop {
            if let Some(r) = &reader {
                match recv(r.as_fd()) {
                    Ok(Some((
                        Message::Adopt {
                            volume,
                            device,
                            secrets,
                        },
                        Some(fd),
                    ))) => {
                        if tx
                            .send(Event::Adopt(Adopted {
                                volume,
                                device,
                                secrets,
                                fd,
                            }))
                            .is_err()
                        {
                            return;
                        }
                        continue;
                    }
                    Ok(Some((msg, _))) => {
                        warn!(?msg, "unexpected keeper message ignored");
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        warn!(error = %e, "ignored");
                        continue;
                    }
                    Ok(None) | Err(_) => {
                        *lock(&self.sock) = None;
                        warn!(socket = %self.path.display(), "lost the keeper; mounts are not kept until it is back");
                    }
                }
            }
            reader = None;
            while reader.is_none() {
                if tx.is_closed() {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
                let Ok(sock) = connect(&self.path) else {
                    continue;
                };
                let (Ok(w), Ok(r)) = (welcome(&sock), sock.try_clone()) else {
                    continue;
                };
                info!(socket = %self.path.display(), "keeper reached");
                *lock(&self.sock) = Some(sock);
                reader = Some(r);
                if tx.send(Event::Reconnected(w)).is_err() {
                    return;
                }
            }
        }
    }

    /// Whether the keeper is reachable now (and so holds what was kept).
    pub fn connected(&self) -> bool {
        lock(&self.sock).is_some()
    }

    fn send(&self, msg: &Message, fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
        match lock(&self.sock).as_ref() {
            Some(s) => send(s.as_fd(), msg, fd),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the keeper is not reachable",
            )),
        }
    }

    /// Gives the keeper a descriptor of `volume`'s FUSE connection, and its pull secrets.
    pub fn keep(
        &self,
        volume: &str,
        fd: BorrowedFd<'_>,
        device: u64,
        secrets: &Secrets,
    ) -> std::io::Result<()> {
        self.send(
            &Message::Keep {
                volume: volume.to_owned(),
                device,
                secrets: secrets.clone(),
            },
            Some(fd),
        )
    }

    /// Tells the keeper to close what it holds of `volume`.
    pub fn release(&self, volume: &str) -> std::io::Result<()> {
        self.send(
            &Message::Release {
                volume: volume.to_owned(),
            },
            None,
        )
    }
}
