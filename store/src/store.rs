//! The on-disk store: pack files of encoded chunks, and an index.
//!
//! ```text
//! DATA_DIR/
//!   index.redb           chunk id -> location; names, pins, layers (redb)
//!   lock                 flock: writers share it, gc takes it exclusively
//!   packs/
//!     <16 hex>.pack      sealed pack, immutable
//!     <16 hex>.pack.tmp  pack being written; never indexed, removed on open
//!
//! pack  := "XNDPACK1" record*
//! record:= id[32] enc:u8 plain_len:u32le stored_len:u32le payload[stored_len]
//! ```
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

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::codec::{self, Encoding};
use crate::error::{Error, IoContext, Result};
use crate::id::ChunkId;

pub(crate) const CHUNKS: TableDefinition<'_, &[u8; 32], &[u8]> = TableDefinition::new("chunks");
pub(crate) const NAMES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("names");
pub(crate) const PINS: TableDefinition<'_, &str, &[u8; 32]> = TableDefinition::new("pins");
pub(crate) const LAYERS: TableDefinition<'_, &[u8; 32], &[u8]> = TableDefinition::new("layers");

const PACK_MAGIC: &[u8; 8] = b"XNDPACK1";
const RECORD_HEADER: usize = 32 + 1 + 4 + 4;
/// A pack is sealed once it holds this many bytes.
const PACK_TARGET: u64 = 256 * 1024 * 1024;

/// Where a chunk lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub pack: u64,
    /// Offset of the payload (after the record header).
    pub offset: u64,
    pub stored_len: u32,
    pub plain_len: u32,
    pub encoding: Encoding,
}

impl Location {
    fn to_bytes(self) -> [u8; 25] {
        let mut b = [0u8; 25];
        b[0..8].copy_from_slice(&self.pack.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..20].copy_from_slice(&self.stored_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.plain_len.to_le_bytes());
        b[24] = self.encoding as u8;
        b
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != 25 {
            return None;
        }
        Some(Self {
            pack: u64::from_le_bytes(b[0..8].try_into().ok()?),
            offset: u64::from_le_bytes(b[8..16].try_into().ok()?),
            stored_len: u32::from_le_bytes(b[16..20].try_into().ok()?),
            plain_len: u32::from_le_bytes(b[20..24].try_into().ok()?),
            encoding: Encoding::from_u8(b[24])?,
        })
    }
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
            stats: WriteStats::default(),
        };
        let txn = store.begin_write()?;
        for table in [CHUNKS, LAYERS] {
            txn.open_table(table).map_err(|e| store.db_err(e))?;
        }
        txn.open_table(NAMES).map_err(|e| store.db_err(e))?;
        txn.open_table(PINS).map_err(|e| store.db_err(e))?;
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
    pub(crate) fn refresh_view(&self) {
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn contains(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.locate(id)?.is_some())
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
        if self.contains(&id)? {
            return Ok(false);
        }
        let (enc, stored) = codec::encode(plain);
        self.append(id, enc, &stored, plain.len() as u32)
    }

    /// Stores an already encoded chunk (from a peer) after verifying it.
    pub fn put_encoded(&self, id: ChunkId, enc: Encoding, stored: &[u8], plain_len: u32) -> Result<bool> {
        codec::decode(&id, enc, stored, plain_len as usize)?;
        if self.contains(&id)? {
            return Ok(false);
        }
        self.stats.chunks.fetch_add(1, Ordering::Relaxed);
        self.append(id, enc, stored, plain_len)
    }

    fn append(&self, id: ChunkId, enc: Encoding, stored: &[u8], plain_len: u32) -> Result<bool> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.contains_key(&id) {
            return Ok(false);
        }
        if open.is_none() {
            *open = Some(self.new_pack()?);
        }
        let Some(pack) = open.as_mut() else { unreachable!("just opened") };
        let mut header = [0u8; RECORD_HEADER];
        header[..32].copy_from_slice(id.as_bytes());
        header[32] = enc as u8;
        header[33..37].copy_from_slice(&plain_len.to_le_bytes());
        header[37..41].copy_from_slice(&(stored.len() as u32).to_le_bytes());
        pack.out.write_all(&header).ctx("writing pack", &pack.tmp)?;
        pack.out.write_all(stored).ctx("writing pack", &pack.tmp)?;
        let loc = Location {
            pack: pack.id,
            offset: pack.len + RECORD_HEADER as u64,
            stored_len: stored.len() as u32,
            plain_len,
            encoding: enc,
        };
        pack.len += (RECORD_HEADER + stored.len()) as u64;
        pending.insert(id, loc);
        self.stats.new_chunks.fetch_add(1, Ordering::Relaxed);
        self.stats.stored_bytes.fetch_add(stored.len() as u64, Ordering::Relaxed);
        let full = pack.len >= PACK_TARGET;
        drop(pending);
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
        out.write_all(PACK_MAGIC).ctx("writing pack", &tmp)?;
        Ok(OpenPack { id, tmp, out, len: PACK_MAGIC.len() as u64 })
    }

    /// Makes the open pack durable and indexes its chunks.
    fn seal(&self, open: &mut MutexGuard<'_, Option<OpenPack>>) -> Result<()> {
        let Some(pack) = open.take() else { return Ok(()) };
        let file = pack.out.into_inner().map_err(|e| Error::io("flushing pack", &pack.tmp)(e.into_error()))?;
        file.sync_all().ctx("syncing pack", &pack.tmp)?;
        let path = self.pack_path(pack.id);
        fs::rename(&pack.tmp, &path).ctx("sealing pack", &path)?;
        sync_dir(&self.packs_dir())?;
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let txn = self.begin_write()?;
        {
            let mut table = txn.open_table(CHUNKS).map_err(|e| self.db_err(e))?;
            for (id, loc) in pending.iter() {
                table.insert(id.as_bytes(), loc.to_bytes().as_slice()).map_err(|e| self.db_err(e))?;
            }
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        self.refresh_view();
        pending.clear();
        Ok(())
    }

    /// Makes everything put so far durable and visible to other handles.
    pub fn flush(&self) -> Result<()> {
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
                    _ => return Err(Error::io("opening pack", &path)(e)),
                }
            }
            Err(e) => return Err(Error::io("opening pack", &path)(e)),
        };
        let f = Arc::new(f);
        files.insert(pack, f.clone());
        Ok(f)
    }

    /// Reads the stored (encoded) bytes of `id` without decoding them.
    pub fn get_encoded(&self, id: &ChunkId) -> Result<(Location, Vec<u8>)> {
        let loc = match self.locate(id)? {
            Some(loc) => loc,
            None => {
                // Another process may have added it since our snapshot.
                self.refresh_view();
                self.locate(id)?.ok_or(Error::ChunkMissing { id: *id })?
            }
        };
        let f = self.pack_file(loc.pack)?;
        let mut buf = vec![0u8; loc.stored_len as usize];
        f.read_exact_at(&mut buf, loc.offset).map_err(|e| Error::ChunkCorrupt {
            id: *id,
            why: format!("reading {} at {}: {e}", self.pack_path(loc.pack).display(), loc.offset),
        })?;
        Ok((loc, buf))
    }

    /// Reads, decodes and verifies chunk `id`.
    pub fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let (loc, stored) = self.get_encoded(id)?;
        if loc.encoding == codec::Encoding::Raw && stored.len() == loc.plain_len as usize && ChunkId::of(&stored) == *id
        {
            // Stored raw and intact: the bytes read are the chunk, no copy needed.
            return Ok(stored);
        }
        codec::decode(id, loc.encoding, &stored, loc.plain_len as usize).map_err(|e| match e {
            Error::ChunkCorrupt { id, why } => Error::ChunkCorrupt {
                id,
                why: format!("{why} (in {} at offset {})", self.pack_path(loc.pack).display(), loc.offset),
            },
            e => e,
        })
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
        let txn = self.begin_read()?;
        let table = txn.open_table(CHUNKS).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for item in table.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            let id = ChunkId::from_bytes(*k.value());
            let loc = Location::from_bytes(v.value())
                .ok_or_else(|| Error::ChunkCorrupt { id, why: "index entry does not decode".into() })?;
            out.push((id, loc));
        }
        Ok(out)
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

    pub(crate) fn forget_pack_file(&self, pack: u64) {
        self.files.lock().unwrap_or_else(|e| e.into_inner()).remove(&pack);
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // An unflushed pack is left as .tmp and removed by gc; flushing here
        // would hide a caller's missing flush on the success path only.
        if let Ok(mut open) = self.open.lock()
            && let Some(p) = open.take()
        {
            drop(p.out);
            let _ = fs::remove_file(&p.tmp);
        }
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).ctx("syncing directory", dir)
}

