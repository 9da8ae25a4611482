//! Admission: a guest is deployed, started, resumed, restored or taken
//! in by migration only if what it asks fits what this host offers
//! (`[capacity]` in config.toml) less what its running guests hold.
//!
//! ```text
//! offered   vcpus   [capacity] vcpus (default: the host's CPUs) x cpu_overcommit (default 4)
//!           memory  ([capacity] memory_mib, default: the host's memory) - reserved_memory_mib,
//!                   x memory_overcommit (default 1)
//!           upper   [capacity] upper_mib (default: no bound)
//! held      what the instances of this host that run (or are paused, or
//!           whose state the hypervisor cannot tell) were given; a stopped
//!           or suspended one holds nothing until it starts again
//! ```
//!
//! With `upper_mib` set, every guest needs an upper quota (`upper_bytes`
//! in its limits), and the quotas of running guests count against it.
//! Admission is rebuilt from the instances found each time, so it
//! survives a restart of the daemon. A refusal names the resource, what
//! was asked and what is free, and exits with [`Exit::Capacity`].

use serde::{Deserialize, Serialize};
use xenod_store::Exit;

use crate::config::Capacity as Offer;
use crate::error::Error;

/// What a guest asks of its host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ask {
    /// Bytes.
    pub mem: u64,
    pub vcpus: u32,
    /// Bytes of upper quota, if it has one.
    pub upper: Option<u64>,
}

impl Ask {
    /// What a guest of `spec` asks.
    pub fn of(spec: &xenod_deployer::DeploySpec) -> Self {
        Self { mem: u64::from(spec.memory_mib) << 20, vcpus: spec.vcpus, upper: spec.limits.upper_bytes }
    }

    /// `n` such guests.
    pub fn times(self, n: u32) -> Self {
        Self { mem: self.mem * u64::from(n), vcpus: self.vcpus * n, upper: self.upper.map(|u| u * u64::from(n)) }
    }

    /// This and `o`.
    pub fn plus(self, o: Ask) -> Self {
        let upper = match (self.upper, o.upper) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        };
        Self { mem: self.mem + o.mem, vcpus: self.vcpus + o.vcpus, upper }
    }
}

/// What this host offers, what its guests hold, and what is free.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    pub vcpus: f64,
    /// Bytes.
    pub mem: u64,
    pub upper: Option<u64>,
    pub held: Ask,
    /// Instances holding it.
    pub holders: usize,
}

impl Capacity {
    /// What `cap` (the config's `[capacity]`) offers on this host, with
    /// `held` by `holders` instances.
    pub fn of(cap: &Offer, held: Ask, holders: usize) -> Self {
        let cpus = cap.vcpus.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
        let mem = cap.memory_mib.map_or_else(host_memory, |m| m << 20);
        let mem = mem.saturating_sub(cap.reserved_memory_mib.unwrap_or(0) << 20);
        Self {
            vcpus: f64::from(cpus) * cap.cpu_overcommit.unwrap_or(4.0),
            mem: (mem as f64 * cap.memory_overcommit.unwrap_or(1.0)) as u64,
            upper: cap.upper_mib.map(|m| m << 20),
            held,
            holders,
        }
    }

    pub fn mem_free(&self) -> u64 {
        self.mem.saturating_sub(self.held.mem)
    }

    /// `Ok` if `ask` fits; else the refusal, naming the resource.
    pub fn admit(&self, what: &str, ask: &Ask) -> Result<(), Error> {
        let mib = |b: u64| b >> 20;
        let held = |r: String| format!("{r}, {} instance(s) hold the rest", self.holders);
        if ask.mem > self.mem_free() {
            return Err(refuse(
                what,
                held(format!(
                    "memory: {} MiB asked, {} MiB free of {} MiB",
                    mib(ask.mem),
                    mib(self.mem_free()),
                    mib(self.mem)
                )),
            ));
        }
        let vcpus_free = self.vcpus - f64::from(self.held.vcpus);
        if f64::from(ask.vcpus) > vcpus_free {
            return Err(refuse(
                what,
                held(format!("vcpus: {} asked, {} free of {}", ask.vcpus, vcpus_free.max(0.0), self.vcpus)),
            ));
        }
        if let Some(cap) = self.upper {
            let Some(up) = ask.upper else {
                return Err(refuse(
                    what,
                    "upper: this host offers upper-layer disk only to guests with a quota (--upper-quota MiB)".into(),
                ));
            };
            let free = cap.saturating_sub(self.held.upper.unwrap_or(0));
            if up > free {
                return Err(refuse(
                    what,
                    held(format!("upper: {} MiB asked, {} MiB free of {} MiB", mib(up), mib(free), mib(cap))),
                ));
            }
        }
        Ok(())
    }
}

