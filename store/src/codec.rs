//! Chunk encodings at rest and on the wire.
//!
//! A chunk is stored zstd-compressed unless compression does not shrink it,
//! then raw. Ids never depend on the encoding: [`decode`] checks that the
//! plaintext hashes to the expected id before anyone sees it.

use std::cell::RefCell;

use crate::error::{Error, Result};
use crate::id::ChunkId;

/// zstd level at rest unless `XENOD_ZSTD_LEVEL` says otherwise. Chosen
/// on Debian minbase in solid blocks (2 CPUs, quiet host, same run): level 3
/// published in 0.51-0.60 s (43.8 MB), level 2 in 0.39 s (45.4 MB), against
/// 0.70 s for `tar | zstd -3` on one core; the three-tree store stays below
/// OSTree's either way (86 and 90 MB against 96).
pub const ZSTD_LEVEL: i32 = 2;

/// zstd level of solid frames sent to peers. Higher than at rest: a
/// frame is compressed once per transfer, where bytes on the wire are
/// what is short, and a receiver keeps the frame as it came. Measured on
/// the apache2 overlay (`benches/p2p-throughput.sh`): level 3 sent 38.3 MB,
/// 6 36.5 MB, 9 36.1 MB (rsync -z: 37.6 MB); 6 costs about 2.5x the CPU of 3.
pub const WIRE_LEVEL: i32 = 6;

/// The level in force: `XENOD_ZSTD_LEVEL` (1..=22) or [`ZSTD_LEVEL`].
pub fn zstd_level() -> i32 {
    static LEVEL: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        std::env::var("XENOD_ZSTD_LEVEL")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|l| (1..=22).contains(l))
            .unwrap_or(ZSTD_LEVEL)
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Encoding {
    Raw = 0,
    Zstd = 1,
    /// A member of a solid block: several chunks compressed as one zstd
    /// frame (see `store.rs`). Only in a [`crate::Location`] and in records
    /// scanned from a pack, where the bytes handed over are the member's
    /// plaintext; never on the wire.
    Block = 2,
}

impl Encoding {
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Raw),
            1 => Some(Self::Zstd),
            2 => Some(Self::Block),
            _ => None,
        }
    }
}

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static WIRE_COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses `plain` as one zstd frame at the level in force.
pub(crate) fn compress(plain: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = compressor(zstd_level());
        }
        c.as_mut().and_then(|c| c.compress(plain).ok())
    })
}

/// Level 16 here is zstd's 16 (its optimal parser, the first level that
/// has it for 1 MiB frames) searching less: 4 candidates per position
/// instead of 32, and matches of at least 4 bytes instead of 5. On 1 MiB
/// frames of a web log (the migration benchmark's) that is 13.6% below
/// level 9 and 1.6% below zstd's own 16 in 44% of its time; on kernel code
/// 3.9% below level 9 and 1.6% below zstd's 16. zstd's deeper search
/// costs more than it finds on such data.
pub const SHORT_SEARCH_LEVEL: i32 = 16;

fn compressor(level: i32) -> Option<zstd::bulk::Compressor<'static>> {
    use zstd::stream::raw::CParameter;
    let mut c = zstd::bulk::Compressor::new(level).ok()?;
    if level == SHORT_SEARCH_LEVEL {
        c.set_parameter(CParameter::SearchLog(2)).ok()?;
        c.set_parameter(CParameter::MinMatch(4)).ok()?;
    }
    Some(c)
}

/// Compresses `plain` as one zstd frame at `level` (one compressor per
/// thread, made again when the level changes).
pub(crate) fn compress_at(plain: &[u8], level: i32) -> Option<Vec<u8>> {
    WIRE_COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = compressor(level).map(|z| (level, z));
        }
        c.as_mut().and_then(|(_, c)| c.compress(plain).ok())
    })
}

/// Decompresses one zstd frame of at most `capacity` plaintext bytes.
pub(crate) fn decompress(stored: &[u8], capacity: usize) -> std::result::Result<Vec<u8>, String> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = zstd::bulk::Decompressor::new().ok();
        }
        match d.as_mut() {
            Some(d) => d.decompress(stored, capacity).map_err(|e| format!("zstd: {e}")),
            None => Err("no zstd decoder".into()),
        }
    })
}

/// Encodes `plain`; returns the encoding chosen and the stored bytes.
pub fn encode(plain: &[u8]) -> (Encoding, Vec<u8>) {
    match compress(plain) {
        Some(z) if z.len() < plain.len() => (Encoding::Zstd, z),
        _ => (Encoding::Raw, plain.to_vec()),
    }
}

/// Decodes stored bytes and verifies them against `id`.
pub fn decode(id: &ChunkId, enc: Encoding, stored: &[u8], plain_len: usize) -> Result<Vec<u8>> {
    let plain = match enc {
        Encoding::Raw | Encoding::Block => stored.to_vec(),
        Encoding::Zstd => decompress(stored, plain_len).map_err(|why| Error::ChunkCorrupt { id: *id, why })?,
    };
    verify(id, plain, plain_len)
}

/// Checks that `plain` has the expected length and hashes to `id`.
pub(crate) fn verify(id: &ChunkId, plain: Vec<u8>, plain_len: usize) -> Result<Vec<u8>> {
    if plain.len() != plain_len {
        return Err(Error::ChunkCorrupt {
            id: *id,
            why: format!("decoded {} bytes, expected {plain_len}", plain.len()),
        });
    }
    if ChunkId::of(&plain) != *id {
        return Err(Error::ChunkCorrupt { id: *id, why: "content does not hash to its id".into() });
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_raw_fallback() {
        let text = b"abcabcabc".repeat(1000);
        let (enc, stored) = encode(&text);
        assert_eq!(enc, Encoding::Zstd);
        assert!(stored.len() < text.len());
        assert_eq!(decode(&ChunkId::of(&text), enc, &stored, text.len()).unwrap(), text);

        let tiny = b"x";
        let (enc, stored) = encode(tiny);
        assert_eq!(enc, Encoding::Raw);
        assert_eq!(decode(&ChunkId::of(tiny), enc, &stored, 1).unwrap(), tiny);
    }

    #[test]
    fn wrong_bytes_are_refused() {
        let text = b"hello world".repeat(100);
        let (enc, mut stored) = encode(&text);
        let id = ChunkId::of(&text);
        let mid = stored.len() / 2;
        stored[mid] ^= 1;
        assert!(matches!(decode(&id, enc, &stored, text.len()), Err(Error::ChunkCorrupt { .. })));
        assert!(decode(&ChunkId::of(b"other"), Encoding::Raw, b"hello", 5).is_err());
    }
}
