//! What builds leave in storage for later builds and other replicas: layer, image,
//! pinned and referrers records, and the leases that let one replica build an image
//! while the others wait. Records are written after the blobs they name and checked
//! against storage when read, so a record never leads to a missing blob.

use super::{BuildContext, Job};
use crate::built::{BuiltImage, Referrer, StoredManifest};
use crate::error::BuildError;
use crate::manifest;
use crate::reference::Digest;
use crate::state::SharedState;
use crate::storage::{RecordKind, Storage, StorageError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// What a build knows of one layer once it is stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct LayerRecord {
    pub digest: String,
    pub diff_id: String,
    pub size: u64,
    pub rating: u64,
    pub paths: usize,
}

/// An assembled image as stored: the exact manifest bytes of both formats.
#[derive(Debug, Serialize, Deserialize)]
struct ImageRecord {
    docker: String,
    oci: String,
    /// Artifact manifests (the SBOM) whose subject is one of the two.
    #[serde(default)]
    referrers: Vec<String>,
}

/// The artifacts naming one manifest, kept so any process on the storage can
/// answer the referrers API for it.
#[derive(Debug, Serialize, Deserialize)]
struct ReferrersRecord {
    manifests: Vec<String>,
}

/// The blobs a record leads to, so it can be deleted before any of them is: a
/// record never outlives its blobs. None for a record that cannot be read.
pub fn record_blobs(kind: RecordKind, key: &str, raw: &[u8]) -> Option<Vec<Digest>> {
    let manifests = |texts: &mut dyn Iterator<Item = &String>| -> Option<Vec<Digest>> {
        let mut blobs = Vec::new();
        for text in texts {
            blobs.extend(manifest::named_blobs(text.as_bytes())?);
        }
        Some(blobs)
    };
    match kind {
        RecordKind::Layer => {
            let record: LayerRecord = serde_json::from_slice(raw).ok()?;
            Some(vec![Digest::parse(&record.digest).ok()?])
        }
        RecordKind::Image | RecordKind::Pinned => {
            let record: ImageRecord = serde_json::from_slice(raw).ok()?;
            let mut texts = [&record.docker, &record.oci]
                .into_iter()
                .chain(&record.referrers);
            manifests(&mut texts)
        }
        RecordKind::Referrers => {
            let record: ReferrersRecord = serde_json::from_slice(raw).ok()?;
            let mut blobs = manifests(&mut record.manifests.iter())?;
            blobs.push(Digest::parse(&format!("sha256:{key}")).ok()?);
            Some(blobs)
        }
    }
}

pub(super) fn storage_error(e: StorageError) -> BuildError {
    let message = e.to_string();
    if message.contains("No space left on device") {
        return BuildError::NoSpace {
            what: "storage",
            detail: "no space left on device".into(),
        };
    }
    BuildError::Storage(message)
}

/// A layer another build (or replica) stored, if its blob is still there.
pub(super) async fn stored_layer(
    c: &BuildContext,
    key: &str,
) -> Result<Option<LayerRecord>, BuildError> {
    let Some(raw) = c
        .storage
        .read_record(RecordKind::Layer, key)
        .await
        .map_err(storage_error)?
    else {
        return Ok(None);
    };
    let Ok(record) = serde_json::from_slice::<LayerRecord>(&raw) else {
        return Ok(None);
    };
    let Ok(digest) = Digest::parse(&record.digest) else {
        return Ok(None);
    };
    if c.storage.blob_size(&digest).await.map_err(storage_error)? != Some(record.size) {
        return Ok(None);
    }
    c.shared.remember_blob(&digest);
    Ok(Some(record))
}

/// An image assembled earlier from the same top-level paths, by this process or
/// another on the same storage, if storage still holds all of it.
pub(super) async fn known_image(
    c: &BuildContext,
    image_key: &str,
) -> Result<Option<Arc<BuiltImage>>, BuildError> {
    let remembered = c
        .images
        .lock()
        .expect("image memo lock")
        .get(image_key)
        .cloned();
    match remembered {
        // Storage can lose blobs behind our back (a bucket emptied, restored from
        // an older backup): a remembered image is served only while its blobs exist.
        Some(image) if image_is_stored(c, &image).await? => return Ok(Some(image)),
        Some(_) => {
            c.images.lock().expect("image memo lock").remove(image_key);
        }
        None => {}
    }
    load_image(c, RecordKind::Image, image_key).await
}

/// Takes the build lease of an image; while another replica holds it, waits for
/// that replica's image instead and returns it.
pub(super) async fn take_lease(
    c: &BuildContext,
    job: &Job,
    image_key: &str,
) -> Result<Option<Arc<BuiltImage>>, BuildError> {
    loop {
        if c.storage
            .acquire_lease(image_key, c.settings.lease_ttl)
            .await
            .map_err(storage_error)?
        {
            return Ok(None);
        }
        c.shared
            .enter_phase(&job.key, "waiting for another replica");
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(image) = load_image(c, RecordKind::Image, image_key).await? {
            return Ok(Some(image));
        }
    }
}

pub(super) async fn release_lease(c: &BuildContext, image_key: &str) {
    if let Err(e) = c.storage.release_lease(image_key).await {
        // It expires on its own; the other replicas then take over.
        log::warn!("releasing lease {image_key}: {e}");
    }
}

