//! The filesystem backend: objects are files under a root directory. Every write goes
//! to a temporary name in `tmp/` and is renamed into place, so a crash never leaves a
//! partial object under its final name. Media types are not stored: blobs are served
//! as octet streams and manifests declare their own type.

use super::stream::{BlobReceiver, Piece};
use super::{blob_object, ObjectInfo, Put, StorageError};
use crate::reference::Digest;
use bytes::Bytes;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

/// Chunks handed over by the packer; small, since a local write costs no round trip.
pub const STREAM_CHUNK: usize = 1 << 20;
/// Age after which a spool file is certainly abandoned (no build runs this long).
const SPOOL_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(6 * 3600);
/// A streamed blob's bytes are sent to the disk every this many as they come, so
/// that the sync before its rename waits only for the last of them (for a 49 MB
/// layer, 30 ms when all of it was left to that sync).
const WRITEBACK_BYTES: u64 = 8 << 20;

/// Starts writing `len` bytes of `f` from `offset` to the disk, without waiting for
/// them to get there. A hint: should it fail, the final sync does all the work.
async fn start_writeback(f: &tokio::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let _ = tokio::task::spawn_blocking(move || {
        // SAFETY: no memory is touched. `fd` is the caller's file, open while this is
        // awaited; were the write dropped meanwhile, the call would at worst start the
        // writeback of whatever file took the number, which harms nothing.
        unsafe { libc::sync_file_range(fd, offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE) }
    })
    .await;
}

