//! The routing table: one immutable, versioned snapshot of everything a request decision
//! reads — cells and their states, instances, the slot table, overrides, key sources, the
//! keyless policy, gray rules and timeouts. It is built and validated by [`TableBuilder`]
//! off the request path and replaced as a whole; nothing in it is mutated after `build`
//! except the shared, atomic health state of instances.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use cellgate_health::{CellHealth, HealthPolicy, HealthRegistry, InstanceHealth, RouteLatency};
use http::HeaderValue;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::error::TableError;
use crate::gray::GrayRule;
use crate::key::KeySources;
use crate::overrides::Overrides;
use crate::slot::DEFAULT_SLOT_COUNT;

/// Index of a cell inside one table.
pub type CellIdx = u16;

/// Largest number of cells in one table.
pub const MAX_CELLS: usize = u16::MAX as usize;

/// The state of a cell (SPEC §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CellState {
    /// Serves its slots.
    #[default]
    Active,
    /// No new requests; its slots are served by its failover targets.
    Draining,
    /// Its slots are served by its failover targets because health said so.
    FailedOver,
    /// Out of service.
    Disabled,
}

impl CellState {
    /// The state's name as written in configuration and APIs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Draining => "draining",
            Self::FailedOver => "failed_over",
            Self::Disabled => "disabled",
        }
    }
}

/// A request's SLO class, for load shedding: `X-SLO-Class`, else its route's, else
/// `standard`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SloClass {
    /// Shed last.
    Critical,
    /// The default.
    #[default]
    Standard,
    /// Shed first.
    BestEffort,
}

/// A route's adaptive deadline: clamp(p95 × `factor`, `min`, `max`), the p95 of the
/// route's answers over the last 10 s.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adaptive {
    /// Multiple of the p95.
    pub factor: f64,
    /// Shortest deadline.
    pub min: Duration,
    /// Longest deadline.
    pub max: Duration,
}

/// A route as given to the builder: requests whose path is `prefix` or below it.
#[derive(Clone, Debug)]
pub struct RouteSpec {
    /// Path prefix (`/api/checkout` matches `/api/checkout` and `/api/checkout/...`).
    pub prefix: String,
    /// Default deadline (else the table's).
    pub timeout: Option<Duration>,
    /// Longest deadline a request may ask for (else the table's).
    pub max_timeout: Option<Duration>,
    /// Adaptive default deadline.
    pub adaptive: Option<Adaptive>,
    /// SLO class of its requests that send none.
    pub slo_class: Option<SloClass>,
}

/// A route of the table.
#[derive(Clone, Debug)]
pub struct Route {
    /// Path prefix.
    pub prefix: Arc<str>,
    /// Its deadlines (default and cap; connect as the table's).
    pub timeouts: Timeouts,
    /// Adaptive default deadline.
    pub adaptive: Option<Adaptive>,
    /// SLO class of its requests that send none.
    pub slo_class: Option<SloClass>,
    /// Its answers' latencies and current adaptive deadline (survive table swaps).
    pub latency: Arc<RouteLatency>,
}

impl Route {
    /// Whether `path` is this route's prefix or below it.
    #[inline]
    fn matches(&self, path: &str) -> bool {
        path.strip_prefix(&*self.prefix).is_some_and(|rest| {
            rest.is_empty() || rest.starts_with('/') || self.prefix.ends_with('/')
        })
    }

    /// The deadline of a request that asks for none: the adaptive one once known (within
    /// its bounds), else the route's default.
    #[inline]
    pub fn default_timeout(&self) -> Duration {
        match (self.adaptive, self.latency.adaptive()) {
            (Some(_), Some(d)) => d,
            _ => self.timeouts.default,
        }
    }

    /// Recompute the adaptive deadline from the latencies at `now` (the controller, off the
    /// request path): none (the route's `timeout`) while the window holds no request.
    pub fn update_adaptive(&self, now: u64) {
        let Some(a) = self.adaptive else { return };
        let Some(p95) = self.latency.p95_ms(now) else {
            self.latency.set_adaptive_ms(0);
            return;
        };
        let ms = (p95 as f64 * a.factor).round() as u64;
        let ms = ms.clamp(a.min.as_millis() as u64, a.max.as_millis() as u64);
        self.latency.set_adaptive_ms(ms.max(1));
    }
}

