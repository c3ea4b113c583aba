//! Conformance tests of retention: [`Store::prune`].

use super::*;
use crate::{Prune, Pruned};

fn payloads_before(before_us: UnixMicros) -> Prune {
    Prune {
        payload_before_us: Some(before_us),
        keys_before_us: None,
        entities_before_us: None,
        limit: 100,
        dry_run: false,
    }
}

fn keys_before(before_us: UnixMicros) -> Prune {
    Prune {
        payload_before_us: None,
        keys_before_us: Some(before_us),
        entities_before_us: None,
        limit: 100,
        dry_run: false,
    }
}

/// Runs the one step of a `single` entity to `outcome` at `at_us`.
async fn settle_single(store: &dyn Store, at_us: UnixMicros, outcome: Outcome) -> EntityRecord {
    let record = create(store, new_entity("single", "{\"n\":1}"), at_us).await;
    let batch = claim(store, at_us, 10).await;
    let a = batch
        .attempts
        .iter()
        .find(|a| a.entity_id == record.id)
        .expect("claimed");
    finish(store, a, outcome, at_us).await;
    get(store, record.id).await
}

/// A settled entity's payload is pruned once it last changed before the
/// bound, not before; a pending one never. The entity, its history and its
/// outputs stay; `get_data` says the payload is gone and when; a retry of a
/// failed one is refused; a dry run counts and removes nothing.
pub async fn payloads_are_pruned_when_settled_and_due(store: Arc<dyn Store>) {
    let store = &*store;
    let t1 = T0 + SECOND_US;
    let ready = settle_single(store, t1, succeeded(Some(json!({"ok": true})))).await;
    assert_eq!(ready.status, EntityStatus::Ready);
    let failed_one = settle_single(store, t1, failed("no", false, None)).await;
    assert_eq!(failed_one.status, EntityStatus::Failed);
    let pending = create(store, new_entity("backoff", "{\"p\":1}"), T0).await;

    // Not yet due: last changed at t1, the bound is t1 (exclusive).
    let none = store.prune(payloads_before(t1), t1).await.expect("prune");
    assert_eq!(none, Pruned::default());
    assert!(store
        .get_data(TENANT, ready.id)
        .await
        .expect("data")
        .expect("found")
        .payload
        .is_some());

    let dry = Prune {
        dry_run: true,
        ..payloads_before(t1 + 1)
    };
    assert_eq!(store.prune(dry, t1).await.expect("dry").payloads, 2);
    assert_eq!(
        store.prune(dry, t1).await.expect("dry again").payloads,
        2,
        "a dry run removes nothing"
    );

    let t2 = t1 + SECOND_US;
    let pruned = store
        .prune(payloads_before(t1 + 1), t2)
        .await
        .expect("prune");
    assert_eq!(pruned.payloads, 2, "the ready and the failed one");
    let again = store
        .prune(payloads_before(t2 * 2), t2)
        .await
        .expect("prune again");
    assert_eq!(again.payloads, 0, "a pending entity keeps its payload");

    let data = store
        .get_data(TENANT, ready.id)
        .await
        .expect("data")
        .expect("found");
    assert_eq!(data.payload, None);
    assert_eq!(data.record.payload_pruned_at_us, Some(t2));
    assert_eq!(data.record.status, EntityStatus::Ready);
    assert_eq!(
        data.outputs,
        vec![("only".to_owned(), json!({"ok": true}).to_string())],
        "outputs are kept"
    );
    assert_eq!(get(store, ready.id).await.payload_pruned_at_us, Some(t2));
    assert!(!events(store, ready.id).await.is_empty(), "history is kept");
    let kept = store
        .get_data(TENANT, pending.id)
        .await
        .expect("data")
        .expect("found");
    assert_eq!(kept.payload.as_deref(), Some("{\"p\":1}"));
    assert_eq!(kept.record.payload_pruned_at_us, None);

    assert_eq!(
        store.retry(TENANT, failed_one.id, t2).await.expect("retry"),
        CommandOutcome::PayloadPruned { at_us: t2 }
    );
    assert_eq!(get(store, failed_one.id).await.status, EntityStatus::Failed);
    // A ready entity is no retry's, pruned or not: its refusal says so.
    assert_eq!(
        store.retry(TENANT, ready.id, t2).await.expect("retry"),
        CommandOutcome::Conflict(EntityStatus::Ready)
    );
}

