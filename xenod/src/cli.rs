//! Subcommands and their output.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, Subcommand};
use serde_json::json;
use xenod_store::{
    Entry, ImportOptions, LayerId, LayerWriter, Merged, Store, diff, export_dir, export_tar_with, hex, import_dir,
    import_image, import_tar,
};

use xenod_deployer::{PortForward, RootMode};
use xenod_host::config::{self, Config, record_name_in};
use xenod_host::instance::{self, mount};
use xenod_host::{Context, Error, Exit, Request, Result, bail, client};

use crate::progress::{self, Watcher};

const REFERENCES: &str = "\
References (REF): template://PUBLISHER/NAME[/VERSION] (a signed name),
NAME@ID (that exact layer), a 64-digit layer id, or a unique id prefix of 8+ digits.
`deploy` and `mount` also take a ticket (xenod1..., from `xenod share`): the
stack is fetched from the ticket's providers first.";

/// What `--help` shows after the options: the exit codes (from the one
/// table, [`Exit`]) and the forms of a reference.
pub fn after_help() -> String {
    let mut s = String::from("Exit codes:\n");
    for e in Exit::ALL {
        s += &format!("  {}  {}\n", e.code(), e.meaning());
    }
    s + "\n" + REFERENCES
}

/// Content-addressed VM templates and overlays, moved peer to peer and booted as guests.
///
/// Maintainers publish immutable templates; a service is an overlay on one.
/// The store keeps them as verified chunks (publish, overlay, export, verify,
/// gc); `mount` shows any stack through a copy-on-write union (FUSE);
/// `deploy` boots a guest from a stack through libvirt and `ps`, `stop`,
/// `suspend`, `checkpoint`, `migrate` manage it; `serve` runs this host's
/// daemon, which shares layers with peers (`share`, `fetch`, `replicate`)
/// and moves running guests between hosts, sending only what differs.
#[derive(Debug, Parser)]
#[command(name = "xenod", version)]
pub struct Args {
    /// Data directory holding the store, keys and config
    /// [default: /var/lib/xenod as root, else ~/.local/share/xenod]
    #[arg(long, global = true, env = "XENOD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print one JSON object on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Show progress on stderr even when it is not a terminal (one line a
    /// second), or with --json.
    #[arg(long, global = true, env = "XENOD_PROGRESS", value_parser = clap::builder::BoolishValueParser::new())]
    pub progress: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Import a directory, a tar archive (`-` for stdin) or a raw disk image as a layer.
    ///
    /// Files are cut into content-defined chunks; disk images (with --image,
    /// a raw image file as SRC, files named *.img/*.raw/*.qcow2, files of
    /// 1 GiB or more, and sparse files) into fixed 64 KiB blocks. Only chunks
    /// the store lacks are written. Without --name the layer is pinned by id.
    /// A tar archive may be zstd-compressed; other compressions, an empty
    /// stream and a file that is no tar archive are refused (a disk image
    /// needs --image unless named *.img, *.raw or *.qcow2). Prints the
    /// layer id on stdout, the summary on stderr.
    Publish {
        /// Directory, tar archive, `-` (tar on stdin) or disk image.
        src: String,
        /// Sign and record a name for the layer (template://publisher/name/version).
        #[arg(long)]
        name: Option<String>,
        /// Treat SRC (or every file in it) as a disk image.
        #[arg(long)]
        image: bool,
        /// A deploy spec (JSON) to carry in the layer's metadata.
        #[arg(long)]
        spec: Option<PathBuf>,
        #[command(flatten)]
        level: Level,
    },
    /// Overlays: layers that record only what differs from a base.
    #[command(subcommand)]
    Overlay(OverlayCmd),
    /// Materialise a layer with everything below it, to a new directory or
    /// as a tar stream on stdout (DEST `-`).
    ///
    /// Layers that `.mount` files name are placed on their directories, as
    /// `mount` shows them.
    Export {
        r#ref: String,
        dest: String,
        /// Only this layer, not the stack below it; whiteouts appear as
        /// overlayfs does (0/0 character devices).
        #[arg(long)]
        layer_only: bool,
        /// The stack alone: do not follow `.mount` files.
        #[arg(long)]
        no_mounts: bool,
    },
    /// List names, pins and layers.
    Ls,
    /// Resolve a reference to a layer id.
    Resolve { r#ref: String },
    /// Rehash every chunk and check every layer's references.
    Verify {
        /// Fetch every damaged or missing chunk anew from peers and rewrite
        /// damaged packs without their bad records.
        #[arg(long)]
        repair: bool,
        /// With --repair: a provider to ask, NODE@ADDR or a ticket (repeatable)
        /// [default: peers that announced the layers, configured and known peers].
        #[arg(long = "from", value_name = "PEER", requires = "repair")]
        from: Vec<String>,
    },
    /// Remove every chunk that no named or pinned layer needs (nor a
    /// `.mount` file in one).
    Gc {
        /// List what would be removed, and how many bytes, without removing it.
        #[arg(long)]
        dry_run: bool,
    },
    /// Keep a layer (and its stack) from gc.
    Pin {
        r#ref: String,
        /// Label for the pin [default: the layer id].
        #[arg(long)]
        label: Option<String>,
    },
    /// Remove a pin by label.
    Unpin { label: String },
    /// Deploy a guest from a layer: resolve, mount its stack with a private
    /// upper, define and start it through libvirt, wait until it answers.
    Deploy(DeployArgs),
    /// List instances and their state.
    Ps,
    /// Shut an instance's guest down (gracefully, then forced); its upper is kept.
    Stop { name: String },
    /// Start a stopped instance again.
    Start { name: String },
    /// Remove an instance: its guest, its mount and (unless --keep) its upper layer.
    Destroy {
        name: String,
        /// Keep the instance's upper directory.
        #[arg(long)]
        keep: bool,
    },
    /// Print an instance's serial console.
    Logs { name: String },
    /// Save a disk-root guest's running state to a file and stop it.
    Suspend { name: String },
    /// Restore a suspended guest from its saved state.
    Resume { name: String },
    /// Move a running instance to another host's daemon, sending only what it lacks.
    ///
    /// Phases: prepare (the target fetches the stack), pre-copy (the upper
    /// layer's written blocks, repeated while a round sends less), stop-and-copy
    /// (the guest is saved; its last writes and its state go as chunks), resume
    /// on the target, clean up here. Until the target resumes the guest, any
    /// failure leaves it running here. The target must `xenod allow` this
    /// host's node id. Reports bytes per phase, the guest's downtime and the total time.
    Migrate {
        name: String,
        /// The target daemon, as NODE@IP:PORT (`xenod status` there shows it).
        #[arg(long, value_name = "NODE@ADDR")]
        to: String,
        /// Stop the guest, send its upper layer and boot it on the target (for
        /// shared-filesystem roots, whose running state cannot be saved).
        #[arg(long)]
        cold: bool,
        /// How pre-copy compresses what it sends while the guest runs:
        /// `ppmd` (the default) or a zstd level (1-16). PPMd is a context model:
        /// on text it sends 22% less than zstd 16 in a quarter of the CPU
        /// (the migration benchmark's pre-copy: 31.4 MB against 39.6), on
        /// kernel code 10% less in about as much; runs of bytes zstd cannot
        /// shrink still go as zstd. The target decodes it at 8-30 MB/s, so
        /// on a fast link a zstd level (9: 200 MiB of log in about 4 s)
        /// finishes sooner. Stop-and-copy always uses a fast zstd level:
        /// the guest is down then.
        #[arg(long, value_name = "ppmd|LEVEL")]
        level: Option<xenod_store::Dense>,
        /// Save the guest's memory while it runs, or fail. This is the
        /// default where the hypervisor can (QEMU/KVM disk-root guests):
        /// QEMU's own migration into this host's memory, round after round
        /// of dirtied pages, so the guest stops only for the last round.
        /// libvirt marks the domain tainted (custom monitor command).
        #[arg(long, conflicts_with = "cold")]
        live: bool,
        /// Save the guest stopped for the whole save, not live: it is
        /// paused, then saved in one round by the live path's means where
        /// the hypervisor can (else by libvirt's virDomainSave). The guest
        /// is down longer, but never runs during the save.
        #[arg(long, conflicts_with_all = ["cold", "live"])]
        save: bool,
    },
    /// Save a disk-root instance's upper layer and machine state as a pinned
    /// layer; the guest runs on. Later checkpoints share unchanged chunks.
    Checkpoint {
        name: String,
        /// Also sign a name for the checkpoint (template://...).
        #[arg(long = "name", value_name = "NAME")]
        label: Option<String>,
    },
    /// Run a checkpoint as an instance again: here, or on another host with --on.
    Restore {
        checkpoint: String,
        /// The host to run it on, as NODE@IP:PORT (it must `xenod allow` this one).
        #[arg(long, value_name = "NODE@ADDR")]
        on: Option<String>,
        /// Instance name [default: the checkpointed instance's].
        #[arg(long = "as", value_name = "NAME")]
        name: Option<String>,
    },
    /// Let the host NODE migrate or restore guests onto this one.
    Allow {
        /// A node id (the first part of NODE@ADDR in `xenod status` there).
        node: String,
        /// Take the permission back.
        #[arg(long)]
        revoke: bool,
    },
    /// Mount a stack (read-only, or writable into --upper) with the cowfs union.
    Mount {
        r#ref: String,
        mountpoint: PathBuf,
        /// Writable upper directory (overlayfs format); without it the mount is read-only.
        #[arg(long)]
        upper: Option<PathBuf>,
        /// Read-only even with --upper.
        #[arg(long)]
        ro: bool,
        /// Serve in this process instead of a detached one.
        #[arg(long)]
        foreground: bool,
        /// Track writes and answer `drain` on this Unix socket (instances use it for migration).
        #[arg(long, hide = true)]
        control: Option<PathBuf>,
        /// Fetch chunks that are not here yet through this host's daemon (lazy deploy).
        #[arg(long, hide = true)]
        lazy: bool,
        /// A read-only host directory as a lower layer, over the stack and
        /// below the upper (repeatable: the first given is the highest, as in
        /// overlayfs's lowerdir=). It must not change while mounted.
        #[arg(long = "lower-dir", value_name = "DIR")]
        lower_dirs: Vec<PathBuf>,
        /// Serve file data through this process even where the kernel
        /// offers FUSE passthrough (for upper files, and for lower files
        /// materialised in the file cache).
        #[arg(long)]
        no_passthrough: bool,
        /// Take requests from the kernel through /dev/fuse even where it
        /// offers FUSE over io_uring (Linux 6.14+, the fuse module's
        /// enable_uring=Y: scripts/enable-fuse-uring.sh). Over io_uring each
        /// CPU has its own queue and a server thread pinned to it.
        #[arg(long)]
        no_uring: bool,
        /// Read-only mounts: have the kernel ask this process before each
        /// open, as writable mounts always do, so that lower files
        /// materialised in the file cache are read through passthrough. By
        /// default a read-only mount lets the kernel open files itself: a
        /// walk over the tree costs no round trip per file, and pages once
        /// read stay cached (nothing in a read-only stack changes).
        #[arg(long)]
        open_requests: bool,
        /// Bound of the store's cache of whole lower files materialised on
        /// disk for passthrough (DATA_DIR/cache/files, shared by every
        /// mount); 0 turns it off. Default: config.toml's
        /// `file_cache_bytes`, else 4 GiB.
        #[arg(long, value_name = "BYTES")]
        file_cache_bytes: Option<u64>,
        /// Bytes the upper directory may hold: writes past it fail with
        /// "Disk quota exceeded" (EDQUOT); what was written stays whole.
        #[arg(long, value_name = "BYTES", requires = "upper")]
        upper_quota: Option<u64>,
    },
    /// Make an upper directory mountable by the kernel's overlayfs: its
    /// block-copied (partial) files become whole files, xenod's work area goes.
    ///
    /// The upper must not be mounted meanwhile. Killed midway, run it again.
    Flatten {
        upper: PathBuf,
        /// The stack the upper belongs to.
        #[arg(long)]
        base: String,
    },
    /// Unmount a union mounted by `xenod mount`.
    Umount { mountpoint: PathBuf },
    /// Turn a writable layer into an overlay: an instance's upper (TARGET is
    /// an instance name), or an upper directory over --base.
    Commit {
        /// An instance name, or an upper directory (with --base).
        target: String,
        /// The stack an upper directory applies to.
        #[arg(long)]
        base: Option<String>,
        /// Sign and record a name for the new overlay.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        level: Level,
    },
    /// Print a digest of a directory tree covering contents and all metadata.
    Digest {
        dir: PathBuf,
        /// Print one line per path instead of the digest.
        #[arg(long)]
        list: bool,
    },
    #[command(flatten)]
    Peer(crate::peer_cmds::PeerCmd),
    #[command(flatten)]
    Names(crate::names_cmds::NameCmds),
    #[command(flatten)]
    Fed(crate::fed_cmds::FedCmd),
    /// Environments: private networks for guests, spanning hosts.
    #[command(subcommand)]
    Net(crate::net_cmds::NetCmd),
    #[command(flatten)]
    Usage(crate::usage_cmds::UsageCmd),
    /// A stack's prefetch order: the chunks its guest first read while
    /// booting, which lazy deploys fetch first, ahead of the guest.
    ///
    /// A lazy deploy records the order when none is held (or `record` asked
    /// for one) once its service answers; the order travels with the stack
    /// to the hosts that fetch it.
    #[command(subcommand)]
    Prefetch(crate::prefetch_cmds::PrefetchCmd),
    /// The store's cache of whole lower files, which mounts read through
    /// FUSE passthrough: fill it with a stack's big files, or show it.
    #[command(subcommand)]
    Cache(crate::cache_cmds::CacheCmd),
    /// Shell completions and man pages, for packages.
    #[command(subcommand, hide = true)]
    Generate(crate::generate::GenerateCmd),
}

#[derive(Debug, Subcommand)]
pub enum OverlayCmd {
    /// Store DIR as an overlay on BASE: added and changed entries, whiteouts for deletions.
    Create {
        #[arg(long)]
        base: String,
        dir: PathBuf,
        /// Sign and record a name for the overlay.
        #[arg(long)]
        name: Option<String>,
        /// A deploy spec (JSON) to carry in the overlay's metadata: how
        /// `xenod deploy` boots a guest from it.
        #[arg(long)]
        spec: Option<PathBuf>,
        #[command(flatten)]
        level: Level,
    },
}

/// `--level`, for commands that write a layer.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Level {
    /// zstd level (1-19) of the layer's chunks: its solid blocks, and the
    /// 64 KiB blocks of disk images and sparse files [default: the
    /// store's, 2]. Spends CPU once, here, for fewer bytes on every later
    /// fetch: peers send chunks as they keep them. 19 suits layers fetched by many
    /// hosts or over slow links.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=19))]
    level: Option<i32>,
}

