//! No convoy: an image whose store paths are already in the Nix store is evaluated,
//! packed and answered while another image's long Nix build holds the only build
//! worker. (Evaluations, realisations and packing have queues of their own, and an
//! image whose outputs are valid needs no realisation slot.)

mod common;

use common::*;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

const DOCKER: &str = "application/vnd.docker.distribution.manifest.v2+json";

fn get(server: &Server, name: &str) -> (u16, String) {
    let url = server.url(&format!("/v2/{name}/manifests/latest"));
    let (status, _, body) =
        http_request("GET", &url, &[("Accept", DOCKER)], Duration::from_secs(180))
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Waits until the build page shows `name` building.
fn wait_building(server: &Server, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, _, body) = http_get(&server.url("/builds"), &[]);
        let page = String::from_utf8_lossy(&body).into_owned();
        if page.contains(&format!("\"{name}\"")) && page.contains("building") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never started building: {page}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Requests every name at once; each answer's status and body, in order.
fn get_all(server: &Server, names: &[&str]) -> Vec<(u16, String)> {
    let answers: Vec<_> = names
        .iter()
        .map(|name| {
            let url = server.url(&format!("/v2/{name}/manifests/latest"));
            thread::spawn(move || {
                http_request("GET", &url, &[("Accept", DOCKER)], Duration::from_secs(180))
                    .map(|(status, _, body)| (status, String::from_utf8_lossy(&body).into_owned()))
            })
        })
        .collect();
    names
        .iter()
        .zip(answers)
        .map(|(name, answer)| {
            answer
                .join()
                .unwrap()
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        })
        .collect()
}

#[test]
fn an_image_already_in_the_store_does_not_wait_for_another_images_build() {
    // One worker per queue: before the queues were separate, the new image's
    // evaluation waited behind `slow`'s 30 s realisation.
    let server = Server::start(&[("NIXERY_NIX__WORKERS", "1")]);
    // cowsay and hello are in the store, but no image of them has been made.
    nix_build(server.pkgs_path(), &["cowsay", "hello"]);

    let slow = {
        let url = server.url("/v2/slow/manifests/latest");
        thread::spawn(move || {
            let started = Instant::now();
            let answer = http_request("GET", &url, &[("Accept", DOCKER)], Duration::from_secs(300));
            (answer.map(|a| a.0), started.elapsed())
        })
    };
    // Wait until `slow` holds the build worker: its builder is sleeping.
    wait_building(&server, "slow");

    let (status, body) = get(&server, "cowsay/hello");
    assert_eq!(status, 200, "{body}");
    assert!(
        !slow.is_finished(),
        "cowsay/hello was answered only after slow's build had ended"
    );
    // It was packed now, not found: a real image of its own.
    let log = server.log();
    assert!(
        log.lines()
            .any(|l| l.contains("build cowsay/hello [") && l.contains("compressing and uploading")),
        "{}",
        tail_lines(&log, 30)
    );

    let (status, took) = slow.join().expect("slow thread");
    assert_eq!(status.expect("slow answered"), 200);
    eprintln!("slow took {took:?}; cowsay/hello was answered while it built");
}

#[test]
fn a_build_stuck_behind_a_lock_with_nothing_building_is_started_again() {
    let server = Server::start(&[]);
    // Another process holds the lock of hello's output for 14 s and builds
    // nothing, as a Nix process does that waits for a lock this build holds.
    let out = run_ok(Command::new("nix-instantiate").args([
        "--eval".to_string(),
        "-E".to_string(),
        format!(
            "(import {} {{}}).hello.outPath",
            server.pkgs_path().display()
        ),
    ]));
    let out_path = out.stdout.trim().trim_matches('"').to_string();
    assert!(out_path.starts_with("/nix/store/"), "{out_path}");
    let mut holder = Command::new("flock")
        .args([&format!("{out_path}.lock"), "sleep", "14"])
        .spawn()
        .expect("flock");
    let started = Instant::now();
    let (status, body) = get(&server, "hello");
    let took = started.elapsed();
    let _ = holder.wait();
    assert_eq!(status, 200, "{body}");
    let log = server.log();
    assert!(
        log.contains("nix-store waited 10 s for a lock with nothing building"),
        "never started again:\n{log}"
    );
    assert!(took >= Duration::from_secs(10), "answered in {took:?}");
}

#[test]
fn evaluations_that_queue_are_batched_and_a_refusal_is_still_its_own() {
    // One evaluation worker: requests arriving together queue, and the next
    // evaluation takes them all.
    let server = Server::start(&[("NIXERY_NIX__EVAL_WORKERS", "1")]);
    let alone = Server::start(&[(
        "NIXERY_PKGS_PATH",
        server.pkgs_path().to_str().expect("utf-8 path"),
    )]);
    let (status, refused_alone) = get(&alone, "unfreeapp");
    assert_eq!(status, 400, "{refused_alone}");

    let names = [
        "hello",
        "cowsay",
        "unfreeapp",
        "hello/cowsay",
        "coreutils",
        "nano",
        "hello/nano",
        "moreutils",
    ];
    // hello first: the others, unfreeapp among them, queue behind its evaluation.
    let answers: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let url = server.url(&format!("/v2/{name}/manifests/latest"));
            if i == 1 {
                thread::sleep(Duration::from_millis(20));
            }
            thread::spawn(move || {
                http_request("GET", &url, &[("Accept", DOCKER)], Duration::from_secs(180))
                    .map(|(status, _, body)| (status, String::from_utf8_lossy(&body).into_owned()))
            })
        })
        .collect();
    for (name, answer) in names.iter().zip(answers) {
        let (status, body) = answer
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if *name == "unfreeapp" {
            // The same refusal as when it was evaluated alone.
            assert_eq!((status, body.as_str()), (400, refused_alone.as_str()));
        } else {
            assert_eq!(status, 200, "{name}: {body}");
        }
    }
    let log = server.log();
    let batched: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("images in one nix-instantiate"))
        .collect();
    assert!(
        !batched.is_empty(),
        "no evaluation took more than one request:\n{log}"
    );
    assert!(
        batched.iter().any(|l| l.contains("1 to evaluate alone")),
        "unfreeapp was not evaluated alone after its batch: {batched:?}"
    );
}

