//! Conformance tests of API keys.

use std::sync::{Arc, Mutex};

use super::*;
use crate::{ApiKey, Changes};

fn key(id: &str, tenant: &str, scopes: &[&str]) -> ApiKey {
    ApiKey {
        id: id.into(),
        tenant: tenant.into(),
        name: format!("the {id} key"),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        hash: format!("hash-of-{id}"),
        created_at_us: T0,
        revoked_at_us: None,
    }
}

/// A key is found by its hash only; listing is per tenant or whole; a
/// revoke is scoped to a tenant, keeps its first time, and is heard by the
/// change watchers; a store that ever had a key says so after a revoke.
pub async fn keys_are_stored_found_by_hash_listed_and_revoked(store: Arc<dyn Store>) {
    let heard = Arc::new(Mutex::new(0u32));
    let counter = heard.clone();
    store.watch_changes(Arc::new(move |c: &Changes<'_>| {
        if c.keys {
            *counter.lock().expect("lock") += 1;
        }
    }));
    assert!(!store.any_keys().await.expect("any"));
    let a = key("key_a", "acme", &["submit", "read"]);
    let b = key("key_b", "beta", &["admin"]);
    store.put_key(a.clone()).await.expect("put a");
    store.put_key(b.clone()).await.expect("put b");
    assert!(store.any_keys().await.expect("any"));
    assert!(*heard.lock().expect("lock") >= 2, "creates are heard");

    assert_eq!(
        store.key_by_hash("hash-of-key_a").await.expect("by hash"),
        Some(a.clone())
    );
    assert_eq!(
        store.key_by_hash("key_a").await.expect("by hash"),
        None,
        "ids are not hashes"
    );
    assert_eq!(
        store.keys(None).await.expect("all"),
        vec![a.clone(), b.clone()]
    );
    assert_eq!(
        store.keys(Some("beta")).await.expect("beta"),
        vec![b.clone()]
    );

    // A duplicate hash is refused: two secrets never share a row.
    let mut twin = key("key_c", "acme", &["read"]);
    twin.hash = a.hash.clone();
    assert!(store.put_key(twin).await.is_err());

    let before = *heard.lock().expect("lock");
    assert_eq!(
        store
            .revoke_key(Some("beta"), "key_a", T0 + 5)
            .await
            .expect("revoke"),
        None,
        "another tenant's key is not found"
    );
    let revoked = store
        .revoke_key(Some("acme"), "key_a", T0 + 5)
        .await
        .expect("revoke")
        .expect("found");
    assert_eq!(revoked.revoked_at_us, Some(T0 + 5));
    assert!(*heard.lock().expect("lock") > before, "revokes are heard");
    let again = store
        .revoke_key(None, "key_a", T0 + 9)
        .await
        .expect("revoke")
        .expect("found");
    assert_eq!(
        again.revoked_at_us,
        Some(T0 + 5),
        "the first revocation stands"
    );
    assert_eq!(
        store
            .key_by_hash("hash-of-key_a")
            .await
            .expect("by hash")
            .and_then(|k| k.revoked_at_us),
        Some(T0 + 5)
    );
    assert_eq!(
        store.revoke_key(None, "key_x", T0).await.expect("revoke"),
        None
    );
    store
        .revoke_key(None, "key_b", T0 + 9)
        .await
        .expect("revoke b");
    assert!(
        store.any_keys().await.expect("any"),
        "revoked keys still count"
    );
}
