//! Tenant isolation as a property: random histories of submissions (with
//! idempotency keys shared across tenants), reads, lists, commands and
//! counts by three tenants, checked against a model of who owns what.

use std::collections::HashMap;
use std::sync::Arc;

use super::*;

const TENANTS: [&str; 3] = ["t-a", "t-b", "t-c"];
const KEYS: [&str; 3] = ["k-1", "k-2", "k-3"];
const SEEDS: u64 = 8;
const STEPS: usize = 40;

/// Whatever a tenant does, it sees exactly its own entities: a get, a data
/// read, a history read, a cancel or a retry of another tenant's id finds
/// nothing and changes nothing; an idempotency key replays only within its
/// tenant; lists and counts hold the tenant's own entities only.
pub async fn tenants_never_see_each_other_in_random_histories(store: Arc<dyn Store>) {
    let store = &*store;
    for seed in 0..SEEDS {
        let mut rng = fastrand::Rng::with_seed(seed);
        // Each seed's entities carry their own type of tenant names.
        let tenant = |i: usize| format!("{}-{seed}", TENANTS[i]);
        let mut owner: HashMap<EntityId, String> = HashMap::new();
        let mut cancelled: HashMap<EntityId, bool> = HashMap::new();
        let mut keyed: HashMap<(String, &str), EntityId> = HashMap::new();
        let mut now = T0;
        for _ in 0..STEPS {
            now += 1_000;
            let me = tenant(rng.usize(..TENANTS.len()));
            let known: Vec<EntityId> = owner.keys().copied().collect();
            match rng.u8(..6) {
                0 | 1 => {
                    let mut e = new_entity("w5", BODY);
                    e.tenant = me.clone();
                    let key = rng.bool().then(|| KEYS[rng.usize(..KEYS.len())]);
                    e.idempotency_key = key.map(str::to_owned);
                    let outcome = store.create(e.clone(), now).await.expect("create");
                    match (key.and_then(|k| keyed.get(&(me.clone(), k))), outcome) {
                        (Some(first), IntakeOutcome::Replayed(r)) => {
                            assert_eq!(r.id, *first, "seed {seed}: a key replays its tenant's entity");
                        }
                        (None, IntakeOutcome::Created(r)) => {
                            assert_eq!(r.tenant, me);
                            owner.insert(r.id, me.clone());
                            cancelled.insert(r.id, false);
                            if let Some(k) = key {
                                keyed.insert((me.clone(), k), r.id);
                            }
                        }
                        (expected, got) => panic!(
                            "seed {seed}: {me} with key {key:?} (first entity {expected:?}) got {got:?}"
                        ),
                    }
                }
                _ if known.is_empty() => {}
                2 => {
                    let id = known[rng.usize(..known.len())];
                    let mine = owner[&id] == me;
                    let got = store.get(&me, id).await.expect("get");
                    assert_eq!(got.is_some(), mine, "seed {seed}: get of {id} by {me}");
                    let data = store.get_data(&me, id).await.expect("get_data");
                    assert_eq!(data.is_some(), mine, "seed {seed}: data of {id} by {me}");
                    let events = store.events(&me, id, 0, 10).await.expect("events");
                    assert_eq!(
                        events.is_some(),
                        mine,
                        "seed {seed}: history of {id} by {me}"
                    );
                }
                3 => {
                    let id = known[rng.usize(..known.len())];
                    let mine = owner[&id] == me;
                    let outcome = store.cancel(&me, id, now).await.expect("cancel");
                    match outcome {
                        CommandOutcome::NotFound => {
                            assert!(!mine, "seed {seed}: own {id} not found")
                        }
                        CommandOutcome::Applied(r) => {
                            assert!(
                                mine && r.tenant == me,
                                "seed {seed}: {me} cancelled {id} of {}",
                                owner[&id]
                            );
                            cancelled.insert(id, true);
                        }
                        CommandOutcome::Conflict(_) => {
                            assert!(mine && cancelled[&id], "seed {seed}: conflict on {id}");
                        }
                        other => panic!("seed {seed}: cancel of {id}: {other:?}"),
                    }
                }
                4 => {
                    let id = known[rng.usize(..known.len())];
                    let outcome = store.retry(&me, id, now).await.expect("retry");
                    if owner[&id] != me {
                        assert_eq!(
                            outcome,
                            CommandOutcome::NotFound,
                            "seed {seed}: retry of {id}"
                        );
                    }
                }
                _ => {
                    let all = ListQuery {
                        limit: 1_000,
                        ..ListQuery::default()
                    };
                    let mut listed: Vec<EntityId> = store
                        .list(&me, all)
                        .await
                        .expect("list")
                        .iter()
                        .map(|r| r.id)
                        .collect();
                    listed.sort();
                    let mut own: Vec<EntityId> = owner
                        .iter()
                        .filter(|(_, t)| **t == me)
                        .map(|(id, _)| *id)
                        .collect();
                    own.sort();
                    assert_eq!(listed, own, "seed {seed}: the list of {me}");
                }
            }
        }
        // Every entity is where the model says, and counts agree.
        let counts = store.counts(now).await.expect("counts");
        for i in 0..TENANTS.len() {
            let me = tenant(i);
            let own = owner.values().filter(|t| **t == me).count() as u64;
            let counted: u64 = counts
                .of_tenant(&me)
                .entities
                .iter()
                .map(|(_, _, n)| n)
                .sum();
            assert_eq!(counted, own, "seed {seed}: the counts of {me}");
            let pending = owner
                .iter()
                .filter(|(id, t)| **t == me && !cancelled[*id])
                .count() as u64;
            let live: u64 = store
                .live_entities(&me, "w5")
                .await
                .expect("live")
                .iter()
                .map(|(_, n)| n)
                .sum();
            assert_eq!(live, pending, "seed {seed}: the live entities of {me}");
        }
    }
}
