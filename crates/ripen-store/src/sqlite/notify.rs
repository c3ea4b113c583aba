//! The SQLite side of notifications: the outbox read, the fan-out to
//! subscriptions, and the deliveries' rows. Every write here runs on the
//! writer thread, inside a batch's transaction; reads run on read
//! connections.
//!
//! Outbox ids are positions: the single writer gives them in commit order.
//! The fan-out's position is the `fan_out` row of `cursors`.

use ripen_core::UnixMicros;
use rusqlite::{params, Connection, OptionalExtension};

use crate::decode::{entity_id, to_i64, to_u32, to_u64};
use crate::notify::{
    names_from_json, names_json, outcome_columns, redeliver_refusal, Delivery, DeliveryClaim,
    DeliveryCounts, DeliveryQuery, DeliveryResult, DeliveryStatus, FanOut, Notification,
    RedeliverOutcome, SinkKind, Subscription,
};
use crate::working;
use crate::{OutboxEntry, Result, StoreError};

/// The notification tables: in a fresh schema, and added by the upgrade to
/// version 4. The fan-out starts at the newest outbox row, so an upgraded
/// database does not announce its past.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS subscriptions (
    id TEXT NOT NULL PRIMARY KEY,
    tenant TEXT NOT NULL,
    kind TEXT NOT NULL,
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    types TEXT NOT NULL,
    secret BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    start_pos INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    subscription_id TEXT NOT NULL,
    pos INTEGER NOT NULL,
    entity_id BLOB NOT NULL,
    tenant TEXT NOT NULL,
    type TEXT NOT NULL,
    version INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    at INTEGER NOT NULL,
    event TEXT NOT NULL,
    entity_status TEXT NOT NULL,
    degraded INTEGER NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_at INTEGER,
    last_error TEXT,
    last_code INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due
    ON deliveries (subscription_id, next_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_order
    ON deliveries (subscription_id, entity_id, seq) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_by_subscription ON deliveries (subscription_id, id);
CREATE TABLE IF NOT EXISTS cursors (
    name TEXT NOT NULL PRIMARY KEY,
    pos INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO cursors (name, pos) SELECT 'fan_out', COALESCE(MAX(id), 0) FROM outbox;
";

const DELIVERY_COLUMNS: &str = "id, subscription_id, pos, entity_id, tenant, type, version, seq, \
     at, event, entity_status, degraded, status, attempts, next_at, last_error, last_code, \
     created_at, updated_at";

/// Outbox rows after `after`, oldest first, with the entity's status now and
/// whether it had been degraded by then. Rows point at their history event;
/// the body is built here, by the reader, rather than by the writer for
/// every change.
pub(super) fn read_outbox(conn: &Connection, after: u64, limit: u32) -> Result<Vec<OutboxEntry>> {
    let mut stmt = conn.prepare_cached(
        "SELECT o.id, o.entity_id, o.seq, e.at, e.kind, e.detail,
                n.tenant, n.type, n.version, n.status,
                EXISTS (SELECT 1 FROM events d WHERE d.entity_id = o.entity_id
                        AND d.seq <= o.seq AND d.kind = 'degraded')
         FROM outbox o
         JOIN events e ON e.entity_id = o.entity_id AND e.seq = o.seq
         JOIN entities n ON n.id = o.entity_id
         WHERE o.id > ?1 ORDER BY o.id LIMIT ?2",
    )?;
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    let mut rows = stmt.query(params![after, i64::from(limit)])?;
    let mut entries = Vec::new();
    while let Some(r) = rows.next()? {
        let id = entity_id(&r.get::<_, Vec<u8>>(1)?)?;
        let seq = to_u64(r.get(2)?, "outbox.seq")?;
        let at_us: i64 = r.get(3)?;
        let kind: String = r.get(4)?;
        let detail: String = r.get(5)?;
        let tenant: String = r.get(6)?;
        let type_name: String = r.get(7)?;
        let subject = working::Subject {
            id,
            tenant: &tenant,
            type_name: &type_name,
            version: to_u32(r.get(8)?, "entities.version")?,
        };
        let body = working::notification_body(&subject, seq, at_us, &kind, &detail);
        entries.push(OutboxEntry {
            id: to_u64(r.get(0)?, "outbox.id")?,
            entity_id: id,
            seq,
            at_us,
            kind,
            body,
            status: Some(r.get(9)?),
            degraded: r.get(10)?,
        });
    }
    Ok(entries)
}

pub(super) fn outbox_head(conn: &Connection) -> Result<u64> {
    let head: Option<i64> = conn
        .prepare_cached("SELECT MAX(id) FROM outbox")?
        .query_row([], |r| r.get(0))?;
    to_u64(head.unwrap_or(0), "outbox.id")
}

fn cursor(conn: &Connection) -> Result<u64> {
    let pos: Option<i64> = conn
        .prepare_cached("SELECT pos FROM cursors WHERE name = 'fan_out'")?
        .query_row([], |r| r.get(0))
        .optional()?;
    to_u64(pos.unwrap_or(0), "cursors.pos")
}

/// One fan-out round, on the writer's connection inside its transaction.
pub(super) fn fan_out(conn: &Connection, limit: u32, now_us: UnixMicros) -> Result<FanOut> {
    let from = cursor(conn)?;
    let subs = subscription_list(conn)?;
    let mut round = FanOut {
        last_pos: from,
        ..FanOut::default()
    };
    if subs.is_empty() {
        // Nobody listens: the cursor jumps to the head without reading.
        let head = outbox_head(conn)?;
        round.rows = usize::try_from(head.saturating_sub(from)).unwrap_or(usize::MAX);
        round.last_pos = head;
    } else {
        let entries = read_outbox(conn, from, limit)?;
        let mut insert = conn.prepare_cached(&format!(
            "INSERT INTO deliveries ({DELIVERY_COLUMNS})
             VALUES (NULL, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 'pending', 0, ?12,
                     NULL, NULL, ?12, ?12)"
        ))?;
        for entry in &entries {
            round.rows += 1;
            round.last_pos = entry.id;
            let Some(n) = Notification::from_outbox(entry) else {
                continue;
            };
            for sub in subs.iter().filter(|s| s.matches(&n)) {
                insert.execute(params![
                    sub.id,
                    to_i64(n.pos, "pos")?,
                    n.entity_id.as_bytes().as_slice(),
                    n.tenant,
                    n.type_name,
                    n.version,
                    to_i64(n.seq, "seq")?,
                    n.at_us,
                    n.event,
                    n.status,
                    n.degraded,
                    now_us,
                ])?;
                round.deliveries += 1;
            }
        }
    }
    if round.last_pos != from {
        conn.prepare_cached("UPDATE cursors SET pos = ?1 WHERE name = 'fan_out'")?
            .execute([to_i64(round.last_pos, "pos")?])?;
    }
    Ok(round)
}

/// Deletes outbox rows the fan-out passed and delivered deliveries, both
/// older than `before_us`; keeps the newest outbox row, whose id the next
/// one counts from.
pub(super) fn prune(conn: &Connection, before_us: UnixMicros, limit: u32) -> Result<u64> {
    let outbox = conn
        .prepare_cached(
            "DELETE FROM outbox WHERE id IN (
                 SELECT o.id FROM outbox o
                 JOIN events e ON e.entity_id = o.entity_id AND e.seq = o.seq
                 WHERE o.id <= (SELECT pos FROM cursors WHERE name = 'fan_out')
                   AND (o.id <= (SELECT pos FROM cursors WHERE name = 'dependencies')
                        OR NOT EXISTS (SELECT 1 FROM dependencies))
                   AND o.id < (SELECT MAX(id) FROM outbox)
                   AND e.at < ?1
                 ORDER BY o.id LIMIT ?2)",
        )?
        .execute(params![before_us, i64::from(limit)])?;
    let delivered = conn
        .prepare_cached(
            "DELETE FROM deliveries WHERE id IN (
                 SELECT id FROM deliveries WHERE status = 'delivered' AND updated_at < ?1
                 ORDER BY id LIMIT ?2)",
        )?
        .execute(params![before_us, i64::from(limit)])?;
    Ok((outbox + delivered) as u64)
}

