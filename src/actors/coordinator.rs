//! BuildCoordinator: one build per image, however many requests ask for it at once.
//!
//! Requests for the same image (same packages, architecture and source version) wait
//! on the one in-flight build and all get its result. The build runs detached from
//! the requests, so a client hanging up never cancels it; it still finishes and is
//! cached. Builds beyond the workers plus the queue bound are refused with 429, and a
//! failed build is answered from memory for a short while instead of being retried
//! by every hammering client.
//!
//! Caches, from cheapest: the shared tag and digest maps read directly by the HTTP
//! handlers; assembled images keyed by their top-level store paths; built layers
//! keyed by their store paths; the last two also as records in storage, so another
//! process on the same storage reuses them. Records are written after the blobs they
//! name, and checked against storage when read, so a record never leads to a missing
//! blob.

use crate::actors::nix_worker::{Evaluate, LayerContents, NixWorker, Pack, PackedLayer, Realise};
use crate::actors::upload::{Put, PutBlobBytes, PutBlobStream, UploadActor};
use crate::error::BuildError;
use crate::image::ImageRequest;
use crate::layers::{self, LayerParams, LayerPlan, Popularity};
use crate::manifest::{self, LayerEntry, ManifestFormat, RuntimeConfig};
use crate::metrics::Metrics;
use crate::nix::Evaluation;
use crate::reference::Digest;
use crate::sbom;
use crate::source::ResolvedSource;
use crate::storage::{self, RecordKind, Storage, StorageError};
use actix::prelude::*;
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Bumped whenever layer or manifest bytes change for the same inputs, so records
/// written by an older version are never mistaken for current ones.
const FORMAT_VERSION: &str = "nixery-v2";

/// The creation time written into SBOMs: fixed, so the same image always has the
/// same SBOM bytes (the package set's own time is not known for a path source).
const SBOM_CREATED: &str = "1970-01-01T00:00:00Z";

/// Build (or find) the image for a request.
#[derive(Message)]
#[rtype(result = "Result<Arc<BuiltImage>, BuildError>")]
pub struct GetImage {
    /// `request_key` of the request and source.
    pub key: String,
    pub request: ImageRequest,
    pub source: ResolvedSource,
}

/// Sent by a build to the coordinator when it ends.
#[derive(Message)]
#[rtype(result = "()")]
struct BuildFinished {
    key: String,
    result: Result<Arc<BuiltImage>, BuildError>,
}

/// A manifest's exact bytes, served verbatim so its digest holds.
#[derive(Debug, Clone)]
pub struct StoredManifest {
    pub digest: Digest,
    pub bytes: Bytes,
}

#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub docker: StoredManifest,
    pub oci: StoredManifest,
    /// Artifacts (the SBOM) whose subject is one of the two manifests.
    pub referrers: Vec<Referrer>,
}

/// An artifact manifest attached to an image manifest, as the referrers API lists it.
#[derive(Debug, Clone)]
pub struct Referrer {
    pub subject: Digest,
    pub artifact_type: String,
    pub manifest: StoredManifest,
}

impl Referrer {
    /// Reads an artifact manifest this registry wrote; None for anything else.
    pub fn parse(bytes: Bytes) -> Option<Referrer> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Artifact {
            artifact_type: String,
            subject: Subject,
        }
        #[derive(Deserialize)]
        struct Subject {
            digest: String,
        }
        let a: Artifact = serde_json::from_slice(&bytes).ok()?;
        Some(Referrer {
            subject: Digest::parse(&a.subject.digest).ok()?,
            artifact_type: a.artifact_type,
            manifest: StoredManifest {
                digest: Digest::of(&bytes),
                bytes,
            },
        })
    }
}

impl BuiltImage {
    pub fn manifest(&self, format: ManifestFormat) -> &StoredManifest {
        match format {
            ManifestFormat::Docker => &self.docker,
            ManifestFormat::Oci => &self.oci,
        }
    }
}

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

