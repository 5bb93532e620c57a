//! Blobs unused for the retention are deleted while the registry serves.
//!
//! "Used" means named by a manifest that was served: serving one marks its blobs as
//! used in storage (a file's mtime, a GCS object's `customTime`, an S3 mark object),
//! at most once per [`Retention::touch_every`] per blob and process, so the cost
//! stays small. One sweeper at a time (a lease in storage) deletes what has gone
//! unused for longer than the retention, after the records that name it.
//!
//! A sweep and a pull can meet on the same blob: the sweeper reads an old last use,
//! a pull marks the blob used and hands out a manifest, the sweeper deletes. Storage
//! offers no delete-if-unchanged on every backend, so time closes the gap instead:
//! a sweeper deletes a blob only within [`Retention::delete_deadline`] of reading its
//! last use, and a pull that finds a blob's previous use old enough to be swept (or
//! so recent that it may be another such pull's) waits out [`Retention::grace`] and
//! looks again before it trusts the blob. What is still there then stays for a whole
//! retention; what is gone is built again before the manifest is answered.

pub mod sweep;

use crate::reference::Digest;
use crate::state::SharedState;
use crate::storage::{unix_now, Storage, StorageError};
use std::time::Duration;

/// How long unused blobs are kept, and the timings derived from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    keep: u64,
    /// False when a bucket lifecycle rule deletes instead: blobs are only marked.
    pub sweep: bool,
    pub sweep_every: Duration,
}

impl Retention {
    /// None when blobs are kept forever (`keep_secs` 0).
    pub fn new(keep_secs: u64, sweep: bool, sweep_every_secs: u64) -> Option<Self> {
        (keep_secs > 0).then(|| Retention {
            keep: keep_secs,
            sweep,
            sweep_every: Duration::from_secs(sweep_every_secs.max(1)),
        })
    }

    pub fn keep_secs(&self) -> u64 {
        self.keep
    }

    /// How often one process marks a blob as used: a day on a retention of 30 days,
    /// so a blob pulled every minute costs one write a day.
    pub fn touch_every(&self) -> Duration {
        Duration::from_secs((self.keep / 8).clamp(1, 86_400))
    }

    /// How long a pull waits before it trusts a blob that a sweeper may be deleting.
    pub fn grace(&self) -> Duration {
        Duration::from_secs((self.keep / 4).clamp(1, 10))
    }

    /// How long after reading a blob's last use a sweeper may still delete it.
    pub fn delete_deadline(&self) -> Duration {
        self.grace() / 2
    }

    /// Unused for longer than the retention: the sweeper deletes it.
    pub fn expired(&self, used: u64, now: u64) -> bool {
        now.saturating_sub(used) > self.keep
    }

    /// Within the last stretch of the retention (an hour, at most half of it), where
    /// clocks that disagree could already see it expired.
    pub fn near_end(&self, used: u64, now: u64) -> bool {
        let margin = (self.keep / 2).min(3600);
        now.saturating_sub(used) + margin > self.keep
    }

    /// What a pull must check after marking a blob whose previous use was `used`:
    /// Some(time to wait) when a sweeper may be deleting it right now.
    ///
    /// That is so when the blob is near the end of its retention (the margin
    /// allows for clocks that disagree), or when its last use is so recent that
    /// it may be another pull's mark of an old blob, still within its grace.
    pub fn wait_before_trusting(&self, used: u64, now: u64) -> Option<Duration> {
        let age = now.saturating_sub(used);
        let grace = self.grace().as_secs();
        if self.near_end(used, now) {
            Some(self.grace())
        } else if age < 2 * grace {
            Some(Duration::from_secs((grace + 1).saturating_sub(age)))
        } else {
            None
        }
    }
}

