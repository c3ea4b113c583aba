//! `GET /openapi.json`: the OpenAPI 3.1 document of the whole HTTP API,
//! kept beside the code in `openapi.json` and served as it is written.
//!
//! Each operation carries `x-ripen-scope`, the scope [`crate::rule`] asks
//! of it (`public` for none). The unit tests below keep the document and
//! the router in step: every route of `router()` is documented, every
//! documented operation is routed, and every scope is the rule's.
//!
//! The document names one path differently from the router:
//! `/v1/entities/{key}` serves both submit (the segment is a type) and
//! read (an entity id), so the document calls it `{type_or_id}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// The document, as served.
pub const DOCUMENT: &str = include_str!("openapi.json");

/// `GET /openapi.json`.
pub async fn document() -> Response {
    let mut r = (StatusCode::OK, DOCUMENT).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use axum::http::Method;
    use serde_json::Value;

    use super::*;
    use crate::auth::{rule, Access};

    const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

    /// The router's template of a documented path.
    fn route_template(documented: &str) -> String {
        documented.replace("{type_or_id}", "{key}")
    }

    fn doc() -> Value {
        serde_json::from_str(DOCUMENT).expect("openapi.json is JSON")
    }

    /// `(METHOD, router template)` of every documented operation.
    fn documented() -> BTreeSet<(String, String)> {
        let doc = doc();
        let mut ops = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, _) in item.as_object().expect("a path item") {
                assert!(METHODS.contains(&method.as_str()), "{method} {path}");
                ops.insert((method.to_uppercase(), route_template(path)));
            }
        }
        ops
    }

    /// The text of `fn NAME` in `source`, up to its closing brace at the
    /// start of a line.
    fn function<'a>(source: &'a str, name: &str) -> &'a str {
        let start = source
            .find(&format!("fn {name}("))
            .unwrap_or_else(|| panic!("no fn {name}"));
        let len = source[start..].find("\n}\n").expect("the function's end");
        &source[start..start + len]
    }

    /// `(METHOD, template)` of every `.route("template", …)` in `body`:
    /// the methods are the method routers named in the call (`get(…)`,
    /// `.post(…)`, `axum::routing::delete(…)`).
    fn routes_in(body: &str) -> BTreeSet<(String, String)> {
        let mut found = BTreeSet::new();
        let mut rest = body;
        while let Some(at) = rest.find(".route(") {
            rest = &rest[at + ".route(".len()..];
            let open = rest.find('"').expect("a route's path");
            let close = open + 1 + rest[open + 1..].find('"').expect("the path's end");
            let path = &rest[open + 1..close];
            // The call's arguments: up to the parenthesis that closes it.
            let mut depth = 1;
            let mut end = close + 1;
            let bytes = rest.as_bytes();
            let mut in_str = false;
            while depth > 0 {
                match bytes[end] {
                    b'"' => in_str = !in_str,
                    b'(' if !in_str => depth += 1,
                    b')' if !in_str => depth -= 1,
                    _ => {}
                }
                end += 1;
            }
            let args = &rest[close + 1..end];
            let mut methods = 0;
            for method in METHODS {
                let call = format!("{method}(");
                let mut from = 0;
                while let Some(i) = args[from..].find(&call) {
                    let i = from + i;
                    let before = args[..i].chars().next_back();
                    if !before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                        found.insert((method.to_uppercase(), path.to_owned()));
                        methods += 1;
                    }
                    from = i + call.len();
                }
            }
            assert!(methods > 0, "no method router found for {path}");
            rest = &rest[end..];
        }
        found
    }

    /// Every route the server serves, read from the router's source.
    fn routed() -> BTreeSet<(String, String)> {
        let router = function(include_str!("lib.rs"), "router");
        // Everything is in these two functions: the router merges the
        // dashboard's routes and nothing else.
        assert_eq!(router.matches(".merge(").count(), 1, "{router}");
        assert!(router.contains(".merge(dashboard::routes())"));
        assert!(!router.contains(".nest("));
        let mut routes = routes_in(router);
        routes.extend(routes_in(function(include_str!("dashboard.rs"), "routes")));
        routes
    }

    #[test]
    fn the_document_is_openapi_3_1_of_this_version() {
        let doc = doc();
        assert!(doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1.")));
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(
            doc["components"]["securitySchemes"]["bearerAuth"],
            serde_json::json!({"type": "http", "scheme": "bearer", "description": "an API key, rpk_…"})
        );
    }

    #[test]
    fn every_route_is_documented_and_every_operation_routed() {
        let routed = routed();
        let documented = documented();
        assert!(
            routed.len() > 30,
            "the router's source was not read: {routed:?}"
        );
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        assert!(
            undocumented.is_empty(),
            "routes without a document: {undocumented:?}"
        );
        let unrouted: Vec<_> = documented.difference(&routed).collect();
        assert!(
            unrouted.is_empty(),
            "documented but not routed: {unrouted:?}"
        );
    }

    #[test]
    fn every_scope_is_the_access_rule() {
        let doc = doc();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("a path item") {
                let m = Method::from_bytes(method.to_uppercase().as_bytes()).expect("a method");
                let access = rule(&m, &route_template(path))
                    .unwrap_or_else(|| panic!("{method} {path} has no access rule"));
                let expected = match access {
                    Access::Public => "public".to_owned(),
                    Access::Needs(scope) => scope.as_str().to_owned(),
                };
                assert_eq!(op["x-ripen-scope"], expected.as_str(), "{method} {path}");
                // The security requirement says the same.
                let security = op["security"].as_array().expect("security");
                if access == Access::Public {
                    assert!(security.is_empty(), "{method} {path}");
                } else {
                    assert_eq!(
                        security,
                        &vec![serde_json::json!({"bearerAuth": []})],
                        "{method} {path}"
                    );
                    for status in ["401", "403", "429"] {
                        assert!(
                            op["responses"].get(status).is_some(),
                            "{method} {path} lacks {status}"
                        );
                    }
                }
            }
        }
    }

    /// Every link names an operation and parameters it has.
    #[test]
    fn links_name_operations_and_their_parameters() {
        let doc = doc();
        let mut params = std::collections::BTreeMap::new();
        for item in doc["paths"].as_object().expect("paths").values() {
            for op in item.as_object().expect("a path item").values() {
                let names: BTreeSet<String> = op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p["name"].as_str().map(str::to_owned))
                    .collect();
                params.insert(op["operationId"].as_str().expect("an id").to_owned(), names);
            }
        }
        let mut links = 0;
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("a path item") {
                for answer in op["responses"].as_object().expect("responses").values() {
                    for (name, link) in answer["links"].as_object().into_iter().flatten() {
                        let target = link["operationId"].as_str().expect("an operationId");
                        let known = params
                            .get(target)
                            .unwrap_or_else(|| panic!("{method} {path}: {name} -> {target}"));
                        for p in link["parameters"].as_object().expect("parameters").keys() {
                            assert!(known.contains(p), "{method} {path}: {name} -> {target}.{p}");
                        }
                        links += 1;
                    }
                }
            }
        }
        assert!(links > 20, "{links} links");
    }

    /// Every `$ref` names something the document holds, and every error
    /// answer is a problem.
    #[test]
    fn references_resolve_and_errors_are_problems() {
        fn walk(v: &Value, doc: &Value, at: &str) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(r)) = m.get("$ref") {
                        let pointer = r.strip_prefix('#').expect("a local $ref");
                        assert!(doc.pointer(pointer).is_some(), "{at}: {r} is missing");
                    }
                    for (k, v) in m {
                        walk(v, doc, &format!("{at}/{k}"));
                    }
                }
                Value::Array(items) => items.iter().for_each(|v| walk(v, doc, at)),
                _ => {}
            }
        }
        let doc = doc();
        walk(&doc, &doc, "");
        let resolve = |v: &Value| -> Value {
            match v["$ref"].as_str() {
                Some(r) => doc.pointer(&r[1..]).cloned().expect("resolved"),
                None => v.clone(),
            }
        };
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("a path item") {
                assert!(op["operationId"].is_string(), "{method} {path}");
                for (status, answer) in op["responses"].as_object().expect("responses") {
                    let code: u16 = status.parse().expect("a numeric status");
                    if code >= 400 {
                        let answer = resolve(answer);
                        assert_eq!(
                            answer["content"]["application/problem+json"]["schema"]["$ref"],
                            "#/components/schemas/Problem",
                            "{method} {path} {status}"
                        );
                    }
                }
            }
        }
    }
}
