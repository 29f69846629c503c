//! Block jobs: the job state machine as qsd's (`job.c`), the job commands and
//! events, `block-commit` of an intermediate layer, backup, stream and create;
//! mirror and the active commit are in `mirror`.
//!
//! Runs in the supervisor. A job's data moves in the job runner worker as a long
//! operation (`ops`, `worker/jobs.rs`); the job itself (status, verbs, events,
//! pause count, speed, progress, the graph change at the end) lives here. Pausing
//! stops the operation and resuming starts a new one where it stopped; a job runner
//! that dies has its operation failed, and the job starts a new one from the last
//! progress it saw (a commit's copy may repeat a piece, which writes the same
//! bytes again). See `design/jobs.md`.

use std::rc::Rc;
use std::time::Duration;

use bulkhead_ipc::wire::{NodeRef, OpId, Operation, ToWorker, WorkerId, WorkerKind};
use bulkhead_qmp::qapi::types::{
    BitmapSyncMode, BlockCommitArgs, BlockStreamArgs, BlockdevBackupArgs, BlockdevOnError,
    MirrorSyncMode,
};
use bulkhead_qmp::request::ErrorClass;
use serde_json::{Map, Value, json};

/// QAPI's name of a `MirrorSyncMode`.
fn sync_name(sync: MirrorSyncMode) -> &'static str {
    match sync {
        MirrorSyncMode::Full => "full",
        MirrorSyncMode::Top => "top",
        MirrorSyncMode::None => "none",
        MirrorSyncMode::Incremental => "incremental",
        MirrorSyncMode::Bitmap => "bitmap",
    }
}

/// The `strerror` text of an I/O error (QEMU's messages embed it).
fn strerror_of(e: &std::io::Error) -> String {
    e.raw_os_error()
        .map_or_else(|| e.to_string(), super::strerror)
}

use super::graph::Driver;
use super::ops::{OpError, OpWatch};
use super::{Core, QmpError, errors};

mod drive;
mod mirror;
use mirror::MirrorWork;

/// How long a job's copy may make no progress before it fails (a speed limit of a
/// few bytes a second still makes progress at least every chunk).
const STALL: Duration = Duration::from_secs(120);
/// A ready mirror copies only when guests write, however long that takes.
const MIRROR_STALL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Failures in a row, with no progress between them, that `on-*-error: ignore`
/// goes on after; the next one is reported (a lasting error must not spin).
const IGNORE_LIMIT: u32 = 16;
/// How long pausing or cancelling waits for the copy to stop.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// `JobStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

impl JobStatus {
    fn as_str(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }
}

/// `JobVerb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Cancel,
    Pause,
    Resume,
    SetSpeed,
    Change,
    Complete,
    Finalize,
    Dismiss,
}

impl Verb {
    fn as_str(self) -> &'static str {
        match self {
            Verb::Cancel => "cancel",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::SetSpeed => "set-speed",
            Verb::Change => "change",
            Verb::Complete => "complete",
            Verb::Finalize => "finalize",
            Verb::Dismiss => "dismiss",
        }
    }

    /// QEMU's `JobVerbTable`.
    fn allowed(self, s: JobStatus) -> bool {
        use JobStatus::*;
        match self {
            Verb::Cancel => matches!(
                s,
                Created | Running | Paused | Ready | Standby | Waiting | Pending
            ),
            Verb::Pause | Verb::Resume | Verb::SetSpeed | Verb::Change => {
                matches!(s, Created | Running | Paused | Ready | Standby)
            }
            Verb::Complete => matches!(s, Ready | Standby),
            Verb::Finalize => s == Pending,
            Verb::Dismiss => s == Concluded,
        }
    }
}

/// What a job does.
#[derive(Debug, Clone)]
enum Work {
    /// `block-commit` of `top` (and the layers between) into `base`; `overlay` is
    /// the node whose backing `top` is, which gets `base` instead at the end.
    Commit {
        overlay: String,
        top: String,
        base: String,
        /// What the overlay's header will name as its backing file.
        backing_file: String,
        /// The layers from `top` down that move.
        layers: u32,
        /// `base` was read-only and is made writable for the job.
        base_was_read_only: bool,
    },
    /// `blockdev-backup`: a `copy-before-write` filter above `source` saves what
    /// writes overwrite to `target`; the copy saves the rest (`sync` full or top;
    /// none copies nothing and keeps the filter until cancelled: fleecing).
    Backup {
        source: String,
        filter: String,
        sync: BackupSync,
        /// The bitmap the backup takes (frozen during the job) and what becomes
        /// of it.
        bitmap: Option<(String, BitmapSyncMode)>,
    },
    /// `block-stream`: a `copy-on-read` filter above `top` copies into it what the
    /// `layers` layers above `base` hold; then `top` reads `base` (or nothing).
    Stream {
        top: String,
        base: Option<String>,
        filter: String,
        layers: u32,
        backing_file: Option<String>,
    },
    /// `blockdev-create` (or `x-blockdev-amend`, `amend`): done within the
    /// command; `error` is how it ended.
    Create { error: Option<String>, amend: bool },
    /// `blockdev-mirror`, or `block-commit` of the active layer.
    Mirror(Box<MirrorWork>),
}

/// What a backup copies besides what writes overwrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BackupSync {
    Full,
    Top,
    None,
    /// What the frozen bitmap holds (`bitmap`, `incremental`).
    Bitmap,
}

/// A checked `blockdev-backup`: its sync mode and the bitmap it takes.
#[derive(Debug, Clone)]
pub(super) struct CheckedBackup {
    pub(super) sync: BackupSync,
    pub(super) bitmap: Option<(String, BitmapSyncMode)>,
}

/// What a job does when its copy fails: `on-source-error` for a failed read of
/// its source, `on-target-error` for the rest (`on-error` for both where the job
/// has one), as QEMU's `block_job_error_action`.
#[derive(Debug, Clone, Copy)]
pub struct ErrorPolicy {
    source: BlockdevOnError,
    target: BlockdevOnError,
    /// Every failure counts as a read (QEMU's stream reports all as reads).
    always_read: bool,
}

impl ErrorPolicy {
    /// One policy for reads and writes (`on-error`).
    fn both(policy: Option<BlockdevOnError>) -> ErrorPolicy {
        let p = policy.unwrap_or(BlockdevOnError::Report);
        ErrorPolicy {
            source: p,
            target: p,
            always_read: false,
        }
    }

    /// `on-source-error` and `on-target-error`.
    fn split(source: Option<BlockdevOnError>, target: Option<BlockdevOnError>) -> ErrorPolicy {
        ErrorPolicy {
            source: source.unwrap_or(BlockdevOnError::Report),
            target: target.unwrap_or(BlockdevOnError::Report),
            always_read: false,
        }
    }

    /// The policy and `BLOCK_JOB_ERROR`'s `operation` for a failure (`read`: the
    /// copy's source failed).
    fn for_failure(&self, read: bool) -> (BlockdevOnError, &'static str) {
        if read || self.always_read {
            (self.source, "read")
        } else {
            (self.target, "write")
        }
    }
}

/// One job.
#[derive(Debug)]
pub struct Job {
    id: String,
    status: JobStatus,
    auto_finalize: bool,
    auto_dismiss: bool,
    speed: u64,
    /// Pauses the user asked for and has not resumed.
    user_paused: bool,
    on_error: ErrorPolicy,
    /// `io-status`: "ok", or why an error stopped the job ("nospace", "failed").
    io_status: &'static str,
    /// Progress: done and total (the latest the copy reported).
    done: u64,
    total: u64,
    /// Why it failed.
    error: Option<String>,
    /// The copy running now, if any.
    op: Option<OpWatch>,
    work: Work,
}

