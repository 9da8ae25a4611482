//! The daemon's side of environments: it keeps the records it hears
//! (`DATA_DIR/net/envs.json`, so a restart knows them before anyone
//! repeats them), answers `xenod net` and attaches, and each period (and
//! at once when something changes) makes this host's devices match what
//! its instances need, then announces its member record and repeats every
//! environment record it holds.
//!
//! A host has a segment of an environment while one of its instances is
//! on it (by the instance's record, or an address reserved for a guest
//! being deployed or arriving); a segment no longer needed is removed, and
//! so is, at start, any device carrying this daemon's prefix that no
//! instance needs (what a crash left). A daemon that stops says it leaves
//! and removes its segments, except those that still have a guest's tap
//! on them (guests outlive a daemon restart; their segment is adopted
//! again at the next start).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use xenod_peer::netrec::{self, Claim, EnvRecord, Member, NetBody, NetOffer, Signed};
use xenod_store::Exit;

use super::{Attach, MTU, NetRequest, VXLAN_PORT, dev};
use crate::daemon::Daemon;
use crate::error::{Context, Error, Result};

/// How long an address reserved for a deploy or an arrival stays claimed
/// before its instance's record must hold it.
const RESERVED: Duration = Duration::from_secs(120);

/// The daemon's state of environments.
#[derive(Default)]
pub struct NetHost {
    /// Addresses reserved for guests whose record does not hold them yet.
    pending: Mutex<Vec<(Claim, Instant)>>,
    /// Wakes the loop: announce now.
    kick: tokio::sync::Notify,
    /// What the devices were last made to match (skip `ip` when unchanged).
    applied: Mutex<Option<Desired>>,
}

/// Per environment this host has a segment of: its VNI and the tunnel
/// endpoints of the other members.
type Desired = BTreeMap<String, (u32, BTreeSet<SocketAddr>)>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn every() -> Duration {
    std::env::var("XENOD_ANNOUNCE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(crate::daemon::announce::ANNOUNCE_EVERY)
}

fn expiry(d: &Daemon) -> Duration {
    d.config().host_expiry_secs.map_or(crate::daemon::announce::HOST_EXPIRY, Duration::from_secs)
}

fn envs_path(data: &Path) -> PathBuf {
    data.join("net").join("envs.json")
}

fn short_of(d: &Daemon) -> String {
    super::short(&d.node().id().to_string())
}

fn me(d: &Daemon) -> [u8; 32] {
    *d.node().id().as_bytes()
}

/// Where this host's tunnels end: `net_underlay` (else the peer
/// endpoint's address, when it is a specific IPv4 one), `net_vxlan_port`.
pub fn vtep(d: &Daemon) -> Result<SocketAddr> {
    let port = d.config().net_vxlan_port.unwrap_or(VXLAN_PORT);
    let ip = match d.config().net_underlay {
        Some(ip) => ip,
        None => match d.node().endpoint().bound_sockets().into_iter().map(|s| s.ip()).find(|i| !i.is_unspecified()) {
            Some(IpAddr::V4(ip)) => ip,
            _ => {
                return Err(Error::coded(
                    Exit::Usage,
                    "this host has no VXLAN underlay address: set net_underlay = \"IP\" in config.toml \
                     (the address other hosts reach this one on)",
                ));
            }
        },
    };
    Ok(SocketAddr::new(IpAddr::V4(ip), port))
}

fn underlay(v: SocketAddr) -> Ipv4Addr {
    match v.ip() {
        IpAddr::V4(i) => i,
        IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    }
}

/// Reads the environment records kept on disk into the book.
fn load(d: &Daemon) {
    let p = envs_path(d.data_dir());
    let Ok(b) = std::fs::read(&p) else { return };
    match serde_json::from_slice::<Vec<Signed>>(&b) {
        Ok(v) => {
            for s in v {
                d.node().net().offer(&s);
            }
        }
        Err(e) => tracing::warn!("{}: {e}; environments are learnt again from peers", p.display()),
    }
}

/// Keeps the environment records held on disk.
fn save(d: &Daemon) -> Result<()> {
    let p = envs_path(d.data_dir());
    std::fs::create_dir_all(p.parent().unwrap_or(d.data_dir()))?;
    let tmp = p.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&d.node().net().env_records())?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))
}

