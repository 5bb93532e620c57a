//! The HTTP edge: the read-only registry API under `/v2/`, the page at `/`, and the
//! build status as JSON. Handlers parse, ask the caches or the actors, and shape
//! responses; GET and HEAD share every code path so their headers always agree.

use crate::actors::coordinator::{BuildCoordinator, GetImage, Target};
use crate::actors::signer::{BlobAccess, LocateBlob, SignerActor};
use crate::auth::{self, Auth, Caller, Credentials, Denied};
use crate::blob_gc::{self, Retention};
use crate::built::BuiltImage;
use crate::compression::{self, Compression};
use crate::config::Limits;
use crate::error::RegistryError;
use crate::image::{Arch, ImageRequest};
use crate::limits;
use crate::manifest::{self, ManifestFormat};
use crate::pipeline::{self, image_in_storage, load_referrers, Client, Job};
use crate::reference::{parse_route, Digest, Reference, Route};
use crate::source::ResolvedSource;
use crate::source::Sources;
use crate::state::{KnownManifest, SharedState};
use crate::storage::Storage;
use crate::tags;
use actix::Addr;
use actix_web::body::{BoxBody, EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use std::sync::Arc;

/// Manifests are small; anything larger stored under a digest is a layer.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;

pub struct AppState {
    pub coordinator: Addr<BuildCoordinator>,
    pub signer: Addr<SignerActor>,
    pub storage: Arc<Storage>,
    pub shared: Arc<SharedState>,
    pub sources: Arc<Sources>,
    /// How long storage is trusted to keep a cached image's blobs.
    pub verify_interval: std::time::Duration,
    /// How long unused blobs are kept; None: forever.
    pub retention: Option<Retention>,
    /// How layers are compressed unless the name asks for zstd.
    pub compression: Compression,
    pub limits: Limits,
    /// The platforms images are built for, sorted; more than one means indexes.
    pub systems: Vec<Arch>,
    /// Who may pull and build; None: everyone.
    pub auth: Option<Arc<Auth>>,
    /// Each client's allowance of pulls (and, in the builds, of new images).
    pub rate_limits: Arc<limits::Limits>,
    /// A token `/metrics` requires, if any.
    pub metrics_token: Option<String>,
    /// Whether `/metrics` is served on this port (not on a port of its own).
    pub metrics_here: bool,
}

impl AppState {
    /// The platform of a name without a prefix when no index is served: the host's
    /// if it is configured.
    fn default_arch(&self) -> Arch {
        Arch::host()
            .filter(|h| self.systems.contains(h))
            .or_else(|| self.systems.first().copied())
            .unwrap_or(Arch::Amd64)
    }

    /// What a manifest request by tag asks the coordinator for: an index when the
    /// name picks no platform, several are served and the client reads indexes;
    /// otherwise one platform's image.
    fn build_target(
        &self,
        request: &ImageRequest,
        source: &ResolvedSource,
        index: Option<ManifestFormat>,
        client: Option<Client>,
    ) -> GetImage {
        match (request.arch, index) {
            (None, Some(_)) if self.systems.len() > 1 => {
                // The jobs' keys are the index key's material: computed once, on
                // every warm request.
                let jobs: Vec<Job> = self
                    .systems
                    .iter()
                    .map(|a| Job::new(request, *a, source).for_client(client.clone()))
                    .collect();
                let keys: Vec<&str> = jobs.iter().map(|j| j.key.as_str()).collect();
                GetImage {
                    key: pipeline::index_key_of(&keys),
                    name: request.display_name(),
                    target: Target::Index(jobs),
                }
            }
            (arch, _) => GetImage::image(
                Job::new(request, arch.unwrap_or(self.default_arch()), source).for_client(client),
            ),
        }
    }
}

/// The route table, shared by `main` and the tests.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(index))
        .route("/metrics", web::get().to(metrics))
        .route("/token", web::get().to(token))
        .route("/healthz", web::get().to(healthz))
        .route("/builds", web::get().to(builds))
        .route("/builds/{image:.*}", web::get().to(build_of))
        .default_service(web::to(dispatch));
}

