//! Registry credentials: explicit user/password, a bearer token, or a docker `config.json`
//! (the format of `kubernetes.io/dockerconfigjson` Secrets).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use base64::Engine as _;
use serde::Deserialize;

use crate::error::{Error, Result};

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum Credentials {
    #[default]
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
    /// A registry token used as-is (`identitytoken` / `registrytoken`).
    Bearer(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print secrets.
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            Credentials::Bearer(_) => f.write_str("Bearer(***)"),
        }
    }
}

impl Credentials {
    pub(crate) fn to_oci(&self) -> oci_client::secrets::RegistryAuth {
        use oci_client::secrets::RegistryAuth;
        match self {
            Credentials::Anonymous => RegistryAuth::Anonymous,
            Credentials::Basic { username, password } => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Credentials::Bearer(t) => RegistryAuth::Bearer(t.clone()),
        }
    }
}

#[derive(Debug, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Debug, Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
    registrytoken: Option<String>,
}

/// The `auths` of a docker config.json: credentials per registry host.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct DockerConfig {
    entries: BTreeMap<String, Credentials>,
}

impl fmt::Debug for DockerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.entries.keys()).finish()
    }
}

/// `https://index.docker.io/v1/`, `docker.io`, `registry-1.docker.io` are one registry.
fn normalise_host(key: &str) -> String {
    let k = key
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = k.split('/').next().unwrap_or(k).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".into(),
        _ => host,
    }
}

impl DockerConfig {
    /// Parses config.json bytes; `origin` names the source in errors.
    pub fn parse(bytes: &[u8], origin: &str) -> Result<Self> {
        let bad = |detail: String| Error::Credentials {
            path: origin.to_owned(),
            detail,
        };
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        if !value.is_object() {
            return Err(bad("not a docker config: expected a JSON object".into()));
        }
        let file: ConfigFile =
            serde_json::from_value(value).map_err(|e| bad(format!("not a docker config: {e}")))?;
        let mut entries = BTreeMap::new();
        for (key, e) in file.auths {
            let creds = if let Some(token) = e.registrytoken.or(e.identitytoken) {
                Credentials::Bearer(token)
            } else if let (Some(username), Some(password)) = (e.username, e.password) {
                Credentials::Basic { username, password }
            } else if let Some(auth) = e.auth {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|_| bad(format!("auths.{key}.auth is not base64")))?;
                let text = String::from_utf8(raw)
                    .map_err(|_| bad(format!("auths.{key}.auth is not text")))?;
                let (username, password) = text
                    .split_once(':')
                    .ok_or_else(|| bad(format!("auths.{key}.auth is not user:password")))?;
                Credentials::Basic {
                    username: username.into(),
                    password: password.into(),
                }
            } else {
                continue;
            };
            entries.insert(normalise_host(&key), creds);
        }
        Ok(Self { entries })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::Credentials {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        Self::parse(&bytes, &path.display().to_string())
    }

    /// Credentials for `registry` (a host, with port if any), or anonymous.
    pub fn credentials_for(&self, registry: &str) -> Credentials {
        self.entries
            .get(&normalise_host(registry))
            .cloned()
            .unwrap_or_default()
    }

    pub fn merge(&mut self, other: DockerConfig) {
        self.entries.extend(other.entries);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_field_and_docker_hub_aliases_are_understood() -> Result<()> {
        let cfg = DockerConfig::parse(
            br#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYTpzcw=="},
                 "reg.example:5000":{"username":"u","password":"p"},
                 "tok.example":{"identitytoken":"t0k"}}}"#,
            "test",
        )?;
        assert_eq!(
            cfg.credentials_for("registry-1.docker.io"),
            Credentials::Basic {
                username: "user".into(),
                password: "pa:ss".into()
            }
        );
        assert_eq!(
            cfg.credentials_for("reg.example:5000"),
            Credentials::Basic {
                username: "u".into(),
                password: "p".into()
            }
        );
        assert_eq!(
            cfg.credentials_for("tok.example"),
            Credentials::Bearer("t0k".into())
        );
        assert_eq!(cfg.credentials_for("other.example"), Credentials::Anonymous);
        Ok(())
    }

    #[test]
    fn malformed_configs_name_the_problem() {
        let e = DockerConfig::parse(br#"{"auths":{"x":{"auth":"%%%"}}}"#, "secret ns/regcred");
        let msg = e.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("secret ns/regcred") && msg.contains("base64"),
            "{msg}"
        );
        assert!(DockerConfig::parse(b"[]", "x").is_err());
    }

    #[test]
    fn secrets_are_not_printed() {
        let c = Credentials::Basic {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
