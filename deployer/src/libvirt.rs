//! [`Libvirt`]: the [`Hypervisor`] and [`LiveMigration`] over libvirt (crate `virt`), for
//! `xen:///system`, `qemu:///system` (KVM or TCG, probed) and
//! `test:///default` (in-process, no daemon; shared by every connection in
//! the process, so tests use unique names).

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::Once;

use virt::connect::Connect;
use virt::domain::{Domain, DomainState as VirState};
use virt::error::ErrorNumber;
use virt::sys;

use crate::error::{DomainXmlFault, Error, Result};
use crate::hypervisor::{DomainState, DomainStatus, Hypervisor};
use crate::live::{LiveMigration, StagedGuest};
use crate::model::{DomainModel, check_ports_free};
use crate::probe::{Accel, AccelProbe, probe_accel};
use crate::saveimage::StreamOnly;
use crate::spec::RootMode;
use crate::xml::{META_NS, Target, XenBoot, domain_xml, parse_meta};

/// Environment variable naming the libvirt URI xenod uses by default.
pub const URI_ENV: &str = "XENOD_LIBVIRT_URI";

/// The URI to use on this host: `XENOD_LIBVIRT_URI` if set, `xen:///system`
/// in a Xen control domain, `qemu:///system` otherwise.
pub fn default_uri() -> String {
    if let Ok(uri) = std::env::var(URI_ENV) {
        return uri;
    }
    let dom0 = std::fs::read_to_string("/proc/xen/capabilities").is_ok_and(|c| c.contains("control_d"));
    if dom0 { "xen:///system".into() } else { "qemu:///system".into() }
}

/// A libvirt connection and the XML flavour its domains take.
pub struct Libvirt {
    conn: Connect,
    uri: String,
    target: Target,
    accel: Option<AccelProbe>,
}

impl std::fmt::Debug for Libvirt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Libvirt").field("uri", &self.uri).field("target", &self.target).finish()
    }
}

impl Libvirt {
    /// Connects to `uri` and picks the target from its scheme: `xen` ->
    /// Xen PVH, `qemu` -> KVM or TCG as [`probe_accel`] finds, `test` -> test.
    pub fn connect(uri: &str) -> Result<Self> {
        let scheme = uri.split([':', '+']).next().unwrap_or_default();
        let (target, accel) = match scheme {
            "xen" => (Target::Xen(XenBoot::Pvh), None),
            "qemu" => {
                let probe = probe_accel();
                tracing::info!(accel = %probe.accel, reason = %probe.reason, "QEMU accelerator");
                let target = if probe.accel == Accel::Kvm { Target::Kvm } else { Target::Qemu };
                (target, Some(probe))
            }
            "test" => (Target::Test, None),
            _ => {
                return Err(Error::Unsupported {
                    op: "libvirt URI",
                    reason: format!("{uri:?}: want xen:///system, qemu:///system or test:///default"),
                });
            }
        };
        Self::connect_as(uri, target).map(|l| Libvirt { accel, ..l })
    }

    /// Connects to `uri` for an explicit target (no probing).
    pub fn connect_as(uri: &str, target: Target) -> Result<Self> {
        static QUIET: Once = Once::new();
        // libvirt prints every error to stderr by default; ours are returned.
        QUIET.call_once(virt::error::clear_error_callback);
        let conn = Connect::open(Some(uri)).map_err(|source| connect_error(uri, source))?;
        Ok(Libvirt { conn, uri: uri.to_string(), target, accel: None })
    }

    /// What the accelerator probe found (QEMU URIs from [`Libvirt::connect`]).
    pub fn accel(&self) -> Option<&AccelProbe> {
        self.accel.as_ref()
    }

    /// The XML this connection would define for `model`.
    pub fn domain_xml(&self, model: &DomainModel) -> Result<String> {
        domain_xml(model, self.target)
    }

    pub(crate) fn lookup(&self, name: &str) -> Result<Domain> {
        self.conn.lookup_domain_by_name(name).map_err(|e| {
            if e.code().is(ErrorNumber::NoDomain) {
                Error::NoSuchDomain { name: name.into() }
            } else {
                lv("lookup", name)(e)
            }
        })
    }