/// The route table of the metrics port (`server.metrics_listen`).
pub fn configure_metrics(cfg: &mut web::ServiceConfig) {
    cfg.route("/metrics", web::get().to(metrics_only));
}

const INDEX_HTML: &str = include_str!("../web/index.html");

async fn index() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(INDEX_HTML)
}

/// For probes: answers whenever the server takes requests, without credentials
/// (`/v2/` needs a token once authentication is on).
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

async fn metrics(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if !state.metrics_here {
        return RegistryError::new(
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            "metrics are served on server.metrics_listen",
        )
        .respond();
    }
    metrics_only(req, state).await
}

async fn metrics_only(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if let Some(expected) = &state.metrics_token {
        let given = match credentials(&req) {
            Credentials::Bearer(t) => t,
            _ => String::new(),
        };
        // Digests compare in constant time whatever the token's length.
        let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
        if digest(&given).as_ref() != digest(expected).as_ref() {
            return RegistryError::unauthorized(
                "metrics need the token of auth.metrics_token",
                r#"Bearer realm="metrics""#.into(),
            )
            .respond();
        }
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.shared.stats.render())
}

fn credentials(req: &HttpRequest) -> Credentials {
    Credentials::parse(
        req.headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
    )
}

/// `scheme://host` as the client named this server, for the token realm.
fn base_url(req: &HttpRequest) -> String {
    let info = req.connection_info();
    format!("{}://{}", info.scheme(), info.host())
}

