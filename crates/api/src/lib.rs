//! containerd's gRPC API, generated at build time (see `build.rs`).
//!
//! The module tree mirrors the protobuf packages because the generated code refers to
//! sibling packages with relative `super::` paths. Hand-written code here is limited to
//! the conversions every service needs: [`any`] builds `Any` values with containerd's bare
//! type URLs and [`timestamp`] converts times.

#![allow(clippy::all, missing_docs, rustdoc::all)]

macro_rules! include_proto {
    ($package:literal) => {
        include!(concat!(env!("OUT_DIR"), "/", $package, ".rs"));
    };
}

pub mod containerd {
    pub mod events {
        include_proto!("containerd.events");
    }
    pub mod runc {
        pub mod v1 {
            include_proto!("containerd.runc.v1");
        }
    }
    pub mod types {
        include_proto!("containerd.types");
        pub mod transfer {
            include_proto!("containerd.types.transfer");
        }
    }
    pub mod v1 {
        pub mod types {
            include_proto!("containerd.v1.types");
        }
    }
    pub mod services {
        pub mod containers {
            pub mod v1 {
                include_proto!("containerd.services.containers.v1");
            }
        }
        pub mod content {
            pub mod v1 {
                include_proto!("containerd.services.content.v1");
            }
        }
        pub mod diff {
            pub mod v1 {
                include_proto!("containerd.services.diff.v1");
            }
        }
        pub mod events {
            pub mod v1 {
                include_proto!("containerd.services.events.v1");
            }
            pub mod ttrpc {
                pub mod v1 {
                    include_proto!("containerd.services.events.ttrpc.v1");
                }
            }
        }
        pub mod images {
            pub mod v1 {
                include_proto!("containerd.services.images.v1");
            }
        }
        pub mod introspection {
            pub mod v1 {
                include_proto!("containerd.services.introspection.v1");
            }
        }
        pub mod leases {
            pub mod v1 {
                include_proto!("containerd.services.leases.v1");
            }
        }
        pub mod namespaces {
            pub mod v1 {
                include_proto!("containerd.services.namespaces.v1");
            }
        }
        pub mod sandbox {
            pub mod v1 {
                include_proto!("containerd.services.sandbox.v1");
            }
        }
        pub mod snapshots {
            pub mod v1 {
                include_proto!("containerd.services.snapshots.v1");
            }
        }
        pub mod streaming {
            pub mod v1 {
                include_proto!("containerd.services.streaming.v1");
            }
        }
        pub mod tasks {
            pub mod v1 {
                include_proto!("containerd.services.tasks.v1");
            }
        }
        pub mod transfer {
            pub mod v1 {
                include_proto!("containerd.services.transfer.v1");
            }
        }
        pub mod version {
            pub mod v1 {
                include_proto!("containerd.services.version.v1");
            }
        }
    }
}

pub mod google {
    pub mod rpc {
        include_proto!("google.rpc");
    }
}

/// The encoded `FileDescriptorSet` of every generated message, for reflection (e.g.
/// filtering events on fields of any event type).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/containerd_descriptors.bin"));

pub use containerd::services;
pub use containerd::types;

/// `Any` values with containerd's type URLs.
pub mod any {
    use prost::{Message, Name};
    use prost_types::Any;

    /// containerd (through Go's `typeurl`) names a message by its bare full name,
    /// `containerd.events.TaskCreate`; prost's default `type_url()` adds a leading `/`
    /// that `ctr` cannot resolve.
    pub fn type_url<M: Name>() -> String {
        M::full_name()
    }

    /// Packs `message` into an `Any` that containerd's clients decode.
    pub fn pack<M: Message + Name>(message: &M) -> Any {
        Any {
            type_url: type_url::<M>(),
            value: message.encode_to_vec(),
        }
    }

    /// Unpacks `any` if it holds an `M`, accepting both the bare and the `/`-prefixed or
    /// `types.googleapis.com/`-prefixed URL forms.
    pub fn unpack<M: Message + Name + Default>(any: &Any) -> Option<M> {
        let name = any.type_url.rsplit('/').next().unwrap_or_default();
        if name != M::full_name() {
            return None;
        }
        M::decode(any.value.as_slice()).ok()
    }
}

/// Conversions between `std::time::SystemTime` and protobuf timestamps.
pub mod timestamp {
    use prost_types::Timestamp;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    pub fn from_system_time(time: SystemTime) -> Timestamp {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        Timestamp {
            seconds: since.as_secs() as i64,
            nanos: since.subsec_nanos() as i32,
        }
    }

    pub fn to_system_time(timestamp: &Timestamp) -> SystemTime {
        let seconds = timestamp.seconds.max(0) as u64;
        let nanos = timestamp.nanos.clamp(0, 999_999_999) as u32;
        UNIX_EPOCH + Duration::new(seconds, nanos)
    }

    pub fn now() -> Timestamp {
        from_system_time(SystemTime::now())
    }
}
