//! The migration wire, typed, and the target as the source's policy sees
//! it ([`RemoteTarget`]).
//!
//! ```text
//! ALPN xenod/migrate/1 on the daemon's endpoint (the ALPN is the version)
//! one bi-stream per request:
//!   source -> target   one JSON Wire request, then the stream's end
//!   target -> source   JSON lines: {"alive":true} every 2 s while it works,
//!                      {"restoring":true} when it passes the commit point,
//!                      then {"ok":true,"result":..} or {"ok":false,"error":".."}
//! ```
//!
//! A silent target is declared dead after [`SILENT_LIMIT`]. Only nodes
//! listed in the target's `migrate_from` (see `xenod allow`) are served.
//! The same wire carries a deploy onto a host placement chose
//! ([`Wire::Deploy`]): a guest sent to a host, like one moved there.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use xenod_peer::EndpointAddr;
use xenod_peer::iroh::endpoint::Connection;
use xenod_store::{Dense, LayerId};

use super::policy::{FetchReply, ResumeReply, Target};
use super::record::Record;
use crate::bail;
use crate::daemon::Daemon;
use crate::error::{Context, Error, Result};

/// The migration protocol on the daemon's endpoint.
pub const ALPN: &[u8] = b"xenod/migrate/1";
/// How often a working target says it is alive.
pub const ALIVE_EVERY: Duration = Duration::from_secs(2);
/// A target silent this long is declared dead.
pub const SILENT_LIMIT: Duration = Duration::from_secs(20);

/// A request of the source to the target.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Wire {
    Prepare {
        instance: String,
        mounted: LayerId,
        source: String,
        need_bytes: u64,
        /// What the guest asks of the target's capacity (`admission`).
        #[serde(default)]
        ask: Option<crate::admission::Ask>,
    },
    /// `last`: sent in stop-and-copy, with the guest stopped. `level`: of
    /// pre-copy, [`super::policy::PRECOPY_CODEC`] when absent.
    Sync {
        layer: LayerId,
        source: String,
        last: bool,
        #[serde(default)]
        level: Option<Dense>,
    },
    /// After pre-copy: mount `layer` and start the guest's QEMU on it,
    /// waiting for its state ([`super::stage`]). `xml`: the domain as the
    /// source runs it.
    Stage {
        layer: LayerId,
        record: Box<Record>,
        xml: String,
    },
    Resume {
        layer: LayerId,
        state: Option<LayerId>,
        record: Box<Record>,
        source: String,
    },
    Abort {
        instance: String,
    },
    /// After a migration: what the instance used on the source
    /// ([`crate::usage::History`]), for the target's ledger.
    Usage {
        instance: String,
        history: Box<crate::usage::History>,
    },
    /// Placement chose this host: fetch what it lacks of `layer`'s stack
    /// (from `source` and the layer's other providers) and deploy it.
    Deploy {
        layer: LayerId,
        source: String,
        options: Box<crate::instance::DeployOptions>,
    },
}

/// One line of the target's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    Done {
        ok: bool,
        #[serde(default, skip_serializing_if = "Value::is_null")]
        result: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    Restoring {
        restoring: bool,
    },
    Alive {
        alive: bool,
    },
}

impl Reply {
    pub fn line(&self) -> String {
        format!("{}\n", serde_json::to_string(self).expect("a reply serializes"))
    }
}

/// A request to the target over an open connection; `on_line` sees the
/// target's intermediate lines. The target's refusal is
/// [`Error::TargetRefused`]; silence, a broken stream or a malformed
/// answer are other errors.
pub async fn call(conn: &Connection, req: &Wire, mut on_line: impl FnMut(&Reply)) -> Result<Value> {
    let (mut send, recv) = conn.open_bi().await.context("opening a stream to the target")?;
    send.write_all(serde_json::to_string(req)?.as_bytes()).await.context("sending to the target")?;
    send.finish().ok();
    let mut lines = BufReader::new(recv).lines();
    loop {
        let line = match tokio::time::timeout(SILENT_LIMIT, lines.next_line()).await {
            Err(_) => bail!("the target went silent for {} s", SILENT_LIMIT.as_secs()),
            Ok(Err(e)) => bail!("the connection to the target broke: {e}"),
            Ok(Ok(None)) => bail!("the target closed the stream without an answer"),
            Ok(Ok(Some(l))) => l,
        };
        let r: Reply = serde_json::from_str(&line).with_context(|| format!("target sent {line:?}"))?;
        match r {
            Reply::Done { ok: true, result, .. } => return Ok(result),
            Reply::Done { ok: false, error, .. } => {
                return Err(Error::TargetRefused(error.unwrap_or_else(|| "no reason given".into())));
            }
            Reply::Alive { .. } => {}
            r => on_line(&r),
        }
    }
}

