//! Google Cloud Storage V4 signed URLs (`GOOG4-RSA-SHA256`).
//!
//! This module is pure: it performs no I/O, reads no clock and depends on
//! neither actix nor tokio. The caller supplies the service-account key bytes
//! and the signing time, and gets back a URL string. (The only thing it asks
//! of the operating system is randomness that `ring` uses to blind the RSA
//! private-key operation; PKCS#1 v1.5 signatures are deterministic, so the
//! output depends only on the inputs.)
//!
//! The algorithm follows Google's description of V4 signing
//! (<https://cloud.google.com/storage/docs/access-control/signing-urls-manually>)
//! and is checked byte for byte against Google's conformance vectors in
//! `src/testdata/gcs-v4-signing/v4_signatures.json`, so URLs come out exactly
//! as Google's own client libraries would produce them.
//!
//! `gcloud-storage` 1.3's signer (`Client::signed_url`) is not used because it
//! reproduces only 12 of the 29 vectors (19 with a hand-written `URLStyle`,
//! since its `PathStyle` hard-codes `storage.googleapis.com`): it leaves `&`
//! unescaped in object names, cuts header values at the first `:`, keeps tabs,
//! sorts canonical headers as `name:value` strings, writes `~` as `%7E` in the
//! query and signs the endpoint's port into `host` (so `localhost:8080` and
//! emulator endpoints like ours sign differently from Google's libraries).
//! `object_store`'s GCS signer reproduces none, because it always takes the
//! time from the clock and always signs `host:storage.googleapis.com`.
//!
//! In outline:
//!
//! ```text
//! canonical request = METHOD \n path \n sorted query \n canonical headers \n
//!                     signed header names \n payload hash
//! string to sign    = GOOG4-RSA-SHA256 \n YYYYMMDDTHHMMSSZ \n
//!                     YYYYMMDD/auto/storage/goog4_request \n hex(sha256(canonical request))
//! signature         = hex(RSASSA-PKCS1-v1_5-SHA256(string to sign))
//! url               = scheme://host path ? sorted query & X-Goog-Signature=signature
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use ring::digest;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use serde::Deserialize;

/// Endpoint used when [`SignOptions::host`] is `None` (path and
/// virtual-hosted styles).
pub const DEFAULT_HOST: &str = "storage.googleapis.com";

/// Longest validity GCS accepts for a V4 signed URL: seven days.
pub const MAX_EXPIRES_SECS: u64 = 604_800;

const ALGORITHM: &str = "GOOG4-RSA-SHA256";
const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

/// Query parameters the signer sets itself. A caller-supplied parameter with
/// one of these names would either be ignored by GCS or make the URL
/// ambiguous, so it is rejected rather than silently signed.
const RESERVED_QUERY_PARAMS: [&str; 6] = [
    "X-Goog-Algorithm",
    "X-Goog-Credential",
    "X-Goog-Date",
    "X-Goog-Expires",
    "X-Goog-SignedHeaders",
    "X-Goog-Signature",
];

