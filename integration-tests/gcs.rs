mod common;

// Black-box tests of the gcs storage backend against fake-gcs-server: pulls
// through V4-signed blob redirects, a second process and a restart reusing
// the bucket without building or uploading, an emulator outage during a
// build, and start-up with a missing bucket.
//
// Every test starts its own emulator (in-memory backend, bucket `layers`)
// and its own servers. The dummy service-account key from the signing
// conformance vectors makes the redirects signed URLs; the emulator ignores
// signatures, so clients can follow them.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    assert_killed_upload_unpublished, assert_no_work, assert_streamed_while_packed,
    fresh_pkgs_copy, http_get, http_head, http_request, kill_when, largest_layer, metric,
    pull_and_run, random_hex, require_fake_gcs, require_root, require_tool, run_with_timeout,
    sha256_digest, skopeo_copy, Containerd, FakeGcs, Server, Work,
};

const BUCKET: &str = "layers";
const DOCKER_V2S2: &str = "application/vnd.docker.distribution.manifest.v2+json";

fn key_path() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/testdata/gcs-v4-signing/test_service_account.not-a-test.json"
    )
    .to_string()
}

/// A server on the emulator's `layers` bucket, signing blob URLs with the
/// dummy key; `extra` overrides (e.g. `NIXERY_PKGS_PATH`).
fn start_server(gcs: &FakeGcs, extra: &[(&str, &str)]) -> Server {
    let host = gcs.host();
    let key = key_path();
    let mut env: Vec<(&str, &str)> = vec![
        ("NIXERY_STORAGE_BACKEND", "gcs"),
        ("GCS_BUCKET", BUCKET),
        ("STORAGE_EMULATOR_HOST", &host),
        ("GOOGLE_APPLICATION_CREDENTIALS", &key),
    ];
    env.extend_from_slice(extra);
    let server = Server::start(&env);
    assert!(
        server.log().contains("gcs storage"),
        "not on the gcs backend (see its log)",
    );
    server
}

/// GET the Docker manifest of `name:latest`; returns its digest and JSON.
fn manifest(server: &Server, name: &str) -> (String, serde_json::Value) {
    let url = server.url(&format!("/v2/{name}/manifests/latest"));
    let (status, h, body) = http_get(&url, &[("Accept", DOCKER_V2S2)]);
    assert_eq!(status, 200, "GET {url}: {}", String::from_utf8_lossy(&body),);
    let digest = h
        .get("docker-content-digest")
        .expect("Docker-Content-Digest")
        .to_string();
    assert_eq!(
        digest,
        sha256_digest(&body),
        "digest is not the body's hash"
    );
    let json = serde_json::from_slice(&body).expect("manifest JSON");
    (digest, json)
}

/// The config and layer digests a manifest names.
fn blob_digests(m: &serde_json::Value) -> Vec<String> {
    std::iter::once(&m["config"])
        .chain(m["layers"].as_array().expect("layers").iter())
        .map(|d| d["digest"].as_str().expect("digest").to_string())
        .collect()
}

/// HEAD and GET of a blob answer 307 to a signed URL of the object on the
/// emulator, with the digest; the URL serves bytes of that digest.
fn check_blob_redirect(server: &Server, gcs: &FakeGcs, name: &str, digest: &str) -> Vec<u8> {
    let url = server.url(&format!("/v2/{name}/blobs/{digest}"));
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let prefix = format!("{}/{BUCKET}/blobs/sha256/{hex}?", gcs.endpoint());
    let (status, head) = http_head(&url, &[]);
    let (status_get, get, _) = http_get(&url, &[]);
    let mut location = String::new();
    for (method, status, h) in [("HEAD", status, &head), ("GET", status_get, &get)] {
        assert_eq!(status, 307, "{method} {url}: {h:?}");
        assert_eq!(
            h.get("docker-content-digest"),
            Some(digest),
            "{method}: {h:?}"
        );
        let loc = h.get("location").expect("Location").to_string();
        assert!(
            loc.starts_with(&prefix),
            "{method} Location {loc} is not path-style on the emulator ({prefix}…)"
        );
        assert!(
            loc.contains("X-Goog-Signature=") && loc.contains("X-Goog-Algorithm=GOOG4-RSA-SHA256"),
            "{method} Location is not a V4-signed URL: {loc}"
        );
        location = loc;
    }
    let (status, _, bytes) = http_get(&location, &[]);
    assert_eq!(
        status,
        200,
        "{name}: blob {digest} is not in the bucket, yet the registry named it and redirects to it \
         (GET {location}: {})",
        String::from_utf8_lossy(&bytes),
    );
    assert_eq!(sha256_digest(&bytes), digest, "bytes at {location}");
    bytes
}

