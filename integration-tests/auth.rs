//! Black-box acceptance tests of pull authentication (Docker's token flow with an
//! htpasswd file and HS256 tokens), the anonymous policies, per-client pull and
//! build limits, and the restricted `/metrics` and `/builds` pages.
//!
//! Configuration is the environment (`NIXERY_AUTH__*`, `NIXERY_LIMITS__*`,
//! `NIXERY_SERVER__METRICS_LISTEN`). Every server here is plain HTTP on
//! 127.0.0.1 (docker treats 127.0.0.0/8 as insecure; podman, skopeo and ctr are
//! told to use HTTP); `integration-tests/tls.rs` does the same over TLS.
//!
//! Tokens are checked with the key the test wrote, and forged with it or with
//! other keys (jsonwebtoken), so a test knows exactly what the server must accept.
//! Client messages quoted here were observed with docker 20.10 (CLI 28.2),
//! podman 4.3, skopeo 1.9 and ctr 1.6.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{json, Value};

use common::{
    basic_auth, bearer_auth, chroot, cimage_command, fetch_token, free_port, podman_command,
    random_hex, registry_error, request_token, require_fake_gcs, require_root, require_tool,
    run_fail, run_ok, run_with_timeout, server_get, server_request, sha256_digest, AuthFiles,
    CmdOutput, Containerd, Dockerd, FakeGcs, Headers, Server,
};

const ALICE: (&str, &str) = ("alice", "alice-Pw-7f3k");
const BOB: (&str, &str) = ("bob", "bob-Pw-92jd");
const DOCKER_V2S2: &str = "application/vnd.docker.distribution.manifest.v2+json";
const SERVICE: &str = "nixery";

type Response = (u16, Headers, Vec<u8>);

// ---------------------------------------------------------------------------
// Helpers

fn require_all(tools: &[&str]) -> bool {
    let mut ok = require_root();
    for t in tools {
        ok &= require_tool(t);
    }
    ok
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// GET with an optional `Authorization` value (and the Docker manifest type in
/// `Accept`, which only manifest routes read).
fn get(server: &Server, path: &str, authorization: Option<&str>) -> Response {
    let mut headers = vec![("Accept", DOCKER_V2S2)];
    if let Some(a) = authorization {
        headers.push(("Authorization", a));
    }
    server_get(server, path, &headers)
}

fn head(server: &Server, path: &str, authorization: Option<&str>) -> (u16, Headers) {
    let mut headers = vec![("Accept", DOCKER_V2S2)];
    if let Some(a) = authorization {
        headers.push(("Authorization", a));
    }
    let (status, h, _) = server_request(server, "HEAD", path, &headers);
    (status, h)
}

fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

/// The exact challenge the server must send: `Bearer realm=…,service=…[,scope=…]`.
fn challenge(server: &Server, repository: Option<&str>) -> String {
    let mut c = format!(
        "Bearer realm=\"{}\",service=\"{SERVICE}\"",
        server.url("/token")
    );
    if let Some(name) = repository {
        c.push_str(&format!(",scope=\"repository:{name}:pull\""));
    }
    c
}

/// 401, registry error `UNAUTHORIZED`, and exactly `expected` as the challenge.
/// Returns the error message.
fn assert_challenged(what: &str, r: &Response, expected: &str) -> String {
    let (status, h, body) = r;
    assert_eq!(*status, 401, "{what}: {}", text(body));
    let (code, message) = registry_error(401, *status, h, body);
    assert_eq!(code, "UNAUTHORIZED", "{what}: {message}");
    let challenges = h.get_all("www-authenticate");
    assert_eq!(
        challenges,
        vec![expected],
        "{what}: WWW-Authenticate must be exactly one Bearer challenge"
    );
    message
}

/// The Bearer challenge of `server` for `repository` (none for `/v2/`).
fn assert_bearer(what: &str, server: &Server, r: &Response, repository: Option<&str>) -> String {
    assert_challenged(what, r, &challenge(server, repository))
}

/// 401 `UNAUTHORIZED` with `WWW-Authenticate: Basic realm="nixery"`.
fn assert_basic_challenge(what: &str, r: &Response) -> String {
    assert_challenged(what, r, "Basic realm=\"nixery\"")
}

/// A token's claims, verified with `key` as the server must sign them: HS256,
/// issuer `nixery`, audience `audience`, inside its validity.
fn verified_claims(token: &str, key: &[u8], audience: &str) -> Value {
    let header = jsonwebtoken::decode_header(token).unwrap_or_else(|e| panic!("{e}: {token}"));
    assert_eq!(header.alg, Algorithm::HS256, "{header:?}");
    assert_eq!(header.typ.as_deref(), Some("JWT"), "{header:?}");
    let mut v = Validation::new(Algorithm::HS256);
    v.set_audience(&[audience]);
    v.set_issuer(&["nixery"]);
    v.validate_nbf = true;
    v.leeway = 5;
    v.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
    jsonwebtoken::decode::<Value>(token, &DecodingKey::from_secret(key), &v)
        .unwrap_or_else(|e| panic!("token does not verify with the key file ({e}): {token}"))
        .claims
}

/// `[{"type":"repository","name":N,"actions":["pull"]}, …]`.
fn pull_access(names: &[&str]) -> Value {
    Value::Array(
        names
            .iter()
            .map(|n| json!({"type": "repository", "name": n, "actions": ["pull"]}))
            .collect(),
    )
}

/// The access list of a token as a sorted list of (type, name, actions).
fn access_set(claims: &Value) -> Vec<String> {
    let mut v: Vec<String> = claims["access"]
        .as_array()
        .unwrap_or_else(|| panic!("access is not a list: {claims}"))
        .iter()
        .map(|a| a.to_string())
        .collect();
    v.sort();
    v
}

/// Claims as the server issues them, for forging tokens.
fn claims(sub: &str, audience: &str, names: &[&str]) -> Value {
    let t = now();
    json!({
        "iss": "nixery",
        "sub": sub,
        "aud": audience,
        "exp": t + 300,
        "nbf": t - 5,
        "iat": t,
        "jti": random_hex(),
        "access": pull_access(names),
    })
}

fn sign(claims: &Value, key: &[u8], alg: Algorithm) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(key))
        .expect("encode token")
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A token with any header, signed with HMAC-SHA256 and `key` whatever the
/// header says (an empty signature for `None`).
fn raw_token(header: &Value, claims: &Value, key: Option<&[u8]>) -> String {
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let sig = match key {
        Some(k) => {
            let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k);
            b64url(ring::hmac::sign(&k, input.as_bytes()).as_ref())
        }
        None => String::new(),
    };
    format!("{input}.{sig}")
}

/// Seconds since the epoch of an RFC 3339 time (`2026-11-30T00:17:53Z`,
/// fractions and offsets allowed).
fn rfc3339_unix(s: &str) -> Option<i64> {
    let re = regex_lite::Regex::new(
        r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$",
    )
    .unwrap();
    let c = re.captures(s)?;
    let n = |i: usize| c[i].parse::<i64>().ok();
    let (y, m, d) = (n(1)?, n(2)?, n(3)?);
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let mut t = days * 86400 + n(4)? * 3600 + n(5)? * 60 + n(6)?;
    let off = &c[8];
    if off != "Z" && off != "z" {
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let h: i64 = off[1..3].parse().ok()?;
        let mi: i64 = off[4..6].parse().ok()?;
        t -= sign * (h * 3600 + mi * 60);
    }
    Some(t)
}

/// Builds NAME:latest on the server as `user` (GET of its manifest with a token).
fn build_as(server: &Server, user: (&str, &str), name: &str) -> Value {
    let token = fetch_token(server, Some(user), &[name]);
    let (status, _, body) = get(
        server,
        &format!("/v2/{name}/manifests/latest"),
        Some(&bearer_auth(&token)),
    );
    assert_eq!(
        status,
        200,
        "building {name} as {}: {}",
        user.0,
        text(&body)
    );
    serde_json::from_slice(&body).expect("manifest JSON")
}

/// Panics unless the client's output mentions one of `needles` (case-insensitive).
fn assert_mentions(out: &CmdOutput, needles: &[&str], what: &str) {
    let all = out.combined().to_lowercase();
    assert!(
        needles.iter().any(|n| all.contains(&n.to_lowercase())),
        "{what}: the client's output mentions none of {needles:?}:\n{out}"
    );
}

/// The refusal of a new build to an anonymous client: the server's message must
/// say that a login is needed to build, and the client must show it.
fn assert_login_to_build(out: &CmdOutput, what: &str) {
    let all = out.combined().to_lowercase();
    assert!(
        (all.contains("log in") || all.contains("login"))
            && all.contains("build")
            && all.contains("unauthorized"),
        "{what}: expected `unauthorized: … log in … build …` in the client's output:\n{out}"
    );
}

/// The registry message of a 401 for an anonymous new build.
fn assert_login_to_build_message(message: &str, what: &str) {
    let m = message.to_lowercase();
    assert!(
        (m.contains("log in") || m.contains("login")) && m.contains("build"),
        "{what}: the message should say a login is needed to build: {message:?}"
    );
}

