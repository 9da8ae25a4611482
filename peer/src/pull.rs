//! Fan-out: a node asks others to fetch a stack, and they fetch it from
//! that node *and from each other* at once ([`SwarmPlan`]).
//!
//! ```text
//! ALPN xenod/pull/1, one bidirectional stream per connection:
//!   request := "XNP1" len:u32le json(PullRequest)[len]       len <= 1 MiB
//!   answer  := len:u32le json(PullAnswer)[len]               after the fetch
//!   PullRequest := { layer: hex, sources: ["NODE@IP:PORT", ..],
//!                    members: ["NODE@IP:PORT", ..] }          the fan-out, in order
//!   PullAnswer  := { ok: true, report: FetchReport } | { ok: false, error: text }
//! ```
//!
//! A pull makes the receiver spend disk and bandwidth on someone else's
//! behalf, so it is refused unless the asking node is allowed by the
//! receiver's [`PullPolicy`] (nobody by default). The receiver must itself
//! be one of the members; it fetches from the sources and the other
//! members, verifying every chunk as in any fetch, and pins the layer.

use std::time::Duration;

use iroh::endpoint::Connection;
use iroh::protocol::{AcceptError, ProtocolHandler};
use iroh::{EndpointAddr, EndpointId};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use xenod_store::{LayerId, ParseIdError};

use super::fetch::{FetchOptions, SwarmPlan};
use super::ticket::{TicketError, format_peer, parse_peer};
use super::{Engine, PeerError};

/// The ALPN of pull requests.
pub const PULL_ALPN: &[u8] = b"xenod/pull/1";
/// Most members of one fan-out (and most sources).
pub const MAX_MEMBERS: usize = 64;
const MAGIC: &[u8; 4] = b"XNP1";
const MAX_REQUEST: u32 = 1 << 20;
const MAX_ANSWER: u32 = 4 << 20;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the asking node waits for a member's answer: the whole fetch.
const PULL_TIMEOUT: Duration = Duration::from_secs(4 * 3600);

/// Which peers may ask this node to fetch a stack.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// Pull requests are refused.
    #[default]
    Nobody,
    /// Only from these nodes.
    From(Vec<EndpointId>),
    /// From any node (closed networks).
    Anyone,
}

