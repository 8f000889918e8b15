//! berthd as a process, driven with the stock `ctr` (Debian's containerd 1.6 package).
//! Run as root, like the daemon.

mod common;

use common::{BERTHD, Daemon, LineReader, TestDir, berthd, config_text};
use nix::sys::signal::Signal;
use prost::Message;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The lines of `ctr plugins ls` as (type, id, status).
fn plugin_rows(listing: &str) -> Vec<(String, String, String)> {
    listing
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() >= 4).then(|| {
                (
                    fields[0].to_string(),
                    fields[1].to_string(),
                    fields[fields.len() - 1].to_string(),
                )
            })
        })
        .collect()
}

#[test]
fn ctr_version_answers() {
    let daemon = Daemon::start("", "");
    let out = daemon.ctr_ok(&["version"]);
    assert!(out.contains("Server:"), "{out}");
    assert!(out.contains("berth"), "{out}");
}

#[test]
fn plugins_are_listed_ok_with_details_and_filters() {
    let daemon = Daemon::start("", "");
    let listing = daemon.ctr_ok(&["plugins", "ls"]);
    let rows = plugin_rows(&listing);
    // Every plugin containerd 1.6 lists on such a host (Debian's build), by the same URI.
    for expected in [
        ("io.containerd.internal.v1", "opt"),
        ("io.containerd.metadata.v1", "bolt"),
        ("io.containerd.grpc.v1", "version"),
        ("io.containerd.grpc.v1", "introspection"),
        ("io.containerd.event.v1", "exchange"),
        ("io.containerd.service.v1", "containers-service"),
        ("io.containerd.service.v1", "introspection-service"),
        ("io.containerd.service.v1", "namespaces-service"),
        ("io.containerd.service.v1", "tasks-service"),
        ("io.containerd.grpc.v1", "containers"),
        ("io.containerd.grpc.v1", "namespaces"),
        ("io.containerd.grpc.v1", "tasks"),
    ] {
        assert!(
            rows.iter()
                .any(|(t, i, _)| (t.as_str(), i.as_str()) == expected),
            "{expected:?} missing from\n{listing}"
        );
    }
    // "skip" is containerd's word for "does not apply on this host" (btrfs on ext4).
    for (t, id, status) in &rows {
        assert!(
            status == "ok" || status == "skip",
            "{t}.{id} is {status}:\n{listing}"
        );
    }

    // The platform column, as containerd fills it for these.
    for (t, id) in [
        ("io.containerd.differ.v1", "walking"),
        ("io.containerd.snapshotter.v1", "overlayfs"),
        ("io.containerd.snapshotter.v1", "native"),
        ("io.containerd.monitor.v1", "cgroups"),
        ("io.containerd.runtime.v1", "linux"),
    ] {
        let line = listing
            .lines()
            .find(|l| l.split_whitespace().take(2).eq([t, id]))
            .unwrap_or_else(|| panic!("{t}.{id} missing from\n{listing}"));
        assert!(line.contains("linux/"), "no platform for {t}.{id}: {line}");
    }

    let details = daemon.ctr_ok(&["plugins", "ls", "-d"]);
    assert!(details.contains("Type:"), "{details}");
    assert!(details.contains("io.containerd.metadata.v1"), "{details}");
    // The opt plugin exports its path.
    assert!(
        details.contains(&format!("{}/opt", daemon.dir.0.display())),
        "{details}"
    );

    let filtered = daemon.ctr_ok(&["plugins", "ls", "id==bolt"]);
    let rows = plugin_rows(&filtered);
    assert_eq!(rows.len(), 1, "{filtered}");
    assert_eq!(rows[0].1, "bolt");
}

#[test]
fn a_failing_plugin_is_shown_as_error_while_the_daemon_serves() {
    let daemon = Daemon::start(
        "",
        "[plugins.\"io.containerd.metadata.v1.bolt\"]\n  content_sharing_policy = \"bogus\"\n",
    );
    daemon.ctr_ok(&["version"]);
    let listing = daemon.ctr_ok(&["plugins", "ls"]);
    let rows = plugin_rows(&listing);
    let bolt = rows
        .iter()
        .find(|(_, id, _)| id == "bolt")
        .expect("bolt listed");
    assert_eq!(bolt.2, "error", "{listing}");
    let details = daemon.ctr_ok(&["plugins", "ls", "-d", "id==bolt"]);
    assert!(details.contains("bogus"), "{details}");
}

