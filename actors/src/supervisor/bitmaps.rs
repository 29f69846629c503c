//! Dirty bitmaps: `block-dirty-bitmap-add/remove/clear/enable/disable/merge`,
//! `x-debug-block-dirty-bitmap-sha256`, and `dirty-bitmaps` in the node queries.
//!
//! Runs in the supervisor, which owns every bitmap's words: a sealed shared-memory
//! region per bitmap (`bulkhead_ipc::bitmap`) that it maps itself and passes to the
//! node's worker while the bitmap is enabled. Clearing, merging, counting and hashing
//! are done here on the supervisor's mapping, without asking the worker; the worker's
//! node layer marks every write that reaches the node (`worker::bitmaps`). The region
//! outlives the worker: a restarted worker gets the same regions with `AddNode`, so
//! no mark made before a crash is lost. The bits are as trustworthy as the node's
//! worker, which can write the image itself anyway. See `design/node-state.md`.

use std::os::fd::{AsFd, OwnedFd};

use bulkhead_bitmap::{DirtyBitmap, words_for};
use bulkhead_ipc::bitmap::{BitmapWords, create_region};
use bulkhead_ipc::wire::{
    BitmapSpec, MAX_RECORDING_BITMAPS, NodeId, StoredBitmapSpec, ToWorker, WorkerId,
};
use bulkhead_qmp::qapi::types::BlockDirtyBitmapOrStr;
use serde_json::{Map, Value};

use super::graph::Node;
use super::{Core, QmpError, errors};

/// QEMU's `BDRV_BITMAP_MAX_NAME_SIZE`.
const MAX_NAME: usize = 1023;

/// One named dirty bitmap of a node.
#[derive(Debug)]
pub struct Bitmap {
    /// Its name, unique on the node.
    pub name: String,
    /// Writes mark it (`recording`).
    pub enabled: bool,
    /// Stored in the node's image when the node closes (qcow2).
    pub persistent: bool,
    /// Loaded from a read-only image: the monitor may read it but not change it.
    pub readonly: bool,
    /// Exports that offer it: while any does, the monitor may not change it (`busy`).
    pub users: u32,
    /// The region, passed to the node's worker while enabled.
    fd: OwnedFd,
    /// The supervisor's mapping of it.
    bits: DirtyBitmap<BitmapWords>,
    /// The bits a backup copies, frozen at its start (QEMU's frozen parent):
    /// queries show these while the bitmap records from empty.
    frozen: Option<Frozen>,
}

/// A frozen copy of a bitmap's bits in a region of its own (passed read-only in
/// spirit to the worker running the backup: it only reads it).
#[derive(Debug)]
pub struct Frozen {
    fd: OwnedFd,
    bits: DirtyBitmap<BitmapWords>,
}

impl Frozen {
    /// The region's descriptor.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The bits.
    pub fn bits(&self) -> &DirtyBitmap<BitmapWords> {
        &self.bits
    }
}

impl Bitmap {
    /// A clean bitmap over `size` bytes in a new region.
    fn create(name: &str, size: u64, granularity: u64, enabled: bool) -> Result<Bitmap, QmpError> {
        let words = words_for(size, granularity);
        let fd = create_region(words).map_err(errors::bitmap_region)?;
        let mapped = BitmapWords::map(fd.as_fd(), words).map_err(errors::bitmap_region)?;
        let bits = DirtyBitmap::on(mapped, size, granularity).map_err(errors::from_error)?;
        Ok(Bitmap {
            name: name.to_string(),
            enabled,
            persistent: false,
            readonly: false,
            users: 0,
            fd,
            bits,
            frozen: None,
        })
    }

    /// The bits queries and hashes show: the frozen ones during a backup.
    fn shown(&self) -> &DirtyBitmap<BitmapWords> {
        self.frozen.as_ref().map_or(&self.bits, |f| &f.bits)
    }

    /// The frozen bits, during a backup that copies them.
    pub fn frozen(&self) -> Option<&Frozen> {
        self.frozen.as_ref()
    }

    /// The bits.
    pub fn bits(&self) -> &DirtyBitmap<BitmapWords> {
        &self.bits
    }

    /// What the node's worker needs to map it.
    pub fn spec(&self) -> BitmapSpec {
        BitmapSpec {
            size: self.bits.size(),
            granularity: self.bits.granularity(),
        }
    }

