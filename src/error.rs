//! Every failure a client can see, mapped in one place to an HTTP status and a
//! distribution-spec error code, always as the JSON error envelope.
//!
//! 4xx carries the useful message: docker, podman and skopeo print the message of a
//! 4xx answer and drop that of a 5xx one, so package and build failures are 4xx.

use crate::image::ImageError;
use crate::reference::RouteError;
use crate::source::SourceError;
use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use std::fmt;

/// Why building an image failed; shared by every request waiting on the build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("Could not find Nix packages: {}", .0.join(", "))]
    NotFound(Vec<String>),
    #[error("Not packages (attributes that are not derivations): {}", .0.join(", "))]
    NotPackages(Vec<String>),
    #[error("tag {0} names no commit of the package set's repository")]
    UnknownCommit(String),
    /// nixpkgs refused a package by its meta; one line naming the setting.
    #[error("{0}")]
    Refused(String),
    #[error("Nix could not evaluate the packages: {0}")]
    EvalFailed(String),
    #[error("Nix build failed: {0}")]
    BuildFailed(String),
    #[error("{what} exceeded its time limit of {secs} s{}", tail_suffix(.tail))]
    Timeout {
        what: &'static str,
        secs: u64,
        tail: String,
    },
    #[error("image is {size} bytes, more than the limit of {max} bytes")]
    TooLarge { size: u64, max: u64 },
    #[error("too many builds waiting; try again shortly")]
    Overloaded { retry_after_secs: u64 },
    #[error("storage failure: {0}")]
    Storage(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The caller may not have new images built (anonymous under `auth.anonymous =
    /// pull`).
    #[error("{0} is not built yet, and building needs a login: docker login (or podman login) with a user of this registry")]
    LoginRequired(String),
    /// The caller's allowance of new builds is spent.
    #[error("{}", .0.message())]
    BuildLimit(crate::limits::Exceeded),
    /// A disk of the registry is full; space is being freed.
    #[error("the registry's {what} is out of disk space ({detail}); it is freeing space, try again in a minute")]
    NoSpace { what: &'static str, detail: String },
    /// One platform of an index failed; the index cannot be served.
    #[error("{platform} ({system}) cannot be built: {cause}")]
    Platform {
        platform: String,
        system: &'static str,
        cause: Box<BuildError>,
    },
}

impl BuildError {
    /// Faults of storage or of the registry itself, and refusals that depend on the
    /// caller, which the next request retries rather than being answered from the
    /// failure cache.
    pub fn is_transient(&self) -> bool {
        match self {
            BuildError::Storage(_)
            | BuildError::Internal(_)
            | BuildError::Overloaded { .. }
            | BuildError::NoSpace { .. } => true,
            BuildError::Platform { cause, .. } => cause.is_transient(),
            _ => self.is_refusal(),
        }
    }

    /// A build turned away because of who asked, not because the image fails: no
    /// build failure, and another caller may be let in.
    pub fn is_refusal(&self) -> bool {
        match self {
            BuildError::LoginRequired(_) | BuildError::BuildLimit(_) => true,
            BuildError::Platform { cause, .. } => cause.is_refusal(),
            _ => false,
        }
    }

    /// Whether a refusal was meant for another caller than `client` (whose request
    /// joined a build that caller started), so `client` should ask for itself.
    pub fn refused_someone_else(&self, client: &crate::pipeline::Client) -> bool {
        match self {
            BuildError::LoginRequired(_) => client.may_build,
            BuildError::BuildLimit(exceeded) => exceeded.client != client.key,
            BuildError::Platform { cause, .. } => cause.refused_someone_else(client),
            _ => false,
        }
    }
}

fn tail_suffix(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!(":\n{tail}")
    }
}

/// A registry error response: status, spec code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after_secs: Option<u64>,
    /// Further headers: the authentication challenge, rate-limit state.
    pub headers: Vec<(&'static str, String)>,
}

impl RegistryError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        RegistryError {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
            headers: Vec::new(),
        }
    }

    /// 401 with the challenge a client answers by fetching credentials.
    pub fn unauthorized(message: impl Into<String>, challenge: String) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message);
        e.headers.push(("WWW-Authenticate", challenge));
        e
    }

    /// 429 telling the client when to come back.
    pub fn too_many(message: impl Into<String>, retry_after_secs: u64) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS", message);
        e.retry_after_secs = Some(retry_after_secs.max(1));
        e
    }

    pub fn blob_unknown(digest: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            format!("blob unknown to registry: {digest}"),
        )
    }

    pub fn manifest_unknown(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            format!("manifest unknown: {what}"),
        )
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", message)
    }
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    errors: [Entry<'a>; 1],
}

#[derive(Serialize)]
struct Entry<'a> {
    code: &'a str,
    message: &'a str,
}

impl ResponseError for RegistryError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let body = serde_json::to_vec(&Envelope {
            errors: [Entry {
                code: self.code,
                message: &self.message,
            }],
        })
        .unwrap_or_else(|_| br#"{"errors":[{"code":"UNKNOWN","message":"error"}]}"#.to_vec());
        let mut response = HttpResponse::build(self.status);
        response
            .insert_header((header::CONTENT_TYPE, "application/json"))
            .insert_header(("Docker-Distribution-API-Version", "registry/2.0"));
        if let Some(secs) = self.retry_after_secs {
            response.insert_header((header::RETRY_AFTER, secs.to_string()));
        }
        for (name, value) in &self.headers {
            response.insert_header((*name, value.as_str()));
        }
        response.body(body)
    }
}

