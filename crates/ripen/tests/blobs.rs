//! Large payloads in a blob store, through the real binary: a payload past
//! `blobs.inline_max` is written to the blob directory before the 202 and
//! the database keeps its checksummed reference; every attempt and `/data`
//! read it back checked; a blob changed on disk fails its step for good and
//! is counted; a blob store that cannot take a payload refuses it with 503
//! and acknowledges nothing; the sweep deletes orphans and the blobs of
//! pruned payloads, and nothing else; a `kill -9` during a flood of large
//! submissions leaves every acknowledged entity with its blob. Runs on
//! SQLite, and on PostgreSQL with `RIPEN_TEST_STORAGE=postgres`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
/// Payloads above this many bytes go to the blob store in these tests.
const INLINE_MAX: usize = 4_096;

fn config(ds: &Downstream, extra: &str) -> Config {
    Config::new()
        .with_type(single("doc", ds))
        .with_type(single("held", ds).map_steps(|s| s.attempts(100).backoff("200ms", "200ms")))
        .extra(&format!(
            "[blobs]\ndir = \"blobs\"\ninline_max = {INLINE_MAX}\nbody_max = 16777216\n{extra}"
        ))
}

/// A payload of about `bytes` bytes, with its own marker.
fn large(bytes: usize, marker: &str) -> Value {
    let chunk = "0123456789abcdef".repeat(64);
    let n = bytes / chunk.len() + 1;
    json!({"marker": marker, "chunks": vec![chunk; n]})
}

/// Every blob file under the blob directory.
fn blob_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(shards) = std::fs::read_dir(dir) else {
        return out;
    };
    for shard in shards.flatten() {
        if let Ok(files) = std::fs::read_dir(shard.path()) {
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if f.path().is_file() && !name.starts_with('.') {
                    out.push(f.path());
                }
            }
        }
    }
    out.sort();
    out
}

fn blob_of(dir: &Path, id: &str) -> PathBuf {
    blob_files(dir)
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == id))
        .unwrap_or_else(|| panic!("no blob for {id} in {}", dir.display()))
}

fn backdate(path: &Path, by: Duration) {
    let f = std::fs::File::options()
        .write(true)
        .open(path)
        .expect("open blob");
    f.set_modified(SystemTime::now() - by).expect("set mtime");
}

