//! Every decision of the working set, without a database.

use super::*;
use crate::suite::{catalog, T0, TIMEOUT_MS};
use ripen_core::HTTP_QUEUE;
use serde_json::{json, Value};

const SCORING: &str = "worker:scoring";
const MS: i64 = 1_000;

/// A jitter that always draws the middle.
fn ctxs() -> CtxSource {
    CtxSource::new(500, Jitter::fixed(0.5))
}

fn submission(type_name: &str, key: Option<&str>, payload: &str) -> NewEntity {
    NewEntity {
        id: EntityId::new_v7(),
        tenant: crate::DEFAULT_TENANT.into(),
        type_name: type_name.into(),
        version: 1,
        payload: payload.into(),
        idempotency_key: key.map(str::to_owned),
        refs: Vec::new(),
    }
}

/// A freshly created entity, as a backend would load it.
fn fresh(type_name: &str) -> Working {
    let catalog = catalog();
    let pipeline = catalog.get(type_name, 1).expect("pipeline").clone();
    let rows = NewRows::new(&pipeline, &submission(type_name, None, "{}"), T0);
    let n = rows.record.steps.len();
    Working::new(
        &catalog,
        Stored {
            record: rows.record,
            next_seq: rows.next_seq,
            outputs: vec![None; n],
            extra: (),
        },
    )
    .expect("working")
}

fn status(w: &Working, step: usize) -> StepStatus {
    w.state().steps[step].status
}

fn success(w: &Working, step: usize, output: Option<&str>) -> Completion {
    Completion {
        entity_id: w.id(),
        step,
        epoch: w.state().steps[step].epoch,
        outcome: Outcome::Succeeded {
            output: output.map(str::to_owned),
        },
    }
}

fn failure(w: &Working, step: usize, retryable: bool) -> Completion {
    Completion {
        entity_id: w.id(),
        step,
        epoch: w.state().steps[step].epoch,
        outcome: Outcome::Failed {
            error: "boom".into(),
            retryable,
            retry_after_ms: None,
        },
    }
}

fn flushed(w: &mut Working, now_us: UnixMicros) -> Rows {
    let mut rows = Rows::default();
    w.flush(now_us, &mut rows);
    rows
}

fn kinds(rows: &Rows) -> Vec<&str> {
    rows.events.iter().map(|e| e.event.kind.as_str()).collect()
}

#[test]
fn claims_take_the_earliest_due_steps_of_the_queue_up_to_the_limit() {
    let mut entities = vec![fresh("w5"), fresh("w5"), fresh("w5")];
    // The second entity's first step became due earlier than the others'.
    entities[1].state.steps[0].due_at_us = Some(T0 - 10 * MS);
    entities[2].state.steps[0].due_at_us = Some(T0 + 10 * MS);
    let claimed = claim_due(&mut entities, &Claim::local(HTTP_QUEUE, 1), &ctxs(), T0);
    assert_eq!(claimed, 1);
    assert_eq!(status(&entities[1], 0), StepStatus::Running);
    assert_eq!(status(&entities[0], 0), StepStatus::Queued);
    // Not yet due: never claimed, whatever the limit.
    let claimed = claim_due(&mut entities, &Claim::local(HTTP_QUEUE, 10), &ctxs(), T0);
    assert_eq!(claimed, 1);
    assert_eq!(status(&entities[0], 0), StepStatus::Running);
    assert_eq!(status(&entities[2], 0), StepStatus::Queued);
    assert!(entities.iter().take(2).all(|w| w.has_claims()));
}

