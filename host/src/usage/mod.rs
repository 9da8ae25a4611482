//! Accounting: what each instance used, kept in the daemon's database so a
//! provider can bill from it (`xenod usage`).
//!
//! ```text
//! DATA_DIR/usage.redb
//!   last     instance -> its counters at the last sample (cumulative, as read)
//!   minute   (instance, minute start) -> Usage in that minute   kept 48 h
//!   hour     (instance, hour start)   -> Usage in that hour     kept 400 days
//!   owners   instance -> Meta (owner, first and last seen)
//! ```
//!
//! The daemon samples every instance every `usage_interval_secs` (10 s) and
//! before it answers `usage` ([`Reading`]: libvirt's CPU time, memory and
//! disk counters, the instance filesystem's bytes read and written, the
//! kernel's byte counters of its forwarded ports, the upper layer's size).
//! Each sample adds what grew since the last one to the minute and the
//! hour it falls in, so both are always current and the rollup costs one
//! more write; older minutes and hours are dropped as they age.
//!
//! - A counter that went down was reset (the guest's process or mount
//!   started again): all of its new value is new use.
//! - Memory is counted while the guest runs, as MiB held times the
//!   monotonic time between samples, at most 3 intervals (a daemon that
//!   was down does not bill the gap as held memory it did not see).
//! - Wall-clock time only names buckets, and never goes back: a sample
//!   taken after the clock was set back lands in the last sample's bucket.
//! - The counters survive a daemon restart (`last` is on disk), so a guest
//!   that ran on meanwhile is billed for it at the next sample.
//! - A migrated instance's rows go with it ([`History`]); the source drops
//!   them once the target holds them.

pub mod net;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const LAST: TableDefinition<'static, &'static str, &'static [u8]> = TableDefinition::new("last");
const MINUTE: TableDefinition<'static, (&'static str, u64), &'static [u8]> = TableDefinition::new("minute");
const HOUR: TableDefinition<'static, (&'static str, u64), &'static [u8]> = TableDefinition::new("hour");
const OWNERS: TableDefinition<'static, &'static str, &'static [u8]> = TableDefinition::new("owners");

/// How long minutes and hours are kept, in seconds.
pub const KEEP_MINUTES: u64 = 48 * 3600;
pub const KEEP_HOURS: u64 = 400 * 86400;

/// The database's file in `data_dir`.
pub fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join("usage.redb")
}

/// One instance's counters as read at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reading {
    /// The guest runs (or is paused): it holds its memory.
    pub active: bool,
    pub cpu_ns: u64,
    pub memory_kib: u64,
    pub disk_read: u64,
    pub disk_written: u64,
    pub net_in: u64,
    pub net_out: u64,
    pub upper_bytes: u64,
}

/// What an instance used in a span of time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub cpu_ns: u64,
    /// MiB held times seconds.
    pub memory_mib_seconds: f64,
    pub memory_peak_mib: u64,
    /// Seconds the guest ran (or was paused) while sampled.
    pub active_seconds: f64,
    pub disk_read: u64,
    pub disk_written: u64,
    pub net_in: u64,
    pub net_out: u64,
    /// The upper layer's size at the span's last sample, and its peak.
    pub upper_bytes: u64,
    pub upper_peak_bytes: u64,
}

impl Usage {
    /// Adds `later`, a span after this one.
    pub fn add(&mut self, later: &Usage) {
        self.cpu_ns += later.cpu_ns;
        self.memory_mib_seconds += later.memory_mib_seconds;
        self.memory_peak_mib = self.memory_peak_mib.max(later.memory_peak_mib);
        self.active_seconds += later.active_seconds;
        self.disk_read += later.disk_read;
        self.disk_written += later.disk_written;
        self.net_in += later.net_in;
        self.net_out += later.net_out;
        self.upper_bytes = later.upper_bytes;
        self.upper_peak_bytes = self.upper_peak_bytes.max(later.upper_peak_bytes);
    }

    /// Totals over instances: sizes add up too.
    fn add_beside(&mut self, other: &Usage) {
        let upper = self.upper_bytes + other.upper_bytes;
        let peak = self.upper_peak_bytes + other.upper_peak_bytes;
        let mem = self.memory_peak_mib + other.memory_peak_mib;
        self.add(other);
        (self.upper_bytes, self.upper_peak_bytes, self.memory_peak_mib) = (upper, peak, mem);
    }

