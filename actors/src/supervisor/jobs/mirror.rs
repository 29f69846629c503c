//! `blockdev-mirror` and the active `block-commit`: both are QEMU's mirror job.
//! A `mirror_top` filter (`bulkhead_block::mirror`) goes above the source; its
//! worker scans, copies dirty chunks to the target and follows guest writes
//! (`Operation::Mirror`); the job is READY once nothing is dirty, and on
//! `job-complete` the filter's users are moved onto the target (the pivot). An
//! active commit is a mirror of the top into its base that copies only what the
//! layers above the base hold, and pivots onto the base. See `design/jobs.md`.

use bulkhead_block::mirror::DEFAULT_GRANULARITY;
use bulkhead_ipc::wire::{OpId, Steer, ToWorker};
use bulkhead_qmp::qapi::types::{BlockdevMirrorArgs, MirrorSyncMode};
use serde_json::{Map, Value};

use super::{Job, JobStatus, Lookup, Verb, Work};
use crate::supervisor::graph::{Driver, Role};
use crate::supervisor::{Core, QmpError, errors};

/// A mirror's (or an active commit's) state in its job.
#[derive(Debug, Clone)]
pub(super) struct MirrorWork {
    /// The node below the filter (an active commit's top).
    pub(super) source: String,
    /// Where the data goes (an active commit's base).
    pub(super) target: String,
    /// The `mirror_top` node.
    pub(super) filter: String,
    /// What the first copy scans: every byte (`Some(0)`), what the `n` topmost
    /// layers hold (`Some(n)`), or nothing (`sync: none`).
    pub(super) scan: Option<u32>,
    /// `copy-mode: write-blocking` (from the start or by `block-job-change`).
    pub(super) write_blocking: bool,
    /// The filter's worker died: its dirty map is gone, so the next copy scans
    /// again (a `sync: none` mirror scans the top layer).
    pub(super) rescan: bool,
    /// How the job ends once nothing is dirty: `Some(true)` with the pivot
    /// (`job-complete`), `Some(false)` without (`block-job-cancel` when ready).
    pub(super) finish: Option<bool>,
    /// Nothing was dirty once: READY has been reported.
    pub(super) ready: bool,
    /// An active commit, with whether its base was read-only before.
    pub(super) commit: Option<bool>,
    /// Why the job fails as soon as it runs (qsd checks sizes in the job).
    pub(super) early_error: Option<String>,
}

impl MirrorWork {
    /// The operation's `scan`.
    pub(super) fn scan_now(&self) -> Option<u32> {
        if self.rescan {
            self.scan.or(Some(1))
        } else {
            self.scan
        }
    }
}

impl Core {
    /// `blockdev-mirror`, checked in qsd's order.
    pub(in crate::supervisor) async fn blockdev_mirror(
        &mut self,
        a: &BlockdevMirrorArgs,
    ) -> Result<(), QmpError> {
        self.mirror_to(a, false).await
    }

    /// A mirror; `new_image`: the target is an image `drive-mirror` just created
    /// (it reads zeroes), so `sync: full` copies only what the source's chain holds.
    pub(super) async fn mirror_to(
        &mut self,
        a: &BlockdevMirrorArgs,
        new_image: bool,
    ) -> Result<(), QmpError> {
        let source = self
            .graph
            .get(&a.device)
            .ok_or_else(|| errors::device_not_found(&a.device, &a.device))?;
        if source.parents > 0 || self.jobs.user_of(&source.name).is_some() {
            return Err(errors::need_root_node());
        }
        let source = source.name.clone();
        let target = self
            .graph
            .get(&a.target)
            .ok_or_else(|| errors::device_not_found(&a.target, &a.target))?
            .name
            .clone();
        let granularity = match a.granularity.map(u64::from) {
            None | Some(0) => DEFAULT_GRANULARITY,
            Some(g) if !(512..=64 << 20).contains(&g) => {
                return Err(errors::mirror_granularity_range());
            }
            Some(g) if !g.is_power_of_two() => return Err(errors::mirror_granularity_power()),
            Some(g) => g,
        };
        if let Some(r) = &a.replaces {
            let n = self
                .graph
                .get(r)
                .ok_or_else(|| errors::replaces_not_found(r))?;
            if n.name != source {
                return Err(errors::replaces_not_source(r, &source));
            }
        }
        let has_backing = self.graph.chain_names(&source).len() > 1;
        let scan = match a.sync {
            MirrorSyncMode::Full if new_image => Some(u32::MAX),
            MirrorSyncMode::Full => Some(0),
            // QEMU: `top` without a backing is `full`.
            MirrorSyncMode::Top => Some(u32::from(has_backing)),
            MirrorSyncMode::None => None,
            MirrorSyncMode::Incremental => {
                return Err(errors::mirror_sync_unsupported("incremental"));
            }
            MirrorSyncMode::Bitmap => return Err(errors::mirror_sync_unsupported("bitmap")),
        };
        if a.buf_size.is_some_and(|b| b < 0) {
            return Err(errors::mirror_buf_size());
        }
        if source == target {
            return Err(errors::mirror_into_itself());
        }
        if let Some(f) = &a.filter_node_name {
            self.check_new_node_name(f)?;
        }
        let job_id = a.job_id.clone().unwrap_or_default();
        if !bulkhead_qmp::qapi::id_wellformed(&job_id) {
            return Err(errors::invalid_job_id(&job_id));
        }
        if self.jobs.get(&job_id).is_some() {
            return Err(errors::job_id_in_use(&job_id));
        }
        let sizes = (
            self.graph.get(&source).map(|n| n.size),
            self.graph.get(&target).map(|n| n.size),
        );
        let work = MirrorWork {
            source,
            target,
            filter: String::new(),
            scan,
            write_blocking: a.copy_mode
                == Some(bulkhead_qmp::qapi::types::MirrorCopyMode::WriteBlocking),
            rescan: false,
            finish: None,
            ready: false,
            commit: None,
            early_error: (sizes.0 != sizes.1)
                .then(|| "Source and target image have different sizes".to_string()),
        };
        let on_error = super::ErrorPolicy::split(a.on_source_error, a.on_target_error);
        self.start_mirror(
            &job_id,
            work,
            a.speed,
            granularity,
            a.filter_node_name.clone(),
            (a.auto_finalize, a.auto_dismiss, on_error),
        )
        .await
    }

