//! The deploy spec: how to boot a guest from a stack, independent of host
//! and hypervisor. It travels as JSON in an overlay's layer metadata and can
//! be overridden field by field on the command line ([`SpecOverrides`]).
//!
//! ```text
//! {
//!   "base": "template://xenod/fixture/1",
//!   "kernel": "stack:boot/vmlinux",          // or a host path: "/var/lib/…/vmlinux"
//!   "initrd": "stack:boot/initrd.img",
//!   "cmdline": "quiet",                       // appended after xenod's own arguments
//!   "memory_mib": 256,
//!   "vcpus": 1,
//!   "root": "fs",                             // "fs" (shared tree) or "disk"
//!   "fs_share": "9p",                         // "9p" or "virtiofs" (fs root on QEMU/KVM)
//!   "disk_image": "disk/root.img",            // inside the tree, for "root": "disk"
//!   "ports": ["8080:80", "0:22"],             // 127.0.0.1:HOST -> guest PORT; 0 = any free port
//!   "instance": "web-1"
//! }
//! ```
//!
//! Missing fields take the defaults of [`DeploySpec::new`]; unknown fields
//! are ignored so an older xenod can read a newer spec.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default guest memory.
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// Default number of virtual CPUs.
pub const DEFAULT_VCPUS: u32 = 1;
/// Longest instance name; it is also the libvirt domain name.
pub const MAX_NAME_LEN: usize = 63;

/// How to boot one guest. See the module docs for the JSON form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploySpec {
    /// The template the overlay builds on (a `template://` name or a layer id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    pub kernel: BootFile,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<BootFile>,
    /// Extra kernel arguments, after the ones xenod adds (console, root,
    /// instance), so they can override those.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cmdline: String,
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default)]
    pub root: RootMode,
    /// The shared-filesystem protocol of an fs root on QEMU/KVM (Xen: 9p).
    #[serde(default)]
    pub fs_share: FsShare,
    /// Path of the root disk image inside the tree, for [`RootMode::Disk`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_image: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortForward>,
    /// The instance (and libvirt domain) name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The service the guest provides, as the federation finds it
    /// (`xenod services NAME`) [default: the instance's name].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// What the guest may take from its host besides vCPUs and memory.
    #[serde(default, skip_serializing_if = "Limits::is_none")]
    pub limits: Limits,
}

/// What a guest may take from its host besides its vCPUs and memory; each
/// unset means no limit.
///
/// ```text
/// cpu_quota_pct    hard cap, percent of one CPU, the whole guest   <cputune><global_quota>
/// cpu_shares       weight against other guests (default 1024)       <cputune><shares>
/// disk_bytes_sec   disk roots: bytes a second, read and write       <iotune><total_bytes_sec>
/// disk_iops_sec    disk roots: operations a second                  <iotune><total_iops_sec>
/// net_kib_sec      KiB a second each way; bridged networks only     <bandwidth>
/// upper_bytes      bytes the guest's upper layer may hold: cowfs refuses
///                  writes past it with EDQUOT, the guest sees "Disk quota exceeded"
/// ```
///
/// A shared-filesystem root has no block device to throttle (9p and
/// virtiofs have no I/O limits in libvirt), and user-mode networking has
/// no host interface to shape: such a limit is refused, or dropped with
/// `best_effort` ([`Limits::applicable`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota_pct: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_shares: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes_sec: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_iops_sec: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_kib_sec: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper_bytes: Option<u64>,
}

impl Limits {
    pub fn is_none(&self) -> bool {
        *self == Limits::default()
    }

