//! The [`Hypervisor`] trait: what xenod asks of a hypervisor, by domain
//! name. A handful of primitives; deploy, stop and destroy are provided on
//! top of them with the cleanup rules xenod relies on.
//!
//! Words, as libvirt uses them: *suspend*/*resume* pause and unpause a
//! running guest in memory; *save*/*restore* write its state to a file and
//! bring it back (`xenod suspend`/`xenod resume` are save/restore);
//! *kill* is a forced power-off (libvirt's "destroy"); *destroy* here is
//! kill + undefine: the domain is gone.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::model::{DomainMeta, DomainModel};
use crate::xml::Target;

/// A domain's run state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DomainState {
    Running,
    /// Suspended in memory.
    Paused,
    /// Defined, not running (also after save).
    ShutOff,
    /// A shutdown was requested and is in progress.
    ShuttingDown,
    Crashed,
    /// Guest-initiated power-management suspend.
    PmSuspended,
    Other,
}

impl DomainState {
    /// Whether the domain has a live process (running or paused).
    pub fn is_active(self) -> bool {
        !matches!(self, DomainState::ShutOff | DomainState::Crashed)
    }
}

impl fmt::Display for DomainState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DomainState::Running => "running",
            DomainState::Paused => "paused",
            DomainState::ShutOff => "shut off",
            DomainState::ShuttingDown => "shutting down",
            DomainState::Crashed => "crashed",
            DomainState::PmSuspended => "pm-suspended",
            DomainState::Other => "other",
        })
    }
}

/// One xenod domain as the hypervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainStatus {
    pub name: String,
    pub state: DomainState,
    /// What xenod recorded when it defined the domain.
    pub meta: DomainMeta,
}

/// How [`Hypervisor::stop`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    AlreadyStopped,
    /// The guest powered off after the shutdown request.
    Graceful,
    /// The guest ignored the request for the grace period and was killed.
    Forced,
}

/// A hypervisor that runs xenod's domains. Implementations only touch
/// domains that xenod defined (they carry xenod's metadata); others are
/// [`Error::NotManaged`].
pub trait Hypervisor: Send + Sync {
    /// The libvirt URI (or other address) of this hypervisor.
    fn uri(&self) -> &str;
    /// The XML flavour this hypervisor takes.
    fn target(&self) -> Target;

    /// Defines a persistent, stopped domain; [`Error::NameInUse`] if the
    /// name exists. A failed define leaves nothing behind.
    fn define(&self, model: &DomainModel) -> Result<()>;
    /// Starts a defined domain ([`Error::PortTaken`] if a forward's port is busy).
    fn start(&self, name: &str) -> Result<()>;
    /// Asks the guest to power off (ACPI power button / Xen shutdown); returns at once.
    fn shutdown(&self, name: &str) -> Result<()>;
    /// Powers the guest off at once (libvirt's "destroy"). No-op when stopped.
    fn kill(&self, name: &str) -> Result<()>;
    /// Removes a stopped domain's definition (and any managed save).
    fn undefine(&self, name: &str) -> Result<()>;
    /// Pauses a running guest in memory.
    fn suspend(&self, name: &str) -> Result<()>;
    /// Unpauses a paused guest.
    fn resume(&self, name: &str) -> Result<()>;
    /// Saves a running or paused guest's state to `state_file`; the domain
    /// is then shut off (still defined). [`Error::Unsupported`] for a
    /// shared-fs root on QEMU/KVM.
    fn save(&self, name: &str, state_file: &Path) -> Result<()>;
    /// Brings a saved guest back, running; returns its name.
    fn restore(&self, state_file: &Path) -> Result<String>;
    /// All of xenod's domains.
    fn list(&self) -> Result<Vec<DomainStatus>>;
    /// One of xenod's domains.
    fn status(&self, name: &str) -> Result<DomainStatus>;

    fn state(&self, name: &str) -> Result<DomainState> {
        Ok(self.status(name)?.state)
    }

    /// The file holding the guest's serial console output.
    fn console_log(&self, name: &str) -> Result<PathBuf> {
        self.status(name)?.meta.console_log.ok_or_else(|| Error::Unsupported {
            op: "console log",
            reason: format!("{} keeps no console log for {name:?}", self.target()),
        })
    }

    /// Define and start; if starting fails the domain is undefined again,
    /// so a failed deploy leaves no half-defined domain.
    fn deploy(&self, model: &DomainModel) -> Result<()> {
        self.define(model)?;
        if let Err(e) = self.start(&model.name) {
            if let Err(cleanup) = self.destroy(&model.name) {
                tracing::warn!(domain = %model.name, error = %cleanup, "cleanup after failed start");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Graceful, then forced: request a shutdown, wait up to `grace` for
    /// the guest to power off, then kill it. A paused guest is killed at once.
    fn stop(&self, name: &str, grace: Duration) -> Result<StopOutcome> {
        match self.state(name)? {
            s if !s.is_active() => return Ok(StopOutcome::AlreadyStopped),
            DomainState::Paused => {
                self.kill(name)?;
                return Ok(StopOutcome::Forced);
            }
            _ => {}
        }
        self.shutdown(name)?;
        if wait_state(self, name, grace, |s| !s.is_active())? {
            return Ok(StopOutcome::Graceful);
        }
        self.kill(name)?;
        Ok(StopOutcome::Forced)
    }

    /// Kill (if running) and undefine: the domain is gone. Files it used
    /// (tree, disk image, state file, console log) stay.
    fn destroy(&self, name: &str) -> Result<()> {
        if self.state(name)?.is_active() {
            self.kill(name)?;
        }
        self.undefine(name)
    }
}

/// Polls `name`'s state until `done` holds or `timeout` passes; true if it held.
pub fn wait_state(
    hv: &(impl Hypervisor + ?Sized),
    name: &str,
    timeout: Duration,
    done: impl Fn(DomainState) -> bool,
) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if done(hv.state(name)?) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
