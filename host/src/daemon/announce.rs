//! The daemon on the gossip topic: it joins through the configured and
//! remembered peers, announces this host's presence (address and the
//! layers it holds), every name record (removals included) and key
//! succession it holds, each
//! [`ANNOUNCE_EVERY`], and remembers each presence it hears as a known peer
//! holding those layers, so a fetch without `--from` knows its providers.
//! Name records arriving over gossip are stored by the node itself when
//! the host's trust admits them (see xenod-peer's `names` module).

use std::sync::{Arc, Weak};
use std::time::Duration;

use xenod_peer::PresenceFn;

use super::context::Daemon;

/// How often a daemon announces itself [default; `XENOD_ANNOUNCE_MS`
/// overrides it, for tests].
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(5);

fn every() -> Duration {
    std::env::var("XENOD_ANNOUNCE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(ANNOUNCE_EVERY)
}

/// Joins the topic and announces until the daemon is gone.
pub fn spawn(d: &Arc<Daemon>) {
    let weak: Weak<Daemon> = Arc::downgrade(d);
    let bootstrap = d.default_peers();
    tokio::spawn(async move {
        let w = weak.clone();
        let on_presence: PresenceFn = Arc::new(move |p| {
            if let (Some(d), Some(addr)) = (w.upgrade(), p.addr()) {
                let layers: Vec<String> = p.layers.iter().map(|l| l.to_string()).collect();
                d.remember(&[addr], &layers);
            }
        });
        {
            let Some(d) = weak.upgrade() else { return };
            if let Err(e) = d.node().join_gossip(bootstrap, Some(on_presence)).await {
                tracing::warn!("gossip: {e}");
                return;
            }
        }
        let mut tick = tokio::time::interval(every());
        loop {
            tick.tick().await;
            let Some(d) = weak.upgrade() else { return };
            let names = d.node().store().names().unwrap_or_default();
            let successions = d.node().store().successions().unwrap_or_default();
            if let Err(e) = d.node().announce(names, successions).await {
                tracing::debug!("gossip announcement: {e}");
            }
        }
    });
}
