//! Realisations wait here while every build worker is busy, and the next free
//! worker takes all of them in one `nix-store --realise --keep-going`. One Nix
//! process then schedules every queued image's derivations together (`max-jobs` at
//! once, shared ones once), where one process per image had the others wait for
//! its output locks, and a small image queued behind large ones waited for a whole
//! worker. Each image is answered as soon as its own outputs are in the store, not
//! when the batch ends. A lone realisation goes as it always did, at once on an
//! idle registry; while others run or are on their way, it waits a moment for them
//! (see [`GATHER`]). An image whose outputs are not there when its batch fails is
//! realised again alone, so its error is its own.

use super::eval_queue::{batch_label, take_batch};
use super::{ask, NixRunner};
use crate::actors::nix_worker::{Claim, NixWorker, ReadClosure, Realise, RealiseBatch};
use crate::error::BuildError;
use crate::layers::StorePathInfo;
use crate::nix;
use actix::Addr;
use futures::future::BoxFuture;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Images one realisation takes at most, so that the build limit of one process
/// is not asked to cover an unbounded amount of work.
const MAX_BATCH: usize = 64;

/// How long a new realisation waits for others to join it while another one runs or
/// other images are on their way here (being evaluated or looked up). Requests that
/// come together (a deployment's new images) then share one Nix process instead of
/// two or more holding locks the others wait for, each wait costing up to Nix's
/// lock poll of a second. On an idle registry a lone realisation starts at once.
const GATHER: Duration = Duration::from_millis(250);

/// How often a gathering queue looks again whether it may start.
const GATHER_POLL: Duration = Duration::from_millis(20);

/// How often a waiting image looks for its outputs in the store (a `stat` of each).
const POLL: Duration = Duration::from_millis(50);

/// How long an image whose outputs look built waits for Nix to register them
/// before it realises them itself. Nix registers a path right after setting its
/// files' times, so this is only ever the wait for a busy database.
const REGISTRATION_WAIT: Duration = Duration::from_secs(1);

pub struct RealiseQueue {
    /// The build workers.
    workers: Addr<NixWorker>,
    /// Where an image whose outputs are already built reads its closure, without
    /// waiting for a build worker.
    readers: Addr<NixWorker>,
    /// Realisations running at once: the build workers.
    capacity: usize,
    /// [`GATHER`], but for tests.
    gather: Duration,
    /// Images on their way here: each holds a [`Coming`].
    coming: AtomicUsize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Waiting>,
    running: usize,
    /// A dispatch is due when the queue's head has gathered long enough.
    gathering: bool,
}

struct Waiting {
    job: Realise,
    queued: Instant,
    /// Realised on its own: its outputs were missing when its batch failed.
    alone: bool,
    reply: oneshot::Sender<Outcome>,
}

/// An image on its way to the realisation queue (see [`RealiseQueue::coming`]).
pub struct Coming(Arc<RealiseQueue>);

impl Drop for Coming {
    fn drop(&mut self) {
        if self.0.coming.fetch_sub(1, Ordering::SeqCst) == 1 {
            // The last one: what gathered for it need not wait out the poll.
            self.0.dispatch();
        }
    }
}

enum Outcome {
    /// Realised alone: its closure, or why not.
    Closure(Result<Vec<StorePathInfo>, BuildError>),
    /// Its outputs are in the store; the caller reads the closure.
    Built,
}

impl RealiseQueue {
    pub fn new(workers: Addr<NixWorker>, readers: Addr<NixWorker>, capacity: usize) -> Arc<Self> {
        Self::gathering_for(workers, readers, capacity, GATHER)
    }

