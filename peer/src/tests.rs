//! Two to three nodes in one process on loopback: the fetch engine's
//! behaviour with good, absent, corrupt, slow and vanished providers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use xenod_store::{Chunking, Entry, Extent, Kind, LayerWriter, Timestamp};

use super::*;

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Half the bytes compressible, so both encodings travel.
        out.extend_from_slice(&(x & 0x0f0f_0f0f_0f0f_0f0f).to_le_bytes());
    }
    out.truncate(n);
    out
}

fn entry(path: &str, kind: Kind) -> Entry {
    Entry {
        path: path.as_bytes().to_vec(),
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: Timestamp::default(),
        xattrs: vec![],
    }
}

/// A layer of `files` files of `chunks` 64 KiB chunks each, on `base`.
/// Even seeds store their chunks in solid blocks, odd ones alone, so a
/// stack of both travels in solid frames and single frames.
fn make_layer(store: &Store, seed: u64, files: usize, chunks: usize, base: Option<LayerId>) -> LayerId {
    let mut w = LayerWriter::new(store);
    w.push(&entry("", Kind::Dir { opaque: false })).unwrap();
    for f in 0..files {
        let mut extents = Vec::new();
        for c in 0..chunks {
            let data = noise(65536, seed * 1_000_000 + (f * chunks + c) as u64);
            let (id, _) = if seed.is_multiple_of(2) { store.put_solid(&data) } else { store.put(&data) }.unwrap();
            extents.push(Extent::Data { id, len: data.len() as u32 });
        }
        let size = (chunks * 65536) as u64;
        w.push(&entry(&format!("f{f:04}"), Kind::File { size, chunking: Chunking::Fixed, extents })).unwrap();
    }
    w.finish(base, BTreeMap::new()).unwrap()
}

struct Host {
    _dir: tempfile::TempDir,
    node: Node,
}

async fn host(m: Misbehave) -> Host {
    host_in(tempfile::tempdir().unwrap(), m).await
}

/// A host whose store is `dir`.
async fn host_in(dir: tempfile::TempDir, m: Misbehave) -> Host {
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let mut secret = [0u8; 32];
    rustix::rand::getrandom(&mut secret, rustix::rand::GetRandomFlags::empty()).unwrap();
    let opts = NodeOptions {
        secret_key: secret,
        bind: "127.0.0.1:0".parse().unwrap(),
        relay: Relay::Disabled,
        misbehave: m,
        pulls: Default::default(),
        trust: Default::default(),
    };
    let node = Node::spawn(store, Arc::new(Stats::default()), opts).await.unwrap();
    Host { _dir: dir, node }
}

/// Publishes the same two-layer stack on every host in `hosts`.
fn publish(hosts: &[&Host]) -> LayerId {
    let mut top = None;
    for h in hosts {
        let s = h.node.store();
        let base = make_layer(s, 1, 6, 16, None);
        let t = make_layer(s, 2, 2, 8, Some(base));
        assert!(top.is_none() || top == Some(t));
        top = Some(t);
    }
    top.unwrap()
}

/// Every chunk of the stack is readable and verifies.
fn complete(store: &Store, top: LayerId) {
    let stack = store.stack(&top).unwrap();
    assert_eq!(stack.len(), 2);
    let (m, _) = missing_manifest_chunks(store, &stack).unwrap();
    let (d, local) = missing_data_chunks(store, &stack).unwrap();
    assert!(m.is_empty() && d.is_empty(), "missing {} manifest, {} data chunks", m.len(), d.len());
    assert_eq!(local, 6 * 16 + 2 * 8);
    for l in &stack {
        for e in store.read_layer(l).unwrap() {
            if let Kind::File { extents, .. } = e.unwrap().kind {
                for x in extents {
                    if let Extent::Data { id, .. } = x {
                        store.get(&id).unwrap();
                    }
                }
            }
        }
    }
}