/// State shared with the HTTP handlers, read without going through the actor.
#[derive(Default)]
pub struct SharedState {
    tags: RwLock<HashMap<String, TagEntry>>,
    manifests: RwLock<HashMap<Digest, Bytes>>,
    referrers: RwLock<HashMap<Digest, Vec<Referrer>>>,
    known_blobs: RwLock<std::collections::HashSet<Digest>>,
    pub stats: Metrics,
    progress: Mutex<BTreeMap<String, BuildProgress>>,
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
    pub fn manifest_by_digest(&self, digest: &Digest) -> Option<Bytes> {
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

    pub fn remember_manifest(&self, digest: Digest, bytes: Bytes) {
        self.manifests
            .write()
            .expect("manifest cache lock")
            .insert(digest, bytes);
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

    pub fn forget_blob(&self, digest: &Digest) {
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

    pub fn recent_failures(&self) -> Vec<RecentFailure> {
        self.failures.lock().expect("failures lock").clone()
    }

    /// Moves a build to a new phase, with a log line so the build can be followed.
    fn enter_phase(&self, key: &str, phase: &str) {
        self.update(key, |p| {
            if p.phase != phase {
                log::info!("build {} [{}]: {phase}", p.image, &key[..12]);
                p.phase = phase.to_string();
            }
        });
    }

    fn update(&self, key: &str, f: impl FnOnce(&mut BuildProgress)) {
        if let Some(p) = self.progress.lock().expect("progress lock").get_mut(key) {
            f(p);
        }
    }
}

/// A layer being packed for one build, awaited by every build that needs it.
type PendingLayer = Shared<BoxFuture<'static, Result<LayerDone, BuildError>>>;

/// A request waiting for an image build.
type Waiter = oneshot::Sender<Result<Arc<BuiltImage>, BuildError>>;

/// Everything a build needs; shared by all builds.
pub struct BuildContext {
    pub workers: Addr<NixWorker>,
    pub uploader: Addr<UploadActor>,
    pub storage: Arc<Storage>,
    pub popularity: Popularity,
    /// Digest of the popularity data, part of every cache key it influences.
    pub popularity_id: String,
    pub params: LayerParams,
    pub gzip_level: u32,
    pub max_image_bytes: u64,
    pub lease_ttl: Duration,
    pub shared: Arc<SharedState>,
    layers: Mutex<HashMap<String, LayerRecord>>,
    layer_builds: Mutex<HashMap<String, PendingLayer>>,
    images: Mutex<HashMap<String, Arc<BuiltImage>>>,
}

impl BuildContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        workers: Addr<NixWorker>,
        uploader: Addr<UploadActor>,
        storage: Arc<Storage>,
        popularity: Popularity,
        popularity_id: String,
        params: LayerParams,
        gzip_level: u32,
        max_image_bytes: u64,
        lease_ttl: Duration,
        shared: Arc<SharedState>,
    ) -> Self {
        BuildContext {
            workers,
            uploader,
            storage,
            popularity,
            popularity_id,
            params,
            gzip_level,
            max_image_bytes,
            lease_ttl,
            shared,
            layers: Mutex::default(),
            layer_builds: Mutex::default(),
            images: Mutex::default(),
        }
    }
}

pub struct BuildCoordinator {
    context: Arc<BuildContext>,
    in_flight: HashMap<String, Vec<Waiter>>,
    failures: HashMap<String, (Instant, BuildError)>,
    capacity: usize,
    failure_ttl: Duration,
}

impl BuildCoordinator {
    /// `capacity` is how many distinct builds may be in flight (running or queued).
    pub fn new(context: Arc<BuildContext>, capacity: usize, failure_ttl: Duration) -> Self {
        BuildCoordinator {
            context,
            in_flight: HashMap::new(),
            failures: HashMap::new(),
            capacity: capacity.max(1),
            failure_ttl,
        }
    }
}

/// The key of a request: everything that selects the image's contents.
pub fn request_key(request: &ImageRequest, source: &ResolvedSource) -> String {
    let material = (
        FORMAT_VERSION,
        request,
        &source.args,
        &source.version,
        &source.config,
    );
    sha256_hex(&serde_json::to_vec(&material).expect("keys serialise"))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

impl Actor for BuildCoordinator {
    type Context = Context<Self>;
}

impl Handler<GetImage> for BuildCoordinator {
    type Result = ResponseFuture<Result<Arc<BuiltImage>, BuildError>>;

    fn handle(&mut self, msg: GetImage, ctx: &mut Self::Context) -> Self::Result {
        let key = msg.key.clone();
        let stats = &self.context.shared.stats;
        if let Some((at, err)) = self.failures.get(&key) {
            if at.elapsed() < self.failure_ttl {
                let err = err.clone();
                return Box::pin(async move { Err(err) });
            }
            self.failures.remove(&key);
        }
        let (tx, rx) = oneshot::channel();
        if let Some(waiters) = self.in_flight.get_mut(&key) {
            stats.builds_deduplicated.inc();
            waiters.push(tx);
        } else {
            if self.in_flight.len() >= self.capacity {
                stats.builds_rejected.inc();
                return Box::pin(async {
                    Err(BuildError::Overloaded {
                        retry_after_secs: 10,
                    })
                });
            }
            stats.builds_started.inc();
            self.in_flight.insert(key.clone(), vec![tx]);
            stats.builds_in_flight.set(self.in_flight.len() as i64);
            let context = self.context.clone();
            let me = ctx.address();
            let image = msg.request.display_name();
            context
                .shared
                .progress
                .lock()
                .expect("progress lock")
                .insert(
                    key.clone(),
                    BuildProgress {
                        image: image.clone(),
                        phase: "queued".into(),
                        started: Instant::now(),
                        elapsed_secs: 0.0,
                        layers_done: 0,
                        layers_total: 0,
                        bytes_done: 0,
                        bytes_total: 0,
                    },
                );
            actix::spawn(async move {
                let started = Instant::now();
                log::info!("build {image} [{}]: started", &key[..12]);
                let result = build(&context, &key, &msg.request, &msg.source).await;
                match &result {
                    Ok(img) => log::info!(
                        "build {image} [{}]: done in {:.2}s, manifest {}",
                        &key[..12],
                        started.elapsed().as_secs_f64(),
                        img.docker.digest
                    ),
                    Err(e) => log::warn!("build {image} [{}]: failed: {e}", &key[..12]),
                }
                me.do_send(BuildFinished { key, result });
            });
        }
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(BuildError::Internal("build was abandoned".into())))
        })
    }
}

