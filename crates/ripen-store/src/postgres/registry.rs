//! The PostgreSQL side of the type registry, shared by every node: the
//! `type_versions` table, and failing entities whose pipeline cannot run.
//!
//! A registration holds a transaction-scoped advisory lock on its type
//! while it reads the latest version and writes the next, so two nodes that
//! register the same type at once are serialized: the second one sees the
//! first one's version (the same content: unchanged; other content: moved).
//! Failing an entity locks its row first, like every other change to it.

use ripen_core::UnixMicros;
use tokio_postgres::Row;

use super::{decode_error, id_params, Conn, Shared, Writes};
use crate::decode::{entity_id, to_u32, to_u64};
use crate::registry::{self, Decision, NewTypeVersion, Registered, Reseal, TypeHead, TypeVersion};
use crate::working::Rows;
use crate::{EntityId, EntityRecord, Result};

/// Added to the schema in version 4. Versions are never deleted.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS type_versions (
    type text NOT NULL,
    version bigint NOT NULL,
    definition text NOT NULL,
    digest text NOT NULL,
    created_at bigint NOT NULL,
    forced boolean NOT NULL,
    incompatibilities text NOT NULL,
    PRIMARY KEY (type, version)
);
";

/// The first key of the advisory locks of registrations (the second is the
/// type's hash).
const REGISTER_LOCK: i32 = 0x7269_7072; // "ripr"

const COLUMNS: &str = "type, version, definition, digest, created_at, forced, incompatibilities";

fn type_version(r: &Row) -> Result<TypeVersion> {
    Ok(TypeVersion {
        type_name: r.try_get(0).map_err(decode_error)?,
        version: to_u32(r.try_get(1).map_err(decode_error)?, "type_versions.version")?,
        definition: r.try_get(2).map_err(decode_error)?,
        digest: r.try_get(3).map_err(decode_error)?,
        created_at_us: r.try_get(4).map_err(decode_error)?,
        forced: r.try_get(5).map_err(decode_error)?,
        incompatibilities: r.try_get(6).map_err(decode_error)?,
    })
}

/// Registers `new` after the latest version of its type, inside the
/// caller's transaction.
pub(super) async fn register(
    conn: &Conn,
    new: &NewTypeVersion,
    now_us: UnixMicros,
) -> Result<Registered> {
    conn.query(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&REGISTER_LOCK, &new.type_name],
    )
    .await?;
    let latest = conn
        .query_opt(
            &format!(
                "SELECT {COLUMNS} FROM type_versions WHERE type = $1 ORDER BY version DESC LIMIT 1"
            ),
            &[&new.type_name],
        )
        .await?
        .as_ref()
        .map(type_version)
        .transpose()?;
    Ok(match registry::decide(latest.as_ref(), new) {
        Decision::Unchanged | Decision::Moved => match latest {
            Some(l) if l.digest == new.digest => Registered::Unchanged(l),
            other => Registered::Moved(other),
        },
        Decision::Taken { latest } => Registered::Taken { latest },
        Decision::Insert(version) => {
            let row = registry::inserted(new, version, now_us);
            conn.query(
                &format!(
                    "INSERT INTO type_versions ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
                ),
                &[
                    &row.type_name,
                    &i64::from(row.version),
                    &row.definition,
                    &row.digest,
                    &row.created_at_us,
                    &row.forced,
                    &row.incompatibilities,
                ],
            )
            .await?;
            Registered::Created(row)
        }
    })
}

/// Writes each value whose row still holds what was read, inside the
/// caller's transaction.
pub(super) async fn reseal(conn: &Conn, values: &[Reseal]) -> Result<u64> {
    let mut changed = 0;
    for value in values {
        changed += match value {
            Reseal::Secret {
                subscription_id,
                was,
                now,
            } => conn
                .query(
                    "UPDATE subscriptions SET secret = $1 WHERE id = $2 AND secret = $3
                     RETURNING 1",
                    &[now, subscription_id, was],
                )
                .await?
                .len(),
            Reseal::Definition {
                type_name,
                version,
                was,
                now,
            } => conn
                .query(
                    "UPDATE type_versions SET definition = $1
                     WHERE type = $2 AND version = $3 AND definition = $4 RETURNING 1",
                    &[now, type_name, &i64::from(*version), was],
                )
                .await?
                .len(),
        } as u64;
    }
    Ok(changed)
}

pub(super) async fn type_versions(
    conn: &Conn,
    type_name: Option<&str>,
) -> Result<Vec<TypeVersion>> {
    let rows = conn
        .query(
            &format!(
                "SELECT {COLUMNS} FROM type_versions WHERE $1::text IS NULL OR type = $1
                 ORDER BY type, version"
            ),
            &[&type_name],
        )
        .await?;
    rows.iter().map(type_version).collect()
}

pub(super) async fn type_heads(conn: &Conn) -> Result<Vec<TypeHead>> {
    let rows = conn
        .query(
            "SELECT type, MAX(version), COUNT(*) FROM type_versions GROUP BY type ORDER BY type",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(TypeHead {
                type_name: r.try_get(0).map_err(decode_error)?,
                latest_version: to_u32(r.try_get(1).map_err(decode_error)?, "version")?,
                versions: to_u32(r.try_get(2).map_err(decode_error)?, "count")?,
            })
        })
        .collect()
}

pub(super) async fn live_entities(
    conn: &Conn,
    tenant: &str,
    type_name: &str,
) -> Result<Vec<(u32, u64)>> {
    let rows = conn
        .query(
            "SELECT version, COUNT(*) FROM entities
             WHERE tenant = $1 AND type = $2 AND status = 'pending'
             GROUP BY version ORDER BY version",
            &[&tenant, &type_name],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                to_u32(r.try_get(0).map_err(decode_error)?, "entities.version")?,
                to_u64(r.try_get(1).map_err(decode_error)?, "count")?,
            ))
        })
        .collect()
}

/// Locks the pending entities among `ids` and fails those the decider
/// cannot run, inside the caller's transaction.
pub(super) async fn fail_unrunnable(
    shared: &Shared,
    conn: &Conn,
    ids: &[EntityId],
    now_us: UnixMicros,
) -> Result<Vec<EntityRecord>> {
    let mut ids = ids.to_vec();
    ids.sort();
    ids.dedup();
    let locked = conn
        .query(
            "SELECT id FROM entities WHERE id = ANY($1) AND status IN ('pending', 'ready')
             ORDER BY id FOR UPDATE",
            &[&id_params(&ids)],
        )
        .await?
        .iter()
        .map(|r| entity_id(r.try_get::<_, &[u8]>(0).map_err(decode_error)?))
        .collect::<Result<Vec<_>>>()?;
    let mut rows = Rows::default();
    let mut failed = Vec::new();
    for stored in shared.read_entities(conn, &locked).await? {
        let Some((record, mut one)) = shared.decider.abandon(&stored, now_us) else {
            continue;
        };
        rows.steps.append(&mut one.steps);
        rows.entities.append(&mut one.entities);
        rows.events.append(&mut one.events);
        rows.outbox.append(&mut one.outbox);
        failed.push(record);
    }
    if !rows.is_empty() {
        Writes::from_rows(&rows)?.execute(conn).await?;
    }
    Ok(failed)
}
