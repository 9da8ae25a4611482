//! `verify --repair`: every damaged or missing chunk fetched anew from
//! peers, damaged packs rewritten without their bad records.
//!
//! ```text
//!  verify ──damage──> ask providers for the chunks not yet asked for ──┐
//!    ^                (each stored anew once it verifies)              │
//!    └────────────── again: a repaired manifest may name more ─────────┘
//!  then: rewrite every pack holding a damaged record, unless a chunk the
//!        index keeps there is still damaged; verify once more
//! ```
//!
//! Providers, in order: those given (`--from`, as NODE@ADDR or tickets),
//! nodes that announced a damaged chunk's layer over gossip, and, when
//! none was given, the configured and remembered peers.
//!
//! A running daemon also repairs on its own ([`spawn_watch`]): a read that
//! meets a damaged chunk marks it in the store (any process: a mount, an
//! export, the provider), and every [`WATCH_EVERY`] the daemon fetches the
//! marked chunks anew from its known peers and every node heard over
//! gossip. A chunk none of them had is asked for again after
//! [`RETRY_AFTER`]. Packs are rewritten by `verify --repair` (or gc).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use xenod_peer::{EndpointAddr, Ticket, parse_peer};
use xenod_store::{ChunkId, Exit, PackRewrite, Store, VerifyReport};

use super::context::Daemon;
use super::reply::{Broken, BrokenMount, KeptPack, Repair, Unrepaired};
use crate::error::{Error, Result};
use crate::notes::note;

/// Rounds of verify-and-fetch at most: each can only reveal chunks that
/// manifests repaired in the round before name.
const MAX_ROUNDS: u32 = 4;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::msg(format!("repair task: {e}")))?
}

async fn verify(store: &Arc<Store>) -> Result<VerifyReport> {
    let s = store.clone();
    blocking(move || Ok(s.verify()?)).await
}

