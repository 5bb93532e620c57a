//! Runs an external program with a wall-clock limit, draining stdout and stderr at the
//! same time (so a chatty child can never block on a full pipe), and kills its whole
//! process group when the limit passes, so builders started by Nix die with it.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// The process groups of the children running now. Each child leads a group of its
/// own, so that a timeout stops its builders with it, and that also keeps it out of
/// reach of a signal to the server's group: without [`stop_all`] a Nix build would
/// outlive the server and hold its output locks against the next one's builds.
static RUNNING: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn running() -> std::sync::MutexGuard<'static, BTreeSet<u32>> {
    RUNNING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A child's group in [`RUNNING`] until the child has been reaped (a group id is
/// not signalled after it may have been reused).
struct Registered(u32);

impl Registered {
    fn new(pid: u32) -> Registered {
        running().insert(pid);
        Registered(pid)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        running().remove(&self.0);
    }
}

/// Stops every child still running, as a timeout does (SIGTERM to its group, then
/// SIGKILL after `grace`), for a server on its way out; how many there were.
pub fn stop_all(grace: Duration) -> usize {
    let groups: Vec<u32> = running().iter().copied().collect();
    for &pid in &groups {
        signal_group(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while !running().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    for &pid in running().iter() {
        signal_group(pid, libc::SIGKILL);
    }
    groups.len()
}

#[derive(Debug)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("could not start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} exited with {status}")]
    Failed {
        program: String,
        status: std::process::ExitStatus,
        stderr: Vec<u8>,
    },
    #[error("{program} ran longer than {secs} s")]
    TimedOut {
        program: String,
        secs: u64,
        stderr: Vec<u8>,
    },
    /// Stopped because the caller's check said it was stuck.
    #[error("{program} was stuck and was stopped")]
    Stalled { program: String, stderr: Vec<u8> },
}

pub fn run(program: &str, args: &[String], timeout: Duration) -> Result<Output, RunError> {
    run_watching(program, args, timeout, |_| {})
}

/// Like [`run`], and calls `on_stderr_line` with every line of stderr as it comes,
/// for progress reports.
pub fn run_watching(
    program: &str,
    args: &[String],
    timeout: Duration,
    on_stderr_line: impl FnMut(&str) + Send + 'static,
) -> Result<Output, RunError> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    run_command(cmd, timeout, on_stderr_line)
}

/// Runs a prepared command (arguments and environment set by the caller) as
/// [`run_watching`] does.
pub fn run_command(
    cmd: Command,
    timeout: Duration,
    on_stderr_line: impl FnMut(&str) + Send + 'static,
) -> Result<Output, RunError> {
    run_command_unless(cmd, timeout, on_stderr_line, |_| false)
}