/// The value of `name{labels…}` in Prometheus text, labels in any order.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let (label_text, value) = if let Some(r) = rest.strip_prefix('{') {
            let end = r.find('}')?;
            (&r[..end], &r[end + 1..])
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            return None;
        };
        let pairs: Vec<(&str, &str)> = label_text
            .split(',')
            .filter_map(|p| {
                let (k, v) = p.split_once('=')?;
                Some((k.trim(), v.trim().trim_matches('"')))
            })
            .collect();
        if labels.iter().all(|l| pairs.contains(l)) {
            value.split_whitespace().next()?.parse().ok()
        } else {
            None
        }
    })
}

fn metrics_text(server: &Server) -> String {
    let (status, _, body) = server_get(server, "/metrics", &[]);
    assert_eq!(status, 200, "/metrics: {}", text(&body));
    text(&body)
}

/// The number before any `;` of a header such as `RateLimit-Remaining: 5;w=60`.
fn header_number(h: &Headers, name: &str) -> Option<u64> {
    h.get(name)?.split(';').next()?.trim().parse().ok()
}

// ---------------------------------------------------------------------------
// Without auth settings nothing changes

#[test]
fn without_auth_settings_the_registry_needs_no_credentials() {
    let server = Server::start(&[]);
    let (status, h, body) = get(&server, "/v2/", None);
    assert_eq!(status, 200, "{}", text(&body));
    assert_eq!(h.get("www-authenticate"), None, "{h:?}");
    let (status, h, body) = get(&server, "/v2/hello/tags/list", None);
    assert_eq!(status, 200, "{}", text(&body));
    assert_eq!(h.get("www-authenticate"), None, "{h:?}");
    // /metrics and /builds stay open.
    assert_eq!(server_get(&server, "/metrics", &[]).0, 200);
    assert_eq!(server_get(&server, "/builds", &[]).0, 200);
}

// ---------------------------------------------------------------------------
// Challenges and /token