/// The providers given as `from`: NODE@ADDR, or tickets (their providers).
fn given(from: &[String]) -> Result<Vec<EndpointAddr>> {
    let mut out: Vec<EndpointAddr> = Vec::new();
    for f in from {
        let found = if f.trim().starts_with("xenod1") {
            let t: Ticket = f.parse().map_err(|e| Error::coded(Exit::BadInput, format!("--from: {e}")))?;
            t.providers
        } else {
            vec![parse_peer(f).map_err(|e| Error::coded(Exit::BadInput, format!("--from: {e}")))?]
        };
        for p in found {
            if !out.iter().any(|o| o.id == p.id) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

/// Repairs the store of `d` from peers (see the module doc).
pub async fn repair(d: &Arc<Daemon>, from: &[String]) -> Result<Repair> {
    let given = given(from)?;
    let store = d.store_arc();
    let mut out = Repair::default();
    let mut asked: HashSet<ChunkId> = HashSet::new();
    let mut rounds = 0;
    note("verifying every chunk");
    let mut report = verify(&store).await?;
    out.found = report.damage.len() as u64;
    loop {
        let want: Vec<ChunkId> = report.damage.iter().map(|d| d.chunk).filter(|c| !asked.contains(c)).collect();
        if want.is_empty() || rounds >= MAX_ROUNDS {
            break;
        }
        rounds += 1;
        let mut peers = given.clone();
        for dmg in report.damage.iter().filter(|x| want.contains(&x.chunk)) {
            for (layer, _) in &dmg.layers {
                for p in d.node().providers_of(layer) {
                    if !peers.iter().any(|q| q.id == p.id) {
                        peers.push(p);
                    }
                }
            }
        }
        if given.is_empty() {
            for p in d.default_peers() {
                if !peers.iter().any(|q| q.id == p.id) {
                    peers.push(p);
                }
            }
        }
        if peers.is_empty() {
            note("no provider to ask: give one with --from");
            break;
        }
        note(format!("asking {} provider(s) for {} chunk(s)", peers.len(), want.len()));
        let got = d.node().repair_chunks(&want, &peers).await.map_err(|e| Error::msg(format!("repair: {e}")))?;
        asked.extend(want);
        let fetched = !got.repaired.is_empty();
        out.repaired.extend(got.repaired);
        for p in got.providers {
            match out.providers.iter_mut().find(|q| q.node == p.node) {
                Some(q) => {
                    q.chunks += p.chunks;
                    q.absent += p.absent;
                    q.bad_chunks += p.bad_chunks;
                    q.dropped = p.dropped.or(q.dropped.take());
                }
                None => out.providers.push(p),
            }
        }
        if !fetched {
            break;
        }
        note("verifying again");
        report = verify(&store).await?;
    }
    let mut rewrote = false;
    for pack in report.damaged_packs.clone() {
        let s = store.clone();
        let name = format!("{pack:016x}.pack");
        match blocking(move || Ok(s.rewrite_pack(pack)?)).await? {
            PackRewrite::Rewritten { .. } => {
                note(format!("rewrote {name} without its damaged records"));
                out.packs_rewritten.push(name);
                rewrote = true;
            }
            PackRewrite::Kept { chunk, why } => out
                .packs_kept
                .push(KeptPack { pack: name, why: format!("chunk {chunk} in it is still damaged: {why}") }),
        }
    }
    if rewrote {
        report = verify(&store).await?;
    }
    d.save_state();
    out.clean = report.is_clean();
    out.unrepaired = report
        .damage
        .iter()
        .map(|x| Unrepaired {
            chunk: x.chunk.to_string(),
            why: x.why.clone(),
            layers: x.layers.iter().map(|(l, at)| (l.to_string(), at.clone())).collect(),
        })
        .collect();
    out.broken_layers =
        report.broken_layers.iter().map(|(l, w)| Broken { id: l.to_string(), why: w.clone() }).collect();
    out.broken_mounts = report
        .broken_mounts
        .iter()
        .map(|(l, file, r, why)| BrokenMount {
            layer: l.to_string(),
            file: file.clone(),
            reference: r.clone(),
            why: why.clone(),
        })
        .collect();
    out.bad_packs = report.bad_packs.clone();
    Ok(out)
}

/// How often a daemon looks for chunks marked damaged [default;
/// `XENOD_REPAIR_MS` overrides it, for tests].
pub const WATCH_EVERY: Duration = Duration::from_secs(10);
/// How long a marked chunk that no provider had is left alone.
pub const RETRY_AFTER: Duration = Duration::from_secs(300);

fn watch_every() -> Duration {
    std::env::var("XENOD_REPAIR_MS").ok().and_then(|v| v.parse().ok()).map(Duration::from_millis).unwrap_or(WATCH_EVERY)
}

/// Repairs chunks marked damaged until the daemon is gone (see the module doc).
pub fn spawn_watch(d: &Arc<Daemon>) {
    let weak: Weak<Daemon> = Arc::downgrade(d);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(watch_every());
        let mut lacking: HashMap<ChunkId, Instant> = HashMap::new();
        loop {
            tick.tick().await;
            let Some(d) = weak.upgrade() else { return };
            let store = d.store_arc();
            let marks = match blocking(move || Ok(store.damage_marks()?)).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!("reading damage marks: {e}");
                    continue;
                }
            };
            lacking.retain(|_, t| t.elapsed() < RETRY_AFTER);
            let want: Vec<ChunkId> = marks.into_iter().map(|m| m.0).filter(|c| !lacking.contains_key(c)).collect();
            if want.is_empty() {
                continue;
            }
            let mut peers = d.default_peers();
            for a in d.node().presences().iter().filter_map(|p| p.addr()) {
                if !peers.iter().any(|q| q.id == a.id) {
                    peers.push(a);
                }
            }
            if peers.is_empty() {
                continue;
            }
            match d.node().repair_chunks(&want, &peers).await {
                Ok(r) => {
                    for s in &r.repaired {
                        tracing::info!("repaired damaged chunk {} from {}", s.chunk, s.from);
                    }
                    for c in want.iter().filter(|c| r.missing.contains(&c.to_string())) {
                        tracing::warn!("no known peer has damaged chunk {c}; asking again in {RETRY_AFTER:?}");
                        lacking.insert(*c, Instant::now());
                    }
                }
                Err(e) => tracing::warn!("repairing damaged chunks: {e}"),
            }
        }
    });
}
