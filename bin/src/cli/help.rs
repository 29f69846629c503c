//! `--help` and `--version`: qsd's texts with bulkhead's name and options.

use super::*;

/// qsd's `--help` text, adapted: bulkhead's name, the `--sandbox` option, no QEMU
/// bug-report footer. (The `bitmap=` in the NBD line is qsd's own wording; 10.0.2
/// actually wants `bitmaps.0=`.)
pub fn help_text() -> String {
    format!(
        "Usage: {PROGRAM} [options]
QEMU storage daemon (bulkhead, compatible with qemu-storage-daemon {QSD_COMPATIBLE_VERSION})

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         specify tracing options
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend

  --chardev <options>    configure a character device backend
                         (see the qemu(1) man page for possible options)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --export [type=]fuse,id=<id>,node-name=<node-name>,mountpoint=<file>
           [,growable=on|off][,writable=on|off][,allow-other=on|off|auto]
                         export the specified block node over FUSE

  --export [type=]vhost-user-blk,id=<id>,node-name=<node-name>,
           addr.type=unix,addr.path=<socket-path>[,writable=on|off]
           [,logical-block-size=<block-size>][,num-queues=<num-queues>]
                         export the specified block node as a
                         vhost-user-blk device over UNIX domain socket
  --export [type=]vhost-user-blk,id=<id>,node-name=<node-name>,
           addr.type=fd,addr.str=<fd>[,writable=on|off]
           [,logical-block-size=<block-size>][,num-queues=<num-queues>]
                         export the specified block node as a
                         vhost-user-blk device over file descriptor

  --export [type=]vduse-blk,id=<id>,node-name=<node-name>
           ,name=<vduse-name>[,writable=on|off]
           [,num-queues=<num-queues>][,queue-size=<queue-size>]
           [,logical-block-size=<logical-block-size>]
           [,serial=<serial-number>]
                         export the specified block node as a
                         vduse-blk device

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes

  --object help          list object types that can be added
  --object <type>,help   list properties for the given object type
  --object <type>[,<property>=<value>...]
                         create a new object of type <type>, setting
                         properties in the order they are specified. Note
                         that the 'id' property must be set.
                         See the qemu(1) man page for documentation of the
                         objects that can be added.

  --pidfile <path>       write process ID to a file after startup

  --sandbox on|off       run block drivers and exports in sandboxed,
                         restartable worker processes (default: on)

  --isolation kind|image how nodes are spread over worker processes:
                         kind: one worker per block driver and one per
                         export type (default); image: one worker per
                         image (a top node and the nodes only it uses),
                         so a compromised worker reaches only its image
"
    )
}

/// `--version`'s text: bulkhead's version and the qsd it is compatible with.
pub fn version_text() -> String {
    format!(
        "{PROGRAM} version {}\nCompatible with qemu-storage-daemon version {QSD_COMPATIBLE_VERSION} (command line and QMP)\n",
        env!("CARGO_PKG_VERSION")
    )
}
