//! Migration as phases, and the one failure policy.
//!
//! `Migration` moves one running guest: one method per phase, each
//! returning its typed report, and one place (`Migration::fail`) that
//! decides, for a failure in any phase, what to undo and where the guest
//! runs afterwards. It drives three things it is handed, so the policy can
//! be tested without root, QEMU or a second host:
//!
//! ```text
//! H: LiveMigration   the source's hypervisor: save (live), stop, start,
//!                    resume, kill, restore, destroy
//! C: Changes         the guest's files and state as layers: commits of
//!                    its upper layer, the state's page delta, clean-up
//! T: Target          the target daemon: prepare, sync, stage, resume, abort
//! ```
//!
//! Where the guest runs after a failure, by phase:
//!
//! ```text
//! prepare, pre-copy      here: it never stopped; the target forgets what it
//!                        prepared (abort)
//! stop-and-copy          here: the save failed (not stopped), or it is
//!                        revived: unpaused (saved live), restored (saved),
//!                        started (cold)
//! resume, refused        here, revived: the target said it undid the restore
//! resume, silent         unknown: the target was restoring when it went
//!                        silent, so it may run there; the state is kept
//!                        here for `xenod resume`, and nothing runs here
//! clean up               there: the target runs it; what is left here is
//!                        named for `xenod destroy`
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use xenod_deployer::LiveMigration;
use xenod_store::{Dense, LayerId};

use super::record::{Record, SaveMode};
pub use super::report::{Adopted, FetchReply, FinalCopy, MigrationReport, PhaseReport, ResumeReply, Round};
use super::statepages::EncodeStats;
use crate::error::{Error, Phase, Result};
use crate::note;

/// At most this many pre-copy rounds.
pub const MAX_ROUNDS: usize = 6;
/// Pre-copy stops once a round sends less than this.
pub const CONVERGED: u64 = 2 << 20;
/// How pre-copy compresses by default (dense frames: every chunk
/// compressed in 1 MiB runs); `migrate --level` sets a zstd level instead.
/// The guest runs meanwhile, so bytes count more than the source's CPU, up
/// to a point: on the migration benchmark, zstd 9 sent 45.5 MB in 3.8 s
/// of pre-copy, 16 (zstd's optimal parser with a short search) 39.6 MB in
/// 16 s, and zstd's own 16 40.2 MB in 35 s. PPMd, where it is smaller
/// (text, code), sends 22% less than 16 on the benchmark's log in a
/// quarter of the CPU; the target pays for that by decoding at 8-30 MB/s
/// (see `xenod_store`'s codec).
pub const PRECOPY_CODEC: Dense = Dense::Ppmd;

/// Refuses a pre-copy codec a dense request could not carry.
pub(crate) fn check_level(codec: Dense) -> Result<(), LevelFault> {
    match codec {
        Dense::Zstd(level) if !(1..=xenod_peer::MAX_DENSE_LEVEL).contains(&level) => {
            Err(LevelFault::OutOfRange { level })
        }
        _ => Ok(()),
    }
}

/// Why [`check_level`] refuses a pre-copy codec. Callers put it in their
/// own words: "--level 30 is outside ..." for the CLI, "pre-copy level
/// ..." from the target.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LevelFault {
    /// A zstd level outside what a dense request can carry.
    #[error("level {level} is outside 1..={max}", max = xenod_peer::MAX_DENSE_LEVEL)]
    OutOfRange { level: u8 },
}

/// zstd level in stop-and-copy, where the guest is down: compression must
/// not take longer than the bytes it saves would.
pub const FINAL_CODEC: Dense = Dense::Zstd(3);

/// One commit of the guest's upper layer.
#[derive(Clone, Copy, Debug)]
pub struct Commit {
    pub layer: LayerId,
    /// Blocks the guest wrote since the last commit, as cowfs recorded them.
    pub blocks_written: u64,
    /// Bytes read from the upper to make the commit.
    pub bytes_read: u64,
}

/// The saved state as a layer.
#[derive(Clone, Debug, Default)]
pub struct StateLayer {
    pub layer: Option<LayerId>,
    pub pages: Option<EncodeStats>,
    /// The page delta was encoded while QEMU wrote the state.
    pub encoded_live: bool,
}

/// The guest's files and state as layers, on the source.
pub(crate) trait Changes {
    /// Commits what the guest wrote since the last commit (its whole upper
    /// layer with `full`).
    async fn commit(&mut self, full: bool) -> Result<Commit>;
    /// Brings the page hashes of the instance's files up to `layer` (runs
    /// while the target fetches it), for the state's page delta.
    async fn index_pages(&mut self, layer: LayerId) -> Result<()>;
    /// Where the guest's state is to be saved; with `follow`, the state's
    /// page delta is encoded as it is written, until the returned flag is
    /// set.
    fn begin_save(&mut self, follow: bool) -> (PathBuf, Arc<AtomicBool>);
    /// The saved state as a layer: `live`, saved through the hypervisor's
    /// migration, what was encoded while it was written is the state (a
    /// page delta against the last pre-copy round); else its page delta
    /// against `commit`, the final commit.
    async fn state_layer(&mut self, live: bool, commit: LayerId) -> Result<StateLayer>;
    /// Waits for an encoder still reading the state file.
    async fn settle(&mut self);
    /// Keeps the saved state where `xenod resume` looks for it.
    fn keep_state(&mut self) -> PathBuf;
    /// Removes the instance here (its mount, files, pin); its domain is gone.
    async fn remove_instance(&mut self) -> Result<()>;
}

