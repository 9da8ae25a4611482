//! The local API, typed and versioned.
//!
//! ```text
//! DATA_DIR/xenod.sock   one request line per connection:
//!                         {"v":1,"op":"fetch","target":"..",..}
//!                       answered by lines, any number of
//!                         {"note":".."}            what a long operation does
//!                         {"progress":{..}}        a fetch's progress
//!                       then one of
//!                         {"ok":true,"result":..}
//!                         {"ok":false,"error":"..","code":N}   N: the exit code
//! ```
//!
//! A request of another API version, of an unknown `op`, or missing a field
//! its `op` needs is refused with an error that names the version or the
//! field; fields marked optional below are the only defaults. Each `op`'s
//! result is a typed reply: `daemon::reply` for the daemon's own requests,
//! `migrate::report` for migrate, checkpoint and restore.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use xenod_store::ChunkId;

/// The version of the local API this build speaks. Raised when a request
/// or reply changes shape.
pub const API_VERSION: u32 = 1;

/// The daemon's socket in `data_dir`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("xenod.sock")
}

/// A request on the local API.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// A ticket for REF, served by this daemon.
    Share {
        r#ref: String,
    },
    /// Pull a stack (by ticket or reference) into the store.
    Fetch {
        target: String,
        #[serde(default)]
        from: Vec<String>,
        /// Layer roots and manifests now, file data in the background
        /// (chunks a reader needs first are fetched at once, see `Chunk`).
        #[serde(default)]
        lazy: bool,
    },
    /// One chunk's plaintext (hex), from the providers of lazy fetches.
    Chunk {
        id: String,
    },
    /// The connection turns into a binary chunk stream for a mount (see
    /// [`ChunkClient`]): the chunks of `Chunk`, without JSON or hex, many
    /// over one connection.
    ChunkStream,
    /// Ask peers for their signed name records.
    Names {
        #[serde(default)]
        from: Vec<String>,
    },
    /// Have peers fetch a stack from this host and from each other.
    Replicate {
        r#ref: String,
        to: Vec<String>,
    },
    Shutdown,
    /// Read the trust entries of config.toml again (also on SIGHUP).
    Reload,
    /// The live hosts this daemon knows (itself included), those matching
    /// `filter` (see `filter`) if given.
    Hosts {
        #[serde(default)]
        filter: Option<String>,
    },
    /// Verify the store and fetch every damaged or missing chunk anew from
    /// peers (`from`: NODE@ADDR or tickets; also gossip and known peers).
    Repair {
        #[serde(default)]
        from: Vec<String>,
    },
    /// Deploy on hosts placement chooses among those this daemon knows:
    /// `place` is `auto` or a filter expression; `dry_run`: only say where.
    Deploy {
        target: String,
        place: String,
        #[serde(default = "one")]
        replicas: u32,
        #[serde(default)]
        spread: Option<String>,
        #[serde(default)]
        pack: bool,
        #[serde(default)]
        dry_run: bool,
        options: Box<crate::instance::DeployOptions>,
    },
    /// The services instances provide across the federation (`name`: only
    /// that one's instances).
    Services {
        #[serde(default)]
        name: Option<String>,
    },
    /// The events this daemon knows, oldest first, as `{"event":..}`
    /// lines; with `follow`, those that follow too, until the client goes.
    /// `types`: event types or groups (see `xenod_peer::events::TYPES`);
    /// `host`: a node id or its prefix.
    Events {
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        types: Vec<String>,
        #[serde(default)]
        host: Option<String>,
    },
    /// A lifecycle event of one of this host's instances, from a command
    /// that acted on it, for the daemon to publish.
    Event {
        event: xenod_peer::events::EventKind,
    },
    /// What instances used (`name`: that one), from `since` (unix
    /// seconds) to now, per instance and per owner (`usage::Report`).
    Usage {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        since: Option<u64>,
    },
    /// Move an instance to another host.
    Migrate {
        instance: String,
        to: String,
        #[serde(default)]
        cold: bool,
        /// How pre-copy compresses; the default when absent.
        #[serde(default)]
        level: Option<xenod_store::Dense>,
        /// Save the guest's memory while it runs, or fail.
        #[serde(default)]
        live: bool,
        /// Save the guest stopped (not live).
        #[serde(default)]
        save: bool,
    },
    /// Save an instance's upper layer and machine state as a layer.
    Checkpoint {
        instance: String,
        #[serde(default)]
        name: Option<String>,
    },
    /// Environments' networks (`xenod net`, and a guest's NIC on one).
    Net {
        net: crate::net::NetRequest,
    },
    /// Run a checkpoint again, here or on another host.
    Restore {
        checkpoint: String,
        #[serde(default)]
        on: Option<String>,
        #[serde(default)]
        name: Option<String>,
    },
}

