//! The JSON views of the HTTP API (docs/api.md): the entity view, the
//! consumable entity and history events.

use ripen_core::{Compensation, Pipeline, StepStatus, COMPENSATE_SUFFIX};
use ripen_engine::time::rfc3339;
use ripen_engine::ExecutorKind;
use ripen_store::{EntityData, EntityRecord, HistoryEvent, StepRecord};
use std::fmt::Write as _;

use serde_json::{json, Map, Value};

/// The entity view as JSON text, written out directly: the same bytes as
/// serialising [`entity`] (serde_json sorts object keys), without building a
/// value first. Intake answers with it, so it is on the hottest path.
/// `pipeline` is the entity's, when this node knows it: the view then says
/// which executor runs each step.
pub fn entity_json(r: &EntityRecord, pipeline: Option<&Pipeline>) -> String {
    let mut out = String::with_capacity(256 + 128 * r.steps.len());
    write_entity(&mut out, r, pipeline);
    out
}

/// Appends an RFC 3339 time in quotes, or `null`.
fn push_time(out: &mut String, at_us: Option<i64>) {
    match at_us {
        Some(at) => {
            out.push('"');
            out.push_str(&rfc3339(at));
            out.push('"');
        }
        None => out.push_str("null"),
    }
}

/// The kind of executor of step `i`, if the pipeline is known.
fn executor_of(pipeline: Option<&Pipeline>, i: usize) -> Option<&'static str> {
    let p = pipeline.filter(|p| p.len() > i)?;
    Some(ExecutorKind::of(&p.step(i).executor).as_str())
}

/// The names of the steps that step `i` needs, if the pipeline is known.
fn needs_of(pipeline: Option<&Pipeline>, i: usize) -> Option<Vec<&str>> {
    let p = pipeline.filter(|p| p.len() > i)?;
    Some(
        p.step(i)
            .needs
            .iter()
            .map(|&n| p.step(n).name.as_str())
            .collect(),
    )
}

/// Appends the entity view to `out`; see [`entity_json`].
pub fn write_entity(out: &mut String, r: &EntityRecord, pipeline: Option<&Pipeline>) {
    out.push('{');
    if let Some(c) = compensation_of(r) {
        out.push_str("\"compensation\":{\"status\":\"");
        out.push_str(c.as_str());
        out.push_str("\",\"steps\":[");
        let asked = r
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| is_compensation(s) && s.state.status != StepStatus::Dormant);
        for (k, (i, s)) in asked.enumerate() {
            if k > 0 {
                out.push(',');
            }
            write_step(out, s, i, pipeline, None);
        }
        out.push_str("]},");
    }
    out.push_str("\"created_at\":\"");
    out.push_str(&rfc3339(r.created_at_us));
    out.push_str("\",\"degraded\":");
    out.push_str(if r.degraded { "true" } else { "false" });
    if r.degraded {
        out.push_str(",\"degraded_steps\":[");
        let failed = r
            .steps
            .iter()
            .filter(|s| !s.critical && !is_compensation(s) && s.state.status == StepStatus::Failed);
        for (i, s) in failed.enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_json_string(out, &s.name);
        }
        out.push(']');
    }
    if !r.deps.is_empty() {
        out.push_str(",\"dependencies\":[");
        for (i, d) in r.deps.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{{\"entity_id\":\"{}\",\"field\":", d.id);
            push_json_string(out, &d.field);
            out.push_str(",\"status\":\"");
            out.push_str(d.status.as_str());
            out.push_str("\",\"type\":");
            push_json_string(out, &d.type_name);
            out.push('}');
        }
        out.push(']');
    }
    if let Some(d) = r.failed_dependency() {
        let _ = write!(
            out,
            ",\"failure\":{{\"cause\":\"dependency_failed\",\"entity_id\":\"{}\",\"field\":",
            d.id
        );
        push_json_string(out, &d.field);
        out.push_str(",\"status\":\"");
        out.push_str(d.status.as_str());
        out.push_str("\",\"type\":");
        push_json_string(out, &d.type_name);
        out.push('}');
    }
    let _ = write!(out, ",\"id\":\"{}\",\"payload_pruned_at\":", r.id);
    push_time(out, r.payload_pruned_at_us);
    out.push_str(",\"ready_at\":");
    match r.ready_at_us {
        Some(at) => {
            out.push('"');
            out.push_str(&rfc3339(at));
            out.push('"');
        }
        None => out.push_str("null"),
    }
    out.push_str(",\"status\":\"");
    out.push_str(r.status.as_str());
    out.push_str("\",\"steps\":[");
    let mut first = true;
    for (i, s) in r.steps.iter().enumerate() {
        if is_compensation(s) {
            continue;
        }
        if !std::mem::take(&mut first) {
            out.push(',');
        }
        write_step(out, s, i, pipeline, step_reason(r, s.state.status));
    }
    out.push_str("],\"type\":");
    push_json_string(out, &r.type_name);
    out.push_str(",\"updated_at\":\"");
    out.push_str(&rfc3339(r.updated_at_us));
    let _ = write!(out, "\",\"version\":{}}}", r.version);
}

