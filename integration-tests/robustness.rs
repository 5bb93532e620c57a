//! Black-box robustness tests (issue 5): concurrency, back-pressure, failing and
//! runaway builds, Nix and the server dying mid-build, graceful shutdown.
//!
//! Every test starts its own server (private storage, freshly salted package set)
//! with `nix.bin_dir` pointing at counting wrappers around the real
//! `nix-instantiate` and `nix-store`: each call appends `PID PROGRAM ARGS` to a log,
//! so a test can count evaluations and builds and find (and kill, by PID) the Nix
//! process of a build. A `realise-delay` file next to the wrappers makes every
//! `nix-store --realise` wait that many seconds first, so a fresh build takes long
//! enough for requests to overlap.
//!
//! Builders started by Nix run in a session of their own; they are found by the
//! random salt of the test's package set in their environment (`salt=<hex>`), which
//! nothing else on the machine carries.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{error_of, http_get, http_request, sha256_digest, Headers, NixWrappers, Server};

// ---------------------------------------------------------------------------
// Helpers

/// Queries over the shared counting wrappers that only these tests need.
impl NixWrappers {
    /// Images evaluated: one per `-A info` call of nix-instantiate, one per request
    /// of a `-A batch` call (requests that queue are evaluated together).
    fn evaluations(&self) -> usize {
        self.calls()
            .into_iter()
            .filter(|(_, p, _)| p == "nix-instantiate")
            .map(|(_, _, args)| {
                let mut words = args.split_whitespace();
                match words.find(|w| *w == "requests").and_then(|_| words.next()) {
                    Some(json) => serde_json::from_str::<Vec<serde_json::Value>>(json)
                        .map(|requests| requests.len())
                        .unwrap_or_else(|e| panic!("requests {json}: {e}")),
                    None => 1,
                }
            })
            .sum()
    }

    /// `nix-store --realise` runs besides the `--keep-going` batches that build
    /// images that queued together.
    fn realisations(&self) -> usize {
        self.realise_calls()
            .iter()
            .filter(|(_, args)| !args.split_whitespace().any(|w| w == "--keep-going"))
            .count()
    }

    fn realise_calls(&self) -> Vec<(u32, String)> {
        self.calls()
            .into_iter()
            .filter(|(_, p, a)| p == "nix-store" && a.starts_with("--realise"))
            .map(|(pid, _, a)| (pid, a))
            .collect()
    }

    fn total(&self) -> usize {
        self.calls().len()
    }

    /// Prints the Nix calls so far, and which of them still run, if `done` is
    /// not set within `after` (a watchdog for steps that might hang).
    fn watchdog(&self, what: &'static str, after: Duration) -> Watchdog {
        let log = self.log_path();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        thread::spawn(move || {
            let end = Instant::now() + after;
            while Instant::now() < end {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
            let text = fs::read_to_string(&log).unwrap_or_default();
            let mut running = String::new();
            for line in text.lines() {
                if let Some(pid) = line.split(' ').next().and_then(|p| p.parse::<u32>().ok()) {
                    if is_alive(pid) {
                        let wchan =
                            fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
                        running.push_str(&format!(
                            "  {pid} [{wchan}] {}\n",
                            cmdline(pid).chars().take(160).collect::<String>()
                        ));
                    }
                }
            }
            eprintln!(
                "WATCHDOG: {what} not done after {after:?}. Nix calls:\n{text}still running:\n{running}"
            );
        });
        Watchdog(done)
    }

    /// Polls until `cond` holds on the calls so far; panics after `limit`.
    fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        cond: impl Fn(&[(u32, String, String)]) -> bool,
    ) {
        let end = Instant::now() + limit;
        loop {
            if cond(&self.calls()) {
                return;
            }
            assert!(
                Instant::now() < end,
                "timed out after {limit:?} waiting for {what}; Nix calls:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills (SIGKILL, by PID) every logged Nix process that is still running.
    fn kill_leftovers(&self) -> Vec<u32> {
        let mut killed = Vec::new();
        for (pid, _, _) in self.calls() {
            let cmd = cmdline(pid);
            if is_alive(pid) && (cmd.contains("nix-store") || cmd.contains("nix-instantiate")) {
                kill(pid, libc::SIGKILL);
                killed.push(pid);
            }
        }
        killed
    }
}

impl Drop for NixWrappers {
    fn drop(&mut self) {
        // Nix processes orphaned by a killed server (they run in their own process
        // group) would otherwise outlive the test.
        self.kill_leftovers();
    }
}

/// Stops its watchdog thread when dropped.
struct Watchdog(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Kills, on drop, the builders of one salted package set (by PID).
struct BuilderReaper(String);

impl Drop for BuilderReaper {
    fn drop(&mut self) {
        for pid in builder_pids(&self.0) {
            kill(pid, libc::SIGKILL);
        }
    }
}

fn kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) on one PID this test started (directly or through Nix).
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

fn cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .split(|c: char| c == '\0' || c.is_whitespace())
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Every process id in /proc.
fn pids() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .collect()
}

/// The fields of `/proc/PID/stat` after the command name: state, ppid, pgrp, …
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(String::from).collect())
}