/// The addresses this host's guests hold: from their records, and those
/// reserved for guests on their way.
fn local_claims(d: &Daemon) -> Vec<Claim> {
    let data = d.data_dir();
    let mut out: Vec<Claim> = Vec::new();
    for e in std::fs::read_dir(data.join("instances")).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Ok(inst) = crate::instance::Instance::load(data, &name)
            && let Some(a) = &inst.net
        {
            out.push(a.claim(&inst.name));
        }
    }
    let mut pending = lock(&d.net.pending);
    pending.retain(|(c, t)| t.elapsed() < RESERVED && !out.iter().any(|o| o.env == c.env && o.instance == c.instance));
    out.extend(pending.iter().map(|(c, _)| c.clone()));
    out
}

/// The environment that holds `env`'s VNI before it, if one does: two
/// hosts that created environments at once may have given both one VNI
/// (each checks only those it knows). The earlier creation keeps it; the
/// other gets no segment anywhere, so their traffic never mixes, until it
/// is removed and created anew (with another VNI).
fn shadowed_by(envs: &[EnvRecord], env: &EnvRecord) -> Option<String> {
    envs.iter()
        .filter(|e| !e.removed && e.name != env.name && e.vni == env.vni)
        .find(|e| (e.created, e.owner) < (env.created, env.owner))
        .map(|e| e.name.clone())
}

/// Makes this host's devices match what its instances need; returns its
/// member record.
fn reconcile(d: &Daemon) -> Result<Member> {
    let book = d.node().net();
    let claims = local_claims(d);
    let me = me(d);
    let vtep = vtep(d).ok();
    let members = book.members(expiry(d));
    let all = book.envs();
    let mut want: Desired = BTreeMap::new();
    for c in &claims {
        if let Some(env) = book.env(&c.env) {
            if let Some(other) = shadowed_by(&all, &env) {
                tracing::warn!("environment {} has the VNI of {other}, created earlier: no segment for it", env.name);
                continue;
            }
            let floods = members
                .iter()
                .filter(|m| m.node != me && m.envs.contains(&c.env))
                .filter_map(|m| m.vtep)
                .filter(|v| Some(*v) != vtep)
                .collect();
            want.insert(c.env.clone(), (env.vni, floods));
        }
    }
    let mut applied = lock(&d.net.applied);
    if applied.as_ref() != Some(&want) {
        apply(d, &want)?;
        *applied = Some(want.clone());
    }
    let claims = claims.into_iter().filter(|c| want.contains_key(&c.env)).collect();
    Ok(Member { node: me, at: now_micros(), vtep, envs: want.keys().cloned().collect(), claims, leaving: false })
}

fn apply(d: &Daemon, want: &Desired) -> Result<()> {
    let short = short_of(d);
    let mut keep = BTreeSet::new();
    if !want.is_empty() {
        let v = vtep(d)?;
        for (env, (vni, floods)) in want {
            let (br, vx) = (super::bridge_name(&short, env), super::vxlan_name(&short, env));
            dev::ensure_segment(&br, &vx, *vni, underlay(v), v.port(), MTU)
                .with_context(|| format!("the segment of environment {env}"))?;
            dev::set_floods(&vx, floods).with_context(|| format!("the tunnels of environment {env}"))?;
            keep.insert(br);
            keep.insert(vx);
        }
    }
    let own = super::prefixes(&short);
    for (name, _) in dev::links(&own[..2])? {
        if !keep.contains(&name) {
            tracing::info!("removing {name}: no instance here needs it");
            dev::remove(&name)?;
        }
    }
    Ok(())
}

/// Runs `f` on a blocking thread (device changes fork `ip`).
async fn blocking<T: Send + 'static>(d: &Arc<Daemon>, f: impl FnOnce(&Daemon) -> T + Send + 'static) -> Result<T> {
    let d = d.clone();
    Ok(tokio::task::spawn_blocking(move || f(&d)).await?)
}

/// Announces this host's member record and every environment record held.
async fn announce(d: &Arc<Daemon>, member: Member) {
    let mut recs = vec![d.node().sign_net(&NetBody::Member(member))];
    recs.extend(d.node().net().env_records());
    if let Err(e) = d.node().announce_net(recs).await {
        tracing::debug!("net announcement: {e}");
    }
}

