//! The S3 backend, for Amazon S3 and S3-compatible servers, over `object_store`.
//!
//! Layers stream into the bucket while they are compressed, as with GCS: the
//! packer's chunks go into a multipart upload under `staging/` at once (parts of
//! at least 5 MiB, the smallest S3 accepts; `storage.upload_chunks_in_flight` parts
//! are in flight while the next fills). A layer's digest, and so its name, is known
//! only when packing ends, so the completed staging object is checked (its size
//! against what the packer counted), copied inside the bucket to
//! `blobs/sha256/<hex>` only if nothing is there yet, and deleted. Readers therefore
//! only ever see complete blobs under digest names; a stream the packer abandons is
//! aborted and leaves nothing. A layer that fits in one chunk goes straight to its
//! digest name.
//!
//! "Only if nothing is there" is S3's conditional write, `If-None-Match: *`: on a
//! PUT for configs, manifests and leases, and on the completion of the one-part
//! multipart copy that publishes a staged layer (`S3CopyIfNotExists::Multipart`;
//! plain CopyObject has no such condition). A replica that loses the race is told
//! "already there".
//!
//! Blob downloads are redirects to presigned GET URLs (SigV4, query-string auth)
//! that the signer actor asks [`Presigner`] for; they expire after
//! `storage.signed_url_ttl_secs`.
//!
//! Credentials and defaults come from the environment as the AWS tools read them:
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
//! `AWS_ENDPOINT_URL`, web identity and container credentials, the instance
//! metadata service; and, when no key is in the environment, the shared
//! credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`,
//! profile `AWS_PROFILE` or `default`). `storage.region` and `storage.endpoint`
//! override the environment when set; an `http://` endpoint is allowed (a local
//! S3-compatible server) and requests are path-style (`endpoint/bucket/object`).
//!
//! Every request is retried by `object_store` on 5xx, 429, timeouts and connection
//! errors, with exponential backoff (see [`retry_config`]).

use super::staging::{self, StagingBucket};
use super::stream::{BlobReceiver, Piece};
use super::{blob_object, ObjectInfo, Put, StorageError};
use crate::config::StorageSettings;
use crate::reference::Digest;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, S3CopyIfNotExists};
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{
    Attribute, Attributes, BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode,
    PutMultipartOptions, PutOptions, PutPayload, RetryConfig, WriteMultipart,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The smallest part S3 accepts in a multipart upload (except the last).
const MIN_PART: usize = 5 << 20;
/// How long `open` keeps trying to reach the bucket.
const OPEN_DEADLINE: Duration = Duration::from_secs(10);
/// Deadline of a request without a large body.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Uploads slower than this are considered stalled and retried.
const MIN_UPLOAD_BYTES_PER_SEC: u64 = 256 << 10;

pub struct S3Storage {
    store: Arc<AmazonS3>,
    bucket: String,
    /// What requests go to, for messages: the endpoint or the AWS region.
    target: String,
    /// Bytes per chunk handed over by the packer.
    chunk: usize,
    /// Bytes per part of a multipart upload.
    part: usize,
    /// Parts of one layer uploading at once while the next part fills.
    in_flight: usize,
    uploads: AtomicU64,
    /// Leases this process holds right now (see `Storage::acquire_lease`).
    pub(crate) held_leases: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// A blob the client is to fetch from the bucket: the signer actor asks for a
/// presigned GET URL of it.
#[derive(Clone)]
pub struct Presigner {
    store: Arc<AmazonS3>,
    object: ObjectPath,
}

impl std::fmt::Debug for Presigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presigner")
            .field("object", &self.object.as_ref())
            .finish()
    }
}

impl Presigner {
    pub fn object(&self) -> &str {
        self.object.as_ref()
    }

    /// A URL that lets whoever holds it GET the object for `ttl`.
    pub async fn url(&self, ttl: Duration) -> Result<String, StorageError> {
        self.store
            .signed_url(reqwest::Method::GET, &self.object, ttl)
            .await
            .map(|u| u.to_string())
            .map_err(|e| StorageError::io("sign", self.object.as_ref(), with_causes(&e)))
    }
}

/// `object_store`'s messages hide the reason (a status, "Connection refused") in
/// their sources.
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
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn io(op: &'static str, object: impl Into<String>, e: object_store::Error) -> StorageError {
    StorageError::io(op, object, with_causes(&e))
}

