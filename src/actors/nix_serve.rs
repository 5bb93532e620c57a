//! The workers' long-lived `nix-store --serve` sessions, which read runtime
//! closures without starting Nix processes (see `nix::serve` for the protocol and
//! why).
//!
//! It is only ever a faster way to an answer: whenever it cannot give one (it did
//! not start, it died, it took too long, a path of the closure was not valid) it
//! is stopped and the caller asks Nix the slow way, which also explains a failure
//! to the client. An output that is not registered yet is the exception: it is
//! asked about first, and the session stays (see [`Served::NotValid`]).

use crate::layers::StorePathInfo;
use crate::nix::serve;
use std::io::{self, BufReader};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A local store answers a closure query in milliseconds; one that takes this long
/// waits for a lock, and the slow way has the build's own limit and messages.
const QUERY_LIMIT: Duration = Duration::from_secs(30);
/// A session older than this is stopped before its next query. Nix caches what
/// it has read of each path; should a path be collected and built again with other
/// bytes meanwhile, a new session reads its new NAR hash.
const MAX_AGE: Duration = Duration::from_secs(300);
/// After a session fails, closures are read the slow way this long.
const BACKOFF: Duration = Duration::from_secs(60);

/// Bumped by every garbage collection the registry runs: sessions started before
/// one are not used again.
static COLLECTIONS: AtomicU64 = AtomicU64::new(0);

pub fn collected() {
    COLLECTIONS.fetch_add(1, Ordering::Relaxed);
}

/// The idle sessions, shared by every worker: there are only as many as closures
/// were read at once, and a worker takes one for a query and puts it back.
#[derive(Clone, Default)]
pub struct ServePool(Arc<Mutex<Pool>>);

struct Pool {
    idle: Vec<Session>,
    failed_at: Option<Instant>,
    /// [`QUERY_LIMIT`], but for tests.
    limit: Duration,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            idle: Vec::new(),
            failed_at: None,
            limit: QUERY_LIMIT,
        }
    }
}

/// What a session says of a closure.
#[derive(Debug, PartialEq)]
pub enum Served {
    /// The closure, with each path's registration.
    Closure(Vec<StorePathInfo>),
    /// These outputs are not registered (yet): an image that found its outputs
    /// built (`nix::path_built`, which sees them a moment before Nix registers
    /// them) realises them instead. Asked about before the closure, so that the
    /// session stays, where a closure query would have ended it and had every
    /// closure read the slow way for a while (300 new images from 32 clients then
    /// took 12.8 s instead of 7.6 s).
    NotValid(Vec<String>),
    /// No session could answer (the log says why): ask Nix the slow way.
    Unavailable,
}

impl ServePool {
    /// The runtime closure of `outputs`, from an idle session or one started by
    /// `start`.
    pub fn closure(&self, outputs: &[String], start: impl FnOnce() -> Command) -> Served {
        let (idle, stale) = {
            let mut pool = self.lock();
            if pool.failed_at.is_some_and(|t| t.elapsed() < BACKOFF) {
                return Served::Unavailable;
            }
            let (fresh, stale): (Vec<_>, Vec<_>) = std::mem::take(&mut pool.idle)
                .into_iter()
                .partition(Session::fresh);
            pool.idle = fresh;
            (pool.idle.pop(), stale)
        };
        drop(stale);
        let mut session = match idle {
            Some(s) => s,
            None => match self.start(start()) {
                Some(s) => s,
                None => return Served::Unavailable,
            },
        };
        match session.closure(outputs) {
            Ok(served) => {
                self.lock().idle.push(session);
                served
            }
            Err(e) => {
                self.failed(format!("nix-store --serve: {e}"));
                Served::Unavailable
            }
        }
    }

    /// Starts a session before the first closure is asked for, so that one does
    /// not wait for a Nix process to start.
    pub fn warm(&self, start: Command) {
        if let Some(s) = self.start(start) {
            self.lock().idle.push(s);
        }
    }