impl Level {
    /// The level asked for, 0 for the store's.
    fn get(self) -> i32 {
        self.level.unwrap_or(0)
    }
}

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// What to deploy: a template name, NAME@ID, a layer id or prefix, or a
    /// ticket (its stack is fetched from the ticket's providers first).
    pub url: String,
    /// Instance name [default: the spec's, else derived from the layer].
    #[arg(long)]
    pub name: Option<String>,
    /// Start N instances sharing the cached layers (NAME-1 .. NAME-N); with
    /// --place, on N hosts (one each, unless --pack).
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// Let this host's daemon choose the host among those it knows: `auto`,
    /// or an expression hosts must match (as `xenod hosts --where`). Hosts
    /// are filtered by the spec's needs (hypervisor, vCPUs, memory free),
    /// then ranked by the bytes of the stack they lack (fewest first), then
    /// free memory; the chosen host fetches what it lacks and deploys (it
    /// must allow this host: `xenod allow NODE` there). Prints each
    /// candidate's score and why each other host was left out; a chosen
    /// host that fails leaves its replica to the next. Needs the daemon.
    #[arg(long, value_name = "auto|EXPR")]
    pub place: Option<String>,
    /// With --place: spread replicas over the values of this label (zone,
    /// rack, ...), one value each while there are unused ones.
    #[arg(long, value_name = "LABEL", requires = "place", conflicts_with = "pack")]
    pub spread: Option<String>,
    /// With --place: fill the fullest hosts first; a host takes replicas
    /// while its memory lasts.
    #[arg(long, requires = "place")]
    pub pack: bool,
    /// With --place: print the placement, deploy nothing.
    #[arg(long, requires = "place")]
    pub dry_run: bool,
    /// Hard CPU cap, percent of one CPU for the whole guest (libvirt
    /// cputune global_quota).
    #[arg(long, value_name = "PCT")]
    pub cpu_quota: Option<u32>,
    /// CPU weight against other guests [libvirt's default: 1024].
    #[arg(long, value_name = "N")]
    pub cpu_shares: Option<u32>,
    /// Disk roots: bytes a second, read and write together.
    #[arg(long, value_name = "BYTES")]
    pub disk_bps: Option<u64>,
    /// Disk roots: I/O operations a second.
    #[arg(long, value_name = "N")]
    pub disk_iops: Option<u64>,
    /// Network KiB a second each way (bridged networks; user-mode
    /// networking has no host interface to shape).
    #[arg(long, value_name = "KIB")]
    pub net_kibps: Option<u64>,
    /// MiB the guest's upper layer may hold: writes past it fail in the
    /// guest with "Disk quota exceeded".
    #[arg(long, value_name = "MIB")]
    pub upper_quota: Option<u64>,
    /// Deploy without the limits this host cannot apply to this guest
    /// (and say which) instead of refusing.
    #[arg(long)]
    pub best_effort: bool,
    /// libvirt connection [default: $XENOD_LIBVIRT_URI or qemu:///system].
    #[arg(long)]
    pub uri: Option<String>,
    /// Root mode override: fs (shared tree) or disk (image inside the tree).
    #[arg(long)]
    pub root: Option<RootMode>,
    /// Memory override, MiB.
    #[arg(long)]
    pub memory: Option<u32>,
    /// Port forwards override, HOST:GUEST on 127.0.0.1 (HOST 0 = any free port).
    #[arg(long = "port")]
    pub ports: Vec<PortForward>,
    /// Extra kernel command line override.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Seconds to wait for the guest's service to answer.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Return once the guest is started, without waiting for its service.
    #[arg(long)]
    pub no_wait: bool,
    /// Boot before the stack is all here: mount once its manifests are,
    /// fetch file data in the background and what the guest reads first at
    /// once. Needs this host's daemon (`xenod serve`).
    #[arg(long)]
    pub lazy: bool,
    /// Put the guest on this environment too (`xenod net create`): a
    /// second NIC on its segment with an address of its subnet, kept when
    /// the guest migrates; port forwards stay. Needs the daemon.
    #[arg(long, value_name = "ENV")]
    pub net: Option<String>,
}

