//! `xenod replicate REF --to PEER...`: the daemon asks each target to pull
//! the stack of REF over the peer protocol's pull ALPN; the targets fetch
//! from this host and from each other at once (see the store's
//! `SwarmPlan`), and each answers with its fetch report.

use xenod_peer::{parse_peer, stack_complete};
use xenod_store::Exit;

use super::context::Daemon;
use super::reply;
use crate::bail;
use crate::error::{Error, Result};

pub async fn replicate(d: &Daemon, reference: &str, to: &[String]) -> Result<reply::Replicate> {
    let targets = to
        .iter()
        .map(|p| parse_peer(p).map_err(|e| Error::coded(Exit::BadInput, format!("--to: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    if targets.is_empty() {
        return Err(Error::coded(Exit::BadInput, "replicate needs at least one --to PEER"));
    }
    let node = d.node();
    if let Some(t) = targets.iter().find(|t| t.id == node.id()) {
        return Err(Error::coded(Exit::BadInput, format!("--to {}: that is this host", t.id)));
    }
    let store = node.store();
    let layer = store.resolve(reference)?;
    if !stack_complete(store, &layer)? {
        bail!("{reference} ({layer}): the stack is not complete on this host; fetch it first");
    }
    let t0 = std::time::Instant::now();
    let outcomes = node.replicate(layer, &targets).await;
    let elapsed_ms = t0.elapsed().as_millis() as u64;
    let failed: Vec<String> =
        outcomes.iter().filter_map(|o| o.error.as_ref().map(|e| format!("{}: {e}", o.node))).collect();
    let v = reply::Replicate { layer: layer.to_string(), elapsed_ms, targets: outcomes };
    if !failed.is_empty() {
        bail!("replicating {layer}: {} of {} targets failed: {}", failed.len(), targets.len(), failed.join("; "));
    }
    Ok(v)
}
