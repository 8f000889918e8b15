//! `berth stop` and `berth rm`: ending a container's task (its stop signal, then SIGKILL
//! after a timeout) and removing the task, the container record, its snapshot and the
//! log of a detached run.

use crate::client::Client;
use crate::run::{LOG_LABEL, STOP_SIGNAL_LABEL, containers, get_container, snapshots, tasks};
use crate::{CliError, grpc};
use berth_api::containerd::v1::types::Status;
use berth_api::services::containers::v1::DeleteContainerRequest;
use berth_api::services::snapshots::v1::RemoveSnapshotRequest;
use berth_api::services::tasks::v1::{
    DeleteTaskRequest, GetRequest, KillRequest, ResumeTaskRequest, WaitRequest,
};
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct StopArgs {
    /// Seconds to wait after the stop signal before SIGKILL
    #[arg(long, short = 't', default_value_t = 10)]
    pub time: u64,
    #[arg(required = true)]
    pub ids: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct RmArgs {
    /// Kill a running task (SIGKILL) instead of refusing
    #[arg(long, short = 'f')]
    pub force: bool,
    #[arg(required = true)]
    pub ids: Vec<String>,
}

/// A signal by name (`SIGTERM`, `TERM`) or number.
fn signal_number(s: &str) -> Option<u32> {
    if let Ok(n) = s.parse() {
        return Some(n);
    }
    let name = s.to_ascii_uppercase();
    let name = if name.starts_with("SIG") {
        name
    } else {
        format!("SIG{name}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .ok()
        .map(|s| s as i32 as u32)
}

/// The task's status, `None` without a task.
async fn task_status(c: &Client, id: &str) -> Result<Option<Status>, CliError> {
    match tasks(c)
        .get(c.request(GetRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        }))
        .await
    {
        Ok(r) => Ok(r
            .into_inner()
            .process
            .map(|p| Status::try_from(p.status).unwrap_or(Status::Unknown))),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(grpc(&format!("get task {id}"))(s)),
    }
}

/// A frozen task handles a signal only once thawed: resumed after the signal is queued,
/// as nerdctl does. Errors are ignored: the task may have died of the signal already
/// (runc thaws for `kill --all`), and one that stays frozen shows as the wait's timeout.
async fn resume_if_paused(c: &Client, id: &str, status: Status) {
    if matches!(status, Status::Paused | Status::Pausing) {
        let _ = tasks(c)
            .resume(c.request(ResumeTaskRequest {
                container_id: id.to_string(),
            }))
            .await;
    }
}

async fn kill(c: &Client, id: &str, signal: u32, all: bool) -> Result<(), CliError> {
    match tasks(c)
        .kill(c.request(KillRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
            signal,
            all,
        }))
        .await
    {
        Ok(_) => Ok(()),
        // Exited meanwhile.
        Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
        Err(s) => Err(grpc(&format!("kill task {id}"))(s)),
    }
}

/// Waits up to `timeout` for the task to exit; whether it did.
async fn wait_exit(c: &Client, id: &str, timeout: Duration) -> Result<bool, CliError> {
    let mut client = tasks(c);
    let wait = client.wait(c.request(WaitRequest {
        container_id: id.to_string(),
        exec_id: String::new(),
    }));
    match tokio::time::timeout(timeout, wait).await {
        Err(_) => Ok(false),
        Ok(Ok(_)) => Ok(true),
        Ok(Err(s)) if s.code() == tonic::Code::NotFound => Ok(true),
        Ok(Err(s)) => Err(grpc(&format!("wait for task {id}"))(s)),
    }
}

async fn delete_task(c: &Client, id: &str) -> Result<(), CliError> {
    match tasks(c)
        .delete(c.request(DeleteTaskRequest {
            container_id: id.to_string(),
        }))
        .await
    {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
        Err(s) => Err(grpc(&format!("delete task {id}"))(s)),
    }
}

/// Stops container `id`'s task: its stop signal (image StopSignal, else SIGTERM), then
/// SIGKILL to every process after `timeout`; then deletes the task (the shim goes).
pub async fn stop_container(c: &Client, id: &str, timeout: Duration) -> Result<(), CliError> {
    let container = get_container(c, id).await?;
    match task_status(c, id).await? {
        None => return Ok(()),
        Some(Status::Stopped) => {}
        Some(status) => {
            let signal = container
                .labels
                .get(STOP_SIGNAL_LABEL)
                .and_then(|s| signal_number(s))
                .unwrap_or(15);
            kill(c, id, signal, false).await?;
            resume_if_paused(c, id, status).await;
            if !wait_exit(c, id, timeout).await? {
                kill(c, id, 9, true).await?;
                if !wait_exit(c, id, Duration::from_secs(10)).await? {
                    return Err(CliError(format!(
                        "stop {id}: the task did not exit 10s after SIGKILL"
                    )));
                }
            }
        }
    }
    delete_task(c, id).await
}

/// Removes container `id` entirely: its task (killed if it still runs), the record, the
/// snapshot and a detached run's log.
pub async fn remove_container(c: &Client, id: &str) -> Result<(), CliError> {
    let container = get_container(c, id).await?;
    if let Some(status) = task_status(c, id).await? {
        if status != Status::Stopped {
            kill(c, id, 9, true).await?;
            resume_if_paused(c, id, status).await;
            if !wait_exit(c, id, Duration::from_secs(10)).await? {
                return Err(CliError(format!(
                    "rm {id}: the task did not exit 10s after SIGKILL"
                )));
            }
        }
        delete_task(c, id).await?;
    }
    containers(c)
        .delete(c.request(DeleteContainerRequest { id: id.to_string() }))
        .await
        .map_err(grpc(&format!("delete container {id}")))?;
    if !container.snapshot_key.is_empty() {
        match snapshots(c)
            .remove(c.request(RemoveSnapshotRequest {
                snapshotter: container.snapshotter.clone(),
                key: container.snapshot_key.clone(),
            }))
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => {
                return Err(grpc(&format!(
                    "remove snapshot {} of {id}",
                    container.snapshot_key
                ))(s));
            }
        }
    }
    if let Some(log) = container.labels.get(LOG_LABEL) {
        // Only a file `run -d` named after the container: a label is not a licence to
        // delete arbitrary paths.
        let p = std::path::Path::new(log);
        if p.is_absolute() && p.file_name() == Some(std::ffi::OsStr::new(&format!("{id}.log"))) {
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(())
}

/// `berth stop`.
pub async fn stop(address: &str, ns: &str, a: StopArgs) -> Result<(), CliError> {
    let c = Client::connect(address, ns).await?;
    let mut failed = vec![];
    for id in &a.ids {
        match stop_container(&c, id, Duration::from_secs(a.time)).await {
            Ok(()) => println!("{id}"),
            Err(e) => failed.push(e.0),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CliError(failed.join("\n")))
    }
}

/// `berth rm`.
pub async fn rm(address: &str, ns: &str, a: RmArgs) -> Result<(), CliError> {
    let c = Client::connect(address, ns).await?;
    let mut failed = vec![];
    for id in &a.ids {
        let r = async {
            if !a.force {
                get_container(&c, id).await?;
                if let Some(s) = task_status(&c, id).await?
                    && s != Status::Stopped
                {
                    return Err(CliError(format!(
                        "rm {id}: the container's task is {}: stop it first (berth stop {id}) or use rm -f",
                        s.as_str_name().to_lowercase()
                    )));
                }
            }
            remove_container(&c, id).await
        }
        .await;
        match r {
            Ok(()) => println!("{id}"),
            Err(e) => failed.push(e.0),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CliError(failed.join("\n")))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(super::signal_number("SIGTERM"), Some(15));
        assert_eq!(super::signal_number("quit"), Some(3));
        assert_eq!(super::signal_number("9"), Some(9));
        assert_eq!(super::signal_number("NOPE"), None);
    }
}
