//! The PostgreSQL side of notifications: outbox positions, the fan-out to
//! subscriptions, and the deliveries' rows, shared by every node.
//!
//! Outbox ids come from an identity column, and concurrent transactions
//! commit in any order, so a reader that resumed after the largest id it saw
//! could miss a row committed later with a smaller id. Rows therefore get a
//! position (`pos`) from the fan-out, which one node at a time runs while it
//! holds the `fan_out` row of `cursors`: it numbers the visible rows that
//! have none, in id order, and tells every node through
//! `pg_notify('ripen_outbox', pos)`. Two changes of one entity are
//! serialized by its row lock, so the later one's row has the larger id and
//! is never visible before the earlier one: positions keep each entity's
//! order.

use ripen_core::UnixMicros;
use tokio_postgres::Row;

use super::{decode_error, pg_text, Conn};
use crate::decode::{entity_id, to_i64, to_u32, to_u64};
use crate::notify::{
    names_from_json, names_json, outcome_columns, redeliver_refusal, Delivery, DeliveryClaim,
    DeliveryCounts, DeliveryQuery, DeliveryResult, DeliveryStatus, FanOut, Notification,
    RedeliverOutcome, SinkKind, Subscription,
};
use crate::{OutboxEntry, Result, StoreError};

/// The channel on which a fan-out announces the last position it gave.
pub(super) const OUTBOX_CHANNEL: &str = "ripen_outbox";
/// The channel on which every commit that wrote history says so: payload
/// `o` when it also wrote outbox rows.
pub(super) const CHANGED_CHANNEL: &str = "ripen_changed";

/// Added to the schema in version 3. Rows written before it count as fanned
/// out: an upgraded database does not announce its past.
pub(super) const SCHEMA: &str = "
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS pos bigint;
CREATE UNIQUE INDEX IF NOT EXISTS outbox_by_pos ON outbox (pos);
CREATE INDEX IF NOT EXISTS outbox_unpositioned ON outbox (id) WHERE pos IS NULL;
CREATE TABLE IF NOT EXISTS cursors (
    name text PRIMARY KEY,
    pos bigint NOT NULL
);
UPDATE outbox SET pos = id
    WHERE pos IS NULL AND NOT EXISTS (SELECT 1 FROM cursors WHERE name = 'fan_out');
INSERT INTO cursors (name, pos) SELECT 'fan_out', COALESCE(MAX(pos), 0) FROM outbox
    ON CONFLICT (name) DO NOTHING;
