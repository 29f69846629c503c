//! The file, host_device and raw drivers on real files, through [`bulkhead_block::open`].

mod common;

use std::sync::Arc;

use bulkhead_block::ChildRole;
use bulkhead_block::config::{CommonOptions, DetectZeroes, Discard};
use bulkhead_block::file::FileConfig;
use bulkhead_block::posix::{actual_size, image_file_info};
use bulkhead_block::raw::RawConfig;
use bulkhead_block::{BlockIo, DriverConfig, Extent, IoError, WriteFlags, ZeroFlags, open};
use common::{Scratch, read_back};

const MIB: u64 = 1 << 20;

async fn file_node(path: &std::path::Path, config: FileConfig) -> Arc<dyn BlockIo> {
    let fd = common::open(path, config.common.read_only, config.common.direct);
    match open(DriverConfig::File(config), Some(fd), vec![]).await {
        Ok(node) => node,
        Err(e) => panic!("open failed: {e}"),
    }
}

fn unmap_config() -> FileConfig {
    FileConfig {
        common: CommonOptions {
            discard: Discard::Unmap,
            ..CommonOptions::default()
        },
        ..FileConfig::default()
    }
}

fn hole(length: u64) -> Extent {
    Extent {
        length,
        data: false,
        zero: true,
        depth: 1,
    }
}

fn data(length: u64) -> Extent {
    Extent {
        length,
        data: true,
        zero: false,
        depth: 1,
    }
}

