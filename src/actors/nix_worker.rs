//! NixWorker: a pool of synchronous actors (one thread each) that run Nix and pack
//! layers. Both block (on a subprocess, or on tar and gzip, and on storage taking
//! the chunks), so each worker does one job at a time and the pool size bounds how
//! many run at once.

use super::nix_serve::{self, ServePool, Served};
use crate::archive::{self, LayerSummary, SymlinkLayerInfo};
use crate::compression::Codec;
use crate::error::BuildError;
use crate::layers::StorePathInfo;
use crate::nix::{self, Evaluation, NixpkgsConfig, SourceArgs};
use crate::process::{self, RunError};
use crate::reference::Digest;
use crate::storage::stream::BlobSender;
use actix::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Resolve the packages of an image to derivations and output paths.
#[derive(Message)]
#[rtype(result = "Result<Evaluation, BuildError>")]
pub struct Evaluate {
    /// The image and build key, for the server log.
    pub label: String,
    pub source: SourceArgs,
    pub system: &'static str,
    pub packages: Vec<String>,
    pub optional: Vec<String>,
}

/// Resolve several images' packages in one evaluation of the package set; each
/// result is None where that image's evaluation threw.
#[derive(Message)]
#[rtype(result = "Result<Vec<Option<Evaluation>>, BuildError>")]
pub struct EvaluateBatch {
    /// The images, for the server log.
    pub label: String,
    pub source: SourceArgs,
    pub system: &'static str,
    pub requests: Vec<Vec<String>>,
    pub optional: Vec<String>,
}

/// Build (or substitute) the evaluated packages and read their runtime closure.
#[derive(Message)]
#[rtype(result = "Result<Vec<StorePathInfo>, BuildError>")]
#[derive(Clone)]
pub struct Realise {
    /// The image and build key, for the server log.
    pub label: String,
    pub system: &'static str,
    pub evaluation: Evaluation,
    /// Told "building N of M derivations" as Nix goes.
    pub progress: Progress,
    /// Who takes this job: the worker that starts it, or the caller that stopped
    /// waiting for it in the queue.
    pub claim: Claim,
}

/// Where a realisation reports what Nix is doing.
pub type Progress = Arc<dyn Fn(String) + Send + Sync>;

/// Build (or substitute) several images' packages in one `nix-store --realise
/// --keep-going`: one Nix process schedules all their derivations, where one
/// process per image waited for the others' locks. Answers which of the outputs
/// are not valid after it (none when it succeeded).
#[derive(Message)]
#[rtype(result = "Result<Vec<String>, BuildError>")]
pub struct RealiseBatch {
    /// The images, for the server log.
    pub label: String,
    pub system: &'static str,
    pub evaluations: Vec<Evaluation>,
    /// Each image's [`Realise::progress`].
    pub progress: Vec<Progress>,
}

/// The runtime closure of built outputs, with each path's size and references.
#[derive(Message)]
#[rtype(result = "Result<Vec<StorePathInfo>, BuildError>")]
pub struct ReadClosure {
    /// The image and build key, for the server log.
    pub label: String,
    pub outputs: Vec<String>,
}

/// How long a `nix-store --realise` may wait for a lock with no builder of its own
/// running before it is started again. Nix 2.8 processes realising overlapping
/// closures at the same time can each hold output locks the others wait for, and
/// then none of them moves until it is stopped: seen with eight at once over a
/// shared dependency graph (`scripts/bench`), every one of them silent behind
/// "waiting for lock on …" until the build timeout. Stopping one releases its
/// locks; a process that only waits behind another's long build loses nothing but
/// its restart.
const LOCK_STALL: Duration = Duration::from_secs(10);

/// What a realisation's output says about lock waits.
#[derive(Clone)]
struct LockWait(Arc<std::sync::Mutex<LockWaitState>>);

struct LockWaitState {
    /// Paths Nix said it waits to lock.
    waited: Vec<String>,
    last_line: Instant,
}

impl Default for LockWait {
    fn default() -> Self {
        LockWait(Arc::new(std::sync::Mutex::new(LockWaitState {
            waited: Vec::new(),
            last_line: Instant::now(),
        })))
    }
}

