//! QEMU-compatible image locking with open file description (OFD) locks.
//!
//! Runs in the supervisor, on its own copy of each image fd (OFD locks belong to the
//! open file description, which the fd passed to the worker shares, so the locks stay
//! held while a worker restarts). The protocol is QEMU file-posix's, so bulkhead, qsd,
//! qemu-img and qemu-io exclude each other: for each permission bit `i` (consistent
//! read, write, write unchanged, resize) a node holding the permission takes a shared
//! lock on byte `100 + i`, and a node that does not share it with others takes a shared
//! lock on byte `200 + i`. Taking permission `i` requires that nobody else holds
//! `200 + i`; refusing to share it requires that nobody else holds `100 + i`. A lock
//! "held by someone else" is one `F_OFD_GETLK` reports for a write-lock probe.
//! No untrusted bytes are parsed.

use std::os::fd::{AsRawFd, OwnedFd};

use crate::config::OnOffAuto;
use crate::posix::strerror;

/// Permission bits, QEMU's `BLK_PERM_*` values.
pub mod perm {
    /// `consistent read`.
    pub const CONSISTENT_READ: u64 = 0x01;
    /// `write`.
    pub const WRITE: u64 = 0x02;
    /// `write unchanged`.
    pub const WRITE_UNCHANGED: u64 = 0x04;
    /// `resize`.
    pub const RESIZE: u64 = 0x08;
    /// All permissions QEMU 10.0 knows.
    pub const ALL: u64 = 0x0f;
}

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// QEMU's name of one permission bit (`bdrv_perm_names`).
pub fn perm_name(bit: u64) -> &'static str {
    match bit {
        perm::CONSISTENT_READ => "consistent read",
        perm::WRITE => "write",
        perm::WRITE_UNCHANGED => "write unchanged",
        perm::RESIZE => "resize",
        _ => "unknown",
    }
}

fn bits() -> impl Iterator<Item = (i64, u64)> {
    (0..4).map(|i| (i, 1u64 << i))
}

/// Why a permission change was refused. `Display` is qsd's error `desc`; [`LockError::hint`]
/// is the line qsd adds on its command line and qemu-img prints (QMP drops it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// Another user unshares a permission we want (`shared: false`) or holds one we
    /// want to unshare (`shared: true`).
    #[error("Failed to get {}\"{perm}\" lock", if *shared { "shared " } else { "" })]
    Conflict {
        /// The permission's QEMU name, e.g. `write`.
        perm: &'static str,
        /// Whether the conflict is about sharing rather than taking the permission.
        shared: bool,
        /// The image name as the user gave it, for the hint.
        filename: String,
    },
    /// The lock probe itself failed.
    #[error("Failed to get {}\"{perm}\" lock: {reason}", if *shared { "shared " } else { "" })]
    Probe {
        /// The permission's QEMU name.
        perm: &'static str,
        /// As in [`LockError::Conflict`].
        shared: bool,
        /// `strerror` of the failure.
        reason: String,
        /// The image name as the user gave it, for the hint.
        filename: String,
    },
    /// Setting one of our own lock bytes failed.
    #[error("Failed to lock byte {byte}: {reason}")]
    LockByte {
        /// The byte offset (100..=103 or 200..=203).
        byte: i64,
        /// `strerror` of the failure.
        reason: String,
        /// The image name as the user gave it, for the hint.
        filename: String,
    },
}

impl LockError {
    /// The hint line qsd prints after the error on its command line:
    /// `Is another process using the image [<filename>]?`.
    pub fn hint(&self) -> String {
        let filename = match self {
            LockError::Conflict { filename, .. }
            | LockError::Probe { filename, .. }
            | LockError::LockByte { filename, .. } => filename,
        };
        format!("Is another process using the image [{filename}]?")
    }
}