    /// The region's descriptor.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// A read-only descriptor of a region holding what to store: during a backup
    /// the frozen bits and those recorded since, merged into a copy; otherwise the
    /// bitmap's own region. Read-only: the worker storing a disabled bitmap must not
    /// be able to change it.
    fn stored_region(&self) -> Result<(OwnedFd, BitmapSpec), QmpError> {
        let spec = self.spec();
        let fd = match &self.frozen {
            None => bulkhead_ipc::shm::read_only_copy(self.fd.as_fd()),
            Some(f) => {
                let copy = Bitmap::create(&self.name, spec.size, spec.granularity, false)?;
                copy.bits.merge_from(&f.bits).map_err(errors::from_error)?;
                copy.bits
                    .merge_from(&self.bits)
                    .map_err(errors::from_error)?;
                bulkhead_ipc::shm::read_only_copy(copy.fd.as_fd())
            }
        };
        Ok((fd.map_err(errors::bitmap_region)?, spec))
    }

    /// Whether an operation holds it (QEMU's `busy`).
    pub fn busy(&self) -> bool {
        self.users > 0
    }

    /// The same bitmap over a node of `size` bytes: a new region with the bits both
    /// sizes cover (`bdrv_dirty_bitmap_truncate`).
    fn resized(&self, size: u64) -> Result<Bitmap, QmpError> {
        let new = Bitmap::create(&self.name, size, self.bits.granularity(), self.enabled)?;
        new.bits.copy_resized(&self.bits);
        Ok(Bitmap {
            users: self.users,
            persistent: self.persistent,
            readonly: self.readonly,
            ..new
        })
    }

    /// `BlockDirtyInfo`, members in qsd's order.
    pub fn info(&self) -> Value {
        let mut m = Map::new();
        m.insert("name".into(), self.name.clone().into());
        m.insert("recording".into(), self.enabled.into());
        m.insert("persistent".into(), self.persistent.into());
        m.insert("busy".into(), self.busy().into());
        m.insert("granularity".into(), self.bits.granularity().into());
        m.insert("count".into(), self.shown().count().into());
        Value::Object(m)
    }

    /// QEMU's `bdrv_dirty_bitmap_check` for the monitor's changes: a busy bitmap
    /// cannot be used, a read-only one not changed.
    fn check(&self) -> Result<(), QmpError> {
        self.check_allow_ro()?;
        if self.readonly {
            return Err(errors::bitmap_readonly(&self.name));
        }
        Ok(())
    }

    /// The same with `BDRV_BITMAP_ALLOW_RO` (enable and disable).
    fn check_allow_ro(&self) -> Result<(), QmpError> {
        if self.busy() {
            return Err(errors::bitmap_busy(&self.name));
        }
        Ok(())
    }

    /// Its writes' marks go to the node's worker.
    fn records(&self) -> bool {
        self.enabled && !self.readonly
    }
}

/// A bitmap `block-dirty-bitmap-add` may create.
#[derive(Debug, Clone, Copy)]
pub(super) struct NewBitmap {
    /// Bytes it covers: the node's size.
    pub size: u64,
    /// Bytes per bit.
    pub granularity: u64,
}

/// Where a bitmap is: its node and its index in the node's list.
type Found = (String, usize);

impl Core {
    /// `block_dirty_bitmap_lookup`: the node (by node-name) and the bitmap on it.
    fn find_bitmap(&self, node: &str, name: &str) -> Result<Found, QmpError> {
        let n = self
            .graph
            .get(node)
            .ok_or_else(|| errors::bitmap_node_not_found(node))?;
        let i = n
            .bitmaps
            .iter()
            .position(|b| b.name == name)
            .ok_or_else(|| errors::bitmap_not_found(name))?;
        Ok((n.name.clone(), i))
    }

    fn bitmap(&self, (node, i): &Found) -> Result<&Bitmap, QmpError> {
        self.graph
            .get(node)
            .and_then(|n| n.bitmaps.get(*i))
            .ok_or_else(errors::node_vanished)
    }

    fn bitmap_mut(&mut self, (node, i): &Found) -> Result<&mut Bitmap, QmpError> {
        self.graph
            .get_mut(node)
            .and_then(|n| n.bitmaps.get_mut(*i))
            .ok_or_else(errors::node_vanished)
    }