#[test]
fn challenges_and_the_token_endpoint_under_each_policy() {
    let auth = AuthFiles::new(&[ALICE, BOB]);

    // --- `pull`, the default with an htpasswd file.
    let pull = Server::start(&auth.env(""));
    assert_bearer("GET /v2/", &pull, &get(&pull, "/v2/", None), None);
    let (status, h) = head(&pull, "/v2/", None);
    assert_eq!(status, 401, "HEAD /v2/");
    assert_eq!(
        h.get("www-authenticate"),
        Some(challenge(&pull, None).as_str())
    );

    let zero = format!("sha256:{}", "0".repeat(64));
    let routes = [
        ("/v2/hello/manifests/latest".to_string(), "hello"),
        (format!("/v2/hello/manifests/{zero}"), "hello"),
        (format!("/v2/hello/blobs/{zero}"), "hello"),
        ("/v2/hello/tags/list".to_string(), "hello"),
        (format!("/v2/hello/referrers/{zero}"), "hello"),
        (
            "/v2/shell/cowsay/manifests/latest".to_string(),
            "shell/cowsay",
        ),
        ("/v2/tools.figlet/tags/list".to_string(), "tools.figlet"),
    ];
    for (path, name) in &routes {
        assert_bearer(
            &format!("GET {path}"),
            &pull,
            &get(&pull, path, None),
            Some(name),
        );
        let (status, h) = head(&pull, path, None);
        assert_eq!(status, 401, "HEAD {path}");
        assert_eq!(
            h.get("www-authenticate"),
            Some(challenge(&pull, Some(name)).as_str()),
            "HEAD {path}"
        );
    }
    // Wrong Basic credentials on a registry route get the Bearer challenge too.
    // (Valid ones are not asserted either way: the server accepts them, for curl.)
    let alice_basic = basic_auth(ALICE.0, ALICE.1);
    assert_bearer(
        "wrong Basic credentials on a registry route",
        &pull,
        &get(
            &pull,
            "/v2/hello/tags/list",
            Some(&basic_auth(ALICE.0, "wrong")),
        ),
        Some("hello"),
    );

    // The realm names the host the client asked for.
    let (status, head) = raw_head(
        pull.addr(),
        b"GET /v2/hello/tags/list HTTP/1.1\r\nHost: registry.example:5000\r\nConnection: close\r\n\r\n",
    )
    .expect("a response");
    assert_eq!(status, 401, "{head}");
    let expected = "Bearer realm=\"http://registry.example:5000/token\",service=\"nixery\",scope=\"repository:hello:pull\"";
    assert!(
        head.lines()
            .any(|l| l.split_once(':').is_some_and(|(k, v)| k
                .eq_ignore_ascii_case("www-authenticate")
                && v.trim() == expected)),
        "expected WWW-Authenticate: {expected}\n{head}"
    );
    // containerd first POSTs the password as a form (OAuth2 password grant) and
    // falls back to GET /token on 400, 401, 404 or 405.
    let form = format!(
        "client_id=containerd-client&grant_type=password&password={}&scope=repository%3Ahello%3Apull&service=nixery&username=alice",
        ALICE.1
    );
    let post = format!(
        "POST /token HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
        pull.addr(),
        form.len()
    );
    let status = raw_status(pull.addr(), post.as_bytes());
    assert!(
        matches!(status, Ok(200 | 400 | 401 | 404 | 405)),
        "POST /token as containerd sends it: {status:?}"
    );

    // A token for a user, as docker asks for it.
    let before = now();
    let (status, h, body) = request_token(&pull, SERVICE, Some(ALICE), &["hello"]);
    let after = now();
    assert_eq!(status, 200, "/token as alice: {}", text(&body));
    assert!(
        h.get("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{h:?}"
    );
    let v: Value = serde_json::from_slice(&body).expect("token JSON");
    let token = v["token"].as_str().expect("token").to_string();
    assert_eq!(v["access_token"].as_str(), Some(token.as_str()), "{v}");
    assert_eq!(v["expires_in"].as_i64(), Some(300), "{v}");
    let issued_at = v["issued_at"].as_str().expect("issued_at");
    let issued = rfc3339_unix(issued_at)
        .unwrap_or_else(|| panic!("issued_at is not RFC 3339: {issued_at:?}"));
    assert!(
        (before - 2..=after + 2).contains(&issued),
        "issued_at {issued_at} is not now"
    );
    let c = verified_claims(&token, auth.key(), SERVICE);
    assert_eq!(c["iss"], "nixery", "{c}");
    assert_eq!(c["sub"], "alice", "{c}");
    assert!(
        c["aud"] == SERVICE || c["aud"] == json!([SERVICE]),
        "aud must be the service: {c}"
    );
    let iat = c["iat"].as_i64().expect("iat");
    assert!((before - 2..=after + 2).contains(&iat), "iat: {c}");
    assert!((iat - issued).abs() <= 1, "issued_at and iat differ: {c}");
    assert_eq!(c["exp"].as_i64(), Some(iat + 300), "exp: {c}");
    assert!(c["nbf"].as_i64().expect("nbf") <= iat, "nbf: {c}");
    let jti = c["jti"].as_str().expect("jti").to_string();
    assert!(!jti.is_empty(), "{c}");
    assert_eq!(c["access"], pull_access(&["hello"]), "{c}");
    let again = fetch_token(&pull, Some(ALICE), &["hello"]);
    let c2 = verified_claims(&again, auth.key(), SERVICE);
    assert_ne!(c2["jti"].as_str(), Some(jti.as_str()), "jti repeats");

    // The token opens /v2/ and its repository, and nothing else.
    let alice = bearer_auth(&token);
    let (status, _, body) = get(&pull, "/v2/", Some(&alice));
    assert_eq!(status, 200, "/v2/ with a token: {}", text(&body));
    let (status, _, body) = get(&pull, "/v2/hello/tags/list", Some(&alice));
    assert_eq!(status, 200, "tags/list with a token: {}", text(&body));
    assert_bearer(
        "a token for hello on cowsay",
        &pull,
        &get(&pull, "/v2/cowsay/tags/list", Some(&alice)),
        Some("cowsay"),
    );
    assert_bearer(
        "a token for hello on shell/hello",
        &pull,
        &get(&pull, "/v2/shell/hello/manifests/latest", Some(&alice)),
        Some("shell/hello"),
    );

    // Several scopes; a nested name.
    let t = fetch_token(&pull, Some(ALICE), &["hello", "shell/cowsay"]);
    let c = verified_claims(&t, auth.key(), SERVICE);
    assert_eq!(
        access_set(&c),
        access_set(&json!({"access": pull_access(&["hello", "shell/cowsay"])})),
        "{c}"
    );
    let (status, _, body) = get(&pull, "/v2/shell/cowsay/tags/list", Some(&bearer_auth(&t)));
    assert_eq!(status, 200, "{}", text(&body));
    // The scope unescaped, as a hand-written URL has it.
    let (status, _, body) = server_get(
        &pull,
        "/token?service=nixery&scope=repository:shell/cowsay:pull",
        &[("Authorization", &alice_basic)],
    );
    assert_eq!(status, 200, "{}", text(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    let c = verified_claims(v["token"].as_str().unwrap(), auth.key(), SERVICE);
    assert_eq!(c["access"], pull_access(&["shell/cowsay"]), "{c}");
    // No scope, with account=, as `podman login` asks: an empty access list that
    // still opens /v2/.
    let (status, _, body) = server_get(
        &pull,
        "/token?account=alice&service=nixery",
        &[("Authorization", &alice_basic)],
    );
    assert_eq!(status, 200, "{}", text(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    let login = v["token"].as_str().expect("token");
    let c = verified_claims(login, auth.key(), SERVICE);
    assert_eq!(c["access"], json!([]), "{c}");
    assert_eq!(c["sub"], "alice", "{c}");
    assert_eq!(get(&pull, "/v2/", Some(&bearer_auth(login))).0, 200);
    assert_bearer(
        "an empty-access token on a repository",
        &pull,
        &get(&pull, "/v2/hello/tags/list", Some(&bearer_auth(login))),
        Some("hello"),
    );
    // A read-only registry never grants push.
    let (status, _, body) = server_get(
        &pull,
        "/token?service=nixery&scope=repository%3Ahello%3Apull%2Cpush",
        &[("Authorization", &alice_basic)],
    );
    assert!(status < 500, "pull,push scope: {status} {}", text(&body));
    if status == 200 {
        let v: Value = serde_json::from_slice(&body).unwrap();
        let c = verified_claims(v["token"].as_str().unwrap(), auth.key(), SERVICE);
        assert!(!c["access"].to_string().contains("push"), "{c}");
    }

    // Wrong passwords and unknown users: the same answer.
    for (user, password) in [
        (ALICE.0, "wrong"),
        (ALICE.0, ""),
        (ALICE.0, BOB.1),
        ("mallory", ALICE.1),
    ] {
        let what = format!("/token as {user}:{password}");
        let message = assert_basic_challenge(
            &what,
            &request_token(&pull, SERVICE, Some((user, password)), &["hello"]),
        );
        assert!(
            message.contains("invalid username or password"),
            "{what}: {message}"
        );
    }

    // Anonymous under `pull`: a token with an empty subject.
    let anon = fetch_token(&pull, None, &["hello"]);
    let c = verified_claims(&anon, auth.key(), SERVICE);
    assert_eq!(c["sub"], "", "{c}");
    assert_eq!(c["access"], pull_access(&["hello"]), "{c}");
    assert_eq!(get(&pull, "/v2/", Some(&bearer_auth(&anon))).0, 200);
    assert_eq!(
        get(&pull, "/v2/hello/tags/list", Some(&bearer_auth(&anon))).0,
        200
    );
    // ... which cannot build: hello is not built on this server yet.
    let r = get(
        &pull,
        "/v2/hello/manifests/latest",
        Some(&bearer_auth(&anon)),
    );
    let message = assert_bearer("anonymous new build", &pull, &r, Some("hello"));
    assert_login_to_build_message(&message, "anonymous new build under pull");
    // That refusal was the anonymous caller's, not the image's: a user asking right
    // after has it built, and then anonymous callers get it too.
    let (status, _, body) = get(&pull, "/v2/hello/manifests/latest", Some(&alice));
    assert_eq!(
        status,
        200,
        "alice, right after an anonymous caller was refused the same build: {}",
        text(&body)
    );
    let (status, _, body) = get(
        &pull,
        "/v2/hello/manifests/latest",
        Some(&bearer_auth(&anon)),
    );
    assert_eq!(status, 200, "anonymous, once built: {}", text(&body));

    // --- `build`, with its own service, realm and token lifetime.
    let service = format!("nixery-{}", random_hex());
    let realm = "https://auth.example.test/token";
    let mut env = auth.env("build");
    env.extend([
        ("NIXERY_AUTH__SERVICE", service.as_str()),
        ("NIXERY_AUTH__REALM", realm),
        ("NIXERY_AUTH__TOKEN_TTL_SECS", "120"),
    ]);
    let build = Server::start(&env);
    assert_challenged(
        "GET /v2/ (build)",
        &get(&build, "/v2/", None),
        &format!("Bearer realm=\"{realm}\",service=\"{service}\""),
    );
    assert_challenged(
        "GET manifest (build)",
        &get(&build, "/v2/hello/manifests/latest", None),
        &format!("Bearer realm=\"{realm}\",service=\"{service}\",scope=\"repository:hello:pull\""),
    );
    let (status, _, body) = request_token(&build, &service, None, &["hello"]);
    assert_eq!(status, 200, "{}", text(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["expires_in"].as_i64(), Some(120), "{v}");
    let anon = v["token"].as_str().unwrap().to_string();
    let c = verified_claims(&anon, auth.key(), &service);
    assert_eq!(c["sub"], "", "{c}");
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        120,
        "{c}"
    );
    // Anonymous clients build as before.
    let (status, h, body) = get(
        &build,
        "/v2/hello/manifests/latest",
        Some(&bearer_auth(&anon)),
    );
    assert_eq!(
        status,
        200,
        "anonymous build under `build`: {}",
        text(&body)
    );
    assert_eq!(
        h.get("docker-content-digest"),
        Some(sha256_digest(&body).as_str())
    );
    // A token for another service's audience is not one of this server's.
    let other_aud = sign(
        &claims("alice", SERVICE, &["hello"]),
        auth.key(),
        Algorithm::HS256,
    );
    assert_challenged(
        "token for audience nixery on another service",
        &get(
            &build,
            "/v2/hello/tags/list",
            Some(&bearer_auth(&other_aud)),
        ),
        &format!("Bearer realm=\"{realm}\",service=\"{service}\",scope=\"repository:hello:pull\""),
    );

    // --- `none`: no token without credentials.
    let none = Server::start(&auth.env("none"));
    assert_bearer("GET /v2/ (none)", &none, &get(&none, "/v2/", None), None);
    for scopes in [&["hello"][..], &[][..]] {
        assert_basic_challenge(
            "anonymous /token under none",
            &request_token(&none, SERVICE, None, scopes),
        );
    }
    let message = assert_basic_challenge(
        "wrong password under none",
        &request_token(&none, SERVICE, Some((ALICE.0, "nope")), &["hello"]),
    );
    assert!(
        message.contains("invalid username or password"),
        "{message}"
    );
    let t = fetch_token(&none, Some(BOB), &["hello"]);
    let c = verified_claims(&t, auth.key(), SERVICE);
    assert_eq!(c["sub"], "bob", "{c}");
    assert_eq!(get(&none, "/v2/", Some(&bearer_auth(&t))).0, 200);
    assert_eq!(
        get(&none, "/v2/hello/tags/list", Some(&bearer_auth(&t))).0,
        200
    );
}

// ---------------------------------------------------------------------------
// Real clients over plain HTTP

#[test]
fn docker_logs_in_pulls_and_runs_and_is_refused_without_a_login() {
    if !require_all(&["dockerd", "docker"]) {
        return;
    }
    let auth = AuthFiles::new(&[ALICE]);
    let pull = Server::start(&auth.env(""));
    let none = Server::start(&auth.env("none"));
    let dockerd = Dockerd::start();
    let docker = || dockerd.docker();
    let addr = pull.addr();
    let hello = format!("{addr}/hello:latest");

    // Observed: `Error response from daemon: Get "http://127.0.0.1:PORT/v2/":
    // unauthorized: invalid username or password`.
    let out = run_fail(docker().args(["login", "-u", ALICE.0, "-p", "wrong-password", addr]));
    assert_mentions(
        &out,
        &["invalid username or password"],
        "docker login, wrong password",
    );

    // Anonymous, and hello is not built yet: `Error response from daemon:
    // unauthorized: <the server's message>`.
    let out = run_fail(docker().args(["pull", &hello]));
    assert_login_to_build(&out, "anonymous docker pull of a new image");

    let out = run_ok(docker().args(["login", "-u", ALICE.0, "-p", ALICE.1, addr]));
    assert!(out.stdout.contains("Login Succeeded"), "{out}");
    let out = run_ok(docker().args(["pull", &hello]));
    assert!(out.stdout.contains("Digest: sha256:"), "{out}");
    let out = run_ok(docker().args(["run", "--rm", "--network", "none", &hello, "/bin/hello"]));
    assert_eq!(out.stdout.trim(), "Hello, world!", "{out}");

    // Logged out, the built image pulls anonymously; a new one does not.
    run_ok(docker().args(["logout", addr]));
    run_ok(docker().args(["rmi", &hello]));
    run_ok(docker().args(["pull", &hello]));
    let out = run_fail(docker().args(["pull", &format!("{addr}/cowsay:latest")]));
    assert_login_to_build(&out, "anonymous docker pull of another new image");

    // Under `none` not even a built image pulls anonymously.
    build_as(&none, ALICE, "hello");
    let none_hello = format!("{}/hello:latest", none.addr());
    let out = run_fail(docker().args(["pull", &none_hello]));
    assert_mentions(&out, &["unauthorized"], "anonymous docker pull under none");
    run_ok(docker().args(["login", "-u", ALICE.0, "-p", ALICE.1, none.addr()]));
    run_ok(docker().args(["pull", &none_hello]));
}

#[test]
fn podman_logs_in_and_pulls_and_is_refused_without_a_login() {
    if !require_all(&["podman"]) {
        return;
    }
    let auth = AuthFiles::new(&[ALICE]);
    let pull = Server::start(&auth.env(""));
    let none = Server::start(&auth.env("none"));
    let work = tempfile::tempdir().unwrap();
    let authfile = work.path().join("auth.json");
    let anonfile = work.path().join("anonymous.json");
    fs::write(&anonfile, "{}").unwrap();
    let podman = |state: &str| podman_command(&work.path().join(state));
    let hello = format!("{}/hello:latest", pull.addr());
    let login = |addr: &str, password: &str| {
        let mut cmd = podman("a");
        cmd.args(["login", "--tls-verify=false", "--authfile"])
            .arg(&authfile)
            .args(["-u", ALICE.0, "-p", password, addr]);
        cmd
    };
    let pull_cmd = |state: &str, authfile: &std::path::Path, image: &str| {
        let mut cmd = podman(state);
        cmd.args(["pull", "--tls-verify=false", "--authfile"])
            .arg(authfile)
            .arg(image);
        cmd
    };

    // Observed: `Error: logging into "127.0.0.1:PORT": invalid username/password`.
    let out = run_fail(&mut login(pull.addr(), "wrong-password"));
    assert_mentions(
        &out,
        &["invalid username/password", "invalid username or password"],
        "podman login, wrong password",
    );
    // Observed: `… reading manifest latest in 127.0.0.1:PORT/hello: unauthorized:
    // <the server's message>`.
    let out = run_fail(&mut pull_cmd("a", &anonfile, &hello));
    assert_login_to_build(&out, "anonymous podman pull of a new image");

    let out = run_ok(&mut login(pull.addr(), ALICE.1));
    assert!(out.stdout.contains("Login Succeeded"), "{out}");
    run_ok(&mut pull_cmd("a", &authfile, &hello));
    let out = run_ok(podman("a").args(["image", "inspect", &hello]));
    let v: Value = serde_json::from_str(&out.stdout).expect("inspect JSON");
    assert!(
        v[0]["RepoTags"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t == hello.as_str())),
        "{out}"
    );

    // Anonymously, into other storage: the built image pulls, a new one does not.
    run_ok(&mut pull_cmd("b", &anonfile, &hello));
    let out = run_fail(&mut pull_cmd(
        "b",
        &anonfile,
        &format!("{}/cowsay:latest", pull.addr()),
    ));
    assert_login_to_build(&out, "anonymous podman pull of another new image");

    build_as(&none, ALICE, "hello");
    let out = run_fail(&mut pull_cmd(
        "c",
        &anonfile,
        &format!("{}/hello:latest", none.addr()),
    ));
    assert_mentions(&out, &["unauthorized"], "anonymous podman pull under none");
}

#[test]
fn skopeo_copies_with_credentials_and_is_refused_without_them() {
    if !require_all(&["skopeo", "umoci", "chroot"]) {
        return;
    }
    let auth = AuthFiles::new(&[ALICE]);
    let pull = Server::start(&auth.env(""));
    let none = Server::start(&auth.env("none"));
    let work = tempfile::tempdir().unwrap();
    let copy = |addr: &str, name: &str, creds: Option<&str>, layout: &str| {
        let mut cmd = cimage_command("skopeo");
        cmd.args(["copy", "--src-tls-verify=false"]);
        match creds {
            Some(c) => cmd.args(["--src-creds", c]),
            None => cmd.arg("--src-no-creds"),
        };
        cmd.arg(format!("docker://{addr}/{name}:latest"))
            .arg(format!("oci:{}:latest", work.path().join(layout).display()));
        cmd
    };
    let good = format!("{}:{}", ALICE.0, ALICE.1);

    // Observed: `initializing source docker://…: unable to retrieve auth token:
    // invalid username/password: unauthorized: invalid username or password`.
    let out = run_fail(&mut copy(
        pull.addr(),
        "hello",
        Some("alice:wrong-password"),
        "x",
    ));
    assert_mentions(
        &out,
        &["invalid username or password"],
        "skopeo, wrong password",
    );
    let out = run_fail(&mut copy(pull.addr(), "hello", None, "x"));
    assert_login_to_build(&out, "anonymous skopeo copy of a new image");

    run_ok(&mut copy(pull.addr(), "hello", Some(&good), "hello"));
    let bundle = work.path().join("bundle");
    run_ok(Command::new("umoci").args([
        "unpack",
        "--image",
        &format!("{}:latest", work.path().join("hello").display()),
        &bundle.display().to_string(),
    ]));
    let out = run_ok(&mut chroot(&bundle.join("rootfs"), &["/bin/hello"]));
    assert_eq!(out.stdout.trim(), "Hello, world!", "{out}");

    run_ok(&mut copy(pull.addr(), "hello", None, "hello-anonymous"));
    let out = run_fail(&mut copy(pull.addr(), "cowsay", None, "cowsay"));
    assert_login_to_build(&out, "anonymous skopeo copy of another new image");

    build_as(&none, ALICE, "hello");
    let out = run_fail(&mut copy(none.addr(), "hello", None, "none"));
    assert_mentions(&out, &["unauthorized"], "anonymous skopeo copy under none");
    run_ok(&mut copy(none.addr(), "hello", Some(&good), "none-alice"));
}

#[test]
fn ctr_pulls_with_a_user_and_is_refused_without_one() {
    if !require_all(&["containerd", "ctr", "runc"]) {
        return;
    }
    let auth = AuthFiles::new(&[ALICE]);
    let pull = Server::start(&auth.env(""));
    let none = Server::start(&auth.env("none"));
    let ctrd = Containerd::start();
    let hello = format!("{}/hello:latest", pull.addr());
    let user = format!("{}:{}", ALICE.0, ALICE.1);
    let ctr_pull = |ns: &str, image: &str, user: Option<&str>| {
        let mut cmd = ctrd.ctr(ns);
        cmd.args(["images", "pull", "--plain-http"]);
        if let Some(u) = user {
            cmd.args(["--user", u]);
        }
        cmd.arg(image);
        cmd
    };
    let ns = format!("nixery-{}", random_hex());

    // containerd first POSTs the password to /token (OAuth2 password grant) and
    // falls back to GET on 400/401/404/405. Observed: `failed to authorize:
    // failed to fetch oauth token: unexpected status: 401 Unauthorized`.
    let out = run_fail(&mut ctr_pull(&ns, &hello, Some("alice:wrong-password")));
    assert_mentions(&out, &["401 unauthorized"], "ctr, wrong password");
    // ctr only sends HEAD for a tag, so the server's message never shows:
    // `pulling from host … failed with status code [manifests latest]: 401 Unauthorized`.
    let out = run_fail(&mut ctr_pull(&ns, &hello, None));
    assert_mentions(
        &out,
        &["401 unauthorized"],
        "anonymous ctr pull of a new image",
    );

    run_ok(&mut ctr_pull(&ns, &hello, Some(&user)));
    let out = ctrd.run(&ns, &hello, &["/bin/hello"]);
    assert_eq!(out.stdout.trim(), "Hello, world!", "{out}");

    let ns2 = format!("nixery-{}", random_hex());
    run_ok(&mut ctr_pull(&ns2, &hello, None));
    let out = run_fail(&mut ctr_pull(
        &ns2,
        &format!("{}/cowsay:latest", pull.addr()),
        None,
    ));
    assert_mentions(
        &out,
        &["401 unauthorized"],
        "anonymous ctr pull of another new image",
    );

    // Observed: `failed to fetch anonymous token: unexpected status: 401 Unauthorized`.
    build_as(&none, ALICE, "hello");
    let out = run_fail(&mut ctr_pull(
        &ns2,
        &format!("{}/hello:latest", none.addr()),
        None,
    ));
    assert_mentions(&out, &["401 unauthorized"], "anonymous ctr pull under none");
}

// ---------------------------------------------------------------------------
// Tokens: replicas, and tokens the server must refuse

#[test]
fn replicas_share_tokens_and_forged_or_stale_tokens_are_refused() {
    let auth = AuthFiles::new(&[ALICE]);
    let a = Server::start(&auth.env(""));
    let b = Server::start(&auth.env(""));
    let path = "/v2/hello/tags/list";

    let from_a = bearer_auth(&fetch_token(&a, Some(ALICE), &["hello"]));
    for (what, server) in [("replica A", &a), ("replica B", &b)] {
        let (status, _, body) = get(server, "/v2/", Some(&from_a));
        assert_eq!(status, 200, "{what}, /v2/ with A's token: {}", text(&body));
        let (status, _, body) = get(server, path, Some(&from_a));
        assert_eq!(
            status,
            200,
            "{what}, {path} with A's token: {}",
            text(&body)
        );
    }
    let from_b = bearer_auth(&fetch_token(&b, Some(ALICE), &["hello"]));
    assert_eq!(get(&a, path, Some(&from_b)).0, 200, "A with B's token");

    // A token forged with the right key and the server's claims is accepted: the
    // refusals below are about the one thing each changes.
    let key = auth.key();
    let good = sign(&claims("alice", SERVICE, &["hello"]), key, Algorithm::HS256);
    assert_eq!(
        get(&a, path, Some(&bearer_auth(&good))).0,
        200,
        "forged good token"
    );
    assert_eq!(
        get(&b, path, Some(&bearer_auth(&good))).0,
        200,
        "forged good token"
    );

    let t = now();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims("alice", SERVICE, &["hello"]);
        f(&mut c);
        c
    };
    let other_key = format!("{}{}{}", random_hex(), random_hex(), random_hex());
    let hs256_header = json!({"alg": "HS256", "typ": "JWT"});
    // (what, token, also refused on /v2/: false when the token is valid but
    // grants nothing on hello, as podman's login token is)
    let cases: Vec<(&str, String, bool)> = vec![
        (
            "expired two minutes ago",
            sign(
                &with(&|c| {
                    c["iat"] = json!(t - 420);
                    c["nbf"] = json!(t - 420);
                    c["exp"] = json!(t - 120);
                }),
                key,
                Algorithm::HS256,
            ),
            true,
        ),
        (
            "not valid for ten minutes yet",
            sign(
                &with(&|c| {
                    c["nbf"] = json!(t + 600);
                    c["exp"] = json!(t + 900);
                }),
                key,
                Algorithm::HS256,
            ),
            true,
        ),
        (
            "for another repository",
            sign(
                &claims("alice", SERVICE, &["cowsay"]),
                key,
                Algorithm::HS256,
            ),
            false,
        ),
        (
            "for a repository whose name starts the same",
            sign(&claims("alice", SERVICE, &["hell"]), key, Algorithm::HS256),
            false,
        ),
        (
            "for push only",
            sign(
                &with(&|c| {
                    c["access"] =
                        json!([{"type": "repository", "name": "hello", "actions": ["push"]}])
                }),
                key,
                Algorithm::HS256,
            ),
            false,
        ),
        (
            "of another type",
            sign(
                &with(&|c| {
                    c["access"] =
                        json!([{"type": "registry", "name": "hello", "actions": ["pull"]}])
                }),
                key,
                Algorithm::HS256,
            ),
            false,
        ),
        (
            "for another audience",
            sign(
                &claims("alice", "other-registry", &["hello"]),
                key,
                Algorithm::HS256,
            ),
            true,
        ),
        (
            "from another issuer",
            sign(
                &with(&|c| c["iss"] = json!("someone-else")),
                key,
                Algorithm::HS256,
            ),
            true,
        ),
        (
            "signed with another key",
            sign(
                &claims("alice", SERVICE, &["hello"]),
                other_key.as_bytes(),
                Algorithm::HS256,
            ),
            true,
        ),
        (
            "HS512 with the right key",
            sign(&claims("alice", SERVICE, &["hello"]), key, Algorithm::HS512),
            true,
        ),
        (
            "alg none",
            raw_token(
                &json!({"alg": "none", "typ": "JWT"}),
                &claims("alice", SERVICE, &["hello"]),
                None,
            ),
            true,
        ),
        (
            "RS256 header, HMAC signature with the right key",
            raw_token(
                &json!({"alg": "RS256", "typ": "JWT"}),
                &claims("alice", SERVICE, &["hello"]),
                Some(key),
            ),
            true,
        ),
        (
            "claims of the wrong types",
            raw_token(
                &hs256_header,
                &json!({"iss": "nixery", "sub": "alice", "aud": SERVICE, "exp": "tomorrow",
                        "nbf": null, "iat": [], "jti": 7, "access": {"name": "hello"}}),
                Some(key),
            ),
            true,
        ),
        (
            "no exp",
            raw_token(
                &hs256_header,
                &with(&|c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
                Some(key),
            ),
            true,
        ),
    ];
    for (what, token, _) in &cases {
        let bearer = bearer_auth(token);
        assert_bearer(what, &a, &get(&a, path, Some(&bearer)), Some("hello"));
        let r = get(&a, "/v2/hello/manifests/latest", Some(&bearer));
        assert_bearer(what, &a, &r, Some("hello"));
    }
    // Refused on /v2/ too: everything but the repository cases.
    for (what, token, on_base) in &cases {
        if !on_base {
            assert_eq!(
                get(&b, "/v2/", Some(&bearer_auth(token))).0,
                200,
                "{what} on /v2/"
            );
            continue;
        }
        assert_bearer(what, &b, &get(&b, "/v2/", Some(&bearer_auth(token))), None);
    }
    // Still fine afterwards.
    assert_eq!(get(&a, path, Some(&from_a)).0, 200);
}

// ---------------------------------------------------------------------------
// Hostile input

/// Sends raw bytes (errors while writing ignored: the server may answer early)
/// and returns the status of the response, if one came.
fn raw_status(addr: &str, request: &[u8]) -> Result<u16, String> {
    raw_head(addr, request).map(|(status, _)| status)
}

/// Sends raw bytes and returns the status and the response head as text.
fn raw_head(addr: &str, request: &[u8]) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(e) => {
                if buf.is_empty() {
                    return Err(e.to_string());
                }
                break;
            }
        }
    }
    let line = String::from_utf8_lossy(&buf);
    let head = line
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_string();
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .map(|status| (status, head))
        .ok_or_else(|| {
            format!(
                "no status line in {:?}",
                line.chars().take(80).collect::<String>()
            )
        })
}

fn request_with_authorization(path: &str, authorization: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "GET {path} HTTP/1.1\r\nHost: registry.test\r\nConnection: close\r\nAuthorization: "
    )
    .into_bytes();
    r.extend_from_slice(authorization);
    r.extend_from_slice(b"\r\n\r\n");
    r
}

