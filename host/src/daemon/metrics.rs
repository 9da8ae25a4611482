//! Prometheus metrics: the daemon serves the text format (0.0.4) on
//! `metrics = "ADDR:PORT"` of `config.toml`, at `GET /metrics`. Off unless
//! configured; an address that is not loopback is refused unless
//! `metrics_remote = true` says it is meant (the metrics name peers, layers
//! and mount points, and the endpoint has no authentication).
//!
//! Everything is read at scrape time, nothing is kept for it:
//!
//! - the store: chunks, packs and their bytes, layers and the bytes of
//!   their files (logical), and logical over packed bytes as the ratio that
//!   dedup and compression give;
//! - the peer counters (`xenod status`), in total and per peer, with the
//!   gossip ones; lazy fetches still running; migrations done here;
//! - instances by state (asked of their hypervisors);
//! - each mount process's counters: mount processes (`xenod mount`, an
//!   instance's mount) serve them on `DATA_DIR/mounts/stats/PID.sock`
//!   (`xenod_cowfs::MountStats`), read here with a short timeout; a socket
//!   no process answers on is removed. Counting stays in the mount process
//!   (relaxed atomics on the FUSE path), and a scrape costs it one
//!   connection. Its counters start at zero with the process: they are
//!   labelled by mount point, and Prometheus reads a restart as a reset.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::context::{Daemon, MigrationTotals};
use crate::error::{Context, Error, Result};
use xenod_store::Exit;

/// How long a scrape waits for one mount process.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(1);

/// Bounds of the migration downtime buckets, in seconds.
pub const DOWNTIME_BOUNDS: [f64; 9] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

type Labels = Vec<(&'static str, String)>;

/// Refuses an address other hosts could reach unless `remote` allows it.
pub fn check_addr(addr: SocketAddr, remote: bool) -> Result<()> {
    if addr.ip().is_loopback() || remote {
        return Ok(());
    }
    Err(Error::coded(
        Exit::BadInput,
        format!(
            "metrics = \"{addr}\" is not a loopback address; the endpoint has no authentication: \
             set metrics_remote = true in config.toml if other hosts are meant to scrape it"
        ),
    ))
}

/// Serves `GET /metrics` on the configured address, if any; returns the
/// address bound.
pub async fn spawn(d: &Arc<Daemon>) -> Result<Option<SocketAddr>> {
    let Some(addr) = d.config().metrics else { return Ok(None) };
    check_addr(addr, d.config().metrics_remote)?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding metrics on {addr}"))?;
    let bound = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        tracing::warn!("metrics served on {bound}, reachable from other hosts (metrics_remote = true)");
    }
    tracing::info!("metrics on http://{bound}/metrics");
    let d = Arc::downgrade(d);
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("metrics: accepting: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let d = d.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| answer(d.clone(), req));
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await {
                    tracing::debug!("metrics: connection: {e}");
                }
            });
        }
    });
    Ok(Some(bound))
}

type Body = http_body_util::Full<hyper::body::Bytes>;

