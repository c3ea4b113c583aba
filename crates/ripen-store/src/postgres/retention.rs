//! The PostgreSQL side of retention: one pass of the pruner in one
//! transaction. Nodes share the work: a pass holds a transaction-scoped
//! advisory lock, so one node prunes at a time and the others return at
//! once, and it locks only the settled entities it prunes (`SKIP LOCKED`),
//! never what intake or a claim holds.

use ripen_core::UnixMicros;

use super::{decode_error, Conn, Shared};
use crate::decode::entity_id;
use crate::working::{entity_prunable, payload_prunable};
use crate::{EntityId, Prune, Pruned, Result, StoreStats, TableStats};

/// Added by the upgrade to version 6: when a payload was pruned, the index
/// of settled entities whose payload is kept and the index of settled
/// entities (both by last change), and the index of keys by time.
pub(super) const SCHEMA: &str = "
ALTER TABLE entities ADD COLUMN IF NOT EXISTS payload_pruned_at bigint;
CREATE INDEX IF NOT EXISTS entities_payload_kept ON entities (updated_at)
    WHERE status <> 'pending' AND payload_pruned_at IS NULL;
CREATE INDEX IF NOT EXISTS idempotency_by_time ON idempotency (created_at);
CREATE INDEX IF NOT EXISTS entities_settled ON entities (updated_at) WHERE status <> 'pending';
";

/// The advisory lock of a pruning pass.
const PRUNE_LOCK: i64 = 0x7269_7065_6e5f_7072; // "ripen_pr"

pub(super) async fn prune(
    store: &Shared,
    conn: &Conn,
    p: &Prune,
    now_us: UnixMicros,
) -> Result<Pruned> {
    let mut pruned = Pruned::default();
    let locked = conn
        .query_opt("SELECT pg_try_advisory_xact_lock($1)", &[&PRUNE_LOCK])
        .await?
        .map(|r| r.try_get::<_, bool>(0))
        .transpose()
        .map_err(decode_error)?
        .unwrap_or(false);
    if !locked {
        return Ok(pruned);
    }
    let limit = i64::from(p.limit);
    if let Some(before) = p.payload_before_us {
        let rows = conn
            .query(
                "SELECT e.id FROM entities e
                 WHERE e.status <> 'pending' AND e.payload_pruned_at IS NULL
                   AND e.updated_at < $1
                   AND NOT EXISTS (SELECT 1 FROM steps s
                                   WHERE s.entity_id = e.id AND s.due_at IS NOT NULL)
                 ORDER BY e.updated_at LIMIT $2
                 FOR UPDATE OF e SKIP LOCKED",
                &[&before, &limit],
            )
            .await?;
        let mut ids = rows
            .iter()
            .map(|r| entity_id(r.try_get::<_, &[u8]>(0).map_err(decode_error)?))
            .collect::<Result<Vec<EntityId>>>()?;
        ids.sort();
        // Read again under the locks: the working set's rule decides.
        let due: Vec<EntityId> = store
            .read_entities(conn, &ids)
            .await?
            .into_iter()
            .filter(|s| payload_prunable(&s.record))
            .map(|s| s.record.id)
            .collect();
        pruned.payloads = due.len() as u64;
        if !p.dry_run && !due.is_empty() {
            let ids: Vec<&[u8]> = due.iter().map(|id| id.as_bytes().as_slice()).collect();
            conn.query(
                "DELETE FROM payloads WHERE entity_id = ANY($1) RETURNING 1",
                &[&ids],
            )
            .await?;
            conn.query(
                "UPDATE entities SET payload_pruned_at = $2 WHERE id = ANY($1) RETURNING 1",
                &[&ids, &now_us],
            )
            .await?;
        }
    }
    if let Some(before) = p.keys_before_us {
        let sql = if p.dry_run {
            "SELECT COUNT(*) FROM
             (SELECT 1 FROM idempotency WHERE created_at < $1 LIMIT $2) k"
        } else {
            "WITH gone AS (
                 DELETE FROM idempotency WHERE (tenant, type, key) IN
                 (SELECT tenant, type, key FROM idempotency WHERE created_at < $1
                  LIMIT $2 FOR UPDATE SKIP LOCKED)
                 RETURNING 1)
             SELECT COUNT(*) FROM gone"
        };
        let n: i64 = conn
            .query_opt(sql, &[&before, &limit])
            .await?
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(decode_error)?
            .unwrap_or(0);
        pruned.keys = n as u64;
    }
    if let Some(before) = p.entities_due(pruned.keys) {
        pruned.entities = prune_entities(store, conn, before, p).await?;
    }
    Ok(pruned)
}

