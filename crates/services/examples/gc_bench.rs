//! GC benchmark through the public gRPC API (issue 3), for berthd or containerd.
//!
//! `cargo run --release -p berth-services --example gc_bench -- SOCKET [N] [PARALLEL]`
//!
//! In namespace `gcbench` (which must not exist yet): writes N (10 000) small distinct
//! blobs with content `Write` streams, PARALLEL (16) at a time. Even ones are committed
//! with the label `containerd.io/gc.root` (kept by every collection); odd ones are written
//! under the lease `gcbench` (so no collection in between can take them). Then it times
//! one `leases Delete {sync: true}`, which in containerd and Berth returns after the
//! collection that removes the N/2 unreferenced blobs (metadata and files), and checks
//! with `List` that exactly the rooted half is left. Prints the write and GC wall times.
//! Nothing is cleaned up afterwards: run it against a private daemon.

use berth_api::services::content::v1 as content;
use berth_api::services::content::v1::content_client::ContentClient;
use berth_api::services::leases::v1 as leases;
use berth_api::services::leases::v1::leases_client::LeasesClient;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Semaphore;
use tonic::Request;
use tonic::transport::Channel;

const NS: &str = "gcbench";
const LEASE: &str = "gcbench";

fn req<T>(msg: T, lease: bool) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("containerd-namespace", NS.parse().unwrap());
    if lease {
        r.metadata_mut()
            .insert("containerd-lease", LEASE.parse().unwrap());
    }
    r
}

async fn channel(socket: PathBuf) -> Channel {
    berth_services::proxy::unix_channel(&socket.to_string_lossy())
        .expect("a channel to berthd's socket")
}

async fn count(c: &mut ContentClient<Channel>) -> (usize, usize) {
    let mut stream = c
        .list(req(content::ListContentRequest::default(), false))
        .await
        .expect("content list")
        .into_inner();
    let (mut all, mut rooted) = (0, 0);
    while let Some(m) = stream.message().await.expect("content list") {
        all += m.info.len();
        rooted += m
            .info
            .iter()
            .filter(|i| i.labels.contains_key("containerd.io/gc.root"))
            .count();
    }
    (all, rooted)
}

/// One blob, committed in a single Write message.
async fn write_blob(mut c: ContentClient<Channel>, i: usize, rooted: bool) {
    let data = format!("gc-bench blob {i:06} {}\n", "x".repeat(100 + i % 157)).into_bytes();
    let labels = if rooted {
        [("containerd.io/gc.root".to_string(), "bench".to_string())].into()
    } else {
        Default::default()
    };
    let msg = content::WriteContentRequest {
        action: content::WriteAction::Commit as i32,
        r#ref: format!("gcbench-{i}"),
        total: data.len() as i64,
        data: data.into(),
        labels,
        ..Default::default()
    };
    let mut resp = c
        .write(req(tokio_stream::iter([msg]), !rooted))
        .await
        .unwrap_or_else(|e| panic!("write {i}: {e:?}"))
        .into_inner();
    // Read to the end of the stream: a tonic client that drops a response stream before
    // its trailers resets it, and its h2 library gives up the whole connection (GOAWAY
    // `too_many_internal_resets`, raised on the client side) after 1024 such resets.
    while resp
        .message()
        .await
        .unwrap_or_else(|e| panic!("commit {i}: {e:?}"))
        .is_some()
    {}
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(socket) = args.get(1) else {
        eprintln!("usage: gc_bench SOCKET [N] [PARALLEL]");
        std::process::exit(2);
    };
    let n: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(10_000);
    let parallel: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(16);
    let ch = channel(PathBuf::from(socket)).await;
    let mut cc = ContentClient::new(ch.clone());
    let mut lc = LeasesClient::new(ch.clone());
    assert_eq!(count(&mut cc).await.0, 0, "namespace {NS} is not empty");
    lc.create(req(
        leases::CreateRequest {
            id: LEASE.into(),
            ..Default::default()
        },
        false,
    ))
    .await
    .expect("lease create");

    let start = Instant::now();
    let sem = Arc::new(Semaphore::new(parallel));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let c = cc.clone();
        tasks.push(tokio::spawn(async move {
            write_blob(c, i, i % 2 == 0).await;
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let written = start.elapsed();
    let (all, rooted) = count(&mut cc).await;
    assert_eq!((all, rooted), (n, n.div_ceil(2)), "after writing");

    let start = Instant::now();
    lc.delete(req(
        leases::DeleteRequest {
            id: LEASE.into(),
            sync: true,
        },
        false,
    ))
    .await
    .expect("lease delete --sync");
    let gc = start.elapsed();
    let (all, rooted) = count(&mut cc).await;
    assert_eq!((all, rooted), (n.div_ceil(2), n.div_ceil(2)), "after GC");
    println!(
        "wrote {n} blobs ({parallel} parallel) in {:.2} s ({:.0} blobs/s); \
         leases rm --sync (GC removing {}) took {:.3} s",
        written.as_secs_f64(),
        n as f64 / written.as_secs_f64(),
        n / 2,
        gc.as_secs_f64()
    );
}
