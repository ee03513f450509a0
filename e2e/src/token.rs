//! A registry token server (the Bearer flow of the distribution spec) for tests: Basic
//! credentials in, a signed JWT out, with a lifetime the test chooses. Debian's
//! docker-registry trusts it through a self-signed certificate.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::Engine as _;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

pub const SERVICE: &str = "clip-test-registry";
pub const ISSUER: &str = "clip-test-issuer";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

struct Signer {
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    cert_pem: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer")
    }
}

fn new_signer() -> anyhow::Result<Signer> {
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = rcgen::CertificateParams::new(vec!["clip-test-token-issuer".to_owned()])?;
    let cert = params.self_signed(&key_pair)?;
    let rng = ring::rand::SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &key_pair.serialize_der(),
        &rng,
    )
    .map_err(|e| anyhow::anyhow!("loading the signing key: {e}"))?;
    Ok(Signer {
        key,
        cert_der: cert.der().to_vec(),
        cert_pem: cert.pem(),
    })
}

#[derive(Debug)]
struct Inner {
    signer: std::sync::Mutex<Signer>,
    user: String,
    password: String,
    /// Lifetime written into tokens (the `exp` claim).
    ttl_secs: AtomicU64,
    /// Lifetime announced to clients (`expires_in`), which may differ to test re-auth on 401.
    announced_secs: AtomicU64,
    issued: AtomicU64,
}

/// A running token server; its certificate is at [`TokenServer::cert_path`].
#[derive(Debug)]
pub struct TokenServer {
    inner: Arc<Inner>,
    port: u16,
    cert_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TokenServer {
    /// Serves tokens to `user`/`password` on a random loopback port.
    pub fn start(user: &str, password: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let signer = new_signer()?;
        let cert_path = dir.path().join("token-cert.pem");
        std::fs::write(&cert_path, &signer.cert_pem)?;
        let inner = Arc::new(Inner {
            signer: std::sync::Mutex::new(signer),
            user: user.to_owned(),
            password: password.to_owned(),
            ttl_secs: AtomicU64::new(300),
            announced_secs: AtomicU64::new(300),
            issued: AtomicU64::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let srv = inner.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let srv = srv.clone();
                std::thread::spawn(move || {
                    let _ = serve(&srv, conn);
                });
            }
        });
        Ok(Self {
            inner,
            port,
            cert_path,
            _dir: dir,
        })
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Tokens expire after `real` seconds while clients are told `announced` seconds.
    pub fn set_lifetime(&self, real: u64, announced: u64) {
        self.inner.ttl_secs.store(real, Ordering::SeqCst);
        self.inner.announced_secs.store(announced, Ordering::SeqCst);
    }

    /// Signs with a new key from now on and writes its certificate where the registry reads
    /// it: after a registry restart every earlier token is refused (401), as when tokens are
    /// revoked or the issuer rotates keys.
    pub fn rotate_key(&self) -> anyhow::Result<()> {
        let signer = new_signer()?;
        std::fs::write(&self.cert_path, &signer.cert_pem)?;
        *self.inner.signer.lock().unwrap_or_else(|p| p.into_inner()) = signer;
        Ok(())
    }

    /// Tokens handed out so far.
    pub fn issued(&self) -> u64 {
        self.inner.issued.load(Ordering::SeqCst)
    }

    /// A token for `repo` with `actions`, as if requested (for pushing test images).
    pub fn mint(&self, repo: &str, actions: &[&str]) -> anyhow::Result<String> {
        sign(
            &self.inner,
            &format!("repository:{repo}:{}", actions.join(",")),
        )
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn sign(inner: &Inner, scope: &str) -> anyhow::Result<String> {
    let signer = inner.signer.lock().unwrap_or_else(|p| p.into_inner());
    let header = serde_json::json!({
        "typ": "JWT",
        "alg": "ES256",
        "x5c": [base64::engine::general_purpose::STANDARD.encode(&signer.cert_der)],
    });
    let mut access = Vec::new();
    for s in scope.split(' ').filter(|s| !s.is_empty()) {
        let mut parts = s.splitn(3, ':');
        let (kind, name, actions) = (parts.next(), parts.next(), parts.next());
        if let (Some(kind), Some(name), Some(actions)) = (kind, name, actions) {
            access.push(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}));
        }
    }
    let t = now();
    let seq = inner.issued.fetch_add(1, Ordering::SeqCst);
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": inner.user, "aud": SERVICE,
        "exp": t + inner.ttl_secs.load(Ordering::SeqCst), "nbf": t.saturating_sub(30), "iat": t,
        "jti": format!("clip-test-{seq}"), "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64(&serde_json::to_vec(&header)?),
        b64(&serde_json::to_vec(&claims)?)
    );
    let rng = ring::rand::SystemRandom::new();
    let sig = signer
        .key
        .sign(&rng, signing_input.as_bytes())
        .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
    Ok(format!("{signing_input}.{}", b64(sig.as_ref())))
}

fn serve(inner: &Inner, conn: TcpStream) -> anyhow::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut authorization = None;
    let mut content_length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_owned());
            } else if k.eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body)?;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", inner.user, inner.password))
    );
    let mut conn = conn;
    if authorization.as_deref() != Some(expected.as_str()) {
        conn.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    }
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or_default();
    let mut scope = String::new();
    for pair in query.split('&') {
        if let Some(v) = pair.strip_prefix("scope=") {
            let v = v
                .replace('+', " ")
                .replace("%3A", ":")
                .replace("%3a", ":")
                .replace("%2C", ",")
                .replace("%2c", ",")
                .replace("%2F", "/")
                .replace("%2f", "/");
            scope.push_str(&v);
            scope.push(' ');
        }
    }
    let token = sign(inner, &scope).context("signing a token")?;
    let reply = serde_json::json!({
        "token": token, "access_token": token,
        "expires_in": inner.announced_secs.load(Ordering::SeqCst),
    });
    let body = serde_json::to_vec(&reply)?;
    conn.write_all(
        format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
            .as_bytes(),
    )?;
    conn.write_all(&body)?;
    Ok(())
}
