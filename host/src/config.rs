//! Host configuration: the data directory, `config.toml` and the publisher key.
//!
//! ```text
//! DATA_DIR/config.toml     trusted_keys = ["<64 hex>", ...]
//!                          listen = "0.0.0.0:0"        peer endpoint (UDP); port 0 = pick one, kept
//!                          peers = ["NODE@IP:PORT"]     static peers asked for layers and names
//!                          relay = "disabled"           or "default" (number 0's public relays)
//!                          migrate_from = ["NODE"]      nodes that may move guests onto this host
//!                          domain_prefix = "a-"         libvirt domain names (daemons sharing a libvirt)
//!                          pull_from = ["NODE", ...]    nodes that may ask this host to fetch a
//!                                                       stack (`xenod replicate`); "*" = any
//! DATA_DIR/keys/publisher.key   the host's ed25519 secret (hex), mode 0600
//! DATA_DIR/keys/node.key        the peer endpoint's secret (hex), mode 0600
//! ```
//! The host's own publisher key is always trusted.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xenod_store::{LayerId, NameRecord, SigningKey, Store, VerifyingKey, hex};

use crate::bail;
use crate::error::{Context, Result};

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Publisher keys whose name records this host accepts (64 hex digits).
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// UDP address of the peer endpoint [default: 0.0.0.0:0].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<std::net::SocketAddr>,
    /// Static peers (`NODE@IP:PORT`) asked for layers and names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    /// Whether the endpoint may use relay servers.
    #[serde(default)]
    pub relay: RelayConfig,
    /// Node ids allowed to migrate or restore guests onto this host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub migrate_from: Vec<String>,
    /// Prefix of this host's libvirt domain names, where several daemons
    /// share one libvirt (instance `web` runs as domain `PREFIXweb`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain_prefix: String,
    /// Node ids that may ask this host to fetch a stack (`xenod replicate`);
    /// `"*"` allows any node. Empty: pull requests are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_from: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayConfig {
    /// Direct addresses only (tests and closed networks never leave them).
    #[default]
    Disabled,
    /// number 0's public relays and DNS address lookup.
    Default,
}

/// The default data directory: `/var/lib/xenod` for root, else under
/// `$XDG_DATA_HOME` (or `~/.local/share`).
pub fn default_data_dir() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/xenod");
    }
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("xenod")
}

pub fn parse_key(s: &str) -> Result<VerifyingKey> {
    let b = decode_hex32(s).with_context(|| format!("key {s:?} is not 64 hex digits"))?;
    VerifyingKey::from_bytes(&b).map_err(|_| crate::err!("key {s} is not a valid ed25519 public key"))
}

fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Config {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("config.toml")
    }

    pub fn load(data_dir: &Path) -> Result<Self> {
        let p = Self::path(data_dir);
        match fs::read_to_string(&p) {
            Ok(s) => toml::from_str(&s).with_context(|| format!("reading {}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    pub fn save(&self, data_dir: &Path) -> Result<()> {
        let p = Self::path(data_dir);
        let tmp = p.with_extension("toml.tmp");
        fs::write(&tmp, toml::to_string_pretty(self)?).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))
    }

    /// Trusted keys: the configured ones and this host's own.
    pub fn trusted(&self, data_dir: &Path) -> Result<Vec<VerifyingKey>> {
        let mut keys = self
            .trusted_keys
            .iter()
            .map(|k| parse_key(k))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("in {}", Self::path(data_dir).display()))?;
        if let Some(k) = load_key(data_dir)? {
            keys.push(k.verifying_key());
        }
        Ok(keys)
    }
}

impl Config {
    /// The pull policy `pull_from` describes.
    pub fn pull_policy(&self, data_dir: &Path) -> Result<xenod_peer::PullPolicy> {
        if self.pull_from.iter().any(|p| p == "*") {
            return Ok(xenod_peer::PullPolicy::Anyone);
        }
        if self.pull_from.is_empty() {
            return Ok(xenod_peer::PullPolicy::Nobody);
        }
        let ids = self
            .pull_from
            .iter()
            .map(|p| {
                p.parse::<xenod_peer::EndpointId>().map_err(|e| crate::err!("pull_from: {p:?} is not a node id: {e}"))
            })
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("in {}", Self::path(data_dir).display()))?;
        Ok(xenod_peer::PullPolicy::From(ids))
    }
}

/// Writes a 32-byte secret as hex, mode 0600, atomically.
pub fn write_secret(p: &Path, secret: &[u8; 32]) -> Result<()> {
    let dir = p.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = p.with_extension("key.tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    writeln!(f, "{}", hex(secret))?;
    f.sync_all()?;
    fs::rename(&tmp, p).with_context(|| format!("writing {}", p.display()))
}

/// The peer endpoint's secret, created on first use.
pub fn node_secret(data_dir: &Path) -> Result<[u8; 32]> {
    let p = data_dir.join("keys").join("node.key");
    match fs::read_to_string(&p) {
        Ok(s) => decode_hex32(&s).with_context(|| format!("{} does not hold a 64-hex-digit key", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = xenod_store::generate_key()?.to_bytes();
            write_secret(&p, &secret)?;
            Ok(secret)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("publisher.key")
}

pub fn load_key(data_dir: &Path) -> Result<Option<SigningKey>> {
    let p = key_path(data_dir);
    match fs::read_to_string(&p) {
        Ok(s) => {
            let b = decode_hex32(&s).with_context(|| format!("{} does not hold a 64-hex-digit key", p.display()))?;
            Ok(Some(SigningKey::from_bytes(&b)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Creates the publisher key; refuses to replace one unless `force`.
pub fn generate_key(data_dir: &Path, force: bool) -> Result<SigningKey> {
    let p = key_path(data_dir);
    if p.exists() && !force {
        bail!("{} exists; pass --force to replace it (names signed with it will no longer verify here)", p.display());
    }
    let key = xenod_store::generate_key()?;
    write_secret(&p, &key.to_bytes())?;
    Ok(key)
}

/// Signs `name` -> `id` with the publisher key of `data_dir` (created
/// when there is none) as the name's next sequence number, and records
/// it; returns that number.
pub fn record_name_in(data_dir: &Path, store: &Store, name: &str, id: LayerId) -> Result<u64> {
    xenod_store::check_name(name)?;
    let key = match load_key(data_dir)? {
        Some(k) => k,
        None => {
            let k = generate_key(data_dir, false)?;
            crate::note(format!(
                "created publisher key {} (public {})",
                key_path(data_dir).display(),
                hex(k.verifying_key().as_bytes())
            ));
            k
        }
    };
    let seq = store.name(name)?.map_or(1, |r| r.seq + 1);
    let rec = NameRecord::sign(&key, name, id, seq)?;
    let trusted = Config::load(data_dir)?.trusted(data_dir)?;
    store.set_name(&rec, &trusted)?;
    Ok(seq)
}
