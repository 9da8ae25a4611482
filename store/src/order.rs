//! Prefetch orders: the order in which a guest first read its stack's
//! chunks while it booted, kept per stack (by its top layer id), so that a
//! later lazy deploy of that stack fetches those chunks first, in that
//! order, ahead of the guest.
//!
//! ```text
//! record := "XPO1" layer[32] count:u32le id[32]*count check[32]
//!   layer  the stack's top layer id
//!   ids    data chunks of the stack, each once, first read first;
//!          1 <= count <= MAX_ORDER
//!   check  BLAKE3 of every byte before it
//! ```
//!
//! Index tables (`index.redb`):
//!
//! ```text
//! prefetch_orders  layer id -> record         at most one per stack
//! prefetch_record  layer id -> unix seconds   "the next lazy deploy records"
//! ```
//!
//! Why a record apart, and unsigned: layers are immutable and addressed
//! by their content, so an order learnt after a layer was made cannot be
//! part of it. The record travels beside the stack instead: a fetch asks
//! its providers for it (chunk protocol op 6) once the manifests are here.
//! It is not signed because it cannot make a host fetch or keep anything
//! the stack does not already name: [`Store::put_order`] refuses a record
//! whose layer is not the one asked for, that is malformed, over
//! [`MAX_ORDER`] entries, repeats an id, or names a chunk that is no data
//! chunk of the stack (checked against its manifests, which the layer id
//! covers). At worst a forged record orders the prefetch badly.

use std::collections::HashSet;

use redb::{TableDefinition, TableError};

use crate::error::{Error, Result};
use crate::id::{ChunkId, LayerId};
use crate::manifest::{Extent, Kind};
use crate::store::Store;

const ORDERS: TableDefinition<'_, &[u8; 32], &[u8]> = TableDefinition::new("prefetch_orders");
const RECORD_NEXT: TableDefinition<'_, &[u8; 32], u64> = TableDefinition::new("prefetch_record");

const MAGIC: &[u8; 4] = b"XPO1";
/// Most chunk ids in an order: 8,192 chunks (512 MiB of 64 KiB chunks,
/// far more than a boot reads) in a record of 256 KiB.
pub const MAX_ORDER: usize = 8192;
/// Largest encoded order.
pub const MAX_ORDER_BYTES: usize = 4 + 32 + 4 + 32 * MAX_ORDER + 32;

/// What is wrong with a prefetch order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderFault {
    #[error("{0} bytes is too short for a prefetch order")]
    Short(usize),
    #[error("{0} bytes exceeds the largest prefetch order ({MAX_ORDER_BYTES})")]
    TooLarge(usize),
    #[error("not a prefetch order (bad magic)")]
    Magic,
    #[error("{0} entries is outside 1..={MAX_ORDER}")]
    Count(usize),
    #[error("{got} bytes where {count} entries need {want}")]
    Length { got: usize, count: usize, want: usize },
    #[error("checksum does not match: the record is damaged")]
    Check,
    #[error("it is the order of layer {0}, not of this one")]
    OtherLayer(LayerId),
    #[error("chunk {0} appears twice")]
    Repeated(ChunkId),
    #[error("chunk {0} is no data chunk of the stack")]
    Foreign(ChunkId),
}

/// A stack's prefetch order: its top layer and its data chunks, first
/// read first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Order {
    pub layer: LayerId,
    pub ids: Vec<ChunkId>,
}

impl Order {
    /// The order of `ids` (kept first time each, cut at [`MAX_ORDER`]).
    pub fn new(layer: LayerId, ids: impl IntoIterator<Item = ChunkId>) -> Self {
        let mut seen = HashSet::new();
        let ids = ids.into_iter().filter(|id| seen.insert(*id)).take(MAX_ORDER).collect();
        Self { layer, ids }
    }

