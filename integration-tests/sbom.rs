//! Every image has an SPDX SBOM, attached to its manifests as an OCI artifact and
//! found through the referrers API; pulls never see it.

mod common;

use common::{http_get, http_head, nix_build, run, run_ok, store_closure, Server};
use std::collections::BTreeSet;
use std::process::Command;

const OCI: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER: &str = "application/vnd.docker.distribution.manifest.v2+json";
const SPDX: &str = "application/spdx+json";

/// The digest of NAME:latest in the format `accept` asks for.
fn manifest_digest(server: &Server, name: &str, accept: &str) -> String {
    let (status, h, body) = http_get(
        &server.url(&format!("/v2/{name}/manifests/latest")),
        &[("Accept", accept)],
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    h.get("docker-content-digest").unwrap().to_string()
}

/// The referrers index of a manifest, with an optional query.
fn referrers(server: &Server, name: &str, digest: &str, query: &str) -> serde_json::Value {
    let (status, h, body) = http_get(
        &server.url(&format!("/v2/{name}/referrers/{digest}{query}")),
        &[],
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        h.get("content-type"),
        Some("application/vnd.oci.image.index.v1+json")
    );
    serde_json::from_slice(&body).unwrap()
}

fn get_json(server: &Server, path: &str, accept: &str) -> (serde_json::Value, Vec<u8>) {
    let (status, _, body) = http_get(&server.url(path), &[("Accept", accept)]);
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
    (serde_json::from_slice(&body).unwrap(), body)
}

/// The SBOM attached to manifest `digest`: the artifact manifest's digest and the
/// document's bytes.
fn sbom_of(server: &Server, name: &str, digest: &str) -> (String, Vec<u8>) {
    let index = referrers(server, name, digest, "");
    let list = index["manifests"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{index}");
    assert_eq!(list[0]["artifactType"], SPDX);
    assert_eq!(list[0]["mediaType"], OCI);
    let artifact = list[0]["digest"].as_str().unwrap().to_string();
    let (m, bytes) = get_json(server, &format!("/v2/{name}/manifests/{artifact}"), OCI);
    assert_eq!(common::sha256_digest(&bytes), artifact);
    assert_eq!(list[0]["size"], bytes.len());
    assert_eq!(m["artifactType"], SPDX);
    assert_eq!(m["subject"]["digest"], digest);
    assert_eq!(m["layers"][0]["mediaType"], SPDX);
    let layer = m["layers"][0]["digest"].as_str().unwrap();
    let (status, _, document) = http_get(&server.url(&format!("/v2/{name}/blobs/{layer}")), &[]);
    assert_eq!(status, 200);
    assert_eq!(common::sha256_digest(&document), layer);
    (artifact, document)
}

#[test]
fn every_image_has_a_valid_spdx_sbom_of_exactly_its_closure_found_by_referrers() {
    let server = Server::start(&[]);
    let oci = manifest_digest(&server, "hello", OCI);
    let docker = manifest_digest(&server, "hello", DOCKER);
    let (artifact, document) = sbom_of(&server, "hello", &oci);
    let (docker_artifact, docker_document) = sbom_of(&server, "hello", &docker);
    assert_ne!(artifact, docker_artifact, "one artifact per subject");
    assert_eq!(document, docker_document, "one SBOM for both manifests");

    // The filter, and HEAD agreeing with GET.
    let filtered = referrers(
        &server,
        "hello",
        &oci,
        "?artifactType=application%2Fspdx%2Bjson",
    );
    assert_eq!(filtered["manifests"].as_array().unwrap().len(), 1);
    let other = referrers(
        &server,
        "hello",
        &oci,
        "?artifactType=application%2Fx-other",
    );
    assert_eq!(other["manifests"], serde_json::json!([]));
    let url = server.url(&format!("/v2/hello/referrers/{oci}"));
    let (_, get_h, _) = http_get(&url, &[]);
    let (head_status, head_h) = http_head(&url, &[]);
    assert_eq!(head_status, 200);
    assert_eq!(head_h.get("content-length"), get_h.get("content-length"));

    // SPDX 2.3 by the reference validator.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hello.spdx.json");
    std::fs::write(&file, &document).unwrap();
    let out = run(Command::new("python3")
        .args(["-m", "spdx_tools.spdx.clitools.pyspdxtools", "-i"])
        .arg(&file));
    assert!(out.success(), "pyspdxtools rejects the SBOM:\n{out}");

    // Exactly the image's closure, as Nix itself reports it.
    let outputs = nix_build(server.pkgs_path(), &["hello", "cacert", "iana-etc"]);
    let expected: BTreeSet<String> = store_closure(&outputs).into_iter().collect();
    let doc: serde_json::Value = serde_json::from_slice(&document).unwrap();
    assert_eq!(doc["spdxVersion"], "SPDX-2.3");
    let packages = doc["packages"].as_array().unwrap();
    let listed: BTreeSet<String> = packages
        .iter()
        .map(|p| {
            let comment = p["comment"].as_str().unwrap_or_default();
            comment
                .split([' ', ';'])
                .find(|w| w.starts_with("/nix/store/") && !w.ends_with(".drv"))
                .unwrap_or_else(|| panic!("no store path in {p}"))
                .to_string()
        })
        .collect();
    assert_eq!(listed, expected);
    let hello = packages
        .iter()
        .find(|p| p["name"] == "hello")
        .unwrap_or_else(|| panic!("no hello in {doc}"));
    assert_eq!(hello["versionInfo"], "2.12.1");
    assert_eq!(hello["licenseDeclared"], "GPL-3.0-or-later");
    assert_eq!(
        hello["homepage"],
        "https://www.gnu.org/software/hello/manual/"
    );
    let relationships = doc["relationships"].as_array().unwrap();
    assert!(
        relationships
            .iter()
            .any(|r| r["spdxElementId"] == hello["SPDXID"] && r["relationshipType"] == "DEPENDS_ON"),
        "hello depends on busybox: {relationships:?}"
    );
    eprintln!(
        "referrers of {oci}:\n{}",
        serde_json::to_string_pretty(&referrers(&server, "hello", &oci, "")).unwrap()
    );
    eprintln!(
        "first lines of the SBOM:\n{}",
        String::from_utf8_lossy(&document)
            .lines()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn the_sbom_is_the_same_after_a_restart_and_on_another_replica_before_any_pull() {
    let mut first = Server::start(&[]);
    let oci = manifest_digest(&first, "hello", OCI);
    let (artifact, document) = sbom_of(&first, "hello", &oci);
    let storage = first.storage_path().display().to_string();
    let pkgs = first.pkgs_path().display().to_string();
    first.stop();

    // Another process on the same storage answers the referrers API from records,
    // before it has built or pulled anything.
    let replica = Server::start(&[
        ("STORAGE_PATH", storage.as_str()),
        ("NIXERY_PKGS_PATH", pkgs.as_str()),
    ]);
    assert_eq!(
        sbom_of(&replica, "hello", &oci),
        (artifact.clone(), document.clone())
    );
    assert!(
        !replica.log().contains("evaluating"),
        "the referrers answer ran Nix:\n{}",
        replica.log()
    );
    // And building the image again gives the same SBOM bytes.
    let fresh = Server::start(&[("NIXERY_PKGS_PATH", pkgs.as_str())]);
    assert_eq!(manifest_digest(&fresh, "hello", OCI), oci);
    assert_eq!(sbom_of(&fresh, "hello", &oci), (artifact, document));
}

#[test]
fn closures_read_through_nix_store_serve_give_the_same_image_and_sbom_as_nix_store_queries() {
    const DEBUG: &str = "info,nixery::actors::nix_worker=debug";
    let served = Server::start(&[("RUST_LOG", DEBUG)]);
    let pkgs = served.pkgs_path().display().to_string();
    let nix = common::NixWrappers::new();
    nix.refuse_serve();
    let queried = Server::start(&[
        ("RUST_LOG", DEBUG),
        ("NIXERY_PKGS_PATH", pkgs.as_str()),
        ("NIXERY_NIX__BIN_DIR", &nix.bin_dir()),
    ]);
    for name in ["hello", "alpha/beta"] {
        let digest = manifest_digest(&served, name, OCI);
        assert_eq!(manifest_digest(&queried, name, OCI), digest, "{name}");
        assert_eq!(
            sbom_of(&served, name, &digest),
            sbom_of(&queried, name, &digest),
            "{name}"
        );
    }
    // Each read its two closures the way it was meant to.
    let reads = |s: &Server, how: &str| s.log().matches(&format!(") from {how} in ")).count();
    assert_eq!(reads(&served, "nix-store --serve"), 2, "{}", served.log());
    assert_eq!(
        reads(&queried, "nix-store --query and --dump-db"),
        2,
        "{}",
        queried.log()
    );
    assert!(
        queried.log().contains("nix-store --serve did not start"),
        "{}",
        queried.log()
    );
}

#[test]
fn skopeo_copies_the_sbom_artifact_and_pulls_do_not_see_it() {
    if !common::require_tool("skopeo") {
        return;
    }
    let server = Server::start(&[]);
    let oci = manifest_digest(&server, "hello", OCI);
    let (artifact, document) = sbom_of(&server, "hello", &oci);
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("sbom");
    run_ok(common::cimage_command("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/hello@{artifact}", server.addr()),
        &format!("oci:{}", layout.display()),
    ]));
    let blob = layout
        .join("blobs/sha256")
        .join(&common::sha256_digest(&document)["sha256:".len()..]);
    assert_eq!(std::fs::read(&blob).unwrap(), document);
    // A pull of the image itself fetches no SBOM blob.
    let pulled = dir.path().join("image");
    common::skopeo_copy(server.addr(), "hello", &pulled);
    assert!(
        !pulled
            .join("blobs/sha256")
            .join(&common::sha256_digest(&document)["sha256:".len()..])
            .exists(),
        "the image pull copied the SBOM"
    );
}