/// The target daemon, as the source sees it.
pub(crate) trait Target {
    /// The target checks trust, name and space, and fetches the stack.
    async fn prepare(&mut self, record: &Record, mounted: LayerId, need_bytes: u64) -> Result<FetchReply>;
    /// The target fetches `layer` (`last`: in stop-and-copy).
    async fn sync(&self, layer: LayerId, last: bool, level: Option<Dense>) -> Result<FetchReply>;
    /// The target mounts `layer` and starts the guest's QEMU on it, paused.
    async fn stage(&self, layer: LayerId, record: &Record, xml: String) -> Result<Value>;
    /// The target runs the guest on `layer` from `state`; `restoring` is set
    /// once it passes the commit point.
    async fn resume(
        &self,
        layer: LayerId,
        state: Option<LayerId>,
        record: &Record,
        restoring: &mut bool,
    ) -> Result<ResumeReply>;
    /// The target forgets what it prepared for the guest.
    async fn abort(&self, instance: &str);
}

/// What a migration asks for.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The target, as given (reported back).
    pub to: String,
    /// Stop the guest and boot it there, with no memory saved.
    pub cold: bool,
    pub save: SaveMode,
    /// Pre-copy's codec; [`PRECOPY_CODEC`] when none.
    pub level: Option<Dense>,
}

/// Where the guest stands, as far as this host knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Where {
    /// Running here, untouched.
    Running,
    /// Stopped here for the move: saved to the state file (`live`: saved
    /// through the hypervisor's migration, its QEMU paused holding it), or
    /// shut down (cold).
    Stopped { live: bool },
    /// The target passed the commit point: it runs the guest, or may.
    Target,
}

/// The guest that moves.
#[derive(Clone, Debug)]
pub(crate) struct Guest {
    /// Its domain here.
    pub domain: String,
    pub record: Record,
    /// The layer the instance runs on here (its stack's top as mounted).
    pub mounted: LayerId,
    /// Bytes the target needs free: the upper layer and the memory.
    pub need_bytes: u64,
}

/// One migration of a running guest from this host.
pub(crate) struct Migration<H, C, T> {
    hv: Arc<H>,
    changes: C,
    target: T,
    domain: String,
    record: Record,
    mounted: LayerId,
    need_bytes: u64,
    plan: Plan,
    at: Where,
    /// The state file, once the guest is saved.
    state_file: Option<PathBuf>,
}

/// The last pre-copy round's layer, and what it sent.
#[derive(Clone, Copy, Debug)]
struct Last {
    layer: LayerId,
    wire: u64,
}

