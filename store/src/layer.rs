//! Writing and reading layers as chunked manifest streams.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::chunker::Cdc;
use crate::error::{Error, Result};
use crate::id::{ChunkId, LayerId};
use crate::manifest::{
    ChunkRef, Entry, FORMAT_VERSION, Kind, LayerRoot, ManifestFault, OrderCheck, STREAM_MAGIC, decode_entry,
    encode_entry,
};
use crate::store::{LAYERS, Store};

/// Deepest stack of overlays accepted (a guard against hostile chains).
pub const MAX_STACK: usize = 64;

/// What the store remembers of each layer written here, for `ls`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    pub base: Option<ChunkId>,
    pub entries: u64,
    pub file_bytes: u64,
    /// Unix seconds.
    pub created: u64,
    /// Only the manifests are here (a lazy fetch); the file data follows.
    /// Such a layer is not announced to peers as held.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

/// Streams entries into a new layer.
pub struct LayerWriter<'s> {
    store: &'s Store,
    buf: Vec<u8>,
    manifest: Vec<ChunkRef>,
    entries: u64,
    file_bytes: u64,
    check: OrderCheck,
    cdc: Cdc,
}

impl<'s> LayerWriter<'s> {
    pub fn new(store: &'s Store) -> Self {
        Self {
            store,
            buf: STREAM_MAGIC.to_vec(),
            manifest: Vec::new(),
            entries: 0,
            file_bytes: 0,
            check: OrderCheck::default(),
            cdc: Cdc::default(),
        }
    }

    /// Appends the next entry, in tree order.
    pub fn push(&mut self, e: &Entry) -> Result<()> {
        self.check.check(e).map_err(|fault| Error::bad_entry(e.display_path(), fault))?;
        if let Kind::File { size, .. } = e.kind {
            self.file_bytes += size;
        }
        self.entries += 1;
        encode_entry(e, &mut self.buf);
        self.cut(false)
    }

    fn cut(&mut self, eof: bool) -> Result<()> {
        let mut pos = 0;
        while let Some(n) = self.cdc.cut(&self.buf[pos..], eof) {
            let chunk = &self.buf[pos..pos + n];
            let (id, _) = self.store.put(chunk)?;
            self.manifest.push(ChunkRef { id, len: n as u32 });
            pos += n;
        }
        self.buf.drain(..pos);
        Ok(())
    }

    /// Seals the layer; returns its id. Everything is durable on return.
    pub fn finish(mut self, base: Option<LayerId>, meta: BTreeMap<String, String>) -> Result<LayerId> {
        if self.entries == 0 {
            return Err(Error::bad_input("layer", "no entries (not even a root directory)"));
        }
        self.cut(true)?;
        let root = LayerRoot {
            format: FORMAT_VERSION,
            base,
            entries: self.entries,
            file_bytes: self.file_bytes,
            manifest: std::mem::take(&mut self.manifest),
            meta,
        };
        let (id, _) = self.store.put(&root.encode())?;
        self.store.flush()?;
        let info = LayerInfo {
            base,
            entries: root.entries,
            file_bytes: root.file_bytes,
            created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            partial: false,
        };
        let txn = self.store.begin_write()?;
        {
            let mut t = txn.open_table(LAYERS).map_err(|e| self.store.db_err(e))?;
            let bytes = serde_json::to_vec(&info).unwrap_or_default();
            t.insert(id.as_bytes(), bytes.as_slice()).map_err(|e| self.store.db_err(e))?;
        }
        txn.commit().map_err(|e| self.store.db_err(e))?;
        Ok(id)
    }
}

impl Store {
    /// Reads and decodes a layer's root chunk.
    pub fn layer_root(&self, id: &LayerId) -> Result<LayerRoot> {
        let bytes = self.get(id).map_err(|e| match e {
            Error::ChunkMissing { id } => Error::manifest(id, ManifestFault::RootMissing),
            e => e,
        })?;
        LayerRoot::decode(id, &bytes)
    }

    /// The stack that `id` stands on, bottom (template) first, `id` last.
    pub fn stack(&self, id: &LayerId) -> Result<Vec<LayerId>> {
        let mut out = vec![*id];
        let mut cur = self.layer_root(id)?;
        while let Some(base) = cur.base {
            if out.len() >= MAX_STACK {
                return Err(Error::manifest(id, ManifestFault::StackTooDeep));
            }
            out.push(base);
            cur = self.layer_root(&base)?;
        }
        out.reverse();
        Ok(out)
    }