    pub fn encode(&self) -> Vec<u8> {
        debug_assert!(!self.ids.is_empty() && self.ids.len() <= MAX_ORDER);
        let mut b = Vec::with_capacity(4 + 32 + 4 + 32 * self.ids.len() + 32);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(self.layer.as_bytes());
        b.extend_from_slice(&(self.ids.len() as u32).to_le_bytes());
        for id in &self.ids {
            b.extend_from_slice(id.as_bytes());
        }
        let check = blake3::hash(&b);
        b.extend_from_slice(check.as_bytes());
        b
    }

    /// Decodes a record that must be the order of `layer`; checks its form
    /// only (see [`Store::put_order`] for its content).
    pub fn decode(b: &[u8], layer: &LayerId) -> Result<Self, OrderFault> {
        const HEAD: usize = 4 + 32 + 4;
        if b.len() > MAX_ORDER_BYTES {
            return Err(OrderFault::TooLarge(b.len()));
        }
        if b.len() < HEAD + 32 {
            return Err(OrderFault::Short(b.len()));
        }
        if &b[..4] != MAGIC {
            return Err(OrderFault::Magic);
        }
        let count = u32::from_le_bytes([b[36], b[37], b[38], b[39]]) as usize;
        if count == 0 || count > MAX_ORDER {
            return Err(OrderFault::Count(count));
        }
        let want = HEAD + 32 * count + 32;
        if b.len() != want {
            return Err(OrderFault::Length { got: b.len(), count, want });
        }
        let (body, check) = b.split_at(b.len() - 32);
        if blake3::hash(body).as_bytes() != check {
            return Err(OrderFault::Check);
        }
        let mut l = [0u8; 32];
        l.copy_from_slice(&b[4..36]);
        let got = ChunkId::from_bytes(l);
        if got != *layer {
            return Err(OrderFault::OtherLayer(got));
        }
        let mut seen = HashSet::with_capacity(count);
        let mut ids = Vec::with_capacity(count);
        for c in body[HEAD..].chunks_exact(32) {
            let mut x = [0u8; 32];
            x.copy_from_slice(c);
            let id = ChunkId::from_bytes(x);
            if !seen.insert(id) {
                return Err(OrderFault::Repeated(id));
            }
            ids.push(id);
        }
        Ok(Self { layer: *layer, ids })
    }
}

impl Store {
    /// Every data chunk of the stack of `top` (local manifests only).
    pub fn stack_data_chunks(&self, top: &LayerId) -> Result<HashSet<ChunkId>> {
        let mut out = HashSet::new();
        for l in self.stack(top)? {
            for e in self.read_layer(&l)? {
                if let Kind::File { extents, .. } = e?.kind {
                    out.extend(extents.into_iter().filter_map(|x| match x {
                        Extent::Data { id, .. } => Some(id),
                        Extent::Hole { .. } => None,
                    }));
                }
            }
        }
        Ok(out)
    }

