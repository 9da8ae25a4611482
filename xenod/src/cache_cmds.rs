//! `xenod cache warm REF`, `xenod cache show`: the store's cache of whole
//! lower files (`DATA_DIR/cache/files`, see `cowfs/src/filecache.rs`),
//! which mounts read through FUSE passthrough. Both work on the store
//! directly, like `mount`: no daemon is needed.

use std::time::{Instant, SystemTime};

use clap::Subcommand;
use serde_json::json;
use xenod_host::{Context, Result};

use crate::cli::{Ctx, human};
use crate::progress;

#[derive(Debug, Subcommand)]
pub enum CacheCmd {
    /// Copy REF's big lower files (1 MiB or more) into the file cache now,
    /// so that mounts of REF read them through passthrough from the first
    /// read.
    ///
    /// The daemon does this by itself after it fetched a whole stack
    /// (`warm_file_cache` in config.toml). Files already cached are kept;
    /// files whose chunks are not all here (a lazily fetched stack) are
    /// skipped; other stacks' files are evicted, least recently used first,
    /// to make room; what does not fit beside REF's own is skipped and
    /// said. A chunk that fails to verify stops it, naming the file and
    /// the chunk (exit 4).
    Warm {
        r#ref: String,
        /// Bound of the cache, as `mount --file-cache-bytes` (files over
        /// half of it are never cached). Default: config.toml's
        /// `file_cache_bytes`, else 4 GiB.
        #[arg(long, value_name = "BYTES")]
        file_cache_bytes: Option<u64>,
    },
    /// The file cache's entries (oldest use first), their bytes and the cap.
    Show {
        /// The cap to report, as `mount --file-cache-bytes`. Default:
        /// config.toml's `file_cache_bytes`, else 4 GiB.
        #[arg(long, value_name = "BYTES")]
        file_cache_bytes: Option<u64>,
    },
}

pub(crate) fn run(ctx: &Ctx, c: CacheCmd) -> Result<()> {
    match c {
        CacheCmd::Warm { r#ref, file_cache_bytes } => warm(ctx, &r#ref, file_cache_bytes),
        CacheCmd::Show { file_cache_bytes } => show(ctx, file_cache_bytes),
    }
}

fn warm(ctx: &Ctx, r: &str, cap: Option<u64>) -> Result<()> {
    let cap = ctx.file_cache_cap(cap)?;
    let store = ctx.store()?;
    let top = store.resolve(r)?;
    let stack = store.stack(&top)?;
    let draw = ctx.draw(false);
    let pb = progress::bytes("warming the file cache", Some(0), draw);
    let started = Instant::now();
    let r = xenod_cowfs::warm(&store, &stack, cap, &mut |done, total| {
        if pb.length() != Some(total) {
            pb.set_length(total);
            pb.reset_eta();
        }
        pb.set_position(done);
    });
    progress::finish(&pb, draw);
    let rep = r.with_context(|| format!("warming the file cache with {top}"))?;
    let secs = started.elapsed().as_secs_f64();
    ctx.out(
        json!({ "id": top.to_string(), "files": rep.files, "bytes": rep.bytes, "written": rep.written,
                "written_bytes": rep.written_bytes, "present": rep.present, "present_bytes": rep.present_bytes,
                "missing": rep.missing, "too_big": rep.too_big, "no_room": rep.no_room,
                "no_room_bytes": rep.no_room_bytes, "cap": rep.cap, "complete": rep.complete(), "seconds": secs }),
        || {
            let mut s = format!(
                "{} of {} big files ({} of {}) are cached: {} written now ({}, {secs:.1} s), {} were there",
                rep.written + rep.present,
                rep.files,
                human(rep.written_bytes + rep.present_bytes),
                human(rep.bytes),
                rep.written,
                human(rep.written_bytes),
                rep.present
            );
            if rep.missing > 0 {
                s += &format!("\n{} skipped: their chunks are not all here (fetch the stack first)", rep.missing);
            }
            if rep.too_big > 0 {
                s += &format!("\n{} skipped: over half the cap of {}", rep.too_big, human(rep.cap));
            }
            if rep.no_room > 0 {
                s += &format!(
                    "\n{} ({}) skipped: the cap of {} is full of this stack's files",
                    rep.no_room,
                    human(rep.no_room_bytes),
                    human(rep.cap)
                );
            }
            s
        },
    )
}

fn show(ctx: &Ctx, cap: Option<u64>) -> Result<()> {
    let cap = ctx.file_cache_cap(cap)?;
    // Opened only to check that DATA_DIR is a store.
    let store = ctx.store()?;
    let u = xenod_cowfs::cache_usage(store.root());
    let age = |t: SystemTime| SystemTime::now().duration_since(t).map_or(0, |d| d.as_secs());
    ctx.out(
        json!({ "dir": xenod_cowfs::cache_dir(store.root()), "bytes": u.bytes, "cap": cap,
                "entries": u.entries.iter().map(|(n, b, t)| json!({ "key": n, "bytes": b, "unused_secs": age(*t) })).collect::<Vec<_>>() }),
        || {
            let mut s = format!("{} entries, {} of a cap of {}", u.entries.len(), human(u.bytes), human(cap));
            for (n, b, t) in &u.entries {
                s += &format!("\n  {}  {:>10}  used {} s ago", &n[..16], human(*b), age(*t));
            }
            s
        },
    )
}
