//! Rotation of the master key (docs/security.md): a node started with the
//! current key followed by previous ones seals again, with the current key,
//! every webhook secret and connector password that a previous key sealed.
//! Each value is written only if its row still holds what was read, so
//! nodes that rotate at once never undo each other.

use std::sync::Arc;

use anyhow::{Context, Result};
use ripen_notify::seal::MasterKey;
use ripen_store::{Reseal, Store};

use crate::registry::seal;

/// What a pass sealed again, and what it could not open.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Resealed {
    /// Webhook secrets a previous key had sealed.
    pub secrets: u64,
    /// Type versions with a connector password a previous key had sealed.
    pub definitions: u64,
    /// How many of those this node wrote (another node may have been first).
    pub written: u64,
    /// Values that open with none of the keys: left as they are.
    pub unopened: u64,
}

/// Seals again what a previous key sealed; nothing to do unless `key`
/// carries previous keys.
pub async fn reseal(store: &Arc<dyn Store>, key: &MasterKey) -> Result<Resealed> {
    let mut done = Resealed::default();
    if !key.rotating() {
        return Ok(done);
    }
    let mut values = Vec::new();
    for sub in store
        .subscription_list()
        .await
        .context("read the subscriptions")?
    {
        if sub.sealed_secret.is_empty() {
            continue;
        }
        match key.reseal(&sub.sealed_secret, &sub.id) {
            Ok(Some(now)) => values.push(Reseal::Secret {
                subscription_id: sub.id,
                was: sub.sealed_secret,
                now,
            }),
            Ok(None) => {}
            Err(_) => done.unopened += 1,
        }
    }
    let secrets = values.len();
    for version in store
        .type_versions(None)
        .await
        .context("read the type versions")?
    {
        match seal::reseal(key, &version.type_name, &version.definition) {
            Ok(Some(now)) => values.push(Reseal::Definition {
                type_name: version.type_name,
                version: version.version,
                was: version.definition,
                now,
            }),
            Ok(None) => {}
            Err(_) => done.unopened += 1,
        }
    }
    done.secrets = secrets as u64;
    done.definitions = (values.len() - secrets) as u64;
    if !values.is_empty() {
        done.written = store
            .reseal(values)
            .await
            .context("write the sealed values")?;
    }
    Ok(done)
}
