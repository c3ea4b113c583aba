//! Intake's JSON rules through the real binary (docs/api.md, "Submit an
//! entity"): a type without a schema (`plain`) and a typed one (`merchant`)
//! refuse the same bodies with the same problem, and a key twice in one
//! object is a `400 malformed-json` that names the key and where it is.

mod common;

use common::*;
use serde_json::{json, Value};

fn merchant_schema() -> Value {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "address": {"type": "object", "properties": {"city": {"type": "string"}}},
            "tags": {"type": "array", "items": {"type": "string"}}
        }
    })
}

/// The status, problem type and detail of an answer.
fn problem_of(r: &Resp) -> (u16, Value, Value) {
    let p = assert_problem_in(r, &[400, 422]);
    (r.status, p["type"].clone(), p["detail"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_and_schema_less_types_refuse_the_same_bodies() {
    let ds = Downstream::start().await;
    let cfg = Config::new()
        .with_type(single("plain", &ds))
        .with_type(single("merchant", &ds).schema(merchant_schema()));
    let srv = Server::start(&cfg).await;

    let too_deep = format!("{{\"name\":{}{}}}", "[".repeat(127), "]".repeat(127));
    // (body, status, what the detail must say)
    let cases: Vec<(String, u16, &str)> = vec![
        (
            r#"{"name":"a","name":"b"}"#.into(),
            400,
            r#"duplicate key "name" in the top-level object"#,
        ),
        (
            r#"{"address":{"city":"Lyon","city":"Nice"}}"#.into(),
            400,
            r#"duplicate key "city" at /address"#,
        ),
        (
            r#"{"tags":["a"],"list":[{"k":1},{"k":1,"k":2}]}"#.into(),
            400,
            r#"duplicate key "k" at /list/1"#,
        ),
        (
            r#"{"name":"a","n":1e400}"#.into(),
            400,
            "number out of range",
        ),
        (r#"{"name":"\ud800"}"#.into(), 400, "hex escape"),
        (too_deep, 400, "deeper than 127 levels"),
        (r#"["name"]"#.into(), 422, "1 violation"),
        ("17".into(), 422, "1 violation"),
    ];
    for (body, status, said) in &cases {
        let plain = srv
            .post_bytes("/v1/entities/plain", body.clone().into_bytes())
            .await;
        let typed = srv
            .post_bytes("/v1/entities/merchant", body.clone().into_bytes())
            .await;
        let (p_status, p_type, p_detail) = problem_of(&plain);
        let (t_status, t_type, t_detail) = problem_of(&typed);
        assert_eq!(p_status, *status, "{body}: {plain}");
        assert_eq!(
            (p_status, &p_type),
            (t_status, &t_type),
            "{body}: {plain} vs {typed}"
        );
        if *status == 400 {
            // JSON nested too deep is JSON: it has a problem type of its own.
            let want = if said.contains("deeper than") {
                "urn:ripen:problem:json-too-deep"
            } else {
                "urn:ripen:problem:malformed-json"
            };
            assert_eq!(p_type, want, "{plain}");
            assert_eq!(p_detail, t_detail, "{body}");
        }
        let detail = p_detail.as_str().unwrap_or_default();
        let typed_detail = t_detail.as_str().unwrap_or_default();
        assert!(
            detail.contains(said) || (*status == 422 && typed_detail.contains(said)),
            "{body}: {detail:?} should say {said:?}"
        );
    }

    // Nothing was created; a clean body is accepted by both, byte for byte.
    for t in ["plain", "merchant"] {
        let list = srv.get(&format!("/v1/entities?type={t}")).await;
        assert_eq!(list.json()["items"], json!([]), "{list}");
    }
    let body = r#"{"name":"a","address":{"city":"Lyon"},"tags":["x"],"more":{"name":"b"}}"#;
    for t in ["plain", "merchant"] {
        let r = srv
            .post_bytes(&format!("/v1/entities/{t}"), body.as_bytes().to_vec())
            .await;
        assert_eq!(r.status, 202, "{t}: {r}");
    }
}
