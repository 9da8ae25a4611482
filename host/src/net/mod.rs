//! Environments: private networks that span hosts (Violin's virtual
//! distributed environments).
//!
//! An environment has a name, an IPv4 subnet and a VXLAN network
//! identifier (VNI). `xenod net create` makes it a record signed by this
//! host's node key and spread over gossip (`xenod_peer::netrec`), so every
//! host learns it. A guest deployed with `--net ENV` gets, besides its
//! user-mode NIC (port forwards), a second NIC on ENV's segment here:
//!
//! ```text
//!   guest eth? --tap xt<node6><hash7>--+
//!                                      bridge xb<node6><env4>  (no IP, not routed)
//!   VXLAN xv<node6><env4> (VNI, nolearning) --+
//!        \-- one all-zero FDB entry per other host of ENV: dst UNDERLAY port PORT
//! ```
//!
//! Every device carries this daemon's short id (`node6`: the first six
//! hex digits of its node id), so daemons sharing one network namespace
//! (a test bed) never touch each other's, and a daemon finds its own
//! leftovers after a crash by prefix. Names fit IFNAMSIZ (15 bytes).
//!
//! Each host announces, signed, a member record: its tunnel endpoint
//! (`net_underlay`, `net_vxlan_port` in config.toml) and the addresses its
//! guests hold (claims). Hosts add a flood entry for every other member
//! of each environment they have a segment of: broadcast, unknown unicast
//! and multicast go to each member (head-end replication), and learning is
//! off. Learning would record a guest's MAC against the sender's address
//! but this host's own UDP port, which is wrong where daemons share a
//! namespace with ports of their own; with flooding, a migrated guest is
//! reached again as soon as its new host's bridge has its tap (QEMU's
//! announce after the migration), with no forwarding entry to go stale.
//! Per-MAC entries learned from claims are the next step for large
//! environments.
//!
//! Addresses: a guest's address is picked from the subnet starting at a
//! hash of (node, instance) and skipping every address any member claims,
//! then claimed at once (broadcast before the guest boots). Two hosts that
//! pick at the same moment start at different places, so they collide
//! only if both hashes land on the same free slot before either hears the
//! other (gossip on a LAN: milliseconds); a collision that does happen is
//! shown by `xenod net ls` (`conflicts`), the earlier claim winning. A
//! claim travels with its guest when it migrates (same address, same
//! MAC), so nothing is renumbered. The MAC is derived from the environment
//! and the address (locally administered, 02:..), so it is unique wherever
//! the address is.
//!
//! VNIs are derived from the name and checked against the environments
//! this host knows; two hosts that create environments at the same moment
//! could still give two names one VNI (1 in 16 million): then the earlier
//! creation keeps it, the other gets no segment anywhere (`net ls` shows
//! `shadowed_by`) until it is removed and created again, so their traffic
//! never mixes.
//!
//! Devices are made with iproute2 (`ip`, `bridge`), not rtnetlink: no new
//! dependency, the operations are rare (per environment and per member),
//! and VXLAN FDB entries with a destination port, which this needs, are
//! one `bridge fdb append` (the rtnetlink crate has no typed form of them).
//!
//! Isolation: each environment has its own bridge and VNI; the bridges
//! have no address (and no IPv6 link-local either), so guests reach no
//! host address through them and nothing is routed in or out. Traffic
//! between hosts is VXLAN over UDP, not encrypted or authenticated: a
//! machine that can send to a host's VXLAN port can inject frames. The
//! kernel here has no WireGuard; where it has, run the underlay over
//! WireGuard (set `net_underlay` to the WireGuard address).

pub mod dev;
pub mod host;

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use xenod_peer::netrec::{self, Claim};
use xenod_store::Exit;

use crate::api::{Line, Request, socket_path};
use crate::error::{Error, Result};

/// The default UDP port of VXLAN (IANA).
pub const VXLAN_PORT: u16 = 4789;
/// The MTU of a segment: 1500 less VXLAN's 50 bytes over IPv4.
pub const MTU: u32 = 1450;

/// What the daemon is asked about environments (the API's `net` op).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "do", rename_all = "snake_case")]
pub enum NetRequest {
    Create {
        env: String,
        #[serde(default)]
        subnet: Option<String>,
    },
    Ls,
    Rm {
        env: String,
    },
    /// A NIC on `env` for `instance` here: a new address, or `keep`'s
    /// (an instance arriving by migration).
    Attach {
        env: String,
        instance: String,
        #[serde(default)]
        keep: Option<Attach>,
    },
}

