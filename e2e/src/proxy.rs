//! An HTTP proxy in front of a registry, for tests that count or disturb registry traffic.
//!
//! Each connection carries one request (`Connection: close` is forced upstream). The proxy
//! logs every request with the response status and body size, and can refuse requests,
//! strip `Range` headers (a registry that ignores ranges) or answer blob reads with a
//! redirect to another host name, as registries that use object storage do.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

/// One request that passed through the proxy.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub status: u16,
    /// Body bytes sent back to the client.
    pub body_bytes: u64,
}

#[derive(Debug, Default)]
struct State {
    log: Mutex<Vec<Logged>>,
    refuse: AtomicBool,
    ignore_range: AtomicBool,
    redirect_blobs: AtomicBool,
    delay_ms: std::sync::atomic::AtomicU64,
    /// Blob responses still to cut short, and after how many body bytes.
    cuts_left: AtomicUsize,
    cut_after: std::sync::atomic::AtomicU64,
    stop: AtomicBool,
    /// Connections accepted and not yet answered and logged.
    in_flight: AtomicUsize,
}

/// Counts a connection in [`State::in_flight`] from its accept until its handler is done.
struct Handling(Arc<State>);

impl Handling {
    fn new(state: Arc<State>) -> Self {
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(state)
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running proxy; stops accepting on drop.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    state: Arc<State>,
}

const REDIRECTED: &str = "/redirected";

impl Proxy {
    /// Starts a proxy on a random loopback port forwarding to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(State::default());
        let upstream = upstream.to_owned();
        let st = state.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                // Counted before the handler starts: a client holding a response knows its
                // request is counted or logged.
                let handling = Handling::new(st.clone());
                let upstream = upstream.clone();
                thread::spawn(move || {
                    handle(conn, &upstream, port, &handling.0).ok();
                });
            }
        });
        Ok(Self { port, state })
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Refuse every request with 503 (the registry "disappears") or serve again.
    pub fn set_refuse(&self, on: bool) {
        self.state.refuse.store(on, Ordering::SeqCst);
    }

    pub fn set_ignore_range(&self, on: bool) {
        self.state.ignore_range.store(on, Ordering::SeqCst);
    }

    /// Holds every request this long before forwarding it (a slow registry).
    pub fn set_delay(&self, delay: std::time::Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Cuts the next `count` blob responses off after `bytes` bytes of body (the connection
    /// drops mid-transfer, as a flaky network or a restarting registry does).
    pub fn cut_blob_bodies(&self, count: usize, bytes: u64) {
        self.state.cut_after.store(bytes, Ordering::SeqCst);
        self.state.cuts_left.store(count, Ordering::SeqCst);
    }

    pub fn set_redirect_blobs(&self, on: bool) {
        self.state.redirect_blobs.store(on, Ordering::SeqCst);
    }

    pub fn log(&self) -> Vec<Logged> {
        self.state.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn clear_log(&self) {
        if let Ok(mut l) = self.state.log.lock() {
            l.clear();
        }
    }

    /// Connections accepted and not yet done with. A request is logged once its response
    /// has gone through, a moment after the client has it: when this is 0, every request
    /// whose response a client has received is in [`Proxy::log`].
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// Blob GETs that returned data (not redirects).
    pub fn blob_reads(&self) -> Vec<Logged> {
        self.log()
            .into_iter()
            .filter(|l| l.method == "GET" && l.path.contains("/blobs/") && l.status / 100 == 2)
            .collect()
    }

    /// Total body bytes of blob reads.
    pub fn blob_bytes(&self) -> u64 {
        self.blob_reads().iter().map(|l| l.body_bytes).sum()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        TcpStream::connect(("127.0.0.1", self.port)).ok();
    }
}

fn handle(client: TcpStream, upstream: &str, own_port: u16, st: &State) -> anyhow::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let path = parts.next().unwrap_or("/").to_owned();
    let mut headers: Vec<(String, String)> = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let content_length: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body)?;
    let range = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("range"))
        .map(|(_, v)| v.clone());
    let mut client = client;
    let log = |status: u16, body_bytes: u64| {
        if let Ok(mut l) = st.log.lock() {
            l.push(Logged {
                method: method.clone(),
                path: path.clone(),
                range: range.clone(),
                status,
                body_bytes,
            });
        }
    };
    let delay = st.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        thread::sleep(std::time::Duration::from_millis(delay));
    }
    if st.refuse.load(Ordering::SeqCst) {
        client.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        log(503, 0);
        return Ok(());
    }
    let mut upstream_path = path.clone();
    if let Some(rest) = path.strip_prefix(REDIRECTED) {
        upstream_path = rest.to_owned();
    } else if st.redirect_blobs.load(Ordering::SeqCst)
        && method == "GET"
        && path.contains("/blobs/sha256:")
    {
        // "localhost" is another origin than "127.0.0.1" to an HTTP client.
        let location = format!("http://localhost:{own_port}{REDIRECTED}{path}");
        client.write_all(
            format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )?;
        log(307, 0);
        return Ok(());
    }
    let mut up = TcpStream::connect(upstream)?;
    let mut head = format!("{method} {upstream_path} HTTP/1.1\r\n");
    for (k, v) in &headers {
        if k.eq_ignore_ascii_case("connection")
            || (k.eq_ignore_ascii_case("range") && st.ignore_range.load(Ordering::SeqCst))
        {
            continue;
        }
        if k.eq_ignore_ascii_case("host") {
            head.push_str(&format!("Host: {upstream}\r\n"));
            continue;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    up.write_all(head.as_bytes())?;
    up.write_all(&body)?;
    let mut up_reader = BufReader::new(up);
    // Copy the response head, noting status and length, then the body.
    let mut status = 0u16;
    let mut first = true;
    let mut length: Option<u64> = None;
    loop {
        let mut line = String::new();
        if up_reader.read_line(&mut line)? == 0 {
            break;
        }
        if first {
            status = line
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            first = false;
        } else if let Some((k, v)) = line.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().ok();
        }
        client.write_all(line.as_bytes())?;
        if line == "\r\n" {
            break;
        }
    }
    // Relay the body; with a Content-Length, stop (and log) as soon as it has all gone
    // through rather than when the upstream closes, so tests see the log at once.
    let cut = (path.contains("/blobs/") && status / 100 == 2)
        .then(|| {
            st.cuts_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .ok()
                .map(|_| st.cut_after.load(Ordering::SeqCst))
        })
        .flatten();
    let length = match cut {
        Some(c) => Some(length.map_or(c, |l| l.min(c))),
        None => length,
    };
    let mut body_bytes = 0u64;
    let mut buf = [0u8; 64 * 1024];
    loop {
        let want = match length {
            Some(l) if body_bytes >= l => break,
            Some(l) => buf.len().min((l - body_bytes) as usize),
            None => buf.len(),
        };
        let n = up_reader.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        body_bytes += n as u64;
        if client.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    client.flush().ok();
    log(status, body_bytes);
    client.shutdown(Shutdown::Both).ok();
    Ok(())
}
