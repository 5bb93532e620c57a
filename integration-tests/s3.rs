mod common;

// Black-box tests of the s3 storage backend against moto's S3 server on
// 127.0.0.1 (`pip install "moto[server]"`, see scripts/install-deps): skopeo,
// podman and containerd pulls through presigned blob redirects, a large layer
// streamed through a multipart upload while it is packed, a kill -9 while that
// upload is open, two replicas building an image once, a second process and a
// restart reusing the bucket without building, and start-up with a missing
// bucket.
//
// Every test starts its own moto (in memory) with the bucket `layers`, and its
// own servers with dummy AWS credentials. moto does not check signatures, so
// the tests check the shape of the presigned URL and that it serves the blob.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    assert_killed_upload_unpublished, assert_no_work, assert_streamed_while_packed, http_get,
    http_head, kill_when, largest_layer, pull_and_run, random_hex, require_moto, require_root,
    require_tool, required_metric, run_with_timeout, sha256_digest, skopeo_copy, MotoS3, Server,
    Work, MOTO_AUTHORIZATION,
};

const BUCKET: &str = "layers";
const DOCKER_V2S2: &str = "application/vnd.docker.distribution.manifest.v2+json";

type Moto = MotoS3;

/// Keys in the bucket under `prefix`.
fn keys_under(moto: &Moto, prefix: &str) -> Vec<String> {
    moto.objects(prefix).into_iter().map(|o| o.key).collect()
}

/// A server on moto's `layers` bucket; `extra` overrides (e.g. `NIXERY_PKGS_PATH`).
fn start_server(moto: &Moto, extra: &[(&str, &str)]) -> Server {
    let base = moto.server_env();
    let mut env: Vec<(&str, &str)> = base.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.extend_from_slice(extra);
    let server = Server::start(&env);
    assert!(
        server
            .log()
            .contains("storage: s3 bucket layers at http://127.0.0.1:"),
        "not on the s3 backend (see its log)",
    );
    server
}

/// GET the Docker manifest of `name:latest`; returns its digest and JSON.
fn manifest(server: &Server, name: &str) -> (String, serde_json::Value) {
    let url = server.url(&format!("/v2/{name}/manifests/latest"));
    let (status, h, body) = http_get(&url, &[("Accept", DOCKER_V2S2)]);
    assert_eq!(status, 200, "GET {url}: {}", String::from_utf8_lossy(&body));
    let digest = h
        .get("docker-content-digest")
        .expect("Docker-Content-Digest")
        .to_string();
    assert_eq!(
        digest,
        sha256_digest(&body),
        "digest is not the body's hash"
    );
    (
        digest,
        serde_json::from_slice(&body).expect("manifest JSON"),
    )
}

/// The config and layer digests a manifest names.
fn blob_digests(m: &serde_json::Value) -> Vec<String> {
    std::iter::once(&m["config"])
        .chain(m["layers"].as_array().expect("layers").iter())
        .map(|d| d["digest"].as_str().expect("digest").to_string())
        .collect()
}

/// HEAD and GET of a blob answer 307 to a presigned (SigV4) URL of the object on
/// moto, path-style, with the digest; the URL serves bytes of that digest.
fn check_blob_redirect(server: &Server, moto: &Moto, name: &str, digest: &str) -> Vec<u8> {
    let url = server.url(&format!("/v2/{name}/blobs/{digest}"));
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let prefix = format!("{}/{BUCKET}/blobs/sha256/{hex}?", moto.endpoint());
    let (status, head) = http_head(&url, &[]);
    let (status_get, get, _) = http_get(&url, &[]);
    let mut location = String::new();
    for (method, status, h) in [("HEAD", status, &head), ("GET", status_get, &get)] {
        assert_eq!(status, 307, "{method} {url}: {h:?}");
        assert_eq!(h.get("docker-content-digest"), Some(digest), "{h:?}");
        let loc = h.get("location").expect("Location").to_string();
        assert!(
            loc.starts_with(&prefix),
            "{method} Location {loc} is not path-style on moto ({prefix}…)"
        );
        for part in [
            "X-Amz-Algorithm=AWS4-HMAC-SHA256",
            "X-Amz-Credential=AKIDNIXERYTEST%2F",
            "%2Fus-east-1%2Fs3%2Faws4_request",
            "X-Amz-Expires=300",
            "X-Amz-Signature=",
        ] {
            assert!(loc.contains(part), "{method} Location lacks {part}: {loc}");
        }
        location = loc;
    }
    let (status, _, bytes) = http_get(&location, &[]);
    assert_eq!(
        status,
        200,
        "GET {location}: {}",
        String::from_utf8_lossy(&bytes)
    );
    assert_eq!(sha256_digest(&bytes), digest, "bytes at {location}");
    bytes
}