/// Why a step does not run, when another entity is the reason: a blocked
/// step of an entity that waits ("waiting for merchant 0193…"), a skipped
/// step of one that failed because of a dependency.
fn step_reason(r: &EntityRecord, status: StepStatus) -> Option<String> {
    match status {
        StepStatus::Blocked => r
            .waiting_for()
            .map(|d| format!("waiting for {} {}", d.type_name, d.id)),
        StepStatus::Skipped => r
            .failed_dependency()
            .map(|d| format!("{} {} {}", d.type_name, d.id, d.status.as_str())),
        _ => None,
    }
}

/// Whether a step record is a compensation step (`{step}:compensate`).
fn is_compensation(s: &StepRecord) -> bool {
    s.name.ends_with(COMPENSATE_SUFFIX)
}

/// Where the entity's compensation stands, from its step records: `None`
/// when none was asked for.
fn compensation_of(r: &EntityRecord) -> Option<Compensation> {
    let mut asked = r
        .steps
        .iter()
        .filter(|s| is_compensation(s) && s.state.status != StepStatus::Dormant)
        .peekable();
    asked.peek()?;
    let mut failed = false;
    for s in asked {
        match s.state.status {
            StepStatus::Succeeded => {}
            StepStatus::Failed | StepStatus::Skipped => failed = true,
            _ => return Some(Compensation::Running),
        }
    }
    Some(if failed {
        Compensation::Failed
    } else {
        Compensation::Done
    })
}

/// Appends the view of step record `s`, step `i` of its pipeline.
fn write_step(
    out: &mut String,
    s: &StepRecord,
    i: usize,
    pipeline: Option<&Pipeline>,
    reason: Option<String>,
) {
    let _ = write!(
        out,
        "{{\"attempts\":{},\"critical\":{},",
        s.state.attempts, s.critical
    );
    if let Some(kind) = executor_of(pipeline, i) {
        let _ = write!(out, "\"executor\":\"{kind}\",");
    }
    out.push_str("\"last_error\":");
    match &s.state.last_error {
        Some(e) => push_json_string(out, e),
        None => out.push_str("null"),
    }
    if s.state.status == StepStatus::Running {
        if let Some(due) = s.state.due_at_us {
            out.push_str(",\"lease_expires_at\":\"");
            out.push_str(&rfc3339(due));
            out.push('"');
        }
    }
    out.push_str(",\"name\":");
    push_json_string(out, &s.name);
    if let Some(needs) = needs_of(pipeline, i) {
        out.push_str(",\"needs\":[");
        for (k, need) in needs.iter().enumerate() {
            if k > 0 {
                out.push(',');
            }
            push_json_string(out, need);
        }
        out.push(']');
    }
    if s.state.status == StepStatus::Retrying {
        if let Some(due) = s.state.due_at_us {
            out.push_str(",\"next_attempt_at\":\"");
            out.push_str(&rfc3339(due));
            out.push('"');
        }
    }
    if let Some(reason) = reason {
        out.push_str(",\"reason\":");
        push_json_string(out, &reason);
    }
    out.push_str(",\"status\":\"");
    out.push_str(s.state.status.as_str());
    out.push('"');
    if let Some(worker) = &s.state.holder {
        out.push_str(",\"worker\":");
        push_json_string(out, worker);
    }
    out.push('}');
}

