//! The build pipeline: from a request to stored blobs and manifests.
//!
//! One platform's image goes evaluate → realise → plan layers → pack and store →
//! assemble manifests (with the SBOM), reusing whatever a step finds already done:
//! a pinned record skips everything, known top-level paths skip realising, a stored
//! layer is not packed again. Manifests are assembled and stored once every
//! layer's digest is known, while the last uploads end; the image is recorded only
//! once all of it is stored. An index is assembled from the images of every
//! platform, which the coordinator builds (and deduplicates) one by one.
//!
//! Each step is a function whose inputs and outputs are in its signature; Nix and
//! the packer are reached through [`NixRunner`], so the tests run the pipeline with a
//! fake Nix and in-memory storage. Deduplication of whole builds, the queue and the
//! failure cache belong to the coordinator, not here.

mod eval_queue;
#[cfg(test)]
pub(crate) mod fake;
mod realise_queue;
mod records;
mod store;
#[cfg(test)]
mod tests;

pub use records::{image_in_storage, load_referrers, record_blobs};

use crate::actors::nix_worker::{
    Claim, Evaluate, LayerContents, NixWorker, Pack, PackedLayer, Realise,
};
use crate::actors::upload::UploadActor;
use crate::built::{BuiltImage, StoredManifest};
use crate::compression::{Codec, Compression};
use crate::error::BuildError;
use crate::image::{Arch, ImageRequest};
use crate::layers::{self, LayerParams, LayerPlan, Popularity, StorePathInfo};
use crate::limits;
use crate::manifest::{self, IndexEntry, LayerEntry, ManifestFormat, RuntimeConfig};
use crate::nix::gc::{GcRoots, HeldRoots};
use crate::nix::Evaluation;
use crate::source::ResolvedSource;
use crate::state::SharedState;
use crate::storage::{RecordKind, Storage};
use actix::prelude::*;
use bytes::Bytes;
use eval_queue::EvalQueue;
use futures::future::BoxFuture;
use realise_queue::{Coming, RealiseQueue};
use records::LayerRecord;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::PendingLayer;

/// Bumped whenever layer or manifest bytes change for the same inputs, so records
/// written by an older version are never mistaken for current ones.
const FORMAT_VERSION: &str = "nixery-v2";

/// What the pipeline asks of Nix and of the packer.
pub trait NixRunner: Send + Sync + 'static {
    fn evaluate(&self, job: Evaluate) -> BoxFuture<'static, Result<Evaluation, BuildError>>;
    fn realise(&self, job: Realise) -> BoxFuture<'static, Result<Vec<StorePathInfo>, BuildError>>;
    fn pack(&self, job: Pack) -> BoxFuture<'static, Result<PackedLayer, BuildError>>;
    /// Marks an image as on its way to [`NixRunner::realise`] until dropped, so that
    /// realisations about to start can wait for it to join them.
    fn coming(&self) -> Option<Coming> {
        None
    }
}

/// Nix's work in three queues of workers, so that no job waits behind another kind:
/// a realised image's layers are packed, and a new request is evaluated, while
/// other images' realisations queue for their workers. An image whose outputs are
/// already in the store is not a realisation to wait for either: it only queries
/// its closure, which the evaluation workers do.
pub struct NixPools {
    /// In front of the evaluation workers: evaluations that queue are batched.
    eval_queue: Arc<EvalQueue>,
    /// In front of the build workers: realisations that queue are batched; closures
    /// of images already built are read by the evaluation workers.
    realise_queue: Arc<RealiseQueue>,
    pack: Addr<NixWorker>,
}

impl NixPools {
    /// `evaluators` and `builders` are the numbers of workers in the `evaluate` and
    /// `realise` pools; `gather`, how long the last free evaluation worker waits for
    /// a burst (`nix.eval_gather_ms`).
    pub fn new(
        (evaluate, evaluators, gather): (Addr<NixWorker>, usize, Duration),
        (realise, builders): (Addr<NixWorker>, usize),
        pack: Addr<NixWorker>,
    ) -> Self {
        NixPools {
            eval_queue: EvalQueue::new(evaluate.clone(), evaluators, gather),
            realise_queue: RealiseQueue::new(realise, evaluate, builders),
            pack,
        }
    }
}

