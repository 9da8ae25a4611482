//! What a running guest has used, as its hypervisor counts it
//! ([`Libvirt::usage`]), and limits changed while it runs
//! ([`Libvirt::set_live_limits`]).
//!
//! | counter | libvirt |
//! |---|---|
//! | CPU time | `virDomainGetInfo` cpuTime: every thread of the guest's process |
//! | memory | `virDomainGetInfo` memory: what the guest holds now (KiB) |
//! | disk bytes | `virDomainBlockStats` of each `<disk>` (disk roots; a tree root's I/O is counted by its filesystem) |
//!
//! Live limits: `<cputune>` through `virDomainSetSchedulerParameters`
//! (shares, global period and quota), `<iotune>` through
//! `virDomainSetBlockIoTune`, memory through the balloon
//! (`virDomainSetMemoryFlags`, up to the guest's maximum). Each is applied
//! to the running guest and to its definition, so a restart keeps it.

use std::ffi::CString;

use virt::sys;

use crate::error::{Error, Result};
use crate::libvirt::{Libvirt, lv};

/// A guest's counters at one moment. `cpu_ns`, `disk_read` and
/// `disk_written` count from the start of the guest's process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DomainUsage {
    pub cpu_ns: u64,
    pub memory_kib: u64,
    pub disk_read: u64,
    pub disk_written: u64,
    /// The process runs (running or paused): the counters are live.
    pub active: bool,
}

/// Limits to change on a running guest; `None` leaves one as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LiveLimits {
    /// Percent of one CPU for the whole guest; `Some(0)`: no cap.
    pub cpu_quota_pct: Option<u32>,
    pub cpu_shares: Option<u32>,
    /// Disk roots: bytes a second, read and write together; `Some(0)`: none.
    pub disk_bytes_sec: Option<u64>,
    /// Disk roots: I/O operations a second; `Some(0)`: none.
    pub disk_iops_sec: Option<u64>,
    /// The guest's memory (balloon), MiB, at most its maximum.
    pub memory_mib: Option<u64>,
}

/// The `<target dev='..'>` of each `<disk>` in a domain's XML.
fn disk_targets(xml: &str) -> Vec<String> {
    let mut out = Vec::new();
    for part in xml.split("<disk ").skip(1) {
        let Some(body) = part.split("</disk>").next() else { continue };
        let Some(t) = body.split("<target ").nth(1) else { continue };
        let Some(dev) = t.split("dev=").nth(1) else { continue };
        let q = dev.chars().next().unwrap_or('\'');
        if let Some(name) = dev[1..].split(q).next() {
            out.push(name.to_owned());
        }
    }
    out
}

impl Libvirt {
    /// What guest `name` has used so far.
    pub fn usage(&self, name: &str) -> Result<DomainUsage> {
        let dom = self.lookup(name)?;
        let info = dom.info().map_err(lv("read the counters of", name))?;
        let active = dom.is_active().map_err(lv("inspect", name))?;
        let mut u = DomainUsage { cpu_ns: info.cpu_time, memory_kib: info.memory, active, ..Default::default() };
        if active {
            let xml = dom.xml_desc(0).map_err(lv("read the XML of", name))?;
            for dev in disk_targets(&xml) {
                let s = dom.block_stats(&dev).map_err(lv("read the disk counters of", name))?;
                u.disk_read += s.rd_bytes.max(0) as u64;
                u.disk_written += s.wr_bytes.max(0) as u64;
            }
        }
        Ok(u)
    }

    /// Changes limits of guest `name`, running or not: the running guest
    /// (if it runs) and its definition.
    pub fn set_live_limits(&self, name: &str, l: &LiveLimits) -> Result<()> {
        let dom = self.lookup(name)?;
        let active = dom.is_active().map_err(lv("inspect", name))?;
        // The running guest first, then its definition: one call each, as
        // some drivers refuse both flags at once.
        let mut impacts = vec![sys::VIR_DOMAIN_AFFECT_CONFIG];
        if active {
            impacts.insert(0, sys::VIR_DOMAIN_AFFECT_LIVE);
        }
        for flags in impacts {
            self.set_limits_with(&dom, name, l, flags)?;
        }
        Ok(())
    }

