//! Admin mutations of the desired configuration, and what they would change.
//!
//! What this module is for: turning an operator's intent (drain, switch, restore, weight,
//! slot move, rebalance) into a new, validated [`Config`] — the *desired* configuration
//! every routing table is built from — and measuring a change ([`impact`]) as the slots
//! whose home cell moves and the share of the key space whose serving cell changes. It is
//! pure: the gateway decides where the result is stored (the local admin overlay or etcd)
//! and when tables are swapped.
//!
//! What it must never do: touch the network, the disk or a live table, or move a slot that
//! the operation does not need to move. Adding a cell moves nothing; slot moves and
//! rebalances move the minimum number of slots and say how many.
//!
//! A **switch** of cell `a` to cell `b` sets `a` to `draining` and records
//! `switched_to: b`; the table then tries `b` first when walking `a`'s failover targets
//! (see [`crate::CellCfg::effective_failover`]), and `/admin/route` says so. `restore`
//! returns the cell to `active` and clears the switch.

use std::collections::BTreeSet;

use cellgate_routing::{CellIdx, CellState, RouteInput, RoutingTable};
use serde::{Deserialize, Serialize};

use crate::model::{CellCfg, Config, SlotAssign};
use crate::validate::parse_range;

/// Why a mutation cannot be applied.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum MutateError {
    /// A cell named by the request does not exist.
    #[error("unknown cell {cell:?} ({field})")]
    UnknownCell {
        /// Which part of the request named it (`path`, `to`, `from`).
        field: &'static str,
        /// The name.
        cell: String,
    },
    /// The request cannot be carried out as asked.
    #[error("{0}")]
    Invalid(String),
    /// The resulting configuration would be invalid.
    #[error("the result would be invalid: {0}")]
    Rejected(String),
}

/// One operator intent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Mutation {
    /// Stop new traffic to `cell`: state `draining`; its keys go to its failover targets.
    Drain {
        /// The cell.
        cell: String,
    },
    /// Send `cell`'s traffic to `to`: state `draining`, `to` first among its targets.
    Switch {
        /// The cell.
        cell: String,
        /// Where its traffic goes.
        to: String,
    },
    /// Return `cell` to `active` and clear any switch.
    Restore {
        /// The cell.
        cell: String,
    },
    /// Set `cell`'s base weight.
    Weight {
        /// The cell.
        cell: String,
        /// The new base weight (0-1000000).
        weight: u32,
    },
    /// Move `count` slots from `from` to `to` (the highest-numbered slots of `from`).
    #[serde(rename = "slots_move")]
    MoveSlots {
        /// Source cell.
        from: String,
        /// Destination cell.
        to: String,
        /// How many slots.
        count: u32,
    },
    /// Move the listed slots to `to`.
    #[serde(rename = "slots_move_list")]
    MoveSlotList {
        /// The slots.
        slots: Vec<u32>,
        /// Destination cell.
        to: String,
    },
    /// Move the fewest slots that make every cell's share proportional to its weight.
    Rebalance,
}

