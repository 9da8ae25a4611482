//! Names and presence over gossip (iroh-gossip on the node's endpoint).
//!
//! Every node joins one topic, `blake3("xenod/gossip/1")`, bootstrapped
//! from the peers it knows (config, remembered, or given). Messages are
//! JSON, at most [`MAX_MESSAGE`] bytes:
//!
//! ```text
//! announce := { "name": NameRecord, "at": unix-secs }     signed by the publisher
//!           | { "successor": Succession, "at": unix-secs } signed by the old key
//!           | { "presence": body-json, "sig": [u8; 64] }  signed by the node key
//!           | { "event": event-json, "sig": [u8; 64] }     signed by the node key (see `events`)
//!           | { "net": body-json, "sig": [u8; 64], "at": unix-micros }  environments (see `netrec`)
//! body     := { node: [u8; 32], addrs: [SocketAddr], layers: [LayerId], at: unix-micros,
//!               attrs?: HostAttrs, services?: [ServiceAd], leaving?: bool }
//! ```
//!
//! Gossip forwards messages, so who delivered one says nothing about who
//! wrote it: each message carries its own signature. Name records and
//! successions go through the node's [`NameGate`], the same door as a
//! names pull: kept only if the host's trust admits the key for the name's
//! publisher and the sequence is newer; a refusal is counted against the
//! node that delivered it, once per record. A presence is believed
//! only with a valid signature of the node it describes, and only the
//! newest (`at`) per node is kept, so a replayed one changes nothing.
//! `at` also makes each announcement a new message: gossip drops content
//! it has seen, and a node that joins later must still hear it. A presence
//! whose `at` is more than [`MAX_SKEW`] from this host's clock is refused
//! (a replay of an old one, or a node whose clock is off), so a node with a
//! clock far ahead cannot shut out its own later announcements.
//!
//! A presence may carry the host's attributes ([`HostAttrs`]: what it can
//! run, its capacity and labels), which makes it a host advertisement; it
//! is live for the expiry the reader gives ([`GossipState::hosts`]), and a
//! node that stops cleanly says so at once (`leaving`). It also lists the
//! services the host's instances provide ([`ServiceAd`]), so they are
//! found, and go, with the advertisement.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use iroh::address_lookup::memory::MemoryLookup;
use iroh::{EndpointAddr, EndpointId, SecretKey, Signature, TransportAddr};
use iroh_gossip::api::{Event as GossipEvent, GossipSender};
use iroh_gossip::{Gossip, TopicId};
use serde::{Deserialize, Serialize};

use xenod_store::{LayerId, NameRecord, Succession};

use super::events::{Admit, Event, Events};
use super::names::NameGate;
use super::stats::Stats;

/// Largest gossip message sent or accepted.
pub const MAX_MESSAGE: usize = 64 << 10;
/// Most layers one presence announces (the newest, if a node holds more).
pub const MAX_ANNOUNCED_LAYERS: usize = 512;
/// How far a presence's time may be from this host's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(120);
/// Most labels a host advertises, and their longest key or value.
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_LEN: usize = 128;

pub(crate) fn topic() -> TopicId {
    TopicId::from_bytes(*blake3::hash(b"xenod/gossip/1").as_bytes())
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Announce {
    Name { name: NameRecord, at: u64 },
    Successor { successor: Succession, at: u64 },
    Presence { presence: String, sig: Vec<u8> },
    Event { event: String, sig: Vec<u8> },
    Net { net: String, sig: Vec<u8>, at: u64 },
}

/// What a node says about itself: where to dial it and what it holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    pub node: [u8; 32],
    pub addrs: Vec<SocketAddr>,
    pub layers: Vec<LayerId>,
    pub at: u64,
    /// The host's attributes, when it advertises itself as a host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attrs: Option<HostAttrs>,
    /// The services its instances provide.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceAd>,
    /// The node is stopping: forget it now.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
}

