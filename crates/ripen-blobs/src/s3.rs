//! Blobs as objects in an S3 bucket, or on an S3-compatible server:
//! `s3://bucket/prefix` keeps the blob `KEY` at the object `prefix/KEY`.
//!
//! A blob is written with one PUT, and `put` returns when S3 has answered
//! it: then the object is durable, as S3 makes it. Every request has a
//! bounded time and few retries, so that an outage shows quickly as
//! [`BlobError::Unavailable`] rather than as a call that hangs.
//!
//! The credentials come from the environment, as object_store reads it
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, or
//! the web-identity, container and instance credentials of AWS); the
//! bucket, prefix, endpoint, region, addressing style and HTTP settings
//! come from [`Options`] alone, whatever `AWS_*` variables say.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::TryStreamExt as _;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt as _, PutPayload, RetryConfig,
};

use crate::{check_key, BlobError, BlobRef, BlobStore, Options, Result};

/// The region of a store whose [`Options`] name none.
pub const DEFAULT_REGION: &str = "us-east-1";
/// How long a connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take, its body included: enough for a blob of
/// tens of MiB.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a failed request is tried again...
const MAX_RETRIES: usize = 3;
/// ...and for how long after the first try at most.
const RETRY_TIMEOUT: Duration = Duration::from_secs(10);

/// A blob store in an S3 bucket, under a prefix.
#[derive(Clone)]
pub struct S3Store {
    store: Arc<AmazonS3>,
    bucket: String,
    /// The objects' common prefix, without a trailing `/`; `None` for the
    /// bucket's root.
    prefix: Option<Path>,
    endpoint: Option<String>,
    region: String,
}

/// Names the bucket and the server, never the credentials.
impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix.as_ref().map(Path::as_ref))
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .finish()
    }
}

impl S3Store {
    /// Opens the store of `options.url`, `s3://bucket[/prefix]`. It sends
    /// no request and needs no async runtime: a bucket that cannot be
    /// reached, or credentials that are refused, show on first use.
    pub fn open(options: &Options) -> std::result::Result<S3Store, String> {
        let url = options.url.as_str();
        let (bucket, prefix) = parse_url(url)?;
        let region = options.region.as_deref().unwrap_or(DEFAULT_REGION);
        if region.is_empty() {
            return Err(format!(
                "{url:?}: the region is empty: name one, such as {DEFAULT_REGION}"
            ));
        }
        let endpoint = match &options.endpoint {
            Some(endpoint) => Some(check_endpoint(endpoint)?),
            None => None,
        };

        // reqwest's rustls takes the process's crypto provider: ring, unless
        // the program installed another one first.
        let _ = rustls::crypto::ring::default_provider().install_default();

        let client = ClientOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_allow_http(
                endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://")),
            );
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: MAX_RETRIES,
            retry_timeout: RETRY_TIMEOUT,
        };
        let mut builder = credentials_from_env()
            .with_bucket_name(bucket)
            .with_region(region)
            .with_client_options(client)
            .with_retry(retry)
            // A named server gets path-style requests (`endpoint/bucket/key`),
            // which S3-compatible servers all take; AWS gets virtual-hosted
            // ones (`bucket.s3.region.amazonaws.com/key`).
            .with_virtual_hosted_style_request(endpoint.is_none());
        if let Some(endpoint) = &endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let store = builder
            .build()
            .map_err(|e| format!("{url:?}: cannot set up the S3 client: {e}"))?;
        Ok(S3Store {
            store: Arc::new(store),
            bucket: bucket.to_owned(),
            prefix,
            endpoint,
            region: region.to_owned(),
        })
    }

    /// The object of the blob `key`: `prefix/key`.
    fn path_of(&self, key: &str) -> Result<Path> {
        check_key(key)?;
        Ok(match &self.prefix {
            Some(prefix) => prefix.clone().join(key),
            None => Path::from(key),
        })
    }

    /// The blob key of the object at `location`, if it is one: right under
    /// the prefix, with a name that [`check_key`] takes.
    fn key_of(&self, location: &Path) -> Option<String> {
        let mut parts: Vec<_> = match &self.prefix {
            Some(prefix) => location.prefix_match(prefix)?.collect(),
            None => location.parts().collect(),
        };
        let name = parts.pop()?;
        let name = name.as_ref();
        (parts.is_empty() && check_key(name).is_ok()).then(|| name.to_owned())
    }
}