/// Runs as [`run_command`], and stops the child as a timeout would when
/// `stalled(pid)`, asked about once a second, says it is stuck: then the result is
/// [`RunError::Stalled`].
pub fn run_command_unless(
    mut cmd: Command,
    timeout: Duration,
    on_stderr_line: impl FnMut(&str) + Send + 'static,
    mut stalled: impl FnMut(u32) -> bool,
) -> Result<Output, RunError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let program = program.as_str();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|source| RunError::Spawn {
            program: program.to_string(),
            source,
        })?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let out = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf); // a read error just ends the capture
        buf
    });
    let stderr = child.stderr.take().expect("piped stderr");
    let err = thread::spawn(move || {
        let mut on_line = on_stderr_line;
        let mut reader = std::io::BufReader::new(stderr);
        let mut buf = Vec::new();
        loop {
            let start = buf.len();
            match std::io::BufRead::read_until(&mut reader, b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => on_line(String::from_utf8_lossy(&buf[start..]).trim_end()),
            }
        }
        buf
    });
    // A thread blocks in wait(2) and hands the status over: a poll of the child
    // would add up to its interval to every run, and Nix's short queries last only
    // a few of them.
    let pid = child.id();
    let _registered = Registered::new(pid);
    let (exited, status_of) = mpsc::channel();
    thread::spawn(move || {
        let _ = exited.send(child.wait());
    });
    let deadline = Instant::now() + timeout;
    let mut next_check = Instant::now() + Duration::from_secs(1);
    let mut stuck = false;
    let status = loop {
        let now = Instant::now();
        if now >= deadline {
            break None;
        }
        match status_of.recv_timeout(next_check.min(deadline) - now) {
            Ok(Ok(status)) => break Some(status),
            Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => break None,
            Err(RecvTimeoutError::Timeout) if Instant::now() >= next_check => {
                next_check = Instant::now() + Duration::from_secs(1);
                if stalled(pid) {
                    stuck = true;
                    break None;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
    };
    let Some(status) = status else {
        // SIGTERM first: nix-store then stops its builders, which run in sessions of
        // their own out of reach of a group kill; SIGKILL whatever is left after that.
        signal_group(pid, libc::SIGTERM);
        let waited = status_of.recv_timeout(Duration::from_secs(5));
        signal_group(pid, libc::SIGKILL);
        if let Err(RecvTimeoutError::Timeout) = waited {
            let _ = status_of.recv();
        }
        let stderr = err.join().unwrap_or_default();
        let _ = out.join();
        if stuck {
            return Err(RunError::Stalled {
                program: program.to_string(),
                stderr,
            });
        }
        return Err(RunError::TimedOut {
            program: program.to_string(),
            secs: timeout.as_secs(),
            stderr,
        });
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if status.success() {
        Ok(Output { stdout, stderr })
    } else {
        Err(RunError::Failed {
            program: program.to_string(),
            status,
            stderr,
        })
    }
}

fn signal_group(pid: u32, signal: i32) {
    // SAFETY: kill(2) with a negative pid signals the process group the child leads.
    unsafe {
        libc::kill(-(pid as i32), signal);
    }
}

/// Whether a process has child processes right now (true when it cannot be told, so nothing is
/// stopped on a guess).
pub fn has_children(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|c| !c.trim().is_empty())
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["-c".into(), script.into()]
    }

    #[test]
    fn captures_both_streams_without_deadlock() {
        // 1 MiB on each stream: more than a pipe buffer, so sequential reads would hang.
        let out = run(
            "sh",
            &sh("head -c 1048576 /dev/zero; head -c 1048576 /dev/zero >&2"),
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(out.stdout.len(), 1 << 20);
        assert_eq!(out.stderr.len(), 1 << 20);
    }

    #[test]
    fn stderr_lines_are_reported_as_they_come() {
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = lines.clone();
        let out = run_watching(
            "sh",
            &sh("echo one >&2; echo out; echo two >&2"),
            Duration::from_secs(5),
            move |l| seen.lock().unwrap().push(l.to_string()),
        )
        .unwrap();
        assert_eq!(*lines.lock().unwrap(), ["one", "two"]);
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"one\ntwo\n");
    }

    #[test]
    fn failure_keeps_stderr() {
        match run("sh", &sh("echo boom >&2; exit 3"), Duration::from_secs(5)) {
            Err(RunError::Failed { stderr, status, .. }) => {
                assert_eq!(stderr, b"boom\n");
                assert_eq!(status.code(), Some(3));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn timeout_kills_the_group() {
        let start = Instant::now();
        match run(
            "sh",
            &sh("echo started >&2; sleep 30 & sleep 30; wait"),
            Duration::from_millis(300),
        ) {
            Err(RunError::TimedOut { stderr, .. }) => assert_eq!(stderr, b"started\n"),
            other => panic!("{other:?}"),
        }
        // The grandchild held stderr open; returning promptly shows it died too.
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_stalled_child_is_stopped_with_its_group() {
        let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = asked.clone();
        let mut cmd = Command::new("sh");
        cmd.args(sh("echo started >&2; sleep 30 & sleep 30; wait"));
        let result = run_command_unless(
            cmd,
            Duration::from_secs(120),
            |_| {},
            move |pid| {
                assert!(pid > 0);
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 1
            },
        );
        match result {
            Err(RunError::Stalled { stderr, .. }) => assert_eq!(stderr, b"started\n"),
            other => panic!("{other:?}"),
        }
        // Asked once a second until it said stuck: twice.
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn missing_program() {
        assert!(matches!(
            run("/nonexistent/prog", &[], Duration::from_secs(1)),
            Err(RunError::Spawn { .. })
        ));
    }
}
