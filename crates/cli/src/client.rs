//! The connection to berthd: a tonic channel over the unix socket, and requests that
//! carry the namespace (and, while pulling, the lease) header.

use berth_api::services::content::v1::content_client::ContentClient;
use berth_api::services::images::v1::images_client::ImagesClient;
use berth_api::services::introspection::v1::introspection_client::IntrospectionClient;
use berth_api::services::leases::v1::leases_client::LeasesClient;
use berth_api::services::version::v1::version_client::VersionClient;
use std::path::PathBuf;
use tonic::transport::{Channel, Endpoint, Uri};

/// containerd's namespace header.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";
/// containerd's lease header.
pub const LEASE_HEADER: &str = "containerd-lease";

/// A connected client for one namespace.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
    pub namespace: String,
    pub address: PathBuf,
    pub lease: Option<String>,
}

/// Why connecting failed, in words for people.
#[derive(Debug)]
pub struct ConnectError(pub String);

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectError {}

impl Client {
    /// Connects to the unix socket at `address` (a `unix://` prefix is accepted).
    pub async fn connect(address: &str, namespace: &str) -> Result<Client, ConnectError> {
        let path = PathBuf::from(address.strip_prefix("unix://").unwrap_or(address));
        if !path.exists() {
            return Err(ConnectError(format!(
                "cannot connect to berthd: socket {} does not exist (is berthd running? use --address to point elsewhere)",
                path.display()
            )));
        }
        let p = path.clone();
        let channel = Endpoint::try_from("http://berthd.local")
            .map_err(|e| ConnectError(e.to_string()))?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let p = p.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(p).await?,
                    ))
                }
            }))
            .await
            .map_err(|e| {
                let mut msg = format!("cannot connect to berthd at {}: {e}", path.display());
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(&format!(": {s}"));
                    src = s.source();
                }
                ConnectError(msg)
            })?;
        Ok(Client {
            channel,
            namespace: namespace.to_string(),
            address: path,
            lease: None,
        })
    }

    /// A request carrying the namespace (and lease, if any) headers.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Ok(v) = self.namespace.parse() {
            r.metadata_mut().insert(NAMESPACE_HEADER, v);
        }
        if let Some(l) = self.lease.as_ref().and_then(|l| l.parse().ok()) {
            r.metadata_mut().insert(LEASE_HEADER, l);
        }
        r
    }

    /// The underlying channel, for service clients without an accessor here.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }
    pub fn version(&self) -> VersionClient<Channel> {
        VersionClient::new(self.channel.clone())
    }
    pub fn introspection(&self) -> IntrospectionClient<Channel> {
        IntrospectionClient::new(self.channel.clone())
    }
    pub fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone())
    }
    pub fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone()).max_decoding_message_size(64 << 20)
    }
    pub fn leases(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.channel.clone())
    }
}

/// A gRPC code in words, for error messages.
pub fn code_words(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown error",
        InvalidArgument => "invalid argument",
        DeadlineExceeded => "timed out",
        NotFound => "not found",
        AlreadyExists => "already exists",
        PermissionDenied => "permission denied",
        ResourceExhausted => "resource exhausted",
        FailedPrecondition => "failed precondition",
        Aborted => "aborted",
        OutOfRange => "out of range",
        Unimplemented => "not implemented by this berthd",
        Internal => "internal error",
        Unavailable => "unavailable",
        DataLoss => "data loss",
        Unauthenticated => "unauthenticated",
    }
}

/// `what: message (code in words)`, without repeating the words when the message already
/// ends with them (containerd's messages usually do).
pub fn status_message(what: &str, s: &tonic::Status) -> String {
    let words = code_words(s.code());
    let msg = s.message();
    if msg.is_empty() {
        format!("{what}: {words}")
    } else if msg.ends_with(words) || s.code() == tonic::Code::Unknown {
        format!("{what}: {msg}")
    } else {
        format!("{what}: {msg} ({words})")
    }
}
