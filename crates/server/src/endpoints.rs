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
        _ => "Request Header Fields Too Large",
    };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Writes the state dump to every client that connects, until the task is aborted.
pub async fn serve_debug(listener: UnixListener, state: DaemonState) {
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                let dump = state.dump();
                tokio::spawn(async move {
                    let _ = stream.write_all(dump.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
            Err(e) => tracing::warn!(error = %e, "debug endpoint: accept failed"),
        }
    }
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
