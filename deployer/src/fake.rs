//! [`FakeHypervisor`]: [`Hypervisor`] and [`LiveMigration`] in memory, for
//! tests of code above the deployer (cargo feature `fake`). No libvirt, no
//! guest: domains are entries in a map whose states follow libvirt's (QEMU
//! driver's) rules, and a test can make any call fail.
//!
//! ```text
//! let hv = FakeHypervisor::with_running("web-1");   // a deployed, running guest
//! hv.fail("save_live");                             // its next live save fails, once
//! code_under_test(&hv)?;
//! assert_eq!(hv.state_of("web-1"), Some(DomainState::Running));
//! assert_eq!(hv.calls(), ["save_live web-1", "resume web-1"]);
//! ```
//!
//! What it does to files: [`Hypervisor::save`] and
//! [`LiveMigration::save_live`] write a small save image at `state_file`
//! (a real libvirt save image head with the domain's XML, so
//! [`crate::retarget`], [`crate::head_xml`] and [`crate::StreamOnly`] take
//! it, then a few bytes that stand for QEMU's stream);
//! [`Hypervisor::restore`] and [`LiveMigration::finish_incoming`] take
//! only such files (or streams). A domain's console log (from its model)
//! is created empty by `define` and gets [`GUEST_READY_LINE`] at each
//! `start`, so that [`crate::wait_console`] works, but only where the
//! log's directory exists: the models of [`FakeHypervisor::model`] point
//! to a directory that does not, and nothing is written for them.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::hypervisor::{DomainState, DomainStatus, Hypervisor};
use crate::libvirt::xml_name;
use crate::live::{LiveMigration, StagedGuest};
use crate::model::{DomainMeta, DomainModel, Network, Root};
use crate::ready::GUEST_READY_LINE;
use crate::saveimage::{StreamOnly, head_len, head_xml, image_head, random_uuid};
use crate::spec::RootMode;
use crate::xml::{META_NS, Target, domain_xml, parse_meta};

/// The operations whose failure a test can inject, by method name.
pub const OPS: &[&str] = &[
    "define",
    "start",
    "shutdown",
    "kill",
    "undefine",
    "suspend",
    "resume",
    "save",
    "restore",
    "list",
    "status",
    "save_live",
    "migratable_xml",
    "stage_incoming",
    "finish_incoming",
];

/// What stands for QEMU's migration stream in the fake's save images,
/// followed by the name of the domain that was saved and a newline.
const STREAM_MAGIC: &[u8] = b"QEVM\0\0\0\x03xenod-fake-state\n";

/// An in-memory hypervisor. `Send + Sync`; a clone shares the domains,
/// the call log, the failures to inject and the settings (so a test can
/// hand one to the code under test and look through the other).
#[derive(Clone)]
pub struct FakeHypervisor {
    inner: Arc<Mutex<Inner>>,
    target: Target,
}

#[derive(Default)]
struct Inner {
    domains: BTreeMap<String, Dom>,
    calls: Vec<String>,
    /// Failures for the next calls of an op, oldest first; `None`: the
    /// generic injected error.
    once: Vec<(&'static str, Option<Error>)>,
    always: Vec<&'static str>,
    can_stage: bool,
    ignores_shutdown: bool,
    next_stage: u64,
}

struct Dom {
    state: DomainState,
    meta: DomainMeta,
    /// Its XML as `migratable_xml` and a save image give it.
    xml: String,
    /// Defined (survives a stop), or transient (gone when it stops).
    persistent: bool,
    /// Started by `stage_incoming`, waiting for its state (the id of that
    /// [`FakeIncoming`]).
    staged: Option<u64>,
}

impl Default for FakeHypervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for FakeHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.lock().domains.keys().cloned().collect();
        f.debug_struct("FakeHypervisor").field("target", &self.target).field("domains", &names).finish()
    }
}

impl FakeHypervisor {
    /// What [`LiveMigration::save_live`] reports as the time the guest was
    /// stopped, and [`LiveMigration::finish_incoming`] as the load's.
    pub const DOWNTIME: Duration = Duration::from_millis(5);

    /// No domains; target [`Target::Qemu`] (so XML as for QEMU, staging
    /// possible, fs-root guests not saved).
    pub fn new() -> Self {
        Self::with_target(Target::Qemu)
    }

    /// No domains, for `target`: the XML flavour, and the rules that
    /// depend on it as [`crate::Libvirt`] applies them (fs-root guests are
    /// saved only on [`Target::Test`]; live saves and staging only on
    /// QEMU/KVM, though [`FakeHypervisor::set_can_stage`] overrides the latter).
    pub fn with_target(target: Target) -> Self {
        let can_stage = matches!(target, Target::Kvm | Target::Qemu);
        FakeHypervisor { inner: Arc::new(Mutex::new(Inner { can_stage, ..Inner::default() })), target }
    }

