//! The PostgreSQL side of API keys, shared by every node: the `api_keys`
//! table. A create or a revoke notifies `ripen_keys` in its transaction, so
//! that every node drops what it remembers of keys when it commits.

use ripen_core::UnixMicros;
use tokio_postgres::Row;

use super::{decode_error, Conn};
use crate::keys::{decode_scopes, encode_scopes, ApiKey};
use crate::Result;

/// Added to the schema in version 5. Revoked keys are kept, so that a store
/// that ever had a key never runs open again.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS api_keys (
    id text PRIMARY KEY,
    tenant text NOT NULL,
    name text NOT NULL,
    scopes text NOT NULL,
    hash text NOT NULL UNIQUE,
    created_at bigint NOT NULL,
    revoked_at bigint
);
";

/// What nodes listen on to hear that keys changed.
pub(super) const CHANNEL: &str = "ripen_keys";

const COLUMNS: &str = "id, tenant, name, scopes, hash, created_at, revoked_at";

fn api_key(r: &Row) -> Result<ApiKey> {
    Ok(ApiKey {
        id: r.try_get(0).map_err(decode_error)?,
        tenant: r.try_get(1).map_err(decode_error)?,
        name: r.try_get(2).map_err(decode_error)?,
        scopes: decode_scopes(r.try_get(3).map_err(decode_error)?),
        hash: r.try_get(4).map_err(decode_error)?,
        created_at_us: r.try_get(5).map_err(decode_error)?,
        revoked_at_us: r.try_get(6).map_err(decode_error)?,
    })
}

/// Inside the caller's transaction.
pub(super) async fn put(conn: &Conn, key: &ApiKey) -> Result<()> {
    conn.query(
        &format!("INSERT INTO api_keys ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"),
        &[
            &key.id,
            &key.tenant,
            &key.name,
            &encode_scopes(&key.scopes),
            &key.hash,
            &key.created_at_us,
            &key.revoked_at_us,
        ],
    )
    .await?;
    conn.query("SELECT pg_notify($1, $2)", &[&CHANNEL, &key.id])
        .await?;
    Ok(())
}

pub(super) async fn by_hash(conn: &Conn, hash: &str) -> Result<Option<ApiKey>> {
    let rows = conn
        .query(
            &format!("SELECT {COLUMNS} FROM api_keys WHERE hash = $1"),
            &[&hash],
        )
        .await?;
    rows.first().map(api_key).transpose()
}

pub(super) async fn list(conn: &Conn, tenant: Option<&str>) -> Result<Vec<ApiKey>> {
    let rows = conn
        .query(
            &format!(
                "SELECT {COLUMNS} FROM api_keys WHERE $1::text IS NULL OR tenant = $1
                 ORDER BY created_at, id"
            ),
            &[&tenant],
        )
        .await?;
    rows.iter().map(api_key).collect()
}

/// Inside the caller's transaction.
pub(super) async fn revoke(
    conn: &Conn,
    tenant: Option<&str>,
    id: &str,
    now_us: UnixMicros,
) -> Result<Option<ApiKey>> {
    conn.query(
        "UPDATE api_keys SET revoked_at = $3
         WHERE id = $1 AND ($2::text IS NULL OR tenant = $2) AND revoked_at IS NULL",
        &[&id, &tenant, &now_us],
    )
    .await?;
    let rows = conn
        .query(
            &format!(
                "SELECT {COLUMNS} FROM api_keys WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)"
            ),
            &[&id, &tenant],
        )
        .await?;
    let key = rows.first().map(api_key).transpose()?;
    if key.is_some() {
        conn.query("SELECT pg_notify($1, $2)", &[&CHANNEL, &id])
            .await?;
    }
    Ok(key)
}

pub(super) async fn any(conn: &Conn) -> Result<bool> {
    let rows = conn
        .query("SELECT EXISTS (SELECT 1 FROM api_keys)", &[])
        .await?;
    rows.first()
        .map(|r| r.try_get(0).map_err(decode_error))
        .transpose()
        .map(|found| found.unwrap_or(false))
}
