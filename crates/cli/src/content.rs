//! `berth content ingest` and `berth content get`: a blob in and out of the content store
//! through the content API's `Write` and `Read` calls.
//!
//! The ingest keeps [`IN_FLIGHT`] `Write` messages on the one stream instead of waiting
//! for each reply before sending the next, as `ctr content ingest` does: the daemon
//! answers the messages of a stream in order, so the replies are checked against the
//! offsets sent, one by one, while the input is read and sent ahead. Reading the input
//! (a thread with [`CHUNK`]-sized buffers), sending and the daemon's writing then
//! overlap instead of taking turns.

use crate::CliError;
use crate::client::{Client, status_message};
use berth_api::services::content::v1::{
    AbortRequest, ReadContentRequest, WriteAction, WriteContentRequest, WriteContentResponse,
};
use bytes::Bytes;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

/// Bytes per `Write` message: containerd's and ctr's 1 MiB, well under any daemon's
/// 16 MiB message limit.
pub const CHUNK: usize = 1 << 20;
/// `Write` messages sent and not yet answered. Eight keep the daemon busy while a reply
/// travels back and the next buffers are read, and bound what the daemon queues.
pub const IN_FLIGHT: usize = 8;

/// What `berth content ingest` did.
#[derive(Debug)]
pub struct Ingested {
    pub digest: String,
    pub size: i64,
    /// Where a previous, interrupted ingest of the same ref stood (0 for a fresh one).
    pub resumed_at: i64,
    /// The blob was in the store already (the expected digest was given).
    pub existed: bool,
}

/// Writes `input` into the content store as ingest `ref` and commits it, verifying
/// `expected_digest` and `expected_size` if given. An ingest left by an interrupted run
/// of the same ref is resumed where it stopped (`input` is skipped that far, by seeking
/// when it is a file). A digest or size mismatch at commit aborts the ingest: its data
/// can never become the blob asked for.
pub async fn ingest<R: Read + Seek + Send + 'static>(
    client: &Client,
    r#ref: &str,
    expected_digest: Option<&str>,
    expected_size: Option<i64>,
    mut input: R,
) -> Result<Ingested, CliError> {
    let what = format!("ingest {ref}");
    let (requests, outgoing) = mpsc::channel::<WriteContentRequest>(IN_FLIGHT + 2);
    // The call is answered once the daemon has the first message and opened the ingest.
    requests
        .send(WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: r#ref.to_string(),
            total: expected_size.unwrap_or(0),
            expected: expected_digest.unwrap_or_default().to_string(),
            ..Default::default()
        })
        .await
        .map_err(|_| CliError(format!("{what}: request stream closed")))?;
    let mut replies = match client
        .content()
        .write(client.request(ReceiverStream::new(outgoing)))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == tonic::Code::AlreadyExists && expected_digest.is_some() => {
            return Ok(Ingested {
                digest: expected_digest.unwrap_or_default().to_string(),
                size: expected_size.unwrap_or(0),
                resumed_at: 0,
                existed: true,
            });
        }
        Err(s) => return Err(CliError(status_message(&what, &s))),
    };
    let stat = next_reply(&mut replies, &what).await?;
    // What the daemon holds of an earlier run is kept unless it cannot be a prefix of
    // this input (then a write at offset 0 starts the ingest over).
    let input_len = input.seek(SeekFrom::End(0)).ok();
    let longest = expected_size.map(|n| n as u64).or(input_len);
    let start_at = match longest {
        Some(len) if stat.offset as u64 > len => 0,
        _ => stat.offset,
    };
    if input_len.is_some() {
        input
            .seek(SeekFrom::Start(0))
            .map_err(|e| CliError(format!("{what}: reading the input: {e}")))?;
    }

    // The input is read on a thread of its own, CHUNK bytes at a time, a few ahead.
    let (chunks, mut chunk_rx) = mpsc::channel::<std::io::Result<Bytes>>(2);
    std::thread::Builder::new()
        .name("ingest-reader".into())
        .spawn(move || read_chunks(input, start_at as u64, chunks))
        .map_err(|e| CliError(format!("{what}: starting the input reader: {e}")))?;

    // Sending runs ahead of the replies by at most IN_FLIGHT messages.
    let window = Arc::new(Semaphore::new(IN_FLIGHT));
    // The offset each reply must report, in the order the messages went out, and
    // whether it answers the commit.
    let (sent_offsets, mut due_offsets) = mpsc::unbounded_channel::<(i64, bool)>();
    let (r, expected) = (r#ref.to_string(), expected_digest.map(str::to_string));
    let sender_window = window.clone();
    let mut sender = tokio::spawn(async move {
        let message = |action: WriteAction, offset: i64, data: Bytes| WriteContentRequest {
            action: action as i32,
            r#ref: r.clone(),
            offset,
            data,
            ..Default::default()
        };
        let mut offset = start_at;
        while let Some(chunk) = chunk_rx.recv().await {
            let chunk = chunk.map_err(|e| format!("reading the input: {e}"))?;
            let n = chunk.len() as i64;
            sender_window
                .acquire()
                .await
                .expect("the window is never closed")
                .forget();
            if requests
                .send(message(WriteAction::Write, offset, chunk))
                .await
                .is_err()
            {
                // The daemon ended the call; the reply stream says why.
                return Ok(());
            }
            offset += n;
            let _ = sent_offsets.send((offset, false));
        }
        let mut commit = message(WriteAction::Commit, offset, Bytes::new());
        commit.total = expected_size.unwrap_or(offset);
        commit.expected = expected.unwrap_or_default();
        if requests.send(commit).await.is_ok() {
            let _ = sent_offsets.send((offset, true));
        }
        Ok::<(), String>(())
    });

    let outcome = async {
        loop {
            let Some((due, is_commit)) = due_offsets.recv().await else {
                // The sender stopped early: an input error, or the daemon ended the call.
                if let Ok(Err(e)) = (&mut sender).await {
                    return Err(CliError(format!("{what}: {e}")));
                }
                return Err(match replies.message().await {
                    Err(s) => CliError(status_message(&what, &s)),
                    Ok(_) => CliError(format!("{what}: the daemon ended the call early")),
                });
            };
            let reply = match replies.message().await {
                Ok(Some(reply)) => reply,
                Ok(None) => {
                    return Err(CliError(format!("{what}: the daemon ended the call early")));
                }
                Err(s) if is_commit && s.code() == tonic::Code::FailedPrecondition => {
                    // A size or digest mismatch: this data can never commit as asked.
                    let _ = client
                        .content()
                        .abort(client.request(AbortRequest {
                            r#ref: r#ref.to_string(),
                        }))
                        .await;
                    return Err(CliError(format!(
                        "{}; the ingest was removed",
                        status_message(&what, &s)
                    )));
                }
                Err(s) if is_commit && s.code() == tonic::Code::AlreadyExists => {
                    // Committed meanwhile by someone else: with the digest known that is
                    // what was asked for.
                    return match expected_digest {
                        Some(digest) => Ok(Ingested {
                            digest: digest.to_string(),
                            size: due,
                            resumed_at: start_at,
                            existed: true,
                        }),
                        None => Err(CliError(status_message(&what, &s))),
                    };
                }
                Err(s) => return Err(CliError(status_message(&what, &s))),
            };
            window.add_permits(1);
            if reply.offset != due {
                return Err(CliError(format!(
                    "{what}: the daemon is at offset {}, expected {due}",
                    reply.offset
                )));
            }
            if is_commit {
                return Ok(Ingested {
                    digest: reply.digest,
                    size: reply.offset,
                    resumed_at: start_at,
                    existed: false,
                });
            }
        }
    }
    .await;
    // Stops a sender still waiting for the window after a failure; the reader thread
    // ends when its channel closes.
    sender.abort();
    outcome
}

