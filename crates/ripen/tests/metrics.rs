//! `/metrics` through the real binary: exact counts after a known run (N
//! entities, M injected failures), the gauges, and Debian's
//! `promtool check metrics` on a live scrape.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;

const N: usize = 6;
/// Failed answers the downstream gives each entity before it succeeds.
const FAILS_EACH: usize = 3;
/// Failures injected in all.
const M: usize = N * FAILS_EACH;

/// The value of the sample `name{labels}` in a text exposition, if any.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .find_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            if metric != name {
                return None;
            }
            let body = rest.strip_suffix('}')?;
            let mut got: Vec<(String, String)> = body
                .split("\",")
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    Some((k.to_owned(), v.trim_matches('"').to_owned()))
                })
                .collect();
            got.sort();
            let mut want: Vec<(String, String)> = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            want.sort();
            (got == want).then(|| value.parse().ok()).flatten()
        })
}

fn promtool() -> Command {
    let found = Command::new("promtool").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "promtool is missing: install Debian's prometheus package (scripts/test does)"
    );
    Command::new("promtool")
}

#[tokio::test]
async fn a_known_run_gives_exact_counts_and_a_scrape_promtool_accepts() {
    let ds = Downstream::start().await;
    ds.set(
        &step_path("m", "a"),
        Behavior::fail_first(503, FAILS_EACH, json!({"ok": true})),
    );
    let cfg = Config::new()
        .with_type(TypeDef::new(
            "m",
            vec![Step::http("a", ds.url(&step_path("m", "a"))).attempts(5)],
        ))
        .with_type(TypeDef::new("w", vec![Step::worker("bill", "billing")]));
    let server = Server::start(&cfg).await;
    let mut ids = Vec::new();
    for i in 0..N {
        ids.push(server.submit_ok("m", &json!({"i": i})).await);
    }
    for id in &ids {
        let view = server.wait_terminal(id, Duration::from_secs(20)).await;
        assert_eq!(view["status"], "ready", "{view:#}");
    }
    let waiting = server.submit_ok("w", &json!({})).await;
    let malformed = server.post_bytes("/v1/entities/m", b"{".to_vec()).await;
    assert_eq!(malformed.status, 400);
    let unknown = server.submit("nope", &json!({}), None).await;
    assert_eq!(unknown.status, 404);

    let r = server.get("/metrics").await;
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = r.text();
    let count = |name: &str, labels: &[(&str, &str)]| sample(&text, name, labels).unwrap_or(0.0);
    let attempts = |outcome| {
        count(
            "ripen_step_attempts_total",
            &[("type", "m"), ("step", "a"), ("outcome", outcome)],
        )
    };
    assert_eq!(attempts("succeeded"), N as f64, "{text}");
    assert_eq!(attempts("retryable_error"), M as f64);
    assert_eq!(attempts("permanent_error"), 0.0);
    assert_eq!(
        count(
            "ripen_retries_scheduled_total",
            &[("type", "m"), ("step", "a")]
        ),
        M as f64
    );
    assert_eq!(
        count(
            "ripen_step_attempt_duration_seconds_count",
            &[("type", "m"), ("step", "a"), ("outcome", "succeeded")]
        ),
        N as f64
    );
    assert_eq!(
        count(
            "ripen_intake_requests_total",
            &[("type", "m"), ("outcome", "created")]
        ),
        N as f64
    );
    assert_eq!(
        count(
            "ripen_intake_requests_total",
            &[("type", "m"), ("outcome", "malformed")]
        ),
        1.0
    );
    assert_eq!(
        count(
            "ripen_intake_requests_total",
            &[("type", "unknown"), ("outcome", "unknown_type")]
        ),
        1.0,
        "an unknown type never becomes a label"
    );
    assert!(!text.contains("nope"), "{text}");
    assert_eq!(
        count("ripen_submit_to_ready_seconds_count", &[("type", "m")]),
        N as f64
    );
    assert_eq!(
        count(
            "ripen_entity_status_changes_total",
            &[("type", "m"), ("status", "ready")]
        ),
        N as f64
    );
    assert_eq!(
        count("ripen_entities", &[("type", "m"), ("status", "ready")]),
        N as f64
    );
    assert_eq!(
        count("ripen_entities", &[("type", "w"), ("status", "pending")]),
        1.0
    );
    assert_eq!(
        count("ripen_queue_due_entities", &[("queue", "worker:billing")]),
        1.0,
        "the worker step waits for a worker"
    );
    assert_eq!(count("ripen_stale_completions_total", &[]), 0.0);
    assert_eq!(
        count(
            "ripen_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert!(
        count("ripen_store_commit_seconds_count", &[]) >= 1.0,
        "commits are timed"
    );
    assert!(
        count(
            "ripen_store_call_duration_seconds_count",
            &[("call", "create")]
        ) >= N as f64
    );
    for id in ids.iter().chain([&waiting]) {
        assert!(!text.contains(id.as_str()), "no entity id is a label");
    }

    let mut check = promtool()
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = check.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `ripen_…` family names `text` mentions, histogram series folded
/// into their family.
fn families_in(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("ripen_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(family.to_owned());
        i = end;
    }
    names
}

/// The families docs/observability.md documents, from its table.
fn documented() -> std::collections::BTreeSet<String> {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/observability.md"
    ))
    .expect("read docs/observability.md");
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `ripen_"))
        .filter_map(|l| l.split('`').next())
        .map(|n| format!("ripen_{n}"))
        .collect()
}

/// The alert rules pass `promtool check rules`, and they, the Grafana
/// dashboard and every family a live node serves are all documented.
#[tokio::test]
async fn alerts_dashboard_and_docs_agree_with_what_is_served() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let rules = format!("{root}/deploy/prometheus/alerts.yml");
    let out = promtool()
        .args(["check", "rules", &rules])
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let documented = documented();
    assert!(documented.len() >= 15, "{documented:?}");

    let dashboard = std::fs::read_to_string(format!("{root}/deploy/grafana/ripen.json"))
        .expect("read the dashboard");
    let parsed: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let exprs: Vec<&str> = parsed["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().expect("targets").iter())
        .map(|t| t["expr"].as_str().expect("expr"))
        .collect();
    assert!(exprs.len() >= 10);
    let rules_text = std::fs::read_to_string(&rules).expect("read the rules");
    for (what, text) in [("alerts.yml", rules_text), ("ripen.json", exprs.join("\n"))] {
        for family in families_in(&text) {
            assert!(
                documented.contains(&family),
                "{what} reads {family}, which docs/observability.md does not list"
            );
        }
    }

    let ds = Downstream::start().await;
    let cfg = Config::new().with_type(single("s", &ds));
    let server = Server::start(&cfg).await;
    let id = server.submit_ok("s", &json!({})).await;
    server.wait_terminal(&id, Duration::from_secs(10)).await;
    let served = server.get("/metrics").await.text();
    let served: Vec<String> = served
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect();
    assert!(served.len() >= 10, "{served:?}");
    for family in served {
        assert!(
            documented.contains(&family),
            "the node serves {family}, which docs/observability.md does not list"
        );
    }
}