/// How the data chunks of `top`'s stack are kept, counted by (in the top
/// layer, encoding).
fn encodings(store: &Store, top: LayerId) -> std::collections::HashMap<(bool, xenod_store::Encoding), usize> {
    let mut out = std::collections::HashMap::new();
    for l in store.stack(&top).unwrap() {
        for e in store.read_layer(&l).unwrap() {
            if let Kind::File { extents, .. } = e.unwrap().kind {
                for x in extents {
                    if let Extent::Data { id, .. } = x {
                        *out.entry((l == top, store.locate(&id).unwrap().unwrap().encoding)).or_insert(0) += 1;
                    }
                }
            }
        }
    }
    out
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn small_batches() -> FetchOptions {
    FetchOptions { batch: 4, lanes: 2, read_timeout: Duration::from_secs(5), ..Default::default() }
}

#[test]
fn two_providers_share_the_work_and_a_refetch_asks_nothing() {
    rt().block_on(async {
        let (a, b, c) =
            (host(Misbehave::default()).await, host(Misbehave::default()).await, host(Misbehave::default()).await);
        let top = publish(&[&a, &b]);
        let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let calls2 = calls.clone();
        let mut opts = small_batches();
        opts.progress = Some(Arc::new(move |_p: &FetchProgress| {
            calls2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }));
        let rep = c.node.fetch(top, &[a.node.addr(), b.node.addr()], opts).await.unwrap();
        complete(c.node.store(), top);
        assert_eq!(rep.stack.len(), 2);
        assert_eq!(rep.chunks_local, 0);
        assert!(rep.providers.iter().all(|p| p.chunks > 0 && p.dropped.is_none()), "{rep:#?}");
        assert!(calls.load(std::sync::atomic::Ordering::Relaxed) > 0);
        assert!(rep.wire_bytes < rep.bytes, "chunks travel compressed: {rep:?}");
        // The solid layer's chunks arrived in solid frames and are kept as
        // the blocks they came in; the other layer's chunks stay single.
        let encodings = encodings(c.node.store(), top);
        assert_eq!(encodings.get(&(true, xenod_store::Encoding::Block)), Some(&16), "{encodings:?}");
        assert_eq!(encodings.get(&(false, xenod_store::Encoding::Block)), None, "{encodings:?}");

        // Resumable: nothing is asked for again, even with no provider up.
        let gone = a.node.addr();
        a.node.shutdown().await;
        b.node.shutdown().await;
        let own = c.node.addr(); // our own address is skipped
        let rep = c.node.fetch(top, std::slice::from_ref(&own), small_batches()).await.unwrap();
        assert_eq!(rep.chunks_fetched, 0);
        assert!(rep.chunks_local > 0);
        // Held whole but without a prefetch order: the providers are asked
        // for one (this one is gone, which fails nothing).
        let rep = c.node.fetch(top, &[own.clone(), gone.clone()], small_batches()).await.unwrap();
        assert_eq!((rep.chunks_fetched, rep.providers.len()), (0, 1), "{rep:#?}");
        // With an order too, nothing is left to ask: no connection at all.
        let s = c.node.store();
        let some = *s.stack_data_chunks(&top).unwrap().iter().next().unwrap();
        s.put_order(&xenod_store::Order::new(top, [some])).unwrap();
        let rep = c.node.fetch(top, &[own, gone], small_batches()).await.unwrap();
        assert_eq!(rep.chunks_fetched, 0);
        assert!(rep.providers.is_empty(), "a provider was contacted: {rep:#?}");
        assert_eq!(rep.stack.len(), 2);
    });
}

#[test]
fn a_full_disk_ends_the_fetch_with_its_error_and_blames_no_provider() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("\n*** SKIPPING a_full_disk_ends_the_fetch...: needs root to mount a small tmpfs ***\n");
        return;
    }
    rt().block_on(async {
        let (a, b) = (host(Misbehave::default()).await, host(Misbehave::default()).await);
        let top = publish(&[&a, &b]);
        // About half of the stack fits.
        let small = tempfile::tempdir().unwrap();
        let disk = xenod_store::testing::Tmpfs::mount(small.path(), "2m");
        let dir = tempfile::tempdir_in(small.path()).unwrap();
        let c = host_in(dir, Misbehave::default()).await;
        let err = c.node.fetch(top, &[a.node.addr(), b.node.addr()], small_batches()).await.unwrap_err();
        assert!(matches!(err, PeerError::Store(_)), "not the store's error: {err}");
        assert!(xenod_store::testing::says_disk_full(&err), "the error does not carry ENOSPC: {err:?}");
        let snap = c.node.stats().snapshot();
        assert_eq!((snap.totals.peers_dropped, snap.totals.protocol_errors), (0, 0), "{snap:#?}");
        assert!(snap.totals.chunks_received > 0, "the disk filled before anything arrived: {snap:#?}");
        // Every chunk the index holds reads back and verifies: nothing
        // points into the pack that could not be written.
        let s = c.node.store();
        for id in xenod_store::testing::indexed_chunks(s).unwrap() {
            s.get(&id).unwrap();
        }
        // With room again, the same fetch completes from where it stopped.
        disk.resize("64m");
        c.node.fetch(top, &[a.node.addr(), b.node.addr()], small_batches()).await.unwrap();
        complete(c.node.store(), top);
    });
}