/// Deletes up to `p.limit` settled entities last changed before `before`
/// with everything that is theirs; see [`Prune::entities_before_us`].
async fn prune_entities(store: &Shared, conn: &Conn, before: UnixMicros, p: &Prune) -> Result<u64> {
    let rows = conn
        .query(
            "SELECT e.id FROM entities e
             WHERE e.status <> 'pending' AND e.updated_at < $1
               AND NOT EXISTS (SELECT 1 FROM steps s
                               WHERE s.entity_id = e.id AND s.due_at IS NOT NULL)
               AND NOT EXISTS (SELECT 1 FROM dependencies d WHERE d.parent = e.id)
             ORDER BY e.updated_at LIMIT $2
             FOR UPDATE OF e SKIP LOCKED",
            &[&before, &i64::from(p.limit)],
        )
        .await?;
    let mut ids = rows
        .iter()
        .map(|r| entity_id(r.try_get::<_, &[u8]>(0).map_err(decode_error)?))
        .collect::<Result<Vec<EntityId>>>()?;
    if ids.is_empty() {
        return Ok(0);
    }
    ids.sort();
    let id_params: Vec<&[u8]> = ids.iter().map(|id| id.as_bytes().as_slice()).collect();
    let in_outbox: std::collections::HashSet<Vec<u8>> = conn
        .query(
            "SELECT DISTINCT entity_id FROM outbox WHERE entity_id = ANY($1)",
            &[&id_params],
        )
        .await?
        .iter()
        .map(|r| r.try_get::<_, Vec<u8>>(0).map_err(decode_error))
        .collect::<Result<_>>()?;
    let due: Vec<EntityId> = store
        .read_entities(conn, &ids)
        .await?
        .into_iter()
        .filter(|s| entity_prunable(&s.record))
        .map(|s| s.record.id)
        .filter(|id| !in_outbox.contains(id.as_bytes().as_slice()))
        .collect();
    if !p.dry_run && !due.is_empty() {
        let ids: Vec<&[u8]> = due.iter().map(|id| id.as_bytes().as_slice()).collect();
        for sql in [
            "DELETE FROM payloads WHERE entity_id = ANY($1) RETURNING 1",
            "DELETE FROM steps WHERE entity_id = ANY($1) RETURNING 1",
            "DELETE FROM events WHERE entity_id = ANY($1) RETURNING 1",
            "DELETE FROM entities WHERE id = ANY($1) RETURNING 1",
        ] {
            conn.query(sql, &[&ids]).await?;
        }
    }
    Ok(due.len() as u64)
}

pub(super) async fn stats(conn: &Conn) -> Result<StoreStats> {
    let names = conn
        .query(
            "SELECT tablename::text FROM pg_tables
             WHERE schemaname = current_schema() ORDER BY tablename",
            &[],
        )
        .await?;
    let mut tables = Vec::with_capacity(names.len());
    for row in names {
        let name: String = row.try_get(0).map_err(decode_error)?;
        let quoted = name.replace('"', "\"\"");
        let sql = format!(
            "SELECT (SELECT COUNT(*) FROM \"{quoted}\"), pg_total_relation_size($1::text::regclass)"
        );
        let ident = format!("\"{quoted}\"");
        let counted = conn
            .query_opt(&sql, &[&ident])
            .await?
            .ok_or_else(|| crate::StoreError::Internal(format!("no count of {name}")))?;
        let rows: i64 = counted.try_get(0).map_err(decode_error)?;
        let bytes: i64 = counted.try_get(1).map_err(decode_error)?;
        tables.push(TableStats {
            name,
            rows: rows as u64,
            bytes: Some(bytes as u64),
        });
    }
    let total: Option<i64> = conn
        .query_opt("SELECT pg_database_size(current_database())", &[])
        .await?
        .map(|r| r.try_get(0))
        .transpose()
        .map_err(decode_error)?;
    let oldest: Option<i64> = conn
        .query_opt(
            "SELECT MIN(updated_at) FROM entities
             WHERE status <> 'pending' AND payload_pruned_at IS NULL",
            &[],
        )
        .await?
        .map(|r| r.try_get(0))
        .transpose()
        .map_err(decode_error)?
        .flatten();
    Ok(StoreStats {
        tables,
        total_bytes: total.map(|b| b as u64),
        free_bytes: None,
        oldest_kept_payload_us: oldest,
    })
}
