//! Events between hosts: what happens on one host (a guest deployed,
//! stopped or migrated, a layer complete, a name published, a bad chunk
//! refused), published on the gossip topic for every other host to see,
//! and what a host notices about the others (a host joined or left).
//!
//! ```text
//! announce := { "event": body-json, "sig": [u8; 64] }   signed by the node key of `host`
//! body     := { host: NODE, seq: u64, at: unix-micros, type: T, ...T's fields }
//! ```
//!
//! Each host numbers its events: `seq` starts at the host's clock in
//! microseconds when its node starts and counts up, so it keeps rising
//! across restarts. A receiver believes an event only with a valid
//! signature of the host it names and a time within [`MAX_SKEW`] of its
//! own; it drops one it already holds (gossip delivers some twice), and
//! refuses a `seq` below the window of the last [`SEQ_WINDOW`] it kept of
//! that host (a replay). Each host may publish [`RATE`] events a second
//! (bursts of [`BURST`]); beyond that a receiver drops them, counted in
//! `events_dropped` of that host. What a host keeps is bounded: the last
//! [`KEPT`] events, in the order they arrived ([`Events::subscribe`]).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::gossip::{MAX_SKEW, now_micros};

/// Events a host keeps (the newest).
pub const KEPT: usize = 4096;
/// Sequence numbers remembered per host, against replays and duplicates.
pub const SEQ_WINDOW: usize = 1024;
/// Events a second one host may publish, and its burst.
pub const RATE: f64 = 20.0;
pub const BURST: f64 = 200.0;
/// Longest text field of an event.
pub const MAX_FIELD: usize = 512;

/// What happened. The wire's `type` is the variant's name in snake case.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A host advertised itself for the first time (as seen by the host
    /// that reports it).
    HostJoined {
        node: String,
    },
    /// A host said it stops, or its advertisement expired (`expired`).
    HostLeft {
        node: String,
        #[serde(default)]
        expired: bool,
    },
    /// Every chunk of a layer is now on the host.
    LayerComplete {
        layer: String,
    },
    NamePublished {
        name: String,
        layer: String,
    },
    NameRemoved {
        name: String,
    },
    InstanceDeployed {
        instance: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service: Option<String>,
    },
    InstanceStarted {
        instance: String,
    },
    InstanceStopped {
        instance: String,
    },
    /// The instance left this host for `to` (a node id).
    InstanceMigrated {
        instance: String,
        to: String,
    },
    InstanceDestroyed {
        instance: String,
    },
    /// The host refused `chunks` chunks from `peer` that did not verify.
    BadChunk {
        peer: String,
        chunks: u64,
    },
}

/// Every event type, as `--type` takes them.
pub const TYPES: &[&str] = &[
    "host_joined",
    "host_left",
    "layer_complete",
    "name_published",
    "name_removed",
    "instance_deployed",
    "instance_started",
    "instance_stopped",
    "instance_migrated",
    "instance_destroyed",
    "bad_chunk",
];

impl EventKind {
    /// The wire's `type`.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::HostJoined { .. } => "host_joined",
            EventKind::HostLeft { .. } => "host_left",
            EventKind::LayerComplete { .. } => "layer_complete",
            EventKind::NamePublished { .. } => "name_published",
            EventKind::NameRemoved { .. } => "name_removed",
            EventKind::InstanceDeployed { .. } => "instance_deployed",
            EventKind::InstanceStarted { .. } => "instance_started",
            EventKind::InstanceStopped { .. } => "instance_stopped",
            EventKind::InstanceMigrated { .. } => "instance_migrated",
            EventKind::InstanceDestroyed { .. } => "instance_destroyed",
            EventKind::BadChunk { .. } => "bad_chunk",
        }
    }

    fn fields(&self) -> Vec<&str> {
        match self {
            EventKind::HostJoined { node } | EventKind::HostLeft { node, .. } => vec![node],
            EventKind::LayerComplete { layer } => vec![layer],
            EventKind::NamePublished { name, layer } => vec![name, layer],
            EventKind::NameRemoved { name } => vec![name],
            EventKind::InstanceDeployed { instance, service } => {
                vec![instance, service.as_deref().unwrap_or("")]
            }
            EventKind::InstanceStarted { instance }
            | EventKind::InstanceStopped { instance }
            | EventKind::InstanceDestroyed { instance } => vec![instance],
            EventKind::InstanceMigrated { instance, to } => vec![instance, to],
            EventKind::BadChunk { peer, .. } => vec![peer],
        }
    }
}

