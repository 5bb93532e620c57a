//! Black-box tests with hostile clients (issue 5): malicious names, tags and
//! digests, unknown routes and methods, oversized and malformed request heads, and
//! slow-loris connections. Every request is sent as raw bytes over a `TcpStream`,
//! so no HTTP library normalises or encodes the path on the way.
//!
//! Each case must be answered with the right registry error (status, and for
//! everything the application sees, the JSON envelope's `errors[0].code`), nothing
//! hostile may reach Nix (counting wrappers around `nix-instantiate` and
//! `nix-store` in `nix.bin_dir` must log no call), and the server must still answer
//! `GET /v2/` at the end of each test.
//!
//! Requests that the HTTP codec itself refuses before the application sees them
//! (bytes not allowed in a request line, more headers than the codec's table, heads
//! beyond its buffer) are answered by actix-http with a bare status and no body;
//! those cases accept a bare 4xx and are listed separately.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::{http_request, sha256_digest, Headers, NixWrappers, Server};

// ---------------------------------------------------------------------------
// Helpers

/// The one assertion these tests make of the counting wrappers.
trait NoNix {
    fn assert_none(&self, what: &str);
}

impl NoNix for NixWrappers {
    fn assert_none(&self, what: &str) {
        let calls = self.calls();
        assert!(
            calls.is_empty(),
            "{what} reached Nix ({} calls):\n{}",
            calls.len(),
            self.log_text()
        );
    }
}

/// What came back for one raw request.
#[derive(Debug)]
struct Raw {
    status: Option<u16>,
    headers: Headers,
    body: Vec<u8>,
    /// Set when reading ended with an error (reset, timeout) instead of a response.
    error: Option<String>,
}

impl Raw {
    /// `errors[0].code` when the body is the registry's JSON error envelope.
    fn code(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        Some(v.get("errors")?.get(0)?.get("code")?.as_str()?.to_string())
    }

    fn summary(&self) -> String {
        match self.status {
            Some(s) => format!(
                "{s} {}",
                String::from_utf8_lossy(&self.body)
                    .chars()
                    .take(160)
                    .collect::<String>()
            ),
            None => format!(
                "no response ({})",
                self.error.as_deref().unwrap_or("closed")
            ),
        }
    }
}

/// Parses a response once it is complete: `Some` when the head is in and the body
/// is as long as Content-Length says (or the connection has ended).
fn parse_response(buf: &[u8], eof: bool) -> Option<(u16, Headers, Vec<u8>)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = Headers(
        lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect(),
    );
    let body = &buf[end + 4..];
    match headers
        .get("content-length")
        .and_then(|l| l.parse::<usize>().ok())
    {
        Some(len) if body.len() >= len => Some((status, headers, body[..len].to_vec())),
        Some(_) if !eof => None,
        None if !eof => None,
        _ => Some((status, headers, body.to_vec())),
    }
}

/// Sends `request` as is and reads one response (the request should ask for
/// `Connection: close`). Write errors are ignored: the server may answer and close
/// before a large request is sent.
fn raw(addr: &str, request: &[u8]) -> Raw {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let mut error = None;
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if parse_response(&buf, false).is_some() {
                    break;
                }
            }
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    match parse_response(&buf, true) {
        Some((status, headers, body)) => Raw {
            status: Some(status),
            headers,
            body,
            error: None,
        },
        None => Raw {
            status: None,
            headers: Headers::default(),
            body: buf,
            error,
        },
    }
}

fn request(method: &str, target: &[u8], extra: &str) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(method.as_bytes());
    r.push(b' ');
    r.extend_from_slice(target);
    r.extend_from_slice(b" HTTP/1.1\r\nHost: registry.test\r\nConnection: close\r\n");
    r.extend_from_slice(extra.as_bytes());
    r.extend_from_slice(b"\r\n");
    r
}

fn get(target: &str) -> Vec<u8> {
    request("GET", target.as_bytes(), "")
}

/// What a case must be answered with.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// This status and the JSON envelope with one of these codes (any code when
    /// the list is empty).
    Json(u16, &'static [&'static str]),
    /// Refused by the HTTP codec: any 4xx, body optional.
    Codec,
}