/// How a request picks an instance of a cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Smooth weighted round robin over the dynamic weights.
    #[default]
    RoundRobin,
    /// Key affinity: the routing key is hashed onto a consistent-hash ring of the cell's
    /// instances (ketama, built from their names), so a key keeps its instance while it is
    /// available; an unavailable one's keys go to the next instance on the ring.
    /// Keyless requests use round robin.
    KeyAffinity,
}

/// A cell's consistent-hash ring (key affinity), built once per table.
pub struct KeyRing {
    ring: pingora_ketama::Continuum,
    /// Instances on the ring (weight above 0).
    on_ring: usize,
    /// The ring's point of each instance, sorted, with the instance's index.
    points: Vec<(std::net::SocketAddr, usize)>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("instances", &self.points.len())
            .finish()
    }
}

impl KeyRing {
    /// The ring is built from the instances' names, not their resolved addresses: every
    /// gateway of a fleet builds the same ring from the same configuration (whatever its
    /// resolver says), a DNS change moves no key, and two instances behind one address
    /// are two instances. Points per weight unit are nginx's (160); weights are divided by
    /// their greatest common divisor and scaled down to at most 10, so a ring stays at most
    /// 1,600 points per instance whatever the configured weights.
    fn new(instances: &[Instance]) -> Self {
        fn gcd(a: u32, b: u32) -> u32 {
            if b == 0 {
                a
            } else {
                gcd(b, a % b)
            }
        }
        // A stable stand-in address per name (the ring hashes an address's text).
        let point = |name: &str| {
            std::net::SocketAddr::from((
                std::net::Ipv6Addr::from(xxhash_rust::xxh3::xxh3_128(name.as_bytes())),
                0,
            ))
        };
        let g = instances.iter().map(|i| i.weight).fold(0, gcd).max(1);
        let max = instances
            .iter()
            .map(|i| i.weight / g)
            .max()
            .unwrap_or(0)
            .max(1);
        let buckets: Vec<pingora_ketama::Bucket> = instances
            .iter()
            .filter(|i| i.weight > 0)
            .map(|i| {
                let w = u64::from(i.weight / g);
                let w = if max > 10 {
                    (w * 10).div_ceil(u64::from(max))
                } else {
                    w
                };
                pingora_ketama::Bucket::new(point(&i.name), w.clamp(1, 10) as u32)
            })
            .collect();
        let mut points: Vec<(std::net::SocketAddr, usize)> = instances
            .iter()
            .enumerate()
            .map(|(i, inst)| (point(&inst.name), i))
            .collect();
        points.sort_unstable();
        Self {
            on_ring: buckets.len(),
            ring: pingora_ketama::Continuum::new(&buckets),
            points,
        }
    }

    /// The first instance, in ring order from `key`'s point (each looked at once), that
    /// `take` accepts.
    pub(crate) fn walk(
        &self,
        key: &[u8],
        n: usize,
        mut take: impl FnMut(usize) -> bool,
    ) -> Option<usize> {
        // Instances looked at: a word on the stack for small cells.
        let mut small = 0u64;
        let mut big = if n > 64 {
            vec![0u64; n.div_ceil(64)]
        } else {
            Vec::new()
        };
        let mut distinct = 0;
        // Every instance is on the ring at most 1,600 times: a bound for the walk.
        for addr in self
            .ring
            .node_iter(key)
            .take(n.saturating_mul(1_600).max(1))
        {
            let Ok(at) = self.points.binary_search_by(|(a, _)| a.cmp(addr)) else {
                continue;
            };
            let i = self.points[at].1;
            let (word, bit) = match big.get_mut(i / 64) {
                Some(w) => (w, 1u64 << (i % 64)),
                None => (&mut small, 1u64 << (i % 64)),
            };
            if *word & bit != 0 {
                continue;
            }
            *word |= bit;
            if take(i) {
                return Some(i);
            }
            distinct += 1;
            if distinct >= self.on_ring {
                return None;
            }
        }
        None
    }
}

/// How the gateway talks to a cell's instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1, except gRPC requests, which need HTTP/2 and use h2c.
    #[default]
    Auto,
    /// Always HTTP/1.1 (gRPC requests are refused with 502).
    Http1,
    /// Always HTTP/2 with prior knowledge (h2c).
    H2c,
}

impl UpstreamProtocol {
    /// Whether a request goes to the cell's instances over HTTP/2 (`Some(true)`: h2c, or h2
    /// over the cell's TLS) or HTTP/1.1 (`Some(false)`); `None` when it cannot go at all (gRPC
    /// to an HTTP/1.1-only cell). The data path and the active probes both ask here, so a
    /// probe speaks what live traffic speaks.
    pub fn uses_h2(self, grpc: bool) -> Option<bool> {
        match (self, grpc) {
            (Self::H2c, _) | (Self::Auto, true) => Some(true),
            (Self::Http1, true) => None,
            (Self::Auto | Self::Http1, false) => Some(false),
        }
    }
}

