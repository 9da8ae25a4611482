//! How long a new host's advertisement takes to reach every daemon of a
//! federation of N, for N = 8 and N = 16, side by side in one run.
//!
//! Each daemon is the real engine (`xenod_host` daemon: store, iroh
//! endpoint on 127.0.0.1, gossip, announce loop) with its own data
//! directory, all in this process. The N join through the first one (its
//! address in their config), as `peers = [...]` does on real hosts; once
//! each lists all N, a new daemon starts, and the clock runs until every
//! one of the N lists it in `hosts`. Rounds (default 5,
//! `XENOD_BENCH_ROUNDS`) each add one more host; the new host's
//! advertisement is its first, sent as it joins.
//!
//! cargo bench -p xenod-benches --bench propagation

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xenod_host::Daemon;
use xenod_host::daemon::{announce, server};

async fn daemon(dir: &Path, peer: Option<&str>) -> Arc<Daemon> {
    std::fs::create_dir_all(dir).unwrap();
    let peers = peer.map(|p| format!("peers = [\"{p}\"]\n")).unwrap_or_default();
    std::fs::write(dir.join("config.toml"), peers).unwrap();
    let d = server::start(dir, Some("127.0.0.1:0".parse().unwrap()), false).await.unwrap();
    announce::spawn(&d);
    d
}

fn knows(d: &Daemon, node: &str) -> bool {
    d.node().hosts(announce::HOST_EXPIRY).iter().any(|(p, _)| p.addr().is_some_and(|a| a.id.to_string() == node))
}

/// Seconds until every daemon of `fed` lists a new one, per round.
async fn rounds(n: usize, rounds: usize, tmp: &Path) -> Vec<f64> {
    let first = daemon(&tmp.join(format!("n{n}-0")), None).await;
    let boot = xenod_peer::format_peer(&first.node().addr());
    let mut fed = vec![first];
    for i in 1..n {
        fed.push(daemon(&tmp.join(format!("n{n}-{i}")), Some(&boot)).await);
    }
    let ids: Vec<String> = fed.iter().map(|d| d.node().id().to_string()).collect();
    let t = Instant::now();
    while !fed.iter().all(|d| ids.iter().filter(|id| **id != d.node().id().to_string()).all(|id| knows(d, id))) {
        assert!(t.elapsed() < Duration::from_secs(60), "the {n} daemons did not find each other in 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("N={n}: all {n} know each other after {:.2} s", t.elapsed().as_secs_f64());
    let mut out = Vec::new();
    for r in 0..rounds {
        let t0 = Instant::now();
        let new = daemon(&tmp.join(format!("n{n}-new{r}")), Some(&boot)).await;
        let id = new.node().id().to_string();
        while !fed.iter().all(|d| knows(d, &id)) {
            assert!(t0.elapsed() < Duration::from_secs(30), "round {r}: not everywhere in 30 s");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        out.push(t0.elapsed().as_secs_f64());
        fed.push(new);
    }
    for d in fed {
        d.stop().await;
    }
    out
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs it once, quickly.
    let quick = std::env::args().all(|a| a != "--bench");
    let n_rounds =
        std::env::var("XENOD_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(if quick { 1 } else { 5 });
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut table = Vec::new();
    for n in [8, 16] {
        let mut r = rt.block_on(rounds(n, n_rounds, tmp.path()));
        let max = r.iter().copied().fold(0.0, f64::max);
        table.push((n, median(&mut r), max));
    }
    println!("| N | new host known to all N: median | max | rounds |");
    println!("|---:|---:|---:|---:|");
    for (n, med, max) in table {
        println!("| {n} | {med:.3} s | {max:.3} s | {n_rounds} |");
    }
}