impl PullPolicy {
    fn allows(&self, node: &EndpointId) -> bool {
        match self {
            Self::Nobody => false,
            Self::From(ids) => ids.contains(node),
            Self::Anyone => true,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct PullRequest {
    layer: String,
    sources: Vec<String>,
    members: Vec<String>,
}

/// What one member of a fan-out answered.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PullOutcome {
    pub node: String,
    /// Its fetch report, when it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

async fn write_json(w: &mut (impl AsyncWrite + Unpin), magic: bool, v: &[u8]) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(v.len() + 8);
    if magic {
        b.extend_from_slice(MAGIC);
    }
    b.extend_from_slice(&(v.len() as u32).to_le_bytes());
    b.extend_from_slice(v);
    w.write_all(&b).await
}

/// Why a request or an answer could not be read off the stream.
#[derive(Debug, thiserror::Error)]
enum FrameFault {
    /// The magic of a request did not arrive.
    #[error("reading the request: {0}")]
    Magic(#[source] std::io::Error),
    /// A request without the pull magic.
    #[error("not a xenod pull request (bad magic)")]
    BadMagic,
    /// The length word did not arrive.
    #[error("reading the length: {0}")]
    Length(#[source] std::io::Error),
    /// A length over the limit for this message.
    #[error("length {len} exceeds the limit of {max}")]
    TooLong { len: u32, max: u32 },
    /// The stream ended (or failed) before `len` bytes.
    #[error("stream ended inside the message: {0}")]
    Truncated(#[source] std::io::Error),
}

/// Why this node refuses a pull request, or its fetch failed. The asking
/// node hears the message (the answer's `error`), so the message is all of
/// it: the wire carries text.
#[derive(Debug, thiserror::Error)]
enum PullRefusal {
    /// No request arrived within [`REQUEST_TIMEOUT`].
    #[error("no pull request within the timeout")]
    Timeout,
    /// The request could not be read.
    #[error(transparent)]
    Frame(#[from] FrameFault),
    /// The asking node is not allowed by this node's [`PullPolicy`].
    #[error("node {0} may not ask this node to pull (its id is not in `pull_from`)")]
    NotAllowed(EndpointId),
    /// The request is not a [`PullRequest`] in JSON.
    #[error("malformed pull request: {0}")]
    Malformed(#[source] serde_json::Error),
    /// The request's layer is not a layer id.
    #[error("layer {given:?}: {source}")]
    Layer { given: String, source: ParseIdError },
    /// More sources or members than [`MAX_MEMBERS`].
    #[error("{count} {what}, more than {max}", max = MAX_MEMBERS)]
    TooMany { what: &'static str, count: usize },
    /// A source or member that is not `NODE@IP:PORT`.
    #[error("{what}: {source}")]
    Peer { what: &'static str, source: TicketError },
    /// This node is not one of the members it is asked to pull for.
    #[error("this node ({0}) is not among the members of the pull")]
    NotMember(EndpointId),
    /// The fetch failed.
    #[error("fetching {layer}: {source}")]
    Fetch { layer: LayerId, source: PeerError },
    /// The task pinning the layer did not finish.
    #[error("pin task: {0}")]
    PinTask(#[source] tokio::task::JoinError),
    /// Pinning the fetched layer failed.
    #[error("pinning {layer}: {source}")]
    Pin { layer: LayerId, source: xenod_store::Error },
    /// The fetch report did not become JSON.
    #[error("{0}")]
    Report(#[source] serde_json::Error),
}

async fn read_json(r: &mut (impl AsyncRead + Unpin), magic: bool, max: u32) -> Result<Vec<u8>, FrameFault> {
    if magic {
        let mut m = [0u8; 4];
        r.read_exact(&mut m).await.map_err(FrameFault::Magic)?;
        if &m != MAGIC {
            return Err(FrameFault::BadMagic);
        }
    }
    let mut n = [0u8; 4];
    r.read_exact(&mut n).await.map_err(FrameFault::Length)?;
    let n = u32::from_le_bytes(n);
    if n > max {
        return Err(FrameFault::TooLong { len: n, max });
    }
    let mut b = vec![0u8; n as usize];
    r.read_exact(&mut b).await.map_err(FrameFault::Truncated)?;
    Ok(b)
}

fn parse_peers(what: &'static str, v: &[String]) -> Result<Vec<EndpointAddr>, PullRefusal> {
    if v.len() > MAX_MEMBERS {
        return Err(PullRefusal::TooMany { what, count: v.len() });
    }
    v.iter().map(|p| parse_peer(p).map_err(|source| PullRefusal::Peer { what, source })).collect()
}

#[derive(Clone)]
pub(crate) struct PullHandler {
    engine: Engine,
    policy: PullPolicy,
}

impl std::fmt::Debug for PullHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullHandler").field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl PullHandler {
    pub(crate) fn new(engine: Engine, policy: PullPolicy) -> Self {
        Self { engine, policy }
    }

    /// Checks and carries out one request; `Err` is the refusal's reason.
    async fn pull(&self, from: &EndpointId, raw: &[u8]) -> Result<Value, PullRefusal> {
        if !self.policy.allows(from) {
            return Err(PullRefusal::NotAllowed(*from));
        }
        let req: PullRequest = serde_json::from_slice(raw).map_err(PullRefusal::Malformed)?;
        let layer: LayerId =
            req.layer.parse().map_err(|source| PullRefusal::Layer { given: req.layer.clone(), source })?;
        let sources = parse_peers("sources", &req.sources)?;
        let members = parse_peers("members", &req.members)?;
        let me = self.engine.id();
        if !members.iter().any(|m| m.id == me) {
            return Err(PullRefusal::NotMember(me));
        }
        let mut providers: Vec<EndpointAddr> = Vec::new();
        for p in sources.into_iter().chain(members.iter().cloned()) {
            if p.id != me && !providers.iter().any(|q| q.id == p.id) {
                providers.push(p);
            }
        }
        let plan = SwarmPlan { members: members.iter().map(|m| m.id).collect() };
        let opts = FetchOptions { swarm: Some(plan), ..FetchOptions::default() };
        let rep =
            self.engine.fetch(layer, &providers, opts).await.map_err(|source| PullRefusal::Fetch { layer, source })?;
        let store = self.engine.store.clone();
        tokio::task::spawn_blocking(move || store.pin(&layer.to_string(), &layer))
            .await
            .map_err(PullRefusal::PinTask)?
            .map_err(|source| PullRefusal::Pin { layer, source })?;
        serde_json::to_value(&rep).map_err(PullRefusal::Report)
    }
}

impl ProtocolHandler for PullHandler {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let from = conn.remote_id();
        let Ok((mut send, mut recv)) = conn.accept_bi().await else { return Ok(()) };
        let raw = tokio::time::timeout(REQUEST_TIMEOUT, read_json(&mut recv, true, MAX_REQUEST)).await;
        let answer = match raw {
            Err(_) => Err(PullRefusal::Timeout),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(raw)) => self.pull(&from, &raw).await,
        };
        let v = match answer {
            Ok(report) => {
                self.engine.stats.totals(|t| t.pulls += 1);
                json!({ "ok": true, "report": report })
            }
            Err(why) => {
                let why = why.to_string();
                tracing::warn!("pull request from {from}: {why}");
                self.engine.stats.with(&from.to_string(), |t, c| {
                    t.pulls_refused += 1;
                    c.last_error = Some(why.clone());
                });
                json!({ "ok": false, "error": why })
            }
        };
        let bytes = serde_json::to_vec(&v).unwrap_or_default();
        if write_json(&mut send, false, &bytes).await.is_ok() {
            let _ = send.finish();
            // Let the asking node read the answer and close first.
            let _ = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
        }
        Ok(())
    }
}

/// Asks every target to pull `layer` with `source` and all targets as
/// providers.
pub(crate) async fn replicate(
    engine: &Engine,
    source: EndpointAddr,
    layer: LayerId,
    targets: &[EndpointAddr],
) -> Vec<PullOutcome> {
    let req = PullRequest {
        layer: layer.to_string(),
        sources: vec![format_peer(&source)],
        members: targets.iter().map(format_peer).collect(),
    };
    let body = serde_json::to_vec(&req).unwrap_or_default();
    let mut set = tokio::task::JoinSet::new();
    for (i, t) in targets.iter().enumerate() {
        let (engine, t, body) = (engine.clone(), t.clone(), body.clone());
        set.spawn(async move {
            let r = ask(&engine, &t, &body).await;
            let node = t.id.to_string();
            let outcome = match r {
                Ok(v) if v["ok"] == true => PullOutcome { node, report: Some(v["report"].clone()), error: None },
                Ok(v) => PullOutcome {
                    node,
                    report: None,
                    error: Some(v["error"].as_str().unwrap_or("refused without a reason").to_owned()),
                },
                Err(e) => PullOutcome { node, report: None, error: Some(e.to_string()) },
            };
            (i, outcome)
        });
    }
    let mut out = set.join_all().await;
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, o)| o).collect()
}

async fn ask(engine: &Engine, target: &EndpointAddr, body: &[u8]) -> Result<Value, PeerError> {
    let peer = format_peer(target);
    let conn = engine.connect(target, PULL_ALPN).await?;
    let cerr = |e: &dyn std::fmt::Display| PeerError::Connection { peer: peer.clone(), why: e.to_string() };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| cerr(&e))?;
    write_json(&mut send, true, body).await.map_err(|e| cerr(&e))?;
    send.finish().map_err(|e| cerr(&e))?;
    let raw = tokio::time::timeout(PULL_TIMEOUT, read_json(&mut recv, false, MAX_ANSWER))
        .await
        .map_err(|_| cerr(&"no answer to the pull within the timeout"))?
        .map_err(|e| PeerError::Protocol { peer: peer.clone(), why: e.to_string() })?;
    conn.close(0u32.into(), b"done");
    serde_json::from_slice(&raw).map_err(|e| PeerError::Protocol { peer, why: format!("pull answer: {e}") })
}
