//! Step 4 and the blobs of step 5: layers packed and stored once however many
//! builds need them at the same time, the symlink layer, configs, manifests and the
//! SBOM put into storage.

use super::records::{self, storage_error, LayerRecord};
use super::{layer_key, mailbox, store_contents, top_level_packages, BuildContext, Job, Tally};
use crate::actors::nix_worker::{LayerContents, Pack, PackedLayer};
use crate::actors::upload::{Put, PutBlobBytes, PutBlobStream};
use crate::built::{Referrer, StoredManifest};
use crate::compression::Codec;
use crate::error::BuildError;
use crate::layers::{LayerPlan, StorePathInfo};
use crate::manifest::{self, LayerEntry, ManifestFormat, RuntimeConfig};
use crate::nix::Evaluation;
use crate::reference::Digest;
use crate::sbom;
use crate::storage::{self, RecordKind, StorageError};
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::sync::Arc;

/// The creation time written into SBOMs: fixed, so the same image always has the
/// same SBOM bytes (the package set's own time is not known for a path source).
const SBOM_CREATED: &str = "1970-01-01T00:00:00Z";

/// A layer being packed for one build, awaited by every build that needs it.
/// Its result: the layer, and the bytes uploaded if it was packed rather than found.
pub(super) type PendingLayer =
    Shared<BoxFuture<'static, Result<(LayerEntry, Option<u64>), BuildError>>>;

/// Every planned layer, stored: reused where storage has it, packed otherwise.
pub(super) async fn store_layers(
    c: &Arc<BuildContext>,
    job: &Job,
    plans: &[LayerPlan],
    closure: &[StorePathInfo],
    tally: &Tally,
) -> Result<Vec<LayerEntry>, BuildError> {
    let nar_sizes: HashMap<&str, u64> = closure
        .iter()
        .map(|p| (p.path.as_str(), p.nar_size))
        .collect();
    c.shared.update(&job.key, |p| {
        p.phase = "compressing and uploading".into();
        p.layers_total = plans.len() + 1;
        p.bytes_total = nar_sizes.values().sum();
    });
    log::info!(
        "build {}: compressing and uploading {} layers",
        job.label(),
        plans.len() + 1
    );
    let codec = c.settings.codec(job.request.compression());
    let done = futures::future::join_all(plans.iter().map(|plan| {
        let nar: u64 = plan
            .paths
            .iter()
            .map(|p| nar_sizes.get(p.as_str()).copied().unwrap_or(0))
            .sum();
        async move {
            let done = layer(c, codec, plan, tally).await;
            c.shared.update(&job.key, |p| {
                p.layers_done += 1;
                p.bytes_done += nar;
            });
            done
        }
    }))
    .await;
    done.into_iter().collect()
}

/// One layer: reused when this process or storage already has it, otherwise packed
/// and uploaded once even when several builds need it at the same time.
async fn layer(
    c: &Arc<BuildContext>,
    codec: Codec,
    plan: &LayerPlan,
    tally: &Tally,
) -> Result<LayerEntry, BuildError> {
    let key = layer_key(&plan.paths, codec);
    let remembered = c.layers.lock().expect("layer memo lock").get(&key).cloned();
    if let Some(record) = remembered {
        let stored = match Digest::parse(&record.digest) {
            Ok(d) => records::all_stored(c, &[d]).await?,
            Err(_) => false,
        };
        if stored {
            c.shared.stats.layers_reused.inc();
            c.shared.stats.cache_hit("layer");
            Tally::add(&tally.reused, 1);
            return Ok(entry_of(&record));
        }
        c.layers.lock().expect("layer memo lock").remove(&key);
    }
    let pending = {
        let mut builds = c.layer_builds.lock().expect("layer builds lock");
        builds
            .entry(key.clone())
            .or_insert_with(|| {
                let c = c.clone();
                let key = key.clone();
                let plan = plan.clone();
                async move {
                    let result = build_layer(&c, codec, &key, &plan).await;
                    c.layer_builds
                        .lock()
                        .expect("layer builds lock")
                        .remove(&key);
                    result
                }
                .boxed()
                .shared()
            })
            .clone()
    };
    let (entry, uploaded) = pending.await?;
    match uploaded {
        Some(bytes) => {
            Tally::add(&tally.built, 1);
            Tally::add(&tally.uploaded, bytes);
        }
        None => Tally::add(&tally.reused, 1),
    }
    Ok(entry)
}

