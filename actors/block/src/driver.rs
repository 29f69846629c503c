//! What a block driver is: the one trait every driver module implements
//! ([`BlockDriver`]), and the facts about a driver that the supervisor, the workers
//! and the sandbox decide by ([`DriverInfo`]).
//!
//! A driver module (`file.rs`, `raw.rs`, `null.rs`, ...) holds everything about its
//! driver: its QAPI options and how they become its wire configuration (run by the
//! supervisor, which alone sees paths), that configuration, and the code that serves a
//! node of it (run by a driver worker). The registry ([`crate::registry`]) lists the
//! modules; nothing else in bulkhead names a driver, except code that looks inside one
//! on purpose (the supervisor's mapped I/O reads a raw window's offset).

use std::fmt;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{CommonOptions, ConfigError, OnOffAuto};
use crate::file::FileKind;
use crate::io::BlockIo;
use crate::node::Capabilities;

/// The role a child plays under its parent. One worker message carries every child
/// of a node by role; the graph (parent counts, replay order, cycle checks, restart
/// dependencies) follows every role alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChildRole {
    /// A format or filter node's protocol child.
    File,
    /// A format node's backing image.
    Backing,
    /// A format node's external data file (qcow2's `data-file`).
    DataFile,
    /// A numbered child (quorum's `children.N`).
    Child(u32),
    /// Where a filter keeps what it saves (copy-before-write's `target`).
    Target,
}

impl ChildRole {
    /// The child name QEMU shows (`x-debug-query-block-graph` edges, options).
    pub fn name(self) -> std::borrow::Cow<'static, str> {
        match self {
            ChildRole::File => "file".into(),
            ChildRole::Backing => "backing".into(),
            ChildRole::DataFile => "data-file".into(),
            ChildRole::Child(n) => format!("children.{n}").into(),
            ChildRole::Target => "target".into(),
        }
    }
}

impl fmt::Display for ChildRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// A child a driver takes: the `BlockdevOptions` member naming it and its role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildSlot {
    /// The member (`file`, `backing`, `data-file`).
    pub key: &'static str,
    /// The role the child plays.
    pub role: ChildRole,
    /// Whether a node cannot open without it.
    pub required: bool,
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

/// Facts about a driver, one constant per driver module.
#[derive(Debug)]
pub struct DriverInfo {
    /// The QAPI name (`BlockdevDriver`), as queries show it. A driver worker of the
    /// `kind` isolation policy is named after it too.
    pub name: &'static str,
    /// The image file the supervisor opens for it (protocol drivers on a path), and
    /// hands the worker as a descriptor.
    pub image: Option<FileKind>,
    /// A protocol driver: the bottom of a chain. Its nodes may move into the worker
    /// of the format node above them.
    pub protocol: bool,
    /// The children it takes.
    pub children: &'static [ChildSlot],
    /// Its own options that its reopen applies (the rest must stay as they are).
    pub reopen_options: &'static [&'static str],
    /// What `block_resize` does with it.
    pub resize: Resize,
    /// The requests it serves natively (the generic layer emulates or refuses the
    /// rest).
    pub caps: Capabilities,
    /// The seccomp policy its code needs (`bulkhead_sandbox::policy::POLICIES`).
    pub policy: &'static str,
    /// Its code blocks on its children's I/O (a format engine), so its worker starts
    /// format threads for it (`crate::threads::start_format_threads`).
    pub format_threads: bool,
    /// A filter (QEMU's `is_filter`): its `filename` never takes its child's plain
    /// name, and its image facts (cluster size) are its child's.
    pub filter: bool,
    /// Its `file` child may be a protocol node, which then lives in its worker (so
    /// that worker does file I/O). False where `check_child_drivers` refuses one.
    pub protocol_child: bool,
}

impl DriverInfo {
    /// Whether the driver sits on an image file the supervisor opens.
    pub fn is_posix(&self) -> bool {
        self.image.is_some()
    }
}

/// An image file a node's driver needs, as the supervisor opens it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// The path (the supervisor's only: workers never see it).
    pub filename: String,
    /// `locking`, which the supervisor applies with the image's lock bytes.
    pub locking: OnOffAuto,
}

