//! The SQLite side of retention: one pass of the pruner, run as one command
//! on the writer thread, so that intake's commands interleave with passes.

use ripen_core::UnixMicros;
use rusqlite::{params, Connection};

use crate::working::{entity_prunable, payload_prunable};
use crate::{EntityId, Prune, Pruned, Result, StoreStats, TableStats};

/// Added by the upgrade to version 7: when a payload was pruned, the index
/// of settled entities whose payload is kept and the index of settled
/// entities (both by last change), and the index of keys by time. Pending entities are in no entity index of
/// these, so intake writes no more entity index rows than before.
pub(super) const SCHEMA: &str = "
ALTER TABLE entities ADD COLUMN payload_pruned_at INTEGER;
CREATE INDEX IF NOT EXISTS entities_payload_kept ON entities (updated_at)
    WHERE status <> 'pending' AND payload_pruned_at IS NULL;
CREATE INDEX IF NOT EXISTS idempotency_by_time ON idempotency (created_at);
CREATE INDEX IF NOT EXISTS entities_settled ON entities (updated_at) WHERE status <> 'pending';
";

/// Free pages given back to the file system after a pass, at most, when the
/// database was created with `auto_vacuum = INCREMENTAL`.
const VACUUM_PAGES: u32 = 1_024;

/// Of `ids`, those whose entity exists and keeps its payload.
pub(super) fn payloads_kept(conn: &Connection, ids: &[EntityId]) -> Result<Vec<EntityId>> {
    let mut stmt =
        conn.prepare_cached("SELECT 1 FROM entities WHERE id = ?1 AND payload_pruned_at IS NULL")?;
    let mut kept = Vec::new();
    for id in ids {
        if stmt.exists([id.as_bytes()])? {
            kept.push(*id);
        }
    }
    Ok(kept)
}

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
    if let Some(before) = p.entities_due(pruned.keys) {
        pruned.entities = prune_entities(conn, before, p)?;
    }
    if !p.dry_run && pruned.total() > 0 {
        give_back_free_pages(conn, VACUUM_PAGES)?;
    }
    Ok(pruned)
}

/// Gives up to `pages` free pages back to the file system when the
/// database was created with `auto_vacuum = INCREMENTAL`, and says how many
/// it gave. `PRAGMA incremental_vacuum` frees one page per step of its
/// statement, so the statement is stepped to its end (`execute_batch`
/// steps once: one page a pass).
fn give_back_free_pages(conn: &Connection, pages: u32) -> Result<u64> {
    let mode: i64 = conn.pragma_query_value(None, "auto_vacuum", |r| r.get(0))?;
    if mode != 2 {
        return Ok(0);
    }
    let mut stmt = conn.prepare_cached(&format!("PRAGMA incremental_vacuum({pages})"))?;
    let mut rows = stmt.query([])?;
    let mut given = 0;
    while rows.next()?.is_some() {
        given += 1;
    }
    Ok(given)
}

/// Deletes up to `p.limit` settled entities last changed before `before`
/// with everything that is theirs; see [`Prune::entities_before_us`].
fn prune_entities(conn: &Connection, before: UnixMicros, p: &Prune) -> Result<u64> {
    let mut candidates = Vec::new();
    {
        let mut stmt = conn.prepare_cached(
            "SELECT id FROM entities WHERE status <> 'pending' AND updated_at < ?1
             ORDER BY updated_at LIMIT ?2",
        )?;
        let mut rows = stmt.query(params![before, p.limit])?;
        while let Some(r) = rows.next()? {
            candidates.push(crate::decode::entity_id(&r.get::<_, Vec<u8>>(0)?)?);
        }
    }
    if candidates.is_empty() {
        return Ok(0);
    }
    // One look at the outbox for the whole pass: an entity one of its rows
    // still names stays until the outbox is pruned.
    let in_outbox: std::collections::HashSet<Vec<u8>> = {
        let list = vec!["?"; candidates.len()].join(",");
        let mut stmt = conn.prepare(&format!(
            "SELECT DISTINCT entity_id FROM outbox WHERE entity_id IN ({list})"
        ))?;
        let ids: Vec<&[u8]> = candidates
            .iter()
            .map(|id| id.as_bytes().as_slice())
            .collect();
        let found = stmt
            .query_map(rusqlite::params_from_iter(ids), |r| r.get::<_, Vec<u8>>(0))?
            .collect::<rusqlite::Result<_>>()?;
        found
    };
    let mut deleted = 0;
    for id in candidates {
        if in_outbox.contains(id.as_bytes().as_slice()) {
            continue;
        }
        let awaited: bool = conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM dependencies WHERE parent = ?1)")?
            .query_row([id.as_bytes()], |r| r.get(0))?;
        if awaited {
            continue;
        }
        let Some(stored) = super::read_entity(conn, id)? else {
            continue;
        };
        if !entity_prunable(&stored.record) {
            continue;
        }
        deleted += 1;
        if p.dry_run {
            continue;
        }
        let key = id.as_bytes();
        conn.prepare_cached("DELETE FROM payloads WHERE id = ?1")?
            .execute([stored.extra])?;
        // No due row is left: no step is live.
        for table in ["outputs", "events"] {
            conn.prepare_cached(&format!("DELETE FROM {table} WHERE entity_id = ?1"))?
                .execute([key])?;
        }
        conn.prepare_cached("DELETE FROM entities WHERE id = ?1")?
            .execute([key])?;
    }
    Ok(deleted)
}

