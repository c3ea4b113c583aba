//! Logs through the real binary, as JSON lines: one flat object per line, a
//! line per failed attempt and per status change with the fields operators
//! search by, and never a payload.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const SECRET: &str = "s3cr3t-card-4242-4242";

#[tokio::test]
async fn json_logs_name_the_entity_and_step_and_never_the_payload() {
    // This binary holds this one test, so the server it starts inherits
    // these variables and no other test sees them.
    std::env::set_var("RIPEN_LOG", "debug");
    std::env::set_var("RIPEN_LOG_FORMAT", "json");
    let ds = Downstream::start().await;
    ds.set(
        &step_path("pay", "charge"),
        Behavior::fail_first(503, 1, json!({"charged": true})),
    );
    ds.set(&step_path("pay", "receipt"), Behavior::always(400));
    let url = |s: &str| ds.url(&step_path("pay", s));
    let cfg = Config::new().with_type(TypeDef::new(
        "pay",
        vec![
            Step::http("charge", url("charge")),
            Step::http("receipt", url("receipt"))
                .needs(&["charge"])
                .non_critical(),
        ],
    ));
    let server = Server::start(&cfg).await;
    let id = server
        .submit_ok("pay", &json!({"card": SECRET, "amount": 12}))
        .await;
    let view = server.wait_settled(&id, Duration::from_secs(10)).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    assert_eq!(view["degraded"], true);

    let log = server.log();
    assert!(!log.contains(SECRET), "the payload reached the log:\n{log}");
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(!lines.is_empty(), "no JSON lines:\n{log}");
    for l in &lines {
        assert!(l.get("fields").is_none(), "fields are flat: {l}");
        assert!(l["timestamp"].is_string() && l["level"].is_string(), "{l}");
    }
    let of = |message: &str| -> Vec<&Value> {
        lines
            .iter()
            .filter(|l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
            .filter(|l| l["entity_id"] == id.as_str())
            .collect()
    };
    let trace_id = id.replace('-', "");
    let retried = of("attempt failed; the step's retry policy");
    assert_eq!(retried.len(), 1, "{lines:#?}");
    let r = retried[0];
    assert_eq!(r["level"], "INFO");
    assert_eq!(
        (r["type"].as_str(), r["step"].as_str()),
        (Some("pay"), Some("charge"))
    );
    assert_eq!(r["attempt"], 1);
    assert_eq!(r["trace_id"], trace_id.as_str());
    assert!(
        r["error"].as_str().is_some_and(|e| e.contains("503")),
        "{r}"
    );
    let fatal = of("attempt failed for good");
    assert_eq!(fatal.len(), 1, "{lines:#?}");
    assert_eq!(fatal[0]["level"], "WARN");
    assert_eq!(fatal[0]["step"], "receipt");
    let changes: Vec<(&str, &str)> = of("entity status changed")
        .iter()
        .map(|l| (l["from"].as_str().unwrap(), l["to"].as_str().unwrap()))
        .collect();
    assert_eq!(changes, [("pending", "ready")]);
    assert_eq!(of("entity degraded").len(), 1);
}
