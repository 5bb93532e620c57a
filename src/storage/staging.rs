//! What the bucket backends (GCS, S3) share about streaming a layer: a layer's
//! digest, and so its name, is known only when packing ends, so one larger than a
//! chunk is uploaded under `staging/` first and published under its digest name
//! afterwards; one that fits in a chunk goes straight to its digest name. Staging
//! objects are named after the process that wrote them, so that a restarted
//! process can remove what a dead one left. How an upload is sent, checked and
//! published is the backend's own.

use super::stream::{BlobReceiver, Piece};
use super::{ObjectInfo, Put, StorageError};
use crate::reference::Digest;
use bytes::Bytes;
use std::time::Duration;

/// Where layers are uploaded before their digest is known.
pub(super) const PREFIX: &str = "staging/";
/// A staging object lives from the end of its upload to the blob's publication, a
/// few seconds; one this old was left by a process that died in between.
pub(super) const MAX_AGE: Duration = Duration::from_secs(3600);

/// `staging/<host>-<pid>-<random>`: the holder part lets a restarted process on the
/// same host remove what its dead predecessor left at once.
pub(super) fn object() -> String {
    format!(
        "{PREFIX}{}-{:016x}",
        super::holder_tag(),
        rand::random::<u64>()
    )
}

/// Whether a staging object was named by a process on this host that is gone.
pub(super) fn by_dead_process(object: &str) -> bool {
    object
        .strip_prefix(PREFIX)
        .and_then(|name| name.rsplit_once('-'))
        .is_some_and(|(tag, _random)| super::tag_is_dead(tag))
}

/// Whether a start-up sweep removes a staging object `age_secs` old: one of a dead
/// process on this host, or any older than [`MAX_AGE`].
pub(super) fn is_leftover(object: &str, age_secs: i64) -> bool {
    by_dead_process(object) || age_secs > MAX_AGE.as_secs() as i64
}

/// What a bucket backend does for [`put_stream`].
pub(super) trait StagingBucket {
    /// Stores a blob known whole under its digest name; whether this call created it.
    async fn put_whole(
        &self,
        digest: &Digest,
        bytes: Bytes,
        media_type: &str,
    ) -> Result<bool, StorageError>;

    /// Uploads `first` and the pieces after it to `staging`, checks what arrived
    /// and publishes it under its digest name.
    async fn upload_staged(
        &self,
        staging: &str,
        first: Bytes,
        pieces: BlobReceiver,
        media_type: &str,
    ) -> Result<Put, StorageError>;

    /// Removes what a failed upload left at `staging`, best effort: the next
    /// start-up sweeps what is left.
    async fn discard_staged(&self, staging: &str);

    async fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError>;

    async fn delete_object(&self, object: &str) -> Result<(), StorageError>;

    /// Removes staging objects left by processes that died between upload and
    /// publication: those of dead processes on this host, and any older than
    /// [`MAX_AGE`]. Best effort: leftovers cost only space.
    async fn sweep_leftovers(&self) {
        let listed = match self.list_objects(PREFIX).await {
            Ok(listed) => listed,
            Err(e) => {
                log::warn!("{e}; leftovers stay for now");
                return;
            }
        };
        let now = super::unix_now();
        for o in listed {
            if is_leftover(&o.name, now.saturating_sub(o.used) as i64) {
                log::info!("removing leftover {}", o.name);
                if let Err(e) = self.delete_object(&o.name).await {
                    log::warn!("{e}");
                }
            }
        }
    }
}

/// Stores a blob that arrives in chunks while it is being packed: a blob that ends
/// within its first piece is put whole, a longer one goes through a staging object
/// that is discarded if the upload fails. Returns whether this call created the
/// blob and how many bytes it sent.
pub(super) async fn put_stream(
    bucket: &impl StagingBucket,
    mut pieces: BlobReceiver,
    media_type: &str,
) -> Result<Put, StorageError> {
    match pieces.next().await {
        None => Err(StorageError::Abandoned),
        Some(Piece::End {
            tail, digest, size, ..
        }) => {
            let created = bucket.put_whole(&digest, tail, media_type).await?;
            Ok(Put {
                uploaded: created,
                bytes: if created { size } else { 0 },
            })
        }
        Some(Piece::Chunk(first)) => {
            let staging = object();
            let result = bucket
                .upload_staged(&staging, first, pieces, media_type)
                .await;
            if result.is_err() {
                bucket.discard_staged(&staging).await;
            }
            result
        }
    }
}

/// A staging object name of a dead process on this host, and one of a process
/// elsewhere (which a sweep must leave alone unless it is old).
#[cfg(test)]
pub(super) fn dead_and_live_objects() -> (String, String) {
    let dead_pid = {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        child.wait().unwrap();
        child.id()
    };
    let holder = super::lease_holder();
    let host = holder.rsplit_once(':').unwrap().0;
    (
        format!("{PREFIX}{host}-{dead_pid}-00000000000000aa"),
        format!("{PREFIX}other-host-1-00000000000000bb"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_processes_staging_objects_are_recognised() {
        let (dead, live) = dead_and_live_objects();
        assert!(by_dead_process(&dead));
        assert!(!by_dead_process(&object()));
        assert!(!by_dead_process(&live));
        assert!(is_leftover(&dead, 0));
        assert!(!is_leftover(&live, MAX_AGE.as_secs() as i64));
        assert!(is_leftover(&live, MAX_AGE.as_secs() as i64 + 1));
    }
}
