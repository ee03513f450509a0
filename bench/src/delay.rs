//! A TCP proxy that adds latency: every byte is delivered half a round trip after it was
//! received, in each direction, in order. This kernel has no `sch_netem`; bandwidth comes
//! from `tc tbf` on the veth behind the proxy, latency from here.
//!
//! Per connection and direction, one thread reads and stamps each piece with its due time and
//! one thread writes it when due, through a queue bounded in bytes (enough for several
//! bandwidth-delay products, so the queue does not limit throughput). A new connection first
//! waits one round trip, as a TCP handshake would.
//!
//! Not modelled: TCP slow start and congestion control over the long path (the proxy reads
//! eagerly from the short, shaped path), so figures through it are a little optimistic for
//! fresh or long-idle connections.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Bytes and connections that went through the proxy.
#[derive(Debug, Default)]
pub struct DelayStats {
    /// Client to upstream.
    pub up_bytes: AtomicU64,
    /// Upstream to client.
    pub down_bytes: AtomicU64,
    /// HTTP GET requests seen going upstream (request heads start with `GET `; requests
    /// from clip and the pull have no bodies).
    pub gets: AtomicU64,
    /// Of those, `GET /v2/`: the registry API check that precedes authentication.
    pub v2_checks: AtomicU64,
    pub connections: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    one_way: Duration,
    queue_bytes: usize,
    stop: AtomicBool,
    stats: DelayStats,
}

/// A running proxy on 127.0.0.1; stops accepting on drop (open connections end when their
/// peers close them).
#[derive(Debug)]
pub struct DelayProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl DelayProxy {
    /// Listens on a random loopback port and forwards to `upstream` with `rtt / 2` of delay
    /// each way. `rate_bytes` (per second) sizes the queues.
    pub fn start(upstream: SocketAddr, rtt: Duration, rate_bytes: u64) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let one_way = rtt / 2;
        let bdp = (rate_bytes as f64 * rtt.as_secs_f64()) as usize;
        let shared = Arc::new(Shared {
            upstream,
            one_way,
            queue_bytes: (4 * bdp).max(4 << 20),
            stop: AtomicBool::new(false),
            stats: DelayStats::default(),
        });
        let sh = shared.clone();
        thread::Builder::new()
            .name("delay-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if sh.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let sh = sh.clone();
                    thread::spawn(move || {
                        if let Err(e) = serve(conn, &sh) {
                            eprintln!("delay proxy: connection failed: {e}");
                        }
                    });
                }
            })?;
        Ok(Self { addr, shared })
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn stats(&self) -> &DelayStats {
        &self.shared.stats
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        TcpStream::connect(self.addr).ok();
    }
}

fn serve(client: TcpStream, sh: &Arc<Shared>) -> anyhow::Result<()> {
    if sh.stop.load(Ordering::SeqCst) {
        return Ok(());
    }
    sh.stats.connections.fetch_add(1, Ordering::Relaxed);
    // The SYN / SYN-ACK round trip a real connection would cost.
    thread::sleep(sh.one_way * 2);
    let upstream = TcpStream::connect(sh.upstream)?;
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    let up = pump(client.try_clone()?, upstream.try_clone()?, sh.clone(), true)?;
    let down = pump(upstream, client, sh.clone(), false)?;
    for t in up.into_iter().chain(down) {
        t.join().ok();
    }
    Ok(())
}

