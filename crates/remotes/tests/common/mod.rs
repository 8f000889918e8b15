//! Test support: a real `docker-registry` on 127.0.0.1 (plain, TLS, htpasswd or token
//! auth), a tiny scripted HTTP server for misbehaving registries and token endpoints,
//! certificates, and images pushed with Berth's own client.
#![allow(dead_code)]

use base64::Engine;
use berth_core::content::ReaderAt;
use berth_remotes::auth::StaticCredentials;
use berth_remotes::client::{HostsFn, PushOutcome};
use berth_remotes::hosts::{AuthConfig, HostOptions};
use berth_remotes::manifest::{self, OCI_INDEX, OCI_MANIFEST};
use berth_remotes::{Reference, Resolver, ResolverOptions};
use bytes::Bytes;
use oci_spec::image::Descriptor;
use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "docker-registry exited ({st}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "docker-registry did not listen on {port}: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// Certificates made for one test.
pub struct Pki {
    pub dir: PathBuf,
    pub ca_pem: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A self-signed cert + key (PKCS#8 DER) used to sign tokens.
    pub token_cert: PathBuf,
    pub token_cert_der: Vec<u8>,
    pub token_key_pkcs8: Vec<u8>,
}

impl Pki {
    pub fn generate(dir: &Path) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "berth test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>, cn: &str| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(names).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            let cert = p.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (scert, skey) = leaf(vec!["localhost".into(), "127.0.0.1".into()], "localhost");
        let (ccert, ckey) = leaf(vec![], "berth test client");
        let tkey = KeyPair::generate().unwrap();
        let mut tp = CertificateParams::new(Vec::<String>::new()).unwrap();
        tp.distinguished_name
            .push(DnType::CommonName, "token signer");
        let tcert = tp.self_signed(&tkey).unwrap();
        let w = |name: &str, data: &str| {
            let p = dir.join(name);
            std::fs::write(&p, data).unwrap();
            p
        };
        Pki {
            dir: dir.to_path_buf(),
            ca_pem: w("ca.pem", &ca_cert.pem()),
            server_cert: w("server.pem", &scert),
            server_key: w("server-key.pem", &skey),
            client_cert: w("client.pem", &ccert),
            client_key: w("client-key.pem", &ckey),
            token_cert: w("token.pem", &tcert.pem()),
            token_cert_der: tcert.der().to_vec(),
            token_key_pkcs8: tkey.serialize_der(),
        }
    }
}

#[derive(Default)]
pub struct RegistryConfig {
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Require client certificates signed by this CA.
    pub client_ca: Option<PathBuf>,
    /// (user, password) checked through an htpasswd file.
    pub htpasswd: Option<(String, String)>,
    /// (realm URL, token signing cert) for token auth.
    pub token: Option<(String, PathBuf)>,
}

/// A `docker-registry` process on a free port with private storage; killed on drop.
pub struct Registry {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Child,
}

pub const TOKEN_SERVICE: &str = "berth-test-registry";
pub const TOKEN_ISSUER: &str = "berth-test-issuer";

impl Registry {
    pub fn start(cfg: RegistryConfig) -> Registry {
        assert!(
            Path::new("/usr/bin/docker-registry").exists(),
            "docker-registry is not installed (apt install docker-registry)"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut y = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: berth-test\n",
            dir.path().join("data").display()
        );
        if let Some((cert, key)) = &cfg.tls {
            y.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
            if let Some(ca) = &cfg.client_ca {
                y.push_str(&format!("    clientcas:\n      - {}\n", ca.display()));
            }
        }
        if let Some((user, pass)) = &cfg.htpasswd {
            let h = bcrypt::hash_with_result(pass, 4)
                .unwrap()
                .format_for_version(bcrypt::Version::TwoY);
            let p = dir.path().join("htpasswd");
            std::fs::write(&p, format!("{user}:{h}\n")).unwrap();
            y.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n",
                p.display()
            ));
        }
        if let Some((realm, cert)) = &cfg.token {
            y.push_str(&format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                cert.display()
            ));
        }
        let conf = dir.path().join("config.yml");
        std::fs::write(&conf, y).unwrap();
        let log = dir.path().join("registry.log");
        let mut child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("registry.err")).unwrap())
            .spawn()
            .expect("starting docker-registry");
        wait_port(port, &mut child, &dir.path().join("registry.err"));
        Registry { port, dir, child }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.err")).unwrap_or_default()
    }

    /// Kills the registry now (a dead host for fallback tests).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A resolver whose hosts come from `config_path` (or defaults) and credentials map.
