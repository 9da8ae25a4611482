//! `send FILE STORE_DIR`: imports FILE into an iroh-blobs file store, prints
//! `NODE@ADDR HASH` and serves it until killed.
//! `receive NODE@ADDR HASH STORE_DIR`: fetches the blob into its own file
//! store and prints `{"bytes":N,"secs":S}`.
//! Endpoints as xenod's: relay disabled, no portmapper, bound to 127.0.0.1.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use iroh::endpoint::{PortmapperConfig, presets};
use iroh::protocol::Router;
use iroh::{Endpoint, EndpointAddr, RelayMode};
use iroh_blobs::store::fs::FsStore;
use iroh_blobs::{BlobsProtocol, Hash};

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
        ["receive", peer, hash, dir] => {
            let (node, addr) = peer.split_once('@').context("NODE@ADDR")?;
            let hash: Hash = hash.parse()?;
            let store = FsStore::load(dir).await?;
            let t = Instant::now();
            let to = EndpointAddr::new(node.parse()?).with_ip_addr(addr.parse()?);
            let conn = ep.connect(to, iroh_blobs::ALPN).await?;
            let stats = store.remote().fetch(conn, hash).complete().await?;
            store.sync_db().await?;
            let secs = t.elapsed().as_secs_f64();
            println!("{{\"bytes\":{},\"secs\":{secs:.3}}}", stats.payload_bytes_read);
            store.shutdown().await?;
        }
        _ => bail!("usage: send FILE STORE_DIR | receive NODE@ADDR HASH STORE_DIR"),
    }
    Ok(())
}