/// Everything except the RFC 3986 unreserved characters is percent-encoded.
/// This is what Google's libraries do for query keys and values (Go's
/// `url.QueryEscape` with `+` turned into `%20`), e.g. `é` -> `%C3%A9`,
/// space -> `%20`, `~` stays.
const QUERY_ENCODE_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Object names keep their `/` separators verbatim (vector "Slashes in object
/// name should not be URL encoded"); every segment is otherwise encoded like a
/// query component.
const PATH_ENCODE_SET: &AsciiSet = &QUERY_ENCODE_SET.remove(b'/');

/// Errors from loading a key or signing a URL.
///
/// Messages never contain private-key material.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The service-account file is not JSON of the expected shape.
    #[error("service-account key is not valid JSON: {0}")]
    KeyJson(#[from] serde_json::Error),
    /// The JSON `type` field names something other than a service account
    /// (e.g. `authorized_user`), which has no private key to sign with.
    #[error("credentials of type {0:?} cannot sign URLs; a service_account key is required")]
    KeyType(String),
    /// `client_email` is empty.
    #[error("service-account key has an empty client_email")]
    MissingClientEmail,
    /// The `private_key` field is not a usable PEM document.
    #[error("service-account private_key is not valid PEM: {0}")]
    KeyPem(&'static str),
    /// The PEM decoded, but `ring` does not accept it as an RSA private key.
    #[error("service-account private_key is not an acceptable RSA key: {0}")]
    KeyRejected(String),
    /// The HTTP method is empty or not an upper-case token.
    #[error("invalid HTTP method {0:?}: expected an upper-case token such as GET")]
    InvalidMethod(String),
    /// The bucket name is empty or contains characters GCS never allows.
    #[error("invalid bucket name {0:?}")]
    InvalidBucket(String),
    /// Validity must be between 1 second and [`MAX_EXPIRES_SECS`].
    #[error("expiry of {0} s is out of range (1..={MAX_EXPIRES_SECS})")]
    InvalidExpiration(u64),
    /// The signing time is before 1970 or after 9999-12-31, which the
    /// `YYYYMMDDTHHMMSSZ` format cannot express.
    #[error("signing timestamp {0} is out of range")]
    InvalidTimestamp(i64),
    /// Only `http` and `https` are meaningful for GCS endpoints.
    #[error("invalid URL scheme {0:?}: expected \"http\" or \"https\"")]
    InvalidScheme(String),
    /// The endpoint host is empty or is not a bare `host[:port]`.
    #[error("invalid endpoint host {0:?}: expected host[:port] without scheme or path")]
    InvalidHost(String),
    /// [`UrlStyle::BucketBoundHostname`] needs the hostname in
    /// [`SignOptions::host`].
    #[error("bucket-bound hostname style requires SignOptions::host")]
    MissingBucketBoundHostname,
    /// A header name or value cannot be placed in a canonical request.
    #[error("invalid signed header {name:?}: {reason}")]
    InvalidHeader {
        /// The header name as given by the caller.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A query parameter collides with one the signer sets itself.
    #[error("query parameter {0:?} is reserved for the signature")]
    ReservedQueryParameter(String),
    /// `ring` failed to produce a signature.
    #[error("RSA signing failed")]
    Signing,
}

/// A Google service-account identity able to sign URLs.
///
/// Cheap to clone (the key pair is shared). `Debug` prints only the email.
#[derive(Clone)]
pub struct ServiceAccountKey {
    client_email: String,
    key_pair: Arc<RsaKeyPair>,
}

#[derive(Deserialize)]
struct ServiceAccountJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    client_email: String,
    private_key: String,
}

impl ServiceAccountKey {
    /// Parses a service-account JSON key file as downloaded from the Google
    /// Cloud console (fields used: `client_email`, `private_key` and, if
    /// present, `type`).
    pub fn from_json(json: &[u8]) -> Result<Self, SignError> {
        let raw: ServiceAccountJson = serde_json::from_slice(json)?;
        if let Some(kind) = raw.kind {
            if kind != "service_account" {
                return Err(SignError::KeyType(kind));
            }
        }
        if raw.client_email.trim().is_empty() {
            return Err(SignError::MissingClientEmail);
        }
        let key_pair = parse_private_key_pem(&raw.private_key)?;
        Ok(ServiceAccountKey {
            client_email: raw.client_email,
            key_pair: Arc::new(key_pair),
        })
    }

    /// The service account's email, which GCS uses to find the public key.
    pub fn client_email(&self) -> &str {
        &self.client_email
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        let mut sig = vec![0u8; self.key_pair.public().modulus_len()];
        self.key_pair
            .sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), message, &mut sig)
            .map_err(|_| SignError::Signing)?;
        Ok(sig)
    }
}

impl fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .field("key_pair", &"<redacted>")
            .finish()
    }
}

/// Decodes the PEM in `private_key`. Service-account keys are PKCS#8
/// (`BEGIN PRIVATE KEY`); PKCS#1 (`BEGIN RSA PRIVATE KEY`) is accepted too
/// because keys converted by hand with openssl often end up in that form and
/// ring reads it at no extra cost.
fn parse_private_key_pem(pem: &str) -> Result<RsaKeyPair, SignError> {
    const BEGIN: &str = "-----BEGIN ";
    const END: &str = "-----END ";
    const DASHES: &str = "-----";

    let start = pem.find(BEGIN).ok_or(SignError::KeyPem("no BEGIN line"))?;
    let after_begin = &pem[start + BEGIN.len()..];
    let label_end = after_begin
        .find(DASHES)
        .ok_or(SignError::KeyPem("unterminated BEGIN line"))?;
    let label = &after_begin[..label_end];
    let body_and_rest = &after_begin[label_end + DASHES.len()..];
    let end_line = format!("{END}{label}{DASHES}");
    let body_end = body_and_rest
        .find(&end_line)
        .ok_or(SignError::KeyPem("no matching END line"))?;
    let body: String = body_and_rest[..body_end]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.as_bytes())
        .map_err(|_| SignError::KeyPem("body is not valid base64"))?;
    let parsed = match label {
        "PRIVATE KEY" => RsaKeyPair::from_pkcs8(&der),
        "RSA PRIVATE KEY" => RsaKeyPair::from_der(&der),
        _ => {
            return Err(SignError::KeyPem(
                "expected a PRIVATE KEY or RSA PRIVATE KEY block",
            ))
        }
    };
    parsed.map_err(|e| SignError::KeyRejected(e.to_string()))
}

/// Where the bucket name goes in the URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UrlStyle {
    /// `scheme://host/bucket/object`, the only style that works with
    /// emulators and with `host:port` endpoints.
    #[default]
    PathStyle,
    /// `scheme://bucket.host/object`.
    VirtualHostedStyle,
    /// `scheme://host/object` where `host` (required in
    /// [`SignOptions::host`]) is a CNAME bound to the bucket.
    BucketBoundHostname,
}

