//! The registry keeps its disks from filling: Nix's garbage collector runs while
//! builds are in flight without breaking them, and a full disk is an answer that
//! says so, with nothing half-written left behind and a pull that works once space
//! returns.

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

fn manifest(server: &Server, name: &str) -> (u16, String) {
    let (status, _, body) = http_get(
        &server.url(&format!("/v2/{name}/manifests/latest")),
        &[(
            "Accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )],
    );
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The collector of one test's server takes what another server in the same run
/// has not rooted yet; these tests run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[test]
fn collection_while_builds_run_frees_garbage_and_breaks_no_build() {
    if !require_root() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Garbage: a path of the test package set that nothing roots.
    let garbage_set = fresh_pkgs_copy();
    let garbage = nix_build(garbage_set.path(), &["cowsay"]);
    assert!(Path::new(&garbage[0]).exists());

    let wrappers = NixWrappers::new();
    // Builds stay in flight long enough for a whole collection to run during them
    // (one scans the whole store: seconds on a big one).
    wrappers.set_realise_delay("20");
    let roots = format!("/nix/var/nix/gcroots/nixery-test-{}", random_hex());
    let server = Server::start(&[
        ("NIXERY_NIX__BIN_DIR", &wrappers.bin_dir()),
        ("NIXERY_NIX__GC_ROOTS_DIR", &roots),
        // Always under the threshold: a collection every second.
        ("NIXERY_NIX__GC_MIN_FREE_MIB", "1000000000"),
        ("NIXERY_NIX__GC_MAX_FREE_MIB", "1000000000"),
        ("NIXERY_NIX__GC_CHECK_SECS", "1"),
    ]);

    let names = ["hello", "cowsay", "cowsay/hello", "tools.figlet"];
    let started = Instant::now();
    let server_ref = &server;
    let results: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = names
            .iter()
            .map(|n| s.spawn(move || manifest(server_ref, n)))
            .collect();
        // The registry keeps answering while it collects. Once every build is
        // rooted and waiting for its realisation, an input they all need (busybox)
        // is built, rooted by nothing but their derivations; a collection that
        // starts after that must leave it alone.
        let mut input: Option<(String, usize)> = None;
        let mut input_checked = false;
        while handles.iter().any(|h| !h.is_finished()) {
            let (status, _, _) = http_get(&server_ref.url("/healthz"), &[]);
            assert_eq!(status, 200);
            let log = server_ref.log();
            match &input {
                None if count(&log, "]: building") >= names.len() => {
                    let path = nix_build(server_ref.pkgs_path(), &["busybox"]).remove(0);
                    let started = count(&server_ref.log(), "collecting Nix store garbage");
                    input = Some((path, started));
                }
                Some((path, started))
                    if !input_checked && count(&log, "Nix garbage collection freed") > *started =>
                {
                    assert!(
                        Path::new(path).exists(),
                        "a collection took {path}, an input of builds in flight"
                    );
                    input_checked = true;
                }
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(
            input_checked,
            "no collection ran whole while builds were in flight; log:\n{}",
            tail_lines(&server_ref.log(), 40)
        );
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (name, (status, body)) in names.iter().zip(&results) {
        assert_eq!(
            *status,
            200,
            "{name}: {body}\n{}",
            tail_lines(&server.log(), 40)
        );
    }
    // A collection started while builds were in flight (one scans the whole store,
    // which can take seconds on a big one).
    let log = server.log();
    let first_collection = log.find("collecting Nix store garbage");
    let last_build = log.rfind(": done in ");
    assert!(
        matches!((first_collection, last_build), (Some(c), Some(b)) if c < b),
        "no collection during the builds ({:?}); log:\n{}",
        started.elapsed(),
        tail_lines(&log, 40)
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&server, "nixery_nix_gc_runs_total") < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(metric(&server, "nixery_nix_gc_runs_total") >= 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Path::new(&garbage[0]).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        !Path::new(&garbage[0]).exists(),
        "the collector left unrooted garbage {}",
        garbage[0]
    );
    assert!(metric(&server, "nixery_nix_gc_freed_bytes_total") > 0);
    assert!(metric(&server, "nixery_nix_store_free_bytes") > 0);

    // Builds done, their roots are gone: only this process's empty directory is left.
    let leftover: Vec<_> = walk(Path::new(&roots));
    assert!(leftover.is_empty(), "roots left behind: {leftover:?}");

    // What was built still pulls and runs (the layers are in storage, not the store).
    let out = pull_and_run(server.addr(), "hello", &["/bin/hello"]);
    assert_eq!(out.stdout.trim(), "Hello, world!");
    let (_, _, body) = http_get(&server.url("/builds"), &[]);
    let page: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(page["store"]["free_bytes"].as_u64().unwrap() > 0, "{page}");
    assert!(
        page["store"]["last_gc_unix_time"].as_u64().is_some(),
        "{page}"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&roots);
}

/// Symlinks under `dir`, recursively.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_symlink() {
            found.push(path);
        } else if path.is_dir() {
            found.extend(walk(&path));
        }
    }
    found
}

/// A tmpfs mounted for the life of the value.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        run_ok(std::process::Command::new("mount").args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "tmpfs",
            dir.path().to_str().unwrap(),
        ]));
        Tmpfs { dir }
    }

    fn resize(&self, size: &str) {
        run_ok(std::process::Command::new("mount").args([
            "-o",
            &format!("remount,size={size}"),
            self.dir.path().to_str().unwrap(),
        ]));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn a_full_storage_disk_is_a_507_that_says_so_and_leaves_nothing_half_written() {
    if !require_root() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Room for the configs and manifests, not for the busybox layer (~1 MB).
    let disk = Tmpfs::mount("256k");
    let storage = disk.dir.path().join("storage");
    let server = Server::start(&[("STORAGE_PATH", storage.to_str().unwrap())]);

    let (status, body) = manifest(&server, "hello");
    assert_eq!(status, 507, "{body}\n{}", tail_lines(&server.log(), 30));
    let (code, message) = error_of(body.as_bytes()).expect("a registry error");
    assert_eq!(code, "UNAVAILABLE");
    assert!(
        message.contains("out of disk space") && message.contains("storage"),
        "{message}"
    );
    assert!(
        !message.contains("/tmp") && !message.contains("/nix/store"),
        "{message}"
    );

    // Whatever is under a blob's name is complete: its bytes hash to its name. No
    // record names a blob that is not there.
    let blobs = storage.join("blobs/sha256");
    for entry in std::fs::read_dir(&blobs).into_iter().flatten().flatten() {
        let bytes = std::fs::read(entry.path()).unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        assert_eq!(
            sha256_digest(&bytes),
            format!("sha256:{name}"),
            "a partial blob"
        );
    }
    assert!(
        !storage.join("records/images").exists()
            || std::fs::read_dir(storage.join("records/images"))
                .unwrap()
                .count()
                == 0,
        "an image record after a failed build"
    );

    // Space comes back: the next pull succeeds, no restart, no failure cached.
    disk.resize("64m");
    let (status, body) = manifest(&server, "hello");
    assert_eq!(status, 200, "{body}");
    let out = pull_and_run(server.addr(), "hello", &["/bin/hello"]);
    assert_eq!(out.stdout.trim(), "Hello, world!");
    drop(server);
}
