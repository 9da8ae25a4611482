//! Repair: given chunks, written anew from whichever provider has them.
//!
//! Unlike a layer fetch ([`super::fetch`]), a repair wants a handful of
//! chunks that may be stored here already (damaged), needs to know who
//! sent each one, and must not give up on the rest when one cannot be
//! had. So it asks the providers in turn, plainly: each for every id still
//! wanted, in requests of up to [`MAX_BATCH`] ids answered one frame per
//! id (chunk protocol op 1). Every frame is decoded and hashed before it
//! is stored ([`Store::replace_encoded`]); a provider that sends a chunk
//! that does not verify, or breaks the protocol, is asked nothing more.

use std::collections::HashSet;
use std::time::Duration;

use iroh::EndpointAddr;
use serde::{Deserialize, Serialize};
use xenod_store::{ChunkId, Error};

use super::protocol::{Answer, MAX_BATCH, Request, WireError, read_answer};
use super::{Engine, PeerError};

const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// Who supplied a repaired chunk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Supplied {
    pub chunk: String,
    pub from: String,
}

/// What one provider did during a repair.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RepairProvider {
    pub node: String,
    pub chunks: u64,
    /// Ids it said it lacks.
    pub absent: u64,
    pub bad_chunks: u64,
    /// Why it was given up, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<String>,
}

/// The outcome of [`super::Node::repair_chunks`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ChunkRepair {
    /// Chunks stored anew, each with its provider, in the order they came.
    pub repaired: Vec<Supplied>,
    /// Chunks no provider supplied.
    pub missing: Vec<String>,
    pub providers: Vec<RepairProvider>,
}

impl Engine {
    pub(crate) async fn repair_chunks(
        &self,
        ids: &[ChunkId],
        providers: &[EndpointAddr],
    ) -> Result<ChunkRepair, PeerError> {
        let store = self.store.clone();
        let _lock = tokio::task::spawn_blocking(move || store.write_lock())
            .await
            .map_err(|e| PeerError::NoProviders { why: format!("lock task: {e}") })??;
        let mut seen = HashSet::new();
        let mut left: Vec<ChunkId> = ids.iter().copied().filter(|id| seen.insert(*id)).collect();
        let mut out = ChunkRepair::default();
        for p in providers {
            if left.is_empty() {
                break;
            }
            if p.id == self.id() || out.providers.iter().any(|r| r.node == p.id.to_string()) {
                continue;
            }
            let mut rep = RepairProvider { node: p.id.to_string(), ..Default::default() };
            let got = match self.connect(p, super::ALPN).await {
                Ok(conn) => {
                    let r = self.ask(&conn, &left, &mut rep, &mut out.repaired).await;
                    conn.close(0u32.into(), b"done");
                    r
                }
                Err(e) => Err(e),
            };
            match got {
                Ok(()) => {}
                Err(e @ PeerError::Store(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!("repair: giving up on provider {}: {e}", rep.node);
                    self.stats.with(&rep.node, |t, c| {
                        t.peers_dropped += 1;
                        c.dropped += 1;
                        c.last_error = Some(e.to_string());
                    });
                    rep.dropped = Some(e.to_string());
                }
            }
            let done: HashSet<&str> = out.repaired.iter().map(|s| s.chunk.as_str()).collect();
            left.retain(|id| !done.contains(id.to_string().as_str()));
            out.providers.push(rep);
            // What arrived is durable before the next provider is asked.
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.flush())
                .await
                .map_err(|e| PeerError::NoProviders { why: format!("flush task: {e}") })??;
        }
        out.missing = left.iter().map(ToString::to_string).collect();
        Ok(out)
    }

    /// Asks the provider at `conn` for every id of `want`; stores and
    /// records what it sends.
    async fn ask(
        &self,
        conn: &iroh::endpoint::Connection,
        want: &[ChunkId],
        rep: &mut RepairProvider,
        repaired: &mut Vec<Supplied>,
    ) -> Result<(), PeerError> {
        let peer = rep.node.clone();
        let cerr = |e: &dyn std::fmt::Display| PeerError::Connection { peer: peer.clone(), why: e.to_string() };
        for batch in want.chunks(MAX_BATCH) {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| cerr(&e))?;
            send.write_all(&Request::Chunks(batch.to_vec()).encode()).await.map_err(|e| cerr(&e))?;
            send.finish().map_err(|e| cerr(&e))?;
            for id in batch {
                let frame = match tokio::time::timeout(READ_TIMEOUT, read_answer(&mut recv)).await {
                    Err(_) => return Err(cerr(&"no answer within the read timeout")),
                    Ok(Err(WireError::Io(e))) => return Err(cerr(&e)),
                    Ok(Err(e)) => return Err(PeerError::Protocol { peer: peer.clone(), why: e.to_string() }),
                    Ok(Ok(Answer::Absent)) => {
                        rep.absent += 1;
                        continue;
                    }
                    Ok(Ok(Answer::One(f))) => f,
                    Ok(Ok(Answer::Solid { .. })) => {
                        let why = "solid frame in answer to a single-frame request".into();
                        return Err(PeerError::Protocol { peer: peer.clone(), why });
                    }
                };
                let (store, id, wire) = (self.store.clone(), *id, frame.stored.len() as u64);
                let put = tokio::task::spawn_blocking(move || {
                    store.replace_encoded(id, frame.encoding, &frame.stored, frame.plain_len)
                })
                .await
                .map_err(|e| cerr(&format!("verifier task: {e}")))?;
                match put {
                    Ok(()) => {}
                    Err(Error::ChunkCorrupt { id, why }) => {
                        rep.bad_chunks += 1;
                        self.stats.with(&peer, |t, c| {
                            t.bad_chunks += 1;
                            c.bad_chunks += 1;
                        });
                        return Err(PeerError::BadChunk { peer: peer.clone(), id, why });
                    }
                    Err(e) => return Err(PeerError::Store(e)),
                }
                rep.chunks += 1;
                self.stats.with(&peer, |t, c| {
                    t.chunks_received += 1;
                    t.bytes_received += wire;
                    c.chunks_received += 1;
                    c.bytes_received += wire;
                });
                repaired.push(Supplied { chunk: id.to_string(), from: peer.clone() });
            }
        }
        Ok(())
    }
}
