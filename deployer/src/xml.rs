//! libvirt domain XML from a [`DomainModel`], for every [`Target`].
//!
//! One generator, four flavours; what differs:
//!
//! | | `qemu` (TCG) / `kvm` | `xen` (libxl) | `test` |
//! |---|---|---|---|
//! | domain type | `qemu` / `kvm` | `xen` | `test` |
//! | boot | direct kernel, machine `pc` | direct kernel, PVH (or PV) | direct kernel |
//! | fs root | `<filesystem>` 9p passthrough, or virtiofs + memfd shared memory | 9pfs (`trans=xen`) | 9p |
//! | disk root | virtio `vda` | `xvda` | `vda` |
//! | network | user-mode + `hostfwd` via `<qemu:commandline>` | bridge | user |
//! | console | `ttyS0` logged to a file by virtlogd | `hvc0` (xenconsoled) | `ttyS0` |
//!
//! Port forwards go through `<qemu:commandline>` because libvirt 9.0 offers
//! `<portForward>` only with the passt backend (a separate package); the
//! passthrough `-netdev user,restrict=on,hostfwd=tcp:127.0.0.1:H-:G` is
//! kept by save/restore. Its NIC gets a fixed PCI slot (0x1f) because QEMU
//! would otherwise give it a slot libvirt assigns to its own devices.
//!
//! Real hosts put guests on a bridge instead: set
//! `model.network = Network::Bridge { bridge: "br0".into() }` after
//! [`DomainModel::from_spec`] (xenod's host config decides, not the spec).
//! The bridge is the host's: e.g. with iproute2
//! `ip link add br0 type bridge && ip link set eth0 master br0 && ip link set br0 up`
//! (then move the host's address to br0), or `xenbr0` as Xen's network
//! scripts create it. Guests then take addresses from the LAN (DHCP, or
//! `ip=`/`gw=` in the per-instance `/etc/xenod/instance` file, or the
//! `xenod.ip=`/`xenod.gw=` kernel arguments), and port forwards are not needed.
//!
//! Each domain carries xenod's [`DomainMeta`] as JSON in
//! `<metadata><xenod:instance xmlns:xenod="urn:xenod:domain:1">…`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::{DomainMeta, DomainModel, Network, ROOT_TAG, Root};
use crate::spec::FsShare;

/// XML namespace of xenod's domain metadata.
pub const META_NS: &str = "urn:xenod:domain:1";
const META_PREFIX: &str = "xenod";
const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";
/// PCI slot of the passthrough user-mode NIC (see module docs).
const USER_NIC_SLOT: &str = "0x1f";

/// Which hypervisor (and so which XML flavour) a domain is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// Xen through libxl.
    Xen(XenBoot),
    /// QEMU with KVM acceleration.
    Kvm,
    /// QEMU with TCG (no usable KVM).
    Qemu,
    /// libvirt's in-process test driver.
    Test,
}

/// How a Xen guest boots its kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum XenBoot {
    /// PVH: an HVM container entered at the kernel's PVH ELF note
    /// (an uncompressed vmlinux).
    Pvh,
    /// Classic paravirtualised guest.
    Pv,
}

impl Target {
    /// The `<domain type=...>` value.
    pub fn domain_type(self) -> &'static str {
        match self {
            Target::Xen(_) => "xen",
            Target::Kvm => "kvm",
            Target::Qemu => "qemu",
            Target::Test => "test",
        }
    }

    /// Whether a guest whose root is a shared filesystem can be saved:
    /// QEMU refuses to migrate/save with 9p or virtiofs devices.
    pub fn can_save_shared_fs(self) -> bool {
        matches!(self, Target::Test)
    }

    /// The file the guest's console ends up in: the model's for QEMU/KVM
    /// (virtlogd writes it), xenconsoled's per-guest log on Xen (written
    /// when xenconsoled runs with `--log=guest`).
    pub fn console_log(self, model: &DomainModel) -> Option<PathBuf> {
        match self {
            Target::Xen(_) => Some(Path::new("/var/log/xen/console").join(format!("guest-{}.log", model.name))),
            Target::Kvm | Target::Qemu => Some(model.console_log.clone()),
            Target::Test => None,
        }
    }

    fn console_dev(self) -> &'static str {
        match self {
            Target::Xen(_) => "hvc0",
            _ => "ttyS0",
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Xen(XenBoot::Pvh) => f.write_str("xen (PVH)"),
            Target::Xen(XenBoot::Pv) => f.write_str("xen (PV)"),
            Target::Kvm => f.write_str("kvm"),
            Target::Qemu => f.write_str("qemu (TCG)"),
            Target::Test => f.write_str("test"),
        }
    }
}

