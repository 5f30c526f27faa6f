//! The demo configuration validates, and its users live where the committed vectors say.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cellgate_config::{Config, ConfigError, DEMO_YAML};
use cellgate_health::HealthRegistry;

#[test]
fn demo_users_land_in_the_committed_home_cells() {
    let cfg = Config::from_yaml(DEMO_YAML).unwrap();
    let t = cfg.build_table(1, &HealthRegistry::new()).unwrap();
    let mut n = 0;
    for line in include_str!("demo_cells.tsv")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let f: Vec<&str> = line.split('\t').collect();
        let e = t.explain(f[0], 1).unwrap();
        assert_eq!(e.slot.to_string(), f[1], "slot of {:?}", f[0]);
        assert_eq!(e.home_cell, f[2], "home cell of {:?}", f[0]);
        n += 1;
    }
    assert!(n >= 50);
    let alice = t.explain("alice", 1).unwrap();
    assert_eq!(
        (alice.slot, alice.home_cell.as_str(), alice.cell.as_str()),
        (5808, "bj-2", "bj-2")
    );
}

#[test]
fn demo_gray_rule_tags_about_ten_percent_of_keys_stably() {
    let cfg = Config::from_yaml(DEMO_YAML).unwrap();
    let t = cfg.build_table(1, &HealthRegistry::new()).unwrap();
    let tagged = (0..20_000)
        .filter(|i| t.explain(&format!("u{i}"), 1).unwrap().gray_tag.is_some())
        .count();
    assert!(
        (1_800..=2_200).contains(&tagged),
        "{tagged} of 20000 tagged"
    );
    let again = (0..20_000)
        .filter(|i| t.explain(&format!("u{i}"), 1).unwrap().gray_tag.is_some())
        .count();
    assert_eq!(tagged, again);
}

fn issues(yaml: &str) -> Vec<String> {
    match Config::from_yaml(yaml) {
        Err(ConfigError::Invalid(v)) => v.iter().map(ToString::to_string).collect(),
        Err(e) => vec![e.to_string()],
        Ok(_) => vec![],
    }
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let bad = r#"
regions: [bj, bj]
timeouts: { default: 2m, max: 1m, connect: soon }
routing:
  key_sources: [ { header: "bad header" } ]
  trusted_cidrs: [ "not-a-cidr" ]
cells:
  - id: bj-1
    region: xx
    failover: [bj-1, nope]
    instances:
      - { name: a, addr: "127.0.0.1" }
      - { name: a, addr: "127.0.0.1:0" }
  - id: bj-1
    region: bj
    instances: []
slots:
  - { cell: bj-1, ranges: ["0-100", "50-60", "x"] }
overrides: { vip: ghost }
gray:
  - { name: g, tag: canary, percent: 120, regions: [mars] }
"#;
    let got = issues(bad);
    for want in [
        "regions[1]: duplicate region \"bj\"",
        "timeouts.connect:",
        "timeouts.default: 2m is longer than timeouts.max 1m",
        "routing.key_sources[0]:",
        "routing.trusted_cidrs[0]:",
        "cells[0].region: unknown region \"xx\"",
        "cells[0].failover[0]: a cell cannot fail over to itself",
        "cells[0].failover[1]: unknown cell \"nope\"",
        "cells[0].instances[0].addr:",
        "cells[0].instances[1].name: duplicate instance name",
        "cells[0].instances[1].addr:",
        "cells[1].id: duplicate cell id",
        "cells[1].instances: a cell needs at least one instance",
        "slots[0].ranges[1]: \"50-60\" overlaps another range",
        "slots[0].ranges[2]:",
        "slots: 16283 of 16384 slots have no cell (first: 101)",
        "overrides[\"vip\"]: unknown cell \"ghost\"",
        "gray[0].regions[0]: unknown region \"mars\"",
        "gray[0].percent: 120 is outside 0-100",
    ] {
        assert!(
            got.iter().any(|g| g.starts_with(want)),
            "missing {want:?} in {got:#?}"
        );
    }
}

#[test]
fn typos_and_wrong_types_are_parse_errors_with_a_location() {
    let e = issues("regions: [a]\ncells:\n  - id: c\n    region: a\n    instancez: []\n");
    assert!(
        e[0].contains("unknown field `instancez`") && e[0].contains("line"),
        "{e:?}"
    );
    let e = issues(
        "regions: [a]\ncells:\n  - id: c\n    region: a\n    weight: heavy\n    instances: []\n",
    );
    assert!(
        e[0].contains("weight") || e[0].contains("invalid type"),
        "{e:?}"
    );
}
