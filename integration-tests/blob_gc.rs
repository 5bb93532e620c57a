//! Storage does not grow forever: with `storage.retention_secs` set, blobs that no
//! pull has used for longer than the retention are deleted while the registry
//! serves, on the filesystem, in a GCS bucket and in an S3 bucket. What users get:
//! images pulled recently keep every blob; an image nobody pulls loses its blobs
//! (and the records naming them) after the retention, and a pull of it afterwards
//! builds it again and succeeds; a client never gets a 404 for a blob named in a
//! manifest it has just received, even while sweeps run; replicas on one bucket
//! sweep one at a time; without a retention (the default), or with sweeping off,
//! nothing is ever deleted.
//!
//! Retentions here are seconds long and sweeps run every second, so a test sees
//! several sweeps in its run.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    get_following_redirect, http_get, http_request, metric, pull_and_run, require_fake_gcs,
    require_moto, require_root, require_tool, required_metric, rfc3339_unix, sha256_digest,
    skopeo_copy, tail_lines, unix_now_secs, FakeGcs, MotoS3, Server,
};

const DOCKER: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI: &str = "application/vnd.oci.image.manifest.v1+json";
const BUCKET: &str = "layers";
/// The periodic check of an image's blobs (every 10 s by default) also builds
/// again an image whose blob is gone; an hour leaves that to what serving a
/// manifest marks and checks, which is what these tests are about.
const NO_PERIODIC_VERIFY: (&str, &str) = ("NIXERY_STORAGE__VERIFY_INTERVAL_SECS", "3600");
/// Time limit of one request (a request may wait for a build).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------
// Pulling

/// What one pull received: the manifest's digest and the blobs it names.
#[derive(Debug)]
struct Pulled {
    digest: String,
    blobs: Vec<String>,
}

/// The config and layer digests a manifest names.
fn blob_digests(m: &serde_json::Value) -> Vec<String> {
    std::iter::once(&m["config"])
        .chain(m["layers"].as_array().into_iter().flatten())
        .filter_map(|d| d["digest"].as_str().map(str::to_string))
        .collect()
}

fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned()
}

/// Pulls as a client does: GET the manifest `reference` of `name` with `accept`,
/// waits `delay`, then GETs every blob it names (following redirects to the
/// bucket) and checks each blob's bytes against its digest. Err says what failed,
/// and when (Unix time, to find it in the server's log).
fn pull(
    server: &Server,
    name: &str,
    reference: &str,
    accept: &str,
    delay: Duration,
) -> Result<Pulled, String> {
    let url = server.url(&format!("/v2/{name}/manifests/{reference}"));
    let asked = unix_now_secs();
    let (status, h, body) = http_request("GET", &url, &[("Accept", accept)], REQUEST_TIMEOUT)
        .map_err(|e| format!("[{asked:.3}] GET {url} ({accept}): {e}"))?;
    if status != 200 {
        return Err(format!(
            "[{asked:.3}] GET {url} ({accept}): {status} after {:.3} s: {}",
            unix_now_secs() - asked,
            snippet(&body)
        ));
    }
    let digest = h.get("docker-content-digest").unwrap_or("").to_string();
    if digest != sha256_digest(&body) {
        return Err(format!(
            "[{asked:.3}] GET {url}: Docker-Content-Digest {digest:?} is not the body's hash"
        ));
    }
    let m: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| format!("[{asked:.3}] GET {url}: not JSON ({e}): {}", snippet(&body)))?;
    let answered = unix_now_secs();
    thread::sleep(delay);
    let blobs = blob_digests(&m);
    for d in &blobs {
        let blob_url = server.url(&format!("/v2/{name}/blobs/{d}"));
        let at = unix_now_secs();
        let (status, bytes, location) = get_following_redirect(&blob_url, &[], REQUEST_TIMEOUT)?;
        if status != 200 {
            return Err(format!(
                "[{at:.3}] GET {blob_url}{}: {status}, {:.3} s after manifest {digest} \
                 ({accept}) named it: {}",
                location.map(|l| format!(" -> {l}")).unwrap_or_default(),
                at - answered,
                snippet(&bytes)
            ));
        }
        if sha256_digest(&bytes) != *d {
            return Err(format!(
                "[{at:.3}] GET {blob_url}: {} bytes whose hash is not {d}",
                bytes.len()
            ));
        }
    }
    Ok(Pulled { digest, blobs })
}

/// [`pull`] that fails the test.
fn pull_ok(server: &Server, name: &str, reference: &str, accept: &str) -> Pulled {
    pull(server, name, reference, accept, Duration::ZERO).unwrap_or_else(|e| panic!("{e}"))
}

