//! Environments' private networks over gossip: what every host must know
//! to join an environment's segment (see xenod-host's `net` module).
//!
//! ```text
//! announce := { "net": body-json, "sig": [u8; 64], "at": unix-micros }
//! body     := { "kind": "env", name, subnet, vni, owner, created, seq, removed }
//!                 signed by `owner`, the node that created the environment
//!           | { "kind": "member", node, at, vtep, envs, claims, leaving }
//!                 signed by `node`: where its tunnel ends and the
//!                 addresses its guests hold in each environment
//! ```
//!
//! `at` outside the signature makes every broadcast a new gossip message
//! (gossip drops content it has seen), so any host can repeat a signed
//! environment record for late joiners, as names are repeated.
//!
//! An environment record is believed with a valid signature of its owner.
//! For one name, the owner's newest `seq` wins (a removal is a record with
//! `removed`, kept so that an older record replayed later cannot bring the
//! environment back). Two hosts that create one name at once each sign
//! their own record: every host keeps the earlier `created` (then the
//! smaller owner id), so all converge on the same one. A name removed by
//! its owner may be created anew, later, by anyone.
//!
//! A member record is believed with a valid signature of the node it
//! describes and a time within [`MAX_SKEW`]; the newest per node is kept,
//! it lives for the expiry the reader gives, and `leaving` forgets it at
//! once.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use iroh::{EndpointId, SecretKey, Signature};
use serde::{Deserialize, Serialize};

use crate::gossip::{MAX_SKEW, now_micros};

/// Longest environment name.
pub const MAX_ENV_NAME: usize = 32;
/// Most environments one member record lists, and most address claims.
pub const MAX_MEMBER_ENVS: usize = 256;
pub const MAX_CLAIMS: usize = 1024;
/// Largest VXLAN network identifier (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// An environment: a private network that spans hosts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvRecord {
    pub name: String,
    /// IPv4 CIDR its guests' addresses come from, e.g. `10.23.7.0/24`.
    pub subnet: String,
    /// The VXLAN network identifier of its segment.
    pub vni: u32,
    /// The node that created it; its key signs every record of it.
    pub owner: [u8; 32],
    /// Unix microseconds of its creation (the earlier of two wins).
    pub created: u64,
    pub seq: u64,
    #[serde(default)]
    pub removed: bool,
}

/// An address a guest holds in an environment. It travels with the guest
/// (`since` and all) when it migrates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    pub env: String,
    pub instance: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    /// Unix microseconds when the address was first claimed.
    pub since: u64,
}

/// A host's part in environments.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub node: [u8; 32],
    pub at: u64,
    /// Where its VXLAN tunnels end (underlay address and UDP port).
    pub vtep: Option<SocketAddr>,
    /// The environments it has a segment of.
    pub envs: Vec<String>,
    pub claims: Vec<Claim>,
    #[serde(default)]
    pub leaving: bool,
}

/// What a net announcement carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NetBody {
    Env(EnvRecord),
    Member(Member),
}

/// A body as signed: its JSON and the signature of its node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    pub body: String,
    pub sig: Vec<u8>,
}

impl Signed {
    /// Signs `body` with `secret` (the environment's owner, or the member).
    pub fn sign(secret: &SecretKey, body: &NetBody) -> Self {
        let body = serde_json::to_string(body).expect("a net record serializes");
        let sig = secret.sign(body.as_bytes()).to_bytes().to_vec();
        Self { body, sig }
    }

    /// The body, if its signature is that of the node it names.
    pub fn open(&self) -> Result<NetBody, String> {
        let body: NetBody = serde_json::from_str(&self.body).map_err(|e| format!("malformed net record: {e}"))?;
        let signer = match &body {
            NetBody::Env(e) => e.owner,
            NetBody::Member(m) => m.node,
        };
        let node = EndpointId::from_bytes(&signer).map_err(|_| "net record names an invalid node id".to_string())?;
        let sig = <[u8; 64]>::try_from(self.sig.as_slice()).map_err(|_| "net record: malformed signature")?;
        node.verify(self.body.as_bytes(), &Signature::from_bytes(&sig))
            .map_err(|_| format!("net record of {node}: bad signature"))?;
        Ok(body)
    }
}

