//! Lazy deployment: `xenod deploy --lazy` mounts a stack once its layer
//! roots and manifests are here; file data follows in the background.
//!
//! ```text
//! deploy --lazy ──Fetch{lazy}──> daemon: roots + manifests now,
//!                                        the whole stack in the background
//! mount process ──Chunk{id}───> daemon: a chunk a reader needs now, from the
//!  (a read finds a chunk missing)        lazy fetches' providers, verified,
//!                                        over one cached connection each
//! ```
//!
//! A chunk fetched at once is not stored (the background fetch stores
//! everything); the filesystem keeps it in its decoded-chunk cache. A
//! chunk of the prefetch order the background fetch has not brought yet
//! is waited for (at most [`ORDER_PATIENCE`]) rather than fetched twice.
//!
//! Prefetch orders: the background fetch fetches the chunks of the stack's
//! prefetch order first, in that order (`peer/src/fetch.rs`), so a guest
//! booting as a recorded one did finds them here instead of stalling. A
//! lazy deploy records that order when the store holds none for the stack
//! or `xenod prefetch record` asked for one (`Instances::deploy`); it
//! travels with the stack (`store/src/order.rs`). `xenod status` counts
//! the chunks mounts asked for and the stalls among them. The prefetch
//! round seals its pack every [`PREFETCH_FLUSH`] bytes and at its end, so
//! that the mount reads what came without asking the daemon.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use xenod_peer::events::EventKind;
use xenod_peer::iroh::endpoint::Connection;
use xenod_peer::{ALPN, EndpointAddr, EndpointId, FetchOptions, FetchReport, Phase, fetch_one};
use xenod_store::{ChunkId, LayerId, hex};

use super::context::Daemon;
use super::reply;
use crate::err;
use crate::error::Result;

/// Stored bytes between flushes while the background fetch brings the
/// stack's prefetch order: each flush seals a pack, and the guest's mount
/// (its own handle of the store) then reads those chunks itself instead of
/// asking the daemon for each. A seal costs a few fsyncs (about 20 ms
/// here), paid every 2 MiB (about 160 ms of a 100 Mbit/s link).
const PREFETCH_FLUSH: u64 = 2 << 20;

/// How long a mount's request for a chunk of the prefetch order waits for
/// the background fetch to bring it before the daemon fetches it alone.
/// Fetching it alone (a stall) sent the chunk twice over the link, and
/// behind the prefetch's own frames took 50-250 ms at 100 Mbit/s with a
/// 40 ms round trip, where the frame on its way usually lands sooner.
const ORDER_PATIENCE: Duration = Duration::from_secs(2);

/// The daemon's lazy fetches: their providers and how far they are.
#[derive(Default)]
pub struct Lazy {
    providers: Mutex<Vec<EndpointAddr>>,
    conns: tokio::sync::Mutex<HashMap<EndpointId, Connection>>,
    /// Background fetches by layer: "fetching", or why one failed.
    pending: Mutex<BTreeMap<LayerId, String>>,
    requests: AtomicU64,
    stalls: AtomicU64,
    prefetched: AtomicU64,
    /// Chunks of the prefetch orders of background fetches under way: a
    /// mount asking for one waits for it to arrive (see [`ORDER_PATIENCE`]).
    coming: Mutex<HashSet<ChunkId>>,
    /// Pinged as a background fetch stores chunks, and as it ends.
    arrived: Arc<tokio::sync::Notify>,
    /// The ids put in `coming`, by the layer whose fetch brings them.
    orders: Mutex<HashMap<LayerId, Vec<ChunkId>>>,
}

impl Lazy {
    /// Background fetches not yet complete, for `xenod status`.
    pub fn pending(&self) -> BTreeMap<String, String> {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.iter().map(|(l, s)| (l.to_string(), s.clone())).collect()
    }

    /// Chunk requests, stalls and chunks prefetched, for `xenod status`.
    pub fn counters(&self) -> reply::LazyCounters {
        reply::LazyCounters {
            chunk_requests: self.requests.load(Ordering::Relaxed),
            stalls: self.stalls.load(Ordering::Relaxed),
            prefetched: self.prefetched.load(Ordering::Relaxed),
        }
    }
}