fn deploy_options(ctx: &Ctx, a: &DeployArgs) -> instance::DeployOptions {
    instance::DeployOptions {
        name: a.name.clone(),
        replicas: a.replicas,
        uri: a.uri.clone(),
        root: a.root,
        memory: a.memory,
        ports: a.ports.clone(),
        cmdline: a.cmdline.clone(),
        timeout: std::time::Duration::from_secs(a.timeout),
        no_wait: a.no_wait,
        lazy: a.lazy,
        verbose: !ctx.json,
        limits: xenod_deployer::Limits {
            cpu_quota_pct: a.cpu_quota,
            cpu_shares: a.cpu_shares,
            disk_bytes_sec: a.disk_bps,
            disk_iops_sec: a.disk_iops,
            net_kib_sec: a.net_kibps,
            upper_bytes: a.upper_quota.map(|m| m << 20),
        },
        best_effort: a.best_effort,
        net: a.net.clone(),
        owner: None,
    }
}

/// `xenod deploy`: the stack made local (fetched by ticket, or with `--lazy`
/// its manifests through the daemon), then deployed; each instance's line
/// (or the JSON report) on stdout.
fn deploy(ctx: &Ctx, a: &DeployArgs) -> Result<()> {
    if a.place.is_some() {
        return crate::fed_cmds::deploy_placed(ctx, a, deploy_options(ctx, a));
    }
    let watch = ctx.watcher("fetching");
    let local = if a.lazy {
        if !client::daemon_runs(&ctx.data_dir) {
            bail!(
                "a lazy deploy fetches through this host's daemon; start `xenod --data-dir {} serve`",
                ctx.data_dir.display()
            );
        }
        let v = client::request_daemon(
            &ctx.data_dir,
            Request::Fetch { target: a.url.clone(), from: Vec::new(), lazy: true },
            &watch,
        )?;
        v["layer"].as_str().context("the daemon's fetch named no layer")?.to_owned()
    } else {
        client::localize(&ctx.data_dir, &a.url, &watch)?
    };
    let out = ctx.instances()?.deploy(&local, &deploy_options(ctx, a))?;
    ctx.out(out.clone(), || {
        let lines: Vec<String> = out["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| {
                format!(
                    "{} running ({}), http://127.0.0.1:{}/",
                    v["name"].as_str().unwrap_or("?"),
                    v["root"].as_str().unwrap_or("?"),
                    v["port"].as_u64().unwrap_or(0)
                )
            })
            .collect();
        lines.join("\n")
    })?;
    let errors: Vec<&str> = out["errors"].as_array().into_iter().flatten().filter_map(|e| e.as_str()).collect();
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
}