async fn answer(
    d: std::sync::Weak<Daemon>,
    req: hyper::Request<hyper::body::Incoming>,
) -> std::result::Result<hyper::Response<Body>, std::convert::Infallible> {
    let reply = |status: u16, ctype: &str, body: String| {
        let mut r = hyper::Response::new(Body::new(body.into()));
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
        if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.method() != hyper::Method::GET {
        return Ok(reply(405, "text/plain", "GET only\n".into()));
    }
    if req.uri().path() != "/metrics" {
        return Ok(reply(404, "text/plain", "see /metrics\n".into()));
    }
    let Some(d) = d.upgrade() else { return Ok(reply(503, "text/plain", "stopping\n".into())) };
    Ok(match render(&d).await {
        Ok(text) => reply(200, prometheus_client::encoding::prometheus_text::CONTENT_TYPE, text),
        Err(e) => reply(500, "text/plain", format!("{}\n", e.chain())),
    })
}

/// The exposition, as `GET /metrics` answers it.
pub async fn render(d: &Arc<Daemon>) -> Result<String> {
    let dd = d.clone();
    let scrape = tokio::task::spawn_blocking(move || gather(&dd)).await??;
    let mut registry = Registry::with_prefix("xenod");
    registry.register_collector(Box::new(scrape));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        .map_err(|_| Error::msg("encoding the metrics"))?;
    Ok(out)
}

/// Everything a scrape reports, read at once.
#[derive(Debug)]
struct Scrape {
    chunks: u64,
    packs: u64,
    pack_bytes: u64,
    layers: u64,
    logical_bytes: u64,
    peers: xenod_peer::Snapshot,
    gossip_joined: bool,
    gossip_heard: u64,
    gossip_hosts: u64,
    lazy_pending: u64,
    instances: Vec<(String, u64)>,
    migrations: MigrationTotals,
    mounts: Vec<xenod_cowfs::MountStats>,
}

fn gather(d: &Arc<Daemon>) -> Result<Scrape> {
    let store = d.store();
    let (packs, pack_bytes) = store.pack_usage()?;
    let layers = store.layers()?;
    let mut instances = std::collections::BTreeMap::<String, u64>::new();
    for (_, state) in d.instances().list()? {
        // "unknown (why)" is one state, whatever the why.
        let state = state.split(" (").next().unwrap_or_default().to_owned();
        *instances.entry(state).or_default() += 1;
    }
    Ok(Scrape {
        chunks: store.chunk_count()?,
        packs,
        pack_bytes,
        layers: layers.len() as u64,
        logical_bytes: layers.iter().map(|(_, i)| i.file_bytes).sum(),
        peers: d.node().stats().snapshot(),
        gossip_joined: d.node().gossip_joined(),
        gossip_heard: d.node().stats().gossip_heard(),
        gossip_hosts: d.node().presences().len() as u64,
        lazy_pending: d.lazy.pending().len() as u64,
        instances: instances.into_iter().collect(),
        migrations: d.migrations(),
        mounts: mount_stats(d.data_dir()),
    })
}

/// Asks every mount process of `data_dir` for its counters; removes the
/// sockets of processes gone.
fn mount_stats(data_dir: &Path) -> Vec<xenod_cowfs::MountStats> {
    let dir = crate::instance::mount::stats_dir(data_dir);
    let Ok(rd) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "sock") {
            continue;
        }
        match xenod_cowfs::read_stats(&p, MOUNT_TIMEOUT) {
            Ok(s) => out.push(s),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound) => {
                let _ = std::fs::remove_file(&p);
            }
            Err(e) => tracing::warn!(socket = %p.display(), "reading a mount's counters: {e}"),
        }
    }
    out.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
    out
}

type Fmt = std::result::Result<(), std::fmt::Error>;

fn gauge<N: prometheus_client::encoding::EncodeGaugeValue + Copy>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: &[(Labels, N)],
) -> Fmt {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (l, v) in values {
        ConstGauge::new(*v).encode(m.encode_family(l)?)?;
    }
    Ok(())
}

fn counter(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, values: &[(Labels, u64)]) -> Fmt {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (l, v) in values {
        ConstCounter::new(*v).encode(m.encode_family(l)?)?;
    }
    Ok(())
}

fn one<N: Copy>(v: N) -> [(Labels, N); 1] {
    [(Vec::new(), v)]
}

/// A histogram from its sum (seconds), and counts per bucket (not
/// cumulative) whose bounds (seconds) are `bounds`, then +Inf.
struct Hist {
    labels: Labels,
    sum: f64,
    counts: Vec<u64>,
}

