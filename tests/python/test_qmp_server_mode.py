#!/usr/bin/env python3
"""`qemu.qmp`'s QMPClient in server mode: the daemon connects out to it.

Usage: python3 tests/python/test_qmp_server_mode.py <daemon-program> <dir>

Run by tests/tests/python_client.rs. The client listens on <dir>/qmp-client.sock
(`start_server`), starts the daemon with a client-mode monitor
(`--chardev socket,path=...` without `server=on`), accepts its connection and checks
what qsd 10.0.2 answers. Exits 0 when every check passed, 1 on the first failure.
"""

import asyncio
import os
import subprocess
import sys

from qemu.qmp import QMPClient


def check(condition, message):
    # Explicit checks instead of assert: `python3 -O` would strip asserts.
    if not condition:
        raise SystemExit(f"check failed: {message}")


async def run(program, directory):
    path = os.path.join(directory, "qmp-client.sock")
    qmp = QMPClient("server-mode")
    await qmp.start_server(path)
    daemon = subprocess.Popen(
        [program, "--chardev", f"socket,path={path},id=out", "--monitor", "out"],
        stdin=subprocess.DEVNULL,
    )
    try:
        await asyncio.wait_for(qmp.accept(), timeout=20)
        chardevs = await qmp.execute("query-chardev")
        check(chardevs == [{"frontend-open": True, "filename": f"unix:{path}",
                            "label": "out"}], f"query-chardev: {chardevs!r}")
        version = await qmp.execute("query-version")
        check(version["qemu"]["major"] == 10, f"query-version: {version!r}")
        await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "pynull"})
        nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
        check([n["node-name"] for n in nodes] == ["pynull"], f"nodes: {nodes!r}")
        await qmp.execute("quit")
        try:
            await qmp.disconnect()
        except EOFError:
            # The daemon closes the connection after replying to quit (qsd may be
            # quicker or slower than the client noticing; both are fine).
            pass
        status = daemon.wait(timeout=20)
        check(status == 0, f"daemon exit status {status}")
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    print("qemu.qmp server-mode checks passed")


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1], sys.argv[2]))
