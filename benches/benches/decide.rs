//! Route decision speed: key extraction + hash + override/slot lookup + cell state +
//! instance pick on 16384 slots × 1,000 cells × 1M overrides; WRR pick; table build.

use std::hint::black_box;

use cellgate_benches::big_table;
use cellgate_health::HealthRegistry;
use cellgate_routing::{RouteInput, SmoothWrr};
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Uri};

// The gateway's allocator, so the table has the memory layout it has in production.
#[global_allocator]
static GLOBAL: cellgate::alloc::Mimalloc = cellgate::alloc::Mimalloc;

fn decide(c: &mut Criterion) {
    let health = HealthRegistry::new();
    let table = big_table(1, 16384, 1000, 1_000_000, &health);
    let uri: Uri = "/api/orders?x=1".parse().expect("uri");
    let keys: Vec<HeaderMap> = (0..1024)
        .map(|i| {
            let mut h = HeaderMap::new();
            let k = if i % 10 == 0 {
                format!("ovr-{}", i * 977)
            } else {
                format!("user-{}", i * 7919)
            };
            h.insert("x-user-id", HeaderValue::from_str(&k).expect("ascii"));
            h
        })
        .collect();
    let mut wrr: Vec<SmoothWrr> = vec![SmoothWrr::default(); table.cells().len()];
    let mut i = 0usize;
    c.bench_function(
        "route decision (extract + decide + pick), 16384 slots, 1000 cells, 1M overrides",
        |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                let h = &keys[i];
                let key = table
                    .key_sources()
                    .extract(&uri, h)
                    .expect("valid")
                    .expect("present");
                let d = table
                    .decide(&RouteInput {
                        key: Some(&key),
                        now_ms: 1,
                        ..Default::default()
                    })
                    .expect("serving");
                let inst =
                    table.pick_instance(d.cell, None, &mut wrr[usize::from(d.cell)], 1, 0, None);
                black_box((d, inst))
            })
        },
    );

    let mut w = SmoothWrr::default();
    let weights = [100u32, 50, 80, 20, 100, 0, 30, 60];
    c.bench_function("smooth WRR pick over 8 instances", |b| {
        b.iter(|| black_box(w.pick(8, |i| weights[i])))
    });

    c.bench_function(
        "routing table build, 16384 slots, 1000 cells, 100k overrides",
        |b| b.iter(|| black_box(big_table(2, 16384, 1000, 100_000, &health))),
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = decide
}
criterion_main!(benches);