#[test]
fn claims_serve_only_the_queue_asked_for() {
    let mut w = vec![fresh("mixed")];
    assert_eq!(
        claim_due(&mut w, &Claim::local(SCORING, 10), &ctxs(), T0),
        0
    );
    assert_eq!(
        claim_due(&mut w, &Claim::local(HTTP_QUEUE, 10), &ctxs(), T0),
        1
    );
    let done = success(&w[0], 0, None);
    // The HTTP consumer records the result: the worker step it unblocked is
    // left for the workers' queue.
    let results = complete(
        &mut w,
        &[done],
        Some(HTTP_QUEUE),
        &ctxs(),
        &Tally::default(),
        T0,
    );
    assert_eq!(results, vec![CompletionResult::Applied]);
    assert_eq!(status(&w[0], 1), StepStatus::Queued);
    assert_eq!(
        claim_due(&mut w, &Claim::local(HTTP_QUEUE, 10), &ctxs(), T0),
        0
    );
    assert_eq!(
        claim_due(&mut w, &Claim::local(SCORING, 10), &ctxs(), T0),
        1
    );
    assert_eq!(status(&w[0], 1), StepStatus::Running);
}

#[test]
fn an_expired_lease_is_lost_then_claimed_again() {
    let mut w = vec![fresh("single")];
    claim_due(&mut w, &Claim::local(HTTP_QUEUE, 1), &ctxs(), T0);
    let lease = w[0].state().steps[0].due_at_us.expect("lease");
    assert_eq!(lease, T0 + (TIMEOUT_MS as i64 + 500) * MS);
    // Before the lease runs out the step is not due at all.
    assert_eq!(
        claim_due(&mut w, &Claim::local(HTTP_QUEUE, 1), &ctxs(), lease - 1),
        0
    );
    // After it, the attempt is lost (it counts) and the step, without
    // backoff, is claimed again at once with a new epoch.
    assert_eq!(
        claim_due(&mut w, &Claim::local(HTTP_QUEUE, 1), &ctxs(), lease),
        1
    );
    let s = &w[0].state().steps[0];
    assert_eq!((s.status, s.attempts, s.epoch), (StepStatus::Running, 2, 2));
    let rows = flushed(&mut w[0], lease);
    assert_eq!(
        kinds(&rows),
        [
            "step_started",
            "attempt_failed",
            "retry_scheduled",
            "step_started"
        ]
    );
    assert_eq!(rows.events[1].event.detail["lost"], "lease_expired");
}

#[test]
fn a_lost_lease_with_backoff_waits_for_a_later_pass() {
    let mut w = vec![fresh("w5")];
    claim_due(&mut w, &Claim::local(HTTP_QUEUE, 1), &ctxs(), T0);
    let lease = w[0].state().steps[0].due_at_us.expect("lease");
    assert_eq!(
        claim_due(&mut w, &Claim::local(HTTP_QUEUE, 1), &ctxs(), lease),
        0
    );
    assert_eq!(status(&w[0], 0), StepStatus::Retrying);
    let due = w[0].state().steps[0].due_at_us.expect("backoff");
    assert_eq!(due, lease + 500 * MS, "half of the 1 s ceiling");
}

