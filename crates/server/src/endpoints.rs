//! The small side endpoints: Prometheus metrics over HTTP and the debug socket.
//!
//! Both answer one short request per connection, so a tiny HTTP/1.1 responder is enough
//! and keeps an HTTP server stack out of the daemon's memory.

use crate::state::{DaemonState, prometheus_text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};

/// The longest request head read before answering 431.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Serves `GET /v1/metrics` until the task is aborted.
pub async fn serve_metrics(listener: TcpListener, state: DaemonState) {
    loop {
        let (mut stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let response = match read_request_line(&mut stream).await {
                Ok(Some(line)) => respond(&line, &state),
                Ok(None) => http_response(431, "text/plain", "request header too large\n"),
                Err(_) => return,
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

fn respond(request_line: &str, state: &DaemonState) -> String {
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/v1/metrics") => http_response(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            &prometheus_text(state),
        ),
        ("GET" | "HEAD", _) => http_response(404, "text/plain", "not found\n"),
        _ => http_response(405, "text/plain", "method not allowed\n"),
    }
}

/// Reads the request head; returns its first line, or `None` when it is too large.
async fn read_request_line<S: AsyncReadExt + Unpin>(
    stream: &mut S,
) -> std::io::Result<Option<String>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST_HEAD {
            return Ok(None);
        }
    }
    let text = String::from_utf8_lossy(&head);
    Ok(Some(text.lines().next().unwrap_or("").to_string()))
}

fn http_response(code: u16, content_type: &str, body: &str) -> String {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        501 => "Not Implemented",
        _ => "Request Header Fields Too Large",
    };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// How long a debug client may take to send its request head.
const DEBUG_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves containerd's debug endpoints over HTTP (what `ctr pprof` and `curl
/// --unix-socket` ask for) until the task is aborted. See [`respond_debug`].
pub async fn serve_debug(listener: UnixListener, state: DaemonState) {
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                let state = state.clone();
                tokio::spawn(async move {
                    let request =
                        tokio::time::timeout(DEBUG_REQUEST_TIMEOUT, read_request_line(&mut stream))
                            .await;
                    let response = match request {
                        Ok(Ok(Some(line))) => respond_debug(&line, &state),
                        Ok(Ok(None)) => {
                            http_response(431, "text/plain", "request header too large\n")
                        }
                        Ok(Err(_)) | Err(_) => return,
                    };
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
            Err(e) => tracing::warn!(error = %e, "debug endpoint: accept failed"),
        }
    }
}

/// The paths containerd's debug socket serves, answered as a Rust daemon can:
///
/// - `/debug/vars`: the counters as one JSON object (Go's expvar shape: `cmdline`, then
///   berthd's own instead of Go's `memstats`);
/// - `/debug/pprof/goroutine`: the state dump and the daemon's threads (the nearest
///   thing to Go's goroutine dump, which `ctr pprof goroutines` asks for);
/// - `/debug/pprof/cmdline`: the command line, NUL-separated as Go's handler sends it;
/// - `/debug/pprof/`: an index of these;
/// - Go runtime profiles (`heap`, `profile`, `trace`, `block`, `threadcreate`, `mutex`,
///   `allocs`, `symbol`): 501 with a message saying so, never an empty or made-up profile.
fn respond_debug(request_line: &str, state: &DaemonState) -> String {
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !matches!(method, "GET" | "HEAD") {
        return http_response(405, "text/plain", "method not allowed\n");
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/debug/vars" => http_response(200, "application/json; charset=utf-8", &debug_vars(state)),
        "/debug/pprof/goroutine" => http_response(
            200,
            "text/plain; charset=utf-8",
            &format!("{}\n{}", state.dump(), thread_listing()),
        ),
        "/debug/pprof/cmdline" => http_response(
            200,
            "text/plain; charset=utf-8",
            &std::env::args().collect::<Vec<_>>().join("\0"),
        ),
        "/debug/pprof/" | "/debug/pprof" => http_response(
            200,
            "text/plain; charset=utf-8",
            "berthd debug endpoints:\n\
             /debug/vars             counters (JSON)\n\
             /debug/pprof/goroutine  state dump and threads (ctr pprof goroutines)\n\
             /debug/pprof/cmdline    command line\n\
             Go runtime profiles (heap, profile, trace, block, threadcreate, mutex, allocs) \
             do not exist in berthd, which is not a Go program.\n",
        ),
        _ => match path.strip_prefix("/debug/pprof/") {
            Some(
                profile @ ("heap" | "profile" | "trace" | "block" | "threadcreate" | "mutex"
                | "allocs" | "symbol"),
            ) => http_response(
                501,
                "text/plain; charset=utf-8",
                &format!(
                    "berthd: the Go runtime profile {profile:?} does not exist in berthd, which is \
                     not a Go program; /debug/pprof/goroutine lists its state and threads, \
                     /debug/vars its counters\n"
                ),
            ),
            _ => http_response(404, "text/plain", "not found\n"),
        },
    }
}

/// `/debug/vars`: expvar's JSON object.
fn debug_vars(state: &DaemonState) -> String {
    let counts = state.plugin_counts();
    let vars = serde_json::json!({
        "cmdline": std::env::args().collect::<Vec<_>>(),
        "berth": {
            "version": state.version(),
            "pid": std::process::id(),
            "uptime_seconds": state.uptime_seconds(),
            "resident_memory_bytes": crate::state::process_rss_bytes().unwrap_or(0),
            "threads": thread_ids().len(),
            "async_tasks": DaemonState::async_tasks(),
            "grpc_calls_in_flight": state.in_flight(),
            "event_subscribers": state.event_subscribers(),
            "plugins": {
                "loaded": counts.loaded,
                "failed": counts.failed,
                "skipped": counts.skipped,
            },
        },
    });
    format!("{vars:#}\n")
}

fn thread_ids() -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|t| t.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    ids
}

/// One line per thread of the daemon: its id, name, scheduler state and, when it
/// sleeps, the kernel function it waits in.
fn thread_listing() -> String {
    let mut out = String::from("threads:\n");
    for tid in thread_ids() {
        let dir = format!("/proc/self/task/{tid}");
        let read = |file: &str| {
            std::fs::read_to_string(format!("{dir}/{file}"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        let stat = read("stat");
        // The state is the field after the parenthesised name, which may hold spaces.
        let run_state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        let wchan = read("wchan");
        let _ = std::fmt::Write::write_fmt(
            &mut out,
            format_args!(
                "  thread {tid} {:?} state {run_state}{}\n",
                read("comm"),
                if wchan.is_empty() || wchan == "0" {
                    String::new()
                } else {
                    format!(" in {wchan}")
                }
            ),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::events::Exchange;

    #[tokio::test]
    async fn metrics_are_served_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let state = DaemonState::new(Vec::new(), Exchange::new());
        let server = tokio::spawn(serve_metrics(listener, state));

        let get = |path: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
            stream
                .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            response
        };
        let ok = get("/v1/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.contains("berth_uptime_seconds"), "{ok}");
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
