//! What a handler gets (a [`Task`]) and what it may answer with besides an
//! output (a [`TaskError`]).

use std::fmt;
use std::time::{Duration, SystemTime};

use ripen_client::TaskView;
use serde::de::DeserializeOwned;

/// The longest error text the server keeps a report of; longer texts are cut
/// here rather than refused there.
pub(crate) const ERROR_LEN_MAX: usize = 4_096;

/// One claimed task: one attempt at one worker step of one entity. Its
/// lease is the SDK's business (heartbeats, the report); the handler reads
/// the entity's payload and the outputs of the steps this one needs.
#[derive(Debug)]
pub struct Task {
    view: TaskView,
    lease_expires_at: Option<SystemTime>,
}

impl Task {
    pub(crate) fn new(view: TaskView) -> Task {
        let lease_expires_at = crate::time::parse_rfc3339(&view.lease_expires_at);
        Task {
            view,
            lease_expires_at,
        }
    }

    /// The task's id, `{entity id}.{step index}`; retries keep it.
    pub fn id(&self) -> &str {
        &self.view.task_id
    }

    pub fn entity_id(&self) -> &str {
        &self.view.entity_id
    }

    /// The entity type.
    pub fn type_name(&self) -> &str {
        &self.view.type_name
    }

    /// The version of the entity type the entity was submitted under.
    pub fn version(&self) -> u64 {
        self.view.version
    }

    /// The step's name in the pipeline.
    pub fn step(&self) -> &str {
        &self.view.step
    }

    /// 1 for the first attempt, counting attempts whose worker died.
    pub fn attempt(&self) -> u32 {
        self.view.attempt
    }

    /// `{entity id}:{step name}`: the same for every attempt of this step,
    /// for a handler that makes a side effect happen at most once.
    pub fn idempotency_key(&self) -> &str {
        &self.view.idempotency_key
    }

    /// When the lease of the claim runs out, as the server said (the SDK's
    /// heartbeats extend it while the handler runs).
    pub fn lease_expires_at(&self) -> Option<SystemTime> {
        self.lease_expires_at
    }

    /// The entity's payload decoded as `T`. A payload that does not fit `T`
    /// fits no better on a later attempt: the error is fatal.
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, TaskError> {
        serde_json::from_str(self.view.payload.get())
            .map_err(|e| TaskError::fatal(format!("the payload does not fit: {e}")))
    }

    /// The entity's payload as the JSON text that was submitted.
    pub fn payload_json(&self) -> &str {
        self.view.payload.get()
    }

    /// The output of step `step` decoded as `T`. The steps this one needs
    /// are there once they succeeded; a missing one (not a dependency, or a
    /// step that succeeded without output) or one that does not fit `T` is a
    /// fatal error.
    pub fn output_of<T: DeserializeOwned>(&self, step: &str) -> Result<T, TaskError> {
        let raw = self
            .view
            .outputs
            .get(step)
            .ok_or_else(|| TaskError::fatal(format!("no output of step {step:?}")))?;
        serde_json::from_str(raw.get())
            .map_err(|e| TaskError::fatal(format!("the output of step {step:?} does not fit: {e}")))
    }

    /// The steps whose outputs this task carries.
    pub fn output_steps(&self) -> impl Iterator<Item = &str> {
        self.view.outputs.keys().map(String::as_str)
    }
}

/// Why a handler could not finish its task: retried within the step's
/// attempt budget ([`TaskError::retryable`], and any error converted with
/// `?`), or failed for good ([`TaskError::fatal`]).
///
/// Like `anyhow::Error`, it is not itself a `std::error::Error`, so that
/// every error type converts into it.
pub struct TaskError {
    message: String,
    retryable: bool,
    retry_after: Option<Duration>,
}

impl TaskError {
    /// A failure worth another attempt, after the step's backoff.
    pub fn retryable(message: impl Into<String>) -> TaskError {
        TaskError {
            message: message.into(),
            retryable: true,
            retry_after: None,
        }
    }

    /// A failure that no retry will cure: the step fails for good.
    pub fn fatal(message: impl Into<String>) -> TaskError {
        TaskError {
            message: message.into(),
            retryable: false,
            retry_after: None,
        }
    }

    /// The next attempt waits at least `delay` (a retryable error only).
    pub fn retry_after(mut self, delay: Duration) -> TaskError {
        self.retry_after = Some(delay);
        self
    }

    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The error text as reported: at most [`ERROR_LEN_MAX`] bytes.
    pub(crate) fn report_text(&self) -> &str {
        let mut cut = self.message.len().min(ERROR_LEN_MAX);
        while !self.message.is_char_boundary(cut) {
            cut -= 1;
        }
        &self.message[..cut]
    }

    pub(crate) fn retry_after_ms(&self) -> Option<u64> {
        self.retry_after
            .filter(|_| self.retryable)
            .map(|d| d.as_millis().try_into().unwrap_or(u64::MAX))
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.retryable { "retryable" } else { "fatal" };
        write!(f, "{kind}: {}", self.message)
    }
}

impl fmt::Debug for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Any error is retryable; its sources are kept in the text.
impl<E: std::error::Error + Send + Sync + 'static> From<E> for TaskError {
    fn from(error: E) -> TaskError {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(e) = source {
            message.push_str(": ");
            message.push_str(&e.to_string());
            source = e.source();
        }
        TaskError::retryable(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(outputs: &str) -> Task {
        let text = format!(
            r#"{{"task_id":"e.1","lease":"3","lease_expires_at":"2026-01-01T00:00:35.000000Z",
            "idempotency_key":"e:bill","entity_id":"e","type":"shop","version":1,"step":"bill",
            "attempt":1,"payload":{{"name":"Acme","amount":12}},"outputs":{outputs}}}"#
        );
        Task::new(serde_json::from_str(&text).unwrap())
    }

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Merchant {
        name: String,
        amount: u32,
    }

    #[test]
    fn payload_and_outputs_decode_into_the_handlers_types() {
        let t = task(r#"{"kyc":{"ok":true}}"#);
        let m: Merchant = t.payload().unwrap();
        assert_eq!(m.name, "Acme");
        let kyc: serde_json::Value = t.output_of("kyc").unwrap();
        assert_eq!(kyc["ok"], true);
        assert!(t.lease_expires_at().is_some());
        let missing = t.output_of::<serde_json::Value>("nope").unwrap_err();
        assert!(!missing.is_retryable(), "{missing}");
        let misfit = t.payload::<Vec<u8>>().unwrap_err();
        assert!(!misfit.is_retryable(), "{misfit}");
    }

    #[test]
    fn plain_errors_are_retryable_and_texts_are_cut_to_the_limit() {
        fn parse() -> Result<u32, TaskError> {
            Ok("x".parse::<u32>()?)
        }
        let e = parse().unwrap_err();
        assert!(e.is_retryable());
        assert!(e.message().contains("invalid digit"));
        let long = TaskError::fatal("é".repeat(3000));
        assert!(long.report_text().len() <= ERROR_LEN_MAX);
        assert_eq!(
            TaskError::retryable("busy")
                .retry_after(Duration::from_secs(2))
                .retry_after_ms(),
            Some(2000)
        );
        assert_eq!(
            TaskError::fatal("no")
                .retry_after(Duration::from_secs(2))
                .retry_after_ms(),
            None
        );
    }
}
