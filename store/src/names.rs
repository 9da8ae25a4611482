//! Signed names: `template://publisher/name/version` -> layer id, the
//! trust that decides whose names a host believes, and key succession.
//!
//! A record binds a name to a layer id with a sequence number, signed by an
//! ed25519 key (the key type of iroh node ids). A layer's id depends on its
//! content only; a name is a separate record, so one layer can carry many
//! names and a name can move between layers.
//!
//! A host accepts a record only if
//! - its signature is good,
//! - its key is trusted *for the name's publisher* ([`Trust`]: keys mapped
//!   to publisher patterns, like OSTree's per-remote keyrings or TUF's
//!   delegations), directly or as the successor of such a key, and
//! - its sequence number is higher than the one held, so the newest record
//!   wins and an old one cannot be replayed.
//!
//! A removal is a record too (a tombstone, `removed`), with a higher
//! sequence, so it travels like any record and a stale record cannot bring
//! the name back. `NAME@ID` names an exact layer and resolves only while
//! NAME points at ID.
//!
//! ```text
//! binding   := "xenod-name-v1\0" name "\0" id[32] seq:u64le
//! removal   := "xenod-name-rm-v1\0" name "\0" seq:u64le
//! successor := "xenod-key-successor-v1\0" old[32] new[32]     signed by old
//! ```
//!
//! Key rotation: a [`Succession`] signed by the old key names the new one;
//! the new key is then trusted for every publisher the old one is (also
//! through chains of successions, up to [`MAX_SUCCESSION`] deep). The old
//! key keeps its trust, so records signed before the rotation still verify
//! on hosts that hear them later; a host that wants the old key cut off
//! (it leaked) removes its trust entry (`xenod key untrust`). A key names
//! one successor: the first one a host hears is kept and any other is
//! refused, so a thief of the old key cannot move its trust again.

use std::collections::BTreeMap;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::{ChunkId, LayerId};
use crate::store::{NAMES, PINS, SUCCESSORS, Store};

pub const SCHEME: &str = "template://";
/// How many successions are followed from a trusted key.
pub const MAX_SUCCESSION: usize = 16;

/// A signed binding of a name to a layer, or its removal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameRecord {
    pub name: String,
    /// The layer; all zeros in a removal.
    pub id: ChunkId,
    pub seq: u64,
    /// The publisher's public key.
    pub key: [u8; 32],
    pub sig: Vec<u8>,
    /// A tombstone: the name is removed as of `seq`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
}

fn signed_bytes(name: &str, id: &ChunkId, seq: u64, removed: bool) -> Vec<u8> {
    let mut m = if removed { b"xenod-name-rm-v1\0".to_vec() } else { b"xenod-name-v1\0".to_vec() };
    m.extend_from_slice(name.as_bytes());
    m.push(0);
    if !removed {
        m.extend_from_slice(id.as_bytes());
    }
    m.extend_from_slice(&seq.to_le_bytes());
    m
}

/// Checks that `name` is `template://SEG/SEG[/SEG...]` with plain segments.
pub fn check_name(name: &str) -> Result<()> {
    let bad = |why: &str| Error::BadRef { r: name.into(), why: why.into() };
    let rest = name.strip_prefix(SCHEME).ok_or_else(|| bad("a name starts with template://"))?;
    let segs: Vec<&str> = rest.split('/').collect();
    if segs.len() < 2 {
        return Err(bad("a name needs at least publisher/name"));
    }
    for s in segs {
        check_segment(s).map_err(|why| bad(&why))?;
    }
    Ok(())
}

fn check_segment(s: &str) -> Result<(), String> {
    if s.is_empty() || s == "." || s == ".." {
        return Err("empty or dot segment".into());
    }
    if !s.chars().all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c)) {
        return Err(format!("segment {s:?} may hold only letters, digits and . _ - +"));
    }
    Ok(())
}

/// The publisher of a checked name: its first segment.
pub fn publisher(name: &str) -> &str {
    let rest = name.strip_prefix(SCHEME).unwrap_or(name);
    rest.split('/').next().unwrap_or(rest)
}

