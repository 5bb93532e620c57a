//! State shared by the HTTP handlers and the builds, read without going through an
//! actor: images by request key, manifests and artifacts by digest, blobs known to
//! be stored, the metrics, and what the build page shows.

use crate::built::{BuiltImage, Referrer};
use crate::metrics::Metrics;
use crate::reference::Digest;
use bytes::Bytes;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// A build in progress, for the status page.
#[derive(Debug, Clone, Serialize)]
pub struct BuildProgress {
    pub image: String,
    pub phase: String,
    #[serde(skip)]
    pub started: Instant,
    pub elapsed_secs: f64,
    pub layers_done: usize,
    pub layers_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// The Nix store's filesystem as last measured, and its last collection.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreState {
    pub free_bytes: u64,
    pub total_bytes: u64,
    pub last_gc_unix_time: Option<u64>,
    pub last_gc_freed_bytes: Option<u64>,
}

/// Blob retention and the last sweep, for the build page.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SweepState {
    pub retention_secs: u64,
    pub last_sweep_unix_time: Option<u64>,
    pub last_sweep_deleted: Option<u64>,
    pub last_sweep_deleted_bytes: Option<u64>,
    pub last_sweep_kept: Option<u64>,
    pub last_sweep_records_deleted: Option<u64>,
}

/// A failed build, for the status page.
#[derive(Debug, Clone, Serialize)]
pub struct RecentFailure {
    pub image: String,
    pub message: String,
    pub unix_time: u64,
}

/// A built image by request key, and when storage was last seen to hold its blobs.
struct TagEntry {
    image: Arc<BuiltImage>,
    verified: Instant,
}

/// Tag cache entries kept at most; past that the cache starts over. Keys change
/// with the source version, so old entries are only ever dead weight.
const MAX_TAG_ENTRIES: usize = 100_000;

/// A manifest served by digest, with what serving it needs read once, not on each
/// request.
#[derive(Clone)]
pub struct KnownManifest {
    pub bytes: Bytes,
    pub media_type: &'static str,
    /// Marked as used whenever it is served: itself, and what it names.
    pub blobs: Arc<[Digest]>,
}

impl KnownManifest {
    /// None for bytes that are not a manifest this registry serves.
    pub fn of(digest: &Digest, bytes: Bytes) -> Option<KnownManifest> {
        let media_type = crate::manifest::declared_media_type(&bytes)?;
        let blobs = crate::manifest::named_blobs(&bytes).unwrap_or_else(|| vec![digest.clone()]);
        Some(KnownManifest {
            bytes,
            media_type,
            blobs: blobs.into(),
        })
    }
}

/// State shared with the HTTP handlers, read without going through the actor.
#[derive(Default)]
pub struct SharedState {
    tags: RwLock<HashMap<String, TagEntry>>,
    manifests: RwLock<HashMap<Digest, KnownManifest>>,
    referrers: RwLock<HashMap<Digest, Vec<Referrer>>>,
    known_blobs: RwLock<std::collections::HashSet<Digest>>,
    /// When this process last saw each blob used in storage: it uploaded it, or
    /// marked it as used while serving a manifest.
    used: Mutex<HashMap<Digest, (Instant, u64)>>,
    /// Blob retention and the last sweep, for the build page.
    pub sweep: Mutex<SweepState>,
    pub stats: Metrics,
    progress: Mutex<BTreeMap<String, BuildProgress>>,
    /// Woken when a build found the Nix store's disk full.
    pub gc_wanted: tokio::sync::Notify,
    /// Held for writing while Nix's collector runs. A collection only sees the roots
    /// that existed when it started, so a build that rooted its paths waits for one
    /// in progress to end before it trusts them to be there.
    pub collecting: tokio::sync::RwLock<()>,
    /// The Nix store's disk and its last collection, for the build page.
    pub store: Mutex<StoreState>,
    failures: Mutex<Vec<RecentFailure>>,
}

impl SharedState {
    /// The image built for a request key, and whether storage was seen to hold
    /// its blobs within `verify_interval`. The key holds the source's version, so
    /// the image itself never goes stale; only storage can lose it.
    pub fn cached_image(
        &self,
        key: &str,
        verify_interval: Duration,
    ) -> Option<(Arc<BuiltImage>, bool)> {
        let tags = self.tags.read().expect("tag cache lock");
        let entry = tags.get(key)?;
        self.stats.cache_hit("tag");
        Some((
            entry.image.clone(),
            entry.verified.elapsed() < verify_interval,
        ))
    }

    /// After storage was seen to hold the image's blobs.
    pub fn image_verified(&self, key: &str) {
        if let Some(entry) = self.tags.write().expect("tag cache lock").get_mut(key) {
            entry.verified = Instant::now();
        }
    }

    /// After storage lost a blob of the image: the next request builds it again.
    pub fn forget_image(&self, key: &str) {
        self.tags.write().expect("tag cache lock").remove(key);
    }

    /// A manifest by digest, from memory.
    pub fn manifest_by_digest(&self, digest: &Digest) -> Option<KnownManifest> {
        self.manifests
            .read()
            .expect("manifest cache lock")
            .get(digest)
            .cloned()
    }

    /// The artifacts known to name `subject`, if any were seen by this process.
    pub fn referrers_of(&self, subject: &Digest) -> Option<Vec<Referrer>> {
        self.referrers
            .read()
            .expect("referrers lock")
            .get(subject)
            .cloned()
    }

