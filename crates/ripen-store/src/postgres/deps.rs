//! The SQL of entity dependencies on PostgreSQL (see `crate::deps` for the
//! decisions).
//!
//! - A create reads the entities it references under a share lock, so
//!   none of them settles while the create decides: a dependent that waits
//!   is indexed in `dependencies` before its parent's settling commits,
//!   and so before the fan-out gives that change an outbox position.
//! - The resolver reads outbox rows by position after its cursor (the
//!   `dependencies` row of `cursors`), reads the parent's status and its
//!   waiting dependents outside any transaction, and tells each dependent
//!   in a transaction of its own that locks only that entity. Any number
//!   of nodes may run it at once: a dependent told twice refuses the
//!   second time, and the cursor only moves forward.

use std::collections::HashMap;

use ripen_core::{EntityStatus, Input, UnixMicros};

use super::{decode_error, id_params, Conn, Shared, WriteFuture};
use crate::decode::{entity_id, entity_status, to_i64, to_u64};
use crate::deps::{self, DependencyRecord, Parent, Resolved};
use crate::working;
use crate::{CommandOutcome, EntityId, IntakeOutcome, NewEntity, Result, StoreError};

/// Schema version 4: the `deps` column, the index of waiting dependents
/// by the entity they wait for, and the resolver's cursor (at the head:
/// no entity of an older database waits for another).
pub(super) const SCHEMA: &str = "
ALTER TABLE entities ADD COLUMN IF NOT EXISTS deps text;
CREATE TABLE IF NOT EXISTS dependencies (
    parent bytea NOT NULL,
    dependent bytea NOT NULL,
    PRIMARY KEY (parent, dependent)
);
INSERT INTO cursors (name, pos) SELECT 'dependencies', COALESCE(MAX(pos), 0) FROM outbox
    ON CONFLICT (name) DO NOTHING;
";

/// Checks the references of the creators of a create batch, inside its
/// transaction: the referenced entities are share-locked in id order and
/// read with how many dependents wait for each. A refused create leaves
/// `creators`, gets its answer in `results`, and gives its idempotency
/// key back. Returns the dependencies of each accepted create that has
/// references, by its index.
pub(super) async fn check_creates(
    conn: &Conn,
    entities: &[&NewEntity],
    creators: &mut Vec<usize>,
    results: &mut [Option<Result<IntakeOutcome>>],
) -> Result<HashMap<usize, Vec<DependencyRecord>>> {
    let mut found = HashMap::new();
    let referencing: Vec<usize> = creators
        .iter()
        .copied()
        .filter(|&j| !entities[j].refs.is_empty())
        .collect();
    if referencing.is_empty() {
        return Ok(found);
    }
    let mut ids: Vec<EntityId> = referencing
        .iter()
        .flat_map(|&j| entities[j].refs.iter().map(|r| r.id))
        .collect();
    ids.sort();
    ids.dedup();
    let rows = conn
        .query(
            "SELECT e.id, e.tenant, e.type, e.status,
                    (SELECT count(*) FROM dependencies d WHERE d.parent = e.id)
             FROM entities e WHERE e.id = ANY($1) ORDER BY e.id FOR SHARE OF e",
            &[&id_params(&ids)],
        )
        .await?;
    let mut parents = HashMap::with_capacity(rows.len());
    for row in &rows {
        let id = entity_id(row.try_get::<_, &[u8]>(0).map_err(decode_error)?)?;
        let status: &str = row.try_get(3).map_err(decode_error)?;
        let waiting: i64 = row.try_get(4).map_err(decode_error)?;
        parents.insert(
            id,
            Parent {
                tenant: row.try_get(1).map_err(decode_error)?,
                type_name: row.try_get(2).map_err(decode_error)?,
                status: entity_status(status)?,
                waiting: u64::try_from(waiting).unwrap_or(0),
            },
        );
    }
    let mut added = HashMap::new();
    let mut refused: Vec<usize> = Vec::new();
    for j in referencing {
        let e = entities[j];
        match deps::check_references(&e.tenant, &e.refs, &parents, &mut added) {
            Ok(records) => {
                found.insert(j, records);
            }
            Err(refusal) => {
                results[j] = Some(Ok(IntakeOutcome::ReferenceRefused(refusal)));
                refused.push(j);
            }
        }
    }
    if !refused.is_empty() {
        creators.retain(|j| !refused.contains(j));
        let keyed: Vec<usize> = refused
            .into_iter()
            .filter(|&j| entities[j].idempotency_key.is_some())
            .collect();
        if !keyed.is_empty() {
            let tenants: Vec<&str> = keyed.iter().map(|&j| entities[j].tenant.as_str()).collect();
            let types: Vec<&str> = keyed
                .iter()
                .map(|&j| entities[j].type_name.as_str())
                .collect();
            let keys: Vec<&str> = keyed
                .iter()
                .map(|&j| entities[j].idempotency_key.as_deref().unwrap_or_default())
                .collect();
            let ids: Vec<&[u8]> = keyed
                .iter()
                .map(|&j| entities[j].id.as_bytes().as_slice())
                .collect();
            conn.query(
                "DELETE FROM idempotency i
                 USING UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[])
                       AS k(tenant, type, key, entity_id)
                 WHERE i.tenant = k.tenant AND i.type = k.type AND i.key = k.key
                   AND i.entity_id = k.entity_id",
                &[&tenants, &types, &keys, &ids],
            )
            .await?;
        }
    }
    Ok(found)
}