    fn gathering_for(
        workers: Addr<NixWorker>,
        readers: Addr<NixWorker>,
        capacity: usize,
        gather: Duration,
    ) -> Arc<Self> {
        Arc::new(RealiseQueue {
            workers,
            readers,
            capacity: capacity.max(1),
            gather,
            coming: AtomicUsize::new(0),
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
            return Box::pin(read_closure(self.readers.clone(), job));
        }
        let (reply, mut answer) = oneshot::channel();
        self.lock().queue.push_back(Waiting {
            job: job.clone(),
            queued: Instant::now(),
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
            read_closure(readers, job).await
        })
    }

    /// Counts an image as on its way here until the guard is dropped, which its
    /// build does once it has queued its realisation, or has none to queue.
    pub fn coming(self: &Arc<Self>) -> Coming {
        self.coming.fetch_add(1, Ordering::SeqCst);
        Coming(self.clone())
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
                let head = &state.queue[0];
                let others = state.running > 0 || self.coming.load(Ordering::SeqCst) > 0;
                if others && !head.alone && head.queued.elapsed() < self.gather {
                    if !state.gathering {
                        state.gathering = true;
                        let queue = self.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(GATHER_POLL).await;
                            queue.lock().gathering = false;
                            queue.dispatch();
                        });
                    }
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
            let result = ask(&self.workers, w.job).await;
            let _ = w.reply.send(Outcome::Closure(result));
            return;
        }
        let msg = RealiseBatch {
            label: batch_label(batch.iter().map(|w| w.job.label.as_str())),
            system: batch[0].job.system,
            evaluations: batch.iter().map(|w| w.job.evaluation.clone()).collect(),
            progress: batch.iter().map(|w| w.job.progress.clone()).collect(),
        };
        let started = Instant::now();
        // The outputs that are not valid after it: every one when that is unknown.
        let invalid = match ask(&self.workers, msg).await {
            Ok(invalid) => Some(invalid),
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

/// The closure of an image whose outputs are built, read by a worker that does not
/// build. The files said they are built; should Nix not have registered them yet
/// (the instant between), the read is tried again every [`POLL`] for up to
/// [`REGISTRATION_WAIT`], and then a realisation waits for that: a second
/// `nix-store` for the same derivations, which polls the building one's locks
/// once a second.
async fn read_closure(
    readers: Addr<NixWorker>,
    job: Realise,
) -> Result<Vec<StorePathInfo>, BuildError> {
    let outputs = job.evaluation.output_paths();
    let until = Instant::now() + REGISTRATION_WAIT;
    loop {
        let read = ReadClosure {
            label: job.label.clone(),
            outputs: outputs.clone(),
        };
        match ask(&readers, read).await {
            Ok(closure) => return Ok(closure),
            Err(_) if Instant::now() < until => tokio::time::sleep(POLL).await,
            Err(_) => break,
        }
    }
    let job = Realise {
        claim: Claim::default(),
        ..job
    };
    readers.realise(job).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::{Evaluation, NixpkgsConfig, ResolvedPackage};
    use actix::SyncArbiter;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    /// A `nix-store` that logs its arguments; `--realise` makes each `X.drv!out`'s
    /// output `X` after a moment, registered as Nix leaves it (mtime 1), and the
    /// queries answer for the paths they are given, unless a file `unregistered`
    /// says nothing is registered yet.
    fn fake_nix(dir: &Path) -> NixWorker {
        let bin = dir.join("bin");
        std::fs::create_dir(&bin).unwrap();
        let script = format!(
            r#"#!/bin/sh
echo "$*" >> {log}
case "$1" in
  --realise)
    sleep 0.3
    for a in "$@"; do case "$a" in
      *.drv!out) p="${{a%.drv!out}}"; : > "$p"; touch -d @1 "$p";;
    esac; done ;;
  --query) [ -e {unregistered} ] && exit 1
    for a in "$@"; do case "$a" in /*) echo "$a";; esac; done ;;
  --dump-db) for a in "$@"; do case "$a" in /*) printf '%s\nsha256:00\n1\n\n0\n' "$a";; esac; done ;;
esac
"#,
            log = dir.join("calls").display(),
            unregistered = dir.join("unregistered").display()
        );
        let path = bin.join("nix-store");
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        NixWorker {
            expr_file: String::new(),
            bin_dir: Some(bin),
            eval_timeout: Duration::from_secs(30),
            build_timeout: Duration::from_secs(30),
            options: Vec::new(),
            config: NixpkgsConfig {
                allow_unfree: false,
                file: String::new(),
            },
            home: dir.to_path_buf(),
            cache_home: None,
            path_labels: Vec::new(),
            serve: Default::default(),
        }
    }

    fn queue(dir: &Path, gather: Duration) -> Arc<RealiseQueue> {
        let worker = fake_nix(dir);
        let (w, r) = (worker.clone(), worker);
        RealiseQueue::gathering_for(
            SyncArbiter::start(2, move || w.clone()),
            SyncArbiter::start(2, move || r.clone()),
            2,
            gather,
        )
    }

    fn job(dir: &Path, name: &str) -> Realise {
        let out = dir.join(name).display().to_string();
        Realise {
            label: name.to_string(),
            system: "x86_64-linux",
            evaluation: Evaluation {
                missing: Vec::new(),
                not_packages: Vec::new(),
                packages: vec![ResolvedPackage {
                    name: name.to_string(),
                    drv_path: format!("{out}.drv"),
                    output: "out".to_string(),
                    path: out,
                    licenses: Vec::new(),
                    homepage: None,
                }],
            },
            progress: Arc::new(|_| {}),
            claim: Claim::default(),
        }
    }

    /// `name`'s closure through the queue; `late` is the failure after 20 s.
    async fn realised_within_20s(
        q: &Arc<RealiseQueue>,
        dir: &Path,
        name: &str,
        late: &str,
    ) -> Vec<StorePathInfo> {
        tokio::time::timeout(Duration::from_secs(20), q.realise(job(dir, name)))
            .await
            .expect(late)
            .unwrap()
    }

    fn realisations(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("calls"))
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("--realise"))
            .map(String::from)
            .collect()
    }

    #[actix_rt::test]
    async fn images_on_their_way_are_realised_with_the_first_in_one_nix_store() {
        let dir = tempfile::tempdir().unwrap();
        let q = queue(dir.path(), Duration::from_secs(60));
        let coming: Vec<Coming> = (0..3).map(|_| q.coming()).collect();
        let names = ["a", "b", "c"];
        let answers: Vec<_> = names
            .iter()
            .map(|n| q.realise(job(dir.path(), n)))
            .collect();
        // The last of them queued: the first no longer waits for anyone.
        drop(coming);
        for (name, answer) in names.iter().zip(futures::future::join_all(answers).await) {
            let closure = answer.unwrap_or_else(|e| panic!("{name}: {e}"));
            let paths: Vec<&str> = closure.iter().map(|p| p.path.as_str()).collect();
            assert_eq!(paths, [dir.path().join(name).to_str().unwrap()]);
        }
        let realised = realisations(dir.path());
        assert_eq!(realised.len(), 1, "{realised:?}");
        assert!(realised[0].contains("--keep-going"), "{realised:?}");
        for name in names {
            assert!(
                realised[0].contains(&format!("/{name}.drv!out")),
                "{realised:?}"
            );
        }
    }

    #[actix_rt::test]
    async fn outputs_that_look_built_wait_for_their_registration_not_a_realisation() {
        let dir = tempfile::tempdir().unwrap();
        let q = queue(dir.path(), Duration::from_secs(60));
        // Its files as Nix leaves them (mtime 1), in the instant before Nix
        // registers the path.
        let out = std::fs::File::create(dir.path().join("a")).unwrap();
        out.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1))
            .unwrap();
        let unregistered = dir.path().join("unregistered");
        std::fs::write(&unregistered, "").unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            std::fs::remove_file(unregistered).unwrap();
        });
        let answer = realised_within_20s(&q, dir.path(), "a", "the closure was never read").await;
        assert_eq!(answer.len(), 1);
        let realised = realisations(dir.path());
        assert!(realised.is_empty(), "realised again: {realised:?}");
    }

    #[actix_rt::test]
    async fn a_lone_image_on_an_idle_queue_is_realised_at_once() {
        let dir = tempfile::tempdir().unwrap();
        // Were it to wait for others, it would wait a minute.
        let q = queue(dir.path(), Duration::from_secs(60));
        let answer =
            realised_within_20s(&q, dir.path(), "a", "a lone realisation waited for others").await;
        assert_eq!(answer.len(), 1);
        let realised = realisations(dir.path());
        assert_eq!(realised.len(), 1, "{realised:?}");
        assert!(!realised[0].contains("--keep-going"), "{realised:?}");
    }
}
