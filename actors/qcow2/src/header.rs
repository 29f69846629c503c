//! The header and its extensions, parsed as hostile input. Checks and texts follow
//! QEMU's `qcow2_do_open`/`qcow2_read_extensions`, in QEMU's order, so that the first
//! error reported is the one qsd reports.

use crate::error::{Error, Result};

pub const MAGIC: u32 = 0x5146_49fb;
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE (bytes).
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MAX_SNAPSHOTS: u64 = 65536;
/// QCOW_MAX_SNAPSHOTS_SIZE: the whole snapshot table.
pub const MAX_SNAPSHOTS_BYTES: u64 = 1024 * MAX_SNAPSHOTS;
pub const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
pub const MAX_BITMAPS: u32 = 65535;
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;
/// Size of the snapshot table entry's fixed part (QCowSnapshotHeader).
pub const SNAPSHOT_HEADER_BYTES: u64 = 40;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
pub const INCOMPAT_MASK: u64 = 0x1f;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
pub const AUTOCLEAR_MASK: u64 = 0x3;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_CRYPTO_HEADER: u32 = 0x0537_be77;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// What qsd says for an encrypted image opened without `encrypt.key-secret` (the
/// engine opens no encrypted image yet: never as plaintext).
pub const KEY_SECRET_REQUIRED: &str = "Parameter 'encrypt.key-secret' is required for cipher";

/// Header field offsets that the engine rewrites in place.
pub const OFF_SIZE: u64 = 24;
pub const OFF_L1_SIZE: u64 = 36;
pub const OFF_REFTABLE: u64 = 48;
pub const OFF_INCOMPAT: u64 = 72;
pub const OFF_AUTOCLEAR: u64 = 88;

/// The compression algorithm of compressed clusters (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    Zlib,
    Zstd,
}

impl CompressionType {
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// One entry of the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear (other values are kept as read).
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

/// The bitmaps extension (the directory itself is parsed by `bitmap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

/// The full-disk encryption header extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoExt {
    pub offset: u64,
    pub length: u64,
}

/// Everything the header cluster says, validated (some fields only for debugging).
#[derive(Debug, Clone)]
#[allow(dead_code)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: CompressionType,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    pub feature_table: Vec<FeatureName>,
    pub bitmaps: Option<BitmapsExt>,
    pub crypto: Option<CryptoExt>,
    /// The header extensions area was not understood fully and an update would drop
    /// something (unknown autoclear bits, a bitmaps extension without its autoclear
    /// bit): QEMU rewrites the header on a writable open.
    pub bitmaps_ext_ignored: bool,
}

/// Big-endian fields; bytes past the end of `b` read as zeroes (never a panic).
fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    for (i, x) in a.iter_mut().enumerate() {
        *x = b.get(at + i).copied().unwrap_or(0);
    }
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// QEMU's `qcow2_validate_table`.
pub fn validate_table(
    cluster_size: u64,
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    name: &str,
) -> Result<()> {
    if entries > max_bytes / entry_len {
        return Err(Error::open(libc::EFBIG, format!("{name} too large")));
    }
    if (i64::MAX as u64) - entries * entry_len < offset || !offset.is_multiple_of(cluster_size) {
        return Err(Error::open(libc::EINVAL, format!("{name} offset invalid")));
    }
    Ok(())
}

/// What the caller asks of the open, as far as header checks go.
#[derive(Debug, Clone, Copy)]
pub struct ParseFlags {
    pub writable: bool,
}

