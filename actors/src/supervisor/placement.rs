//! Worker instances and where nodes go: the `--isolation` policy.
//!
//! Runs in the supervisor. A worker *instance* has an id, a kind (what the process
//! runs and which seccomp policy it applies) and, while it runs, a process; restarts
//! replace the process and keep the instance. Placement decides which instance hosts
//! each node:
//!
//! - `kind` (default): one instance per driver kind, one for NBD. A format node's
//!   protocol child (`file`, `host_device`, `null-*`) lives in the format node's
//!   instance: a process hop between them would isolate nothing, since the format
//!   node can already read and write every byte of its child.
//! - `image`: one instance per image, i.e. a top node with the nodes under it that no
//!   other node uses. A compromised worker then reaches only the image it serves.

use std::collections::VecDeque;
use std::time::Instant;

use bulkhead_ipc::wire::{NodeRef, WorkerId, WorkerKind};

use super::graph::{Driver, Node, Role};
use super::workers::WorkerHandle;
use super::{Core, QmpError, errors};

/// How nodes are spread over worker processes (`--isolation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// One worker per driver kind, one per export type.
    #[default]
    Kind,
    /// One worker per image.
    Image,
}

impl Isolation {
    /// Parses the command-line value.
    pub fn parse(s: &str) -> Option<Isolation> {
        match s {
            "kind" => Some(Isolation::Kind),
            "image" => Some(Isolation::Image),
            _ => None,
        }
    }
}

/// One worker instance.
#[derive(Debug)]
pub(super) struct Instance {
    /// What its process runs.
    pub kind: WorkerKind,
    /// The current process (alive or dead and not yet replaced).
    pub handle: Option<WorkerHandle>,
    /// Incarnation number (grows with every process started for it).
    pub generation: u64,
    /// Recent restarts, for the restart budget.
    pub recent_restarts: VecDeque<Instant>,
    /// Restarts so far.
    pub restart_count: u64,
    /// The restart budget ran out: its nodes fail I/O, nothing restarts it.
    pub given_up: bool,
    /// The last restore failed because an instance it depends on died meanwhile: the
    /// next restore does not count against this instance's budget.
    pub free_retry: bool,
    /// A restart is counted against the budget and waits out its backoff.
    pub restart_pending: bool,
    /// A process was started for it once: from then on a missing process means its
    /// state must be replayed, never a blank start.
    pub started: bool,
    /// A restore failed with no process left to report a death (the replacement did
    /// not even start): a retry is scheduled.
    pub retry_scheduled: bool,
}

impl Instance {
    pub(super) fn new(kind: WorkerKind) -> Instance {
        Instance {
            kind,
            handle: None,
            generation: 0,
            recent_restarts: VecDeque::new(),
            restart_count: 0,
            given_up: false,
            free_retry: false,
            restart_pending: false,
            started: false,
            retry_scheduled: false,
        }
    }

    /// What `x-bulkhead-query-workers` calls its role.
    pub(super) fn role(&self) -> &'static str {
        match self.kind {
            WorkerKind::Nbd => "export",
            WorkerKind::Image => "image",
            WorkerKind::Jobs => "jobs",
            _ => "driver",
        }
    }
}

/// Where a new node goes.
pub(super) enum Placement {
    /// On this instance.
    On(WorkerId),
    /// On this instance, after moving its (so far unused) child `name` there too.
    WithChild(WorkerId, String),
    /// On this instance; its child `name` is already used by another node and must
    /// first get an instance of its own (`Core::isolate_shared`).
    SharingChild(WorkerId, String),
}

impl Core {
    /// Where a node of `driver` goes, given its `child` (already in the graph), and
    /// `hint`: the instance its future parent chose for an inline child.
    pub(super) fn place(
        &mut self,
        driver: Driver,
        child: Option<&str>,
        hint: Option<WorkerId>,
    ) -> Placement {
        if let Some(h) = hint {
            return Placement::On(h);
        }
        // `snapshot-access` calls into its `copy-before-write` child directly (the
        // snapshot calls do not cross data channels): it lives in the child's worker.
        if driver == Driver::SnapshotAccess
            && let Some(c) = child.and_then(|c| self.graph.get(c))
        {
            return Placement::On(c.home);
        }
        // (name, home, parents, movable) of the child.
        let child = child
            .and_then(|c| self.graph.get(c))
            .map(|c| (c.name.clone(), c.home, c.parents, self.movable(c)));
        match self.isolation {
            Isolation::Kind => {
                let home = self.kind_instance(WorkerKind::Driver(driver));
                match child {
                    Some((name, chome, _, true)) if chome != home => {
                        Placement::WithChild(home, name)
                    }
                    _ => Placement::On(home),
                }
            }
            Isolation::Image => match child {
                // The child belongs to this image alone: the node joins its worker.
                Some((_, chome, 0, _)) => Placement::On(chome),
                // A node another image uses too becomes a shared base: it gets a worker
                // of its own (unless it has one already), and each image reaches it
                // over a channel, so neither image's worker holds the other's data.
                Some((name, _, _, _)) => {
                    Placement::SharingChild(self.new_instance(WorkerKind::Image), name)
                }
                None => Placement::On(self.new_instance(WorkerKind::Image)),
            },
        }
    }

