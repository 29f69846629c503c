#!/usr/bin/env python3
"""Seeds for the qcow2_open target: small images made by qemu-img/qemu-io 10.0.2
(512-byte clusters where possible, to keep them small), each prefixed with a flags
byte (four variants) and one fixed list of ten operations (see
fuzz_targets/qcow2_open.rs).
Writes tests/fuzz/corpus/qcow2_open/seed-*. Run from the repository root."""
import os
import subprocess
import tempfile

OUT = "tests/fuzz/corpus/qcow2_open"
OPS = bytes([0x02, 0, 0, 7, 0x42, 1, 0, 9, 0x03, 5, 0, 40, 0x04, 3, 0, 5, 0x05, 0, 0, 3,
             0x86, 0, 0, 5, 0x0f, 0, 0, 3, 0x17, 0, 0, 2, 0x01, 0, 0, 60, 0x02, 9, 0, 1])


def sh(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def main():
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        p = lambda n: os.path.join(d, n)
        img = lambda n, o, s: sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", o, p(n), s)
        io = lambda n, *c: sh("qemu-io", "-f", "qcow2", p(n), *sum((["-c", x] for x in c), []))
        img("a", "cluster_size=512", "64k")
        io("a", "write -P 1 0 3k", "write -z 8k 2k", "discard 16k 512")
        img("b", "cluster_size=512,compat=0.10", "64k")
        io("b", "write -P 2 1k 2k")
        img("c", "cluster_size=512,refcount_bits=1", "32k")
        img("d", "cluster_size=512,refcount_bits=64,lazy_refcounts=on", "32k")
        io("d", "write -P 3 0 1k")
        img("e", "cluster_size=512", "32k")
        io("e", "write -P 4 0 2k")
        sh("qemu-img", "snapshot", "-c", "s1", p("e"))
        io("e", "write -P 5 512 512")
        img("f", "cluster_size=512", "32k")
        sh("qemu-img", "bitmap", "--add", p("f"), "bm")
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512",
           "-b", p("a"), "-F", "qcow2", p("g"))
        sh("qemu-img", "create", "-q", "-f", "raw", p("r"), "16k")
        sh("qemu-io", "-f", "raw", p("r"), "-c", "write -P 6 0 8k")
        for n, ctype in (("h", "zlib"), ("i", "zstd")):
            sh("qemu-img", "convert", "-c", "-O", "qcow2", "-o",
               f"cluster_size=512,compression_type={ctype}", p("r"), p(n))
        img("j", "cluster_size=16k,extended_l2=on", "64k")
        io("j", "write -P 7 1k 1k")
        for n in "abcdefghij":
            data = open(p(n), "rb").read()
            for flags in (0, 1, 3, 9):
                with open(os.path.join(OUT, f"seed-{n}-{flags}"), "wb") as f:
                    f.write(bytes([flags]) + OPS + data)


if __name__ == "__main__":
    main()
