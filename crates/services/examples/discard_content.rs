//! The floor of `ctr content ingest` on this machine: a Content service whose Write
//! stores nothing and hashes nothing (bench/ingest.sh's `ctr>discard` target, issue 3).
//!
//! `cargo run --release -p berth-services --example discard_content -- SOCKET`
//!
//! It answers Stat with offset 0, counts the bytes of every Write, and answers Commit with
//! the byte count and the client's own expected digest (ctr compares the two), so an
//! ingest against it costs the daemon side nothing but receiving the bytes. The time ctr
//! then takes is what the client and the socket alone cost; no daemon that stores and
//! verifies the data can beat it. This is a measuring tool, not a content store: every
//! other call is Unimplemented. Stops on SIGTERM.

use berth_api::services::content::v1 as api;
use berth_api::services::content::v1::content_server::{Content, ContentServer};
use std::path::PathBuf;
use tokio_stream::StreamExt;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

struct Discard;

fn unimplemented<T>() -> Result<T, Status> {
    Err(Status::unimplemented("discard_content only serves Write"))
}

#[tonic::async_trait]
impl Content for Discard {
    async fn info(
        &self,
        _: Request<api::InfoRequest>,
    ) -> Result<Response<api::InfoResponse>, Status> {
        unimplemented()
    }
    async fn update(
        &self,
        _: Request<api::UpdateRequest>,
    ) -> Result<Response<api::UpdateResponse>, Status> {
        unimplemented()
    }
    async fn list(
        &self,
        _: Request<api::ListContentRequest>,
    ) -> Result<Response<BoxStream<api::ListContentResponse>>, Status> {
        unimplemented()
    }
    async fn delete(&self, _: Request<api::DeleteContentRequest>) -> Result<Response<()>, Status> {
        unimplemented()
    }
    async fn read(
        &self,
        _: Request<api::ReadContentRequest>,
    ) -> Result<Response<BoxStream<api::ReadContentResponse>>, Status> {
        unimplemented()
    }
    async fn status(
        &self,
        _: Request<api::StatusRequest>,
    ) -> Result<Response<api::StatusResponse>, Status> {
        unimplemented()
    }
    async fn list_statuses(
        &self,
        _: Request<api::ListStatusesRequest>,
    ) -> Result<Response<api::ListStatusesResponse>, Status> {
        unimplemented()
    }
    async fn abort(&self, _: Request<api::AbortRequest>) -> Result<Response<()>, Status> {
        unimplemented()
    }

    async fn write(
        &self,
        request: Request<Streaming<api::WriteContentRequest>>,
    ) -> Result<Response<BoxStream<api::WriteContentResponse>>, Status> {
        let mut incoming = request.into_inner();
        let replies = async_stream(move |tx| async move {
            let mut offset = 0i64;
            let mut expected = String::new();
            while let Some(req) = incoming.next().await {
                let req = req?;
                if !req.expected.is_empty() {
                    expected = req.expected.clone();
                }
                offset += req.data.len() as i64;
                let commit = req.action == api::WriteAction::Commit as i32;
                let reply = api::WriteContentResponse {
                    action: req.action,
                    offset,
                    total: req.total,
                    digest: if commit {
                        expected.clone()
                    } else {
                        String::new()
                    },
                    ..Default::default()
                };
                if tx.send(Ok(reply)).await.is_err() || commit {
                    break;
                }
            }
            Ok(())
        });
        Ok(Response::new(replies))
    }
}

/// The replies `f` sends, as a response stream; its error (if any) ends the stream.
fn async_stream<F, Fut>(f: F) -> BoxStream<api::WriteContentResponse>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<api::WriteContentResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = Result<(), Status>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let fut = f(tx.clone());
    tokio::spawn(async move {
        if let Err(status) = fut.await {
            let _ = tx.send(Err(status)).await;
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tokio::main]
async fn main() {
    let Some(socket) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: discard_content SOCKET");
        std::process::exit(2);
    };
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket).expect("binding the socket");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        term.recv().await;
    };
    tonic::transport::Server::builder()
        .add_service(ContentServer::new(Discard))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .expect("serving");
    let _ = std::fs::remove_file(&socket);
}
