//! A test-only check of SigV4 presigned URLs (query-string authentication), the
//! URLs that blob downloads are redirected to on S3.
//!
//! The S3 server the tests run against (moto) does not check signatures, so a
//! wrongly signed URL would pass every round trip there and fail only against
//! real S3. The URLs are therefore verified here by an implementation written
//! from AWS's specification ("Authenticating Requests: Using Query Parameters
//! (AWS Signature Version 4)" in the S3 API reference), independent of the
//! signer in `object_store`, and that implementation is itself checked against
//! AWS's published example before it is trusted.
//!
//! Only the signature and the shape of the authentication parameters are
//! checked, not whether the URL has expired: AWS's example is from 2013.

use percent_encoding::{percent_decode_str, percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::Url;
use ring::{digest, hmac};

const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// A presigned URL does not know the body of the request it authorizes.
const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
/// S3 refuses presigned URLs that claim to live longer than seven days.
const MAX_EXPIRES: u64 = 7 * 24 * 3600;

/// AWS's `UriEncode`: every byte but the unreserved characters `A-Za-z0-9-._~`
/// as `%XX` with uppercase hex (a space is `%20`, never `+`).
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');
/// In the canonical URI the `/` between segments is kept.
const PATH: &AsciiSet = &UNRESERVED.remove(b'/');

/// What a URL that verified says about itself.
#[derive(Debug)]
pub(crate) struct Verified {
    pub access_key: String,
    /// The credential scope: date (`YYYYMMDD`), region and service.
    pub date: String,
    pub region: String,
    pub service: String,
    /// `X-Amz-Date` as given, and as Unix seconds.
    pub amz_date: String,
    pub signed_at: u64,
    /// `X-Amz-Expires`, seconds after `signed_at`.
    pub expires: u64,
    pub signed_headers: Vec<String>,
    pub security_token: Option<String>,
    /// Kept so that a test can compare them with a published example.
    pub canonical_request: String,
    pub string_to_sign: String,
}

/// Recomputes the signature of a presigned `url` for a request with `method`
/// whose `Host` header is `host` (as the client will send it: with the port
/// unless it is the scheme's default), and compares it with the one in the URL.
/// The error says why the URL is refused; on a signature mismatch it includes
/// the canonical request and string to sign, to show how the signer differed.
pub(crate) fn verify(
    method: &str,
    url: &str,
    host: &str,
    secret_key: &str,
) -> Result<Verified, String> {
    let parsed = Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    let query = parsed.query().unwrap_or("");
    let params = decode_query(query)?;

    let algorithm = only(&params, "X-Amz-Algorithm")?;
    if algorithm != ALGORITHM {
        return Err(format!("X-Amz-Algorithm is {algorithm:?}, not {ALGORITHM}"));
    }
    let credential = only(&params, "X-Amz-Credential")?;
    let [access_key, date, region, service, terminator] = credential
        .split('/')
        .collect::<Vec<_>>()
        .try_into()
        .map_err(|_| {
            format!("X-Amz-Credential {credential:?} is not key/date/region/service/aws4_request")
        })?;
    if terminator != "aws4_request" || [access_key, date, region, service].contains(&"") {
        return Err(format!(
            "X-Amz-Credential {credential:?} is not key/date/region/service/aws4_request"
        ));
    }
    let amz_date = only(&params, "X-Amz-Date")?;
    let signed_at = amz_date_to_unix(amz_date)
        .ok_or_else(|| format!("X-Amz-Date {amz_date:?} is not YYYYMMDDTHHMMSSZ"))?;
    // The scope's date is the day of the signing time, or the derived key is
    // for another day than the request claims.
    if !amz_date.starts_with(date) || date.len() != 8 {
        return Err(format!(
            "the credential's date {date} is not the day of X-Amz-Date {amz_date}"
        ));
    }
    let expires_text = only(&params, "X-Amz-Expires")?;
    let expires: u64 = expires_text
        .parse()
        .ok()
        .filter(|e| (1..=MAX_EXPIRES).contains(e))
        .ok_or_else(|| format!("X-Amz-Expires {expires_text:?} is not 1 to {MAX_EXPIRES}"))?;
    let signed_headers_text = only(&params, "X-Amz-SignedHeaders")?;
    let signed_headers: Vec<String> = signed_headers_text.split(';').map(str::to_string).collect();
    let given_signature = only(&params, "X-Amz-Signature")?;
    let security_token = if params.iter().any(|(n, _)| n == "X-Amz-Security-Token") {
        Some(only(&params, "X-Amz-Security-Token")?.to_string())
    } else {
        None
    };

    let headers = canonical_headers(&signed_headers, host)?;
    let canonical_request = format!(
        "{method}\n{}\n{}\n{headers}\n{signed_headers_text}\n{UNSIGNED_PAYLOAD}",
        canonical_uri(parsed.path()),
        canonical_query(&params),
    );
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let string_to_sign = format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        hex::encode(digest::digest(
            &digest::SHA256,
            canonical_request.as_bytes()
        ))
    );
    let mut key = format!("AWS4{secret_key}").into_bytes();
    for part in [date, region, service, "aws4_request"] {
        key = hmac_sha256(&key, part.as_bytes());
    }
    let signature = hex::encode(hmac_sha256(&key, string_to_sign.as_bytes()));
    if signature != given_signature {
        return Err(format!(
            "signature {given_signature} does not match the recomputed {signature}\n\
             canonical request:\n{canonical_request}\nstring to sign:\n{string_to_sign}"
        ));
    }
    Ok(Verified {
        access_key: access_key.to_string(),
        date: date.to_string(),
        region: region.to_string(),
        service: service.to_string(),
        amz_date: amz_date.to_string(),
        signed_at,
        expires,
        signed_headers,
        security_token,
        canonical_request,
        string_to_sign,
    })
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
        .as_ref()
        .to_vec()
}