/// A guest's NIC on an environment, as its instance records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attach {
    pub env: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub mac: String,
    /// When the address was first claimed (unix micros).
    pub since: u64,
    /// This host's bridge and the guest's tap on it.
    pub bridge: String,
    pub tap: String,
}

impl Attach {
    /// Lines for the guest's `/etc/xenod/instance`.
    pub fn settings(&self) -> String {
        format!("net_env={}\nnet_ip={}/{}\nnet_mac={}\nnet_mtu={MTU}\n", self.env, self.ip, self.prefix, self.mac)
    }

    /// The same as kernel arguments (a disk-root guest boots from its
    /// image and does not see the instance layer's file).
    pub fn cmdline(&self) -> String {
        format!("xenod.net_ip={}/{} xenod.net_mac={} xenod.net_mtu={MTU}", self.ip, self.prefix, self.mac)
    }

    /// Gives `model` this NIC and its kernel arguments.
    pub fn add_to(&self, model: &mut xenod_deployer::DomainModel) {
        model.nics.push(self.nic());
        model.extra_cmdline = format!("{} {}", self.cmdline(), model.extra_cmdline).trim().to_owned();
    }

    /// The NIC the domain gets.
    pub fn nic(&self) -> xenod_deployer::BridgeNic {
        xenod_deployer::BridgeNic {
            bridge: self.bridge.clone(),
            mac: self.mac.clone(),
            tap: Some(self.tap.clone()),
            mtu: Some(MTU),
        }
    }

    pub fn claim(&self, instance: &str) -> Claim {
        Claim {
            env: self.env.clone(),
            instance: instance.to_owned(),
            ip: self.ip,
            mac: self.mac.clone(),
            since: self.since,
        }
    }
}

/// The first six hex digits of a node id: every device name carries it.
pub fn short(node: &str) -> String {
    node.chars().take(6).collect()
}

/// BLAKE3 of `s` (as the store hashes chunks).
fn digest(s: &str) -> [u8; 32] {
    *xenod_store::ChunkId::of(s.as_bytes()).as_bytes()
}

fn hex_of(b: &[u8], n: usize) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<String>()[..n].to_owned()
}

/// Four hex digits naming `env` in device names.
pub fn env_tag(env: &str) -> String {
    hex_of(&digest(&format!("xenod/net/env/{env}")), 4)
}

/// This daemon's bridge of `env`.
pub fn bridge_name(short: &str, env: &str) -> String {
    format!("xb{short}{}", env_tag(env))
}

/// This daemon's VXLAN device of `env`.
pub fn vxlan_name(short: &str, env: &str) -> String {
    format!("xv{short}{}", env_tag(env))
}

/// The tap of `instance` on `env` under this daemon.
pub fn tap_name(short: &str, env: &str, instance: &str) -> String {
    let h = digest(&format!("xenod/net/tap/{env}/{instance}"));
    format!("xt{short}{}", hex_of(&h, 7))
}

/// The device-name prefixes of the daemon with `short`.
pub fn prefixes(short: &str) -> [String; 3] {
    [format!("xb{short}"), format!("xv{short}"), format!("xt{short}")]
}

/// The VNI `env` gets, trying `salt` 0, 1, ... while one is taken.
pub fn vni_of(env: &str, salt: u32) -> u32 {
    let h = digest(&format!("xenod/net/vni/{env}/{salt}"));
    let n = u32::from_le_bytes(h[..4].try_into().unwrap_or_default());
    1 + n % (netrec::MAX_VNI - 1)
}

/// The subnet an environment gets when none is asked: a /24 in 10/8
/// derived from its VNI.
pub fn default_subnet(vni: u32) -> String {
    format!("10.{}.{}.0/24", (vni >> 8) & 0xff, vni & 0xff)
}

