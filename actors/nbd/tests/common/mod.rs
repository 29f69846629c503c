//! Shared test fixtures: a file-backed `BlockIo` with real block status
//! (SEEK_DATA/SEEK_HOLE), a server harness on a Unix socket in a temporary
//! directory, a qemu-storage-daemon harness for comparisons, external tool
//! runners and a tiny raw NBD client for malformed-peer cases.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_block::{BlockIo, Extent, IoError, IoFuture, WriteFlags, ZeroFlags};
use bulkhead_nbd::{DirtyRuns, ExportBitmap, ExportConfig, NbdServer, ServerConfig};

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let out = Command::new("mktemp")
            .arg("-d")
            .output()
            .expect("mktemp -d failed");
        let p = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        TempDir(PathBuf::from(p))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A raw image file exported through positional I/O, with block status from
/// SEEK_DATA/SEEK_HOLE (every byte allocated at depth 1, like qsd's file node).
pub struct FileBackend {
    file: File,
    read_only: bool,
}

impl FileBackend {
    pub fn open(path: &Path, read_only: bool) -> Arc<FileBackend> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .expect("open image");
        Arc::new(FileBackend { file, read_only })
    }

    fn seek(&self, offset: u64, whence: i32) -> Option<u64> {
        // SAFETY: lseek on a descriptor we own; positional I/O ignores the offset.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as i64, whence) };
        if r < 0 { None } else { Some(r as u64) }
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> Result<(), IoError> {
        // SAFETY: fallocate on a descriptor we own.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) };
        if r < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }
}

impl BlockIo for FileBackend {
    fn size(&self) -> u64 {
        self.file.metadata().map(|m| m.len()).unwrap_or(0)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move { Ok(self.file.read_exact_at(buf, offset)?) })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.file.write_all_at(buf, offset)?;
            if flags.fua {
                self.file.sync_data()?;
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let mode = if flags.may_unmap {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            self.fallocate(mode, offset, len)?;
            if flags.fua {
                self.file.sync_data()?;
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { Ok(self.file.sync_data()?) })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            let end = offset + len;
            let data = self.seek(offset, libc::SEEK_DATA).unwrap_or(u64::MAX);
            let (length, is_data) = if data > offset {
                (data.min(end) - offset, false)
            } else {
                let hole = self.seek(offset, libc::SEEK_HOLE).unwrap_or(end);
                (hole.min(end) - offset, true)
            };
            Ok(vec![Extent {
                length: length.max(1).min(len),
                data: is_data,
                zero: !is_data,
                depth: 1,
            }])
        })
    }
}

/// Our server on a Unix socket, on its own runtime.
pub struct Server {
    pub rt: tokio::runtime::Runtime,
    pub server: NbdServer,
    pub dir: TempDir,
    pub sock: PathBuf,
}

impl Server {
    pub fn start(config: ServerConfig) -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = TempDir::new();
        let sock = dir.path("ours.sock");
        let server = NbdServer::new(config);
        let listener = {
            let _g = rt.enter();
            tokio::net::UnixListener::bind(&sock).unwrap()
        };
        let s = server.clone();
        rt.spawn(async move { s.serve_unix_listener(listener).await });
        Server {
            rt,
            server,
            dir,
            sock,
        }
    }

    pub fn export(
        &self,
        name: &str,
        image: &Path,
        writable: bool,
        description: Option<&str>,
        depth: bool,
    ) {
        self.server
            .add_export(
                ExportConfig {
                    name: name.to_owned(),
                    description: description.map(str::to_owned),
                    writable,
                    allocation_depth: depth,
                    bitmaps: Vec::new(),
                },
                FileBackend::open(image, !writable),
            )
            .unwrap();
    }

    /// Exports `image` writable with dirty bitmaps.
    pub fn export_bitmaps(
        &self,
        name: &str,
        image: &Path,
        depth: bool,
        bitmaps: Vec<ExportBitmap>,
    ) {
        self.server
            .add_export(
                ExportConfig {
                    name: name.to_owned(),
                    description: None,
                    writable: true,
                    allocation_depth: depth,
                    bitmaps,
                },
                FileBackend::open(image, false),
            )
            .unwrap();
    }

    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }
}

