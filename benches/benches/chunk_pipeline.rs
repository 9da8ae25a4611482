//! Chunk pipeline throughput on one core, against its parts alone:
//! BLAKE3, FastCDC, zstd (the store's level), and the whole
//! cut -> hash -> compress pipeline.
//!
//! Input: `XENOD_BENCH_DATA=FILE` (e.g. a tar of the minbase fixture:
//! `tar -C /var/cache/xenod-fixtures/debian/T1 -cf /tmp/t1.tar .`), first
//! 64 MiB; otherwise 64 MiB of synthetic, partly compressible bytes.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use xenod_store::{Batcher, Cdc, ChunkId, Chunking, encode};

const LEN: usize = 64 << 20;

fn data() -> Vec<u8> {
    if let Some(p) = std::env::var_os("XENOD_BENCH_DATA") {
        let mut d = std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.to_string_lossy()));
        d.truncate(LEN);
        return d;
    }
    // Words from a small vocabulary mixed with noise: compresses about 3:1.
    let words: Vec<&[u8]> = vec![b"kernel ", b"module ", b"\x00\x00\x00\x01", b"libc.so.6 ", b"/usr/lib/", b"ELF\x02 "];
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut out = Vec::with_capacity(LEN);
    while out.len() < LEN {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(4) {
            out.extend_from_slice(&x.to_le_bytes());
        } else {
            out.extend_from_slice(words[(x >> 8) as usize % words.len()]);
        }
    }
    out.truncate(LEN);
    out
}

/// Plaintext per solid block, as the store cuts them.
const BLOCK: usize = 1 << 20;

fn pipeline(c: &mut Criterion) {
    let d = data();
    let mut g = c.benchmark_group("per_core");
    g.throughput(Throughput::Bytes(d.len() as u64));
    g.sample_size(10);
    g.bench_function("blake3", |b| b.iter(|| black_box(blake3::hash(&d))));
    g.bench_function("fastcdc", |b| b.iter(|| black_box(Cdc::default().cuts(&d).len())));
    // Chunks cut by content are compressed in solid blocks of 1 MiB of
    // plaintext (store.rs), so zstd alone runs over the same blocks.
    g.bench_function("zstd", |b| {
        b.iter(|| {
            let mut n = 0;
            for block in d.chunks(BLOCK) {
                n += encode(block).1.len();
            }
            black_box(n)
        })
    });
    g.bench_function("pipeline", |b| {
        b.iter(|| {
            let mut batcher = Batcher::new(d.as_slice(), Chunking::Cdc);
            let mut block = Vec::with_capacity(2 * BLOCK);
            let mut n = 0;
            while let Some(batch) = batcher.next_batch().unwrap_or_default() {
                for chunk in batch.chunks() {
                    let id = ChunkId::of(chunk);
                    n += id.as_bytes()[0] as usize;
                    block.extend_from_slice(chunk);
                    if block.len() >= BLOCK {
                        n += encode(&block).1.len();
                        block.clear();
                    }
                }
            }
            n += encode(&block).1.len();
            black_box(n)
        })
    });
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