CREATE TABLE IF NOT EXISTS subscriptions (
    id text PRIMARY KEY,
    tenant text NOT NULL,
    kind text NOT NULL,
    url text NOT NULL,
    events text NOT NULL,
    types text NOT NULL,
    secret bytea NOT NULL,
    created_at bigint NOT NULL,
    start_pos bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id text NOT NULL,
    pos bigint NOT NULL,
    entity_id bytea NOT NULL,
    tenant text NOT NULL,
    type text NOT NULL,
    version bigint NOT NULL,
    seq bigint NOT NULL,
    at bigint NOT NULL,
    event text NOT NULL,
    entity_status text NOT NULL,
    degraded boolean NOT NULL,
    status text NOT NULL,
    attempts bigint NOT NULL,
    next_at bigint,
    last_error text,
    last_code bigint,
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due
    ON deliveries (subscription_id, next_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_order
    ON deliveries (subscription_id, entity_id, seq) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_by_subscription ON deliveries (subscription_id, id);
";

const DELIVERY_COLUMNS: &str = "id, subscription_id, pos, entity_id, tenant, type, version, seq, \
     at, event, entity_status, degraded, status, attempts, next_at, last_error, last_code, \
     created_at, updated_at";

/// The columns of an outbox read: position, entity, seq, time, kind, body,
/// the entity's status, and whether it had been degraded by then.
const OUTBOX_COLUMNS: &str = "o.entity_id, o.seq, o.at, o.kind, o.body, n.status,
    EXISTS (SELECT 1 FROM events d WHERE d.entity_id = o.entity_id
            AND d.seq <= o.seq AND d.kind = 'degraded')";

fn outbox_entry(pos: u64, r: &Row) -> Result<OutboxEntry> {
    Ok(OutboxEntry {
        id: pos,
        entity_id: entity_id(r.try_get::<_, &[u8]>(1).map_err(decode_error)?)?,
        seq: to_u64(r.try_get(2).map_err(decode_error)?, "outbox.seq")?,
        at_us: r.try_get(3).map_err(decode_error)?,
        kind: r.try_get(4).map_err(decode_error)?,
        body: r.try_get(5).map_err(decode_error)?,
        status: r.try_get(6).map_err(decode_error)?,
        degraded: r.try_get(7).map_err(decode_error)?,
    })
}

pub(super) async fn read_outbox(conn: &Conn, after: u64, limit: u32) -> Result<Vec<OutboxEntry>> {
    let rows = conn
        .query(
            &format!(
                "SELECT o.pos, {OUTBOX_COLUMNS} FROM outbox o JOIN entities n ON n.id = o.entity_id
                 WHERE o.pos > $1 ORDER BY o.pos LIMIT $2"
            ),
            &[&i64::try_from(after).unwrap_or(i64::MAX), &i64::from(limit)],
        )
        .await?;
    rows.iter()
        .map(|r| {
            outbox_entry(
                to_u64(r.try_get(0).map_err(decode_error)?, "outbox.pos")?,
                r,
            )
        })
        .collect()
}

pub(super) async fn outbox_head(conn: &Conn) -> Result<u64> {
    let row = conn
        .query_opt("SELECT pos FROM cursors WHERE name = 'fan_out'", &[])
        .await?;
    match row {
        Some(r) => to_u64(r.try_get(0).map_err(decode_error)?, "cursors.pos"),
        None => Ok(0),
    }
}

/// One fan-out round inside the caller's transaction. Returns an empty
/// round at once when another node holds the cursor.
pub(super) async fn fan_out(conn: &Conn, limit: u32, now_us: UnixMicros) -> Result<FanOut> {
    let Some(row) = conn
        .query_opt(
            "SELECT pos FROM cursors WHERE name = 'fan_out' FOR UPDATE SKIP LOCKED",
            &[],
        )
        .await?
    else {
        return Ok(FanOut::default());
    };
    let from: i64 = row.try_get(0).map_err(decode_error)?;
    let rows = conn
        .query(
            &format!(
                "SELECT o.id, {OUTBOX_COLUMNS} FROM outbox o JOIN entities n ON n.id = o.entity_id
                 WHERE o.pos IS NULL ORDER BY o.id LIMIT $1"
            ),
            &[&i64::from(limit)],
        )
        .await?;
    let mut round = FanOut {
        last_pos: to_u64(from, "cursors.pos")?,
        ..FanOut::default()
    };
    if rows.is_empty() {
        return Ok(round);
    }
    let mut ids = Vec::with_capacity(rows.len());
    let mut positions = Vec::with_capacity(rows.len());
    let mut entries = Vec::with_capacity(rows.len());
    for (k, r) in rows.iter().enumerate() {
        let pos = from + 1 + k as i64;
        ids.push(r.try_get::<_, i64>(0).map_err(decode_error)?);
        positions.push(pos);
        entries.push(outbox_entry(to_u64(pos, "pos")?, r)?);
    }
    let last = *positions.last().unwrap_or(&from);
    conn.query(
        "UPDATE outbox SET pos = x.pos FROM UNNEST($1::int8[], $2::int8[]) AS x(id, pos)
         WHERE outbox.id = x.id",
        &[&ids, &positions],
    )
    .await?;
    let subs = subscription_list(conn).await?;
    let mut d = DeliveryColumns::default();
    for entry in &entries {
        let Some(n) = Notification::from_outbox(entry) else {
            continue;
        };
        for sub in subs.iter().filter(|s| s.matches(&n)) {
            d.push(&sub.id, &n)?;
        }
    }
    round.rows = entries.len();
    round.deliveries = d.sub.len();
    round.last_pos = to_u64(last, "pos")?;
    if !d.sub.is_empty() {
        conn.query(
            "INSERT INTO deliveries (subscription_id, pos, entity_id, tenant, type, version, seq,
                 at, event, entity_status, degraded, status, attempts, next_at, created_at,
                 updated_at)
             SELECT s, p, e, t, ty, v, q, a, ev, st, dg, 'pending', 0, $12, $12, $12
             FROM UNNEST($1::text[], $2::int8[], $3::bytea[], $4::text[], $5::text[],
                         $6::int8[], $7::int8[], $8::int8[], $9::text[], $10::text[],
                         $11::bool[]) AS x(s, p, e, t, ty, v, q, a, ev, st, dg)",
            &[
                &d.sub,
                &d.pos,
                &d.entity,
                &d.tenant,
                &d.type_name,
                &d.version,
                &d.seq,
                &d.at,
                &d.event,
                &d.status,
                &d.degraded,
                &now_us,
            ],
        )
        .await?;
    }
    conn.query(
        "UPDATE cursors SET pos = $1 WHERE name = 'fan_out'",
        &[&last],
    )
    .await?;
    conn.query(
        "SELECT pg_notify($1, $2)",
        &[&OUTBOX_CHANNEL, &last.to_string()],
    )
    .await?;
    Ok(round)
}

/// The deliveries of a fan-out round, one array per column.
#[derive(Default)]
struct DeliveryColumns {
    sub: Vec<String>,
    pos: Vec<i64>,
    entity: Vec<Vec<u8>>,
    tenant: Vec<String>,
    type_name: Vec<String>,
    version: Vec<i64>,
    seq: Vec<i64>,
    at: Vec<i64>,
    event: Vec<String>,
    status: Vec<String>,
    degraded: Vec<bool>,
}

impl DeliveryColumns {
    fn push(&mut self, sub: &str, n: &Notification) -> Result<()> {
        self.sub.push(sub.to_owned());
        self.pos.push(to_i64(n.pos, "pos")?);
        self.entity.push(n.entity_id.as_bytes().to_vec());
        self.tenant.push(n.tenant.clone());
        self.type_name.push(n.type_name.clone());
        self.version.push(i64::from(n.version));
        self.seq.push(to_i64(n.seq, "seq")?);
        self.at.push(n.at_us);
        self.event.push(n.event.clone());
        self.status.push(n.status.clone());
        self.degraded.push(n.degraded);
        Ok(())
    }
}

pub(super) async fn prune(conn: &Conn, before_us: UnixMicros, limit: u32) -> Result<u64> {
    let outbox = conn
        .query(
            "WITH gone AS (
                 DELETE FROM outbox WHERE id IN (
                     SELECT id FROM outbox
                     WHERE pos IS NOT NULL
                       AND pos < (SELECT pos FROM cursors WHERE name = 'fan_out')
                       AND (pos <= (SELECT pos FROM cursors WHERE name = 'dependencies')
                            OR NOT EXISTS (SELECT 1 FROM dependencies))
                       AND at < $1
                     ORDER BY pos LIMIT $2)
                 RETURNING 1)
             SELECT COUNT(*) FROM gone",
            &[&before_us, &i64::from(limit)],
        )
        .await?;
    let delivered = conn
        .query(
            "WITH gone AS (
                 DELETE FROM deliveries WHERE id IN (
                     SELECT id FROM deliveries WHERE status = 'delivered' AND updated_at < $1
                     ORDER BY id LIMIT $2)
                 RETURNING 1)
             SELECT COUNT(*) FROM gone",
            &[&before_us, &i64::from(limit)],
        )
        .await?;
    let count = |rows: &[Row]| -> Result<i64> {
        rows.first()
            .map_or(Ok(0), |r| r.try_get(0).map_err(decode_error))
    };
    to_u64(count(&outbox)? + count(&delivered)?, "count")
}

