//! Counters of what a node served, fetched and refused, in total and per
//! peer; what `xenod status` shows and what a daemon persists.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Per-peer counters, keyed by the peer's node id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCounters {
    /// Chunks this peer sent us that verified and were stored.
    pub chunks_received: u64,
    /// Bytes of those chunks on the wire (compressed).
    pub bytes_received: u64,
    /// Chunks we served to this peer.
    pub chunks_served: u64,
    /// Chunks from this peer refused because they did not verify.
    pub bad_chunks: u64,
    /// Violations of the wire format (hostile lengths, truncated frames).
    pub protocol_errors: u64,
    /// Times this peer was dropped from a fetch.
    pub dropped: u64,
    /// Name records from this peer refused (bad signature, untrusted key).
    pub names_refused: u64,
    /// Events this peer delivered that were refused (bad signature, a
    /// replay, malformed).
    #[serde(default)]
    pub events_refused: u64,
    /// Events of this host dropped for exceeding its rate.
    #[serde(default)]
    pub events_dropped: u64,
    /// The last reason it was dropped or refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Unix seconds of the last exchange.
    pub last_seen: u64,
}

/// Totals of everything in [`PeerCounters`] plus local events.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub chunks_received: u64,
    pub bytes_received: u64,
    pub chunks_served: u64,
    pub bytes_served: u64,
    /// Requests for chunks this node does not hold.
    pub chunks_absent: u64,
    pub bad_chunks: u64,
    pub protocol_errors: u64,
    pub peers_dropped: u64,
    pub names_refused: u64,
    pub fetches: u64,
    pub fetches_failed: u64,
    /// Fan-out pull requests carried out, and refused (peer not allowed,
    /// malformed request).
    #[serde(default)]
    pub pulls: u64,
    #[serde(default)]
    pub pulls_refused: u64,
    #[serde(default)]
    pub events_refused: u64,
    #[serde(default)]
    pub events_dropped: u64,
}

/// Shared, thread-safe counters of one node.
#[derive(Debug, Default)]
pub struct Stats {
    inner: Mutex<Snapshot>,
    /// Gossip messages heard (names, events, advertisements), refused or
    /// not, since the process started: for the metrics, kept out of the
    /// snapshot (advertisements arrive every few seconds).
    gossip_heard: std::sync::atomic::AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    #[serde(default)]
    pub totals: Counters,
    /// Node id (z-base-32 or hex as iroh prints it) -> counters.
    #[serde(default)]
    pub peers: BTreeMap<String, PeerCounters>,
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Stats {
    /// Starts from a snapshot saved earlier.
    pub fn from_snapshot(s: Snapshot) -> Self {
        Self { inner: Mutex::new(s), gossip_heard: Default::default() }
    }

    /// Gossip messages heard since the process started.
    pub fn gossip_heard(&self) -> u64 {
        self.gossip_heard.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn heard(&self) {
        self.gossip_heard.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Applies `f` to the totals and to `peer`'s counters.
    pub(crate) fn with(&self, peer: &str, f: impl FnOnce(&mut Counters, &mut PeerCounters)) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let g = &mut *g;
        let p = g.peers.entry(peer.to_owned()).or_default();
        p.last_seen = now();
        f(&mut g.totals, p);
    }

    pub(crate) fn totals(&self, f: impl FnOnce(&mut Counters)) {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()).totals);
    }
}
