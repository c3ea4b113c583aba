use super::*;

fn parse(text: &str) -> Result<BlobsConfig, (String, String)> {
    let raw: RawBlobs = toml::from_str(text).expect("toml");
    raw.parse(Path::new("/etc/ripen"))
}

#[test]
fn the_config_names_one_store_and_sane_bounds() {
    let c = parse("dir = \"blobs\"").expect("dir");
    assert_eq!(c.url, "file:///etc/ripen/blobs");
    assert_eq!(c.inline_max, DEFAULT_INLINE_MAX);
    assert_eq!(c.body_max, DEFAULT_BODY_MAX);
    assert_eq!(c.orphan_grace_ms, DEFAULT_ORPHAN_GRACE_MS);
    let s3 = parse("url = \"s3://bucket/ripen\"\nendpoint = \"http://127.0.0.1:9000\"");
    if ripen_blobs::s3_supported() {
        let c = s3.expect("s3");
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
    } else {
        let (k, problem) = s3.expect_err("a build without S3");
        assert_eq!(k, "blobs.url");
        assert!(problem.contains("--features s3"), "{problem}");
    }
    for (text, key) in [
        ("", "blobs"),
        ("dir = \"a\"\nurl = \"s3://b\"", "blobs"),
        ("url = \"http://x\"", "blobs.url"),
        ("dir = \"a\"\nendpoint = \"http://x\"", "blobs.endpoint"),
        (
            "dir = \"a\"\ninline_max = 100\nbody_max = 100",
            "blobs.inline_max",
        ),
        ("dir = \"a\"\nbody_max = 0", "blobs.body_max"),
        ("dir = \"a\"\norphan_grace = \"5s\"", "blobs.orphan_grace"),
        (
            "dir = \"a\"\nsweep_interval = \"10ms\"",
            "blobs.sweep_interval",
        ),
        (
            "dir = \"a\"\nsweep_interval = \"soon\"",
            "blobs.sweep_interval",
        ),
    ] {
        let (k, problem) = parse(text).expect_err(text);
        assert_eq!(k, key, "{text}: {problem}");
    }
    assert!(
        toml::from_str::<RawBlobs>("dri = \"a\"").is_err(),
        "unknown keys"
    );
}

fn local(inline_max: usize) -> (tempfile::TempDir, Payloads) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn BlobStore> =
        Arc::new(ripen_blobs::LocalDir::open(dir.path()).expect("open"));
    let payloads = Payloads::with_store(store, inline_max, Some(&Registry::new())).expect("new");
    (dir, payloads)
}

#[tokio::test]
async fn small_payloads_stay_inline_and_large_ones_read_back_checked() {
    let (dir, payloads) = local(16);
    let id = EntityId::new_v7();
    let small = payloads
        .keep(id, Bytes::from_static(b"{\"a\":1}"))
        .await
        .expect("keep");
    assert_eq!(small, "{\"a\":1}");
    assert_eq!(payloads.read(id, &small).await.expect("read"), small);

    let body = format!("{{\"text\":\"{}\"}}", "x".repeat(100));
    let stored = payloads
        .keep(id, Bytes::from(body.clone()))
        .await
        .expect("keep");
    assert!(is_blob(&stored), "{stored}");
    assert!(stored.ends_with(&id.to_string()), "{stored}");
    assert_eq!(payloads.read(id, &stored).await.expect("read"), body);

    // One byte changed on disk: the read says so, and no retry mends it.
    let path = ripen_blobs::LocalDir::open(dir.path())
        .expect("open")
        .path_of(&id.to_string());
    let mut bytes = std::fs::read(&path).expect("blob file");
    bytes[12] = b'y';
    std::fs::write(&path, bytes).expect("corrupt");
    let e = payloads.read(id, &stored).await.expect_err("corrupt");
    assert!(
        matches!(e, PayloadReadError::Lost(BlobError::Corrupt { .. })),
        "{e}"
    );
    assert!(!e.is_transient());

    std::fs::remove_file(&path).expect("remove");
    let e = payloads.read(id, &stored).await.expect_err("missing");
    assert!(
        matches!(e, PayloadReadError::Lost(BlobError::Missing { .. })),
        "{e}"
    );
}

#[tokio::test]
async fn a_node_without_blobs_cannot_read_a_blob_but_may_later() {
    let (_dir, with) = local(0);
    let id = EntityId::new_v7();
    let stored = with
        .keep(id, Bytes::from_static(b"{}"))
        .await
        .expect("keep");
    let e = Payloads::inline()
        .read(id, &stored)
        .await
        .expect_err("no store");
    assert!(e.is_transient(), "{e}");
}

#[tokio::test]
async fn an_attempt_carries_the_json_not_the_reference() {
    let (_dir, payloads) = local(4);
    let id = EntityId::new_v7();
    let stored = payloads
        .keep(id, Bytes::from_static(b"{\"big\":true}"))
        .await
        .expect("keep");
    let attempt = Attempt {
        entity_id: id,
        type_name: "t".into(),
        version: 1,
        step: 0,
        step_name: "a".into(),
        attempt: 1,
        epoch: 1,
        lease_expires_at_us: 0,
        payload: stored,
        outputs: Vec::new(),
    };
    let read = payloads.attempt(&attempt).await.expect("read");
    assert_eq!(read.payload, "{\"big\":true}");
    assert_eq!(read.step_name, "a");
    let inline = Attempt {
        payload: "{}".into(),
        ..attempt
    };
    assert!(matches!(
        payloads.attempt(&inline).await.expect("inline"),
        Cow::Borrowed(_)
    ));
}
