//! The S3 blob store against a real S3-compatible server: moto's
//! `moto_server`, from the virtual environment that `scripts/test` makes
//! (`RIPEN_TEST_PYTHON`'s directory), or else from `PATH`; the testkit's
//! `MotoServer` runs it.
#![cfg(feature = "s3")]

use std::sync::{Arc, Once};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectStoreExt as _, PutPayload};
use ripen_blobs::{BlobError, BlobRef, BlobStore, Options};
use ripen_testkit::{MotoServer, MOTO_KEY_ID, MOTO_SECRET};

const BUCKET: &str = "bucket";
const PREFIX: &str = "ripen/blobs";
/// moto takes any credentials; the store reads them from the environment.
const KEY_ID: &str = MOTO_KEY_ID;
const SECRET: &str = MOTO_SECRET;

/// Sets the credentials once, before any test opens a store.
fn credentials() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", KEY_ID);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET);
        std::env::remove_var("AWS_SESSION_TOKEN");
    });
}

/// A `moto_server` of this test's own (the testkit's), with the bucket
/// made; killed on drop.
struct Moto(MotoServer);

impl Moto {
    fn start() -> Moto {
        credentials();
        Moto(MotoServer::start(BUCKET))
    }

    fn endpoint(&self) -> String {
        self.0.endpoint()
    }

    fn stop(&mut self) {
        self.0.stop();
    }

    /// Starts the server again, empty, with the bucket made.
    fn restart(&mut self) {
        self.0.start_again();
    }

    /// The store under test, opened as ripen opens it.
    fn store(&self) -> Arc<dyn BlobStore> {
        ripen_blobs::open(&Options {
            url: format!("s3://{BUCKET}/{PREFIX}"),
            endpoint: Some(self.endpoint()),
            region: None,
        })
        .expect("open the S3 store")
    }

    /// A plain object_store client of the bucket, to change objects behind
    /// the store's back.
    fn raw(&self) -> AmazonS3 {
        let _ = rustls::crypto::ring::default_provider().install_default();
        AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_bucket_name(BUCKET)
            .with_region("us-east-1")
            .with_access_key_id(KEY_ID)
            .with_secret_access_key(SECRET)
            .build()
            .expect("a raw S3 client")
    }
}

async fn raw_put(moto: &Moto, object: &str, bytes: &'static [u8]) {
    moto.raw()
        .put(&Path::from(object), PutPayload::from_static(bytes))
        .await
        .expect("a raw put");
}

