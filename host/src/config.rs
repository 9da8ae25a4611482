//! Host configuration: the data directory, `config.toml` and the publisher key.
//!
//! ```text
//! DATA_DIR/config.toml     [[trust]]                    whose names this host accepts:
//!                          key = "<64 hex>"             a publisher key, and
//!                          publishers = ["debian", "acme/*"]  the names it may sign for
//!                          listen = "0.0.0.0:0"        peer endpoint (UDP); port 0 = pick one, kept
//!                          peers = ["NODE@IP:PORT"]     static peers asked for layers and names
//!                          relay = "disabled"           or "default" (number 0's public relays)
//!                          migrate_from = ["NODE"]      nodes that may move guests onto this host
//!                          domain_prefix = "a-"         libvirt domain names (daemons sharing a libvirt)
//!                          pull_from = ["NODE", ...]    nodes that may ask this host to fetch a
//!                                                       stack (`xenod replicate`); "*" = any
//!                          host_expiry_secs = 10        a silent host is gone after this
//!                          net_underlay = "192.0.2.10"  environments' VXLAN endpoint here
//!                          net_vxlan_port = 4789        and its UDP port
//!                          file_cache_bytes = 4294967296  cache of whole lower files; 0 = none
//!                          warm_file_cache = true       fill it as stacks arrive
//!                          [labels]                     advertised to other hosts:
//!                          region = "eu"                `xenod hosts --where label.region=eu`
//!                          [capacity]                   what guests get (admission), advertised:
//!                          vcpus = 8                    vCPUs [default: the host's]
//!                          memory_mib = 16384           memory [default: the host's less reserved]
//!                          reserved_memory_mib = 1024   kept for the host [default: 0]
//!                          cpu_overcommit = 4.0         vCPUs admitted per vCPU [default: 4]
//!                          memory_overcommit = 1.0      [default: 1]
//!                          upper_mib = 65536            upper-layer disk for guests with a quota
//! DATA_DIR/keys/publisher.key   the host's ed25519 secret (hex), mode 0600
//! DATA_DIR/keys/node.key        the peer endpoint's secret (hex), mode 0600
//! ```
//! The host's own publisher key is trusted for every publisher (`*`): this
//! host's operator names what they like here. Any other key is trusted
//! only for the publishers its `[[trust]]` entry lists (patterns as in
//! `xenod_store::Trust`), so a key trusted for one publisher's templates
//! cannot take over another's names. The older `trusted_keys = [...]`,
//! which trusted keys for everything, is refused with what to write
//! instead.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xenod_store::{LayerId, NameRecord, SigningKey, Store, Trust, VerifyingKey, hex};

use crate::bail;
use crate::error::{Context, Result};

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Publisher keys and the publishers each may sign names for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust: Vec<TrustEntry>,
    /// Refused (it trusted keys for every publisher); kept to say so until
    /// each key is given its publishers (`add_trust` moves it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
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
    /// Labels this host advertises to the federation (`region`, `zone`,
    /// `rack`, any `key = "value"`), for `xenod hosts --where label.K=V`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Seconds after its last advertisement a host counts as gone
    /// [default: 10].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_expiry_secs: Option<u64>,
    /// What this host offers guests, as it advertises it [default: all its
    /// vCPUs and memory].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,
    /// TCP address the daemon serves Prometheus metrics on (`GET
    /// /metrics`) [default: none, off].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Allow `metrics` on an address other hosts can reach (it has no
    /// authentication) [default: false, refused].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub metrics_remote: bool,
    /// This host's address for environments' VXLAN tunnels, which other
    /// hosts reach it on [default: the peer endpoint's, if a specific IPv4].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_underlay: Option<std::net::Ipv4Addr>,
    /// UDP port of those tunnels [default: 4789].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_vxlan_port: Option<u16>,
    /// How often the daemon samples what each instance uses, seconds
    /// [default: 10].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_interval_secs: Option<u64>,
    /// Bound of the store's cache of whole lower files (passthrough
    /// reads) for instance mounts and warming, bytes; 0: none [default:
    /// 4 GiB, `xenod_cowfs::DEFAULT_FILE_CACHE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_cache_bytes: Option<u64>,
    /// Copy a stack's big lower files into the file cache once the daemon
    /// has fetched it whole (`daemon::warm`) [default: true].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_file_cache: Option<bool>,
}

