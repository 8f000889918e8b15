//! Pulls an image into a directory (`blobs/<alg>/<hex>`) and reports the time taken:
//! `cargo run --release -p berth-remotes --example pull -- REF DIR [--plain-http]
//! [--platform os/arch] [--hosts-dir DIR] [-j N]`.

use berth_remotes::hosts::HostOptions;
use berth_remotes::pull::{self, DirSink, ProgressState, PullOptions};
use berth_remotes::{Platform, Reference, Resolver, ResolverOptions};
use std::time::Instant;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut positional = vec![];
    let mut hosts = HostOptions::default();
    let mut opts = PullOptions::default();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--plain-http" => hosts.default_scheme = Some("http".into()),
            "--hosts-dir" => {
                i += 1;
                hosts.config_path = Some(args[i].clone());
            }
            "--platform" => {
                i += 1;
                opts.platform = Platform::parse(&args[i]).expect("platform");
            }
            "-j" => {
                i += 1;
                opts.max_concurrent_downloads = args[i].parse().expect("number");
            }
            a => positional.push(a.to_string()),
        }
        i += 1;
    }
    let [reference, dir] = positional.as_slice() else {
        eprintln!(
            "usage: pull REF DIR [--plain-http] [--platform os/arch] [--hosts-dir DIR] [-j N]"
        );
        std::process::exit(2);
    };
    let reference = Reference::parse_normalized(reference).expect("reference");
    let resolver = Resolver::new(ResolverOptions::with_hosts(hosts));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    opts.progress = Some(tx);
    let printer = tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            if matches!(
                ev.state,
                ProgressState::Done | ProgressState::Exists | ProgressState::Failed(_)
            ) {
                eprintln!(
                    "{:?} {} {:?} {} bytes",
                    ev.kind, ev.digest, ev.state, ev.offset
                );
            }
        }
    });
    let start = Instant::now();
    let result = pull::pull(&resolver, &reference, &DirSink::new(dir), &opts).await;
    drop(opts);
    printer.await.unwrap();
    match result {
        Ok(img) => {
            let size: u64 = img.layers.iter().map(|l| l.size()).sum();
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{reference}: {} layers, {size} bytes in {secs:.3} s ({:.1} MB/s)",
                img.layers.len(),
                size as f64 / secs / 1e6
            );
        }
        Err(e) => {
            eprintln!("pull failed: {e}");
            std::process::exit(1);
        }
    }
}