impl Job {
    fn type_name(&self) -> &'static str {
        match self.work {
            Work::Commit { .. } => "commit",
            Work::Backup { .. } => "backup",
            Work::Create { amend: true, .. } => "amend",
            Work::Create { .. } => "create",
            Work::Stream { .. } => "stream",
            Work::Mirror(ref m) if m.commit.is_some() => "commit",
            Work::Mirror(_) => "mirror",
        }
    }

    /// The nodes the job holds (none of them may be deleted meanwhile).
    fn uses(&self, node: &str) -> bool {
        match &self.work {
            Work::Commit {
                overlay, top, base, ..
            } => [overlay, top, base].iter().any(|n| n.as_str() == node),
            Work::Backup { source, filter, .. } => source == node || filter == node,
            Work::Create { .. } => false,
            Work::Stream {
                top, base, filter, ..
            } => top == node || filter == node || base.as_deref() == Some(node),
            Work::Mirror(m) => [&m.source, &m.target, &m.filter]
                .iter()
                .any(|n| n.as_str() == node),
        }
    }

    /// The latest progress, the running copy's included.
    fn progress(&self) -> (u64, u64) {
        match &self.op {
            Some(w) => {
                let s = w.state.borrow();
                (s.done.max(self.done), s.total.max(self.total))
            }
            None => (self.done, self.total),
        }
    }

    /// `JobInfo`.
    fn job_info(&self) -> Value {
        let (done, total) = self.progress();
        let mut m = Map::new();
        m.insert("id".into(), self.id.clone().into());
        m.insert("type".into(), self.type_name().into());
        m.insert("status".into(), self.status.as_str().into());
        m.insert("current-progress".into(), done.into());
        m.insert("total-progress".into(), total.into());
        if let Some(e) = &self.error {
            m.insert("error".into(), e.clone().into());
        }
        Value::Object(m)
    }

    /// `BlockJobInfo`.
    fn block_job_info(&self) -> Value {
        let (done, total) = self.progress();
        let mut m = Map::new();
        m.insert("type".into(), self.type_name().into());
        m.insert("device".into(), self.id.clone().into());
        m.insert("len".into(), total.into());
        m.insert("offset".into(), done.into());
        m.insert(
            "busy".into(),
            (self.status == JobStatus::Running && self.op.is_some()).into(),
        );
        m.insert(
            "paused".into(),
            matches!(self.status, JobStatus::Paused | JobStatus::Standby).into(),
        );
        m.insert("speed".into(), self.speed.into());
        m.insert("io-status".into(), self.io_status.into());
        m.insert("ready".into(), false.into());
        m.insert("status".into(), self.status.as_str().into());
        m.insert("auto-finalize".into(), self.auto_finalize.into());
        m.insert("auto-dismiss".into(), self.auto_dismiss.into());
        if let Some(e) = &self.error {
            m.insert("error".into(), e.clone().into());
        }
        if let Work::Mirror(w) = &self.work {
            Core::mirror_info(w, &mut m);
        }
        Value::Object(m)
    }

    /// The data of `BLOCK_JOB_COMPLETED` and `BLOCK_JOB_CANCELLED`.
    fn event_data(&self) -> Value {
        let (done, total) = self.progress();
        let mut v = json!({
            "device": self.id, "len": total, "offset": done, "speed": self.speed,
            "type": self.type_name(),
        });
        if let (Some(e), Some(m)) = (&self.error, v.as_object_mut()) {
            m.insert("error".into(), e.clone().into());
        }
        v
    }
}

/// The jobs, newest first (as QEMU lists them).
#[derive(Debug, Default)]
pub struct Jobs {
    list: Vec<Job>,
    /// Targets `drive-backup`/`drive-mirror` created, by job: dropped at its end
    /// unless something uses them then.
    owned: Vec<(String, String)>,
    /// Jobs a `transaction` with `completion-mode: grouped` started, by group: they
    /// complete together, and one failing or cancelled takes the others with it.
    groups: Vec<(String, u64)>,
    next_group: u64,
    /// `on-*-error: ignore`: failures in a row and the progress at the last one.
    ignored: std::collections::HashMap<String, (u32, u64)>,
}

impl Jobs {
    /// The job using `node`, if any (for "busy" errors).
    pub fn user_of(&self, node: &str) -> Option<&'static str> {
        self.list
            .iter()
            .find(|j| j.status != JobStatus::Concluded && j.uses(node))
            .map(Job::type_name)
    }

    /// The other jobs of `id`'s group and itself, newest first (QEMU's order), or
    /// just `id`.
    fn group_of(&self, id: &str) -> Vec<String> {
        match self.groups.iter().find(|(j, _)| j == id).map(|(_, g)| *g) {
            Some(g) => self
                .list
                .iter()
                .filter(|j| self.groups.iter().any(|(m, mg)| *m == j.id && *mg == g))
                .map(|j| j.id.clone())
                .collect(),
            None => vec![id.to_string()],
        }
    }

    /// Puts `ids` in a new group.
    pub(super) fn group(&mut self, ids: &[String]) {
        self.next_group += 1;
        let g = self.next_group;
        self.groups.extend(ids.iter().map(|id| (id.clone(), g)));
    }

    fn get(&self, id: &str) -> Option<&Job> {
        self.list.iter().find(|j| j.id == id)
    }

    fn get_mut(&mut self, id: &str) -> Option<&mut Job> {
        self.list.iter_mut().find(|j| j.id == id)
    }
}

/// How a job command names the job: `job-*` (GenericError "Job not found") or
/// `block-job-*` (DeviceNotActive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// `job-*`.
    Job,
    /// `block-job-*`.
    BlockJob,
}

impl Core {
    fn find_job(&self, id: &str, how: Lookup) -> Result<&Job, QmpError> {
        self.jobs.get(id).ok_or_else(|| match how {
            Lookup::Job => errors::job_not_found(),
            Lookup::BlockJob => errors::block_job_not_found(id),
        })
    }

    fn check_verb(&self, id: &str, how: Lookup, verb: Verb) -> Result<JobStatus, QmpError> {
        let j = self.find_job(id, how)?;
        if !verb.allowed(j.status) {
            return Err(errors::job_verb(id, j.status.as_str(), verb.as_str()));
        }
        Ok(j.status)
    }

    /// Sets a job's status and emits `JOB_STATUS_CHANGE`.
    async fn transition(&mut self, id: &str, status: JobStatus) {
        if let Some(j) = self.jobs.get_mut(id) {
            j.status = status;
        }
        self.emit(
            "JOB_STATUS_CHANGE",
            Some(json!({"status": status.as_str(), "id": id})),
        )
        .await;
        if status == JobStatus::Null {
            self.jobs.list.retain(|j| j.id != id);
        }
    }

    /// `blockdev-backup`, checked in qsd's order. `sync` full, top and none;
    /// bitmaps, compression and the other tuning options are refused for now.
    pub(super) async fn blockdev_backup(&mut self, a: &BlockdevBackupArgs) -> Result<(), QmpError> {
        let checked = self.check_backup(a, &[])?;
        self.start_backup(a, checked).await
    }