/// Generates a new signing key from the OS's random source.
pub fn generate_key() -> Result<SigningKey> {
    let mut seed = [0u8; 32];
    rustix::rand::getrandom(&mut seed, rustix::rand::GetRandomFlags::empty())
        .map_err(|e| Error::io("reading random bytes", "getrandom")(e.into()))?;
    Ok(SigningKey::from_bytes(&seed))
}

impl NameRecord {
    pub fn sign(key: &SigningKey, name: &str, id: LayerId, seq: u64) -> Result<Self> {
        Self::sign_as(key, name, id, seq, false)
    }

    /// A signed removal of `name` as of `seq`.
    pub fn sign_removal(key: &SigningKey, name: &str, seq: u64) -> Result<Self> {
        Self::sign_as(key, name, ChunkId::from_bytes([0; 32]), seq, true)
    }

    fn sign_as(key: &SigningKey, name: &str, id: LayerId, seq: u64, removed: bool) -> Result<Self> {
        check_name(name)?;
        let sig = key.sign(&signed_bytes(name, &id, seq, removed));
        Ok(Self {
            name: name.into(),
            id,
            seq,
            key: key.verifying_key().to_bytes(),
            sig: sig.to_bytes().to_vec(),
            removed,
        })
    }

    /// Checks the record's form and signature (not whether its key is
    /// trusted: see [`Trust::check`]).
    pub fn verify_signature(&self) -> Result<VerifyingKey> {
        let bad = |why: &str| Error::Name { name: self.name.clone(), why: why.into() };
        check_name(&self.name).map_err(|e| bad(&e.to_string()))?;
        if self.seq == u64::MAX {
            return Err(bad("sequence number u64::MAX could never be superseded (nor the name removed)"));
        }
        if self.removed && self.id != ChunkId::from_bytes([0; 32]) {
            return Err(bad("a removal names a layer"));
        }
        let key = VerifyingKey::from_bytes(&self.key).map_err(|_| bad("publisher key is not a valid ed25519 key"))?;
        let sig = Signature::from_slice(&self.sig).map_err(|_| bad("signature is malformed"))?;
        key.verify(&signed_bytes(&self.name, &self.id, self.seq, self.removed), &sig)
            .map_err(|_| bad(&format!("bad signature (key {})", hex(&self.key))))?;
        Ok(key)
    }

    /// What the record says, for messages: "-> ID (sequence N)" or
    /// "removed (sequence N)".
    pub fn what(&self) -> String {
        if self.removed {
            format!("removed (sequence {})", self.seq)
        } else {
            format!("-> {} (sequence {})", self.id.fmt_short(), self.seq)
        }
    }
}

/// A key naming its successor, signed by the old key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Succession {
    pub old: [u8; 32],
    pub new: [u8; 32],
    pub sig: Vec<u8>,
}

fn succession_bytes(old: &[u8; 32], new: &[u8; 32]) -> Vec<u8> {
    let mut m = b"xenod-key-successor-v1\0".to_vec();
    m.extend_from_slice(old);
    m.extend_from_slice(new);
    m
}

impl Succession {
    pub fn sign(old: &SigningKey, new: &VerifyingKey) -> Self {
        let (o, n) = (old.verifying_key().to_bytes(), new.to_bytes());
        Self { old: o, new: n, sig: old.sign(&succession_bytes(&o, &n)).to_bytes().to_vec() }
    }

    /// Checks the old key's signature.
    pub fn verify(&self) -> Result<()> {
        let bad = |why: &str| Error::Name { name: format!("successor of key {}", hex(&self.old)), why: why.into() };
        if self.old == self.new {
            return Err(bad("a key cannot succeed itself"));
        }
        let old = VerifyingKey::from_bytes(&self.old).map_err(|_| bad("old key is not a valid ed25519 key"))?;
        VerifyingKey::from_bytes(&self.new).map_err(|_| bad("new key is not a valid ed25519 key"))?;
        let sig = Signature::from_slice(&self.sig).map_err(|_| bad("signature is malformed"))?;
        old.verify(&succession_bytes(&self.old, &self.new), &sig).map_err(|_| bad("bad signature of the old key"))
    }
}

/// Which keys may sign names for which publishers.
///
/// A pattern is a publisher (`debian`: names `template://debian/...`), a
/// path below one (`acme/web`: names `template://acme/web/...`), or a
/// prefix ending in `*` (`acme/*` is `acme`; `acme-*` matches publishers
/// `acme-labs`, `acme-eu`; `*` alone matches every name).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trust {
    keys: BTreeMap<[u8; 32], Vec<String>>,
}

