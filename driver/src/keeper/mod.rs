//! Keeping FUSE connections open across a restart of the node plugin.
//!
//! A FUSE mount dies when the last descriptor of its connection closes. The keeper is a
//! small process of its own (`clip keeper`, its own DaemonSet in the chart, updated only on
//! delete) that holds a duplicate of each mount's `/dev/fuse` descriptor, received over a
//! unix socket. When a node plugin exits (a rolling update, a crash), its mounts stay in the
//! kernel and readers wait; the next node plugin connects, adopts the descriptors and serves
//! them ([`crate::fs::resume`]). Descriptors that no server adopts within the hold time are
//! closed, so a node without a plugin fails reads (ENOTCONN) instead of hanging them.
//!
//! The protocol is one JSON message per SOCK_SEQPACKET datagram, a descriptor attached with
//! SCM_RIGHTS where the message says so:
//! - server -> keeper: [`Message::Keep`] (+fd), [`Message::Release`].
//! - keeper -> server, on connecting: [`Message::Adopt`] (+fd) for each descriptor whose
//!   server is gone, [`Message::Held`] for each one another live server still serves, then
//!   [`Message::Synced`]; later, [`Message::Adopt`] whenever a server goes away.

mod client;
mod server;

pub use client::{Adopted, Event, KeeperClient, Welcome};
pub use server::{KeeperConfig, run};

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr,
};
use serde::{Deserialize, Serialize};

/// Largest message: a volume id is at most 128 bytes in CSI; the pull secrets of a volume
/// (a docker config) take the rest.
const MAX_MESSAGE: usize = 64 << 10;

/// A volume's pull secrets (CSI `secrets`, from the pod's nodePublishSecretRef), kept in the
/// keeper's memory only, so that the plugin that takes the volume over can still read a
/// private image. Debug shows the keys, never the values.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secrets(pub std::collections::BTreeMap<String, String>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Message {
    /// Hold the attached descriptor for `volume`, mounted as device `device`.
    Keep {
        volume: String,
        device: u64,
        #[serde(default)]
        secrets: Secrets,
    },
    /// `volume` was unpublished: close its descriptor.
    Release { volume: String },
    /// The attached descriptor's server is gone: serve it.
    Adopt {
        volume: String,
        device: u64,
        #[serde(default)]
        secrets: Secrets,
    },
    /// Another live server serves `volume`; it will be adopted when that server goes.
    Held { volume: String },
    /// The messages sent on connecting are complete.
    Synced,
}

fn io_err(e: nix::errno::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

fn seqpacket() -> std::io::Result<OwnedFd> {
    nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io_err)
}

/// A peer that stops reading must not stall the sender (the keeper's state lock, a
/// publish): a send gives up after this long.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// The socket-option form of a timeout; None waits forever.
fn timeval(t: Option<Duration>) -> nix::sys::time::TimeVal {
    t.map_or(nix::sys::time::TimeVal::new(0, 0), |t| {
        nix::sys::time::TimeVal::new(t.as_secs() as i64, i64::from(t.subsec_micros()))
    })
}

fn set_send_timeout(sock: &OwnedFd) -> std::io::Result<()> {
    nix::sys::socket::setsockopt(
        sock,
        nix::sys::socket::sockopt::SendTimeout,
        &timeval(Some(SEND_TIMEOUT)),
    )
    .map_err(io_err)
}

fn set_recv_timeout(sock: &OwnedFd, t: Option<Duration>) -> std::io::Result<()> {
    nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::ReceiveTimeout, &timeval(t))
        .map_err(io_err)
}

fn listen(path: &Path) -> std::io::Result<OwnedFd> {
    crate::socket::clear_for_bind(path)?;
    let sock = seqpacket()?;
    let addr = UnixAddr::new(path).map_err(io_err)?;
    nix::sys::socket::bind(sock.as_raw_fd(), &addr).map_err(io_err)?;
    nix::sys::socket::listen(&sock, Backlog::new(64).map_err(io_err)?).map_err(io_err)?;
    Ok(sock)
}

fn connect(path: &Path) -> std::io::Result<OwnedFd> {
    let sock = seqpacket()?;
    let addr = UnixAddr::new(path).map_err(io_err)?;
    nix::sys::socket::connect(sock.as_raw_fd(), &addr).map_err(io_err)?;
    set_send_timeout(&sock)?;
    Ok(sock)
}

fn accept(listener: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let fd =
        nix::sys::socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC).map_err(io_err)?;
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    set_send_timeout(&sock)?;
    Ok(sock)
}

fn send(sock: BorrowedFd<'_>, msg: &Message, fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    loop {
        match nix::sys::socket::sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&body)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io_err(e)),
        }
    }
}

/// The next message, or None when the peer closed. Messages that do not parse are an error;
/// descriptors beyond the first are closed.
fn recv(sock: BorrowedFd<'_>) -> std::io::Result<Option<(Message, Option<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let (len, mut fds) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match nix::sys::socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => {
                let mut fds = Vec::new();
                if let Ok(cmsgs) = m.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            // SAFETY: descriptors received with SCM_RIGHTS are new and ours.
                            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
                        }
                    }
                }
                break (m.bytes, fds);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io_err(e)),
        }
    };
    if len == 0 {
        return Ok(None);
    }
    let msg: Message = serde_json::from_slice(&buf[..len]).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad keeper message: {e}"),
        )
    })?;
    let fd = if fds.is_empty() {
        None
    } else {
        Some(fds.swap_remove(0))
    };
    Ok(Some((msg, fd)))
}