pub fn resolver(config_path: Option<&Path>, creds: &[(&str, &str, &str)]) -> Resolver {
    let mut opts = ResolverOptions::with_hosts(HostOptions {
        config_path: config_path.map(|p| p.display().to_string()),
        default_scheme: None,
    });
    let mut c = StaticCredentials::default();
    for (host, u, p) in creds {
        c.insert(
            host,
            AuthConfig {
                username: u.to_string(),
                password: p.to_string(),
                identity_token: String::new(),
            },
        );
    }
    opts.credentials = Arc::new(c);
    opts.backoff = Duration::from_millis(20);
    Resolver::new(opts)
}

pub fn resolver_with_hosts(hosts: HostsFn) -> Resolver {
    Resolver::new(ResolverOptions {
        hosts,
        backoff: Duration::from_millis(20),
        ..Default::default()
    })
}

/// Writes `<root>/<host dir>/hosts.toml`.
pub fn write_hosts_toml(root: &Path, dir: &str, text: &str) {
    let d = root.join(dir);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("hosts.toml"), text).unwrap();
}

pub struct MemReader(pub Bytes);

impl ReaderAt for MemReader {
    fn size(&self) -> i64 {
        self.0.len() as i64
    }
    fn read_at(&self, buf: &mut [u8], offset: i64) -> berth_core::Result<usize> {
        let off = offset as usize;
        if off >= self.0.len() {
            return Ok(0);
        }
        let n = buf.len().min(self.0.len() - off);
        buf[..n].copy_from_slice(&self.0[off..off + n]);
        Ok(n)
    }
}

/// Deterministic pseudo-random bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub const LAYER_MT: &str = "application/vnd.oci.image.layer.v1.tar";
pub const CONFIG_MT: &str = "application/vnd.oci.image.config.v1+json";

/// An image made in memory: its blobs and manifest.
pub struct TestImage {
    pub config: (Descriptor, Bytes),
    pub layers: Vec<(Descriptor, Bytes)>,
    pub manifest: (Descriptor, Bytes),
}

pub fn make_image(arch: &str, layers: Vec<Vec<u8>>) -> TestImage {
    let layers: Vec<(Descriptor, Bytes)> = layers
        .into_iter()
        .map(|l| (manifest::descriptor_for(LAYER_MT, &l), Bytes::from(l)))
        .collect();
    let diff_ids: Vec<String> = layers.iter().map(|(d, _)| d.digest().to_string()).collect();
    let config = serde_json::json!({
        "architecture": arch, "os": "linux",
        "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = Bytes::from(serde_json::to_vec(&config).unwrap());
    let config_desc = manifest::descriptor_for(CONFIG_MT, &config);
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": desc_json(&config_desc),
        "layers": layers.iter().map(|(d, _)| desc_json(d)).collect::<Vec<_>>(),
    });
    let m = Bytes::from(serde_json::to_vec(&m).unwrap());
    TestImage {
        manifest: (manifest::descriptor_for(OCI_MANIFEST, &m), m),
        config: (config_desc, config),
        layers,
    }
}

pub fn desc_json(d: &Descriptor) -> serde_json::Value {
    serde_json::json!({"mediaType": d.media_type().to_string(), "digest": d.digest().to_string(), "size": d.size()})
}

