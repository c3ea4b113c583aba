//! Email notifications through the real binary, to a real SMTP server
//! (aiosmtpd, started by the test): a mail when an entity settles, with the
//! right recipient, subject and entity link, and an SMTP outage retried until
//! the server is back.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SINK: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../ripen-notify/tests/support/smtp_sink.py"
);

/// A Python 3 with aiosmtpd: the one on `PATH`, or Debian's.
fn python() -> String {
    for candidate in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(candidate)
            .args(["-c", "import aiosmtpd"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return candidate.to_owned();
        }
    }
    panic!(
        "no Python 3 with aiosmtpd: the email tests send to a private SMTP server on it; \
         run scripts/test, which installs python3-aiosmtpd"
    );
}

/// The SMTP server, stopped when dropped (it ends when its stdin closes).
struct Sink {
    child: Child,
    out: PathBuf,
}

impl Sink {
    fn start(out: &Path, port: u16) -> Sink {
        std::fs::create_dir_all(out).expect("mail dir");
        let mut child = Command::new(python())
            .arg(SINK)
            .arg("--out")
            .arg(out)
            .arg("--port")
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the SMTP sink");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the sink's banner");
        assert!(line.starts_with("ready "), "the SMTP sink said {line:?}");
        Sink {
            child,
            out: out.to_owned(),
        }
    }

    fn mails(&self) -> Vec<Value> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.out)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.retain(|p| p.extension().is_some_and(|e| e == "json"));
        files.sort();
        files
            .iter()
            .filter_map(|p| std::fs::read(p).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect()
    }

    async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let mails = self.mails();
            if mails.len() >= n {
                return mails;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} mails arrived",
                mails.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn config(ds: &Downstream, port: u16) -> Config {
    Config::new()
        .with_type(single("merchant", ds))
        .notify("initial_backoff = \"100ms\"")
        .notify("max_backoff = \"300ms\"")
        .extra(&format!(
            "[notify.email]\n\
             smtp = \"smtp://127.0.0.1:{port}\"\n\
             tls = \"none\"\n\
             from = \"ripen@example.com\"\n\
             to_field = \"contact_email\"\n\
             on = [\"ready\", \"failed\"]\n\
             link_base = \"https://ripen.example.com\"\n\
             timeout = \"2s\""
        ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_entity_sends_a_mail_with_its_link() {
    let ds = Downstream::start().await;
    let dir = TempDir::new("ripen-mail-").expect("temp dir");
    let port = free_port();
    let sink = Sink::start(&dir.path().join("mail"), port);
    let server = Server::start(&config(&ds, port)).await;
    let id = server
        .submit_ok(
            "merchant",
            &json!({"contact_email": "owner@shop.example", "name": "<b>Zoë</b>"}),
        )
        .await;
    server.wait_terminal(&id, Duration::from_secs(20)).await;
    let mails = sink.wait_for(1, Duration::from_secs(20)).await;
    let mail = &mails[0];
    assert_eq!(mail["rcpt_tos"], json!(["owner@shop.example"]));
    assert_eq!(mail["mail_from"], "ripen@example.com");
    let subject = mail["subject"].as_str().unwrap_or("");
    assert!(
        subject.contains(&id) && subject.contains("ready"),
        "{subject}"
    );
    let text = mail["parts"]["text/plain"].as_str().unwrap_or("");
    assert!(
        text.contains(&format!("https://ripen.example.com/#/entities/{id}")),
        "{text}"
    );
    let html = mail["parts"]["text/html"].as_str().unwrap_or("");
    assert!(html.contains(&id), "{html}");
    assert!(
        !html.contains("<b>Zoë</b>"),
        "the payload is not in the mail"
    );
    // Only the statuses asked for: no mail for `created`.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.mails().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_smtp_outage_is_retried_until_the_server_is_back() {
    let ds = Downstream::start().await;
    let dir = TempDir::new("ripen-mail-").expect("temp dir");
    let port = free_port();
    // No SMTP server yet.
    let server = Server::start(&config(&ds, port)).await;
    let id = server
        .submit_ok("merchant", &json!({"contact_email": "late@shop.example"}))
        .await;
    server.wait_terminal(&id, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let log = server.log();
    assert!(
        log.contains("notification delivery failed; it will be retried"),
        "the outage is logged: {}",
        server.log_tail(20)
    );
    let sink = Sink::start(&dir.path().join("mail"), port);
    let mails = sink.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(mails[0]["rcpt_tos"], json!(["late@shop.example"]));
    // A payload without a recipient is not retried forever: it goes dead
    // (logged), and the other mails still go.
    let orphan = server.submit_ok("merchant", &json!({})).await;
    let next = server
        .submit_ok("merchant", &json!({"contact_email": "next@shop.example"}))
        .await;
    server.wait_terminal(&orphan, Duration::from_secs(20)).await;
    server.wait_terminal(&next, Duration::from_secs(20)).await;
    let mails = sink.wait_for(2, Duration::from_secs(20)).await;
    assert_eq!(mails[1]["rcpt_tos"], json!(["next@shop.example"]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log().contains("notification delivery is dead") {
        assert!(Instant::now() < deadline, "{}", server.log_tail(20));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_email_table_refuses_to_start() {
    let (out, _dir) = serve_bad_config(
        "[server]\nlisten = \"127.0.0.1:0\"\n\
         [[types.t.steps]]\nname = \"a\"\nhttp = \"http://127.0.0.1:9/a\"\n\
         [notify.email]\nsmtp = \"smtp:/nope\"\nfrom = \"r@example.com\"\nto_field = \"e\"\n",
        &[],
    )
    .await;
    assert!(!out.success(), "{out}");
    assert!(
        out.stderr.contains("notify.email.smtp"),
        "names the key: {out}"
    );
}
