//! The registry's decisions and the failing of unrunnable entities, without
//! a database.

use proptest::prelude::*;
use ripen_core::{Catalog, Pipeline};

use super::*;
use crate::suite::{catalog, T0};
use crate::working::{NewRows, Stored};
use crate::{NewEntity, DEFAULT_TENANT};

fn version(type_name: &str, n: u32, digest: &str) -> TypeVersion {
    TypeVersion {
        type_name: type_name.into(),
        version: n,
        definition: format!("{{\"d\":\"{digest}\"}}"),
        digest: digest.into(),
        created_at_us: T0,
        forced: false,
        incompatibilities: "[]".into(),
    }
}

fn new(digest: &str, after: Option<u32>, number: Option<u32>) -> NewTypeVersion {
    NewTypeVersion {
        type_name: "t".into(),
        definition: format!("{{\"d\":\"{digest}\"}}"),
        digest: digest.into(),
        forced: false,
        incompatibilities: "[]".into(),
        after,
        version: number,
    }
}

#[test]
fn registrations_resolve_against_the_latest_version() {
    let v2 = version("t", 2, "b");
    let cases = [
        (None, new("a", None, None), Decision::Insert(1)),
        (None, new("a", None, Some(4)), Decision::Insert(4)),
        (None, new("a", Some(1), None), Decision::Moved),
        (Some(&v2), new("b", Some(1), None), Decision::Unchanged),
        (Some(&v2), new("b", Some(2), Some(7)), Decision::Unchanged),
        (Some(&v2), new("c", Some(2), None), Decision::Insert(3)),
        (Some(&v2), new("c", Some(2), Some(3)), Decision::Insert(3)),
        (Some(&v2), new("c", Some(2), Some(9)), Decision::Insert(9)),
        (
            Some(&v2),
            new("c", Some(2), Some(2)),
            Decision::Taken { latest: 2 },
        ),
        (
            Some(&v2),
            new("c", Some(2), Some(1)),
            Decision::Taken { latest: 2 },
        ),
        (Some(&v2), new("c", Some(1), None), Decision::Moved),
        (Some(&v2), new("c", None, None), Decision::Moved),
    ];
    for (latest, new, want) in cases {
        assert_eq!(decide(latest, &new), want, "{latest:?} {new:?}");
    }
}

#[test]
fn heads_count_each_type() {
    let versions = [
        version("a", 1, "x"),
        version("a", 2, "y"),
        version("a", 5, "z"),
        version("b", 1, "x"),
    ];
    assert_eq!(
        heads(&versions),
        vec![
            TypeHead {
                type_name: "a".into(),
                latest_version: 5,
                versions: 3
            },
            TypeHead {
                type_name: "b".into(),
                latest_version: 1,
                versions: 1
            },
        ]
    );
    assert!(heads(&[]).is_empty());
}

proptest! {
    /// Registrations applied in any order, as a backend applies them,
    /// number versions upwards, never store the latest content twice in a
    /// row, and answer `Unchanged` exactly when the content is the latest.
    #[test]
    fn registrations_keep_the_registry_ordered(
        steps in prop::collection::vec((0u8..4, 0u32..4, prop::option::of(1u32..12)), 1..40),
    ) {
        let mut stored: Vec<TypeVersion> = Vec::new();
        for (digest, lag, number) in steps {
            let digest = format!("d{digest}");
            let latest = stored.last();
            let latest_number = latest.map(|l| l.version);
            // Callers mostly checked the latest; some checked an older one.
            let after = latest_number.and_then(|n| n.checked_sub(lag)).filter(|&n| n > 0);
            let after = if lag == 0 { latest_number } else { after };
            let reg = new(&digest, after, number);
            match decide(latest, &reg) {
                Decision::Unchanged => {
                    prop_assert_eq!(latest.map(|l| l.digest.as_str()), Some(digest.as_str()));
                }
                Decision::Moved => {
                    prop_assert_ne!(after, latest_number);
                    prop_assert!(latest.is_none_or(|l| l.digest != digest));
                }
                Decision::Taken { latest: l } => {
                    prop_assert_eq!(Some(l), latest_number);
                    prop_assert!(number.is_some_and(|n| n <= l));
                }
                Decision::Insert(n) => {
                    prop_assert_eq!(after, latest_number);
                    prop_assert!(latest_number.is_none_or(|l| n > l));
                    prop_assert!(latest.is_none_or(|l| l.digest != digest));
                    stored.push(inserted(&reg, n, T0));
                }
            }
        }
        for pair in stored.windows(2) {
            prop_assert!(pair[0].version < pair[1].version);
            prop_assert_ne!(&pair[0].digest, &pair[1].digest);
        }
    }
}

/// A fresh entity of a suite type, as a backend would read it.
fn stored(type_name: &str) -> Stored {
    let catalog = catalog();
    let pipeline = catalog.get(type_name, 1).expect("pipeline");
    let entity = NewEntity {
        id: EntityId::new_v7(),
        tenant: DEFAULT_TENANT.into(),
        type_name: type_name.into(),
        version: 1,
        payload: "{}".into(),
        idempotency_key: None,
        refs: Vec::new(),
    };
    let rows = NewRows::new(pipeline, &entity, T0);
    let n = rows.record.steps.len();
    Stored {
        record: rows.record,
        next_seq: rows.next_seq,
        outputs: vec![None; n],
        extra: (),
    }
}