#[tokio::test]
async fn blobs_read_back_whole() {
    let moto = Moto::start();
    let store = moto.store();

    let small = Bytes::from_static(b"{\"a\":1}");
    let blob = store.put("small", small.clone()).await.expect("put");
    assert_eq!(blob, BlobRef::of("small", &small));
    assert_eq!(store.get(&blob).await.expect("get"), small);

    let big: Bytes = (0..5 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect::<Vec<_>>()
        .into();
    let blob = store
        .put("01a2375b-1b4a-7275-8d02-5642ca0aa7cc", big.clone())
        .await
        .expect("put 5 MiB");
    assert_eq!(blob.len, 5 * 1024 * 1024);
    assert_eq!(store.get(&blob).await.expect("get 5 MiB"), big);

    // A put replaces; the empty blob is a blob.
    let empty = store.put("small", Bytes::new()).await.expect("put");
    assert_eq!(store.get(&empty).await.expect("get"), Bytes::new());

    for bad in ["", "../x", "a/b", "a.b", &"x".repeat(129)] {
        let e = store.put(bad, Bytes::new()).await.unwrap_err();
        assert!(matches!(e, BlobError::BadKey(_)), "{bad:?}: {e}");
    }
}

#[tokio::test]
async fn a_changed_object_is_corrupt() {
    let moto = Moto::start();
    let store = moto.store();
    let blob = store
        .put("k1", Bytes::from_static(b"payload"))
        .await
        .expect("put");

    // Same length, other bytes: the checksum tells.
    raw_put(&moto, &format!("{PREFIX}/k1"), b"paylaod").await;
    let e = store.get(&blob).await.unwrap_err();
    assert!(matches!(e, BlobError::Corrupt { .. }), "{e}");
    assert!(!e.is_transient());

    // Another length: the length tells.
    raw_put(&moto, &format!("{PREFIX}/k1"), b"pay").await;
    let e = store.get(&blob).await.unwrap_err();
    assert!(matches!(e, BlobError::Corrupt { .. }), "{e}");
}

#[tokio::test]
async fn missing_blobs_are_missing_and_deletes_are_idempotent() {
    let moto = Moto::start();
    let store = moto.store();

    let never = BlobRef::of("never-written", b"x");
    let e = store.get(&never).await.unwrap_err();
    assert_eq!(
        e,
        BlobError::Missing {
            key: "never-written".into()
        }
    );
    assert!(!e.is_transient());
    store
        .delete("never-written")
        .await
        .expect("delete a missing blob");

    let blob = store
        .put("k2", Bytes::from_static(b"two"))
        .await
        .expect("put");
    store.delete("k2").await.expect("delete");
    let e = store.get(&blob).await.unwrap_err();
    assert_eq!(e, BlobError::Missing { key: "k2".into() });
    store.delete("k2").await.expect("delete again");
    assert!(matches!(
        store.delete("a/b").await,
        Err(BlobError::BadKey(_))
    ));

    // A bucket that is not there is a store that is not set up: no blob
    // in it is lost for good.
    let nowhere = ripen_blobs::open(&Options {
        url: "s3://no-such-bucket/x".into(),
        endpoint: Some(moto.endpoint()),
        region: None,
    })
    .expect("open");
    let e = nowhere.get(&never).await.unwrap_err();
    assert!(matches!(e, BlobError::Unavailable(_)), "{e}");
    assert!(e.to_string().contains("NoSuchBucket"), "{e}");
    let e = nowhere.delete("never-written").await.unwrap_err();
    assert!(matches!(e, BlobError::Unavailable(_)), "{e}");
    let e = nowhere.put("k", Bytes::new()).await.unwrap_err();
    assert!(matches!(e, BlobError::Unavailable(_)), "{e}");
}

#[tokio::test]
async fn the_sweep_lists_only_older_blobs_under_the_prefix() {
    let moto = Moto::start();
    let store = moto.store();
    for key in ["old-1", "old-2", "old-3"] {
        store.put(key, Bytes::from_static(b"o")).await.expect("put");
    }
    // Objects that are no blobs of this store: deeper, beside, or with a
    // name no key has.
    raw_put(&moto, &format!("{PREFIX}/sub/old-4"), b"o").await;
    raw_put(&moto, "ripen/other/old-5", b"o").await;
    raw_put(&moto, "old-6", b"o").await;
    raw_put(&moto, &format!("{PREFIX}/not.a.key"), b"o").await;

    // S3 keeps times to the second: leave more than one on each side.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    store
        .put("new-1", Bytes::from_static(b"n"))
        .await
        .expect("put");

    let mut old = store.older_than(before, 10).await.expect("sweep");
    old.sort();
    assert_eq!(old, ["old-1", "old-2", "old-3"]);
    let two = store.older_than(before, 2).await.expect("sweep");
    assert_eq!(two.len(), 2, "{two:?}");
    assert!(store.older_than(before, 0).await.expect("sweep").is_empty());
    let long_ago = SystemTime::now() - Duration::from_secs(3600);
    assert!(store
        .older_than(long_ago, 10)
        .await
        .expect("sweep")
        .is_empty());
    let later = SystemTime::now() + Duration::from_secs(5);
    assert_eq!(store.older_than(later, 10).await.expect("sweep").len(), 4);
}

#[tokio::test]
async fn an_outage_is_unavailable_soon_and_passes() {
    let mut moto = Moto::start();
    let store = moto.store();
    let blob = store
        .put("k3", Bytes::from_static(b"three"))
        .await
        .expect("put");

    moto.stop();
    let started = Instant::now();
    let e = store
        .put("k4", Bytes::from_static(b"four"))
        .await
        .unwrap_err();
    assert!(matches!(e, BlobError::Unavailable(_)), "{e}");
    assert!(e.is_transient());
    let e = store.get(&blob).await.unwrap_err();
    assert!(matches!(e, BlobError::Unavailable(_)), "{e}");
    let e = store.delete("k3").await.unwrap_err();
    assert!(matches!(e, BlobError::Unavailable(_)), "{e}");
    let e = store.older_than(SystemTime::now(), 10).await.unwrap_err();
    assert!(matches!(e, BlobError::Unavailable(_)), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "an outage took {:?} to show",
        started.elapsed()
    );

    // Back (and empty: moto keeps nothing): the same store works again.
    moto.restart();
    let blob = store
        .put("k4", Bytes::from_static(b"four"))
        .await
        .expect("put after the outage");
    assert_eq!(
        store.get(&blob).await.expect("get"),
        Bytes::from_static(b"four")
    );
}
