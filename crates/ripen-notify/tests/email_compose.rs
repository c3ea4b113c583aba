//! Composing mail: where the recipient comes from, what a mail holds, and
//! what untrusted values cannot do to it (break headers, inject HTML, leak
//! the payload).

use ripen_notify::email::{compose, ComposeError, EmailConfig, Mail, Notice};
use serde_json::{json, Value};

fn config(extra: &str) -> EmailConfig {
    let mut text = String::from(extra);
    for (key, line) in [
        ("smtp", "smtp = \"smtp://127.0.0.1:2525\""),
        ("from", "from = \"ripen@example.com\""),
        ("to_field", "to_field = \"contact_email\""),
    ] {
        if !extra.contains(&format!("{key} =")) {
            text.push('\n');
            text.push_str(line);
        }
    }
    let cfg: EmailConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
    cfg.validate().unwrap();
    cfg
}

const ID: &str = "0193c5b2-7a1e-7c3d-9f00-1234567890ab";

fn notice<'a>(payload: &'a Value) -> Notice<'a> {
    Notice {
        entity_id: ID,
        type_name: "merchant",
        version: 2,
        status: "ready",
        at: "2025-01-02T03:04:05.123456Z",
        detail: None,
        payload,
    }
}

fn compose_to(cfg: &EmailConfig, payload: Value) -> Result<Mail, ComposeError> {
    compose(cfg, &notice(&payload))
}

/// The header section of a formatted mail, unfolded: one (name, value)
/// per header.
fn headers(mail: &Mail) -> Vec<(String, String)> {
    let text = String::from_utf8(mail.formatted().to_vec()).expect("an ASCII message");
    let head = text.split("\r\n\r\n").next().unwrap();
    assert!(
        !head.replace("\r\n", "").contains(['\r', '\n']),
        "a bare CR or LF in the header section: {head:?}"
    );
    let mut out: Vec<(String, String)> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            out.last_mut().expect("a first header").1.push_str(line);
        } else {
            let (name, value) = line.split_once(':').expect("name: value");
            out.push((name.to_owned(), value.trim().to_owned()));
        }
    }
    out
}

fn header_names(mail: &Mail) -> Vec<String> {
    headers(mail).into_iter().map(|(n, _)| n).collect()
}

const NAMES: [&str; 8] = [
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "Auto-Submitted",
    "MIME-Version",
    "Content-Type",
];

#[test]
fn the_recipient_is_a_key_or_a_pointer() {
    let cases = [
        (
            "",
            json!({"contact_email": "a@example.com"}),
            "a@example.com",
        ),
        (
            "to_field = \"/contact/email\"",
            json!({"contact": {"email": "b@example.com"}}),
            "b@example.com",
        ),
        (
            "to_field = \"/contacts/1\"",
            json!({"contacts": ["x@example.com", "c@example.com"]}),
            "c@example.com",
        ),
        // Without a leading slash a field name is a key, slashes and all.
        (
            "to_field = \"contact/email\"",
            json!({"contact/email": "d@example.com", "contact": {"email": "no@example.com"}}),
            "d@example.com",
        ),
        (
            "to_field = \"/a~1b/c~0d\"",
            json!({"a/b": {"c~d": "e@example.com"}}),
            "e@example.com",
        ),
        // Surrounding blanks are forgiven.
        (
            "",
            json!({"contact_email": "  f@example.com\t"}),
            "f@example.com",
        ),
    ];
    for (extra, payload, want) in cases {
        let mail = compose_to(&config(extra), payload.clone()).unwrap();
        assert_eq!(mail.recipient(), want, "{extra} {payload}");
        let to: Vec<_> = headers(&mail)
            .into_iter()
            .filter(|(n, _)| n == "To")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(to, vec![want.to_owned()]);
    }
}

#[test]
fn a_missing_or_unusable_recipient_is_an_error() {
    let cfg = config("");
    let pointer = config("to_field = \"/contact/email\"");
    let no = |field: &str| ComposeError::NoRecipient {
        field: field.to_owned(),
    };
    let not_text = |found| ComposeError::RecipientNotText {
        field: "contact_email".to_owned(),
        found,
    };
    let cases = [
        (&cfg, json!({}), no("contact_email")),
        (&cfg, json!({"contact_email": null}), no("contact_email")),
        (&cfg, json!(["contact_email"]), no("contact_email")),
        (
            &cfg,
            json!({"Contact_Email": "a@example.com"}),
            no("contact_email"),
        ),
        (
            &pointer,
            json!({"contact": "a@example.com"}),
            no("/contact/email"),
        ),
        (&pointer, json!({"contact": {}}), no("/contact/email")),
        (&cfg, json!({"contact_email": 42}), not_text("a number")),
        (&cfg, json!({"contact_email": true}), not_text("a boolean")),
        (
            &cfg,
            json!({"contact_email": ["a@example.com"]}),
            not_text("an array"),
        ),
        (
            &cfg,
            json!({"contact_email": {"a": 1}}),
            not_text("an object"),
        ),
    ];
    for (cfg, payload, want) in cases {
        let e = compose_to(cfg, payload.clone()).unwrap_err();
        assert_eq!(e, want, "{payload}");
    }
    assert_eq!(
        compose_to(&cfg, json!({})).unwrap_err().to_string(),
        "the payload has no \"contact_email\" field (notify.email.to_field), so the mail has no \
         recipient"
    );
    assert_eq!(
        compose_to(&cfg, json!({"contact_email": 42}))
            .unwrap_err()
            .to_string(),
        "the payload's \"contact_email\" field (notify.email.to_field) is a number, not an email \
         address string"
    );
}

