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
use futures::future::{BoxFuture, Either, FutureExt, Shared};
use std::collections::HashMap;
use std::sync::Arc;

/// The creation time written into SBOMs: fixed, so the same image always has the
/// same SBOM bytes (the package set's own time is not known for a path source).
const SBOM_CREATED: &str = "1970-01-01T00:00:00Z";

/// Work on a layer (its packing, upload or record) that may outlive the build
/// that asked for it.
type LayerWork<T> = BoxFuture<'static, Result<T, BuildError>>;

/// Ends when a build's layers are stored.
pub(super) type Stored<'a> = BoxFuture<'a, Result<(), BuildError>>;

/// A packed layer's upload and record, still under way once its digest is known.
/// Its result: the bytes uploaded, or None when the layer was found stored.
pub(super) type Storing = Shared<LayerWork<Option<u64>>>;

/// A layer being packed for one build, awaited by every build that needs it. It
/// resolves once the layer's digest is known, so that the config and manifests go
/// up while the upload ends (a compose on a bucket); `Storing` says when it is
/// stored.
pub(super) type PendingLayer = Shared<LayerWork<(LayerEntry, Storing)>>;

/// Every planned layer, its digest known: reused where storage has it, packed
/// otherwise. The future returned ends when every packed one is stored.
pub(super) async fn store_layers<'a>(
    c: &'a Arc<BuildContext>,
    job: &'a Job,
    plans: &[LayerPlan],
    closure: &[StorePathInfo],
    tally: &'a Tally,
) -> Result<(Vec<LayerEntry>, Stored<'a>), BuildError> {
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
    // Every layer is seen to its digest even when one fails: a packed layer's
    // upload and record then still run to their end for the next build.
    let packed = futures::future::join_all(plans.iter().map(|plan| layer(c, codec, plan))).await;
    let (entries, storing): (Vec<_>, Vec<_>) = packed
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .unzip();
    let nars: Vec<u64> = plans
        .iter()
        .map(|plan| {
            plan.paths
                .iter()
                .map(|p| nar_sizes.get(p.as_str()).copied().unwrap_or(0))
                .sum()
        })
        .collect();
    let stored = futures::future::try_join_all(storing.into_iter().zip(nars).map(
        move |(storing, nar)| async move {
            tally.count(storing.await?);
            c.shared.update(&job.key, |p| {
                p.layers_done += 1;
                p.bytes_done += nar;
            });
            Ok(())
        },
    ))
    .map(|done| done.map(drop))
    .boxed();
    Ok((entries, stored))
}

/// One layer: reused when this process or storage already has it, otherwise packed
/// and uploaded once even when several builds need it at the same time.
async fn layer(
    c: &Arc<BuildContext>,
    codec: Codec,
    plan: &LayerPlan,
) -> Result<(LayerEntry, Storing), BuildError> {
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
            return Ok((entry_of(&record), found().shared()));
        }
        c.layers.lock().expect("layer memo lock").remove(&key);
    }
    let pending = {
        let mut builds = c.layer_builds.lock().expect("layer builds lock");
        builds
            .entry(key.clone())
            .or_insert_with(|| {
                let c = c.clone();
                let plan = plan.clone();
                async move {
                    let forget = |c: &BuildContext, key: &str| {
                        c.layer_builds
                            .lock()
                            .expect("layer builds lock")
                            .remove(key);
                    };
                    let (entry, storing) = match build_layer(&c, codec, &key, &plan).await {
                        Ok(packed) => packed,
                        Err(e) => {
                            forget(&c, &key);
                            return Err(e);
                        }
                    };
                    let storing = async move {
                        let stored = storing.await;
                        forget(&c, &key);
                        stored
                    }
                    .boxed()
                    .shared();
                    // Runs to its end, record included, even when every build that
                    // waits for it has stopped.
                    tokio::spawn(storing.clone());
                    Ok((entry, storing))
                }
                .boxed()
                .shared()
            })
            .clone()
    };
    pending.await
}

/// The upload of a layer found stored: nothing uploaded.
fn found() -> LayerWork<Option<u64>> {
    futures::future::ready(Ok(None)).boxed()
}