    /// What grew from `last` to `now` over `secs` seconds.
    pub fn between(last: &Reading, now: &Reading, secs: f64) -> Usage {
        // A counter that went down started again from zero.
        let grew = |a: u64, b: u64| if b >= a { b - a } else { b };
        let mib = now.memory_kib / 1024;
        let held = if now.active { secs } else { 0.0 };
        Usage {
            cpu_ns: grew(last.cpu_ns, now.cpu_ns),
            memory_mib_seconds: mib as f64 * held,
            memory_peak_mib: if now.active { mib } else { 0 },
            active_seconds: held,
            disk_read: grew(last.disk_read, now.disk_read),
            disk_written: grew(last.disk_written, now.disk_written),
            net_in: grew(last.net_in, now.net_in),
            net_out: grew(last.net_out, now.net_out),
            upper_bytes: now.upper_bytes,
            upper_peak_bytes: now.upper_bytes,
        }
    }
}

/// An instance's last sample.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Last {
    /// Wall-clock seconds (never earlier than the sample before).
    at: u64,
    /// This process's monotonic clock, milliseconds since [`epoch`]; none
    /// when read by an earlier process.
    #[serde(default)]
    mono_ms: Option<u64>,
    /// The daemon process that took it.
    #[serde(default)]
    pid: u32,
    reading: Reading,
}

/// Who an instance belongs to, and when it was seen.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Meta {
    /// The key (or node) that deployed it.
    pub owner: String,
    pub first: u64,
    pub last: u64,
}

/// An instance's rows, as a migration carries them to its new host.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct History {
    pub meta: Meta,
    pub minutes: Vec<(u64, Usage)>,
    pub hours: Vec<(u64, Usage)>,
}

/// One instance's line of a report.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InstanceUsage {
    pub instance: String,
    pub owner: String,
    /// It exists on this host now.
    pub here: bool,
    pub first: u64,
    pub last: u64,
    pub usage: Usage,
}

/// One owner's line of a report.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OwnerUsage {
    pub owner: String,
    pub instances: usize,
    pub usage: Usage,
}

/// `xenod usage`'s answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// The span's start (the start of its first bucket), unix seconds.
    pub since: u64,
    pub until: u64,
    /// `minute` or `hour`: the buckets the span was summed from.
    pub granularity: String,
    pub instances: Vec<InstanceUsage>,
    pub owners: Vec<OwnerUsage>,
    pub total: Usage,
    /// What could not be counted, and why.
    pub notes: Vec<String>,
}

/// Bytes the files under `dir` take on disk (their blocks), walked.
pub fn upper_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if let Ok(m) = e.metadata() {
                if m.is_dir() {
                    stack.push(e.path());
                } else {
                    total += m.blocks() * 512;
                }
            }
        }
    }
    total
}

/// Unix seconds now.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Milliseconds on this process's monotonic clock.
fn mono_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

/// The accounting database of one data directory.
pub struct Ledger {
    db: redb::Database,
    path: PathBuf,
    /// Samples are taken one at a time (the loop, a request, a migration).
    sampling: std::sync::Mutex<()>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").field("path", &self.path).finish()
    }
}

impl Ledger {
    pub fn open(data_dir: &Path) -> Result<Self> {
        let path = db_path(data_dir);
        let db = redb::Database::create(&path).map_err(|e| Error::msg(format!("opening {}: {e}", path.display())))?;
        let l = Ledger { db, path, sampling: Default::default() };
        let w = l.write()?;
        {
            for t in [LAST, OWNERS] {
                w.open_table(t).map_err(|e| l.err(e))?;
            }
            for t in [MINUTE, HOUR] {
                w.open_table(t).map_err(|e| l.err(e))?;
            }
        }
        w.commit().map_err(|e| l.err(e))?;
        Ok(l)
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::msg(format!("usage database {}: {e}", self.path.display()))
    }

    fn write(&self) -> Result<redb::WriteTransaction> {
        self.db.begin_write().map_err(|e| self.err(e))
    }

