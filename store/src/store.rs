//! The on-disk store: pack files of encoded chunks, and an index.
//!
//! ```text
//! DATA_DIR/
//!   index.redb           chunk id -> location; names, pins, layers; chunks
//!                        marked damaged (redb)
//!   lock                 flock: writers share it, gc takes it exclusively
//!   packs/
//!     <16 hex>.pack      sealed pack, immutable
//!     <16 hex>.pack.tmp  pack being written; never indexed, removed on open
//!
//! pack  := "XNDPACK1" record*
//! record:= id[32] enc:u8 plain_len:u32le stored_len:u32le payload[stored_len]
//!   enc 0 raw, 1 zstd:  one chunk; id is its id, payload its stored bytes
//!   enc 2 block:        several chunks compressed together (a solid block);
//!                       id = BLAKE3(payload), plain_len = sum of members
//! block payload := n:u24le level:u8 ( id[32] len:u32le ){n} zstd_frame(member plaintexts, in table order)
//!                    level: the zstd level of the frame (0: not recorded);
//!                    on the wire only, 128 (PPMD_TAG): a PPMd stream
//!                    instead of the zstd frame (`codec.rs`)
//! ```
//!
//! Why solid blocks: chunks cut by content from a tree are mostly small
//! files and pieces of similar files, and zstd finds most of its matches
//! across them. Measured on Debian minbase (120 MB, `benches/README.md`):
//! compressing each chunk alone stores 51.7 MB, 1 MiB blocks in tree order
//! about 45 MB (a 4 MiB block 42.6 MB, a whole-tree `tar | zstd -3` 41.5 MB).
//! A reader decompresses the whole block (at most [`BLOCK_MAX_PLAIN`]) and
//! keeps the last few in memory, so a file read in order decompresses each
//! block once. Fixed-size image blocks, manifests and chunks from peers
//! stay single records: they are read at random, one at a time.
//!
//! Why packs and not one file per chunk: a minbase tree is ~6k chunks and a
//! disk image hundreds of thousands. Measured here (`benches/pack-vs-files.py`,
//! 6000 chunks of 8.5 KB): a file per chunk with its fsync took 13.9 s, 0.8 s
//! even without fsync; one pack synced once took 0.2 s. Records are self-describing, so
//! `verify` can rehash every chunk by scanning packs without the index.
//!
//! Crash safety: a pack is written under a `.tmp` name, fsynced, renamed and
//! the directory fsynced *before* its chunks enter the index in one redb
//! transaction. A crash at any point leaves either nothing visible or a
//! sealed pack with no index entries (reclaimed by gc); never an index entry
//! pointing at bytes that are not durable.
//!
//! Damage marks: `verify` records every indexed chunk whose stored copy
//! does not verify (and a read that meets one adds it). While any chunk is
//! marked, the store is *marked damaged*: a put of a chunk that is here
//! rechecks the stored copy and writes the chunk anew when that copy fails
//! ([`Store::holds_intact`]), so a fetch or a publish of the same data
//! repairs it. A new copy goes into a new pack like any chunk; the index
//! moves to it and its mark goes in the seal's one transaction, so a crash
//! leaves the old (damaged) entry and its mark. [`Store::rewrite_pack`]
//! then drops the dead, damaged records from their pack.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::codec::{self, Dense, Encoding, PPMD_TAG};
use crate::error::{Error, IoContext, Result};
use crate::id::ChunkId;

pub(crate) const CHUNKS: TableDefinition<'_, &[u8; 32], &[u8]> = TableDefinition::new("chunks");
pub(crate) const NAMES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("names");
pub(crate) const PINS: TableDefinition<'_, &str, &[u8; 32]> = TableDefinition::new("pins");
/// Key successions, by old key (see `names`).
pub(crate) const SUCCESSORS: TableDefinition<'_, &[u8; 32], &[u8]> = TableDefinition::new("successors");
pub(crate) const LAYERS: TableDefinition<'_, &[u8; 32], &[u8]> = TableDefinition::new("layers");
/// Chunks whose stored copy was found damaged, and why (see the module doc).
pub(crate) const SUSPECT: TableDefinition<'_, &[u8; 32], &str> = TableDefinition::new("suspect");

const PACK_MAGIC: &[u8; 8] = b"XNDPACK1";
const RECORD_HEADER: usize = 32 + 1 + 4 + 4;
/// A pack is sealed once it holds this many bytes.
const PACK_TARGET: u64 = 256 * 1024 * 1024;
/// A solid block is compressed and written once it holds this much plaintext.
pub const BLOCK_TARGET: usize = 1 << 20;
/// The most plaintext a block may claim; a larger table is damage or hostile.
pub const BLOCK_MAX_PLAIN: usize = 16 << 20;
/// Decompressed blocks kept for readers (each at most [`BLOCK_MAX_PLAIN`],
/// usually [`BLOCK_TARGET`] plus one chunk).
const BLOCK_CACHE: usize = 8;
thread_local! {
    /// A reading thread's buffer for the stored bytes of zstd chunks (see
    /// `Store::get`); as large as the largest frame it read (a single
    /// chunk's: solid blocks are read apart).
    static STORED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`Store::will_need`] joins records at most this far apart into one range.
const ADVISE_GAP: u64 = 256 << 10;

/// Where a chunk lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub pack: u64,
    /// Offset of the payload (after the record header).
    pub offset: u64,
    pub stored_len: u32,
    pub plain_len: u32,
    pub encoding: Encoding,
    /// For a block member ([`Encoding::Block`]): where its plaintext starts
    /// in the block's plaintext; `offset` and `stored_len` are the block's.
    pub inner: u32,
}

impl Location {
    fn to_bytes(self) -> [u8; 29] {
        let mut b = [0u8; 29];
        b[0..8].copy_from_slice(&self.pack.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..20].copy_from_slice(&self.stored_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.plain_len.to_le_bytes());
        b[24] = self.encoding as u8;
        b[25..29].copy_from_slice(&self.inner.to_le_bytes());
        b
    }

    /// Index entries are 29 bytes; 25-byte entries predate blocks.
    fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != 25 && b.len() != 29 {
            return None;
        }
        Some(Self {
            pack: u64::from_le_bytes(b[0..8].try_into().ok()?),
            offset: u64::from_le_bytes(b[8..16].try_into().ok()?),
            stored_len: u32::from_le_bytes(b[16..20].try_into().ok()?),
            plain_len: u32::from_le_bytes(b[20..24].try_into().ok()?),
            encoding: Encoding::from_u8(b[24])?,
            inner: if b.len() == 29 { u32::from_le_bytes(b[25..29].try_into().ok()?) } else { 0 },
        })
    }
}

/// Plaintext of chunks collected for one solid block; also how a provider
/// packs the chunks it serves into one solid frame.
#[derive(Default)]
pub struct BlockBuf {
    /// (id, start in `plain`, length), in order.
    members: Vec<(ChunkId, u32, u32)>,
    by_id: HashMap<ChunkId, usize>,
    plain: Vec<u8>,
    /// zstd level to write the block at; 0 for the store's level.
    level: i32,
}

impl BlockBuf {
    /// Appends chunk `id` with plaintext `plain` as the next member.
    pub fn push(&mut self, id: ChunkId, plain: &[u8]) {
        self.by_id.insert(id, self.members.len());
        self.members.push((id, self.plain.len() as u32, plain.len() as u32));
        self.plain.extend_from_slice(plain);
    }

    fn get(&self, id: &ChunkId) -> Option<&[u8]> {
        let &(_, start, len) = self.members.get(*self.by_id.get(id)?)?;
        self.plain.get(start as usize..(start + len) as usize)
    }

    /// Members so far.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether no member was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Plaintext bytes of the members so far.
    pub fn plain_len(&self) -> usize {
        self.plain.len()
    }

    /// The block record's payload: member table, then one zstd frame at
    /// the block's level.
    pub(crate) fn payload(&self) -> Option<Vec<u8>> {
        let level = if self.level == 0 { codec::zstd_level() } else { self.level };
        self.payload_as(Dense::Zstd(u8::try_from(level).unwrap_or(0)))
    }

    /// The payload of this block made by `codec`: at rest, or a solid
    /// frame for a peer ([`codec::dense_frame`]).
    pub fn payload_as(&self, codec: Dense) -> Option<Vec<u8>> {
        let (tag, frame) = codec::dense_frame(&self.plain, codec)?;
        Some(self.with_table(tag, &frame))
    }

    /// The member table, marked with `level`, followed by `frame`.
    fn with_table(&self, level: u8, frame: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 36 * self.members.len() + frame.len());
        out.extend_from_slice(&(self.members.len() as u32 | ((level as u32) << MEMBER_COUNT_BITS)).to_le_bytes());
        for (id, _, len) in &self.members {
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        out.extend_from_slice(frame);
        out
    }
}

/// Chunks put into solid blocks whose record is not written yet: the block
/// being filled, and full ones being compressed outside the lock.
#[derive(Default)]
struct Blocks {
    open: BlockBuf,
    sealing: Vec<Arc<BlockBuf>>,
}

