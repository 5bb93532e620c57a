//! Realisations wait here while every build worker is busy, and the next free
//! worker takes all of them in one `nix-store --realise --keep-going`. One Nix
//! process then schedules every queued image's derivations together (`max-jobs` at
//! once, shared ones once), where one process per image had the others wait for
//! its output locks, and a small image queued behind large ones waited for a whole
//! worker. Each image is answered as soon as its own outputs are in the store, not
//! when the batch ends. A lone realisation goes as it always did; an image whose
//! outputs are not there when its batch fails is realised again alone, so its
//! error is its own.

use super::eval_queue::take_batch;
use super::{mailbox, NixRunner};
use crate::actors::nix_worker::{Claim, NixWorker, Realise, RealiseBatch};
use crate::error::BuildError;
use crate::layers::StorePathInfo;
use crate::nix;
use actix::Addr;
use futures::future::BoxFuture;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Images one realisation takes at most, so that the build limit of one process
/// is not asked to cover an unbounded amount of work.
const MAX_BATCH: usize = 64;

/// How often a waiting image looks for its outputs in the store.
const POLL: Duration = Duration::from_millis(200);

pub struct RealiseQueue {
    /// The build workers.
    workers: Addr<NixWorker>,
    /// Where an image whose outputs are already built reads its closure, without
    /// waiting for a build worker.
    readers: Addr<NixWorker>,
    /// Realisations running at once: the build workers.
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Waiting>,
    running: usize,
}

struct Waiting {
    job: Realise,
    /// Realised on its own: its outputs were missing when its batch failed.
    alone: bool,
    reply: oneshot::Sender<Outcome>,
}

enum Outcome {
    /// Realised alone: its closure, or why not.
    Closure(Result<Vec<StorePathInfo>, BuildError>),
    /// Its outputs are in the store; the caller reads the closure.
    Built,
}

impl RealiseQueue {
    pub fn new(workers: Addr<NixWorker>, readers: Addr<NixWorker>, capacity: usize) -> Arc<Self> {
        Arc::new(RealiseQueue {
            workers,
            readers,
            capacity: capacity.max(1),
            state: Mutex::default(),
        })
    }

    pub fn realise(
        self: &Arc<Self>,
        job: Realise,
    ) -> BoxFuture<'static, Result<Vec<StorePathInfo>, BuildError>> {
        let outputs = job.evaluation.output_paths();
        let present = move || outputs.iter().all(|p| nix::path_built(p));
        if present() {
            return self.readers.realise(job);
        }
        let (reply, mut answer) = oneshot::channel();
        self.lock().queue.push_back(Waiting {
            job: job.clone(),
            alone: false,
            reply,
        });
        self.dispatch();
        let readers = self.readers.clone();
        Box::pin(async move {
            // Outputs another process builds end the wait too, unless a worker has
            // started this image alone (then its answer comes with the closure).
            loop {
                tokio::select! {
                    outcome = &mut answer => match outcome {
                        Ok(Outcome::Closure(result)) => return result,
                        Ok(Outcome::Built) => break,
                        Err(_) => return Err(BuildError::Internal("realisation dropped".into())),
                    },
                    _ = tokio::time::sleep(POLL) => {
                        if present() && job.claim.by_caller() {
                            log::debug!("build {}: its outputs were built elsewhere", job.label);
                            break;
                        }
                    }
                }
            }
            // A closed reply tells the queue nobody waits for this image any more.
            drop(answer);
            let job = Realise {
                claim: Claim::default(),
                ..job
            };
            readers.realise(job).await
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("realisation queue lock")
    }

    /// Starts batches while workers are free.
    fn dispatch(self: &Arc<Self>) {
        loop {
            let batch = {
                let mut state = self.lock();
                state.queue.retain(|w| !w.reply.is_closed());
                if state.running >= self.capacity || state.queue.is_empty() {
                    return;
                }
                state.running += 1;
                take_batch(&mut state.queue, MAX_BATCH, |w| w.alone, |_, _| true)
            };
            let queue = self.clone();
            tokio::spawn(async move {
                queue.run(batch).await;
                queue.lock().running -= 1;
                queue.dispatch();
            });
        }
    }

    async fn run(&self, mut batch: Vec<Waiting>) {
        if batch.len() == 1 {
            let w = batch.pop().expect("one");
            let result = match self.workers.send(w.job).await {
                Ok(result) => result,
                Err(e) => Err(mailbox(e)),
            };
            let _ = w.reply.send(Outcome::Closure(result));
            return;
        }
        let msg = RealiseBatch {
            label: format!(
                "{} images ({})",
                batch.len(),
                batch
                    .iter()
                    .map(|w| w.job.label.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            system: batch[0].job.system,
            evaluations: batch.iter().map(|w| w.job.evaluation.clone()).collect(),
            progress: batch.iter().map(|w| w.job.progress.clone()).collect(),
        };
        let started = Instant::now();
        // The outputs that are not valid after it: every one when that is unknown.
        let invalid = match self.workers.send(msg).await {
            Ok(Ok(invalid)) => Some(invalid),
            Ok(Err(e)) => {
                log::warn!("realising {} images at once failed: {e}", batch.len());
                None
            }
            Err(e) => {
                log::warn!("realising {} images at once failed: {e}", batch.len());
                None
            }
        };
        let (mut done, mut again) = (0, Vec::new());
        for w in batch {
            let outputs = w.job.evaluation.output_paths();
            let missing = invalid
                .as_ref()
                .is_none_or(|invalid| outputs.iter().any(|p| invalid.contains(p)));
            if !missing {
                done += 1;
                let _ = w.reply.send(Outcome::Built);
            } else if !w.reply.is_closed() {
                again.push(Waiting { alone: true, ..w });
            }
        }
        log::info!(
            "realised {done} images in one nix-store in {} ms{}",
            started.elapsed().as_millis(),
            match again.len() {
                0 => String::new(),
                n => format!(
                    "; {n} did not build there and are realised alone, for their own errors"
                ),
            }
        );
        let mut state = self.lock();
        for w in again.into_iter().rev() {
            state.queue.push_front(w);
        }
    }
}