/// The Docker token endpoint: a token for the caller, granting pull of the
/// repositories in the `scope` parameters.
async fn token(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let Some(auth) = state.auth.as_ref().filter(|a| a.issues_tokens()) else {
        return RegistryError::new(
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            "this registry issues no tokens",
        )
        .respond();
    };
    let caller = match auth.token_caller(&credentials(&req)).await {
        Ok(caller) => caller,
        Err(denied) => {
            log::info!("token refused to {}: {denied}", client_address(&req));
            let message = match denied {
                Denied::NoCredentials => "this registry needs a login".to_string(),
                other => other.to_string(),
            };
            return RegistryError::unauthorized(message, auth::BASIC_CHALLENGE.into()).respond();
        }
    };
    let scopes: Vec<String> = req
        .query_string()
        .split('&')
        .filter_map(|p| p.strip_prefix("scope="))
        .map(|v| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    // One scope parameter may name several scopes, space-separated.
    let scopes = scopes.iter().flat_map(|s| s.split(' '));
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(auth.issue(&caller, scopes))
}

/// The address a client connects from, which keys anonymous callers' limits and
/// starts its access lines.
pub fn client_address(req: &HttpRequest) -> String {
    req.peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Whether the caller may see the build pages: under `auth.anonymous = none`
/// only with credentials (Basic, so a browser can ask for them).
async fn may_see_builds(req: &HttpRequest, state: &AppState) -> Result<(), HttpResponse> {
    let Some(auth) = &state.auth else {
        return Ok(());
    };
    if auth.anonymous != auth::Anonymous::None {
        return Ok(());
    }
    match auth.caller(&credentials(req), None).await {
        Ok(Caller::User(_)) => Ok(()),
        _ => Err(RegistryError::unauthorized(
            "the build pages need a login",
            auth::BASIC_CHALLENGE.into(),
        )
        .respond()),
    }
}

async fn builds(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if let Err(denied) = may_see_builds(&req, &state).await {
        return denied;
    }
    HttpResponse::Ok().json(serde_json::json!({
        "builds": state.shared.builds(),
        "failures": state.shared.recent_failures(),
        "store": state.shared.store_state(),
        "blobs": state.shared.sweep_state(),
    }))
}

async fn build_of(
    req: HttpRequest,
    state: web::Data<AppState>,
    image: web::Path<String>,
) -> HttpResponse {
    if let Err(denied) = may_see_builds(&req, &state).await {
        return denied;
    }
    let image = image.into_inner();
    let builds: Vec<_> = state
        .shared
        .builds()
        .into_iter()
        .filter(|b| b.image == image)
        .collect();
    let failures: Vec<_> = state
        .shared
        .recent_failures()
        .into_iter()
        .filter(|f| f.image == image)
        .collect();
    HttpResponse::Ok().json(serde_json::json!({ "builds": builds, "failures": failures }))
}

async fn dispatch(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if req.path() != "/v2" && !req.path().starts_with("/v2/") {
        return RegistryError::new(StatusCode::NOT_FOUND, "UNSUPPORTED", "not found").respond();
    }
    match registry(&req, &state).await {
        Ok(response) => response,
        Err(e) => {
            if e.status.is_server_error() {
                log::error!("{} {}: {e}", req.method(), req.path());
            }
            e.respond()
        }
    }
}

async fn registry(req: &HttpRequest, state: &AppState) -> Result<HttpResponse, RegistryError> {
    // GET and HEAD share every path below: actix-web drops HEAD bodies itself.
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return Err(RegistryError::unsupported(format!(
            "{} is not supported: this registry builds images and accepts no uploads",
            req.method()
        )));
    }
    let route = parse_route(req.path(), state.limits.max_name_length)?;
    let repository = route.repository().map(str::to_string);
    let caller = authorize(req, state, repository.as_deref()).await?;
    // Manifest GETs draw on the pull allowance; HEAD requests and blobs are free.
    let allowance = match (&route, req.method()) {
        (Route::Manifest { .. }, &Method::GET) => state
            .rate_limits
            .check(
                limits::Kind::Pulls,
                || client_key(req, &caller),
                &state.shared.stats,
            )
            .map_err(|exceeded| {
                let mut e = RegistryError::too_many(exceeded.message(), exceeded.retry_after_secs);
                e.headers.extend(exceeded.headers());
                e
            })?,
        _ => None,
    };
    let served = serve(req, state, route, &caller).await;
    match served {
        Ok(mut response) => {
            for (name, value) in allowance.iter().flat_map(|a| a.headers()) {
                if let (Ok(name), Ok(value)) = (
                    header::HeaderName::from_bytes(name.as_bytes()),
                    header::HeaderValue::from_str(&value),
                ) {
                    response.headers_mut().insert(name, value);
                }
            }
            Ok(response)
        }
        // A build the caller may not start: the challenge sends them to log in.
        Err(mut e) if e.status == StatusCode::UNAUTHORIZED => {
            if let Some(auth) = &state.auth {
                e.headers.push((
                    "WWW-Authenticate",
                    auth.challenge(&base_url(req), repository.as_deref()),
                ));
            }
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// The caller a build request carries, if its admission depends on it.
fn client_of(get: &GetImage) -> Option<Client> {
    match &get.target {
        Target::Image(job) => job.client.clone(),
        Target::Index(jobs) => jobs.first().and_then(|j| j.client.clone()),
    }
}

/// The caller of a registry route.
async fn authorize(
    req: &HttpRequest,
    state: &AppState,
    repository: Option<&str>,
) -> Result<Caller, RegistryError> {
    let caller = match &state.auth {
        None => Caller::Anonymous,
        Some(auth) => auth
            .caller(&credentials(req), repository)
            .await
            .map_err(|denied| {
                let message = match &denied {
                    Denied::NoCredentials => "authentication required".to_string(),
                    other => other.to_string(),
                };
                RegistryError::unauthorized(message, auth.challenge(&base_url(req), repository))
            })?,
    };
    Ok(caller)
}

/// The key a caller's limits are counted under: the user, or the address of an
/// anonymous caller. Made only where a limit or a login applies.
fn client_key(req: &HttpRequest, caller: &Caller) -> String {
    match caller.user() {
        Some(user) => format!("user:{user}"),
        None => client_address(req),
    }
}

async fn serve(
    req: &HttpRequest,
    state: &AppState,
    route: Route,
    caller: &Caller,
) -> Result<HttpResponse, RegistryError> {
    match route {
        Route::Base => Ok(HttpResponse::Ok()
            .insert_header(("Docker-Distribution-API-Version", "registry/2.0"))
            .content_type("application/json")
            .body("{}")),
        Route::TagsList { name } => {
            ImageRequest::from_name(&name, state.limits.max_packages)?;
            let page = tags::page(&state.sources.tags(), req.query_string()).map_err(|e| {
                RegistryError::new(
                    StatusCode::BAD_REQUEST,
                    "PAGINATION_NUMBER_INVALID",
                    e.to_string(),
                )
            })?;
            let mut response = HttpResponse::Ok();
            response.insert_header(("Docker-Distribution-API-Version", "registry/2.0"));
            if let Some(next) = &page.next {
                response.insert_header((
                    header::LINK,
                    format!("</v2/{name}/tags/list?{next}>; rel=\"next\""),
                ));
            }
            Ok(response.json(serde_json::json!({ "name": name, "tags": page.tags })))
        }
        Route::Referrers { name, digest } => {
            ImageRequest::from_name(&name, state.limits.max_packages)?;
            referrers(req, state, &digest).await
        }
        Route::Manifest {
            name,
            reference: Reference::Tag(tag),
        } => {
            let named = ImageRequest::from_name(&name, state.limits.max_packages)?;
            let asked_zstd = named.compression.is_some();
            let request = named.with_default_compression(state.compression);
            if request.compression() == Compression::Zstd {
                zstd_client(req, &name, asked_zstd)?;
            }
            let source = state.sources.resolve(&tag).await?;
            let accept = || {
                req.headers()
                    .get_all(header::ACCEPT)
                    .filter_map(|v| v.to_str().ok())
            };
            let index = ManifestFormat::negotiate_index(accept());
            // Only where a caller could be refused a build does the build know them.
            let client =
                (state.auth.is_some() || state.rate_limits.limits_builds()).then(|| Client {
                    key: client_key(req, caller),
                    may_build: state.auth.as_ref().is_none_or(|a| a.may_build(caller)),
                });
            let get = state.build_target(&request, &source, index, client);
            let mut image = built_image(state, &get, &name).await?;
            // A manifest is handed out only with its blobs marked as used, so that
            // none is swept while the client fetches it; a blob swept before that
            // means the image is built again.
            for attempt in 1.. {
                if in_use(state, image.blobs().unwrap_or_default()).await? {
                    break;
                }
                if attempt == 3 {
                    return Err(RegistryError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UNAVAILABLE",
                        format!("{name}: storage lost the image's blobs again as it was rebuilt; try again"),
                    ));
                }
                log::warn!("{name}: blobs of the image were swept as unused; building it again");
                state.shared.forget_image(&get.key);
                image = built_image(state, &get, &name).await?;
            }
            state.sources.served(&tag);
            let format = match (image.children.is_empty(), index) {
                // An image with zstd layers has an OCI manifest only, which the
                // client was checked to read.
                _ if image.oci_only() => ManifestFormat::Oci,
                (false, Some(index)) => index,
                _ => ManifestFormat::negotiate(accept()),
            };
            let m = image.manifest(format);
            Ok(manifest_response(
                image.media_type(format),
                &m.digest,
                m.bytes.clone(),
            ))
        }
        Route::Manifest {
            reference: Reference::Digest(digest),
            ..
        } => {
            let known = match state.shared.manifest_by_digest(&digest) {
                Some(known) => known,
                None => stored_manifest(state, &digest).await?,
            };
            if !in_use(state, &known.blobs).await? {
                // Only a tag says what to build again.
                state.shared.forget_manifest(&digest);
                return Err(RegistryError::manifest_unknown(&format!(
                    "{digest} was deleted after going unused; pull by tag to build it again"
                )));
            }
            Ok(manifest_response(known.media_type, &digest, known.bytes))
        }
        Route::Blob { digest, .. } => blob(req, state, digest).await,
    }
}

/// Refuses a zstd image to a client that cannot unpack it, before anything is
/// built. `asked` is whether the name asked for zstd, rather than the server's
/// default.
fn zstd_client(req: &HttpRequest, name: &str, asked: bool) -> Result<(), RegistryError> {
    let accepted = manifest::accepted_types(
        req.headers()
            .get_all(header::ACCEPT)
            .filter_map(|v| v.to_str().ok()),
    );
    let agent = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !compression::client_lacks_zstd(&accepted, agent) {
        return Ok(());
    }
    let instead = if asked {
        let mut components = name.split('/').collect::<Vec<_>>();
        if let Some(i) = components.iter().position(|c| *c == "zstd") {
            components.remove(i);
        }
        format!(", or pull {} (gzip) instead", components.join("/"))
    } else {
        " (this registry compresses every layer with zstd)".to_string()
    };
    Err(RegistryError::new(
        StatusCode::BAD_REQUEST,
        "UNSUPPORTED",
        format!(
            "{name} has zstd layers, which this client cannot unpack; pull it with docker 23 \
             or later, containerd, podman or skopeo{instead}"
        ),
    ))
}

/// The image for a tag request: cached, or from the coordinator.
async fn built_image(
    state: &AppState,
    get: &GetImage,
    name: &str,
) -> Result<Arc<BuiltImage>, RegistryError> {
    let key = &get.key;
    let cached = match state.shared.cached_image(key, state.verify_interval) {
        Some((image, true)) => Some(image),
        // Storage can lose blobs (a bucket emptied or restored): a cached image
        // is checked against it at most once per interval before it is served.
        Some((image, false)) => {
            let stored = image_in_storage(&state.storage, &state.shared, &image).await?;
            if stored {
                state.shared.image_verified(key);
                Some(image)
            } else {
                log::warn!("{name}: storage lost blobs of the cached image; rebuilding");
                state.shared.forget_image(key);
                None
            }
        }
        None => None,
    };
    if let Some(image) = cached {
        return Ok(image);
    }
    let first = state.coordinator.send(get.clone()).await?;
    Ok(match (first, client_of(get)) {
        // The build this request joined was started by a caller who
        // was turned away; this caller asks for itself.
        (Err(e), Some(client)) if e.refused_someone_else(&client) => {
            state.coordinator.send(get.clone()).await??
        }
        (other, _) => other?,
    })
}

/// Marks blobs a manifest names as used, under a retention; false when one is
/// gone and the manifest must not be served.
async fn in_use(state: &AppState, blobs: &[Digest]) -> Result<bool, RegistryError> {
    match &state.retention {
        Some(retention) => {
            Ok(blob_gc::mark_used(&state.storage, &state.shared, retention, blobs).await?)
        }
        None => Ok(true),
    }
}

/// The artifacts whose subject is the manifest `digest`, as an OCI image index;
/// empty (not 404) when there are none, as the distribution spec asks.
async fn referrers(
    req: &HttpRequest,
    state: &AppState,
    digest: &Digest,
) -> Result<HttpResponse, RegistryError> {
    let known = match state.shared.referrers_of(digest) {
        Some(known) => known,
        None => {
            let stored = load_referrers(&state.storage, digest).await?;
            state.shared.remember_referrers(&stored);
            stored
        }
    };
    let filter: Option<String> = req.query_string().split('&').find_map(|p| {
        let value = p.strip_prefix("artifactType=")?;
        Some(
            percent_encoding::percent_decode_str(value)
                .decode_utf8_lossy()
                .into_owned(),
        )
    });
    let manifests: Vec<serde_json::Value> = known
        .iter()
        .filter(|r| filter.as_ref().is_none_or(|t| &r.artifact_type == t))
        .map(|r| {
            serde_json::json!({
                "mediaType": manifest::OCI_MANIFEST,
                "digest": r.manifest.digest.to_string(),
                "size": r.manifest.bytes.len(),
                "artifactType": r.artifact_type,
            })
        })
        .collect();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest::OCI_INDEX,
        "manifests": manifests,
    });
    let mut response = HttpResponse::Ok();
    response
        .insert_header((header::CONTENT_TYPE, manifest::OCI_INDEX))
        .insert_header(("Docker-Distribution-API-Version", "registry/2.0"));
    if filter.is_some() {
        response.insert_header(("OCI-Filters-Applied", "artifactType"));
    }
    Ok(response.body(index.to_string()))
}

async fn stored_manifest(
    state: &AppState,
    digest: &Digest,
) -> Result<KnownManifest, RegistryError> {
    let unknown = || RegistryError::manifest_unknown(&digest.to_string());
    match state.storage.blob_size(digest).await? {
        Some(size) if size <= MAX_MANIFEST_BYTES => {}
        _ => return Err(unknown()),
    }
    let bytes = state.storage.read_blob(digest).await?.ok_or_else(unknown)?;
    state
        .shared
        .remember_manifest(digest.clone(), bytes)
        .ok_or_else(unknown)
}

fn manifest_response(media_type: &'static str, digest: &Digest, bytes: Bytes) -> HttpResponse {
    let mut response = HttpResponse::Ok();
    response
        .insert_header((header::CONTENT_TYPE, media_type))
        .insert_header(("Docker-Content-Digest", digest.to_string()))
        .insert_header(("Docker-Distribution-API-Version", "registry/2.0"))
        .insert_header((header::ETAG, format!("\"{digest}\"")));
    // actix-web drops the body of a HEAD response but keeps its Content-Length, so
    // HEAD and GET always agree on it.
    response.body(bytes)
}

async fn blob(
    req: &HttpRequest,
    state: &AppState,
    digest: Digest,
) -> Result<HttpResponse, RegistryError> {
    if !state.shared.is_known_blob(&digest) {
        if state.storage.blob_size(&digest).await?.is_none() {
            return Err(RegistryError::blob_unknown(&digest.to_string()));
        }
        state.shared.remember_blob(&digest);
    }
    let access = state
        .signer
        .send(LocateBlob {
            location: state.storage.locate(&digest),
        })
        .await?
        .map_err(|e| RegistryError::internal(format!("cannot sign blob URL: {e}")))?;
    match access {
        BlobAccess::Redirect(url) => Ok(HttpResponse::TemporaryRedirect()
            .insert_header((header::LOCATION, url))
            .insert_header(("Docker-Content-Digest", digest.to_string()))
            .insert_header(("Docker-Distribution-API-Version", "registry/2.0"))
            .finish()),
        BlobAccess::Stream(path) => {
            let file = actix_files::NamedFile::open_async(&path)
                .await
                .map_err(|_| RegistryError::blob_unknown(&digest.to_string()))?
                .disable_content_disposition()
                .use_last_modified(false)
                .set_content_type("application/octet-stream".parse().expect("a media type"));
            let mut response = file.into_response(req);
            response.headers_mut().insert(
                header::HeaderName::from_static("docker-content-digest"),
                header::HeaderValue::from_str(&digest.to_string()).expect("digest is ascii"),
            );
            Ok(response)
        }
    }
}

/// Counts every request by route, method and status, and times it.
pub async fn observe(
    req: ServiceRequest,
    next: actix_web::middleware::Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = std::time::Instant::now();
    let route = crate::metrics::route_label(req.path());
    let method = req.method().clone();
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let response = next.call(req).await?;
    if let Some(state) = state {
        let m = &state.shared.stats;
        m.requests
            .with_label_values(&[route, method.as_str(), response.status().as_str()])
            .inc();
        m.request_seconds
            .with_label_values(&[route])
            .observe(started.elapsed().as_secs_f64());
    }
    Ok(response)
}

/// Refuses request heads larger than the configured limit with a registry error.
pub async fn limit_head(
    req: ServiceRequest,
    next: actix_web::middleware::Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody, BoxBody>>, actix_web::Error> {
    let max = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.limits.max_header_bytes)
        .unwrap_or(usize::MAX);
    let uri = req.uri();
    // The URI's length as it was sent, without writing it out on every request.
    let size = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len())
        + req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if size > max {
        let e = RegistryError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "UNSUPPORTED",
            format!("request head of {size} bytes exceeds the limit of {max} bytes"),
        );
        let response = actix_web::ResponseError::error_response(&e);
        return Ok(req.into_response(response).map_into_right_body());
    }
    next.call(req).await.map(|r| r.map_into_left_body())
}

trait Respond {
    fn respond(&self) -> HttpResponse;
}

impl Respond for RegistryError {
    fn respond(&self) -> HttpResponse {
        actix_web::ResponseError::error_response(self)
    }
}
