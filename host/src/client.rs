//! The local API's client: a request goes to the daemon of a data
//! directory over its socket, or, where no daemon runs, to an engine
//! started in this process for that one request. Also references that
//! live on other hosts: a ticket (`xenod1...`) names a layer and the peers
//! that hold it; `deploy` and `mount` pass their reference through
//! [`localize`] first, so on a host that has never seen the layer they
//! fetch the stack and then go on exactly as with a local id.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::{Value, json};
use xenod_peer::{Ticket, format_peer, stack_complete};
use xenod_store::{Exit, Store};

use crate::api::{Line, Request, socket_path};
use crate::bail;
use crate::daemon::{State, reply, server, throttled};
use crate::error::{Context, Error, Result};

/// What a client shows while a request runs: the daemon's notes and fetch
/// progress. The binary draws them; [`Quiet`] drops them.
pub trait Watch: Send + Sync {
    fn note(&self, msg: &str);
    /// `p`: a fetch's progress, `{"phase","chunks_done","chunks_total","bytes"}`.
    fn progress(&self, p: &Value);
    /// The request is answered: clear what was drawn.
    fn done(&self) {}
    /// One event of an `events` request.
    fn event(&self, _e: &Value) {}
}

/// Shows nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Quiet;

impl Watch for Quiet {
    fn note(&self, _: &str) {}
    fn progress(&self, _: &Value) {}
}

/// Whether a daemon answers on `data_dir`'s socket.
pub fn daemon_runs(data_dir: &Path) -> bool {
    UnixStream::connect(socket_path(data_dir)).is_ok()
}

/// Sends `req` to the daemon of `data_dir`, or runs it in an embedded
/// engine when none runs; returns its result.
pub fn request(data_dir: &Path, req: Request, watch: &dyn Watch) -> Result<Value> {
    match UnixStream::connect(socket_path(data_dir)) {
        Ok(s) => call(s, &req, watch),
        Err(_) => embedded(data_dir, req, watch),
    }
}

/// Sends `req` to the daemon of `data_dir`; fails when none runs.
pub fn request_daemon(data_dir: &Path, req: Request, watch: &dyn Watch) -> Result<Value> {
    let s = UnixStream::connect(socket_path(data_dir)).map_err(|_| err_no_daemon(data_dir))?;
    call(s, &req, watch)
}

fn err_no_daemon(data_dir: &Path) -> Error {
    Error::msg(format!(
        "no daemon serves {}; start `xenod --data-dir {} serve` first",
        data_dir.display(),
        data_dir.display()
    ))
}

/// Pulls `target` (a ticket or a reference) into the store of `data_dir`,
/// through its daemon if one runs, else an embedded engine; returns the
/// fetch report.
pub fn fetch(data_dir: &Path, target: &str, watch: &dyn Watch) -> Result<Value> {
    request(data_dir, Request::Fetch { target: target.to_owned(), from: Vec::new(), lazy: false }, watch)
}

/// Sends `req` to a daemon; passes on its notes and progress; returns its
/// result, or its error with the exit code the daemon gave it.
fn call(s: UnixStream, req: &Request, watch: &dyn Watch) -> Result<Value> {
    let mut w = s.try_clone().context("local socket")?;
    writeln!(w, "{}", req.to_line()).context("sending to the daemon")?;
    for line in BufReader::new(s).lines() {
        let line = line.context("reading from the daemon")?;
        let l: Line = serde_json::from_str(&line).with_context(|| format!("the daemon's answer {line:?}"))?;
        match l {
            Line::Note { note } => watch.note(&note),
            Line::Progress { progress } => watch.progress(&progress),
            Line::Event { event } => watch.event(&event),
            Line::Done(o) => {
                watch.done();
                if o.ok {
                    return Ok(o.result.unwrap_or(Value::Null));
                }
                let code = Exit::from_code(o.code.map_or(1, u64::from));
                return Err(Error::coded(code, o.error.unwrap_or_else(|| "daemon error".into())));
            }
        }
    }
    watch.done();
    bail!("the daemon closed the connection without an answer")
}

/// Runs the daemon's engine in this process for one request.
fn embedded(data_dir: &Path, req: Request, watch: &dyn Watch) -> Result<Value> {
    match req {
        Request::Share { .. }
        | Request::Replicate { .. }
        | Request::Shutdown
        | Request::Deploy { .. }
        | Request::Services { .. }
        | Request::Events { .. }
        | Request::Event { .. } => return Err(err_no_daemon(data_dir)),
        Request::Status => return offline_status(data_dir),
        _ => {}
    }
    let rt = server::runtime()?;
    rt.block_on(async {
        let d = server::start(data_dir, None, true).await?;
        // The watch is borrowed: relay progress through a channel drained here.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
        let progress = throttled(move |p| {
            let _ = tx.send(json!(p));
        });
        let r = {
            let work = server::dispatch(&d, req, Some(progress));
            let mut work = std::pin::pin!(work);
            loop {
                tokio::select! {
                    r = &mut work => break r,
                    Some(p) = rx.recv() => watch.progress(&p),
                }
            }
        };
        watch.done();
        d.stop().await;
        r
    })
}

/// `xenod status` with no daemon: what its state file remembers.
fn offline_status(data_dir: &Path) -> Result<Value> {
    let st = State::load(data_dir)?;
    let addr = st.addr.map(|a| format!("{}@{a}", st.node));
    Ok(serde_json::to_value(reply::Status {
        node: st.node,
        addr,
        data_dir: data_dir.display().to_string(),
        daemon: false,
        counters: st.counters.totals,
        peers: st.counters.peers,
        known_peers: st.peers,
        shared: st.shared,
        gossip: None,
        lazy_fetches: None,
        capacity: None,
        capacity_warnings: Vec::new(),
        lazy: None,
    })?)
}

/// Whether `reference` is a ticket rather than a local reference.
pub fn is_ticket(reference: &str) -> bool {
    reference.trim().starts_with("xenod1")
}

/// Returns a reference the local store resolves: `reference` itself unless
/// it is a ticket, else the ticket's layer id once its whole stack is here
/// (fetched from the ticket's providers if anything is missing; progress
/// and a summary on stderr).
pub fn localize(data_dir: &Path, reference: &str, watch: &dyn Watch) -> Result<String> {
    if !is_ticket(reference) {
        return Ok(reference.to_owned());
    }
    let ticket: Ticket =
        reference.parse().map_err(|e| Error::coded(Exit::BadInput, format!("{e} (given {reference:?})")))?;
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
    watch.note(&format!("fetching {what} from {}", providers.join(", ")));
    let rep = fetch(data_dir, reference, watch)
        .with_context(|| format!("the ticket's providers ({}) for layer {layer}", providers.join(", ")))?;
    watch.note(&format!(
        "fetched {} chunks, {:.1} MiB in {:.2} s ({} chunks were already here)",
        rep["chunks_fetched"],
        rep["bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
        rep["elapsed_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
        rep["chunks_local"],
    ));
    Ok(layer.to_string())
}
