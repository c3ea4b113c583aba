//! Conformance tests of entity dependencies: references checked at
//! create, dependents that wait and are released or failed by the
//! resolver, chains, retries.

use std::sync::Arc;

use super::*;
use crate::deps::{Reference, RefusalReason};

/// A `single` entity that references `parents` (field `p0`, `p1`, ...).
fn dependent(parents: &[(EntityId, &str)]) -> NewEntity {
    NewEntity {
        refs: parents
            .iter()
            .enumerate()
            .map(|(i, (id, type_name))| Reference {
                field: format!("p{i}"),
                type_name: (*type_name).into(),
                id: *id,
            })
            .collect(),
        ..new_entity("single", "{}")
    }
}

/// Gives outbox rows their positions (a shared store's readers need it)
/// and runs resolver rounds until one changes nothing.
async fn resolve(store: &dyn Store, now_us: UnixMicros) -> usize {
    let mut changed = 0;
    loop {
        while store.fan_out(512, now_us).await.expect("fan out").rows >= 512 {}
        let round = store.resolve_dependencies(now_us).await.expect("resolve");
        changed += round.changed;
        if round.changed == 0 && !round.more {
            return changed;
        }
    }
}

/// Claims the one due step of `single` entity `id` and finishes it.
async fn run_single(store: &dyn Store, id: EntityId, outcome: Outcome, now_us: UnixMicros) {
    let batch = claim(store, now_us, 100).await;
    let attempt = batch
        .attempts
        .iter()
        .find(|a| a.entity_id == id)
        .unwrap_or_else(|| panic!("no attempt of {id} in {batch:?}"));
    finish(store, attempt, outcome, now_us).await;
}

fn last_status_change(events: &[HistoryEvent]) -> &HistoryEvent {
    events
        .iter()
        .rev()
        .find(|e| e.kind == "status_changed")
        .expect("a status change")
}

pub async fn dependents_wait_then_run_once_their_parent_is_ready(store: Arc<dyn Store>) {
    let store = &*store;
    let ready_parent = create(store, new_entity("single", "{}"), T0).await;
    run_single(store, ready_parent.id, succeeded(None), T0).await;
    let parent = create(store, new_entity("single", "{}"), T0).await;
    let child = create(
        store,
        dependent(&[(parent.id, "single"), (ready_parent.id, "single")]),
        T0,
    )
    .await;
    assert_eq!(child.deps.len(), 2);
    assert_eq!(child.deps[0].status, EntityStatus::Pending);
    assert_eq!(child.deps[1].status, EntityStatus::Ready);
    assert_eq!(child.waiting_for().map(|d| d.id), Some(parent.id));
    assert_eq!(statuses(&child), vec![("only", StepStatus::Blocked)]);
    assert_eq!(
        get(store, child.id).await.deps,
        child.deps,
        "stored as answered"
    );

    // Only the parent's step is due; the child waits without a timer.
    let batch = claim(store, T0, 100).await;
    assert_eq!(batch.attempts.len(), 1, "{batch:?}");
    assert_eq!(batch.attempts[0].entity_id, parent.id);
    assert_eq!(resolve(store, T0).await, 0, "nothing settled yet");
    finish(store, &batch.attempts[0], succeeded(None), T0 + 1).await;
    assert_eq!(get(store, child.id).await.status, EntityStatus::Pending);
    assert_eq!(
        statuses(&get(store, child.id).await),
        vec![("only", StepStatus::Blocked)],
        "released only by the resolver"
    );

    assert_eq!(resolve(store, T0 + 2).await, 1);
    let released = get(store, child.id).await;
    assert_eq!(statuses(&released), vec![("only", StepStatus::Queued)]);
    assert_eq!(released.waiting_for(), None);
    assert!(released
        .deps
        .iter()
        .all(|d| d.status == EntityStatus::Ready));
    assert!(kinds(&events(store, child.id).await).contains(&"dependency_ready"));
    assert_eq!(
        resolve(store, T0 + 3).await,
        0,
        "a second round tells nobody twice"
    );
    run_single(store, child.id, succeeded(None), T0 + 4).await;
    assert_eq!(get(store, child.id).await.status, EntityStatus::Ready);
}

