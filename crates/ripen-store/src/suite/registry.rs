//! Conformance tests of the type registry: registrations, reads, live
//! counts, and the failing of entities whose pipeline cannot run.

use std::sync::Arc;

use super::*;
use crate::registry::UNRUNNABLE_EVENT;
use crate::{NewTypeVersion, Registered, TypeHead, TypeVersion};

fn registration(type_name: &str, content: &str, after: Option<u32>) -> NewTypeVersion {
    NewTypeVersion {
        type_name: type_name.into(),
        definition: format!("{{\"content\":{content:?}}}"),
        digest: format!("digest-of-{content}"),
        forced: false,
        incompatibilities: "[]".into(),
        after,
        version: None,
    }
}

async fn register(store: &dyn Store, reg: NewTypeVersion, now_us: UnixMicros) -> Registered {
    store.register_type(reg, now_us).await.expect("register")
}

fn created(r: Registered) -> TypeVersion {
    match r {
        Registered::Created(v) => v,
        other => panic!("expected Created, got {other:?}"),
    }
}

/// Versions are numbered from 1 after the latest one; the latest content
/// again is no change; a registration checked against an older version is
/// told where the type moved; an explicit number must be above the latest;
/// reads list every version, oldest first, with what was written.
pub async fn registry_numbers_versions_and_keeps_them(store: Arc<dyn Store>) {
    let store = &*store;
    assert!(store.type_heads().await.expect("heads").is_empty());
    let v1 = created(register(store, registration("t", "one", None), T0).await);
    assert_eq!((v1.version, v1.created_at_us), (1, T0));
    assert_eq!(v1.definition, r#"{"content":"one"}"#);

    let again = register(store, registration("t", "one", Some(1)), T0 + 1).await;
    assert_eq!(again, Registered::Unchanged(v1.clone()));

    let mut forced = registration("t", "two", Some(1));
    forced.forced = true;
    forced.incompatibilities = r#"[{"pointer":"/a","rule":"new_required","message":"m"}]"#.into();
    let v2 = created(register(store, forced.clone(), T0 + 2).await);
    assert_eq!(v2.version, 2);
    assert!(v2.forced);
    assert_eq!(v2.incompatibilities, forced.incompatibilities);

    // Checked against version 1, but version 2 is the latest now.
    let stale = register(store, registration("t", "three", Some(1)), T0 + 3).await;
    assert_eq!(stale, Registered::Moved(Some(v2.clone())));
    // A new type checked against nothing, when it has versions.
    let stale = register(store, registration("t", "three", None), T0 + 3).await;
    assert_eq!(stale, Registered::Moved(Some(v2.clone())));
    // The same content as the latest is unchanged whatever was checked.
    let same = register(store, registration("t", "two", None), T0 + 3).await;
    assert_eq!(same, Registered::Unchanged(v2.clone()));

    let mut numbered = registration("t", "three", Some(2));
    numbered.version = Some(2);
    let taken = register(store, numbered.clone(), T0 + 4).await;
    assert_eq!(taken, Registered::Taken { latest: 2 });
    numbered.version = Some(5);
    let v5 = created(register(store, numbered, T0 + 4).await);
    assert_eq!(v5.version, 5);
    // Content that an older version had is a new version when it is not
    // the latest.
    let back = created(register(store, registration("t", "one", Some(5)), T0 + 5).await);
    assert_eq!((back.version, back.digest.as_str()), (6, "digest-of-one"));

    let other = created(register(store, registration("a-type", "x", None), T0 + 6).await);
    assert_eq!(other.version, 1);

    assert_eq!(
        store.type_heads().await.expect("heads"),
        vec![
            TypeHead {
                type_name: "a-type".into(),
                latest_version: 1,
                versions: 1
            },
            TypeHead {
                type_name: "t".into(),
                latest_version: 6,
                versions: 4
            },
        ]
    );
    let t = store.type_versions(Some("t")).await.expect("versions");
    let numbers: Vec<u32> = t.iter().map(|v| v.version).collect();
    assert_eq!(numbers, [1, 2, 5, 6]);
    assert_eq!(t[0], v1);
    assert_eq!(t[1], v2);
    let all = store.type_versions(None).await.expect("all versions");
    assert_eq!(all.len(), 5);
    assert_eq!(all[0], other, "by type, then version");
    assert!(store
        .type_versions(Some("nope"))
        .await
        .expect("versions")
        .is_empty());
}

/// Two registrations of one type at once: one writes the next version, the
/// other finds it (unchanged for the same content, moved for another).
pub async fn concurrent_registrations_are_serialized(store: Arc<dyn Store>) {
    created(register(&*store, registration("t", "one", None), T0).await);
    let (a, b) = tokio::join!(
        register(&*store, registration("t", "two", Some(1)), T0 + 1),
        register(&*store, registration("t", "two", Some(1)), T0 + 1),
    );
    let mut outcomes = [a, b];
    outcomes.sort_by_key(|r| matches!(r, Registered::Unchanged(_)));
    let Registered::Created(v2) = &outcomes[0] else {
        panic!("one registration writes version 2: {outcomes:?}");
    };
    assert_eq!(v2.version, 2);
    assert_eq!(outcomes[1], Registered::Unchanged(v2.clone()));
    let (a, b) = tokio::join!(
        register(&*store, registration("t", "three", Some(2)), T0 + 2),
        register(&*store, registration("t", "four", Some(2)), T0 + 2),
    );
    let moved = [&a, &b]
        .iter()
        .filter(|r| matches!(r, Registered::Moved(Some(v)) if v.version == 3))
        .count();
    let made = [&a, &b]
        .iter()
        .filter(|r| matches!(r, Registered::Created(v) if v.version == 3))
        .count();
    assert_eq!((made, moved), (1, 1), "{a:?} {b:?}");
}

/// Pending entities are counted by version and tenant; settled ones are not.
pub async fn live_entities_count_pending_by_version(store: Arc<dyn Store>) {
    let store = &*store;
    assert!(store
        .live_entities(TENANT, "single")
        .await
        .expect("live")
        .is_empty());
    let one = create(store, new_entity("single", BODY), T0).await;
    create(store, new_entity("single", BODY), T0).await;
    create(store, new_entity("w5", BODY), T0).await;
    let mut other = new_entity("single", BODY);
    other.tenant = OTHER_TENANT.into();
    create(store, other, T0).await;
    let live = store.live_entities(TENANT, "single").await.expect("live");
    assert_eq!(live, vec![(1, 2)]);
    let claimed = claim(store, T0, 10).await;
    let a = claimed
        .attempts
        .iter()
        .find(|a| a.entity_id == one.id)
        .expect("claimed");
    finish(store, a, succeeded(None), T0).await;
    let live = store.live_entities(TENANT, "single").await.expect("live");
    assert_eq!(live, vec![(1, 1)], "the ready one is not live");
    let live = store
        .live_entities(OTHER_TENANT, "single")
        .await
        .expect("live");
    assert_eq!(live, vec![(1, 1)]);
}

/// Run by each backend with two stores on one database, the second opened
/// with a catalog that lacks the `w5` type: it leaves the w5 entity alone
/// when it claims; asked to fail it, it fails it once, with the cause in
/// its history and its steps, and leaves runnable entities as they are.
/// Its running attempt's late result is stale, and nothing of it is due.
pub async fn unrunnable_entities_fail_once_with_their_cause(
    full: Arc<dyn Store>,
    without_w5: Arc<dyn Store>,
) {
    let (orphan, running) = w5_with_a_running(&*full).await;
    let fine = create(&*full, new_entity("single", BODY), T0 + 1).await;
    let batch = claim(&*without_w5, T0 + 2, 10).await;
    let ids: Vec<EntityId> = batch.attempts.iter().map(|a| a.entity_id).collect();
    assert_eq!(ids, vec![fine.id]);

    // The store that knows w5 has nothing to fail.
    let none = full
        .fail_unrunnable(vec![orphan.id, fine.id], T0 + 3)
        .await
        .expect("fail");
    assert!(none.is_empty(), "{none:?}");

    let failed = without_w5
        .fail_unrunnable(vec![orphan.id, fine.id, orphan.id], T0 + 3)
        .await
        .expect("fail");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].id, orphan.id);
    let now = get(&*full, orphan.id).await;
    assert_eq!(now, failed[0]);
    assert_eq!(now.status, EntityStatus::Failed);
    for s in &now.steps {
        assert_eq!(s.state.status, StepStatus::Skipped, "{}", s.name);
        let error = s.state.last_error.as_deref().unwrap_or_default();
        assert!(error.contains("not in the type registry"), "{error}");
    }
    let history = events(&*full, orphan.id).await;
    let tail: Vec<&str> = kinds(&history).into_iter().rev().take(7).collect();
    assert_eq!(
        tail,
        [
            "status_changed",
            "step_skipped",
            "step_skipped",
            "step_skipped",
            "step_skipped",
            "step_skipped",
            UNRUNNABLE_EVENT
        ]
    );
    let cause = history
        .iter()
        .find(|e| e.kind == UNRUNNABLE_EVENT)
        .expect("the cause");
    assert!(cause.detail["error"]
        .as_str()
        .is_some_and(|e| e.contains("\"w5\" version 1")));
    assert_eq!(
        status_changes(&history).last(),
        Some(&("pending".to_owned(), "failed".to_owned()))
    );
    let seqs: Vec<u64> = history.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=history.len() as u64).collect::<Vec<_>>());
    // Outbox rows are read by position, which the fan-out gives.
    full.fan_out(100, T0 + 3).await.expect("fan out");
    let outbox = full.outbox(0, 100).await.expect("outbox");
    let last = outbox
        .iter()
        .rev()
        .find(|o| o.entity_id == orphan.id)
        .expect("an outbox row");
    assert_eq!(last.kind, "status_changed");
    assert!(last.body.contains("\"to\":\"failed\""), "{}", last.body);

    // Once: a second pass fails nothing, and writes no history.
    let again = without_w5
        .fail_unrunnable(vec![orphan.id], T0 + 4)
        .await
        .expect("fail again");
    assert!(again.is_empty());
    assert_eq!(events(&*full, orphan.id).await.len(), history.len());

    // Nothing of it is due any more, and the late result is stale.
    let after = claim(&*full, T0 + 100 * SECOND_US, 10).await;
    assert!(
        after.attempts.iter().all(|a| a.entity_id != orphan.id),
        "{after:?}"
    );
    let late = complete(&*full, vec![completion(&running, succeeded(None))], T0 + 5).await;
    assert_eq!(late.results, vec![CompletionResult::Stale]);
    assert_eq!(get(&*full, fine.id).await.status, EntityStatus::Pending);
}