/// Loads the records kept, removes what an earlier run left, and keeps
/// devices and announcements up to date until the daemon stops.
pub fn spawn(d: &Arc<Daemon>) {
    load(d);
    let weak: Weak<Daemon> = Arc::downgrade(d);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every());
        // Announce each period and when asked; what others announce only
        // changes the devices (announcing then would echo between hosts).
        let mut speak = true;
        loop {
            let Some(d) = weak.upgrade() else { return };
            if d.stopping() {
                return;
            }
            match blocking(&d, reconcile).await {
                Ok(Ok(m)) if speak => announce(&d, m).await,
                Ok(Ok(_)) => {}
                Ok(Err(e)) | Err(e) => tracing::warn!("environments: {}", e.chain()),
            }
            let book = d.node().net().clone();
            drop(d);
            let Some(d) = weak.upgrade() else { return };
            speak = tokio::select! {
                _ = tick.tick() => true,
                _ = d.net.kick.notified() => true,
                _ = book.changed.notified() => false,
            };
        }
    });
}

/// Says this host leaves, and removes its segments but those a guest
/// still uses.
pub async fn stop(d: &Arc<Daemon>) {
    let m = Member { node: me(d), at: now_micros(), vtep: None, envs: vec![], claims: vec![], leaving: true };
    // Bounded like the daemon's other goodbyes: a gossip that does not
    // take the record must not keep the daemon from stopping.
    let leave = d.node().announce_net(vec![d.node().sign_net(&NetBody::Member(m))]);
    if tokio::time::timeout(Duration::from_secs(1), leave).await.is_err() {
        tracing::debug!("saying goodbye to the environments: timed out");
    }
    let r = blocking(d, |d| -> Result<()> {
        let own = super::prefixes(&short_of(d));
        for (name, _) in dev::links(&own[..1])? {
            let vx = name.replacen("xb", "xv", 1);
            let guests = dev::ports(&name, &vx)?;
            if guests.is_empty() {
                dev::remove(&vx)?;
                dev::remove(&name)?;
            } else {
                tracing::warn!("keeping {name}: guests still use it ({})", guests.join(", "));
            }
        }
        for (name, master) in dev::links(&own[1..2])? {
            if master.is_none() {
                dev::remove(&name)?;
            }
        }
        Ok(())
    })
    .await;
    if let Ok(Err(e)) | Err(e) = r {
        tracing::warn!("removing this host's segments: {}", e.chain());
    }
}

/// Answers `xenod net ...` and attaches.
pub async fn handle(d: &Arc<Daemon>, req: NetRequest) -> Result<Value> {
    match req {
        NetRequest::Create { env, subnet } => create(d, &env, subnet.as_deref()).await,
        NetRequest::Ls => Ok(ls(d)),
        NetRequest::Rm { env } => rm(d, &env).await,
        NetRequest::Attach { env, instance, keep } => {
            Ok(serde_json::to_value(attach(d, &env, &instance, keep).await?)?)
        }
    }
}

async fn publish(d: &Arc<Daemon>, rec: EnvRecord) -> Result<EnvRecord> {
    let signed = d.node().sign_net(&NetBody::Env(rec.clone()));
    match d.node().net().offer(&signed) {
        NetOffer::Accepted => {}
        NetOffer::Ignored => return Err(Error::msg(format!("environment {}: a newer record is held", rec.name))),
        NetOffer::Refused(why) => return Err(Error::coded(Exit::BadInput, why)),
    }
    save(d)?;
    if let Err(e) = d.node().announce_net(vec![signed]).await {
        tracing::debug!("announcing environment {}: {e}", rec.name);
    }
    d.net.kick.notify_one();
    Ok(rec)
}

