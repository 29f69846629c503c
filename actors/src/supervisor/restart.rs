//! Replacing dead workers: the restart budget, restoring an instance's state in
//! dependency order, and giving up.
//!
//! Runs in the supervisor, on the actor thread, like a command: nothing else is handled
//! while an instance is restored. See `design/restart.md`.

use std::rc::Rc;
use std::time::{Duration, Instant};

use bulkhead_ipc::wire::WorkerId;

use super::workers::WorkerDied;
use super::{Core, QmpError};

/// Most restarts of one worker instance within [`RESTART_WINDOW`]. Counted per
/// instance: a crash loop (an image that kills its worker on every open) stops after
/// this many, while a burst of unrelated deaths (an OOM kill of several workers at
/// once) costs each instance one restart.
pub const RESTART_BUDGET: usize = 5;
/// The window of the restart budget.
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// The restart budget: [`RESTART_BUDGET`], or `BULKHEAD_RESTART_BUDGET` from the
/// environment (kill-loop tests and operators with flaky hardware raise it).
fn restart_budget() -> usize {
    std::env::var("BULKHEAD_RESTART_BUDGET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RESTART_BUDGET)
}

impl Core {
    /// Called when a worker process ended (it has been reaped). If the instance holds
    /// state, a replacement is started and the state replayed, within the budget and
    /// after the backoff. The backoff does not hold the supervisor: the report is
    /// sent again once it is over, and commands keep running meanwhile (one that needs
    /// the instance restores it at once).
    pub async fn worker_died(&mut self, died: &WorkerDied) {
        let current = self
            .instances
            .get(&died.id)
            .and_then(|i| i.handle.as_ref())
            .is_some_and(|w| w.pid() == died.pid && !w.is_alive());
        if !current {
            // An older process of the instance (already replaced, e.g. restored early
            // because another instance needed it) or a retired instance.
            return;
        }
        let id = died.id;
        if self.stopping || !self.has_state(id) {
            if let Some(inst) = self.instances.get_mut(&id) {
                inst.handle = None;
            }
            self.channels.retain(|(a, b)| *a != id && *b != id);
            return;
        }
        if !died.backed_off {
            let Some(delay) = self.charge_restart(id).await else {
                return;
            };
            tracing::warn!(worker = %id, kind = %died.kind, status = %died.status, ?delay, "restarting worker");
            if !delay.is_zero() {
                let on_death = Rc::clone(&self.on_death);
                let again = WorkerDied {
                    backed_off: true,
                    ..died.clone()
                };
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(delay).await;
                    on_death(again);
                });
                return;
            }
        }
        if let Err(e) = self.restore_now(id).await {
            tracing::error!(worker = %id, status = %died.status, error = %e.desc, "worker not restored");
        }
    }

    /// Counts a restart of `id` against its budget and returns the backoff before it:
    /// 0, 100, 200, 400, 800 ms for successive recent restarts. Past the budget the
    /// instance is given up and `None` returned.
    async fn charge_restart(&mut self, id: WorkerId) -> Option<Duration> {
        let inst = self.instances.get_mut(&id)?;
        if inst.given_up {
            return None;
        }
        if inst.restart_pending {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        inst.recent_restarts
            .retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        let free = std::mem::take(&mut inst.free_retry);
        if !free && inst.recent_restarts.len() >= restart_budget() {
            let kind = inst.kind;
            tracing::error!(worker = %id, %kind, "restart budget exhausted; giving up on this worker");
            self.give_up(id).await;
            return None;
        }
        let delay = match inst.recent_restarts.len() {
            0 => Duration::ZERO,
            n => Duration::from_millis(100 << (n - 1).min(4)),
        };
        if !free {
            inst.recent_restarts.push_back(now);
        }
        inst.restart_count += 1;
        inst.restart_pending = true;
        Some(delay)
    }

    /// Restores instance `id` now (a command or another restore needs it): the
    /// restart is counted, the backoff skipped.
    pub(super) async fn restore(&mut self, id: WorkerId) -> Result<(), QmpError> {
        if self.charge_restart(id).await.is_none() {
            let kind = self.instances.get(&id).map(|i| i.kind);
            return Err(QmpError::generic(match kind {
                Some(k) => format!("The {k} worker keeps failing and was given up"),
                None => format!("worker {id} does not exist"),
            }));
        }
        self.restore_now(id).await
    }

    /// Starts a replacement for instance `id` and replays its state: its nodes (same
    /// ids, same image descriptors; a child in another instance is restored first if
    /// that one is dead too), the channels others use to reach it (whose pending
    /// requests are then resubmitted), and for the NBD instance the same listening
    /// socket and every export.
    ///
    /// If the replacement fails, it is killed: its death comes back to
    /// [`Core::worker_died`] as a new death of the instance, so a failed restore is
    /// retried within the budget (and without using it when an instance it depends on
    /// died meanwhile).
    async fn restore_now(&mut self, id: WorkerId) -> Result<(), QmpError> {
        if !self.restoring.insert(id) {
            return Err(QmpError::generic(format!("worker {id} depends on itself")));
        }
        let result = self.restore_once(id).await;
        self.restoring.remove(&id);
        if let Some(inst) = self.instances.get_mut(&id) {
            inst.restart_pending = false;
        }
        result
    }

    async fn restore_once(&mut self, id: WorkerId) -> Result<(), QmpError> {
        let Some(kind) = self.instances.get(&id).map(|i| i.kind) else {
            return Err(QmpError::generic(format!("worker {id} does not exist")));
        };
        // Instances this one reaches (children elsewhere) must be up before it replays.
        let deps = self.dependencies(id);
        // Instances that reach this one and whose channels must be re-made.
        let clients: Vec<WorkerId> = self
            .channels
            .iter()
            .filter(|(c, s)| *s == id && *c != id)
            .map(|(c, _)| *c)
            .collect();
        self.spawn(id).await?;
        match self.replay(id, &clients).await {
            Ok(()) => {
                tracing::info!(worker = %id, %kind, "worker restored");
                Ok(())
            }
            Err(e) => {
                // A dependency that died meanwhile is not this instance's fault.
                let dep_died = deps.iter().any(|d| self.running(*d).is_none());
                if let Some(inst) = self.instances.get_mut(&id) {
                    inst.free_retry = dep_died;
                    if let Some(w) = &inst.handle {
                        w.kill();
                    }
                }
                Err(e)
            }
        }
    }
    /// Replays instance `id`'s state into its fresh process, children first.
    async fn replay(&mut self, id: WorkerId, clients: &[WorkerId]) -> Result<(), QmpError> {
        // Nodes in creation order: a child is always older than its parents.
        let nodes: Vec<String> = self
            .graph
            .iter()
            .filter(|n| n.home == id)
            .map(|n| n.name.clone())
            .collect();
        for name in nodes {
            self.replay_node(&name).await?;
        }
        for client in clients {
            // A client that is dead too gets its channels when it is restored.
            if self.running(*client).is_some() {
                self.connect(*client, id).await?;
            }
        }
        if self.nbd_home == Some(id) {
            self.replay_nbd().await?;
        }
        Ok(())
    }

    /// The instances hosting nodes that instance `id` uses: children of its nodes in
    /// other instances, and for the NBD instance every exported node's instance.
    fn dependencies(&self, id: WorkerId) -> Vec<WorkerId> {
        let mut deps: Vec<WorkerId> = self
            .graph
            .iter()
            .filter(|n| n.home == id)
            .filter_map(|n| n.child.as_deref().and_then(|c| self.graph.get(c)))
            .map(|c| c.home)
            .filter(|h| *h != id)
            .collect();
        if self.nbd_home == Some(id) {
            deps.extend(
                self.exports
                    .iter()
                    .filter_map(|e| self.graph.get(&e.node))
                    .map(|n| n.home),
            );
        }
        deps.sort();
        deps.dedup();
        deps
    }

    /// After the restart budget is spent: exports that depend on the instance are
    /// deleted (with BLOCK_EXPORT_DELETED); its nodes stay in the graph but fail I/O.
    async fn give_up(&mut self, id: WorkerId) {
        if let Some(inst) = self.instances.get_mut(&id) {
            inst.given_up = true;
            if let Some(w) = inst.handle.take() {
                w.kill();
            }
        }
        self.channels.retain(|(a, b)| *a != id && *b != id);
        let is_nbd = self.nbd_home == Some(id);
        let doomed: Vec<String> = self
            .exports
            .iter()
            .filter(|e| is_nbd || self.chain_uses(&e.node, id))
            .map(|e| e.id.clone())
            .collect();
        for export in doomed {
            tracing::error!(%export, worker = %id, "deleting export: its worker keeps dying");
            self.finish_export_removal(&export).await;
        }
        if is_nbd {
            self.nbd = None;
            self.nbd_home = None;
        }
    }

    /// Whether `name` or a node below it lives on instance `id`.
    fn chain_uses(&self, name: &str, id: WorkerId) -> bool {
        self.graph.chain(name).iter().any(|n| n.home == id)
    }
}