/// What to sign. All strings are taken verbatim; see the field docs for the
/// encoding applied.
#[derive(Debug, Clone, Copy)]
pub struct SignOptions<'a> {
    /// HTTP method the URL will be used with, upper case (`GET`, `HEAD`,
    /// `PUT`, `POST`, `DELETE`). It is part of the signature: a URL signed
    /// for GET is rejected for HEAD.
    pub method: &'a str,
    /// Bucket name (letters, digits, `-`, `_`, `.`).
    pub bucket: &'a str,
    /// Object name, unencoded (e.g. `blobs/sha256/<hex>`). `/` is kept, all
    /// other reserved characters are percent-encoded. Empty means the bucket
    /// itself (object listing).
    pub object: &'a str,
    /// Signing time in seconds since the Unix epoch (the URL is valid from
    /// then for `expires_secs`).
    pub timestamp_unix: i64,
    /// Validity in seconds, 1..=[`MAX_EXPIRES_SECS`].
    pub expires_secs: u64,
    /// Placement of the bucket name.
    pub style: UrlStyle,
    /// `https`, or `http` for emulators.
    pub scheme: &'a str,
    /// Endpoint `host[:port]` (no scheme). `None` means [`DEFAULT_HOST`].
    /// For [`UrlStyle::BucketBoundHostname`] this is the bound hostname and
    /// is required. The port appears in the URL but, as in Google's
    /// libraries, not in the signed `host` header.
    pub host: Option<&'a str>,
    /// Extra query parameters (unencoded), signed along with the URL.
    pub query: &'a [(String, String)],
    /// Extra headers the eventual request must carry with exactly these
    /// values. Names are case-insensitive. An `x-goog-content-sha256` header
    /// replaces `UNSIGNED-PAYLOAD` as the payload hash.
    pub headers: &'a [(String, String)],
}

/// Builds a V4 signed URL for `opts`, signed with `key`.
pub fn signed_url(key: &ServiceAccountKey, opts: &SignOptions) -> Result<String, SignError> {
    let prepared = prepare(key.client_email(), opts)?;
    let signature = key.sign(prepared.string_to_sign.as_bytes())?;
    Ok(format!(
        "{}?{}&X-Goog-Signature={}",
        prepared.base_url,
        prepared.canonical_query,
        hex::encode(signature)
    ))
}

/// The unsigned, path-style URL of an object (`scheme://host/bucket/object`),
/// for publicly readable buckets and emulators that need no signature. The
/// object name is encoded exactly as in [`signed_url`].
pub fn public_url(scheme: &str, host: &str, bucket: &str, object: &str) -> String {
    format!("{scheme}://{host}{}", path_style_path(bucket, object))
}

/// Everything except the RSA signature, split out so tests can compare the
/// intermediate strings with the vectors' `expectedCanonicalRequest` and
/// `expectedStringToSign` when a URL does not match.
struct Prepared {
    /// `scheme://host/path`, without query.
    base_url: String,
    /// Sorted, encoded query string without the signature.
    canonical_query: String,
    #[cfg_attr(not(test), allow(dead_code))]
    canonical_request: String,
    string_to_sign: String,
}

fn prepare(client_email: &str, opts: &SignOptions) -> Result<Prepared, SignError> {
    validate_method(opts.method)?;
    validate_bucket(opts.bucket)?;
    if opts.expires_secs == 0 || opts.expires_secs > MAX_EXPIRES_SECS {
        return Err(SignError::InvalidExpiration(opts.expires_secs));
    }
    if opts.scheme != "https" && opts.scheme != "http" {
        return Err(SignError::InvalidScheme(opts.scheme.to_owned()));
    }
    if let Some(host) = opts.host {
        validate_host(host)?;
    }
    let (date, datetime) = format_timestamp(opts.timestamp_unix)?;

    let (url_host, path) = match opts.style {
        UrlStyle::PathStyle => (
            opts.host.unwrap_or(DEFAULT_HOST).to_owned(),
            path_style_path(opts.bucket, opts.object),
        ),
        UrlStyle::VirtualHostedStyle => (
            format!("{}.{}", opts.bucket, opts.host.unwrap_or(DEFAULT_HOST)),
            object_only_path(opts.object),
        ),
        UrlStyle::BucketBoundHostname => (
            opts.host
                .ok_or(SignError::MissingBucketBoundHostname)?
                .to_owned(),
            object_only_path(opts.object),
        ),
    };

    // Canonical headers: lower-case names, sorted (BTreeMap), values with
    // surrounding whitespace trimmed and inner runs collapsed. The signed
    // `host` is the hostname without port, which is what Google's libraries
    // sign (vectors "Simple GET with non-default hostname" and "... endpoint
    // on client").
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in opts.headers {
        let lower = validate_header(name, value)?;
        let value = canonical_header_value(value);
        headers
            .entry(lower)
            .and_modify(|v| {
                // Repeated headers are equivalent to one comma-joined header
                // in HTTP, which is how GCS sees them.
                v.push(',');
                v.push_str(&value);
            })
            .or_insert(value);
    }
    headers.insert(
        "host".to_owned(),
        hostname_without_port(&url_host).to_owned(),
    );

    let payload_hash = headers
        .get("x-goog-content-sha256")
        .cloned()
        .unwrap_or_else(|| UNSIGNED_PAYLOAD.to_owned());
    let signed_headers = headers
        .keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(";");
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();

    let credential_scope = format!("{date}/auto/storage/goog4_request");
    let mut query: Vec<(String, String)> = Vec::with_capacity(opts.query.len() + 5);
    for (k, v) in opts.query {
        if RESERVED_QUERY_PARAMS
            .iter()
            .any(|r| r.eq_ignore_ascii_case(k))
        {
            return Err(SignError::ReservedQueryParameter(k.clone()));
        }
        query.push((encode_query(k), encode_query(v)));
    }
    for (k, v) in [
        ("X-Goog-Algorithm", ALGORITHM.to_owned()),
        (
            "X-Goog-Credential",
            format!("{client_email}/{credential_scope}"),
        ),
        ("X-Goog-Date", datetime.clone()),
        ("X-Goog-Expires", opts.expires_secs.to_string()),
        ("X-Goog-SignedHeaders", signed_headers.clone()),
    ] {
        query.push((encode_query(k), encode_query(&v)));
    }
    // Sorted by encoded key (then value) in byte order, so upper-case
    // `X-Goog-*` come before lower-case keys (vector "Query Parameter
    // Ordering").
    query.sort();
    let canonical_query = query
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");

    let canonical_request = [
        opts.method,
        &path,
        &canonical_query,
        &canonical_headers,
        &signed_headers,
        &payload_hash,
    ]
    .join("\n");
    let request_hash = hex::encode(digest::digest(
        &digest::SHA256,
        canonical_request.as_bytes(),
    ));
    let string_to_sign = format!("{ALGORITHM}\n{datetime}\n{credential_scope}\n{request_hash}");

    Ok(Prepared {
        base_url: format!("{}://{url_host}{path}", opts.scheme),
        canonical_query,
        canonical_request,
        string_to_sign,
    })
}