/// A host's advertised attributes. The types bound them: a negative or
/// 2^64 memory does not parse, and the presence is refused.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostAttrs {
    /// Hypervisor kinds it can run, probed: `qemu`, `kvm`, `tcg`, `xen`.
    pub hv: Vec<String>,
    pub vcpus: u32,
    pub mem_total: u64,
    pub mem_free: u64,
    /// Bytes free where uppers and the store live.
    pub disk_free: u64,
    /// One-minute load average.
    pub load: f32,
    pub labels: BTreeMap<String, String>,
}

impl HostAttrs {
    /// Why these attributes are refused, if they are.
    pub fn check(&self) -> Result<(), String> {
        if self.vcpus == 0 || self.vcpus > 1 << 16 {
            return Err(format!("{} vCPUs", self.vcpus));
        }
        if self.mem_free > self.mem_total {
            return Err(format!("{} bytes of memory free out of {}", self.mem_free, self.mem_total));
        }
        if !self.load.is_finite() || self.load < 0.0 {
            return Err(format!("load {}", self.load));
        }
        if self.hv.len() > 16 || self.hv.iter().any(|h| h.len() > 16) {
            return Err("more than 16 hypervisor kinds, or a long one".into());
        }
        if self.labels.len() > MAX_LABELS
            || self.labels.iter().any(|(k, v)| k.len() > MAX_LABEL_LEN || v.len() > MAX_LABEL_LEN)
        {
            return Err(format!("over {MAX_LABELS} labels, or one over {MAX_LABEL_LEN} bytes"));
        }
        Ok(())
    }
}

/// Most services one host advertises.
pub const MAX_SERVICES: usize = 256;

/// A service an instance provides, as its host advertises it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAd {
    /// The service's name (the deploy spec's `service`, else the instance's).
    pub service: String,
    pub instance: String,
    /// The guest's state: `running`, `paused`, ...
    pub state: String,
    /// Where it answers, as `tcp://IP:PORT`.
    pub endpoints: Vec<String>,
}

impl ServiceAd {
    fn check(&self) -> Result<(), String> {
        let long = |s: &str| s.len() > MAX_LABEL_LEN;
        if long(&self.service) || long(&self.instance) || long(&self.state) || self.endpoints.len() > 16 {
            return Err(format!("service {:?}: a field over {MAX_LABEL_LEN} bytes or over 16 endpoints", self.service));
        }
        if self.endpoints.iter().any(|e| long(e)) {
            return Err(format!("service {:?}: an endpoint over {MAX_LABEL_LEN} bytes", self.service));
        }
        Ok(())
    }
}

/// What a node announces about itself, besides its address and layers.
#[derive(Clone, Debug, Default)]
pub struct Advert {
    /// Its attributes, which make the presence a host advertisement.
    pub attrs: Option<HostAttrs>,
    pub services: Vec<ServiceAd>,
    /// Name records and key successions it holds, repeated for late joiners.
    pub names: Vec<NameRecord>,
    pub successions: Vec<Succession>,
}

impl Presence {
    pub fn addr(&self) -> Option<EndpointAddr> {
        let id = EndpointId::from_bytes(&self.node).ok()?;
        Some(EndpointAddr::new(id).with_addrs(self.addrs.iter().copied().map(TransportAddr::Ip)))
    }
}

/// What this node heard: the newest presence of every other node, and
/// when it arrived (by this host's monotonic clock).
#[derive(Default, Debug)]
pub(crate) struct Heard {
    presence: BTreeMap<EndpointId, Presence>,
    received: BTreeMap<EndpointId, Instant>,
}

/// The gossip side of a node.
#[derive(Clone, Debug)]
pub(crate) struct GossipState {
    pub(crate) gossip: Gossip,
    pub(crate) lookup: MemoryLookup,
    heard: Arc<Mutex<Heard>>,
    sender: Arc<Mutex<Option<GossipSender>>>,
    /// Notified when a gossip neighbour comes up: a moment to announce,
    /// so a joining node is known at once, not at the next period.
    pub(crate) neighbour_up: Arc<tokio::sync::Notify>,
    /// Environments and their members (see `netrec`).
    pub(crate) net: Arc<super::netrec::NetBook>,
}