/// Packs a layer that storage has no record of; the future returned ends once it
/// is stored and recorded.
async fn build_layer(
    c: &Arc<BuildContext>,
    codec: Codec,
    key: &str,
    plan: &LayerPlan,
) -> Result<(LayerEntry, LayerWork<Option<u64>>), BuildError> {
    if let Some(record) = records::stored_layer(c, key).await? {
        c.layers
            .lock()
            .expect("layer memo lock")
            .insert(key.to_string(), record.clone());
        c.shared.stats.layers_reused.inc();
        return Ok((entry_of(&record), found()));
    }
    let (packed, upload) = pack(c, codec, store_contents(plan)).await?;
    let record = LayerRecord {
        digest: packed.summary.digest.clone(),
        diff_id: packed.summary.diff_id.clone(),
        size: packed.summary.size,
        rating: plan.rating,
        paths: plan.paths.len(),
    };
    let entry = entry_of(&record);
    let (c, key) = (c.clone(), key.to_string());
    let stored = async move {
        let uploaded = upload.await?;
        records::write_record(&c, RecordKind::Layer, &key, &record).await?;
        c.layers
            .lock()
            .expect("layer memo lock")
            .insert(key, record);
        c.shared.stats.layers_built.inc();
        Ok(Some(uploaded))
    };
    Ok((entry, stored.boxed()))
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
/// runtime config follows from what it holds. The future returned ends once the
/// layer is stored.
pub(super) async fn symlink_layer<'a>(
    c: &'a Arc<BuildContext>,
    job: &Job,
    evaluation: &Evaluation,
    tally: &'a Tally,
) -> Result<(LayerEntry, RuntimeConfig, Stored<'a>), BuildError> {
    let codec = c.settings.codec(job.request.compression());
    let contents = LayerContents::Symlinks(top_level_packages(evaluation));
    let (packed, upload) = pack(c, codec, contents).await?;
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
    let stored = async move {
        tally.count(Some(upload.await?));
        Ok(())
    };
    Ok((entry, runtime, stored.boxed()))
}

/// Packs a layer on a worker while storage takes it in, chunk by chunk. Returns
/// once it is packed, with its upload: that ends later, once storage has the layer
/// under its digest, with the bytes uploaded.
async fn pack(
    c: &Arc<BuildContext>,
    codec: Codec,
    contents: LayerContents,
) -> Result<(PackedLayer, LayerWork<u64>), BuildError> {
    let (sink, pieces) = storage::stream::channel(c.storage.stream_chunk());
    let packing = c
        .nix
        .pack(Pack {
            contents,
            sink,
            codec,
        })
        .boxed();
    let put = c
        .uploader
        .send(PutBlobStream {
            pieces,
            media_type: manifest::layer_media_type(ManifestFormat::Oci, codec.compression()),
        })
        .boxed();
    let (packed, put) = match futures::future::select(packing, put).await {
        Either::Left((packed, put)) => match packed {
            Ok(packed) => (packed, put.boxed()),
            // Each side stops when the other does; the storage failure is the
            // cause unless storage only saw the packer stop.
            Err(e) => {
                return Err(match put.await.map_err(mailbox)? {
                    Err(StorageError::Abandoned) | Ok(_) => e,
                    Err(s) => storage_error(s),
                })
            }
        },
        Either::Right((put, packing)) => {
            let packed = packing.await;
            match (put, packed) {
                (Ok(Err(StorageError::Abandoned)), Err(e)) => return Err(e),
                (Ok(Err(e)), _) => return Err(storage_error(e)),
                (_, Err(e)) => return Err(e),
                (put, Ok(packed)) => (packed, futures::future::ready(put).boxed()),
            }
        }
    };
    let digest = packed.digest.clone();
    let c = c.clone();
    let stored = async move {
        let put: Put = match put.await.map_err(mailbox)? {
            Err(StorageError::Abandoned) => {
                return Err(BuildError::Internal(
                    "the packed layer did not reach storage".into(),
                ))
            }
            Err(e) => return Err(storage_error(e)),
            Ok(put) => put,
        };
        c.shared.remember_blob(&digest);
        if put.uploaded {
            c.shared.note_use(&digest);
        }
        c.shared.stats.bytes_uploaded.inc_by(put.bytes);
        Ok(put.bytes)
    };
    Ok((packed, stored.boxed()))
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
