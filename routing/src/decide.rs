//! The per-request decision: key → (override | slot) → home cell → failover walk, or the
//! keyless policy; then the instance inside the chosen cell. Reads one table snapshot,
//! takes no lock and allocates nothing. [`RoutingTable::explain`] gives the same decision
//! as a record an operator can read.

use std::net::IpAddr;

use http::HeaderMap;
use serde::Serialize;

use crate::error::{DecideError, KeyError};
use crate::gray::GrayRule;
use crate::slot::slot_of;
use crate::table::{AnonymousPolicy, CellIdx, CellState, RoutingTable};
use crate::wrr::SmoothWrr;
use xxhash_rust::xxh3::xxh3_64;

/// What a decision needs to know about a request.
#[derive(Clone, Copy, Debug, Default)]
pub struct RouteInput<'a> {
    /// The routing key, already extracted and validated.
    pub key: Option<&'a str>,
    /// `X-Region-Hint`, for keyless requests.
    pub region_hint: Option<&'a str>,
    /// The client's address, for the CIDR → region map.
    pub client_ip: Option<IpAddr>,
    /// A cell forced by a trusted client's `X-Cell-ID` (the caller checks trust).
    pub forced_cell: Option<CellIdx>,
    /// Now, in [`cellgate_health::now_ms`] milliseconds.
    pub now_ms: u64,
    /// A random number spreading keyless requests over cells by weight.
    pub spread: u64,
    /// A cell to pass over (a retry leaving a cell whose instances all failed to connect).
    pub avoid: Option<CellIdx>,
}

/// Why a cell was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The key is pinned by an override and its cell serves.
    Override,
    /// The key's slot maps to this cell and it serves.
    Slot,
    /// A trusted client forced this cell with `X-Cell-ID`.
    Forced,
    /// The home cell does not serve; this is its first serving failover target.
    Failover {
        /// The home cell.
        from: CellIdx,
        /// How the key reached the home cell.
        via_override: bool,
    },
    /// The home cell was failed over by health, but none of its failover targets serves
    /// now; it keeps its keys while it still has an available instance (a partial outage
    /// is better than a total one).
    NoTargetLeft {
        /// How the key reached the home cell.
        via_override: bool,
    },
    /// The request has no key; the best serving cell of this region was chosen.
    Anonymous {
        /// The region the request was placed in, if any.
        region: Option<u16>,
    },
}

/// A routing decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The cell that serves the request.
    pub cell: CellIdx,
    /// The key's home cell (override or slot), if the request has a key.
    pub home: Option<CellIdx>,
    /// The key's slot, if the request has a key.
    pub slot: Option<u32>,
    /// Why.
    pub reason: Reason,
}

/// A decision explained for an operator (`GET /admin/route`, `cellgate route`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Explain {
    /// The key.
    pub key: String,
    /// Its slot.
    pub slot: u32,
    /// Its home cell.
    pub home_cell: String,
    /// State of the home cell.
    pub home_state: &'static str,
    /// The cell that would serve it now.
    pub cell: String,
    /// Why, in words.
    pub reason: String,
    /// The gray tag the request would carry (key-based rules only).
    pub gray_tag: Option<String>,
    /// Table version.
    pub table_version: u64,
}

impl RoutingTable {
    /// The key's slot, home cell, and whether an override pinned it.
    #[inline]
    pub fn home_of(&self, key: &str) -> (u32, CellIdx, bool) {
        let hash = xxh3_64(key.as_bytes());
        let slot = (hash % u64::from(self.slot_count)) as u32;
        if !self.overrides.is_empty() {
            if let Some(c) = self.overrides.get(hash, key) {
                return (slot, c, true);
            }
        }
        (slot, self.slots[slot as usize], false)
    }

    #[inline(always)]
    fn serves(&self, c: CellIdx, now: u64, avoid: Option<CellIdx>) -> bool {
        avoid != Some(c) && self.cells[usize::from(c)].is_serving(now, &self.health)
    }