/// Whether `t` names an event type: one of [`TYPES`], or a group, the part
/// before the first `_` (`instance` for every `instance_*`).
pub fn type_matches(t: &str, type_name: &str) -> bool {
    type_name == t || type_name.split('_').next() == Some(t)
}

/// Checks `--type` values; the message lists the types.
pub fn check_types(types: &[String]) -> Result<(), String> {
    for t in types {
        if !TYPES.iter().any(|n| type_matches(t, n)) {
            return Err(format!(
                "no event type {t:?}; the types are {} (or a group: host, instance, ...)",
                TYPES.join(", ")
            ));
        }
    }
    Ok(())
}

/// One event, as kept and as sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The node id of the host it happened on, or that reports it.
    pub host: String,
    pub seq: u64,
    /// Unix microseconds, by `host`'s clock.
    pub at: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

impl Event {
    /// Why this event is refused, if it is.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.kind.fields().iter().any(|f| f.len() > MAX_FIELD) {
            return Err(format!("a field over {MAX_FIELD} bytes"));
        }
        let skew = now_micros().abs_diff(self.at);
        if skew > MAX_SKEW.as_micros() as u64 {
            return Err(format!("its time is {} s off this host's (a replay, or a clock off)", skew / 1_000_000));
        }
        Ok(())
    }
}

/// What became of an event offered to [`Events::admit`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    New,
    /// Held already: gossip delivered it twice.
    Duplicate,
    /// Below the window of sequence numbers kept for its host.
    Replay,
    /// Over its host's rate.
    OverRate,
}

#[derive(Debug)]
struct HostSeen {
    seqs: BTreeSet<u64>,
    tokens: f64,
    refilled: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    ring: VecDeque<Event>,
    seen: HashMap<String, HostSeen>,
}

/// The events a node knows, and its subscribers.
#[derive(Debug)]
pub struct Events {
    host: String,
    next_seq: AtomicU64,
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Event>,
}

