//! Evaluations wait here while every evaluation worker is busy, and the next free
//! worker takes all those that can share one `nix-instantiate`: the package set is
//! imported once for all of them, where each image used to import it alone. A lone
//! request goes as it always did, so nothing waits to form a batch; only a queue
//! makes batches. A request whose evaluation throws inside a batch (an unfree or
//! broken package) is evaluated again alone, so its error is its own.
//!
//! The last free worker is the exception: right after an evaluation started on an
//! idle registry, it waits a moment (`nix.eval_gather_ms`) for the rest of what
//! looks like a burst, so that the burst is one batch rather than a second image
//! alone and the rest waiting behind it. Only a start from idle opens that window:
//! under steady load, where one worker's next evaluation starts while another's
//! runs, a window on every start could keep the last worker waiting again and
//! again while the first did all the work.
//!
//! Against nixpkgs, 32 new images at once were all evaluated 1.4-1.7 s after the
//! burst with the first two alone and the other 30 one batch behind them: each of
//! those two took about 0.45 s, mostly the import of the package set, which the 30
//! waited for. Gathered, the second worker took 31 at once and all were evaluated
//! at 1.1-1.3 s.

use super::ask;
use crate::actors::nix_worker::{Evaluate, EvaluateBatch, NixWorker};
use crate::error::BuildError;
use crate::nix::Evaluation;
use actix::Addr;
use futures::future::BoxFuture;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Requests one evaluation takes at most, so that one slow package set does not
/// hold many images' answers at once.
const MAX_BATCH: usize = 64;

pub struct EvalQueue {
    workers: Addr<NixWorker>,
    /// Evaluations running at once: the evaluation workers.
    capacity: usize,
    /// How long the last free worker waits for more requests after an evaluation
    /// started on an idle registry; zero: never.
    gather: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Waiting>,
    running: usize,
    /// When the latest evaluation started with no other running or gathering.
    idle_start: Option<Instant>,
    /// The last free worker waits for a burst to gather.
    gathering: bool,
}

struct Waiting {
    job: Evaluate,
    /// Evaluated on its own: its evaluation threw in a batch.
    alone: bool,
    reply: oneshot::Sender<Result<Evaluation, BuildError>>,
}

/// What a batch shares: one package set and system, the same optional packages.
fn batch_key(job: &Evaluate) -> (&crate::nix::SourceArgs, &str, &[String]) {
    (&job.source, job.system, &job.optional)
}

/// Takes the next batch off the queue: its head, and every later request that can
/// share its evaluation (up to `max`), in queue order; the rest keep theirs.
pub(super) fn take_batch<T>(
    queue: &mut VecDeque<T>,
    max: usize,
    alone: impl Fn(&T) -> bool,
    same: impl Fn(&T, &T) -> bool,
) -> Vec<T> {
    let Some(head) = queue.pop_front() else {
        return Vec::new();
    };
    if alone(&head) {
        return vec![head];
    }
    let mut batch = vec![head];
    let mut rest = VecDeque::with_capacity(queue.len());
    while let Some(t) = queue.pop_front() {
        if batch.len() < max && !alone(&t) && same(&batch[0], &t) {
            batch.push(t);
        } else {
            rest.push_back(t);
        }
    }
    *queue = rest;
    batch
}

/// How the log names a batch: how many images, and each one.
pub(super) fn batch_label<'a>(labels: impl ExactSizeIterator<Item = &'a str>) -> String {
    let n = labels.len();
    format!("{n} images ({})", labels.collect::<Vec<_>>().join(", "))
}

impl EvalQueue {
    pub fn new(workers: Addr<NixWorker>, capacity: usize, gather: Duration) -> Arc<Self> {
        Arc::new(EvalQueue {
            workers,
            capacity: capacity.max(1),
            gather,
            state: Mutex::default(),
        })
    }