/// Hands instance `name`'s usage rows to the host it migrated to, over a
/// connection of its own (the migration's may be gone).
pub async fn send_usage(d: &Daemon, to: &EndpointAddr, name: &str, history: crate::usage::History) -> Result<()> {
    let conn = match tokio::time::timeout(Duration::from_secs(10), d.node().endpoint().connect(to.clone(), ALPN)).await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => bail!("connecting to {}: {e}", to.id),
        Err(_) => bail!("connecting to {}: timed out", to.id),
    };
    let req = Wire::Usage { instance: name.to_owned(), history: Box::new(history) };
    call(&conn, &req, |_| {}).await?;
    conn.close(0u32.into(), b"done");
    Ok(())
}

/// The target of one migration, over one connection of this daemon's
/// endpoint.
pub struct RemoteTarget {
    d: std::sync::Arc<Daemon>,
    to: EndpointAddr,
    /// This host's address, for the target to fetch from.
    source: String,
    conn: Option<Connection>,
}

impl RemoteTarget {
    pub fn new(d: std::sync::Arc<Daemon>, to: EndpointAddr) -> Self {
        let source = xenod_peer::format_peer(&d.node().addr());
        Self { d, to, source, conn: None }
    }

    fn conn(&self) -> Result<&Connection> {
        self.conn.as_ref().ok_or_else(|| Error::msg("not connected to the target"))
    }

    async fn request<R: serde::de::DeserializeOwned>(&self, req: &Wire) -> Result<R> {
        let v = call(self.conn()?, req, |_| {}).await?;
        serde_json::from_value(v).context("the target's answer")
    }
}

impl Target for RemoteTarget {
    async fn prepare(&mut self, record: &Record, mounted: LayerId, need_bytes: u64) -> Result<FetchReply> {
        let to = self.to.clone();
        let conn = match tokio::time::timeout(Duration::from_secs(10), self.d.node().endpoint().connect(to, ALPN)).await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => bail!("connecting to {}: {e}", self.to.id),
            Err(_) => bail!("connecting to {}: timed out", self.to.id),
        };
        self.conn = Some(conn);
        let ask = record.spec.as_ref().map(crate::admission::Ask::of);
        let req =
            Wire::Prepare { instance: record.name.clone(), mounted, source: self.source.clone(), need_bytes, ask };
        self.request(&req).await
    }

    async fn sync(&self, layer: LayerId, last: bool, level: Option<Dense>) -> Result<FetchReply> {
        self.request(&Wire::Sync { layer, source: self.source.clone(), last, level }).await
    }

    async fn stage(&self, layer: LayerId, record: &Record, xml: String) -> Result<Value> {
        call(self.conn()?, &Wire::Stage { layer, record: Box::new(record.clone()), xml }, |_| {}).await
    }

    async fn resume(
        &self,
        layer: LayerId,
        state: Option<LayerId>,
        record: &Record,
        restoring: &mut bool,
    ) -> Result<ResumeReply> {
        let req = Wire::Resume { layer, state, record: Box::new(record.clone()), source: self.source.clone() };
        let v = call(self.conn()?, &req, |r| *restoring |= matches!(r, Reply::Restoring { .. })).await?;
        serde_json::from_value(v).context("the target's answer")
    }

    async fn abort(&self, instance: &str) {
        let Ok(conn) = self.conn() else { return };
        let req = Wire::Abort { instance: instance.to_owned() };
        let _ = tokio::time::timeout(Duration::from_secs(5), call(conn, &req, |_| {})).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_lines_round_trip() {
        for r in [
            Reply::Alive { alive: true },
            Reply::Restoring { restoring: true },
            Reply::Done { ok: true, result: serde_json::json!({ "x": 1 }), error: None },
            Reply::Done { ok: false, result: Value::Null, error: Some("no".into()) },
        ] {
            let back: Reply = serde_json::from_str(r.line().trim()).unwrap();
            assert_eq!(serde_json::to_value(&back).unwrap(), serde_json::to_value(&r).unwrap());
        }
        // The old untyped forms are what the typed ones write.
        assert_eq!(Reply::Alive { alive: true }.line(), "{\"alive\":true}\n");
        assert_eq!(Reply::Restoring { restoring: true }.line(), "{\"restoring\":true}\n");
    }

    #[test]
    fn a_request_missing_a_field_names_it() {
        let e = serde_json::from_str::<Wire>(r#"{"op":"sync","source":"x","last":true}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `layer`"), "{e}");
        let e = serde_json::from_str::<Wire>(r#"{"op":"frob"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `frob`"), "{e}");
    }
}
