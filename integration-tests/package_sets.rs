//! The package set is what the registry's configuration says: binary caches,
//! nixpkgs config and refusals, and the error texts clients print.
//!
//! Black-box tests against the real binary and the test package set
//! (`integration-tests/pkgs`), which behaves like nixpkgs where it matters: it
//! reads HOME, NIXPKGS_CONFIG and NIXPKGS_ALLOW_* when not given a config,
//! refuses unfree, insecure, broken and other-platform packages with nixpkgs'
//! messages, and with a `cache-only` file next to it builds nothing, so an
//! image that is served must have come from a binary cache.
//!
//! Binary caches are directories written by `nix copy`, signed with a key made
//! for the test and served by `python3 -m http.server` on 127.0.0.1, whose
//! access log shows what Nix asked for.

mod common;

use std::fs;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    cimage_command, delete_store_paths, error_of, fresh_pkgs_copy, generate_cache_key,
    get_paths_in, http_get, nix_build, registry_error, require_root, require_tool, run, run_fail,
    store_closure, test_nix_config, BinaryCache, Dockerd, Headers, Server, StaticHttp,
};

/// Both manifest types, as registry clients ask.
const ACCEPT: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

fn require_all(tools: &[&str]) -> bool {
    let mut ok = require_root();
    for t in tools {
        ok &= require_tool(t);
    }
    ok
}

fn get_manifest(server: &Server, name: &str) -> (u16, Headers, Vec<u8>) {
    http_get(
        &server.url(&format!("/v2/{name}/manifests/latest")),
        &[("Accept", ACCEPT)],
    )
}

/// The digest of `name:latest`, which must be served.
fn manifest_digest(server: &Server, name: &str) -> String {
    let (status, h, body) = get_manifest(server, name);
    assert_eq!(
        status,
        200,
        "{name}: {}\n===== server log =====\n{}",
        String::from_utf8_lossy(&body),
        server.log()
    );
    h.get("docker-content-digest")
        .expect("Docker-Content-Digest")
        .to_string()
}

/// The message of the 400 MANIFEST_INVALID that refuses `name:latest`.
fn refusal(server: &Server, name: &str) -> String {
    let (status, h, body) = get_manifest(server, name);
    let (code, message) = registry_error(400, status, &h, &body);
    assert_eq!(code, "MANIFEST_INVALID", "{name}: {message}");
    message
}

/// Writes `text` to `dir/name` and returns the path as a string.
fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("mkdir");
    }
    fs::write(&path, text).expect("write file");
    path.display().to_string()
}

/// Pulls `name` with skopeo + umoci and runs `/bin/PROGRAM` in a chroot.
fn pull_and_run(server: &Server, name: &str, program: &str) -> String {
    let out = common::pull_and_run(server.addr(), name, &[&format!("/bin/{program}")]);
    out.stdout.trim().to_string()
}

/// A package set copy whose images can only come from `cache`: the closures of
/// `attrs` (plus cacert and iana-etc, which join every image) are built, signed
/// into the cache, deleted from the store, and the set is made cache-only.
/// Returns the cache-only check: what `nix-build` says when it tries.
fn only_in_cache(pkgs: &Path, cache: &BinaryCache, attrs: &[&str]) -> String {
    let mut all = attrs.to_vec();
    all.extend(["cacert", "iana-etc"]);
    let closure = store_closure(&nix_build(pkgs, &all));
    cache.add(&closure);
    delete_store_paths(&closure);
    fs::write(pkgs.join("cache-only"), "").expect("write cache-only flag");
    // Proof that a pull can now only succeed by substitution.
    let out = run_fail(
        Command::new("nix-build")
            .arg(pkgs)
            .args(["--no-out-link", "-A", attrs[0]])
            .env("NIX_CONFIG", test_nix_config()),
    );
    assert!(
        out.stderr
            .contains("can only come from a binary cache here (cache-only)"),
        "{out}"
    );
    out.stderr
}