/// Every blob of image `name:latest` in storage, found by pulling it: its Docker
/// and OCI manifests (stored as blobs), their configs and layers, and the SBOM
/// artifacts attached to them (artifact manifest, empty config, SPDX document).
fn image_blobs(server: &Server, name: &str) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for accept in [DOCKER, OCI] {
        let p = pull_ok(server, name, "latest", accept);
        let url = server.url(&format!("/v2/{name}/referrers/{}", p.digest));
        let (status, _, body) = http_get(&url, &[]);
        assert_eq!(status, 200, "GET {url}: {}", snippet(&body));
        let index: serde_json::Value = serde_json::from_slice(&body).expect("referrers JSON");
        let artifacts = index["manifests"].as_array().cloned().unwrap_or_default();
        assert!(!artifacts.is_empty(), "{name}: no SBOM attached: {index}");
        for a in artifacts {
            let a = a["digest"].as_str().expect("artifact digest");
            let artifact = pull_ok(server, name, a, OCI);
            all.insert(artifact.digest);
            all.extend(artifact.blobs);
        }
        all.insert(p.digest);
        all.extend(p.blobs);
    }
    all
}

/// Pulls `name` (Docker and OCI manifests, every blob) every `period` until `stop`;
/// every failure is added to `failures`. Returns the number of pulls.
fn keep_pulling(
    server: &Server,
    name: &str,
    period: Duration,
    stop: &AtomicBool,
    failures: &Mutex<Vec<String>>,
) -> usize {
    let mut pulls = 0;
    while !stop.load(Ordering::Relaxed) {
        for accept in [DOCKER, OCI] {
            if let Err(e) = pull(server, name, "latest", accept, Duration::ZERO) {
                failures.lock().unwrap().push(e);
            }
            pulls += 1;
        }
        sleep_unless(stop, period);
    }
    pulls
}

/// Sleeps `d`, or less when `stop` is set meanwhile.
fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
    }
}

/// Completed builds of `image` in a server's log.
fn builds_of(server: &Server, image: &str) -> usize {
    let start = format!("build {image} [");
    server
        .log()
        .lines()
        .filter(|l| l.contains(&start) && l.contains("]: done in "))
        .count()
}

/// The `blob sweep:` lines of a server's log.
fn sweep_lines(server: &Server) -> Vec<String> {
    server
        .log()
        .lines()
        .filter(|l| l.contains("blob sweep:"))
        .map(str::to_string)
        .collect()
}

