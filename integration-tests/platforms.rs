//! Black-box tests of multi-platform images (`nix.systems`).
//!
//! A server configured with `NIXERY_NIX__SYSTEMS="x86_64-linux aarch64-linux"`
//! answers a name without a platform prefix with an image index (a Docker manifest
//! list or an OCI index, chosen from the request's `Accept` lines) naming one image
//! per platform; `amd64/NAME` and `arm64/NAME` are those images on their own.
//!
//! This x86_64 machine builds the test package set's `aarch64-linux` derivations
//! when the server's Nix has `extra-platforms = aarch64-linux`: Nix does not check
//! the builder's architecture, and every builder of the set is the host's static
//! busybox. Servers that must build for arm64 get that line appended to the
//! harness's `NIX_CONFIG`; one test leaves it out to see the arm64 build fail.
//!
//! Which image a client chose is read from the server's access log (actix `Logger`
//! lines `"GET /v2/NAME/manifests/sha256:… HTTP/1.1" 200`), which does not depend
//! on any client's output format. Clients that are missing make a test skip, or
//! fail when `NIXERY_REQUIRE_CLIENTS=1` (as in `scripts/test`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    cimage_command, http_get, http_head, http_request, podman_run_args, random_hex, registry_error,
    require_root, require_tool, run_fail, run_ok, sha256_digest, test_nix_config, Containerd,
    Dockerd, NixWrappers, Server,
};
use serde_json::{json, Value};

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Every manifest type on one line, as containerd sends it.
const ACCEPT_ALL: &str = "application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*";

/// The `Accept` lines of containers/image (skopeo, podman): one type per line.
const ACCEPT_CIMAGE: [&str; 6] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
];

/// Only OCI types, as the OCI conformance suite asks.
const ACCEPT_OCI: &str =
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json";

/// The Docker list without the Docker manifests it would name: an OCI index.
const ACCEPT_LIST_WITHOUT_DOCKER_MANIFESTS: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json";

/// `nix.systems` of every multi-platform server here.
const SYSTEMS: &str = "x86_64-linux aarch64-linux";

// ---------------------------------------------------------------------------
// Helpers

/// The harness's `NIX_CONFIG` plus `extra-platforms = aarch64-linux`, so that the
/// server's Nix builds the package set's aarch64-linux derivations here.
fn nix_config_with_arm64() -> String {
    format!("{}\nextra-platforms = aarch64-linux", test_nix_config())
}

/// A server serving x86_64-linux and aarch64-linux whose Nix can build both; `extra`
/// adds or overrides variables.
fn start_two_platforms(extra: &[(&str, &str)]) -> Server {
    let nix_config = nix_config_with_arm64();
    let mut env = vec![
        ("NIXERY_NIX__SYSTEMS", SYSTEMS),
        ("NIX_CONFIG", nix_config.as_str()),
    ];
    env.extend_from_slice(extra);
    Server::start(&env)
}

fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

/// A manifest or index as served.
struct Fetched {
    media_type: String,
    digest: String,
    body: Vec<u8>,
    json: Value,
}

/// GETs `/v2/NAME/manifests/REFERENCE` with one `Accept` line per element of
/// `accept` (none when empty) and checks the answer: 200, `Docker-Content-Digest`
/// the body's sha256, `Content-Length` its length, JSON; and that HEAD answers the
/// same status, digest, `Content-Type` and `Content-Length`.
fn fetch(server: &Server, name: &str, reference: &str, accept: &[&str]) -> Fetched {
    let url = server.url(&format!("/v2/{name}/manifests/{reference}"));
    let headers: Vec<(&str, &str)> = accept.iter().map(|a| ("Accept", *a)).collect();
    let (status, h, body) = http_get(&url, &headers);
    assert_eq!(
        status,
        200,
        "GET {url} (Accept {accept:?}): {}",
        text(&body)
    );
    let digest = h
        .get("docker-content-digest")
        .unwrap_or_else(|| panic!("GET {url}: no Docker-Content-Digest: {h:?}"))
        .to_string();
    assert_eq!(
        digest,
        sha256_digest(&body),
        "GET {url} (Accept {accept:?}): the digest is not the body's hash"
    );
    let media_type = h
        .get("content-type")
        .unwrap_or_else(|| panic!("GET {url}: no Content-Type: {h:?}"))
        .to_string();
    let len = body.len().to_string();
    assert_eq!(h.get("content-length"), Some(len.as_str()), "GET {url}");

    let (head_status, head) = http_head(&url, &headers);
    assert_eq!(head_status, 200, "HEAD {url} (Accept {accept:?})");
    assert_eq!(
        head.get("docker-content-digest"),
        Some(digest.as_str()),
        "HEAD and GET {url} (Accept {accept:?}) disagree on the digest"
    );
    assert_eq!(
        head.get("content-type"),
        Some(media_type.as_str()),
        "HEAD and GET {url} (Accept {accept:?}) disagree on the type"
    );
    assert_eq!(
        head.get("content-length"),
        Some(len.as_str()),
        "HEAD and GET {url} (Accept {accept:?}) disagree on the length"
    );

    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {}", text(&body)));
    Fetched {
        media_type,
        digest,
        body,
        json,
    }
}