impl LockWait {
    fn observe(&self, line: &str) {
        let mut state = self.0.lock().expect("lock wait");
        state.last_line = Instant::now();
        if let Some(rest) = line.trim_start().strip_prefix("waiting for lock on '") {
            if let Some((path, _)) = rest.split_once('\'') {
                state.waited.push(path.to_string());
            }
        }
    }

    /// Silent for [`LOCK_STALL`], no builder running, and a path it waits for not
    /// built yet. (One silent while it downloads has its locks: not stuck.)
    fn stuck(&self, pid: u32) -> bool {
        let state = self.0.lock().expect("lock wait");
        state.last_line.elapsed() >= LOCK_STALL
            && state.waited.iter().any(|p| !nix::path_built(p))
            && !process::has_children(pid)
    }
}

/// A queued job is taken once: by the worker that starts it, or by its caller
/// leaving the queue; whichever comes first.
#[derive(Clone, Default)]
pub struct Claim(Arc<AtomicU8>);

impl Claim {
    const WORKER: u8 = 1;
    const CALLER: u8 = 2;

    /// True when the worker may run the job.
    pub fn by_worker(&self) -> bool {
        self.take(Self::WORKER)
    }

    /// True when the caller may stop waiting: no worker has started the job.
    pub fn by_caller(&self) -> bool {
        self.take(Self::CALLER)
    }

