#!/usr/bin/env python3
"""End-to-end check of the worker sandbox.

Starts the real `bulkhead` supervisor with file, raw, null-co, null-aio and (as root,
on a loop device) host_device nodes and NBD exports, drives real traffic through them
(qemu-io, qemu-img, nbdinfo, 64 parallel clients, misbehaving raw NBD clients,
block_resize), including error paths, and then:

- checks every worker's /proc/PID/status and every thread's: `Seccomp: 2`,
  `NoNewPrivs: 1`, all capability sets 0, and (unless --allow-degraded) its own user,
  mount, IPC and network namespaces and an empty root;
- checks the traffic did what it should (data read back, expected errors);
- checks no worker died or was restarted on the way (in particular no SIGSYS, signal
  31) and that the layer list has no `unavailable:` entry;
- serves an export over a TCP listener bound by the supervisor, from inside the NBD
  worker's empty network namespace;
- starts each worker kind alone and checks it exits 0 when its channel closes (runtime
  shutdown under the filter), and, with a `--features test-hooks` build, that a worker
  told to make a forbidden call dies of SIGSYS.

Usage (from the repository root, after `cargo build -p bulkhead`, optionally with
`--features test-hooks`):

    python3 sandbox/tests/check_workers.py [--bin target/debug/bulkhead]
        [--strace TRACE] [--sandbox on|log|off] [--allow-degraded] [--keep]

With `--strace TRACE` the supervisor runs under `strace -f -o TRACE` and the script
prints, per worker kind, the system calls made after the seccomp filter was installed
(`--sandbox log` logs violations instead of killing). Exit status 0 means every check
passed.
"""

import argparse
import concurrent.futures
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

KINDS = ["file", "raw", "null-co", "null-aio", "nbd"]
FAILURES = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        FAILURES.append(what)


class Qmp:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.events = []
        json.loads(self.file.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, command, /, **args):
        msg = {"execute": command}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode())
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError(f"QMP closed during {command}")
            reply = json.loads(line)
            if "event" in reply:
                self.events.append(reply)
                continue
            return reply


def qemu_io(url, *cmds, fmt="raw", readonly=False):
    argv = ["qemu-io", "-f", fmt]
    if readonly:
        argv.append("-r")
    for c in cmds:
        argv += ["-c", c]
    argv.append(url)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


# --- raw NBD client for misbehaving-client paths -------------------------------------

NBD_OPT_EXPORT_NAME = 1
NBD_CMD_READ, NBD_CMD_WRITE = 0, 1
REQUEST_MAGIC = 0x25609513


def nbd_connect(addr, name, family=socket.AF_UNIX):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(addr)
    hello = recv_exact(s, 18)
    assert hello[:16] == b"NBDMAGICIHAVEOPT", hello
    s.sendall(struct.pack(">I", 1 | 2))  # fixed newstyle, no zeroes
    s.sendall(b"IHAVEOPT" + struct.pack(">II", NBD_OPT_EXPORT_NAME, len(name)) + name)
    size, _flags = struct.unpack(">QH", recv_exact(s, 10))
    return s, size


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"short read {len(buf)}/{n}")
        buf += chunk
    return buf


def nbd_request(kind, handle, offset, length):
    return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, kind, handle, offset, length)


def misbehaving_clients(addr):
    # Disconnect in the middle of the handshake.
    s = socket.socket(socket.AF_UNIX)
    s.connect(addr)
    s.recv(8)
    s.close()
    # Garbage instead of the client flags.
    s = socket.socket(socket.AF_UNIX)
    s.connect(addr)
    s.recv(18)
    s.sendall(b"\xff" * 64)
    s.close()
    # A write whose payload never fully arrives.
    s, _ = nbd_connect(addr, b"disk")
    s.sendall(nbd_request(NBD_CMD_WRITE, 1, 0, 1 << 20) + b"\x11" * 100000)
    s.close()
    # A read whose reply is never read.
    s, _ = nbd_connect(addr, b"disk")
    s.sendall(nbd_request(NBD_CMD_READ, 2, 0, 4 << 20))
    s.close()
    # A request with a bad magic: the server must drop the client.
    s, _ = nbd_connect(addr, b"disk")
    s.sendall(b"\x00" * 28)
    try:
        s.recv(16)
    except OSError:
        pass
    s.close()
    # A read past the end of the export: an error reply, connection kept.
    s, size = nbd_connect(addr, b"disk")
    s.sendall(nbd_request(NBD_CMD_READ, 3, size, 4096))
    reply = recv_exact(s, 16)
    magic, err, handle = struct.unpack(">IIQ", reply)
    s.close()
    return magic, err, handle


