//! A small CRI client timing the image service, for comparing berthd with containerd
//! 1.6 (CRI enabled) on the same machine and registry:
//!
//! ```text
//! cargo run -p berth-cri --example cri_pull -- <socket> <image> [N]
//! cargo run -p berth-cri --example cri_pull -- /run/containerd/containerd.sock busybox 10
//! cargo run -p berth-cri --example cri_pull -- <socket> <image> pull|remove|status|list [N]
//! ```
//!
//! Each of the N rounds removes the image (RemoveImage, so the pull really fetches and
//! unpacks) and times PullImage; then ImageStatus and ListImages are timed N times each.
//! Medians (and min/max) are printed. Registry hosts and credentials come from the
//! daemon's CRI config (`registry.config_path`), as for the kubelet.
//!
//! Naming a call instead (for scripts such as bench/cri.sh, which put their own steps
//! between the calls) makes N (default 1) calls of that one only, nothing removed
//! first, and prints each call's milliseconds on its own line (the connection is made
//! before, with RuntimeService.Version).

use berth_cri::api;
use berth_cri::api::image_service_client::ImageServiceClient;
use berth_cri::api::runtime_service_client::RuntimeServiceClient;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

fn usage() -> ! {
    eprintln!(
        "usage: cri_pull <socket> <image> [N (default 5)]\n       \
         cri_pull <socket> <image> pull|remove|status|list [N (default 1)]"
    );
    std::process::exit(2)
}

fn spec(image: &str) -> Option<api::ImageSpec> {
    Some(api::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

/// `label: median (min … max) over n`, in milliseconds.
fn report(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = if samples.len() % 2 == 1 {
        ms(samples[samples.len() / 2])
    } else {
        (ms(samples[samples.len() / 2 - 1]) + ms(samples[samples.len() / 2])) / 2.0
    };
    println!(
        "{label:<14} median {median:9.3} ms   (min {:.3}, max {:.3}, n={})",
        ms(samples[0]),
        ms(samples[samples.len() - 1]),
        samples.len()
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (socket, image) = match (args.first(), args.get(1)) {
        (Some(s), Some(i)) => (s.clone(), i.clone()),
        _ => usage(),
    };
    let call = args.get(2).filter(|a| a.parse::<usize>().is_err()).cloned();
    let count = args.get(if call.is_some() { 3 } else { 2 });
    let rounds: usize = match count {
        Some(n) => n.parse().unwrap_or_else(|_| usage()),
        None if call.is_some() => 1,
        None => 5,
    };
    let known = |c: &String| ["pull", "remove", "status", "list"].contains(&c.as_str());
    if rounds == 0 || args.len() > 3 + usize::from(call.is_some()) || !call.iter().all(known) {
        usage();
    }
    let channel: Channel = berth_services::proxy::unix_channel(&socket)?;
    let mut images = ImageServiceClient::new(channel.clone());
    if let Some(call) = call {
        // Connected before the clock starts (the channel is lazy), as the kubelet is,
        // with the Version call it starts with.
        RuntimeServiceClient::new(channel)
            .version(api::VersionRequest::default())
            .await?;
        for _ in 0..rounds {
            let started = Instant::now();
            match call.as_str() {
                "pull" => drop(
                    images
                        .pull_image(api::PullImageRequest {
                            image: spec(&image),
                            ..Default::default()
                        })
                        .await?,
                ),
                "remove" => drop(
                    images
                        .remove_image(api::RemoveImageRequest {
                            image: spec(&image),
                        })
                        .await?,
                ),
                "status" => {
                    let status = images
                        .image_status(api::ImageStatusRequest {
                            image: spec(&image),
                            verbose: false,
                        })
                        .await?;
                    if status.into_inner().image.is_none() {
                        return Err(format!("ImageStatus found no {image}").into());
                    }
                }
                "list" => drop(
                    images
                        .list_images(api::ListImagesRequest::default())
                        .await?,
                ),
                _ => unreachable!("checked above"),
            }
            println!("{:.3}", started.elapsed().as_secs_f64() * 1000.0);
        }
        return Ok(());
    }

    let mut pulls = Vec::with_capacity(rounds);
    let mut image_ref = String::new();
    for _ in 0..rounds {
        images
            .remove_image(api::RemoveImageRequest {
                image: spec(&image),
            })
            .await?;
        let started = Instant::now();
        image_ref = images
            .pull_image(api::PullImageRequest {
                image: spec(&image),
                ..Default::default()
            })
            .await?
            .into_inner()
            .image_ref;
        pulls.push(started.elapsed());
    }

    let mut statuses = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        let status = images
            .image_status(api::ImageStatusRequest {
                image: spec(&image),
                verbose: false,
            })
            .await?
            .into_inner();
        statuses.push(started.elapsed());
        if status.image.is_none() {
            return Err(format!("ImageStatus found no {image} after the pull").into());
        }
    }

    let mut lists = Vec::with_capacity(rounds);
    let mut listed = 0;
    for _ in 0..rounds {
        let started = Instant::now();
        listed = images
            .list_images(api::ListImagesRequest::default())
            .await?
            .into_inner()
            .images
            .len();
        lists.push(started.elapsed());
    }

    println!("{image} -> {image_ref} ({listed} images listed)");
    report("PullImage", pulls);
    report("ImageStatus", statuses);
    report("ListImages", lists);
    Ok(())
}