/// Parses the first cluster of the image (`buf` holds at least the header: the first
/// 2 MiB or the whole file if shorter; bytes past EOF are zero).
pub fn parse(buf: &[u8], flags: ParseFlags) -> Result<Header> {
    if buf.len() < 104 {
        return Err(Error::open(libc::EINVAL, "Image is not in qcow2 format"));
    }
    if be32(buf, 0) != MAGIC {
        return Err(Error::open(libc::EINVAL, "Image is not in qcow2 format"));
    }
    let version = be32(buf, 4);
    if !(2..=3).contains(&version) {
        return Err(Error::open(
            libc::ENOTSUP,
            format!("Unsupported qcow2 version {version}"),
        ));
    }
    let cluster_bits = be32(buf, 20);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(Error::open(
            libc::EINVAL,
            format!("Unsupported cluster size: 2^{cluster_bits}"),
        ));
    }
    let cs = 1u64 << cluster_bits;
    let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 2 {
        (0, 0, 0, 4, 72)
    } else {
        let hl = be32(buf, 100);
        if hl < 104 {
            return Err(Error::open(libc::EINVAL, "qcow2 header too short"));
        }
        (
            be64(buf, 72),
            be64(buf, 80),
            be64(buf, 88),
            be32(buf, 96),
            hl,
        )
    };
    if u64::from(header_length) > cs {
        return Err(Error::open(
            libc::EINVAL,
            "qcow2 header exceeds cluster size",
        ));
    }
    let backing_file_offset = be64(buf, 8);
    if backing_file_offset > cs {
        return Err(Error::open(libc::EINVAL, "Invalid backing file offset"));
    }
    let ext_end = if backing_file_offset != 0 {
        backing_file_offset
    } else {
        cs
    };
    // Compression type: byte 104 when the header is long enough to hold it.
    let ctype = if header_length > 104 {
        buf.get(104).copied().unwrap_or(0)
    } else {
        0
    };
    let compression = match ctype {
        0 => CompressionType::Zlib,
        1 => CompressionType::Zstd,
        t => {
            return Err(Error::open(
                libc::ENOTSUP,
                format!("qcow2: unknown compression type: {t}"),
            ));
        }
    };
    if compression == CompressionType::Zlib {
        if incompatible & INCOMPAT_COMPRESSION != 0 {
            return Err(Error::open(
                libc::EINVAL,
                "qcow2: Compression type incompatible feature bit must not be set",
            ));
        }
    } else if incompatible & INCOMPAT_COMPRESSION == 0 {
        return Err(Error::open(
            libc::EINVAL,
            "qcow2: Compression type incompatible feature bit must be set",
        ));
    }
    if incompatible & !INCOMPAT_MASK != 0 {
        // QEMU reads the feature table best-effort to name the bits.
        let table = read_extensions(
            buf,
            header_length as u64,
            ext_end,
            cs,
            0,
            autoclear,
            version,
        )
        .map(|e| e.feature_table)
        .unwrap_or_default();
        return Err(unsupported_features(&table, incompatible & !INCOMPAT_MASK));
    }
    if incompatible & INCOMPAT_CORRUPT != 0 && flags.writable {
        return Err(Error::open(
            libc::EACCES,
            "qcow2: Image is corrupt; cannot be opened read/write",
        ));
    }
    // Subclusters: 32 per cluster with extended L2 entries; at least 512 bytes each.
    if incompatible & INCOMPAT_EXTL2 != 0 && cs / 32 < 512 {
        return Err(Error::open(
            libc::EINVAL,
            format!("Unsupported subcluster size: {}", cs / 32),
        ));
    }
    if refcount_order > 6 {
        return Err(Error::open(
            libc::EINVAL,
            "Reference count entry width too large; may not exceed 64 bits",
        ));
    }
    let crypt_method = be32(buf, 32);
    let size = be64(buf, 24);
    let l1_size = be32(buf, 36);
    let l1_table_offset = be64(buf, 40);
    let refcount_table_offset = be64(buf, 48);
    let refcount_table_clusters = be32(buf, 56);
    let nb_snapshots = be32(buf, 60);
    let snapshots_offset = be64(buf, 64);
    if refcount_table_clusters == 0 {
        return Err(Error::open(
            libc::EINVAL,
            "Image does not contain a reference count table",
        ));
    }
    validate_table(
        cs,
        refcount_table_offset,
        u64::from(refcount_table_clusters),
        cs,
        MAX_REFTABLE_BYTES,
        "Reference count table",
    )?;
    validate_table(
        cs,
        snapshots_offset,
        u64::from(nb_snapshots),
        SNAPSHOT_HEADER_BYTES,
        SNAPSHOT_HEADER_BYTES * MAX_SNAPSHOTS,
        "Snapshot table",
    )?;
    validate_table(
        cs,
        l1_table_offset,
        u64::from(l1_size),
        8,
        MAX_L1_BYTES,
        "Active L1 table",
    )?;
    let l2_entries = cs
        / if incompatible & INCOMPAT_EXTL2 != 0 {
            16
        } else {
            8
        };
    let l1_needed = size.div_ceil(cs).div_ceil(l2_entries);
    if l1_needed > i32::MAX as u64 {
        return Err(Error::open(libc::EFBIG, "Image is too big"));
    }
    if u64::from(l1_size) < l1_needed {
        return Err(Error::open(libc::EINVAL, "L1 table is too small"));
    }
    // QEMU checks the encryption method with the open options, before extensions.
    match crypt_method {
        0 | 2 => {}
        1 => return Err(Error::open(libc::EINVAL, KEY_SECRET_REQUIRED)),
        m => {
            return Err(Error::open(
                libc::EINVAL,
                format!("Unsupported encryption method {m}"),
            ));
        }
    }
    let ext = read_extensions(
        buf,
        u64::from(header_length),
        ext_end,
        cs,
        crypt_method,
        autoclear,
        version,
    )?;
    if crypt_method == 2 && ext.crypto.is_none() {
        return Err(Error::open(
            libc::EINVAL,
            format!("Missing CRYPTO header for crypt method {crypt_method}"),
        ));
    }
    let backing_file_size = be32(buf, 16);
    let backing_file = if backing_file_offset != 0 {
        let len = u64::from(backing_file_size);
        if len > 1023.min(cs - backing_file_offset) || len >= 1024 {
            return Err(Error::open(libc::EINVAL, "Backing file name too long"));
        }
        let start = backing_file_offset as usize;
        let end = start + len as usize;
        let bytes = buf.get(start..end).unwrap_or(&[]);
        Some(c_string(bytes))
    } else {
        None
    };
    Ok(Header {
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
        incompatible,
        compatible,
        autoclear,
        refcount_order,
        header_length,
        compression,
        backing_file,
        backing_format: ext.backing_format,
        data_file: ext.data_file,
        feature_table: ext.feature_table,
        bitmaps: ext.bitmaps,
        crypto: ext.crypto,
        bitmaps_ext_ignored: ext.bitmaps_ignored,
    })
}