impl Mutation {
    /// The action's name in the audit log.
    pub fn action(&self) -> &'static str {
        match self {
            Self::Drain { .. } => "drain",
            Self::Switch { .. } => "switch",
            Self::Restore { .. } => "restore",
            Self::Weight { .. } => "weight",
            Self::MoveSlots { .. } | Self::MoveSlotList { .. } => "slots_move",
            Self::Rebalance => "rebalance",
        }
    }

    /// The cell the action is about, if one.
    pub fn cell(&self) -> Option<&str> {
        match self {
            Self::Drain { cell }
            | Self::Switch { cell, .. }
            | Self::Restore { cell }
            | Self::Weight { cell, .. } => Some(cell),
            Self::MoveSlots { to, .. } | Self::MoveSlotList { to, .. } => Some(to),
            Self::Rebalance => None,
        }
    }

    /// The configuration after this mutation, validated. `cfg` is not changed.
    pub fn apply(&self, cfg: &Config) -> Result<Config, MutateError> {
        let mut out = cfg.clone();
        let idx = |field: &'static str, id: &str| {
            cfg.cells
                .iter()
                .position(|c| c.id == id)
                .ok_or_else(|| MutateError::UnknownCell {
                    field,
                    cell: id.to_owned(),
                })
        };
        match self {
            Self::Drain { cell } => {
                let i = idx("path", cell)?;
                out.cells[i].state = CellState::Draining;
            }
            Self::Switch { cell, to } => {
                let i = idx("path", cell)?;
                idx("to", to)?;
                if cell == to {
                    return Err(MutateError::Invalid(format!(
                        "to: cannot switch cell {cell:?} to itself"
                    )));
                }
                out.cells[i].state = CellState::Draining;
                out.cells[i].switched_to = Some(to.clone());
            }
            Self::Restore { cell } => {
                let i = idx("path", cell)?;
                out.cells[i].state = CellState::Active;
                out.cells[i].switched_to = None;
            }
            Self::Weight { cell, weight } => {
                let i = idx("path", cell)?;
                if *weight > 1_000_000 {
                    return Err(MutateError::Invalid(format!(
                        "weight: {weight} is more than 1000000"
                    )));
                }
                out.cells[i].weight = *weight;
            }
            Self::MoveSlots { from, to, count } => {
                let f = idx("from", from)?;
                let t = idx("to", to)?;
                if f == t {
                    return Err(MutateError::Invalid(
                        "from and to name the same cell".into(),
                    ));
                }
                if *count == 0 {
                    return Err(MutateError::Invalid("count: must be at least 1".into()));
                }
                let mut owners = slot_owners(cfg)?;
                let owned: Vec<usize> = (0..owners.len()).filter(|&s| owners[s] == f).collect();
                if owned.len() < *count as usize {
                    return Err(MutateError::Invalid(format!(
                        "count: {from} owns {} slots, fewer than {count}",
                        owned.len()
                    )));
                }
                for &s in owned.iter().rev().take(*count as usize) {
                    owners[s] = t;
                }
                out.slots = slot_assignments(&cfg.cells, &owners);
            }
            Self::MoveSlotList { slots, to } => {
                let t = idx("to", to)?;
                if slots.is_empty() {
                    return Err(MutateError::Invalid("slots: the list is empty".into()));
                }
                let mut owners = slot_owners(cfg)?;
                for (k, &s) in slots.iter().enumerate() {
                    let Some(o) = owners.get_mut(s as usize) else {
                        return Err(MutateError::Invalid(format!(
                            "slots[{k}]: slot {s} is outside 0-{}",
                            cfg.routing.slot_count.saturating_sub(1)
                        )));
                    };
                    *o = t;
                }
                out.slots = slot_assignments(&cfg.cells, &owners);
            }
            Self::Rebalance => {
                let mut owners = slot_owners(cfg)?;
                rebalance(&cfg.cells, &mut owners)?;
                out.slots = slot_assignments(&cfg.cells, &owners);
            }
        }
        out.validate()
            .map_err(|e| MutateError::Rejected(e.to_string()))?;
        Ok(out)
    }
}

/// The home cell (index into `cfg.cells`) of every slot, exactly as the table builder
/// assigns them (explicit ranges, or the bootstrap split when none are written down).
pub fn slot_owners(cfg: &Config) -> Result<Vec<usize>, MutateError> {
    let n = cfg.routing.slot_count as usize;
    if cfg.cells.is_empty() {
        return Err(MutateError::Invalid("there are no cells".into()));
    }
    if cfg.slots.is_empty() {
        let cells = cfg.cells.len() as u64;
        return Ok((0..n)
            .map(|s| ((s as u64 * cells) / n as u64) as usize)
            .collect());
    }
    const UNSET: usize = usize::MAX;
    let mut owners = vec![UNSET; n];
    for a in &cfg.slots {
        let Some(ci) = cfg.cells.iter().position(|c| c.id == a.cell) else {
            return Err(MutateError::Invalid(format!(
                "slots: unknown cell {:?}",
                a.cell
            )));
        };
        for r in &a.ranges {
            let (lo, hi) = parse_range(r)
                .filter(|&(lo, hi)| lo <= hi && (hi as usize) < n)
                .ok_or_else(|| MutateError::Invalid(format!("slots: bad range {r:?}")))?;
            for o in &mut owners[lo as usize..=hi as usize] {
                *o = ci;
            }
        }
    }
    if let Some(hole) = owners.iter().position(|&o| o == UNSET) {
        return Err(MutateError::Invalid(format!(
            "slots: slot {hole} has no cell"
        )));
    }
    Ok(owners)
}