async fn metric(api: &Api, name: &str) -> f64 {
    let text = api.get("/metrics").await.text();
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_round_trip_through_the_blob_store() {
    let ds = Downstream::start().await;
    ds.set(
        &step_path("doc", "only"),
        Behavior::ok(json!({"seen": true})),
    );
    let srv = Server::start(&config(&ds, "")).await;
    let blobs = srv.dir().join("blobs");

    // Three MiB: past the server's 1 MiB body limit, within blobs.body_max.
    let big = large(3 << 20, "big");
    let id = srv.submit_ok("doc", &big).await;
    assert_eq!(
        blob_files(&blobs).len(),
        1,
        "the blob is written before the 202"
    );
    let small = srv.submit_ok("doc", &json!({"marker": "small"})).await;
    assert_eq!(blob_files(&blobs).len(), 1, "a small payload stays inline");

    for id in [&id, &small] {
        let v = srv.wait_terminal(id, WAIT).await;
        assert_eq!(v["status"], "ready", "{v}");
    }
    // The step was called with the payload itself, whole.
    let calls = ds.calls_for(&step_path("doc", "only"), &id);
    let body = calls[0].body.as_ref().expect("a JSON body");
    assert_eq!(body["payload"], big);

    let r = srv.get(&format!("/v1/entities/{id}/data")).await;
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.json()["payload"], big);
    assert_eq!(r.json()["outputs"]["only"], json!({"seen": true}));

    // The database keeps a reference, not the payload.
    if std::env::var("RIPEN_TEST_STORAGE").as_deref() != Ok("postgres") {
        let db = std::fs::read(srv.dir().join("ripen.db")).unwrap_or_default();
        let needle = "0123456789abcdef".repeat(64);
        assert!(
            !db.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "the payload is in the database file"
        );
    }

    // Declared over the blob body limit: 413 before the body is read.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(srv.addr())
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/entities/doc HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        srv.addr(),
        (16 << 20) + 1
    );
    tcp.write_all(head.as_bytes()).await.expect("send the head");
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read the answer");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload-too-large"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_changed_on_disk_fails_its_step_for_good() {
    let ds = Downstream::start().await;
    ds.set(&step_path("held", "only"), Behavior::always(503));
    let srv = Server::start(&config(&ds, "")).await;
    let blobs = srv.dir().join("blobs");
    let id = srv.submit_ok("held", &large(20_000, "held")).await;
    srv.wait_until(&id, WAIT, "retrying", |v| {
        v["steps"][0]["attempts"].as_u64() >= Some(1)
    })
    .await;

    let path = blob_of(&blobs, &id);
    let mut bytes = std::fs::read(&path).expect("read blob");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&path, &bytes).expect("corrupt blob");
    ds.set(&step_path("held", "only"), Behavior::ok(json!({})));

    let v = srv.wait_terminal(&id, WAIT).await;
    assert_eq!(v["status"], "failed", "{v}");
    let error = v["steps"][0]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("does not match its checksum"), "{v}");
    assert!(
        metric(&srv, "ripen_blob_errors_total{kind=\"corrupt\"}").await >= 1.0,
        "counted"
    );
    assert!(srv.log().contains("a payload blob is lost"), "alerted");
    // A retry fails the same way: the downstream never sees a wrong payload.
    let calls = ds.calls_for(&step_path("held", "only"), &id);
    assert!(
        calls.iter().all(|c| c.status == 503),
        "{} calls",
        calls.len()
    );
    let r = srv.get(&format!("/v1/entities/{id}/data")).await;
    assert_eq!(r.status, 500, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_store_that_cannot_write_refuses_and_acknowledges_nothing() {
    let ds = Downstream::start().await;
    let mut srv = Server::start(&config(&ds, "")).await;
    let blobs = srv.dir().join("blobs");
    let before = srv.get("/v1/entities?type=doc").await.json();
    // The blob directory becomes a file: every write fails.
    srv.kill();
    std::fs::remove_dir_all(&blobs).expect("remove blob dir");
    srv.restart().await;
    std::fs::remove_dir_all(&blobs).ok();
    std::fs::write(&blobs, b"not a directory").expect("block the blob dir");

    let r = srv.submit("doc", &large(10_000, "refused"), None).await;
    let p = assert_problem(&r, 503);
    assert_eq!(
        p["type"]
            .as_str()
            .map(|t| t.ends_with("blob-store-unavailable")),
        Some(true),
        "{p}"
    );
    assert!(r.header("retry-after").is_some(), "{r}");
    // Small payloads do not need the blob store.
    let small = srv.submit_ok("doc", &json!({"marker": "small"})).await;
    let after = srv.get("/v1/entities?type=doc").await.json();
    let ids = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| e["id"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut new: Vec<String> = ids(&after)
        .into_iter()
        .filter(|i| !ids(&before).contains(i))
        .collect();
    new.sort();
    assert_eq!(new, vec![small], "only the small one was acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_removes_orphans_and_pruned_blobs_only() {
    let ds = Downstream::start().await;
    ds.set(&step_path("doc", "only"), Behavior::ok(json!({})));
    ds.set(&step_path("held", "only"), Behavior::always(503));
    let extra = "orphan_grace = \"1m\"\nsweep_interval = \"1s\"\n[retention]\npayload = \"1s\"\ninterval = \"200ms\"";
    let srv = Server::start(&config(&ds, extra)).await;
    let blobs = srv.dir().join("blobs");

    let pruned = srv.submit_ok("doc", &large(10_000, "pruned")).await;
    let live = srv.submit_ok("held", &large(10_000, "live")).await;
    assert_eq!(srv.wait_terminal(&pruned, WAIT).await["status"], "ready");
    srv.wait_until(&pruned, WAIT, "pruned", |v| {
        !v["payload_pruned_at"].is_null()
    })
    .await;
    // An orphan: a blob whose commit never happened, as after a crash.
    let orphan_id = "01a23800-0000-7000-8000-000000000001";
    let shard = blobs.join(&orphan_id[orphan_id.len() - 2..]);
    std::fs::create_dir_all(&shard).expect("shard");
    std::fs::write(shard.join(orphan_id), b"{\"orphan\":true}").expect("orphan");
    // A blob that is not an entity's: left alone.
    let foreign = shard.join("not-an-entity-id");
    std::fs::write(&foreign, b"x").expect("foreign");
    // A fresh orphan, within the grace: its commit may still be coming.
    let fresh_id = "01a23800-0000-7000-8000-000000000002";
    let fresh_shard = blobs.join(&fresh_id[fresh_id.len() - 2..]);
    std::fs::create_dir_all(&fresh_shard).expect("shard");
    std::fs::write(fresh_shard.join(fresh_id), b"{}").expect("fresh orphan");

    // Everything but the fresh one is past the grace.
    for p in blob_files(&blobs) {
        if !p.ends_with(fresh_id) {
            backdate(&p, Duration::from_secs(7_200));
        }
    }
    let deadline = std::time::Instant::now() + WAIT;
    let remaining = loop {
        let names: Vec<String> = blob_files(&blobs)
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        if !names.iter().any(|n| n == orphan_id || n == &pruned) {
            break names;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the sweep left {names:?}; log:\n{}",
            srv.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut remaining = remaining;
    remaining.sort();
    let mut want = vec![
        live.clone(),
        "not-an-entity-id".to_owned(),
        fresh_id.to_owned(),
    ];
    want.sort();
    assert_eq!(remaining, want);
    assert!(metric(&srv, "ripen_blobs_swept_total").await >= 2.0);
    // The live entity's next attempt still carries its payload.
    let path = step_path("held", "only");
    let seen = ds.calls_for(&path, &live).len();
    let deadline = std::time::Instant::now() + WAIT;
    while ds.calls_for(&path, &live).len() <= seen {
        assert!(
            std::time::Instant::now() < deadline,
            "no attempt after the sweep"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last = ds.calls_for(&path, &live).pop().expect("a call");
    assert_eq!(last.body.expect("JSON")["payload"]["marker"], "live");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_large_submissions_leaves_every_acknowledged_blob() {
    let ds = Downstream::start().await;
    ds.set(&step_path("doc", "only"), Behavior::ok(json!({})));
    let mut srv = Server::start(&config(&ds, "")).await;
    let api = srv.api().clone();
    let flood = tokio::spawn(async move {
        let mut acked = Vec::new();
        for i in 0..10_000 {
            match api
                .try_submit("doc", &large(50_000, &format!("n{i}")), None)
                .await
            {
                Ok(r) if r.status == 202 => {
                    acked.push((i, r.json()["id"].as_str().unwrap_or("").to_owned()))
                }
                _ => break,
            }
        }
        acked
    });
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    srv.kill();
    let acked = flood.await.expect("flood");
    assert!(acked.len() > 5, "only {} acknowledged", acked.len());
    srv.restart().await;
    for (i, id) in &acked {
        let v = srv.wait_terminal(id, WAIT).await;
        assert_eq!(v["status"], "ready", "{v}");
        let r = srv.get(&format!("/v1/entities/{id}/data")).await;
        assert_eq!(r.status, 200, "{r}");
        assert_eq!(r.json()["payload"]["marker"], format!("n{i}"));
    }
}
