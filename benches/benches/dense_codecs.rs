//! The codecs of dense solid frames (what `migrate` pre-copy sends) on one
//! core, over 1 MiB frames as a provider packs them: zstd 9, zstd 16 (the
//! short search), and PPMd behind its zstd-1 probe. Sizes are printed
//! once per codec; criterion times them.
//!
//! Input: `XENOD_BENCH_DATA=FILE` (e.g. the migration benchmark's log, or
//! a kernel), first 32 MiB; otherwise 32 MiB of a synthetic web log.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use xenod_store::{Dense, dense_frame};

const LEN: usize = 32 << 20;
const FRAME: usize = 1 << 20;

fn data() -> Vec<u8> {
    match std::env::var_os("XENOD_BENCH_DATA") {
        Some(p) => {
            let mut d = std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.to_string_lossy()));
            d.truncate(LEN);
            d
        }
        None => xenod_store::testing::log_text(LEN, 7),
    }
}

fn packed(d: &[u8], codec: Dense) -> usize {
    d.chunks(FRAME).map(|f| dense_frame(f, codec).map_or(f.len(), |(_, z)| z.len())).sum()
}

fn codecs(c: &mut Criterion) {
    let d = data();
    let mut g = c.benchmark_group("dense_frames");
    g.throughput(Throughput::Bytes(d.len() as u64));
    g.sample_size(10);
    for (name, codec) in [("zstd9", Dense::Zstd(9)), ("zstd16", Dense::Zstd(16)), ("ppmd", Dense::Ppmd)] {
        eprintln!("{name}: {} bytes of {} in 1 MiB frames", packed(&d, codec), d.len());
        g.bench_function(name, |b| b.iter(|| black_box(packed(&d, codec))));
    }
    g.finish();
}

criterion_group!(benches, codecs);
criterion_main!(benches);
