//! Registry authentication: `WWW-Authenticate` challenges, credentials (static or from a
//! Docker `config.json`), bearer tokens and basic auth.
//!
//! Credentials are looked up by the host that *asked* for them (the host whose response
//! carried the challenge) and are only ever attached to requests to that same host;
//! tokens are cached per host and scope set.

use crate::hosts::AuthConfig;
use base64::Engine;
use berth_core::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Largest token response read (1 MiB): a token endpoint cannot make us buffer more.
pub const MAX_TOKEN_RESPONSE: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthScheme {
    Basic,
    Bearer,
    Other(String),
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: AuthScheme,
    /// Parameter names lower-cased (`realm`, `service`, `scope`).
    pub params: BTreeMap<String, String>,
}

/// Parses a `WWW-Authenticate` header value into its challenges (RFC 7235: several
/// challenges may share one header, parameters are tokens or quoted strings).
pub fn parse_www_authenticate(header: &str) -> Vec<Challenge> {
    let b = header.as_bytes();
    let mut i = 0;
    let mut out: Vec<Challenge> = vec![];
    let is_tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/=".contains(&c);
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t' || b[*i] == b',') {
            *i += 1;
        }
    };
    while i < b.len() {
        skip_ws(&mut i);
        let start = i;
        while i < b.len() && is_tchar(b[i]) && b[i] != b'=' {
            i += 1;
        }
        if start == i {
            i += 1;
            continue;
        }
        let word = &header[start..i];
        // Is this a parameter (`name=`) of the current challenge, or a new scheme?
        let mut j = i;
        while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
            j += 1;
        }
        if j < b.len() && b[j] == b'=' && !out.is_empty() {
            i = j + 1;
            while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
                i += 1;
            }
            let value = if i < b.len() && b[i] == b'"' {
                i += 1;
                let mut v = String::new();
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    // Copy one UTF-8 character.
                    let ch = header[i..].chars().next().unwrap_or('\u{fffd}');
                    v.push(ch);
                    i += ch.len_utf8();
                }
                i += 1;
                v
            } else {
                let s = i;
                while i < b.len() && b[i] != b',' && b[i] != b' ' {
                    i += 1;
                }
                header[s..i].to_string()
            };
            if let Some(c) = out.last_mut() {
                c.params.insert(word.to_ascii_lowercase(), value);
            }
        } else {
            let scheme = match word.to_ascii_lowercase().as_str() {
                "basic" => AuthScheme::Basic,
                "bearer" => AuthScheme::Bearer,
                _ => AuthScheme::Other(word.to_string()),
            };
            out.push(Challenge {
                scheme,
                params: BTreeMap::new(),
            });
        }
    }
    out
}

/// Where credentials come from; called with the host that sent the challenge.
#[async_trait::async_trait]
pub trait CredentialsProvider: Send + Sync {
    fn credentials(&self, host: &str) -> Option<AuthConfig>;

    /// What the resolver calls when `host` challenges a request (only then, and only
    /// for that host): by default [`CredentialsProvider::credentials`]. A provider that
    /// has to ask someone (berthd asks the client's auth stream, as containerd's
    /// transfer service does) overrides this.
    async fn credentials_for(&self, host: &str) -> Option<AuthConfig> {
        self.credentials(host)
    }
}

/// A fixed map from registry host to credential. `docker.io`, `index.docker.io` and
/// `registry-1.docker.io` are one registry.
#[derive(Debug, Clone, Default)]
pub struct StaticCredentials {
    pub auths: BTreeMap<String, AuthConfig>,
}

fn normalize_auth_key(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let k = k.split('/').next().unwrap_or_default();
    match k {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".into(),
        _ => k.to_string(),
    }
}

impl StaticCredentials {
    pub fn insert(&mut self, host: &str, auth: AuthConfig) {
        self.auths.insert(normalize_auth_key(host), auth);
    }

