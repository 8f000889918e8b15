//! Event publishing to the daemon: `containerd.services.events.ttrpc.v1.Events/Forward` over
//! the daemon's ttrpc socket (`TTRPC_ADDRESS`), with one small hand-rolled synchronous ttrpc
//! client (no extra threads), falling back to `<publish-binary> publish` on failure.
//!
//! Handlers only queue their events ([`Publisher::publish`]); the main thread forwards them
//! in order ([`Publisher::deliver`]). A round trip to the daemon therefore never delays a
//! reply: `Wait` returns as soon as the exit is recorded, `Create`/`Start`/`Delete` as soon
//! as the runtime is done (as with the Go shim, whose events go out from a queue too). One
//! FIFO keeps the order in which handlers published (TaskStart before TaskExit, TaskDelete
//! before the Shutdown that ends the process).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::Sender;
use std::time::Duration;

use containerd_shim_protos::events::task as ev;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::ttrpc::{Request, Response};

use crate::monitor::Msg;
use crate::sys;

pub struct Publisher {
    namespace: String,
    ttrpc_address: String,
    containerd_address: String,
    publish_binary: String,
    conn: Mutex<Conn>,
    /// The main thread's queue.
    queue: Mutex<Sender<Msg>>,
}

struct Conn {
    stream: Option<UnixStream>,
    next_id: u32,
}

/// An event message with its type name (the Any type URL) and topic.
pub trait Event: Message {
    const TYPE: &'static str;
    const TOPIC: &'static str;
}

macro_rules! event {
    ($t:ident, $topic:expr) => {
        impl Event for ev::$t {
            const TYPE: &'static str = concat!("containerd.events.", stringify!($t));
            const TOPIC: &'static str = $topic;
        }
    };
}
event!(TaskCreate, "/tasks/create");
event!(TaskStart, "/tasks/start");
event!(TaskExit, "/tasks/exit");
event!(TaskOOM, "/tasks/oom");
event!(TaskExecAdded, "/tasks/exec-added");
event!(TaskExecStarted, "/tasks/exec-started");
event!(TaskDelete, "/tasks/delete");
event!(TaskPaused, "/tasks/paused");
event!(TaskResumed, "/tasks/resumed");
event!(TaskCheckpointed, "/tasks/checkpointed");

const HEADER_LEN: usize = 10;

impl Publisher {
    pub fn new(
        namespace: &str,
        ttrpc_address: &str,
        containerd_address: &str,
        publish_binary: &str,
        queue: Sender<Msg>,
    ) -> Self {
        Publisher {
            namespace: namespace.into(),
            ttrpc_address: ttrpc_address.trim_start_matches("unix://").into(),
            containerd_address: containerd_address.into(),
            publish_binary: publish_binary.into(),
            conn: Mutex::new(Conn {
                stream: None,
                next_id: 1,
            }),
            queue: Mutex::new(queue),
        }
    }

    /// Queues an event for the main thread (delivered at once if the queue is gone).
    pub fn publish<E: Event>(&self, e: &E) {
        let mut any = Any::new();
        any.type_url = E::TYPE.into();
        any.value = match e.write_to_bytes() {
            Ok(v) => v,
            Err(_) => return,
        };
        let queued = self.queue.lock().unwrap().send(Msg::Event {
            topic: E::TOPIC,
            any,
        });
        if let Err(std::sync::mpsc::SendError(Msg::Event { topic, any })) = queued {
            self.deliver(topic, &any);
        }
    }

    /// Closes the connection to the daemon (the next event opens a new one).
    pub fn disconnect(&self) {
        self.conn.lock().unwrap().stream = None;
    }

    /// Sends one event to the daemon (called by the main thread, in queue order).
    pub fn deliver(&self, topic: &str, any: &Any) {
        if let Err(err) = self.forward(topic, any) {
            slog!("forwarding {topic} over ttrpc failed ({err}); trying the publish binary");
            if let Err(err) = self.exec_publish(topic, any) {
                slog!("publishing {topic} failed: {err}");
            }
        }
    }

    fn forward(&self, topic: &str, any: &Any) -> io::Result<()> {
        if self.ttrpc_address.is_empty() {
            return Err(io::Error::other("no TTRPC_ADDRESS"));
        }
        let mut env = Envelope::new();
        env.timestamp = MessageField::some(sys::now());
        env.namespace = self.namespace.clone();
        env.topic = topic.into();
        env.event = MessageField::some(any.clone());
        let mut fr = ForwardRequest::new();
        fr.envelope = MessageField::some(env);
        let mut req = Request::new();
        req.service = "containerd.services.events.ttrpc.v1.Events".into();
        req.method = "Forward".into();
        req.payload = fr.write_to_bytes().map_err(io::Error::other)?;
        req.timeout_nano = 5_000_000_000;
        let body = req.write_to_bytes().map_err(io::Error::other)?;

        let mut c = self.conn.lock().unwrap();
        let mut last = None;
        for _attempt in 0..2 {
            if c.stream.is_none() {
                match UnixStream::connect(&self.ttrpc_address) {
                    Ok(s) => {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                        let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
                        c.stream = Some(s);
                    }
                    Err(e) => return Err(e),
                }
            }
            let id = c.next_id;
            c.next_id = c.next_id.wrapping_add(2);
            let r = roundtrip(c.stream.as_mut().unwrap(), id, &body);
            match r {
                Ok(resp) => {
                    if let Some(st) = resp.status.as_ref()
                        && st.code.value() != 0
                    {
                        return Err(io::Error::other(format!("Forward: {}", st.message)));
                    }
                    return Ok(());
                }
                Err(e) => {
                    c.stream = None;
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("forward failed")))
    }

    fn exec_publish(&self, topic: &str, any: &Any) -> io::Result<()> {
        if self.publish_binary.is_empty() {
            return Err(io::Error::other("no publish binary"));
        }
        // Runs outside the monitor's bookkeeping: the exit is reaped by the monitor and
        // reported as an unknown pid, which the service ignores.
        let mut child = Command::new(&self.publish_binary)
            .args([
                "--address",
                &self.containerd_address,
                "publish",
                "--topic",
                topic,
            ])
            .args(["--namespace", &self.namespace])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let data = any.write_to_bytes().map_err(io::Error::other)?;
        if let Some(mut i) = child.stdin.take() {
            i.write_all(&data)?;
        }
        Ok(())
    }
}

fn roundtrip(s: &mut UnixStream, id: u32, body: &[u8]) -> io::Result<Response> {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&(body.len() as u32).to_be_bytes());
    h[4..8].copy_from_slice(&id.to_be_bytes());
    h[8] = 1; // request
    h[9] = 0;
    s.write_all(&h)?;
    s.write_all(body)?;
    loop {
        let mut rh = [0u8; HEADER_LEN];
        s.read_exact(&mut rh)?;
        let len = u32::from_be_bytes(rh[0..4].try_into().unwrap()) as usize;
        let rid = u32::from_be_bytes(rh[4..8].try_into().unwrap());
        if len > 4 << 20 {
            return Err(io::Error::other("ttrpc message too large"));
        }
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf)?;
        if rid != id || rh[8] != 2 {
            continue;
        }
        return Response::parse_from_bytes(&buf).map_err(io::Error::other);
    }
}