/// Marks the blobs as used in storage, as a manifest naming them is about to be
/// served. False when one is gone, or went while the pull waited: the manifest must
/// not be handed out (the caller builds the image again, or answers that it is
/// unknown).
pub async fn mark_used(
    storage: &Storage,
    shared: &SharedState,
    retention: &Retention,
    blobs: &[Digest],
) -> Result<bool, StorageError> {
    let due: Vec<&Digest> = blobs
        .iter()
        .filter(|d| !shared.used_within(d, retention.touch_every()))
        .collect();
    if due.is_empty() {
        return Ok(true);
    }
    let now = unix_now();
    let previous = futures::future::join_all(due.iter().map(|d| storage.touch_blob(d))).await;
    shared.stats.blob_touches.inc_by(due.len() as u64);
    let mut wait = Duration::ZERO;
    let mut to_check = Vec::new();
    for (digest, previous) in due.into_iter().zip(previous) {
        match previous? {
            None => {
                log::info!("blob {digest} is gone (unused past the retention)");
                shared.forget_blob(digest);
                return Ok(false);
            }
            Some(used) => {
                // A last use no later than this process's own, which it checked,
                // is no other pull's mark still in its grace.
                let own = shared
                    .last_noted_use(digest)
                    .is_some_and(|own| used <= own + 1);
                let wait_for = match own {
                    true => retention.near_end(used, now).then(|| retention.grace()),
                    false => retention.wait_before_trusting(used, now),
                };
                match wait_for {
                    Some(w) => {
                        wait = wait.max(w);
                        to_check.push(digest);
                    }
                    None => shared.note_use(digest),
                }
            }
        }
    }
    if to_check.is_empty() {
        return Ok(true);
    }
    log::info!(
        "{} blobs were near the end of their retention; checking them again in {:?}",
        to_check.len(),
        wait
    );
    tokio::time::sleep(wait).await;
    for digest in to_check {
        if storage.blob_size(digest).await?.is_none() {
            log::info!("blob {digest} was deleted as it was marked used");
            shared.forget_blob(digest);
            return Ok(false);
        }
        shared.note_use(digest);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemStorage;
    use crate::storage::{blob_object, BlobLocation};
    use bytes::Bytes;
    use std::sync::Arc;

    const DAY: u64 = 86_400;

    #[test]
    fn timings_scale_with_the_retention_within_bounds() {
        assert_eq!(Retention::new(0, true, 60), None);
        let month = Retention::new(30 * DAY, true, 3600).unwrap();
        assert_eq!(month.touch_every(), Duration::from_secs(DAY));
        assert_eq!(month.grace(), Duration::from_secs(10));
        assert_eq!(month.delete_deadline(), Duration::from_secs(5));
        let short = Retention::new(8, true, 0).unwrap();
        assert_eq!(short.touch_every(), Duration::from_secs(1));
        assert_eq!(short.grace(), Duration::from_secs(2));
        assert_eq!(short.sweep_every, Duration::from_secs(1));
        let tiny = Retention::new(1, true, 1).unwrap();
        assert_eq!(tiny.touch_every(), Duration::from_secs(1));
        assert_eq!(tiny.grace(), Duration::from_secs(1));
    }

    #[test]
    fn a_blob_expires_only_past_the_retention() {
        let r = Retention::new(30 * DAY, true, 3600).unwrap();
        let now = 100 * DAY;
        assert!(!r.expired(now - 30 * DAY, now));
        assert!(r.expired(now - 30 * DAY - 1, now));
        assert!(!r.expired(now + 5, now), "a clock ahead is not an old use");
    }

    #[test]
    fn a_pull_waits_only_for_blobs_a_sweeper_may_be_deleting() {
        let r = Retention::new(30 * DAY, true, 3600).unwrap();
        let now = 100 * DAY;
        // Used yesterday: nothing can be deleting it.
        assert_eq!(r.wait_before_trusting(now - DAY, now), None);
        // Within the last hour of its retention, or past it: a sweep may be on it.
        assert_eq!(
            r.wait_before_trusting(now - 30 * DAY + 1800, now),
            Some(r.grace())
        );
        assert_eq!(r.wait_before_trusting(now - 31 * DAY, now), Some(r.grace()));
        // Marked a second ago, perhaps by a pull of an old blob still in its grace.
        assert_eq!(
            r.wait_before_trusting(now - 1, now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(r.wait_before_trusting(now - 25, now), None);
    }

    async fn stored(s: &Storage, text: &str) -> Digest {
        let bytes = Bytes::from(text.to_string());
        let d = Digest::of(&bytes);
        s.put_blob_bytes(&d, bytes, "application/octet-stream")
            .await
            .unwrap();
        d
    }

    fn memory(s: &Storage) -> &MemStorage {
        match s {
            Storage::Memory(m) => m,
            _ => unreachable!(),
        }
    }

    #[tokio::test]
    async fn serving_marks_blobs_once_per_interval_and_refuses_a_lost_blob() {
        let s = Storage::Memory(MemStorage::new());
        let shared = SharedState::default();
        let r = Retention::new(30 * DAY, true, 3600).unwrap();
        let a = stored(&s, "a").await;
        let b = stored(&s, "b").await;
        let week_ago = unix_now() - 7 * DAY;
        memory(&s).set_used(&blob_object(&a), week_ago);
        memory(&s).set_used(&blob_object(&b), week_ago);

        assert!(mark_used(&s, &shared, &r, &[a.clone(), b.clone()])
            .await
            .unwrap());
        assert!(s.blob_last_used(&a).await.unwrap().unwrap() > week_ago);
        assert_eq!(shared.stats.blob_touches.get(), 2);
        // Marked within the day: no storage round trip.
        memory(&s).set_used(&blob_object(&a), week_ago);
        assert!(mark_used(&s, &shared, &r, std::slice::from_ref(&a))
            .await
            .unwrap());
        assert_eq!(shared.stats.blob_touches.get(), 2);
        assert_eq!(s.blob_last_used(&a).await.unwrap(), Some(week_ago));

        // A blob storage lost is not handed out.
        let c = stored(&s, "c").await;
        memory(&s).remove(&blob_object(&c));
        assert!(!mark_used(&s, &shared, &r, &[a.clone(), c.clone()])
            .await
            .unwrap());
        assert!(matches!(s.locate(&a), BlobLocation::Object { .. }));
    }

    #[tokio::test]
    async fn a_blob_deleted_while_its_pull_waits_is_not_trusted() {
        let s = Arc::new(Storage::Memory(MemStorage::new()));
        let shared = SharedState::default();
        let r = Retention::new(8, true, 1).unwrap();
        let old = stored(&s, "old").await;
        memory(&s).set_used(&blob_object(&old), unix_now() - 20);
        // A sweeper that read the old time just before the mark deletes it now.
        let sweeper = {
            let s = s.clone();
            let old = old.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                memory(&s).remove(&blob_object(&old));
            })
        };
        let started = std::time::Instant::now();
        assert!(!mark_used(&s, &shared, &r, std::slice::from_ref(&old))
            .await
            .unwrap());
        assert!(started.elapsed() >= r.grace());
        sweeper.await.unwrap();

        // One that survives the grace is trusted and remembered as used.
        let kept = stored(&s, "kept").await;
        memory(&s).set_used(&blob_object(&kept), unix_now() - 20);
        assert!(mark_used(&s, &shared, &r, std::slice::from_ref(&kept))
            .await
            .unwrap());
        assert!(shared.used_within(&kept, r.touch_every()));
    }
}