/// The kernel command line xenod gives a guest: console, the fixture
/// initramfs's `xenod.*` arguments (root, instance, fail by powering off so
/// a broken boot ends the domain instead of waiting in a shell), then the
/// spec's own arguments, which come last so they can override.
pub fn kernel_cmdline(model: &DomainModel, target: Target) -> String {
    let mut args = vec![];
    if !model.extra_cmdline.split_whitespace().any(|a| a.starts_with("console=")) {
        args.push(format!("console={}", target.console_dev()));
    }
    args.push("xenod.onfail=poweroff".into());
    match (&model.root, target) {
        (Root::Tree { share: FsShare::NineP, .. }, Target::Xen(_)) => {
            args.push(format!("xenod.root=9p:{ROOT_TAG}"));
            args.push("xenod.rootflags=trans=xen,version=9p2000.L,cache=mmap".into());
        }
        (Root::Tree { share: FsShare::NineP, .. }, _) => args.push(format!("xenod.root=9p:{ROOT_TAG}")),
        (Root::Tree { share: FsShare::VirtioFs, .. }, _) => args.push(format!("xenod.root=virtiofs:{ROOT_TAG}")),
        (Root::Disk { .. }, Target::Xen(_)) => args.push("xenod.root=disk:/dev/xvda".into()),
        (Root::Disk { .. }, _) => args.push("xenod.root=disk:/dev/vda".into()),
    }
    args.push(format!("xenod.instance={}", model.instance));
    let extra = model.extra_cmdline.trim();
    if !extra.is_empty() {
        args.push(extra.to_string());
    }
    args.join(" ")
}