/// Running (not a zombie, not gone).
fn is_alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| running(&f))
}

/// Whether the state in `stat_fields` is a running one (not a zombie, not dead).
fn running(fields: &[String]) -> bool {
    fields
        .first()
        .is_some_and(|state| state != "Z" && state != "X")
}

/// PIDs of the processes whose environment carries `salt=<salt>`: the builders
/// (and their children) of one test's package set.
fn builder_pids(salt: &str) -> Vec<u32> {
    builder_pids_of(salt, None)
}

/// [`builder_pids`] of one derivation, by its `name` (e.g. `slow-1.0`).
fn builder_pids_of(salt: &str, drv_name: Option<&str>) -> Vec<u32> {
    let needle = format!("salt={salt}");
    let name_var = drv_name.map(|n| format!("name={n}"));
    let me = std::process::id();
    let mut found = Vec::new();
    for pid in pids() {
        if pid == me || !is_alive(pid) {
            continue;
        }
        if let Ok(env) = fs::read(format!("/proc/{pid}/environ")) {
            let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
            let named = name_var
                .as_ref()
                .is_none_or(|n| vars.contains(&n.as_bytes()));
            if named && vars.contains(&needle.as_bytes()) {
                found.push(pid);
            }
        }
    }
    found
}

fn describe_pids(pids: &[u32]) -> String {
    pids.iter()
        .map(|p| format!("{p}: {}", cmdline(*p).chars().take(100).collect::<String>()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `errors[0].code` and `errors[0].message` of a registry error body.
fn body_text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

fn manifest_url(server: &Server, name: &str) -> String {
    server.url(&format!("/v2/{name}/manifests/latest"))
}

fn assert_healthy(server: &Server) {
    let (status, _, body) = http_request("GET", &server.url("/v2/"), &[], Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("GET /v2/ failed: {e}; log:\n{}", server.log()));
    assert_eq!(status, 200, "GET /v2/: {}", body_text(&body));
}

/// The blob digests a manifest names (config first).
fn manifest_blobs(manifest: &[u8]) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(manifest).expect("manifest is JSON");
    let mut out = vec![v["config"]["digest"]
        .as_str()
        .expect("config digest")
        .to_string()];
    for l in v["layers"].as_array().expect("layers") {
        out.push(l["digest"].as_str().expect("layer digest").to_string());
    }
    out
}

/// GETs a manifest and checks it: 200, digest header = sha256 of the body, every
/// blob it names served with matching bytes. Returns the digest and the manifest.
fn pull(server: &Server, name: &str) -> (String, Vec<u8>) {
    let (status, headers, body) = http_request(
        "GET",
        &manifest_url(server, name),
        &[],
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("GET {name}: {e}"));
    assert_eq!(status, 200, "GET {name}: {}", body_text(&body));
    let digest = headers
        .get("Docker-Content-Digest")
        .expect("Docker-Content-Digest")
        .to_string();
    assert_eq!(digest, sha256_digest(&body), "manifest digest of {name}");
    for blob in manifest_blobs(&body) {
        let (s, _, bytes) = http_get(&server.url(&format!("/v2/{name}/blobs/{blob}")), &[]);
        assert_eq!(s, 200, "GET blob {blob} of {name}");
        assert_eq!(sha256_digest(&bytes), blob, "blob bytes of {name}");
    }
    (digest, body)
}

/// Checks a filesystem storage root: every blob's sha256 matches its name, and
/// every record names only stored blobs. Returns (blobs, records) counted.
fn check_storage(root: &Path) -> (usize, usize) {
    let blob_dir = root.join("blobs/sha256");
    let mut blobs = BTreeSet::new();
    let mut problems = Vec::new();
    for e in fs::read_dir(&blob_dir).expect("read blobs dir").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let data = fs::read(e.path()).expect("read blob");
        let actual = sha256_digest(&data);
        if actual != format!("sha256:{name}") {
            problems.push(format!("blob {name} holds bytes with digest {actual}"));
        }
        blobs.insert(format!("sha256:{name}"));
    }
    let mut records = 0;
    let mut stack = vec![root.join("records")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            records += 1;
            let raw = fs::read(&path).expect("read record");
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&raw) else {
                problems.push(format!("record {} is not JSON", path.display()));
                continue;
            };
            let mut named = Vec::new();
            if let Some(d) = v.get("digest").and_then(|d| d.as_str()) {
                named.push(d.to_string()); // a layer record
            }
            for format in ["docker", "oci"] {
                if let Some(m) = v.get(format).and_then(|m| m.as_str()) {
                    named.push(sha256_digest(m.as_bytes()));
                    named.extend(manifest_blobs(m.as_bytes()));
                }
            }
            for d in named {
                if !blobs.contains(&d) {
                    problems.push(format!(
                        "record {} names missing blob {d}",
                        path.strip_prefix(root).unwrap_or(&path).display()
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "storage {} is inconsistent:\n{}",
        root.display(),
        problems.join("\n")
    );
    (blobs.len(), records)
}

/// Waits until the builder of `slow` is running; returns its PIDs.
fn wait_for_slow_builder(salt: &str, limit: Duration) -> Vec<u32> {
    let end = Instant::now() + limit;
    loop {
        let pids = builder_pids_of(salt, Some("slow-1.0"));
        if !pids.is_empty() {
            return pids;
        }
        assert!(Instant::now() < end, "no builder started within {limit:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

type Answer = std::io::Result<(u16, Headers, Vec<u8>)>;

fn spawn_request(method: &'static str, url: String) -> thread::JoinHandle<(Answer, Duration)> {
    thread::spawn(move || {
        let t = Instant::now();
        let r = http_request(method, &url, &[], Duration::from_secs(120));
        (r, t.elapsed())
    })
}

// ---------------------------------------------------------------------------
// 1. One image, 200 concurrent requests: one build.

#[test]
fn concurrent_requests_for_one_image_share_one_build() {
    const N: usize = 200;
    let nix = NixWrappers::new();
    // The build must outlast the arrival of all requests (a path source is
    // re-evaluated by every request that comes after the build).
    nix.set_realise_delay("2");
    let server = Server::start(&[("NIXERY_NIX__BIN_DIR", &nix.bin_dir())]);
    let url = manifest_url(&server, "hello");
    let barrier = Arc::new(Barrier::new(N));
    let handles: Vec<_> = (0..N)
        .map(|i| {
            let url = url.clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                let method = if i % 2 == 0 { "GET" } else { "HEAD" };
                barrier.wait();
                let sent = Instant::now();
                let r = http_request(method, &url, &[], Duration::from_secs(120));
                (method, sent, Instant::now(), r)
            })
        })
        .collect();
    let mut digests: BTreeMap<String, usize> = BTreeMap::new();
    let mut errors = Vec::new();
    let mut last_sent: Option<Instant> = None;
    let mut first_answered: Option<Instant> = None;
    for h in handles {
        let (method, sent, answered, r) = h.join().expect("request thread");
        last_sent = Some(last_sent.map_or(sent, |t| t.max(sent)));
        first_answered = Some(first_answered.map_or(answered, |t| t.min(answered)));
        match r {
            Ok((200, headers, body)) => match headers.get("Docker-Content-Digest") {
                Some(d) => {
                    if method == "GET" && sha256_digest(&body) != d {
                        errors.push(format!(
                            "GET body digest {} != header {d}",
                            sha256_digest(&body)
                        ));
                    }
                    *digests.entry(d.to_string()).or_default() += 1;
                }
                None => errors.push(format!("{method}: 200 without Docker-Content-Digest")),
            },
            Ok((status, _, body)) => {
                errors.push(format!("{method}: {status} {}", body_text(&body)))
            }
            Err(e) => errors.push(format!("{method}: {e}")),
        }
    }
    let realise = nix.realisations();
    let instantiate = nix.evaluations();
    let started_builds = server.log().matches("]: started").count();
    eprintln!(
        "{N} concurrent manifest requests: {} answered 200, {} errors, digests {digests:?}, \
         {instantiate} evaluations, {realise} nix-store --realise, {started_builds} builds started",
        digests.values().sum::<usize>(),
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "{} errors, e.g.:\n{}",
        errors.len(),
        errors[..errors.len().min(10)].join("\n")
    );
    assert_eq!(digests.len(), 1, "digests differ: {digests:?}");
    assert_eq!(digests.values().sum::<usize>(), N);
    assert_eq!(
        realise,
        1,
        "nix-store --realise runs; Nix calls:\n{}",
        nix.log_text()
    );
    assert_eq!(
        instantiate,
        1,
        "images evaluated; Nix calls:\n{}",
        nix.log_text()
    );
    assert_eq!(started_builds, 1, "builds started (server log)");
    // Every request was on its way before the first answer came back.
    assert!(
        last_sent < first_answered,
        "requests did not overlap: the last was sent after the first answer"
    );
    assert_healthy(&server);
}

// ---------------------------------------------------------------------------
// 2. Different images at once all succeed.

#[test]
fn different_images_build_concurrently() {
    let nix = NixWrappers::new();
    nix.set_realise_delay("0.5");
    // The worker's debug log says whenever it reads a closure.
    let server = Server::start(&[
        ("NIXERY_NIX__BIN_DIR", &nix.bin_dir()),
        ("RUST_LOG", "info,nixery::actors::nix_worker=debug"),
    ]);
    let names = [
        "hello",
        "cowsay",
        "tools.figlet",
        "alpha",
        "beta",
        "alpha/beta",
    ];
    let barrier = Arc::new(Barrier::new(names.len()));
    let handles: Vec<_> = names
        .iter()
        .map(|name| {
            let url = manifest_url(&server, name);
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                http_request("GET", &url, &[], Duration::from_secs(120))
            })
        })
        .collect();
    let mut manifests = BTreeMap::new();
    for (name, h) in names.iter().zip(handles) {
        let (status, headers, body) = h
            .join()
            .expect("request thread")
            .unwrap_or_else(|e| panic!("GET {name}: {e}"));
        assert_eq!(status, 200, "GET {name}: {}", body_text(&body));
        assert_eq!(
            headers.get("Docker-Content-Digest"),
            Some(sha256_digest(&body).as_str()),
            "{name}"
        );
        manifests.insert(*name, body);
    }
    let digests: BTreeSet<String> = manifests.values().map(|b| sha256_digest(b)).collect();
    assert_eq!(
        digests.len(),
        names.len(),
        "every image has its own manifest"
    );
    // Every blob named is served, with the right bytes.
    for (name, body) in &manifests {
        for blob in manifest_blobs(body) {
            let (s, _, bytes) = http_get(&server.url(&format!("/v2/{name}/blobs/{blob}")), &[]);
            assert_eq!(s, 200, "blob {blob} of {name}");
            assert_eq!(sha256_digest(&bytes), blob);
        }
    }
    // alpha and beta share busybox and libshared.
    let layers = |n: &str| -> BTreeSet<String> {
        manifest_blobs(&manifests[n])[1..].iter().cloned().collect()
    };
    let shared = layers("alpha").intersection(&layers("beta")).count();
    assert!(shared >= 2, "alpha and beta share {shared} layers");
    // Once each, whoever built them.
    assert_eq!(
        server.log().matches(": read the closure (").count(),
        names.len(),
        "server log:\n{}",
        server.log()
    );
    assert_eq!(
        nix.evaluations(),
        names.len(),
        "Nix calls:\n{}",
        nix.log_text()
    );
    eprintln!(
        "{} different images built concurrently; {} realisations",
        names.len(),
        nix.realisations()
    );
    assert_healthy(&server);
}

// ---------------------------------------------------------------------------
// 3. A full queue answers 429 with Retry-After.

#[test]
fn full_build_queue_answers_429_with_retry_after() {
    let nix = NixWrappers::new();
    let server = Server::start(&[
        ("NIXERY_NIX__BIN_DIR", &nix.bin_dir()),
        ("NIXERY_NIX__WORKERS", "1"),
        ("NIXERY_NIX__QUEUE_LIMIT", "0"),
        ("NIX_TIMEOUT", "5"),
    ]);
    let _reaper = BuilderReaper(server.salt().to_string());
    let slow = spawn_request("GET", manifest_url(&server, "slow"));
    nix.wait_for("the slow build to start", Duration::from_secs(30), |c| {
        c.iter()
            .any(|(_, p, a)| p == "nix-store" && a.starts_with("--realise"))
    });
    let before = nix.total();
    for method in ["GET", "HEAD"] {
        let (status, headers, body) = http_request(
            method,
            &manifest_url(&server, "hello"),
            &[],
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{method} hello while the queue is full: {e}"));
        assert_eq!(
            status,
            429,
            "{method} hello while full: {}",
            body_text(&body)
        );
        let retry: u64 = headers
            .get("Retry-After")
            .unwrap_or_else(|| panic!("429 without Retry-After: {:?}", headers))
            .parse()
            .expect("Retry-After is seconds");
        assert!(retry > 0 && retry <= 3600, "Retry-After {retry}");
        if method == "GET" {
            let (code, _) = error_of(&body).expect("JSON error body");
            assert_eq!(code, "TOOMANYREQUESTS");
        }
    }
    assert_eq!(
        nix.total(),
        before,
        "a refused request ran Nix:\n{}",
        nix.log_text()
    );

    let (answer, elapsed) = slow.join().expect("slow request thread");
    let (status, _, body) = answer.expect("slow request answered");
    assert_eq!(
        status,
        400,
        "slow build past NIX_TIMEOUT: {}",
        body_text(&body)
    );
    let (code, message) = error_of(&body).expect("JSON error body");
    assert_eq!(code, "MANIFEST_INVALID");
    assert!(message.contains("time limit"), "message: {message}");
    assert!(
        elapsed < Duration::from_secs(5 + 20),
        "slow answered after {elapsed:?}"
    );

    // The slot is free again.
    let (status, _, body) = http_get(&manifest_url(&server, "hello"), &[]);
    assert_eq!(
        status,
        200,
        "hello after the queue drained: {}",
        body_text(&body)
    );
    assert_healthy(&server);
}

// ---------------------------------------------------------------------------
// 4. Failures: shared by all waiters, cached, and missing packages named.

#[test]
fn failed_build_is_shared_cached_and_missing_packages_are_named() {
    const N: usize = 20;
    let nix = NixWrappers::new();
    nix.set_realise_delay("1");
    let server = Server::start(&[
        ("NIXERY_NIX__BIN_DIR", &nix.bin_dir()),
        ("NIXERY_NIX__FAILURE_CACHE_SECS", "120"),
    ]);
    let url = manifest_url(&server, "broken");
    let barrier = Arc::new(Barrier::new(N));
    let handles: Vec<_> = (0..N)
        .map(|_| {
            let url = url.clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                http_request("GET", &url, &[], Duration::from_secs(120))
            })
        })
        .collect();
    let answers: Vec<(u16, Vec<u8>)> = handles
        .into_iter()
        .map(|h| {
            let (s, _, b) = h.join().expect("thread").expect("broken answered");
            (s, b)
        })
        .collect();
    let distinct: BTreeSet<&(u16, Vec<u8>)> = answers.iter().collect();
    assert_eq!(
        distinct.len(),
        1,
        "waiters got different answers: {:?}",
        distinct
            .iter()
            .map(|(s, b)| format!("{s} {}", body_text(b)))
            .collect::<Vec<_>>()
    );
    let (status, body) = &answers[0];
    assert_eq!(*status, 400, "{}", body_text(body));
    let (code, message) = error_of(body).expect("JSON error body");
    assert_eq!(code, "MANIFEST_INVALID");
    assert!(
        message.contains("broken-1.0 deliberately fails to build"),
        "the builder's message is missing: {message}"
    );
    assert_eq!(nix.realisations(), 1, "Nix calls:\n{}", nix.log_text());
    assert_eq!(nix.evaluations(), 1, "Nix calls:\n{}", nix.log_text());

    // Within the failure cache window: same answer, no Nix.
    let before = nix.total();
    let (s2, _, b2) = http_get(&url, &[]);
    assert_eq!((s2, &b2), (*status, body), "cached failure differs");
    let (s3, _) = common::http_head(&url, &[]);
    assert_eq!(s3, 400);
    assert_eq!(
        nix.total(),
        before,
        "a cached failure ran Nix again:\n{}",
        nix.log_text()
    );

    // Missing packages: 404 naming each missing one (and not the one that exists).
    let (status, _, body) = http_get(&manifest_url(&server, "nope/hello/tools.nada"), &[]);
    assert_eq!(status, 404, "{}", body_text(&body));
    let (code, message) = error_of(&body).expect("JSON error body");
    assert_eq!(code, "MANIFEST_UNKNOWN");
    assert!(
        message.contains("nope") && message.contains("tools.nada"),
        "{message}"
    );
    assert!(
        !message.contains("hello"),
        "names a package that exists: {message}"
    );
    assert_healthy(&server);
}

// ---------------------------------------------------------------------------
// 5. A build past NIX_TIMEOUT is stopped, builder included.

#[test]
fn build_past_nix_timeout_is_stopped_with_its_builder() {
    let nix = NixWrappers::new();
    let server = Server::start(&[
        ("NIXERY_NIX__BIN_DIR", &nix.bin_dir()),
        ("NIX_TIMEOUT", "3"),
    ]);
    let _reaper = BuilderReaper(server.salt().to_string());
    // Build what `slow` shares with every image first, so that within the time
    // limit the one builder running is `slow`'s, asleep.
    pull(&server, "hello");
    let started = Instant::now();
    let request = spawn_request("GET", manifest_url(&server, "slow"));
    let seen = wait_for_slow_builder(server.salt(), Duration::from_secs(10));
    // Nix runs builders as a build user (nixbld*) in a session of their own, and
    // kills every process of that user when it next hands the user to a build: an
    // orphaned builder may be cleaned up by some later, unrelated build. So the
    // builder is watched continuously from now on, and the bug is an orphan: a
    // builder whose nix-store is gone while it still runs.
    let watcher = OrphanWatcher::start(server.salt().to_string());
    let (answer, _) = request.join().expect("request thread");
    let elapsed = started.elapsed();
    let (status, _, body) = answer.expect("slow answered");
    eprintln!(
        "timeout: slow's builder ran as {seen:?}; answered {status} after {elapsed:?}: {}",
        body_text(&body)
    );
    assert_eq!(status, 400, "{}", body_text(&body));
    let (code, message) = error_of(&body).expect("JSON error body");
    assert_eq!(code, "MANIFEST_INVALID");
    assert!(message.contains("time limit of 3 s"), "message: {message}");
    assert!(
        elapsed >= Duration::from_secs(3) && elapsed < Duration::from_secs(3 + 12),
        "answered after {elapsed:?}"
    );
    assert_healthy(&server);

    // Nothing of the build may keep running: not nix-store, not the builder
    // (`sleep 30` under the salted busybox shell).
    let end = Instant::now() + Duration::from_secs(3);
    let (nix_left, builders_left) = loop {
        let nix_left: Vec<u32> = nix
            .calls()
            .iter()
            .map(|c| c.0)
            .filter(|p| is_alive(*p) && cmdline(*p).contains("nix-"))
            .collect();
        let builders = builder_pids(server.salt());
        if (nix_left.is_empty() && builders.is_empty()) || Instant::now() >= end {
            break (nix_left, builders);
        }
        thread::sleep(Duration::from_millis(100));
    };
    let orphans = watcher.stop();
    eprintln!(
        "timeout: after the answer: {} Nix processes, {} builder processes left; orphans seen: {orphans:?}",
        nix_left.len(),
        builders_left.len()
    );
    assert!(
        nix_left.is_empty(),
        "Nix still running 3 s after the timeout answer:\n{}",
        describe_pids(&nix_left)
    );
    assert!(
        orphans.is_empty() && builders_left.is_empty(),
        "the builder of `slow` outlived the nix-store that was stopped at NIX_TIMEOUT: \
         orphaned builders seen {orphans:?} (pid, seen orphaned for, first seen at, counted from when the request was about to time out), \
         still running 3 s after the answer:\n{}\n\
         The server SIGKILLs nix-store's process group, but Nix starts builders in a \
         session of their own as a build user, so they survive until their build user is \
         reused by another build (or until they finish).",
        describe_pids(&builders_left)
    );
}

/// Samples, every 20 ms, the processes of one salted package set and records those
/// that run without a Nix parent (orphaned builders: parent is init or a subreaper).
struct OrphanWatcher {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<Vec<(u32, Duration, Duration)>>>,
}

impl OrphanWatcher {
    fn start(salt: String) -> OrphanWatcher {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let begun = Instant::now();
            // pid -> (first seen, samples)
            let mut seen: BTreeMap<u32, (Duration, u32)> = BTreeMap::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let pids = builder_pids(&salt);
                for &pid in &pids {
                    let parent = parent_pid(pid);
                    let parent_is_builder = parent.is_some_and(|p| pids.contains(&p));
                    let parent_is_nix = parent.is_some_and(|p| cmdline(p).contains("nix-"));
                    if !parent_is_builder && !parent_is_nix {
                        let e = seen.entry(pid).or_insert((begun.elapsed(), 0));
                        e.1 += 1;
                    }
                }
                thread::sleep(Duration::from_millis(20));
            }
            seen.into_iter()
                .filter(|(_, (_, samples))| *samples >= 2)
                .map(|(pid, (first, samples))| (pid, Duration::from_millis(20) * samples, first))
                .collect()
        });
        OrphanWatcher {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; returns (pid, about how long seen orphaned, first seen at).
    fn stop(mut self) -> Vec<(u32, Duration, Duration)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("watcher thread"))
            .unwrap_or_default()
    }
}

