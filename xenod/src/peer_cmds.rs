//! Peer subcommands: `serve`, `share`, `fetch`, `replicate`, `status`, `stop`
//! (`names` is with the other name commands, in `names_cmds`).
//!
//! Each is a client of the daemon's local API (DATA_DIR/xenod.sock). With
//! no daemon running, `fetch` (and `names --from`) start the same engine embedded
//! for the duration of the command; `status` reads the saved state; `share`
//! needs a daemon, since a ticket is only useful while someone serves it.

use std::io::Write;
use std::net::SocketAddr;

use clap::Subcommand;
use serde_json::Value;
use xenod_host::{Request, Result, client};

use crate::cli::Ctx;

#[derive(Debug, Subcommand)]
pub enum PeerCmd {
    /// Run the daemon of DATA_DIR: store, peer endpoint, local API on DATA_DIR/xenod.sock.
    ///
    /// Prints one line once it accepts requests; stops on SIGTERM, SIGINT or `xenod shutdown`.
    Serve {
        /// UDP address of the peer endpoint [default: config `listen`, else 0.0.0.0:0;
        /// port 0 reuses the last port if free].
        #[arg(long, value_name = "IP:PORT")]
        listen: Option<SocketAddr>,
    },
    /// Print a ticket for REF, served by this host's daemon, as the last line.
    Share { r#ref: String },
    /// Pull a layer and its stack into the store (without mounting it).
    ///
    /// TARGET is a ticket (xenod1...) or a REF; providers are the ticket's,
    /// those given with --from, else the configured and remembered peers.
    /// Only missing chunks are asked for; each is verified before it is kept.
    Fetch {
        target: String,
        /// A provider to ask, as NODE@IP:PORT (repeatable).
        #[arg(long = "from", value_name = "NODE@ADDR")]
        from: Vec<String>,
    },
    /// Have peers fetch REF from this host's daemon and from each other at once.
    ///
    /// Each PEER must allow this host's node id in its config (`pull_from`).
    /// Every target fetches its own share of the chunks from this host and
    /// the rest from the other targets as they arrive there, so the stack
    /// leaves this host about once however many targets there are.
    Replicate {
        r#ref: String,
        /// A target, as NODE@IP:PORT (repeatable).
        #[arg(long = "to", value_name = "NODE@ADDR", required = true)]
        to: Vec<String>,
    },
    /// The live hosts this daemon knows (itself first), with what each can
    /// run, its capacity, load and labels.
    ///
    /// --where keeps the hosts an expression matches, e.g.
    /// `mem_free>=1G && hv=kvm && label.region=eu`. Names: node, hv (a
    /// list: `=` when any element matches), vcpus, mem_total, mem_free,
    /// disk_free, load, layers, label.KEY; operators = != >= <= > <,
    /// combined with && || ! and parentheses; numbers take K M G T
    /// (binary multiples). A host advertises itself every few seconds and
    /// is gone after `host_expiry_secs` (10) of silence, or at once when
    /// its daemon stops.
    Hosts {
        #[arg(long = "where", value_name = "EXPR")]
        filter: Option<String>,
    },
    /// This host's node id and address, transfer counters (refused bad chunks,
    /// dropped peers, refused names) and known peers.
    Status,
    /// Shut the daemon of DATA_DIR down (`xenod stop NAME` stops an instance).
    Shutdown,
}

pub fn run(ctx: &Ctx, cmd: PeerCmd) -> Result<()> {
    let req = match cmd {
        PeerCmd::Serve { listen } => {
            return xenod_host::daemon::server::run(&ctx.data_dir, listen, ctx.json, |ready| println!("{ready}"));
        }
        PeerCmd::Share { r#ref } => Request::Share { r#ref },
        PeerCmd::Fetch { target, from } => Request::Fetch { target, from, lazy: false },
        PeerCmd::Replicate { r#ref, to } => Request::Replicate { r#ref, to },
        PeerCmd::Status => Request::Status,
        PeerCmd::Hosts { filter } => {
            let v = client::request_daemon(&ctx.data_dir, Request::Hosts { filter }, &ctx.watcher("hosts"))?;
            return print_result("hosts", &v, ctx.json);
        }
        PeerCmd::Shutdown => Request::Shutdown,
    };
    let op = req.op();
    let v = client::request(&ctx.data_dir, req, &ctx.watcher("fetching"))?;
    print_result(op, &v, ctx.json)
}

fn mib(v: &Value) -> String {
    format!("{:.1} MiB", v.as_u64().unwrap_or(0) as f64 / (1 << 20) as f64)
}

fn print_result(op: &str, v: &Value, json: bool) -> Result<()> {
    let mut o = std::io::stdout().lock();
    if json {
        writeln!(o, "{v}")?;
        return Ok(());
    }
    match op {
        "share" => {
            // The ticket alone on stdout (TICKET=$(xenod share REF)); the rest for people.
            eprintln!("layer {}\nserved by {}", v["layer"].as_str().unwrap_or(""), v["addr"].as_str().unwrap_or(""));
            writeln!(o, "{}", v["ticket"].as_str().unwrap_or(""))?;
        }
        "fetch" => {
            writeln!(
                o,
                "fetched {} ({} layers): {} chunks, {} ({} on the wire) in {:.2} s; {} chunks were already here",
                v["layer"].as_str().unwrap_or(""),
                v["stack"].as_array().map_or(0, |s| s.len()),
                v["chunks_fetched"],
                mib(&v["bytes"]),
                mib(&v["wire_bytes"]),
                v["elapsed_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
                v["chunks_local"],
            )?;
            for p in v["providers"].as_array().into_iter().flatten() {
                let dropped = p["dropped"].as_str().map(|d| format!(", dropped: {d}")).unwrap_or_default();
                writeln!(
                    o,
                    "  {}  {} chunks, {}, {} bad{dropped}",
                    p["node"].as_str().unwrap_or(""),
                    p["chunks"],
                    mib(&p["wire_bytes"]),
                    p["bad_chunks"]
                )?;
            }
        }
        "status" => {
            let c = &v["counters"];
            writeln!(o, "node      {}", v["node"].as_str().unwrap_or("(never started)"))?;
            writeln!(o, "address   {}", v["addr"].as_str().unwrap_or("-"))?;
            writeln!(o, "daemon    {}", if v["daemon"] == true { "running" } else { "not running" })?;
            writeln!(o, "received  {} chunks, {}", c["chunks_received"], mib(&c["bytes_received"]))?;
            writeln!(o, "served    {} chunks, {}", c["chunks_served"], mib(&c["bytes_served"]))?;
            writeln!(o, "refused bad chunks   {}", c["bad_chunks"])?;
            writeln!(o, "protocol errors      {}", c["protocol_errors"])?;
            writeln!(o, "dropped peers        {}", c["peers_dropped"])?;
            writeln!(o, "refused names        {}", c["names_refused"])?;
            writeln!(
                o,
                "refused events       {} ({} dropped over a host's rate)",
                c["events_refused"], c["events_dropped"]
            )?;
            writeln!(o, "fetches              {} ({} failed)", c["fetches"], c["fetches_failed"])?;
            if let Some(cap) = v.get("capacity") {
                let mib = |x: &Value| x.as_u64().unwrap_or(0) >> 20;
                let free = cap["mem"].as_u64().unwrap_or(0).saturating_sub(cap["held"]["mem"].as_u64().unwrap_or(0));
                writeln!(
                    o,
                    "capacity  memory {} MiB, {} MiB held by {} running guest(s), {} MiB free; vcpus {}, {} held",
                    mib(&cap["mem"]),
                    mib(&cap["held"]["mem"]),
                    cap["holders"],
                    free >> 20,
                    cap["vcpus"],
                    cap["held"]["vcpus"]
                )?;
            }
            for w in v["capacity_warnings"].as_array().into_iter().flatten() {
                writeln!(o, "warning   {}", w.as_str().unwrap_or(""))?;
            }
            for (id, p) in v["peers"].as_object().into_iter().flatten() {
                writeln!(
                    o,
                    "peer {id}: received {}, served {}, bad {}, dropped {}, names refused {}",
                    p["chunks_received"], p["chunks_served"], p["bad_chunks"], p["dropped"], p["names_refused"]
                )?;
            }
            for (id, p) in v["known_peers"].as_object().into_iter().flatten() {
                let addrs: Vec<&str> = p["addrs"].as_array().into_iter().flatten().filter_map(|a| a.as_str()).collect();
                writeln!(o, "known {id}@{}", addrs.join(","))?;
            }
        }
        "replicate" => print_replicate(&mut o, v)?,
        "hosts" => print_hosts(&mut o, v)?,
        "shutdown" => writeln!(o, "daemon stopping")?,
        _ => writeln!(o, "{v}")?,
    }
    Ok(())
}

/// The text form of a replicate result.
fn print_replicate(o: &mut impl Write, v: &Value) -> Result<()> {
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

/// `hosts`: one line per host, this one first.
fn print_hosts(o: &mut impl Write, v: &Value) -> Result<()> {
    for h in v["hosts"].as_array().into_iter().flatten() {
        let a = &h["attrs"];
        let gib = |x: &Value| format!("{:.1}G", x.as_u64().unwrap_or(0) as f64 / (1u64 << 30) as f64);
        let hv: Vec<&str> = a["hv"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let labels: Vec<String> = a["labels"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect();
        writeln!(
            o,
            "{}{}  hv {}  {} vcpus  mem {}/{}  disk {}  load {:.2}  {} layers  {}",
            &h["node"].as_str().unwrap_or("")[..10.min(h["node"].as_str().unwrap_or("").len())],
            if h["this_host"] == true { " (this host)" } else { "" },
            if hv.is_empty() { "-".to_string() } else { hv.join(",") },
            a["vcpus"],
            gib(&a["mem_free"]),
            gib(&a["mem_total"]),
            gib(&a["disk_free"]),
            a["load"].as_f64().unwrap_or(0.0),
            h["layers"],
            labels.join(" ")
        )?;
    }
    Ok(())
}