async fn create(d: &Arc<Daemon>, env: &str, subnet: Option<&str>) -> Result<Value> {
    netrec::valid_env_name(env).map_err(|e| Error::coded(Exit::BadInput, e))?;
    let book = d.node().net();
    if let Some(e) = book.env(env) {
        return Err(Error::coded(
            Exit::BadInput,
            format!("environment {env} exists (subnet {}, VNI {}); `xenod net rm {env}` it first", e.subnet, e.vni),
        ));
    }
    let held = book.envs();
    let used: BTreeMap<u32, String> = held.iter().filter(|e| !e.removed).map(|e| (e.vni, e.name.clone())).collect();
    let vni = (0..64)
        .map(|salt| super::vni_of(env, salt))
        .find(|v| !used.contains_key(v))
        .ok_or_else(|| Error::msg(format!("no free VNI for {env} after 64 tries")))?;
    let subnet = match subnet {
        Some(s) => {
            let (net, len) = netrec::parse_subnet(s).map_err(|e| Error::coded(Exit::BadInput, e))?;
            format!("{net}/{len}")
        }
        None => super::default_subnet(vni),
    };
    let seq = held.iter().find(|e| e.name == env && e.owner == me(d)).map_or(1, |e| e.seq + 1);
    let rec = EnvRecord { name: env.into(), subnet, vni, owner: me(d), created: now_micros(), seq, removed: false };
    Ok(serde_json::to_value(publish(d, rec).await?)?)
}

/// Every claim on `env` known: this host's and live members'.
fn claims_of(d: &Daemon, env: &str) -> Vec<(String, Claim)> {
    let here = d.node().id().to_string();
    let mut out: Vec<(String, Claim)> =
        local_claims(d).into_iter().filter(|c| c.env == env).map(|c| (here.clone(), c)).collect();
    for m in d.node().net().members(expiry(d)) {
        let node = xenod_peer::EndpointId::from_bytes(&m.node).map(|n| n.to_string()).unwrap_or_default();
        out.extend(m.claims.into_iter().filter(|c| c.env == env).map(|c| (node.clone(), c)));
    }
    out
}

async fn rm(d: &Arc<Daemon>, env: &str) -> Result<Value> {
    let rec = d.node().net().env(env).ok_or_else(|| Error::coded(Exit::NotFound, format!("no environment {env}")))?;
    if rec.owner != me(d) {
        let owner = xenod_peer::EndpointId::from_bytes(&rec.owner).map(|n| n.to_string()).unwrap_or_default();
        return Err(Error::coded(
            Exit::BadInput,
            format!("environment {env} was created by host {owner}: remove it there"),
        ));
    }
    let users: Vec<String> =
        claims_of(d, env).into_iter().map(|(n, c)| format!("{} on {}", c.instance, super::short(&n))).collect();
    if !users.is_empty() {
        return Err(Error::coded(
            Exit::BadInput,
            format!("environment {env} is in use by {}; destroy those instances first", users.join(", ")),
        ));
    }
    let gone = EnvRecord { seq: rec.seq + 1, removed: true, ..rec };
    publish(d, gone).await?;
    let _ = blocking(d, reconcile).await?;
    Ok(json!({ "removed": env }))
}

fn ls(d: &Daemon) -> Value {
    let here = d.node().id().to_string();
    let members = d.node().net().members(expiry(d));
    let own = local_claims(d);
    let all = d.node().net().envs();
    let mut envs = Vec::new();
    for e in all.iter().filter(|e| !e.removed).cloned() {
        let mut hosts: Vec<Value> = Vec::new();
        if own.iter().any(|c| c.env == e.name) {
            hosts.push(json!({ "node": here, "vtep": vtep(d).ok().map(|v| v.to_string()), "this_host": true }));
        }
        for m in members.iter().filter(|m| m.envs.contains(&e.name)) {
            let node = xenod_peer::EndpointId::from_bytes(&m.node).map(|n| n.to_string()).unwrap_or_default();
            hosts.push(json!({ "node": node, "vtep": m.vtep.map(|v| v.to_string()), "this_host": false }));
        }
        let mut addrs: Vec<(String, Claim)> = claims_of(d, &e.name);
        addrs.sort_by(|a, b| (a.1.ip, a.1.since, &a.1.instance).cmp(&(b.1.ip, b.1.since, &b.1.instance)));
        // Two different guests on one address: the later claim is the conflict.
        let mut conflicts = Vec::new();
        for w in addrs.windows(2) {
            let (a, b) = (&w[0].1, &w[1].1);
            if a.ip == b.ip && (a.instance != b.instance || a.since != b.since) {
                conflicts.push(json!({ "ip": b.ip.to_string(), "instance": b.instance, "host": w[1].0 }));
            }
        }
        addrs.dedup_by(|b, a| a.1 == b.1);
        let owner = xenod_peer::EndpointId::from_bytes(&e.owner).map(|n| n.to_string()).unwrap_or_default();
        envs.push(json!({
            "name": e.name, "subnet": e.subnet, "vni": e.vni, "owner": owner, "seq": e.seq,
            "shadowed_by": shadowed_by(&all, &e),
            "hosts": hosts,
            "addresses": addrs.iter().map(|(n, c)| json!({ "instance": c.instance, "ip": c.ip.to_string(), "mac": c.mac, "host": n, "this_host": *n == here })).collect::<Vec<_>>(),
            "conflicts": conflicts,
        }));
    }
    json!({ "envs": envs, "this_host": here, "vtep": vtep(d).ok().map(|v| v.to_string()) })
}