impl Blocks {
    fn get(&self, id: &ChunkId) -> Option<Vec<u8>> {
        self.open.get(id).or_else(|| self.sealing.iter().find_map(|b| b.get(id))).map(<[u8]>::to_vec)
    }

    fn holds(&self, id: &ChunkId) -> bool {
        self.open.by_id.contains_key(id) || self.sealing.iter().any(|b| b.by_id.contains_key(id))
    }
}

/// A block's member table: (id, plaintext length) in order.
pub type Members = Vec<(ChunkId, u32)>;
/// Decompressed blocks by (pack, offset), newest first.
type BlockCache = std::collections::VecDeque<((u64, u64), Arc<Vec<u8>>)>;

/// Bits of a block payload's first word that count its members; the top
/// byte records the zstd level its frame was made at (0: not recorded). A
/// provider forwards a block as it is kept only when that level is at least
/// the one it would compress at for the wire.
const MEMBER_COUNT_BITS: u32 = 24;

/// The zstd level a block payload records (0: not recorded).
pub(crate) fn block_level(payload: &[u8]) -> u8 {
    payload.get(3).copied().unwrap_or(0)
}

/// Why a block payload cannot be opened. Messages name no block: the
/// caller says which (and prefixes `block: `).
#[derive(Debug, thiserror::Error)]
pub(crate) enum BlockFault {
    /// Fewer than the four bytes of the member count.
    #[error("no member count")]
    NoCount,
    /// A member table of `members` entries longer than the payload.
    #[error("member table of {members} entries runs past the block")]
    TablePastEnd { members: usize },
    /// Members whose lengths add up to more than [`BLOCK_MAX_PLAIN`].
    #[error("members claim more than {max} bytes", max = BLOCK_MAX_PLAIN)]
    TooLarge,
    /// The frame does not decompress: the decoder's own message.
    #[error("{0}")]
    Frame(String),
    /// The frame decompresses to another length than the table's total.
    #[error("block decompresses to {plain} bytes, its table says {total}")]
    Length { plain: usize, total: usize },
}

/// Splits a block payload into its member table and its zstd frame.
pub(crate) fn parse_block(payload: &[u8]) -> std::result::Result<(Members, &[u8]), BlockFault> {
    let n = payload.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], 0]) as usize).ok_or(BlockFault::NoCount)?;
    let table = n.checked_mul(36).and_then(|t| t.checked_add(4)).filter(|&t| t <= payload.len());
    let Some(table) = table else { return Err(BlockFault::TablePastEnd { members: n }) };
    let mut members = Vec::with_capacity(n);
    let mut total = 0usize;
    for m in payload[4..table].chunks_exact(36) {
        let id = ChunkId::from_bytes(m[..32].try_into().unwrap_or([0; 32]));
        let len = u32::from_le_bytes([m[32], m[33], m[34], m[35]]);
        total += len as usize;
        if total > BLOCK_MAX_PLAIN {
            return Err(BlockFault::TooLarge);
        }
        members.push((id, len));
    }
    Ok((members, &payload[table..]))
}

/// Decompresses a block payload; returns its members and their plaintext.
pub(crate) fn open_block(payload: &[u8]) -> std::result::Result<(Members, Vec<u8>), BlockFault> {
    let (members, frame) = parse_block(payload)?;
    let total: usize = members.iter().map(|m| m.1 as usize).sum();
    let plain = if block_level(payload) == PPMD_TAG {
        codec::ppmd_decompress(frame, total)
    } else {
        codec::decompress(frame, total)
    }
    .map_err(BlockFault::Frame)?;
    if plain.len() != total {
        return Err(BlockFault::Length { plain: plain.len(), total });
    }
    Ok((members, plain))
}

/// Counters of what a store handle wrote.
#[derive(Debug, Default)]
pub struct WriteStats {
    /// Chunks offered to [`Store::put`].
    pub chunks: AtomicU64,
    /// Of those, chunks not already present, now written.
    pub new_chunks: AtomicU64,
    /// Encoded bytes written for new chunks.
    pub stored_bytes: AtomicU64,
}

struct OpenPack {
    id: u64,
    tmp: PathBuf,
    out: BufWriter<File>,
    len: u64,
    /// Background writeback of what is written so far, so that sealing
    /// waits only for the tail (see [`WRITEBACK_EVERY`]).
    writeback: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    written_back: u64,
}

/// Bytes written to an open pack between background `fdatasync`s. A
/// publish otherwise ends waiting for the whole pack to reach the disk
/// (36 ms of a 0.5 s minbase publish here).
const WRITEBACK_EVERY: u64 = 8 << 20;

impl OpenPack {
    /// Appends one record; returns the offset of its payload.
    fn write_record(&mut self, id: &ChunkId, enc: Encoding, plain_len: u32, payload: &[u8]) -> Result<u64> {
        let mut header = [0u8; RECORD_HEADER];
        header[..32].copy_from_slice(id.as_bytes());
        header[32] = enc as u8;
        header[33..37].copy_from_slice(&plain_len.to_le_bytes());
        header[37..41].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        self.out.write_all(&header).ctx("writing pack", &self.tmp)?;
        self.out.write_all(payload).ctx("writing pack", &self.tmp)?;
        let offset = self.len + RECORD_HEADER as u64;
        self.len = offset + payload.len() as u64;
        if self.len - self.written_back >= WRITEBACK_EVERY && self.writeback.as_ref().is_none_or(|h| h.is_finished()) {
            self.wait_writeback()?;
            self.out.flush().ctx("writing pack", &self.tmp)?;
            let file = self.out.get_ref().try_clone().ctx("writing pack", &self.tmp)?;
            self.writeback = Some(std::thread::spawn(move || file.sync_data()));
            self.written_back = self.len;
        }
        Ok(offset)
    }

    /// Appends a block record; returns its members' locations.
    fn write_block(&mut self, block: &BlockBuf, payload: &[u8]) -> Result<Vec<(ChunkId, Location)>> {
        let offset = self.write_record(&ChunkId::of(payload), Encoding::Block, block.plain.len() as u32, payload)?;
        let at = |&(id, inner, len): &(ChunkId, u32, u32)| {
            let loc = Location {
                pack: self.id,
                offset,
                stored_len: payload.len() as u32,
                plain_len: len,
                encoding: Encoding::Block,
                inner,
            };
            (id, loc)
        };
        Ok(block.members.iter().map(at).collect())
    }

    fn wait_writeback(&mut self) -> Result<()> {
        match self.writeback.take().map(std::thread::JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(Error::io("syncing pack", &self.tmp)(e)),
            Some(Err(_)) => {
                Err(Error::io("syncing pack", &self.tmp)(std::io::Error::other("writeback thread panicked")))
            }
        }
    }

    /// Flushes, waits for background writeback and makes the pack durable.
    fn sync(mut self) -> Result<()> {
        self.wait_writeback()?;
        let file = self.out.into_inner().map_err(|e| Error::io("flushing pack", &self.tmp)(e.into_error()))?;
        file.sync_all().ctx("syncing pack", &self.tmp)
    }
}

/// A handle on a data directory. Cheap to share between threads.
pub struct Store {
    root: PathBuf,
    db: redb::Database,
    open: Mutex<Option<OpenPack>>,
    /// Chunks in the open pack, not yet in the index.
    pending: Mutex<HashMap<ChunkId, Location>>,
    files: Mutex<HashMap<u64, Arc<File>>>,
    /// A snapshot of the chunk index. Lookups through one snapshot take no
    /// file locks, which matters when every chunk of an import asks; it is
    /// renewed after this handle's own commits and on a miss in `get`.
    view: RwLock<Option<IndexView>>,
    blocks: Mutex<Blocks>,
    block_cache: Mutex<BlockCache>,
    /// zstd level of solid blocks put at level 0 and of chunks put alone
    /// (0: the store's level).
    block_level: std::sync::atomic::AtomicI32,
    /// The chunks marked damaged, as last read from the index; renewed
    /// with the index view.
    suspect: RwLock<Option<Arc<HashSet<ChunkId>>>>,
    pub stats: WriteStats,
}

type IndexView = redb::ReadOnlyTable<&'static [u8; 32], &'static [u8]>;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("root", &self.root).finish_non_exhaustive()
    }
}