#[test]
fn a_refused_request_is_reported_with_the_providers_reason() {
    rt().block_on(async {
        let (a, c) = (host(Misbehave::default()).await, host(Misbehave::default()).await);
        let top = publish(&[&a]);
        let level = MAX_DENSE_LEVEL + 1;
        let opts = FetchOptions { dense: Some(xenod_store::Dense::Zstd(level)), ..small_batches() };
        let e = c.node.fetch(top, &[a.node.addr()], opts).await.unwrap_err().to_string();
        assert!(e.contains(&format!("refused the request: dense level {level} is outside 1..=")), "{e}");
        // The provider counts the bad request against the fetcher, which
        // does not count the refusal as the provider breaking the protocol.
        let c_id = c.node.addr().id.to_string();
        assert_eq!(a.node.stats().snapshot().peers[&c_id].protocol_errors, 1);
        assert_eq!(c.node.stats().snapshot().totals.protocol_errors, 0);
    });
}

#[test]
fn dense_fetch_sends_single_chunks_in_solid_frames_too() {
    rt().block_on(async {
        let (a, c) = (host(Misbehave::default()).await, host(Misbehave::default()).await);
        let top = publish(&[&a]);
        let opts = FetchOptions { dense: Some(xenod_store::Dense::Zstd(9)), ..small_batches() };
        let rep = c.node.fetch(top, &[a.node.addr()], opts).await.unwrap();
        complete(c.node.store(), top);
        assert!(rep.chunks_fetched > 6 * 16 + 2 * 8, "data and manifest chunks: {rep:?}");
        // Both layers' chunks, kept singly on the provider or not, came in
        // solid frames and are kept as the blocks they came in.
        let encodings = encodings(c.node.store(), top);
        assert!(encodings.keys().all(|(_, e)| *e == xenod_store::Encoding::Block), "{encodings:?}");
    });
}

#[test]
fn ppmd_dense_fetch_sends_text_in_fewer_bytes_and_keeps_zstd_blocks() {
    rt().block_on(async {
        let a = host(Misbehave::default()).await;
        let (c, d) = (host(Misbehave::default()).await, host(Misbehave::default()).await);
        // Log files kept chunk by chunk, so the dense path packs them.
        let s = a.node.store();
        let mut w = LayerWriter::new(s);
        w.push(&entry("", Kind::Dir { opaque: false })).unwrap();
        let mut ids = Vec::new();
        for f in 0..3u64 {
            let mut extents = Vec::new();
            for i in 0..12 {
                let (id, _) = s.put(&xenod_store::testing::log_text(65536, f * 100 + i)).unwrap();
                extents.push(Extent::Data { id, len: 65536 });
                ids.push(id);
            }
            let kind = Kind::File { size: 12 * 65536, chunking: Chunking::Fixed, extents };
            w.push(&entry(&format!("access-{f}.log"), kind)).unwrap();
        }
        let top = w.finish(None, BTreeMap::new()).unwrap();
        let dense = |codec| FetchOptions { dense: Some(codec), ..small_batches() };
        let ppmd = c.node.fetch(top, &[a.node.addr()], dense(xenod_store::Dense::Ppmd)).await.unwrap();
        let zstd = d.node.fetch(top, &[a.node.addr()], dense(xenod_store::Dense::Zstd(MAX_DENSE_LEVEL))).await.unwrap();
        assert_eq!(ppmd.chunks_fetched, zstd.chunks_fetched);
        assert!(ppmd.wire_bytes < zstd.wire_bytes * 9 / 10, "PPMd {ppmd:?} against zstd 16 {zstd:?}");
        let kept = c.node.store();
        assert!(kept.verify().unwrap().is_clean());
        let mut blocks = 0;
        for id in &ids {
            assert_eq!(kept.get(id).unwrap(), s.get(id).unwrap());
            if let Some((_, block)) = kept.whole_block(id).unwrap() {
                blocks += 1;
                assert!(!xenod_store::testing::block_is_ppmd(&block), "a PPMd frame kept at rest");
            }
        }
        assert!(blocks > 0, "the chunks are kept in solid blocks");
    });
}