/// N of every `blob sweep: deleted N blobs` line.
fn swept_counts(server: &Server) -> Vec<u64> {
    sweep_lines(server)
        .iter()
        .filter_map(|l| {
            let rest = &l[l.find("blob sweep: deleted ")? + "blob sweep: deleted ".len()..];
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// The `blobs` object of the server's `/builds` page.
fn blobs_status(server: &Server) -> serde_json::Value {
    let (status, _, body) = http_get(&server.url("/builds"), &[]);
    assert_eq!(status, 200, "GET /builds: {}", snippet(&body));
    let page: serde_json::Value = serde_json::from_slice(&body).expect("/builds JSON");
    page["blobs"].clone()
}

/// Every `sha256:<64 hex>` in `text`.
fn digests_in(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices("sha256:") {
        let hex: String = text[i + 7..].chars().take(64).collect();
        if hex.len() == 64 && hex.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')) {
            found.insert(format!("sha256:{hex}"));
        }
    }
    found
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").expect("a sha256 digest")
}

// ---------------------------------------------------------------------------
// Storage, looked at from outside the registry

/// The storage a server uses, read directly (the filesystem, or the emulator's API).
#[derive(Clone, Copy)]
enum Store<'a> {
    Fs(&'a Path),
    Gcs(&'a FakeGcs),
    S3(&'a MotoS3),
}

/// A blob in storage.
#[derive(Clone, Debug)]
struct StoredBlob {
    size: u64,
    /// When it was last used, as the backend keeps it (mtime; customTime, else
    /// timeCreated; the later LastModified of the blob and its `uses/` marker).
    last_use: f64,
    /// GCS: whether the object has a customTime.
    custom_time: bool,
}

/// A record object and the blobs it names (digests in it, and its own name when
/// that is a digest, as referrers records are named after their subject).
#[derive(Clone, Debug)]
struct Record {
    object: String,
    names: BTreeSet<String>,
}

impl Record {
    fn new(object: String, text: &str) -> Record {
        let mut names = digests_in(text);
        let stem = object
            .rsplit('/')
            .next()
            .unwrap_or("")
            .trim_end_matches(".json");
        names.extend(digests_in(&format!("sha256:{stem}")));
        Record { object, names }
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'))
}

impl Store<'_> {
    /// Every blob in storage by digest.
    fn blobs(&self) -> BTreeMap<String, StoredBlob> {
        let mut found = BTreeMap::new();
        match self {
            Store::Fs(root) => {
                let dir = root.join("blobs/sha256");
                for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    // Gone between the listing and the stat: deleted, not there.
                    let Ok(meta) = entry.metadata() else { continue };
                    if !is_hex64(&name) || !meta.is_file() {
                        continue;
                    }
                    let mtime = meta
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0.0, |d| d.as_secs_f64());
                    found.insert(
                        format!("sha256:{name}"),
                        StoredBlob {
                            size: meta.len(),
                            last_use: mtime,
                            custom_time: false,
                        },
                    );
                }
            }
            Store::Gcs(gcs) => {
                for o in gcs.list(BUCKET, "blobs/sha256/") {
                    let name = o["name"].as_str().unwrap_or("");
                    let hex = name.trim_start_matches("blobs/sha256/");
                    if !is_hex64(hex) {
                        continue;
                    }
                    let custom = o["customTime"].as_str().and_then(rfc3339_unix);
                    let created = o["timeCreated"].as_str().and_then(rfc3339_unix);
                    found.insert(
                        format!("sha256:{hex}"),
                        StoredBlob {
                            size: o["size"]
                                .as_str()
                                .and_then(|s| s.parse().ok())
                                .or_else(|| o["size"].as_u64())
                                .unwrap_or(0),
                            last_use: custom.or(created).unwrap_or(0.0),
                            custom_time: custom.is_some(),
                        },
                    );
                }
            }
            Store::S3(moto) => {
                let uses: BTreeMap<String, f64> = moto
                    .objects("uses/sha256/")
                    .into_iter()
                    .map(|o| {
                        let hex = o.key.trim_start_matches("uses/sha256/").to_string();
                        (hex, o.last_modified)
                    })
                    .collect();
                for o in moto.objects("blobs/sha256/") {
                    let hex = o.key.trim_start_matches("blobs/sha256/");
                    if !is_hex64(hex) {
                        continue;
                    }
                    let used = uses.get(hex).copied().unwrap_or(0.0);
                    found.insert(
                        format!("sha256:{hex}"),
                        StoredBlob {
                            size: o.size,
                            last_use: o.last_modified.max(used),
                            custom_time: false,
                        },
                    );
                }
            }
        }
        found
    }

    /// Every record (`records/<kind>/<key>.json`) and what it names.
    fn records(&self) -> Vec<Record> {
        let mut found = Vec::new();
        match self {
            Store::Fs(root) => {
                let dir = root.join("records");
                for kind in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    for entry in std::fs::read_dir(kind.path())
                        .into_iter()
                        .flatten()
                        .flatten()
                    {
                        let path = entry.path();
                        if path.extension().is_none_or(|e| e != "json") {
                            continue;
                        }
                        let Ok(text) = std::fs::read_to_string(&path) else {
                            continue;
                        };
                        let object = path
                            .strip_prefix(root)
                            .unwrap_or(&path)
                            .display()
                            .to_string();
                        found.push(Record::new(object, &text));
                    }
                }
            }
            Store::Gcs(gcs) => {
                for o in gcs.list(BUCKET, "records/") {
                    let name = o["name"].as_str().unwrap_or("").to_string();
                    if let Some(bytes) = gcs.download(BUCKET, &name) {
                        found.push(Record::new(name, &String::from_utf8_lossy(&bytes)));
                    }
                }
            }
            Store::S3(moto) => {
                for o in moto.objects("records/") {
                    if let Some(bytes) = moto.get(&o.key) {
                        found.push(Record::new(o.key, &String::from_utf8_lossy(&bytes)));
                    }
                }
            }
        }
        found
    }

    /// The bytes of object `name` (e.g. a lease), if it exists.
    fn object(&self, name: &str) -> Option<Vec<u8>> {
        match self {
            Store::Fs(root) => std::fs::read(root.join(name)).ok(),
            Store::Gcs(gcs) => gcs.download(BUCKET, name),
            Store::S3(moto) => moto.get(name),
        }
    }
}

// ---------------------------------------------------------------------------
// The scenario every backend runs: A is pulled all along, B once

/// What [`keep_a_lose_b`] saw.
struct Outcome {
    /// B's blobs that A does not name, as they were in storage before the sweep.
    b_own: BTreeMap<String, StoredBlob>,
    /// Holders (`host:pid`) of the sweep lease seen while waiting.
    lease_holders: BTreeSet<String>,
    /// Sweeps of all servers while waiting, and how long that was.
    sweeps: u64,
    window: Duration,
}

/// Image A (`hello`) pulled from `servers[0]`, image B (`cowsay`) from
/// `servers[1]` (the same server for a single replica). A is pulled again every
/// second, B is not. Waits until B's own blobs are gone from `store`, failing if
/// one goes before the retention `r` or is still there long after it, or if one
/// of A's blobs goes, or a pull of A fails. Then checks what is left: A's blobs
/// and records, no record naming a deleted blob.
fn keep_a_lose_b(servers: [&Server; 2], store: Store, r: f64) -> Outcome {
    let a = image_blobs(servers[0], "hello");
    let b = image_blobs(servers[1], "cowsay");
    let stored = store.blobs();
    for d in a.iter().chain(&b) {
        assert!(
            stored.contains_key(d),
            "{d}, named by a pull of hello or cowsay, is not in storage"
        );
    }
    let b_own: BTreeMap<String, StoredBlob> = b
        .difference(&a)
        .map(|d| (d.clone(), stored[d].clone()))
        .collect();
    // Distinguishable images: B has its own manifests, config, layers and SBOM.
    assert!(
        b_own.len() >= 5,
        "cowsay has only {} blobs that hello does not name: {b_own:?}",
        b_own.len()
    );
    let records = store.records();
    let b_records: Vec<&Record> = records
        .iter()
        .filter(|r| r.names.iter().any(|d| b_own.contains_key(d)))
        .collect();
    assert!(
        b_records
            .iter()
            .any(|r| r.object.contains("records/images/"))
            && b_records
                .iter()
                .any(|r| r.object.contains("records/layers/")),
        "no image and layer records of cowsay: {records:?}"
    );
    // Records of A alone (its image, its layers, its referrers: naming blobs of A
    // and no other blob in storage) must stay.
    let a_records: Vec<String> = records
        .iter()
        .filter(|r| {
            r.names.iter().any(|d| a.contains(d))
                && r.names
                    .iter()
                    .all(|d| a.contains(d) || !stored.contains_key(d))
        })
        .map(|r| r.object.clone())
        .collect();
    assert!(
        a_records.iter().any(|r| r.contains("records/images/")),
        "no image record of hello: {records:?}"
    );
    let b_last_use = b_own
        .values()
        .map(|b| b.last_use)
        .fold(f64::NEG_INFINITY, f64::max);
    eprintln!(
        "hello: {} blobs; cowsay: {} blobs, {} of them its own, last used {:.1} s ago",
        a.len(),
        b.len(),
        b_own.len(),
        unix_now_secs() - b_last_use
    );

    let stop = AtomicBool::new(false);
    let failures = Mutex::new(Vec::new());
    let sweeps_before: u64 = servers
        .iter()
        .map(|s| metric(s, "nixery_blob_sweeps_total"))
        .sum();
    let window_start = Instant::now();
    let mut lease_holders = BTreeSet::new();
    let pulls = thread::scope(|s| {
        let keeper = s.spawn(|| {
            keep_pulling(
                servers[0],
                "hello",
                Duration::from_secs(1),
                &stop,
                &failures,
            )
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let deadline = b_last_use + r + 12.0;
            let mut gone_at = None;
            loop {
                let now = unix_now_secs();
                let blobs = store.blobs();
                let missing_a: Vec<&String> =
                    a.iter().filter(|d| !blobs.contains_key(*d)).collect();
                assert!(
                    missing_a.is_empty(),
                    "[{now:.3}] blobs of hello, pulled every second, were deleted: {missing_a:?}"
                );
                for (d, before) in &b_own {
                    // Last use in whole seconds on buckets: a second of slack.
                    assert!(
                        blobs.contains_key(d) || now >= before.last_use + r - 1.5,
                        "[{now:.3}] {d} of cowsay was deleted {:.1} s after its last use, \
                         before the retention of {r} s",
                        now - before.last_use
                    );
                }
                if let Some(lease) = store.object("leases/blob-sweep.json") {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&lease) {
                        if let Some(h) = v["holder"].as_str() {
                            lease_holders.insert(h.to_string());
                        }
                    }
                }
                let left: Vec<&String> = b_own.keys().filter(|d| blobs.contains_key(*d)).collect();
                match gone_at {
                    None if left.is_empty() => {
                        eprintln!(
                            "cowsay's own blobs gone {:.1} s after their last use",
                            now - b_last_use
                        );
                        // Two more sweeps while A is pulled.
                        gone_at = Some(Instant::now());
                    }
                    Some(t) if t.elapsed() > Duration::from_millis(2500) => break,
                    _ => {}
                }
                assert!(
                    now < deadline,
                    "cowsay's blobs {left:?} are still in storage {:.1} s after their last \
                     use (retention {r} s, a sweep every second); sweeps:\n{}",
                    now - b_last_use,
                    servers
                        .iter()
                        .map(|s| sweep_lines(s).join("\n"))
                        .collect::<Vec<_>>()
                        .join("\n--\n")
                );
                thread::sleep(Duration::from_millis(250));
            }
        }));
        stop.store(true, Ordering::Relaxed);
        let pulls = keeper.join().unwrap();
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
        pulls
    });
    let window = window_start.elapsed();
    let sweeps = servers
        .iter()
        .map(|s| metric(s, "nixery_blob_sweeps_total"))
        .sum::<u64>()
        - sweeps_before;
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {pulls} pulls of hello failed:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Every blob of A is there and was used within the retention (bucket times
    // are whole seconds).
    let now = unix_now_secs();
    let blobs = store.blobs();
    for d in &a {
        let blob = blobs
            .get(d)
            .unwrap_or_else(|| panic!("{d} of hello is gone"));
        assert!(
            blob.last_use >= now - r - 1.0,
            "{d} of hello, pulled every second, was last used {:.1} s ago",
            now - blob.last_use
        );
    }
    // No record names a deleted blob (records are listed after the blobs: a sweep
    // deletes a blob's records before the blob); A's records are all there.
    let deleted: BTreeSet<String> = stored
        .keys()
        .filter(|d| !blobs.contains_key(*d))
        .cloned()
        .collect();
    let records = store.records();
    for rec in &records {
        let dangling: Vec<&String> = rec.names.intersection(&deleted).collect();
        assert!(
            dangling.is_empty(),
            "{} still names deleted blobs {dangling:?}",
            rec.object
        );
    }
    for object in &a_records {
        assert!(
            records.iter().any(|r| r.object == *object),
            "{object}, a record of hello, is gone"
        );
    }
    Outcome {
        b_own,
        lease_holders,
        sweeps,
        window,
    }
}

