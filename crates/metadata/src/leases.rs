//! Leases: named holds on resources (content, ingests, snapshots) that keep them from the
//! garbage collector, as containerd's `metadata/leases.go`.
//!
//! Tables: `leases` (`"{ns}/{id}"` → record) and `lease_resources`
//! (`"{ns}/{id}\0{type}\0{resource}"` → empty), so a lease's resources are one key range.

use crate::MetadataStore;
use crate::db::{get_json, to_json};
use crate::util::{Table, e, nanos, open_read, time};
use berth_core::content::Digest;
use berth_core::filters::Filter;
use berth_core::labels::{self, Labels};
use berth_core::{Error, Result};
use redb::{ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};
use std::time::SystemTime;

pub(crate) const LEASES: Table = Table::new("leases");
pub(crate) const LEASE_RESOURCES: Table = Table::new("lease_resources");

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaseRecord {
    created_at: u64,
    #[serde(default)]
    labels: Labels,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: String,
    pub created_at: SystemTime,
    pub labels: Labels,
}

/// One resource of a lease: `type` is `content`, `ingests` or `snapshots/<snapshotter>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Resource {
    pub id: String,
    pub r#type: String,
}

fn lease_key(ns: &str, id: &str) -> String {
    format!("{ns}/{id}")
}

fn resources_prefix(ns: &str, id: &str) -> String {
    format!("{ns}/{id}\0")
}

fn resource_key(ns: &str, id: &str, r#type: &str, resource: &str) -> String {
    format!("{ns}/{id}\0{type}\0{resource}")
}

fn validate_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid_argument("lease id must be provided"));
    }
    if id.contains('\0') || id.len() > 256 {
        return Err(Error::invalid_argument(format!(
            "lease id {id:?} is not valid"
        )));
    }
    Ok(())
}

/// Parses and normalises a resource; containerd's `parseLeaseResource`.
fn parse_resource(r: &Resource) -> Result<Resource> {
    if r.id.is_empty() || r.id.contains('\0') {
        return Err(Error::invalid_argument(format!(
            "invalid resource id {:?}",
            r.id
        )));
    }
    let keys: Vec<&str> = r.r#type.split('/').collect();
    match keys[0] {
        "content" | "ingests" => {
            if keys.len() != 1 {
                return Err(Error::invalid_argument(format!(
                    "invalid resource type {}",
                    r.r#type
                )));
            }
            if keys[0] == "content" {
                let d = Digest::parse(&r.id).map_err(|err| {
                    Error::invalid_argument(format!(
                        "invalid content resource id {}: {}",
                        r.id,
                        err.message()
                    ))
                })?;
                return Ok(Resource {
                    id: d.to_string(),
                    r#type: r.r#type.clone(),
                });
            }
        }
        "snapshots" => {
            if keys.len() != 2 || keys[1].is_empty() {
                return Err(Error::invalid_argument(format!(
                    "invalid snapshot resource type {}",
                    r.r#type
                )));
            }
        }
        _ => {
            return Err(Error::not_implemented(format!(
                "resource type {} not supported yet",
                r.r#type
            )));
        }
    }
    Ok(r.clone())
}

/// A fresh lease ID in containerd's form (`<nanoseconds>-<random>`).
pub fn random_id() -> String {
    let now = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut bytes = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut bytes);
    }
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let word = u32::from_le_bytes(bytes);
    let suffix: String = (0..4)
        .map(|i| ALPHABET[((word >> (6 * i)) & 63) as usize] as char)
        .collect();
    format!("{}-{suffix}", now.subsec_nanos())
}

