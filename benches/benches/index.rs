//! Index lookups at millions of chunks: `Store::contains` for present and
//! absent ids once the store holds `XENOD_BENCH_CHUNKS` (default 2 million)
//! chunks. Setup writes them all (tiny chunks) into a temporary store.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use xenod_store::{ChunkId, Store};

fn index(c: &mut Criterion) {
    let n: u64 = std::env::var("XENOD_BENCH_CHUNKS").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000_000);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let started = std::time::Instant::now();
    for i in 0..n {
        store.put(&i.to_le_bytes()).unwrap();
    }
    store.flush().unwrap();
    eprintln!("stored {n} chunks in {:.1} s", started.elapsed().as_secs_f64());
    let mut g = c.benchmark_group(format!("index_{n}"));
    let mut i = 0u64;
    g.bench_function("contains_hit", |b| {
        b.iter(|| {
            i = (i + 7919) % n;
            black_box(store.contains(&ChunkId::of(&i.to_le_bytes())).unwrap())
        })
    });
    g.bench_function("contains_miss", |b| {
        b.iter(|| {
            i += 1;
            black_box(store.contains(&ChunkId::of(&(i + n).to_le_bytes())).unwrap())
        })
    });
    g.bench_function("get_hit", |b| {
        b.iter(|| {
            i = (i + 7919) % n;
            black_box(store.get(&ChunkId::of(&i.to_le_bytes())).unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, index);
criterion_main!(benches);
