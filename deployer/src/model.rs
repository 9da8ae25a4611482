//! The domain model: one guest with every host path resolved and every port
//! chosen, independent of the hypervisor. [`crate::xml`] turns it into
//! libvirt XML for Xen, KVM or QEMU; the model itself knows no XML.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::spec::{DeploySpec, FsShare, PortForward, RootMode};

/// The 9p/virtiofs tag under which an fs root is shared (`xenod.root=9p:root`).
pub const ROOT_TAG: &str = "root";

/// One guest, ready to be written as domain XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainModel {
    /// The libvirt domain name: the instance name, or a host-specific
    /// prefix plus it where several daemons share one libvirt.
    pub name: String,
    /// The instance name the guest is told (`xenod.instance=`).
    pub instance: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Kernel arguments after those xenod adds ([`crate::kernel_cmdline`]).
    pub extra_cmdline: String,
    pub root: Root,
    pub network: Network,
    /// Where the serial console is logged (QEMU/KVM; on Xen xenconsoled
    /// decides, see [`crate::Target::console_log`]).
    pub console_log: PathBuf,
    /// CPU and disk limits libvirt applies (those this guest can take:
    /// see [`crate::Limits::applicable`]).
    pub limits: crate::Limits,
    /// NICs on host bridges besides `network` (environments' segments).
    pub nics: Vec<BridgeNic>,
}

/// A NIC on a host bridge, as an environment gives a guest one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeNic {
    pub bridge: String,
    /// Fixed, so the guest keeps it wherever it runs.
    pub mac: String,
    /// The host side's tap name [default: the hypervisor's choice].
    pub tap: Option<String>,
    pub mtu: Option<u32>,
}

/// The guest's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    /// A host directory (the cowfs mount) shared with the guest.
    Tree { dir: PathBuf, share: FsShare },
    /// A raw disk image (inside the cowfs mount) as the guest's first disk.
    Disk { image: PathBuf },
}

impl Root {
    pub fn mode(&self) -> RootMode {
        match self {
            Root::Tree { .. } => RootMode::Fs,
            Root::Disk { .. } => RootMode::Disk,
        }
    }
}

/// The guest's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    None,
    /// QEMU user-mode networking; every forward listens on 127.0.0.1 only.
    /// `isolated`: the guest reaches nothing but its forwards (slirp
    /// `restrict=on`). QEMU/KVM only.
    User {
        forwards: Vec<PortForward>,
        isolated: bool,
    },
    /// A host bridge (real hosts, and the only choice on Xen).
    Bridge {
        bridge: String,
    },
}

impl Network {
    pub fn forwards(&self) -> &[PortForward] {
        match self {
            Network::User { forwards, .. } => forwards,
            _ => &[],
        }
    }
}

/// What xenod records in each domain it defines (libvirt metadata), so that
/// `ps`, `logs`, `suspend` work from libvirt's state alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainMeta {
    pub root: RootMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<FsShare>,
    /// The shared tree (fs root) or the disk image (disk root).
    pub root_path: PathBuf,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortForward>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_log: Option<PathBuf>,
}

impl DomainModel {
    /// Resolves `spec` against `tree` (the guest's mounted stack): boot files
    /// and the disk image must exist, host port 0 becomes a free port, a
    /// taken port is an error. The instance name comes from the spec.
    pub fn from_spec(spec: &DeploySpec, tree: &Path, console_log: PathBuf) -> Result<Self> {
        spec.validate()?;
        let name = spec.instance.clone().ok_or_else(|| Error::spec("instance", "no instance name given"))?;
        let kernel = spec.kernel.resolve(tree);
        if !kernel.is_file() {
            return Err(Error::MissingKernel { path: kernel });
        }
        let initrd = spec.initrd.as_ref().map(|i| i.resolve(tree));
        if let Some(path) = initrd.as_ref().filter(|p| !p.is_file()) {
            return Err(Error::MissingInitrd { path: path.clone() });
        }
        let root = match spec.root {
            RootMode::Fs => {
                if !tree.is_dir() {
                    return Err(Error::MissingRootTree { path: tree.to_path_buf() });
                }
                Root::Tree { dir: tree.to_path_buf(), share: spec.fs_share }
            }
            RootMode::Disk => {
                // validate() guarantees a relative path without `..`.
                let rel = spec.disk_image.as_deref().unwrap_or_default();
                let image = tree.join(rel.trim_start_matches('/'));
                if !image.is_file() {
                    return Err(Error::MissingDiskImage { path: image });
                }
                Root::Disk { image }
            }
        };
        let forwards = resolve_ports(&spec.ports)?;
        Ok(DomainModel {
            instance: name.clone(),
            name,
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            kernel,
            initrd,
            extra_cmdline: spec.cmdline.clone(),
            root,
            network: Network::User { forwards, isolated: true },
            console_log,
            limits: spec.limits.applicable(spec.root, true).0,
            nics: Vec::new(),
        })
    }