impl Events {
    /// The events of the node `host`.
    pub fn new(host: String) -> Self {
        let (tx, _) = broadcast::channel(KEPT);
        Self { host, next_seq: AtomicU64::new(now_micros()), inner: Mutex::default(), tx }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new event of this host, numbered.
    pub(crate) fn make(&self, kind: EventKind) -> Event {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        Event { host: self.host.clone(), seq, at: now_micros(), kind }
    }

    /// Keeps `ev` and hands it to every subscriber.
    pub(crate) fn record(&self, ev: Event) {
        let mut g = self.inner();
        if g.ring.len() == KEPT {
            g.ring.pop_front();
        }
        g.ring.push_back(ev.clone());
        // Sent under the lock, so a subscriber's snapshot and stream meet
        // without a gap or a repeat.
        let _ = self.tx.send(ev);
    }

    /// Whether an event heard from another host is new, a repeat, a
    /// replay or over its host's rate; a new one counts against the rate.
    pub(crate) fn admit(&self, ev: &Event) -> Admit {
        let mut g = self.inner();
        let h = g.seen.entry(ev.host.clone()).or_insert_with(|| HostSeen {
            seqs: BTreeSet::new(),
            tokens: BURST,
            refilled: Instant::now(),
        });
        if h.seqs.contains(&ev.seq) {
            return Admit::Duplicate;
        }
        if h.seqs.len() >= SEQ_WINDOW && h.seqs.first().is_some_and(|&low| ev.seq < low) {
            return Admit::Replay;
        }
        let now = Instant::now();
        h.tokens = (h.tokens + now.duration_since(h.refilled).as_secs_f64() * RATE).min(BURST);
        h.refilled = now;
        if h.tokens < 1.0 {
            return Admit::OverRate;
        }
        h.tokens -= 1.0;
        h.seqs.insert(ev.seq);
        if h.seqs.len() > SEQ_WINDOW {
            h.seqs.pop_first();
        }
        Admit::New
    }

    /// The events kept now, oldest first, and a stream of those that
    /// follow (a subscriber that falls [`KEPT`] behind misses some, and is
    /// told so by the stream's `Lagged`).
    pub fn subscribe(&self) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let g = self.inner();
        (g.ring.iter().cloned().collect(), self.tx.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(host: &str, seq: u64) -> Event {
        Event { host: host.into(), seq, at: now_micros(), kind: EventKind::InstanceStarted { instance: "web".into() } }
    }

    #[test]
    fn the_wire_form_is_flat_and_round_trips() {
        let e = Event {
            host: "n".into(),
            seq: 7,
            at: 1,
            kind: EventKind::InstanceMigrated { instance: "web".into(), to: "m".into() },
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(s, r#"{"host":"n","seq":7,"at":1,"type":"instance_migrated","instance":"web","to":"m"}"#);
        assert_eq!(serde_json::from_str::<Event>(&s).unwrap(), e);
        assert!(serde_json::from_str::<Event>(r#"{"host":"n","seq":7,"at":1,"type":"frob"}"#).is_err());
    }

    #[test]
    fn duplicates_replays_and_floods_are_told_apart() {
        let evs = Events::new("me".into());
        assert_eq!(evs.admit(&ev("a", 10)), Admit::New);
        assert_eq!(evs.admit(&ev("a", 10)), Admit::Duplicate);
        assert_eq!(evs.admit(&ev("a", 9)), Admit::New, "late, but inside the window");
        // A flood: the burst passes, then the rate holds.
        let mut passed = 2;
        for s in 100..100 + 2 * BURST as u64 {
            if evs.admit(&ev("a", s)) == Admit::New {
                passed += 1;
            }
        }
        assert!(passed <= BURST as usize + 2, "{passed}");
        assert!(passed >= BURST as usize - 1, "{passed}");
        // Another host is not held back by the first one's flood.
        assert_eq!(evs.admit(&ev("b", 1)), Admit::New);
        // Past the window, an old number is a replay.
        let evs = Events::new("me".into());
        for s in 0..SEQ_WINDOW as u64 + 5 {
            let mut g = evs.inner();
            let h = g.seen.entry("c".into()).or_insert_with(|| HostSeen {
                seqs: BTreeSet::new(),
                tokens: BURST,
                refilled: Instant::now(),
            });
            h.seqs.insert(s + 1000);
            if h.seqs.len() > SEQ_WINDOW {
                h.seqs.pop_first();
            }
        }
        assert_eq!(evs.admit(&ev("c", 3)), Admit::Replay);
    }

    #[test]
    fn subscribers_see_what_was_kept_then_what_follows() {
        let evs = Events::new("me".into());
        evs.record(evs.make(EventKind::LayerComplete { layer: "l".into() }));
        let (past, mut rx) = evs.subscribe();
        assert_eq!(past.len(), 1);
        let e = evs.make(EventKind::NameRemoved { name: "x".into() });
        assert!(e.seq > past[0].seq);
        evs.record(e.clone());
        assert_eq!(rx.try_recv().unwrap(), e);
        for i in 0..KEPT + 10 {
            evs.record(evs.make(EventKind::InstanceStopped { instance: format!("i{i}") }));
        }
        assert_eq!(evs.subscribe().0.len(), KEPT, "bounded");
    }

    #[test]
    fn types_and_groups() {
        assert!(check_types(&["instance".into(), "host_left".into()]).is_ok());
        let e = check_types(&["instances".into()]).unwrap_err();
        assert!(e.contains("instance_deployed"), "{e}");
        assert!(type_matches("instance", "instance_migrated"));
        assert!(!type_matches("host", "instance_migrated"));
        assert!(type_matches("bad", "bad_chunk"));
        for t in TYPES {
            assert!(check_types(&[(*t).into()]).is_ok());
        }
    }
}
