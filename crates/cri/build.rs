//! Generates the Kubernetes CRI `runtime.v1` types and tonic stubs (server and client)
//! from the `proto/v1.proto` that the published `k8s-cri` package ships. Nothing
//! generated is committed and no proto file is copied into this repository; the
//! package's own generated Rust code is not used either.

const PROTO_PACKAGE: &str = "k8s-cri";
const PROTO_FILE: &str = "v1.proto";

fn main() {
    let proto_dir = berth_build_support::package_dir(PROTO_PACKAGE, "proto");
    assert!(
        proto_dir.join(PROTO_FILE).is_file(),
        "{} has no {PROTO_FILE}",
        proto_dir.display()
    );
    println!("cargo:rerun-if-changed=build.rs");

    let descriptors = protox::compile([PROTO_FILE], [&proto_dir]).unwrap_or_else(|err| {
        panic!(
            "compiling the CRI proto {}: {err:?}",
            proto_dir.join(PROTO_FILE).display()
        )
    });
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Every RPC is written out by hand: the ones not built yet answer Unimplemented
        // with a message saying so, not tonic's generic "Not yet implemented".
        .generate_default_stubs(false)
        .compile_fds(descriptors)
        .expect("generating tonic stubs for the CRI runtime.v1 API");
}