    /// A domain of ours, with its metadata.
    fn managed(&self, name: &str) -> Result<(Domain, DomainStatus)> {
        let dom = self.lookup(name)?;
        let status = status_of(&dom, name)?.ok_or_else(|| Error::NotManaged { name: name.into() })?;
        Ok((dom, status))
    }
}

/// [`LiveMigration::save_live`]'s save: QEMU's migration into a socket this
/// process copies to `state_file`, behind libvirt's header and the XML.
fn save_through_qemu(dom: &Domain, name: &str, state_file: &Path) -> Result<std::time::Duration> {
    use std::io::Write;
    use std::time::{Duration, Instant};
    let xml = dom
        .xml_desc(sys::VIR_DOMAIN_XML_SECURE | sys::VIR_DOMAIN_XML_MIGRATABLE)
        .map_err(lv("read the XML of", name))?;
    let mut file = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(state_file).map_err(Error::io("create state file", state_file))?,
    );
    file.write_all(&crate::saveimage::image_head(&xml)).map_err(Error::io("write state file", state_file))?;
    // A short path: socket addresses hold 108 bytes.
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let sock = std::path::PathBuf::from(format!("/run/xenod-live-{}-{n}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let listener = std::os::unix::net::UnixListener::bind(&sock).map_err(Error::io("listen on", &sock))?;
    struct Gone<'a>(&'a Path);
    impl Drop for Gone<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let _gone = Gone(&sock);
    let copier = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut stream, _) = listener.accept()?;
        let n = std::io::copy(&mut stream, &mut file)?;
        file.flush()?;
        Ok(n)
    });
    let qmp = |cmd: String| qmp(dom, name, "live save", &cmd, &[]);
    let migrated = (|| {
        qmp(
            r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":1099511627776,"downtime-limit":100}}"#
                .into(),
        )?;
        qmp(format!(r#"{{"execute":"migrate","arguments":{{"uri":"unix:{}"}}}}"#, sock.display()))?;
        const POLL: Duration = Duration::from_millis(10);
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            std::thread::sleep(POLL);
            let r = qmp(r#"{"execute":"query-migrate"}"#.into())?;
            match r["status"].as_str().unwrap_or("") {
                "completed" => {
                    return Ok((Duration::from_millis(r["downtime"].as_u64().unwrap_or(0)) + POLL, Instant::now()));
                }
                s @ ("failed" | "cancelled") => {
                    return Err(Error::Unsupported {
                        op: "live save",
                        reason: format!("{name:?}: QEMU's migration {s}: {}", r["error-desc"]),
                    });
                }
                _ if Instant::now() > deadline => {
                    let _ = qmp(r#"{"execute":"migrate_cancel"}"#.into());
                    return Err(Error::Unsupported {
                        op: "live save",
                        reason: format!("{name:?}: the memory did not converge within 10 minutes"),
                    });
                }
                _ => {}
            }
        }
    })();
    if migrated.is_err() {
        // QEMU may never have connected: let the copier's accept return.
        let _ = std::os::unix::net::UnixStream::connect(&sock);
    }
    let copied = copier.join();
    let (down, seen) = migrated?;
    match copied {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(Error::io("write state file", state_file)(e)),
        Err(_) => {
            return Err(Error::io("write state file", state_file)(std::io::Error::other("copier panicked")));
        }
    }
    Ok(down + seen.elapsed())
}

/// A domain started paused, waiting for its saved state on a socket:
/// [`Libvirt`]'s [`LiveMigration::Incoming`], from
/// [`LiveMigration::stage_incoming`].
pub struct Incoming {
    name: String,
    dom: Domain,
    sock: std::os::unix::net::UnixStream,
    /// The domain as it is defined once it runs.
    define: String,
    running: bool,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming").field("name", &self.name).finish()
    }
}

impl StagedGuest for Incoming {
    fn name(&self) -> &str {
        &self.name
    }

    /// Where the waiting QEMU reads its state: a whole save image written
    /// here reaches it as its migration stream (the image's header and XML
    /// block dropped). A write fails when QEMU stops reading (a load that
    /// failed; its log is in /var/log/libvirt/qemu), or has taken nothing
    /// for 2 minutes.
    fn state(&mut self) -> impl std::io::Write + '_ {
        StreamOnly::new(&mut self.sock)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // Unfinished, QEMU would exit at the end of its stream anyway, but
        // need not wait for it.
        if !self.running {
            let _ = self.dom.destroy();
        }
    }
}