/// A one-file layer of `n` chunks of `len` bytes in solid blocks made at
/// `level`, put in the reverse of the order the file lists them (as
/// parallel import may); returns it and the chunk ids in file order.
fn layer_of_blocks(s: &Store, n: usize, len: usize, level: i32) -> (LayerId, Vec<ChunkId>) {
    let data: Vec<Vec<u8>> = (0..n).map(|i| noise(len, 7_000_000 + i as u64)).collect();
    let mut ids = vec![None; n];
    for i in (0..n).rev() {
        ids[i] = Some(s.put_solid_at(&data[i], level).unwrap().0);
    }
    s.flush().unwrap();
    let ids: Vec<ChunkId> = ids.into_iter().map(Option::unwrap).collect();
    let mut w = LayerWriter::new(s);
    w.push(&entry("", Kind::Dir { opaque: false })).unwrap();
    let extents = ids.iter().map(|id| Extent::Data { id: *id, len: len as u32 }).collect();
    let size = (n * len) as u64;
    w.push(&entry("f", Kind::File { size, chunking: Chunking::Cdc, extents })).unwrap();
    (w.finish(None, BTreeMap::new()).unwrap(), ids)
}

/// Fetches `top` from `a` to `c` in batches of 4 ids; returns how many
/// of `a`'s blocks arrived byte for byte as `a` keeps them, of how many.
async fn blocks_kept_as_sent(a: &Host, c: &Host, top: LayerId, ids: &[ChunkId]) -> (usize, usize) {
    c.node.fetch(top, &[a.node.addr()], small_batches()).await.unwrap();
    let (mut same, mut blocks) = (0, 0);
    for id in ids {
        if let Some((members, kept)) = a.node.store().whole_block(id).unwrap() {
            blocks += 1;
            if c.node.store().whole_block(id).unwrap().is_some_and(|(m, got)| m == members && got == kept) {
                same += 1;
            }
        }
    }
    assert_eq!(c.node.stats().snapshot().totals.bad_chunks, 0);
    (same, blocks)
}

#[test]
fn blocks_made_at_a_high_level_travel_as_they_are_kept() {
    rt().block_on(async {
        let (a, c) = (host(Misbehave::default()).await, host(Misbehave::default()).await);
        // 1 MiB blocks of 16 chunks at 19; the fetch asks in batches of 4
        // ids, yet for whole blocks, in their order.
        let (top, ids) = layer_of_blocks(a.node.store(), 40, 65536, 19);
        assert_eq!(blocks_kept_as_sent(&a, &c, top, &ids).await, (3, 3));
    });
}

#[test]
fn layout_of_many_chunks_is_asked_in_pieces_and_blocks_still_travel_whole() {
    rt().block_on(async {
        let (a, c) = (host(Misbehave::default()).await, host(Misbehave::default()).await);
        // More ids than one layout request takes; blocks of 512 members
        // made at the store's own level travel as kept too.
        let n = super::protocol::MAX_LAYOUT + 1000;
        let (top, ids) = layer_of_blocks(a.node.store(), n, 2048, 0);
        let (same, blocks) = blocks_kept_as_sent(&a, &c, top, &ids).await;
        assert_eq!(blocks, n.div_ceil(512));
        assert_eq!(same, blocks);
    });
}

#[test]
fn corrupt_chunk_is_refused_and_fetched_from_another() {
    rt().block_on(async {
        let bad = host(Misbehave { corrupt_chunks: 1, ..Default::default() }).await;
        let (good, c) = (host(Misbehave::default()).await, host(Misbehave::default()).await);
        let top = publish(&[&bad, &good]);
        let rep = c.node.fetch(top, &[bad.node.addr(), good.node.addr()], small_batches()).await.unwrap();
        complete(c.node.store(), top);
        let r = &rep.providers[0];
        assert_eq!(r.bad_chunks, 1, "{rep:#?}");
        assert!(r.dropped.as_deref().unwrap_or("").contains("does not verify"), "{rep:#?}");
        let snap = c.node.stats().snapshot();
        assert_eq!(snap.totals.bad_chunks, 1);
        assert_eq!(snap.peers[&bad.node.id().to_string()].bad_chunks, 1);

        // Alone, the corrupting provider makes the fetch fail, storing nothing bad.
        let bad2 = host(Misbehave { corrupt_chunks: 1000, ..Default::default() }).await;
        let d = host(Misbehave::default()).await;
        let top2 = make_layer(bad2.node.store(), 9, 1, 4, None);
        let e = d.node.fetch(top2, &[bad2.node.addr()], small_batches()).await.unwrap_err();
        assert!(e.to_string().contains("does not verify"), "{e}");
        assert!(!d.node.store().contains(&top2).unwrap());
    });
}