fn validate_method(method: &str) -> Result<(), SignError> {
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(SignError::InvalidMethod(method.to_owned()));
    }
    Ok(())
}

/// GCS bucket names only ever contain these characters; checking them here
/// means the name can go into a path or hostname without encoding.
fn validate_bucket(bucket: &str) -> Result<(), SignError> {
    let ok = !bucket.is_empty()
        && bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(SignError::InvalidBucket(bucket.to_owned()));
    }
    Ok(())
}

/// Accepts `name`, `name:port`, `1.2.3.4:port` and `[v6]:port`; rejects
/// anything with a scheme, path, userinfo or whitespace, which would
/// otherwise produce a URL whose host differs from the signed one.
fn validate_host(host: &str) -> Result<(), SignError> {
    let ok = !host.is_empty()
        && host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'[' | b']')
        })
        && !host.starts_with(':');
    if !ok {
        return Err(SignError::InvalidHost(host.to_owned()));
    }
    Ok(())
}

/// Returns the lower-cased header name.
fn validate_header(name: &str, value: &str) -> Result<String, SignError> {
    let invalid = |reason| SignError::InvalidHeader {
        name: name.to_owned(),
        reason,
    };
    // Visible ASCII without ':' (ends the name in the canonical header line)
    // or ';' (separates names in X-Goog-SignedHeaders). '/' is allowed: the
    // vectors sign "header/name/with/slash".
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b':' && b != b';')
    {
        return Err(invalid(
            "name must be non-empty visible ASCII without ':' or ';'",
        ));
    }
    let lower = name.to_ascii_lowercase();
    if lower == "host" {
        return Err(invalid("host is derived from the URL and cannot be set"));
    }
    // A line break would forge extra lines in the canonical request.
    if value.contains(['\r', '\n']) {
        return Err(invalid("value must not contain line breaks"));
    }
    Ok(lower)
}

/// Trims and collapses runs of spaces/tabs to one space (vectors "Headers
/// should be trimmed", "Header value with multiple inline values").
fn canonical_header_value(value: &str) -> String {
    value
        .split([' ', '\t'])
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Like Go's `url.URL.Hostname()`: drops a trailing `:port` (digits only) and
/// IPv6 brackets.
fn hostname_without_port(host: &str) -> &str {
    let mut h = host;
    if let Some(colon) = h.rfind(':') {
        if h[colon + 1..].bytes().all(|b| b.is_ascii_digit()) {
            h = &h[..colon];
        }
    }
    if let Some(inner) = h.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        h = inner;
    }
    h
}

/// `/bucket/object`, or `/bucket` for an empty object name (vector "List
/// Objects"). A leading `/` in the object is kept (vector "Forward Slashes
/// should not be stripped"), giving `/bucket//object`.
fn path_style_path(bucket: &str, object: &str) -> String {
    if object.is_empty() {
        format!("/{bucket}")
    } else {
        format!("/{bucket}/{}", utf8_percent_encode(object, PATH_ENCODE_SET))
    }
}

fn object_only_path(object: &str) -> String {
    format!("/{}", utf8_percent_encode(object, PATH_ENCODE_SET))
}

fn encode_query(s: &str) -> String {
    utf8_percent_encode(s, QUERY_ENCODE_SET).to_string()
}