    /// Keeps `order` for its stack, replacing any held, once it is known
    /// to name only data chunks of that stack (whose manifests must be
    /// here); a refused order leaves what was held.
    pub fn put_order(&self, order: &Order) -> Result<()> {
        let refuse = |fault| Error::Order { layer: order.layer.to_string(), fault };
        if order.ids.is_empty() || order.ids.len() > MAX_ORDER {
            return Err(refuse(OrderFault::Count(order.ids.len())));
        }
        let chunks = self.stack_data_chunks(&order.layer)?;
        let mut seen = HashSet::with_capacity(order.ids.len());
        for id in &order.ids {
            if !seen.insert(*id) {
                return Err(refuse(OrderFault::Repeated(*id)));
            }
            if !chunks.contains(id) {
                return Err(refuse(OrderFault::Foreign(*id)));
            }
        }
        let b = order.encode();
        let txn = self.begin_write()?;
        txn.open_table(ORDERS)
            .map_err(|e| self.db_err(e))?
            .insert(order.layer.as_bytes(), b.as_slice())
            .map_err(|e| self.db_err(e))?;
        txn.open_table(RECORD_NEXT)
            .map_err(|e| self.db_err(e))?
            .remove(order.layer.as_bytes())
            .map_err(|e| self.db_err(e))?;
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// Decodes `bytes` (from a peer) as the order of `layer` and keeps it,
    /// as [`Store::put_order`]; nothing is kept when it is refused.
    pub fn put_order_bytes(&self, layer: &LayerId, bytes: &[u8]) -> Result<Order> {
        let order = Order::decode(bytes, layer).map_err(|fault| Error::Order { layer: layer.to_string(), fault })?;
        self.put_order(&order)?;
        Ok(order)
    }

    /// The order held for the stack of `layer`, encoded as it travels.
    pub fn order_bytes(&self, layer: &LayerId) -> Result<Option<Vec<u8>>> {
        let txn = self.begin_read()?;
        let t = match txn.open_table(ORDERS) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.db_err(e)),
        };
        Ok(t.get(layer.as_bytes()).map_err(|e| self.db_err(e))?.map(|v| v.value().to_vec()))
    }

    /// The order held for the stack of `layer`. A held record that no
    /// longer decodes is reported as the error it is.
    pub fn order(&self, layer: &LayerId) -> Result<Option<Order>> {
        match self.order_bytes(layer)? {
            None => Ok(None),
            Some(b) => {
                Order::decode(&b, layer).map(Some).map_err(|fault| Error::Order { layer: layer.to_string(), fault })
            }
        }
    }

    /// Drops the order of `layer` and any request to record one; whether
    /// there was either.
    pub fn remove_order(&self, layer: &LayerId) -> Result<bool> {
        let txn = self.begin_write()?;
        let a = txn
            .open_table(ORDERS)
            .map_err(|e| self.db_err(e))?
            .remove(layer.as_bytes())
            .map_err(|e| self.db_err(e))?
            .is_some();
        let b = txn
            .open_table(RECORD_NEXT)
            .map_err(|e| self.db_err(e))?
            .remove(layer.as_bytes())
            .map_err(|e| self.db_err(e))?
            .is_some();
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(a || b)
    }

    /// Asks that the next lazy deploy of `layer` record its order (again).
    pub fn request_order(&self, layer: &LayerId) -> Result<()> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let txn = self.begin_write()?;
        txn.open_table(RECORD_NEXT)
            .map_err(|e| self.db_err(e))?
            .insert(layer.as_bytes(), now)
            .map_err(|e| self.db_err(e))?;
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// Whether a recording was asked for ([`Store::request_order`]).
    pub fn order_requested(&self, layer: &LayerId) -> Result<bool> {
        let txn = self.begin_read()?;
        let t = match txn.open_table(RECORD_NEXT) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(e) => return Err(self.db_err(e)),
        };
        Ok(t.get(layer.as_bytes()).map_err(|e| self.db_err(e))?.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::LayerWriter;
    use crate::manifest::Entry;

    fn ids(n: usize) -> Vec<ChunkId> {
        (0..n).map(|i| ChunkId::of(&(i as u64).to_le_bytes())).collect()
    }

    #[test]
    fn format_round_trips_at_its_bounds() {
        let layer = ChunkId::of(b"top");
        // 1, a few, and MAX_ORDER entries.
        for n in [1, 2, 100, MAX_ORDER] {
            let o = Order::new(layer, ids(n));
            let b = o.encode();
            assert_eq!(b.len(), 4 + 32 + 4 + 32 * n + 32);
            assert_eq!(Order::decode(&b, &layer).unwrap(), o);
        }
        // new() drops repeats and cuts at MAX_ORDER.
        let o = Order::new(layer, ids(3).into_iter().chain(ids(MAX_ORDER + 5)));
        assert_eq!(o.ids.len(), MAX_ORDER);
        assert_eq!(o.ids[..3], ids(3)[..]);
    }

    #[test]
    fn corrupt_and_hostile_records_are_refused() {
        let layer = ChunkId::of(b"top");
        let good = Order::new(layer, ids(4)).encode();
        let with_count = |n: u32| {
            let mut b = good.clone();
            b[36..40].copy_from_slice(&n.to_le_bytes());
            b
        };
        let reseal = |mut b: Vec<u8>| {
            let n = b.len() - 32;
            let c = blake3::hash(&b[..n]);
            b[n..].copy_from_slice(c.as_bytes());
            b
        };
        let mut flipped = good.clone();
        flipped[50] ^= 1;
        let mut magic = good.clone();
        magic[0] = b'Y';
        // The same id twice, with a valid checksum.
        let mut twice = good.clone();
        twice.copy_within(40..72, 72);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "too short"),
            (good[..60].to_vec(), "too short"),
            (vec![0; MAX_ORDER_BYTES + 1], "exceeds"),
            (magic, "bad magic"),
            (with_count(0), "outside"),
            (with_count(MAX_ORDER as u32 + 1), "outside"),
            (with_count(u32::MAX), "outside"),
            (with_count(5), "entries need"),
            (good[..good.len() - 1].to_vec(), "entries need"),
            (flipped, "checksum"),
            (reseal(twice), "appears twice"),
            (Order::new(ChunkId::of(b"other"), ids(4)).encode(), "order of layer"),
        ];
        for (b, why) in cases {
            let e = Order::decode(&b, &layer).unwrap_err().to_string();
            assert!(e.contains(why), "{why}: {e}");
        }
    }

    #[test]
    fn the_store_keeps_only_orders_of_its_stacks_chunks() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path()).unwrap();
        let mut w = LayerWriter::new(&store);
        w.push(&Entry::dir(Vec::new())).unwrap();
        for (name, body) in [(&b"a"[..], &b"first file"[..]), (b"b", b"second file")] {
            let (id, _) = store.put(body).unwrap();
            w.push(&Entry::small_file(name.to_vec(), id, body.len() as u32)).unwrap();
        }
        let top = w.finish(None, Default::default()).unwrap();
        let chunks: Vec<ChunkId> = store.stack_data_chunks(&top).unwrap().into_iter().collect();
        assert_eq!(chunks.len(), 2);
        assert_eq!(store.order(&top).unwrap(), None);

        // A chunk that is not the stack's: refused, nothing kept.
        let foreign = Order::new(top, [chunks[0], ChunkId::of(b"elsewhere")]);
        let e = store.put_order(&foreign).unwrap_err();
        assert!(e.to_string().contains("is no data chunk of the stack"), "{e}");
        assert_eq!(e.exit_code(), crate::Exit::BadInput);
        assert_eq!(store.order(&top).unwrap(), None);
        let e = store.put_order_bytes(&top, &[1, 2, 3]).unwrap_err().to_string();
        assert!(e.contains("too short"), "{e}");
        assert_eq!(store.order_bytes(&top).unwrap(), None);

        store.request_order(&top).unwrap();
        assert!(store.order_requested(&top).unwrap());
        let o = Order::new(top, chunks.iter().rev().copied());
        store.put_order(&o).unwrap();
        assert!(!store.order_requested(&top).unwrap(), "recording fulfils the request");
        assert_eq!(store.order(&top).unwrap(), Some(o.clone()));
        assert_eq!(store.put_order_bytes(&top, &store.order_bytes(&top).unwrap().unwrap()).unwrap(), o);
        // A refused replacement keeps what was held.
        assert!(store.put_order(&foreign).is_err());
        assert_eq!(store.order(&top).unwrap(), Some(o));
        assert!(store.remove_order(&top).unwrap());
        assert!(!store.remove_order(&top).unwrap());
        assert_eq!(store.order(&top).unwrap(), None);
    }
}
