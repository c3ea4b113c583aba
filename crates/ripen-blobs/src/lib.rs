//! Large payloads live in a blob store, and the database keeps a
//! [`BlobRef`]: where the blob is, how long it is and its SHA-256. A blob
//! is written whole and synced before its reference is committed, and
//! every read checks it against the reference, so that a blob that was
//! lost or changed is a clear error ([`BlobError::Missing`],
//! [`BlobError::Corrupt`]) rather than a wrong payload.
//!
//! A crash between a blob's write and the commit of its reference leaves an
//! orphan: [`BlobStore::older_than`] lists blobs by age, and the caller
//! deletes those no reference names once they are older than a grace
//! period.
//!
//! [`LocalDir`] keeps blobs as files under one directory (`file://`);
//! with the feature `s3`, `S3Store` keeps them as objects in an S3 bucket
//! or on an S3-compatible server (`s3://`). [`open`] opens either from
//! [`Options`].

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

mod local;
#[cfg(feature = "s3")]
mod s3;

pub use local::LocalDir;
#[cfg(feature = "s3")]
pub use s3::S3Store;

/// What went wrong with a blob.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    /// No blob at the reference's key.
    #[error("the blob {key} is missing")]
    Missing { key: String },
    /// The blob is there but is not what was written.
    #[error("the blob {key} does not match its checksum: {why}")]
    Corrupt { key: String, why: String },
    /// A key that no blob may have.
    #[error("{0:?} is not a blob key: keys are 1 to 128 ASCII letters, digits, '-' and '_'")]
    BadKey(String),
    /// A reference's text that does not parse.
    #[error("not a blob reference: {0}")]
    BadRef(String),
    /// The store cannot be reached or written: the caller may try again.
    #[error("the blob store is unavailable: {0}")]
    Unavailable(String),
}

impl BlobError {
    /// Whether trying again may succeed. A missing or corrupt blob stays
    /// so: a step that reads it fails for good.
    pub fn is_transient(&self) -> bool {
        matches!(self, BlobError::Unavailable(_))
    }
}

pub type Result<T> = std::result::Result<T, BlobError>;

/// Where a blob is and what it must be: the database keeps this.
#[derive(Clone, PartialEq, Eq)]
pub struct BlobRef {
    pub key: String,
    pub len: u64,
    pub sha256: [u8; 32],
}

impl fmt::Debug for BlobRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobRef({self})")
    }
}

/// The text form kept in a database column: `sha256:HEX:LEN:KEY`.
impl fmt::Display for BlobRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}:{}:{}", hex(&self.sha256), self.len, self.key)
    }
}

impl std::str::FromStr for BlobRef {
    type Err = BlobError;

    fn from_str(text: &str) -> Result<BlobRef> {
        let bad = || BlobError::BadRef(text.chars().take(200).collect());
        let rest = text.strip_prefix("sha256:").ok_or_else(bad)?;
        let mut parts = rest.splitn(3, ':');
        let (Some(digest), Some(len), Some(key)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        if digest.len() != 64
            || !digest
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(bad());
        }
        let mut sha256 = [0u8; 32];
        for (i, byte) in sha256.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&digest[i * 2..i * 2 + 2], 16).map_err(|_| bad())?;
        }
        if len.is_empty() || (len.len() > 1 && len.starts_with('0')) {
            return Err(bad());
        }
        let len = len.parse().map_err(|_| bad())?;
        check_key(key).map_err(|_| bad())?;
        Ok(BlobRef {
            key: key.to_owned(),
            len,
            sha256,
        })
    }
}

impl BlobRef {
    /// The reference of `bytes` stored at `key`.
    pub fn of(key: &str, bytes: &[u8]) -> BlobRef {
        BlobRef {
            key: key.to_owned(),
            len: bytes.len() as u64,
            sha256: sha256(bytes),
        }
    }

    /// `bytes` if they are what this reference names.
    pub fn verify(&self, bytes: Bytes) -> Result<Bytes> {
        if bytes.len() as u64 != self.len {
            return Err(BlobError::Corrupt {
                key: self.key.clone(),
                why: format!("{} bytes where {} were written", bytes.len(), self.len),
            });
        }
        if sha256(&bytes) != self.sha256 {
            return Err(BlobError::Corrupt {
                key: self.key.clone(),
                why: "its SHA-256 differs".to_owned(),
            });
        }
        Ok(bytes)
    }
}

/// A place for blobs.
#[async_trait]
pub trait BlobStore: Send + Sync + fmt::Debug {
    /// Writes `bytes` at `key`, replacing any blob there, and returns once
    /// they are durable.
    async fn put(&self, key: &str, bytes: Bytes) -> Result<BlobRef>;

    /// The blob `blob` names, checked against it.
    async fn get(&self, blob: &BlobRef) -> Result<Bytes>;

    /// Deletes the blob at `key`; deleting a missing blob is no error.
    async fn delete(&self, key: &str) -> Result<()>;

    /// The keys of blobs last written before `before`, at most `limit`:
    /// what an orphan sweep looks at.
    async fn older_than(&self, before: SystemTime, limit: usize) -> Result<Vec<String>>;
}

/// Where the blobs are: what [`open`] opens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// `file:///absolute/dir` or `s3://bucket[/prefix]`.
    pub url: String,
    /// S3 only: the endpoint of an S3-compatible server, e.g.
    /// `http://127.0.0.1:9000` (plain http is allowed only when named here).
    pub endpoint: Option<String>,
    /// S3 only: the region (default `us-east-1`).
    pub region: Option<String>,
}

/// Whether this build can open `s3://` blob stores (the feature `s3`).
pub fn s3_supported() -> bool {
    cfg!(feature = "s3")
}