pub(super) async fn put_subscription(conn: &Conn, sub: &Subscription) -> Result<Subscription> {
    let head = to_i64(outbox_head(conn).await?, "pos")?;
    conn.query(
        "INSERT INTO subscriptions
             (id, tenant, kind, url, events, types, secret, created_at, start_pos)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (id) DO UPDATE SET tenant = EXCLUDED.tenant, kind = EXCLUDED.kind,
             url = EXCLUDED.url, events = EXCLUDED.events, types = EXCLUDED.types,
             secret = EXCLUDED.secret",
        &[
            &sub.id,
            &sub.tenant,
            &sub.kind.as_str(),
            &pg_text(&sub.url),
            &names_json(&sub.events),
            &names_json(&sub.types),
            &sub.sealed_secret,
            &sub.created_at_us,
            &head,
        ],
    )
    .await?;
    subscriptions(conn, None)
        .await?
        .into_iter()
        .map(|(s, _)| s)
        .find(|s| s.id == sub.id)
        .ok_or_else(|| StoreError::Internal("a stored subscription vanished".into()))
}

pub(super) async fn subscriptions(
    conn: &Conn,
    tenant: Option<&str>,
) -> Result<Vec<(Subscription, DeliveryCounts)>> {
    read_subscriptions(conn, tenant, true).await
}

/// Every subscription, without counts: what the fan-out and the dispatcher
/// need, read without touching the deliveries.
pub(super) async fn subscription_list(conn: &Conn) -> Result<Vec<Subscription>> {
    Ok(read_subscriptions(conn, None, false)
        .await?
        .into_iter()
        .map(|(s, _)| s)
        .collect())
}

