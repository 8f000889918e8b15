//! The foundation services driven by the stock `ctr` against a private berthd:
//! version, introspection, namespaces and events, with containerd's error codes.

use berth_testkit::Daemon;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

#[test]
fn version_names_berth() {
    let daemon = Daemon::start();
    let out = daemon.ctr_ok(&["version"]);
    assert!(out.contains("Server:"), "{out}");
    assert!(out.contains("berth"), "{out}");
}

#[test]
fn plugins_are_all_ok_and_filterable() {
    let daemon = Daemon::start();
    let out = daemon.ctr_ok(&["plugins", "ls"]);
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert!(rows.len() >= 5, "too few plugins:\n{out}");
    for row in &rows {
        let status = row.split_whitespace().last().unwrap_or_default();
        // "skip" is a plugin that does not apply on this host (btrfs on a non-btrfs root),
        // exactly as containerd reports it; an "error" is a bug.
        assert!(
            status == "ok" || status == "skip",
            "plugin failed: {row}\n{out}"
        );
    }
    let skipped: Vec<_> = rows
        .iter()
        .filter(|r| r.trim_end().ends_with("skip"))
        .collect();
    assert!(
        skipped.iter().all(|r| r.contains("snapshotter")),
        "unexpected skip: {skipped:?}"
    );
    for id in [
        "version",
        "introspection",
        "namespaces",
        "events",
        "healthcheck",
    ] {
        assert!(
            rows.iter().any(|r| r.starts_with("io.containerd.grpc.v1")
                && r.split_whitespace().nth(1) == Some(id)),
            "missing grpc plugin {id}:\n{out}"
        );
    }
    let grpc_only = daemon.ctr_ok(&["plugins", "ls", "type==io.containerd.grpc.v1"]);
    assert!(
        grpc_only
            .lines()
            .skip(1)
            .all(|r| r.starts_with("io.containerd.grpc.v1")),
        "{grpc_only}"
    );
    let one = daemon.ctr_ok(&["plugins", "ls", "id==version"]);
    assert_eq!(one.lines().count(), 2, "{one}");

    let err = daemon.ctr_err(&["plugins", "ls", "id=="]);
    assert!(
        err.contains("InvalidArgument") || err.contains("invalid argument"),
        "{err}"
    );
    let err = daemon.ctr_err(&["plugins", "ls", "id~=("]);
    assert!(err.contains("invalid"), "{err}");
}

#[test]
fn namespaces_lifecycle_and_errors() {
    // No start-up collection: the blob ingested below is referenced by nothing, and the
    // collection (100 ms after start) could otherwise remove it before the `rm` it blocks.
    let daemon = Daemon::start_with_config(berth_testkit::NO_STARTUP_GC);
    // Every ctr command reads the default namespace first; it must work on a fresh daemon.
    daemon.ctr_ok(&["namespaces", "ls"]);

    daemon.ctr_ok(&["namespaces", "create", "team-a", "owner=alice"]);
    let out = daemon.ctr_ok(&["namespaces", "ls"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("team-a") && l.contains("owner=alice")),
        "{out}"
    );

    daemon.ctr_ok(&["namespaces", "label", "team-a", "tier=gold", "owner="]);
    let out = daemon.ctr_ok(&["namespaces", "ls"]);
    let row = out
        .lines()
        .find(|l| l.starts_with("team-a"))
        .expect("team-a listed");
    assert!(row.contains("tier=gold") && !row.contains("owner"), "{row}");

    let err = daemon.ctr_err(&["namespaces", "create", "team-a"]);
    assert!(
        err.contains("namespace \"team-a\": already exists"),
        "{err}"
    );

    let err = daemon.ctr_err(&["namespaces", "create", "bad..name"]);
    assert!(
        err.contains("invalid argument") && err.contains("bad..name"),
        "{err}"
    );

    // The service answers NotFound, which ctr (like containerd's) treats as "already gone".
    let out = daemon.ctr_ok(&["namespaces", "rm", "nobody"]);
    assert_eq!(out.trim(), "nobody");

    // A namespace holding content cannot be removed, and its content survives the attempt.
    let blob = b"kept while the namespace is busy";
    let ingest = daemon.ctr_with_input(&["-n", "team-a", "content", "ingest", "ref-1"], blob);
    assert!(
        ingest.status.success(),
        "{}",
        String::from_utf8_lossy(&ingest.stderr)
    );
    let err = daemon.ctr_err(&["namespaces", "rm", "team-a"]);
    assert!(
        err.contains("must be empty") && err.contains("blobs"),
        "{err}"
    );
    let listed = daemon.ctr_ok(&["-n", "team-a", "content", "ls", "-q"]);
    assert_eq!(listed.lines().count(), 1, "{listed}");
    let digest = listed.trim().to_string();
    daemon.ctr_ok(&["-n", "team-a", "content", "rm", &digest]);
    daemon.ctr_ok(&["namespaces", "rm", "team-a"]);
    let out = daemon.ctr_ok(&["namespaces", "ls"]);
    assert!(!out.contains("team-a"), "{out}");
}

#[test]
fn namespaces_survive_restart() {
    let mut daemon = Daemon::start();
    daemon.ctr_ok(&["namespaces", "create", "durable", "k=v"]);
    daemon.restart();
    let out = daemon.ctr_ok(&["namespaces", "ls"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("durable") && l.contains("k=v")),
        "{out}"
    );
}

/// `ctr events` in the background; lines arrive on the returned channel.
fn subscribe(daemon: &Daemon, filters: &[&str]) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = Command::new("ctr")
        .arg("--address")
        .arg(&daemon.socket)
        .arg("events")
        .args(filters)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ctr events");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Give the subscription time to be registered before anything is published.
    std::thread::sleep(Duration::from_millis(500));
    (child, rx)
}

#[test]
fn events_reach_subscribers_through_filters() {
    let daemon = Daemon::start();
    let (mut all, all_rx) = subscribe(&daemon, &[]);
    let (mut only_delete, delete_rx) = subscribe(&daemon, &["topic==/namespaces/delete"]);
    let (mut by_field, field_rx) = subscribe(&daemon, &["event.name==watched"]);

    daemon.ctr_ok(&["namespaces", "create", "watched"]);
    daemon.ctr_ok(&["namespaces", "create", "ignored"]);
    daemon.ctr_ok(&["namespaces", "rm", "watched"]);

    let next = |rx: &mpsc::Receiver<String>| rx.recv_timeout(Duration::from_secs(5)).ok();
    let first = next(&all_rx).expect("create event");
    assert!(
        first.contains("/namespaces/create") && first.contains("watched"),
        "{first}"
    );

    let deleted = next(&delete_rx).expect("delete event");
    assert!(
        deleted.contains("/namespaces/delete") && deleted.contains("watched"),
        "{deleted}"
    );

    let a = next(&field_rx).expect("first watched event");
    let b = next(&field_rx).expect("second watched event");
    assert!(
        a.contains("/namespaces/create") && b.contains("/namespaces/delete"),
        "{a}\n{b}"
    );
    assert!(
        field_rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "filter let another event through"
    );

    for child in [&mut all, &mut only_delete, &mut by_field] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn malformed_event_filters_are_rejected() {
    let daemon = Daemon::start();
    let output = Command::new("ctr")
        .arg("--address")
        .arg(&daemon.socket)
        .args(["events", "topic=="])
        .output()
        .expect("ctr events");
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("InvalidArgument") || err.contains("invalid argument"),
        "{err}"
    );
}