pub(super) fn put_subscription(conn: &Connection, sub: &Subscription) -> Result<Subscription> {
    let head = outbox_head(conn)?;
    conn.prepare_cached(
        "INSERT INTO subscriptions
             (id, tenant, kind, url, events, types, secret, created_at, start_pos)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, kind = excluded.kind,
             url = excluded.url, events = excluded.events, types = excluded.types,
             secret = excluded.secret",
    )?
    .execute(params![
        sub.id,
        sub.tenant,
        sub.kind.as_str(),
        sub.url,
        names_json(&sub.events),
        names_json(&sub.types),
        sub.sealed_secret,
        sub.created_at_us,
        to_i64(head, "pos")?,
    ])?;
    subscriptions(conn, None)?
        .into_iter()
        .map(|(s, _)| s)
        .find(|s| s.id == sub.id)
        .ok_or_else(|| StoreError::Internal("a stored subscription vanished".into()))
}

pub(super) fn subscriptions(
    conn: &Connection,
    tenant: Option<&str>,
) -> Result<Vec<(Subscription, DeliveryCounts)>> {
    read_subscriptions(conn, tenant, true)
}

/// Every subscription, without counts: what the fan-out and the dispatcher
/// need, read without touching the deliveries.
pub(super) fn subscription_list(conn: &Connection) -> Result<Vec<Subscription>> {
    Ok(read_subscriptions(conn, None, false)?
        .into_iter()
        .map(|(s, _)| s)
        .collect())
}

