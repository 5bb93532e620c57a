//! The sweeper: every interval, whichever process holds the sweep lease deletes the
//! blobs unused for longer than the retention, after the records that name them.

use super::Retention;
use crate::pipeline::record_blobs;
use crate::reference::Digest;
use crate::state::SharedState;
use crate::storage::{record_object, records_prefix, unix_now, RecordKind, Storage, StorageError};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

const LEASE: &str = "blob-sweep";

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    pub deleted: u64,
    pub deleted_bytes: u64,
    pub kept: u64,
    pub records_deleted: u64,
    /// Expired when listed, but used again (or too slow to delete safely) by the
    /// time the sweeper came to them.
    pub spared: u64,
}

pub struct BlobSweeper {
    pub storage: Arc<Storage>,
    pub shared: Arc<SharedState>,
    pub retention: Retention,
}

impl BlobSweeper {
    /// Sweeps every interval while this process holds the lease; runs forever.
    pub async fn run(self) {
        self.shared.sweep.lock().expect("sweep lock").retention_secs = self.retention.keep_secs();
        loop {
            tokio::time::sleep(self.retention.sweep_every).await;
            // The lease is left to expire rather than released, so that across
            // replicas a sweep runs once per interval.
            match self
                .storage
                .acquire_lease(LEASE, self.retention.sweep_every)
                .await
            {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    log::warn!("blob sweep: {e}");
                    continue;
                }
            }
            match sweep(&self.storage, &self.shared, &self.retention).await {
                Ok(swept) => self.report(&swept),
                Err(e) => log::warn!("blob sweep stopped: {e}; the next one carries on"),
            }
        }
    }

    fn report(&self, swept: &Swept) {
        log::info!(
            "blob sweep: deleted {} blobs ({} bytes) unused for more than {} s, kept {}, removed {} records{}",
            swept.deleted,
            swept.deleted_bytes,
            self.retention.keep_secs(),
            swept.kept,
            swept.records_deleted,
            if swept.spared > 0 {
                format!(", spared {} used since listed", swept.spared)
            } else {
                String::new()
            }
        );
        let stats = &self.shared.stats;
        stats.blob_sweeps.inc();
        stats.blobs_deleted.inc_by(swept.deleted);
        stats.blob_deleted_bytes.inc_by(swept.deleted_bytes);
        let mut state = self.shared.sweep.lock().expect("sweep lock");
        state.last_sweep_unix_time = Some(unix_now());
        state.last_sweep_deleted = Some(swept.deleted);
        state.last_sweep_deleted_bytes = Some(swept.deleted_bytes);
        state.last_sweep_kept = Some(swept.kept);
        state.last_sweep_records_deleted = Some(swept.records_deleted);
    }
}

/// One pass: lists the blobs, deletes the records naming expired ones, then the
/// expired blobs that are still unused when looked at again.
pub async fn sweep(
    storage: &Storage,
    shared: &SharedState,
    retention: &Retention,
) -> Result<Swept, StorageError> {
    let now = unix_now();
    let (blobs, orphan_marks) = storage.blob_listing().await?;
    let (expired, kept): (Vec<_>, Vec<_>) = blobs
        .into_iter()
        .partition(|b| retention.expired(b.used, now));
    let mut swept = Swept {
        kept: kept.len() as u64,
        ..Default::default()
    };
    if !expired.is_empty() {
        let doomed: HashSet<&Digest> = expired.iter().map(|b| &b.digest).collect();
        swept.records_deleted = delete_records(storage, retention, &doomed, now).await?;
    }
    for blob in &expired {
        // The last use once more, then the delete at once: a pull that marks the
        // blob after this read waits longer than the deadline before trusting it.
        let read_at = Instant::now();
        let used = storage.blob_last_used(&blob.digest).await?;
        let Some(used) = used else {
            continue;
        };
        if !retention.expired(used, unix_now()) {
            swept.spared += 1;
            swept.kept += 1;
            continue;
        }
        let Some(left) = retention.delete_deadline().checked_sub(read_at.elapsed()) else {
            swept.spared += 1;
            swept.kept += 1;
            continue;
        };
        match tokio::time::timeout(left, storage.delete_blob(&blob.digest)).await {
            Ok(result) => result?,
            Err(_) => {
                log::warn!("blob sweep: deleting {} took too long", blob.digest);
                continue;
            }
        }
        shared.forget_blob(&blob.digest);
        log::debug!(
            "deleted blob {} ({} bytes, unused for {} s)",
            blob.digest,
            blob.size,
            now.saturating_sub(blob.used)
        );
        swept.deleted += 1;
        swept.deleted_bytes += blob.size;
    }
    for mark in orphan_marks {
        if retention.expired(mark.used, now) {
            storage.delete_object(&mark.name).await?;
        }
    }
    Ok(swept)
}

