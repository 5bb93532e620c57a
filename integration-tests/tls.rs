//! Black-box acceptance tests of TLS (`NIXERY_SERVER__TLS_CERT`,
//! `NIXERY_SERVER__TLS_KEY`): the port speaks HTTPS only, the token realm is
//! https, docker, podman, skopeo and ctr log in and pull verifying a test CA, and
//! a replaced certificate is served to new connections within seconds (also on
//! SIGHUP) while a download in flight finishes.
//!
//! Certificates come from a throwaway CA made with the `openssl` command; the
//! tests check what is served with a rustls client that trusts only that CA.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{
    basic_auth, bearer_auth, chroot, cimage_command, fetch_token, http_request, podman_command,
    random_hex, require_root, require_tool, run_fail, run_ok, served_certificate, server_get,
    sha256_digest, tls_connect, umoci_unpack, AuthFiles, CmdOutput, Containerd, Dockerd, Server,
    ServerCert, TestCa,
};

const ALICE: (&str, &str) = ("alice", "alice-Pw-7f3k");
const DOCKER_V2S2: &str = "application/vnd.docker.distribution.manifest.v2+json";

fn require_all(tools: &[&str]) -> bool {
    let mut ok = require_root() & require_tool("openssl");
    for t in tools {
        ok &= require_tool(t);
    }
    ok
}

fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

/// The certificate and key files a server is given: copies of an issued
/// certificate at fixed paths, so a test can replace them.
struct LiveCert {
    dir: tempfile::TempDir,
}

impl LiveCert {
    fn new(first: &ServerCert) -> LiveCert {
        let dir = tempfile::Builder::new()
            .prefix("nixery-live-cert-")
            .tempdir()
            .unwrap();
        let live = LiveCert { dir };
        fs::copy(&first.cert, live.cert()).unwrap();
        fs::copy(&first.key, live.key()).unwrap();
        live
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("tls.crt")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("tls.key")
    }

    fn cert_str(&self) -> String {
        self.cert().display().to_string()
    }

    fn key_str(&self) -> String {
        self.key().display().to_string()
    }
}

/// Starts a TLS server with `env` added; panics unless it says `listening on
/// https://`. The returned server trusts `ca` for [`server_get`].
fn start_tls(ca: &TestCa, live: &LiveCert, env: &[(&str, &str)]) -> Server {
    let cert = live.cert_str();
    let key = live.key_str();
    let mut all = vec![
        ("NIXERY_SERVER__TLS_CERT", cert.as_str()),
        ("NIXERY_SERVER__TLS_KEY", key.as_str()),
    ];
    all.extend_from_slice(env);
    let mut server = Server::start(&all);
    assert_eq!(
        server.scheme(),
        "https",
        "with a certificate the listening line must say https://"
    );
    server.trust_ca(&ca.cert());
    server
}

/// A non-loopback IPv4 address of this host: docker treats 127.0.0.0/8 as an
/// insecure registry and then skips certificate verification altogether (it
/// logs in over TLS even without the CA), so only another address shows that
/// docker verifies the test CA.
fn non_loopback_ipv4() -> Option<String> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    // No packet is sent: connecting a UDP socket only picks a route.
    let ip = ["192.0.2.1:9", "10.255.255.255:9", "8.8.8.8:53"]
        .iter()
        .find_map(|a| {
            sock.connect(a).ok()?;
            let ip = sock.local_addr().ok()?.ip();
            (ip.is_ipv4() && !ip.is_loopback() && !ip.is_unspecified()).then(|| ip.to_string())
        })?;
    // The server must be able to listen there.
    std::net::TcpListener::bind((ip.as_str(), 0)).ok()?;
    Some(ip)
}

/// `/etc/docker/certs.d/HOST:PORT/ca.crt`, where dockerd looks for the CA of a
/// registry it treats as secure; removed on drop.
struct DockerCertsD {
    dir: PathBuf,
    created_root: bool,
}