impl GossipState {
    pub(crate) fn new(gossip: Gossip, lookup: MemoryLookup) -> Self {
        Self {
            gossip,
            lookup,
            heard: Arc::default(),
            sender: Arc::default(),
            neighbour_up: Arc::default(),
            net: Arc::default(),
        }
    }

    fn heard(&self) -> std::sync::MutexGuard<'_, Heard> {
        self.heard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Nodes that announced holding `layer`, newest announcement first.
    pub(crate) fn providers_of(&self, layer: &LayerId) -> Vec<EndpointAddr> {
        let h = self.heard();
        let mut v: Vec<&Presence> = h.presence.values().filter(|p| p.layers.contains(layer)).collect();
        v.sort_by_key(|p| std::cmp::Reverse(p.at));
        v.into_iter().filter_map(Presence::addr).collect()
    }

    pub(crate) fn presences(&self) -> Vec<Presence> {
        self.heard().presence.values().cloned().collect()
    }

    /// Host advertisements heard within `expiry`, with their age.
    pub(crate) fn hosts(&self, expiry: Duration) -> Vec<(Presence, Duration)> {
        let h = self.heard();
        h.presence
            .iter()
            .filter(|(_, p)| p.attrs.is_some())
            .filter_map(|(id, p)| {
                let age = h.received.get(id)?.elapsed();
                (age <= expiry).then(|| (p.clone(), age))
            })
            .collect()
    }

    pub(crate) fn joined(&self) -> bool {
        self.sender.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Joins the topic through `bootstrap` and handles what arrives until
    /// the gossip stops. Returns once subscribed.
    pub(crate) async fn join(
        &self,
        bootstrap: Vec<EndpointAddr>,
        me: EndpointId,
        stats: Arc<Stats>,
        names: Arc<NameGate>,
        events: Arc<Events>,
        on_presence: Option<PresenceFn>,
    ) -> Result<(), String> {
        let mut ids = Vec::new();
        for b in bootstrap.into_iter().filter(|b| b.id != me) {
            ids.push(b.id);
            self.lookup.add_endpoint_info(b);
        }
        let topic = self.gossip.subscribe(topic(), ids).await.map_err(|e| format!("joining the gossip topic: {e}"))?;
        let (sender, mut receiver) = topic.split();
        *self.sender.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender);
        let me2 = self.clone();
        tokio::spawn(async move {
            use n0_future::StreamExt;
            while let Some(ev) = receiver.next().await {
                match ev {
                    Ok(GossipEvent::Received(m)) => {
                        let from = m.delivered_from.to_string();
                        me2.receive(&m.content, &from, &stats, &names, &events, on_presence.as_ref());
                    }
                    Ok(GossipEvent::NeighborUp(n)) => {
                        tracing::debug!("gossip neighbour up: {n}");
                        me2.neighbour_up.notify_one();
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!("gossip receiver: {e}");
                        break;
                    }
                }
            }
            *me2.sender.lock().unwrap_or_else(|e| e.into_inner()) = None;
        });
        Ok(())
    }

