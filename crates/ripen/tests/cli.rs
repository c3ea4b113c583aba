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

/// A merchant whose KYC asks for a retry a second later, so that `watch`
/// sees it waiting, and whose billing takes a moment.
fn retried_merchant(ds: &Downstream) -> TypeDef {
    ds.set(
        "/merchant/kyc",
        Behavior::retry_after(503, 1, 1, json!({"kyc": "passed"})),
    );
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

/// Runs `ripen ARGS` on a pseudo-terminal (util-linux `script`), so that
/// its standard output is a terminal; returns what the terminal got.
async fn run_on_a_terminal(args: Vec<String>, env: &[(&str, &str)]) -> CmdOutput {
    let line = std::iter::once(RIPEN.to_owned())
        .chain(args)
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ");
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .env_remove("RIPEN_SERVER")
            .env_remove("NO_COLOR")
            .env("COLUMNS", "120")
            .envs(env)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run script (util-linux)");
        CmdOutput {
            status: Some(out.status),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_draws_a_coloured_table_on_a_terminal_and_plain_lines_when_piped() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(retried_merchant(&ds))).await;
    let base = srv.base();

    // Piped: one plain line per change, with durations and the retry time.
    let id = srv.submit_ok("merchant", &json!({"name": "Piped"})).await;
    let out = run_ripen(
        args(&["watch", &id, "--interval-ms", "50", "--server", &base]),
        srv.dir().to_owned(),
        CLI_TIMEOUT,
    )
    .await;
    assert!(out.success(), "{out}");
    assert!(
        !out.stdout.contains('\x1b'),
        "no escapes when piped:\n{out}"
    );
    let retrying = out
        .stdout
        .lines()
        .find(|l| l.starts_with("kyc") && l.contains("retrying"))
        .unwrap_or_else(|| panic!("no line of kyc retrying:\n{out}"));
    assert!(
        retrying.contains("next retry 20") && retrying.contains("HTTP 503"),
        "{retrying}"
    );
    let done = out
        .stdout
        .lines()
        .find(|l| l.starts_with("billing") && l.contains("succeeded"))
        .unwrap_or_else(|| panic!("no line of billing succeeded:\n{out}"));
    assert!(done.contains(" after "), "{done}");
    assert_eq!(
        out.stdout.lines().last(),
        Some(format!("entity {id} is ready").as_str()),
        "{out}"
    );

    // On a terminal: a table redrawn in place, statuses in colour.
    let id = srv
        .submit_ok("merchant", &json!({"name": "Terminal"}))
        .await;
    let watch = args(&["watch", &id, "--interval-ms", "50", "--server", &base]);
    let out = run_on_a_terminal(watch.clone(), &[]).await;
    assert!(out.status.is_some_and(|s| s.success()), "{out}");
    let screen = out.stdout;
    for want in [
        "duration",
        "next retry",
        "\x1b[32msucceeded",
        "\x1b[33mretrying",
        "\x1b[J",
    ] {
        assert!(
            screen.contains(want),
            "the terminal did not get {want:?}:\n{screen:?}"
        );
    }
    assert!(
        screen.contains("in "),
        "the retry is counted down:\n{screen:?}"
    );
    assert!(
        screen.contains(&format!("entity {id} is ready")),
        "{screen:?}"
    );

    // NO_COLOR keeps the table and drops the colours.
    let id = srv.submit_ok("merchant", &json!({"name": "Plain"})).await;
    let out = run_on_a_terminal(
        args(&["watch", &id, "--interval-ms", "50", "--server", &base]),
        &[("NO_COLOR", "1")],
    )
    .await;
    assert!(out.status.is_some_and(|s| s.success()), "{out}");
    assert!(
        out.stdout.contains("\x1b[J") && !out.stdout.contains("\x1b[32m"),
        "{:?}",
        out.stdout
    );
}

/// Every command that talks to a server sends the API key, from
/// `--api-key` or `RIPEN_API_KEY`, as a bearer token. The "server" here is a
/// recording fake that answers each path with a canned view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_sends_the_api_key_as_a_bearer_token() {
    let fake = Downstream::start().await;
    let id = "01a233a6-ee20-72be-b1c2-82b64fb86873";
    let view = json!({
        "id": id, "type": "merchant", "version": 1, "status": "ready", "degraded": false,
        "created_at": "2026-12-01T22:08:27.680670Z", "updated_at": "2026-12-01T22:08:28.740639Z",
        "ready_at": "2026-12-01T22:08:28.740639Z",
        "steps": [{"name": "kyc", "status": "succeeded", "critical": true, "attempts": 1, "last_error": null}],
    });
    fake.set(
        "/v1/entities/merchant",
        Behavior::script(vec![], Reply::json(202, &view)),
    );
    fake.set(&format!("/v1/entities/{id}"), Behavior::ok(view.clone()));
    fake.set(
        &format!("/v1/entities/{id}/events"),
        Behavior::ok(json!([])),
    );
    fake.set(
        "/v1/entities",
        Behavior::ok(json!({"items": [view], "next": null})),
    );
    fake.set("/v1/subscriptions", Behavior::ok(json!({"items": []})));
    for verb in ["retry", "cancel"] {
        fake.set(
            &format!("/v1/entities/{id}/{verb}"),
            Behavior::script(vec![], Reply::json(202, &view)),
        );
    }
    let dir = TempDir::new("ripen-cli-key-").expect("a temporary directory");
    std::fs::write(dir.path().join("m.json"), r#"{"name": "Acme"}"#).unwrap();
    let server = fake.base();
    let commands: Vec<Vec<&str>> = vec![
        vec!["submit", "merchant", "m.json", "--watch"],
        vec!["status", id],
        vec!["watch", id],
        vec!["entities", "list"],
        vec!["entities", "get", id],
        vec!["entities", "events", id],
        vec!["entities", "retry", id],
        vec!["entities", "cancel", id],
        vec!["subscriptions", "list"],
    ];
    let run = |command: Vec<&str>, flag: Option<&str>, env: Option<&str>| {
        let mut a = args(&command);
        a.extend(args(&["--server", &server]));
        if let Some(key) = flag {
            a.extend(args(&["--api-key", key]));
        }
        let env = env.map(str::to_owned);
        let dir = dir.path().to_owned();
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(RIPEN);
            cmd.args(&a).current_dir(dir).env_remove("RIPEN_SERVER");
            match env {
                Some(key) => cmd.env("RIPEN_API_KEY", key),
                None => cmd.env_remove("RIPEN_API_KEY"),
            };
            let out = cmd.output().expect("run ripen");
            assert!(
                out.status.success(),
                "{a:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        })
    };
    let authorizations = |from: usize| -> Vec<Option<String>> {
        fake.calls()[from..]
            .iter()
            .map(|c| c.header("authorization").map(str::to_owned))
            .collect()
    };
    for (flag, env, want) in [
        (Some("k-flag"), None, Some("Bearer k-flag")),
        (None, Some("k-env"), Some("Bearer k-env")),
        (Some("k-flag"), Some("k-env"), Some("Bearer k-flag")),
        (None, None, None),
    ] {
        for command in &commands {
            let before = fake.calls().len();
            run(command.clone(), flag, env).await.expect("join");
            let got = authorizations(before);
            assert!(!got.is_empty(), "{command:?} made no call");
            assert!(
                got.iter().all(|a| a.as_deref() == want),
                "{command:?} with flag {flag:?} and env {env:?}: {got:?}"
            );
        }
    }
}

/// A user's error is one line and exit status 1, whatever `RUST_BACKTRACE`
/// says: a port nothing listens on, an unknown type, a missing file, an
/// unknown entity, a key that cannot be sent; and output cut off by a closed
/// pipe ends quietly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_errors_are_one_line_and_exit_1_even_with_rust_backtrace() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(merchant(&ds, Behavior::ok(json!({}))))).await;
    for i in 0..40 {
        srv.submit_ok("merchant", &json!({"n": i})).await;
    }
    let dir = srv.dir().to_owned();
    std::fs::write(dir.join("good.json"), r#"{"n": 1}"#).unwrap();
    let base = srv.base();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let unknown = "0193c5b2-0000-7000-8000-000000000000";
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["watch", unknown, "--server", &closed],
            "connection refused",
        ),
        (
            vec!["entities", "get", unknown, "--server", &closed],
            "connection refused",
        ),
        (
            vec!["submit", "merchant", "good.json", "--server", &closed],
            "connection refused",
        ),
        (
            vec!["submit", "nope", "good.json", "--server", &base],
            "no entity type named \"nope\"",
        ),
        (
            vec!["submit", "merchant", "missing.json", "--server", &base],
            "cannot read missing.json",
        ),
        (
            vec!["watch", unknown, "--server", &base],
            "no entity with id",
        ),
        (
            vec!["entities", "retry", unknown, "--server", &base],
            "no entity with id",
        ),
        (
            vec!["status", unknown, "--server", &base, "--api-key", "a\u{1}b"],
            "the API key",
        ),
    ];
    for backtrace in ["1", "full"] {
        for (a, want) in &cases {
            let out = std::process::Command::new(RIPEN)
                .args(a)
                .current_dir(&dir)
                .env("RUST_BACKTRACE", backtrace)
                .env("RUST_LIB_BACKTRACE", "1")
                .env_remove("RIPEN_SERVER")
                .env_remove("RIPEN_API_KEY")
                .output()
                .expect("run ripen");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{a:?}: {stderr}");
            assert!(
                stderr.starts_with("error: ") && stderr.contains(want),
                "{a:?}: {stderr}"
            );
            assert_eq!(stderr.lines().count(), 1, "{a:?}: one line: {stderr}");
            assert!(
                !stderr.to_lowercase().contains("backtrace"),
                "{a:?}: {stderr}"
            );
        }
        // Whoever reads the list stops at once.
        let mut child = std::process::Command::new(RIPEN)
            .args(["entities", "list", "--limit", "40", "--server", &base])
            .env("RUST_BACKTRACE", backtrace)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run ripen");
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait for ripen");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked") && !stderr.to_lowercase().contains("backtrace"),
            "a closed pipe: {stderr}"
        );
        assert!(
            out.status.code().is_some_and(|c| c <= 1),
            "{:?}: {stderr}",
            out.status
        );
    }
}
