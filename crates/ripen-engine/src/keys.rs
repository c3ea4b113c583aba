//! API keys: minting, hashing and scopes (docs/security.md).
//!
//! A key is `rpk_` and 43 base64url characters: 256 random bits. The store
//! keeps only its SHA-256, so a key is checked with one hash and one indexed
//! lookup: the key's own entropy is what makes a fast hash safe, where a
//! password would need a slow one. A key is shown once, when it is minted.

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use ripen_core::UnixMicros;
pub use ripen_store::DEFAULT_TENANT;
use ripen_store::{ApiKey, Changes, Store};

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Submit entities.
    Submit,
    /// Read entities, their events and streams, stats and types.
    Read,
    /// Retry and cancel entities.
    Operate,
    /// Manage keys, subscriptions and type versions.
    Admin,
    /// Claim and finish the tasks of worker queues.
    Worker,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Scope::Submit,
        Scope::Read,
        Scope::Operate,
        Scope::Admin,
        Scope::Worker,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Submit => "submit",
            Scope::Read => "read",
            Scope::Operate => "operate",
            Scope::Admin => "admin",
            Scope::Worker => "worker",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == s)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of scopes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    pub fn all() -> Scopes {
        Scope::ALL.into_iter().collect()
    }

    pub fn has(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    pub fn names(self) -> Vec<&'static str> {
        Scope::ALL
            .into_iter()
            .filter(|s| self.has(*s))
            .map(Scope::as_str)
            .collect()
    }

    /// Scopes from a comma-separated list (`submit,read`) or the names of
    /// a key's row; an unknown name is an error that names it.
    pub fn parse<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Scopes, String> {
        let mut out = Scopes::default();
        for name in names {
            let name = name.trim();
            if name.is_empty() {
                continue;
            }
            let scope = Scope::parse(name).ok_or_else(|| {
                format!(
                    "unknown scope {name:?}; the scopes are {}",
                    Scope::ALL.map(Scope::as_str).join(", ")
                )
            })?;
            out.0 |= scope.bit();
        }
        if out.0 == 0 {
            return Err("a key needs at least one scope".into());
        }
        Ok(out)
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Scopes {
        Scopes(iter.into_iter().fold(0, |bits, s| bits | s.bit()))
    }
}

/// The prefix of every key: it tells a leaked secret for what it is.
pub const KEY_PREFIX: &str = "rpk_";
/// The longest tenant name and key name.
pub const NAME_LEN_MAX: usize = 64;

/// A tenant is named like a type: 1 to 64 ASCII letters, digits, `_` or `-`.
pub fn valid_tenant(name: &str) -> bool {
    crate::config::valid_type_name(name)
}

/// The lowercase hex SHA-256 of a presented key: what the store looks up.
pub fn hash(secret: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    hex(digest.as_ref())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// A new key: the row to store, and the secret to show once.
pub struct Minted {
    pub key: ApiKey,
    pub secret: String,
}

/// Mints a key for `tenant` with `scopes`.
pub fn mint(
    tenant: &str,
    name: &str,
    scopes: Scopes,
    now_us: UnixMicros,
) -> Result<Minted, String> {
    if !valid_tenant(tenant) {
        return Err(format!(
            "{tenant:?} is not a tenant name: 1 to 64 ASCII letters, digits, '_' or '-'"
        ));
    }
    if name.len() > NAME_LEN_MAX || name.chars().any(char::is_control) {
        return Err(format!(
            "a key's name is at most {NAME_LEN_MAX} bytes without control characters"
        ));
    }
    let rng = SystemRandom::new();
    let mut secret = [0u8; 32];
    let mut id = [0u8; 8];
    rng.fill(&mut secret)
        .and_then(|()| rng.fill(&mut id))
        .map_err(|_| "the system's random source failed".to_owned())?;
    let secret = format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    Ok(Minted {
        key: ApiKey {
            id: format!("key_{}", hex(&id)),
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            scopes: scopes.names().into_iter().map(str::to_owned).collect(),
            hash: hash(&secret),
            created_at_us: now_us,
            revoked_at_us: None,
        },
        secret,
    })
}

/// Mints a key and stores it: what `ripen keys create --config` does
/// before any server runs.
pub async fn create(
    store: &dyn Store,
    tenant: &str,
    name: &str,
    scopes: Scopes,
    now_us: UnixMicros,
) -> anyhow::Result<Minted> {
    let minted = mint(tenant, name, scopes, now_us).map_err(anyhow::Error::msg)?;
    store.put_key(minted.key.clone()).await?;
    Ok(minted)
}

/// Calls `heard` whenever a node created or revoked a key, or the store
/// may have missed that it did.
pub fn watch(store: &dyn Store, heard: Arc<dyn Fn() + Send + Sync>) {
    store.watch_changes(Arc::new(move |c: &Changes<'_>| {
        if c.keys {
            heard();
        }
    }));
}

/// A stored key's scopes; a name this build does not know grants nothing.
pub fn scopes_of(key: &ApiKey) -> Scopes {
    key.scopes.iter().filter_map(|s| Scope::parse(s)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn minted_keys_are_long_random_and_hashed() {
        let a = mint("acme", "ci", Scopes::all(), 1).expect("mint");
        let b = mint("acme", "ci", Scopes::all(), 1).expect("mint");
        assert_ne!(a.secret, b.secret);
        assert_ne!(a.key.id, b.key.id);
        assert!(a.secret.starts_with(KEY_PREFIX));
        assert_eq!(a.secret.len(), KEY_PREFIX.len() + 43);
        assert_eq!(a.key.hash, hash(&a.secret));
        assert_eq!(a.key.hash.len(), 64);
        assert!(!a.key.hash.contains(&a.secret[KEY_PREFIX.len()..]));
        // A known vector: SHA-256 of "abc".
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn bad_tenants_names_and_scopes_are_refused() {
        assert!(mint("", "", Scopes::all(), 1).is_err());
        assert!(mint("a b", "", Scopes::all(), 1).is_err());
        assert!(mint("acme", "bad\nname", Scopes::all(), 1).is_err());
        assert!(Scopes::parse(["read", "delete"])
            .unwrap_err()
            .contains("\"delete\""));
        assert!(Scopes::parse([""]).is_err());
        assert_eq!(
            Scopes::parse("submit, read".split(','))
                .expect("parse")
                .names(),
            ["submit", "read"]
        );
    }

    proptest! {
        #[test]
        fn scope_sets_hold_exactly_what_they_were_given(bits in 0u8..32) {
            let given: Vec<Scope> = Scope::ALL.into_iter().filter(|s| bits & s.bit() != 0).collect();
            let set: Scopes = given.iter().copied().collect();
            for s in Scope::ALL {
                prop_assert_eq!(set.has(s), given.contains(&s));
            }
            if !given.is_empty() {
                let names = set.names();
                prop_assert_eq!(Scopes::parse(names.iter().copied()).expect("parse"), set);
            }
        }
    }
}
