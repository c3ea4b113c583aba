//! The SQLite side of retention: one pass of the pruner, run as one command
//! on the writer thread, so that intake's commands interleave with passes.

use ripen_core::UnixMicros;
use rusqlite::{params, Connection};

use crate::working::payload_prunable;
use crate::{Prune, Pruned, Result};

/// Added by the upgrade to version 7: when a payload was pruned, the index
/// of settled entities whose payload is kept (by last change), and the
/// index of keys by time. Pending entities are in neither index, so intake
/// writes no more than before.
pub(super) const SCHEMA: &str = "
ALTER TABLE entities ADD COLUMN payload_pruned_at INTEGER;
CREATE INDEX IF NOT EXISTS entities_payload_kept ON entities (updated_at)
    WHERE status <> 'pending' AND payload_pruned_at IS NULL;
CREATE INDEX IF NOT EXISTS idempotency_by_time ON idempotency (created_at);
";

/// Free pages given back to the file system after a pass, at most, when the
/// database was created with `auto_vacuum = INCREMENTAL`.
const VACUUM_PAGES: u32 = 1_024;

pub(super) fn prune(conn: &Connection, p: &Prune, now_us: UnixMicros) -> Result<Pruned> {
    let mut pruned = Pruned::default();
    if let Some(before) = p.payload_before_us {
        // Candidates by time from the partial index; the rule's rest (no
        // live step) is the working set's.
        let mut candidates = Vec::new();
        {
            let mut stmt = conn.prepare_cached(
                "SELECT id FROM entities
                 WHERE status <> 'pending' AND payload_pruned_at IS NULL AND updated_at < ?1
                 ORDER BY updated_at LIMIT ?2",
            )?;
            let mut rows = stmt.query(params![before, p.limit])?;
            while let Some(r) = rows.next()? {
                candidates.push(crate::decode::entity_id(&r.get::<_, Vec<u8>>(0)?)?);
            }
        }
        for id in candidates {
            let Some(stored) = super::read_entity(conn, id)? else {
                continue;
            };
            if !payload_prunable(&stored.record) {
                continue;
            }
            pruned.payloads += 1;
            if p.dry_run {
                continue;
            }
            conn.prepare_cached("DELETE FROM payloads WHERE id = ?1")?
                .execute([stored.extra])?;
            conn.prepare_cached("UPDATE entities SET payload_pruned_at = ?1 WHERE id = ?2")?
                .execute(params![now_us, id.as_bytes()])?;
        }
    }
    if let Some(before) = p.keys_before_us {
        pruned.keys = if p.dry_run {
            conn.prepare_cached(
                "SELECT COUNT(*) FROM
                 (SELECT 1 FROM idempotency WHERE created_at < ?1 LIMIT ?2)",
            )?
            .query_row(params![before, p.limit], |r| r.get::<_, i64>(0))? as u64
        } else {
            conn.prepare_cached(
                "DELETE FROM idempotency WHERE (tenant, type, key) IN
                 (SELECT tenant, type, key FROM idempotency WHERE created_at < ?1 LIMIT ?2)",
            )?
            .execute(params![before, p.limit])? as u64
        };
    }
    if !p.dry_run && pruned.total() > 0 {
        let mode: i64 = conn.pragma_query_value(None, "auto_vacuum", |r| r.get(0))?;
        if mode == 2 {
            conn.execute_batch(&format!("PRAGMA incremental_vacuum({VACUUM_PAGES})"))?;
        }
    }
    Ok(pruned)
}