pub async fn references_that_do_not_hold_are_refused(store: Arc<dyn Store>) {
    let store = &*store;
    let failed_parent = create(store, new_entity("single", "{}"), T0).await;
    run_single(store, failed_parent.id, failed("no", false, None), T0).await;
    let cancelled = create(store, new_entity("single", "{}"), T0).await;
    store
        .cancel(TENANT, cancelled.id, T0)
        .await
        .expect("cancel");
    let other_type = create(store, new_entity("backoff", "{}"), T0).await;
    let mut other_tenant = new_entity("single", "{}");
    other_tenant.tenant = OTHER_TENANT.into();
    let other_tenant = create(store, other_tenant, T0).await;
    let cases = [
        (EntityId::new_v7(), "not_found"),
        (failed_parent.id, "failed"),
        (cancelled.id, "cancelled"),
        (other_type.id, "wrong_type"),
        (other_tenant.id, "not_found"),
    ];
    for (parent, reason) in cases {
        let mut e = dependent(&[(parent, "single")]);
        e.idempotency_key = Some(format!("k-{reason}-{parent}"));
        let id = e.id;
        match store.create(e.clone(), T0 + 1).await.expect("create") {
            IntakeOutcome::ReferenceRefused(r) => {
                assert_eq!(r.reason.as_str(), reason, "{parent}");
                assert_eq!(r.field, "p0");
                if reason == "wrong_type" {
                    assert_eq!(r.reason, RefusalReason::WrongType("backoff".into()));
                }
            }
            other => panic!("{reason}: expected a refusal, got {other:?}"),
        }
        assert_eq!(
            store.get(TENANT, id).await.expect("get"),
            None,
            "nothing written"
        );
        // The key was not taken: the same key creates once the body holds.
        let fine = NewEntity {
            refs: Vec::new(),
            ..e
        };
        create(store, fine, T0 + 2).await;
    }
}

pub async fn a_failed_parent_fails_its_dependents_down_a_chain(store: Arc<dyn Store>) {
    let store = &*store;
    let root = create(store, new_entity("single", "{}"), T0).await;
    let mut chain = vec![root.id];
    for _ in 0..3 {
        let last = *chain.last().expect("a link");
        chain.push(create(store, dependent(&[(last, "single")]), T0).await.id);
    }
    run_single(store, root.id, failed("bad data", false, None), T0 + 1).await;
    assert_eq!(resolve(store, T0 + 2).await, 3, "the failure cascades");
    for pair in chain.windows(2) {
        let (parent, child) = (pair[0], pair[1]);
        let record = get(store, child).await;
        assert_eq!(record.status, EntityStatus::Failed);
        assert_eq!(record.failed_dependency().map(|d| d.id), Some(parent));
        assert_eq!(statuses(&record), vec![("only", StepStatus::Skipped)]);
        let history = events(store, child).await;
        let change = last_status_change(&history);
        assert_eq!(change.detail["cause"], "dependency_failed");
        assert_eq!(change.detail["dependency"]["id"], parent.to_string());
        assert!(kinds(&history).contains(&"dependency_failed"));
    }

    // The root, retried and ready, does not revive its failed dependents.
    let retried = store.retry(TENANT, root.id, T0 + 3).await.expect("retry");
    assert!(matches!(retried, CommandOutcome::Applied(_)), "{retried:?}");
    run_single(store, root.id, succeeded(None), T0 + 4).await;
    assert_eq!(resolve(store, T0 + 5).await, 0);
    assert_eq!(get(store, chain[1]).await.status, EntityStatus::Failed);
}