async fn build_layer(
    c: &BuildContext,
    codec: Codec,
    key: &str,
    plan: &LayerPlan,
) -> Result<(LayerEntry, Option<u64>), BuildError> {
    if let Some(record) = records::stored_layer(c, key).await? {
        c.layers
            .lock()
            .expect("layer memo lock")
            .insert(key.to_string(), record.clone());
        c.shared.stats.layers_reused.inc();
        return Ok((entry_of(&record), None));
    }
    let (packed, uploaded) = pack(c, codec, store_contents(plan)).await?;
    let record = LayerRecord {
        digest: packed.summary.digest.clone(),
        diff_id: packed.summary.diff_id.clone(),
        size: packed.summary.size,
        rating: plan.rating,
        paths: plan.paths.len(),
    };
    c.storage
        .write_record(
            RecordKind::Layer,
            key,
            Bytes::from(serde_json::to_vec(&record).expect("records serialise")),
        )
        .await
        .map_err(storage_error)?;
    c.layers
        .lock()
        .expect("layer memo lock")
        .insert(key.to_string(), record.clone());
    c.shared.stats.layers_built.inc();
    Ok((entry_of(&record), Some(uploaded)))
}

fn entry_of(record: &LayerRecord) -> LayerEntry {
    LayerEntry {
        digest: record.digest.clone(),
        diff_id: record.diff_id.clone(),
        size: record.size,
    }
}

/// The layer on top: the image's own root file system of symlinks into the
/// packages, made in Rust so that no builder of the target platform is needed. The
/// runtime config follows from what it holds.
pub(super) async fn symlink_layer(
    c: &BuildContext,
    job: &Job,
    evaluation: &Evaluation,
    tally: &Tally,
) -> Result<(LayerEntry, RuntimeConfig), BuildError> {
    let codec = c.settings.codec(job.request.compression());
    let contents = LayerContents::Symlinks(top_level_packages(evaluation));
    let (packed, uploaded) = pack(c, codec, contents).await?;
    Tally::add(&tally.built, 1);
    Tally::add(&tally.uploaded, uploaded);
    let info = packed.symlinks.unwrap_or_default();
    let mut env = vec!["PATH=/bin:/sbin:/usr/bin:/usr/sbin".to_string()];
    if info.has_cacert {
        env.push("SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt".into());
    }
    let runtime = RuntimeConfig {
        env,
        cmd: info.has_bash.then(|| vec!["bash".to_string()]),
    };
    let entry = LayerEntry {
        digest: packed.summary.digest,
        diff_id: packed.summary.diff_id,
        size: packed.summary.size,
    };
    Ok((entry, runtime))
}

/// Packs a layer on a worker while storage takes it in, chunk by chunk; returns
/// the bytes uploaded with it.
async fn pack(
    c: &BuildContext,
    codec: Codec,
    contents: LayerContents,
) -> Result<(PackedLayer, u64), BuildError> {
    let (sink, pieces) = storage::stream::channel(c.storage.stream_chunk());
    let (packed, put) = futures::join!(
        c.nix.pack(Pack {
            contents,
            sink,
            codec
        }),
        c.uploader.send(PutBlobStream {
            pieces,
            media_type: manifest::layer_media_type(ManifestFormat::Oci, codec.compression()),
        })
    );
    // Each side stops when the other does; the storage failure is the cause unless
    // storage only saw the packer stop.
    let put: Put = match put.map_err(mailbox)? {
        Err(StorageError::Abandoned) => {
            return Err(packed.err().unwrap_or_else(|| {
                BuildError::Internal("the packed layer did not reach storage".into())
            }))
        }
        Err(e) => return Err(storage_error(e)),
        Ok(put) => put,
    };
    let packed = packed?;
    c.shared.remember_blob(&packed.digest);
    if put.uploaded {
        c.shared.note_use(&packed.digest);
    }
    c.shared.stats.bytes_uploaded.inc_by(put.bytes);
    Ok((packed, put.bytes))
}

