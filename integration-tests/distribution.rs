//! The read side of the distribution spec beyond pulls: tags that do not exist and
//! the referrers API.

mod common;

use common::{http_get, http_head, registry_error, Server};

const ACCEPT: (&str, &str) = (
    "Accept",
    "application/vnd.docker.distribution.manifest.v2+json",
);

#[test]
fn a_path_source_has_only_the_tag_latest() {
    let server = Server::start(&[]);
    let url = server.url("/v2/hello/manifests/1.0");
    let (status, h, body) = http_get(&url, &[ACCEPT]);
    let (code, message) = registry_error(404, status, &h, &body);
    assert_eq!(code, "MANIFEST_UNKNOWN");
    assert!(
        message.contains("\"1.0\"") && message.contains("latest"),
        "{message}"
    );
    let (head_status, _) = http_head(&url, &[ACCEPT]);
    assert_eq!(head_status, 404);
    assert!(
        !server.log().contains("evaluating"),
        "an unknown tag ran Nix:\n{}",
        server.log()
    );

    let (status, _, body) = http_get(&server.url("/v2/hello/tags/list"), &[]);
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["tags"], serde_json::json!(["latest"]));
    let (status, _, _) = http_get(&server.url("/v2/hello/manifests/latest"), &[ACCEPT]);
    assert_eq!(status, 200);
}

#[test]
fn referrers_are_an_image_index_never_a_404() {
    let server = Server::start(&[]);
    let (status, h, _) = http_get(&server.url("/v2/hello/manifests/latest"), &[ACCEPT]);
    assert_eq!(status, 200);
    let digest = h.get("docker-content-digest").unwrap().to_string();

    // A manifest nothing refers to: an empty index, 200, HEAD agreeing with GET.
    let unknown = format!("sha256:{}", "0".repeat(64));
    let url = server.url(&format!("/v2/hello/referrers/{unknown}"));
    let (status, h, body) = http_get(&url, &[]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        h.get("content-type"),
        Some("application/vnd.oci.image.index.v1+json")
    );
    assert!(h.get("oci-filters-applied").is_none(), "{h:?}");
    let index: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    assert_eq!(index["manifests"], serde_json::json!([]));
    let (head_status, head) = http_head(&url, &[]);
    assert_eq!(head_status, 200);
    assert_eq!(head.get("content-length"), h.get("content-length"));

    // An image's manifest has its SBOM; a filter on another type leaves none and
    // says it was applied.
    let url = server.url(&format!("/v2/hello/referrers/{digest}"));
    let (status, _, body) = http_get(&url, &[]);
    assert_eq!(status, 200);
    let index: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1, "{index}");
    let filtered = format!("{url}?artifactType=application%2Fx-other");
    let (status, h, body) = http_get(&filtered, &[]);
    assert_eq!(status, 200);
    assert_eq!(h.get("oci-filters-applied"), Some("artifactType"));
    let index: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(index["manifests"], serde_json::json!([]));

    let (status, h, body) = http_get(&server.url("/v2/hello/referrers/sha256:xyz"), &[]);
    registry_error(400, status, &h, &body);
}
