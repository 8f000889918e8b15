//! `containerd.services.events.v1.Events` (`io.containerd.grpc.v1.events`): Publish,
//! Forward and Subscribe over the daemon's one [`Exchange`].
//!
//! Subscription filters see `namespace`, `topic` and `event.<field…>`; event fields are
//! read by reflection over the API's descriptors, so every event type (and every field,
//! not only strings as in containerd) can be filtered on.

use crate::{IntoStatus, namespace};
use berth_api::services::events::v1::{
    ForwardRequest, PublishRequest, SubscribeRequest, events_server,
};
use berth_api::timestamp;
use berth_api::types::Envelope as ProtoEnvelope;
use berth_core::Error;
use berth_core::events::{Envelope, EventPublisher, Exchange};
use berth_core::filters::Filter;
use berth_plugin::{GrpcService, InitContext, Instance, Registration, grpc_instance, types};
use futures::StreamExt;
use prost_reflect::{DescriptorPool, DynamicMessage, MapKey, Value};
use std::sync::{Arc, LazyLock};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tonic::{Request, Response, Status};

static DESCRIPTORS: LazyLock<Option<DescriptorPool>> = LazyLock::new(|| {
    DescriptorPool::decode(berth_api::FILE_DESCRIPTOR_SET)
        .inspect_err(|e| tracing::error!(error = %e, "decoding API descriptors"))
        .ok()
});

/// The value at `path` inside an event payload, decoded by reflection.
fn event_field(event: &prost_types::Any, path: &[String]) -> Option<String> {
    let name = event.type_url.rsplit('/').next()?;
    let descriptor = DESCRIPTORS.as_ref()?.get_message_by_name(name)?;
    let message = DynamicMessage::decode(descriptor, event.value.as_slice()).ok()?;
    let (first, rest) = path.split_first()?;
    let mut value = message.get_field_by_name(first)?.into_owned();
    for component in rest {
        value = match value {
            Value::Message(inner) => inner.get_field_by_name(component)?.into_owned(),
            Value::Map(map) => map.get(&MapKey::String(component.clone()))?.clone(),
            _ => return None,
        };
    }
    match value {
        Value::String(s) => Some(s),
        Value::Bool(b) => Some(b.to_string()),
        Value::I32(n) | Value::EnumNumber(n) => Some(n.to_string()),
        Value::I64(n) => Some(n.to_string()),
        Value::U32(n) => Some(n.to_string()),
        Value::U64(n) => Some(n.to_string()),
        _ => None,
    }
}

fn envelope_field(envelope: &Envelope, path: &[String]) -> Option<String> {
    match path.split_first()? {
        (field, []) if field == "namespace" => Some(envelope.namespace.clone()),
        (field, []) if field == "topic" => Some(envelope.topic.clone()),
        (field, rest) if field == "event" && !rest.is_empty() => event_field(&envelope.event, rest),
        _ => None,
    }
}

fn to_proto(envelope: Envelope) -> ProtoEnvelope {
    ProtoEnvelope {
        timestamp: Some(timestamp::from_system_time(envelope.timestamp)),
        namespace: envelope.namespace,
        topic: envelope.topic,
        event: Some(envelope.event),
    }
}

#[derive(Clone)]
struct EventsService {
    exchange: Exchange,
}

#[tonic::async_trait]
impl events_server::Events for EventsService {
    async fn publish(&self, request: Request<PublishRequest>) -> Result<Response<()>, Status> {
        let namespace = namespace(&request)?;
        let request = request.into_inner();
        let event = request
            .event
            .ok_or_else(|| Error::invalid_argument("event must not be empty"))
            .or_status()?;
        self.exchange
            .publish(&namespace, &request.topic, event)
            .or_status()?;
        Ok(Response::new(()))
    }

    async fn forward(&self, request: Request<ForwardRequest>) -> Result<Response<()>, Status> {
        let envelope = request
            .into_inner()
            .envelope
            .ok_or_else(|| Error::invalid_argument("envelope must not be empty"))
            .or_status()?;
        let event = envelope
            .event
            .ok_or_else(|| Error::invalid_argument("envelope has no event"))
            .or_status()?;
        self.exchange
            .forward(Envelope {
                timestamp: envelope
                    .timestamp
                    .as_ref()
                    .map(timestamp::to_system_time)
                    .unwrap_or_else(std::time::SystemTime::now),
                namespace: envelope.namespace,
                topic: envelope.topic,
                event,
            })
            .or_status()?;
        Ok(Response::new(()))
    }

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<ProtoEnvelope>>, Status> {
        let filter = Filter::parse_all(&request.into_inner().filters).or_status()?;
        let stream = BroadcastStream::new(self.exchange.subscribe()).filter_map(move |item| {
            let delivered = match item {
                Ok(envelope) => filter
                    .matches(&|path: &[String]| envelope_field(&envelope, path))
                    .then(|| Ok(to_proto(envelope))),
                Err(BroadcastStreamRecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "event subscriber fell behind; events dropped");
                    None
                }
            };
            futures::future::ready(delivered)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

impl GrpcService for EventsService {
    fn register(
        &self,
        routes: &mut tonic::service::RoutesBuilder,
        limits: berth_plugin::MessageLimits,
    ) {
        routes.add_service(crate::limited!(
            events_server::EventsServer::new(self.clone()),
            limits
        ));
    }
}

/// `io.containerd.event.v1.exchange`: the daemon's event exchange, as containerd lists
/// it (every plugin already reaches it through its init context).
pub fn exchange_registration() -> Registration {
    Registration::new(types::EVENT, "exchange", |ctx: InitContext| async move {
        Ok::<Instance, _>(Arc::new(ctx.events.clone()))
    })
}

pub fn registration() -> Registration {
    Registration::new(types::GRPC, "events", |ctx: InitContext| async move {
        Ok::<Instance, _>(grpc_instance(Arc::new(EventsService {
            exchange: ctx.events.clone(),
        })))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api::any;
    use berth_api::containerd::events::{NamespaceCreate, TaskExit};

    fn envelope(event: prost_types::Any) -> Envelope {
        Envelope {
            timestamp: std::time::SystemTime::now(),
            namespace: "default".into(),
            topic: "/tasks/exit".into(),
            event,
        }
    }

    #[test]
    fn filters_see_envelope_and_event_fields() {
        let exit = TaskExit {
            container_id: "c1".into(),
            exit_status: 3,
            ..Default::default()
        };
        let env = envelope(any::pack(&exit));
        let matches = |f: &str| {
            Filter::parse(f)
                .unwrap()
                .matches(&|p: &[String]| envelope_field(&env, p))
        };
        assert!(matches("topic==/tasks/exit"));
        assert!(matches("namespace==default,event.container_id==c1"));
        assert!(matches("event.exit_status==3"));
        assert!(!matches("event.container_id==c2"));
        assert!(!matches("topic~=^/images/"));

        let create = NamespaceCreate {
            name: "n".into(),
            labels: [("k".into(), "v".into())].into(),
        };
        let env = envelope(any::pack(&create));
        assert!(
            Filter::parse("event.labels.k==v")
                .unwrap()
                .matches(&|p: &[String]| envelope_field(&env, p))
        );
    }
}