#[test]
fn an_invalid_address_is_an_error_that_shows_it_safely() {
    let cfg = config("");
    for bad in [
        "",
        "not-an-address",
        "a@",
        "@example.com",
        "a b@example.com",
        "Ops <ops@example.com>",
        "a@example.com, b@example.com",
        "a@example.com\r\nBcc: evil@example.net",
        "a@example.com\nBcc: evil@example.net",
        "a@exa\u{0}mple.com",
        &format!("{}@example.com", "a".repeat(300)),
    ] {
        let e = compose_to(&cfg, json!({ "contact_email": bad })).unwrap_err();
        assert!(
            matches!(&e, ComposeError::BadRecipient { field, .. } if field == "contact_email"),
            "{bad:?}: {e:?}"
        );
        let message = e.to_string();
        assert!(
            message.starts_with("the payload's \"contact_email\" field (notify.email.to_field), "),
            "{message}"
        );
        assert!(message.contains("is not an email address: "), "{message}");
        assert!(!message.contains(['\r', '\n', '\0']), "{message:?}");
        assert!(message.len() < 300, "{message}");
    }
}

#[test]
fn a_mail_has_both_parts_and_every_value() {
    let cfg = config("link_base = \"https://ripen.example.com/ui/\"");
    let payload = json!({"contact_email": "ops@example.com"});
    let mut n = notice(&payload);
    n.status = "failed";
    n.detail = Some("step kyc failed for good: 422 Unprocessable Entity");
    let mail = compose(&cfg, &n).unwrap();
    assert_eq!(mail.subject(), format!("merchant {ID} is failed"));
    let link = format!("https://ripen.example.com/ui/#/entities/{ID}");
    for part in [mail.text(), mail.html()] {
        for value in [
            ID,
            "merchant",
            "version 2",
            "failed",
            "2025-01-02T03:04:05.123456Z",
            "step kyc failed for good: 422 Unprocessable Entity",
            &link,
        ] {
            assert!(part.contains(value), "{value:?} missing from {part}");
        }
    }
    assert!(mail.html().contains(&format!("<a href=\"{link}\">")));
    let formatted = String::from_utf8(mail.formatted().to_vec()).unwrap();
    assert!(
        formatted.contains("Content-Type: multipart/alternative;"),
        "{formatted}"
    );
    assert!(
        formatted.contains("Content-Type: text/plain; charset=utf-8"),
        "{formatted}"
    );
    assert!(
        formatted.contains("Content-Type: text/html; charset=utf-8"),
        "{formatted}"
    );
    assert_eq!(header_names(&mail), NAMES);
    let h = headers(&mail);
    let get = |name: &str| h.iter().find(|(n, _)| n == name).unwrap().1.clone();
    assert_eq!(get("Date"), "Thu, 02 Jan 2025 03:04:05 +0000");
    assert_eq!(get("Auto-Submitted"), "auto-generated");
    assert_eq!(get("Message-ID"), mail.message_id());
    assert_eq!(
        mail.message_id(),
        format!("<ripen.0193c5b2-7a1e-7c3d-9f00-1234567890ab.2.failed.20250102030405123456@example.com>")
    );
    // The same notice, the same Message-ID: a receiver can drop a repeat.
    assert_eq!(compose(&cfg, &n).unwrap().message_id(), mail.message_id());

    let plain = config("");
    let mail = compose(&plain, &notice(&payload)).unwrap();
    assert!(!mail.text().contains("#/entities/"), "{}", mail.text());
    assert!(!mail.html().contains("<a "), "{}", mail.html());
    assert!(!mail.text().contains("Detail"), "{}", mail.text());
}

#[test]
fn the_subject_follows_the_template() {
    let payload = json!({"contact_email": "ops@example.com"});
    for (template, want) in [
        ("{type} {id} is {status}", format!("merchant {ID} is ready")),
        (
            "[ripen] {{{type}}} v{version} at {at}",
            "[ripen] {merchant} v2 at 2025-01-02T03:04:05.123456Z".to_owned(),
        ),
        ("Entity ready", "Entity ready".to_owned()),
    ] {
        let cfg = config(&format!("subject = {template:?}"));
        assert_eq!(compose(&cfg, &notice(&payload)).unwrap().subject(), want);
    }
    // A long subject is cut.
    let long_type = "t".repeat(500);
    let mut n = notice(&payload);
    n.type_name = &long_type;
    let subject = compose(&config(""), &n).unwrap().subject().to_owned();
    assert_eq!(subject.chars().count(), 200, "{subject}");
    assert!(subject.ends_with('…'));
}