/// What a server did, from its log and metrics (a counter not yet shown is 0).
fn work(server: &Server) -> Work {
    common::work(server, metric)
}

/// Whether this machine can pull an image from the emulator and run it.
fn can_pull_and_run() -> bool {
    let mut ok = require_fake_gcs() & require_root();
    for t in ["skopeo", "umoci", "chroot"] {
        ok &= require_tool(t);
    }
    ok
}

// ---------------------------------------------------------------------------

#[test]
fn skopeo_pulls_shell_cowsay_through_signed_redirects_and_it_runs() {
    if !can_pull_and_run() {
        return;
    }
    let gcs = FakeGcs::start(&[BUCKET]);
    let server = start_server(&gcs, &[]);
    let out = pull_and_run(server.addr(), "shell/cowsay", &["/bin/cowsay", "moo"]);
    assert!(out.stdout.contains("< moo >"), "no speech bubble:\n{out}");
    assert!(out.stdout.contains("(oo)"), "no cow:\n{out}");

    // skopeo fetched every blob from the emulator, through a redirect.
    let (_, m) = manifest(&server, "shell/cowsay");
    let blobs = blob_digests(&m);
    let redirects = server
        .log()
        .lines()
        .filter(|l| l.contains("/blobs/sha256:") && l.contains("\" 307 "))
        .count();
    assert!(
        redirects >= blobs.len(),
        "{redirects} blob redirects logged for {} blobs",
        blobs.len(),
    );
}

#[test]
fn blob_redirects_are_signed_and_containerd_pulls_and_runs_hello() {
    if !require_fake_gcs() {
        return;
    }
    let gcs = FakeGcs::start(&[BUCKET]);
    let server = start_server(&gcs, &[]);
    let (_, m) = manifest(&server, "hello");
    let blobs = blob_digests(&m);
    for d in &blobs {
        check_blob_redirect(&server, &gcs, "hello", d);
    }
    // The config blob is the image's config.
    let config = check_blob_redirect(&server, &gcs, "hello", &blobs[0]);
    let config: serde_json::Value = serde_json::from_slice(&config).expect("config JSON");
    assert_eq!(config["architecture"], "amd64", "{config}");

    // An unknown blob is a registry error, also for HEAD.
    let missing = format!("sha256:{}", "0".repeat(64));
    let url = server.url(&format!("/v2/hello/blobs/{missing}"));
    let (status, h, body) = http_get(&url, &[]);
    let (code, _) = common::registry_error(404, status, &h, &body);
    assert_eq!(code, "BLOB_UNKNOWN");
    let (status, h) = http_head(&url, &[]);
    assert_eq!(status, 404, "{h:?}");
    assert!(h.get("location").is_none(), "{h:?}");

    let mut ok = require_root();
    for t in ["containerd", "ctr", "runc"] {
        ok &= require_tool(t);
    }
    if !ok {
        return;
    }
    let ctrd = Containerd::start();
    let ns = format!("nixery-{}", random_hex());
    let image = format!("{}/hello:latest", server.addr());
    ctrd.pull(&ns, &image);
    let out = ctrd.run(&ns, &image, &["/bin/hello"]);
    assert_eq!(out.stdout.trim(), "Hello, world!", "{out}");
}

