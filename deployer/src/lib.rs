//! Deploy specs, the hypervisor traits and their libvirt backend.
//!
//! | module | what it holds |
//! |---|---|
//! | `spec` | [`DeploySpec`]: how to boot a guest, as carried in overlay metadata; [`SpecOverrides`] |
//! | `model` | [`DomainModel`]: a spec resolved against a mounted tree (paths checked, ports chosen) |
//! | `xml` | [`domain_xml`]: libvirt XML for each [`Target`] (xen, kvm, qemu, test) from one model |
//! | `probe` | [`probe_accel`]: KVM where it can run stock kernels, TCG otherwise |
//! | `hypervisor` | the [`Hypervisor`] trait: define/start/stop/save/restore/list by name |
//! | `live` | the [`LiveMigration`] trait: live save, migratable XML, a guest started ahead of its state ([`StagedGuest`]) |
//! | `libvirt` | [`Libvirt`]: both traits over libvirt, chosen by URI |
//! | `accounting` | [`Libvirt::usage`]: a guest's CPU, memory and disk counters; [`Libvirt::set_live_limits`] |
//! | `fake` | `fake::FakeHypervisor` (feature `fake`): both traits in memory, with failure injection, for tests of code above the deployer |
//! | `saveimage` | [`retarget`]: a save image restored under another domain name, UUID and paths; [`ram_record`]: where guest pages sit in it |
//! | `ready` | [`wait_console`], [`wait_http`]: bounded waits until a guest is of use |
//! | `error` | [`Error`]: one enum; messages say what to do |
//!
//! Flow: `DeploySpec` (+ overrides) -> [`DomainModel::from_spec`] with the
//! cowfs mountpoint -> [`Hypervisor::deploy`] -> [`wait_console`] and
//! [`wait_http`] -> the guest serves; its console is in
//! [`Hypervisor::console_log`].
//!
//! ```text
//! let hv = Libvirt::connect(&default_uri())?;             // xen, qemu (KVM or TCG), test
//! let mut spec = DeploySpec::from_json(&layer_meta)?;      // from the overlay
//! spec.apply(&overrides);                                  // from the command line
//! let model = DomainModel::from_spec(&spec, &mountpoint, run_dir.join("console.log"))?;
//! hv.deploy(&model)?;                                      // define + start, undone on failure
//! wait_console(&hv, &model.name, GUEST_READY_LINE, timeout)?;
//! wait_http(&hv, &model.name, model.network.forwards()[0].host, "/", timeout)?;
//! hv.save(&name, &state)? / hv.restore(&state)?            // xenod suspend / resume (disk root)
//! let xml = retarget_xml(&hv.migratable_xml(&name)?, ..)?; // LiveMigration: the guest for elsewhere
//! let mut q = there.stage_incoming(&xml)?;                 // its QEMU started there, waiting
//! hv.save_live(&name, &state, false)?;                     // saved while it runs, left paused
//! io::copy(&mut image, &mut q.state())?;                   // (a StagedGuest) the save image, streamed
//! there.finish_incoming(q)?;                               // loaded and running there
//! hv.stop(&name, grace)?; hv.destroy(&name)?;              // graceful then forced; undefine
//! ```
//!
//! Every call blocks (libvirt's API is synchronous): call it from
//! `tokio::task::spawn_blocking`. [`Libvirt`] is `Send + Sync` (and so is
//! `fake::FakeHypervisor`).

mod accounting;
mod error;
#[cfg(feature = "fake")]
pub mod fake;
mod hypervisor;
mod libvirt;
mod live;
mod model;
mod probe;
mod ready;
mod saveimage;
mod spec;
mod xml;

pub use accounting::{DomainUsage, LiveLimits};
pub use error::{DomainXmlFault, Error, Result, SaveImageFault};
pub use hypervisor::{DomainState, DomainStatus, Hypervisor, StopOutcome, wait_state};
pub use libvirt::{Incoming, Libvirt, URI_ENV, default_uri};
pub use live::{LiveMigration, StagedGuest};
pub use model::{
    BridgeNic, DomainMeta, DomainModel, Network, ROOT_TAG, Root, check_ports_free, move_host_ports, resolve_ports,
};
pub use probe::{ACCEL_ENV, Accel, AccelProbe, probe_accel};
pub use ready::{GUEST_READY_LINE, console_tail, http_get, wait_console, wait_http};
pub use saveimage::{
    GUEST_PAGE, MAX_RAM_RECORD, RamRecord, SAVE_HEADER, StreamOnly, head_len, head_xml, ram_record, random_uuid,
    retarget, retarget_xml, saved_xml,
};
pub use spec::{
    BootFile, DEFAULT_MEMORY_MIB, DEFAULT_VCPUS, DeploySpec, FsShare, Limits, MAX_NAME_LEN, PortForward, RootMode,
    SpecOverrides, validate_name,
};
pub use xml::{META_NS, Target, XenBoot, domain_xml, kernel_cmdline};
