//! The `health:` and `shedding:` sections: every field optional, defaults are the SPEC's,
//! and validation names the offending path.

use std::collections::BTreeMap;
use std::time::Duration;

use cellgate_health::{
    BreakerPolicy, FailoverPolicy, HealthPolicy, OutlierPolicy, ProbeKind, ProbePolicy,
    RetryPolicy, Watermark, WeightPolicy,
};
use serde::{Deserialize, Serialize};

use crate::error::Issue;
use crate::validate::parse_duration;

/// `health:`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCfg {
    /// Active probes.
    #[serde(default)]
    pub probe: ProbeCfg,
    /// Passive outlier ejection.
    #[serde(default)]
    pub outlier: OutlierCfg,
    /// Circuit breakers.
    #[serde(default)]
    pub breaker: BreakerCfg,
    /// Automatic cell failover.
    #[serde(default)]
    pub failover: FailoverCfg,
    /// Weight formula.
    #[serde(default)]
    pub weight: WeightCfg,
    /// Retries.
    #[serde(default)]
    pub retry: RetryCfg,
}

/// `health.probe`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProbeCfg {
    /// `http` (default: `GET <path>?cell=<id>`, JSON watermarks) or `tcp`.
    pub kind: Option<String>,
    /// Default `5s`.
    pub interval: Option<String>,
    /// Default `1s`.
    pub timeout: Option<String>,
    /// Share of the interval added at random, default 0.1.
    pub jitter: Option<f64>,
    /// Successes to come up, default 2.
    pub rise: Option<u32>,
    /// Failures to go down, default 3.
    pub fall: Option<u32>,
    /// Default `/healthz`.
    pub path: Option<String>,
    /// Watermark thresholds by field name: `{soft, hard}`.
    #[serde(default)]
    pub watermarks: BTreeMap<String, WatermarkCfg>,
    /// Lowest score from watermarks, default 0.1.
    pub floor: Option<f64>,
}

/// One watermark.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WatermarkCfg {
    /// Score starts to drop here.
    pub soft: f64,
    /// Score reaches the floor here.
    pub hard: f64,
}

/// `health.outlier`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutlierCfg {
    /// Default 5.
    pub consecutive_failures: Option<u32>,
    /// Default true.
    pub eject_on_refused: Option<bool>,
    /// Default 0.5.
    pub failure_ratio: Option<f64>,
    /// Default 20.
    pub min_requests: Option<u64>,
    /// Default `10s`.
    pub window: Option<String>,
    /// Default `1s`.
    pub base_ejection: Option<String>,
    /// Default `30s`.
    pub max_ejection: Option<String>,
    /// Default 0.5.
    pub max_ejected_fraction: Option<f64>,
    /// Default `5s`.
    pub slow_start: Option<String>,
    /// Default 0 (off).
    pub panic_threshold: Option<f64>,
}

/// `health.breaker`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BreakerCfg {
    /// Default 0.6.
    pub failure_ratio: Option<f64>,
    /// Default 20.
    pub min_requests: Option<u64>,
    /// Default `10s`.
    pub window: Option<String>,
    /// Default `60s`.
    pub open_for: Option<String>,
    /// Default 3.
    pub half_open_successes: Option<u32>,
}

/// `health.failover`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FailoverCfg {
    /// Default 0.005 (0.5 %).
    pub error_ratio: Option<f64>,
    /// Default `30s`.
    pub window: Option<String>,
    /// Default 100.
    pub min_requests: Option<u64>,
    /// Default `30s`.
    pub min_dwell: Option<String>,
    /// Default 2.
    pub recover_probes: Option<u32>,
    /// Default 1: each gateway fails a cell over on its own view. `k` > 1: only once `k`
    /// gateways of the fleet (etcd `gateways/`) see it failing, so one gateway's bad network
    /// path does not move a whole cell; capped at the number of live gateways.
    pub quorum: Option<u32>,
}

/// `health.weight`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WeightCfg {
    /// α, default 0.5.
    pub alpha: Option<f64>,
    /// β, default 0.02.
    pub beta: Option<f64>,
    /// EWMA share of a new RTT sample, default 0.2.
    pub rtt_ewma: Option<f64>,
}

/// `health.retry`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryCfg {
    /// Default 3.
    pub max_attempts: Option<u32>,
    /// Default [502, 503, 504].
    pub statuses: Option<Vec<u16>>,
    /// Default 0.2.
    pub budget_ratio: Option<f64>,
    /// Default 10.
    pub budget_min_per_sec: Option<u32>,
    /// Default `5ms`.
    pub backoff: Option<String>,
}

/// `shedding:` — load shedding by SLO class under overload.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SheddingCfg {
    /// Requests in flight through the gateway at which `critical` requests are shed
    /// (default 10000).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u64,
    /// Share of `max_in_flight` at which `standard` requests are shed (default 0.9).
    #[serde(default = "default_standard_at")]
    pub standard_at: f64,
    /// Share of `max_in_flight` at which `best-effort` requests are shed (default 0.75).
    #[serde(default = "default_best_effort_at")]
    pub best_effort_at: f64,
}

