//! The CRI's view of the image store, as containerd 1.6's CRI image store builds it:
//! every image record of the `k8s.io` namespace (whoever created it) grouped by image
//! ID, the digest of its config for this machine's platform. Built from the metadata
//! store on each call, so it never lags behind `ctr -n k8s.io images` changes; what a
//! record's content says (ID, size, user, chain ID) is cached by target digest, content
//! being immutable.

use berth_core::content::{ContentStore, Digest, Scope};
use berth_core::{Error, Result};
use berth_metadata::MetadataStore;
use berth_remotes::Platform;
use berth_remotes::manifest::{is_index, parse_index, parse_manifest, select_platform};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// Manifests, indexes and configs larger than this are refused rather than read.
const MAX_METADATA_BLOB: i64 = 16 << 20;
/// How deep indexes may nest before the walk gives up.
const MAX_INDEX_DEPTH: usize = 4;

/// What an image's content says, for the CRI.
#[derive(Debug)]
pub struct ImageFacts {
    /// `sha256:<config digest>`.
    pub id: String,
    /// The identity chain ID of the config's diff IDs.
    pub chain_id: String,
    /// containerd's `Image.Size`: the index (if any), the platform's manifest, its
    /// config and its layers, as their descriptors give them.
    pub size: u64,
    /// The config's `config.User`.
    pub user: String,
    /// The config as stored (for `ImageStatus` verbose info).
    pub config: Vec<u8>,
}

/// One CRI image: its facts and every record name pointing at it.
#[derive(Debug, Clone)]
pub struct CriImage {
    pub facts: Arc<ImageFacts>,
    /// Record names, sorted.
    pub references: Vec<String>,
}

/// The image view over one namespace.
pub struct ImageView {
    md: Arc<MetadataStore>,
    content: Arc<dyn ContentStore>,
    namespace: String,
    facts: Mutex<HashMap<String, Arc<ImageFacts>>>,
}

impl ImageView {
    pub fn new(md: Arc<MetadataStore>, content: Arc<dyn ContentStore>, namespace: &str) -> Self {
        ImageView {
            md,
            content,
            namespace: namespace.to_string(),
            facts: Mutex::new(HashMap::new()),
        }
    }

    /// Every image, ordered by ID. Records whose content cannot be read are left out
    /// (logged), as containerd's CRI leaves out images it cannot load.
    pub fn list(&self) -> Result<Vec<CriImage>> {
        let records = self.md.list_images(&self.namespace, &[])?;
        let mut by_id: BTreeMap<String, CriImage> = BTreeMap::new();
        let mut seen_targets = HashSet::with_capacity(records.len());
        for record in records {
            let facts = match self.facts_for(&record.target) {
                Ok(facts) => facts,
                Err(e) => {
                    tracing::debug!(image = %record.name, error = %e, "image left out of the CRI view");
                    continue;
                }
            };
            seen_targets.insert(record.target.digest.clone());
            by_id
                .entry(facts.id.clone())
                .or_insert_with(|| CriImage {
                    facts,
                    references: vec![],
                })
                .references
                .push(record.name);
        }
        // Forget what belongs to records that are gone.
        self.facts
            .lock()
            .unwrap()
            .retain(|target, _| seen_targets.contains(target));
        let mut images: Vec<CriImage> = by_id.into_values().collect();
        for image in &mut images {
            image.references.sort();
        }
        Ok(images)
    }

    /// containerd's `localResolve`: an image ID (`sha256:<hex>`), else a reference
    /// (normalised) naming a record, else a unique prefix of an ID (`<hex>` or
    /// `sha256:<hex>`). `Ok(None)`: no such image. Several IDs with that prefix: an
    /// error, as containerd's digest set answers.
    pub fn resolve(&self, ref_or_id: &str) -> Result<Option<CriImage>> {
        let images = self.list()?;
        if Digest::parse(ref_or_id).is_err()
            && let Ok(reference) = crate::reference::normalize(ref_or_id)
        {
            let name = reference.to_string();
            if let Some(image) = images.iter().find(|i| i.references.contains(&name)) {
                return Ok(Some(image.clone()));
            }
        }
        let (algorithm, hex) = match ref_or_id.split_once(':') {
            Some((algorithm, hex)) => (Some(algorithm), hex),
            None => (None, ref_or_id),
        };
        if hex.is_empty() || algorithm.is_some_and(|a| a != "sha256") {
            return Ok(None);
        }
        let mut matching = images
            .into_iter()
            .filter(|i| i.facts.id["sha256:".len()..].starts_with(hex));
        let found = matching.next();
        if found.is_some() && matching.next().is_some() {
            return Err(Error::unknown(format!(
                "image ID prefix {ref_or_id:?} is ambiguous: more than one image matches"
            )));
        }
        Ok(found)
    }