/// Fetches the whole stack of `layer` in one fetch that goes on in the
/// background: returns its report once the layer roots and manifests are
/// here and recorded (the stack can be mounted), or its error if it ends
/// before. File data, the prefetch order first, follows on the same
/// connections (no second connection, order request or slow start: on a
/// 40 ms round trip those cost the prefetch round about 0.4 s).
pub async fn fetch(
    d: &Arc<Daemon>,
    layer: LayerId,
    peers: Vec<EndpointAddr>,
    progress: Option<xenod_peer::ProgressFn>,
) -> Result<FetchReport> {
    {
        let mut p = d.lazy.providers.lock().unwrap_or_else(|e| e.into_inner());
        for q in &peers {
            if !p.iter().any(|x| x.id == q.id) {
                p.push(q.clone());
            }
        }
    }
    d.lazy.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(layer, "fetching".into());
    let (tx, rx) = tokio::sync::oneshot::channel::<FetchReport>();
    let tx = Mutex::new(Some(tx));
    let on_manifests: xenod_peer::ManifestsFn = Arc::new(move |rep: &FetchReport| {
        if let Some(tx) = tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(rep.clone());
        }
    });
    // Stored chunks wake mounts waiting for chunks of the order. The
    // request's own progress ends with the manifests: it is dropped then,
    // which ends the request's stream of progress lines (the reply waits
    // for that).
    let arrived = d.lazy.arrived.clone();
    let request_progress = Arc::new(Mutex::new(progress));
    let rp = request_progress.clone();
    let progress: xenod_peer::ProgressFn = Arc::new(move |p: &xenod_peer::FetchProgress| {
        arrived.notify_waiters();
        if matches!(p.phase, Phase::Roots | Phase::Manifests)
            && let Some(f) = rp.lock().unwrap_or_else(|e| e.into_inner()).as_ref()
        {
            f(p);
        }
    });
    let opts = FetchOptions {
        prefetch_flush_every: Some(PREFETCH_FLUSH),
        progress: Some(progress),
        on_manifests: Some(on_manifests),
        ..FetchOptions::default()
    };
    let me = d.clone();
    let task = tokio::spawn(async move {
        let r = me.node().fetch(layer, &peers, opts).await;
        me.lazy.forget_order(layer);
        let complete = {
            let mut p = me.lazy.pending.lock().unwrap_or_else(|e| e.into_inner());
            match &r {
                Ok(rep) => {
                    me.lazy.prefetched.fetch_add(rep.prefetched, Ordering::Relaxed);
                    p.remove(&layer).is_some()
                }
                Err(e) => {
                    tracing::warn!("background fetch of {layer}: {e}");
                    p.insert(layer, format!("failed: {e}"));
                    false
                }
            }
        };
        if complete {
            me.node().publish_event(EventKind::LayerComplete { layer: layer.to_string() }).await;
        }
        r
    });
    let manifests = rx.await;
    request_progress.lock().unwrap_or_else(|e| e.into_inner()).take();
    match manifests {
        Ok(rep) => {
            d.lazy.expect_order(d.store_arc(), layer).await;
            Ok(rep)
        }
        // The fetch ended before its manifests were here: its error.
        Err(_) => match task.await {
            Ok(Ok(rep)) => Ok(rep),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(err!("the fetch of {layer} stopped: {e}")),
        },
    }
}

impl Lazy {
    /// Notes the chunks of `layer`'s prefetch order (kept with its
    /// manifests, if a provider had one) that are not here yet: a mount
    /// asking for one waits for the fetch to bring it.
    async fn expect_order(&self, store: Arc<xenod_store::Store>, layer: LayerId) {
        let order: Vec<ChunkId> = tokio::task::spawn_blocking(move || match store.order(&layer) {
            Ok(Some(o)) => o.ids.into_iter().filter(|id| !store.contains(id).unwrap_or(false)).collect(),
            _ => Vec::new(),
        })
        .await
        .unwrap_or_default();
        let mut coming = self.coming.lock().unwrap_or_else(|e| e.into_inner());
        coming.extend(order.iter().copied());
        self.orders.lock().unwrap_or_else(|e| e.into_inner()).insert(layer, order);
    }

