//! References that live on other hosts: a ticket (`xenod1...`) names a
//! layer and the peers that hold it. `deploy` and `mount` pass their
//! reference through [`localize`] first, so on a host that has never seen
//! the layer they fetch the stack (through this host's daemon if one runs,
//! else an embedded engine) and then go on exactly as with a local id.

use std::path::Path;

use anyhow::{Context, Result};
use xenod_peer::{Ticket, format_peer, stack_complete};
use xenod_store::Store;

use crate::{Coded, Exit};

/// Whether `reference` is a ticket rather than a local reference.
pub fn is_ticket(reference: &str) -> bool {
    reference.trim().starts_with("xenod1")
}

/// Returns a reference the local store resolves: `reference` itself unless
/// it is a ticket, else the ticket's layer id once its whole stack is here
/// (fetched from the ticket's providers if anything is missing; progress
/// and a summary on stderr).
pub fn localize(data_dir: &Path, reference: &str, json: bool) -> Result<String> {
    if !is_ticket(reference) {
        return Ok(reference.to_owned());
    }
    let ticket: Ticket =
        reference.parse().map_err(|e| Coded { code: Exit::BadInput, msg: format!("{e} (given {reference:?})") })?;
    let layer = ticket.layer;
    let complete = {
        let store = Store::open(data_dir).with_context(|| format!("opening the store in {}", data_dir.display()))?;
        stack_complete(&store, &layer)?
    };
    if complete {
        return Ok(layer.to_string());
    }
    let providers: Vec<String> = ticket.providers.iter().map(format_peer).collect();
    let what = ticket.name.as_deref().map(|n| format!("{layer} ({n})")).unwrap_or_else(|| layer.to_string());
    eprintln!("fetching {what} from {}", providers.join(", "));
    let rep = crate::peer_cmds::fetch(data_dir, reference, json)
        .with_context(|| format!("the ticket's providers ({}) for layer {layer}", providers.join(", ")))?;
    eprintln!(
        "fetched {} chunks, {:.1} MiB in {:.2} s ({} chunks were already here)",
        rep["chunks_fetched"],
        rep["bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
        rep["elapsed_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
        rep["chunks_local"],
    );
    Ok(layer.to_string())
}