/// Returns (`YYYYMMDD`, `YYYYMMDDTHHMMSSZ`) in UTC.
fn format_timestamp(unix: i64) -> Result<(String, String), SignError> {
    // 9999-12-31T23:59:59Z; beyond it the year no longer has four digits.
    const MAX: i64 = 253_402_300_799;
    if !(0..=MAX).contains(&unix) {
        return Err(SignError::InvalidTimestamp(unix));
    }
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let date = format!("{y:04}{m:02}{d:02}");
    let datetime = format!(
        "{date}T{:02}{:02}{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    );
    Ok((date, datetime))
}

/// Proleptic Gregorian date from days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`), to avoid a date-time dependency for one format.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March-based
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256};

    const VECTORS: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/testdata/gcs-v4-signing/v4_signatures.json"
    ));
    const KEY_JSON: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/testdata/gcs-v4-signing/test_service_account.not-a-test.json"
    ));

    /// Vectors that are expected not to be reproduced, with the reason.
    /// Empty: every signing vector is supported. Kept so that a future
    /// unsupported vector must be listed here deliberately instead of being
    /// dropped silently.
    const EXPECTED_SKIPS: &[(&str, &str)] = &[];

    /// Vectors whose `expectedCanonicalRequest` field disagrees with their own
    /// `expectedStringToSign` and `expectedUrl`, so the intermediate
    /// comparison is skipped for them (the URL and string-to-sign are still
    /// checked).
    const INCONSISTENT_CANONICAL_REQUEST: &[(&str, &str)] = &[(
        "Universe domain with virtual hosted style",
        "its expectedCanonicalRequest has path /test-bucket/test-object, but the \
         SHA-256 in its expectedStringToSign (which its expectedUrl's signature \
         signs) is that of the same request with path /test-object, as in the \
         plain \"Virtual Hosted Style\" vector",
    )];

    /// One `signingV4Tests` entry. `deny_unknown_fields` makes the test fail
    /// if a newer copy of the vectors introduces an option we would otherwise
    /// ignore and mis-sign.
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Vector {
        description: String,
        bucket: String,
        #[serde(default)]
        object: String,
        method: String,
        expiration: u64,
        timestamp: String,
        expected_url: String,
        expected_canonical_request: String,
        expected_string_to_sign: String,
        #[serde(default)]
        headers: BTreeMap<String, String>,
        #[serde(default)]
        query_parameters: BTreeMap<String, String>,
        scheme: Option<String>,
        url_style: Option<String>,
        bucket_bound_hostname: Option<String>,
        hostname: Option<String>,
        client_endpoint: Option<String>,
        emulator_hostname: Option<String>,
        universe_domain: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct VectorFile {
        signing_v4_tests: Vec<Vector>,
    }

    fn test_key() -> ServiceAccountKey {
        ServiceAccountKey::from_json(KEY_JSON.as_bytes()).expect("dummy key loads")
    }

    /// Inverse of `civil_from_days`, for parsing the vectors' timestamps.
    fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// Parses the vectors' `YYYY-MM-DDTHH:MM:SSZ`.
    fn parse_rfc3339_utc(s: &str) -> Result<i64, String> {
        let b = s.as_bytes();
        let shape_ok = b.len() == 20
            && b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T'
            && b[13] == b':'
            && b[16] == b':'
            && b[19] == b'Z';
        if !shape_ok {
            return Err(format!("unsupported timestamp format {s:?}"));
        }
        let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
            s[r].parse::<i64>().map_err(|e| format!("{s:?}: {e}"))
        };
        let days = days_from_civil(num(0..4)?, num(5..7)?, num(8..10)?);
        Ok(days * 86_400 + num(11..13)? * 3600 + num(14..16)? * 60 + num(17..19)?)
    }

    /// Splits an endpoint that may carry a scheme ("http://localhost:8080").
    fn split_scheme(endpoint: &str) -> (Option<String>, String) {
        match endpoint.split_once("://") {
            Some((scheme, rest)) => (
                Some(scheme.to_owned()),
                rest.trim_end_matches('/').to_owned(),
            ),
            None => (None, endpoint.to_owned()),
        }
    }

    /// Owned inputs for `SignOptions`, derived from a vector the way Google's
    /// client libraries interpret these settings.
    struct Mapped {
        style: UrlStyle,
        scheme: String,
        host: Option<String>,
        timestamp: i64,
        headers: Vec<(String, String)>,
        query: Vec<(String, String)>,
    }

    /// Err(reason) means the vector cannot be expressed with `SignOptions`.
    fn map_vector(v: &Vector) -> Result<Mapped, String> {
        let style = match v.url_style.as_deref() {
            None | Some("PATH_STYLE") => UrlStyle::PathStyle,
            Some("VIRTUAL_HOSTED_STYLE") => UrlStyle::VirtualHostedStyle,
            Some("BUCKET_BOUND_HOSTNAME") => UrlStyle::BucketBoundHostname,
            Some(other) => return Err(format!("unknown urlStyle {other:?}")),
        };
        // Endpoint precedence, as the vector descriptions state: an explicit
        // per-URL hostname beats the client's endpoint, which beats the
        // STORAGE_EMULATOR_HOST setting, which beats the universe domain
        // (whose storage endpoint is "storage.<domain>"). A scheme written
        // into the endpoint is used when the vector gives none; otherwise
        // https, the libraries' default.
        let (endpoint_scheme, host) = if style == UrlStyle::BucketBoundHostname {
            let bbh = v
                .bucket_bound_hostname
                .as_deref()
                .ok_or("BUCKET_BOUND_HOSTNAME without bucketBoundHostname")?;
            let (s, h) = split_scheme(bbh);
            (s, Some(h))
        } else if let Some(h) = &v.hostname {
            (None, Some(h.clone()))
        } else if let Some(ep) = &v.client_endpoint {
            let (s, h) = split_scheme(ep);
            (s, Some(h))
        } else if let Some(em) = &v.emulator_hostname {
            let (s, h) = split_scheme(em);
            (s, Some(h))
        } else if let Some(domain) = &v.universe_domain {
            (None, Some(format!("storage.{domain}")))
        } else {
            (None, None)
        };
        let scheme = v
            .scheme
            .clone()
            .or(endpoint_scheme)
            .unwrap_or_else(|| "https".to_owned());
        Ok(Mapped {
            style,
            scheme,
            host,
            timestamp: parse_rfc3339_utc(&v.timestamp)?,
            headers: v.headers.clone().into_iter().collect(),
            query: v.query_parameters.clone().into_iter().collect(),
        })
    }

    fn options<'a>(v: &'a Vector, m: &'a Mapped) -> SignOptions<'a> {
        SignOptions {
            method: &v.method,
            bucket: &v.bucket,
            object: &v.object,
            timestamp_unix: m.timestamp,
            expires_secs: v.expiration,
            style: m.style,
            scheme: &m.scheme,
            host: m.host.as_deref(),
            query: &m.query,
            headers: &m.headers,
        }
    }

    #[test]
    fn conformance_vectors_reproduce_expected_urls() {
        let key = test_key();
        let file: VectorFile = serde_json::from_str(VECTORS).expect("vectors parse");
        let total = file.signing_v4_tests.len();
        // The README documents 29 cases; a different count means the file
        // changed and this test's expectations need a look.
        assert_eq!(total, 29, "unexpected number of signingV4Tests");

        let mut reproduced = Vec::new();
        let mut skipped: Vec<(String, String)> = Vec::new();
        let mut failures = Vec::new();
        for v in &file.signing_v4_tests {
            let mapped = match map_vector(v) {
                Ok(m) => m,
                Err(reason) => {
                    eprintln!("SKIP {:?}: {reason}", v.description);
                    skipped.push((v.description.clone(), reason));
                    continue;
                }
            };
            let opts = options(v, &mapped);
            let prepared = match prepare(key.client_email(), &opts) {
                Ok(p) => p,
                Err(e) => {
                    failures.push(format!("{:?}: prepare failed: {e}", v.description));
                    continue;
                }
            };
            let consistent_cr = !INCONSISTENT_CANONICAL_REQUEST
                .iter()
                .any(|(d, _)| *d == v.description);
            if consistent_cr && prepared.canonical_request != v.expected_canonical_request {
                failures.push(format!(
                    "{:?}: canonical request\n  got:  {:?}\n  want: {:?}",
                    v.description, prepared.canonical_request, v.expected_canonical_request
                ));
            }
            if prepared.string_to_sign != v.expected_string_to_sign {
                failures.push(format!(
                    "{:?}: string to sign\n  got:  {:?}\n  want: {:?}",
                    v.description, prepared.string_to_sign, v.expected_string_to_sign
                ));
            }
            match signed_url(&key, &opts) {
                Ok(url) if url == v.expected_url => reproduced.push(v),
                Ok(url) => failures.push(format!(
                    "{:?}: url\n  got:  {url}\n  want: {}",
                    v.description, v.expected_url
                )),
                Err(e) => failures.push(format!("{:?}: signing failed: {e}", v.description)),
            }
        }

        assert!(
            failures.is_empty(),
            "vector mismatches:\n{}",
            failures.join("\n")
        );
        let expected_skips: Vec<(String, String)> = EXPECTED_SKIPS
            .iter()
            .map(|(d, r)| (d.to_string(), r.to_string()))
            .collect();
        assert_eq!(
            skipped, expected_skips,
            "skipped vectors differ from EXPECTED_SKIPS"
        );
        assert_eq!(reproduced.len(), total - EXPECTED_SKIPS.len());

        // Our use is GET; make the GET coverage explicit.
        let get_total = file
            .signing_v4_tests
            .iter()
            .filter(|v| v.method == "GET")
            .count();
        let get_reproduced = reproduced.iter().filter(|v| v.method == "GET").count();
        assert_eq!(get_total, 26);
        assert_eq!(
            get_reproduced, get_total,
            "every GET vector must be reproduced"
        );
    }

    #[test]
    fn inconsistent_canonical_request_entries_exist() {
        // Guards the exception list against typos and stale names.
        let file: VectorFile = serde_json::from_str(VECTORS).unwrap();
        for (desc, _) in INCONSISTENT_CANONICAL_REQUEST.iter().chain(EXPECTED_SKIPS) {
            assert!(
                file.signing_v4_tests.iter().any(|v| v.description == *desc),
                "no vector named {desc:?}"
            );
        }
    }

    fn nixery_opts<'a>(object: &'a str, scheme: &'a str, host: Option<&'a str>) -> SignOptions<'a> {
        SignOptions {
            method: "GET",
            bucket: "nixery-layers",
            object,
            timestamp_unix: 1_700_000_000, // 2023-11-14T22:13:20Z
            expires_secs: 300,
            style: UrlStyle::PathStyle,
            scheme,
            host,
            query: &[],
            headers: &[],
        }
    }

    /// Checks a URL's signature against the key's public half, for inputs
    /// that have no published expected URL.
    fn assert_signature_verifies(key: &ServiceAccountKey, opts: &SignOptions, url: &str) {
        let prepared = prepare(key.client_email(), opts).unwrap();
        let sig_hex = url.rsplit_once("&X-Goog-Signature=").unwrap().1;
        let sig = hex::decode(sig_hex).unwrap();
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key.key_pair.public().as_ref())
            .verify(prepared.string_to_sign.as_bytes(), &sig)
            .expect("signature verifies");
    }

    #[test]
    fn object_names_needing_escaping() {
        let key = test_key();
        let object = "blobs/sha256/a b+c%d?e#f&g=h~i_j.k-l/é";
        let opts = nixery_opts(object, "https", None);
        let url = signed_url(&key, &opts).unwrap();
        let want_path = "/nixery-layers/blobs/sha256/a%20b%2Bc%25d%3Fe%23f%26g%3Dh~i_j.k-l/%C3%A9";
        assert!(
            url.starts_with(&format!(
                "https://storage.googleapis.com{want_path}?X-Goog-Algorithm="
            )),
            "{url}"
        );
        // The signed path is the same encoded path as in the URL.
        let prepared = prepare(key.client_email(), &opts).unwrap();
        assert_eq!(prepared.canonical_request.lines().nth(1), Some(want_path));
        // Only one '?' and no raw '#': nothing in the name leaks into the
        // query or fragment.
        assert_eq!(url.matches('?').count(), 1);
        assert!(!url.contains('#'));
        assert_signature_verifies(&key, &opts, &url);
        assert_eq!(
            public_url("https", DEFAULT_HOST, "nixery-layers", object),
            format!("https://storage.googleapis.com{want_path}")
        );
    }

    #[test]
    fn emulator_endpoint_keeps_port_in_url_but_not_in_signed_host() {
        let key = test_key();
        let object = format!("blobs/sha256/{}", "ab".repeat(32));
        let opts = nixery_opts(&object, "http", Some("127.0.0.1:4443"));
        let url = signed_url(&key, &opts).unwrap();
        assert!(url.starts_with(&format!(
            "http://127.0.0.1:4443/nixery-layers/{object}?X-Goog-Algorithm=GOOG4-RSA-SHA256&\
             X-Goog-Credential=test-iam-credentials%40dummy-project-id.iam.gserviceaccount.com\
             %2F20231114%2Fauto%2Fstorage%2Fgoog4_request&X-Goog-Date=20231114T221320Z&\
             X-Goog-Expires=300&X-Goog-SignedHeaders=host&X-Goog-Signature="
        )));
        let prepared = prepare(key.client_email(), &opts).unwrap();
        assert!(prepared.canonical_request.contains("\nhost:127.0.0.1\n"));
        assert_signature_verifies(&key, &opts, &url);
        assert_eq!(
            public_url("http", "127.0.0.1:4443", "nixery-layers", &object),
            format!("http://127.0.0.1:4443/nixery-layers/{object}")
        );
    }

    #[test]
    fn signing_is_deterministic() {
        let key = test_key();
        let opts = nixery_opts("blobs/sha256/00", "https", None);
        assert_eq!(
            signed_url(&key, &opts).unwrap(),
            signed_url(&key, &opts).unwrap()
        );
    }

    #[test]
    fn from_json_rejects_garbage_without_panicking() {
        let pem_of = |body: &str| {
            serde_json::json!({
                "type": "service_account",
                "client_email": "x@y.iam.gserviceaccount.com",
                "private_key": body,
            })
            .to_string()
        };
        let cases: Vec<(&str, String)> = vec![
            ("empty input", String::new()),
            ("not json", "\u{0}\u{1}garbage{".to_owned()),
            ("json array", "[1,2,3]".to_owned()),
            ("missing fields", "{}".to_owned()),
            (
                "wrong field type",
                r#"{"client_email": 5, "private_key": "k"}"#.to_owned(),
            ),
            (
                "user credentials",
                r#"{"type":"authorized_user","client_email":"a","private_key":"k"}"#.to_owned(),
            ),
            (
                "empty email",
                r#"{"client_email":"","private_key":"-----BEGIN PRIVATE KEY-----"}"#.to_owned(),
            ),
            ("no pem", pem_of("just text")),
            (
                "unterminated pem",
                pem_of("-----BEGIN PRIVATE KEY-----\nAAAA\n"),
            ),
            (
                "bad base64",
                pem_of("-----BEGIN PRIVATE KEY-----\n!!!notbase64$$$\n-----END PRIVATE KEY-----\n"),
            ),
            (
                "base64 of junk",
                pem_of(
                    "-----BEGIN PRIVATE KEY-----\naGVsbG8gd29ybGQ=\n-----END PRIVATE KEY-----\n",
                ),
            ),
            (
                "mismatched labels",
                pem_of("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n"),
            ),
            (
                "certificate",
                pem_of("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            ),
        ];
        for (name, input) in cases {
            match ServiceAccountKey::from_json(input.as_bytes()) {
                Ok(_) => panic!("{name}: accepted"),
                Err(e) => {
                    // Display must work and must not echo key material.
                    let msg = e.to_string();
                    assert!(
                        !msg.contains("AAAA") && !msg.contains("aGVsbG8"),
                        "{name}: {msg}"
                    );
                }
            }
        }
    }

    #[test]
    fn key_loads_and_debug_redacts() {
        let key = test_key();
        assert_eq!(
            key.client_email(),
            "test-iam-credentials@dummy-project-id.iam.gserviceaccount.com"
        );
        let dbg = format!("{key:?}");
        assert!(
            dbg.contains("redacted") && !dbg.contains("PRIVATE"),
            "{dbg}"
        );
    }

    #[test]
    fn invalid_options_are_errors() {
        let key = test_key();
        let base = nixery_opts("o", "https", None);
        let err = |opts: SignOptions| signed_url(&key, &opts).unwrap_err();

        assert!(matches!(
            err(SignOptions {
                expires_secs: 0,
                ..base
            }),
            SignError::InvalidExpiration(0)
        ));
        assert!(matches!(
            err(SignOptions {
                expires_secs: MAX_EXPIRES_SECS + 1,
                ..base
            }),
            SignError::InvalidExpiration(_)
        ));
        assert!(signed_url(
            &key,
            &SignOptions {
                expires_secs: MAX_EXPIRES_SECS,
                ..base
            }
        )
        .is_ok());
        assert!(matches!(
            err(SignOptions {
                method: "get",
                ..base
            }),
            SignError::InvalidMethod(_)
        ));
        assert!(matches!(
            err(SignOptions { method: "", ..base }),
            SignError::InvalidMethod(_)
        ));
        assert!(matches!(
            err(SignOptions { bucket: "", ..base }),
            SignError::InvalidBucket(_)
        ));
        assert!(matches!(
            err(SignOptions {
                bucket: "a/b",
                ..base
            }),
            SignError::InvalidBucket(_)
        ));
        assert!(matches!(
            err(SignOptions {
                scheme: "ftp",
                ..base
            }),
            SignError::InvalidScheme(_)
        ));
        for host in ["", "http://h", "h/p", "u@h", "h h", ":80"] {
            assert!(
                matches!(
                    err(SignOptions {
                        host: Some(host),
                        ..base
                    }),
                    SignError::InvalidHost(_)
                ),
                "{host:?}"
            );
        }
        assert!(matches!(
            err(SignOptions {
                style: UrlStyle::BucketBoundHostname,
                ..base
            }),
            SignError::MissingBucketBoundHostname
        ));
        assert!(matches!(
            err(SignOptions {
                timestamp_unix: -1,
                ..base
            }),
            SignError::InvalidTimestamp(-1)
        ));

        let q = [("x-goog-signature".to_owned(), "forged".to_owned())];
        assert!(matches!(
            err(SignOptions { query: &q, ..base }),
            SignError::ReservedQueryParameter(_)
        ));
        let h = [("Host".to_owned(), "evil".to_owned())];
        assert!(matches!(
            err(SignOptions {
                headers: &h,
                ..base
            }),
            SignError::InvalidHeader { .. }
        ));
        let h = [("x-a".to_owned(), "v\nhost:evil".to_owned())];
        assert!(matches!(
            err(SignOptions {
                headers: &h,
                ..base
            }),
            SignError::InvalidHeader { .. }
        ));
        let h = [("a:b".to_owned(), "v".to_owned())];
        assert!(matches!(
            err(SignOptions {
                headers: &h,
                ..base
            }),
            SignError::InvalidHeader { .. }
        ));
    }

    #[test]
    fn repeated_headers_are_comma_joined() {
        let key = test_key();
        let h = [
            ("X-Goog-Meta-A".to_owned(), " 1 ".to_owned()),
            ("x-goog-meta-a".to_owned(), "2".to_owned()),
        ];
        let opts = SignOptions {
            headers: &h,
            ..nixery_opts("o", "https", None)
        };
        let prepared = prepare(key.client_email(), &opts).unwrap();
        assert!(prepared.canonical_request.contains("\nx-goog-meta-a:1,2\n"));
        assert!(prepared
            .canonical_request
            .contains("\nhost;x-goog-meta-a\n"));
    }

    #[test]
    fn timestamps_format_as_utc() {
        let f = |t| format_timestamp(t).unwrap().1;
        assert_eq!(f(0), "19700101T000000Z");
        assert_eq!(f(951_782_400), "20000229T000000Z"); // leap day
        assert_eq!(f(1_549_011_600), "20190201T090000Z"); // vectors' time
        assert_eq!(f(253_402_300_799), "99991231T235959Z");
        assert!(format_timestamp(253_402_300_800).is_err());
        for t in [
            0,
            951_782_400,
            1_549_011_600,
            4_102_444_800,
            253_402_300_799,
        ] {
            let (y, m, d) = civil_from_days(t / 86_400);
            assert_eq!(days_from_civil(y, i64::from(m), i64::from(d)), t / 86_400);
        }
    }

    #[test]
    fn hostname_without_port_matches_go_semantics() {
        assert_eq!(hostname_without_port("localhost:8080"), "localhost");
        assert_eq!(
            hostname_without_port("storage.googleapis.com"),
            "storage.googleapis.com"
        );
        assert_eq!(hostname_without_port("[::1]:4443"), "::1");
        assert_eq!(hostname_without_port("[::1]"), "::1");
    }
}
