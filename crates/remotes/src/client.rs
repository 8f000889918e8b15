//! The registry client: resolver, fetcher and pusher over the distribution spec v2.
//!
//! Every operation walks the registry's hosts (from [`crate::hosts`]) in order, using
//! only hosts with the needed capability (`resolve` to resolve a tag, `pull` to fetch,
//! `push` to push), and falls back to the next host when one fails.
//!
//! Requests to a host carry that host's configured headers and, once it challenged us,
//! its credentials; a request to any other host (a redirect to blob storage, a foreign
//! layer URL) carries neither. GET/HEAD requests are retried with exponential backoff on
//! connection errors, 429 and 5xx.

use crate::auth::{Authorizer, CredentialsProvider, StaticCredentials};
use crate::hosts::{HostOptions, RegistryHost, TlsSettings};
use crate::manifest::{self, MANIFEST_ACCEPT};
use crate::reference::Reference;
use berth_core::content::{Digest, ReaderAt};
use berth_core::error::ErrorKind;
use berth_core::{Error, Result};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use oci_spec::image::Descriptor;
use reqwest::{Method, StatusCode};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Returns the ordered endpoints of a registry host name.
pub type HostsFn = Arc<dyn Fn(&str) -> Result<Vec<RegistryHost>> + Send + Sync>;

/// How a [`Resolver`] behaves.
#[derive(Clone)]
pub struct ResolverOptions {
    pub hosts: HostsFn,
    pub credentials: Arc<dyn CredentialsProvider>,
    /// Extra attempts of a failed GET/HEAD (connection error, 429, 5xx).
    pub retries: u32,
    /// First backoff delay; doubled per attempt, with jitter.
    pub backoff: Duration,
    pub max_manifest_size: u64,
    /// Blobs up to this size are uploaded in one PUT; larger ones in PATCH chunks of it.
    pub chunk_size: u64,
    pub user_agent: String,
}

impl Default for ResolverOptions {
    fn default() -> Self {
        ResolverOptions::with_hosts(HostOptions::default())
    }
}

impl ResolverOptions {
    /// Options whose hosts come from containerd-style host configuration.
    pub fn with_hosts(opts: HostOptions) -> ResolverOptions {
        ResolverOptions {
            hosts: Arc::new(move |h: &str| crate::hosts::configure_hosts(&opts, h)),
            credentials: Arc::new(StaticCredentials::default()),
            retries: 3,
            backoff: Duration::from_millis(200),
            max_manifest_size: manifest::MAX_MANIFEST_SIZE,
            chunk_size: 16 << 20,
            user_agent: format!("berth/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// A reference resolved to the descriptor of its top-level object.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub reference: Reference,
    pub descriptor: Descriptor,
    /// The host that answered (`scheme://host`), for messages.
    pub host: String,
}

/// A blob body starting at `offset`.
pub struct BlobStream {
    /// Where the body starts (0 when the server ignored a range request).
    pub offset: u64,
    pub stream: BoxStream<'static, Result<Bytes>>,
}

/// What a blob push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    Exists,
    Mounted,
    Uploaded,
}

struct Inner {
    opts: ResolverOptions,
    clients: Mutex<HashMap<TlsSettings, reqwest::Client>>,
    auth: Authorizer,
    /// Hosts (`scheme://host`) that could not be reached, and when: tried last for a while.
    unreachable: Mutex<HashMap<String, std::time::Instant>>,
}

/// How long an unreachable host is tried after the others.
const UNREACHABLE_FOR: Duration = Duration::from_secs(30);

/// The registry client. Cheap to clone; clones share connections and tokens.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

struct Req<'a> {
    method: Method,
    url: url::Url,
    headers: Vec<(&'static str, String)>,
    body: Option<Bytes>,
    scopes: &'a [String],
}

fn system_roots() -> &'static Vec<rustls_pki_types::CertificateDer<'static>> {
    static ROOTS: OnceLock<Vec<rustls_pki_types::CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let r = rustls_native_certs::load_native_certs();
        for e in &r.errors {
            tracing::debug!("loading system roots: {e}");
        }
        r.certs
    })
}