pub struct FsStorage {
    root: PathBuf,
    spool: PathBuf,
    /// Leases this process holds right now (see `Storage::acquire_lease`).
    pub(crate) held_leases: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl FsStorage {
    /// Creates the directory layout and clears temporaries a crash left behind.
    pub fn open(root: &Path) -> Result<Self, StorageError> {
        // Each process spools into a directory of its own, so processes sharing the
        // storage never clear each other's files.
        let spool_root = root.join("tmp");
        let spool = spool_root.join(super::holder_tag());
        for dir in [
            root.join("blobs/sha256"),
            root.join("records"),
            spool.clone(),
        ] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| StorageError::io("create", dir.display().to_string(), e))?;
        }
        // Leftovers of interrupted builds, which nothing refers to: those of
        // processes on this host that are gone, and anything old.
        if let Ok(entries) = std::fs::read_dir(&spool_root) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path == spool {
                    continue;
                }
                let dead = super::tag_is_dead(&entry.file_name().to_string_lossy());
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > SPOOL_MAX_AGE);
                if dead || old {
                    // Best effort: a leftover that cannot be removed harms nothing.
                    let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
                }
            }
        }
        Ok(FsStorage {
            root: root.to_path_buf(),
            spool,
            held_leases: Default::default(),
        })
    }

    pub fn object_path(&self, object: &str) -> PathBuf {
        self.root.join(object)
    }

    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        Ok(self
            .object_info(&blob_object(digest))
            .await?
            .map(|o| o.size))
    }

    /// Writes a streamed blob into this process's spool directory and renames it
    /// to its digest name once complete.
    pub async fn put_blob_stream(&self, mut pieces: BlobReceiver) -> Result<Put, StorageError> {
        let tmp = self
            .spool
            .join(format!(".layer-{:016x}", rand::random::<u64>()));
        let written = async {
            use tokio::io::AsyncWriteExt;
            let mut f = tokio::fs::File::create(&tmp).await?;
            let (mut written, mut flushed) = (0, 0);
            loop {
                match pieces.next().await {
                    Some(Piece::Chunk(bytes)) => {
                        f.write_all(&bytes).await?;
                        written += bytes.len() as u64;
                        if written - flushed >= WRITEBACK_BYTES {
                            f.flush().await?;
                            start_writeback(&f, flushed, written - flushed).await;
                            flushed = written;
                        }
                    }
                    Some(Piece::End {
                        tail, digest, size, ..
                    }) => {
                        f.write_all(&tail).await?;
                        f.sync_data().await?;
                        return Ok::<_, std::io::Error>(Some((digest, size)));
                    }
                    None => return Ok(None),
                }
            }
        };
        let (digest, size) = match written.await {
            Ok(Some(done)) => done,
            Ok(None) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(StorageError::Abandoned);
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(StorageError::io("write", tmp.display().to_string(), e));
            }
        };
        let object = blob_object(&digest);
        if self.blob_size(&digest).await?.is_some() {
            let _ = tokio::fs::remove_file(&tmp).await; // the stored copy is identical
            return Ok(Put {
                uploaded: false,
                bytes: 0,
            });
        }
        self.commit(&tmp, &object).await?;
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
        if self.blob_size(digest).await?.is_some() {
            return Ok(false);
        }
        self.write_object(&blob_object(digest), bytes).await?;
        Ok(true)
    }

    pub async fn read_object(&self, object: &str) -> Result<Option<Bytes>, StorageError> {
        match tokio::fs::read(self.object_path(object)).await {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StorageError::io("read", object, e)),
        }
    }

    pub async fn write_object(&self, object: &str, bytes: Bytes) -> Result<(), StorageError> {
        let tmp = self
            .spool
            .join(format!(".obj-{:016x}", rand::random::<u64>()));
        let write = async {
            let mut f = tokio::fs::File::create(&tmp).await?;
            tokio::io::AsyncWriteExt::write_all(&mut f, &bytes).await?;
            f.sync_data().await
        };
        if let Err(e) = write.await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(StorageError::io("write", object, e));
        }
        self.commit(&tmp, object).await
    }

    pub async fn create_object_if_absent(
        &self,
        object: &str,
        bytes: Bytes,
    ) -> Result<bool, StorageError> {
        let target = self.object_path(object);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| StorageError::io("create", object, e))?;
        }
        // O_EXCL makes the existence check and the creation one step.
        let mut file = match tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .await
        {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(StorageError::io("create", object, e)),
        };
        tokio::io::AsyncWriteExt::write_all(&mut file, &bytes)
            .await
            .map_err(|e| StorageError::io("write", object, e))?;
        Ok(true)
    }

    pub async fn delete_object(&self, object: &str) -> Result<(), StorageError> {
        match tokio::fs::remove_file(self.object_path(object)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io("delete", object, e)),
        }
    }

    /// The files directly in the prefix's directory whose names start with the rest
    /// of the prefix (objects live in flat directories).
    pub async fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let (dir, start) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let path = self.root.join(dir);
        let mut entries = match tokio::fs::read_dir(&path).await {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StorageError::io("list", prefix, e)),
        };
        let mut listed = Vec::new();
        loop {
            let entry = match entries.next_entry().await {
                Ok(Some(entry)) => entry,
                Ok(None) => break,
                Err(e) => return Err(StorageError::io("list", prefix, e)),
            };
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if !file_name.starts_with(start) {
                continue;
            }
            // Gone since listed, or not a file: not an object.
            let Ok(meta) = entry.metadata().await else {
                continue;
            };
            if meta.is_file() {
                let name = if dir.is_empty() {
                    file_name
                } else {
                    format!("{dir}/{file_name}")
                };
                listed.push(info(name, &meta));
            }
        }
        Ok(listed)
    }

    pub async fn object_info(&self, object: &str) -> Result<Option<ObjectInfo>, StorageError> {
        match tokio::fs::metadata(self.object_path(object)).await {
            Ok(m) => Ok(Some(info(object.to_string(), &m))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StorageError::io("stat", object, e)),
        }
    }

    /// Marks an object as used now: its mtime. False when it is not stored.
    pub async fn touch_object(&self, object: &str) -> Result<bool, StorageError> {
        let path = self.object_path(object);
        let touched = tokio::task::spawn_blocking(move || {
            std::fs::File::open(&path)?.set_modified(std::time::SystemTime::now())
        })
        .await
        .map_err(|e| StorageError::io("touch", object, e))?;
        match touched {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StorageError::io("touch", object, e)),
        }
    }

    async fn commit(&self, tmp: &Path, object: &str) -> Result<(), StorageError> {
        let target = self.object_path(object);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| StorageError::io("create", object, e))?;
        }
        if let Err(e) = tokio::fs::rename(tmp, &target).await {
            let _ = tokio::fs::remove_file(tmp).await;
            return Err(StorageError::io("rename", object, e));
        }
        Ok(())
    }
}