/// The slot table written down as ranges per cell, in cell order (cells owning no slot are
/// left out).
pub fn slot_assignments(cells: &[CellCfg], owners: &[usize]) -> Vec<SlotAssign> {
    let mut ranges: Vec<Vec<String>> = vec![Vec::new(); cells.len()];
    let mut s = 0;
    while s < owners.len() {
        let o = owners[s];
        let mut e = s;
        while e + 1 < owners.len() && owners[e + 1] == o {
            e += 1;
        }
        if let Some(r) = ranges.get_mut(o) {
            r.push(if s == e {
                s.to_string()
            } else {
                format!("{s}-{e}")
            });
        }
        s = e + 1;
    }
    cells
        .iter()
        .zip(ranges)
        .filter(|(_, r)| !r.is_empty())
        .map(|(c, ranges)| SlotAssign {
            cell: c.id.clone(),
            ranges,
        })
        .collect()
}

/// Each cell's capacity-proportional slot count: its share of the total weight of the cells
/// that are not `disabled`, rounded so the counts add up to the slot count; where rounding
/// has a choice, a cell that already holds more keeps the extra slot (fewer moves).
pub fn rebalance_targets(cells: &[CellCfg], current: &[u64], slot_count: u64) -> Vec<u64> {
    let weight = |c: &CellCfg| {
        if c.state == CellState::Disabled {
            0
        } else {
            u64::from(c.weight)
        }
    };
    let total: u64 = cells.iter().map(weight).sum();
    if total == 0 {
        return current.to_vec();
    }
    let mut targets: Vec<u64> = cells
        .iter()
        .map(|c| slot_count * weight(c) / total)
        .collect();
    let mut left = slot_count - targets.iter().sum::<u64>();
    let mut order: Vec<usize> = (0..cells.len())
        .filter(|&i| !(slot_count * weight(&cells[i])).is_multiple_of(total))
        .collect();
    order.sort_by_key(|&i| {
        let frac = (slot_count * weight(&cells[i])) % total;
        (
            std::cmp::Reverse(current[i] > targets[i]),
            std::cmp::Reverse(frac),
            i,
        )
    });
    for i in order {
        if left == 0 {
            break;
        }
        targets[i] += 1;
        left -= 1;
    }
    targets
}

/// Move the fewest slots so every cell holds its [`rebalance_targets`] count. Cells above
/// their target give up their highest-numbered slots; cells below take them in cell order.
/// Returns how many slots moved.
pub fn rebalance(cells: &[CellCfg], owners: &mut [usize]) -> Result<u64, MutateError> {
    let mut current = vec![0u64; cells.len()];
    for &o in owners.iter() {
        if let Some(c) = current.get_mut(o) {
            *c += 1;
        }
    }
    if cells
        .iter()
        .all(|c| c.state == CellState::Disabled || c.weight == 0)
    {
        return Err(MutateError::Invalid(
            "every cell has weight 0 or is disabled; nothing to balance on".into(),
        ));
    }
    let targets = rebalance_targets(cells, &current, owners.len() as u64);
    let mut freed: Vec<usize> = Vec::new();
    for (ci, (&cur, &tgt)) in current.iter().zip(&targets).enumerate() {
        if cur > tgt {
            let mut give = cur - tgt;
            for s in (0..owners.len()).rev() {
                if give == 0 {
                    break;
                }
                if owners[s] == ci {
                    freed.push(s);
                    give -= 1;
                }
            }
        }
    }
    freed.sort_unstable();
    let moved = freed.len() as u64;
    let mut it = freed.into_iter();
    for (ci, (&cur, &tgt)) in current.iter().zip(&targets).enumerate() {
        for _ in cur..tgt {
            if let Some(s) = it.next() {
                owners[s] = ci;
            }
        }
    }
    Ok(moved)
}

/// What a change does to traffic, slot by slot (keys are assumed spread evenly over slots).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Impact {
    /// Slots in the table.
    pub slot_count: u32,
    /// Slots whose home cell changes.
    pub slots_moved: u32,
    /// Slots whose serving cell changes (home moves, drains, switches, restores).
    pub slots_rerouted: u32,
    /// `slots_rerouted / slot_count`: the share of keyed traffic that would move.
    pub share_moved: f64,
    /// Cells that gain or lose traffic or slots, or whose settings change.
    pub cells_affected: Vec<String>,
    /// Where rerouted slots go: `(from, to, slots)`; `None` means no serving cell.
    pub moves: Vec<Flow>,
}

/// Slots rerouted from one serving cell to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flow {
    /// Serving cell before (`null`: none).
    pub from: Option<String>,
    /// Serving cell after (`null`: none).
    pub to: Option<String>,
    /// How many slots.
    pub slots: u32,
}

