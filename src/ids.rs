//! Identifiers and bearer tokens: random, prefixed by what they name (`shp_…`, `cmp_…`), so a
//! stray id in a log says what it is.

use sha2::{Digest, Sha256};

/// A new random id such as `shp_3f2c…` (UUID v4, 122 random bits).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// A new bearer token: 256 random bits, hex, behind a role prefix.
pub fn new_token(prefix: &str) -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{prefix}_{}", hex::encode(bytes))
}

/// The form in which tokens are stored and compared: lowercase hex SHA-256.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_and_hash_stably() {
        let a = new_token("pld");
        assert_ne!(a, new_token("pld"));
        assert!(a.starts_with("pld_") && a.len() == 4 + 64);
        assert_eq!(hash_token(&a), hash_token(&a));
        assert_eq!(hash_token("abc").len(), 64);
        assert!(new_id("shp").starts_with("shp_"));
    }
}