/// Five tries in all, 250 ms to 8 s apart (with jitter), as the GCS backend.
pub fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(8),
            base: 2.0,
        },
        max_retries: 4,
        retry_timeout: Duration::from_secs(120),
    }
}

/// Parts are whole chunks, and no smaller than S3 allows.
fn part_size(chunk: usize) -> usize {
    chunk.max(MIN_PART).div_ceil(chunk) * chunk
}

/// The sections of an AWS shared credentials or config file: `[name]` headers and
/// `key = value` lines; `#` and `;` start comments.
fn parse_ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut sections: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut current = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(name.trim().to_string());
            sections.entry(name.trim().to_string()).or_default();
        } else if let (Some(section), Some((k, v))) = (&current, line.split_once('=')) {
            sections
                .entry(section.clone())
                .or_default()
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    sections
}

/// Access key, secret and session token of `profile` in a shared credentials file.
fn shared_credentials(text: &str, profile: &str) -> Option<(String, String, Option<String>)> {
    let sections = parse_ini(text);
    let s = sections.get(profile)?;
    Some((
        s.get("aws_access_key_id")?.clone(),
        s.get("aws_secret_access_key")?.clone(),
        s.get("aws_session_token").cloned(),
    ))
}

/// The shared credentials file's key for the profile in use, unless the
/// environment names a key itself.
fn credentials_from_file(
    env: &HashMap<String, String>,
) -> Option<(String, String, Option<String>)> {
    if env.contains_key("AWS_ACCESS_KEY_ID") {
        return None;
    }
    let path = match env.get("AWS_SHARED_CREDENTIALS_FILE") {
        Some(p) => std::path::PathBuf::from(p),
        None => std::path::PathBuf::from(env.get("HOME")?).join(".aws/credentials"),
    };
    let text = std::fs::read_to_string(path).ok()?;
    let profile = env.get("AWS_PROFILE").map_or("default", |p| p.as_str());
    shared_credentials(&text, profile)
}