    /// Serializes samples; hold it while reading counters and recording them.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.sampling.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a sample of each instance (`owner` is kept the first time
    /// an instance is seen); at `at` unix seconds.
    pub fn record(&self, samples: &[(String, String, Reading)], at: u64, interval_secs: u64) -> Result<()> {
        let w = self.write()?;
        {
            let mut last_t = w.open_table(LAST).map_err(|e| self.err(e))?;
            let mut min_t = w.open_table(MINUTE).map_err(|e| self.err(e))?;
            let mut hour_t = w.open_table(HOUR).map_err(|e| self.err(e))?;
            let mut own_t = w.open_table(OWNERS).map_err(|e| self.err(e))?;
            let (mono, pid) = (mono_ms(), std::process::id());
            for (name, owner, r) in samples {
                let prev: Option<Last> = last_t
                    .get(name.as_str())
                    .map_err(|e| self.err(e))?
                    .and_then(|v| serde_json::from_slice(v.value()).ok());
                let at = prev.map_or(at, |p| at.max(p.at));
                let usage = match prev {
                    // The first sample: the counters count from the start
                    // of the guest's process and mount, all of it use.
                    None => Usage::between(&Reading::default(), r, 0.0),
                    Some(p) => {
                        let cap = 3.0 * interval_secs.max(1) as f64;
                        let secs = match p.mono_ms {
                            Some(m) if p.pid == pid => (mono.saturating_sub(m)) as f64 / 1000.0,
                            _ => (at - p.at) as f64,
                        };
                        Usage::between(&p.reading, r, secs.min(cap))
                    }
                };
                let rec = Last { at, mono_ms: Some(mono), pid, reading: *r };
                last_t.insert(name.as_str(), serde_json::to_vec(&rec)?.as_slice()).map_err(|e| self.err(e))?;
                let mut meta: Meta = own_t
                    .get(name.as_str())
                    .map_err(|e| self.err(e))?
                    .and_then(|v| serde_json::from_slice(v.value()).ok())
                    .unwrap_or_else(|| Meta { owner: owner.clone(), first: at, last: at });
                meta.last = at;
                own_t.insert(name.as_str(), serde_json::to_vec(&meta)?.as_slice()).map_err(|e| self.err(e))?;
                for (t, width) in [(&mut min_t, 60), (&mut hour_t, 3600)] {
                    let key = (name.as_str(), at - at % width);
                    let mut cur: Usage = t
                        .get(key)
                        .map_err(|e| self.err(e))?
                        .and_then(|v| serde_json::from_slice(v.value()).ok())
                        .unwrap_or_default();
                    cur.add(&usage);
                    t.insert(key, serde_json::to_vec(&cur)?.as_slice()).map_err(|e| self.err(e))?;
                }
            }
        }
        w.commit().map_err(|e| self.err(e))
    }

    /// Drops minutes and hours older than they are kept, and instances
    /// with no hour left.
    pub fn prune(&self, now: u64) -> Result<usize> {
        let w = self.write()?;
        let mut dropped = 0;
        {
            for (def, keep) in [(MINUTE, KEEP_MINUTES), (HOUR, KEEP_HOURS)] {
                let mut t = w.open_table(def).map_err(|e| self.err(e))?;
                let old: Vec<(String, u64)> = t
                    .iter()
                    .map_err(|e| self.err(e))?
                    .filter_map(|r| r.ok())
                    .map(|(k, _)| {
                        let (n, at) = k.value();
                        (n.to_owned(), at)
                    })
                    .filter(|(_, at)| at + keep < now)
                    .collect();
                for (n, at) in &old {
                    t.remove((n.as_str(), *at)).map_err(|e| self.err(e))?;
                }
                dropped += old.len();
            }
            let mut own = w.open_table(OWNERS).map_err(|e| self.err(e))?;
            let gone: Vec<String> = own
                .iter()
                .map_err(|e| self.err(e))?
                .filter_map(|r| r.ok())
                .filter_map(|(k, v)| {
                    let m: Meta = serde_json::from_slice(v.value()).ok()?;
                    (m.last + KEEP_HOURS < now).then(|| k.value().to_owned())
                })
                .collect();
            let mut last = w.open_table(LAST).map_err(|e| self.err(e))?;
            for n in &gone {
                own.remove(n.as_str()).map_err(|e| self.err(e))?;
                last.remove(n.as_str()).map_err(|e| self.err(e))?;
            }
        }
        w.commit().map_err(|e| self.err(e))?;
        Ok(dropped)
    }

