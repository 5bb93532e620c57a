//! BuildCoordinator: one build per image, however many requests ask for it at once.
//!
//! Requests for the same image (same packages, platform and source version) wait
//! on the one in-flight build and all get its result. The build runs detached from
//! the requests, so a client hanging up never cancels it; it still finishes and is
//! cached. Builds beyond the workers plus the queue bound are refused with 429, and a
//! failed build is answered from memory for a short while instead of being retried
//! by every hammering client.
//!
//! An index asks the coordinator for the image of each platform, so a platform is
//! built once whether it is asked for through the index or by its own name. The
//! steps of a build are in [`crate::pipeline`].

use crate::built::BuiltImage;
use crate::error::BuildError;
use crate::image::Arch;
use crate::pipeline::{self, BuildContext, Job};
use actix::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Build (or find) an image or an index.
#[derive(Message, Clone)]
#[rtype(result = "Result<Arc<BuiltImage>, BuildError>")]
pub struct GetImage {
    /// The request key ([`pipeline::request_key`] or [`pipeline::index_key`]).
    pub key: String,
    /// How the build page and the log name it.
    pub name: String,
    pub target: Target,
}

#[derive(Clone)]
pub enum Target {
    /// One platform's image.
    Image(Job),
    /// An index over the images of these jobs, one per platform.
    Index(Vec<Job>),
}

impl GetImage {
    pub fn image(job: Job) -> GetImage {
        GetImage {
            key: job.key.clone(),
            name: job.request.display_name(),
            target: Target::Image(job),
        }
    }
}

/// Sent by a build to the coordinator when it ends.
#[derive(Message)]
#[rtype(result = "()")]
struct BuildFinished {
    key: String,
    result: Result<Arc<BuiltImage>, BuildError>,
}

/// A request waiting for a build.
type Waiter = oneshot::Sender<Result<Arc<BuiltImage>, BuildError>>;

pub struct BuildCoordinator {
    context: Arc<BuildContext>,
    in_flight: HashMap<String, Vec<Waiter>>,
    failures: HashMap<String, (Instant, BuildError)>,
    capacity: usize,
    failure_ttl: Duration,
}

impl BuildCoordinator {
    /// `capacity` is how many distinct builds may be in flight (running or queued).
    pub fn new(context: Arc<BuildContext>, capacity: usize, failure_ttl: Duration) -> Self {
        BuildCoordinator {
            context,
            in_flight: HashMap::new(),
            failures: HashMap::new(),
            capacity: capacity.max(1),
            failure_ttl,
        }
    }
}

impl Actor for BuildCoordinator {
    type Context = Context<Self>;
}

impl Handler<GetImage> for BuildCoordinator {
    type Result = ResponseFuture<Result<Arc<BuiltImage>, BuildError>>;

    fn handle(&mut self, msg: GetImage, ctx: &mut Self::Context) -> Self::Result {
        let key = msg.key.clone();
        let stats = &self.context.shared.stats;
        if let Some((at, err)) = self.failures.get(&key) {
            if at.elapsed() < self.failure_ttl {
                let err = err.clone();
                return Box::pin(async move { Err(err) });
            }
            self.failures.remove(&key);
        }
        let (tx, rx) = oneshot::channel();
        if let Some(waiters) = self.in_flight.get_mut(&key) {
            stats.builds_deduplicated.inc();
            waiters.push(tx);
        } else {
            if self.in_flight.len() >= self.capacity {
                stats.builds_rejected.inc();
                return Box::pin(async {
                    Err(BuildError::Overloaded {
                        retry_after_secs: 10,
                    })
                });
            }
            stats.builds_started.inc();
            self.in_flight.insert(key.clone(), vec![tx]);
            stats.builds_in_flight.set(self.in_flight.len() as i64);
            let context = self.context.clone();
            let me = ctx.address();
            context.shared.begin_build(&key, msg.name.clone());
            actix::spawn(async move {
                let started = Instant::now();
                let label = format!("{} [{}]", msg.name, &key[..12]);
                log::info!("build {label}: started");
                let result = match msg.target {
                    Target::Image(job) => pipeline::build_image(&context, &job).await,
                    Target::Index(jobs) => build_index(&context, &me, &key, jobs).await,
                };
                match &result {
                    Ok(img) => log::info!(
                        "build {label}: done in {:.2}s, manifest {}",
                        started.elapsed().as_secs_f64(),
                        img.docker.digest
                    ),
                    Err(e) => log::warn!("build {label}: failed: {e}"),
                }
                me.do_send(BuildFinished { key, result });
            });
        }
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(BuildError::Internal("build was abandoned".into())))
        })
    }
}

/// Every platform's image through the coordinator (so each is deduplicated with
/// requests for it by name), then the index over them. The first platform that
/// fails fails the index, named.
async fn build_index(
    context: &BuildContext,
    me: &Addr<BuildCoordinator>,
    key: &str,
    jobs: Vec<Job>,
) -> Result<Arc<BuiltImage>, BuildError> {
    let platforms: Vec<Arch> = jobs.iter().map(|j| j.arch).collect();
    let names: Vec<String> = platforms.iter().map(|a| a.platform()).collect();
    context
        .shared
        .enter_phase(key, &format!("building {}", names.join(", ")));
    let results =
        futures::future::join_all(jobs.into_iter().map(|job| me.send(GetImage::image(job)))).await;
    let mut children = Vec::with_capacity(results.len());
    for (arch, result) in platforms.into_iter().zip(results) {
        let image = result
            .map_err(|e| BuildError::Internal(format!("coordinator unavailable: {e}")))
            .and_then(|r| r)
            .map_err(|cause| BuildError::Platform {
                platform: arch.platform(),
                system: arch.nix_system(),
                cause: Box::new(cause),
            })?;
        children.push((arch, image));
    }
    pipeline::build_index(context, children).await
}