    pub fn evaluate(
        self: &Arc<Self>,
        job: Evaluate,
    ) -> BoxFuture<'static, Result<Evaluation, BuildError>> {
        let (reply, answer) = oneshot::channel();
        self.lock().queue.push_back(Waiting {
            job,
            alone: false,
            reply,
        });
        self.dispatch();
        Box::pin(async move {
            answer
                .await
                .unwrap_or_else(|_| Err(BuildError::Internal("evaluation dropped".into())))
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("evaluation queue lock")
    }

    /// Starts batches while workers are free.
    fn dispatch(self: &Arc<Self>) {
        loop {
            let batch = {
                let mut state = self.lock();
                if state.running >= self.capacity || state.queue.is_empty() {
                    return;
                }
                if self.capacity > 1 && state.running + 1 == self.capacity {
                    if state.gathering {
                        return;
                    }
                    let since = state.idle_start.map(|t| t.elapsed());
                    if let Some(since) = since.filter(|since| *since < self.gather) {
                        state.gathering = true;
                        let queue = self.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(queue.gather - since).await;
                            queue.lock().gathering = false;
                            queue.dispatch();
                        });
                        return;
                    }
                }
                if state.running == 0 && !state.gathering {
                    state.idle_start = Some(Instant::now());
                }
                state.running += 1;
                take_batch(
                    &mut state.queue,
                    MAX_BATCH,
                    |w| w.alone,
                    |a, b| batch_key(&a.job) == batch_key(&b.job),
                )
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
            let _ = w.reply.send(ask(&self.workers, w.job).await);
            return;
        }
        let first = &batch[0].job;
        let msg = EvaluateBatch {
            label: batch_label(batch.iter().map(|w| w.job.label.as_str())),
            source: first.source.clone(),
            system: first.system,
            requests: batch.iter().map(|w| w.job.packages.clone()).collect(),
            optional: first.optional.clone(),
        };
        let started = Instant::now();
        let results = match ask(&self.workers, msg).await {
            Ok(results) if results.len() == batch.len() => results,
            // Whatever failed the whole evaluation, each request's own evaluation
            // says which of them it was.
            other => {
                let why = match other {
                    Ok(_) => "a result missing".to_string(),
                    Err(e) => e.to_string(),
                };
                log::warn!(
                    "evaluating {} images at once failed ({why}); evaluating each alone",
                    batch.len()
                );
                batch.iter().map(|_| None).collect()
            }
        };
        let (mut done, mut again) = (0, Vec::new());
        for (w, result) in batch.into_iter().zip(results) {
            match result {
                Some(evaluation) => {
                    done += 1;
                    let _ = w.reply.send(Ok(evaluation));
                }
                None => again.push(Waiting { alone: true, ..w }),
            }
        }
        log::info!(
            "evaluated {done} images in one nix-instantiate in {} ms{}",
            started.elapsed().as_millis(),
            if again.is_empty() {
                String::new()
            } else {
                format!("; {} to evaluate alone", again.len())
            }
        );
        let mut state = self.lock();
        for w in again.into_iter().rev() {
            state.queue.push_front(w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::take_batch;
    use std::collections::VecDeque;

    /// (set, alone)
    fn queue(items: &[(char, bool)]) -> VecDeque<(usize, char, bool)> {
        items
            .iter()
            .enumerate()
            .map(|(i, &(set, alone))| (i, set, alone))
            .collect()
    }

    fn take(q: &mut VecDeque<(usize, char, bool)>, max: usize) -> Vec<usize> {
        take_batch(q, max, |t| t.2, |a, b| a.1 == b.1)
            .into_iter()
            .map(|t| t.0)
            .collect()
    }

    #[test]
    fn a_batch_is_the_head_and_every_later_request_of_its_set_in_order() {
        let mut q = queue(&[('a', false), ('b', false), ('a', false), ('a', false)]);
        assert_eq!(take(&mut q, 64), [0, 2, 3]);
        assert_eq!(take(&mut q, 64), [1]);
        assert_eq!(take(&mut q, 64), Vec::<usize>::new());
    }

    #[test]
    fn requests_to_evaluate_alone_are_never_batched() {
        let mut q = queue(&[('a', true), ('a', false), ('a', true), ('a', false)]);
        assert_eq!(take(&mut q, 64), [0]);
        assert_eq!(take(&mut q, 64), [1, 3]);
        assert_eq!(take(&mut q, 64), [2]);
    }

    #[test]
    fn a_batch_is_capped_and_the_rest_keep_their_order() {
        let mut q = queue(&[('a', false); 5]);
        assert_eq!(take(&mut q, 2), [0, 1]);
        assert_eq!(take(&mut q, 2), [2, 3]);
        assert_eq!(take(&mut q, 2), [4]);
    }
}
