//! Real guests through `qemu:///system` (KVM where usable, TCG here), booted
//! from the fixture guest (fixtures/build-guest.sh): an fs root over 9p (and
//! virtiofs) from a copy of template + web, and a disk root from a copy of
//! disk/root.img. Each waits until the guest's HTTP service answers on a
//! forwarded 127.0.0.1 port with `instance=NAME` and `counter=N`; the disk
//! guest is also saved to a file and restored, and its counter goes on.
//!
//! Needs root, qemu-system-x86_64 and the fixture; starts libvirtd through
//! scripts/start-libvirtd.sh (idempotent). Skips, loudly, only when QEMU is
//! absent or the fixture cannot be built. Domains are destroyed even when a
//! test fails (a guard per guest); every wait is bounded.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use xenod_deployer::{
    BootFile, DeploySpec, DomainModel, DomainState, Error, FsShare, GUEST_READY_LINE, Hypervisor, Libvirt,
    LiveMigration, RootMode, StagedGuest, StopOutcome, Target, console_tail, http_get, wait_console, wait_http,
};

/// Per boot: TCG on 2 cores, possibly beside a busy build.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_GRACE: Duration = Duration::from_secs(30);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn skip(why: &str) {
    eprintln!("\n*** SKIPPED: {why} ***\n");
}

fn on_path(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success())
}

/// The fixture guest directory, built if needed; `None` (after a loud
/// message) when this host cannot run the test.
fn fixture() -> Option<PathBuf> {
    if !on_path("qemu-system-x86_64") {
        skip("qemu-system-x86_64 is not installed (scripts/install-deps.sh installs qemu-system-x86)");
        return None;
    }
    let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.as_deref().ok() != Some("0") {
        skip("not root: qemu:///system, 9p passthrough and the fixture build need root");
        return None;
    }
    let base =
        std::env::var_os("XENOD_FIXTURES").map_or_else(|| PathBuf::from("/var/cache/xenod-fixtures"), PathBuf::from);
    let dir = base.join("guest");
    // Cached: returns at once when the fixture is current.
    let out = Command::new("bash").arg(workspace().join("fixtures/build-guest.sh")).arg(&dir).output().unwrap();
    if !out.status.success() || !dir.join("STAMP").is_file() {
        skip(&format!(
            "the fixture guest cannot be built at {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default()
        ));
        return None;
    }
    Some(dir)
}

fn qemu() -> Libvirt {
    let out = Command::new("bash").arg(workspace().join("scripts/start-libvirtd.sh")).output().unwrap();
    assert!(out.status.success(), "scripts/start-libvirtd.sh failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let hv = Libvirt::connect("qemu:///system").unwrap();
    eprintln!("accelerator: {:?} -> target {}", hv.accel(), hv.target());
    assert!(matches!(hv.target(), Target::Qemu | Target::Kvm));
    hv
}

/// Destroys its domain when dropped, also when the test panics.
struct Guest<'a> {
    hv: &'a Libvirt,
    name: String,
    console: PathBuf,
}

impl Drop for Guest<'_> {
    fn drop(&mut self) {
        match self.hv.destroy(&self.name) {
            Ok(()) | Err(Error::NoSuchDomain { .. }) => {}
            Err(e) => eprintln!("cleanup of {}: {e}", self.name),
        }
    }
}