/// One node's driver options, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed<C> {
    /// The configuration its worker gets.
    pub config: C,
    /// The image file to open, for a driver on a path.
    pub image: Option<ImageSpec>,
    /// The options QEMU reports as given (its "strong" options, which show in
    /// `json:{...}` filenames).
    pub strong: Map<String, Value>,
}

/// Why a driver's own options cannot be used (texts are qsd's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A size that QEMU parses as unsigned was negative (`blockdev-add`).
    #[error("Value '{value}' is out of range for parameter '{parameter}'")]
    OutOfRange {
        /// The value given.
        value: i64,
        /// The member.
        parameter: &'static str,
    },
    /// The same, where `blockdev-reopen` answers with a type error.
    #[error("Invalid parameter type for '{0}', expected: integer")]
    ExpectedInteger(&'static str),
    /// A combination of values the driver refuses (the text is qsd's).
    #[error("{0}")]
    Refused(&'static str),
    /// Options the QAPI visitor accepted but the driver's struct refused: a bulkhead
    /// bug, never a panic.
    #[error("internal error: options the schema accepts were refused ({0})")]
    Decode(String),
}

/// Decodes a driver's options from the members the visitor checked.
pub fn decode<T: DeserializeOwned>(members: &Map<String, Value>) -> Result<T, ParseError> {
    serde_json::from_value(Value::Object(members.clone()))
        .map_err(|e| ParseError::Decode(e.to_string()))
}

/// A size member that must not be negative, for `blockdev-add` (see
/// [`ParseError::OutOfRange`]).
pub fn size_option(value: Option<i64>, parameter: &'static str) -> Result<Option<u64>, ParseError> {
    value
        .map(|n| {
            u64::try_from(n).map_err(|_| ParseError::OutOfRange {
                value: n,
                parameter,
            })
        })
        .transpose()
}

/// The future of [`BlockDriver::open`].
pub type OpenFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Arc<dyn BlockIo>, crate::OpenError>> + Send>,
>;

/// An [`OpenFuture`] that is already done (drivers that open without I/O).
pub fn opened(result: Result<Arc<dyn BlockIo>, crate::OpenError>) -> OpenFuture {
    Box::pin(std::future::ready(result))
}

/// A node's children as its worker reached them, by role, and where its driver
/// reports what it finds wrong in its image.
#[derive(Default)]
pub struct Children {
    children: Vec<(ChildRole, Arc<dyn BlockIo>)>,
    events: Option<Arc<dyn crate::stats::ImageEvents>>,
}

impl Children {
    /// The children, by role.
    pub fn new(children: Vec<(ChildRole, Arc<dyn BlockIo>)>) -> Children {
        Children {
            children,
            events: None,
        }
    }

    /// With `events` as the corruption sink.
    pub fn with_events(mut self, events: Option<Arc<dyn crate::stats::ImageEvents>>) -> Children {
        self.events = events;
        self
    }

    /// Takes the child playing `role`.
    pub fn take(&mut self, role: ChildRole) -> Option<Arc<dyn BlockIo>> {
        let at = self.children.iter().position(|(r, _)| *r == role)?;
        Some(self.children.swap_remove(at).1)
    }

    /// Where corruption found in the image goes.
    pub fn events(&self) -> Option<Arc<dyn crate::stats::ImageEvents>> {
        self.events.clone()
    }
}

/// Checks a node's child roles against its driver's slots: every role taken, none
/// twice, every required one present. Worker side: the roles come from the
/// supervisor, which the check keeps honest.
pub fn check_roles(info: &DriverInfo, roles: &[ChildRole]) -> Result<(), RoleError> {
    for (i, role) in roles.iter().enumerate() {
        if !info.children.iter().any(|s| s.role == *role) {
            return Err(RoleError::NotTaken {
                driver: info.name,
                role: *role,
            });
        }
        if roles[..i].contains(role) {
            return Err(RoleError::Twice(*role));
        }
    }
    match info
        .children
        .iter()
        .find(|s| s.required && !roles.contains(&s.role))
    {
        Some(s) => Err(RoleError::Missing {
            driver: info.name,
            role: s.role,
        }),
        None => Ok(()),
    }
}

/// A node's children do not match its driver's slots.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    /// A role the driver takes no child for.
    #[error("the {driver} driver takes no {role} child")]
    NotTaken {
        /// The driver.
        driver: &'static str,
        /// The role.
        role: ChildRole,
    },
    /// Two children in one role.
    #[error("two {0} children")]
    Twice(ChildRole),
    /// A required child is missing.
    #[error("the {driver} driver needs a {role} child")]
    Missing {
        /// The driver.
        driver: &'static str,
        /// The role.
        role: ChildRole,
    },
}