impl S3Storage {
    /// Builds the client, checks that the bucket answers, and removes what dead
    /// processes left under `staging/`. Fails with one line naming the bucket and
    /// endpoint.
    pub async fn open(settings: &StorageSettings) -> Result<Self, StorageError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        let storage = Self::build(settings, AmazonS3Builder::from_env(), &env)?;
        storage.check_bucket().await?;
        storage.sweep_leftovers().await;
        log::info!(
            "storage: s3 bucket {} at {}, layers streamed in {} MiB parts, {} at once",
            storage.bucket,
            storage.target,
            storage.part >> 20,
            storage.in_flight
        );
        Ok(storage)
    }

    fn build(
        settings: &StorageSettings,
        mut builder: AmazonS3Builder,
        env: &HashMap<String, String>,
    ) -> Result<Self, StorageError> {
        let chunk = settings.upload_chunk_bytes();
        let part = part_size(chunk);
        if let Some((key, secret, token)) = credentials_from_file(env) {
            builder = builder
                .with_access_key_id(key)
                .with_secret_access_key(secret);
            if let Some(token) = token {
                builder = builder.with_token(token);
            }
        }
        let region = settings.region.trim();
        if !region.is_empty() {
            builder = builder.with_region(region);
        }
        let endpoint = settings.endpoint.trim().trim_end_matches('/');
        let env_endpoint = env
            .get("AWS_ENDPOINT_URL_S3")
            .or_else(|| env.get("AWS_ENDPOINT_URL"))
            .or_else(|| env.get("AWS_ENDPOINT"))
            .map(|e| e.trim_end_matches('/').to_string());
        let endpoint = if endpoint.is_empty() {
            env_endpoint
        } else {
            builder = builder.with_endpoint(endpoint);
            Some(endpoint.to_string())
        };
        // A local S3-compatible server speaks plain HTTP.
        let allow_http = endpoint.as_ref().is_some_and(|e| e.starts_with("http://"));
        let target = match &endpoint {
            Some(e) => e.clone(),
            None => {
                let region = builder
                    .get_config_value(&object_store::aws::AmazonS3ConfigKey::Region)
                    .unwrap_or_else(|| "us-east-1".into());
                format!("AWS region {region}")
            }
        };
        let upload_timeout =
            REQUEST_TIMEOUT + Duration::from_secs(part as u64 / MIN_UPLOAD_BYTES_PER_SEC);
        let store = builder
            .with_bucket_name(&settings.bucket)
            .with_virtual_hosted_style_request(false)
            .with_copy_if_not_exists(S3CopyIfNotExists::Multipart)
            .with_retry(retry_config())
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(allow_http)
                    .with_connect_timeout(Duration::from_secs(10))
                    .with_timeout(upload_timeout),
            )
            .build()
            .map_err(|e| {
                StorageError::Config(format!(
                    "storage (s3 bucket {:?} at {target}): {}",
                    settings.bucket,
                    with_causes(&e)
                ))
            })?;
        Ok(S3Storage {
            store: Arc::new(store),
            bucket: settings.bucket.clone(),
            target,
            chunk,
            part,
            in_flight: settings.upload_chunks_in_flight,
            uploads: AtomicU64::new(0),
            held_leases: Default::default(),
        })
    }

    /// Lists `staging/` (which the sweep needs anyway); `object_store` retries a
    /// server that is still starting within the deadline.
    async fn check_bucket(&self) -> Result<(), StorageError> {
        let prefix = ObjectPath::from(staging::PREFIX);
        let listed = tokio::time::timeout(
            OPEN_DEADLINE,
            self.store.list(Some(&prefix)).try_collect::<Vec<_>>(),
        )
        .await;
        let why = match listed {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(object_store::Error::NotFound { .. })) => "does not exist".to_string(),
            Ok(Err(e @ object_store::Error::PermissionDenied { .. }))
            | Ok(Err(e @ object_store::Error::Unauthenticated { .. })) => format!(
                "access denied (s3:ListBucket is needed; credentials from AWS_* or ~/.aws/credentials): {}",
                with_causes(&e)
            ),
            // A listing's errors are not classified; S3 says NoSuchBucket (404).
            Ok(Err(e)) if with_causes(&e).contains("NoSuchBucket") => "does not exist".to_string(),
            Ok(Err(e)) => with_causes(&e),
            Err(_) => format!("unreachable after {} s", OPEN_DEADLINE.as_secs()),
        };
        Err(StorageError::Config(format!(
            "storage.bucket (S3_BUCKET): bucket {:?} at {} {why}",
            self.bucket, self.target
        )))
    }

    pub fn chunk(&self) -> usize {
        self.chunk
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Blob uploads this process performed (not counting blobs already present).
    pub fn uploads(&self) -> u64 {
        self.uploads.load(Ordering::Relaxed)
    }

    pub fn presigner(&self, object: &str) -> Presigner {
        Presigner {
            store: self.store.clone(),
            object: ObjectPath::from(object),
        }
    }

    async fn size(&self, object: &str) -> Result<Option<u64>, StorageError> {
        Ok(self.object_info(object).await?.map(|o| o.size))
    }

    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        self.size(&blob_object(digest)).await
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

    async fn put_staged(
        &self,
        staging: &str,
        first: Bytes,
        mut pieces: BlobReceiver,
        media_type: &str,
    ) -> Result<Put, StorageError> {
        let path = ObjectPath::from(staging);
        let upload = self
            .store
            .put_multipart_opts(
                &path,
                PutMultipartOptions {
                    attributes: content_type(media_type),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| io("upload", staging, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, self.part);
        let mut piece = Piece::Chunk(first);
        let mut sent = 0u64;
        loop {
            match piece {
                Piece::Chunk(bytes) => {
                    sent += bytes.len() as u64;
                    writer.put(bytes);
                    // At most `in_flight` parts uploading while the packer fills
                    // the next chunk; a failed part ends the stream here.
                    if let Err(e) = writer.wait_for_capacity(self.in_flight).await {
                        let _ = writer.abort().await;
                        return Err(io("upload", staging, e));
                    }
                    if sent as usize == self.chunk {
                        log::info!(
                            "streaming a layer into {staging}: first {sent} bytes handed over"
                        );
                    }
                }
                Piece::End {
                    tail, digest, size, ..
                } => {
                    sent += tail.len() as u64;
                    writer.put(tail);
                    if sent != size {
                        let _ = writer.abort().await;
                        return Err(StorageError::io(
                            "upload",
                            staging,
                            format!("packer reported {size} bytes, sent {sent}"),
                        ));
                    }
                    writer
                        .finish()
                        .await
                        .map_err(|e| io("upload", staging, e))?;
                    return self.publish(staging, &digest, size).await;
                }
            }
            piece = match pieces.next().await {
                Some(p) => p,
                None => {
                    let _ = writer.abort().await;
                    return Err(StorageError::Abandoned);
                }
            };
        }
    }

    /// Checks a completed staging object and puts it under its digest name.
    async fn publish(
        &self,
        staging: &str,
        digest: &Digest,
        size: u64,
    ) -> Result<Put, StorageError> {
        match self.size(staging).await? {
            Some(stored) if stored == size => {}
            stored => {
                return Err(StorageError::io(
                    "upload",
                    staging,
                    format!("bucket holds {stored:?} bytes, sent {size}"),
                ))
            }
        }
        let target = blob_object(digest);
        // The copy's condition alone would do; asking first saves a copy of a blob
        // another replica published.
        let created = if self.blob_size(digest).await?.is_some() {
            false
        } else {
            match self
                .store
                .copy_if_not_exists(
                    &ObjectPath::from(staging),
                    &ObjectPath::from(target.as_str()),
                )
                .await
            {
                Ok(()) => true,
                Err(object_store::Error::AlreadyExists { .. }) => false,
                Err(e) => return Err(io("copy", target, e)),
            }
        };
        if let Err(e) = self.delete_object(staging).await {
            // Harmless: the next start-up sweeps it.
            log::warn!("{e}");
        }
        if created {
            self.uploads.fetch_add(1, Ordering::Relaxed);
            log::info!("uploaded {target} ({size} bytes, streamed while packed)");
        }
        Ok(Put {
            uploaded: created,
            bytes: size,
        })
    }

    /// Every object whose name starts with `prefix`; S3 lists page after page.
    pub async fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        // object_store lists by whole path segments: the prefix's directory, then
        // the names in it that start with the rest.
        let dir = prefix.rsplit_once('/').map_or("", |(dir, _)| dir);
        let listed = self
            .store
            .list(Some(&ObjectPath::from(dir)))
            .try_collect::<Vec<_>>()
            .await
            .map_err(|e| io("list", prefix, e))?;
        Ok(listed
            .iter()
            .map(object_info)
            .filter(|o| o.name.starts_with(prefix))
            .collect())
    }

    pub async fn object_info(&self, object: &str) -> Result<Option<ObjectInfo>, StorageError> {
        match self.store.head(&ObjectPath::from(object)).await {
            Ok(meta) => Ok(Some(object_info(&meta))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(io("stat", object, e)),
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
        let size = bytes.len();
        let created = self.create(&object, bytes, media_type).await?;
        if created {
            self.uploads.fetch_add(1, Ordering::Relaxed);
            log::info!("uploaded {object} ({size} bytes)");
        }
        Ok(created)
    }

    async fn create(
        &self,
        object: &str,
        bytes: Bytes,
        media_type: &str,
    ) -> Result<bool, StorageError> {
        let options = PutOptions {
            mode: PutMode::Create,
            attributes: content_type(media_type),
            ..Default::default()
        };
        match self
            .store
            .put_opts(&ObjectPath::from(object), PutPayload::from(bytes), options)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(io("create", object, e)),
        }
    }

    /// Creates an object only when no object of that name exists; false otherwise.
    /// A response lost after the object was created reads as "exists", with our own
    /// lease in it; `Storage::acquire_lease` takes such a lease back.
    pub async fn create_object_if_absent(
        &self,
        object: &str,
        bytes: Bytes,
    ) -> Result<bool, StorageError> {
        self.create(object, bytes, json_or_binary(object)).await
    }

    /// Deletes an object; a missing object is not an error (S3 answers 204 either way).
    pub async fn delete_object(&self, object: &str) -> Result<(), StorageError> {
        match self.store.delete(&ObjectPath::from(object)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(io("delete", object, e)),
        }
    }

    /// Reads a small object whole.
    pub async fn read_object(&self, object: &str) -> Result<Option<Bytes>, StorageError> {
        let got = match self.store.get(&ObjectPath::from(object)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(io("read", object, e)),
        };
        got.bytes()
            .await
            .map(Some)
            .map_err(|e| io("read", object, e))
    }

    /// Writes (or replaces) a small object.
    pub async fn write_object(&self, object: &str, bytes: Bytes) -> Result<(), StorageError> {
        let options = PutOptions {
            mode: PutMode::Overwrite,
            attributes: content_type(json_or_binary(object)),
            ..Default::default()
        };
        self.store
            .put_opts(&ObjectPath::from(object), PutPayload::from(bytes), options)
            .await
            .map(drop)
            .map_err(|e| io("write", object, e))
    }
}

fn object_info(meta: &object_store::ObjectMeta) -> ObjectInfo {
    ObjectInfo {
        name: meta.location.to_string(),
        size: meta.size,
        used: meta.last_modified.timestamp().max(0) as u64,
    }
}

impl StagingBucket for S3Storage {
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
        self.put_staged(staging, first, pieces, media_type).await
    }

    async fn discard_staged(&self, staging: &str) {
        let _ = self.store.delete(&ObjectPath::from(staging)).await;
    }
}

fn json_or_binary(object: &str) -> &'static str {
    if object.ends_with(".json") {
        "application/json"
    } else {
        "application/octet-stream"
    }
}