    fn receive(
        &self,
        content: &[u8],
        from: &str,
        stats: &Stats,
        names: &NameGate,
        events: &Events,
        on_presence: Option<&PresenceFn>,
    ) {
        let refuse = |why: String| {
            tracing::warn!("refused gossip from {from}: {why}");
            stats.with(from, |t, c| {
                t.names_refused += 1;
                c.names_refused += 1;
                c.last_error = Some(why);
            });
        };
        stats.heard();
        if content.len() > MAX_MESSAGE {
            return refuse(format!("message of {} bytes over the limit", content.len()));
        }
        match serde_json::from_slice::<Announce>(content) {
            Err(e) => refuse(format!("malformed announcement: {e}")),
            Ok(Announce::Name { name: rec, .. }) => {
                names.offer(&rec, from);
            }
            Ok(Announce::Successor { successor, .. }) => {
                names.offer_succession(&successor, from);
            }
            Ok(Announce::Event { event, sig }) => receive_event(&event, &sig, from, stats, events),
            Ok(Announce::Net { net, sig, .. }) => {
                if let super::netrec::NetOffer::Refused(why) = self.net.offer(&super::netrec::Signed { body: net, sig })
                {
                    refuse(why);
                }
            }
            Ok(Announce::Presence { presence, sig }) => {
                let body: Presence = match serde_json::from_str(&presence) {
                    Ok(b) => b,
                    Err(e) => return refuse(format!("malformed presence: {e}")),
                };
                let Ok(node) = EndpointId::from_bytes(&body.node) else {
                    return refuse("presence names an invalid node id".into());
                };
                let Ok(sig) = <[u8; 64]>::try_from(sig.as_slice()) else {
                    return refuse(format!("presence of {node}: malformed signature"));
                };
                if node.verify(presence.as_bytes(), &Signature::from_bytes(&sig)).is_err() {
                    return refuse(format!("presence of {node}: bad signature"));
                }
                if body.layers.len() > MAX_ANNOUNCED_LAYERS {
                    return refuse(format!("presence of {node}: {} layers", body.layers.len()));
                }
                if let Some(Err(why)) = body.attrs.as_ref().map(HostAttrs::check) {
                    return refuse(format!("presence of {node}: absurd attributes: {why}"));
                }
                if body.services.len() > MAX_SERVICES {
                    return refuse(format!("presence of {node}: {} services", body.services.len()));
                }
                if let Some(why) = body.services.iter().find_map(|s| s.check().err()) {
                    return refuse(format!("presence of {node}: {why}"));
                }
                let skew = now_micros().abs_diff(body.at);
                if skew > MAX_SKEW.as_micros() as u64 {
                    let dir = if body.at > now_micros() { "ahead of" } else { "behind" };
                    return refuse(format!(
                        "presence of {node}: its time is {} s {dir} this host's (a replay, or a clock off)",
                        skew / 1_000_000
                    ));
                }
                {
                    let mut h = self.heard();
                    if h.presence.get(&node).is_some_and(|p| p.at >= body.at) {
                        return;
                    }
                    if body.leaving {
                        h.presence.remove(&node);
                        h.received.remove(&node);
                        drop(h);
                        tracing::info!("node {node} left");
                        if let Some(f) = on_presence {
                            f(&body);
                        }
                        return;
                    }
                    h.presence.insert(node, body.clone());
                    h.received.insert(node, Instant::now());
                }
                if let Some(a) = body.addr() {
                    self.lookup.add_endpoint_info(a);
                }
                if let Some(f) = on_presence {
                    f(&body);
                }
            }
        }
    }

    /// Broadcasts this node's presence (with what `ad` says of it), and
    /// the name records and key successions of `ad`.
    pub(crate) async fn announce(
        &self,
        secret: &SecretKey,
        addrs: Vec<SocketAddr>,
        layers: Vec<LayerId>,
        ad: Advert,
    ) -> Result<(), String> {
        let Advert { attrs, mut services, names, successions } = ad;
        services.truncate(MAX_SERVICES);
        let Some(sender) = self.sender.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Err("not joined to the gossip topic".into());
        };
        let at = now_micros();
        let mut layers = layers;
        layers.truncate(MAX_ANNOUNCED_LAYERS);
        let leaving = false;
        let body = Presence { node: *secret.public().as_bytes(), addrs, layers, at, attrs, services, leaving };
        let presence = serde_json::to_string(&body).map_err(|e| e.to_string())?;
        let sig = secret.sign(presence.as_bytes()).to_bytes().to_vec();
        let mut msgs = vec![serde_json::to_vec(&Announce::Presence { presence, sig }).map_err(|e| e.to_string())?];
        for rec in names {
            msgs.push(serde_json::to_vec(&Announce::Name { name: rec, at }).map_err(|e| e.to_string())?);
        }
        for successor in successions {
            msgs.push(serde_json::to_vec(&Announce::Successor { successor, at }).map_err(|e| e.to_string())?);
        }
        for m in msgs.into_iter().filter(|m| m.len() <= MAX_MESSAGE) {
            sender.broadcast(Bytes::from(m)).await.map_err(|e| format!("broadcasting: {e}"))?;
        }
        Ok(())
    }
}

