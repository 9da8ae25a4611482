//! The daemon's replies to the local API's requests, one type per `op`
//! (migrate, checkpoint and restore reply with `migrate::report`'s types).
//! Every field is named on the wire: a client reading a reply of another
//! version fails on the field it misses instead of taking a default.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use xenod_peer::{Counters, FetchReport, PeerCounters, PullOutcome, RepairProvider, Supplied};

/// A peer this host has exchanged layers with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownPeer {
    pub addrs: Vec<SocketAddr>,
    /// Unix seconds.
    pub last_seen: u64,
    /// Layers it provided or that we fetched from it.
    #[serde(default)]
    pub layers: BTreeSet<String>,
}

/// `status`: this host's node, counters and peers; `gossip` and
/// `lazy_fetches` only from a running daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub addr: Option<String>,
    pub data_dir: String,
    pub daemon: bool,
    pub counters: Counters,
    pub peers: BTreeMap<String, PeerCounters>,
    pub known_peers: BTreeMap<String, KnownPeer>,
    pub shared: BTreeSet<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gossip: Option<Gossip>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy_fetches: Option<BTreeMap<String, String>>,
    /// What this host offers guests, what its running guests hold, and
    /// what is free (see `admission`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<crate::admission::Capacity>,
    /// Where the config's `[capacity]` offers more than this host has.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capacity_warnings: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy: Option<LazyCounters>,
}

/// Lazy deploys' reads through the daemon, since it started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LazyCounters {
    /// Chunks mounts asked for (their store lacked them).
    pub chunk_requests: u64,
    /// Of those, chunks this store lacked too: the reader waited for a
    /// provider (a stall).
    pub stalls: u64,
    /// Chunks background fetches fetched first, in a prefetch order.
    pub prefetched: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gossip {
    pub joined: bool,
    pub presences: usize,
}

/// `share`: a ticket for the layer, served by this daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    pub layer: String,
    pub node: String,
    pub addr: String,
    pub ticket: String,
}

/// `fetch`: the fetch's report; `lazy`: file data follows in the
/// background.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fetch {
    #[serde(flatten)]
    pub report: FetchReport,
    pub lazy: bool,
}

/// `chunk`: the chunk's plaintext, hex.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub data: String,
}

/// `names`: what each peer's name records came to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Names {
    pub peers: Vec<PeerNames>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNames {
    pub peer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unchanged: Option<usize>,
    /// `(name, why)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<Vec<(String, String)>>,
    /// Asking this peer failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `reload`: the trust now in force, and the names it accepted at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reload {
    pub trusted: Vec<Trusted>,
    /// Names refused earlier and accepted now.
    pub accepted: Vec<String>,
    /// Refused records still remembered (offered again at the next change).
    pub refused_held: usize,
}

/// `hosts`: the live hosts that matched, this one first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hosts {
    pub hosts: Vec<Host>,
    /// How many live hosts there were before filtering.
    pub live: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Host {
    pub node: String,
    pub addrs: Vec<String>,
    pub attrs: xenod_peer::HostAttrs,
    /// Layers it announced holding.
    pub layers: usize,
    /// Milliseconds since its advertisement arrived (0 for this host).
    pub age_ms: u64,
    pub this_host: bool,
}

/// `services`: instances across the federation and the services they
/// provide.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Services {
    pub instances: Vec<Service>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub service: String,
    pub instance: String,
    /// The node id of the host it runs on.
    pub host: String,
    pub this_host: bool,
    pub state: String,
    pub endpoints: Vec<String>,
}

/// A trusted key and the publishers it may sign names for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trusted {
    pub key: String,
    pub publishers: Vec<String>,
}

/// `replicate`: each target's outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Replicate {
    pub layer: String,
    pub elapsed_ms: u64,
    pub targets: Vec<PullOutcome>,
}

/// `shutdown`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shutdown {
    pub stopping: bool,
}

/// `repair`: what was repaired, from whom, and what was not.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Repair {
    /// Whether the store verifies clean now.
    pub clean: bool,
    /// Damaged or missing chunks the first verify found.
    pub found: u64,
    pub repaired: Vec<Supplied>,
    /// Chunks still damaged or missing, each with the layers that need it.
    pub unrepaired: Vec<Unrepaired>,
    /// Packs rewritten without their damaged records.
    pub packs_rewritten: Vec<String>,
    /// Packs left as they are, and why.
    pub packs_kept: Vec<KeptPack>,
    /// Every provider asked, and what it did.
    pub providers: Vec<RepairProvider>,
    /// Layers whose manifest still cannot be read.
    pub broken_layers: Vec<Broken>,
    /// `.mount` references that still give no whole stack.
    pub broken_mounts: Vec<BrokenMount>,
    pub bad_packs: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Unrepaired {
    pub chunk: String,
    pub why: String,
    /// (layer id, the first path that needs the chunk).
    pub layers: Vec<(String, String)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeptPack {
    pub pack: String,
    pub why: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Broken {
    pub id: String,
    pub why: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BrokenMount {
    pub layer: String,
    pub file: String,
    pub reference: String,
    pub why: String,
}