#[test]
fn image_comes_from_the_configured_binary_cache_when_nothing_can_be_built() {
    if !require_all(&["skopeo", "umoci", "chroot", "python3"]) {
        return;
    }
    // a. The reference: built locally.
    let mut a = Server::start(&[]);
    let digest_a = manifest_digest(&a, "hello");
    a.stop();
    let pkgs = a.pkgs_path().to_path_buf();

    // b. Its closure only in a signed cache.
    let cache = BinaryCache::new("nixery-test-cache-1");
    only_in_cache(&pkgs, &cache, &["hello"]);
    let http = StaticHttp::start(&cache.path());

    // c. A second server on the same package set substitutes it.
    let pkgs_env = pkgs.display().to_string();
    let b = Server::start(&[
        ("NIXERY_PKGS_PATH", &pkgs_env),
        ("NIXERY_NIX__SUBSTITUTERS", &http.url()),
        ("NIXERY_NIX__TRUSTED_PUBLIC_KEYS", cache.public_key()),
    ]);
    let digest_b = manifest_digest(&b, "hello");
    assert_eq!(digest_a, digest_b, "the substituted image differs");
    let gets = http.get_paths();
    eprintln!("binary cache requests: {gets:?}");
    assert!(
        gets.iter().any(|p| p.ends_with(".narinfo")),
        "no .narinfo asked for:\n{}",
        http.log()
    );
    assert!(
        gets.iter().any(|p| p.starts_with("/nar/")),
        "no NAR downloaded:\n{}",
        http.log()
    );
    assert_eq!(pull_and_run(&b, "hello", "hello"), "Hello, world!");
}

#[test]
fn unreachable_binary_cache_is_named_and_used_once_it_is_back() {
    if !require_all(&["python3"]) {
        return;
    }
    let pkgs = fresh_pkgs_copy();
    let cache = BinaryCache::new("nixery-test-cache-2");
    only_in_cache(pkgs.path(), &cache, &["cowsay"]);
    let mut http = StaticHttp::start(&cache.path());
    let url = http.url();
    http.stop();

    let pkgs_env = pkgs.path().display().to_string();
    let c = Server::start(&[
        ("NIXERY_PKGS_PATH", &pkgs_env),
        ("NIXERY_NIX__SUBSTITUTERS", &url),
        ("NIXERY_NIX__TRUSTED_PUBLIC_KEYS", cache.public_key()),
        ("NIXERY_NIX__CONNECT_TIMEOUT_SECS", "2"),
        ("NIXERY_NIX__FAILURE_CACHE_SECS", "2"),
    ]);
    let started = Instant::now();
    let (status, h, body) = get_manifest(&c, "cowsay");
    let took = started.elapsed();
    eprintln!("pull with the cache down answered after {took:?}");
    let (code, message) = registry_error(400, status, &h, &body);
    eprintln!("{code}: {message}");
    assert!(message.contains(&url), "the cache is not named: {message}");
    assert!(
        message.to_lowercase().contains("connect"),
        "does not say it could not connect: {message}"
    );
    assert!(took < Duration::from_secs(60), "took {took:?}");

    http.restart();
    thread::sleep(Duration::from_secs(3)); // past the failure cache
    manifest_digest(&c, "cowsay");
    assert!(
        http.get_paths().iter().any(|p| p.starts_with("/nar/")),
        "no NAR downloaded after the cache came back:\n{}",
        http.log()
    );
}

#[test]
fn binary_cache_signed_with_an_untrusted_key_is_not_used() {
    if !require_all(&["python3"]) {
        return;
    }
    let pkgs = fresh_pkgs_copy();
    let cache = BinaryCache::new("nixery-test-cache-3");
    only_in_cache(pkgs.path(), &cache, &["hello"]);
    let http = StaticHttp::start(&cache.path());
    let keys = tempfile::tempdir().expect("temp dir");
    let (_, other_key) = generate_cache_key("nixery-test-other", keys.path());

    let before = http.log().len();
    let pkgs_env = pkgs.path().display().to_string();
    let d = Server::start(&[
        ("NIXERY_PKGS_PATH", &pkgs_env),
        ("NIXERY_NIX__SUBSTITUTERS", &http.url()),
        ("NIXERY_NIX__TRUSTED_PUBLIC_KEYS", &other_key),
    ]);
    let (status, _, body) = get_manifest(&d, "hello");
    let text = String::from_utf8_lossy(&body).into_owned();
    assert!(
        (400..600).contains(&status),
        "served without a trusted signature ({status}): {text}"
    );
    let (_, message) =
        error_of(&body).unwrap_or_else(|| panic!("not a registry error ({status}): {text}"));
    eprintln!("answer ({status}): {message}");

    let asked = get_paths_in(&http.log()[before..]);
    eprintln!("binary cache requests after the server started: {asked:?}");
    assert!(
        asked.iter().any(|p| p.ends_with(".narinfo")),
        "the cache was not asked at all:\n{}",
        http.log()
    );
    assert!(
        !asked.iter().any(|p| p.starts_with("/nar/")),
        "a NAR was downloaded despite the untrusted signature:\n{}",
        http.log()
    );
    let log = d.log();
    let why = format!("{message}\n{log}").to_lowercase();
    assert!(
        [
            "signature",
            "trusted-public-keys",
            "not signed",
            "trusted_public_keys"
        ]
        .iter()
        .any(|w| why.contains(w)),
        "neither the answer nor the server log says the signature was not trusted:\n\
         answer: {message}\n===== server log =====\n{log}"
    );
}

