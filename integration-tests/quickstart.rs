//! The README's quick start on a machine without the bundled set's host tool:
//! `busybox-static` is removed, the registry says in one line what is missing,
//! `scripts/serve` installs it and serves images that the README's commands pull
//! and run.
//!
//! It changes the host's packages, so it runs only where that is allowed
//! (`NIXERY_TEST_MUTATE_HOST=1`, which `scripts/test` sets), in a test binary of its
//! own (cargo runs test binaries one at a time). busybox-static is installed again
//! however the test ends.

mod common;

use common::{
    free_port, http_get, registry_error, run_ok, run_with_timeout, terminate, Dockerd, Server,
};
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

fn host_busybox_present() -> bool {
    Path::new("/usr/bin/busybox").exists() || Path::new("/bin/busybox").exists()
}

fn apt_get(args: &[&str]) -> common::CmdOutput {
    run_with_timeout(
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        Duration::from_secs(600),
    )
}

/// Puts busybox-static back on drop, whatever happened.
struct Reinstall;

impl Drop for Reinstall {
    fn drop(&mut self) {
        if !host_busybox_present() {
            let out = apt_get(&["install", "-y", "-q", "busybox-static"]);
            if !out.success() {
                let _ = apt_get(&["update", "-q"]);
                let _ = apt_get(&["install", "-y", "-q", "busybox-static"]);
            }
        }
    }
}

#[test]
fn without_busybox_the_bundled_set_says_so_and_scripts_serve_installs_it() {
    if std::env::var("NIXERY_TEST_MUTATE_HOST").as_deref() != Ok("1") {
        eprintln!("SKIP: set NIXERY_TEST_MUTATE_HOST=1 to let this test remove busybox-static");
        return;
    }
    if !common::require_root() || !common::require_tool("apt-get") {
        return;
    }
    let _reinstall = Reinstall;
    let out = apt_get(&["remove", "-y", "-q", "busybox-static"]);
    assert!(out.success(), "{out}");
    assert!(!host_busybox_present(), "busybox is still on the host");

    // The registry's answer: one line saying what the host lacks.
    let server = Server::start(&[]);
    let url = server.url("/v2/hello/manifests/latest");
    let (status, h, body) = http_get(&url, &[]);
    let (_, message) = registry_error(400, status, &h, &body);
    eprintln!("without busybox: {message}");
    assert!(message.contains("busybox-static"), "{message}");
    assert_eq!(message.lines().count(), 1, "one line: {message:?}");
    drop(server);

    // The README's first command, on this machine as it is now.
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let log_path = work.path().join("serve.log");
    let log = fs::File::create(&log_path).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut serve = Command::new(root.join("scripts/serve"))
        .env("PORT", port.to_string())
        .env("NIXERY_LISTEN", "127.0.0.1")
        .env("STORAGE_PATH", work.path().join("storage"))
        .env_remove("NIXERY_PKGS_PATH")
        // The debug build cargo test just made: a release build would add minutes
        // and test nothing of the quick start that the debug build does not.
        .env("NIXERY_SERVE_PROFILE", "dev")
        .env_remove("NIX_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("run scripts/serve");
    let deadline = Instant::now() + Duration::from_secs(900);
    while !fs::read_to_string(&log_path)
        .unwrap_or_default()
        .contains("listening on")
    {
        if let Ok(Some(status)) = serve.try_wait() {
            panic!(
                "scripts/serve exited with {status}:\n{}",
                fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "scripts/serve did not start:\n{}",
            fs::read_to_string(&log_path).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(500));
    }
    assert!(
        host_busybox_present(),
        "scripts/serve did not install busybox"
    );
    let addr = format!("127.0.0.1:{port}");

    let out = common::pull_and_run(&addr, "shell/cowsay", &["/bin/cowsay", "moo"]);
    assert!(out.stdout.contains("< moo >"), "{out}");

    if common::require_tool("dockerd") {
        let dockerd = Dockerd::start();
        let image = format!("{addr}/hello");
        run_ok(dockerd.docker().args(["pull", &image]));
        let out =
            run_ok(
                dockerd
                    .docker()
                    .args(["run", "--rm", "--network", "none", &image, "hello"]),
            );
        assert!(out.stdout.contains("Hello, world!"), "{out}");
    }
    terminate(&mut serve, Duration::from_secs(10));
}
