//! The page at `/` in a real headless browser: a slow build shows up with its image
//! name and phase while it runs, and a failure with Nix's message, HTML-escaped.

mod common;

use common::{http_get, require_tool, Server};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

fn chromium(args: &[&str], profile: &Path) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn page_shows_live_builds_and_failures() {
    if !require_tool("chromium") {
        return;
    }
    let server = Server::start(&[("NIX_TIMEOUT", "120")]);
    let slow_url = server.url("/v2/slow/manifests/latest");
    // The request ends with an error when the server stops first; that is fine.
    let slow = thread::spawn(move || {
        common::http_request("GET", &slow_url, &[], Duration::from_secs(300)).map(|r| r.0)
    });
    // Wait until the build is past evaluation.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, _, body) = http_get(&server.url("/builds/slow"), &[]);
        if String::from_utf8_lossy(&body).contains("\"phase\":\"building ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slow build never reached building"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let profile = tempfile::tempdir().unwrap();
    let dom = chromium(
        &["--virtual-time-budget=4000", "--dump-dom", &server.url("/")],
        profile.path(),
    );
    let row = dom
        .split("<tr class=\"build\">")
        .nth(1)
        .unwrap_or_else(|| panic!("no build row in the page:\n{dom}"));
    assert!(row.contains("<td>slow</td>"), "{row}");
    // "building N of M derivations", read from Nix's output as it builds.
    let phase = row
        .split("<td class=\"phase\">")
        .nth(1)
        .and_then(|p| p.split("</td>").next())
        .unwrap_or_else(|| panic!("no phase cell: {row}"));
    let words: Vec<&str> = phase.split_whitespace().collect();
    assert!(
        matches!(words.as_slice(), ["building", n, "of", m, "derivations"]
            if n.parse::<u32>().is_ok() && m.parse::<u32>().is_ok()),
        "{phase}"
    );
    assert!(row.contains("<progress"), "{row}");

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("nixery-builds.png");
    chromium(
        &[
            "--virtual-time-budget=4000",
            "--window-size=1000,900",
            &format!("--screenshot={}", shot.display()),
            &server.url("/"),
        ],
        profile.path(),
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    println!("screenshot of the build page: {}", shot.display());

    // A failure shows with Nix's message, as text in the failures list.
    let (status, _, _) = http_get(&server.url("/v2/broken/manifests/latest"), &[]);
    assert_eq!(status, 400);
    let dom = chromium(
        &["--virtual-time-budget=4000", "--dump-dom", &server.url("/")],
        profile.path(),
    );
    let failures = dom
        .split("id=\"failures\"")
        .nth(1)
        .unwrap_or_else(|| panic!("no failures section:\n{dom}"));
    assert!(failures.contains("<summary>broken at "), "{failures}");
    assert!(
        failures.contains("deliberately fails to build"),
        "{failures}"
    );
    drop(server);
    let _ = slow.join();
}
