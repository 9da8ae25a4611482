//! The daemon's socket server and request dispatch, and `xenod serve`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use xenod_peer::{FetchProgress, Ticket, format_peer};
use xenod_store::Exit;

use super::context::{Daemon, throttled};
use super::reply;
use crate::api::{Line, Outcome, Request, socket_path};
use crate::error::{Context, Error, Result};
use crate::{bail, migrate, placement};

/// Starts the engine of `data_dir` with every protocol the daemon serves
/// (see [`Daemon::start`]).
pub async fn start(data_dir: &Path, listen: Option<SocketAddr>, embedded: bool) -> Result<Arc<Daemon>> {
    let handler = migrate::Handler::default();
    let d =
        Daemon::start(data_dir, listen, embedded, || vec![(migrate::ALPN.to_vec(), Box::new(handler.clone()) as _)])
            .await?;
    let _ = handler.daemon.set(Arc::downgrade(&d));
    Ok(d)
}

/// Answers one API request; `progress` receives fetch progress.
pub async fn dispatch(d: &Arc<Daemon>, req: Request, progress: Option<xenod_peer::ProgressFn>) -> Result<Value> {
    match req {
        Request::Migrate { instance, to, cold, level, live, save } => {
            let mode = match (live, save) {
                (true, true) => {
                    return Err(Error::coded(Exit::BadInput, "--live and --save exclude each other"));
                }
                (true, false) => migrate::SaveMode::Live,
                (false, true) => migrate::SaveMode::Stopped,
                (false, false) => migrate::SaveMode::Auto,
            };
            migrate::migrate(d, &instance, &to, cold, mode, level).await
        }
        Request::Checkpoint { instance, name } => migrate::checkpoint(d, &instance, name).await,
        Request::Restore { checkpoint, on, name } => migrate::restore(d, &checkpoint, on.as_deref(), name).await,
        Request::Status => Ok(serde_json::to_value(d.status())?),
        Request::Share { r#ref } => {
            let id = d.store().resolve(&r#ref)?;
            // Refuse to hand out a ticket for a stack we cannot serve whole.
            let stack = d.store().stack(&id)?;
            for l in &stack {
                for c in d.store().layer_root(l)?.manifest {
                    if !d.store().contains(&c.id)? {
                        bail!("layer {l} is incomplete here (manifest chunk {} missing)", c.id);
                    }
                }
            }
            let name = r#ref.starts_with(xenod_store::SCHEME).then(|| r#ref.clone());
            let ticket = Ticket { layer: id, name, providers: vec![d.node().addr()] };
            d.state().lock().unwrap_or_else(|e| e.into_inner()).shared.insert(id.to_string());
            d.save_state();
            Ok(serde_json::to_value(reply::Share {
                layer: id.to_string(),
                node: d.node().id().to_string(),
                addr: format_peer(&d.node().addr()),
                ticket: ticket.to_string(),
            })?)
        }
        Request::Names { from } => {
            let mut peers = Daemon::parse_peers(&from)?;
            if peers.is_empty() {
                peers = d.default_peers();
            }
            let mut out = Vec::new();
            for p in &peers {
                let r = d.node().fetch_names(p).await;
                let peer = p.id.to_string();
                out.push(match r {
                    Ok(rep) => reply::PeerNames {
                        peer,
                        accepted: Some(rep.accepted),
                        unchanged: Some(rep.unchanged),
                        refused: Some(rep.refused),
                        error: None,
                    },
                    Err(e) => reply::PeerNames {
                        peer,
                        accepted: None,
                        unchanged: None,
                        refused: None,
                        error: Some(e.to_string()),
                    },
                });
            }
            d.save_state();
            Ok(serde_json::to_value(reply::Names { peers: out })?)
        }
        Request::Fetch { target, from, lazy } => {
            Ok(serde_json::to_value(d.fetch(&target, &from, lazy, progress).await?)?)
        }
        Request::Chunk { id } => Ok(serde_json::to_value(super::lazy::chunk(d, &id).await?)?),
        Request::ChunkStream => {
            Err(crate::err!("chunk_stream turns its connection into a chunk stream; it is no request to dispatch"))
        }
        Request::Replicate { r#ref, to } => {
            Ok(serde_json::to_value(super::replicate::replicate(d, &r#ref, &to).await?)?)
        }
        Request::Reload => Ok(serde_json::to_value(d.reload_trust()?)?),
        Request::Hosts { filter } => Ok(serde_json::to_value(super::announce::hosts(d, filter.as_deref())?)?),
        Request::Services { name } => Ok(serde_json::to_value(super::announce::services(d, name.as_deref()).await?)?),
        Request::Event { event } => super::events::told(d, event).await,
        Request::Events { .. } => Err(Error::coded(Exit::Usage, "events are streamed on the socket only")),
        Request::Deploy { target, place, replicas, spread, pack, dry_run, options } => {
            let args = placement::PlaceArgs { place, replicas, spread, pack, dry_run };
            placement::deploy(d, &target, &args, *options).await
        }
        Request::Net { net } => crate::net::host::handle(d, net).await,
        Request::Usage { name, since } => Ok(serde_json::to_value(super::usage::report(d, name, since).await?)?),
        Request::Repair { from } => Ok(serde_json::to_value(super::repair::repair(d, &from).await?)?),
        Request::Shutdown => {
            // notify_one keeps a permit when the accept loop is not
            // waiting at this instant; notify_waiters would lose it.
            d.shutdown().notify_one();
            Ok(serde_json::to_value(reply::Shutdown { stopping: true })?)
        }
    }
}

/// Serves the local API until asked to stop or signalled.
pub async fn serve_socket(d: Arc<Daemon>, on_ready: impl FnOnce()) -> Result<()> {
    let sock = socket_path(d.data_dir());
    if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
        bail!("a daemon already serves {} (socket {})", d.data_dir().display(), sock.display());
    }
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    on_ready();
    // Under systemd (Type=notify): the socket accepts now. The tick below
    // feeds the watchdog (WatchdogSec= well above 5 s); no-ops elsewhere.
    service_manager(sd_notify::NotifyState::Ready);
    loop {
        tokio::select! {
            a = listener.accept() => {
                let (s, _) = a.context("accepting on the local socket")?;
                let me = d.clone();
                tokio::spawn(async move {
                    if let Err(e) = client(&me, s).await {
                        tracing::debug!("local client: {}", e.chain());
                    }
                });
            }
            _ = d.shutdown().notified() => break,
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match d.reload_trust() {
                Ok(r) => tracing::info!("SIGHUP: trust reloaded ({} keys; {} names accepted)", r.trusted.len(), r.accepted.len()),
                Err(e) => tracing::warn!("SIGHUP: trust not reloaded, the old one stays: {}", e.chain()),
            },
            _ = tick.tick() => {
                d.save_state();
                service_manager(sd_notify::NotifyState::Watchdog);
            }
        }
    }
    service_manager(sd_notify::NotifyState::Stopping);
    let _ = std::fs::remove_file(&sock);
    d.save_state();
    Ok(())
}

/// Tells systemd `state` when it started this daemon (`NOTIFY_SOCKET`);
/// nothing otherwise. A lost notice is logged, never fatal.
fn service_manager(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!("telling systemd: {e}");
    }
}

async fn client(d: &Arc<Daemon>, s: UnixStream) -> Result<()> {
    let (r, mut w) = s.into_split();
    let mut line = String::new();
    let mut r = BufReader::new(r.take(1 << 20));
    r.read_line(&mut line).await?;
    let req = match Request::from_line(&line) {
        Ok(r) => r,
        Err(e) => {
            let v = Line::Done(Outcome::failed(e.to_string(), Exit::BadInput));
            w.write_all(format!("{}\n", serde_json::to_string(&v)?).as_bytes()).await?;
            return Ok(());
        }
    };
    if let Request::Events { follow, types, host } = req {
        return super::events::stream(d, follow, types, host, r, w).await;
    }
    if let Request::ChunkStream = req {
        // The client sends nothing more until the stream's first byte, so
        // the line reader holds nothing past the request: its limit (for
        // the request line) goes.
        let mut r = r.into_inner();
        r.set_limit(u64::MAX);
        return super::lazy::stream(d, r, w).await;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Line>();
    let (notes, mut notes_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let progress = throttled(move |p: &FetchProgress| {
        let _ = tx.send(Line::Progress { progress: json!(p) });
    });
    let me = d.clone();
    let work = tokio::spawn(crate::notes::with_notes(notes, async move { dispatch(&me, req, Some(progress)).await }));
    loop {
        let l = tokio::select! {
            Some(l) = rx.recv() => l,
            Some(n) = notes_rx.recv() => Line::Note { note: n },
            else => break,
        };
        // A client that went away does not stop the work.
        let _ = w.write_all(format!("{}\n", serde_json::to_string(&l)?).as_bytes()).await;
    }
    let v = match work.await? {
        Ok(result) => Line::Done(Outcome::done(result)),
        Err(e) => Line::Done(Outcome::failed(e.chain(), e.exit_code())),
    };
    w.write_all(format!("{}\n", serde_json::to_string(&v)?).as_bytes()).await?;
    Ok(())
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// `xenod serve`: runs until SIGTERM, SIGINT or a shutdown request;
/// `on_ready` gets the one line that says it accepts requests.
pub fn run(data_dir: &Path, listen: Option<SocketAddr>, json_out: bool, on_ready: impl FnOnce(&str)) -> Result<()> {
    let rt = runtime()?;
    let r = rt.block_on(async {
        if std::os::unix::net::UnixStream::connect(socket_path(data_dir)).is_ok() {
            bail!("a daemon already serves {}", data_dir.display());
        }
        let d = start(data_dir, listen, false).await?;
        let (instances, store) = (d.instances().clone(), d.store_arc());
        tokio::task::spawn_blocking(move || migrate::stage::sweep(&instances, &store)).await?;
        super::announce::spawn(&d);
        crate::net::host::spawn(&d);
        super::repair::spawn_watch(&d);
        super::usage::spawn(&d);
        for w in d.config().capacity.as_ref().map(|c| crate::admission::beyond_host(c, data_dir)).unwrap_or_default() {
            tracing::warn!("{w}");
        }
        let metrics = super::metrics::spawn(&d).await?;
        let addr = format_peer(&d.node().addr());
        let sock = socket_path(data_dir);
        // One line on stdout once the socket accepts, for scripts to wait on.
        let ready = if json_out {
            let mut v =
                json!({ "node": d.node().id().to_string(), "addr": addr, "socket": sock.display().to_string() });
            if let Some(m) = metrics {
                v["metrics"] = json!(m.to_string());
            }
            v.to_string()
        } else {
            let m = metrics.map(|m| format!(", metrics on http://{m}/metrics")).unwrap_or_default();
            format!("serving {} as {addr} (socket {}){m}", data_dir.display(), sock.display())
        };
        let r = serve_socket(d.clone(), || on_ready(&ready)).await;
        crate::net::host::stop(&d).await;
        super::usage::stop(&d).await;
        d.stop().await;
        r
    });
    // Blocking work still running (a store write, a walk) is left to the
    // process's exit, as a crash would: the store is made for that, and a
    // daemon asked to stop stops within seconds whatever is stuck.
    rt.shutdown_timeout(Duration::from_secs(2));
    r
}
