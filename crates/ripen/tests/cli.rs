//! End-to-end tests of `ripen submit`, `ripen status` and `ripen watch`
//! against a running server.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// The JSON object a command printed: the whole output, or one line of it,
/// or the text from the first `{` to the last `}`.
fn printed_json(stdout: &str) -> Option<Value> {
    if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(stdout.trim()) {
        return Some(v);
    }
    for line in stdout.lines() {
        if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(line.trim()) {
            return Some(v);
        }
    }
    let start = stdout.find('{')?;
    let end = stdout.rfind('}')?;
    serde_json::from_str(&stdout[start..=end]).ok()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Two steps with names a human would look for in the output.
fn merchant(ds: &Downstream, kyc: Behavior) -> TypeDef {
    ds.set("/merchant/kyc", kyc);
    ds.set(
        "/merchant/billing",
        Behavior::sleep(Duration::from_millis(300), json!({"billing": "ok"})),
    );
    TypeDef::new(
        "merchant",
        vec![
            Step::http("kyc", ds.url("/merchant/kyc")),
            Step::http("billing", ds.url("/merchant/billing")).needs(&["kyc"]),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_prints_the_entity_and_status_shows_it() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(merchant(&ds, Behavior::ok(json!({}))))).await;
    let file = srv.dir().join("merchant.json");
    std::fs::write(&file, r#"{"name": "Acme", "country": "NL"}"#).unwrap();
    let file = file.display().to_string();
    let base = srv.base();

    let out = run_ripen(
        args(&["submit", "merchant", &file, "--server", &base]),
        srv.dir().to_owned(),
        CLI_TIMEOUT,
    )
    .await;
    assert!(out.success(), "ripen submit failed:\n{out}");
    let view =
        printed_json(&out.stdout).unwrap_or_else(|| panic!("submit printed no JSON:\n{out}"));
    let id = view["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in the printed entity:\n{out}"))
        .to_owned();
    assert_eq!(view["type"], "merchant", "{out}");
    // The server has it.
    let got = srv.entity(&id).await;
    assert_eq!(got["id"], id.as_str());
    srv.wait_terminal(&id, Duration::from_secs(20)).await;
    let data = srv.get(&format!("/v1/entities/{id}/data")).await;
    assert_eq!(data.status, 200, "{data}");
    assert_eq!(
        data.json()["payload"],
        json!({"name": "Acme", "country": "NL"})
    );

    let out = run_ripen(
        args(&["status", &id, "--server", &base]),
        srv.dir().to_owned(),
        CLI_TIMEOUT,
    )
    .await;
    assert!(out.success(), "ripen status failed:\n{out}");
    let view =
        printed_json(&out.stdout).unwrap_or_else(|| panic!("status printed no JSON:\n{out}"));
    assert_eq!(view["id"], id.as_str(), "{out}");
    assert_eq!(view["status"], "ready", "{out}");

    // The idempotency key makes a second submission safe.
    let with_key = |srv_base: String| {
        run_ripen(
            args(&[
                "submit",
                "merchant",
                &file,
                "--key",
                "cli-key-1",
                "--server",
                &srv_base,
            ]),
            srv.dir().to_owned(),
            CLI_TIMEOUT,
        )
    };
    let first = with_key(base.clone()).await;
    assert!(first.success(), "{first}");
    let second = with_key(base.clone()).await;
    assert!(second.success(), "{second}");
    let id1 = printed_json(&first.stdout).unwrap()["id"].clone();
    let id2 = printed_json(&second.stdout).unwrap()["id"].clone();
    assert!(id1.is_string(), "{first}");
    assert_eq!(id1, id2, "same key, same entity:\n{first}\n{second}");
    assert_ne!(id1, json!(id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_reads_standard_input_and_reports_errors() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(merchant(&ds, Behavior::ok(json!({}))))).await;
    let base = srv.base();

    // "-" reads the payload from standard input.
    let out = run_ripen_with_stdin(
        args(&["submit", "merchant", "-", "--server", &base]),
        srv.dir().to_owned(),
        CLI_TIMEOUT,
        Some(br#"{"name": "From stdin"}"#.to_vec()),
    )
    .await;
    assert!(out.success(), "ripen submit - failed:\n{out}");
    let view =
        printed_json(&out.stdout).unwrap_or_else(|| panic!("submit printed no JSON:\n{out}"));
    let id = view["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id:\n{out}"))
        .to_owned();
    srv.wait_terminal(&id, Duration::from_secs(20)).await;
    let data = srv.get(&format!("/v1/entities/{id}/data")).await;
    assert_eq!(data.status, 200, "{data}");
    assert_eq!(data.json()["payload"], json!({"name": "From stdin"}));

    // An unknown type is an error, with a non-zero exit.
    let file = srv.dir().join("p.json");
    std::fs::write(&file, r#"{"name": "x"}"#).unwrap();
    let out = run_ripen(
        args(&[
            "submit",
            "no_such_type",
            &file.display().to_string(),
            "--server",
            &base,
        ]),
        srv.dir().to_owned(),
        CLI_TIMEOUT,
    )
    .await;
    assert!(
        out.status.is_some() && !out.success(),
        "submit of an unknown type must fail:\n{out}"
    );

    // A status of an unknown id fails too.
    let unknown = uuid::Uuid::now_v7().to_string();
    let out = run_ripen(
        args(&["status", &unknown, "--server", &base]),
        srv.dir().to_owned(),
        CLI_TIMEOUT,
    )
    .await;
    assert!(
        out.status.is_some() && !out.success(),
        "status of an unknown id must fail:\n{out}"
    );
    let out = run_ripen(
        args(&["watch", &unknown, "--server", &base]),
        srv.dir().to_owned(),
        CLI_TIMEOUT,
    )
    .await;
    assert!(
        out.status.is_some() && !out.success(),
        "watch of an unknown id must fail:\n{out}"
    );

    // No server at all: a clear failure, not a hang.
    let out = run_ripen(
        args(&["status", &unknown, "--server", "http://127.0.0.1:1"]),
        srv.dir().to_owned(),
        CLI_TIMEOUT,
    )
    .await;
    assert!(out.status.is_some() && !out.success(), "{out}");
    assert!(
        !out.stderr.trim().is_empty(),
        "an error message on stderr:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_an_entity_until_ready() {
    let ds = Downstream::start().await;
    let kyc = Behavior::sleep(Duration::from_millis(300), json!({"kyc": "passed"}));
    let srv = Server::start(&Config::new().with_type(merchant(&ds, kyc))).await;
    let id = srv.submit_ok("merchant", &json!({"name": "Acme"})).await;

    let out = run_ripen(
        args(&["watch", &id, "--interval-ms", "50", "--server", &srv.base()]),
        srv.dir().to_owned(),
        CLI_TIMEOUT,
    )
    .await;
    assert!(out.status.is_some(), "watch did not end:\n{out}");
    assert!(out.success(), "watch of a ready entity must exit 0:\n{out}");
    // It ended because the entity is ready, not before.
    assert_eq!(srv.entity(&id).await["status"], "ready");
    let text = format!("{}{}", out.stdout, out.stderr);
    for word in ["kyc", "billing", "ready"] {
        assert!(
            text.contains(word),
            "watch output does not mention {word}:\n{out}"
        );
    }
    assert!(
        text.contains("succeeded") || text.contains("running"),
        "watch output shows no step progress:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_of_a_failing_entity_exits_non_zero() {
    let ds = Downstream::start().await;
    let kyc = Behavior::script(vec![], Reply::error(400).delay(Duration::from_millis(300)));
    let srv = Server::start(&Config::new().with_type(merchant(&ds, kyc))).await;
    let id = srv
        .submit_ok("merchant", &json!({"name": "Rejected"}))
        .await;

    let out = run_ripen(
        args(&["watch", &id, "--interval-ms", "50", "--server", &srv.base()]),
        srv.dir().to_owned(),
        CLI_TIMEOUT,
    )
    .await;
    assert!(out.status.is_some(), "watch did not end:\n{out}");
    assert!(
        !out.success(),
        "watch of a failed entity must exit non-zero:\n{out}"
    );
    assert_eq!(srv.entity(&id).await["status"], "failed");
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        text.contains("failed"),
        "watch output does not say failed:\n{out}"
    );
    assert!(
        text.contains("kyc"),
        "watch output does not name the failed step:\n{out}"
    );
}