#[test]
fn hostile_authorization_headers_get_4xx_and_the_server_stays_up() {
    let auth = AuthFiles::new(&[ALICE]);
    let mut server = Server::start(&auth.env(""));
    let valid = fetch_token(&server, Some(ALICE), &["hello"]);
    let key = auth.key();
    let parts: Vec<&str> = valid.split('.').collect();
    assert_eq!(parts.len(), 3, "{valid}");
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut elevated = claims("admin", SERVICE, &["hello", "cowsay"]);
    elevated["exp"] = json!(now() + 86400 * 365);
    let spliced = format!(
        "{}.{}.{}",
        parts[0],
        b64url(elevated.to_string().as_bytes()),
        parts[2]
    );
    let deep = format!("{}{}", "[".repeat(3000), "]".repeat(3000));
    let bomb = format!("{}.{}.{}", b64url(deep.as_bytes()), parts[1], parts[2]);
    let not_json = format!("{}.{}.{}", b64url(b"hello"), b64url(b"world"), parts[2]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("Bearer alone", b"Bearer".to_vec()),
        ("Bearer and a space", b"Bearer ".to_vec()),
        ("Bearer and two words", b"Bearer abc def".to_vec()),
        ("one segment", b"Bearer abcdef".to_vec()),
        ("empty segments", b"Bearer ..".to_vec()),
        ("four segments", format!("Bearer {valid}.x").into_bytes()),
        ("garbage base64", b"Bearer !!!.@@@.###".to_vec()),
        (
            "truncated signature",
            format!("Bearer {}", &valid[..valid.len() - 4]).into_bytes(),
        ),
        (
            "claims swapped under the old signature",
            format!("Bearer {spliced}").into_bytes(),
        ),
        (
            "deeply nested JSON header",
            format!("Bearer {bomb}").into_bytes(),
        ),
        (
            "header that is not JSON",
            format!("Bearer {not_json}").into_bytes(),
        ),
        (
            "alg none",
            format!(
                "Bearer {}",
                raw_token(
                    &json!({"alg": "none"}),
                    &claims("alice", SERVICE, &["hello"]),
                    None
                )
            )
            .into_bytes(),
        ),
        (
            "alg NONE with a signature",
            format!(
                "Bearer {}",
                raw_token(
                    &json!({"alg": "NONE", "typ": "JWT"}),
                    &claims("alice", SERVICE, &["hello"]),
                    Some(key)
                )
            )
            .into_bytes(),
        ),
        (
            "RS256/HS256 confusion",
            format!(
                "Bearer {}",
                raw_token(
                    &json!({"alg": "RS256", "typ": "JWT"}),
                    &claims("alice", SERVICE, &["hello"]),
                    Some(key)
                )
            )
            .into_bytes(),
        ),
        (
            "another key",
            format!(
                "Bearer {}",
                sign(
                    &claims("alice", SERVICE, &["hello"]),
                    b"another key, 32 bytes or more ..",
                    Algorithm::HS256
                )
            )
            .into_bytes(),
        ),
        (
            "a 100 KB token",
            format!("Bearer {}", "A".repeat(100_000)).into_bytes(),
        ),
        (
            "a 12 KB token",
            format!("Bearer {}", "A".repeat(12_000)).into_bytes(),
        ),
        ("Basic garbage", b"Basic !!!not-base64!!!".to_vec()),
        (
            "Basic without a colon",
            format!("Basic {}", b64(b"alice")).into_bytes(),
        ),
        (
            "Basic with invalid UTF-8",
            format!("Basic {}", b64(b"\xff\xfe:\xc3\x28")).into_bytes(),
        ),
        ("Basic alone", b"Basic".to_vec()),
        (
            "another scheme",
            b"Digest username=\"alice\", realm=\"nixery\"".to_vec(),
        ),
        (
            "bytes that are not ASCII",
            b"Bearer \xff\xfe\xfd\x80".to_vec(),
        ),
        ("a long scheme", "X".repeat(8000).into_bytes()),
        (
            "two tokens in one header",
            format!("Bearer {valid}, Bearer {valid}x").into_bytes(),
        ),
    ];
    let mut wrong = Vec::new();
    for path in ["/v2/", "/v2/hello/tags/list", "/v2/hello/manifests/latest"] {
        for (what, value) in &cases {
            let got = raw_status(server.addr(), &request_with_authorization(path, value));
            let ok = matches!(got, Ok(s) if (400..500).contains(&s));
            eprintln!("{path} {what}: {got:?}");
            if !ok {
                wrong.push(format!("{path} {what}: {got:?} (want a 4xx)"));
            }
        }
    }

    // /token may answer 200 (anonymous) or 4xx to odd input, never 5xx.
    let alice_basic = basic_auth(ALICE.0, ALICE.1);
    let many_scopes = "&scope=repository%3Ahello%3Apull".repeat(2000);
    let token_cases: Vec<(&str, String, Vec<u8>)> = vec![
        (
            "Basic garbage",
            "/token?service=nixery".into(),
            b"Basic %%%".to_vec(),
        ),
        (
            "Basic without a colon",
            "/token?service=nixery".into(),
            format!("Basic {}", b64(b"alice")).into_bytes(),
        ),
        (
            "a 5000-character user",
            "/token?service=nixery".into(),
            format!(
                "Basic {}",
                b64(format!("{}:x", "u".repeat(5000)).as_bytes())
            )
            .into_bytes(),
        ),
        (
            "a Bearer header",
            "/token?service=nixery".into(),
            format!("Bearer {valid}").into_bytes(),
        ),
        (
            "path-like scope",
            "/token?service=nixery&scope=repository%3A..%2F..%2Fetc%3Apull".into(),
            alice_basic.clone().into_bytes(),
        ),
        (
            "NUL in the scope",
            "/token?service=nixery&scope=repository%3Ahel%00lo%3Apull".into(),
            alice_basic.clone().into_bytes(),
        ),
        (
            "empty scope parts",
            "/token?service=nixery&scope=%3A%3A%3A%3A".into(),
            alice_basic.clone().into_bytes(),
        ),
        (
            "scope without actions",
            "/token?service=nixery&scope=repository%3Ahello".into(),
            alice_basic.clone().into_bytes(),
        ),
        (
            "bad percent-encoding",
            "/token?service=nixery&scope=%ZZ%".into(),
            alice_basic.clone().into_bytes(),
        ),
        (
            "another service",
            "/token?service=somebody-else&scope=repository%3Ahello%3Apull".into(),
            alice_basic.clone().into_bytes(),
        ),
        (
            "2000 scopes",
            format!("/token?service=nixery{many_scopes}"),
            alice_basic.clone().into_bytes(),
        ),
    ];
    for (what, path, value) in &token_cases {
        let got = raw_status(server.addr(), &request_with_authorization(path, value));
        eprintln!("/token {what}: {got:?}");
        if !matches!(got, Ok(s) if s < 500) {
            wrong.push(format!("/token {what}: {got:?} (want 200 or a 4xx)"));
        }
    }
    // The realm comes from the Host header: odd ones must not break the answer.
    for (what, host) in [
        ("a quote", "a\",service=\"evil"),
        ("empty", ""),
        ("8000 characters", &"h".repeat(8000)),
        ("spaces", "a b c"),
        ("non-ASCII", "r\u{e9}gistry.test"),
    ] {
        let req = format!(
            "GET /v2/hello/tags/list HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        );
        let got = raw_status(server.addr(), req.as_bytes());
        eprintln!("Host header {what}: {got:?}");
        if !matches!(got, Ok(s) if (400..500).contains(&s)) {
            wrong.push(format!("Host header {what}: {got:?} (want a 4xx)"));
        }
    }
    let req = b"GET /v2/hello/tags/list HTTP/1.1\r\nConnection: close\r\n\r\n";
    let got = raw_status(server.addr(), req);
    eprintln!("no Host header: {got:?}");
    if !matches!(got, Ok(s) if (400..500).contains(&s)) {
        wrong.push(format!("no Host header: {got:?} (want a 4xx)"));
    }
    assert!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));

    assert!(server.is_running(), "the server died");
    let bearer = bearer_auth(&valid);
    assert_eq!(get(&server, "/v2/", Some(&bearer)).0, 200);
    assert_eq!(get(&server, "/v2/hello/tags/list", Some(&bearer)).0, 200);
    assert_eq!(
        fetch_token(&server, Some(ALICE), &["hello"])
            .split('.')
            .count(),
        3
    );
}