/// The deletion counters of `servers` add up to at least B's own blobs and bytes.
fn assert_deletions_counted(servers: &[&Server], b_own: &BTreeMap<String, StoredBlob>) {
    let sum = |name: &str| -> u64 { servers.iter().map(|s| metric(s, name)).sum() };
    let deleted = sum("nixery_blobs_deleted_total");
    let bytes = sum("nixery_blob_deleted_bytes_total");
    let own_bytes: u64 = b_own.values().map(|b| b.size).sum();
    assert!(
        deleted >= b_own.len() as u64,
        "nixery_blobs_deleted_total is {deleted}, yet {} blobs were deleted",
        b_own.len()
    );
    assert!(
        bytes >= own_bytes,
        "nixery_blob_deleted_bytes_total is {bytes}, yet {own_bytes} bytes were deleted"
    );
    assert!(sum("nixery_blob_touches_total") > 0, "no touches counted");
    let logged: u64 = servers.iter().flat_map(|s| swept_counts(s)).sum();
    assert!(
        logged >= b_own.len() as u64,
        "the `blob sweep: deleted N blobs` lines add up to {logged}, not {}",
        b_own.len()
    );
    for s in servers {
        for l in sweep_lines(s) {
            assert!(
                l.contains(" unused for more than ") && l.contains(" kept "),
                "sweep line: {l}"
            );
        }
    }
}

