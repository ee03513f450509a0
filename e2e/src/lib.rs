//! clip-e2e: the shared test harness and the whole-system tests.
//!
//! The harness starts real services on random loopback ports and builds test images from
//! known content, so tests can check every byte. It does not depend on the crates it tests.
//!
//! - [`registry`]: Debian's `docker-registry` in a temporary directory, optionally with
//!   htpasswd auth; stopped on drop.
//! - [`proxy`]: an HTTP proxy in front of a registry that counts requests and bytes and can
//!   refuse requests, ignore `Range` or redirect blob reads.
//! - [`image`]: declarative test images (layers of files, links, devices, whiteouts) built
//!   into tar/gzip/zstd blobs and pushed with a minimal registry client.
//! - [`kube_api`]: a fake Kubernetes API server (tower-test) for controller and node tests.
//! - [`model`]: the expected merged tree of a test image, computed independently of clip.
//! - [`cleanup`]: guards that stop mount processes and detach mounts when a test fails.
//! - [`check`]: compares a mounted tree with the model, or with the reference extraction,
//!   field by field and byte by byte.
//! - [`extract`]: the reference extraction of a test image by GNU `tar`, whiteouts applied
//!   as a runtime applies them.
//! - [`fixtures`]: the standard test images.
//! - [`redis`]: a 6-process Redis Cluster (and a plain Redis) on loopback, optionally with a
//!   password, ACL users or TLS only (a CA and certificate made for the test).
//! - [`token`]: a registry token server (Bearer flow) with a self-signed signing certificate.
//! - [`http`]: the tiny blocking HTTP/1.1 client behind the above.
//! - [`forward`]: a plain TCP forwarder that counts connections (pooled-connection tests).
//! - [`node`]: how tests start `clip node` and `clip keeper` as processes.
//! - [`wait`]: polling until another process has done something.

pub mod check;
pub mod cleanup;
pub mod extract;
pub mod fixtures;
pub mod forward;
pub mod http;
pub mod image;
pub mod kube_api;
pub mod model;
pub mod node;
pub mod proxy;
pub mod redis;
pub mod registry;
pub mod token;
pub mod wait;

use std::net::TcpListener;

/// A free TCP port on 127.0.0.1 (bound and released; the caller binds it again).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A small deterministic random generator for test content.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

/// Text-like bytes that compress about as well as source code or shared-library symbols.
pub fn text_bytes(n: usize, seed: u64) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "import",
        "numpy",
        "def",
        "return",
        "self",
        "class",
        "lambda",
        "for",
        "in",
        "range",
        "libc.so.6",
        "GLIBC_2.34",
        "__cxa_finalize",
        "malloc",
        "0x7f",
        "error",
        "value",
        "\n",
        "    ",
        "(",
        ")",
        ":",
        "=",
        "[",
        "]",
    ];
    let mut rng = Rng(seed | 1);
    let mut out = Vec::with_capacity(n + 16);
    while out.len() < n {
        out.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes());
        out.push(b' ');
    }
    out.truncate(n);
    out
}