/// What a server did, from its log and metrics (every counter must be shown).
fn work(server: &Server) -> Work {
    common::work(server, required_metric)
}

fn can_pull_and_run() -> bool {
    let mut ok = require_moto() & require_root();
    for t in ["skopeo", "umoci", "chroot"] {
        ok &= require_tool(t);
    }
    ok
}

// ---------------------------------------------------------------------------

#[test]
fn skopeo_pulls_hello_through_presigned_redirects_and_it_runs() {
    if !can_pull_and_run() {
        return;
    }
    let moto = Moto::start(BUCKET);
    let server = start_server(&moto, &[]);
    let out = pull_and_run(server.addr(), "hello", &["/bin/hello"]);
    assert_eq!(out.stdout.trim(), "Hello, world!", "{out}");

    let (_, m) = manifest(&server, "hello");
    let blobs = blob_digests(&m);
    // skopeo fetched every blob from moto, through a redirect.
    let redirects = server
        .log()
        .lines()
        .filter(|l| l.contains("/blobs/sha256:") && l.contains("\" 307 "))
        .count();
    assert!(
        redirects >= blobs.len(),
        "{redirects} blob redirects logged for {} blobs",
        blobs.len()
    );
    for d in &blobs {
        check_blob_redirect(&server, &moto, "hello", d);
    }
    // Blobs and records are in the bucket under their names; nothing in staging.
    let keys = keys_under(&moto, "");
    for d in &blobs {
        let key = format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
        assert!(keys.contains(&key), "{key} not in {keys:?}");
    }
    assert!(
        keys.iter().any(|k| k.starts_with("records/images/")),
        "{keys:?}"
    );
    assert_eq!(keys_under(&moto, "staging/"), Vec::<String>::new());

    // An unknown blob is a registry error, not a redirect.
    let missing = format!("sha256:{}", "0".repeat(64));
    let (status, h) = http_head(&server.url(&format!("/v2/hello/blobs/{missing}")), &[]);
    assert_eq!(status, 404, "{h:?}");
    assert!(h.get("location").is_none(), "{h:?}");
}

#[test]
fn a_large_layer_streams_into_the_bucket_while_it_is_packed() {
    if !require_moto() {
        return;
    }
    let moto = Moto::start(BUCKET);
    // 1 MiB chunks, 5 MiB parts: the 6 MiB of random data in `noise` make a
    // layer of two parts or more.
    let server = start_server(&moto, &[("NIXERY_STORAGE__UPLOAD_CHUNK_MIB", "1")]);
    let started = Instant::now();
    let (_, m) = manifest(&server, "noise");
    eprintln!("noise built and stored in {:?}", started.elapsed());
    let (digest, size) = largest_layer(&m);
    assert!(size > 6 << 20, "the data layer is only {size} bytes");
    // The upload began before packing ended.
    assert_streamed_while_packed(&server.log(), &digest, size);
    // Published under its digest, complete, through a multipart upload; nothing
    // left in staging.
    let bytes = check_blob_redirect(&server, &moto, "noise", &digest);
    assert_eq!(bytes.len() as u64, size);
    assert_eq!(keys_under(&moto, "staging/"), Vec::<String>::new());
    let moto_log = moto.log();
    assert!(
        moto_log.contains("uploadId=") && moto_log.contains("partNumber="),
        "no multipart upload in moto's log"
    );

    if can_pull_and_run() {
        let out = pull_and_run(server.addr(), "noise", &["/bin/noise-check"]);
        assert!(out.stdout.contains("data: OK"), "{out}");
    }
}