const NAME_INVALID: Expect = Expect::Json(400, &["NAME_INVALID"]);
const TAG_INVALID: Expect = Expect::Json(400, &["MANIFEST_INVALID", "TAG_INVALID"]);
const DIGEST_INVALID: Expect = Expect::Json(400, &["DIGEST_INVALID"]);
const DIGEST_UNSUPPORTED: Expect = Expect::Json(400, &["UNSUPPORTED", "DIGEST_INVALID"]);
const NO_ROUTE: Expect = Expect::Json(404, &["UNSUPPORTED", "NAME_UNKNOWN"]);
const NOT_ALLOWED: Expect = Expect::Json(405, &["UNSUPPORTED"]);

fn check(got: &Raw, want: Expect) -> bool {
    match want {
        Expect::Json(status, codes) => {
            got.status == Some(status)
                && got
                    .headers
                    .get("content-type")
                    .is_some_and(|c| c.starts_with("application/json"))
                && got
                    .code()
                    .is_some_and(|c| codes.is_empty() || codes.contains(&c.as_str()))
        }
        Expect::Codec => got.status.is_some_and(|s| (400..500).contains(&s)),
    }
}

/// Runs every case, prints a table, and panics listing every wrong answer.
fn run_cases(server: &Server, cases: &[(String, Vec<u8>, Expect)]) -> usize {
    let mut wrong = Vec::new();
    for (label, req, want) in cases {
        let got = raw(server.addr(), req);
        let ok = check(&got, *want);
        eprintln!(
            "{} {label:<60} want {want:?}, got {}",
            if ok { "ok   " } else { "WRONG" },
            got.summary()
        );
        if !ok {
            wrong.push(format!("{label}: want {want:?}, got {}", got.summary()));
        }
    }
    eprintln!(
        "{} hostile cases, {} answered correctly",
        cases.len(),
        cases.len() - wrong.len()
    );
    assert!(
        wrong.is_empty(),
        "{} of {} cases answered wrongly:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
    cases.len()
}

fn assert_healthy(server: &Server) {
    let r = raw(server.addr(), &get("/v2/"));
    assert_eq!(
        r.status,
        Some(200),
        "GET /v2/ after the hostile requests: {}\nlog:\n{}",
        r.summary(),
        server.log()
    );
}

fn label(method: &str, target: &[u8]) -> String {
    let t: String = String::from_utf8_lossy(target)
        .chars()
        .map(|c| if c.is_control() { '·' } else { c })
        .collect();
    let t = if t.chars().count() > 50 {
        format!(
            "{}…({} bytes)",
            t.chars().take(40).collect::<String>(),
            target.len()
        )
    } else {
        t
    };
    format!("{method} {t}")
}

fn case(target: impl AsRef<[u8]>, want: Expect) -> (String, Vec<u8>, Expect) {
    let t = target.as_ref();
    (label("GET", t), request("GET", t, ""), want)
}

/// `n` distinct two-letter package names joined by `/`.
fn many_packages(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{}{}",
                (b'a' + (i / 26) as u8) as char,
                (b'a' + (i % 26) as u8) as char
            )
        })
        .collect::<Vec<_>>()
        .join("/")
}

const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

// ---------------------------------------------------------------------------
// Names, tags, digests and routes