    /// What `block-dirty-bitmap-add` checks before it looks at the node's own
    /// bitmaps, in QEMU's order: the name, the node, the granularity, persistence.
    pub(super) fn check_bitmap_add(
        &self,
        node: &str,
        name: &str,
        granularity: Option<u32>,
        persistent: bool,
    ) -> Result<NewBitmap, QmpError> {
        if name.is_empty() {
            return Err(errors::bitmap_name_empty());
        }
        let n = self
            .graph
            .get(node)
            .ok_or_else(|| errors::device_not_found(node, node))?;
        let granularity = match granularity {
            Some(g) => {
                let g = u64::from(g);
                bulkhead_bitmap::check_granularity(g).map_err(errors::from_error)?;
                g
            }
            None => bulkhead_bitmap::default_granularity(cluster_size(n)),
        };
        if persistent {
            // bdrv_co_can_store_new_dirty_bitmap: a name in use first, then only
            // qcow2 stores bitmaps.
            let exists = n.bitmaps.iter().any(|b| b.name == name)
                || n.format
                    .as_ref()
                    .is_some_and(|f| f.dirty_bitmaps.iter().any(|b| b.name == name));
            if exists {
                return Err(errors::bitmap_exists(name));
            }
            let Some(f) = n.format.as_ref() else {
                return Err(errors::bitmap_persistence_unsupported(&n.name));
            };
            let mut names: Vec<&str> = n
                .bitmaps
                .iter()
                .filter(|b| b.persistent)
                .map(|b| b.name.as_str())
                .collect();
            // Those the image still holds (a restarted worker's engine lists the
            // supervisor's again, as inconsistent: counted once).
            names.extend(
                f.dirty_bitmaps
                    .iter()
                    .map(|b| b.name.as_str())
                    .filter(|d| !n.bitmaps.iter().any(|b| b.name == *d)),
            );
            let version = if f.compat == "0.10" { 2 } else { 3 };
            bulkhead_qcow2::can_store_new(
                version,
                &names,
                n.size,
                f.cluster_size,
                name,
                granularity,
            )
            .map_err(|why| errors::bitmap_cannot_persist(name, &n.name, &why))?;
        }
        if name.len() > MAX_NAME {
            return Err(errors::bitmap_name_too_long(name));
        }
        // The bitmaps the image brought (held by the qcow2 engine) take their names.
        let loaded = n
            .format
            .as_ref()
            .is_some_and(|f| f.dirty_bitmaps.iter().any(|b| b.name == name));
        if loaded {
            return Err(errors::bitmap_exists(name));
        }
        Ok(NewBitmap {
            size: n.size,
            granularity,
        })
    }

    /// `block-dirty-bitmap-add`.
    pub(super) async fn bitmap_add(
        &mut self,
        node: &str,
        name: &str,
        granularity: Option<u32>,
        persistent: bool,
        disabled: bool,
    ) -> Result<(), QmpError> {
        let new = self.check_bitmap_add(node, name, granularity, persistent)?;
        let n = self.graph.get(node).ok_or_else(errors::node_vanished)?;
        if n.bitmaps.iter().any(|b| b.name == name) {
            return Err(errors::bitmap_exists(name));
        }
        if !disabled && recording(n) >= MAX_RECORDING_BITMAPS {
            return Err(errors::too_many_recording_bitmaps(MAX_RECORDING_BITMAPS));
        }
        let mut bitmap = Bitmap::create(name, new.size, new.granularity, !disabled)?;
        bitmap.persistent = persistent;
        if let Some(n) = self.graph.get_mut(node) {
            n.bitmaps.push(bitmap);
        }
        if !disabled {
            self.push_bitmaps(node).await;
        }
        Ok(())
    }

    /// `block-dirty-bitmap-remove`.
    pub(super) async fn bitmap_remove(&mut self, node: &str, name: &str) -> Result<(), QmpError> {
        let found = self.find_bitmap(node, name)?;
        let b = self.bitmap(&found)?;
        b.check()?;
        let enabled = b.enabled;
        if b.persistent {
            // QEMU drops it from the image first; a failure keeps the bitmap.
            self.unstore_bitmap(&found.0, name).await?;
        }
        if let Some(n) = self.graph.get_mut(&found.0) {
            n.bitmaps.remove(found.1);
        }
        if enabled {
            self.push_bitmaps(&found.0).await;
        }
        Ok(())
    }

