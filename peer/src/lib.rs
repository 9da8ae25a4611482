//! xenod's peer transfer: a verified, compressed chunk protocol over iroh,
//! between the [`Store`]s of `xenod-store`.
//!
//! | module | what it holds |
//! |---|---|
//! | (root) | [`Node`]: one endpoint serving a store and fetching into it; [`PeerError`], [`stack_complete`] |
//! | `protocol` | the wire format on [`ALPN`]: requests, chunk frames, limits ([`MAX_BATCH`], [`MAX_PLAIN`]) |
//! | `provider` | the serving side, with back-pressure ([`FRAMES_IN_FLIGHT`]); [`Misbehave`] test hooks |
//! | `fetch` | multi-provider fetch of a layer stack with work stealing: [`FetchOptions`], [`FetchReport`] |
//! | `one` | [`fetch_one`]: a single chunk, now, for a lazily deployed reader |
//! | `ticket` | `xenod1...` [`Ticket`]s: a layer id and its providers; [`parse_peer`], [`format_peer`] |
//! | `repair` | [`Node::repair_chunks`]: given chunks written anew, each from whichever provider has it ([`ChunkRepair`]) |
//! | `pull` | fan-out: asking other nodes to fetch a stack, on [`PULL_ALPN`] |
//! | `names` | [`NameGate`]: the one door for name records and key successions from peers, under the host's trust |
//! | `netrec` | environments' networks over gossip: signed [`netrec::EnvRecord`]s and [`netrec::Member`]s in a [`netrec::NetBook`] |
//! | `gossip` | signed name records, successions and [`Presence`] (who holds which layer) over iroh-gossip |
//! | `stats` | [`Stats`]: counters of served, fetched and refused chunks, per peer |
//!
//! The store below is synchronous; everything here runs on tokio, and the
//! store's blocking calls go through `spawn_blocking`. [`iroh`] is
//! re-exported for protocols of their own on a [`Node`]'s endpoint
//! ([`Node::spawn_with`]).
//!
//! A [`Node`] is one iroh endpoint (node key = an ed25519 key, like a
//! publisher key) that serves this store on [`ALPN`] and fetches from
//! other nodes. Connections are dialled by node id plus direct socket
//! addresses; relays are off unless asked for, so tests never leave the
//! machine.
//!
//! # Why an own protocol and not iroh-blobs
//!
//! iroh-blobs moves BLAKE3-verified blobs of any size and streams a
//! single large blob well (about 215 MB/s for one raw 1 GiB blob between
//! two processes on loopback here). This workload is different:
//!
//! - hundreds of thousands of small (16-256 KiB) chunks, which already live
//!   in this store's packs. Feeding them through iroh-blobs' own file store
//!   measured 27-52 MB/s here (several fsyncs per blob), and keeping them
//!   only in our packs would need a custom iroh-blobs store backend that
//!   answers its BLAKE3 *tree* (bao) queries, which our ids (flat BLAKE3 of
//!   the plaintext) cannot answer without rehashing.
//! - chunks travel *compressed*, as stored (zstd, ~2-4x on OS trees);
//!   iroh-blobs sends the plaintext bytes its hash covers.
//! - verification per chunk is one BLAKE3 over at most 256 KiB after
//!   decompression, so bao's incremental verification of huge blobs buys
//!   nothing, while its outboard and range bookkeeping cost per chunk.
//!
//! So frames carry the stored bytes of many chunks per request and the
//! receiver verifies each against its id before storing it.
//! `benches/p2p-throughput.sh` measures both side by side. First run (2
//! cores, shared with two compiles): a 1 GiB template (a tar of /usr, 64
//! KiB blocks) moved daemon to daemon in 5.6 s, 190 MB/s of plaintext with
//! 457 MB on the wire, against 4.1 s (259 MB/s, 1074 MB on the wire) for
//! iroh-blobs moving the same bytes as one raw blob between two file
//! stores. The per-chunk iroh-blobs variant (each 64 KiB chunk a blob)
//! would run at the 27-52 MB/s its file store managed here.

pub mod events;
mod fetch;
mod gossip;
mod names;
pub mod netrec;
mod one;
mod protocol;
mod provider;
mod pull;
mod repair;
mod stats;
mod ticket;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iroh::address_lookup::memory::MemoryLookup;
use iroh::endpoint::{PortmapperConfig, presets};
use iroh::protocol::Router;
use iroh::{Endpoint, RelayMode, SecretKey, TransportAddr};
use serde::Serialize;
use xenod_store::{ChunkId, Error, LayerId, MAX_STACK, ManifestFault, NameRecord, Store, Trust};

