//! The store's one error type.

use std::io;
use std::path::{Path, PathBuf};

use crate::id::ChunkId;
use crate::manifest::{EntryFault, ManifestFault};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system call failed on a named file.
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("chunk {id} is corrupt: {why}")]
    ChunkCorrupt { id: ChunkId, why: String },
    #[error("chunk {id} is not in the store")]
    ChunkMissing { id: ChunkId },
    /// A manifest or layer root that does not decode or breaks an invariant.
    /// The fault is part of the message, not a `source` (boxed, as in
    /// `ExportEntry`, to keep every `Result` of the store small).
    #[error("bad manifest of layer {layer}: {fault}")]
    Manifest { layer: String, fault: Box<ManifestFault> },
    /// Input to import (a tree, a tar stream) that cannot be stored as given.
    #[error("bad input at {at}: {why}")]
    BadInput { at: String, why: String },
    /// An entry given to a layer (by import, a writer, a sort run) that
    /// cannot be in a manifest. The fault is part of the message.
    #[error("bad input at {at}: {fault}")]
    BadEntry { at: String, fault: EntryFault },
    /// Refused while materialising a layer.
    #[error("export to {}: {why}", dest.display())]
    Export { dest: PathBuf, why: String },
    /// Refused while materialising a layer: an entry at `at` that cannot be
    /// in a manifest. The fault is part of the message.
    #[error("export to {}: {at}: {fault}", dest.display())]
    ExportEntry { dest: PathBuf, at: String, fault: Box<EntryFault> },
    /// A file being materialised at `at` needs a chunk that is damaged or
    /// missing. The chunk's error is part of the message (it names the
    /// chunk), and its exit code is this error's: the store is damaged.
    #[error("export to {}: {at}: {damage}", dest.display())]
    ExportData { dest: PathBuf, at: String, damage: Box<Error> },
    /// A name record refused: bad signature, a key not trusted for the
    /// name's publisher, an older sequence, a removed name.
    #[error("name {name}: {why}")]
    Name { name: String, why: String },
    /// A reference or name that does not parse (a usage error, not a
    /// refusal): `template://a/../b`, `NAME@` with a short id.
    #[error("{r:?} is not a valid reference: {why}")]
    BadRef { r: String, why: String },
    /// A prefetch order refused (malformed, or naming chunks its stack
    /// does not hold). The fault is part of the message.
    #[error("prefetch order of layer {layer}: {fault}")]
    Order { layer: String, fault: crate::order::OrderFault },
    #[error("no layer matches {0:?}")]
    UnknownRef(String),
    #[error("index database {}", path.display())]
    Db {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
}

impl Error {
    /// The exit code this error means for a command.
    pub fn exit_code(&self) -> crate::Exit {
        use crate::Exit;
        match self {
            Error::UnknownRef(_) => Exit::NotFound,
            Error::ChunkCorrupt { .. } | Error::ChunkMissing { .. } => Exit::Damaged,
            Error::ExportData { damage, .. } => damage.exit_code(),
            Error::Name { .. } => Exit::NameRefused,
            Error::BadRef { .. } => Exit::Usage,
            Error::BadInput { .. }
            | Error::BadEntry { .. }
            | Error::Manifest { .. }
            | Error::Order { .. }
            | Error::Export { .. }
            | Error::ExportEntry { .. } => Exit::BadInput,
            Error::Io { .. } | Error::Db { .. } => Exit::Failure,
        }
    }

    /// The chunk this error is about, if one is: a corrupt or missing chunk,
    /// also when met while exporting.
    pub fn chunk(&self) -> Option<ChunkId> {
        match self {
            Error::ChunkCorrupt { id, .. } | Error::ChunkMissing { id } => Some(*id),
            Error::ExportData { damage, .. } => damage.chunk(),
            _ => None,
        }
    }

    /// The file or directory this error is about, if one is.
    pub fn path(&self) -> Option<PathBuf> {
        match self {
            Error::Io { path, .. } | Error::Db { path, .. } => Some(path.clone()),
            Error::Export { dest, .. } => Some(dest.clone()),
            // A tar stream's member ("-" is standard output) is named by its path in the tree.
            Error::ExportEntry { dest, at, .. } | Error::ExportData { dest, at, .. } if dest == Path::new("-") => {
                Some(PathBuf::from(at))
            }
            Error::ExportEntry { dest, at, .. } | Error::ExportData { dest, at, .. } => {
                Some(dest.join(at.trim_start_matches('/')))
            }
            _ => None,
        }
    }

    pub(crate) fn io(what: &'static str, path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> Self {
        let path = path.as_ref().to_path_buf();
        move |source| Self::Io { what, path, source }
    }

    pub(crate) fn manifest(layer: impl std::fmt::Display, fault: ManifestFault) -> Self {
        Self::Manifest { layer: layer.to_string(), fault: Box::new(fault) }
    }

    pub(crate) fn bad_entry(at: impl Into<String>, fault: EntryFault) -> Self {
        Self::BadEntry { at: at.into(), fault }
    }

    pub(crate) fn bad_input(at: impl Into<String>, why: impl Into<String>) -> Self {
        Self::BadInput { at: at.into(), why: why.into() }
    }
}

/// Attaches the file a failed call was about.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: &'static str, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: &'static str, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(Error::io(what, path))
    }
}

impl<T> IoContext<T> for rustix::io::Result<T> {
    fn ctx(self, what: &'static str, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(what, path)(e.into()))
    }
}