impl Handler<BuildFinished> for BuildCoordinator {
    type Result = ();

    fn handle(&mut self, msg: BuildFinished, _: &mut Self::Context) {
        let shared = &self.context.shared;
        let progress = shared
            .progress
            .lock()
            .expect("progress lock")
            .remove(&msg.key);
        match &msg.result {
            Ok(image) => {
                for m in [&image.docker, &image.oci] {
                    shared.remember_manifest(m.digest.clone(), m.bytes.clone());
                }
                shared.remember_referrers(&image.referrers);
                let mut tags = shared.tags.write().expect("tag cache lock");
                if tags.len() >= MAX_TAG_ENTRIES {
                    tags.clear();
                }
                tags.insert(
                    msg.key.clone(),
                    TagEntry {
                        image: image.clone(),
                        verified: Instant::now(),
                    },
                );
            }
            Err(e) => {
                shared.stats.builds_failed.inc();
                let mut failures = shared.failures.lock().expect("failures lock");
                failures.insert(
                    0,
                    RecentFailure {
                        image: progress.map(|p| p.image).unwrap_or_default(),
                        message: e.to_string(),
                        unix_time: std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs())
                            .unwrap_or(0),
                    },
                );
                failures.truncate(20);
                // Storage and internal faults are transient: the next request retries.
                if !matches!(e, BuildError::Storage(_) | BuildError::Internal(_)) {
                    self.failures
                        .insert(msg.key.clone(), (Instant::now(), e.clone()));
                }
            }
        }
        let waiters = self.in_flight.remove(&msg.key).unwrap_or_default();
        shared
            .stats
            .builds_in_flight
            .set(self.in_flight.len() as i64);
        for waiter in waiters {
            // A waiter whose client hung up has dropped its receiver; that is fine.
            let _ = waiter.send(msg.result.clone());
        }
    }
}