/// Run by each backend with two stores on one database, the second opened
/// with a catalog whose `w5` version 1 has a step renamed: an entity
/// created on the first one cannot run on the second, which says so.
pub async fn entities_whose_steps_differ_fail_with_the_difference(
    full: Arc<dyn Store>,
    renamed: Arc<dyn Store>,
) {
    let orphan = create(&*full, new_entity("w5", BODY), T0).await;
    assert!(claim(&*renamed, T0 + 1, 10).await.attempts.is_empty());
    let failed = renamed
        .fail_unrunnable(vec![orphan.id], T0 + 2)
        .await
        .expect("fail");
    assert_eq!(failed.len(), 1);
    let error = failed[0].steps[0]
        .state
        .last_error
        .clone()
        .unwrap_or_default();
    assert!(
        error.contains(
            "(a, b, c, d, e) do not match the steps of type \"w5\" version 1 (a, b2, c, d, e)"
        ),
        "{error}"
    );
}

/// The suite's catalog with step `b` of `w5` renamed `b2`.
pub fn catalog_with_w5_renamed() -> Arc<Catalog> {
    let full = catalog();
    let mut renamed = Catalog::default();
    for (name, version) in [("single", 1), ("backoff", 1), ("mixed", 1)] {
        let pipeline = full.get(name, version).expect("in the suite catalog");
        renamed.insert(name, version, Pipeline::clone(pipeline));
    }
    let w5 = full.get("w5", 1).expect("w5");
    let defs = w5
        .steps()
        .iter()
        .map(|s| {
            let rename = |n: &str| {
                if n == "b" {
                    "b2".to_owned()
                } else {
                    n.to_owned()
                }
            };
            StepDef {
                name: rename(&s.name),
                needs: s.needs.iter().map(|&j| rename(&w5.step(j).name)).collect(),
                critical: s.critical,
                timeout_ms: s.timeout_ms,
                retry: s.retry,
                executor: s.executor.clone(),
                compensate: None,
            }
        })
        .collect();
    renamed.insert("w5", 1, Pipeline::new(defs).expect("still a pipeline"));
    Arc::new(renamed)
}

