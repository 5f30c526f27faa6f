//! The `limits:`, `shutdown:`, `admin.tls` and per-cell `tls:` sections: documented
//! defaults, and every out-of-range value named by its path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cellgate_config::{Config, ConfigError};

const BASE: &str = "regions: [r1]\ncells:\n  - id: a\n    region: r1\n    instances: [ { name: a-1, addr: \"127.0.0.1:9001\" } ]\n";

fn issues(extra: &str) -> Vec<String> {
    match Config::from_yaml(&format!("{BASE}{extra}")) {
        Ok(_) => Vec::new(),
        Err(ConfigError::Invalid(is)) => is.iter().map(|i| i.to_string()).collect(),
        Err(e) => vec![e.to_string()],
    }
}

#[test]
fn defaults_are_the_documented_safe_values() {
    let c = Config::from_yaml(BASE).unwrap();
    let l = &c.limits;
    assert_eq!(l.max_header_bytes, 32 * 1024);
    assert_eq!(l.max_headers, 100);
    assert_eq!(l.max_uri_bytes, 8 * 1024);
    assert_eq!(l.max_body_bytes, 10 * 1024 * 1024);
    assert_eq!(l.header_read_duration(), Duration::from_secs(10));
    assert_eq!(l.idle_duration(), Duration::from_secs(60));
    assert_eq!(l.max_connections, 10_000);
    assert_eq!(l.h2_max_concurrent_streams, 256);
    assert_eq!(l.h2_stream_window, 1 << 20);
    assert_eq!(l.h2_connection_window, 2 << 20);
    assert_eq!(l.h2_max_pending_accept_reset_streams, 20);
    assert_eq!(l.h2_max_local_error_reset_streams, 1024);
    assert_eq!(l.upstream_idle_per_instance, 64);
    assert_eq!(c.shutdown.grace_duration(), Duration::from_secs(30));
    assert!(c.admin.tls.is_none());
    assert!(c.cells[0].tls.is_none());
}

#[test]
fn a_partial_limits_section_keeps_the_other_defaults() {
    let c = Config::from_yaml(&format!(
        "{BASE}limits: {{ max_body_bytes: 0, idle_timeout: 5m }}\nshutdown: {{ grace: 0s }}\n"
    ))
    .unwrap();
    assert_eq!(c.limits.max_body_bytes, 0, "0 means no body limit");
    assert_eq!(c.limits.upstream_idle_per_instance, 64);
    assert_eq!(c.limits.idle_duration(), Duration::from_secs(300));
    assert_eq!(c.limits.max_headers, 100);
    assert_eq!(c.shutdown.grace_duration(), Duration::ZERO);
}

#[test]
fn out_of_range_limits_are_named_by_path() {
    let got = issues(
        "limits:\n  max_header_bytes: 10\n  max_headers: 0\n  max_uri_bytes: 70000\n  max_connections: 0\n  h2_max_concurrent_streams: 0\n  h2_stream_window: 100\n  h2_connection_window: 4294967295\n  h2_max_pending_accept_reset_streams: 0\n  h2_max_local_error_reset_streams: 0\n  upstream_idle_per_instance: 100001\n  header_read_timeout: soon\n  idle_timeout: 0s\nshutdown: { grace: later }\n",
    );
    for path in [
        "limits.max_header_bytes: 10 is outside 1024-262144",
        "limits.max_headers: 0 is outside 1-1000",
        "limits.max_uri_bytes: 70000 is outside 64-65534",
        "limits.max_connections: 0",
        "limits.h2_max_concurrent_streams: 0",
        "limits.h2_stream_window: 100",
        "limits.h2_connection_window: 4294967295",
        "limits.h2_max_pending_accept_reset_streams: 0",
        "limits.h2_max_local_error_reset_streams: 0",
        "limits.upstream_idle_per_instance: 100001 is outside 0-100000",
        "limits.header_read_timeout: \"soon\"",
        "limits.idle_timeout: \"0s\"",
        "shutdown.grace: \"later\"",
    ] {
        assert!(
            got.iter().any(|g| g.starts_with(path)),
            "missing {path:?} in {got:#?}"
        );
    }
    assert_eq!(got.len(), 13, "{got:#?}");
}

#[test]
fn unknown_limit_fields_are_errors() {
    let got = issues("limits: { max_body: 5 }\n");
    assert!(got[0].contains("unknown field `max_body`"), "{got:?}");
}

#[test]
fn tls_sections_name_missing_files_and_missing_trust() {
    let got = issues(
        "admin: { tls: { cert: /nonexistent/c.pem, key: /nonexistent/k.pem, client_ca: /nonexistent/ca.pem } }\n",
    );
    for p in ["admin.tls.cert", "admin.tls.key", "admin.tls.client_ca"] {
        assert!(got.iter().any(|g| g.starts_with(p)), "{p} in {got:?}");
    }
    let cell = |tls: &str| {
        format!("regions: [r1]\ncells:\n  - id: a\n    region: r1\n    tls: {tls}\n    instances: [ {{ name: a-1, addr: \"127.0.0.1:9001\" }} ]\n")
    };
    let no_trust = match Config::from_yaml(&cell("{ server_name: a.internal }")) {
        Err(ConfigError::Invalid(is)) => is,
        other => panic!("{other:?}"),
    };
    assert_eq!(no_trust[0].path, "cells[0].tls");
    assert!(no_trust[0].message.contains("ca_file"));
    let missing = match Config::from_yaml(&cell("{ ca_file: /nonexistent/ca.pem }")) {
        Err(ConfigError::Invalid(is)) => is,
        other => panic!("{other:?}"),
    };
    assert_eq!(missing[0].path, "cells[0].tls.ca_file");
    assert!(Config::from_yaml(&cell("{ insecure_skip_verify: true }")).is_ok());
}

#[test]
fn retry_attempts_over_the_maximum_are_named_not_clamped() {
    let got = issues("health:\n  retry: { max_attempts: 50 }\n");
    assert!(
        got.iter()
            .any(|i| i == "health.retry.max_attempts: 50 is more than 10"),
        "{got:?}"
    );
    assert!(issues("health:\n  retry: { max_attempts: 10 }\n").is_empty());
}

#[test]
fn routes_are_checked_and_each_problem_named_by_its_path() {
    assert!(issues(
        "routes:\n  - { path_prefix: /api, timeout: 2s, max_timeout: 5s, slo_class: critical }\n  - { path_prefix: /bulk, adaptive_timeout: { factor: 3, min: 100ms, max: 4s } }\n"
    )
    .is_empty());
    let is = issues(
        "routes:
  - { path_prefix: api }
  - { path_prefix: /x, timeout: 20s, max_timeout: 5s }
  - { path_prefix: /x }
  - { path_prefix: /y, timeout: soon }
  - { path_prefix: /z, adaptive_timeout: { factor: 0, min: 2s, max: 1s } }
  - { path_prefix: /w, adaptive_timeout: { factor: 2, min: 1s, max: 90s } }
",
    );
    for path in [
        "routes[0].path_prefix",
        "routes[1].timeout",
        "routes[2].path_prefix",
        "routes[3].timeout",
        "routes[4].adaptive_timeout.factor",
        "routes[4].adaptive_timeout.min",
        "routes[5].adaptive_timeout.max",
    ] {
        assert!(is.iter().any(|i| i.contains(path)), "{path} not in {is:?}");
    }
    // An unknown class is a parse error that names it.
    let e = issues("routes:\n  - { path_prefix: /a, slo_class: gold }\n");
    assert!(e.iter().any(|i| i.contains("gold")), "{e:?}");
}
