//! The SQLite side of the type registry: the `type_versions` table, and
//! failing entities whose pipeline cannot run. Registrations and failures
//! run on the writer thread inside a batch's transaction, so a registration
//! reads the latest version and writes the next one with no other writer in
//! between; reads run on read connections.

use ripen_core::UnixMicros;
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{encode_steps, read_entity, Writer};
use crate::decode::{to_u32, to_u64};
use crate::registry::{self, Decision, NewTypeVersion, Registered, Reseal, TypeHead, TypeVersion};
use crate::working::Rows;
use crate::{EntityId, EntityRecord, Result};

/// The registry's table: in a fresh schema, and added by the upgrade to
/// version 5. Versions are never deleted.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS type_versions (
    type TEXT NOT NULL,
    version INTEGER NOT NULL,
    definition TEXT NOT NULL,
    digest TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    forced INTEGER NOT NULL,
    incompatibilities TEXT NOT NULL,
    PRIMARY KEY (type, version)
) WITHOUT ROWID;
";

const COLUMNS: &str = "type, version, definition, digest, created_at, forced, incompatibilities";

fn type_version(r: &Row<'_>) -> Result<TypeVersion> {
    Ok(TypeVersion {
        type_name: r.get(0)?,
        version: to_u32(r.get(1)?, "type_versions.version")?,
        definition: r.get(2)?,
        digest: r.get(3)?,
        created_at_us: r.get(4)?,
        forced: r.get(5)?,
        incompatibilities: r.get(6)?,
    })
}

/// Registers `new` after the latest version of its type (see
/// [`registry::decide`]).
pub(super) fn register(
    conn: &Connection,
    new: &NewTypeVersion,
    now_us: UnixMicros,
) -> Result<Registered> {
    let latest = conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM type_versions WHERE type = ?1 ORDER BY version DESC LIMIT 1"
        ))?
        .query_row([&new.type_name], |r| Ok(type_version(r)))
        .optional()?
        .transpose()?;
    Ok(match registry::decide(latest.as_ref(), new) {
        Decision::Unchanged | Decision::Moved => match latest {
            Some(l) if l.digest == new.digest => Registered::Unchanged(l),
            other => Registered::Moved(other),
        },
        Decision::Taken { latest } => Registered::Taken { latest },
        Decision::Insert(version) => {
            let row = registry::inserted(new, version, now_us);
            conn.prepare_cached(&format!(
                "INSERT INTO type_versions ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
            ))?
            .execute(params![
                row.type_name,
                i64::from(row.version),
                row.definition,
                row.digest,
                row.created_at_us,
                row.forced,
                row.incompatibilities,
            ])?;
            Registered::Created(row)
        }
    })
}

/// Writes each value whose row still holds what was read, in the writer's
/// transaction.
pub(super) fn reseal(conn: &Connection, values: &[Reseal]) -> Result<u64> {
    let mut changed = 0;
    for value in values {
        changed += match value {
            Reseal::Secret {
                subscription_id,
                was,
                now,
            } => conn
                .prepare_cached(
                    "UPDATE subscriptions SET secret = ?1 WHERE id = ?2 AND secret = ?3",
                )?
                .execute(params![now, subscription_id, was])?,
            Reseal::Definition {
                type_name,
                version,
                was,
                now,
            } => conn
                .prepare_cached(
                    "UPDATE type_versions SET definition = ?1
                     WHERE type = ?2 AND version = ?3 AND definition = ?4",
                )?
                .execute(params![now, type_name, i64::from(*version), was])?,
        } as u64;
    }
    Ok(changed)
}

pub(super) fn type_versions(
    conn: &Connection,
    type_name: Option<&str>,
) -> Result<Vec<TypeVersion>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM type_versions WHERE ?1 IS NULL OR type = ?1 ORDER BY type, version"
    ))?;
    let mut rows = stmt.query([type_name])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(type_version(r)?);
    }
    Ok(out)
}

pub(super) fn type_heads(conn: &Connection) -> Result<Vec<TypeHead>> {
    let mut stmt = conn.prepare_cached(
        "SELECT type, MAX(version), COUNT(*) FROM type_versions GROUP BY type ORDER BY type",
    )?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(TypeHead {
            type_name: r.get(0)?,
            latest_version: to_u32(r.get(1)?, "type_versions.version")?,
            versions: to_u32(r.get(2)?, "count")?,
        });
    }
    Ok(out)
}

/// Pending entities by version, through the (tenant, type, status) index.
pub(super) fn live_entities(
    conn: &Connection,
    tenant: &str,
    type_name: &str,
) -> Result<Vec<(u32, u64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT version, COUNT(*) FROM entities
         WHERE tenant = ?1 AND type = ?2 AND status = 'pending'
         GROUP BY version ORDER BY version",
    )?;
    let mut rows = stmt.query(params![tenant, type_name])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push((
            to_u32(r.get(0)?, "entities.version")?,
            to_u64(r.get(1)?, "count")?,
        ));
    }
    Ok(out)
}

/// Fails the pending entities among `ids` that the writer's decider cannot
/// run, and drops their due rows.
pub(super) fn fail_unrunnable(
    w: &mut Writer,
    ids: &[EntityId],
    now_us: UnixMicros,
) -> Result<Vec<EntityRecord>> {
    let mut rows = Rows::default();
    let mut columns = Vec::new();
    let mut failed = Vec::new();
    let mut outputs = Vec::new();
    // Each entity once: its rows are written after the loop.
    let mut ids = ids.to_vec();
    ids.sort();
    ids.dedup();
    for id in ids {
        let Some(stored) = read_entity(&w.conn, id)? else {
            continue;
        };
        let Some((record, mut one)) = w.decider.abandon(&stored, now_us) else {
            continue;
        };
        w.conn
            .prepare_cached("DELETE FROM due WHERE entity_id = ?1")?
            .execute([id.as_bytes()])?;
        rows.steps.append(&mut one.steps);
        rows.entities.append(&mut one.entities);
        rows.events.append(&mut one.events);
        rows.outbox.append(&mut one.outbox);
        outputs.push(stored.outputs);
        failed.push(record);
    }
    for (record, outputs) in failed.iter().zip(&outputs) {
        columns.push(encode_steps(&record.steps, outputs));
    }
    w.write_rows(&rows, &columns)?;
    Ok(failed)
}
