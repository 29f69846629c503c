#!/usr/bin/env python3
"""Compare bulkhead's QAPI schema files with a live qemu-storage-daemon.

Starts qsd on a temporary socket, reads query-qmp-schema (type names masked),
and checks every command in ../schema/*.json against it: member names, order,
optionality, enum values, union variants and alternate branches, following
types recursively. Integer widths cannot be checked this way (introspection
shows every integer type as 'int'). Prints mismatches and the qsd commands the
schema lacks; prints nothing but the summary when they agree.

Usage: python3 compare_with_qsd.py [path/to/qemu-storage-daemon]
"""
import glob, json, os, socket, subprocess, sys, tempfile, time


def live_schema(qsd):
    d = tempfile.mkdtemp()
    path = os.path.join(d, "qmp.sock")
    p = subprocess.Popen([qsd, "--chardev", f"socket,path={path},server=on,wait=off,id=m0",
                          "--monitor", "chardev=m0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if os.path.exists(path):
                break
            time.sleep(0.05)
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        f = s.makefile("rb")
        f.readline()
        for cmd in ("qmp_capabilities", "query-qmp-schema"):
            s.sendall(json.dumps({"execute": cmd}).encode() + b"\n")
            reply = json.loads(f.readline())
        s.sendall(b'{"execute": "quit"}\n')
        return {e["name"]: e for e in reply["return"]}
    finally:
        try:
            p.wait(3)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def preprocess(text):
    out, in_str, in_comment = [], False, False
    for c in text:
        if in_comment:
            if c == "\n":
                in_comment = False
                out.append(c)
            continue
        if c == "#" and not in_str:
            in_comment = True
        elif c == "'":
            in_str = not in_str
            out.append('"')
        else:
            out.append(c)
    return "".join(out)


L = live_schema(sys.argv[1] if len(sys.argv) > 1 else "qemu-storage-daemon")
M={}; C={}
dec=json.JSONDecoder()
for f in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "*.json"))):
    s=preprocess(open(f).read()); i=0
    while True:
        while i<len(s) and s[i].isspace(): i+=1
        if i>=len(s): break
        d,i=dec.raw_decode(s,i)
        for k in ("struct","union","enum","alternate"):
            if k in d:
                M[d[k]]=(k,d)
                if isinstance(d.get("base"),dict): M["q_obj_%s-base"%d[k]]=("struct",{"data":d["base"]})
        if "command" in d:
            C[d["command"]]=d
            if isinstance(d.get("data"),dict): M["q_obj_%s-arg"%d["command"]]=("struct",{"data":d["data"]})
INTS={"int","int8","int16","int32","int64","uint8","uint16","uint32","uint64","size"}
def members(n):
    k,d=M[n]; out=[]
    if "base" in d:
        b=d["base"]; out+=members(b if isinstance(b,str) else "q_obj_%s-base"%n)
    if k=="struct":
        for key,t in d.get("data",{}).items():
            out.append((key.lstrip("*"), key.startswith("*"), t["type"] if isinstance(t,dict) else t))
    return out
errs=[]
seen=set()
def cmp(mine, live, path):
    key=(json.dumps(mine),live)
    if key in seen: return
    seen.add(key)
    le=L[live]; lmt=le["meta-type"]
    if isinstance(mine,list):
        if lmt!="array": errs.append(f"{path}: list vs {lmt}"); return
        return cmp(mine[0], le["element-type"], path+"[]")
    if mine in INTS or mine in ("str","bool","number","null","any"):
        want = "int" if mine in INTS else mine
        if live!=want: errs.append(f"{path}: {mine} vs live {live}/{lmt}")
        return
    if mine not in M: errs.append(f"{path}: undefined {mine}"); return
    k,d=M[mine]
    if k=="enum":
        vals=[v if isinstance(v,str) else v["name"] for v in d["data"]]
        if lmt!="enum" or le["values"]!=vals: errs.append(f"{path}: enum {mine} {vals} vs {le.get('values')}")
        return
    if k=="alternate":
        if lmt!="alternate": errs.append(f"{path}: alt vs {lmt}"); return
        bs=list(d["data"].values())
        if len(bs)!=len(le["members"]): errs.append(f"{path}: alt branch count"); return
        for b,lm in zip(bs, le["members"]): cmp(b, lm["type"], path+"|")
        return
    if lmt!="object": errs.append(f"{path}: object {mine} vs {lmt}"); return
    ms=members(mine)
    lms=le["members"]
    if [(m[0],m[1]) for m in ms]!=[(m["name"],"default" in m) for m in lms]:
        errs.append(f"{path}: members of {mine}\n   mine {[(m[0],m[1]) for m in ms]}\n   live {[(m['name'],'default' in m) for m in lms]}"); return
    for m,lm in zip(ms,lms): cmp(m[2], lm["type"], path+"."+m[0])
    if k=="union":
        lv={v["case"]:v["type"] for v in le.get("variants",[])}
        if le.get("tag")!=d["discriminator"]: errs.append(f"{path}: tag")
        for case,lt in lv.items():
            t=d["data"].get(case)
            if t is None:
                if L[lt].get("members"): errs.append(f"{path}: missing variant {case}")
                continue
            t = t if isinstance(t,str) else t["type"]
            if M[t][0]!="struct": errs.append(f"{path}: variant not struct"); continue
            # compare variant members
            vms=members(t); lvm=L[lt]["members"]
            if [(m[0],m[1]) for m in vms]!=[(m["name"],"default" in m) for m in lvm]:
                errs.append(f"{path}/{case}: variant members {t}\n   mine {[(m[0],m[1]) for m in vms]}\n   live {[(m['name'],'default' in m) for m in lvm]}"); continue
            for m,lm in zip(vms,lvm): cmp(m[2], lm["type"], path+"/"+case+"."+m[0])
        for case in d["data"]:
            if case not in lv: errs.append(f"{path}: extra variant {case}")
live_cmds={n for n,e in L.items() if e["meta-type"]=="command"}
for c,d in C.items():
    if c not in live_cmds: errs.append("not in qsd: "+c); continue
    arg = d.get("data")
    argn = None if arg is None else (arg if isinstance(arg,str) else "q_obj_%s-arg"%c)
    la = L[c]["arg-type"]
    if argn is None:
        if L[la]["members"]: errs.append(c+": live has args")
    else: cmp(argn, la, c)
    feats = sorted(d.get("features",[])); lf = sorted(L[c].get("features",[]))
    if feats!=lf: errs.append(f"{c}: features {feats} vs {lf}")
print("\n".join(errs))
print("missing commands:", sorted(live_cmds-set(C)))
print(len(C), "commands checked")

