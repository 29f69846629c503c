//! A new qcow2 image, laid out as QEMU 10.0.2's `qcow2_co_create` leaves it:
//! the header in cluster 0 (version 3, a 112-byte header, then the backing format
//! extension if any, the feature name table (clusters over 4 KiB only), the end
//! marker, the backing file name),
//! the refcount table in cluster 1, its one refcount block in cluster 2, the L1
//! table from cluster 3 (the file ends right after its last entry), every one of
//! these clusters counted once. `qemu-img create` and `blockdev-create` make the same
//! bytes; the tests compare them.

use crate::error::{Error, Result};

/// What `blockdev-create` with `driver: qcow2` may ask for here.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    /// Cluster size (a power of two from 512 to 2 MiB; QEMU's default 64 KiB).
    pub cluster_size: u64,
    /// The backing file name to record.
    pub backing_file: Option<String>,
    /// Its format.
    pub backing_format: Option<String>,
    /// Lazy refcounts (a compatible feature bit).
    pub lazy_refcounts: bool,
}

/// The feature name table QEMU writes: (type, bit, name).
const FEATURES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

const MAGIC: u32 = 0x5146_49fb;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const HEADER_LENGTH: u32 = 112;

/// The writes that make a new image (offset, bytes), in order; the file must be
/// empty first.
pub fn create_layout(o: &CreateOptions) -> Result<Vec<(u64, Vec<u8>)>> {
    let cs = o.cluster_size;
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(Error::Invalid(
            "Cluster size must be a power of two between 512 and 2048k".into(),
        ));
    }
    if !o.size.is_multiple_of(512) {
        return Err(Error::Invalid(
            "Image size must be a multiple of 512 bytes".into(),
        ));
    }
    if o.backing_format.is_some() && o.backing_file.is_none() {
        return Err(Error::Invalid(
            "Backing format cannot be used without backing file".into(),
        ));
    }
    let cluster_bits = cs.trailing_zeros();
    let entries_per_l2 = cs / 8;
    let l1_size = o.size.div_ceil(cs * entries_per_l2);
    let l1_bytes = l1_size * 8;
    // An empty image has no L1 table at all (offset 0), as QEMU leaves it.
    let l1_clusters = l1_bytes.div_ceil(cs);
    // Refcount block entries are 16 bits: one block counts cs / 2 clusters.
    let used = 3 + l1_clusters;
    if used > cs / 2 {
        return Err(Error::Invalid(
            "Image size is too large for this cluster size".into(),
        ));
    }
    let name = o.backing_file.as_deref().unwrap_or("");
    if name.len() > 1023 {
        return Err(Error::Invalid("Backing file name too long".into()));
    }

    // Extensions, then the end marker, then the backing file name.
    let mut ext = Vec::new();
    let mut push_ext = |magic: u32, data: &[u8]| {
        ext.extend_from_slice(&magic.to_be_bytes());
        ext.extend_from_slice(&(data.len() as u32).to_be_bytes());
        ext.extend_from_slice(data);
        ext.resize(ext.len().next_multiple_of(8), 0);
    };
    if let Some(fmt) = &o.backing_format {
        push_ext(EXT_BACKING_FORMAT, fmt.as_bytes());
    }
    // QEMU leaves the table out of images with clusters of 4 KiB or less (they
    // would spend a good part of the header cluster on it).
    if cs > 4096 {
        let mut table = Vec::with_capacity(FEATURES.len() * 48);
        for (kind, bit, name) in FEATURES {
            let mut entry = [0u8; 48];
            entry[0] = kind;
            entry[1] = bit;
            entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
            table.extend_from_slice(&entry);
        }
        push_ext(EXT_FEATURE_TABLE, &table);
    }
    ext.extend_from_slice(&[0u8; 8]);
    let backing_offset = if name.is_empty() {
        0
    } else {
        u64::from(HEADER_LENGTH) + ext.len() as u64
    };

    let mut header = Vec::with_capacity(usize::try_from(cs).unwrap_or(4096));
    header.extend_from_slice(&MAGIC.to_be_bytes());
    header.extend_from_slice(&3u32.to_be_bytes());
    header.extend_from_slice(&backing_offset.to_be_bytes());
    header.extend_from_slice(&(name.len() as u32).to_be_bytes());
    header.extend_from_slice(&cluster_bits.to_be_bytes());
    header.extend_from_slice(&o.size.to_be_bytes());
    header.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
    header.extend_from_slice(&(l1_size as u32).to_be_bytes());
    let l1_offset = if l1_size == 0 { 0 } else { 3 * cs };
    header.extend_from_slice(&l1_offset.to_be_bytes()); // l1_table_offset
    header.extend_from_slice(&cs.to_be_bytes()); // refcount_table_offset
    header.extend_from_slice(&1u32.to_be_bytes()); // refcount_table_clusters
    header.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
    header.extend_from_slice(&0u64.to_be_bytes()); // snapshots_offset
    header.extend_from_slice(&0u64.to_be_bytes()); // incompatible
    header.extend_from_slice(&u64::from(o.lazy_refcounts).to_be_bytes()); // compatible
    header.extend_from_slice(&0u64.to_be_bytes()); // autoclear
    header.extend_from_slice(&4u32.to_be_bytes()); // refcount_order: 16 bits
    header.extend_from_slice(&HEADER_LENGTH.to_be_bytes());
    header.resize(HEADER_LENGTH as usize, 0); // compression type zlib, padding
    header.extend_from_slice(&ext);
    header.extend_from_slice(name.as_bytes());
    if header.len() as u64 > cs {
        return Err(Error::Invalid(
            "Header extensions do not fit in the first cluster".into(),
        ));
    }
    header.resize(
        usize::try_from(cs).map_err(|_| Error::Invalid("cluster size".into()))?,
        0,
    );

    let cs_usize = header.len();
    let mut reftable = vec![0u8; cs_usize];
    reftable[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    let mut refblock = vec![0u8; cs_usize];
    for i in 0..usize::try_from(used).unwrap_or(0) {
        refblock[2 * i..2 * i + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    let mut writes = vec![(0, header), (cs, reftable), (2 * cs, refblock)];
    // The L1 table: zeroes, only as long as its entries (QEMU's file ends there).
    let l1 = vec![0u8; usize::try_from(l1_bytes).unwrap_or(0)];
    if !l1.is_empty() {
        writes.push((3 * cs, l1));
    }
    Ok(writes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemStorage, OpenOptions, Qcow2, Storage};
    use std::sync::Arc;

    fn image(o: &CreateOptions) -> Arc<MemStorage> {
        let mem = Arc::new(MemStorage::new(Vec::new(), 1 << 30));
        for (off, bytes) in create_layout(o).unwrap() {
            mem.write_at(&bytes, off).unwrap();
        }
        mem
    }

    #[test]
    fn a_new_image_opens_with_its_size_and_backing_name() {
        let o = CreateOptions {
            size: 64 << 20,
            cluster_size: 65536,
            backing_file: Some("/b.qcow2".into()),
            backing_format: Some("qcow2".into()),
            lazy_refcounts: false,
        };
        let mem = image(&o);
        assert_eq!(mem.len().unwrap(), 3 * 65536 + 8);
        let q = Qcow2::open(mem, OpenOptions::default()).unwrap();
        let info = q.info();
        assert_eq!(info.virtual_size, 64 << 20);
        assert_eq!(info.backing_file.as_deref(), Some("/b.qcow2"));
        assert_eq!(info.backing_format.as_deref(), Some("qcow2"));
    }

    #[test]
    fn bad_sizes_are_refused_with_qemus_texts() {
        let o = CreateOptions {
            size: 1000,
            cluster_size: 65536,
            ..Default::default()
        };
        assert_eq!(
            create_layout(&o).map(|_| ()).map_err(|e| e.to_string()),
            Err("Image size must be a multiple of 512 bytes".to_string())
        );
    }
}
