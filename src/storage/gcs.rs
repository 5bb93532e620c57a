//! The Google Cloud Storage backend (being written; see the GCS issue).

use super::StorageError;
use crate::config::StorageSettings;
use crate::reference::Digest;
use bytes::Bytes;
use std::path::{Path, PathBuf};

pub struct GcsStorage {
    bucket: String,
    spool: PathBuf,
}

impl GcsStorage {
    pub async fn open(settings: &StorageSettings) -> Result<Self, StorageError> {
        let _ = (&settings.bucket, PathBuf::new());
        Err(StorageError::Config(
            "storage.backend: the gcs backend is not available in this build".into(),
        ))
    }
    pub fn spool_dir(&self) -> &Path {
        &self.spool
    }
    pub fn bucket(&self) -> &str {
        &self.bucket
    }
    pub async fn blob_size(&self, _digest: &Digest) -> Result<Option<u64>, StorageError> {
        unreachable!()
    }
    pub async fn put_blob_file(
        &self,
        _d: &Digest,
        _f: &Path,
        _m: &str,
    ) -> Result<bool, StorageError> {
        unreachable!()
    }
    pub async fn put_blob_bytes(
        &self,
        _d: &Digest,
        _b: Bytes,
        _m: &str,
    ) -> Result<bool, StorageError> {
        unreachable!()
    }
    pub async fn read_object(&self, _o: &str) -> Result<Option<Bytes>, StorageError> {
        unreachable!()
    }
    pub async fn write_object(&self, _o: &str, _b: Bytes, _c: &str) -> Result<(), StorageError> {
        unreachable!()
    }
    pub async fn create_object_if_absent(&self, _o: &str, _b: Bytes) -> Result<bool, StorageError> {
        unreachable!()
    }
    pub async fn delete_object(&self, _o: &str) -> Result<(), StorageError> {
        unreachable!()
    }
}
