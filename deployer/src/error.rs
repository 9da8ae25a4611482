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

    /// A save image that cannot be read or retargeted. The fault is part
    /// of the message, not a `source`.
    #[error("retarget saved state is not supported: {}: {fault}", file.display())]
    SaveImage { file: PathBuf, fault: SaveImageFault },

    /// A domain XML that lacks what `op` needs. The fault is part of the
    /// message, not a `source`.
    #[error("{op} is not supported: {name:?}: {fault}")]
    DomainXml { op: &'static str, name: String, fault: DomainXmlFault },

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

/// Why a save image (see `saveimage`) cannot be read or retargeted.
#[derive(Debug, thiserror::Error)]
pub enum SaveImageFault {
    /// Fewer bytes than the header.
    #[error("shorter than a save image header")]
    ShortHeader,
    /// A header not starting with libvirt's magic.
    #[error("not a complete libvirt save image (bad magic)")]
    BadMagic,
    /// A header of a version other than 2.
    #[error("save image version {version} (only 2 is known)")]
    Version { version: u32 },
    /// An XML block larger than any domain XML and cookie.
    #[error("XML block of {len} bytes")]
    BlockTooLarge { len: u32 },
    /// Fewer bytes than the header announces for the XML block.
    #[error("truncated in its XML block")]
    TruncatedBlock,
    /// A domain XML without its terminating NUL.
    #[error("unterminated domain XML")]
    UnterminatedXml,
    /// A domain XML that is not UTF-8.
    #[error("domain XML is not UTF-8")]
    NotUtf8,
    /// A migration cookie said to start outside the XML block.
    #[error("cookie offset {offset} outside the XML block")]
    CookieOffset { offset: usize },
    /// A retargeted XML and cookie that do not fit the image's block.
    #[error("the new XML needs {need} bytes, the image holds {have}")]
    NoRoom { need: usize, have: usize },
    /// The image's domain XML cannot be retargeted.
    #[error(transparent)]
    Xml(#[from] DomainXmlFault),
}

/// What a domain XML lacks for one of the deployer's edits (retargeting it,
/// moving its ports, starting it for an incoming migration).
#[derive(Debug, thiserror::Error)]
pub enum DomainXmlFault {
    /// No `<tag>` element.
    #[error("domain XML has no <{tag}>")]
    NoElement { tag: &'static str },
    /// A `<tag>` element that is never closed.
    #[error("unterminated <{tag}>")]
    UnterminatedElement { tag: &'static str },
    /// A port to move that the guest does not forward.
    #[error("no forward from host port {port} in the domain XML")]
    NoForward { port: u16 },
    /// No xenod metadata element.
    #[error("domain XML has no xenod metadata")]
    NoMetadata,
    /// A xenod metadata element without its opening tag's ends.
    #[error("malformed xenod metadata")]
    MalformedMetadata,
    /// A xenod metadata element that is never closed.
    #[error("unterminated xenod metadata")]
    UnterminatedMetadata,
    /// Xenod metadata whose JSON does not parse.
    #[error("xenod metadata does not parse")]
    MetadataParse,
    /// Moved metadata that does not become JSON again.
    #[error("xenod metadata: {0}")]
    MetadataJson(#[source] serde_json::Error),
    /// No QEMU arguments (a domain xenod did not make).
    #[error("the domain XML has no QEMU arguments (not one xenod made)")]
    NoQemuArgs,
    /// No `<memory>` (nor `<currentMemory>`) element.
    #[error("the domain XML has no <memory>")]
    NoMemory,
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
