//! Federation subcommands: `services`, `events`, and `deploy --place`'s
//! request and report. Each is a client of this host's daemon, which
//! knows the other hosts from their advertisements.

use std::io::Write;

use clap::Subcommand;
use serde_json::Value;
use xenod_host::client::{self, Watch};
use xenod_host::{Request, Result};

use crate::cli::{Ctx, DeployArgs};

#[derive(Debug, Subcommand)]
pub enum FedCmd {
    /// The instances of a service (or of every service) across the
    /// federation: host, state and endpoints.
    ///
    /// Each host advertises the services of its running (or paused)
    /// instances every few seconds: a stopped or destroyed instance is gone
    /// at the next advertisement, a migrated one moves to its new host. The
    /// service's name is the deploy spec's `service`, else the instance's.
    Services {
        /// Only this service's instances.
        name: Option<String>,
    },
    /// What happens across the federation: hosts joining and leaving,
    /// layers complete, names published and removed, instances deployed,
    /// started, stopped, migrated and destroyed, bad chunks refused.
    ///
    /// Prints the events this host's daemon keeps (the last 4096), oldest
    /// first; with --follow, then each one as it comes, until interrupted.
    /// Events of one host arrive in the order it published them. With
    /// --json, one JSON object per line (the local API's `events` stream
    /// gives programs the same).
    Events {
        /// Keep printing events as they come.
        #[arg(long, short)]
        follow: bool,
        /// Only events of this type (repeatable): host_joined, host_left,
        /// layer_complete, name_published, name_removed, instance_deployed,
        /// instance_started, instance_stopped, instance_migrated,
        /// instance_destroyed, bad_chunk, or a group (host, layer, name,
        /// instance, bad).
        #[arg(long = "type", value_name = "T")]
        types: Vec<String>,
        /// Only events of hosts whose node id starts with this.
        #[arg(long, value_name = "NODE")]
        host: Option<String>,
    },
}

pub fn run(ctx: &Ctx, cmd: FedCmd) -> Result<()> {
    match cmd {
        FedCmd::Services { name } => {
            let v = client::request_daemon(&ctx.data_dir, Request::Services { name }, &ctx.watcher("services"))?;
            ctx.out(v.clone(), || services_text(&v))
        }
        FedCmd::Events { follow, types, host } => {
            let printer = EventPrinter { json: ctx.json };
            client::request_daemon(&ctx.data_dir, Request::Events { follow, types, host }, &printer)?;
            Ok(())
        }
    }
}

fn services_text(v: &Value) -> String {
    let mut s = format!("{:<16} {:<20} {:<12} {:<10} ENDPOINTS", "SERVICE", "INSTANCE", "HOST", "STATE");
    for i in v["instances"].as_array().into_iter().flatten() {
        let host = short(&i["host"]);
        let eps: Vec<&str> = i["endpoints"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        s += &format!(
            "\n{:<16} {:<20} {:<12} {:<10} {}",
            i["service"].as_str().unwrap_or(""),
            i["instance"].as_str().unwrap_or(""),
            if i["this_host"] == true { format!("{host}*") } else { host.to_owned() },
            i["state"].as_str().unwrap_or(""),
            eps.join(" ")
        );
    }
    s
}

/// A node id's first 10 characters.
fn short(v: &Value) -> &str {
    let s = v.as_str().unwrap_or("");
    s.get(..10).unwrap_or(s)
}

/// Prints each event as it arrives: a JSON line, or a line for people.
struct EventPrinter {
    json: bool,
}

impl Watch for EventPrinter {
    fn note(&self, msg: &str) {
        eprintln!("xenod: {msg}");
    }

    fn progress(&self, _: &Value) {}

    fn event(&self, e: &Value) {
        let mut o = std::io::stdout().lock();
        let line = if self.json {
            e.to_string()
        } else {
            let secs = e["at"].as_u64().unwrap_or(0) / 1_000_000;
            let (h, m, s) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
            let fields: Vec<String> = e
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| !matches!(k.as_str(), "host" | "seq" | "at" | "type"))
                .map(|(k, v)| format!("{k}={}", v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
                .collect();
            format!(
                "{h:02}:{m:02}:{s:02} {} {} {}",
                short(&e["host"]),
                e["type"].as_str().unwrap_or(""),
                fields.join(" ")
            )
        };
        // A reader that went away (`| head`) ends nothing here; the daemon
        // notices the closed socket.
        let _ = writeln!(o, "{line}");
        let _ = o.flush();
    }
}

/// `deploy --place`: the daemon places and deploys; prints the choice and
/// why (each candidate's score, the filter that removed each other host),
/// then each instance's line.
pub fn deploy_placed(ctx: &Ctx, a: &DeployArgs, options: xenod_host::instance::DeployOptions) -> Result<()> {
    let req = Request::Deploy {
        target: a.url.clone(),
        place: a.place.clone().unwrap_or_else(|| "auto".into()),
        replicas: a.replicas,
        spread: a.spread.clone(),
        pack: a.pack,
        dry_run: a.dry_run,
        options: Box::new(options),
    };
    let v = client::request_daemon(&ctx.data_dir, req, &ctx.watcher("deploying"))?;
    ctx.out(v.clone(), || placement_text(&v))
}

fn placement_text(v: &Value) -> String {
    let p = &v["placement"];
    let ranked = p["ranked"].as_array().cloned().unwrap_or_default();
    let chosen: Vec<usize> =
        p["chosen"].as_array().into_iter().flatten().filter_map(|c| c.as_u64()).map(|c| c as usize).collect();
    let mut s = String::from("placement (score = locality x1 + capacity x0.1 + spread x4):");
    for (i, h) in ranked.iter().enumerate() {
        let mark = if chosen.contains(&i) { format!("chosen x{}", h["replicas"]) } else { "candidate".into() };
        let spread = h["spread"].as_f64().map(|x| format!(" spread {x:.2}")).unwrap_or_default();
        s += &format!(
            "\n  {}{} {mark}: score {:.3}, lacks {:.1} MiB (locality {:.2}), capacity {:.2}{spread}",
            short(&h["node"]),
            if h["this_host"] == true { " (this host)" } else { "" },
            h["score"].as_f64().unwrap_or(0.0),
            h["missing_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
            h["locality"].as_f64().unwrap_or(0.0),
            h["capacity"].as_f64().unwrap_or(0.0),
        );
    }
    for r in p["removed"].as_array().into_iter().flatten() {
        s += &format!(
            "\n  {} removed by {}: {}",
            short(&r["node"]),
            r["filter"].as_str().unwrap_or(""),
            r["why"].as_str().unwrap_or("")
        );
    }
    for f in v["failed"].as_array().into_iter().flatten() {
        s += &format!("\n  {} failed: {}", short(&f["node"]), f["error"].as_str().unwrap_or(""));
    }
    for i in v["instances"].as_array().into_iter().flatten() {
        let inst = &i["instance"];
        let fetched =
            inst["fetch"]["bytes"].as_u64().map(|b| format!(", fetched {:.1} MiB", b as f64 / (1 << 20) as f64));
        s += &format!(
            "\n{} running on {}{}, port {}",
            inst["name"].as_str().unwrap_or("?"),
            short(&i["host"]),
            fetched.unwrap_or_default(),
            inst["port"]
        );
    }
    s
}
