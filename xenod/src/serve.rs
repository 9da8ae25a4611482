//! `xenod serve`: the per-host daemon, and the same engine embedded in a
//! client command when no daemon runs.
//!
//! ```text
//! DATA_DIR/xenod.sock        local API: one JSON request line per connection,
//!                            answered by {"progress":..} lines and one
//!                            {"ok":true,"result":..} or {"ok":false,"error":..,"code":N}
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

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use xenod_peer::{
    EndpointAddr, FetchOptions, FetchProgress, Misbehave, Node, NodeOptions, Relay, Snapshot, Stats, Ticket,
    format_peer, parse_peer,
};
use xenod_store::{Store, VerifyingKey};

use crate::config::{self, Config, RelayConfig};
use crate::{Coded, Exit};

tokio::task_local! {
    /// Where a request's `{"note":..}` lines go (its client), see [`note`].
    static NOTES: tokio::sync::mpsc::UnboundedSender<Value>;
}

/// Tells the client of the current request what a long operation is
/// doing; on stderr where there is no client (an embedded engine).
pub fn note(msg: impl Into<String>) {
    let msg = msg.into();
    if NOTES.try_with(|tx| tx.send(json!({ "note": msg.clone() }))).is_err() {
        eprintln!("xenod: {msg}");
    }
}

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("xenod.sock")
}

pub fn state_path(data_dir: &Path) -> PathBuf {
    data_dir.join("xenod-state.json")
}

/// A peer this host has exchanged layers with.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KnownPeer {
    pub addrs: Vec<SocketAddr>,
    /// Unix seconds.
    pub last_seen: u64,
    /// Layers it provided or that we fetched from it.
    #[serde(default)]
    pub layers: BTreeSet<String>,
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

/// A request on the local API.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// A ticket for REF, served by this daemon.
    Share {
        r#ref: String,
    },
    /// Pull a stack (by ticket or reference) into the store.
    Fetch {
        target: String,
        #[serde(default)]
        from: Vec<String>,
        /// Layer roots and manifests now, file data in the background
        /// (chunks a reader needs first are fetched at once, see `Chunk`).
        #[serde(default)]
        lazy: bool,
    },
    /// One chunk's plaintext (hex), from the providers of lazy fetches.
    Chunk {
        id: String,
    },
    /// Ask peers for their signed name records.
    Names {
        #[serde(default)]
        from: Vec<String>,
    },
    /// Have peers fetch a stack from this host and from each other.
    Replicate {
        r#ref: String,
        to: Vec<String>,
    },
    Shutdown,
    /// Move an instance to another host.
    Migrate {
        instance: String,
        to: String,
        #[serde(default)]
        cold: bool,
        /// How pre-copy compresses; the default when absent.
        #[serde(default)]
        level: Option<xenod_store::Dense>,
        /// Save the guest's memory while it runs, or fail.
        #[serde(default)]
        live: bool,
        /// Save the guest stopped (not live).
        #[serde(default)]
        save: bool,
    },
    /// Save an instance's upper layer and machine state as a layer.
    Checkpoint {
        instance: String,
        #[serde(default)]
        name: Option<String>,
    },
    /// Run a checkpoint again, here or on another host.
    Restore {
        checkpoint: String,
        #[serde(default)]
        on: Option<String>,
        #[serde(default)]
        name: Option<String>,
    },
}

/// Test hooks from the environment (never set in production):
/// `XENOD_TEST_CORRUPT=N` corrupts the next N chunks served,
/// `XENOD_TEST_FORGE_NAMES=1` serves name records with bad signatures,
/// `XENOD_TEST_DELAY_MS=N` sleeps before every chunk frame served.
fn misbehave_from_env() -> Misbehave {
    let num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Misbehave {
        corrupt_chunks: num("XENOD_TEST_CORRUPT"),
        forge_names: num("XENOD_TEST_FORGE_NAMES") != 0,
        delay_per_chunk: Duration::from_millis(num("XENOD_TEST_DELAY_MS")),
    }
}