/// The image config a manifest names, fetched under NAME; checked against its digest.
fn config_of(server: &Server, name: &str, manifest: &Fetched) -> Value {
    let digest = manifest.json["config"]["digest"]
        .as_str()
        .unwrap_or_else(|| panic!("manifest without config digest: {}", text(&manifest.body)));
    let url = server.url(&format!("/v2/{name}/blobs/{digest}"));
    let (status, _, body) = http_get(&url, &[]);
    assert_eq!(status, 200, "GET {url}: {}", text(&body));
    assert_eq!(sha256_digest(&body), digest, "config bytes of {url}");
    serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("config {url} is not JSON ({e}): {}", text(&body)))
}

/// One entry of an index.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Child {
    digest: String,
    size: u64,
}

/// The two entries of an index, by architecture.
#[derive(Clone, Debug)]
struct Children {
    amd64: Child,
    arm64: Child,
}

impl Children {
    fn of(&self, arch: &str) -> &Child {
        match arch {
            "amd64" => &self.amd64,
            "arm64" => &self.arm64,
            _ => panic!("no architecture {arch}"),
        }
    }
}

/// Checks that `index` is an index of type `index_type` listing exactly an amd64 and
/// an arm64 manifest of type `child_type`, in that order, with the platforms
/// clients match; returns them.
fn index_children(index: &Fetched, index_type: &str, child_type: &str) -> Children {
    let body = text(&index.body);
    assert_eq!(index.media_type, index_type, "Content-Type of {body}");
    assert_eq!(index.json["schemaVersion"], 2, "{body}");
    assert_eq!(index.json["mediaType"], index_type, "{body}");
    let entries = index.json["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("no manifests array: {body}"));
    assert_eq!(entries.len(), 2, "one entry per platform: {body}");
    let child = |entry: &Value, platform: Value| {
        assert_eq!(entry["mediaType"], child_type, "{body}");
        assert_eq!(entry["platform"], platform, "{body}");
        let digest = entry["digest"]
            .as_str()
            .filter(|d| d.starts_with("sha256:") && d.len() == 71)
            .unwrap_or_else(|| panic!("bad digest in {body}"))
            .to_string();
        let size = entry["size"]
            .as_u64()
            .unwrap_or_else(|| panic!("no size in {body}"));
        Child { digest, size }
    };
    let children = Children {
        amd64: child(&entries[0], json!({"architecture": "amd64", "os": "linux"})),
        arm64: child(
            &entries[1],
            json!({"architecture": "arm64", "os": "linux", "variant": "v8"}),
        ),
    };
    assert_ne!(children.amd64.digest, children.arm64.digest, "{body}");
    children
}

/// The Docker manifest list `hello` answers registry clients (they all accept it)
/// and its two children.
fn docker_list(server: &Server, name: &str) -> (Fetched, Children) {
    let list = fetch(server, name, "latest", &ACCEPT_CIMAGE);
    let children = index_children(&list, DOCKER_LIST, DOCKER_MANIFEST);
    (list, children)
}

/// `(method, path, status)` of every request in an access log (actix `Logger`:
/// `… "GET /v2/… HTTP/1.1" 200 …`).
fn access_log(log: &str) -> Vec<(String, String, u16)> {
    let re = regex_lite::Regex::new(r#""(GET|HEAD) (/[^ "]*) HTTP/[0-9.]+" ([0-9]{3})"#)
        .expect("access log pattern");
    log.lines()
        .filter_map(|line| {
            let c = re.captures(line)?;
            Some((c[1].to_string(), c[2].to_string(), c[3].parse().ok()?))
        })
        .collect()
}

/// The manifests the server answered with 200 to a GET by digest under NAME, in the
/// part of its log after byte `since`.
fn manifests_served(server: &Server, since: usize, name: &str) -> Vec<String> {
    let log = server.log();
    let prefix = format!("/v2/{name}/manifests/");
    access_log(&log[since.min(log.len())..])
        .into_iter()
        .filter(|(method, _, status)| method == "GET" && *status == 200)
        .filter_map(|(_, path, _)| {
            let reference = path.strip_prefix(&prefix)?;
            reference
                .starts_with("sha256:")
                .then(|| reference.to_string())
        })
        .collect()
}

/// Waits (the log is written after the answer) until the server's log after `since`
/// shows a GET of manifest `digest` under NAME answered with 200; returns every
/// manifest so served after `since`.
fn wait_served(server: &Server, since: usize, name: &str, digest: &str, what: &str) -> Vec<String> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let served = manifests_served(server, since, name);
        if served.iter().any(|d| d == digest) {
            return served;
        }
        assert!(
            Instant::now() < end,
            "{what}: the server's log shows no GET of {name}'s manifest {digest}; \
             manifests served by digest since: {served:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn require_all(tools: &[&str]) -> bool {
    // Evaluate every tool so that the skip/panic message names each one.
    let mut ok = require_root();
    for t in tools {
        ok &= require_tool(t);
    }
    ok
}

/// `nix-store --realise` calls so far.
fn realisations(nix: &NixWrappers) -> Vec<String> {
    nix.calls()
        .into_iter()
        .filter(|(_, p, a)| p == "nix-store" && a.split_whitespace().any(|w| w == "--realise"))
        .map(|(_, _, a)| a)
        .collect()
}

// ---------------------------------------------------------------------------
// 1. The index over HTTP

#[test]
fn a_tag_is_an_index_in_the_format_the_accept_header_asks_for() {
    let server = start_two_platforms(&[]);

    // (what, Accept lines, index type, child type)
    let cases: [(&str, &[&str], &str, &str); 7] = [
        (
            "containerd's line",
            &[ACCEPT_ALL],
            DOCKER_LIST,
            DOCKER_MANIFEST,
        ),
        (
            "containers/image's lines",
            &ACCEPT_CIMAGE,
            DOCKER_LIST,
            DOCKER_MANIFEST,
        ),
        (
            "Docker types only",
            &[DOCKER_MANIFEST, DOCKER_LIST],
            DOCKER_LIST,
            DOCKER_MANIFEST,
        ),
        ("OCI types only", &[ACCEPT_OCI], OCI_INDEX, OCI_MANIFEST),
        ("the OCI index alone", &[OCI_INDEX], OCI_INDEX, OCI_MANIFEST),
        (
            "a Docker list without Docker manifests",
            &[ACCEPT_LIST_WITHOUT_DOCKER_MANIFESTS],
            OCI_INDEX,
            OCI_MANIFEST,
        ),
        (
            "the OCI types on separate lines",
            &[OCI_MANIFEST, OCI_INDEX],
            OCI_INDEX,
            OCI_MANIFEST,
        ),
    ];
    // index type -> (the index, its children, child type)
    let mut indexes: BTreeMap<&str, (Fetched, Children, &str)> = BTreeMap::new();
    for (what, accept, index_type, child_type) in cases {
        let index = fetch(&server, "hello", "latest", accept);
        assert_eq!(
            index.media_type,
            index_type,
            "{what}: Accept {accept:?} got {}",
            text(&index.body)
        );
        let children = index_children(&index, index_type, child_type);
        match indexes.get(index_type) {
            Some((first, _, _)) => {
                assert_eq!(
                    index.body, first.body,
                    "{what}: another {index_type} than before"
                );
            }
            None => {
                indexes.insert(index_type, (index, children, child_type));
            }
        }
    }
    assert_eq!(indexes.len(), 2);

    for (index_type, (index, children, child_type)) in &indexes {
        // The index by digest, as containerd asks for it after HEAD.
        let by_digest = fetch(
            &server,
            "hello",
            &index.digest,
            &[&format!("{index_type}, */*")],
        );
        assert_eq!(by_digest.body, index.body, "{index_type} by digest");
        assert_eq!(by_digest.media_type, *index_type, "{index_type} by digest");

        for arch in ["amd64", "arm64"] {
            let child = children.of(arch);
            // The entry is exactly the manifest the prefixed name answers.
            let single = fetch(&server, &format!("{arch}/hello"), "latest", &[child_type]);
            assert_eq!(single.media_type, *child_type, "{arch}/hello");
            assert_eq!(
                single.digest, child.digest,
                "the {index_type}'s {arch} entry is not {arch}/hello's {child_type}"
            );
            assert_eq!(single.body.len() as u64, child.size, "{arch} entry size");
            // Clients fetch the entry by digest under the name they pulled.
            let entry = fetch(
                &server,
                "hello",
                &child.digest,
                &[&format!("{child_type}, */*")],
            );
            assert_eq!(entry.body, single.body, "{arch} entry by digest");
            assert_eq!(entry.media_type, *child_type, "{arch} entry by digest");
            // Its config says the same architecture.
            let config = config_of(&server, "hello", &entry);
            assert_eq!(config["architecture"], arch, "config of the {arch} entry");
            assert_eq!(config["os"], "linux", "config of the {arch} entry");
        }
    }

    // A client that names no index type gets the amd64 (host) manifest, in the
    // format it asks for (Docker schema 2 when it names none, as today).
    let docker_amd64 = &indexes[DOCKER_LIST].1.amd64.digest;
    let oci_amd64 = &indexes[OCI_INDEX].1.amd64.digest;
    let plain: [(&[&str], &str, &String); 4] = [
        (&[DOCKER_MANIFEST], DOCKER_MANIFEST, docker_amd64),
        (&[], DOCKER_MANIFEST, docker_amd64),
        (&[OCI_MANIFEST], OCI_MANIFEST, oci_amd64),
        (
            &[OCI_MANIFEST, DOCKER_MANIFEST],
            DOCKER_MANIFEST,
            docker_amd64,
        ),
    ];
    for (accept, media_type, digest) in plain {
        let m = fetch(&server, "hello", "latest", accept);
        assert_eq!(
            m.media_type,
            media_type,
            "Accept {accept:?} names no index type: {}",
            text(&m.body)
        );
        assert_eq!(
            &m.digest, digest,
            "Accept {accept:?}: not the amd64 image of the index"
        );
    }

    // The prefixes answer plain manifests even to clients that take an index.
    for arch in ["amd64", "arm64"] {
        let m = fetch(&server, &format!("{arch}/hello"), "latest", &[ACCEPT_ALL]);
        assert_eq!(
            m.media_type,
            DOCKER_MANIFEST,
            "{arch}/hello: {}",
            text(&m.body)
        );
        assert_eq!(
            m.digest,
            indexes[DOCKER_LIST].1.of(arch).digest,
            "{arch}/hello with every type accepted"
        );
    }
}

// ---------------------------------------------------------------------------
// 2. skopeo

#[test]
fn skopeo_sees_the_index_and_picks_each_platform() {
    if !require_tool("skopeo") {
        return;
    }
    let server = start_two_platforms(&[]);
    let image = format!("docker://{}/hello:latest", server.addr());

    let raw =
        run_ok(cimage_command("skopeo").args(["inspect", "--raw", "--tls-verify=false", &image]));
    let (list, children) = docker_list(&server, "hello");
    assert_eq!(
        raw.stdout.as_bytes(),
        &list.body[..],
        "skopeo inspect --raw is not the Docker list served over HTTP:\n{raw}"
    );

    for (arch, other) in [("arm64", "amd64"), ("amd64", "arm64")] {
        let since = server.log().len();
        let out = run_ok(cimage_command("skopeo").args([
            "--override-arch",
            arch,
            "inspect",
            "--no-tags",
            "--tls-verify=false",
            &image,
        ]));
        let v: Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("skopeo inspect printed no JSON ({e}):\n{out}"));
        assert_eq!(v["Architecture"], arch, "{out}");
        assert_eq!(v["Os"], "linux", "{out}");
        // skopeo names the list it resolved the tag to.
        assert_eq!(v["Digest"], list.digest.as_str(), "{out}");
        let served = wait_served(
            &server,
            since,
            "hello",
            &children.of(arch).digest,
            &format!("skopeo --override-arch {arch}"),
        );
        assert!(
            !served.contains(&children.of(other).digest),
            "skopeo --override-arch {arch} also fetched the {other} manifest: {served:?}"
        );
    }

    let out = run_fail(cimage_command("skopeo").args([
        "--override-arch",
        "s390x",
        "inspect",
        "--no-tags",
        "--tls-verify=false",
        &image,
    ]));
    assert!(
        out.stderr
            .contains("no image found in manifest list for architecture s390x"),
        "{out}"
    );
}

// ---------------------------------------------------------------------------
// 3. podman, docker and containerd pull one platform; 4. a platform the index
//    lacks is refused by the client.

#[test]
fn podman_pulls_the_arm64_image_with_arch_and_runs_the_amd64_one() {
    if !require_all(&["podman", "runc"]) {
        return;
    }
    let server = start_two_platforms(&[]);
    let (_, children) = docker_list(&server, "hello");
    let work = tempfile::tempdir().unwrap();
    let image = format!("{}/hello:latest", server.addr());
    let podman = || common::podman_command(work.path());
    let arch_of = || {
        run_ok(podman().args([
            "image",
            "inspect",
            "--format",
            "{{.Architecture}} {{.Os}}",
            &image,
        ]))
        .stdout
        .trim()
        .to_string()
    };

    let since = server.log().len();
    run_ok(podman().args(["pull", "--tls-verify=false", "--arch", "arm64", &image]));
    let served = wait_served(
        &server,
        since,
        "hello",
        &children.arm64.digest,
        "podman pull --arch arm64",
    );
    assert!(
        !served.contains(&children.amd64.digest),
        "podman pull --arch arm64 fetched the amd64 manifest: {served:?}"
    );
    assert_eq!(arch_of(), "arm64 linux");

    let out = run_fail(podman().args(["pull", "--tls-verify=false", "--arch", "s390x", &image]));
    assert!(
        out.combined()
            .contains("no image found in manifest list for architecture s390x"),
        "{out}"
    );

    let since = server.log().len();
    run_ok(podman().args(["pull", "--tls-verify=false", &image]));
    let served = wait_served(
        &server,
        since,
        "hello",
        &children.amd64.digest,
        "podman pull",
    );
    assert!(
        !served.contains(&children.arm64.digest),
        "podman pull on amd64 fetched the arm64 manifest: {served:?}"
    );
    assert_eq!(arch_of(), "amd64 linux");
    let out = run_ok(podman().args(podman_run_args(&image, &["/bin/hello"])));
    assert_eq!(out.stdout.trim(), "Hello, world!", "{out}");
}

#[test]
fn docker_pulls_by_platform_and_refuses_a_platform_the_list_lacks() {
    if !require_all(&["dockerd", "docker"]) {
        return;
    }
    let server = start_two_platforms(&[]);
    let (list, children) = docker_list(&server, "hello");
    let dockerd = Dockerd::start();
    let image = format!("{}/hello:latest", server.addr());
    let arch_of = || {
        run_ok(dockerd.docker().args([
            "image",
            "inspect",
            "-f",
            "{{.Architecture}} {{.Os}}",
            &image,
        ]))
        .stdout
        .trim()
        .to_string()
    };
    let pulled = format!("Digest: {}", list.digest);

    let since = server.log().len();
    let out = run_ok(
        dockerd
            .docker()
            .args(["pull", "--platform", "linux/arm64", &image]),
    );
    assert!(
        out.stdout.contains(&pulled),
        "docker did not pull the list:\n{out}"
    );
    let served = wait_served(
        &server,
        since,
        "hello",
        &children.arm64.digest,
        "docker pull --platform linux/arm64",
    );
    assert!(
        !served.contains(&children.amd64.digest),
        "docker pull --platform linux/arm64 fetched the amd64 manifest: {served:?}"
    );
    assert_eq!(arch_of(), "arm64 linux");

    let out = run_fail(
        dockerd
            .docker()
            .args(["pull", "--platform", "linux/s390x", &image]),
    );
    assert!(
        out.stderr
            .contains("no matching manifest for linux/s390x in the manifest list entries"),
        "{out}"
    );

    let since = server.log().len();
    let out = run_ok(dockerd.docker().args(["pull", &image]));
    assert!(
        out.stdout.contains(&pulled),
        "docker did not pull the list:\n{out}"
    );
    let served = wait_served(
        &server,
        since,
        "hello",
        &children.amd64.digest,
        "docker pull",
    );
    assert!(
        !served.contains(&children.arm64.digest),
        "docker pull on amd64 fetched the arm64 manifest: {served:?}"
    );
    assert_eq!(arch_of(), "amd64 linux");
    let out =
        run_ok(
            dockerd
                .docker()
                .args(["run", "--rm", "--network", "none", &image, "/bin/hello"]),
        );
    assert_eq!(out.stdout.trim(), "Hello, world!", "{out}");
}

#[test]
fn containerd_pulls_by_platform_and_refuses_a_platform_the_list_lacks() {
    if !require_all(&["containerd", "ctr", "runc"]) {
        return;
    }
    let server = start_two_platforms(&[]);
    let (list, children) = docker_list(&server, "hello");
    let ctrd = Containerd::start();
    let image = format!("{}/hello:latest", server.addr());

    let ns = format!("nixery-{}", random_hex());
    let since = server.log().len();
    run_ok(ctrd.ctr(&ns).args([
        "images",
        "pull",
        "--plain-http",
        "--platform",
        "linux/arm64",
        &image,
    ]));
    let served = wait_served(
        &server,
        since,
        "hello",
        &children.arm64.digest,
        "ctr images pull --platform linux/arm64",
    );
    assert!(
        !served.contains(&children.amd64.digest),
        "ctr pull --platform linux/arm64 fetched the amd64 manifest: {served:?}"
    );
    let content = run_ok(ctrd.ctr(&ns).args(["content", "ls", "-q"]));
    let has = |d: &str| content.stdout.lines().any(|l| l.trim() == d);
    assert!(
        has(&list.digest),
        "the list is not in the content store:\n{content}"
    );
    assert!(has(&children.arm64.digest), "no arm64 manifest:\n{content}");
    assert!(
        !has(&children.amd64.digest),
        "an amd64 manifest:\n{content}"
    );
    let images = run_ok(ctrd.ctr(&ns).args(["images", "ls"]));
    let row = images
        .stdout
        .lines()
        .find(|l| l.starts_with(&image))
        .unwrap_or_else(|| panic!("{image} not listed:\n{images}"));
    assert!(row.contains(DOCKER_LIST), "{images}");
    assert!(row.contains("linux/amd64,linux/arm64/v8"), "{images}");

    let out = run_fail(ctrd.ctr(&format!("nixery-{}", random_hex())).args([
        "images",
        "pull",
        "--plain-http",
        "--platform",
        "linux/s390x",
        &image,
    ]));
    assert!(
        out.combined().contains("no match for platform in manifest"),
        "{out}"
    );

    let ns = format!("nixery-{}", random_hex());
    let since = server.log().len();
    ctrd.pull(&ns, &image);
    wait_served(
        &server,
        since,
        "hello",
        &children.amd64.digest,
        "ctr images pull",
    );
    let out = ctrd.run(&ns, &image, &["/bin/hello"]);
    assert_eq!(out.stdout.trim(), "Hello, world!", "{out}");
}

// ---------------------------------------------------------------------------
// 5. Concurrent requests for a new multi-platform image: one build per platform.

#[test]
fn concurrent_index_requests_build_each_platform_once() {
    const N: usize = 100;
    let nix = NixWrappers::new();
    // Each build must outlast the arrival of all requests.
    nix.set_realise_delay("2");
    let bin = nix.bin_dir();
    let server = start_two_platforms(&[("NIXERY_NIX__BIN_DIR", bin.as_str())]);
    let url = server.url("/v2/hello/manifests/latest");

    let barrier = Arc::new(Barrier::new(N));
    let handles: Vec<_> = (0..N)
        .map(|i| {
            let url = url.clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                let method = if i % 2 == 0 { "GET" } else { "HEAD" };
                let accept = if i % 4 < 2 { ACCEPT_ALL } else { ACCEPT_OCI };
                barrier.wait();
                let sent = Instant::now();
                let r = http_request(
                    method,
                    &url,
                    &[("Accept", accept)],
                    Duration::from_secs(180),
                );
                (method, accept, sent, Instant::now(), r)
            })
        })
        .collect();

    // Accept -> (Content-Type, digest) -> answers
    let mut answers: BTreeMap<&str, BTreeMap<(String, String), usize>> = BTreeMap::new();
    let mut errors = Vec::new();
    let mut last_sent: Option<Instant> = None;
    let mut first_answered: Option<Instant> = None;
    for h in handles {
        let (method, accept, sent, answered, r) = h.join().expect("request thread");
        last_sent = Some(last_sent.map_or(sent, |t| t.max(sent)));
        first_answered = Some(first_answered.map_or(answered, |t| t.min(answered)));
        match r {
            Ok((200, headers, body)) => {
                let digest = headers
                    .get("docker-content-digest")
                    .unwrap_or("")
                    .to_string();
                if method == "GET" && sha256_digest(&body) != digest {
                    errors.push(format!("GET: body digest is not the header's {digest:?}"));
                }
                let ty = headers.get("content-type").unwrap_or("").to_string();
                *answers
                    .entry(accept)
                    .or_default()
                    .entry((ty, digest))
                    .or_default() += 1;
            }
            Ok((status, _, body)) => errors.push(format!("{method}: {status} {}", text(&body))),
            Err(e) => errors.push(format!("{method}: {e}")),
        }
    }
    let realise = realisations(&nix);
    let instantiate = nix.count("nix-instantiate");
    eprintln!(
        "{N} concurrent index requests: {} errors, answers {answers:?}, \
         {instantiate} nix-instantiate, {} nix-store --realise",
        errors.len(),
        realise.len()
    );
    assert!(
        errors.is_empty(),
        "{} errors, e.g.:\n{}",
        errors.len(),
        errors[..errors.len().min(10)].join("\n")
    );
    for (accept, index_type) in [(ACCEPT_ALL, DOCKER_LIST), (ACCEPT_OCI, OCI_INDEX)] {
        let got = &answers[accept];
        assert_eq!(got.len(), 1, "Accept {accept}: different answers {got:?}");
        let ((ty, _), n) = got.iter().next().unwrap();
        assert_eq!(ty, index_type, "Accept {accept}");
        assert_eq!(*n, N / 2);
    }
    assert!(
        last_sent < first_answered,
        "requests did not overlap: the last was sent after the first answer"
    );
    // Each platform's derivations are realised once, whether alone or in one batch
    // with the other's.
    let targets: Vec<&str> = realise
        .iter()
        .flat_map(|args| args.split_whitespace().filter(|w| w.ends_with("!out")))
        .collect();
    let distinct: BTreeSet<&str> = targets.iter().copied().collect();
    assert_eq!(
        targets.len(),
        distinct.len(),
        "a derivation was realised twice; Nix calls:\n{}",
        nix.log_text()
    );
    assert_eq!(
        distinct.iter().filter(|t| t.contains("-hello-")).count(),
        2,
        "hello of each platform; Nix calls:\n{}",
        nix.log_text()
    );
    assert_eq!(
        instantiate,
        2,
        "one nix-instantiate per platform; Nix calls:\n{}",
        nix.log_text()
    );

    // A later pull of one platform reuses what the index build made.
    let (_, children) = docker_list(&server, "hello");
    let before = realisations(&nix).len();
    let arm = fetch(&server, "arm64/hello", "latest", &[DOCKER_MANIFEST]);
    assert_eq!(arm.digest, children.arm64.digest);
    let amd = fetch(&server, "amd64/hello", "latest", &[DOCKER_MANIFEST]);
    assert_eq!(amd.digest, children.amd64.digest);
    assert_eq!(
        realisations(&nix).len(),
        before,
        "arm64/hello and amd64/hello were built again; Nix calls:\n{}",
        nix.log_text()
    );
}

