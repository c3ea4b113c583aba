use super::*;

fn parse(text: &str) -> Config {
    Config::parse(
        text,
        std::path::Path::new("ripen.toml"),
        std::path::Path::new("/tmp"),
    )
    .expect("a valid configuration")
}

const TYPE: &str = r#"
[types.t]
[[types.t.steps]]
name = "a"
http = "http://127.0.0.1:9/a"
[[types.t.steps]]
name = "b"
needs = ["a"]
worker = "billing"
critical = false
timeout = "5s"
retry = { max_attempts = 3, initial_backoff = "10ms", max_backoff = "1s" }
"#;

#[test]
fn a_configured_type_and_its_stored_definition_build_the_same_pipeline() {
    let config = parse(TYPE);
    let t = config.type_config("t").expect("t");
    let def = Definition::of_config(t);
    let again = Definition::from_stored(&def.canonical()).expect("builds");
    assert_eq!(again.pipeline, t.pipeline);
    assert_eq!(again.definition, def);
    assert_eq!(again.definition.digest(), def.digest());
    assert!(def.digest().starts_with("sha256:") && def.digest().len() == 71);
    assert_eq!(
        def.steps[1],
        json!({"name": "b", "needs": ["a"], "critical": false, "timeout": "5000ms",
               "retry": {"max_attempts": 3, "initial_backoff": "10ms", "max_backoff": "1000ms"},
               "worker": "billing"})
    );
}

#[test]
fn the_same_content_written_another_way_has_the_same_digest() {
    let short = json!({"steps": [{"name": "a", "http": "http://h/a"}]});
    let long = json!({
        "force": false,
        "references": {},
        "schema": null,
        "steps": [{"http": "http://h/a", "name": "a", "needs": [], "critical": true,
                   "timeout": "30s", "retry": {"max_attempts": 5}}],
    });
    let (a, _) = Definition::from_request(&short).expect("valid");
    let (b, force) = Definition::from_request(&long).expect("valid");
    assert!(!force);
    assert_eq!(a.definition.digest(), b.definition.digest());
    let other = json!({"steps": [{"name": "a", "http": "http://h/b"}]});
    let (c, _) = Definition::from_request(&other).expect("valid");
    assert_ne!(a.definition.digest(), c.definition.digest());
}

#[test]
fn invalid_requests_name_where_they_are_wrong() {
    let cases = [
        (json!([]), vec![""]),
        (json!({"steps": []}), vec!["/steps"]),
        (json!({"steps": [{"name": "a"}]}), vec!["/steps/0"]),
        (
            json!({"steps": [{"name": "a", "http": "ftp://x"}]}),
            vec!["/steps/0/http"],
        ),
        (
            json!({"steps": [{"name": "a", "http": "http://h/a", "ca_file": "/etc/x"}]}),
            vec!["/steps/0/ca_file"],
        ),
        (
            json!({"steps": [{"name": "a", "http": "http://h/a", "needs": ["zz"]}]}),
            vec!["/steps"],
        ),
        (
            json!({"schema": 3, "steps": [{"name": "a", "http": "http://h"}]}),
            vec!["/schema"],
        ),
        (
            json!({"schema": {"type": "nope"}, "steps": [{"name": "a", "http": "http://h"}]}),
            vec!["/schema"],
        ),
        (
            json!({"references": {"m": 5}, "steps": [{"name": "a", "http": "http://h"}]}),
            vec!["/references/m"],
        ),
        (json!({"stepz": [], "force": 1}), vec!["/stepz", "/force"]),
        (
            json!({"steps": [{"name": "a", "http": "http://h"}], "force": "yes"}),
            vec!["/force"],
        ),
    ];
    for (body, pointers) in cases {
        let problems = Definition::from_request(&body).expect_err("invalid");
        let got: Vec<&str> = problems.iter().map(|p| p.pointer.as_str()).collect();
        assert_eq!(got, pointers, "{body}: {problems:?}");
    }
}

#[test]
fn reads_are_the_payload_pointers_of_builtin_steps() {
    let config = parse(
        r#"
[types.t]
[[types.t.steps]]
name = "a"
builtin = { redis_set = { url = "redis://127.0.0.1:6379", key = "t:{id}", fields = { name = "/payload/name", city = "/payload/address/city", id = "/id" } } }
"#,
    );
    let t = config.type_config("t").expect("t");
    assert_eq!(
        reads(&t.pipeline, &BTreeMap::new()),
        vec!["/address/city".to_owned(), "/name".to_owned()]
    );
}
