//! Where blobs (layers, configs, manifests) and cache records live: a local directory,
//! a Google Cloud Storage bucket or an S3 bucket, behind one small interface that knows nothing of
//! HTTP. Objects appear under their final name only when complete.
//!
//! Object names: blobs at `blobs/sha256/<hex>`, records at `records/<kind>/<key>.json`,
//! and on S3, where an object's time cannot change without rewriting it, the marks of
//! a blob's last use at `uses/sha256/<hex>`.

pub mod crc32c;
pub mod filesystem;
pub mod gcs;
#[cfg(test)]
pub mod memory;
pub mod s3;
#[cfg(test)]
mod sigv4_verify;
mod staging;
pub mod stream;

use crate::reference::Digest;
use bytes::Bytes;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use stream::BlobReceiver;

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether the lease holder is a process on this host that no longer runs (killed
/// mid-build and restarted, say); its lease need not be waited out.
pub(crate) fn holder_is_dead(holder: &str) -> bool {
    let Some((host, pid)) = holder.rsplit_once(':') else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    host == hostname() && pid != std::process::id() && !process_runs(pid)
}

/// Whether process `pid` runs. A zombie (killed, not yet reaped by its parent)
/// does not: it writes nothing more, and its parent may be slow to reap it.
fn process_runs(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which may hold parentheses itself.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X'))
}

/// This process, as named in leases: `host:pid`.
pub(crate) fn lease_holder() -> String {
    format!("{}:{}", hostname(), std::process::id())
}

/// This process in a file or object name (spool directories, staging objects):
/// `host-pid`, since `:` is awkward in paths.
pub(crate) fn holder_tag() -> String {
    lease_holder().replace(':', "-")
}

/// Whether a name made by [`holder_tag`] is that of a dead process on this host.
pub(crate) fn tag_is_dead(tag: &str) -> bool {
    tag.rsplit_once('-')
        .is_some_and(|(host, pid)| holder_is_dead(&format!("{host}:{pid}")))
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("{op} {object}: {message}")]
    Io {
        op: &'static str,
        object: String,
        message: String,
    },
    #[error("{0}")]
    Config(String),
    /// The packer stopped before the blob was complete; it reports why.
    #[error("the layer being stored was not completed")]
    Abandoned,
}

/// What storing a blob did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Put {
    /// False when the blob was already stored.
    pub uploaded: bool,
    /// Bytes sent to storage.
    pub bytes: u64,
}

impl StorageError {
    pub fn io(op: &'static str, object: impl Into<String>, e: impl std::fmt::Display) -> Self {
        StorageError::Io {
            op,
            object: object.into(),
            message: e.to_string(),
        }
    }
}

/// Kinds of cache record; each is a directory of small JSON documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// A built layer: store paths → digest, diff_id, size.
    Layer,
    /// An assembled image, keyed by its top-level store paths.
    Image,
    /// A manifest for a pinned source, keyed by the request.
    Pinned,
    /// The artifact manifests (SBOMs) whose subject is a manifest, keyed by its hex.
    Referrers,
}

impl RecordKind {
    pub const ALL: [RecordKind; 4] = [
        RecordKind::Layer,
        RecordKind::Image,
        RecordKind::Pinned,
        RecordKind::Referrers,
    ];

    fn dir(self) -> &'static str {
        match self {
            RecordKind::Layer => "layers",
            RecordKind::Image => "images",
            RecordKind::Pinned => "pinned",
            RecordKind::Referrers => "referrers",
        }
    }
}

pub const BLOB_PREFIX: &str = "blobs/sha256/";
const USE_PREFIX: &str = "uses/sha256/";

pub fn blob_object(digest: &Digest) -> String {
    format!("{BLOB_PREFIX}{}", digest.hex())
}

fn use_object(digest: &Digest) -> String {
    format!("{USE_PREFIX}{}", digest.hex())
}

pub fn records_prefix(kind: RecordKind) -> String {
    format!("records/{}/", kind.dir())
}

/// An object as listed: its name, size and last use (unix seconds). The last use is
/// when it was written, or later marked as used: a file's mtime, a GCS object's
/// `customTime`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub name: String,
    pub size: u64,
    pub used: u64,
}