#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Builds the rustls configuration of one host: system roots plus its CAs, its client
/// certificate, or no verification at all with `skip_verify`.
pub fn tls_config(tls: &TlsSettings) -> Result<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::unknown(format!("TLS setup: {e}")))?;
    let builder = if tls.skip_verify == Some(true) {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        let (_, _ignored) = roots.add_parsable_certificates(system_roots().iter().cloned());
        for ca in &tls.ca {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
                .and_then(|it| it.collect::<std::result::Result<_, _>>())
                .map_err(|e| {
                    Error::invalid_argument(format!("unable to read CA cert {}: {e}", ca.display()))
                })?;
            if certs.is_empty() {
                return Err(Error::invalid_argument(format!(
                    "unable to load CA cert {}: no certificate in file",
                    ca.display()
                )));
            }
            for c in certs {
                roots.add(c).map_err(|e| {
                    Error::invalid_argument(format!("unable to load CA cert {}: {e}", ca.display()))
                })?;
            }
        }
        builder.with_root_certificates(roots)
    };
    let mut cfg = match tls.client.first() {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            if tls.client.len() > 1 {
                tracing::warn!("only the first client certificate of a host is used");
            }
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<std::result::Result<_, _>>())
                .map_err(|e| {
                    Error::invalid_argument(format!(
                        "unable to read CERT file {}: {e}",
                        cert.display()
                    ))
                })?;
            let key_file = key.as_ref().unwrap_or(cert);
            let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
                Error::invalid_argument(format!(
                    "unable to read key file {}: {e}",
                    key_file.display()
                ))
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                Error::invalid_argument(format!("failed to load X509 key pair: {e}"))
            })?
        }
    };
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// `host[:port]` of a URL, the way hosts are written in configuration.
fn authority(u: &url::Url) -> String {
    let h = u.host_str().unwrap_or_default();
    let h = if h.contains(':') && !h.starts_with('[') {
        format!("[{h}]")
    } else {
        h.to_string()
    };
    match u.port() {
        Some(p) => format!("{h}:{p}"),
        None => h,
    }
}