/// Checks a trust pattern's form.
pub fn check_pattern(p: &str) -> Result<()> {
    let bad = |why: String| Error::BadRef { r: p.into(), why };
    if p == "*" {
        return Ok(());
    }
    let (body, star) = match p.strip_suffix('*') {
        Some(b) => (b.strip_suffix('/').unwrap_or(b), true),
        None => (p, false),
    };
    if body.contains('*') {
        return Err(bad("`*` may only end a publisher pattern".into()));
    }
    let segs: Vec<&str> = body.split('/').collect();
    for (i, s) in segs.iter().enumerate() {
        // `acme-*`: the last segment is a prefix and may be cut anywhere.
        if star && i + 1 == segs.len() && !body.ends_with('/') && !s.is_empty() {
            if !s.chars().all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c)) {
                return Err(bad(format!("segment {s:?} may hold only letters, digits and . _ - +")));
            }
            continue;
        }
        check_segment(s).map_err(|why| bad(format!("a publisher pattern: {why}")))?;
    }
    Ok(())
}

fn pattern_matches(pattern: &str, name: &str) -> bool {
    let path = name.strip_prefix(SCHEME).unwrap_or(name);
    if pattern == "*" {
        return true;
    }
    if let Some(body) = pattern.strip_suffix("/*") {
        return path.strip_prefix(body).is_some_and(|r| r.starts_with('/'));
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return path.starts_with(prefix);
    }
    path.strip_prefix(pattern).is_some_and(|r| r.starts_with('/'))
}

impl Trust {
    /// Trusts `key` for the names `pattern` matches.
    pub fn allow(&mut self, key: VerifyingKey, pattern: &str) -> Result<()> {
        check_pattern(pattern)?;
        let v = self.keys.entry(key.to_bytes()).or_default();
        if !v.iter().any(|p| p == pattern) {
            v.push(pattern.to_owned());
        }
        Ok(())
    }

    /// The patterns `key` is trusted for directly.
    pub fn patterns(&self, key: &[u8; 32]) -> &[String] {
        self.keys.get(key).map_or(&[], |v| v.as_slice())
    }

    /// Every key and its patterns.
    pub fn entries(&self) -> impl Iterator<Item = ([u8; 32], &[String])> {
        self.keys.iter().map(|(k, v)| (*k, v.as_slice()))
    }

    /// The keys `key` succeeds (itself first), following `successions`
    /// backwards, at most [`MAX_SUCCESSION`] steps.
    fn lineage(key: [u8; 32], successions: &[Succession]) -> Vec<[u8; 32]> {
        let mut out = vec![key];
        while out.len() <= MAX_SUCCESSION {
            let cur = out[out.len() - 1];
            match successions.iter().find(|s| s.new == cur && !out.contains(&s.old)) {
                Some(s) => out.push(s.old),
                None => break,
            }
        }
        out
    }

