//! The daemon's context: the store and peer endpoint of one data
//! directory, and what survives a restart.
//!
//! ```text
//! DATA_DIR/xenod-state.json  node id, last bound address, known peers and
//!                            counters; rewritten atomically, so a restarted
//!                            daemon keeps its port and finds its peers again
//! ```
//!
//! Several daemons run side by side, one per data directory: the socket
//! lives in the data directory and a second daemon on the same one is
//! refused while the first answers on it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use xenod_peer::events::EventKind;
use xenod_peer::{
    EndpointAddr, FetchOptions, FetchProgress, Misbehave, Node, NodeOptions, Relay, Snapshot, Stats, Ticket,
    format_peer, parse_peer,
};
use xenod_store::{Exit, Store};

use super::reply::{self, KnownPeer};
use crate::config::{self, Config, RelayConfig};
use crate::error::{Context, Error, Result};

/// Protocols of the engine's own served on the daemon's endpoint beside
/// the chunk protocol, by ALPN.
pub type Protocols = Vec<(Vec<u8>, Box<dyn xenod_peer::iroh::protocol::DynProtocolHandler>)>;

pub fn state_path(data_dir: &Path) -> PathBuf {
    data_dir.join("xenod-state.json")
}

/// What survives a restart.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub node: String,
    /// The address the endpoint was last bound to; reused when the config
    /// asks for port 0, so tickets handed out stay valid.
    pub addr: Option<SocketAddr>,
    #[serde(default)]
    pub peers: BTreeMap<String, KnownPeer>,
    #[serde(default)]
    pub shared: BTreeSet<String>,
    #[serde(default)]
    pub counters: Snapshot,
}

impl State {
    pub fn load(data_dir: &Path) -> Result<Self> {
        let p = state_path(data_dir);
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("reading {}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    fn save(&self, data_dir: &Path) -> Result<()> {
        let p = state_path(data_dir);
        let tmp = p.with_extension("json.tmp");
        let f = fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        serde_json::to_writer_pretty(&f, self)?;
        f.sync_all()?;
        fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))
    }
}

