//! A loop block device over a sparse file, for `host_device` tests.
//!
//! Runs in the test process and needs root and `losetup`; callers skip their host_device
//! part (with a printed note) when [`LoopDevice::attach`] fails.

use std::fs::File;

use crate::daemon::{TempDir, run_tool};
use crate::error::HarnessError;

/// An attached loop device, detached on drop.
#[derive(Debug)]
pub struct LoopDevice {
    path: String,
    // Kept so the backing file lives as long as the device.
    _backing_dir: TempDir,
}

impl LoopDevice {
    /// Attaches the first free loop device to a new sparse file of `size` bytes.
    pub fn attach(size: u64) -> Result<LoopDevice, HarnessError> {
        let dir = TempDir::new("bulkhead-loop")?;
        let backing = dir.path().join("backing.img");
        File::create(&backing)
            .and_then(|f| f.set_len(size))
            .map_err(|e| HarnessError::io("creating the loop backing file", e))?;
        let backing = backing.to_string_lossy().into_owned();
        let path = run_tool("losetup", &["-f", "--show", &backing])?
            .trim()
            .to_string();
        if !path.starts_with("/dev/loop") {
            return Err(HarnessError::Tool {
                program: "losetup".into(),
                args: vec!["-f".into(), "--show".into(), backing],
                detail: format!("printed {path:?}, not a loop device"),
            });
        }
        Ok(LoopDevice {
            path,
            _backing_dir: dir,
        })
    }

    /// The device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = run_tool("losetup", &["-d", &self.path]);
    }
}
