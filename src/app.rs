//! Start-up: storage, popularity data, the actors, and the HTTP server. Everything
//! that can be wrong with the configuration or the environment is found here and
//! reported as one line before the server accepts a request.

use crate::actors::coordinator::BuildCoordinator;
use crate::actors::nix_worker::NixWorker;
use crate::actors::signer::SignerActor;
use crate::actors::store_gc::StoreGc;
use crate::actors::upload::UploadActor;
use crate::auth::Auth;
use crate::blob_gc::{sweep::BlobSweeper, Retention};
use crate::config::{PackageSource, Settings};
use crate::http::{self, AppState};
use crate::layers::{LayerParams, Popularity};
use crate::limits::Limits;
use crate::nix::{self, NixOptions};
use crate::pipeline::{BuildContext, ImageSettings, NixPools};
use crate::process;
use crate::signing::ServiceAccountKey;
use crate::source::Sources;
use crate::state::SharedState;
use crate::storage::{filesystem::FsStorage, gcs::GcsStorage, s3::S3Storage, Storage};
use crate::tls::ReloadingCert;
use actix::prelude::*;
use actix_web::{middleware, web, App, HttpServer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub async fn run(settings: Settings) -> Result<(), String> {
    crate::compression::set_threads(settings.layers.compression_threads);
    let sources = Sources::start(&settings)?;
    let source = sources.source().clone();
    let storage =
        Arc::new(match settings.storage.backend.as_str() {
            "gcs" => Storage::Gcs(
                GcsStorage::open(&settings.storage)
                    .await
                    .map_err(|e| e.to_string())?,
            ),
            "s3" => Storage::S3(
                S3Storage::open(&settings.storage)
                    .await
                    .map_err(|e| e.to_string())?,
            ),
            _ => Storage::Filesystem(FsStorage::open(Path::new(&settings.storage.path)).map_err(
                |e| format!("storage.path (STORAGE_PATH) {}: {e}", settings.storage.path),
            )?),
        });
    let (popularity, popularity_id) = load_popularity(&settings.layers.popularity_url).await?;
    let auth = Auth::from_settings(&settings.auth)?.map(Arc::new);
    let metrics_token = match settings.auth.metrics_token.as_str() {
        "" => None,
        path => {
            let token = std::fs::read_to_string(path)
                .map_err(|e| format!("auth.metrics_token {path}: {e}"))?;
            Some(token.trim().to_string()).filter(|t| !t.is_empty())
        }
    };
    let tls = match settings.server.tls_cert.as_str() {
        "" => None,
        cert => Some(ReloadingCert::open(
            cert.into(),
            settings.server.tls_key.clone().into(),
        )?),
    };
    let limits = Arc::new(Limits::new(
        settings.limits.pulls_per_minute,
        settings.limits.builds_per_hour,
    ));
    let (expr_file, home) = write_expression()?;
    let signing_key = match (storage.name(), settings.storage.credentials.as_str()) {
        ("gcs", path) if !path.is_empty() => {
            let json = std::fs::read(path).map_err(|e| {
                format!("storage.credentials (GOOGLE_APPLICATION_CREDENTIALS) {path}: {e}")
            })?;
            Some(ServiceAccountKey::from_json(&json).map_err(|e| {
                format!("storage.credentials (GOOGLE_APPLICATION_CREDENTIALS) {path}: {e}")
            })?)
        }
        _ => None,
    };

    let workers = settings.nix_workers();
    let nix = &settings.nix;
    let options = NixOptions {
        substituters: nix.substituters.clone(),
        trusted_public_keys: nix.trusted_public_keys.clone(),
        connect_timeout_secs: nix.connect_timeout_secs,
        stalled_download_timeout_secs: nix.stalled_download_timeout_secs,
        tarball_ttl_secs: settings.source.ref_ttl_secs,
        max_jobs: nix.max_jobs,
    };
    let expr_dir = expr_file
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let mut path_labels = vec![(expr_dir, "<nixery>".to_string())];
    if let PackageSource::Path(p) = &source {
        path_labels.insert(
            0,
            (p.trim_end_matches('/').to_string(), "<package set>".into()),
        );
    }
    if !settings.source.nixpkgs_config.is_empty() {
        path_labels.push((
            settings.source.nixpkgs_config.clone(),
            "<source.nixpkgs_config>".into(),
        ));
    }
    let worker = NixWorker {
        expr_file: expr_file.display().to_string(),
        bin_dir: (!nix.bin_dir.is_empty()).then(|| PathBuf::from(&nix.bin_dir)),
        eval_timeout: Duration::from_secs(nix.eval_timeout_secs.max(1)),
        build_timeout: Duration::from_secs(nix.timeout_secs),
        options: options.args(),
        config: sources.nixpkgs_config().clone(),
        home,
        cache_home: fetch_cache_dir(),
        path_labels,
        serve: Default::default(),
    };
    // Before the listener, not beside the first request: on an empty /nix (a
    // Deployment's emptyDir) this session creates Nix's database, and Nix 2.8
    // gives up on a database that another process is creating at the same moment
    // ("database is busy") rather than waiting for it.
    worker.warm_up();
    // The collector's own worker, started only where builds can be rooted.
    let gc_worker = worker.clone();
    // Evaluations, realisations and packing each get workers of their own (see
    // NixPools): at most `workers` Nix builds and `eval_workers` evaluations run at
    // once.
    let nix_pools = {
        let (e, r, p) = (worker.clone(), worker.clone(), worker);
        let cpus = settings.cpu_workers();
        let evaluators = settings.eval_workers();
        NixPools::new(
            (
                SyncArbiter::start(evaluators, move || e.clone()),
                evaluators,
                Duration::from_millis(settings.nix.eval_gather_ms),
            ),
            (SyncArbiter::start(workers, move || r.clone()), workers),
            SyncArbiter::start(cpus, move || p.clone()),
        )
    };
    let roots = match nix::gc::GcRoots::open(Path::new(&settings.nix.gc_roots_dir)) {
        Ok(roots) => Some(roots),
        Err(e) => {
            log::warn!(
                "{e}: builds hold no GC roots, so the registry never runs Nix's garbage collector"
            );
            None
        }
    };
    let uploader = UploadActor::new(storage.clone(), settings.storage.upload_concurrency).start();
    let signer = SignerActor::new(
        signing_key,
        &settings.storage.endpoint,
        Duration::from_secs(settings.storage.signed_url_ttl_secs.max(1)),
    )
    .start();
    let shared = Arc::new(SharedState::default());
    let image_settings = ImageSettings {
        popularity,
        popularity_id,
        params: LayerParams {
            budget: settings.layers.budget,
            popularity_threshold: settings.layers.popularity_threshold,
            size_threshold: settings.layers.size_threshold,
        },
        gzip_level: settings.layers.gzip_level,
        zstd_level: settings.layers.zstd_level,
        max_image_bytes: settings.limits.max_image_bytes,
        // A build holds its lease at most as long as Nix may run, plus packing.
        lease_ttl: Duration::from_secs(settings.nix.timeout_secs + 300),
    };
    let mut context = BuildContext::new(
        Arc::new(nix_pools),
        uploader,
        storage.clone(),
        image_settings,
        shared.clone(),
        limits.clone(),
    );
    if let Some(roots) = roots {
        context = context.with_roots(roots);
        let mib = |n: u64| n << 20;
        let gc = StoreGc {
            store: PathBuf::from("/nix/store"),
            min_free: mib(settings.nix.gc_min_free_mib),
            max_free: mib(settings.nix.gc_max_free_mib),
            interval: (settings.nix.gc_interval_secs > 0)
                .then(|| Duration::from_secs(settings.nix.gc_interval_secs)),
            check: Duration::from_secs(settings.nix.gc_check_secs),
            worker: SyncArbiter::start(1, move || gc_worker.clone()),
            shared: shared.clone(),
        };
        actix_web::rt::spawn(gc.run());
    }
    let retention = Retention::new(
        settings.storage.retention_secs,
        settings.storage.sweep,
        settings.storage.sweep_interval_secs,
    );
    if let Some(retention) = retention.filter(|r| r.sweep) {
        let sweeper = BlobSweeper {
            storage: storage.clone(),
            shared: shared.clone(),
            retention,
        };
        actix_web::rt::spawn(sweeper.run());
    }
    let context = Arc::new(context);
    // The coordinator and the builds it spawns get a thread of their own, away from
    // the HTTP workers.
    let coordinator_arbiter = Arbiter::new();
    let capacity = workers + settings.nix.queue_limit;
    let failure_ttl = Duration::from_secs(settings.nix.failure_cache_secs);
    let coordinator =
        BuildCoordinator::start_in_arbiter(&coordinator_arbiter.handle(), move |_| {
            BuildCoordinator::new(context, capacity, failure_ttl)
        });

    let state = web::Data::new(AppState {
        coordinator,
        signer,
        storage: storage.clone(),
        shared,
        sources,
        verify_interval: Duration::from_secs(settings.storage.verify_interval_secs),
        retention,
        compression: settings.compression().map_err(|e| e.to_string())?,
        limits: settings.limits.clone(),
        systems: settings.systems().map_err(|e| e.to_string())?,
        auth,
        rate_limits: limits.clone(),
        metrics_token,
        metrics_here: settings.server.metrics_listen.is_empty(),
    });
    {
        let limits = limits.clone();
        actix_web::rt::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                limits.forget_idle();
            }
        });
    }
    let metrics_state = state.clone();
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .wrap(middleware::from_fn(http::limit_head))
            .wrap(middleware::from_fn(http::observe))
            // `%a` would build the request's ConnectionInfo (forwarding headers,
            // host, scheme) for every access line only to print the peer's address.
            .wrap(
                middleware::Logger::new("%{peer}xi \"%r\" %s %b %Dms")
                    .custom_request_replace("peer", |req| http::client_address(req.request())),
            )
            .configure(http::configure)
    })
    .client_request_timeout(Duration::from_secs(
        settings.server.client_request_timeout_secs,
    ))
    .keep_alive(Duration::from_secs(settings.server.keep_alive_secs))
    .shutdown_timeout(settings.server.shutdown_grace_secs)
    .max_connections(settings.server.max_connections);
    server = server.workers(http_workers(settings.server.http_workers));
    let addr = (settings.server.listen.as_str(), settings.server.port);
    let bind_error = |e: std::io::Error| {
        format!(
            "server.listen/server.port (NIXERY_LISTEN/PORT) {}:{}: {e}",
            settings.server.listen, settings.server.port
        )
    };
    let (server, scheme) = match &tls {
        Some(cert) => {
            let config = cert.server_config()?;
            cert.watch();
            (
                server.bind_rustls_0_23(addr, config).map_err(bind_error)?,
                "https",
            )
        }
        None => (server.bind(addr).map_err(bind_error)?, "http"),
    };
    for addr in server.addrs() {
        log::info!(
            "listening on {scheme}://{addr} ({} storage, source {:?}, {workers} Nix workers)",
            storage.name(),
            source
        );
    }
    if !settings.server.metrics_listen.is_empty() {
        let listen = settings.server.metrics_listen.clone();
        let metrics = HttpServer::new(move || {
            App::new()
                .app_data(metrics_state.clone())
                .configure(http::configure_metrics)
        })
        .workers(1)
        .bind(&listen)
        .map_err(|e| format!("server.metrics_listen {listen}: {e}"))?;
        for addr in metrics.addrs() {
            log::info!("metrics on http://{addr}/metrics");
        }
        actix_web::rt::spawn(metrics.run());
    }
    let result = server.run().await.map_err(|e| e.to_string());
    coordinator_arbiter.stop();
    // Builds still running have nobody left to answer, and would hold their
    // locks against the next server's builds.
    let stopped = tokio::task::spawn_blocking(|| process::stop_all(Duration::from_secs(5)))
        .await
        .unwrap_or(0);
    if stopped > 0 {
        log::info!("stopped {stopped} Nix processes that were still running");
    }
    result
}