    /// The instance an inline child of a new `driver` node should be created on, so it
    /// starts where it will stay.
    pub(super) fn inline_child_hint(&mut self, driver: Driver) -> Option<WorkerId> {
        match self.isolation {
            // A format node's protocol child lives in the format node's instance.
            Isolation::Kind if !driver.is_protocol() => {
                Some(self.kind_instance(WorkerKind::Driver(driver)))
            }
            _ => None,
        }
    }

    /// Whether `node` can move to its new parent's worker: a protocol node nobody uses
    /// yet (moving a node under live I/O would need its users re-routed).
    fn movable(&self, node: &Node) -> bool {
        node.driver.is_protocol() && node.parents == 0 && !node.exported
    }

    /// Moves the unused node `name` to instance `to`: opened there with the same id
    /// and image, then closed where it was.
    pub(super) async fn move_node(&mut self, name: &str, to: WorkerId) -> Result<(), QmpError> {
        let Some(node) = self.graph.get(name) else {
            return Err(errors::node_vanished());
        };
        let (from, id) = (node.home, node.id);
        if from == to {
            return Ok(());
        }
        if let Some(n) = self.graph.get_mut(name) {
            n.home = to;
        }
        if let Err(e) = self.replay_node(name).await {
            if let Some(n) = self.graph.get_mut(name) {
                n.home = from;
            }
            return Err(e);
        }
        if let Some(w) = self.running(from)
            && let Err(e) = w
                .call(bulkhead_ipc::wire::ToWorker::RemoveNode { node: id }, &[])
                .await
        {
            tracing::warn!(node = name, error = %e, "old worker could not close a moved node");
        }
        self.retire_if_idle(from);
        Ok(())
    }

    /// Gives node `name`, which another image is about to share, a worker instance of
    /// its own (`--isolation image`): it is opened there (same id, image and
    /// statistics), each parent sharing its old instance is reopened with the child
    /// reached over a channel (requests in flight finish on the old child), and then
    /// it is closed where it was. Already alone in its instance: nothing to do.
    pub(super) async fn isolate_shared(&mut self, name: &str) -> Result<(), QmpError> {
        let Some(node) = self.graph.get(name) else {
            return Err(errors::node_vanished());
        };
        let (from, id) = (node.home, node.id);
        // A format node's local protocol children go with it: a hop between them
        // would isolate nothing (and a qcow2 node grows its file through a local
        // child only).
        let mut moving: Vec<(String, bulkhead_ipc::wire::NodeId)> = node
            .children
            .iter()
            .filter(|(r, _)| matches!(r, Role::File | Role::DataFile))
            .filter_map(|(_, c)| self.graph.get(c))
            .filter(|c| c.home == from && c.driver.is_protocol() && c.parents == 1)
            .map(|c| (c.name.clone(), c.id))
            .collect();
        moving.push((name.to_string(), id));
        let neighbours = self
            .graph
            .iter()
            .any(|n| n.home == from && !moving.iter().any(|(m, _)| *m == n.name));
        if !neighbours {
            return Ok(());
        }
        let to = self.new_instance(WorkerKind::Image);
        // Children first, so the node finds its file where it opens.
        for (i, (m, _)) in moving.iter().enumerate() {
            if let Some(n) = self.graph.get_mut(m) {
                n.home = to;
            }
            if let Err(e) = self.replay_node(m).await {
                for (back, _) in &moving[..=i] {
                    if let Some(n) = self.graph.get_mut(back) {
                        n.home = from;
                    }
                }
                self.retire_if_idle(to);
                return Err(e);
            }
        }
        let parents: Vec<_> = self
            .graph
            .iter()
            .filter(|p| p.home == from && p.children.iter().any(|(_, c)| c == name))
            .map(|p| (p.name.clone(), p.id, p.config.clone()))
            .collect();
        self.connect(from, to).await?;
        for (pname, pid, config) in parents {
            // The moved node's ref already names its new home (set above).
            let children = self.child_refs(&pname, None);
            self.reopen_on(from, pid, &pname, config, children, None)
                .await?;
        }
        // Closed where they were, the node before its children.
        for (m, mid) in moving.iter().rev() {
            if let Some(w) = self.running(from)
                && let Err(e) = w
                    .call(bulkhead_ipc::wire::ToWorker::RemoveNode { node: *mid }, &[])
                    .await
            {
                tracing::warn!(node = %m, error = %e, "old worker could not close a shared node");
            }
        }
        Ok(())
    }

    /// Node `name`'s children by role, as `AddNode`/`ReopenNode` name them; with
    /// `change`, that role set to another node (or dropped, `None`).
    pub(super) fn child_refs(
        &self,
        name: &str,
        change: Option<(Role, Option<NodeRef>)>,
    ) -> Vec<(Role, NodeRef)> {
        let mut refs: Vec<(Role, NodeRef)> = self
            .graph
            .get(name)
            .map(|n| {
                n.children
                    .iter()
                    .filter(|(r, _)| change.is_none_or(|(c, _)| c != *r))
                    .filter_map(|(r, c)| self.node_ref(c).map(|c| (*r, c)))
                    .collect()
            })
            .unwrap_or_default();
        if let Some((role, Some(to))) = change {
            refs.push((role, to));
        }
        refs
    }

    /// Where node `name` lives, as workers address it.
    pub(super) fn node_ref(&self, name: &str) -> Option<NodeRef> {
        self.graph.get(name).map(|n| NodeRef {
            node: n.id,
            home: n.home,
        })
    }
}
