//! A cell document as JSON (the shape a configuration store holds per cell, decoded with
//! the configuration model): never panics; a decoded cell is validated inside a minimal
//! configuration and, when valid, built into a routing table.
#![no_main]

use cellgate_config::{CellCfg, Config};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut cell) = serde_json::from_slice::<CellCfg>(data) else {
        return;
    };
    for i in &mut cell.instances {
        if i.addr.parse::<std::net::SocketAddr>().is_err() {
            i.addr = "127.0.0.1:1".into();
        }
    }
    let Ok(mut cfg) = serde_yaml::from_str::<Config>("regions: [r1]\ncells: []\n") else {
        return;
    };
    cfg.regions = vec!["r1".into(), cell.region.clone()];
    cfg.regions.dedup();
    cfg.cells = vec![cell];
    if cfg.validate().is_ok() {
        let _ = cfg.build_table(1, &cellgate_health::HealthRegistry::new());
        // What was decoded encodes again.
        let _ = serde_json::to_vec(&cfg.cells[0]);
    }
});