#[test]
fn unusable_htpasswd_entries_are_ignored_and_never_slow() {
    let auth = AuthFiles::new(&[ALICE]);
    // A cost-31 bcrypt hash would take days to verify: it must be refused at load.
    let slow = common::htpasswd_line("slowpoke", "slow-password").replacen("$2y$04$", "$2y$31$", 1);
    assert!(slow.contains("$2y$31$"), "{slow}");
    let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, b"sha-password");
    let lines = [
        "# a comment".to_string(),
        String::new(),
        common::htpasswd_line(ALICE.0, ALICE.1),
        slow,
        // htpasswd -m (MD5, apr1), -s (SHA-1), -d (crypt) and -p (plain text).
        "md5user:$apr1$abcdefgh$g2dckgyjyhceDY1BgG1tF.".to_string(),
        format!(
            "shauser:{{SHA}}{}",
            base64::engine::general_purpose::STANDARD.encode(sha1.as_ref())
        ),
        "cryptuser:abltkxdOx9si.".to_string(),
        "plainuser:plain-password".to_string(),
        "a line without a colon".to_string(),
        ":$2y$04$missingusermissingusermissinguserXXXXXXXXXXXXXXXXXXXX".to_string(),
        "brokenhash:$2y$04$short".to_string(),
    ];
    fs::write(auth.htpasswd_path(), lines.join("\n") + "\n").unwrap();
    let started = Instant::now();
    let server = Server::start(&auth.env(""));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "start-up took {:?}",
        started.elapsed()
    );

    let timed = |user: &str, password: &str| {
        let t = Instant::now();
        let (status, _, body) = request_token(&server, SERVICE, Some((user, password)), &["hello"]);
        (status, t.elapsed(), text(&body))
    };
    for (user, password) in [
        ("slowpoke", "slow-password"),
        ("md5user", "md5-password"),
        ("shauser", "sha-password"),
        ("cryptuser", "des-password"),
        ("plainuser", "plain-password"),
        ("brokenhash", "x"),
        ("", "x"),
    ] {
        let (status, took, body) = timed(user, password);
        assert_eq!(
            status, 401,
            "{user} logged in with an unusable entry: {body}"
        );
        assert!(
            took < Duration::from_secs(5),
            "{user}: /token took {took:?} to refuse"
        );
    }
    // Several at once do not tie the server up either.
    let t = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let url = server.url(&format!(
                "/token?service=nixery&scope={}",
                common::query_escape("repository:hello:pull")
            ));
            let basic = basic_auth("slowpoke", "slow-password");
            thread::spawn(move || {
                common::http_request(
                    "GET",
                    &url,
                    &[("Authorization", &basic)],
                    Duration::from_secs(20),
                )
                .map(|r| r.0)
            })
        })
        .collect();
    for th in threads {
        let r = th.join().unwrap();
        assert!(matches!(r, Ok(401)), "slowpoke: {r:?}");
    }
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    // The good entry still works.
    let (status, took, body) = timed(ALICE.0, ALICE.1);
    assert_eq!(status, 200, "{body}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn htpasswd_changes_are_picked_up_without_a_restart() {
    const CAROL: (&str, &str) = ("carol", "carol-Pw-55x");
    let auth = AuthFiles::new(&[ALICE]);
    let server = Server::start(&auth.env("none"));
    let status_of = |user: (&str, &str)| request_token(&server, SERVICE, Some(user), &["hello"]).0;
    assert_eq!(status_of(ALICE), 200);
    assert_eq!(status_of(CAROL), 401);

    let eventually = |what: &str, user: (&str, &str), want: u16| {
        let t = Instant::now();
        loop {
            let got = status_of(user);
            if got == want {
                return t.elapsed();
            }
            assert!(
                t.elapsed() < Duration::from_secs(4),
                "{what}: /token as {} still answers {got} after {:?}",
                user.0,
                t.elapsed()
            );
            thread::sleep(Duration::from_millis(200));
        }
    };
    // Replaced by rename, as tools that write a new file do.
    common::replace_file(
        auth.htpasswd_path(),
        common::htpasswd_text(&[ALICE, CAROL]).as_bytes(),
    );
    let took = eventually("a user added", CAROL, 200);
    eprintln!("a user added: seen after {took:?}");
    // Rewritten in place, as `htpasswd -D` does.
    fs::write(auth.htpasswd_path(), common::htpasswd_text(&[CAROL])).unwrap();
    let took = eventually("a user removed", ALICE, 401);
    eprintln!("a user removed: seen after {took:?}");
    assert_eq!(status_of(CAROL), 200);
    // A password changed.
    fs::write(
        auth.htpasswd_path(),
        common::htpasswd_text(&[("carol", "carol-new-password")]),
    )
    .unwrap();
    eventually("a password changed", CAROL, 401);
    assert_eq!(status_of(("carol", "carol-new-password")), 200);
}