#[test]
fn second_process_and_restart_reuse_the_bucket_without_building_or_uploading() {
    if !require_fake_gcs() {
        return;
    }
    let gcs = FakeGcs::start(&[BUCKET]);
    let mut first = start_server(&gcs, &[]);
    let (digest, m) = manifest(&first, "hello");
    let oci = {
        let (status, h, _) = http_get(
            &first.url("/v2/hello/manifests/latest"),
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
        );
        assert_eq!(status, 200);
        h.get("docker-content-digest").unwrap().to_string()
    };
    let w1 = work(&first);
    eprintln!(
        "first server:     builds={} uploads={} ({w1:?})",
        w1.builds, w1.uploads
    );
    assert!(
        w1.builds == 1 && w1.uploads >= 4 && w1.realisations == 1,
        "the first server should build and upload: {w1:?}",
    );

    // The same package set (same store paths) in another process.
    let pkgs = first.pkgs_path().display().to_string();
    let pkgs_env = [("NIXERY_PKGS_PATH", pkgs.as_str())];
    let second = start_server(&gcs, &pkgs_env);
    let (digest2, m2) = manifest(&second, "hello");
    assert_eq!(digest2, digest, "the second server assembled another image");
    assert_eq!(m2, m);
    let w2 = work(&second);
    eprintln!(
        "second server:    builds={} uploads={} ({w2:?})",
        w2.builds, w2.uploads
    );
    assert_no_work("the second server", &w2);
    // It serves the blobs, too.
    for d in blob_digests(&m2) {
        check_blob_redirect(&second, &gcs, "hello", &d);
    }
    let (status, h, _) = http_get(
        &second.url("/v2/hello/manifests/latest"),
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
    );
    assert_eq!(status, 200);
    assert_eq!(h.get("docker-content-digest"), Some(oci.as_str()));

    // The first server restarted on the same bucket and package set.
    first.stop();
    let restarted = start_server(&gcs, &pkgs_env);
    let (digest3, _) = manifest(&restarted, "hello");
    assert_eq!(
        digest3, digest,
        "the restarted server assembled another image"
    );
    let w3 = work(&restarted);
    eprintln!(
        "restarted server: builds={} uploads={} ({w3:?})",
        w3.builds, w3.uploads
    );
    assert_no_work("the restarted server", &w3);

    if require_tool("skopeo") {
        let dir = tempfile::tempdir().unwrap();
        skopeo_copy(restarted.addr(), "hello", &dir.path().join("layout"));
        let w3 = work(&restarted);
        assert_no_work("the restarted server (after a pull)", &w3);
    }
}

/// A copy of the test package set whose `slow` sleeps `secs` while building.
fn pkgs_with_slow_seconds(secs: u32) -> common::PkgsCopy {
    let pkgs = fresh_pkgs_copy();
    let file = pkgs.path().join("default.nix");
    let text = std::fs::read_to_string(&file).unwrap();
    let patched = text.replace("slowSeconds ? 30", &format!("slowSeconds ? {secs}"));
    assert_ne!(
        patched, text,
        "default.nix no longer has `slowSeconds ? 30`"
    );
    std::fs::write(&file, patched).unwrap();
    pkgs
}

/// The phase of the build of `image` on the build page, if one is running.
fn build_phase(server: &Server, image: &str) -> Option<String> {
    let (status, _, body) = http_get(&server.url("/builds"), &[]);
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).expect("builds JSON");
    v["builds"]
        .as_array()?
        .iter()
        .find(|b| b["image"] == image)
        .and_then(|b| b["phase"].as_str().map(str::to_string))
}

fn assert_unavailable(what: &str, status: u16, h: &common::Headers, body: &[u8]) {
    eprintln!("checking {what}");
    let (code, message) = common::registry_error(503, status, h, body);
    assert_eq!(code, "UNAVAILABLE", "{what}: {message}");
    assert!(!message.is_empty(), "{what}: empty message");
    eprintln!("{what}: 503 {message}");
}