/// What to do with a request that has no routing key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnonymousPolicy {
    /// Answer 400.
    Reject,
    /// Route to the best serving cell of the request's region (hint header, client CIDR,
    /// or this default), then of other regions.
    Region {
        /// Region used when neither hint nor CIDR names one.
        default_region: Option<u16>,
    },
}

/// Request deadlines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Deadline of a request that asks for none.
    pub default: Duration,
    /// Longest deadline a request may ask for (`X-Timeout`, `grpc-timeout`).
    pub max: Duration,
    /// Upstream connect timeout.
    pub connect: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            default: Duration::from_secs(15),
            max: Duration::from_secs(60),
            connect: Duration::from_secs(1),
        }
    }
}

/// One upstream address of a cell. `repr(C)`, what an instance pick reads first (health,
/// weights, gray label), so a cell's instances are weighed from as few cache lines as
/// possible.
#[derive(Debug, Clone)]
#[repr(C)]
pub struct Instance {
    /// Shared health state (survives table swaps).
    pub health: Arc<InstanceHealth>,
    /// Configured base weight.
    pub weight: u32,
    /// Effective weight (× 100) published with this table: base × score × RTT term × slow
    /// start, computed off the request path.
    pub effective: u32,
    /// The `gray` label, if any.
    pub gray: Option<Arc<str>>,
    /// Resolved address.
    pub addr: SocketAddr,
    /// Name, unique in its cell.
    pub name: Arc<str>,
    /// Labels, e.g. `gray: canary`.
    pub labels: Arc<BTreeMap<String, String>>,
}

/// One cell of a table. `repr(C)`, what a routing decision reads first (health,
/// instances, state), so a decision touches as few of the cell's cache lines as it can.
#[derive(Debug, Clone)]
#[repr(C)]
pub struct Cell {
    /// Shared health state (survives table swaps).
    pub health: Arc<CellHealth>,
    /// Instances.
    pub instances: Vec<Instance>,
    /// State in this table (configured state, or `failed_over` when health failed it over).
    pub state: CellState,
    /// State as configured (file, etcd or admin), before health.
    pub configured_state: CellState,
    /// Region index in the table.
    pub region_idx: u16,
    /// Base weight.
    pub weight: u32,
    /// Upstream protocol.
    pub protocol: UpstreamProtocol,
    /// The key-affinity ring (`balance: key_affinity`), else round robin.
    pub ring: Option<Arc<KeyRing>>,
    /// [`Cell::dynamic_weight`], computed when the table (or its weights) is made.
    pub dyn_weight: u64,
    /// Ordered failover targets.
    pub failover: Vec<CellIdx>,
    /// `X-Cell-ID` header value, computed once.
    pub id_header: HeaderValue,
    /// Cell id.
    pub id: Arc<str>,
    /// Region name.
    pub region: Arc<str>,
}

impl Cell {
    /// Whether the cell takes new traffic at `now`: active, its breaker not open, and at
    /// least one instance available.
    #[inline]
    pub fn is_serving(&self, now: u64, p: &HealthPolicy) -> bool {
        self.state == CellState::Active && self.can_serve(now, p)
    }

    /// Whether the cell could take traffic at `now` whatever its state: its breaker lets
    /// traffic through and an instance is available.
    #[inline]
    pub fn can_serve(&self, now: u64, p: &HealthPolicy) -> bool {
        self.health.breaker_allows(now, p)
            && self.instances.iter().any(|i| i.health.is_available(now, p))
    }

    /// Mean health score of the instances at `now` (0 = down, 1 = fully healthy); an
    /// unavailable (ejected, probe-down) instance counts 0. What `/admin/cells` and
    /// `cellgate_cell_health_score` report.
    pub fn health_score(&self, now: u64, p: &HealthPolicy) -> f64 {
        if self.instances.is_empty() {
            return 0.0;
        }
        let sum: f64 = self
            .instances
            .iter()
            .map(|i| {
                if i.health.is_available(now, p) {
                    i.health.score()
                } else {
                    0.0
                }
            })
            .sum();
        sum / self.instances.len() as f64
    }

