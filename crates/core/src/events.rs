//! The daemon's one event exchange: every subsystem publishes here, the events service
//! and internal consumers (GC, restart monitor) subscribe.
//!
//! Payloads stay as protobuf `Any` (the wire form every client decodes); a slow
//! subscriber lags and loses its oldest events instead of slowing publishers down.

use crate::{Error, Result, identifiers};
use prost_types::Any;
use std::time::SystemTime;
use tokio::sync::broadcast;

/// One published event, as the events service delivers it.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub timestamp: SystemTime,
    pub namespace: String,
    pub topic: String,
    pub event: Any,
}

/// Anything that can publish an event: subsystems take this, not the exchange itself.
pub trait EventPublisher: Send + Sync {
    fn publish(&self, namespace: &str, topic: &str, event: Any) -> Result<()>;
}

/// Fan-out of events to every subscriber.
#[derive(Debug, Clone)]
pub struct Exchange {
    sender: broadcast::Sender<Envelope>,
}

/// How many events a subscriber may fall behind before it loses the oldest. The channel
/// allocates every slot up front (~140 bytes each), so this is idle memory too.
const SUBSCRIBER_BACKLOG: usize = 1024;

impl Default for Exchange {
    fn default() -> Self {
        Self::new()
    }
}

impl Exchange {
    pub fn new() -> Self {
        let (sender, _) = broadcast::channel(SUBSCRIBER_BACKLOG);
        Exchange { sender }
    }

    /// Delivers an envelope that was built elsewhere (the Forward call of shims and
    /// `berthd publish`), after the same validation as [`EventPublisher::publish`].
    pub fn forward(&self, envelope: Envelope) -> Result<()> {
        identifiers::validate(&envelope.namespace)
            .map_err(|e| e.context("envelope has invalid namespace"))?;
        validate_topic(&envelope.topic)?;
        // No subscriber is not an error: events are fire-and-forget.
        let _ = self.sender.send(envelope);
        Ok(())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Envelope> {
        self.sender.subscribe()
    }

    pub fn subscriber_count(&self) -> usize {
        self.sender.receiver_count()
    }
}

impl EventPublisher for Exchange {
    fn publish(&self, namespace: &str, topic: &str, event: Any) -> Result<()> {
        self.forward(Envelope {
            timestamp: SystemTime::now(),
            namespace: namespace.to_string(),
            topic: topic.to_string(),
            event,
        })
    }
}

/// Topics are `/`-separated identifiers starting with `/` (`/tasks/exit`).
pub fn validate_topic(topic: &str) -> Result<()> {
    let Some(rest) = topic.strip_prefix('/') else {
        return Err(Error::invalid_argument(format!(
            "must start with '/': topic {topic:?}"
        )));
    };
    if rest.is_empty() {
        return Err(Error::invalid_argument("must not be empty: topic \"/\""));
    }
    for component in rest.split('/') {
        identifiers::validate(component)
            .map_err(|e| e.context(format!("failed validation on component {component:?}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_receive_published_events() {
        let exchange = Exchange::new();
        let mut sub = exchange.subscribe();
        let any = Any {
            type_url: "containerd.events.NamespaceCreate".into(),
            value: vec![],
        };
        exchange
            .publish("default", "/namespaces/create", any.clone())
            .unwrap();
        let got = sub.recv().await.unwrap();
        assert_eq!(got.topic, "/namespaces/create");
        assert_eq!(got.namespace, "default");
        assert_eq!(got.event, any);
    }

    #[test]
    fn topics_are_validated() {
        validate_topic("/tasks/exit").unwrap();
        for bad in ["tasks/exit", "/", "/tasks//exit", "/tasks/ex it"] {
            assert!(validate_topic(bad).is_err(), "{bad}");
        }
        let exchange = Exchange::new();
        let any = Any::default();
        assert!(exchange.publish("bad ns", "/x", any).is_err());
    }
}