/// The transport, for protocols of their own on a [`Node`]'s endpoint.
pub use iroh;
/// Node ids and dialable addresses, as iroh defines them.
pub use iroh::{EndpointAddr, EndpointId};

pub use fetch::{
    FetchOptions, FetchProgress, FetchReport, ManifestsFn, NOT_YET_RETRY, Phase, ProgressFn, ProviderReport, SwarmPlan,
};
pub use gossip::{
    Advert, HostAttrs, MAX_ANNOUNCED_LAYERS, MAX_LABEL_LEN, MAX_LABELS, MAX_MESSAGE, MAX_SERVICES, MAX_SKEW, Presence,
    PresenceFn, ServiceAd,
};
pub use names::{MAX_REFUSED, NameGate, Offer};
pub use one::fetch_one;
pub use protocol::{ALPN, MAX_BATCH, MAX_DENSE_LEVEL, MAX_NAMES, MAX_PLAIN};
pub use provider::{FRAMES_IN_FLIGHT, Misbehave, STREAMS_PER_CONN};
pub use pull::{MAX_MEMBERS, PULL_ALPN, PullOutcome, PullPolicy};
pub use repair::{ChunkRepair, RepairProvider, Supplied};
pub use stats::{Counters, PeerCounters, Snapshot, Stats};
pub use ticket::{Ticket, TicketError, format_peer, parse_peer};

use fetch::{ProviderConn, Swarm, held_whole, missing_data_chunks, missing_manifest_chunks, ms, order_for_swarm};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of peer transfer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("binding the peer endpoint on {addr}: {why}")]
    Bind { addr: SocketAddr, why: String },
    #[error("peer {peer}: {why}")]
    Connection { peer: String, why: String },
    #[error("peer {peer} broke the chunk protocol: {why}")]
    Protocol { peer: String, why: String },
    #[error("peer {peer} sent chunk {id} that does not verify: {why}")]
    BadChunk { peer: String, id: ChunkId, why: String },
    #[error("no provider has chunk {id}")]
    Unavailable { id: ChunkId },
    #[error("no provider could be used: {why}")]
    NoProviders { why: String },
    #[error(transparent)]
    Store(#[from] Error),
    #[error(transparent)]
    Ticket(#[from] TicketError),
}

/// Whether the endpoint may use relay servers (and DNS address lookup).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Relay {
    /// Direct addresses only: nothing leaves the listed networks.
    #[default]
    Disabled,
    /// number 0's public relays and DNS lookup, for hosts behind NAT.
    Default,
}

#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// The node's ed25519 secret; its public half is the node id.
    pub secret_key: [u8; 32],
    /// UDP address to listen on; port 0 picks a free one.
    pub bind: SocketAddr,
    pub relay: Relay,
    /// Test hooks; leave at the default.
    pub misbehave: Misbehave,
    /// Which peers may ask this node to fetch a stack (fan-out).
    pub pulls: PullPolicy,
    /// Whose name records this node accepts ([`NameGate::set_trust`]
    /// changes it while the node runs).
    pub trust: Trust,
}

/// Name records a peer offered, sorted by what happened to them.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NamesReport {
    pub accepted: Vec<String>,
    /// Already held with the same sequence number.
    pub unchanged: usize,
    /// `(name, why)` for each record refused.
    pub refused: Vec<(String, String)>,
}

/// One iroh endpoint serving a store and fetching into it.
pub struct Node {
    router: Router,
    engine: Engine,
    gossip: gossip::GossipState,
    events: Arc<events::Events>,
    /// Test hook: announce name records with broken signatures.
    forge_names: bool,
}

/// What a fetch needs: the endpoint to dial from, the store to fill, the
/// counters to keep. Shared by [`Node`] and the pull handler.
#[derive(Clone)]
pub(crate) struct Engine {
    endpoint: Endpoint,
    store: Arc<Store>,
    stats: Arc<Stats>,
    names: Arc<NameGate>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.id()).finish_non_exhaustive()
    }
}