#[test]
fn two_replicas_on_one_bucket_build_a_new_image_once() {
    if !require_moto() {
        return;
    }
    let moto = Moto::start(BUCKET);
    let first = start_server(&moto, &[]);
    let pkgs = first.pkgs_path().display().to_string();
    let second = start_server(&moto, &[("NIXERY_PKGS_PATH", &pkgs)]);
    let barrier = std::sync::Barrier::new(4);
    let digests: Vec<String> = thread::scope(|s| {
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
    eprintln!("replica 1: {a:?}\nreplica 2: {b:?}");
    assert_eq!(a.builds + b.builds, 1, "exactly one build: {a:?} {b:?}");
    assert_eq!(a.realisations + b.realisations, 1, "{a:?} {b:?}");
    let idle = if a.builds == 1 { &b } else { &a };
    assert_eq!((idle.uploads, idle.bytes_uploaded), (0, 0), "{idle:?}");
    // The lease is released, just after the answer.
    let end = Instant::now() + Duration::from_secs(10);
    while !keys_under(&moto, "leases/").is_empty() && Instant::now() < end {
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(keys_under(&moto, "leases/"), Vec::<String>::new());
}

#[test]
fn second_process_and_restart_reuse_the_bucket_without_building_or_uploading() {
    if !require_moto() {
        return;
    }
    let moto = Moto::start(BUCKET);
    let mut first = start_server(&moto, &[]);
    let (digest, m) = manifest(&first, "hello");
    let w1 = work(&first);
    eprintln!("first server:     {w1:?}");
    assert!(
        w1.builds == 1 && w1.uploads >= 4 && w1.realisations == 1,
        "the first server should build and upload: {w1:?}",
    );

    let pkgs = first.pkgs_path().display().to_string();
    let pkgs_env = [("NIXERY_PKGS_PATH", pkgs.as_str())];
    let second = start_server(&moto, &pkgs_env);
    let (digest2, m2) = manifest(&second, "hello");
    assert_eq!(digest2, digest, "the second server assembled another image");
    assert_eq!(m2, m);
    let w2 = work(&second);
    eprintln!("second server:    {w2:?}");
    assert_no_work("the second server", &w2);
    for d in blob_digests(&m2) {
        check_blob_redirect(&second, &moto, "hello", &d);
    }

    first.stop();
    let restarted = start_server(&moto, &pkgs_env);
    let (digest3, _) = manifest(&restarted, "hello");
    assert_eq!(
        digest3, digest,
        "the restarted server assembled another image"
    );
    let w3 = work(&restarted);
    eprintln!("restarted server: {w3:?}");
    assert_no_work("the restarted server", &w3);
    if require_tool("skopeo") {
        let dir = tempfile::tempdir().unwrap();
        skopeo_copy(restarted.addr(), "hello", &dir.path().join("layout"));
        assert_no_work("the restarted server (after a pull)", &work(&restarted));
    }
}

#[test]
fn startup_with_a_missing_bucket_exits_with_one_line_naming_it() {
    if !require_moto() {
        return;
    }
    let moto = Moto::start(BUCKET);
    let pkgs = common::fresh_pkgs_copy();
    let bucket = format!("missing-{}", random_hex());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixery"));
    cmd.env("PORT", "0")
        .env("NIXERY_LISTEN", "127.0.0.1")
        .env("NIXERY_PKGS_PATH", pkgs.path())
        .env("RUST_LOG", "info")
        .env("NIX_CONFIG", common::NIX_CONFIG);
    for (k, v) in moto.server_env() {
        cmd.env(k, v);
    }
    cmd.env("S3_BUCKET", &bucket);
    let started = Instant::now();
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30));
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
        lines[0].contains("does not exist") && lines[0].contains(&moto.endpoint()),
        "{out}"
    );
    assert!(lines[0].contains("S3_BUCKET"), "{out}");
    eprintln!("{}", lines[0]);
}