impl<H, C, T> Migration<H, C, T>
where
    H: LiveMigration + 'static,
    C: Changes,
    T: Target,
{
    pub(crate) fn new(hv: Arc<H>, changes: C, target: T, guest: Guest, plan: Plan) -> Self {
        let Guest { domain, record, mounted, need_bytes } = guest;
        Self { hv, changes, target, domain, record, mounted, need_bytes, plan, at: Where::Running, state_file: None }
    }

    /// Runs every phase; on a failure, [`Migration::fail`] decides where the
    /// guest runs and the error names the phase.
    pub(crate) async fn run(mut self) -> Result<MigrationReport> {
        let t0 = Instant::now();
        let name = self.record.name.clone();
        let mut phases = Vec::new();

        note(format!("{name}: prepare: {} fetches the stack", self.plan.to));
        let prepare = match self.prepare().await {
            Ok(r) => r,
            Err(e) => return Err(self.fail(Phase::Prepare, e).await),
        };
        let prepare_wire = match &prepare {
            PhaseReport::Prepare { fetch, .. } => fetch.wire_bytes,
            _ => 0,
        };
        phases.push(prepare);

        let (pre_copy, last) = match self.pre_copy().await {
            Ok(r) => r,
            Err(e) => return Err(self.fail(Phase::PreCopy, e).await),
        };
        let pre_wire = match &pre_copy {
            PhaseReport::PreCopy { wire_bytes, .. } => *wire_bytes,
            _ => 0,
        };
        phases.push(pre_copy);

        note(format!("{name}: stop-and-copy: {} the guest", if self.plan.cold { "stopping" } else { "saving" }));
        let stopped = match self.stop_and_copy(last).await {
            Ok(r) => r,
            Err(e) => return Err(self.fail(Phase::StopAndCopy, e).await),
        };

        note(format!("{name}: resume on {}", self.plan.to));
        let t = Instant::now();
        let reply = match self.resume(stopped.layer, stopped.state).await {
            Ok(r) => r,
            Err(e) => return Err(self.fail(Phase::Resume, e).await),
        };
        // The guest was down from the save's start, or (saved live) from
        // the hypervisor's last round on.
        let downtime = match stopped.save_down {
            Some(q) => q.as_secs_f64() + stopped.t_stopped.elapsed().as_secs_f64(),
            None => stopped.t_down.elapsed().as_secs_f64(),
        };
        let stop_wire = stopped.upper.wire_bytes;
        phases.push(PhaseReport::StopAndCopy {
            seconds: stopped.copy_seconds,
            save_seconds: stopped.save_seconds,
            save_downtime_seconds: stopped.save_down.map(|q| q.as_secs_f64()),
            wire_bytes: stop_wire,
            upper: stopped.upper,
            layer: stopped.layer,
            state: stopped.state,
        });
        phases.push(PhaseReport::Resume {
            seconds: t.elapsed().as_secs_f64(),
            target_seconds: reply.resume_seconds,
            target_steps: reply.instance.steps.clone(),
        });

        let t = Instant::now();
        if let Err(e) = self.clean_up().await {
            return Err(self.fail(Phase::CleanUp, e).await);
        }
        phases.push(PhaseReport::CleanUp { seconds: t.elapsed().as_secs_f64() });
        Ok(MigrationReport {
            instance: name,
            to: self.plan.to.clone(),
            cold: self.plan.cold,
            live: stopped.live && self.plan.save != SaveMode::Stopped,
            layer: stopped.layer,
            precopy_level: (!self.plan.cold).then(|| match self.plan.level.unwrap_or(PRECOPY_CODEC) {
                Dense::Zstd(level) => Value::from(level),
                Dense::Ppmd => Value::from("ppmd"),
            }),
            port: reply.instance.port,
            wire_bytes: prepare_wire + pre_wire + stop_wire,
            downtime_seconds: downtime,
            total_seconds: t0.elapsed().as_secs_f64(),
            phases,
        })
    }

    /// The target checks trust, name and space, and fetches the stack.
    async fn prepare(&mut self) -> Result<PhaseReport> {
        let t = Instant::now();
        let fetch = self.target.prepare(&self.record, self.mounted, self.need_bytes).await?;
        Ok(PhaseReport::Prepare { seconds: t.elapsed().as_secs_f64(), fetch })
    }

    /// Commits what the guest writes and has the target fetch it, while it
    /// runs, until a round sends little or no less than the one before;
    /// then the target stages the guest on the last round's layer.
    async fn pre_copy(&mut self) -> Result<(PhaseReport, Option<Last>)> {
        let t = Instant::now();
        let name = self.record.name.clone();
        let mut rounds = Vec::new();
        let mut last: Option<Last> = None;
        for round in 0..MAX_ROUNDS {
            let c = self.changes.commit(round == 0).await?;
            let fetch = if last.is_some_and(|l| l.layer == c.layer) {
                FetchReply::default()
            } else {
                // The page hashes come up to date while the target fetches.
                let (target, changes) = (&self.target, &mut self.changes);
                let (rep, indexed) =
                    tokio::join!(target.sync(c.layer, false, self.plan.level), changes.index_pages(c.layer));
                indexed.map_err(|e| e.context("hashing the pages of the instance's files"))?;
                rep?
            };
            note(format!("{name}: pre-copy round {round}: {:.1} MiB sent", fetch.wire_bytes as f64 / (1 << 20) as f64));
            let wire = fetch.wire_bytes;
            rounds.push(Round {
                round,
                layer: c.layer,
                blocks_written: c.blocks_written,
                bytes_read: c.bytes_read,
                fetch,
            });
            let shrinking = last.is_none_or(|l| wire < l.wire);
            last = Some(Last { layer: c.layer, wire });
            if round > 0 && (wire < CONVERGED || !shrinking) {
                break;
            }
        }
        let wire_bytes = rounds.iter().map(|r| r.fetch.wire_bytes).sum();
        let stage = match (self.plan.cold, last) {
            (false, Some(l)) => Some(self.stage(l.layer).await?),
            _ => None,
        };
        Ok((PhaseReport::PreCopy { seconds: t.elapsed().as_secs_f64(), wire_bytes, rounds, stage }, last))
    }

    /// The target mounts `layer` and starts the guest's QEMU on it, waiting
    /// for its state, so that after the stop it only loads it. A target
    /// that cannot (it says so) restores the usual way: that is no failure.
    async fn stage(&mut self, layer: LayerId) -> Result<Value> {
        let t = Instant::now();
        let name = &self.record.name;
        let unstaged = |e: Error| {
            note(format!("{name}: the target restores the guest after the stop: it could not stage it ({e:#})"));
            serde_json::json!({ "seconds": t.elapsed().as_secs_f64(), "error": format!("{e:#}") })
        };
        let (hv, dom) = (self.hv.clone(), self.domain.clone());
        match blocking(move || Ok(hv.migratable_xml(&dom)?)).await {
            Err(e) => Ok(unstaged(e.context("reading the domain's XML"))),
            Ok(xml) => match self.target.stage(layer, &self.record, xml).await {
                Ok(v) => Ok(serde_json::json!({ "seconds": t.elapsed().as_secs_f64(), "target": v })),
                Err(e @ Error::TargetRefused(_)) => Ok(unstaged(e)),
                Err(e) => Err(e),
            },
        }
    }

    /// Stops the guest (saves it, or shuts it down when cold), commits its
    /// last writes, stores its state and has the target fetch both.
    async fn stop_and_copy(&mut self, last: Option<Last>) -> Result<Stopped> {
        let t_down = Instant::now();
        // Saved through the hypervisor's migration (live, or paused for
        // --save), the state's page delta is encoded as it is written,
        // against the last pre-copy round's files (which the target holds).
        let follow = !self.plan.cold && last.is_some();
        let (file, done) = self.changes.begin_save(follow);
        self.state_file = Some(file.clone());
        let stopped = if self.plan.cold {
            let (hv, dom) = (self.hv.clone(), self.domain.clone());
            blocking(move || Ok(hv.stop(&dom, Duration::from_secs(30))?)).await.map(|_| None)
        } else {
            save_guest(&self.hv, &self.domain, &file, self.plan.save, Some(done.clone())).await
        };
        done.store(true, Ordering::Release);
        let save_down = match stopped {
            Ok(d) => d,
            Err(e) => {
                self.changes.settle().await;
                return Err(e);
            }
        };
        // Saved live, the guest is all in the file and its QEMU paused,
        // still holding its memory and host ports: it is powered off in
        // clean-up, after the target runs the guest.
        let live = save_down.is_some();
        self.at = Where::Stopped { live };
        let save_seconds = t_down.elapsed().as_secs_f64();
        let t_stopped = Instant::now();
        let t = Instant::now();
        let r = self.final_copy(live).await;
        self.changes.settle().await;
        let (layer, state, upper) = r?;
        Ok(Stopped {
            layer,
            state,
            upper,
            live,
            save_down,
            save_seconds,
            copy_seconds: t.elapsed().as_secs_f64(),
            t_down,
            t_stopped,
        })
    }

    /// Stop-and-copy with the guest stopped: the last commit, the state
    /// layer, both fetched by the target at once.
    async fn final_copy(&mut self, live: bool) -> Result<(LayerId, Option<LayerId>, FinalCopy)> {
        let c = self.changes.commit(false).await?;
        let t_state = Instant::now();
        let state =
            if self.plan.cold { StateLayer::default() } else { self.changes.state_layer(live, c.layer).await? };
        let state_seconds = t_state.elapsed().as_secs_f64();
        let t_send = Instant::now();
        let target = &self.target;
        let (upper, state_rep) = tokio::join!(target.sync(c.layer, true, None), async {
            match state.layer {
                Some(s) => target.sync(s, true, None).await.map(Some),
                None => Ok(None),
            }
        });
        let mut wire = upper?;
        if let Some(s) = state_rep? {
            wire.add(&s);
        }
        Ok((
            c.layer,
            state.layer,
            FinalCopy {
                blocks_written: c.blocks_written,
                bytes_read: c.bytes_read,
                wire_bytes: wire.wire_bytes,
                state_pages: state.pages,
                state_seconds,
                state_encoded_live: state.encoded_live,
                send_seconds: t_send.elapsed().as_secs_f64(),
            },
        ))
    }

    /// The target runs the guest (the commit point is its restore).
    async fn resume(&mut self, layer: LayerId, state: Option<LayerId>) -> Result<ResumeReply> {
        let mut restoring = false;
        let r = self.target.resume(layer, state, &self.record, &mut restoring).await;
        // Silent or gone while restoring, the target may run the guest; a
        // target that answers that the restore failed has undone it.
        if r.is_ok() || (restoring && !matches!(r, Err(Error::TargetRefused(_)))) {
            self.at = Where::Target;
        }
        r
    }

    /// Powers the guest off here and removes the instance.
    async fn clean_up(&mut self) -> Result<()> {
        let (hv, dom) = (self.hv.clone(), self.domain.clone());
        blocking(move || match hv.destroy(&dom) {
            Ok(()) | Err(xenod_deployer::Error::NoSuchDomain { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        })
        .await?;
        self.changes.remove_instance().await
    }

    /// The one failure policy: undoes what `phase` left and says where the
    /// guest runs now.
    async fn fail(&mut self, phase: Phase, e: Error) -> Error {
        let guest = match (phase, self.at) {
            (Phase::CleanUp, _) => {
                "the guest runs on the target; remove what is left here with `xenod destroy`".to_string()
            }
            (_, Where::Target) => {
                let kept = self.changes.keep_state();
                let name = &self.record.name;
                format!(
                    "the target was restoring the guest when it stopped answering, so it may run there: \
                     check `xenod ps` on the target; the state is kept here ({}), and `xenod resume {name}` \
                     brings it back here if it does not run there",
                    kept.display()
                )
            }
            (Phase::Prepare, _) => "the guest keeps running here".to_string(),
            (_, Where::Running) => {
                self.target.abort(&self.record.name).await;
                if phase == Phase::StopAndCopy { "the guest was not stopped" } else { "the guest keeps running here" }
                    .to_string()
            }
            (_, Where::Stopped { live }) => {
                self.target.abort(&self.record.name).await;
                match self.revive(live).await {
                    Ok(()) => {
                        self.at = Where::Running;
                        "the guest runs here again".to_string()
                    }
                    Err(e) => {
                        format!("bringing the guest back here failed too ({e:#}); `xenod resume` or `xenod start` it")
                    }
                }
            }
        };
        Error::Migration { phase, guest, source: Box::new(e) }
    }

    /// Brings the stopped guest back here: started again (cold), unpaused
    /// (saved live), else restored from its state file.
    async fn revive(&mut self, live: bool) -> Result<()> {
        let (hv, dom, cold) = (self.hv.clone(), self.domain.clone(), self.plan.cold);
        let file = self.state_file.clone();
        blocking(move || {
            if cold {
                hv.start(&dom)?;
                return Ok(());
            }
            let file = file.ok_or_else(|| Error::msg("no state file to restore from"))?;
            if live && hv.resume(&dom).is_ok() {
                // Saved live, its QEMU was only paused.
            } else {
                if live {
                    hv.kill(&dom)?;
                }
                hv.restore(&file)?;
            }
            let _ = std::fs::remove_file(&file);
            Ok(())
        })
        .await
    }
}

/// Stop-and-copy's outcome, reported once the target resumed.
struct Stopped {
    layer: LayerId,
    state: Option<LayerId>,
    upper: FinalCopy,
    live: bool,
    /// Saved through the hypervisor's migration: how long the guest had
    /// been stopped when the save returned.
    save_down: Option<Duration>,
    save_seconds: f64,
    copy_seconds: f64,
    t_down: Instant,
    t_stopped: Instant,
}

pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await?
}

/// Saves guest `dom` to `file` as `mode` says. `Some(stopped for)` when
/// saved through the hypervisor's own migration (its QEMU then stays
/// paused: unpause or power it off), `None` when saved by libvirt (the
/// domain is shut off). `live_done` is set once the save is over.
pub(crate) async fn save_guest<H: LiveMigration + 'static>(
    hv: &Arc<H>,
    dom: &str,
    file: &Path,
    mode: SaveMode,
    live_done: Option<Arc<AtomicBool>>,
) -> Result<Option<Duration>> {
    let (hv, dom, f) = (hv.clone(), dom.to_owned(), file.to_path_buf());
    blocking(move || {
        let r = hv.save_live(&dom, &f, mode == SaveMode::Stopped);
        if let Some(d) = live_done {
            d.store(true, Ordering::Release);
        }
        match r {
            Ok(down) => return Ok(Some(down)),
            Err(e) if mode != SaveMode::Live => {
                tracing::info!("{dom}: not saved through QEMU ({e}); saving it by libvirt")
            }
            Err(e) => return Err(e.into()),
        }
        hv.save(&dom, &f)?;
        Ok(None)
    })
    .await
}

