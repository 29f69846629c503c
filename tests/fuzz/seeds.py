#!/usr/bin/env python3
"""Writes the hand-made seed inputs into corpus/<target>/seed-*: well-formed
sessions that get the fuzzer past the magic numbers and handshakes at once.
The corpora in corpus/ are these plus what the fuzzer found (minimized with
`cargo fuzz cmin`). Rerun after changing a seed; see design/fuzzing.md."""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# qmp_session: first byte = output style and read size, then the client's bytes.
QMP = [
    ("negotiate", '{"execute":"qmp_capabilities"}{"execute":"query-block","id":"a"}'),
    ("oob", '{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}'
            '{"exec-oob":"query-version","id":1}{"execute":"query-version","id":[1,{"x":null}]}'),
    ("blockdev", '{"execute":"qmp_capabilities"}'
                 '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n","size":4096}}'
                 '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r","file":{"driver":"file","filename":"/tmp/x"}}}'
                 '{"execute":"block_resize","arguments":{"node-name":"n","size":8192}}'
                 '{"execute":"blockdev-del","arguments":{"node-name":"n"}}'),
    ("export", '{"execute":"qmp_capabilities"}'
               '{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","path":"/tmp/s"}}}'
               '{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"n","writable":true,"name":"x"}}'
               '{"execute":"block-export-del","arguments":{"id":"e","mode":"hard"}}'
               '{"execute":"quit"}'),
    ("errors", "{'execute': 'qmp_capabilities'}\n{\"execute\": 1}\n[1, 2]\n{\"a\": tru}\n"
               '{"execute":"x","arguments":[]}\x00\xff{"execute":"query-name","extra":3}'
               '"\\u00e9\\ud800" -12.5e3 {"execute":"query-commands"}}}]'),
]
for name, text in QMP:
    put("qmp_session", name, b"\x07" + text.encode("latin-1"))
    put("qmp_session", name + "-pretty", b"\x81" + text.encode("latin-1"))

# keyval: selector byte (implied key bits 0-2, type bits 3-4, JSON bit 6, help bit 7).
KEYVAL = [
    (0x01, "file,filename=/tmp/x,node-name=a,aio=threads,cache.direct=on"),
    (0x01, "driver=raw,node-name=r,file.driver=file,file.filename=/tmp/y,offset=512,size=4096"),
    (0x0a, "nbd,id=e,node-name=a,writable=on,name=x,description=d,allocation-depth=on"),
    (0x10, "addr.type=unix,addr.path=/tmp/s,max-connections=4"),
    (0x10, "addr.type=inet,addr.host=::1,addr.port=10809"),
    (0x1c, "iothread,id=io0"),
    (0x84, "help,id=x"),
    (0x00, "a.0=x,a.1=y,b.c.d=1,,2,e="),
    (0x41, '{"driver":"null-co","node-name":"n","size":4096,"read-zeroes":true}'),
    (0x51, '{"addr":{"type":"unix","path":"/tmp/s"}}'),
]
for i, (sel, text) in enumerate(KEYVAL):
    put("keyval", str(i), bytes([sel]) + text.encode())

# cli: argv elements separated by NUL.
CLI = [
    ["--blockdev", "driver=null-co,node-name=a", "--nbd-server", "addr.type=unix,addr.path=/tmp/s",
     "--export", "type=nbd,id=e,node-name=a,writable=on"],
    ["--chardev", "socket,id=c,path=/tmp/m,server=on,wait=off", "--monitor", "chardev=c,pretty=on",
     "--pidfile", "/tmp/p", "--daemonize"],
    ["--blo=driver=file,filename=/tmp/x,node-name=f", "-Tenable=bdrv_*", "--object", "iothread,id=i",
     "--chardev", "stdio,id=s", "--", "--nothing"],
    ["--blockdev", '{"driver":"null-co","node-name":"j"}', "--export", "nbd,id=x,node-name=j",
     "--sandbox", "off", "--monitor", "c", "x"],
    ["-T", "help"], ["--object", "help"], ["--chardev", "help"], ["-V"], ["--vers"],
]
for i, argv in enumerate(CLI):
    put("cli", str(i), "\0".join(argv))

# nbd: the client's bytes.
OPTS_MAGIC = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71


def opt(code, data=b""):
    return struct.pack(">QII", OPTS_MAGIC, code, len(data)) + data


def s(text):
    return struct.pack(">I", len(text)) + text


def meta(export, *queries):
    return s(export) + struct.pack(">I", len(queries)) + b"".join(s(q) for q in queries)


def req(kind, offset, length, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, kind, cookie, offset, length) + payload


def xreq(kind, offset, length, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, flags, kind, cookie, offset, length) + payload


FLAGS = struct.pack(">I", 3)  # FIXED_NEWSTYLE | NO_ZEROES
GO = opt(7, s(b"") + struct.pack(">HHHH", 3, 0, 1, 2))
COMMANDS = (req(0, 0, 4096) + req(1, 512, 16, 1, 2, b"x" * 16) + req(7, 0, 65536, 0, 3)
            + req(6, 4096, 8192, 2, 4) + req(4, 8192, 4096, 0, 5) + req(3, 0, 0, 0, 6)
            + req(5, 0, 512, 0, 7) + req(0, 65000, 4096, 4, 8) + req(7, 0, 66536, 8, 9) + req(2, 0, 0))
NBD = [
    ("go", FLAGS + opt(8) + opt(10, meta(b"", b"base:allocation", b"qemu:allocation-depth")) + GO + COMMANDS),
    ("extended", FLAGS + opt(11) + opt(10, meta(b"", b"base:allocation")) + GO
     + xreq(0, 0, 4096) + xreq(1, 0, 8, 1 << 5, 2, b"y" * 8) + xreq(7, 0, 1 << 20, 0, 3)
     + xreq(6, 0, 4096, 1 << 4, 4) + xreq(2, 0, 0)),
    ("list", FLAGS + opt(3) + opt(9, meta(b"ro", b"base:", b"qemu:")) + opt(6, s(b"ro") + struct.pack(">H", 0))
     + opt(5) + opt(4) + opt(99, b"junk") + opt(2)),
    ("export-name", struct.pack(">I", 1) + opt(1, b"ro") + req(0, 0, 512) + req(1, 0, 1, 0, 2, b"z") + req(2, 0, 0)),
    ("simple", FLAGS + GO + COMMANDS),
]
for name, data in NBD:
    put("nbd", name, data)