    /// [`FakeHypervisor::new`] with one running guest `name`
    /// ([`FakeHypervisor::model`]), as after a deploy; not in the call log.
    pub fn with_running(name: &str) -> Self {
        let hv = Self::new();
        // The default model renders for every target (no network, disk root).
        hv.add(&Self::model(name), DomainState::Running).expect("the fake's default model renders");
        hv
    }

    /// A disk-root guest `name` with no network, 256 MiB, 1 vCPU, its
    /// paths under `/nonexistent/xenod-fake` (never touched).
    pub fn model(name: &str) -> DomainModel {
        let dir = PathBuf::from("/nonexistent/xenod-fake");
        DomainModel {
            name: name.into(),
            instance: name.into(),
            memory_mib: 256,
            vcpus: 1,
            kernel: dir.join("vmlinux"),
            initrd: None,
            extra_cmdline: String::new(),
            root: Root::Disk { image: dir.join(name).join("root.img") },
            network: Network::None,
            console_log: dir.join(format!("{name}.console")),
            limits: Default::default(),
            nics: Vec::new(),
        }
    }

    /// Puts domain `model` in `state` directly (defined, replacing one of
    /// that name): no call logged, no failure injected, no file touched.
    /// Errors only where the model renders to no XML for the target.
    pub fn add(&self, model: &DomainModel, state: DomainState) -> Result<()> {
        let dom = self.new_dom(model, state)?;
        self.lock().domains.insert(model.name.clone(), dom);
        Ok(())
    }

    // ---- failure injection --------------------------------------------

    /// The next call of `op` (a method name of [`OPS`]: `"start"`,
    /// `"save_live"`, ...) fails, once, with [`Error::Fake`] naming it and
    /// the domain; the call changes nothing. Calls stack: `fail("start")`
    /// twice fails the next two starts. Panics on an unknown name (a typo
    /// would otherwise inject nothing).
    pub fn fail(&self, op: &'static str) {
        check_op(op);
        self.lock().once.push((op, None));
    }

    /// The next call of `op` fails, once, with `error` (e.g. an
    /// [`Error::PortTaken`] for `"start"`); the call changes nothing.
    pub fn fail_with(&self, op: &'static str, error: Error) {
        check_op(op);
        self.lock().once.push((op, Some(error)));
    }

    /// Every call of `op` fails (after any pending [`FakeHypervisor::fail`]s),
    /// until [`FakeHypervisor::clear_failures`].
    pub fn fail_always(&self, op: &'static str) {
        check_op(op);
        let mut g = self.lock();
        if !g.always.contains(&op) {
            g.always.push(op);
        }
    }

    /// No more injected failures.
    pub fn clear_failures(&self) {
        let mut g = self.lock();
        g.once.clear();
        g.always.clear();
    }

    // ---- settings -----------------------------------------------------

    /// Whether [`LiveMigration::can_stage`] holds (and staging works).
    pub fn set_can_stage(&self, can: bool) {
        self.lock().can_stage = can;
    }

    /// A guest that ignores [`Hypervisor::shutdown`] (keeps running), so
    /// that [`Hypervisor::stop`] has to kill it. By default a running guest
    /// powers off at once when asked.
    pub fn set_ignores_shutdown(&self, ignores: bool) {
        self.lock().ignores_shutdown = ignores;
    }

    /// Sets `name`'s state as if the guest did it (crashed, powered itself
    /// off, ...); a transient domain that is no longer active is gone, as
    /// in libvirt. False if there is no such domain.
    pub fn set_state(&self, name: &str, state: DomainState) -> bool {
        let mut g = self.lock();
        let Some(d) = g.domains.get_mut(name) else { return false };
        d.state = state;
        if !state.is_active() && !d.persistent {
            g.domains.remove(name);
        }
        true
    }

    // ---- inspection ---------------------------------------------------

    /// `name`'s state; `None` if there is no such domain.
    pub fn state_of(&self, name: &str) -> Option<DomainState> {
        self.lock().domains.get(name).map(|d| d.state)
    }

    /// Whether `name` exists and runs (not paused, not staged).
    pub fn is_running(&self, name: &str) -> bool {
        self.state_of(name) == Some(DomainState::Running)
    }

    /// Whether `name` is defined (persistent); `None` if there is no such
    /// domain. Staged guests, and running ones undefined, are transient.
    pub fn is_persistent(&self, name: &str) -> Option<bool> {
        self.lock().domains.get(name).map(|d| d.persistent)
    }

