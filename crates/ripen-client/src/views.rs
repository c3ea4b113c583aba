//! The JSON views of the HTTP API (docs/api.md) as serde types.
//!
//! Every view keeps the fields it does not name in `extra`, so that a client
//! built against an older contract still prints and forwards what a newer
//! server sends.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The status of an entity (docs/api.md, "Entities").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntityStatus {
    Pending,
    Ready,
    Failed,
    Cancelled,
}

impl EntityStatus {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            EntityStatus::Pending => "pending",
            EntityStatus::Ready => "ready",
            EntityStatus::Failed => "failed",
            EntityStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the entity has settled: only an operator retry moves it again.
    pub fn is_terminal(self) -> bool {
        !matches!(self, EntityStatus::Pending)
    }
}

impl std::fmt::Display for EntityStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The status of one step of an entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    Blocked,
    Queued,
    Running,
    Retrying,
    Succeeded,
    Failed,
    Skipped,
}

impl StepStatus {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Blocked => "blocked",
            StepStatus::Queued => "queued",
            StepStatus::Running => "running",
            StepStatus::Retrying => "retrying",
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
        }
    }

    /// Whether the step will not run again (short of an operator retry).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StepStatus::Succeeded | StepStatus::Failed | StepStatus::Skipped
        )
    }
}

impl std::fmt::Display for StepStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The entity view: what `POST`, `GET /v1/entities/{id}`, the list, retry
/// and cancel answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntityView {
    pub id: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub version: u64,
    pub status: EntityStatus,
    #[serde(default)]
    pub degraded: bool,
    /// RFC 3339 with microseconds, as the server wrote it.
    pub created_at: String,
    pub updated_at: String,
    #[serde(default)]
    pub ready_at: Option<String>,
    /// When the raw payload was pruned (docs/retention.md); `None` while
    /// it is kept.
    #[serde(default)]
    pub payload_pruned_at: Option<String>,
    #[serde(default)]
    pub steps: Vec<StepView>,
    /// The non-critical steps that failed for good, when `degraded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded_steps: Option<Vec<String>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl EntityView {
    /// The step named `name`, if the pipeline has one.
    pub fn step(&self, name: &str) -> Option<&StepView> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// The steps that failed or were skipped, with their last error, for
    /// messages; "no failed step" when there is none.
    pub fn failed_steps(&self) -> String {
        let failed: Vec<String> = self
            .steps
            .iter()
            .filter(|s| matches!(s.status, StepStatus::Failed | StepStatus::Skipped))
            .map(|s| match &s.last_error {
                Some(e) => format!("{} {} ({e})", s.name, s.status),
                None => format!("{} {}", s.name, s.status),
            })
            .collect();
        if failed.is_empty() {
            "no failed step".to_owned()
        } else {
            failed.join(", ")
        }
    }
}

/// One step in an entity view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepView {
    pub name: String,
    pub status: StepStatus,
    #[serde(default)]
    pub critical: bool,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub last_error: Option<String>,
    /// When a `retrying` step runs again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The consumable entity of `GET /v1/entities/{id}/data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntityData {
    pub id: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub version: u64,
    /// The payload exactly as submitted.
    /// `null` once it was pruned.
    pub payload: Value,
    /// When the raw payload was pruned; `None` while it is kept.
    #[serde(default)]
    pub payload_pruned_at: Option<String>,
    /// Each succeeded step's output, by step name.
    #[serde(default)]
    pub outputs: Map<String, Value>,
}

/// One page of `GET /v1/entities`, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListPage {
    pub items: Vec<EntityView>,
    /// The cursor of the next page; `None` on the last one.
    #[serde(default)]
    pub next: Option<String>,
}

/// One history event of `GET /v1/entities/{id}/events`, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    /// RFC 3339 with microseconds.
    pub at: String,
    pub kind: String,
    #[serde(default)]
    pub step: Option<String>,
    #[serde(default)]
    pub attempt: Option<u64>,
    /// The kind's own fields, such as `to` of a status change.
    #[serde(flatten)]
    pub detail: Map<String, Value>,
}

/// An RFC 9457 problem, the body of every error answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Problem-specific members, such as `errors` of a schema violation or
    /// `entity_status` of a conflict.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.title, self.status, self.detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entity_view_of_api_md_round_trips() {
        let text = r#"{"id":"0193c5b2-0000-7000-8000-000000000001","type":"merchant","version":1,
            "status":"ready","degraded":true,"created_at":"2026-01-01T00:00:00.000000Z",
            "updated_at":"2026-01-01T00:00:00.143000Z","ready_at":"2026-01-01T00:00:00.143000Z",
            "payload_pruned_at":null,"steps":[{"name":"kyc","status":"succeeded","critical":true,"attempts":2,"last_error":null},
                     {"name":"mail","status":"failed","critical":false,"attempts":3,"last_error":"503"}],
            "degraded_steps":["mail"],"future_field":7}"#;
        let view: EntityView = serde_json::from_str(text).unwrap();
        assert_eq!(view.status, EntityStatus::Ready);
        assert_eq!(view.step("kyc").unwrap().attempts, 2);
        assert_eq!(view.failed_steps(), "mail failed (503)");
        assert_eq!(view.extra["future_field"], 7);
        let again: Value = serde_json::to_value(&view).unwrap();
        assert_eq!(again, serde_json::from_str::<Value>(text).unwrap());
    }

    #[test]
    fn a_problem_keeps_its_extension_members() {
        let text = r#"{"type":"urn:ripen:problem:wrong-status","title":"Conflict","status":409,
            "detail":"cannot cancel","entity_status":"ready"}"#;
        let problem: Problem = serde_json::from_str(text).unwrap();
        assert_eq!(problem.status, 409);
        assert_eq!(problem.extra["entity_status"], "ready");
    }
}
