//! Events in the daemon: the lifecycle events of this host's instances,
//! published as they happen (from the daemon's own work, or told by a
//! command over the socket), and the local API's stream of events.
//!
//! ```text
//! request  {"v":1,"op":"events","follow":true,"types":["instance"],"host":"NODE-PREFIX"}
//! answer   {"event":{"host":..,"seq":..,"at":..,"type":"instance_deployed",..}}   one per line,
//!          the events kept first (oldest first), then, with follow, each as it comes;
//!          {"note":"missed N events"} when the reader fell too far behind;
//!          without follow, {"ok":true,"result":{"events":N}} at the end
//! ```

use std::sync::{Arc, Weak};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::broadcast::error::RecvError;
use xenod_peer::events::{Event, EventKind, check_types, type_matches};
use xenod_store::Exit;

use super::context::Daemon;
use crate::api::{Line, Outcome};
use crate::error::{Error, Result};
use crate::instance::EventSink;

/// A sink for the daemon's [`crate::instance::Instances`]: each event is
/// published by a task of the daemon, in the order they came.
pub(crate) fn sink() -> (EventSink, tokio::sync::mpsc::UnboundedReceiver<EventKind>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (EventSink::new(move |k| drop(tx.send(k))), rx)
}

/// Publishes what `rx` receives while the daemon lives.
pub(crate) fn spawn_publisher(d: &Arc<Daemon>, mut rx: tokio::sync::mpsc::UnboundedReceiver<EventKind>) {
    let weak: Weak<Daemon> = Arc::downgrade(d);
    tokio::spawn(async move {
        while let Some(k) = rx.recv().await {
            let Some(d) = weak.upgrade() else { return };
            d.node().publish_event(k).await;
        }
    });
}

/// `Request::Event`: a command tells of an instance's event; only
/// instance events are taken this way.
pub async fn told(d: &Daemon, event: EventKind) -> Result<serde_json::Value> {
    if !event.type_name().starts_with("instance_") {
        return Err(Error::coded(
            Exit::BadInput,
            format!("only instance events are taken from commands, not {}", event.type_name()),
        ));
    }
    d.node().publish_event(event).await;
    Ok(json!({ "published": true }))
}

/// Streams events to a local client (see the module's table) until it
/// goes, or, without `follow`, once the kept ones are sent.
pub async fn stream(
    d: &Arc<Daemon>,
    follow: bool,
    types: Vec<String>,
    host: Option<String>,
    mut r: impl AsyncRead + Unpin,
    mut w: impl AsyncWrite + Unpin,
) -> Result<()> {
    if let Err(why) = check_types(&types) {
        return send(&mut w, &Line::Done(Outcome::failed(format!("--type: {why}"), Exit::Usage))).await;
    }
    let keep = |e: &Event| {
        (types.is_empty() || types.iter().any(|t| type_matches(t, e.kind.type_name())))
            && host.as_deref().is_none_or(|h| e.host.starts_with(h))
    };
    let (past, mut rx) = d.node().events().subscribe();
    let mut sent = 0u64;
    for e in past.iter().filter(|e| keep(e)) {
        send(&mut w, &line(e)).await?;
        sent += 1;
    }
    if !follow {
        return send(&mut w, &Line::Done(Outcome::done(json!({ "events": sent })))).await;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut buf = [0u8; 64];
    loop {
        tokio::select! {
            e = rx.recv() => match e {
                Ok(e) if keep(&e) => send(&mut w, &line(&e)).await?,
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => send(&mut w, &Line::Note { note: format!("missed {n} events") }).await?,
                Err(RecvError::Closed) => return Ok(()),
            },
            // The client closed its end: it is gone.
            n = r.read(&mut buf) => if n.unwrap_or(0) == 0 { return Ok(()) },
            _ = tick.tick() => if d.stopping() { return Ok(()) },
        }
    }
}

fn line(e: &Event) -> Line {
    Line::Event { event: serde_json::to_value(e).unwrap_or_default() }
}

async fn send(w: &mut (impl AsyncWrite + Unpin), l: &Line) -> Result<()> {
    w.write_all(format!("{}\n", serde_json::to_string(l)?).as_bytes()).await?;
    Ok(())
}