    /// `block-dirty-bitmap-clear`.
    pub(super) async fn bitmap_clear(&mut self, node: &str, name: &str) -> Result<(), QmpError> {
        let found = self.find_bitmap(node, name)?;
        let b = self.bitmap(&found)?;
        b.check()?;
        b.bits.clear();
        Ok(())
    }

    /// `block-dirty-bitmap-enable` and `-disable`.
    pub(super) async fn bitmap_set_enabled(
        &mut self,
        node: &str,
        name: &str,
        enabled: bool,
    ) -> Result<(), QmpError> {
        let found = self.find_bitmap(node, name)?;
        let b = self.bitmap(&found)?;
        b.check_allow_ro()?;
        if b.enabled == enabled {
            return Ok(());
        }
        if enabled
            && self
                .graph
                .get(&found.0)
                .is_some_and(|n| recording(n) >= MAX_RECORDING_BITMAPS)
        {
            return Err(errors::too_many_recording_bitmaps(MAX_RECORDING_BITMAPS));
        }
        self.bitmap_mut(&found)?.enabled = enabled;
        self.push_bitmaps(&found.0).await;
        Ok(())
    }

    /// `block-dirty-bitmap-merge`: every source is checked before the target
    /// changes, in QEMU's order (each source: found, then the same size; then the
    /// target's own check).
    pub(super) async fn bitmap_merge(
        &mut self,
        node: &str,
        target: &str,
        sources: &[BlockDirtyBitmapOrStr],
    ) -> Result<(), QmpError> {
        let dst = self.find_bitmap(node, target)?;
        let mut found = Vec::with_capacity(sources.len());
        let dst_size = self.bitmap(&dst)?.bits.size();
        for s in sources {
            let src = match s {
                BlockDirtyBitmapOrStr::Local(name) => {
                    let n = self.graph.get(&dst.0).ok_or_else(errors::node_vanished)?;
                    let i = n
                        .bitmaps
                        .iter()
                        .position(|b| &b.name == name)
                        .ok_or_else(|| errors::bitmap_not_found(name))?;
                    (dst.0.clone(), i)
                }
                BlockDirtyBitmapOrStr::External(e) => self.find_bitmap(&e.node, &e.name)?,
            };
            let size = self.bitmap(&src)?.bits.size();
            if size != dst_size {
                return Err(errors::from_error(
                    bulkhead_bitmap::BitmapError::Incompatible {
                        destination: dst_size,
                        from: size,
                    },
                ));
            }
            found.push(src);
        }
        let d = self.bitmap(&dst)?;
        d.check()?;
        for src in &found {
            d.bits
                .merge_from(&self.bitmap(src)?.bits)
                .map_err(errors::from_error)?;
        }
        Ok(())
    }

    /// `x-debug-block-dirty-bitmap-sha256`.
    pub(super) fn bitmap_sha256(&self, node: &str, name: &str) -> Result<String, QmpError> {
        let found = self.find_bitmap(node, name)?;
        Ok(self.bitmap(&found)?.shown().sha256())
    }

    /// A backup takes bitmap `name` of `node` (QEMU's freeze): the bitmap becomes
    /// busy, its bits move to a frozen copy, and it records from empty. Done before
    /// the backup's point in time; [`Core::refreeze_bitmap`] after it adds what was
    /// written in between.
    pub(super) fn freeze_bitmap(&mut self, node: &str, name: &str) -> Result<(), QmpError> {
        let found = self.find_bitmap(node, name)?;
        let b = self.bitmap_mut(&found)?;
        let copy = Bitmap::create(name, b.bits.size(), b.bits.granularity(), false)?;
        copy.bits.merge_from(&b.bits).map_err(errors::from_error)?;
        b.bits.clear();
        b.users += 1;
        b.frozen = Some(Frozen {
            fd: copy.fd,
            bits: copy.bits,
        });
        Ok(())
    }

    /// After the backup's point in time: the frozen copy also takes what was
    /// written since the freeze (the bitmap keeps it too).
    pub(super) fn refreeze_bitmap(&mut self, node: &str, name: &str) -> Result<(), QmpError> {
        let found = self.find_bitmap(node, name)?;
        let b = self.bitmap(&found)?;
        if let Some(f) = &b.frozen {
            f.bits.merge_from(&b.bits).map_err(errors::from_error)?;
        }
        Ok(())
    }