    /// `o`'s limits over these.
    pub fn apply(&mut self, o: &Limits) {
        let Limits { cpu_quota_pct, cpu_shares, disk_bytes_sec, disk_iops_sec, net_kib_sec, upper_bytes } = o.clone();
        self.cpu_quota_pct = cpu_quota_pct.or(self.cpu_quota_pct);
        self.cpu_shares = cpu_shares.or(self.cpu_shares);
        self.disk_bytes_sec = disk_bytes_sec.or(self.disk_bytes_sec);
        self.disk_iops_sec = disk_iops_sec.or(self.disk_iops_sec);
        self.net_kib_sec = net_kib_sec.or(self.net_kib_sec);
        self.upper_bytes = upper_bytes.or(self.upper_bytes);
    }

    /// Absurd values, by field.
    pub fn validate(&self, vcpus: u32) -> Result<()> {
        if let Some(q) = self.cpu_quota_pct
            && (q == 0 || q > 100 * vcpus)
        {
            return Err(Error::spec(
                "cpu_quota_pct",
                format!("{q}% is out of range 1..={} ({vcpus} vCPUs)", 100 * vcpus),
            ));
        }
        if let Some(s) = self.cpu_shares
            && !(2..=262_144).contains(&s)
        {
            return Err(Error::spec("cpu_shares", format!("{s} is out of range 2..=262144")));
        }
        for (field, v) in [
            ("disk_bytes_sec", self.disk_bytes_sec),
            ("disk_iops_sec", self.disk_iops_sec),
            ("net_kib_sec", self.net_kib_sec),
        ] {
            if v == Some(0) {
                return Err(Error::spec(field, "0 would stop the guest; leave it out for no limit"));
            }
        }
        if let Some(b) = self.upper_bytes
            && b < 1 << 20
        {
            return Err(Error::spec("upper_bytes", format!("{b} bytes is too little (at least 1 MiB)")));
        }
        Ok(())
    }

    /// The limits this host can apply to a guest with `root` and a
    /// user-mode (`user_net`) or bridged network, and the names of those
    /// it cannot, with why.
    pub fn applicable(&self, root: RootMode, user_net: bool) -> (Limits, Vec<(&'static str, &'static str)>) {
        let mut l = self.clone();
        let mut dropped = Vec::new();
        if root == RootMode::Fs {
            if l.disk_bytes_sec.take().is_some() {
                dropped.push(("disk_bytes_sec", "a shared-filesystem root has no disk to throttle"));
            }
            if l.disk_iops_sec.take().is_some() {
                dropped.push(("disk_iops_sec", "a shared-filesystem root has no disk to throttle"));
            }
        }
        if user_net && l.net_kib_sec.take().is_some() {
            dropped.push(("net_kib_sec", "user-mode networking has no host interface to shape"));
        }
        (l, dropped)
    }
}

fn default_memory() -> u32 {
    DEFAULT_MEMORY_MIB
}
fn default_vcpus() -> u32 {
    DEFAULT_VCPUS
}

impl DeploySpec {
    /// A spec with defaults for everything but the kernel.
    pub fn new(kernel: BootFile) -> Self {
        DeploySpec {
            base: None,
            kernel,
            initrd: None,
            cmdline: String::new(),
            memory_mib: DEFAULT_MEMORY_MIB,
            vcpus: DEFAULT_VCPUS,
            root: RootMode::Fs,
            fs_share: FsShare::NineP,
            disk_image: None,
            ports: Vec::new(),
            instance: None,
            service: None,
            limits: Limits::default(),
        }
    }

