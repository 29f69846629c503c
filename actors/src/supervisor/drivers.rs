//! The block drivers bulkhead implements: one registry line each, with everything the
//! supervisor decides by driver (its worker kind, whether it sits on an image file,
//! what its reopen applies, how `block_resize` goes through it). See
//! `design/commands.md` for the other files a new driver touches.
//!
//! Runs in the supervisor.

use bulkhead_block::file::FileKind;
use bulkhead_ipc::wire::WorkerKind;
use bulkhead_qmp::qapi::types::BlockdevDriver;

/// A node driver bulkhead implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// `file`.
    File,
    /// `host_device`.
    HostDevice,
    /// `raw`.
    Raw,
    /// `null-co`.
    NullCo,
    /// `null-aio`.
    NullAio,
}

/// How `block_resize` treats a node of the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// The node is the image: its worker resizes it.
    Image,
    /// A window over its `file` child: the resize goes to the child, plus the
    /// window's offset (unless the window has a fixed size).
    Window,
    /// The driver cannot resize.
    Unsupported,
}

/// One registry line.
#[derive(Debug)]
pub struct DriverInfo {
    /// The driver.
    pub driver: Driver,
    /// Its `BlockdevDriver` value (its QAPI name).
    pub qapi: BlockdevDriver,
    /// The QAPI name, as `query-named-block-nodes` shows it.
    pub name: &'static str,
    /// The worker kind serving its nodes under `--isolation kind`, which is also the
    /// seccomp policy that process applies (`bulkhead_sandbox::policy::table`).
    pub worker: WorkerKind,
    /// The image file the supervisor opens for it (protocol drivers on a path).
    pub image: Option<FileKind>,
    /// A protocol driver: the bottom of a chain, with no child.
    pub protocol: bool,
    /// Its own options that its reopen applies (the rest must stay as they are).
    pub reopen_options: &'static [&'static str],
    /// What `block_resize` does with it.
    pub resize: Resize,
}

/// Every driver bulkhead implements.
pub static DRIVERS: &[DriverInfo] = &[
    DriverInfo {
        driver: Driver::File,
        qapi: BlockdevDriver::File,
        name: "file",
        worker: WorkerKind::File,
        image: Some(FileKind::File),
        protocol: true,
        reopen_options: &[],
        resize: Resize::Image,
    },
    DriverInfo {
        driver: Driver::HostDevice,
        qapi: BlockdevDriver::HostDevice,
        name: "host_device",
        worker: WorkerKind::HostDevice,
        image: Some(FileKind::HostDevice),
        protocol: true,
        reopen_options: &[],
        resize: Resize::Image,
    },
    DriverInfo {
        driver: Driver::Raw,
        qapi: BlockdevDriver::Raw,
        name: "raw",
        worker: WorkerKind::Raw,
        image: None,
        protocol: false,
        reopen_options: &["offset", "size", "file"],
        resize: Resize::Window,
    },
    DriverInfo {
        driver: Driver::NullCo,
        qapi: BlockdevDriver::NullCo,
        name: "null-co",
        worker: WorkerKind::NullCo,
        image: None,
        protocol: true,
        reopen_options: &[],
        resize: Resize::Unsupported,
    },
    DriverInfo {
        driver: Driver::NullAio,
        qapi: BlockdevDriver::NullAio,
        name: "null-aio",
        worker: WorkerKind::NullAio,
        image: None,
        protocol: true,
        reopen_options: &[],
        resize: Resize::Unsupported,
    },
];

impl Driver {
    /// Its registry line.
    pub fn info(self) -> &'static DriverInfo {
        // Every variant has a line (checked by a test); the first line is never used.
        DRIVERS
            .iter()
            .find(|d| d.driver == self)
            .unwrap_or(&DRIVERS[0])
    }

    /// The driver bulkhead implements for a `BlockdevDriver`, if any.
    pub fn from_qapi(qapi: BlockdevDriver) -> Option<Driver> {
        DRIVERS.iter().find(|d| d.qapi == qapi).map(|d| d.driver)
    }

    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        self.info().name
    }

    /// The worker kind serving a standalone node of this driver under the `kind`
    /// isolation policy.
    pub fn worker(self) -> WorkerKind {
        self.info().worker
    }

    /// The image file kind, for the protocol drivers on a path.
    pub fn image(self) -> Option<FileKind> {
        self.info().image
    }

    /// Whether this is a protocol driver sitting on an image file.
    pub fn is_posix(self) -> bool {
        self.image().is_some()
    }

    /// Whether this is a protocol driver (the bottom of a chain, with no child).
    pub fn is_protocol(self) -> bool {
        self.info().protocol
    }

    /// Its own options that a reopen applies.
    pub fn reopen_options(self) -> &'static [&'static str] {
        self.info().reopen_options
    }

    /// What `block_resize` does with it.
    pub fn resize(self) -> Resize {
        self.info().resize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_driver_has_one_line_with_its_qapi_name() {
        for d in [
            Driver::File,
            Driver::HostDevice,
            Driver::Raw,
            Driver::NullCo,
            Driver::NullAio,
        ] {
            let lines: Vec<_> = DRIVERS.iter().filter(|l| l.driver == d).collect();
            assert_eq!(lines.len(), 1, "{d:?}");
            let info = d.info();
            assert_eq!(
                serde_json::to_value(info.qapi).ok(),
                Some(serde_json::Value::from(info.name))
            );
            assert_eq!(Driver::from_qapi(info.qapi), Some(d));
            // Worker kinds are named after the driver they serve.
            assert_eq!(info.worker.as_str(), info.name);
        }
    }
}