/// The message of an `s3://` URL in a build without the feature `s3`.
pub const NO_S3_SUPPORT: &str =
    "this ripen was built without S3 support: build it with `--features s3`";

/// Opens the blob store that `options` name: a directory for
/// `file:///absolute/dir`, a bucket for `s3://bucket[/prefix]` (in builds
/// with the feature `s3`). Opening sends no request: a store that cannot
/// be reached shows as [`BlobError::Unavailable`] on its first use.
pub fn open(options: &Options) -> std::result::Result<Arc<dyn BlobStore>, String> {
    let url = options.url.as_str();
    if let Some(path) = url.strip_prefix("file://") {
        if options.endpoint.is_some() || options.region.is_some() {
            return Err(format!(
                "{url:?}: an endpoint and a region are for s3:// blob stores only"
            ));
        }
        if !path.starts_with('/') {
            return Err(format!(
                "{url:?}: a file:// blob store needs an absolute directory, such as file:///var/lib/ripen/blobs"
            ));
        }
        return Ok(Arc::new(LocalDir::open(path)?));
    }
    if url.starts_with("s3://") {
        return open_s3(options);
    }
    Err(format!(
        "{url:?}: blob stores are file:///absolute/dir or s3://bucket[/prefix] URLs"
    ))
}

#[cfg(feature = "s3")]
fn open_s3(options: &Options) -> std::result::Result<Arc<dyn BlobStore>, String> {
    Ok(Arc::new(S3Store::open(options)?))
}

#[cfg(not(feature = "s3"))]
fn open_s3(options: &Options) -> std::result::Result<Arc<dyn BlobStore>, String> {
    Err(format!("{:?}: {NO_S3_SUPPORT}", options.url))
}

/// A key is a file name on every store: 1 to 128 of `[A-Za-z0-9_-]`.
pub fn check_key(key: &str) -> Result<()> {
    let ok = (1..=128).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(BlobError::BadKey(key.chars().take(200).collect()))
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_reference_reads_back_from_its_text() {
        let r = BlobRef::of("01a2375b-1b4a-7275-8d02-5642ca0aa7cc", b"{\"a\":1}");
        let text = r.to_string();
        assert!(text.starts_with("sha256:"), "{text}");
        assert_eq!(text.parse::<BlobRef>(), Ok(r));
        for bad in [
            "",
            "sha1:00:1:k",
            "sha256:zz:1:k",
            &format!("sha256:{}:01:k", "0".repeat(64)),
            &format!("sha256:{}::k", "0".repeat(64)),
            &format!("sha256:{}:1:", "0".repeat(64)),
            &format!("sha256:{}:1:../etc", "0".repeat(64)),
            &format!("sha256:{}:1", "0".repeat(64)),
        ] {
            assert!(bad.parse::<BlobRef>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn verify_refuses_other_bytes() {
        let r = BlobRef::of("k", b"payload");
        assert_eq!(
            r.verify(Bytes::from_static(b"payload")),
            Ok(Bytes::from_static(b"payload"))
        );
        let short = r.verify(Bytes::from_static(b"payloa")).unwrap_err();
        assert!(matches!(short, BlobError::Corrupt { .. }), "{short}");
        let flipped = r.verify(Bytes::from_static(b"paylaod")).unwrap_err();
        assert!(matches!(flipped, BlobError::Corrupt { .. }), "{flipped}");
        assert!(!flipped.is_transient());
    }

    fn url(url: &str) -> Options {
        Options {
            url: url.to_owned(),
            ..Options::default()
        }
    }

    #[test]
    fn urls_name_their_store() {
        assert!(open(&url("file://relative/dir")).is_err());
        assert!(open(&url("ftp://host/dir")).is_err());
        let dir = tempfile::tempdir().expect("temp dir");
        let file = url(&format!("file://{}", dir.path().display()));
        assert!(open(&file).is_ok(), "{file:?}");
        let with_region = Options {
            region: Some("eu-west-1".into()),
            ..file
        };
        let e = open(&with_region).unwrap_err();
        assert!(e.contains("s3:// blob stores only"), "{e}");
    }

    #[cfg(not(feature = "s3"))]
    #[test]
    fn without_the_feature_s3_urls_say_how_to_get_them() {
        assert!(!s3_supported());
        let e = open(&url("s3://bucket/prefix")).unwrap_err();
        assert!(e.contains(NO_S3_SUPPORT), "{e}");
    }

    #[cfg(feature = "s3")]
    #[test]
    fn with_the_feature_s3_urls_open_without_a_request() {
        assert!(s3_supported());
        // Nothing listens there: opening sends nothing, so it works.
        let options = Options {
            url: "s3://bucket/some/prefix".into(),
            endpoint: Some("http://127.0.0.1:9".into()),
            region: None,
        };
        assert!(open(&options).is_ok());
    }

    proptest! {
        #[test]
        fn any_reference_round_trips(key in "[A-Za-z0-9_-]{1,128}", bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let r = BlobRef::of(&key, &bytes);
            prop_assert_eq!(r.to_string().parse::<BlobRef>(), Ok(r.clone()));
            prop_assert!(r.verify(Bytes::from(bytes.clone())).is_ok());
        }

        #[test]
        fn no_text_panics_the_parser(text in ".{0,300}") {
            let _ = text.parse::<BlobRef>();
        }

        #[test]
        fn keys_never_leave_their_directory(key in ".{0,40}") {
            if check_key(&key).is_ok() {
                prop_assert!(!key.contains('/') && !key.contains('.') && !key.is_empty());
            }
        }
    }
}