/// B pulled again from `server` after its blobs were deleted: it is built again
/// and the pull succeeds (with skopeo and umoci when they are here, running the
/// image); its blobs are back in storage.
fn pull_b_again(server: &Server, store: Store, builds_before: usize, run_it: bool) {
    let started = Instant::now();
    if run_it {
        let out = pull_and_run(server.addr(), "cowsay", &["/bin/cowsay", "moo"]);
        assert!(out.stdout.contains("< moo >"), "{out}");
    } else if require_tool("skopeo") {
        let dir = tempfile::tempdir().unwrap();
        skopeo_copy(server.addr(), "cowsay", &dir.path().join("layout"));
    }
    // And as a client that reads the manifest and then every blob.
    let docker = pull_ok(server, "cowsay", "latest", DOCKER);
    let oci = pull_ok(server, "cowsay", "latest", OCI);
    eprintln!("cowsay pulled again in {:?}", started.elapsed());
    assert!(
        builds_of(server, "cowsay") > builds_before,
        "cowsay was not built again after its blobs were deleted; log:\n{}",
        tail_lines(&server.log(), 40)
    );
    let blobs = store.blobs();
    for d in docker
        .blobs
        .iter()
        .chain(&oci.blobs)
        .chain([&docker.digest, &oci.digest])
    {
        assert!(
            blobs.contains_key(d),
            "{d} of cowsay is not back in storage"
        );
    }
}

fn can_pull_and_run() -> bool {
    require_root()
        && ["skopeo", "umoci", "chroot"]
            .iter()
            .all(|t| require_tool(t))
}

// ---------------------------------------------------------------------------