impl GossipState {
    /// Tells the topic this node is stopping (a signed presence with
    /// `leaving`), so others forget it now rather than at expiry.
    pub(crate) async fn leave(&self, secret: &SecretKey) -> Result<(), String> {
        let Some(sender) = self.sender.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        let body = Presence {
            node: *secret.public().as_bytes(),
            addrs: Vec::new(),
            layers: Vec::new(),
            at: now_micros(),
            attrs: None,
            services: Vec::new(),
            leaving: true,
        };
        let presence = serde_json::to_string(&body).map_err(|e| e.to_string())?;
        let sig = secret.sign(presence.as_bytes()).to_bytes().to_vec();
        let m = serde_json::to_vec(&Announce::Presence { presence, sig }).map_err(|e| e.to_string())?;
        sender.broadcast(Bytes::from(m)).await.map_err(|e| format!("broadcasting: {e}"))
    }
}

impl GossipState {
    /// Broadcasts signed net records (see `netrec`).
    pub(crate) async fn send_net(&self, records: Vec<super::netrec::Signed>) -> Result<(), String> {
        let Some(sender) = self.sender.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Err("not joined to the gossip topic".into());
        };
        let at = now_micros();
        for r in records {
            let m = serde_json::to_vec(&Announce::Net { net: r.body, sig: r.sig, at }).map_err(|e| e.to_string())?;
            if m.len() <= MAX_MESSAGE {
                sender.broadcast(Bytes::from(m)).await.map_err(|e| format!("broadcasting: {e}"))?;
            }
        }
        Ok(())
    }

    /// Broadcasts `ev`, signed with `secret`.
    pub(crate) async fn send_event(&self, secret: &SecretKey, ev: &Event) -> Result<(), String> {
        let Some(sender) = self.sender.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Err("not joined to the gossip topic".into());
        };
        let event = serde_json::to_string(ev).map_err(|e| e.to_string())?;
        let sig = secret.sign(event.as_bytes()).to_bytes().to_vec();
        let m = serde_json::to_vec(&Announce::Event { event, sig }).map_err(|e| e.to_string())?;
        sender.broadcast(Bytes::from(m)).await.map_err(|e| format!("broadcasting: {e}"))
    }
}

/// An event heard over gossip: believed with a valid signature of its
/// host, kept unless it repeats, replays or floods (see `events`).
fn receive_event(event: &str, sig: &[u8], from: &str, stats: &Stats, events: &Events) {
    let refuse = |why: String| {
        tracing::warn!("refused an event from {from}: {why}");
        stats.with(from, |t, c| {
            t.events_refused += 1;
            c.events_refused += 1;
            c.last_error = Some(why);
        });
    };
    let ev: Event = match serde_json::from_str(event) {
        Ok(e) => e,
        Err(e) => return refuse(format!("malformed event: {e}")),
    };
    let Ok(host) = ev.host.parse::<EndpointId>() else {
        return refuse(format!("event names an invalid host {:?}", ev.host));
    };
    let Ok(sig) = <[u8; 64]>::try_from(sig) else {
        return refuse(format!("event of {host}: malformed signature"));
    };
    if host.verify(event.as_bytes(), &Signature::from_bytes(&sig)).is_err() {
        return refuse(format!("event of {host}: bad signature"));
    }
    if let Err(why) = ev.check() {
        return refuse(format!("event of {host}: {why}"));
    }
    match events.admit(&ev) {
        Admit::New => events.record(ev),
        Admit::Duplicate => {}
        Admit::Replay => refuse(format!("event {} of {host}: a replay (older than those kept)", ev.seq)),
        Admit::OverRate => {
            // Counted once per dropped event, against the host that sent it.
            stats.with(&ev.host, |t, c| {
                t.events_dropped += 1;
                c.events_dropped += 1;
            });
        }
    }
}

/// Called with each newly believed presence, and with a leaving one.
pub type PresenceFn = Arc<dyn Fn(&Presence) + Send + Sync>;

/// Microseconds, so two announcements in one second still differ.
pub(crate) fn now_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}
