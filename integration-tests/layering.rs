//! Layer reuse across images, replicas and restarts, against the real binary and
//! Nix: the second image costs only its new layers, a second process on the same
//! storage builds nothing, and a restart serves byte-identical manifests.

mod common;

use common::{http_get, Server};
use std::collections::HashSet;
use std::thread;

const DOCKER: &str = "application/vnd.docker.distribution.manifest.v2+json";

#[derive(serde::Deserialize)]
struct Manifest {
    layers: Vec<Layer>,
}

#[derive(serde::Deserialize)]
struct Layer {
    digest: String,
    size: u64,
}

fn manifest(server: &Server, name: &str) -> (String, Vec<u8>, Manifest) {
    let (status, headers, body) = http_get(
        &server.url(&format!("/v2/{name}/manifests/latest")),
        &[("Accept", DOCKER)],
    );
    assert_eq!(
        status,
        200,
        "{name}: {}\n{}",
        String::from_utf8_lossy(&body),
        server.log()
    );
    let digest = headers
        .get("docker-content-digest")
        .expect("digest")
        .to_string();
    let parsed = serde_json::from_slice(&body).expect("manifest JSON");
    (digest, body, parsed)
}

/// The numbers of the build log line: (layers reused, layers built, bytes uploaded).
fn build_lines(log: &str) -> Vec<(u64, u64, u64)> {
    log.lines()
        .filter(|l| l.contains("layers reused,"))
        .map(|l| {
            let nums: Vec<u64> = l
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect();
            // "... N layers reused, M layers built, B bytes uploaded, image S bytes"
            let n = nums.len();
            (nums[n - 4], nums[n - 3], nums[n - 2])
        })
        .collect()
}

fn popularity_file(server_dir: &std::path::Path) -> String {
    // Popular paths get layers of their own, as glibc does with real data.
    let path = server_dir.join("popularity.json");
    std::fs::write(&path, r#"{"busybox-1.35.0": 5000, "libshared-1.0": 2000}"#).unwrap();
    path.display().to_string()
}

#[test]
fn second_image_uploads_only_its_new_layers() {
    let dir = tempfile::tempdir().unwrap();
    let pop = popularity_file(dir.path());
    let server = Server::start(&[("NIX_POPULARITY_URL", &pop)]);
    let (_, _, a) = manifest(&server, "alpha");
    let (_, _, b) = manifest(&server, "beta");
    let a_layers: HashSet<&str> = a.layers.iter().map(|l| l.digest.as_str()).collect();
    let shared: Vec<&Layer> = b
        .layers
        .iter()
        .filter(|l| a_layers.contains(l.digest.as_str()))
        .collect();
    // busybox, libshared, cacert and iana-etc are shared; beta and the symlink
    // layer are new.
    assert!(shared.len() >= 4, "shared layers: {}", shared.len());
    let lines = build_lines(&server.log());
    assert_eq!(lines.len(), 2, "two builds:\n{}", server.log());
    let (reused, built, uploaded) = lines[1];
    assert_eq!(reused as usize, shared.len());
    assert_eq!(built as usize, b.layers.len() - shared.len());
    let b_total: u64 = b.layers.iter().map(|l| l.size).sum();
    let shared_total: u64 = shared.iter().map(|l| l.size).sum();
    // Besides new layers: the config, two manifests, the SBOM (about 1.5 KB per
    // store path) and its two artifact manifests.
    assert!(
        uploaded < b_total - shared_total + 16384,
        "uploaded {uploaded} of {b_total} (shared {shared_total})"
    );
    println!(
        "image B: {} layers, {} reused; uploaded {uploaded} bytes of {b_total} ({:.1}%)",
        b.layers.len(),
        shared.len(),
        100.0 * uploaded as f64 / b_total as f64
    );
}

#[test]
fn restart_and_second_process_serve_identical_manifests_without_building() {
    let first = Server::start(&[]);
    let (digest, bytes, _) = manifest(&first, "shell/cowsay");
    let storage = first.storage_path().display().to_string();
    let pkgs = first.pkgs_path().display().to_string();
    let env = [
        ("STORAGE_PATH", storage.as_str()),
        ("NIXERY_PKGS_PATH", pkgs.as_str()),
    ];
    // A second process on the same storage while the first still runs.
    let second = Server::start(&env);
    let (digest2, bytes2, _) = manifest(&second, "shell/cowsay");
    assert_eq!(digest, digest2);
    assert_eq!(bytes, bytes2);
    assert!(build_lines(&second.log()).is_empty(), "{}", second.log());
    assert!(second.log().contains("image reused without building"));
    // A restart of the only process (stopped, so its package set copy stays).
    let mut first = first;
    let mut second = second;
    second.stop();
    first.stop();
    let restarted = Server::start(&env);
    let (digest3, bytes3, _) = manifest(&restarted, "shell/cowsay");
    assert_eq!(digest, digest3);
    assert_eq!(bytes, bytes3);
    assert!(
        build_lines(&restarted.log()).is_empty(),
        "{}",
        restarted.log()
    );
}

#[test]
fn replicas_receiving_one_new_image_build_it_once() {
    let first = Server::start(&[]);
    let storage = first.storage_path().display().to_string();
    let pkgs = first.pkgs_path().display().to_string();
    let second = Server::start(&[
        ("STORAGE_PATH", storage.as_str()),
        ("NIXERY_PKGS_PATH", pkgs.as_str()),
    ]);
    let digests: Vec<String> = thread::scope(|s| {
        let handles: Vec<_> = [&first, &second, &first, &second]
            .into_iter()
            .map(|server| s.spawn(move || manifest(server, "tools.figlet/hello").0))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(digests.iter().all(|d| *d == digests[0]), "{digests:?}");
    let builds = build_lines(&first.log()).len() + build_lines(&second.log()).len();
    assert_eq!(
        builds,
        1,
        "first:\n{}\nsecond:\n{}",
        first.log(),
        second.log()
    );
}