/// Whether `name` can name an environment: 1 to [`MAX_ENV_NAME`] of
/// `a-z 0-9 -`, starting with a letter or digit.
pub fn valid_env_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_ENV_NAME
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("environment name {name:?}: 1 to {MAX_ENV_NAME} of a-z, 0-9 and -, not starting with -"))
    }
}

/// Parses `a.b.c.d/len` (len 8 to 30) into its network address and length.
pub fn parse_subnet(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let bad = || format!("subnet {s:?}: want an IPv4 CIDR such as 10.23.0.0/24, prefix 8 to 30");
    let (ip, len) = s.split_once('/').ok_or_else(bad)?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if !(8..=30).contains(&len) {
        return Err(bad());
    }
    let mask = u32::MAX << (32 - len);
    Ok((Ipv4Addr::from(u32::from(ip) & mask), len))
}

impl EnvRecord {
    fn check(&self) -> Result<(), String> {
        valid_env_name(&self.name)?;
        parse_subnet(&self.subnet)?;
        if self.vni == 0 || self.vni > MAX_VNI {
            return Err(format!("environment {}: VNI {} out of range 1..={MAX_VNI}", self.name, self.vni));
        }
        Ok(())
    }
}

impl Member {
    fn check(&self) -> Result<(), String> {
        if self.envs.len() > MAX_MEMBER_ENVS || self.claims.len() > MAX_CLAIMS {
            return Err(format!("{} environments and {} claims, over the limits", self.envs.len(), self.claims.len()));
        }
        for e in self.envs.iter().chain(self.claims.iter().map(|c| &c.env)) {
            valid_env_name(e)?;
        }
        if self.claims.iter().any(|c| c.instance.len() > 128 || c.mac.len() > 17) {
            return Err("a claim's instance or MAC is too long".into());
        }
        let skew = now_micros().abs_diff(self.at);
        if skew > MAX_SKEW.as_micros() as u64 {
            return Err(format!("its time is {} s off this host's (a replay, or a clock off)", skew / 1_000_000));
        }
        Ok(())
    }
}

#[derive(Default, Debug)]
struct Book {
    envs: BTreeMap<String, (EnvRecord, Signed)>,
    members: BTreeMap<[u8; 32], (Member, Instant)>,
}

/// What this host knows of environments and their members.
#[derive(Default, Debug)]
pub struct NetBook {
    book: Mutex<Book>,
    /// Notified when a record was accepted, for the host to act on at once.
    pub changed: tokio::sync::Notify,
}

/// What became of an offered record.
#[derive(Debug, PartialEq, Eq)]
pub enum NetOffer {
    Accepted,
    /// Held already, or older than what is held.
    Ignored,
    Refused(String),
}