    /// Whether `name` was staged and waits for its state.
    pub fn is_staged(&self, name: &str) -> bool {
        self.lock().domains.get(name).is_some_and(|d| d.staged.is_some())
    }

    /// The names of all domains, sorted.
    pub fn names(&self) -> Vec<String> {
        self.lock().domains.keys().cloned().collect()
    }

    /// Every call that acts on a domain, in order, failed ones included:
    /// `"{method} {domain}"` (`define`, `start`, `shutdown`, `kill`,
    /// `undefine`, `suspend`, `resume`, `save`, `save_live`,
    /// `migratable_xml`, `stage_incoming`, `finish_incoming`), and
    /// `"restore {state file}"`. Queries (`list`, `status` and what is
    /// built on it: `state`, `console_log`) are not logged; provided
    /// methods show as the calls they make (`deploy`: `define`, `start`).
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Empties the call log.
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    // ---- internals ----------------------------------------------------

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test that panicked while holding it left consistent data.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Logs the call (if `log`), and fails it if a failure is injected.
    fn call(&self, op: &'static str, subject: &str, log: bool) -> Result<MutexGuard<'_, Inner>> {
        let mut g = self.lock();
        if log {
            g.calls.push(format!("{op} {subject}"));
        }
        let injected = match g.once.iter().position(|(o, _)| *o == op) {
            Some(i) => Some(g.once.remove(i).1),
            None => g.always.contains(&op).then_some(None),
        };
        match injected {
            None => Ok(g),
            Some(Some(e)) => Err(e),
            Some(None) => Err(Error::Fake { op, name: subject.into(), reason: "injected failure".into() }),
        }
    }

    fn new_dom(&self, model: &DomainModel, state: DomainState) -> Result<Dom> {
        let xml = domain_xml(model, self.target)?;
        // libvirt gives every domain a UUID (and retarget_xml needs one).
        let xml = xml.replacen("</name>", &format!("</name><uuid>{}</uuid>", random_uuid()), 1);
        Ok(Dom { state, meta: model.meta(self.target.console_log(model)), xml, persistent: true, staged: None })
    }
}

/// Panics unless `op` is one of [`OPS`].
fn check_op(op: &str) {
    assert!(OPS.contains(&op), "FakeHypervisor: no operation {op:?} to fail; known: {OPS:?}");
}

/// A call libvirt would refuse in the domain's state.
fn refuse(op: &'static str, name: &str, reason: &str) -> Error {
    Error::Fake { op, name: name.into(), reason: reason.into() }
}

fn domain<'a>(g: &'a mut Inner, name: &str) -> Result<&'a mut Dom> {
    g.domains.get_mut(name).ok_or_else(|| Error::NoSuchDomain { name: name.into() })
}

/// The guest's process ends: shut off, or gone if transient.
fn power_off(g: &mut Inner, name: &str) {
    match g.domains.get_mut(name) {
        Some(d) if d.persistent => {
            d.state = DomainState::ShutOff;
            d.staged = None;
        }
        Some(_) => {
            g.domains.remove(name);
        }
        None => {}
    }
}

/// Refuses calls that need a live guest process, and ones on a guest that
/// still waits for its state.
fn check_live(op: &'static str, name: &str, d: &Dom) -> Result<()> {
    if !d.state.is_active() {
        return Err(refuse(op, name, "domain is not running"));
    }
    if d.staged.is_some() {
        return Err(refuse(op, name, "domain is waiting for its saved state (finish_incoming runs it)"));
    }
    Ok(())
}

/// xenod's metadata in a domain XML.
fn meta_in(xml: &str) -> Option<DomainMeta> {
    let at = xml.find(META_NS)?;
    let start = xml[..at].rfind('<')?;
    let end = xml[at..].find("</").map(|e| at + e)?;
    let close = xml[end..].find('>').map(|e| end + e + 1)?;
    parse_meta(&xml[start..close])
}

/// Writes the fake's save image of domain `name` (XML `xml`).
fn write_image(state_file: &Path, name: &str, xml: &str) -> Result<()> {
    let mut f = std::fs::File::create(state_file).map_err(Error::io("create state file", state_file))?;
    let mut b = image_head(xml);
    b.extend_from_slice(STREAM_MAGIC);
    b.extend_from_slice(name.as_bytes());
    b.push(b'\n');
    f.write_all(&b).map_err(Error::io("write state file", state_file))
}

/// Appends `line` to a console log whose directory exists.
fn console_line(log: Option<&Path>, line: &str) {
    if let Some(log) = log.filter(|l| l.parent().is_some_and(Path::is_dir))
        && let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log)
    {
        let _ = writeln!(f, "{line}");
    }
}

impl Hypervisor for FakeHypervisor {
    fn uri(&self) -> &str {
        "fake:///default"
    }

