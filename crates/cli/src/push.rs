//! `berth push`, client side: the image record and its blobs are read from berthd's
//! content store through the content API and uploaded to the registry by this process
//! (children first: config and layers, then manifests, then the index under the tag).
//! A blob the registry has is skipped; a blob pulled from another repository of the same
//! registry (its `containerd.io/distribution.source.<host>` label) is mounted.

use crate::client::{Client, status_message};
use berth_api::services::content::v1::{InfoRequest, ReadContentRequest};
use berth_api::services::images::v1::GetImageRequest;
use berth_core::content::ReaderAt;
use berth_core::{Error, Result};
use berth_remotes::client::PushOutcome;
use berth_remotes::manifest;
use berth_remotes::{Reference, Resolver};
use futures::StreamExt;
use oci_spec::image::Descriptor;
use std::sync::Arc;

/// Random access to a committed blob through the content API's `Read` stream, for the
/// pusher's blocking reads (it runs them on blocking threads).
struct GrpcReader {
    client: Client,
    digest: String,
    size: i64,
    handle: tokio::runtime::Handle,
}

impl ReaderAt for GrpcReader {
    fn size(&self) -> i64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: i64) -> Result<usize> {
        if offset >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let want = (buf.len() as i64).min(self.size - offset);
        let client = self.client.clone();
        let digest = self.digest.clone();
        let data = self.handle.block_on(async move {
            let mut s = client
                .content()
                .read(client.request(ReadContentRequest {
                    digest: digest.clone(),
                    offset,
                    size: want,
                }))
                .await
                .map_err(|s| Error::unavailable(status_message(&format!("read {digest}"), &s)))?
                .into_inner();
            let mut out = Vec::with_capacity(want as usize);
            while let Some(m) = s.next().await {
                let m = m.map_err(|s| {
                    Error::unavailable(status_message(&format!("read {digest}"), &s))
                })?;
                out.extend_from_slice(&m.data);
            }
            Ok::<_, Error>(out)
        })?;
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        Ok(n)
    }
}

async fn read_all(client: &Client, d: &Descriptor) -> Result<Vec<u8>> {
    let digest = d.digest().to_string();
    let mut s = client
        .content()
        .read(client.request(ReadContentRequest {
            digest: digest.clone(),
            offset: 0,
            size: 0,
        }))
        .await
        .map_err(|s| Error::unavailable(status_message(&format!("read {digest}"), &s)))?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.next().await {
        let m = m.map_err(|s| Error::unavailable(status_message(&format!("read {digest}"), &s)))?;
        if out.len() + m.data.len() > manifest::MAX_MANIFEST_SIZE as usize {
            return Err(Error::invalid_argument(format!(
                "{digest}: larger than a manifest may be"
            )));
        }
        out.extend_from_slice(&m.data);
    }
    Ok(out)
}

/// What happened to each blob, for the caller to report.
pub type Report = Vec<(String, String)>;

async fn push_blob(
    client: &Client,
    resolver: &Resolver,
    target: &Reference,
    d: &Descriptor,
    report: &mut Report,
) -> Result<()> {
    let digest = d.digest().to_string();
    let info = client
        .content()
        .info(client.request(InfoRequest {
            digest: digest.clone(),
        }))
        .await
        .map_err(|s| Error::not_found(status_message(&format!("content {digest}"), &s)))?
        .into_inner()
        .info
        .unwrap_or_default();
    let mount_from = info
        .labels
        .get(&target.distribution_source_label())
        .or_else(|| info.labels.get(&target.legacy_distribution_source_label()))
        .cloned();
    let reader = Arc::new(GrpcReader {
        client: client.clone(),
        digest: digest.clone(),
        size: d.size() as i64,
        handle: tokio::runtime::Handle::current(),
    });
    let outcome = resolver
        .push_blob(target, d, reader, mount_from.as_deref())
        .await?;
    let word = match outcome {
        PushOutcome::Exists => "exists",
        PushOutcome::Mounted => "mounted",
        PushOutcome::Uploaded => "uploaded",
    };
    report.push((digest, word.to_string()));
    Ok(())
}

/// Pushes the image named `name` in berthd to `target`.
pub async fn push(
    client: &Client,
    resolver: &Resolver,
    name: &str,
    target: &Reference,
) -> Result<(Descriptor, Report)> {
    let image = client
        .images()
        .get(client.request(GetImageRequest {
            name: name.to_string(),
        }))
        .await
        .map_err(|s| Error::not_found(status_message(&format!("image {name}"), &s)))?
        .into_inner()
        .image
        .and_then(|i| i.target)
        .ok_or_else(|| Error::not_found(format!("image {name}: no target")))?;
    let top = Descriptor::new(
        oci_spec::image::MediaType::from(image.media_type.as_str()),
        image.size as u64,
        oci_spec::image::Digest::try_from(image.digest.as_str())
            .map_err(|e| Error::invalid_argument(format!("{name}: {e}")))?,
    );
    let mut report = Report::new();
    let body = read_all(client, &top).await?;
    let mt = top.media_type().to_string();
    let by_digest = Reference {
        tag: None,
        digest: None,
        ..target.clone()
    };
    if manifest::is_index(&mt) {
        let idx = manifest::parse_index(&body, name)?;
        for m in idx.manifests() {
            let mb = read_all(client, m).await.map_err(|e| {
                e.context(format!("{name}: manifest {} for {:?} is not in berthd (pull it first, or push a single platform)", m.digest(), manifest::descriptor_platform(m).map(|p| p.to_string())))
            })?;
            push_manifest_children(client, resolver, target, &mb, name, &mut report).await?;
            resolver.push_manifest(&by_digest, m, mb.into()).await?;
            report.push((m.digest().to_string(), "manifest".into()));
        }
    } else if manifest::is_manifest(&mt) {
        push_manifest_children(client, resolver, target, &body, name, &mut report).await?;
    } else {
        return Err(Error::invalid_argument(format!(
            "{name}: cannot push a {mt}"
        )));
    }
    let tagged = if target.tag.is_some() {
        target.clone()
    } else {
        by_digest
    };
    resolver.push_manifest(&tagged, &top, body.into()).await?;
    report.push((top.digest().to_string(), "pushed".into()));
    Ok((top, report))
}

async fn push_manifest_children(
    client: &Client,
    resolver: &Resolver,
    target: &Reference,
    body: &[u8],
    name: &str,
    report: &mut Report,
) -> Result<()> {
    let m = manifest::parse_manifest(body, name)?;
    push_blob(client, resolver, target, m.config(), report).await?;
    for l in m.layers() {
        if l.urls().as_ref().is_some_and(|u| !u.is_empty()) {
            report.push((l.digest().to_string(), "foreign (not pushed)".into()));
            continue;
        }
        push_blob(client, resolver, target, l, report).await?;
    }
    Ok(())
}