fn ofd_lock(
    fd: &OwnedFd,
    cmd: libc::c_int,
    lock_type: libc::c_short,
    byte: i64,
) -> Result<libc::c_short, i32> {
    // SAFETY: flock is a plain C struct; all-zero is a valid value for every field.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl.l_type = lock_type;
    // l_pid must be 0 for OFD commands (zeroed above).
    loop {
        // SAFETY: F_OFD_SETLK/F_OFD_GETLK read (and GETLK writes) one struct flock
        // through the pointer, which points at a live local; the fd is owned by `fd`.
        let rc = unsafe { libc::fcntl(fd.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
        if rc == 0 {
            return Ok(fl.l_type);
        }
        let err = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        if err != libc::EINTR {
            return Err(err);
        }
    }
}

/// The lock state of one image fd, mirroring QEMU's `BDRVRawState` lock fields.
#[derive(Debug)]
pub struct ImageLock {
    fd: OwnedFd,
    filename: String,
    enabled: bool,
    /// Permissions currently granted (committed).
    perm: u64,
    /// Permissions currently shared (committed).
    shared: u64,
    /// Bytes 100+i we hold.
    locked_perm: u64,
    /// Bytes 200+i we hold.
    locked_unshared: u64,
}

impl ImageLock {
    /// Lock state for `fd` (a duplicate of the fd the node's worker uses). `filename`
    /// is the path as the user gave it (it appears in the hint). `locking=off` makes
    /// every operation succeed without touching the lock bytes; `auto` and `on` lock
    /// (Linux always has OFD locks). A fresh lock holds nothing: qsd takes no locks
    /// for a node until a user needs permissions on it.
    pub fn new(fd: OwnedFd, filename: &str, locking: OnOffAuto) -> ImageLock {
        ImageLock {
            fd,
            filename: filename.to_string(),
            enabled: locking != OnOffAuto::Off,
            perm: 0,
            shared: perm::ALL,
            locked_perm: 0,
            locked_unshared: 0,
        }
    }

    /// Permissions currently granted.
    pub fn perm(&self) -> u64 {
        self.perm
    }

    /// Permissions currently shared with other users.
    pub fn shared(&self) -> u64 {
        self.shared
    }

    /// Takes `perm` and shares `shared` (QEMU's prepare + commit, or prepare + abort on
    /// failure, after which the previous state is intact).
    pub fn set_perm(&mut self, perm: u64, shared: u64) -> Result<(), LockError> {
        self.prepare(perm, shared)?;
        self.commit(perm, shared);
        Ok(())
    }

    /// Checks that `perm`/`shared` can be had, locking the union of the old and new
    /// bytes. Follow with [`ImageLock::commit`] or [`ImageLock::abort`]; on error this
    /// has already aborted. Requests that only drop permissions always succeed.
    pub fn prepare(&mut self, perm: u64, shared: u64) -> Result<(), LockError> {
        if !self.enabled {
            return Ok(());
        }
        if (self.perm | perm) == self.perm && (self.shared & shared) == self.shared {
            return Ok(());
        }
        let result = self
            .apply(self.perm | perm, !self.shared | !shared, false)
            .and_then(|()| self.check(perm, shared));
        if result.is_err() {
            self.abort();
        }
        result
    }

    /// Makes `perm`/`shared` the current state, releasing bytes no longer needed.
    pub fn commit(&mut self, perm: u64, shared: u64) {
        if self.enabled {
            // Unlocking cannot conflict; a failure leaves an extra lock byte held, which
            // only makes others more cautious (QEMU ignores it too).
            let _ = self.apply(perm, !shared, true);
        }
        self.perm = perm;
        self.shared = shared;
    }

    /// Returns to the committed state after a [`ImageLock::prepare`].
    pub fn abort(&mut self) {
        if self.enabled {
            let _ = self.apply(self.perm, !self.shared, true);
        }
    }

    /// Drops every lock byte (the node is being closed or gives up all permissions).
    pub fn release(&mut self) {
        self.commit(0, perm::ALL);
    }

    fn apply(&mut self, perm_bits: u64, unshared_bits: u64, unlock: bool) -> Result<(), LockError> {
        for (base, wanted, locked) in [
            (PERM_BASE, perm_bits, &mut self.locked_perm),
            (SHARED_BASE, unshared_bits, &mut self.locked_unshared),
        ] {
            for (i, bit) in bits() {
                let byte = base + i;
                if wanted & bit != 0 && *locked & bit == 0 {
                    ofd_lock(
                        &self.fd,
                        libc::F_OFD_SETLK,
                        libc::F_RDLCK as libc::c_short,
                        byte,
                    )
                    .map_err(|e| LockError::LockByte {
                        byte,
                        reason: strerror(e),
                        filename: self.filename.clone(),
                    })?;
                    *locked |= bit;
                } else if unlock && *locked & bit != 0 && wanted & bit == 0 {
                    ofd_lock(
                        &self.fd,
                        libc::F_OFD_SETLK,
                        libc::F_UNLCK as libc::c_short,
                        byte,
                    )
                    .map_err(|e| LockError::LockByte {
                        byte,
                        reason: strerror(e),
                        filename: self.filename.clone(),
                    })?;
                    *locked &= !bit;
                }
            }
        }
        Ok(())
    }

    /// Whether someone else holds `byte`, as QEMU's `qemu_lock_fd_test` asks it.
    fn held_by_others(&self, byte: i64) -> Result<bool, i32> {
        ofd_lock(
            &self.fd,
            libc::F_OFD_GETLK,
            libc::F_WRLCK as libc::c_short,
            byte,
        )
        .map(|found| found != libc::F_UNLCK as libc::c_short)
    }

    fn check(&self, perm: u64, shared: u64) -> Result<(), LockError> {
        for (bytes_base, test_set, is_shared) in
            [(SHARED_BASE, perm, false), (PERM_BASE, !shared, true)]
        {
            for (i, bit) in bits() {
                if test_set & bit == 0 {
                    continue;
                }
                let name = perm_name(bit);
                match self.held_by_others(bytes_base + i) {
                    Ok(false) => {}
                    Ok(true) => {
                        return Err(LockError::Conflict {
                            perm: name,
                            shared: is_shared,
                            filename: self.filename.clone(),
                        });
                    }
                    Err(e) => {
                        return Err(LockError::Probe {
                            perm: name,
                            shared: is_shared,
                            reason: strerror(e),
                            filename: self.filename.clone(),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        // Closing the fd would drop the locks only if no other fd (the worker's) shares
        // the description, so release them explicitly.
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_texts_are_qsd_texts() {
        let write = LockError::Conflict {
            perm: "write",
            shared: false,
            filename: "c.qcow2".to_string(),
        };
        assert_eq!(write.to_string(), "Failed to get \"write\" lock");
        assert_eq!(
            write.hint(),
            "Is another process using the image [c.qcow2]?"
        );
        let resize = LockError::Conflict {
            perm: "resize",
            shared: true,
            filename: "x".to_string(),
        };
        assert_eq!(resize.to_string(), "Failed to get shared \"resize\" lock");
    }

    #[test]
    fn perm_names_are_qemu_names() {
        assert_eq!(perm_name(perm::CONSISTENT_READ), "consistent read");
        assert_eq!(perm_name(perm::WRITE_UNCHANGED), "write unchanged");
    }
}
