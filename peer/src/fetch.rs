//! Fetching a layer stack from several providers at once.
//!
//! A fetch runs in three rounds, each asking only for what this store
//! lacks, so an interrupted fetch resumes where it stopped:
//!
//! ```text
//!  roots      layer -> base -> base ...   one chunk at a time (each names the next)
//!  manifests  every root's manifest chunks
//!  prefetch   the data chunks of the stack's prefetch order, in that order
//!  data       every Data extent of every entry, deduplicated
//! ```
//!
//! The prefetch order (`store/src/order.rs`: the chunks a guest first read
//! while it booted, recorded by a lazy deploy) is asked of the providers
//! (op 6) while the manifests come, when this store holds none for the
//! layer; it is kept once it checks out against the manifests. The
//! prefetch round asks for small batches and keeps its queue as ordered,
//! so its chunks arrive about in order, ahead of a lazily deployed guest;
//! members of one solid block go together, in one batch up to the block's
//! end, so that a block the order covers travels whole, as kept.
//!
//! Each round is a [`Swarm`] run: a shared queue of wanted ids, and per
//! provider a few *lanes*, each keeping one request of up to `batch` ids in
//! flight on its own QUIC stream. A lane takes its next batch when the
//! previous one is answered, so fast providers take more of the queue. When
//! the queue is empty an idle lane *steals*: it asks its provider for ids
//! still outstanding at another one; whichever copy arrives first is kept.
//! So a slow or hung provider never holds the tail of a transfer.
//!
//! Every frame is decoded and hashed before it is stored
//! ([`Store::put_encoded`]). A provider that sends a chunk that does not
//! verify, breaks the wire format, or whose connection fails is dropped
//! for the rest of the fetch: the bad chunk is counted against it, and
//! everything it still owed goes back to the queue for the others. A
//! provider that answers "absent" for an id is not asked for it again.
//!
//! # Fan-out
//!
//! When several hosts fetch the same stack at once ([`SwarmPlan`]), each
//! also asks the others, which serve what they already hold. The ids are
//! split into as many *segments* as there are members (by the first bytes
//! of the id, so every member computes the same split without talking):
//! a member asks the full providers (the source) for its own segment
//! first, then for the rest, oldest-wanted last; it asks member `j` for
//! segment `j`, which is what `j` is fetching first. A member that answers
//! "absent" has not got the chunk *yet*: it is asked again after
//! [`NOT_YET_RETRY`], never counted as lacking it for good while a full
//! provider is alive. So the source sends each chunk about once and the
//! members exchange the rest among themselves.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iroh::endpoint::Connection;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use iroh::EndpointId;

use xenod_store::{ChunkId, Error, Extent, Kind, LayerId, Store};

use super::PeerError;
use super::protocol::{Answer, Dense, MAX_BATCH, MAX_LAYOUT, Request, WireError, read_answer, read_layout};
use super::stats::Stats;

/// Called as chunks arrive.
pub type ProgressFn = Arc<dyn Fn(&FetchProgress) + Send + Sync>;
/// See [`FetchOptions::on_manifests`].
pub type ManifestsFn = Arc<dyn Fn(&FetchReport) + Send + Sync>;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    #[default]
    Roots,
    Manifests,
    /// The data chunks of the stack's prefetch order, in that order.
    Prefetch,
    Data,
}

/// Where a fetch stands.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FetchProgress {
    pub phase: Phase,
    /// Chunks of this phase stored so far, and wanted in all.
    pub chunks_done: u64,
    pub chunks_total: u64,
    /// Plaintext bytes stored so far (all phases).
    pub bytes: u64,
    /// Bytes received on the wire so far (all phases, duplicates included).
    pub wire_bytes: u64,
}

/// A fan-out: the hosts fetching the same stack at the same time, in an
/// order every one of them was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwarmPlan {
    pub members: Vec<EndpointId>,
}

impl SwarmPlan {
    /// The segment of `id` among `n` members.
    pub fn segment(id: &ChunkId, n: usize) -> usize {
        let b = id.as_bytes();
        (u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) % n.max(1) as u64) as usize
    }

    /// The position of `node` in the plan, if it is a member.
    pub fn index(&self, node: &EndpointId) -> Option<usize> {
        self.members.iter().position(|m| m == node)
    }
}

/// How long a fan-out member that said "not yet" for an id is left alone
/// before it is asked for that id again.
pub const NOT_YET_RETRY: Duration = Duration::from_millis(150);
/// How long after asking the source for the last of its own segment a
/// fan-out member waits before asking the source for other members' ids
/// too (see `State::source_may_serve`).
pub const SOURCE_PATIENCE: Duration = Duration::from_secs(1);
/// Most queued ids one take looks at (the lock is held meanwhile).
const SCAN: usize = 8192;

