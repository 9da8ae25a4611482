//! `xenod limit NAME ...`: an instance's limits changed while it runs,
//! where libvirt can change them (`xenod_deployer::Libvirt::set_live_limits`),
//! and recorded in its `instance.json` so they hold across stop and start.
//!
//! | limit | live | how |
//! |---|---|---|
//! | CPU quota, shares | yes | `<cputune>` through the scheduler parameters |
//! | disk bytes/s, IOPS | disk roots | `<iotune>` (a tree root has no disk) |
//! | memory | up to the guest's maximum | the balloon |
//! | upper quota | at the next mount | cowfs counts the upper when it mounts |
//! | network | no | user-mode networking has no host interface to shape |
//!
//! A value of 0 removes a cap (quota, disk, upper). Memory and CPU changes
//! are admitted like a deploy: more than this host has free is refused.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use xenod_deployer::{LiveLimits, RootMode};
use xenod_store::Exit;

use super::{Instances, hypervisor};
use crate::admission::Ask;
use crate::error::{Error, Result};

/// The limits to change; `None` leaves one as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitChange {
    pub cpu_quota_pct: Option<u32>,
    pub cpu_shares: Option<u32>,
    pub disk_bytes_sec: Option<u64>,
    pub disk_iops_sec: Option<u64>,
    pub net_kib_sec: Option<u64>,
    pub memory_mib: Option<u32>,
    pub upper_bytes: Option<u64>,
}

impl LimitChange {
    pub fn is_empty(&self) -> bool {
        *self == LimitChange::default()
    }
}

impl Instances {
    /// Changes `name`'s limits; returns what now holds and what waits for
    /// the next start.
    pub fn limit(&self, name: &str, c: &LimitChange) -> Result<Value> {
        let bad = |m: String| Error::coded(Exit::BadInput, m);
        if c.is_empty() {
            return Err(bad("no limit given: see `xenod limit --help`".into()));
        }
        let mut inst = self.load(name).map_err(|e| Error::coded(Exit::NotFound, e.chain()))?;
        let mut spec = inst.spec.clone().ok_or_else(|| bad(format!("{name} has no recorded spec to change")))?;
        if c.net_kib_sec.is_some() {
            return Err(bad(format!(
                "{name} is on user-mode networking, which has no host interface to shape; its bandwidth cannot be limited"
            )));
        }
        if spec.root == RootMode::Fs && (c.disk_bytes_sec.is_some() || c.disk_iops_sec.is_some()) {
            return Err(bad(format!(
                "{name} has a shared-filesystem root: it has no disk to throttle (--upper-quota bounds what it writes)"
            )));
        }
        // The new limits, as they will be recorded, checked like a deploy's.
        let mut next = spec.limits.clone();
        let opt = |v: Option<u64>, cur: Option<u64>| match v {
            Some(0) => None,
            Some(n) => Some(n),
            None => cur,
        };
        next.cpu_quota_pct = opt(c.cpu_quota_pct.map(u64::from), next.cpu_quota_pct.map(u64::from)).map(|v| v as u32);
        next.cpu_shares = c.cpu_shares.or(next.cpu_shares);
        next.disk_bytes_sec = opt(c.disk_bytes_sec, next.disk_bytes_sec);
        next.disk_iops_sec = opt(c.disk_iops_sec, next.disk_iops_sec);
        next.upper_bytes = opt(c.upper_bytes, next.upper_bytes);
        next.validate(spec.vcpus).map_err(|e| bad(e.to_string()))?;
        if let Some(q) = c.upper_bytes.filter(|q| *q > 0) {
            let used = crate::usage::upper_bytes(&inst.upper(&self.data));
            if q < used {
                return Err(bad(format!(
                    "an upper quota of {q} bytes is less than {name}'s upper already holds ({used} bytes)"
                )));
            }
        }
        if let Some(m) = c.memory_mib {
            if m == 0 {
                return Err(bad("memory 0 would stop the guest".into()));
            }
            let grow = m.saturating_sub(spec.memory_mib);
            if grow > 0 {
                let ask = Ask { mem: u64::from(grow) << 20, ..Default::default() };
                self.admit(name, &ask, None)?;
            }
        }
        let hv = hypervisor(&inst.uri)?;
        let live = LiveLimits {
            cpu_quota_pct: c.cpu_quota_pct,
            cpu_shares: c.cpu_shares,
            disk_bytes_sec: c.disk_bytes_sec,
            disk_iops_sec: c.disk_iops_sec,
            memory_mib: c.memory_mib.map(u64::from),
        };
        if live != LiveLimits::default() {
            hv.set_live_limits(inst.domain(), &live)?;
        }
        spec.limits = next;
        if let Some(m) = c.memory_mib {
            spec.memory_mib = m;
        }
        inst.spec = Some(spec.clone());
        inst.save(&self.data)?;
        let pending: Vec<&str> = if c.upper_bytes.is_some() { vec!["upper_bytes"] } else { vec![] };
        Ok(json!({
            "instance": name,
            "limits": spec.limits,
            "memory_mib": spec.memory_mib,
            "at_next_start": pending,
        }))
    }
}