    fn target(&self) -> Target {
        self.target
    }

    fn define(&self, model: &DomainModel) -> Result<()> {
        let mut g = self.call("define", &model.name, true)?;
        let dom = self.new_dom(model, DomainState::ShutOff)?;
        if g.domains.contains_key(&model.name) {
            return Err(Error::NameInUse { name: model.name.clone() });
        }
        // As virtlogd's log under libvirt: a new domain starts with an empty one.
        if let Some(log) = dom.meta.console_log.as_deref().filter(|l| l.parent().is_some_and(Path::is_dir)) {
            std::fs::File::create(log).map_err(Error::io("create console log", log))?;
        }
        g.domains.insert(model.name.clone(), dom);
        Ok(())
    }

    fn start(&self, name: &str) -> Result<()> {
        let mut g = self.call("start", name, true)?;
        let d = domain(&mut g, name)?;
        if d.state.is_active() {
            return Err(refuse("start", name, "domain is already running"));
        }
        d.state = DomainState::Running;
        console_line(d.meta.console_log.as_deref(), GUEST_READY_LINE);
        Ok(())
    }

    fn shutdown(&self, name: &str) -> Result<()> {
        let mut g = self.call("shutdown", name, true)?;
        let ignores = g.ignores_shutdown;
        let d = domain(&mut g, name)?;
        if !d.state.is_active() {
            return Err(refuse("shutdown", name, "domain is not running"));
        }
        // A paused (or staged) guest cannot act on the request.
        if d.state != DomainState::Paused && d.staged.is_none() && !ignores {
            power_off(&mut g, name);
        }
        Ok(())
    }

    fn kill(&self, name: &str) -> Result<()> {
        let mut g = self.call("kill", name, true)?;
        if domain(&mut g, name)?.state.is_active() {
            power_off(&mut g, name);
        }
        Ok(())
    }

    fn undefine(&self, name: &str) -> Result<()> {
        let mut g = self.call("undefine", name, true)?;
        let d = domain(&mut g, name)?;
        if d.state.is_active() {
            // libvirt: a running domain undefined runs on, transient.
            d.persistent = false;
        } else {
            g.domains.remove(name);
        }
        Ok(())
    }

    fn suspend(&self, name: &str) -> Result<()> {
        let mut g = self.call("suspend", name, true)?;
        let d = domain(&mut g, name)?;
        check_live("suspend", name, d)?;
        if d.state == DomainState::PmSuspended {
            return Err(refuse("suspend", name, "domain is pmsuspended"));
        }
        // Pausing a paused guest is a no-op (QEMU driver).
        d.state = DomainState::Paused;
        Ok(())
    }

    fn resume(&self, name: &str) -> Result<()> {
        let mut g = self.call("resume", name, true)?;
        let d = domain(&mut g, name)?;
        check_live("resume", name, d)?;
        match d.state {
            DomainState::PmSuspended => Err(refuse("resume", name, "domain is pmsuspended")),
            DomainState::Paused => {
                d.state = DomainState::Running;
                Ok(())
            }
            // Resuming a running guest is a no-op (QEMU driver).
            _ => Ok(()),
        }
    }

    fn save(&self, name: &str, state_file: &Path) -> Result<()> {
        let mut g = self.call("save", name, true)?;
        let d = domain(&mut g, name)?;
        if d.meta.root == RootMode::Fs && !self.target.can_save_shared_fs() {
            return Err(Error::Unsupported {
                op: "save",
                reason: format!("{name:?} has its root shared over a filesystem, and QEMU cannot save such a guest"),
            });
        }
        check_live("save", name, d)?;
        if let Some(dir) = state_file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(Error::io("create state directory", dir))?;
        }
        write_image(state_file, name, &d.xml)?;
        power_off(&mut g, name);
        Ok(())
    }

    fn restore(&self, state_file: &Path) -> Result<String> {
        let file = state_file.display().to_string();
        let mut g = self.call("restore", &file, true)?;
        let bytes = std::fs::read(state_file).map_err(Error::io("read state file", state_file))?;
        let not_ours = |why: String| refuse("restore", &file, &why);
        let head = head_len(&bytes).map_err(|why| not_ours(format!("not a save image: {why}")))?;
        let xml = head_xml(&bytes).map_err(|why| not_ours(format!("not a save image: {why}")))?;
        if !bytes.get(head..).is_some_and(|s| s.starts_with(STREAM_MAGIC)) {
            return Err(not_ours("holds no state the fake hypervisor wrote".into()));
        }
        let name = xml_name(&xml)
            .ok_or_else(|| Error::Unsupported { op: "restore", reason: format!("{file}: saved XML has no <name>") })?;
        let meta = meta_in(&xml).ok_or_else(|| Error::NotManaged { name: name.clone() })?;
        if g.domains.get(&name).is_some_and(|d| d.state.is_active()) {
            return Err(Error::NameInUse { name });
        }
        let dom = Dom { state: DomainState::Running, meta, xml, persistent: true, staged: None };
        g.domains.insert(name.clone(), dom);
        Ok(name)
    }

    fn list(&self) -> Result<Vec<DomainStatus>> {
        let g = self.call("list", "", false)?;
        Ok(g.domains
            .iter()
            .map(|(name, d)| DomainStatus { name: name.clone(), state: d.state, meta: d.meta.clone() })
            .collect())
    }

    fn status(&self, name: &str) -> Result<DomainStatus> {
        let mut g = self.call("status", name, false)?;
        let d = domain(&mut g, name)?;
        Ok(DomainStatus { name: name.into(), state: d.state, meta: d.meta.clone() })
    }
}