/// The MAC of address `ip` on `env`: locally administered, unicast.
pub fn mac_of(env: &str, ip: Ipv4Addr) -> String {
    let e = digest(&format!("xenod/net/mac/{env}"))[0];
    let o = ip.octets();
    format!("02:{e:02x}:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// A free host address of `subnet`, starting at a hash of `seed`; `None`
/// when every one is taken. The network and broadcast addresses are never
/// given.
pub fn pick_address(subnet: &str, seed: &str, taken: &dyn Fn(Ipv4Addr) -> bool) -> Result<Option<Ipv4Addr>> {
    let (net, len) = netrec::parse_subnet(subnet).map_err(|e| Error::coded(Exit::BadInput, e))?;
    let hosts = (1u32 << (32 - len)) - 2;
    let h = digest(seed);
    let start = u32::from_le_bytes(h[..4].try_into().unwrap_or_default()) % hosts;
    for i in 0..hosts {
        let ip = Ipv4Addr::from(u32::from(net) + 1 + (start + i) % hosts);
        if !taken(ip) {
            return Ok(Some(ip));
        }
    }
    Ok(None)
}

/// Asks the daemon of `data_dir` about environments; a daemon must run
/// (it holds the records and speaks for this host on gossip).
pub fn request(data_dir: &Path, req: NetRequest) -> Result<Value> {
    let sock = socket_path(data_dir);
    let mut s = UnixStream::connect(&sock).map_err(|_| {
        Error::msg(format!(
            "environments need this host's daemon; start `xenod --data-dir {} serve` first",
            data_dir.display()
        ))
    })?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    writeln!(s, "{}", Request::Net { net: req }.to_line())?;
    for line in BufReader::new(s).lines() {
        let Line::Done(o) = serde_json::from_str::<Line>(&line?)? else { continue };
        if o.ok {
            return Ok(o.result.unwrap_or_default());
        }
        let code = o.code.map_or(Exit::Failure, |c| Exit::from_code(u64::from(c)));
        return Err(Error::coded(code, o.error.unwrap_or_else(|| "the daemon failed".into())));
    }
    Err(Error::msg("the daemon closed the connection without an answer"))
}

/// A NIC on `env` for `instance` here (`keep`: the address it holds).
pub fn attach(data_dir: &Path, env: &str, instance: &str, keep: Option<&Attach>) -> Result<Attach> {
    let v = request(
        data_dir,
        NetRequest::Attach { env: env.to_owned(), instance: instance.to_owned(), keep: keep.cloned() },
    )?;
    Ok(serde_json::from_value(v)?)
}

/// For an instance arriving here by migration with `held` (its NIC on its
/// source host): the same address on this host's segment, recorded in
/// `net`, and the rewrites its domain XML needs (the source's bridge and
/// tap names for this host's).
pub fn arrive(
    data_dir: &Path,
    instance: &str,
    held: Option<&Attach>,
    net: &mut Option<Attach>,
) -> Result<Vec<(String, String)>> {
    let Some(old) = held else { return Ok(Vec::new()) };
    let new = attach(data_dir, &old.env, instance, Some(old))?;
    // Plain names: the rewrite escapes what it looks for as XML text.
    let pairs = vec![(old.bridge.clone(), new.bridge.clone()), (old.tap.clone(), new.tap.clone())];
    *net = Some(new);
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ifnamsiz_and_carry_the_daemon() {
        let s = short("3d4017c3e843895a92b70aa74d1b7ebc");
        for n in [bridge_name(&s, "red"), vxlan_name(&s, "red"), tap_name(&s, "red", "a-very-long-instance-name")] {
            assert!(n.len() <= 15, "{n}");
            assert!(prefixes(&s).iter().any(|p| n.starts_with(p.as_str())), "{n}");
        }
        assert_ne!(bridge_name(&s, "red"), bridge_name(&s, "blue"));
        assert_ne!(bridge_name(&s, "red"), bridge_name("aaaaaa", "red"));
    }

    #[test]
    fn addresses_skip_what_is_taken_and_macs_follow_them() {
        let taken = |ip: Ipv4Addr| ip.octets()[3] != 7;
        assert_eq!(pick_address("10.0.0.0/24", "x", &taken).unwrap(), Some(Ipv4Addr::new(10, 0, 0, 7)));
        assert_eq!(pick_address("10.0.0.0/30", "x", &|_| true).unwrap(), None);
        for seed in ["a", "b", "c", "d"] {
            let ip = pick_address("10.0.0.0/30", seed, &|_| false).unwrap().unwrap();
            assert!(matches!(ip.octets()[3], 1 | 2), "{ip}");
        }
        let m = mac_of("red", Ipv4Addr::new(10, 1, 2, 3));
        assert!(m.starts_with("02:") && m.ends_with(":0a:01:02:03"), "{m}");
        assert_ne!(vni_of("red", 0), vni_of("red", 1));
        assert!(vni_of("red", 0) <= netrec::MAX_VNI);
    }
}
