//! `xenod replicate REF --to PEER...`: the daemon asks each target to pull
//! the stack of REF over the peer protocol's pull ALPN; the targets fetch
//! from this host and from each other at once (see the store's
//! `SwarmPlan`), and each answers with its fetch report.

use std::io::Write;

use anyhow::{Result, bail};
use serde_json::{Value, json};
use xenod_peer::{parse_peer, stack_complete};

use crate::serve::Daemon;
use crate::{Coded, Exit};

pub async fn replicate(d: &Daemon, reference: &str, to: &[String]) -> Result<Value> {
    let targets = to
        .iter()
        .map(|p| parse_peer(p).map_err(|e| Coded { code: Exit::BadInput, msg: format!("--to: {e}") }))
        .collect::<Result<Vec<_>, _>>()?;
    if targets.is_empty() {
        bail!(Coded { code: Exit::BadInput, msg: "replicate needs at least one --to PEER".into() });
    }
    let node = d.node();
    if let Some(t) = targets.iter().find(|t| t.id == node.id()) {
        bail!(Coded { code: Exit::BadInput, msg: format!("--to {}: that is this host", t.id) });
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
    let v = json!({ "layer": layer.to_string(), "elapsed_ms": elapsed_ms, "targets": outcomes });
    if !failed.is_empty() {
        bail!("replicating {layer}: {} of {} targets failed: {}", failed.len(), targets.len(), failed.join("; "));
    }
    Ok(v)
}

/// The text form of a replicate result.
pub fn print(o: &mut impl Write, v: &Value) -> Result<()> {
    writeln!(
        o,
        "replicated {} to {} peers in {:.2} s",
        v["layer"].as_str().unwrap_or(""),
        v["targets"].as_array().map_or(0, |t| t.len()),
        v["elapsed_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
    )?;
    for t in v["targets"].as_array().into_iter().flatten() {
        let r = &t["report"];
        let from: Vec<String> = r["providers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["chunks"].as_u64().unwrap_or(0) > 0)
            .map(|p| format!("{} from {}", p["chunks"], p["node"].as_str().unwrap_or("")))
            .collect();
        writeln!(
            o,
            "  {}  {} chunks in {:.2} s ({})",
            t["node"].as_str().unwrap_or(""),
            r["chunks_fetched"],
            r["elapsed_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
            from.join(", ")
        )?;
    }
    Ok(())
}
