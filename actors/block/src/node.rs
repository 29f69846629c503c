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

use std::sync::Arc;

use crate::config::{CommonOptions, DetectZeroes, Discard, DriverConfig};
use crate::file::check_range;
use crate::io::{
    BlockIo, Extent, IoError, IoFuture, SparseFuture, SparseReadError, WriteFlags, ZeroFlags,
};

/// A driver together with the generic options of its node.
pub struct Node {
    driver: Arc<dyn BlockIo>,
    options: CommonOptions,
    /// Whether the driver has a native write-zeroes. QEMU only turns detected zero
    /// writes into write-zeroes when it does (null has none).
    detect_zeroes_applies: bool,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Wraps `driver` with `options`. `native_write_zeroes` says whether the driver
    /// zeroes without writing (file, host_device, raw), which `detect-zeroes` needs.
    pub fn new(
        driver: Arc<dyn BlockIo>,
        options: CommonOptions,
        native_write_zeroes: bool,
    ) -> Node {
        Node {
            driver,
            options,
            detect_zeroes_applies: native_write_zeroes,
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
    match (driver, err) {
        (_, IoError::ReadOnly) => "Image is read-only".to_string(),
        (DriverConfig::Raw(c), IoError::Unsupported) if c.size.is_some() => {
            "Cannot resize fixed-size raw disks".to_string()
        }
        (DriverConfig::Raw(_), IoError::Invalid) => {
            "Disk size too large for the chosen offset".to_string()
        }
        (DriverConfig::HostDevice(_), IoError::Invalid) => "Cannot grow device files".to_string(),
        (_, IoError::Unsupported) => "Image format driver does not support resize".to_string(),
        (_, IoError::Os(errno)) => {
            format!("Could not resize file: {}", crate::posix::strerror(*errno))
        }
        (_, other) => crate::posix::strerror(other.errno()),
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
            self.check_write(offset, buf.len() as u64)?;
            let fua = flags.fua && !self.options.no_flush;
            if self.options.detect_zeroes != DetectZeroes::Off
                && self.detect_zeroes_applies
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
                return self
                    .driver
                    .write_zeroes(offset, buf.len() as u64, zero)
                    .await;
            }
            self.driver.write(offset, buf, WriteFlags { fua }).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.check_write(offset, len)?;
            let flags = ZeroFlags {
                fua: flags.fua && !self.options.no_flush,
                may_unmap: flags.may_unmap && self.options.discard == Discard::Unmap,
                no_fallback: flags.no_fallback,
            };
            self.driver.write_zeroes(offset, len, flags).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.check_write(offset, len)?;
            if self.options.discard == Discard::Ignore {
                return Ok(());
            }
            self.driver.discard(offset, len).await
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
        let node = Node::new(Arc::clone(&recorder) as Arc<dyn BlockIo>, options, true);
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
            node.write(4096, &[0u8; 8192], WriteFlags { fua: true })
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
            node.write(0, &[1u8; 512], WriteFlags { fua: true }).await,
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

    #[test]
    fn resize_errors_carry_qsd_texts() {
        use crate::config::{FileConfig, NullConfig, RawConfig};
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
