//! The registry's own container image (`deploy/image/build`): built from Debian
//! bookworm's packages and the binary cargo built for these tests, run with podman
//! as the Deployment runs it (Nix's store on an empty volume mounted at /nix), and
//! pulled from with skopeo; the pulled image runs.
//!
//! The image stays in the system's containers storage as `localhost/nixery-test:latest`
//! (and its Debian base as `localhost/nixery-base:…`), so a later run with the same
//! binary builds nothing; the container and its volumes are removed.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    cimage_command, fresh_pkgs_copy, http_request, pull_and_run, random_hex, require_root,
    require_tool, run, run_ok, run_with_timeout, tail_lines, CmdOutput,
};

const TAG: &str = "localhost/nixery-test:latest";

/// Where the package set is mounted in the container.
const PKGS_IN_CONTAINER: &str = "/srv/nixery-pkgs";

/// A cold build downloads and installs Debian's packages.
const BUILD_TIMEOUT: Duration = Duration::from_secs(1200);

/// Largest acceptable image (Debian base about 222 MB, the stripped debug binary
/// 27 MB; with the debug info it would be 250 MB more).
const MAX_IMAGE_BYTES: u64 = 350_000_000;

fn require_all(tools: &[&str]) -> bool {
    let mut ok = require_root();
    for t in tools {
        ok &= require_tool(t);
    }
    ok
}

/// `podman` on the system's containers storage, where `deploy/image/build` puts
/// the image, with the settings that work without systemd.
fn podman() -> Command {
    let mut cmd = cimage_command("podman");
    cmd.args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"]);
    cmd
}

fn build_image() -> CmdOutput {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/image/build");
    let out = run_with_timeout(
        Command::new(script).args(["--binary", env!("CARGO_BIN_EXE_nixery"), "--tag", TAG]),
        BUILD_TIMEOUT,
    );
    assert!(out.success(), "deploy/image/build failed:\n{out}");
    out
}

/// `--ulimit` values a container may set here: podman's defaults (and, on some
/// machines, any `nproc` above 32768) are more than runc may set ("error setting
/// rlimits"). Open files: this process's own limits. Processes: a fixed number,
/// which binds nothing, since the kernel does not count root's processes.
fn ulimit_args() -> Vec<String> {
    let limits = fs::read_to_string("/proc/self/limits").expect("read /proc/self/limits");
    let label = "Max open files";
    let line = limits
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no `{label}` in /proc/self/limits:\n{limits}"));
    let value = |v: &str| if v == "unlimited" { "-1" } else { v }.to_string();
    let fields: Vec<&str> = line[label.len()..].split_whitespace().collect();
    vec![
        "--ulimit".to_string(),
        format!("nofile={}:{}", value(fields[0]), value(fields[1])),
        "--ulimit".to_string(),
        "nproc=4096:4096".to_string(),
    ]
}

/// A detached container, removed (with its log shown when the test failed) on drop.
struct Container {
    name: String,
}

impl Container {
    fn logs(&self) -> String {
        run(podman().args(["logs", &self.name])).combined()
    }

    fn state(&self) -> String {
        run(podman().args([
            "inspect",
            "--format",
            "{{.State.Status}} {{.State.ExitCode}}",
            &self.name,
        ]))
        .stdout
        .trim()
        .to_string()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "===== container {} ({}), last 60 log lines =====\n{}",
                self.name,
                self.state(),
                tail_lines(&self.logs(), 60)
            );
        }
        let out = run(podman().args(["rm", "--force", "--volumes", "--time", "5", &self.name]));
        if !out.success() {
            eprintln!("could not remove container {}:\n{out}", self.name);
        }
    }
}