/// Run by each backend with two stores on one database, the second opened
/// with a catalog that lacks `w5`: a ready `w5` entity whose non-critical
/// step `e` still runs keeps its status when it is failed as unrunnable;
/// `e` is skipped with the cause and the entity becomes degraded, once.
pub async fn a_ready_entity_with_live_steps_becomes_degraded(
    full: Arc<dyn Store>,
    without_w5: Arc<dyn Store>,
) {
    let (record, a) = w5_with_a_running(&*full).await;
    let claimed = finish(&*full, &a, succeeded(None), T0 + 1).await;
    assert_eq!(names(&claimed), ["b", "c", "e"].into_iter().collect());
    finish(&*full, by_name(&claimed, "b"), succeeded(None), T0 + 2).await;
    let d = finish(&*full, by_name(&claimed, "c"), succeeded(None), T0 + 2).await;
    finish(&*full, by_name(&d, "d"), succeeded(None), T0 + 3).await;
    let ready = get(&*full, record.id).await;
    assert_eq!((ready.status, ready.degraded), (EntityStatus::Ready, false));
    assert_eq!(step(&ready, "e").state.status, StepStatus::Running);

    let failed = without_w5
        .fail_unrunnable(vec![record.id], T0 + 4)
        .await
        .expect("fail");
    assert_eq!(failed.len(), 1, "{failed:?}");
    let now = get(&*full, record.id).await;
    assert_eq!(now, failed[0]);
    assert_eq!((now.status, now.degraded), (EntityStatus::Ready, true));
    assert_eq!(now.ready_at_us, ready.ready_at_us);
    let e = step(&now, "e");
    assert_eq!(e.state.status, StepStatus::Skipped);
    assert!(e
        .state
        .last_error
        .as_deref()
        .is_some_and(|m| m.contains("not in the type registry")));
    assert_eq!(step(&now, "d").state.status, StepStatus::Succeeded);
    let history = events(&*full, record.id).await;
    let tail: Vec<&str> = kinds(&history).into_iter().rev().take(3).collect();
    assert_eq!(tail, ["degraded", "step_skipped", UNRUNNABLE_EVENT]);
    assert_eq!(
        history.last().and_then(|e| e.detail["step"].as_str()),
        Some("e")
    );

    // Nothing is live any more: a second pass does nothing.
    let again = without_w5
        .fail_unrunnable(vec![record.id], T0 + 5)
        .await
        .expect("fail again");
    assert!(again.is_empty(), "{again:?}");
    let late = complete(
        &*full,
        vec![completion(&by_name(&claimed, "e").clone(), succeeded(None))],
        T0 + 6,
    )
    .await;
    assert_eq!(late.results, vec![CompletionResult::Stale]);
}