    /// The fetch of `layer` ended: nothing more of its order is coming.
    fn forget_order(&self, layer: LayerId) {
        let order = self.orders.lock().unwrap_or_else(|e| e.into_inner()).remove(&layer).unwrap_or_default();
        let mut coming = self.coming.lock().unwrap_or_else(|e| e.into_inner());
        for id in &order {
            coming.remove(id);
        }
        drop(coming);
        self.arrived.notify_waiters();
    }
}

/// `Request::Chunk`: chunk `id` now, from the store or a provider.
pub async fn chunk(d: &Arc<Daemon>, id: &str) -> Result<reply::Chunk> {
    let id: ChunkId = id.parse().map_err(|e| err!("chunk id {id:?}: {e}"))?;
    Ok(reply::Chunk { data: hex(&chunk_bytes(d, id).await?) })
}

/// `Request::ChunkStream` (see [`crate::api::ChunkClient`]): answers the
/// ids the mount sends, one after another, until it closes.
pub async fn stream(
    d: &Arc<Daemon>,
    mut r: impl tokio::io::AsyncRead + Unpin,
    mut w: impl tokio::io::AsyncWrite + Unpin,
) -> Result<()> {
    use crate::api::{CHUNK_ERR, CHUNK_OK, CHUNK_STREAM_ACK};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    w.write_all(&[CHUNK_STREAM_ACK]).await?;
    let mut id = [0u8; 32];
    loop {
        match r.read_exact(&mut id).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let (status, body) = match chunk_bytes(d, ChunkId::from_bytes(id)).await {
            Ok(b) => (CHUNK_OK, b),
            Err(e) => (CHUNK_ERR, e.chain().into_bytes()),
        };
        let mut head = [0u8; 5];
        head[0] = status;
        head[1..].copy_from_slice(&(body.len() as u32).to_le_bytes());
        w.write_all(&head).await?;
        w.write_all(&body).await?;
    }
}

/// Chunk `id` now, from the store or a provider.
async fn chunk_bytes(d: &Arc<Daemon>, id: ChunkId) -> Result<Vec<u8>> {
    d.lazy.requests.fetch_add(1, Ordering::Relaxed);
    let get = |id: ChunkId| {
        let store = d.store_arc();
        async move { tokio::task::spawn_blocking(move || store.get(&id)).await.ok().and_then(|r| r.ok()) }
    };
    if let Some(b) = get(id).await {
        return Ok(b);
    }
    // On its way in a prefetch round: wait for it (bounded).
    let deadline = tokio::time::Instant::now() + ORDER_PATIENCE;
    while d.lazy.coming.lock().unwrap_or_else(|e| e.into_inner()).contains(&id) {
        let arrived = d.lazy.arrived.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        if d.store().contains(&id).unwrap_or(false) {
            if let Some(b) = get(id).await {
                return Ok(b);
            }
            break;
        }
        if tokio::time::timeout_at(deadline, arrived).await.is_err() {
            break;
        }
    }
    d.lazy.stalls.fetch_add(1, Ordering::Relaxed);
    let mut providers = d.lazy.providers.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for p in d.default_peers() {
        if !providers.iter().any(|q| q.id == p.id) {
            providers.push(p);
        }
    }
    let mut why = Vec::new();
    for p in providers {
        let conn = {
            let mut conns = d.lazy.conns.lock().await;
            match conns.get(&p.id) {
                Some(c) if c.close_reason().is_none() => c.clone(),
                _ => {
                    let c = match tokio::time::timeout(
                        Duration::from_secs(5),
                        d.node().endpoint().connect(p.clone(), ALPN),
                    )
                    .await
                    {
                        Ok(Ok(c)) => c,
                        Ok(Err(e)) => {
                            why.push(format!("{}: {e}", p.id.fmt_short()));
                            continue;
                        }
                        Err(_) => {
                            why.push(format!("{}: connecting timed out", p.id.fmt_short()));
                            continue;
                        }
                    };
                    conns.insert(p.id, c.clone());
                    c
                }
            }
        };
        match fetch_one(&conn, id).await {
            Ok(Some(b)) => return Ok(b),
            Ok(None) => why.push(format!("{}: does not have it", p.id.fmt_short())),
            Err(e) => {
                d.lazy.conns.lock().await.remove(&p.id);
                why.push(e.to_string());
            }
        }
    }
    Err(err!("no provider gave chunk {id}: {}", if why.is_empty() { "none known".into() } else { why.join("; ") }))
}
