//! The crate's error type, and the errno results of filesystem operations.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] xenod_store::Error),
    /// An operating-system call failed on a named file.
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The lower stack cannot be presented (a broken layer).
    #[error("bad lower stack: {0}")]
    BadLayer(String),
    /// A `.mount` file names a layer the store cannot resolve.
    #[error("{file}: cannot mount layer reference {reference:?}")]
    MountRef {
        file: String,
        reference: String,
        #[source]
        source: xenod_store::Error,
    },
    /// A `.mount` file that cannot be followed.
    #[error("{file}: {why}")]
    BadMount { file: String, why: String },
    /// A host directory that cannot be a lower layer.
    #[error("lower directory {}: {why}", path.display())]
    BadLower { path: PathBuf, why: String },
    /// An upper directory that cannot be used or committed as it is.
    #[error("upper directory {}: {why}", path.display())]
    BadUpper { path: PathBuf, why: String },
    /// A mount's control socket did not answer as it should.
    #[error("control socket {}: {why}", socket.display())]
    Control { socket: PathBuf, why: String },
    /// A lower file could not be written into the file cache.
    #[error("caching {file}")]
    Materialise {
        file: String,
        #[source]
        source: crate::filecache::WriteFault,
    },
    /// A mount's answer on its control socket does not decode. The fault
    /// is part of the message, not a `source`.
    #[error("control socket {}: {fault}", socket.display())]
    ControlAnswer { socket: PathBuf, fault: crate::track::AnswerFault },
}

impl Error {
    /// The exit code this error means for a command: a store error keeps
    /// its own (a corrupt chunk met while mounting or committing is damage).
    pub fn exit_code(&self) -> xenod_store::Exit {
        use xenod_store::Exit;
        match self {
            Error::Store(e) | Error::MountRef { source: e, .. } => e.exit_code(),
            Error::BadLayer(_) | Error::BadMount { .. } | Error::BadLower { .. } | Error::BadUpper { .. } => {
                Exit::BadInput
            }
            Error::Materialise { source, .. } => source.exit_code(),
            Error::Io { .. } | Error::Control { .. } | Error::ControlAnswer { .. } => Exit::Failure,
        }
    }

    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { what, path, source }
    }
}

/// What a filesystem operation fails with: the errno the caller sees.
pub(crate) type Errno = rustix::io::Errno;
pub(crate) type FsResult<T> = std::result::Result<T, Errno>;

pub(crate) fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc_eio()))
}

const fn libc_eio() -> i32 {
    5
}
