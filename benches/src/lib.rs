//! Shared fixtures for cellgate's benchmarks: large routing tables built the way the gateway
//! builds them.

use std::net::SocketAddr;

use cellgate_health::HealthRegistry;
use cellgate_routing::{
    CellSpec, CellState, InstanceSpec, RoutingTable, TableBuilder, UpstreamProtocol,
};

/// A table of `slot_count` slots over `cells` cells (three instances each, two regions) with
/// `overrides` key pins (`ovr-<n>`), version `version`.
pub fn big_table(
    version: u64,
    slot_count: u32,
    cells: usize,
    overrides: usize,
    health: &HealthRegistry,
) -> RoutingTable {
    let mut b = TableBuilder::new(version, slot_count)
        .region("r0")
        .region("r1");
    for c in 0..cells {
        b = b.cell(CellSpec {
            id: format!("cell-{c}"),
            region: format!("r{}", c % 2),
            state: CellState::Active,
            weight: 100,
            failover: vec![format!("cell-{}", (c + 1) % cells)],
            instances: (0..3)
                .map(|i| InstanceSpec {
                    name: format!("cell-{c}-{i}"),
                    addr: SocketAddr::from((
                        [127, 0, (c / 250) as u8, (c % 250) as u8 + 1],
                        8000 + i as u16,
                    )),
                    weight: 100,
                    labels: Default::default(),
                })
                .collect(),
            protocol: UpstreamProtocol::Auto,
        });
    }
    for o in 0..overrides {
        b = b.override_key(format!("ovr-{o}"), format!("cell-{}", o % cells));
    }
    b.build(health).expect("benchmark table is valid")
}