fn histogram(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, bounds: &[f64], values: &[Hist]) -> Fmt {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for h in values {
        let buckets: Vec<(f64, u64)> =
            bounds.iter().copied().chain([f64::INFINITY]).zip(h.counts.iter().copied()).collect();
        let count = h.counts.iter().sum();
        m.encode_family(&h.labels)?.encode_histogram::<Labels>(h.sum, count, &buckets, None)?;
    }
    Ok(())
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Fmt {
        let e = &mut e;
        gauge(e, "store_chunks", "Chunks in the store's index.", &one(self.chunks))?;
        gauge(e, "store_packs", "Sealed pack files.", &one(self.packs))?;
        gauge(e, "store_pack_bytes", "Bytes of the sealed pack files.", &one(self.pack_bytes))?;
        gauge(e, "store_layers", "Layers in the store.", &one(self.layers))?;
        gauge(e, "store_logical_bytes", "Bytes of the files of every layer, as mounted.", &one(self.logical_bytes))?;
        let ratio = if self.pack_bytes == 0 { 1.0 } else { self.logical_bytes as f64 / self.pack_bytes as f64 };
        gauge(e, "store_dedup_ratio", "Logical bytes over packed bytes (dedup and compression).", &one(ratio))?;

        let t = &self.peers.totals;
        for (name, help, v) in [
            ("chunks_received", "Chunks received from peers that verified.", t.chunks_received),
            ("bytes_received", "Bytes of those chunks on the wire.", t.bytes_received),
            ("chunks_served", "Chunks served to peers.", t.chunks_served),
            ("bytes_served", "Bytes served to peers.", t.bytes_served),
            ("chunks_absent", "Requests for chunks this host does not hold.", t.chunks_absent),
            ("bad_chunks", "Chunks from peers refused because they did not verify.", t.bad_chunks),
            ("protocol_errors", "Violations of the wire format by peers.", t.protocol_errors),
            ("peers_dropped", "Peers dropped from a fetch.", t.peers_dropped),
            ("fetches", "Fetches carried out.", t.fetches),
            ("fetches_failed", "Fetches that failed.", t.fetches_failed),
            ("pulls", "Fan-out pull requests carried out.", t.pulls),
            ("pulls_refused", "Fan-out pull requests refused.", t.pulls_refused),
            ("gossip_messages", "Gossip messages heard since the daemon started.", self.gossip_heard),
            (
                "gossip_names_refused",
                "Name records refused (bad signature, untrusted key, malformed).",
                t.names_refused,
            ),
            ("gossip_events_refused", "Events refused (bad signature, replay, malformed).", t.events_refused),
            ("gossip_events_dropped", "Events of this host dropped for exceeding its rate.", t.events_dropped),
        ] {
            counter(e, name, help, &one(v))?;
        }
        let per_peer = |f: fn(&xenod_peer::PeerCounters) -> u64| -> Vec<(Labels, u64)> {
            self.peers.peers.iter().map(|(id, c)| (vec![("peer", id.clone())], f(c))).collect()
        };
        counter(e, "peer_chunks_received", "Chunks received from the peer.", &per_peer(|c| c.chunks_received))?;
        counter(e, "peer_bytes_received", "Bytes received from the peer.", &per_peer(|c| c.bytes_received))?;
        counter(e, "peer_chunks_served", "Chunks served to the peer.", &per_peer(|c| c.chunks_served))?;
        counter(e, "peer_bad_chunks", "Chunks from the peer that did not verify.", &per_peer(|c| c.bad_chunks))?;
        counter(e, "peer_dropped", "Times the peer was dropped from a fetch.", &per_peer(|c| c.dropped))?;
        gauge(e, "gossip_joined", "1 once the gossip topic has a neighbour.", &one(u64::from(self.gossip_joined)))?;
        gauge(e, "gossip_hosts", "Hosts whose advertisement is held.", &one(self.gossip_hosts))?;
        gauge(e, "lazy_background_fetches", "Lazy deploys whose data is still arriving.", &one(self.lazy_pending))?;

        let inst: Vec<(Labels, u64)> = self.instances.iter().map(|(s, n)| (vec![("state", s.clone())], *n)).collect();
        gauge(e, "instances", "Instances on this host, by state.", &inst)?;

        let m = &self.migrations;
        let results =
            [(vec![("result", "done".to_owned())], m.done), (vec![("result", "failed".to_owned())], m.failed)];
        counter(e, "migrations", "Migrations from this host.", &results)?;
        counter(e, "migration_wire_bytes", "Bytes migrations sent.", &one(m.wire_bytes))?;
        let down = Hist { labels: Vec::new(), sum: m.downtime_sum, counts: m.downtime_buckets.to_vec() };
        histogram(e, "migration_downtime_seconds", "Guest downtime of each migration.", &DOWNTIME_BOUNDS, &[down])?;

        let bounds: Vec<f64> = xenod_cowfs::LATENCY_BOUNDS_NS.iter().map(|&n| n as f64 / 1e9).collect();
        let mnt = |s: &xenod_cowfs::MountStats| vec![("mountpoint", s.mountpoint.clone())];
        let per_mount = |f: fn(&xenod_cowfs::MountStats) -> u64| -> Vec<(Labels, u64)> {
            self.mounts.iter().map(|s| (mnt(s), f(s))).collect()
        };
        gauge(e, "mounts", "Mount processes that answered.", &one(self.mounts.len() as u64))?;
        let mut reqs = Vec::new();
        let mut lat = Vec::new();
        for s in &self.mounts {
            for o in &s.requests {
                let mut l = mnt(s);
                l.push(("op", o.op.clone()));
                reqs.push((l.clone(), o.count));
                lat.push(Hist { labels: l, sum: o.sum_ns as f64 / 1e9, counts: o.buckets.clone() });
            }
        }
        counter(e, "fuse_requests", "FUSE requests served, by opcode.", &reqs)?;
        histogram(e, "fuse_request_duration_seconds", "Time to serve a FUSE request, reply included.", &bounds, &lat)?;
        counter(
            e,
            "chunk_cache_hits",
            "Chunk reads the decoded-chunk cache answered.",
            &per_mount(|s| s.chunk_cache_hits),
        )?;
        counter(
            e,
            "chunk_cache_misses",
            "Chunk reads that decoded from the store.",
            &per_mount(|s| s.chunk_cache_misses),
        )?;
        counter(
            e,
            "file_cache_hits",
            "Opens of big lower files found materialised.",
            &per_mount(|s| s.file_cache_hits),
        )?;
        counter(
            e,
            "file_cache_misses",
            "Opens of big lower files not (yet) materialised.",
            &per_mount(|s| s.file_cache_misses),
        )?;
        counter(e, "lazy_stalls", "Reads that waited for a chunk not here yet.", &per_mount(|s| s.lazy_stalls))?;
        counter(
            e,
            "lazy_fetch_failures",
            "Chunks a read waited for that could not be had.",
            &per_mount(|s| s.lazy_failed),
        )?;
        counter(e, "lazy_fetch_bytes", "Bytes of chunks fetched while a read waited.", &per_mount(|s| s.lazy_bytes))?;
        let lazy: Vec<Hist> = self
            .mounts
            .iter()
            .map(|s| Hist { labels: mnt(s), sum: s.lazy_sum_ns as f64 / 1e9, counts: s.lazy_buckets.clone() })
            .collect();
        histogram(e, "lazy_fetch_duration_seconds", "Time a read waited for a missing chunk.", &bounds, &lazy)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_only_unless_allowed() {
        assert!(check_addr("127.0.0.1:9464".parse().unwrap(), false).is_ok());
        assert!(check_addr("[::1]:9464".parse().unwrap(), false).is_ok());
        let e = check_addr("0.0.0.0:9464".parse().unwrap(), false).unwrap_err();
        assert!(e.chain().contains("metrics_remote"), "{}", e.chain());
        assert!(check_addr("0.0.0.0:9464".parse().unwrap(), true).is_ok());
    }
}