// ---------------------------------------------------------------------------
// Start-up refusals

/// Runs the binary with `env` and expects it to exit at once, printing one line
/// that mentions `key` (case-insensitive).
fn assert_refuses_to_start(what: &str, env: &[(&str, &str)], key: &str) {
    let pkgs = common::fresh_pkgs_copy();
    let storage = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixery"));
    cmd.env("PORT", "0")
        .env("NIXERY_LISTEN", "127.0.0.1")
        .env("NIXERY_PKGS_PATH", pkgs.path())
        .env("STORAGE_PATH", storage.path())
        .env("NIXERY_NIX__SUBSTITUTERS", "")
        .env("RUST_LOG", "info")
        .env("NIX_CONFIG", common::NIX_CONFIG);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30));
    assert!(!out.success(), "{what}: started anyway:\n{out}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{what}: took {:?} to refuse",
        started.elapsed()
    );
    let all = out.combined();
    assert!(!all.contains("listening on"), "{what}:\n{out}");
    let lines: Vec<&str> = all
        .lines()
        .filter(|l| l.to_lowercase().contains(&key.to_lowercase()))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected one line naming {key}:\n{out}"
    );
    eprintln!("{what}: {}", lines[0]);
}

#[test]
fn auth_without_a_usable_token_key_refuses_to_start() {
    let auth = AuthFiles::new(&[ALICE]);
    let short = auth.dir().join("short.key");
    fs::write(&short, "only-16-bytes-xx").unwrap();
    let missing = auth.dir().join("missing.key");
    let missing = missing.to_str().unwrap();
    let short = short.to_str().unwrap();
    assert_refuses_to_start(
        "htpasswd without a token key",
        &[("NIXERY_AUTH__HTPASSWD", auth.htpasswd())],
        "token_key",
    );
    assert_refuses_to_start(
        "anonymous pull without htpasswd or token key",
        &[("NIXERY_AUTH__ANONYMOUS", "pull")],
        "token_key",
    );
    assert_refuses_to_start(
        "anonymous none without a token key",
        &[
            ("NIXERY_AUTH__HTPASSWD", auth.htpasswd()),
            ("NIXERY_AUTH__ANONYMOUS", "none"),
        ],
        "token_key",
    );
    assert_refuses_to_start(
        "a 16-byte token key",
        &[
            ("NIXERY_AUTH__HTPASSWD", auth.htpasswd()),
            ("NIXERY_AUTH__TOKEN_KEY", short),
        ],
        "token_key",
    );
    assert_refuses_to_start(
        "a token key file that does not exist",
        &[
            ("NIXERY_AUTH__HTPASSWD", auth.htpasswd()),
            ("NIXERY_AUTH__TOKEN_KEY", missing),
        ],
        "token_key",
    );
    assert_refuses_to_start(
        "an unknown anonymous policy",
        &[
            ("NIXERY_AUTH__HTPASSWD", auth.htpasswd()),
            ("NIXERY_AUTH__TOKEN_KEY", auth.token_key()),
            ("NIXERY_AUTH__ANONYMOUS", "everyone"),
        ],
        "anonymous",
    );
    // `build` without htpasswd is today's registry: no key needed.
    let server = Server::start(&[("NIXERY_AUTH__ANONYMOUS", "build")]);
    assert_eq!(get(&server, "/v2/", None).0, 200);
}