impl DockerCertsD {
    fn install(addr: &str, ca: &Path) -> DockerCertsD {
        let root = Path::new("/etc/docker/certs.d");
        let created_root = !root.exists();
        let dir = root.join(addr);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        fs::copy(ca, dir.join("ca.crt")).expect("copy CA into certs.d");
        DockerCertsD { dir, created_root }
    }
}

impl Drop for DockerCertsD {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
        if self.created_root {
            let _ = fs::remove_dir("/etc/docker/certs.d");
        }
    }
}

fn assert_mentions(out: &CmdOutput, needles: &[&str], what: &str) {
    let all = out.combined().to_lowercase();
    assert!(
        needles.iter().any(|n| all.contains(&n.to_lowercase())),
        "{what}: the client's output mentions none of {needles:?}:\n{out}"
    );
}

/// What a client that does not know the CA says.
const UNKNOWN_CA: &[&str] = &["x509", "certificate signed by unknown authority"];

// ---------------------------------------------------------------------------

#[test]
fn the_port_speaks_https_only_and_the_realm_is_https() {
    if !require_all(&[]) {
        return;
    }
    let ca = TestCa::new();
    let first = ca.issue("server-1", &["127.0.0.1"]);
    let live = LiveCert::new(&first);
    let auth = AuthFiles::new(&[ALICE]);
    let server = start_tls(&ca, &live, &auth.env(""));

    // Plain HTTP gets no answer of the registry's.
    let plain = http_request(
        "GET",
        &format!("http://{}/v2/", server.addr()),
        &[],
        Duration::from_secs(10),
    );
    assert!(
        !matches!(plain, Ok((s, _, _)) if s < 400),
        "plain HTTP on the TLS port: {plain:?}"
    );
    // The certificate served is ours, and a client of another CA refuses it.
    assert_eq!(
        served_certificate(server.addr(), &ca.cert()).expect("TLS handshake"),
        first.der,
        "another certificate is served"
    );
    let other = TestCa::new();
    assert!(
        tls_connect(server.addr(), &other.cert(), Duration::from_secs(10)).is_err(),
        "a client trusting another CA accepted the certificate"
    );

    // The challenge names the https realm.
    let (status, h, body) = server_get(&server, "/v2/", &[]);
    assert_eq!(status, 401, "{}", text(&body));
    assert_eq!(
        h.get("www-authenticate"),
        Some(
            format!(
                "Bearer realm=\"https://{}/token\",service=\"nixery\"",
                server.addr()
            )
            .as_str()
        )
    );
    let (status, h, _) = server_get(&server, "/v2/hello/manifests/latest", &[]);
    assert_eq!(status, 401);
    assert_eq!(
        h.get("www-authenticate"),
        Some(
            format!(
                "Bearer realm=\"https://{}/token\",service=\"nixery\",scope=\"repository:hello:pull\"",
                server.addr()
            )
            .as_str()
        )
    );
    // The token flow over https.
    let token = fetch_token(&server, Some(ALICE), &["hello"]);
    let bearer = bearer_auth(&token);
    let (status, _, body) = server_get(&server, "/v2/", &[("Authorization", &bearer)]);
    assert_eq!(status, 200, "{}", text(&body));
    let (status, _, body) = server_get(
        &server,
        "/v2/hello/manifests/latest",
        &[("Authorization", &bearer), ("Accept", DOCKER_V2S2)],
    );
    assert_eq!(status, 200, "{}", text(&body));
    let basic = basic_auth(ALICE.0, "wrong");
    let (status, h, _) = server_get(
        &server,
        "/token?service=nixery",
        &[("Authorization", &basic)],
    );
    assert_eq!(status, 401);
    assert_eq!(h.get("www-authenticate"), Some("Basic realm=\"nixery\""));
}

