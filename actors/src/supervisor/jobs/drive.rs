//! `drive-backup` and `drive-mirror` (deprecated in QEMU, still in qsd): the target
//! is a file name, created (`mode: absolute-paths`, the default: qcow2 or raw, with
//! qsd's "Formatting" line on standard output) or opened (`existing`), added as a
//! node nobody but the job owns, and the job is `blockdev-backup`'s or
//! `blockdev-mirror`'s. The target goes when the job ends unless something uses it
//! then (a mirror's pivot hands it the source's users).

use bulkhead_ipc::wire::{Qcow2Create, ToWorker};
use bulkhead_qmp::qapi::types::{BlockdevBackupArgs, BlockdevMirrorArgs, MirrorSyncMode};
use serde_json::{Map, Value, json};

use crate::supervisor::{Core, QmpError, call_error, errors};

/// The target a `drive-*` command names.
struct DriveTarget {
    path: String,
    format: String,
    existing: bool,
    /// The node the new image names as its backing (and gets as one).
    backing: Option<String>,
    /// The new node's name (`drive-mirror`'s `node-name`).
    name: Option<String>,
    /// The source's size: the new image's.
    size: u64,
}

fn text(m: &Map<String, Value>, key: &str) -> Option<String> {
    m.get(key).and_then(Value::as_str).map(str::to_string)
}

impl Core {
    /// `drive-backup`.
    pub(in crate::supervisor) async fn drive_backup(
        &mut self,
        args: &Map<String, Value>,
    ) -> Result<(), QmpError> {
        let (typed, node) = self.prepare_drive_backup(args, &[]).await?;
        let started = match self.check_backup(&typed, &[]) {
            Ok(checked) => self.start_backup(&typed, checked).await,
            Err(e) => Err(e),
        };
        self.own_or_drop(&typed.job_id.unwrap_or_default(), &node, started)
            .await
    }

    /// A `drive-backup`'s target, created or opened, and the `blockdev-backup` it
    /// amounts to, checked (`pending`: job ids a transaction takes before it); the
    /// target is dropped if the checks fail.
    pub(in crate::supervisor) async fn prepare_drive_backup(
        &mut self,
        args: &Map<String, Value>,
        pending: &[String],
    ) -> Result<(BlockdevBackupArgs, String), QmpError> {
        let mut a = args.clone();
        let (target, _) = self.drive_target(&mut a)?;
        let node = self.open_drive_target(&target).await?;
        a.insert("target".into(), node.clone().into());
        let typed = serde_json::from_value::<BlockdevBackupArgs>(Value::Object(a))
            .map_err(errors::from_error)
            .and_then(|t| self.check_backup(&t, pending).map(|_| t));
        match typed {
            Ok(t) => Ok((t, node)),
            Err(e) => {
                self.drop_if_unused(&node).await;
                Err(e)
            }
        }
    }

    /// Starts a prepared `drive-backup` (a transaction's, after its other actions).
    pub(in crate::supervisor) async fn start_drive_backup(
        &mut self,
        typed: &BlockdevBackupArgs,
        node: &str,
    ) -> Result<(), QmpError> {
        let started = match self.check_backup(typed, &[]) {
            Ok(checked) => self.start_backup(typed, checked).await,
            Err(e) => Err(e),
        };
        let job = typed.job_id.clone().unwrap_or_default();
        self.own_or_drop(&job, node, started).await
    }

    /// `drive-mirror`.
    pub(in crate::supervisor) async fn drive_mirror(
        &mut self,
        args: &Map<String, Value>,
    ) -> Result<(), QmpError> {
        let mut a = args.clone();
        let (target, sync) = self.drive_target(&mut a)?;
        let new_image = !target.existing && sync == MirrorSyncMode::Full;
        let node = self.open_drive_target(&target).await?;
        a.insert("target".into(), node.clone().into());
        a.remove("unmap");
        let typed: BlockdevMirrorArgs =
            serde_json::from_value(Value::Object(a)).map_err(errors::from_error)?;
        // A new image reads zeroes: only what the source holds needs copying.
        let started = self.mirror_to(&typed, new_image).await;
        self.own_or_drop(&typed.job_id.unwrap_or_default(), &node, started)
            .await
    }

