//! Helpers shared by the `berth` CLI's integration tests.

use std::path::Path;

/// Writes `data` into the ingest `ref` through the content API's Write stream (declaring
/// `total`, 0 for unknown) and goes away without committing, as an interrupted client
/// would.
pub fn write_partial_ingest(socket: &Path, r#ref: &str, data: &[u8], total: usize) {
    use berth_api::services::content::v1::{WriteAction, WriteContentRequest};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = berth_cli::client::Client::connect(&socket.display().to_string(), "default")
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        for (action, data) in [
            (WriteAction::Stat, bytes::Bytes::new()),
            (WriteAction::Write, bytes::Bytes::copy_from_slice(data)),
        ] {
            tx.send(WriteContentRequest {
                action: action as i32,
                r#ref: r#ref.to_string(),
                total: total as i64,
                data,
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let mut responses = client
            .content()
            .write(client.request(tokio_stream::wrappers::ReceiverStream::new(rx)))
            .await
            .unwrap()
            .into_inner();
        let _stat = responses.message().await.unwrap().unwrap();
        let written = responses.message().await.unwrap().unwrap();
        assert_eq!(written.offset as usize, data.len());
        drop(tx);
        while let Ok(Some(_)) = responses.message().await {}
    });
}