/// What a build knows of one layer once it is stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LayerRecord {
    digest: String,
    diff_id: String,
    size: u64,
    rating: u64,
    paths: usize,
}

#[derive(Debug, Clone)]
struct LayerDone {
    entry: LayerEntry,
    reused: bool,
    uploaded: u64,
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

fn storage_error(e: StorageError) -> BuildError {
    BuildError::Storage(e.to_string())
}

fn mailbox(e: MailboxError) -> BuildError {
    BuildError::Internal(format!("worker unavailable: {e}"))
}

async fn build(
    c: &Arc<BuildContext>,
    key: &str,
    request: &ImageRequest,
    source: &ResolvedSource,
) -> Result<Arc<BuiltImage>, BuildError> {
    let shared = &c.shared;
    let pinned = source.pinned;
    let label = build_label(request, key);
    if pinned {
        if let Some(image) = load_image(c, RecordKind::Pinned, key).await? {
            shared.stats.cache_hit("pinned");
            return Ok(image);
        }
    }
    shared.enter_phase(key, "evaluating");
    shared.stats.nix_evaluations.inc();
    let evaluation = c
        .workers
        .send(Evaluate {
            label: label.clone(),
            source: source.args.clone(),
            system: request.arch.nix_system(),
            packages: request.packages.clone(),
            optional: request.optional_packages(),
        })
        .await
        .map_err(mailbox)??;
    if !evaluation.missing.is_empty() {
        return Err(BuildError::NotFound(evaluation.missing));
    }
    if !evaluation.not_packages.is_empty() {
        return Err(BuildError::NotPackages(evaluation.not_packages));
    }

    let image_key = image_key(c, request, &evaluation, &source.config);
    let remembered = c
        .images
        .lock()
        .expect("image memo lock")
        .get(&image_key)
        .cloned();
    let remembered = match remembered {
        // Storage can lose blobs behind our back (a bucket emptied, restored from
        // an older backup): a remembered image is served only while its blobs exist.
        Some(image) if image_is_stored(c, &image).await? => Some(image),
        Some(_) => {
            c.images.lock().expect("image memo lock").remove(&image_key);
            None
        }
        None => None,
    };
    let known = match remembered {
        Some(image) => Some(image),
        None => load_image(c, RecordKind::Image, &image_key).await?,
    };
    if let Some(image) = known {
        let how = "top-level paths known, image reused without building";
        return reuse(c, key, request, pinned, image, how).await;
    }

    // Replicas on the same storage build each image once: the lease holder builds,
    // the others wait for its record.
    loop {
        if c.storage
            .acquire_lease(&image_key, c.lease_ttl)
            .await
            .map_err(storage_error)?
        {
            break;
        }
        shared.enter_phase(key, "waiting for another replica");
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(image) = load_image(c, RecordKind::Image, &image_key).await? {
            return reuse(c, key, request, pinned, image, "built by another replica").await;
        }
    }
    let result = assemble(c, key, request, &evaluation, &image_key, pinned).await;
    if let Err(e) = c.storage.release_lease(&image_key).await {
        // It expires on its own; the other replicas then take over.
        log::warn!("releasing lease {image_key}: {e}");
    }
    result
}

/// How the log names a build: the image and the start of its key.
fn build_label(request: &ImageRequest, key: &str) -> String {
    format!("{} [{}]", request.display_name(), &key[..12])
}

/// Answers with an image assembled earlier, remembering it for a pinned request.
async fn reuse(
    c: &BuildContext,
    key: &str,
    request: &ImageRequest,
    pinned: bool,
    image: Arc<BuiltImage>,
    how: &str,
) -> Result<Arc<BuiltImage>, BuildError> {
    c.shared.stats.cache_hit("image");
    log::info!("build {} [{}]: {how}", request.display_name(), &key[..12]);
    if pinned {
        store_record(c, RecordKind::Pinned, key, &image).await?;
    }
    Ok(image)
}

/// Realises the packages and assembles the image from layers, reusing every layer
/// that is already stored.
async fn assemble(
    c: &Arc<BuildContext>,
    key: &str,
    request: &ImageRequest,
    evaluation: &Evaluation,
    image_key: &str,
    pinned: bool,
) -> Result<Arc<BuiltImage>, BuildError> {
    let shared = &c.shared;
    shared.enter_phase(key, "building");
    shared.stats.nix_realisations.inc();
    let closure = c
        .workers
        .send(Realise {
            label: build_label(request, key),
            system: request.arch.nix_system(),
            evaluation: evaluation.clone(),
            progress: {
                let shared = c.shared.clone();
                let key = key.to_string();
                Box::new(move |phase| shared.update(&key, |p| p.phase = phase))
            },
        })
        .await
        .map_err(mailbox)??;
    let total: u64 = closure.iter().map(|p| p.nar_size).sum();
    if c.max_image_bytes > 0 && total > c.max_image_bytes {
        return Err(BuildError::TooLarge {
            size: total,
            max: c.max_image_bytes,
        });
    }
    let top_level = evaluation.output_paths();
    let plans = layers::group_layers(&top_level, &closure, &c.popularity, &c.params);
    shared.update(key, |p| {
        p.phase = "compressing and uploading".into();
        log::info!(
            "build {} [{}]: compressing and uploading {} layers",
            p.image,
            &key[..12],
            p.layers_total
        );
        p.layers_total = plans.len() + 1;
        p.bytes_total = total;
    });

    let nar_sizes: HashMap<&str, u64> = closure
        .iter()
        .map(|p| (p.path.as_str(), p.nar_size))
        .collect();
    let layer_results = futures::future::join_all(plans.iter().map(|plan| {
        let c = c.clone();
        let key = key.to_string();
        let plan = plan.clone();
        let nar: u64 = plan
            .paths
            .iter()
            .map(|p| nar_sizes.get(p.as_str()).copied().unwrap_or(0))
            .sum();
        async move {
            let done = layer(&c, &plan).await;
            c.shared.update(&key, |p| {
                p.layers_done += 1;
                p.bytes_done += nar;
            });
            done
        }
    }))
    .await;
    let mut entries = Vec::with_capacity(plans.len() + 1);
    let (mut reused, mut built, mut uploaded) = (0u64, 0u64, 0u64);
    for done in layer_results {
        let done = done?;
        if done.reused {
            reused += 1;
        } else {
            built += 1;
        }
        uploaded += done.uploaded;
        entries.push(done.entry);
    }

    // The symlink layer goes on top: it is the image's own root file system.
    let mut packages: Vec<PathBuf> = Vec::new();
    for p in &evaluation.packages {
        let path = PathBuf::from(&p.path);
        if !packages.contains(&path) {
            packages.push(path);
        }
    }
    let (packed, put) = pack(c, LayerContents::Symlinks(packages)).await?;
    let info = packed.symlinks.unwrap_or_default();
    uploaded += put.bytes;
    entries.push(LayerEntry {
        digest: packed.summary.digest.clone(),
        diff_id: packed.summary.diff_id.clone(),
        size: packed.summary.size,
    });

    let mut env = vec!["PATH=/bin:/sbin:/usr/bin:/usr/sbin".to_string()];
    if info.has_cacert {
        env.push("SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt".into());
    }
    let runtime = RuntimeConfig {
        env,
        cmd: info.has_bash.then(|| vec!["bash".to_string()]),
    };
    let config = Bytes::from(manifest::config_blob(request.arch, &entries, &runtime));
    let config_digest = Digest::of(&config);
    uploaded += put_bytes(c, &config_digest, config.clone(), manifest::DOCKER_CONFIG).await?;
    let mut manifests = Vec::with_capacity(2);
    for format in [ManifestFormat::Docker, ManifestFormat::Oci] {
        let bytes = Bytes::from(manifest::manifest_bytes(
            format,
            &config_digest.to_string(),
            config.len() as u64,
            &entries,
        ));
        let digest = Digest::of(&bytes);
        uploaded += put_bytes(c, &digest, bytes.clone(), format.media_type()).await?;
        manifests.push(StoredManifest { digest, bytes });
    }
    let oci = manifests.pop().expect("two manifests");
    let docker = manifests.pop().expect("two manifests");
    let (referrers, sbom_bytes) =
        attach_sbom(c, request, evaluation, &closure, [&docker, &oci]).await?;
    uploaded += sbom_bytes;
    let image = Arc::new(BuiltImage {
        docker,
        oci,
        referrers,
    });
    store_referrers(c, &image).await?;

    store_record(c, RecordKind::Image, image_key, &image).await?;
    if pinned {
        store_record(c, RecordKind::Pinned, key, &image).await?;
    }
    c.images
        .lock()
        .expect("image memo lock")
        .insert(image_key.to_string(), image.clone());
    shared.stats.bytes_uploaded.inc_by(uploaded);
    log::info!(
        "build {} [{}]: {} layers reused, {} layers built, {} bytes uploaded, image {} bytes",
        request.display_name(),
        &key[..12],
        reused,
        built + 1,
        uploaded,
        entries.iter().map(|e| e.size).sum::<u64>() + config.len() as u64
    );
    Ok(image)
}

/// An SPDX SBOM of the image's closure, stored as a blob and attached to both
/// manifests by an artifact manifest each; built from what the build already knows.
/// Returns the artifacts and the bytes uploaded.
async fn attach_sbom(
    c: &BuildContext,
    request: &ImageRequest,
    evaluation: &Evaluation,
    closure: &[crate::layers::StorePathInfo],
    subjects: [&StoredManifest; 2],
) -> Result<(Vec<Referrer>, u64), BuildError> {
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
    let name = request.display_name();
    let oci_digest = subjects[1].digest.to_string();
    let document = Bytes::from(sbom::spdx_json(&sbom::SbomInput {
        image_name: &name,
        subject_digest: &oci_digest,
        system: request.arch.nix_system(),
        created: SBOM_CREATED,
        closure: &paths,
        top_level: &top_level,
    }));
    let sbom_digest = Digest::of(&document);
    let mut uploaded = put_bytes(c, &sbom_digest, document.clone(), sbom::SPDX_MEDIA_TYPE).await?;
    let empty = Bytes::from_static(sbom::EMPTY_CONFIG);
    uploaded += put_bytes(c, &Digest::of(&empty), empty, sbom::EMPTY_CONFIG_MEDIA_TYPE).await?;
    let mut referrers = Vec::with_capacity(2);
    for (subject, format) in subjects
        .into_iter()
        .zip([ManifestFormat::Docker, ManifestFormat::Oci])
    {
        let bytes = Bytes::from(sbom::artifact_manifest(
            &sbom_digest.to_string(),
            document.len() as u64,
            format.media_type(),
            &subject.digest.to_string(),
            subject.bytes.len() as u64,
            SBOM_CREATED,
        ));
        let referrer = Referrer::parse(bytes.clone())
            .ok_or_else(|| BuildError::Internal("unreadable SBOM artifact manifest".into()))?;
        uploaded += put_bytes(c, &referrer.manifest.digest, bytes, manifest::OCI_MANIFEST).await?;
        referrers.push(referrer);
    }
    Ok((referrers, uploaded))
}

/// One record per subject manifest, naming its artifacts, so the referrers API
/// answers on any process before it has seen the image.
async fn store_referrers(c: &BuildContext, image: &BuiltImage) -> Result<(), BuildError> {
    for subject in [&image.docker.digest, &image.oci.digest] {
        let manifests = image
            .referrers
            .iter()
            .filter(|r| &r.subject == subject)
            .map(|r| String::from_utf8_lossy(&r.manifest.bytes).into_owned())
            .collect();
        let record = ReferrersRecord { manifests };
        c.storage
            .write_record(
                RecordKind::Referrers,
                subject.hex(),
                Bytes::from(serde_json::to_vec(&record).expect("records serialise")),
            )
            .await
            .map_err(storage_error)?;
    }
    Ok(())
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

/// The key of an assembled image: its top-level store paths and every setting that
/// changes its bytes.
fn image_key(
    c: &BuildContext,
    request: &ImageRequest,
    evaluation: &Evaluation,
    nixpkgs_config: &str,
) -> String {
    let material = serde_json::json!({
        "version": FORMAT_VERSION,
        "nixpkgs_config": nixpkgs_config,
        "arch": request.arch,
        "paths": evaluation.output_paths(),
        "budget": c.params.budget,
        "popularity_threshold": c.params.popularity_threshold,
        "size_threshold": c.params.size_threshold,
        "popularity": c.popularity_id,
        "gzip_level": c.gzip_level,
    });
    sha256_hex(material.to_string().as_bytes())
}

fn layer_key(paths: &[String], gzip_level: u32) -> String {
    sha256_hex(&serde_json::to_vec(&(FORMAT_VERSION, gzip_level, paths)).expect("keys serialise"))
}

async fn store_record(
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
    c.storage
        .write_record(
            kind,
            key,
            Bytes::from(serde_json::to_vec(&record).expect("records serialise")),
        )
        .await
        .map_err(storage_error)
}

/// Every blob an image names: both manifests, the config and the layers; None when
/// its manifest is not one this registry wrote.
fn image_blobs(image: &BuiltImage) -> Option<Vec<Digest>> {
    #[derive(Deserialize)]
    struct Desc {
        digest: String,
    }
    #[derive(Deserialize)]
    struct Parsed {
        config: Desc,
        layers: Vec<Desc>,
    }
    let mut blobs = vec![image.docker.digest.clone(), image.oci.digest.clone()];
    let artifacts = image.referrers.iter().map(|r| &r.manifest);
    for m in std::iter::once(&image.docker).chain(artifacts) {
        let parsed: Parsed = serde_json::from_slice(&m.bytes).ok()?;
        if m.digest != image.docker.digest {
            blobs.push(m.digest.clone());
        }
        for d in std::iter::once(&parsed.config).chain(parsed.layers.iter()) {
            blobs.push(Digest::parse(&d.digest).ok()?);
        }
    }
    blobs.sort_by_key(|d| d.to_string());
    blobs.dedup();
    Some(blobs)
}

/// Whether storage still holds every blob of the image. Those it lacks are
/// forgotten as known blobs; those it has are remembered.
async fn image_is_stored(c: &BuildContext, image: &BuiltImage) -> Result<bool, BuildError> {
    image_in_storage(&c.storage, &c.shared, image)
        .await
        .map_err(storage_error)
}

/// [`image_is_stored`] for the HTTP handlers, which hold storage and the shared
/// state but no build context.
pub async fn image_in_storage(
    storage: &Storage,
    shared: &SharedState,
    image: &BuiltImage,
) -> Result<bool, StorageError> {
    match image_blobs(image) {
        Some(blobs) => blobs_in_storage(storage, shared, &blobs).await,
        None => Ok(false),
    }
}

async fn all_stored(c: &BuildContext, blobs: &[Digest]) -> Result<bool, BuildError> {
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

/// Reads an image record; None unless every blob it names is stored.
async fn load_image(
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
    let manifest = |text: String| {
        let bytes = Bytes::from(text.into_bytes());
        StoredManifest {
            digest: Digest::of(&bytes),
            bytes,
        }
    };
    let referrers: Option<Vec<Referrer>> = record
        .referrers
        .into_iter()
        .map(|m| Referrer::parse(Bytes::from(m.into_bytes())))
        .collect();
    let Some(referrers) = referrers else {
        log::warn!("ignoring image record {key} with an unreadable artifact");
        return Ok(None);
    };
    let image = BuiltImage {
        docker: manifest(record.docker),
        oci: manifest(record.oci),
        referrers,
    };
    if !image_is_stored(c, &image).await? {
        log::warn!("image record {key} names a missing blob; rebuilding");
        return Ok(None);
    }
    Ok(Some(Arc::new(image)))
}

/// One layer: reused when this process or storage already has it, otherwise packed
/// and uploaded once even when several builds need it at the same time.
async fn layer(c: &Arc<BuildContext>, plan: &LayerPlan) -> Result<LayerDone, BuildError> {
    let key = layer_key(&plan.paths, c.gzip_level);
    let remembered = c.layers.lock().expect("layer memo lock").get(&key).cloned();
    if let Some(record) = remembered {
        let stored = match Digest::parse(&record.digest) {
            Ok(d) => all_stored(c, &[d]).await?,
            Err(_) => false,
        };
        if stored {
            c.shared.stats.layers_reused.inc();
            c.shared.stats.cache_hit("layer");
            return Ok(done_from_record(&record, true, 0));
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
                    let result = build_layer(&c, &key, &plan).await;
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
    pending.await
}

async fn build_layer(
    c: &BuildContext,
    key: &str,
    plan: &LayerPlan,
) -> Result<LayerDone, BuildError> {
    if let Some(raw) = c
        .storage
        .read_record(RecordKind::Layer, key)
        .await
        .map_err(storage_error)?
    {
        if let Ok(record) = serde_json::from_slice::<LayerRecord>(&raw) {
            let stored = match Digest::parse(&record.digest) {
                Ok(d) => c.storage.blob_size(&d).await.map_err(storage_error)?,
                Err(_) => None,
            };
            if stored == Some(record.size) {
                if let Ok(d) = Digest::parse(&record.digest) {
                    c.shared.remember_blob(&d);
                }
                c.layers
                    .lock()
                    .expect("layer memo lock")
                    .insert(key.to_string(), record.clone());
                c.shared.stats.layers_reused.inc();
                return Ok(done_from_record(&record, true, 0));
            }
        }
    }
    let paths = plan.paths.iter().map(PathBuf::from).collect();
    let (packed, put) = pack(c, LayerContents::Store(paths)).await?;
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
    Ok(done_from_record(&record, false, put.bytes))
}

fn done_from_record(record: &LayerRecord, reused: bool, uploaded: u64) -> LayerDone {
    LayerDone {
        entry: LayerEntry {
            digest: record.digest.clone(),
            diff_id: record.diff_id.clone(),
            size: record.size,
        },
        reused,
        uploaded,
    }
}

/// Packs a layer on a worker while storage takes it in, chunk by chunk.
async fn pack(c: &BuildContext, contents: LayerContents) -> Result<(PackedLayer, Put), BuildError> {
    let (sink, pieces) = storage::stream::channel(c.storage.stream_chunk());
    let (packed, put) = futures::join!(
        c.workers.send(Pack { contents, sink }),
        c.uploader.send(PutBlobStream {
            pieces,
            media_type: manifest::DOCKER_LAYER,
        })
    );
    // Each side stops when the other does; the storage failure is the cause unless
    // storage only saw the packer stop.
    let packed = packed.map_err(mailbox)?;
    let put = match put.map_err(mailbox)? {
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
    Ok((packed, put))
}

async fn put_bytes(
    c: &BuildContext,
    digest: &Digest,
    bytes: Bytes,
    media_type: &'static str,
) -> Result<u64, BuildError> {
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
    c.shared.remember_blob(digest);
    Ok(put.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::SourceArgs;

    fn source(version: &str, config: &str) -> ResolvedSource {
        ResolvedSource {
            args: SourceArgs {
                src_type: "path",
                src_args: "/pkgs".into(),
            },
            version: version.into(),
            pinned: false,
            config: config.into(),
        }
    }

    #[test]
    fn request_keys_follow_the_source_version_and_the_nixpkgs_config() {
        let hello = ImageRequest::from_name("hello", 64).unwrap();
        let key = request_key(&hello, &source("v1", "unfree=false"));
        assert_eq!(key, request_key(&hello, &source("v1", "unfree=false")));
        assert_ne!(key, request_key(&hello, &source("v2", "unfree=false")));
        assert_ne!(key, request_key(&hello, &source("v1", "unfree=true")));
        let other = ImageRequest::from_name("cowsay", 64).unwrap();
        assert_ne!(key, request_key(&other, &source("v1", "unfree=false")));
    }
}