    /// The device and the target of a `drive-*` command, in qsd's order; removes
    /// the members `blockdev-*` does not take.
    fn drive_target(
        &self,
        a: &mut Map<String, Value>,
    ) -> Result<(DriveTarget, MirrorSyncMode), QmpError> {
        let device = text(a, "device").unwrap_or_default();
        let source = self
            .graph
            .get(&device)
            .ok_or_else(|| errors::device_not_found(&device, &device))?;
        let sync: MirrorSyncMode = a
            .get("sync")
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .map_err(errors::from_error)?
            .unwrap_or(MirrorSyncMode::Full);
        let format = text(a, "format").unwrap_or_else(|| source.driver.as_str().to_string());
        if format != "qcow2" && format != "raw" {
            return Err(errors::drive_format_unsupported(&format));
        }
        let chain = self.graph.chain_names(&source.name);
        // QEMU: `top` names the source's backing, `none` the source itself.
        let backing = match sync {
            MirrorSyncMode::Top => chain.get(1).cloned(),
            MirrorSyncMode::None => Some(source.name.clone()),
            _ => None,
        };
        let target = DriveTarget {
            path: text(a, "target").unwrap_or_default(),
            format,
            existing: text(a, "mode").as_deref() == Some("existing"),
            backing: backing.filter(|_| text(a, "format").as_deref() != Some("raw")),
            name: text(a, "node-name"),
            size: source.size,
        };
        for k in ["format", "mode", "node-name"] {
            a.remove(k);
        }
        Ok((target, sync))
    }

    /// Creates (or finds) the target image and adds it as a node the monitor does
    /// not own, with the backing node it names (`top`, `none`).
    async fn open_drive_target(&mut self, t: &DriveTarget) -> Result<String, QmpError> {
        let backing = t
            .backing
            .as_ref()
            .and_then(|b| self.graph.get(b))
            .map(|b| (self.graph.filename(b), b.driver.as_str().to_string()));
        if t.existing {
            if let Err(e) = std::fs::metadata(&t.path) {
                return Err(errors::could_not_open(
                    &t.path,
                    e.raw_os_error().unwrap_or(0),
                ));
            }
        } else {
            let size = t.size;
            // qsd says so on its standard output, as qemu-img does, before trying.
            match (&t.format[..], &backing) {
                ("raw", _) => println!("Formatting '{}', fmt=raw size={size}", t.path),
                (_, Some((file, fmt))) => println!(
                    "Formatting '{}', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size={size} backing_file={file} backing_fmt={fmt} lazy_refcounts=off refcount_bits=16",
                    t.path
                ),
                (_, None) => println!(
                    "Formatting '{}', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size={size} lazy_refcounts=off refcount_bits=16",
                    t.path
                ),
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&t.path)
                .map_err(|e| errors::could_not_create(&t.path, e.raw_os_error().unwrap_or(0)))?;
            if t.format == "raw" {
                file.set_len(size).map_err(|e| {
                    errors::could_not_create(&t.path, e.raw_os_error().unwrap_or(0))
                })?;
            }
        }
        let file = self
            .add_internal(&json!({"driver": "file", "filename": t.path}))
            .await?;
        if t.format == "qcow2" && !t.existing {
            let Some(r) = self.node_ref(&file) else {
                return Err(errors::node_vanished());
            };
            let image = Qcow2Create {
                size: t.size,
                cluster_size: 65536,
                backing_file: backing.as_ref().map(|b| b.0.clone()),
                backing_format: backing.as_ref().map(|b| b.1.clone()),
                lazy_refcounts: false,
            };
            let created = match self.worker(r.home).await {
                Ok(w) => w
                    .call(
                        ToWorker::CreateQcow2 {
                            node: r.node,
                            image,
                        },
                        &[],
                    )
                    .await
                    .map_err(call_error),
                Err(e) => Err(e),
            };
            if let Err(e) = created {
                self.destroy(&file).await;
                return Err(e);
            }
        }
        let mut options = json!({"driver": t.format, "file": file});
        if let Some(n) = &t.name {
            options["node-name"] = json!(n);
        }
        if t.format == "qcow2" {
            // The backing it names is the node the source reads (QEMU's
            // `bdrv_set_backing_hd`), or none.
            options["backing"] = match &t.backing {
                Some(b) if backing.is_some() => json!(b),
                _ => Value::Null,
            };
        }
        match self.add_internal(&options).await {
            Ok(node) => Ok(node),
            Err(e) => {
                self.destroy(&file).await;
                Err(e)
            }
        }
    }

    /// A started job owns its target (dropped at its end unless used); a job that
    /// did not start drops it now.
    async fn own_or_drop(
        &mut self,
        job: &str,
        node: &str,
        started: Result<(), QmpError>,
    ) -> Result<(), QmpError> {
        match started {
            Ok(()) if self.jobs.get(job).is_some() => {
                self.jobs.owned.push((job.to_string(), node.to_string()));
                Ok(())
            }
            other => {
                self.drop_if_unused(node).await;
                other
            }
        }
    }
}