    fn take(&self, who: u8) -> bool {
        self.0
            .compare_exchange(0, who, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}

/// Run Nix's garbage collector, freeing up to `max_freed` bytes (all it can when
/// None). Returns the bytes freed.
#[derive(Message)]
#[rtype(result = "Result<u64, BuildError>")]
pub struct Collect {
    pub max_freed: Option<u64>,
}

/// What goes into a layer.
pub enum LayerContents {
    /// Store paths, whole.
    Store(Vec<PathBuf>),
    /// The image's `/bin`, `/etc`, … as symlinks into these packages.
    Symlinks(Vec<PathBuf>),
}

/// Pack a layer into `sink`, which hands it to storage chunk by chunk as it is
/// compressed.
#[derive(Message)]
#[rtype(result = "Result<PackedLayer, BuildError>")]
pub struct Pack {
    pub contents: LayerContents,
    pub sink: BlobSender,
    pub codec: Codec,
}

/// What packing computed while writing.
#[derive(Debug)]
pub struct PackedLayer {
    pub summary: LayerSummary,
    /// `summary.digest`, parsed.
    pub digest: Digest,
    /// For a symlink layer.
    pub symlinks: Option<SymlinkLayerInfo>,
}

#[derive(Clone)]
pub struct NixWorker {
    pub expr_file: String,
    pub bin_dir: Option<PathBuf>,
    pub eval_timeout: Duration,
    pub build_timeout: Duration,
    /// `--option`s given to every Nix call.
    pub options: Vec<String>,
    pub config: NixpkgsConfig,
    /// An empty directory used as HOME of every Nix call.
    pub home: PathBuf,
    /// Nix's fetch cache (channel tarballs, git clones), kept where the server's
    /// own account keeps it so a restart does not fetch nixpkgs again.
    pub cache_home: Option<PathBuf>,
    /// Server paths and the names clients see instead.
    pub path_labels: Vec<(String, String)>,
    /// `nix-store --serve` sessions for closures, shared by the clones.
    pub serve: ServePool,
}

impl Actor for NixWorker {
    type Context = SyncContext<Self>;
}

impl NixWorker {
    fn program(&self, name: &str) -> String {
        match &self.bin_dir {
            Some(dir) => dir.join(name).display().to_string(),
            None => name.to_string(),
        }
    }

    /// A Nix command with the registry's options and an environment that cannot
    /// change what the package set evaluates to.
    fn command(&self, program: &str, args: &[String]) -> std::process::Command {
        let mut cmd = std::process::Command::new(self.program(program));
        // Nix takes options anywhere; the operation first reads better in process lists.
        cmd.args(args).args(&self.options);
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_none_or(nix::is_leaky_env) {
                cmd.env_remove(&name);
            }
        }
        cmd.env("HOME", &self.home);
        if let Some(cache) = &self.cache_home {
            cmd.env("XDG_CACHE_HOME", cache);
        }
        cmd
    }

    /// Runs `nix-instantiate` within the evaluation limit; its stdout.
    fn instantiate(
        &self,
        args: &[String],
        label: &str,
        system: &str,
    ) -> Result<Vec<u8>, BuildError> {
        let cmd = self.command("nix-instantiate", args);
        process::run_command(cmd, self.eval_timeout, |_| {})
            .map(|o| o.stdout)
            .map_err(|e| self.run_error(e, label, system, "Nix evaluation", BuildError::EvalFailed))
    }

    fn nix_store(&self, args: &[String], label: &str) -> Result<Vec<u8>, BuildError> {
        process::run_command(self.command("nix-store", args), self.build_timeout, |_| {})
            .map(|o| o.stdout)
            .map_err(|e| self.run_error(e, label, "", "Nix build", BuildError::BuildFailed))
    }

    /// What the client is told of Nix's output.
    fn summary(&self, stderr: &[u8], system: &str) -> nix::errors::Failure {
        nix::errors::summarise(
            stderr,
            &nix::errors::ErrorContext {
                path_labels: &self.path_labels,
                system,
            },
        )
    }

    /// The client gets the cause in a few lines; the log gets all of Nix's output,
    /// once per failed run.
    fn run_error(
        &self,
        e: RunError,
        label: &str,
        system: &str,
        what: &'static str,
        failed: fn(String) -> BuildError,
    ) -> BuildError {
        use nix::errors::Failure;
        match e {
            RunError::Spawn { program, source } => {
                BuildError::Internal(format!("cannot run {program}: {source}"))
            }
            RunError::Failed {
                stderr, program, ..
            } => {
                log::warn!(
                    "build {label}: {program} failed; its output:\n{}",
                    nix::errors::sanitise(&stderr).trim_end()
                );
                match self.summary(&stderr, system) {
                    Failure::Refused(line) => BuildError::Refused(line),
                    Failure::NoSpace(line) => BuildError::NoSpace {
                        what: "Nix store",
                        detail: line,
                    },
                    Failure::UnknownRevision(rev) => BuildError::UnknownCommit(rev),
                    Failure::Failed(text) => failed(text),
                }
            }
            // Stopped stuck with no time left for another try: out of time.
            RunError::Stalled { program, stderr } => self.run_error(
                RunError::TimedOut {
                    program,
                    secs: self.build_timeout.as_secs(),
                    stderr,
                },
                label,
                system,
                what,
                failed,
            ),
            RunError::TimedOut {
                secs,
                stderr,
                program,
            } => {
                log::warn!(
                    "build {label}: {program} ran past {secs} s; its output:\n{}",
                    nix::errors::sanitise(&stderr).trim_end()
                );
                // A run stopped early may have nothing to say but that.
                let tail = match self.summary(&stderr, system) {
                    Failure::Failed(text) if text == nix::errors::NO_MESSAGE => String::new(),
                    Failure::Refused(text)
                    | Failure::NoSpace(text)
                    | Failure::Failed(text)
                    | Failure::UnknownRevision(text) => text,
                };
                BuildError::Timeout { what, secs, tail }
            }
        }
    }
}

impl Handler<Evaluate> for NixWorker {
    type Result = Result<Evaluation, BuildError>;

    fn handle(&mut self, msg: Evaluate, _: &mut Self::Context) -> Self::Result {
        let args = nix::eval_args(
            &self.expr_file,
            &msg.source,
            &self.config,
            msg.system,
            &msg.packages,
            &msg.optional,
        );
        let out = self.instantiate(&args, &msg.label, msg.system)?;
        nix::parse_evaluation(&out).map_err(BuildError::Internal)
    }
}

impl Handler<EvaluateBatch> for NixWorker {
    type Result = Result<Vec<Option<Evaluation>>, BuildError>;

