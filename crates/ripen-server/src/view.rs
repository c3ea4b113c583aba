//! The JSON views of API.md: the entity view, the consumable entity and
//! history events.

use ripen_core::StepStatus;
use ripen_engine::time::rfc3339;
use ripen_store::{EntityData, EntityRecord, HistoryEvent};
use serde_json::{json, Map, Value};

pub fn entity(r: &EntityRecord) -> Value {
    let steps: Vec<Value> = r
        .steps
        .iter()
        .map(|s| {
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
            step
        })
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
        "steps": steps,
    });
    if r.degraded {
        let failed: Vec<&str> = r
            .steps
            .iter()
            .filter(|s| !s.critical && s.state.status == StepStatus::Failed)
            .map(|s| s.name.as_str())
            .collect();
        view["degraded_steps"] = json!(failed);
    }
    view
}

/// The consumable entity, assembled from raw JSON without re-encoding it.
pub fn data(d: &EntityData) -> String {
    let r = &d.record;
    let mut out = String::with_capacity(d.payload.len() + 128);
    out.push_str(&format!(
        "{{\"id\":\"{}\",\"type\":{},\"version\":{},\"payload\":",
        r.id,
        Value::from(r.type_name.as_str()),
        r.version
    ));
    out.push_str(&d.payload);
    out.push_str(",\"outputs\":{");
    for (i, (name, output)) in d.outputs.iter().enumerate() {
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