/// The Nix expression lives in the binary; Nix reads it from a private file. Next
/// to it, the empty HOME of every Nix call.
fn write_expression() -> Result<(PathBuf, PathBuf), String> {
    let dir = std::env::temp_dir().join(format!("nixery-{}", std::process::id()));
    let home = dir.join("home");
    std::fs::create_dir_all(&home).map_err(|e| format!("creating {}: {e}", home.display()))?;
    let path = dir.join("prepare-image.nix");
    std::fs::write(&path, nix::PREPARE_IMAGE_NIX)
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok((path, home))
}

/// Where Nix keeps fetched tarballs and git clones for the server's account.
fn fetch_cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
}

/// Popularity data from a URL or a file; none means every package counts 1.
async fn load_popularity(url: &str) -> Result<(Popularity, String), String> {
    if url.is_empty() {
        return Ok((Popularity::default(), "none".into()));
    }
    let what = "layers.popularity_url (NIX_POPULARITY_URL)";
    let bytes = if url.starts_with("http://") || url.starts_with("https://") {
        let response = reqwest::get(url)
            .await
            .map_err(|e| format!("{what} {url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{what} {url}: HTTP {}", response.status()));
        }
        response
            .bytes()
            .await
            .map_err(|e| format!("{what} {url}: {e}"))?
            .to_vec()
    } else {
        let path = url.strip_prefix("file://").unwrap_or(url);
        std::fs::read(path).map_err(|e| format!("{what} {path}: {e}"))?
    };
    let popularity = Popularity::from_json(&bytes).map_err(|e| format!("{what} {url}: {e}"))?;
    let id = hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes));
    Ok((popularity, id))
}

/// HTTP workers: as configured, else two per CPU. Each worker serves its own
/// connections on one thread, and a worker the kernel preempts (for a client its
/// answer woke, or a build's compression thread) holds up every connection it owns;
/// with two per CPU the others go on. Warm manifests under `wrk -t2 -c64` on 2 CPUs:
/// 40-42k requests a second with one worker per CPU, 52-58k with two, 50-53k with
/// four; beside a busy `zstd -T2`, 27-30k (p99 6.9-7.8 ms) against 41-42k (5.8-6.5 ms).
fn http_workers(configured: usize) -> usize {
    match configured {
        0 => 2 * std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}