/// A reseal writes each sealed value only where its row still holds what
/// was read, for subscriptions and type versions alike, and says how many
/// rows it changed.
pub async fn sealed_values_are_written_again_only_where_unchanged(store: Arc<dyn Store>) {
    use crate::{Reseal, SinkKind, Subscription};
    let store = &*store;
    let sub = Subscription {
        id: "sub_reseal".into(),
        tenant: TENANT.into(),
        kind: SinkKind::Webhook,
        url: "http://127.0.0.1:9/hooks".into(),
        events: vec![],
        types: vec![],
        sealed_secret: vec![1, 2, 3],
        created_at_us: T0,
        start_pos: 0,
    };
    store.put_subscription(sub).await.expect("put subscription");
    let v1 = created(register(store, registration("t", "one", None), T0).await);

    let stale = vec![
        Reseal::Secret {
            subscription_id: "sub_reseal".into(),
            was: vec![9, 9],
            now: vec![4, 5, 6],
        },
        Reseal::Definition {
            type_name: "t".into(),
            version: 1,
            was: "{\"content\":\"other\"}".into(),
            now: "{\"content\":\"sealed again\"}".into(),
        },
        Reseal::Secret {
            subscription_id: "sub_missing".into(),
            was: vec![1, 2, 3],
            now: vec![4, 5, 6],
        },
    ];
    assert_eq!(store.reseal(stale).await.expect("reseal"), 0);
    let fresh = vec![
        Reseal::Secret {
            subscription_id: "sub_reseal".into(),
            was: vec![1, 2, 3],
            now: vec![4, 5, 6],
        },
        Reseal::Definition {
            type_name: "t".into(),
            version: 1,
            was: v1.definition.clone(),
            now: "{\"content\":\"sealed again\"}".into(),
        },
    ];
    assert_eq!(store.reseal(fresh.clone()).await.expect("reseal"), 2);
    assert_eq!(
        store.reseal(fresh).await.expect("again"),
        0,
        "what was read is gone"
    );
    let subs = store.subscription_list().await.expect("subscriptions");
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].sealed_secret, vec![4, 5, 6]);
    let versions = store.type_versions(Some("t")).await.expect("versions");
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].definition, "{\"content\":\"sealed again\"}");
    assert_eq!(versions[0].digest, v1.digest, "the digest stays");
}