/// One record read back from a pack by [`scan_pack`].
pub(crate) struct Record {
    pub id: ChunkId,
    pub loc: Location,
    pub stored: Vec<u8>,
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
        let loc = Location { pack, offset: pos + RECORD_HEADER as u64, stored_len, plain_len, encoding: enc };
        pos += RECORD_HEADER as u64 + stored_len as u64;
        each(Record { id, loc, stored })?;
    }
    Ok(())
}

/// Copies live records into a fresh sealed pack; returns their new locations.
pub(crate) fn write_pack(store: &Store, records: impl Iterator<Item = Record>) -> Result<Vec<(ChunkId, Location)>> {
    let mut pack = store.new_pack()?;
    let mut out = Vec::new();
    for rec in records {
        let mut header = [0u8; RECORD_HEADER];
        header[..32].copy_from_slice(rec.id.as_bytes());
        header[32] = rec.loc.encoding as u8;
        header[33..37].copy_from_slice(&rec.loc.plain_len.to_le_bytes());
        header[37..41].copy_from_slice(&rec.loc.stored_len.to_le_bytes());
        pack.out.write_all(&header).ctx("writing pack", &pack.tmp)?;
        pack.out.write_all(&rec.stored).ctx("writing pack", &pack.tmp)?;
        out.push((rec.id, Location { pack: pack.id, offset: pack.len + RECORD_HEADER as u64, ..rec.loc }));
        pack.len += (RECORD_HEADER + rec.stored.len()) as u64;
    }
    let file = pack.out.into_inner().map_err(|e| Error::io("flushing pack", &pack.tmp)(e.into_error()))?;
    file.sync_all().ctx("syncing pack", &pack.tmp)?;
    let path = store.pack_path(pack.id);
    fs::rename(&pack.tmp, &path).ctx("sealing pack", &path)?;
    sync_dir(&store.packs_dir())?;
    Ok(out)
}

/// Replaces index entries in one transaction.
pub(crate) fn reindex(store: &Store, moved: &[(ChunkId, Location)], removed: &[ChunkId]) -> Result<()> {
    let txn = store.begin_write()?;
    {
        let mut table = txn.open_table(CHUNKS).map_err(|e| store.db_err(e))?;
        for (id, loc) in moved {
            table.insert(id.as_bytes(), loc.to_bytes().as_slice()).map_err(|e| store.db_err(e))?;
        }
        for id in removed {
            table.remove(id.as_bytes()).map_err(|e| store.db_err(e))?;
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
