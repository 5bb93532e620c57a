//! Package sources over time: warm pulls that run no Nix, edits and moved branches
//! seen within their bounds, channels from a mirror, and a fresh machine.

mod common;

use common::{
    fresh_pkgs_copy, http_get, registry_error, run_ok, sha256_digest, NixWrappers, PkgsCopy,
    Server, StaticHttp,
};
use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

const ACCEPT: (&str, &str) = (
    "Accept",
    "application/vnd.docker.distribution.manifest.v2+json",
);

/// The digest of the manifest served for NAME:TAG; panics unless it is a 200.
fn digest(server: &Server, name: &str, tag: &str) -> String {
    let url = server.url(&format!("/v2/{name}/manifests/{tag}"));
    let (status, _, body) = http_get(&url, &[ACCEPT]);
    assert_eq!(
        status,
        200,
        "{url}: {}\n{}",
        String::from_utf8_lossy(&body),
        common::tail_lines(&server.log(), 30)
    );
    sha256_digest(&body)
}

/// Replaces `hello`'s greeting in a package set's default.nix.
fn edit_greeting(dir: &Path, greeting: &str) {
    let file = dir.join("default.nix");
    let text = fs::read_to_string(&file).unwrap();
    let start = text
        .find("scripts.hello = ''echo '")
        .expect("hello's script")
        + 24;
    let end = start + text[start..].find('\'').unwrap();
    let edited = format!("{}{greeting}{}", &text[..start], &text[end..]);
    assert_ne!(text, edited);
    fs::write(&file, edited).unwrap();
}

fn evaluations(nix: &NixWrappers) -> usize {
    nix.count("nix-instantiate")
}

#[test]
fn warm_pulls_run_no_nix_and_an_edit_is_seen_at_once_through_change_events() {
    let waited = warm_pulls_then_an_edit(&[]);
    assert!(
        waited < Duration::from_secs(5),
        "an edit took {waited:?} to be seen through change events"
    );
}

#[test]
fn warm_pulls_run_no_nix_and_an_edit_is_seen_within_the_poll_interval() {
    let waited = warm_pulls_then_an_edit(&[("NIXERY_SOURCE__WATCH_EVENTS", "false")]);
    // One interval plus one walk of a small tree; generous for a loaded machine.
    assert!(
        waited < Duration::from_secs(10),
        "an edit took {waited:?} to be seen (poll interval 1 s)"
    );
}

/// Pulls by tag while the package set is unchanged, which must run no Nix; then edits
/// it and returns how long it took until a pull served the edited image.
fn warm_pulls_then_an_edit(env: &[(&str, &str)]) -> Duration {
    let nix = NixWrappers::new();
    let bin = nix.bin_dir();
    let mut env = env.to_vec();
    env.extend([
        ("NIXERY_NIX__BIN_DIR", bin.as_str()),
        ("NIXERY_SOURCE__WATCH_INTERVAL_SECS", "1"),
    ]);
    let server = Server::start(&env);
    let first = digest(&server, "hello", "latest");
    let calls = nix.calls().len();
    assert!(evaluations(&nix) >= 1, "{:?}", nix.calls());

    // Warm pulls, also after the watcher has looked at the unchanged set again.
    for round in 0..3 {
        for _ in 0..20 {
            assert_eq!(digest(&server, "hello", "latest"), first);
        }
        assert_eq!(
            nix.calls().len(),
            calls,
            "round {round}: warm pulls ran Nix: {:?}",
            &nix.calls()[calls..]
        );
        thread::sleep(Duration::from_millis(1200));
    }

    edit_greeting(server.pkgs_path(), "Hello, edited world!");
    let edited = Instant::now();
    let mut stale = 0;
    let (changed, waited) = loop {
        let d = digest(&server, "hello", "latest");
        if d != first {
            break (d, edited.elapsed());
        }
        stale += 1;
        assert!(
            edited.elapsed() < Duration::from_secs(60),
            "the edit was not seen within 60 s"
        );
        thread::sleep(Duration::from_millis(20));
    };
    eprintln!("edit served after {waited:?}, {stale} pulls served the old image ({env:?})");
    assert!(
        server.log().contains("package set changed"),
        "{}",
        server.log()
    );
    let after = nix.calls().len();
    assert_eq!(digest(&server, "hello", "latest"), changed);
    assert_eq!(nix.calls().len(), after, "the edited image is warm too");
    assert_eq!(evaluations(&nix), 2, "{:?}", nix.calls());
    waited
}

