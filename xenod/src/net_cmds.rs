//! `xenod net`: environments, private networks that span hosts (see
//! `xenod_host::net`). Each is a client of this host's daemon.

use clap::Subcommand;
use serde_json::Value;
use xenod_host::Result;
use xenod_host::net::{NetRequest, request};

use crate::cli::Ctx;

#[derive(Debug, Subcommand)]
pub enum NetCmd {
    /// Create an environment: a private network for guests on any host of
    /// the federation (`xenod deploy REF --net ENV`), isolated from other
    /// environments and from the hosts.
    ///
    /// The record is signed by this host's node key and spread over
    /// gossip: every host learns its subnet and VXLAN id (derived from the
    /// name, another if taken). Only this host can remove it.
    Create {
        /// Its name: a-z, 0-9 and -, at most 32.
        env: String,
        /// IPv4 subnet its guests' addresses come from [default: a /24 in
        /// 10/8 derived from its name].
        #[arg(long, value_name = "CIDR")]
        subnet: Option<String>,
    },
    /// The environments this host knows: subnet, VXLAN id, the hosts with
    /// a segment of it and the addresses their guests hold.
    Ls,
    /// Remove an environment (created on this host, and with no guest on
    /// it on any host); every host removes its devices of it.
    Rm { env: String },
}

pub fn run(ctx: &Ctx, cmd: NetCmd) -> Result<()> {
    let data = &ctx.data_dir;
    match cmd {
        NetCmd::Create { env, subnet } => {
            let v = request(data, NetRequest::Create { env, subnet })?;
            ctx.out(v.clone(), || {
                format!(
                    "{}: subnet {}, VNI {}",
                    v["name"].as_str().unwrap_or(""),
                    v["subnet"].as_str().unwrap_or(""),
                    v["vni"]
                )
            })
        }
        NetCmd::Ls => {
            let v = request(data, NetRequest::Ls)?;
            ctx.out(v.clone(), || ls_text(&v))
        }
        NetCmd::Rm { env } => {
            let v = request(data, NetRequest::Rm { env: env.clone() })?;
            ctx.out(v, || format!("{env} removed"))
        }
    }
}

fn ls_text(v: &Value) -> String {
    let short = |v: &Value| v.as_str().unwrap_or("").chars().take(10).collect::<String>();
    let mut s = format!("{:<16} {:<18} {:<9} {:<6} ADDRESSES", "ENV", "SUBNET", "VNI", "HOSTS");
    for e in v["envs"].as_array().into_iter().flatten() {
        let addrs: Vec<String> = e["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                format!(
                    "{}={}@{}",
                    a["instance"].as_str().unwrap_or(""),
                    a["ip"].as_str().unwrap_or(""),
                    short(&a["host"])
                )
            })
            .collect();
        s += &format!(
            "\n{:<16} {:<18} {:<9} {:<6} {}",
            e["name"].as_str().unwrap_or(""),
            e["subnet"].as_str().unwrap_or(""),
            e["vni"],
            e["hosts"].as_array().map_or(0, Vec::len),
            addrs.join(" ")
        );
        for c in e["conflicts"].as_array().into_iter().flatten() {
            s += &format!("\n  conflict: {} also claimed by {} on {}", c["ip"], c["instance"], short(&c["host"]));
        }
    }
    s
}
