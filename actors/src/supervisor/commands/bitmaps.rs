//! Dirty bitmap commands and `transaction` (the work is in `supervisor::bitmaps` and
//! `supervisor::transaction`).

use bulkhead_qmp::qapi::types::{
    BlockDirtyBitmap, BlockDirtyBitmapAdd, BlockDirtyBitmapMerge, TransactionArgs,
};
use serde_json::{Value, json};

use crate::supervisor::{Core, QmpError};

pub(super) async fn block_dirty_bitmap_add(
    core: &mut Core,
    args: BlockDirtyBitmapAdd,
) -> Result<(), QmpError> {
    core.bitmap_add(
        &args.node,
        &args.name,
        args.granularity,
        args.persistent.unwrap_or(false),
        args.disabled.unwrap_or(false),
    )
    .await
}

pub(super) async fn block_dirty_bitmap_remove(
    core: &mut Core,
    args: BlockDirtyBitmap,
) -> Result<(), QmpError> {
    core.bitmap_remove(&args.node, &args.name).await
}

pub(super) async fn block_dirty_bitmap_clear(
    core: &mut Core,
    args: BlockDirtyBitmap,
) -> Result<(), QmpError> {
    core.bitmap_clear(&args.node, &args.name).await
}

pub(super) async fn block_dirty_bitmap_enable(
    core: &mut Core,
    args: BlockDirtyBitmap,
) -> Result<(), QmpError> {
    core.bitmap_set_enabled(&args.node, &args.name, true).await
}

pub(super) async fn block_dirty_bitmap_disable(
    core: &mut Core,
    args: BlockDirtyBitmap,
) -> Result<(), QmpError> {
    core.bitmap_set_enabled(&args.node, &args.name, false).await
}

/// qsd 10.0.2 aborts on an empty `bitmaps` list; here it merges nothing.
pub(super) async fn block_dirty_bitmap_merge(
    core: &mut Core,
    args: BlockDirtyBitmapMerge,
) -> Result<(), QmpError> {
    core.bitmap_merge(&args.node, &args.target, &args.bitmaps)
        .await
}

pub(super) async fn x_debug_block_dirty_bitmap_sha256(
    core: &mut Core,
    args: BlockDirtyBitmap,
) -> Result<Value, QmpError> {
    let hash = core.bitmap_sha256(&args.node, &args.name)?;
    Ok(json!({ "sha256": hash }))
}

/// `transaction` (`supervisor::transaction`).
pub(super) async fn transaction(core: &mut Core, args: TransactionArgs) -> Result<(), QmpError> {
    core.transaction(&args).await
}