/// Records a new image: its referrers, the image under its key, and for a pinned
/// source the request too.
pub(super) async fn store_image(
    c: &BuildContext,
    job: &Job,
    image_key: &str,
    image: &Arc<BuiltImage>,
) -> Result<(), BuildError> {
    store_referrers(c, image).await?;
    store_record(c, RecordKind::Image, image_key, image).await?;
    if job.source.pinned {
        store_record(c, RecordKind::Pinned, &job.key, image).await?;
    }
    c.images
        .lock()
        .expect("image memo lock")
        .insert(image_key.to_string(), image.clone());
    Ok(())
}

/// One record per subject manifest, naming its artifacts, so the referrers API
/// answers on any process before it has seen the image. Written side by side (on
/// a bucket each is a round trip), and once for a zstd image, whose one manifest
/// stands in for both formats.
async fn store_referrers(c: &BuildContext, image: &BuiltImage) -> Result<(), BuildError> {
    let mut subjects = vec![&image.docker.digest, &image.oci.digest];
    subjects.dedup();
    futures::future::try_join_all(subjects.into_iter().map(|subject| {
        let manifests = image
            .referrers
            .iter()
            .filter(|r| &r.subject == subject)
            .map(|r| String::from_utf8_lossy(&r.manifest.bytes).into_owned())
            .collect();
        let record = ReferrersRecord { manifests };
        write_record(c, RecordKind::Referrers, subject.hex(), record)
    }))
    .await?;
    Ok(())
}

/// Writes `record` as JSON under `kind` and `key`.
pub(super) async fn write_record(
    c: &BuildContext,
    kind: RecordKind,
    key: &str,
    record: impl Serialize,
) -> Result<(), BuildError> {
    let json = serde_json::to_vec(&record).expect("records serialise");
    c.storage
        .write_record(kind, key, Bytes::from(json))
        .await
        .map_err(storage_error)
}

/// The artifacts naming `subject` that another process recorded; empty when none.
pub async fn load_referrers(
    storage: &Storage,
    subject: &Digest,
) -> Result<Vec<Referrer>, StorageError> {
    let Some(raw) = storage
        .read_record(RecordKind::Referrers, subject.hex())
        .await?
    else {
        return Ok(Vec::new());
    };
    let record: ReferrersRecord = match serde_json::from_slice(&raw) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("ignoring unreadable referrers record of {subject}: {e}");
            return Ok(Vec::new());
        }
    };
    Ok(record
        .manifests
        .into_iter()
        .filter_map(|m| Referrer::parse(Bytes::from(m.into_bytes())))
        .filter(|r| &r.subject == subject)
        .collect())
}

pub(super) async fn store_record(
    c: &BuildContext,
    kind: RecordKind,
    key: &str,
    image: &BuiltImage,
) -> Result<(), BuildError> {
    let text = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
    let record = ImageRecord {
        docker: text(&image.docker.bytes),
        oci: text(&image.oci.bytes),
        referrers: image
            .referrers
            .iter()
            .map(|r| text(&r.manifest.bytes))
            .collect(),
    };
    write_record(c, kind, key, record).await
}

/// Reads an image record; None unless every blob it names is stored.
pub(super) async fn load_image(
    c: &BuildContext,
    kind: RecordKind,
    key: &str,
) -> Result<Option<Arc<BuiltImage>>, BuildError> {
    let Some(raw) = c
        .storage
        .read_record(kind, key)
        .await
        .map_err(storage_error)?
    else {
        return Ok(None);
    };
    let Ok(record) = serde_json::from_slice::<ImageRecord>(&raw) else {
        log::warn!("ignoring unreadable image record {key}");
        return Ok(None);
    };
    let manifest = |text: String| StoredManifest::of(Bytes::from(text.into_bytes()));
    let referrers: Option<Vec<Referrer>> = record
        .referrers
        .into_iter()
        .map(|m| Referrer::parse(Bytes::from(m.into_bytes())))
        .collect();
    let Some(referrers) = referrers else {
        log::warn!("ignoring image record {key} with an unreadable artifact");
        return Ok(None);
    };
    let image = BuiltImage::new(
        manifest(record.docker),
        manifest(record.oci),
        referrers,
        Vec::new(),
    );
    if !image_is_stored(c, &image).await? {
        log::warn!("image record {key} names a missing blob; rebuilding");
        return Ok(None);
    }
    Ok(Some(Arc::new(image)))
}

/// Whether storage still holds every blob of the image.
async fn image_is_stored(c: &BuildContext, image: &BuiltImage) -> Result<bool, BuildError> {
    image_in_storage(&c.storage, &c.shared, image)
        .await
        .map_err(storage_error)
}

/// Whether storage still holds every blob of the image. Those it lacks are
/// forgotten as known blobs; those it has are remembered.
pub async fn image_in_storage(
    storage: &Storage,
    shared: &SharedState,
    image: &BuiltImage,
) -> Result<bool, StorageError> {
    match image.blobs() {
        Some(blobs) => blobs_in_storage(storage, shared, blobs).await,
        None => Ok(false),
    }
}

pub(super) async fn all_stored(c: &BuildContext, blobs: &[Digest]) -> Result<bool, BuildError> {
    blobs_in_storage(&c.storage, &c.shared, blobs)
        .await
        .map_err(storage_error)
}

async fn blobs_in_storage(
    storage: &Storage,
    shared: &SharedState,
    blobs: &[Digest],
) -> Result<bool, StorageError> {
    let sizes = futures::future::join_all(blobs.iter().map(|d| storage.blob_size(d))).await;
    let mut all = true;
    for (d, size) in blobs.iter().zip(sizes) {
        if size?.is_none() {
            log::warn!("blob {d} is no longer stored");
            shared.forget_blob(d);
            all = false;
        } else {
            shared.remember_blob(d);
        }
    }
    Ok(all)
}