/// Bytes of the regular files under `dir` (not following links): the
/// total a directory's publish shows progress against.
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

pub(crate) struct Ctx {
    pub(crate) data_dir: PathBuf,
    pub(crate) json: bool,
    pub(crate) progress: bool,
}

impl Ctx {
    /// This host's instances.
    fn instances(&self) -> Result<instance::Instances> {
        instance::Instances::open(&self.data_dir)
    }

    /// Draws a request's notes and progress on stderr.
    pub(crate) fn watcher(&self, what: &str) -> Watcher {
        Watcher::new(what, self.draw(false))
    }

    /// Where progress goes; `quiet`: not by default (stdout carries data).
    pub(crate) fn draw(&self, quiet: bool) -> progress::Draw {
        progress::Draw::new(self.json || quiet, self.progress)
    }

    /// The file cache's bound for one command: `flag` if given, else
    /// config.toml's `file_cache_bytes` (as the daemon's mounts and warming
    /// use), else cowfs's default.
    pub(crate) fn file_cache_cap(&self, flag: Option<u64>) -> Result<u64> {
        match flag {
            Some(b) => Ok(b),
            None => Ok(Config::load(&self.data_dir)?.file_cache_cap()),
        }
    }

    pub(crate) fn store(&self) -> Result<Store> {
        Store::open(&self.data_dir).with_context(|| format!("opening the store in {}", self.data_dir.display()))
    }

    /// In text mode, `text` on stderr: what people read besides the
    /// result, which alone goes to stdout (so `ID=$(xenod publish DIR)`
    /// captures the id). Nothing under `--json`, whose object says it all.
    pub(crate) fn note(&self, text: impl FnOnce() -> String) {
        if !self.json {
            eprintln!("{}", text());
        }
    }

    /// Prints `value` as JSON, or `text` for people.
    pub(crate) fn out(&self, value: serde_json::Value, text: impl FnOnce() -> String) -> Result<()> {
        let mut o = io::stdout().lock();
        if self.json {
            writeln!(o, "{value}")?;
        } else {
            let t = text();
            if !t.is_empty() {
                writeln!(o, "{t}")?;
            }
        }
        Ok(())
    }
}

