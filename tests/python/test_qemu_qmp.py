#!/usr/bin/env python3
"""Drive a QMP daemon with the real `qemu.qmp` client library.

Usage: python3 tests/python/test_qemu_qmp.py <qmp-socket>

Run by tests/tests/python_client.rs against bulkhead (or qsd with
BULKHEAD_DIFF_AGAINST=qsd). The daemon must have been started without extra nodes named
"pynull". Exits 0 when every check passed, 1 with a message on the first failure. The
expected texts are qemu-storage-daemon 10.0.2's.
"""

import asyncio
import sys

from qemu.qmp import ExecuteError, QMPClient


class CheckFailed(Exception):
    """A reply was not what qsd sends."""


def check(condition, message):
    # Explicit checks instead of assert: `python3 -O` would strip asserts.
    if not condition:
        raise CheckFailed(message)


async def expect_error(qmp, command, arguments, error_class, desc):
    try:
        reply = await qmp.execute(command, arguments)
    except ExecuteError as err:
        check(err.error_class == error_class,
              f"{command}: class {err.error_class!r}, expected {error_class!r}")
        check(str(err) == desc and err.error.error.desc == desc,
              f"{command}: desc {str(err)!r}, expected {desc!r}")
        return
    raise CheckFailed(f"{command} {arguments} succeeded ({reply!r}); expected {desc!r}")


async def run(socket_path):
    qmp = QMPClient("bulkhead-systest")
    # connect() reads the greeting and negotiates capabilities (qmp_capabilities).
    await qmp.connect(socket_path)
    greeting = qmp.greeting
    check(greeting is not None, "no greeting")
    raw_greeting = greeting._asdict()
    check(raw_greeting["QMP"]["capabilities"] == ["oob"], f"greeting {raw_greeting!r}")
    check(sorted(raw_greeting["QMP"]["version"].keys()) == ["package", "qemu"],
          f"greeting {raw_greeting!r}")

    version = await qmp.execute("query-version")
    check(sorted(version.keys()) == ["package", "qemu"], f"query-version keys {version!r}")
    check(all(isinstance(version["qemu"][k], int) for k in ("major", "minor", "micro")),
          f"query-version numbers {version!r}")
    check(isinstance(version["package"], str), f"query-version package {version!r}")

    added = await qmp.execute("blockdev-add", {
        "driver": "null-co", "node-name": "pynull", "size": 1048576})
    check(added == {}, f"blockdev-add returned {added!r}")

    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    check(isinstance(nodes, list), f"query-named-block-nodes returned {nodes!r}")
    mine = [n for n in nodes if n.get("node-name") == "pynull"]
    check(len(mine) == 1, f"node pynull listed {len(mine)} times in {nodes!r}")
    node = mine[0]
    check(node["drv"] == "null-co", f"drv {node['drv']!r}")
    check(node["ro"] is False, f"ro {node['ro']!r}")
    check(node["image"]["virtual-size"] == 1048576, f"image {node['image']!r}")
    check(node["image"]["format"] == "null-co", f"image {node['image']!r}")

    await expect_error(qmp, "blockdev-add",
                       {"driver": "null-co", "node-name": "pynull"},
                       "GenericError", "Duplicate nodes with node-name='pynull'")
    await expect_error(qmp, "blockdev-del", {"node-name": "nosuch"},
                       "GenericError", "Failed to find node with node-name='nosuch'")
    await expect_error(qmp, "no-such-command", None,
                       "CommandNotFound", "The command no-such-command has not been found")

    deleted = await qmp.execute("blockdev-del", {"node-name": "pynull"})
    check(deleted == {}, f"blockdev-del returned {deleted!r}")

    bye = await qmp.execute("quit")
    check(bye == {}, f"quit returned {bye!r}")
    try:
        await qmp.disconnect()
    except EOFError:
        # The daemon closes the socket after replying to quit; qemu.qmp reports that
        # from its reader task (QEMU's own python/qemu/machine code expects it too).
        pass


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        asyncio.run(asyncio.wait_for(run(sys.argv[1]), timeout=60))
    except CheckFailed as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    print("qemu.qmp checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