/// Held while writing into the store; [`Store::gc`] waits for every holder.
#[derive(Debug)]
pub struct WriteLock(#[allow(dead_code)] File);

impl Store {
    /// Opens (creating if needed) the store in `root`.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let packs = root.join("packs");
        fs::create_dir_all(&packs).ctx("creating store directory", &packs)?;
        let db_path = root.join("index.redb");
        let db = redb::Database::builder()
            .set_concurrency_mode(redb::ConcurrencyMode::MultiWriter)
            .create(&db_path)
            .map_err(|e| Error::Db { path: db_path.clone(), source: Box::new(e.into()) })?;
        let store = Self {
            root,
            db,
            open: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            files: Mutex::new(HashMap::new()),
            view: RwLock::new(None),
            blocks: Mutex::new(Blocks::default()),
            block_cache: Mutex::new(BlockCache::new()),
            block_level: std::sync::atomic::AtomicI32::new(0),
            suspect: RwLock::new(None),
            stats: WriteStats::default(),
        };
        let txn = store.begin_write()?;
        for table in [CHUNKS, LAYERS] {
            txn.open_table(table).map_err(|e| store.db_err(e))?;
        }
        txn.open_table(NAMES).map_err(|e| store.db_err(e))?;
        txn.open_table(PINS).map_err(|e| store.db_err(e))?;
        txn.open_table(SUCCESSORS).map_err(|e| store.db_err(e))?;
        txn.open_table(SUSPECT).map_err(|e| store.db_err(e))?;
        txn.commit().map_err(|e| store.db_err(e))?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn packs_dir(&self) -> PathBuf {
        self.root.join("packs")
    }

    pub(crate) fn pack_path(&self, pack: u64) -> PathBuf {
        self.packs_dir().join(format!("{pack:016x}.pack"))
    }

    pub(crate) fn db_err(&self, e: impl Into<redb::Error>) -> Error {
        Error::Db { path: self.root.join("index.redb"), source: Box::new(e.into()) }
    }

    pub(crate) fn begin_write(&self) -> Result<redb::WriteTransaction> {
        let mut txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        txn.set_durability(redb::Durability::Immediate).map_err(|e| self.db_err(e))?;
        Ok(txn)
    }

    pub(crate) fn begin_read(&self) -> Result<redb::ReadTransaction> {
        self.db.begin_read().map_err(|e| self.db_err(e))
    }

    fn lock_file(&self, exclusive: bool) -> Result<WriteLock> {
        let path = self.root.join("lock");
        let f =
            fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).ctx("opening lock", &path)?;
        let op =
            if exclusive { rustix::fs::FlockOperation::LockExclusive } else { rustix::fs::FlockOperation::LockShared };
        rustix::fs::flock(&f, op).ctx("locking", &path)?;
        Ok(WriteLock(f))
    }

    /// Takes the shared write lock: gc will not run until it is dropped.
    pub fn write_lock(&self) -> Result<WriteLock> {
        self.lock_file(false)
    }

    pub(crate) fn exclusive_lock(&self) -> Result<WriteLock> {
        self.lock_file(true)
    }

    /// Where `id` is stored, if it is.
    pub fn locate(&self, id: &ChunkId) -> Result<Option<Location>> {
        if let Some(loc) = self.pending.lock().unwrap_or_else(|e| e.into_inner()).get(id) {
            return Ok(Some(*loc));
        }
        let lookup = |t: &IndexView| -> Result<Option<Location>> {
            match t.get(id.as_bytes()).map_err(|e| self.db_err(e))? {
                None => Ok(None),
                Some(v) => Location::from_bytes(v.value())
                    .map(Some)
                    .ok_or_else(|| Error::ChunkCorrupt { id: *id, why: "index entry does not decode".into() }),
            }
        };
        if let Some(t) = self.view.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return lookup(t);
        }
        let t = self.begin_read()?.open_table(CHUNKS).map_err(|e| self.db_err(e))?;
        let r = lookup(&t);
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Some(t);
        r
    }

    /// Drops the index snapshot; the next lookup sees every commit so far.
    pub fn refresh_view(&self) {
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = None;
        *self.suspect.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The chunks marked damaged (see the module doc).
    fn suspects(&self) -> Result<Arc<HashSet<ChunkId>>> {
        if let Some(s) = self.suspect.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Ok(s.clone());
        }
        let s = Arc::new(self.damage_marks()?.into_iter().map(|(id, _)| id).collect::<HashSet<_>>());
        *self.suspect.write().unwrap_or_else(|e| e.into_inner()) = Some(s.clone());
        Ok(s)
    }

    /// Every chunk marked damaged, with why.
    pub fn damage_marks(&self) -> Result<Vec<(ChunkId, String)>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(SUSPECT).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            out.push((ChunkId::from_bytes(*k.value()), v.value().to_string()));
        }
        Ok(out)
    }

    /// Whether some chunk is marked damaged.
    pub fn is_marked_damaged(&self) -> Result<bool> {
        Ok(!self.suspects()?.is_empty())
    }

    /// Marks chunks damaged; with `replace`, these become the only marks.
    pub fn mark_damaged(&self, marks: &[(ChunkId, String)], replace: bool) -> Result<()> {
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(SUSPECT).map_err(|e| self.db_err(e))?;
            if replace {
                t.retain(|_, _| false).map_err(|e| self.db_err(e))?;
            }
            for (id, why) in marks {
                t.insert(id.as_bytes(), why.as_str()).map_err(|e| self.db_err(e))?;
            }
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        *self.suspect.write().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }

    /// Records that a read found the stored copy of `id` damaged; best
    /// effort (the read fails either way).
    fn note_damage(&self, e: &Error) {
        if let Error::ChunkCorrupt { id, why } = e
            && let Err(m) = self.mark_damaged(&[(*id, why.clone())], false)
        {
            tracing::warn!("marking chunk {id} damaged: {m}");
        }
    }

    /// Whether a stored copy of `id` must be written anew: it is marked
    /// damaged, or the store is and the copy no longer verifies. A copy
    /// written by this handle and not yet sealed is fresh.
    fn stale_copy(&self, id: &ChunkId) -> Result<bool> {
        let s = self.suspects()?;
        if s.is_empty() {
            return Ok(false);
        }
        if self.pending.lock().unwrap_or_else(|e| e.into_inner()).contains_key(id) || self.lock_blocks().holds(id) {
            return Ok(false);
        }
        if s.contains(id) {
            return Ok(true);
        }
        match self.get(id) {
            Ok(_) => Ok(false),
            // `get` marked it.
            Err(Error::ChunkCorrupt { .. }) => Ok(true),
            Err(Error::ChunkMissing { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether `id` is here and, while the store is marked damaged, its
    /// stored copy verifies: what a fetch may skip.
    pub fn holds_intact(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.contains(id)? && !self.stale_copy(id)?)
    }

    pub fn contains(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.locate(id)?.is_some() || self.lock_blocks().holds(id))
    }

    fn lock_blocks(&self) -> MutexGuard<'_, Blocks> {
        self.blocks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `plain` unless present; returns its id and whether it was new.
    pub fn put(&self, plain: &[u8]) -> Result<(ChunkId, bool)> {
        let id = ChunkId::of(plain);
        let new = self.put_with_id(id, plain)?;
        Ok((id, new))
    }

    /// Stores `plain`, already known to hash to `id`.
    pub(crate) fn put_with_id(&self, id: ChunkId, plain: &[u8]) -> Result<bool> {
        self.stats.chunks.fetch_add(1, Ordering::Relaxed);
        if self.contains(&id)? && !self.stale_copy(&id)? {
            return Ok(false);
        }
        let (enc, stored) = codec::encode_at(plain, self.block_level.load(Ordering::Relaxed));
        self.append(id, enc, &stored, plain.len() as u32)
    }

    /// Stores `plain` unless present, compressed together with the chunks
    /// put next to it (a solid block). For chunks of files cut by content,
    /// which are read in order; [`Store::flush`] writes the last block.
    pub fn put_solid(&self, plain: &[u8]) -> Result<(ChunkId, bool)> {
        self.put_solid_at(plain, 0)
    }

    /// Makes this handle write the solid blocks it is given no level for,
    /// and the chunks it stores alone ([`Store::put`]: blocks of disk
    /// images and sparse files), at zstd `level` (0: the store's level),
    /// as `--level` asks of a command that writes a layer. A chunk
    /// decompresses as fast whatever its level, and a provider sends
    /// chunks and blocks as they are kept: a high level spends CPU once
    /// for fewer bytes on every later fetch.
    pub fn set_block_level(&self, level: i32) {
        self.block_level.store(level, Ordering::Relaxed);
    }

    /// [`Store::put_solid`] into a block compressed at zstd `level` (0: this
    /// handle's block level, see [`Store::set_block_level`]). A block holds
    /// chunks of one level: a chunk of another closes the open block first.
    pub fn put_solid_at(&self, plain: &[u8], level: i32) -> Result<(ChunkId, bool)> {
        let level = if level == 0 { self.block_level.load(Ordering::Relaxed) } else { level };
        let id = ChunkId::of(plain);
        self.stats.chunks.fetch_add(1, Ordering::Relaxed);
        if self.locate(&id)?.is_some() && !self.stale_copy(&id)? {
            return Ok((id, false));
        }
        let level = if level == codec::zstd_level() { 0 } else { level };
        let mut seal = Vec::new();
        {
            let mut b = self.lock_blocks();
            if b.holds(&id) {
                return Ok((id, false));
            }
            if b.open.level != level && !b.open.members.is_empty() {
                let other = Arc::new(std::mem::take(&mut b.open));
                b.sealing.push(other.clone());
                seal.push(other);
            }
            b.open.level = level;
            b.open.push(id, plain);
            if b.open.plain.len() >= BLOCK_TARGET {
                let full = Arc::new(std::mem::take(&mut b.open));
                b.sealing.push(full.clone());
                seal.push(full);
            }
        }
        for block in &seal {
            self.write_block(block)?;
        }
        Ok((id, true))
    }

    /// The payload of the solid block that `id` opens (is the first member
    /// of), with its member table, as kept; `None` when `id` is stored
    /// otherwise or further into its block.
    pub fn whole_block(&self, id: &ChunkId) -> Result<Option<(Members, Vec<u8>)>> {
        let Some(loc) = self.locate(id)? else { return Ok(None) };
        if loc.encoding != Encoding::Block || loc.inner != 0 {
            return Ok(None);
        }
        let payload = self.read_stored(id, &loc)?;
        let (members, _) = parse_block(&payload)
            .map_err(|why| self.placed(Error::ChunkCorrupt { id: *id, why: format!("block: {why}") }, &loc))?;
        Ok(Some((members, payload)))
    }

    /// Which stored solid block holds each of `ids`, and where in it:
    /// `(block, start)`, with `block` a key for this store's block (0 for
    /// a chunk kept alone or not here) and `start` the member's offset in
    /// the block's plaintext. A fetcher that asks for each block's members
    /// together and in this order asks for whole blocks, which a provider
    /// sends as they are kept.
    pub fn block_layout(&self, ids: &[ChunkId]) -> Result<Vec<(u64, u32)>> {
        ids.iter()
            .map(|id| {
                Ok(match self.locate(id)? {
                    Some(loc) if loc.encoding == Encoding::Block => {
                        ((loc.pack.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ loc.offset) | 1, loc.inner)
                    }
                    _ => (0, 0),
                })
            })
            .collect()
    }

    /// Compresses a full block and appends its record; its members stay
    /// readable from memory until their locations are pending.
    fn write_block(&self, block: &Arc<BlockBuf>) -> Result<()> {
        let payload = block.payload();
        let result = match payload {
            None => Err(Error::io("compressing a block for", self.packs_dir())(std::io::Error::other("zstd failed"))),
            Some(payload) => {
                let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
                self.write_block_record(&mut open, block, &payload)
            }
        };
        self.lock_blocks().sealing.retain(|b| !Arc::ptr_eq(b, block));
        result
    }

    fn write_block_record(
        &self,
        open: &mut MutexGuard<'_, Option<OpenPack>>,
        block: &BlockBuf,
        payload: &[u8],
    ) -> Result<()> {
        let (members, full) =
            self.write_open(open, |pack| Ok((pack.write_block(block, payload)?, pack.len >= PACK_TARGET)))?;
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut new = 0u64;
        for (id, loc) in members {
            if pending.insert(id, loc).is_none() {
                new += 1;
            }
        }
        self.stats.new_chunks.fetch_add(new, Ordering::Relaxed);
        self.stats.stored_bytes.fetch_add(payload.len() as u64, Ordering::Relaxed);
        drop(pending);
        if full {
            self.seal(open)?;
        }
        Ok(())
    }

    /// Stores the chunks of a solid frame from a peer, which must be
    /// exactly `expect`, in order, each hashing to its id. When none of
    /// them is here yet the block is kept as it came; otherwise, and
    /// always for a PPMd frame (slow to decode, so never kept), the new
    /// ones go into this store's own blocks. Returns the members' lengths.
    pub fn put_solid_frame(&self, block: &[u8], expect: &[ChunkId]) -> Result<Vec<u32>> {
        let first = expect.first().copied().unwrap_or(ChunkId::from_bytes([0; 32]));
        let (members, plain) =
            open_block(block).map_err(|why| Error::ChunkCorrupt { id: first, why: format!("solid frame: {why}") })?;
        if members.len() != expect.len() {
            let why = format!("solid frame holds {} chunks for {} asked", members.len(), expect.len());
            return Err(Error::ChunkCorrupt { id: first, why });
        }
        let mut buf = BlockBuf { plain, ..BlockBuf::default() };
        let mut start = 0u32;
        for ((id, len), want) in members.iter().zip(expect) {
            let part = &buf.plain[start as usize..(start + len) as usize];
            if id != want || ChunkId::of(part) != *want {
                return Err(Error::ChunkCorrupt {
                    id: *want,
                    why: "solid frame: content does not hash to its id".into(),
                });
            }
            buf.members.push((*id, start, *len));
            start += len;
        }
        let mut fresh = block_level(block) != PPMD_TAG;
        for (id, _) in &members {
            if self.contains(id)? {
                fresh = false;
                break;
            }
        }
        if fresh {
            self.stats.chunks.fetch_add(members.len() as u64, Ordering::Relaxed);
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            self.write_block_record(&mut open, &buf, block)?;
        } else {
            for &(_, start, len) in &buf.members {
                self.put_solid(&buf.plain[start as usize..(start + len) as usize])?;
            }
        }
        Ok(members.iter().map(|m| m.1).collect())
    }

    /// The plaintext of `id` if this store keeps it in a solid block (or
    /// is still collecting one); `None` when it is stored alone.
    pub fn member_plain(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        if let Some(plain) = self.lock_blocks().get(id) {
            return Ok(Some(plain));
        }
        let loc = self.find(id)?;
        if loc.encoding == Encoding::Block { self.block_member(id, &loc).map(Some) } else { Ok(None) }
    }

    /// Stores an already encoded chunk (from a peer) after verifying it.
    pub fn put_encoded(&self, id: ChunkId, enc: Encoding, stored: &[u8], plain_len: u32) -> Result<bool> {
        if enc == Encoding::Block {
            return Err(Error::ChunkCorrupt { id, why: "a single chunk cannot be a block member".into() });
        }
        codec::decode(&id, enc, stored, plain_len as usize)?;
        if self.contains(&id)? && !self.stale_copy(&id)? {
            return Ok(false);
        }
        self.stats.chunks.fetch_add(1, Ordering::Relaxed);
        self.append(id, enc, stored, plain_len)
    }

    /// Stores an encoded chunk (from a peer, for a repair) after verifying
    /// it, whether or not a copy is here: the index moves to the new copy
    /// when the pack is sealed.
    pub fn replace_encoded(&self, id: ChunkId, enc: Encoding, stored: &[u8], plain_len: u32) -> Result<()> {
        if enc == Encoding::Block {
            return Err(Error::ChunkCorrupt { id, why: "a single chunk cannot be a block member".into() });
        }
        codec::decode(&id, enc, stored, plain_len as usize)?;
        self.stats.chunks.fetch_add(1, Ordering::Relaxed);
        self.append(id, enc, stored, plain_len).map(drop)
    }

    fn append(&self, id: ChunkId, enc: Encoding, stored: &[u8], plain_len: u32) -> Result<bool> {
        // Holding `open` serialises every change to `pending`.
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if self.pending.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&id) {
            return Ok(false);
        }
        let (pack, offset, full) = self.write_open(&mut open, |pack| {
            let offset = pack.write_record(&id, enc, plain_len, stored)?;
            Ok((pack.id, offset, pack.len >= PACK_TARGET))
        })?;
        let loc = Location { pack, offset, stored_len: stored.len() as u32, plain_len, encoding: enc, inner: 0 };
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(id, loc);
        self.stats.new_chunks.fetch_add(1, Ordering::Relaxed);
        self.stats.stored_bytes.fetch_add(stored.len() as u64, Ordering::Relaxed);
        if full {
            self.seal(&mut open)?;
        }
        Ok(true)
    }

    fn new_pack(&self) -> Result<OpenPack> {
        let mut r = [0u8; 8];
        rustix::rand::getrandom(&mut r, rustix::rand::GetRandomFlags::empty())
            .ctx("getting random bytes for", self.packs_dir())?;
        let id = u64::from_le_bytes(r);
        let tmp = self.packs_dir().join(format!("{id:016x}.pack.tmp"));
        let f = fs::OpenOptions::new().write(true).create_new(true).open(&tmp).ctx("creating pack", &tmp)?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        if let Err(e) = out.write_all(PACK_MAGIC).and_then(|()| out.flush()) {
            drop(out);
            let _ = fs::remove_file(&tmp);
            return Err(Error::io("writing pack", &tmp)(e));
        }
        Ok(OpenPack { id, tmp, out, len: PACK_MAGIC.len() as u64, writeback: None, written_back: 0 })
    }

    /// Runs `write` on the open pack, opening one first if none is. When it
    /// fails, the pack is given up (see [`Store::abandon_pack`]).
    fn write_open<T>(
        &self,
        open: &mut MutexGuard<'_, Option<OpenPack>>,
        write: impl FnOnce(&mut OpenPack) -> Result<T>,
    ) -> Result<T> {
        if open.is_none() {
            **open = Some(self.new_pack()?);
        }
        let Some(pack) = open.as_mut() else { unreachable!("just opened") };
        write(pack).inspect_err(|e| {
            if let Some(pack) = open.take() {
                let (id, tmp) = (pack.id, pack.tmp.clone());
                drop(pack);
                self.abandon_pack(id, &tmp, e);
            }
        })
    }

    /// Gives up pack `id` (still at `tmp`) after a write or sync of it
    /// failed, a full disk say: a record in it may be torn, so nothing more
    /// goes into it. The chunks put into it since the last seal were never
    /// durable and are forgotten, so this handle never points into a file
    /// that is not there; what earlier seals made durable is untouched.
    fn abandon_pack(&self, id: u64, tmp: &Path, e: &Error) {
        tracing::warn!("giving up unsealed pack {}: {e}", tmp.display());
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, l| l.pack != id);
        self.forget_pack_file(id);
        let _ = fs::remove_file(tmp);
    }

    /// Makes the open pack durable and indexes its chunks.
    fn seal(&self, open: &mut MutexGuard<'_, Option<OpenPack>>) -> Result<()> {
        let Some(pack) = open.take() else { return Ok(()) };
        let (id, tmp) = (pack.id, pack.tmp.clone());
        let path = self.pack_path(id);
        if let Err(e) = pack.sync().and_then(|()| fs::rename(&tmp, &path).ctx("sealing pack", &path)) {
            self.abandon_pack(id, &tmp, &e);
            return Err(e);
        }
        sync_dir(&self.packs_dir())?;
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let txn = self.begin_write()?;
        {
            let mut table = txn.open_table(CHUNKS).map_err(|e| self.db_err(e))?;
            for (id, loc) in pending.iter() {
                table.insert(id.as_bytes(), loc.to_bytes().as_slice()).map_err(|e| self.db_err(e))?;
            }
            // A new copy of a chunk marked damaged replaces the old one.
            // Read here, not from this handle's cache: another process
            // (a mount, a verify) may have marked chunks since.
            let mut marks = txn.open_table(SUSPECT).map_err(|e| self.db_err(e))?;
            if !marks.is_empty().map_err(|e| self.db_err(e))? {
                let mut fixed = Vec::new();
                for item in marks.iter().map_err(|e| self.db_err(e))? {
                    let id = ChunkId::from_bytes(*item.map_err(|e| self.db_err(e))?.0.value());
                    if pending.contains_key(&id) {
                        fixed.push(id);
                    }
                }
                for id in fixed {
                    marks.remove(id.as_bytes()).map_err(|e| self.db_err(e))?;
                }
            }
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        self.refresh_view();
        pending.clear();
        Ok(())
    }

    /// Makes everything put so far durable and visible to other handles.
    pub fn flush(&self) -> Result<()> {
        let last = {
            let mut b = self.lock_blocks();
            if b.open.members.is_empty() {
                None
            } else {
                let last = Arc::new(std::mem::take(&mut b.open));
                b.sealing.push(last.clone());
                Some(last)
            }
        };
        if let Some(last) = last {
            self.write_block(&last)?;
        }
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        self.seal(&mut open)
    }

    fn pack_file(&self, pack: u64) -> Result<Arc<File>> {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = files.get(&pack) {
            return Ok(f.clone());
        }
        let path = self.pack_path(pack);
        let f = match File::open(&path) {
            Ok(f) => f,
            // Still being written by this handle.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
                match open.as_mut() {
                    Some(p) if p.id == pack => {
                        p.out.flush().ctx("flushing pack", &p.tmp)?;
                        return Ok(Arc::new(File::open(&p.tmp).ctx("opening pack", &p.tmp)?));
                    }
                    // Sealed since the open above: a pack is renamed into
                    // place under this lock, so it is there now.
                    _ => File::open(&path).ctx("opening pack", &path)?,
                }
            }
            Err(e) => return Err(Error::io("opening pack", &path)(e)),
        };
        let f = Arc::new(f);
        files.insert(pack, f.clone());
        Ok(f)
    }

    /// Asks the kernel to start reading the stored bytes of `ids` (those
    /// this store has) into the page cache, so that decoding them soon
    /// does not wait for the disk: read-ahead of packs for a reader that
    /// knows what it reads next. The chunks of a file put in order lie
    /// close together in a pack, so their records are advised as a few
    /// ranges (records less than [`ADVISE_GAP`] apart are joined). Only
    /// advice: a chunk not found or a refused call is skipped.
    pub fn will_need(&self, ids: &[ChunkId]) {
        let mut at: Vec<(u64, u64, u64)> = ids
            .iter()
            .filter_map(|id| self.locate(id).ok().flatten())
            .map(|l| (l.pack, l.offset, l.offset + u64::from(l.stored_len)))
            .collect();
        at.sort_unstable();
        let mut i = 0;
        while i < at.len() {
            let (pack, start, mut end) = at[i];
            i += 1;
            while i < at.len() && at[i].0 == pack && at[i].1 <= end + ADVISE_GAP {
                end = end.max(at[i].2);
                i += 1;
            }
            if let Ok(f) = self.pack_file(pack) {
                let _ = rustix::fs::fadvise(
                    &*f,
                    start,
                    std::num::NonZeroU64::new(end - start),
                    rustix::fs::Advice::WillNeed,
                );
            }
        }
    }

    /// Where `id` is, looking again at the index on a miss: another
    /// process may have added it since this handle's snapshot.
    fn find(&self, id: &ChunkId) -> Result<Location> {
        match self.locate(id)? {
            Some(loc) => Ok(loc),
            None => {
                self.refresh_view();
                self.locate(id)?.ok_or(Error::ChunkMissing { id: *id })
            }
        }
    }

    /// The stored bytes at `loc`, read into a new buffer that is not
    /// zeroed first (every byte is overwritten by the read, or it fails):
    /// a raw chunk's buffer becomes its plaintext, so zeroing it was 6% of
    /// the server's CPU in a first read of incompressible data.
    fn read_stored(&self, id: &ChunkId, loc: &Location) -> Result<Vec<u8>> {
        let n = loc.stored_len as usize;
        let file = self.pack_file(loc.pack)?;
        let mut buf = Vec::with_capacity(n);
        let fault = |why: String| Error::ChunkCorrupt {
            id: *id,
            why: format!("reading {} at {}: {why}", self.pack_path(loc.pack).display(), loc.offset),
        };
        while buf.len() < n {
            let done = buf.len();
            let spare = &mut buf.spare_capacity_mut()[..n - done];
            match rustix::io::pread(&*file, spare, loc.offset + done as u64).map(|(got, _)| got.len()) {
                Ok(0) => return Err(fault("failed to fill whole buffer".into())),
                Ok(got) => {
                    // SAFETY: `pread` initialised the `got` bytes after the
                    // first `done`, within the capacity.
                    unsafe { buf.set_len(done + got) };
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(fault(std::io::Error::from(e).to_string())),
            }
        }
        Ok(buf)
    }

    /// Fills `buf` from the start of the record payload at `loc`.
    fn read_at(&self, id: &ChunkId, loc: &Location, buf: &mut [u8]) -> Result<()> {
        self.pack_file(loc.pack)?.read_exact_at(buf, loc.offset).map_err(|e| Error::ChunkCorrupt {
            id: *id,
            why: format!("reading {} at {}: {e}", self.pack_path(loc.pack).display(), loc.offset),
        })
    }

    /// The stored bytes of `id` as one chunk's encoding, for sending: a
    /// block member is taken out of its block and encoded alone.
    pub fn get_encoded(&self, id: &ChunkId) -> Result<(Location, Vec<u8>)> {
        let staged = self.lock_blocks().get(id);
        if staged.is_none() && self.suspects()?.contains(id) {
            return Err(Error::ChunkCorrupt { id: *id, why: "marked damaged in this store".into() });
        }
        let (loc, plain) = match staged {
            Some(plain) => (None, plain),
            None => {
                let loc = self.find(id)?;
                if loc.encoding != Encoding::Block {
                    return Ok((loc, self.read_stored(id, &loc)?));
                }
                (Some(loc), self.block_member(id, &loc)?)
            }
        };
        let (encoding, stored) = codec::encode(&plain);
        let at = loc.unwrap_or(Location { pack: 0, offset: 0, stored_len: 0, plain_len: 0, encoding, inner: 0 });
        Ok((
            Location { encoding, stored_len: stored.len() as u32, plain_len: plain.len() as u32, inner: 0, ..at },
            stored,
        ))
    }

    /// Reads, decodes and verifies chunk `id`. A stored copy that does not
    /// verify is marked damaged (see the module doc).
    pub fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        self.get_unmarked(id).inspect_err(|e| self.note_damage(e))
    }

    fn get_unmarked(&self, id: &ChunkId) -> Result<Vec<u8>> {
        if let Some(plain) = self.lock_blocks().get(id) {
            return Ok(plain);
        }
        let loc = self.find(id)?;
        if loc.encoding == Encoding::Block {
            return self.block_member(id, &loc);
        }
        if loc.encoding == codec::Encoding::Zstd {
            // The frame is read into this thread's buffer, kept between
            // reads: no allocation, and no zeroing of bytes about to be
            // overwritten, per chunk; only the plaintext is a new buffer.
            return STORED.with(|b| {
                let mut b = b.borrow_mut();
                let n = loc.stored_len as usize;
                if b.len() < n {
                    b.resize(n, 0);
                }
                self.read_at(id, &loc, &mut b[..n])?;
                codec::decode(id, loc.encoding, &b[..n], loc.plain_len as usize).map_err(|e| self.placed(e, &loc))
            });
        }
        let stored = self.read_stored(id, &loc)?;
        if loc.encoding == codec::Encoding::Raw && stored.len() == loc.plain_len as usize && ChunkId::of(&stored) == *id
        {
            // Stored raw and intact: the bytes read are the chunk, no copy needed.
            return Ok(stored);
        }
        codec::decode(id, loc.encoding, &stored, loc.plain_len as usize).map_err(|e| self.placed(e, &loc))
    }

    /// Adds where a corrupt chunk was found to its error.
    fn placed(&self, e: Error, loc: &Location) -> Error {
        match e {
            Error::ChunkCorrupt { id, why } => Error::ChunkCorrupt {
                id,
                why: format!("{why} (in {} at offset {})", self.pack_path(loc.pack).display(), loc.offset),
            },
            e => e,
        }
    }

    /// One member of a solid block, verified.
    fn block_member(&self, id: &ChunkId, loc: &Location) -> Result<Vec<u8>> {
        let block = self.block_plain(id, loc)?;
        let (start, len) = (loc.inner as usize, loc.plain_len as usize);
        let Some(plain) = block.get(start..start + len) else {
            let why = format!("block holds {} bytes, the member is at {start}+{len}", block.len());
            return Err(self.placed(Error::ChunkCorrupt { id: *id, why }, loc));
        };
        codec::verify(id, plain.to_vec(), len).map_err(|e| self.placed(e, loc))
    }

    /// The plaintext of the block at `loc`, from the cache or the pack.
    fn block_plain(&self, id: &ChunkId, loc: &Location) -> Result<Arc<Vec<u8>>> {
        let key = (loc.pack, loc.offset);
        {
            let mut cache = self.block_cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = cache.iter().position(|(k, _)| *k == key) {
                let hit = cache.remove(i).unwrap_or_else(|| unreachable!("index from position"));
                let plain = hit.1.clone();
                cache.push_front(hit);
                return Ok(plain);
            }
        }
        let payload = self.read_stored(id, loc)?;
        let plain = match open_block(&payload) {
            Ok((_, plain)) => Arc::new(plain),
            Err(why) => return Err(self.placed(Error::ChunkCorrupt { id: *id, why: format!("block: {why}") }, loc)),
        };
        let mut cache = self.block_cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.push_front((key, plain.clone()));
        cache.truncate(BLOCK_CACHE);
        Ok(plain)
    }

    /// Every sealed pack's id and path.
    pub(crate) fn packs(&self) -> Result<Vec<(u64, PathBuf)>> {
        let dir = self.packs_dir();
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).ctx("listing", &dir)? {
            let e = e.ctx("listing", &dir)?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(hex) = name.strip_suffix(".pack")
                && let Ok(id) = u64::from_str_radix(hex, 16)
            {
                out.push((id, e.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Leftover `.pack.tmp` files from interrupted writes.
    pub(crate) fn stale_tmp_packs(&self) -> Result<Vec<PathBuf>> {
        let dir = self.packs_dir();
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).ctx("listing", &dir)? {
            let e = e.ctx("listing", &dir)?;
            if e.file_name().to_string_lossy().ends_with(".pack.tmp") {
                out.push(e.path());
            }
        }
        Ok(out)
    }

    /// Every index entry.
    pub(crate) fn index_entries(&self) -> Result<Vec<(ChunkId, Location)>> {
        let mut out = Vec::new();
        self.scan_index(|_| {}, |id, loc| out.push((id, loc)))?;
        Ok(out)
    }

    /// Streams the index: `len` first gets the number of entries, then
    /// `each` every entry, all from one read transaction.
    pub(crate) fn scan_index(&self, len: impl FnOnce(u64), mut each: impl FnMut(ChunkId, Location)) -> Result<()> {
        let txn = self.begin_read()?;
        let table = txn.open_table(CHUNKS).map_err(|e| self.db_err(e))?;
        len(table.len().map_err(|e| self.db_err(e))?);
        for item in table.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            let id = ChunkId::from_bytes(*k.value());
            let loc = Location::from_bytes(v.value())
                .ok_or_else(|| Error::ChunkCorrupt { id, why: "index entry does not decode".into() })?;
            each(id, loc);
        }
        Ok(())
    }

    /// Gives space the index no longer uses back to the file system. Needs
    /// the only handle on the store; returns whether anything was done.
    pub fn compact(&mut self) -> Result<bool> {
        self.refresh_view();
        self.db.compact().map_err(|e| Error::Db { path: self.root.join("index.redb"), source: Box::new(e.into()) })
    }

    /// Number of chunks in the index.
    pub fn chunk_count(&self) -> Result<u64> {
        let txn = self.begin_read()?;
        let table = txn.open_table(CHUNKS).map_err(|e| self.db_err(e))?;
        table.len().map_err(|e| self.db_err(e))
    }

    /// Sealed packs: how many, and their bytes on disk.
    pub fn pack_usage(&self) -> Result<(u64, u64)> {
        let packs = self.packs()?;
        let bytes = packs.iter().filter_map(|(_, p)| fs::metadata(p).ok()).map(|m| m.len()).sum();
        Ok((packs.len() as u64, bytes))
    }

    pub(crate) fn forget_pack_file(&self, pack: u64) {
        self.files.lock().unwrap_or_else(|e| e.into_inner()).remove(&pack);
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // An unflushed pack is left as .tmp and removed by gc; flushing here
        // would hide a caller's missing flush on the success path only.
        if let Ok(mut open) = self.open.lock()
            && let Some(mut p) = open.take()
        {
            let _ = p.wait_writeback();
            drop(p.out);
            let _ = fs::remove_file(&p.tmp);
        }
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).ctx("syncing directory", dir)
}

/// One chunk read back from a pack by [`scan_pack`]. A block member
/// comes with its plaintext as `stored` (its encoding is
/// [`Encoding::Block`]), or with `damaged` when its block does not open.
pub(crate) struct Record {
    pub id: ChunkId,
    pub loc: Location,
    pub stored: Vec<u8>,
    pub damaged: Option<String>,
    /// For a block member: the zstd level its block records.
    pub level: u8,
}

/// Reads every record of a pack in order; stops with an error at the first
/// record that cannot be framed.
pub(crate) fn scan_pack(pack: u64, path: &Path, mut each: impl FnMut(Record) -> Result<()>) -> Result<()> {
    let f = File::open(path).ctx("opening pack", path)?;
    let total = f.metadata().ctx("reading size of", path)?.len();
    let mut r = std::io::BufReader::with_capacity(1 << 20, f);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).ctx("reading pack header", path)?;
    if &magic != PACK_MAGIC {
        return Err(Error::bad_input(path.display().to_string(), "not a pack file (bad magic)"));
    }
    let mut pos = 8u64;
    while pos < total {
        let mut h = [0u8; RECORD_HEADER];
        r.read_exact(&mut h)
            .map_err(|_| Error::bad_input(format!("{} at offset {pos}", path.display()), "truncated record header"))?;
        let id = ChunkId::from_bytes(h[..32].try_into().unwrap_or([0; 32]));
        let enc = Encoding::from_u8(h[32]).ok_or_else(|| {
            Error::bad_input(format!("{} at offset {pos}", path.display()), format!("unknown encoding {}", h[32]))
        })?;
        let plain_len = u32::from_le_bytes(h[33..37].try_into().unwrap_or_default());
        let stored_len = u32::from_le_bytes(h[37..41].try_into().unwrap_or_default());
        if pos + (RECORD_HEADER as u64) + stored_len as u64 > total {
            return Err(Error::bad_input(
                format!("{} at offset {pos}", path.display()),
                "record runs past end of pack",
            ));
        }
        let mut stored = vec![0u8; stored_len as usize];
        r.read_exact(&mut stored).ctx("reading pack", path)?;
        let loc = Location { pack, offset: pos + RECORD_HEADER as u64, stored_len, plain_len, encoding: enc, inner: 0 };
        let at = pos;
        pos += RECORD_HEADER as u64 + stored_len as u64;
        if enc != Encoding::Block {
            each(Record { id, loc, stored, damaged: None, level: 0 })?;
            continue;
        }
        let (members, _) = parse_block(&stored)
            .map_err(|why| Error::bad_input(format!("{} at offset {at}", path.display()), format!("block: {why}")))?;
        let opened = open_block(&stored);
        let level = block_level(&stored);
        let mut inner = 0u32;
        for (id, len) in members {
            let loc = Location { plain_len: len, inner, ..loc };
            let (stored, damaged) = match &opened {
                Ok((_, plain)) => (plain[inner as usize..(inner + len) as usize].to_vec(), None),
                Err(why) => (Vec::new(), Some(format!("block at offset {at}: {why}"))),
            };
            inner += len;
            each(Record { id, loc, stored, damaged, level })?;
        }
    }
    Ok(())
}