    /// Sum of the instances' effective weights, in the base weight's units (the table keeps
    /// them ×100). What `/admin/cells` and `cellgate_cell_weight` report.
    pub fn effective_weight(&self) -> f64 {
        self.instances
            .iter()
            .map(|i| f64::from(i.effective) / 100.0)
            .sum()
    }

    /// The cell's weight among cells (keyless traffic): its base weight scaled by the
    /// share of its instances' base weight that health and RTT leave them (their published
    /// effective weights), in hundredths. A cell with one of ten equal instances up gets
    /// about a tenth of its share; 0 when none has weight.
    pub fn dynamic_weight(&self) -> u64 {
        let base: u64 = self.instances.iter().map(|i| u64::from(i.weight)).sum();
        if base == 0 {
            return 0;
        }
        let effective: u64 = self.instances.iter().map(|i| u64::from(i.effective)).sum();
        u64::from(self.weight).saturating_mul(effective) / base
    }
}

/// An immutable routing snapshot. See the module docs.
#[derive(Debug)]
pub struct RoutingTable {
    pub(crate) version: u64,
    pub(crate) version_header: HeaderValue,
    pub(crate) slot_count: u32,
    pub(crate) slots: Arc<[CellIdx]>,
    pub(crate) cells: Vec<Cell>,
    pub(crate) cell_ids: Arc<HashMap<Arc<str>, CellIdx>>,
    pub(crate) regions: Arc<[Arc<str>]>,
    pub(crate) overrides: Arc<Overrides>,
    pub(crate) key_sources: Arc<KeySources>,
    pub(crate) anonymous: AnonymousPolicy,
    pub(crate) region_cidrs: Arc<[(IpNet, u16)]>,
    pub(crate) trusted: Arc<[IpNet]>,
    pub(crate) replace_untrusted_xff: bool,
    pub(crate) gray: Arc<[GrayRule]>,
    pub(crate) timeouts: Timeouts,
    pub(crate) routes: Arc<[Route]>,
    pub(crate) health: Arc<HealthPolicy>,
}

impl RoutingTable {
    /// The route of `path` (the longest matching prefix), if routes are configured.
    #[inline]
    pub fn route_for(&self, path: &str) -> Option<&Route> {
        if self.routes.is_empty() {
            return None;
        }
        self.routes.iter().find(|r| r.matches(path))
    }

