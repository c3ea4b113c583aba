//! Connector passwords sealed at rest (docs/security.md): before a version
//! is stored, the password of each built-in connector's `url` is sealed
//! with the master key, bound to the type; when a version is read back it is
//! opened again. The digest of a version is that of its plain definition,
//! so sealing, whose nonce is random, never makes a new version.
//!
//! A sealed password reads `sealed.` and base64url: the URL stays a URL.
//! Without a master key a definition is stored as it is.

use base64::Engine as _;
use ripen_notify::seal::MasterKey;
use serde_json::Value;

const SEALED: &str = "sealed.";

fn row(type_name: &str) -> String {
    format!("type:{type_name}")
}

/// The password of `url` (`scheme://user:password@host…`): where it starts
/// and ends.
fn password_span(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://")? + 3;
    let authority_end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    let at = url[start..authority_end].rfind('@')? + start;
    let colon = url[start..at].find(':')? + start;
    (colon + 1 < at).then_some((colon + 1, at))
}

/// Calls `f` on the `url` of every built-in connector of a definition.
fn each_url(
    definition: &mut Value,
    mut f: impl FnMut(&mut String) -> Result<(), String>,
) -> Result<(), String> {
    let Some(steps) = definition.get_mut("steps").and_then(Value::as_array_mut) else {
        return Ok(());
    };
    for step in steps {
        let Some(connectors) = step.get_mut("builtin").and_then(Value::as_object_mut) else {
            continue;
        };
        for settings in connectors.values_mut() {
            if let Some(Value::String(url)) = settings.get_mut("url") {
                f(url)?;
            }
        }
    }
    Ok(())
}

/// The stored text of a definition: its passwords sealed with `key`.
pub fn seal(key: Option<&MasterKey>, type_name: &str, text: &str) -> Result<String, String> {
    let Some(key) = key else {
        return Ok(text.to_owned());
    };
    let mut definition: Value =
        serde_json::from_str(text).map_err(|e| format!("the definition is not JSON: {e}"))?;
    let mut changed = false;
    each_url(&mut definition, |url| {
        if let Some((from, to)) = password_span(url) {
            if url[from..to].starts_with(SEALED) {
                return Ok(());
            }
            let sealed = key.seal(&url.as_bytes()[from..to], &row(type_name))?;
            let sealed = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sealed);
            url.replace_range(from..to, &format!("{SEALED}{sealed}"));
            changed = true;
        }
        Ok(())
    })?;
    Ok(if changed {
        definition.to_string()
    } else {
        text.to_owned()
    })
}

/// A stored definition with its passwords opened again.
pub fn open(key: Option<&MasterKey>, type_name: &str, text: &str) -> Result<String, String> {
    if !text.contains(SEALED) {
        return Ok(text.to_owned());
    }
    let mut definition: Value =
        serde_json::from_str(text).map_err(|e| format!("the definition is not JSON: {e}"))?;
    each_url(&mut definition, |url| {
        let Some((from, to)) = password_span(url) else {
            return Ok(());
        };
        let Some(sealed) = url[from..to].strip_prefix(SEALED) else {
            return Ok(());
        };
        let key = key.ok_or(
            "a connector password is sealed, and this node has no master key (RIPEN_MASTER_KEY or notify.master_key_file)",
        )?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sealed)
            .map_err(|_| "a sealed connector password is not base64url".to_owned())?;
        let plain = key.open(&bytes, &row(type_name))?;
        let plain = String::from_utf8(plain)
            .map_err(|_| "a sealed connector password is not text".to_owned())?;
        url.replace_range(from..to, &plain);
        Ok(())
    })?;
    Ok(definition.to_string())
}

/// A stored definition whose passwords were sealed with a previous master
/// key, sealed again with the current one; `None` when every password
/// already opens with the current key (or none is sealed).
pub fn reseal(key: &MasterKey, type_name: &str, text: &str) -> Result<Option<String>, String> {
    if !text.contains(SEALED) {
        return Ok(None);
    }
    let mut definition: Value =
        serde_json::from_str(text).map_err(|e| format!("the definition is not JSON: {e}"))?;
    let mut changed = false;
    each_url(&mut definition, |url| {
        let Some((from, to)) = password_span(url) else {
            return Ok(());
        };
        let Some(sealed) = url[from..to].strip_prefix(SEALED) else {
            return Ok(());
        };
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sealed)
            .map_err(|_| "a sealed connector password is not base64url".to_owned())?;
        if let Some(again) = key.reseal(&bytes, &row(type_name))? {
            let again = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(again);
            url.replace_range(from..to, &format!("{SEALED}{again}"));
            changed = true;
        }
        Ok(())
    })?;
    Ok(changed.then(|| definition.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition(url: &str) -> String {
        serde_json::json!({
            "schema": {},
            "steps": [{"name": "index", "builtin": {"postgres_upsert": {"url": url, "table": "t"}}}],
        })
        .to_string()
    }

    #[test]
    fn passwords_are_sealed_at_rest_and_open_again() {
        let key = MasterKey::parse(&"ab".repeat(32)).expect("key");
        let plain = definition("postgres://app:s3cr%40t@db:5432/shop");
        let stored = seal(Some(&key), "merchant", &plain).expect("seal");
        assert!(!stored.contains("s3cr"), "{stored}");
        assert!(stored.contains("postgres://app:sealed."), "{stored}");
        let back: Value =
            serde_json::from_str(&open(Some(&key), "merchant", &stored).expect("open"))
                .expect("json");
        assert_eq!(back, serde_json::from_str::<Value>(&plain).expect("json"));
        // Bound to its type, and to its key.
        assert!(open(Some(&key), "store", &stored).is_err());
        let other = MasterKey::parse(&"cd".repeat(32)).expect("key");
        assert!(open(Some(&other), "merchant", &stored).is_err());
        assert!(open(None, "merchant", &stored)
            .unwrap_err()
            .contains("master key"));
        // Sealed again for a rotation: the new key alone opens it then.
        let ring =
            MasterKey::parse(&format!("{},{}", "cd".repeat(32), "ab".repeat(32))).expect("ring");
        let again = reseal(&ring, "merchant", &stored)
            .expect("reseal")
            .expect("sealed with the old key");
        assert!(open(Some(&other), "merchant", &again).is_ok());
        assert!(open(Some(&key), "merchant", &again).is_err());
        assert_eq!(reseal(&ring, "merchant", &again).expect("reseal"), None);
        assert_eq!(reseal(&ring, "merchant", &plain).expect("plain"), None);
        // Sealed twice is sealed once.
        assert_eq!(seal(Some(&key), "merchant", &stored).expect("seal"), stored);
    }

    #[test]
    fn what_has_no_password_is_stored_as_it_is() {
        let key = MasterKey::parse(&"ab".repeat(32)).expect("key");
        for url in [
            "postgres://app@db/shop",
            "redis://127.0.0.1:6379",
            "postgres://app:@db/x",
        ] {
            let plain = definition(url);
            assert_eq!(seal(Some(&key), "t", &plain).expect("seal"), plain);
            assert_eq!(open(Some(&key), "t", &plain).expect("open"), plain);
        }
        let plain = definition("postgres://app:pw@db/shop");
        assert_eq!(
            seal(None, "t", &plain).expect("seal"),
            plain,
            "no key: as it is"
        );
    }
}