#[test]
fn podman_and_containerd_pull_through_presigned_redirects_and_run() {
    let mut ok = require_moto() & require_root();
    for t in ["podman", "runc", "containerd", "ctr"] {
        ok &= require_tool(t);
    }
    if !ok {
        return;
    }
    let moto = Moto::start(BUCKET);
    let server = start_server(&moto, &[]);
    let image = format!("{}/hello:latest", server.addr());

    let work = tempfile::tempdir().unwrap();
    let podman = || common::podman_command(work.path());
    common::run_ok(podman().args(["pull", "--tls-verify=false", &image]));
    let out = common::run_ok(podman().args(common::podman_run_args(&image, &["/bin/hello"])));
    assert_eq!(out.stdout.trim(), "Hello, world!", "{out}");

    let ctrd = common::Containerd::start();
    let ns = format!("nixery-{}", random_hex());
    ctrd.pull(&ns, &image);
    let out = ctrd.run(&ns, &image, &["/bin/hello"]);
    assert_eq!(out.stdout.trim(), "Hello, world!", "{out}");

    // Both fetched every blob from moto, by redirect: each blob request answered
    // 307 at least twice (once per client), never with the bytes.
    let (_, m) = manifest(&server, "hello");
    let log = server.log();
    for d in blob_digests(&m) {
        let redirected = log
            .lines()
            .filter(|l| l.contains(&format!("/blobs/{d}")) && l.contains("\" 307 "))
            .count();
        assert!(redirected >= 2, "{d}: {redirected} redirects in the log");
        assert!(
            !log.lines()
                .any(|l| l.contains(&format!("GET /v2/hello/blobs/{d}")) && l.contains("\" 200 ")),
            "{d} was served by the registry itself"
        );
    }
}

/// Multipart uploads moto holds open in its bucket.
fn open_uploads(moto: &Moto) -> usize {
    let url = format!("{}/{}?uploads", moto.endpoint(), moto.bucket());
    let (_, _, body) = http_get(&url, &[("Authorization", MOTO_AUTHORIZATION)]);
    String::from_utf8_lossy(&body).matches("<UploadId>").count()
}

#[test]
fn a_server_killed_mid_upload_leaves_no_blob_under_a_digest_name() {
    if !require_moto() {
        return;
    }
    // A layer of two 5 MiB parts or more (`noise`), on a new bucket each try,
    // until a kill lands while a multipart upload is open.
    let mut caught = None;
    for attempt in 0..6 {
        let moto = Moto::start(&format!("kill{attempt}"));
        let env = moto.server_env();
        let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.push(("NIXERY_STORAGE__UPLOAD_CHUNK_MIB", "1"));
        let mut server = Server::start(&env);
        if !kill_when(&mut server, "noise", || open_uploads(&moto) > 0) {
            eprintln!("attempt {attempt}: the upload finished before it was seen open");
            continue;
        }
        caught = Some((moto, server));
        break;
    }
    let Some((moto, dead)) = caught else {
        panic!("no kill landed while a multipart upload was open in 6 tries");
    };

    // A new process on the bucket clears the dead one's staging object and builds
    // the image whole.
    let storage_dir = dead.storage_path().display().to_string();
    let pkgs = dead.pkgs_path().display().to_string();
    let env: Vec<(&str, String)> = moto
        .server_env()
        .into_iter()
        .chain([
            ("NIXERY_STORAGE__UPLOAD_CHUNK_MIB", "1".into()),
            ("STORAGE_PATH", storage_dir),
            ("NIXERY_PKGS_PATH", pkgs),
        ])
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start(&env);
    // moto answers only signed reads: a blob's bytes come through the registry's
    // presigned redirect.
    let blob_bytes = |digest: &str| {
        let url = server.url(&format!("/v2/noise/blobs/{digest}"));
        let (status, h, _) = http_get(&url, &[]);
        assert_eq!(status, 307, "{url}");
        let (status, _, bytes) = http_get(h.get("location").expect("Location"), &[]);
        assert_eq!(status, 200, "{digest}");
        bytes
    };

    // Every object the killed process left under a digest name is complete: its
    // bytes have that digest. It wrote no image record.
    let left = keys_under(&moto, "blobs/");
    for key in &left {
        let hex = key.strip_prefix("blobs/sha256/").expect("digest name");
        let digest = format!("sha256:{hex}");
        assert_eq!(sha256_digest(&blob_bytes(&digest)), digest, "{key}");
    }
    assert_eq!(keys_under(&moto, "records/images/"), Vec::<String>::new());
    eprintln!(
        "killed with an upload open: {} complete blobs left",
        left.len()
    );

    let (_, m) = manifest(&server, "noise");
    assert_killed_upload_unpublished(&left, &m);
    for d in blob_digests(&m) {
        assert_eq!(sha256_digest(&blob_bytes(&d)), d);
    }
    assert_eq!(keys_under(&moto, "staging/"), Vec::<String>::new());
}