#[derive(Clone)]
pub struct FetchOptions {
    pub progress: Option<ProgressFn>,
    /// Requests in flight per provider.
    pub lanes: usize,
    /// Most ids per request.
    pub batch: usize,
    /// A provider silent for this long while owing a frame is dropped.
    pub read_timeout: Duration,
    /// Stored bytes between flushes, so an interrupted fetch keeps its work.
    pub flush_every: u64,
    /// Stored bytes between flushes in the prefetch round, and a flush at
    /// its end, when a lazily deployed guest reads the stack meanwhile:
    /// its mount has its own handle of the store, which sees a chunk only
    /// once the pack holding it is sealed (until then each read of it asks
    /// the daemon). `None`: as `flush_every`.
    pub prefetch_flush_every: Option<u64>,
    /// Fetching as one member of a fan-out; providers that are members are
    /// fetching too (see the module doc).
    pub swarm: Option<SwarmPlan>,
    /// Stop after the layer roots and manifests (file data fetched later
    /// by another fetch).
    pub manifests_only: bool,
    /// Called once, when the stack's layer roots and manifests are here,
    /// sealed and the stack recorded (as partial), with what the fetch did
    /// so far; the fetch goes on with file data on the same connections. A
    /// lazy deploy mounts then: the prefetch round follows at once, with
    /// no second connection, order or slow start.
    pub on_manifests: Option<ManifestsFn>,
    /// Ask for every chunk in solid frames made by this codec (zstd at
    /// most at [`super::protocol::MAX_DENSE_LEVEL`], or PPMd): fewer bytes
    /// on the wire for the providers' CPU, for moves over slow links
    /// (migration).
    pub dense: Option<Dense>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            progress: None,
            lanes: 4,
            batch: 32,
            read_timeout: Duration::from_secs(20),
            flush_every: 64 << 20,
            prefetch_flush_every: None,
            swarm: None,
            manifests_only: false,
            on_manifests: None,
            dense: None,
        }
    }
}

impl std::fmt::Debug for FetchOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchOptions").field("lanes", &self.lanes).field("batch", &self.batch).finish_non_exhaustive()
    }
}

/// What one provider contributed to a fetch.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProviderReport {
    pub node: String,
    pub chunks: u64,
    pub wire_bytes: u64,
    /// Chunks that arrived after another provider's copy had been stored.
    pub duplicates: u64,
    pub bad_chunks: u64,
    /// Why it was dropped, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<String>,
}

/// The outcome of a fetch.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FetchReport {
    pub layer: String,
    /// The stack, template first.
    pub stack: Vec<String>,
    pub chunks_fetched: u64,
    /// Chunks the stack needs that were already here.
    pub chunks_local: u64,
    pub bytes: u64,
    /// Chunk payload bytes received (compressed, duplicates included).
    pub wire_bytes: u64,
    /// Every UDP byte of the fetch's connections, both directions.
    pub udp_bytes: u64,
    pub elapsed_ms: u64,
    pub providers: Vec<ProviderReport>,
    /// Chunks fetched first, in the stack's prefetch order.
    #[serde(default)]
    pub prefetched: u64,
    /// The provider whose prefetch order this fetch received and kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_from: Option<String>,
}

pub(crate) struct ProviderConn {
    pub(crate) node: String,
    /// Its segment, when it is a fan-out member (fetching too).
    pub(crate) member: Option<usize>,
    /// The connection, or why there is none.
    pub(crate) conn: Result<Connection, String>,
}

#[derive(Default)]
struct State {
    todo: VecDeque<ChunkId>,
    /// Ids a batch may end after (the last member of a provider's block
    /// in `todo`); empty when any id may end one.
    cuts: HashSet<ChunkId>,
    /// Requested and not yet stored: who was asked, and when.
    inflight: HashMap<ChunkId, Vec<(usize, Instant)>>,
    /// Smoothed time a batch takes to be answered, over all providers.
    batch_time: Duration,
    /// Providers that said they lack an id, or sent it corrupt.
    lacks: HashMap<ChunkId, Vec<usize>>,
    /// Fan-out members that said "absent" for an id, and when.
    not_yet: HashMap<ChunkId, Vec<(usize, Instant)>>,
    /// Per provider: `Some(segment)` for a fan-out member.
    member: Vec<Option<usize>>,
    /// Members in the plan (segments), 0 without one.
    segments: usize,
    /// When a full provider's batch first came up short for lack of ids it
    /// may serve: this fetcher's own segment had all been asked for.
    own_done: Option<Instant>,
    remaining: usize,
    total: usize,
    alive: Vec<bool>,
    failed: Option<PeerError>,
    reports: Vec<ProviderReport>,
}

enum Take {
    Batch(Vec<ChunkId>),
    Wait,
    Stop,
}

impl State {
    fn alive_count(&self) -> usize {
        self.alive.iter().filter(|a| **a).count()
    }

    fn lacked_by_all(&self, id: &ChunkId) -> bool {
        if self.full_can_supply(id) {
            return false;
        }
        // No full provider can: a member's "absent" is final now.
        let not_yet = self.not_yet.get(id).map(Vec::as_slice).unwrap_or(&[]);
        self.alive.iter().enumerate().all(|(p, a)| !*a || self.lacks(p, id) || not_yet.iter().any(|(q, _)| *q == p))
    }

    /// Whether a live provider that is not a fan-out member may still have `id`.
    fn full_can_supply(&self, id: &ChunkId) -> bool {
        self.alive.iter().enumerate().any(|(p, a)| *a && self.member[p].is_none() && !self.lacks(p, id))
    }

    fn not_yet_at(&self, p: usize, id: &ChunkId) -> bool {
        self.not_yet.get(id).is_some_and(|v| v.iter().any(|(q, t)| *q == p && t.elapsed() < NOT_YET_RETRY))
    }