    /// What the content of an image record's `target` says (cached by its digest).
    pub fn facts_for(&self, target: &berth_core::content::Descriptor) -> Result<Arc<ImageFacts>> {
        if let Some(facts) = self.facts.lock().unwrap().get(&target.digest) {
            return Ok(facts.clone());
        }
        let facts = Arc::new(self.read_facts(target)?);
        self.facts
            .lock()
            .unwrap()
            .insert(target.digest.clone(), facts.clone());
        Ok(facts)
    }

    fn read_facts(&self, target: &berth_core::content::Descriptor) -> Result<ImageFacts> {
        let host = Platform::host();
        let mut size = 0u64;
        let (mut media_type, mut digest) = (target.media_type.clone(), target.digest.clone());
        size += u64::try_from(target.size).unwrap_or(0);
        let mut body = self.read(&digest)?;
        let mut depth = 0;
        while is_index(&media_type) {
            depth += 1;
            if depth > MAX_INDEX_DEPTH {
                return Err(Error::invalid_argument(format!(
                    "{digest}: indexes nested deeper than {MAX_INDEX_DEPTH}"
                )));
            }
            let index = parse_index(&body, &digest)?;
            let chosen = select_platform(&index, &host, &digest)?;
            media_type = chosen.media_type().to_string();
            digest = chosen.digest().to_string();
            size += chosen.size();
            body = self.read(&digest)?;
        }
        let manifest = parse_manifest(&body, &digest)?;
        let config_digest = manifest.config().digest().to_string();
        size += manifest.config().size();
        size += manifest.layers().iter().map(|l| l.size()).sum::<u64>();
        let config = self.read(&config_digest)?;
        let parsed: serde_json::Value = serde_json::from_slice(&config)
            .map_err(|e| Error::invalid_argument(format!("image config {config_digest}: {e}")))?;
        let user = parsed
            .pointer("/config/User")
            .and_then(|u| u.as_str())
            .unwrap_or_default()
            .to_string();
        let diff_ids: Vec<String> = parsed
            .pointer("/rootfs/diff_ids")
            .and_then(|d| d.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|d| d.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let chain_id = berth_diff::unpack::chain_ids(&diff_ids)
            .pop()
            .unwrap_or_default();
        Ok(ImageFacts {
            id: config_digest,
            chain_id,
            size,
            user,
            config,
        })
    }

    fn read(&self, digest: &str) -> Result<Vec<u8>> {
        let parsed = Digest::parse(digest)?;
        let reader = self
            .content
            .reader_at(&Scope::new(self.namespace.clone()), &parsed)?;
        let size = reader.size();
        if !(0..=MAX_METADATA_BLOB).contains(&size) {
            return Err(Error::invalid_argument(format!(
                "{digest}: {size} bytes is too large for image metadata"
            )));
        }
        let mut body = vec![0u8; size as usize];
        let mut offset = 0usize;
        while offset < body.len() {
            let n = reader.read_at(&mut body[offset..], offset as i64)?;
            if n == 0 {
                break;
            }
            offset += n;
        }
        body.truncate(offset);
        Ok(body)
    }
}

/// containerd's `getUserFromImage`: a numeric user (before any `:group`) is a UID,
/// anything else a user name.
pub fn user_of(user: &str) -> (Option<i64>, String) {
    if user.is_empty() {
        return (None, String::new());
    }
    let user = user.split(':').next().unwrap_or_default();
    match user.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        Err(_) => (None, user.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_as_containerd_reads_them() {
        assert_eq!(user_of(""), (None, String::new()));
        assert_eq!(user_of("1000:1000"), (Some(1000), String::new()));
        assert_eq!(user_of("nobody"), (None, "nobody".to_string()));
        assert_eq!(user_of("www:www"), (None, "www".to_string()));
    }
}