#[test]
fn corrupt_solid_frame_is_refused_and_its_chunks_fetched_from_another() {
    rt().block_on(async {
        let bad = host(Misbehave { corrupt_chunks: 1, ..Default::default() }).await;
        let (good, c) = (host(Misbehave::default()).await, host(Misbehave::default()).await);
        let mut top = None;
        for h in [&bad, &good] {
            top = Some(make_layer(h.node.store(), 4, 3, 8, None));
        }
        let top = top.unwrap();
        // Manifests first from the good host, so the bad one's first answer
        // is a solid frame of data chunks.
        let manifests = FetchOptions { manifests_only: true, ..small_batches() };
        c.node.fetch(top, &[good.node.addr()], manifests).await.unwrap();
        let partial =
            |n: &Node| n.store().layers().unwrap().into_iter().find(|(id, _)| *id == top).map(|(_, i)| i.partial);
        assert_eq!(partial(&c.node), Some(true), "manifests only: listed, but not announced as held");
        let rep = c.node.fetch(top, &[bad.node.addr(), good.node.addr()], small_batches()).await.unwrap();
        assert_eq!(rep.providers[0].bad_chunks, 1, "{rep:#?}");
        assert!(rep.providers[0].dropped.as_deref().unwrap_or("").contains("does not verify"), "{rep:#?}");
        let report = c.node.store().verify().unwrap();
        assert!(report.is_clean(), "{report:#?}");
        assert_eq!(c.node.store().stack(&top).unwrap().len(), 1);
        let (missing, local) = missing_data_chunks(c.node.store(), &[top]).unwrap();
        assert!(missing.is_empty() && local == 24, "{} missing", missing.len());
        assert_eq!(partial(&c.node), Some(false), "the whole fetch completes the layer");
    });
}

#[test]
fn slow_provider_does_not_hold_the_transfer() {
    rt().block_on(async {
        let slow = host(Misbehave { delay_per_chunk: Duration::from_millis(300), ..Default::default() }).await;
        let (fast, c) = (host(Misbehave::default()).await, host(Misbehave::default()).await);
        let top = publish(&[&slow, &fast]);
        let t = std::time::Instant::now();
        let rep = c.node.fetch(top, &[slow.node.addr(), fast.node.addr()], small_batches()).await.unwrap();
        complete(c.node.store(), top);
        // 114 chunks at 300 ms each would take 30 s from the slow one alone.
        assert!(t.elapsed() < Duration::from_secs(8), "took {:?}: {rep:#?}", t.elapsed());
        assert!(rep.providers[1].chunks > rep.providers[0].chunks * 4, "{rep:#?}");
    });
}

#[test]
fn provider_lacking_chunks_and_vanished_provider() {
    rt().block_on(async {
        let (empty, full, c) =
            (host(Misbehave::default()).await, host(Misbehave::default()).await, host(Misbehave::default()).await);
        let top = publish(&[&full]);
        // A provider that has nothing, and an address where nobody listens.
        let gone = {
            let h = host(Misbehave::default()).await;
            let a = h.node.addr();
            h.node.shutdown().await;
            a
        };
        let rep = c.node.fetch(top, &[empty.node.addr(), gone, full.node.addr()], small_batches()).await.unwrap();
        complete(c.node.store(), top);
        assert_eq!(rep.providers[0].chunks, 0);
        assert!(rep.providers[1].dropped.is_some(), "{rep:#?}");

        // Nobody has it: a clear error, not a hang.
        let d = host(Misbehave::default()).await;
        let e = d.node.fetch(ChunkId::of(b"nothing"), &[empty.node.addr()], small_batches()).await.unwrap_err();
        assert!(matches!(e, PeerError::Unavailable { .. }), "{e}");
    });
}

