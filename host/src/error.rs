//! The engine's one error type.
//!
//! Lower crates' errors are kept whole (a variant each), so their exit
//! codes survive whatever context is put around them: [`Error::exit_code`]
//! asks the error itself instead of walking a chain of causes. Context is
//! a variant too ([`Error::Context`]): a short "what was being done" over
//! the cause, printed as `what: cause` by [`Error::chain`].

use std::fmt;

use xenod_store::Exit;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug)]
pub enum Error {
    Store(xenod_store::Error),
    Peer(xenod_peer::PeerError),
    Ticket(xenod_peer::TicketError),
    Cowfs(xenod_cowfs::Error),
    Deployer(xenod_deployer::Error),
    Io(std::io::Error),
    Os(rustix::io::Errno),
    Json(serde_json::Error),
    Task(tokio::task::JoinError),
    TomlRead(toml::de::Error),
    TomlWrite(toml::ser::Error),
    /// A QUIC stream or connection to a peer failed.
    Transport(Box<dyn std::error::Error + Send + Sync>),
    /// A request or input refused with an exit code of its own.
    Coded {
        code: Exit,
        msg: String,
    },
    /// A message of the engine's own, with no lower cause.
    Msg(String),
    /// The target of a migration answered that a request failed (and undid
    /// what it had begun), as opposed to going silent.
    TargetRefused(String),
    /// A migration that failed in `phase`; `guest` says where the guest
    /// runs now.
    Migration {
        phase: Phase,
        guest: String,
        source: Box<Error>,
    },
    /// What was being done when `source` failed.
    Context {
        what: String,
        source: Box<Error>,
    },
}

macro_rules! from {
    ($($v:ident($t:ty)),* $(,)?) => {
        $(impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::$v(e)
            }
        })*
    };
}

from!(
    Store(xenod_store::Error),
    Peer(xenod_peer::PeerError),
    Ticket(xenod_peer::TicketError),
    Cowfs(xenod_cowfs::Error),
    Deployer(xenod_deployer::Error),
    Io(std::io::Error),
    Os(rustix::io::Errno),
    Json(serde_json::Error),
    Task(tokio::task::JoinError),
    TomlRead(toml::de::Error),
    TomlWrite(toml::ser::Error),
);

impl Error {
    /// The lower crate's error this one wraps, which speaks for itself: its
    /// message is this error's, its causes are this error's causes.
    fn wrapped(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(match self {
            Error::Store(e) => e,
            Error::Peer(e) => e,
            Error::Ticket(e) => e,
            Error::Cowfs(e) => e,
            Error::Deployer(e) => e,
            Error::Io(e) => e,
            Error::Os(e) => e,
            Error::Json(e) => e,
            Error::Task(e) => e,
            Error::TomlRead(e) => e,
            Error::TomlWrite(e) => e,
            Error::Transport(e) => e.as_ref(),
            Error::Coded { .. } | Error::Msg(_) | Error::TargetRefused(_) | Error::Migration { .. } => return None,
            Error::Context { .. } => return None,
        })
    }
}

/// `{}`: this error's own message; `{:#}`: with its causes, `what: cause:
/// cause` (as the CLI prints it).
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Coded { msg, .. } | Error::Msg(msg) => write!(f, "{msg}")?,
            Error::TargetRefused(why) => write!(f, "the target refused: {why}")?,
            // The cause is part of the message, so that the one line a
            // user reads says the phase, why, and where the guest is.
            Error::Migration { phase, guest, source } => write!(f, "migration failed in {phase}: {source:#}; {guest}")?,
            Error::Context { what, .. } => write!(f, "{what}")?,
            _ => write!(f, "{}", self.wrapped().expect("every other variant wraps an error"))?,
        }
        if f.alternate() {
            let mut cause = std::error::Error::source(self);
            while let Some(c) = cause {
                write!(f, ": {c}")?;
                cause = c.source();
            }
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Context { source, .. } => Some(source.as_ref()),
            e => e.wrapped().and_then(|w| w.source()),
        }
    }
}

macro_rules! transport {
    ($($t:ty),* $(,)?) => {
        $(impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Transport(Box::new(e))
            }
        })*
    };
}

transport!(
    xenod_peer::iroh::endpoint::ConnectionError,
    xenod_peer::iroh::endpoint::ReadToEndError,
    xenod_peer::iroh::endpoint::WriteError,
);

