//! API keys as the store keeps them: who a key speaks for (its tenant), what
//! it may do (its scopes), and the SHA-256 of its secret. The secret itself
//! is never stored; the server hashes what a request presents and looks the
//! hash up. What a scope allows is the server's business, not the store's.

use ripen_core::UnixMicros;

/// One API key. `hash` is the lowercase hex SHA-256 of the whole key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub hash: String,
    pub created_at_us: UnixMicros,
    pub revoked_at_us: Option<UnixMicros>,
}

/// Scopes as one column: comma-separated.
pub(crate) fn encode_scopes(scopes: &[String]) -> String {
    scopes.join(",")
}

pub(crate) fn decode_scopes(column: &str) -> Vec<String> {
    column
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip_through_one_column() {
        for scopes in [
            vec![],
            vec!["read".to_owned()],
            vec!["submit".into(), "read".into()],
        ] {
            assert_eq!(decode_scopes(&encode_scopes(&scopes)), scopes);
        }
    }
}