    fn set_limits_with(&self, dom: &virt::domain::Domain, name: &str, l: &LiveLimits, flags: u32) -> Result<()> {
        if l.cpu_quota_pct.is_some() || l.cpu_shares.is_some() {
            let mut p = Params::default();
            if let Some(s) = l.cpu_shares {
                p.ullong("cpu_shares", u64::from(s))?;
            }
            if let Some(q) = l.cpu_quota_pct {
                p.ullong("global_period", 100_000)?;
                // -1: no cap (the kernel's "max").
                p.llong("global_quota", if q == 0 { -1 } else { i64::from(q) * 1000 })?;
            }
            // SAFETY: `dom` holds a live virDomainPtr; `p` owns a typed
            // parameter array built by libvirt's own helpers.
            let rc = unsafe { sys::virDomainSetSchedulerParametersFlags(dom.as_ptr(), p.ptr, p.n, flags) };
            if rc < 0 {
                return Err(lv("set the CPU limits of", name)(virt::error::Error::last_error()));
            }
        }
        if l.disk_bytes_sec.is_some() || l.disk_iops_sec.is_some() {
            let xml = dom.xml_desc(0).map_err(lv("read the XML of", name))?;
            let disks = disk_targets(&xml);
            if disks.is_empty() {
                return Err(Error::Unsupported {
                    op: "disk limits",
                    reason: format!(
                        "{name} has no disk (a tree root's I/O goes through its shared filesystem, which libvirt cannot limit)"
                    ),
                });
            }
            for dev in disks {
                let mut p = Params::default();
                if let Some(b) = l.disk_bytes_sec {
                    p.ullong("total_bytes_sec", b)?;
                }
                if let Some(i) = l.disk_iops_sec {
                    p.ullong("total_iops_sec", i)?;
                }
                let dev_c = CString::new(dev.as_str()).map_err(|_| Error::Unsupported {
                    op: "disk limits",
                    reason: format!("disk name {dev:?} holds a NUL"),
                })?;
                // SAFETY: as above; `dev_c` outlives the call.
                let rc = unsafe { sys::virDomainSetBlockIoTune(dom.as_ptr(), dev_c.as_ptr(), p.ptr, p.n, flags) };
                if rc < 0 {
                    return Err(lv("set the disk limits of", name)(virt::error::Error::last_error()));
                }
            }
        }
        if let Some(m) = l.memory_mib {
            let max = dom.max_memory().map_err(lv("read the maximum memory of", name))?;
            let kib = m.saturating_mul(1024);
            if kib > max {
                return Err(Error::Unsupported {
                    op: "memory",
                    reason: format!(
                        "{name} can grow to {} MiB while it runs (its maximum); {m} MiB needs a redeploy",
                        max / 1024
                    ),
                });
            }
            dom.set_memory_flags(kib, flags as sys::virDomainMemoryModFlags).map_err(lv("set the memory of", name))?;
        }
        Ok(())
    }
}

/// A typed parameter array built with libvirt's helpers, freed on drop.
struct Params {
    ptr: sys::virTypedParameterPtr,
    n: i32,
    max: i32,
}

impl Default for Params {
    fn default() -> Self {
        Params { ptr: std::ptr::null_mut(), n: 0, max: 0 }
    }
}

impl Params {
    fn name(field: &str) -> CString {
        CString::new(field).expect("parameter names hold no NUL")
    }

    fn ullong(&mut self, field: &str, v: u64) -> Result<()> {
        let f = Self::name(field);
        // SAFETY: libvirt grows the array it owns; `f` outlives the call.
        let rc = unsafe { sys::virTypedParamsAddULLong(&mut self.ptr, &mut self.n, &mut self.max, f.as_ptr(), v) };
        self.check(rc, field)
    }

    fn llong(&mut self, field: &str, v: i64) -> Result<()> {
        let f = Self::name(field);
        // SAFETY: as above.
        let rc = unsafe { sys::virTypedParamsAddLLong(&mut self.ptr, &mut self.n, &mut self.max, f.as_ptr(), v) };
        self.check(rc, field)
    }

    fn check(&self, rc: i32, field: &str) -> Result<()> {
        if rc < 0 {
            return Err(lv("build the parameter", field)(virt::error::Error::last_error()));
        }
        Ok(())
    }
}

impl Drop for Params {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: the array and its count come from virTypedParamsAdd*.
            unsafe { sys::virTypedParamsFree(self.ptr, self.n) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_targets_of_xml() {
        let xml = "<domain><devices><disk type='file' device='disk'><source file='/a'/>\
                   <target dev='vda' bus='virtio'/></disk><filesystem><target dir='r'/></filesystem>\
                   <disk type=\"file\"><target dev=\"xvdb\"/></disk></devices></domain>";
        assert_eq!(disk_targets(xml), ["vda", "xvdb"]);
        assert!(disk_targets("<domain><filesystem><target dir='root'/></filesystem></domain>").is_empty());
    }

    #[test]
    fn usage_and_live_limits_on_the_test_driver() {
        let Ok(hv) = Libvirt::connect("test:///default") else {
            eprintln!("SKIPPED: libvirt's test driver cannot be opened here");
            return;
        };
        // The test driver's stock guest.
        let u = hv.usage("test").unwrap();
        assert!(u.active && u.memory_kib > 0, "{u:?}");
        assert!(matches!(hv.usage("no-such-guest"), Err(Error::NoSuchDomain { .. })));
        let max_mib = u.memory_kib / 1024;
        hv.set_live_limits("test", &LiveLimits { memory_mib: Some(max_mib / 2), ..Default::default() }).unwrap();
        assert_eq!(hv.usage("test").unwrap().memory_kib, max_mib / 2 * 1024);
        let e =
            hv.set_live_limits("test", &LiveLimits { memory_mib: Some(1 << 30), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("needs a redeploy"), "{e}");
    }
}