/// The domain XML of `model` for `target`. Fails with
/// [`Error::Unsupported`] for combinations the hypervisor cannot do
/// (virtiofs or user-mode networking on Xen).
pub fn domain_xml(model: &DomainModel, target: Target) -> Result<String> {
    let meta = model.meta(target.console_log(model));
    let mut x = Xml::default();
    let qemu_args = qemu_passthrough_args(model, target);
    if qemu_args.is_empty() {
        x.open("domain", &[("type", target.domain_type())]);
    } else {
        x.open("domain", &[("type", target.domain_type()), ("xmlns:qemu", QEMU_NS)]);
    }
    x.text("name", &model.name);
    x.open("metadata", &[]);
    let ns = format!("xmlns:{META_PREFIX}");
    // DomainMeta is plain data; serializing it cannot fail.
    let json = serde_json::to_string(&meta).unwrap_or_default();
    x.text_attrs(&format!("{META_PREFIX}:instance"), &[(ns.as_str(), META_NS)], &json);
    x.close("metadata");
    x.text_attrs("memory", &[("unit", "MiB")], &model.memory_mib.to_string());
    x.text("vcpu", &model.vcpus.to_string());
    cputune(&mut x, &model.limits);

    let virtiofs = matches!(model.root, Root::Tree { share: FsShare::VirtioFs, .. });
    if virtiofs {
        if let Target::Xen(_) = target {
            return Err(Error::Unsupported { op: "virtiofs root", reason: "Xen shares trees over 9pfs only".into() });
        }
        // vhost-user-fs needs guest memory that virtiofsd can map.
        x.open("memoryBacking", &[]);
        x.empty("source", &[("type", "memfd")]);
        x.empty("access", &[("mode", "shared")]);
        x.close("memoryBacking");
    }

    x.open("os", &[]);
    match target {
        Target::Xen(XenBoot::Pvh) => x.text_attrs("type", &[("arch", "x86_64"), ("machine", "xenpvh")], "xenpvh"),
        Target::Xen(XenBoot::Pv) => x.text_attrs("type", &[("arch", "x86_64"), ("machine", "xenpv")], "xen"),
        Target::Kvm | Target::Qemu => x.text_attrs("type", &[("arch", "x86_64"), ("machine", "pc")], "hvm"),
        Target::Test => x.text_attrs("type", &[("arch", "x86_64")], "hvm"),
    }
    x.text("kernel", &path_str(&model.kernel));
    if let Some(initrd) = &model.initrd {
        x.text("initrd", &path_str(initrd));
    }
    x.text("cmdline", &kernel_cmdline(model, target));
    x.close("os");

    match target {
        Target::Kvm | Target::Qemu | Target::Test => {
            // ACPI: the power button is how libvirt asks a guest to stop.
            x.open("features", &[]);
            x.empty("acpi", &[]);
            x.close("features");
        }
        Target::Xen(_) => {}
    }
    if target == Target::Kvm {
        x.empty("cpu", &[("mode", "host-passthrough")]);
    }
    x.text("on_poweroff", "destroy");
    x.text("on_reboot", "restart");
    x.text("on_crash", "destroy");

    x.open("devices", &[]);
    root_device(&mut x, model, target);
    network_device(&mut x, model, target)?;
    for nic in &model.nics {
        bridge_nic(&mut x, nic, target);
    }
    match target {
        Target::Xen(_) => {
            x.open("console", &[("type", "pty")]);
            x.empty("target", &[("type", "xen"), ("port", "0")]);
            x.close("console");
        }
        Target::Kvm | Target::Qemu | Target::Test => {
            x.open("serial", &[("type", "pty")]);
            if let Some(log) = target.console_log(model) {
                // append: a restored guest keeps the log of its first boot;
                // the backend truncates it when it defines a new domain.
                x.empty("log", &[("file", &path_str(&log)), ("append", "on")]);
            }
            x.empty("target", &[("port", "0")]);
            x.close("serial");
            x.open("console", &[("type", "pty")]);
            x.empty("target", &[("type", "serial"), ("port", "0")]);
            x.close("console");
        }
    }
    if matches!(target, Target::Kvm | Target::Qemu) {
        // Nothing a headless direct-boot guest needs; each costs boot time.
        x.empty("controller", &[("type", "usb"), ("model", "none")]);
        x.empty("memballoon", &[("model", "none")]);
    }
    x.close("devices");

    if !qemu_args.is_empty() {
        x.open("qemu:commandline", &[]);
        for a in &qemu_args {
            x.empty("qemu:arg", &[("value", a)]);
        }
        x.close("qemu:commandline");
    }
    x.close("domain");
    Ok(x.out)
}

/// `<cputune>`: the guest's weight, and its cap over all its threads
/// (vCPUs and emulator) per 100 ms period.
fn cputune(x: &mut Xml, l: &crate::Limits) {
    if l.cpu_shares.is_none() && l.cpu_quota_pct.is_none() {
        return;
    }
    x.open("cputune", &[]);
    if let Some(s) = l.cpu_shares {
        x.text("shares", &s.to_string());
    }
    if let Some(q) = l.cpu_quota_pct {
        x.text("global_period", "100000");
        x.text("global_quota", &(u64::from(q) * 1000).to_string());
    }
    x.close("cputune");
}

/// `<iotune>` of a disk root.
fn iotune(x: &mut Xml, l: &crate::Limits) {
    if l.disk_bytes_sec.is_none() && l.disk_iops_sec.is_none() {
        return;
    }
    x.open("iotune", &[]);
    if let Some(b) = l.disk_bytes_sec {
        x.text("total_bytes_sec", &b.to_string());
    }
    if let Some(n) = l.disk_iops_sec {
        x.text("total_iops_sec", &n.to_string());
    }
    x.close("iotune");
}

fn root_device(x: &mut Xml, model: &DomainModel, target: Target) {
    match &model.root {
        Root::Tree { dir, share } => {
            // passthrough: guest sees the tree's real owners and modes; QEMU
            // runs as root for it (scripts/start-libvirtd.sh). virtiofsd
            // started by libvirt always runs as root.
            x.open("filesystem", &[("type", "mount"), ("accessmode", "passthrough")]);
            if *share == FsShare::VirtioFs {
                x.empty("driver", &[("type", "virtiofs")]);
            }
            x.empty("source", &[("dir", &path_str(dir))]);
            x.empty("target", &[("dir", ROOT_TAG)]);
            x.close("filesystem");
        }
        Root::Disk { image } => {
            let (dev, bus) = match target {
                Target::Xen(_) => ("xvda", "xen"),
                _ => ("vda", "virtio"),
            };
            x.open("disk", &[("type", "file"), ("device", "disk")]);
            x.empty("driver", &[("name", "qemu"), ("type", "raw")]);
            x.empty("source", &[("file", &path_str(image))]);
            x.empty("target", &[("dev", dev), ("bus", bus)]);
            iotune(x, &model.limits);
            x.close("disk");
        }
    }
}