    /// Checks `rec`'s signature and that its key (or a key it succeeds, in
    /// `successions`) is trusted for its name. The refusal names the
    /// record, the key and the rule, and the command that would trust it.
    pub fn check(&self, rec: &NameRecord, successions: &[Succession]) -> Result<()> {
        rec.verify_signature()?;
        let lineage = Self::lineage(rec.key, successions);
        if lineage.iter().any(|k| self.patterns(k).iter().any(|p| pattern_matches(p, &rec.name))) {
            return Ok(());
        }
        let key = hex(&rec.key);
        let p = publisher(&rec.name);
        let held: Vec<&String> = lineage.iter().flat_map(|k| self.patterns(k)).collect();
        let rule = if held.is_empty() {
            format!("key {key} is not trusted here")
        } else {
            let list = held.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
            format!("key {key} is trusted here for {list} only, not for publisher {p}")
        };
        Err(Error::Name {
            name: rec.name.clone(),
            why: format!("{} refused: {rule} (to accept it: xenod key trust {key} --for {p})", rec.what()),
        })
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

impl Store {
    /// Stores `rec` if `trust` admits it (see [`Trust::check`]) and it is
    /// newer than the record of the same name held. A record equal to the
    /// one held is not an error (returns `false`: nothing changed).
    pub fn set_name(&self, rec: &NameRecord, trust: &Trust) -> Result<bool> {
        trust.check(rec, &self.successions()?)?;
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(NAMES).map_err(|e| self.db_err(e))?;
            if let Some(old) = t.get(rec.name.as_str()).map_err(|e| self.db_err(e))?
                && let Ok(old) = serde_json::from_slice::<NameRecord>(old.value())
            {
                if old.seq == rec.seq && old.id == rec.id && old.removed == rec.removed {
                    return Ok(false);
                }
                if old.seq >= rec.seq {
                    return Err(Error::Name {
                        name: rec.name.clone(),
                        why: format!(
                            "{} signed by {} refused: sequence {} is not newer than the {} held ({})",
                            rec.what(),
                            hex(&rec.key),
                            rec.seq,
                            old.seq,
                            old.what()
                        ),
                    });
                }
            }
            let bytes = serde_json::to_vec(rec).unwrap_or_default();
            t.insert(rec.name.as_str(), bytes.as_slice()).map_err(|e| self.db_err(e))?;
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(true)
    }

    /// The record held for `name`, a removal included.
    pub fn name(&self, name: &str) -> Result<Option<NameRecord>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(NAMES).map_err(|e| self.db_err(e))?;
        let v = t.get(name).map_err(|e| self.db_err(e))?;
        Ok(v.and_then(|v| serde_json::from_slice(v.value()).ok()))
    }

    /// Every record held, removals included.
    pub fn names(&self) -> Result<Vec<NameRecord>> {
        self.json_values(NAMES)
    }

    /// The JSON values of `table` that parse (unreadable rows are skipped).
    fn json_values<K: redb::Key + 'static, T: serde::de::DeserializeOwned>(
        &self,
        table: redb::TableDefinition<'_, K, &[u8]>,
    ) -> Result<Vec<T>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(table).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.db_err(e))? {
            let (_, v) = item.map_err(|e| self.db_err(e))?;
            if let Ok(r) = serde_json::from_slice(v.value()) {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Stores a verified succession; the first one heard for a key is
    /// kept, another is refused. Returns whether it is new.
    pub fn set_succession(&self, s: &Succession) -> Result<bool> {
        s.verify()?;
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(SUCCESSORS).map_err(|e| self.db_err(e))?;
            if let Some(held) = t.get(&s.old).map_err(|e| self.db_err(e))? {
                let held: Option<Succession> = serde_json::from_slice(held.value()).ok();
                if held.as_ref().is_some_and(|h| h.new == s.new) {
                    return Ok(false);
                }
                return Err(Error::Name {
                    name: format!("successor of key {}", hex(&s.old)),
                    why: format!(
                        "{} refused: the key already names successor {}",
                        hex(&s.new),
                        held.map(|h| hex(&h.new)).unwrap_or_else(|| "(unreadable)".into())
                    ),
                });
            }
            let bytes = serde_json::to_vec(s).unwrap_or_default();
            t.insert(&s.old, bytes.as_slice()).map_err(|e| self.db_err(e))?;
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(true)
    }

    /// Every succession held.
    pub fn successions(&self) -> Result<Vec<Succession>> {
        self.json_values(SUCCESSORS)
    }

    /// Keeps `id` (and the stack below it) from garbage collection.
    pub fn pin(&self, label: &str, id: &LayerId) -> Result<()> {
        let txn = self.begin_write()?;
        txn.open_table(PINS).map_err(|e| self.db_err(e))?.insert(label, id.as_bytes()).map_err(|e| self.db_err(e))?;
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// Removes a pin; returns whether it existed.
    pub fn unpin(&self, label: &str) -> Result<bool> {
        let txn = self.begin_write()?;
        let had =
            txn.open_table(PINS).map_err(|e| self.db_err(e))?.remove(label).map_err(|e| self.db_err(e))?.is_some();
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(had)
    }

    pub fn pins(&self) -> Result<Vec<(String, LayerId)>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(PINS).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            out.push((k.value().to_owned(), ChunkId::from_bytes(*v.value())));
        }
        Ok(out)
    }

    /// Resolves a reference: `template://...` (the layer the name points
    /// at now), `template://...@ID` (ID, only while the name points at
    /// it), a full id, or a unique prefix (at least 8 hex digits) of a
    /// layer written here.
    pub fn resolve(&self, r: &str) -> Result<LayerId> {
        if r.starts_with(SCHEME) {
            let (name, pin) = match r.rsplit_once('@') {
                Some((name, id)) => {
                    check_name(name)?;
                    let id: LayerId = id.parse().map_err(|_| Error::BadRef {
                        r: r.into(),
                        why: "the text after @ is not a 64-digit layer id".into(),
                    })?;
                    (name, Some(id))
                }
                None => {
                    check_name(r)?;
                    (r, None)
                }
            };
            let rec = self.name(name)?.ok_or_else(|| Error::UnknownRef(r.into()))?;
            if rec.removed {
                return Err(Error::Name { name: name.into(), why: format!("was {}", rec.what()) });
            }
            return match pin {
                Some(id) if id != rec.id => Err(Error::Name {
                    name: name.into(),
                    why: format!("points at {} (sequence {}), not at {id}", rec.id, rec.seq),
                }),
                _ => Ok(rec.id),
            };
        }
        if let Ok(id) = r.parse::<ChunkId>() {
            return Ok(id);
        }
        if r.len() >= 8 && r.chars().all(|c| c.is_ascii_hexdigit()) {
            let lower = r.to_ascii_lowercase();
            let hits: Vec<_> =
                self.layers()?.into_iter().filter(|(id, _)| id.to_string().starts_with(&lower)).collect();
            match hits.as_slice() {
                [(id, _)] => return Ok(*id),
                [] => {}
                _ => return Err(Error::BadRef { r: r.into(), why: "the prefix matches several layers".into() }),
            }
        }
        Err(Error::UnknownRef(r.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trust(key: &SigningKey, patterns: &[&str]) -> Trust {
        let mut t = Trust::default();
        for p in patterns {
            t.allow(key.verifying_key(), p).unwrap();
        }
        t
    }

    #[test]
    fn sign_verify_and_refuse() {
        let k = generate_key().unwrap();
        let other = generate_key().unwrap();
        let id = ChunkId::of(b"layer");
        let rec = NameRecord::sign(&k, "template://debian/12/1", id, 1).unwrap();
        trust(&k, &["debian"]).check(&rec, &[]).unwrap();
        let e = trust(&other, &["*"]).check(&rec, &[]).unwrap_err().to_string();
        assert!(e.contains("is not trusted here") && e.contains("xenod key trust"), "{e}");
        let mut forged = rec.clone();
        forged.id = ChunkId::of(b"evil");
        assert!(trust(&k, &["*"]).check(&forged, &[]).unwrap_err().to_string().contains("bad signature"));
        // A removal's signature covers that it is one.
        let mut flipped = NameRecord::sign_removal(&k, "template://debian/12/1", 2).unwrap();
        flipped.removed = false;
        assert!(trust(&k, &["*"]).check(&flipped, &[]).is_err());
        for bad in ["debian/12", "template://x", "template://a/../b", "template://a/b c", "template://a//b"] {
            assert!(matches!(check_name(bad), Err(Error::BadRef { .. })), "{bad}");
        }
        let max = NameRecord::sign(&k, "template://debian/12/1", id, u64::MAX).unwrap();
        assert!(trust(&k, &["*"]).check(&max, &[]).unwrap_err().to_string().contains("u64::MAX"));
    }

    #[test]
    fn a_key_signs_only_for_its_publishers() {
        let k = generate_key().unwrap();
        let t = trust(&k, &["b", "acme/*", "corp-*", "x/web"]);
        let id = ChunkId::of(b"l");
        for ok in ["template://b/os/1", "template://acme/web/2", "template://corp-eu/a/1", "template://x/web/1"] {
            t.check(&NameRecord::sign(&k, ok, id, 1).unwrap(), &[]).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for no in ["template://me/x/1", "template://bb/os/1", "template://acmex/a/1", "template://x/db/1"] {
            let e = t.check(&NameRecord::sign(&k, no, id, 1).unwrap(), &[]).unwrap_err().to_string();
            let p = publisher(no);
            assert!(e.contains(&format!("not for publisher {p}")) && e.contains(&format!("--for {p}")), "{e}");
        }
        for bad in ["", "a/", "a*b", "a/../b", "**", "a b"] {
            assert!(check_pattern(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_successor_inherits_the_old_keys_publishers() {
        let (old, new, thief) = (generate_key().unwrap(), generate_key().unwrap(), generate_key().unwrap());
        let t = trust(&old, &["debian"]);
        let rec = NameRecord::sign(&new, "template://debian/12/2", ChunkId::of(b"l"), 2).unwrap();
        assert!(t.check(&rec, &[]).is_err());
        let s = Succession::sign(&old, &new.verifying_key());
        s.verify().unwrap();
        t.check(&rec, std::slice::from_ref(&s)).unwrap();
        // Only for the old key's publishers.
        let other = NameRecord::sign(&new, "template://me/x/1", ChunkId::of(b"l"), 1).unwrap();
        assert!(t.check(&other, std::slice::from_ref(&s)).is_err());
        // A forged succession does not verify.
        let mut forged = Succession::sign(&thief, &thief.verifying_key());
        forged.old = old.verifying_key().to_bytes();
        assert!(forged.verify().is_err());
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.set_succession(&s).unwrap());
        assert!(!store.set_succession(&s).unwrap());
        let again = Succession::sign(&old, &thief.verifying_key());
        assert!(store.set_succession(&again).unwrap_err().to_string().contains("already names successor"));
        assert_eq!(store.successions().unwrap(), vec![s]);
    }

    #[test]
    fn newer_wins_older_refused_removal_sticks() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let k = generate_key().unwrap();
        let t = trust(&k, &["p"]);
        let (a, b) = (ChunkId::of(b"a"), ChunkId::of(b"b"));
        let first = NameRecord::sign(&k, "template://p/n", a, 1).unwrap();
        assert!(s.set_name(&first, &t).unwrap());
        assert!(!s.set_name(&first, &t).unwrap(), "the same record again changes nothing");
        s.set_name(&NameRecord::sign(&k, "template://p/n", b, 2).unwrap(), &t).unwrap();
        assert_eq!(s.resolve("template://p/n").unwrap(), b);
        let e = s.set_name(&NameRecord::sign(&k, "template://p/n", a, 2).unwrap(), &t).unwrap_err();
        assert!(e.to_string().contains("not newer"), "{e}");
        // NAME@ID holds only while NAME points at ID.
        assert_eq!(s.resolve(&format!("template://p/n@{b}")).unwrap(), b);
        let e = s.resolve(&format!("template://p/n@{a}")).unwrap_err();
        assert!(matches!(e, Error::Name { .. }) && e.to_string().contains("points at"), "{e}");
        assert!(matches!(s.resolve("template://p/n@4f8e6cbb"), Err(Error::BadRef { .. })));
        assert!(matches!(s.resolve("template://p/missing"), Err(Error::UnknownRef(_))));
        // A removal wins over older records, and a replay cannot revive it.
        s.set_name(&NameRecord::sign_removal(&k, "template://p/n", 3).unwrap(), &t).unwrap();
        let e = s.resolve("template://p/n").unwrap_err().to_string();
        assert!(e.contains("removed (sequence 3)"), "{e}");
        assert!(s.set_name(&first, &t).is_err());
        assert!(s.set_name(&NameRecord::sign(&k, "template://p/n", a, 2).unwrap(), &t).is_err());
        s.set_name(&NameRecord::sign(&k, "template://p/n", a, 4).unwrap(), &t).unwrap();
        assert_eq!(s.resolve("template://p/n").unwrap(), a);
    }

    #[test]
    fn names_of_layers_not_here_and_removals_are_no_roots() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let k = generate_key().unwrap();
        let t = trust(&k, &["*"]);
        // Heard over gossip: a name of a layer this host never fetched, and a removal.
        s.set_name(&NameRecord::sign(&k, "template://p/elsewhere/1", ChunkId::of(b"not here"), 1).unwrap(), &t)
            .unwrap();
        s.set_name(&NameRecord::sign_removal(&k, "template://p/gone/1", 1).unwrap(), &t).unwrap();
        assert!(s.roots().unwrap().is_empty());
        s.gc().unwrap();
        assert!(s.verify().unwrap().is_clean());
    }
}