#[test]
fn docker_logs_in_pulls_and_runs_over_tls_with_the_ca_in_certs_d() {
    if !require_all(&["dockerd", "docker"]) {
        return;
    }
    let ip = non_loopback_ipv4();
    if ip.is_none() {
        eprintln!(
            "NOTE: no non-loopback IPv4 address; docker is tested on 127.0.0.1, where it \
             does not verify certificates"
        );
    }
    let listen = ip.clone().unwrap_or_else(|| "127.0.0.1".to_string());
    let ca = TestCa::new();
    let mut ips = vec!["127.0.0.1"];
    if let Some(ip) = &ip {
        ips.push(ip);
    }
    let live = LiveCert::new(&ca.issue("docker", &ips));
    let auth = AuthFiles::new(&[ALICE]);
    let mut env = auth.env("");
    env.push(("NIXERY_LISTEN", listen.as_str()));
    let server = start_tls(&ca, &live, &env);
    let addr = server.addr().to_string();
    let dockerd = Dockerd::start();
    let docker = || dockerd.docker();
    let login = || {
        let mut cmd = docker();
        cmd.args(["login", "-u", ALICE.0, "-p", ALICE.1, &addr]);
        cmd
    };

    if ip.is_some() {
        // Observed: `Error response from daemon: Get "https://IP:PORT/v2/": x509:
        // certificate signed by unknown authority`.
        let out = run_fail(&mut login());
        assert_mentions(&out, UNKNOWN_CA, "docker login without the CA");
    }
    let _certs = DockerCertsD::install(&addr, &ca.cert());
    let out = run_ok(&mut login());
    assert!(out.stdout.contains("Login Succeeded"), "{out}");
    let image = format!("{addr}/hello:latest");
    let out = run_ok(docker().args(["pull", &image]));
    assert!(out.stdout.contains("Digest: sha256:"), "{out}");
    let out = run_ok(docker().args(["run", "--rm", "--network", "none", &image, "/bin/hello"]));
    assert_eq!(out.stdout.trim(), "Hello, world!", "{out}");
}

#[test]
fn podman_logs_in_and_pulls_over_tls_with_a_cert_dir() {
    if !require_all(&["podman"]) {
        return;
    }
    let ca = TestCa::new();
    let live = LiveCert::new(&ca.issue("podman", &["127.0.0.1"]));
    let auth = AuthFiles::new(&[ALICE]);
    let server = start_tls(&ca, &live, &auth.env(""));
    let work = tempfile::tempdir().unwrap();
    let authfile = work.path().join("auth.json");
    let cert_dir = ca.cert_dir();
    let podman = || podman_command(&work.path().join("state"));
    let login = |cert_dir: Option<&Path>| {
        let mut cmd = podman();
        cmd.arg("login");
        if let Some(d) = cert_dir {
            cmd.arg("--cert-dir").arg(d);
        }
        cmd.arg("--authfile")
            .arg(&authfile)
            .args(["-u", ALICE.0, "-p", ALICE.1, server.addr()]);
        cmd
    };
    // Observed: `Error: authenticating creds for "127.0.0.1:PORT": pinging
    // container registry 127.0.0.1:PORT: Get "https://127.0.0.1:PORT/v2/": x509:
    // certificate signed by unknown authority`.
    let out = run_fail(&mut login(None));
    assert_mentions(&out, UNKNOWN_CA, "podman login without the CA");
    let out = run_ok(&mut login(Some(&cert_dir)));
    assert!(out.stdout.contains("Login Succeeded"), "{out}");
    let image = format!("{}/hello:latest", server.addr());
    run_ok(
        podman()
            .arg("pull")
            .arg("--cert-dir")
            .arg(&cert_dir)
            .arg("--authfile")
            .arg(&authfile)
            .arg(&image),
    );
    let out = run_ok(podman().args(["image", "inspect", &image]));
    let v: Value = serde_json::from_str(&out.stdout).expect("inspect JSON");
    assert_eq!(v[0]["Os"], "linux", "{out}");
}