fn content_type(media_type: &str) -> Attributes {
    let mut attributes = Attributes::new();
    attributes.insert(Attribute::ContentType, media_type.to_string().into());
    attributes
}

#[cfg(test)]
mod tests {
    use super::super::stream::feed;
    use super::*;

    fn settings(bucket: &str, endpoint: &str, region: &str) -> StorageSettings {
        StorageSettings {
            backend: "s3".into(),
            path: String::new(),
            bucket: bucket.into(),
            endpoint: endpoint.into(),
            region: region.into(),
            credentials: String::new(),
            signed_url_ttl_secs: 300,
            upload_concurrency: 4,
            upload_chunk_mib: 1,
            upload_chunks_in_flight: 4,
            verify_interval_secs: 10,
            retention_secs: 0,
            sweep: true,
            sweep_interval_secs: 3600,
        }
    }

    #[test]
    fn parts_are_whole_chunks_of_at_least_five_mib() {
        assert_eq!(part_size(1 << 20), 5 << 20);
        assert_eq!(part_size(2 << 20), 6 << 20);
        assert_eq!(part_size(16 << 20), 16 << 20);
        assert_eq!(part_size(5 << 20), 5 << 20);
    }

    #[test]
    fn shared_credentials_file_profiles() {
        let text = "\
# comment
[default]
aws_access_key_id = AKIDEFAULT
aws_secret_access_key=secret/default

[work]
; another
AWS_ACCESS_KEY_ID = AKIWORK
aws_secret_access_key = s2
aws_session_token = tok
[broken]
aws_access_key_id = only
";
        assert_eq!(
            shared_credentials(text, "default"),
            Some(("AKIDEFAULT".into(), "secret/default".into(), None))
        );
        assert_eq!(
            shared_credentials(text, "work"),
            Some(("AKIWORK".into(), "s2".into(), Some("tok".into())))
        );
        assert_eq!(shared_credentials(text, "broken"), None);
        assert_eq!(shared_credentials(text, "none"), None);
    }