/// A dirty bitmap of `size` bytes with fixed dirty ranges `[start, end)` (sorted,
/// disjoint).
pub struct Runs {
    pub size: u64,
    pub dirty: Vec<(u64, u64)>,
}

impl Runs {
    pub fn bitmap(name: &str, size: u64, dirty: &[(u64, u64)]) -> ExportBitmap {
        ExportBitmap {
            name: name.to_owned(),
            source: Arc::new(Runs {
                size,
                dirty: dirty.to_vec(),
            }),
        }
    }
}

impl DirtyRuns for Runs {
    fn runs(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let end = (offset + len).min(self.size);
        let mut out = Vec::new();
        let mut pos = offset;
        for &(a, b) in &self.dirty {
            let (a, b) = (a.max(pos), b.min(end));
            if a >= b {
                continue;
            }
            if a > pos {
                out.push((a - pos, false));
            }
            out.push((b - a, true));
            pos = b;
        }
        if pos < end {
            out.push((end - pos, false));
        }
        out
    }
}

/// A qemu-storage-daemon serving one file export; killed on drop.
pub struct Qsd {
    child: Child,
    pub sock: PathBuf,
}

impl Qsd {
    /// `export_opts` is appended to `type=nbd,id=e,node-name=f,`.
    pub fn start(dir: &TempDir, image: &Path, export_opts: &str, server_opts: &str) -> Qsd {
        let file = format!("driver=file,node-name=f,filename={}", image.display());
        Qsd::start_nodes(dir, &[file], "f", export_opts, server_opts)
    }

    /// A qsd with these `--blockdev`s exporting `node`; `export_opts` is appended
    /// to `type=nbd,id=e,node-name=NODE,`.
    pub fn start_nodes(
        dir: &TempDir,
        blockdevs: &[String],
        node: &str,
        export_opts: &str,
        server_opts: &str,
    ) -> Qsd {
        let sock = dir.path("qsd.sock");
        let _ = std::fs::remove_file(&sock);
        let mut nbd = format!("addr.type=unix,addr.path={}", sock.display());
        if !server_opts.is_empty() {
            nbd.push(',');
            nbd.push_str(server_opts);
        }
        let mut cmd = Command::new("qemu-storage-daemon");
        for b in blockdevs {
            cmd.arg("--blockdev").arg(b);
        }
        let child = cmd
            .arg("--nbd-server")
            .arg(nbd)
            .arg("--export")
            .arg(format!("type=nbd,id=e,node-name={node},{export_opts}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon must be installed (the oracle for these tests)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "qsd did not create its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Qsd { child, sock }
    }

    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a tool and returns its stdout; panics with a clear message if the tool
/// is missing or fails.
pub fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is required for this test (CI installs it): {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Creates a sparse image of `size` bytes with data written by qemu-io commands.
pub fn make_image(path: &Path, size: u64, qemu_io_cmds: &[&str]) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    for c in qemu_io_cmds {
        run("qemu-io", &["-f", "raw", "-c", c, path.to_str().unwrap()]);
    }
}

// ---- tiny raw client ----

pub const OPTS_MAGIC: u64 = 0x4948_4156_454F_5054;

pub struct Raw {
    pub s: UnixStream,
}

impl Raw {
    /// Connects and reads the 18-byte greeting.
    pub fn connect(sock: &Path) -> Raw {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw { s };
        let g = r.read_n(18).expect("greeting");
        assert_eq!(&g[..8], b"NBDMAGIC");
        r
    }

    /// Connects, sends fixed-newstyle flags.
    pub fn fixed(sock: &Path) -> Raw {
        let mut r = Raw::connect(sock);
        r.send(&3u32.to_be_bytes());
        r
    }

    pub fn send(&mut self, b: &[u8]) {
        let _ = self.s.write_all(b);
    }

    pub fn read_n(&mut self, n: usize) -> Option<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).ok()?;
        Some(b)
    }

    /// True if the server closed the connection (EOF or reset).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }

    pub fn opt(&mut self, opt: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
    }

    /// Reads option replies up to the final one; each is (type, data).
    pub fn replies(&mut self) -> Option<Vec<(u32, Vec<u8>)>> {
        let mut out = Vec::new();
        loop {
            let h = self.read_n(20)?;
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let d = self.read_n(len as usize)?;
            out.push((kind, d));
            if kind == 1 || kind & 0x8000_0000 != 0 {
                return Some(out);
            }
        }
    }

    /// Negotiates structured replies (optionally extended headers) and GO.
    pub fn go(sock: &Path, name: &str, structured: bool, extended: bool, contexts: &[&str]) -> Raw {
        let mut r = Raw::fixed(sock);
        if extended {
            r.opt(11, &[]);
            r.replies().unwrap();
        } else if structured {
            r.opt(8, &[]);
            r.replies().unwrap();
        }
        if !contexts.is_empty() {
            let mut d = name_bytes(name);
            d.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for c in contexts {
                d.extend_from_slice(&name_bytes(c));
            }
            r.opt(10, &d);
            r.replies().unwrap();
        }
        let mut d = name_bytes(name);
        d.extend_from_slice(&0u16.to_be_bytes());
        r.opt(7, &d);
        let reps = r.replies().unwrap();
        assert_eq!(reps.last().unwrap().0, 1, "GO failed: {reps:?}");
        r
    }

    /// Sends a compact request header.
    pub fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
        let mut m = Vec::new();
        m.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        self.send(&m);
    }

