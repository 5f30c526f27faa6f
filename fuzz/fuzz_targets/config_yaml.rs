//! The YAML configuration loader and validator on any text: never panics; a configuration
//! that validates also builds a routing table or says why not (no panic either way).
//!
//! Instance addresses that are not literal `ip:port` are replaced before validation, so the
//! fuzzer never makes DNS queries.
#![no_main]

use cellgate_config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The whole loader as `cellgate validate` runs it.
    let direct: Result<Config, _> = serde_yaml::from_str(text);
    let Ok(mut cfg) = direct else {
        return;
    };
    for c in &mut cfg.cells {
        for i in &mut c.instances {
            if i.addr.parse::<std::net::SocketAddr>().is_err() {
                i.addr = "127.0.0.1:1".into();
            }
        }
    }
    if cfg.validate().is_ok() {
        let _ = cfg.build_table(1, &cellgate_health::HealthRegistry::new());
        let _ = cfg.limits.header_read_duration();
        let _ = cfg.limits.idle_duration();
        let _ = cfg.shutdown.grace_duration();
        let _ = cfg.timeouts();
    }
});