#[async_trait]
impl BlobStore for S3Store {
    async fn put(&self, key: &str, bytes: Bytes) -> Result<BlobRef> {
        let path = self.path_of(key)?;
        let blob = BlobRef::of(key, &bytes);
        self.store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(|e| unavailable("write", &path, &e))?;
        Ok(blob)
    }

    async fn get(&self, blob: &BlobRef) -> Result<Bytes> {
        let path = self.path_of(&blob.key)?;
        let missing = || BlobError::Missing {
            key: blob.key.clone(),
        };
        let found = match self.store.get(&path).await {
            Ok(found) => found,
            Err(e) if is_missing_object(&e) => return Err(missing()),
            Err(e) => return Err(unavailable("read", &path, &e)),
        };
        let bytes = found.bytes().await.map_err(|e| match e {
            e if is_missing_object(&e) => missing(),
            e => unavailable("read", &path, &e),
        })?;
        blob.verify(bytes)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path_of(key)?;
        match self.store.delete(&path).await {
            Ok(()) => Ok(()),
            Err(e) if is_missing_object(&e) => Ok(()),
            Err(e) => Err(unavailable("delete", &path, &e)),
        }
    }

    async fn older_than(&self, before: SystemTime, limit: usize) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        if limit == 0 {
            return Ok(keys);
        }
        let mut objects = self.store.list(self.prefix.as_ref());
        let list_error = |e: object_store::Error| {
            let under = match &self.prefix {
                Some(prefix) => format!("under {prefix}/"),
                None => "of the bucket".to_owned(),
            };
            BlobError::Unavailable(format!("list the S3 objects {under}: {e}"))
        };
        while let Some(object) = objects.try_next().await.map_err(list_error)? {
            if SystemTime::from(object.last_modified) >= before {
                continue;
            }
            if let Some(key) = self.key_of(&object.location) {
                keys.push(key);
                if keys.len() >= limit {
                    break;
                }
            }
        }
        Ok(keys)
    }
}

/// `s3://bucket[/prefix]` as its bucket and its prefix.
fn parse_url(url: &str) -> std::result::Result<(&str, Option<Path>), String> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| format!("{url:?}: not an s3://bucket[/prefix] URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if !bucket_ok {
        return Err(format!(
            "{url:?}: {bucket:?} is not a bucket name: those are 3 to 63 lowercase letters, digits, '.' and '-'"
        ));
    }
    if prefix.contains(['?', '#']) {
        return Err(format!(
            "{url:?}: an s3:// URL is s3://bucket[/prefix], with no query or fragment"
        ));
    }
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return Ok((bucket, None));
    }
    let bad_prefix = |why: String| {
        format!(
            "{url:?}: {prefix:?} is not a prefix: name folders with '/' between them, none empty, '.' or '..'{why}"
        )
    };
    if prefix.starts_with('/') {
        return Err(bad_prefix(String::new()));
    }
    let path = Path::parse(prefix).map_err(|e| bad_prefix(format!(" ({e})")))?;
    Ok((bucket, Some(path)))
}

/// The endpoint, without a trailing `/`, if it is an http(s) URL of a
/// server.
fn check_endpoint(endpoint: &str) -> std::result::Result<String, String> {
    let host = endpoint
        .strip_prefix("https://")
        .or_else(|| endpoint.strip_prefix("http://"));
    let endpoint = endpoint.trim_end_matches('/');
    match host {
        Some(host) if !host.is_empty() && !host.starts_with('/') => Ok(endpoint.to_owned()),
        _ => Err(format!(
            "the S3 endpoint {endpoint:?} is not an http:// or https:// URL of a server, such as http://127.0.0.1:9000"
        )),
    }
}