/// Copies live records into a fresh sealed pack; returns its id and the
/// records' new locations. Block members are packed into new blocks of
/// live chunks only.
pub(crate) fn write_pack(
    store: &Store,
    records: impl Iterator<Item = Record>,
) -> Result<(u64, Vec<(ChunkId, Location)>)> {
    let mut pack = store.new_pack()?;
    let mut out = Vec::new();
    let mut block = BlockBuf::default();
    let put_block = |pack: &mut OpenPack, block: &mut BlockBuf, out: &mut Vec<(ChunkId, Location)>| -> Result<()> {
        if block.members.is_empty() {
            return Ok(());
        }
        let payload = block
            .payload()
            .ok_or_else(|| Error::io("compressing a block for", &pack.tmp)(std::io::Error::other("zstd failed")))?;
        out.extend(pack.write_block(block, &payload)?);
        *block = BlockBuf::default();
        Ok(())
    };
    for rec in records {
        if rec.loc.encoding == Encoding::Block {
            // Kept at the highest level among the blocks its members came
            // from, so a layer published at a high level stays so.
            block.level = block.level.max(i32::from(rec.level));
            block.push(rec.id, &rec.stored);
            if block.plain.len() >= BLOCK_TARGET {
                put_block(&mut pack, &mut block, &mut out)?;
            }
            continue;
        }
        let offset = pack.write_record(&rec.id, rec.loc.encoding, rec.loc.plain_len, &rec.stored)?;
        out.push((rec.id, Location { pack: pack.id, offset, ..rec.loc }));
    }
    put_block(&mut pack, &mut block, &mut out)?;
    let (id, tmp) = (pack.id, pack.tmp.clone());
    pack.sync()?;
    let path = store.pack_path(id);
    fs::rename(&tmp, &path).ctx("sealing pack", &path)?;
    sync_dir(&store.packs_dir())?;
    Ok((id, out))
}