#[test]
fn skopeo_copies_over_tls_with_a_cert_dir() {
    if !require_all(&["skopeo", "umoci", "chroot"]) {
        return;
    }
    let ca = TestCa::new();
    let live = LiveCert::new(&ca.issue("skopeo", &["127.0.0.1"]));
    let auth = AuthFiles::new(&[ALICE]);
    let server = start_tls(&ca, &live, &auth.env(""));
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let copy = |cert_dir: Option<&Path>| {
        let mut cmd = cimage_command("skopeo");
        cmd.arg("copy");
        if let Some(d) = cert_dir {
            cmd.arg("--src-cert-dir").arg(d);
        }
        cmd.args(["--src-creds", &format!("{}:{}", ALICE.0, ALICE.1)])
            .arg(format!("docker://{}/hello:latest", server.addr()))
            .arg(format!("oci:{}:latest", layout.display()));
        cmd
    };
    // Observed: `… pinging container registry 127.0.0.1:PORT: Get
    // "https://127.0.0.1:PORT/v2/": x509: certificate signed by unknown authority`.
    let out = run_fail(&mut copy(None));
    assert_mentions(&out, UNKNOWN_CA, "skopeo without the CA");
    run_ok(&mut copy(Some(&ca.cert_dir())));
    let rootfs = umoci_unpack(&layout, &work.path().join("bundle"));
    let out = run_ok(&mut chroot(&rootfs, &["/bin/hello"]));
    assert_eq!(out.stdout.trim(), "Hello, world!", "{out}");
}