// ---------------------------------------------------------------------------
// Limits

#[test]
fn pull_limit_per_client_with_headers_recovery_and_metrics() {
    const N: u32 = 60;
    let auth = AuthFiles::new(&[ALICE, BOB]);
    let mut env = auth.env("");
    env.push(("NIXERY_LIMITS__PULLS_PER_MINUTE", "60"));
    let server = Server::start(&env);
    let alice = bearer_auth(&fetch_token(&server, Some(ALICE), &["hello"]));
    let bob = bearer_auth(&fetch_token(&server, Some(BOB), &["hello"]));
    let path = "/v2/hello/manifests/latest";

    // The first GET builds the image, and counts as a pull.
    let (status, h, body) = get(&server, path, Some(&alice));
    assert_eq!(status, 200, "{}", text(&body));
    let manifest: Value = serde_json::from_slice(&body).unwrap();
    let config = manifest["config"]["digest"].as_str().unwrap().to_string();
    let check_headers = |h: &Headers, what: &str| -> u64 {
        let limit = h
            .get("ratelimit-limit")
            .unwrap_or_else(|| panic!("{what}: no RateLimit-Limit: {h:?}"));
        assert!(
            limit.starts_with("60") && !limit[2..].starts_with(|c: char| c.is_ascii_digit()),
            "{what}: RateLimit-Limit {limit:?}"
        );
        let remaining = header_number(h, "ratelimit-remaining")
            .unwrap_or_else(|| panic!("{what}: no RateLimit-Remaining: {h:?}"));
        assert!(
            remaining < N as u64,
            "{what}: RateLimit-Remaining {remaining}"
        );
        remaining
    };
    let first = check_headers(&h, "the first pull");
    assert!(
        first >= N as u64 - 2,
        "first pull: RateLimit-Remaining {first}"
    );

    let start = Instant::now();
    let mut allowed = 1u32;
    let mut last_remaining = first;
    let refusal = loop {
        let r = get(&server, path, Some(&alice));
        match r.0 {
            200 => {
                allowed += 1;
                last_remaining = check_headers(&r.1, &format!("pull {allowed}"));
            }
            429 => break r,
            other => panic!("pull {}: {other} {}", allowed + 1, text(&r.2)),
        }
        assert!(allowed <= 3 * N, "no 429 after {allowed} manifest GETs");
    };
    let elapsed = start.elapsed().as_secs() as u32;
    eprintln!("{allowed} pulls allowed before the first 429 ({elapsed} s)");
    assert!(allowed >= N, "only {allowed} of {N} pulls allowed");
    assert!(
        allowed <= N + 2 + elapsed,
        "{allowed} pulls allowed in {elapsed} s with a limit of {N} a minute"
    );
    assert!(
        last_remaining <= 1,
        "last RateLimit-Remaining {last_remaining}"
    );
    let (status, h, body) = &refusal;
    let (code, message) = registry_error(429, *status, h, body);
    assert_eq!(code, "TOOMANYREQUESTS", "{message}");
    let retry = header_number(h, "retry-after").unwrap_or_else(|| panic!("Retry-After: {h:?}"));
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    let limit = h
        .get("ratelimit-limit")
        .expect("RateLimit-Limit on the 429");
    assert!(limit.starts_with("60"), "{limit}");
    assert_eq!(header_number(h, "ratelimit-remaining"), Some(0), "{h:?}");

    // Counted per user, not per token.
    let alice2 = bearer_auth(&fetch_token(&server, Some(ALICE), &["hello"]));
    assert_eq!(
        get(&server, path, Some(&alice2)).0,
        429,
        "a new token of alice"
    );
    let exhausted = Instant::now();
    // HEAD and blobs are not limited.
    assert_eq!(head(&server, path, Some(&alice)).0, 200, "HEAD");
    let (status, _, blob) = get(&server, &format!("/v2/hello/blobs/{config}"), Some(&alice));
    assert_eq!(status, 200, "blob GET");
    assert_eq!(sha256_digest(&blob), config);
    // Others are not affected.
    let (status, h, body) = get(&server, path, Some(&bob));
    assert_eq!(status, 200, "bob: {}", text(&body));
    assert!(check_headers(&h, "bob") >= N as u64 - 2);
    let anon = bearer_auth(&fetch_token(&server, None, &["hello"]));
    assert_eq!(get(&server, path, Some(&anon)).0, 200, "anonymous");
    // The allowance comes back, one pull a second; HEADs do not use it up.
    thread::sleep(Duration::from_millis(retry.max(1) * 1000 + 300));
    for _ in 0..5 {
        assert_eq!(head(&server, path, Some(&alice)).0, 200);
    }
    let mut back = 0u64;
    loop {
        let (status, _, body) = get(&server, path, Some(&alice));
        match status {
            200 => back += 1,
            429 => break,
            other => panic!("alice after Retry-After: {other} {}", text(&body)),
        }
        assert!(back <= N as u64, "the whole allowance came back at once");
    }
    let waited = exhausted.elapsed().as_secs_f64();
    eprintln!("{back} pulls came back after {waited:.1} s");
    assert!(back >= 1, "no pull allowed after Retry-After");
    assert!(
        back as f64 <= waited + 1.0,
        "{back} pulls came back within {waited:.1} s at one a second"
    );

    // Anonymous callers are counted by address: another anonymous token from the
    // same address shares the allowance; users do not.
    let mut anonymous_allowed = 1;
    loop {
        let (status, _, body) = get(&server, path, Some(&anon));
        match status {
            200 => anonymous_allowed += 1,
            429 => break,
            other => panic!("anonymous pull: {other} {}", text(&body)),
        }
        assert!(anonymous_allowed <= 3 * N, "no 429 for anonymous pulls");
    }
    assert!(
        anonymous_allowed >= N,
        "{anonymous_allowed} anonymous pulls"
    );
    let anon2 = bearer_auth(&fetch_token(&server, None, &["hello"]));
    assert_eq!(
        get(&server, path, Some(&anon2)).0,
        429,
        "another anonymous token from the same address"
    );
    assert_eq!(
        get(&server, path, Some(&bob)).0,
        200,
        "bob after the anonymous burst"
    );

    let m = metrics_text(&server);
    let refused = metric(
        &m,
        "nixery_rate_limited_total",
        &[("limit", "pulls"), ("outcome", "refused")],
    )
    .unwrap_or_else(|| panic!("no pulls/refused counter:\n{m}"));
    let allowed_metric = metric(
        &m,
        "nixery_rate_limited_total",
        &[("limit", "pulls"), ("outcome", "allowed")],
    )
    .unwrap_or_else(|| panic!("no pulls/allowed counter:\n{m}"));
    assert!(refused >= 5.0, "refused {refused}");
    assert!(
        allowed_metric >= (2 * N + 3) as f64,
        "allowed {allowed_metric}"
    );
    assert!(
        !m.contains("alice") && !m.contains("bob"),
        "user names in /metrics:\n{m}"
    );
}

