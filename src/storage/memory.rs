//! An in-memory backend for unit tests: objects are byte strings in a map keyed by
//! object name. It keeps the contract of the other backends (a streamed blob appears
//! under its digest only once complete, a stored blob is not stored again) and adds
//! helpers a test can use to look inside or to make storage lose an object.

use super::stream::{BlobReceiver, Piece};
use super::{blob_object, unix_now, ObjectInfo, Put, StorageError};
use crate::reference::Digest;
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Semaphore;

/// Chunks handed over by the packer; small, so tests exercise several of them.
pub const STREAM_CHUNK: usize = 64 * 1024;

/// The bucket name [`super::Storage::locate`] reports for this backend.
pub const BUCKET: &str = "memory";

#[derive(Default)]
pub struct MemStorage {
    objects: Mutex<HashMap<String, Bytes>>,
    /// Last uses: when each object was written or touched, or what a test set.
    used: Mutex<HashMap<String, u64>>,
    /// Leases this process holds right now (see `Storage::acquire_lease`).
    pub(crate) held_leases: Mutex<std::collections::HashSet<String>>,
    /// When set, a streamed blob is stored only once a permit is there: a test
    /// sees what is stored while the layers' uploads are still under way.
    stream_gate: Mutex<Option<Arc<Semaphore>>>,
}

impl MemStorage {
    pub fn new() -> Self {
        Self::default()
    }

