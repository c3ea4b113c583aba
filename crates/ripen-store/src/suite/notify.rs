//! Conformance tests of the notification side: outbox positions, the
//! fan-out, deliveries, subscriptions and change watchers.

use std::sync::Arc;

use super::*;
use crate::notify::ANY_TENANT;
use crate::{
    Changes, DeliveryClaim, DeliveryOutcome, DeliveryQuery, DeliveryResult, DeliveryStatus,
    RedeliverOutcome, SinkKind, Subscription,
};

const LEASE_US: i64 = 10 * SECOND_US;

fn subscription(id: &str, tenant: &str, events: &[&str], types: &[&str]) -> Subscription {
    Subscription {
        id: id.into(),
        tenant: tenant.into(),
        kind: SinkKind::Webhook,
        url: format!("http://127.0.0.1:9/{id}"),
        events: events.iter().map(|s| s.to_string()).collect(),
        types: types.iter().map(|s| s.to_string()).collect(),
        sealed_secret: vec![1, 2, 3],
        created_at_us: T0,
        start_pos: 0,
    }
}

async fn put(store: &dyn Store, sub: Subscription) -> Subscription {
    store.put_subscription(sub).await.expect("put subscription")
}

/// Fans out until nothing is left.
async fn fan_out_all(store: &dyn Store, now_us: UnixMicros) -> usize {
    let mut deliveries = 0;
    loop {
        let round = store.fan_out(2, now_us).await.expect("fan out");
        deliveries += round.deliveries;
        if round.rows == 0 {
            return deliveries;
        }
    }
}

fn claim_of(per_subscription: u32, room: &[(&str, u32)]) -> DeliveryClaim {
    DeliveryClaim {
        limit: 100,
        lease_us: LEASE_US,
        per_subscription,
        room: room.iter().map(|(s, n)| (s.to_string(), *n)).collect(),
    }
}

async fn claim_deliveries(store: &dyn Store, now_us: UnixMicros) -> Vec<crate::Delivery> {
    store
        .claim_deliveries(claim_of(100, &[]), now_us)
        .await
        .expect("claim deliveries")
}

fn delivered(d: &crate::Delivery) -> DeliveryResult {
    DeliveryResult {
        id: d.id,
        attempts: d.attempts,
        outcome: DeliveryOutcome::Delivered { code: Some(204) },
    }
}

/// Runs a `single` entity to ready, and cancels another: four notable
/// events (two created, one ready, one cancelled).
async fn ready_and_cancelled(store: &dyn Store) -> (EntityRecord, EntityRecord) {
    let first = create(store, new_entity("single", BODY), T0).await;
    let second = create(store, new_entity("single", BODY), T0).await;
    let attempts = claim(store, T0, 10).await.attempts;
    let mine = attempts
        .iter()
        .find(|a| a.entity_id == first.id)
        .expect("first claimed");
    finish(store, mine, succeeded(None), T0 + SECOND_US).await;
    store
        .cancel(TENANT, second.id, T0 + SECOND_US)
        .await
        .expect("cancel");
    (first, second)
}

pub async fn outbox_positions_grow_and_resume(store: Arc<dyn Store>) {
    let store = &*store;
    assert_eq!(store.outbox_head().await.expect("head"), 0);
    let (first, second) = ready_and_cancelled(store).await;
    fan_out_all(store, T0 + SECOND_US).await;
    let entries = store.outbox(0, 100).await.expect("outbox");
    assert_eq!(entries.len(), 4);
    assert!(
        entries.windows(2).all(|w| w[0].id < w[1].id),
        "positions grow"
    );
    assert_eq!(store.outbox_head().await.expect("head"), entries[3].id);
    let rest = store.outbox(entries[1].id, 100).await.expect("outbox");
    assert_eq!(rest, entries[2..].to_vec());
    let seen: Vec<(EntityId, String, String)> = entries
        .iter()
        .map(|o| {
            let n = crate::Notification::from_outbox(o).expect("a notification");
            assert_eq!(n.pos, o.id);
            (n.entity_id, n.event, n.status)
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (first.id, "entity.created".into(), "pending".into()),
            (second.id, "entity.created".into(), "pending".into()),
            (first.id, "entity.ready".into(), "ready".into()),
            (second.id, "entity.cancelled".into(), "cancelled".into()),
        ]
    );
}

