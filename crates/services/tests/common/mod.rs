//! What the services' integration tests share: the client side of containerd 2.x's
//! `ctr`, which Debian 12 does not ship, for the Streaming and Transfer services.

// Each test file uses part of it.
#![allow(dead_code)]

use berth_api::any;
use berth_api::services::streaming::v1::StreamInit;
use berth_api::services::streaming::v1::streaming_client::StreamingClient;
use berth_api::types::transfer as tt;
use prost_types::Any;
use std::io::Read;
use std::path::Path;
use tokio::sync::mpsc;
use tonic::Request;
use tonic::transport::Channel;

/// `message` for namespace `ns` (the `containerd-namespace` header).
pub fn namespaced<T>(ns: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("containerd-namespace", ns.parse().unwrap());
    request
}

/// A stream opened as 2.x's `streamCreator.Create` does: `StreamInit{id}` first, then
/// the server's acknowledgement.
pub async fn open_stream(
    ch: &Channel,
    ns: &str,
    id: &str,
) -> (mpsc::Sender<Any>, tonic::Streaming<Any>) {
    let (tx, rx) = mpsc::channel(16);
    tx.send(any::pack(&StreamInit { id: id.into() }))
        .await
        .unwrap();
    let mut inbound = StreamingClient::new(ch.clone())
        .stream(namespaced(
            ns,
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .await
        .expect("Streaming/Stream")
        .into_inner();
    let ack = inbound.message().await.unwrap().expect("stream ack");
    assert_eq!(ack.type_url, "google.protobuf.Empty");
    (tx, inbound)
}

/// Opens a stream and sends `archive` over it as 2.x's `SendStream` does: `Data`
/// messages of at most 32 KiB within the `WindowUpdate`s the server grants, read from
/// the file as they go (an archive may be larger than memory should hold), then closes
/// its side. Returns the stream's id and the sending task.
pub async fn send_archive(
    ch: &Channel,
    ns: &str,
    archive: &Path,
) -> (String, tokio::task::JoinHandle<()>) {
    let id = format!("import-{}", uuid::Uuid::new_v4());
    let (tx, mut inbound) = open_stream(ch, ns, &id).await;
    let mut file = std::fs::File::open(archive).unwrap();
    let sender = tokio::spawn(async move {
        let mut window = 0i64;
        let mut buf = vec![0u8; 32 << 10];
        loop {
            while window <= 0 {
                let Ok(Some(m)) = inbound.message().await else {
                    return;
                };
                let u: tt::WindowUpdate = any::unpack(&m).expect("a WindowUpdate");
                window += i64::from(u.update);
            }
            let want = buf.len().min(window as usize);
            let n = file.read(&mut buf[..want]).unwrap();
            if n == 0 {
                break;
            }
            let chunk = tt::Data {
                data: buf[..n].to_vec(),
            };
            if tx.send(any::pack(&chunk)).await.is_err() {
                return;
            }
            window -= n as i64;
        }
        // Dropping the sender closes our side, as 2.x's stream.Close().
        drop(tx);
        while let Ok(Some(_)) = inbound.message().await {}
    });
    (id, sender)
}