/// The text of a domain XML's (first) `<name>`.
pub(crate) fn xml_name(xml: &str) -> Option<String> {
    xml.split_once("<name>").and_then(|(_, rest)| rest.split_once("</name>")).map(|(n, _)| n.trim().to_string())
}

/// `xml` started as [`LiveMigration::stage_incoming`] starts it: QEMU waits for
/// its state (`-incoming defer`) with the guest's memory allocated.
fn incoming_xml(xml: &str) -> std::result::Result<String, DomainXmlFault> {
    const CLOSE: &str = "</qemu:commandline>";
    let at = xml.find(CLOSE).ok_or(DomainXmlFault::NoQemuArgs)?;
    let mut x = format!("{}<qemu:arg value='-incoming'/><qemu:arg value='defer'/>{}", &xml[..at], &xml[at..]);
    if !x.contains("<memoryBacking") {
        let end = x.find("</currentMemory>").map(|e| e + "</currentMemory>".len());
        let end = end.or_else(|| x.find("</memory>").map(|e| e + "</memory>".len())).ok_or(DomainXmlFault::NoMemory)?;
        x.insert_str(end, "<memoryBacking><allocation mode='immediate'/></memoryBacking>");
    }
    Ok(x)
}

/// Sends the QMP command `cmd` (with `fds`, to QEMU) and returns its
/// `return` value; `op` names what it is for, in errors.
fn qmp(
    dom: &Domain,
    name: &str,
    op: &'static str,
    cmd: &str,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<serde_json::Value> {
    let out = if fds.is_empty() {
        dom.qemu_monitor_command(cmd, 0).map_err(lv("send a monitor command to", name))?
    } else {
        let cmd_c =
            CString::new(cmd).map_err(|_| Error::Unsupported { op, reason: "NUL in a monitor command".into() })?;
        let mut raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut result: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: `dom` owns a live virDomainPtr for the call; `cmd_c` is
        // NUL-terminated and `raw` holds `raw.len()` open descriptors
        // (borrowed for the call; libvirt sends copies); no files are
        // asked back (both out-pointers NULL); `result` is written by
        // libvirt on success only, a malloc'd C string we free below.
        let rc = unsafe {
            sys::virDomainQemuMonitorCommandWithFiles(
                dom.as_ptr(),
                cmd_c.as_ptr(),
                raw.len() as u32,
                raw.as_mut_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                &mut result,
                0,
            )
        };
        if rc < 0 || result.is_null() {
            return Err(lv("send a monitor command to", name)(virt::error::Error::last_error()));
        }
        // SAFETY: `result` is a NUL-terminated string libvirt allocated.
        let text = unsafe { std::ffi::CStr::from_ptr(result) }.to_string_lossy().into_owned();
        // SAFETY: allocated by libvirt with malloc, not used after this.
        unsafe { free(result.cast()) };
        text
    };
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    if let Some(e) = v.get("error") {
        return Err(Error::Unsupported { op, reason: format!("{name:?}: QEMU refused {cmd}: {e}") });
    }
    Ok(v["return"].clone())
}

unsafe extern "C" {
    /// The C library's `free`, for strings libvirt returns.
    fn free(p: *mut std::ffi::c_void);
}

/// Reads a domain's state and xenod metadata; `None` if it has none.
fn status_of(dom: &Domain, name: &str) -> Result<Option<DomainStatus>> {
    let meta = match dom.metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(META_NS), 0) {
        Ok(xml) => parse_meta(&xml),
        Err(e) if e.code().is(ErrorNumber::NoDomainMetadata) => None,
        Err(e) => return Err(lv("read metadata of", name)(e)),
    };
    let Some(meta) = meta else { return Ok(None) };
    let (state, _) = dom.state().map_err(lv("get state of", name))?;
    let state = match state.known() {
        Some(VirState::Running | VirState::Blocked) => DomainState::Running,
        Some(VirState::Paused) => DomainState::Paused,
        Some(VirState::Shutoff) => DomainState::ShutOff,
        Some(VirState::Shutdown) => DomainState::ShuttingDown,
        Some(VirState::Crashed) => DomainState::Crashed,
        Some(VirState::PMSuspended) => DomainState::PmSuspended,
        Some(VirState::NoState) | None => DomainState::Other,
    };
    Ok(Some(DomainStatus { name: name.to_string(), state, meta }))
}