/// Stores small bytes (a config, the SBOM) under their digest.
pub(super) async fn put_blob(
    c: &BuildContext,
    bytes: Bytes,
    media_type: &'static str,
    tally: &Tally,
) -> Result<Digest, BuildError> {
    let digest = Digest::of(&bytes);
    let put = c
        .uploader
        .send(PutBlobBytes {
            digest: digest.clone(),
            bytes,
            media_type,
        })
        .await
        .map_err(mailbox)?
        .map_err(storage_error)?;
    c.shared.remember_blob(&digest);
    if put.uploaded {
        c.shared.note_use(&digest);
    }
    c.shared.stats.bytes_uploaded.inc_by(put.bytes);
    Tally::add(&tally.uploaded, put.bytes);
    Ok(digest)
}

/// Small blobs to store: bytes and media type.
pub(super) type Blobs = Vec<(Bytes, &'static str)>;

/// Stores small blobs side by side: on a bucket each is a round trip, and none
/// needs another stored first (nothing names these digests until the image record
/// is written, after all of them).
pub(super) async fn put_blobs(
    c: &BuildContext,
    blobs: Blobs,
    tally: &Tally,
) -> Result<(), BuildError> {
    futures::future::try_join_all(
        blobs
            .into_iter()
            .map(|(bytes, media_type)| put_blob(c, bytes, media_type, tally)),
    )
    .await
    .map(drop)
}

/// An SPDX SBOM of the image's closure and an artifact manifest attaching it to
/// each of `subjects`, built from what the build already knows: the blobs to store
/// and the referrers they make.
pub(super) fn sbom_blobs(
    job: &Job,
    evaluation: &Evaluation,
    closure: &[StorePathInfo],
    subjects: &[(&StoredManifest, ManifestFormat)],
) -> Result<(Blobs, Vec<Referrer>), BuildError> {
    let paths: Vec<sbom::PathInfo> = closure
        .iter()
        .map(|p| sbom::PathInfo {
            path: &p.path,
            nar_hash: &p.nar_hash,
            nar_size: p.nar_size,
            deriver: &p.deriver,
            references: &p.references,
        })
        .collect();
    let top_level: Vec<sbom::TopLevel> = evaluation
        .packages
        .iter()
        .map(|p| sbom::TopLevel {
            attr: &p.name,
            path: &p.path,
            output: &p.output,
            drv_path: &p.drv_path,
            licenses: &p.licenses,
            homepage: p.homepage.as_deref(),
        })
        .collect();
    let name = job.request.display_name();
    let oci_digest = subjects
        .iter()
        .find(|(_, format)| *format == ManifestFormat::Oci)
        .ok_or_else(|| BuildError::Internal("an SBOM needs an OCI manifest".into()))?
        .0
        .digest
        .to_string();
    let document = Bytes::from(sbom::spdx_json(&sbom::SbomInput {
        image_name: &name,
        subject_digest: &oci_digest,
        system: job.arch.nix_system(),
        created: SBOM_CREATED,
        closure: &paths,
        top_level: &top_level,
    }));
    let document_size = document.len() as u64;
    let sbom_digest = Digest::of(&document);
    let mut blobs = vec![
        (document, sbom::SPDX_MEDIA_TYPE),
        (
            Bytes::from_static(sbom::EMPTY_CONFIG),
            sbom::EMPTY_CONFIG_MEDIA_TYPE,
        ),
    ];
    let mut referrers = Vec::with_capacity(2);
    for (subject, format) in subjects {
        let bytes = Bytes::from(sbom::artifact_manifest(
            &sbom_digest.to_string(),
            document_size,
            format.media_type(),
            &subject.digest.to_string(),
            subject.bytes.len() as u64,
            SBOM_CREATED,
        ));
        let referrer = Referrer::parse(bytes.clone())
            .ok_or_else(|| BuildError::Internal("unreadable SBOM artifact manifest".into()))?;
        blobs.push((bytes, manifest::OCI_MANIFEST));
        referrers.push(referrer);
    }
    Ok((blobs, referrers))
}