    /// Every route, longest prefix first.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Table version (`X-Routing-Version`).
    pub fn version(&self) -> u64 {
        self.version
    }
    /// The version as a header value.
    pub fn version_header(&self) -> &HeaderValue {
        &self.version_header
    }
    /// Number of slots.
    pub fn slot_count(&self) -> u32 {
        self.slot_count
    }
    /// Home cell of each slot.
    pub fn slots(&self) -> &[CellIdx] {
        &self.slots
    }
    /// All cells, indexed by [`CellIdx`].
    pub fn cells(&self) -> &[Cell] {
        &self.cells
    }
    /// One cell.
    pub fn cell(&self, idx: CellIdx) -> Option<&Cell> {
        self.cells.get(usize::from(idx))
    }
    /// The index of a cell by id.
    pub fn cell_idx(&self, id: &str) -> Option<CellIdx> {
        self.cell_ids.get(id).copied()
    }
    /// Region names, indexed by region index.
    pub fn regions(&self) -> &[Arc<str>] {
        &self.regions
    }
    /// The index of a region by name.
    pub fn region_idx(&self, name: &str) -> Option<u16> {
        self.regions
            .iter()
            .position(|r| &**r == name)
            .map(|i| i as u16)
    }
    /// Key → cell pins.
    pub fn overrides(&self) -> &Overrides {
        &self.overrides
    }
    /// Health settings of this table.
    pub fn health_policy(&self) -> &HealthPolicy {
        &self.health
    }
    /// The same table with new effective instance weights, computed by `weight(cell,
    /// instance)` (× 100). Shares every large part with `self`; the version is unchanged
    /// (weights move load between instances, never keys between cells).
    pub fn with_weights(&self, mut weight: impl FnMut(&Cell, &Instance) -> u32) -> RoutingTable {
        let cells = self
            .cells
            .iter()
            .map(|c| {
                let mut c2 = c.clone();
                for (i, inst) in c2.instances.iter_mut().enumerate() {
                    inst.effective = weight(c, &c.instances[i]);
                }
                c2.dyn_weight = c2.dynamic_weight();
                c2
            })
            .collect();
        RoutingTable {
            version: self.version,
            version_header: self.version_header.clone(),
            slot_count: self.slot_count,
            slots: Arc::clone(&self.slots),
            cells,
            cell_ids: Arc::clone(&self.cell_ids),
            regions: Arc::clone(&self.regions),
            overrides: Arc::clone(&self.overrides),
            key_sources: Arc::clone(&self.key_sources),
            anonymous: self.anonymous.clone(),
            region_cidrs: Arc::clone(&self.region_cidrs),
            trusted: Arc::clone(&self.trusted),
            replace_untrusted_xff: self.replace_untrusted_xff,
            gray: Arc::clone(&self.gray),
            timeouts: self.timeouts,
            routes: Arc::clone(&self.routes),
            health: Arc::clone(&self.health),
        }
    }
    /// Key sources.
    pub fn key_sources(&self) -> &KeySources {
        &self.key_sources
    }
    /// Gray rules.
    pub fn gray_rules(&self) -> &[GrayRule] {
        &self.gray
    }
    /// Deadlines.
    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }
    /// Whether `ip` may force a cell with `X-Cell-ID` or set `X-Gray-Tag`.
    #[inline]
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.trusted.iter().any(|n| n.contains(&ip))
    }
    /// Whether a client outside the trusted CIDRs has its `X-Forwarded-For` replaced by its
    /// own address (rather than appended to).
    #[inline]
    pub fn replaces_untrusted_forwarded_for(&self) -> bool {
        self.replace_untrusted_xff
    }
    /// Region of a client address by the CIDR map (most specific match).
    pub fn region_of_ip(&self, ip: IpAddr) -> Option<u16> {
        let ip = canonical_ip(ip);
        self.region_cidrs
            .iter()
            .filter(|(n, _)| n.contains(&ip))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, r)| *r)
    }
    /// Number of slots per cell, indexed by [`CellIdx`].
    pub fn slots_per_cell(&self) -> Vec<u32> {
        let mut v = vec![0u32; self.cells.len()];
        for &c in self.slots.iter() {
            if let Some(n) = v.get_mut(usize::from(c)) {
                *n += 1;
            }
        }
        v
    }
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A cell as given to the builder.
#[derive(Clone, Debug)]
pub struct CellSpec {
    /// Cell id.
    pub id: String,
    /// Region name (must be declared with [`TableBuilder::region`]).
    pub region: String,
    /// State.
    pub state: CellState,
    /// Base weight.
    pub weight: u32,
    /// Failover targets by id, in order.
    pub failover: Vec<String>,
    /// Instances.
    pub instances: Vec<InstanceSpec>,
    /// Upstream protocol.
    pub protocol: UpstreamProtocol,
    /// Instance selection.
    pub balance: Balance,
}

