//! Which accelerator QEMU guests get: KVM where it can run a stock kernel,
//! TCG otherwise. Decided from what the host shows, never assumed.
//!
//! `/dev/kvm` alone is not enough: under `kvm_pvm` (pagetable-based nested
//! KVM, as on this project's CI machines) it exists and opens, libvirt
//! reports KVM as available, yet stock kernels die with an emulation
//! failure. So a `kvm_pvm` without `kvm_intel`/`kvm_amd` means TCG.

use std::fmt;
use std::fs::OpenOptions;
use std::path::Path;

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The probe's answer and why, for logs and `xenod` diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelProbe {
    pub accel: Accel,
    pub reason: String,
}

/// Environment variable that overrides the probe: `kvm` or `tcg`.
pub const ACCEL_ENV: &str = "XENOD_ACCEL";

/// Probes this host (see the module docs); `XENOD_ACCEL` overrides.
pub fn probe_accel() -> AccelProbe {
    if let Ok(v) = std::env::var(ACCEL_ENV) {
        match v.as_str() {
            "kvm" => return AccelProbe { accel: Accel::Kvm, reason: format!("{ACCEL_ENV}=kvm") },
            "tcg" => return AccelProbe { accel: Accel::Tcg, reason: format!("{ACCEL_ENV}=tcg") },
            _ => tracing::warn!("ignoring {ACCEL_ENV}={v:?} (want kvm or tcg)"),
        }
    }
    probe_at(Path::new("/dev/kvm"), Path::new("/sys/module"))
}

fn probe_at(dev_kvm: &Path, sys_module: &Path) -> AccelProbe {
    let tcg = |reason: String| AccelProbe { accel: Accel::Tcg, reason };
    if !dev_kvm.exists() {
        return tcg(format!("{} does not exist", dev_kvm.display()));
    }
    if let Err(e) = OpenOptions::new().read(true).write(true).open(dev_kvm) {
        return tcg(format!("cannot open {}: {e}", dev_kvm.display()));
    }
    let loaded = |m: &str| sys_module.join(m).exists();
    let vendor = ["kvm_intel", "kvm_amd"].into_iter().find(|m| loaded(m));
    match (loaded("kvm_pvm"), vendor) {
        (true, None) => tcg("/dev/kvm is kvm_pvm, which runs only PVM-patched guest kernels".into()),
        (true, Some(v)) => tcg(format!("both kvm_pvm and {v} are loaded; cannot tell which owns /dev/kvm")),
        (false, Some(v)) => AccelProbe { accel: Accel::Kvm, reason: format!("/dev/kvm usable ({v})") },
        (false, None) => tcg("/dev/kvm has no kvm_intel or kvm_amd behind it".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_matrix() {
        let t = tempfile::tempdir().unwrap();
        let dev = t.path().join("kvm");
        let sys = t.path().join("module");
        std::fs::create_dir(&sys).unwrap();
        assert_eq!(probe_at(&dev, &sys).accel, Accel::Tcg, "no /dev/kvm");
        std::fs::write(&dev, b"").unwrap();
        assert_eq!(probe_at(&dev, &sys).accel, Accel::Tcg, "no vendor module");
        std::fs::create_dir(sys.join("kvm_intel")).unwrap();
        assert_eq!(probe_at(&dev, &sys).accel, Accel::Kvm);
        std::fs::create_dir(sys.join("kvm_pvm")).unwrap();
        assert_eq!(probe_at(&dev, &sys).accel, Accel::Tcg, "ambiguous");
        std::fs::remove_dir(sys.join("kvm_intel")).unwrap();
        let p = probe_at(&dev, &sys);
        assert_eq!(p.accel, Accel::Tcg);
        assert!(p.reason.contains("kvm_pvm"), "{}", p.reason);
    }
}
