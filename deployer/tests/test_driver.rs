//! The [`Hypervisor`] trait over libvirt's in-process test driver
//! (`test:///default`): no daemon, no guest, every lifecycle call real.
//! The test driver's state is shared by the whole process, so each test
//! uses its own domain names.

use std::path::Path;
use std::time::Duration;

use xenod_deployer::{
    DomainModel, DomainState, Error, FsShare, Hypervisor, Libvirt, LiveMigration, Network, PortForward, Root, RootMode,
    StopOutcome, Target,
};

fn hv() -> Libvirt {
    Libvirt::connect("test:///default").expect("test:///default always opens")
}

fn model(name: &str, root: Root, dir: &Path) -> DomainModel {
    DomainModel {
        name: name.into(),
        instance: name.into(),
        memory_mib: 128,
        vcpus: 1,
        kernel: "/boot/vmlinux".into(),
        initrd: None,
        extra_cmdline: String::new(),
        root,
        network: Network::User { forwards: vec![PortForward { host: 18080, guest: 80 }], isolated: true },
        console_log: dir.join(format!("{name}.console")),
        limits: Default::default(),
        nics: Vec::new(),
    }
}

fn tree(dir: &Path) -> Root {
    Root::Tree { dir: dir.to_path_buf(), share: FsShare::NineP }
}

#[test]
fn lifecycle_through_the_trait() {
    let t = tempfile::tempdir().unwrap();
    let hv = hv();
    assert_eq!(hv.target(), Target::Test);
    let m = model("td-life", Root::Disk { image: t.path().join("root.img") }, t.path());

    hv.define(&m).unwrap();
    assert_eq!(hv.state("td-life").unwrap(), DomainState::ShutOff);
    let st = hv.status("td-life").unwrap();
    assert_eq!(st.meta.root, RootMode::Disk);
    assert_eq!(st.meta.ports, vec![PortForward { host: 18080, guest: 80 }]);
    assert!(hv.list().unwrap().iter().any(|d| d.name == "td-life"));

    hv.start("td-life").unwrap();
    assert_eq!(hv.state("td-life").unwrap(), DomainState::Running);
    hv.suspend("td-life").unwrap();
    assert_eq!(hv.state("td-life").unwrap(), DomainState::Paused);
    hv.resume("td-life").unwrap();
    assert_eq!(hv.state("td-life").unwrap(), DomainState::Running);

    let state_file = t.path().join("state/td-life.save");
    hv.save("td-life", &state_file).unwrap();
    assert!(state_file.is_file());
    assert_eq!(hv.state("td-life").unwrap(), DomainState::ShutOff);
    assert_eq!(hv.restore(&state_file).unwrap(), "td-life");
    assert_eq!(hv.state("td-life").unwrap(), DomainState::Running);

    assert_eq!(hv.stop("td-life", Duration::from_secs(5)).unwrap(), StopOutcome::Graceful);
    assert_eq!(hv.stop("td-life", Duration::from_secs(5)).unwrap(), StopOutcome::AlreadyStopped);
    hv.start("td-life").unwrap();
    hv.destroy("td-life").unwrap();
    assert!(matches!(hv.state("td-life"), Err(Error::NoSuchDomain { .. })));
    assert!(!hv.list().unwrap().iter().any(|d| d.name == "td-life"));
}

#[test]
fn fs_root_saves_on_the_test_driver_and_paused_stop_is_forced() {
    let t = tempfile::tempdir().unwrap();
    let hv = hv();
    let m = model("td-fs", tree(t.path()), t.path());
    hv.deploy(&m).unwrap();
    assert_eq!(hv.status("td-fs").unwrap().meta.share, Some(FsShare::NineP));
    hv.save("td-fs", &t.path().join("s")).unwrap();
    hv.restore(&t.path().join("s")).unwrap();
    hv.suspend("td-fs").unwrap();
    assert_eq!(hv.stop("td-fs", Duration::from_secs(5)).unwrap(), StopOutcome::Forced);
    hv.destroy("td-fs").unwrap();
}

#[test]
fn bad_requests_are_typed_errors() {
    let t = tempfile::tempdir().unwrap();
    let hv = hv();
    let m = model("td-dup", tree(t.path()), t.path());
    hv.define(&m).unwrap();
    assert!(matches!(hv.define(&m), Err(Error::NameInUse { name }) if name == "td-dup"));
    hv.start("td-dup").unwrap();
    let state_file = t.path().join("dup.save");
    hv.save("td-dup", &state_file).unwrap();
    hv.start("td-dup").unwrap();
    // Restoring over a running domain of the same name.
    assert!(matches!(hv.restore(&state_file), Err(Error::NameInUse { .. })));
    hv.destroy("td-dup").unwrap();

    assert!(matches!(hv.start("td-nope"), Err(Error::NoSuchDomain { .. })));
    assert!(matches!(hv.destroy("td-nope"), Err(Error::NoSuchDomain { .. })));
    // The test driver's own domain "test" is not xenod's.
    assert!(matches!(hv.kill("test"), Err(Error::NotManaged { .. })));
    assert!(!hv.list().unwrap().iter().any(|d| d.name == "test"));
    assert!(matches!(hv.restore(&t.path().join("missing.save")), Err(Error::Io { .. })));
}