    /// The backup is over: with `restore` the frozen bits go back into the bitmap
    /// (it failed, or `bitmap-mode: never`); otherwise the bitmap keeps only what
    /// was written since (QEMU's successor). No longer busy either way.
    pub(super) fn thaw_bitmap(&mut self, node: &str, name: &str, restore: bool) {
        let Ok(found) = self.find_bitmap(node, name) else {
            return;
        };
        let Ok(b) = self.bitmap_mut(&found) else {
            return;
        };
        if let Some(f) = b.frozen.take()
            && restore
            && let Err(e) = b.bits.merge_from(&f.bits)
        {
            tracing::warn!(bitmap = name, error = %e, "the frozen bits did not go back");
        }
        b.users = b.users.saturating_sub(1);
    }

    /// Gives the node's worker the enabled bitmaps of `node` (after any change of
    /// the set). A worker that is not running gets them with `AddNode` when it
    /// comes back; one that fails the call is logged: it is dying, and its
    /// replacement gets them the same way.
    pub(super) async fn push_bitmaps(&mut self, node: &str) {
        let Some(n) = self.graph.get(node) else {
            return;
        };
        let (specs, fds) = recording_regions(n);
        let (id, home) = (n.id, n.home);
        let Some(w) = self.running(home) else {
            return;
        };
        let fds: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        if let Err(e) = w
            .call(
                ToWorker::SetBitmaps {
                    node: id,
                    bitmaps: specs,
                },
                &fds,
            )
            .await
        {
            tracing::warn!(node, error = %e, "worker did not take the new bitmap set");
        }
    }

    /// The usable persistent bitmaps a qcow2 node's image brought move into
    /// regions of their own, as every other bitmap (the worker fills them and the
    /// engine stops tracking them), so that the commands, exports and backups use
    /// them alike and a dying worker loses none of their bits (a read-only image's
    /// are read-only: QEMU's `BDRV_BITMAP_RO`). Done once, when the node opens; those that cannot move (more than a node records, a failing
    /// worker) stay with the engine, shown as before.
    pub(super) async fn adopt_image_bitmaps(&mut self, node: &str) {
        let Some(n) = self.graph.get(node) else {
            return;
        };
        let Some(f) = n.format.as_ref() else {
            return;
        };
        let readonly = n.read_only;
        let mut room = MAX_RECORDING_BITMAPS.saturating_sub(recording(n));
        let mut moving = Vec::new();
        for b in f.dirty_bitmaps.iter().filter(|b| !b.inconsistent) {
            if n.bitmaps.iter().any(|m| m.name == b.name) {
                continue;
            }
            if b.recording && !readonly {
                if room == 0 {
                    continue;
                }
                room -= 1;
            }
            match Bitmap::create(&b.name, n.size, b.granularity, b.recording) {
                Ok(mut m) => {
                    m.persistent = true;
                    m.readonly = readonly;
                    moving.push(m);
                }
                Err(e) => {
                    tracing::warn!(node, bitmap = %b.name, error = %e.desc, "bitmap stays with the image")
                }
            }
        }
        let (id, home) = (n.id, n.home);
        // Those handed over: a prefix of `moving` (a failing batch ends it).
        let mut handed = 0;
        for batch in moving.chunks(bulkhead_ipc::fd::MAX_FDS_PER_MESSAGE) {
            match self.take_into(home, id, batch).await {
                Ok(()) => handed += batch.len(),
                Err(e) => {
                    tracing::warn!(node, error = %e, "the image's bitmaps stay with it");
                    break;
                }
            }
        }
        moving.truncate(handed);
        let adopted = moving;
        if adopted.is_empty() {
            return;
        }
        let any_enabled = adopted.iter().any(Bitmap::records);
        if let Some(n) = self.graph.get_mut(node) {
            if let Some(f) = n.format.as_mut() {
                f.dirty_bitmaps
                    .retain(|d| !adopted.iter().any(|a| a.name == d.name));
            }
            // QEMU lists them newest first, the directory's last first: as if
            // created in directory order.
            n.bitmaps.splice(0..0, adopted);
        }
        if any_enabled {
            self.push_bitmaps(node).await;
        }
    }