impl LiveMigration for FakeHypervisor {
    type Incoming = FakeIncoming;

    /// Writes the fake's save image of `name` (no parent directories
    /// made, as [`crate::Libvirt`]'s) and leaves the guest paused; returns
    /// [`FakeHypervisor::DOWNTIME`]. [`Error::Unsupported`] for fs-root
    /// guests and targets other than QEMU/KVM, as libvirt's.
    fn save_live(&self, name: &str, state_file: &Path, paused: bool) -> Result<Duration> {
        let _ = paused;
        let mut g = self.call("save_live", name, true)?;
        let d = domain(&mut g, name)?;
        if !matches!(self.target, Target::Kvm | Target::Qemu) || d.meta.root == RootMode::Fs {
            return Err(Error::Unsupported {
                op: "live save",
                reason: format!("{name:?}: only disk-root guests of QEMU/KVM are saved live"),
            });
        }
        check_live("save_live", name, d)?;
        write_image(state_file, name, &d.xml)?;
        d.state = DomainState::Paused;
        Ok(Self::DOWNTIME)
    }

    fn migratable_xml(&self, name: &str) -> Result<String> {
        let mut g = self.call("migratable_xml", name, true)?;
        Ok(domain(&mut g, name)?.xml.clone())
    }

    fn can_stage(&self) -> bool {
        self.lock().can_stage
    }

    /// A transient domain, paused, waiting for a stream the fake wrote
    /// (through [`StagedGuest::state`]).
    fn stage_incoming(&self, xml: &str) -> Result<FakeIncoming> {
        let name = xml_name(xml);
        let mut g = self.call("stage_incoming", name.as_deref().unwrap_or("?"), true)?;
        let name =
            name.ok_or_else(|| Error::Unsupported { op: "stage", reason: "the domain XML has no <name>".into() })?;
        if !g.can_stage {
            return Err(Error::Unsupported {
                op: "stage",
                reason: format!("{name:?}: this fake hypervisor does not stage (set_can_stage)"),
            });
        }
        let meta = meta_in(xml).ok_or_else(|| Error::NotManaged { name: name.clone() })?;
        if g.domains.contains_key(&name) {
            return Err(Error::NameInUse { name });
        }
        g.next_stage += 1;
        let id = g.next_stage;
        let dom = Dom { state: DomainState::Paused, meta, xml: xml.to_owned(), persistent: false, staged: Some(id) };
        g.domains.insert(name.clone(), dom);
        Ok(FakeIncoming { name, id, hv: Arc::clone(&self.inner), stream: Vec::new(), finished: false })
    }

    /// Runs the staged guest if what was written through
    /// [`StagedGuest::state`] is a state the fake wrote, and defines it;
    /// returns [`FakeHypervisor::DOWNTIME`]. On failure (injected, or an
    /// empty or foreign stream) the domain is gone, as with QEMU.
    fn finish_incoming(&self, mut staged: FakeIncoming) -> Result<Duration> {
        let r = (|| {
            let name = staged.name.as_str();
            let mut g = self.call("finish_incoming", name, true)?;
            if !Arc::ptr_eq(&staged.hv, &self.inner) {
                return Err(refuse("finish_incoming", name, "staged on another fake hypervisor"));
            }
            let d = domain(&mut g, name)?;
            if d.staged != Some(staged.id) {
                return Err(refuse("finish_incoming", name, "no longer waits for its state"));
            }
            if !staged.stream.starts_with(STREAM_MAGIC) {
                let why = if staged.stream.is_empty() { "no state was written" } else { "not a state the fake wrote" };
                return Err(refuse("finish_incoming", name, &format!("the guest could not load its state: {why}")));
            }
            d.state = DomainState::Running;
            d.persistent = true;
            d.staged = None;
            Ok(Self::DOWNTIME)
        })();
        // Unfinished, the guest goes when `staged` is dropped (after the
        // lock above is released).
        staged.finished = r.is_ok();
        r
    }
}