/// A stored blob and when it was last used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobUse {
    pub digest: Digest,
    pub size: u64,
    pub used: u64,
}

pub fn record_object(kind: RecordKind, key: &str) -> String {
    format!("records/{}/{key}.json", kind.dir())
}

/// How a client gets a blob's bytes.
#[derive(Debug, Clone)]
pub enum BlobLocation {
    /// A local file the server streams itself.
    File(PathBuf),
    /// An object in the bucket, to be redirected to.
    Object { bucket: String, object: String },
    /// An object in an S3 bucket, to be redirected to by a presigned URL.
    Presigned(s3::Presigner),
}

pub enum Storage {
    Filesystem(filesystem::FsStorage),
    Gcs(gcs::GcsStorage),
    S3(s3::S3Storage),
    /// Objects in memory, for unit tests.
    #[cfg(test)]
    Memory(memory::MemStorage),
}

impl Storage {
    pub fn name(&self) -> &'static str {
        match self {
            Storage::Filesystem(_) => "filesystem",
            Storage::Gcs(_) => "gcs",
            Storage::S3(_) => "s3",
            #[cfg(test)]
            Storage::Memory(_) => "memory",
        }
    }

    /// Bytes per chunk when a layer streams in while it is packed: a chunk costs
    /// a round trip to a bucket, nothing on a local disk.
    pub fn stream_chunk(&self) -> usize {
        match self {
            Storage::Filesystem(_) => filesystem::STREAM_CHUNK,
            Storage::Gcs(s) => s.piece(),
            Storage::S3(s) => s.chunk(),
            #[cfg(test)]
            Storage::Memory(_) => memory::STREAM_CHUNK,
        }
    }

    /// The blob's size, or None when it is not stored.
    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        match self {
            Storage::Filesystem(s) => s.blob_size(digest).await,
            Storage::Gcs(s) => s.blob_size(digest).await,
            Storage::S3(s) => s.blob_size(digest).await,
            #[cfg(test)]
            Storage::Memory(s) => s.blob_size(digest).await,
        }
    }

    /// Stores a blob that arrives while it is being packed; the packer's last piece
    /// names its digest. Nothing appears under that digest unless the blob is
    /// complete; a blob already there is not stored again.
    pub async fn put_blob_stream(
        &self,
        pieces: BlobReceiver,
        media_type: &str,
    ) -> Result<Put, StorageError> {
        match self {
            Storage::Filesystem(s) => s.put_blob_stream(pieces).await,
            Storage::Gcs(s) => s.put_blob_stream(pieces, media_type).await,
            Storage::S3(s) => s.put_blob_stream(pieces, media_type).await,
            #[cfg(test)]
            Storage::Memory(s) => s.put_blob_stream(pieces).await,
        }
    }

    /// Stores small bytes (configs, manifests) under their digest.
    pub async fn put_blob_bytes(
        &self,
        digest: &Digest,
        bytes: Bytes,
        media_type: &str,
    ) -> Result<bool, StorageError> {
        match self {
            Storage::Filesystem(s) => s.put_blob_bytes(digest, bytes).await,
            Storage::Gcs(s) => s.put_blob_bytes(digest, bytes, media_type).await,
            Storage::S3(s) => s.put_blob_bytes(digest, bytes, media_type).await,
            #[cfg(test)]
            Storage::Memory(s) => s.put_blob_bytes(digest, bytes).await,
        }
    }

    /// Reads a small blob (a manifest) whole.
    pub async fn read_blob(&self, digest: &Digest) -> Result<Option<Bytes>, StorageError> {
        match self {
            Storage::Filesystem(s) => s.read_object(&blob_object(digest)).await,
            Storage::Gcs(s) => s.read_object(&blob_object(digest)).await,
            Storage::S3(s) => s.read_object(&blob_object(digest)).await,
            #[cfg(test)]
            Storage::Memory(s) => s.read_object(&blob_object(digest)).await,
        }
    }

    pub async fn read_record(
        &self,
        kind: RecordKind,
        key: &str,
    ) -> Result<Option<Bytes>, StorageError> {
        let object = record_object(kind, key);
        match self {
            Storage::Filesystem(s) => s.read_object(&object).await,
            Storage::Gcs(s) => s.read_object(&object).await,
            Storage::S3(s) => s.read_object(&object).await,
            #[cfg(test)]
            Storage::Memory(s) => s.read_object(&object).await,
        }
    }

    pub async fn write_record(
        &self,
        kind: RecordKind,
        key: &str,
        bytes: Bytes,
    ) -> Result<(), StorageError> {
        let object = record_object(kind, key);
        match self {
            Storage::Filesystem(s) => s.write_object(&object, bytes).await,
            Storage::Gcs(s) => s.write_object(&object, bytes, "application/json").await,
            Storage::S3(s) => s.write_object(&object, bytes).await,
            #[cfg(test)]
            Storage::Memory(s) => s.write_object(&object, bytes).await,
        }
    }

    /// Creates an object only when no object of that name exists; false otherwise.
    pub async fn create_object_if_absent(
        &self,
        object: &str,
        bytes: Bytes,
    ) -> Result<bool, StorageError> {
        match self {
            Storage::Filesystem(s) => s.create_object_if_absent(object, bytes).await,
            Storage::Gcs(s) => s.create_object_if_absent(object, bytes).await,
            Storage::S3(s) => s.create_object_if_absent(object, bytes).await,
            #[cfg(test)]
            Storage::Memory(s) => s.create_object_if_absent(object, bytes).await,
        }
    }

    pub async fn read_object(&self, object: &str) -> Result<Option<Bytes>, StorageError> {
        match self {
            Storage::Filesystem(s) => s.read_object(object).await,
            Storage::Gcs(s) => s.read_object(object).await,
            Storage::S3(s) => s.read_object(object).await,
            #[cfg(test)]
            Storage::Memory(s) => s.read_object(object).await,
        }
    }

    /// Deletes an object; deleting a missing object is not an error.
    pub async fn delete_object(&self, object: &str) -> Result<(), StorageError> {
        match self {
            Storage::Filesystem(s) => s.delete_object(object).await,
            Storage::Gcs(s) => s.delete_object(object).await,
            Storage::S3(s) => s.delete_object(object).await,
            #[cfg(test)]
            Storage::Memory(s) => s.delete_object(object).await,
        }
    }

    /// Takes the lease `name` for `ttl` unless another holder's lease is still
    /// valid. Replicas sharing the storage use it so that only one of them builds a
    /// given image; a holder that dies loses its lease when it expires.
    pub async fn acquire_lease(&self, name: &str, ttl: Duration) -> Result<bool, StorageError> {
        let object = format!("leases/{name}.json");
        let now = unix_now();
        let lease = Bytes::from(
            serde_json::json!({
                "expires": now + ttl.as_secs(),
                "holder": lease_holder(),
            })
            .to_string(),
        );
        if self.create_object_if_absent(&object, lease.clone()).await? {
            self.held_leases()
                .lock()
                .expect("leases lock")
                .insert(name.to_string());
            return Ok(true);
        }
        let holder = lease_holder();
        let takeover = match self.read_object(&object).await? {
            None => true,
            Some(bytes) => match serde_json::from_slice::<serde_json::Value>(&bytes) {
                // A lease being written right now reads as empty: still valid.
                Err(_) => false,
                Ok(v) => {
                    let expired = v
                        .get("expires")
                        .and_then(|e| e.as_u64())
                        .is_some_and(|expires| expires <= now);
                    // Our own lease that no build of ours holds is left over from a
                    // release that failed (storage was down): waiting for it would
                    // wait for ourselves.
                    let lease_holder = v.get("holder").and_then(|h| h.as_str()).unwrap_or("");
                    let stale_own = lease_holder == holder
                        && !self
                            .held_leases()
                            .lock()
                            .expect("leases lock")
                            .contains(name);
                    expired || stale_own || holder_is_dead(lease_holder)
                }
            },
        };
        if !takeover {
            return Ok(false);
        }
        log::info!("taking over lease {name}");
        self.delete_object(&object).await?;
        let taken = self.create_object_if_absent(&object, lease).await?;
        if taken {
            self.held_leases()
                .lock()
                .expect("leases lock")
                .insert(name.to_string());
        }
        Ok(taken)
    }

    pub async fn release_lease(&self, name: &str) -> Result<(), StorageError> {
        self.held_leases().lock().expect("leases lock").remove(name);
        self.delete_object(&format!("leases/{name}.json")).await
    }

    fn held_leases(&self) -> &std::sync::Mutex<std::collections::HashSet<String>> {
        match self {
            Storage::Filesystem(s) => &s.held_leases,
            Storage::Gcs(s) => &s.held_leases,
            Storage::S3(s) => &s.held_leases,
            #[cfg(test)]
            Storage::Memory(s) => &s.held_leases,
        }
    }

    /// Every object whose name starts with `prefix`.
    pub async fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        match self {
            Storage::Filesystem(s) => s.list_objects(prefix).await,
            Storage::Gcs(s) => s.list_objects(prefix).await,
            Storage::S3(s) => s.list_objects(prefix).await,
            #[cfg(test)]
            Storage::Memory(s) => s.list_objects(prefix).await,
        }
    }

    /// One object's size and last use; None when it is not stored.
    pub async fn object_info(&self, object: &str) -> Result<Option<ObjectInfo>, StorageError> {
        match self {
            Storage::Filesystem(s) => s.object_info(object).await,
            Storage::Gcs(s) => s.object_info(object).await,
            Storage::S3(s) => s.object_info(object).await,
            #[cfg(test)]
            Storage::Memory(s) => s.object_info(object).await,
        }
    }

    /// When the blob was last used; None when it is not stored.
    pub async fn blob_last_used(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        let Some(blob) = self.object_info(&blob_object(digest)).await? else {
            return Ok(None);
        };
        let mark = match self {
            Storage::S3(_) => self.object_info(&use_object(digest)).await?,
            _ => None,
        };
        Ok(Some(blob.used.max(mark.map_or(0, |m| m.used))))
    }

    /// Marks the blob as used now. Returns its previous last use, or None when it
    /// is not stored (any more).
    pub async fn touch_blob(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        let Some(previous) = self.blob_last_used(digest).await? else {
            return Ok(None);
        };
        let object = blob_object(digest);
        let touched = match self {
            Storage::Filesystem(s) => s.touch_object(&object).await?,
            Storage::Gcs(s) => s.touch_object(&object).await?,
            // A mark of its own: an S3 object's time changes only with its bytes.
            Storage::S3(s) => {
                s.write_object(&use_object(digest), Bytes::new()).await?;
                true
            }
            #[cfg(test)]
            Storage::Memory(s) => s.touch_object(&object).await?,
        };
        Ok(touched.then_some(previous))
    }

    /// Every stored blob with its last use.
    pub async fn list_blobs(&self) -> Result<Vec<BlobUse>, StorageError> {
        Ok(self.blob_listing().await?.0)
    }

    /// Every stored blob with its last use, and the marks of use whose blob is
    /// gone (S3 only: a mark that raced a deletion), from one listing of each.
    pub async fn blob_listing(&self) -> Result<(Vec<BlobUse>, Vec<ObjectInfo>), StorageError> {
        let mut marks: std::collections::HashMap<String, ObjectInfo> = match self {
            Storage::S3(_) => self
                .list_objects(USE_PREFIX)
                .await?
                .into_iter()
                .filter_map(|o| Some((o.name.strip_prefix(USE_PREFIX)?.to_string(), o)))
                .collect(),
            _ => Default::default(),
        };
        let blobs = self
            .list_objects(BLOB_PREFIX)
            .await?
            .into_iter()
            .filter_map(|o| {
                let hex = o.name.strip_prefix(BLOB_PREFIX)?;
                let digest = Digest::parse(&format!("sha256:{hex}")).ok()?;
                let used = o.used.max(marks.remove(hex).map_or(0, |m| m.used));
                Some(BlobUse {
                    digest,
                    size: o.size,
                    used,
                })
            })
            .collect();
        Ok((blobs, marks.into_values().collect()))
    }

    /// Deletes a blob and its mark of use.
    pub async fn delete_blob(&self, digest: &Digest) -> Result<(), StorageError> {
        self.delete_object(&blob_object(digest)).await?;
        if matches!(self, Storage::S3(_)) {
            self.delete_object(&use_object(digest)).await?;
        }
        Ok(())
    }

    pub fn locate(&self, digest: &Digest) -> BlobLocation {
        match self {
            Storage::Filesystem(s) => BlobLocation::File(s.object_path(&blob_object(digest))),
            Storage::Gcs(s) => BlobLocation::Object {
                bucket: s.bucket().to_string(),
                object: blob_object(digest),
            },
            Storage::S3(s) => BlobLocation::Presigned(s.presigner(&blob_object(digest))),
            // Nothing serves this bucket: a test that needs a blob's bytes reads them.
            #[cfg(test)]
            Storage::Memory(_) => BlobLocation::Object {
                bucket: memory::BUCKET.to_string(),
                object: blob_object(digest),
            },
        }
    }
}

