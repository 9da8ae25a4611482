//! Peer subcommands: `serve`, `share`, `fetch`, `replicate`, `names`, `status`, `stop`.
//!
//! Each is a client of the daemon's local API (DATA_DIR/xenod.sock). With
//! no daemon running, `fetch` and `names` start the same engine embedded
//! for the duration of the command; `status` reads the saved state; `share`
//! needs a daemon, since a ticket is only useful while someone serves it.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use crate::serve::{self, Daemon, Request, State};
use crate::{Coded, Exit};

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
    /// Ask peers for their signed name records; keep those signed by trusted keys.
    Names {
        #[arg(long = "from", value_name = "NODE@ADDR")]
        from: Vec<String>,
    },
    /// This host's node id and address, transfer counters (refused bad chunks,
    /// dropped peers, refused names) and known peers.
    Status,
    /// Shut the daemon of DATA_DIR down (`xenod stop NAME` stops an instance).
    Shutdown,
}

pub fn run(data_dir: &Path, json: bool, cmd: PeerCmd) -> Result<()> {
    let req = match cmd {
        PeerCmd::Serve { listen } => return serve::run(data_dir, listen, json),
        PeerCmd::Share { r#ref } => Request::Share { r#ref },
        PeerCmd::Fetch { target, from } => Request::Fetch { target, from, lazy: false },
        PeerCmd::Names { from } => Request::Names { from },
        PeerCmd::Replicate { r#ref, to } => Request::Replicate { r#ref, to },
        PeerCmd::Status => Request::Status,
        PeerCmd::Shutdown => Request::Shutdown,
    };
    let result = match UnixStream::connect(serve::socket_path(data_dir)) {
        Ok(s) => call(s, &req, json)?,
        Err(_) => match req {
            Request::Share { .. } | Request::Replicate { .. } | Request::Shutdown => bail!(
                "no daemon serves {}; start `xenod --data-dir {} serve` first",
                data_dir.display(),
                data_dir.display()
            ),
            Request::Status => offline_status(data_dir)?,
            req => embedded(data_dir, req, json)?,
        },
    };
    print_result(&result, json)
}

/// Pulls `target` (a ticket or a reference) into the store of `data_dir`,
/// through its daemon if one runs, else an embedded engine; returns the
/// fetch report. Progress goes to stderr.
pub fn fetch(data_dir: &Path, target: &str, json: bool) -> Result<Value> {
    let req = Request::Fetch { target: target.to_owned(), from: Vec::new(), lazy: false };
    let (_, v) = match UnixStream::connect(serve::socket_path(data_dir)) {
        Ok(s) => call(s, &req, json)?,
        Err(_) => embedded(data_dir, req, json)?,
    };
    Ok(v)
}

/// Sends `req` to a daemon; shows its progress; returns its result.
fn call(s: UnixStream, req: &Request, json: bool) -> Result<(&'static str, Value)> {
    let kind = kind(req);
    let mut w = s.try_clone().context("local socket")?;
    writeln!(w, "{}", serde_json::to_string(req)?).context("sending to the daemon")?;
    let pb = crate::progress::bytes("fetching", None, json);
    for line in BufReader::new(s).lines() {
        let v: Value = serde_json::from_str(&line.context("reading from the daemon")?)?;
        if let Some(n) = v.get("note").and_then(Value::as_str) {
            if !json {
                pb.suspend(|| eprintln!("xenod: {n}"));
            }
            continue;
        }
        if let Some(p) = v.get("progress") {
            pb.set_position(p["bytes"].as_u64().unwrap_or(0));
            pb.set_message(format!(
                "fetching {} {}/{} chunks",
                p["phase"].as_str().unwrap_or(""),
                p["chunks_done"],
                p["chunks_total"]
            ));
            continue;
        }
        pb.finish_and_clear();
        if v["ok"] == true {
            return Ok((kind, v["result"].clone()));
        }
        let code = match v["code"].as_u64() {
            Some(3) => Exit::NotFound,
            Some(4) => Exit::Damaged,
            Some(5) => Exit::NameRefused,
            Some(6) => Exit::BadInput,
            Some(7) => Exit::NoProvider,
            _ => Exit::Failure,
        };
        return Err(Coded { code, msg: v["error"].as_str().unwrap_or("daemon error").to_owned() }.into());
    }
    bail!("the daemon closed the connection without an answer")
}

fn kind(req: &Request) -> &'static str {
    match req {
        Request::Status => "status",
        Request::Share { .. } => "share",
        Request::Fetch { .. } => "fetch",
        Request::Chunk { .. } => "chunk",
        Request::Names { .. } => "names",
        Request::Replicate { .. } => "replicate",
        Request::Shutdown => "stop",
        Request::Migrate { .. } => "migrate",
        Request::Checkpoint { .. } => "checkpoint",
        Request::Restore { .. } => "restore",
    }
}

/// Sends `req` to the daemon of `data_dir`, or runs it in an embedded
/// engine when none runs; returns its result.
pub fn request(data_dir: &Path, json: bool, req: Request) -> Result<Value> {
    let r = match UnixStream::connect(serve::socket_path(data_dir)) {
        Ok(s) => call(s, &req, json)?,
        Err(_) => embedded(data_dir, req, json)?,
    };
    Ok(r.1)
}

/// Runs the daemon's engine in this process for one request.
fn embedded(data_dir: &Path, req: Request, json: bool) -> Result<(&'static str, Value)> {
    let kind = kind(&req);
    let rt = serve::runtime()?;
    rt.block_on(async {
        let d = Daemon::start(data_dir, None, true).await?;
        let pb = crate::progress::bytes("fetching", None, json);
        let pb2 = pb.clone();
        let progress = serve::throttled(move |p| {
            pb2.set_position(p.bytes);
            pb2.set_message(format!("fetching {:?} {}/{} chunks", p.phase, p.chunks_done, p.chunks_total));
        });
        let r = d.handle(req, Some(progress)).await;
        pb.finish_and_clear();
        d.stop().await;
        r.map(|v| (kind, v))
    })
}

fn offline_status(data_dir: &Path) -> Result<(&'static str, Value)> {
    let st = State::load(data_dir)?;
    Ok((
        "status",
        json!({
            "node": st.node, "addr": st.addr.map(|a| format!("{}@{a}", st.node)),
            "data_dir": data_dir.display().to_string(), "daemon": false,
            "counters": st.counters.totals, "peers": st.counters.peers,
            "known_peers": st.peers, "shared": st.shared,
        }),
    ))
}

fn mib(v: &Value) -> String {
    format!("{:.1} MiB", v.as_u64().unwrap_or(0) as f64 / (1 << 20) as f64)
}

fn print_result((kind, v): &(&'static str, Value), json: bool) -> Result<()> {
    let mut o = std::io::stdout().lock();
    if json {
        writeln!(o, "{v}")?;
        return Ok(());
    }
    match *kind {
        "share" => {
            writeln!(o, "layer {}", v["layer"].as_str().unwrap_or(""))?;
            writeln!(o, "served by {}", v["addr"].as_str().unwrap_or(""))?;
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
        "names" => {
            for p in v["peers"].as_array().into_iter().flatten() {
                writeln!(o, "{}:", p["peer"].as_str().unwrap_or(""))?;
                if let Some(e) = p["error"].as_str() {
                    writeln!(o, "  error: {e}")?;
                }
                for n in p["accepted"].as_array().into_iter().flatten() {
                    writeln!(o, "  accepted {}", n.as_str().unwrap_or(""))?;
                }
                for r in p["refused"].as_array().into_iter().flatten() {
                    writeln!(o, "  refused {}: {}", r[0].as_str().unwrap_or(""), r[1].as_str().unwrap_or(""))?;
                }
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
            writeln!(o, "fetches              {} ({} failed)", c["fetches"], c["fetches_failed"])?;
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
        "replicate" => crate::replicate::print(&mut o, v)?,
        "stop" => writeln!(o, "daemon stopping")?,
        _ => writeln!(o, "{v}")?,
    }
    Ok(())
}