    /// A new session; None when it did not start (then the pool backs off).
    fn start(&self, cmd: Command) -> Option<Session> {
        let limit = self.lock().limit;
        match Session::start(cmd, limit) {
            Ok(s) => Some(s),
            Err(e) => {
                self.failed(format!("nix-store --serve did not start: {e}"));
                None
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the idle sessions too: none is asked anything until the backoff ends.
    fn failed(&self, why: String) {
        log::warn!(
            "{why}; closures are read with nix-store --query and --dump-db for the next {} s",
            BACKOFF.as_secs()
        );
        let idle = {
            let mut pool = self.lock();
            pool.failed_at = Some(Instant::now());
            std::mem::take(&mut pool.idle)
        };
        drop(idle);
    }
}

struct Session {
    limit: Duration,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    started: Instant,
    collections: u64,
}

impl Session {
    fn start(mut cmd: Command, limit: Duration) -> io::Result<Session> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // What it would say there is said again by the slow way, to the log.
            .stderr(Stdio::null())
            .spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            unreachable!("piped above");
        };
        let mut session = Session {
            limit,
            child,
            stdin,
            stdout: BufReader::new(stdout),
            started: Instant::now(),
            collections: COLLECTIONS.load(Ordering::Relaxed),
        };
        session.within(|s| {
            serve::write_greeting(&mut s.stdin)?;
            serve::read_greeting(&mut s.stdout, &mut s.stdin)
        })?;
        Ok(session)
    }

    fn fresh(&self) -> bool {
        self.started.elapsed() < MAX_AGE && self.collections == COLLECTIONS.load(Ordering::Relaxed)
    }

    fn closure(&mut self, outputs: &[String]) -> io::Result<Served> {
        self.within(|s| {
            serve::write_valid_paths_query(&mut s.stdin, outputs)?;
            let valid = serve::read_paths(&mut s.stdout)?;
            let not_valid: Vec<String> = outputs
                .iter()
                .filter(|p| !valid.contains(p))
                .cloned()
                .collect();
            if !not_valid.is_empty() {
                return Ok(Served::NotValid(not_valid));
            }
            serve::write_closure_query(&mut s.stdin, outputs)?;
            let paths = serve::read_paths(&mut s.stdout)?;
            serve::write_path_info_query(&mut s.stdin, &paths)?;
            let infos = serve::read_path_infos(&mut s.stdout)?;
            // An invalid path is left out of the answer, and Nix remembers it as
            // invalid: this session is done.
            if infos.len() != paths.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} of {} paths are not valid",
                        paths.len() - infos.len(),
                        paths.len()
                    ),
                ));
            }
            Ok(Served::Closure(infos))
        })
    }

    /// Runs `talk`, killing the process should it take longer than its limit: the
    /// blocked read then ends with an error.
    fn within<T>(&mut self, talk: impl FnOnce(&mut Self) -> io::Result<T>) -> io::Result<T> {
        let pid = self.child.id() as i32;
        let limit = self.limit;
        let (done, wait) = mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = wait.recv_timeout(limit) {
                // SAFETY: kill(2) on our own child, not reaped before the session
                // is dropped, so the pid is still its own.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        });
        let result = talk(self);
        drop(done);
        let _ = watchdog.join();
        result
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_that_cannot_start_is_not_started_again_for_a_while() {
        let pool = ServePool::default();
        let outputs = ["/nix/store/00000000000000000000000000000000-x".to_string()];
        let mut starts = 0;
        // `true` exits without a greeting, as a Nix without --serve would.
        for _ in 0..3 {
            let served = pool.closure(&outputs, || {
                starts += 1;
                Command::new("true")
            });
            assert_eq!(served, Served::Unavailable);
        }
        assert_eq!(starts, 1);
        pool.warm(Command::new("true"));
        assert!(pool.lock().idle.is_empty());
    }

    #[test]
    fn a_session_that_does_not_answer_is_stopped_at_its_limit() {
        let pool = ServePool::default();
        pool.lock().limit = Duration::from_millis(300);
        let started = Instant::now();
        // Reads nothing and says nothing: the greeting waits for an answer.
        let mut silent = Command::new("sleep");
        silent.arg("30");
        pool.warm(silent);
        let waited = started.elapsed();
        assert!(pool.lock().idle.is_empty());
        assert!(pool.lock().failed_at.is_some());
        // Killed at the limit, not waited for until `sleep` ends by itself.
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(20),
            "stopped after {waited:?}"
        );
    }

    #[test]
    fn an_output_not_registered_yet_is_said_so_and_the_session_stays() {
        let pool = ServePool::default();
        let mut starts = 0;
        let mut start = || {
            starts += 1;
            let mut nix = Command::new("nix-store");
            nix.arg("--serve");
            nix
        };
        // A store path nothing has built.
        let missing = vec!["/nix/store/00000000000000000000000000000000-not-built".to_string()];
        assert_eq!(
            pool.closure(&missing, &mut start),
            Served::NotValid(missing.clone())
        );
        assert!(pool.lock().failed_at.is_none());
        assert_eq!(pool.lock().idle.len(), 1);
        // The same session then reads a closure: one added to the store here.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nixery-serve-test");
        std::fs::write(&file, "a path for the registry's tests\n").unwrap();
        let added = Command::new("nix-store")
            .arg("--add")
            .arg(&file)
            .output()
            .unwrap();
        assert!(added.status.success(), "{added:?}");
        let path = String::from_utf8(added.stdout).unwrap().trim().to_string();
        match pool.closure(std::slice::from_ref(&path), &mut start) {
            Served::Closure(infos) => {
                assert_eq!(infos.len(), 1);
                assert_eq!(infos[0].path, path);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(starts, 1, "the session was started again");
    }
}