impl Error {
    /// Puts what was being done around this error.
    pub fn context(self, what: impl fmt::Display) -> Self {
        Error::Context { what: what.to_string(), source: Box::new(self) }
    }

    /// An error of the engine's own.
    pub fn msg(msg: impl Into<String>) -> Self {
        Error::Msg(msg.into())
    }

    /// An error that exits with `code`.
    pub fn coded(code: Exit, msg: impl Into<String>) -> Self {
        Error::Coded { code, msg: msg.into() }
    }

    /// The exit code this error means for a command.
    pub fn exit_code(&self) -> Exit {
        match self {
            Error::Store(e) => e.exit_code(),
            Error::Peer(e) => peer_exit_code(e),
            Error::Ticket(_) => Exit::BadInput,
            Error::Cowfs(e) => e.exit_code(),
            Error::Coded { code, .. } => *code,
            Error::Context { source, .. } | Error::Migration { source, .. } => source.exit_code(),
            Error::TargetRefused(_)
            | Error::Deployer(_)
            | Error::Io(_)
            | Error::Os(_)
            | Error::Json(_)
            | Error::Task(_)
            | Error::TomlRead(_)
            | Error::TomlWrite(_)
            | Error::Transport(_)
            | Error::Msg(_) => Exit::Failure,
        }
    }

    /// The error with its causes, `what: cause: cause` (as `{:#}`).
    pub fn chain(&self) -> String {
        format!("{self:#}")
    }
}

/// The phases of a migration, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Prepare,
    PreCopy,
    StopAndCopy,
    Resume,
    CleanUp,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Prepare => "prepare",
            Phase::PreCopy => "pre-copy",
            Phase::StopAndCopy => "stop-and-copy",
            Phase::Resume => "resume",
            Phase::CleanUp => "clean up",
        })
    }
}

/// A store error keeps its code through the peer layer; a fetch no provider
/// could serve has its own.
fn peer_exit_code(e: &xenod_peer::PeerError) -> Exit {
    use xenod_peer::PeerError as P;
    match e {
        P::Store(s) => s.exit_code(),
        P::NoProviders { .. } | P::Unavailable { .. } => Exit::NoProvider,
        _ => Exit::Failure,
    }
}

/// Puts what was being done around an error.
pub trait Context<T> {
    fn context(self, what: impl fmt::Display) -> Result<T>;
    fn with_context<S: fmt::Display>(self, what: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| Error::Context { what: what.to_string(), source: Box::new(e.into()) })
    }

    fn with_context<S: fmt::Display>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| Error::Context { what: what().to_string(), source: Box::new(e.into()) })
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.ok_or_else(|| Error::Msg(what.to_string()))
    }

    fn with_context<S: fmt::Display>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.ok_or_else(|| Error::Msg(what().to_string()))
    }
}

/// Returns an [`Error::Msg`] from the enclosing function.
#[macro_export]
#[doc(hidden)]
macro_rules! bail {
    ($($t:tt)*) => {
        return Err($crate::Error::Msg(format!($($t)*)))
    };
}

/// An [`Error::Msg`].
#[macro_export]
#[doc(hidden)]
macro_rules! err {
    ($($t:tt)*) => {
        $crate::Error::Msg(format!($($t)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_error_keeps_its_code_under_context() {
        let e: std::result::Result<(), _> = Err(xenod_store::Error::UnknownRef("x".into()));
        let e = e.context("resolving").context("deploying").unwrap_err();
        assert_eq!(e.exit_code(), Exit::NotFound);
        assert_eq!(e.chain(), "deploying: resolving: no layer matches \"x\"");
    }

    #[test]
    fn a_wrapped_error_and_its_cause_print_once_each() {
        let io = std::io::Error::other("disk on fire");
        let e =
            Error::from(xenod_store::Error::Io { what: "reading", path: "/x".into(), source: io }).context("opening");
        assert_eq!(e.to_string(), "opening");
        assert_eq!(e.chain(), "opening: reading /x: disk on fire");
        let m = Error::Migration { phase: Phase::Resume, guest: "here".into(), source: Box::new(e) };
        assert_eq!(m.chain(), "migration failed in resume: opening: reading /x: disk on fire; here");
    }

    #[test]
    fn a_corrupt_chunk_inside_cowfs_is_damage() {
        let id = xenod_store::ChunkId::of(b"x");
        let e = Error::from(xenod_cowfs::Error::Store(xenod_store::Error::ChunkMissing { id }));
        assert_eq!(e.exit_code(), Exit::Damaged);
    }
}
