#!/usr/bin/env python3
"""Helpers for scripts/bench (stdlib only).

Subcommands:
  mklayers DIR NLAYERS TOTAL_FILES BIG_MIB READ_MIB
        the 10-layer tree under DIR/layer0..; BIG_MIB=0 skips the big files
  mkstack DIR NLAYERS PER_LAYER
        DIR/0 .. DIR/NLAYERS-1, each with d/l<layer>_<k>: one dir in every layer
  mktar TARFILE NDIRS NFILES
        tarball of NDIRS x NFILES small files (untar workload)
  lookups DIR NLAYERS PER_LAYER
        lstat every name of the merged DIR once, then as many missing names;
        prints "<hit_secs> <miss_secs> <found> <bad_misses>"
  readdir DIR     list DIR (getdents of one dir); prints "<entries> <secs>"
  daemon-pid MNT  pid of the FUSE daemon serving MNT: a process with MNT as
                  an argument and /dev/fuse open; prints nothing if none
  fio-iops JSON   IOPS (read + write) of the first job in fio's JSON output
  report RESULTS COUNTS FS...
        markdown table: medians per fs, medians of per-round ratios, count checks
  checkcounts COUNTS
        one line per count that differs from the kernel's (nothing if all agree)
"""

import io
import json
import os
import statistics
import sys
import tarfile
import time

# Layout of each layer of the 10-layer tree (all layers share the directory
# skeleton, so the overlay has to merge every directory):
#   tree/dAA/eBB/                 100 leaf dirs present in every layer
#       L<l>_<k>                  files unique to layer l
#       shared_<k>                (k < shadow) present in every layer: upper
#                                 copies shadow lower ones
#       whiteout of L<l-1>_0      (layers l >= 1) char dev 0/0 hides one file
#   opq/                          opaque in layers l >= 1 (trusted.overlay.opaque)
#   only<l>/                      directory present in a single layer
#   big/{read,append,trunc,unlink}.bin   big files, bottom layer only (read.bin
#                                 READ_MIB, the others BIG_MIB)
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


def mklayers(root, nlayers, total_files, big_mib, read_mib):
    nlayers, total_files = int(nlayers), int(total_files)
    big_mib, read_mib = int(big_mib), int(read_mib)
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
    if big_mib > 0:
        # Big files in the bottom layer. Distinct data per MiB block so nothing
        # can shortcut the copy (no holes, no repeated blocks).
        big = os.path.join(root, "layer0", "big")
        os.makedirs(big)
        block = bytearray(os.urandom(1 << 20))
        for name in BIG_FILES:
            with open(os.path.join(big, f"{name}.bin"), "wb") as f:
                for i in range(read_mib if name == "read" else big_mib):
                    block[0:16] = i.to_bytes(8, "little") + name.encode().ljust(8, b"\0")
                    f.write(block)
    os.sync()


def stack_names(nlayers, per_layer):
    """Names in the shared dir of the NLAYERS-layer stack, interleaved across layers."""
    return [f"l{l}_{k}" for k in range(per_layer) for l in range(nlayers)]


def mkstack(root, nlayers, per_layer):
    nlayers, per_layer = int(nlayers), int(per_layer)
    for l in range(nlayers):
        d = os.path.join(root, str(l), "d")
        os.makedirs(d)
        for k in range(per_layer):
            write_file(os.path.join(d, f"l{l}_{k}"), CONTENT)
    os.sync()


def lookups(d, nlayers, per_layer):
    names = stack_names(int(nlayers), int(per_layer))
    paths = [os.path.join(d, n) for n in names]
    missing = [os.path.join(d, f"missing{i}") for i in range(len(names))]
    found = 0
    t0 = time.perf_counter()
    for p in paths:
        try:
            os.lstat(p)
            found += 1
        except FileNotFoundError:
            pass
    t1 = time.perf_counter()
    bad = 0
    for p in missing:
        try:
            os.lstat(p)
            bad += 1
        except FileNotFoundError:
            pass
    t2 = time.perf_counter()
    print(f"{t1 - t0:.6f} {t2 - t1:.6f} {found} {bad}")


def readdir(d):
    t0 = time.perf_counter()
    n = len(os.listdir(d))
    print(n, f"{time.perf_counter() - t0:.6f}")


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


