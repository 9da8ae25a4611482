//! Store upkeep that `verify`, `gc` and `export` grew: `verify --repair`
//! (a request to the daemon, or an embedded engine), `gc --dry-run`, and
//! the stack `export` materialises when `.mount` files add layers to it,
//! and the bytes it writes.

use std::collections::BTreeMap;
use std::io::Write;

use serde_json::{Value, json};
use xenod_host::daemon::reply::Repair;
use xenod_host::{Error, Exit, Request, Result, client};
use xenod_store::{LayerId, Merged, Store};

use crate::cli::{Ctx, human};

/// `xenod verify --repair [--from PEER|TICKET]...`.
pub fn verify_repair(ctx: &Ctx, from: Vec<String>) -> Result<()> {
    let v = client::request(&ctx.data_dir, Request::Repair { from }, &ctx.watcher("repairing"))?;
    let r: Repair = serde_json::from_value(v.clone())?;
    ctx.out(v, || describe(&r))?;
    if !r.clean {
        let n = r.unrepaired.len();
        let what = if n > 0 { format!("{n} chunk(s) could not be repaired") } else { "damage remains".to_string() };
        return Err(Error::coded(Exit::Damaged, format!("the store is still damaged: {what} (see above)")));
    }
    Ok(())
}

/// The text form of a repair report.
fn describe(r: &Repair) -> String {
    let mut s = format!("found {} damaged or missing chunk(s)", r.found);
    if !r.repaired.is_empty() {
        s += &format!("\nrepaired {} chunk(s):", r.repaired.len());
        for x in &r.repaired {
            s += &format!("\n  {}  from {}", x.chunk, x.from);
        }
    }
    if !r.unrepaired.is_empty() {
        s += &format!("\ncould not repair {} chunk(s):", r.unrepaired.len());
        for x in &r.unrepaired {
            s += &format!("\n  {}: {}", x.chunk, x.why);
            for (l, at) in &x.layers {
                s += &format!("\n    needed by layer {l} at {at}");
            }
        }
    }
    for p in &r.packs_rewritten {
        s += &format!("\nrewrote pack {p} without its damaged records");
    }
    for p in &r.packs_kept {
        s += &format!("\nkept pack {}: {}", p.pack, p.why);
    }
    for p in &r.providers {
        let dropped = p.dropped.as_deref().map(|d| format!(", given up: {d}")).unwrap_or_default();
        s += &format!(
            "\nprovider {}: {} chunk(s), {} absent, {} bad{dropped}",
            p.node, p.chunks, p.absent, p.bad_chunks
        );
    }
    if r.providers.is_empty() && r.found > 0 {
        s += "\nno provider was asked: give one with --from NODE@ADDR or a ticket";
    }
    for b in &r.broken_layers {
        s += &format!("\nbroken layer {}: {}", b.id, b.why);
    }
    for m in &r.broken_mounts {
        s += &format!("\nbroken .mount {} in layer {}: {:?}: {}", m.file, m.layer, m.reference, m.why);
    }
    for p in &r.bad_packs {
        s += &format!("\nbad pack: {p}");
    }
    s += if r.clean { "\nclean" } else { "\nDAMAGED" };
    s
}

