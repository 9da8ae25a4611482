//! The serving side of the chunk protocol.
//!
//! Each accepted stream carries one request. Chunks are read from packs on
//! a blocking thread and handed to the stream through a channel of
//! [`FRAMES_IN_FLIGHT`] frames, so a slow reader holds at most that many
//! chunks in memory per stream, and a connection may open at most
//! [`STREAMS_PER_CONN`] streams at once: QUIC flow control does the rest of
//! the back-pressure. Chunks are served as stored, without re-verifying
//! them (they were verified when they entered this store; the receiver
//! verifies again anyway).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use iroh::endpoint::{Connection, RecvStream, SendStream, VarInt};
use iroh::protocol::{AcceptError, ProtocolHandler};
use tokio::io::AsyncWriteExt;
use tracing::debug;

use xenod_store::{BLOCK_TARGET, BlockBuf, ChunkId, Dense, Error, Store, zstd_level};

use super::protocol::{
    Answer, Frame, Request, WireError, write_answer, write_layout, write_names, write_order, write_refusal,
};
use super::stats::Stats;

/// Frames buffered per stream between the pack reader and the network.
pub const FRAMES_IN_FLIGHT: usize = 8;
/// Concurrent request streams a peer may open on one connection.
pub const STREAMS_PER_CONN: u32 = 16;
/// How long a peer may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// zstd level of solid frames made for runs of block members asked for
/// without their whole block (a prefetch order, a partly held layer).
/// Whole blocks travel as kept; these runs are what a lazy deploy's first
/// seconds wait for over a slow link, and are small, so they are packed
/// harder than the store's level: on the apache2 overlay level 3 sent
/// 38.3 MB, 6 36.5 MB, 9 36.1 MB, and 6 costs about 2.5x the CPU of 3.
const RUN_LEVEL: i32 = 6;

/// Test hooks that make a provider misbehave; never set in production.
#[derive(Clone, Debug, Default)]
pub struct Misbehave {
    /// Flip a byte in this many of the next chunks served.
    pub corrupt_chunks: u64,
    /// Serve name records with their layer id altered (bad signatures).
    pub forge_names: bool,
    /// Sleep this long before each frame (a slow provider).
    pub delay_per_chunk: Duration,
}

#[derive(Clone, Debug)]
pub(crate) struct Provider {
    store: Arc<Store>,
    stats: Arc<Stats>,
    corrupt_left: Arc<AtomicU64>,
    forge_names: bool,
    delay: Duration,
}

impl Provider {
    pub(crate) fn new(store: Arc<Store>, stats: Arc<Stats>, m: Misbehave) -> Self {
        Self {
            store,
            stats,
            corrupt_left: Arc::new(AtomicU64::new(m.corrupt_chunks)),
            forge_names: m.forge_names,
            delay: m.delay_per_chunk,
        }
    }

