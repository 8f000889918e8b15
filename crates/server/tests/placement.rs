//! Where the daemon puts itself: gRPC over TCP with TLS (`[grpc] tcp_*`) and the cgroup
//! of `[cgroup] path`.

mod common;

use berth_api::services::version::v1::version_client::VersionClient;
use common::Daemon;
use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
    /// A client certificate from a CA the daemon does not trust.
    stranger: (String, String),
}

fn generate_pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let authority = |cn: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), Issuer::new(params, key))
    };
    let leaf = |issuer: &Issuer<'_, KeyPair>, names: Vec<String>, cn: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (ca, issuer) = authority("berth test CA");
    let (_, other_issuer) = authority("another CA");
    Pki {
        ca,
        server: leaf(&issuer, vec!["localhost".into()], "localhost"),
        client: leaf(&issuer, vec![], "berth test client"),
        stranger: leaf(&other_issuer, vec![], "stranger"),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `Version` over TLS with an optional client identity; the error text when refused.
fn version_over_tls(
    port: u16,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<String, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name("localhost");
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        let channel = Channel::from_shared(format!("https://127.0.0.1:{port}"))
            .unwrap()
            .tls_config(tls)
            .map_err(|e| format!("{e:?}"))?
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        let reply = VersionClient::new(channel)
            .version(())
            .await
            .map_err(|s| format!("version: {s:?}"))?;
        Ok(reply.into_inner().version)
    })
}

#[test]
fn tcp_endpoint_serves_tls_and_requires_client_certificates_from_the_ca() {
    let pki = generate_pki();
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "ca.pem", &pki.ca);
    let cert = write(dir.path(), "server.pem", &pki.server.0);
    let key = write(dir.path(), "server-key.pem", &pki.server.1);
    let port = free_port();
    // The test harness writes `[grpc] address` itself; the TCP keys come from an
    // imported file, which berthd merges key by key as containerd does.
    let tcp = write(
        dir.path(),
        "tcp.toml",
        &format!(
            "version = 2\n[grpc]\n  tcp_address = \"127.0.0.1:{port}\"\n  tcp_tls_ca = \"{}\"\n  tcp_tls_cert = \"{}\"\n  tcp_tls_key = \"{}\"\n",
            ca.display(),
            cert.display(),
            key.display()
        ),
    );
    let daemon = Daemon::start(&format!("imports = [\"{}\"]", tcp.display()), "");
    let version = version_over_tls(port, &pki.ca, Some(&pki.client))
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    assert!(!version.is_empty());
    // The unix socket stays plain and keeps working next to it.
    assert!(daemon.ctr_ok(&["version"]).contains("Server:"));

    let without = version_over_tls(port, &pki.ca, None);
    assert!(
        without.is_err(),
        "a client without a certificate was served"
    );
    let stranger = version_over_tls(port, &pki.ca, Some(&pki.stranger));
    assert!(
        stranger.is_err(),
        "a certificate from another CA was accepted"
    );
}

#[test]
fn tls_key_without_certificate_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let key = write(dir.path(), "key.pem", "not used");
    let port = free_port();
    let tcp = write(
        dir.path(),
        "tcp.toml",
        &format!(
            "version = 2\n[grpc]\n  tcp_address = \"127.0.0.1:{port}\"\n  tcp_tls_key = \"{}\"\n",
            key.display()
        ),
    );
    let result = Daemon::try_start(&format!("imports = [\"{}\"]", tcp.display()), "", &[]);
    let (status, log) = match result {
        Ok(daemon) => panic!("berthd started:\n{}", daemon.log()),
        Err(failure) => failure,
    };
    assert!(!status.expect("exited").success());
    assert!(log.contains("tcp_tls_cert and tcp_tls_key"), "{log}");
}

/// Removes the test's cgroup from every hierarchy once the daemon is gone.
struct CgroupCleanup(String);

impl Drop for CgroupCleanup {
    fn drop(&mut self) {
        let relative = self.0.trim_start_matches('/');
        for mount in cgroup_mounts() {
            let _ = std::fs::remove_dir(mount.join(relative));
        }
    }
}

fn cgroup_mounts() -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo
        .lines()
        .filter_map(|line| {
            let (fields, tail) = line.split_once(" - ")?;
            tail.starts_with("cgroup")
                .then(|| PathBuf::from(fields.split(' ').nth(4).unwrap()))
        })
        .collect()
}

#[test]
fn cgroup_path_moves_the_daemon_into_it() {
    let path = format!("/berth-test-{}", std::process::id());
    let _cleanup = CgroupCleanup(path.clone());
    let daemon = Daemon::start("", &format!("[cgroup]\n  path = \"{path}\"\n"));
    let membership = std::fs::read_to_string(format!("/proc/{}/cgroup", daemon.pid())).unwrap();
    let unified_only = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let mut checked = 0;
    for line in membership.lines() {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, cgroup) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        // On a cgroup v1 (or hybrid) host every v1 hierarchy holds the daemon at the
        // path; the hybrid v2 line (id 0) is left alone, as containerd leaves it.
        if unified_only == (id == "0") {
            assert_eq!(cgroup, path, "{controllers}: {membership}");
            checked += 1;
        }
    }
    assert!(checked > 0, "no hierarchy checked: {membership}");
    if !unified_only {
        let cpuset = Path::new("/sys/fs/cgroup/cpuset").join(path.trim_start_matches('/'));
        if cpuset.exists() {
            let cpus = std::fs::read_to_string(cpuset.join("cpuset.cpus")).unwrap();
            assert!(!cpus.trim().is_empty(), "cpuset.cpus left empty");
        }
    }
    assert!(daemon.ctr_ok(&["version"]).contains("Server:"));
}

#[test]
fn cgroup_path_with_dot_dot_is_refused() {
    let result = Daemon::try_start("", "[cgroup]\n  path = \"/a/../../b\"\n", &[]);
    let (status, log) = match result {
        Ok(daemon) => panic!("berthd started:\n{}", daemon.log()),
        Err(failure) => failure,
    };
    assert!(!status.expect("exited").success());
    assert!(log.contains("[cgroup] path"), "{log}");
}