    /// Stores the node's persistent bitmaps in its image (QEMU does it as a node
    /// closes): those the image has keep their places, new ones follow newest
    /// first. A failure is logged, as QEMU warns: the bitmaps stay in use on disk,
    /// inconsistent at the next open.
    pub(super) async fn store_persistent_bitmaps(&mut self, node: &str) {
        let Some(n) = self.graph.get(node) else {
            return;
        };
        if n.read_only || !n.active || n.format.is_none() {
            return;
        }
        let list: Vec<&Bitmap> = n.bitmaps.iter().rev().filter(|b| b.persistent).collect();
        if list.is_empty() {
            return;
        }
        let Some(w) = self.running(n.home) else {
            // They stay in use on disk: inconsistent at the next open.
            tracing::warn!(
                node,
                "persistent bitmaps not stored: the node's worker is not running"
            );
            return;
        };
        for batch in list.chunks(bulkhead_ipc::fd::MAX_FDS_PER_MESSAGE) {
            let mut fds = Vec::with_capacity(batch.len());
            let mut specs = Vec::with_capacity(batch.len());
            for b in batch {
                // What the frozen copy holds is part of the bitmap too.
                match b.stored_region() {
                    Ok((fd, spec)) => {
                        fds.push(fd);
                        specs.push(StoredBitmapSpec {
                            name: b.name.clone(),
                            enabled: b.enabled,
                            spec,
                        });
                    }
                    Err(e) => {
                        tracing::warn!(node, bitmap = %b.name, error = %e.desc, "bitmap not stored");
                    }
                }
            }
            let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            if let Err(e) = w
                .call(
                    ToWorker::StoreBitmaps {
                        node: n.id,
                        bitmaps: specs,
                    },
                    &borrowed,
                )
                .await
            {
                tracing::warn!(node, error = %e, "Failed to write bitmap(s) to the image");
            }
        }
    }

    /// After a reopen opened the image in a new engine: the supervisor's bitmaps stay
    /// the real ones (stored before the reopen). The new engine's loaded copies of
    /// them are taken into scratch regions and dropped, so that it neither tracks
    /// nor stores them, and persistent bitmaps are read-only exactly while the node
    /// is (QEMU's `qcow2_reopen_bitmaps_ro`/`_rw`).
    pub(super) async fn bitmaps_after_reopen(&mut self, node: &str) {
        let Some(n) = self.graph.get(node) else {
            return;
        };
        if n.format.is_none() || !n.bitmaps.iter().any(|b| b.persistent) {
            return;
        }
        let (id, home) = (n.id, n.home);
        let Some(w) = self.running(home) else {
            return;
        };
        let format = match w.call(ToWorker::QueryNode { node: id }, &[]).await {
            Ok(bulkhead_ipc::wire::Reply::NodeInfo { format, .. }) => format,
            _ => None,
        };
        let Some(n) = self.graph.get_mut(node) else {
            return;
        };
        if let Some(f) = format {
            n.format = Some(f);
        }
        let read_only = n.read_only;
        for b in n.bitmaps.iter_mut().filter(|b| b.persistent) {
            b.readonly = read_only;
        }
        let mut scratch = Vec::new();
        if let Some(f) = n.format.as_ref() {
            for d in f.dirty_bitmaps.iter().filter(|d| !d.inconsistent) {
                if n.bitmaps.iter().any(|b| b.persistent && b.name == d.name) {
                    match Bitmap::create(&d.name, n.size, d.granularity, false) {
                        Ok(b) => scratch.push(b),
                        Err(e) => {
                            tracing::warn!(node, bitmap = %d.name, error = %e.desc, "bitmap stays with the image")
                        }
                    }
                }
            }
        }
        let taken: Vec<String> = scratch.iter().map(|b| b.name.clone()).collect();
        for batch in scratch.chunks(bulkhead_ipc::fd::MAX_FDS_PER_MESSAGE) {
            if let Err(e) = self.take_into(home, id, batch).await {
                tracing::warn!(node, error = %e, "the reopened image keeps its copies of the bitmaps");
            }
        }
        if let Some(f) = self.graph.get_mut(node).and_then(|n| n.format.as_mut()) {
            f.dirty_bitmaps.retain(|d| !taken.contains(&d.name));
        }
        self.push_bitmaps(node).await;
    }