    /// Decide the serving cell of a request.
    pub fn decide(&self, input: &RouteInput<'_>) -> Result<Decision, DecideError> {
        let now = input.now_ms;
        let (home, slot, via_override, forced) = if let Some(forced) = input.forced_cell {
            (
                forced,
                input.key.map(|k| slot_of(k.as_bytes(), self.slot_count)),
                false,
                true,
            )
        } else if let Some(key) = input.key {
            let (slot, home, via) = self.home_of(key);
            (home, Some(slot), via, false)
        } else {
            return self.decide_keyless(input);
        };
        let cell = &self.cells[usize::from(home)];
        if self.serves(home, now, input.avoid) {
            let reason = if forced {
                Reason::Forced
            } else if via_override {
                Reason::Override
            } else {
                Reason::Slot
            };
            return Ok(Decision {
                cell: home,
                home: Some(home),
                slot,
                reason,
            });
        }
        for &target in &cell.failover {
            if self.serves(target, now, input.avoid) {
                return Ok(Decision {
                    cell: target,
                    home: Some(home),
                    slot,
                    reason: Reason::Failover {
                        from: home,
                        via_override,
                    },
                });
            }
        }
        // Failed over by health (not by an operator), and every target stopped serving
        // since: the home cell serves its own keys again if it can at all.
        if cell.state == CellState::FailedOver
            && cell.configured_state == CellState::Active
            && input.avoid != Some(home)
            && cell.can_serve(now, &self.health)
        {
            return Ok(Decision {
                cell: home,
                home: Some(home),
                slot,
                reason: Reason::NoTargetLeft { via_override },
            });
        }
        Err(DecideError::NoServingCell {
            home: cell.id.to_string(),
            state: if cell.state == CellState::Active {
                "without a healthy instance"
            } else {
                cell.state.as_str()
            },
        })
    }

    fn decide_keyless(&self, input: &RouteInput<'_>) -> Result<Decision, DecideError> {
        let AnonymousPolicy::Region { default_region } = self.anonymous else {
            return Err(DecideError::MissingKey);
        };
        let region = input
            .region_hint
            .and_then(|h| self.region_idx(h.trim()))
            .or_else(|| input.client_ip.and_then(|ip| self.region_of_ip(ip)))
            .or(default_region);
        let now = input.now_ms;
        let pick = |in_region: &dyn Fn(u16) -> bool| -> Option<CellIdx> {
            // By the dynamic weights (§3), as keyed traffic's failover walk.
            let eligible = |i: usize, c: &crate::table::Cell| {
                in_region(c.region_idx)
                    && c.weight > 0
                    && self.serves(i as CellIdx, now, input.avoid)
            };
            let total: u64 = self
                .cells
                .iter()
                .enumerate()
                .filter(|(i, c)| eligible(*i, c))
                .map(|(_, c)| c.dyn_weight)
                .sum();
            if total == 0 {
                return None;
            }
            let mut point = input.spread % total;
            for (i, c) in self.cells.iter().enumerate() {
                if eligible(i, c) {
                    let w = c.dyn_weight;
                    if point < w {
                        return Some(i as CellIdx);
                    }
                    point -= w;
                }
            }
            None
        };
        let chosen = match region {
            Some(r) => pick(&|cr| cr == r).or_else(|| pick(&|cr| cr != r)),
            None => pick(&|_| true),
        };
        chosen
            .map(|cell| Decision {
                cell,
                home: None,
                slot: None,
                reason: Reason::Anonymous { region },
            })
            .ok_or(DecideError::NoCellAnywhere)
    }

    /// The first enabled gray rule that tags this request, if any.
    #[inline]
    pub fn gray_rule(
        &self,
        key: Option<&str>,
        cell: CellIdx,
        headers: &HeaderMap,
    ) -> Option<&GrayRule> {
        if self.gray.is_empty() {
            return None;
        }
        let region = self.cells.get(usize::from(cell))?.region_idx;
        self.gray.iter().find(|r| r.matches(key, region, headers))
    }