/// Runs one subcommand. One piece on purpose: one short arm per
/// subcommand, so the table of what each command calls and prints reads in
/// one place; the longer ones are functions of their own.
pub fn run(args: Args) -> Result<()> {
    // Absolute, so paths handed to libvirt and to the filesystem process
    // (which run elsewhere) mean the same directory.
    let data_dir = std::path::absolute(args.data_dir.unwrap_or_else(config::default_data_dir))
        .context("resolving the data directory")?;
    let ctx = Ctx { data_dir, json: args.json, progress: args.progress };
    match args.cmd {
        Cmd::Publish { src, name, image, spec, level } => {
            publish(&ctx, &src, name.as_deref(), image, level.get(), spec_meta(spec)?)
        }
        Cmd::Overlay(OverlayCmd::Create { base, dir, name, spec, level }) => {
            overlay_create(&ctx, &base, &dir, name.as_deref(), level.get(), spec_meta(spec)?)
        }
        Cmd::Deploy(a) => deploy(&ctx, &a),
        Cmd::Ps => {
            let list = ctx.instances()?.list()?;
            let j: Vec<_> = list
                .iter()
                .map(|(i, st)| json!({ "name": i.name, "state": st, "id": i.layer.to_string(), "top": i.top.to_string(),
                    "root": format!("{:?}", i.root).to_lowercase(), "ports": i.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>() }))
                .collect();
            ctx.out(json!({ "instances": j }), || {
                let mut s = format!("{:<20} {:<12} {:<6} {:<12} PORTS", "NAME", "STATE", "ROOT", "STACK");
                for (i, st) in &list {
                    let ports: Vec<String> = i.ports.iter().map(|p| p.to_string()).collect();
                    s += &format!(
                        "\n{:<20} {:<12} {:<6} {:<12} {}",
                        i.name,
                        st,
                        format!("{:?}", i.root).to_lowercase(),
                        i.top.fmt_short(),
                        ports.join(",")
                    );
                }
                s
            })
        }
        Cmd::Stop { name } => {
            let how = ctx.instances()?.stop(&name)?;
            ctx.out(json!({ "name": name, "outcome": how }), || format!("{name} stopped ({how})"))
        }
        Cmd::Start { name } => {
            ctx.instances()?.start(&name)?;
            ctx.out(json!({ "name": name }), || format!("{name} started"))
        }
        Cmd::Destroy { name, keep } => {
            ctx.instances()?.destroy(&name, keep)?;
            ctx.out(json!({ "name": name, "kept_upper": keep }), || format!("{name} destroyed"))
        }
        Cmd::Logs { name } => {
            let log = ctx.instances()?.logs(&name)?;
            ctx.out(json!({ "name": name, "console": log }), || log.trim_end().to_string())
        }
        Cmd::Suspend { name } => {
            let state = ctx.instances()?.suspend(&name)?;
            ctx.out(json!({ "name": name, "state_file": state }), || format!("{name} suspended to {}", state.display()))
        }
        Cmd::Resume { name } => {
            ctx.instances()?.resume(&name)?;
            ctx.out(json!({ "name": name }), || format!("{name} resumed"))
        }
        Cmd::Migrate { name, to, cold, level, live, save } => {
            let req = Request::Migrate { instance: name, to, cold, level, live, save };
            let v = client::request(&ctx.data_dir, req, &ctx.watcher("migrating"))?;
            ctx.out(v.clone(), || describe_migration(&v))
        }
        Cmd::Checkpoint { name, label } => {
            let v = client::request(
                &ctx.data_dir,
                Request::Checkpoint { instance: name, name: label },
                &ctx.watcher("checkpoint"),
            )?;
            ctx.out(v.clone(), || v["checkpoint"].as_str().unwrap_or("").to_string())?;
            ctx.note(|| {
                format!(
                    "checkpoint of {} ({} new chunks, guest paused {:.2} s)",
                    v["instance"].as_str().unwrap_or(""),
                    v["new_chunks"],
                    v["paused_seconds"].as_f64().unwrap_or(0.0)
                )
            });
            Ok(())
        }
        Cmd::Restore { checkpoint, on, name } => {
            let v =
                client::request(&ctx.data_dir, Request::Restore { checkpoint, on, name }, &ctx.watcher("fetching"))?;
            ctx.out(v.clone(), || {
                format!(
                    "{} runs {} (port {})",
                    v["restored"]["name"].as_str().unwrap_or(""),
                    v["on"].as_str().unwrap_or(""),
                    v["restored"]["port"]
                )
            })
        }
        Cmd::Allow { node, revoke } => {
            node.parse::<xenod_peer::EndpointId>()
                .map_err(|e| Error::coded(Exit::BadInput, format!("{node:?} is not a node id: {e}")))?;
            let mut c = Config::load(&ctx.data_dir)?;
            c.migrate_from.retain(|n| n != &node);
            if !revoke {
                c.migrate_from.push(node.clone());
            }
            c.save(&ctx.data_dir)?;
            ctx.out(json!({ "node": node, "allowed": !revoke }), || {
                format!("{node} {} move guests onto this host", if revoke { "may no longer" } else { "may" })
            })
        }
        Cmd::Mount {
            r#ref,
            mountpoint,
            upper,
            ro,
            foreground,
            lower_dirs,
            no_passthrough,
            no_uring,
            open_requests,
            file_cache_bytes,
            upper_quota,
            control,
            lazy,
        } => {
            let how = mount::MountHow {
                upper,
                read_only: ro,
                lower_dirs,
                passthrough: !no_passthrough,
                no_uring,
                open_requests,
                file_cache_bytes: Some(ctx.file_cache_cap(file_cache_bytes)?),
                control,
                lazy,
                upper_quota,
            };
            // A ticket: fetch the stack first; the mount then names the layer id.
            let local = client::localize(&ctx.data_dir, &r#ref, &ctx.watcher("fetching"))?;
            mount::mount_cmd(&ctx.data_dir, &local, &mountpoint, &how, foreground)?;
            ctx.out(json!({ "mountpoint": mountpoint }), String::new)
        }
        Cmd::Flatten { upper, base } => {
            let store = Arc::new(ctx.store()?);
            let stack = store.stack(&store.resolve(&base)?)?;
            let s = xenod_cowfs::flatten(store, &stack, &upper)?;
            ctx.out(json!({ "upper": upper, "files": s.files, "blocks": s.blocks }), || {
                format!("{}: {} partial files made whole ({} blocks filled)", upper.display(), s.files, s.blocks)
            })
        }
        Cmd::Umount { mountpoint } => {
            mount::umount_cmd(&mountpoint)?;
            ctx.out(json!({ "mountpoint": mountpoint }), || format!("unmounted {}", mountpoint.display()))
        }
        Cmd::Commit { target, base, name, level } => {
            if let Some(n) = &name {
                xenod_store::check_name(n)?;
            }
            let st = match base {
                Some(b) => {
                    let store = ctx.store()?;
                    store.set_block_level(level.get());
                    mount::commit_cmd(Arc::new(store), Path::new(&target), &b)?
                }
                None if ctx.instances()?.dir(&target).is_dir() => {
                    let mut meta = BTreeMap::new();
                    meta.insert("committed_from".to_string(), target.clone());
                    ctx.instances()?.commit(&target, meta, level.get())?
                }
                None => bail!("{target:?} is no instance here; to commit an upper directory pass --base REF"),
            };
            if let Some(n) = &name {
                let store = ctx.store()?;
                record_name(&ctx, &store, n, st.id)?;
            } else {
                ctx.store()?.pin(&st.id.to_string(), &st.id)?;
            }
            ctx.out(json!({ "id": st.id.to_string(), "entries": st.entries, "name": name }), || st.id.to_string())?;
            ctx.note(|| format!("{} entries committed from {target}", st.entries));
            Ok(())
        }
        Cmd::Export { r#ref, dest, layer_only, no_mounts } => export(&ctx, &r#ref, &dest, layer_only, no_mounts),
        Cmd::Ls => ls(&ctx),
        Cmd::Resolve { r#ref } => {
            let id = ctx.store()?.resolve(&r#ref)?;
            ctx.out(json!({ "id": id.to_string() }), || id.to_string())
        }
        Cmd::Verify { repair: true, from } => crate::repair::verify_repair(&ctx, from),
        Cmd::Verify { repair: false, .. } => verify(&ctx),
        Cmd::Gc { dry_run: true } => crate::repair::gc_dry_run(&ctx),
        Cmd::Gc { dry_run: false } => {
            let mut store = ctx.store()?;
            let phases = progress::Phases::new("gc", ctx.draw(false));
            let s = store.gc_with(&|step| phases.step(step));
            phases.finish();
            let s = s?;
            compact(&mut store);
            ctx.out(
                json!({ "live_chunks": s.live_chunks, "removed_chunks": s.removed_chunks,
                        "removed_packs": s.removed_packs, "rewritten_packs": s.rewritten_packs,
                        "freed_bytes": s.freed_bytes }),
                || {
                    format!(
                        "kept {} chunks; removed {} chunks, {} packs removed, {} rewritten, {} freed",
                        s.live_chunks,
                        s.removed_chunks,
                        s.removed_packs,
                        s.rewritten_packs,
                        human(s.freed_bytes)
                    )
                },
            )
        }
        Cmd::Pin { r#ref, label } => {
            let store = ctx.store()?;
            let id = store.resolve(&r#ref)?;
            store.layer_root(&id)?;
            let label = label.unwrap_or_else(|| id.to_string());
            store.pin(&label, &id)?;
            ctx.out(json!({ "id": id.to_string(), "label": label }), || format!("pinned {id} as {label}"))
        }
        Cmd::Unpin { label } => {
            if !ctx.store()?.unpin(&label)? {
                return Err(Error::coded(Exit::NotFound, format!("no pin labelled {label:?}")));
            }
            ctx.out(json!({ "label": label }), || format!("unpinned {label}"))
        }
        Cmd::Peer(c) => crate::peer_cmds::run(&ctx, c),
        Cmd::Names(c) => crate::names_cmds::run(&ctx, c),
        Cmd::Fed(c) => crate::fed_cmds::run(&ctx, c),
        Cmd::Net(c) => crate::net_cmds::run(&ctx, c),
        Cmd::Usage(c) => crate::usage_cmds::run(&ctx, c),
        Cmd::Prefetch(c) => crate::prefetch_cmds::run(&ctx, c),
        Cmd::Cache(c) => crate::cache_cmds::run(&ctx, c),
        Cmd::Generate(c) => crate::generate::run(&ctx, c),
        Cmd::Digest { dir, list } => {
            if list {
                let lines = xenod_store::tree_listing(&dir)?;
                ctx.out(json!({ "entries": lines }), || lines.join("\n"))
            } else {
                let d = xenod_store::tree_digest(&dir)?;
                ctx.out(json!({ "digest": d }), || d.clone())
            }
        }
    }
}

/// A migration report for people.
fn describe_migration(v: &serde_json::Value) -> String {
    let mib = |b: &serde_json::Value| format!("{:.1} MiB", b.as_u64().unwrap_or(0) as f64 / (1 << 20) as f64);
    let mut out = format!(
        "{} moved to {}{}: {} sent, guest down {:.2} s, {:.2} s in all",
        v["instance"].as_str().unwrap_or(""),
        v["to"].as_str().unwrap_or(""),
        if v["cold"] == true { " (cold)" } else { "" },
        mib(&v["wire_bytes"]),
        v["downtime_seconds"].as_f64().unwrap_or(0.0),
        v["total_seconds"].as_f64().unwrap_or(0.0)
    );
    for p in v["phases"].as_array().into_iter().flatten() {
        let wire = p["wire_bytes"].as_u64().or_else(|| p["fetch"]["wire_bytes"].as_u64());
        out.push_str(&format!(
            "\n  {:<14} {:>7.2} s{}",
            p["phase"].as_str().unwrap_or(""),
            p["seconds"].as_f64().unwrap_or(0.0),
            wire.map(|w| format!("  {}", mib(&json!(w)))).unwrap_or_default()
        ));
        if let Some(r) = p["rounds"].as_array() {
            out.push_str(&format!(" in {} rounds", r.len()));
        }
    }
    if let Some(port) = v["port"].as_u64() {
        out.push_str(&format!("\n  serving on the target's port {port}"));
    }
    out
}

pub(crate) fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{n} B") } else { format!("{v:.1} {}", U[i]) }
}

/// Signs and records `name` -> `id` with this host's key (created on first use).
pub(crate) fn record_name(ctx: &Ctx, store: &Store, name: &str, id: LayerId) -> Result<u64> {
    record_name_in(&ctx.data_dir, store, name, Some(id))
}

/// What the file `path` begins with ([`xenod_store::sniff`]).
fn sniff_file(path: &Path) -> Result<xenod_store::Sniffed> {
    let f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut head = Vec::with_capacity(xenod_store::SNIFF_LEN);
    f.take(xenod_store::SNIFF_LEN as u64)
        .read_to_end(&mut head)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(xenod_store::sniff(&head))
}

/// Whether a file's name says it is a disk image.
fn image_name(path: &Path) -> bool {
    let n = path.as_os_str().as_encoded_bytes();
    [&b".img"[..], b".raw", b".qcow2"].iter().any(|s| n.ends_with(s))
}

struct Published {
    id: LayerId,
    entries: u64,
    bytes_in: u64,
}

/// Reads and checks a deploy spec file into layer metadata.
fn spec_meta(spec: Option<PathBuf>) -> Result<BTreeMap<String, String>> {
    let mut meta = BTreeMap::new();
    if let Some(p) = spec {
        let text = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let parsed =
            xenod_deployer::DeploySpec::from_json(&text).with_context(|| format!("deploy spec {}", p.display()))?;
        meta.insert(instance::SPEC_KEY.to_string(), parsed.to_json());
    }
    Ok(meta)
}

fn publish(
    ctx: &Ctx,
    src: &str,
    name: Option<&str>,
    image: bool,
    level: i32,
    meta: BTreeMap<String, String>,
) -> Result<()> {
    if let Some(n) = name {
        xenod_store::check_name(n)?;
    }
    let started = Instant::now();
    let mut store = ctx.store()?;
    store.set_block_level(level);
    let _lock = store.write_lock()?;
    let path = Path::new(src);
    let total = match fs::metadata(path) {
        Ok(m) if src != "-" && m.is_file() => Some(m.len()),
        Ok(m) if src != "-" && m.is_dir() => Some(tree_bytes(path)),
        _ => None,
    };
    let pb = progress::bytes("publishing", total, ctx.draw(false));
    let opts = ImportOptions {
        all_images: image && path.is_dir(),
        progress: Some(progress::callback(&pb)),
        ..ImportOptions::default()
    };
    let mut w = LayerWriter::new(&store);
    let mut entries = 0u64;
    let mut sink = |e: Entry| {
        entries += 1;
        w.push(&e)
    };
    use xenod_store::Sniffed;
    if src == "-" {
        import_tar(&store, io::stdin().lock(), &opts, &mut sink)?;
    } else {
        let md = fs::metadata(path).map_err(|source| xenod_store::Error::Io {
            what: "reading",
            path: path.into(),
            source,
        })?;
        let how = if md.is_dir() || image { None } else { Some(sniff_file(path)?) };
        match how {
            None if md.is_dir() => import_dir(&store, path, &opts, &mut sink)?,
            Some(Sniffed::Tar | Sniffed::Compressed(_)) => {
                let f = fs::File::open(path).with_context(|| format!("opening {src}"))?;
                import_tar(&store, f, &opts, &mut sink).with_context(|| format!("publishing {src}"))?;
            }
            Some(Sniffed::Empty) => {
                return Err(Error::coded(
                    Exit::BadInput,
                    format!("{src} is empty: no tar archive to publish (an empty disk image needs --image)"),
                ));
            }
            Some(Sniffed::Other) if !image_name(path) => {
                return Err(Error::coded(
                    Exit::BadInput,
                    format!(
                        "{src} is not a tar archive (nor a directory); to publish it as a disk image, pass --image"
                    ),
                ));
            }
            None | Some(Sniffed::Other) => {
                let file_name =
                    path.file_name().map(|n| n.as_encoded_bytes().to_vec()).unwrap_or_else(|| b"disk.img".to_vec());
                import_image(&store, path, &file_name, &opts, &mut sink)?;
            }
        }
    }
    let id = w.finish(None, meta)?;
    pb.finish_and_clear();
    let bytes_in = store.layer_root(&id)?.file_bytes;
    let p = Published { id, entries, bytes_in };
    finish_layer(ctx, &store, name, &p, started)?;
    drop(_lock);
    compact(&mut store);
    Ok(())
}

/// Gives the index's free pages back; skipped when another process holds
/// the store open (it is only space).
fn compact(store: &mut Store) {
    if let Err(e) = store.compact() {
        tracing::debug!("index not compacted: {e}");
    }
}

fn finish_layer(ctx: &Ctx, store: &Store, name: Option<&str>, p: &Published, started: Instant) -> Result<()> {
    let seq = match name {
        Some(n) => Some(record_name(ctx, store, n, p.id)?),
        None => {
            store.pin(&p.id.to_string(), &p.id)?;
            None
        }
    };
    let st = &store.stats;
    use std::sync::atomic::Ordering::Relaxed;
    let (chunks, new_chunks, stored) =
        (st.chunks.load(Relaxed), st.new_chunks.load(Relaxed), st.stored_bytes.load(Relaxed));
    let secs = started.elapsed().as_secs_f64();
    ctx.out(
        json!({ "id": p.id.to_string(), "name": name, "seq": seq, "entries": p.entries,
                "bytes_in": p.bytes_in, "bytes_stored": stored, "chunks": chunks,
                "new_chunks": new_chunks, "seconds": secs }),
        || p.id.to_string(),
    )?;
    ctx.note(|| {
        format!(
            "{} entries, {} in, {} newly stored ({} of {} chunks new) in {:.2}s{}",
            p.entries,
            human(p.bytes_in),
            human(stored),
            new_chunks,
            chunks,
            secs,
            name.map(|n| format!("\nnamed {n} (sequence {})", seq.unwrap_or(0))).unwrap_or_default()
        )
    });
    Ok(())
}

fn overlay_create(
    ctx: &Ctx,
    base_ref: &str,
    dir: &Path,
    name: Option<&str>,
    level: i32,
    meta: BTreeMap<String, String>,
) -> Result<()> {
    if let Some(n) = name {
        xenod_store::check_name(n)?;
    }
    let started = Instant::now();
    let mut store = ctx.store()?;
    store.set_block_level(level);
    let _lock = store.write_lock()?;
    let base = store.resolve(base_ref)?;
    let base_entries = Merged::of(&store, &base)?;
    let pb = progress::bytes("creating overlay", None, ctx.draw(false));
    let opts = ImportOptions { progress: Some(progress::callback(&pb)), ..ImportOptions::default() };
    let (tx, rx) = std::sync::mpsc::sync_channel::<xenod_store::Result<Entry>>(256);
    let mut entries = 0u64;
    let id = std::thread::scope(|s| -> Result<LayerId> {
        let store = &store;
        let opts = &opts;
        let walker = s.spawn(move || {
            let tx2 = tx.clone();
            let r = import_dir(store, dir, opts, &mut |e| {
                tx2.send(Ok(e)).map_err(|_| xenod_store::Error::BadInput {
                    at: dir.display().to_string(),
                    why: "overlay writer stopped".into(),
                })
            });
            if let Err(e) = r {
                let _ = tx.send(Err(e));
            }
        });
        let mut w = LayerWriter::new(store);
        for e in diff(base_entries, rx.into_iter()) {
            w.push(&e?)?;
            entries += 1;
        }
        let _ = walker.join();
        Ok(w.finish(Some(base), meta)?)
    })?;
    pb.finish_and_clear();
    let bytes_in = store.layer_root(&id)?.file_bytes;
    finish_layer(ctx, &store, name, &Published { id, entries, bytes_in }, started)?;
    drop(_lock);
    compact(&mut store);
    Ok(())
}

fn export(ctx: &Ctx, r: &str, dest: &str, layer_only: bool, no_mounts: bool) -> Result<()> {
    let store = ctx.store()?;
    let id = store.resolve(r)?;
    let stack = if layer_only { vec![id] } else { store.stack(&id)? };
    let draw = ctx.draw(dest == "-");
    let started = Instant::now();
    let mut mounted = Vec::new();
    let stats = if layer_only {
        // The layer as stored (whiteouts and all): its root has the total.
        let total = store.layer_root(&id)?.file_bytes;
        let pb = progress::bytes("exporting", Some(total), draw);
        let r = do_export(&store, store.read_layer(&id)?, dest, &pb);
        progress::finish(&pb, draw);
        r?
    } else {
        let (placed, added) = crate::repair::export_placement(&store, &stack, no_mounts)?;
        crate::repair::note_added(&added, ctx.json);
        mounted = added;
        let total = crate::repair::union_file_bytes(&store, &placed)?;
        let pb = progress::bytes("exporting", Some(total), draw);
        let r = do_export(&store, Merged::placed(&store, &placed, Vec::new())?, dest, &pb);
        progress::finish(&pb, draw);
        r?
    };
    if dest == "-" {
        return Ok(());
    }
    ctx.out(
        json!({ "id": id.to_string(), "layers": stack.len(), "mounted": crate::repair::added_json(&mounted), "entries": stats.entries,
                "file_bytes": stats.file_bytes, "seconds": started.elapsed().as_secs_f64() }),
        String::new,
    )?;
    ctx.note(|| {
        format!(
            "exported {id} ({} layers, {} entries, {}) to {dest}",
            stack.len(),
            stats.entries,
            human(stats.file_bytes)
        )
    });
    Ok(())
}

/// Writes `entries` to `dest` (`-`: a tar stream on stdout), telling `pb`
/// the bytes of regular files as they go.
fn do_export(
    store: &Store,
    entries: impl Iterator<Item = xenod_store::Result<Entry>>,
    dest: &str,
    pb: &indicatif::ProgressBar,
) -> Result<xenod_store::ExportStats> {
    let inc = |n| pb.inc(n);
    Ok(if dest == "-" {
        export_tar_with(store, entries, io::BufWriter::with_capacity(1 << 20, io::stdout().lock()), &inc)?
    } else {
        export_dir(store, entries, Path::new(dest), &inc)?
    })
}

fn ls(ctx: &Ctx) -> Result<()> {
    let store = ctx.store()?;
    let mut names = store.names()?;
    names.sort_by(|a, b| a.name.cmp(&b.name));
    let pins = store.pins()?;
    let mut layers = store.layers()?;
    layers.sort_by_key(|(_, i)| i.created);
    let j = json!({
        "names": names.iter().map(|n| json!({"name": n.name, "id": (!n.removed).then(|| n.id.to_string()), "removed": n.removed, "seq": n.seq, "key": hex(&n.key)})).collect::<Vec<_>>(),
        "pins": pins.iter().map(|(l, id)| json!({"label": l, "id": id.to_string()})).collect::<Vec<_>>(),
        "layers": layers.iter().map(|(id, i)| json!({"id": id.to_string(), "base": i.base.map(|b| b.to_string()),
            "entries": i.entries, "file_bytes": i.file_bytes, "created": i.created, "partial": i.partial})).collect::<Vec<_>>(),
        "chunks": store.chunk_count()?,
    });
    ctx.out(j, || {
        let mut s = String::new();
        s += "NAMES\n";
        for n in &names {
            let to = if n.removed { "removed".to_string() } else { n.id.fmt_short().to_string() };
            s += &format!("  {}  {to}  seq {}  key {}\n", n.name, n.seq, &hex(&n.key)[..10]);
        }
        s += "PINS\n";
        for (l, id) in &pins {
            s += &format!("  {l}  {}\n", id.fmt_short());
        }
        s += "LAYERS\n";
        for (id, i) in &layers {
            s += &format!(
                "  {}  {:>8} entries  {:>10}  {}{}\n",
                id.fmt_short(),
                i.entries,
                human(i.file_bytes),
                i.base.map(|b| format!("on {}", b.fmt_short())).unwrap_or_else(|| "template".into()),
                if i.partial { "  (manifests only; data still to come)" } else { "" }
            );
        }
        s.trim_end().to_string()
    })
}

fn verify(ctx: &Ctx) -> Result<()> {
    let store = ctx.store()?;
    let (_, total) = store.pack_usage()?;
    let pb = progress::bytes("verifying", Some(total), ctx.draw(false));
    let r = store.verify_with(Some(&progress::callback(&pb)));
    pb.finish_and_clear();
    let r = r?;
    let damage: Vec<_> = r
        .damage
        .iter()
        .map(|d| {
            json!({ "chunk": d.chunk.to_string(), "why": d.why,
                    "layers": d.layers.iter().map(|(l, at)| json!({"id": l.to_string(), "at": at})).collect::<Vec<_>>() })
        })
        .collect();
    ctx.out(
        json!({ "clean": r.is_clean(), "packs": r.packs, "chunks": r.chunks, "bytes": r.bytes, "layers": r.layers,
                "damage": damage, "broken_layers": r.broken_layers.iter().map(|(l, w)| json!({"id": l.to_string(), "why": w})).collect::<Vec<_>>(),
                "bad_packs": r.bad_packs, "stale_tmp": r.stale_tmp,
                "broken_mounts": r.broken_mounts.iter().map(|(l, f, rf, w)| json!({"layer": l.to_string(), "file": f, "reference": rf, "why": w})).collect::<Vec<_>>() }),
        || {
            let mut s = format!("checked {} chunks ({}) in {} packs, {} layers", r.chunks, human(r.bytes), r.packs, r.layers);
            for d in &r.damage {
                s += &format!("\nbad chunk {}: {}", d.chunk, d.why);
                for (l, at) in &d.layers {
                    s += &format!("\n  breaks layer {l} at {at}");
                }
            }
            for (l, w) in &r.broken_layers {
                s += &format!("\nbroken layer {l}: {w}");
            }
            for p in &r.bad_packs {
                s += &format!("\nbad pack: {p}");
            }
            for (l, f, rf, w) in &r.broken_mounts {
                s += &format!("\nbroken .mount {f} in layer {l}: {rf:?}: {w}");
            }
            if r.stale_tmp > 0 {
                s += &format!("\n{} unfinished pack(s) from interrupted writes (harmless; gc removes them)", r.stale_tmp);
            }
            s += if r.is_clean() { "\nclean" } else { "\nDAMAGED" };
            s
        },
    )?;
    if !r.is_clean() {
        return Err(Error::coded(Exit::Damaged, "the store is damaged (see above)"));
    }
    Ok(())
}