#[test]
fn a_burst_of_new_images_is_evaluated_in_one_batch_behind_the_first() {
    let names = ["hello", "cowsay", "nano", "hello/nano"];
    // Two evaluation workers, each evaluation slowed by 2 s, so the whole burst
    // arrives while the first evaluation runs, however loaded the machine is.
    let burst = |gather_ms: &str| {
        let nix = NixWrappers::new();
        nix.set_eval_delay("2");
        let server = Server::start(&[
            ("NIXERY_NIX__BIN_DIR", &nix.bin_dir()),
            ("NIXERY_NIX__EVAL_WORKERS", "2"),
            ("NIXERY_NIX__EVAL_GATHER_MS", gather_ms),
        ]);
        for (name, (status, body)) in names.iter().zip(get_all(&server, &names)) {
            assert_eq!(status, 200, "{name}: {body}");
        }
        (nix.count("nix-instantiate"), server.log())
    };
    // The last free worker waits for the burst: the first image is evaluated
    // alone, the three others together.
    let (evaluations, log) = burst("1000");
    assert!(
        log.contains("evaluated 3 images in one nix-instantiate"),
        "the burst was not one batch:\n{log}"
    );
    assert_eq!(evaluations, 2, "{log}");
    // Without waiting, the second worker takes the second image alone, and the
    // two others wait for a worker.
    let (evaluations, log) = burst("0");
    assert!(
        log.contains("evaluated 2 images in one nix-instantiate"),
        "{log}"
    );
    assert_eq!(evaluations, 3, "{log}");
}

#[test]
fn realisations_that_queue_are_batched_and_a_failed_build_is_still_its_own() {
    // One build worker: images queued behind graph.g9's chain of ten builds are
    // realised together when it is free.
    let server = Server::start(&[("NIXERY_NIX__WORKERS", "1")]);
    let alone = Server::start(&[(
        "NIXERY_PKGS_PATH",
        server.pkgs_path().to_str().expect("utf-8 path"),
    )]);
    let blocker = {
        let url = server.url("/v2/graph.g9/manifests/latest");
        thread::spawn(move || {
            http_request("GET", &url, &[("Accept", DOCKER)], Duration::from_secs(180))
        })
    };
    wait_building(&server, "graph.g9");
    let names = [
        "hello",
        "cowsay",
        "broken",
        "hello/cowsay",
        "nano",
        "graph.g1/graph.g11",
    ];
    let answers = get_all(&server, &names);
    let (status, _, _) = blocker.join().unwrap().expect("graph.g9");
    assert_eq!(status, 200);
    // Alone, with the store as the batch left it (Nix's message names every
    // derivation it could not build).
    let (failed_status, failed_alone) = get(&alone, "broken");
    assert!(failed_status >= 400, "{failed_status}: {failed_alone}");
    for (name, (status, body)) in names.iter().zip(&answers) {
        if *name == "broken" {
            // The same failure as when it was realised alone.
            assert_eq!(
                (*status, body.as_str()),
                (failed_status, failed_alone.as_str())
            );
        } else {
            assert_eq!(*status, 200, "{name}: {body}");
        }
    }
    let log = server.log();
    let batched: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("images in one nix-store"))
        .collect();
    assert!(
        batched
            .iter()
            .any(|l| l.contains("1 did not build there and are realised alone")),
        "no realisation took the queued images, broken among them, together: {batched:?}\n{log}"
    );
}
