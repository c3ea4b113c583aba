//! Graceful shutdown through the real binary: SIGTERM stops claiming, lets
//! running attempts finish within `engine.shutdown_grace`, records their
//! results, and exits; attempts still running after the grace are abandoned
//! and run again after the next start.

mod common;

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// How long the slow step takes downstream.
const STEP_MS: u64 = 1_500;

/// Starts a server whose `[engine]` table also sets `shutdown_grace`. The
/// harness does not know the key, so the rendered file gets it and the
/// server starts again on it.
async fn start_with_grace(cfg: &Config, grace: &str) -> Server {
    let mut server = Server::start(cfg).await;
    let path = server.dir().join("ripen.toml");
    let toml = std::fs::read_to_string(&path).expect("read ripen.toml");
    assert!(
        toml.contains("\n[engine]\n"),
        "the rendered configuration has no [engine] table:\n{toml}"
    );
    let toml = toml.replacen(
        "\n[engine]\n",
        &format!("\n[engine]\nshutdown_grace = \"{grace}\"\n"),
        1,
    );
    std::fs::write(&path, toml).expect("write ripen.toml");
    server.restart().await;
    server
}

/// Waits for the server process to exit; panics after `limit`.
async fn wait_exit(server: &mut Server, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = server.exited() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not exit within {limit:?} of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_calls(ds: &Downstream, path: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while ds.calls_to(path).len() < n {
        assert!(
            Instant::now() < deadline,
            "the downstream saw {} of {n} calls to {path}",
            ds.calls_to(path).len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `a` is slow; `b` needs it, so it is what `a`'s recorded result unlocks.
fn slow_pipeline(ds: &Downstream) -> TypeDef {
    TypeDef::new(
        "slow",
        vec![
            Step::http("a", ds.url("/slow/a")).timeout("10s"),
            Step::http("b", ds.url("/slow/b")).needs(&["a"]),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_running_attempts_and_records_their_results() {
    let ds = Downstream::start().await;
    ds.set(
        "/slow/a",
        Behavior::sleep(Duration::from_millis(STEP_MS), json!({"a": true})),
    );
    let cfg = Config::new().with_type(slow_pipeline(&ds));
    let grace = Duration::from_secs(10);
    let mut server = start_with_grace(&cfg, "10s").await;

    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(server.submit_ok("slow", &json!({"i": i})).await);
    }
    wait_calls(&ds, "/slow/a", ids.len()).await;

    let signalled = Instant::now();
    server.sigterm();
    // While it drains, the node still answers reads but tells balancers it
    // is going away.
    let mut saw_draining = false;
    while server.exited().is_none() && signalled.elapsed() < Duration::from_millis(STEP_MS) {
        match server
            .api()
            .try_request(hyper::Method::GET, "/readyz", &[], None)
            .await
        {
            Ok(r) if r.status == 503 => {
                assert_problem(&r, 503);
                let path = format!("/v1/entities/{}", ids[0]);
                let read = server
                    .api()
                    .try_request(hyper::Method::GET, &path, &[], None)
                    .await;
                let view = match read {
                    Ok(r) => r.json(),
                    Err(e) => panic!(
                        "a read while draining failed: {e:#}\nexited: {:?}\nserver log:\n{}",
                        server.exited(),
                        server.log_tail(60)
                    ),
                };
                assert_eq!(view["status"], "pending", "{view}");
                saw_draining = true;
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(_) => break,
        }
    }
    assert!(saw_draining, "/readyz never answered 503 while draining");

    let status = wait_exit(&mut server, grace).await;
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status}");
    let calls = ds.calls_to("/slow/a");
    assert_eq!(calls.len(), ids.len(), "one call per entity: {calls:?}");
    assert!(
        calls.iter().all(Call::succeeded),
        "every running attempt got its answer before the process exited: {calls:?}"
    );
    assert!(took < grace, "took {took:?}");
    let log = server.log();
    assert!(log.contains("finished=3"), "log:\n{log}");

    server.restart().await;
    for id in &ids {
        let view = server.wait_terminal(id, Duration::from_secs(20)).await;
        assert_eq!(view["status"], "ready", "{view:#}");
        assert_eq!(step(&view, "a")["attempts"], 1, "{view:#}");
        assert_eq!(ds.calls_for("/slow/a", id).len(), 1, "a ran once for {id}");
        assert_eq!(ds.calls_for("/slow/b", id).len(), 1, "b ran once for {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_still_running_after_the_grace_run_again_after_restart() {
    let ds = Downstream::start().await;
    // Each entity's first call is slower than the grace; the retry is quick.
    ds.set(
        "/slow/a",
        Behavior::sleep_first(1, Duration::from_millis(STEP_MS), json!({"a": true})),
    );
    let cfg = Config::new().with_type(slow_pipeline(&ds));
    let mut server = start_with_grace(&cfg, "200ms").await;

    let mut ids = Vec::new();
    for i in 0..2 {
        ids.push(server.submit_ok("slow", &json!({"i": i})).await);
    }
    wait_calls(&ds, "/slow/a", ids.len()).await;

    let signalled = Instant::now();
    server.sigterm();
    let status = wait_exit(&mut server, Duration::from_secs(5)).await;
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(
        took >= Duration::from_millis(200),
        "exited after {took:?}, before the grace ended"
    );
    // Well before the step would have answered: the node did not wait for it.
    assert!(
        took < Duration::from_millis(STEP_MS - 300),
        "exited after {took:?}"
    );
    let log = server.log();
    assert!(log.contains("abandoned=2"), "log:\n{log}");

    server.restart().await;
    for id in &ids {
        let view = server.wait_terminal(id, Duration::from_secs(20)).await;
        assert_eq!(view["status"], "ready", "{view:#}");
        assert_eq!(step(&view, "a")["attempts"], 2, "{view:#}");
        let calls = ds.calls_for("/slow/a", id);
        assert_eq!(calls.len(), 2, "the cut attempt ran again: {calls:?}");
        assert_eq!(ds.calls_for("/slow/b", id).len(), 1);
    }
}