impl NixRunner for NixPools {
    fn evaluate(&self, job: Evaluate) -> BoxFuture<'static, Result<Evaluation, BuildError>> {
        self.eval_queue.evaluate(job)
    }

    fn realise(&self, job: Realise) -> BoxFuture<'static, Result<Vec<StorePathInfo>, BuildError>> {
        self.realise_queue.realise(job)
    }

    fn coming(&self) -> Option<Coming> {
        Some(self.realise_queue.coming())
    }

    fn pack(&self, job: Pack) -> BoxFuture<'static, Result<PackedLayer, BuildError>> {
        self.pack.pack(job)
    }
}

/// One NixWorker pool: each job waits for a free worker.
impl NixRunner for Addr<NixWorker> {
    fn evaluate(&self, job: Evaluate) -> BoxFuture<'static, Result<Evaluation, BuildError>> {
        ask(self, job)
    }

    fn realise(&self, job: Realise) -> BoxFuture<'static, Result<Vec<StorePathInfo>, BuildError>> {
        ask(self, job)
    }

    fn pack(&self, job: Pack) -> BoxFuture<'static, Result<PackedLayer, BuildError>> {
        ask(self, job)
    }
}

/// Queues `job` with a pool now; its answer, or an error if the pool is gone.
fn ask<M, T>(pool: &Addr<NixWorker>, job: M) -> BoxFuture<'static, Result<T, BuildError>>
where
    M: Message<Result = Result<T, BuildError>> + Send + 'static,
    T: Send + 'static,
    NixWorker: Handler<M>,
{
    let sent = pool.send(job);
    Box::pin(async move { sent.await.map_err(mailbox)? })
}

/// How images are laid out and limited: every setting that changes an image's bytes
/// or decides whether it is built.
#[derive(Clone)]
pub struct ImageSettings {
    pub popularity: Popularity,
    /// Digest of the popularity data, part of every cache key it influences.
    pub popularity_id: String,
    pub params: LayerParams,
    pub gzip_level: u32,
    pub zstd_level: i32,
    pub max_image_bytes: u64,
    pub lease_ttl: Duration,
}

impl ImageSettings {
    /// The codec and level layers of `compression` are packed with.
    pub fn codec(&self, compression: Compression) -> Codec {
        match compression {
            Compression::Gzip => Codec::Gzip {
                level: self.gzip_level,
            },
            Compression::Zstd => Codec::Zstd {
                level: self.zstd_level,
            },
        }
    }
}

/// Everything a build needs; shared by all builds.
pub struct BuildContext {
    pub nix: Arc<dyn NixRunner>,
    pub uploader: Addr<UploadActor>,
    pub storage: Arc<Storage>,
    pub settings: ImageSettings,
    pub shared: Arc<SharedState>,
    /// Each client's allowance of new builds.
    pub limits: Arc<limits::Limits>,
    /// Where builds root their paths against Nix's garbage collector.
    roots: Option<Arc<GcRoots>>,
    layers: Mutex<HashMap<String, LayerRecord>>,
    layer_builds: Mutex<HashMap<String, PendingLayer>>,
    images: Mutex<HashMap<String, Arc<BuiltImage>>>,
}

impl BuildContext {
    pub fn new(
        nix: Arc<dyn NixRunner>,
        uploader: Addr<UploadActor>,
        storage: Arc<Storage>,
        settings: ImageSettings,
        shared: Arc<SharedState>,
        limits: Arc<limits::Limits>,
    ) -> Self {
        BuildContext {
            nix,
            uploader,
            storage,
            settings,
            shared,
            limits,
            roots: None,
            layers: Mutex::default(),
            layer_builds: Mutex::default(),
            images: Mutex::default(),
        }
    }
}