async fn read_subscriptions(
    conn: &Conn,
    tenant: Option<&str>,
    counted: bool,
) -> Result<Vec<(Subscription, DeliveryCounts)>> {
    let rows = conn
        .query(
            "SELECT id, tenant, kind, url, events, types, secret, created_at, start_pos,
                    CASE WHEN $2 THEN (SELECT COUNT(*) FROM deliveries d
                        WHERE d.subscription_id = s.id AND d.status = 'pending') ELSE 0 END,
                    CASE WHEN $2 THEN (SELECT COUNT(*) FROM deliveries d
                        WHERE d.subscription_id = s.id AND d.status = 'delivered') ELSE 0 END,
                    CASE WHEN $2 THEN (SELECT COUNT(*) FROM deliveries d
                        WHERE d.subscription_id = s.id AND d.status = 'dead') ELSE 0 END
             FROM subscriptions s WHERE $1::text IS NULL OR tenant = $1
             ORDER BY created_at, id",
            &[&tenant, &counted],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let get_count =
                |i: usize| -> Result<u64> { to_u64(r.try_get(i).map_err(decode_error)?, "count") };
            let kind: String = r.try_get(2).map_err(decode_error)?;
            let sub = Subscription {
                id: r.try_get(0).map_err(decode_error)?,
                tenant: r.try_get(1).map_err(decode_error)?,
                kind: SinkKind::parse(&kind).ok_or_else(|| {
                    StoreError::Internal(format!("unknown subscription kind {kind}"))
                })?,
                url: r.try_get(3).map_err(decode_error)?,
                events: names_from_json(r.try_get(4).map_err(decode_error)?),
                types: names_from_json(r.try_get(5).map_err(decode_error)?),
                sealed_secret: r.try_get(6).map_err(decode_error)?,
                created_at_us: r.try_get(7).map_err(decode_error)?,
                start_pos: to_u64(r.try_get(8).map_err(decode_error)?, "start_pos")?,
            };
            let counts = DeliveryCounts {
                pending: get_count(9)?,
                delivered: get_count(10)?,
                dead: get_count(11)?,
            };
            Ok((sub, counts))
        })
        .collect()
}

pub(super) async fn delete_subscription(conn: &Conn, tenant: &str, id: &str) -> Result<bool> {
    let gone = conn
        .query(
            "DELETE FROM subscriptions WHERE tenant = $1 AND id = $2 RETURNING id",
            &[&tenant, &id],
        )
        .await?;
    if !gone.is_empty() {
        conn.query("DELETE FROM deliveries WHERE subscription_id = $1", &[&id])
            .await?;
    }
    Ok(!gone.is_empty())
}

fn delivery(r: &Row) -> Result<Delivery> {
    let get_u64 =
        |i: usize, what: &str| -> Result<u64> { to_u64(r.try_get(i).map_err(decode_error)?, what) };
    let status: String = r.try_get(12).map_err(decode_error)?;
    let code: Option<i64> = r.try_get(16).map_err(decode_error)?;
    Ok(Delivery {
        id: get_u64(0, "deliveries.id")?,
        subscription_id: r.try_get(1).map_err(decode_error)?,
        notification: Notification {
            pos: get_u64(2, "deliveries.pos")?,
            entity_id: entity_id(r.try_get::<_, &[u8]>(3).map_err(decode_error)?)?,
            tenant: r.try_get(4).map_err(decode_error)?,
            type_name: r.try_get(5).map_err(decode_error)?,
            version: to_u32(r.try_get(6).map_err(decode_error)?, "deliveries.version")?,
            seq: get_u64(7, "deliveries.seq")?,
            at_us: r.try_get(8).map_err(decode_error)?,
            event: r.try_get(9).map_err(decode_error)?,
            status: r.try_get(10).map_err(decode_error)?,
            degraded: r.try_get(11).map_err(decode_error)?,
        },
        status: DeliveryStatus::parse(&status)
            .ok_or_else(|| StoreError::Internal(format!("unknown delivery status {status}")))?,
        attempts: to_u32(r.try_get(13).map_err(decode_error)?, "deliveries.attempts")?,
        next_at_us: r.try_get(14).map_err(decode_error)?,
        last_error: r.try_get(15).map_err(decode_error)?,
        last_code: code.and_then(|c| u16::try_from(c).ok()),
        created_at_us: r.try_get(17).map_err(decode_error)?,
        updated_at_us: r.try_get(18).map_err(decode_error)?,
    })
}