    fn objects(&self) -> MutexGuard<'_, HashMap<String, Bytes>> {
        self.objects.lock().expect("memory storage lock")
    }

    /// The names of all stored objects, sorted.
    pub fn object_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.objects().keys().cloned().collect();
        names.sort();
        names
    }

    /// Holds every streamed blob, once received, until the gate returned is
    /// given permits.
    pub fn hold_streams(&self) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        *self.stream_gate.lock().expect("memory storage lock") = Some(gate.clone());
        gate
    }

    /// Drops an object, as if storage had lost it; true when it was there.
    pub fn remove(&self, object: &str) -> bool {
        self.objects().remove(object).is_some()
    }

    /// Sets an object's last use, as if it had been used at `unix_time`.
    pub fn set_used(&self, object: &str, unix_time: u64) {
        self.used
            .lock()
            .expect("memory storage lock")
            .insert(object.to_string(), unix_time);
    }

    fn info(&self, name: &str, bytes: &Bytes) -> ObjectInfo {
        let used = self
            .used
            .lock()
            .expect("memory storage lock")
            .get(name)
            .copied();
        ObjectInfo {
            name: name.to_string(),
            size: bytes.len() as u64,
            used: used.unwrap_or_else(unix_now),
        }
    }

    pub async fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let objects = self.objects();
        Ok(objects
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|(name, bytes)| self.info(name, bytes))
            .collect())
    }

    pub async fn object_info(&self, object: &str) -> Result<Option<ObjectInfo>, StorageError> {
        Ok(self.objects().get(object).map(|b| self.info(object, b)))
    }

    pub async fn touch_object(&self, object: &str) -> Result<bool, StorageError> {
        let stored = self.objects().contains_key(object);
        if stored {
            self.set_used(object, unix_now());
        }
        Ok(stored)
    }

    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        Ok(self
            .objects()
            .get(&blob_object(digest))
            .map(|b| b.len() as u64))
    }

    /// Collects a streamed blob and stores it under its digest once complete.
    pub async fn put_blob_stream(&self, mut pieces: BlobReceiver) -> Result<Put, StorageError> {
        let mut buf = BytesMut::new();
        let (digest, size) = loop {
            match pieces.next().await {
                Some(Piece::Chunk(bytes)) => buf.extend_from_slice(&bytes),
                Some(Piece::End {
                    tail, digest, size, ..
                }) => {
                    buf.extend_from_slice(&tail);
                    break (digest, size);
                }
                // The packer stopped early: what arrived is discarded.
                None => return Err(StorageError::Abandoned),
            }
        };
        let gate = self
            .stream_gate
            .lock()
            .expect("memory storage lock")
            .clone();
        if let Some(gate) = gate {
            drop(gate.acquire().await);
        }
        let object = blob_object(&digest);
        let mut objects = self.objects();
        if objects.contains_key(&object) {
            // The stored copy is identical.
            return Ok(Put {
                uploaded: false,
                bytes: 0,
            });
        }
        self.set_used(&object, unix_now());
        objects.insert(object, buf.freeze());
        Ok(Put {
            uploaded: true,
            bytes: size,
        })
    }

    pub async fn put_blob_bytes(
        &self,
        digest: &Digest,
        bytes: Bytes,
    ) -> Result<bool, StorageError> {
        self.create_object_if_absent(&blob_object(digest), bytes)
            .await
    }

    pub async fn read_object(&self, object: &str) -> Result<Option<Bytes>, StorageError> {
        Ok(self.objects().get(object).cloned())
    }

    pub async fn write_object(&self, object: &str, bytes: Bytes) -> Result<(), StorageError> {
        self.objects().insert(object.to_string(), bytes);
        self.set_used(object, unix_now());
        Ok(())
    }

    pub async fn create_object_if_absent(
        &self,
        object: &str,
        bytes: Bytes,
    ) -> Result<bool, StorageError> {
        use std::collections::hash_map::Entry;
        match self.objects().entry(object.to_string()) {
            Entry::Occupied(_) => Ok(false),
            Entry::Vacant(v) => {
                v.insert(bytes);
                self.set_used(object, unix_now());
                Ok(true)
            }
        }
    }

    pub async fn delete_object(&self, object: &str) -> Result<(), StorageError> {
        self.objects().remove(object);
        self.used
            .lock()
            .expect("memory storage lock")
            .remove(object);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::stream::{channel, feed};
    use super::super::{record_object, BlobLocation, RecordKind, Storage};
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn bytes_round_trip_and_are_not_rewritten() {
        let s = Storage::Memory(MemStorage::new());
        assert_eq!(s.name(), "memory");
        let data = Bytes::from_static(b"{\"a\":1}");
        let d = Digest::of(&data);
        assert_eq!(s.blob_size(&d).await.unwrap(), None);
        assert!(s.read_blob(&d).await.unwrap().is_none());
        assert!(s
            .put_blob_bytes(&d, data.clone(), "application/json")
            .await
            .unwrap());
        assert!(!s
            .put_blob_bytes(&d, Bytes::from_static(b"other"), "application/json")
            .await
            .unwrap());
        assert_eq!(s.blob_size(&d).await.unwrap(), Some(data.len() as u64));
        assert_eq!(s.read_blob(&d).await.unwrap(), Some(data.clone()));
        match s.locate(&d) {
            BlobLocation::Object { bucket, object } => {
                assert_eq!(bucket, BUCKET);
                assert_eq!(object, blob_object(&d));
            }
            other => panic!("unexpected location {other:?}"),
        }

        s.write_record(RecordKind::Image, "k", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        s.write_record(RecordKind::Image, "k", Bytes::from_static(b"{\"v\":2}"))
            .await
            .unwrap();
        assert_eq!(
            s.read_record(RecordKind::Image, "k").await.unwrap(),
            Some(Bytes::from_static(b"{\"v\":2}"))
        );
        assert!(s
            .read_record(RecordKind::Image, "none")
            .await
            .unwrap()
            .is_none());

        let Storage::Memory(m) = &s else {
            unreachable!()
        };
        assert_eq!(
            m.object_names(),
            vec![blob_object(&d), record_object(RecordKind::Image, "k")]
        );
        assert!(m.remove(&blob_object(&d)));
        assert!(!m.remove(&blob_object(&d)));
        assert_eq!(s.blob_size(&d).await.unwrap(), None);
        s.delete_object(&record_object(RecordKind::Image, "k"))
            .await
            .unwrap();
        s.delete_object("never/there").await.unwrap();
        assert!(m.object_names().is_empty());
    }

    #[tokio::test]
    async fn a_streamed_blob_is_stored_once_complete() {
        let s = Storage::Memory(MemStorage::new());
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let d = Digest::of(&data);
        let put = s
            .put_blob_stream(feed(data.clone(), 7, true), "application/octet-stream")
            .await
            .unwrap();
        assert_eq!(
            put,
            Put {
                uploaded: true,
                bytes: data.len() as u64
            }
        );
        assert_eq!(
            s.read_blob(&d).await.unwrap(),
            Some(Bytes::from(data.clone()))
        );
        let again = s
            .put_blob_stream(feed(data.clone(), 7, true), "application/octet-stream")
            .await
            .unwrap();
        assert_eq!(
            again,
            Put {
                uploaded: false,
                bytes: 0
            }
        );
    }

    #[tokio::test]
    async fn a_stream_driven_by_a_sender_as_the_packer_does() {
        let s = Storage::Memory(MemStorage::new());
        let (mut tx, rx) = channel(s.stream_chunk());
        let data = vec![42u8; 3 * s.stream_chunk() + 5];
        let d = Digest::of(&data);
        let packer = {
            let data = data.clone();
            std::thread::spawn(move || {
                tx.write_all(&data)?;
                tx.finish(Digest::of(&data), data.len() as u64)
            })
        };
        let put = s
            .put_blob_stream(rx, "application/octet-stream")
            .await
            .unwrap();
        packer.join().unwrap().unwrap();
        assert!(put.uploaded);
        assert_eq!(put.bytes, data.len() as u64);
        assert_eq!(s.blob_size(&d).await.unwrap(), Some(data.len() as u64));
    }

    #[tokio::test]
    async fn an_abandoned_stream_leaves_nothing() {
        let m = MemStorage::new();
        let data = b"a layer the packer gives up on halfway".to_vec();
        assert!(matches!(
            m.put_blob_stream(feed(data.clone(), 4, false)).await,
            Err(StorageError::Abandoned)
        ));
        // A packer that fails before sending anything at all.
        let (tx, rx) = channel(4);
        drop(tx);
        assert!(matches!(
            m.put_blob_stream(rx).await,
            Err(StorageError::Abandoned)
        ));
        assert!(m.object_names().is_empty());
        assert_eq!(m.blob_size(&Digest::of(&data)).await.unwrap(), None);
    }

    #[tokio::test]
    async fn create_if_absent_creates_only_once() {
        let s = Storage::Memory(MemStorage::new());
        assert!(s
            .create_object_if_absent("leases/x.json", Bytes::from_static(b"first"))
            .await
            .unwrap());
        assert!(!s
            .create_object_if_absent("leases/x.json", Bytes::from_static(b"second"))
            .await
            .unwrap());
        assert_eq!(
            s.read_object("leases/x.json").await.unwrap(),
            Some(Bytes::from_static(b"first"))
        );
        s.delete_object("leases/x.json").await.unwrap();
        assert!(s
            .create_object_if_absent("leases/x.json", Bytes::from_static(b"third"))
            .await
            .unwrap());
        assert_eq!(
            s.read_object("leases/x.json").await.unwrap(),
            Some(Bytes::from_static(b"third"))
        );
    }

    #[tokio::test]
    async fn leases_are_exclusive_until_released_or_expired() {
        let s = Storage::Memory(MemStorage::new());
        let ttl = std::time::Duration::from_secs(60);
        assert!(s.acquire_lease("img", ttl).await.unwrap());
        assert!(!s.acquire_lease("img", ttl).await.unwrap());
        s.release_lease("img").await.unwrap();
        assert!(s.read_object("leases/img.json").await.unwrap().is_none());
        assert!(s.acquire_lease("img", ttl).await.unwrap());
        // An expired lease is taken over.
        s.release_lease("img").await.unwrap();
        assert!(s
            .create_object_if_absent("leases/img.json", Bytes::from_static(br#"{"expires":1}"#))
            .await
            .unwrap());
        assert!(s.acquire_lease("img", ttl).await.unwrap());
        assert!(!s.acquire_lease("img", ttl).await.unwrap());
        // Another live holder's lease is respected.
        s.release_lease("img").await.unwrap();
        assert!(s
            .create_object_if_absent(
                "leases/img.json",
                Bytes::from_static(br#"{"expires":99999999999,"holder":"elsewhere:1"}"#)
            )
            .await
            .unwrap());
        assert!(!s.acquire_lease("img", ttl).await.unwrap());
    }

    #[tokio::test]
    async fn blobs_are_marked_used_listed_and_deleted() {
        super::super::check_blob_use(&Storage::Memory(MemStorage::new())).await;
    }
}
