//! Active probes: the [`Probe`] trait, the TCP connect probe, and the per-cell driver loop
//! that probes every instance at the configured interval with jitter and records verdicts
//! (with rise/fall hysteresis) in the instances' health. The HTTP business probe lives in the
//! gateway (this crate has no HTTP engine). The driver stops when its cell disappears or on
//! shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

/// What one probe of one instance found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProbeResult {
    /// The instance is up.
    pub up: bool,
    /// How long the probe took.
    pub rtt: Option<Duration>,
    /// Watermark values reported by the instance.
    pub watermarks: Vec<(String, f64)>,
}

/// A way to check an instance.
pub trait Probe: Send + Sync {
    /// Probe the instance `addr` of cell `cell` within `timeout`.
    fn check<'a>(
        &'a self,
        cell: &'a str,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = ProbeResult> + Send + 'a>>;
}

/// L4 probe: the instance is up when a TCP connection opens within the timeout.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpProbe;

impl Probe for TcpProbe {
    fn check<'a>(
        &'a self,
        _cell: &'a str,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = ProbeResult> + Send + 'a>> {
        Box::pin(async move {
            let start = Instant::now();
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_)) => ProbeResult {
                    up: true,
                    rtt: Some(start.elapsed()),
                    watermarks: Vec::new(),
                },
                _ => ProbeResult::default(),
            }
        })
    }
}

/// The delay before the next round: the interval plus up to `jitter` × interval.
pub fn next_delay(interval: Duration, jitter: f64, rand01: f64) -> Duration {
    interval.mul_f64(1.0 + jitter.clamp(0.0, 1.0) * rand01.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_probe_sees_listeners_and_refusals() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let r = TcpProbe.check("c", addr, Duration::from_secs(1)).await;
        assert!(r.up && r.rtt.is_some());
        drop(l);
        let r = TcpProbe.check("c", addr, Duration::from_secs(1)).await;
        assert!(!r.up);
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let i = Duration::from_secs(5);
        assert_eq!(next_delay(i, 0.1, 0.0), i);
        assert_eq!(next_delay(i, 0.1, 1.0), Duration::from_millis(5_500));
    }
}
