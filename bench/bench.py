#!/usr/bin/env python3
"""vdtool against qemu-img, on the same workloads, in alternation.

    python3 bench/bench.py [--size 1G] [--runs 5] [--work DIR] [--only WORD ...]

Builds a workload (half random data in 1 MiB runs, a quarter written zeros,
a quarter holes) and the images made from it, then times each case as a
whole process, vdtool and qemu-img taking turns (A B A B ...), after one
warm-up pair.  Prints the median wall time of each, the median of the
per-pair ratios vdtool/qemu-img, and each side's peak RSS.

Cases: convert raw->qcow2, raw->vdi, raw->vmdk, raw->vhd, qcow2->raw,
vmdk->qcow2, raw->streamOptimized vmdk, raw->qcow2 -c; info on a 1 TiB
qcow2 (start-up; the row "python -c pass" is the interpreter's own
start-up, same environment); check on a 4 GiB qcow2 with 4 KiB clusters
and preallocation=metadata (a million clusters); convert of a 100 GiB
sparse raw image (peak memory); convert and check of empty 64 TiB qcow2,
VMDK and VDI and 2040 GiB VHD images (vdtool alone: qemu-img needs minutes
on the VMDK); checksum of the workload's qcow2 and raw images (xxh3-128,
and sha256) against sha256sum of the raw file (in the qemu-img column:
qemu-img has no checksum).  ``--only`` keeps the cases whose name
contains one of the words (``--only convert``, ``--only -c stream``).

Needs qemu-img on PATH; runs vdtool as ``python -m vdtool`` with the
interpreter running this script.  The environment of this checkout sets
PYTHONDONTWRITEBYTECODE, which would make every vdtool run compile its
sources (~45 ms); an installed vdtool has its bytecode, so the bench lets
Python cache it under WORK/pycache (PYTHONPYCACHEPREFIX)."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MiB = 1 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().rstrip("B").rstrip("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def make_workload(path: str, size: int) -> None:
    """Per 4 MiB: two 1 MiB runs of random data, 1 MiB of written zeros,
    1 MiB left as a hole; the order inside each group is shuffled
    (seeded) so no format gets a lucky regular pattern."""
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    rng = random.Random(1234)
    zeros = bytes(MiB)
    with open(path, "wb") as f:
        f.truncate(size)
        for group in range(0, size, 4 * MiB):
            kinds = ["data", "data", "zero", "hole"]
            rng.shuffle(kinds)
            for i, kind in enumerate(kinds):
                off = group + i * MiB
                if off >= size:
                    break
                if kind == "data":
                    f.seek(off)
                    f.write(rng.randbytes(MiB))
                elif kind == "zero":
                    f.seek(off)
                    f.write(zeros)


def run_once(cmd: list, env=None) -> tuple:
    """(wall seconds, peak RSS KiB) of one whole process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 3):
        raise SystemExit(f"command failed ({code}): {' '.join(cmd)}\n{err}")
    return wall, rusage.ru_maxrss


def compare(name: str, vd_cmd: list, qemu_cmd: list, runs: int, setup=None, baseline=None) -> dict:
    """Interleaved runs of the two commands (and of ``baseline``, a third
    command whose median is reported beside them, when given)."""
    def one(cmd):
        if setup:
            setup()
        return run_once(cmd)

    one(vd_cmd)
    one(qemu_cmd)  # warm-up pair
    vd, qm, base, ratios = [], [], [], []
    for _ in range(runs):
        a = one(vd_cmd)
        b = one(qemu_cmd)
        if baseline:
            base.append(run_once(baseline)[0])
        vd.append(a)
        qm.append(b)
        ratios.append(a[0] / b[0] if b[0] > 0 else float("inf"))
    row = {
        "case": name,
        "vdtool_s": statistics.median(x[0] for x in vd),
        "qemu_s": statistics.median(x[0] for x in qm),
        "ratio": statistics.median(ratios),
        "vdtool_rss_mib": max(x[1] for x in vd) / 1024,
        "qemu_rss_mib": max(x[1] for x in qm) / 1024,
    }
    print(f"{name:<40} {row['vdtool_s']:8.3f} s {row['qemu_s']:8.3f} s {row['ratio']:7.2f}x "
          f"{row['vdtool_rss_mib']:7.1f} MiB {row['qemu_rss_mib']:7.1f} MiB", flush=True)
    if baseline:
        row["baseline_s"] = statistics.median(base)
        extra = (row["vdtool_s"] - row["baseline_s"]) * 1000
        print(f"{'  python -c pass':<40} {row['baseline_s']:8.3f} s   (vdtool info: {extra:+.0f} ms over it)",
              flush=True)
    return row