    /// The usage of instance `only` (or of all), from `since` (unix
    /// seconds; none: all that is kept) to now. `here`: instances on this
    /// host now.
    pub fn report(&self, only: Option<&str>, since: Option<u64>, now: u64, here: &[String]) -> Result<Report> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let recent = since.is_some_and(|s| s + KEEP_MINUTES > now + 60);
        let (def, width, granularity) = if recent { (MINUTE, 60, "minute") } else { (HOUR, 3600, "hour") };
        let from = since.map_or(0, |s| s - s % width);
        let t = r.open_table(def).map_err(|e| self.err(e))?;
        let own = r.open_table(OWNERS).map_err(|e| self.err(e))?;
        let mut per: BTreeMap<String, Usage> = BTreeMap::new();
        for row in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let (name, at) = k.value();
            if at < from || only.is_some_and(|o| o != name) {
                continue;
            }
            let u: Usage = serde_json::from_slice(v.value())?;
            per.entry(name.to_owned()).or_default().add(&u);
        }
        let mut instances = Vec::new();
        for row in own.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let name = k.value();
            if only.is_some_and(|o| o != name) {
                continue;
            }
            let m: Meta = serde_json::from_slice(v.value())?;
            if since.is_some_and(|s| m.last < s) && !per.contains_key(name) {
                continue;
            }
            instances.push(InstanceUsage {
                instance: name.to_owned(),
                owner: m.owner,
                here: here.iter().any(|h| h == name),
                first: m.first,
                last: m.last,
                usage: per.remove(name).unwrap_or_default(),
            });
        }
        let mut owners: BTreeMap<String, OwnerUsage> = BTreeMap::new();
        let mut total = Usage::default();
        for i in &instances {
            let o = owners.entry(i.owner.clone()).or_insert_with(|| OwnerUsage {
                owner: i.owner.clone(),
                instances: 0,
                usage: Usage::default(),
            });
            o.instances += 1;
            o.usage.add_beside(&i.usage);
            total.add_beside(&i.usage);
        }
        Ok(Report {
            since: from,
            until: now,
            granularity: granularity.into(),
            instances,
            owners: owners.into_values().collect(),
            total,
            notes: Vec::new(),
        })
    }

    /// Instance `name`'s rows, for its new host.
    pub fn export(&self, name: &str) -> Result<Option<History>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let own = r.open_table(OWNERS).map_err(|e| self.err(e))?;
        let Some(meta) = own.get(name).map_err(|e| self.err(e))? else { return Ok(None) };
        let meta: Meta = serde_json::from_slice(meta.value())?;
        let mut h = History { meta, ..Default::default() };
        for (def, out) in [(MINUTE, &mut h.minutes), (HOUR, &mut h.hours)] {
            let t = r.open_table(def).map_err(|e| self.err(e))?;
            for row in t.range((name, 0)..=(name, u64::MAX)).map_err(|e| self.err(e))? {
                let (k, v) = row.map_err(|e| self.err(e))?;
                out.push((k.value().1, serde_json::from_slice(v.value())?));
            }
        }
        Ok(Some(h))
    }

    /// Adds rows of instance `name` brought from another host.
    pub fn import(&self, name: &str, h: &History) -> Result<()> {
        let w = self.write()?;
        {
            let mut own = w.open_table(OWNERS).map_err(|e| self.err(e))?;
            let meta = match own.get(name).map_err(|e| self.err(e))? {
                Some(v) => {
                    let m: Meta = serde_json::from_slice(v.value())?;
                    Meta {
                        owner: h.meta.owner.clone(),
                        first: m.first.min(h.meta.first),
                        last: m.last.max(h.meta.last),
                    }
                }
                None => h.meta.clone(),
            };
            own.insert(name, serde_json::to_vec(&meta)?.as_slice()).map_err(|e| self.err(e))?;
            for (def, rows) in [(MINUTE, &h.minutes), (HOUR, &h.hours)] {
                let mut t = w.open_table(def).map_err(|e| self.err(e))?;
                for (at, u) in rows {
                    let here: Usage = t
                        .get((name, *at))
                        .map_err(|e| self.err(e))?
                        .and_then(|v| serde_json::from_slice(v.value()).ok())
                        .unwrap_or_default();
                    // Rows from elsewhere are earlier than what starts here.
                    let mut sum = *u;
                    sum.add(&here);
                    t.insert((name, *at), serde_json::to_vec(&sum)?.as_slice()).map_err(|e| self.err(e))?;
                }
            }
        }
        w.commit().map_err(|e| self.err(e))
    }

    /// Forgets instance `name` (its rows went to another host).
    pub fn forget(&self, name: &str) -> Result<()> {
        let w = self.write()?;
        {
            for def in [MINUTE, HOUR] {
                let mut t = w.open_table(def).map_err(|e| self.err(e))?;
                let keys: Vec<u64> = t
                    .range((name, 0)..=(name, u64::MAX))
                    .map_err(|e| self.err(e))?
                    .filter_map(|r| r.ok())
                    .map(|(k, _)| k.value().1)
                    .collect();
                for at in keys {
                    t.remove((name, at)).map_err(|e| self.err(e))?;
                }
            }
            w.open_table(OWNERS).map_err(|e| self.err(e))?.remove(name).map_err(|e| self.err(e))?;
            w.open_table(LAST).map_err(|e| self.err(e))?.remove(name).map_err(|e| self.err(e))?;
        }
        w.commit().map_err(|e| self.err(e))
    }
}