    /// Remembers artifacts by subject, and their manifests by digest.
    pub fn remember_referrers(&self, referrers: &[Referrer]) {
        let mut map = self.referrers.write().expect("referrers lock");
        for r in referrers {
            let list = map.entry(r.subject.clone()).or_default();
            if !list.iter().any(|k| k.manifest.digest == r.manifest.digest) {
                list.push(r.clone());
                list.sort_by_key(|r| r.manifest.digest.to_string());
            }
            self.remember_manifest(r.manifest.digest.clone(), r.manifest.bytes.clone());
        }
    }

    /// After a manifest's blobs were swept: it is no longer served by digest.
    pub fn forget_manifest(&self, digest: &Digest) {
        self.manifests
            .write()
            .expect("manifest cache lock")
            .remove(digest);
    }

    /// Serves `bytes` by `digest` from now on; None (and nothing remembered) when
    /// they are not a manifest this registry serves.
    pub fn remember_manifest(&self, digest: Digest, bytes: Bytes) -> Option<KnownManifest> {
        let known = KnownManifest::of(&digest, bytes)?;
        self.manifests
            .write()
            .expect("manifest cache lock")
            .insert(digest, known.clone());
        Some(known)
    }

    /// Whether the blob is known to be stored, so a blob request needs no storage
    /// round trip. Blobs are never deleted by the registry.
    pub fn is_known_blob(&self, digest: &Digest) -> bool {
        self.known_blobs
            .read()
            .expect("known blobs lock")
            .contains(digest)
    }

    pub fn remember_blob(&self, digest: &Digest) {
        if !self.is_known_blob(digest) {
            self.known_blobs
                .write()
                .expect("known blobs lock")
                .insert(digest.clone());
        }
    }

    /// Whether the blob was seen used in storage within `every`; if not, the next
    /// manifest naming it marks it as used.
    pub fn used_within(&self, digest: &Digest, every: Duration) -> bool {
        self.used
            .lock()
            .expect("blob use lock")
            .get(digest)
            .is_some_and(|(t, _)| t.elapsed() < every)
    }

    /// When (unix seconds) this process last saw the blob used in storage.
    pub fn last_noted_use(&self, digest: &Digest) -> Option<u64> {
        self.used
            .lock()
            .expect("blob use lock")
            .get(digest)
            .map(|(_, unix)| *unix)
    }

    /// After storage recorded the blob as used now (it was written or touched).
    pub fn note_use(&self, digest: &Digest) {
        let mut used = self.used.lock().expect("blob use lock");
        if used.len() >= MAX_TAG_ENTRIES {
            used.clear();
        }
        used.insert(digest.clone(), (Instant::now(), crate::storage::unix_now()));
    }

    pub fn forget_blob(&self, digest: &Digest) {
        self.used.lock().expect("blob use lock").remove(digest);
        self.known_blobs
            .write()
            .expect("known blobs lock")
            .remove(digest);
    }

    pub fn builds(&self) -> Vec<BuildProgress> {
        let now = Instant::now();
        self.progress
            .lock()
            .expect("progress lock")
            .values()
            .map(|p| {
                let mut p = p.clone();
                p.elapsed_secs = now.duration_since(p.started).as_secs_f64();
                p
            })
            .collect()
    }

    pub fn sweep_state(&self) -> SweepState {
        self.sweep.lock().expect("sweep lock").clone()
    }

    pub fn store_state(&self) -> StoreState {
        self.store.lock().expect("store lock").clone()
    }

    pub fn recent_failures(&self) -> Vec<RecentFailure> {
        self.failures.lock().expect("failures lock").clone()
    }

    /// A build starts: the build page shows it as queued.
    pub fn begin_build(&self, key: &str, image: String) {
        self.progress.lock().expect("progress lock").insert(
            key.to_string(),
            BuildProgress {
                image,
                phase: "queued".into(),
                started: Instant::now(),
                elapsed_secs: 0.0,
                layers_done: 0,
                layers_total: 0,
                bytes_done: 0,
                bytes_total: 0,
            },
        );
    }

    /// A build ends: it leaves the build page.
    pub fn end_build(&self, key: &str) -> Option<BuildProgress> {
        self.progress.lock().expect("progress lock").remove(key)
    }

    /// A built image, served by request key and its manifests by digest from now on.
    pub fn remember_image(&self, key: &str, image: &Arc<BuiltImage>) {
        for m in [&image.docker, &image.oci] {
            self.remember_manifest(m.digest.clone(), m.bytes.clone());
        }
        self.remember_referrers(&image.referrers);
        let mut tags = self.tags.write().expect("tag cache lock");
        if tags.len() >= MAX_TAG_ENTRIES {
            tags.clear();
        }
        tags.insert(
            key.to_string(),
            TagEntry {
                image: image.clone(),
                verified: Instant::now(),
            },
        );
    }

    /// A failed build, for the build page: the newest 20 are kept.
    pub fn record_failure(&self, image: String, message: String) {
        let mut failures = self.failures.lock().expect("failures lock");
        failures.insert(
            0,
            RecentFailure {
                image,
                message,
                unix_time: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            },
        );
        failures.truncate(20);
    }

    /// Moves a build to a new phase, with a log line so the build can be followed.
    pub fn enter_phase(&self, key: &str, phase: &str) {
        self.update(key, |p| {
            if p.phase != phase {
                log::info!("build {} [{}]: {phase}", p.image, &key[..12]);
                p.phase = phase.to_string();
            }
        });
    }

    pub fn update(&self, key: &str, f: impl FnOnce(&mut BuildProgress)) {
        if let Some(p) = self.progress.lock().expect("progress lock").get_mut(key) {
            f(p);
        }
    }
}