#[test]
fn a_missing_required_plugin_refuses_to_start() {
    let result = Daemon::try_start(
        "required_plugins = [\"io.containerd.grpc.v1.nonexistent\"]",
        "",
        &[],
    );
    let (status, log) = match result {
        Ok(daemon) => panic!("berthd started:\n{}", daemon.log()),
        Err(failure) => failure,
    };
    let status = status.expect("berthd exited");
    assert!(!status.success(), "{log}");
    assert!(log.contains("io.containerd.grpc.v1.nonexistent"), "{log}");
    assert!(log.contains("refusing to start"), "{log}");
}

#[test]
fn a_failing_required_plugin_refuses_to_start() {
    let result = Daemon::try_start(
        "required_plugins = [\"io.containerd.metadata.v1.bolt\"]",
        "[plugins.\"io.containerd.metadata.v1.bolt\"]\n  content_sharing_policy = \"bogus\"\n",
        &[],
    );
    let (status, log) = match result {
        Ok(daemon) => panic!("berthd started:\n{}", daemon.log()),
        Err(failure) => failure,
    };
    assert!(!status.expect("berthd exited").success());
    assert!(
        log.contains("required plugin io.containerd.metadata.v1.bolt"),
        "{log}"
    );
}

#[test]
fn disabled_plugins_are_not_loaded() {
    let daemon = Daemon::start(
        "disabled_plugins = [\"io.containerd.grpc.v1.healthcheck\"]",
        "",
    );
    let listing = daemon.ctr_ok(&["plugins", "ls"]);
    assert!(!listing.contains("healthcheck"), "{listing}");
    assert!(listing.contains("introspection"), "{listing}");
}

#[test]
fn a_malformed_config_names_file_and_line() {
    let dir = TestDir::new();
    let path = dir.path("bad.toml");
    std::fs::write(&path, "version = 2\nroot = \"/tmp/x\"\noom_score = = 1\n").unwrap();
    let output = berthd(&["--config", path.to_str().unwrap()]);
    assert!(!output.status.success());
    let err = stderr_of(&output);
    assert!(err.contains(path.to_str().unwrap()), "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("oom_score"), "{err}");

    std::fs::write(&path, "version = 2\n[grpc]\n  gid = \"wheel\"\n").unwrap();
    let output = berthd(&["--config", path.to_str().unwrap()]);
    assert!(!output.status.success());
    let err = stderr_of(&output);
    assert!(err.contains("line 3") && err.contains("grpc.gid"), "{err}");
}

#[test]
fn an_explicit_missing_config_is_an_error() {
    let output = berthd(&["--config", "/nonexistent/berth.toml", "config", "dump"]);
    assert!(!output.status.success());
    assert!(stderr_of(&output).contains("/nonexistent/berth.toml"));
}

#[test]
fn config_default_and_dump_reparse() {
    let dir = TestDir::new();
    let default = berthd(&["config", "default"]);
    assert!(default.status.success(), "{}", stderr_of(&default));
    let default_text = String::from_utf8(default.stdout).unwrap();
    assert!(
        default_text.contains("root = \"/var/lib/berth\""),
        "{default_text}"
    );
    assert!(default_text.contains("address = \"/run/berth/berth.sock\""));
    assert!(default_text.contains("[plugins.\"io.containerd.metadata.v1.bolt\"]"));
    assert!(!default_text.contains("containerd.sock"));
    let default_file = dir.path("default.toml");
    std::fs::write(&default_file, &default_text).unwrap();

    // The default, read back, dumps to itself with no warning.
    let dump = berthd(&["--config", default_file.to_str().unwrap(), "config", "dump"]);
    assert!(dump.status.success(), "{}", stderr_of(&dump));
    assert_eq!(stderr_of(&dump), "");
    assert_eq!(String::from_utf8(dump.stdout).unwrap(), default_text);

    // A config with an import dumps the merged result, which parses again.
    std::fs::create_dir(dir.path("conf.d")).unwrap();
    std::fs::write(
        dir.path("conf.d/a.toml"),
        "version = 2\noom_score = -100\n[plugins.\"io.containerd.metadata.v1.bolt\"]\n  content_sharing_policy = \"isolated\"\n",
    )
    .unwrap();
    let main = dir.path("main.toml");
    std::fs::write(
        &main,
        "version = 2\nimports = [\"conf.d/*.toml\"]\nroot = \"/srv/berth\"\n",
    )
    .unwrap();
    let dump = berthd(&["--config", main.to_str().unwrap(), "config", "dump"]);
    assert!(dump.status.success(), "{}", stderr_of(&dump));
    let dump_text = String::from_utf8(dump.stdout).unwrap();
    assert!(dump_text.contains("root = \"/srv/berth\""), "{dump_text}");
    assert!(dump_text.contains("oom_score = -100"), "{dump_text}");
    assert!(
        dump_text.contains("content_sharing_policy = \"isolated\""),
        "{dump_text}"
    );
    let dumped = dir.path("dumped.toml");
    std::fs::write(&dumped, &dump_text).unwrap();
    let again = berthd(&["--config", dumped.to_str().unwrap(), "config", "dump"]);
    assert!(again.status.success(), "{}", stderr_of(&again));
    assert_eq!(String::from_utf8(again.stdout).unwrap(), dump_text);
}

#[test]
fn sigterm_shuts_down_cleanly_and_removes_sockets() {
    let mut daemon = Daemon::start("", "");
    let ttrpc = daemon.dir.path("b.sock.ttrpc");
    assert!(ttrpc.exists());
    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status:?}\n{}", daemon.log());
    assert!(!daemon.socket.exists());
    assert!(!ttrpc.exists());
    assert!(daemon.log().contains("berthd stopped"), "{}", daemon.log());
}

