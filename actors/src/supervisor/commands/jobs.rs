//! Job commands: `block-commit`, `query-jobs`, `query-block-jobs`, the `job-*` verbs
//! and their `block-job-*` forms (the work is in `supervisor::jobs`).

use bulkhead_qmp::qapi::types::{
    BlockCommitArgs, BlockJobCancelArgs, BlockJobDeviceArgs, BlockJobSetSpeedArgs, BlockStreamArgs,
    BlockdevBackupArgs, BlockdevMirrorArgs, JobIdArgs, MirrorCopyMode, NoArgs,
};
use serde_json::Value;

use crate::supervisor::jobs::Lookup;
use crate::supervisor::{Core, QmpError};

pub(super) async fn block_commit(core: &mut Core, args: BlockCommitArgs) -> Result<(), QmpError> {
    core.block_commit(&args).await
}

pub(super) async fn blockdev_backup(
    core: &mut Core,
    args: BlockdevBackupArgs,
) -> Result<(), QmpError> {
    core.blockdev_backup(&args).await
}

/// `drive-backup` (deprecated; the visitor checked it, kept untyped).
pub(super) async fn drive_backup(
    core: &mut Core,
    args: serde_json::Map<String, Value>,
) -> Result<(), QmpError> {
    core.drive_backup(&args).await
}

/// `drive-mirror`.
pub(super) async fn drive_mirror(
    core: &mut Core,
    args: serde_json::Map<String, Value>,
) -> Result<(), QmpError> {
    core.drive_mirror(&args).await
}

pub(super) async fn blockdev_mirror(
    core: &mut Core,
    args: BlockdevMirrorArgs,
) -> Result<(), QmpError> {
    core.blockdev_mirror(&args).await
}

/// `block-job-change` (`BlockJobChangeOptions`: a union on `type` whose `mirror`
/// branch has `copy-mode`; the visitor has checked it).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BlockJobChangeArgs {
    id: String,
    #[serde(rename = "type")]
    _kind: String,
    #[serde(rename = "copy-mode")]
    copy_mode: Option<MirrorCopyMode>,
}

/// QEMU 10.0 does not compare `type` with the job's: a mirror job given another
/// branch reads the default copy mode, background.
pub(super) async fn block_job_change(
    core: &mut Core,
    a: BlockJobChangeArgs,
) -> Result<(), QmpError> {
    let write_blocking = a.copy_mode == Some(MirrorCopyMode::WriteBlocking);
    core.block_job_change(&a.id, write_blocking).await
}

/// `blockdev-create` (`BlockdevCreateArgs`; the options stay as the visitor checked
/// them: each driver reads its own).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BlockdevCreateArgs {
    #[serde(rename = "job-id")]
    job_id: String,
    options: serde_json::Map<String, Value>,
}

/// `x-blockdev-amend` (`options` as the visitor checked them).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BlockdevAmendArgs {
    #[serde(rename = "job-id")]
    job_id: String,
    #[serde(rename = "node-name")]
    node_name: String,
    options: serde_json::Map<String, Value>,
    /// Accepted as qsd does (it matters only for encryption keyslots).
    #[serde(default)]
    force: Option<bool>,
}

pub(super) async fn x_blockdev_amend(
    core: &mut Core,
    args: BlockdevAmendArgs,
) -> Result<(), QmpError> {
    let _ = args.force;
    core.blockdev_amend(&args.job_id, &args.node_name, &args.options)
        .await
}

pub(super) async fn block_stream(core: &mut Core, args: BlockStreamArgs) -> Result<(), QmpError> {
    core.block_stream(&args).await
}

pub(super) async fn blockdev_create(
    core: &mut Core,
    args: BlockdevCreateArgs,
) -> Result<(), QmpError> {
    core.blockdev_create(&args.job_id, &args.options).await
}

pub(super) async fn query_jobs(core: &mut Core, _: NoArgs) -> Result<Vec<Value>, QmpError> {
    Ok(core.query_jobs())
}

pub(super) async fn query_block_jobs(core: &mut Core, _: NoArgs) -> Result<Vec<Value>, QmpError> {
    Ok(core.query_block_jobs())
}

pub(super) async fn job_pause(core: &mut Core, a: JobIdArgs) -> Result<(), QmpError> {
    core.job_pause(&a.id, Lookup::Job).await
}

pub(super) async fn job_resume(core: &mut Core, a: JobIdArgs) -> Result<(), QmpError> {
    core.job_resume(&a.id, Lookup::Job).await
}

pub(super) async fn job_cancel(core: &mut Core, a: JobIdArgs) -> Result<(), QmpError> {
    core.job_cancel(&a.id, Lookup::Job, true).await
}

pub(super) async fn job_complete(core: &mut Core, a: JobIdArgs) -> Result<(), QmpError> {
    core.job_complete(&a.id, Lookup::Job).await
}

pub(super) async fn job_dismiss(core: &mut Core, a: JobIdArgs) -> Result<(), QmpError> {
    core.job_dismiss(&a.id, Lookup::Job).await
}

pub(super) async fn job_finalize(core: &mut Core, a: JobIdArgs) -> Result<(), QmpError> {
    core.job_finalize(&a.id, Lookup::Job).await
}

pub(super) async fn block_job_set_speed(
    core: &mut Core,
    a: BlockJobSetSpeedArgs,
) -> Result<(), QmpError> {
    core.job_set_speed(&a.device, a.speed).await
}

pub(super) async fn block_job_cancel(
    core: &mut Core,
    a: BlockJobCancelArgs,
) -> Result<(), QmpError> {
    core.job_cancel(&a.device, Lookup::BlockJob, a.force.unwrap_or(false))
        .await
}

pub(super) async fn block_job_pause(
    core: &mut Core,
    a: BlockJobDeviceArgs,
) -> Result<(), QmpError> {
    core.job_pause(&a.device, Lookup::BlockJob).await
}

pub(super) async fn block_job_resume(
    core: &mut Core,
    a: BlockJobDeviceArgs,
) -> Result<(), QmpError> {
    core.job_resume(&a.device, Lookup::BlockJob).await
}

pub(super) async fn block_job_complete(
    core: &mut Core,
    a: BlockJobDeviceArgs,
) -> Result<(), QmpError> {
    core.job_complete(&a.device, Lookup::BlockJob).await
}

pub(super) async fn block_job_dismiss(core: &mut Core, a: JobIdArgs) -> Result<(), QmpError> {
    core.job_dismiss(&a.id, Lookup::BlockJob).await
}

pub(super) async fn block_job_finalize(core: &mut Core, a: JobIdArgs) -> Result<(), QmpError> {
    core.job_finalize(&a.id, Lookup::BlockJob).await
}
