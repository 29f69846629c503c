//! The generic per-node layer every driver is wrapped in: QEMU's block-layer policies
//! that depend on node options rather than on the driver.
//!
//! Runs in driver workers, around every node [`crate::open`] returns. It applies, in
//! QEMU's order: read-only refusal, range checks, `detect-zeroes` (an all-zero write
//! becomes write-zeroes, with unmapping allowed under `detect-zeroes=unmap`),
//! `discard=ignore` (discards succeed without reaching the driver, and write-zeroes
//! loses its permission to unmap), and `cache.no-flush` (flushes, including the flush
//! half of a FUA write, complete at once). Buffers come from exports and may hold
//! client data; they are only scanned for zeroes, never interpreted.
//!
//! It is also the one place every write, write-zeroes and discard of a node passes,
//! whoever sent it: [`crate::stats::Accounting`] checks the write threshold before the
//! driver runs and updates the node's counters and write notifiers after, where QEMU's
//! `bdrv_co_write_req_prepare`/`_finish` do.

use std::sync::Arc;

use crate::config::{CommonOptions, DetectZeroes, Discard, DriverConfig};
use crate::file::check_range;
use crate::io::{
    BlockIo, Extent, IoError, IoFuture, SparseFuture, SparseReadError, WriteFlags, ZeroFlags,
};
use crate::stats::{Accounting, WriteKind};

/// What the driver under a node can do, for the policies that depend on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The driver zeroes without writing (file, host_device, raw). QEMU only turns
    /// detected zero writes into write-zeroes when it does (null has none).
    pub write_zeroes: bool,
    /// The driver discards (QEMU drivers without `bdrv_co_pdiscard`, like null, have
    /// their discards succeed before the write threshold or bitmaps see them).
    pub discard: bool,
    /// The driver counts its discards (file-posix's `discard-nb-ok` and friends).
    pub discard_stats: bool,
}