impl Node {
    /// Binds the endpoint and starts serving `store`.
    pub async fn spawn(store: Arc<Store>, stats: Arc<Stats>, opts: NodeOptions) -> Result<Self, PeerError> {
        Self::spawn_with(store, stats, opts, Vec::new()).await
    }

    /// Like [`Node::spawn`], also accepting the protocols in `extra` (by
    /// ALPN) on the same endpoint.
    pub async fn spawn_with(
        store: Arc<Store>,
        stats: Arc<Stats>,
        opts: NodeOptions,
        extra: Vec<(Vec<u8>, Box<dyn iroh::protocol::DynProtocolHandler>)>,
    ) -> Result<Self, PeerError> {
        let bind_err = |why: String| PeerError::Bind { addr: opts.bind, why };
        let builder = match opts.relay {
            Relay::Disabled => Endpoint::builder(presets::Minimal).relay_mode(RelayMode::Disabled),
            Relay::Default => Endpoint::builder(presets::N0),
        };
        // Addresses of gossip peers, which gossip dials by node id alone.
        let lookup = MemoryLookup::new();
        let endpoint = builder
            .address_lookup(lookup.clone())
            .secret_key(SecretKey::from_bytes(&opts.secret_key))
            .portmapper_config(PortmapperConfig::Disabled)
            .clear_ip_transports()
            .bind_addr(opts.bind)
            .map_err(|e| bind_err(e.to_string()))?
            .bind()
            .await
            .map_err(|e| bind_err(e.to_string()))?;
        let forge_names = opts.misbehave.forge_names;
        let provider = provider::Provider::new(store.clone(), stats.clone(), opts.misbehave);
        let names = Arc::new(NameGate::new(store.clone(), stats.clone(), opts.trust));
        let engine = Engine { endpoint: endpoint.clone(), store, stats, names };
        let puller = pull::PullHandler::new(engine.clone(), opts.pulls);
        let g = iroh_gossip::Gossip::builder().max_message_size(gossip::MAX_MESSAGE).spawn(endpoint.clone());
        let mut router = Router::builder(endpoint)
            .accept(ALPN, provider)
            .accept(PULL_ALPN, puller)
            .accept(iroh_gossip::ALPN, g.clone());
        for (alpn, handler) in extra {
            router = router.accept(alpn, handler);
        }
        let router = router.spawn();
        let events = Arc::new(events::Events::new(router.endpoint().id().to_string()));
        Ok(Self { router, engine, gossip: gossip::GossipState::new(g, lookup), events, forge_names })
    }

    pub fn endpoint(&self) -> &Endpoint {
        self.router.endpoint()
    }

    pub fn id(&self) -> EndpointId {
        self.endpoint().id()
    }

    /// This node's id and the addresses it can be dialled on.
    pub fn addr(&self) -> EndpointAddr {
        let mut a = self.endpoint().addr();
        for s in self.endpoint().bound_sockets() {
            if !s.ip().is_unspecified() {
                a.addrs.insert(TransportAddr::Ip(s));
            }
        }
        a.addrs.retain(|t| !matches!(t, TransportAddr::Ip(s) if s.ip().is_unspecified()));
        a
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.engine.stats
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.engine.store
    }

    /// Fetches layer `layer` and the stack below it from `providers`,
    /// asking only for chunks this store lacks. Everything stored is
    /// verified and durable on return.
    pub async fn fetch(
        &self,
        layer: LayerId,
        providers: &[EndpointAddr],
        opts: FetchOptions,
    ) -> Result<FetchReport, PeerError> {
        self.engine.fetch(layer, providers, opts).await
    }

    /// Fetches `ids` from `providers`, asked in turn, and stores each anew
    /// (replacing a damaged copy) once it verifies; chunks no provider
    /// has are listed, not an error. Everything stored is durable on return.
    pub async fn repair_chunks(&self, ids: &[ChunkId], providers: &[EndpointAddr]) -> Result<ChunkRepair, PeerError> {
        self.engine.repair_chunks(ids, providers).await
    }

    /// Asks every node in `targets` to fetch `layer` from this node and
    /// from each other at once (see [`SwarmPlan`]); returns each one's
    /// outcome, in order.
    pub async fn replicate(&self, layer: LayerId, targets: &[EndpointAddr]) -> Vec<PullOutcome> {
        pull::replicate(&self.engine, self.addr(), layer, targets).await
    }