/// One direction: a reader thread stamps pieces, a writer thread delivers them when due.
fn pump(
    from: TcpStream,
    to: TcpStream,
    sh: Arc<Shared>,
    up: bool,
) -> anyhow::Result<[thread::JoinHandle<()>; 2]> {
    let queue = Arc::new(DelayQueue::new(sh.queue_bytes));
    let reader = {
        let queue = queue.clone();
        let mut from = from.try_clone()?;
        let sh = sh.clone();
        thread::Builder::new()
            .name("delay-read".into())
            .spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match from.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let counter = if up {
                        &sh.stats.up_bytes
                    } else {
                        &sh.stats.down_bytes
                    };
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                    if up {
                        let count = |pat: &[u8]| {
                            buf[..n].windows(pat.len()).filter(|w| *w == pat).count() as u64
                        };
                        sh.stats.gets.fetch_add(count(b"GET "), Ordering::Relaxed);
                        sh.stats
                            .v2_checks
                            .fetch_add(count(b"GET /v2/ HTTP"), Ordering::Relaxed);
                    }
                    if !queue.push(Instant::now() + sh.one_way, buf[..n].to_vec()) {
                        break;
                    }
                }
                queue.finish();
            })?
    };
    let writer = thread::Builder::new()
        .name("delay-write".into())
        .spawn(move || {
            let mut to = to;
            while let Some((due, data)) = queue.pop() {
                let now = Instant::now();
                if due > now {
                    thread::sleep(due - now);
                }
                if to.write_all(&data).is_err() {
                    // The receiver is gone: stop the reader too.
                    queue.close();
                    from.shutdown(Shutdown::Both).ok();
                    to.shutdown(Shutdown::Both).ok();
                    return;
                }
            }
            // The sender finished: pass the half-close on.
            to.shutdown(Shutdown::Write).ok();
        })?;
    Ok([reader, writer])
}

#[derive(Debug, Default)]
struct QueueState {
    items: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
    finished: bool,
    closed: bool,
}

/// A FIFO of stamped pieces, at most `capacity` bytes (one piece may exceed it when empty).
#[derive(Debug)]
struct DelayQueue {
    capacity: usize,
    state: Mutex<QueueState>,
    changed: Condvar,
}

impl DelayQueue {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            state: Mutex::new(QueueState::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for room, then appends. False once the writer has given up.
    fn push(&self, due: Instant, data: Vec<u8>) -> bool {
        let mut s = self.lock();
        while !s.closed && s.bytes > 0 && s.bytes + data.len() > self.capacity {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.closed {
            return false;
        }
        s.bytes += data.len();
        s.items.push_back((due, data));
        self.changed.notify_all();
        true
    }

    /// The next piece, or None when the reader finished and everything was delivered.
    fn pop(&self) -> Option<(Instant, Vec<u8>)> {
        let mut s = self.lock();
        loop {
            if let Some(item) = s.items.pop_front() {
                s.bytes -= item.1.len();
                self.changed.notify_all();
                return Some(item);
            }
            if s.finished || s.closed {
                return None;
            }
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The reader reached the end of its stream.
    fn finish(&self) {
        self.lock().finished = true;
        self.changed.notify_all();
    }

    /// The writer failed: drop what is queued and refuse more.
    fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        s.items.clear();
        s.bytes = 0;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_arrive_in_order_and_late_by_half_the_round_trip() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        thread::spawn(move || {
            let (mut c, _) = echo.accept().unwrap();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => c.write_all(&buf[..n]).unwrap(),
                }
            }
        });
        let rtt = Duration::from_millis(40);
        let proxy = DelayProxy::start(echo_addr, rtt, 1 << 20).unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let started = Instant::now();
        let mut c = TcpStream::connect(proxy.host()).unwrap();
        let mut w = c.try_clone().unwrap();
        let sent = data.clone();
        let writer = thread::spawn(move || {
            w.write_all(&sent).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        let mut first = None;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = c.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            first.get_or_insert_with(|| started.elapsed());
            back.extend_from_slice(&buf[..n]);
        }
        writer.join().unwrap();
        assert!(back == data, "echoed bytes differ");
        // Handshake (one RTT) plus there and back (one RTT).
        let first = first.unwrap();
        assert!(first >= rtt * 2, "first byte after {first:?}");
        assert!(first < rtt * 2 + Duration::from_millis(200), "{first:?}");
    }
}