/// A driver together with the generic options of its node.
pub struct Node {
    driver: Arc<dyn BlockIo>,
    options: CommonOptions,
    caps: Capabilities,
    accounting: Accounting,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Wraps `driver` (which can do `caps`) with `options`, recording into
    /// `accounting`.
    pub fn new(
        driver: Arc<dyn BlockIo>,
        options: CommonOptions,
        caps: Capabilities,
        accounting: Accounting,
    ) -> Node {
        Node {
            driver,
            options,
            caps,
            accounting,
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), IoError> {
        // An inactive node refuses writes with EPERM, like a read-only one, without
        // telling clients it is read-only (qsd's NBD export stays writable).
        if self.read_only() || self.options.inactive {
            return Err(IoError::ReadOnly);
        }
        check_range(offset, len, self.driver.size())
    }
}

/// The QMP error text of a failed `block_resize` on a node opened with `driver`
/// (qsd 10.0.2's texts).
pub fn resize_error_text(driver: &DriverConfig, err: &IoError) -> String {
    if let Some(text) = driver.resize_error(err) {
        return text;
    }
    match err {
        IoError::ReadOnly => "Image is read-only".to_string(),
        IoError::Unsupported => "Image format driver does not support resize".to_string(),
        IoError::Os(errno) => {
            format!("Could not resize file: {}", crate::posix::strerror(*errno))
        }
        other => crate::posix::strerror(other.errno()),
    }
}

/// Whether every byte of `buf` is zero (the `detect-zeroes` test).
pub fn is_zero(buf: &[u8]) -> bool {
    // Comparing whole words keeps this close to memory speed on large buffers.
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64, and align_to only reinterprets the
        // aligned middle part of the slice, whose lifetime it keeps.
        unsafe { buf.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

impl BlockIo for Node {
    fn size(&self) -> u64 {
        self.driver.size()
    }

    fn read_only(&self) -> bool {
        self.options.read_only || self.driver.read_only()
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            check_range(offset, buf.len() as u64, self.driver.size())?;
            self.driver.read(offset, buf).await
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let len = buf.len() as u64;
            // An extending write is checked against the end by the driver, which grows.
            let extending = flags.extend
                && offset
                    .checked_add(len)
                    .is_some_and(|end| end > self.driver.size());
            if extending {
                if self.read_only() || self.options.inactive {
                    return Err(IoError::ReadOnly);
                }
            } else {
                self.check_write(offset, len)?;
            }
            if let Some(report) = self.accounting.before_write(offset, len) {
                report.await;
            }
            let fua = flags.fua && !self.options.no_flush;
            let result = if !extending
                && self.options.detect_zeroes != DetectZeroes::Off
                && self.caps.write_zeroes
                && !buf.is_empty()
                && is_zero(buf)
            {
                let may_unmap = self.options.detect_zeroes == DetectZeroes::Unmap
                    && self.options.discard == Discard::Unmap;
                let zero = ZeroFlags {
                    fua,
                    may_unmap,
                    no_fallback: false,
                };
                self.driver.write_zeroes(offset, len, zero).await
            } else {
                let flags = WriteFlags { fua, ..flags };
                self.driver.write(offset, buf, flags).await
            };
            self.accounting.after_write(WriteKind::Write, offset, len);
            result
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.check_write(offset, len)?;
            if let Some(report) = self.accounting.before_write(offset, len) {
                report.await;
            }
            let flags = ZeroFlags {
                fua: flags.fua && !self.options.no_flush,
                may_unmap: flags.may_unmap && self.options.discard == Discard::Unmap,
                no_fallback: flags.no_fallback,
            };
            let result = self.driver.write_zeroes(offset, len, flags).await;
            self.accounting
                .after_write(WriteKind::WriteZeroes, offset, len);
            result
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.check_write(offset, len)?;
            // QEMU returns before the request is tracked: no threshold, no bitmaps.
            if self.options.discard == Discard::Ignore || !self.caps.discard {
                return Ok(());
            }
            if let Some(report) = self.accounting.before_write(offset, len) {
                report.await;
            }
            let result = self.driver.discard(offset, len).await;
            if self.caps.discard_stats {
                self.accounting.discarded(len, result.is_ok());
            }
            self.accounting.after_write(WriteKind::Discard, offset, len);
            result
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        if self.options.no_flush {
            return Box::pin(async { Ok(()) });
        }
        self.driver.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            check_range(offset, len, self.driver.size())?;
            self.driver.block_status(offset, len).await
        })
    }

    fn read_sparse<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> SparseFuture<'a> {
        Box::pin(async move {
            check_range(offset, buf.len() as u64, self.driver.size())
                .map_err(SparseReadError::Status)?;
            self.driver.read_sparse(offset, buf).await
        })
    }