    /// Reads a Docker `config.json` (`auths.<host>.auth` base64 `user:pass`, or
    /// `username`/`password`, or `identitytoken`). Credential helpers are not run.
    pub fn from_docker_config(path: &Path) -> Result<StaticCredentials> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::unknown(format!("reading {}: {e}", path.display())))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::invalid_argument(format!("{}: {e}", path.display())))?;
        let mut out = StaticCredentials::default();
        if let Some(auths) = v.get("auths").and_then(|a| a.as_object()) {
            for (host, entry) in auths {
                let s = |k: &str| {
                    entry
                        .get(k)
                        .and_then(|x| x.as_str())
                        .unwrap_or_default()
                        .to_string()
                };
                let mut a = AuthConfig {
                    username: s("username"),
                    password: s("password"),
                    identity_token: s("identitytoken"),
                };
                let enc = s("auth");
                if !enc.is_empty() {
                    let (u, p) = decode_basic_auth(&enc)
                        .map_err(|e| e.context(format!("{}: auths.{host}", path.display())))?;
                    a.username = u;
                    a.password = p;
                }
                out.insert(host, a);
            }
        }
        if v.get("credsStore").is_some() || v.get("credHelpers").is_some() {
            tracing::warn!(path = %path.display(), "credential helpers are not supported; using inline auths only");
        }
        Ok(out)
    }

    /// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`, if present.
    pub fn from_default_docker_config() -> Result<StaticCredentials> {
        let dir = std::env::var_os("DOCKER_CONFIG")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".docker")));
        match dir.map(|d| d.join("config.json")) {
            Some(p) if p.exists() => Self::from_docker_config(&p),
            _ => Ok(StaticCredentials::default()),
        }
    }
}

impl CredentialsProvider for StaticCredentials {
    fn credentials(&self, host: &str) -> Option<AuthConfig> {
        self.auths.get(&normalize_auth_key(host)).cloned()
    }
}

/// Decodes Docker's `auth` field: base64 of `user:password`.
pub fn decode_basic_auth(encoded: &str) -> Result<(String, String)> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| Error::invalid_argument(format!("invalid auth field: {e}")))?;
    let s = String::from_utf8(raw)
        .map_err(|_| Error::invalid_argument("invalid auth field: not UTF-8"))?;
    let (u, p) = s
        .split_once(':')
        .ok_or_else(|| Error::invalid_argument("invalid auth field: no ':'"))?;
    Ok((u.to_string(), p.to_string()))
}