/// A ready entity whose non-critical step still runs keeps its payload
/// (the attempt carries it) until that step settles too.
pub async fn a_live_step_keeps_its_payload(store: Arc<dyn Store>) {
    let store = &*store;
    let record = create(store, new_entity("w5", "{\"w\":5}"), T0).await;
    let mut t = T0;
    let mut running = claim(store, t, 10).await.attempts;
    // Run everything but the non-critical `e` to success.
    let mut e = None;
    while let Some(a) = running.pop() {
        if a.step_name == "e" {
            e = Some(a);
            continue;
        }
        t += SECOND_US;
        running.extend(finish(store, &a, succeeded(None), t).await);
    }
    let e = e.expect("e was claimed");
    assert_eq!(get(store, record.id).await.status, EntityStatus::Ready);
    let far = t + 3_600 * SECOND_US;
    let pruned = store.prune(payloads_before(far), far).await.expect("prune");
    assert_eq!(pruned.payloads, 0, "e still runs");
    t += SECOND_US;
    finish(store, &e, succeeded(None), t).await;
    let pruned = store.prune(payloads_before(far), far).await.expect("prune");
    assert_eq!(pruned.payloads, 1, "now nothing runs");
}

/// A key expires exactly at its time: one stored at `t` is kept by a bound
/// of `t` and pruned by `t + 1`; after it, the key is free and a new
/// submission with it creates a new entity. Passes take at most `limit`.
pub async fn keys_expire_at_their_time_and_are_free_after(store: Arc<dyn Store>) {
    let store = &*store;
    let keyed = |key: &str| NewEntity {
        idempotency_key: Some(key.into()),
        ..new_entity("single", "{\"k\":1}")
    };
    let t1 = T0 + SECOND_US;
    let first = create(store, keyed("k1"), t1).await;
    create(store, keyed("k2"), t1 + 1).await;
    create(store, keyed("k3"), t1 + 2).await;
    assert!(matches!(
        store.create(keyed("k1"), t1 + 3).await.expect("replay"),
        IntakeOutcome::Replayed(_)
    ));

    assert_eq!(
        store.prune(keys_before(t1), t1).await.expect("prune").keys,
        0
    );
    let one = Prune {
        limit: 1,
        ..keys_before(t1 + 2)
    };
    assert_eq!(store.prune(one, t1).await.expect("prune").keys, 1, "k1");
    assert_eq!(store.prune(one, t1).await.expect("prune").keys, 1, "k2");
    assert_eq!(
        store.prune(one, t1).await.expect("prune").keys,
        0,
        "k3 is due later"
    );

    match store.create(keyed("k1"), t1 + 10).await.expect("reuse") {
        IntakeOutcome::Created(r) => assert_ne!(r.id, first.id, "a new entity"),
        other => panic!("an expired key is free: {other:?}"),
    }
    assert!(matches!(
        store.create(keyed("k3"), t1 + 11).await.expect("replay"),
        IntakeOutcome::Replayed(_)
    ));
    assert_eq!(get(store, first.id).await.id, first.id, "the entity stays");
}

/// Stats count every table's rows and name the oldest kept payload of a
/// settled entity, which pruning moves on.
pub async fn stats_count_tables_and_the_oldest_kept_payload(store: Arc<dyn Store>) {
    let store = &*store;
    let t1 = T0 + SECOND_US;
    let first = settle_single(store, t1, succeeded(None)).await;
    settle_single(store, t1 + SECOND_US, succeeded(None)).await;
    create(store, new_entity("backoff", "{}"), T0).await;
    let stats = store.stats().await.expect("stats");
    let rows = |name: &str| {
        stats
            .tables
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no table {name} in {stats:?}"))
            .rows
    };
    assert_eq!(rows("entities"), 3);
    assert_eq!(rows("payloads"), 3);
    assert_eq!(stats.oldest_kept_payload_us, Some(first.updated_at_us));
    assert!(stats.total_bytes.is_some_and(|b| b > 0), "{stats:?}");
    // Both backends can size tables (SQLite as built here has `dbstat`).
    let entities = stats.tables.iter().find(|t| t.name == "entities");
    assert!(
        entities.and_then(|t| t.bytes).is_some_and(|b| b > 0),
        "{stats:?}"
    );

    store
        .prune(payloads_before(t1 + 1), t1 + 2 * SECOND_US)
        .await
        .expect("prune");
    let stats = store.stats().await.expect("stats");
    assert_eq!(
        stats.oldest_kept_payload_us,
        Some(t1 + SECOND_US),
        "the first payload is gone"
    );
    assert_eq!(
        stats
            .tables
            .iter()
            .find(|t| t.name == "payloads")
            .map(|t| t.rows),
        Some(2)
    );
}

