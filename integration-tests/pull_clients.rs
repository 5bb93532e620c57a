//! Black-box tests: real registry clients (skopeo + umoci, containerd's ctr,
//! docker, podman) pull images from the real `nixery` binary and run them.
//!
//! Every test starts its own server (fresh storage, freshly salted package
//! set) and, where needed, its own client daemon, so tests are independent
//! of each other and of their order. Tools that are missing make a test skip
//! with a message, or fail when `NIXERY_REQUIRE_CLIENTS=1` (as in
//! `scripts/test`).

mod common;

use common::{
    chroot, cimage_command, http_get, http_head, podman_run_args, random_hex, require_root,
    require_tool, run_fail, run_ok, sha256_digest, skopeo_unpack, Containerd, Dockerd, Server,
};

const DOCKER_V2S2: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn require_all(tools: &[&str]) -> bool {
    // Evaluate every tool so that the skip/panic message names each one.
    let mut ok = require_root();
    for t in tools {
        ok &= require_tool(t);
    }
    ok
}

#[test]
fn skopeo_pull_shell_cowsay_and_run_in_chroot() {
    if !require_all(&["skopeo", "umoci", "chroot"]) {
        return;
    }
    let server = Server::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let rootfs = skopeo_unpack(server.addr(), "shell/cowsay", work.path());

    let out = run_ok(&mut chroot(&rootfs, &["/bin/cowsay", "moo"]));
    assert!(out.stdout.contains("< moo >"), "no speech bubble:\n{out}");
    assert!(out.stdout.contains("(oo)"), "no cow:\n{out}");

    // `shell` brings bash (busybox behind it) and coreutils.
    let out = run_ok(&mut chroot(
        &rootfs,
        &["/bin/bash", "-c", "echo \"path=$PATH sum=$((6 * 7))\""],
    ));
    assert_eq!(out.stdout.trim(), "path=/bin sum=42", "{out}");
    let out = run_ok(&mut chroot(&rootfs, &["/bin/env"]));
    assert!(out.stdout.contains("PATH=/bin"), "env output:\n{out}");
    let out = run_ok(&mut chroot(&rootfs, &["/bin/sh", "-c", "ls /bin"]));
    for prog in ["bash", "cowsay", "env", "nano", "sponge"] {
        assert!(
            out.stdout.split_whitespace().any(|w| w == prog),
            "/bin lacks {prog}:\n{out}"
        );
    }
    // cacert and iana-etc are always added when the package set has them.
    assert!(
        rootfs.join("etc/ssl/certs/ca-bundle.crt").exists(),
        "no CA bundle in the image"
    );
    let protocols = std::fs::read_to_string(rootfs.join("etc/protocols")).expect("etc/protocols");
    assert!(protocols.contains("tcp"), "etc/protocols: {protocols}");

    // inspect also fetches tags/list.
    let out = run_ok(cimage_command("skopeo").args([
        "inspect",
        "--tls-verify=false",
        &format!("docker://{}/shell/cowsay:latest", server.addr()),
    ]));
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("skopeo inspect printed no JSON ({e}):\n{out}"));
    assert_eq!(v["Architecture"], "amd64", "{out}");
    assert_eq!(v["Os"], "linux", "{out}");
    assert!(
        v["Digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{out}"
    );
    assert!(
        v["Layers"].as_array().is_some_and(|l| !l.is_empty()),
        "no layers:\n{out}"
    );
    assert!(v["RepoTags"].is_array(), "no tags from tags/list:\n{out}");
}

#[test]
fn containerd_pull_and_run_hello() {
    if !require_all(&["containerd", "ctr", "runc"]) {
        return;
    }
    let server = Server::start(&[]);
    let ctrd = Containerd::start();
    let ns = format!("nixery-{}", random_hex());
    let image = format!("{}/hello:latest", server.addr());

    ctrd.pull(&ns, &image);
    let list = run_ok(ctrd.ctr(&ns).args(["image", "ls", "-q"]));
    assert!(
        list.stdout.lines().any(|l| l == image),
        "image not listed:\n{list}"
    );

    let out = ctrd.run(&ns, &image, &["/bin/hello"]);
    assert_eq!(out.stdout.trim(), "Hello, world!", "{out}");
}

#[test]
fn docker_pull_and_run_figlet() {
    if !require_all(&["dockerd", "docker"]) {
        return;
    }
    let server = Server::start(&[]);
    let dockerd = Dockerd::start();
    let image = format!("{}/tools.figlet", server.addr());

    let out = run_ok(dockerd.docker().args(["pull", &format!("{image}:latest")]));
    assert!(out.stdout.contains("Digest: sha256:"), "{out}");

    // The image config's PATH must find `figlet` by bare name.
    let out =
        run_ok(
            dockerd
                .docker()
                .args(["run", "--rm", "--network", "none", &image, "figlet", "hi"]),
        );
    assert!(
        out.stdout.contains("# hi #"),
        "figlet banner missing:\n{out}"
    );
}

#[test]
fn docker_reports_missing_and_broken_packages() {
    if !require_all(&["dockerd", "docker"]) {
        return;
    }
    let server = Server::start(&[]);
    let dockerd = Dockerd::start();

    let out = run_fail(
        dockerd
            .docker()
            .args(["pull", &format!("{}/nosuchpkg:latest", server.addr())]),
    );
    assert!(
        out.stderr.contains("nosuchpkg"),
        "error does not name the package:\n{out}"
    );

    let out = run_fail(
        dockerd
            .docker()
            .args(["pull", &format!("{}/broken:latest", server.addr())]),
    );
    assert!(
        out.stderr.contains("deliberately fails"),
        "builder's error not shown:\n{out}"
    );
}

