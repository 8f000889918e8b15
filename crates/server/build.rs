//! Relinks berthd when the start-up function order changes: `scripts/build-release`
//! passes `startup-order.txt` to the linker, a file cargo does not otherwise watch.

fn main() {
    println!("cargo:rerun-if-changed=startup-order.txt");
}