/// An instance as given to the builder.
#[derive(Clone, Debug)]
pub struct InstanceSpec {
    /// Name, unique in the cell.
    pub name: String,
    /// Resolved address.
    pub addr: SocketAddr,
    /// Base weight.
    pub weight: u32,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// Builds and validates a [`RoutingTable`]. Errors name the offending place the way the
/// configuration does (`cells[1].failover[0]`, `slots`).
#[derive(Debug)]
pub struct TableBuilder {
    version: u64,
    slot_count: u32,
    regions: Vec<String>,
    cells: Vec<CellSpec>,
    slot_ranges: Vec<(String, Vec<(u32, u32)>)>,
    overrides: Vec<(String, String)>,
    key_sources: KeySources,
    anonymous_reject: bool,
    default_region: Option<String>,
    region_cidrs: Vec<(IpNet, String)>,
    trusted: Vec<IpNet>,
    replace_untrusted_xff: bool,
    gray: Vec<crate::gray::GraySpec>,
    timeouts: Timeouts,
    routes: Vec<RouteSpec>,
    health: HealthPolicy,
}

pub use crate::gray::GraySpec;

impl TableBuilder {
    /// A builder for table `version` with `slot_count` slots (0 = default 16384).
    pub fn new(version: u64, slot_count: u32) -> Self {
        Self {
            version,
            slot_count: if slot_count == 0 {
                DEFAULT_SLOT_COUNT
            } else {
                slot_count
            },
            regions: Vec::new(),
            cells: Vec::new(),
            slot_ranges: Vec::new(),
            overrides: Vec::new(),
            key_sources: KeySources::default(),
            anonymous_reject: false,
            default_region: None,
            region_cidrs: Vec::new(),
            trusted: Vec::new(),
            replace_untrusted_xff: false,
            gray: Vec::new(),
            timeouts: Timeouts::default(),
            routes: Vec::new(),
            health: HealthPolicy::default(),
        }
    }
    /// Health settings.
    pub fn health(mut self, p: HealthPolicy) -> Self {
        self.health = p;
        self
    }
    /// Declare a region.
    pub fn region(mut self, name: impl Into<String>) -> Self {
        self.regions.push(name.into());
        self
    }
    /// Add a cell.
    pub fn cell(mut self, cell: CellSpec) -> Self {
        self.cells.push(cell);
        self
    }
    /// Give `cell` the inclusive slot ranges `ranges`.
    pub fn slot_ranges(mut self, cell: impl Into<String>, ranges: Vec<(u32, u32)>) -> Self {
        self.slot_ranges.push((cell.into(), ranges));
        self
    }
    /// Pin `key` to `cell`.
    pub fn override_key(mut self, key: impl Into<String>, cell: impl Into<String>) -> Self {
        self.overrides.push((key.into(), cell.into()));
        self
    }
    /// Key sources.
    pub fn key_sources(mut self, sources: KeySources) -> Self {
        self.key_sources = sources;
        self
    }
    /// Keyless requests: reject with 400 (`true`) or route by region (`false`).
    pub fn anonymous(mut self, reject: bool, default_region: Option<String>) -> Self {
        self.anonymous_reject = reject;
        self.default_region = default_region;
        self
    }
    /// Map client addresses in `net` to `region`.
    pub fn region_cidr(mut self, net: IpNet, region: impl Into<String>) -> Self {
        self.region_cidrs.push((net, region.into()));
        self
    }
    /// Trust clients in `net` to force `X-Cell-ID` / `X-Gray-Tag`.
    pub fn trusted(mut self, net: IpNet) -> Self {
        self.trusted.push(net);
        self
    }
    /// Replace the `X-Forwarded-For` of clients outside the trusted CIDRs by their address
    /// (default: append to it).
    pub fn replace_untrusted_forwarded_for(mut self, yes: bool) -> Self {
        self.replace_untrusted_xff = yes;
        self
    }
    /// Add a gray rule.
    pub fn gray(mut self, rule: GraySpec) -> Self {
        self.gray.push(rule);
        self
    }
    /// Deadlines.
    pub fn timeouts(mut self, t: Timeouts) -> Self {
        self.timeouts = t;
        self
    }
    /// Add a route.
    pub fn route(mut self, r: RouteSpec) -> Self {
        self.routes.push(r);
        self
    }