/// Appends `s` as a JSON string, escaped exactly as serde_json escapes it.
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// The entity view as a value; [`entity_json`] writes the same JSON faster.
#[cfg(test)]
pub fn entity(r: &EntityRecord, pipeline: Option<&Pipeline>) -> Value {
    let step_value = |i: usize, s: &StepRecord, reason: Option<String>| {
        let mut step = json!({
            "name": s.name,
            "status": s.state.status.as_str(),
            "critical": s.critical,
            "attempts": s.state.attempts,
            "last_error": s.state.last_error,
        });
        if s.state.status == StepStatus::Retrying {
            if let Some(due) = s.state.due_at_us {
                step["next_attempt_at"] = json!(rfc3339(due));
            }
        }
        if s.state.status == StepStatus::Running {
            if let Some(due) = s.state.due_at_us {
                step["lease_expires_at"] = json!(rfc3339(due));
            }
        }
        if let Some(kind) = executor_of(pipeline, i) {
            step["executor"] = json!(kind);
        }
        if let Some(needs) = needs_of(pipeline, i) {
            step["needs"] = json!(needs);
        }
        if let Some(worker) = &s.state.holder {
            step["worker"] = json!(worker);
        }
        if let Some(reason) = reason {
            step["reason"] = json!(reason);
        }
        step
    };
    let steps: Vec<Value> = r
        .steps
        .iter()
        .enumerate()
        .filter(|(_, s)| !is_compensation(s))
        .map(|(i, s)| step_value(i, s, step_reason(r, s.state.status)))
        .collect();
    let mut view = json!({
        "id": r.id.to_string(),
        "type": r.type_name,
        "version": r.version,
        "status": r.status.as_str(),
        "degraded": r.degraded,
        "created_at": rfc3339(r.created_at_us),
        "updated_at": rfc3339(r.updated_at_us),
        "ready_at": r.ready_at_us.map(rfc3339),
        "payload_pruned_at": r.payload_pruned_at_us.map(rfc3339),
        "steps": steps,
    });
    if r.degraded {
        let failed: Vec<&str> = r
            .steps
            .iter()
            .filter(|s| !s.critical && !is_compensation(s) && s.state.status == StepStatus::Failed)
            .map(|s| s.name.as_str())
            .collect();
        view["degraded_steps"] = json!(failed);
    }
    if let Some(c) = compensation_of(r) {
        let asked: Vec<Value> = r
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| is_compensation(s) && s.state.status != StepStatus::Dormant)
            .map(|(i, s)| step_value(i, s, None))
            .collect();
        view["compensation"] = json!({"status": c.as_str(), "steps": asked});
    }
    let deps: Vec<Value> = r
        .deps
        .iter()
        .map(|d| json!({"field": d.field, "type": d.type_name, "entity_id": d.id.to_string(), "status": d.status.as_str()}))
        .collect();
    if !deps.is_empty() {
        view["dependencies"] = json!(deps);
    }
    if let Some(d) = r.failed_dependency() {
        view["failure"] = json!({
            "cause": "dependency_failed",
            "field": d.field,
            "type": d.type_name,
            "entity_id": d.id.to_string(),
            "status": d.status.as_str(),
        });
    }
    view
}

/// The consumable entity, assembled from raw JSON without re-encoding it.
/// Once the raw payload was pruned, `payload` is null and
/// `payload_pruned_at` says when; the outputs are kept.
pub fn data(d: &EntityData) -> String {
    let r = &d.record;
    let payload = d.payload.as_deref().unwrap_or("null");
    let mut out = String::with_capacity(payload.len() + 160);
    out.push_str(&format!(
        "{{\"id\":\"{}\",\"type\":{},\"version\":{},\"payload\":",
        r.id,
        Value::from(r.type_name.as_str()),
        r.version
    ));
    out.push_str(payload);
    out.push_str(",\"payload_pruned_at\":");
    push_time(&mut out, r.payload_pruned_at_us);
    out.push_str(",\"outputs\":{");
    let outputs = d
        .outputs
        .iter()
        .filter(|(name, _)| !name.ends_with(COMPENSATE_SUFFIX));
    for (i, (name, output)) in outputs.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&Value::from(name.as_str()).to_string());
        out.push(':');
        out.push_str(output);
    }
    out.push_str("}}");
    out
}