/// Settled entities are deleted entirely once due, and only once no key
/// and no outbox row names them: the entity, its data and its history are
/// gone, its key is free, a pending one stays.
pub async fn settled_entities_are_deleted_when_due(store: Arc<dyn Store>) {
    let store = &*store;
    let t1 = T0 + SECOND_US;
    let keyed = NewEntity {
        idempotency_key: Some("gone-key".into()),
        ..new_entity("single", "{\"k\":1}")
    };
    let doomed = create(store, keyed.clone(), t1).await;
    let a = claim(store, t1, 10)
        .await
        .attempts
        .into_iter()
        .find(|a| a.entity_id == doomed.id)
        .expect("claimed");
    finish(store, &a, succeeded(Some(json!({"out": 1}))), t1).await;
    let pending = create(store, new_entity("backoff", "{}"), T0).await;
    let later = t1 + 3_600 * SECOND_US;
    let all = Prune {
        payload_before_us: None,
        keys_before_us: Some(later),
        entities_before_us: Some(later),
        limit: 100,
        dry_run: false,
    };
    // Not before its time, and not while its key is kept.
    let early = store
        .prune(
            Prune {
                entities_before_us: Some(t1),
                keys_before_us: Some(t1),
                ..all
            },
            later,
        )
        .await
        .expect("prune");
    assert_eq!(early.entities, 0);
    let keys_kept = store
        .prune(
            Prune {
                keys_before_us: Some(t1),
                ..all
            },
            later,
        )
        .await
        .expect("prune");
    assert_eq!(keys_kept.entities, 0, "its key is still kept");
    assert!(store.get(TENANT, doomed.id).await.expect("get").is_some());

    // The outbox still names it: it stays until the outbox is pruned.
    let held = store.prune(all, later).await.expect("prune");
    assert_eq!((held.keys, held.entities), (1, 0), "{held:?}");
    store.fan_out(1_000, later).await.expect("fan out");
    store.resolve_dependencies(later).await.expect("resolve");
    // The outbox keeps its newest row: one more entity settles after.
    let last = create(store, new_entity("single", "{}"), later).await;
    let a = claim(store, later, 10)
        .await
        .attempts
        .into_iter()
        .find(|a| a.entity_id == last.id)
        .expect("claimed");
    finish(store, &a, succeeded(None), later).await;
    store.fan_out(1_000, later).await.expect("fan out");
    store.resolve_dependencies(later).await.expect("resolve");
    store
        .prune_outbox(later + 1, 10_000)
        .await
        .expect("prune the outbox");

    let dry = store
        .prune(
            Prune {
                dry_run: true,
                ..all
            },
            later,
        )
        .await
        .expect("dry");
    assert_eq!(dry.entities, 1, "{dry:?}");
    assert!(store.get(TENANT, doomed.id).await.expect("get").is_some());
    let gone = store.prune(all, later).await.expect("prune");
    assert_eq!(gone.entities, 1, "{gone:?}");
    assert_eq!(store.get(TENANT, doomed.id).await.expect("get"), None);
    assert_eq!(store.get_data(TENANT, doomed.id).await.expect("data"), None);
    assert_eq!(
        store
            .events(TENANT, doomed.id, 0, 100)
            .await
            .expect("events"),
        None
    );
    assert_eq!(get(store, pending.id).await.status, EntityStatus::Pending);
    let again = NewEntity {
        id: EntityId::new_v7(),
        ..keyed
    };
    match store.create(again, later).await.expect("reuse") {
        IntakeOutcome::Created(r) => assert_ne!(r.id, doomed.id),
        other => panic!("the key is free: {other:?}"),
    }
}

/// `payloads_kept` names the entities that exist and keep their payload:
/// not one pruned, deleted or never created.
pub async fn payloads_kept_names_what_keeps_its_payload(store: Arc<dyn Store>) {
    let store = &*store;
    let t1 = T0 + SECOND_US;
    let pruned = settle_single(store, t1, succeeded(None)).await;
    let settled = settle_single(store, t1 + SECOND_US, succeeded(None)).await;
    let pending = create(store, new_entity("backoff", "{}"), T0).await;
    store
        .prune(payloads_before(t1 + 1), t1 + 2 * SECOND_US)
        .await
        .expect("prune");
    let never = EntityId::new_v7();
    let mut kept = store
        .payloads_kept(vec![pruned.id, settled.id, pending.id, never])
        .await
        .expect("kept");
    kept.sort_by_key(|id| id.to_string());
    let mut want = vec![settled.id, pending.id];
    want.sort_by_key(|id| id.to_string());
    assert_eq!(kept, want);
    assert_eq!(store.payloads_kept(Vec::new()).await.expect("none"), vec![]);
}