    fn handle(&mut self, msg: EvaluateBatch, _: &mut Self::Context) -> Self::Result {
        let args = nix::eval_batch_args(
            &self.expr_file,
            &msg.source,
            &self.config,
            msg.system,
            &msg.requests,
            &msg.optional,
        );
        let out = self.instantiate(&args, &msg.label, msg.system)?;
        nix::parse_batch(&out).map_err(BuildError::Internal)
    }
}

impl Handler<Realise> for NixWorker {
    type Result = Result<Vec<StorePathInfo>, BuildError>;

    fn handle(&mut self, msg: Realise, _: &mut Self::Context) -> Self::Result {
        if !msg.claim.by_worker() {
            // Its caller went elsewhere; nobody reads this answer.
            return Ok(Vec::new());
        }
        let outputs = msg.evaluation.output_paths();
        if outputs.is_empty() {
            return Ok(Vec::new());
        }
        let args = nix::realise_args([&msg.evaluation], self.build_timeout.as_secs());
        self.realise(&args, &msg.label, msg.system, msg.progress)?;
        self.closure(outputs, &msg.label)
    }
}

impl Handler<RealiseBatch> for NixWorker {
    type Result = Result<Vec<String>, BuildError>;

    fn handle(&mut self, msg: RealiseBatch, _: &mut Self::Context) -> Self::Result {
        let mut args = nix::realise_args(&msg.evaluations, self.build_timeout.as_secs());
        // One image's failed build does not stop the others'.
        args.push("--keep-going".to_string());
        let progress = msg.progress;
        let report: Progress = Arc::new(move |phase: String| {
            for p in &progress {
                p(phase.clone());
            }
        });
        if self.realise(&args, &msg.label, msg.system, report).is_ok() {
            return Ok(Vec::new());
        }
        // Which images it did build is asked of Nix's database, not read from the
        // files (see `nix::path_built`): those get their answer, the rest are
        // realised again alone.
        let mut check = vec![
            "--check-validity".to_string(),
            "--print-invalid".to_string(),
        ];
        check.extend(msg.evaluations.iter().flat_map(|e| e.output_paths()));
        let invalid = self.nix_store(&check, &msg.label)?;
        Ok(String::from_utf8_lossy(&invalid)
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }
}

impl Handler<ReadClosure> for NixWorker {
    type Result = Result<Vec<StorePathInfo>, BuildError>;

    fn handle(&mut self, msg: ReadClosure, _: &mut Self::Context) -> Self::Result {
        self.closure(msg.outputs, &msg.label)
    }
}

impl NixWorker {
    /// Runs `nix-store` with `args` (a realisation) within the build limit, started
    /// again while it is stuck behind another process's lock.
    fn realise(
        &self,
        args: &[String],
        label: &str,
        system: &str,
        report: Progress,
    ) -> Result<(), BuildError> {
        let timeout = self.build_timeout;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut progress = nix::RealiseProgress::default();
            let report = report.clone();
            let lock_wait = LockWait::default();
            let seen = lock_wait.clone();
            let ran = process::run_command_unless(
                self.command("nix-store", args),
                left,
                move |line| {
                    seen.observe(line);
                    if progress.observe(line) {
                        if let Some(phase) = progress.describe() {
                            report(phase);
                        }
                    }
                },
                |pid| lock_wait.stuck(pid),
            );
            let e = match ran {
                Ok(_) => return Ok(()),
                Err(RunError::Stalled { stderr, .. }) if Instant::now() < deadline => {
                    log::warn!(
                        "build {label}: nix-store waited {} s for a lock with nothing building, \
                         as processes holding each other's locks do; starting it again",
                        LOCK_STALL.as_secs()
                    );
                    log::debug!("its output:\n{}", nix::errors::sanitise(&stderr).trim_end());
                    continue;
                }
                // What is left of the limit after restarts is not the limit.
                Err(RunError::TimedOut {
                    program, stderr, ..
                }) => RunError::TimedOut {
                    program,
                    secs: timeout.as_secs(),
                    stderr,
                },
                Err(e) => e,
            };
            return Err(self.run_error(e, label, system, "Nix build", BuildError::BuildFailed));
        }
    }