/// A C string from image bytes: up to the first NUL, lossy UTF-8.
pub fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// QEMU's `report_unsupported_feature`.
pub fn unsupported_features(table: &[FeatureName], mut mask: u64) -> Error {
    let mut parts: Vec<String> = Vec::new();
    for f in table {
        if f.kind == 0 && f.bit < 64 && mask & (1u64 << f.bit) != 0 {
            parts.push(f.name.chars().take(46).collect());
            mask &= !(1u64 << f.bit);
        }
    }
    if mask != 0 {
        parts.push(format!("Unknown incompatible feature: {mask:x}"));
    }
    Error::open(
        libc::ENOTSUP,
        format!("Unsupported qcow2 feature(s): {}", parts.join(", ")),
    )
}

#[derive(Default)]
struct Extensions {
    backing_format: Option<String>,
    data_file: Option<String>,
    feature_table: Vec<FeatureName>,
    bitmaps: Option<BitmapsExt>,
    crypto: Option<CryptoExt>,
    bitmaps_ignored: bool,
}

fn read_extensions(
    buf: &[u8],
    start: u64,
    end: u64,
    cs: u64,
    crypt_method: u32,
    autoclear: u64,
    version: u32,
) -> Result<Extensions> {
    let mut ext = Extensions::default();
    let mut off = start;
    // Every iteration advances by at least 8 bytes and `end` <= cluster size: bounded.
    while off < end {
        let at = off as usize;
        let hdr = buf.get(at..at + 8);
        let (magic, len) = match hdr {
            Some(h) => (be32(h, 0), u64::from(be32(h, 4))),
            None => (0, 0),
        };
        off += 8;
        if off > end || len > end - off {
            return Err(Error::open(libc::EINVAL, "Header extension too large"));
        }
        let data = buf.get(off as usize..(off + len) as usize).unwrap_or(&[]);
        match magic {
            EXT_END => return Ok(ext),
            EXT_BACKING_FORMAT => {
                if len >= 16 {
                    return Err(Error::open(
                        libc::EINVAL,
                        format!("ERROR: ext_backing_format: len={len} too large (>=16)"),
                    ));
                }
                ext.backing_format = Some(c_string(data));
            }
            EXT_FEATURE_TABLE => {
                // 48-byte entries: type, bit number, 46 bytes of name.
                for e in data.chunks_exact(48) {
                    if e[0] == 0 && e[1] == 0 && e[2] == 0 {
                        // QEMU stops at the first entry with an empty name.
                        break;
                    }
                    ext.feature_table.push(FeatureName {
                        kind: e[0],
                        bit: e[1],
                        name: c_string(&e[2..48]),
                    });
                }
            }
            EXT_CRYPTO_HEADER => {
                if crypt_method != 2 {
                    return Err(Error::open(
                        libc::EINVAL,
                        "CRYPTO header extension only expected with LUKS encryption method",
                    ));
                }
                if len != 16 {
                    return Err(Error::open(
                        libc::EINVAL,
                        format!("CRYPTO header extension size {len}, but expected size 16"),
                    ));
                }
                let offset = be64(data, 0);
                let length = be64(data, 8);
                if !offset.is_multiple_of(cs) {
                    return Err(Error::open(
                        libc::EINVAL,
                        format!(
                            "Encryption header offset '{offset}' is not a multiple of cluster size '{cs}'"
                        ),
                    ));
                }
                ext.crypto = Some(CryptoExt { offset, length });
            }
            EXT_BITMAPS => {
                if len != 24 {
                    return Err(Error::open(
                        libc::EINVAL,
                        "bitmaps_ext: Invalid extension length",
                    ));
                }
                if autoclear & AUTOCLEAR_BITMAPS == 0 {
                    // Written by a program without bitmap support: QEMU ignores the
                    // bitmaps (inconsistent) and drops the extension on its next update.
                    let _ = version;
                    ext.bitmaps_ignored = true;
                } else {
                    let nb = be32(data, 0);
                    if be32(data, 4) != 0 {
                        return Err(Error::open(
                            libc::EINVAL,
                            "bitmaps_ext: Reserved field is not zero",
                        ));
                    }
                    let size = be64(data, 8);
                    let offset = be64(data, 16);
                    if nb > MAX_BITMAPS {
                        return Err(Error::open(
                            libc::EINVAL,
                            format!(
                                "bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}"
                            ),
                        ));
                    }
                    if nb == 0 {
                        return Err(Error::open(
                            libc::EINVAL,
                            "found bitmaps extension with zero bitmaps",
                        ));
                    }
                    if !offset.is_multiple_of(cs) {
                        return Err(Error::open(
                            libc::EINVAL,
                            "bitmaps_ext: invalid bitmap directory offset",
                        ));
                    }
                    if size > MAX_BITMAP_DIRECTORY_BYTES {
                        return Err(Error::open(
                            libc::EINVAL,
                            format!(
                                "bitmaps_ext: bitmap directory size ({size}) exceeds the maximum supported size ({MAX_BITMAP_DIRECTORY_BYTES})"
                            ),
                        ));
                    }
                    ext.bitmaps = Some(BitmapsExt {
                        nb_bitmaps: nb,
                        directory_size: size,
                        directory_offset: offset,
                    });
                }
            }
            EXT_DATA_FILE => ext.data_file = Some(c_string(data)),
            _ => {}
        }
        off += (len + 7) & !7;
    }
    Ok(ext)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid v3 header in a 64 KiB cluster.
    fn base() -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        b[36..40].copy_from_slice(&1u32.to_be_bytes());
        b[40..48].copy_from_slice(&0x30000u64.to_be_bytes());
        b[48..56].copy_from_slice(&0x10000u64.to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b
    }

    fn err(b: &[u8], writable: bool) -> String {
        match parse(b, ParseFlags { writable }) {
            Ok(_) => "ok".into(),
            Err(e) => e.to_string(),
        }
    }

    fn set32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    fn set64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    #[test]
    fn hostile_values() {
        assert_eq!(err(&base(), true), "ok");
        type Case = (Box<dyn Fn(&mut Vec<u8>)>, &'static str);
        let cases: Vec<Case> = vec![
            (Box::new(|b| set32(b, 0, 0)), "Image is not in qcow2 format"),
            (Box::new(|b| set32(b, 4, 4)), "Unsupported qcow2 version 4"),
            (Box::new(|b| set32(b, 4, 1)), "Unsupported qcow2 version 1"),
            (
                Box::new(|b| set32(b, 20, 22)),
                "Unsupported cluster size: 2^22",
            ),
            (
                Box::new(|b| set32(b, 20, 8)),
                "Unsupported cluster size: 2^8",
            ),
            (Box::new(|b| set32(b, 100, 100)), "qcow2 header too short"),
            (
                Box::new(|b| set32(b, 100, 70000)),
                "qcow2 header exceeds cluster size",
            ),
            (
                Box::new(|b| set64(b, 8, 70000)),
                "Invalid backing file offset",
            ),
            (
                Box::new(|b| set32(b, 96, 7)),
                "Reference count entry width too large; may not exceed 64 bits",
            ),
            (
                Box::new(|b| set64(b, 72, 1 << 20)),
                "Unsupported qcow2 feature(s): Unknown incompatible feature: 100000",
            ),
            (
                Box::new(|b| set64(b, 72, INCOMPAT_CORRUPT)),
                "qcow2: Image is corrupt; cannot be opened read/write",
            ),
            (
                Box::new(|b| set32(b, 56, 0)),
                "Image does not contain a reference count table",
            ),
            (
                Box::new(|b| set32(b, 56, 200)),
                "Reference count table too large",
            ),
            (
                Box::new(|b| set64(b, 48, 0x10001)),
                "Reference count table offset invalid",
            ),
            (
                Box::new(|b| set32(b, 36, 5 << 20)),
                "Active L1 table too large",
            ),
            (
                Box::new(|b| set64(b, 40, !0xffff)),
                "Active L1 table offset invalid",
            ),
            (
                Box::new(|b| set32(b, 60, 70000)),
                "Snapshot table too large",
            ),
            (Box::new(|b| set64(b, 24, u64::MAX)), "Image is too big"),
            (Box::new(|b| set64(b, 24, 1 << 40)), "L1 table is too small"),
            (
                Box::new(|b| b[104] = 2),
                "qcow2: unknown compression type: 2",
            ),
            (
                Box::new(|b| b[104] = 1),
                "qcow2: Compression type incompatible feature bit must be set",
            ),
            (
                Box::new(|b| {
                    set32(b, 112, EXT_BACKING_FORMAT);
                    set32(b, 116, 100_000);
                }),
                "Header extension too large",
            ),
            (
                Box::new(|b| {
                    set32(b, 112, EXT_BACKING_FORMAT);
                    set32(b, 116, 16);
                }),
                "ERROR: ext_backing_format: len=16 too large (>=16)",
            ),
            (
                Box::new(|b| {
                    set64(b, 8, 1000);
                    set32(b, 16, 1024);
                }),
                "Backing file name too long",
            ),
            (
                Box::new(|b| {
                    set64(b, 88, 1);
                    set32(b, 112, EXT_BITMAPS);
                    set32(b, 116, 24);
                }),
                "found bitmaps extension with zero bitmaps",
            ),
            (
                Box::new(|b| set32(b, 32, 2)),
                "Missing CRYPTO header for crypt method 2",
            ),
            (Box::new(|b| set32(b, 32, 1)), KEY_SECRET_REQUIRED),
            (
                Box::new(|b| set32(b, 32, 9)),
                "Unsupported encryption method 9",
            ),
        ];
        for (f, want) in cases {
            let mut b = base();
            f(&mut b);
            assert_eq!(err(&b, true), want);
        }
        // A corrupt image opens read-only.
        let mut b = base();
        set64(&mut b, 72, INCOMPAT_CORRUPT);
        assert_eq!(err(&b, false), "ok");
        // Named unknown features, from the feature table.
        let mut b = base();
        set64(&mut b, 72, 1 << 9);
        set32(&mut b, 112, EXT_FEATURE_TABLE);
        set32(&mut b, 116, 48);
        b[120] = 0;
        b[121] = 9;
        b[122..126].copy_from_slice(b"frob");
        assert_eq!(err(&b, false), "Unsupported qcow2 feature(s): frob");
        // Short buffers and every single-byte value at every header offset: no panic.
        for len in 0..200 {
            let _ = parse(&base()[..len], ParseFlags { writable: true });
        }
        for at in 0..128 {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut b = base();
                b[at] = v;
                let _ = parse(&b, ParseFlags { writable: true });
            }
        }
    }
}
