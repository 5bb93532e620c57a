//! UploadActor: puts blobs into storage, skipping blobs that are already there, with
//! at most `concurrency` uploads at once so a large image cannot saturate the link.

use crate::reference::Digest;
use crate::storage::{Storage, StorageError};
use actix::prelude::*;
use bytes::Bytes;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// What a put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Put {
    /// False when the blob was already stored and nothing was sent.
    pub uploaded: bool,
    pub bytes: u64,
}

/// Store a spooled layer file under its digest; the file is consumed.
#[derive(Message)]
#[rtype(result = "Result<Put, StorageError>")]
pub struct PutBlobFile {
    pub digest: Digest,
    pub file: PathBuf,
    pub size: u64,
    pub media_type: &'static str,
}

/// Store small bytes (a config or manifest) under their digest.
#[derive(Message)]
#[rtype(result = "Result<Put, StorageError>")]
pub struct PutBlobBytes {
    pub digest: Digest,
    pub bytes: Bytes,
    pub media_type: &'static str,
}

pub struct UploadActor {
    storage: Arc<Storage>,
    permits: Arc<Semaphore>,
}

impl UploadActor {
    pub fn new(storage: Arc<Storage>, concurrency: usize) -> Self {
        UploadActor {
            storage,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }
}

impl Actor for UploadActor {
    type Context = Context<Self>;
}

impl Handler<PutBlobFile> for UploadActor {
    type Result = ResponseFuture<Result<Put, StorageError>>;

    fn handle(&mut self, msg: PutBlobFile, _: &mut Self::Context) -> Self::Result {
        let storage = self.storage.clone();
        Box::pin(limited(self.permits.clone(), msg.size, async move {
            storage
                .put_blob_file(&msg.digest, &msg.file, msg.media_type)
                .await
        }))
    }
}

impl Handler<PutBlobBytes> for UploadActor {
    type Result = ResponseFuture<Result<Put, StorageError>>;

    fn handle(&mut self, msg: PutBlobBytes, _: &mut Self::Context) -> Self::Result {
        let storage = self.storage.clone();
        let size = msg.bytes.len() as u64;
        Box::pin(limited(self.permits.clone(), size, async move {
            storage
                .put_blob_bytes(&msg.digest, msg.bytes, msg.media_type)
                .await
        }))
    }
}

/// Runs one put under the concurrency limit and reports what it sent.
async fn limited(
    permits: Arc<Semaphore>,
    size: u64,
    put: impl std::future::Future<Output = Result<bool, StorageError>>,
) -> Result<Put, StorageError> {
    let _permit = permits
        .acquire_owned()
        .await
        .expect("semaphore never closed");
    let uploaded = put.await?;
    Ok(Put {
        uploaded,
        bytes: if uploaded { size } else { 0 },
    })
}
