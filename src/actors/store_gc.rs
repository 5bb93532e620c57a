//! The Nix store's collector: measures free space on the store's filesystem and
//! runs Nix's garbage collector on a worker of its own when it falls under the
//! threshold, on a schedule, and when a build found the disk full. Builds in flight
//! are safe: they hold GC roots from evaluation until their layers are stored.

use crate::actors::nix_worker::{Collect, NixWorker};
use crate::nix::gc;
use crate::state::SharedState;
use actix::Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct StoreGc {
    pub store: PathBuf,
    /// Collect when fewer bytes than this are free (0: never for this reason).
    pub min_free: u64,
    /// How many bytes should be free after a collection.
    pub max_free: u64,
    /// Collect everything unreachable this often (None: never).
    pub interval: Option<Duration>,
    pub check: Duration,
    pub worker: Addr<NixWorker>,
    pub shared: Arc<SharedState>,
}

impl StoreGc {
    /// Runs for as long as the server does.
    pub async fn run(self) {
        let mut last_scheduled = Instant::now();
        loop {
            let woken = tokio::select! {
                _ = self.shared.gc_wanted.notified() => true,
                _ = tokio::time::sleep(self.check) => false,
            };
            let Some(free) = self.measure() else {
                continue;
            };
            let scheduled = self.interval.is_some_and(|i| last_scheduled.elapsed() >= i);
            let low = free < self.min_free;
            if !(woken || low || scheduled) {
                continue;
            }
            let why = if woken {
                "a build ran out of space"
            } else if low {
                "free space under nix.gc_min_free_mib"
            } else {
                "nix.gc_interval_secs passed"
            };
            // A scheduled run collects everything unreachable; the others free what
            // brings the disk back to max_free, or everything when none is set.
            let max_freed = (!scheduled && self.max_free > 0)
                .then(|| self.max_free.saturating_sub(free).max(1));
            if scheduled {
                last_scheduled = Instant::now();
            }
            self.collect(why, free, max_freed).await;
        }
    }

    fn measure(&self) -> Option<u64> {
        match gc::free_space(&self.store) {
            Ok((free, total)) => {
                self.shared.stats.store_free_bytes.set(free as i64);
                let mut s = self.shared.store.lock().expect("store lock");
                s.free_bytes = free;
                s.total_bytes = total;
                Some(free)
            }
            Err(e) => {
                log::warn!("free space of {}: {e}", self.store.display());
                None
            }
        }
    }

    async fn collect(&self, why: &str, free: u64, max_freed: Option<u64>) {
        log::info!(
            "collecting Nix store garbage ({why}; {} MiB free)",
            free >> 20
        );
        let started = Instant::now();
        let collecting = self.shared.collecting.write().await;
        let sent = self.worker.send(Collect { max_freed }).await;
        drop(collecting);
        let freed = match sent {
            Ok(Ok(freed)) => freed,
            Ok(Err(e)) => {
                log::warn!("Nix garbage collection failed: {e}");
                return;
            }
            Err(e) => {
                log::warn!("Nix garbage collection: worker unavailable: {e}");
                return;
            }
        };
        let now = crate::storage::unix_now();
        let stats = &self.shared.stats;
        stats.gc_runs.inc();
        stats.gc_freed_bytes.inc_by(freed);
        stats.gc_last_run.set(now as i64);
        {
            let mut s = self.shared.store.lock().expect("store lock");
            s.last_gc_unix_time = Some(now);
            s.last_gc_freed_bytes = Some(freed);
        }
        self.measure();
        log::info!(
            "Nix garbage collection freed {} MiB in {:.1} s",
            freed >> 20,
            started.elapsed().as_secs_f64()
        );
    }
}