async fn next_reply(
    replies: &mut tonic::Streaming<WriteContentResponse>,
    what: &str,
) -> Result<WriteContentResponse, CliError> {
    match replies.message().await {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(CliError(format!("{what}: the daemon ended the call early"))),
        Err(s) => Err(CliError(status_message(what, &s))),
    }
}

/// Reads `input` from `skip` on in CHUNK-sized buffers, each filled completely (a pipe
/// gives 64 KiB at a time) but the last. (`read_to_end` into a buffer of the right
/// capacity reads straight into it, without zeroing it first.)
fn read_chunks<R: Read + Seek>(
    mut input: R,
    skip: u64,
    chunks: mpsc::Sender<std::io::Result<Bytes>>,
) {
    if skip > 0
        && let Err(e) = skip_input(&mut input, skip)
    {
        let _ = chunks.blocking_send(Err(e));
        return;
    }
    loop {
        let mut buf = Vec::with_capacity(CHUNK);
        if let Err(e) = (&mut input).take(CHUNK as u64).read_to_end(&mut buf) {
            let _ = chunks.blocking_send(Err(e));
            return;
        }
        let last = buf.len() < CHUNK;
        if buf.is_empty() || chunks.blocking_send(Ok(Bytes::from(buf))).is_err() || last {
            return;
        }
    }
}

/// Moves past the first `skip` bytes: a seek for a file, reading them for a pipe.
fn skip_input<R: Read + Seek>(input: &mut R, skip: u64) -> std::io::Result<()> {
    if input.seek(SeekFrom::Start(skip)).is_ok() {
        return Ok(());
    }
    let copied = std::io::copy(&mut input.take(skip), &mut std::io::sink())?;
    if copied < skip {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the input has {copied} bytes, fewer than the {skip} already ingested"),
        ));
    }
    Ok(())
}

/// Writes the blob `digest` to `out`, as the daemon streams it.
pub async fn get(
    client: &Client,
    digest: &str,
    out: &mut impl std::io::Write,
) -> Result<u64, CliError> {
    let what = format!("get {digest}");
    let mut stream = client
        .content()
        .read(client.request(ReadContentRequest {
            digest: digest.to_string(),
            offset: 0,
            size: 0,
        }))
        .await
        .map_err(|s| CliError(status_message(&what, &s)))?
        .into_inner();
    let mut written = 0u64;
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| CliError(status_message(&what, &s)))?
    {
        out.write_all(&msg.data)
            .map_err(|e| CliError(format!("{what}: writing the output: {e}")))?;
        written += msg.data.len() as u64;
    }
    out.flush()
        .map_err(|e| CliError(format!("{what}: writing the output: {e}")))?;
    Ok(written)
}

/// Standard input as a `File` (seeking fails on a pipe, see [`skip_input`]).
pub fn stdin_file() -> Result<std::fs::File, CliError> {
    use std::os::fd::AsFd;
    let fd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| CliError(format!("duplicating standard input: {e}")))?;
    Ok(std::fs::File::from(fd))
}