/// Records `resource` under the lease `lease` inside `tx` (used when content or an
/// ingest is created under the request's lease).
pub(crate) fn add_to_lease(
    tx: &WriteTransaction,
    ns: &str,
    lease: &str,
    r#type: &str,
    resource: &str,
) -> Result<()> {
    let leases = tx.open_table(LEASES).map_err(e("leases"))?;
    if leases
        .get(lease_key(ns, lease).as_str())
        .map_err(e("get"))?
        .is_none()
    {
        return Err(Error::not_found("lease does not exist"));
    }
    let mut resources = tx
        .open_table(LEASE_RESOURCES)
        .map_err(e("lease resources"))?;
    resources
        .insert(
            resource_key(ns, lease, r#type, resource).as_str(),
            [].as_slice(),
        )
        .map_err(e("put"))?;
    Ok(())
}

pub(crate) fn remove_from_lease(
    tx: &WriteTransaction,
    ns: &str,
    lease: &str,
    r#type: &str,
    resource: &str,
) -> Result<()> {
    let mut resources = tx
        .open_table(LEASE_RESOURCES)
        .map_err(e("lease resources"))?;
    resources
        .remove(resource_key(ns, lease, r#type, resource).as_str())
        .map_err(e("delete"))?;
    Ok(())
}

fn lease_field(lease: &Lease, path: &[String]) -> Option<String> {
    match path.first().map(String::as_str) {
        Some("id") => Some(lease.id.clone()),
        Some("labels") => berth_core::content::check_map(&path[1..], &lease.labels),
        _ => None,
    }
}

/// Every lease of every namespace with its resources, for the collector: yields
/// (namespace, lease, resources).
/// Visits one lease of a namespace with its resources.
pub(crate) type LeaseVisitor<'a> = dyn FnMut(&str, &Lease, &[Resource]) -> Result<()> + 'a;

pub(crate) fn scan_leases(tx: &WriteTransaction, f: &mut LeaseVisitor<'_>) -> Result<()> {
    let leases = tx.open_table(LEASES).map_err(e("leases"))?;
    let resources = tx
        .open_table(LEASE_RESOURCES)
        .map_err(e("lease resources"))?;
    for entry in leases.iter().map_err(e("iterate"))? {
        let (k, v) = entry.map_err(e("iterate"))?;
        let key = k.value();
        let Some((ns, id)) = crate::util::split_key(key) else {
            continue;
        };
        let record: LeaseRecord = serde_json::from_slice(v.value()).map_err(e("decoding lease"))?;
        let lease = Lease {
            id: id.to_string(),
            created_at: time(record.created_at),
            labels: record.labels,
        };
        let list = list_resources_in(&resources, ns, id)?;
        f(ns, &lease, &list)?;
    }
    Ok(())
}

fn list_resources_in(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    ns: &str,
    id: &str,
) -> Result<Vec<Resource>> {
    let prefix = resources_prefix(ns, id);
    let end = format!("{ns}/{id}\u{1}");
    let mut out = Vec::new();
    for entry in table
        .range(prefix.as_str()..end.as_str())
        .map_err(e("range"))?
    {
        let (k, _) = entry.map_err(e("range"))?;
        let rest = &k.value()[prefix.len()..];
        if let Some((t, r)) = rest.split_once('\0') {
            out.push(Resource {
                id: r.to_string(),
                r#type: t.to_string(),
            });
        }
    }
    Ok(out)
}

impl MetadataStore {
    /// Creates a lease; `id` `None` generates one.
    pub fn create_lease(&self, ns: &str, id: Option<&str>, labels: &Labels) -> Result<Lease> {
        let id = match id {
            Some(id) if !id.is_empty() => id.to_string(),
            _ => random_id(),
        };
        validate_id(&id)?;
        labels::validate_all(labels).map_err(|err| err.context("lease.Labels"))?;
        let now = SystemTime::now();
        self.write(|tx| {
            MetadataStore::ensure_namespace(tx, ns)?;
            let mut table = tx.open_table(LEASES).map_err(e("leases"))?;
            let key = lease_key(ns, &id);
            if table.get(key.as_str()).map_err(e("get"))?.is_some() {
                return Err(Error::already_exists(format!("lease {id:?}")));
            }
            let record = LeaseRecord {
                created_at: nanos(now),
                labels: labels.clone(),
            };
            table
                .insert(key.as_str(), to_json(&record)?.as_slice())
                .map_err(e("put"))?;
            Ok(())
        })?;
        Ok(Lease {
            id,
            created_at: now,
            labels: labels.clone(),
        })
    }

    pub fn delete_lease(&self, ns: &str, id: &str) -> Result<()> {
        self.write(|tx| {
            let mut table = tx.open_table(LEASES).map_err(e("leases"))?;
            if table
                .remove(lease_key(ns, id).as_str())
                .map_err(e("delete"))?
                .is_none()
            {
                return Err(Error::not_found(format!("lease {id:?}")));
            }
            delete_resources(tx, ns, id).inspect(|_| self.mark_dirty())
        })?;
        Ok(())
    }

    pub fn list_leases(&self, ns: &str, filters: &[String]) -> Result<Vec<Lease>> {
        let filter = Filter::parse_all(filters)?;
        self.read(|tx| {
            let Some(table) = open_read(tx, LEASES)? else {
                return Ok(Vec::new());
            };
            let (start, end) = crate::namespace_range(ns);
            let mut out = Vec::new();
            for entry in table
                .range(start.as_str()..end.as_str())
                .map_err(e("range"))?
            {
                let (k, v) = entry.map_err(e("range"))?;
                let record: LeaseRecord =
                    serde_json::from_slice(v.value()).map_err(e("decoding lease"))?;
                let lease = Lease {
                    id: k.value()[start.len()..].to_string(),
                    created_at: time(record.created_at),
                    labels: record.labels,
                };
                if filter.matches(&|p: &[String]| lease_field(&lease, p)) {
                    out.push(lease);
                }
            }
            Ok(out)
        })
    }

    pub fn add_lease_resource(&self, ns: &str, id: &str, resource: &Resource) -> Result<()> {
        let r = parse_resource(resource)?;
        self.write(|tx| {
            let table = tx.open_table(LEASES).map_err(e("leases"))?;
            if get_json::<LeaseRecord>(&table, &lease_key(ns, id))?.is_none() {
                return Err(Error::not_found(format!("lease {id:?}")));
            }
            drop(table);
            add_to_lease(tx, ns, id, &r.r#type, &r.id)
        })
    }

    pub fn delete_lease_resource(&self, ns: &str, id: &str, resource: &Resource) -> Result<()> {
        let r = parse_resource(resource)?;
        self.write(|tx| {
            let table = tx.open_table(LEASES).map_err(e("leases"))?;
            if get_json::<LeaseRecord>(&table, &lease_key(ns, id))?.is_none() {
                return Err(Error::not_found(format!("lease {id:?}")));
            }
            drop(table);
            remove_from_lease(tx, ns, id, &r.r#type, &r.id).inspect(|_| self.mark_dirty())
        })?;
        Ok(())
    }

    pub fn list_lease_resources(&self, ns: &str, id: &str) -> Result<Vec<Resource>> {
        self.read(|tx| {
            let exists = match open_read(tx, LEASES)? {
                Some(t) => get_json::<LeaseRecord>(&t, &lease_key(ns, id))?.is_some(),
                None => false,
            };
            if !exists {
                return Err(Error::not_found(format!("lease {id:?}")));
            }
            match open_read(tx, LEASE_RESOURCES)? {
                Some(t) => list_resources_in(&t, ns, id),
                None => Ok(Vec::new()),
            }
        })
    }
}

fn delete_resources(tx: &WriteTransaction, ns: &str, id: &str) -> Result<()> {
    let mut table = tx
        .open_table(LEASE_RESOURCES)
        .map_err(e("lease resources"))?;
    let prefix = resources_prefix(ns, id);
    let end = format!("{ns}/{id}\u{1}");
    let keys: Vec<String> = table
        .range(prefix.as_str()..end.as_str())
        .map_err(e("range"))?
        .filter_map(|r| r.ok().map(|(k, _)| k.value().to_string()))
        .collect();
    for k in keys {
        table.remove(k.as_str()).map_err(e("delete"))?;
    }
    Ok(())
}

/// Removes a lease inside the collector's transaction (an expired lease).
pub(crate) fn remove_lease_in(tx: &WriteTransaction, ns: &str, id: &str) -> Result<()> {
    let mut table = tx.open_table(LEASES).map_err(e("leases"))?;
    table
        .remove(lease_key(ns, id).as_str())
        .map_err(e("delete"))?;
    drop(table);
    delete_resources(tx, ns, id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::error::ErrorKind;

    #[test]
    fn lease_lifecycle_and_resources() {
        let dir = tempfile::tempdir().unwrap();
        let md = MetadataStore::open(&dir.path().join("m.db")).unwrap();
        let l = md
            .create_lease("ns", Some("l1"), &[("a".into(), "b".into())].into())
            .unwrap();
        assert_eq!(l.id, "l1");
        let err = md
            .create_lease("ns", Some("l1"), &Labels::new())
            .unwrap_err();
        assert_eq!(err.to_string(), "lease \"l1\": already exists");
        let generated = md.create_lease("ns", None, &Labels::new()).unwrap();
        assert!(!generated.id.is_empty());
        assert_eq!(md.list_leases("ns", &[]).unwrap().len(), 2);
        assert_eq!(
            md.list_leases("ns", &["labels.a==b".into()]).unwrap().len(),
            1
        );
        assert_eq!(md.list_leases("other", &[]).unwrap().len(), 0);
        let d = format!("sha256:{}", "a".repeat(64));
        for (t, id) in [
            ("content", d.as_str()),
            ("ingests", "ref/x"),
            ("snapshots/overlayfs", "k"),
        ] {
            md.add_lease_resource(
                "ns",
                "l1",
                &Resource {
                    id: id.into(),
                    r#type: t.into(),
                },
            )
            .unwrap();
        }
        let bad = Resource {
            id: "x".into(),
            r#type: "content".into(),
        };
        assert_eq!(
            md.add_lease_resource("ns", "l1", &bad).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        let bad = Resource {
            id: "x".into(),
            r#type: "images".into(),
        };
        assert_eq!(
            md.add_lease_resource("ns", "l1", &bad).unwrap_err().kind(),
            ErrorKind::NotImplemented
        );
        assert_eq!(md.list_lease_resources("ns", "l1").unwrap().len(), 3);
        md.delete_lease_resource(
            "ns",
            "l1",
            &Resource {
                id: "ref/x".into(),
                r#type: "ingests".into(),
            },
        )
        .unwrap();
        assert_eq!(md.list_lease_resources("ns", "l1").unwrap().len(), 2);
        md.delete_lease("ns", "l1").unwrap();
        assert_eq!(
            md.delete_lease("ns", "l1").unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            md.list_lease_resources("ns", "l1").unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert!(md.dirty() > 0);
    }
}
