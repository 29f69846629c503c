//! New user, mount, IPC and network namespaces, and an empty root directory.
//!
//! Runs in every worker, on the main thread, before any other thread exists
//! (`unshare(CLONE_NEWUSER)` fails in a multi-threaded process). A worker needs none of
//! what these namespaces hide: image files and sockets arrive as descriptors, and a
//! descriptor keeps working across `unshare`. In particular a TCP listener the
//! supervisor bound stays in the supervisor's network namespace, so the NBD worker
//! still accepts on it from inside an empty one (checked by `check_workers.py`).
//!
//! Every namespace is optional: unprivileged user namespaces are forbidden on some
//! distributions (Ubuntu 24.04 AppArmor mediation, `kernel.unprivileged_userns_clone`),
//! and without one an unprivileged worker cannot create the others. What could not be
//! entered is reported as `unavailable:<layer>:<errno>`. No untrusted input.

use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::thread::UnshareFlags;

use crate::Report;

/// Where the empty tmpfs is mounted before it becomes the root. Any existing directory
/// works; the mount is private to the worker's mount namespace.
const EMPTY_ROOT_MOUNTPOINT: &str = "/tmp";

/// Enters the namespaces one at a time, so each is reported on its own.
pub(crate) fn enter(report: &mut Report) {
    // User namespace first: inside it we hold every capability (over it only), which is
    // what unprivileged workers need for the others. Capabilities are dropped after.
    unshare(report, "userns", UnshareFlags::NEWUSER);
    let mountns = unshare(report, "mountns", UnshareFlags::NEWNS);
    unshare(report, "ipcns", UnshareFlags::NEWIPC);
    unshare(report, "netns", UnshareFlags::NEWNET);
    if mountns {
        match empty_root() {
            Ok(()) => report.applied("empty-root"),
            Err((step, e)) => report.unavailable("empty-root", format!("{step}: {e}")),
        }
    } else {
        report.unavailable("empty-root", "no mount namespace");
    }
}

fn unshare(report: &mut Report, name: &str, flags: UnshareFlags) -> bool {
    // SAFETY: none of these flags is CLONE_FILES, the one that can make a descriptor
    // seen by another thread invalid here; and there is no other thread yet.
    match unsafe { rustix::thread::unshare_unsafe(flags) } {
        Ok(()) => {
            report.applied(name);
            true
        }
        Err(e) => {
            report.unavailable(name, e);
            false
        }
    }
}

/// Replaces the root with an empty, read-only tmpfs: no path resolves to anything,
/// whatever the filter or Landlock let through.
fn empty_root() -> Result<(), (&'static str, rustix::io::Errno)> {
    // Keep our mounts from propagating back into the supervisor's namespace (matters
    // when there is no user namespace and the mount namespace shares peers).
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .map_err(|e| ("make / private", e))?;
    rustix::mount::mount(
        "bulkhead-empty",
        EMPTY_ROOT_MOUNTPOINT,
        "tmpfs",
        MountFlags::NOSUID
            | MountFlags::NODEV
            | MountFlags::NOEXEC
            | MountFlags::RDONLY
            | MountFlags::NOATIME,
        c"size=4k,nr_inodes=2,mode=0555",
    )
    .map_err(|e| ("mount tmpfs", e))?;
    rustix::process::chdir(EMPTY_ROOT_MOUNTPOINT).map_err(|e| ("chdir", e))?;
    // pivot_root(".", ".") stacks the old root under the new one at "."; detaching "."
    // then removes the old root, leaving only the empty tmpfs.
    rustix::process::pivot_root(".", ".").map_err(|e| ("pivot_root", e))?;
    rustix::mount::unmount(".", UnmountFlags::DETACH).map_err(|e| ("detach old root", e))?;
    rustix::process::chdir("/").map_err(|e| ("chdir /", e))?;
    Ok(())
}
