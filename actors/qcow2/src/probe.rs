//! What a caller must know before it can open an image: the external data file its
//! header names, and what decides whether its options fit. QEMU opens that file by
//! name while it opens the image; bulkhead's supervisor opens it (after its policy
//! checks) and passes it in, so it asks first.

use crate::error::{Error, Result};
use crate::header;
use crate::storage::Storage;

/// What the header says that decides whether an image can be opened with the
/// given options, before anything is written to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderFacts {
    /// The external data file it names (its `data-file` feature bit is set).
    pub data_file: Option<String>,
    /// Bytes per cluster.
    pub cluster_size: u64,
    /// 2 or 3.
    pub version: u32,
    /// `crypt_method`: 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
}

/// Reads and checks the header of the image in `file`; errors are the ones
/// [`crate::Qcow2::open`] gives for the same header.
pub fn header_facts(file: &dyn Storage) -> Result<HeaderFacts> {
    let mut first = vec![0u8; 512];
    file.read_at(&mut first, 0)
        .map_err(Error::io("Could not read qcow2 header"))?;
    let cb = u32::from_be_bytes([first[20], first[21], first[22], first[23]]);
    if (header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cb) && cb > 9 {
        first = vec![0u8; 1usize << cb];
        file.read_at(&mut first, 0)
            .map_err(Error::io("Could not read qcow2 header"))?;
    }
    let h = header::parse(&first, header::ParseFlags { writable: false })?;
    Ok(HeaderFacts {
        data_file: h
            .data_file
            .filter(|_| h.incompatible & header::INCOMPAT_DATA_FILE != 0),
        cluster_size: 1u64 << h.cluster_bits,
        version: h.version,
        crypt_method: h.crypt_method,
    })
}

/// The external data file the header of the image in `file` names, when the image
/// has one (its `data-file` feature bit is set).
pub fn named_data_file(file: &dyn Storage) -> Result<Option<String>> {
    header_facts(file).map(|f| f.data_file)
}
