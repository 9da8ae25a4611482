//! What a migration carries about an instance ([`Record`]), how an
//! instance arrives on this host from one, and how its guest is saved.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use xenod_deployer::{DeploySpec, PortForward, RootMode, default_uri};
use xenod_store::{LayerId, Store};

use crate::bail;
use crate::error::{Context, Result};
use crate::instance::Instances;
use crate::instance::{self as deploy, Instance};

/// What a target needs to run an instance.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    pub top: LayerId,
    pub layer: LayerId,
    pub root: RootMode,
    pub ports: Vec<PortForward>,
    pub spec: Option<DeploySpec>,
    /// The instance directory on the sending host, as named in the saved
    /// state's paths.
    pub source_dir: PathBuf,
    /// Its NIC on an environment, as on the sending host.
    #[serde(default)]
    pub net: Option<crate::net::Attach>,
    /// Who deployed it (accounting).
    #[serde(default)]
    pub owner: Option<String>,
}

/// How a running guest's memory is saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveMode {
    /// Live where the hypervisor can ([`xenod_deployer::LiveMigration::save_live`]),
    /// else stopped.
    Auto,
    /// Live, or fail.
    Live,
    /// Stopped for the whole save: paused, then saved by the live path's
    /// means where it can be, else by `virDomainSave`.
    Stopped,
}

pub(crate) fn record_of(data: &Path, inst: &Instance) -> Record {
    Record {
        name: inst.name.clone(),
        top: inst.top,
        layer: inst.layer,
        root: inst.root,
        ports: inst.ports.clone(),
        spec: inst.spec.clone(),
        source_dir: inst.dir(data),
        net: inst.net.clone(),
        owner: inst.owner.clone(),
    }
}

/// The host ports the guest gets here, as `(saved, here)` pairs for the
/// ports that move: a port its deploy spec left to chance (`0:GUEST`) that
/// is taken on this host goes to a free one (on one machine the source's
/// paused QEMU still holds it until clean-up); a port the spec fixed must
/// be free.
pub(crate) fn ports_here(record: &Record) -> Result<Vec<(u16, u16)>> {
    let mut moved = Vec::new();
    for f in &record.ports {
        let Err(taken) = xenod_deployer::check_ports_free(&[*f]) else { continue };
        let any = record.spec.as_ref().is_some_and(|s| s.ports.iter().any(|p| p.host == 0 && p.guest == f.guest));
        if !any {
            return Err(taken).context(format!("the guest's fixed host port {} is taken on this host", f.host));
        }
        let free = xenod_deployer::resolve_ports(&[PortForward { host: 0, guest: f.guest }])?;
        moved.push((f.host, free[0].host));
    }
    Ok(moved)
}

/// Bytes free for this process in the filesystem of `dir`.
pub(crate) fn free_bytes(dir: &Path) -> Result<u64> {
    let s = rustix::fs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

pub(crate) fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `record`'s instance as it runs here on `layer`, not yet mounted.
pub(crate) fn instance_of(instances: &Instances, record: &Record, layer: LayerId) -> Result<Instance> {
    let domain = instances.domain_name(&record.name);
    Ok(Instance {
        name: record.name.clone(),
        top: record.top,
        layer: record.layer,
        uri: default_uri(),
        root: record.root,
        ports: record.ports.clone(),
        mount_pid: None,
        created: now(),
        mounted: Some(layer),
        domain: (domain != record.name).then_some(domain),
        spec: record.spec.clone(),
        lazy: false,
        net: None,
        owner: record.owner.clone(),
    })
}

/// Creates the directory of an instance `name` arriving here, which
/// must be a new name.
pub(crate) fn new_instance_dir(instances: &Instances, name: &str) -> Result<PathBuf> {
    xenod_deployer::validate_name(name)?;
    let dir = instances.dir(name);
    if dir.exists() {
        bail!("an instance named {name:?} already exists on this host");
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Records `inst`, pins `layer` for it and mounts it with a fresh upper
/// layer.
pub(crate) fn mount_instance(instances: &Instances, store: &Store, inst: &mut Instance, layer: LayerId) -> Result<()> {
    let data = instances.data_dir();
    inst.save(data)?;
    store.pin(&deploy::pin_label(&inst.name), &layer)?;
    inst.mount_pid = Some(instances.spawn_mount(inst)?);
    inst.save(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(spec_port: &str, held: u16) -> Record {
        let mut spec = DeploySpec::new("stack:boot/vmlinux".parse().unwrap());
        spec.ports = vec![spec_port.parse().unwrap()];
        Record {
            name: "web".into(),
            top: LayerId::from_bytes([1; 32]),
            layer: LayerId::from_bytes([2; 32]),
            root: RootMode::Disk,
            ports: vec![PortForward { host: held, guest: 80 }],
            spec: Some(spec),
            source_dir: "/a/instances/web".into(),
            net: None,
            owner: None,
        }
    }

    #[test]
    fn a_taken_port_moves_only_where_the_spec_left_it_to_chance() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let held = l.local_addr().unwrap().port();
        let moved = ports_here(&record("0:80", held)).unwrap();
        assert_eq!(moved.len(), 1);
        assert_eq!(moved[0].0, held);
        assert_ne!(moved[0].1, held);
        let e = format!("{:#}", ports_here(&record(&format!("{held}:80"), held)).unwrap_err());
        assert!(e.contains(&format!("fixed host port {held} is taken")), "{e}");
        drop(l);
        assert!(ports_here(&record(&format!("{held}:80"), held)).unwrap().is_empty(), "free ports stay");
    }
}