pub fn basic_header(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

#[derive(Debug, Clone)]
enum HostAuth {
    Basic(String),
    Bearer {
        realm: String,
        service: Option<String>,
        /// Scopes the registry's challenge asked for (added to ours).
        challenge_scope: Option<String>,
    },
}

#[derive(Debug, Clone)]
struct CachedToken {
    token: String,
    expires: Instant,
}

/// Per-host authentication state, shared by every request of a resolver.
#[derive(Default)]
pub struct Authorizer {
    hosts: Mutex<HashMap<String, HostAuth>>,
    tokens: Mutex<HashMap<(String, String), CachedToken>>,
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: String,
    #[serde(default)]
    access_token: String,
    #[serde(default)]
    expires_in: u64,
}

impl Authorizer {
    /// The `Authorization` value for a request to `host` under `scopes`, if a challenge
    /// from `host` was answered before (a cached token, or basic credentials).
    pub fn header_for(&self, host: &str, scopes: &[String]) -> Option<String> {
        let state = self.hosts.lock().unwrap().get(host).cloned()?;
        match state {
            HostAuth::Basic(h) => Some(h),
            HostAuth::Bearer { .. } => {
                let key = (host.to_string(), scopes.join(" "));
                let tokens = self.tokens.lock().unwrap();
                tokens
                    .get(&key)
                    .filter(|t| t.expires > Instant::now())
                    .map(|t| format!("Bearer {}", t.token))
            }
        }
    }

    /// Answers a 401 from `host`: records how the host wants to be authenticated and
    /// fetches a token when it asks for one. Returns false when nothing can be done (no
    /// usable challenge, or basic auth without credentials).
    pub async fn handle_challenge(
        &self,
        client: &reqwest::Client,
        host: &str,
        header: &str,
        scopes: &[String],
        creds: Option<AuthConfig>,
    ) -> Result<bool> {
        let challenges = parse_www_authenticate(header);
        if let Some(c) = challenges.iter().find(|c| c.scheme == AuthScheme::Bearer) {
            let Some(realm) = c.params.get("realm").cloned() else {
                return Err(Error::invalid_argument(format!(
                    "{host}: bearer challenge without realm"
                )));
            };
            let state = HostAuth::Bearer {
                realm,
                service: c.params.get("service").cloned(),
                challenge_scope: c.params.get("scope").cloned(),
            };
            self.hosts
                .lock()
                .unwrap()
                .insert(host.to_string(), state.clone());
            let token = self
                .fetch_token(client, host, &state, scopes, creds)
                .await?;
            self.tokens
                .lock()
                .unwrap()
                .insert((host.to_string(), scopes.join(" ")), token);
            return Ok(true);
        }
        if challenges.iter().any(|c| c.scheme == AuthScheme::Basic) {
            let Some(a) = creds.filter(|a| !a.username.is_empty()) else {
                return Ok(false);
            };
            let h = basic_header(&a.username, &a.password);
            let mut hosts = self.hosts.lock().unwrap();
            if let Some(HostAuth::Basic(old)) = hosts.get(host)
                && *old == h
            {
                return Ok(false); // the same credentials were already refused
            }
            hosts.insert(host.to_string(), HostAuth::Basic(h));
            return Ok(true);
        }
        Ok(false)
    }

    async fn fetch_token(
        &self,
        client: &reqwest::Client,
        host: &str,
        state: &HostAuth,
        scopes: &[String],
        creds: Option<AuthConfig>,
    ) -> Result<CachedToken> {
        let HostAuth::Bearer {
            realm,
            service,
            challenge_scope,
        } = state
        else {
            unreachable!()
        };
        let mut all_scopes: Vec<String> = scopes.to_vec();
        if let Some(cs) = challenge_scope {
            for s in cs.split(' ') {
                if !s.is_empty() && !all_scopes.iter().any(|x| x == s) {
                    all_scopes.push(s.to_string());
                }
            }
        }
        let realm_url = url::Url::parse(realm).map_err(|e| {
            Error::invalid_argument(format!("{host}: invalid token realm {realm:?}: {e}"))
        })?;
        let creds = creds.unwrap_or_default();
        let resp = if !creds.identity_token.is_empty() {
            // OAuth2 refresh-token grant (what `docker login` stores as identitytoken).
            let mut form: Vec<(&str, String)> = vec![
                ("grant_type", "refresh_token".into()),
                ("refresh_token", creds.identity_token.clone()),
                ("client_id", "berth".into()),
            ];
            if let Some(s) = service {
                form.push(("service", s.clone()));
            }
            if !all_scopes.is_empty() {
                form.push(("scope", all_scopes.join(" ")));
            }
            let body = form
                .iter()
                .map(|(k, v)| format!("{k}={}", urlencode(v)))
                .collect::<Vec<_>>()
                .join("&");
            client
                .post(realm_url)
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(body)
                .send()
                .await
        } else {
            let mut u = realm_url;
            {
                let mut q = u.query_pairs_mut();
                if let Some(s) = service {
                    q.append_pair("service", s);
                }
                for s in &all_scopes {
                    q.append_pair("scope", s);
                }
            }
            let mut req = client.get(u);
            if !creds.username.is_empty() {
                req = req.header(
                    "Authorization",
                    basic_header(&creds.username, &creds.password),
                );
            }
            req.send().await
        };
        let resp = resp
            .map_err(|e| Error::unavailable(format!("{host}: fetching token from {realm}: {e}")))?;
        let status = resp.status();
        let body =
            crate::client::read_bounded(resp, MAX_TOKEN_RESPONSE as u64, "token response").await?;
        if !status.is_success() {
            return Err(Error::with_message(
                berth_core::error::ErrorKind::Unknown,
                format!(
                    "{host}: token request to {realm} failed: {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ),
            ));
        }
        let t: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| Error::invalid_argument(format!("{host}: invalid token response: {e}")))?;
        let token = if t.token.is_empty() {
            t.access_token
        } else {
            t.token
        };
        if token.is_empty() {
            return Err(Error::invalid_argument(format!(
                "{host}: token response without a token"
            )));
        }
        let secs = if t.expires_in == 0 {
            60
        } else {
            t.expires_in.min(3600)
        };
        Ok(CachedToken {
            token,
            // Refresh a little before the server's expiry.
            expires: Instant::now() + Duration::from_secs(secs.saturating_sub(5).max(1)),
        })
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let c = parse_www_authenticate(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, AuthScheme::Bearer);
        assert_eq!(c[0].params["realm"], "https://auth.example/token");
        assert_eq!(c[0].params["scope"], "repository:a/b:pull,push");
        let c = parse_www_authenticate(
            r#"Basic realm="x \"q\"", Bearer realm=r2, error=invalid_token"#,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].params["realm"], "x \"q\"");
        assert_eq!(c[1].params["realm"], "r2");
        assert_eq!(c[1].params["error"], "invalid_token");
        assert!(parse_www_authenticate("").is_empty());
    }

    #[test]
    fn docker_config() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(
            &p,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},"localhost:5000":{"username":"a","password":"b"}}}"#,
        )
        .unwrap();
        let c = StaticCredentials::from_docker_config(&p).unwrap();
        assert_eq!(c.credentials("registry-1.docker.io").unwrap().username, "u");
        assert_eq!(c.credentials("localhost:5000").unwrap().password, "b");
        assert!(c.credentials("other:5000").is_none());
    }
}