def solo(name: str, cmd: list, runs: int, setup=None) -> dict:
    """vdtool alone (qemu-img takes minutes on some of these: 64 s to check
    the 64 TiB VMDK, more than ten to convert it)."""
    times = []
    for k in range(runs + 1):
        if setup:
            setup()
        t, _ = run_once(cmd)
        if k:  # the first run warms the caches
            times.append(t)
    row = {"case": name, "vdtool_s": statistics.median(times)}
    print(f"{name:<40} {row['vdtool_s']:8.3f} s   (target: well under 1 s)", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="workload size (default 1G)")
    ap.add_argument("--runs", type=int, default=5, help="counted runs per side (default 5)")
    ap.add_argument("--work", default=os.path.join(HERE, "work"), help="scratch folder (default bench/work)")
    ap.add_argument("--only", nargs="*", help="run only cases whose name contains one of these words")
    ap.add_argument("--markdown", action="store_true", help="also print the results as a Markdown table")
    args = ap.parse_args()
    qemu = shutil.which("qemu-img")
    if not qemu:
        raise SystemExit("qemu-img is needed (apt-get install qemu-utils)")
    size = parse_size(args.size)
    os.makedirs(args.work, exist_ok=True)
    w = lambda name: os.path.join(args.work, name)  # noqa: E731
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONPYCACHEPREFIX=w("pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ.clear()
    os.environ.update(env)
    vd = [sys.executable, "-m", "vdtool"]

    def wanted(name):
        return not args.only or any(word in name for word in args.only)

    def made(name, cmd):
        """Build an input image once per workload size (qemu-img makes them)."""
        path = w(name)
        stamp = path + ".size"
        if os.path.exists(path) and os.path.exists(stamp) and open(stamp).read() == str(size):
            return path
        for p in (path, stamp):
            if os.path.exists(p):
                os.unlink(p)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(stamp, "w") as f:
            f.write(str(size))
        return path

    raw = w("workload.raw")
    print(f"workload: {raw} ({size >> 20} MiB: half random data, a quarter zeros, a quarter holes)", flush=True)
    make_workload(raw, size)
    src_qcow2 = made("src.qcow2", [qemu, "convert", "-O", "qcow2", raw, w("src.qcow2")])
    src_vmdk = made("src.vmdk", [qemu, "convert", "-O", "vmdk", raw, w("src.vmdk")]) \
        if wanted("convert vmdk->qcow2") else None
    if not os.path.exists(w("empty-1T.qcow2")):
        subprocess.run([qemu, "create", "-q", "-f", "qcow2", w("empty-1T.qcow2"), "1T"], check=True)
    if wanted("check 4 KiB-cluster qcow2") and not os.path.exists(w("meta-4G.qcow2")):
        subprocess.run([qemu, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,preallocation=metadata",
                        w("meta-4G.qcow2"), "4G"], check=True)
    if wanted("convert 100 GiB sparse raw->qcow2 (memory)") and not os.path.exists(w("sparse-100G.raw")):
        with open(w("sparse-100G.raw"), "wb") as f:  # 100 GiB, 64 MiB of data spread over it
            f.truncate(100 << 30)
            rng = random.Random(99)
            for i in range(64):
                f.seek(i * (100 << 30) // 64)
                f.write(rng.randbytes(MiB))

    scale = {}
    if wanted("64 TiB"):
        # empty images at the largest sizes the formats allow (VHD stops at 2040 GiB)
        for name, fmt, size_arg in (("empty-64T.qcow2", "qcow2", "64T"), ("empty-64T.vmdk", "vmdk", "64T"),
                                    ("empty-2040G.vhd", "vpc", "2040G"), ("empty-64T.vdi", "vdi", "64T")):
            if not os.path.exists(w(name)):
                subprocess.run([qemu, "create", "-q", "-f", fmt, w(name), size_arg], check=True)
            scale[name] = w(name)

    outputs = []

    def rm(*names):
        outputs.extend(names)

        def go():
            for n in names:
                try:
                    os.unlink(w(n))
                except FileNotFoundError:
                    pass
        return go

    def conv(label, src, ext, vd_opts, qm_opts):
        a, b = f"vd-{label}.{ext}", f"qm-{label}.{ext}"
        return (f"convert {label}", vd + ["convert", "-q"] + vd_opts + [src, w(a)],
                [qemu, "convert"] + qm_opts + [src, w(b)], rm(a, b))

    cases = [
        conv("raw->qcow2", raw, "qcow2", ["-O", "qcow2"], ["-O", "qcow2"]),
        conv("raw->vdi", raw, "vdi", ["-O", "vdi"], ["-O", "vdi"]),
        conv("raw->vmdk", raw, "vmdk", ["-O", "vmdk"], ["-O", "vmdk"]),
        conv("raw->vhd", raw, "vhd", ["-O", "vhd"], ["-O", "vpc"]),
        conv("qcow2->raw", src_qcow2, "raw", ["-O", "raw"], ["-O", "raw"]),
        conv("vmdk->qcow2", src_vmdk, "qcow2", ["-O", "qcow2"], ["-O", "qcow2"]),
        conv("raw->streamOptimized vmdk", raw, "vmdk", ["-O", "vmdk", "--variant", "streamOptimized"],
             ["-O", "vmdk", "-o", "subformat=streamOptimized"]),
        conv("raw->qcow2 -c", raw, "qcow2", ["-c", "-O", "qcow2"], ["-c", "-O", "qcow2"]),
        ("info 1 TiB qcow2 (start-up)", vd + ["info", w("empty-1T.qcow2")], [qemu, "info", w("empty-1T.qcow2")],
         None, [sys.executable, "-c", "pass"]),
        ("check 4 KiB-cluster qcow2 (1M clusters)", vd + ["check", w("meta-4G.qcow2")],
         [qemu, "check", w("meta-4G.qcow2")], None),
        conv("100 GiB sparse raw->qcow2 (memory)", w("sparse-100G.raw"), "qcow2", ["-O", "qcow2"], ["-O", "qcow2"]),
        # the other side is sha256sum of the raw file, not qemu-img (which has no checksum)
        ("checksum qcow2 (vs sha256sum raw)", vd + ["checksum", src_qcow2], ["sha256sum", raw], None),
        ("checksum raw (vs sha256sum raw)", vd + ["checksum", raw], ["sha256sum", raw], None),
        ("checksum -a sha256 qcow2 (vs sha256sum raw)", vd + ["checksum", "-a", "sha256", src_qcow2],
         ["sha256sum", raw], None),
    ]
    solos = []
    for name, path in scale.items():
        label = name.split(".")[0].replace("empty-", "").replace("T", " TiB").replace("G", " GiB")
        fmt = name.split(".")[1]
        out = f"vd-scale-{fmt}.qcow2"
        solos.append((f"convert empty {label} {fmt}->qcow2", vd + ["convert", "-q", path, w(out)], rm(out)))
        solos.append((f"check empty {label} {fmt}", vd + ["check", path], None))
    print(f"{'case':<40} {'vdtool':>10} {'qemu-img':>10} {'ratio':>8} {'vd RSS':>11} {'qemu RSS':>11}")
    rows = []
    try:
        for name, a, b, setup, *base in cases:
            if not wanted(name):
                continue
            rows.append(compare(name, a, b, args.runs, setup, base[0] if base else None))
        for name, cmd, setup in solos:
            rows.append(solo(name, cmd, args.runs, setup))
    finally:
        for n in outputs:
            try:
                os.unlink(w(n))
            except FileNotFoundError:
                pass
    print("(medians of interleaved runs; ratio = median of per-pair vdtool/qemu-img wall-time ratios)")
    if args.markdown:
        print()
        print("| case | vdtool | qemu-img | ratio | vdtool peak RSS | qemu-img peak RSS |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            if "qemu_s" not in r:
                print(f"| {r['case']} | {r['vdtool_s']:.3f} s | (not run) | | | |")
                continue
            print(f"| {r['case']} | {r['vdtool_s']:.3f} s | {r['qemu_s']:.3f} s | {r['ratio']:.2f}x "
                  f"| {r['vdtool_rss_mib']:.0f} MiB | {r['qemu_rss_mib']:.0f} MiB |")
            if "baseline_s" in r:
                print(f"| python -c pass | {r['baseline_s']:.3f} s | | | | |")


if __name__ == "__main__":
    main()