fn refuse(what: &str, why: String) -> Error {
    Error::coded(Exit::Capacity, format!("{what} not admitted: {why}"))
}

/// What `cap` (the config's `[capacity]`) offers beyond what this host
/// has: its CPUs, its memory, and the free disk under `data_dir` (for the
/// upper layers). One warning each; none when it fits.
pub fn beyond_host(cap: &Offer, data_dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    if let Some(v) = cap.vcpus.filter(|v| *v > cpus) {
        out.push(format!("[capacity] vcpus = {v}, but this host has {cpus} CPUs (cpu_overcommit multiplies them)"));
    }
    let mem = host_memory() >> 20;
    if let Some(m) = cap.memory_mib.filter(|m| mem > 0 && *m > mem) {
        out.push(format!(
            "[capacity] memory_mib = {m}, but this host has {mem} MiB: guests admitted on it may not get their memory"
        ));
    }
    if let Some(u) = cap.upper_mib
        && let Ok(s) = rustix::fs::statvfs(data_dir)
    {
        let free = s.f_bavail.saturating_mul(s.f_frsize) >> 20;
        if u > free {
            out.push(format!(
                "[capacity] upper_mib = {u}, but {} has {free} MiB free: upper quotas may not be honoured",
                data_dir.display()
            ));
        }
    }
    out
}

/// Bytes of memory the kernel says this host has.
fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        })
        .map_or(0, |k| k * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(c: Offer) -> Offer {
        c
    }

    #[test]
    fn refusals_name_the_resource_what_was_asked_and_what_is_free() {
        let c = config(Offer { memory_mib: Some(1024), vcpus: Some(2), cpu_overcommit: Some(1.0), ..Offer::default() });
        let held = Ask { mem: 768 << 20, vcpus: 1, upper: None };
        let cap = Capacity::of(&c, held, 3);
        assert_eq!(cap.mem_free(), 256 << 20);
        assert!(cap.admit("web", &Ask { mem: 256 << 20, vcpus: 1, upper: None }).is_ok());
        let e = cap.admit("web", &Ask { mem: 512 << 20, vcpus: 1, upper: None }).unwrap_err();
        assert_eq!(e.exit_code(), Exit::Capacity);
        let m = e.to_string();
        assert!(m.contains("web not admitted: memory: 512 MiB asked, 256 MiB free of 1024 MiB, 3 instance(s)"), "{m}");
        let e = cap.admit("web", &Ask { mem: 1 << 20, vcpus: 2, upper: None }).unwrap_err();
        assert!(e.to_string().contains("vcpus: 2 asked, 1 free of 2"), "{e}");
        // Reserved memory and overcommit.
        let c = config(Offer {
            memory_mib: Some(1024),
            reserved_memory_mib: Some(512),
            memory_overcommit: Some(2.0),
            ..Offer::default()
        });
        assert_eq!(Capacity::of(&c, Ask::default(), 0).mem, 1024 << 20);
        // An upper bound admits only guests with a quota, within it.
        let c = config(Offer { upper_mib: Some(100), ..Offer::default() });
        let cap = Capacity::of(&c, Ask { upper: Some(60 << 20), ..Ask::default() }, 1);
        assert!(
            cap.admit("a", &Ask { upper: None, ..Ask::default() }).unwrap_err().to_string().contains("with a quota")
        );
        assert!(cap.admit("a", &Ask { upper: Some(50 << 20), ..Ask::default() }).is_err());
        assert!(cap.admit("a", &Ask { upper: Some(40 << 20), ..Ask::default() }).is_ok());
    }

    #[test]
    fn a_capacity_beyond_the_host_is_named() {
        let d = std::env::temp_dir();
        assert!(beyond_host(&Offer::default(), &d).is_empty());
        let big =
            Offer { vcpus: Some(1 << 20), memory_mib: Some(1 << 40), upper_mib: Some(1 << 50), ..Offer::default() };
        let w = beyond_host(&big, &d);
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("vcpus") && w[1].contains("memory_mib") && w[2].contains("upper_mib"), "{w:?}");
    }
}
