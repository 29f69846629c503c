//! The internal snapshot table, read for queries and kept intact (never rewritten).

use crate::error::{Error, Result};
use crate::header::{self, MAX_L1_BYTES, MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOTS_BYTES};

/// One internal snapshot, as `qemu-img snapshot -l` and `query-block` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    /// `vm_state_size_large` when the extra data has it, else the 32-bit field.
    pub vm_state_size: u64,
    /// The virtual disk size at snapshot time, when the extra data has it.
    pub disk_size: Option<u64>,
    /// The instruction count, when recorded (-1 in the image means none).
    pub icount: Option<u64>,
    /// The entry's bytes as in the table (kept verbatim when the table is rewritten,
    /// unknown extra data included).
    pub(crate) raw: Vec<u8>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// Parses `nb` entries from `table` (the bytes from the table's offset; at most
/// QCOW_MAX_SNAPSHOTS_SIZE of them). Returns the entries and the table's length.
pub fn parse(table: &[u8], nb: u32, cluster_size: u64) -> Result<(Vec<SnapshotInfo>, u64)> {
    let mut out = Vec::with_capacity((nb as usize).min(1024));
    let mut off = 0usize;
    let short = || Error::open(libc::EINVAL, "Failed to read snapshot table");
    for _ in 0..nb {
        let entry_start = off;
        let h = table.get(off..off + 40).ok_or_else(short)?;
        let l1_table_offset = be64(h, 0);
        let l1_size = be32(h, 8);
        let id_len = be16(h, 12) as usize;
        let name_len = be16(h, 14) as usize;
        let date_sec = be32(h, 16);
        let date_nsec = be32(h, 20);
        let vm_clock_nsec = be64(h, 24);
        let vm_state_size32 = be32(h, 32);
        let extra_len = be32(h, 36);
        if extra_len > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(Error::open(
                libc::EFBIG,
                "Too much extra metadata in snapshot table entry",
            ));
        }
        off += 40;
        let extra = table.get(off..off + extra_len as usize).ok_or_else(short)?;
        off += extra_len as usize;
        let vm_state_size = if extra.len() >= 8 {
            be64(extra, 0)
        } else {
            u64::from(vm_state_size32)
        };
        let disk_size = (extra.len() >= 16).then(|| be64(extra, 8));
        let icount = if extra.len() >= 24 {
            Some(be64(extra, 16)).filter(|&v| v != u64::MAX)
        } else {
            None
        };
        let id = header::c_string(table.get(off..off + id_len).ok_or_else(short)?);
        off += id_len;
        let name = header::c_string(table.get(off..off + name_len).ok_or_else(short)?);
        off += name_len;
        off = (off + 7) & !7;
        if off as u64 > MAX_SNAPSHOTS_BYTES {
            return Err(Error::open(libc::EFBIG, "Snapshot table is too big"));
        }
        // The snapshot's L1 table, checked like the active one.
        header::validate_table(
            cluster_size,
            l1_table_offset,
            u64::from(l1_size),
            8,
            MAX_L1_BYTES,
            "Snapshot L1 table",
        )?;
        out.push(SnapshotInfo {
            id,
            name,
            l1_table_offset,
            l1_size,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            disk_size,
            icount,
            raw: {
                // The padding may lie past the end of the file (which reads as zeroes).
                let mut r = table
                    .get(entry_start..off.min(table.len()))
                    .unwrap_or(&[])
                    .to_vec();
                r.resize(off - entry_start, 0);
                r
            },
        });
    }
    Ok((out, off as u64))
}

/// A table entry for a new snapshot (no VM state), padded to 8 bytes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode(
    l1_table_offset: u64,
    l1_size: u32,
    id: &str,
    name: &str,
    date_sec: u32,
    date_nsec: u32,
    vm_clock_nsec: u64,
    disk_size: u64,
    icount: Option<u64>,
) -> Vec<u8> {
    let mut e = Vec::with_capacity(64 + id.len() + name.len());
    e.extend_from_slice(&l1_table_offset.to_be_bytes());
    e.extend_from_slice(&l1_size.to_be_bytes());
    e.extend_from_slice(&(id.len() as u16).to_be_bytes());
    e.extend_from_slice(&(name.len() as u16).to_be_bytes());
    e.extend_from_slice(&date_sec.to_be_bytes());
    e.extend_from_slice(&date_nsec.to_be_bytes());
    e.extend_from_slice(&vm_clock_nsec.to_be_bytes());
    e.extend_from_slice(&0u32.to_be_bytes()); // vm_state_size
    e.extend_from_slice(&24u32.to_be_bytes()); // extra data: three u64
    e.extend_from_slice(&0u64.to_be_bytes()); // vm_state_size_large
    e.extend_from_slice(&disk_size.to_be_bytes());
    e.extend_from_slice(&icount.unwrap_or(u64::MAX).to_be_bytes());
    e.extend_from_slice(id.as_bytes());
    e.extend_from_slice(name.as_bytes());
    e.resize(e.len().div_ceil(8) * 8, 0);
    e
}