/// The query's name/value pairs, percent-decoded, in their order. A `+` stays a
/// `+`: AWS's rules know no form encoding, a space must be `%20`.
fn decode_query(query: &str) -> Result<Vec<(String, String)>, String> {
    let decode = |s: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .map(|d| d.into_owned())
            .map_err(|_| format!("{s:?} in the query is not UTF-8 once decoded"))
    };
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(name)?, decode(value)?))
        })
        .collect()
}

/// The value of an authentication parameter, which must appear exactly once:
/// with two, which one S3 would take is not for a verifier to guess.
fn only<'a>(params: &'a [(String, String)], name: &str) -> Result<&'a str, String> {
    let mut values = params.iter().filter(|(n, _)| n == name).map(|(_, v)| v);
    match (values.next(), values.next()) {
        (Some(v), None) => Ok(v),
        (None, _) => Err(format!("{name} is missing")),
        (Some(_), Some(_)) => Err(format!("{name} appears more than once")),
    }
}

/// The path as S3 canonicalizes it: decoded to the object's bytes, then
/// `UriEncode`d once with `/` kept. (Other services encode it a second time; S3
/// does not.)
pub(crate) fn canonical_uri(path: &str) -> String {
    let bytes: Vec<u8> = percent_decode_str(path).collect();
    let encoded = percent_encode(&bytes, PATH).to_string();
    if encoded.is_empty() {
        "/".to_string()
    } else {
        encoded
    }
}