impl NetBook {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Offers a signed record (from gossip, from disk, or this host's own).
    pub fn offer(&self, s: &Signed) -> NetOffer {
        let body = match s.open() {
            Ok(b) => b,
            Err(why) => return NetOffer::Refused(why),
        };
        let out = match body {
            NetBody::Env(r) => {
                if let Err(why) = r.check() {
                    return NetOffer::Refused(why);
                }
                let mut b = self.book();
                let take = match b.envs.get(&r.name) {
                    None => true,
                    Some((held, _)) if held.owner == r.owner => r.seq > held.seq,
                    Some((held, _)) if held.removed => r.created > held.created,
                    Some((held, _)) => (r.created, r.owner) < (held.created, held.owner),
                };
                if !take {
                    return NetOffer::Ignored;
                }
                b.envs.insert(r.name.clone(), (r, s.clone()));
                NetOffer::Accepted
            }
            NetBody::Member(m) => {
                if let Err(why) = m.check() {
                    return NetOffer::Refused(why);
                }
                let mut b = self.book();
                if b.members.get(&m.node).is_some_and(|(h, _)| h.at >= m.at) {
                    return NetOffer::Ignored;
                }
                let same = b.members.get(&m.node).is_some_and(|(h, _)| Member { at: m.at, ..h.clone() } == m);
                if m.leaving {
                    b.members.remove(&m.node);
                } else {
                    b.members.insert(m.node, (m, Instant::now()));
                }
                if same {
                    // Only its time moved on: nothing for the host to do.
                    return NetOffer::Accepted;
                }
                NetOffer::Accepted
            }
        };
        self.changed.notify_one();
        out
    }

    /// Every environment record held (removed ones too), by name.
    pub fn envs(&self) -> Vec<EnvRecord> {
        self.book().envs.values().map(|(r, _)| r.clone()).collect()
    }

    /// The live environment called `name`.
    pub fn env(&self, name: &str) -> Option<EnvRecord> {
        self.book().envs.get(name).map(|(r, _)| r.clone()).filter(|r| !r.removed)
    }

    /// The signed environment records, to repeat and to keep.
    pub fn env_records(&self) -> Vec<Signed> {
        self.book().envs.values().map(|(_, s)| s.clone()).collect()
    }

    /// Other hosts' member records heard within `expiry`.
    pub fn members(&self, expiry: Duration) -> Vec<Member> {
        self.book().members.values().filter(|(_, t)| t.elapsed() <= expiry).map(|(m, _)| m.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SecretKey {
        SecretKey::from_bytes(&[b; 32])
    }

    fn env(k: &SecretKey, name: &str, created: u64, seq: u64, removed: bool) -> Signed {
        let r = EnvRecord {
            name: name.into(),
            subnet: "10.1.2.0/24".into(),
            vni: 42,
            owner: *k.public().as_bytes(),
            created,
            seq,
            removed,
        };
        Signed::sign(k, &NetBody::Env(r))
    }

    #[test]
    fn owners_newest_wins_and_the_earlier_creation_of_one_name() {
        let (a, b) = (key(1), key(2));
        let book = NetBook::default();
        assert_eq!(book.offer(&env(&a, "red", 10, 1, false)), NetOffer::Accepted);
        assert_eq!(book.offer(&env(&a, "red", 10, 1, false)), NetOffer::Ignored);
        // Another host's later creation of the same name loses everywhere.
        assert_eq!(book.offer(&env(&b, "red", 11, 1, false)), NetOffer::Ignored);
        // Its earlier one wins.
        assert_eq!(book.offer(&env(&b, "red", 9, 1, false)), NetOffer::Accepted);
        assert_eq!(book.env("red").unwrap().owner, *b.public().as_bytes());
        // The owner removes it; a replay of its creation does not revive it.
        assert_eq!(book.offer(&env(&b, "red", 9, 2, true)), NetOffer::Accepted);
        assert_eq!(book.offer(&env(&b, "red", 9, 1, false)), NetOffer::Ignored);
        assert!(book.env("red").is_none());
        // Once removed, anyone may create it anew.
        assert_eq!(book.offer(&env(&a, "red", 20, 1, false)), NetOffer::Accepted);
        assert!(book.env("red").is_some());
    }

    #[test]
    fn forged_and_malformed_records_are_refused() {
        let (a, b) = (key(1), key(2));
        let mut s = env(&a, "red", 10, 1, false);
        s.sig = env(&b, "red", 10, 1, false).sig;
        assert!(matches!(NetBook::default().offer(&s), NetOffer::Refused(w) if w.contains("bad signature")));
        let s = env(&a, "Red!", 10, 1, false);
        assert!(matches!(NetBook::default().offer(&s), NetOffer::Refused(w) if w.contains("environment name")));
        let m =
            Member { node: *a.public().as_bytes(), at: 1, vtep: None, envs: vec![], claims: vec![], leaving: false };
        let s = Signed::sign(&a, &NetBody::Member(m));
        assert!(matches!(NetBook::default().offer(&s), NetOffer::Refused(w) if w.contains("replay")));
    }

    #[test]
    fn subnets_parse_to_their_network() {
        assert_eq!(parse_subnet("10.1.2.3/24").unwrap(), (Ipv4Addr::new(10, 1, 2, 0), 24));
        assert!(parse_subnet("10.1.2.0/31").is_err());
        assert!(parse_subnet("10.1.2.0").is_err());
    }
}