#[test]
fn build_limit_stops_new_builds_while_built_images_pull() {
    let auth = AuthFiles::new(&[ALICE, BOB]);
    let mut env = auth.env("");
    env.push(("NIXERY_LIMITS__BUILDS_PER_HOUR", "1"));
    let server = Server::start(&env);
    let alice = bearer_auth(&fetch_token(&server, Some(ALICE), &["hello", "cowsay"]));
    let bob = bearer_auth(&fetch_token(&server, Some(BOB), &["cowsay"]));

    let (status, _, body) = get(&server, "/v2/hello/manifests/latest", Some(&alice));
    assert_eq!(status, 200, "alice's first build: {}", text(&body));
    let (status, h, body) = get(&server, "/v2/cowsay/manifests/latest", Some(&alice));
    let (code, message) = registry_error(429, status, &h, &body);
    assert_eq!(code, "TOOMANYREQUESTS", "{message}");
    assert!(
        message.to_lowercase().contains("build"),
        "the message should name the build limit: {message}"
    );
    let retry = header_number(&h, "retry-after").unwrap_or_else(|| panic!("Retry-After: {h:?}"));
    assert!(retry >= 1, "Retry-After {retry}");

    // What is built still pulls.
    for _ in 0..3 {
        let (status, _, body) = get(&server, "/v2/hello/manifests/latest", Some(&alice));
        assert_eq!(status, 200, "{}", text(&body));
    }
    assert_eq!(
        head(&server, "/v2/hello/manifests/latest", Some(&alice)).0,
        200
    );
    // Bob has builds of his own; once he built cowsay, alice pulls it too.
    let (status, _, body) = get(&server, "/v2/cowsay/manifests/latest", Some(&bob));
    assert_eq!(status, 200, "bob's build: {}", text(&body));
    let (status, _, body) = get(&server, "/v2/cowsay/manifests/latest", Some(&alice));
    assert_eq!(
        status,
        200,
        "cowsay, built by bob, for alice: {}",
        text(&body)
    );

    let m = metrics_text(&server);
    let refused = metric(
        &m,
        "nixery_rate_limited_total",
        &[("limit", "builds"), ("outcome", "refused")],
    )
    .unwrap_or_else(|| panic!("no builds/refused counter:\n{m}"));
    let allowed = metric(
        &m,
        "nixery_rate_limited_total",
        &[("limit", "builds"), ("outcome", "allowed")],
    )
    .unwrap_or_else(|| panic!("no builds/allowed counter:\n{m}"));
    assert!(refused >= 1.0, "{refused}");
    assert!(allowed >= 2.0, "{allowed}");
    assert!(
        !m.contains("alice") && !m.contains("bob"),
        "user names in /metrics"
    );
}

// ---------------------------------------------------------------------------
// /metrics and /builds

#[test]
fn metrics_on_their_own_listener_and_behind_a_token() {
    // Only on the metrics address.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let server = Server::start(&[("NIXERY_SERVER__METRICS_LISTEN", &listen)]);
    assert!(
        !server.addr().ends_with(&format!(":{port}")),
        "the harness took the metrics listener for the registry: log the registry's \
         `listening on` line first"
    );
    let (status, _, _) = server_get(&server, "/metrics", &[]);
    assert_eq!(status, 404, "/metrics on the registry port");
    assert_eq!(get(&server, "/v2/", None).0, 200);
    let (status, _, body) = common::http_get(&format!("http://{listen}/metrics"), &[]);
    assert_eq!(status, 200, "{}", text(&body));
    assert!(text(&body).contains("nixery_"), "{}", text(&body));

    // Behind a token (no registry auth: the registry stays open).
    let dir = tempfile::tempdir().unwrap();
    let token = format!("metrics-{}", random_hex());
    let token_file = dir.path().join("metrics.token");
    fs::write(&token_file, &token).unwrap();
    let server = Server::start(&[("NIXERY_AUTH__METRICS_TOKEN", token_file.to_str().unwrap())]);
    assert_eq!(get(&server, "/v2/", None).0, 200, "registry auth is not on");
    let wrong = format!("Bearer {token}x");
    let basic = basic_auth("metrics", &token);
    for (what, headers) in [
        ("no Authorization", vec![]),
        ("a wrong token", vec![("Authorization", wrong.as_str())]),
        (
            "the token as Basic",
            vec![("Authorization", basic.as_str())],
        ),
    ] {
        let (status, _, body) = server_get(&server, "/metrics", &headers);
        assert_eq!(status, 401, "/metrics with {what}: {}", text(&body));
    }
    let good = format!("Bearer {token}");
    let (status, _, body) = server_get(&server, "/metrics", &[("Authorization", &good)]);
    assert_eq!(status, 200, "{}", text(&body));
    assert!(text(&body).contains("nixery_"));
}

#[test]
fn build_pages_need_credentials_under_none_and_probes_never_do() {
    let auth = AuthFiles::new(&[ALICE]);
    let none = Server::start(&auth.env("none"));
    let alice_basic = basic_auth(ALICE.0, ALICE.1);
    let wrong = basic_auth(ALICE.0, "wrong");
    let token = bearer_auth(&fetch_token(&none, Some(ALICE), &["hello"]));
    for path in ["/builds", "/builds/hello"] {
        assert_basic_challenge(
            &format!("{path} anonymously"),
            &server_get(&none, path, &[]),
        );
        assert_basic_challenge(
            &format!("{path} with a wrong password"),
            &server_get(&none, path, &[("Authorization", &wrong)]),
        );
        for (what, a) in [("Basic", &alice_basic), ("Bearer", &token)] {
            let (status, _, body) = server_get(&none, path, &[("Authorization", a)]);
            assert_eq!(status, 200, "{path} with {what}: {}", text(&body));
            let v: Value = serde_json::from_slice(&body).expect("JSON");
            assert!(v["builds"].is_array(), "{v}");
        }
    }
    // Probes need no credentials, whatever the policy.
    let (status, _, body) = server_get(&none, "/healthz", &[]);
    assert_eq!((status, text(&body).trim()), (200, "ok"));
    assert_eq!(server_get(&none, "/v2/", &[]).0, 401);
    // Under `pull` the pages stay open.
    let pull = Server::start(&auth.env(""));
    assert_eq!(server_get(&pull, "/builds", &[]).0, 200);
    assert_eq!(server_get(&pull, "/builds/hello", &[]).0, 200);
}

// ---------------------------------------------------------------------------
// Blob redirects to a bucket

#[test]
fn blob_redirects_leave_the_registry_host_and_carry_no_token() {
    if !require_fake_gcs() {
        return;
    }
    let gcs = FakeGcs::start(&["layers"]);
    let auth = AuthFiles::new(&[ALICE]);
    let host = gcs.host();
    let key = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/testdata/gcs-v4-signing/test_service_account.not-a-test.json"
    );
    let mut env = auth.env("");
    env.extend([
        ("NIXERY_STORAGE_BACKEND", "gcs"),
        ("GCS_BUCKET", "layers"),
        ("STORAGE_EMULATOR_HOST", host.as_str()),
        ("GOOGLE_APPLICATION_CREDENTIALS", key),
    ]);
    let server = Server::start(&env);
    let token = fetch_token(&server, Some(ALICE), &["hello"]);
    let alice = bearer_auth(&token);
    let manifest = build_as(&server, ALICE, "hello");
    let digests: Vec<String> = std::iter::once(&manifest["config"])
        .chain(manifest["layers"].as_array().unwrap().iter())
        .map(|d| d["digest"].as_str().unwrap().to_string())
        .collect();
    for digest in &digests {
        let path = format!("/v2/hello/blobs/{digest}");
        // The redirect itself is only for token holders.
        assert_bearer(
            "blob without a token",
            &server,
            &get(&server, &path, None),
            Some("hello"),
        );
        let (status, h, _) = get(&server, &path, Some(&alice));
        assert_eq!(status, 307, "{path}: {h:?}");
        let location = h.get("location").expect("Location").to_string();
        let authority = location
            .split("://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or_else(|| panic!("Location is not absolute: {location}"));
        assert_ne!(
            authority,
            server.addr(),
            "the blob redirect stays on the registry's host:port, so clients would send it the token"
        );
        assert_eq!(authority, host, "{location}");
        assert!(!location.contains(&token), "the token is in the Location");
        // The signed URL needs no credentials.
        let (status, _, bytes) = common::http_get(&location, &[]);
        assert_eq!(status, 200, "GET {location}");
        assert_eq!(&sha256_digest(&bytes), digest);
    }
    // A client with credentials pulls through the redirects (c/image does not
    // send the registry's Authorization to another host:port).
    if require_tool("skopeo") {
        let dir = tempfile::tempdir().unwrap();
        run_ok(cimage_command("skopeo").args([
            "copy",
            "--src-tls-verify=false",
            "--src-creds",
            &format!("{}:{}", ALICE.0, ALICE.1),
            &format!("docker://{}/hello:latest", server.addr()),
            &format!("oci:{}:latest", dir.path().join("layout").display()),
        ]));
        let redirects = server
            .log()
            .lines()
            .filter(|l| l.contains("/blobs/sha256:") && l.contains("\" 307 "))
            .count();
        eprintln!("{redirects} blob redirects logged");
    }
}
