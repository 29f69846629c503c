//! A minimal raw NBD client over a Unix socket: greeting, NBD_OPT_GO, and
//! READ/WRITE/FLUSH with simple replies, reporting the errno a server sends.
//!
//! Runs in the test process only. Everything the server sends is untrusted: every
//! length read from it is bounded, a short or odd reply is an error, never a panic.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// The fixed-newstyle greeting with NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES,
/// as qsd sends it.
pub const GREETING: &[u8; 18] = b"NBDMAGICIHAVEOPT\x00\x03";

const OPTION_MAGIC: &[u8; 8] = b"IHAVEOPT";
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Client flags: fixed newstyle and no zeroes.
const CLIENT_FLAGS: u32 = 3;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
/// Largest option reply payload accepted.
const MAX_OPTION_REPLY: usize = 64 << 10;

/// How a raw NBD exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The server answered the request with this NBD error code.
    #[error("error {0}")]
    Errno(u32),
    /// The socket failed or was closed.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// The server sent something a conforming server does not.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// One connection to an NBD server.
pub struct NbdPeer {
    stream: UnixStream,
    cookie: u64,
}

impl NbdPeer {
    /// Connects (retrying while the socket refuses, up to `patience`) without reading
    /// or sending anything: a client that never starts the handshake.
    pub fn connect(socket: &Path, patience: Duration) -> io::Result<NbdPeer> {
        let deadline = Instant::now() + patience;
        loop {
            match UnixStream::connect(socket) {
                Ok(stream) => {
                    return Ok(NbdPeer { stream, cookie: 0 });
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads the 18-byte greeting, waiting up to `timeout`.
    pub fn greeting(&mut self, timeout: Duration) -> Result<Vec<u8>, NbdError> {
        self.stream.set_read_timeout(Some(timeout))?;
        let mut buf = vec![0u8; 18];
        self.stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Connects, checks the greeting and selects `export` with NBD_OPT_GO (simple
    /// replies from then on).
    pub fn open(socket: &Path, export: &str, patience: Duration) -> Result<NbdPeer, NbdError> {
        let mut peer = NbdPeer::connect(socket, patience)?;
        let greeting = peer.greeting(patience)?;
        if greeting != GREETING {
            return Err(NbdError::Protocol(format!("greeting {greeting:02x?}")));
        }
        let mut go = Vec::new();
        go.extend_from_slice(&CLIENT_FLAGS.to_be_bytes());
        go.extend_from_slice(OPTION_MAGIC);
        go.extend_from_slice(&OPT_GO.to_be_bytes());
        let name = export.as_bytes();
        let len = u32::try_from(4 + name.len() + 2)
            .map_err(|_| NbdError::Protocol("export name too long".into()))?;
        go.extend_from_slice(&len.to_be_bytes());
        go.extend_from_slice(&(len - 6).to_be_bytes());
        go.extend_from_slice(name);
        go.extend_from_slice(&0u16.to_be_bytes());
        peer.stream.write_all(&go)?;
        loop {
            let header = peer.read_exact(20)?;
            if be64(&header[..8]) != OPTION_REPLY_MAGIC {
                return Err(NbdError::Protocol(format!("option reply {header:02x?}")));
            }
            let kind = be32(&header[12..16]);
            let length = be32(&header[16..20]) as usize;
            if length > MAX_OPTION_REPLY {
                return Err(NbdError::Protocol(format!("option reply length {length}")));
            }
            let payload = peer.read_exact(length)?;
            if kind == REP_ACK {
                return Ok(peer);
            }
            if kind & 0x8000_0000 != 0 {
                return Err(NbdError::Protocol(format!(
                    "NBD_OPT_GO refused: {kind:#x} {}",
                    String::from_utf8_lossy(&payload)
                )));
            }
        }
    }

    /// NBD_CMD_WRITE of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        let len =
            u32::try_from(data.len()).map_err(|_| NbdError::Protocol("write too large".into()))?;
        let mut msg = self.header(CMD_WRITE, offset, len);
        msg.extend_from_slice(data);
        self.exchange(&msg, 0).map(|_| ())
    }

    /// NBD_CMD_READ of `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        let msg = self.header(CMD_READ, offset, len);
        self.exchange(&msg, len as usize)
    }

    /// NBD_CMD_FLUSH.
    pub fn flush(&mut self) -> Result<(), NbdError> {
        let msg = self.header(CMD_FLUSH, 0, 0);
        self.exchange(&msg, 0).map(|_| ())
    }

    fn header(&mut self, command: u16, offset: u64, len: u32) -> Vec<u8> {
        self.cookie += 1;
        let mut out = REQUEST_MAGIC.to_be_bytes().to_vec();
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&command.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out
    }

    /// Sends one request and reads its simple reply (with `data` bytes on success).
    fn exchange(&mut self, request: &[u8], data: usize) -> Result<Vec<u8>, NbdError> {
        self.stream.write_all(request)?;
        let reply = self.read_exact(16)?;
        if be32(&reply[..4]) != SIMPLE_REPLY_MAGIC || reply[8..16] != request[8..16] {
            return Err(NbdError::Protocol(format!("reply header {reply:02x?}")));
        }
        match be32(&reply[4..8]) {
            0 => Ok(self.read_exact(data)?),
            errno => Err(NbdError::Errno(errno)),
        }
    }

    fn read_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        self.stream
            .set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut buf = vec![0u8; n];
        self.stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Waits up to `within` for the server to close the connection (reading and
    /// discarding what it sends); `true` if it did.
    pub fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut chunk = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stream.set_read_timeout(Some(left)).is_err() {
                return false;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return false;
                }
                Err(_) => return true,
            }
        }
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }
}

fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Raises this process's soft descriptor limit to at least `wanted` (and the hard
/// limit too when it is lower and we may: root). Returns the soft limit now in force.
pub fn raise_nofile(wanted: u64) -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let soft = now.current.unwrap_or(u64::MAX);
    if soft >= wanted {
        return soft;
    }
    let hard = now.maximum.unwrap_or(u64::MAX);
    let target = Rlimit {
        current: Some(wanted),
        maximum: Some(hard.max(wanted)),
    };
    if setrlimit(Resource::Nofile, target).is_ok() {
        return wanted;
    }
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: now.maximum,
        },
    );
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}