pub async fn fan_out_delivers_what_subscriptions_match(store: Arc<dyn Store>) {
    let store = &*store;
    put(store, subscription("all", TENANT, &[], &[])).await;
    put(
        store,
        subscription("ready", TENANT, &["entity.ready"], &["single"]),
    )
    .await;
    put(store, subscription("w5", TENANT, &[], &["w5"])).await;
    put(store, subscription("other", OTHER_TENANT, &[], &[])).await;
    put(
        store,
        subscription("email", ANY_TENANT, &["entity.cancelled"], &[]),
    )
    .await;
    let (first, second) = ready_and_cancelled(store).await;
    assert_eq!(fan_out_all(store, T0 + SECOND_US).await, 4 + 1 + 1);
    let subs = store.subscriptions(None).await.expect("subscriptions");
    let pending: Vec<(&str, u64)> = subs
        .iter()
        .map(|(s, c)| (s.id.as_str(), c.pending))
        .collect();
    assert_eq!(
        pending,
        vec![
            ("all", 4),
            ("email", 1),
            ("other", 0),
            ("ready", 1),
            ("w5", 0)
        ]
    );
    let ready = store
        .deliveries(
            "ready",
            DeliveryQuery {
                limit: 10,
                ..DeliveryQuery::default()
            },
        )
        .await
        .expect("deliveries");
    assert_eq!(ready.len(), 1);
    let n = &ready[0].notification;
    assert_eq!((n.entity_id, n.event.as_str()), (first.id, "entity.ready"));
    assert_eq!(
        (n.type_name.as_str(), n.version, n.tenant.as_str()),
        ("single", 1, TENANT)
    );
    assert_eq!(ready[0].status, DeliveryStatus::Pending);
    let email = store
        .deliveries(
            "email",
            DeliveryQuery {
                limit: 10,
                ..DeliveryQuery::default()
            },
        )
        .await
        .expect("deliveries");
    assert_eq!(email[0].notification.entity_id, second.id);
    // A second fan-out finds nothing new.
    assert_eq!(fan_out_all(store, T0 + SECOND_US).await, 0);
}

pub async fn deliveries_keep_each_entitys_order(store: Arc<dyn Store>) {
    let store = &*store;
    put(store, subscription("all", TENANT, &[], &[])).await;
    let (first, second) = ready_and_cancelled(store).await;
    fan_out_all(store, T0 + SECOND_US).await;
    let now = T0 + 2 * SECOND_US;
    // Only each entity's earliest pending notification is due.
    let batch = claim_deliveries(store, now).await;
    let got: BTreeSet<(EntityId, &str)> = batch
        .iter()
        .map(|d| (d.notification.entity_id, d.notification.event.as_str()))
        .collect();
    assert_eq!(
        got,
        BTreeSet::from([(first.id, "entity.created"), (second.id, "entity.created")])
    );
    assert!(batch.iter().all(|d| d.attempts == 1));
    // In flight, they still hold the rest back.
    assert!(claim_deliveries(store, now).await.is_empty());
    let results = batch.iter().map(delivered).collect();
    store.finish_deliveries(results, now).await.expect("finish");
    let batch = claim_deliveries(store, now).await;
    let got: BTreeSet<(EntityId, &str)> = batch
        .iter()
        .map(|d| (d.notification.entity_id, d.notification.event.as_str()))
        .collect();
    assert_eq!(
        got,
        BTreeSet::from([(first.id, "entity.ready"), (second.id, "entity.cancelled")])
    );
    store
        .finish_deliveries(batch.iter().map(delivered).collect(), now)
        .await
        .expect("finish");
    assert!(claim_deliveries(store, now).await.is_empty());
    let subs = store
        .subscriptions(Some(TENANT))
        .await
        .expect("subscriptions");
    assert_eq!(subs[0].1.delivered, 4);
    assert_eq!(subs[0].1.pending, 0);
}