    #[test]
    fn the_credentials_file_is_read_only_without_a_key_in_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("credentials");
        std::fs::write(
            &file,
            "[default]\naws_access_key_id=A\naws_secret_access_key=B\n[p]\naws_access_key_id=C\naws_secret_access_key=D\n",
        )
        .unwrap();
        let mut env = HashMap::from([(
            "AWS_SHARED_CREDENTIALS_FILE".to_string(),
            file.display().to_string(),
        )]);
        assert_eq!(
            credentials_from_file(&env),
            Some(("A".into(), "B".into(), None))
        );
        env.insert("AWS_PROFILE".into(), "p".into());
        assert_eq!(
            credentials_from_file(&env),
            Some(("C".into(), "D".into(), None))
        );
        env.insert("AWS_ACCESS_KEY_ID".into(), "E".into());
        assert_eq!(credentials_from_file(&env), None);
        let home = HashMap::from([("HOME".to_string(), dir.path().display().to_string())]);
        assert_eq!(credentials_from_file(&home), None);
    }

    fn store(endpoint: &str) -> S3Storage {
        let env = HashMap::new();
        let builder = AmazonS3Builder::new()
            .with_access_key_id("AKIDEXAMPLE")
            .with_secret_access_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY");
        S3Storage::build(&settings("layers", endpoint, "eu-west-1"), builder, &env).unwrap()
    }

    #[tokio::test]
    async fn the_backends_presigned_urls_verify_against_the_sigv4_specification() {
        // moto does not check signatures: the URLs our blob redirects carry are
        // checked by a verifier written from AWS's specification, which itself
        // reproduces AWS's published example (see sigv4_verify).
        let s = store("http://127.0.0.1:9000/");
        let d = Digest::from_hex(&"cd".repeat(32)).unwrap();
        for ttl in [300, 3600] {
            let url = s
                .presigner(&blob_object(&d))
                .url(Duration::from_secs(ttl))
                .await
                .unwrap();
            let v = super::super::sigv4_verify::verify(
                "GET",
                &url,
                "127.0.0.1:9000",
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            )
            .unwrap_or_else(|why| panic!("{url}: {why}"));
            assert_eq!(v.expires, ttl);
            assert_eq!((v.region.as_str(), v.service.as_str()), ("eu-west-1", "s3"));
            assert!(super::super::sigv4_verify::verify(
                "GET",
                &url,
                "127.0.0.1:9000",
                "another secret"
            )
            .is_err());
        }
    }

    #[tokio::test]
    async fn presigned_urls_are_path_style_sigv4_on_the_endpoint() {
        let s = store("http://127.0.0.1:9000/");
        assert_eq!(s.target, "http://127.0.0.1:9000");
        assert_eq!(s.part, 5 << 20);
        let d = Digest::from_hex(&"ab".repeat(32)).unwrap();
        let p = s.presigner(&blob_object(&d));
        assert_eq!(p.object(), format!("blobs/sha256/{}", d.hex()));
        let url = p.url(Duration::from_secs(300)).await.unwrap();
        assert!(
            url.starts_with(&format!(
                "http://127.0.0.1:9000/layers/blobs/sha256/{}?",
                d.hex()
            )),
            "{url}"
        );
        for part in [
            "X-Amz-Algorithm=AWS4-HMAC-SHA256",
            "X-Amz-Credential=AKIDEXAMPLE%2F",
            "%2Feu-west-1%2Fs3%2Faws4_request",
            "X-Amz-Expires=300",
            "X-Amz-SignedHeaders=host",
            "X-Amz-Signature=",
        ] {
            assert!(url.contains(part), "{part} missing from {url}");
        }
    }

    #[test]
    fn without_an_endpoint_requests_go_to_aws() {
        let s = store("");
        assert_eq!(s.target, "AWS region eu-west-1");
    }

    /// A moto S3 server on 127.0.0.1 with the bucket `layers`, killed on drop;
    /// None (the test skips) when moto is not installed.
    struct Moto {
        child: std::process::Child,
        endpoint: String,
    }

    impl Drop for Moto {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    async fn start_moto() -> Option<Moto> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .ok()?
            .port();
        let child = match std::process::Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("SKIP: moto_server: {e} (pip install \"moto[server]\")");
                return None;
            }
        };
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        for _ in 0..200 {
            if http
                .get(format!("{}/", moto.endpoint))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                let made = http
                    .put(format!("{}/layers", moto.endpoint))
                    .send()
                    .await
                    .unwrap();
                assert!(made.status().is_success(), "{made:?}");
                return Some(moto);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("moto_server did not answer on port {port}");
    }

    async fn moto_get(moto: &Moto, query: &str) -> String {
        reqwest::get(format!("{}/layers?{query}", moto.endpoint))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    fn random_bytes(n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        rand::fill(&mut v[..]);
        v
    }

    #[tokio::test]
    async fn round_trip_against_moto() {
        let Some(moto) = start_moto().await else {
            return;
        };
        let s = store(&moto.endpoint);
        s.check_bucket().await.unwrap();
        let missing = {
            let mut settings = settings("missing", &moto.endpoint, "us-east-1");
            settings.upload_chunk_mib = 1;
            let builder = AmazonS3Builder::new()
                .with_access_key_id("a")
                .with_secret_access_key("b");
            S3Storage::build(&settings, builder, &HashMap::new())
                .unwrap()
                .check_bucket()
                .await
                .unwrap_err()
                .to_string()
        };
        assert!(
            missing.contains("\"missing\"") && missing.contains("does not exist"),
            "{missing}"
        );
        let staged = || async {
            let listed = moto_get(&moto, "list-type=2&prefix=staging/").await;
            listed.matches("<Key>").count()
        };
        let open_uploads = || async {
            moto_get(&moto, "uploads")
                .await
                .matches("<UploadId>")
                .count()
        };

        // A layer of several parts streams through staging to its digest name.
        let chunk = s.chunk();
        let big = random_bytes(2 * s.part + 12345);
        let d = Digest::of(&big);
        assert_eq!(s.blob_size(&d).await.unwrap(), None);
        let put = s
            .put_blob_stream(feed(big.clone(), chunk, true), "application/octet-stream")
            .await
            .unwrap();
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
        assert_eq!((staged().await, open_uploads().await), (0, 0));

        // Streamed again (another build racing this one): not published twice.
        let again = s
            .put_blob_stream(feed(big.clone(), chunk, true), "application/octet-stream")
            .await
            .unwrap();
        assert!(!again.uploaded);
        assert_eq!(s.uploads(), 1);
        assert_eq!((staged().await, open_uploads().await), (0, 0));

        // The publishing copy itself refuses to replace a blob.
        let other = ObjectPath::from("staging/x");
        s.store
            .put(&other, PutPayload::from_static(b"x"))
            .await
            .unwrap();
        assert!(matches!(
            s.store
                .copy_if_not_exists(&other, &ObjectPath::from(blob_object(&d).as_str()))
                .await,
            Err(object_store::Error::AlreadyExists { .. })
        ));
        s.delete_object("staging/x").await.unwrap();

        // A packer that fails leaves nothing behind: no blob, no staging object,
        // no open multipart upload.
        let other = random_bytes(2 * s.part);
        assert!(matches!(
            s.put_blob_stream(
                feed(other.clone(), chunk, false),
                "application/octet-stream"
            )
            .await,
            Err(StorageError::Abandoned)
        ));
        assert_eq!(s.blob_size(&Digest::of(&other)).await.unwrap(), None);
        assert_eq!((staged().await, open_uploads().await), (0, 0));

        // A layer within one chunk goes straight to its digest name.
        let small = random_bytes(300 << 10);
        let ds = Digest::of(&small);
        let put = s
            .put_blob_stream(feed(small.clone(), chunk, true), "application/octet-stream")
            .await
            .unwrap();
        assert!(put.uploaded);
        assert_eq!(s.blob_size(&ds).await.unwrap(), Some(300 << 10));
        assert_eq!(s.uploads(), 2);
        assert!(!s
            .put_blob_bytes(&ds, Bytes::from(small), "application/octet-stream")
            .await
            .unwrap());

        // Staging objects of a dead process on this host are swept at start-up;
        // a live replica's are not.
        let (dead, live) = staging::dead_and_live_objects();
        for o in [&dead, &live] {
            s.write_object(o, Bytes::from_static(b"partial"))
                .await
                .unwrap();
        }
        s.sweep_leftovers().await;
        assert_eq!(s.read_object(&dead).await.unwrap(), None);
        assert!(s.read_object(&live).await.unwrap().is_some());

        // Records are replaced; leases are created only once.
        let record = "records/images/abc.json";
        assert_eq!(s.read_object(record).await.unwrap(), None);
        s.write_object(record, Bytes::from_static(b"{\"v\":1}"))
            .await
            .unwrap();
        s.write_object(record, Bytes::from_static(b"{\"v\":2}"))
            .await
            .unwrap();
        assert_eq!(
            s.read_object(record).await.unwrap(),
            Some(Bytes::from_static(b"{\"v\":2}"))
        );
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
        assert_eq!(s.uploads(), 2, "records and leases are not blob uploads");

        let storage = super::super::Storage::S3(s);
        let ttl = Duration::from_secs(60);
        assert!(storage.acquire_lease("build", ttl).await.unwrap());
        assert!(!storage.acquire_lease("build", ttl).await.unwrap());
        storage.release_lease("build").await.unwrap();
        assert!(storage.acquire_lease("build", ttl).await.unwrap());
        // A presigned URL of a stored blob serves it.
        let super::super::BlobLocation::Presigned(p) = storage.locate(&ds) else {
            panic!("not a presigned location");
        };
        let url = p.url(Duration::from_secs(60)).await.unwrap();
        let got = reqwest::get(&url).await.unwrap();
        assert!(got.status().is_success(), "{got:?}");
        assert_eq!(got.bytes().await.unwrap().len(), 300 << 10);
    }

    #[tokio::test]
    async fn blobs_are_marked_used_with_marks_against_moto() {
        let Some(moto) = start_moto().await else {
            return;
        };
        let s = super::super::Storage::S3(store(&moto.endpoint));
        super::super::check_blob_use(&s).await;
        // The deleted blob's mark went with it; the other's was never written.
        let marks = moto_get(&moto, "list-type=2&prefix=uses/").await;
        assert_eq!(marks.matches("<Key>").count(), 0, "{marks}");
    }
}