/// Every parameter but the signature, name and value `UriEncode`d, sorted by
/// encoded name and then by encoded value, as `name=value` joined with `&`.
fn canonical_query(params: &[(String, String)]) -> String {
    let mut encoded: Vec<(String, String)> = params
        .iter()
        .filter(|(name, _)| name != "X-Amz-Signature")
        .map(|(n, v)| {
            (
                percent_encode(n.as_bytes(), UNRESERVED).to_string(),
                percent_encode(v.as_bytes(), UNRESERVED).to_string(),
            )
        })
        .collect();
    encoded.sort();
    encoded
        .iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// `name:value\n` for each signed header. A presigned GET only needs `host`;
/// any other signed header is one the client would have to send, whose value
/// this check is not given, so such a URL is refused rather than guessed at.
fn canonical_headers(signed: &[String], host: &str) -> Result<String, String> {
    if !signed.iter().any(|h| h == "host") {
        return Err("X-Amz-SignedHeaders does not include host".into());
    }
    // The list is part of what is signed, so it must already be canonical.
    if signed
        .iter()
        .any(|h| h.is_empty() || *h != h.to_ascii_lowercase())
        || signed.windows(2).any(|w| w[0] >= w[1])
    {
        return Err(format!(
            "X-Amz-SignedHeaders {:?} is not sorted lowercase names",
            signed.join(";")
        ));
    }
    signed
        .iter()
        .map(|name| match name.as_str() {
            "host" => Ok(format!(
                "host:{}\n",
                host.split_whitespace().collect::<Vec<_>>().join(" ")
            )),
            other => Err(format!("signs header {other}, whose value is not known")),
        })
        .collect()
}

/// `YYYYMMDDTHHMMSSZ` as Unix seconds.
fn amz_date_to_unix(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let s = text.get(range)?;
        if s.bytes().all(|c| c.is_ascii_digit()) {
            s.parse().ok()
        } else {
            None
        }
    };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, s) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date, counting years from
    // March so that the leap day is the last day of its year.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((mo + 9) % 12) + 2) / 5 + d - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + mi * 60 + s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::aws::{AmazonS3, AmazonS3Builder};
    use object_store::path::Path as ObjectPath;
    use object_store::signer::Signer;
    use object_store::ClientOptions;
    use std::time::Duration;

    // AWS's published example (S3 API reference, "Authenticating Requests:
    // Using Query Parameters (AWS Signature Version 4)", "An Example").
    const EXAMPLE_SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    const EXAMPLE_HOST: &str = "examplebucket.s3.amazonaws.com";
    const EXAMPLE_SIGNATURE: &str =
        "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404";
    const EXAMPLE_URL: &str = "https://examplebucket.s3.amazonaws.com/test.txt\
        ?X-Amz-Algorithm=AWS4-HMAC-SHA256\
        &X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request\
        &X-Amz-Date=20130524T000000Z\
        &X-Amz-Expires=86400\
        &X-Amz-SignedHeaders=host\
        &X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404";
    const EXAMPLE_CANONICAL_REQUEST: &str = "GET\n\
        /test.txt\n\
        X-Amz-Algorithm=AWS4-HMAC-SHA256\
        &X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request\
        &X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host\n\
        host:examplebucket.s3.amazonaws.com\n\
        \n\
        host\n\
        UNSIGNED-PAYLOAD";
    const EXAMPLE_STRING_TO_SIGN: &str = "AWS4-HMAC-SHA256\n\
        20130524T000000Z\n\
        20130524/us-east-1/s3/aws4_request\n\
        3bfa292879f6447bbcda7001decf97f4a54dc650c8942174ae0a9121cf58ad04";

    /// The reason a URL is refused, which must be a wrong signature: a URL
    /// refused for its shape would prove nothing about the signing.
    fn signature_mismatch(result: Result<Verified, String>, what: &str) {
        match result {
            Ok(_) => panic!("{what}: verified"),
            Err(why) => assert!(why.contains("does not match"), "{what}: {why}"),
        }
    }

    #[test]
    fn sigv4_verifier_reproduces_the_aws_published_example() {
        let v = verify("GET", EXAMPLE_URL, EXAMPLE_HOST, EXAMPLE_SECRET).unwrap();
        assert_eq!(v.canonical_request, EXAMPLE_CANONICAL_REQUEST);
        assert_eq!(v.string_to_sign, EXAMPLE_STRING_TO_SIGN);
        assert_eq!(v.access_key, "AKIAIOSFODNN7EXAMPLE");
        assert_eq!(
            (v.date.as_str(), v.region.as_str(), v.service.as_str()),
            ("20130524", "us-east-1", "s3")
        );
        assert_eq!(v.amz_date, "20130524T000000Z");
        assert_eq!(v.signed_at, 1_369_353_600);
        assert_eq!(v.expires, 86400);
        assert_eq!(v.signed_headers, ["host"]);
        assert_eq!(v.security_token, None);
    }

    #[test]
    fn sigv4_verifier_sorts_parameters_and_decodes_before_encoding() {
        // The same request with the parameters in another order and the
        // credential's `/` left unencoded (as the example is printed for
        // readability): what is signed is the canonical form, not the URL text.
        let reordered = "https://examplebucket.s3.amazonaws.com/test.txt\
            ?X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404\
            &X-Amz-SignedHeaders=host&X-Amz-Expires=86400&X-Amz-Date=20130524T000000Z\
            &X-Amz-Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request\
            &X-Amz-Algorithm=AWS4-HMAC-SHA256";
        let v = verify("GET", reordered, EXAMPLE_HOST, EXAMPLE_SECRET).unwrap();
        assert_eq!(v.canonical_request, EXAMPLE_CANONICAL_REQUEST);
    }

    #[test]
    fn sigv4_verifier_refuses_the_example_with_one_character_changed() {
        let changed = |from: &str, to: &str| {
            assert!(EXAMPLE_URL.contains(from), "{from}");
            EXAMPLE_URL.replacen(from, to, 1)
        };
        let last = EXAMPLE_SIGNATURE.len() - 1;
        let signature = format!("{}5", &EXAMPLE_SIGNATURE[..last]);
        for (what, url, host, secret) in [
            (
                "signature",
                changed(EXAMPLE_SIGNATURE, &signature),
                EXAMPLE_HOST,
                EXAMPLE_SECRET,
            ),
            (
                "path",
                changed("/test.txt", "/test.txu"),
                EXAMPLE_HOST,
                EXAMPLE_SECRET,
            ),
            (
                "expiry",
                changed("Expires=86400", "Expires=86401"),
                EXAMPLE_HOST,
                EXAMPLE_SECRET,
            ),
            (
                "access key",
                changed("AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLF"),
                EXAMPLE_HOST,
                EXAMPLE_SECRET,
            ),
            (
                "region",
                changed("us-east-1", "us-east-2"),
                EXAMPLE_HOST,
                EXAMPLE_SECRET,
            ),
            (
                "time",
                changed("T000000Z", "T000001Z"),
                EXAMPLE_HOST,
                EXAMPLE_SECRET,
            ),
            (
                "host",
                EXAMPLE_URL.to_string(),
                "examplebucket.s3.amazonaws.org",
                EXAMPLE_SECRET,
            ),
            (
                "secret key",
                EXAMPLE_URL.to_string(),
                EXAMPLE_HOST,
                "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEZ",
            ),
            (
                "extra parameter",
                format!("{EXAMPLE_URL}&x-id=GetObject"),
                EXAMPLE_HOST,
                EXAMPLE_SECRET,
            ),
        ] {
            signature_mismatch(verify("GET", &url, host, secret), what);
        }
        signature_mismatch(
            verify("HEAD", EXAMPLE_URL, EXAMPLE_HOST, EXAMPLE_SECRET),
            "method",
        );
    }

    #[test]
    fn sigv4_verifier_refuses_malformed_authentication_parameters() {
        let changed = |from: &str, to: &str| EXAMPLE_URL.replacen(from, to, 1);
        for (url, reason) in [
            (
                changed("&X-Amz-Signature=", "&X-Amz-Sig="),
                "X-Amz-Signature is missing",
            ),
            (changed("HMAC-SHA256", "HMAC-SHA1"), "X-Amz-Algorithm"),
            (changed("Expires=86400", "Expires=604801"), "X-Amz-Expires"),
            (changed("Expires=86400", "Expires=0"), "X-Amz-Expires"),
            (
                changed("%2F20130524%2F", "%2F20130525%2F"),
                "the credential's date",
            ),
            (changed("%2Faws4_request", "%2Faws4"), "X-Amz-Credential"),
            (
                changed("SignedHeaders=host", "SignedHeaders=host%3Brange"),
                "range",
            ),
            (
                changed("SignedHeaders=host", "SignedHeaders=range"),
                "include host",
            ),
            (
                changed("20130524T000000Z", "2013-05-24T00:00:00Z"),
                "X-Amz-Date",
            ),
            (format!("{EXAMPLE_URL}&X-Amz-Expires=60"), "more than once"),
        ] {
            let why = verify("GET", &url, EXAMPLE_HOST, EXAMPLE_SECRET).unwrap_err();
            assert!(why.contains(reason), "{url}: {why}");
        }
    }

    #[test]
    fn sigv4_canonical_uri_encodes_once_as_s3_does() {
        assert_eq!(canonical_uri(""), "/");
        assert_eq!(
            canonical_uri("/layers/blobs/sha256/ab01"),
            "/layers/blobs/sha256/ab01"
        );
        // Already-encoded bytes are not encoded again (`%20` stays, no `%2520`);
        // what is unreserved is left as it is whichever way it came.
        assert_eq!(canonical_uri("/a%20b/c%7Ed-e_f.g"), "/a%20b/c~d-e_f.g");
        assert_eq!(canonical_uri("/a+b=c:d@e"), "/a%2Bb%3Dc%3Ad%40e");
        assert_eq!(canonical_uri("/%C3%A9t%C3%A9"), "/%C3%A9t%C3%A9");
        assert_eq!(canonical_uri("/%c3%a9"), "/%C3%A9");
    }

    const KEY: &str = "AKIDEXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    /// `S3Storage::build` is private to `s3.rs`, so the client is configured
    /// here with the options `build` gives it that bear on signing: bucket,
    /// region, endpoint (plain HTTP allowed), path-style requests.
    fn client(endpoint: Option<&str>, token: Option<&str>) -> AmazonS3 {
        let mut builder = AmazonS3Builder::new()
            .with_access_key_id(KEY)
            .with_secret_access_key(SECRET)
            .with_region("eu-west-1")
            .with_bucket_name("layers")
            .with_virtual_hosted_style_request(false);
        if let Some(endpoint) = endpoint {
            builder = builder.with_endpoint(endpoint).with_client_options(
                ClientOptions::new().with_allow_http(endpoint.starts_with("http://")),
            );
        }
        if let Some(token) = token {
            builder = builder.with_token(token);
        }
        builder.build().unwrap()
    }

    /// The `Host` header a client sends for `url`: the port only when it is
    /// not the scheme's default.
    fn host_header(url: &Url) -> String {
        let host = url.host_str().unwrap();
        match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        }
    }

    fn blob(hex_byte: &str) -> String {
        format!("blobs/sha256/{}", hex_byte.repeat(32))
    }

    /// Signs `object` with `store` for `ttl`, verifies the URL, and checks what
    /// it claims: the TTL asked for, the configured region and S3, signed just
    /// now, and that it does not verify with another secret.
    async fn signed_and_verified(
        store: &AmazonS3,
        object: &str,
        ttl: u64,
        url_prefix: &str,
    ) -> Verified {
        let url = store
            .signed_url(
                reqwest::Method::GET,
                &ObjectPath::from(object),
                Duration::from_secs(ttl),
            )
            .await
            .unwrap()
            .to_string();
        assert!(url.starts_with(url_prefix), "{url}");
        let host = host_header(&Url::parse(&url).unwrap());
        let v = verify("GET", &url, &host, SECRET).unwrap_or_else(|why| panic!("{url}: {why}"));
        assert_eq!(v.expires, ttl, "{url}");
        assert_eq!(v.access_key, KEY);
        assert_eq!((v.region.as_str(), v.service.as_str()), ("eu-west-1", "s3"));
        assert!(v.amz_date.starts_with(&v.date));
        assert_eq!(v.signed_headers, ["host"]);
        let now = super::super::unix_now();
        assert!(
            v.signed_at <= now && now < v.signed_at + 60,
            "signed at {} ({}), now {now}",
            v.signed_at,
            v.amz_date
        );
        signature_mismatch(
            verify(
                "GET",
                &url,
                &host,
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEZ",
            ),
            "another secret",
        );
        v
    }

    #[tokio::test]
    async fn sigv4_object_store_urls_verify_on_a_path_style_endpoint() {
        let store = client(Some("http://127.0.0.1:9000"), None);
        for (object, ttl) in [(blob("ab"), 300), (blob("0f"), 3600), (blob("e3"), 604_800)] {
            let prefix = format!("http://127.0.0.1:9000/layers/{object}?");
            let v = signed_and_verified(&store, &object, ttl, &prefix).await;
            assert_eq!(v.security_token, None);
        }
    }

    #[tokio::test]
    async fn sigv4_object_store_urls_verify_on_the_default_aws_endpoint() {
        let store = client(None, None);
        for object in [blob("ab"), blob("17")] {
            let prefix = format!("https://s3.eu-west-1.amazonaws.com/layers/{object}?");
            signed_and_verified(&store, &object, 300, &prefix).await;
        }
    }

    #[tokio::test]
    async fn sigv4_object_store_urls_sign_the_session_token() {
        // Temporary credentials (a session token from the environment or the
        // credentials file) travel in the URL and are part of what is signed.
        let token = "FwoGZXIvYXdzEB/a+token=with/odd+characters==";
        let store = client(Some("http://127.0.0.1:9000"), Some(token));
        let object = blob("ab");
        let prefix = format!("http://127.0.0.1:9000/layers/{object}?");
        let v = signed_and_verified(&store, &object, 300, &prefix).await;
        assert_eq!(v.security_token.as_deref(), Some(token));
    }

    #[tokio::test]
    async fn sigv4_object_store_urls_verify_for_names_that_need_encoding() {
        // Our object names never need it; this shows the path is encoded once,
        // as S3 expects, should that change. (`Path::from` itself turns `~` and
        // non-ASCII into `%XX` in the object's name, so "café" is stored as
        // "caf%C3%A9"; the signature covers whatever name is sent.)
        let store = client(Some("http://127.0.0.1:9000"), None);
        for object in ["dir/a b+c=d~e", "records/x:y@z.json", "caf\u{e9}/\u{1f4e6}"] {
            signed_and_verified(&store, object, 300, "http://127.0.0.1:9000/layers/").await;
        }
    }
}