pub async fn a_retried_dependent_checks_its_references_again(store: Arc<dyn Store>) {
    let store = &*store;
    let parent = create(store, new_entity("single", "{}"), T0).await;
    let child = create(store, dependent(&[(parent.id, "single")]), T0).await;
    run_single(store, parent.id, failed("no", false, None), T0 + 1).await;
    resolve(store, T0 + 2).await;
    assert_eq!(get(store, child.id).await.status, EntityStatus::Failed);

    match store.retry(TENANT, child.id, T0 + 3).await.expect("retry") {
        CommandOutcome::DependencyNotReady(r) => {
            assert_eq!(r.id, parent.id);
            assert_eq!(r.reason.as_str(), "failed");
        }
        other => panic!("expected a refused retry, got {other:?}"),
    }
    assert_eq!(get(store, child.id).await.status, EntityStatus::Failed);

    // Once the parent is retried, the child may be: it waits again.
    store.retry(TENANT, parent.id, T0 + 4).await.expect("retry");
    let retried = store.retry(TENANT, child.id, T0 + 5).await.expect("retry");
    let CommandOutcome::Applied(record) = retried else {
        panic!("expected the retry applied, got {retried:?}");
    };
    assert_eq!(record.status, EntityStatus::Pending);
    assert_eq!(record.waiting_for().map(|d| d.id), Some(parent.id));
    assert_eq!(statuses(&record), vec![("only", StepStatus::Blocked)]);
    run_single(store, parent.id, succeeded(None), T0 + 6).await;
    assert_eq!(resolve(store, T0 + 7).await, 1);
    run_single(store, child.id, succeeded(None), T0 + 8).await;
    assert_eq!(get(store, child.id).await.status, EntityStatus::Ready);

    // A dependent retried after its parent became ready runs at once.
    let parent = create(store, new_entity("single", "{}"), T0 + 9).await;
    let child = create(store, dependent(&[(parent.id, "single")]), T0 + 9).await;
    store
        .cancel(TENANT, child.id, T0 + 10)
        .await
        .expect("cancel");
    run_single(store, parent.id, succeeded(None), T0 + 11).await;
    assert_eq!(
        resolve(store, T0 + 12).await,
        0,
        "a cancelled dependent waits for nothing"
    );
}

pub async fn a_cancelled_parent_fails_its_dependents(store: Arc<dyn Store>) {
    let store = &*store;
    let parent = create(store, new_entity("single", "{}"), T0).await;
    let child = create(store, dependent(&[(parent.id, "single")]), T0).await;
    store
        .cancel(TENANT, parent.id, T0 + 1)
        .await
        .expect("cancel");
    assert_eq!(resolve(store, T0 + 2).await, 1);
    let record = get(store, child.id).await;
    assert_eq!(record.status, EntityStatus::Failed);
    assert_eq!(
        record.failed_dependency().map(|d| d.status),
        Some(EntityStatus::Cancelled)
    );
}

pub async fn pruning_keeps_what_the_resolver_has_not_read(store: Arc<dyn Store>) {
    let store = &*store;
    let parent = create(store, new_entity("single", "{}"), T0).await;
    let child = create(store, dependent(&[(parent.id, "single")]), T0).await;
    run_single(store, parent.id, succeeded(None), T0 + 1).await;
    // A later row, so that the parent's settling is not the newest one
    // (which pruning always keeps).
    create(store, new_entity("backoff", "{}"), T0 + 1).await;
    // Every row is old and fanned out, but the resolver has not read the
    // parent's settling yet: pruning leaves it.
    store.fan_out(512, T0 + 2).await.expect("fan out");
    let later = T0 + 3_600 * SECOND_US;
    store.prune_outbox(later, 1_000).await.expect("prune");
    assert_eq!(resolve(store, later).await, 1);
    assert_eq!(
        statuses(&get(store, child.id).await),
        vec![("only", StepStatus::Queued)]
    );
}

pub async fn the_dependents_waiting_for_one_entity_are_bounded(store: Arc<dyn Store>) {
    let store = &*store;
    let max = crate::deps::WAITING_DEPENDENTS_MAX as usize;
    let parent = create(store, new_entity("single", "{}"), T0).await;
    let mut waiting = Vec::with_capacity(max);
    for _ in 0..max / 100 {
        let creates = (0..100).map(|_| store.create(dependent(&[(parent.id, "single")]), T0));
        for outcome in futures_util::future::join_all(creates).await {
            match outcome.expect("create") {
                IntakeOutcome::Created(r) => waiting.push(r.id),
                other => panic!("expected Created, got {other:?}"),
            }
        }
    }
    match store
        .create(dependent(&[(parent.id, "single")]), T0)
        .await
        .expect("create")
    {
        IntakeOutcome::ReferenceRefused(r) => {
            assert_eq!(r.reason, RefusalReason::TooManyDependents)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Once it is ready, the resolver releases them all over several
    // rounds, and new dependents no longer wait.
    run_single(store, parent.id, succeeded(None), T0 + 1).await;
    assert_eq!(resolve(store, T0 + 2).await, max);
    for id in [waiting[0], waiting[max - 1]] {
        assert_eq!(
            statuses(&get(store, id).await),
            vec![("only", StepStatus::Queued)]
        );
    }
    let late = create(store, dependent(&[(parent.id, "single")]), T0 + 3).await;
    assert_eq!(statuses(&late), vec![("only", StepStatus::Queued)]);
}
