//! containerd 2.x's transfer progress: events named as its local transferrer names them
//! (`Resolving from …`, `waiting`, `downloading`, `complete`, `already exists`,
//! `extracting`, `extracted`, `saved`, `Completed pull from …`), each blob named by its
//! ref key (`layer-sha256:…`, `config-…`, `manifest-…`, `index-…`) with its parents'
//! ref keys, so a 2.x client shows the same tree of bars.

use berth_core::content::Descriptor;
use berth_remotes::pull::{BlobKind, ProgressEvent, ProgressState};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One progress event (containerd's `transfer.Progress`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub event: String,
    pub name: String,
    pub parents: Vec<String>,
    pub progress: i64,
    pub total: i64,
    pub desc: Option<Descriptor>,
}

/// Where progress goes; must not block (the gRPC adapter queues).
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// containerd's `remotes.MakeRefKey`: the media type's kind, a dash, the digest.
pub fn ref_key(desc: &Descriptor) -> String {
    use berth_remotes::manifest;
    let mt = desc.media_type.as_str();
    let kind = if manifest::is_index(mt) {
        "index"
    } else if manifest::is_manifest(mt) {
        "manifest"
    } else if mt.contains("layer") || mt.contains(".diff.") {
        "layer"
    } else if mt.contains("config") || mt == "application/octet-stream" {
        "config"
    } else {
        "unknown"
    };
    format!("{kind}-{}", desc.digest)
}

fn kind_key(kind: &BlobKind, digest: &str) -> String {
    let k = match kind {
        BlobKind::Index => "index",
        BlobKind::Manifest => "manifest",
        BlobKind::Config => "config",
        BlobKind::Layer(_) => "layer",
    };
    format!("{k}-{digest}")
}

/// How often a blob's `downloading` event is repeated at most (containerd: every 300 ms).
const DOWNLOAD_INTERVAL: Duration = Duration::from_millis(200);

/// Each blob's parent ref key, by digest (filled from the pipeline's `on_children`).
pub(crate) type Parents = Arc<Mutex<HashMap<String, String>>>;

/// Turns the pull pipeline's events into containerd's.
pub(crate) struct Translator {
    sink: ProgressFn,
    root: String,
    index: Option<String>,
    manifest: Option<String>,
    parents: Option<Parents>,
    last: HashMap<String, (String, Instant)>,
}

impl Translator {
    pub(crate) fn new(sink: ProgressFn, root: &str) -> Translator {
        Translator {
            sink,
            root: root.to_string(),
            index: None,
            manifest: None,
            parents: None,
            last: HashMap::new(),
        }
    }

    /// Parents looked up by digest first (a pull of several manifests).
    pub(crate) fn with_parents(mut self, parents: Parents) -> Translator {
        self.parents = Some(parents);
        self
    }

    fn parents(&self, kind: &BlobKind, digest: &str) -> Vec<String> {
        if let Some(p) = self
            .parents
            .as_ref()
            .and_then(|m| m.lock().unwrap().get(digest).cloned())
        {
            return vec![p];
        }
        let p = match kind {
            BlobKind::Index => None,
            BlobKind::Manifest => self.index.clone(),
            BlobKind::Config | BlobKind::Layer(_) => self.manifest.clone(),
        };
        vec![p.unwrap_or_else(|| self.root.clone())]
    }

    pub(crate) fn event(&mut self, ev: &ProgressEvent) {
        let name = kind_key(&ev.kind, &ev.digest);
        match ev.kind {
            BlobKind::Index => self.index = Some(name.clone()),
            BlobKind::Manifest => self.manifest = Some(name.clone()),
            _ => {}
        }
        let event = match &ev.state {
            ProgressState::Waiting => "waiting",
            ProgressState::Downloading | ProgressState::Resuming => "downloading",
            ProgressState::Exists => "already exists",
            ProgressState::Done => "complete",
            ProgressState::Unpacking => "extracting",
            ProgressState::Unpacked => "extracted",
            // The transfer's error says it; containerd sends no event for a failure.
            ProgressState::Failed(_) => return,
        };
        let now = Instant::now();
        if let Some((last, at)) = self.last.get(&name)
            && last == event
            && event == "downloading"
            && now.duration_since(*at) < DOWNLOAD_INTERVAL
            && ev.offset < ev.total
        {
            return;
        }
        self.last.insert(name.clone(), (event.to_string(), now));
        let parents = self.parents(&ev.kind, &ev.digest);
        (self.sink)(Progress {
            event: event.to_string(),
            name,
            parents,
            progress: ev.offset as i64,
            total: ev.total as i64,
            desc: Some(Descriptor {
                media_type: ev.media_type.clone(),
                digest: ev.digest.clone(),
                size: ev.total as i64,
                annotations: Default::default(),
            }),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: BlobKind, digest: &str, state: ProgressState, offset: u64) -> ProgressEvent {
        ProgressEvent {
            digest: digest.into(),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            kind,
            state,
            offset,
            total: 100,
        }
    }

    #[test]
    fn events_carry_containerd_names_and_parents() {
        let seen = Arc::new(Mutex::new(vec![]));
        let s = seen.clone();
        let mut t = Translator::new(Arc::new(move |p| s.lock().unwrap().push(p)), "img:1");
        t.event(&ev(
            BlobKind::Manifest,
            "sha256:m",
            ProgressState::Waiting,
            0,
        ));
        t.event(&ev(
            BlobKind::Layer(0),
            "sha256:l",
            ProgressState::Waiting,
            0,
        ));
        t.event(&ev(
            BlobKind::Layer(0),
            "sha256:l",
            ProgressState::Downloading,
            10,
        ));
        // Repeated within the interval: dropped.
        t.event(&ev(
            BlobKind::Layer(0),
            "sha256:l",
            ProgressState::Downloading,
            20,
        ));
        t.event(&ev(
            BlobKind::Layer(0),
            "sha256:l",
            ProgressState::Done,
            100,
        ));
        t.event(&ev(
            BlobKind::Layer(0),
            "sha256:l",
            ProgressState::Unpacked,
            100,
        ));
        let seen = seen.lock().unwrap();
        let events: Vec<_> = seen.iter().map(|p| p.event.as_str()).collect();
        assert_eq!(
            events,
            ["waiting", "waiting", "downloading", "complete", "extracted"]
        );
        assert_eq!(seen[0].name, "manifest-sha256:m");
        assert_eq!(seen[0].parents, ["img:1"]);
        assert_eq!(seen[1].name, "layer-sha256:l");
        assert_eq!(seen[1].parents, ["manifest-sha256:m"]);
        assert_eq!(seen[3].progress, 100);
    }

    #[test]
    fn ref_keys_follow_media_types() {
        let d = |mt: &str| Descriptor {
            media_type: mt.into(),
            digest: "sha256:x".into(),
            ..Default::default()
        };
        assert_eq!(
            ref_key(&d("application/vnd.oci.image.index.v1+json")),
            "index-sha256:x"
        );
        assert_eq!(
            ref_key(&d("application/vnd.docker.distribution.manifest.v2+json")),
            "manifest-sha256:x"
        );
        assert_eq!(
            ref_key(&d("application/vnd.docker.image.rootfs.diff.tar.gzip")),
            "layer-sha256:x"
        );
        assert_eq!(
            ref_key(&d("application/vnd.oci.image.config.v1+json")),
            "config-sha256:x"
        );
    }
}