/// An index over images with their platforms.
pub fn make_index(entries: &[(&TestImage, &str)]) -> (Descriptor, Bytes) {
    let ms: Vec<_> = entries
        .iter()
        .map(|(img, arch)| {
            let mut j = desc_json(&img.manifest.0);
            j["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
            j
        })
        .collect();
    let idx = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": ms});
    let b = Bytes::from(serde_json::to_vec(&idx).unwrap());
    (manifest::descriptor_for(OCI_INDEX, &b), b)
}

/// Pushes an image's blobs and manifest (tagged `reference`'s tag if `tag`, else by digest).
pub async fn push_image(
    r: &Resolver,
    reference: &Reference,
    img: &TestImage,
    tag: bool,
) -> Vec<PushOutcome> {
    let mut out = vec![];
    for (d, b) in std::iter::once(&img.config).chain(img.layers.iter()) {
        out.push(
            r.push_blob(reference, d, Arc::new(MemReader(b.clone())), None)
                .await
                .unwrap(),
        );
    }
    let mut target = reference.clone();
    if !tag {
        target.tag = None;
    }
    r.push_manifest(&target, &img.manifest.0, img.manifest.1.clone())
        .await
        .unwrap();
    out
}

/// A request seen by a [`FakeServer`].
#[derive(Debug, Clone)]
pub struct FakeRequest {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

pub struct FakeResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Send this many bytes of the body, then drop the connection.
    pub cut_after: Option<usize>,
}

impl FakeResponse {
    pub fn new(status: u16) -> FakeResponse {
        FakeResponse {
            status,
            headers: vec![],
            body: vec![],
            cut_after: None,
        }
    }
    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.body = b.into();
        self
    }
    pub fn header(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
}

type Handler = Arc<dyn Fn(&FakeRequest) -> FakeResponse + Send + Sync>;

/// A scripted HTTP/1.1 server on 127.0.0.1 (one request per connection).
pub struct FakeServer {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<FakeRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeServer {
    pub async fn start(
        handler: impl Fn(&FakeRequest) -> FakeResponse + Send + Sync + 'static,
    ) -> FakeServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(vec![]));
        let handler: Handler = Arc::new(handler);
        let reqs = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let handler = handler.clone();
                let reqs = reqs.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut tmp = [0u8; 4096];
                    let head_end = loop {
                        let Ok(n) = sock.read(&mut tmp).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&tmp[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let mut lines = head.split("\r\n");
                    let mut first = lines.next().unwrap_or_default().split(' ');
                    let method = first.next().unwrap_or_default().to_string();
                    let path = first.next().unwrap_or_default().to_string();
                    let headers: HashMap<String, String> = lines
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                        .collect();
                    let len: usize = headers
                        .get("content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    let mut body = buf[head_end..].to_vec();
                    while body.len() < len {
                        let Ok(n) = sock.read(&mut tmp).await else {
                            return;
                        };
                        if n == 0 {
                            break;
                        }
                        body.extend_from_slice(&tmp[..n]);
                    }
                    let req = FakeRequest {
                        method,
                        path,
                        headers,
                        body,
                    };
                    reqs.lock().unwrap().push(req.clone());
                    let resp = handler(&req);
                    let mut out = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", resp.status);
                    let has_len = resp
                        .headers
                        .iter()
                        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
                    for (k, v) in &resp.headers {
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                    if !has_len {
                        out.push_str(&format!("Content-Length: {}\r\n", resp.body.len()));
                    }
                    out.push_str("\r\n");
                    let _ = sock.write_all(out.as_bytes()).await;
                    if req.method != "HEAD" {
                        let n = resp
                            .cut_after
                            .unwrap_or(resp.body.len())
                            .min(resp.body.len());
                        let _ = sock.write_all(&resp.body[..n]).await;
                    }
                    let _ = sock.flush().await;
                });
            }
        });
        FakeServer {
            port,
            requests,
            task,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> Vec<FakeRequest> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// A token server for docker-registry's token auth: checks basic credentials and signs
/// an ES256 JWT (x5c header) granting what was asked.
pub async fn token_server(pki: &Pki, user: &str, pass: &str) -> FakeServer {
    let key = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &pki.token_key_pkcs8,
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    let x5c = base64::engine::general_purpose::STANDARD.encode(&pki.token_cert_der);
    let want = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    );
    FakeServer::start(move |req| {
        if req.headers.get("authorization") != Some(&want) {
            return FakeResponse::new(401).body(r#"{"details":"bad credentials"}"#);
        }
        let url = url::Url::parse(&format!("http://x{}", req.path)).unwrap();
        let mut access = vec![];
        for (k, v) in url.query_pairs() {
            if k == "scope" {
                let parts: Vec<&str> = v.split(':').collect();
                if parts.len() == 3 {
                    access.push(serde_json::json!({
                        "type": parts[0], "name": parts[1],
                        "actions": parts[2].split(',').collect::<Vec<_>>()
                    }));
                }
            }
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [x5c]});
        let claims = serde_json::json!({
            "iss": TOKEN_ISSUER, "sub": "tester", "aud": TOKEN_SERVICE,
            "exp": now + 300, "nbf": now - 10, "iat": now - 10, "jti": format!("{now}-{}", access.len()),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            b64url(&serde_json::to_vec(&header).unwrap()),
            b64url(&serde_json::to_vec(&claims).unwrap())
        );
        let sig = key.sign(&ring::rand::SystemRandom::new(), signing_input.as_bytes()).unwrap();
        let token = format!("{signing_input}.{}", b64url(sig.as_ref()));
        FakeResponse::new(200)
            .header("Content-Type", "application/json")
            .body(serde_json::to_vec(&serde_json::json!({"token": token, "expires_in": 300})).unwrap())
    })
    .await
}

/// Files under `dir` (relative paths), sorted.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

pub fn write_file(p: &Path, data: &[u8]) {
    std::fs::File::create(p).unwrap().write_all(data).unwrap();
}