#[test]
fn hostile_names_tags_digests_and_routes_never_reach_nix() {
    let nix = NixWrappers::new();
    let server = Server::start(&[("NIXERY_NIX__BIN_DIR", &nix.bin_dir())]);
    let m = |name: &str| format!("/v2/{name}/manifests/latest");
    let b = |digest: &str| format!("/v2/hello/blobs/{digest}");
    let md = |digest: &str| format!("/v2/hello/manifests/{digest}");
    let mut cases = vec![
        // Path traversal in names, plain and encoded.
        case(m(".."), NAME_INVALID),
        case(m("../../../../etc/passwd"), NAME_INVALID),
        case(m("hello/../.."), NAME_INVALID),
        case(m("./hello"), NAME_INVALID),
        case(m("%2e%2e"), NAME_INVALID),
        case(m("%2E%2E/%2E%2E/etc"), NAME_INVALID),
        case(m("..%2F..%2Fetc"), NAME_INVALID),
        case(m("a%2Fb"), NAME_INVALID),
        case(m("a%2fb"), NAME_INVALID),
        case(m("hello%00"), NAME_INVALID),
        case(m("hello%00.drv"), NAME_INVALID),
        case(m("%252e%252e"), NAME_INVALID),
        case("/v2/../blobs/sha256:".to_string() + HEX, NAME_INVALID),
        case("/v2/%2e%2e/tags/list", NAME_INVALID),
        // Nix syntax and shell metacharacters.
        case(m("a;b"), NAME_INVALID),
        case(m("hello;id"), NAME_INVALID),
        case(m("${x}"), NAME_INVALID),
        case(m("$%7Bx%7D"), NAME_INVALID),
        case(m("hello.${builtins.currentSystem}"), NAME_INVALID),
        case(m("$(id)"), NAME_INVALID),
        case(m("%24(id)"), NAME_INVALID),
        case(m("a\"b"), NAME_INVALID),
        case(m("%22%3B%20id%20%23"), NAME_INVALID),
        case(m("%60id%60"), NAME_INVALID),
        case(m("a|b"), NAME_INVALID),
        case(m("a&b"), NAME_INVALID),
        case(m("a'b"), NAME_INVALID),
        case(m("a\\b"), NAME_INVALID),
        case(m("a%20b"), NAME_INVALID),
        case(m("a%0Ab"), NAME_INVALID),
        case(m("(import%3Cnixpkgs%3E%7B%7D).hello"), NAME_INVALID),
        case(m("hello.override{}"), NAME_INVALID),
        case(m("builtins.readFile"), NAME_INVALID),
        case(m("a*b"), NAME_INVALID),
        case(m("~root"), NAME_INVALID),
        // Upper case, empty and malformed components.
        case(m("Hello"), NAME_INVALID),
        case(m("HELLO"), NAME_INVALID),
        case(m("hello/Cowsay"), NAME_INVALID),
        case(m("bashInteractive"), NAME_INVALID),
        case("/v2//manifests/latest", NAME_INVALID),
        case(m("a//b"), NAME_INVALID),
        case(m("-a"), NAME_INVALID),
        case(m("a-"), NAME_INVALID),
        case(m("a___b"), NAME_INVALID),
        case(m("hello/"), NAME_INVALID),
        // Over-long names and too many components.
        case(m(&"a".repeat(256)), NAME_INVALID),
        case(m(&"a".repeat(5000)), NAME_INVALID),
        case(m(&format!("{}x", "a/".repeat(3000))), NAME_INVALID),
        // 65 distinct packages in 194 characters: over the default 64.
        case(m(&many_packages(65)), NAME_INVALID),
        // Tags.
        case(md(&"a".repeat(129)), TAG_INVALID),
        case(md(".."), TAG_INVALID),
        case(md("%2e%2e"), TAG_INVALID),
        case(md(".latest"), TAG_INVALID),
        case(md("-latest"), TAG_INVALID),
        case(md("lat%00est"), TAG_INVALID),
        case(md("$(id)"), TAG_INVALID),
        case(md("a;b"), TAG_INVALID),
        case(md(""), TAG_INVALID),
        // Digests.
        case(b("sha256:xyz"), DIGEST_INVALID),
        case(b(&format!("sha256:{}", &HEX[..63])), DIGEST_INVALID),
        case(b(&format!("sha256:{HEX}0")), DIGEST_INVALID),
        case(b(&format!("sha256:{}", HEX.to_uppercase())), DIGEST_INVALID),
        case(b(&format!("sha256:{}", "g".repeat(64))), DIGEST_INVALID),
        case(b("sha256:"), DIGEST_INVALID),
        case(b(&format!(":{HEX}")), DIGEST_INVALID),
        case(b(HEX), DIGEST_INVALID),
        case(b("latest"), DIGEST_INVALID),
        case(b(&format!("SHA256:{HEX}")), DIGEST_INVALID),
        case(b("sha256:..%2F..%2F..%2Fetc%2Fpasswd"), DIGEST_INVALID),
        case(b("sha256:%2e%2e"), DIGEST_INVALID),
        case(b(&format!("sha256:{}%00", &HEX[..62])), DIGEST_INVALID),
        case(b(&format!("sha256:{HEX}%00")), DIGEST_INVALID),
        case(b("..%2F..%2F..%2Fetc%2Fpasswd"), DIGEST_INVALID),
        case(md("sha256:xyz"), DIGEST_INVALID),
        case(md(&format!("sha256:{}", &HEX[..63])), DIGEST_INVALID),
        case(md("sha256:..%2F..%2Fblobs"), DIGEST_INVALID),
        case(
            b("md5:d41d8cd98f00b204e9800998ecf8427e"),
            DIGEST_UNSUPPORTED,
        ),
        case(b(&format!("sha512:{HEX}{HEX}")), DIGEST_UNSUPPORTED),
        case(
            md("md5:d41d8cd98f00b204e9800998ecf8427e"),
            DIGEST_UNSUPPORTED,
        ),
        // Well-formed digests that are not stored.
        case(
            b(&format!("sha256:{}", "0".repeat(64))),
            Expect::Json(404, &["BLOB_UNKNOWN"]),
        ),
        case(
            md(&format!("sha256:{}", "0".repeat(64))),
            Expect::Json(404, &["MANIFEST_UNKNOWN"]),
        ),
        // Unknown routes.
        case("/v2/_catalog", NO_ROUTE),
        case("/v2/x/blobs/uploads/", NO_ROUTE),
        case("/v2/x/blobs/uploads/0123-4567", NO_ROUTE),
        // The referrers API answers every well-formed digest; a malformed one is 400.
        case("/v2/hello/referrers/sha256:xyz", DIGEST_INVALID),
        case("/v2/hello", NO_ROUTE),
        case("/v2/hello/manifests", NO_ROUTE),
        case("/v2/hello/blobs/sha256:../../../../etc/passwd", NO_ROUTE),
        case("/v2/../v2/", NO_ROUTE),
        case("/v3/", NO_ROUTE),
        case("/foo", NO_ROUTE),
        case("/../../etc/passwd", NO_ROUTE),
        case("/v2/hello/manifests/latest/../../../etc", NO_ROUTE),
        (
            "POST /v2/x/blobs/uploads/".to_string(),
            request("POST", b"/v2/x/blobs/uploads/", "Content-Length: 0\r\n"),
            NOT_ALLOWED,
        ),
        // Thousands of components in a head over the default 16 KiB limit.
        case(
            m(&format!("{}x", "a/".repeat(10000))),
            Expect::Json(431, &[]),
        ),
    ];
    // The same names as tags/list and blob routes.
    for name in ["..", "%2e%2e", "a;b", "Hello", "$(id)"] {
        cases.push(case(format!("/v2/{name}/tags/list"), NAME_INVALID));
        cases.push(case(format!("/v2/{name}/blobs/sha256:{HEX}"), NAME_INVALID));
    }
    let n = run_cases(&server, &cases);
    nix.assert_none(&format!("one of {n} hostile requests"));
    assert_healthy(&server);
}

