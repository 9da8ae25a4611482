//! The deployer's one error type. Each message says what failed and, where
//! the user can fix it, what to do; the lower-level cause is the `source`.

use std::io;
use std::path::PathBuf;

/// Result with the deployer's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the deployer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The deploy spec is unusable as given.
    #[error("invalid deploy spec: {field}: {reason}")]
    InvalidSpec { field: &'static str, reason: String },

    /// The spec could not be read from or written as JSON.
    #[error("deploy spec is not valid JSON")]
    SpecJson(#[source] serde_json::Error),

    /// The kernel named by the spec is not there.
    #[error("kernel not found at {}: check the spec's `kernel` (a host path, or stack:PATH inside the tree)", path.display())]
    MissingKernel { path: PathBuf },

    /// The initrd named by the spec is not there.
    #[error("initrd not found at {}: check the spec's `initrd`", path.display())]
    MissingInitrd { path: PathBuf },

    /// The disk image of a disk-root guest is not there.
    #[error("disk image not found at {}: check the spec's `disk_image` (a path inside the tree)", path.display())]
    MissingDiskImage { path: PathBuf },

    /// The tree an fs-root guest would boot from is not a directory.
    #[error("root tree {} is not a directory", path.display())]
    MissingRootTree { path: PathBuf },

    /// libvirtd (or virtqemud/virtxend) does not answer on its socket.
    #[error(
        "libvirt daemon not reachable at {uri}: start it with scripts/start-libvirtd.sh \
         (or `systemctl start libvirtd` on a host with systemd)"
    )]
    DaemonNotRunning {
        uri: String,
        #[source]
        source: virt::error::Error,
    },

    /// Opening a libvirt connection failed for another reason.
    #[error("cannot connect to libvirt at {uri}{hint}")]
    Connect {
        uri: String,
        /// ": what to do", or empty.
        hint: &'static str,
        #[source]
        source: virt::error::Error,
    },

    /// A domain of that name exists already.
    #[error("a domain named {name:?} already exists: pick another instance name, or destroy the old one")]
    NameInUse { name: String },

    /// A forwarded host port is taken by another process.
    #[error("host port 127.0.0.1:{port} is already in use: forward another port (or 0 for any free one)")]
    PortTaken {
        port: u16,
        #[source]
        source: Option<io::Error>,
    },

    /// No domain of that name exists.
    #[error("no domain named {name:?}")]
    NoSuchDomain { name: String },

    /// The domain exists but was not made by xenod (no xenod metadata).
    #[error("domain {name:?} was not created by xenod; leaving it alone")]
    NotManaged { name: String },

    /// The operation is not possible for this domain or hypervisor.
    #[error("{op} is not supported: {reason}")]
    Unsupported { op: &'static str, reason: String },

    /// The guest did not reach the wanted state in time.
    #[error("domain {name:?}: {what} did not happen within {secs} s")]
    Timeout { name: String, what: &'static str, secs: u64 },

    /// The guest stopped while xenod waited for it to come up.
    #[error("domain {name:?} is {state} instead of booting; last console lines:\n{console_tail}")]
    GuestStopped { name: String, state: crate::hypervisor::DomainState, console_tail: String },

    /// A libvirt call failed.
    #[error("libvirt: {op} {name:?} failed")]
    Libvirt {
        op: &'static str,
        name: String,
        #[source]
        source: virt::error::Error,
    },

    /// A call of [`crate::fake::FakeHypervisor`] failed: a failure a test
    /// injected, or a call libvirt would refuse in the domain's state.
    #[cfg(feature = "fake")]
    #[error("fake hypervisor: {op} {name:?} failed: {reason}")]
    Fake { op: &'static str, name: String, reason: String },

    /// A file operation failed.
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }

    pub(crate) fn spec(field: &'static str, reason: impl Into<String>) -> Error {
        Error::InvalidSpec { field, reason: reason.into() }
    }
}
