//! The one door for name records and key successions that arrive from
//! peers, over gossip or a names pull.
//!
//! A record is stored only if the host's [`Trust`] admits it and it is
//! newer than the one held (`Store::set_name`). A refusal is logged and
//! counted against the delivering peer once per record, not once per
//! gossip round: the refused records are kept (at most [`MAX_REFUSED`],
//! oldest dropped first), which is also what lets a trust change accept
//! them at once ([`NameGate::set_trust`]) instead of at their next
//! announcement.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use xenod_store::{NameRecord, Store, Succession, Trust};

use crate::stats::Stats;

/// How many refused records are remembered.
pub const MAX_REFUSED: usize = 1024;

/// What became of one offered record.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    Accepted,
    /// The same record is held already.
    Held,
    /// Refused, with the reason (naming the record, the key and the rule).
    Refused(String),
}

/// Refused records and successions, by signature (which names one record).
#[derive(Default)]
struct Refused {
    order: VecDeque<Vec<u8>>,
    records: HashMap<Vec<u8>, Option<NameRecord>>,
}

impl Refused {
    /// Remembers a refusal; `true` the first time.
    fn note(&mut self, sig: &[u8], rec: Option<&NameRecord>) -> bool {
        if self.records.contains_key(sig) {
            return false;
        }
        if self.order.len() >= MAX_REFUSED
            && let Some(old) = self.order.pop_front()
        {
            self.records.remove(&old);
        }
        self.order.push_back(sig.to_vec());
        self.records.insert(sig.to_vec(), rec.cloned());
        true
    }

    fn forget(&mut self, sig: &[u8]) {
        if self.records.remove(sig).is_some() {
            self.order.retain(|s| s != sig);
        }
    }
}

/// Admits name records into a store under the host's trust.
pub struct NameGate {
    store: Arc<Store>,
    stats: Arc<Stats>,
    trust: RwLock<Trust>,
    refused: Mutex<Refused>,
}

impl std::fmt::Debug for NameGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NameGate").field("trust", &*self.read_trust()).finish_non_exhaustive()
    }
}

impl NameGate {
    pub(crate) fn new(store: Arc<Store>, stats: Arc<Stats>, trust: Trust) -> Self {
        Self { store, stats, trust: RwLock::new(trust), refused: Mutex::default() }
    }

    fn read_trust(&self) -> std::sync::RwLockReadGuard<'_, Trust> {
        self.trust.read().unwrap_or_else(|e| e.into_inner())
    }

    fn refused(&self) -> std::sync::MutexGuard<'_, Refused> {
        self.refused.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The trust in force.
    pub fn trust(&self) -> Trust {
        self.read_trust().clone()
    }

    /// Puts `trust` in force and offers every remembered refused record
    /// again; returns the names accepted now.
    pub fn set_trust(&self, trust: Trust) -> Vec<String> {
        *self.trust.write().unwrap_or_else(|e| e.into_inner()) = trust;
        self.retry()
    }

    /// How many refused records are remembered.
    pub fn refused_held(&self) -> usize {
        self.refused().records.len()
    }

    /// Offers a record `from` a peer (a node id, for the counters).
    pub fn offer(&self, rec: &NameRecord, from: &str) -> Offer {
        let verdict = self.store.set_name(rec, &self.read_trust());
        match verdict {
            Ok(true) => {
                self.refused().forget(&rec.sig);
                Offer::Accepted
            }
            Ok(false) => Offer::Held,
            Err(e) => {
                let why = e.to_string();
                if self.refused().note(&rec.sig, Some(rec)) {
                    self.count(from, &why);
                }
                Offer::Refused(why)
            }
        }
    }

    /// Offers a key succession; a new one may admit refused records.
    pub fn offer_succession(&self, s: &Succession, from: &str) -> Offer {
        match self.store.set_succession(s) {
            Ok(true) => {
                let accepted = self.retry();
                if !accepted.is_empty() {
                    tracing::info!("after a key succession, accepted {}", accepted.join(", "));
                }
                Offer::Accepted
            }
            Ok(false) => Offer::Held,
            Err(e) => {
                let why = e.to_string();
                if self.refused().note(&s.sig, None) {
                    self.count(from, &why);
                }
                Offer::Refused(why)
            }
        }
    }

    fn count(&self, from: &str, why: &str) {
        tracing::warn!("refused a name record from {from}: {why}");
        self.stats.with(from, |t, c| {
            t.names_refused += 1;
            c.names_refused += 1;
            c.last_error = Some(why.to_owned());
        });
    }

    /// Offers the remembered refused records again, quietly.
    fn retry(&self) -> Vec<String> {
        let mut held: Vec<NameRecord> = self.refused().records.values().flatten().cloned().collect();
        held.sort_by(|a, b| (&a.name, a.seq).cmp(&(&b.name, b.seq)));
        let trust = self.trust();
        let mut accepted = Vec::new();
        for rec in held {
            if let Ok(true) = self.store.set_name(&rec, &trust) {
                self.refused().forget(&rec.sig);
                accepted.push(rec.name);
            }
        }
        accepted.sort();
        accepted
    }
}