pub(super) async fn claim_deliveries(
    conn: &Conn,
    claim: &DeliveryClaim,
    now_us: UnixMicros,
) -> Result<Vec<Delivery>> {
    let returning = DELIVERY_COLUMNS
        .split(", ")
        .map(|c| format!("deliveries.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ");
    // Each subscription's earliest due deliveries, as many as its room,
    // read from its own index range and locked there: a backlog costs
    // only what is taken, and a row another node holds is passed over. The
    // lock rechecks the row's status and time on its newest version. A
    // delivery waits while an earlier one of its entity is pending.
    let rows = conn
        .query(
            &format!(
                "WITH due AS (
                     SELECT c.id, c.next_at FROM subscriptions s
                     CROSS JOIN LATERAL (
                         SELECT d.id, d.next_at FROM deliveries d
                         WHERE d.subscription_id = s.id AND d.status = 'pending'
                           AND d.next_at <= $1
                           AND NOT EXISTS (SELECT 1 FROM deliveries p
                                WHERE p.status = 'pending'
                                  AND p.subscription_id = d.subscription_id
                                  AND p.entity_id = d.entity_id AND p.seq < d.seq)
                         ORDER BY d.next_at, d.id
                         LIMIT COALESCE(($2::text::jsonb ->> s.id)::int8, $3)
                         FOR UPDATE OF d SKIP LOCKED) c
                     ORDER BY c.next_at, c.id LIMIT $4)
                 UPDATE deliveries SET attempts = attempts + 1, next_at = $5, updated_at = $1
                 FROM due WHERE deliveries.id = due.id
                 RETURNING {returning}"
            ),
            &[
                &now_us,
                &claim.room_json(),
                &i64::from(claim.per_subscription),
                &i64::from(claim.limit),
                &(now_us + claim.lease_us),
            ],
        )
        .await?;
    let mut claimed = rows.iter().map(delivery).collect::<Result<Vec<_>>>()?;
    claimed.sort_by_key(|d| d.id);
    Ok(claimed)
}

pub(super) async fn finish_deliveries(
    conn: &Conn,
    results: &[DeliveryResult],
    now_us: UnixMicros,
) -> Result<()> {
    let mut ids = Vec::new();
    let mut attempts = Vec::new();
    let mut statuses = Vec::new();
    let mut next_at = Vec::new();
    let mut errors = Vec::new();
    let mut codes = Vec::new();
    for r in results {
        let (status, next, error, code) = outcome_columns(&r.outcome);
        ids.push(to_i64(r.id, "id")?);
        attempts.push(i64::from(r.attempts));
        statuses.push(status.as_str());
        next_at.push(next);
        errors.push(error.map(pg_text));
        codes.push(code);
    }
    conn.query(
        "UPDATE deliveries SET status = x.status, next_at = x.next_at, last_error = x.error,
             last_code = x.code, updated_at = $7
         FROM UNNEST($1::int8[], $2::int8[], $3::text[], $4::int8[], $5::text[], $6::int8[])
             AS x(id, attempts, status, next_at, error, code)
         WHERE deliveries.id = x.id AND deliveries.attempts = x.attempts
           AND deliveries.status = 'pending'",
        &[
            &ids, &attempts, &statuses, &next_at, &errors, &codes, &now_us,
        ],
    )
    .await?;
    Ok(())
}

pub(super) async fn deliveries(
    conn: &Conn,
    subscription_id: &str,
    q: &DeliveryQuery,
) -> Result<Vec<Delivery>> {
    let before = q
        .before
        .map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
    let rows = conn
        .query(
            &format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries
                 WHERE subscription_id = $1 AND ($2::text IS NULL OR status = $2) AND id < $3
                 ORDER BY id DESC LIMIT $4"
            ),
            &[
                &subscription_id,
                &q.status.map(DeliveryStatus::as_str),
                &before,
                &i64::from(q.limit),
            ],
        )
        .await?;
    rows.iter().map(delivery).collect()
}

pub(super) async fn redeliver(
    conn: &Conn,
    tenant: &str,
    id: u64,
    now_us: UnixMicros,
) -> Result<RedeliverOutcome> {
    let id = to_i64(id, "id")?;
    let row = conn
        .query_opt(
            "SELECT d.status FROM deliveries d
             JOIN subscriptions s ON s.id = d.subscription_id
             WHERE d.id = $1 AND s.tenant = $2 FOR UPDATE OF d",
            &[&id, &tenant],
        )
        .await?;
    let status: Option<String> = match row {
        Some(row) => Some(row.try_get(0).map_err(decode_error)?),
        None => None,
    };
    if let Some(refused) = redeliver_refusal(status.as_deref())? {
        return Ok(refused);
    }
    // A redelivery starts its retry period over.
    conn.query(
        "UPDATE deliveries SET status = 'pending', next_at = $2, created_at = $2, updated_at = $2
         WHERE id = $1",
        &[&id, &now_us],
    )
    .await?;
    Ok(RedeliverOutcome::Queued)
}
