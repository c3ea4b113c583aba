//! The SQLite side of API keys: the `api_keys` table. Writes run on the
//! writer thread; lookups run on read connections.

use ripen_core::UnixMicros;
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::keys::{decode_scopes, encode_scopes, ApiKey};
use crate::Result;

/// Added by the upgrade to version 6. Revoked keys are kept, so that a
/// store that ever had a key never runs open again.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    scopes TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
";

const COLUMNS: &str = "id, tenant, name, scopes, hash, created_at, revoked_at";

fn api_key(r: &Row<'_>) -> rusqlite::Result<ApiKey> {
    Ok(ApiKey {
        id: r.get(0)?,
        tenant: r.get(1)?,
        name: r.get(2)?,
        scopes: decode_scopes(&r.get::<_, String>(3)?),
        hash: r.get(4)?,
        created_at_us: r.get(5)?,
        revoked_at_us: r.get(6)?,
    })
}

pub(super) fn put(conn: &Connection, key: &ApiKey) -> Result<()> {
    conn.prepare_cached(&format!(
        "INSERT INTO api_keys ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
    ))?
    .execute(params![
        key.id,
        key.tenant,
        key.name,
        encode_scopes(&key.scopes),
        key.hash,
        key.created_at_us,
        key.revoked_at_us,
    ])?;
    Ok(())
}

pub(super) fn by_hash(conn: &Connection, hash: &str) -> Result<Option<ApiKey>> {
    Ok(conn
        .prepare_cached(&format!("SELECT {COLUMNS} FROM api_keys WHERE hash = ?1"))?
        .query_row([hash], api_key)
        .optional()?)
}

pub(super) fn list(conn: &Connection, tenant: Option<&str>) -> Result<Vec<ApiKey>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM api_keys WHERE ?1 IS NULL OR tenant = ?1 ORDER BY created_at, id"
    ))?;
    let keys = stmt
        .query_map([tenant], api_key)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(keys)
}

pub(super) fn revoke(
    conn: &Connection,
    tenant: Option<&str>,
    id: &str,
    now_us: UnixMicros,
) -> Result<Option<ApiKey>> {
    conn.prepare_cached(
        "UPDATE api_keys SET revoked_at = ?3
         WHERE id = ?1 AND (?2 IS NULL OR tenant = ?2) AND revoked_at IS NULL",
    )?
    .execute(params![id, tenant, now_us])?;
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM api_keys WHERE id = ?1 AND (?2 IS NULL OR tenant = ?2)"
        ))?
        .query_row(params![id, tenant], api_key)
        .optional()?)
}

pub(super) fn any(conn: &Connection) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM api_keys)")?
        .query_row([], |r| r.get(0))?)
}
