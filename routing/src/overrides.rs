//! Key → cell pins (overrides): a SwissTable index (`hashbrown::HashTable`) keyed by the
//! keys' xxh3 hashes — the hash the slot is computed from, so a lookup hashes nothing again
//! — whose 8-byte entries point into one string holding every pinned key back to back. A
//! key that is not pinned costs one probe of the table's control bytes (1 byte per entry,
//! so a million pins keep only ~2 MB hot); a pinned key reads its entry and its bytes.
//! One million pins take ~28 MB instead of one heap block per key.
//!
//! Built once per table off the request path and never mutated after the table is
//! published. A lookup must never hash the key itself nor allocate.

use std::fmt;

use hashbrown::HashTable;
use xxhash_rust::xxh3::xxh3_64;

use crate::table::CellIdx;

/// One pin: where its key's bytes are in [`Overrides::keys`], and its cell.
#[derive(Clone, Copy)]
struct Entry {
    off: u32,
    len: u16,
    cell: CellIdx,
}

/// Key → cell pins. See the module docs.
#[derive(Default)]
pub struct Overrides {
    index: HashTable<Entry>,
    /// Every pinned key, back to back.
    keys: String,
}

impl fmt::Debug for Overrides {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Overrides")
            .field("len", &self.index.len())
            .field("key_bytes", &self.keys.len())
            .finish()
    }
}

/// The key `e` points at in `keys`.
fn key_of<'k>(keys: &'k str, e: &Entry) -> Option<&'k str> {
    let start = e.off as usize;
    keys.get(start..start + usize::from(e.len))
}

impl Overrides {
    /// An empty set with room for `n` pins of `key_bytes` bytes in all before it grows.
    pub(crate) fn with_capacity(n: usize, key_bytes: usize) -> Self {
        Self {
            index: HashTable::with_capacity(n),
            keys: String::with_capacity(key_bytes),
        }
    }

    /// Pin `key` (whose xxh3 is `hash`, which growing the index recomputes) to `cell`; a second pin of the same key replaces
    /// it. False, and nothing pinned, when the key cannot be indexed: longer than 65,535
    /// bytes, or the pinned keys would exceed 4 GiB (keys are checked against
    /// [`crate::MAX_KEY_LEN`] before they get here, so only the second can happen from a
    /// table build).
    pub(crate) fn insert(&mut self, hash: u64, key: &str, cell: CellIdx) -> bool {
        let keys = &self.keys;
        let entry = self.index.entry(
            hash,
            |e| key_of(keys, e) == Some(key),
            // Only when the index grows: the entries' hashes are not stored.
            |e| key_of(keys, e).map_or(0, |k| xxh3_64(k.as_bytes())),
        );
        match entry {
            hashbrown::hash_table::Entry::Occupied(mut o) => {
                o.get_mut().cell = cell;
                true
            }
            hashbrown::hash_table::Entry::Vacant(v) => {
                let (Ok(len), Ok(off), Ok(_)) = (
                    u16::try_from(key.len()),
                    u32::try_from(keys.len()),
                    u32::try_from(keys.len() + key.len()),
                ) else {
                    return false;
                };
                v.insert(Entry { off, len, cell });
                self.keys.push_str(key);
                true
            }
        }
    }

    /// The cell `key` is pinned to. `hash` must be the key's xxh3 (any other value finds
    /// nothing or, by chance, the key's pin anyway).
    #[inline]
    pub fn get(&self, hash: u64, key: &str) -> Option<CellIdx> {
        self.index
            .find(hash, |e| key_of(&self.keys, e) == Some(key))
            .map(|e| e.cell)
    }

    /// Number of pinned keys.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no key is pinned.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Every pin, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, CellIdx)> {
        self.index
            .iter()
            .filter_map(|e| Some((key_of(&self.keys, e)?, e.cell)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn pins_are_found_replaced_and_listed_across_growth() {
        let mut o = Overrides::default();
        assert_eq!(o.get(xxh3_64(b"a"), "a"), None);
        let mut want = HashMap::new();
        for i in 0..5000u32 {
            let k = format!("user-{i}");
            let c = (i % 7) as CellIdx;
            assert!(o.insert(xxh3_64(k.as_bytes()), &k, c));
            want.insert(k, c);
        }
        // A second pin of the same key replaces the first and adds nothing.
        assert!(o.insert(xxh3_64(b"user-3"), "user-3", 42));
        want.insert("user-3".into(), 42);
        assert_eq!(o.len(), 5000);
        for (k, c) in &want {
            assert_eq!(o.get(xxh3_64(k.as_bytes()), k), Some(*c), "{k}");
        }
        assert_eq!(o.get(xxh3_64(b"user-5000"), "user-5000"), None);
        let listed: HashMap<String, CellIdx> = o.iter().map(|(k, c)| (k.to_owned(), c)).collect();
        assert_eq!(listed, want);
    }

    #[test]
    fn colliding_hashes_are_told_apart_by_the_key() {
        // Every key under one hash: each must still find its own cell, and an unpinned key
        // with that hash must find none. (Room for all four up front: growing re-hashes
        // the keys with xxh3, which these made-up hashes are not.)
        let mut o = Overrides::with_capacity(4, 6);
        for (i, k) in ["x", "yy", "", "zzz"].iter().enumerate() {
            assert!(o.insert(7, k, i as CellIdx));
        }
        for (i, k) in ["x", "yy", "", "zzz"].iter().enumerate() {
            assert_eq!(o.get(7, k), Some(i as CellIdx));
        }
        assert_eq!(o.get(7, "w"), None);
        assert_eq!(o.len(), 4);
    }

    #[test]
    fn a_key_too_long_to_index_is_refused_not_truncated() {
        let mut o = Overrides::default();
        let long = "k".repeat(usize::from(u16::MAX) + 1);
        assert!(!o.insert(1, &long, 0));
        assert!(o.is_empty());
        assert_eq!(o.get(1, &long), None);
    }
}