def daemon_pid(mnt):
    """The FUSE daemon serving MNT (what `pgrep -f MNT` finds, narrowed to the
    process holding /dev/fuse)."""
    want = {mnt, os.path.realpath(mnt)}
    me = os.getpid()
    found = []
    for e in os.listdir("/proc"):
        if not e.isdigit() or int(e) == me:
            continue
        try:
            with open(f"/proc/{e}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            if not any(a.decode(errors="replace") in want for a in args):
                continue
            fds = f"/proc/{e}/fd"
            if any(os.readlink(os.path.join(fds, fd)) == "/dev/fuse" for fd in os.listdir(fds)):
                found.append(int(e))
        except OSError:
            continue
    if found:
        print(min(found))


def fio_iops(path):
    with open(path) as f:
        text = f.read()
    doc = json.loads(text[text.index("{"):])  # fio may print notes before the JSON
    job = doc["jobs"][0]
    print(f"{job['read']['iops'] + job['write']['iops']:.1f}")


# (key, label, unit) in table order. Units: s and ms are times (lower is
# better), iops is higher-is-better, mib a size (lower is better). The labels
# say whether the caches were cold.
WORKLOADS = [
    ("find_warm", "`find` of the whole tree ({tree} entries, 10 layers) [warm: 2nd run on the mount]", "s"),
    ("ls_warm", "`ls -lR` of the whole tree [warm: 2nd run on the mount]", "s"),
    ("find_cold", "`find` of the whole tree [cold]", "s"),
    ("ls_cold", "`ls -lR` of the whole tree [cold, fresh mount]", "s"),
    ("lookup_hit", "lstat {lookups} existing names in a dir merged from {stack} layers [fresh mount]", "ms"),
    ("lookup_miss", "lstat {lookups} missing names in that dir [fresh mount]", "ms"),
    ("readdir_stack", "readdir of that dir ({lookups} entries, {stack} layers) [fresh mount]", "ms"),
    ("untar", "untar {create} small files (tar x) [warm]", "s"),
    ("rm", "`rm -rf` of them [warm]", "s"),
    ("fio_randread", "fio 4k random read, {fio} file in the mount, psync QD1 buffered, warm page cache, {fio_secs} s (IOPS)", "iops"),
    ("fio_randwrite", "fio 4k random write, same file (IOPS)", "iops"),
    ("read", "sequential read {read} lower file (dd bs=1M) [cold]", "s"),
    ("cp_a", "`cp -a` of /usr/share/doc ({doc}, lower layer) to a dir in the mount [cold]", "s"),
    ("tar_c", "`tar c` of that copy (to a pipe) [cold]", "s"),
    ("rm_lower", "`rm -rf` of /usr/share/doc's copy in the lower layer (a whiteout per entry) [warm]", "s"),
    ("mount", "mount of the 10-layer stack (until the mountpoint is live) [cold]", "ms"),
    ("mount_stack", "mount of the {stack}-layer stack", "ms"),
    ("umount", "umount of the 10-layer stack ({umount_after})", "ms"),
    ("rss", "FUSE daemon peak RSS during the walks (VmHWM, reset after mount; max over the find and ls -lR mounts, cold + warm), MiB", "mib"),
    ("copyup", "copy-up {big} lower file (append 1 byte) [cold]", "s"),
    ("copyup_sync", "`sync` right after that copy-up", "s"),
    ("copyup_total", "copy-up + sync", "s"),
    ("trunc", "O_TRUNC open of {big} lower file (: > f) [cold]", "s"),
    ("unlink", "unlink {big} lower file (rm f) [cold]", "s"),
]
UNITS = {"s": (1.0, "{:.3f}"), "ms": (1e3, "{:.1f}"), "iops": (1.0, "{:.0f}"), "mib": (1.0, "{:.1f}")}


def read_counts(path):
    counts = {}  # (fs, rep, key) -> value
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 4:
                counts[(parts[0], parts[1], parts[2])] = parts[3]
    return counts


def count_mismatches(path):
    counts = read_counts(path)
    ref = {}
    for (fs, rep, key), v in sorted(counts.items()):
        if fs == "kernel":
            ref.setdefault(key, v)
    out = []
    for (fs, rep, key), v in sorted(counts.items()):
        if key not in ref:
            out.append(f"{fs} rep {rep}: {key} = {v}, but the kernel has no {key} count")
        elif v != ref[key]:
            out.append(f"{fs} rep {rep}: {key} = {v}, kernel: {ref[key]}")
    return out


def checkcounts(path):
    for m in count_mismatches(path):
        print(m)


def report(results, counts, *fss):
    # results: lines "fs rep workload value"; params: "# key value" lines
    data = {}  # (fs, wl) -> {rep: value}
    params = {}
    with open(results) as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "#":
                params[parts[1]] = " ".join(parts[2:])
                continue
            fs, rep, wl, value = parts
            data.setdefault((fs, wl), {})[rep] = float(value)

    def med(fs, wl):
        v = data.get((fs, wl))
        return statistics.median(v.values()) if v else None

    def ratio(a, b, wl, unit):
        """Median over rounds of the per-round cost ratio a/b (b/a for IOPS)."""
        va, vb = data.get((a, wl), {}), data.get((b, wl), {})
        rs = []
        for rep in va.keys() & vb.keys():
            x, y = (vb[rep], va[rep]) if unit == "iops" else (va[rep], vb[rep])
            if y > 0:
                rs.append(x / y)
        return f"{statistics.median(rs):.2f}" if rs else "n/a"

    def fmt(x, unit):
        scale, f = UNITS[unit]
        return "n/a" if x is None else f.format(x * scale)

    dev = "strata-devfuse" in fss
    if dev:
        print(
            "| workload | kernel | fuse-overlayfs | strata | strata /dev/fuse | fo/kernel "
            "| strata/kernel | strata/fo | strata /dev/fuse / kernel |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    else:
        print("| workload | kernel | fuse-overlayfs | strata | fo/kernel | strata/kernel | strata/fo |")
        print("|---|---:|---:|---:|---:|---:|---:|")
    for key, label, unit in WORKLOADS:
        if not any((fs, key) in data for fs in fss):
            continue  # not selected (BENCH_ONLY)
        k, fo, st, sd = (med(fs, key) for fs in ("kernel", "fuse-overlayfs", "strata", "strata-devfuse"))
        try:
            label = label.format(**params)
        except KeyError:
            pass
        unit_note = {"s": " (s)", "ms": " (ms)"}.get(unit, "")
        values = f"| {fmt(k, unit)} | {fmt(fo, unit)} | {fmt(st, unit)} "
        if dev:
            values += f"| {fmt(sd, unit)} "
        ratios = (
            f"| {ratio('fuse-overlayfs', 'kernel', key, unit)} | {ratio('strata', 'kernel', key, unit)} "
            f"| {ratio('strata', 'fuse-overlayfs', key, unit)} |"
        )
        if dev:
            ratios += f" {ratio('strata-devfuse', 'kernel', key, unit)} |"
        print(f"| {label}{unit_note} {values}{ratios}")
    reps = {fs: max((len(v) for (f, _), v in data.items() if f == fs), default=0) for fs in fss}
    print()
    print(
        "Values: medians per filesystem ("
        + ", ".join(f"{fs}: {n} rep(s)" for fs, n in reps.items())
        + "). Ratio columns: median over rounds of the per-round ratio, as a cost: "
        "time (or RSS) x / time y, and for IOPS rows y_iops / x_iops, so above 1 is "
        "always slower (or bigger) than the reference."
    )
    bad = count_mismatches(counts)
    if bad:
        print()
        print("**WARNING: the filesystems did not see the same trees (counts differ from the kernel's):**")
        print()
        for m in bad:
            print(f"- {m}")


def main():
    cmds = {
        "mklayers": mklayers,
        "mkstack": mkstack,
        "mktar": mktar,
        "lookups": lookups,
        "readdir": readdir,
        "daemon-pid": daemon_pid,
        "fio-iops": fio_iops,
        "report": report,
        "checkcounts": checkcounts,
    }
    if len(sys.argv) < 2 or sys.argv[1] not in cmds:
        sys.exit(__doc__)
    cmds[sys.argv[1]](*sys.argv[2:])


if __name__ == "__main__":
    main()