/// What [`Store::rewrite_pack`] did with a pack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PackRewrite {
    /// Its `records` live chunks were copied into pack `into` (none when
    /// no chunk lived in it) and the pack was removed.
    Rewritten { records: u64, into: Option<u64> },
    /// Left as it is: `chunk`, which the index keeps in it, does not
    /// verify, and that damaged record is still the only copy here.
    Kept { chunk: ChunkId, why: String },
}

impl Store {
    /// Rewrites pack `pack` without its dead records (damaged copies of
    /// chunks since stored anew, chunks no longer indexed): every chunk the
    /// index keeps in it is read, verified and copied into a new sealed
    /// pack, the index moves to the copies, and only then is the old file
    /// removed, so a crash at any point loses nothing. Streams: memory
    /// holds one block at a time. Holds the store lock exclusively, like gc.
    pub fn rewrite_pack(&self, pack: u64) -> Result<PackRewrite> {
        let _lock = self.exclusive_lock()?;
        self.flush()?;
        self.rewrite_pack_locked(pack)
    }

    /// [`Store::rewrite_pack`] for a caller that holds the lock exclusively.
    pub(crate) fn rewrite_pack_locked(&self, pack: u64) -> Result<PackRewrite> {
        let path = self.pack_path(pack);
        let mut entries: Vec<(ChunkId, Location)> =
            self.index_entries()?.into_iter().filter(|(_, l)| l.pack == pack).collect();
        entries.sort_by_key(|(_, l)| (l.offset, l.inner));
        if entries.is_empty() {
            self.forget_pack_file(pack);
            fs::remove_file(&path).ctx("removing", &path)?;
            sync_dir(&self.packs_dir())?;
            return Ok(PackRewrite::Rewritten { records: 0, into: None });
        }
        let failed = std::cell::RefCell::new(None);
        let mut levels: HashMap<u64, u8> = HashMap::new();
        let records = entries.iter().map_while(|(id, loc)| match self.intact_record(id, loc, &mut levels) {
            Ok(r) => Some(r),
            Err(e) => {
                *failed.borrow_mut() = Some((*id, e.to_string()));
                None
            }
        });
        let (new, moved) = write_pack(self, records)?;
        if let Some((chunk, why)) = failed.into_inner() {
            // The copies made so far are indexed nowhere.
            let copy = self.pack_path(new);
            fs::remove_file(&copy).ctx("removing", &copy)?;
            return Ok(PackRewrite::Kept { chunk, why });
        }
        reindex(self, &moved, &[])?;
        self.forget_pack_file(pack);
        fs::remove_file(&path).ctx("removing", &path)?;
        sync_dir(&self.packs_dir())?;
        Ok(PackRewrite::Rewritten { records: moved.len() as u64, into: Some(new) })
    }