fn read_subscriptions(
    conn: &Connection,
    tenant: Option<&str>,
    counted: bool,
) -> Result<Vec<(Subscription, DeliveryCounts)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, tenant, kind, url, events, types, secret, created_at, start_pos,
                CASE WHEN ?2 THEN (SELECT COUNT(*) FROM deliveries d
                    WHERE d.subscription_id = s.id AND d.status = 'pending') ELSE 0 END,
                CASE WHEN ?2 THEN (SELECT COUNT(*) FROM deliveries d
                    WHERE d.subscription_id = s.id AND d.status = 'delivered') ELSE 0 END,
                CASE WHEN ?2 THEN (SELECT COUNT(*) FROM deliveries d
                    WHERE d.subscription_id = s.id AND d.status = 'dead') ELSE 0 END
         FROM subscriptions s WHERE ?1 IS NULL OR tenant = ?1
         ORDER BY created_at, id",
    )?;
    let mut rows = stmt.query(params![tenant, counted])?;
    let mut subs = Vec::new();
    while let Some(r) = rows.next()? {
        let kind: String = r.get(2)?;
        let sub = Subscription {
            id: r.get(0)?,
            tenant: r.get(1)?,
            kind: SinkKind::parse(&kind)
                .ok_or_else(|| StoreError::Internal(format!("unknown subscription kind {kind}")))?,
            url: r.get(3)?,
            events: names_from_json(&r.get::<_, String>(4)?),
            types: names_from_json(&r.get::<_, String>(5)?),
            sealed_secret: r.get(6)?,
            created_at_us: r.get(7)?,
            start_pos: to_u64(r.get(8)?, "subscriptions.start_pos")?,
        };
        let counts = DeliveryCounts {
            pending: to_u64(r.get(9)?, "count")?,
            delivered: to_u64(r.get(10)?, "count")?,
            dead: to_u64(r.get(11)?, "count")?,
        };
        subs.push((sub, counts));
    }
    Ok(subs)
}

pub(super) fn delete_subscription(conn: &Connection, tenant: &str, id: &str) -> Result<bool> {
    let n = conn
        .prepare_cached("DELETE FROM subscriptions WHERE tenant = ?1 AND id = ?2")?
        .execute([tenant, id])?;
    if n > 0 {
        conn.prepare_cached("DELETE FROM deliveries WHERE subscription_id = ?1")?
            .execute([id])?;
    }
    Ok(n > 0)
}

fn delivery(r: &rusqlite::Row<'_>) -> Result<Delivery> {
    let status: String = r.get(12)?;
    let code: Option<i64> = r.get(16)?;
    Ok(Delivery {
        id: to_u64(r.get(0)?, "deliveries.id")?,
        subscription_id: r.get(1)?,
        notification: Notification {
            pos: to_u64(r.get(2)?, "deliveries.pos")?,
            entity_id: entity_id(&r.get::<_, Vec<u8>>(3)?)?,
            tenant: r.get(4)?,
            type_name: r.get(5)?,
            version: to_u32(r.get(6)?, "deliveries.version")?,
            seq: to_u64(r.get(7)?, "deliveries.seq")?,
            at_us: r.get(8)?,
            event: r.get(9)?,
            status: r.get(10)?,
            degraded: r.get(11)?,
        },
        status: DeliveryStatus::parse(&status)
            .ok_or_else(|| StoreError::Internal(format!("unknown delivery status {status}")))?,
        attempts: to_u32(r.get(13)?, "deliveries.attempts")?,
        next_at_us: r.get(14)?,
        last_error: r.get(15)?,
        last_code: code.and_then(|c| u16::try_from(c).ok()),
        created_at_us: r.get(17)?,
        updated_at_us: r.get(18)?,
    })
}