    async fn serve_stream(&self, peer: &str, mut send: SendStream, mut recv: RecvStream) -> Result<(), WireError> {
        let req = tokio::time::timeout(REQUEST_TIMEOUT, Request::read(&mut recv))
            .await
            .unwrap_or_else(|_| Err(WireError::Invalid("no request within the timeout".into())));
        let req = match req {
            Ok(req) => req,
            Err(e) => {
                // Say why, so the fetcher's error names it.
                if let WireError::Invalid(why) = &e {
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, write_refusal(&mut send, why)).await;
                    let _ = send.finish();
                }
                return Err(e);
            }
        };
        match req {
            Request::Chunks(ids) => self.serve_chunks(peer, &mut send, ids, Pack::Single).await?,
            Request::Solid(ids) => {
                self.serve_chunks(peer, &mut send, ids, Pack::Members(RUN_LEVEL.max(zstd_level()) as u8)).await?
            }
            Request::Dense { codec, ids } => self.serve_chunks(peer, &mut send, ids, Pack::All(codec)).await?,
            Request::Layout(ids) => {
                let store = self.store.clone();
                let layout = tokio::task::spawn_blocking(move || store.block_layout(&ids))
                    .await
                    .map_err(|e| WireError::Local(format!("layout task: {e}")))?
                    .map_err(|e| WireError::Local(format!("layout: {e}")))?;
                write_layout(&mut send, &layout).await.map_err(WireError::Io)?;
            }
            Request::Order(layer) => {
                let store = self.store.clone();
                let rec = tokio::task::spawn_blocking(move || store.order_bytes(&layer))
                    .await
                    .map_err(|e| WireError::Local(format!("order task: {e}")))?
                    .map_err(|e| WireError::Local(format!("order: {e}")))?;
                write_order(&mut send, rec.as_deref().unwrap_or_default()).await.map_err(WireError::Io)?;
            }
            Request::Names => {
                let mut recs = self.store.names().unwrap_or_default();
                if self.forge_names {
                    for r in &mut recs {
                        let mut b = *r.id.as_bytes();
                        b[0] ^= 0xff;
                        r.id = ChunkId::from_bytes(b);
                    }
                }
                let json = serde_json::to_vec(&recs).unwrap_or_default();
                write_names(&mut send, &json).await.map_err(WireError::Io)?;
            }
        }
        send.flush().await.map_err(WireError::Io)?;
        // Finishing is graceful: what is buffered is still delivered after
        // the stream is dropped.
        let _ = send.finish();
        Ok(())
    }

    async fn serve_chunks(
        &self,
        peer: &str,
        send: &mut SendStream,
        ids: Vec<ChunkId>,
        pack: Pack,
    ) -> Result<(), WireError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Answer>(FRAMES_IN_FLIGHT);
        let store = self.store.clone();
        let corrupt = self.corrupt_left.clone();
        let reader = tokio::task::spawn_blocking(move || {
            let corrupt_one = |bytes: &mut Vec<u8>| {
                if corrupt.load(Ordering::Relaxed) > 0
                    && corrupt.fetch_sub(1, Ordering::Relaxed) > 0
                    && let Some(b) = bytes.last_mut()
                {
                    *b ^= 0x55;
                }
            };
            // Chunks asked for one after another (members of solid blocks,
            // or all for a dense request), to be compressed together into
            // one solid frame.
            let codec = match pack {
                // Never used: single frames are never packed into a run.
                Pack::Single => Dense::Zstd(0),
                Pack::Members(l) => Dense::Zstd(l),
                Pack::All(codec) => codec,
            };
            let mut run = BlockBuf::default();
            let send_run = |run: &mut BlockBuf| -> bool {
                if run.is_empty() {
                    return true;
                }
                let count = run.len() as u16;
                let answer = match run.payload_as(codec) {
                    Some(mut block) => {
                        corrupt_one(&mut block);
                        Answer::Solid { count, block }
                    }
                    None => return false,
                };
                *run = BlockBuf::default();
                tx.blocking_send(answer).is_ok()
            };
            let mut i = 0;
            while i < ids.len() {
                let (id, rest) = (ids[i], &ids[i..]);
                // A stored block asked for whole and in order: sent as it
                // is kept, whatever its level (recompressing it would make
                // the provider the bottleneck of every fast link).
                if let Pack::Members(_) = pack
                    && let Ok(Some((members, mut block))) = store.whole_block(&id)
                    && !members.is_empty()
                    && rest.len() >= members.len()
                    && members.iter().zip(rest).all(|(m, want)| m.0 == *want)
                {
                    if !send_run(&mut run) {
                        return;
                    }
                    corrupt_one(&mut block);
                    if tx.blocking_send(Answer::Solid { count: members.len() as u16, block }).is_err() {
                        return;
                    }
                    i += members.len();
                    continue;
                }
                i += 1;
                let plain = match pack {
                    Pack::Single => Ok(None),
                    Pack::Members(_) => store.member_plain(&id),
                    Pack::All(_) => match store.get(&id) {
                        Ok(p) => Ok(Some(p)),
                        Err(Error::ChunkMissing { .. }) => Ok(None),
                        Err(e) => Err(e),
                    },
                };
                let answer = match plain {
                    Ok(Some(plain)) => {
                        run.push(id, &plain);
                        if run.plain_len() >= BLOCK_TARGET && !send_run(&mut run) {
                            return;
                        }
                        continue;
                    }
                    Ok(None) => match store.get_encoded(&id) {
                        Ok((loc, mut stored)) => {
                            corrupt_one(&mut stored);
                            Answer::One(Frame { encoding: loc.encoding, plain_len: loc.plain_len, stored })
                        }
                        Err(e) => absent(&id, e),
                    },
                    Err(e) => absent(&id, e),
                };
                if !send_run(&mut run) || tx.blocking_send(answer).is_err() {
                    return;
                }
            }
            send_run(&mut run);
        });
        let (mut n, mut bytes, mut absent) = (0u64, 0u64, 0u64);
        let mut result = Ok(());
        while let Some(answer) = rx.recv().await {
            let chunks = match &answer {
                Answer::One(f) => {
                    bytes += f.stored.len() as u64;
                    n += 1;
                    1
                }
                Answer::Solid { count, block } => {
                    bytes += block.len() as u64;
                    n += *count as u64;
                    *count as u32
                }
                Answer::Absent => {
                    absent += 1;
                    1
                }
            };
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay * chunks).await;
            }
            if let Err(e) = write_answer(send, &answer).await {
                result = Err(WireError::Io(e));
                break;
            }
        }
        drop(rx);
        let _ = reader.await;
        self.stats.with(peer, |t, p| {
            t.chunks_served += n;
            t.bytes_served += bytes;
            t.chunks_absent += absent;
            p.chunks_served += n;
        });
        result
    }
}

/// How a chunk request is answered.
#[derive(Clone, Copy, Debug)]
enum Pack {
    /// One frame per chunk, as stored.
    Single,
    /// Whole solid blocks as kept; runs of other members of solid blocks
    /// in solid frames at this zstd level ([`RUN_LEVEL`]); other chunks as
    /// stored.
    Members(u8),
    /// Every chunk in solid frames made by this codec.
    All(Dense),
}

/// The answer for a chunk that cannot be served.
fn absent(id: &ChunkId, e: Error) -> Answer {
    if !matches!(e, Error::ChunkMissing { .. }) {
        tracing::warn!("cannot serve chunk {}: {e}", id.fmt_short());
    }
    Answer::Absent
}

impl ProtocolHandler for Provider {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        conn.set_max_concurrent_bi_streams(VarInt::from_u32(STREAMS_PER_CONN));
        let peer = conn.remote_id().to_string();
        while let Ok((send, recv)) = conn.accept_bi().await {
            let me = self.clone();
            let peer = peer.clone();
            tokio::spawn(async move {
                match me.serve_stream(&peer, send, recv).await {
                    Ok(()) => {}
                    Err(WireError::Invalid(why)) => {
                        debug!("refused request from {peer}: {why}");
                        me.stats.with(&peer, |t, p| {
                            t.protocol_errors += 1;
                            p.protocol_errors += 1;
                            p.last_error = Some(why);
                        });
                    }
                    Err(WireError::Local(why)) => tracing::warn!("cannot answer {peer}: {why}"),
                    Err(e) => debug!("stream from {peer} ended: {e}"),
                }
            });
        }
        Ok(())
    }
}