impl Config {
    /// The file cache's bound: `file_cache_bytes`, or cowfs's default.
    pub fn file_cache_cap(&self) -> u64 {
        self.file_cache_bytes.unwrap_or(xenod_cowfs::DEFAULT_FILE_CACHE)
    }

    /// Whether the daemon warms the file cache with stacks it fetched:
    /// `warm_file_cache`, and never without a file cache.
    pub fn warms_file_cache(&self) -> bool {
        self.warm_file_cache.unwrap_or(true) && self.file_cache_cap() > 0
    }
}

/// `[capacity]`: what this host offers guests (see `admission`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    /// vCPUs offered [default: the host's CPUs].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Memory offered [default: the host's, less `reserved_memory_mib`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Memory kept for the host itself [default: 0].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_memory_mib: Option<u64>,
    /// vCPUs admitted per vCPU offered [default: 4].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_overcommit: Option<f64>,
    /// Memory admitted per byte offered [default: 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_overcommit: Option<f64>,
    /// Upper-layer disk offered to guests with a quota, in MiB [default:
    /// unbounded]; a guest without a quota is admitted only while this is
    /// unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper_mib: Option<u64>,
}

/// One `[[trust]]` entry: a key and the publishers it may sign for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustEntry {
    /// The publisher's public key (64 hex digits).
    pub key: String,
    /// Publisher patterns: `debian`, `acme/web`, `acme-*`, `*` (everyone).
    pub publishers: Vec<String>,
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

    /// The trust in force: the `[[trust]]` entries, and this host's own
    /// publisher key for every publisher.
    pub fn trust(&self, data_dir: &Path) -> Result<Trust> {
        let at = || format!("in {}", Self::path(data_dir).display());
        if let Some(k) = self.trusted_keys.first() {
            bail!(
                "{}: `trusted_keys` trusts keys for every publisher, so any of them could take over any name; \
                 write each key as a [[trust]] entry with the publishers it may sign for \
                 (key = \"{k}\"\npublishers = [\"PUBLISHER\"]), or run `xenod key trust KEY --for PUBLISHER`",
                at()
            );
        }
        let mut trust = Trust::default();
        for e in &self.trust {
            let key = parse_key(&e.key).with_context(at)?;
            if e.publishers.is_empty() {
                bail!("{}: the [[trust]] entry of key {} lists no publishers", at(), e.key);
            }
            for p in &e.publishers {
                trust.allow(key, p).with_context(at)?;
            }
        }
        if let Some(k) = load_key(data_dir)? {
            trust.allow(k.verifying_key(), "*")?;
        }
        Ok(trust)
    }

    /// Trusts `key` for `publishers` too; returns whether anything changed.
    pub fn add_trust(&mut self, key: &VerifyingKey, publishers: &[String]) -> Result<bool> {
        for p in publishers {
            xenod_store::check_pattern(p)?;
        }
        let hexkey = hex(key.as_bytes());
        self.trusted_keys.retain(|k| parse_key(k).ok().as_ref() != Some(key));
        let i = match self.trust.iter().position(|e| parse_key(&e.key).is_ok_and(|k| k == *key)) {
            Some(i) => i,
            None => {
                self.trust.push(TrustEntry { key: hexkey, publishers: Vec::new() });
                self.trust.len() - 1
            }
        };
        let e = &mut self.trust[i];
        let before = e.publishers.len();
        for p in publishers {
            if !e.publishers.contains(p) {
                e.publishers.push(p.clone());
            }
        }
        Ok(e.publishers.len() != before)
    }

    /// Stops trusting `key` for `publishers` (all of them if empty);
    /// returns whether anything changed.
    pub fn remove_trust(&mut self, key: &VerifyingKey, publishers: &[String]) -> bool {
        let before = self.trust.clone();
        for e in &mut self.trust {
            if parse_key(&e.key).is_ok_and(|k| k == *key) {
                e.publishers.retain(|p| !publishers.is_empty() && !publishers.contains(p));
            }
        }
        self.trust.retain(|e| !e.publishers.is_empty());
        self.trust != before
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

/// The publisher key of `data_dir`, created (and said so) when there is none.
fn publisher_key(data_dir: &Path) -> Result<SigningKey> {
    if let Some(k) = load_key(data_dir)? {
        return Ok(k);
    }
    let k = generate_key(data_dir, false)?;
    crate::note(format!(
        "created publisher key {} (public {})",
        key_path(data_dir).display(),
        hex(k.verifying_key().as_bytes())
    ));
    Ok(k)
}

/// Signs `name` -> `id` (or, with `None`, the name's removal) with the
/// publisher key of `data_dir` (created when there is none) as the name's
/// next sequence number, and records it; returns that number.
pub fn record_name_in(data_dir: &Path, store: &Store, name: &str, id: Option<LayerId>) -> Result<u64> {
    xenod_store::check_name(name)?;
    let held = store.name(name)?;
    if id.is_none() {
        match &held {
            None => return Err(xenod_store::Error::UnknownRef(name.to_owned()).into()),
            Some(r) if r.removed => {
                return Err(crate::Error::coded(
                    xenod_store::Exit::NotFound,
                    format!("{name} is removed already (sequence {})", r.seq),
                ));
            }
            Some(_) => {}
        }
    }
    let key = publisher_key(data_dir)?;
    let seq = held.map_or(1, |r| r.seq + 1);
    let rec = match id {
        Some(id) => NameRecord::sign(&key, name, id, seq)?,
        None => NameRecord::sign_removal(&key, name, seq)?,
    };
    store.set_name(&rec, &Config::load(data_dir)?.trust(data_dir)?)?;
    Ok(seq)
}

/// Replaces the publisher key of `data_dir` with a new one and records a
/// succession signed by the old key, so hosts that trust the old key for
/// some publishers trust the new one for the same (once they hear the
/// succession over gossip). The old secret is kept beside the new one as
/// `publisher.key.old-<first 8 hex digits>`. Returns (old, new) public keys.
///
/// Crash-safe: the new secret is written (`publisher.key.next`) before the
/// succession names it, and a rotation interrupted after that is finished
/// by the next `rotate_key` rather than started again (a key names one
/// successor only).
pub fn rotate_key(data_dir: &Path, store: &Store) -> Result<(VerifyingKey, VerifyingKey)> {
    let Some(old) = load_key(data_dir)? else {
        bail!("no publisher key in {} to rotate; `xenod key generate` makes one", key_path(data_dir).display());
    };
    let old_pub = old.verifying_key();
    let next_path = key_path(data_dir).with_file_name("publisher.key.next");
    let pending = match fs::read_to_string(&next_path) {
        Ok(s) => decode_hex32(&s).map(|b| SigningKey::from_bytes(&b)),
        Err(_) => None,
    };
    let held = store.successions()?.into_iter().find(|s| s.old == old_pub.to_bytes());
    let new = match (held, pending) {
        (Some(h), Some(p)) if h.new == p.verifying_key().to_bytes() => p,
        (Some(h), _) => bail!(
            "key {} already names successor {} but its secret is not in {}",
            hex(old_pub.as_bytes()),
            hex(&h.new),
            next_path.display()
        ),
        (None, _) => {
            let new = xenod_store::generate_key()?;
            write_secret(&next_path, &new.to_bytes())?;
            store.set_succession(&xenod_store::Succession::sign(&old, &new.verifying_key()))?;
            new
        }
    };
    let keep = key_path(data_dir).with_file_name(format!("publisher.key.old-{}", &hex(old_pub.as_bytes())[..8]));
    write_secret(&keep, &old.to_bytes())?;
    fs::rename(&next_path, key_path(data_dir)).with_context(|| format!("writing {}", key_path(data_dir).display()))?;
    Ok((old_pub, new.verifying_key()))
}