    /// For fan-out member `p`: up to `want` ids of its segment it has not
    /// just said it lacks, searched from the back of the queue (where the
    /// ids members fetch first wait; see [`order_for_swarm`]).
    fn take_from_member(&mut self, p: usize, seg: usize, want: usize) -> Vec<ChunkId> {
        let mut picked = Vec::new();
        let mut i = self.todo.len();
        let mut scanned = 0;
        while i > 0 && picked.len() < want && scanned < SCAN {
            i -= 1;
            scanned += 1;
            let id = self.todo[i];
            if self.lacked_by_all(&id) {
                self.failed = Some(PeerError::Unavailable { id });
                return Vec::new();
            }
            // Once no full provider can supply an id, every member is asked.
            let mine = SwarmPlan::segment(&id, self.segments) == seg || !self.full_can_supply(&id);
            if mine && !self.not_yet_at(p, &id) && !self.lacks(p, &id) {
                picked.push(i);
            }
        }
        // `picked` is in descending index order, so removals do not shift
        // the indices still to remove.
        picked.into_iter().filter_map(|i| self.todo.remove(i)).collect()
    }

    /// In a fan-out, whether to ask a full provider (the source) for `id`:
    /// always for this fetcher's own segment; for another member's segment
    /// only when that member cannot supply it (gone, lacks it), or once this
    /// fetcher's own segment has been asked for at least [`SOURCE_PATIENCE`]
    /// (several batch times on a slow link) ago and the member still has
    /// not got it. Members fetch their own segments from the source at
    /// the same pace, so this sends each chunk from the source about once;
    /// a straggler's share still comes from the source in the end.
    fn source_may_serve(&self, id: &ChunkId) -> bool {
        if self.segments == 0 {
            return true;
        }
        let seg = SwarmPlan::segment(id, self.segments);
        let Some(q) = self.member.iter().position(|m| *m == Some(seg)) else {
            return true;
        };
        if !self.alive[q] || self.lacks(q, id) {
            return true;
        }
        self.own_done.is_some_and(|t| t.elapsed() > SOURCE_PATIENCE.max(self.batch_time * 4))
    }

    fn lacks(&self, p: usize, id: &ChunkId) -> bool {
        self.lacks.get(id).is_some_and(|l| l.contains(&p))
    }

    fn take(&mut self, p: usize, max: usize, lanes_total: usize) -> Take {
        if self.remaining == 0 || self.failed.is_some() || !self.alive[p] {
            return Take::Stop;
        }
        // Spread the tail: never take more than a fair share of what is left.
        let fair = self.todo.len().div_ceil(lanes_total.max(1)).max(1);
        let want = max.min(fair);
        if let Some(seg) = self.member[p] {
            let batch = self.take_from_member(p, seg, want);
            if self.failed.is_some() {
                return Take::Stop;
            }
            if batch.is_empty() {
                return Take::Wait;
            }
            let now = Instant::now();
            for id in &batch {
                self.inflight.entry(*id).or_default().push((p, now));
            }
            return Take::Batch(batch);
        }
        let mut batch = Vec::new();
        let mut skipped = Vec::new();
        let mut scanned = 0;
        while (batch.len() < want || open_block(&self.cuts, &batch)) && scanned < SCAN {
            let Some(id) = self.todo.pop_front() else { break };
            scanned += 1;
            if self.lacked_by_all(&id) {
                self.failed = Some(PeerError::Unavailable { id });
                return Take::Stop;
            }
            if self.lacks(p, &id) || !self.source_may_serve(&id) {
                skipped.push(id);
            } else {
                batch.push(id);
            }
        }
        if self.segments > 0 && self.own_done.is_none() && batch.len() < want && !skipped.is_empty() {
            // No id of this fetcher's own segment is left near the front.
            self.own_done = Some(Instant::now());
        }
        for id in skipped.into_iter().rev() {
            self.todo.push_front(id);
        }
        if batch.is_empty() {
            // Steal ids outstanding at exactly one other provider for longer
            // than batches usually take: that provider is slow or gone. The
            // wait keeps fast providers from duplicating each other's work.
            let patience = self.batch_time * 2 + Duration::from_millis(20);
            for (id, holders) in &self.inflight {
                if batch.len() >= want {
                    break;
                }
                if let [(q, since)] = holders[..]
                    && q != p
                    && since.elapsed() > patience
                    && !self.lacks(p, id)
                {
                    batch.push(*id);
                }
            }
        }
        if batch.is_empty() {
            return Take::Wait;
        }
        let now = Instant::now();
        for id in &batch {
            self.inflight.entry(*id).or_default().push((p, now));
        }
        Take::Batch(batch)
    }

    /// `p` will not deliver `id`: give it back to the queue unless another
    /// provider was asked too.
    fn release(&mut self, p: usize, id: &ChunkId) {
        if let Some(h) = self.inflight.get_mut(id) {
            h.retain(|(q, _)| *q != p);
            if h.is_empty() {
                self.inflight.remove(id);
                if self.member[p].is_some() {
                    // Back where members look first, not ahead of the
                    // source's own queue.
                    self.todo.push_back(*id);
                } else {
                    self.todo.push_front(*id);
                }
            }
        }
    }

    fn drop_provider(&mut self, p: usize, why: String) {
        if !self.alive[p] {
            return;
        }
        self.alive[p] = false;
        self.reports[p].dropped = Some(why);
        let owed: Vec<ChunkId> =
            self.inflight.iter().filter(|(_, h)| h.iter().any(|(q, _)| *q == p)).map(|(id, _)| *id).collect();
        for id in owed {
            self.release(p, &id);
        }
        if self.alive_count() == 0 && self.remaining > 0 && self.failed.is_none() {
            let why = self.reports.iter().filter_map(|r| r.dropped.as_ref().map(|d| format!("{}: {d}", r.node)));
            self.failed = Some(PeerError::NoProviders { why: why.collect::<Vec<_>>().join("; ") });
        }
    }
}

