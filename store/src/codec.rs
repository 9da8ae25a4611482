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

/// One zstd frame of `plain` at `level`, through this thread's
/// compressor for that level.
pub(crate) fn zstd_frame(plain: &[u8], level: i32) -> Option<Vec<u8>> {
    if level == zstd_level() { compress(plain) } else { compress_at(plain, level) }
}

/// Compresses a run of chunk plaintexts for a dense answer; returns the
/// level byte its block records (a zstd level, or `PPMD_TAG`) and the
/// frame. For PPMd, a probe at zstd's fastest level decides first: a run
/// it cannot shrink by 1/16 (random bytes, compressed files) goes as that
/// probe, since PPMd would only be slower and larger there; otherwise the
/// smaller of the probe and PPMd goes.
pub fn dense_frame(plain: &[u8], codec: Dense) -> Option<(u8, Vec<u8>)> {
    match codec {
        Dense::Zstd(level) => Some((level, zstd_frame(plain, level.into())?)),
        Dense::Ppmd => {
            let fast = compress_at(plain, 1)?;
            if fast.len() * 16 < plain.len() * 15
                && let Some(p) = ppmd_compress(plain)
                && p.len() < fast.len()
            {
                return Some((PPMD_TAG, p));
            }
            Some((1, fast))
        }
    }
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

/// PPMd (variant H, 7-Zip's range coder) for dense solid frames on the
/// wire, never at rest: a context model predicts each byte from the five
/// before it, which fits text and code better than zstd's matches. On the
/// 1 MiB frames of the migration benchmark's web log it stores 22% less
/// than [`SHORT_SEARCH_LEVEL`] in a quarter of its time (4.64 MB against
/// 5.96 MB per 32 MiB, 1.06 s against 3.78 s on one core here: the
/// `dense_codecs` bench); on kernel code 10% less in about as much time.
/// Random bytes it expands by 3% at 3 MB/s, which is why a run zstd's
/// fastest level cannot shrink is never given to it ([`dense_frame`]). It
/// decodes at 8-30 MB/s (kernel code, text), so a receiver decodes such a
/// frame once and keeps its chunks zstd-compressed. Order 5 with an 8 MiB
/// model: order 6 or a 16 MiB model gained nothing on 1 MiB frames and
/// cost 25-50% more time. Both ends use these; they are not on the wire.
const PPMD_ORDER: u32 = 5;
const PPMD_MEM: u32 = 8 << 20;

/// Compresses `plain` with PPMd (see [`PPMD_ORDER`]).
pub(crate) fn ppmd_compress(plain: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write;
    let mut e = ppmd_rust::Ppmd7Encoder::new(Vec::with_capacity(plain.len() / 4), PPMD_ORDER, PPMD_MEM).ok()?;
    e.write_all(plain).ok()?;
    e.finish(false).ok()
}

/// Decompresses a PPMd stream into exactly `len` bytes. A stream that ends
/// early is refused; wrong bytes are left to the caller's hash check. The
/// decoder is safe Rust, but the stream comes from a peer: a panic inside
/// it becomes this frame's error, never the process's.
pub(crate) fn ppmd_decompress(stored: &[u8], len: usize) -> std::result::Result<Vec<u8>, String> {
    use std::io::Read;
    let run = || {
        let mut d = ppmd_rust::Ppmd7Decoder::new(stored, PPMD_ORDER, PPMD_MEM).map_err(|e| format!("ppmd: {e}"))?;
        let mut out = vec![0u8; len];
        d.read_exact(&mut out).map_err(|e| format!("ppmd: {e} (stream of {} bytes for {len})", stored.len()))?;
        Ok(out)
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
        .unwrap_or_else(|_| Err(format!("ppmd: the decoder failed on a stream of {} bytes", stored.len())))
}

/// Highest zstd level a dense request may ask for. 16 is the first level
/// with zstd's optimal parser for 1 MiB frames, here with a short search
/// (`SHORT_SEARCH_LEVEL`): on text (a 200 MiB web log) 13% fewer bytes
/// than level 9. Above it speed falls further for little, and a peer
/// should not be able to make a provider burn that much CPU. A request for
/// PPMd costs a provider about as much per byte as level 16: a core packs
/// kernel code at 8.5 MB/s (zstd 16: 9.9) and text at 30 (zstd 16: 8.5).
/// Random bytes, which PPMd packs at 3 MB/s, reach it only mixed into runs
/// that zstd's fastest level can shrink by 1/16.
pub const MAX_DENSE_LEVEL: u8 = 16;

/// How a dense request wants its solid frames compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dense {
    /// zstd at this level, 1 to [`MAX_DENSE_LEVEL`].
    Zstd(u8),
    /// PPMd for every frame where it is smaller than zstd's fastest level,
    /// that level for the rest (see [`dense_frame`]).
    Ppmd,
}

/// The codec byte of a dense request asking for PPMd; also the level byte
/// of a solid frame whose payload is PPMd (see `store.rs`).
pub(crate) const PPMD_TAG: u8 = 0x80;

impl Dense {
    /// The byte naming this codec on the wire and in a block's level byte.
    pub fn byte(self) -> u8 {
        match self {
            Self::Zstd(level) => level,
            Self::Ppmd => PPMD_TAG,
        }
    }

    /// The codec a request's byte names, or why it names none.
    pub fn from_byte(b: u8) -> Result<Self, DenseFault> {
        match b {
            PPMD_TAG => Ok(Self::Ppmd),
            1..=MAX_DENSE_LEVEL => Ok(Self::Zstd(b)),
            _ => Err(DenseFault::Byte(b)),
        }
    }
}

/// Why a byte or a text names no [`Dense`] codec.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DenseFault {
    /// A request's codec byte: neither a level from 1 to
    /// [`MAX_DENSE_LEVEL`] nor the one for PPMd.
    #[error("dense level {0} is outside 1..={max} (or {tag} for PPMd)", max = MAX_DENSE_LEVEL, tag = PPMD_TAG)]
    Byte(u8),
    /// A text (`--level`): neither `ppmd` nor a level from 1 to
    /// [`MAX_DENSE_LEVEL`].
    #[error("{0:?} is neither ppmd nor a zstd level from 1 to {max}", max = MAX_DENSE_LEVEL)]
    Text(String),
}