/// A git repository holding a salted package set, on branch `main`.
struct Repo {
    pkgs: PkgsCopy,
}

impl Repo {
    fn new() -> Repo {
        let pkgs = fresh_pkgs_copy();
        let repo = Repo { pkgs };
        repo.git(&["init", "-q", "-b", "main"]);
        repo.commit("package set");
        repo
    }

    fn git(&self, args: &[&str]) -> String {
        let out = run_ok(
            Command::new("git")
                .arg("-C")
                .arg(self.pkgs.path())
                .args(["-c", "user.name=test", "-c", "user.email=test@localhost"])
                .args(args),
        );
        out.stdout.trim().to_string()
    }

    fn commit(&self, message: &str) -> String {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "-m", message]);
        self.git(&["rev-parse", "HEAD"])
    }

    fn url(&self) -> String {
        format!("file://{}", self.pkgs.path().display())
    }
}

#[test]
fn a_branch_moves_after_the_ref_ttl_and_commits_stay_put() {
    if !common::require_tool("git") {
        return;
    }
    let repo = Repo::new();
    let old = repo.git(&["rev-parse", "HEAD"]);
    let nix = NixWrappers::new();
    let (bin, url) = (nix.bin_dir(), repo.url());
    let server = Server::start(&[
        ("NIXERY_PKGS_PATH", ""),
        ("NIXERY_PKGS_REPO", url.as_str()),
        ("NIXERY_NIX__BIN_DIR", bin.as_str()),
        ("NIXERY_SOURCE__REF_TTL_SECS", "3"),
    ]);
    let main = digest(&server, "hello", "main");
    // latest (the remote HEAD), the branch and its commit are one image, built once.
    assert_eq!(digest(&server, "hello", "latest"), main);
    assert_eq!(digest(&server, "hello", &old), main);
    assert_eq!(evaluations(&nix), 1, "{:?}", nix.calls());

    edit_greeting(repo.pkgs.path(), "Hello from the new commit!");
    let new = repo.commit("new greeting");
    let moved = Instant::now();
    // Within the TTL the branch is trusted to stay where it was: no Nix, no git.
    assert_eq!(digest(&server, "hello", "main"), main);
    assert_eq!(evaluations(&nix), 1);
    thread::sleep(
        Duration::from_secs(3).saturating_sub(moved.elapsed()) + Duration::from_millis(200),
    );
    let after = digest(&server, "hello", "main");
    assert_ne!(after, main, "the branch moved to {new}, the image did not");
    assert_eq!(digest(&server, "hello", &new), after);
    assert_eq!(digest(&server, "hello", &old), main, "a commit is pinned");
    assert!(
        server.log().contains(&format!("moved to {new}")),
        "{}",
        server.log()
    );

    let url = server.url("/v2/hello/manifests/no-such-branch");
    let (status, h, body) = http_get(&url, &[ACCEPT]);
    let (code, message) = registry_error(404, status, &h, &body);
    assert_eq!(code, "MANIFEST_UNKNOWN");
    assert!(message.contains("no-such-branch"), "{message}");
    assert!(!message.contains(&repo.url()), "no server paths: {message}");

    let missing = "0123456789abcdef0123456789abcdef01234567";
    let url = server.url(&format!("/v2/hello/manifests/{missing}"));
    let (status, h, body) = http_get(&url, &[ACCEPT]);
    let (code, message) = registry_error(404, status, &h, &body);
    assert_eq!(code, "MANIFEST_UNKNOWN");
    assert!(message.contains(missing), "{message}");
}

/// A package set packed as a channel tarball (one top-level directory, as GitHub
/// serves them) in `dir`, named `NAME.tar.gz`.
fn channel_tarball(dir: &Path, name: &str) -> PkgsCopy {
    let pkgs = fresh_pkgs_copy();
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(pkgs.path().parent().unwrap())
            .arg("-czf")
            .arg(dir.join(format!("{name}.tar.gz")))
            .arg(pkgs.path().file_name().unwrap()),
    );
    pkgs
}

