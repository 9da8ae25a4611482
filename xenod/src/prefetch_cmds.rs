//! `xenod prefetch record|show|clear REF`: a stack's prefetch order, the
//! chunks its guest first read while booting, which lazy deploys fetch
//! first (`store/src/order.rs`). Each works on the store alone: no
//! daemon is needed, and a running one sees the change at once.

use std::collections::HashMap;

use clap::Subcommand;
use serde_json::json;
use xenod_host::{Error, Exit, Result};
use xenod_store::{ChunkId, Extent, Kind, display_path};

use crate::cli::Ctx;

/// Entries `show` lists.
const SHOWN: usize = 10;

#[derive(Debug, Subcommand)]
pub enum PrefetchCmd {
    /// Have the next lazy deploy of REF record its order, replacing the
    /// one held (a lazy deploy records one by itself only when none is).
    ///
    /// The deploy records the chunks its guest reads, first read first,
    /// from boot until its service answers (not with --no-wait).
    Record { r#ref: String },
    /// The prefetch order held for REF: how many chunks and bytes, and the
    /// first entries with the file each belongs to.
    Show {
        r#ref: String,
        /// How many entries to list.
        #[arg(long, default_value_t = SHOWN)]
        first: usize,
    },
    /// Drop the prefetch order of REF (and a pending `record`).
    Clear { r#ref: String },
}

pub(crate) fn run(ctx: &Ctx, c: PrefetchCmd) -> Result<()> {
    let store = ctx.store()?;
    match c {
        PrefetchCmd::Record { r#ref } => {
            let top = store.resolve(&r#ref)?;
            store.request_order(&top)?;
            ctx.out(json!({ "layer": top.to_string(), "record_next": true }), || {
                format!("the next lazy deploy of {top} records its prefetch order")
            })
        }
        PrefetchCmd::Clear { r#ref } => {
            let top = store.resolve(&r#ref)?;
            let had = store.remove_order(&top)?;
            ctx.out(json!({ "layer": top.to_string(), "removed": had }), || {
                if had {
                    format!("dropped the prefetch order of {top}")
                } else {
                    format!("{top} had no prefetch order")
                }
            })
        }
        PrefetchCmd::Show { r#ref, first } => {
            let top = store.resolve(&r#ref)?;
            let requested = store.order_requested(&top)?;
            let Some(order) = store.order(&top)? else {
                let why = format!(
                    "no prefetch order for {top}{}",
                    if requested { " (the next lazy deploy records one)" } else { "" }
                );
                return Err(Error::coded(Exit::NotFound, why));
            };
            // Sizes and a file of each chunk, from the stack's manifests.
            let wanted: HashMap<ChunkId, usize> = order.ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
            let mut info: HashMap<ChunkId, (u32, Vec<u8>)> = HashMap::new();
            for l in store.stack(&top)?.iter().rev() {
                for e in store.read_layer(l)? {
                    let e = e?;
                    if let Kind::File { extents, .. } = &e.kind {
                        for x in extents {
                            if let Extent::Data { id, len } = x
                                && wanted.contains_key(id)
                            {
                                info.entry(*id).or_insert_with(|| (*len, e.path.clone()));
                            }
                        }
                    }
                }
            }
            let bytes: u64 = info.values().map(|(l, _)| *l as u64).sum();
            let entries: Vec<serde_json::Value> = order
                .ids
                .iter()
                .take(first)
                .map(|id| {
                    let (len, path) = info.get(id).cloned().unwrap_or_default();
                    json!({ "chunk": id.to_string(), "len": len, "path": display_path(&path).to_string() })
                })
                .collect();
            let v = json!({ "layer": top.to_string(), "entries": order.ids.len(), "bytes": bytes,
                "record_next": requested, "first": entries });
            ctx.out(v.clone(), || {
                let mut s = format!("{top}: {} chunks, {bytes} bytes, first read first", order.ids.len());
                if requested {
                    s += " (the next lazy deploy records it anew)";
                }
                for e in &entries {
                    s += &format!(
                        "\n  {}  {:>7}  {}",
                        &e["chunk"].as_str().unwrap_or("")[..16],
                        e["len"],
                        e["path"].as_str().unwrap_or("")
                    );
                }
                s
            })
        }
    }
}