#[test]
fn values_cannot_add_headers() {
    let cfg = config("subject = \"{type} {id} {at}\"");
    let payload = json!({"contact_email": "ops@example.com"});
    let attacks = [
        "x\r\nBcc: evil@example.net",
        "x\nBcc: evil@example.net",
        "x\rBcc: evil@example.net",
        "x\r\n\r\n<html>body</html>",
        "x\u{85}Bcc: evil@example.net",
        "x\u{2028}Bcc: evil@example.net",
        "=?utf-8?q?x=0D=0ABcc:_evil@example.net?=",
    ];
    for attack in attacks {
        for field in ["type", "id", "at", "detail"] {
            let mut n = notice(&payload);
            match field {
                "type" => n.type_name = attack,
                "id" => n.entity_id = attack,
                "at" => n.at = attack,
                _ => n.detail = Some(attack),
            }
            let mail = compose(&cfg, &n).unwrap();
            assert!(
                !mail.subject().contains(['\r', '\n']),
                "{:?}",
                mail.subject()
            );
            assert_eq!(header_names(&mail), NAMES, "{field} = {attack:?}");
            let message_id = mail.message_id();
            assert!(
                message_id[1..message_id.len() - 1]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)),
                "{message_id}"
            );
        }
    }
    // A status is one of four words, or no mail.
    let mut n = notice(&payload);
    n.status = "ready\r\nBcc: evil@example.net";
    let e = compose(&cfg, &n).unwrap_err();
    assert!(matches!(e, ComposeError::UnknownStatus { .. }), "{e:?}");
    assert!(!e.to_string().contains('\n'), "{e}");
}

#[test]
fn html_values_are_escaped() {
    let cfg = config("link_base = \"https://ripen.example.com\"");
    let payload = json!({"contact_email": "ops@example.com"});
    let mut n = notice(&payload);
    n.type_name = "<script>alert('type')</script>";
    n.entity_id = "id\"><img src=x onerror=alert(1)>";
    n.status = "degraded";
    n.detail = Some("<b>bold</b> & \"quoted\" 'single'");
    let mail = compose(&cfg, &n).unwrap();
    let html = mail.html();
    for raw in [
        "<script>",
        "<img",
        "<b>",
        "\"quoted\"",
        "'single'",
        "onerror=alert(1)>",
    ] {
        assert!(!html.contains(raw), "{raw:?} unescaped in {html}");
    }
    for escaped in [
        "&lt;script&gt;alert(&#39;type&#39;)&lt;/script&gt;",
        "id&quot;&gt;&lt;img src=x onerror=alert(1)&gt;",
        "&lt;b&gt;bold&lt;/b&gt; &amp; &quot;quoted&quot; &#39;single&#39;",
    ] {
        assert!(html.contains(escaped), "{escaped:?} missing from {html}");
    }
    // In the link the id is percent-encoded, so it cannot leave the href.
    assert!(
        html.contains(
            "href=\"https://ripen.example.com/#/entities/id%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E\""
        ),
        "{html}"
    );
    // The text part shows them as they are.
    assert!(mail.text().contains("<b>bold</b> & \"quoted\" 'single'"));
}

#[test]
fn the_payload_stays_out_of_the_mail() {
    let cfg = config("to_field = \"/contact/email\"");
    let payload = json!({
        "contact": {"email": "ops@example.com", "phone": "+49 30 1234567"},
        "iban": "DE89370400440532013000",
        "secret_note": "do-not-mail-this",
    });
    let mut n = notice(&payload);
    n.status = "cancelled";
    let mail = compose(&cfg, &n).unwrap();
    let formatted = String::from_utf8(mail.formatted().to_vec()).unwrap();
    for secret in [
        "+49 30 1234567",
        "DE89370400440532013000",
        "do-not-mail-this",
        "iban",
        "phone",
    ] {
        for (what, text) in [
            ("text", mail.text()),
            ("html", mail.html()),
            ("message", &formatted),
        ] {
            assert!(!text.contains(secret), "{secret:?} in the {what}");
        }
    }
}

#[test]
fn a_long_detail_is_cut() {
    let cfg = config("");
    let payload = json!({"contact_email": "ops@example.com"});
    let detail = format!("{}END", "x".repeat(5000));
    let mut n = notice(&payload);
    n.status = "failed";
    n.detail = Some(&detail);
    let mail = compose(&cfg, &n).unwrap();
    assert!(!mail.text().contains("END"));
    assert!(mail.text().contains(&format!("{}…", "x".repeat(1999))));
}

#[test]
fn non_ascii_values_survive_encoding() {
    let cfg = config("from = \"Rïpen Bot <ripen@example.com>\"");
    let payload = json!({"contact_email": "ops@example.com"});
    let mut n = notice(&payload);
    n.type_name = "händler";
    let mail = compose(&cfg, &n).unwrap();
    assert_eq!(mail.subject(), format!("händler {ID} is ready"));
    // On the wire the message is ASCII: encoded words and encoded parts.
    assert!(mail.formatted().is_ascii());
    assert_eq!(header_names(&mail), NAMES);
}
