//! The restart monitor's policies (`containerd.io/restart.policy`, `…restart.count`)
//! through a real berthd, with containers of the busybox fixture started by the stock
//! `ctr run -d --label …`.

use berth_testkit::Daemon;
use std::time::{Duration, Instant};

const IMAGE: &str = "import.local/busybox:latest";
const IDS: [&str; 6] = [
    "fail-twice",
    "ok-once",
    "always",
    "never",
    "bad-policy",
    "unless",
];

/// The daemon, driven in a namespace of this test run's own: the stock shim keeps runc
/// state under `/run/containerd/runc/<namespace>`, shared by every daemon on the host.
struct Env {
    d: Daemon,
    ns: String,
}

impl Env {
    fn ctr_ok(&self, args: &[&str]) -> String {
        self.d
            .ctr_ok(&[&["-n", self.ns.as_str()][..], args].concat())
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        self.d.ctr(&[&["-n", self.ns.as_str()][..], args].concat())
    }
}

impl Drop for Env {
    /// Whatever the test's outcome: no task is wanted running any more, none is left
    /// (the daemon's own drop then stops it and removes its directories).
    fn drop(&mut self) {
        for id in IDS {
            let _ = self.ctr(&[
                "containers",
                "label",
                id,
                "containerd.io/restart.status=stopped",
            ]);
            let _ = self.ctr(&["task", "delete", "-f", id]);
            let _ = self.ctr(&["containers", "rm", id]);
        }
        berth_testkit::remove_namespace_leftovers(&self.ns);
    }
}
/// How often the monitor reconciles in these tests.
const INTERVAL_MS: u64 = 200;

fn can_run() -> bool {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    let tools = berth_testkit::have("runc") && berth_testkit::have("containerd-shim-runc-v2");
    if !(root && tools) {
        eprintln!("SKIP: needs root, runc and containerd-shim-runc-v2");
    }
    root && tools
}

fn labels(d: &Env, id: &str) -> serde_json::Map<String, serde_json::Value> {
    let info: serde_json::Value =
        serde_json::from_str(&d.ctr_ok(&["containers", "info", id])).unwrap();
    info["Labels"].as_object().cloned().unwrap_or_default()
}

fn count(d: &Env, id: &str) -> Option<u32> {
    labels(d, id)
        .get("containerd.io/restart.count")
        .and_then(|v| v.as_str())
        .map(|v| v.parse().unwrap())
}

/// The task's status column in `ctr task ls`, if it has a task.
fn status(d: &Env, id: &str) -> Option<String> {
    d.ctr_ok(&["task", "ls"]).lines().skip(1).find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        (cols.first() == Some(&id)).then(|| cols.last().unwrap().to_string())
    })
}

fn wait_for(d: &Env, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; tasks:\n{}\ncontainers:\n{}\nlog:\n{}",
            d.ctr_ok(&["task", "ls"]),
            d.ctr_ok(&["containers", "ls"]),
            berth_testkit::tail(&d.d.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run(d: &Env, id: &str, policy: Option<&str>, cmd: &[&str]) {
    let mut args = vec![
        "run",
        "-d",
        "--label",
        "containerd.io/restart.status=running",
    ];
    let policy_label = policy.map(|p| format!("containerd.io/restart.policy={p}"));
    if let Some(label) = &policy_label {
        args.extend(["--label", label.as_str()]);
    }
    args.extend([IMAGE, id]);
    args.extend(cmd);
    d.ctr_ok(&args);
}

#[test]
fn restart_policies_decide_what_the_monitor_restarts() {
    if !can_run() {
        return;
    }
    let d = Env {
        d: Daemon::start_with_config(&format!(
            "[plugins.\"io.containerd.internal.v1.restart\"]\n  interval = \"{INTERVAL_MS}ms\"\n"
        )),
        ns: format!("restart-{}", std::process::id()),
    };
    let tar = berth_testkit::fixtures().join("busybox.oci.tar");
    d.ctr_ok(&["images", "import", tar.to_str().unwrap()]);
    let fail = ["sh", "-c", "exit 3"];
    let succeed = ["sh", "-c", "exit 0"];
    run(&d, "fail-twice", Some("on-failure:2"), &fail);
    run(&d, "ok-once", Some("on-failure"), &succeed);
    run(&d, "always", Some("always"), &succeed);
    run(&d, "never", Some("no"), &fail);
    run(&d, "bad-policy", Some("sometimes"), &fail);
    run(&d, "unless", Some("unless-stopped"), &["sleep", "1000"]);

    // on-failure:2: restarted twice after failing, then left stopped.
    wait_for(
        &d,
        "two restarts of fail-twice",
        Duration::from_secs(30),
        || count(&d, "fail-twice") == Some(2),
    );
    // `always` keeps restarting a container that exits successfully.
    wait_for(
        &d,
        "two restarts of always",
        Duration::from_secs(30),
        || count(&d, "always").is_some_and(|c| c >= 2),
    );
    // Many intervals later the others are as they were.
    std::thread::sleep(Duration::from_millis(10 * INTERVAL_MS));
    assert_eq!(count(&d, "fail-twice"), Some(2), "no third restart");
    wait_for(&d, "fail-twice to stop", Duration::from_secs(10), || {
        status(&d, "fail-twice").as_deref() == Some("STOPPED")
    });
    for id in ["ok-once", "never", "bad-policy"] {
        assert_eq!(count(&d, id), None, "{id} was restarted");
        assert_eq!(status(&d, id).as_deref(), Some("STOPPED"), "{id}");
    }
    assert!(
        d.d.log()
            .contains("restart policy \"sometimes\" not supported"),
        "the bad policy is reported: {}",
        d.d.log()
    );

    // unless-stopped: a killed task comes back...
    assert_eq!(status(&d, "unless").as_deref(), Some("RUNNING"));
    d.ctr_ok(&["task", "kill", "-s", "KILL", "unless"]);
    wait_for(
        &d,
        "unless to be restarted",
        Duration::from_secs(30),
        || count(&d, "unless") == Some(1) && status(&d, "unless").as_deref() == Some("RUNNING"),
    );
    // ...unless the user stopped it (the label a client sets when it stops one).
    d.ctr_ok(&[
        "containers",
        "label",
        "unless",
        "containerd.io/restart.explicitly-stopped=true",
    ]);
    d.ctr_ok(&["task", "kill", "-s", "KILL", "unless"]);
    wait_for(&d, "unless to stop", Duration::from_secs(10), || {
        status(&d, "unless").as_deref() == Some("STOPPED")
    });
    std::thread::sleep(Duration::from_millis(10 * INTERVAL_MS));
    assert_eq!(status(&d, "unless").as_deref(), Some("STOPPED"));
    assert_eq!(count(&d, "unless"), Some(1));

    // Clean up through the monitor: desired state stopped, tasks go, then containers.
    for id in IDS {
        d.ctr_ok(&[
            "containers",
            "label",
            id,
            "containerd.io/restart.status=stopped",
        ]);
    }
    wait_for(
        &d,
        "every task to be deleted",
        Duration::from_secs(30),
        || IDS.iter().all(|id| status(&d, id).is_none()),
    );
    for id in IDS {
        d.ctr_ok(&["containers", "rm", id]);
    }
}