#[test]
fn podman_pull_inspect_and_run_hello() {
    if !require_all(&["podman", "runc"]) {
        return;
    }
    let server = Server::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let image = format!("{}/hello:latest", server.addr());
    let podman = || common::podman_command(work.path());

    run_ok(podman().args(["pull", "--tls-verify=false", &image]));
    let out = run_ok(podman().args(["image", "inspect", &image]));
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("podman image inspect printed no JSON ({e}):\n{out}"));
    assert_eq!(v[0]["Architecture"], "amd64", "{out}");
    assert_eq!(v[0]["Os"], "linux", "{out}");
    assert!(
        v[0]["RepoTags"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t == image.as_str())),
        "{out}"
    );

    let out = run_ok(podman().args(podman_run_args(&image, &["/bin/hello"])));
    assert_eq!(out.stdout.trim(), "Hello, world!", "{out}");
}

#[test]
fn skopeo_reports_missing_and_broken_packages() {
    if !require_all(&["skopeo"]) {
        return;
    }
    let server = Server::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let copy = |name: &str| {
        run_fail(cimage_command("skopeo").args([
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{}/{name}:latest", server.addr()),
            &format!("oci:{}:latest", work.path().join(name).display()),
        ]))
    };

    let out = copy("nosuchpkg");
    assert!(
        out.stderr.contains("nosuchpkg"),
        "error does not name the package:\n{out}"
    );
    assert!(
        out.stderr.contains("manifest unknown"),
        "expected MANIFEST_UNKNOWN:\n{out}"
    );

    let out = copy("broken");
    assert!(
        out.stderr.contains("deliberately fails"),
        "builder's error not shown:\n{out}"
    );
}

#[test]
fn manifest_head_and_get_agree_and_are_stable() {
    let server = Server::start(&[]);
    for media_type in [DOCKER_V2S2, OCI_MANIFEST] {
        let url = server.url("/v2/hello/manifests/latest");
        let accept = [("Accept", media_type)];

        let (status, head) = http_head(&url, &accept);
        assert_eq!(status, 200, "HEAD {url} ({media_type}): {head:?}");
        let (status, get, body) = http_get(&url, &accept);
        assert_eq!(
            status,
            200,
            "GET {url} ({media_type}): {}",
            String::from_utf8_lossy(&body)
        );

        let digest = get
            .get("docker-content-digest")
            .expect("GET has Docker-Content-Digest")
            .to_string();
        assert_eq!(
            digest,
            sha256_digest(&body),
            "digest is not the body's hash"
        );
        assert_eq!(head.get("docker-content-digest"), Some(digest.as_str()));
        assert_eq!(get.get("content-type"), Some(media_type));
        assert_eq!(head.get("content-type"), Some(media_type));
        let len = body.len().to_string();
        assert_eq!(get.get("content-length"), Some(len.as_str()));
        assert_eq!(head.get("content-length"), Some(len.as_str()));

        // Asking again gives byte-identical bytes.
        let (status, again, body2) = http_get(&url, &accept);
        assert_eq!(status, 200);
        assert_eq!(again.get("docker-content-digest"), Some(digest.as_str()));
        assert_eq!(body2, body);

        // And the digest resolves to the same manifest.
        let (status, by_digest, body3) = http_get(
            &server.url(&format!("/v2/hello/manifests/{digest}")),
            &accept,
        );
        assert_eq!(status, 200, "GET by digest {digest}");
        assert_eq!(body3, body);
        assert_eq!(
            by_digest.get("docker-content-digest"),
            Some(digest.as_str())
        );
    }
}

#[test]
fn package_order_does_not_change_the_image() {
    if !require_all(&["skopeo"]) {
        return;
    }
    let server = Server::start(&[]);
    let inspect = |name: &str| {
        let out = run_ok(cimage_command("skopeo").args([
            "inspect",
            "--no-tags",
            "--tls-verify=false",
            &format!("docker://{}/{name}:latest", server.addr()),
        ]));
        let v: serde_json::Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("skopeo inspect printed no JSON ({e}):\n{out}"));
        let digest = v["Digest"].as_str().expect("Digest").to_string();
        let layers = v["Layers"].clone();
        (digest, layers)
    };
    let (d1, l1) = inspect("hello/cowsay");
    let (d2, l2) = inspect("cowsay/hello");
    assert_eq!(d1, d2, "hello/cowsay and cowsay/hello differ");
    assert_eq!(l1, l2);

    // Raw HTTP agrees with skopeo for both orders.
    for name in ["hello/cowsay", "cowsay/hello"] {
        let (status, h, body) = http_get(
            &server.url(&format!("/v2/{name}/manifests/latest")),
            &[("Accept", DOCKER_V2S2)],
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert_eq!(h.get("docker-content-digest"), Some(d1.as_str()), "{name}");
    }

    // A different package set gives a different image.
    let (d3, _) = inspect("hello");
    assert_ne!(d1, d3);
}

#[test]
fn unknown_package_is_a_registry_error_naming_it() {
    let server = Server::start(&[]);
    let (status, h, body) = http_get(
        &server.url("/v2/hello/nosuchpkg/manifests/latest"),
        &[("Accept", DOCKER_V2S2)],
    );
    let (code, message) = common::registry_error(404, status, &h, &body);
    assert_eq!(code, "MANIFEST_UNKNOWN", "{message}");
    assert!(message.contains("nosuchpkg"), "{message}");
    let (status, _) = http_head(
        &server.url("/v2/hello/nosuchpkg/manifests/latest"),
        &[("Accept", DOCKER_V2S2)],
    );
    assert_eq!(status, 404);
    // The server is still fine afterwards.
    let (status, _, _) = http_get(&server.url("/v2/"), &[]);
    assert_eq!(status, 200);
}