/// A guest of [`FakeHypervisor`] waiting for its state
/// ([`LiveMigration::stage_incoming`]); dropped unfinished, the domain is
/// gone.
pub struct FakeIncoming {
    name: String,
    id: u64,
    hv: Arc<Mutex<Inner>>,
    /// What came through `state()`, save image head dropped.
    stream: Vec<u8>,
    finished: bool,
}

impl std::fmt::Debug for FakeIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeIncoming").field("name", &self.name).field("received", &self.stream.len()).finish()
    }
}

impl StagedGuest for FakeIncoming {
    fn name(&self) -> &str {
        &self.name
    }

    /// Takes a whole save image as [`crate::Libvirt`]'s does (header and
    /// XML block dropped; `InvalidData` if it does not start as one).
    fn state(&mut self) -> impl std::io::Write + '_ {
        StreamOnly::new(&mut self.stream)
    }
}

impl Drop for FakeIncoming {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut g = self.hv.lock().unwrap_or_else(|e| e.into_inner());
        if g.domains.get(&self.name).is_some_and(|d| d.staged == Some(self.id)) {
            g.domains.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::StopOutcome;
    use crate::spec::{FsShare, PortForward};
    use std::io::Write;

    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>() {}

    #[test]
    fn is_send_and_sync_and_its_staged_guests_send() {
        assert_send_sync::<FakeHypervisor>();
        assert_send::<FakeIncoming>();
    }

    #[test]
    fn lifecycle_follows_libvirt() {
        let t = tempfile::tempdir().unwrap();
        let hv = FakeHypervisor::new();
        let m = FakeHypervisor::model("a");
        hv.define(&m).unwrap();
        assert!(matches!(hv.define(&m), Err(Error::NameInUse { .. })));
        assert_eq!(hv.state("a").unwrap(), DomainState::ShutOff);
        assert!(matches!(hv.suspend("a"), Err(Error::Fake { op: "suspend", .. })));
        assert!(matches!(hv.shutdown("a"), Err(Error::Fake { op: "shutdown", .. })));
        hv.kill("a").unwrap(); // a no-op when stopped

        hv.start("a").unwrap();
        assert!(hv.is_running("a"));
        let e = hv.start("a").unwrap_err();
        assert!(e.to_string().contains("already running"), "{e}");
        hv.suspend("a").unwrap();
        hv.suspend("a").unwrap();
        assert_eq!(hv.state_of("a"), Some(DomainState::Paused));
        hv.resume("a").unwrap();
        hv.resume("a").unwrap();
        assert!(hv.is_running("a"));

        let state = t.path().join("s/a.save");
        hv.save("a", &state).unwrap();
        assert!(state.is_file());
        assert_eq!(hv.state_of("a"), Some(DomainState::ShutOff));
        assert!(matches!(hv.save("a", &state), Err(Error::Fake { op: "save", .. })));
        assert_eq!(hv.restore(&state).unwrap(), "a");
        assert!(hv.is_running("a"));
        assert!(matches!(hv.restore(&state), Err(Error::NameInUse { .. })));

        assert_eq!(hv.stop("a", Duration::from_secs(1)).unwrap(), StopOutcome::Graceful);
        assert_eq!(hv.stop("a", Duration::from_secs(1)).unwrap(), StopOutcome::AlreadyStopped);
        hv.start("a").unwrap();
        hv.suspend("a").unwrap();
        assert_eq!(hv.stop("a", Duration::from_secs(1)).unwrap(), StopOutcome::Forced);
        hv.start("a").unwrap();
        hv.set_ignores_shutdown(true);
        assert_eq!(hv.stop("a", Duration::from_millis(100)).unwrap(), StopOutcome::Forced);

        // A running domain undefined runs on, transient, until it stops.
        hv.start("a").unwrap();
        hv.undefine("a").unwrap();
        assert_eq!((hv.is_running("a"), hv.is_persistent("a")), (true, Some(false)));
        hv.kill("a").unwrap();
        assert_eq!(hv.state_of("a"), None);
        assert!(matches!(hv.status("a"), Err(Error::NoSuchDomain { .. })));
        assert!(matches!(hv.restore(&t.path().join("missing")), Err(Error::Io { .. })));
        std::fs::write(t.path().join("junk"), b"not a save image").unwrap();
        assert!(matches!(hv.restore(&t.path().join("junk")), Err(Error::Fake { op: "restore", .. })));

        assert_eq!(
            hv.calls()[..11],
            [
                "define a",
                "define a",
                "suspend a",
                "shutdown a",
                "kill a",
                "start a",
                "start a",
                "suspend a",
                "suspend a",
                "resume a",
                "resume a",
            ]
        );
        assert!(hv.calls().contains(&format!("restore {}", state.display())));
        hv.clear_calls();
        assert!(hv.calls().is_empty());
    }

    #[test]
    fn deploy_list_destroy_and_the_console() {
        let t = tempfile::tempdir().unwrap();
        let hv = FakeHypervisor::new();
        let mut m = FakeHypervisor::model("web");
        m.console_log = t.path().join("web.console");
        hv.deploy(&m).unwrap();
        assert_eq!(hv.calls(), ["define web", "start web"]);
        assert_eq!(hv.console_log("web").unwrap(), t.path().join("web.console"));
        crate::wait_console(&hv, "web", GUEST_READY_LINE, Duration::from_secs(1)).unwrap();
        let list = hv.list().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(
            (list[0].name.as_str(), list[0].state, list[0].meta.root),
            ("web", DomainState::Running, RootMode::Disk)
        );
        hv.destroy("web").unwrap();
        assert!(hv.list().unwrap().is_empty());

        // An fs-root guest is not saved on QEMU, is on the test target.
        let mut fs = FakeHypervisor::model("fs");
        fs.root = Root::Tree { dir: t.path().into(), share: FsShare::NineP };
        hv.deploy(&fs).unwrap();
        assert!(matches!(hv.save("fs", &t.path().join("fs.save")), Err(Error::Unsupported { .. })));
        assert!(matches!(hv.save_live("fs", &t.path().join("fs.save"), false), Err(Error::Unsupported { .. })));
        let test = FakeHypervisor::with_target(Target::Test);
        test.deploy(&fs).unwrap();
        test.save("fs", &t.path().join("fs.save")).unwrap();
        assert!(!test.can_stage());
        assert!(matches!(test.save_live("fs", &t.path().join("x"), false), Err(Error::Unsupported { .. })));
    }

    #[test]
    fn injected_failures_fire_once_or_always_and_change_nothing() {
        let t = tempfile::tempdir().unwrap();
        let hv = FakeHypervisor::with_running("g");
        assert!(hv.calls().is_empty());
        hv.fail("save_live");
        let e = hv.save_live("g", &t.path().join("s"), false).unwrap_err();
        assert!(matches!(e, Error::Fake { op: "save_live", ref name, .. } if name == "g"));
        assert!(e.to_string().contains("save_live") && e.to_string().contains("injected"), "{e}");
        assert!(hv.is_running("g") && !t.path().join("s").exists());
        hv.save_live("g", &t.path().join("s"), false).unwrap();
        assert_eq!(hv.state_of("g"), Some(DomainState::Paused));

        hv.fail_with("resume", Error::PortTaken { port: 1, source: None });
        assert!(matches!(hv.resume("g"), Err(Error::PortTaken { port: 1, .. })));
        hv.fail_always("resume");
        hv.fail("resume");
        for _ in 0..3 {
            assert!(matches!(hv.resume("g"), Err(Error::Fake { op: "resume", .. })));
        }
        hv.clear_failures();
        hv.resume("g").unwrap();
        assert!(hv.is_running("g"));

        // A failed start undoes the deploy.
        hv.fail("start");
        assert!(hv.deploy(&FakeHypervisor::model("h")).is_err());
        assert_eq!(hv.state_of("h"), None);
        hv.fail("status");
        assert!(hv.status("g").is_err());
        assert!(hv.status("g").is_ok());
        assert_eq!(
            hv.calls(),
            [
                "save_live g",
                "save_live g",
                "resume g",
                "resume g",
                "resume g",
                "resume g",
                "resume g",
                "define h",
                "start h",
                "undefine h",
            ]
        );
    }

    #[test]
    #[should_panic(expected = "no operation")]
    fn failing_an_unknown_op_is_a_test_bug() {
        FakeHypervisor::new().fail("save-live");
    }

    /// Both ends of a migration through the trait, as code above the
    /// deployer would write it.
    fn migrate<H: LiveMigration>(from: &H, to: &H, name: &str, new_name: &str, file: &Path) -> Result<Duration> {
        let xml = crate::retarget_xml(&from.migratable_xml(name)?, new_name, &random_uuid(), &[], &[])
            .map_err(|e| Error::Unsupported { op: "retarget", reason: e.to_string() })?;
        let mut q = to.stage_incoming(&xml)?;
        let down = from.save_live(name, file, false)?;
        std::io::copy(&mut std::fs::File::open(file).unwrap(), &mut q.state()).unwrap();
        to.finish_incoming(q)?;
        from.kill(name)?;
        Ok(down)
    }

    #[test]
    fn a_guest_moves_live_between_two_fakes() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (FakeHypervisor::with_running("g"), FakeHypervisor::new());
        let mut m = FakeHypervisor::model("p");
        m.network = Network::User { forwards: vec![PortForward { host: 8080, guest: 80 }], isolated: true };
        a.add(&m, DomainState::Running).unwrap();
        assert_eq!(migrate(&a, &b, "g", "g2", &t.path().join("g")).unwrap(), FakeHypervisor::DOWNTIME);
        assert_eq!(a.state_of("g"), Some(DomainState::ShutOff));
        assert!(b.is_running("g2") && b.is_persistent("g2") == Some(true) && !b.is_staged("g2"));
        assert_eq!(b.calls(), ["stage_incoming g2", "finish_incoming g2"]);
        assert_eq!(a.calls(), ["migratable_xml g", "save_live g", "kill g"]);

        // The saved image restores as libvirt's does, also retargeted.
        let file = t.path().join("p");
        a.save_live("p", &file, true).unwrap();
        a.kill("p").unwrap();
        crate::retarget(&file, "p2", &random_uuid(), &[], &[(8080, 9090)]).unwrap();
        assert_eq!(b.restore(&file).unwrap(), "p2");
        assert_eq!(b.status("p2").unwrap().meta.ports, [PortForward { host: 9090, guest: 80 }]);
        assert_eq!(a.restore(&file).unwrap(), "p2");
    }