#[test]
fn a_channel_comes_from_a_mirror_over_http_or_from_a_file() {
    let mirror = tempfile::tempdir().unwrap();
    let _pkgs = channel_tarball(mirror.path(), "nixos-test");
    let http = StaticHttp::start(mirror.path());
    let template = format!("{}/{{channel}}.tar.gz", http.url());
    let server = Server::start(&[
        ("NIXERY_PKGS_PATH", ""),
        ("NIXERY_CHANNEL", "nixos-test"),
        ("NIXERY_SOURCE__CHANNEL_URL", template.as_str()),
    ]);
    let over_http = digest(&server, "hello", "latest");
    assert!(
        http.get_paths().iter().any(|p| p == "/nixos-test.tar.gz"),
        "the mirror was not asked: {}",
        http.log()
    );
    let out = common::pull_and_run(server.addr(), "hello", &["/bin/hello"]);
    assert!(out.stdout.contains("Hello, world!"), "{out}");
    // A channel has one version, latest: other tags do not exist.
    let (status, h, body) = http_get(&server.url("/v2/hello/manifests/24.11"), &[ACCEPT]);
    let (code, message) = registry_error(404, status, &h, &body);
    assert_eq!(code, "MANIFEST_UNKNOWN");
    assert!(message.contains("latest"), "{message}");

    let template = format!("file://{}/{{channel}}.tar.gz", mirror.path().display());
    let from_file = Server::start(&[
        ("NIXERY_PKGS_PATH", ""),
        ("NIXERY_CHANNEL", "nixos-test"),
        ("NIXERY_SOURCE__CHANNEL_URL", template.as_str()),
    ]);
    assert_eq!(digest(&from_file, "hello", "latest"), over_http);

    // A channel the mirror does not have is a clear answer naming it.
    let missing = Server::start(&[
        ("NIXERY_PKGS_PATH", ""),
        ("NIXERY_CHANNEL", "nixos-missing"),
        ("NIXERY_SOURCE__CHANNEL_URL", template.as_str()),
    ]);
    let (status, h, body) = http_get(&missing.url("/v2/hello/manifests/latest"), &[ACCEPT]);
    let (_, message) = registry_error(400, status, &h, &body);
    assert!(message.contains("nixos-missing.tar.gz"), "{message}");
}

#[test]
fn tags_list_names_the_tags_served_and_pages_with_link_headers() {
    if !common::require_tool("git") {
        return;
    }
    let repo = Repo::new();
    for branch in ["v1", "v2"] {
        repo.git(&["branch", branch]);
    }
    let url = repo.url();
    let server = Server::start(&[("NIXERY_PKGS_PATH", ""), ("NIXERY_PKGS_REPO", url.as_str())]);
    let list = |query: &str| {
        let (status, h, body) = http_get(&server.url(&format!("/v2/hello/tags/list{query}")), &[]);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let tags: Vec<String> = v["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        (tags, h.get("link").map(str::to_string))
    };
    assert_eq!(list("").0, ["latest"], "nothing served yet");
    for tag in ["v2", "main", "v1", "latest"] {
        digest(&server, "hello", tag);
    }
    assert_eq!(list("").0, ["latest", "main", "v1", "v2"]);

    // Walk the pages one tag at a time, as a client following Link would.
    let mut walked = Vec::new();
    let mut query = "?n=1".to_string();
    loop {
        let (tags, link) = list(&query);
        assert_eq!(tags.len(), 1, "{query}");
        walked.extend(tags);
        let Some(link) = link else { break };
        let target = link
            .strip_prefix("</v2/hello/tags/list")
            .and_then(|l| l.strip_suffix(">; rel=\"next\""))
            .unwrap_or_else(|| panic!("Link header {link:?}"));
        query = target.to_string();
        assert!(walked.len() < 10, "pages do not end");
    }
    assert_eq!(walked, ["latest", "main", "v1", "v2"]);
    assert_eq!(list("?last=main").0, ["v1", "v2"]);
    let (status, h, body) = http_get(&server.url("/v2/hello/tags/list?n=many"), &[]);
    registry_error(400, status, &h, &body);
}
