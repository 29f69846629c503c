//! Node statistics and write thresholds: `query-blockstats`,
//! `block-set-write-threshold`, `BLOCK_WRITE_THRESHOLD`.
//!
//! Runs in the supervisor. Each node has a statistics region (shared memory, see
//! `bulkhead_ipc::stats`) that its worker's node layer updates for every request; the
//! supervisor reads it here without asking the worker, and it outlives worker restarts
//! because the supervisor passes the same region with every `AddNode` of the node.
//! Values read back are untrusted (a compromised worker can write anything there):
//! they are clamped to what QMP can show, and the write threshold shown is only ever
//! the one the monitor set, or 0. See `design/node-state.md`.

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;

use bulkhead_ipc::stats::{StatsRegion, create_region};
use bulkhead_ipc::wire::{NodeId, WorkerId};
use serde_json::{Map, Value, json};

use super::graph::Node;
use super::{Core, QmpError, errors};

/// A node's statistics region and the supervisor's own record of its threshold.
#[derive(Debug)]
pub struct NodeStats {
    /// The region's memfd, passed with every `AddNode` of the node.
    fd: OwnedFd,
    /// The supervisor's mapping of it.
    region: StatsRegion,
    /// The threshold the monitor set (0 = none), cleared when the node reports it
    /// crossed. The region's copy is the worker's; this one is what QMP shows.
    threshold: u64,
}

impl NodeStats {
    /// A fresh, zeroed region for a new node.
    pub fn create() -> Result<NodeStats, QmpError> {
        let fail = errors::node_stats::<bulkhead_ipc::stats::StatsError>;
        let fd = create_region().map_err(fail)?;
        let region = StatsRegion::map_owned(&fd).map_err(fail)?;
        Ok(NodeStats {
            fd,
            region,
            threshold: 0,
        })
    }

    /// The region's descriptor, for `AddNode`.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The write threshold as `query-named-block-nodes` shows it: the monitor's value
    /// while the node has not cleared it (QEMU prints the uint64 as an int).
    pub fn write_threshold(&self) -> i64 {
        let in_region = self
            .region
            .counters()
            .write_threshold
            .load(Ordering::Relaxed);
        if in_region == 0 {
            0
        } else {
            self.threshold as i64
        }
    }

    /// Makes every guest-to-file mapping fetched so far stale (the node opens anew
    /// in a restarted worker, whose writes in flight at the crash never completed).
    pub fn invalidate_maps(&self) {
        self.region
            .counters()
            .map_epoch
            .fetch_add(1, Ordering::AcqRel);
    }

    fn set_threshold(&mut self, value: u64) {
        self.threshold = value;
        self.region
            .counters()
            .write_threshold
            .store(value, Ordering::Relaxed);
    }
}

/// Clamps an untrusted counter to QAPI's `int`.
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// BlockDeviceStats of a node without a BlockBackend (QEMU's `bdrv_query_bds_stats`
/// with `blk_level` false): only `wr_highest_offset` is the node's; everything else
/// is BlockBackend accounting, zero here (see `design/node-state.md`). Members in
/// QAPI order, so the writer's QDict order matches qsd.
fn device_stats(wr_highest_offset: i64) -> Value {
    let mut m = Map::new();
    for k in [
        "rd_bytes",
        "wr_bytes",
        "zone_append_bytes",
        "unmap_bytes",
        "rd_operations",
        "wr_operations",
        "zone_append_operations",
        "flush_operations",
        "unmap_operations",
        "rd_total_time_ns",
        "wr_total_time_ns",
        "zone_append_total_time_ns",
        "flush_total_time_ns",
        "unmap_total_time_ns",
    ] {
        m.insert(k.into(), 0.into());
    }
    m.insert("wr_highest_offset".into(), wr_highest_offset.into());
    for k in [
        "rd_merged",
        "wr_merged",
        "zone_append_merged",
        "unmap_merged",
        "failed_rd_operations",
        "failed_wr_operations",
        "failed_zone_append_operations",
        "failed_flush_operations",
        "failed_unmap_operations",
        "invalid_rd_operations",
        "invalid_wr_operations",
        "invalid_zone_append_operations",
        "invalid_flush_operations",
        "invalid_unmap_operations",
    ] {
        m.insert(k.into(), 0.into());
    }
    m.insert("account_invalid".into(), false.into());
    m.insert("account_failed".into(), false.into());
    m.insert("timed_stats".into(), json!([]));
    Value::Object(m)
}

