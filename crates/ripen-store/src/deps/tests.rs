//! Table tests of the store-side dependency decisions.

use std::collections::HashMap;

use ripen_core::EntityStatus;

use super::*;

fn id(n: u128) -> EntityId {
    EntityId(uuid::Uuid::from_u128(n))
}

fn reference(field: &str, type_name: &str, n: u128) -> Reference {
    Reference {
        field: field.into(),
        type_name: type_name.into(),
        id: id(n),
    }
}

fn parent(type_name: &str, status: EntityStatus, waiting: u64) -> Parent {
    Parent {
        tenant: "default".into(),
        type_name: type_name.into(),
        status,
        waiting,
    }
}

#[test]
fn references_are_checked_in_order_and_the_first_that_does_not_hold_refuses() {
    use EntityStatus::*;
    let cases: Vec<(&str, Parent, Result<EntityStatus, &str>)> = vec![
        ("pending", parent("merchant", Pending, 0), Ok(Pending)),
        ("ready", parent("merchant", Ready, 0), Ok(Ready)),
        ("failed", parent("merchant", Failed, 0), Err("failed")),
        (
            "cancelled",
            parent("merchant", Cancelled, 0),
            Err("cancelled"),
        ),
        ("wrong type", parent("store", Ready, 0), Err("wrong_type")),
        (
            "full",
            parent("merchant", Pending, WAITING_DEPENDENTS_MAX),
            Err("too_many_dependents"),
        ),
        (
            "full but ready",
            parent("merchant", Ready, WAITING_DEPENDENTS_MAX),
            Ok(Ready),
        ),
    ];
    for (name, p, want) in cases {
        let mut parents = HashMap::new();
        parents.insert(id(1), p);
        let got = check_references(
            "default",
            &[reference("merchant_id", "merchant", 1)],
            &parents,
            &mut HashMap::new(),
        );
        match (got, want) {
            (Ok(deps), Ok(status)) => assert_eq!(deps[0].status, status, "{name}"),
            (Err(r), Err(reason)) => {
                assert_eq!(r.reason.as_str(), reason, "{name}");
                assert_eq!(r.field, "merchant_id", "{name}");
                assert!(r.to_string().starts_with("merchant_id: "), "{name}: {r}");
            }
            (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn a_missing_entity_or_another_tenants_is_not_found() {
    let mut parents = HashMap::new();
    let mut other = parent("merchant", EntityStatus::Ready, 0);
    other.tenant = "other".into();
    parents.insert(id(2), other);
    for n in [1, 2] {
        let r = check_references(
            "default",
            &[reference("m", "merchant", n)],
            &parents,
            &mut HashMap::new(),
        )
        .unwrap_err();
        assert_eq!(r.reason, RefusalReason::NotFound);
    }
}

#[test]
fn creates_of_one_transaction_count_towards_the_fan_out_limit() {
    let mut parents = HashMap::new();
    parents.insert(
        id(1),
        parent(
            "merchant",
            EntityStatus::Pending,
            WAITING_DEPENDENTS_MAX - 2,
        ),
    );
    let refs = [reference("m", "merchant", 1)];
    let mut added = HashMap::new();
    assert!(check_references("default", &refs, &parents, &mut added).is_ok());
    assert!(check_references("default", &refs, &parents, &mut added).is_ok());
    let r = check_references("default", &refs, &parents, &mut added).unwrap_err();
    assert_eq!(r.reason, RefusalReason::TooManyDependents);
    assert_eq!(added[&id(1)], 2, "a refused create adds nothing");
}

#[test]
fn the_deps_column_round_trips() {
    let deps = vec![
        DependencyRecord {
            field: "a".into(),
            type_name: "merchant".into(),
            id: id(7),
            status: EntityStatus::Pending,
        },
        DependencyRecord {
            field: "b\"".into(),
            type_name: "store".into(),
            id: id(8),
            status: EntityStatus::Ready,
        },
    ];
    assert_eq!(encode(&[]), None);
    let text = encode(&deps).unwrap();
    assert_eq!(decode(id(1), Some(&text)).unwrap(), deps);
    assert!(decode(id(1), Some("[[1]]")).is_err());
    assert!(decode(id(1), None).unwrap().is_empty());
}

#[test]
fn only_a_status_change_to_a_settled_status_wakes_dependents() {
    for (kind, detail, want) in [
        ("status_changed", r#"{"from":"pending","to":"ready"}"#, true),
        (
            "status_changed",
            r#"{"from":"pending","to":"failed"}"#,
            true,
        ),
        (
            "status_changed",
            r#"{"from":"pending","to":"cancelled"}"#,
            true,
        ),
        (
            "status_changed",
            r#"{"from":"failed","to":"pending"}"#,
            false,
        ),
        ("degraded", r#"{"degraded":true,"step":"a"}"#, false),
        ("created", r#"{"status":"pending"}"#, false),
    ] {
        assert_eq!(settles(kind, detail), want, "{kind} {detail}");
        let body = format!(r#"{{"at_us":1,"detail":{detail},"kind":"{kind}"}}"#);
        assert_eq!(body_settles(kind, &body), want, "{kind} {body}");
    }
}

#[test]
fn a_dependent_is_told_what_its_parent_is_now() {
    let p = id(3);
    assert!(matches!(
        wake_input(p, EntityStatus::Ready),
        Some(Input::DependencyReady { .. })
    ));
    assert!(matches!(
        wake_input(p, EntityStatus::Cancelled),
        Some(Input::DependencyFailed {
            status: EntityStatus::Cancelled,
            ..
        })
    ));
    assert_eq!(wake_input(p, EntityStatus::Pending), None);
    assert_eq!(plan_visits(10, 256), (10, true));
    assert_eq!(plan_visits(257, 256), (256, false));
}

#[test]
fn a_retry_is_blocked_by_a_dependency_not_seen_ready_that_cannot_become_ready() {
    let deps = vec![
        DependencyRecord {
            field: "a".into(),
            type_name: "m".into(),
            id: id(1),
            status: EntityStatus::Ready,
        },
        DependencyRecord {
            field: "b".into(),
            type_name: "m".into(),
            id: id(2),
            status: EntityStatus::Failed,
        },
    ];
    let mut now = HashMap::new();
    now.insert(id(1), EntityStatus::Failed);
    now.insert(id(2), EntityStatus::Failed);
    let b = retry_blocker(&deps, &now).unwrap();
    assert_eq!(b.field, "b", "a dependency seen ready no longer matters");
    now.insert(id(2), EntityStatus::Pending);
    assert_eq!(retry_blocker(&deps, &now), None);
    now.remove(&id(2));
    assert_eq!(
        retry_blocker(&deps, &now).unwrap().reason,
        RefusalReason::NotFound
    );
}
