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

/// `ripen entities list|get|events|retry|cancel`, as tables and as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entities_commands_list_get_events_retry_and_cancel() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(merchant(&ds, Behavior::always(400)))).await;
    let failed = srv.submit_ok("merchant", &json!({"n": 1})).await;
    let view = srv.wait_terminal(&failed, Duration::from_secs(20)).await;
    assert_eq!(view["status"], "failed");
    // The address without its scheme works too.
    let addr = srv.base().trim_start_matches("http://").to_owned();
    let ripen = |list: &[&str]| {
        let mut a = args(&["entities"]);
        a.extend(args(list));
        a.extend(args(&["--server", &addr]));
        run_ripen(a, srv.dir().to_owned(), CLI_TIMEOUT)
    };

    let out = ripen(&["list"]).await;
    assert!(out.success(), "{out}");
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with(&failed))
        .unwrap_or_else(|| panic!("the entity is not listed:\n{out}"));
    assert!(
        line.contains("merchant") && line.contains("failed") && line.contains("0/2"),
        "{line}"
    );
    let out = ripen(&["list", "--status", "ready", "--output", "json"]).await;
    assert!(out.success(), "{out}");
    let page: Value = serde_json::from_str(&out.stdout).expect("list JSON");
    assert_eq!(page["items"], json!([]), "{out}");
    let out = ripen(&["list", "--status", "done"]).await;
    assert!(!out.success());
    assert!(
        out.stderr.contains("pending, ready, failed or cancelled"),
        "{out}"
    );

    let out = ripen(&["get", &failed]).await;
    assert!(out.success(), "{out}");
    assert!(
        out.stdout.contains("failed") && out.stdout.contains("kyc"),
        "{out}"
    );
    assert!(
        out.stdout.contains("HTTP 400"),
        "the step's error is shown:\n{out}"
    );

    let out = ripen(&["events", &failed, "-o", "json"]).await;
    assert!(out.success(), "{out}");
    let events: Value = serde_json::from_str(&out.stdout).expect("events JSON");
    assert_eq!(events[0]["kind"], "created");
    let out = ripen(&["events", &failed]).await;
    assert!(out.stdout.contains("step_failed"), "{out}");

    // Cancel is refused for a failed entity, with the server's reason.
    let out = ripen(&["cancel", &failed]).await;
    assert!(!out.success());
    assert!(
        out.stderr
            .contains("only a pending entity can be cancelled"),
        "{out}"
    );
    assert!(!out.stderr.contains("backtrace"), "{out}");

    ds.set("/merchant/kyc", Behavior::ok(json!({})));
    let out = ripen(&["retry", &failed, "-o", "json"]).await;
    assert!(out.success(), "{out}");
    let retried: Value = serde_json::from_str(&out.stdout).expect("view JSON");
    assert_eq!(retried["status"], "pending");
    let view = srv.wait_terminal(&failed, Duration::from_secs(20)).await;
    assert_eq!(view["status"], "ready");

    let unknown = ripen(&["get", "0193c5b2-0000-7000-8000-000000000000"]).await;
    assert!(!unknown.success());
    assert!(unknown.stderr.contains("no entity with id"), "{unknown}");
}

/// Errors a user can act on: no server, no such type, no such file, a
/// file that is not JSON; one line each, never a backtrace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_friendly() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(merchant(&ds, Behavior::ok(json!({}))))).await;
    let dir = srv.dir().to_owned();
    let good = dir.join("good.json");
    std::fs::write(&good, r#"{"n": 1}"#).unwrap();
    let bad = dir.join("bad.json");
    std::fs::write(&bad, "name = acme").unwrap();
    let (good, bad) = (good.display().to_string(), bad.display().to_string());
    let base = srv.base();
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let nowhere = format!("127.0.0.1:{closed}");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            args(&["entities", "list", "--server", &nowhere]),
            "cannot reach the server at http://127.0.0.1:",
        ),
        (
            args(&["status", "x", "--server", &nowhere]),
            "connection refused (is `ripen serve` running?)",
        ),
        (
            args(&["submit", "nope", &good, "--server", &base]),
            "no entity type named \"nope\"; the types are merchant",
        ),
        (
            args(&["submit", "merchant", "missing.json", "--server", &base]),
            "cannot read missing.json",
        ),
        (
            args(&["submit", "merchant", &bad, "--server", &base]),
            "Malformed JSON (400)",
        ),
    ];
    for (a, want) in cases {
        let out = std::process::Command::new(RIPEN)
            .args(&a)
            .current_dir(&dir)
            .env("RUST_BACKTRACE", "1")
            .env_remove("RIPEN_SERVER")
            .output()
            .expect("run ripen");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{a:?} succeeded");
        assert!(stderr.contains(want), "{a:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{a:?}: {stderr}");
        assert!(
            !stderr.contains("Stack backtrace") && !stderr.contains("stack backtrace"),
            "{a:?}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{a:?}: one line: {stderr}");
    }
}
