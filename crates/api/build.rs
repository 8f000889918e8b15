//! Generates containerd's gRPC API from the `.proto` files that the published
//! `containerd-client` package ships in its `vendor/` directory. Nothing generated is
//! committed and no proto file is copied into this repository.

const PROTO_PACKAGE: &str = "containerd-client";

const SERVICES: &[&str] = &[
    "containers/v1/containers.proto",
    "content/v1/content.proto",
    "diff/v1/diff.proto",
    "events/v1/events.proto",
    "images/v1/images.proto",
    "introspection/v1/introspection.proto",
    "leases/v1/leases.proto",
    "namespaces/v1/namespace.proto",
    "sandbox/v1/sandbox.proto",
    "snapshots/v1/snapshots.proto",
    "streaming/v1/streaming.proto",
    "tasks/v1/tasks.proto",
    "transfer/v1/transfer.proto",
    "version/v1/version.proto",
    "ttrpc/events/v1/events.proto",
];

const TYPES: &[&str] = &[
    "descriptor.proto",
    "metrics.proto",
    "mount.proto",
    "platform.proto",
    "sandbox.proto",
    "task/task.proto",
    "event.proto",
    "fieldpath.proto",
    "introspection.proto",
    "runc/options/oci.proto",
    "transfer/imagestore.proto",
    "transfer/importexport.proto",
    "transfer/progress.proto",
    "transfer/registry.proto",
    "transfer/streaming.proto",
];

const EVENTS: &[&str] = &[
    "container.proto",
    "content.proto",
    "image.proto",
    "namespace.proto",
    "snapshot.proto",
    "task.proto",
];

fn main() {
    let vendor = berth_build_support::package_dir(PROTO_PACKAGE, "vendor");
    println!("cargo:rerun-if-changed=build.rs");

    let api = "github.com/containerd/containerd/api";
    let mut files: Vec<String> = Vec::new();
    files.extend(SERVICES.iter().map(|f| format!("{api}/services/{f}")));
    files.extend(TYPES.iter().map(|f| format!("{api}/types/{f}")));
    files.extend(EVENTS.iter().map(|f| format!("{api}/events/{f}")));

    let descriptors = protox::compile(&files, [&vendor]).unwrap_or_else(|err| {
        panic!(
            "compiling containerd protos from {}: {err:?}",
            vendor.display()
        )
    });

    // Kept for reflection: the events service filters on fields of any event type.
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    std::fs::write(
        out_dir.join("containerd_descriptors.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )
    .expect("writing the descriptor set");

    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    // Content written through the Write call is decoded as a slice of tonic's receive
    // buffer instead of being copied out of it: berthd hands the same buffer to the
    // file write and to its hashing thread.
    config.bytes([".containerd.services.content.v1.WriteContentRequest.data"]);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .generate_default_stubs(true)
        .compile_fds_with_config(descriptors, config)
        .expect("generating tonic stubs for containerd's API");
}
