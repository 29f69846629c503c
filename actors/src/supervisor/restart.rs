//! Replacing dead workers: the restart budget, restoring an instance's state in
//! dependency order, and giving up.
//!
//! Runs in the supervisor, on the actor thread, like a command: nothing else is handled
//! while an instance is restored. See `design/restart.md`.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bulkhead_ipc::wire::WorkerId;

use super::workers::{WorkerDied, WorkerHandle};
use super::{Core, QmpError, errors};

/// Most restarts of one worker instance within [`RESTART_WINDOW`]. Counted per
/// instance: a crash loop (an image that kills its worker on every open) stops after
/// this many, while a burst of unrelated deaths (an OOM kill of several workers at
/// once) costs each instance one restart.
pub const RESTART_BUDGET: usize = 5;
/// The window of the restart budget.
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// How soon a restore whose replacement could not even start is tried again.
const RETRY_DELAY: Duration = Duration::from_millis(100);

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
        // A top-level entry: no restore is running. (One abandoned mid-way, when a
        // dependency died under it, may have left its mark.)
        self.restoring.clear();
        let current = self.instances.get_mut(&died.id).is_some_and(|i| {
            let dead = i.handle.as_ref().is_none_or(|w| !w.is_alive());
            match (&i.handle, died.pid) {
                // A scheduled retry of a restore that left no process to report: it
                // is due whatever happened meanwhile (so a later failure can schedule
                // another), and acted on only if the instance is still down.
                (_, 0) => std::mem::take(&mut i.retry_scheduled) && dead,
                (Some(w), pid) => w.pid() == pid && dead,
                (None, _) => false,
            }
        });
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
                if died.pid == 0
                    && let Some(inst) = self.instances.get_mut(&id)
                {
                    // The retry comes back after the backoff, still a retry.
                    inst.retry_scheduled = true;
                }
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
            self.retry_if_silent(id);
        }
        // A restored export worker starts without mappings.
        self.sync_mappings().await;
    }

    /// After a failed restore: if no process is left whose death would bring the
    /// instance back here (its replacement failed to start), schedule a retry, so a
    /// failure is never final while the budget lasts.
    fn retry_if_silent(&mut self, id: WorkerId) {
        let Some(inst) = self.instances.get_mut(&id) else {
            return;
        };
        // A live process (the replacement, killed after a failed replay) reports its
        // own death; a dead one has already been reported.
        let alive = inst.handle.as_ref().is_some_and(WorkerHandle::is_alive);
        if inst.given_up || alive || inst.retry_scheduled {
            return;
        }
        inst.retry_scheduled = true;
        let on_death = Rc::clone(&self.on_death);
        let again = WorkerDied {
            id,
            kind: inst.kind,
            pid: 0,
            status: "restore failed".into(),
            backed_off: false,
        };
        tokio::task::spawn_local(async move {
            tokio::time::sleep(RETRY_DELAY).await;
            on_death(again);
        });
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
            n => Duration::from_millis(100 << (n - 1).min(3)),
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
            return Err(match kind {
                Some(k) => errors::worker_given_up(k),
                None => errors::no_such_worker(id),
            });
        }
        let restored = self.restore_now(id).await;
        if restored.is_err() {
            self.retry_if_silent(id);
        }
        restored
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
            return Err(errors::restore_cycle(id));
        }
        let result = self.restore_once(id).await;
        self.restoring.remove(&id);
        // A replaced export worker takes hand-offs again.
        self.refresh_asks();
        if let Some(inst) = self.instances.get_mut(&id) {
            inst.restart_pending = false;
        }
        result
    }

    async fn restore_once(&mut self, id: WorkerId) -> Result<(), QmpError> {
        let Some(kind) = self.instances.get(&id).map(|i| i.kind) else {
            return Err(errors::no_such_worker(id));
        };
        // Instances this one reaches (children elsewhere) must be up before it replays:
        // any that is dead is restored first.
        let deps = self.dependencies(id);
        for d in &deps {
            if let Err(e) = self.worker(*d).await {
                // Not this instance's fault: its retry does not use its budget.
                if let Some(inst) = self.instances.get_mut(&id) {
                    inst.free_retry = true;
                }
                return Err(e);
            }
        }
        // If one of them dies while this one replays, a call may wait on it (a data
        // channel request waits for the dead peer's replacement), and the supervisor,
        // busy here, could not replace it: watch for that and give up the attempt.
        let watched: Vec<_> = deps
            .iter()
            .filter_map(|d| self.running(*d).map(WorkerHandle::alive_flag))
            .collect();
        // Instances that reach this one and whose channels must be re-made.
        let clients: Vec<WorkerId> = self
            .channels
            .iter()
            .filter(|(c, s)| *s == id && *c != id)
            .map(|(c, _)| *c)
            .collect();
        self.spawn(id).await?;
        let outcome = tokio::select! {
            r = self.replay(id, &clients) => r,
            () = any_died(&watched) => Err(errors::restore_dependency_died()),
        };
        match outcome {
            Ok(()) => {
                tracing::info!(worker = %id, %kind, "worker restored");
                Ok(())
            }
            Err(e) => {
                // A dependency that died meanwhile is not this instance's fault.
                let dep_died = watched.iter().any(|a| !a.get())
                    || deps.iter().any(|d| self.running(*d).is_none());
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
        // Children first (a reopen may have given a node a younger child).
        let nodes = self.graph.children_first(|n| n.home == id);
        for name in nodes {
            self.replay_node(&name).await?;
        }
        for client in clients {
            // A client that is dead too gets its channels when it is restored.
            if self.running(*client).is_some() {
                self.connect(*client, id).await?;
            }
        }
        self.replay_exports(id).await
    }

    /// The instances hosting nodes that instance `id` uses: children of its nodes in
    /// other instances, and the instances of the nodes exported by the exports it
    /// serves.
    fn dependencies(&self, id: WorkerId) -> Vec<WorkerId> {
        let mut deps: Vec<WorkerId> = self
            .graph
            .iter()
            .filter(|n| n.home == id)
            .flat_map(|n| n.children.iter())
            .filter_map(|(_, c)| self.graph.get(c))
            .map(|c| c.home)
            .filter(|h| *h != id)
            .collect();
        // The exports it serves (the NBD listener of per-export workers serves none).
        deps.extend(self.export_dependencies(id));
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
        self.give_up_exports(id).await;
    }

    /// Whether `name` or a node below it (any role) lives on instance `id`.
    pub(super) fn chain_uses(&self, name: &str, id: WorkerId) -> bool {
        self.graph.subtree(name).iter().any(|n| n.home == id)
    }
}

/// Resolves once any of the watched workers is no longer alive (never, for none).
async fn any_died(flags: &[Rc<Cell<bool>>]) {
    if flags.is_empty() {
        return std::future::pending().await;
    }
    loop {
        if flags.iter().any(|a| !a.get()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