/// What every backend must do for blob retention, run by each backend's tests
/// against its real server.
#[cfg(test)]
pub(crate) async fn check_blob_use(s: &Storage) {
    let now = unix_now();
    let small = Bytes::from_static(b"{\"a\":\"small blob\"}");
    let d = Digest::of(&small);
    assert!(s
        .put_blob_bytes(&d, small.clone(), "application/json")
        .await
        .unwrap());
    let (pieces_digest, big) = {
        let big: Vec<u8> = (0..2 * s.stream_chunk() + 17)
            .map(|i| (i % 253) as u8)
            .collect();
        (Digest::of(&big), big)
    };
    let put = s
        .put_blob_stream(
            stream::feed(big.clone(), s.stream_chunk(), true),
            "application/octet-stream",
        )
        .await
        .unwrap();
    assert!(put.uploaded);
    s.write_record(RecordKind::Layer, "k", Bytes::from_static(b"{}"))
        .await
        .unwrap();

    let mut listed = s.list_blobs().await.unwrap();
    listed.sort_by_key(|b| b.size);
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(
        (&listed[0].digest, listed[0].size),
        (&d, small.len() as u64)
    );
    assert_eq!(
        (&listed[1].digest, listed[1].size),
        (&pieces_digest, big.len() as u64)
    );
    for b in &listed {
        assert!(
            b.used + 5 >= now && b.used <= unix_now() + 5,
            "{b:?} at {now}"
        );
    }
    let records = s
        .list_objects(&records_prefix(RecordKind::Layer))
        .await
        .unwrap();
    assert_eq!(
        records.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(),
        vec![record_object(RecordKind::Layer, "k")]
    );
    assert_eq!(
        s.list_objects(&records_prefix(RecordKind::Image))
            .await
            .unwrap(),
        vec![]
    );

    // Marked used later, the blob reports the later time; the previous is returned.
    let before = s.blob_last_used(&d).await.unwrap().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    assert_eq!(s.touch_blob(&d).await.unwrap(), Some(before));
    let after = s.blob_last_used(&d).await.unwrap().unwrap();
    assert!(after >= before + 2, "{before} -> {after}");
    let relisted = s.list_blobs().await.unwrap();
    let small_listed = relisted.iter().find(|b| b.digest == d).unwrap();
    assert_eq!(small_listed.used, after);

    s.delete_blob(&d).await.unwrap();
    assert_eq!(s.blob_size(&d).await.unwrap(), None);
    assert_eq!(s.touch_blob(&d).await.unwrap(), None);
    assert_eq!(s.blob_last_used(&d).await.unwrap(), None);
    assert!(s.blob_listing().await.unwrap().1.is_empty());
    let left: Vec<Digest> = s
        .list_blobs()
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.digest)
        .collect();
    assert_eq!(left, vec![pieces_digest]);
}

#[cfg(test)]
mod liveness_tests {
    use super::process_runs;
    use std::time::{Duration, Instant};

    #[test]
    fn a_zombie_does_not_run() {
        assert!(process_runs(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Exited but not reaped: a zombie until `wait`.
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_runs(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!process_runs(pid), "pid {pid} still runs after exiting");
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "reaped too early"
        );
        child.wait().unwrap();
        assert!(!process_runs(pid));
    }
}