impl Handler<BuildFinished> for BuildCoordinator {
    type Result = ();

    fn handle(&mut self, msg: BuildFinished, _: &mut Self::Context) {
        let shared = &self.context.shared;
        let progress = shared.end_build(&msg.key);
        match &msg.result {
            Ok(image) => shared.remember_image(&msg.key, image),
            // A caller turned away is no failure of the image.
            Err(e) if e.is_refusal() => {}
            Err(e) => {
                if matches!(e, BuildError::NoSpace { .. }) {
                    shared.gc_wanted.notify_one();
                }
                shared.stats.builds_failed.inc();
                shared.record_failure(progress.map(|p| p.image).unwrap_or_default(), e.to_string());
                // Storage and internal faults are transient: the next request retries.
                if !e.is_transient() {
                    self.failures
                        .insert(msg.key.clone(), (Instant::now(), e.clone()));
                }
            }
        }
        let waiters = self.in_flight.remove(&msg.key).unwrap_or_default();
        shared
            .stats
            .builds_in_flight
            .set(self.in_flight.len() as i64);
        for waiter in waiters {
            // A waiter whose client hung up has dropped its receiver; that is fine.
            let _ = waiter.send(msg.result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageRequest;
    use crate::pipeline::fake::{context, source, FakeNix};
    use crate::storage::{memory::MemStorage, Storage};

    fn start(nix: &Arc<FakeNix>) -> Addr<BuildCoordinator> {
        let storage = Arc::new(Storage::Memory(MemStorage::new()));
        BuildCoordinator::new(context(nix.clone(), storage), 16, Duration::from_secs(60)).start()
    }

    fn index(name: &str) -> GetImage {
        let request = ImageRequest::from_name(name, 64).unwrap();
        let archs = [Arch::Amd64, Arch::Arm64];
        GetImage {
            key: pipeline::index_key(&request, &source(false), &archs),
            name: request.display_name(),
            target: Target::Index(
                archs
                    .iter()
                    .map(|a| Job::new(&request, *a, &source(false)))
                    .collect(),
            ),
        }
    }

    fn image(name: &str, arch: Arch) -> GetImage {
        let request = ImageRequest::from_name(name, 64).unwrap();
        GetImage::image(Job::new(&request, arch, &source(false)))
    }

    #[actix_rt::test]
    async fn concurrent_requests_share_one_build_per_platform() {
        let nix = FakeNix::new(vec![]);
        let coordinator = start(&nix);
        let indexes = (0..50).map(|_| coordinator.send(index("hello")));
        let arm = (0..10).map(|_| coordinator.send(image("hello", Arch::Arm64)));
        let (indexes, arm) = futures::join!(
            futures::future::join_all(indexes),
            futures::future::join_all(arm)
        );
        let indexes: Vec<Arc<BuiltImage>> =
            indexes.into_iter().map(|r| r.unwrap().unwrap()).collect();
        let arm: Vec<Arc<BuiltImage>> = arm.into_iter().map(|r| r.unwrap().unwrap()).collect();
        assert!(indexes
            .iter()
            .all(|i| i.oci.digest == indexes[0].oci.digest));
        assert_eq!(indexes[0].children.len(), 2);
        assert_eq!(indexes[0].children[1].oci.digest, arm[0].oci.digest);
        assert_eq!(nix.realised("x86_64-linux"), 1);
        assert_eq!(nix.realised("aarch64-linux"), 1);
        assert_eq!(nix.evaluations.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[actix_rt::test]
    async fn an_unbuildable_platform_fails_the_index_by_name_and_not_the_others() {
        let nix = FakeNix::new(vec!["aarch64-linux"]);
        let coordinator = start(&nix);
        let err = coordinator.send(index("hello")).await.unwrap().unwrap_err();
        match &err {
            BuildError::Platform {
                platform,
                system,
                cause,
            } => {
                assert_eq!(
                    (platform.as_str(), *system),
                    ("linux/arm64/v8", "aarch64-linux")
                );
                assert!(matches!(**cause, BuildError::BuildFailed(_)), "{cause:?}");
            }
            other => panic!("{other:?}"),
        }
        let amd = coordinator.send(image("hello", Arch::Amd64)).await.unwrap();
        assert!(amd.is_ok(), "{amd:?}");
        // The failure is remembered: asking again runs no Nix for the platform.
        let again = coordinator.send(index("hello")).await.unwrap();
        assert_eq!(again.unwrap_err(), err);
        assert_eq!(nix.realised("aarch64-linux"), 1);
    }

    #[actix_rt::test]
    async fn a_caller_turned_away_leaves_the_image_to_the_next() {
        let nix = FakeNix::new(vec![]);
        let coordinator = start(&nix);
        let request = ImageRequest::from_name("hello", 64).unwrap();
        let job = |may_build| {
            Job::new(&request, Arch::Amd64, &source(false)).for_client(Some(pipeline::Client {
                key: "someone".into(),
                may_build,
            }))
        };
        let refused = coordinator.send(GetImage::image(job(false))).await.unwrap();
        assert_eq!(
            refused.unwrap_err(),
            BuildError::LoginRequired("hello".into())
        );
        // Not answered from the failure cache: a caller who may build gets it.
        let built = coordinator.send(GetImage::image(job(true))).await.unwrap();
        assert!(built.is_ok(), "{built:?}");
    }
}