    /// The runtime closure of built `outputs`, with each path's size and references,
    /// in path order.
    fn closure(&self, outputs: Vec<String>, label: &str) -> Result<Vec<StorePathInfo>, BuildError> {
        // Without paths, --dump-db would dump the whole store.
        if outputs.is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let served = self.serve.closure(&outputs, || self.serve_command());
        let (mut closure, how) = match served {
            Served::Closure(closure) => (closure, "nix-store --serve"),
            Served::NotValid(paths) => {
                log::debug!("build {label}: not registered yet: {}", paths.join(" "));
                return Err(BuildError::Internal(
                    "the image's packages are not registered in the Nix store".into(),
                ));
            }
            Served::Unavailable => (
                self.read_closure(outputs, label)?,
                "nix-store --query and --dump-db",
            ),
        };
        closure.sort_by(|a, b| a.path.cmp(&b.path));
        log::debug!(
            "build {label}: read the closure ({} paths) from {how} in {} ms",
            closure.len(),
            started.elapsed().as_millis()
        );
        Ok(closure)
    }

    fn serve_command(&self) -> std::process::Command {
        self.command("nix-store", &["--serve".to_string()])
    }

    /// Starts a `nix-store --serve` for the first closure to come. It opens Nix's
    /// store on the way, and creates it where there is none yet.
    pub fn warm_up(&self) {
        self.serve.warm(self.serve_command());
    }

    /// [`NixWorker::closure`] with two Nix processes.
    fn read_closure(
        &self,
        outputs: Vec<String>,
        label: &str,
    ) -> Result<Vec<StorePathInfo>, BuildError> {
        let mut query = vec!["--query".to_string(), "--requisites".to_string()];
        query.extend(outputs);
        let closure = String::from_utf8(self.nix_store(&query, label)?)
            .map_err(|e| BuildError::Internal(format!("nix-store output: {e}")))?;
        let mut dump = vec!["--dump-db".to_string()];
        dump.extend(closure.lines().filter(|l| !l.is_empty()).map(String::from));
        let registration = String::from_utf8(self.nix_store(&dump, label)?)
            .map_err(|e| BuildError::Internal(format!("nix-store output: {e}")))?;
        nix::parse_registration(&registration).map_err(BuildError::Internal)
    }
}

impl Handler<Collect> for NixWorker {
    type Result = Result<u64, BuildError>;

    fn handle(&mut self, msg: Collect, _: &mut Self::Context) -> Self::Result {
        let out = self.nix_store(&nix::gc::gc_args(msg.max_freed), "garbage collection");
        nix_serve::collected();
        let out = out?;
        let text = String::from_utf8_lossy(&out);
        Ok(nix::gc::parse_freed(&text).unwrap_or(0))
    }
}

impl Handler<Pack> for NixWorker {
    type Result = Result<PackedLayer, BuildError>;

    fn handle(&mut self, msg: Pack, _: &mut Self::Context) -> Self::Result {
        pack_layer(msg)
    }
}

/// Writes a layer into the job's sink and ends the blob with its digest; blocks on
/// compression and on storage taking the chunks.
pub fn pack_layer(job: Pack) -> Result<PackedLayer, BuildError> {
    let started = Instant::now();
    let (sink, summary, symlinks) = match &job.contents {
        LayerContents::Store(paths) => {
            archive::write_store_layer(Path::new("/"), paths, job.codec, job.sink)
                .map(|(w, s)| (w, s, None))
        }
        LayerContents::Symlinks(packages) => {
            archive::write_symlink_layer(packages, job.codec, job.sink)
                .map(|(w, s, info)| (w, s, Some(info)))
        }
    }
    .map_err(|e| BuildError::Internal(format!("packing layer: {e}")))?;
    let digest = Digest::parse(&summary.digest)
        .map_err(|e| BuildError::Internal(format!("layer digest {}: {e}", summary.digest)))?;
    sink.finish(digest.clone(), summary.size)
        .map_err(|e| BuildError::Internal(format!("packing layer: {e}")))?;
    log::info!(
        "packed layer {} ({} bytes) in {} ms",
        summary.digest,
        summary.size,
        started.elapsed().as_millis()
    );
    Ok(PackedLayer {
        summary,
        digest,
        symlinks,
    })
}