/// Requests the fresh image `slow`, stops the emulator while Nix builds it
/// (its storage checks are done, its uploads to come), and checks that the
/// client gets 503 UNAVAILABLE and the server stays up. Returns when the
/// request failed.
fn fail_slow_build_by_an_outage(server: &Server, gcs: &mut FakeGcs) -> Instant {
    let url = server.url("/v2/slow/manifests/latest");
    let request = thread::spawn(move || {
        http_request(
            "GET",
            &url,
            &[("Accept", DOCKER_V2S2)],
            Duration::from_secs(120),
        )
        .expect("GET slow")
    });
    let start = Instant::now();
    loop {
        let phase = build_phase(server, "slow");
        if phase.as_deref().is_some_and(|p| p.starts_with("building")) {
            break;
        }
        assert!(
            !request.is_finished() && start.elapsed() < Duration::from_secs(60),
            "never saw `slow` building (phase {phase:?})",
        );
        thread::sleep(Duration::from_millis(50));
    }
    gcs.stop();
    let (status, h, body) = request.join().unwrap();
    let failed_at = Instant::now();
    assert_unavailable("build with the emulator down", status, &h, &body);

    // The server is up. A blob it has not seen cannot be looked up: that is
    // 503 too, not 404 (blobs it has served are answered from memory).
    let (status, _, _) = http_get(&server.url("/v2/"), &[]);
    assert_eq!(status, 200);
    let (status, h, body) = http_get(
        &server.url(&format!("/v2/slow/blobs/sha256:{}", "0".repeat(64))),
        &[],
    );
    assert_unavailable("unknown blob with the emulator down", status, &h, &body);
    failed_at
}

/// After the outage: `slow` is built (storage failures are not cached) within
/// `limit`, every blob it names is in the bucket, and skopeo pulls it.
fn slow_builds_and_pulls_after_the_outage(
    server: &Server,
    gcs: &FakeGcs,
    failed_at: Instant,
    limit: Duration,
) {
    assert!(
        failed_at.elapsed() < Duration::from_secs(10),
        "too slow to tell a storage failure from a cached one"
    );
    let url = server.url("/v2/slow/manifests/latest");
    let (status, h, body) = http_request("GET", &url, &[("Accept", DOCKER_V2S2)], limit)
        .unwrap_or_else(|e| {
            panic!(
                "retry after the outage: {e}\nbuild page: {:?}",
                build_phase(server, "slow"),
            )
        });
    assert_eq!(
        status,
        200,
        "retry after the outage: {}",
        String::from_utf8_lossy(&body)
    );
    let digest = h.get("docker-content-digest").unwrap().to_string();
    let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
    for d in blob_digests(&m) {
        check_blob_redirect(server, gcs, "slow", &d);
    }
    if require_tool("skopeo") {
        let dir = tempfile::tempdir().unwrap();
        skopeo_copy(server.addr(), "slow", &dir.path().join("layout"));
    }
    let (again, _) = manifest(server, "slow");
    assert_eq!(again, digest);
}

#[test]
fn emulator_outage_during_a_build_is_503_and_the_retry_after_it_pulls() {
    if !require_fake_gcs() {
        return;
    }
    let mut gcs = FakeGcs::start(&[BUCKET]);
    let pkgs = pkgs_with_slow_seconds(4);
    let pkgs_path = pkgs.path().display().to_string();
    let server = start_server(&gcs, &[("NIXERY_PKGS_PATH", &pkgs_path)]);
    let failed_at = fail_slow_build_by_an_outage(&server, &mut gcs);
    // Back on the same port, memory backend: the bucket is empty again.
    gcs.restart();
    slow_builds_and_pulls_after_the_outage(&server, &gcs, failed_at, Duration::from_secs(60));
}

#[test]
fn outage_of_a_bucket_that_keeps_its_objects_does_not_block_the_retry() {
    if !require_fake_gcs() {
        return;
    }
    // Objects survive the restart, as in a real bucket after a network
    // outage: whatever the failed build left there is still there.
    let mut gcs = FakeGcs::start_persistent(&[BUCKET]);
    let pkgs = pkgs_with_slow_seconds(4);
    let pkgs_path = pkgs.path().display().to_string();
    let server = start_server(&gcs, &[("NIXERY_PKGS_PATH", &pkgs_path)]);
    let failed_at = fail_slow_build_by_an_outage(&server, &mut gcs);
    gcs.restart();
    // The Nix build is done, so the retry only packs and uploads.
    slow_builds_and_pulls_after_the_outage(&server, &gcs, failed_at, Duration::from_secs(30));
}

