//! Pull progress for people (one bar per blob), for scripts (JSON lines) or nothing.

use berth_remotes::pull::{BlobKind, ImageInfo, ProgressEvent, ProgressState};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Bars,
    Quiet,
    Json,
}

fn kind_name(k: &BlobKind) -> String {
    match k {
        BlobKind::Index => "index".into(),
        BlobKind::Manifest => "manifest".into(),
        BlobKind::Config => "config".into(),
        BlobKind::Layer(i) => format!("layer {i}"),
    }
}

fn state_name(s: &ProgressState) -> String {
    match s {
        ProgressState::Waiting => "waiting".into(),
        ProgressState::Downloading => "downloading".into(),
        ProgressState::Resuming => "resuming".into(),
        ProgressState::Exists => "exists".into(),
        ProgressState::Done => "done".into(),
        ProgressState::Failed(_) => "failed".into(),
        ProgressState::Unpacking => "unpacking".into(),
        ProgressState::Unpacked => "unpacked".into(),
    }
}

fn short(digest: &str) -> String {
    let hex = digest.split_once(':').map(|(_, h)| h).unwrap_or(digest);
    hex.chars().take(12).collect()
}

/// One JSON object for an event.
pub fn event_json(ev: &ProgressEvent) -> serde_json::Value {
    let mut v = serde_json::json!({
        "digest": ev.digest,
        "kind": kind_name(&ev.kind),
        "media_type": ev.media_type,
        "state": state_name(&ev.state),
        "offset": ev.offset,
        "total": ev.total,
    });
    if let ProgressState::Failed(e) = &ev.state {
        v["error"] = e.clone().into();
    }
    v
}

/// Shows events until the channel closes.
pub async fn display(mut rx: UnboundedReceiver<ProgressEvent>, mode: Mode) {
    match mode {
        Mode::Quiet => while rx.recv().await.is_some() {},
        Mode::Json => {
            let mut last: HashMap<String, (String, Instant)> = HashMap::new();
            while let Some(ev) = rx.recv().await {
                let state = state_name(&ev.state);
                let now = Instant::now();
                let show = match last.get(&ev.digest) {
                    Some((s, t)) => {
                        *s != state || now.duration_since(*t) >= Duration::from_millis(250)
                    }
                    None => true,
                };
                if show {
                    println!("{}", event_json(&ev));
                    last.insert(ev.digest.clone(), (state, now));
                }
            }
        }
        Mode::Bars => {
            let tty = std::io::stderr().is_terminal();
            let multi = MultiProgress::with_draw_target(if tty {
                ProgressDrawTarget::stderr_with_hz(10)
            } else {
                ProgressDrawTarget::hidden()
            });
            let style = ProgressStyle::with_template(
                "{prefix:<22} {msg:<12} [{bar:30.cyan/blue}] {bytes:>10} / {total_bytes:<10}",
            )
            .expect("valid template")
            .progress_chars("=> ");
            let mut bars: HashMap<String, ProgressBar> = HashMap::new();
            let mut states: HashMap<String, String> = HashMap::new();
            while let Some(ev) = rx.recv().await {
                let bar = bars.entry(ev.digest.clone()).or_insert_with(|| {
                    let b = multi.add(ProgressBar::new(ev.total));
                    b.set_style(style.clone());
                    b.set_prefix(format!("{} {}", kind_name(&ev.kind), short(&ev.digest)));
                    b
                });
                bar.set_position(ev.offset.min(ev.total));
                let state = state_name(&ev.state);
                bar.set_message(state.clone());
                if !tty
                    && states.get(&ev.digest) != Some(&state)
                    && !matches!(
                        ev.state,
                        ProgressState::Downloading | ProgressState::Waiting
                    )
                {
                    eprintln!(
                        "{} {}: {state} ({} bytes)",
                        kind_name(&ev.kind),
                        short(&ev.digest),
                        ev.offset
                    );
                }
                states.insert(ev.digest.clone(), state);
                if matches!(ev.state, ProgressState::Unpacked | ProgressState::Failed(_))
                    || (matches!(ev.state, ProgressState::Done | ProgressState::Exists)
                        && !matches!(ev.kind, BlobKind::Layer(_)))
                {
                    bar.finish();
                }
            }
            // Layers that were not unpacked (--no-unpack) end with the stream.
            for bar in bars.values().filter(|b| !b.is_finished()) {
                bar.finish();
            }
        }
    }
}

/// The closing line(s) of a successful pull.
pub fn finish(mode: Mode, name: &str, image: &ImageInfo, elapsed: Duration) {
    let size: u64 = image.layers.iter().map(|l| l.size()).sum::<u64>() + image.config.size();
    match mode {
        Mode::Quiet => println!("{name}"),
        Mode::Json => println!(
            "{}",
            serde_json::json!({
                "status": "done", "name": name,
                "digest": image.target.digest().to_string(),
                "manifest": image.manifest.digest().to_string(),
                "size": size, "seconds": elapsed.as_secs_f64(),
            })
        ),
        Mode::Bars => {
            println!(
                "{name}: pulled {} in {:.1}s",
                crate::table::human_size(size),
                elapsed.as_secs_f64()
            );
            println!("digest: {}", image.target.digest());
        }
    }
}