    /// The record of chunk `id` at `loc`, read and verified, as
    /// [`write_pack`] copies it; `levels` caches blocks' levels by offset.
    fn intact_record(&self, id: &ChunkId, loc: &Location, levels: &mut HashMap<u64, u8>) -> Result<Record> {
        if loc.encoding == Encoding::Block {
            let stored = self.block_member(id, loc)?;
            let level = match levels.get(&loc.offset) {
                Some(l) => *l,
                None => {
                    let mut head = [0u8; 4];
                    self.read_at(id, loc, &mut head)?;
                    *levels.entry(loc.offset).or_insert(block_level(&head))
                }
            };
            return Ok(Record { id: *id, loc: *loc, stored, damaged: None, level });
        }
        let stored = self.read_stored(id, loc)?;
        codec::decode(id, loc.encoding, &stored, loc.plain_len as usize).map_err(|e| self.placed(e, loc))?;
        Ok(Record { id: *id, loc: *loc, stored, damaged: None, level: 0 })
    }
}

/// Replaces index entries in one transaction; a removed chunk loses its
/// damage mark with its entry.
pub(crate) fn reindex(store: &Store, moved: &[(ChunkId, Location)], removed: &[ChunkId]) -> Result<()> {
    let txn = store.begin_write()?;
    {
        let mut table = txn.open_table(CHUNKS).map_err(|e| store.db_err(e))?;
        for (id, loc) in moved {
            table.insert(id.as_bytes(), loc.to_bytes().as_slice()).map_err(|e| store.db_err(e))?;
        }
        let mut marks = txn.open_table(SUSPECT).map_err(|e| store.db_err(e))?;
        for id in removed {
            table.remove(id.as_bytes()).map_err(|e| store.db_err(e))?;
            marks.remove(id.as_bytes()).map_err(|e| store.db_err(e))?;
        }
    }
    txn.commit().map_err(|e| store.db_err(e))?;
    store.refresh_view();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_flush_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"some chunk data".repeat(100);
        let id = {
            let s = Store::open(dir.path()).unwrap();
            let (id, new) = s.put(&data).unwrap();
            assert!(new);
            assert!(!s.put(&data).unwrap().1, "second put is a dedup hit");
            assert_eq!(s.get(&id).unwrap(), data, "readable before flush");
            s.flush().unwrap();
            id
        };
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.get(&id).unwrap(), data);
        assert_eq!(s.chunk_count().unwrap(), 1);
        let missing = ChunkId::of(b"nope");
        assert!(matches!(s.get(&missing), Err(Error::ChunkMissing { .. })));
    }

    /// A reader that meets a pack still being written while another
    /// thread seals it (renames it into place) finds it sealed.
    #[test]
    fn reads_find_packs_sealed_under_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let chunk = |i: u32| i.to_le_bytes().repeat(1000);
        std::thread::scope(|ts| {
            ts.spawn(|| {
                for i in 0..300 {
                    s.put(&chunk(i)).unwrap();
                    s.flush().unwrap();
                }
            });
            for i in 0..300 {
                let id = ChunkId::of(&chunk(i));
                while !s.contains(&id).unwrap() {
                    std::thread::yield_now();
                }
                assert_eq!(s.get(&id).unwrap(), chunk(i), "chunk {i}");
            }
        });
    }

    #[test]
    fn unflushed_chunks_are_not_visible_after_drop() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let s = Store::open(dir.path()).unwrap();
            s.put(b"lost").unwrap().0
        };
        let s = Store::open(dir.path()).unwrap();
        assert!(!s.contains(&id).unwrap());
        assert!(s.stale_tmp_packs().unwrap().is_empty());
    }
}

