//! SignerActor: turns a stored blob into where the client fetches it: a local file the
//! server streams, or a V4-signed (or public) URL of the bucket object. Signed URLs are
//! reused for half their lifetime, so a hot blob costs one RSA signature per period.
//! S3 blobs come with their own presigner (HMAC, cheap): the URL is made per request.

use crate::signing::{self, ServiceAccountKey, SignOptions, UrlStyle};
use crate::storage::BlobLocation;
use actix::prelude::*;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where a client gets a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobAccess {
    Stream(PathBuf),
    Redirect(String),
}

#[derive(Message)]
#[rtype(result = "Result<BlobAccess, String>")]
pub struct LocateBlob {
    pub location: BlobLocation,
}

pub struct SignerActor {
    key: Option<ServiceAccountKey>,
    scheme: String,
    host: String,
    ttl: Duration,
    cache: HashMap<String, (Instant, String)>,
}

impl SignerActor {
    /// `endpoint` is empty for Google Cloud Storage, or an emulator's URL.
    pub fn new(key: Option<ServiceAccountKey>, endpoint: &str, ttl: Duration) -> Self {
        let (scheme, host) = split_endpoint(endpoint);
        SignerActor {
            key,
            scheme,
            host,
            ttl,
            cache: HashMap::new(),
        }
    }
}

/// `http://127.0.0.1:4443` → ("http", "127.0.0.1:4443"); a bare host means http, as
/// STORAGE_EMULATOR_HOST usually names a local emulator.
pub fn split_endpoint(endpoint: &str) -> (String, String) {
    if endpoint.is_empty() {
        return ("https".into(), "storage.googleapis.com".into());
    }
    match endpoint.split_once("://") {
        Some((scheme, rest)) => (scheme.to_string(), rest.trim_end_matches('/').to_string()),
        None => ("http".into(), endpoint.trim_end_matches('/').to_string()),
    }
}

impl Actor for SignerActor {
    type Context = Context<Self>;
}

impl Handler<LocateBlob> for SignerActor {
    type Result = ResponseFuture<Result<BlobAccess, String>>;

    fn handle(&mut self, msg: LocateBlob, _: &mut Self::Context) -> Self::Result {
        let access = match msg.location {
            BlobLocation::File(path) => Ok(BlobAccess::Stream(path)),
            BlobLocation::Object { bucket, object } => self.object_url(bucket, object),
            BlobLocation::Presigned(presigner) => {
                let ttl = self.ttl;
                return Box::pin(async move {
                    presigner
                        .url(ttl)
                        .await
                        .map(BlobAccess::Redirect)
                        .map_err(|e| e.to_string())
                });
            }
        };
        Box::pin(std::future::ready(access))
    }
}

impl SignerActor {
    /// A signed (or, without a key, public) URL of a GCS object.
    fn object_url(&mut self, bucket: String, object: String) -> Result<BlobAccess, String> {
        let Some(key) = &self.key else {
            return Ok(BlobAccess::Redirect(signing::public_url(
                &self.scheme,
                &self.host,
                &bucket,
                &object,
            )));
        };
        let now = Instant::now();
        if let Some((made, url)) = self.cache.get(&object) {
            if now.duration_since(*made) < self.ttl / 2 {
                return Ok(BlobAccess::Redirect(url.clone()));
            }
        }
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs() as i64;
        let url = signing::signed_url(
            key,
            &SignOptions {
                method: "GET",
                bucket: &bucket,
                object: &object,
                timestamp_unix: timestamp,
                expires_secs: self.ttl.as_secs(),
                style: UrlStyle::PathStyle,
                scheme: &self.scheme,
                host: Some(&self.host),
                query: &[],
                headers: &[],
            },
        )
        .map_err(|e| e.to_string())?;
        if self.cache.len() > 100_000 {
            self.cache.clear();
        }
        self.cache.insert(object, (now, url.clone()));
        Ok(BlobAccess::Redirect(url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            split_endpoint(""),
            ("https".into(), "storage.googleapis.com".into())
        );
        assert_eq!(
            split_endpoint("http://127.0.0.1:4443/"),
            ("http".into(), "127.0.0.1:4443".into())
        );
        assert_eq!(
            split_endpoint("127.0.0.1:4443"),
            ("http".into(), "127.0.0.1:4443".into())
        );
    }
}