    pub fn from_json(json: &str) -> Result<Self> {
        let spec: DeploySpec = serde_json::from_str(json).map_err(Error::SpecJson)?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Applies command-line overrides; set fields replace the spec's.
    pub fn apply(&mut self, o: &SpecOverrides) {
        let SpecOverrides { kernel, initrd, cmdline, memory_mib, vcpus, root, fs_share, disk_image, ports, instance } =
            o.clone();
        if let Some(v) = kernel {
            self.kernel = v;
        }
        if let Some(v) = initrd {
            self.initrd = Some(v);
        }
        if let Some(v) = cmdline {
            self.cmdline = v;
        }
        if let Some(v) = memory_mib {
            self.memory_mib = v;
        }
        if let Some(v) = vcpus {
            self.vcpus = v;
        }
        if let Some(v) = root {
            self.root = v;
        }
        if let Some(v) = fs_share {
            self.fs_share = v;
        }
        if let Some(v) = disk_image {
            self.disk_image = Some(v);
        }
        if let Some(v) = ports {
            self.ports = v;
        }
        if let Some(v) = instance {
            self.instance = Some(v);
        }
    }

    /// Checks what can be checked without a host: names, sizes, ports, paths.
    pub fn validate(&self) -> Result<()> {
        if let Some(name) = &self.instance {
            validate_name(name)?;
        }
        if self.memory_mib < 16 {
            return Err(Error::spec("memory_mib", format!("{} MiB is too little (at least 16)", self.memory_mib)));
        }
        if self.vcpus == 0 || self.vcpus > 256 {
            return Err(Error::spec("vcpus", format!("{} is out of range 1..=256", self.vcpus)));
        }
        if let BootFile::Stack(p) = &self.kernel {
            check_tree_path("kernel", p)?;
        }
        if let Some(BootFile::Stack(p)) = &self.initrd {
            check_tree_path("initrd", p)?;
        }
        match (self.root, &self.disk_image) {
            (RootMode::Disk, None) => {
                return Err(Error::spec("disk_image", "root \"disk\" needs the image's path inside the tree"));
            }
            (_, Some(p)) => check_tree_path("disk_image", Path::new(p))?,
            (RootMode::Fs, None) => {}
        }
        self.limits.validate(self.vcpus)?;
        if self.cmdline.contains(['\n', '\0']) {
            return Err(Error::spec("cmdline", "must be one line"));
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.ports {
            if f.guest == 0 {
                return Err(Error::spec("ports", format!("{f}: guest port 0")));
            }
            if f.host != 0 && !seen.insert(f.host) {
                return Err(Error::spec("ports", format!("host port {} forwarded twice", f.host)));
            }
        }
        Ok(())
    }
}

/// Instance names become libvirt domain names, file names and kernel
/// arguments: letters, digits, `-`, `_`, `.`; not starting with `-` or `.`.
pub fn validate_name(name: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(Error::spec("instance", format!("{name:?}: length must be 1..={MAX_NAME_LEN}")));
    }
    if !name.chars().all(ok_char) || name.starts_with(['-', '.']) {
        return Err(Error::spec(
            "instance",
            format!("{name:?}: use letters, digits, '-', '_', '.' (not first: '-', '.')"),
        ));
    }
    Ok(())
}

/// A path inside the tree must stay inside it: relative, no `..`.
fn check_tree_path(field: &'static str, p: &Path) -> Result<()> {
    let inside = p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir | Component::RootDir));
    if !inside || p.as_os_str().is_empty() {
        return Err(Error::spec(field, format!("{}: must be a path inside the tree, without '..'", p.display())));
    }
    Ok(())
}

/// Command-line overrides for a [`DeploySpec`]; `None` keeps the spec's value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecOverrides {
    pub kernel: Option<BootFile>,
    pub initrd: Option<BootFile>,
    pub cmdline: Option<String>,
    pub memory_mib: Option<u32>,
    pub vcpus: Option<u32>,
    pub root: Option<RootMode>,
    pub fs_share: Option<FsShare>,
    pub disk_image: Option<String>,
    /// Replaces the whole list when set.
    pub ports: Option<Vec<PortForward>>,
    pub instance: Option<String>,
}

/// A kernel or initrd: a host file, or a file inside the guest's tree.
/// Written `stack:PATH` (PATH relative to the tree) or a host path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum BootFile {
    Host(PathBuf),
    Stack(PathBuf),
}

const STACK_PREFIX: &str = "stack:";

impl BootFile {
    /// The host path: a stack path is resolved against `tree`.
    pub fn resolve(&self, tree: &Path) -> PathBuf {
        match self {
            BootFile::Host(p) => p.clone(),
            BootFile::Stack(p) => tree.join(p.strip_prefix("/").unwrap_or(p)),
        }
    }
}

