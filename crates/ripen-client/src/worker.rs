//! The worker calls of the API (docs/workers.md): claim tasks of a worker
//! queue with a long poll, extend a task's lease, and report its result.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{percent_encode, Client, Method, Result, StatusCode};

/// The most tasks one claim may ask for.
pub const CLAIM_MAX: usize = 100;
/// How much longer than its `wait_ms` a claim may take before the client
/// gives up on it: the server answers at the end of the wait, plus the time
/// of one claim in the store.
const CLAIM_SLACK: Duration = Duration::from_secs(10);

/// One claimed task, as `POST /v1/queues/{name}/claim` lists it. The
/// payload and the outputs stay raw JSON until a worker decodes them into
/// its own types.
#[derive(Debug, Deserialize)]
pub struct TaskView {
    /// `{entity id}.{step index}`; retries of the step keep it.
    pub task_id: String,
    /// The lease token every later call of this attempt sends.
    pub lease: String,
    /// RFC 3339: when the lease runs out unless a heartbeat extends it.
    pub lease_expires_at: String,
    /// `{entity id}:{step name}`, the same for every attempt of the step.
    pub idempotency_key: String,
    pub entity_id: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub version: u64,
    pub step: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    pub payload: Box<RawValue>,
    /// The outputs of the steps this one needs, by step name.
    #[serde(default)]
    pub outputs: HashMap<String, Box<RawValue>>,
}

/// A failed attempt, as `POST /v1/tasks/{id}/fail` reports it.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    pub error: &'a str,
    /// `false` fails the step for good.
    pub retryable: bool,
    /// A lower bound on the backoff before the next attempt.
    pub retry_after_ms: Option<u64>,
}

#[derive(Serialize)]
struct ClaimBody<'a> {
    max: usize,
    wait_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    worker_id: Option<&'a str>,
}

#[derive(Deserialize)]
struct Claimed {
    tasks: Vec<TaskView>,
}

#[derive(Serialize)]
struct LeaseBody<'a> {
    lease: &'a str,
}

#[derive(Deserialize)]
struct Extended {
    lease_expires_at: String,
}

#[derive(Serialize)]
struct CompleteBody<'a> {
    lease: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<&'a RawValue>,
}

#[derive(Serialize)]
struct FailBody<'a> {
    lease: &'a str,
    error: &'a str,
    retryable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

impl Client {
    /// `POST /v1/queues/{queue}/claim`: up to `max` tasks (1 to
    /// [`CLAIM_MAX`]), waiting up to `wait` for the first one; an empty list
    /// when nothing came due. This one call may take `wait` plus a little,
    /// whatever the client's own timeout.
    pub async fn claim(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
        worker_id: Option<&str>,
    ) -> Result<Vec<TaskView>> {
        let body = ClaimBody {
            max,
            wait_ms: wait.as_millis().try_into().unwrap_or(u64::MAX),
            worker_id,
        };
        let claimed: Claimed = self
            .request_within(
                Method::POST,
                &format!("/v1/queues/{}/claim", percent_encode(queue)),
                &[],
                Some(json_body(&body)),
                self.timeout.max(wait + CLAIM_SLACK),
            )
            .await?
            .expect(StatusCode::OK)?
            .decode()?;
        Ok(claimed.tasks)
    }

    /// `POST /v1/tasks/{id}/heartbeat`: extends the lease; its new expiry
    /// (RFC 3339). A lease that no longer holds is a 409 problem.
    pub async fn heartbeat(&self, task_id: &str, lease: &str) -> Result<String> {
        let extended: Extended = self
            .task_call(task_id, "heartbeat", json_body(&LeaseBody { lease }))
            .await?;
        Ok(extended.lease_expires_at)
    }

    /// `POST /v1/tasks/{id}/complete`: the attempt succeeded with `output`
    /// (none is recorded as no output). A stale lease is a 409 problem, and
    /// the result changes nothing.
    pub async fn complete(
        &self,
        task_id: &str,
        lease: &str,
        output: Option<&RawValue>,
    ) -> Result<()> {
        let body = json_body(&CompleteBody { lease, output });
        let _: serde_json::Value = self.task_call(task_id, "complete", body).await?;
        Ok(())
    }

    /// `POST /v1/tasks/{id}/fail`: the attempt failed; a retryable failure
    /// is retried within the step's budget. A stale lease is a 409 problem.
    pub async fn fail(&self, task_id: &str, lease: &str, failure: Failure<'_>) -> Result<()> {
        let body = json_body(&FailBody {
            lease,
            error: failure.error,
            retryable: failure.retryable,
            retry_after_ms: failure.retry_after_ms,
        });
        let _: serde_json::Value = self.task_call(task_id, "fail", body).await?;
        Ok(())
    }

    async fn task_call<T: serde::de::DeserializeOwned>(
        &self,
        task_id: &str,
        verb: &str,
        body: Bytes,
    ) -> Result<T> {
        self.request(
            Method::POST,
            &format!("/v1/tasks/{}/{verb}", percent_encode(task_id)),
            &[],
            Some(body),
        )
        .await?
        .expect(StatusCode::OK)?
        .decode()
    }
}

fn json_body(value: &impl Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("a request body serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_task_keeps_its_payload_and_outputs_raw() {
        let text = r#"{"tasks":[{"task_id":"0193c5b2-0000-7000-8000-000000000001.1",
            "lease":"7","lease_expires_at":"2026-01-01T00:00:35.000000Z",
            "idempotency_key":"0193c5b2-0000-7000-8000-000000000001:bill",
            "entity_id":"0193c5b2-0000-7000-8000-000000000001","type":"merchant","version":1,
            "step":"bill","attempt":2,"payload":{"name":"Acme", "n": 1.50},
            "outputs":{"kyc":{"ok":true}}}]}"#;
        let claimed: Claimed = serde_json::from_str(text).unwrap();
        let task = &claimed.tasks[0];
        assert_eq!((task.step.as_str(), task.attempt), ("bill", 2));
        assert_eq!(task.payload.get(), r#"{"name":"Acme", "n": 1.50}"#);
        assert_eq!(task.outputs["kyc"].get(), r#"{"ok":true}"#);
    }

    #[test]
    fn bodies_leave_out_what_is_not_set() {
        let claim = ClaimBody {
            max: 3,
            wait_ms: 0,
            worker_id: None,
        };
        assert_eq!(&json_body(&claim)[..], br#"{"max":3,"wait_ms":0}"#);
        let output = RawValue::from_string("{\"a\":1}".into()).unwrap();
        let complete = CompleteBody {
            lease: "4",
            output: Some(&output),
        };
        assert_eq!(
            &json_body(&complete)[..],
            br#"{"lease":"4","output":{"a":1}}"#
        );
        let fail = FailBody {
            lease: "4",
            error: "no",
            retryable: false,
            retry_after_ms: None,
        };
        assert_eq!(
            &json_body(&fail)[..],
            br#"{"lease":"4","error":"no","retryable":false}"#
        );
    }
}