/// The live-migration hooks through the trait: the test driver has no QEMU,
/// so what needs one is refused (Unsupported), never attempted.
#[test]
fn live_migration_hooks_on_the_test_driver() {
    fn hooks<H: LiveMigration>(hv: &H, name: &str, state_file: &Path) {
        let xml = hv.migratable_xml(name).unwrap();
        assert!(xml.contains(&format!("<name>{name}</name>")) && xml.contains("urn:xenod:domain:1"), "{xml}");
        assert!(!hv.can_stage());
        assert!(matches!(hv.stage_incoming(&xml), Err(Error::Unsupported { op: "stage", .. })));
        assert!(matches!(hv.save_live(name, state_file, false), Err(Error::Unsupported { op: "live save", .. })));
        assert!(!state_file.exists());
        assert_eq!(hv.state(name).unwrap(), DomainState::Running);
        assert!(matches!(hv.migratable_xml("td-live-nope"), Err(Error::NoSuchDomain { .. })));
    }
    let t = tempfile::tempdir().unwrap();
    let hv = hv();
    hv.deploy(&model("td-live", Root::Disk { image: t.path().join("root.img") }, t.path())).unwrap();
    hooks(&hv, "td-live", &t.path().join("live.save"));
    hv.destroy("td-live").unwrap();
}

#[test]
fn unknown_uris_and_absent_daemons_say_what_to_do() {
    match Libvirt::connect("foo:///system") {
        Err(e @ Error::Unsupported { .. }) => assert!(e.to_string().contains("qemu:///system"), "{e}"),
        other => panic!("want Unsupported, got {other:?}"),
    }
    // A socket nobody listens on looks exactly like a stopped libvirtd.
    match Libvirt::connect("qemu:///system?socket=/nonexistent/libvirt-sock") {
        Err(e @ Error::DaemonNotRunning { .. }) => {
            assert!(e.to_string().contains("scripts/start-libvirtd.sh"), "{e}")
        }
        other => panic!("want DaemonNotRunning, got {other:?}"),
    }
}

/// A hypervisor whose `start` always fails, over the test driver: `deploy`
/// must leave no defined domain behind.
struct FailingStart(Libvirt);

impl Hypervisor for FailingStart {
    fn uri(&self) -> &str {
        self.0.uri()
    }
    fn target(&self) -> Target {
        self.0.target()
    }
    fn define(&self, model: &DomainModel) -> xenod_deployer::Result<()> {
        self.0.define(model)
    }
    fn start(&self, _: &str) -> xenod_deployer::Result<()> {
        Err(Error::PortTaken { port: 18080, source: None })
    }
    fn shutdown(&self, name: &str) -> xenod_deployer::Result<()> {
        self.0.shutdown(name)
    }
    fn kill(&self, name: &str) -> xenod_deployer::Result<()> {
        self.0.kill(name)
    }
    fn undefine(&self, name: &str) -> xenod_deployer::Result<()> {
        self.0.undefine(name)
    }
    fn suspend(&self, name: &str) -> xenod_deployer::Result<()> {
        self.0.suspend(name)
    }
    fn resume(&self, name: &str) -> xenod_deployer::Result<()> {
        self.0.resume(name)
    }
    fn save(&self, name: &str, state_file: &Path) -> xenod_deployer::Result<()> {
        self.0.save(name, state_file)
    }
    fn restore(&self, state_file: &Path) -> xenod_deployer::Result<String> {
        self.0.restore(state_file)
    }
    fn list(&self) -> xenod_deployer::Result<Vec<xenod_deployer::DomainStatus>> {
        self.0.list()
    }
    fn status(&self, name: &str) -> xenod_deployer::Result<xenod_deployer::DomainStatus> {
        self.0.status(name)
    }
}

#[test]
fn failed_deploy_leaves_no_domain() {
    let t = tempfile::tempdir().unwrap();
    let hv = FailingStart(hv());
    let m = model("td-fail", tree(t.path()), t.path());
    assert!(matches!(hv.deploy(&m), Err(Error::PortTaken { port: 18080, .. })));
    assert!(matches!(hv.status("td-fail"), Err(Error::NoSuchDomain { .. })));
    // Usable as a trait object.
    let dynamic: &dyn Hypervisor = &hv;
    assert!(dynamic.list().unwrap().iter().all(|d| d.name != "td-fail"));
}
