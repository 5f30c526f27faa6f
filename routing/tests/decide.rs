//! Decision invariants: shares follow slots, overrides win, the failover walk picks the first
//! serving target, and two tables built from the same input decide identically.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use cellgate_health::{HealthPolicy, HealthRegistry, Outcome};
use cellgate_routing::{
    CellSpec, CellState, InstanceSpec, Reason, RouteInput, RoutingTable, TableBuilder,
    UpstreamProtocol,
};
use proptest::prelude::*;

fn inst(name: &str, port: u16) -> InstanceSpec {
    InstanceSpec {
        name: name.into(),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        weight: 100,
        labels: Default::default(),
    }
}

fn spec(id: &str, region: &str, state: CellState, failover: &[&str]) -> CellSpec {
    CellSpec {
        id: id.into(),
        region: region.into(),
        state,
        weight: 100,
        failover: failover.iter().map(|s| (*s).to_owned()).collect(),
        instances: vec![
            inst(&format!("{id}-a"), 1000),
            inst(&format!("{id}-b"), 1001),
        ],
        protocol: UpstreamProtocol::Auto,
        balance: Default::default(),
    }
}

/// Four cells owning 10 %, 20 %, 30 % and 40 % of 16384 slots.
fn skewed(states: [CellState; 4], health: &HealthRegistry) -> RoutingTable {
    TableBuilder::new(7, 16384)
        .region("r1")
        .region("r2")
        .cell(spec("c0", "r1", states[0], &["c1", "c2", "c3"]))
        .cell(spec("c1", "r1", states[1], &["c0", "c2"]))
        .cell(spec("c2", "r2", states[2], &["c3", "c0"]))
        .cell(spec("c3", "r2", states[3], &["c2"]))
        .slot_ranges("c0", vec![(0, 1637)])
        .slot_ranges("c1", vec![(1638, 4914)])
        .slot_ranges("c2", vec![(4915, 9829)])
        .slot_ranges("c3", vec![(9830, 16383)])
        .build(health)
        .unwrap()
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn random_key(state: &mut u64) -> String {
    let len = 4 + (xorshift(state) % 28) as usize;
    (0..len)
        .map(|_| {
            char::from(b"abcdefghijklmnopqrstuvwxyz0123456789-_@."[(xorshift(state) % 40) as usize])
        })
        .collect()
}

#[test]
fn shares_of_100k_random_keys_are_within_one_percent_of_slot_shares() {
    let t = skewed([CellState::Active; 4], &HealthRegistry::new());
    let slots = t.slots_per_cell();
    let mut counts = [0u32; 4];
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let n = 100_000;
    for _ in 0..n {
        let key = random_key(&mut rng);
        let d = t
            .decide(&RouteInput {
                key: Some(&key),
                now_ms: 1,
                ..Default::default()
            })
            .unwrap();
        counts[usize::from(d.cell)] += 1;
    }
    for c in 0..4 {
        let key_share = f64::from(counts[c]) / f64::from(n);
        let slot_share = f64::from(slots[c]) / 16384.0;
        assert!(
            (key_share - slot_share).abs() <= 0.01,
            "cell c{c}: {key_share:.4} of keys vs {slot_share:.4} of slots"
        );
    }
}

#[test]
fn an_override_wins_over_the_slot_table_and_still_fails_over() {
    let health = HealthRegistry::new();
    let base = skewed([CellState::Active; 4], &health);
    let key = (0..1000)
        .map(|i| format!("vip-{i}"))
        .find(|k| base.home_of(k).1 == 3)
        .unwrap();
    let t = TableBuilder::new(8, 16384)
        .region("r1")
        .cell(spec("c0", "r1", CellState::Active, &[]))
        .cell(spec("c1", "r1", CellState::Draining, &["c0"]))
        .override_key(key.clone(), "c1")
        .build(&health)
        .unwrap();
    let plain = TableBuilder::new(8, 16384)
        .region("r1")
        .cell(spec("c0", "r1", CellState::Active, &[]))
        .cell(spec("c1", "r1", CellState::Active, &["c0"]))
        .override_key(key.clone(), "c1")
        .build(&health)
        .unwrap();
    let d = plain
        .decide(&RouteInput {
            key: Some(&key),
            now_ms: 1,
            ..Default::default()
        })
        .unwrap();
    assert_eq!((d.cell, d.reason), (1, Reason::Override));
    let d = t
        .decide(&RouteInput {
            key: Some(&key),
            now_ms: 1,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(d.cell, 0);
    assert_eq!(
        d.reason,
        Reason::Failover {
            from: 1,
            via_override: true
        }
    );
    let e = t.explain(&key, 1).unwrap();
    assert!(
        e.reason.contains("by override") && e.reason.contains("draining"),
        "{}",
        e.reason
    );
}

#[test]
fn ejected_instances_make_a_cell_fail_over_and_the_state_survives_a_rebuild() {
    let health = HealthRegistry::new();
    let t = skewed([CellState::Active; 4], &health);
    let key = (0..1000)
        .map(|i| format!("k{i}"))
        .find(|k| t.home_of(k).1 == 0)
        .unwrap();
    let policy = HealthPolicy::default();
    for inst in &t.cells()[0].instances {
        for _ in 0..policy.outlier.consecutive_failures {
            inst.health.record(10, Outcome::Timeout, &policy, 0, 2);
        }
    }
    let d = t
        .decide(&RouteInput {
            key: Some(&key),
            now_ms: 11,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        d.cell, 1,
        "home c0 has no healthy instance → first failover target c1"
    );
    // A new table (a reload) sees the same ejections.
    let t2 = skewed([CellState::Active; 4], &health);
    let d2 = t2
        .decide(&RouteInput {
            key: Some(&key),
            now_ms: 11,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(d2.cell, 1);
    // After the back-off the cell serves again.
    let d3 = t2
        .decide(&RouteInput {
            key: Some(&key),
            now_ms: 10 + 1000,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(d3.cell, 0);
}

#[test]
fn keyless_requests_use_the_hinted_region_then_others_or_are_rejected() {
    let health = HealthRegistry::new();
    let t = skewed(
        [
            CellState::Active,
            CellState::Active,
            CellState::Draining,
            CellState::Active,
        ],
        &health,
    );
    for spread in 0..50u64 {
        let d = t
            .decide(&RouteInput {
                region_hint: Some("r2"),
                spread,
                now_ms: 1,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(d.cell, 3, "only serving cell of r2");
    }
    let t = skewed(
        [
            CellState::Active,
            CellState::Active,
            CellState::Draining,
            CellState::Draining,
        ],
        &health,
    );
    let d = t
        .decide(&RouteInput {
            region_hint: Some("r2"),
            spread: 3,
            now_ms: 1,
            ..Default::default()
        })
        .unwrap();
    assert!(d.cell <= 1, "r2 has nothing serving → other regions");
    let reject = TableBuilder::new(1, 16384)
        .region("r1")
        .cell(spec("c0", "r1", CellState::Active, &[]))
        .anonymous(true, None)
        .build(&health)
        .unwrap();
    assert!(reject
        .decide(&RouteInput {
            now_ms: 1,
            ..Default::default()
        })
        .is_err());
}

/// Keyless traffic follows the dynamic weights: a cell whose instances health scored down
/// gets that much less of it.
#[test]
fn keyless_requests_follow_the_dynamic_weights() {
    let health = HealthRegistry::new();
    let t = TableBuilder::new(1, 16384)
        .region("r1")
        .cell(spec("c0", "r1", CellState::Active, &[]))
        .cell(spec("c1", "r1", CellState::Active, &[]))
        .build(&health)
        .unwrap();
    let share_of_c0 = |t: &RoutingTable| {
        let n = 10_000u64;
        let on_c0 = (0..n)
            .filter(|&i| {
                t.decide(&RouteInput {
                    region_hint: Some("r1"),
                    spread: i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11,
                    now_ms: 1,
                    ..Default::default()
                })
                .unwrap()
                .cell
                    == 0
            })
            .count() as f64;
        on_c0 / n as f64
    };
    let even = share_of_c0(&t);
    assert!((even - 0.5).abs() < 0.03, "equal cells: {even}");
    // c1's instances at a quarter of their weight (scored down): c0 gets 4 of 5 requests.
    let scored = t.with_weights(|c, i| {
        if &*c.id == "c1" {
            i.weight * 25
        } else {
            i.weight * 100
        }
    });
    let skewed = share_of_c0(&scored);
    assert!((skewed - 0.8).abs() < 0.03, "c1 scored down: {skewed}");
}

fn state_of(i: u8) -> CellState {
    [
        CellState::Active,
        CellState::Draining,
        CellState::FailedOver,
        CellState::Disabled,
    ][usize::from(i % 4)]
}

proptest! {
    #[test]
    fn decisions_follow_the_failover_walk_and_are_deterministic(key in "\\PC{1,64}", s in proptest::array::uniform4(0u8..4)) {
        let states = s.map(state_of);
        let t1 = skewed(states, &HealthRegistry::new());
        let t2 = skewed(states, &HealthRegistry::new());
        let input = RouteInput { key: Some(&key), now_ms: 1, ..Default::default() };
        let (d1, d2) = (t1.decide(&input), t2.decide(&input));
        prop_assert_eq!(&d1, &d2);
        let home = t1.home_of(&key).1;
        let home_cell = &t1.cells()[usize::from(home)];
        let expected = if home_cell.state == CellState::Active {
            Some(home)
        } else {
            home_cell.failover.iter().copied().find(|&f| t1.cells()[usize::from(f)].state == CellState::Active)
        };
        match (d1, expected) {
            (Ok(d), Some(e)) => {
                prop_assert_eq!(d.cell, e);
                prop_assert_eq!(t1.cells()[usize::from(d.cell)].state, CellState::Active);
                prop_assert_eq!(d.home, Some(home));
            }
            (Err(_), None) => {}
            (got, want) => prop_assert!(false, "got {:?}, want {:?}", got, want),
        }
    }
}

#[test]
fn invalid_tables_are_refused_with_a_path() {
    let h = HealthRegistry::new();
    let err = TableBuilder::new(1, 16)
        .region("r1")
        .cell(spec("c0", "r1", CellState::Active, &["zz"]))
        .build(&h)
        .unwrap_err();
    assert_eq!(err.to_string(), "cells[0].failover[0]: unknown cell \"zz\"");
    let err = TableBuilder::new(1, 16)
        .region("r1")
        .cell(spec("c0", "r1", CellState::Active, &[]))
        .slot_ranges("c0", vec![(0, 7), (9, 15)])
        .build(&h)
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("slots: 1 slot(s) have no cell, the first is 8"),
        "{err}"
    );
    let err = TableBuilder::new(1, 16)
        .region("r1")
        .cell(spec("c0", "r1", CellState::Active, &[]))
        .override_key("k", "nope")
        .build(&h)
        .unwrap_err();
    assert!(
        err.to_string().starts_with("overrides[0]: unknown cell"),
        "{err}"
    );
}

/// A cell failed over by health keeps its keys when none of its failover targets serves
/// any more (they were drained after it failed over), as long as it has an available
/// instance: a partial outage is not turned into a total one. A cell an operator took
/// out (configured failed over or drained) gets no such fallback.
#[test]
fn a_health_failed_over_cell_keeps_its_keys_when_no_target_serves() {
    use cellgate_health::CellSignals;
    let health = HealthRegistry::new();
    let policy = HealthPolicy::default();
    let t = skewed([CellState::Active; 4], &health);
    let key = (0..1000)
        .map(|i| format!("k{i}"))
        .find(|k| t.home_of(k).1 == 0)
        .unwrap();
    // 20 % errors over plenty of requests: c0 fails over by health (its targets serve).
    let c0 = &t.cells()[0].health;
    for i in 0..2_000u64 {
        c0.record(1_000 + i / 100, i % 5 == 0, &policy);
    }
    let signals = CellSignals {
        all_down: false,
        probes_healthy: true,
        target_available: true,
    };
    assert!(c0.evaluate(1_030, signals, &policy.failover).is_some());
    assert!(c0.is_failed_over());
    let input = RouteInput {
        key: Some(&key),
        now_ms: 1_031,
        ..Default::default()
    };

    // Its targets serve: the key goes to the first one.
    let t = skewed([CellState::Active; 4], &health);
    assert_eq!(t.cells()[0].state, CellState::FailedOver);
    let d = t.decide(&input).unwrap();
    assert_eq!(d.cell, 1);
    assert!(matches!(d.reason, Reason::Failover { .. }));

    // Every target drained since: c0 serves its own keys again, and says why.
    let drained = [
        CellState::Active,
        CellState::Draining,
        CellState::Draining,
        CellState::Draining,
    ];
    let t = skewed(drained, &health);
    let d = t.decide(&input).unwrap();
    assert_eq!(d.cell, 0);
    assert_eq!(
        d.reason,
        Reason::NoTargetLeft {
            via_override: false
        }
    );
    let why = t.reason_text(&d);
    assert!(why.contains("none of its failover targets serves"), "{why}");
    // Not when the request is leaving c0 (a retry that found no instance there).
    assert!(t
        .decide(&RouteInput {
            avoid: Some(0),
            ..input
        })
        .is_err());
    // Not for a cell an operator failed over.
    let t = skewed(
        [
            CellState::FailedOver,
            CellState::Draining,
            CellState::Draining,
            CellState::Draining,
        ],
        &HealthRegistry::new(),
    );
    assert!(t.decide(&input).is_err());
}

/// Below the panic threshold, health is ignored: the ejected instances share the cell's
/// load by their base weights with the survivor, instead of the survivor taking it all.
#[test]
fn below_the_panic_threshold_ejected_instances_share_the_load_by_base_weight() {
    use cellgate_routing::SmoothWrr;
    let mut policy = HealthPolicy::default();
    policy.outlier.panic_threshold = 0.5;
    policy.outlier.max_ejected_fraction = 1.0;
    let health = HealthRegistry::new();
    let build = |health: &HealthRegistry, policy: &HealthPolicy| {
        let mut c = spec("c0", "r1", CellState::Active, &[]);
        c.instances = (0..4).map(|i| inst(&format!("c0-{i}"), 2000 + i)).collect();
        TableBuilder::new(1, 16384)
            .region("r1")
            .health(policy.clone())
            .cell(c)
            .build(health)
            .unwrap()
    };
    let t = build(&health, &policy);
    // Eject three of the four.
    for (n, inst) in t.cells()[0].instances.iter().take(3).enumerate() {
        for _ in 0..policy.outlier.consecutive_failures {
            inst.health.record(10, Outcome::Timeout, &policy, n, 4);
        }
        assert!(inst.health.is_ejected(11), "instance {n} ejected");
    }
    let count = |t: &RoutingTable| {
        let mut wrr = SmoothWrr::default();
        let mut n = [0u32; 4];
        for _ in 0..4_000 {
            n[t.pick_instance(0, None, &mut wrr, 11, 0, None).unwrap()] += 1;
        }
        n
    };
    // The weights published after the ejections (what the controller swaps in).
    let t = build(&health, &policy);
    assert_eq!(count(&t), [1_000; 4], "equal base weights, equal shares");

    // Without the panic threshold the survivor takes everything.
    policy.outlier.panic_threshold = 0.0;
    let t = build(&health, &policy);
    assert_eq!(count(&t), [0, 0, 0, 4_000]);
}

/// Key affinity: a key's instance depends on the instances' names, not their addresses
/// (every gateway of a fleet picks the same, whatever its resolver says); in a cell of more
/// than 64 instances, a key whose instances are all unavailable but one still finds that
/// one.
#[test]
fn key_affinity_is_by_name_and_walks_past_64_instances() {
    let health = HealthRegistry::new();
    let ring_cell = |n: u16, port_base: u16| CellSpec {
        balance: cellgate_routing::Balance::KeyAffinity,
        instances: (0..n)
            .map(|i| inst(&format!("i-{i}"), port_base + i))
            .collect(),
        ..spec("c0", "r1", CellState::Active, &[])
    };
    let table = |n: u16, port_base: u16| {
        TableBuilder::new(1, 16384)
            .region("r1")
            .cell(ring_cell(n, port_base))
            .build(&health)
            .unwrap()
    };
    let (a, b) = (table(5, 2000), table(5, 3000));
    let mut wrr = cellgate_routing::SmoothWrr::default();
    let mut spread = std::collections::BTreeSet::new();
    for k in 0..200 {
        let key = format!("user-{k}");
        let pa = a.pick_instance(0, None, &mut wrr, 1, 0, Some(key.as_bytes()));
        let pb = b.pick_instance(0, None, &mut wrr, 1, 0, Some(key.as_bytes()));
        assert_eq!(pa, pb, "key {key}: the ring follows names, not addresses");
        // And the same again: no round-robin state is involved.
        assert_eq!(
            pa,
            a.pick_instance(0, None, &mut wrr, 1, 0, Some(key.as_bytes()))
        );
        spread.insert(pa.unwrap());
    }
    assert_eq!(spread.len(), 5, "keys spread over every instance");
    // 100 instances, only the last one tagged `x`: a tagged request's walk reaches it
    // (past every other instance's 160 points), for every key.
    let mut big = ring_cell(100, 4000);
    big.instances[99]
        .labels
        .insert("gray".to_owned(), "x".to_owned());
    let big = TableBuilder::new(1, 16384)
        .region("r1")
        .cell(big)
        .build(&health)
        .unwrap();
    for k in 0..50 {
        let key = format!("user-{k}");
        let p = big.pick_instance(0, Some("x"), &mut wrr, 1, 0, Some(key.as_bytes()));
        assert_eq!(p, Some(99), "key {key}");
    }
}
