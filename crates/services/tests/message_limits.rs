//! containerd accepts and sends gRPC messages up to 16 MiB (`[grpc]
//! max_recv_message_size` / `max_send_message_size`); tonic's own default is 4 MiB.

use berth_api::services::images::v1::images_client::ImagesClient;
use berth_api::services::images::v1::{CreateImageRequest, GetImageRequest, Image};
use berth_api::types::Descriptor;
use berth_testkit::Daemon;
use std::path::PathBuf;
use tonic::Request;
use tonic::transport::Channel;

async fn images_client(socket: PathBuf) -> ImagesClient<Channel> {
    let channel = berth_services::proxy::unix_channel(&socket.to_string_lossy())
        .expect("a channel to berthd's socket");
    ImagesClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

fn namespaced<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("containerd-namespace", "default".parse().unwrap());
    request
}

/// An image whose descriptor annotations weigh `bytes` in total.
fn heavy_image(name: &str, bytes: usize) -> Image {
    let chunk = "x".repeat(64 << 10);
    let annotations = (0..bytes / chunk.len())
        .map(|i| (format!("a{i}"), chunk.clone()))
        .collect();
    Image {
        name: name.into(),
        target: Some(Descriptor {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: format!("sha256:{}", "ab".repeat(32)),
            size: 1,
            annotations,
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_up_to_the_configured_limit_pass_and_larger_ones_are_refused() {
    let daemon = Daemon::start();
    let mut images = images_client(daemon.socket.clone()).await;

    // 6 MiB each way: over tonic's default, under containerd's 16 MiB.
    let image = heavy_image("big/six:latest", 6 << 20);
    images
        .create(namespaced(CreateImageRequest {
            image: Some(image.clone()),
            ..Default::default()
        }))
        .await
        .expect("a 6 MiB request is accepted");
    let got = images
        .get(namespaced(GetImageRequest {
            name: "big/six:latest".into(),
        }))
        .await
        .expect("a 6 MiB reply is sent")
        .into_inner();
    assert_eq!(got.image.unwrap().target, image.target);

    // Over 16 MiB the daemon refuses the request and stores nothing.
    let too_big = heavy_image("big/twenty:latest", 20 << 20);
    let err = images
        .create(namespaced(CreateImageRequest {
            image: Some(too_big),
            ..Default::default()
        }))
        .await
        .expect_err("a 20 MiB request is refused");
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
    let missing = images
        .get(namespaced(GetImageRequest {
            name: "big/twenty:latest".into(),
        }))
        .await
        .expect_err("nothing stored");
    assert_eq!(missing.code(), tonic::Code::NotFound);
}