#[test]
fn sigterm_with_an_open_event_stream_still_exits() {
    let mut daemon = Daemon::start("", "");
    let _events = LineReader::spawn(
        Command::new("ctr")
            .arg("--address")
            .arg(&daemon.socket)
            .arg("events"),
    );
    std::thread::sleep(Duration::from_millis(300));
    daemon.signal(Signal::SIGINT);
    let status = daemon.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{}", daemon.log());
    assert!(!daemon.socket.exists());
}

#[test]
fn sockets_are_0660_and_path_based() {
    let daemon = Daemon::start("", "");
    for name in ["b.sock", "b.sock.ttrpc"] {
        let meta = std::fs::metadata(daemon.dir.path(name)).unwrap();
        assert!(meta.file_type().is_socket(), "{name}");
        assert_eq!(meta.mode() & 0o777, 0o660, "{name}");
    }
    let unix = std::fs::read_to_string("/proc/net/unix").unwrap();
    assert!(
        unix.contains(daemon.address()),
        "the socket is not bound by path"
    );
    let abstract_name = format!("@{}", daemon.address());
    assert!(!unix.contains(&abstract_name));
}

#[test]
fn an_abstract_address_is_refused() {
    let result = Daemon::try_start("", "", &["--address", "@berth-test"]);
    let (status, log) = match result {
        Ok(daemon) => panic!("berthd started:\n{}", daemon.log()),
        Err(failure) => failure,
    };
    assert!(!status.expect("exited").success());
    assert!(log.contains("abstract"), "{log}");
}

/// An event in the wire form `berthd publish` reads from stdin.
fn namespace_event(name: &str) -> Vec<u8> {
    let event = berth_api::containerd::events::NamespaceCreate {
        name: name.to_string(),
        labels: Default::default(),
    };
    berth_api::any::pack(&event).encode_to_vec()
}

/// Repeats `send` until `ctr events` shows a line containing `needle` (the subscriber may
/// not be registered yet when the first event goes out).
fn expect_event(events: &LineReader, needle: &str, mut send: impl FnMut()) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        send();
        while let Ok(line) = events.lines.recv_timeout(Duration::from_millis(300)) {
            if line.contains(needle) {
                return line;
            }
        }
    }
    panic!("no event containing {needle:?} arrived");
}

#[test]
fn berthd_publish_reaches_a_ctr_events_subscriber() {
    let daemon = Daemon::start("", "");
    let events = LineReader::spawn(
        Command::new("ctr")
            .arg("--address")
            .arg(&daemon.socket)
            .arg("events"),
    );
    let line = expect_event(&events, "/test/published", || {
        let mut child = Command::new(BERTHD)
            .args(["--address", daemon.address(), "publish"])
            .args(["--namespace", "default", "--topic", "/test/published"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&namespace_event("from-publish"))
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "publish failed: {}",
            stderr_of(&output)
        );
    });
    assert!(line.contains("default"), "{line}");
    assert!(line.contains("from-publish"), "{line}");
}