fn allocated(path: &std::path::Path) -> u64 {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => panic!("{e}"),
    };
    match actual_size(std::os::fd::AsFd::as_fd(&file)) {
        Ok(n) => n,
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn written_data_reads_back_and_lands_at_the_same_file_offset() {
    let s = Scratch::new("rw");
    let path = s.sparse("a.raw", MIB);
    let node = file_node(&path, FileConfig::default()).await;
    assert_eq!(node.size(), MIB);
    let pattern: Vec<u8> = (0..10000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        node.write(
            12345,
            &pattern,
            WriteFlags {
                fua: true,
                ..Default::default()
            }
        )
        .await,
        Ok(())
    );
    let mut back = vec![0u8; pattern.len()];
    assert_eq!(node.read(12345, &mut back).await, Ok(()));
    assert_eq!(back, pattern);
    assert_eq!(node.flush().await, Ok(()));
    assert_eq!(read_back(&path, 12345, pattern.len()), pattern);
}

#[tokio::test]
async fn the_node_size_is_the_file_length_rounded_up_and_the_tail_reads_as_zeroes() {
    let s = Scratch::new("tail");
    let path = s.sparse("odd.raw", 1000);
    if let Err(e) = std::fs::write(&path, vec![0x5au8; 1000]) {
        panic!("{e}");
    }
    let node = file_node(&path, FileConfig::default()).await;
    assert_eq!(node.size(), 1024);
    let mut buf = [0xffu8; 48];
    assert_eq!(node.read(976, &mut buf).await, Ok(()));
    assert_eq!(&buf[..24], &[0x5au8; 24]);
    assert_eq!(&buf[24..], &[0u8; 24]);
}

#[tokio::test]
async fn requests_beyond_the_node_are_out_of_range() {
    let s = Scratch::new("oor");
    let path = s.sparse("a.raw", 65536);
    let node = file_node(&path, FileConfig::default()).await;
    let mut buf = [0u8; 512];
    assert_eq!(
        node.read(65536 - 511, &mut buf).await,
        Err(IoError::OutOfRange)
    );
    assert_eq!(
        node.write(65536, &buf, WriteFlags::default()).await,
        Err(IoError::OutOfRange)
    );
    assert_eq!(
        node.write_zeroes(0, 65537, ZeroFlags::default()).await,
        Err(IoError::OutOfRange)
    );
    assert_eq!(node.discard(u64::MAX, 2).await, Err(IoError::OutOfRange));
    assert_eq!(node.block_status(65536, 1).await, Err(IoError::OutOfRange));
    assert_eq!(std::fs::metadata(&path).map(|m| m.len()).ok(), Some(65536));
}

#[tokio::test]
async fn read_only_nodes_refuse_writes_but_read() {
    let s = Scratch::new("ro");
    let path = s.sparse("a.raw", 65536);
    let config = FileConfig {
        common: CommonOptions {
            read_only: true,
            ..CommonOptions::default()
        },
        ..FileConfig::default()
    };
    let node = file_node(&path, config).await;
    assert!(node.read_only());
    let buf = [1u8; 512];
    assert_eq!(
        node.write(0, &buf, WriteFlags::default()).await,
        Err(IoError::ReadOnly)
    );
    assert_eq!(
        node.write_zeroes(0, 512, ZeroFlags::default()).await,
        Err(IoError::ReadOnly)
    );
    assert_eq!(node.discard(0, 512).await, Err(IoError::ReadOnly));
    assert_eq!(node.resize(4096).await, Err(IoError::ReadOnly));
    let mut back = [9u8; 512];
    assert_eq!(node.read(0, &mut back).await, Ok(()));
    assert_eq!(back, [0u8; 512]);
}

#[tokio::test]
async fn block_status_follows_seek_hole_on_a_sparse_file() {
    let s = Scratch::new("bs");
    let path = s.sparse("s.raw", MIB);
    let node = file_node(&path, FileConfig::default()).await;
    assert_eq!(
        node.write(65536, &[7u8; 16384], WriteFlags::default())
            .await,
        Ok(())
    );
    assert_eq!(node.flush().await, Ok(()));
    // The same three extents `qemu-img map` prints for this file.
    assert_eq!(
        node.block_status(0, MIB).await,
        Ok(vec![hole(65536), data(16384), hole(966656)])
    );
    assert_eq!(node.block_status(69632, 4096).await, Ok(vec![data(4096)]));
    assert_eq!(node.block_status(0, 4096).await, Ok(vec![hole(4096)]));
    assert_eq!(node.block_status(0, 0).await, Err(IoError::Invalid));
}

#[tokio::test]
async fn discard_unmap_punches_a_hole_and_discard_ignore_keeps_data() {
    let s = Scratch::new("discard");
    let path = s.sparse("a.raw", MIB);
    let node = file_node(&path, unmap_config()).await;
    assert_eq!(
        node.write(0, &[3u8; 131072], WriteFlags::default()).await,
        Ok(())
    );
    assert_eq!(node.flush().await, Ok(()));
    assert_eq!(allocated(&path), 131072);
    assert_eq!(node.discard(0, 65536).await, Ok(()));
    assert_eq!(allocated(&path), 65536);
    assert_eq!(
        node.block_status(0, 131072).await,
        Ok(vec![hole(65536), data(65536)])
    );
    let mut buf = [1u8; 512];
    assert_eq!(node.read(0, &mut buf).await, Ok(()));
    assert_eq!(buf, [0u8; 512]);

    let ignoring = file_node(&path, FileConfig::default()).await;
    assert_eq!(ignoring.discard(65536, 65536).await, Ok(()));
    assert_eq!(allocated(&path), 65536);
    assert_eq!(read_back(&path, 65536, 4), vec![3u8; 4]);
}

#[tokio::test]
async fn write_zeroes_punches_only_when_unmapping_is_allowed() {
    let s = Scratch::new("wz");
    let path = s.sparse("a.raw", MIB);
    let node = file_node(&path, unmap_config()).await;
    assert_eq!(
        node.write(0, &[9u8; 262144], WriteFlags::default()).await,
        Ok(())
    );
    let unmap = ZeroFlags {
        may_unmap: true,
        ..ZeroFlags::default()
    };
    assert_eq!(node.write_zeroes(0, 65536, unmap).await, Ok(()));
    assert_eq!(node.block_status(0, 65536).await, Ok(vec![hole(65536)]));
    // Without may_unmap the range is zeroed in place (FALLOC_FL_ZERO_RANGE): the bytes
    // stay allocated.
    let before = allocated(&path);
    assert_eq!(
        node.write_zeroes(
            65536,
            65536,
            ZeroFlags {
                fua: true,
                ..ZeroFlags::default()
            }
        )
        .await,
        Ok(())
    );
    assert_eq!(allocated(&path), before);
    assert_eq!(read_back(&path, 0, 131072), vec![0u8; 131072]);
    assert_eq!(read_back(&path, 131072, 2), vec![9u8; 2]);

    // discard=ignore takes the permission to unmap away: nothing is deallocated.
    let keeping = file_node(&path, FileConfig::default()).await;
    assert_eq!(keeping.write_zeroes(131072, 65536, unmap).await, Ok(()));
    assert_eq!(allocated(&path), before);
    assert_eq!(read_back(&path, 131072, 65536), vec![0u8; 65536]);
}

#[tokio::test]
async fn detect_zeroes_unmap_turns_a_zero_write_into_a_hole() {
    let s = Scratch::new("dz");
    let path = s.sparse("a.raw", MIB);
    let mut config = unmap_config();
    config.common.detect_zeroes = DetectZeroes::Unmap;
    let node = file_node(&path, config).await;
    assert_eq!(
        node.write(0, &[1u8; 65536], WriteFlags::default()).await,
        Ok(())
    );
    assert_eq!(allocated(&path), 65536);
    assert_eq!(
        node.write(0, &[0u8; 65536], WriteFlags::default()).await,
        Ok(())
    );
    assert_eq!(allocated(&path), 0);
    assert_eq!(node.block_status(0, MIB).await, Ok(vec![hole(MIB)]));
}

#[tokio::test]
async fn resize_truncates_the_file_and_changes_the_node_size() {
    let s = Scratch::new("resize");
    let path = s.sparse("a.raw", MIB);
    let node = file_node(&path, FileConfig::default()).await;
    assert_eq!(node.resize(2 * MIB).await, Ok(()));
    assert_eq!(node.size(), 2 * MIB);
    assert_eq!(
        std::fs::metadata(&path).map(|m| m.len()).ok(),
        Some(2 * MIB)
    );
    assert_eq!(node.resize(1000).await, Ok(()));
    assert_eq!(node.size(), 1024);
    assert_eq!(std::fs::metadata(&path).map(|m| m.len()).ok(), Some(1000));
}

#[tokio::test]
async fn host_devices_cannot_grow_and_shrinking_changes_nothing() {
    let fd = match bulkhead_block::posix::open_image(
        "/dev/null",
        bulkhead_block::file::FileKind::HostDevice,
        false,
        false,
    ) {
        Ok(fd) => fd,
        Err(e) => panic!("{e}"),
    };
    let node = match open(
        DriverConfig::HostDevice(FileConfig::default()),
        Some(fd),
        vec![],
    )
    .await
    {
        Ok(node) => node,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(node.size(), 0);
    assert_eq!(node.resize(4096).await, Err(IoError::Invalid));
    let s = Scratch::new("hostdev");
    let path = s.sparse("a.raw", 4096);
    let refused = bulkhead_block::posix::open_image(
        common::path_str(&path),
        bulkhead_block::file::FileKind::HostDevice,
        false,
        false,
    );
    assert_eq!(
        refused.map(|_| ()).map_err(|e| e.to_string()),
        Err(format!(
            "'host_device' driver requires '{}' to be either a character or block device",
            path.display()
        ))
    );
    assert_eq!(node.resize(0).await, Ok(()));
}

#[tokio::test]
async fn direct_io_handles_unaligned_requests() {
    let s = Scratch::new("direct");
    let path = s.sparse("a.raw", MIB);
    let mut config = FileConfig::default();
    config.common.direct = true;
    let node = file_node(&path, config).await;
    let pattern: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8 + 1).collect();
    assert_eq!(
        node.write(4097, &pattern, WriteFlags::default()).await,
        Ok(())
    );
    assert_eq!(
        node.write(0, &[0xeeu8; 4096], WriteFlags::default()).await,
        Ok(())
    );
    let mut back = vec![0u8; pattern.len()];
    assert_eq!(node.read(4097, &mut back).await, Ok(()));
    assert_eq!(back, pattern);
    assert_eq!(read_back(&path, 4096, 1), vec![0u8]);
    assert_eq!(read_back(&path, 0, 4096), vec![0xeeu8; 4096]);
    assert_eq!(read_back(&path, 4097, pattern.len()), pattern);
}

#[tokio::test]
async fn raw_windows_translate_offsets_into_the_file() {
    let s = Scratch::new("raw");
    let path = s.sparse("a.raw", MIB);
    let file = file_node(&path, FileConfig::default()).await;
    let window = RawConfig {
        offset: 4096,
        size: Some(65536),
        ..RawConfig::default()
    };
    let raw = match open(
        DriverConfig::Raw(window),
        None,
        vec![(ChildRole::File, Arc::clone(&file))],
    )
    .await
    {
        Ok(node) => node,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(raw.size(), 65536);
    assert_eq!(
        raw.write(0, &[0x11u8; 512], WriteFlags::default()).await,
        Ok(())
    );
    assert_eq!(
        raw.write(65536 - 512, &[0x22u8; 512], WriteFlags::default())
            .await,
        Ok(())
    );
    assert_eq!(
        raw.write(65536 - 511, &[0u8; 512], WriteFlags::default())
            .await,
        Err(IoError::OutOfRange)
    );
    assert_eq!(read_back(&path, 4096, 512), vec![0x11u8; 512]);
    assert_eq!(read_back(&path, 4096 + 65536 - 512, 512), vec![0x22u8; 512]);
    assert_eq!(read_back(&path, 4096 + 65536, 1), vec![0u8]);
    assert_eq!(raw.resize(MIB).await, Err(IoError::Unsupported));
    // Window [4096, 69632) over data at [4096, 4608) ∪ [69120, 69632): block status is
    // the file's, relative to the window.
    assert_eq!(
        raw.block_status(0, 65536).await,
        Ok(vec![data(4096), hole(65536 - 8192), data(4096)])
    );
}

#[tokio::test]
async fn an_open_ended_raw_window_resizes_its_child_to_offset_plus_size() {
    let s = Scratch::new("rawresize");
    let path = s.sparse("a.raw", MIB);
    let file = file_node(&path, FileConfig::default()).await;
    let window = RawConfig {
        offset: 131072,
        ..RawConfig::default()
    };
    let raw = match open(
        DriverConfig::Raw(window),
        None,
        vec![(ChildRole::File, Arc::clone(&file))],
    )
    .await
    {
        Ok(node) => node,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(raw.size(), 917504);
    assert_eq!(raw.resize(MIB).await, Ok(()));
    assert_eq!(raw.size(), MIB);
    assert_eq!(file.size(), MIB + 131072);
    assert_eq!(
        std::fs::metadata(&path).map(|m| m.len()).ok(),
        Some(MIB + 131072)
    );
}

#[tokio::test]
async fn query_info_reports_virtual_and_actual_size() {
    let s = Scratch::new("info");
    let path = s.sparse("a.raw", 1000);
    let fd = common::open(&path, false, false);
    let node = match open(DriverConfig::File(FileConfig::default()), Some(fd), vec![]).await {
        Ok(node) => node,
        Err(e) => panic!("{e}"),
    };
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
    let probe = common::open(&path, true, false);
    let info = image_file_info(std::os::fd::AsFd::as_fd(&probe));
    assert_eq!(
        info.map(|i| (i.virtual_size, i.actual_size)),
        Ok((1024, 4096))
    );
}

#[tokio::test]
async fn open_refuses_missing_or_unexpected_inputs() {
    let err = open(DriverConfig::File(FileConfig::default()), None, vec![])
        .await
        .map(|_| ());
    assert_eq!(
        err.map_err(|e| e.to_string()),
        Err("the file driver needs an image descriptor".to_string())
    );
    let err = open(DriverConfig::Raw(RawConfig::default()), None, vec![])
        .await
        .map(|_| ());
    assert_eq!(
        err.map_err(|e| e.to_string()),
        Err("the raw driver needs a file child".to_string())
    );
    let mut bad = FileConfig::default();
    bad.common.detect_zeroes = DetectZeroes::Unmap;
    let s = Scratch::new("bad");
    let fd = common::open(&s.sparse("a.raw", 4096), false, false);
    let err = open(DriverConfig::File(bad), Some(fd), vec![])
        .await
        .map(|_| ());
    assert_eq!(
        err.map_err(|e| e.to_string()),
        Err("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests_all_complete_with_their_own_data() {
    let s = Scratch::new("concurrent");
    let path = s.sparse("a.raw", MIB);
    for direct in [false, true] {
        let mut config = FileConfig::default();
        config.common.direct = direct;
        let node = file_node(&path, config).await;
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let node = Arc::clone(&node);
            tasks.push(tokio::spawn(async move {
                // Unaligned, non-overlapping 1000-byte slots: in direct mode neighbours
                // share 4 KiB blocks, so this exercises the read-modify-write locking.
                let fill = [(i as u8).wrapping_add(u8::from(direct)); 1000];
                node.write(i * 1000, &fill, WriteFlags::default()).await?;
                let mut back = [0u8; 1000];
                node.read(i * 1000, &mut back).await?;
                Ok::<bool, IoError>(back == fill)
            }));
        }
        for task in tasks {
            assert!(matches!(task.await, Ok(Ok(true))));
        }
        for i in 0..64u64 {
            let expect = (i as u8).wrapping_add(u8::from(direct));
            assert_eq!(
                read_back(&path, (i * 1000) as usize, 1000),
                vec![expect; 1000]
            );
        }
    }
}

/// A format driver's allocation past the end grows the file by the write itself
/// (`WriteFlags::extend`), as QEMU's file grows under qcow2; a plain write there is
/// still out of range, and a read-only node refuses both.
#[tokio::test]
async fn an_extending_write_grows_the_file_to_its_end() {
    let s = Scratch::new("extend");
    let path = s.sparse("a.raw", MIB);
    let node = file_node(&path, FileConfig::default()).await;
    let extend = WriteFlags {
        extend: true,
        ..Default::default()
    };
    assert_eq!(
        node.write(MIB + 4096, &[7u8; 4096], WriteFlags::default())
            .await,
        Err(IoError::OutOfRange)
    );
    assert_eq!(node.write(MIB + 4096, &[7u8; 4096], extend).await, Ok(()));
    assert_eq!(node.size(), MIB + 8192);
    assert_eq!(
        std::fs::metadata(&path).map(|m| m.len()).ok(),
        Some(MIB + 8192)
    );
    assert_eq!(read_back(&path, 1_052_672, 4096), vec![7u8; 4096]);
    // Inside the file, an extending write is a plain write; the size stays.
    assert_eq!(node.write(0, &[1u8; 512], extend).await, Ok(()));
    assert_eq!(node.size(), MIB + 8192);
    let ro = FileConfig {
        common: CommonOptions {
            read_only: true,
            ..CommonOptions::default()
        },
        ..FileConfig::default()
    };
    let node = file_node(&path, ro).await;
    assert_eq!(
        node.write(2 * MIB, &[7u8; 512], extend).await,
        Err(IoError::ReadOnly)
    );
}