#[test]
fn home_config_overlays_and_nixpkgs_env_do_not_reach_the_package_set() {
    if !require_all(&["skopeo", "umoci", "chroot"]) {
        return;
    }
    let home = tempfile::tempdir().expect("temp dir");
    let home_path = home.path().display().to_string();
    write_file(
        home.path(),
        ".config/nixpkgs/config.nix",
        "{ allowUnfree = true; allowBroken = true; }\n",
    );
    write_file(
        home.path(),
        ".config/nixpkgs/overlays/evil.nix",
        r#"final: prev: {
  hello = prev.runCommand "hello-2.12.1" { } ''
    mkdir -p $out/bin
    printf '#!%s\necho overlay hello\n' ${prev.busybox}/bin/sh > $out/bin/hello
    chmod 0555 $out/bin/hello
  '';
}
"#,
    );
    let leaks = [
        ("HOME", home_path.as_str()),
        ("NIXPKGS_ALLOW_UNFREE", "1"),
        ("NIXPKGS_ALLOW_BROKEN", "1"),
        ("NIXPKGS_ALLOW_INSECURE", "1"),
    ];

    let clean = Server::start(&[]);
    let pkgs = clean.pkgs_path().display().to_string();

    // The leaks are real: plain Nix with that environment sees them.
    let instantiate = |attr: &str, leaky: bool| {
        let mut cmd = Command::new("nix-instantiate");
        cmd.args([pkgs.as_str(), "-A", attr])
            .env("NIX_CONFIG", test_nix_config());
        if leaky {
            cmd.envs(leaks);
        }
        run(&mut cmd)
    };
    let plain = instantiate("hello", false);
    let leaked = instantiate("hello", true);
    assert!(plain.success() && leaked.success(), "{plain}\n{leaked}");
    assert_ne!(plain.stdout, leaked.stdout, "the overlay did not apply");
    for attr in ["unfreeapp", "markedbroken", "oldssl"] {
        let out = instantiate(attr, true);
        assert!(
            out.success(),
            "the environment did not allow {attr}:\n{out}"
        );
    }

    let mut env = leaks.to_vec();
    env.push(("NIXERY_PKGS_PATH", &pkgs));
    let leaky = Server::start(&env);
    let message = refusal(&leaky, "unfreeapp");
    refusal(&leaky, "markedbroken");
    refusal(&leaky, "oldssl");
    assert_eq!(
        manifest_digest(&leaky, "hello"),
        manifest_digest(&clean, "hello"),
        "HOME or the environment changed the image"
    );
    assert_eq!(pull_and_run(&leaky, "hello", "hello"), "Hello, world!");
    // The refusal points at the registry's own switch, not at the account's.
    assert!(message.contains("source.allow_unfree"), "{message}");
    assert!(!message.contains("NIXPKGS_ALLOW_UNFREE"), "{message}");
}

#[test]
fn allow_unfree_and_the_nixpkgs_config_file_take_effect() {
    if !require_all(&["skopeo", "umoci", "chroot"]) {
        return;
    }
    let unfree = Server::start(&[("NIXERY_SOURCE__ALLOW_UNFREE", "true")]);
    assert_eq!(
        pull_and_run(&unfree, "unfreeapp", "unfreeapp"),
        "unfreeapp runs"
    );
    refusal(&unfree, "oldssl");

    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_file(
        dir.path(),
        "nixpkgs-config.nix",
        "{ permittedInsecurePackages = [ \"oldssl-1.0\" ]; allowBroken = true; }\n",
    );
    let configured = Server::start(&[("NIXERY_SOURCE__NIXPKGS_CONFIG", &config)]);
    manifest_digest(&configured, "oldssl");
    manifest_digest(&configured, "markedbroken");
    refusal(&configured, "unfreeapp");
}

/// A package the registry must refuse, and what its message must say: every
/// group needs one of its words (package names are blanked out first, so the
/// name `markedbroken` does not count as saying "broken").
struct Refused {
    name: &'static str,
    names: &'static [&'static str],
    says: &'static [&'static [&'static str]],
}