impl Request {
    /// The request's name on the wire (its `op`).
    pub fn op(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Share { .. } => "share",
            Request::Fetch { .. } => "fetch",
            Request::Chunk { .. } => "chunk",
            Request::ChunkStream => "chunk_stream",
            Request::Names { .. } => "names",
            Request::Replicate { .. } => "replicate",
            Request::Shutdown => "shutdown",
            Request::Reload => "reload",
            Request::Hosts { .. } => "hosts",
            Request::Repair { .. } => "repair",
            Request::Deploy { .. } => "deploy",
            Request::Services { .. } => "services",
            Request::Events { .. } => "events",
            Request::Event { .. } => "event",
            Request::Usage { .. } => "usage",
            Request::Migrate { .. } => "migrate",
            Request::Checkpoint { .. } => "checkpoint",
            Request::Restore { .. } => "restore",
            Request::Net { .. } => "net",
        }
    }

    /// The request as one line of the socket protocol, with its version.
    pub fn to_line(&self) -> String {
        serde_json::to_string(&Envelope { v: API_VERSION, request: self.clone() }).expect("a request serializes")
    }

    /// Parses one request line: its version first, then the request.
    pub fn from_line(line: &str) -> Result<Self, ApiError> {
        let v: Value = serde_json::from_str(line).map_err(|e| ApiError::NotJson(e.to_string()))?;
        match v.get("v").map(Value::as_u64) {
            None => return Err(ApiError::NoVersion),
            Some(Some(n)) if n == u64::from(API_VERSION) => {}
            Some(got) => {
                return Err(ApiError::Version { got: got.map_or_else(|| v["v"].to_string(), |n| n.to_string()) });
            }
        }
        let env: Envelope = serde_json::from_value(v).map_err(|e| ApiError::Bad(e.to_string()))?;
        Ok(env.request)
    }
}

fn one() -> u32 {
    1
}

/// A request with the API version it was written for.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    #[serde(flatten)]
    pub request: Request,
}

/// A request line the daemon cannot take.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the request is not JSON: {0}")]
    NotJson(String),
    #[error("the request names no API version (field `v`); this daemon speaks version {API_VERSION}")]
    NoVersion,
    #[error("the request is of API version {got}; this daemon speaks version {API_VERSION}: use this host's xenod")]
    Version { got: String },
    /// serde's message names the field or `op`: "missing field `target`",
    /// "unknown variant `frob`".
    #[error("bad request: {0}")]
    Bad(String),
}

/// One line of a reply: a note, progress, or the outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Line {
    Note {
        note: String,
    },
    Progress {
        progress: Value,
    },
    /// One event of an `events` request.
    Event {
        event: Value,
    },
    Done(Outcome),
}

/// The last line of a reply.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Outcome {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The exit code the error means.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u8>,
}

impl Outcome {
    pub fn done(result: Value) -> Self {
        Self { ok: true, result: Some(result), error: None, code: None }
    }

    pub fn failed(error: String, code: xenod_store::Exit) -> Self {
        Self { ok: false, result: None, error: Some(error), code: Some(code.code()) }
    }
}