    /// `TakeBitmaps`: node `id`'s worker fills `batch`'s regions with the bits of
    /// the image's bitmaps of the same names, and its engine stops tracking them.
    async fn take_into(&self, home: WorkerId, id: NodeId, batch: &[Bitmap]) -> Result<(), String> {
        let w = self
            .running(home)
            .ok_or_else(|| "the node's worker is not running".to_string())?;
        let specs = batch.iter().map(|b| (b.name.clone(), b.spec())).collect();
        let fds: Vec<_> = batch.iter().map(|b| b.fd.as_fd()).collect();
        w.call(
            ToWorker::TakeBitmaps {
                node: id,
                bitmaps: specs,
            },
            &fds,
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    /// Drops persistent bitmap `name` from `node`'s image (`block-dirty-bitmap-remove`).
    async fn unstore_bitmap(&mut self, node: &str, name: &str) -> Result<(), QmpError> {
        let n = self.graph.get(node).ok_or_else(errors::node_vanished)?;
        if n.read_only {
            return Ok(());
        }
        let id = n.id;
        let w = self
            .running(n.home)
            .ok_or_else(|| errors::worker_not_running(n.home))?;
        w.call(
            ToWorker::RemoveStoredBitmap {
                node: id,
                name: name.to_string(),
            },
            &[],
        )
        .await
        .map_err(|e| errors::bitmap_unstore_failed(name, &e))?;
        Ok(())
    }

    /// After sizes changed (a resize, a query that re-read them): every bitmap of a
    /// node whose size differs from its bitmaps' moves to a region of the new size,
    /// keeping the bits both cover.
    pub(super) async fn resize_bitmaps(&mut self) {
        let stale: Vec<String> = self
            .graph
            .iter()
            .filter(|n| n.bitmaps.iter().any(|b| b.bits.size() != n.size))
            .map(|n| n.name.clone())
            .collect();
        for name in stale {
            let Some(n) = self.graph.get_mut(&name) else {
                continue;
            };
            let size = n.size;
            let mut resized = Vec::with_capacity(n.bitmaps.len());
            for b in &n.bitmaps {
                match b.resized(size) {
                    Ok(r) => resized.push(r),
                    Err(e) => {
                        tracing::warn!(node = %name, bitmap = %b.name, error = %e.desc, "bitmap keeps its old size");
                        break;
                    }
                }
            }
            if resized.len() != n.bitmaps.len() {
                continue;
            }
            let old = std::mem::replace(&mut n.bitmaps, resized);
            self.push_bitmaps(&name).await;
            // Marks the worker made in the old regions before it switched.
            if let Some(n) = self.graph.get(&name) {
                for (new, old) in n.bitmaps.iter().zip(&old) {
                    new.bits.copy_resized(&old.bits);
                }
            }
        }
    }
}

/// The specs and regions of the bitmaps `n`'s writes mark, for `AddNode` and
/// `SetBitmaps`.
pub(super) fn recording_regions(n: &Node) -> (Vec<BitmapSpec>, Vec<&OwnedFd>) {
    n.bitmaps
        .iter()
        .filter(|b| b.records())
        .map(|b| (b.spec(), b.fd()))
        .unzip()
}

fn recording(n: &Node) -> usize {
    n.bitmaps.iter().filter(|b| b.records()).count()
}

/// The node's cluster size, where its format has one (the default granularity).
fn cluster_size(n: &Node) -> Option<u64> {
    n.format.as_ref().map(|f| f.cluster_size)
}

/// `dirty-bitmaps` of `query-named-block-nodes`: newest first, as QEMU lists a
/// node's bitmaps; those the image had when it opened are the oldest.
pub fn dirty_bitmaps(n: &Node) -> Vec<Value> {
    let mut out = Vec::new();
    // A frozen bitmap's successor (what it records meanwhile) is QEMU's newest
    // bitmap, anonymous.
    for b in n.bitmaps.iter().filter(|b| b.frozen.is_some()).rev() {
        let mut m = Map::new();
        m.insert("recording".into(), b.enabled.into());
        m.insert("persistent".into(), false.into());
        m.insert("busy".into(), false.into());
        m.insert("granularity".into(), b.bits.granularity().into());
        m.insert("count".into(), b.bits.count().into());
        out.push(Value::Object(m));
    }
    out.extend(n.bitmaps.iter().rev().map(Bitmap::info));
    out
}