    /// Streams the entries of one layer.
    pub fn read_layer(&self, id: &LayerId) -> Result<LayerReader<'_>> {
        let root = self.layer_root(id)?;
        Ok(LayerReader::new(self, *id, root))
    }

    /// Layers written to this store, with what is known of them.
    pub fn layers(&self) -> Result<Vec<(LayerId, LayerInfo)>> {
        use redb::ReadableTable;
        let txn = self.begin_read()?;
        let t = txn.open_table(LAYERS).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            if let Ok(info) = serde_json::from_slice(v.value()) {
                out.push((ChunkId::from_bytes(*k.value()), info));
            }
        }
        Ok(out)
    }

    /// Remembers layers fetched from a peer like published ones, so `ls`
    /// and id prefixes find them; `partial` when only their manifests came
    /// (a lazy fetch). A later whole fetch marks a partial layer complete.
    pub fn record_layers(&self, stack: &[LayerId], partial: bool) -> Result<()> {
        let have: std::collections::HashMap<LayerId, LayerInfo> = self.layers()?.into_iter().collect();
        // The roots are read before the write transaction begins: a root
        // may still be in this handle's open pack, whose lock a seal holds
        // while it waits for the write transaction (a fetch's flush still
        // running beside this); reading under the transaction deadlocked.
        let mut infos = Vec::new();
        for id in stack {
            let info = match have.get(id) {
                Some(info) if info.partial && !partial => LayerInfo { partial: false, ..info.clone() },
                Some(_) => continue,
                None => {
                    let root = self.layer_root(id)?;
                    LayerInfo {
                        base: root.base,
                        entries: root.entries,
                        file_bytes: root.file_bytes,
                        created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                        partial,
                    }
                }
            };
            infos.push((id, serde_json::to_vec(&info).unwrap_or_default()));
        }
        if infos.is_empty() {
            return Ok(());
        }
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(LAYERS).map_err(|e| self.db_err(e))?;
            for (id, bytes) in &infos {
                t.insert(id.as_bytes(), bytes.as_slice()).map_err(|e| self.db_err(e))?;
            }
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    pub(crate) fn forget_layers(&self, ids: &[LayerId]) -> Result<()> {
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(LAYERS).map_err(|e| self.db_err(e))?;
            for id in ids {
                t.remove(id.as_bytes()).map_err(|e| self.db_err(e))?;
            }
        }
        txn.commit().map_err(|e| self.db_err(e))
    }
}

/// Iterates the entries of one layer, checking every invariant on the way.
pub struct LayerReader<'s> {
    store: &'s Store,
    id: LayerId,
    chunks: std::vec::IntoIter<ChunkRef>,
    buf: Vec<u8>,
    pos: usize,
    started: bool,
    done: bool,
    seen: u64,
    expected: u64,
    check: OrderCheck,
}

impl<'s> LayerReader<'s> {
    fn new(store: &'s Store, id: LayerId, root: LayerRoot) -> Self {
        Self {
            store,
            id,
            expected: root.entries,
            chunks: root.manifest.into_iter(),
            buf: Vec::new(),
            pos: 0,
            started: false,
            done: false,
            seen: 0,
            check: OrderCheck::default(),
        }
    }

    pub fn id(&self) -> LayerId {
        self.id
    }

    fn fill(&mut self) -> Result<bool> {
        let Some(c) = self.chunks.next() else { return Ok(false) };
        let data = self.store.get(&c.id)?;
        if data.len() != c.len as usize {
            return Err(Error::manifest(self.id, ManifestFault::ChunkLength { chunk: c.id }));
        }
        self.buf.drain(..self.pos);
        self.pos = 0;
        self.buf.extend_from_slice(&data);
        Ok(true)
    }

    fn next_entry(&mut self) -> Result<Option<Entry>> {
        if !self.started {
            while self.buf.len() < STREAM_MAGIC.len() {
                if !self.fill()? {
                    return Err(Error::manifest(self.id, ManifestFault::TruncatedHeader));
                }
            }
            if &self.buf[..STREAM_MAGIC.len()] != STREAM_MAGIC {
                return Err(Error::manifest(self.id, ManifestFault::BadHeader));
            }
            self.pos = STREAM_MAGIC.len();
            self.started = true;
        }
        loop {
            let index = self.seen + 1;
            match decode_entry(&self.buf[self.pos..])
                .map_err(|fault| self.bad(ManifestFault::Decode { index, fault }))?
            {
                Some((e, n)) => {
                    self.pos += n;
                    self.check
                        .check(&e)
                        .map_err(|fault| self.bad(ManifestFault::Entry { index, path: e.display_path(), fault }))?;
                    self.seen += 1;
                    return Ok(Some(e));
                }
                None => {
                    if !self.fill()? {
                        if self.pos != self.buf.len() {
                            return Err(self.bad(ManifestFault::TruncatedEntry { index }));
                        }
                        if self.seen != self.expected {
                            return Err(self.bad(ManifestFault::Count { seen: self.seen, expected: self.expected }));
                        }
                        return Ok(None);
                    }
                }
            }
        }
    }

    fn bad(&self, fault: ManifestFault) -> Error {
        Error::manifest(self.id, fault)
    }
}

impl Iterator for LayerReader<'_> {
    type Item = Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_entry() {
            Ok(Some(e)) => Some(Ok(e)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}
