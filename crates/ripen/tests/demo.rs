//! `ripen demo` through the real binary: it shows every outcome a user
//! should see (ready, degraded, failed) and says where to click. (That a
//! refused merchant gets through when retried is the downstream rule's
//! unit test in ripen-testkit.)

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shows_failures_and_a_failed_merchant_can_be_retried() {
    let dir = TempDir::new("ripen-demo-").expect("temp dir");
    let data = dir.path().join("data");
    let out = run_ripen(
        vec![
            "demo".into(),
            "--port".into(),
            "0".into(),
            "--count".into(),
            "120".into(),
            "--interval-ms".into(),
            "5".into(),
            "--data-dir".into(),
            data.display().to_string(),
        ],
        dir.path().to_owned(),
        Duration::from_secs(120),
    )
    .await;
    assert!(out.success(), "the demo failed:\n{out}");
    assert!(out.stdout.contains("set the status filter"), "{out}");
    assert!(out.stdout.contains("then Retry"), "{out}");
    let settled: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| {
            l.starts_with("  ready") || l.starts_with("  degraded") || l.starts_with("  failed")
        })
        .collect();
    assert!(settled.len() >= 120, "{out}");
    let count = |status: &str| {
        settled
            .iter()
            .filter(|l| l.trim_start().starts_with(status))
            .count()
    };
    // With 120 merchants, 1 in 20 refused and 1 in 10 bounced, none of
    // each would be a 1-in-400 and a 1-in-300,000 chance.
    assert!(count("failed") >= 1, "no failed merchant:\n{out}");
    assert!(count("degraded") >= 1, "no degraded merchant:\n{out}");
    assert!(count("ready") >= 60, "{out}");
    assert!(
        settled
            .iter()
            .filter(|l| l.trim_start().starts_with("failed"))
            .all(|l| l.contains("kyc")),
        "a failed merchant names its failed step:\n{out}"
    );
}