impl std::fmt::Display for Dense {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Zstd(level) => write!(f, "{level}"),
            Self::Ppmd => f.write_str("ppmd"),
        }
    }
}

impl std::str::FromStr for Dense {
    type Err = DenseFault;

    /// `ppmd`, or a zstd level from 1 to [`MAX_DENSE_LEVEL`].
    fn from_str(s: &str) -> Result<Self, DenseFault> {
        if s.eq_ignore_ascii_case("ppmd") {
            return Ok(Self::Ppmd);
        }
        match s.parse::<u8>() {
            Ok(level @ 1..=MAX_DENSE_LEVEL) => Ok(Self::Zstd(level)),
            _ => Err(DenseFault::Text(s.to_owned())),
        }
    }
}

/// Encodes `plain`; returns the encoding chosen and the stored bytes.
pub fn encode(plain: &[u8]) -> (Encoding, Vec<u8>) {
    encode_at(plain, 0)
}

/// [`encode`] at zstd `level` (0: the store's, [`zstd_level`]).
pub fn encode_at(plain: &[u8], level: i32) -> (Encoding, Vec<u8>) {
    let z = if level == 0 || level == zstd_level() { compress(plain) } else { compress_at(plain, level) };
    match z {
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
    fn ppmd_round_trips_and_survives_hostile_streams() {
        let text = crate::testing::log_text(200_000, 5);
        let packed = ppmd_compress(&text).unwrap();
        assert!(packed.len() < text.len() / 3, "{} of {}", packed.len(), text.len());
        assert_eq!(ppmd_decompress(&packed, text.len()).unwrap(), text);
        assert!(ppmd_decompress(&packed[..packed.len() / 2], text.len()).is_err(), "a cut stream");
        // Any stream decodes to an error or to some bytes (left to the
        // hash check), never a panic or a hang.
        let sane = |r: std::result::Result<Vec<u8>, String>, len: usize| match r {
            Ok(out) => assert_eq!(out.len(), len, "a decoded stream is exactly as long as asked"),
            Err(e) => assert!(e.starts_with("ppmd: "), "{e}"),
        };
        for seed in 0..32 {
            let n = [0, 1, 5, 64, 4096][seed as usize % 5];
            sane(ppmd_decompress(&crate::testing::noise(n, seed), 65536), 65536);
            let mut bad = packed.clone();
            let at = (seed as usize * 7919) % bad.len();
            bad[at] ^= 1 << (seed % 8);
            sane(ppmd_decompress(&bad, text.len()), text.len());
        }
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
