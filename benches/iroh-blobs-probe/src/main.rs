//! `send FILE STORE_DIR`: imports FILE into an iroh-blobs file store, prints
//! `NODE@ADDR HASH` and serves it until killed.
//! `send-dirs STORE_DIR DIR...`: imports every regular file of each DIR
//! into the store, one collection per DIR (names relative to it), prints
//! `NODE@ADDR HASH...` (one hash per DIR, in order) and serves until killed.
//! `receive NODE@ADDR HASH STORE_DIR [raw|collection]`: fetches the blob (or
//! the collection with every blob it links) into its own file store, only
//! what that store lacks, and prints `{"bytes":N,"secs":S}`.
//! Endpoints as xenod's: relay disabled, no portmapper, bound to 127.0.0.1.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use iroh::endpoint::{PortmapperConfig, presets};
use iroh::protocol::Router;
use iroh::{Endpoint, EndpointAddr, RelayMode};
use iroh_blobs::format::collection::Collection;
use iroh_blobs::store::fs::FsStore;
use iroh_blobs::{BlobsProtocol, Hash, HashAndFormat};

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ep = Endpoint::builder(presets::Minimal)
        .relay_mode(RelayMode::Disabled)
        .portmapper_config(PortmapperConfig::Disabled)
        .clear_ip_transports()
        .bind_addr("127.0.0.1:0")?
        .bind()
        .await?;
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["send", file, dir] => {
            let store = FsStore::load(dir).await?;
            let t = Instant::now();
            let tag = store.blobs().add_path(std::path::absolute(file)?).await?;
            eprintln!("imported in {:.2} s", t.elapsed().as_secs_f64());
            let addr = ep.bound_sockets()[0];
            println!("{}@{addr} {}", ep.id(), tag.hash);
            let _router = Router::builder(ep).accept(iroh_blobs::ALPN, BlobsProtocol::new(&store, None)).spawn();
            tokio::signal::ctrl_c().await?;
        }
        ["send-dirs", dir, trees @ ..] if !trees.is_empty() => {
            let store = FsStore::load(dir).await?;
            let t = Instant::now();
            let (mut tags, mut roots) = (Vec::new(), Vec::new());
            for tree in trees {
                let tree = std::path::absolute(tree)?;
                let mut files = Vec::new();
                walk(&tree, &mut files)?;
                let mut c = Collection::default();
                for f in files {
                    let tag = store
                        .blobs()
                        .add_path(&f)
                        .temp_tag()
                        .await
                        .with_context(|| format!("importing {}", f.display()))?;
                    let name = f.strip_prefix(&tree)?.to_string_lossy().into_owned();
                    c.push(name, tag.hash());
                    tags.push(tag);
                }
                let root = c.store(&store).await?;
                roots.push(root.hash().to_string());
                tags.push(root);
            }
            eprintln!("imported in {:.2} s", t.elapsed().as_secs_f64());
            let addr = ep.bound_sockets()[0];
            println!("{}@{addr} {}", ep.id(), roots.join(" "));
            let _router = Router::builder(ep).accept(iroh_blobs::ALPN, BlobsProtocol::new(&store, None)).spawn();
            tokio::signal::ctrl_c().await?;
            drop(tags);
        }
        ["receive", peer, hash, dir, format @ ..] => {
            let (node, addr) = peer.split_once('@').context("NODE@ADDR")?;
            let hash: Hash = hash.parse()?;
            let content = match format {
                [] | ["raw"] => HashAndFormat::raw(hash),
                ["collection"] => HashAndFormat::hash_seq(hash),
                _ => bail!("format: raw or collection"),
            };
            let store = FsStore::load(dir).await?;
            let t = Instant::now();
            let to = EndpointAddr::new(node.parse()?).with_ip_addr(addr.parse()?);
            let conn = ep.connect(to, iroh_blobs::ALPN).await?;
            let stats = store.remote().fetch(conn, content).complete().await?;
            store.sync_db().await?;
            let secs = t.elapsed().as_secs_f64();
            println!("{{\"bytes\":{},\"secs\":{secs:.3}}}", stats.payload_bytes_read);
            store.shutdown().await?;
        }
        _ => bail!(
            "usage: send FILE STORE_DIR | send-dirs STORE_DIR DIR... | receive NODE@ADDR HASH STORE_DIR [raw|collection]"
        ),
    }
    Ok(())
}

/// Every regular file under `dir`, in name order.
fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) -> Result<()> {
    let listing = || format!("listing {}", dir.display());
    let mut entries: Vec<_> =
        std::fs::read_dir(dir).with_context(listing)?.collect::<std::io::Result<_>>().with_context(listing)?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let t = e.file_type().with_context(|| format!("the type of {}", e.path().display()))?;
        if t.is_dir() {
            walk(&e.path(), out)?;
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    Ok(())
}