/// Reads a whole body, failing as soon as it exceeds `max` bytes.
pub async fn read_bounded(resp: reqwest::Response, max: u64, what: &str) -> Result<Vec<u8>> {
    if let Some(len) = resp.content_length()
        && len > max
    {
        return Err(Error::invalid_argument(format!(
            "{what}: size {len} exceeds the limit of {max} bytes"
        )));
    }
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error::unavailable(format!("{what}: reading body: {e}")))?;
        if out.len() as u64 + chunk.len() as u64 > max {
            return Err(Error::invalid_argument(format!(
                "{what}: body exceeds the limit of {max} bytes"
            )));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// An error for an unexpected HTTP status, with the registry's error message if any.
async fn status_error(resp: reqwest::Response, what: &str) -> Error {
    let status = resp.status();
    let body = read_bounded(resp, 64 << 10, what).await.unwrap_or_default();
    let detail = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v.get("errors")?.as_array().map(|errs| {
                errs.iter()
                    .map(|e| {
                        format!(
                            "{}: {}",
                            e.get("code").and_then(|c| c.as_str()).unwrap_or("UNKNOWN"),
                            e.get("message")
                                .and_then(|c| c.as_str())
                                .unwrap_or_default()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            })
        })
        .unwrap_or_else(|| {
            String::from_utf8_lossy(&body[..body.len().min(200)])
                .trim()
                .to_string()
        });
    let msg = if detail.is_empty() {
        format!("{what}: unexpected status {status}")
    } else {
        format!("{what}: unexpected status {status}: {detail}")
    };
    match status {
        StatusCode::NOT_FOUND => {
            Error::with_message(ErrorKind::NotFound, format!("{what}: not found"))
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Error::with_message(
            ErrorKind::FailedPrecondition,
            format!(
                "{what}: authorization failed: {status}{}",
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {detail}")
                }
            ),
        ),
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
            Error::with_message(ErrorKind::Unavailable, msg)
        }
        _ => Error::with_message(ErrorKind::Unknown, msg),
    }
}

fn header_str(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn pull_scope(r: &Reference) -> Vec<String> {
    vec![format!("repository:{}:pull", r.repository)]
}

fn push_scope(r: &Reference, mount_from: Option<&str>) -> Vec<String> {
    let mut v = vec![format!("repository:{}:pull,push", r.repository)];
    if let Some(f) = mount_from {
        v.push(format!("repository:{f}:pull"));
    }
    v
}

fn host_url(h: &RegistryHost, rest: &str) -> Result<url::Url> {
    let s = format!("{}{}", h.base_url(), rest);
    url::Url::parse(&s).map_err(|e| Error::invalid_argument(format!("invalid URL {s}: {e}")))
}

impl Resolver {
    pub fn new(opts: ResolverOptions) -> Resolver {
        Resolver {
            inner: Arc::new(Inner {
                opts,
                clients: Mutex::new(HashMap::new()),
                auth: Authorizer::default(),
                unreachable: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn options(&self) -> &ResolverOptions {
        &self.inner.opts
    }

    /// The endpoints of `registry`, in order.
    /// The endpoints of `registry` in configured order, except that hosts found
    /// unreachable in the last 30 seconds come after the others.
    pub fn hosts(&self, registry: &str) -> Result<Vec<RegistryHost>> {
        let hosts = (self.inner.opts.hosts)(registry)?;
        let down = self.inner.unreachable.lock().unwrap();
        let now = std::time::Instant::now();
        let is_down = |h: &RegistryHost| {
            down.get(&format!("{}://{}", h.scheme, h.host))
                .is_some_and(|t| now.duration_since(*t) < UNREACHABLE_FOR)
        };
        let (mut up, later): (Vec<_>, Vec<_>) = hosts.into_iter().partition(|h| !is_down(h));
        up.extend(later);
        Ok(up)
    }

    fn mark_reachable(&self, host: &RegistryHost, reachable: bool) {
        if host.host.is_empty() {
            return;
        }
        let key = format!("{}://{}", host.scheme, host.host);
        let mut down = self.inner.unreachable.lock().unwrap();
        if reachable {
            down.remove(&key);
        } else {
            down.insert(key, std::time::Instant::now());
        }
    }

    fn client_for(&self, tls: &TlsSettings) -> Result<reqwest::Client> {
        let mut clients = self.inner.clients.lock().unwrap();
        if let Some(c) = clients.get(tls) {
            return Ok(c.clone());
        }
        let cfg = tls_config(tls)?;
        let c = reqwest::Client::builder()
            .use_preconfigured_tls(cfg)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(60))
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(self.inner.opts.user_agent.clone())
            .build()
            .map_err(|e| Error::unknown(format!("building HTTP client: {e}")))?;
        clients.insert(tls.clone(), c.clone());
        Ok(c)
    }

    /// One request and its redirects: host headers and credentials go only to `host`.
    async fn send_once(
        &self,
        client: &reqwest::Client,
        host: &RegistryHost,
        req: &Req<'_>,
    ) -> std::result::Result<reqwest::Response, reqwest::Error> {
        let mut url = req.url.clone();
        let mut method = req.method.clone();
        let mut body = req.body.clone();
        for _hop in 0..10 {
            let same_host = authority(&url) == host.host && host.scheme == url.scheme();
            let mut rb = client.request(method.clone(), url.clone());
            if same_host {
                for (k, v) in &host.headers {
                    rb = rb.header(k.as_str(), v.as_str());
                }
                if let Some(a) = self.inner.auth.header_for(&host.host, req.scopes) {
                    rb = rb.header("Authorization", a);
                }
            }
            for (k, v) in &req.headers {
                rb = rb.header(*k, v.as_str());
            }
            if let Some(b) = &body {
                rb = rb.body(b.clone());
            }
            let resp = rb.send().await?;
            if resp.status().is_redirection()
                && let Some(loc) = header_str(&resp, "location")
                && let Ok(next) = url.join(&loc)
            {
                if resp.status() == StatusCode::SEE_OTHER {
                    method = Method::GET;
                    body = None;
                }
                tracing::debug!(from = %url, to = %next, "following redirect");
                url = next;
                continue;
            }
            return Ok(resp);
        }
        // Too many redirects: one more request returns the redirect as is.
        client.request(method, url).send().await
    }

    /// Sends `req` to `host`, answering one auth challenge and retrying transient failures.
    async fn send(&self, host: &RegistryHost, req: Req<'_>) -> Result<reqwest::Response> {
        let client = self.client_for(&host.tls)?;
        let retryable = req.method == Method::GET || req.method == Method::HEAD;
        let mut attempt = 0u32;
        let mut auth_answered = false;
        loop {
            let sent = self.send_once(&client, host, &req).await;
            if sent.is_ok() {
                self.mark_reachable(host, true);
            }
            match sent {
                Err(e) => {
                    if retryable && attempt < self.inner.opts.retries {
                        attempt += 1;
                        self.backoff(attempt).await;
                        continue;
                    }
                    self.mark_reachable(host, false);
                    return Err(Error::with_message(
                        ErrorKind::Unavailable,
                        format!("{} {}: {}", req.method, req.url, error_chain(&e)),
                    ));
                }
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED && !auth_answered => {
                    auth_answered = true;
                    // Only the host that asked gets credentials.
                    if authority(resp.url()) != host.host {
                        return Ok(resp);
                    }
                    let Some(challenge) = header_str(&resp, "www-authenticate") else {
                        return Ok(resp);
                    };
                    let creds = self
                        .inner
                        .opts
                        .credentials
                        .credentials_for(&host.host)
                        .await;
                    if self
                        .inner
                        .auth
                        .handle_challenge(&client, &host.host, &challenge, req.scopes, creds)
                        .await?
                    {
                        continue;
                    }
                    return Ok(resp);
                }
                Ok(resp)
                    if retryable
                        && (resp.status().is_server_error()
                            || resp.status() == StatusCode::TOO_MANY_REQUESTS)
                        && attempt < self.inner.opts.retries =>
                {
                    attempt += 1;
                    self.backoff(attempt).await;
                }
                Ok(resp) => return Ok(resp),
            }
        }
    }

    async fn backoff(&self, attempt: u32) {
        let base = self.inner.opts.backoff.as_millis() as u64 * (1 << attempt.min(6)) / 2;
        let jitter = rand::random::<u64>() % (base / 2 + 1);
        tokio::time::sleep(Duration::from_millis(base + jitter)).await;
    }

    /// Resolves `reference` to the descriptor of its manifest or index (HEAD, then GET
    /// when the registry does not say the digest), trying each `resolve` host in order.
    pub async fn resolve(&self, reference: &Reference) -> Result<Resolved> {
        let object = reference
            .object()
            .ok_or_else(|| Error::invalid_argument(format!("{reference}: no tag or digest")))?;
        let hosts: Vec<_> = self
            .hosts(&reference.host)?
            .into_iter()
            .filter(|h| h.capabilities.resolve)
            .collect();
        if hosts.is_empty() {
            return Err(Error::failed_precondition(format!(
                "{reference}: no host with the resolve capability"
            )));
        }
        let scopes = pull_scope(reference);
        let mut errors: Vec<Error> = vec![];
        for h in &hosts {
            match self.resolve_on(h, reference, &object, &scopes).await {
                Ok(descriptor) => {
                    return Ok(Resolved {
                        reference: reference.clone(),
                        descriptor,
                        host: format!("{}://{}", h.scheme, h.host),
                    });
                }
                Err(e) => {
                    tracing::info!(host = %h.host, error = %e, "resolve failed; trying the next host");
                    errors.push(e);
                }
            }
        }
        Err(combine_errors(&reference.to_string(), errors))
    }

    async fn resolve_on(
        &self,
        h: &RegistryHost,
        r: &Reference,
        object: &str,
        scopes: &[String],
    ) -> Result<Descriptor> {
        let url = host_url(h, &format!("/{}/manifests/{object}", r.repository))?;
        let what = format!("{r} on {}", h.host);
        let max = self.inner.opts.max_manifest_size;
        let head = self
            .send(
                h,
                Req {
                    method: Method::HEAD,
                    url: url.clone(),
                    headers: vec![("Accept", MANIFEST_ACCEPT.into())],
                    body: None,
                    scopes,
                },
            )
            .await?;
        if head.status().is_success() {
            let digest = header_str(&head, "docker-content-digest");
            let ct = header_str(&head, "content-type")
                .map(|c| c.split(';').next().unwrap_or_default().trim().to_string());
            // Not `content_length()`: for HEAD that is the (empty) body's size.
            let size =
                header_str(&head, "content-length").and_then(|v| v.trim().parse::<u64>().ok());
            if let (Some(d), Some(ct), Some(size)) = (digest, ct, size) {
                if ct == manifest::DOCKER_SCHEMA1 || ct == manifest::DOCKER_SCHEMA1_SIGNED {
                    // Let GET produce the schema 1 error with the body's evidence.
                } else if manifest::is_manifest_like(&ct) {
                    let d = Digest::parse(&d).map_err(|e| e.context(&what))?;
                    if let Some(want) = &r.digest
                        && *want != d
                    {
                        return Err(Error::invalid_argument(format!(
                            "{what}: registry returned digest {d}, asked for {want}"
                        )));
                    }
                    if size > max {
                        return Err(Error::invalid_argument(format!(
                            "{what}: manifest size {size} exceeds the limit of {max} bytes"
                        )));
                    }
                    return Ok(Descriptor::new(
                        oci_spec::image::MediaType::from(ct.as_str()),
                        size,
                        oci_spec::image::Digest::try_from(d.as_str())
                            .map_err(|e| Error::invalid_argument(format!("{what}: {e}")))?,
                    ));
                }
            }
        } else if head.status() == StatusCode::NOT_FOUND {
            return Err(Error::not_found(&what));
        } else if head.status() == StatusCode::UNAUTHORIZED
            || head.status() == StatusCode::FORBIDDEN
        {
            return Err(status_error(head, &what).await);
        }
        // GET: the digest is computed from the body.
        let resp = self
            .send(
                h,
                Req {
                    method: Method::GET,
                    url,
                    headers: vec![("Accept", MANIFEST_ACCEPT.into())],
                    body: None,
                    scopes,
                },
            )
            .await?;
        if !resp.status().is_success() {
            return Err(status_error(resp, &what).await);
        }
        let ct = header_str(&resp, "content-type");
        let body = read_bounded(resp, max, &what).await?;
        let mt = manifest::detect_media_type(&body, ct.as_deref(), &what)?;
        let desc = manifest::descriptor_for(&mt, &body);
        if let Some(want) = &r.digest
            && want.as_str() != desc.digest().to_string()
        {
            return Err(Error::invalid_argument(format!(
                "{what}: content digest {} does not match the reference digest {want}",
                desc.digest()
            )));
        }
        Ok(desc)
    }

    /// Opens the blob or manifest `desc` of `reference`'s repository from `offset` on:
    /// foreign URLs first (without credentials), then each `pull` host in order.
    pub async fn fetch(
        &self,
        reference: &Reference,
        desc: &Descriptor,
        offset: u64,
    ) -> Result<BlobStream> {
        let what = format!("{}@{}", reference.name(), desc.digest());
        let mut errors = vec![];
        let range = (offset > 0).then(|| ("Range", format!("bytes={offset}-")));
        if let Some(urls) = desc.urls() {
            for u in urls {
                let Ok(url) = url::Url::parse(u) else {
                    continue;
                };
                if url.scheme() != "http" && url.scheme() != "https" {
                    continue;
                }
                // A foreign host: no configured headers and no credentials.
                let foreign = RegistryHost {
                    scheme: String::new(),
                    host: String::new(),
                    path: String::new(),
                    capabilities: Default::default(),
                    headers: vec![],
                    tls: TlsSettings::default(),
                };
                let req = Req {
                    method: Method::GET,
                    url,
                    headers: range.clone().into_iter().collect(),
                    body: None,
                    scopes: &[],
                };
                match self.send(&foreign, req).await {
                    Ok(resp) => match self.open_body(resp, offset, &what).await {
                        Ok(s) => return Ok(s),
                        Err(e) => errors.push(e),
                    },
                    Err(e) => errors.push(e),
                }
            }
        }
        let hosts: Vec<_> = self
            .hosts(&reference.host)?
            .into_iter()
            .filter(|h| h.capabilities.pull)
            .collect();
        let scopes = pull_scope(reference);
        let mt = desc.media_type().to_string();
        let endpoint = if manifest::is_manifest_like(&mt) {
            "manifests"
        } else {
            "blobs"
        };
        for h in &hosts {
            let url = host_url(
                h,
                &format!("/{}/{endpoint}/{}", reference.repository, desc.digest()),
            )?;
            let mut headers: Vec<(&'static str, String)> = range.clone().into_iter().collect();
            if endpoint == "manifests" {
                headers.push(("Accept", MANIFEST_ACCEPT.into()));
            }
            let req = Req {
                method: Method::GET,
                url,
                headers,
                body: None,
                scopes: &scopes,
            };
            match self.send(h, req).await {
                Ok(resp) => match self
                    .open_body(resp, offset, &format!("{what} on {}", h.host))
                    .await
                {
                    Ok(s) => return Ok(s),
                    Err(e) => {
                        tracing::info!(host = %h.host, error = %e, "fetch failed; trying the next host");
                        errors.push(e)
                    }
                },
                Err(e) => errors.push(e),
            }
        }
        Err(combine_errors(&what, errors))
    }

    async fn open_body(
        &self,
        resp: reqwest::Response,
        offset: u64,
        what: &str,
    ) -> Result<BlobStream> {
        let status = resp.status();
        let start = if status == StatusCode::PARTIAL_CONTENT {
            let cr = header_str(&resp, "content-range").unwrap_or_default();
            // bytes START-END/TOTAL
            let start = cr
                .strip_prefix("bytes ")
                .and_then(|s| s.split('-').next())
                .and_then(|s| s.parse::<u64>().ok());
            match start {
                Some(s) if s == offset => s,
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "{what}: server answered range request from {offset} with Content-Range {cr:?}"
                    )));
                }
            }
        } else if status.is_success() {
            0
        } else {
            return Err(status_error(resp, what).await);
        };
        let what = what.to_string();
        let stream = resp
            .bytes_stream()
            .map(move |r| {
                r.map_err(|e| {
                    Error::unavailable(format!("{what}: reading body: {}", error_chain(&e)))
                })
            })
            .boxed();
        Ok(BlobStream {
            offset: start,
            stream,
        })
    }

    /// Fetches a manifest or index completely (bounded by the manifest limit) and checks
    /// its size and digest against `desc`.
    pub async fn fetch_manifest(
        &self,
        reference: &Reference,
        desc: &Descriptor,
    ) -> Result<Vec<u8>> {
        self.fetch_verified(reference, desc, self.inner.opts.max_manifest_size)
            .await
    }

    /// Fetches a small blob completely, refusing a declared size above `max`, and checks
    /// its size and digest against `desc`.
    pub async fn fetch_verified(
        &self,
        reference: &Reference,
        desc: &Descriptor,
        max: u64,
    ) -> Result<Vec<u8>> {
        let what = format!("{}@{}", reference.name(), desc.digest());
        if desc.size() > max {
            return Err(Error::invalid_argument(format!(
                "{what}: size {} exceeds the limit of {max} bytes",
                desc.size()
            )));
        }
        let mut s = self.fetch(reference, desc, 0).await?;
        let mut body = Vec::with_capacity(desc.size() as usize);
        while let Some(chunk) = s.stream.next().await {
            let chunk = chunk?;
            if body.len() as u64 + chunk.len() as u64 > desc.size() {
                return Err(Error::invalid_argument(format!(
                    "{what}: registry sent more than the declared size of {} bytes",
                    desc.size()
                )));
            }
            body.extend_from_slice(&chunk);
        }
        crate::verify::check(&body, desc).map_err(|e| e.context(&what))?;
        Ok(body)
    }

    /// Pushes one blob unless the registry has it: HEAD, then a cross-repository mount from
    /// `mount_from` if given, then a monolithic PUT (or PATCH chunks above `chunk_size`).
    pub async fn push_blob(
        &self,
        reference: &Reference,
        desc: &Descriptor,
        reader: Arc<dyn ReaderAt>,
        mount_from: Option<&str>,
    ) -> Result<PushOutcome> {
        let hosts: Vec<_> = self
            .hosts(&reference.host)?
            .into_iter()
            .filter(|h| h.capabilities.push)
            .collect();
        if hosts.is_empty() {
            return Err(Error::failed_precondition(format!(
                "{reference}: no host with the push capability"
            )));
        }
        let what = format!("{}@{}", reference.name(), desc.digest());
        let mut errors = vec![];
        for h in &hosts {
            match self
                .push_blob_on(h, reference, desc, reader.clone(), mount_from)
                .await
            {
                Ok(o) => return Ok(o),
                Err(e) => errors.push(e),
            }
        }
        Err(combine_errors(&what, errors))
    }

    async fn push_blob_on(
        &self,
        h: &RegistryHost,
        r: &Reference,
        desc: &Descriptor,
        reader: Arc<dyn ReaderAt>,
        mount_from: Option<&str>,
    ) -> Result<PushOutcome> {
        let scopes = push_scope(r, mount_from);
        let what = format!("push {}@{} to {}", r.name(), desc.digest(), h.host);
        let digest = desc.digest().to_string();
        let head = self
            .send(
                h,
                Req {
                    method: Method::HEAD,
                    url: host_url(h, &format!("/{}/blobs/{digest}", r.repository))?,
                    headers: vec![],
                    body: None,
                    scopes: &scopes,
                },
            )
            .await?;
        if head.status().is_success() {
            return Ok(PushOutcome::Exists);
        }
        let mut start = host_url(h, &format!("/{}/blobs/uploads/", r.repository))?;
        if let Some(from) = mount_from.filter(|f| *f != r.repository) {
            start
                .query_pairs_mut()
                .append_pair("mount", &digest)
                .append_pair("from", from);
        }
        let resp = self
            .send(
                h,
                Req {
                    method: Method::POST,
                    url: start.clone(),
                    headers: vec![("Content-Length", "0".into())],
                    body: Some(Bytes::new()),
                    scopes: &scopes,
                },
            )
            .await?;
        match resp.status() {
            StatusCode::CREATED if mount_from.is_some() => return Ok(PushOutcome::Mounted),
            StatusCode::CREATED | StatusCode::ACCEPTED => {}
            _ => return Err(status_error(resp, &what).await),
        }
        let mut location = upload_location(&resp, &start, &what)?;
        let size = desc.size();
        let chunk = self.inner.opts.chunk_size.max(1);
        let read = |off: u64, len: u64| {
            let reader = reader.clone();
            async move {
                tokio::task::spawn_blocking(move || -> Result<Bytes> {
                    let mut buf = vec![0u8; len as usize];
                    let mut done = 0usize;
                    while done < buf.len() {
                        let n = reader.read_at(&mut buf[done..], (off + done as u64) as i64)?;
                        if n == 0 {
                            return Err(Error::unknown(format!(
                                "blob ended at {} of {}",
                                off + done as u64,
                                off + len
                            )));
                        }
                        done += n;
                    }
                    Ok(Bytes::from(buf))
                })
                .await
                .map_err(|e| Error::unknown(format!("reading blob: {e}")))?
            }
        };
        let final_body = if size <= chunk {
            read(0, size).await?
        } else {
            let mut off = 0;
            while off < size {
                let len = chunk.min(size - off);
                let data = read(off, len).await?;
                let resp = self
                    .send(
                        h,
                        Req {
                            method: Method::PATCH,
                            url: location.clone(),
                            headers: vec![
                                ("Content-Type", "application/octet-stream".into()),
                                ("Content-Range", format!("{off}-{}", off + len - 1)),
                            ],
                            body: Some(data),
                            scopes: &scopes,
                        },
                    )
                    .await?;
                if resp.status() != StatusCode::ACCEPTED {
                    return Err(status_error(resp, &what).await);
                }
                location = upload_location(&resp, &location, &what)?;
                off += len;
            }
            Bytes::new()
        };
        location.query_pairs_mut().append_pair("digest", &digest);
        let resp = self
            .send(
                h,
                Req {
                    method: Method::PUT,
                    url: location,
                    headers: vec![("Content-Type", "application/octet-stream".into())],
                    body: Some(final_body),
                    scopes: &scopes,
                },
            )
            .await?;
        if resp.status() != StatusCode::CREATED && !resp.status().is_success() {
            return Err(status_error(resp, &what).await);
        }
        Ok(PushOutcome::Uploaded)
    }

    /// Pushes a manifest or index under `reference`'s tag (or its digest if it has none).
    pub async fn push_manifest(
        &self,
        reference: &Reference,
        desc: &Descriptor,
        body: Bytes,
    ) -> Result<()> {
        crate::verify::check(&body, desc)?;
        let object = reference
            .tag
            .clone()
            .unwrap_or_else(|| desc.digest().to_string());
        let hosts: Vec<_> = self
            .hosts(&reference.host)?
            .into_iter()
            .filter(|h| h.capabilities.push)
            .collect();
        let scopes = push_scope(reference, None);
        let mut errors = vec![];
        for h in &hosts {
            let what = format!("push manifest {reference} to {}", h.host);
            let resp = self
                .send(
                    h,
                    Req {
                        method: Method::PUT,
                        url: host_url(h, &format!("/{}/manifests/{object}", reference.repository))?,
                        headers: vec![("Content-Type", desc.media_type().to_string())],
                        body: Some(body.clone()),
                        scopes: &scopes,
                    },
                )
                .await;
            match resp {
                Ok(resp) if resp.status().is_success() => return Ok(()),
                Ok(resp) => errors.push(status_error(resp, &what).await),
                Err(e) => errors.push(e),
            }
        }
        Err(combine_errors(&format!("push {reference}"), errors))
    }
}

fn upload_location(resp: &reqwest::Response, base: &url::Url, what: &str) -> Result<url::Url> {
    let loc = header_str(resp, "location").ok_or_else(|| {
        Error::invalid_argument(format!("{what}: upload response without Location"))
    })?;
    base.join(&loc).map_err(|e| {
        Error::invalid_argument(format!("{what}: invalid upload Location {loc:?}: {e}"))
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let cs = c.to_string();
        if !s.contains(&cs) {
            s.push_str(": ");
            s.push_str(&cs);
        }
        src = c.source();
    }
    s
}

/// One error for an operation tried on several hosts: not found only if every host said
/// so, otherwise the first other failure, naming how many hosts were tried.
fn combine_errors(what: &str, errors: Vec<Error>) -> Error {
    if errors.is_empty() {
        return Error::not_found(what);
    }
    if errors.iter().all(|e| e.is(ErrorKind::NotFound)) {
        return Error::not_found(what);
    }
    let n = errors.len();
    let first = errors
        .into_iter()
        .find(|e| !e.is(ErrorKind::NotFound))
        .expect("a non-NotFound error");
    if n > 1 {
        first.context(format!("{what} (tried {n} hosts)"))
    } else {
        first
    }
}