    /// `blockdev-backup`'s checks, in qsd's order; `pending`: job ids a transaction
    /// is about to take.
    pub(super) fn check_backup(
        &self,
        a: &BlockdevBackupArgs,
        pending: &[String],
    ) -> Result<CheckedBackup, QmpError> {
        let source = self
            .graph
            .get(&a.device)
            .ok_or_else(|| errors::device_not_found(&a.device, &a.device))?;
        let target = self
            .graph
            .get(&a.target)
            .ok_or_else(|| errors::device_not_found(&a.target, &a.target))?;
        // `do_backup_common`'s bitmap checks, in its order.
        let mut sync = a.sync;
        let mut mode = a.bitmap_mode;
        if matches!(sync, MirrorSyncMode::Bitmap | MirrorSyncMode::Incremental)
            && a.bitmap.is_none()
        {
            return Err(errors::backup_bitmap_missing(sync_name(sync)));
        }
        if sync == MirrorSyncMode::Incremental {
            if mode.is_some_and(|m| m != BitmapSyncMode::OnSuccess) {
                return Err(errors::backup_incremental_mode());
            }
            sync = MirrorSyncMode::Bitmap;
            mode = Some(BitmapSyncMode::OnSuccess);
        }
        let bitmap = match (&a.bitmap, mode) {
            (Some(name), mode) => {
                if !source.bitmaps.iter().any(|b| &b.name == name) {
                    return Err(errors::backup_bitmap_not_found(name));
                }
                let Some(mode) = mode else {
                    return Err(errors::backup_bitmap_mode_missing());
                };
                if let Some(b) = source.bitmaps.iter().find(|b| &b.name == name)
                    && b.busy()
                {
                    return Err(errors::bitmap_busy(name));
                }
                if sync == MirrorSyncMode::None {
                    return Err(errors::backup_bitmap_sync_none());
                }
                if mode == BitmapSyncMode::Never && sync != MirrorSyncMode::Bitmap {
                    return Err(errors::backup_bitmap_never_useless(sync_name(sync)));
                }
                Some((name.clone(), mode))
            }
            (None, Some(_)) => return Err(errors::backup_bitmap_mode_alone()),
            (None, None) => None,
        };
        if source.name == target.name {
            return Err(errors::backup_same_node());
        }
        // `backup_job_create`'s order from here.
        let compress = a.compress == Some(true);
        if compress && !matches!(target.driver, Driver::Qcow2 | Driver::Compress) {
            return Err(errors::backup_compress_unsupported());
        }
        let perf = a.x_perf.clone().unwrap_or_default();
        if perf
            .max_workers
            .is_some_and(|w| !(1..=i64::from(i32::MAX)).contains(&w))
        {
            return Err(errors::backup_max_workers());
        }
        if perf.max_chunk.is_some_and(|c| c < 0) {
            return Err(errors::backup_max_chunk_negative());
        }
        if source.size != target.size {
            return Err(errors::backup_sizes_differ());
        }
        if let Some(f) = &a.filter_node_name {
            self.check_new_node_name(f)
                .map_err(|e| errors::could_not_create_node(&e.desc))?;
        }
        // The copy unit is 64 KiB (QEMU's block-copy cluster for these targets).
        if let Some(c) = perf.max_chunk.filter(|&c| c > 0 && c < 65536) {
            return Err(errors::backup_max_chunk_small(c, 65536));
        }
        let sync = match sync {
            MirrorSyncMode::Full => BackupSync::Full,
            MirrorSyncMode::Top => BackupSync::Top,
            MirrorSyncMode::None => BackupSync::None,
            MirrorSyncMode::Incremental | MirrorSyncMode::Bitmap => BackupSync::Bitmap,
        };
        if a.discard_source == Some(true) {
            return Err(errors::backup_option_unsupported("discard-source"));
        }
        let job_id = a.job_id.clone().unwrap_or_default();
        if !bulkhead_qmp::qapi::id_wellformed(&job_id) {
            return Err(errors::invalid_job_id(&job_id));
        }
        if self.jobs.get(&job_id).is_some() || pending.contains(&job_id) {
            return Err(errors::job_id_in_use(&job_id));
        }
        Ok(CheckedBackup { sync, bitmap })
    }

    /// Starts a checked backup.
    pub(super) async fn start_backup(
        &mut self,
        a: &BlockdevBackupArgs,
        checked: CheckedBackup,
    ) -> Result<(), QmpError> {
        let CheckedBackup { sync, bitmap } = checked;
        let (Some(source), Some(target)) = (self.graph.get(&a.device), self.graph.get(&a.target))
        else {
            return Err(errors::node_vanished());
        };
        let job_id = a.job_id.clone().unwrap_or_default();
        let (source, target, total) = (source.name.clone(), target.name.clone(), source.size);
        self.jobs.list.insert(
            0,
            Job {
                id: job_id.clone(),
                status: JobStatus::Created,
                auto_finalize: a.auto_finalize.unwrap_or(true),
                auto_dismiss: a.auto_dismiss.unwrap_or(true),
                speed: 0,
                user_paused: false,
                on_error: ErrorPolicy::split(a.on_source_error, a.on_target_error),
                io_status: "ok",
                done: 0,
                total,
                error: None,
                op: None,
                work: Work::Backup {
                    source: source.clone(),
                    filter: String::new(),
                    sync,
                    bitmap: bitmap.clone(),
                },
            },
        );
        self.transition(&job_id, JobStatus::Created).await;
        let speed = match u64::try_from(a.speed.unwrap_or(0)) {
            Ok(s) => s,
            Err(_) => {
                self.transition(&job_id, JobStatus::Null).await;
                return Err(errors::speed_negative());
            }
        };
        if let Some(j) = self.jobs.get_mut(&job_id) {
            j.speed = speed;
        }
        // The bitmap freezes before the point in time (the filter going in) and
        // takes what was written in between right after: the backup copies every
        // write before its point in time, and the bitmap keeps every write after.
        if let Some((name, _)) = &bitmap
            && let Err(e) = self.freeze_bitmap(&source, name)
        {
            self.transition(&job_id, JobStatus::Null).await;
            return Err(e);
        }
        let inserted = self
            .insert_backup_filter(
                &source,
                &target,
                a.filter_node_name.clone(),
                a.compress == Some(true),
            )
            .await;
        match inserted {
            Ok(filter) => {
                if let Some(Job {
                    work: Work::Backup { filter: f, .. },
                    ..
                }) = self.jobs.get_mut(&job_id)
                {
                    *f = filter;
                }
            }
            Err(e) => {
                if let Some((name, _)) = &bitmap {
                    self.thaw_bitmap(&source, name, true);
                }
                self.transition(&job_id, JobStatus::Null).await;
                return Err(e);
            }
        }
        if let Some((name, _)) = &bitmap {
            if let Err(e) = self.refreeze_bitmap(&source, name) {
                tracing::warn!(job = job_id, error = %e.desc, "the frozen bitmap missed writes");
            }
            let total = self
                .graph
                .get(&source)
                .and_then(|n| n.bitmaps.iter().find(|b| &b.name == name))
                .and_then(|b| b.frozen())
                .map_or(0, |f| f.bits().count());
            if sync == BackupSync::Bitmap
                && let Some(j) = self.jobs.get_mut(&job_id)
            {
                j.total = total;
            }
        }
        // qsd's backup pauses once as it starts (its filter goes in drained).
        self.transition(&job_id, JobStatus::Running).await;
        self.transition(&job_id, JobStatus::Paused).await;
        self.transition(&job_id, JobStatus::Running).await;
        self.start_copy(&job_id).await;
        Ok(())
    }

    /// Puts a `copy-before-write` node (saving to `target`) above `source` and
    /// returns its generated name; nothing but the job owns it, so it goes when it is
    /// taken out.
    async fn insert_backup_filter(
        &mut self,
        source: &str,
        target: &str,
        name: Option<String>,
        compress: bool,
    ) -> Result<String, QmpError> {
        let mut members = Map::new();
        if compress {
            members.insert("x-compress".into(), true.into());
        }
        let spec = super::blockdev::internal_spec(
            Driver::CopyBeforeWrite,
            name,
            members,
            vec![
                (super::graph::Role::File, source.to_string()),
                (super::graph::Role::Target, target.to_string()),
            ],
        )?;
        // In the source's worker: its saves read the source without a hop.
        let home = self.graph.get(source).map(|n| n.home);
        let filter = self.add_spec(spec, home).await?;
        if let Err(e) = self.insert_filter(source, &filter).await {
            self.destroy(&filter).await;
            return Err(e);
        }
        Ok(filter)
    }