impl BuildContext {
    /// Builds root their derivations and outputs here from evaluation until their
    /// layers are stored.
    pub fn with_roots(mut self, roots: Arc<GcRoots>) -> Self {
        self.roots = Some(roots);
        self
    }

    fn hold_roots(&self, evaluation: &Evaluation) -> Result<Option<HeldRoots>, BuildError> {
        let Some(roots) = &self.roots else {
            return Ok(None);
        };
        let paths = evaluation
            .packages
            .iter()
            .flat_map(|p| [p.drv_path.as_str(), p.path.as_str()]);
        roots
            .hold(paths)
            .map(Some)
            .map_err(|e| BuildError::Internal(format!("rooting the build's store paths: {e}")))
    }
}

/// One platform's image to build.
#[derive(Debug, Clone)]
pub struct Job {
    /// The request key: the build page and pinned records know the build by it.
    pub key: String,
    pub request: ImageRequest,
    pub arch: Arch,
    pub source: ResolvedSource,
    /// Who asked, when that decides whether a new image may be built.
    pub client: Option<Client>,
}

/// The caller of a build, for the build allowance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The user, or the address of an anonymous caller.
    pub key: String,
    /// False for anonymous callers where only images already built are served.
    pub may_build: bool,
}

impl Job {
    pub fn new(request: &ImageRequest, arch: Arch, source: &ResolvedSource) -> Job {
        let request = request.for_arch(arch);
        Job {
            key: request_key(&request, source),
            request,
            arch,
            source: source.clone(),
            client: None,
        }
    }

    pub fn for_client(mut self, client: Option<Client>) -> Job {
        self.client = client;
        self
    }