#[test]
fn filesystem_keeps_pulled_images_and_deletes_an_unpulled_one_which_then_rebuilds() {
    let r = 6;
    let started = unix_now_secs();
    let server = Server::start(&[
        ("NIXERY_STORAGE__RETENTION_SECS", &r.to_string()),
        ("NIXERY_STORAGE__SWEEP_INTERVAL_SECS", "1"),
        NO_PERIODIC_VERIFY,
    ]);
    let store = Store::Fs(server.storage_path());
    let out = keep_a_lose_b([&server, &server], store, r as f64);

    // Pulled all along, A was never built again.
    assert_eq!(builds_of(&server, "hello"), 1, "hello was built again");
    assert_deletions_counted(&[&server], &out.b_own);
    assert!(
        required_metric(&server, "nixery_blob_sweeps_total") >= 3,
        "fewer than 3 sweeps in {:?} with one a second",
        out.window
    );
    let status = blobs_status(&server);
    assert_eq!(status["retention_secs"], r, "/builds blobs: {status}");
    assert!(
        status["last_sweep_unix_time"]
            .as_f64()
            .is_some_and(|t| t >= started.floor() && t <= unix_now_secs() + 1.0),
        "/builds blobs: {status}"
    );
    for key in [
        "last_sweep_deleted",
        "last_sweep_kept",
        "last_sweep_records_deleted",
    ] {
        assert!(status[key].is_u64(), "/builds blobs.{key}: {status}");
    }
    // Some of A's blobs, all of it at least, were kept by the last sweep.
    assert!(
        status["last_sweep_kept"].as_u64().unwrap() >= 5,
        "/builds blobs: {status}"
    );

    pull_b_again(&server, store, 1, can_pull_and_run());
}

#[test]
fn without_a_retention_no_blob_is_ever_deleted() {
    let server = Server::start(&[("NIXERY_STORAGE__SWEEP_INTERVAL_SECS", "1")]);
    let store = Store::Fs(server.storage_path());
    let names = image_blobs(&server, "hello");
    // Blobs last used a month ago: any retention would take them.
    let before = age_all_blobs(server.storage_path(), 30 * 86400);
    assert!(
        names.iter().all(|d| before.contains(d)),
        "{names:?} {before:?}"
    );
    thread::sleep(Duration::from_millis(3500));
    pull_ok(&server, "hello", "latest", DOCKER);
    let after: BTreeSet<String> = store.blobs().into_keys().collect();
    let lost: Vec<&String> = before.difference(&after).collect();
    assert!(lost.is_empty(), "deleted without a retention: {lost:?}");
    assert_eq!(metric(&server, "nixery_blobs_deleted_total"), 0);
    assert!(
        swept_counts(&server).iter().all(|n| *n == 0),
        "{:?}",
        sweep_lines(&server)
    );
    let status = blobs_status(&server);
    assert!(
        status.is_null() || status["retention_secs"] == 0,
        "/builds blobs: {status}"
    );
}

#[test]
fn with_sweeping_off_blobs_are_marked_as_used_and_never_deleted() {
    let r = 2;
    let server = Server::start(&[
        ("NIXERY_STORAGE__RETENTION_SECS", &r.to_string()),
        ("NIXERY_STORAGE__SWEEP_INTERVAL_SECS", "1"),
        ("NIXERY_STORAGE__SWEEP", "false"),
    ]);
    let store = Store::Fs(server.storage_path());
    image_blobs(&server, "hello");
    let before = age_all_blobs(server.storage_path(), 86400);
    // Sweeps would have run three times over blobs a day past the retention.
    thread::sleep(Duration::from_millis(3500));
    let after: BTreeSet<String> = store.blobs().into_keys().collect();
    let lost: Vec<&String> = before.difference(&after).collect();
    assert!(lost.is_empty(), "deleted with sweeping off: {lost:?}");
    assert_eq!(metric(&server, "nixery_blobs_deleted_total"), 0);
    assert_eq!(metric(&server, "nixery_blob_sweeps_total"), 0);
    assert!(
        sweep_lines(&server).is_empty(),
        "{:?}",
        sweep_lines(&server)
    );

    // A pull still marks what it uses, for a bucket lifecycle rule to see.
    let marked_from = unix_now_secs() - 1.0;
    let p = pull_ok(&server, "hello", "latest", DOCKER);
    let blobs = store.blobs();
    for d in p.blobs.iter().chain([&p.digest]) {
        let b = &blobs[d];
        assert!(
            b.last_use >= marked_from,
            "{d}, just pulled, was last used {:.1} s ago",
            unix_now_secs() - b.last_use
        );
    }
    assert!(metric(&server, "nixery_blob_touches_total") > 0);
}

/// Sets the mtime of every blob file `secs` into the past; returns their digests.
fn age_all_blobs(storage: &Path, secs: u64) -> BTreeSet<String> {
    let when = std::time::SystemTime::now() - Duration::from_secs(secs);
    let dir = storage.join("blobs/sha256");
    let mut aged = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("blob dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_hex64(&name) {
            continue;
        }
        let f = std::fs::File::options()
            .write(true)
            .open(entry.path())
            .expect("open blob");
        f.set_modified(when).expect("set mtime");
        aged.insert(format!("sha256:{name}"));
    }
    aged
}

