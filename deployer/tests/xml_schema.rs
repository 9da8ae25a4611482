//! Every XML flavour the generator writes validates against libvirt's own
//! domain schema (`virt-xml-validate`, which needs `xmllint` from
//! libxml2-utils). One model per root mode, written for every target that
//! can run it.

use std::process::Command;

use xenod_deployer::{DomainModel, FsShare, Limits, Network, PortForward, Root, Target, XenBoot, domain_xml};

fn model(name: &str, root: Root, network: Network) -> DomainModel {
    DomainModel {
        name: name.into(),
        instance: name.into(),
        memory_mib: 256,
        vcpus: 2,
        kernel: "/var/lib/xenod/k/vmlinux".into(),
        initrd: Some("/var/lib/xenod/k/initrd.img".into()),
        // Characters that need escaping in XML must survive.
        extra_cmdline: "quiet xenod.note=a<b&c'd\"e".into(),
        root,
        network,
        console_log: "/var/lib/xenod/instances/x/console.log".into(),
        // Every limit, so <cputune>, <iotune> and <bandwidth> validate too.
        limits: Limits {
            cpu_quota_pct: Some(25),
            cpu_shares: Some(512),
            disk_bytes_sec: Some(10 << 20),
            disk_iops_sec: Some(500),
            net_kib_sec: Some(1024),
            upper_bytes: None,
        },
        // An environment's NIC beside the user-mode one.
        nics: vec![xenod_deployer::BridgeNic {
            bridge: "xbabcdef1234".into(),
            mac: "02:11:0a:01:02:03".into(),
            tap: Some("xtabcdef1234567".into()),
            mtu: Some(1450),
        }],
    }
}

fn validate(xml: &str, what: &str) {
    let tools = ["virt-xml-validate", "xmllint"];
    for tool in tools {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().unwrap().status.success();
        assert!(found, "{tool} is missing: install libvirt-clients and libxml2-utils (scripts/install-deps.sh)");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{what}.xml"));
    std::fs::write(&file, xml).unwrap();
    let out = Command::new("virt-xml-validate").arg(&file).arg("domain").output().unwrap();
    assert!(
        out.status.success(),
        "{what}: virt-xml-validate failed:\n{}{}\n--- XML ---\n{xml}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_target_validates() {
    let tree = |share| Root::Tree { dir: "/var/lib/xenod/mnt/web-1".into(), share };
    let disk = Root::Disk { image: "/var/lib/xenod/mnt/web-1/disk/root.img".into() };
    let user = Network::User {
        forwards: vec![PortForward { host: 8080, guest: 80 }, PortForward { host: 2222, guest: 22 }],
        isolated: true,
    };
    let bridge = Network::Bridge { bridge: "xenbr0".into() };

    let mut cases = vec![];
    for target in [Target::Qemu, Target::Kvm] {
        cases.push((target, model("q-9p", tree(FsShare::NineP), user.clone())));
        cases.push((target, model("q-vfs", tree(FsShare::VirtioFs), user.clone())));
        cases.push((target, model("q-disk", disk.clone(), user.clone())));
        cases.push((target, model("q-bridge", disk.clone(), bridge.clone())));
        cases.push((target, model("q-nonet", disk.clone(), Network::None)));
    }
    for target in [Target::Xen(XenBoot::Pvh), Target::Xen(XenBoot::Pv)] {
        cases.push((target, model("x-9p", tree(FsShare::NineP), bridge.clone())));
        cases.push((target, model("x-disk", disk.clone(), bridge.clone())));
        cases.push((target, model("x-nonet", disk.clone(), Network::None)));
    }
    cases.push((Target::Test, model("t-9p", tree(FsShare::NineP), user.clone())));

    for (target, m) in &cases {
        let xml = domain_xml(m, *target).unwrap_or_else(|e| panic!("{target} {}: {e}", m.name));
        assert!(xml.contains(&format!("<domain type='{}'", target.domain_type())), "{xml}");
        validate(&xml, &format!("{}-{}", target.domain_type(), m.name));
    }
    eprintln!("xml_schema: {} domain XMLs valid", cases.len());
}

#[test]
fn xen_xml_has_pv_devices() {
    let m = model("x", Root::Tree { dir: "/t".into(), share: FsShare::NineP }, Network::None);
    let xml = domain_xml(&m, Target::Xen(XenBoot::Pvh)).unwrap();
    assert!(xml.contains("<target type='xen' port='0'/>"), "{xml}");
    assert!(xml.contains("console=hvc0"), "{xml}");
    assert!(xml.contains("<target dir='root'/>"), "{xml}");
}