pub fn event(e: &HistoryEvent) -> Value {
    let mut v = Map::new();
    v.insert("seq".into(), json!(e.seq));
    v.insert("at".into(), json!(rfc3339(e.at_us)));
    v.insert("kind".into(), json!(e.kind));
    v.insert("step".into(), json!(e.step));
    v.insert("attempt".into(), json!(e.attempt));
    if let Value::Object(detail) = &e.detail {
        for (k, val) in detail {
            let (key, val) = match (k.strip_suffix("_us"), val.as_i64()) {
                (Some(base), Some(us)) => (base.to_owned(), json!(rfc3339(us))),
                _ => (k.clone(), val.clone()),
            };
            v.insert(key, val);
        }
    }
    Value::Object(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ripen_core::{EntityStatus, StepState};
    use ripen_store::{EntityId, StepRecord};

    fn step(name: &str, critical: bool, status: StepStatus, error: Option<&str>) -> StepRecord {
        StepRecord {
            name: name.into(),
            critical,
            state: StepState {
                status,
                attempts: 3,
                epoch: 7,
                due_at_us: Some(1_700_000_000_123_456),
                last_error: error.map(str::to_owned),
                holder: (status == StepStatus::Running).then(|| "w\"1".to_owned()),
            },
        }
    }

    #[test]
    fn the_written_view_is_the_serialised_value() {
        let mut r = EntityRecord {
            id: EntityId::new_v7(),
            tenant: "default".into(),
            type_name: "mer\"chant\u{1}\u{7f}é".into(),
            version: 4,
            status: EntityStatus::Pending,
            degraded: false,
            created_at_us: 1_700_000_000_000_001,
            updated_at_us: 1_700_000_000_500_000,
            ready_at_us: None,
            payload_pruned_at_us: None,
            steps: vec![
                step("a", true, StepStatus::Succeeded, None),
                step(
                    "b\\",
                    true,
                    StepStatus::Retrying,
                    Some("HTTP 503: \"busy\"\n\tx\u{8}\u{c}\r"),
                ),
                step("e", false, StepStatus::Failed, Some("no")),
                step("w", true, StepStatus::Running, None),
            ],
            deps: Vec::new(),
        };
        let same = |r: &EntityRecord, p: Option<&Pipeline>| {
            assert_eq!(entity_json(r, p), entity(r, p).to_string());
        };
        same(&r, None);
        let defs = [
            ("a", None),
            ("b", None),
            ("e", Some("billing")),
            ("w", Some("billing")),
        ]
        .map(|(name, worker)| ripen_core::StepDef {
            name: name.into(),
            needs: match name {
                "e" => vec!["a".to_owned(), "b".to_owned()],
                "w" => vec!["b".to_owned()],
                _ => Vec::new(),
            },
            critical: name != "e",
            timeout_ms: 1_000,
            retry: Default::default(),
            executor: match worker {
                None => ripen_core::Executor::Http {
                    url: "http://127.0.0.1:9/x".into(),
                },
                Some(q) => ripen_core::Executor::Worker { queue: q.into() },
            },
            compensate: None,
        });
        let pipeline = Pipeline::new(defs.to_vec()).expect("pipeline");
        same(&r, Some(&pipeline));
        let view = entity(&r, Some(&pipeline));
        assert_eq!(view["steps"][2]["executor"], "worker");
        assert_eq!(view["steps"][2]["needs"], json!(["a", "b"]));
        assert_eq!(view["steps"][0]["needs"], json!([]));
        assert_eq!(view["steps"][3]["worker"], "w\"1");
        assert!(view["steps"][3]["lease_expires_at"].is_string());
        r.degraded = true;
        r.status = EntityStatus::Ready;
        r.ready_at_us = Some(1_700_000_001_000_000);
        same(&r, Some(&pipeline));
        r.steps.clear();
        same(&r, None);
    }

    #[test]
    fn a_dependent_view_names_what_it_waits_for_and_why_it_failed() {
        let parent = EntityId::new_v7();
        let mut r = EntityRecord {
            id: EntityId::new_v7(),
            tenant: "default".into(),
            type_name: "store".into(),
            version: 1,
            status: EntityStatus::Pending,
            degraded: false,
            created_at_us: 1_700_000_000_000_001,
            updated_at_us: 1_700_000_000_500_000,
            ready_at_us: None,
            payload_pruned_at_us: None,
            steps: vec![step("a", true, StepStatus::Blocked, None)],
            deps: vec![ripen_store::deps::DependencyRecord {
                field: "merchant\"id".into(),
                type_name: "merchant".into(),
                id: parent,
                status: EntityStatus::Pending,
            }],
        };
        let same = |r: &EntityRecord| {
            assert_eq!(entity_json(r, None), entity(r, None).to_string());
            entity(r, None)
        };
        let view = same(&r);
        assert_eq!(
            view["steps"][0]["reason"],
            format!("waiting for merchant {parent}")
        );
        assert_eq!(view["dependencies"][0]["status"], "pending");
        assert!(view.get("failure").is_none());
        r.status = EntityStatus::Failed;
        r.deps[0].status = EntityStatus::Failed;
        r.steps[0].state.status = StepStatus::Skipped;
        let view = same(&r);
        assert_eq!(view["failure"]["cause"], "dependency_failed");
        assert_eq!(view["failure"]["entity_id"], parent.to_string());
        assert_eq!(
            view["steps"][0]["reason"],
            format!("merchant {parent} failed")
        );
    }
}
