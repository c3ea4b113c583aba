//! The SQL of entity dependencies on SQLite (see `crate::deps` for the
//! decisions): the `deps` column of each entity, the `dependencies` index
//! of who waits for whom, reference checks inside the create's
//! transaction, the resolver's rounds and the checked retry.
//!
//! Everything runs on the writer's connection, so a round sees every
//! commit before it and nothing commits beside it: a dependent created
//! while its parent is pending is indexed before the parent can settle.

use std::collections::HashMap;

use ripen_core::{EntityStatus, Input, UnixMicros};
use rusqlite::{params, Connection, OptionalExtension};

use super::{read_entity, Writer};
use crate::decode::{entity_id, entity_status, to_i64, to_u64};
use crate::deps::{self, Parent, Reference, Resolved, WaitRow};
use crate::working;
use crate::{CommandOutcome, EntityId, Result};

/// From schema version 4 to 5: the `deps` column, the index of waiting
/// dependents by the entity they wait for, and the resolver's cursor (at
/// the head: no entity of an older database waits for another).
pub(super) const UPGRADE_TO_V5: &str = "
ALTER TABLE entities ADD COLUMN deps TEXT;
CREATE TABLE IF NOT EXISTS dependencies (
    parent BLOB NOT NULL,
    dependent BLOB NOT NULL,
    PRIMARY KEY (parent, dependent)
) WITHOUT ROWID;
INSERT OR IGNORE INTO cursors (name, pos)
    SELECT 'dependencies', COALESCE(MAX(id), 0) FROM outbox;
";

/// What a create reads of the entities it references.
pub(super) fn read_parents(
    conn: &Connection,
    refs: &[Reference],
) -> Result<HashMap<EntityId, Parent>> {
    let mut parents = HashMap::with_capacity(refs.len());
    let mut stmt = conn.prepare_cached(
        "SELECT tenant, type, status,
                (SELECT COUNT(*) FROM dependencies WHERE parent = ?1)
         FROM entities WHERE id = ?1",
    )?;
    for r in refs {
        if parents.contains_key(&r.id) {
            continue;
        }
        let row = stmt
            .query_row([r.id.as_bytes()], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, i64>(3)?,
                ))
            })
            .optional()?;
        if let Some((tenant, type_name, status, waiting)) = row {
            parents.insert(
                r.id,
                Parent {
                    tenant,
                    type_name,
                    status: entity_status(&status)?,
                    waiting: u64::try_from(waiting).unwrap_or(0),
                },
            );
        }
    }
    Ok(parents)
}

/// The status of each of `ids` now; missing ones are absent.
fn statuses(conn: &Connection, ids: &[EntityId]) -> Result<HashMap<EntityId, EntityStatus>> {
    let mut now = HashMap::with_capacity(ids.len());
    let mut stmt = conn.prepare_cached("SELECT status FROM entities WHERE id = ?1")?;
    for id in ids {
        if let Some(s) = stmt
            .query_row([id.as_bytes()], |r| r.get::<_, String>(0))
            .optional()?
        {
            now.insert(*id, entity_status(&s)?);
        }
    }
    Ok(now)
}

/// Binds the `dependencies` rows of a batch of changes.
pub(super) fn write_waits(conn: &Connection, added: &[WaitRow], removed: &[WaitRow]) -> Result<()> {
    for w in removed {
        conn.prepare_cached("DELETE FROM dependencies WHERE parent = ?1 AND dependent = ?2")?
            .execute(params![w.parent.as_bytes(), w.dependent.as_bytes()])?;
    }
    for w in added {
        conn.prepare_cached(
            "INSERT OR IGNORE INTO dependencies (parent, dependent) VALUES (?1, ?2)",
        )?
        .execute(params![w.parent.as_bytes(), w.dependent.as_bytes()])?;
    }
    Ok(())
}

fn cursor(conn: &Connection) -> Result<u64> {
    let pos: Option<i64> = conn
        .prepare_cached("SELECT pos FROM cursors WHERE name = ?1")?
        .query_row([deps::CURSOR], |r| r.get(0))
        .optional()?;
    to_u64(pos.unwrap_or(0), "cursors.pos")
}

