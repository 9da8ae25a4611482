//! Signed names: `template://publisher/name/version` -> layer id.
//!
//! A record binds a name to a layer id with a sequence number, signed by an
//! ed25519 key (the key type of iroh node ids). A host accepts a record only
//! if the key is trusted and the sequence number is higher than the one it
//! holds, so the newest record wins and an old one cannot be replayed.
//! `NAME@<id>` names an exact layer and never moves.
//!
//! ```text
//! signed bytes := "xenod-name-v1\0" name "\0" id[32] seq:u64le
//! ```

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::{ChunkId, LayerId};
use crate::store::{NAMES, PINS, Store};

pub const SCHEME: &str = "template://";

/// A signed binding of a name to a layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameRecord {
    pub name: String,
    pub id: ChunkId,
    pub seq: u64,
    /// The publisher's public key.
    pub key: [u8; 32],
    pub sig: Vec<u8>,
}

fn signed_bytes(name: &str, id: &ChunkId, seq: u64) -> Vec<u8> {
    let mut m = b"xenod-name-v1\0".to_vec();
    m.extend_from_slice(name.as_bytes());
    m.push(0);
    m.extend_from_slice(id.as_bytes());
    m.extend_from_slice(&seq.to_le_bytes());
    m
}

/// Checks that `name` is `template://SEG/SEG[/SEG...]` with plain segments.
pub fn check_name(name: &str) -> Result<()> {
    let bad = |why: &str| Error::Name { name: name.into(), why: why.into() };
    let rest = name.strip_prefix(SCHEME).ok_or_else(|| bad("must start with template://"))?;
    let segs: Vec<&str> = rest.split('/').collect();
    if segs.len() < 2 {
        return Err(bad("needs at least publisher/name"));
    }
    for s in segs {
        if s.is_empty() || s == "." || s == ".." {
            return Err(bad("empty or dot segment"));
        }
        if !s.chars().all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c)) {
            return Err(bad("segments may hold only letters, digits and . _ - +"));
        }
    }
    Ok(())
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
        check_name(name)?;
        let sig = key.sign(&signed_bytes(name, &id, seq));
        Ok(Self { name: name.into(), id, seq, key: key.verifying_key().to_bytes(), sig: sig.to_bytes().to_vec() })
    }

    /// Checks the signature, and that `trusted` holds the key.
    pub fn verify(&self, trusted: &[VerifyingKey]) -> Result<()> {
        let bad = |why: &str| Error::Name { name: self.name.clone(), why: why.into() };
        check_name(&self.name)?;
        let key = VerifyingKey::from_bytes(&self.key).map_err(|_| bad("publisher key is not a valid ed25519 key"))?;
        let sig = Signature::from_slice(&self.sig).map_err(|_| bad("signature is malformed"))?;
        key.verify(&signed_bytes(&self.name, &self.id, self.seq), &sig).map_err(|_| bad("bad signature"))?;
        if !trusted.contains(&key) {
            return Err(bad(&format!("publisher key {} is not trusted here", hex(&self.key))));
        }
        Ok(())
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

impl Store {
    /// Stores a verified record unless a record of the same name with an
    /// equal or higher sequence number is held.
    pub fn set_name(&self, rec: &NameRecord, trusted: &[VerifyingKey]) -> Result<()> {
        rec.verify(trusted)?;
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(NAMES).map_err(|e| self.db_err(e))?;
            if let Some(old) = t.get(rec.name.as_str()).map_err(|e| self.db_err(e))?
                && let Ok(old) = serde_json::from_slice::<NameRecord>(old.value())
                && old.seq >= rec.seq
            {
                return Err(Error::Name {
                    name: rec.name.clone(),
                    why: format!("sequence {} is not newer than the {} held", rec.seq, old.seq),
                });
            }
            let bytes = serde_json::to_vec(rec).unwrap_or_default();
            t.insert(rec.name.as_str(), bytes.as_slice()).map_err(|e| self.db_err(e))?;
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    pub fn name(&self, name: &str) -> Result<Option<NameRecord>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(NAMES).map_err(|e| self.db_err(e))?;
        let v = t.get(name).map_err(|e| self.db_err(e))?;
        Ok(v.and_then(|v| serde_json::from_slice(v.value()).ok()))
    }

    pub fn names(&self) -> Result<Vec<NameRecord>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(NAMES).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.db_err(e))? {
            let (_, v) = item.map_err(|e| self.db_err(e))?;
            if let Ok(r) = serde_json::from_slice(v.value()) {
                out.push(r);
            }
        }
        Ok(out)
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

    /// Resolves a reference: `template://...[@ID]`, a full id, or a unique
    /// prefix (at least 8 hex digits) of a layer written here.
    pub fn resolve(&self, r: &str) -> Result<LayerId> {
        if let Some(rest) = r.strip_prefix(SCHEME) {
            if let Some((name, id)) = r.rsplit_once('@') {
                check_name(name)?;
                let _ = rest;
                return id
                    .parse()
                    .map_err(|_| Error::Name { name: r.into(), why: "text after @ is not a 64-digit id".into() });
            }
            check_name(r)?;
            return self.name(r)?.map(|rec| rec.id).ok_or_else(|| Error::UnknownRef(r.into()));
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
                _ => return Err(Error::Name { name: r.into(), why: "prefix matches several layers".into() }),
            }
        }
        Err(Error::UnknownRef(r.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_refuse() {
        let k = generate_key().unwrap();
        let other = generate_key().unwrap();
        let id = ChunkId::of(b"layer");
        let rec = NameRecord::sign(&k, "template://debian/12/1", id, 1).unwrap();
        rec.verify(&[k.verifying_key()]).unwrap();
        let e = rec.verify(&[other.verifying_key()]).unwrap_err().to_string();
        assert!(e.contains("not trusted"), "{e}");
        let mut forged = rec.clone();
        forged.id = ChunkId::of(b"evil");
        assert!(forged.verify(&[k.verifying_key()]).unwrap_err().to_string().contains("bad signature"));
        for bad in ["debian/12", "template://x", "template://a/../b", "template://a/b c"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn newer_wins_older_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let k = generate_key().unwrap();
        let trusted = [k.verifying_key()];
        let (a, b) = (ChunkId::of(b"a"), ChunkId::of(b"b"));
        s.set_name(&NameRecord::sign(&k, "template://p/n", a, 1).unwrap(), &trusted).unwrap();
        s.set_name(&NameRecord::sign(&k, "template://p/n", b, 2).unwrap(), &trusted).unwrap();
        assert_eq!(s.resolve("template://p/n").unwrap(), b);
        let e = s.set_name(&NameRecord::sign(&k, "template://p/n", a, 2).unwrap(), &trusted).unwrap_err();
        assert!(e.to_string().contains("not newer"), "{e}");
        assert_eq!(s.resolve(&format!("template://p/n@{a}")).unwrap(), a);
        assert!(matches!(s.resolve("template://p/missing"), Err(Error::UnknownRef(_))));
    }
}