#[test]
fn layers_remembered_before_the_bucket_was_emptied_are_not_reused() {
    if !require_fake_gcs() {
        return;
    }
    let mut gcs = FakeGcs::start(&[BUCKET]);
    let pkgs = pkgs_with_slow_seconds(0);
    let pkgs_path = pkgs.path().display().to_string();
    let server = start_server(&gcs, &[("NIXERY_PKGS_PATH", &pkgs_path)]);
    // hello stores layers that slow shares (cacert, iana-etc).
    let (_, hello) = manifest(&server, "hello");
    // The emulator restarts empty, as a bucket whose objects were deleted.
    gcs.restart();
    let (_, slow) = manifest(&server, "slow");
    let shared: Vec<_> = blob_digests(&slow)
        .into_iter()
        .filter(|d| blob_digests(&hello).contains(d))
        .collect();
    assert!(!shared.is_empty(), "slow shares no layer with hello");
    for d in blob_digests(&slow) {
        check_blob_redirect(&server, &gcs, "slow", &d);
    }
    if require_tool("skopeo") {
        let dir = tempfile::tempdir().unwrap();
        skopeo_copy(server.addr(), "slow", &dir.path().join("layout"));
    }
}

#[test]
fn an_image_built_before_the_bucket_was_emptied_still_pulls() {
    if !require_fake_gcs() {
        return;
    }
    let mut gcs = FakeGcs::start(&[BUCKET]);
    let server = start_server(&gcs, &[("NIXERY_STORAGE__VERIFY_INTERVAL_SECS", "1")]);
    let (digest, _) = manifest(&server, "hello");
    // The emulator restarts empty, as a bucket whose objects were deleted. A cached
    // image is checked against the bucket once its verify interval has passed.
    gcs.restart();
    thread::sleep(Duration::from_millis(1100));
    let (digest2, m) = manifest(&server, "hello");
    assert_eq!(digest2, digest, "same inputs, same image");
    for d in blob_digests(&m) {
        check_blob_redirect(&server, &gcs, "hello", &d);
    }
    if require_tool("skopeo") {
        let dir = tempfile::tempdir().unwrap();
        skopeo_copy(server.addr(), "hello", &dir.path().join("layout"));
    }
}

#[test]
fn startup_with_a_missing_bucket_exits_with_one_line_naming_it() {
    if !require_fake_gcs() {
        return;
    }
    let gcs = FakeGcs::start(&[BUCKET]);
    let pkgs = fresh_pkgs_copy();
    let bucket = format!("missing-{}", random_hex());
    let started = Instant::now();
    let out = run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_nixery"))
            .env("PORT", "0")
            .env("NIXERY_LISTEN", "127.0.0.1")
            .env("NIXERY_PKGS_PATH", pkgs.path())
            .env("NIXERY_STORAGE_BACKEND", "gcs")
            .env("GCS_BUCKET", &bucket)
            .env("STORAGE_EMULATOR_HOST", gcs.host())
            .env("GOOGLE_APPLICATION_CREDENTIALS", key_path())
            .env("RUST_LOG", "info")
            .env("NIX_CONFIG", common::NIX_CONFIG),
        Duration::from_secs(30),
    );
    assert!(!out.success(), "started without its bucket:\n{out}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?} to notice the missing bucket",
        started.elapsed()
    );
    let text = out.combined();
    assert!(!text.contains("listening on"), "{out}");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(&bucket)).collect();
    assert_eq!(lines.len(), 1, "expected one line naming {bucket}:\n{out}");
    assert!(
        lines[0].contains("does not exist") && lines[0].contains(&gcs.host()),
        "{out}"
    );
    assert!(
        lines[0].contains("GCS_BUCKET") || lines[0].contains("storage.bucket"),
        "the line does not name the setting:\n{out}"
    );
    eprintln!("{}", lines[0]);
}