impl Guest<'_> {
    fn die(&self, e: impl std::fmt::Display) -> ! {
        panic!("{}: {e}; console:\n{}", self.name, console_tail(&self.console, 25))
    }

    /// Boot to first HTTP answer: the console's ready line, then httpd (a
    /// missing path is answered 404 without running, and counting, the CGI).
    fn wait_http(&self, port: u16, since: Instant) -> Duration {
        wait_console(self.hv, &self.name, GUEST_READY_LINE, BOOT_TIMEOUT).unwrap_or_else(|e| self.die(e));
        let left = BOOT_TIMEOUT.saturating_sub(since.elapsed());
        assert_eq!(wait_http(self.hv, &self.name, port, "/xenod-probe", left).unwrap_or_else(|e| self.die(e)), 404);
        since.elapsed()
    }

    /// GET / and check the page's instance name and counter.
    fn expect_page(&self, port: u16, counter: u32) {
        let (code, body) = http_get(port, "/", Duration::from_secs(30)).unwrap_or_else(|e| self.die(e));
        assert_eq!(code, 200, "{body}");
        assert!(body.lines().any(|l| l == format!("instance={}", self.name)), "{}: page was:\n{body}", self.name);
        assert!(
            body.lines().any(|l| l == format!("counter={counter}")),
            "{}: want counter={counter}, page was:\n{body}",
            self.name
        );
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn spec(fixture: &Path, name: &str) -> DeploySpec {
    let mut s = DeploySpec::new(BootFile::Host(fixture.join("kernel/vmlinux")));
    s.initrd = Some(BootFile::Host(fixture.join("kernel/initrd.img")));
    s.instance = Some(name.into());
    s.ports = vec!["0:80".parse().unwrap()];
    s
}

/// template + web merged into `dir`, owners kept (`cp -a`).
fn merged_tree(fixture: &Path, dir: &Path) {
    run(Command::new("cp").arg("-a").arg(fixture.join("template")).arg(dir));
    run(Command::new("cp").arg("-a").arg(fixture.join("web/.")).arg(dir));
}

fn fs_root(share: FsShare) {
    let Some(fixture) = fixture() else { return };
    let hv = qemu();
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("root");
    merged_tree(&fixture, &tree);
    let name = format!("xenod-it-{share}-{}", std::process::id());
    let mut s = spec(&fixture, &name);
    s.root = RootMode::Fs;
    s.fs_share = share;
    let model = DomainModel::from_spec(&s, &tree, tmp.path().join("console.log")).unwrap();
    let port = model.network.forwards()[0].host;

    let t0 = Instant::now();
    hv.deploy(&model).unwrap();
    let guest = Guest { hv: &hv, name: name.clone(), console: hv.console_log(&name).unwrap() };
    let started = t0.elapsed();
    let answered = guest.wait_http(port, t0);
    guest.expect_page(port, 1);
    eprintln!("{share} root: define+start {started:?}, boot to HTTP answer {answered:?} (127.0.0.1:{port})");
    guest.expect_page(port, 2);
    guest.expect_page(port, 3);
    // The guest's writes are in the tree at once (cache=mmap, synced CGI).
    assert_eq!(std::fs::read_to_string(tree.join("var/lib/web/counter")).unwrap().trim(), "3");

    let listed = hv.list().unwrap();
    let me = listed.iter().find(|d| d.name == name).expect("listed");
    assert_eq!((me.state, me.meta.root, me.meta.share), (DomainState::Running, RootMode::Fs, Some(share)));

    // QEMU cannot save a guest with a shared-fs root: a clear error, and
    // the guest keeps running.
    match hv.save(&name, &tmp.path().join("state")) {
        Err(e @ Error::Unsupported { .. }) => assert!(e.to_string().contains("stop it and start it again"), "{e}"),
        other => panic!("want Unsupported, got {other:?}"),
    }
    // Pause in memory and go on.
    hv.suspend(&name).unwrap();
    assert_eq!(hv.state(&name).unwrap(), DomainState::Paused);
    hv.resume(&name).unwrap();
    guest.expect_page(port, 4);

    let t = Instant::now();
    assert_eq!(
        hv.stop(&name, STOP_GRACE).unwrap(),
        StopOutcome::Graceful,
        "console:\n{}",
        console_tail(&guest.console, 25)
    );
    eprintln!("{share} root: graceful stop took {:?}", t.elapsed());
    let console = std::fs::read_to_string(&guest.console).unwrap();
    assert!(console.contains("xenod-guest: power off"), "{console}");
    drop(guest);
    assert!(matches!(hv.status(&name), Err(Error::NoSuchDomain { .. })));
}

#[test]
fn fs_root_9p_boots_and_answers() {
    fs_root(FsShare::NineP);
}

#[test]
fn fs_root_virtiofs_boots_and_answers() {
    if !Path::new("/usr/lib/qemu/virtiofsd").exists() && !on_path("virtiofsd") {
        skip("virtiofsd is not installed (qemu-system-common ships /usr/lib/qemu/virtiofsd)");
        return;
    }
    fs_root(FsShare::VirtioFs);
}

#[test]
fn disk_root_boots_and_counter_survives_save_restore() {
    let Some(fixture) = fixture() else { return };
    let hv = qemu();
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("root");
    std::fs::create_dir_all(tree.join("disk")).unwrap();
    let image = tree.join("disk/root.img");
    run(Command::new("cp").arg("--sparse=always").arg(fixture.join("disk/root.img")).arg(&image));
    let name = format!("xenod-it-disk-{}", std::process::id());
    let mut s = spec(&fixture, &name);
    s.root = RootMode::Disk;
    s.disk_image = Some("disk/root.img".into());
    let model = DomainModel::from_spec(&s, &tree, tmp.path().join("console.log")).unwrap();
    let port = model.network.forwards()[0].host;

    let t0 = Instant::now();
    hv.deploy(&model).unwrap();
    let guest = Guest { hv: &hv, name: name.clone(), console: hv.console_log(&name).unwrap() };
    let started = t0.elapsed();
    let answered = guest.wait_http(port, t0);
    guest.expect_page(port, 1);
    eprintln!("disk root: define+start {started:?}, boot to HTTP answer {answered:?} (127.0.0.1:{port})");
    guest.expect_page(port, 2);

    // The same name again is refused, and leaves the running guest alone.
    assert!(matches!(hv.deploy(&model), Err(Error::NameInUse { .. })));

    let state = tmp.path().join("state/disk.save");
    let t = Instant::now();
    hv.save(&name, &state).unwrap();
    let saved = t.elapsed();
    assert_eq!(hv.state(&name).unwrap(), DomainState::ShutOff);
    let size = std::fs::metadata(&state).unwrap().len();

    let t = Instant::now();
    assert_eq!(hv.restore(&state).unwrap(), name);
    let restored = t.elapsed();
    // No console line after a restore: the guest is already up.
    wait_http(&hv, &name, port, "/xenod-probe", BOOT_TIMEOUT).unwrap();
    guest.expect_page(port, 3);
    eprintln!(
        "disk root: save {saved:?} ({} MiB state), restore {restored:?}, restore to HTTP answer {:?}",
        size >> 20,
        t.elapsed()
    );

    assert_eq!(
        hv.stop(&name, STOP_GRACE).unwrap(),
        StopOutcome::Graceful,
        "console:\n{}",
        console_tail(&guest.console, 25)
    );
    drop(guest);
    // The guest synced and unmounted: the image holds the counter.
    if on_path("debugfs") {
        let out = Command::new("debugfs").args(["-R", "cat /var/lib/web/counter"]).arg(&image).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");
    }
}

/// The live-migration hooks through [`LiveMigration`], as xenod's move of a
/// guest uses them: a live save of a running disk guest, its XML retargeted
/// to another name and directory, a guest staged there and the save image
/// streamed into it through [`StagedGuest::state`]; its counter goes on.
#[test]
fn disk_root_moves_through_a_live_save_and_a_staged_guest() {
    let Some(fixture) = fixture() else { return };
    let hv = qemu();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::create_dir_all(a.path().join("root/disk")).unwrap();
    let image = a.path().join("root/disk/root.img");
    run(Command::new("cp").arg("--sparse=always").arg(fixture.join("disk/root.img")).arg(&image));
    let name = format!("xenod-it-live-{}", std::process::id());
    let mut s = spec(&fixture, &name);
    s.root = RootMode::Disk;
    s.disk_image = Some("disk/root.img".into());
    let model = DomainModel::from_spec(&s, &a.path().join("root"), a.path().join("console.log")).unwrap();
    let port = model.network.forwards()[0].host;
    hv.deploy(&model).unwrap();
    let guest = Guest { hv: &hv, name: name.clone(), console: hv.console_log(&name).unwrap() };
    guest.wait_http(port, Instant::now());
    guest.expect_page(port, 1);

    fn save<H: LiveMigration>(hv: &H, name: &str, file: &Path) -> (String, Duration) {
        let xml = hv.migratable_xml(name).unwrap();
        let down = hv.save_live(name, file, false).unwrap();
        assert_eq!(hv.state(name).unwrap(), DomainState::Paused);
        hv.kill(name).unwrap();
        (xml, down)
    }
    let state = a.path().join("live.save");
    let (xml, down) = save(&hv, &name, &state);
    assert!(down > Duration::ZERO);
    assert_eq!(hv.state(&name).unwrap(), DomainState::ShutOff);
    // The disk as the guest left it, where the moved guest finds it.
    std::fs::create_dir_all(b.path().join("root/disk")).unwrap();
    run(Command::new("cp").arg("--sparse=always").arg(&image).arg(b.path().join("root/disk/root.img")));

    fn load<H: LiveMigration>(hv: &H, xml: &str, file: &Path) -> Duration {
        assert!(hv.can_stage());
        let mut q = hv.stage_incoming(xml).unwrap();
        assert_eq!(hv.state(q.name()).unwrap(), DomainState::Paused);
        std::io::copy(&mut std::fs::File::open(file).unwrap(), &mut q.state()).unwrap();
        hv.finish_incoming(q).unwrap()
    }
    let moved = format!("{name}-b");
    let paths = [(format!("{}/", a.path().display()), format!("{}/", b.path().display()))];
    let xml = xenod_deployer::retarget_xml(&xml, &moved, &xenod_deployer::random_uuid(), &paths, &[]).unwrap();
    let moved_guest = Guest { hv: &hv, name: moved.clone(), console: b.path().join("console.log") };
    let loaded = load(&hv, &xml, &state);
    assert_eq!(hv.state(&moved).unwrap(), DomainState::Running);
    assert_eq!(hv.status(&moved).unwrap().meta.root_path, b.path().join("root/disk/root.img"));
    // The same instance (its name is in its kernel arguments), counting on.
    let (code, body) = http_get(port, "/", Duration::from_secs(30)).unwrap_or_else(|e| moved_guest.die(e));
    assert_eq!(code, 200, "{body}");
    assert!(body.lines().any(|l| l == format!("instance={name}")) && body.lines().any(|l| l == "counter=2"), "{body}");
    eprintln!("live save: guest stopped {down:?}; staged load {loaded:?}");
    drop(guest);
    assert_eq!(hv.stop(&moved, STOP_GRACE).unwrap(), StopOutcome::Graceful);
}

#[test]
fn taken_port_fails_the_deploy_and_leaves_no_domain() {
    let Some(fixture) = fixture() else { return };
    let hv = qemu();
    let tmp = tempfile::tempdir().unwrap();
    let name = format!("xenod-it-port-{}", std::process::id());
    let model = DomainModel::from_spec(&spec(&fixture, &name), tmp.path(), tmp.path().join("console.log")).unwrap();
    let port = model.network.forwards()[0].host;
    // Taken after the model chose it, before the guest starts.
    let _busy = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    match hv.deploy(&model) {
        Err(e @ Error::PortTaken { .. }) => assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}"),
        other => panic!("want PortTaken, got {other:?}"),
    }
    assert!(matches!(hv.status(&name), Err(Error::NoSuchDomain { .. })));
}
