//! Key → slot. `slot = xxh3_64(key_bytes, seed = 0) % slot_count`. This function decides
//! which users live in which cell; it is pinned by golden vectors and must never change.

use xxhash_rust::xxh3::xxh3_64;

/// Slot count used when the configuration does not name one.
pub const DEFAULT_SLOT_COUNT: u32 = 16384;

/// The slot of `key` in a table of `slot_count` slots (`slot_count` > 0).
#[inline]
pub fn slot_of(key: &[u8], slot_count: u32) -> u32 {
    (xxh3_64(key) % u64::from(slot_count.max(1))) as u32
}