#[test]
fn two_replicas_on_one_bucket_build_a_new_image_once() {
    if !require_fake_gcs() {
        return;
    }
    let gcs = FakeGcs::start(&[BUCKET]);
    let first = start_server(&gcs, &[]);
    let pkgs = first.pkgs_path().display().to_string();
    let second = start_server(&gcs, &[("NIXERY_PKGS_PATH", &pkgs)]);
    // Both replicas get the same new image at the same moment, twice each.
    let barrier = std::sync::Barrier::new(4);
    let digests: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = [&first, &second, &first, &second]
            .into_iter()
            .map(|server| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    manifest(server, "alpha/beta").0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(digests.iter().all(|d| *d == digests[0]), "{digests:?}");
    let (a, b) = (work(&first), work(&second));
    println!("replica 1: {a:?}\nreplica 2: {b:?}");
    assert_eq!(a.builds + b.builds, 1, "exactly one build: {a:?} {b:?}");
    assert_eq!(a.realisations + b.realisations, 1, "{a:?} {b:?}");
    // The other replica waited for the lease holder's record and uploaded nothing.
    let idle = if a.builds == 1 { &b } else { &a };
    assert_eq!((idle.uploads, idle.bytes_uploaded), (0, 0), "{idle:?}");
}

/// Object names in the bucket under `prefix`, read from the emulator's JSON API.
fn bucket_objects(gcs: &FakeGcs, prefix: &str) -> Vec<String> {
    gcs.list(BUCKET, prefix)
        .iter()
        .map(|o| o["name"].as_str().expect("name").to_string())
        .collect()
}

#[test]
fn a_large_layer_streams_into_the_bucket_while_it_is_packed_and_runs() {
    if !can_pull_and_run() {
        return;
    }
    let gcs = FakeGcs::start(&[BUCKET]);
    // 1 MiB chunks: the 6 MiB of random data in `noise` make a layer of six or more.
    let server = start_server(&gcs, &[("NIXERY_STORAGE__UPLOAD_CHUNK_MIB", "1")]);
    let (_, m) = manifest(&server, "noise");
    let (digest, size) = largest_layer(&m);
    assert!(size > 6 << 20, "the data layer is only {size} bytes");
    // The first chunk was stored in the bucket before packing finished: the
    // packer hands a chunk over only once the one before it is stored.
    assert_streamed_while_packed(&server.log(), &digest, size);

    // Published under its digest, complete; nothing left in staging.
    let bytes = check_blob_redirect(&server, &gcs, "noise", &digest);
    assert_eq!(bytes.len() as u64, size);
    assert_eq!(staging_after_a_while(&gcs), Vec::<String>::new());

    // A client pulls it and the data checks out inside the image.
    let out = pull_and_run(server.addr(), "noise", &["/bin/noise-check"]);
    assert!(out.stdout.contains("data: OK"), "{out}");
}

/// Objects under `staging/` once the parts a compose left have had up to a minute
/// to be deleted (in the background, after the answer). On a busy machine the
/// emulator took 11 s for the 265 deletions a 1 GiB layer leaves, and each
/// listing here (every part's metadata) holds them up, so it asks twice a second.
fn staging_after_a_while(gcs: &FakeGcs) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = bucket_objects(gcs, "staging/");
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_server_killed_mid_upload_leaves_no_blob_under_a_digest_name() {
    if !require_fake_gcs() {
        return;
    }
    // `noise` in 1 MiB parts sent one at a time, on a new bucket each try, until
    // a kill lands while parts are in the bucket and the layer is not yet composed.
    let one_part_at_a_time = [
        ("NIXERY_STORAGE__UPLOAD_CHUNK_MIB", "1"),
        ("NIXERY_STORAGE__UPLOAD_CHUNKS_IN_FLIGHT", "1"),
    ];
    let mut caught = None;
    for attempt in 0..6 {
        let gcs = FakeGcs::start(&[BUCKET]);
        let mut server = start_server(&gcs, &one_part_at_a_time);
        let mut parts = Vec::new();
        let killed = kill_when(&mut server, "noise", || {
            parts = bucket_objects(&gcs, "staging/");
            !parts.is_empty()
        });
        if !killed {
            eprintln!("attempt {attempt}: the upload finished before a part was seen");
            continue;
        }
        eprintln!("attempt {attempt}: killed with parts {parts:?} in the bucket");
        caught = Some((gcs, server));
        break;
    }
    let Some((gcs, dead)) = caught else {
        panic!("no kill landed while parts were in the bucket in 6 tries");
    };

    // Every object the killed process left under a digest name is complete: its
    // bytes have that digest. It wrote no image record.
    let left = bucket_objects(&gcs, "blobs/");
    for name in &left {
        let hex = name.strip_prefix("blobs/sha256/").expect("digest name");
        let bytes = gcs.download(BUCKET, name).expect("listed object");
        assert_eq!(sha256_digest(&bytes), format!("sha256:{hex}"), "{name}");
    }
    assert_eq!(
        bucket_objects(&gcs, "records/images/"),
        Vec::<String>::new()
    );
    assert!(!bucket_objects(&gcs, "staging/").is_empty());

    // A new process on the bucket removes the dead one's parts at start-up and
    // builds the image whole.
    let storage_dir = dead.storage_path().display().to_string();
    let pkgs = dead.pkgs_path().display().to_string();
    let mut env = one_part_at_a_time.to_vec();
    env.extend([
        ("STORAGE_PATH", storage_dir.as_str()),
        ("NIXERY_PKGS_PATH", pkgs.as_str()),
    ]);
    let server = start_server(&gcs, &env);
    assert_eq!(bucket_objects(&gcs, "staging/"), Vec::<String>::new());
    let (_, m) = manifest(&server, "noise");
    assert_killed_upload_unpublished(&left, &m);
    for d in blob_digests(&m) {
        check_blob_redirect(&server, &gcs, "noise", &d);
    }
    assert_eq!(staging_after_a_while(&gcs), Vec::<String>::new());
}

/// Peak resident memory of a process, from /proc.
fn vm_hwm_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

#[test]
fn a_one_gib_layer_streams_into_the_bucket_within_the_memory_bound() {
    if !require_fake_gcs() {
        return;
    }
    let gcs = FakeGcs::start(&[BUCKET]);
    // zstd on two threads: the compressor that holds the most (see README,
    // "Memory"), with the default parts.
    let server = start_server(&gcs, &[("NIXERY_LAYERS__COMPRESSION_THREADS", "2")]);
    let pid = server.pid().expect("server pid");
    let started = Instant::now();
    let url = server.url("/v2/zstd/noise1g/manifests/latest");
    let (status, _, body) = http_request(
        "GET",
        &url,
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
        Duration::from_secs(600),
    )
    .expect("an answer");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let m: serde_json::Value = serde_json::from_slice(&body).expect("manifest JSON");
    let (digest, size) = largest_layer(&m);
    let peak = vm_hwm_bytes(pid);
    eprintln!(
        "1 GiB layer {digest} ({size} bytes) packed and uploaded in {:?}; server VmHWM {} MiB",
        started.elapsed(),
        peak >> 20
    );
    assert!(size > 1 << 30, "the data layer is only {size} bytes");
    assert_streamed_while_packed(&server.log(), &digest, size);
    let stored = gcs
        .object(
            BUCKET,
            &format!("blobs/sha256/{}", digest.trim_start_matches("sha256:")),
        )
        .expect("the layer is in the bucket");
    assert_eq!(stored["size"].as_str(), Some(size.to_string().as_str()));
    // The bound the README documents, far below the layer's size.
    assert!(
        peak < 128 << 20,
        "peak memory {} MiB while streaming a 1 GiB layer; the documented bound is 128 MiB",
        peak >> 20
    );
    assert_eq!(staging_after_a_while(&gcs), Vec::<String>::new());
}