fn network_device(x: &mut Xml, model: &DomainModel, target: Target) -> Result<()> {
    match (&model.network, target) {
        (Network::None, _) => {}
        (Network::Bridge { bridge }, _) => {
            x.open("interface", &[("type", "bridge")]);
            x.empty("source", &[("bridge", bridge)]);
            if target != Target::Xen(XenBoot::Pv) && target != Target::Xen(XenBoot::Pvh) {
                x.empty("model", &[("type", "virtio")]);
            }
            if let Some(k) = model.limits.net_kib_sec {
                x.open("bandwidth", &[]);
                x.empty("inbound", &[("average", &k.to_string())]);
                x.empty("outbound", &[("average", &k.to_string())]);
                x.close("bandwidth");
            }
            x.close("interface");
        }
        (Network::User { .. }, Target::Xen(_)) => {
            return Err(Error::Unsupported {
                op: "user-mode networking",
                reason: "Xen guests need a bridge (Network::Bridge); forward ports on the host".into(),
            });
        }
        // QEMU/KVM: passthrough arguments, see qemu_passthrough_args.
        (Network::User { .. }, Target::Kvm | Target::Qemu) => {}
        (Network::User { .. }, Target::Test) => {
            x.open("interface", &[("type", "user")]);
            x.empty("model", &[("type", "virtio")]);
            x.close("interface");
        }
    }
    Ok(())
}

/// A NIC on a host bridge with a fixed MAC (and tap name, and MTU).
fn bridge_nic(x: &mut Xml, nic: &crate::model::BridgeNic, target: Target) {
    x.open("interface", &[("type", "bridge")]);
    x.empty("mac", &[("address", &nic.mac)]);
    x.empty("source", &[("bridge", &nic.bridge)]);
    if let Some(tap) = &nic.tap {
        x.empty("target", &[("dev", tap)]);
    }
    if !matches!(target, Target::Xen(_)) {
        x.empty("model", &[("type", "virtio")]);
    }
    if let Some(m) = nic.mtu {
        x.empty("mtu", &[("size", &m.to_string())]);
    }
    x.close("interface");
}

fn qemu_passthrough_args(model: &DomainModel, target: Target) -> Vec<String> {
    let Network::User { forwards, isolated } = &model.network else { return vec![] };
    if !matches!(target, Target::Kvm | Target::Qemu) {
        return vec![];
    }
    let mut netdev = String::from("user,id=xenodnet0");
    if *isolated {
        netdev.push_str(",restrict=on");
    }
    for f in forwards {
        let _ = write!(netdev, ",hostfwd=tcp:127.0.0.1:{}-:{}", f.host, f.guest);
    }
    // romfile= : no iPXE option ROM, it only costs time with a direct kernel.
    let device = format!("virtio-net-pci,netdev=xenodnet0,romfile=,bus=pci.0,addr={USER_NIC_SLOT}");
    vec!["-netdev".into(), netdev, "-device".into(), device]
}

/// Extracts xenod's metadata from what `virDomainGetMetadata` returns for
/// [`META_NS`]: `<instance xmlns="urn:xenod:domain:1">{json}</instance>`.
pub(crate) fn parse_meta(xml: &str) -> Option<DomainMeta> {
    let start = xml.find('>')? + 1;
    let end = xml.rfind("</")?;
    serde_json::from_str(&unescape(xml.get(start..end)?)).ok()
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '\'' => o.push_str("&apos;"),
            '"' => o.push_str("&quot;"),
            c => o.push(c),
        }
    }
    o
}

fn unescape(s: &str) -> String {
    // &amp; last, so "&amp;lt;" becomes "&lt;" and not "<".
    s.replace("&lt;", "<").replace("&gt;", ">").replace("&apos;", "'").replace("&quot;", "\"").replace("&amp;", "&")
}

