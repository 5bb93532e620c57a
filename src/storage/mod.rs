//! Where blobs (layers, configs, manifests) and cache records live: a local directory
//! or a Google Cloud Storage bucket, behind one small interface that knows nothing of
//! HTTP. Objects appear under their final name only when complete.
//!
//! Object names: blobs at `blobs/sha256/<hex>`, records at `records/<kind>/<key>.json`.

pub mod filesystem;
pub mod gcs;

use crate::reference::Digest;
use bytes::Bytes;
use std::path::{Path, PathBuf};

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
}

impl RecordKind {
    fn dir(self) -> &'static str {
        match self {
            RecordKind::Layer => "layers",
            RecordKind::Image => "images",
            RecordKind::Pinned => "pinned",
        }
    }
}

pub fn blob_object(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
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
}

pub enum Storage {
    Filesystem(filesystem::FsStorage),
    Gcs(gcs::GcsStorage),
}

impl Storage {
    pub fn name(&self) -> &'static str {
        match self {
            Storage::Filesystem(_) => "filesystem",
            Storage::Gcs(_) => "gcs",
        }
    }

    /// The directory where layers are written before they are stored. For the
    /// filesystem backend it is on the same file system, so storing is a rename.
    pub fn spool_dir(&self) -> &Path {
        match self {
            Storage::Filesystem(s) => s.spool_dir(),
            Storage::Gcs(s) => s.spool_dir(),
        }
    }

    /// The blob's size, or None when it is not stored.
    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        match self {
            Storage::Filesystem(s) => s.blob_size(digest).await,
            Storage::Gcs(s) => s.blob_size(digest).await,
        }
    }

    /// Stores a spooled file under its digest (the caller computed the digest while
    /// writing it) and removes the file. Returns false when the blob was already
    /// there, in which case nothing is uploaded.
    pub async fn put_blob_file(
        &self,
        digest: &Digest,
        file: &Path,
        media_type: &str,
    ) -> Result<bool, StorageError> {
        match self {
            Storage::Filesystem(s) => s.put_blob_file(digest, file).await,
            Storage::Gcs(s) => s.put_blob_file(digest, file, media_type).await,
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
        }
    }

    /// Reads a small blob (a manifest) whole.
    pub async fn read_blob(&self, digest: &Digest) -> Result<Option<Bytes>, StorageError> {
        match self {
            Storage::Filesystem(s) => s.read_object(&blob_object(digest)).await,
            Storage::Gcs(s) => s.read_object(&blob_object(digest)).await,
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
        }
    }

    pub fn locate(&self, digest: &Digest) -> BlobLocation {
        match self {
            Storage::Filesystem(s) => BlobLocation::File(s.object_path(&blob_object(digest))),
            Storage::Gcs(s) => BlobLocation::Object {
                bucket: s.bucket().to_string(),
                object: blob_object(digest),
            },
        }
    }
}
