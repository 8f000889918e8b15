//! `berth ps` and `berth logs`: containers with their tasks, and the log of a detached
//! container (the file its shim appends the task's stdout and stderr to).

use crate::client::Client;
use crate::run::{LOG_LABEL, containers, get_container, tasks};
use crate::{CliError, grpc, table};
use berth_api::containerd::v1::types::Status;
use berth_api::services::containers::v1::ListContainersRequest;
use berth_api::services::tasks::v1::{GetRequest, ListTasksRequest};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct PsArgs {
    /// Show every container, not only those with a live task
    #[arg(long, short = 'a')]
    pub all: bool,
    // Declared here, long only, so that `-a` can mean --all as in `docker ps -a`: clap
    // does not propagate the global `--address/-a` to a subcommand that has its own
    // argument of that id (the global one still works before `ps`).
    /// berthd's gRPC socket (`-a` is --all here)
    #[arg(long, id = "address", value_name = "ADDRESS")]
    pub address: Option<String>,
    /// Print only container IDs
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// Keep printing what the container writes until its task ends
    #[arg(long, short = 'f')]
    pub follow: bool,
    pub id: String,
}

/// The container's command line from its spec, shortened for a table cell.
fn command_of(spec: Option<&prost_types::Any>) -> String {
    let args = spec
        .and_then(|s| serde_json::from_slice::<serde_json::Value>(&s.value).ok())
        .and_then(|v| {
            v.pointer("/process/args")
                .and_then(|a| a.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
        })
        .unwrap_or_default();
    if args.chars().count() > 30 {
        format!("{}…", args.chars().take(29).collect::<String>())
    } else if args.is_empty() {
        "-".into()
    } else {
        args
    }
}

/// `berth ps`.
pub async fn ps(address: &str, ns: &str, a: PsArgs) -> Result<(), CliError> {
    let c = Client::connect(a.address.as_deref().unwrap_or(address), ns).await?;
    let mut list = containers(&c)
        .list(c.request(ListContainersRequest { filters: vec![] }))
        .await
        .map_err(grpc("list containers"))?
        .into_inner()
        .containers;
    let procs: HashMap<String, _> = tasks(&c)
        .list(c.request(ListTasksRequest {
            filter: String::new(),
        }))
        .await
        .map_err(grpc("list tasks"))?
        .into_inner()
        .tasks
        .into_iter()
        .map(|p| (p.container_id.clone(), p))
        .collect();
    // Newest first, as people look for what they just started.
    list.sort_by_key(|c| std::cmp::Reverse(c.created_at.as_ref().map(|t| (t.seconds, t.nanos))));
    let mut t = table::Table::new(&[
        "CONTAINER ID",
        "IMAGE",
        "COMMAND",
        "CREATED",
        "STATUS",
        "PID",
    ]);
    for ctr in list {
        let p = procs.get(&ctr.id);
        let status = p.map(|p| Status::try_from(p.status).unwrap_or(Status::Unknown));
        let live = matches!(status, Some(s) if s != Status::Stopped);
        if !a.all && !live {
            continue;
        }
        if a.quiet {
            println!("{}", ctr.id);
            continue;
        }
        let status = match (status, p) {
            (Some(Status::Stopped), Some(p)) => format!("STOPPED ({})", p.exit_status),
            (Some(s), _) => s.as_str_name().to_string(),
            // No task: it ended and was deleted (or was never started).
            (None, _) => "STOPPED".into(),
        };
        let pid = p
            .filter(|p| p.pid > 0 && live)
            .map(|p| p.pid.to_string())
            .unwrap_or_else(|| "-".into());
        t.row(vec![
            ctr.id.clone(),
            if ctr.image.is_empty() {
                "-".into()
            } else {
                ctr.image.clone()
            },
            command_of(ctr.spec.as_ref()),
            ctr.created_at
                .map(|ts| table::ago(ts.seconds))
                .unwrap_or_else(|| "-".into()),
            status,
            pid,
        ]);
    }
    if !a.quiet {
        print!("{}", t.render());
    }
    Ok(())
}

/// Whether container `id` still has a task that can write to its log.
async fn task_live(c: &Client, id: &str) -> bool {
    match tasks(c)
        .get(c.request(GetRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        }))
        .await
    {
        Ok(r) => r
            .into_inner()
            .process
            .is_some_and(|p| p.status != Status::Stopped as i32),
        Err(_) => false,
    }
}

/// `berth logs`.
pub async fn logs(address: &str, ns: &str, a: LogsArgs) -> Result<(), CliError> {
    let c = Client::connect(address, ns).await?;
    let container = get_container(&c, &a.id).await?;
    let Some(path) = container.labels.get(LOG_LABEL) else {
        return Err(CliError(format!(
            "container {:?} has no log: only containers started with berth run -d have one (the output of others went to the terminal that ran them)",
            a.id
        )));
    };
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        // The shim creates the file when the task is created.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !a.follow {
                return Ok(());
            }
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Ok(f) = std::fs::File::open(path) {
                    break f;
                }
                if !task_live(&c, &a.id).await {
                    return Ok(());
                }
            }
        }
        Err(e) => return Err(CliError(format!("open log {path}: {e}"))),
    };
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    let mut copy = |f: &mut std::fs::File| -> Result<(), CliError> {
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| CliError(format!("read log {path}: {e}")))?;
            if n == 0 {
                return out.flush().map_err(|e| CliError(format!("stdout: {e}")));
            }
            match out.write_all(&buf[..n]) {
                Ok(()) => {}
                // `berth logs ID | head`: the reader has what it wanted.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
                Err(e) => return Err(CliError(format!("stdout: {e}"))),
            }
        }
    };
    copy(&mut f)?;
    if !a.follow {
        return Ok(());
    }
    loop {
        let live = task_live(&c, &a.id).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A truncated log starts over.
        let pos = f.stream_position().unwrap_or(0);
        if std::fs::metadata(path)
            .map(|m| m.len() < pos)
            .unwrap_or(false)
        {
            let _ = f.seek(SeekFrom::Start(0));
        }
        copy(&mut f)?;
        if !live {
            return Ok(());
        }
    }
}