// ---------------------------------------------------------------------------
// Bytes the HTTP codec refuses

#[test]
fn malformed_requests_are_refused_and_the_server_survives() {
    let nix = NixWrappers::new();
    // An empty request is a stalled one (leading empty lines are skipped): keep
    // the client request timeout short so it is cut off quickly.
    let server = Server::start(&[
        ("NIXERY_NIX__BIN_DIR", &nix.bin_dir()),
        ("NIXERY_SERVER__CLIENT_REQUEST_TIMEOUT_SECS", "3"),
    ]);
    let raw_case = |l: &str, bytes: Vec<u8>| (l.to_string(), bytes, Expect::Codec);
    let many_headers: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let mut garbage = Vec::new();
    let mut x: u32 = 12345;
    for _ in 0..4096 {
        x = x.wrapping_mul(1103515245).wrapping_add(12345);
        garbage.push((x >> 16) as u8);
    }
    let cases = vec![
        raw_case(
            "NUL byte in the name",
            request("GET", b"/v2/a\0b/manifests/latest", ""),
        ),
        raw_case(
            "backticks in the name",
            request("GET", b"/v2/`id`/manifests/latest", ""),
        ),
        raw_case(
            "DEL in the name",
            request("GET", b"/v2/a\x7fb/manifests/latest", ""),
        ),
        raw_case(
            "UTF-8 in the name",
            request("GET", "/v2/hällo/manifests/latest".as_bytes(), ""),
        ),
        raw_case(
            "tab in the name",
            request("GET", b"/v2/a\tb/manifests/latest", ""),
        ),
        raw_case(
            "NUL in a digest",
            request("GET", b"/v2/hello/blobs/sha256:..\0", ""),
        ),
        raw_case(
            "relative request target",
            request("GET", b"v2/hello/manifests/latest", ""),
        ),
        (
            "empty request".to_string(),
            b"\r\n\r\n".to_vec(),
            Expect::Codec,
        ), // 408
        raw_case("no HTTP version", b"GET /v2/\r\n\r\n".to_vec()),
        raw_case("HTTP/9.9", b"GET /v2/ HTTP/9.9\r\nHost: x\r\n\r\n".to_vec()),
        raw_case(
            "negative Content-Length",
            request("GET", b"/v2/", "Content-Length: -1\r\n"),
        ),
        raw_case(
            "Content-Length and chunked",
            request(
                "POST",
                b"/v2/",
                "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            ),
        ),
        raw_case(
            "two Content-Lengths",
            request("GET", b"/v2/", "Content-Length: 1\r\nContent-Length: 2\r\n"),
        ),
        raw_case(
            "space in a header name",
            request("GET", b"/v2/", "Bad Header: x\r\n"),
        ),
        raw_case(
            "NUL in a header value",
            request("GET", b"/v2/", "X-A: a\0b\r\n"),
        ),
        raw_case("200 headers", request("GET", b"/v2/", &many_headers)),
        raw_case(
            "2 MiB header",
            request(
                "GET",
                b"/v2/",
                &format!("X-Big: {}\r\n", "x".repeat(2 << 20)),
            ),
        ),
        raw_case("binary garbage", garbage),
        raw_case("TLS ClientHello", {
            let mut hello = vec![
                0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
            ];
            hello.extend_from_slice(&[0x42; 160]);
            hello
        }),
    ];
    let n = run_cases(&server, &cases);
    nix.assert_none(&format!("one of {n} malformed requests"));
    assert_healthy(&server);
}

// ---------------------------------------------------------------------------
// Methods

#[test]
fn every_method_on_a_manifest_url() {
    let nix = NixWrappers::new();
    let server = Server::start(&[("NIXERY_NIX__BIN_DIR", &nix.bin_dir())]);
    let target = b"/v2/hello/manifests/latest";
    let body = "Content-Type: application/vnd.docker.distribution.manifest.v2+json\r\nContent-Length: 2\r\n";
    let mut cases = Vec::new();
    for method in [
        "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND", "FOO",
    ] {
        let mut req = request(method, target, body);
        req.extend_from_slice(b"{}");
        cases.push((label(method, target), req, NOT_ALLOWED));
    }
    for (method, t) in [
        ("DELETE", format!("/v2/hello/blobs/sha256:{HEX}")),
        ("PUT", format!("/v2/hello/manifests/sha256:{HEX}")),
        ("POST", "/v2/".to_string()),
    ] {
        cases.push((
            label(method, t.as_bytes()),
            request(method, t.as_bytes(), "Content-Length: 0\r\n"),
            NOT_ALLOWED,
        ));
    }
    let n = run_cases(&server, &cases);
    nix.assert_none(&format!("one of {n} requests with a write method"));

    // GET and HEAD work and agree.
    let get = raw(server.addr(), &request("GET", target, ""));
    assert_eq!(get.status, Some(200), "GET: {}", get.summary());
    let digest = get
        .headers
        .get("docker-content-digest")
        .expect("digest")
        .to_string();
    assert_eq!(digest, sha256_digest(&get.body));
    let (status, headers, _) = http_request(
        "HEAD",
        &server.url("/v2/hello/manifests/latest"),
        &[],
        Duration::from_secs(120),
    )
    .expect("HEAD");
    assert_eq!(status, 200);
    assert_eq!(headers.get("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(
        headers.get("content-length"),
        Some(get.body.len().to_string().as_str())
    );
    assert_healthy(&server);
}

// ---------------------------------------------------------------------------
// Request heads over the configured limit

#[test]
fn request_head_over_the_limit_gets_431_json() {
    let nix = NixWrappers::new();
    let server = Server::start(&[
        ("NIXERY_NIX__BIN_DIR", &nix.bin_dir()),
        ("NIXERY_LIMITS__MAX_HEADER_BYTES", "4096"),
    ]);
    let too_large = Expect::Json(431, &[]);
    let many: String = (0..60)
        .map(|i| format!("X-Header-{i:02}: {}\r\n", "v".repeat(80)))
        .collect();
    let cases = [
        (
            "one 5000-byte header".to_string(),
            request("GET", b"/v2/", &format!("X-Big: {}\r\n", "x".repeat(5000))),
            too_large,
        ),
        (
            "60 headers of 90 bytes".to_string(),
            request("GET", b"/v2/", &many),
            too_large,
        ),
        (
            "5000-byte path".to_string(),
            get(&format!("/v2/{}/manifests/latest", "a".repeat(5000))),
            too_large,
        ),
        (
            "5000-byte path, then a header".to_string(),
            request(
                "GET",
                format!("/v2/hello/manifests/latest?{}", "q".repeat(5000)).as_bytes(),
                "Accept: */*\r\n",
            ),
            too_large,
        ),
        (
            "3000-byte header (under the limit)".to_string(),
            request("GET", b"/v2/", &format!("X-Big: {}\r\n", "x".repeat(3000))),
            Expect::Json(200, &[]),
        ),
    ];
    // The last case is a 200 with body `{}`; check it by hand instead.
    let (under, over) = cases.split_at(cases.len() - 1);
    let n = run_cases(&server, under);
    let ok = raw(server.addr(), &over[0].1);
    assert_eq!(ok.status, Some(200), "{}: {}", over[0].0, ok.summary());
    nix.assert_none(&format!("one of {n} oversized requests"));
    assert_healthy(&server);
}

// ---------------------------------------------------------------------------
// Slow-loris

#[test]
fn slow_loris_connections_are_cut_off_and_do_not_block_others() {
    const STALLED: usize = 50;
    let nix = NixWrappers::new();
    let server = Server::start(&[
        ("NIXERY_NIX__BIN_DIR", &nix.bin_dir()),
        ("NIXERY_SERVER__CLIENT_REQUEST_TIMEOUT_SECS", "2"),
    ]);
    let addr = server.addr().to_string();
    let opened = Instant::now();
    let mut stalled = Vec::new();
    for i in 0..STALLED {
        let mut s = TcpStream::connect(&addr).expect("connect");
        // Most send a partial request line; some send nothing at all.
        if i % 5 != 4 {
            s.write_all(b"GET /v2/hel")
                .expect("write partial request line");
        }
        stalled.push(s);
    }
    // A client that trickles a valid head, one byte every 200 ms (about 6 s).
    let trickle = {
        let addr = addr.clone();
        thread::spawn(move || {
            let mut s = TcpStream::connect(&addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let started = Instant::now();
            for &byte in b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: yes\r\n\r\n".iter() {
                if s.write_all(&[byte]).is_err() {
                    return (
                        "cut off while sending (write failed)".to_string(),
                        started.elapsed(),
                    );
                }
                thread::sleep(Duration::from_millis(200));
            }
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            let first = String::from_utf8_lossy(&buf)
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
            (
                format!("sent it all, then got {first:?}"),
                started.elapsed(),
            )
        })
    };

    // Meanwhile a normal client is served promptly.
    thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let normal = raw(&addr, &get("/v2/"));
    let normal_time = t.elapsed();
    assert_eq!(
        normal.status,
        Some(200),
        "normal request: {}",
        normal.summary()
    );
    assert!(
        normal_time < Duration::from_millis(1500),
        "a normal request took {normal_time:?} next to {STALLED} stalled connections"
    );

    // Every stalled connection is closed after the client request timeout.
    let mut closed_after = Vec::new();
    let mut still_open = 0;
    let mut answers = std::collections::BTreeMap::<String, usize>::new();
    for mut s in stalled {
        let left = (opened + Duration::from_secs(8)).saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(10))))
            .unwrap();
        let mut buf = Vec::new();
        match s.read_to_end(&mut buf) {
            Ok(_) => {
                closed_after.push(opened.elapsed());
                let first = String::from_utf8_lossy(&buf)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                *answers
                    .entry(if first.is_empty() {
                        "(closed without answer)".into()
                    } else {
                        first
                    })
                    .or_default() += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                closed_after.push(opened.elapsed());
                *answers.entry("(reset)".into()).or_default() += 1;
            }
            Err(_) => still_open += 1,
        }
    }
    let latest = closed_after.iter().max().copied().unwrap_or_default();
    let earliest = closed_after.iter().min().copied().unwrap_or_default();
    let (trickle_outcome, trickle_time) = trickle.join().expect("trickle thread");
    eprintln!(
        "slow-loris: normal request in {normal_time:?}; {} of {STALLED} stalled connections closed \
         between {earliest:?} and {latest:?} ({answers:?}); trickle: {trickle_outcome} after {trickle_time:?}",
        closed_after.len()
    );
    assert_eq!(
        still_open, 0,
        "{still_open} stalled connections still open 8 s after opening"
    );
    assert!(
        earliest >= Duration::from_millis(1500),
        "stalled connections were closed after {earliest:?}, before the 2 s timeout"
    );
    assert!(
        latest <= Duration::from_secs(6),
        "last stalled connection closed after {latest:?}"
    );
    assert!(
        !trickle_outcome.contains("HTTP/1.1 200"),
        "a client trickling its head over {trickle_time:?} was served: {trickle_outcome}"
    );
    assert!(
        trickle_time < Duration::from_secs(6),
        "trickle client cut off after {trickle_time:?}"
    );
    nix.assert_none("a slow-loris connection");
    assert_healthy(&server);
}

