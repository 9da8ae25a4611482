//! `xenod usage` (what instances used, from the daemon's ledger) and
//! `xenod limit` (an instance's limits changed while it runs).

use clap::Subcommand;
use serde_json::Value;
use xenod_host::client;
use xenod_host::instance::limit::LimitChange;
use xenod_host::usage::parse_since;
use xenod_host::{Error, Exit, Request, Result};

use crate::cli::{Ctx, human};

#[derive(Debug, Subcommand)]
pub enum UsageCmd {
    /// What instances used: CPU time, memory, disk and network bytes, and
    /// the upper layer's size, per instance, per owner and in total.
    ///
    /// The daemon samples every instance every 10 s (`usage_interval_secs`)
    /// into its ledger (DATA_DIR/usage.redb: minutes for 48 h, hours for
    /// 400 days) and once more before it answers. Sources: libvirt for CPU
    /// time, memory and a disk root's bytes; the instance's filesystem for
    /// a tree root's bytes read and written; the kernel's counters of the
    /// forwarded ports for network bytes (nftables); the upper directory's
    /// blocks for its size. The owner is the key that deployed the
    /// instance (`key:HEX`, or `node:ID` of the host that asked). A
    /// migrated instance's records go with it. Destroyed instances stay
    /// listed while their hours are kept.
    Usage {
        /// Only this instance.
        name: Option<String>,
        /// From this time on: a duration back (90s, 15m, 6h, 7d), unix
        /// seconds, or a UTC date YYYY-MM-DD[THH:MM[:SS]]. Counted from the
        /// start of its minute (within 48 h) or hour.
        #[arg(long, value_name = "T")]
        since: Option<String>,
    },
    /// Change a running instance's limits (and its record, for later
    /// starts): what libvirt can change live is changed live.
    ///
    /// CPU quota and shares apply at once; disk bytes and IOPS at once on
    /// a disk root (a tree root has no disk); memory at once through the
    /// balloon, up to the guest's maximum, admitted like a deploy; the
    /// upper quota at the instance's next start (stop and start it). 0
    /// removes a cap.
    Limit {
        /// The instance.
        name: String,
        /// Hard CPU cap, percent of one CPU for the whole guest (0: none).
        #[arg(long, value_name = "PCT")]
        cpu_quota: Option<u32>,
        /// CPU weight against other guests (default 1024).
        #[arg(long, value_name = "N")]
        cpu_shares: Option<u32>,
        /// Disk bytes a second, read and write together (0: none).
        #[arg(long, value_name = "BYTES")]
        disk_bps: Option<u64>,
        /// Disk I/O operations a second (0: none).
        #[arg(long, value_name = "N")]
        disk_iops: Option<u64>,
        /// Network KiB a second (refused on user-mode networking).
        #[arg(long, value_name = "KIB")]
        net_kibps: Option<u64>,
        /// The guest's memory, MiB, up to its maximum.
        #[arg(long, value_name = "MIB")]
        memory: Option<u32>,
        /// MiB the upper layer may hold (0: none), from the next start.
        #[arg(long, value_name = "MIB")]
        upper_quota: Option<u64>,
    },
}

pub(crate) fn run(ctx: &Ctx, c: UsageCmd) -> Result<()> {
    match c {
        UsageCmd::Usage { name, since } => {
            let now = xenod_host::usage::now();
            let since = since.map(|s| parse_since(&s, now)).transpose().map_err(|e| Error::coded(Exit::Usage, e))?;
            let v = client::request(&ctx.data_dir, Request::Usage { name, since }, &ctx.watcher("usage"))?;
            ctx.out(v.clone(), || usage_text(&v))
        }
        UsageCmd::Limit { name, cpu_quota, cpu_shares, disk_bps, disk_iops, net_kibps, memory, upper_quota } => {
            let change = LimitChange {
                cpu_quota_pct: cpu_quota,
                cpu_shares,
                disk_bytes_sec: disk_bps,
                disk_iops_sec: disk_iops,
                net_kib_sec: net_kibps,
                memory_mib: memory,
                upper_bytes: upper_quota.map(|m| m << 20),
            };
            let v = xenod_host::instance::Instances::open(&ctx.data_dir)?.limit(&name, &change)?;
            ctx.out(v.clone(), || {
                let mut s = format!("{name}: limits now {}", v["limits"]);
                if let Some(p) = v["at_next_start"].as_array().filter(|p| !p.is_empty()) {
                    s += &format!(
                        " ({} from the next start)",
                        p.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")
                    );
                }
                s
            })
        }
    }
}

fn row(label: &str, owner: &str, u: &Value) -> String {
    let n = |k: &str| u[k].as_u64().unwrap_or(0);
    let f = |k: &str| u[k].as_f64().unwrap_or(0.0);
    format!(
        "{label:<20} {owner:<14} {:>9.1} {:>10.2} {:>9} {:>10} {:>10} {:>10} {:>10}",
        n("cpu_ns") as f64 / 1e9,
        f("memory_mib_seconds") / 3600.0,
        human(n("upper_bytes")),
        human(n("disk_read")),
        human(n("disk_written")),
        human(n("net_in")),
        human(n("net_out")),
    )
}

fn short(owner: &str) -> String {
    owner.chars().take(14).collect()
}

fn usage_text(v: &Value) -> String {
    let mut s = format!(
        "{:<20} {:<14} {:>9} {:>10} {:>9} {:>10} {:>10} {:>10} {:>10}",
        "INSTANCE", "OWNER", "CPU-S", "MEM-MIB-H", "UPPER", "DISK-READ", "DISK-WRITE", "NET-IN", "NET-OUT"
    );
    for i in v["instances"].as_array().into_iter().flatten() {
        let name = i["instance"].as_str().unwrap_or("");
        let label = if i["here"] == true { name.to_owned() } else { format!("{name} (gone)") };
        s += &format!("\n{}", row(&label, &short(i["owner"].as_str().unwrap_or("")), &i["usage"]));
    }
    s += "\n";
    for o in v["owners"].as_array().into_iter().flatten() {
        let label = format!("owner ({} inst.)", o["instances"]);
        s += &format!("\n{}", row(&label, &short(o["owner"].as_str().unwrap_or("")), &o["usage"]));
    }
    s += &format!("\n{}", row("TOTAL", "", &v["total"]));
    s += &format!("\nsince {} ({} buckets)", v["since"], v["granularity"].as_str().unwrap_or(""));
    for n in v["notes"].as_array().into_iter().flatten() {
        s += &format!("\nnote: {}", n.as_str().unwrap_or(""));
    }
    s
}