/// A minimal indenting XML writer: enough for domain XML, escapes all text.
#[derive(Default)]
struct Xml {
    out: String,
    depth: usize,
}

impl Xml {
    fn start(&mut self, name: &str, attrs: &[(&str, &str)]) {
        self.out.push_str(&"  ".repeat(self.depth));
        self.out.push('<');
        self.out.push_str(name);
        for (k, v) in attrs {
            let _ = write!(self.out, " {k}='{}'", escape(v));
        }
    }
    fn open(&mut self, name: &str, attrs: &[(&str, &str)]) {
        self.start(name, attrs);
        self.out.push_str(">\n");
        self.depth += 1;
    }
    fn close(&mut self, name: &str) {
        self.depth -= 1;
        self.out.push_str(&"  ".repeat(self.depth));
        let _ = writeln!(self.out, "</{name}>");
    }
    fn empty(&mut self, name: &str, attrs: &[(&str, &str)]) {
        self.start(name, attrs);
        self.out.push_str("/>\n");
    }
    fn text_attrs(&mut self, name: &str, attrs: &[(&str, &str)], text: &str) {
        self.start(name, attrs);
        let _ = writeln!(self.out, ">{}</{name}>", escape(text));
    }
    fn text(&mut self, name: &str, text: &str) {
        self.text_attrs(name, &[], text);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::spec::{PortForward, RootMode};

    pub(crate) fn model(root: Root, network: Network) -> DomainModel {
        DomainModel {
            name: "web-1".into(),
            instance: "web-1".into(),
            memory_mib: 256,
            vcpus: 1,
            kernel: "/k/vmlinux".into(),
            initrd: Some("/k/initrd.img".into()),
            extra_cmdline: "quiet".into(),
            root,
            network,
            console_log: "/var/log/xenod/web-1.console".into(),
            limits: Default::default(),
            nics: Vec::new(),
        }
    }

    fn user(ports: &[(u16, u16)]) -> Network {
        Network::User {
            forwards: ports.iter().map(|&(host, guest)| PortForward { host, guest }).collect(),
            isolated: true,
        }
    }

    #[test]
    fn limits_become_cputune_and_iotune() {
        let mut m = model(Root::Disk { image: "/t/disk.img".into() }, user(&[]));
        m.limits = crate::Limits {
            cpu_quota_pct: Some(25),
            cpu_shares: Some(512),
            disk_iops_sec: Some(100),
            ..Default::default()
        };
        let xml = domain_xml(&m, Target::Qemu).unwrap();
        let flat: String = xml.split_whitespace().collect::<Vec<_>>().join("");
        assert!(flat.contains("<cputune><shares>512</shares><global_period>100000</global_period><global_quota>25000</global_quota></cputune>"), "{xml}");
        assert!(flat.contains("<iotune><total_iops_sec>100</total_iops_sec></iotune></disk>"), "{xml}");
        let plain = domain_xml(&model(Root::Disk { image: "/t/disk.img".into() }, user(&[])), Target::Qemu).unwrap();
        assert!(!plain.contains("cputune") && !plain.contains("iotune"), "{plain}");
        // What a guest with a tree root and user networking cannot take.
        let l = crate::Limits {
            disk_bytes_sec: Some(1),
            net_kib_sec: Some(1),
            cpu_quota_pct: Some(50),
            ..Default::default()
        };
        let (kept, dropped) = l.applicable(crate::RootMode::Fs, true);
        assert_eq!(kept, crate::Limits { cpu_quota_pct: Some(50), ..Default::default() });
        let names: Vec<&str> = dropped.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["disk_bytes_sec", "net_kib_sec"]);
        assert!(l.validate(1).is_ok());
        assert!(crate::Limits { cpu_quota_pct: Some(150), ..Default::default() }.validate(1).is_err());
        assert!(crate::Limits { upper_bytes: Some(10), ..Default::default() }.validate(1).is_err());
    }