    fn refresh(&self) -> IoFuture<'_, ()> {
        self.driver.refresh()
    }

    fn map(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<crate::io::MapRun>> {
        Box::pin(async move {
            check_range(offset, len, self.driver.size())?;
            self.driver.map(offset, len).await
        })
    }

    fn format_info(&self) -> Option<crate::io::FormatInfo> {
        self.driver.format_info()
    }

    fn close(&self) -> IoFuture<'_, ()> {
        self.driver.close()
    }

    fn snapshot_create(
        &self,
        request: crate::io::SnapshotRequest,
    ) -> crate::io::SnapshotFuture<'_, ()> {
        let node = self.driver.clone();
        Box::pin(async move { node.snapshot_create(request).await })
    }

    fn copy_on_read(&self, offset: u64, len: u64, layers: u32) -> IoFuture<'_, ()> {
        self.driver.copy_on_read(offset, len, layers)
    }

    fn copy_before_write(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.driver.copy_before_write(offset, len)
    }

    fn mirror(
        &self,
        request: crate::mirror::MirrorRequest,
    ) -> IoFuture<'_, crate::mirror::MirrorStatus> {
        self.driver.mirror(request)
    }

    fn snapshot_read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        self.driver.snapshot_read(offset, buf)
    }

    fn snapshot_block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<crate::io::Extent>> {
        self.driver.snapshot_block_status(offset, len)
    }

    fn snapshot_discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.driver.snapshot_discard(offset, len)
    }

    fn stored_bitmaps(
        &self,
        request: crate::io::StoredBitmaps,
    ) -> crate::io::SnapshotFuture<'_, Vec<crate::io::StoredBitmap>> {
        let node = self.driver.clone();
        Box::pin(async move { node.stored_bitmaps(request).await })
    }

    fn set_backing_file(&self, name: String, format: String) -> crate::io::SnapshotFuture<'_, ()> {
        let node = self.driver.clone();
        Box::pin(async move { node.set_backing_file(name, format).await })
    }

    fn snapshot_delete(
        &self,
        id: Option<String>,
        name: Option<String>,
    ) -> crate::io::SnapshotFuture<'_, crate::io::SnapshotEntry> {
        let node = self.driver.clone();
        Box::pin(async move { node.snapshot_delete(id, name).await })
    }

    fn resize(&self, new_size: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.read_only() || self.options.inactive {
                return Err(IoError::ReadOnly);
            }
            self.driver.resize(new_size).await
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records which driver calls arrive, to check what the policy layer passes down.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
    }

    impl Recorder {
        fn log(&self, call: String) {
            if let Ok(mut calls) = self.calls.lock() {
                calls.push(call);
            }
        }
        fn take(&self) -> Vec<String> {
            self.calls
                .lock()
                .map(|mut c| std::mem::take(&mut *c))
                .unwrap_or_default()
        }
    }

    impl BlockIo for Recorder {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
            self.log(format!("read {offset} {}", buf.len()));
            Box::pin(async { Ok(()) })
        }
        fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
            self.log(format!("write {offset} {} fua={}", buf.len(), flags.fua));
            Box::pin(async { Ok(()) })
        }
        fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
            self.log(format!(
                "zero {offset} {len} fua={} unmap={}",
                flags.fua, flags.may_unmap
            ));
            Box::pin(async { Ok(()) })
        }
        fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
            self.log(format!("discard {offset} {len}"));
            Box::pin(async { Ok(()) })
        }
        fn flush(&self) -> IoFuture<'_, ()> {
            self.log("flush".to_string());
            Box::pin(async { Ok(()) })
        }
        fn block_status(&self, _offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
            Box::pin(async move {
                Ok(vec![Extent {
                    length: len,
                    data: true,
                    zero: false,
                    depth: 1,
                }])
            })
        }
    }

    fn node(options: CommonOptions) -> (Arc<Recorder>, Node) {
        let recorder = Arc::new(Recorder::default());
        let caps = Capabilities {
            write_zeroes: true,
            discard: true,
            discard_stats: true,
        };
        let node = Node::new(
            Arc::clone(&recorder) as Arc<dyn BlockIo>,
            options,
            caps,
            Accounting::default(),
        );
        (recorder, node)
    }

    #[tokio::test]
    async fn detect_zeroes_unmap_turns_zero_writes_into_unmapping_write_zeroes() {
        let options = CommonOptions {
            detect_zeroes: DetectZeroes::Unmap,
            discard: Discard::Unmap,
            ..CommonOptions::default()
        };
        let (rec, node) = node(options);
        assert_eq!(
            node.write(
                4096,
                &[0u8; 8192],
                WriteFlags {
                    fua: true,
                    ..Default::default()
                }
            )
            .await,
            Ok(())
        );
        assert_eq!(
            node.write(0, &[0, 0, 1], WriteFlags::default()).await,
            Ok(())
        );
        assert_eq!(
            rec.take(),
            vec!["zero 4096 8192 fua=true unmap=true", "write 0 3 fua=false"]
        );
    }

    #[tokio::test]
    async fn detect_zeroes_on_zeroes_without_unmapping_and_off_writes_data() {
        let (rec, on) = node(CommonOptions {
            detect_zeroes: DetectZeroes::On,
            ..CommonOptions::default()
        });
        assert_eq!(
            on.write(0, &[0u8; 512], WriteFlags::default()).await,
            Ok(())
        );
        assert_eq!(rec.take(), vec!["zero 0 512 fua=false unmap=false"]);
        let (rec, off) = node(CommonOptions::default());
        assert_eq!(
            off.write(0, &[0u8; 512], WriteFlags::default()).await,
            Ok(())
        );
        assert_eq!(rec.take(), vec!["write 0 512 fua=false"]);
    }

    #[tokio::test]
    async fn discard_ignore_drops_discards_and_unmap_permission() {
        let (rec, node) = node(CommonOptions::default());
        assert_eq!(node.discard(0, 4096).await, Ok(()));
        let flags = ZeroFlags {
            may_unmap: true,
            ..ZeroFlags::default()
        };
        assert_eq!(node.write_zeroes(0, 4096, flags).await, Ok(()));
        assert_eq!(rec.take(), vec!["zero 0 4096 fua=false unmap=false"]);
    }

    #[tokio::test]
    async fn no_flush_skips_flushes_and_fua() {
        let (rec, node) = node(CommonOptions {
            no_flush: true,
            ..CommonOptions::default()
        });
        assert_eq!(node.flush().await, Ok(()));
        assert_eq!(
            node.write(
                0,
                &[1u8; 512],
                WriteFlags {
                    fua: true,
                    ..Default::default()
                }
            )
            .await,
            Ok(())
        );
        assert_eq!(rec.take(), vec!["write 0 512 fua=false"]);
    }

    #[tokio::test]
    async fn read_only_nodes_refuse_every_write_type_request() {
        let (rec, node) = node(CommonOptions {
            read_only: true,
            ..CommonOptions::default()
        });
        assert_eq!(
            node.write(0, &[1u8; 512], WriteFlags::default()).await,
            Err(IoError::ReadOnly)
        );
        assert_eq!(
            node.write_zeroes(0, 512, ZeroFlags::default()).await,
            Err(IoError::ReadOnly)
        );
        assert_eq!(node.discard(0, 512).await, Err(IoError::ReadOnly));
        assert_eq!(node.resize(512).await, Err(IoError::ReadOnly));
        let mut buf = [0u8; 512];
        assert_eq!(node.read(0, &mut buf).await, Ok(()));
        assert_eq!(rec.take(), vec!["read 0 512"]);
    }

    #[tokio::test]
    async fn inactive_nodes_refuse_writes_but_serve_reads_and_stay_writable() {
        let (rec, node) = node(CommonOptions {
            inactive: true,
            ..CommonOptions::default()
        });
        assert!(!node.read_only());
        assert_eq!(
            node.write(0, &[1u8; 512], WriteFlags::default()).await,
            Err(IoError::ReadOnly)
        );
        assert_eq!(IoError::ReadOnly.errno(), libc::EPERM);
        assert_eq!(node.discard(0, 512).await, Err(IoError::ReadOnly));
        let mut buf = [0u8; 512];
        assert_eq!(node.read(0, &mut buf).await, Ok(()));
        assert_eq!(node.flush().await, Ok(()));
        assert_eq!(rec.take(), vec!["read 0 512", "flush"]);
    }

    #[tokio::test]
    async fn requests_past_the_end_never_reach_the_driver() {
        let (rec, node) = node(CommonOptions::default());
        let mut buf = [0u8; 512];
        assert_eq!(
            node.read((1 << 20) - 511, &mut buf).await,
            Err(IoError::OutOfRange)
        );
        assert_eq!(
            node.write_zeroes(1 << 20, 1, ZeroFlags::default()).await,
            Err(IoError::OutOfRange)
        );
        assert_eq!(
            node.block_status(u64::MAX, 2).await,
            Err(IoError::OutOfRange)
        );
        assert!(rec.take().is_empty());
    }

    /// A write notifier that records what it is told (a dirty bitmap's view).
    #[derive(Default)]
    struct Seen(Mutex<Vec<(WriteKind, u64, u64)>>);

    impl crate::stats::WriteNotifier for Seen {
        fn written(&self, kind: WriteKind, offset: u64, len: u64) {
            if let Ok(mut v) = self.0.lock() {
                v.push((kind, offset, len));
            }
        }
    }

    /// A threshold sink that records crossings.
    #[derive(Default)]
    struct Crossings(Mutex<Vec<(u64, u64)>>);

    impl crate::stats::ThresholdSink for Crossings {
        fn crossed(&self, threshold: u64, end: u64) -> crate::stats::SinkFuture<'_> {
            if let Ok(mut v) = self.0.lock() {
                v.push((threshold, end));
            }
            Box::pin(async {})
        }
    }

    fn watched(
        options: CommonOptions,
        caps: Capabilities,
    ) -> (Arc<Recorder>, Arc<Seen>, Arc<Crossings>, Node) {
        let recorder = Arc::new(Recorder::default());
        let seen = Arc::new(Seen::default());
        let crossings = Arc::new(Crossings::default());
        let accounting = Accounting {
            threshold_sink: Some(Arc::clone(&crossings) as Arc<dyn crate::stats::ThresholdSink>),
            notifiers: vec![Arc::clone(&seen) as Arc<dyn crate::stats::WriteNotifier>],
            ..Accounting::default()
        };
        let node = Node::new(
            Arc::clone(&recorder) as Arc<dyn BlockIo>,
            options,
            caps,
            accounting,
        );
        (recorder, seen, crossings, node)
    }

    const NATIVE: Capabilities = Capabilities {
        write_zeroes: true,
        discard: true,
        discard_stats: true,
    };

    #[tokio::test]
    async fn every_write_zero_write_and_discard_reaches_the_write_notifiers() {
        let (_rec, seen, _, node) = watched(
            CommonOptions {
                discard: Discard::Unmap,
                detect_zeroes: DetectZeroes::On,
                ..CommonOptions::default()
            },
            NATIVE,
        );
        assert_eq!(
            node.write(0, &[1u8; 512], WriteFlags::default()).await,
            Ok(())
        );
        // detect-zeroes turns this into write-zeroes; it is still a write for bitmaps.
        assert_eq!(
            node.write(4096, &[0u8; 512], WriteFlags::default()).await,
            Ok(())
        );
        assert_eq!(
            node.write_zeroes(8192, 1024, ZeroFlags::default()).await,
            Ok(())
        );
        assert_eq!(node.discard(16384, 4096).await, Ok(()));
        // Refused before the driver: nothing changed, nothing to record.
        assert_eq!(
            node.write((1 << 20) - 1, &[1u8; 2], WriteFlags::default())
                .await,
            Err(IoError::OutOfRange)
        );
        let mut buf = [0u8; 512];
        assert_eq!(node.read(0, &mut buf).await, Ok(()));
        assert_eq!(node.flush().await, Ok(()));
        let seen = seen.0.lock().map(|v| v.clone()).unwrap_or_default();
        assert_eq!(
            seen,
            vec![
                (WriteKind::Write, 0, 512),
                (WriteKind::Write, 4096, 512),
                (WriteKind::WriteZeroes, 8192, 1024),
                (WriteKind::Discard, 16384, 4096),
            ]
        );
        let c = node.accounting.counters.snapshot();
        assert_eq!(
            c.wr_highest_offset, 9216,
            "discards do not count, like QEMU"
        );
        assert_eq!((c.discard_nb_ok, c.discard_bytes_ok), (1, 4096));
    }

    #[tokio::test]
    async fn discards_qemu_drops_before_tracking_reach_no_notifier_or_threshold() {
        let (rec, seen, crossings, ignore) = watched(CommonOptions::default(), NATIVE);
        ignore
            .accounting
            .counters
            .write_threshold
            .store(1, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(ignore.discard(0, 4096).await, Ok(()));
        let (_, seen_null, crossings_null, null) = watched(
            CommonOptions {
                discard: Discard::Unmap,
                ..CommonOptions::default()
            },
            Capabilities::default(),
        );
        null.accounting
            .counters
            .write_threshold
            .store(1, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(null.discard(0, 4096).await, Ok(()));
        assert!(rec.take().is_empty());
        for s in [&seen, &seen_null] {
            assert!(s.0.lock().map(|v| v.is_empty()).unwrap_or(false));
        }
        for c in [&crossings, &crossings_null] {
            assert!(c.0.lock().map(|v| v.is_empty()).unwrap_or(false));
        }
        assert_eq!(ignore.accounting.counters.snapshot().discard_nb_ok, 0);
    }

    #[tokio::test]
    async fn the_write_threshold_fires_once_before_the_write_and_then_is_zero() {
        use std::sync::atomic::Ordering;
        let (rec, _, crossings, node) = watched(
            CommonOptions {
                discard: Discard::Unmap,
                ..CommonOptions::default()
            },
            NATIVE,
        );
        node.accounting
            .counters
            .write_threshold
            .store(10000, Ordering::Relaxed);
        // Ending exactly at the threshold does not cross it.
        assert_eq!(
            node.write(0, &vec![1u8; 10000], WriteFlags::default())
                .await,
            Ok(())
        );
        assert_eq!(node.discard(8192, 4096).await, Ok(()));
        assert_eq!(
            node.write_zeroes(20000, 100, ZeroFlags::default()).await,
            Ok(())
        );
        assert_eq!(
            crossings.0.lock().map(|v| v.clone()).unwrap_or_default(),
            vec![(10000, 12288)]
        );
        assert_eq!(
            node.accounting
                .counters
                .write_threshold
                .load(Ordering::Relaxed),
            0
        );
        // Set again: a write-zeroes crosses it.
        node.accounting
            .counters
            .write_threshold
            .store(30000, Ordering::Relaxed);
        assert_eq!(
            node.write_zeroes(29999, 2, ZeroFlags::default()).await,
            Ok(())
        );
        assert_eq!(
            crossings.0.lock().map(|v| v.clone()).unwrap_or_default(),
            vec![(10000, 12288), (30000, 30001)]
        );
        assert_eq!(rec.take().len(), 4);
    }

    #[test]
    fn resize_errors_carry_qsd_texts() {
        use crate::file::FileConfig;
        use crate::null::NullConfig;
        use crate::raw::RawConfig;
        let file = DriverConfig::File(FileConfig::default());
        assert_eq!(
            resize_error_text(&file, &IoError::ReadOnly),
            "Image is read-only"
        );
        assert_eq!(
            resize_error_text(&file, &IoError::Os(libc::EFBIG)),
            "Could not resize file: File too large"
        );
        let null = DriverConfig::NullCo(NullConfig::default());
        assert_eq!(
            resize_error_text(&null, &IoError::Unsupported),
            "Image format driver does not support resize"
        );
        let fixed = DriverConfig::Raw(RawConfig {
            size: Some(512),
            ..RawConfig::default()
        });
        assert_eq!(
            resize_error_text(&fixed, &IoError::Unsupported),
            "Cannot resize fixed-size raw disks"
        );
        let device = DriverConfig::HostDevice(FileConfig::default());
        assert_eq!(
            resize_error_text(&device, &IoError::Invalid),
            "Cannot grow device files"
        );
    }

    #[test]
    fn is_zero_checks_every_byte_at_any_alignment() {
        let mut buf = vec![0u8; 1000];
        assert!(is_zero(&buf));
        assert!(is_zero(&buf[3..997]));
        for at in [0, 5, 500, 999] {
            buf[at] = 1;
            assert!(!is_zero(&buf));
            buf[at] = 0;
        }
        assert!(is_zero(&[]));
    }
}