    /// Pick an instance of `cell` by smooth WRR over the effective weights published in this
    /// table (or, for a cell in key-affinity mode and a request with a `key`, the first
    /// eligible instance on the cell's consistent-hash ring from the key's point), among
    /// the available instances whose gray label equals `tag` (or that have none, for an
    /// untagged request), falling back to the other available instances when none matches.
    /// Instances whose bit is set in `tried` (bit i = instance i) are skipped. When fewer
    /// than the panic threshold of the instances are available, passive health (ejection,
    /// breaker) is ignored for probe-up instances rather than concentrating all load on the
    /// survivors.
    #[inline]
    pub fn pick_instance(
        &self,
        cell: CellIdx,
        tag: Option<&str>,
        wrr: &mut SmoothWrr,
        now: u64,
        tried: u64,
        key: Option<&[u8]>,
    ) -> Option<usize> {
        let c = self.cells.get(usize::from(cell))?;
        let insts = &c.instances;
        let p = &*self.health;
        let usable = |i: usize| i >= 64 || tried & (1u64 << i) == 0;
        // Availability of each instance, read once (bit i = instance i; instances past the
        // 64th are asked again when weighed).
        let mut available = 0u64;
        let mut up = 0usize;
        for (i, inst) in insts.iter().enumerate() {
            if inst.health.is_available(now, p) {
                up += 1;
                if i < 64 {
                    available |= 1 << i;
                }
            }
        }
        let is_available = |i: usize| {
            if i < 64 {
                available & (1 << i) != 0
            } else {
                insts[i].health.is_available(now, p)
            }
        };
        let panic = p.outlier.panic_threshold > 0.0
            && (up as f64) < p.outlier.panic_threshold * insts.len() as f64;
        let weight_of = |i: usize, want_tag: bool| -> u32 {
            let inst = &insts[i];
            if !usable(i) || inst.weight == 0 || (want_tag && inst.gray.as_deref() != tag) {
                return 0;
            }
            if panic {
                // Health is ignored (but a failed probe is not): every probed-up instance
                // weighs its base weight, on the scale of the published weights, so the
                // ejected ones share the load instead of getting a trickle of it.
                return if inst.health.is_probe_up() {
                    inst.weight.saturating_mul(100)
                } else {
                    0
                };
            }
            if !is_available(i) {
                return 0;
            }
            // A weight not yet published (just recovered) still gets a trickle.
            inst.effective.max(1)
        };
        if let (Some(ring), Some(key)) = (&c.ring, key) {
            let n = insts.len();
            return ring
                .walk(key, n, |i| weight_of(i, true) > 0)
                .or_else(|| ring.walk(key, n, |i| weight_of(i, false) > 0));
        }
        wrr.pick(insts.len(), |i| weight_of(i, true))
            .or_else(|| wrr.pick(insts.len(), |i| weight_of(i, false)))
    }

    /// Explain where `key` goes now.
    pub fn explain(&self, key: &str, now_ms: u64) -> Result<Explain, ExplainError> {
        crate::key::check_key(key)?;
        let d = self.decide(&RouteInput {
            key: Some(key),
            now_ms,
            ..RouteInput::default()
        });
        let (slot, home, _) = self.home_of(key);
        let home_cell = &self.cells[usize::from(home)];
        let (cell, reason, gray_tag) = match &d {
            Ok(d) => (
                self.cells[usize::from(d.cell)].id.to_string(),
                self.reason_text(d),
                self.gray_rule(Some(key), d.cell, &HeaderMap::new())
                    .map(|r| r.tag.to_string()),
            ),
            Err(e) => (String::new(), e.to_string(), None),
        };
        Ok(Explain {
            key: key.to_owned(),
            slot,
            home_cell: home_cell.id.to_string(),
            home_state: home_cell.state.as_str(),
            cell,
            reason,
            gray_tag,
            table_version: self.version,
        })
    }

    /// A decision's reason in words.
    pub fn reason_text(&self, d: &Decision) -> String {
        let name = |c: CellIdx| self.cells.get(usize::from(c)).map_or("?", |c| &*c.id);
        match d.reason {
            Reason::Override => format!("override pins the key to {}", name(d.cell)),
            Reason::Slot => format!(
                "slot {} belongs to {}",
                d.slot.unwrap_or_default(),
                name(d.cell)
            ),
            Reason::Forced => format!("trusted client forced {}", name(d.cell)),
            Reason::Failover { from, via_override } => {
                let home = &self.cells[usize::from(from)];
                let why = if home.state == CellState::Active {
                    "has no healthy instance or its breaker is open".to_owned()
                } else if home.state == CellState::FailedOver
                    && home.configured_state == CellState::Active
                {
                    format!(
                        "was failed over by health ({})",
                        home.health.failover_reason()
                    )
                } else {
                    format!("is {}", home.state.as_str())
                };
                format!(
                    "home cell {} ({}) {why}; first serving failover target is {}",
                    home.id,
                    if via_override {
                        "by override"
                    } else {
                        "by slot"
                    },
                    name(d.cell)
                )
            }
            Reason::NoTargetLeft { via_override } => {
                let home = &self.cells[usize::from(d.cell)];
                format!(
                    "home cell {} ({}) was failed over by health ({}), but none of its failover targets serves; it keeps its keys",
                    home.id,
                    if via_override {
                        "by override"
                    } else {
                        "by slot"
                    },
                    home.health.failover_reason()
                )
            }
            Reason::Anonymous { region } => match region {
                Some(r) => format!(
                    "no key; best serving cell for region {}",
                    self.regions[usize::from(r)]
                ),
                None => "no key; best serving cell in any region".to_owned(),
            },
        }
    }
}

/// Why a decision could not be explained.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The key is invalid.
    #[error(transparent)]
    Key(#[from] KeyError),
}
