//! `.mount` files: references from inside a layer to other layers.
//!
//! A regular file named [`MOUNT_FILE`] in any directory of a layer lists
//! layer references, one per line, the highest priority first; blank lines
//! and lines starting with `#` are skipped; at most [`MOUNT_FILE_MAX`]
//! bytes of UTF-8:
//!
//! ```text
//! # /srv/app/.mount
//! template://acme/app/3
//! 4f8e6cbb...            (a layer id, or a unique prefix of 8+ digits)
//! ```
//!
//! cowfs overlays each named stack on the file's directory when it mounts
//! (`cowfs/src/lower.rs`). The format lives here, in the store, because a
//! `.mount` line is a reference like a layer's base: gc must keep what it
//! names and verify must check it, and both are the store's. A root set
//! handed to gc by its caller would make every caller (CLI, daemon, tests)
//! responsible for not deleting data.

use crate::error::{Error, Result};
use crate::manifest::{Entry, Extent, Kind, display_path, file_name};
use crate::store::Store;

/// The file whose lines name layers to overlay on its directory.
pub const MOUNT_FILE: &str = ".mount";
/// The largest `.mount` file read.
pub const MOUNT_FILE_MAX: u64 = 64 << 10;

/// The references a `.mount` file's text lists, in its order.
pub fn mount_refs(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect()
}

/// Whether `e` is a `.mount` file (a regular file of that name).
pub fn is_mount_file(e: &Entry) -> bool {
    file_name(&e.path) == MOUNT_FILE.as_bytes() && matches!(e.kind, Kind::File { .. })
}

impl Store {
    /// The references listed by `.mount` file `e`, read from this store.
    pub fn read_mount_file(&self, e: &Entry) -> Result<Vec<String>> {
        let at = || display_path(&e.path);
        let Kind::File { size, extents, .. } = &e.kind else {
            return Err(Error::bad_input(at(), "a .mount file must be a regular file"));
        };
        if *size > MOUNT_FILE_MAX {
            return Err(Error::bad_input(
                at(),
                format!("{size} bytes, more than the {MOUNT_FILE_MAX} a .mount file may have"),
            ));
        }
        let mut text = Vec::with_capacity(*size as usize);
        for x in extents {
            match x {
                Extent::Data { id, .. } => text.extend_from_slice(&self.get(id)?),
                Extent::Hole { len } => text.resize(text.len() + *len as usize, 0),
            }
        }
        text.truncate(*size as usize);
        let text = String::from_utf8(text).map_err(|_| Error::bad_input(at(), ".mount file is not UTF-8 text"))?;
        Ok(mount_refs(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_comments_and_blanks() {
        let text = "# apps\n template://a/b/1 \n\n#x\n4f8e6cbb00\n";
        assert_eq!(mount_refs(text), vec!["template://a/b/1", "4f8e6cbb00"]);
        assert!(mount_refs("").is_empty());
    }
}