pub(crate) fn lv(op: &'static str, name: &str) -> impl FnOnce(virt::error::Error) -> Error {
    let name = name.to_string();
    move |source| Error::Libvirt { op, name, source }
}

fn connect_error(uri: &str, source: virt::error::Error) -> Error {
    let msg = source.message();
    if msg.contains("Failed to connect socket") || msg.contains("libvirt-sock") {
        return Error::DaemonNotRunning { uri: uri.into(), source };
    }
    let hint = if msg.contains("no connection driver available") && uri.starts_with("xen") {
        ": this host runs no Xen hypervisor, or libvirt lacks its Xen driver (libvirt-daemon-driver-xen)"
    } else if msg.contains("no connection driver available") {
        ": libvirt has no driver for this URI here (install libvirt-daemon-driver-qemu for qemu://)"
    } else {
        ""
    };
    Error::Connect { uri: uri.into(), hint, source }
}

/// QEMU names the forward it could not set up; map that to PortTaken.
fn start_error(name: &str, source: virt::error::Error, ports: &[crate::spec::PortForward]) -> Error {
    let msg = source.message();
    if msg.contains("host forwarding rule") || msg.contains("hostfwd") {
        let port = ports.iter().map(|p| p.host).find(|p| msg.contains(&format!(":{p}-"))).unwrap_or(0);
        return Error::PortTaken { port, source: None };
    }
    lv("start", name)(source)
}

fn state_file_str(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Error::Io {
        op: "use state file",
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte"),
    })
}

impl Hypervisor for Libvirt {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn target(&self) -> Target {
        self.target
    }

    fn define(&self, model: &DomainModel) -> Result<()> {
        let xml = domain_xml(model, self.target)?;
        // virDomainDefineXML would silently redefine an existing domain.
        match self.lookup(&model.name) {
            Ok(_) => return Err(Error::NameInUse { name: model.name.clone() }),
            Err(Error::NoSuchDomain { .. }) => {}
            Err(e) => return Err(e),
        }
        if let (Target::Kvm | Target::Qemu, Some(log)) = (self.target, self.target.console_log(model)) {
            // virtlogd appends (so restore keeps the boot log): a new domain
            // starts with an empty log, in a directory that exists.
            if let Some(dir) = log.parent() {
                std::fs::create_dir_all(dir).map_err(Error::io("create console log directory", dir))?;
            }
            std::fs::File::create(&log).map_err(Error::io("create console log", &log))?;
        }
        self.conn.define_domain_xml(&xml).map_err(|e| {
            // A concurrent define of the same name won the race.
            if e.code().is(ErrorNumber::DomExist) || e.message().contains("already exists") {
                Error::NameInUse { name: model.name.clone() }
            } else {
                lv("define", &model.name)(e)
            }
        })?;
        Ok(())
    }

    fn start(&self, name: &str) -> Result<()> {
        let (dom, status) = self.managed(name)?;
        if matches!(self.target, Target::Kvm | Target::Qemu) {
            check_ports_free(&status.meta.ports)?;
        }
        dom.create().map_err(|e| start_error(name, e, &status.meta.ports))?;
        Ok(())
    }

    fn shutdown(&self, name: &str) -> Result<()> {
        let (dom, _) = self.managed(name)?;
        dom.shutdown().map_err(lv("shut down", name))?;
        Ok(())
    }

    fn kill(&self, name: &str) -> Result<()> {
        let (dom, status) = self.managed(name)?;
        if !status.state.is_active() {
            return Ok(());
        }
        match dom.destroy() {
            Ok(()) => Ok(()),
            // It stopped by itself in the meantime.
            Err(e) if e.code().is(ErrorNumber::OperationInvalid) && !dom.is_active().unwrap_or(true) => Ok(()),
            Err(e) => Err(lv("power off", name)(e)),
        }
    }