    /// `block-commit` of the active layer `top` into `base` (the checks are
    /// `block_commit`'s): a mirror of `top` into `base` over what the `layers`
    /// layers above `base` hold.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn active_commit(
        &mut self,
        job_id: &str,
        top: String,
        base: String,
        layers: u32,
        base_was_read_only: bool,
        speed: Option<i64>,
        flags: (Option<bool>, Option<bool>, super::ErrorPolicy),
        filter_node_name: Option<String>,
    ) -> Result<(), QmpError> {
        let work = MirrorWork {
            source: top,
            target: base,
            filter: String::new(),
            scan: Some(layers.max(1)),
            write_blocking: false,
            rescan: false,
            finish: None,
            ready: false,
            commit: Some(base_was_read_only),
            early_error: None,
        };
        self.start_mirror(
            job_id,
            work,
            speed,
            DEFAULT_GRANULARITY,
            filter_node_name,
            flags,
        )
        .await
    }

    /// Creates the job, puts the filter in and starts the copy.
    async fn start_mirror(
        &mut self,
        job_id: &str,
        work: MirrorWork,
        speed: Option<i64>,
        granularity: u64,
        filter_node_name: Option<String>,
        (auto_finalize, auto_dismiss, on_error): (Option<bool>, Option<bool>, super::ErrorPolicy),
    ) -> Result<(), QmpError> {
        let total = match work.scan {
            Some(0) if work.early_error.is_none() => {
                self.graph.get(&work.source).map_or(0, |n| n.size)
            }
            _ => 0,
        };
        let (source, target, write_blocking) = (
            work.source.clone(),
            work.target.clone(),
            work.write_blocking,
        );
        let commit = work.commit;
        self.jobs.list.insert(
            0,
            Job {
                id: job_id.to_string(),
                status: JobStatus::Created,
                auto_finalize: auto_finalize.unwrap_or(true),
                auto_dismiss: auto_dismiss.unwrap_or(true),
                speed: 0,
                user_paused: false,
                on_error,
                io_status: "ok",
                done: 0,
                total,
                error: None,
                op: None,
                work: Work::Mirror(Box::new(work)),
            },
        );
        self.transition(job_id, JobStatus::Created).await;
        let speed = match u64::try_from(speed.unwrap_or(0)) {
            Ok(s) => s,
            Err(_) => {
                self.transition(job_id, JobStatus::Null).await;
                return Err(errors::speed_negative());
            }
        };
        if let Some(j) = self.jobs.get_mut(job_id) {
            j.speed = speed;
        }
        if let Some(Work::Mirror(m)) = self.jobs.get(job_id).map(|j| &j.work)
            && m.early_error.is_some()
        {
            // The failure comes after the reply, as qsd's job finds it.
            self.transition(job_id, JobStatus::Running).await;
            (self.on_job)(job_id.to_string(), OpId(0));
            return Ok(());
        }
        if commit == Some(true)
            && let Err(e) = self.set_mode(&target, false).await
        {
            self.transition(job_id, JobStatus::Null).await;
            return Err(e);
        }
        let mut members = Map::new();
        members.insert("granularity".into(), granularity.into());
        members.insert("write-blocking".into(), write_blocking.into());
        let inserted = match crate::supervisor::blockdev::internal_spec(
            Driver::MirrorTop,
            filter_node_name,
            members,
            vec![(Role::File, source.clone()), (Role::Target, target.clone())],
        ) {
            // In the source's worker: its copies then read the source (and a
            // target there too) without a hop; it parses nothing untrusted.
            Ok(spec) => match self
                .add_spec(spec, self.graph.get(&source).map(|n| n.home))
                .await
            {
                Ok(f) => match self.insert_filter(&source, &f).await {
                    Ok(()) => Ok(f),
                    Err(e) => {
                        self.destroy(&f).await;
                        Err(e)
                    }
                },
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let filter = match inserted {
            Ok(f) => f,
            Err(e) => {
                if commit == Some(true)
                    && let Err(e) = self.set_mode(&target, true).await
                {
                    tracing::warn!(job = job_id, error = %e.desc, "the commit base stays writable");
                }
                self.transition(job_id, JobStatus::Null).await;
                return Err(e);
            }
        };
        if let Some(Job {
            work: Work::Mirror(m),
            ..
        }) = self.jobs.get_mut(job_id)
        {
            m.filter = filter;
        }
        self.transition(job_id, JobStatus::Running).await;
        self.start_copy(job_id).await;
        Ok(())
    }

    /// The copy has had nothing dirty left: READY, once.
    pub(super) async fn mirror_ready(&mut self, id: &str) {
        let Some(j) = self.jobs.get_mut(id) else {
            return;
        };
        let Work::Mirror(m) = &mut j.work else {
            return;
        };
        if m.ready || j.status != JobStatus::Running {
            return;
        }
        m.ready = true;
        self.transition(id, JobStatus::Ready).await;
        if let Some(j) = self.jobs.get(id) {
            let mut data = j.event_data();
            if let Some(d) = data.as_object_mut() {
                d.remove("error");
            }
            self.emit("BLOCK_JOB_READY", Some(data)).await;
        }
    }

    /// Tells the running copy `steer`, if one runs (a later one is started with
    /// it).
    async fn steer(&mut self, id: &str, steer: Steer) {
        let Some(op) = self.jobs.get(id).and_then(|j| j.op.as_ref()).map(|w| w.op) else {
            return;
        };
        let Some((home, _)) = self.ops.borrow().home(op) else {
            return;
        };
        if let Some(w) = self.running(home)
            && let Err(e) = w.call(ToWorker::SteerOperation { op, steer }, &[]).await
        {
            tracing::debug!(job = id, error = %e, "the mirror's copy was not steered");
        }
    }

    /// `job-complete` of a ready mirror: what is left is copied with guest writes
    /// blocking, then the pivot (events after the reply, as qsd's).
    pub(super) async fn mirror_complete(&mut self, id: &str, pivot: bool) {
        if let Some(Job {
            work: Work::Mirror(m),
            ..
        }) = self.jobs.get_mut(id)
        {
            m.finish.get_or_insert(pivot);
        }
        self.steer(id, Steer::Complete).await;
    }

    /// `block-job-change`: a mirror's copy mode goes from background to
    /// write-blocking (the other way is refused, as in qsd); other jobs take
    /// nothing.
    pub(in crate::supervisor) async fn block_job_change(
        &mut self,
        id: &str,
        write_blocking: bool,
    ) -> Result<(), QmpError> {
        self.check_verb(id, Lookup::BlockJob, Verb::Change)?;
        let Some(Job {
            work: Work::Mirror(m),
            ..
        }) = self.jobs.get_mut(id)
        else {
            return Ok(());
        };
        if m.commit.is_some() || m.write_blocking == write_blocking {
            return Ok(());
        }
        if !write_blocking {
            return Err(errors::copy_mode_change("background"));
        }
        m.write_blocking = true;
        self.steer(id, Steer::WriteBlocking).await;
        Ok(())
    }

    /// A mirror's end: with the pivot, every user of the filter uses the target
    /// from now on (the filter goes); without, they use the source again. An active
    /// commit's base stays writable after its pivot.
    pub(super) async fn finish_mirror(&mut self, m: &MirrorWork) -> Result<(), QmpError> {
        if !self.graph.contains(&m.filter) {
            return Ok(());
        }
        if m.finish == Some(true) {
            self.replace_node(&m.filter, &m.target).await?;
            if self.graph.contains(&m.filter) {
                self.destroy(&m.filter).await;
            }
            self.refresh_format_info().await;
            Ok(())
        } else {
            self.remove_filter(&m.filter).await
        }
    }

    /// `query-block-jobs`' mirror members.
    pub(super) fn mirror_info(m: &MirrorWork, info: &mut Map<String, Value>) {
        info.insert("ready".into(), m.ready.into());
        if m.commit.is_none() {
            info.insert(
                "actively-synced".into(),
                (m.write_blocking && m.ready).into(),
            );
        }
    }

    /// A mirror that failed as it ran (sizes): aborting, `BLOCK_JOB_COMPLETED`
    /// with the error, as qsd (no `BLOCK_JOB_ERROR`: nothing was copied).
    pub(super) async fn mirror_early_failure(&mut self, id: &str, error: String) {
        if let Some(j) = self.jobs.get_mut(id) {
            j.error = Some(error);
        }
        self.transition(id, JobStatus::Aborting).await;
        self.conclude(id, "BLOCK_JOB_COMPLETED").await;
    }
}
