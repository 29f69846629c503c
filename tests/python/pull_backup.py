#!/usr/bin/env python3
"""The client side of libvirt's pull-mode incremental backup, with real tools only.

Usage: pull_backup.py SOCKET EXPORT BITMAP FULL_IMAGE OUT_RAW

Starts from the full backup FULL_IMAGE (converted to raw OUT_RAW), asks the
fleecing export EXPORT on the NBD unix socket SOCKET which extents the dirty bitmap
BITMAP marks (`nbdinfo --map=qemu:dirty-bitmap:BITMAP --json`), reads only those
extents from the export (`qemu-img convert` of a raw window over QEMU's NBD client)
and writes them into OUT_RAW at their offsets. Prints the dirty extents and the
bytes read; exits non-zero on any failure.
"""

import json
import os
import subprocess
import sys
import tempfile


def main() -> int:
    socket, export, bitmap, full, out = sys.argv[1:6]
    uri = f"nbd+unix:///{export}?socket={socket}"
    subprocess.run(["qemu-img", "convert", "-O", "raw", full, out], check=True)
    mapped = subprocess.run(
        ["nbdinfo", f"--map=qemu:dirty-bitmap:{bitmap}", "--json", uri],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    extents = [e for e in json.loads(mapped) if e["type"] & 1]
    read = 0
    with tempfile.TemporaryDirectory() as tmp, open(out, "r+b") as target:
        piece = os.path.join(tmp, "piece.raw")
        for e in extents:
            offset, length = e["offset"], e["length"]
            window = (
                f"driver=raw,offset={offset},size={length},file.driver=nbd,"
                f"file.server.type=unix,file.server.path={socket},file.export={export}"
            )
            subprocess.run(
                ["qemu-img", "convert", "--image-opts", window, "-O", "raw", piece],
                check=True,
                capture_output=True,
            )
            with open(piece, "rb") as f:
                data = f.read()
            if len(data) != length:
                print(f"read {len(data)} bytes of {length} at {offset}", file=sys.stderr)
                return 1
            target.seek(offset)
            target.write(data)
            read += length
    print("dirty extents:", ", ".join(f"{e['offset']}+{e['length']}" for e in extents))
    print(f"read {read} bytes of dirty extents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