    /// Validate and build. Instances get their health state from `health`, so the same
    /// identity keeps its state across tables.
    pub fn build(self, health: &HealthRegistry) -> Result<RoutingTable, TableError> {
        if self.cells.is_empty() {
            return Err(TableError::at("cells", "at least one cell is required"));
        }
        if self.cells.len() > MAX_CELLS {
            return Err(TableError::at(
                "cells",
                format!("at most {MAX_CELLS} cells"),
            ));
        }
        let mut regions: Vec<Arc<str>> = Vec::new();
        for (i, r) in self.regions.iter().enumerate() {
            if r.is_empty() {
                return Err(TableError::at(format!("regions[{i}]"), "empty region name"));
            }
            if regions.iter().any(|x| &**x == r) {
                return Err(TableError::at(
                    format!("regions[{i}]"),
                    format!("duplicate region {r:?}"),
                ));
            }
            regions.push(r.as_str().into());
        }
        let region_idx = |name: &str| regions.iter().position(|r| &**r == name).map(|i| i as u16);

        let mut cell_ids: HashMap<Arc<str>, CellIdx> = HashMap::new();
        for (i, c) in self.cells.iter().enumerate() {
            if c.id.is_empty() {
                return Err(TableError::at(format!("cells[{i}].id"), "empty cell id"));
            }
            if cell_ids
                .insert(c.id.as_str().into(), i as CellIdx)
                .is_some()
            {
                return Err(TableError::at(
                    format!("cells[{i}].id"),
                    format!("duplicate cell id {:?}", c.id),
                ));
            }
        }
        let mut cells = Vec::with_capacity(self.cells.len());
        for (i, c) in self.cells.iter().enumerate() {
            let id_header = HeaderValue::from_str(&c.id).map_err(|_| {
                TableError::at(format!("cells[{i}].id"), "cell id must be visible ASCII")
            })?;
            let Some(ri) = region_idx(&c.region) else {
                return Err(TableError::at(
                    format!("cells[{i}].region"),
                    format!(
                        "unknown region {:?} (declared: {})",
                        c.region,
                        self.regions.join(", ")
                    ),
                ));
            };
            let mut failover = Vec::with_capacity(c.failover.len());
            for (j, f) in c.failover.iter().enumerate() {
                let Some(&fi) = cell_ids.get(f.as_str()) else {
                    return Err(TableError::at(
                        format!("cells[{i}].failover[{j}]"),
                        format!("unknown cell {f:?}"),
                    ));
                };
                if usize::from(fi) == i {
                    return Err(TableError::at(
                        format!("cells[{i}].failover[{j}]"),
                        "a cell cannot fail over to itself",
                    ));
                }
                if failover.contains(&fi) {
                    return Err(TableError::at(
                        format!("cells[{i}].failover[{j}]"),
                        format!("duplicate failover target {f:?}"),
                    ));
                }
                failover.push(fi);
            }
            let mut instances = Vec::with_capacity(c.instances.len());
            for (j, inst) in c.instances.iter().enumerate() {
                if inst.name.is_empty() {
                    return Err(TableError::at(
                        format!("cells[{i}].instances[{j}].name"),
                        "empty instance name",
                    ));
                }
                if instances.iter().any(|x: &Instance| *x.name == inst.name) {
                    return Err(TableError::at(
                        format!("cells[{i}].instances[{j}].name"),
                        format!("duplicate instance name {:?} in cell {:?}", inst.name, c.id),
                    ));
                }
                let ih = health.instance(&c.id, &inst.name);
                ih.apply_policy(&self.health);
                let now = cellgate_health::now_ms();
                instances.push(Instance {
                    name: inst.name.as_str().into(),
                    addr: inst.addr,
                    weight: inst.weight,
                    effective: (ih.effective_weight(inst.weight, now, &self.health) * 100.0).round()
                        as u32,
                    gray: inst.labels.get("gray").map(|g| Arc::from(g.as_str())),
                    labels: Arc::new(inst.labels.clone()),
                    health: ih,
                });
            }
            let ch = health.cell(&c.id);
            ch.apply_policy(&self.health);
            let state = if c.state == CellState::Active && ch.is_failed_over() {
                CellState::FailedOver
            } else {
                c.state
            };
            let ring =
                (c.balance == Balance::KeyAffinity).then(|| Arc::new(KeyRing::new(&instances)));
            let mut cell = Cell {
                id: c.id.as_str().into(),
                id_header,
                region: regions[usize::from(ri)].clone(),
                region_idx: ri,
                state,
                configured_state: c.state,
                weight: c.weight,
                failover,
                instances,
                protocol: c.protocol,
                ring,
                dyn_weight: 0,
                health: ch,
            };
            cell.dyn_weight = cell.dynamic_weight();
            cells.push(cell);
        }

        // Slot table: every slot exactly once.
        const UNSET: CellIdx = CellIdx::MAX;
        let mut slots = vec![UNSET; self.slot_count as usize];
        if self.slot_ranges.is_empty() {
            // Bootstrap: contiguous, equal ranges in cell order.
            let n = cells.len() as u64;
            for (s, slot) in slots.iter_mut().enumerate() {
                *slot = ((s as u64 * n) / u64::from(self.slot_count)) as CellIdx;
            }
        } else {
            for (k, (cell, ranges)) in self.slot_ranges.iter().enumerate() {
                let Some(&ci) = cell_ids.get(cell.as_str()) else {
                    return Err(TableError::at(
                        format!("slots[{k}].cell"),
                        format!("unknown cell {cell:?}"),
                    ));
                };
                for (r, &(lo, hi)) in ranges.iter().enumerate() {
                    if lo > hi || hi >= self.slot_count {
                        return Err(TableError::at(
                            format!("slots[{k}].ranges[{r}]"),
                            format!("range {lo}-{hi} is outside 0-{}", self.slot_count - 1),
                        ));
                    }
                    for s in lo..=hi {
                        let slot = &mut slots[s as usize];
                        if *slot != UNSET {
                            return Err(TableError::at(
                                format!("slots[{k}].ranges[{r}]"),
                                format!(
                                    "slot {s} is assigned twice ({} and {cell})",
                                    cells[usize::from(*slot)].id
                                ),
                            ));
                        }
                        *slot = ci;
                    }
                }
            }
            if let Some(hole) = slots.iter().position(|&s| s == UNSET) {
                let missing = slots.iter().filter(|&&s| s == UNSET).count();
                return Err(TableError::at(
                    "slots",
                    format!("{missing} slot(s) have no cell, the first is {hole}; every slot 0-{} needs one", self.slot_count - 1),
                ));
            }
        }

        let mut overrides = Overrides::with_capacity(
            self.overrides.len(),
            self.overrides.iter().map(|(k, _)| k.len()).sum(),
        );
        for (k, (key, cell)) in self.overrides.iter().enumerate() {
            crate::key::check_key(key)
                .map_err(|e| TableError::at(format!("overrides[{k}]"), e.to_string()))?;
            let Some(&ci) = cell_ids.get(cell.as_str()) else {
                return Err(TableError::at(
                    format!("overrides[{k}]"),
                    format!("unknown cell {cell:?} for key {key:?}"),
                ));
            };
            if !overrides.insert(xxh3_64(key.as_bytes()), key, ci) {
                return Err(TableError::at(
                    format!("overrides[{k}]"),
                    "the override keys together exceed 4 GiB".to_string(),
                ));
            }
        }

        let anonymous = if self.anonymous_reject {
            AnonymousPolicy::Reject
        } else {
            let default_region = match &self.default_region {
                None => None,
                Some(r) => Some(region_idx(r).ok_or_else(|| {
                    TableError::at(
                        "routing.anonymous.default_region",
                        format!("unknown region {r:?}"),
                    )
                })?),
            };
            AnonymousPolicy::Region { default_region }
        };
        let mut region_cidrs = Vec::with_capacity(self.region_cidrs.len());
        for (k, (net, r)) in self.region_cidrs.iter().enumerate() {
            let ri = region_idx(r).ok_or_else(|| {
                TableError::at(
                    format!("routing.region_cidrs[{k}]"),
                    format!("unknown region {r:?}"),
                )
            })?;
            region_cidrs.push((*net, ri));
        }
        let mut gray = Vec::with_capacity(self.gray.len());
        for (k, spec) in self.gray.into_iter().enumerate() {
            gray.push(
                GrayRule::from_spec(spec, &regions)
                    .map_err(|m| TableError::at(format!("gray[{k}]"), m))?,
            );
        }
        if self.timeouts.default > self.timeouts.max {
            return Err(TableError::at(
                "timeouts.default",
                "longer than timeouts.max",
            ));
        }

        // Routes, longest prefix first (the first match is the most specific).
        let mut routes = Vec::with_capacity(self.routes.len());
        for (k, r) in self.routes.iter().enumerate() {
            if !r.prefix.starts_with('/') {
                return Err(TableError::at(
                    format!("routes[{k}].path_prefix"),
                    format!("{:?} must start with '/'", r.prefix),
                ));
            }
            if self.routes[..k].iter().any(|o| o.prefix == r.prefix) {
                return Err(TableError::at(
                    format!("routes[{k}].path_prefix"),
                    format!("duplicate route {:?}", r.prefix),
                ));
            }
            routes.push(Route {
                prefix: r.prefix.as_str().into(),
                timeouts: Timeouts {
                    default: r.timeout.unwrap_or(self.timeouts.default),
                    max: r.max_timeout.unwrap_or(self.timeouts.max),
                    connect: self.timeouts.connect,
                },
                adaptive: r.adaptive,
                slo_class: r.slo_class,
                latency: health.route(&r.prefix),
            });
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        let routes: Arc<[Route]> = routes.into();
        Ok(RoutingTable {
            version: self.version,
            version_header: HeaderValue::from(self.version),
            slot_count: self.slot_count,
            slots: slots.into(),
            cells,
            cell_ids: Arc::new(cell_ids),
            regions: regions.into(),
            overrides: Arc::new(overrides),
            key_sources: Arc::new(self.key_sources),
            anonymous,
            region_cidrs: region_cidrs.into(),
            trusted: self.trusted.into(),
            replace_untrusted_xff: self.replace_untrusted_xff,
            gray: gray.into(),
            timeouts: self.timeouts,
            routes,
            health: Arc::new(self.health),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::UpstreamProtocol;

    #[test]
    fn upstream_protocol_picks_http2_for_h2c_cells_and_grpc_on_auto() {
        assert_eq!(UpstreamProtocol::Auto.uses_h2(false), Some(false));
        assert_eq!(UpstreamProtocol::Auto.uses_h2(true), Some(true));
        assert_eq!(UpstreamProtocol::Http1.uses_h2(false), Some(false));
        assert_eq!(UpstreamProtocol::Http1.uses_h2(true), None);
        assert_eq!(UpstreamProtocol::H2c.uses_h2(false), Some(true));
        assert_eq!(UpstreamProtocol::H2c.uses_h2(true), Some(true));
    }
}