    /// `block-stream`, checked in qsd's order: the top's layers above `base` (or
    /// every layer) are copied into it through a `copy-on-read` filter, then it reads
    /// `base` directly (or nothing) and its header says so.
    pub(super) async fn block_stream(&mut self, a: &BlockStreamArgs) -> Result<(), QmpError> {
        let top = self
            .graph
            .get(&a.device)
            .ok_or_else(|| errors::device_not_found(&a.device, &a.device))?;
        let chain = self.graph.chain_names(&top.name);
        let base = match (&a.base_node, &a.base, &a.bottom) {
            (Some(_), Some(_), _) => return Err(errors::mutually_exclusive("base", "base-node")),
            (_, _, Some(_)) => return Err(errors::stream_option_unsupported("bottom")),
            (None, Some(b), _) => return Err(errors::by_file_name_unsupported("base", b)),
            (Some(b), None, _) => {
                let n = self
                    .graph
                    .get(b)
                    .ok_or_else(|| errors::device_not_found("", b))?;
                if n.name == top.name || !chain.contains(&n.name) {
                    return Err(errors::not_a_backing_image(&n.name, &top.name));
                }
                Some(n.name.clone())
            }
            (None, None, None) => None,
        };
        if let Some(f) = &a.filter_node_name {
            self.check_new_node_name(f)
                .map_err(|e| errors::could_not_create_node(&e.desc))?;
        }
        let job_id = a.job_id.clone().unwrap_or_default();
        if !bulkhead_qmp::qapi::id_wellformed(&job_id) {
            return Err(errors::invalid_job_id(&job_id));
        }
        if self.jobs.get(&job_id).is_some() {
            return Err(errors::job_id_in_use(&job_id));
        }
        // The layers that move: those between the top and the base.
        let layers = match &base {
            Some(b) => chain
                .iter()
                .position(|n| n == b)
                .unwrap_or(1)
                .saturating_sub(1),
            None => chain.len().saturating_sub(1),
        };
        let backing_file = base.as_ref().map(|b| {
            a.backing_file.clone().unwrap_or_else(|| {
                self.graph
                    .get(b)
                    .map(|n| self.graph.filename(n))
                    .unwrap_or_default()
            })
        });
        let base_name = base.clone();
        let (top, total) = (top.name.clone(), if layers == 0 { 0 } else { top.size });
        self.jobs.list.insert(
            0,
            Job {
                id: job_id.clone(),
                status: JobStatus::Created,
                auto_finalize: a.auto_finalize.unwrap_or(true),
                auto_dismiss: a.auto_dismiss.unwrap_or(true),
                speed: 0,
                user_paused: false,
                on_error: ErrorPolicy {
                    always_read: true,
                    ..ErrorPolicy::both(a.on_error)
                },
                io_status: "ok",
                done: 0,
                total,
                error: None,
                op: None,
                work: Work::Stream {
                    top: top.clone(),
                    base,
                    filter: String::new(),
                    layers: u32::try_from(layers).unwrap_or(u32::MAX),
                    backing_file,
                },
            },
        );
        self.transition(&job_id, JobStatus::Created).await;
        let speed = match u64::try_from(a.speed.unwrap_or(0)) {
            Ok(s) => s,
            Err(_) => {
                self.transition(&job_id, JobStatus::Null).await;
                return Err(errors::speed_negative());
            }
        };
        if let Some(j) = self.jobs.get_mut(&job_id) {
            j.speed = speed;
        }
        // QEMU's stream job takes the layers it drops without sharing writes: a
        // writable export of one of them conflicts (`block_job_add_bdrv`).
        let dropped = chain
            .iter()
            .skip(1)
            .take_while(|n| Some(*n) != base_name.as_ref());
        for n in dropped {
            if self.exports.iter().any(|e| &e.node == n && e.writable) {
                self.transition(&job_id, JobStatus::Null).await;
                return Err(errors::stream_intermediate_conflict(n, &job_id));
            }
        }
        self.transition(&job_id, JobStatus::Running).await;
        if layers == 0 {
            // Nothing below the top: done at once, as qsd's job is.
            self.job_done(&job_id).await;
            return Ok(());
        }
        let mut filter = json!({"driver": "copy-on-read", "file": top});
        if let Some(f) = &a.filter_node_name {
            filter["node-name"] = json!(f);
        }
        let home = self.graph.get(&top).map(|n| n.home);
        let added = match self.add_internal_on(&filter, home).await {
            Ok(f) => match self.insert_filter(&top, &f).await {
                Ok(()) => Ok(f),
                Err(e) => {
                    self.destroy(&f).await;
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        match added {
            Ok(f) => {
                if let Some(Job {
                    work: Work::Stream { filter, .. },
                    ..
                }) = self.jobs.get_mut(&job_id)
                {
                    *filter = f;
                }
            }
            Err(e) => {
                self.job_failed(&job_id, "read", &e.desc).await;
                return Ok(());
            }
        }
        self.start_copy(&job_id).await;
        Ok(())
    }

    /// A stream's end: the top reads `base` (or nothing) and its header says so.
    async fn finish_stream(
        &mut self,
        top: &str,
        base: Option<&str>,
        backing_file: Option<&str>,
    ) -> Result<(), QmpError> {
        match base {
            Some(b) => self.attach_backing(top, b).await?,
            None => self.detach_backing(top).await?,
        }
        let format = base
            .and_then(|b| self.graph.get(b))
            .map(|b| b.driver.as_str().to_string())
            .unwrap_or_default();
        if let Some(r) = self.node_ref(top) {
            let w = self.worker(r.home).await?;
            let body = ToWorker::SetBackingFile {
                node: r.node,
                name: backing_file.unwrap_or("").to_string(),
                format,
            };
            if let Err(e) = w.call(body, &[]).await {
                tracing::warn!(top, error = %e, "the top's header keeps its old backing name");
            }
        }
        self.refresh_format_info().await;
        let _ = self.refresh_locks();
        Ok(())
    }

    /// `block-commit`, checked in qsd's order (an active commit is not supported
    /// yet: the top must be below the device).
    pub(super) async fn block_commit(&mut self, a: &BlockCommitArgs) -> Result<(), QmpError> {
        let Some(device) = self.graph.get(&a.device) else {
            return Err(QmpError {
                class: ErrorClass::DeviceNotFound,
                desc: format!("Device '{}' not found", a.device),
            });
        };
        if device.parents > 0 || self.jobs.user_of(&device.name).is_some() {
            return Err(errors::need_root_node());
        }
        let chain: Vec<String> = self.graph.chain_names(&device.name);
        let top = match (&a.top_node, &a.top) {
            (Some(_), Some(_)) => return Err(errors::mutually_exclusive("top", "top-node")),
            (Some(t), None) => {
                let n = self
                    .graph
                    .get(t)
                    .ok_or_else(|| errors::device_not_found("", t))?;
                if !chain.contains(&n.name) {
                    return Err(errors::not_in_chain(t));
                }
                n.name.clone()
            }
            (None, Some(t)) => return Err(errors::by_file_name_unsupported("top", t)),
            (None, None) => device.name.clone(),
        };
        let below_top = self.graph.chain_names(&top);
        let base = match (&a.base_node, &a.base) {
            (Some(_), Some(_)) => return Err(errors::mutually_exclusive("base", "base-node")),
            (Some(b), None) => {
                let n = self
                    .graph
                    .get(b)
                    .ok_or_else(|| errors::device_not_found("", b))?;
                if !below_top.contains(&n.name) {
                    return Err(errors::not_in_chain(b));
                }
                n.name.clone()
            }
            (None, Some(b)) => return Err(errors::by_file_name_unsupported("base", b)),
            // The bottom of the chain, `top` itself when it has no backing
            // (`bdrv_find_base`; QEMU's "There is no backimg image" cannot happen).
            (None, None) => below_top.last().cloned().unwrap_or_else(|| top.clone()),
        };
        if top == base {
            return Err(errors::commit_into_itself());
        }
        let active = top == device.name;
        if active && a.backing_file.is_some() {
            return Err(errors::backing_file_active_commit());
        }
        let job_id = a.job_id.clone().unwrap_or_default();
        if !bulkhead_qmp::qapi::id_wellformed(&job_id) {
            return Err(errors::invalid_job_id(&job_id));
        }
        if self.jobs.get(&job_id).is_some() {
            return Err(errors::job_id_in_use(&job_id));
        }
        if active {
            let layers = below_top.iter().position(|n| *n == base).unwrap_or(1);
            let base_was_read_only = self.graph.get(&base).is_some_and(|n| n.read_only);
            return self
                .active_commit(
                    &job_id,
                    top,
                    base,
                    u32::try_from(layers).unwrap_or(u32::MAX),
                    base_was_read_only,
                    a.speed,
                    (
                        a.auto_finalize,
                        a.auto_dismiss,
                        ErrorPolicy::both(a.on_error),
                    ),
                    a.filter_node_name.clone(),
                )
                .await;
        }
        // The overlay of `top`: the chain node whose backing it is.
        let overlay = chain
            .windows(2)
            .find(|w| w[1] == top)
            .map(|w| w[0].clone())
            .ok_or_else(errors::node_vanished)?;
        let layers = below_top.iter().position(|n| *n == base).unwrap_or(1);
        let base_node = self.graph.get(&base).ok_or_else(errors::node_vanished)?;
        let backing_file = a
            .backing_file
            .clone()
            .unwrap_or_else(|| self.graph.filename(base_node));
        let base_was_read_only = base_node.read_only;
        let total = self.graph.get(&top).map_or(0, |n| n.size);
        self.jobs.list.insert(
            0,
            Job {
                id: job_id.clone(),
                status: JobStatus::Created,
                auto_finalize: a.auto_finalize.unwrap_or(true),
                auto_dismiss: a.auto_dismiss.unwrap_or(true),
                speed: 0,
                user_paused: false,
                on_error: ErrorPolicy::both(a.on_error),
                io_status: "ok",
                done: 0,
                total,
                error: None,
                op: None,
                work: Work::Commit {
                    overlay,
                    top,
                    base,
                    backing_file,
                    layers: u32::try_from(layers).unwrap_or(u32::MAX),
                    base_was_read_only,
                },
            },
        );
        self.transition(&job_id, JobStatus::Created).await;
        let speed = match u64::try_from(a.speed.unwrap_or(0)) {
            Ok(s) => s,
            Err(_) => {
                self.transition(&job_id, JobStatus::Null).await;
                return Err(errors::speed_negative());
            }
        };
        if let Some(j) = self.jobs.get_mut(&job_id) {
            j.speed = speed;
        }
        if let Err(e) = self.prepare_job(&job_id).await {
            self.transition(&job_id, JobStatus::Null).await;
            return Err(e);
        }
        self.transition(&job_id, JobStatus::Running).await;
        self.start_copy(&job_id).await;
        Ok(())
    }

    /// What a job needs before its copy starts: a commit's base writable.
    async fn prepare_job(&mut self, id: &str) -> Result<(), QmpError> {
        let Some(Work::Commit {
            base,
            base_was_read_only: true,
            ..
        }) = self.jobs.get(id).map(|j| j.work.clone())
        else {
            return Ok(());
        };
        self.set_mode(&base, false).await
    }

    /// Undoes `prepare_job` once the job ended either way: a commit's base
    /// read-only again, a backup's or stream's filter out of the graph.
    async fn release_job(&mut self, id: &str, ok: bool) {
        if let Some(Work::Backup {
            source,
            bitmap: Some((name, mode)),
            ..
        }) = self.jobs.get(id).map(|j| j.work.clone())
        {
            // QEMU's `bitmap-mode`: the bitmap keeps only what was written since
            // the start when the job succeeded (on-success, always), or gets its
            // frozen bits back (a failure; never). `always` after a failure keeps
            // the frozen bits too (QEMU drops those it copied).
            let restore = mode == BitmapSyncMode::Never || !ok;
            self.thaw_bitmap(&source, &name, restore);
        }
        if let Some(Work::Mirror(m)) = self.jobs.get(id).map(|j| j.work.clone()) {
            if self.graph.contains(&m.filter)
                && let Err(e) = self.remove_filter(&m.filter).await
            {
                tracing::warn!(job = id, error = %e.desc, "the mirror's filter stays");
            }
            // An active commit that did not pivot leaves its base as it was.
            if m.commit == Some(true)
                && m.finish != Some(true)
                && let Err(e) = self.set_mode(&m.target, true).await
            {
                tracing::warn!(job = id, error = %e.desc, "the commit base stays writable");
            }
        }
        if let Some(Work::Stream { filter, .. }) = self.jobs.get(id).map(|j| j.work.clone())
            && self.graph.contains(&filter)
            && let Err(e) = self.remove_filter(&filter).await
        {
            tracing::warn!(job = id, error = %e.desc, "the stream's filter stays");
        }
        if let Some(Work::Backup { filter, .. }) = self.jobs.get(id).map(|j| j.work.clone())
            && self.graph.contains(&filter)
            && let Err(e) = self.remove_filter(&filter).await
        {
            tracing::warn!(job = id, error = %e.desc, "the backup's filter stays");
        }
        if let Some(Work::Commit {
            base,
            base_was_read_only: true,
            ..
        }) = self.jobs.get(id).map(|j| j.work.clone())
            && let Err(e) = self.set_mode(&base, true).await
        {
            tracing::warn!(job = id, error = %e.desc, "the commit base stays writable");
        }
    }

    /// Starts the job's copy from where it stands; a copy that cannot start fails
    /// the job the way a failed copy does.
    async fn start_copy(&mut self, id: &str) {
        let Some(j) = self.jobs.get(id) else {
            return;
        };
        let mut extra_fd: Option<std::os::fd::OwnedFd> = None;
        let operation = match &j.work {
            Work::Backup {
                sync: BackupSync::None,
                ..
            }
            | Work::Create { .. } => return,
            Work::Mirror(m) => match self.graph.get(&m.filter) {
                Some(f) => Operation::Mirror {
                    node: f.id,
                    offset: j.done,
                    scan: m.scan_now(),
                    write_blocking: m.write_blocking,
                    complete: m.finish.is_some(),
                    speed: j.speed,
                },
                None => return,
            },
            Work::Stream { filter, layers, .. } => match self.graph.get(filter) {
                Some(f) => Operation::Stream {
                    node: f.id,
                    offset: j.done,
                    len: j.total,
                    layers: *layers,
                    speed: j.speed,
                },
                None => return,
            },
            Work::Backup {
                filter,
                sync,
                source,
                bitmap,
            } => match (self.graph.get(filter), self.graph.get(source)) {
                (Some(f), Some(src)) => {
                    // A bitmap backup passes its frozen bitmap and starts over at
                    // every run (what was saved is passed over at once).
                    let frozen = bitmap
                        .as_ref()
                        .filter(|_| *sync == BackupSync::Bitmap)
                        .and_then(|(name, _)| src.bitmaps.iter().find(|b| &b.name == name))
                        .and_then(|b| b.frozen());
                    if let Some(fr) = frozen {
                        match fr.fd().try_clone() {
                            Ok(fd) => extra_fd = Some(fd),
                            Err(e) => {
                                let text = format!("cannot pass the frozen bitmap: {e}");
                                self.job_failed(id, "read", &text).await;
                                return;
                            }
                        }
                    }
                    Operation::Backup {
                        node: f.id,
                        offset: if frozen.is_some() { 0 } else { j.done },
                        len: src.size,
                        top_only: *sync == BackupSync::Top,
                        speed: j.speed,
                        bitmap: frozen.map(|fr| bulkhead_ipc::wire::BackupBitmap {
                            spec: bulkhead_ipc::wire::BitmapSpec {
                                size: fr.bits().size(),
                                granularity: fr.bits().granularity(),
                            },
                            total: fr.bits().count(),
                        }),
                    }
                }
                _ => return,
            },
            Work::Commit {
                top, base, layers, ..
            } => match (self.node_ref(top), self.node_ref(base)) {
                (Some(t), Some(b)) => Operation::Commit {
                    top: t,
                    base: b,
                    layers: *layers,
                    offset: j.done,
                    len: j.total,
                    speed: j.speed,
                },
                _ => return,
            },
        };
        let stall = if matches!(operation, Operation::Mirror { .. }) {
            MIRROR_STALL
        } else {
            STALL
        };
        let fds: Vec<std::os::fd::BorrowedFd<'_>> = extra_fd
            .as_ref()
            .map(std::os::fd::AsFd::as_fd)
            .into_iter()
            .collect();
        match self.start_operation_with(operation, stall, &fds).await {
            Ok(watch) => {
                let op = watch.op;
                if let Some(j) = self.jobs.get_mut(id) {
                    j.op = Some(watch.clone());
                }
                let on_job = Rc::clone(&self.on_job);
                let id = id.to_string();
                let mut state = watch.state;
                tokio::task::spawn_local(async move {
                    // A mirror's ready, then the end (the job looks at the state).
                    let mut ready = false;
                    loop {
                        let (now_ready, ended) = {
                            let s = state.borrow_and_update();
                            (s.ready, s.end.is_some())
                        };
                        if now_ready && !ready && !ended {
                            ready = true;
                            on_job(id.clone(), op);
                        }
                        if ended || state.changed().await.is_err() {
                            on_job(id, op);
                            return;
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(job = id, error = %e.desc, "the job's copy did not start");
                self.job_failed(id, "write", &e.desc).await;
            }
        }
    }

    /// The instance running job copies (one for all jobs, started on first use).
    pub(super) fn jobs_instance(&mut self) -> WorkerId {
        match self.jobs_home {
            Some(id) => id,
            None => {
                let id = self.new_instance(WorkerKind::Jobs);
                self.jobs_home = Some(id);
                id
            }
        }
    }

    /// Where a job's copy runs and the nodes it reaches, connected.
    pub(super) async fn connect_job_runner(
        &mut self,
        nodes: &[NodeRef],
    ) -> Result<WorkerId, QmpError> {
        let home = self.jobs_instance();
        for n in nodes {
            self.connect(home, n.home).await?;
        }
        Ok(home)
    }

    /// A job's copy ended (the op's watcher, through the actor); for a create job,
    /// its work (done in the command) is reported.
    pub async fn job_step(&mut self, id: &str, op: OpId) {
        let Some(j) = self.jobs.get_mut(id) else {
            return;
        };
        if let Work::Create { error, .. } = &j.work {
            match error.clone() {
                None => self.job_done(id).await,
                Some(e) => {
                    j.error = Some(e);
                    self.transition(id, JobStatus::Aborting).await;
                    self.transition(id, JobStatus::Concluded).await;
                }
            }
            return;
        }
        if let Work::Mirror(m) = &mut j.work
            && let Some(e) = m.early_error.take()
        {
            self.mirror_early_failure(id, e).await;
            return;
        }
        // Ends of copies the job stopped itself (pause, cancel) are handled there.
        let Some(watch) = j.op.as_ref().filter(|w| w.op == op) else {
            return;
        };
        let state = watch.state.borrow().clone();
        if state.end.is_none() {
            if state.ready {
                self.mirror_ready(id).await;
            }
            return;
        }
        j.done = j.done.max(state.done);
        j.total = j.total.max(state.total);
        j.op = None;
        match state.end {
            Some(Ok(())) => self.job_done(id).await,
            Some(Err(OpError::WorkerEnded(why)))
                if matches!(
                    self.jobs.get(id).map(|j| &j.work),
                    Some(Work::Backup { .. })
                ) =>
            {
                // What the filter saved lived in that worker: the point in time
                // cannot be kept any more.
                let text = format!("the worker holding the backup's filter ended ({why})");
                self.job_failed(id, "read", &text).await;
            }
            Some(Err(OpError::WorkerEnded(why)))
                if matches!(self.jobs.get(id).map(|j| &j.work), Some(Work::Mirror(_))) =>
            {
                // The filter's worker died with its dirty map: the next copy
                // scans again in the replacement.
                tracing::warn!(job = id, reason = %why, "the mirror's worker ended; it scans again");
                if let Some(Job {
                    work: Work::Mirror(m),
                    ..
                }) = self.jobs.get_mut(id)
                {
                    m.rescan = true;
                }
                self.start_copy(id).await;
            }
            Some(Err(OpError::WorkerEnded(why))) => {
                // The runner died: a new one goes on where the copy stood.
                tracing::warn!(job = id, reason = %why, "job runner ended; the copy starts again");
                self.start_copy(id).await;
            }
            Some(Err(OpError::Cancelled)) | None => {}
            Some(Err(e)) => {
                let (errno, read, text) = match e {
                    OpError::Failed(errno) => (Some(errno), false, super::strerror(errno)),
                    OpError::SourceFailed(errno) => (Some(errno), true, super::strerror(errno)),
                    other => (None, false, other.to_string()),
                };
                let Some((policy, operation)) =
                    self.jobs.get(id).map(|j| j.on_error.for_failure(read))
                else {
                    return;
                };
                match (policy, errno) {
                    (BlockdevOnError::Stop, Some(errno))
                    | (BlockdevOnError::Enospc, Some(errno @ libc::ENOSPC)) => {
                        self.job_error_stop(id, operation, errno).await;
                    }
                    (BlockdevOnError::Ignore, Some(_)) if self.ignore_again(id) => {
                        self.emit(
                            "BLOCK_JOB_ERROR",
                            Some(json!({"device": id, "operation": operation, "action": "ignore"})),
                        )
                        .await;
                        // The copy goes on from its progress.
                        self.start_copy(id).await;
                    }
                    _ => self.job_failed(id, operation, &text).await,
                }
            }
        }
    }

    /// Whether `ignore` goes on after this failure: not after [`IGNORE_LIMIT`] in a
    /// row without progress.
    fn ignore_again(&mut self, id: &str) -> bool {
        let done = self.jobs.get(id).map_or(0, |j| j.done);
        let entry = self.jobs.ignored.entry(id.to_string()).or_insert((0, done));
        if entry.1 != done {
            *entry = (0, done);
        }
        entry.0 += 1;
        entry.0 <= IGNORE_LIMIT
    }

    /// `on-*-error: stop` (or `enospc` on ENOSPC): `BLOCK_JOB_ERROR` with action
    /// stop, and the job pauses as if the user paused it (`block-job-resume`
    /// retries), its `io-status` saying why, as QEMU's `block_job_error_action`.
    async fn job_error_stop(&mut self, id: &str, operation: &str, errno: i32) {
        self.emit(
            "BLOCK_JOB_ERROR",
            Some(json!({"device": id, "operation": operation, "action": "stop"})),
        )
        .await;
        let Some(j) = self.jobs.get_mut(id) else {
            return;
        };
        j.io_status = if errno == libc::ENOSPC {
            "nospace"
        } else {
            "failed"
        };
        j.user_paused = true;
        let paused = if j.status == JobStatus::Ready {
            JobStatus::Standby
        } else {
            JobStatus::Paused
        };
        self.transition(id, paused).await;
    }

    /// The copy finished: waiting, pending, and (auto-finalize) the end.
    async fn job_done(&mut self, id: &str) {
        self.transition(id, JobStatus::Waiting).await;
        // A grouped job waits for the others; the last one done takes them all on.
        let group = self.jobs.group_of(id);
        if group.iter().any(|m| {
            self.jobs
                .get(m)
                .is_some_and(|j| j.status != JobStatus::Waiting)
        }) {
            return;
        }
        for m in &group {
            self.transition(m, JobStatus::Pending).await;
        }
        for m in &group {
            let Some(j) = self.jobs.get(m) else {
                continue;
            };
            if j.auto_finalize {
                self.finalize_job(m).await;
            } else {
                let t = j.type_name();
                self.emit("BLOCK_JOB_PENDING", Some(json!({"type": t, "id": m})))
                    .await;
            }
        }
    }

    /// The graph change a finished job makes, then `BLOCK_JOB_COMPLETED`.
    async fn finalize_job(&mut self, id: &str) {
        let Some(work) = self.jobs.get(id).map(|j| j.work.clone()) else {
            return;
        };
        let result = match &work {
            Work::Commit {
                overlay,
                base,
                backing_file,
                ..
            } => self.drop_intermediate(overlay, base, backing_file).await,
            Work::Backup { .. } | Work::Create { .. } => Ok(()),
            Work::Mirror(m) => self.finish_mirror(m).await,
            Work::Stream {
                top,
                base,
                filter,
                backing_file,
                ..
            } => {
                if self.graph.contains(filter)
                    && let Err(e) = self.remove_filter(filter).await
                {
                    tracing::warn!(job = id, error = %e.desc, "the stream's filter stays");
                }
                self.finish_stream(top, base.as_deref(), backing_file.as_deref())
                    .await
            }
        };
        self.release_job(id, result.is_ok()).await;
        if let Err(e) = result
            && let Some(j) = self.jobs.get_mut(id)
        {
            j.error = Some(e.desc);
        }
        self.conclude(id, "BLOCK_JOB_COMPLETED").await;
    }

    /// A commit's end: `overlay` reads `base` directly, and its header says so.
    async fn drop_intermediate(
        &mut self,
        overlay: &str,
        base: &str,
        backing_file: &str,
    ) -> Result<(), QmpError> {
        self.attach_backing(overlay, base).await?;
        let format = self
            .graph
            .get(base)
            .map(|b| b.driver.as_str().to_string())
            .unwrap_or_default();
        if let Some(r) = self.node_ref(overlay) {
            let w = self.worker(r.home).await?;
            let body = ToWorker::SetBackingFile {
                node: r.node,
                name: backing_file.to_string(),
                format,
            };
            if let Err(e) = w.call(body, &[]).await {
                tracing::warn!(overlay, error = %e, "the overlay's header keeps its old backing name");
            }
        }
        self.refresh_format_info().await;
        let _ = self.refresh_locks();
        Ok(())
    }

    /// The copy failed: `BLOCK_JOB_ERROR`, aborting, `BLOCK_JOB_COMPLETED` with the
    /// error, concluded.
    async fn job_failed(&mut self, id: &str, operation: &str, error: &str) {
        let Some(j) = self.jobs.get_mut(id) else {
            return;
        };
        j.error = Some(error.to_string());
        // Stop and ignore are handled before (`job_step`): what comes here is
        // reported.
        self.emit(
            "BLOCK_JOB_ERROR",
            Some(json!({"device": id, "operation": operation, "action": "report"})),
        )
        .await;
        // The rest of a group is cancelled with it.
        let others: Vec<String> = self
            .jobs
            .group_of(id)
            .into_iter()
            .filter(|m| m != id)
            .filter(|m| {
                self.jobs
                    .get(m)
                    .is_some_and(|j| Verb::Cancel.allowed(j.status))
            })
            .collect();
        for m in &others {
            self.stop_copy(m).await;
        }
        self.transition(id, JobStatus::Aborting).await;
        for m in &others {
            self.transition(m, JobStatus::Aborting).await;
        }
        self.release_job(id, false).await;
        self.conclude(id, "BLOCK_JOB_COMPLETED").await;
        for m in &others {
            self.release_job(m, false).await;
            self.conclude(m, "BLOCK_JOB_CANCELLED").await;
        }
    }

    /// The end event (block jobs only), concluded, and null when the job dismisses
    /// itself.
    async fn conclude(&mut self, id: &str, event: &str) {
        let Some(j) = self.jobs.get(id) else {
            return;
        };
        let (data, dismiss, block) = (
            j.event_data(),
            j.auto_dismiss,
            !matches!(j.work, Work::Create { .. }),
        );
        let owned: Vec<String> = self
            .jobs
            .owned
            .iter()
            .filter(|(j, _)| j == id)
            .map(|(_, n)| n.clone())
            .collect();
        self.jobs.owned.retain(|(j, _)| j != id);
        for node in owned {
            self.drop_if_unused(&node).await;
        }
        if block {
            self.emit(event, Some(data)).await;
        }
        self.transition(id, JobStatus::Concluded).await;
        self.jobs.groups.retain(|(j, _)| j != id);
        self.jobs.ignored.remove(id);
        if dismiss {
            self.transition(id, JobStatus::Null).await;
        }
    }

    /// Stops the job's running copy and waits for it (pause, cancel).
    async fn stop_copy(&mut self, id: &str) {
        let Some(mut watch) = self.jobs.get_mut(id).and_then(|j| j.op.take()) else {
            return;
        };
        if let Err(e) = self.cancel_operation(watch.op).await {
            tracing::debug!(job = id, error = %e.desc, "stopping a job's copy");
        }
        let _ = tokio::time::timeout(STOP_WAIT, watch.ended()).await;
        let done = watch.state.borrow().done;
        if let Some(j) = self.jobs.get_mut(id) {
            j.done = j.done.max(done);
        }
    }

    /// `job-pause` and `block-job-pause`.
    pub(super) async fn job_pause(&mut self, id: &str, how: Lookup) -> Result<(), QmpError> {
        self.check_verb(id, how, Verb::Pause)?;
        if self.jobs.get(id).is_some_and(|j| j.user_paused) {
            return Err(errors::job_already_paused());
        }
        let status = match self.jobs.get_mut(id) {
            Some(j) => {
                j.user_paused = true;
                j.status
            }
            None => return Ok(()),
        };
        self.stop_copy(id).await;
        let paused = if status == JobStatus::Ready {
            JobStatus::Standby
        } else {
            JobStatus::Paused
        };
        self.transition(id, paused).await;
        Ok(())
    }

    /// `job-resume` and `block-job-resume`.
    pub(super) async fn job_resume(&mut self, id: &str, how: Lookup) -> Result<(), QmpError> {
        self.check_verb(id, how, Verb::Resume)?;
        if !self.jobs.get(id).is_some_and(|j| j.user_paused) {
            return Err(errors::job_not_paused());
        }
        let status = match self.jobs.get_mut(id) {
            Some(j) => {
                j.user_paused = false;
                j.io_status = "ok";
                j.status
            }
            None => return Ok(()),
        };
        let running = if status == JobStatus::Standby {
            JobStatus::Ready
        } else {
            JobStatus::Running
        };
        self.transition(id, running).await;
        self.start_copy(id).await;
        Ok(())
    }

    /// `job-cancel` and `block-job-cancel` (`force`: also a paused job).
    pub(super) async fn job_cancel(
        &mut self,
        id: &str,
        how: Lookup,
        force: bool,
    ) -> Result<(), QmpError> {
        self.check_verb(id, how, Verb::Cancel)?;
        if how == Lookup::BlockJob && !force && self.jobs.get(id).is_some_and(|j| j.user_paused) {
            return Err(errors::block_job_paused(id));
        }
        // A ready mirror cancelled without force completes without the pivot
        // (QEMU's soft cancel): the target stays a consistent copy.
        if !force
            && let Some(j) = self.jobs.get(id)
            && matches!(j.work, Work::Mirror(_))
            && j.status == JobStatus::Ready
        {
            self.mirror_complete(id, false).await;
            return Ok(());
        }
        // The job, then the rest of its group (QEMU's `job_txn_abort`).
        let mut group = self.jobs.group_of(id);
        group.retain(|m| m != id);
        group.insert(0, id.to_string());
        for m in &group {
            self.stop_copy(m).await;
            // A paused job resumes to take the cancel (QEMU's `job_cancel_locked`).
            match self.jobs.get(m).map(|j| j.status) {
                Some(JobStatus::Paused) => self.transition(m, JobStatus::Running).await,
                Some(JobStatus::Standby) => self.transition(m, JobStatus::Ready).await,
                _ => {}
            }
        }
        for m in &group {
            self.transition(m, JobStatus::Aborting).await;
        }
        for m in &group {
            self.release_job(m, false).await;
            self.conclude(m, "BLOCK_JOB_CANCELLED").await;
        }
        Ok(())
    }

    /// `block-job-set-speed`.
    pub(super) async fn job_set_speed(&mut self, id: &str, speed: i64) -> Result<(), QmpError> {
        self.check_verb(id, Lookup::BlockJob, Verb::SetSpeed)?;
        let speed = u64::try_from(speed).map_err(|_| errors::speed_negative())?;
        let op = self.jobs.get_mut(id).and_then(|j| {
            j.speed = speed;
            j.op.as_ref().map(|w| w.op)
        });
        // The copy runs where its operation does: the job runner, or the worker
        // hosting the job's filter or nodes.
        let home = op.and_then(|op| self.ops.borrow().home(op).map(|(home, _)| home));
        if let (Some(op), Some(home)) = (op, home)
            && let Some(w) = self.running(home)
            && let Err(e) = w.call(ToWorker::SetOperationSpeed { op, speed }, &[]).await
        {
            tracing::debug!(job = id, error = %e, "speed change reached no copy");
        }
        Ok(())
    }

    /// `job-complete` and `block-job-complete`: only jobs that become ready (a
    /// mirror, an active commit) take it.
    pub(super) async fn job_complete(&mut self, id: &str, how: Lookup) -> Result<(), QmpError> {
        self.check_verb(id, how, Verb::Complete)?;
        if !matches!(self.jobs.get(id).map(|j| &j.work), Some(Work::Mirror(_))) {
            return Err(errors::job_cannot_complete(id));
        }
        self.mirror_complete(id, true).await;
        Ok(())
    }

    /// `job-finalize` and `block-job-finalize`.
    pub(super) async fn job_finalize(&mut self, id: &str, how: Lookup) -> Result<(), QmpError> {
        self.check_verb(id, how, Verb::Finalize)?;
        self.finalize_job(id).await;
        Ok(())
    }

    /// `job-dismiss` and `block-job-dismiss`.
    pub(super) async fn job_dismiss(&mut self, id: &str, how: Lookup) -> Result<(), QmpError> {
        self.check_verb(id, how, Verb::Dismiss)?;
        self.transition(id, JobStatus::Null).await;
        Ok(())
    }

    /// `query-jobs`.
    pub(super) fn query_jobs(&self) -> Vec<Value> {
        self.jobs.list.iter().map(Job::job_info).collect()
    }

    /// `query-block-jobs`: the block jobs (not `create`).
    pub(super) fn query_block_jobs(&self) -> Vec<Value> {
        self.jobs
            .list
            .iter()
            .filter(|j| !matches!(j.work, Work::Create { .. }))
            .map(Job::block_job_info)
            .collect()
    }

    /// `blockdev-create`: a job (manual dismiss) whose work is done within the
    /// command; its end (`waiting`, `pending`, `concluded`, or `aborting`,
    /// `concluded` with the error) is reported right after the reply, as qsd's job
    /// coroutine does. `file` images are created by the supervisor (workers open no
    /// path), `qcow2` ones by the worker hosting the file node.
    pub(super) async fn blockdev_create(
        &mut self,
        job_id: &str,
        options: &Map<String, Value>,
    ) -> Result<(), QmpError> {
        if !bulkhead_qmp::qapi::id_wellformed(job_id) {
            return Err(errors::invalid_job_id(job_id));
        }
        if self.jobs.get(job_id).is_some() {
            return Err(errors::job_id_in_use(job_id));
        }
        self.jobs.list.insert(
            0,
            Job {
                id: job_id.to_string(),
                status: JobStatus::Created,
                auto_finalize: true,
                auto_dismiss: false,
                speed: 0,
                user_paused: false,
                on_error: ErrorPolicy::both(None),
                io_status: "ok",
                done: 0,
                total: 1,
                error: None,
                op: None,
                work: Work::Create {
                    error: None,
                    amend: false,
                },
            },
        );
        self.transition(job_id, JobStatus::Created).await;
        self.transition(job_id, JobStatus::Running).await;
        let error = self.create_image(options).await.err();
        if let Some(j) = self.jobs.get_mut(job_id) {
            j.done = 1;
            j.work = Work::Create {
                error,
                amend: false,
            };
        }
        (self.on_job)(job_id.to_string(), OpId(0));
        Ok(())
    }

    /// `x-blockdev-amend`, checked in qsd's order. A qcow2 image bulkhead opens is
    /// never encrypted (LUKS is issue 14), so the job succeeds unless it is asked
    /// to amend encryption ("image is not encrypted, can't amend"), as qsd's on such
    /// an image; every event comes before the reply, as qsd's.
    pub(super) async fn blockdev_amend(
        &mut self,
        job_id: &str,
        node: &str,
        options: &Map<String, Value>,
    ) -> Result<(), QmpError> {
        let n = self
            .graph
            .get(node)
            .ok_or_else(|| errors::device_not_found("", node))?;
        if options.get("driver").and_then(Value::as_str) != Some(n.driver.as_str()) {
            return Err(errors::amend_driver_change());
        }
        if n.driver != super::graph::Driver::Qcow2 {
            return Err(errors::amend_unsupported());
        }
        if !bulkhead_qmp::qapi::id_wellformed(job_id) {
            return Err(errors::invalid_job_id(job_id));
        }
        if self.jobs.get(job_id).is_some() {
            return Err(errors::job_id_in_use(job_id));
        }
        let error = options
            .contains_key("encrypt")
            .then(|| "image is not encrypted, can't amend".to_string());
        self.jobs.list.insert(
            0,
            Job {
                id: job_id.to_string(),
                status: JobStatus::Created,
                auto_finalize: true,
                auto_dismiss: false,
                speed: 0,
                user_paused: false,
                on_error: ErrorPolicy::both(None),
                io_status: "ok",
                done: 1,
                total: 1,
                error: error.clone(),
                op: None,
                work: Work::Create { error, amend: true },
            },
        );
        self.transition(job_id, JobStatus::Created).await;
        self.transition(job_id, JobStatus::Running).await;
        if self.jobs.get(job_id).is_some_and(|j| j.error.is_some()) {
            self.transition(job_id, JobStatus::Aborting).await;
            self.transition(job_id, JobStatus::Concluded).await;
        } else {
            self.transition(job_id, JobStatus::Waiting).await;
            self.transition(job_id, JobStatus::Pending).await;
            self.transition(job_id, JobStatus::Concluded).await;
        }
        Ok(())
    }

    /// The work of `blockdev-create`; the error is the job's (QEMU's texts).
    async fn create_image(&mut self, o: &Map<String, Value>) -> Result<(), String> {
        let text = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_string);
        let num = |k: &str| o.get(k).and_then(Value::as_u64);
        let flag = |k: &str| o.get(k).and_then(Value::as_bool);
        let driver = text("driver").unwrap_or_default();
        let size = num("size").unwrap_or(0);
        match driver.as_str() {
            "file" => {
                let filename = text("filename").unwrap_or_default();
                if text("preallocation").is_some_and(|p| p != "off") {
                    return Err("bulkhead supports only preallocation=off so far".into());
                }
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&filename)
                    .map_err(|e| format!("Could not create '{filename}': {}", strerror_of(&e)))?;
                file.set_len(0)
                    .and_then(|()| file.set_len(size))
                    .map_err(|e| format!("Could not resize file: {}", strerror_of(&e)))?;
                Ok(())
            }
            "qcow2" => {
                let node = match o.get("file") {
                    Some(Value::String(n)) => n.clone(),
                    _ => return Err("bulkhead supports only a node name as 'file' so far".into()),
                };
                for unsupported in [
                    "data-file",
                    "data-file-raw",
                    "encrypt",
                    "preallocation",
                    "extended-l2",
                    "compression-type",
                ] {
                    if o.contains_key(unsupported) {
                        return Err(format!(
                            "bulkhead does not support '{unsupported}' in blockdev-create yet"
                        ));
                    }
                }
                if text("version").is_some_and(|v| v != "v3")
                    || num("refcount-bits").is_some_and(|b| b != 16)
                {
                    return Err(
                        "bulkhead creates only version 3 images with 16-bit refcounts so far"
                            .into(),
                    );
                }
                let Some(r) = self.node_ref(&node) else {
                    return Err(format!(
                        "Cannot find device='{node}' nor node-name='{node}'"
                    ));
                };
                let image = bulkhead_ipc::wire::Qcow2Create {
                    size,
                    cluster_size: num("cluster-size").unwrap_or(65536),
                    backing_file: text("backing-file"),
                    backing_format: text("backing-fmt"),
                    lazy_refcounts: flag("lazy-refcounts").unwrap_or(false),
                };
                let w = self.worker(r.home).await.map_err(|e| e.desc)?;
                w.call(
                    ToWorker::CreateQcow2 {
                        node: r.node,
                        image,
                    },
                    &[],
                )
                .await
                .map_err(|e| match e {
                    super::workers::CallError::Worker(w)
                        if w.kind == bulkhead_ipc::wire::WorkerErrorKind::Image =>
                    {
                        w.detail
                            .chars()
                            .filter(|c| !c.is_control())
                            .take(200)
                            .collect()
                    }
                    other => other.to_string(),
                })?;
                self.refresh_sizes(&[node]).await;
                Ok(())
            }
            other => Err(format!(
                "bulkhead does not support blockdev-create for driver '{other}' yet"
            )),
        }
    }

    /// `quit`: running jobs are cancelled, as qsd's exit does.
    pub(super) async fn cancel_all_jobs(&mut self) {
        let ids: Vec<String> = self
            .jobs
            .list
            .iter()
            .filter(|j| Verb::Cancel.allowed(j.status))
            .map(|j| j.id.clone())
            .collect();
        for id in ids {
            // qsd's exit drains each job's nodes as it cancels it: a running job
            // pauses and resumes once (a ready one stands by), then goes.
            match self.jobs.get(&id).map(|j| j.status) {
                Some(JobStatus::Running) => {
                    self.transition(&id, JobStatus::Paused).await;
                    self.transition(&id, JobStatus::Running).await;
                }
                Some(JobStatus::Ready) => {
                    self.transition(&id, JobStatus::Standby).await;
                    self.transition(&id, JobStatus::Ready).await;
                }
                _ => {}
            }
            let _ = self.job_cancel(&id, Lookup::Job, true).await;
        }
    }

    /// The job holding `node`, for `blockdev-del` ("block device is in use by block
    /// job").
    pub(super) fn job_using(&self, node: &str) -> Option<&'static str> {
        self.jobs.user_of(node)
    }
}