/// Sends `req` to the daemon of `data_dir`, if one runs, and waits (at
/// most 5 s) for its answer, which is dropped: for what a command tells
/// its daemon in passing (an instance's event).
pub fn tell_daemon(data_dir: &Path, req: &Request) {
    let Ok(mut s) = UnixStream::connect(socket_path(data_dir)) else { return };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if writeln!(s, "{}", req.to_line()).is_err() {
        return;
    }
    for line in BufReader::new(s).lines() {
        match line {
            Ok(l) if l.contains("\"ok\"") => return,
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// The first byte the daemon sends on a chunk stream: the stream is on.
pub const CHUNK_STREAM_ACK: u8 = 0xac;
/// A chunk stream's answer: the chunk follows.
pub const CHUNK_OK: u8 = 0;
/// A chunk stream's answer: an error message (UTF-8) follows.
pub const CHUNK_ERR: u8 = 1;
/// Longest answer a chunk stream accepts (a chunk is at most 1 MiB; an
/// error message far less).
const CHUNK_ANSWER_MAX: usize = 4 << 20;

/// A mount's connection to its daemon for missing chunks.
///
/// ```text
///  -> {"v":1,"op":"chunk_stream"}\n    <- 0xac            once
///  -> id (32 bytes)                     <- 0 len:u32le bytes      the chunk
///                                       <- 1 len:u32le message    why not
///  ... as many as wanted; either side closes
/// ```
///
/// One request costs one round trip on a kept connection, where a `chunk`
/// request costs a connection, JSON and hex both ways: a lazily deployed
/// guest's reads wait on hundreds of these while it boots (2.5-10 ms each
/// the other way, on a loaded host).
pub struct ChunkClient {
    s: UnixStream,
}

impl ChunkClient {
    /// Opens a chunk stream to the daemon of `data_dir`.
    pub fn connect(data_dir: &Path) -> std::result::Result<Self, String> {
        let sock = socket_path(data_dir);
        let mut s = UnixStream::connect(&sock).map_err(|e| format!("no daemon at {}: {e}", sock.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
        writeln!(s, "{}", Request::ChunkStream.to_line()).map_err(|e| e.to_string())?;
        let mut ack = [0u8];
        std::io::Read::read_exact(&mut s, &mut ack)
            .map_err(|e| format!("the daemon did not open a chunk stream: {e}"))?;
        if ack[0] != CHUNK_STREAM_ACK {
            // An older daemon answers with a JSON line: read the rest of it.
            let mut rest = String::new();
            let _ = BufReader::new(&s).read_line(&mut rest);
            return Err(format!("the daemon refused a chunk stream: {}{}", char::from(ack[0]), rest.trim_end()));
        }
        Ok(Self { s })
    }

    /// Chunk `id`, verified against its id.
    pub fn get(&mut self, id: &ChunkId) -> std::result::Result<Vec<u8>, ChunkFault> {
        use std::io::Read;
        let stream = |what: &str, e: std::io::Error| ChunkFault::Stream(format!("{what}: {e}"));
        self.s.write_all(id.as_bytes()).map_err(|e| stream("asking the daemon", e))?;
        let mut head = [0u8; 5];
        self.s.read_exact(&mut head).map_err(|e| stream("reading the daemon's answer", e))?;
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > CHUNK_ANSWER_MAX {
            return Err(ChunkFault::Stream(format!("the daemon announced a {len}-byte answer")));
        }
        let mut b = vec![0u8; len];
        self.s.read_exact(&mut b).map_err(|e| stream("reading the daemon's answer", e))?;
        match head[0] {
            CHUNK_OK if ChunkId::of(&b) == *id => Ok(b),
            CHUNK_OK => Err(ChunkFault::Answer(format!("the daemon sent bytes that are not chunk {id}"))),
            CHUNK_ERR => Err(ChunkFault::Answer(String::from_utf8_lossy(&b).into_owned())),
            other => Err(ChunkFault::Stream(format!("the daemon's answer has status {other}"))),
        }
    }
}

/// Why a [`ChunkClient`] got no chunk.
#[derive(Debug)]
pub enum ChunkFault {
    /// The stream broke or spoke nonsense: open another.
    Stream(String),
    /// The daemon answered, without the chunk (no provider had it, or its
    /// bytes did not match the id): the stream is fine.
    Answer(String),
}

/// For a mount process: chunk `id` from the daemon of `data_dir`,
/// verified against its id, over this thread's chunk stream (opened on
/// first use, and again once after a failure of the stream itself).
pub fn fetch_chunk(data_dir: &Path, id: &ChunkId) -> std::result::Result<Vec<u8>, String> {
    use std::cell::RefCell;
    thread_local! {
        static CLIENT: RefCell<Option<(PathBuf, ChunkClient)>> = const { RefCell::new(None) };
    }
    CLIENT.with_borrow_mut(|slot| {
        let mut last = None;
        for _ in 0..2 {
            let client = match slot {
                Some((dir, c)) if dir == data_dir => c,
                _ => &mut slot.insert((data_dir.to_path_buf(), ChunkClient::connect(data_dir)?)).1,
            };
            match client.get(id) {
                Ok(b) => return Ok(b),
                Err(ChunkFault::Answer(why)) => return Err(why),
                Err(ChunkFault::Stream(why)) => {
                    *slot = None;
                    last = Some(why);
                }
            }
        }
        Err(last.unwrap_or_default())
    })
}

/// Layer ids in reports as their 64 hex digits (serde's own form of an id
/// is an array of bytes): `#[serde(with = "crate::api::hex_id")]`.
pub mod hex_id {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};
    use xenod_store::LayerId;

    pub fn serialize<S: Serializer>(id: &LayerId, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<LayerId, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }

    /// The same for an optional id.
    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(id: &Option<LayerId>, s: S) -> Result<S::Ok, S::Error> {
            match id {
                Some(id) => s.collect_str(id),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<LayerId>, D::Error> {
            Option::<String>::deserialize(d)?.map(|s| s.parse().map_err(D::Error::custom)).transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use xenod_store::{ChunkId, Dense};

    use super::*;

    /// One request of each kind, with every optional field set.
    fn every_request() -> Vec<Request> {
        vec![
            Request::Status,
            Request::Share { r#ref: "template://me/web/1".into() },
            Request::Fetch { target: "xenod1abc".into(), from: vec!["n@127.0.0.1:1".into()], lazy: true },
            Request::Chunk { id: ChunkId::of(b"x").to_string() },
            Request::ChunkStream,
            Request::Names { from: vec!["n@127.0.0.1:1".into()] },
            Request::Replicate { r#ref: "web".into(), to: vec!["n@127.0.0.1:1".into()] },
            Request::Shutdown,
            Request::Reload,
            Request::Hosts { filter: Some("mem_free>=1G && label.zone=a".into()) },
            Request::Repair { from: vec!["n@127.0.0.1:1".into()] },
            Request::Migrate {
                instance: "web".into(),
                to: "n@127.0.0.1:1".into(),
                cold: false,
                level: Some(Dense::Zstd(9)),
                live: true,
                save: false,
            },
            Request::Deploy {
                target: "template://me/web/1".into(),
                place: "label.zone=a".into(),
                replicas: 3,
                spread: Some("zone".into()),
                pack: false,
                dry_run: true,
                options: Box::new(crate::instance::DeployOptions {
                    name: Some("web".into()),
                    replicas: 1,
                    uri: Some("test:///default".into()),
                    root: Some(xenod_deployer::RootMode::Disk),
                    memory: Some(256),
                    ports: vec!["0:80".parse().unwrap()],
                    cmdline: None,
                    timeout: std::time::Duration::from_secs(60),
                    no_wait: true,
                    lazy: false,
                    verbose: false,
                    limits: xenod_deployer::Limits { cpu_quota_pct: Some(25), ..Default::default() },
                    best_effort: true,
                    net: Some("red".into()),
                    owner: Some("key:ab".into()),
                }),
            },
            Request::Services { name: Some("web".into()) },
            Request::Usage { name: Some("web".into()), since: Some(1_800_000_000) },
            Request::Events { follow: true, types: vec!["instance".into()], host: Some("abc".into()) },
            Request::Event { event: xenod_peer::events::EventKind::InstanceStopped { instance: "web".into() } },
            Request::Checkpoint { instance: "web".into(), name: Some("template://me/cp/1".into()) },
            Request::Restore { checkpoint: "cp".into(), on: Some("n@127.0.0.1:1".into()), name: Some("web2".into()) },
            Request::Net {
                net: crate::net::NetRequest::Create { env: "red".into(), subnet: Some("10.1.0.0/24".into()) },
            },
        ]
    }

    #[test]
    fn every_request_round_trips_through_its_line() {
        let all = every_request();
        let ops: std::collections::BTreeSet<&str> = all.iter().map(Request::op).collect();
        assert_eq!(ops.len(), all.len(), "one sample per op");
        for r in all {
            let line = r.to_line();
            assert!(line.starts_with(&format!("{{\"v\":{API_VERSION},")), "{line}");
            let back = Request::from_line(&line).unwrap();
            assert_eq!(back.to_line(), line);
            assert_eq!(back.op(), r.op());
        }
    }

    #[test]
    fn requests_of_another_version_or_missing_fields_are_refused_by_name() {
        let e = Request::from_line(r#"{"op":"status"}"#).unwrap_err();
        assert!(matches!(e, ApiError::NoVersion) && e.to_string().contains("`v`"), "{e}");
        let e = Request::from_line(r#"{"v":2,"op":"status"}"#).unwrap_err();
        assert!(e.to_string().contains("API version 2") && e.to_string().contains("speaks version 1"), "{e}");
        let e = Request::from_line(r#"{"v":"one","op":"status"}"#).unwrap_err();
        assert!(e.to_string().contains("\"one\""), "{e}");
        let e = Request::from_line(r#"{"v":1,"op":"fetch","from":[]}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `target`"), "{e}");
        let e = Request::from_line(r#"{"v":1,"op":"share"}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `ref`"), "{e}");
        let e = Request::from_line(r#"{"v":1,"op":"frobnicate"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `frobnicate`"), "{e}");
        let e = Request::from_line("not json").unwrap_err();
        assert!(matches!(e, ApiError::NotJson(_)), "{e}");
    }

    #[test]
    fn reply_lines_round_trip() {
        for l in [
            Line::Note { note: "hello".into() },
            Line::Progress { progress: serde_json::json!({ "phase": "data", "bytes": 5 }) },
            Line::Done(Outcome::done(serde_json::json!({ "stopping": true }))),
            Line::Done(Outcome::failed("no layer matches \"x\"".into(), xenod_store::Exit::NotFound)),
        ] {
            let s = serde_json::to_string(&l).unwrap();
            let back: Line = serde_json::from_str(&s).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), s);
        }
    }
}