const REFUSED: &[Refused] = &[
    Refused {
        name: "unreachable",
        names: &["http://127.0.0.1:9/unreachable-1.0.tar.gz"],
        says: &[&["unable to download", "couldn't connect"]],
    },
    Refused {
        name: "unfreeapp",
        names: &["unfreeapp"],
        says: &[&["unfree"], &["source.allow_unfree"]],
    },
    Refused {
        name: "oldssl",
        names: &["oldssl"],
        says: &[
            &["insecure"],
            &["permittedinsecurepackages", "source.nixpkgs_config"],
        ],
    },
    Refused {
        name: "markedbroken",
        names: &["markedbroken"],
        says: &[&["broken"], &["allowbroken"]],
    },
    Refused {
        name: "armonly",
        names: &["armonly"],
        says: &[
            &["aarch64-linux", "not available"],
            &["allowunsupportedsystem"],
        ],
    },
];

/// Checks one refusal message; panics naming what is wrong.
fn check_message(case: &Refused, message: &str, pkgs_dir: &Path) {
    for n in case.names {
        assert!(
            message.contains(n),
            "{}: does not name {n}:\n{message}",
            case.name
        );
    }
    let mut blanked = message.to_lowercase();
    for n in case.names {
        blanked = blanked.replace(&n.to_lowercase(), "");
    }
    for group in case.says {
        assert!(
            group.iter().any(|w| blanked.contains(w)),
            "{}: says none of {group:?}:\n{message}",
            case.name
        );
    }
    let lines = message.lines().count();
    assert!(lines <= 8, "{}: {lines} lines:\n{message}", case.name);
    assert!(
        !message.chars().any(|c| c.is_control() && c != '\n'),
        "{}: control characters in {message:?}",
        case.name
    );
    let pkgs_dir = pkgs_dir.display().to_string();
    for leak in ["/nix/store/", "/tmp/", pkgs_dir.as_str(), "~/.config"] {
        assert!(
            !message.contains(leak),
            "{}: contains {leak:?}:\n{message}",
            case.name
        );
    }
}

#[test]
fn refusals_and_download_failures_are_a_few_clean_lines_naming_cause_and_setting() {
    let server = Server::start(&[]);
    let mut failures = Vec::new();
    for case in REFUSED {
        let checked = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let message = refusal(&server, case.name);
            eprintln!("===== {} =====\n{message}", case.name);
            check_message(case, &message, server.pkgs_path());
        }));
        if let Err(e) = checked {
            let why = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(why);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // The server log has all of Nix's output, once per failed run, tagged with the
    // image: here nixpkgs' advice that the client was spared.
    let log = server.log();
    let tagged: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("build unfreeapp [") && l.contains("failed; its output:"))
        .collect();
    assert_eq!(tagged.len(), 1, "{log}");
    assert!(
        log.contains("To temporarily allow unfree packages"),
        "the full output is not logged:\n{log}"
    );
}

#[test]
fn docker_podman_and_skopeo_print_the_refusal() {
    if !require_all(&["dockerd", "docker", "podman", "skopeo"]) {
        return;
    }
    // Answered from memory after the first request of each image.
    let server = Server::start(&[("NIXERY_NIX__FAILURE_CACHE_SECS", "600")]);
    let dockerd = Dockerd::start();
    let work = tempfile::tempdir().expect("temp dir");
    let podman = || common::podman_command(work.path());
    let mut missing = Vec::new();
    for case in REFUSED {
        let message = refusal(&server, case.name);
        // What a reader must find: the line naming the package (or URL), at
        // most 80 characters of it.
        let needle: String = message
            .lines()
            .find(|l| l.contains(case.names[0]))
            .unwrap_or_else(|| {
                missing.push(format!(
                    "{}: the message does not name it:\n{message}",
                    case.name
                ));
                message.lines().next().unwrap_or("")
            })
            .trim()
            .chars()
            .take(80)
            .collect();
        let image = format!("{}/{}:latest", server.addr(), case.name);
        let outputs = [
            ("docker", run_fail(dockerd.docker().args(["pull", &image]))),
            (
                "podman",
                run_fail(podman().args(["pull", "--tls-verify=false", &image])),
            ),
            (
                "skopeo",
                run_fail(cimage_command("skopeo").args([
                    "inspect",
                    "--tls-verify=false",
                    &format!("docker://{image}"),
                ])),
            ),
        ];
        for (client, out) in outputs {
            let printed = out.combined();
            eprintln!(
                "===== {client} pull {} =====\n$ {}\n{}",
                case.name,
                out.command,
                printed.trim_end()
            );
            if !printed.contains(&needle) {
                missing.push(format!(
                    "{client} / {}: {needle:?} not in\n{printed}",
                    case.name
                ));
            }
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}