impl fmt::Display for BootFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootFile::Host(p) => write!(f, "{}", p.display()),
            BootFile::Stack(p) => write!(f, "{STACK_PREFIX}{}", p.display()),
        }
    }
}

impl FromStr for BootFile {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.is_empty() {
            return Err(Error::spec("kernel", "empty path"));
        }
        Ok(match s.strip_prefix(STACK_PREFIX) {
            Some(p) => BootFile::Stack(PathBuf::from(p)),
            None => BootFile::Host(PathBuf::from(s)),
        })
    }
}

impl TryFrom<String> for BootFile {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<BootFile> for String {
    fn from(b: BootFile) -> String {
        b.to_string()
    }
}

/// Where the guest's root filesystem comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootMode {
    /// The tree itself, shared with the guest (XenoServer model). QEMU
    /// cannot save or migrate such a guest; it moves cold.
    #[default]
    Fs,
    /// A disk image inside the tree (Xenos model): save/restore work.
    Disk,
}

impl fmt::Display for RootMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RootMode::Fs => "fs",
            RootMode::Disk => "disk",
        })
    }
}

impl FromStr for RootMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fs" => Ok(RootMode::Fs),
            "disk" => Ok(RootMode::Disk),
            _ => Err(Error::spec("root", format!("{s:?}: want \"fs\" or \"disk\""))),
        }
    }
}

/// The protocol that shares an fs root with the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FsShare {
    /// virtio-9p (QEMU/KVM) or Xen 9pfs.
    #[default]
    #[serde(rename = "9p")]
    NineP,
    /// virtiofs through libvirt's virtiofsd (QEMU/KVM only; needs shared memory).
    #[serde(rename = "virtiofs")]
    VirtioFs,
}

impl fmt::Display for FsShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FsShare::NineP => "9p",
            FsShare::VirtioFs => "virtiofs",
        })
    }
}

impl FromStr for FsShare {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "9p" => Ok(FsShare::NineP),
            "virtiofs" => Ok(FsShare::VirtioFs),
            _ => Err(Error::spec("fs_share", format!("{s:?}: want \"9p\" or \"virtiofs\""))),
        }
    }
}

/// A TCP forward from `127.0.0.1:host` to the guest's `guest` port, written
/// `HOST:GUEST`. Host port 0 means "any free port", chosen at deploy time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortForward {
    pub host: u16,
    pub guest: u16,
}

impl fmt::Display for PortForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.guest)
    }
}

impl FromStr for PortForward {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::spec("ports", format!("{s:?}: want HOST:GUEST, e.g. 8080:80 (HOST 0 = any free port)"));
        let (h, g) = s.split_once(':').ok_or_else(bad)?;
        let host = h.parse().map_err(|_| bad())?;
        let guest: u16 = g.parse().map_err(|_| bad())?;
        if guest == 0 {
            return Err(bad());
        }
        Ok(PortForward { host, guest })
    }
}

