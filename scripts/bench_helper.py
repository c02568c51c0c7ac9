#!/usr/bin/env python3
"""Helpers for scripts/bench (stdlib only).

Subcommands:
  mklayers DIR NLAYERS TOTAL_FILES BIG_MIB   prepare lower layers under DIR
  mktar TARFILE NDIRS NFILES                 tarball of small files (create workload)
  walk MNT                                   readdir + lstat everything; prints
                                             "<files> <dirs> <other> <seconds>"
  report RESULTS.tsv FS...                   markdown table of medians
"""

import os
import statistics
import sys
import tarfile
import io
import time

# Layout of each layer (all layers share the same directory skeleton, so the
# overlay has to merge every directory):
#   tree/dAA/eBB/                 100 leaf dirs present in every layer
#       L<l>_<k>                  files unique to layer l
#       shared_<k>                (k < shadow) present in every layer: upper
#                                 copies shadow lower ones
#       whiteout of L<l-1>_0      (layers l >= 1) char dev 0/0 hides one file
#   opq/                          opaque in layers l >= 1 (trusted.overlay.opaque)
#   only<l>/                      directory present in a single layer
#   big/{read,append,trunc,unlink}.bin   big files, bottom layer only
FANOUT = 10  # tree/dAA/eBB: FANOUT*FANOUT leaf dirs
SHADOW = 5
OPAQUE_FILES = 10
ONLY_FILES = 20
BIG_FILES = ("read", "append", "trunc", "unlink")
CONTENT = b"strata bench small file\n" * 4  # ~100 bytes


def write_file(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def mklayers(root, nlayers, total_files, big_mib):
    nlayers, total_files, big_mib = int(nlayers), int(total_files), int(big_mib)
    leaves = FANOUT * FANOUT
    per_leaf_layer = max(2, total_files // nlayers // leaves)
    shadow = max(1, min(SHADOW, per_leaf_layer // 10))
    per_leaf = per_leaf_layer - shadow
    for l in range(nlayers):
        layer = os.path.join(root, f"layer{l}")
        os.makedirs(layer)
        for a in range(FANOUT):
            for b in range(FANOUT):
                leaf = os.path.join(layer, "tree", f"d{a:02}", f"e{b:02}")
                os.makedirs(leaf)
                for k in range(per_leaf):
                    write_file(os.path.join(leaf, f"L{l}_{k}"), CONTENT)
                for k in range(shadow):
                    write_file(os.path.join(leaf, f"shared_{k}"), CONTENT + b"%d\n" % l)
                if l >= 1:
                    os.mknod(os.path.join(leaf, f"L{l - 1}_0"), 0o600 | 0o020000, os.makedev(0, 0))
        opq = os.path.join(layer, "opq")
        os.makedirs(opq)
        for k in range(OPAQUE_FILES):
            write_file(os.path.join(opq, f"L{l}_{k}"), CONTENT)
        if l >= 1:
            os.setxattr(opq, "trusted.overlay.opaque", b"y")
        only = os.path.join(layer, f"only{l}")
        os.makedirs(only)
        for k in range(ONLY_FILES):
            write_file(os.path.join(only, f"f{k}"), CONTENT)
    # Big files in the bottom layer. Distinct data per MiB block so nothing
    # can shortcut the copy (no holes, no repeated blocks).
    big = os.path.join(root, "layer0", "big")
    os.makedirs(big)
    block = bytearray(os.urandom(1 << 20))
    for name in BIG_FILES:
        with open(os.path.join(big, f"{name}.bin"), "wb") as f:
            for i in range(big_mib):
                block[0:16] = i.to_bytes(8, "little") + name.encode().ljust(8, b"\0")
                f.write(block)
    os.sync()


def mktar(path, ndirs, nfiles):
    ndirs, nfiles = int(ndirs), int(nfiles)
    data = CONTENT
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for d in range(ndirs):
            info = tarfile.TarInfo(f"c{d:03}")
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = 1700000000
            tar.addfile(info)
            for f in range(nfiles):
                info = tarfile.TarInfo(f"c{d:03}/f{f:03}")
                info.size = len(data)
                info.mode = 0o644
                info.mtime = 1700000000
                tar.addfile(info, io.BytesIO(data))


def walk(mnt):
    files = dirs = other = 0
    start = time.perf_counter()
    stack = [mnt]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)  # an lstat for every entry
                mode = st.st_mode
                if (mode & 0o170000) == 0o040000:
                    dirs += 1
                    stack.append(e.path)
                elif (mode & 0o170000) == 0o100000:
                    files += 1
                else:
                    other += 1
    elapsed = time.perf_counter() - start
    print(files, dirs, other, f"{elapsed:.6f}")


# (key, label) in table order; the label says whether the cache was cold.
WORKLOADS = [
    ("stat", "a. readdir+lstat whole tree: {tree}, 10 layers [cold]"),
    ("create", "b. create {create} small files (tar x) [warm]"),
    ("rm", "b. rm -rf those {create} files [warm]"),
    ("read", "c. sequential read {big} lower file (dd bs=1M) [cold]"),
    ("copyup", "d. copy-up {big} lower file (append 1 byte) [cold]"),
    ("copyup_sync", "d. `sync` right after that copy-up"),
    ("copyup_total", "d. copy-up + sync"),
    ("trunc", "e. O_TRUNC open of {big} lower file (: > f) [cold]"),
    ("unlink", "e. unlink {big} lower file (rm f) [cold]"),
]


def report(results, *fss):
    # results: lines "fs rep workload seconds"; params: "# key value" lines
    data = {}
    params = {}
    with open(results) as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "#":
                params[parts[1]] = " ".join(parts[2:])
                continue
            fs, _rep, wl, secs = parts
            data.setdefault((fs, wl), []).append(float(secs))

    def med(fs, wl):
        v = data.get((fs, wl))
        return statistics.median(v) if v else None

    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    def ratio(a, b):
        return "n/a" if a is None or b is None or b <= 0 else f"{a / b:.2f}"

    names = {"kernel": "kernel", "fuse-overlayfs": "fuse-overlayfs", "strata": "strata"}
    print("| workload | kernel (s) | fuse-overlayfs (s) | strata (s) | fuse-overlayfs/kernel | strata/kernel |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, label in WORKLOADS:
        k, fo, st = (med(n, key) for n in names)
        print(f"| {label.format(**params)} | {fmt(k)} | {fmt(fo)} | {fmt(st)} | {ratio(fo, k)} | {ratio(st, k)} |")
    reps = {fs: len(data.get((fs, "stat"), [])) for fs in fss}
    print()
    print("Medians of " + ", ".join(f"{fs}: {n} rep(s)" for fs, n in reps.items()) + ".")


def main():
    cmds = {"mklayers": mklayers, "mktar": mktar, "walk": walk, "report": report}
    if len(sys.argv) < 2 or sys.argv[1] not in cmds:
        sys.exit(__doc__)
    cmds[sys.argv[1]](*sys.argv[2:])


if __name__ == "__main__":
    main()