/// Queues the writes of `dependencies` rows beside a batch's other writes.
pub(super) async fn push_waits<'a>(
    conn: &'a Conn,
    writes: &mut Vec<WriteFuture<'a>>,
    added: [&'a Vec<Vec<u8>>; 2],
    removed: [&'a Vec<Vec<u8>>; 2],
) -> Result<()> {
    if !removed[0].is_empty() {
        let statement = conn
            .statement(
                "DELETE FROM dependencies d
                 USING UNNEST($1::bytea[], $2::bytea[]) AS u(parent, dependent)
                 WHERE d.parent = u.parent AND d.dependent = u.dependent",
            )
            .await?;
        writes.push(Box::pin(async move {
            conn.client()
                .execute(&statement, &[removed[0], removed[1]])
                .await
                .map_err(|e| conn.fail(e))
        }));
    }
    if !added[0].is_empty() {
        let statement = conn
            .statement(
                "INSERT INTO dependencies (parent, dependent)
                 SELECT * FROM UNNEST($1::bytea[], $2::bytea[])
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        writes.push(Box::pin(async move {
            conn.client()
                .execute(&statement, &[added[0], added[1]])
                .await
                .map_err(|e| conn.fail(e))
        }));
    }
    Ok(())
}

/// One resolver round.
pub(super) async fn resolve(shared: &Shared, now_us: UnixMicros) -> Result<Resolved> {
    let conn = shared.pool.get().await?;
    let idle = conn
        .query_opt(
            "SELECT c.pos FROM cursors c
             WHERE c.name = $1 AND NOT EXISTS (SELECT 1 FROM dependencies)
               AND (SELECT COALESCE(MAX(pos), 0) FROM outbox) - c.pos < $2",
            &[&deps::CURSOR, &to_i64(deps::IDLE_LAG_MAX, "lag")?],
        )
        .await?;
    if let Some(row) = idle {
        // Nothing to do, and the cursor may stay where it is.
        let pos: i64 = row.try_get(0).map_err(decode_error)?;
        return Ok(Resolved {
            last_pos: to_u64(pos, "cursors.pos")?,
            ..Resolved::default()
        });
    }
    // While nobody waits, nothing that settled so far has anyone to tell:
    // the cursor moves to the head in one statement, whose snapshot holds
    // every wait row committed before the changes it passes.
    let skipped = conn
        .query_opt(
            "UPDATE cursors SET pos = GREATEST(pos, (SELECT COALESCE(MAX(pos), 0) FROM outbox))
             WHERE name = $1 AND NOT EXISTS (SELECT 1 FROM dependencies)
             RETURNING pos",
            &[&deps::CURSOR],
        )
        .await?;
    if let Some(row) = skipped {
        let pos: i64 = row.try_get(0).map_err(decode_error)?;
        return Ok(Resolved {
            last_pos: to_u64(pos, "cursors.pos")?,
            ..Resolved::default()
        });
    }
    let from: i64 = conn
        .query_opt("SELECT pos FROM cursors WHERE name = $1", &[&deps::CURSOR])
        .await?
        .map(|r| r.try_get(0))
        .transpose()
        .map_err(decode_error)?
        .unwrap_or(0);
    // Only the rows of entities that someone waits for, among the next
    // RESOLVE_SCAN_MAX positions. Every position up to the largest one
    // visible has committed (the fan-out gives them one round at a time).
    let head: i64 = conn
        .query_opt("SELECT COALESCE(MAX(pos), 0) FROM outbox", &[])
        .await?
        .map(|r| r.try_get(0))
        .transpose()
        .map_err(decode_error)?
        .unwrap_or(0);
    let upto = head.min(from.saturating_add(to_i64(deps::RESOLVE_SCAN_MAX, "scan")?));
    let rows = conn
        .query(
            "SELECT o.pos, o.entity_id, o.kind, o.body, n.status
             FROM outbox o JOIN entities n ON n.id = o.entity_id
             WHERE o.pos > $1 AND o.pos <= $3
               AND EXISTS (SELECT 1 FROM dependencies d WHERE d.parent = o.entity_id)
             ORDER BY o.pos LIMIT $2",
            &[&from, &i64::from(deps::RESOLVE_ROWS_MAX), &upto],
        )
        .await?;
    let full = rows.len() >= deps::RESOLVE_ROWS_MAX as usize;
    let mut round = Resolved {
        last_pos: to_u64(from, "cursors.pos")?,
        more: full || upto < head,
        ..Resolved::default()
    };
    let mut budget = deps::RESOLVE_VISITS_MAX;
    let mut passed_all = true;
    for row in &rows {
        let pos = to_u64(row.try_get(0).map_err(decode_error)?, "outbox.pos")?;
        let parent = entity_id(row.try_get::<_, &[u8]>(1).map_err(decode_error)?)?;
        let kind: &str = row.try_get(2).map_err(decode_error)?;
        let body: &str = row.try_get(3).map_err(decode_error)?;
        if deps::body_settles(kind, body) {
            let now = entity_status(row.try_get(4).map_err(decode_error)?)?;
            let read = dependents(&conn, parent, budget + 1).await?;
            let (visit, finished) = deps::plan_visits(read.len(), budget);
            for &dependent in &read[..visit] {
                round.visited += 1;
                conn.begin().await?;
                let result = wake(shared, &conn, parent, dependent, now, now_us).await;
                match conn.finish(result).await? {
                    Some((changed, released)) => {
                        round.changed += usize::from(changed);
                        round.released += usize::from(released);
                    }
                    None => round.stalled = true,
                }
            }
            budget -= visit;
            if round.stalled || !finished {
                round.more |= !round.stalled;
                passed_all = false;
                break;
            }
        }
        round.rows += 1;
        round.last_pos = pos;
    }
    if passed_all && !full {
        // Every row up to `upto` was read or concerns nobody.
        round.last_pos = round.last_pos.max(to_u64(upto, "pos")?);
    }
    let last = to_i64(round.last_pos, "pos")?;
    if last > from {
        conn.query(
            "UPDATE cursors SET pos = GREATEST(pos, $2) WHERE name = $1",
            &[&deps::CURSOR, &last],
        )
        .await?;
    }
    Ok(round)
}

/// Up to `limit` entities waiting for `parent`.
async fn dependents(conn: &Conn, parent: EntityId, limit: usize) -> Result<Vec<EntityId>> {
    let rows = conn
        .query(
            "SELECT dependent FROM dependencies WHERE parent = $1 ORDER BY dependent LIMIT $2",
            &[
                &parent.as_bytes().as_slice(),
                &i64::try_from(limit).unwrap_or(i64::MAX),
            ],
        )
        .await?;
    rows.iter()
        .map(|r| entity_id(r.try_get::<_, &[u8]>(0).map_err(decode_error)?))
        .collect()
}

/// Tells one dependent, in the caller's transaction, what its parent is
/// now. Returns whether it changed and whether its steps were released;
/// `None` when this node does not know its pipeline.
async fn wake(
    shared: &Shared,
    conn: &Conn,
    parent: EntityId,
    dependent: EntityId,
    now: EntityStatus,
    now_us: UnixMicros,
) -> Result<Option<(bool, bool)>> {
    let mut result = (false, false);
    let mut entities = match shared.load_locked(conn, std::iter::once(dependent)).await {
        Ok(entities) => entities,
        Err(e @ StoreError::UnknownPipeline { .. }) => {
            tracing::warn!(entity = %dependent, error = %e, "cannot tell an entity of the one it depends on");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    if let Some(w) = entities.first_mut() {
        let changed = shared.decider.wake(w, parent, Some(now), now_us);
        let released =
            changed && w.state().status == EntityStatus::Pending && !w.state().is_waiting();
        result = (changed, released);
    }
    shared.save(conn, &mut entities, now_us).await?;
    if let Some(row) = deps::visited(parent, dependent, now) {
        conn.query(
            "DELETE FROM dependencies WHERE parent = $1 AND dependent = $2",
            &[
                &row.parent.as_bytes().as_slice(),
                &row.dependent.as_bytes().as_slice(),
            ],
        )
        .await?;
    }
    Ok(Some(result))
}

/// An operator retry, checked against what the entity depends on, in the
/// caller's transaction.
pub(super) async fn retry(
    shared: &Shared,
    conn: &Conn,
    tenant: &str,
    id: EntityId,
    now_us: UnixMicros,
) -> Result<CommandOutcome> {
    let Some(stored) = shared.lock_entity(conn, tenant, id).await? else {
        return Ok(CommandOutcome::NotFound);
    };
    let ids: Vec<EntityId> = stored.record.deps.iter().map(|d| d.id).collect();
    let mut now = HashMap::with_capacity(ids.len());
    if !ids.is_empty() {
        let rows = conn
            .query(
                "SELECT id, status FROM entities WHERE id = ANY($1)",
                &[&id_params(&ids)],
            )
            .await?;
        for row in &rows {
            let parent = entity_id(row.try_get::<_, &[u8]>(0).map_err(decode_error)?)?;
            now.insert(
                parent,
                entity_status(row.try_get(1).map_err(decode_error)?)?,
            );
        }
    }
    let mut w = shared.decider.working(stored)?;
    let refused = if ids.is_empty() {
        shared.decider.command(&mut w, Input::Retry, now_us)?
    } else if let Some(outcome) = shared.decider.retry_checked(&mut w, &now, now_us)? {
        return Ok(outcome);
    } else {
        None
    };
    shared
        .save(conn, std::slice::from_mut(&mut w), now_us)
        .await?;
    Ok(working::command_outcome(w, refused))
}