#[test]
fn ctr_pulls_over_tls_with_tlscacert() {
    if !require_all(&["containerd", "ctr", "runc"]) {
        return;
    }
    let ca = TestCa::new();
    let live = LiveCert::new(&ca.issue("ctr", &["127.0.0.1"]));
    let auth = AuthFiles::new(&[ALICE]);
    let server = start_tls(&ca, &live, &auth.env(""));
    let ctrd = Containerd::start();
    let addr = server.addr();
    // ctr 1.6 talks plain HTTP to loopback hosts unless a hosts.toml names an
    // https host (observed: `Head "http://127.0.0.1:PORT/…": EOF` with
    // --tlscacert alone). The CA is still given with --tlscacert.
    let hosts = tempfile::tempdir().unwrap();
    fs::create_dir_all(hosts.path().join(addr)).unwrap();
    fs::write(
        hosts.path().join(addr).join("hosts.toml"),
        format!(
            "server = \"https://{addr}\"\n\n[host.\"https://{addr}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .unwrap();
    let ns = format!("nixery-{}", random_hex());
    let image = format!("{addr}/hello:latest");
    let pull = |ca_file: Option<&Path>| {
        let mut cmd = ctrd.ctr(&ns);
        cmd.args(["images", "pull", "--hosts-dir"])
            .arg(hosts.path())
            .args(["--user", &format!("{}:{}", ALICE.0, ALICE.1)]);
        if let Some(f) = ca_file {
            cmd.arg("--tlscacert").arg(f);
        }
        cmd.arg(&image);
        cmd
    };
    // Observed: `failed to do request: Head "https://127.0.0.1:PORT/v2/hello/
    // manifests/latest": x509: certificate signed by unknown authority`.
    let out = run_fail(&mut pull(None));
    assert_mentions(&out, UNKNOWN_CA, "ctr without the CA");
    run_ok(&mut pull(Some(&ca.cert())));
    let out = ctrd.run(&ns, &image, &["/bin/hello"]);
    assert_eq!(out.stdout.trim(), "Hello, world!", "{out}");
}

// ---------------------------------------------------------------------------
// Certificate reload

/// Polls new TLS connections until `want` is served; returns how long it took.
fn wait_for_certificate(
    server: &Server,
    ca: &Path,
    want: &ServerCert,
    deadline: Duration,
) -> Duration {
    let t = Instant::now();
    let mut last;
    loop {
        match served_certificate(server.addr(), ca) {
            Ok(der) if der == want.der => return t.elapsed(),
            Ok(_) => last = "the previous certificate".into(),
            Err(e) => last = format!("handshake error: {e}"),
        }
        assert!(
            t.elapsed() < deadline,
            "new connections do not get certificate {} (serial {}) after {:?}; last: {last}",
            want.subject_cn,
            want.serial,
            t.elapsed()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Sets a small receive buffer on a socket, so that a large response stays
/// mostly in the server's hands until the client reads it.
fn small_receive_buffer(stream: &std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 16 * 1024;
    // SAFETY: a valid socket descriptor and a pointer to a c_int of the right size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt SO_RCVBUF");
}

#[test]
fn a_replaced_certificate_is_served_while_a_download_in_flight_finishes() {
    if !require_all(&[]) {
        return;
    }
    let ca = TestCa::new();
    let first = ca.issue("reload-1", &["127.0.0.1"]);
    let second = ca.issue("reload-2", &["127.0.0.1"]);
    let third = ca.issue("reload-3", &["127.0.0.1"]);
    assert_ne!(first.serial, second.serial);
    let live = LiveCert::new(&first);
    let mut server = start_tls(&ca, &live, &[("NIX_TIMEOUT", "120")]);
    assert_eq!(
        served_certificate(server.addr(), &ca.cert()).unwrap(),
        first.der
    );

    // `noise` has a 6 MiB layer of random bytes.
    let (status, _, body) = server_get(
        &server,
        "/v2/noise/manifests/latest",
        &[("Accept", DOCKER_V2S2)],
    );
    assert_eq!(status, 200, "{}", text(&body));
    let manifest: Value = serde_json::from_slice(&body).unwrap();
    let (digest, size) = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_string(),
                l["size"].as_u64().unwrap(),
            )
        })
        .max_by_key(|(_, size)| *size)
        .unwrap();
    assert!(size > 4 << 20, "the noise layer is only {size} bytes");

    // A download on a connection made with the first certificate, read slowly.
    let addr = server.addr().to_string();
    let sockaddr: std::net::SocketAddr = addr.parse().unwrap();
    let tcp = std::net::TcpStream::connect(sockaddr).unwrap();
    small_receive_buffer(&tcp);
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(common::tls_client_config(&ca.cert()), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(
        tls,
        "GET /v2/noise/blobs/{digest} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    tls.flush().unwrap();
    assert_eq!(
        tls.conn.peer_certificates().unwrap()[0].as_ref(),
        first.der.as_slice()
    );
    let mut reader = BufReader::new(tls);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    assert!(status_line.starts_with("HTTP/1.1 200"), "{status_line}");
    let mut length = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse::<u64>().ok();
            }
        }
    }
    assert_eq!(length, Some(size), "blob Content-Length");
    let mut blob = vec![0u8; 256 * 1024];
    reader.read_exact(&mut blob).unwrap();

    // Replace both files, as a certificate manager does.
    second.install_as(&live.cert(), &live.key());
    let took = wait_for_certificate(&server, &ca.cert(), &second, Duration::from_secs(4));
    eprintln!("the new certificate was served after {took:?}");

    // The download in flight goes on to the end, with the right bytes.
    let mut rest = Vec::new();
    reader
        .read_to_end(&mut rest)
        .or_else(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Ok(0)
            } else {
                Err(e)
            }
        })
        .expect("the download in flight was cut");
    blob.extend_from_slice(&rest);
    assert_eq!(
        blob.len() as u64,
        size,
        "the download in flight was cut short"
    );
    assert_eq!(sha256_digest(&blob), digest);

    // SIGHUP with nothing changed: the server stays up, same certificate.
    let pid = server.pid().expect("pid").to_string();
    run_ok(Command::new("kill").args(["-HUP", &pid]));
    thread::sleep(Duration::from_secs(1));
    assert!(server.is_running(), "SIGHUP stopped the server");
    assert_eq!(
        served_certificate(server.addr(), &ca.cert()).unwrap(),
        second.der
    );
    // SIGHUP after a change: the new certificate.
    third.install_as(&live.cert(), &live.key());
    run_ok(Command::new("kill").args(["-HUP", &pid]));
    let took = wait_for_certificate(&server, &ca.cert(), &third, Duration::from_secs(3));
    eprintln!("after SIGHUP the new certificate was served after {took:?}");
    assert!(server.is_running());
    let (status, _, body) = server_get(&server, "/v2/", &[]);
    assert_eq!(status, 200, "{}", text(&body));
}