    #[test]
    fn staging_rules() {
        let hv = FakeHypervisor::with_running("g");
        let xml = hv.migratable_xml("g").unwrap();
        assert!(matches!(hv.stage_incoming(&xml), Err(Error::NameInUse { .. })));
        assert!(matches!(hv.stage_incoming("<domain><name>x</name></domain>"), Err(Error::NotManaged { .. })));
        assert!(matches!(hv.stage_incoming("<domain/>"), Err(Error::Unsupported { .. })));

        let other = FakeHypervisor::new();
        let q = other.stage_incoming(&xml).unwrap();
        assert_eq!(q.name(), "g");
        assert_eq!(other.state_of("g"), Some(DomainState::Paused));
        assert!(other.is_staged("g") && other.is_persistent("g") == Some(false));
        assert!(matches!(other.resume("g"), Err(Error::Fake { op: "resume", .. })));
        assert!(matches!(other.stage_incoming(&xml), Err(Error::NameInUse { .. })));
        drop(q);
        assert_eq!(other.state_of("g"), None, "an unfinished stage leaves nothing");

        // Nothing or a foreign stream written: the load fails, the guest is gone.
        let q = other.stage_incoming(&xml).unwrap();
        let e = other.finish_incoming(q).unwrap_err();
        assert!(e.to_string().contains("no state was written"), "{e}");
        assert_eq!(other.state_of("g"), None);
        let mut q = other.stage_incoming(&xml).unwrap();
        assert!(q.state().write_all(&[0u8; 100]).is_err(), "not a save image");
        let e = other.finish_incoming(q).unwrap_err();
        assert!(e.to_string().contains("no state was written"), "{e}");

        // An injected failure also leaves nothing.
        let t = tempfile::tempdir().unwrap();
        hv.save_live("g", &t.path().join("s"), false).unwrap();
        let mut q = other.stage_incoming(&xml).unwrap();
        q.state().write_all(&std::fs::read(t.path().join("s")).unwrap()).unwrap();
        other.fail("finish_incoming");
        assert!(matches!(other.finish_incoming(q), Err(Error::Fake { op: "finish_incoming", .. })));
        assert_eq!(other.state_of("g"), None);

        // Killed while staged: gone (transient).
        let q = other.stage_incoming(&xml).unwrap();
        other.kill("g").unwrap();
        assert_eq!(other.state_of("g"), None);
        assert!(matches!(other.finish_incoming(q), Err(Error::NoSuchDomain { .. })));

        other.set_can_stage(false);
        assert!(!other.can_stage());
        assert!(matches!(other.stage_incoming(&xml), Err(Error::Unsupported { op: "stage", .. })));
    }

    #[test]
    fn set_state_plays_the_guest() {
        let hv = FakeHypervisor::with_running("g");
        assert!(hv.set_state("g", DomainState::Crashed));
        assert!(matches!(
            crate::wait_console(&hv, "g", GUEST_READY_LINE, Duration::from_secs(1)),
            Err(Error::GuestStopped { state: DomainState::Crashed, .. })
        ));
        hv.start("g").unwrap();
        assert!(!hv.set_state("nope", DomainState::Running));
        assert_eq!(hv.names(), ["g"]);
    }
}
