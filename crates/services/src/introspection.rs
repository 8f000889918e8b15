//! `containerd.services.introspection.v1.Introspection`
//! (`io.containerd.grpc.v1.introspection`): the plugin records with their init errors,
//! and the server's identity (a UUID persisted under the plugin's root, the pid).

use crate::IntoStatus;
use berth_api::google::rpc::Status as RpcStatus;
use berth_api::services::introspection::v1::{
    Plugin, PluginInfoRequest, PluginInfoResponse, PluginsRequest, PluginsResponse, ServerResponse,
    introspection_server,
};
use berth_api::types::Platform;
use berth_core::filters::Filter;
use berth_core::{Error, Result};
use berth_plugin::{
    GrpcService, InitContext, Instance, PluginRecord, PluginRecords, Registration,
    Status as PluginStatus, types,
};
use std::path::PathBuf;
use std::sync::Arc;
use tonic::{Request, Response, Status};

#[derive(Clone)]
struct IntrospectionService {
    records: PluginRecords,
    uuid: String,
}

fn platform(spec: &str) -> Platform {
    let mut parts = spec.splitn(3, '/');
    Platform {
        os: parts.next().unwrap_or_default().to_string(),
        architecture: parts.next().unwrap_or_default().to_string(),
        variant: parts.next().unwrap_or_default().to_string(),
        ..Default::default()
    }
}

fn to_proto(record: &PluginRecord) -> Plugin {
    let init_err = match &record.status {
        PluginStatus::Loaded => None,
        PluginStatus::Failed(err) => {
            let status = crate::status(err.clone());
            Some(RpcStatus {
                code: status.code() as i32,
                message: status.message().into(),
                details: vec![],
            })
        }
        // `ctr plugins ls` shows "skip" when the message contains "skip plugin".
        PluginStatus::Skipped(why) => Some(RpcStatus {
            code: tonic::Code::FailedPrecondition as i32,
            message: why.clone(),
            details: vec![],
        }),
    };
    Plugin {
        r#type: record.r#type.clone(),
        id: record.id.clone(),
        requires: record.requires.clone(),
        platforms: record.platforms.iter().map(|p| platform(p)).collect(),
        exports: record.exports.clone().into_iter().collect(),
        capabilities: record.capabilities.clone(),
        init_err,
    }
}

fn plugin_field(plugin: &Plugin, path: &[String]) -> Option<String> {
    match path {
        [field] if field == "type" => Some(plugin.r#type.clone()).filter(|s| !s.is_empty()),
        [field] if field == "id" => Some(plugin.id.clone()).filter(|s| !s.is_empty()),
        [field, key] if field == "exports" => plugin.exports.get(key).cloned(),
        _ => None,
    }
}

#[tonic::async_trait]
impl introspection_server::Introspection for IntrospectionService {
    async fn plugins(
        &self,
        request: Request<PluginsRequest>,
    ) -> Result<Response<PluginsResponse>, Status> {
        let filter = Filter::parse_all(&request.into_inner().filters).or_status()?;
        let plugins = self
            .records
            .snapshot()
            .iter()
            .map(to_proto)
            .filter(|p| filter.matches(&|path: &[String]| plugin_field(p, path)))
            .collect();
        Ok(Response::new(PluginsResponse { plugins }))
    }

    async fn server(&self, _: Request<()>) -> Result<Response<ServerResponse>, Status> {
        Ok(Response::new(ServerResponse {
            uuid: self.uuid.clone(),
            pid: std::process::id() as u64,
            pidns: pid_namespace().unwrap_or(0),
            deprecations: Vec::new(),
        }))
    }

    async fn plugin_info(
        &self,
        request: Request<PluginInfoRequest>,
    ) -> Result<Response<PluginInfoResponse>, Status> {
        let request = request.into_inner();
        let record = self
            .records
            .snapshot()
            .into_iter()
            .find(|r| r.r#type == request.r#type && r.id == request.id)
            .ok_or_else(|| Error::not_found(format!("plugin {}.{}", request.r#type, request.id)))
            .or_status()?;
        Ok(Response::new(PluginInfoResponse {
            plugin: Some(to_proto(&record)),
            extra: None,
        }))
    }
}

/// The inode of this process's pid namespace, which containerd reports as `pidns`.
fn pid_namespace() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// Reads the server UUID, creating it on first start; it survives restarts.
fn load_or_create_uuid(root: PathBuf) -> Result<String> {
    let path = root.join("uuid");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let text = text.trim();
            uuid::Uuid::parse_str(text)
                .map_err(|e| Error::unknown(format!("{}: invalid uuid: {e}", path.display())))?;
            Ok(text.to_string())
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().to_string();
            std::fs::create_dir_all(&root)
                .map_err(|e| Error::unknown(format!("creating {}: {e}", root.display())))?;
            let tmp = root.join("uuid.tmp");
            std::fs::write(&tmp, &id)
                .and_then(|_| std::fs::rename(&tmp, &path))
                .map_err(|e| Error::unknown(format!("writing {}: {e}", path.display())))?;
            Ok(id)
        }
        Err(err) => Err(Error::unknown(format!("reading {}: {err}", path.display()))),
    }
}

impl GrpcService for IntrospectionService {
    fn register(
        &self,
        routes: &mut tonic::service::RoutesBuilder,
        limits: berth_plugin::MessageLimits,
    ) {
        routes.add_service(crate::limited!(
            introspection_server::IntrospectionServer::new(self.clone()),
            limits
        ));
    }
}

/// `io.containerd.service.v1.introspection-service`: the service the gRPC plugin serves.
pub fn service_registration() -> Registration {
    Registration::new(
        types::SERVICE,
        "introspection-service",
        |ctx: InitContext| async move {
            // Where containerd 1.6 keeps it (the gRPC plugin's directory), so a daemon's
            // UUID stays the same from one release to the next.
            let uuid =
                load_or_create_uuid(ctx.daemon.root.join("io.containerd.grpc.v1.introspection"))?;
            Ok::<Instance, _>(Arc::new(IntrospectionService {
                records: ctx.plugin_records(),
                uuid,
            }))
        },
    )
}

/// `io.containerd.grpc.v1.introspection`.
pub fn registration() -> Registration {
    crate::grpc_over_service::<IntrospectionService>("introspection", "introspection-service")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_persists() {
        let dir = std::env::temp_dir().join(format!("berth-uuid-{}", std::process::id()));
        let first = load_or_create_uuid(dir.clone()).unwrap();
        assert_eq!(load_or_create_uuid(dir.clone()).unwrap(), first);
        std::fs::write(dir.join("uuid"), "garbage").unwrap();
        assert!(load_or_create_uuid(dir.clone()).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn plugin_filters() {
        let plugin = Plugin {
            r#type: "io.containerd.grpc.v1".into(),
            id: "version".into(),
            ..Default::default()
        };
        let matches = |f: &str| {
            Filter::parse(f)
                .unwrap()
                .matches(&|p: &[String]| plugin_field(&plugin, p))
        };
        assert!(matches("type==io.containerd.grpc.v1"));
        assert!(matches("id==version,type~=grpc"));
        assert!(!matches("id==content"));
    }
}
