//! UploadActor: puts blobs into storage, skipping blobs that are already there, with
//! at most `concurrency` uploads at once so a large image cannot saturate the link.

use crate::reference::Digest;
pub use crate::storage::Put;
use crate::storage::{stream::BlobReceiver, Storage, StorageError};
use actix::prelude::*;
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Store a layer that streams in while a worker packs it.
#[derive(Message)]
#[rtype(result = "Result<Put, StorageError>")]
pub struct PutBlobStream {
    pub pieces: BlobReceiver,
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

impl Handler<PutBlobStream> for UploadActor {
    type Result = ResponseFuture<Result<Put, StorageError>>;

    fn handle(&mut self, mut msg: PutBlobStream, _: &mut Self::Context) -> Self::Result {
        let storage = self.storage.clone();
        let permits = self.permits.clone();
        Box::pin(async move {
            // The permit is taken once the packer runs: one held while the packer
            // waits for a worker could block the packers that other permits wait on.
            msg.pieces.started().await;
            let _permit = permits
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            storage.put_blob_stream(msg.pieces, msg.media_type).await
        })
    }
}

impl Handler<PutBlobBytes> for UploadActor {
    type Result = ResponseFuture<Result<Put, StorageError>>;

    fn handle(&mut self, msg: PutBlobBytes, _: &mut Self::Context) -> Self::Result {
        let storage = self.storage.clone();
        let permits = self.permits.clone();
        let size = msg.bytes.len() as u64;
        Box::pin(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            let uploaded = storage
                .put_blob_bytes(&msg.digest, msg.bytes, msg.media_type)
                .await?;
            Ok(Put {
                uploaded,
                bytes: if uploaded { size } else { 0 },
            })
        })
    }
}