/// The providers of one fetch, shared by its rounds.
pub(crate) struct Swarm {
    store: Arc<Store>,
    stats: Arc<Stats>,
    conns: Vec<ProviderConn>,
    opts: FetchOptions,
    state: Mutex<State>,
    notify: Notify,
    phase: Mutex<Phase>,
    bytes: AtomicU64,
    wire_bytes: AtomicU64,
    since_flush: AtomicU64,
    /// Most ids per request in the current round.
    batch: std::sync::atomic::AtomicUsize,
}

/// Most ids per request in the prefetch round: small, so that its chunks
/// arrive about in the order asked (a batch still runs on to the end of
/// the solid block it is in).
pub(crate) const PREFETCH_BATCH: usize = 4;
/// Requests in flight per provider in the prefetch round. Its batches are
/// small, so it needs more of them to fill a link with a long round trip:
/// four batches of four 64 KiB image blocks (about 80 KB at zstd 19) kept
/// a 100 Mbit/s link with a 40 ms round trip at about 65 Mbit/s
/// (`benches/lazy-prefetch.sh`), where it holds 470 KB.
pub(crate) const PREFETCH_LANES: usize = 8;

impl Swarm {
    pub(crate) fn new(store: Arc<Store>, stats: Arc<Stats>, conns: Vec<ProviderConn>, opts: FetchOptions) -> Arc<Self> {
        let alive = conns.iter().map(|c| c.conn.is_ok()).collect();
        let member = conns.iter().map(|c| c.member).collect();
        let segments = opts.swarm.as_ref().map_or(0, |s| s.members.len());
        let reports = conns
            .iter()
            .map(|c| ProviderReport {
                node: c.node.clone(),
                dropped: c.conn.as_ref().err().cloned(),
                ..Default::default()
            })
            .collect();
        Arc::new(Self {
            store,
            stats,
            conns,
            opts,
            state: Mutex::new(State {
                alive,
                reports,
                member,
                segments,
                batch_time: Duration::from_millis(100),
                ..Default::default()
            }),
            notify: Notify::new(),
            phase: Mutex::new(Phase::Roots),
            bytes: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
            since_flush: AtomicU64::new(0),
            batch: std::sync::atomic::AtomicUsize::new(1),
        })
    }

    /// Connections to the providers that could be dialled, with their names.
    pub(crate) fn connections(&self) -> Vec<(String, Connection)> {
        self.conns.iter().filter_map(|c| c.conn.as_ref().ok().map(|k| (c.node.clone(), k.clone()))).collect()
    }

    /// Closes every connection; returns the UDP bytes they moved (both
    /// directions, QUIC and TLS overhead included).
    pub(crate) fn close(&self) -> u64 {
        let mut udp = 0;
        for c in &self.conns {
            if let Ok(c) = &c.conn {
                let s = c.stats();
                udp += s.udp_rx.bytes + s.udp_tx.bytes;
                c.close(0u32.into(), b"done");
            }
        }
        udp
    }

