#!/usr/bin/env python3
"""vdtool against qemu-img, on the same workloads, in alternation.

    python3 bench/bench.py [--size 1G] [--runs 5] [--work DIR] [--only NAME ...]

Builds a workload (half random data in 1 MiB runs, a quarter written zeros,
a quarter holes), then times each case as a whole process, vdtool and
qemu-img taking turns (A B A B ...), after one warm-up pair.  Prints the
median wall time of each, the median of the per-pair ratios vdtool/qemu-img,
and each side's peak RSS.  Needs qemu-img on PATH; runs vdtool as
``python -m vdtool`` with the interpreter running this script."""

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


def compare(name: str, vd_cmd: list, qemu_cmd: list, runs: int, setup=None) -> dict:
    def one(cmd):
        if setup:
            setup()
        return run_once(cmd)

    one(vd_cmd)
    one(qemu_cmd)  # warm-up pair
    vd, qm, ratios = [], [], []
    for _ in range(runs):
        a = one(vd_cmd)
        b = one(qemu_cmd)
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
    print(f"{name:<34} {row['vdtool_s']:8.3f} s {row['qemu_s']:8.3f} s {row['ratio']:7.2f}x "
          f"{row['vdtool_rss_mib']:7.1f} MiB {row['qemu_rss_mib']:7.1f} MiB", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="workload size (default 1G)")
    ap.add_argument("--runs", type=int, default=5, help="counted runs per side (default 5)")
    ap.add_argument("--work", default=os.path.join(HERE, "work"), help="scratch folder (default bench/work)")
    ap.add_argument("--only", nargs="*", help="run only cases whose name contains one of these words")
    args = ap.parse_args()
    qemu = shutil.which("qemu-img")
    if not qemu:
        raise SystemExit("qemu-img is needed (apt-get install qemu-utils)")
    size = parse_size(args.size)
    os.makedirs(args.work, exist_ok=True)
    w = lambda name: os.path.join(args.work, name)  # noqa: E731
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    os.environ.update(env)
    vd = [sys.executable, "-m", "vdtool"]

    raw = w("workload.raw")
    print(f"workload: {raw} ({size >> 20} MiB: half random data, a quarter zeros, a quarter holes)", flush=True)
    make_workload(raw, size)
    subprocess.run([qemu, "convert", "-O", "qcow2", raw, w("src.qcow2")], check=True)
    if not os.path.exists(w("empty-1T.qcow2")):
        subprocess.run([qemu, "create", "-q", "-f", "qcow2", w("empty-1T.qcow2"), "1T"], check=True)

    def rm(*names):
        def go():
            for n in names:
                try:
                    os.unlink(w(n))
                except FileNotFoundError:
                    pass
        return go

    cases = [
        ("convert raw->qcow2", vd + ["convert", "-q", "-O", "qcow2", raw, w("vd.qcow2")],
         [qemu, "convert", "-O", "qcow2", raw, w("qm.qcow2")], rm("vd.qcow2", "qm.qcow2")),
        ("convert qcow2->raw", vd + ["convert", "-q", "-O", "raw", w("src.qcow2"), w("vd.raw")],
         [qemu, "convert", "-O", "raw", w("src.qcow2"), w("qm.raw")], rm("vd.raw", "qm.raw")),
        ("convert raw->qcow2 -c", vd + ["convert", "-q", "-c", "-O", "qcow2", raw, w("vdc.qcow2")],
         [qemu, "convert", "-c", "-O", "qcow2", raw, w("qmc.qcow2")], rm("vdc.qcow2", "qmc.qcow2")),
        ("info 1 TiB empty qcow2", vd + ["info", w("empty-1T.qcow2")], [qemu, "info", w("empty-1T.qcow2")], None),
        ("check converted qcow2", vd + ["check", w("src.qcow2")], [qemu, "check", w("src.qcow2")], None),
    ]
    print(f"{'case':<34} {'vdtool':>10} {'qemu-img':>10} {'ratio':>8} {'vd RSS':>11} {'qemu RSS':>11}")
    rows = []
    for name, a, b, setup in cases:
        if args.only and not any(word in name for word in args.only):
            continue
        rows.append(compare(name, a, b, args.runs, setup))
    for n in ("vd.qcow2", "qm.qcow2", "vd.raw", "qm.raw", "vdc.qcow2", "qmc.qcow2"):
        try:
            os.unlink(w(n))
        except FileNotFoundError:
            pass
    print("(medians of interleaved runs; ratio = median of per-pair vdtool/qemu-img wall-time ratios)")


if __name__ == "__main__":
    main()