impl TryFrom<String> for PortForward {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<PortForward> for String {
    fn from(p: PortForward) -> String {
        p.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> DeploySpec {
        DeploySpec {
            base: Some("template://xenod/fixture/1".into()),
            kernel: "stack:boot/vmlinux".parse().unwrap(),
            initrd: Some("/var/cache/initrd.img".parse().unwrap()),
            cmdline: "quiet".into(),
            memory_mib: 512,
            vcpus: 2,
            root: RootMode::Disk,
            fs_share: FsShare::VirtioFs,
            disk_image: Some("disk/root.img".into()),
            ports: vec!["8080:80".parse().unwrap(), "0:22".parse().unwrap()],
            instance: Some("web-1".into()),
            service: Some("web".into()),
            limits: Limits { cpu_quota_pct: Some(25), upper_bytes: Some(64 << 20), ..Limits::default() },
        }
    }

    #[test]
    fn json_round_trip() {
        let spec = full();
        let json = spec.to_json();
        assert!(json.contains("\"stack:boot/vmlinux\""), "{json}");
        assert!(json.contains("\"8080:80\""), "{json}");
        assert!(json.contains("\"virtiofs\""), "{json}");
        assert_eq!(DeploySpec::from_json(&json).unwrap(), spec);
    }

    #[test]
    fn minimal_json_takes_defaults_and_ignores_unknown_fields() {
        let spec = DeploySpec::from_json(r#"{"kernel": "/boot/vmlinuz", "future_field": 1}"#).unwrap();
        assert_eq!(spec, DeploySpec::new(BootFile::Host("/boot/vmlinuz".into())));
        assert_eq!(spec.root, RootMode::Fs);
        assert_eq!(spec.fs_share, FsShare::NineP);
    }

    #[test]
    fn overrides_replace_only_what_is_set() {
        let mut spec = full();
        spec.apply(&SpecOverrides {
            memory_mib: Some(128),
            ports: Some(vec![]),
            instance: Some("web-2".into()),
            ..Default::default()
        });
        assert_eq!(spec.memory_mib, 128);
        assert!(spec.ports.is_empty());
        assert_eq!(spec.instance.as_deref(), Some("web-2"));
        assert_eq!(spec.vcpus, 2);
        assert_eq!(spec.cmdline, "quiet");
    }

    #[test]
    fn bad_specs_say_which_field() {
        let cases: &[(&str, &str)] = &[
            (r#"{"kernel": "/k", "instance": "-x"}"#, "instance"),
            (r#"{"kernel": "/k", "instance": "a b"}"#, "instance"),
            (r#"{"kernel": "/k", "memory_mib": 1}"#, "memory_mib"),
            (r#"{"kernel": "/k", "vcpus": 0}"#, "vcpus"),
            (r#"{"kernel": "stack:../etc/k"}"#, "kernel"),
            (r#"{"kernel": "/k", "root": "disk"}"#, "disk_image"),
            (r#"{"kernel": "/k", "root": "disk", "disk_image": "../x"}"#, "disk_image"),
            (r#"{"kernel": "/k", "ports": ["80:80", "80:81"]}"#, "ports"),
        ];
        for (json, field) in cases {
            match DeploySpec::from_json(json) {
                Err(Error::InvalidSpec { field: f, .. }) => assert_eq!(f, *field, "{json}"),
                other => panic!("{json}: want InvalidSpec({field}), got {other:?}"),
            }
        }
        for json in [r#"{"kernel": "/k", "ports": ["80"]}"#, r#"{"kernel": "/k", "root": "zfs"}"#, r#"{"kernel": ""}"#]
        {
            assert!(matches!(DeploySpec::from_json(json), Err(Error::SpecJson(_))), "{json}");
        }
    }

    #[test]
    fn port_forward_forms() {
        assert_eq!("8080:80".parse::<PortForward>().unwrap(), PortForward { host: 8080, guest: 80 });
        assert_eq!("0:80".parse::<PortForward>().unwrap(), PortForward { host: 0, guest: 80 });
        for bad in ["80", "80:0", "x:80", "80:70000", ":80", "1:2:3"] {
            assert!(bad.parse::<PortForward>().is_err(), "{bad}");
        }
    }

    #[test]
    fn boot_file_resolves_inside_the_tree() {
        let tree = Path::new("/mnt/t");
        assert_eq!("stack:/boot/k".parse::<BootFile>().unwrap().resolve(tree), Path::new("/mnt/t/boot/k"));
        assert_eq!("stack:boot/k".parse::<BootFile>().unwrap().resolve(tree), Path::new("/mnt/t/boot/k"));
        assert_eq!("/boot/k".parse::<BootFile>().unwrap().resolve(tree), Path::new("/boot/k"));
    }
}