#[test]
fn publish_reports_bad_input() {
    let daemon = Daemon::start("", "");
    let mut child = Command::new(BERTHD)
        .args([
            "publish",
            "--address",
            daemon.address(),
            "--namespace",
            "default",
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdin.take());
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    assert!(
        stderr_of(&output).contains("topic required"),
        "{}",
        stderr_of(&output)
    );
}

#[test]
fn ttrpc_forward_reaches_a_ctr_events_subscriber() {
    use containerd_shim_protos::protobuf::MessageField;
    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    use containerd_shim_protos::shim::event::Envelope;
    use containerd_shim_protos::shim::events::ForwardRequest;

    let daemon = Daemon::start("", "");
    let events = LineReader::spawn(
        Command::new("ctr")
            .arg("--address")
            .arg(&daemon.socket)
            .arg("events"),
    );
    let ttrpc_address = format!("unix://{}.ttrpc", daemon.address());
    let client = ttrpc::Client::connect(&ttrpc_address).expect("connecting to the ttrpc socket");
    let client = containerd_shim_protos::EventsClient::new(client);
    let line = expect_event(&events, "/test/forwarded", || {
        let mut any = Any::new();
        any.type_url = "containerd.events.NamespaceCreate".into();
        any.value = berth_api::containerd::events::NamespaceCreate {
            name: "from-shim".into(),
            labels: Default::default(),
        }
        .encode_to_vec();
        let mut envelope = Envelope::new();
        envelope.namespace = "shimns".into();
        envelope.topic = "/test/forwarded".into();
        envelope.event = MessageField::some(any);
        let mut request = ForwardRequest::new();
        request.envelope = MessageField::some(envelope);
        client
            .forward(ttrpc::context::with_timeout(5_000_000_000), &request)
            .expect("Forward");
    });
    assert!(
        line.contains("shimns"),
        "the envelope's namespace is kept: {line}"
    );
    assert!(line.contains("from-shim"), "{line}");
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The whole HTTP response of a GET on the debug socket.
fn debug_get(socket: &std::path::Path, path: &str) -> String {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn metrics_debug_socket_and_sigusr1_dump() {
    let port = free_tcp_port();
    let daemon = Daemon::start(
        "",
        &format!(
            "[metrics]\n  address = \"127.0.0.1:{port}\"\n[debug]\n  address = \"@DIR@/debug.sock\"\n"
        ),
    );
    // Metrics over HTTP.
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /v1/metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains("berth_process_resident_memory_bytes"),
        "{response}"
    );
    assert!(
        response.contains("berth_plugins{status=\"ok\"}"),
        "{response}"
    );

    // The debug socket speaks containerd's HTTP: the stock `ctr pprof goroutines` gets
    // the state dump and the daemon's threads, `/debug/vars` expvar's JSON object, a Go
    // runtime profile a 501 that says why, and no client can hold a connection open.
    let debug_socket = daemon.dir.path("debug.sock");
    let socket = debug_socket.to_str().unwrap();
    let dump = daemon.ctr_ok(&["pprof", "--debug-socket", socket, "goroutines"]);
    assert!(dump.contains("io.containerd.metadata.v1.bolt ok"), "{dump}");
    assert!(dump.contains("threads:\n  thread "), "{dump}");
    let heap = daemon.ctr(&["pprof", "--debug-socket", socket, "heap"]);
    let stderr = String::from_utf8_lossy(&heap.stderr);
    assert!(
        !heap.status.success() && stderr.contains("501 Not Implemented"),
        "{stderr}"
    );
    let heap = debug_get(&debug_socket, "/debug/pprof/heap");
    assert!(heap.contains("not a Go program"), "{heap}");
    let vars = debug_get(&debug_socket, "/debug/vars");
    assert!(vars.starts_with("HTTP/1.1 200 OK"), "{vars}");
    let body = vars.split_once("\r\n\r\n").unwrap().1;
    let vars: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        vars["berth"]["pid"].as_u64(),
        Some(daemon.pid() as u64),
        "{vars}"
    );
    assert!(
        vars["cmdline"][0].as_str().unwrap().ends_with("berthd"),
        "{vars}"
    );
    assert!(
        vars["berth"]["plugins"]["loaded"].as_u64().unwrap() > 20,
        "{vars}"
    );
    assert!(debug_get(&debug_socket, "/debug/pprof/profile?seconds=1").starts_with("HTTP/1.1 501"));
    assert!(debug_get(&debug_socket, "/nope").starts_with("HTTP/1.1 404"));
    let mut silent = std::os::unix::net::UnixStream::connect(&debug_socket).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let started = Instant::now();
    let mut nothing = Vec::new();
    let _ = silent.read_to_end(&mut nothing);
    assert!(
        nothing.is_empty() && started.elapsed() < Duration::from_secs(15),
        "a client that sends nothing is dropped after the request timeout"
    );

    // SIGUSR1 logs the same dump.
    daemon.signal(Signal::SIGUSR1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !daemon.log().contains("state dump") {
        assert!(Instant::now() < deadline, "{}", daemon.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(daemon.log().contains("event subscribers"));
}

#[test]
fn oom_score_opt_environment_and_json_logs() {
    let daemon = match Daemon::try_start(
        "oom_score = 123",
        "[debug]\n  address = \"@DIR@/debug.sock\"\n",
        &["--log-format", "json"],
    ) {
        Ok(daemon) => daemon,
        Err((status, log)) => panic!("{status:?}\n{log}"),
    };
    let adj = std::fs::read_to_string(format!("/proc/{}/oom_score_adj", daemon.pid())).unwrap();
    assert_eq!(adj.trim(), "123");

    // /proc/PID/environ shows the environment at exec; the debug dump shows the live one.
    let dump = debug_get(
        &daemon.dir.path("debug.sock"),
        "/debug/pprof/goroutine?debug=2",
    );
    let opt = daemon.dir.path("opt");
    let path_line = format!("PATH={}/bin:", opt.display());
    assert!(dump.contains(&path_line), "{dump}");
    let ld_line = format!("LD_LIBRARY_PATH={}/lib", opt.display());
    assert!(dump.contains(&ld_line), "{dump}");
    assert!(daemon.dir.path("opt/bin").is_dir());

    let log = daemon.log();
    let first = log.lines().next().expect("a log line");
    assert!(
        first.starts_with('{') && first.contains("\"level\""),
        "{log}"
    );
}

fn mode_of(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o7777
}

/// CVE-2024-25621 (GHSA-pwhc-rpq9-4c8w) and CVE-2021-41103 (GHSA-c2h3-6mxw-7mvq): local
/// users must not reach into the root (metadata, content, snapshots, which can hold
/// setuid binaries) nor list the state directory. The root is 0700, also when an older
/// release left it more open; the state directory is 0711 (traversable, as containerd
/// keeps it for user-namespaced containers, not listable); every plugin directory in
/// the root is closed to others.
#[test]
fn root_is_0700_even_when_it_existed_wider_and_state_is_0711() {
    let mut daemon = Daemon::start("", "");
    let (root, state) = (daemon.dir.path("root"), daemon.dir.path("state"));
    assert_eq!(mode_of(&root), 0o700, "root");
    assert_eq!(mode_of(&state), 0o711, "state");

    // As an older release (or containerd before 1.7.29) would have left it.
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(10)).success());
    std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut again = Command::new(BERTHD)
        .arg("--config")
        .arg(daemon.dir.path("config.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&daemon.socket).is_err() {
        assert!(Instant::now() < deadline, "berthd did not start again");
        assert!(again.try_wait().unwrap().is_none(), "berthd exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let root_mode = mode_of(&root);
    let plugin_dirs: Vec<(String, u32)> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                mode_of(&e.path()),
            )
        })
        .collect();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(again.id() as i32),
        Signal::SIGTERM,
    );
    let _ = again.wait();
    assert_eq!(root_mode, 0o700, "an existing 0755 root is tightened");
    assert!(!plugin_dirs.is_empty());
    for (name, mode) in plugin_dirs {
        assert_eq!(mode & 0o022, 0, "{name} is writable by others: {mode:o}");
    }
}

#[test]
fn the_test_config_is_valid() {
    let dir = TestDir::new();
    let text = config_text(&dir.0, "", "");
    let (config, warnings) = berth_server::config::Config::parse(&text, "test").unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(config.grpc.address, format!("{}/b.sock", dir.0.display()));
}