impl Core {
    /// One node's BlockStats, with its data child as `parent` (QEMU follows the primary
    /// child when it stores data or is filtered, as raw's `file` is).
    fn node_stats(&self, node: &Node, depth: usize) -> Value {
        let c = node.stats.region.counters().snapshot();
        let mut m = Map::new();
        m.insert("node-name".into(), node.name.clone().into());
        m.insert("stats".into(), device_stats(int(c.wr_highest_offset)));
        if node.driver.is_posix() {
            let driver = node.driver.as_str();
            m.insert(
                "driver-specific".into(),
                json!({
                    "driver": driver,
                    "discard-nb-ok": c.discard_nb_ok,
                    "discard-nb-failed": c.discard_nb_failed,
                    "discard-bytes-ok": c.discard_bytes_ok,
                }),
            );
        }
        // The graph has no cycles; the bound only keeps a bug from recursing forever.
        if depth < 64
            && let Some(child) = node.file().and_then(|c| self.graph.get(c))
        {
            m.insert("parent".into(), self.node_stats(child, depth + 1));
        }
        Value::Object(m)
    }

    /// `query-blockstats`. Without `query-nodes` it lists named BlockBackends, which
    /// qsd never has (exports' BlockBackends are anonymous): `[]`. With it, every node
    /// in creation order.
    pub(super) fn query_blockstats(&self, query_nodes: bool) -> Value {
        if !query_nodes {
            return json!([]);
        }
        Value::Array(self.graph.iter().map(|n| self.node_stats(n, 0)).collect())
    }

    /// `block-set-write-threshold`: any node, exported or not; 0 disables. (QEMU's
    /// uint64 visitor already took a negative number modulo 2^64: -1 is u64::MAX.)
    pub(super) fn block_set_write_threshold(
        &mut self,
        name: &str,
        value: u64,
    ) -> Result<(), QmpError> {
        let node = self
            .graph
            .get_mut(name)
            .ok_or_else(|| errors::device_not_found_short(name))?;
        node.stats.set_threshold(value);
        Ok(())
    }

    /// A worker reports that `node` crossed `threshold` with a request ending at `end`.
    /// Accepted only from the node's own instance, for the threshold the monitor set
    /// and has not seen crossed yet, and for an end beyond it: anything else is stale
    /// (the threshold was changed meanwhile) or made up, and dropped.
    pub(super) async fn write_threshold_crossed(
        &mut self,
        from: WorkerId,
        node: NodeId,
        threshold: u64,
        end: u64,
    ) {
        let Some(n) = self
            .graph
            .iter_mut()
            .find(|n| n.id == node && n.home == from)
        else {
            tracing::warn!(worker = %from, "write threshold report for a node it does not serve");
            return;
        };
        if threshold == 0 || n.stats.threshold != threshold || end <= threshold {
            tracing::debug!(worker = %from, node = %n.name, "stale write threshold report");
            return;
        }
        n.stats.set_threshold(0);
        let data = json!({
            "node-name": n.name,
            "amount-exceeded": end - threshold,
            "write-threshold": threshold,
        });
        self.emit("BLOCK_WRITE_THRESHOLD", Some(data)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threshold_shown_is_the_monitors_or_zero_whatever_the_worker_writes() {
        let mut stats = NodeStats::create().expect("memfd");
        assert_eq!(stats.write_threshold(), 0);
        stats.set_threshold(10000);
        assert_eq!(stats.write_threshold(), 10000);
        let worker = StatsRegion::map_owned(stats.fd()).expect("map");
        // A worker writing some other value cannot make it show.
        worker
            .counters()
            .write_threshold
            .store(12345, Ordering::Relaxed);
        assert_eq!(stats.write_threshold(), 10000);
        // Clearing it (a crossing) shows 0.
        worker
            .counters()
            .write_threshold
            .store(0, Ordering::Relaxed);
        assert_eq!(stats.write_threshold(), 0);
        // QEMU prints the uint64 as an int.
        stats.set_threshold(u64::MAX);
        assert_eq!(stats.write_threshold(), -1);
    }

    #[test]
    fn counters_beyond_int_are_clamped() {
        assert_eq!(int(u64::MAX), i64::MAX);
        assert_eq!(int(69632), 69632);
        let v = device_stats(int(u64::MAX));
        assert_eq!(v["wr_highest_offset"], i64::MAX);
        assert_eq!(v["rd_operations"], 0);
        assert_eq!(v.as_object().map(Map::len), Some(32));
    }
}