/// Deletes the records that name a doomed blob, so that no record leads to a blob
/// that is gone. Only records about as old as the retention can: a record is
/// written when its blobs are stored or reused, and they are marked used when the
/// image is served.
async fn delete_records(
    storage: &Storage,
    retention: &Retention,
    doomed: &HashSet<&Digest>,
    now: u64,
) -> Result<u64, StorageError> {
    let mut deleted = 0;
    for kind in RecordKind::ALL {
        let prefix = records_prefix(kind);
        for record in storage.list_objects(&prefix).await? {
            if !retention.near_end(record.used, now) {
                continue;
            }
            let Some(key) = record
                .name
                .strip_prefix(&prefix)
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            let Some(raw) = storage.read_object(&record.name).await? else {
                continue;
            };
            let names_doomed = match record_blobs(kind, key, &raw) {
                Some(blobs) => blobs.iter().any(|b| doomed.contains(b)),
                // Unreadable, and old: nothing can use it.
                None => true,
            };
            if names_doomed {
                storage.delete_object(&record_object(kind, key)).await?;
                deleted += 1;
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemStorage;
    use crate::storage::{blob_object, BlobUse};
    use bytes::Bytes;

    fn memory(s: &Storage) -> &MemStorage {
        match s {
            Storage::Memory(m) => m,
            _ => unreachable!(),
        }
    }

    async fn blob(s: &Storage, text: &str, used: u64) -> Digest {
        let bytes = Bytes::from(text.to_string());
        let d = Digest::of(&bytes);
        s.put_blob_bytes(&d, bytes, "application/octet-stream")
            .await
            .unwrap();
        memory(s).set_used(&blob_object(&d), used);
        d
    }

    async fn record(s: &Storage, kind: RecordKind, key: &str, json: String, used: u64) {
        s.write_record(kind, key, Bytes::from(json)).await.unwrap();
        memory(s).set_used(&record_object(kind, key), used);
    }

    fn manifest_naming(config: &Digest, layer: &Digest) -> String {
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": crate::manifest::OCI_MANIFEST,
            "config": {"digest": config.to_string()},
            "layers": [{"digest": layer.to_string()}],
        })
        .to_string()
    }

    #[tokio::test]
    async fn a_sweep_deletes_expired_blobs_after_the_records_naming_them() {
        let s = Storage::Memory(MemStorage::new());
        let shared = SharedState::default();
        let r = Retention::new(100, true, 1).unwrap();
        let now = unix_now();
        let (long_ago, recently) = (now - 1000, now - 10);
        let old_layer = blob(&s, "old layer", long_ago).await;
        let old_config = blob(&s, "old config", long_ago).await;
        let shared_layer = blob(&s, "shared layer", recently).await;
        let new_config = blob(&s, "new config", recently).await;
        let old_manifest = manifest_naming(&old_config, &old_layer);
        let new_manifest = manifest_naming(&new_config, &shared_layer);
        let old_manifest_blob = blob(&s, &old_manifest, long_ago).await;
        let new_manifest_blob = blob(&s, &new_manifest, recently).await;
        let image = |m: &str| serde_json::json!({"docker": m, "oci": m}).to_string();
        record(&s, RecordKind::Image, "old", image(&old_manifest), long_ago).await;
        // Old, yet everything it names is in use: it stays.
        record(&s, RecordKind::Image, "new", image(&new_manifest), long_ago).await;
        let layer = |d: &Digest| {
            serde_json::json!({"digest": d.to_string(), "diff_id": d.to_string(), "size": 1, "rating": 1, "paths": 1})
                .to_string()
        };
        record(&s, RecordKind::Layer, "old", layer(&old_layer), long_ago).await;
        record(
            &s,
            RecordKind::Layer,
            "shared",
            layer(&shared_layer),
            long_ago,
        )
        .await;
        let referrers = serde_json::json!({"manifests": []}).to_string();
        record(
            &s,
            RecordKind::Referrers,
            old_manifest_blob.hex(),
            referrers.clone(),
            long_ago,
        )
        .await;
        // Young records are not read: they were written with blobs in use.
        record(&s, RecordKind::Pinned, "young", "not json".into(), now).await;
        shared.remember_blob(&old_layer);

        let swept = sweep(&s, &shared, &r).await.unwrap();
        assert_eq!(swept.deleted, 3, "{swept:?}");
        assert_eq!(swept.kept, 3);
        assert_eq!(swept.records_deleted, 3);
        assert_eq!(
            swept.deleted_bytes,
            ("old layer".len() + "old config".len() + old_manifest.len()) as u64
        );
        let mut left: Vec<Digest> = s
            .list_blobs()
            .await
            .unwrap()
            .into_iter()
            .map(|b: BlobUse| b.digest)
            .collect();
        left.sort_by_key(|d| d.to_string());
        let mut expected = vec![shared_layer, new_config, new_manifest_blob];
        expected.sort_by_key(|d| d.to_string());
        assert_eq!(left, expected);
        let names = memory(&s).object_names();
        assert!(names.contains(&record_object(RecordKind::Image, "new")));
        assert!(names.contains(&record_object(RecordKind::Layer, "shared")));
        assert!(names.contains(&record_object(RecordKind::Pinned, "young")));
        assert!(!names.contains(&record_object(RecordKind::Image, "old")));
        assert!(!names.contains(&record_object(RecordKind::Layer, "old")));
        assert!(!shared.is_known_blob(&old_layer));

        // Nothing expired: nothing more goes.
        let again = sweep(&s, &shared, &r).await.unwrap();
        assert_eq!((again.deleted, again.records_deleted), (0, 0));
    }
}