/// A block driver. Implemented by a marker type in the driver's module and listed in
/// [`crate::registry`].
pub trait BlockDriver {
    /// What a worker needs to run one node: options minus paths, plus the generic
    /// ones. Travels in worker messages (bincode's serde mode: plain structs and
    /// externally tagged enums only).
    type Config: fmt::Debug + Clone + PartialEq + Serialize + DeserializeOwned;

    /// Facts about the driver.
    const INFO: DriverInfo;

    /// Supervisor: the driver's own `BlockdevOptions` members (checked by the QAPI
    /// visitor; without the generic members and the children) to its configuration,
    /// with default generic options (the supervisor sets them once it knows what the
    /// node inherits).
    fn parse(members: &Map<String, Value>) -> Result<Parsed<Self::Config>, ParseError>;

    /// The generic options inside a configuration.
    fn common(config: &Self::Config) -> &CommonOptions;

    /// The same, mutably (a reopen changes them in place).
    fn common_mut(config: &mut Self::Config) -> &mut CommonOptions;

    /// The driver's own cross-field rules, checked after the generic ones.
    fn validate(_config: &Self::Config) -> Result<(), ConfigError> {
        Ok(())
    }

    /// Supervisor, before a worker opens the node: the checks QEMU makes against the
    /// children's sizes (raw's window), in QEMU's order.
    fn check_children(
        _config: &Self::Config,
        _children: &[(ChildRole, u64)],
    ) -> Result<(), crate::OpenError> {
        Ok(())
    }

    /// Supervisor, before a worker opens the node: the checks QEMU makes against the
    /// children's drivers (`compress` needs a format that compresses).
    fn check_child_drivers(
        _config: &Self::Config,
        _children: &[(ChildRole, &str)],
    ) -> Result<(), crate::OpenError> {
        Ok(())
    }

    /// Whether a node refuses to share `resize` of the image below it (a fixed raw
    /// window).
    fn holds_size(_config: &Self::Config) -> bool {
        false
    }

    /// Supervisor, `blockdev-reopen`: applies the driver's own reopen options
    /// ([`DriverInfo::reopen_options`]) from the new members; returns the new strong
    /// options, or `None` when they stay.
    fn reopen(
        _config: &mut Self::Config,
        _members: &Map<String, Value>,
    ) -> Result<Option<Map<String, Value>>, ParseError> {
        Ok(None)
    }

    /// The QMP error text of a failed `block_resize`, where the driver has its own
    /// (the generic texts are [`crate::node::resize_error_text`]'s).
    fn resize_error(_config: &Self::Config, _err: &crate::io::IoError) -> Option<String> {
        None
    }

    /// Worker: the node's implementation, on its image descriptor (drivers with an
    /// [`DriverInfo::image`]) and over its children. Runs on the worker's executor: a
    /// driver that must read its image to open (a format's header) does that reading
    /// off it, on its I/O threads.
    fn open(config: &Self::Config, fd: Option<OwnedFd>, children: Children) -> OpenFuture;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::DriverKind;

    #[test]
    fn roles_are_checked_against_the_drivers_slots() {
        let raw = DriverKind::Raw.info();
        assert_eq!(check_roles(raw, &[ChildRole::File]), Ok(()));
        assert_eq!(
            check_roles(raw, &[]).map_err(|e| e.to_string()),
            Err("the raw driver needs a file child".to_string())
        );
        for role in [ChildRole::Backing, ChildRole::DataFile, ChildRole::Child(0)] {
            assert_eq!(
                check_roles(raw, &[ChildRole::File, role]).map_err(|e| e.to_string()),
                Err(format!("the raw driver takes no {role} child"))
            );
        }
        assert_eq!(
            check_roles(raw, &[ChildRole::File, ChildRole::File]),
            Err(RoleError::Twice(ChildRole::File))
        );
        let file = DriverKind::File.info();
        assert!(check_roles(file, &[ChildRole::File]).is_err());
        assert_eq!(check_roles(file, &[]), Ok(()));
    }
}