/// `xenod gc --dry-run`: what gc would remove, and how many bytes.
pub fn gc_dry_run(ctx: &Ctx) -> Result<()> {
    let store = ctx.store()?;
    let phases = crate::progress::Phases::new("gc --dry-run", ctx.draw(false));
    let p = store.gc_plan_with(&|step| phases.step(step));
    phases.finish();
    let p = p?;
    let freed = p.freed_bytes();
    let v = json!({
        "dry_run": true,
        "live_chunks": p.live_chunks,
        "dead_chunks": p.dead_chunks,
        "dead_bytes": p.dead_bytes,
        "freed_bytes": freed,
        "dead_layers": p.dead_layers.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
        "remove_packs": p.remove_packs.iter().map(|(f, n)| json!({"path": f, "bytes": n})).collect::<Vec<_>>(),
        "rewrite_packs": p.rewrite_packs.iter().map(|(f, n, live)| json!({"path": f, "bytes": n, "live_bytes": live})).collect::<Vec<_>>(),
        "stale_tmp": p.stale_tmp.iter().map(|(f, n)| json!({"path": f, "bytes": n})).collect::<Vec<_>>(),
    });
    ctx.out(v, || {
        let mut s = String::new();
        for l in &p.dead_layers {
            s += &format!("would forget layer {l}\n");
        }
        for (f, n) in &p.remove_packs {
            s += &format!("would remove {} ({})\n", f.display(), human(*n));
        }
        for (f, n, live) in &p.rewrite_packs {
            s += &format!("would rewrite {} ({}, {} live)\n", f.display(), human(*n), human(*live));
        }
        for (f, n) in &p.stale_tmp {
            s += &format!("would remove unfinished {} ({})\n", f.display(), human(*n));
        }
        s += &format!(
            "would keep {} chunks and remove {} ({} stored); about {} freed (dry run: nothing removed)",
            p.live_chunks,
            p.dead_chunks,
            human(p.dead_bytes),
            human(freed)
        );
        s
    })
}

/// Where each layer of the union `export` writes for `stack` (bottom
/// first) goes: as `mount` shows it, with the layers `.mount` files add
/// placed on their directories, unless `no_mounts` asks for the stack
/// alone (each layer at the root). The second value lists the layers
/// `.mount` files added, with where.
pub fn export_placement(store: &Store, stack: &[LayerId], no_mounts: bool) -> Result<(Placement, Added)> {
    if no_mounts {
        return Ok((stack.iter().map(|l| (*l, Vec::new())).collect(), Vec::new()));
    }
    // The same resolution `mount` does (cowfs's lower tree), so what is
    // exported is what a mount shows; a reference that does not resolve
    // fails here as it fails the mount, naming the file.
    let tree = xenod_cowfs::LowerTree::load(store, stack).map_err(|e| {
        Error::from(e).context("following the stack's .mount files (pass --no-mounts to export the stack alone)")
    })?;
    let placed = tree.placed().to_vec();
    drop(tree);
    let added: Added =
        placed.iter().filter(|(_, dir)| !dir.is_empty()).map(|(l, dir)| (*l, xenod_store::display_path(dir))).collect();
    Ok((placed, added))
}

/// The bytes of regular files in the union of `placed`, holes included:
/// the total an export of it writes. A layer alone at the root says it in
/// its root; a union is counted in one pass over its manifests, streamed
/// (what upper layers replace or delete does not count).
pub fn union_file_bytes(store: &Store, placed: &Placement) -> Result<u64> {
    if let [(layer, at)] = placed.as_slice()
        && at.is_empty()
    {
        return Ok(store.layer_root(layer)?.file_bytes);
    }
    let mut n = 0u64;
    for e in Merged::placed(store, placed, Vec::new())? {
        if let xenod_store::Kind::File { size, .. } = e?.kind {
            n += size;
        }
    }
    Ok(n)
}

/// Layers, bottom first, each with the directory its root shows at.
pub type Placement = Vec<(LayerId, Vec<u8>)>;

/// Layers `.mount` files added to an export, each with its directory.
pub type Added = Vec<(LayerId, String)>;

/// Tells which layers `.mount` files added to an export, on stderr.
pub fn note_added(added: &[(LayerId, String)], quiet: bool) {
    if quiet || added.is_empty() {
        return;
    }
    let mut by_dir: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (l, dir) in added {
        by_dir.entry(dir).or_default().push(l.fmt_short().to_string());
    }
    let mut e = std::io::stderr().lock();
    for (dir, layers) in by_dir {
        let _ = writeln!(e, "xenod: {dir}: {} (from .mount)", layers.join(", "));
    }
}

/// `added` as JSON.
pub fn added_json(added: &[(LayerId, String)]) -> Value {
    json!(added.iter().map(|(l, d)| json!({"id": l.to_string(), "at": d})).collect::<Vec<_>>())
}
