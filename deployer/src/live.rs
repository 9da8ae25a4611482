//! The [`LiveMigration`] trait: what moving a guest to another host (or
//! another xenod on the same libvirt) asks of a hypervisor beyond
//! [`Hypervisor`]: a save while the guest runs, the guest's XML as a save
//! image holds it, and a guest started ahead of its state
//! ([`StagedGuest`]), so that the stop on the old side is short.
//!
//! A backend that cannot do one of these returns [`Error::Unsupported`]
//! from it (never panics); [`LiveMigration::can_stage`] says beforehand
//! whether staging works, so a caller picks a restore from a file instead.

use std::path::Path;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::hypervisor::Hypervisor;

/// A guest started by [`LiveMigration::stage_incoming`]: its hypervisor
/// process runs (paused) and waits for the guest's saved state. Dropped
/// without [`LiveMigration::finish_incoming`], the guest is gone again.
pub trait StagedGuest: Send + std::fmt::Debug {
    /// The domain name the guest runs under.
    fn name(&self) -> &str;

    /// Where the waiting guest reads its state: a whole save image (as
    /// [`Hypervisor::save`] or [`LiveMigration::save_live`] write it,
    /// possibly [`crate::retarget`]ed) written here reaches it; the image's
    /// header and XML block are dropped on the way. A write fails when
    /// the bytes do not start as a save image does, and when the guest
    /// stops reading (its load failed).
    /// Writing ends with [`LiveMigration::finish_incoming`].
    fn state(&mut self) -> impl std::io::Write + '_;
}

/// Live saves and staged restores, on top of [`Hypervisor`]. Like every
/// call of the crate, each one blocks.
pub trait LiveMigration: Hypervisor {
    /// A guest waiting for its state ([`LiveMigration::stage_incoming`]).
    type Incoming: StagedGuest + Send;

    /// Saves running (or paused) guest `name`'s state to `state_file`
    /// while it runs, through the hypervisor's own migration: its memory is
    /// copied in rounds, and the guest is stopped only for the last one.
    /// The file is a save image that [`Hypervisor::restore`] takes as it
    /// takes a [`Hypervisor::save`]d one, and whose whole bytes
    /// [`StagedGuest::state`] takes.
    ///
    /// Afterwards the domain is left paused, its process still alive and
    /// holding its host ports: [`Hypervisor::resume`] runs it on (the save
    /// was a checkpoint), [`Hypervisor::kill`] leaves it as
    /// [`Hypervisor::save`] does (shut off, still defined).
    ///
    /// `paused`: pause the guest first, so that it does not run during the
    /// save (a stopped save, written in one round); the time stopped is
    /// then the whole save's. A save that fails leaves the guest running
    /// as it was (unpaused again).
    ///
    /// Returns how long the guest has been stopped by the save.
    /// [`Error::Unsupported`] where the backend cannot save this guest
    /// live (e.g. a guest with its root on a shared filesystem).
    fn save_live(&self, name: &str, state_file: &Path, paused: bool) -> Result<Duration>;

    /// The domain XML of `name` as a save image of it would hold it
    /// (libvirt's migratable form, secure parts included): what
    /// [`crate::retarget_xml`] adapts and [`LiveMigration::stage_incoming`]
    /// starts on the other side. Works whatever the domain's state.
    fn migratable_xml(&self, name: &str) -> Result<String>;

    /// Whether [`LiveMigration::stage_incoming`] works on this hypervisor.
    /// Where it does not, a saved state goes into a file and through
    /// [`Hypervisor::restore`] instead.
    fn can_stage(&self) -> bool {
        false
    }

    /// Starts domain `xml` (a save image's XML, usually retargeted) paused
    /// and waiting for its saved state, so that only loading that state is
    /// left for [`LiveMigration::finish_incoming`]: starting the guest's
    /// process and allocating its memory happen before the guest is
    /// stopped on the old side, not after.
    ///
    /// The domain is transient until finished: dropping the returned guest
    /// unfinished removes it (also when this process dies).
    /// [`Error::NameInUse`] if a domain of that name exists (running or
    /// not), [`Error::NotManaged`] if the XML carries no xenod metadata,
    /// [`Error::Unsupported`] where [`LiveMigration::can_stage`] is false.
    fn stage_incoming(&self, xml: &str) -> Result<Self::Incoming> {
        let _ = xml;
        Err(Error::Unsupported {
            op: "stage",
            reason: format!("{} cannot start a guest ahead of its state", self.uri()),
        })
    }

    /// Once the whole saved state has been written through
    /// [`StagedGuest::state`], loads it, runs the guest and defines the
    /// domain (persistent, without the staging arguments), so that it is
    /// then like a restored one. Returns how long the load took from this
    /// call. On failure the domain is gone.
    fn finish_incoming(&self, staged: Self::Incoming) -> Result<Duration> {
        Err(Error::Unsupported {
            op: "load saved state",
            reason: format!("{:?}: {} cannot start a guest ahead of its state", staged.name(), self.uri()),
        })
    }
}