pub async fn deliveries_retry_die_and_are_redelivered(store: Arc<dyn Store>) {
    let store = &*store;
    put(store, subscription("s", TENANT, &["entity.created"], &[])).await;
    create(store, new_entity("single", BODY), T0).await;
    fan_out_all(store, T0).await;
    let d = claim_deliveries(store, T0).await.remove(0);
    let retry_at = T0 + 10 * SECOND_US;
    store
        .finish_deliveries(
            vec![DeliveryResult {
                id: d.id,
                attempts: d.attempts,
                outcome: DeliveryOutcome::Retry {
                    at_us: retry_at,
                    error: "HTTP 503".into(),
                    code: Some(503),
                },
            }],
            T0,
        )
        .await
        .expect("finish");
    assert!(
        claim_deliveries(store, retry_at - 1).await.is_empty(),
        "waits"
    );
    let again = claim_deliveries(store, retry_at).await.remove(0);
    assert_eq!((again.id, again.attempts), (d.id, 2));
    assert_eq!(again.last_error.as_deref(), Some("HTTP 503"));
    assert_eq!(again.last_code, Some(503));
    // The first claim's result comes too late: nothing changes.
    store
        .finish_deliveries(vec![delivered(&d)], retry_at)
        .await
        .expect("finish");
    let listed = store
        .deliveries(
            "s",
            DeliveryQuery {
                limit: 10,
                ..DeliveryQuery::default()
            },
        )
        .await
        .expect("deliveries");
    assert_eq!(listed[0].status, DeliveryStatus::Pending);
    store
        .finish_deliveries(
            vec![DeliveryResult {
                id: again.id,
                attempts: again.attempts,
                outcome: DeliveryOutcome::Dead {
                    error: "gave up".into(),
                    code: None,
                },
            }],
            retry_at,
        )
        .await
        .expect("finish");
    let dead = store
        .deliveries(
            "s",
            DeliveryQuery {
                status: Some(DeliveryStatus::Dead),
                limit: 10,
                before: None,
            },
        )
        .await
        .expect("deliveries");
    assert_eq!(dead.len(), 1);
    assert!(claim_deliveries(store, retry_at + LEASE_US)
        .await
        .is_empty());
    assert_eq!(
        store
            .redeliver(OTHER_TENANT, d.id, retry_at)
            .await
            .expect("redeliver"),
        RedeliverOutcome::NotFound
    );
    assert_eq!(
        store
            .redeliver(TENANT, d.id, retry_at)
            .await
            .expect("redeliver"),
        RedeliverOutcome::Queued
    );
    assert_eq!(
        store
            .redeliver(TENANT, d.id, retry_at)
            .await
            .expect("redeliver"),
        RedeliverOutcome::NotDead(DeliveryStatus::Pending)
    );
    let third = claim_deliveries(store, retry_at).await.remove(0);
    assert_eq!((third.id, third.attempts), (d.id, 3));
    assert_eq!(
        third.created_at_us, retry_at,
        "the retry period starts over"
    );
}

pub async fn claimed_deliveries_come_back_when_their_lease_ends(store: Arc<dyn Store>) {
    let store = &*store;
    put(store, subscription("s", TENANT, &[], &[])).await;
    put(store, subscription("busy", TENANT, &[], &[])).await;
    create(store, new_entity("single", BODY), T0).await;
    fan_out_all(store, T0).await;
    let claim = claim_of(5, &[("busy", 0)]);
    let first = store
        .claim_deliveries(claim.clone(), T0)
        .await
        .expect("claim");
    assert_eq!(first.len(), 1, "the subscription without room is skipped");
    assert_eq!(first[0].subscription_id, "s");
    assert!(store
        .claim_deliveries(claim.clone(), T0 + LEASE_US - 1)
        .await
        .expect("claim")
        .is_empty());
    let again = store
        .claim_deliveries(claim, T0 + LEASE_US)
        .await
        .expect("claim");
    assert_eq!((again[0].id, again[0].attempts), (first[0].id, 2));
}

pub async fn no_subscription_takes_more_than_its_room(store: Arc<dyn Store>) {
    let store = &*store;
    put(store, subscription("a", TENANT, &["entity.created"], &[])).await;
    put(store, subscription("b", TENANT, &["entity.created"], &[])).await;
    for _ in 0..5 {
        create(store, new_entity("single", BODY), T0).await;
    }
    fan_out_all(store, T0).await;
    let taken = store
        .claim_deliveries(claim_of(2, &[("b", 1)]), T0)
        .await
        .expect("claim");
    let count = |sub: &str| taken.iter().filter(|d| d.subscription_id == sub).count();
    assert_eq!((count("a"), count("b")), (2, 1));
    let rest = claim_deliveries(store, T0).await;
    assert_eq!(rest.len(), 10 - 3);
}

