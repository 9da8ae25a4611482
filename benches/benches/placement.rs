//! Placement decisions a second over simulated host advertisements:
//! 1,000 and 10,000 hosts, each holding 100 of 1,000 layers, in ten zones,
//! with free memory between 0.5 and 64 GiB. A decision is one call of
//! `xenod_host::place::place` for a two-layer stack (the filters, then the
//! weights of every host): `auto`, with a `--place` expression, and three
//! replicas spread over zones. One thread, as criterion runs it.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use xenod_host::filter;
use xenod_host::place::{Ask, Candidate, place};
use xenod_peer::HostAttrs;
use xenod_store::LayerId;

/// A small deterministic generator (xorshift), so every run weighs the same hosts.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn layer(i: u64) -> LayerId {
    LayerId::from_bytes(*blake3::hash(&i.to_le_bytes()).as_bytes())
}

fn hosts(n: usize) -> Vec<Candidate> {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    (0..n)
        .map(|i| {
            let mem_total = 64u64 << 30;
            let attrs = HostAttrs {
                hv: vec!["qemu".into(), "kvm".into()],
                vcpus: 4 + (r.next() % 60) as u32,
                mem_total,
                mem_free: (512 << 20) + r.next() % (mem_total - (512 << 20)),
                disk_free: 1 << 40,
                load: (r.next() % 400) as f32 / 100.0,
                labels: [("zone".to_string(), format!("z{}", r.next() % 10)), ("rack".to_string(), format!("r{i}"))]
                    .into(),
            };
            let layers = (0..100).map(|_| layer(r.next() % 1000)).collect();
            Candidate::new(format!("{:064x}", r.next() as u128 * 0x1_0000_0001), attrs, layers, i == 0)
        })
        .collect()
}

fn placement(c: &mut Criterion) {
    let stack = vec![(layer(7), 35 << 20), (layer(3), 160 << 20)];
    let ask = Ask { mem: 1 << 30, vcpus: 2, hv: Some("kvm".into()), stack, replicas: 1, ..Ask::default() };
    let expr = filter::parse("mem_free>=4G && label.zone!=z3 && hv=kvm").unwrap();
    let mut spread = ask.clone();
    (spread.replicas, spread.spread) = (3, Some("zone".into()));
    for n in [1_000, 10_000] {
        let hs = hosts(n);
        let mut g = c.benchmark_group(format!("place_{n}_hosts"));
        g.throughput(Throughput::Elements(1));
        g.bench_function("auto", |b| b.iter(|| black_box(place(&hs, &ask, None).unwrap())));
        g.bench_function("expr", |b| b.iter(|| black_box(place(&hs, &ask, Some(&expr)).unwrap())));
        g.bench_function("spread_3", |b| b.iter(|| black_box(place(&hs, &spread, None).unwrap())));
        g.finish();
    }
}

criterion_group!(benches, placement);
criterion_main!(benches);