// ---------------------------------------------------------------------------
// 6. A platform that cannot be built

#[test]
fn a_platform_nix_cannot_build_fails_the_index_and_names_it() {
    // Both systems, but this Nix may not build for aarch64-linux.
    let nix_config = test_nix_config();
    let server = Server::start(&[
        ("NIXERY_NIX__SYSTEMS", SYSTEMS),
        ("NIX_CONFIG", nix_config.as_str()),
    ]);

    // How this registry answers any other failed Nix build.
    let (status, h, body) = http_get(
        &server.url("/v2/broken/manifests/latest"),
        &[("Accept", DOCKER_MANIFEST)],
    );
    let (build_failed, message) = registry_error(400, status, &h, &body);
    assert!(message.contains("deliberately fails"), "{message}");

    for accept in [ACCEPT_ALL, ACCEPT_OCI] {
        let url = server.url("/v2/hello/manifests/latest");
        let (status, h, body) = http_get(&url, &[("Accept", accept)]);
        let (code, message) = registry_error(400, status, &h, &body);
        assert_eq!(code, build_failed, "Accept {accept}: {message}");
        assert!(
            message.contains("linux/arm64"),
            "Accept {accept}: the platform is not named: {message}"
        );
        assert!(
            message.contains("aarch64-linux"),
            "Accept {accept}: the Nix system is not named: {message}"
        );
        let (status, _) = http_head(&url, &[("Accept", accept)]);
        assert_eq!(status, 400, "HEAD {url} (Accept {accept})");
    }

    let (status, h, body) = http_get(
        &server.url("/v2/arm64/hello/manifests/latest"),
        &[("Accept", DOCKER_MANIFEST)],
    );
    let (code, message) = registry_error(400, status, &h, &body);
    assert_eq!(code, build_failed, "arm64/hello: {message}");
    assert!(message.contains("aarch64-linux"), "arm64/hello: {message}");

    // The host platform alone still works.
    let amd = fetch(&server, "amd64/hello", "latest", &[DOCKER_MANIFEST]);
    assert_eq!(amd.media_type, DOCKER_MANIFEST);
    assert_eq!(
        config_of(&server, "amd64/hello", &amd)["architecture"],
        "amd64"
    );
    for accept in [&[DOCKER_MANIFEST][..], &[][..]] {
        let plain = fetch(&server, "hello", "latest", accept);
        assert_eq!(plain.media_type, DOCKER_MANIFEST, "Accept {accept:?}");
        assert_eq!(plain.digest, amd.digest, "Accept {accept:?}");
    }
}