    /// How the log names the build: the image and the start of its key.
    pub fn label(&self) -> String {
        format!("{} [{}]", self.request.display_name(), &self.key[..12])
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

/// The key of an index request: the request of every platform it names.
pub fn index_key(request: &ImageRequest, source: &ResolvedSource, archs: &[Arch]) -> String {
    let children: Vec<String> = archs
        .iter()
        .map(|a| request_key(&request.for_arch(*a), source))
        .collect();
    index_key_of(&children)
}

/// [`index_key`] from the request keys of its platforms' jobs, already computed.
pub fn index_key_of<S: AsRef<str> + serde::Serialize>(children: &[S]) -> String {
    sha256_hex(&serde_json::to_vec(&("index", children)).expect("keys serialise"))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// One platform's image, the whole pipeline.
pub async fn build_image(c: &Arc<BuildContext>, job: &Job) -> Result<Arc<BuiltImage>, BuildError> {
    if job.source.pinned {
        if let Some(image) = records::load_image(c, RecordKind::Pinned, &job.key).await? {
            c.shared.stats.cache_hit("pinned");
            return Ok(image);
        }
    }
    let coming = c.nix.coming();
    let (evaluation, _roots) = evaluate_rooted(c, job).await?;
    let image_key = image_key(&c.settings, job, &evaluation);
    if let Some(image) = records::known_image(c, &image_key).await? {
        let how = "top-level paths known, image reused without building";
        return reuse(c, job, image, how).await;
    }
    admit(c, job)?;
    // Replicas on the same storage build each image once: the lease holder builds,
    // the others wait for its record.
    if let Some(image) = records::take_lease(c, job, &image_key).await? {
        return reuse(c, job, image, "built by another replica").await;
    }
    let built = async {
        let tally = Tally::default();
        let closure = realise(c, job, &evaluation, coming).await?;
        let plans = plan_layers(&c.settings, &evaluation, &closure)?;
        // The symlink layer needs nothing from the others: packed alongside them,
        // it is not a round trip after the largest one.
        let ((mut layers, stored), (top, runtime, top_stored)) = futures::try_join!(
            store::store_layers(c, job, &plans, &closure, &tally),
            store::symlink_layer(c, job, &evaluation, &tally),
        )?;
        layers.push(top);
        // The config, manifests and SBOM go up while the last layers' uploads end:
        // nothing names them before the image record, written once all is stored.
        let ((image, size), (), ()) = futures::try_join!(
            assemble(c, job, &evaluation, &closure, &layers, &runtime, &tally),
            stored,
            top_stored,
        )?;
        log::info!(
            "build {}: {} layers reused, {} layers built, {} bytes uploaded, image {} bytes",
            job.label(),
            tally.reused.load(Ordering::Relaxed),
            tally.built.load(Ordering::Relaxed),
            tally.uploaded.load(Ordering::Relaxed),
            size,
        );
        records::store_image(c, job, &image_key, &image).await?;
        Ok(image)
    }
    .await;
    // In the background: a replica looks for the image record before the lease,
    // so the answer need not wait another round trip for it.
    let c = c.clone();
    tokio::spawn(async move { records::release_lease(&c, &image_key).await });
    built
}

/// An index naming the image of every platform, in both formats.
pub async fn build_index(
    c: &BuildContext,
    children: Vec<(Arch, Arc<BuiltImage>)>,
) -> Result<Arc<BuiltImage>, BuildError> {
    // Children with an OCI manifest only (zstd) make an OCI index only.
    let formats: &[ManifestFormat] = if children.iter().any(|(_, image)| image.oci_only()) {
        &[ManifestFormat::Oci]
    } else {
        &[ManifestFormat::Docker, ManifestFormat::Oci]
    };
    let mut manifests = Vec::with_capacity(2);
    let mut blobs = Vec::with_capacity(2);
    for &format in formats {
        let entries: Vec<IndexEntry> = children
            .iter()
            .map(|(arch, image)| {
                let m = image.manifest(format);
                IndexEntry {
                    arch: *arch,
                    digest: m.digest.to_string(),
                    size: m.bytes.len() as u64,
                }
            })
            .collect();
        let bytes = Bytes::from(manifest::index_bytes(format, &entries));
        manifests.push(StoredManifest::of(bytes.clone()));
        blobs.push((bytes, format.index_media_type()));
    }
    store::put_blobs(c, blobs, &Tally::default()).await?;
    let oci = manifests.pop().expect("an OCI index");
    let docker = manifests.pop().unwrap_or_else(|| oci.clone());
    let mut children = children;
    children.sort_by_key(|(arch, _)| *arch);
    Ok(Arc::new(BuiltImage::new(
        docker,
        oci,
        Vec::new(),
        children.into_iter().map(|(_, image)| image).collect(),
    )))
}

/// Whether the caller may have a new image built: a login where the policy asks for
/// one, and allowance left.
fn admit(c: &BuildContext, job: &Job) -> Result<(), BuildError> {
    let Some(client) = &job.client else {
        return Ok(());
    };
    if !client.may_build {
        return Err(BuildError::LoginRequired(job.request.display_name()));
    }
    c.limits
        .check(limits::Kind::Builds, || client.key.clone(), &c.shared.stats)
        .map(drop)
        .map_err(BuildError::BuildLimit)
}

/// Step 1 with the result rooted until the build ends, so Nix's collector leaves the
/// derivations and outputs alone. A collection that was running while they were
/// rooted may still have taken derivations it had found dead; then they are
/// written again.
async fn evaluate_rooted(
    c: &BuildContext,
    job: &Job,
) -> Result<(Evaluation, Option<HeldRoots>), BuildError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let evaluation = evaluate(c, job).await?;
        let roots = c.hold_roots(&evaluation)?;
        if roots.is_none() {
            return Ok((evaluation, None));
        }
        // Waits for a collection in progress; the next one sees the roots.
        drop(c.shared.collecting.read().await);
        let lost: Vec<&str> = evaluation
            .packages
            .iter()
            .map(|p| p.drv_path.as_str())
            .filter(|d| !std::path::Path::new(d).exists())
            .collect();
        if lost.is_empty() || attempts == 3 {
            return Ok((evaluation, roots));
        }
        log::info!(
            "build {}: a garbage collection took {} derivations during evaluation; evaluating again",
            job.label(),
            lost.len()
        );
    }
}

/// Step 1: the packages' derivations and output paths, or which names are unknown.
async fn evaluate(c: &BuildContext, job: &Job) -> Result<Evaluation, BuildError> {
    c.shared.enter_phase(&job.key, "evaluating");
    c.shared.stats.nix_evaluations.inc();
    let evaluation = c
        .nix
        .evaluate(Evaluate {
            label: job.label(),
            source: job.source.args.clone(),
            system: job.arch.nix_system(),
            packages: job.request.packages.clone(),
            optional: job.request.optional_packages(),
        })
        .await?;
    if !evaluation.missing.is_empty() {
        return Err(BuildError::NotFound(evaluation.missing));
    }
    if !evaluation.not_packages.is_empty() {
        return Err(BuildError::NotPackages(evaluation.not_packages));
    }
    Ok(evaluation)
}

/// Step 2: the packages built or substituted, and their runtime closure.
async fn realise(
    c: &Arc<BuildContext>,
    job: &Job,
    evaluation: &Evaluation,
    coming: Option<Coming>,
) -> Result<Vec<StorePathInfo>, BuildError> {
    c.shared.enter_phase(&job.key, "building");
    c.shared.stats.nix_realisations.inc();
    let shared = c.shared.clone();
    let key = job.key.clone();
    let realised = c.nix.realise(Realise {
        label: job.label(),
        system: job.arch.nix_system(),
        evaluation: evaluation.clone(),
        progress: Arc::new(move |phase| shared.update(&key, |p| p.phase = phase)),
        claim: Claim::default(),
    });
    // Queued now: no longer one to wait for.
    drop(coming);
    realised.await
}

/// Step 3: which store paths go into which layer; refuses an image over the limit.
fn plan_layers(
    settings: &ImageSettings,
    evaluation: &Evaluation,
    closure: &[StorePathInfo],
) -> Result<Vec<LayerPlan>, BuildError> {
    let total: u64 = closure.iter().map(|p| p.nar_size).sum();
    if settings.max_image_bytes > 0 && total > settings.max_image_bytes {
        return Err(BuildError::TooLarge {
            size: total,
            max: settings.max_image_bytes,
        });
    }
    Ok(layers::group_layers(
        &evaluation.output_paths(),
        closure,
        &settings.popularity,
        &settings.params,
    ))
}

/// Step 5: the config and both manifests over the layers, and the SBOM attached
/// to them; with the image's size (layers and config).
async fn assemble(
    c: &BuildContext,
    job: &Job,
    evaluation: &Evaluation,
    closure: &[StorePathInfo],
    layers: &[LayerEntry],
    runtime: &RuntimeConfig,
    tally: &Tally,
) -> Result<(Arc<BuiltImage>, u64), BuildError> {
    let config = Bytes::from(manifest::config_blob(job.arch, layers, runtime));
    let config_digest = crate::reference::Digest::of(&config);
    let mut blobs = vec![(config.clone(), manifest::DOCKER_CONFIG)];
    let compression = job.request.compression();
    // zstd images have an OCI manifest only; it stands in for both formats.
    let formats: &[ManifestFormat] = match compression {
        Compression::Gzip => &[ManifestFormat::Docker, ManifestFormat::Oci],
        Compression::Zstd => &[ManifestFormat::Oci],
    };
    let mut manifests = Vec::with_capacity(2);
    for format in formats {
        let bytes = Bytes::from(manifest::manifest_bytes(
            *format,
            &config_digest.to_string(),
            config.len() as u64,
            layers,
            compression,
        ));
        manifests.push(StoredManifest::of(bytes.clone()));
        blobs.push((bytes, format.media_type()));
    }
    let oci = manifests.pop().expect("an OCI manifest");
    let docker = manifests.pop().unwrap_or_else(|| oci.clone());
    let subjects: &[(&StoredManifest, ManifestFormat)] = if docker.digest == oci.digest {
        &[(&oci, ManifestFormat::Oci)]
    } else {
        &[
            (&docker, ManifestFormat::Docker),
            (&oci, ManifestFormat::Oci),
        ]
    };
    let (sbom, referrers) = store::sbom_blobs(job, evaluation, closure, subjects)?;
    blobs.extend(sbom);
    store::put_blobs(c, blobs, tally).await?;
    let size = layers.iter().map(|e| e.size).sum::<u64>() + config.len() as u64;
    let image = BuiltImage::new(docker, oci, referrers, Vec::new());
    Ok((Arc::new(image), size))
}

/// What one build did, for its log line; steps that run side by side add to it.
#[derive(Default)]
pub(crate) struct Tally {
    reused: AtomicU64,
    built: AtomicU64,
    uploaded: AtomicU64,
}

impl Tally {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A layer stored: the bytes uploaded with it, or None when it was reused.
    fn count(&self, uploaded: Option<u64>) {
        match uploaded {
            Some(bytes) => {
                Tally::add(&self.built, 1);
                Tally::add(&self.uploaded, bytes);
            }
            None => Tally::add(&self.reused, 1),
        }
    }
}

/// Answers with an image assembled earlier, remembering it for a pinned request.
async fn reuse(
    c: &BuildContext,
    job: &Job,
    image: Arc<BuiltImage>,
    how: &str,
) -> Result<Arc<BuiltImage>, BuildError> {
    c.shared.stats.cache_hit("image");
    log::info!("build {}: {how}", job.label());
    if job.source.pinned {
        records::store_record(c, RecordKind::Pinned, &job.key, &image).await?;
    }
    Ok(image)
}

/// The key of an assembled image: its top-level store paths and every setting that
/// changes its bytes.
fn image_key(settings: &ImageSettings, job: &Job, evaluation: &Evaluation) -> String {
    let mut material = serde_json::json!({
        "version": FORMAT_VERSION,
        "nixpkgs_config": job.source.config,
        "arch": job.arch,
        "paths": evaluation.output_paths(),
        "budget": settings.params.budget,
        "popularity_threshold": settings.params.popularity_threshold,
        "size_threshold": settings.params.size_threshold,
        "popularity": settings.popularity_id,
        "gzip_level": settings.gzip_level,
    });
    if let Codec::Zstd { level } = settings.codec(job.request.compression()) {
        material["zstd_level"] = level.into();
    }
    sha256_hex(material.to_string().as_bytes())
}

/// The key of a layer: its paths and how it is compressed (gzip keys are what they
/// were before zstd existed).
fn layer_key(paths: &[String], codec: Codec) -> String {
    let material = match codec {
        Codec::Gzip { level } => serde_json::to_vec(&(FORMAT_VERSION, level, paths)),
        Codec::Zstd { level } => serde_json::to_vec(&(FORMAT_VERSION, "zstd", level, paths)),
    };
    sha256_hex(&material.expect("keys serialise"))
}

fn mailbox(e: MailboxError) -> BuildError {
    BuildError::Internal(format!("worker unavailable: {e}"))
}

/// The packages whose files the symlink layer links to, in request order, unique.
fn top_level_packages(evaluation: &Evaluation) -> Vec<PathBuf> {
    let mut packages: Vec<PathBuf> = Vec::new();
    for p in &evaluation.packages {
        let path = PathBuf::from(&p.path);
        if !packages.contains(&path) {
            packages.push(path);
        }
    }
    packages
}

/// The contents of a store-path layer.
fn store_contents(plan: &LayerPlan) -> LayerContents {
    LayerContents::Store(plan.paths.iter().map(PathBuf::from).collect())
}