impl From<RouteError> for RegistryError {
    fn from(e: RouteError) -> Self {
        let (status, code) = match &e {
            RouteError::NameInvalid(_) | RouteError::NameTooLong(_) => {
                (StatusCode::BAD_REQUEST, "NAME_INVALID")
            }
            RouteError::TagInvalid => (StatusCode::BAD_REQUEST, "MANIFEST_INVALID"),
            RouteError::DigestInvalid => (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
            RouteError::DigestUnsupported => (StatusCode::BAD_REQUEST, "UNSUPPORTED"),
            RouteError::UnknownRoute => (StatusCode::NOT_FOUND, "UNSUPPORTED"),
        };
        RegistryError::new(status, code, e.to_string())
    }
}

impl From<ImageError> for RegistryError {
    fn from(e: ImageError) -> Self {
        RegistryError::new(StatusCode::BAD_REQUEST, "NAME_INVALID", e.to_string())
    }
}

impl From<BuildError> for RegistryError {
    fn from(e: BuildError) -> Self {
        let message = e.to_string();
        if let BuildError::Platform { cause, .. } = e {
            // The status of the platform's failure, the message naming the platform.
            let mut err = RegistryError::from(*cause);
            err.message = message;
            return err;
        }
        let (status, code) = match &e {
            BuildError::NotFound(_) | BuildError::NotPackages(_) | BuildError::UnknownCommit(_) => {
                (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
            }
            BuildError::EvalFailed(_)
            | BuildError::Refused(_)
            | BuildError::BuildFailed(_)
            | BuildError::Timeout { .. }
            | BuildError::TooLarge { .. } => (StatusCode::BAD_REQUEST, "MANIFEST_INVALID"),
            BuildError::Overloaded { retry_after_secs } => {
                let mut err =
                    RegistryError::new(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS", message);
                err.retry_after_secs = Some(*retry_after_secs);
                return err;
            }
            BuildError::LoginRequired(_) => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            BuildError::BuildLimit(exceeded) => {
                let mut err = RegistryError::too_many(message, exceeded.retry_after_secs);
                err.headers.extend(exceeded.headers());
                return err;
            }
            BuildError::Storage(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
            BuildError::NoSpace { .. } => {
                let mut err =
                    RegistryError::new(StatusCode::INSUFFICIENT_STORAGE, "UNAVAILABLE", message);
                err.retry_after_secs = Some(60);
                return err;
            }
            // Platform failures returned above, with their cause's status.
            BuildError::Internal(_) | BuildError::Platform { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN")
            }
        };
        RegistryError::new(status, code, message)
    }
}

/// Storage that cannot be reached is transient: the client may retry.
impl From<crate::storage::StorageError> for RegistryError {
    fn from(e: crate::storage::StorageError) -> Self {
        RegistryError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            e.to_string(),
        )
    }
}

impl From<SourceError> for RegistryError {
    fn from(e: SourceError) -> Self {
        let (status, code) = match &e {
            SourceError::UnknownRef { .. } | SourceError::OnlyLatest { .. } => {
                (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
            }
            SourceError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        };
        RegistryError::new(status, code, e.to_string())
    }
}

impl From<actix::MailboxError> for RegistryError {
    fn from(e: actix::MailboxError) -> Self {
        RegistryError::internal(format!("build service unavailable: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::MessageBody;

    fn body(e: RegistryError) -> (u16, String, Option<String>) {
        let r = e.error_response();
        let status = r.status().as_u16();
        let ct = r
            .headers()
            .get(header::CONTENT_TYPE)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(ct, "application/json");
        let retry = r
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = r.into_body().try_into_bytes().unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap(), retry)
    }

    #[test]
    fn envelopes() {
        let (s, b, _) = body(BuildError::NotFound(vec!["a".into(), "b".into()]).into());
        assert_eq!(s, 404);
        assert_eq!(
            b,
            r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"Could not find Nix packages: a, b"}]}"#
        );
        let (s, b, _) = body(BuildError::BuildFailed("error: \"quoted\"".into()).into());
        assert_eq!(s, 400);
        assert!(b.contains(r#"Nix build failed: error: \"quoted\""#), "{b}");
        let (s, _, retry) = body(
            BuildError::Overloaded {
                retry_after_secs: 5,
            }
            .into(),
        );
        assert_eq!((s, retry.as_deref()), (429, Some("5")));
        let (s, b, _) = body(RouteError::DigestInvalid.into());
        assert_eq!(s, 400);
        assert!(b.contains("DIGEST_INVALID"));
        let (s, _, _) = body(BuildError::Storage("down".into()).into());
        assert_eq!(s, 503);
        let platform = BuildError::Platform {
            platform: "linux/arm64/v8".into(),
            system: "aarch64-linux",
            cause: Box::new(BuildError::BuildFailed("no builder".into())),
        };
        assert!(!platform.is_transient());
        let (s, b, _) = body(platform.into());
        assert_eq!(s, 400);
        assert!(
            b.contains(
                "linux/arm64/v8 (aarch64-linux) cannot be built: Nix build failed: no builder"
            ),
            "{b}"
        );
    }
}
