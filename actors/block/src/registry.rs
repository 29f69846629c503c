//! The drivers bulkhead implements: one line each in [`drivers!`](registry), naming
//! the variant and the module's [`BlockDriver`] type. The macro derives everything
//! the rest of bulkhead dispatches on: [`DriverKind`] (which driver a node runs;
//! also the driver workers' kinds) and [`DriverConfig`] (a node's configuration as
//! the supervisor sends it), each with the dispatch to the driver's trait items.
//! Adding a driver means a line here, its module, and its seccomp policy
//! (`design/commands.md`).

use std::os::fd::OwnedFd;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{CommonOptions, ConfigError, DetectZeroes, Discard};
use crate::driver::{BlockDriver, ChildRole, Children, DriverInfo, ParseError, Parsed};
use crate::io::IoError;
use crate::{cbw, compress, cor, file, mirror, null, qcow2, raw, snapshot_access};

macro_rules! registry {
    ($($(#[$doc:meta])* $variant:ident => $driver:ty,)*) => {
        /// Which driver a node runs.
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        pub enum DriverKind {
            $($(#[$doc])* $variant,)*
        }

        /// A node's driver with that driver's configuration.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub enum DriverConfig {
            $($(#[$doc])* $variant(<$driver as BlockDriver>::Config),)*
        }

        impl DriverKind {
            /// Every driver, in registry order.
            pub const ALL: &'static [DriverKind] = &[$(DriverKind::$variant,)*];

            /// Facts about the driver.
            pub fn info(self) -> &'static DriverInfo {
                match self {
                    $(DriverKind::$variant => &<$driver as BlockDriver>::INFO,)*
                }
            }

            /// Parses the driver's own options (see [`BlockDriver::parse`]).
            pub fn parse(
                self,
                members: &Map<String, Value>,
            ) -> Result<Parsed<DriverConfig>, ParseError> {
                match self {
                    $(DriverKind::$variant => {
                        let p = <$driver as BlockDriver>::parse(members)?;
                        Ok(Parsed {
                            config: DriverConfig::$variant(p.config),
                            image: p.image,
                            strong: p.strong,
                        })
                    })*
                }
            }
        }

        impl DriverConfig {
            /// Which driver it configures.
            pub fn kind(&self) -> DriverKind {
                match self {
                    $(DriverConfig::$variant(_) => DriverKind::$variant,)*
                }
            }

            /// The generic node options.
            pub fn common(&self) -> &CommonOptions {
                match self {
                    $(DriverConfig::$variant(c) => <$driver as BlockDriver>::common(c),)*
                }
            }

            /// The generic node options, mutably.
            pub fn common_mut(&mut self) -> &mut CommonOptions {
                match self {
                    $(DriverConfig::$variant(c) => <$driver as BlockDriver>::common_mut(c),)*
                }
            }

            fn validate_driver(&self) -> Result<(), ConfigError> {
                match self {
                    $(DriverConfig::$variant(c) => <$driver as BlockDriver>::validate(c),)*
                }
            }

            /// See [`BlockDriver::check_children`].
            pub fn check_children(
                &self,
                children: &[(ChildRole, u64)],
            ) -> Result<(), crate::OpenError> {
                match self {
                    $(DriverConfig::$variant(c) =>
                        <$driver as BlockDriver>::check_children(c, children),)*
                }
            }

            /// See [`BlockDriver::check_child_drivers`].
            pub fn check_child_drivers(
                &self,
                children: &[(ChildRole, &str)],
            ) -> Result<(), crate::OpenError> {
                match self {
                    $(DriverConfig::$variant(c) =>
                        <$driver as BlockDriver>::check_child_drivers(c, children),)*
                }
            }

            /// See [`BlockDriver::holds_size`].
            pub fn holds_size(&self) -> bool {
                match self {
                    $(DriverConfig::$variant(c) => <$driver as BlockDriver>::holds_size(c),)*
                }
            }

            /// See [`BlockDriver::reopen`].
            pub fn reopen(
                &mut self,
                members: &Map<String, Value>,
            ) -> Result<Option<Map<String, Value>>, ParseError> {
                match self {
                    $(DriverConfig::$variant(c) =>
                        <$driver as BlockDriver>::reopen(c, members),)*
                }
            }

            /// See [`BlockDriver::resize_error`].
            pub fn resize_error(&self, err: &IoError) -> Option<String> {
                match self {
                    $(DriverConfig::$variant(c) =>
                        <$driver as BlockDriver>::resize_error(c, err),)*
                }
            }

            pub(crate) fn open_driver(
                &self,
                fd: Option<OwnedFd>,
                children: Children,
            ) -> crate::driver::OpenFuture {
                match self {
                    $(DriverConfig::$variant(c) => <$driver as BlockDriver>::open(c, fd, children),)*
                }
            }
        }
    };
}

registry! {
    /// `file`: a regular file.
    File => file::File,
    /// `host_device`: a block or character device.
    HostDevice => file::HostDevice,
    /// `raw`: a window over a child node.
    Raw => raw::Raw,
    /// `null-co`.
    NullCo => null::NullCo,
    /// `null-aio`.
    NullAio => null::NullAio,
    /// `qcow2`: the qcow2 format over a file child.
    Qcow2 => qcow2::Qcow2Format,
    /// `compress`: a filter whose writes its qcow2 child stores compressed.
    Compress => compress::Compress,
    /// `copy-before-write`: a filter that saves what writes overwrite to a target.
    CopyBeforeWrite => cbw::Cbw,
    /// `copy-on-read`: a filter a stream job copies through.
    CopyOnRead => cor::Cor,
    /// `mirror_top`: the filter a mirror job puts above its source (the
    /// supervisor's; not a `blockdev-add` driver).
    MirrorTop => mirror::MirrorTop,
    /// `snapshot-access`: reads the point in time a `copy-before-write` child keeps.
    SnapshotAccess => snapshot_access::SnapshotAccess,
}

impl DriverKind {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        self.info().name
    }

    /// The driver with QAPI name `name`, if bulkhead implements it.
    pub fn by_name(name: &str) -> Option<DriverKind> {
        DriverKind::ALL.iter().copied().find(|d| d.as_str() == name)
    }

    /// The image file kind, for the drivers on a path.
    pub fn image(self) -> Option<crate::file::FileKind> {
        self.info().image
    }

    /// Whether the driver sits on an image file the supervisor opens.
    pub fn is_posix(self) -> bool {
        self.info().is_posix()
    }

    /// Whether this is a protocol driver (the bottom of a chain).
    pub fn is_protocol(self) -> bool {
        self.info().protocol
    }

    /// Whether this is a filter (see [`crate::driver::DriverInfo::filter`]).
    pub fn is_filter(self) -> bool {
        self.info().filter
    }

    /// Its own options that a reopen applies.
    pub fn reopen_options(self) -> &'static [&'static str] {
        self.info().reopen_options
    }

    /// What `block_resize` does with it.
    pub fn resize(self) -> crate::driver::Resize {
        self.info().resize
    }
}

impl DriverConfig {
    /// The QAPI driver name (`drv` in query-named-block-nodes).
    pub fn driver_name(&self) -> &'static str {
        self.kind().as_str()
    }

    /// Checks the cross-field rules qsd applies when opening a node, in qsd's order
    /// (generic options first, then the driver's own).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let common = self.common();
        if common.detect_zeroes == DetectZeroes::Unmap && common.discard != Discard::Unmap {
            return Err(ConfigError::DetectZeroesUnmapNeedsDiscard);
        }
        if common.force_share && !common.read_only {
            return Err(ConfigError::ForceShareNeedsReadOnly);
        }
        self.validate_driver()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Aio, OnOffAuto};
    use crate::file::FileConfig;
    use crate::null::NullConfig;
    use crate::raw::RawConfig;

    #[test]
    fn names_are_unique_and_slots_are_sane() {
        for (i, d) in DriverKind::ALL.iter().enumerate() {
            let info = d.info();
            assert_eq!(DriverKind::by_name(info.name), Some(*d));
            assert!(
                DriverKind::ALL[..i].iter().all(|o| o.as_str() != info.name),
                "{} twice",
                info.name
            );
            // A protocol driver has no children; one on a path has no children either.
            if info.protocol || info.is_posix() {
                assert!(info.children.is_empty(), "{}", info.name);
            }
            for (j, s) in info.children.iter().enumerate() {
                assert!(info.children[..j].iter().all(|o| o.role != s.role));
            }
            assert!(!info.policy.is_empty());
        }
    }

    fn round_trip(config: DriverConfig) -> DriverConfig {
        let bytes = match bincode::serde::encode_to_vec(config, bincode::config::standard()) {
            Ok(b) => b,
            Err(e) => panic!("encode failed: {e}"),
        };
        match bincode::serde::decode_from_slice(&bytes, bincode::config::standard()) {
            Ok((c, used)) => {
                assert_eq!(used, bytes.len());
                c
            }
            Err(e) => panic!("decode failed: {e}"),
        }
    }

    #[test]
    fn every_driver_config_round_trips_through_bincode_serde() {
        let common = CommonOptions {
            read_only: true,
            detect_zeroes: DetectZeroes::Unmap,
            discard: Discard::Unmap,
            no_flush: true,
            force_share: true,
            inactive: true,
            direct: true,
        };
        let configs = [
            DriverConfig::File(FileConfig {
                common,
                aio: Aio::IoUring,
                locking: OnOffAuto::Off,
            }),
            DriverConfig::HostDevice(FileConfig::default()),
            DriverConfig::Raw(RawConfig {
                common,
                offset: 4096,
                size: Some(65536),
            }),
            DriverConfig::Raw(RawConfig::default()),
            DriverConfig::NullCo(NullConfig {
                common,
                size: 1,
                read_zeroes: true,
                latency_ns: 7,
            }),
            DriverConfig::NullAio(NullConfig::default()),
        ];
        for config in configs {
            assert_eq!(round_trip(config.clone()), config);
        }
    }

    #[test]
    fn defaults_are_qsd_defaults() {
        let null = NullConfig::default();
        assert_eq!(null.size, 1_073_741_824);
        assert!(!null.read_zeroes);
        assert_eq!(null.latency_ns, 0);
        let file = FileConfig::default();
        assert_eq!(file.aio, Aio::Threads);
        assert_eq!(file.locking, OnOffAuto::Auto);
        assert_eq!(file.common.discard, Discard::Ignore);
        assert_eq!(file.common.detect_zeroes, DetectZeroes::Off);
    }

    #[test]
    fn validate_reports_qsd_texts() {
        let mut file = FileConfig::default();
        file.common.detect_zeroes = DetectZeroes::Unmap;
        assert_eq!(
            DriverConfig::File(file).validate().map_err(|e| e.to_string()),
            Err("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap".to_string())
        );
        file.common.discard = Discard::Unmap;
        assert_eq!(DriverConfig::File(file).validate(), Ok(()));
        file.aio = Aio::Native;
        assert_eq!(
            DriverConfig::File(file).validate().map_err(|e| e.to_string()),
            Err("aio=native was specified, but it requires cache.direct=on, which was not specified.".to_string())
        );
        file.common.direct = true;
        assert_eq!(DriverConfig::File(file).validate(), Ok(()));
        let mut null = NullConfig::default();
        null.common.force_share = true;
        assert_eq!(
            DriverConfig::NullCo(null)
                .validate()
                .map_err(|e| e.to_string()),
            Err("force-share=on can only be used with read-only images".to_string())
        );
    }
}