fn info(name: String, meta: &std::fs::Metadata) -> ObjectInfo {
    let used = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    ObjectInfo {
        name,
        size: meta.len(),
        used,
    }
}

#[cfg(test)]
mod tests {
    use super::super::stream::feed;
    use super::*;

    #[tokio::test]
    async fn objects_round_trip_and_blobs_are_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let s = FsStorage::open(dir.path()).unwrap();
        let data = b"hello, a layer of several chunks".to_vec();
        let d = Digest::of(&data);
        assert_eq!(s.blob_size(&d).await.unwrap(), None);
        let put = s
            .put_blob_stream(feed(data.clone(), 4, true))
            .await
            .unwrap();
        assert_eq!(
            put,
            Put {
                uploaded: true,
                bytes: data.len() as u64
            }
        );
        assert_eq!(s.blob_size(&d).await.unwrap(), Some(data.len() as u64));
        let again = s
            .put_blob_stream(feed(data.clone(), 4, true))
            .await
            .unwrap();
        assert!(!again.uploaded);
        assert!(matches!(
            s.put_blob_stream(feed(data.clone(), 4, false)).await,
            Err(StorageError::Abandoned)
        ));
        assert_eq!(
            s.read_object(&blob_object(&d)).await.unwrap().unwrap(),
            Bytes::from(data)
        );
        s.write_object("records/images/k.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        assert_eq!(
            s.read_object("records/images/k.json")
                .await
                .unwrap()
                .unwrap(),
            Bytes::from_static(b"{}")
        );
        assert!(s
            .read_object("records/images/none.json")
            .await
            .unwrap()
            .is_none());
        assert_eq!(std::fs::read_dir(&s.spool).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn leases_are_exclusive_until_released_or_expired() {
        let dir = tempfile::tempdir().unwrap();
        let s = super::super::Storage::Filesystem(FsStorage::open(dir.path()).unwrap());
        let ttl = std::time::Duration::from_secs(60);
        assert!(s.acquire_lease("img", ttl).await.unwrap());
        assert!(!s.acquire_lease("img", ttl).await.unwrap());
        s.release_lease("img").await.unwrap();
        assert!(s.acquire_lease("img", ttl).await.unwrap());
        // An expired lease (a dead holder) is taken over.
        s.release_lease("img").await.unwrap();
        assert!(s
            .create_object_if_absent("leases/img.json", Bytes::from_static(br#"{"expires":1}"#))
            .await
            .unwrap());
        assert!(s.acquire_lease("img", ttl).await.unwrap());
        assert!(!s.acquire_lease("img", ttl).await.unwrap());
        // A lease of a process on this host that is gone (killed and restarted).
        s.release_lease("img").await.unwrap();
        let dead = format!(
            r#"{{"expires":99999999999,"holder":"{}:4294967"}}"#,
            super::super::hostname()
        );
        assert!(s
            .create_object_if_absent("leases/img.json", Bytes::from(dead))
            .await
            .unwrap());
        assert!(s.acquire_lease("img", ttl).await.unwrap());
    }

    #[tokio::test]
    async fn blobs_are_marked_used_listed_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let s = super::super::Storage::Filesystem(FsStorage::open(dir.path()).unwrap());
        super::super::check_blob_use(&s).await;
    }
}
