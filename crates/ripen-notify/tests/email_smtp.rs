//! Sending mail to a real SMTP server (aiosmtpd, started per test): what
//! arrives, each TLS mode, authentication, and which failures are worth
//! another attempt.

mod support;

use std::time::{Duration, Instant};

use ripen_notify::email::{compose, EmailConfig, Mail, MailError, Mailer, Notice};
use serde_json::{json, Value};
use support::{Certs, SinkOptions, SinkTls, SmtpSink};

fn config(smtp: &str, extra: &str) -> EmailConfig {
    let timeout = if extra.contains("timeout =") {
        ""
    } else {
        "timeout = \"5s\"\n"
    };
    let text = format!(
        "smtp = {smtp:?}\nfrom = \"Ripen <ripen@example.com>\"\nto_field = \"contact_email\"\n\
         {timeout}{extra}"
    );
    toml::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn mail(cfg: &EmailConfig, to: &str) -> Mail {
    let payload =
        json!({"contact_email": to, "name": "Acme <b>&</b>", "iban": "DE89370400440532013000"});
    compose(
        cfg,
        &Notice {
            entity_id: "0193c5b2-7a1e-7c3d-9f00-1234567890ab",
            type_name: "merchant<&>",
            version: 3,
            status: "failed",
            at: "2025-01-02T03:04:05.123456Z",
            detail: Some("step kyc: 422 \"<refused>\"\n.\n..a line that starts with dots"),
            payload: &payload,
        },
    )
    .unwrap()
}

async fn send(cfg: &EmailConfig, to: &str) -> Result<(), MailError> {
    let mailer = Mailer::new(cfg).unwrap();
    mailer.send(&mail(cfg, to)).await
}

fn only(sink: &SmtpSink) -> Value {
    let got = sink.received();
    assert_eq!(
        got.len(),
        1,
        "one message, got {got:?}; log:\n{}",
        sink.log()
    );
    got.into_iter().next().unwrap()
}

fn lf(s: &str) -> String {
    s.replace("\r\n", "\n")
}

#[tokio::test]
async fn a_plain_relay_gets_the_mail_with_both_parts() {
    let sink = SmtpSink::start(SinkTls::Plain, SinkOptions::default());
    let cfg = config(
        &format!("smtp://127.0.0.1:{}", sink.port),
        "tls = \"none\"\nlink_base = \"https://ripen.example.com\"\non = [\"failed\"]",
    );
    let mail = mail(&cfg, "ops@example.org");
    Mailer::new(&cfg).unwrap().send(&mail).await.unwrap();

    let got = only(&sink);
    assert_eq!(got["mail_from"], "ripen@example.com");
    assert_eq!(got["rcpt_tos"], json!(["ops@example.org"]));
    assert_eq!(got["tls"], false);
    assert_eq!(got["defects"], json!([]), "{got}");
    assert_eq!(got["from"], "Ripen <ripen@example.com>");
    assert_eq!(got["to"], "ops@example.org");
    assert_eq!(
        got["subject"],
        "merchant<&> 0193c5b2-7a1e-7c3d-9f00-1234567890ab is failed"
    );
    assert_eq!(got["message_id"], mail.message_id());
    assert_eq!(got["content_type"], "multipart/alternative");

    // What the server's own MIME parser reads is what was composed, dot
    // lines and all.
    let text = &lf(got["parts"]["text/plain"].as_str().unwrap());
    let html = &lf(got["parts"]["text/html"].as_str().unwrap());
    assert_eq!(text, mail.text());
    assert_eq!(html, mail.html());
    assert!(
        text.contains("\n.\n..a line that starts with dots"),
        "{text}"
    );
    assert!(text.contains("Type:    merchant<&> (version 3)"), "{text}");
    assert!(text.contains("step kyc: 422 \"<refused>\""), "{text}");
    let link = "https://ripen.example.com/#/entities/0193c5b2-7a1e-7c3d-9f00-1234567890ab";
    assert!(text.contains(link), "{text}");
    assert!(html.contains("merchant&lt;&amp;&gt;"), "{html}");
    assert!(html.contains("422 &quot;&lt;refused&gt;&quot;"), "{html}");
    assert!(!html.contains("<refused>"), "{html}");
    assert!(html.contains(&format!("<a href=\"{link}\">")), "{html}");
    // Nothing of the payload but the recipient.
    let data = got["data"].as_str().unwrap();
    for secret in ["Acme", "DE89370400440532013000"] {
        assert!(!data.contains(secret) && !text.contains(secret) && !html.contains(secret));
    }
}

#[tokio::test]
async fn starttls_with_a_ca_file_and_a_password() {
    let certs = Certs::new();
    let sink = SmtpSink::start(
        SinkTls::Starttls(&certs),
        SinkOptions {
            auth: Some(("ripen".into(), "s3cret pass".into())),
            ..Default::default()
        },
    );
    std::env::set_var("RIPEN_TEST_SMTP_PASSWORD_STARTTLS", "s3cret pass");
    let cfg = config(
        &format!("smtp://localhost:{}", sink.port),
        &format!(
            "ca_file = {:?}\nusername = \"ripen\"\npassword_env = \"RIPEN_TEST_SMTP_PASSWORD_STARTTLS\"\nhello_name = \"ripen.example.com\"",
            certs.ca
        ),
    );
    send(&cfg, "ops@example.org").await.unwrap();
    let got = only(&sink);
    assert_eq!(got["tls"], true);
    assert_eq!(got["auth_user"], "ripen");
    assert_eq!(got["rcpt_tos"], json!(["ops@example.org"]));
}

#[tokio::test]
async fn a_wrong_password_is_not_retried() {
    let certs = Certs::new();
    let sink = SmtpSink::start(
        SinkTls::Starttls(&certs),
        SinkOptions {
            auth: Some(("ripen".into(), "right".into())),
            ..Default::default()
        },
    );
    std::env::set_var("RIPEN_TEST_SMTP_PASSWORD_WRONG", "wrong");
    let cfg = config(
        &format!("smtp://localhost:{}", sink.port),
        &format!(
            "ca_file = {:?}\nusername = \"ripen\"\npassword_env = \"RIPEN_TEST_SMTP_PASSWORD_WRONG\"",
            certs.ca
        ),
    );
    let e = send(&cfg, "ops@example.org").await.unwrap_err();
    assert!(!e.retryable, "{e:?}");
    assert!(e.message.contains("535"), "{e:?}");
    assert!(sink.received().is_empty());
}

#[tokio::test]
async fn an_untrusted_certificate_is_not_retried() {
    let certs = Certs::new();
    let sink = SmtpSink::start(SinkTls::Starttls(&certs), SinkOptions::default());
    // No ca_file: the system's roots do not know the test CA.
    let cfg = config(&format!("smtp://localhost:{}", sink.port), "");
    let e = send(&cfg, "ops@example.org").await.unwrap_err();
    assert!(!e.retryable, "{e:?}");
    assert!(e.message.contains("TLS with smtp://localhost:"), "{e:?}");
    assert!(e.message.contains("notify.email.ca_file"), "{e:?}");
    assert!(sink.received().is_empty());
}

#[tokio::test]
async fn starttls_is_required_unless_tls_is_none() {
    let sink = SmtpSink::start(SinkTls::Plain, SinkOptions::default());
    let cfg = config(&format!("smtp://127.0.0.1:{}", sink.port), "");
    let e = send(&cfg, "ops@example.org").await.unwrap_err();
    assert!(!e.retryable, "{e:?}");
    assert!(e.message.contains("STARTTLS"), "{e:?}");
    assert!(sink.received().is_empty());
}

#[tokio::test]
async fn implicit_tls() {
    let certs = Certs::new();
    let sink = SmtpSink::start(SinkTls::Smtps(&certs), SinkOptions::default());
    let cfg = config(
        &format!("smtps://localhost:{}", sink.port),
        &format!("ca_file = {:?}", certs.ca),
    );
    send(&cfg, "ops@example.org").await.unwrap();
    let got = only(&sink);
    assert_eq!(got["tls"], true);
    assert_eq!(got["rcpt_tos"], json!(["ops@example.org"]));
}

#[tokio::test]
async fn a_550_to_rcpt_is_not_retried() {
    let sink = SmtpSink::start(
        SinkTls::Plain,
        SinkOptions {
            rcpt_reply: Some("550 5.1.1 no such user here".into()),
            ..Default::default()
        },
    );
    let cfg = config(&format!("smtp://127.0.0.1:{}", sink.port), "tls = \"none\"");
    let e = send(&cfg, "nobody@example.org").await.unwrap_err();
    assert!(!e.retryable, "{e:?}");
    assert!(e.message.contains("refused the mail: 550"), "{e:?}");
    assert!(e.message.contains("no such user here"), "{e:?}");
    assert!(sink.received().is_empty());
}

#[tokio::test]
async fn a_451_is_retried() {
    for opts in [
        SinkOptions {
            rcpt_reply: Some("451 4.3.0 mailbox busy, try later".into()),
            ..Default::default()
        },
        SinkOptions {
            data_reply: Some("452 4.3.1 insufficient storage".into()),
            ..Default::default()
        },
    ] {
        let sink = SmtpSink::start(SinkTls::Plain, opts);
        let cfg = config(&format!("smtp://127.0.0.1:{}", sink.port), "tls = \"none\"");
        let e = send(&cfg, "ops@example.org").await.unwrap_err();
        assert!(e.retryable, "{e:?}");
        assert!(e.message.contains("deferred the mail: 45"), "{e:?}");
        assert!(sink.received().is_empty());
    }
}

#[tokio::test]
async fn a_server_that_is_down_is_retried() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let cfg = config(&format!("smtp://127.0.0.1:{port}"), "tls = \"none\"");
    let e = send(&cfg, "ops@example.org").await.unwrap_err();
    assert!(e.retryable, "{e:?}");
    assert!(
        e.message
            .contains(&format!("cannot talk to smtp://127.0.0.1:{port}")),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_silent_server_is_cut_off_at_the_timeout_and_retried() {
    // Accepts connections and never greets.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = std::thread::spawn(move || listener.accept().map(|(stream, _)| stream));
    let cfg = config(
        &format!("smtp://127.0.0.1:{port}"),
        "tls = \"none\"\ntimeout = \"400ms\"",
    );
    let start = Instant::now();
    let e = send(&cfg, "ops@example.org").await.unwrap_err();
    let took = start.elapsed();
    assert!(e.retryable, "{e:?}");
    assert!(e.message.contains("within 400ms"), "{e:?}");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    held.join().unwrap().unwrap();
}

#[test]
fn a_missing_password_variable_is_a_config_error() {
    let cfg = config(
        "smtp://127.0.0.1:2525",
        "username = \"ripen\"\npassword_env = \"RIPEN_TEST_SMTP_PASSWORD_UNSET\"",
    );
    let e = Mailer::new(&cfg).unwrap_err();
    assert_eq!(
        e,
        "notify.email.password_env: the environment variable RIPEN_TEST_SMTP_PASSWORD_UNSET is \
         not set; set it to the SMTP password of \"ripen\""
    );
}

#[test]
fn a_mailer_can_be_shared_by_tasks() {
    fn shareable<T: Send + Sync>() {}
    fn sendable<T: Send>(_: &T) {}
    shareable::<Mailer>();
    shareable::<Mail>();
    let cfg = config("smtp://127.0.0.1:2525", "tls = \"none\"");
    let mailer = Mailer::new(&cfg).unwrap();
    let mail = mail(&cfg, "ops@example.org");
    sendable(&mailer.send(&mail));
}