fn set_cursor(conn: &Connection, pos: u64) -> Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO cursors (name, pos) VALUES (?1, ?2)")?
        .execute(params![deps::CURSOR, to_i64(pos, "pos")?])?;
    Ok(())
}

/// A round that has nothing to do, read on a reader's connection: nobody
/// waits and the cursor is less than [`deps::IDLE_LAG_MAX`] rows behind.
/// Leaving the cursor where it is loses nothing.
pub(super) fn idle(conn: &Connection) -> Result<Option<Resolved>> {
    let tx = conn.unchecked_transaction()?;
    let nobody_waits = tx
        .prepare_cached("SELECT 1 FROM dependencies LIMIT 1")?
        .query_row([], |_| Ok(()))
        .optional()?
        .is_none();
    let from = cursor(&tx)?;
    let head = super::notify::outbox_head(&tx)?;
    tx.commit()?;
    Ok(
        (nobody_waits && head.saturating_sub(from) < deps::IDLE_LAG_MAX).then(|| Resolved {
            last_pos: from,
            ..Resolved::default()
        }),
    )
}

/// One resolver round on the writer's connection.
pub(super) fn resolve(w: &mut Writer, now_us: UnixMicros) -> Result<Resolved> {
    let from = cursor(&w.conn)?;
    let mut round = Resolved {
        last_pos: from,
        ..Resolved::default()
    };
    let nobody_waits = w
        .conn
        .prepare_cached("SELECT 1 FROM dependencies LIMIT 1")?
        .query_row([], |_| Ok(()))
        .optional()?
        .is_none();
    if nobody_waits {
        // Nothing that settled so far has anyone to tell.
        let head = super::notify::outbox_head(&w.conn)?;
        if head > from {
            set_cursor(&w.conn, head)?;
            round.last_pos = head;
        }
        return Ok(round);
    }
    // Only the rows of entities that someone waits for, among the next
    // RESOLVE_SCAN_MAX positions.
    let head = super::notify::outbox_head(&w.conn)?;
    let upto = head.min(from.saturating_add(deps::RESOLVE_SCAN_MAX));
    let rows: Vec<(u64, EntityId, String, String, String)> = {
        let mut stmt = w.conn.prepare_cached(
            "SELECT o.id, o.entity_id, e.kind, e.detail, n.status
             FROM outbox o
             JOIN events e ON e.entity_id = o.entity_id AND e.seq = o.seq
             JOIN entities n ON n.id = o.entity_id
             WHERE o.id > ?1 AND o.id <= ?3
               AND EXISTS (SELECT 1 FROM dependencies d WHERE d.parent = o.entity_id)
             ORDER BY o.id LIMIT ?2",
        )?;
        let mut found = stmt.query(params![
            to_i64(from, "pos")?,
            i64::from(deps::RESOLVE_ROWS_MAX),
            to_i64(upto, "pos")?
        ])?;
        let mut rows = Vec::new();
        while let Some(r) = found.next()? {
            rows.push((
                to_u64(r.get(0)?, "outbox.id")?,
                entity_id(&r.get::<_, Vec<u8>>(1)?)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
            ));
        }
        rows
    };
    let full = rows.len() >= deps::RESOLVE_ROWS_MAX as usize;
    round.more = full || upto < head;
    let mut budget = deps::RESOLVE_VISITS_MAX;
    let mut passed_all = true;
    for (pos, parent, kind, detail, status) in rows {
        if deps::settles(&kind, &detail) {
            let now = entity_status(&status)?;
            let read = dependents(&w.conn, parent, budget + 1)?;
            let (visit, finished) = deps::plan_visits(read.len(), budget);
            for dependent in &read[..visit] {
                round.visited += 1;
                match wake(w, parent, *dependent, now, now_us, &mut round)? {
                    Some(changed) => round.changed += usize::from(changed),
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
        round.last_pos = round.last_pos.max(upto);
    }
    if round.last_pos > from {
        set_cursor(&w.conn, round.last_pos)?;
    }
    Ok(round)
}

/// Up to `limit` entities waiting for `parent`.
fn dependents(conn: &Connection, parent: EntityId, limit: usize) -> Result<Vec<EntityId>> {
    let mut stmt = conn.prepare_cached(
        "SELECT dependent FROM dependencies WHERE parent = ?1 ORDER BY dependent LIMIT ?2",
    )?;
    let mut rows = stmt.query(params![
        parent.as_bytes(),
        i64::try_from(limit).unwrap_or(i64::MAX)
    ])?;
    let mut ids = Vec::new();
    while let Some(r) = rows.next()? {
        ids.push(entity_id(&r.get::<_, Vec<u8>>(0)?)?);
    }
    Ok(ids)
}

/// Tells one dependent what its parent is now, and writes what changed.
/// Whether it changed; `None` when this node does not know its pipeline.
fn wake(
    w: &mut Writer,
    parent: EntityId,
    dependent: EntityId,
    now: EntityStatus,
    now_us: UnixMicros,
    round: &mut Resolved,
) -> Result<Option<bool>> {
    let changed = match w.load(dependent) {
        Ok(Some(mut working)) => {
            let changed = w.decider.wake(&mut working, parent, Some(now), now_us);
            if changed && working.state().status == EntityStatus::Pending {
                round.released += usize::from(!working.state().is_waiting());
            }
            w.save(std::slice::from_mut(&mut working), now_us)?;
            changed
        }
        Ok(None) => false,
        Err(e @ crate::StoreError::UnknownPipeline { .. }) => {
            tracing::warn!(entity = %dependent, error = %e, "cannot tell an entity of the one it depends on");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    if let Some(row) = deps::visited(parent, dependent, now) {
        write_waits(&w.conn, &[], &[row])?;
    }
    Ok(Some(changed))
}

/// An operator retry, checked against what the entity depends on.
pub(super) fn retry(
    w: &mut Writer,
    tenant: &str,
    id: EntityId,
    now_us: UnixMicros,
) -> Result<CommandOutcome> {
    let Some(stored) = read_entity(&w.conn, id)? else {
        return Ok(CommandOutcome::NotFound);
    };
    if stored.record.tenant != tenant {
        return Ok(CommandOutcome::NotFound);
    }
    if stored.record.deps.is_empty() {
        return w.command(tenant, id, Input::Retry, now_us);
    }
    let ids: Vec<EntityId> = stored.record.deps.iter().map(|d| d.id).collect();
    let now = statuses(&w.conn, &ids)?;
    let mut working = w.decider.working(stored)?;
    if let Some(outcome) = w.decider.retry_checked(&mut working, &now, now_us)? {
        return Ok(outcome);
    }
    w.save(std::slice::from_mut(&mut working), now_us)?;
    Ok(working::command_outcome(working, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::{catalog, new_entity, T0};
    use crate::{SqliteOptions, SqliteStore, Store, DEFAULT_TENANT};

    #[tokio::test]
    async fn a_version_4_database_gains_dependencies_with_its_cursor_at_the_head() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ripen.db");
        let store = SqliteStore::open(SqliteOptions::new(&path), catalog()).expect("open");
        let e = new_entity("single", "{}");
        let id = e.id;
        store.create(e, T0).await.expect("create");
        drop(store);
        let conn = Connection::open(&path).expect("open raw");
        conn.execute_batch(
            "ALTER TABLE entities DROP COLUMN deps;
             DROP INDEX entities_payload_kept;
             DROP INDEX idempotency_by_time;
             DROP INDEX entities_settled;
             ALTER TABLE entities DROP COLUMN payload_pruned_at;
             DROP TABLE dependencies;
             DELETE FROM cursors WHERE name = 'dependencies';
             PRAGMA user_version = 4;",
        )
        .expect("go back to version 4");
        drop(conn);
        let store = SqliteStore::open(SqliteOptions::new(&path), catalog()).expect("reopen");
        let record = store
            .get(DEFAULT_TENANT, id)
            .await
            .expect("get")
            .expect("kept");
        assert!(record.deps.is_empty());
        let head = store.outbox_head().await.expect("head");
        assert!(head > 0);
        let round = store.resolve_dependencies(T0).await.expect("resolve");
        assert_eq!((round.last_pos, round.rows), (head, 0));
        let conn = Connection::open(&path).expect("open raw");
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("version");
        assert_eq!(version, super::super::SCHEMA_VERSION);
    }
}