    fn undefine(&self, name: &str) -> Result<()> {
        let (dom, _) = self.managed(name)?;
        dom.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE).map_err(lv("undefine", name))?;
        Ok(())
    }

    fn suspend(&self, name: &str) -> Result<()> {
        let (dom, _) = self.managed(name)?;
        dom.suspend().map_err(lv("suspend", name))?;
        Ok(())
    }

    fn resume(&self, name: &str) -> Result<()> {
        let (dom, _) = self.managed(name)?;
        dom.resume().map_err(lv("resume", name))?;
        Ok(())
    }

    fn save(&self, name: &str, state_file: &Path) -> Result<()> {
        let (dom, status) = self.managed(name)?;
        if status.meta.root == RootMode::Fs && !self.target.can_save_shared_fs() {
            return Err(Error::Unsupported {
                op: "save",
                reason: format!(
                    "{name:?} has its root shared over {}, and QEMU cannot save or migrate such a \
                     guest; stop it and start it again instead (its tree keeps what it wrote)",
                    status.meta.share.map(|s| s.to_string()).unwrap_or_else(|| "a shared filesystem".into())
                ),
            });
        }
        if let Some(dir) = state_file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(Error::io("create state directory", dir))?;
        }
        let path = state_file_str(state_file)?;
        // SAFETY: `dom` owns a live virDomainPtr for the duration of the call
        // and `path` is a NUL-terminated string that outlives it; the crate
        // has no safe wrapper for virDomainSave.
        let rc = unsafe { sys::virDomainSave(dom.as_ptr(), path.as_ptr()) };
        if rc < 0 {
            return Err(lv("save", name)(virt::error::Error::last_error()));
        }
        Ok(())
    }

    fn restore(&self, state_file: &Path) -> Result<String> {
        let file = state_file.to_string_lossy();
        if !state_file.is_file() {
            return Err(Error::Io {
                op: "read state file",
                path: state_file.to_path_buf(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        let xml = self.conn.save_image_xml_desc(&file, 0).map_err(lv("read saved state", &file))?;
        let name = xml_name(&xml)
            .ok_or_else(|| Error::Unsupported { op: "restore", reason: format!("{file}: saved XML has no <name>") })?;
        if !xml.contains(META_NS) {
            return Err(Error::NotManaged { name });
        }
        match self.managed(&name) {
            Ok((_, s)) if s.state.is_active() => return Err(Error::NameInUse { name }),
            Ok((_, s)) if matches!(self.target, Target::Kvm | Target::Qemu) => check_ports_free(&s.meta.ports)?,
            Ok(_) | Err(Error::NoSuchDomain { .. }) => {}
            Err(e) => return Err(e),
        }
        self.conn.restore_domain(&file).map_err(|e| {
            let ports = self.managed(&name).map(|(_, s)| s.meta.ports).unwrap_or_default();
            start_error(&name, e, &ports)
        })?;
        // A state file brought from another host restores as a transient
        // domain; define it, so stop and start work as for a deployed one.
        let dom = self.lookup(&name)?;
        if !dom.is_persistent().map_err(lv("inspect", &name))? {
            let xml = dom.xml_desc(0).map_err(lv("read XML of", &name))?;
            self.conn.define_domain_xml(&xml).map_err(lv("define restored", &name))?;
        }
        Ok(name)
    }

    fn list(&self) -> Result<Vec<DomainStatus>> {
        let doms = self.conn.list_all_domains(0).map_err(lv("list domains on", &self.uri))?;
        let mut out = Vec::new();
        for dom in doms {
            let name = dom.name().map_err(lv("get name of domain on", &self.uri))?;
            match status_of(&dom, &name) {
                Ok(Some(s)) => out.push(s),
                Ok(None) => {}
                // Gone between listing and reading it.
                Err(Error::Libvirt { source, .. }) if source.code().is(ErrorNumber::NoDomain) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn status(&self, name: &str) -> Result<DomainStatus> {
        Ok(self.managed(name)?.1)
    }
}

impl LiveMigration for Libvirt {
    type Incoming = Incoming;

    /// Saves a running guest's state to `state_file` while it runs: QEMU's
    /// own migration sends its memory into a socket this process copies to
    /// the file, again and again for what the guest dirties, and stops the
    /// guest only for the last round; libvirt's save header and the domain
    /// XML go in front, so [`Hypervisor::restore`] takes the file as it
    /// takes a save. The domain is left paused, its QEMU still holding its
    /// host ports: [`Hypervisor::resume`] runs it on, [`Hypervisor::kill`]
    /// leaves it as [`Hypervisor::save`] does (shut off, defined). Returns how long the
    /// guest has been stopped: QEMU's count of its last round, the poll
    /// interval in which its end was seen, and the copy's tail. QEMU/KVM
    /// only; it goes through the QEMU monitor, which libvirt records as a
    /// taint of the domain.
    ///
    /// `paused`: pause the guest first, so that it does not run during the
    /// save (a stopped save, written in one round at this path's speed:
    /// `virDomainSave` keeps a guest down seconds longer here); the time
    /// stopped is then the whole save's. A save that fails unpauses it.
    fn save_live(&self, name: &str, state_file: &Path, paused: bool) -> Result<std::time::Duration> {
        let (dom, status) = self.managed(name)?;
        if !matches!(self.target, Target::Kvm | Target::Qemu) || status.meta.root == RootMode::Fs {
            return Err(Error::Unsupported {
                op: "live save",
                reason: format!("{name:?}: only disk-root guests of QEMU/KVM are saved live"),
            });
        }
        if !paused {
            return save_through_qemu(&dom, name, state_file);
        }
        let t = std::time::Instant::now();
        dom.suspend().map_err(lv("pause", name))?;
        let r = save_through_qemu(&dom, name, state_file);
        if r.is_err() {
            let _ = dom.resume();
        }
        r.map(|_| t.elapsed())
    }

    /// The XML of `name` as a save image would hold it (for
    /// [`LiveMigration::stage_incoming`] on another host).
    fn migratable_xml(&self, name: &str) -> Result<String> {
        let (dom, _) = self.managed(name)?;
        dom.xml_desc(sys::VIR_DOMAIN_XML_SECURE | sys::VIR_DOMAIN_XML_MIGRATABLE).map_err(lv("read the XML of", name))
    }

    /// Whether [`LiveMigration::stage_incoming`] works here (QEMU/KVM guests).
    fn can_stage(&self) -> bool {
        matches!(self.target, Target::Kvm | Target::Qemu)
    }

    /// Starts the domain `xml` (a save image's XML, retargeted) paused and
    /// waiting for its saved state, so that [`LiveMigration::finish_incoming`]
    /// later only loads the state: libvirt's start of QEMU (0.4-0.8 s here)
    /// and the first touch of the guest's memory happen before the guest
    /// is stopped on the other host, not after. QEMU starts with
    /// `-incoming defer` and its memory allocated up front, then waits on
    /// one end of a socket pair (`migrate-incoming fd:`) whose other end is
    /// in the returned [`Incoming`]: dropped without being finished, QEMU
    /// reads the end of the stream and exits, and the domain (transient
    /// until finished) goes with it, even if this process dies. QEMU/KVM
    /// only; like [`LiveMigration::save_live`], it goes through the QEMU monitor.
    fn stage_incoming(&self, xml: &str) -> Result<Incoming> {
        let name = xml_name(xml)
            .ok_or_else(|| Error::Unsupported { op: "stage", reason: "the domain XML has no <name>".into() })?;
        if !self.can_stage() {
            return Err(Error::Unsupported { op: "stage", reason: format!("{name:?}: only QEMU/KVM guests") });
        }
        if !xml.contains(META_NS) {
            return Err(Error::NotManaged { name });
        }
        let staged = incoming_xml(xml).map_err(|fault| Error::DomainXml { op: "stage", name: name.clone(), fault })?;
        match self.lookup(&name) {
            Ok(_) => return Err(Error::NameInUse { name }),
            Err(Error::NoSuchDomain { .. }) => {}
            Err(e) => return Err(e),
        }
        let dom = self.conn.create_domain_xml(&staged, sys::VIR_DOMAIN_START_PAUSED).map_err(lv("stage", &name))?;
        let staged = (|| {
            let (ours, qemus) = std::os::unix::net::UnixStream::pair().map_err(|e| Error::Unsupported {
                op: "stage",
                reason: format!("{name:?}: creating the socket pair for its state: {e}"),
            })?;
            // Room for the whole stream where allowed (root), so the copy
            // into it seldom waits for QEMU.
            for s in [&ours, &qemus] {
                if rustix::net::sockopt::set_socket_send_buffer_size_force(s, 64 << 20).is_err() {
                    let _ = rustix::net::sockopt::set_socket_send_buffer_size(s, 64 << 20);
                }
            }
            // A QEMU that stops reading without exiting fails the write
            // rather than holding this thread (and the stage) forever.
            ours.set_write_timeout(Some(std::time::Duration::from_secs(120))).map_err(|e| Error::Unsupported {
                op: "stage",
                reason: format!("{name:?}: a timeout on the socket for its state: {e}"),
            })?;
            qmp(&dom, &name, "stage", r#"{"execute":"getfd","arguments":{"fdname":"xenod-state"}}"#, &[qemus.as_fd()])?;
            drop(qemus);
            qmp(&dom, &name, "stage", r#"{"execute":"migrate-incoming","arguments":{"uri":"fd:xenod-state"}}"#, &[])?;
            Ok(ours)
        })();
        match staged {
            Ok(sock) => Ok(Incoming { name, dom, sock, define: xml.to_owned(), running: false }),
            Err(e) => {
                let _ = dom.destroy();
                Err(e)
            }
        }
    }

    /// Runs the domain `staged` waits with once its saved state has been
    /// written through [`StagedGuest::state`] (closing that), and defines it
    /// (without the staging arguments). Returns how long the load took
    /// from here. On failure the domain is gone (QEMU exits when a load
    /// fails).
    fn finish_incoming(&self, staged: Incoming) -> Result<std::time::Duration> {
        use std::time::{Duration, Instant};
        let t = Instant::now();
        let mut staged = staged;
        let Incoming { name, dom, sock, .. } = &mut staged;
        let (name, dom) = (&*name, &*dom);
        let fail = |why: String| {
            let _ = dom.destroy();
            Error::Unsupported { op: "load saved state", reason: format!("{name:?}: {why}") }
        };
        let _ = sock.shutdown(std::net::Shutdown::Write);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status = qmp(dom, name, "load saved state", r#"{"execute":"query-status"}"#, &[]).map_err(|e| {
                fail(format!("QEMU failed to load the state ({e}); its log is in /var/log/libvirt/qemu"))
            })?;
            match status["status"].as_str() {
                Some("inmigrate") if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                Some("inmigrate") => return Err(fail("QEMU took more than 2 minutes to load the state".into())),
                Some("paused") => break,
                s => return Err(fail(format!("QEMU is {} after loading the state", s.unwrap_or("in no known state")))),
            }
        }
        dom.resume().map_err(|e| fail(format!("resume: {e}")))?;
        let loaded = t.elapsed();
        staged.running = true;
        self.conn.define_domain_xml(&staged.define).map_err(lv("define restored", &staged.name))?;
        Ok(loaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Network, Root};
    use crate::spec::PortForward;

    #[test]
    fn a_staged_domain_waits_for_its_state_with_its_memory_allocated() {
        let net = Network::User { forwards: vec![PortForward { host: 8080, guest: 80 }], isolated: true };
        let m = crate::xml::tests::model(Root::Disk { image: "/t/root.img".into() }, net);
        let xml = domain_xml(&m, Target::Qemu).unwrap();
        let staged = incoming_xml(&xml).unwrap();
        let args = staged.find("<qemu:arg value='-incoming'/><qemu:arg value='defer'/></qemu:commandline>");
        assert!(args.is_some(), "{staged}");
        let mem = staged.find("<memoryBacking><allocation mode='immediate'/></memoryBacking>").unwrap();
        assert!(staged.find("</memory>").is_some_and(|c| c < mem), "{staged}");
        // Everything else as it was.
        let back = staged
            .replace("<qemu:arg value='-incoming'/><qemu:arg value='defer'/>", "")
            .replace("<memoryBacking><allocation mode='immediate'/></memoryBacking>", "");
        assert_eq!(back, xml);
        // Not a domain xenod made (no QEMU arguments): refused.
        let plain = xml.split("<qemu:commandline>").next().unwrap().to_string() + "</domain>";
        assert!(incoming_xml(&plain).unwrap_err().to_string().contains("no QEMU arguments"));
    }
}