    #[test]
    fn cmdlines_per_target_and_root() {
        let tree = Root::Tree { dir: "/t".into(), share: FsShare::NineP };
        let m = model(tree.clone(), user(&[]));
        assert_eq!(
            kernel_cmdline(&m, Target::Qemu),
            "console=ttyS0 xenod.onfail=poweroff xenod.root=9p:root xenod.instance=web-1 quiet"
        );
        assert_eq!(
            kernel_cmdline(&m, Target::Xen(XenBoot::Pvh)),
            "console=hvc0 xenod.onfail=poweroff xenod.root=9p:root \
             xenod.rootflags=trans=xen,version=9p2000.L,cache=mmap xenod.instance=web-1 quiet"
        );
        let mut d = model(Root::Disk { image: "/t/root.img".into() }, user(&[]));
        d.extra_cmdline = "console=ttyS1".into();
        assert_eq!(
            kernel_cmdline(&d, Target::Kvm),
            "xenod.onfail=poweroff xenod.root=disk:/dev/vda xenod.instance=web-1 console=ttyS1"
        );
        assert!(kernel_cmdline(&d, Target::Xen(XenBoot::Pv)).contains("xenod.root=disk:/dev/xvda"));
        let v = model(Root::Tree { dir: "/t".into(), share: FsShare::VirtioFs }, user(&[]));
        assert!(kernel_cmdline(&v, Target::Qemu).contains("xenod.root=virtiofs:root"));
    }

    #[test]
    fn qemu_xml_has_forwards_console_log_and_meta() {
        let m = model(Root::Tree { dir: "/t/a&b".into(), share: FsShare::NineP }, user(&[(8080, 80), (2222, 22)]));
        let xml = domain_xml(&m, Target::Qemu).unwrap();
        assert!(xml.starts_with("<domain type='qemu' xmlns:qemu="), "{xml}");
        assert!(xml.contains("hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=tcp:127.0.0.1:2222-:22"), "{xml}");
        assert!(xml.contains("<source dir='/t/a&amp;b'/>"), "{xml}");
        assert!(xml.contains("<log file='/var/log/xenod/web-1.console' append='on'/>"), "{xml}");
        // The metadata round-trips through the escaping.
        let start = xml.find("<xenod:instance").unwrap();
        let end = xml.find("</xenod:instance>").unwrap() + "</xenod:instance>".len();
        let meta = parse_meta(&xml[start..end]).unwrap();
        assert_eq!(meta.root, RootMode::Fs);
        assert_eq!(meta.root_path, Path::new("/t/a&b"));
        assert_eq!(meta.ports.len(), 2);
    }

    #[test]
    fn bridge_nics_come_beside_the_user_nic() {
        let mut m = model(Root::Disk { image: "/i".into() }, user(&[(8080, 80)]));
        m.nics.push(crate::model::BridgeNic {
            bridge: "xbabcdef1234".into(),
            mac: "02:11:0a:01:02:03".into(),
            tap: Some("xtabcdef1234567".into()),
            mtu: Some(1450),
        });
        let xml = domain_xml(&m, Target::Qemu).unwrap();
        let flat: String = xml.split_whitespace().collect::<Vec<_>>().join("");
        assert!(
            flat.contains("<interfacetype='bridge'><macaddress='02:11:0a:01:02:03'/><sourcebridge='xbabcdef1234'/><targetdev='xtabcdef1234567'/><modeltype='virtio'/><mtusize='1450'/></interface>"),
            "{xml}"
        );
        assert!(xml.contains("hostfwd=tcp:127.0.0.1:8080-:80"), "{xml}");
    }

    #[test]
    fn xen_refuses_what_it_cannot_do() {
        let v = model(Root::Tree { dir: "/t".into(), share: FsShare::VirtioFs }, Network::None);
        assert!(matches!(domain_xml(&v, Target::Xen(XenBoot::Pvh)), Err(Error::Unsupported { .. })));
        let u = model(Root::Disk { image: "/i".into() }, user(&[(1, 2)]));
        assert!(matches!(domain_xml(&u, Target::Xen(XenBoot::Pvh)), Err(Error::Unsupported { .. })));
        let b = model(Root::Disk { image: "/i".into() }, Network::Bridge { bridge: "xenbr0".into() });
        let xml = domain_xml(&b, Target::Xen(XenBoot::Pvh)).unwrap();
        assert!(xml.contains("<target dev='xvda' bus='xen'/>"), "{xml}");
        assert!(xml.contains("machine='xenpvh'>xenpvh</type>"), "{xml}");
        assert!(!xml.contains("qemu:"), "{xml}");
    }
}