/// The serving cell for keys whose home is `home`, at `now_ms`, as the table decides it.
fn serving_from(t: &RoutingTable, home: CellIdx, now_ms: u64) -> Option<CellIdx> {
    t.decide(&RouteInput {
        forced_cell: Some(home),
        now_ms,
        ..RouteInput::default()
    })
    .ok()
    .map(|d| d.cell)
}

/// Compare two tables slot by slot. Cells are matched by id, so tables with different cell
/// sets compare correctly.
pub fn impact(before: &RoutingTable, after: &RoutingTable, now_ms: u64) -> Impact {
    let id =
        |t: &RoutingTable, c: Option<CellIdx>| c.and_then(|c| t.cell(c)).map(|c| c.id.to_string());
    let serve_b: Vec<Option<String>> = (0..before.cells().len())
        .map(|c| id(before, serving_from(before, c as CellIdx, now_ms)))
        .collect();
    let serve_a: Vec<Option<String>> = (0..after.cells().len())
        .map(|c| id(after, serving_from(after, c as CellIdx, now_ms)))
        .collect();
    let mut moved = 0u32;
    let mut rerouted = 0u32;
    let mut affected = BTreeSet::new();
    let mut flows: std::collections::BTreeMap<(Option<String>, Option<String>), u32> =
        Default::default();
    let n = before.slots().len().min(after.slots().len());
    for s in 0..n {
        let hb = before.slots()[s];
        let ha = after.slots()[s];
        let hb_id = id(before, Some(hb));
        let ha_id = id(after, Some(ha));
        if hb_id != ha_id {
            moved += 1;
            affected.extend(hb_id.clone());
            affected.extend(ha_id.clone());
        }
        let sb = &serve_b[usize::from(hb)];
        let sa = &serve_a[usize::from(ha)];
        if sb != sa {
            rerouted += 1;
            affected.extend(sb.clone());
            affected.extend(sa.clone());
            *flows.entry((sb.clone(), sa.clone())).or_default() += 1;
        }
    }
    // Settings changes that move no slot (weights, switches of an idle cell) still affect
    // the cell.
    for c in after.cells() {
        match before.cell_idx(&c.id).and_then(|i| before.cell(i)) {
            Some(b)
                if b.state == c.state
                    && b.weight == c.weight
                    && b.failover.len() == c.failover.len() =>
            {
                let same = b
                    .failover
                    .iter()
                    .zip(&c.failover)
                    .all(|(x, y)| id(before, Some(*x)) == id(after, Some(*y)));
                if !same {
                    affected.insert(c.id.to_string());
                }
            }
            _ => {
                affected.insert(c.id.to_string());
            }
        }
    }
    let slot_count = after.slot_count();
    Impact {
        slot_count,
        slots_moved: moved,
        slots_rerouted: rerouted,
        share_moved: if slot_count == 0 {
            0.0
        } else {
            f64::from(rerouted) / f64::from(slot_count)
        },
        cells_affected: affected.into_iter().collect(),
        moves: flows
            .into_iter()
            .map(|((from, to), slots)| Flow { from, to, slots })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use cellgate_health::HealthRegistry;

    fn cfg(cells: &[(&str, u32)], slots: &str) -> Config {
        let mut y = String::from("regions: [r]\ncells:\n");
        for (i, (id, w)) in cells.iter().enumerate() {
            y.push_str(&format!(
                "  - {{ id: {id}, region: r, weight: {w}, instances: [{{ name: i, addr: \"127.0.0.1:{}\" }}] }}\n",
                10000 + i
            ));
        }
        y.push_str(slots);
        Config::from_yaml(&y).unwrap()
    }

    fn counts(c: &Config) -> Vec<u64> {
        let o = slot_owners(c).unwrap();
        let mut v = vec![0; c.cells.len()];
        for x in o {
            v[x] += 1;
        }
        v
    }

    #[test]
    fn owners_match_the_table_builder_for_bootstrap_and_explicit_slots() {
        for c in [
            cfg(&[("a", 100), ("b", 100), ("c", 100)], ""),
            cfg(
                &[("a", 100), ("b", 100)],
                "slots:\n  - { cell: b, ranges: [\"0-99\", \"16000-16383\"] }\n  - { cell: a, ranges: [\"100-15999\"] }\n",
            ),
        ] {
            let t = c.build_table(1, &HealthRegistry::new()).unwrap();
            let o = slot_owners(&c).unwrap();
            assert_eq!(o.len(), t.slots().len());
            for (s, &ci) in o.iter().enumerate() {
                assert_eq!(
                    &*t.cell(t.slots()[s]).unwrap().id,
                    c.cells[ci].id.as_str(),
                    "slot {s}"
                );
            }
            // Written down and read back, the table is the same.
            let mut c2 = c.clone();
            c2.slots = slot_assignments(&c.cells, &o);
            assert_eq!(slot_owners(&c2).unwrap(), o);
        }
    }

    #[test]
    fn adding_a_fourth_cell_then_rebalancing_moves_a_quarter_and_levels_every_cell() {
        let three = cfg(&[("a", 100), ("b", 100), ("c", 100)], "");
        let mut written = three.clone();
        written.slots = slot_assignments(&three.cells, &slot_owners(&three).unwrap());
        // Add d: with the slot table written down, adding a cell moves nothing.
        let mut four = cfg(&[("a", 100), ("b", 100), ("c", 100), ("d", 100)], "");
        four.slots = written.slots.clone();
        four.validate().unwrap();
        assert_eq!(counts(&four), vec![5462, 5461, 5461, 0]);
        let after = Mutation::Rebalance.apply(&four).unwrap();
        let before_o = slot_owners(&four).unwrap();
        let after_o = slot_owners(&after).unwrap();
        let moved = before_o
            .iter()
            .zip(&after_o)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(moved, 4096);
        assert!(moved <= 16384usize.div_ceil(4));
        for n in counts(&after) {
            assert!((4095..=4097).contains(&n), "{n}");
        }
        // Every moved slot went to d; nothing moved between a, b and c.
        for (b, a) in before_o.iter().zip(&after_o) {
            if a != b {
                assert_eq!(*a, 3);
            }
        }
        // A second rebalance moves nothing.
        let again = Mutation::Rebalance.apply(&after).unwrap();
        assert_eq!(slot_owners(&again).unwrap(), after_o);
    }

    #[test]
    fn rebalance_is_weight_proportional_and_skips_disabled_cells() {
        let mut c = cfg(&[("a", 300), ("b", 100), ("c", 100)], "");
        c.cells[2].state = CellState::Disabled;
        let after = Mutation::Rebalance.apply(&c).unwrap();
        assert_eq!(counts(&after), vec![12288, 4096, 0]);
    }

    #[test]
    fn slot_moves_move_exactly_what_was_asked() {
        let c = cfg(&[("a", 100), ("b", 100)], "");
        let m = Mutation::MoveSlots {
            from: "a".into(),
            to: "b".into(),
            count: 10,
        };
        let after = m.apply(&c).unwrap();
        assert_eq!(counts(&after), vec![8182, 8202]);
        let after = Mutation::MoveSlotList {
            slots: vec![0, 1, 16383],
            to: "b".into(),
        }
        .apply(&c)
        .unwrap();
        assert_eq!(counts(&after), vec![8190, 8194]);
        assert!(matches!(
            Mutation::MoveSlots {
                from: "a".into(),
                to: "b".into(),
                count: 9000
            }
            .apply(&c),
            Err(MutateError::Invalid(m)) if m.contains("owns 8192 slots")
        ));
        assert!(matches!(
            Mutation::MoveSlotList { slots: vec![20000], to: "b".into() }.apply(&c),
            Err(MutateError::Invalid(m)) if m.contains("slot 20000")
        ));
        assert!(matches!(
            Mutation::Drain { cell: "zz".into() }.apply(&c),
            Err(MutateError::UnknownCell { field: "path", .. })
        ));
    }

    #[test]
    fn switch_puts_the_target_first_and_restore_undoes_it() {
        let mut c = cfg(&[("a", 100), ("b", 100), ("c", 100)], "");
        c.cells[0].failover = vec!["b".into(), "c".into()];
        let sw = Mutation::Switch {
            cell: "a".into(),
            to: "c".into(),
        }
        .apply(&c)
        .unwrap();
        assert_eq!(sw.cells[0].state, CellState::Draining);
        assert_eq!(sw.cells[0].effective_failover(), vec!["c", "b"]);
        let h = HealthRegistry::new();
        let before = c.build_table(1, &h).unwrap();
        let after = sw.build_table(2, &h).unwrap();
        let imp = impact(&before, &after, 1);
        assert_eq!(imp.slots_moved, 0);
        assert_eq!(imp.slots_rerouted, 5462);
        assert_eq!(
            imp.moves,
            vec![Flow {
                from: Some("a".into()),
                to: Some("c".into()),
                slots: 5462
            }]
        );
        let back = Mutation::Restore { cell: "a".into() }.apply(&sw).unwrap();
        assert_eq!(back.cells[0], c.cells[0]);
    }
}