    /// Sends an extended request header.
    pub fn request_ext(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u64) {
        let mut m = Vec::new();
        m.extend_from_slice(&0x21e4_1c71u32.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        self.send(&m);
    }

    /// Reads a simple reply: (error, cookie).
    pub fn simple(&mut self) -> Option<(u32, u64)> {
        let h = self.read_n(16)?;
        assert_eq!(&h[0..4], &0x6744_6698u32.to_be_bytes());
        Some((
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        ))
    }

    /// Reads one structured chunk: (flags, type, cookie, payload). A simple
    /// reply (which qsd sends for successful non-read commands even with
    /// structured replies) comes back as flags 1, type 0xffff, payload = error.
    pub fn chunk(&mut self) -> Option<(u16, u16, u64, Vec<u8>)> {
        let m = self.read_n(4)?;
        if m == 0x6744_6698u32.to_be_bytes() {
            let rest = self.read_n(12)?;
            let cookie = u64::from_be_bytes(rest[4..12].try_into().unwrap());
            return Some((1, 0xffff, cookie, rest[0..4].to_vec()));
        }
        assert_eq!(m, 0x668e_33efu32.to_be_bytes());
        let mut h = m;
        h.extend(self.read_n(16)?);
        let flags = u16::from_be_bytes(h[4..6].try_into().unwrap());
        let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let d = self.read_n(len as usize)?;
        Some((flags, kind, cookie, d))
    }

    /// Reads one extended chunk: (flags, type, cookie, offset, payload).
    pub fn chunk_ext(&mut self) -> Option<(u16, u16, u64, u64, Vec<u8>)> {
        let h = self.read_n(32)?;
        assert_eq!(&h[0..4], &0x6e8a_278cu32.to_be_bytes());
        let flags = u16::from_be_bytes(h[4..6].try_into().unwrap());
        let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let offset = u64::from_be_bytes(h[16..24].try_into().unwrap());
        let len = u64::from_be_bytes(h[24..32].try_into().unwrap());
        let d = self.read_n(len as usize)?;
        Some((flags, kind, cookie, offset, d))
    }
}

pub fn name_bytes(n: &str) -> Vec<u8> {
    let mut d = (n.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(n.as_bytes());
    d
}