#[test]
fn results_apply_once_and_stale_ones_are_counted() {
    let tally = Tally::default();
    let mut w = vec![fresh("single")];
    claim_due(&mut w, &Claim::local(HTTP_QUEUE, 1), &ctxs(), T0);
    let done = success(&w[0], 0, Some(r#"{"ok":true}"#));
    let mut stale = done.clone();
    stale.epoch += 7;
    let mut unknown = done.clone();
    unknown.entity_id = EntityId::new_v7();
    let results = complete(
        &mut w,
        &[stale, done.clone(), done, unknown],
        Some(HTTP_QUEUE),
        &ctxs(),
        &tally,
        T0 + MS,
    );
    use CompletionResult::{Applied, Stale};
    assert_eq!(results, vec![Stale, Applied, Stale, Stale]);
    assert_eq!(tally.stale_completions(), 3);
    assert_eq!(w[0].state().status, EntityStatus::Ready);
}

#[test]
fn results_claim_what_they_unblock_in_the_claim_queue_only() {
    let mut w = vec![fresh("w5")];
    claim_due(&mut w, &Claim::local(HTTP_QUEUE, 10), &ctxs(), T0);
    let _ = flushed(&mut w[0], T0);
    let a = w[0].take_attempts("{}").expect("attempts");
    assert_eq!(a.len(), 1);
    let done = success(&w[0], 0, Some("1"));
    complete(
        &mut w,
        std::slice::from_ref(&done),
        None,
        &ctxs(),
        &Tally::default(),
        T0,
    );
    // Without a claim queue, the unblocked steps wait to be claimed.
    use StepStatus::{Blocked, Queued};
    let waiting: Vec<StepStatus> = (1..5).map(|i| status(&w[0], i)).collect();
    assert_eq!(waiting, [Queued, Queued, Blocked, Queued], "b, c, d, e");
    assert!(!w[0].has_claims());
    let mut again = vec![fresh("w5")];
    claim_due(&mut again, &Claim::local(HTTP_QUEUE, 10), &ctxs(), T0);
    let _ = flushed(&mut again[0], T0);
    let _ = again[0].take_attempts("{}");
    let done = success(&again[0], 0, Some("1"));
    complete(
        &mut again,
        &[done],
        Some(HTTP_QUEUE),
        &ctxs(),
        &Tally::default(),
        T0,
    );
    let _ = flushed(&mut again[0], T0);
    let attempts = again[0].take_attempts("{\"p\":1}").expect("attempts");
    let steps: Vec<&str> = attempts.iter().map(|a| a.step_name.as_str()).collect();
    assert_eq!(steps, ["b", "c", "e"]);
    for a in &attempts {
        assert_eq!(a.payload, "{\"p\":1}");
        assert_eq!(a.outputs, vec![("a".to_owned(), "1".to_owned())]);
        assert_eq!(a.attempt, 1);
    }
}

#[test]
fn recovery_loses_every_running_attempt() {
    let mut w = vec![fresh("w5")];
    claim_due(&mut w, &Claim::local(HTTP_QUEUE, 10), &ctxs(), T0);
    let done = success(&w[0], 0, None);
    complete(
        &mut w,
        &[done],
        Some(HTTP_QUEUE),
        &ctxs(),
        &Tally::default(),
        T0,
    );
    assert_eq!(w[0].recover(&ctxs(), T0 + MS), 3);
    assert!(w[0]
        .state()
        .steps
        .iter()
        .all(|s| s.status != StepStatus::Running));
    let rows = flushed(&mut w[0], T0 + MS);
    let lost: Vec<&Value> = rows
        .events
        .iter()
        .filter(|e| e.event.kind == "attempt_failed")
        .map(|e| &e.event.detail["lost"])
        .collect();
    assert_eq!(lost, [&json!("node_restarted"); 3]);
}

#[test]
fn operator_commands_apply_or_name_the_refusing_status() {
    let mut w = fresh("single");
    assert_eq!(
        w.command(Input::Retry, &ctxs(), T0).expect("retry"),
        Some(EntityStatus::Pending)
    );
    assert!(!w.is_dirty(), "a refused command changes nothing");
    assert_eq!(w.command(Input::Cancel, &ctxs(), T0).expect("cancel"), None);
    let rows = flushed(&mut w, T0 + MS);
    assert_eq!(kinds(&rows), ["status_changed", "step_skipped"]);
    assert_eq!(rows.outbox.len(), 1);
    match command_outcome(w, None) {
        CommandOutcome::Applied(r) => assert_eq!(r.status, EntityStatus::Cancelled),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_flush_writes_only_what_changed_and_numbers_the_history_on() {
    let mut w = vec![fresh("w5")];
    assert!(flushed(&mut w[0], T0).is_empty(), "nothing changed yet");
    claim_due(&mut w, &Claim::local(HTTP_QUEUE, 10), &ctxs(), T0);
    let rows = flushed(&mut w[0], T0 + MS);
    assert_eq!(rows.steps.len(), 1, "only the claimed step");
    assert_eq!(
        rows.steps[0].output, None,
        "a claim leaves the output alone"
    );
    assert_eq!(rows.entities.len(), 1);
    assert_eq!(rows.entities[0].next_seq, 3);
    assert_eq!(rows.events[0].event.seq, 2, "created was 1");
    assert!(rows.outbox.is_empty(), "a claim is no status change");
    assert!(rows.woken.is_empty(), "a claim makes nothing runnable");

    let done = success(&w[0], 0, Some(r#"{"id":7}"#));
    complete(
        &mut w,
        &[done],
        None,
        &ctxs(),
        &Tally::default(),
        T0 + 2 * MS,
    );
    let rows = flushed(&mut w[0], T0 + 2 * MS);
    let a = rows.steps.iter().find(|s| s.idx == 0).expect("a");
    assert_eq!(a.output, Some(Some(r#"{"id":7}"#.to_owned())));
    assert_eq!(rows.steps.len(), 4, "a and the three steps it unblocked");
    assert_eq!(rows.woken, [HTTP_QUEUE], "steps became runnable");
    assert_eq!(rows.events[0].event.seq, 3);
    assert_eq!(w[0].record().steps[0].state.status, StepStatus::Succeeded);
}

#[test]
fn history_times_never_go_back() {
    let mut w = vec![fresh("single")];
    claim_due(&mut w, &Claim::local(HTTP_QUEUE, 1), &ctxs(), T0 + 5 * MS);
    let rows = flushed(&mut w[0], T0 + 5 * MS);
    assert_eq!(rows.events[0].event.at_us, T0 + 5 * MS);
    // A result whose caller read the clock earlier, before it queued.
    let done = success(&w[0], 0, None);
    complete(&mut w, &[done], None, &ctxs(), &Tally::default(), T0 + MS);
    let rows = flushed(&mut w[0], T0 + MS);
    assert!(rows.events.iter().all(|e| e.event.at_us == T0 + 5 * MS));
    assert_eq!(rows.entities[0].updated_at_us, T0 + 5 * MS);
}

#[test]
fn status_changes_and_degradation_reach_the_outbox() {
    let mut w = vec![fresh("w5")];
    let run = |w: &mut Vec<Working>, step: usize, ok: bool, now: UnixMicros| {
        let c = if ok {
            success(&w[0], step, None)
        } else {
            failure(&w[0], step, false)
        };
        complete(w, &[c], Some(HTTP_QUEUE), &ctxs(), &Tally::default(), now);
    };
    claim_due(&mut w, &Claim::local(HTTP_QUEUE, 10), &ctxs(), T0);
    run(&mut w, 0, true, T0);
    run(&mut w, 1, true, T0);
    run(&mut w, 2, true, T0);
    run(&mut w, 3, true, T0);
    let rows = flushed(&mut w[0], T0);
    let outbox: Vec<&str> = rows.outbox.iter().map(|o| o.kind.as_str()).collect();
    assert_eq!(outbox, ["status_changed"], "ready");
    // The non-critical step fails for good after ready: the entity degrades,
    // and subscribers hear of it.
    run(&mut w, 4, false, T0 + MS);
    let rows = flushed(&mut w[0], T0 + MS);
    assert_eq!(kinds(&rows), ["attempt_failed", "step_failed", "degraded"]);
    assert_eq!(rows.outbox.len(), 1);
    let o = &rows.outbox[0];
    assert_eq!(o.kind, "degraded");
    assert_eq!(o.seq, rows.events[2].event.seq);
    let body: Value = serde_json::from_str(&o.body).expect("json");
    assert_eq!(body["detail"], json!({"degraded": true, "step": "e"}));
    assert!(w[0].record().degraded);
    assert_eq!(w[0].record().status, EntityStatus::Ready);
}

#[test]
fn repeated_keys_point_at_their_first_holder_within_scope() {
    let a = submission("w5", Some("k"), "1");
    let b = submission("w5", Some("k"), "2");
    let other_type = submission("single", Some("k"), "1");
    let mut other_tenant = submission("w5", Some("k"), "1");
    other_tenant.tenant = "other".into();
    let unkeyed = submission("w5", None, "1");
    let c = submission("w5", Some("k"), "1");
    let batch = [&a, &b, &other_type, &other_tenant, &unkeyed, &unkeyed, &c];
    assert_eq!(
        repeated_keys(&batch),
        [None, Some(0), None, None, None, None, Some(0)]
    );
}

#[test]
fn a_replay_needs_the_same_bytes() {
    let first = submission("w5", Some("k"), r#"{"a":1}"#);
    let rows = NewRows::new(catalog().get("w5", 1).expect("w5"), &first, T0);
    let same = submission("w5", Some("k"), r#"{"a":1}"#);
    let spaced = submission("w5", Some("k"), r#"{"a": 1}"#);
    assert!(matches!(
        replay(&rows.record, Some(&first.payload), &same),
        IntakeOutcome::Replayed(r) if r.id == first.id
    ));
    assert_eq!(
        replay(&rows.record, Some(&first.payload), &spaced),
        IntakeOutcome::KeyReused {
            entity_id: first.id
        }
    );
}

#[test]
fn new_rows_hold_the_initial_state_and_the_created_event() {
    let e = submission("mixed", None, "{}");
    let rows = NewRows::new(catalog().get("mixed", 1).expect("mixed"), &e, T0);
    assert_eq!(rows.queues, [HTTP_QUEUE, SCORING, HTTP_QUEUE]);
    assert_eq!((rows.created.seq, rows.next_seq), (1, 2));
    let statuses: Vec<StepStatus> = rows.record.steps.iter().map(|s| s.state.status).collect();
    assert_eq!(
        statuses,
        [StepStatus::Queued, StepStatus::Blocked, StepStatus::Blocked]
    );
    assert_eq!(rows.record.steps[0].state.due_at_us, Some(T0));
    assert_eq!(rows.detail, rows.created.detail.to_string());
}

#[test]
fn the_fast_outbox_body_matches_the_simple_encoder() {
    let mut e = submission("w5", None, "{}");
    e.tenant = "t\"en\\ant\u{1}é".into();
    let rows = NewRows::new(catalog().get("w5", 1).expect("w5"), &e, T0);
    let event = &rows.created;
    let reference = json!({
        "entity_id": e.id.to_string(),
        "tenant": e.tenant,
        "type": "w5",
        "version": 1,
        "seq": event.seq,
        "at_us": event.at_us,
        "kind": event.kind,
        "detail": event.detail,
    });
    assert_eq!(rows.outbox_body, reference.to_string());
}

#[test]
fn a_stored_entity_must_match_its_pipeline() {
    let catalog = catalog();
    let w = fresh("w5");
    let mut record = w.record().clone();
    record.steps.pop();
    let err = Working::new(
        &catalog,
        Stored {
            record: record.clone(),
            next_seq: 2,
            outputs: vec![None; 4],
            extra: (),
        },
    )
    .expect_err("a step is missing");
    assert!(matches!(err, StoreError::Internal(_)), "{err:?}");
    record.type_name = "gone".into();
    let err = Working::new(
        &catalog,
        Stored {
            record,
            next_seq: 2,
            outputs: vec![None; 4],
            extra: (),
        },
    )
    .expect_err("no such pipeline");
    assert!(matches!(err, StoreError::UnknownPipeline { .. }), "{err:?}");
}

/// Claims the `score` step of a fresh `mixed` entity for worker `w1`.
fn scoring_claimed() -> Vec<Working> {
    let mut w = vec![fresh("mixed")];
    claim_due(&mut w, &Claim::local(HTTP_QUEUE, 10), &ctxs(), T0);
    let done = success(&w[0], 0, None);
    complete(&mut w, &[done], None, &ctxs(), &Tally::default(), T0);
    let claim = Claim::by(SCORING, 10, Some("w1"));
    assert_eq!(claim_due(&mut w, &claim, &ctxs(), T0), 1);
    w
}

#[test]
fn a_named_claim_records_its_holder_until_the_attempt_ends() {
    let mut w = scoring_claimed();
    assert_eq!(w[0].state().steps[1].holder.as_deref(), Some("w1"));
    let rows = flushed(&mut w[0], T0);
    let started = rows
        .events
        .iter()
        .find(|e| e.event.kind == "step_started" && e.event.step.as_deref() == Some("score"))
        .expect("score started");
    assert_eq!(started.event.detail["worker"], "w1");
    let done = success(&w[0], 1, None);
    complete(&mut w, &[done], None, &ctxs(), &Tally::default(), T0 + MS);
    assert_eq!(w[0].state().steps[1].holder, None, "not running any more");
}

#[test]
fn a_heartbeat_extends_a_live_lease_and_writes_no_history() {
    let mut w = scoring_claimed();
    flushed(&mut w[0], T0);
    let epoch = w[0].state().steps[1].epoch;
    let lease_ms = (TIMEOUT_MS + 500) as i64;
    let beat = Heartbeat {
        entity_id: w[0].id(),
        step: 1,
        epoch,
    };
    let later = T0 + 700 * MS;
    let leases = heartbeat(&mut w, &[beat], &ctxs(), later);
    assert_eq!(leases, vec![Some(later + lease_ms * MS)]);
    let rows = flushed(&mut w[0], later);
    assert!(rows.events.is_empty(), "a heartbeat is not history");
    assert_eq!(rows.entities.len(), 1, "the moved lease is written");
    let step = rows.steps.iter().find(|s| s.idx == 1).expect("score row");
    assert_eq!(step.state.due_at_us, Some(later + lease_ms * MS));
    assert_eq!(
        rows.due,
        vec![DueRow {
            entity_id: w[0].id(),
            queue: SCORING.into(),
            from: Some(T0 + lease_ms * MS),
            to: Some(later + lease_ms * MS),
        }],
        "the queue's timer moves with the lease"
    );
}

#[test]
fn a_heartbeat_does_not_hold_for_a_stale_epoch_an_expired_lease_or_an_unknown_entity() {
    let mut w = scoring_claimed();
    flushed(&mut w[0], T0);
    let s = w[0].state().steps[1].clone();
    let beat = |entity_id, epoch| Heartbeat {
        entity_id,
        step: 1,
        epoch,
    };
    let id = w[0].id();
    let expiry = s.due_at_us.expect("lease");
    let answers = heartbeat(
        &mut w,
        &[
            beat(id, s.epoch + 1),
            beat(EntityId::new_v7(), s.epoch),
            beat(id, s.epoch),
        ],
        &ctxs(),
        expiry,
    );
    assert_eq!(answers, vec![None, None, None]);
    assert!(!w[0].is_dirty(), "nothing changed");
}

#[test]
fn a_restart_keeps_the_leases_of_remote_workers() {
    let mut w = scoring_claimed();
    claim_due(&mut w, &Claim::local(HTTP_QUEUE, 10), &ctxs(), T0);
    let lost = w[0].recover(&ctxs(), T0 + MS);
    assert_eq!(lost, 0, "the worker outlives the node");
    assert_eq!(status(&w[0], 1), StepStatus::Running);
    // Its lease still runs out by itself.
    let expiry = w[0].state().steps[1].due_at_us.expect("lease");
    assert_eq!(
        claim_due(&mut w, &Claim::local(SCORING, 10), &ctxs(), expiry),
        1
    );
    assert_eq!(w[0].state().steps[1].attempts, 2);
    assert_eq!(w[0].state().steps[1].holder, None, "an unnamed claim");
}

#[test]
fn a_flush_names_the_queues_that_got_runnable_work() {
    let mut w = vec![fresh("mixed")];
    claim_due(&mut w, &Claim::local(HTTP_QUEUE, 10), &ctxs(), T0);
    flushed(&mut w[0], T0);
    let done = success(&w[0], 0, None);
    complete(&mut w, &[done], None, &ctxs(), &Tally::default(), T0);
    let rows = flushed(&mut w[0], T0);
    assert_eq!(rows.woken, [SCORING]);
}