#[test]
fn pulls_racing_sweeps_never_get_a_404_for_a_blob_their_manifest_named() {
    let r: u64 = 4;
    let server = Server::start(&[
        ("NIXERY_STORAGE__RETENTION_SECS", &r.to_string()),
        ("NIXERY_STORAGE__SWEEP_INTERVAL_SECS", "1"),
        NO_PERIODIC_VERIFY,
    ]);
    // (image, manifest kind, delay between the manifest and its blobs)
    let frequent = [
        ("hello", DOCKER, 0),
        ("cowsay", OCI, 250),
        ("hello", OCI, 1000),
    ];
    // Pulled every few seconds, around the retention: their blobs are deleted
    // between pulls, or are being deleted while a pull touches them.
    let rare = [("tools.figlet", DOCKER, 0), ("alpha", OCI, 300)];
    let gaps_ms = [
        r * 1000 + 2000,
        r * 1000 - 500,
        r * 1000 + 1000,
        r * 1000,
        r * 1000 + 1500,
        r * 1000 + 500,
    ];
    for (name, accept, _) in frequent.iter().chain(&rare) {
        pull_ok(&server, name, "latest", accept);
    }
    let run_for = Duration::from_secs(4 * r);
    let stop = AtomicBool::new(false);
    let failures = Mutex::new(Vec::<String>::new());
    let pulls = Mutex::new(BTreeMap::<String, usize>::new());
    let started = Instant::now();
    thread::scope(|s| {
        for (name, accept, delay) in frequent {
            let (stop, failures, pulls, server) = (&stop, &failures, &pulls, &server);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) =
                        pull(server, name, "latest", accept, Duration::from_millis(delay))
                    {
                        failures.lock().unwrap().push(e);
                    }
                    *pulls.lock().unwrap().entry(name.to_string()).or_default() += 1;
                    sleep_unless(stop, Duration::from_millis(200));
                }
            });
        }
        for (i, (name, accept, delay)) in rare.into_iter().enumerate() {
            let (stop, failures, pulls, server, gaps_ms) =
                (&stop, &failures, &pulls, &server, &gaps_ms);
            s.spawn(move || {
                let mut k = i * 3;
                loop {
                    sleep_unless(stop, Duration::from_millis(gaps_ms[k % gaps_ms.len()]));
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    k += 1;
                    if let Err(e) =
                        pull(server, name, "latest", accept, Duration::from_millis(delay))
                    {
                        failures.lock().unwrap().push(e);
                    }
                    *pulls.lock().unwrap().entry(name.to_string()).or_default() += 1;
                }
            });
        }
        while started.elapsed() < run_for {
            thread::sleep(Duration::from_millis(200));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let pulls = pulls.into_inner().unwrap();
    let failures = failures.into_inner().unwrap();
    eprintln!("pulls in {:?}: {pulls:?}", started.elapsed());
    assert!(
        failures.is_empty(),
        "{} pulls failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let deleted = required_metric(&server, "nixery_blobs_deleted_total");
    assert!(deleted > 0, "no blob was deleted while pulls ran");
    // Blobs of the rare images went between their pulls: they were built again.
    let rebuilds: usize = rare
        .iter()
        .map(|(name, _, _)| builds_of(&server, name).saturating_sub(1))
        .sum();
    assert!(
        rebuilds >= 1,
        "no rarely pulled image was built again, so no pull met a deleted image \
         ({deleted} blobs deleted); sweeps:\n{}",
        sweep_lines(&server).join("\n")
    );
    for (name, _, _) in frequent {
        assert!(pulls[name] >= 5, "{name} pulled only {} times", pulls[name]);
        assert_eq!(
            builds_of(&server, name),
            1,
            "{name}, pulled all along, was built again"
        );
    }
    eprintln!(
        "{deleted} blobs deleted, {rebuilds} rebuilds of rarely pulled images, {} sweeps",
        metric(&server, "nixery_blob_sweeps_total")
    );
}

// ---------------------------------------------------------------------------
// Two replicas on one bucket

fn gcs_key_path() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/testdata/gcs-v4-signing/test_service_account.not-a-test.json"
    )
    .to_string()
}

