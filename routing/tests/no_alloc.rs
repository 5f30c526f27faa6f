//! The route decision makes no heap allocation: key extraction from a header, hash, override
//! and slot lookup, cell state and failover walk, and the instance pick, counted by a global
//! allocator that records every allocation on this test's thread.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;

use cellgate_health::HealthRegistry;
use cellgate_routing::{
    CellSpec, CellState, InstanceSpec, RouteInput, SmoothWrr, TableBuilder, UpstreamProtocol,
};
use http::{HeaderMap, HeaderValue, Uri};

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: every call is forwarded to the system allocator unchanged; the counters are
// thread-local cells touched only on this thread.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCS.with(|a| a.set(a.get() + 1));
        }
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` was allocated by `System` with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCS.with(|a| a.set(a.get() + 1));
        }
        // SAFETY: `p` was allocated by `System` with layout `l`.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_route_decision_allocates_nothing() {
    let health = HealthRegistry::new();
    let mut b = TableBuilder::new(1, 16384).region("r0").region("r1");
    let cells = 1000;
    for c in 0..cells {
        b = b.cell(CellSpec {
            id: format!("cell-{c}"),
            region: format!("r{}", c % 2),
            // Every tenth cell drains, so the failover walk is exercised too.
            state: if c % 10 == 0 {
                CellState::Draining
            } else {
                CellState::Active
            },
            weight: 100,
            failover: vec![format!("cell-{}", (c + 1) % cells)],
            instances: (0..3)
                .map(|i| InstanceSpec {
                    name: format!("i{i}"),
                    addr: SocketAddr::from(([127, 0, 0, 1], 9000 + i)),
                    weight: 100,
                    labels: Default::default(),
                })
                .collect(),
            protocol: UpstreamProtocol::Auto,
            balance: Default::default(),
        });
    }
    for o in 0..100_000 {
        b = b.override_key(format!("ovr-{o}"), format!("cell-{}", o % cells));
    }
    let table = b.build(&health).unwrap();
    let uri: Uri = "/api/orders?id=7".parse().unwrap();
    let headers: Vec<HeaderMap> = (0..2048)
        .map(|i| {
            let mut h = HeaderMap::new();
            let k = if i % 4 == 0 {
                format!("ovr-{}", i * 31)
            } else {
                format!("user-{i}")
            };
            h.insert("x-user-id", HeaderValue::from_str(&k).unwrap());
            h
        })
        .collect();
    let mut wrr: Vec<SmoothWrr> = vec![SmoothWrr::default(); table.cells().len()];
    let mut decide = |h: &HeaderMap| {
        let key = table.key_sources().extract(&uri, h).unwrap().unwrap();
        let d = table
            .decide(&RouteInput {
                key: Some(&key),
                now_ms: 1,
                ..Default::default()
            })
            .unwrap();
        let i = table
            .pick_instance(d.cell, None, &mut wrr[usize::from(d.cell)], 1, 0, None)
            .unwrap();
        (d.cell, i)
    };
    // Warm up: each cell's WRR state sizes itself on first use.
    for h in &headers {
        decide(h);
    }
    COUNTING.with(|c| c.set(true));
    let mut checksum = 0usize;
    for _ in 0..5 {
        for h in &headers {
            let (c, i) = decide(h);
            checksum = checksum.wrapping_add(usize::from(c) + i);
        }
    }
    COUNTING.with(|c| c.set(false));
    assert_ne!(checksum, 0);
    assert_eq!(
        ALLOCS.with(Cell::get),
        0,
        "allocations during 10,240 route decisions"
    );
}