// ---------------------------------------------------------------------------
// Too many packages

#[test]
fn too_many_packages_are_refused_before_nix() {
    let nix = NixWrappers::new();
    let server = Server::start(&[
        ("NIXERY_NIX__BIN_DIR", &nix.bin_dir()),
        ("NIXERY_LIMITS__MAX_PACKAGES", "3"),
    ]);
    let cases = vec![
        case(
            "/v2/hello/cowsay/alpha/beta/tools.figlet/manifests/latest",
            NAME_INVALID,
        ),
        case("/v2/hello/cowsay/alpha/beta/manifests/latest", NAME_INVALID),
        case("/v2/shell/hello/manifests/latest", NAME_INVALID),
        case(
            "/v2/hello/cowsay/alpha/beta/tools.figlet/tags/list",
            NAME_INVALID,
        ),
    ];
    let n = run_cases(&server, &cases);
    nix.assert_none(&format!("one of {n} requests with too many packages"));
    // Duplicates count once, and three packages are fine.
    let r = raw(
        server.addr(),
        &get("/v2/hello/cowsay/alpha/hello/cowsay/manifests/latest"),
    );
    assert_eq!(
        r.status,
        Some(200),
        "three distinct packages: {}",
        r.summary()
    );
    assert_healthy(&server);
}