pub(super) fn stats(conn: &Connection) -> Result<StoreStats> {
    let tx = conn.unchecked_transaction()?;
    let names: Vec<String> = tx
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    // `dbstat` is an optional part of SQLite: without it, sizes are unknown.
    let dbstat = tx
        .prepare(
            "SELECT SUM(pgsize) FROM dbstat
             WHERE name IN (SELECT name FROM sqlite_master WHERE tbl_name = ?1)",
        )
        .ok();
    let mut sized = dbstat;
    let mut tables = Vec::with_capacity(names.len());
    for name in names {
        let quoted = name.replace('"', "\"\"");
        let rows: i64 = tx.query_row(&format!("SELECT COUNT(*) FROM \"{quoted}\""), [], |r| {
            r.get(0)
        })?;
        let bytes = match sized.as_mut() {
            Some(stmt) => stmt
                .query_row([&name], |r| r.get::<_, Option<i64>>(0))
                .ok()
                .flatten()
                .map(|b| b as u64),
            None => None,
        };
        tables.push(TableStats {
            name,
            rows: rows as u64,
            bytes,
        });
    }
    drop(sized);
    let pragma =
        |name: &str| -> Result<i64> { Ok(tx.pragma_query_value(None, name, |r| r.get(0))?) };
    let page = pragma("page_size")?;
    let total_bytes = Some((pragma("page_count")? * page) as u64);
    let free_bytes = Some((pragma("freelist_count")? * page) as u64);
    let oldest_kept_payload_us = tx.query_row(
        "SELECT MIN(updated_at) FROM entities
         WHERE status <> 'pending' AND payload_pruned_at IS NULL",
        [],
        |r| r.get(0),
    )?;
    tx.commit()?;
    Ok(StoreStats {
        tables,
        total_bytes,
        free_bytes,
        oldest_kept_payload_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pragma(conn: &Connection, name: &str) -> i64 {
        conn.pragma_query_value(None, name, |r| r.get(0))
            .expect("pragma")
    }

    #[test]
    fn a_retention_pass_gives_back_every_free_page_it_may() {
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch(
            "PRAGMA auto_vacuum = INCREMENTAL;
             CREATE TABLE t (b BLOB);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
             INSERT INTO t SELECT zeroblob(3000) FROM n;
             DELETE FROM t;",
        )
        .expect("fill and empty");
        let free = pragma(&conn, "freelist_count");
        assert!(free > 1_500, "{free} free pages");
        let pages = pragma(&conn, "page_count");
        assert_eq!(give_back_free_pages(&conn, 1_000).expect("vacuum"), 1_000);
        assert_eq!(pragma(&conn, "freelist_count"), free - 1_000);
        // The file shrinks by as much, and by the pointer-map pages that
        // mapped the freed ones.
        assert!(pragma(&conn, "page_count") <= pages - 1_000);
        // The rest, and no more than there is.
        let rest = (free - 1_000) as u64;
        assert_eq!(give_back_free_pages(&conn, 100_000).expect("vacuum"), rest);
        assert_eq!(pragma(&conn, "freelist_count"), 0);
    }

    #[test]
    fn without_incremental_auto_vacuum_retention_gives_nothing_back() {
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch(
            "CREATE TABLE t (b BLOB);
             INSERT INTO t VALUES (zeroblob(100000));
             DELETE FROM t;",
        )
        .expect("fill and empty");
        let free = pragma(&conn, "freelist_count");
        assert!(free > 0);
        assert_eq!(give_back_free_pages(&conn, 1_000).expect("vacuum"), 0);
        assert_eq!(pragma(&conn, "freelist_count"), free);
    }
}