pub(super) fn claim_deliveries(
    conn: &Connection,
    claim: &DeliveryClaim,
    now_us: UnixMicros,
) -> Result<Vec<Delivery>> {
    let lease_us = claim.lease_us;
    // Each subscription's earliest due deliveries, as many as its room,
    // read from its own index range: a backlog costs only what is taken.
    // A delivery waits while an earlier one of its entity is pending.
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries d
         WHERE subscription_id = ?1 AND status = 'pending' AND next_at <= ?2
           AND NOT EXISTS (SELECT 1 FROM deliveries p WHERE p.status = 'pending'
                AND p.subscription_id = d.subscription_id AND p.entity_id = d.entity_id
                AND p.seq < d.seq)
         ORDER BY next_at, id LIMIT ?3"
    ))?;
    let subs = subscription_list(conn)?;
    let mut claimed = Vec::new();
    for sub in claim.rotation(&subs, now_us) {
        let take = claim
            .room_of(&sub.id)
            .min(claim.limit.saturating_sub(claimed.len() as u32));
        if take == 0 {
            continue;
        }
        let mut rows = stmt.query(params![sub.id, now_us, i64::from(take)])?;
        while let Some(r) = rows.next()? {
            claimed.push(delivery(r)?);
        }
        if claimed.len() >= claim.limit as usize {
            break;
        }
    }
    let mut lease = conn.prepare_cached(
        "UPDATE deliveries SET attempts = attempts + 1, next_at = ?2, updated_at = ?3
         WHERE id = ?1",
    )?;
    for d in &mut claimed {
        d.attempts += 1;
        d.next_at_us = Some(now_us + lease_us);
        lease.execute(params![to_i64(d.id, "id")?, now_us + lease_us, now_us])?;
    }
    claimed.sort_by_key(|d| (d.next_at_us, d.id));
    Ok(claimed)
}

pub(super) fn finish_deliveries(
    conn: &Connection,
    results: &[DeliveryResult],
    now_us: UnixMicros,
) -> Result<()> {
    let mut stmt = conn.prepare_cached(
        "UPDATE deliveries SET status = ?3, next_at = ?4, last_error = ?5, last_code = ?6,
             updated_at = ?7
         WHERE id = ?1 AND attempts = ?2 AND status = 'pending'",
    )?;
    for r in results {
        let (status, next_at, error, code) = outcome_columns(&r.outcome);
        stmt.execute(params![
            to_i64(r.id, "id")?,
            r.attempts,
            status.as_str(),
            next_at,
            error,
            code,
            now_us
        ])?;
    }
    Ok(())
}

pub(super) fn deliveries(
    conn: &Connection,
    subscription_id: &str,
    q: &DeliveryQuery,
) -> Result<Vec<Delivery>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries
         WHERE subscription_id = ?1 AND (?2 IS NULL OR status = ?2) AND id < ?3
         ORDER BY id DESC LIMIT ?4"
    ))?;
    let before = q
        .before
        .map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
    let mut rows = stmt.query(params![
        subscription_id,
        q.status.map(DeliveryStatus::as_str),
        before,
        i64::from(q.limit)
    ])?;
    let mut found = Vec::new();
    while let Some(r) = rows.next()? {
        found.push(delivery(r)?);
    }
    Ok(found)
}

pub(super) fn redeliver(
    conn: &Connection,
    tenant: &str,
    id: u64,
    now_us: UnixMicros,
) -> Result<RedeliverOutcome> {
    let id = to_i64(id, "id")?;
    let status: Option<String> = conn
        .prepare_cached(
            "SELECT d.status FROM deliveries d
             JOIN subscriptions s ON s.id = d.subscription_id
             WHERE d.id = ?1 AND s.tenant = ?2",
        )?
        .query_row(params![id, tenant], |r| r.get(0))
        .optional()?;
    if let Some(refused) = redeliver_refusal(status.as_deref())? {
        return Ok(refused);
    }
    // A redelivery starts its retry period over.
    conn.prepare_cached(
        "UPDATE deliveries SET status = 'pending', next_at = ?2, created_at = ?2, updated_at = ?2
         WHERE id = ?1",
    )?
    .execute(params![id, now_us])?;
    Ok(RedeliverOutcome::Queued)
}