/// Parses `--since`: a duration back from now (`90s`, `15m`, `6h`, `7d`),
/// unix seconds, or a UTC date `YYYY-MM-DD[THH:MM[:SS]][Z]`.
pub fn parse_since(s: &str, now: u64) -> std::result::Result<u64, String> {
    let s = s.trim();
    let bad =
        || format!("--since {s:?}: want a duration back (90s, 15m, 6h, 7d), unix seconds, or YYYY-MM-DD[THH:MM[:SS]]");
    if let Some(unit) = s.chars().last().filter(|c| "smhd".contains(*c))
        && let Ok(n) = s[..s.len() - 1].parse::<u64>()
    {
        let mul = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => 86400,
        };
        return Ok(now.saturating_sub(n.saturating_mul(mul)));
    }
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    let s2 = s.trim_end_matches('Z');
    let (date, time) = s2.split_once(['T', ' ']).unwrap_or((s2, "00:00:00"));
    let d: Vec<i64> =
        date.split('-').map(|x| x.parse::<i64>()).collect::<std::result::Result<_, _>>().map_err(|_| bad())?;
    let t: Vec<i64> =
        time.split(':').map(|x| x.parse::<i64>()).collect::<std::result::Result<_, _>>().map_err(|_| bad())?;
    let ([y, mo, da], [h, mi, rest @ ..]) = (d.as_slice(), t.as_slice()) else { return Err(bad()) };
    let (y, mo, da, h, mi, se) = (*y, *mo, *da, *h, *mi, rest.first().copied().unwrap_or(0));
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || h > 23 || mi > 59 || se > 60 || rest.len() > 1 {
        return Err(bad());
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86400 + h * 3600 + mi * 60 + se;
    u64::try_from(secs).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(cpu_s: u64, mem_mib: u64, written: u64, out: u64) -> Reading {
        Reading {
            active: true,
            cpu_ns: cpu_s * 1_000_000_000,
            memory_kib: mem_mib * 1024,
            disk_written: written,
            net_out: out,
            upper_bytes: written,
            ..Default::default()
        }
    }

    #[test]
    fn samples_add_up_per_instance_owner_and_total() {
        let d = tempfile::tempdir().unwrap();
        let l = Ledger::open(d.path()).unwrap();
        let t0: u64 = 1_800_000_000; // the start of an hour
        let s = |name: &str, owner: &str, r| (name.to_owned(), owner.to_owned(), r);
        l.record(&[s("a", "alice", reading(5, 256, 0, 0)), s("b", "bob", reading(1, 128, 0, 0))], t0, 10).unwrap();
        l.record(&[s("a", "alice", reading(15, 256, 1000, 50)), s("b", "bob", reading(3, 128, 0, 0))], t0 + 10, 10)
            .unwrap();
        // The guest restarted: its counters began again.
        l.record(&[s("a", "alice", reading(2, 256, 500, 10))], t0 + 20, 10).unwrap();
        let rep = l.report(None, None, t0 + 30, &["a".into()]).unwrap();
        let a = rep.instances.iter().find(|i| i.instance == "a").unwrap();
        assert!(a.here);
        assert_eq!(a.usage.cpu_ns, 17_000_000_000, "5 s at the first sample, 10 s, then 2 s after the restart");
        assert_eq!(a.usage.disk_written, 1500);
        assert_eq!(a.usage.net_out, 60);
        assert_eq!(a.usage.upper_bytes, 500, "the size at the last sample");
        assert_eq!(a.usage.upper_peak_bytes, 1000);
        assert_eq!(a.usage.memory_peak_mib, 256);
        assert_eq!(rep.owners.len(), 2);
        assert_eq!(rep.total.cpu_ns, 20_000_000_000);
        // Since a time: the minute buckets.
        let rep = l.report(Some("a"), Some(t0 + 20), t0 + 30, &[]).unwrap();
        assert_eq!(rep.granularity, "minute");
        assert_eq!(rep.instances.len(), 1);
        assert_eq!(rep.instances[0].usage.cpu_ns, 17_000_000_000, "all in the first minute of the hour");
    }

    #[test]
    fn kept_across_reopen_clock_back_and_migration() {
        let d = tempfile::tempdir().unwrap();
        let t0: u64 = 1_800_000_000; // the start of an hour
        let s = |cpu| vec![("a".to_owned(), "alice".to_owned(), reading(cpu, 64, 0, 0))];
        {
            let l = Ledger::open(d.path()).unwrap();
            l.record(&s(1), t0 + 100, 10).unwrap();
        }
        let l = Ledger::open(d.path()).unwrap();
        // Reopened (a daemon restart), and the clock set back an hour.
        l.record(&s(4), t0 - 3600, 10).unwrap();
        let rep = l.report(None, None, t0 + 200, &[]).unwrap();
        assert_eq!(rep.instances[0].usage.cpu_ns, 4_000_000_000);
        assert_eq!(rep.instances[0].last, t0 + 100, "time never goes back");
        let h = l.export("a").unwrap().unwrap();
        let e = tempfile::tempdir().unwrap();
        let there = Ledger::open(e.path()).unwrap();
        there.import("a", &h).unwrap();
        l.forget("a").unwrap();
        assert!(l.report(None, None, t0 + 200, &[]).unwrap().instances.is_empty());
        assert!(l.export("a").unwrap().is_none());
        let rep = there.report(Some("a"), None, t0 + 200, &[]).unwrap();
        assert_eq!(rep.instances[0].usage.cpu_ns, 4_000_000_000);
        assert_eq!(rep.instances[0].owner, "alice");
    }

    #[test]
    fn old_rows_are_pruned() {
        let d = tempfile::tempdir().unwrap();
        let l = Ledger::open(d.path()).unwrap();
        let t0 = 1_800_000_000;
        let s = |cpu| vec![("a".to_owned(), "o".to_owned(), reading(cpu, 64, 0, 0))];
        l.record(&s(1), t0, 10).unwrap();
        l.record(&s(2), t0 + 10, 10).unwrap();
        assert_eq!(l.prune(t0 + 3600).unwrap(), 0);
        assert_eq!(l.prune(t0 + KEEP_MINUTES + 120).unwrap(), 1, "the minute goes, the hour stays");
        assert_eq!(l.report(None, None, t0 + KEEP_MINUTES + 120, &[]).unwrap().total.cpu_ns, 2_000_000_000);
        l.prune(t0 + KEEP_HOURS + 7200).unwrap();
        assert!(l.report(None, None, t0 + KEEP_HOURS + 7200, &[]).unwrap().instances.is_empty());
    }

    #[test]
    fn since_parses() {
        let now = 1_800_000_000;
        assert_eq!(parse_since("90s", now).unwrap(), now - 90);
        assert_eq!(parse_since("2h", now).unwrap(), now - 7200);
        assert_eq!(parse_since("1700000000", now).unwrap(), 1_700_000_000);
        assert_eq!(parse_since("1970-01-02", now).unwrap(), 86400);
        assert_eq!(parse_since("2026-12-06T15:57:19Z", now).unwrap(), 1_796_572_639);
        for bad in ["yesterday", "2026-13-01", "-5m", "2026-12-06T25:00"] {
            assert!(parse_since(bad, now).is_err(), "{bad}");
        }
    }
}