# --- /proc inspection -----------------------------------------------------------------


def workers_of(pid):
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if len(argv) >= 4 and argv[1] == b"worker":
            out[argv[3].decode()] = int(entry)
    return out


def status_of(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def namespaces_differ(pid, ns):
    try:
        return os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
    except OSError:
        return False


# --- lone workers ---------------------------------------------------------------------


def lone_worker(binary, kind, env):
    """Starts `bulkhead worker --kind KIND` with our end of a seqpacket pair on fd 3,
    waits for its first message, closes the channel and returns (first message, exit
    status). A worker whose channel closes ends its runtime and exits 0."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def to_fd3():
        os.dup2(theirs.fileno(), 3)

    proc = subprocess.Popen([binary, "worker", "--kind", kind], env=env, close_fds=False,
                            preexec_fn=to_fd3, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    theirs.close()
    ours.settimeout(20)
    try:
        first = ours.recv(65536)
    except OSError:
        first = b""
    ours.close()
    try:
        code = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    return first, code


def check_lone_workers(binary, mode):
    env = dict(os.environ)
    env["BULKHEAD_SANDBOX"] = mode
    env.pop("BULKHEAD_TEST_FORBIDDEN_SYSCALL", None)
    for kind in KINDS + ["host_device"]:
        first, code = lone_worker(binary, kind, env)
        check(first != b"" and code == 0,
              f"lone {kind} worker says Ready and exits 0 when its channel closes "
              f"(runtime shutdown under the filter): exit {code}")
    env["BULKHEAD_TEST_FORBIDDEN_SYSCALL"] = "raw"
    first, code = lone_worker(binary, "raw", env)
    if mode != "on":
        print(f"skip test hook: the sandbox is {mode}")
    elif first != b"" and code == 0:
        print("skip test hook: binary built without --features test-hooks")
    elif mode == "on":
        check(first == b"" and code == -signal.SIGSYS,
              f"test hook: a worker making a forbidden call dies of SIGSYS: exit {code}")


# --- strace summary -------------------------------------------------------------------

SYSCALL_RE = re.compile(r"^(\d+)\s+(?:<\.\.\. )?([a-z0-9_]+)[( ]")


def summarize_trace(path, worker_pids):
    """Prints, per worker kind, the system calls its threads made after the filter."""
    with open(path) as f:
        lines = f.readlines()
    # strace -f names threads by tid; map each tid to the process that created it.
    parent = {}
    for line in lines:
        m = re.match(r"^(\d+)\s+(?:<\.\.\. )?(?:clone3?|vfork|fork)\b.*= (\d+)$", line.strip())
        if m:
            parent[int(m.group(2))] = int(m.group(1))
    kind_of_pid = {p: k for k, p in worker_pids.items()}

    def root(tid):
        while tid not in kind_of_pid and tid in parent:
            tid = parent[tid]
        return kind_of_pid.get(tid)

    filtered, seen = set(), {}
    for line in lines:
        m = SYSCALL_RE.match(line)
        if not m:
            continue
        tid, call = int(m.group(1)), m.group(2)
        kind = root(tid)
        if kind is None:
            continue
        if call == "seccomp":
            filtered.add(kind)
            continue
        if kind in filtered and call not in ("exited", "killed"):
            seen.setdefault(kind, set()).add(call)
    for kind in sorted(seen):
        print(f"syscalls after the filter in {kind}: {' '.join(sorted(seen[kind]))}")


# --- main -----------------------------------------------------------------------------


def main():
    children, cleanup = [], []
    try:
        return run(children, cleanup)
    finally:
        for proc in children:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for undo in cleanup:
            undo()


def run(children, cleanup):
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(REPO, "target/debug/bulkhead"))
    ap.add_argument("--strace")
    ap.add_argument("--sandbox", default="on", choices=["on", "log", "off"])
    ap.add_argument("--allow-degraded", action="store_true",
                    help="do not require the namespaces (kernels without user namespaces)")
    ap.add_argument("--keep", action="store_true")
    opts = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="bulkhead-sandbox-")
    qmp_path = f"{tmp}/qmp.sock"
    nbd_path = f"{tmp}/nbd.sock"
    img = f"{tmp}/disk.raw"
    img2 = f"{tmp}/grow.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", img, "64M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", img2, "1M"], check=True)
    # Recognisable data at 4M, written before the daemon opens the image.
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 4M 64k", img], check=True,
                   stdout=subprocess.DEVNULL)

    env = dict(os.environ)
    env["BULKHEAD_LOG"] = env.get("BULKHEAD_LOG", "info")
    env["BULKHEAD_SANDBOX"] = opts.sandbox
    argv = [opts.bin, "--chardev", f"socket,path={qmp_path},server=on,wait=off,id=m0",
            "--monitor", "chardev=m0"]
    if opts.strace:
        argv = ["strace", "-f", "-qq", "-o", opts.strace] + argv
    log_path = f"{tmp}/stderr.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(argv, env=env, stderr=log)
    children.append(proc)
    for _ in range(400):
        if os.path.exists(qmp_path):
            break
        time.sleep(0.05)
    sup_pid = proc.pid
    if opts.strace:
        # The supervisor is strace's child.
        time.sleep(0.5)
        kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        sup_pid = int(kids.stdout.split()[0])

    q = Qmp(qmp_path)
    r = q.cmd("blockdev-add", driver="raw", **{"node-name": "disk"},
              file={"driver": "file", "filename": img, "node-name": "f0"})
    check(r == {"return": {}}, f"blockdev-add raw over file: {r}")
    r = q.cmd("blockdev-add", driver="file", filename=img2, **{"node-name": "f1"})
    check(r == {"return": {}}, f"blockdev-add second file node: {r}")
    r = q.cmd("blockdev-add", driver="null-co", size=16 << 20,
              **{"node-name": "nco", "latency-ns": 200000, "read-zeroes": True})
    check(r == {"return": {}}, f"blockdev-add null-co with latency-ns: {r}")
    r = q.cmd("blockdev-add", driver="null-aio", size=16 << 20,
              **{"node-name": "naio", "latency-ns": 100000, "read-zeroes": True})
    check(r == {"return": {}}, f"blockdev-add null-aio with latency-ns: {r}")
    loop = None
    if os.geteuid() == 0:
        img3 = f"{tmp}/loop.raw"
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", img3, "16M"], check=True)
        out = subprocess.run(["losetup", "-f", "--show", img3], capture_output=True, text=True)
        if out.returncode == 0:
            loop = out.stdout.strip()
            cleanup.append(lambda: subprocess.run(["losetup", "-d", loop]))
            r = q.cmd("blockdev-add", driver="host_device", filename=loop,
                      **{"node-name": "hd"})
            check(r == {"return": {}}, f"blockdev-add host_device on {loop}: {r}")
    if loop is None:
        print("skip host_device: needs root and a free loop device")
    r = q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": nbd_path}})
    check(r == {"return": {}}, f"nbd-server-start unix: {r}")
    for eid, node, writable in [("e0", "disk", True), ("e1", "nco", False),
                                ("e2", "naio", True)]:
        r = q.cmd("block-export-add", type="nbd", id=eid, **{"node-name": node},
                  writable=writable)
        check(r == {"return": {}}, f"block-export-add {node}: {r}")

    if loop is not None:
        r = q.cmd("block-export-add", type="nbd", id="e3", **{"node-name": "hd"}, writable=True)
        check(r == {"return": {}}, f"block-export-add hd: {r}")
        hd = f"nbd+unix:///hd?socket={nbd_path}"
        r = qemu_io(hd, "write -P 0x5c 0 64k", "write -z 64k 64k", "discard 128k 64k",
                    "flush", "read -P 0x5c 0 64k", "read -P 0 64k 64k", "read 16M 4k")
        check("verification failed" not in r.stdout and r.stdout.count("wrote") == 2
              and "read failed" in r.stdout + r.stderr,
              f"host_device (BLKGETSIZE64/BLKZEROOUT/BLKDISCARD) over NBD, read past end fails: "
              f"{(r.stdout + r.stderr).strip()[-200:]}")

    url = f"nbd+unix:///disk?socket={nbd_path}"
    r = qemu_io(url, "write -P 0x5a 1M 64k", "read -P 0x5a 1M 64k", "read -P 0x33 4M 64k",
                "writev -P 0x66 2M 4k 8k", "aio_write -P 0x77 3M 16k", "aio_flush",
                "write -z 1M 4k", "read -P 0 1M 4k", "write -z -u 5M 1M", "discard 6M 1M",
                "flush", "write -f -P 0x44 7M 4k", "read -P 0x44 7M 4k", "read -P 0 0 4k")
    check(r.returncode == 0 and "Pattern verification failed" not in r.stdout + r.stderr
          and "error" not in (r.stdout + r.stderr).lower(),
          f"qemu-io write/read/writev/aio/zero/discard/flush/fua over NBD: {r.stderr.strip()}")
    r = qemu_io(url, "read 63M 2M")
    check("Input/output error" in r.stdout + r.stderr or "out of range" in r.stdout + r.stderr
          or r.returncode != 0 or "Request" in r.stderr,
          f"read beyond the end fails: rc={r.returncode} {(r.stdout + r.stderr).strip()[:120]}")
    r = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", url],
                       capture_output=True, text=True, timeout=60)
    check(r.returncode == 0 and r.stdout.startswith("["), "qemu-img map (block status) over NBD")
    r = subprocess.run(["nbdinfo", "--list", f"nbd+unix://?socket={nbd_path}"],
                       capture_output=True, text=True, timeout=60)
    check(r.returncode == 0 and "disk" in r.stdout and "nco" in r.stdout, "nbdinfo --list")

    nco = f"nbd+unix:///nco?socket={nbd_path}"
    r = qemu_io(nco, "read -P 0 0 64k", "read -P 0 8M 1M", readonly=True)
    check(r.returncode == 0 and "verification failed" not in r.stdout,
          f"reads from null-co export: {(r.stdout + r.stderr).strip()[:300]}")
    r = qemu_io(nco, "write -P 1 0 4k")
    check("Permission denied" in r.stdout + r.stderr,
          f"qemu-io cannot open the read-only export for writing: {(r.stdout + r.stderr).strip()[:160]}")
    s, _ = nbd_connect(nbd_path, b"nco")
    s.sendall(nbd_request(NBD_CMD_WRITE, 7, 0, 4096) + b"\x01" * 4096)
    magic, err, handle = struct.unpack(">IIQ", recv_exact(s, 16))
    s.close()
    # qsd 10.0.2 answers EINVAL (22) here, not the EPERM the NBD spec suggests.
    check((magic, err, handle) == (0x67446698, 22, 7),
          f"a raw write to the read-only export gets EINVAL like qsd: ({magic:#x}, {err}, {handle})")
    naio = f"nbd+unix:///naio?socket={nbd_path}"
    r = qemu_io(naio, "write -P 9 0 64k", "read 0 64k", "aio_read 0 4k", "aio_flush", "flush")
    check(r.returncode == 0, f"null-aio export write/read/flush: {r.stderr.strip()}")

    # 64 parallel clients over the three exports.
    def one(i):
        target = [url, nco, naio][i % 3]
        if target == url:
            return qemu_io(target, f"read -P 0x33 {4 << 20} 64k").returncode
        return qemu_io(target, "read 0 64k", readonly=target == nco).returncode
    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        codes = list(pool.map(one, range(64)))
    check(codes == [0] * 64, f"64 parallel NBD clients: {codes.count(0)} succeeded")

    magic, err, handle = misbehaving_clients(nbd_path)
    check(magic == 0x67446698 and err == 22 and handle == 3,
          f"read past the end by a raw client: simple reply EINVAL ({magic:#x}, {err}, {handle})")
    r = qemu_io(url, "read -P 0x5a 1052672 61440")
    check(r.returncode == 0 and "verification failed" not in r.stdout,
          "export still serves after misbehaving clients")

    # Resize a file node (ftruncate in the file worker) and its error path.
    r = q.cmd("block_resize", **{"node-name": "f1"}, size=4 << 20)
    check(r == {"return": {}}, f"block_resize of a file node: {r}")
    check(os.path.getsize(img2) == 4 << 20, "the image file grew to 4 MiB")
    r = q.cmd("block_resize", **{"node-name": "nco"}, size=4 << 20)
    check("error" in r, f"block_resize of a null-co node is refused: {r}")

    # TCP listener bound by the supervisor, served from the worker's network namespace.
    r = q.cmd("nbd-server-stop")
    check(r == {"return": {}}, f"nbd-server-stop: {r}")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    r = q.cmd("nbd-server-start", addr={"type": "inet", "data": {"host": "127.0.0.1",
                                                                 "port": str(port)}})
    check(r == {"return": {}}, f"nbd-server-start inet: {r}")
    # A new name: exports of the stopped server may linger until their clients are gone.
    r = q.cmd("block-export-add", type="nbd", id="t0", **{"node-name": "disk"}, writable=True,
              name="tcpdisk")
    check(r == {"return": {}}, f"block-export-add over TCP: {r}")
    r = qemu_io(f"nbd://127.0.0.1:{port}/tcpdisk", "read -P 0x5a 1052672 61440", "write -P 0x21 8M 4k",
                "read -P 0x21 8M 4k")
    check(r.returncode == 0 and "verification failed" not in r.stdout,
          f"TCP export works from the NBD worker's namespace: {r.stderr.strip()}")

    workers = workers_of(sup_pid)
    kinds = KINDS + (["host_device"] if loop is not None else [])
    check(sorted(workers) == sorted(kinds), f"one worker per kind: {sorted(workers)}")
    for kind, pid in sorted(workers.items()):
        st = status_of(pid)
        if opts.sandbox == "off":
            check(st.get("Seccomp") == "0", f"{kind}: no seccomp with the sandbox off")
            continue
        check(st.get("Seccomp") == "2", f"{kind} (pid {pid}): Seccomp: {st.get('Seccomp')}")
        check(st.get("NoNewPrivs") == "1", f"{kind}: NoNewPrivs: {st.get('NoNewPrivs')}")
        tasks = os.listdir(f"/proc/{pid}/task")
        unfiltered = [t for t in tasks
                      if status_of(f"{pid}/task/{t}").get("Seccomp") != "2"
                      or status_of(f"{pid}/task/{t}").get("CapEff") != "0000000000000000"]
        check(not unfiltered, f"{kind}: all {len(tasks)} threads filtered and without "
                              f"capabilities (TSYNC): {unfiltered}")
        for cap in ["CapEff", "CapPrm", "CapInh", "CapAmb"]:
            check(st.get(cap) == "0000000000000000", f"{kind}: {cap}: {st.get(cap)}")
        if os.geteuid() == 0 or not opts.allow_degraded:
            check(st.get("CapBnd") == "0000000000000000", f"{kind}: CapBnd: {st.get('CapBnd')}")
        if not opts.allow_degraded:
            for ns in ["user", "mnt", "ipc", "net"]:
                check(namespaces_differ(pid, ns), f"{kind}: own {ns} namespace")
            check(os.listdir(f"/proc/{pid}/root") == [], f"{kind}: empty root directory")
        fds = os.listdir(f"/proc/{pid}/fd")
        check(len(fds) < 64, f"{kind}: {len(fds)} descriptors open")

    r = q.cmd("quit")
    check(r == {"return": {}}, "quit")
    try:
        code = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    log.close()
    check(code == 0, f"supervisor exit status {code}")
    with open(log_path) as f:
        stderr = f.read()
    deaths = [l for l in stderr.splitlines() if "worker process ended" in l]
    # At quit the supervisor kills its workers (signal 9); anything else is a failure.
    bad = [l for l in deaths if "signal 9" not in l and "exit code 0" not in l]
    check(not bad, f"no worker died of anything but the final kill: {bad[:3]}")
    check("signal 31" not in stderr, "no worker died of SIGSYS")
    starts = [l for l in stderr.splitlines() if "worker started" in l]
    check(len(starts) == len(kinds), f"no worker was restarted ({len(starts)} starts)")
    layers = [l for l in stderr.splitlines() if "sandbox in place" in l]
    for l in layers:
        print("     " + l.split("INFO", 1)[-1].strip()[:400])
    if opts.sandbox == "on" and not opts.allow_degraded:
        check(not any("unavailable:" in l for l in layers), "no sandbox layer unavailable")
    if opts.strace:
        summarize_trace(opts.strace, workers)
    check_lone_workers(opts.bin, opts.sandbox)
    if opts.keep:
        print("kept", tmp)
    else:
        subprocess.run(["rm", "-rf", tmp])
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed; supervisor stderr was:\n{stderr[-4000:]}")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
