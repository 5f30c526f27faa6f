//! Health settings, as plain values (the config crate parses and validates them). Defaults
//! are the SPEC's.

use std::time::Duration;

/// Every health knob of a table.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct HealthPolicy {
    /// Passive outlier ejection of instances.
    pub outlier: OutlierPolicy,
    /// Circuit breakers (instance and cell).
    pub breaker: BreakerPolicy,
    /// Automatic cell failover.
    pub failover: FailoverPolicy,
    /// Active probes.
    pub probe: ProbePolicy,
    /// Effective weight formula.
    pub weight: WeightPolicy,
    /// Retries.
    pub retry: RetryPolicy,
}

/// Passive outlier ejection.
#[derive(Clone, Debug, PartialEq)]
pub struct OutlierPolicy {
    /// Consecutive failures (5xx, reset, timeout) that eject an instance.
    pub consecutive_failures: u32,
    /// A refused connection ejects at once (nothing listens there).
    pub eject_on_refused: bool,
    /// Failure ratio over `window` that ejects an instance...
    pub failure_ratio: f64,
    /// ...once it has at least this many requests in the window.
    pub min_requests: u64,
    /// Window of the failure ratio.
    pub window: Duration,
    /// First ejection; doubles with each consecutive ejection.
    pub base_ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
    /// At most this share of a cell's instances is ejected at once (0–1).
    pub max_ejected_fraction: f64,
    /// Recovering instances ramp from 10 % to full weight over this time.
    pub slow_start: Duration,
    /// When fewer than this share of a cell's instances is available, ejections are
    /// ignored rather than concentrating all load on the survivors (0 disables).
    pub panic_threshold: f64,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            eject_on_refused: true,
            failure_ratio: 0.5,
            min_requests: 20,
            window: Duration::from_secs(10),
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(30),
            max_ejected_fraction: 0.5,
            slow_start: Duration::from_secs(5),
            panic_threshold: 0.0,
        }
    }
}

/// Circuit breaker.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerPolicy {
    /// Opens at this failure ratio...
    pub failure_ratio: f64,
    /// ...over at least this many requests...
    pub min_requests: u64,
    /// ...within this window.
    pub window: Duration,
    /// Stays open this long, then half-opens.
    pub open_for: Duration,
    /// Successes in half-open that close it.
    pub half_open_successes: u32,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            failure_ratio: 0.6,
            min_requests: 20,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(60),
            half_open_successes: 3,
        }
    }
}

/// Automatic cell failover.
#[derive(Clone, Debug, PartialEq)]
pub struct FailoverPolicy {
    /// Error ratio over `window` above which a cell fails over (0.005 = 0.5 %). The ratio is
    /// judged by its 3-sigma Wilson lower bound, so a few unlucky errors in a thin window do
    /// not count as a crossing.
    pub error_ratio: f64,
    /// Window of the error ratio.
    pub window: Duration,
    /// Requests needed in the window before the ratio counts.
    pub min_requests: u64,
    /// A failed-over cell stays failed over at least this long; each switch back that fails
    /// again doubles it (up to 16×), so a flapping cell switches at most once per dwell.
    pub min_dwell: Duration,
    /// Consecutive successful probes of an instance before its cell may return.
    pub recover_probes: u32,
    /// Gateways of the fleet that must see a cell failing before any fails it over
    /// automatically (1: each decides alone). Capped at the number of live gateways.
    pub quorum: u32,
}

impl Default for FailoverPolicy {
    fn default() -> Self {
        Self {
            error_ratio: 0.005,
            window: Duration::from_secs(30),
            min_requests: 100,
            min_dwell: Duration::from_secs(30),
            recover_probes: 2,
            quorum: 1,
        }
    }
}

/// What a probe checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// TCP connect.
    Tcp,
    /// `GET /healthz?cell=<id>`: 200 is up; a JSON body of watermarks lowers the score.
    Http,
}

/// One watermark threshold: at `soft` the score starts to drop, at `hard` it reaches `floor`.
#[derive(Clone, Debug, PartialEq)]
pub struct Watermark {
    /// Field of the probe's JSON body.
    pub name: String,
    /// Value where the score starts to drop.
    pub soft: f64,
    /// Value where the score reaches the floor.
    pub hard: f64,
}

/// Active probes.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbePolicy {
    /// Probe kind.
    pub kind: ProbeKind,
    /// Between probes of an instance.
    pub interval: Duration,
    /// Probe timeout.
    pub timeout: Duration,
    /// Random extra delay, as a share of the interval (0–1).
    pub jitter: f64,
    /// Consecutive successes that mark a down instance up.
    pub rise: u32,
    /// Consecutive failures that mark an up instance down.
    pub fall: u32,
    /// Path of the HTTP probe.
    pub path: String,
    /// Watermark thresholds.
    pub watermarks: Vec<Watermark>,
    /// Lowest score watermarks can give (an overloaded instance still gets a trickle).
    pub floor: f64,
}

impl Default for ProbePolicy {
    fn default() -> Self {
        Self {
            kind: ProbeKind::Http,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            jitter: 0.1,
            rise: 2,
            fall: 3,
            path: "/healthz".into(),
            watermarks: Vec::new(),
            floor: 0.1,
        }
    }
}

/// `weight = base × score × (1 + alpha · e^(−beta · rtt_ms))`.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightPolicy {
    /// α.
    pub alpha: f64,
    /// β.
    pub beta: f64,
    /// Share of each new RTT sample in the moving average (0–1).
    pub rtt_ewma: f64,
}

impl Default for WeightPolicy {
    fn default() -> Self {
        Self {
            alpha: 0.5,
            beta: 0.02,
            rtt_ewma: 0.2,
        }
    }
}

/// Retries.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per request at most (first try included).
    pub max_attempts: u32,
    /// Statuses retried for idempotent requests without a body.
    pub statuses: Vec<u16>,
    /// Retries may add at most this share of a cell's requests...
    pub budget_ratio: f64,
    /// ...but always this many per second.
    pub budget_min_per_sec: u32,
    /// Back-off before a status retry (doubles per retry, with jitter).
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            statuses: vec![502, 503, 504],
            budget_ratio: 0.2,
            budget_min_per_sec: 10,
            backoff: Duration::from_millis(5),
        }
    }
}