impl Drop for OrphanWatcher {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn parent_pid(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

// ---------------------------------------------------------------------------
// 6. Nix killed mid-build.

#[test]
fn nix_killed_mid_build_gives_a_clear_error() {
    let nix = NixWrappers::new();
    let server = Server::start(&[("NIXERY_NIX__BIN_DIR", &nix.bin_dir())]);
    let _reaper = BuilderReaper(server.salt().to_string());
    let slow = spawn_request("GET", manifest_url(&server, "slow"));
    wait_for_slow_builder(server.salt(), Duration::from_secs(30));
    let realise = nix.realise_calls();
    assert_eq!(realise.len(), 1, "Nix calls:\n{}", nix.log_text());
    let pid = realise[0].0;
    assert!(
        cmdline(pid).contains("nix-store"),
        "pid {pid} is {}",
        cmdline(pid)
    );
    let killed_at = Instant::now();
    kill(pid, libc::SIGKILL);

    let (answer, _) = slow.join().expect("slow request thread");
    let (status, _, body) = answer.expect("the request is answered, not dropped");
    let after = killed_at.elapsed();
    assert!(
        (400..600).contains(&status),
        "status {status}: {}",
        body_text(&body)
    );
    let (code, message) = error_of(&body).expect("JSON error body");
    assert!(!code.is_empty() && !message.is_empty());
    assert!(
        after < Duration::from_secs(10),
        "answered {after:?} after the kill"
    );
    eprintln!("nix-store killed mid-build: {status} {code}: {message}");

    assert_healthy(&server);
    let (digest, _) = pull(&server, "hello");
    assert!(digest.starts_with("sha256:"));
}

// ---------------------------------------------------------------------------
// 6b. The closure reader, nix-store --serve, killed between builds.

#[test]
fn a_killed_closure_reader_costs_no_image() {
    let server = Server::start(&[("RUST_LOG", "info,nixery::actors::nix_worker=debug")]);
    pull(&server, "hello");
    let pid = server.pid().expect("server pid");
    let sessions: Vec<u32> = pids()
        .into_iter()
        .filter(|&p| parent_pid(p) == Some(pid) && cmdline(p).contains("nix-store --serve"))
        .collect();
    assert!(
        !sessions.is_empty(),
        "no nix-store --serve under the server:\n{}",
        server.log()
    );
    for &p in &sessions {
        kill(p, libc::SIGKILL);
    }
    pull(&server, "alpha");
    let log = server.log();
    assert!(
        log.contains("WARN") && log.contains("nix-store --serve: "),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("build alpha [")
            && l.contains("read the closure (")
            && l.contains("from nix-store --query and --dump-db in")),
        "{log}"
    );
    // The dead sessions were reaped, not left as zombies.
    for p in sessions {
        assert_ne!(parent_pid(p), Some(pid), "session {p} was not reaped");
    }
    assert_healthy(&server);
}

/// On an empty `/nix` (a Deployment's emptyDir) the server's first Nix process
/// creates the store's database, and Nix 2.8 fails another process that opens it
/// meanwhile ("database is busy"). So the first `nix-store --serve` is started,
/// the store opened, before the server takes a request: a slow one holds up the
/// server's start, never a request's evaluation.
#[test]
fn the_store_is_opened_before_the_first_request() {
    let nix = NixWrappers::new();
    nix.set_serve_delay("2");
    let server = Server::start(&[("NIXERY_NIX__BIN_DIR", &nix.bin_dir())]);
    pull(&server, "hello");
    let log = nix.log_text();
    let opened = log
        .lines()
        .position(|l| l.ends_with("--serve (starting now)"))
        .unwrap_or_else(|| panic!("no nix-store --serve started:\n{log}"));
    let evaluated = log
        .lines()
        .position(|l| l.contains(" nix-instantiate "))
        .unwrap_or_else(|| panic!("no evaluation:\n{log}"));
    assert!(
        opened < evaluated,
        "an evaluation started before the store was opened:\n{log}"
    );
}

// ---------------------------------------------------------------------------
// 7. kill -9 of the server mid-build, restart on the same storage.

#[test]
fn server_killed_mid_build_restarts_on_consistent_storage() {
    let nix = NixWrappers::new();
    let mut a = Server::start(&[("NIXERY_NIX__BIN_DIR", &nix.bin_dir())]);
    let _reaper = BuilderReaper(a.salt().to_string());
    let storage = a.storage_path().display().to_string();
    let pkgs = a.pkgs_path().display().to_string();
    let env = [
        ("NIXERY_NIX__BIN_DIR", nix.bin_dir()),
        ("STORAGE_PATH", storage.clone()),
        ("NIXERY_PKGS_PATH", pkgs),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let (hello_before, _) = pull(&a, "hello");

    // Kill during the Nix build of `slow`.
    let pending = spawn_request("GET", manifest_url(&a, "slow"));
    wait_for_slow_builder(a.salt(), Duration::from_secs(30));
    kill(a.pid().expect("server pid"), libc::SIGKILL);
    let (answer, _) = pending.join().expect("thread");
    assert!(
        answer.is_err() || answer.as_ref().is_ok_and(|r| r.0 >= 500),
        "request to a killed server: {:?}",
        answer.map(|r| r.0)
    );
    let _ = a.stop(); // reap
    nix.kill_leftovers();
    for pid in builder_pids(a.salt()) {
        kill(pid, libc::SIGKILL);
    }
    let mut faults = 1;

    // Kill during normal builds, at different moments after Nix has finished
    // (packing and storing layers).
    let mut servers = vec![a];
    let mut interrupted = Vec::new();
    for (name, delay_ms) in [
        ("cowsay", 0u64),
        ("tools.figlet", 15),
        ("alpha", 40),
        ("beta", 100),
    ] {
        let s = Server::start(&env);
        let (blobs, records) = check_storage(Path::new(&storage));
        // Each process spools under tmp/<host>-<pid>/; a restart removes the
        // directories of processes that are gone.
        let leftovers: Vec<_> = fs::read_dir(Path::new(&storage).join("tmp"))
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|d| fs::read_dir(d.path()).into_iter().flatten().flatten())
            .map(|e| e.path())
            .collect();
        assert!(
            leftovers.is_empty(),
            "temporaries left in storage tmp/ after restart: {leftovers:?}"
        );
        eprintln!("restart {faults}: storage consistent ({blobs} blobs, {records} records)");
        let pending = spawn_request("GET", manifest_url(&s, name));
        // Its closure is read and its layers planned.
        let end = Instant::now() + Duration::from_secs(60);
        while !s.log().contains("compressing and uploading") {
            assert!(
                Instant::now() < end,
                "{name} never got to packing:\n{}",
                s.log()
            );
            thread::sleep(Duration::from_millis(5));
        }
        thread::sleep(Duration::from_millis(delay_ms));
        kill(s.pid().expect("server pid"), libc::SIGKILL);
        let _ = pending.join();
        nix.kill_leftovers();
        interrupted.push(name);
        faults += 1;
        servers.push(s);
    }
    for s in &mut servers {
        let _ = s.stop();
    }

    let last = Server::start(&env);
    let _watchdog = nix.watchdog("pulling from the restarted server", Duration::from_secs(30));
    let (blobs, records) = check_storage(Path::new(&storage));
    eprintln!("after {faults} kills: storage consistent ({blobs} blobs, {records} records)");
    let (hello_after, hello_manifest) = pull(&last, "hello");
    assert_eq!(
        hello_after, hello_before,
        "hello's digest changed across kill -9 and restart"
    );
    let (s, _, by_digest) = http_get(
        &last.url(&format!("/v2/hello/manifests/{hello_before}")),
        &[],
    );
    assert_eq!(s, 200);
    assert_eq!(by_digest, hello_manifest);
    for name in interrupted {
        pull(&last, name);
    }
    let (blobs, records) = check_storage(Path::new(&storage));
    eprintln!("after rebuilding: storage consistent ({blobs} blobs, {records} records)");
    assert_healthy(&last);
}

// ---------------------------------------------------------------------------
// 8. SIGTERM: in-flight requests finish, new connections are refused, exit.

/// Processes whose process group is `group`, zombies left out.
fn group_members(group: u32) -> Vec<u32> {
    pids()
        .into_iter()
        .filter(|&pid| {
            // state, ppid, pgrp
            stat_fields(pid).is_some_and(|f| {
                running(&f) && f.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(group)
            })
        })
        .collect()
}

fn is_realise((_, program, args): &(u32, String, String)) -> bool {
    program == "nix-store" && args.starts_with("--realise")
}

/// A server with `grace` seconds to shut down, whose build of `hello` has reached
/// `nix-store --realise` and is held there `delay` seconds; with the request's
/// thread.
fn mid_realisation(
    delay: &str,
    grace: &str,
) -> (NixWrappers, Server, thread::JoinHandle<(Answer, Duration)>) {
    let nix = NixWrappers::new();
    nix.set_realise_delay(delay);
    let server = Server::start(&[
        ("NIXERY_NIX__BIN_DIR", &nix.bin_dir()),
        ("NIXERY_SERVER__SHUTDOWN_GRACE_SECS", grace),
    ]);
    let in_flight = spawn_request("GET", manifest_url(&server, "hello"));
    nix.wait_for(
        "the build to reach nix-store --realise",
        Duration::from_secs(30),
        |c| c.iter().any(is_realise),
    );
    (nix, server, in_flight)
}

#[test]
fn a_nix_build_still_running_when_the_server_exits_is_stopped() {
    // The build outlasts the shutdown grace by far.
    let (nix, mut server, _in_flight) = mid_realisation("120", "1");
    let pid = server.pid().expect("pid");
    let realise: Vec<u32> = nix
        .calls()
        .iter()
        .filter(|c| is_realise(c))
        .map(|c| c.0)
        .collect();
    assert!(
        realise.iter().all(|&p| !group_members(p).is_empty()),
        "the realisation's process group is not running: {realise:?}"
    );
    kill(pid, libc::SIGTERM);
    let end = Instant::now() + Duration::from_secs(30);
    while is_alive(pid) && Instant::now() < end {
        thread::sleep(Duration::from_millis(50));
    }
    let exited = !is_alive(pid);
    let left: Vec<(u32, Vec<u32>)> = realise
        .iter()
        .map(|&p| (p, group_members(p)))
        .filter(|(_, members)| !members.is_empty())
        .collect();
    server.stop();
    let log = server.log();
    assert!(exited, "the server still runs 30 s after SIGTERM:\n{log}");
    assert!(
        left.is_empty(),
        "Nix process groups (leader, members) outlived the server: {left:?}\n{log}"
    );
    assert!(
        log.contains("stopped 1 Nix processes that were still running"),
        "{log}"
    );
}

#[test]
fn sigterm_lets_in_flight_request_finish_then_exits() {
    let (_nix, mut server, in_flight) = mid_realisation("3", "20");
    let pid = server.pid().expect("pid");
    let addr: SocketAddr = server.addr().parse().expect("socket address");
    let signalled = Instant::now();
    kill(pid, libc::SIGTERM);

    // New connections are refused once the server has taken the signal.
    thread::sleep(Duration::from_millis(500));
    let late = TcpStream::connect_timeout(&addr, Duration::from_secs(2));
    let late_outcome = match late {
        Err(e) => format!("refused ({e})"),
        Ok(mut s) => {
            use std::io::{Read, Write};
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            format!(
                "accepted, answered {:?}",
                String::from_utf8_lossy(&buf).lines().next()
            )
        }
    };

    let (answer, _) = in_flight.join().expect("thread");
    let (status, headers, body) = answer.expect("the in-flight request is answered");
    let answered = signalled.elapsed();
    assert_eq!(
        status,
        200,
        "in-flight request after SIGTERM: {}",
        body_text(&body)
    );
    assert_eq!(
        headers.get("Docker-Content-Digest"),
        Some(sha256_digest(&body).as_str())
    );
    assert!(
        answered < Duration::from_secs(20),
        "answered {answered:?} after SIGTERM"
    );
    assert!(
        late_outcome.starts_with("refused"),
        "a new connection after SIGTERM was {late_outcome}"
    );

    // The process exits by itself, soon after its last request.
    let end = Instant::now() + Duration::from_secs(15);
    while is_alive(pid) && Instant::now() < end {
        thread::sleep(Duration::from_millis(50));
    }
    let exited_by_itself = !is_alive(pid);
    let exit_after = signalled.elapsed();
    let status = server.stop();
    assert!(
        exited_by_itself,
        "still running {exit_after:?} after SIGTERM"
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status after SIGTERM: {status:?}"
    );
    eprintln!(
        "SIGTERM: in-flight answered after {answered:?}, late connection {late_outcome}, exited after {exit_after:?}"
    );
}