#[test]
fn names_are_verified_before_they_are_kept() {
    rt().block_on(async {
        let (a, forger, c) = (
            host(Misbehave::default()).await,
            host(Misbehave { forge_names: true, ..Default::default() }).await,
            host(Misbehave::default()).await,
        );
        let key = xenod_store::generate_key().unwrap();
        let mut trusted = xenod_store::Trust::default();
        trusted.allow(key.verifying_key(), "t").unwrap();
        let id = ChunkId::of(b"layer");
        for h in [&a, &forger] {
            h.node.store().set_name(&NameRecord::sign(&key, "template://t/os/1", id, 1).unwrap(), &trusted).unwrap();
        }
        // Untrusted: c trusts another key (and trusts nothing at first).
        let mut other = xenod_store::Trust::default();
        other.allow(xenod_store::generate_key().unwrap().verifying_key(), "*").unwrap();
        c.node.names().set_trust(other);
        let rep = c.node.fetch_names(&a.node.addr()).await.unwrap();
        assert!(rep.accepted.is_empty() && rep.refused[0].1.contains("not trusted"), "{rep:?}");
        // Asked again: refused again, but counted once.
        let rep = c.node.fetch_names(&a.node.addr()).await.unwrap();
        assert_eq!(rep.refused.len(), 1, "{rep:?}");
        assert_eq!(c.node.stats().snapshot().totals.names_refused, 1);
        // Forged: bad signature, refused whatever the trust.
        c.node.names().set_trust(trusted.clone());
        assert_eq!(
            c.node.store().name("template://t/os/1").unwrap().map(|r| r.id),
            Some(id),
            "trusting the key accepted the held refusal at once"
        );
        let rep = c.node.fetch_names(&forger.node.addr()).await.unwrap();
        assert!(rep.accepted.is_empty() && rep.refused[0].1.contains("bad signature"), "{rep:?}");
        assert_eq!(c.node.stats().snapshot().totals.names_refused, 2);
        // Genuine and trusted, held already.
        let rep = c.node.fetch_names(&a.node.addr()).await.unwrap();
        assert_eq!(rep.unchanged, 1, "{rep:?}");
        assert_eq!(c.node.store().resolve("template://t/os/1").unwrap(), id);
    });
}

#[test]
fn on_manifests_reports_a_mountable_stack_and_the_fetch_goes_on() {
    rt().block_on(async {
        let (a, c) = (host(Misbehave::default()).await, host(Misbehave::default()).await);
        let top = publish(&[&a]);
        let stack = a.node.store().stack(&top).unwrap();
        let (_, data_chunks) = missing_data_chunks(a.node.store(), &stack).unwrap();
        // Per call: the report, each layer's `partial`, data chunks missing.
        type Seen = Vec<(FetchReport, Vec<Option<bool>>, usize)>;
        let seen: Arc<std::sync::Mutex<Seen>> = Arc::default();
        let (s, store, st) = (seen.clone(), c.node.store().clone(), stack.clone());
        let on_manifests: ManifestsFn = Arc::new(move |rep: &FetchReport| {
            // What a mount of the stack finds at this moment.
            let layers = store.layers().unwrap();
            let partial = st.iter().map(|l| layers.iter().find(|(id, _)| id == l).map(|(_, i)| i.partial)).collect();
            let (missing, _) = missing_data_chunks(&store, &st).unwrap();
            s.lock().unwrap().push((rep.clone(), partial, missing.len()));
        });
        let opts = FetchOptions { on_manifests: Some(on_manifests), ..small_batches() };
        let rep = c.node.fetch(top, &[a.node.addr()], opts).await.unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "called once");
        let (early, partial, missing) = &seen[0];
        assert_eq!(early.stack, rep.stack);
        assert_eq!(*partial, vec![Some(true); 2], "the stack is recorded, as partial, before its data");
        assert_eq!(*missing as u64, data_chunks, "no data chunk yet: the callback comes before the data round");
        assert!(early.chunks_fetched < rep.chunks_fetched, "{early:#?} {rep:#?}");
        complete(c.node.store(), top);
        let layers = c.node.store().layers().unwrap();
        assert!(layers.iter().filter(|(id, _)| stack.contains(id)).all(|(_, i)| !i.partial), "{layers:#?}");
    });
}