    /// Asks `provider` for its name records and keeps those the node's
    /// trust admits and newer than what is held.
    pub async fn fetch_names(&self, provider: &EndpointAddr) -> Result<NamesReport, PeerError> {
        self.engine.fetch_names(provider).await
    }

    /// Where name records from peers are admitted; its trust can change
    /// while the node runs.
    pub fn names(&self) -> &Arc<NameGate> {
        &self.engine.names
    }

    /// Joins the gossip topic through `bootstrap` (see the `gossip` module):
    /// from then on, name records and successions are offered to
    /// [`Node::names`] as they are announced, and each believed presence is
    /// remembered and handed to `on_presence`.
    pub async fn join_gossip(
        &self,
        bootstrap: Vec<EndpointAddr>,
        on_presence: Option<PresenceFn>,
    ) -> Result<(), PeerError> {
        self.gossip
            .join(bootstrap, self.id(), self.stats().clone(), self.names().clone(), self.events.clone(), on_presence)
            .await
            .map_err(|why| PeerError::Connection { peer: "gossip".into(), why })
    }

    /// Notified when a gossip neighbour comes up (see [`Node::announce`]:
    /// a daemon announces then, besides its period).
    pub fn neighbour_up(&self) -> Arc<tokio::sync::Notify> {
        self.gossip.neighbour_up.clone()
    }

    /// What this node heard of environments' networks.
    pub fn net(&self) -> &Arc<netrec::NetBook> {
        &self.gossip.net
    }

    /// Signs a net record with this node's key.
    pub fn sign_net(&self, body: &netrec::NetBody) -> netrec::Signed {
        netrec::Signed::sign(self.endpoint().secret_key(), body)
    }

    /// Broadcasts signed net records on the gossip topic.
    pub async fn announce_net(&self, records: Vec<netrec::Signed>) -> Result<(), PeerError> {
        self.gossip.send_net(records).await.map_err(|why| PeerError::Connection { peer: "gossip".into(), why })
    }

    /// Whether this node has joined the gossip topic.
    pub fn gossip_joined(&self) -> bool {
        self.gossip.joined()
    }

    /// Announces this node's presence (address, the newest
    /// [`MAX_ANNOUNCED_LAYERS`] layers it holds, and what `ad` says: its
    /// attributes, which make it a host advertisement, and services), and
    /// `ad`'s name records and successions.
    pub async fn announce(&self, mut ad: Advert) -> Result<(), PeerError> {
        if self.forge_names {
            for r in &mut ad.names {
                let mut b = *r.id.as_bytes();
                b[0] ^= 0xff;
                r.id = ChunkId::from_bytes(b);
            }
        }
        let mut layers = self.store().layers()?;
        layers.retain(|(_, i)| !i.partial);
        layers.sort_by_key(|(_, i)| std::cmp::Reverse(i.created));
        let layers = layers.into_iter().map(|(id, _)| id).collect();
        let addrs = self.addr().ip_addrs().copied().collect();
        self.gossip
            .announce(self.endpoint().secret_key(), addrs, layers, ad)
            .await
            .map_err(|why| PeerError::Connection { peer: "gossip".into(), why })
    }

    /// The events this node knows: its own and those heard.
    pub fn events(&self) -> &Arc<events::Events> {
        &self.events
    }

    /// Records an event of this host and publishes it on the gossip topic
    /// (only records it when not joined).
    pub async fn publish_event(&self, kind: events::EventKind) {
        let ev = self.events.make(kind);
        self.events.record(ev.clone());
        if self.gossip.joined()
            && let Err(e) = self.gossip.send_event(self.endpoint().secret_key(), &ev).await
        {
            tracing::debug!("publishing event {}: {e}", ev.kind.type_name());
        }
    }

    /// Records what this host noticed (another host joined or left),
    /// without publishing it: every host notices for itself.
    pub fn note_event(&self, kind: events::EventKind) {
        self.events.record(self.events.make(kind));
    }

    /// Nodes that announced holding `layer`, newest announcement first.
    pub fn providers_of(&self, layer: &LayerId) -> Vec<EndpointAddr> {
        self.gossip.providers_of(layer)
    }

    /// Every presence heard over gossip.
    pub fn presences(&self) -> Vec<Presence> {
        self.gossip.presences()
    }

    /// Host advertisements heard within `expiry`, with their age.
    pub fn hosts(&self, expiry: Duration) -> Vec<(Presence, Duration)> {
        self.gossip.hosts(expiry)
    }