impl Default for SheddingCfg {
    fn default() -> Self {
        Self {
            max_in_flight: default_max_in_flight(),
            standard_at: default_standard_at(),
            best_effort_at: default_best_effort_at(),
        }
    }
}

fn default_max_in_flight() -> u64 {
    10_000
}
fn default_standard_at() -> f64 {
    0.9
}
fn default_best_effort_at() -> f64 {
    0.75
}

struct Check<'a>(&'a mut Vec<Issue>);

impl Check<'_> {
    fn dur(&mut self, path: &str, v: &Option<String>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match parse_duration(s) {
                Some(d) if !d.is_zero() => d,
                _ => {
                    self.0.push(Issue {
                        path: path.into(),
                        message: format!("{s:?} is not a positive duration such as 250ms or 2s"),
                    });
                    default
                }
            },
        }
    }
    fn ratio(&mut self, path: &str, v: Option<f64>, default: f64) -> f64 {
        match v {
            None => default,
            Some(x) if (0.0..=1.0).contains(&x) => x,
            Some(x) => {
                self.0.push(Issue {
                    path: path.into(),
                    message: format!("{x} is outside 0-1"),
                });
                default
            }
        }
    }
    fn positive<T: Copy + PartialOrd + Default + std::fmt::Display>(
        &mut self,
        path: &str,
        v: Option<T>,
        default: T,
    ) -> T {
        match v {
            None => default,
            Some(x) if x > T::default() => x,
            Some(x) => {
                self.0.push(Issue {
                    path: path.into(),
                    message: format!("{x} must be positive"),
                });
                default
            }
        }
    }
}