#[cfg(test)]
mod block_tests {
    use super::*;

    fn chunk(i: u32) -> Vec<u8> {
        // Compressible but distinct: a line repeated, with the index in it.
        format!("chunk {i}: the quick brown fox jumps over the lazy dog\n").repeat(600).into_bytes()
    }

    #[test]
    fn solid_chunks_read_back_before_and_after_flush_and_travel_alone() {
        let dir = tempfile::tempdir().unwrap();
        let n = 80; // ~2.6 MB: two full blocks written during puts, one by flush
        let ids: Vec<ChunkId> = {
            let s = Store::open(dir.path()).unwrap();
            let ids: Vec<ChunkId> = (0..n).map(|i| s.put_solid(&chunk(i)).unwrap().0).collect();
            assert!(!s.put_solid(&chunk(3)).unwrap().1, "dedup inside the open block");
            assert!(!s.put_solid(&chunk(0)).unwrap().1, "dedup against a written block");
            for (i, id) in ids.iter().enumerate() {
                assert_eq!(s.get(id).unwrap(), chunk(i as u32), "readable before flush");
            }
            s.flush().unwrap();
            let stored = s.stats.stored_bytes.load(Ordering::Relaxed);
            assert!(stored < 40_000, "{n} similar chunks compress together: {stored} bytes");
            ids
        };
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.chunk_count().unwrap(), n as u64);
        let mut blocks = std::collections::HashSet::new();
        for (i, id) in ids.iter().enumerate() {
            let loc = s.locate(id).unwrap().unwrap();
            assert_eq!(loc.encoding, Encoding::Block);
            blocks.insert(loc.offset);
            assert_eq!(s.get(id).unwrap(), chunk(i as u32));
            // Sent alone: an ordinary encoding that decodes and verifies.
            let (l, stored) = s.get_encoded(id).unwrap();
            assert_ne!(l.encoding, Encoding::Block);
            assert_eq!(codec::decode(id, l.encoding, &stored, l.plain_len as usize).unwrap(), chunk(i as u32));
        }
        assert_eq!(blocks.len(), 3, "1 MiB blocks");
        let report = s.verify().unwrap();
        assert!(report.is_clean(), "{report:#?}");
        assert_eq!(report.chunks, n as u64, "verify counts block members");
    }

    #[test]
    fn blocks_record_their_level_and_a_level_change_closes_the_open_block() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let low: Vec<ChunkId> = (0..3).map(|i| s.put_solid(&chunk(i)).unwrap().0).collect();
        let high: Vec<ChunkId> = (3..6).map(|i| s.put_solid_at(&chunk(i), 19).unwrap().0).collect();
        s.flush().unwrap();
        let (low_members, low_block) = s.whole_block(&low[0]).unwrap().expect("opens a block");
        let (high_members, high_block) = s.whole_block(&high[0]).unwrap().expect("opens a block");
        assert_eq!(low_members.iter().map(|m| m.0).collect::<Vec<_>>(), low, "the level change closed the block");
        assert_eq!(high_members.iter().map(|m| m.0).collect::<Vec<_>>(), high);
        assert_eq!(block_level(&low_block), codec::zstd_level() as u8);
        assert_eq!(block_level(&high_block), 19);
        assert!(s.whole_block(&high[1]).unwrap().is_none(), "not the block's first member");
        for (i, id) in low.iter().chain(&high).enumerate() {
            assert_eq!(s.get(id).unwrap(), chunk(i as u32));
        }
        // Each block's members are placed together and in order.
        let layout = s.block_layout(&[high[1], low[0], high[0], low[2], ChunkId::of(b"absent")]).unwrap();
        assert_eq!(layout[0].0, layout[2].0);
        assert_eq!(layout[1].0, layout[3].0);
        assert_ne!(layout[0].0, layout[1].0);
        assert!(layout[2].1 < layout[0].1 && layout[1].1 < layout[3].1);
        assert_eq!(layout[4], (0, 0));
    }

    #[test]
    fn a_handles_level_applies_to_chunks_stored_alone() {
        // Text that zstd -19 packs tighter than the store's level does.
        let text: Vec<u8> = (0..64 * 1024u32)
            .flat_map(|i| {
                format!("line {} of {} says {}\n", i % 977, i % 131, i.wrapping_mul(2_654_435_761) % 10_007)
                    .into_bytes()
            })
            .take(64 * 1024)
            .collect();
        let sized = |level: i32| {
            let dir = tempfile::tempdir().unwrap();
            let s = Store::open(dir.path()).unwrap();
            s.set_block_level(level);
            let (id, new) = s.put(&text).unwrap();
            assert!(new);
            s.flush().unwrap();
            let (loc, stored) = s.get_encoded(&id).unwrap();
            assert_eq!(loc.encoding, Encoding::Zstd);
            assert_eq!(s.get(&id).unwrap(), text, "level {level} reads back");
            stored.len()
        };
        let (default, high) = (sized(0), sized(19));
        assert!(high < default, "level 19 kept {high} bytes, the store's level {default}");
    }

    #[test]
    fn a_rewritten_pack_keeps_its_blocks_level() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let ids: Vec<ChunkId> = (0..3).map(|i| s.put_solid_at(&chunk(i), 19).unwrap().0).collect();
        s.flush().unwrap();
        let (pack, path) = s.packs().unwrap().remove(0);
        let mut records = Vec::new();
        scan_pack(pack, &path, |r| {
            records.push(r);
            Ok(())
        })
        .unwrap();
        let (_, moved) = write_pack(&s, records.into_iter().skip(1)).unwrap();
        reindex(&s, &moved, &[]).unwrap();
        let (members, block) = s.whole_block(&ids[1]).unwrap().expect("the rewritten block opens with it");
        assert_eq!(members.len(), 2);
        assert_eq!(block_level(&block), 19);
        assert_eq!(s.get(&ids[2]).unwrap(), chunk(2));
    }

    #[test]
    fn hostile_block_tables_are_refused() {
        assert!(parse_block(&[]).is_err());
        assert!(parse_block(&u32::MAX.to_le_bytes()).unwrap_err().to_string().contains("runs past"));
        let mut p = 1u32.to_le_bytes().to_vec();
        p.extend_from_slice(&[0; 32]);
        p.extend_from_slice(&(BLOCK_MAX_PLAIN as u32 + 1).to_le_bytes());
        assert!(parse_block(&p).unwrap_err().to_string().contains("more than"));
        // A table that claims more plaintext than the frame holds.
        let mut b = BlockBuf::default();
        b.push(ChunkId::of(b"abc"), b"abc");
        let mut payload = b.payload().unwrap();
        payload[36..40].copy_from_slice(&4u32.to_le_bytes());
        assert!(open_block(&payload).is_err());
    }

    /// A block of `n` 64 KiB chunks made by `make`, as a provider collects it.
    fn run_of(n: u64, make: fn(usize, u64) -> Vec<u8>) -> (BlockBuf, Vec<ChunkId>) {
        let mut b = BlockBuf::default();
        for i in 0..n {
            let plain = make(65536, 900 + i);
            b.push(ChunkId::of(&plain), &plain);
        }
        let ids = b.members.iter().map(|m| m.0).collect();
        (b, ids)
    }

    #[test]
    fn ppmd_frames_carry_text_and_are_stored_as_zstd_blocks() {
        use crate::codec::MAX_DENSE_LEVEL;
        let (text, ids) = run_of(16, crate::testing::log_text);
        let ppmd = text.payload_as(Dense::Ppmd).unwrap();
        assert_eq!(block_level(&ppmd), PPMD_TAG);
        let zstd = text.payload_as(Dense::Zstd(MAX_DENSE_LEVEL)).unwrap();
        assert_eq!(block_level(&zstd), MAX_DENSE_LEVEL);
        assert!(ppmd.len() < zstd.len() * 9 / 10, "text: PPMd {} bytes, zstd 16 {}", ppmd.len(), zstd.len());
        // Bytes zstd's fastest level cannot shrink go as zstd, not PPMd.
        let (noise, _) = run_of(4, crate::testing::noise);
        assert_eq!(block_level(&noise.payload_as(Dense::Ppmd).unwrap()), 1);

        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.put_solid_frame(&ppmd, &ids).unwrap(), vec![65536; 16]);
        s.flush().unwrap();
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(s.get(id).unwrap(), crate::testing::log_text(65536, 900 + i as u64));
            assert_eq!(s.locate(id).unwrap().unwrap().encoding, Encoding::Block);
        }
        // Kept in this store's own zstd blocks, never as the PPMd frame.
        let (_, kept) = s.whole_block(&ids[0]).unwrap().expect("the first chunk opens a block");
        assert_ne!(block_level(&kept), PPMD_TAG);
        assert!(s.verify().unwrap().is_clean());
    }

    #[test]
    fn damaged_ppmd_frames_are_refused_and_store_nothing() {
        let (text, ids) = run_of(4, crate::testing::log_text);
        let good = text.payload_as(Dense::Ppmd).unwrap();
        let table = 4 + 36 * ids.len();
        let mut flipped = good.clone();
        flipped[table + (good.len() - table) / 2] ^= 0x10;
        let mut cut = good.clone();
        cut.truncate(table + (good.len() - table) / 2);
        let mut garbage = good[..table].to_vec();
        garbage.extend_from_slice(&crate::testing::noise(5000, 3));
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for (what, bad) in [("a flipped bit", flipped), ("a cut stream", cut), ("noise", garbage)] {
            let e = s.put_solid_frame(&bad, &ids).unwrap_err();
            assert!(matches!(&e, Error::ChunkCorrupt { .. }), "{what}: {e}");
            assert!(e.to_string().contains("solid frame"), "{what}: {e}");
            for id in &ids {
                assert!(!s.contains(id).unwrap(), "{what}: a chunk of a refused frame was stored");
            }
        }
        s.put_solid_frame(&good, &ids).unwrap();
        assert!(ids.iter().all(|id| s.contains(id).unwrap()));
    }
}