/// An [`AmazonS3Builder`] with what the environment says of credentials,
/// as [`AmazonS3Builder::from_env`] reads it, and nothing of what
/// [`Options`] decide.
fn credentials_from_env() -> AmazonS3Builder {
    let mut builder = AmazonS3Builder::new();
    for (name, value) in std::env::vars_os() {
        let (Some(name), Some(value)) = (name.to_str(), value.to_str()) else {
            continue;
        };
        if !name.starts_with("AWS_") {
            continue;
        }
        let Ok(key) = name.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() else {
            continue;
        };
        let options_decide = matches!(
            key,
            AmazonS3ConfigKey::Bucket
                | AmazonS3ConfigKey::Region
                | AmazonS3ConfigKey::DefaultRegion
                | AmazonS3ConfigKey::Endpoint
                | AmazonS3ConfigKey::S3Endpoint
                | AmazonS3ConfigKey::VirtualHostedStyleRequest
                | AmazonS3ConfigKey::S3Express
                | AmazonS3ConfigKey::Client(_)
        );
        if !options_decide {
            builder = builder.with_config(key, value);
        }
    }
    builder
}

/// Whether `e` says that the object is not there, in a bucket that is: a
/// bucket that is not there (S3's `NoSuchBucket`, a 404 too) is a store
/// that is not set up, not a lost blob.
fn is_missing_object(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. }) && !e.to_string().contains("NoSuchBucket")
}

fn unavailable(what: &str, path: &Path, e: &object_store::Error) -> BlobError {
    BlobError::Unavailable(format!("{what} the S3 object {path}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_a_bucket_and_a_prefix() {
        assert_eq!(parse_url("s3://bucket"), Ok(("bucket", None)));
        assert_eq!(parse_url("s3://bucket/"), Ok(("bucket", None)));
        let (bucket, prefix) = parse_url("s3://my.bucket-1/ripen/blobs/").expect("parses");
        assert_eq!(bucket, "my.bucket-1");
        assert_eq!(prefix.as_ref().map(Path::as_ref), Some("ripen/blobs"));
        for bad in [
            "s3://",
            "s3://Bucket",
            "s3://b",
            "s3://bucket//x",
            "s3://bucket/a/../b",
            "s3://bucket/x?versionId=1",
            "file:///x",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoints_are_http_urls() {
        assert_eq!(
            check_endpoint("http://127.0.0.1:9000/"),
            Ok("http://127.0.0.1:9000".to_owned())
        );
        assert!(check_endpoint("https://s3.example.com").is_ok());
        for bad in ["127.0.0.1:9000", "ftp://x", "http://", "https:///x"] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_objects_right_under_the_prefix() {
        let options = Options {
            url: "s3://bucket/ripen/blobs".into(),
            endpoint: Some("http://127.0.0.1:9".into()),
            region: None,
        };
        let store = S3Store::open(&options).expect("open");
        let path = store.path_of("k-1").expect("a key");
        assert_eq!(path.as_ref(), "ripen/blobs/k-1");
        assert_eq!(store.key_of(&path), Some("k-1".to_owned()));
        assert_eq!(store.key_of(&Path::from("ripen/blobs/sub/k-1")), None);
        assert_eq!(store.key_of(&Path::from("ripen/other/k-1")), None);
        assert_eq!(store.key_of(&Path::from("ripen/blobs/not.a.key")), None);
        assert!(matches!(store.path_of("../x"), Err(BlobError::BadKey(_))));
        let debug = format!("{store:?}");
        assert!(
            debug.contains("ripen/blobs") && debug.contains("us-east-1"),
            "{debug}"
        );

        let root = S3Store::open(&Options {
            url: "s3://bucket".into(),
            ..options
        })
        .expect("open");
        assert_eq!(root.path_of("k").expect("a key").as_ref(), "k");
        assert_eq!(root.key_of(&Path::from("k")), Some("k".to_owned()));
        assert_eq!(root.key_of(&Path::from("a/k")), None);
    }
}