impl HealthCfg {
    /// The policy these settings describe; problems are appended to `issues`.
    pub fn to_policy(&self, issues: &mut Vec<Issue>) -> HealthPolicy {
        let d = HealthPolicy::default();
        let mut c = Check(issues);
        let p = &self.probe;
        let kind = match p.kind.as_deref() {
            None | Some("http") => ProbeKind::Http,
            Some("tcp") => ProbeKind::Tcp,
            Some(k) => {
                c.0.push(Issue {
                    path: "health.probe.kind".into(),
                    message: format!("{k:?} is not http or tcp"),
                });
                ProbeKind::Http
            }
        };
        let mut watermarks = Vec::new();
        for (name, w) in &p.watermarks {
            if !(w.soft.is_finite() && w.hard.is_finite() && w.soft < w.hard) {
                c.0.push(Issue {
                    path: format!("health.probe.watermarks.{name}"),
                    message: "soft must be below hard".into(),
                });
            }
            watermarks.push(Watermark {
                name: name.clone(),
                soft: w.soft,
                hard: w.hard,
            });
        }
        let path = p.path.clone().unwrap_or_else(|| d.probe.path.clone());
        if !path.starts_with('/') {
            c.0.push(Issue {
                path: "health.probe.path".into(),
                message: format!("{path:?} must start with /"),
            });
        }
        let probe = ProbePolicy {
            kind,
            interval: c.dur("health.probe.interval", &p.interval, d.probe.interval),
            timeout: c.dur("health.probe.timeout", &p.timeout, d.probe.timeout),
            jitter: c.ratio("health.probe.jitter", p.jitter, d.probe.jitter),
            rise: c.positive("health.probe.rise", p.rise, d.probe.rise),
            fall: c.positive("health.probe.fall", p.fall, d.probe.fall),
            path,
            watermarks,
            floor: c.ratio("health.probe.floor", p.floor, d.probe.floor),
        };
        let o = &self.outlier;
        let outlier = OutlierPolicy {
            consecutive_failures: c.positive(
                "health.outlier.consecutive_failures",
                o.consecutive_failures,
                d.outlier.consecutive_failures,
            ),
            eject_on_refused: o.eject_on_refused.unwrap_or(d.outlier.eject_on_refused),
            failure_ratio: c.ratio(
                "health.outlier.failure_ratio",
                o.failure_ratio,
                d.outlier.failure_ratio,
            ),
            min_requests: o.min_requests.unwrap_or(d.outlier.min_requests),
            window: c.dur("health.outlier.window", &o.window, d.outlier.window),
            base_ejection: c.dur(
                "health.outlier.base_ejection",
                &o.base_ejection,
                d.outlier.base_ejection,
            ),
            max_ejection: c.dur(
                "health.outlier.max_ejection",
                &o.max_ejection,
                d.outlier.max_ejection,
            ),
            max_ejected_fraction: c.ratio(
                "health.outlier.max_ejected_fraction",
                o.max_ejected_fraction,
                d.outlier.max_ejected_fraction,
            ),
            slow_start: match &o.slow_start {
                Some(s) if parse_duration(s) == Some(Duration::ZERO) => Duration::ZERO,
                _ => c.dur(
                    "health.outlier.slow_start",
                    &o.slow_start,
                    d.outlier.slow_start,
                ),
            },
            panic_threshold: c.ratio(
                "health.outlier.panic_threshold",
                o.panic_threshold,
                d.outlier.panic_threshold,
            ),
        };
        let b = &self.breaker;
        let breaker = BreakerPolicy {
            failure_ratio: c.ratio(
                "health.breaker.failure_ratio",
                b.failure_ratio,
                d.breaker.failure_ratio,
            ),
            min_requests: c.positive(
                "health.breaker.min_requests",
                b.min_requests,
                d.breaker.min_requests,
            ),
            window: c.dur("health.breaker.window", &b.window, d.breaker.window),
            open_for: c.dur("health.breaker.open_for", &b.open_for, d.breaker.open_for),
            half_open_successes: c.positive(
                "health.breaker.half_open_successes",
                b.half_open_successes,
                d.breaker.half_open_successes,
            ),
        };
        let f = &self.failover;
        let failover = FailoverPolicy {
            error_ratio: c.ratio(
                "health.failover.error_ratio",
                f.error_ratio,
                d.failover.error_ratio,
            ),
            window: c.dur("health.failover.window", &f.window, d.failover.window),
            min_requests: c.positive(
                "health.failover.min_requests",
                f.min_requests,
                d.failover.min_requests,
            ),
            min_dwell: c.dur(
                "health.failover.min_dwell",
                &f.min_dwell,
                d.failover.min_dwell,
            ),
            recover_probes: c.positive(
                "health.failover.recover_probes",
                f.recover_probes,
                d.failover.recover_probes,
            ),
            quorum: c.positive("health.failover.quorum", f.quorum, d.failover.quorum),
        };
        let w = &self.weight;
        let weight = WeightPolicy {
            alpha: match w.alpha {
                Some(a) if !(0.0..=10.0).contains(&a) => {
                    c.0.push(Issue {
                        path: "health.weight.alpha".into(),
                        message: format!("{a} is outside 0-10"),
                    });
                    d.weight.alpha
                }
                a => a.unwrap_or(d.weight.alpha),
            },
            beta: match w.beta {
                Some(b) if !(0.0..=10.0).contains(&b) => {
                    c.0.push(Issue {
                        path: "health.weight.beta".into(),
                        message: format!("{b} is outside 0-10"),
                    });
                    d.weight.beta
                }
                b => b.unwrap_or(d.weight.beta),
            },
            rtt_ewma: c.ratio("health.weight.rtt_ewma", w.rtt_ewma, d.weight.rtt_ewma),
        };
        let r = &self.retry;
        let statuses = r
            .statuses
            .clone()
            .unwrap_or_else(|| d.retry.statuses.clone());
        for (i, s) in statuses.iter().enumerate() {
            if !(100..=599).contains(s) {
                c.0.push(Issue {
                    path: format!("health.retry.statuses[{i}]"),
                    message: format!("{s} is not an HTTP status"),
                });
            }
        }
        if let Some(n) = r.max_attempts.filter(|&n| n > 10) {
            c.0.push(Issue {
                path: "health.retry.max_attempts".into(),
                message: format!("{n} is more than 10"),
            });
        }
        let retry = RetryPolicy {
            max_attempts: c
                .positive(
                    "health.retry.max_attempts",
                    r.max_attempts,
                    d.retry.max_attempts,
                )
                .min(10),
            statuses,
            budget_ratio: c.ratio(
                "health.retry.budget_ratio",
                r.budget_ratio,
                d.retry.budget_ratio,
            ),
            budget_min_per_sec: r.budget_min_per_sec.unwrap_or(d.retry.budget_min_per_sec),
            backoff: match &r.backoff {
                Some(s) if parse_duration(s) == Some(Duration::ZERO) => Duration::ZERO,
                _ => c.dur("health.retry.backoff", &r.backoff, d.retry.backoff),
            },
        };
        HealthPolicy {
            outlier,
            breaker,
            failover,
            probe,
            weight,
            retry,
        }
    }
}

impl SheddingCfg {
    /// Append problems to `issues`.
    pub fn check(&self, issues: &mut Vec<Issue>) {
        if self.max_in_flight == 0 {
            issues.push(Issue {
                path: "shedding.max_in_flight".into(),
                message: "must be positive".into(),
            });
        }
        for (p, v) in [
            ("shedding.standard_at", self.standard_at),
            ("shedding.best_effort_at", self.best_effort_at),
        ] {
            if !(0.0..=1.0).contains(&v) {
                issues.push(Issue {
                    path: p.into(),
                    message: format!("{v} is outside 0-1"),
                });
            }
        }
        if self.best_effort_at > self.standard_at {
            issues.push(Issue {
                path: "shedding.best_effort_at".into(),
                message: "must not exceed standard_at (best-effort is shed first)".into(),
            });
        }
    }
}