// ---------------------------------------------------------------------------
// 7. The same bytes after a restart and on other replicas

#[test]
fn index_bytes_are_the_same_after_a_restart_and_on_replicas() {
    let first = start_two_platforms(&[]);
    let indexes = |server: &Server| {
        let docker = fetch(server, "hello", "latest", &[ACCEPT_ALL]);
        let oci = fetch(server, "hello", "latest", &[ACCEPT_OCI]);
        assert_eq!(docker.media_type, DOCKER_LIST);
        assert_eq!(oci.media_type, OCI_INDEX);
        (docker, oci)
    };
    let (docker, oci) = indexes(&first);
    let docker_children = index_children(&docker, DOCKER_LIST, DOCKER_MANIFEST);
    let oci_children = index_children(&oci, OCI_INDEX, OCI_MANIFEST);
    let same = |what: &str, (d, o): (Fetched, Fetched)| {
        assert_eq!(d.body, docker.body, "{what}: another Docker list");
        assert_eq!(o.body, oci.body, "{what}: another OCI index");
    };

    let storage = first.storage_path().display().to_string();
    let pkgs = first.pkgs_path().display().to_string();
    let shared = [
        ("STORAGE_PATH", storage.as_str()),
        ("NIXERY_PKGS_PATH", pkgs.as_str()),
    ];

    // A replica on the same storage while the first runs.
    let mut replica = start_two_platforms(&shared);
    same("replica on the same storage", indexes(&replica));

    // A replica with storage of its own builds the same bytes.
    let own = start_two_platforms(&[("NIXERY_PKGS_PATH", pkgs.as_str())]);
    same("replica with its own storage", indexes(&own));
    drop(own);

    // A server with the default systems (the host's) serves today's manifest: the
    // index's amd64 image, even to clients that take an index.
    let single = Server::start(&[("NIXERY_PKGS_PATH", pkgs.as_str())]);
    let today = fetch(&single, "hello", "latest", &[ACCEPT_ALL]);
    assert_eq!(today.media_type, DOCKER_MANIFEST, "{}", text(&today.body));
    assert_eq!(today.digest, docker_children.amd64.digest);
    let today_oci = fetch(&single, "hello", "latest", &[ACCEPT_OCI]);
    assert_eq!(
        today_oci.media_type,
        OCI_MANIFEST,
        "{}",
        text(&today_oci.body)
    );
    assert_eq!(today_oci.digest, oci_children.amd64.digest);
    drop(single);

    // A restart on the first's storage (stopped, so its package set copy stays).
    let mut first = first;
    replica.stop();
    first.stop();
    let restarted = start_two_platforms(&shared);
    same("restart", indexes(&restarted));
}