/// Test hooks ([`crate::hooks`]):
/// `XENOD_TEST_CORRUPT=N` corrupts the next N chunks served,
/// `XENOD_TEST_FORGE_NAMES=1` serves name records with bad signatures,
/// `XENOD_TEST_DELAY_MS=N` sleeps before every chunk frame served.
fn misbehave_from_env() -> Misbehave {
    let num = |k: &str| crate::hooks::var(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Misbehave {
        corrupt_chunks: num("XENOD_TEST_CORRUPT"),
        forge_names: num("XENOD_TEST_FORGE_NAMES") != 0,
        delay_per_chunk: Duration::from_millis(num("XENOD_TEST_DELAY_MS")),
    }
}

/// How long a stopping daemon lets gossip send its goodbye.
const LEAVE_FLUSH: Duration = Duration::from_millis(500);

/// The name part of a reference (`NAME@ID` -> `NAME`).
fn name_of(reference: &str) -> &str {
    reference.rsplit_once('@').map_or(reference, |(n, _)| n)
}

/// The store and peer endpoint of one data directory.
pub struct Daemon {
    data_dir: PathBuf,
    config: Config,
    node: Node,
    state: Mutex<State>,
    shutdown: tokio::sync::Notify,
    /// Set once the daemon says goodbye: nothing more is announced.
    stopping: std::sync::atomic::AtomicBool,
    instances: crate::instance::Instances,
    pub(crate) lazy: super::lazy::Lazy,
    migrations: Mutex<MigrationTotals>,
    pub(crate) net: crate::net::host::NetHost,
    /// Accounting, once the daemon (not an embedded engine) has opened it.
    pub(crate) usage: std::sync::OnceLock<Arc<super::usage::Accounting>>,
    /// Fills the file cache with stacks fetched whole; none in an embedded
    /// engine or when the config turns it off (see `daemon::warm`).
    warmer: Option<super::warm::Warmer>,
}

/// Migrations from this host since the daemon started, for the metrics.
#[derive(Clone, Debug, Default)]
pub struct MigrationTotals {
    pub done: u64,
    pub failed: u64,
    pub wire_bytes: u64,
    pub downtime_sum: f64,
    /// Per bound of `metrics::DOWNTIME_BOUNDS`, then the rest; not cumulative.
    pub downtime_buckets: [u64; 10],
}

impl Daemon {
    /// Opens the store and binds the endpoint: on `listen` if given, else
    /// the configured address, else (port 0) the last bound one if free.
    /// `protocols` makes the engine's own protocols (built again if the
    /// first address is taken). An `embedded` engine (a client command with no daemon) takes any
    /// free port and leaves the daemon's saved address alone.
    pub async fn start(
        data_dir: &Path,
        listen: Option<SocketAddr>,
        embedded: bool,
        protocols: impl Fn() -> Protocols,
    ) -> Result<Arc<Self>> {
        fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        let config = Config::load(data_dir)?;
        let trust = config.trust(data_dir)?;
        let pulls = config.pull_policy(data_dir)?;
        let store =
            Arc::new(Store::open(data_dir).with_context(|| format!("opening the store in {}", data_dir.display()))?);
        let mut state = State::load(data_dir)?;
        let secret = config::node_secret(data_dir)?;
        let mut want = listen.or(config.listen).unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        if embedded {
            want.set_port(0);
        }
        let stats = Arc::new(Stats::from_snapshot(state.counters.clone()));
        let opts = |bind| NodeOptions {
            secret_key: secret,
            bind,
            relay: match config.relay {
                RelayConfig::Disabled => Relay::Disabled,
                RelayConfig::Default => Relay::Default,
            },
            misbehave: misbehave_from_env(),
            pulls: pulls.clone(),
            trust: trust.clone(),
        };
        // Port 0 means "any": prefer the one handed out in earlier tickets.
        let node = match state.addr {
            Some(prev) if !embedded && want.port() == 0 && prev.ip() == want.ip() => {
                match Node::spawn_with(store.clone(), stats.clone(), opts(prev), protocols()).await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::info!("previous address {prev} is taken ({e}); picking another");
                        Node::spawn_with(store.clone(), stats.clone(), opts(want), protocols()).await?
                    }
                }
            }
            _ => Node::spawn_with(store.clone(), stats.clone(), opts(want), protocols()).await?,
        };
        state.node = node.id().to_string();
        if !embedded {
            state.addr = node.endpoint().bound_sockets().into_iter().find(|s| s.is_ipv4() == want.is_ipv4());
        }
        let (sink, events) = super::events::sink();
        let warmer = if !embedded && config.warms_file_cache() {
            let w = super::warm::Warmer::start(store.clone(), config.file_cache_cap())
                .with_context(|| "starting the file cache's warming thread")?;
            Some(w)
        } else {
            None
        };
        let d = Arc::new(Self {
            data_dir: data_dir.to_path_buf(),
            instances: crate::instance::Instances::with_config(data_dir, &config).with_events(sink),
            config,
            node,
            state: Mutex::new(state),
            shutdown: tokio::sync::Notify::new(),
            stopping: Default::default(),
            lazy: Default::default(),
            migrations: Default::default(),
            net: Default::default(),
            usage: Default::default(),
            warmer,
        });
        super::events::spawn_publisher(&d, events);
        d.save_state();
        Ok(d)
    }

    pub(crate) fn save_state(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.counters = self.node.stats().snapshot();
        if let Err(e) = st.save(&self.data_dir) {
            tracing::warn!("saving daemon state: {e:#}");
        }
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Reads the trust entries of `config.toml` again and puts them in
    /// force (the rest of the config needs a restart); the name records
    /// refused earlier under a key now trusted are accepted at once.
    /// A config that does not parse changes nothing.
    pub fn reload_trust(&self) -> Result<super::reply::Reload> {
        let trust = Config::load(&self.data_dir)?.trust(&self.data_dir)?;
        let trusted = trust
            .entries()
            .map(|(k, p)| super::reply::Trusted { key: xenod_store::hex(&k), publishers: p.to_vec() })
            .collect();
        let accepted = self.node.names().set_trust(trust);
        if !accepted.is_empty() {
            tracing::info!("trust reloaded; accepted {}", accepted.join(", "));
        }
        Ok(super::reply::Reload { trusted, accepted, refused_held: self.node.names().refused_held() })
    }

    pub(crate) fn store(&self) -> &Store {
        self.node.store()
    }

    pub fn store_arc(&self) -> Arc<Store> {
        self.node.store().clone()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether the daemon is stopping (it announces nothing more).
    pub fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The configuration the daemon started with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// This host's instances.
    pub fn instances(&self) -> &crate::instance::Instances {
        &self.instances
    }

    /// Counts a migration: its bytes on the wire and the guest's downtime
    /// (seconds), or none if it failed.
    pub(crate) fn migrated(&self, done: Option<(u64, f64)>) {
        let mut m = self.migrations.lock().unwrap_or_else(|e| e.into_inner());
        let Some((bytes, down)) = done else {
            m.failed += 1;
            return;
        };
        m.done += 1;
        m.wire_bytes += bytes;
        m.downtime_sum += down;
        let bounds = super::metrics::DOWNTIME_BOUNDS;
        let b = bounds.iter().position(|&b| down <= b).unwrap_or(bounds.len());
        m.downtime_buckets[b] += 1;
    }

    pub(crate) fn migrations(&self) -> MigrationTotals {
        self.migrations.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn state(&self) -> &Mutex<State> {
        &self.state
    }

    /// Notified when the daemon is asked to stop.
    pub(crate) fn shutdown(&self) -> &tokio::sync::Notify {
        &self.shutdown
    }

    /// Providers to ask when the caller named none: static peers from the
    /// config, then every peer remembered in the state.
    pub fn default_peers(&self) -> Vec<EndpointAddr> {
        let mut out: Vec<EndpointAddr> = self.config.peers.iter().filter_map(|p| parse_peer(p).ok()).collect();
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for (id, p) in &st.peers {
            if let Ok(a) =
                parse_peer(&format!("{id}@{}", p.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",")))
                && !out.iter().any(|o| o.id == a.id)
            {
                out.push(a);
            }
        }
        out
    }

    pub(crate) fn remember(&self, peers: &[EndpointAddr], layers: &[String]) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for p in peers {
            let k = st.peers.entry(p.id.to_string()).or_default();
            let addrs: Vec<SocketAddr> = p.ip_addrs().copied().collect();
            if !addrs.is_empty() {
                k.addrs = addrs;
            }
            k.last_seen = now;
            k.layers.extend(layers.iter().cloned());
        }
    }

    pub(crate) fn parse_peers(from: &[String]) -> Result<Vec<EndpointAddr>> {
        from.iter().map(|p| parse_peer(p).map_err(|e| Error::coded(Exit::BadInput, format!("--from: {e}")))).collect()
    }

    pub(crate) async fn fetch(
        self: &Arc<Self>,
        target: &str,
        from: &[String],
        lazy: bool,
        progress: Option<xenod_peer::ProgressFn>,
    ) -> Result<reply::Fetch> {
        let mut peers = Self::parse_peers(from)?;
        let layer = if target.starts_with("xenod1") {
            let t: Ticket = target.parse()?;
            for p in t.providers {
                if !peers.iter().any(|q| q.id == p.id) {
                    peers.push(p);
                }
            }
            t.layer
        } else {
            if peers.is_empty() {
                peers = self.default_peers();
            }
            match self.store().resolve(target) {
                Ok(id) => id,
                Err(xenod_store::Error::UnknownRef(_)) if target.starts_with(xenod_store::SCHEME) => {
                    // Learn the name from the providers, trusting only signed records.
                    let mut refused = Vec::new();
                    for p in &peers {
                        match self.node.fetch_names(p).await {
                            Ok(rep) => refused.extend(rep.refused.into_iter().filter(|(n, _)| n == name_of(target))),
                            Err(e) => tracing::warn!("asking {} for names: {e}", p.id),
                        }
                    }
                    match self.store().resolve(target) {
                        Ok(id) => id,
                        Err(e) => {
                            self.save_state();
                            if let Some((_, why)) = refused.first() {
                                return Err(Error::coded(Exit::NameRefused, format!("{target}: {why}")));
                            }
                            return Err(e.into());
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            }
        };
        // Nodes that announced holding the layer over gossip come first.
        let mut heard = self.node.providers_of(&layer);
        heard.retain(|h| !peers.iter().any(|p| p.id == h.id));
        peers.splice(0..0, heard);
        let r = if lazy {
            super::lazy::fetch(self, layer, peers.clone(), progress).await
        } else {
            let opts = FetchOptions { progress, ..FetchOptions::default() };
            self.node.fetch(layer, &peers, opts).await.map_err(Into::into)
        };
        let rep = match r {
            Ok(rep) => rep,
            Err(e) => {
                self.save_state();
                return Err(e).with_context(|| format!("fetching {layer}"));
            }
        };
        self.store().pin(&layer.to_string(), &layer)?;
        let useful: Vec<EndpointAddr> = peers
            .iter()
            .filter(|p| rep.providers.iter().any(|r| r.node == p.id.to_string() && r.dropped.is_none()))
            .cloned()
            .collect();
        self.remember(&useful, &rep.stack);
        self.save_state();
        if !lazy {
            self.node.publish_event(EventKind::LayerComplete { layer: layer.to_string() }).await;
            self.warm_file_cache(layer);
        }
        Ok(reply::Fetch { report: rep, lazy })
    }

    /// Has the big lower files of `top`'s stack, fetched whole, copied into
    /// the file cache in the background (if this daemon warms it); returns
    /// at once.
    pub(crate) fn warm_file_cache(&self, top: xenod_store::LayerId) {
        if let Some(w) = &self.warmer {
            w.request(top);
        }
    }

    pub(crate) fn status(&self) -> reply::Status {
        let snap = self.node.stats().snapshot();
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        reply::Status {
            node: self.node.id().to_string(),
            addr: Some(format_peer(&self.node.addr())),
            data_dir: self.data_dir.display().to_string(),
            daemon: true,
            counters: snap.totals,
            peers: snap.peers,
            known_peers: st.peers.clone(),
            shared: st.shared.clone(),
            gossip: Some(reply::Gossip { joined: self.node.gossip_joined(), presences: self.node.presences().len() }),
            lazy_fetches: Some(self.lazy.pending()),
            capacity: Some(self.instances.capacity(None)),
            capacity_warnings: self
                .config
                .capacity
                .as_ref()
                .map(|c| crate::admission::beyond_host(c, &self.data_dir))
                .unwrap_or_default(),
            lazy: Some(self.lazy.counters()),
        }
    }

    /// Saves state and closes the endpoint; peers that do not answer the
    /// close are given 3 s, then dropped.
    pub async fn stop(self: Arc<Self>) {
        self.save_state();
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        // Other hosts forget this one now, not at expiry. A broadcast is
        // only queued when it returns: give gossip a moment to send it
        // before the endpoint closes.
        match tokio::time::timeout(Duration::from_secs(1), self.node.leave()).await {
            Ok(Ok(())) => tokio::time::sleep(LEAVE_FLUSH).await,
            Ok(Err(e)) => tracing::debug!("saying goodbye on gossip: {e}"),
            Err(_) => tracing::debug!("saying goodbye on gossip: timed out"),
        }
        let close = async move {
            match Arc::try_unwrap(self) {
                Ok(d) => d.node.shutdown().await,
                Err(d) => d.node.endpoint().close().await,
            }
        };
        if tokio::time::timeout(Duration::from_secs(3), close).await.is_err() {
            tracing::warn!("peers did not acknowledge the close within 3 s; stopping anyway");
        }
    }
}

/// Calls `f` at most every 200 ms, and always for the last chunk of a phase.
pub fn throttled(f: impl Fn(&FetchProgress) + Send + Sync + 'static) -> xenod_peer::ProgressFn {
    let last = Mutex::new(Instant::now() - Duration::from_secs(1));
    Arc::new(move |p: &FetchProgress| {
        let mut l = last.lock().unwrap_or_else(|e| e.into_inner());
        if p.chunks_done == p.chunks_total || l.elapsed() >= Duration::from_millis(200) {
            *l = Instant::now();
            f(p);
        }
    })
}