/// The sweep lease was taken by the replicas and no more than about one sweep a
/// second ran across both of them.
fn assert_one_sweeper(replicas: [&Server; 2], out: &Outcome) {
    let pids: Vec<String> = replicas
        .iter()
        .map(|s| format!(":{}", s.pid().expect("running")))
        .collect();
    let per_replica: Vec<u64> = replicas
        .iter()
        .map(|s| metric(s, "nixery_blob_sweeps_total"))
        .collect();
    eprintln!(
        "sweeps per replica {per_replica:?}; {} in {:?}; lease holders seen {:?}",
        out.sweeps, out.window, out.lease_holders
    );
    for h in &out.lease_holders {
        assert!(
            pids.iter().any(|p| h.ends_with(p.as_str())),
            "the sweep lease is held by {h}, neither replica ({pids:?})"
        );
    }
    let secs = out.window.as_secs_f64();
    assert!(out.sweeps >= 1, "no sweep in {secs:.1} s");
    assert!(
        (out.sweeps as f64) <= secs * 1.25 + 2.0,
        "{} sweeps in {secs:.1} s across two replicas sweeping every second: both swept, \
         not one at a time ({per_replica:?})",
        out.sweeps
    );
}

#[test]
fn gcs_two_replicas_keep_what_is_pulled_and_one_of_them_sweeps_the_rest() {
    if !require_fake_gcs() {
        return;
    }
    let r = 5;
    let gcs = FakeGcs::start(&[BUCKET]);
    let host = gcs.host();
    let key = gcs_key_path();
    let r_text = r.to_string();
    let env = vec![
        ("NIXERY_STORAGE_BACKEND", "gcs"),
        ("GCS_BUCKET", BUCKET),
        ("STORAGE_EMULATOR_HOST", host.as_str()),
        ("GOOGLE_APPLICATION_CREDENTIALS", key.as_str()),
        ("NIXERY_STORAGE__RETENTION_SECS", r_text.as_str()),
        ("NIXERY_STORAGE__SWEEP_INTERVAL_SECS", "1"),
        NO_PERIODIC_VERIFY,
    ];
    let first = Server::start(&env);
    assert!(
        first.log().contains("gcs storage"),
        "not on the gcs backend"
    );
    let pkgs = first.pkgs_path().display().to_string();
    let mut env2 = env.clone();
    env2.push(("NIXERY_PKGS_PATH", &pkgs));
    let second = Server::start(&env2);
    let store = Store::Gcs(&gcs);

    let created_after = unix_now_secs() - 2.0;
    // Every blob carries a customTime from its creation on.
    image_blobs(&first, "alpha");
    for (d, b) in store.blobs() {
        assert!(b.custom_time, "{d} has no customTime");
        assert!(
            b.last_use >= created_after && b.last_use <= unix_now_secs() + 1.0,
            "{d}: customTime {:.0}, now {:.0}",
            b.last_use,
            unix_now_secs()
        );
    }

    let out = keep_a_lose_b([&first, &second], store, r as f64);
    for (d, b) in store.blobs() {
        assert!(b.custom_time, "{d} has no customTime");
    }
    assert_eq!(builds_of(&first, "hello"), 1, "hello was built again");
    assert_deletions_counted(&[&first, &second], &out.b_own);
    assert_one_sweeper([&first, &second], &out);
    for s in [&first, &second] {
        assert_eq!(blobs_status(s)["retention_secs"], r);
    }
    pull_b_again(&second, store, 1, false);
    // Blobs made again carry a customTime too.
    for (d, b) in store.blobs() {
        assert!(b.custom_time, "{d} has no customTime");
    }
}

#[test]
fn s3_two_replicas_keep_what_is_pulled_and_one_of_them_sweeps_the_rest() {
    if !require_moto() {
        return;
    }
    let r = 5;
    let moto = MotoS3::start(BUCKET);
    let base = moto.server_env();
    let r_text = r.to_string();
    let mut env: Vec<(&str, &str)> = base.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(("NIXERY_STORAGE__RETENTION_SECS", &r_text));
    env.push(("NIXERY_STORAGE__SWEEP_INTERVAL_SECS", "1"));
    env.push(NO_PERIODIC_VERIFY);
    let first = Server::start(&env);
    assert!(
        first
            .log()
            .contains("storage: s3 bucket layers at http://127.0.0.1:"),
        "not on the s3 backend"
    );
    let pkgs = first.pkgs_path().display().to_string();
    let mut env2 = env.clone();
    env2.push(("NIXERY_PKGS_PATH", &pkgs));
    let second = Server::start(&env2);
    let store = Store::S3(&moto);

    let out = keep_a_lose_b([&first, &second], store, r as f64);
    assert_eq!(builds_of(&first, "hello"), 1, "hello was built again");
    assert_deletions_counted(&[&first, &second], &out.b_own);
    assert_one_sweeper([&first, &second], &out);
    for s in [&first, &second] {
        assert_eq!(blobs_status(s)["retention_secs"], r);
    }
    let markers: Vec<String> = moto
        .objects("uses/")
        .into_iter()
        .map(|o| o.key)
        .filter(|k| out.b_own.keys().any(|d| k.ends_with(hex_of(d))))
        .collect();
    eprintln!("use markers of deleted blobs left: {markers:?}");
    pull_b_again(&second, store, 1, false);
}
