//! Names and trust: `names`, `tag`, `name rm`, `key ...`.
//!
//! Records are signed and stored here, in the store the daemon shares; the
//! daemon announces them over gossip on its next round. Trust lives in
//! `config.toml`; a change is told to a running daemon at once (the
//! `reload` request), so it takes effect without a restart.

use std::fs;
use std::io::Write;

use clap::Subcommand;
use serde_json::{Value, json};
use xenod_host::client::{self, Quiet};
use xenod_host::config::{self, Config, record_name_in};
use xenod_host::{Context, Error, Exit, Request, Result, bail};
use xenod_store::{NameRecord, hex};

use crate::cli::Ctx;

#[derive(Debug, Subcommand)]
pub enum NameCmds {
    /// List the name records held (signed here or heard from peers), or,
    /// with --from, ask peers for theirs and keep what this host trusts.
    ///
    /// Without --from nothing is asked: each record shows its layer (or
    /// that the name was removed), its sequence and its signer. With
    /// --from, each peer's records are offered to this host's trust; the
    /// command exits 5 when records came and every one was refused.
    Names {
        /// A peer to ask, as NODE@IP:PORT (repeatable).
        #[arg(long = "from", value_name = "NODE@ADDR")]
        from: Vec<String>,
        /// Ask the configured and remembered peers.
        #[arg(long, conflicts_with = "from")]
        pull: bool,
    },
    /// Sign NAME for an existing layer with this host's publisher key.
    ///
    /// NAME (template://PUBLISHER/NAME/VERSION) then points at REF's layer,
    /// with the next sequence number; peers that trust this key for
    /// PUBLISHER take it from gossip.
    Tag { r#ref: String, name: String },
    /// Manage names: `name rm NAME` publishes a signed removal.
    #[command(subcommand)]
    Name(NameSub),
    /// The publisher key that signs names, and whose keys this host trusts.
    #[command(subcommand)]
    Key(KeyCmd),
}

#[derive(Debug, Subcommand)]
pub enum NameSub {
    /// Remove NAME: a signed removal with a higher sequence, which travels
    /// like any record, so an older record cannot bring the name back.
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Create this host's publisher key (DATA_DIR/keys/publisher.key).
    Generate {
        /// Replace an existing key.
        #[arg(long)]
        force: bool,
    },
    /// Print this host's public key.
    Show,
    /// Trust names signed by KEY (64 hex digits) for the publishers given.
    ///
    /// A key is trusted for named publishers only, so it cannot take over
    /// anyone else's names: `--for debian` (template://debian/...),
    /// `--for acme/web` (below it), `--for 'acme-*'` (publishers starting
    /// with acme-), `--for '*'` (every publisher, knowingly). A running
    /// daemon takes the change at once, and accepts the records it refused
    /// earlier under this key.
    Trust {
        key: String,
        /// A publisher pattern KEY may sign for (repeatable).
        #[arg(long = "for", value_name = "PUBLISHER")]
        publishers: Vec<String>,
    },
    /// Stop trusting KEY (for the publishers given, or for all).
    Untrust {
        key: String,
        #[arg(long = "for", value_name = "PUBLISHER")]
        publishers: Vec<String>,
    },
    /// The keys this host trusts and for which publishers.
    Ls,
    /// Replace this host's publisher key with a new one.
    ///
    /// The old key signs a succession naming the new one; hosts that trust
    /// the old key for some publishers then trust the new one for the same,
    /// once the succession reaches them over gossip. The old secret stays
    /// in DATA_DIR/keys/publisher.key.old-<8 hex digits>.
    Rotate,
}

pub fn run(ctx: &Ctx, cmd: NameCmds) -> Result<()> {
    match cmd {
        NameCmds::Names { from, pull } if from.is_empty() && !pull => list(ctx),
        NameCmds::Names { from, .. } => pull_names(ctx, from),
        NameCmds::Tag { r#ref, name } => {
            xenod_store::check_name(&name)?;
            let store = ctx.store()?;
            let id = store.resolve(&r#ref)?;
            if !store.contains(&id)? {
                return Err(Error::coded(Exit::NotFound, format!("layer {id} ({ref}) is not in this store")));
            }
            let seq = record_name_in(&ctx.data_dir, &store, &name, Some(id))?;
            ctx.out(json!({ "name": name, "id": id.to_string(), "seq": seq }), || {
                format!("{name} -> {id} (sequence {seq})")
            })
        }
        NameCmds::Name(NameSub::Rm { name }) => {
            let store = ctx.store()?;
            let seq = record_name_in(&ctx.data_dir, &store, &name, None)?;
            ctx.out(json!({ "name": name, "removed": true, "seq": seq }), || format!("{name} removed (sequence {seq})"))
        }
        NameCmds::Key(k) => key(ctx, k),
    }
}

fn record_json(r: &NameRecord, own: Option<&[u8; 32]>) -> Value {
    json!({ "name": r.name, "id": (!r.removed).then(|| r.id.to_string()), "removed": r.removed,
            "seq": r.seq, "key": hex(&r.key), "own": own == Some(&r.key) })
}

/// The records held, with signer and sequence.
fn list(ctx: &Ctx) -> Result<()> {
    let store = ctx.store()?;
    let mut names = store.names()?;
    names.sort_by(|a, b| a.name.cmp(&b.name));
    let own = config::load_key(&ctx.data_dir)?.map(|k| k.verifying_key().to_bytes());
    let j = json!({ "names": names.iter().map(|r| record_json(r, own.as_ref())).collect::<Vec<_>>() });
    ctx.out(j, || {
        names
            .iter()
            .map(|r| {
                let target = if r.removed { "removed".to_string() } else { r.id.to_string() };
                let signer = if own.as_ref() == Some(&r.key) { "this host".to_string() } else { hex(&r.key) };
                format!("{}  {target}  seq {}  signed by {signer}", r.name, r.seq)
            })
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// Asks peers for their records; exit 5 when every record that came was refused.
fn pull_names(ctx: &Ctx, from: Vec<String>) -> Result<()> {
    let v = client::request(&ctx.data_dir, Request::Names { from }, &ctx.watcher("asking for names"))?;
    let peers = v["peers"].as_array().cloned().unwrap_or_default();
    let count = |k: &str| peers.iter().map(|p| p[k].as_array().map_or(0, Vec::len)).sum::<usize>();
    let (accepted, refused) = (count("accepted"), count("refused"));
    let unchanged: u64 = peers.iter().filter_map(|p| p["unchanged"].as_u64()).sum();
    ctx.out(v.clone(), || {
        let mut s = String::new();
        for p in &peers {
            s += &format!("{}:\n", p["peer"].as_str().unwrap_or(""));
            if let Some(e) = p["error"].as_str() {
                s += &format!("  error: {e}\n");
            }
            for n in p["accepted"].as_array().into_iter().flatten() {
                s += &format!("  accepted {}\n", n.as_str().unwrap_or(""));
            }
            for r in p["refused"].as_array().into_iter().flatten() {
                s += &format!("  refused {}: {}\n", r[0].as_str().unwrap_or(""), r[1].as_str().unwrap_or(""));
            }
        }
        s.trim_end().to_string()
    })?;
    if refused > 0 && accepted == 0 && unchanged == 0 {
        return Err(Error::coded(Exit::NameRefused, format!("every name record offered ({refused}) was refused")));
    }
    Ok(())
}

/// Tells a running daemon to read its trust again; what it says, or `None`.
fn reload(ctx: &Ctx) -> Result<Option<Value>> {
    if !client::daemon_runs(&ctx.data_dir) {
        return Ok(None);
    }
    client::request_daemon(&ctx.data_dir, Request::Reload, &Quiet).map(Some)
}

/// What a trust change came to, for people.
fn reload_text(r: &Option<Value>) -> String {
    match r {
        None => "no daemon runs here; the change takes effect when one starts".into(),
        Some(v) => {
            let acc: Vec<&str> = v["accepted"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            if acc.is_empty() {
                "the running daemon took the change".into()
            } else {
                format!("the running daemon took the change and accepted {}", acc.join(", "))
            }
        }
    }
}

fn key(ctx: &Ctx, k: KeyCmd) -> Result<()> {
    let data = &ctx.data_dir;
    match k {
        KeyCmd::Generate { force } => {
            let key = config::generate_key(data, force)?;
            let public = hex(key.verifying_key().as_bytes());
            ctx.out(json!({ "public_key": public, "path": config::key_path(data) }), || public.clone())
        }
        KeyCmd::Show => {
            let Some(key) = config::load_key(data)? else {
                bail!("no publisher key in {}; run `xenod key generate`", config::key_path(data).display());
            };
            let public = hex(key.verifying_key().as_bytes());
            ctx.out(json!({ "public_key": public }), || public.clone())
        }
        KeyCmd::Trust { key, publishers } => {
            let vk = config::parse_key(&key)?;
            if publishers.is_empty() {
                return Err(Error::coded(
                    Exit::Usage,
                    format!(
                        "a key is trusted for named publishers only: trusted for all it could take over any \
                         name, this host's own included. Say which: xenod key trust {key} --for PUBLISHER \
                         (or --for '*' to trust it for every publisher, knowingly)"
                    ),
                ));
            }
            fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
            let mut cfg = Config::load(data)?;
            cfg.add_trust(&vk, &publishers)?;
            cfg.save(data)?;
            let r = reload(ctx)?;
            let key = hex(vk.as_bytes());
            ctx.out(json!({ "trusted": key, "publishers": publishers, "daemon": r }), || {
                format!("trusting {key} for {}\n{}", publishers.join(", "), reload_text(&r))
            })
        }
        KeyCmd::Untrust { key, publishers } => {
            let vk = config::parse_key(&key)?;
            let mut cfg = Config::load(data)?;
            if !cfg.remove_trust(&vk, &publishers) {
                return Err(Error::coded(Exit::NotFound, format!("{key} is not trusted for that here")));
            }
            cfg.save(data)?;
            let r = reload(ctx)?;
            let key = hex(vk.as_bytes());
            ctx.out(json!({ "untrusted": key, "publishers": publishers, "daemon": r }), || {
                format!("no longer trusting {key}{}\n{}", for_list(&publishers), reload_text(&r))
            })
        }
        KeyCmd::Ls => {
            let cfg = Config::load(data)?;
            let own = config::load_key(data)?.map(|k| hex(k.verifying_key().as_bytes()));
            ctx.out(json!({ "own": own, "trust": cfg.trust }), || {
                let mut s = own.map(|k| format!("{k}  * (this host's key)\n")).unwrap_or_default();
                for e in &cfg.trust {
                    s += &format!("{}  {}\n", e.key, e.publishers.join(", "));
                }
                s.trim_end().to_string()
            })
        }
        KeyCmd::Rotate => {
            let store = ctx.store()?;
            let (old, new) = config::rotate_key(data, &store)?;
            let (old, new) = (hex(old.as_bytes()), hex(new.as_bytes()));
            let mut o = std::io::stderr().lock();
            if !ctx.json {
                writeln!(o, "key {old} names its successor; hosts that trust it now trust the new key too")?;
            }
            ctx.out(json!({ "old": old, "public_key": new }), || new.clone())
        }
    }
}

fn for_list(p: &[String]) -> String {
    if p.is_empty() { String::new() } else { format!(" for {}", p.join(", ")) }
}
