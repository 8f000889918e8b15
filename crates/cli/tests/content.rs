//! `berth content ingest|get` against a private berthd (started by the testkit), checked
//! with the stock `ctr`.

mod common;

use common::write_partial_ingest;
use sha2::{Digest as _, Sha256};
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn daemon_or_skip() -> Option<berth_testkit::Daemon> {
    if !berth_testkit::have("ctr") {
        eprintln!("SKIP: ctr missing");
        return None;
    }
    // No start-up collection: the blobs written here are referenced by nothing.
    Some(berth_testkit::Daemon::start_with_config(
        berth_testkit::NO_STARTUP_GC,
    ))
}

fn berth(socket: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
    cmd.arg("--address")
        .arg(socket)
        .args(args)
        .env_remove("BERTH_ADDRESS")
        .env_remove("CONTAINERD_NAMESPACE")
        .env("HOME", "/nonexistent");
    cmd
}

/// Runs `berth … content ingest` with `data` piped into its standard input.
fn ingest_from_pipe(socket: &Path, args: &[&str], data: &[u8]) -> Output {
    let mut child = berth(socket, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running berth");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let feeder = std::thread::spawn(move || {
        // A refused ingest may stop reading early: a broken pipe is fine then.
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().expect("waiting for berth");
    feeder.join().unwrap();
    out
}

/// Runs `berth … content ingest` with the file `path` as its standard input.
fn ingest_from_file(socket: &Path, args: &[&str], path: &Path) -> Output {
    berth(socket, args)
        .stdin(std::fs::File::open(path).unwrap())
        .output()
        .expect("running berth")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).trim().to_string(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// Bytes that are not a repetition of one block (xorshift), so a misplaced chunk shows.
fn test_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha256_digest(data: &[u8]) -> String {
    let hash = Sha256::digest(data);
    format!(
        "sha256:{}",
        hash.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

#[test]
fn ingest_round_trips_through_ctr_and_get() {
    let Some(d) = daemon_or_skip() else { return };
    // Several 1 MiB messages and a partial last one, from a pipe (reads of 64 KiB).
    let data = test_bytes(5 * (1 << 20) + 12_345, 7);
    let digest = sha256_digest(&data);
    let size = data.len().to_string();
    let o = ingest_from_pipe(
        &d.socket,
        &[
            "content",
            "ingest",
            "round-trip",
            "--expected-digest",
            &digest,
            "--expected-size",
            &size,
        ],
        &data,
    );
    let (out, err) = text(&o);
    assert!(
        o.status.success(),
        "{err}\n{}",
        berth_testkit::tail(&d.log(), 30)
    );
    assert_eq!(out, digest);

    let listed = d.ctr_ok(&["content", "ls"]);
    assert!(listed.lines().any(|l| l.starts_with(&digest)), "{listed}");
    let got = d.ctr(&["content", "get", &digest]);
    assert!(got.status.success(), "{}", text(&got).1);
    assert!(got.stdout == data, "ctr content get returned other bytes");
    let got = berth(&d.socket, &["content", "get", &digest])
        .output()
        .unwrap();
    assert!(got.status.success(), "{}", text(&got).1);
    assert!(got.stdout == data, "berth content get returned other bytes");
    assert!(
        d.ctr_ok(&["content", "active"]).lines().count() <= 1,
        "no ingest is left behind"
    );

    // Without expectations, from a file; the same blob again with the expected digest
    // is reported as present.
    let file = d.dir.path().join("blob");
    std::fs::write(&file, &data).unwrap();
    let o = ingest_from_file(&d.socket, &["content", "ingest", "again"], &file);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "a second commit of the blob: {out}");
    assert!(err.contains("already exists"), "{err}");
    let o = ingest_from_file(
        &d.socket,
        &["content", "ingest", "again", "--expected-digest", &digest],
        &file,
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(out, digest);
    assert!(err.contains("exists already"), "{err}");
}

#[test]
fn a_digest_mismatch_commits_nothing() {
    let Some(d) = daemon_or_skip() else { return };
    let data = test_bytes(3 * (1 << 20) + 5, 11);
    let wrong = sha256_digest(b"something else");
    let o = ingest_from_pipe(
        &d.socket,
        &["content", "ingest", "mismatch", "--expected-digest", &wrong],
        &data,
    );
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        err.contains("ingest mismatch: unexpected commit digest")
            && err.contains(&wrong)
            && err.contains("failed precondition")
            && err.contains("the ingest was removed"),
        "{err}"
    );
    let listed = d.ctr_ok(&["content", "ls"]);
    assert!(!listed.contains(&sha256_digest(&data)), "{listed}");
    assert!(!listed.contains(&wrong), "{listed}");
    let active = d.ctr_ok(&["content", "active"]);
    assert!(!active.contains("mismatch"), "{active}");

    // A size mismatch likewise.
    let o = ingest_from_pipe(
        &d.socket,
        &["content", "ingest", "short", "--expected-size", "99"],
        b"0123456789",
    );
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("ingest short:") && err.contains("failed precondition"),
        "{err}"
    );
    assert!(
        !d.ctr_ok(&["content", "ls"])
            .contains(&sha256_digest(b"0123456789"))
    );
}

#[test]
fn an_interrupted_ingest_is_resumed() {
    let Some(d) = daemon_or_skip() else { return };
    let data = test_bytes(4 * (1 << 20) + 777, 23);
    let digest = sha256_digest(&data);
    let part = 1 << 20 | 4321;
    write_partial_ingest(&d.socket, "resumable", &data[..part], 0);
    let active = d.ctr_ok(&["content", "active"]);
    assert!(active.contains("resumable"), "{active}");

    // From a file: the ingest goes on at the daemon's offset (the input is seeked).
    let file = d.dir.path().join("blob");
    std::fs::write(&file, &data).unwrap();
    let o = ingest_from_file(
        &d.socket,
        &[
            "content",
            "ingest",
            "resumable",
            "--expected-digest",
            &digest,
        ],
        &file,
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(out, digest);
    assert!(
        err.contains(&format!(
            "resumed ingest resumable at byte {part} of {}",
            data.len()
        )),
        "{err}"
    );
    assert!(d.ctr(&["content", "get", &digest]).stdout == data);

    // From a pipe: the bytes the daemon has are read and skipped.
    let other = test_bytes(2 * (1 << 20) + 3, 29);
    let other_digest = sha256_digest(&other);
    write_partial_ingest(&d.socket, "resumable-pipe", &other[..1 << 20], 0);
    let o = ingest_from_pipe(&d.socket, &["content", "ingest", "resumable-pipe"], &other);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(out, other_digest);
    assert!(
        err.contains("resumed ingest resumable-pipe at byte 1048576"),
        "{err}"
    );
    assert!(d.ctr(&["content", "get", &other_digest]).stdout == other);
}
