//! zstd layers on request: `zstd/hello` has an OCI manifest whose layers are
//! `tar+zstd`, which podman, skopeo and containerd pull and run, while docker 20.10
//! (which would fail after the download with `archive/tar: invalid tar header`) and
//! any client that reads Docker manifests only get a clear refusal before anything
//! is built. The bytes do not depend on how many threads compress them, and the
//! gzip and zstd variants of one image share what they can (the config) and nothing
//! else.

mod common;

use common::*;
use std::collections::BTreeSet;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const ZSTD_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// The manifest of `name:latest` as a client sending `accept` gets it.
fn manifest(server: &Server, name: &str, accept: &str) -> (String, serde_json::Value) {
    let url = server.url(&format!("/v2/{name}/manifests/latest"));
    let (status, h, body) = http_get(&url, &[("Accept", accept)]);
    assert_eq!(status, 200, "GET {url}: {}", String::from_utf8_lossy(&body));
    let digest = h.get("docker-content-digest").expect("digest").to_string();
    assert_eq!(digest, sha256_digest(&body));
    (
        digest,
        serde_json::from_slice(&body).expect("manifest JSON"),
    )
}

fn layers(m: &serde_json::Value) -> Vec<(String, String)> {
    m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            (
                l["mediaType"].as_str().unwrap().to_string(),
                l["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_zstd_image_is_oci_only_and_shares_only_its_config_with_the_gzip_one() {
    let server = Server::start(&[]);
    // Every client's Accept gets the one OCI manifest; the Docker types with it too.
    let accepts = [
        OCI_MANIFEST.to_string(),
        format!("{DOCKER_MANIFEST}, {OCI_MANIFEST}"),
        format!("{DOCKER_MANIFEST}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX}"),
    ];
    let (digest, zstd) = manifest(&server, "zstd/hello", &accepts[0]);
    assert_eq!(zstd["mediaType"], OCI_MANIFEST);
    assert_eq!(
        zstd["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    for accept in &accepts[1..] {
        let url = server.url("/v2/zstd/hello/manifests/latest");
        let (status, h, _) = http_get(&url, &[("Accept", accept.as_str())]);
        assert_eq!(status, 200, "{accept}");
        assert_eq!(
            h.get("docker-content-digest"),
            Some(digest.as_str()),
            "{accept}"
        );
        assert_eq!(h.get("content-type"), Some(OCI_MANIFEST), "{accept}");
        let (status, h) = http_head(&url, &[("Accept", accept.as_str())]);
        assert_eq!((status, h.get("content-type")), (200, Some(OCI_MANIFEST)));
    }
    let zstd_layers = layers(&zstd);
    assert!(zstd_layers.iter().all(|(t, _)| t == ZSTD_LAYER), "{zstd}");

    // Every layer is a zstd frame of the same tar as the gzip layer's.
    let (_, gzip) = manifest(&server, "hello", OCI_MANIFEST);
    let gzip_layers = layers(&gzip);
    assert_eq!(gzip_layers.len(), zstd_layers.len());
    assert_eq!(
        gzip["config"]["digest"], zstd["config"]["digest"],
        "the config is shared"
    );
    let config_digest = zstd["config"]["digest"].as_str().unwrap();
    let (_, _, config) = http_get(
        &server.url(&format!("/v2/hello/blobs/{config_digest}")),
        &[],
    );
    let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    let gzip_set: BTreeSet<_> = gzip_layers.iter().map(|(_, d)| d.clone()).collect();
    for (i, (_, d)) in zstd_layers.iter().enumerate() {
        assert!(!gzip_set.contains(d), "layer {d} is in both variants");
        let (status, _, blob) = http_get(&server.url(&format!("/v2/zstd/hello/blobs/{d}")), &[]);
        assert_eq!(status, 200);
        assert_eq!(&sha256_digest(&blob), d);
        assert_eq!(
            &blob[..4],
            &[0x28, 0xb5, 0x2f, 0xfd],
            "not a zstd frame: {d}"
        );
        let tar = zstd_decompress(&blob);
        assert_eq!(
            serde_json::json!(sha256_digest(&tar)),
            diff_ids[i],
            "layer {i}'s tar"
        );
    }

    // Asked again, by a restarted server on the same storage: reused, same bytes.
    let storage = server.storage_path().display().to_string();
    let pkgs = server.pkgs_path().display().to_string();
    let mut server = server;
    server.stop();
    let again = Server::start(&[("STORAGE_PATH", &storage), ("NIXERY_PKGS_PATH", &pkgs)]);
    let (digest_again, _) = manifest(&again, "zstd/hello", OCI_MANIFEST);
    assert_eq!(digest_again, digest);
    assert_eq!(required_metric(&again, "nixery_layers_built_total"), 0);
}

/// Decompresses with the zstd tool, as a client would.
fn zstd_decompress(data: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer.zst");
    std::fs::write(&path, data).unwrap();
    let out = std::process::Command::new("zstd")
        .args(["-d", "-c", "-q"])
        .arg(&path)
        .output()
        .expect("zstd");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn the_bytes_do_not_depend_on_the_number_of_compression_threads() {
    // One package set, so the same store paths; storage of each server's own, so
    // each packs every layer itself.
    let first = Server::start(&[("NIXERY_LAYERS__COMPRESSION_THREADS", "1")]);
    let pkgs = first.pkgs_path().display().to_string();
    // `noise` has a layer of several MiB: several zstd jobs, several gzip blocks.
    let digests = |server: &Server| {
        let (zstd, _) = manifest(server, "zstd/noise", OCI_MANIFEST);
        let (gzip, _) = manifest(server, "noise", DOCKER_MANIFEST);
        assert!(required_metric(server, "nixery_layers_built_total") > 0);
        (zstd, gzip)
    };
    let expected = digests(&first);
    for threads in ["2", "8"] {
        let server = Server::start(&[
            ("NIXERY_LAYERS__COMPRESSION_THREADS", threads),
            ("NIXERY_PKGS_PATH", &pkgs),
        ]);
        assert_eq!(digests(&server), expected, "{threads} threads");
    }
}

#[test]
fn clients_that_cannot_unpack_zstd_are_refused_before_a_build() {
    let server = Server::start(&[]);
    let url = server.url("/v2/zstd/hello/manifests/latest");
    let refusals = [
        // A client that reads Docker manifests only.
        (
            vec![("Accept", DOCKER_MANIFEST.to_string())],
            "Docker types only",
        ),
        (
            vec![("Accept", format!("{DOCKER_MANIFEST}, {DOCKER_LIST}"))],
            "Docker types only",
        ),
        // docker 20.10 accepts OCI manifests but cannot decompress zstd.
        (
            vec![
                (
                    "Accept",
                    format!("{DOCKER_MANIFEST}, {DOCKER_LIST}, {OCI_MANIFEST}"),
                ),
                (
                    "User-Agent",
                    "docker/20.10.24+dfsg1 go/go1.19.8 git-commit/5d6db84".into(),
                ),
            ],
            "docker 20.10",
        ),
    ];
    for (headers, what) in refusals {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, h, body) = http_get(&url, &headers);
        let (code, message) = registry_error(400, status, &h, &body);
        assert_eq!(code, "UNSUPPORTED", "{what}");
        for part in [
            "zstd/hello has zstd layers",
            "docker 23",
            "containerd",
            "podman",
            "pull hello (gzip)",
        ] {
            assert!(message.contains(part), "{what}: {message}");
        }
    }
    // docker 24 is served.
    let (status, _, _) = http_get(
        &url,
        &[
            ("Accept", &format!("{DOCKER_MANIFEST}, {OCI_MANIFEST}")),
            ("User-Agent", "docker/24.0.7 go/go1.20.10"),
        ],
    );
    assert_eq!(status, 200);
    // Nothing was built for the refused requests before that one.
    assert_eq!(required_metric(&server, "nixery_builds_started_total"), 1);
    // `hello/zstd` is the zstd tool's package, not a compression.
    let (status, _, body) = http_get(
        &server.url("/v2/hello/zstd/manifests/latest"),
        &[("Accept", DOCKER_MANIFEST)],
    );
    assert_ne!(status, 400, "{}", String::from_utf8_lossy(&body));
}

#[test]
fn podman_skopeo_and_containerd_pull_zstd_hello_and_it_runs() {
    let mut ok = require_root();
    for t in [
        "podman",
        "runc",
        "skopeo",
        "umoci",
        "chroot",
        "containerd",
        "ctr",
    ] {
        ok &= require_tool(t);
    }
    if !ok {
        return;
    }
    let server = Server::start(&[]);
    let image = format!("{}/zstd/hello:latest", server.addr());

    let work = tempfile::tempdir().unwrap();
    let podman = || podman_command(&work.path().join("podman"));
    run_ok(podman().args(["pull", "--tls-verify=false", &image]));
    let out = run_ok(podman().args(podman_run_args(&image, &["/bin/hello"])));
    assert_eq!(out.stdout.trim(), "Hello, world!", "{out}");

    // skopeo reads the zstd layers; umoci 0.4.7 unpacks only gzip, so skopeo
    // recompresses them on the way.
    let layout = work.path().join("oci");
    run_ok(cimage_command("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        "--dest-compress",
        "--dest-compress-format",
        "gzip",
        &format!("docker://{image}"),
        &format!("oci:{}:latest", layout.display()),
    ]));
    let rootfs = umoci_unpack(&layout, &work.path().join("bundle"));
    let out = run_ok(&mut chroot(&rootfs, &["/bin/hello"]));
    assert_eq!(out.stdout.trim(), "Hello, world!", "{out}");

    let ctrd = Containerd::start();
    let ns = format!("nixery-{}", random_hex());
    ctrd.pull(&ns, &image);
    let out = ctrd.run(&ns, &image, &["/bin/hello"]);
    assert_eq!(out.stdout.trim(), "Hello, world!", "{out}");
}

#[test]
fn docker_20_10_gets_the_refusal_and_gzip_hello_still_pulls() {
    if !require_root() || !require_tool("dockerd") || !require_tool("docker") {
        return;
    }
    let server = Server::start(&[]);
    let dockerd = Dockerd::start();
    let version = run_ok(
        dockerd
            .docker()
            .args(["version", "--format", "{{.Server.Version}}"]),
    );
    let major: u32 = version
        .stdout
        .trim()
        .split('.')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let zstd = format!("{}/zstd/hello:latest", server.addr());
    if major < 23 {
        let out = run_fail(dockerd.docker().args(["pull", &zstd]));
        assert!(out.stderr.contains("zstd/hello has zstd layers"), "{out}");
        assert!(out.stderr.contains("pull hello (gzip)"), "{out}");
    } else {
        run_ok(dockerd.docker().args(["pull", &zstd]));
    }
    run_ok(
        dockerd
            .docker()
            .args(["pull", &format!("{}/hello:latest", server.addr())]),
    );
}