    fn conn(&self, p: usize) -> &Connection {
        match &self.conns[p].conn {
            Ok(c) => c,
            Err(_) => unreachable!("lanes run only for connected providers"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn reports(&self) -> Vec<ProviderReport> {
        self.lock().reports.clone()
    }

    pub(crate) fn wire_bytes(&self) -> u64 {
        self.wire_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn progress(&self, done: usize, total: usize) {
        if let Some(f) = &self.opts.progress {
            f(&FetchProgress {
                phase: *self.phase.lock().unwrap_or_else(|e| e.into_inner()),
                chunks_done: done as u64,
                chunks_total: total as u64,
                bytes: self.bytes(),
                wire_bytes: self.wire_bytes(),
            });
        }
    }

    /// Fetches every id in `ids` (none of them local) into the store.
    pub(crate) async fn run(self: &Arc<Self>, phase: Phase, ids: Vec<ChunkId>) -> Result<(), PeerError> {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase;
        let batch = if phase == Phase::Prefetch { PREFETCH_BATCH.min(self.opts.batch) } else { self.opts.batch };
        self.batch.store(batch.max(1), Ordering::Relaxed);
        if ids.is_empty() {
            return Ok(());
        }
        {
            let mut st = self.lock();
            if let Some(e) = st.failed.take() {
                return Err(e);
            }
            st.total = ids.len();
            st.remaining = ids.len();
            st.todo = ids.into();
            st.cuts.clear();
            st.inflight.clear();
            st.lacks.clear();
            st.not_yet.clear();
            st.own_done = None;
            if st.alive_count() == 0 {
                let why = st.reports.iter().filter_map(|r| r.dropped.as_ref().map(|d| format!("{}: {d}", r.node)));
                let why = why.collect::<Vec<_>>().join("; ");
                return Err(PeerError::NoProviders { why: if why.is_empty() { "none given".into() } else { why } });
            }
        }
        // The prefetch round too: an order that reads a file through (a
        // kernel QEMU loads) covers whole blocks, which then travel as the
        // publisher compressed them (at its --level) instead of being
        // packed again at RUN_LEVEL in batches of a few chunks. A block
        // stays where its first member is in the order.
        // Not for a set that one request holds: its ids come in the order
        // they were published, so blocks are whole in it anyway, and the
        // layout would cost a round trip (50 ms of a 525 ms fetch of a small
        // tree over a 50 ms link).
        let one_request = self.lock().total <= batch;
        if matches!(phase, Phase::Data | Phase::Prefetch)
            && self.opts.dense.is_none()
            && self.opts.swarm.is_none()
            && !one_request
        {
            self.arrange_by_blocks().await;
        }
        let total = self.lock().total;
        self.progress(0, total);
        let lanes = if phase == Phase::Prefetch { PREFETCH_LANES.max(self.opts.lanes) } else { self.opts.lanes.max(1) };
        let lanes_total = self.conns.len() * lanes;
        let mut set = tokio::task::JoinSet::new();
        for p in 0..self.conns.len() {
            if !self.lock().alive[p] {
                continue;
            }
            for _ in 0..lanes {
                let me = self.clone();
                set.spawn(async move { me.lane(p, lanes_total).await });
            }
        }
        loop {
            {
                let st = self.lock();
                if st.remaining == 0 || st.failed.is_some() {
                    break;
                }
            }
            tokio::select! {
                r = set.join_next() => if r.is_none() { break },
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        // Lanes still waiting on a slow provider are not needed any more.
        set.abort_all();
        while set.join_next().await.is_some() {}
        let mut st = self.lock();
        if let Some(e) = st.failed.take() {
            return Err(e);
        }
        if st.remaining > 0 {
            return Err(PeerError::NoProviders { why: "every provider was dropped".into() });
        }
        Ok(())
    }

    async fn lane(self: Arc<Self>, p: usize, lanes_total: usize) {
        loop {
            let notified = self.notify.notified();
            let took = self.lock().take(p, self.batch.load(Ordering::Relaxed), lanes_total);
            let batch = match took {
                Take::Stop => return,
                Take::Wait => {
                    let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
                    continue;
                }
                Take::Batch(b) => b,
            };
            let t = Instant::now();
            let r = self.request(p, &batch).await;
            if r.is_ok() {
                let mut st = self.lock();
                st.batch_time = (st.batch_time * 7 + t.elapsed()) / 8;
            }
            if let Err(e) = r {
                // This node's own store failing (a full disk) is no fault of
                // the provider, and no other provider would fare better: the
                // fetch ends with that error and no peer is blamed.
                if matches!(e, PeerError::Store(_)) {
                    tracing::warn!("fetch stopped by this node's store: {e}");
                    self.lock().failed.get_or_insert(e);
                    self.notify.notify_waiters();
                    return;
                }
                let why = e.to_string();
                tracing::debug!("dropping provider {}: {why}", self.conns[p].node);
                let node = &self.conns[p].node;
                self.stats.with(node, |t, c| {
                    t.peers_dropped += 1;
                    c.dropped += 1;
                    if matches!(e, PeerError::Protocol { .. }) {
                        t.protocol_errors += 1;
                        c.protocol_errors += 1;
                    }
                    c.last_error = Some(why.clone());
                });
                self.lock().drop_provider(p, why);
                self.conn(p).close(VAR_DROPPED.into(), b"dropped");
                self.notify.notify_waiters();
                return;
            }
        }
    }

    /// Orders the queue by the first full provider's solid blocks, each
    /// block's members together and in its order, and ends batches only at
    /// block ends, so that the provider can send whole blocks as it keeps
    /// them. Best effort: without an answer the queue stays as it was.
    async fn arrange_by_blocks(&self) {
        let (p, ids) = {
            let st = self.lock();
            let Some(p) = (0..self.conns.len()).find(|&p| st.alive[p] && st.member[p].is_none()) else { return };
            (p, st.todo.iter().copied().collect::<Vec<_>>())
        };
        // The pieces' requests run at once (QUIC's stream limit bounds
        // them): a large stack waits one round trip, not one per piece.
        let mut set = tokio::task::JoinSet::new();
        for (i, piece) in ids.chunks(MAX_LAYOUT).enumerate() {
            let (conn, piece, limit) = (self.conn(p).clone(), piece.to_vec(), self.opts.read_timeout);
            set.spawn(async move { (i, tokio::time::timeout(limit, layout(&conn, &piece)).await, piece.len()) });
        }
        let mut pieces = Vec::new();
        while let Some(done) = set.join_next().await {
            let why = match done {
                Ok((i, Ok(Ok(l)), n)) if l.len() == n => {
                    pieces.push((i, l));
                    continue;
                }
                Ok((i, Ok(Ok(l)), n)) => format!("{} entries for the {n} ids of piece {i}", l.len()),
                Ok((_, Ok(Err(e)), _)) => e,
                Ok((_, Err(_), _)) => "no answer within the read timeout".to_owned(),
                Err(e) => e.to_string(),
            };
            tracing::debug!("no block layout from {}: {why}", self.conns[p].node);
            return;
        }
        pieces.sort_unstable_by_key(|(i, _)| *i);
        let layout: Vec<(u64, u32)> = pieces.into_iter().flat_map(|(_, l)| l).collect();
        let (todo, cuts) = arrange(&ids, &layout);
        let mut st = self.lock();
        if st.todo.len() == todo.len() {
            st.todo = todo.into();
            st.cuts = cuts;
        }
    }

    /// Stored bytes between flushes in the current round.
    fn flush_every(&self) -> u64 {
        match self.opts.prefetch_flush_every {
            Some(n) if *self.phase.lock().unwrap_or_else(|e| e.into_inner()) == Phase::Prefetch => n,
            _ => self.opts.flush_every,
        }
    }

    /// After the prefetch round: makes its chunks visible to the store's
    /// other handles at once when asked to ([`FetchOptions::prefetch_flush_every`]).
    pub(crate) async fn prefetch_done(&self) -> Result<(), PeerError> {
        if self.opts.prefetch_flush_every.is_none() {
            return Ok(());
        }
        self.since_flush.store(0, Ordering::Relaxed);
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.flush())
            .await
            .map_err(|e| PeerError::NoProviders { why: format!("flush task: {e}") })??;
        Ok(())
    }

    /// Asks provider `p` for `batch` and stores what it sends.
    async fn request(&self, p: usize, batch: &[ChunkId]) -> Result<(), PeerError> {
        let node = &self.conns[p].node;
        let conn_err = |e: &dyn std::fmt::Display| PeerError::Connection { peer: node.clone(), why: e.to_string() };
        let (mut send, mut recv) = self.conn(p).open_bi().await.map_err(|e| conn_err(&e))?;
        let req = match self.opts.dense {
            Some(codec) => Request::Dense { codec, ids: batch.to_vec() },
            None => Request::Solid(batch.to_vec()),
        };
        send.write_all(&req.encode()).await.map_err(|e| conn_err(&e))?;
        send.finish().map_err(|e| conn_err(&e))?;
        let mut next = 0;
        while next < batch.len() {
            let answer = match tokio::time::timeout(self.opts.read_timeout, read_answer(&mut recv)).await {
                Err(_) => return Err(conn_err(&"no answer within the read timeout")),
                Ok(Err(WireError::Io(e))) => return Err(conn_err(&e)),
                // Not the provider's fault: it said what it would not do.
                Ok(Err(e @ WireError::Refused(_))) => return Err(conn_err(&e)),
                Ok(Err(e)) => return Err(PeerError::Protocol { peer: node.clone(), why: e.to_string() }),
                Ok(Ok(a)) => a,
            };
            let id = batch[next];
            let (ids, wire, lens) = match answer {
                Answer::Absent => {
                    next += 1;
                    let mut st = self.lock();
                    if st.member[p].is_some() {
                        st.not_yet.entry(id).or_default().push((p, Instant::now()));
                    } else {
                        st.lacks.entry(id).or_default().push(p);
                    }
                    st.release(p, &id);
                    drop(st);
                    self.notify.notify_waiters();
                    continue;
                }
                Answer::One(frame) => {
                    next += 1;
                    let wire = frame.stored.len() as u64;
                    self.wire_bytes.fetch_add(wire, Ordering::Relaxed);
                    if !self.lock().inflight.contains_key(&id) {
                        self.lock().reports[p].duplicates += 1;
                        continue;
                    }
                    let store = self.store.clone();
                    let plain = frame.plain_len;
                    let put = tokio::task::spawn_blocking(move || {
                        store.put_encoded(id, frame.encoding, &frame.stored, frame.plain_len)
                    })
                    .await;
                    self.checked(p, put.map(|r| r.map(|_| vec![plain])))?;
                    (vec![id], wire, vec![plain])
                }
                Answer::Solid { count, block } => {
                    let Some(ids) = batch.get(next..next + count as usize) else {
                        let why = format!("solid frame of {count} chunks where {} were left", batch.len() - next);
                        return Err(PeerError::Protocol { peer: node.clone(), why });
                    };
                    next += count as usize;
                    let ids = ids.to_vec();
                    let wire = block.len() as u64;
                    self.wire_bytes.fetch_add(wire, Ordering::Relaxed);
                    let store = self.store.clone();
                    let expect = ids.clone();
                    let put = tokio::task::spawn_blocking(move || store.put_solid_frame(&block, &expect)).await;
                    let lens = self.checked(p, put)?;
                    (ids, wire, lens)
                }
            };
            // Bytes on the wire are shared among a solid frame's chunks by size.
            let plain_total: u64 = lens.iter().map(|&l| l as u64).sum::<u64>().max(1);
            for (id, len) in ids.iter().zip(lens) {
                let share = wire * len as u64 / plain_total;
                let (done, total) = {
                    let mut st = self.lock();
                    if st.inflight.remove(id).is_none() {
                        st.reports[p].duplicates += 1;
                        continue;
                    }
                    st.remaining -= 1;
                    st.reports[p].chunks += 1;
                    st.reports[p].wire_bytes += share;
                    (st.total - st.remaining, st.total)
                };
                self.bytes.fetch_add(len as u64, Ordering::Relaxed);
                self.stats.with(node, |t, c| {
                    t.chunks_received += 1;
                    t.bytes_received += share;
                    c.chunks_received += 1;
                    c.bytes_received += share;
                });
                if done == total {
                    self.notify.notify_waiters();
                }
                self.progress(done, total);
            }
            if self.since_flush.fetch_add(wire, Ordering::Relaxed) + wire >= self.flush_every() {
                self.since_flush.store(0, Ordering::Relaxed);
                let store = self.store.clone();
                tokio::task::spawn_blocking(move || store.flush())
                    .await
                    .map_err(|e| PeerError::Connection { peer: node.clone(), why: format!("flush task: {e}") })??;
            }
        }
        Ok(())
    }

    /// What storing chunks from provider `p` came to: a chunk that does not
    /// verify is recorded against `p` and ends its request.
    fn checked(
        &self,
        p: usize,
        put: Result<Result<Vec<u32>, Error>, tokio::task::JoinError>,
    ) -> Result<Vec<u32>, PeerError> {
        let node = &self.conns[p].node;
        match put {
            Err(e) => Err(PeerError::Connection { peer: node.clone(), why: format!("verifier task: {e}") }),
            Ok(Ok(lens)) => Ok(lens),
            Ok(Err(Error::ChunkCorrupt { id, why })) => {
                self.stats.with(node, |t, c| {
                    t.bad_chunks += 1;
                    c.bad_chunks += 1;
                });
                let mut st = self.lock();
                st.reports[p].bad_chunks += 1;
                st.lacks.entry(id).or_default().push(p);
                Err(PeerError::BadChunk { peer: node.clone(), id, why })
            }
            Ok(Err(e)) => Err(PeerError::Store(e)),
        }
    }
}

const VAR_DROPPED: u32 = 1;

/// The stack of `layer` and how many of its chunks are here, when this
/// store holds all of it intact already (its manifests, and its data
/// unless `manifests_only`); `None` as soon as something is missing. The
/// chunks are scanned only when every layer is recorded as fetched whole
/// (for `manifests_only`, at all), so a fetch that has work to do pays
/// for the roots' look-up alone.
pub(crate) fn held_whole(
    store: &Store,
    layer: LayerId,
    manifests_only: bool,
) -> Result<Option<(Vec<LayerId>, u64)>, Error> {
    let recorded: std::collections::HashMap<LayerId, bool> =
        store.layers()?.into_iter().map(|(id, info)| (id, info.partial)).collect();
    let mut stack = Vec::new();
    let mut cur = Some(layer);
    while let Some(id) = cur {
        let whole_enough = recorded.get(&id).is_some_and(|&partial| manifests_only || !partial);
        if stack.len() >= xenod_store::MAX_STACK || !whole_enough || !store.holds_intact(&id)? {
            return Ok(None);
        }
        stack.push(id);
        cur = store.layer_root(&id)?.base;
    }
    stack.reverse();
    let (want, mut local) = missing_manifest_chunks(store, &stack)?;
    if !want.is_empty() {
        return Ok(None);
    }
    if !manifests_only {
        let (want, l) = missing_data_chunks(store, &stack)?;
        if !want.is_empty() {
            return Ok(None);
        }
        local += l;
    }
    local += stack.len() as u64;
    Ok(Some((stack, local)))
}

/// Every chunk a stack needs, by round: the manifest chunks of each layer,
/// then the distinct data chunks. Reads only local data.
pub(crate) fn missing_manifest_chunks(store: &Store, stack: &[ChunkId]) -> Result<(Vec<ChunkId>, u64), Error> {
    let mut seen = HashSet::new();
    let mut want = Vec::new();
    let mut local = 0;
    for id in stack {
        for c in store.layer_root(id)?.manifest {
            if seen.insert(c.id) {
                if store.holds_intact(&c.id)? {
                    local += 1;
                } else {
                    want.push(c.id);
                }
            }
        }
    }
    Ok((want, local))
}

pub(crate) fn missing_data_chunks(store: &Store, stack: &[ChunkId]) -> Result<(Vec<ChunkId>, u64), Error> {
    let mut seen = HashSet::new();
    let mut want = Vec::new();
    let mut local = 0;
    for id in stack {
        for e in store.read_layer(id)? {
            if let Kind::File { extents, .. } = e?.kind {
                for x in extents {
                    if let Extent::Data { id, .. } = x
                        && seen.insert(id)
                    {
                        if store.holds_intact(&id)? {
                            local += 1;
                        } else {
                            want.push(id);
                        }
                    }
                }
            }
        }
    }
    Ok((want, local))
}

/// Orders the wanted ids of a fan-out member with segment `me` among
/// `n`: its own segment first (asked of the full providers), then the
/// others newest-first, so that the full providers reach the ids other
/// members fetch last, and members' lanes, scanning from the back, find
/// the ids their peers fetched first.
pub(crate) fn order_for_swarm(ids: Vec<ChunkId>, me: usize, n: usize) -> Vec<ChunkId> {
    let (mut mine, mut rest): (Vec<ChunkId>, Vec<ChunkId>) =
        ids.into_iter().partition(|id| SwarmPlan::segment(id, n) == me);
    rest.reverse();
    mine.append(&mut rest);
    mine
}

/// Asks each connection in turn for the prefetch order of `layer` (chunk
/// protocol op 6); the first that has one, and who gave it. Unchecked.
pub(crate) async fn ask_order(
    conns: Vec<(String, Connection)>,
    layer: xenod_store::LayerId,
    limit: Duration,
) -> Option<(String, Vec<u8>)> {
    for (node, conn) in conns {
        let ask = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            send.write_all(&Request::Order(layer).encode()).await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            super::protocol::read_order(&mut recv).await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(limit, ask).await {
            Ok(Ok(Some(rec))) => return Some((node, rec)),
            Ok(Ok(None)) => {}
            // A provider of an older version does not know op 6.
            Ok(Err(e)) => tracing::debug!("no prefetch order from {node}: {e}"),
            Err(_) => tracing::debug!("no prefetch order from {node}: no answer within {limit:?}"),
        }
    }
    None
}

/// Asks a provider where its solid blocks keep `ids` (chunk protocol op 5).
async fn layout(conn: &Connection, ids: &[ChunkId]) -> Result<Vec<(u64, u32)>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(&Request::Layout(ids.to_vec()).encode()).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    read_layout(&mut recv, ids.len()).await.map_err(|e| e.to_string())
}

/// Whether `batch` ends inside a block (see [`arrange`]) and may grow.
fn open_block(cuts: &HashSet<ChunkId>, batch: &[ChunkId]) -> bool {
    !cuts.is_empty() && batch.len() < MAX_BATCH && batch.last().is_some_and(|l| !cuts.contains(l))
}

/// `ids` reordered so that the members of each block (same non-zero key in
/// `layout`) follow each other in block order, a block where its first
/// wanted member was; and the ids a batch may end after.
fn arrange(ids: &[ChunkId], layout: &[(u64, u32)]) -> (Vec<ChunkId>, HashSet<ChunkId>) {
    let mut first: HashMap<u64, usize> = HashMap::new();
    let mut keyed: Vec<(usize, u32, usize)> = layout
        .iter()
        .enumerate()
        .map(|(i, &(block, start))| if block == 0 { (i, 0, i) } else { (*first.entry(block).or_insert(i), start, i) })
        .collect();
    keyed.sort_unstable();
    let order: Vec<ChunkId> = keyed.iter().map(|k| ids[k.2]).collect();
    let cuts =
        (0..keyed.len()).filter(|&w| keyed.get(w + 1).is_none_or(|n| n.0 != keyed[w].0)).map(|w| order[w]).collect();
    (order, cuts)
}

/// Elapsed milliseconds since `t`.
pub(crate) fn ms(t: Instant) -> u64 {
    t.elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u32) -> Vec<ChunkId> {
        (0..n).map(|i| ChunkId::of(&i.to_le_bytes())).collect()
    }

    #[test]
    fn arrange_puts_each_block_together_in_block_order_and_cuts_at_block_ends() {
        let ids = ids(7);
        // Blocks 5 (members at 0, 100, 200) and 9 (at 0, 50); two singles.
        let layout = [(5, 200), (0, 0), (9, 50), (5, 0), (9, 0), (5, 100), (0, 0)];
        let (order, cuts) = arrange(&ids, &layout);
        assert_eq!(order, vec![ids[3], ids[5], ids[0], ids[1], ids[4], ids[2], ids[6]]);
        let cut: Vec<bool> = order.iter().map(|id| cuts.contains(id)).collect();
        assert_eq!(cut, [false, false, true, true, false, true, true]);
    }

    #[test]
    fn swarm_order_own_segment_first_then_the_rest_newest_first() {
        let all = ids(200);
        let n = 4;
        for me in 0..n {
            let o = order_for_swarm(all.clone(), me, n);
            let mine: Vec<ChunkId> = all.iter().filter(|id| SwarmPlan::segment(id, n) == me).copied().collect();
            let mut rest: Vec<ChunkId> = all.iter().filter(|id| SwarmPlan::segment(id, n) != me).copied().collect();
            rest.reverse();
            assert!(!mine.is_empty() && !rest.is_empty());
            assert_eq!(o[..mine.len()], mine[..]);
            assert_eq!(o[mine.len()..], rest[..]);
        }
    }

    /// Provider 0 is the source, 1 and 2 are fan-out members (segments 1, 2 of 3).
    fn state(todo: &[ChunkId]) -> State {
        State {
            todo: todo.iter().copied().collect(),
            remaining: todo.len(),
            total: todo.len(),
            alive: vec![true; 3],
            member: vec![None, Some(1), Some(2)],
            segments: 3,
            reports: vec![ProviderReport::default(); 3],
            ..Default::default()
        }
    }

    #[test]
    fn members_are_asked_for_their_segment_and_not_yet_is_not_final() {
        let all = ids(300);
        let mut st = state(&all);
        let Take::Batch(b) = st.take(1, 8, 1) else { panic!("member 1 gets a batch") };
        assert!(b.iter().all(|id| SwarmPlan::segment(id, 3) == 1), "only its own segment");
        // Member 1 has none of them yet: they go back and are not asked of it
        // again at once, but they stay wanted.
        for id in &b {
            st.not_yet.entry(*id).or_default().push((1, Instant::now()));
            st.release(1, id);
        }
        assert!(b.iter().all(|id| !st.lacked_by_all(id)), "a member's absent is not final while the source lives");
        if let Take::Batch(b2) = st.take(1, 8, 1) {
            assert!(b2.iter().all(|id| !b.contains(id)), "not asked again before NOT_YET_RETRY");
        }
        // With the source gone and every member having said absent, it is.
        st.alive[0] = false;
        let id = b[0];
        st.not_yet.entry(id).or_default().push((2, Instant::now()));
        assert!(st.lacked_by_all(&id));
        // The source is asked for this fetcher's own segment (0) only...
        let mut st = state(&all);
        let own: Vec<ChunkId> = all.iter().copied().filter(|id| SwarmPlan::segment(id, 3) == 0).collect();
        let Take::Batch(s) = st.take(0, 8, 1) else { panic!("the source gets a batch") };
        assert_eq!(s[..], own[..8]);
        let Take::Batch(s) = st.take(0, 1000, 1) else { panic!("the source gets a batch") };
        assert_eq!(s[..], own[8..], "the rest of the own segment, nothing else");
        assert!(matches!(st.take(0, 8, 1), Take::Wait), "the members' ids are left to them");
        // ...until a member is gone (its ids come from the source at once),
        // or SOURCE_PATIENCE has passed since the own segment was asked for.
        st.alive[1] = false;
        let Take::Batch(s) = st.take(0, 8, 1) else { panic!("a gone member's ids come from the source") };
        assert!(s.iter().all(|id| SwarmPlan::segment(id, 3) == 1), "{s:?}");
        st.own_done = Some(Instant::now() - SOURCE_PATIENCE - Duration::from_millis(1));
        let Take::Batch(s) = st.take(0, 1000, 1) else { panic!("after the patience, the source serves all") };
        assert!(s.iter().any(|id| SwarmPlan::segment(id, 3) == 2), "{s:?}");
    }
}