// ---------------------------------------------------------------------------
// Names that pass the grammar but look like Nix

#[test]
fn nix_looking_valid_names_are_looked_up_as_data() {
    let nix = NixWrappers::new();
    let server = Server::start(&[("NIXERY_NIX__BIN_DIR", &nix.bin_dir())]);
    let names = [
        "builtins.abort",
        "builtins",
        "import",
        "runcommand",
        "hello.drvpath",
        "hello.outpath",
        "tools",
        "throw",
        "a.b.c.d.e.f",
    ];
    let mut wrong = Vec::new();
    for name in names {
        let r = raw(server.addr(), &get(&format!("/v2/{name}/manifests/latest")));
        let message = serde_json::from_slice::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|v| v["errors"][0]["message"].as_str().map(String::from))
            .unwrap_or_default();
        let ok = r.status == Some(404)
            && r.code().as_deref() == Some("MANIFEST_UNKNOWN")
            && message.contains(name);
        eprintln!(
            "{} {name:<20} {}",
            if ok { "ok   " } else { "WRONG" },
            r.summary()
        );
        if !ok {
            wrong.push(format!("{name}: {}", r.summary()));
        }
    }
    assert!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));
    assert_eq!(
        nix.count("nix-instantiate"),
        names.len(),
        "{}",
        nix.log_text()
    );
    assert_eq!(
        nix.count("nix-store"),
        0,
        "a name that is no package was built: {}",
        nix.log_text()
    );
    assert_healthy(&server);
}