/// The store and peer endpoint of one data directory.
pub struct Daemon {
    data_dir: PathBuf,
    config: Config,
    trusted: Vec<VerifyingKey>,
    node: Node,
    state: Mutex<State>,
    shutdown: tokio::sync::Notify,
    pub(crate) lazy: crate::lazy::Lazy,
}

impl Daemon {
    /// Opens the store and binds the endpoint: on `listen` if given, else
    /// the configured address, else (port 0) the last bound one if free.
    /// An `embedded` engine (a client command with no daemon) takes any
    /// free port and leaves the daemon's saved address alone.
    pub async fn start(data_dir: &Path, listen: Option<SocketAddr>, embedded: bool) -> Result<Arc<Self>> {
        fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        let config = Config::load(data_dir)?;
        let trusted = config.trusted(data_dir)?;
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
        let migrate = crate::migrate::Handler::default();
        let extra = || -> Vec<(Vec<u8>, Box<dyn xenod_peer::iroh::protocol::DynProtocolHandler>)> {
            vec![(crate::migrate::ALPN.to_vec(), Box::new(migrate.clone()))]
        };
        let opts = |bind| NodeOptions {
            secret_key: secret,
            bind,
            relay: match config.relay {
                RelayConfig::Disabled => Relay::Disabled,
                RelayConfig::Default => Relay::Default,
            },
            misbehave: misbehave_from_env(),
            pulls: pulls.clone(),
        };
        // Port 0 means "any": prefer the one handed out in earlier tickets.
        let node = match state.addr {
            Some(prev) if !embedded && want.port() == 0 && prev.ip() == want.ip() => {
                match Node::spawn_with(store.clone(), stats.clone(), opts(prev), extra()).await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::info!("previous address {prev} is taken ({e}); picking another");
                        Node::spawn_with(store.clone(), stats.clone(), opts(want), extra()).await?
                    }
                }
            }
            _ => Node::spawn_with(store.clone(), stats.clone(), opts(want), extra()).await?,
        };
        state.node = node.id().to_string();
        if !embedded {
            state.addr = node.endpoint().bound_sockets().into_iter().find(|s| s.is_ipv4() == want.is_ipv4());
        }
        let d = Arc::new(Self {
            data_dir: data_dir.to_path_buf(),
            config,
            trusted,
            node,
            state: Mutex::new(state),
            shutdown: tokio::sync::Notify::new(),
            lazy: Default::default(),
        });
        let _ = migrate.daemon.set(Arc::downgrade(&d));
        d.save_state();
        Ok(d)
    }

    fn save_state(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.counters = self.node.stats().snapshot();
        if let Err(e) = st.save(&self.data_dir) {
            tracing::warn!("saving daemon state: {e:#}");
        }
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn trusted(&self) -> &[VerifyingKey] {
        &self.trusted
    }

    fn store(&self) -> &Store {
        self.node.store()
    }

    pub fn store_arc(&self) -> Arc<Store> {
        self.node.store().clone()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
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

    fn parse_peers(from: &[String]) -> Result<Vec<EndpointAddr>> {
        from.iter()
            .map(|p| parse_peer(p).map_err(|e| Coded { code: Exit::BadInput, msg: format!("--from: {e}") }.into()))
            .collect()
    }

    /// Answers one API request; `progress` receives fetch progress.
    pub async fn handle(self: &Arc<Self>, req: Request, progress: Option<xenod_peer::ProgressFn>) -> Result<Value> {
        match req {
            Request::Migrate { instance, to, cold, level, live, save } => {
                let mode = match (live, save) {
                    (true, true) => {
                        return Err(
                            Coded { code: Exit::BadInput, msg: "--live and --save exclude each other".into() }.into()
                        );
                    }
                    (true, false) => crate::migrate::SaveMode::Live,
                    (false, true) => crate::migrate::SaveMode::Stopped,
                    (false, false) => crate::migrate::SaveMode::Auto,
                };
                crate::migrate::migrate(self, &instance, &to, cold, mode, level).await
            }
            Request::Checkpoint { instance, name } => crate::migrate::checkpoint(self, &instance, name).await,
            Request::Restore { checkpoint, on, name } => {
                crate::migrate::restore(self, &checkpoint, on.as_deref(), name).await
            }
            Request::Status => Ok(self.status()),
            Request::Share { r#ref } => {
                let id = self.store().resolve(&r#ref)?;
                // Refuse to hand out a ticket for a stack we cannot serve whole.
                let stack = self.store().stack(&id)?;
                for l in &stack {
                    for c in self.store().layer_root(l)?.manifest {
                        if !self.store().contains(&c.id)? {
                            bail!("layer {l} is incomplete here (manifest chunk {} missing)", c.id);
                        }
                    }
                }
                let name = r#ref.starts_with(xenod_store::SCHEME).then(|| r#ref.clone());
                let ticket = Ticket { layer: id, name, providers: vec![self.node.addr()] };
                self.state.lock().unwrap_or_else(|e| e.into_inner()).shared.insert(id.to_string());
                self.save_state();
                Ok(json!({ "layer": id.to_string(), "node": self.node.id().to_string(),
                           "addr": format_peer(&self.node.addr()), "ticket": ticket.to_string() }))
            }
            Request::Names { from } => {
                let mut peers = Self::parse_peers(&from)?;
                if peers.is_empty() {
                    peers = self.default_peers();
                }
                let mut out = Vec::new();
                for p in &peers {
                    let r = self.node.fetch_names(p, &self.trusted).await;
                    out.push(match r {
                        Ok(rep) => json!({ "peer": p.id.to_string(), "accepted": rep.accepted,
                                            "unchanged": rep.unchanged, "refused": rep.refused }),
                        Err(e) => json!({ "peer": p.id.to_string(), "error": e.to_string() }),
                    });
                }
                self.save_state();
                Ok(json!({ "peers": out }))
            }
            Request::Fetch { target, from, lazy } => self.fetch(&target, &from, lazy, progress).await,
            Request::Chunk { id } => crate::lazy::chunk(self, &id).await,
            Request::Replicate { r#ref, to } => crate::replicate::replicate(self, &r#ref, &to).await,
            Request::Shutdown => {
                // notify_one keeps a permit when the accept loop is not
                // waiting at this instant; notify_waiters would lose it.
                self.shutdown.notify_one();
                Ok(json!({ "stopping": true }))
            }
        }
    }

    async fn fetch(
        self: &Arc<Self>,
        target: &str,
        from: &[String],
        lazy: bool,
        progress: Option<xenod_peer::ProgressFn>,
    ) -> Result<Value> {
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
                        match self.node.fetch_names(p, &self.trusted).await {
                            Ok(rep) => refused.extend(rep.refused.into_iter().filter(|(n, _)| n == target)),
                            Err(e) => tracing::warn!("asking {} for names: {e}", p.id),
                        }
                    }
                    match self.store().resolve(target) {
                        Ok(id) => id,
                        Err(e) => {
                            self.save_state();
                            if let Some((_, why)) = refused.first() {
                                return Err(Coded { code: Exit::NameRefused, msg: format!("{target}: {why}") }.into());
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
        let opts = FetchOptions { progress, manifests_only: lazy, ..FetchOptions::default() };
        let r = self.node.fetch(layer, &peers, opts).await;
        let rep = match r {
            Ok(rep) => rep,
            Err(e) => {
                self.save_state();
                return Err(peer_err(e)).with_context(|| format!("fetching {layer}"));
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
        if lazy {
            crate::lazy::background(self, layer, peers);
        }
        let mut v = serde_json::to_value(&rep)?;
        v["lazy"] = json!(lazy);
        Ok(v)
    }

    fn status(&self) -> Value {
        let snap = self.node.stats().snapshot();
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        json!({
            "node": self.node.id().to_string(),
            "addr": format_peer(&self.node.addr()),
            "data_dir": self.data_dir.display().to_string(),
            "daemon": true,
            "counters": snap.totals,
            "peers": snap.peers,
            "known_peers": st.peers,
            "shared": st.shared,
            "gossip": { "joined": self.node.gossip_joined(), "presences": self.node.presences().len() },
            "lazy_fetches": self.lazy.pending(),
        })
    }

    /// Serves the local API until asked to stop or signalled.
    pub async fn serve_socket(self: Arc<Self>, on_ready: impl FnOnce()) -> Result<()> {
        let sock = socket_path(&self.data_dir);
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            bail!("a daemon already serves {} (socket {})", self.data_dir.display(), sock.display());
        }
        let _ = fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        on_ready();
        loop {
            tokio::select! {
                a = listener.accept() => {
                    let (s, _) = a.context("accepting on the local socket")?;
                    let me = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = me.client(s).await {
                            tracing::debug!("local client: {e:#}");
                        }
                    });
                }
                _ = self.shutdown.notified() => break,
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = tick.tick() => self.save_state(),
            }
        }
        let _ = fs::remove_file(&sock);
        self.save_state();
        Ok(())
    }

    async fn client(self: &Arc<Self>, s: UnixStream) -> Result<()> {
        let (r, mut w) = s.into_split();
        let mut line = String::new();
        BufReader::new(r.take(1 << 20)).read_line(&mut line).await?;
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                let v = json!({ "ok": false, "error": format!("bad request: {e}"), "code": Exit::BadInput as u8 });
                w.write_all(format!("{v}\n").as_bytes()).await?;
                return Ok(());
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
        let notes = tx.clone();
        let progress = throttled(move |p: &FetchProgress| {
            let _ = tx.send(json!({ "progress": p }));
        });
        let me = self.clone();
        let work = tokio::spawn(NOTES.scope(notes, async move { me.handle(req, Some(progress)).await }));
        while let Some(v) = rx.recv().await {
            // A client that went away does not stop the work.
            let _ = w.write_all(format!("{v}\n").as_bytes()).await;
        }
        let v = match work.await? {
            Ok(result) => json!({ "ok": true, "result": result }),
            Err(e) => json!({ "ok": false, "error": format!("{e:#}"), "code": crate::exit_code(&e) as u8 }),
        };
        w.write_all(format!("{v}\n").as_bytes()).await?;
        Ok(())
    }

    /// Saves state and closes the endpoint; peers that do not answer the
    /// close are given 3 s, then dropped.
    pub async fn stop(self: Arc<Self>) {
        self.save_state();
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

/// Unwraps store errors so their exit codes survive; a fetch no provider
/// could serve gets its own code.
pub fn peer_err(e: xenod_peer::PeerError) -> anyhow::Error {
    match e {
        xenod_peer::PeerError::Store(s) => s.into(),
        e @ (xenod_peer::PeerError::NoProviders { .. } | xenod_peer::PeerError::Unavailable { .. }) => {
            Coded { code: Exit::NoProvider, msg: e.to_string() }.into()
        }
        e => e.into(),
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

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// `xenod serve`: runs until SIGTERM, SIGINT or a shutdown request.
pub fn run(data_dir: &Path, listen: Option<SocketAddr>, json_out: bool) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(async {
        if std::os::unix::net::UnixStream::connect(socket_path(data_dir)).is_ok() {
            bail!("a daemon already serves {}", data_dir.display());
        }
        let d = Daemon::start(data_dir, listen, false).await?;
        let (data, store) = (d.data_dir().to_path_buf(), d.store_arc());
        tokio::task::spawn_blocking(move || crate::stage::sweep(&data, &store)).await?;
        crate::announce::spawn(&d);
        let addr = format_peer(&d.node.addr());
        let sock = socket_path(data_dir);
        // One line on stdout once the socket accepts, for scripts to wait on.
        let ready = if json_out {
            json!({ "node": d.node.id().to_string(), "addr": addr, "socket": sock.display().to_string() }).to_string()
        } else {
            format!("serving {} as {addr} (socket {})", data_dir.display(), sock.display())
        };
        let r = d.clone().serve_socket(|| println!("{ready}")).await;
        d.stop().await;
        r
    })
}