/// The policy driven through a fake hypervisor, fake changes and a fake
/// target, with a failure injected in each phase: afterwards the guest runs
/// on exactly one host, the right one, and the error names the phase.
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use xenod_deployer::fake::FakeHypervisor;
    use xenod_store::ChunkId;

    use super::*;

    const DOM: &str = "web";

    /// Fails the named step once.
    #[derive(Default)]
    struct Faults(Mutex<Vec<&'static str>>);

    impl Faults {
        fn check(&self, step: &'static str) -> Result<()> {
            let mut f = self.0.lock().unwrap();
            match f.iter().position(|s| *s == step) {
                Some(i) => {
                    f.remove(i);
                    Err(Error::msg(format!("injected: {step}")))
                }
                None => Ok(()),
            }
        }
    }

    struct FakeChanges {
        dir: tempfile::TempDir,
        commits: u64,
        faults: Arc<Faults>,
        kept: Arc<Mutex<Option<PathBuf>>>,
        removed: Arc<AtomicBool>,
    }

    impl Changes for FakeChanges {
        async fn commit(&mut self, _full: bool) -> Result<Commit> {
            self.faults.check("commit")?;
            self.commits += 1;
            // Three rounds that send less each time, then the same layer.
            let n = self.commits.min(4);
            Ok(Commit { layer: ChunkId::of(&n.to_le_bytes()), blocks_written: 10 / n, bytes_read: 0 })
        }
        async fn index_pages(&mut self, _layer: LayerId) -> Result<()> {
            self.faults.check("index_pages")
        }
        fn begin_save(&mut self, _follow: bool) -> (PathBuf, Arc<AtomicBool>) {
            (self.dir.path().join("state.save"), Arc::new(AtomicBool::new(false)))
        }
        async fn state_layer(&mut self, _live: bool, _commit: LayerId) -> Result<StateLayer> {
            self.faults.check("state_layer")?;
            Ok(StateLayer { layer: Some(ChunkId::of(b"state")), pages: None, encoded_live: false })
        }
        async fn settle(&mut self) {}
        fn keep_state(&mut self) -> PathBuf {
            let p = self.dir.path().join("kept.save");
            *self.kept.lock().unwrap() = Some(p.clone());
            p
        }
        async fn remove_instance(&mut self) -> Result<()> {
            self.faults.check("remove_instance")?;
            self.removed.store(true, Ordering::SeqCst);
            Ok(())
        }
    }

    /// How the fake target answers the resume.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Resume {
        Runs,
        /// Refuses before it restores anything.
        Refuses,
        /// Says it restores, then that the restore failed (and was undone).
        RefusesRestoring,
        /// Says it restores, then goes silent: it runs the guest.
        SilentRestoring,
    }

    struct FakeTarget {
        faults: Arc<Faults>,
        resume: Resume,
        /// Sync replies' wire bytes, round by round.
        wire: Mutex<Vec<u64>>,
        runs: Arc<AtomicBool>,
        aborted: Arc<AtomicBool>,
        stage_refused: bool,
    }

    impl Target for FakeTarget {
        async fn prepare(&mut self, _r: &Record, _m: LayerId, _n: u64) -> Result<FetchReply> {
            self.faults.check("prepare")?;
            Ok(FetchReply { wire_bytes: 100, ..FetchReply::default() })
        }
        async fn sync(&self, layer: LayerId, last: bool, _level: Option<Dense>) -> Result<FetchReply> {
            self.faults.check(if last { "sync-last" } else { "sync" })?;
            let w = self.wire.lock().unwrap().pop().unwrap_or(1);
            Ok(FetchReply { layer: Some(layer), wire_bytes: w, ..FetchReply::default() })
        }
        async fn stage(&self, _l: LayerId, _r: &Record, xml: String) -> Result<Value> {
            assert!(xml.contains(DOM), "the domain's XML is sent: {xml}");
            if self.stage_refused {
                return Err(Error::TargetRefused("cannot stage here".into()));
            }
            self.faults.check("stage")?;
            Ok(Value::from("staged"))
        }
        async fn resume(
            &self,
            layer: LayerId,
            _s: Option<LayerId>,
            r: &Record,
            restoring: &mut bool,
        ) -> Result<ResumeReply> {
            match self.resume {
                Resume::Refuses => return Err(Error::TargetRefused("no room".into())),
                Resume::RefusesRestoring => {
                    *restoring = true;
                    return Err(Error::TargetRefused("restore failed".into()));
                }
                Resume::SilentRestoring => {
                    *restoring = true;
                    self.runs.store(true, Ordering::SeqCst);
                    return Err(Error::msg("the target went silent for 20 s"));
                }
                Resume::Runs => {}
            }
            self.runs.store(true, Ordering::SeqCst);
            let instance = Adopted {
                name: r.name.clone(),
                domain: DOM.into(),
                layer,
                port: Some(8080),
                staged: true,
                bytes_written: None,
                steps: BTreeMap::new(),
            };
            Ok(ResumeReply { fetch: FetchReply::default(), instance, resume_seconds: 0.1 })
        }
        async fn abort(&self, _instance: &str) {
            self.aborted.store(true, Ordering::SeqCst);
        }
    }

    struct Case {
        hv: Arc<FakeHypervisor>,
        runs_there: Arc<AtomicBool>,
        aborted: Arc<AtomicBool>,
        kept: Arc<Mutex<Option<PathBuf>>>,
        removed: Arc<AtomicBool>,
        result: Result<MigrationReport>,
    }

    impl Case {
        fn runs_here(&self) -> bool {
            self.hv.is_running(DOM)
        }
        fn runs_there(&self) -> bool {
            self.runs_there.load(Ordering::SeqCst)
        }
        /// The guest runs on exactly one host: here or there.
        fn runs_only(&self, here: bool) {
            assert_eq!((self.runs_here(), self.runs_there()), (here, !here), "{:?}", self.result.as_ref().err());
        }
        fn phase(&self) -> (Phase, String) {
            match &self.result {
                Err(Error::Migration { phase, .. }) => (*phase, format!("{:#}", self.result.as_ref().unwrap_err())),
                Err(e) => panic!("not a migration error: {e:#}"),
                Ok(_) => panic!("the migration succeeded"),
            }
        }
    }

    /// A target whose pre-copy rounds send 64, 8, then 1 MiB.
    fn fake_target(
        faults: Arc<Faults>,
        resume: Resume,
        runs: &Arc<AtomicBool>,
        aborted: &Arc<AtomicBool>,
    ) -> FakeTarget {
        FakeTarget {
            faults,
            resume,
            wire: Mutex::new(vec![1 << 20, 8 << 20, 64 << 20]),
            runs: Arc::clone(runs),
            aborted: Arc::clone(aborted),
            stage_refused: false,
        }
    }

    /// The default plan (live where it can be), changed by `f`.
    fn plan_with(f: impl FnOnce(&mut Plan)) -> Plan {
        let mut p = Plan { to: "target".into(), cold: false, save: SaveMode::Auto, level: None };
        f(&mut p);
        p
    }

    fn guest() -> Guest {
        Guest { domain: DOM.into(), record: record(), mounted: ChunkId::of(b"top"), need_bytes: 0 }
    }

    fn record() -> Record {
        Record {
            name: "web".into(),
            top: ChunkId::of(b"top"),
            layer: ChunkId::of(b"layer"),
            root: xenod_deployer::RootMode::Disk,
            ports: vec![],
            spec: None,
            source_dir: PathBuf::from("/nonexistent"),
            net: None,
            owner: None,
        }
    }

    async fn run(
        faults: &[&'static str],
        hv_faults: &[&'static str],
        resume: Resume,
        plan: impl FnOnce(&mut Plan),
    ) -> Case {
        let hv = Arc::new(FakeHypervisor::with_running(DOM));
        for f in hv_faults {
            hv.fail(f);
        }
        let faults = Arc::new(Faults(Mutex::new(faults.to_vec())));
        let (runs_there, aborted, removed) = Default::default();
        let kept = Arc::new(Mutex::new(None));
        let changes = FakeChanges {
            dir: tempfile::tempdir().unwrap(),
            commits: 0,
            faults: faults.clone(),
            kept: kept.clone(),
            removed: Arc::clone(&removed),
        };
        let target = fake_target(faults, resume, &runs_there, &aborted);
        let m = Migration::new(hv.clone(), changes, target, guest(), plan_with(plan));
        let result = m.run().await;
        Case { hv, runs_there, aborted, kept, removed, result }
    }

    async fn ok(plan: impl FnOnce(&mut Plan)) -> Case {
        run(&[], &[], Resume::Runs, plan).await
    }

    #[tokio::test]
    async fn a_migration_moves_the_guest_and_reports_every_phase() {
        let c = ok(|_| {}).await;
        c.runs_only(false);
        assert!(c.removed.load(Ordering::SeqCst), "the instance is removed here");
        assert!(!c.aborted.load(Ordering::SeqCst));
        let r = c.result.as_ref().unwrap();
        let names: Vec<&str> = r
            .phases
            .iter()
            .map(|p| match p {
                PhaseReport::Prepare { .. } => "prepare",
                PhaseReport::PreCopy { .. } => "pre-copy",
                PhaseReport::StopAndCopy { .. } => "stop-and-copy",
                PhaseReport::Resume { .. } => "resume",
                PhaseReport::CleanUp { .. } => "clean-up",
            })
            .collect();
        assert_eq!(names, ["prepare", "pre-copy", "stop-and-copy", "resume", "clean-up"]);
        // Rounds of 64, 8, 1 MiB: the third is under CONVERGED.
        let PhaseReport::PreCopy { rounds, wire_bytes, stage, .. } = &r.phases[1] else { unreachable!() };
        assert_eq!(rounds.len(), 3);
        assert_eq!(*wire_bytes, 73 << 20);
        assert_eq!(stage.as_ref().unwrap()["target"], "staged");
        assert_eq!(r.wire_bytes, 100 + (73 << 20) + 1 + 1, "prepare + pre-copy + both final syncs");
        assert!(r.live && r.port == Some(8080));
        let v = serde_json::to_value(r).unwrap();
        assert_eq!(v["phases"][4]["phase"], "clean-up");
        assert_eq!(v["layer"].as_str().map(str::len), Some(64), "ids as hex: {v}");
    }

    #[tokio::test]
    async fn a_failed_prepare_leaves_the_guest_here_untouched() {
        let c = run(&["prepare"], &[], Resume::Runs, |_| {}).await;
        let (phase, msg) = c.phase();
        assert_eq!(phase, Phase::Prepare);
        assert!(msg.contains("injected: prepare") && msg.contains("keeps running here"), "{msg}");
        c.runs_only(true);
        assert!(!c.hv.calls().iter().any(|op| op.starts_with("save")), "nothing was saved");
    }

    #[tokio::test]
    async fn a_failure_in_pre_copy_aborts_the_target_and_leaves_the_guest_here() {
        for fault in ["sync", "commit", "index_pages", "stage"] {
            let c = run(&[fault], &[], Resume::Runs, |_| {}).await;
            let (phase, msg) = c.phase();
            assert_eq!(phase, Phase::PreCopy, "{fault}");
            assert!(msg.contains("keeps running here"), "{fault}: {msg}");
            assert!(c.aborted.load(Ordering::SeqCst), "{fault}: the target forgets the guest");
            c.runs_only(true);
        }
    }

    #[tokio::test]
    async fn a_target_that_cannot_stage_restores_after_the_stop() {
        let hv = Arc::new(FakeHypervisor::with_running(DOM));
        let runs = Arc::new(AtomicBool::new(false));
        let target = FakeTarget {
            faults: Default::default(),
            resume: Resume::Runs,
            wire: Mutex::new(vec![]),
            runs: runs.clone(),
            aborted: Default::default(),
            stage_refused: true,
        };
        let changes = FakeChanges {
            dir: tempfile::tempdir().unwrap(),
            commits: 0,
            faults: Default::default(),
            kept: Default::default(),
            removed: Default::default(),
        };
        let plan = Plan { to: "t".into(), cold: false, save: SaveMode::Auto, level: None };
        let r = Migration::new(hv.clone(), changes, target, guest(), plan).run().await.unwrap();
        let PhaseReport::PreCopy { stage, .. } = &r.phases[1] else { unreachable!() };
        assert!(stage.as_ref().unwrap()["error"].as_str().unwrap().contains("cannot stage"));
        assert!(runs.load(Ordering::SeqCst) && !hv.is_running(DOM));
    }

    #[tokio::test]
    async fn a_failed_save_leaves_the_guest_running_here() {
        // --live insists on a live save: its failure stops nothing.
        let c = run(&[], &["save_live"], Resume::Runs, |p| p.save = SaveMode::Live).await;
        let (phase, msg) = c.phase();
        assert_eq!(phase, Phase::StopAndCopy);
        assert!(msg.contains("was not stopped"), "{msg}");
        assert!(c.aborted.load(Ordering::SeqCst));
        c.runs_only(true);
    }

    #[tokio::test]
    async fn a_failure_after_the_stop_revives_the_guest_here() {
        // Saved live (paused), saved by libvirt (shut off), shut down (cold).
        type How = (&'static str, fn(&mut Plan), &'static [&'static str]);
        let plans: [How; 3] = [
            ("live", |_| {}, &[]),
            ("saved", |p| p.save = SaveMode::Stopped, &["save_live"]),
            ("cold", |p| p.cold = true, &[]),
        ];
        for (how, plan, hv_faults) in plans {
            for fault in ["sync-last", "commit-last", "state_layer"] {
                if how == "cold" && fault == "state_layer" {
                    continue;
                }
                // The last commit is the fourth (three pre-copy rounds).
                let faults: &[&'static str] = if fault == "commit-last" { &[] } else { &[fault] };
                let c = if fault == "commit-last" {
                    run_with_commit_fault(hv_faults, plan).await
                } else {
                    run(faults, hv_faults, Resume::Runs, plan).await
                };
                let (phase, msg) = c.phase();
                assert_eq!(phase, Phase::StopAndCopy, "{how} {fault}");
                assert!(msg.contains("runs here again"), "{how} {fault}: {msg}");
                assert!(c.aborted.load(Ordering::SeqCst));
                c.runs_only(true);
            }
        }
    }

    /// A run whose commit fails only in stop-and-copy.
    async fn run_with_commit_fault(hv_faults: &[&'static str], plan: fn(&mut Plan)) -> Case {
        let hv = Arc::new(FakeHypervisor::with_running(DOM));
        for f in hv_faults {
            hv.fail(f);
        }
        let faults: Arc<Faults> = Default::default();
        let (runs_there, aborted, removed) = Default::default();
        let changes = FakeChanges {
            dir: tempfile::tempdir().unwrap(),
            commits: 0,
            faults: faults.clone(),
            kept: Default::default(),
            removed: Arc::clone(&removed),
        };
        // The target asks for the fault once pre-copy is over: at staging,
        // or (cold) at the last pre-copy sync.
        struct Arming(FakeTarget, Arc<Faults>);
        impl Target for Arming {
            async fn prepare(&mut self, r: &Record, m: LayerId, n: u64) -> Result<FetchReply> {
                self.0.prepare(r, m, n).await
            }
            async fn sync(&self, l: LayerId, last: bool, lv: Option<Dense>) -> Result<FetchReply> {
                let r = self.0.sync(l, last, lv).await;
                if !last && self.0.wire.lock().unwrap().is_empty() {
                    self.1.0.lock().unwrap().push("commit");
                }
                r
            }
            async fn stage(&self, l: LayerId, r: &Record, x: String) -> Result<Value> {
                self.0.stage(l, r, x).await
            }
            async fn resume(
                &self,
                l: LayerId,
                s: Option<LayerId>,
                r: &Record,
                restoring: &mut bool,
            ) -> Result<ResumeReply> {
                self.0.resume(l, s, r, restoring).await
            }
            async fn abort(&self, i: &str) {
                self.0.abort(i).await
            }
        }
        let target = fake_target(Default::default(), Resume::Runs, &runs_there, &aborted);
        let m = Migration::new(hv.clone(), changes, Arming(target, faults), guest(), plan_with(plan));
        let result = m.run().await;
        Case { hv, runs_there, aborted, kept: Default::default(), removed, result }
    }

    #[tokio::test]
    async fn a_refused_resume_revives_the_guest_here() {
        for resume in [Resume::Refuses, Resume::RefusesRestoring] {
            let c = run(&[], &[], resume, |_| {}).await;
            let (phase, msg) = c.phase();
            assert_eq!(phase, Phase::Resume, "{resume:?}");
            assert!(msg.contains("runs here again"), "{resume:?}: {msg}");
            c.runs_only(true);
            assert!(c.kept.lock().unwrap().is_none());
        }
    }

    #[tokio::test]
    async fn a_target_silent_while_restoring_keeps_the_state_and_runs_nothing_here() {
        let c = run(&[], &[], Resume::SilentRestoring, |_| {}).await;
        let (phase, msg) = c.phase();
        assert_eq!(phase, Phase::Resume);
        assert!(msg.contains("may run there") && msg.contains("xenod resume web"), "{msg}");
        assert!(c.kept.lock().unwrap().is_some(), "the state is kept for `xenod resume`");
        assert!(!c.aborted.load(Ordering::SeqCst), "a target that may run the guest is not told to drop it");
        c.runs_only(false);
    }

    #[tokio::test]
    async fn a_failed_clean_up_leaves_the_guest_on_the_target() {
        for (faults, hv_faults) in [(&["remove_instance"][..], &[][..]), (&[][..], &["undefine"][..])] {
            let c = run(faults, hv_faults, Resume::Runs, |_| {}).await;
            let (phase, msg) = c.phase();
            assert_eq!(phase, Phase::CleanUp);
            assert!(msg.contains("runs on the target") && msg.contains("xenod destroy"), "{msg}");
            c.runs_only(false);
        }
    }

    #[tokio::test]
    async fn when_reviving_fails_too_the_error_says_so() {
        // Saved by libvirt, the final sync fails, and so does the restore.
        let c = run(&["sync-last"], &["save_live", "restore"], Resume::Runs, |p| p.save = SaveMode::Stopped).await;
        let (phase, msg) = c.phase();
        assert_eq!(phase, Phase::StopAndCopy);
        assert!(msg.contains("failed too") && msg.contains("xenod resume"), "{msg}");
        assert!(!c.runs_here() && !c.runs_there(), "nowhere, and the error says what to do");
    }
}