fn known_without(type_name: &str) -> Known {
    let full = catalog();
    let mut partial = Catalog::default();
    for (name, v) in [("w5", 1), ("single", 1), ("backoff", 1), ("mixed", 1)] {
        if name != type_name {
            let p = full.get(name, v).expect("suite pipeline");
            partial.insert(name, v, Pipeline::clone(p));
        }
    }
    Known {
        catalog: partial,
        broken: BTreeMap::new(),
    }
}

#[test]
fn resolve_says_why_an_entity_cannot_run() {
    let w5 = stored("w5");
    let full = Known {
        catalog: Catalog::clone(&catalog()),
        broken: BTreeMap::new(),
    };
    assert!(resolve(&full, &w5.record).is_ok());

    let missing = resolve(&known_without("w5"), &w5.record).unwrap_err();
    assert_eq!(
        missing,
        Unrunnable::NotRegistered {
            type_name: "w5".into(),
            version: 1
        }
    );
    assert!(
        missing.to_string().contains("not in the type registry"),
        "{missing}"
    );

    let mut broken = known_without("w5");
    broken
        .broken
        .insert(("w5".into(), 1), "steps[0]: bad".into());
    let e = resolve(&broken, &w5.record).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the stored definition of type \"w5\" version 1 cannot be rebuilt: steps[0]: bad"
    );

    let mut renamed = w5.clone();
    renamed.record.steps[1].name = "b_old".into();
    let e = resolve(&full, &renamed.record).unwrap_err();
    assert!(matches!(e, Unrunnable::StepsDiffer { .. }));
    assert!(
        e.to_string()
            .starts_with("the entity's steps (a, b_old, c, d, e) do not match the steps of type \"w5\" version 1 (a, b, c, d, e)"),
        "{e}"
    );
}

#[test]
fn abandon_fails_a_pending_entity_once_with_its_cause() {
    let mut s = stored("w5");
    // `a` running, `b`..`e` blocked, as a crash would leave it.
    s.record.steps[0].state.status = StepStatus::Running;
    s.record.steps[0].state.holder = Some("w1".into());
    s.record.updated_at_us = T0 + 5;
    let (record, rows) = abandon(&s, "gone", T0).expect("pending");
    assert_eq!(record.status, EntityStatus::Failed);
    for step in &record.steps {
        assert_eq!(step.state.status, StepStatus::Skipped);
        assert_eq!(step.state.due_at_us, None);
        assert_eq!(step.state.holder, None);
        assert_eq!(step.state.last_error.as_deref(), Some("gone"));
    }
    assert_eq!(rows.steps.len(), 5);
    let kinds: Vec<&str> = rows.events.iter().map(|e| e.event.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            UNRUNNABLE_EVENT,
            "step_skipped",
            "step_skipped",
            "step_skipped",
            "step_skipped",
            "step_skipped",
            "status_changed"
        ]
    );
    let seqs: Vec<u64> = rows.events.iter().map(|e| e.event.seq).collect();
    let first = s.next_seq;
    assert_eq!(seqs, (first..first + 7).collect::<Vec<_>>());
    assert_eq!(rows.events[0].event.detail, json!({"error": "gone"}));
    assert!(
        rows.events.iter().all(|e| e.event.at_us == T0 + 5),
        "history never goes back in time"
    );
    assert_eq!(rows.outbox.len(), 1, "one notification: the status change");
    assert_eq!(rows.outbox[0].seq, first + 6);
    let entity = &rows.entities[0];
    assert_eq!(
        (entity.status, entity.next_seq),
        (EntityStatus::Failed, first + 7)
    );

    // A settled entity is left as it is, so a second pass changes nothing.
    let settled = Stored {
        record,
        ..s.clone()
    };
    assert!(abandon(&settled, "gone", T0).is_none());
}

#[test]
fn abandon_keeps_what_already_finished() {
    let mut s = stored("w5");
    s.record.steps[0].state.status = StepStatus::Succeeded;
    s.record.steps[0].state.due_at_us = None;
    s.record.steps[4].state.status = StepStatus::Failed;
    let (record, rows) = abandon(&s, "gone", T0).expect("pending");
    assert_eq!(record.steps[0].state.status, StepStatus::Succeeded);
    assert_eq!(record.steps[0].state.last_error, None);
    assert_eq!(record.steps[4].state.status, StepStatus::Failed);
    let skipped: Vec<usize> = rows.steps.iter().map(|r| r.idx).collect();
    assert_eq!(skipped, [1, 2, 3]);
}

#[test]
fn misses_are_kept_until_taken() {
    let pipelines = Pipelines::new(known_without("w5"));
    let a = stored("w5");
    let b = stored("w5");
    let why = resolve(&pipelines.known(), &a.record).unwrap_err();
    pipelines.miss(&a.record, &why);
    pipelines.miss(&b.record, &why);
    pipelines.miss(&a.record, &why);
    let mut taken = pipelines.take_missed();
    taken.sort();
    let mut want = vec![
        (a.record.id, "w5".to_owned(), 1),
        (b.record.id, "w5".to_owned(), 1),
    ];
    want.sort();
    assert_eq!(taken, want);
    assert!(pipelines.take_missed().is_empty());
    assert!(pipelines.get("w5", 1).is_none());
    pipelines.replace(Known {
        catalog: Catalog::clone(&catalog()),
        broken: BTreeMap::new(),
    });
    assert!(
        pipelines.get("w5", 1).is_some(),
        "replaced for every holder"
    );
}