pub async fn subscriptions_hear_from_their_creation_on(store: Arc<dyn Store>) {
    let store = &*store;
    create(store, new_entity("single", BODY), T0).await;
    // A subscription hears what the fan-out reaches after it was stored.
    fan_out_all(store, T0).await;
    let sub = put(store, subscription("late", TENANT, &[], &[])).await;
    assert!(sub.start_pos > 0);
    let second = create(store, new_entity("single", BODY), T0).await;
    assert_eq!(fan_out_all(store, T0).await, 1, "only what came after");
    let listed = store
        .deliveries(
            "late",
            DeliveryQuery {
                limit: 10,
                ..DeliveryQuery::default()
            },
        )
        .await
        .expect("deliveries");
    assert_eq!(listed[0].notification.entity_id, second.id);
    // Storing it again keeps where it started and what it has.
    let again = put(store, subscription("late", TENANT, &["entity.ready"], &[])).await;
    assert_eq!(again.start_pos, sub.start_pos);
    assert_eq!(again.events, vec!["entity.ready".to_owned()]);
    assert_eq!(
        store.subscriptions(Some(TENANT)).await.expect("list")[0]
            .1
            .pending,
        1
    );
    assert!(store
        .subscriptions(Some(OTHER_TENANT))
        .await
        .expect("list")
        .is_empty());
    assert!(!store
        .delete_subscription(OTHER_TENANT, "late")
        .await
        .expect("delete"));
    assert!(store
        .delete_subscription(TENANT, "late")
        .await
        .expect("delete"));
    assert!(store.subscriptions(None).await.expect("list").is_empty());
    let gone = store
        .deliveries(
            "late",
            DeliveryQuery {
                limit: 10,
                ..DeliveryQuery::default()
            },
        )
        .await
        .expect("deliveries");
    assert!(gone.is_empty(), "its deliveries go with it");
}

pub async fn pruning_keeps_the_newest_and_what_is_not_fanned_out(store: Arc<dyn Store>) {
    let store = &*store;
    ready_and_cancelled(store).await;
    // Nothing is pruned before the fan-out passed it.
    let later = T0 + 3_600 * SECOND_US;
    if store.is_shared() {
        assert_eq!(store.prune_outbox(later, 100).await.expect("prune"), 0);
    }
    fan_out_all(store, T0 + SECOND_US).await;
    let head = store.outbox_head().await.expect("head");
    assert_eq!(
        store.prune_outbox(T0, 100).await.expect("prune"),
        0,
        "too young"
    );
    assert_eq!(store.prune_outbox(later, 100).await.expect("prune"), 3);
    let left = store.outbox(0, 100).await.expect("outbox");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, head, "the newest row stays");
    // New rows carry on after it.
    create(store, new_entity("single", BODY), T0).await;
    fan_out_all(store, T0).await;
    let next = store.outbox(head, 100).await.expect("outbox");
    assert_eq!(next.len(), 1);
    assert!(next[0].id > head);
}

/// What a change watcher heard: the entities (if named), whether outbox
/// rows were written, whether positions were given.
type Heard = (Option<Vec<EntityId>>, bool, bool);

pub async fn change_watchers_hear_commits(store: Arc<dyn Store>) {
    let heard: Arc<std::sync::Mutex<Vec<Heard>>> = Arc::default();
    let notify = Arc::new(tokio::sync::Notify::new());
    let (h, n) = (heard.clone(), notify.clone());
    store.watch_changes(Arc::new(move |c: &Changes<'_>| {
        h.lock().expect("heard").push((
            c.entities.map(<[EntityId]>::to_vec),
            c.outbox_written,
            c.sequenced,
        ));
        n.notify_one();
    }));
    let store = &*store;
    let wait_for = |pred: Box<dyn Fn(&Heard) -> bool + Send>| {
        let (heard, notify) = (heard.clone(), notify.clone());
        async move {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                if heard.lock().expect("heard").iter().any(&pred) {
                    return true;
                }
                if tokio::time::timeout_at(deadline, notify.notified())
                    .await
                    .is_err()
                {
                    return false;
                }
            }
        }
    };
    if store.is_shared() {
        // What commits before the listener listens is not heard; it says
        // "anything" once it does.
        assert!(
            wait_for(Box::new(|c| c.0.is_none())).await,
            "the listener listens"
        );
    }
    heard.lock().expect("heard").clear();
    let record = create(store, new_entity("single", BODY), T0).await;
    let id = record.id;
    assert!(
        wait_for(Box::new(
            move |c| c.1 && c.0.as_ref().is_none_or(|ids| ids.contains(&id))
        ))
        .await,
        "a create says it wrote to the outbox, naming the entity where it can"
    );
    store.fan_out(100, T0).await.expect("fan out");
    assert!(
        wait_for(Box::new(|c| c.2)).await,
        "new positions are announced"
    );
}