    pub(crate) fn meta(&self, console_log: Option<PathBuf>) -> DomainMeta {
        let (share, root_path) = match &self.root {
            Root::Tree { dir, share } => (Some(*share), dir.clone()),
            Root::Disk { image } => (None, image.clone()),
        };
        DomainMeta { root: self.root.mode(), share, root_path, ports: self.network.forwards().to_vec(), console_log }
    }
}

/// Host port 0 -> a port that is free now; a fixed port must be free now.
/// (Another process can still take it before the guest starts; starting
/// then fails with [`Error::PortTaken`] too.)
pub fn resolve_ports(ports: &[PortForward]) -> Result<Vec<PortForward>> {
    let mut out = Vec::with_capacity(ports.len());
    // Keep the listeners of chosen ports until all are chosen, so two `0:`
    // forwards never get the same port.
    let mut held = Vec::new();
    for f in ports {
        let l = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, f.host))
            .map_err(|e| Error::PortTaken { port: f.host, source: Some(e) })?;
        let host = l.local_addr().map_err(|e| Error::PortTaken { port: f.host, source: Some(e) })?.port();
        out.push(PortForward { host, guest: f.guest });
        held.push(l);
    }
    Ok(out)
}

/// Gives each forward whose host port is the first of a `(from, to)` pair
/// the second instead.
pub fn move_host_ports(forwards: &mut [PortForward], moved: &[(u16, u16)]) {
    for f in forwards {
        if let Some((_, to)) = moved.iter().find(|(from, _)| *from == f.host) {
            f.host = *to;
        }
    }
}

/// Fails with [`Error::PortTaken`] if a forward's host port is in use.
pub fn check_ports_free(forwards: &[PortForward]) -> Result<()> {
    for f in forwards {
        TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, f.host))
            .map_err(|e| Error::PortTaken { port: f.host, source: Some(e) })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::BootFile;

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("boot")).unwrap();
        std::fs::create_dir_all(t.path().join("disk")).unwrap();
        std::fs::write(t.path().join("boot/vmlinux"), b"k").unwrap();
        std::fs::write(t.path().join("boot/initrd"), b"i").unwrap();
        std::fs::write(t.path().join("disk/root.img"), b"d").unwrap();
        t
    }

    fn spec() -> DeploySpec {
        let mut s = DeploySpec::new("stack:boot/vmlinux".parse().unwrap());
        s.initrd = Some("stack:boot/initrd".parse().unwrap());
        s.instance = Some("m1".into());
        s
    }

    #[test]
    fn resolves_paths_and_free_ports() {
        let t = tree();
        let mut s = spec();
        s.ports = vec!["0:80".parse().unwrap(), "0:22".parse().unwrap()];
        let m = DomainModel::from_spec(&s, t.path(), t.path().join("console.log")).unwrap();
        assert_eq!(m.kernel, t.path().join("boot/vmlinux"));
        assert_eq!(m.root, Root::Tree { dir: t.path().to_path_buf(), share: FsShare::NineP });
        let f = m.network.forwards();
        assert!(f[0].host != 0 && f[1].host != 0 && f[0].host != f[1].host, "{f:?}");
        assert_eq!((f[0].guest, f[1].guest), (80, 22));

        s.root = RootMode::Disk;
        s.disk_image = Some("disk/root.img".into());
        let m = DomainModel::from_spec(&s, t.path(), t.path().join("c")).unwrap();
        assert_eq!(m.root, Root::Disk { image: t.path().join("disk/root.img") });
    }

    #[test]
    fn missing_files_and_taken_ports_are_named() {
        let t = tree();
        let c = || t.path().join("c");
        let mut s = spec();
        s.kernel = BootFile::Stack("boot/nope".into());
        assert!(matches!(DomainModel::from_spec(&s, t.path(), c()), Err(Error::MissingKernel { .. })));
        let mut s = spec();
        s.initrd = Some(BootFile::Host("/nonexistent/initrd".into()));
        assert!(matches!(DomainModel::from_spec(&s, t.path(), c()), Err(Error::MissingInitrd { .. })));
        let mut s = spec();
        s.root = RootMode::Disk;
        s.disk_image = Some("disk/nope.img".into());
        assert!(matches!(DomainModel::from_spec(&s, t.path(), c()), Err(Error::MissingDiskImage { .. })));
        let mut s = spec();
        s.instance = None;
        assert!(matches!(DomainModel::from_spec(&s, t.path(), c()), Err(Error::InvalidSpec { field: "instance", .. })));

        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let mut s = spec();
        s.ports = vec![PortForward { host: port, guest: 80 }];
        match DomainModel::from_spec(&s, t.path(), c()) {
            Err(Error::PortTaken { port: p, .. }) => assert_eq!(p, port),
            other => panic!("want PortTaken, got {other:?}"),
        }
    }
}
