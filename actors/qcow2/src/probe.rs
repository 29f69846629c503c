//! What a caller must know before it can open an image: the external data file its
//! header names. QEMU opens that file by name while it opens the image; bulkhead's
//! supervisor opens it (after its policy checks) and passes it in, so it asks first.

use crate::error::{Error, Result};
use crate::header;
use crate::storage::Storage;

/// The external data file the header of the image in `file` names, when the image
/// has one (its `data-file` feature bit is set). Reads and checks the header only;
/// errors are the ones [`crate::Qcow2::open`] gives for the same header.
pub fn named_data_file(file: &dyn Storage) -> Result<Option<String>> {
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
    if h.incompatible & header::INCOMPAT_DATA_FILE == 0 {
        return Ok(None);
    }
    Ok(h.data_file)
}
