//! The key → slot function is pinned by vectors generated with an independent xxh3
//! implementation. If this test fails, a change would move users between cells.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cellgate_routing::slot_of;

#[test]
fn slots_match_the_committed_golden_vectors() {
    let text = include_str!("golden/slots.tsv");
    let mut n = 0;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 4, "line {line:?}");
        let key = f[0];
        let hash = u64::from_str_radix(f[1], 16).unwrap();
        assert_eq!(
            xxhash_rust::xxh3::xxh3_64(key.as_bytes()),
            hash,
            "xxh3_64({key:?})"
        );
        assert_eq!(
            slot_of(key.as_bytes(), 16384),
            f[2].parse::<u32>().unwrap(),
            "slot of {key:?} in 16384"
        );
        assert_eq!(
            slot_of(key.as_bytes(), 1024),
            f[3].parse::<u32>().unwrap(),
            "slot of {key:?} in 1024"
        );
        n += 1;
    }
    assert!(n >= 50, "{n} vectors");
}