/// Waits until `GET /v2/` answers 200; fails early when the container stops.
fn wait_for_registry(addr: &str, container: &Container) {
    let url = format!("http://{addr}/v2/");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match http_request("GET", &url, &[], Duration::from_secs(5)) {
            Ok((200, _, _)) => return,
            Ok(_) | Err(_) if Instant::now() >= deadline => {
                panic!("{url} did not answer 200 within 60 s")
            }
            _ => {}
        }
        let state = container.state();
        assert!(
            state.starts_with("running"),
            "the container stopped: {state}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn image_built_from_debian_packages_serves_and_builds_hello() {
    if !require_all(&["podman", "runc", "skopeo", "umoci", "chroot"]) {
        return;
    }

    // Build (or find the image of this binary already built), then check that a
    // second run builds nothing.
    let t = Instant::now();
    let first = build_image();
    eprintln!(
        "image build: {:.1} s\n{}",
        t.elapsed().as_secs_f64(),
        first.stderr
    );
    let t = Instant::now();
    let second = build_image();
    eprintln!("unchanged rebuild: {:.1} s", t.elapsed().as_secs_f64());
    assert!(
        second.stderr.contains("up to date"),
        "a build with unchanged inputs built again:\n{second}"
    );
    assert_eq!(
        first.stdout.trim(),
        second.stdout.trim(),
        "image ID changed"
    );

    // What the Deployment relies on: nixery under tini, the defaults in the
    // environment, port 8080, and a reasonable size.
    let out = run_ok(podman().args(["image", "inspect", TAG]));
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("podman image inspect printed no JSON ({e}):\n{out}"));
    let image = &v[0];
    let config = &image["Config"];
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/bin/tini", "--", "/usr/local/bin/nixery"]),
        "{out}"
    );
    let env: Vec<&str> = config["Env"]
        .as_array()
        .unwrap_or_else(|| panic!("no Env:\n{out}"))
        .iter()
        .filter_map(|e| e.as_str())
        .collect();
    for want in [
        "STORAGE_PATH=/var/lib/nixery",
        "NIXERY_LISTEN=0.0.0.0",
        "PORT=8080",
    ] {
        assert!(env.contains(&want), "{want} not in the image's Env {env:?}");
    }
    assert!(config["ExposedPorts"].get("8080/tcp").is_some(), "{out}");
    let size = image["Size"].as_u64().expect("image Size");
    eprintln!("image size: {:.1} MB", size as f64 / 1e6);
    assert!(
        size < MAX_IMAGE_BYTES,
        "the image is {size} bytes, more than {MAX_IMAGE_BYTES}"
    );

    // Run it as the Deployment does: an empty volume on /nix (the emptyDir), the
    // package set from outside, no binary cache (there is no internet).
    let pkgs = fresh_pkgs_copy();
    let nix = tempfile::Builder::new()
        .prefix("nixery-image-nix-")
        .tempdir()
        .expect("temp dir for /nix");
    let container = Container {
        name: format!("nixery-own-image-{}", random_hex()),
    };
    let t = Instant::now();
    run_ok(
        podman()
            .args(["run", "--detach", "--name", &container.name])
            .args(ulimit_args())
            .args(["--publish", "127.0.0.1::8080"])
            .arg("--volume")
            .arg(format!("{}:{PKGS_IN_CONTAINER}:ro", pkgs.path().display()))
            .arg("--volume")
            .arg(format!("{}:/nix", nix.path().display()))
            .args([
                "--env",
                &format!("NIXERY_PKGS_PATH={PKGS_IN_CONTAINER}"),
                "--env",
                "NIXERY_NIX__SUBSTITUTERS=",
                TAG,
            ]),
    );
    let out = run_ok(podman().args(["port", &container.name, "8080/tcp"]));
    let addr = out
        .stdout
        .lines()
        .next()
        .map(str::trim)
        .filter(|a| a.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("no published port:\n{out}"))
        .to_string();
    wait_for_registry(&addr, &container);
    eprintln!(
        "container answered /v2/ after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert!(
        container
            .logs()
            .contains("listening on http://0.0.0.0:8080"),
        "the image's NIXERY_LISTEN and PORT were not used:\n{}",
        container.logs()
    );

    // The pull makes the container's Nix build hello from the salted set.
    let t = Instant::now();
    let out = pull_and_run(&addr, "hello", &["/bin/hello"]);
    eprintln!("pull and run: {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(out.stdout.trim(), "Hello, world!", "{out}");

    // Nix built it inside the container, into the volume on /nix: the salted
    // store path is there and not in the host's store.
    let hello: Vec<String> = fs::read_dir(nix.path().join("store"))
        .expect("the container's /nix/store")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("-hello-2.12.1"))
        .collect();
    assert_eq!(hello.len(), 1, "hello in the container's store: {hello:?}");
    assert!(
        !Path::new("/nix/store").join(&hello[0]).exists(),
        "{} is in the host's store too: the host built it",
        hello[0]
    );
    // The layers went to STORAGE_PATH of the image's environment.
    let out = run_ok(podman().args([
        "exec",
        &container.name,
        "find",
        "/var/lib/nixery",
        "-type",
        "f",
    ]));
    assert!(
        out.stdout.lines().count() >= 3,
        "no layers under /var/lib/nixery:\n{out}"
    );

    // SIGTERM reaches nixery through tini, and it shuts down cleanly.
    run_ok(podman().args(["stop", "--time", "30", &container.name]));
    assert_eq!(container.state(), "exited 0", "{}", container.logs());
}