    /// Tells the gossip topic this node is stopping.
    pub async fn leave(&self) -> Result<(), PeerError> {
        self.gossip
            .leave(self.endpoint().secret_key())
            .await
            .map_err(|why| PeerError::Connection { peer: "gossip".into(), why })
    }

    /// Closes the endpoint gracefully.
    pub async fn shutdown(self) {
        let _ = self.router.shutdown().await;
    }
}

impl Engine {
    pub(crate) async fn connect(
        &self,
        addr: &EndpointAddr,
        alpn: &[u8],
    ) -> Result<iroh::endpoint::Connection, PeerError> {
        let peer = addr.id.to_string();
        match tokio::time::timeout(CONNECT_TIMEOUT, self.endpoint.connect(addr.clone(), alpn)).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(PeerError::Connection { peer, why: format!("connecting: {e}") }),
            Err(_) => Err(PeerError::Connection { peer, why: "connecting: timed out".into() }),
        }
    }

    fn id(&self) -> EndpointId {
        self.endpoint.id()
    }

    fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub(crate) async fn fetch(
        &self,
        layer: LayerId,
        providers: &[EndpointAddr],
        opts: FetchOptions,
    ) -> Result<FetchReport, PeerError> {
        self.stats.totals(|t| t.fetches += 1);
        let r = self.fetch_inner(layer, providers, opts).await;
        if r.is_err() {
            self.stats.totals(|t| t.fetches_failed += 1);
        }
        // Keep whatever verified chunks arrived, even on failure: the
        // next attempt will not ask for them again.
        let store = self.store.clone();
        let t0 = Instant::now();
        let flushed = tokio::task::spawn_blocking(move || store.flush()).await;
        tracing::debug!(ms = ms(t0), "fetch of {layer}: flushed");
        match (r, flushed) {
            (Ok(rep), Ok(Ok(()))) => Ok(rep),
            (Ok(_), Ok(Err(e))) => Err(e.into()),
            (Ok(_), Err(e)) => Err(PeerError::NoProviders { why: format!("flush task: {e}") }),
            (Err(e), _) => Err(e),
        }
    }

    async fn fetch_inner(
        &self,
        layer: LayerId,
        providers: &[EndpointAddr],
        opts: FetchOptions,
    ) -> Result<FetchReport, PeerError> {
        let t0 = Instant::now();
        self.store.refresh_view();
        let store = self.store.clone();
        let _lock = tokio::task::spawn_blocking(move || store.write_lock())
            .await
            .map_err(|e| PeerError::NoProviders { why: format!("lock task: {e}") })??;

        // Held whole already, with its prefetch order: nothing to ask
        // anyone, so no connection and no round trip (113 ms for a no-op
        // fetch over a 50 ms link). Without an order the providers are
        // still asked for one (a publisher gets back the order a lazy
        // deploy elsewhere recorded).
        let manifests_only = opts.manifests_only;
        let held = match self.store.order_bytes(&layer)? {
            Some(_) => {
                let store = self.store.clone();
                tokio::task::spawn_blocking(move || held_whole(&store, layer, manifests_only))
                    .await
                    .map_err(|e| PeerError::NoProviders { why: format!("scan task: {e}") })??
            }
            None => None,
        };
        if let Some((stack, local)) = held {
            self.store.record_layers(&stack, manifests_only)?;
            let rep = FetchReport {
                layer: layer.to_string(),
                stack: stack.iter().map(|s| s.to_string()).collect(),
                chunks_local: local,
                elapsed_ms: ms(t0),
                ..Default::default()
            };
            if let Some(f) = opts.on_manifests.as_ref().filter(|_| !manifests_only) {
                f(&rep);
            }
            tracing::debug!(ms = ms(t0), "fetch of {layer}: held whole here");
            return Ok(rep);
        }

        let mut set = tokio::task::JoinSet::new();
        for (i, p) in providers.iter().enumerate() {
            if p.id == self.id() {
                continue;
            }
            let ep = self.endpoint().clone();
            let p = p.clone();
            set.spawn(async move {
                let r = tokio::time::timeout(CONNECT_TIMEOUT, ep.connect(p.clone(), ALPN)).await;
                let r = match r {
                    Ok(Ok(c)) => Ok(c),
                    Ok(Err(e)) => Err(format!("connecting: {e}")),
                    Err(_) => Err("connecting: timed out".to_owned()),
                };
                (i, p.id.to_string(), r)
            });
        }
        let mut conns = set.join_all().await;
        conns.sort_by_key(|(i, _, _)| *i);
        tracing::debug!(ms = ms(t0), "fetch of {layer}: connected");
        let plan = opts.swarm.clone().filter(|p| p.members.len() > 1 && p.index(&self.id()).is_some());
        let conns = conns
            .into_iter()
            .map(|(i, node, r)| {
                let member = plan.as_ref().and_then(|pl| pl.index(&providers[i].id));
                ProviderConn { node, member, conn: r }
            })
            .collect();
        let order = |ids: Vec<ChunkId>| match &plan {
            Some(pl) => order_for_swarm(ids, pl.index(&self.id()).unwrap_or(0), pl.members.len()),
            None => ids,
        };
        let on_manifests = opts.on_manifests.clone().filter(|_| !manifests_only);
        let read_timeout = opts.read_timeout;
        let swarm = Swarm::new(self.store.clone(), self.stats.clone(), conns, opts);
        // The stack's prefetch order, asked for while the manifests come.
        let mut asking = match self.store.order_bytes(&layer)? {
            Some(_) => None,
            None => Some(tokio::spawn(fetch::ask_order(swarm.connections(), layer, read_timeout))),
        };

        // Roots, top down: each names its base.
        let mut stack = Vec::new();
        let mut local = 0;
        let mut fetched = 0;
        let mut cur = layer;
        loop {
            if self.store.holds_intact(&cur)? {
                local += 1;
            } else {
                swarm.run(Phase::Roots, vec![cur]).await?;
                fetched += 1;
            }
            let root = self.store.layer_root(&cur)?;
            stack.push(cur);
            match root.base {
                Some(b) if stack.len() >= MAX_STACK => {
                    return Err(
                        Error::Manifest { layer: b.to_string(), fault: Box::new(ManifestFault::StackTooDeep) }.into()
                    );
                }
                Some(b) => cur = b,
                None => break,
            }
        }
        stack.reverse();
        tracing::debug!(ms = ms(t0), "fetch of {layer}: roots of {} layers", stack.len());

        type Scan = fn(&Store, &[LayerId]) -> Result<(Vec<ChunkId>, u64), Error>;
        let mut phases: Vec<(Phase, Scan)> = vec![(Phase::Manifests, missing_manifest_chunks)];
        if !manifests_only {
            phases.push((Phase::Data, missing_data_chunks));
        }
        // What the fetch did so far (at the manifests, and at its end).
        let report = |fetched, local, udp_bytes, prefetched, order_from| FetchReport {
            layer: layer.to_string(),
            stack: stack.iter().map(|s| s.to_string()).collect(),
            chunks_fetched: fetched,
            chunks_local: local,
            bytes: swarm.bytes(),
            wire_bytes: swarm.wire_bytes(),
            udp_bytes,
            elapsed_ms: ms(t0),
            providers: swarm.reports(),
            prefetched,
            order_from,
        };
        let mut order_from = None;
        let mut prefetched = 0;
        for (phase, scan) in phases {
            let (store, s) = (self.store.clone(), stack.clone());
            let (mut want, l) = tokio::task::spawn_blocking(move || scan(&store, &s))
                .await
                .map_err(|e| PeerError::NoProviders { why: format!("scan task: {e}") })??;
            local += l;
            fetched += want.len() as u64;
            if phase == Phase::Data {
                let first = self.prefetch_first(&layer, &mut want)?;
                prefetched = first.len() as u64;
                swarm.run(Phase::Prefetch, first).await?;
                swarm.prefetch_done().await?;
            }
            let n = want.len();
            swarm.run(phase, order(want)).await?;
            tracing::debug!(ms = ms(t0), "fetch of {layer}: {phase:?}, {n} chunks");
            if phase == Phase::Manifests
                && let Some(task) = asking.take()
            {
                order_from = self.keep_order(layer, task).await;
            }
            if phase == Phase::Manifests
                && let Some(f) = &on_manifests
            {
                let (store, s) = (self.store.clone(), stack.clone());
                tokio::task::spawn_blocking(move || store.flush().and_then(|()| store.record_layers(&s, true)))
                    .await
                    .map_err(|e| PeerError::NoProviders { why: format!("recording task: {e}") })??;
                f(&report(fetched, local, 0, 0, order_from.clone()));
            }
        }
        let udp_bytes = swarm.close();

        self.store.record_layers(&stack, manifests_only)?;
        tracing::debug!(ms = ms(t0), "fetch of {layer}: recorded");
        Ok(report(fetched, local, udp_bytes, prefetched, order_from))
    }

    /// Keeps the prefetch order `task` got from a provider, once it checks
    /// out against the stack's manifests (here by now); who gave it.
    async fn keep_order(
        &self,
        layer: LayerId,
        task: tokio::task::JoinHandle<Option<(String, Vec<u8>)>>,
    ) -> Option<String> {
        let (node, rec) = task.await.ok().flatten()?;
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.put_order_bytes(&layer, &rec)).await {
            Ok(Ok(o)) => {
                tracing::info!("prefetch order of {layer} from {node}: {} chunks", o.ids.len());
                Some(node)
            }
            Ok(Err(e)) => {
                tracing::warn!("refused the prefetch order {node} sent: {e}");
                None
            }
            Err(e) => {
                tracing::warn!("keeping a prefetch order: {e}");
                None
            }
        }
    }

    /// Takes out of `want` the chunks of the stack's prefetch order, in
    /// that order, to be fetched first. A held order that does not decode
    /// is ignored (and said).
    fn prefetch_first(&self, layer: &LayerId, want: &mut Vec<ChunkId>) -> Result<Vec<ChunkId>, PeerError> {
        let order = match self.store.order(layer) {
            Ok(Some(o)) => o,
            Ok(None) => return Ok(Vec::new()),
            Err(e @ Error::Order { .. }) => {
                tracing::warn!("{e}");
                return Ok(Vec::new());
            }
            Err(e) => return Err(e.into()),
        };
        let wanted: std::collections::HashSet<ChunkId> = want.iter().copied().collect();
        let first: Vec<ChunkId> = order.ids.into_iter().filter(|id| wanted.contains(id)).collect();
        let firsts: std::collections::HashSet<ChunkId> = first.iter().copied().collect();
        want.retain(|id| !firsts.contains(id));
        Ok(first)
    }

    pub(crate) async fn fetch_names(&self, provider: &EndpointAddr) -> Result<NamesReport, PeerError> {
        let peer = provider.id.to_string();
        let conn = self.connect(provider, ALPN).await?;
        let cerr = |e: &dyn std::fmt::Display| PeerError::Connection { peer: peer.clone(), why: e.to_string() };
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| cerr(&e))?;
        send.write_all(&protocol::Request::Names.encode()).await.map_err(|e| cerr(&e))?;
        send.finish().map_err(|e| cerr(&e))?;
        let json = tokio::time::timeout(Duration::from_secs(30), protocol::read_names(&mut recv))
            .await
            .map_err(|_| cerr(&"no names answer within the timeout"))?
            .map_err(|e| PeerError::Protocol { peer: peer.clone(), why: e.to_string() })?;
        conn.close(0u32.into(), b"done");
        let recs: Vec<NameRecord> = serde_json::from_slice(&json)
            .map_err(|e| PeerError::Protocol { peer: peer.clone(), why: format!("names answer: {e}") })?;
        let mut rep = NamesReport::default();
        for rec in recs {
            match self.names.offer(&rec, &peer) {
                Offer::Accepted => rep.accepted.push(rec.name),
                Offer::Held => rep.unchanged += 1,
                Offer::Refused(why) => rep.refused.push((rec.name, why)),
            }
        }
        Ok(rep)
    }
}

/// Whether the whole stack of `top` (roots, manifests, data) is in `store`,
/// so using it needs no peer.
pub fn stack_complete(store: &Store, top: &LayerId) -> Result<bool, Error> {
    store.refresh_view();
    let mut stack = Vec::new();
    let mut cur = *top;
    loop {
        if !store.holds_intact(&cur)? {
            return Ok(false);
        }
        stack.push(cur);
        match store.layer_root(&cur)?.base {
            Some(b) if stack.len() < MAX_STACK => cur = b,
            Some(_) => return Ok(false),
            None => break,
        }
    }
    if !missing_manifest_chunks(store, &stack)?.0.is_empty() {
        return Ok(false);
    }
    Ok(missing_data_chunks(store, &stack)?.0.is_empty())
}