async fn attach(d: &Arc<Daemon>, env: &str, instance: &str, keep: Option<Attach>) -> Result<Attach> {
    let rec =
        d.node().net().env(env).ok_or_else(|| {
            Error::coded(Exit::NotFound, format!("no environment {env}; `xenod net create {env}` first"))
        })?;
    vtep(d)?;
    if let Some(other) = shadowed_by(&d.node().net().envs(), &rec) {
        return Err(Error::coded(
            Exit::BadInput,
            format!(
                "environment {env} has the VNI of {other}, created earlier on another host: remove {env} and create it again"
            ),
        ));
    }
    let (_, prefix) = netrec::parse_subnet(&rec.subnet).map_err(|e| Error::coded(Exit::BadInput, e))?;
    let claim = match keep {
        Some(k) => Claim { env: env.into(), instance: instance.into(), ip: k.ip, mac: k.mac, since: k.since },
        None => {
            let known = claims_of(d, env);
            if let Some((_, c)) = known.iter().find(|(n, c)| c.instance == instance && *n == d.node().id().to_string())
            {
                c.clone()
            } else {
                let taken: BTreeSet<Ipv4Addr> = known.iter().map(|(_, c)| c.ip).collect();
                let seed = format!("{}/{instance}", d.node().id());
                let ip = super::pick_address(&rec.subnet, &seed, &|ip| taken.contains(&ip))?.ok_or_else(|| {
                    Error::coded(Exit::Capacity, format!("environment {env}: every address of {} is taken", rec.subnet))
                })?;
                Claim {
                    env: env.into(),
                    instance: instance.into(),
                    ip,
                    mac: super::mac_of(env, ip),
                    since: now_micros(),
                }
            }
        }
    };
    {
        let mut p = lock(&d.net.pending);
        p.retain(|(c, _)| !(c.env == claim.env && c.instance == claim.instance));
        p.push((claim.clone(), Instant::now()));
    }
    // The segment exists before libvirt attaches the guest, and the claim
    // is out before the guest boots.
    let member = blocking(d, reconcile).await??;
    announce(d, member).await;
    let short = short_of(d);
    Ok(Attach {
        env: env.into(),
        ip: claim.ip,
        prefix,
        mac: claim.mac,
        since: claim.since,
        bridge: super::bridge_name(&short, env),
        tap: super::tap_name(&short, env, instance),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str, vni: u32, created: u64, removed: bool) -> EnvRecord {
        EnvRecord { name: name.into(), subnet: "10.0.0.0/24".into(), vni, owner: [1; 32], created, seq: 1, removed }
    }

    #[test]
    fn of_two_environments_on_one_vni_the_later_gets_no_segment() {
        let all = vec![env("red", 7, 10, false), env("blue", 7, 11, false), env("green", 8, 1, false)];
        assert_eq!(shadowed_by(&all, &all[0]), None);
        assert_eq!(shadowed_by(&all, &all[1]).as_deref(), Some("red"));
        assert_eq!(shadowed_by(&all, &all[2]), None);
        let gone = vec![env("red", 7, 10, true), env("blue", 7, 11, false)];
        assert_eq!(shadowed_by(&gone, &gone[1]), None, "a removed environment holds no VNI");
    }
}
