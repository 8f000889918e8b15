//! How layer apply scales with directory depth (GHSA-rp3h-jf77-q9p4's class: a layer whose
//! entries make the unpacker walk the same directories again and again).
//!
//! `cargo run --release -p berth-diff --example deep_tree_bench -- [ENTRIES] [DEPTH…]`
//!
//! For each DEPTH (default 250 500 1000 2000), builds an uncompressed layer of ENTRIES
//! (default 20) files, each the only entry of its own chain of DEPTH missing
//! directories (`e<k>/d/d/…/d/f`, no directory entries, as a hostile layer may write),
//! applies it into a fresh temporary directory (under `$TMPDIR`: a tmpfs keeps the file
//! system's own allocation costs out of the numbers) and prints the wall time and the
//! time per directory level created. Linear work shows as a constant time per level.

use berth_diff::apply::{ApplyOptions, Whiteouts, apply_tar};
use std::time::Instant;

fn layer(entries: usize, depth: usize) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for k in 0..entries {
        let mut path = format!("e{k}");
        for _ in 0..depth {
            path.push_str("/d");
        }
        path.push_str("/f");
        let mut header = tar::Header::new_gnu();
        header.set_size(1);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, &path, &b"x"[..])
            .expect("appending an entry");
    }
    builder.into_inner().expect("finishing the layer")
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers"))
        .collect();
    let entries = args.first().copied().unwrap_or(20);
    let depths = if args.len() > 1 {
        args[1..].to_vec()
    } else {
        vec![250, 500, 1000, 2000]
    };
    for depth in depths {
        let tar = layer(entries, depth);
        let dir = tempfile::tempdir().expect("a temporary directory");
        let options = ApplyOptions {
            whiteouts: Whiteouts::Apply,
        };
        let start = Instant::now();
        apply_tar(dir.path(), &tar[..], &options).expect("applying the layer");
        let elapsed = start.elapsed();
        println!(
            "{entries} entries × depth {depth}: {:.1} ms, {:.2} µs per directory level",
            elapsed.as_secs_f64() * 1e3,
            elapsed.as_secs_f64() * 1e6 / (entries * depth) as f64
        );
    }
}
