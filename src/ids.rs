//! Identifiers and bearer tokens: unguessable, prefixed by what they name (`shp_…`, `cmp_…`),
//! so a stray id in a log says what it is.

use sha2::{Digest, Sha256};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The ordered half of the ids this process makes: a random start, then one more per id.
static NEXT: LazyLock<AtomicU64> = LazyLock::new(|| AtomicU64::new(rand::random()));

/// A new id such as `plg_3f2c…`: 32 hex digits, the first 12 counting up in this process from
/// a random start, the last 20 random (80 bits, so ids stay unguessable).
///
/// Why not random throughout: a random key lands on a random page of every index it is in, so
/// a batch of n rows dirtied n pages per index, each written whole to the WAL at commit. Ids
/// made one after another sort together, so a batch appends to the same few pages (a join's
/// pledge, intent, gateway, ledger and email rows are all keyed by such ids).
pub fn new_id(prefix: &str) -> String {
    let ordered = NEXT.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff_ffff;
    let random: u128 = rand::random::<u128>() & ((1 << 80) - 1);
    format!("{prefix}_{ordered:012x}{random:020x}")
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

    #[test]
    fn ids_are_unique_and_sort_in_the_order_they_were_made() {
        let ids: Vec<String> = (0..1000).map(|_| new_id("plg")).collect();
        assert!(ids.iter().all(|id| id.len() == 4 + 32));
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len(), "unique");
        // In order, except across the one wrap of the 48-bit counter that may fall in a run.
        let descents = ids.windows(2).filter(|w| w[0] > w[1]).count();
        assert!(descents <= 1, "{descents}");
    }
}
