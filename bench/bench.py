#!/usr/bin/env python3
"""vdtool against qemu-img (and cp, sha256sum), on the same workloads, in turns.

    python3 bench/bench.py [--size 4G] [--runs 3] [--only WORD ...] [--markdown] [--json FILE]
    python3 bench/bench.py --estimate          # list the cases, their targets and the time it would take

Two workloads of --size bytes (default 4 GiB), per 4 MiB two 1 MiB runs of
data, 1 MiB of written zeros and 1 MiB of hole, in a seeded shuffled order:
``workload.raw`` holds random data (for the uncompressed cases),
``text.raw`` text-like data (log lines of words from a fixed vocabulary;
for the compressed cases).  Input images are made from them by qemu-img.

Each case runs its commands as whole processes in turns (A B C A B C ...),
after one warm-up round (long cases warm the page cache by reading their
inputs instead).  Before every timed run the case's previous outputs are
removed (a fresh output file) and os.sync() runs; neither is timed
(``--no-sync`` skips the sync, for quick iterations).  A case gives one or
more rows, each vdtool run against one other command: medians of each,
the median of the per-round ratios, both peak RSS, the row's target from
issue 17 and whether it is met (the time target, and vdtool's peak RSS
under 100 MiB in every row).

Cases: uncompressed converts raw->qcow2/vdi/vmdk/vhd, qcow2->raw,
vmdk->qcow2, raw->raw (also against ``cp --sparse=always``); compressing
converts of the text workload (raw->qcow2 -c, raw->streamOptimized VMDK) and
decompressing ones (qcow2 -c -> raw, streamOptimized -> qcow2); standard
output streaming (``vdtool convert -O FMT SRC - | cat > file``) for raw,
qcow2, vhd and streamOptimized VMDK, against vdtool and qemu-img writing the
same format to a file; checksum of the workload (raw and qcow2, xxh3-128 and
sha256) against ``sha256sum`` of the raw file; check and info of qcow2, VDI,
VMDK and VHD images of the workload; info of an empty 1 TiB qcow2
(start-up, also against ``python -c pass``); check of a 4 GiB qcow2 with
4 KiB clusters (a million clusters); convert of a 100 GiB sparse raw image
(peak memory); convert and check of empty 64 TiB qcow2, VMDK and VDI and
2040 GiB VHD images (vdtool alone: qemu-img needs minutes on the VMDK).
``--only`` keeps the cases whose name, or one of whose rows' names,
contains one of the words (``--only convert``, ``--only=-c --only stdout``).

Needs qemu-img on PATH; runs vdtool as ``python -m vdtool`` with the
interpreter running this script.  The environment of this checkout sets
PYTHONDONTWRITEBYTECODE, which would make every vdtool run compile its
sources (~45 ms); an installed vdtool has its bytecode, so the bench lets
Python cache it under WORK/pycache (PYTHONPYCACHEPREFIX)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MiB = 1 << 20
GiB = 1 << 30
RSS_LIMIT_MIB = 100  # issue 17: peak RSS under 100 MiB in every case
LONG_RUN_S = 20.0  # cases estimated longer than this per round skip the warm-up round
SYNC_COST_S = 0.5  # estimated cost of the untimed removal and sync before each run
INPUTS_VERSION = "2"  # bump when a workload or input image changes shape


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().rstrip("B").rstrip("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def size_label(size: int) -> str:
    return f"{size / GiB:g} GiB" if size >= GiB else f"{size / MiB:g} MiB"


# ---------------------------------------------------------------- workloads

def write_workload(path: str, size: int, seed: int, make_data, what: str) -> None:
    """Per 4 MiB: two 1 MiB runs of data (from the function ``make_data()``
    returns, given the RNG), 1 MiB of written zeros, 1 MiB left as a hole;
    the order inside each group is shuffled (seeded) so no format gets a
    lucky regular pattern.  Kept when already made at this size."""
    stamp = path + ".size"
    if os.path.exists(path) and os.path.getsize(path) == size and _stamp_ok(stamp, size):
        return
    print(f"  making {path} ({what})", file=sys.stderr, flush=True)
    data = make_data()
    rng = random.Random(seed)
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
                if kind != "hole":
                    f.seek(off)
                    f.write(data(rng)[:size - off] if kind == "data" else zeros[:size - off])
    _write_stamp(stamp, size)


MAKE_WORKLOAD = "--make-workload"  # internal: python3 bench.py --make-workload random|text PATH SIZE


def make_workload_main(kind: str, path: str, size: int) -> None:
    if kind == "random":
        write_workload(path, size, 1234, lambda: random_run, "random data")
    else:
        write_workload(path, size, 4321, text_runs, "text-like data")


def random_run(rng: random.Random) -> bytes:
    return rng.randbytes(MiB)


def text_pool(seed: int = 42, size: int = 8 * MiB) -> bytes:
    """A few MiB of log-like lines: words of a 32768-word vocabulary drawn
    with Zipf-like weights, timestamps, hosts, ids.  64 KiB pieces of it
    deflate (4 KiB window, level 6, as qcow2 -c) to about 0.53 of their size."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    letter_weights = [12, 9, 8, 7, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1]
    vocab = ["".join(rng.choices(letters, letter_weights, k=rng.randint(2, 10))) for _ in range(32768)]
    cum, acc = [], 0.0
    for i in range(len(vocab)):
        acc += (i + 1) ** -0.75
        cum.append(acc)
    services = [rng.choice(vocab) + "d" for _ in range(24)]
    levels = ["INFO"] * 12 + ["DEBUG"] * 6 + ["WARN"] * 2 + ["ERROR"]
    lines, n = [], 0
    while n < size:
        words = " ".join(rng.choices(vocab, cum_weights=cum, k=rng.randint(4, 16)))
        line = (f"2026-11-{rng.randint(1, 30):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
                f"{rng.randint(0, 59):02d}.{rng.randint(0, 999):03d}Z host{rng.randint(0, 63):02d} "
                f"{rng.choice(services)}[{rng.randint(100, 65535)}]: {rng.choice(levels)} {words} "
                f"id={rng.getrandbits(64):016x} n={rng.randint(0, 10 ** 6)}\n")
        lines.append(line)
        n += len(line)
    return "".join(lines).encode()


def text_runs():
    """A ``data(rng)`` for write_workload: each 1 MiB run is stitched from
    16 pieces of 64 KiB taken at random (unaligned) offsets of one pool,
    so building gigabytes costs no more than building the pool."""
    pool = text_pool()
    piece = 64 << 10

    def run(rng: random.Random) -> bytes:
        return b"".join(pool[o:o + piece] for o in (rng.randrange(len(pool) - piece) for _ in range(MiB // piece)))
    return run


def _stamp_ok(stamp: str, size: int) -> bool:
    try:
        with open(stamp) as f:
            return f.read() == f"{size} v{INPUTS_VERSION}"
    except OSError:
        return False


def _write_stamp(stamp: str, size: int) -> None:
    with open(stamp, "w") as f:
        f.write(f"{size} v{INPUTS_VERSION}")


def read_data(paths) -> None:
    """Pull the data parts of files into the page cache (holes skipped)."""
    for path in paths:
        with open(path, "rb") as f:
            fd, end, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
            while pos < end:
                try:
                    pos = os.lseek(fd, pos, os.SEEK_DATA)
                    hole = os.lseek(fd, pos, os.SEEK_HOLE)
                except OSError:  # no data after pos
                    break
                while pos < hole:
                    got = os.pread(fd, min(MiB, hole - pos), pos)
                    if not got:
                        break
                    pos += len(got)


# ---------------------------------------------------------------- cases

@dataclass
class Side:
    """One command of a case.  ``cmd`` is an argv, or a list of argvs run as
    a pipeline whose last stage writes ``out`` (as ``a | b > out``)."""
    label: str
    cmd: list
    out: str | None = None
    pipe: bool = False
    codes: tuple = (0, 3)
    est: tuple = (0.1, 0.0)  # estimated seconds: fixed, and per GiB of workload


@dataclass
class Target:
    kind: str  # "ratio" (a/b at most value), "plus_ms" (a at most b + value ms), "rss", "abs" (a under value s)
    value: float = 0.0
    text: str = ""

    def label(self) -> str:
        if self.text:
            return self.text
        if self.kind == "ratio":
            s = f"{self.value:.2f}"
            return f"<={s if float(s) == self.value else f'{self.value:.3f}'}x"
        if self.kind == "plus_ms":
            return f"<=+{self.value:g} ms"
        if self.kind == "abs":
            return f"<{self.value:g} s"
        return f"RSS<{RSS_LIMIT_MIB}MiB"

    def met(self, row: dict) -> bool:
        if self.kind == "ratio":
            return row["ratio"] <= self.value
        if self.kind == "plus_ms":
            return row["diff_ms"] <= self.value
        if self.kind == "abs":
            return row["vdtool_s"] < self.value
        return True  # "rss": the RSS test below applies to every row


@dataclass
class Case:
    name: str
    sides: list
    rows: list  # (row name, index of the vdtool side, index of the other side, Target[, label of the other])
    needs: list = field(default_factory=list)  # input builders, run before the case
    reads: list = field(default_factory=list)  # input paths a long case reads into the cache instead of warming up
    solo: bool = False

    def names(self):
        return [self.name] + [r[0] for r in self.rows]

    def round_estimate(self, gib: float) -> float:
        return sum(s.est[0] + s.est[1] * gib + SYNC_COST_S for s in self.sides)


def run_side(side: Side) -> tuple:
    """(wall seconds, peak RSS KiB) of one run of a side, all processes included."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        if side.pipe:
            results = _run_pipeline(side.cmd, side.out, err)
        else:
            proc = subprocess.Popen(side.cmd, stdout=subprocess.DEVNULL, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            results = [(proc.args, proc.returncode, usage.ru_maxrss)]
        wall = time.perf_counter() - start
        for argv, code, _ in results:
            if code not in side.codes:
                err.seek(0)
                raise SystemExit(f"command failed ({code}): {' '.join(argv)}\n"
                                 f"{err.read().decode(errors='replace')}")
    return wall, max(r[2] for r in results)


def _run_pipeline(cmds: list, out: str, err) -> list:
    """Run ``cmds[0] | cmds[1] | ... > out``; the exit status of every stage
    is returned (as the shell's pipefail would judge them)."""
    procs = []
    with open(out, "wb") as sink:
        prev = None
        for i, argv in enumerate(cmds):
            last = i == len(cmds) - 1
            p = subprocess.Popen(argv, stdin=prev or subprocess.DEVNULL,
                                 stdout=sink if last else subprocess.PIPE, stderr=err)
            if prev is not None:
                prev.close()
            prev = p.stdout
            procs.append(p)
    results = []
    for p in procs:
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        results.append((p.args, p.returncode, usage.ru_maxrss))
    return results


def remove(paths) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def measure(case: Case, runs: int, warmup: int, sync: bool) -> list:
    """Run the case's sides in turns; returns its rows."""
    outs = [s.out for s in case.sides if s.out]

    def one(side):
        remove(outs)  # a fresh output file, and nothing dirty left behind
        if sync:
            os.sync()
        return run_side(side)

    times = [[] for _ in case.sides]
    try:
        for k in range(warmup + runs):
            for i, side in enumerate(case.sides):
                got = one(side)
                if k >= warmup:
                    times[i].append(got)
    finally:  # outputs of gigabytes are not left behind, even on an error or ^C
        remove(outs)
    rows = []
    for name, a, b, target, *vs in case.rows:
        ta, tb = times[a], times[b]
        row = {
            "case": name, "vs": vs[0] if vs else case.sides[b].label,
            "vdtool_s": statistics.median(x[0] for x in ta),
            "other_s": statistics.median(x[0] for x in tb),
            "ratio": statistics.median(x[0] / y[0] if y[0] > 0 else float("inf") for x, y in zip(ta, tb)),
            "diff_ms": statistics.median((x[0] - y[0]) * 1000 for x, y in zip(ta, tb)),
            "vdtool_rss_mib": max(x[1] for x in ta) / 1024,
            "other_rss_mib": max(x[1] for x in tb) / 1024,
            "target": target.label(), "runs": runs,
        }
        judge(row, target)
        rows.append(row)
    return rows


def measure_solo(case: Case, runs: int, sync: bool) -> list:
    """vdtool alone (qemu-img takes minutes on some of these: 64 s to check
    the 64 TiB VMDK, more than ten to convert it); the first run warms the caches."""
    side = case.sides[0]
    got, outs = [], [side.out] if side.out else []
    try:
        for k in range(runs + 1):
            remove(outs)
            if sync:
                os.sync()
            t = run_side(side)
            if k:
                got.append(t)
    finally:
        remove(outs)
    name, _, _, target = case.rows[0][:4]
    row = {"case": name, "vs": "", "vdtool_s": statistics.median(x[0] for x in got),
           "vdtool_rss_mib": max(x[1] for x in got) / 1024, "target": target.label(), "runs": runs}
    judge(row, target)
    return [row]


def judge(row: dict, target: Target) -> None:
    rss_ok = row["vdtool_rss_mib"] < RSS_LIMIT_MIB
    row["met"] = target.met(row) and rss_ok
    row["met_text"] = "yes" if row["met"] else ("no (RSS)" if target.met(row) else "no")


# ---------------------------------------------------------------- output

HEADER = (f"{'case':<48} {'vdtool':>9} {'vs':<17} {'other':>9} {'ratio':>7} {'diff':>9} "
          f"{'vd RSS':>8} {'other RSS':>9}  {'target':<13} met")


def print_row(r: dict) -> None:
    if "other_s" not in r:
        print(f"{r['case']:<48} {r['vdtool_s']:8.3f}s {'':<17} {'':>9} {'':>7} {'':>9} "
              f"{r['vdtool_rss_mib']:5.0f}MiB {'':>9}  {r['target']:<13} {r['met_text']}", flush=True)
        return
    print(f"{r['case']:<48} {r['vdtool_s']:8.3f}s {r['vs']:<17} {r['other_s']:8.3f}s {r['ratio']:6.2f}x "
          f"{r['diff_ms']:+7.0f}ms {r['vdtool_rss_mib']:5.0f}MiB {r['other_rss_mib']:6.0f}MiB  "
          f"{r['target']:<13} {r['met_text']}", flush=True)


def md(text: str) -> str:
    return text.replace("|", "\\|")


def print_markdown(rows: list) -> None:
    print("| case | vdtool | against | other | ratio | difference | vdtool peak RSS | other peak RSS "
          "| target | met |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        if "other_s" not in r:
            print(f"| {md(r['case'])} | {r['vdtool_s']:.3f} s | | | | | {r['vdtool_rss_mib']:.0f} MiB | "
                  f"| {r['target']} | {r['met_text']} |")
            continue
        print(f"| {md(r['case'])} | {r['vdtool_s']:.3f} s | {md(r['vs'])} | {r['other_s']:.3f} s | {r['ratio']:.2f}x "
              f"| {r['diff_ms']:+.0f} ms | {r['vdtool_rss_mib']:.0f} MiB | {r['other_rss_mib']:.0f} MiB "
              f"| {r['target']} | {r['met_text']} |")


def fmt_duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def tool_version(argv: list) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0] if out else ""
    except (OSError, subprocess.SubprocessError):
        return ""


# ---------------------------------------------------------------- the case list

class Inputs:
    """The input files, each built once per workload size (qemu-img makes the images)."""

    def __init__(self, work: str, size: int, qemu: str):
        self.work, self.size, self.qemu = work, size, qemu
        self.raw, self.text = self.w("workload.raw"), self.w("text.raw")

    def w(self, name: str) -> str:
        return os.path.join(self.work, name)

    def workload(self):
        self._make("random", self.raw)

    def text_workload(self):
        self._make("text", self.text)

    def _make(self, kind: str, path: str):
        """In a child process: Linux carries a process's peak RSS into the
        children it starts, so the bench keeps its own small (the text pool
        would lift every measured peak to ~50 MiB)."""
        if not (os.path.exists(path) and os.path.getsize(path) == self.size and _stamp_ok(path + ".size", self.size)):
            subprocess.run([sys.executable, os.path.abspath(__file__), MAKE_WORKLOAD, kind, path, str(self.size)],
                           check=True)

    def image(self, name: str, src: str, opts: list):
        """A builder of image NAME converted by qemu-img from SRC with OPTS."""
        path = self.w(name)

        def build():
            (self.workload if src == self.raw else self.text_workload)()
            if (os.path.exists(path) and _stamp_ok(path + ".size", self.size)
                    and os.path.getmtime(path) >= os.path.getmtime(src)):
                return
            remove([path, path + ".size"])
            print(f"  making {path} (qemu-img convert {' '.join(opts)})", file=sys.stderr, flush=True)
            subprocess.run([self.qemu, "convert"] + opts + [src, path], check=True, stdout=subprocess.DEVNULL)
            _write_stamp(path + ".size", self.size)
        return path, build

    def created(self, name: str, fmt: str, size_arg: str, opts=()):
        """A builder of an empty image made by qemu-img create."""
        path = self.w(name)

        def build():
            if not os.path.exists(path):
                subprocess.run([self.qemu, "create", "-q", "-f", fmt, *opts, path, size_arg], check=True)
        return path, build

    def sparse_100g(self):
        path = self.w("sparse-100G.raw")

        def build():
            if os.path.exists(path):
                return
            with open(path, "wb") as f:  # 100 GiB, 64 MiB of data spread over it
                f.truncate(100 << 30)
                rng = random.Random(99)
                for i in range(64):
                    f.seek(i * (100 << 30) // 64)
                    f.write(rng.randbytes(MiB))
        return path, build


def build_cases(inp: Inputs, vd: list, qemu: str) -> list:
    raw, text = inp.raw, inp.text
    src_qcow2, mk_qcow2 = inp.image("src.qcow2", raw, ["-O", "qcow2"])
    src_vmdk, mk_vmdk = inp.image("src.vmdk", raw, ["-O", "vmdk"])
    src_vdi, mk_vdi = inp.image("src.vdi", raw, ["-O", "vdi"])
    src_vhd, mk_vhd = inp.image("src.vhd", raw, ["-O", "vpc"])
    comp_qcow2, mk_comp_qcow2 = inp.image("text-c.qcow2", text, ["-c", "-O", "qcow2"])
    comp_vmdk, mk_comp_vmdk = inp.image("text-stream.vmdk", text, ["-O", "vmdk", "-o", "subformat=streamOptimized"])
    S = size_label(inp.size)
    cases = []
    cases += _convert_cases(inp, vd, qemu, src_qcow2, mk_qcow2, src_vmdk, mk_vmdk)
    cases += _compressed_cases(inp, vd, qemu, comp_qcow2, mk_comp_qcow2, comp_vmdk, mk_comp_vmdk)
    gib_sha = 4.0  # sha256sum: 3-4 s per GiB on this machine
    cases.append(Case(f"checksum {S} workload (vs sha256sum of the raw file)", [
        Side("vdtool", vd + ["checksum", src_qcow2], est=(0.1, 0.3)),
        Side("vdtool", vd + ["checksum", raw], est=(0.1, 0.3)),
        Side("vdtool", vd + ["checksum", "-a", "sha256", src_qcow2], est=(0.1, 0.6)),
        Side("sha256sum", ["sha256sum", raw], est=(0.0, gib_sha))], [
        ("checksum qcow2", 0, 3, Target("ratio", 0.25)),
        ("checksum raw", 1, 3, Target("ratio", 0.25)),
        ("checksum -a sha256 qcow2", 2, 3, Target("ratio", 0.25))],
        needs=[inp.workload, mk_qcow2]))
    for fmt, path, build in (("qcow2", src_qcow2, mk_qcow2), ("vdi", src_vdi, mk_vdi),
                             ("vmdk", src_vmdk, mk_vmdk), ("vhd", src_vhd, mk_vhd)):
        # qemu-img has no check for VHD (vpc): it says so and exits 63 after opening the image
        codes = (0, 3, 63) if fmt == "vhd" else (0, 3)
        cases.append(Case(f"check/info {S} {fmt}", [
            Side("qemu-img", [qemu, "check", path], codes=codes), Side("vdtool", vd + ["check", path]),
            Side("qemu-img", [qemu, "info", path]), Side("vdtool", vd + ["info", path])], [
            (f"check {S} {fmt}", 1, 0, Target("plus_ms", 25)),
            (f"info {S} {fmt}", 3, 2, Target("plus_ms", 25))], needs=[build]))
    cases += _fixed_cases(inp, vd, qemu)
    return cases


def _conv(vd, qemu, src, out_vd, out_qm, vd_opts, qm_opts, est_vd=(0.1, 0.45), est_qm=(0.0, 0.3)):
    return [Side("vdtool", vd + ["convert", "-q"] + vd_opts + [src, out_vd], out=out_vd, est=est_vd),
            Side("qemu-img", [qemu, "convert"] + qm_opts + [src, out_qm], out=out_qm, est=est_qm)]


def _stdout_side(vd, src, fmt_opts, out, est=(0.1, 0.7)):
    return Side("vdtool | cat", [vd + ["convert", "-q"] + fmt_opts + [src, "-"], ["cat"]], out=out, pipe=True,
                est=est)


def _stream_rows(fmt: str, file_target: float, pipe_idx: int = 2) -> list:
    """Streaming to stdout: at most 1.1x the same convert to a file (vdtool's),
    and so at most 1.1x the file target against qemu-img's."""
    name = f"stdout {fmt} | cat > file"
    return [(name, pipe_idx, 0, Target("ratio", 1.1, "<=1.10x file"), "vdtool to file"),
            (name, pipe_idx, 1, Target("ratio", round(1.1 * file_target, 3)), "qemu-img to file")]


def _convert_cases(inp, vd, qemu, src_qcow2, mk_qcow2, src_vmdk, mk_vmdk) -> list:
    raw, w = inp.raw, inp.w
    cases = []
    for label, ext, vd_o, qm_o in (("raw->qcow2", "qcow2", ["-O", "qcow2"], ["-O", "qcow2"]),
                                   ("raw->vdi", "vdi", ["-O", "vdi"], ["-O", "vdi"]),
                                   ("raw->vmdk", "vmdk", ["-O", "vmdk"], ["-O", "vmdk"]),
                                   ("raw->vhd", "vhd", ["-O", "vhd"], ["-O", "vpc"])):
        sides = _conv(vd, qemu, raw, w(f"vd-{label}.{ext}"), w(f"qm-{label}.{ext}"), vd_o, qm_o)
        rows = [(f"convert {label}", 0, 1, Target("ratio", 1.0))]
        if ext in ("qcow2", "vhd"):
            sides.append(_stdout_side(vd, raw, vd_o, w(f"pipe-{label}.{ext}")))
            rows += _stream_rows(ext, 1.0)
        cases.append(Case(f"convert {label}", sides, rows, needs=[inp.workload]))
    sides = _conv(vd, qemu, src_qcow2, w("vd-qcow2->raw.raw"), w("qm-qcow2->raw.raw"), ["-O", "raw"], ["-O", "raw"])
    cases.append(Case("convert qcow2->raw", sides, [("convert qcow2->raw", 0, 1, Target("ratio", 1.0))],
                      needs=[mk_qcow2]))
    sides = _conv(vd, qemu, src_vmdk, w("vd-vmdk->qcow2.qcow2"), w("qm-vmdk->qcow2.qcow2"),
                  ["-O", "qcow2"], ["-O", "qcow2"])
    cases.append(Case("convert vmdk->qcow2", sides, [("convert vmdk->qcow2", 0, 1, Target("ratio", 1.0))],
                      needs=[mk_vmdk]))
    # raw->raw: cp --sparse=always is the floor; the stdout row streams the whole disk, holes as zeros
    sides = _conv(vd, qemu, raw, w("vd-raw->raw.raw"), w("qm-raw->raw.raw"), ["-O", "raw"], ["-O", "raw"])
    sides.append(Side("cp --sparse", ["cp", "--sparse=always", raw, w("cp-raw->raw.raw")], out=w("cp-raw->raw.raw"),
                      est=(0.0, 0.3)))
    sides.append(_stdout_side(vd, raw, ["-O", "raw"], w("pipe-raw->raw.raw"), est=(0.1, 1.0)))
    cases.append(Case("convert raw->raw", sides, [
        ("convert raw->raw", 0, 2, Target("ratio", 1.2, "<=1.20x cp")),
        ("convert raw->raw", 0, 1, Target("ratio", 1.0))] + _stream_rows("raw", 1.0, pipe_idx=3),
        needs=[inp.workload]))
    return cases


def _compressed_cases(inp, vd, qemu, comp_qcow2, mk_comp_qcow2, comp_vmdk, mk_comp_vmdk) -> list:
    text, w = inp.text, inp.w
    cases = []
    sides = _conv(vd, qemu, text, w("vd-text-c.qcow2"), w("qm-text-c.qcow2"), ["-c", "-O", "qcow2"],
                  ["-c", "-O", "qcow2"], est_vd=(0.1, 6.0), est_qm=(0.0, 12.0))
    cases.append(Case("convert raw->qcow2 -c (text)", sides,
                      [("convert raw->qcow2 -c (text)", 0, 1, Target("ratio", 0.15))],
                      needs=[inp.text_workload], reads=[text]))
    vd_o = ["-O", "vmdk", "--variant", "streamOptimized"]
    sides = _conv(vd, qemu, text, w("vd-text-stream.vmdk"), w("qm-text-stream.vmdk"), vd_o,
                  ["-O", "vmdk", "-o", "subformat=streamOptimized"], est_vd=(0.1, 7.5), est_qm=(0.0, 16.0))
    sides.append(_stdout_side(vd, text, vd_o, w("pipe-text-stream.vmdk"), est=(0.1, 8.0)))
    cases.append(Case("convert raw->streamOptimized vmdk (text)", sides,
                      [("convert raw->streamOptimized vmdk (text)", 0, 1, Target("ratio", 0.15))]
                      + _stream_rows("streamOptimized vmdk (text)", 0.15),
                      needs=[inp.text_workload], reads=[text]))
    sides = _conv(vd, qemu, comp_qcow2, w("vd-text-c->raw.raw"), w("qm-text-c->raw.raw"), ["-O", "raw"],
                  ["-O", "raw"], est_vd=(0.1, 1.8), est_qm=(0.0, 2.0))
    cases.append(Case("convert qcow2 -c->raw (text)", sides,
                      [("convert qcow2 -c->raw (text)", 0, 1, Target("ratio", 0.7))],
                      needs=[mk_comp_qcow2], reads=[comp_qcow2]))
    sides = _conv(vd, qemu, comp_vmdk, w("vd-text-stream->qcow2.qcow2"), w("qm-text-stream->qcow2.qcow2"),
                  ["-O", "qcow2"], ["-O", "qcow2"], est_vd=(0.1, 1.8), est_qm=(0.0, 2.0))
    cases.append(Case("convert streamOptimized->qcow2 (text)", sides,
                      [("convert streamOptimized->qcow2 (text)", 0, 1, Target("ratio", 0.7))],
                      needs=[mk_comp_vmdk], reads=[comp_vmdk]))
    return cases


def _fixed_cases(inp, vd, qemu) -> list:
    """Cases whose inputs do not depend on --size."""
    w = inp.w
    empty_1t, mk_1t = inp.created("empty-1T.qcow2", "qcow2", "1T")
    meta_4g, mk_meta = inp.created("meta-4G.qcow2", "qcow2", "4G", ["-o", "cluster_size=4096,preallocation=metadata"])
    sparse, mk_sparse = inp.sparse_100g()
    cases = [
        Case("info 1 TiB qcow2 (start-up)", [
            Side("vdtool", vd + ["info", empty_1t]), Side("qemu-img", [qemu, "info", empty_1t]),
            Side("python -c pass", [sys.executable, "-c", "pass"], est=(0.05, 0.0))], [
            ("info 1 TiB qcow2 (start-up)", 0, 1, Target("plus_ms", 25)),
            ("info 1 TiB qcow2 (start-up)", 0, 2, Target("plus_ms", 25))], needs=[mk_1t]),
        Case("check 4 KiB-cluster qcow2 (1M clusters)", [
            Side("vdtool", vd + ["check", meta_4g], est=(0.3, 0)), Side("qemu-img", [qemu, "check", meta_4g])], [
            ("check 4 KiB-cluster qcow2 (1M clusters)", 0, 1, Target("plus_ms", 25))], needs=[mk_meta]),
        Case("convert 100 GiB sparse raw->qcow2 (memory)",
             _conv(vd, qemu, sparse, w("vd-sparse.qcow2"), w("qm-sparse.qcow2"), ["-O", "qcow2"], ["-O", "qcow2"],
                   est_vd=(0.3, 0), est_qm=(0.1, 0)),
             [("convert 100 GiB sparse raw->qcow2 (memory)", 0, 1, Target("rss"))], needs=[mk_sparse]),
    ]
    # empty images at the largest sizes the formats allow (VHD stops at 2040 GiB)
    for name, fmt, size_arg, label in (("empty-64T.qcow2", "qcow2", "64T", "64 TiB"),
                                       ("empty-64T.vmdk", "vmdk", "64T", "64 TiB"),
                                       ("empty-2040G.vhd", "vpc", "2040G", "2040 GiB"),
                                       ("empty-64T.vdi", "vdi", "64T", "64 TiB")):
        path, build = inp.created(name, fmt, size_arg)
        ext = name.split(".")[1]
        out = w(f"vd-scale-{ext}.qcow2")
        cases.append(Case(f"convert empty {label} {ext}->qcow2", [
            Side("vdtool", vd + ["convert", "-q", path, out], out=out, est=(0.5, 0))],
            [(f"convert empty {label} {ext}->qcow2", 0, 0, Target("abs", 1.0))], needs=[build], solo=True))
        cases.append(Case(f"check empty {label} {ext}", [Side("vdtool", vd + ["check", path], est=(0.5, 0))],
                          [(f"check empty {label} {ext}", 0, 0, Target("abs", 1.0))], needs=[build], solo=True))
    return cases


# ---------------------------------------------------------------- main

def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G", help="workload size (default 4G, as issue 17 measures)")
    ap.add_argument("--runs", type=int, default=3, help="counted runs per command (default 3)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="warm-up rounds before the counted ones (default 1; long cases read their inputs instead)")
    ap.add_argument("--no-sync", dest="sync", action="store_false",
                    help="skip the os.sync() before each timed run (quick iterations only)")
    ap.add_argument("--work", default=os.path.join(HERE, "work"), help="scratch folder (default bench/work)")
    ap.add_argument("--only", nargs="+", action="extend", metavar="WORD",
                    help="run only cases whose name or row names contain one of these words (repeatable; "
                         "a word that starts with '-' is given as --only=-c)")
    ap.add_argument("--markdown", action="store_true", help="also print the results as a Markdown table")
    ap.add_argument("--json", metavar="FILE", help="save the rows (and the settings) as JSON to FILE")
    ap.add_argument("--estimate", action="store_true", help="list the cases and the estimated time, run nothing")
    ap.add_argument("--clean", action="store_true",
                    help="remove the workloads and input images at the end (they are kept for the next run)")
    return ap.parse_args()


def plan_estimate(cases: list, gib: float, runs: int, warmup: int) -> float:
    total = 0.0
    for c in cases:
        per_round = c.round_estimate(gib)
        rounds = runs + (1 if c.solo else 0 if per_round > LONG_RUN_S else warmup)
        total += per_round * rounds
    return total


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == MAKE_WORKLOAD:
        make_workload_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    args = parse_args()
    qemu = shutil.which("qemu-img")
    if not qemu:
        raise SystemExit("qemu-img is needed (apt-get install qemu-utils)")
    size = parse_size(args.size)
    gib = size / GiB
    os.makedirs(args.work, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONPYCACHEPREFIX=os.path.join(args.work, "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ.clear()
    os.environ.update(env)
    vd = [sys.executable, "-m", "vdtool"]
    inp = Inputs(args.work, size, qemu)
    cases = [c for c in build_cases(inp, vd, qemu)
             if not args.only or any(word in n for n in c.names() for word in args.only)]
    if not cases:
        raise SystemExit(f"no case name contains any of {args.only} (--estimate lists them)")
    est = plan_estimate(cases, gib, args.runs, args.warmup)
    print(f"workloads: {size_label(size)} each (half data in 1 MiB runs, a quarter written zeros, a quarter "
          f"holes): random data in {inp.raw}, text-like data in {inp.text}", flush=True)
    print(f"{len(cases)} cases, {args.runs} counted runs each, sync before each run: "
          f"{'yes' if args.sync else 'no'}; estimated {fmt_duration(est)} (plus up to "
          f"{fmt_duration(gib * 40)} to make the inputs that are missing)", flush=True)
    # inputs: two workloads (3/4 of size allocated each), six images of half or less; outputs: one at a time
    need, free = 5 * size + GiB, shutil.disk_usage(args.work).free
    if free < need:
        print(f"warning: {free / GiB:.0f} GiB free in {args.work}; the inputs and the largest output take "
              f"about {need / GiB:.0f} GiB (less the inputs already made)", file=sys.stderr, flush=True)
    if args.estimate:
        for c in cases:
            print(f"{c.name}: about {fmt_duration(plan_estimate([c], gib, args.runs, args.warmup))}")
            for name, a, b, t, *other in c.rows:
                vs = "" if c.solo else f" vs {other[0] if other else c.sides[b].label}"
                print(f"  {name}{vs}: {t.label()}")
        return
    rows = run_cases(cases, args, gib, est)
    print("(medians of interleaved runs; ratio = median of the per-round ratios vdtool/other; diff = median of "
          f"the per-round differences; met: the target, and vdtool's peak RSS under {RSS_LIMIT_MIB} MiB)")
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"(a peak RSS is never under the bench's own, {floor:.0f} MiB: Linux carries it into the commands it runs)")
    if any("vhd" in r["case"] and r["case"].startswith("check") for r in rows):
        print("(qemu-img has no check for VHD: its check row times qemu-img opening the image and exiting 63)")
    if args.markdown:
        print()
        print_markdown(rows)
    if args.json:
        save_json(args, rows, size, qemu)
    if args.clean:
        remove([os.path.join(args.work, n) for n in os.listdir(args.work) if not n.startswith("pycache")])


def run_cases(cases: list, args, gib: float, est: float) -> list:
    print(HEADER, flush=True)
    rows, start, done_est = [], time.monotonic(), 0.0
    for k, case in enumerate(cases, 1):
        for build in case.needs:
            build()
        elapsed = time.monotonic() - start
        left = max(est - done_est, 0.0)
        print(f"[{k}/{len(cases)}] {case.name}: {fmt_duration(elapsed)} elapsed, about {fmt_duration(left)} left",
              file=sys.stderr, flush=True)
        per_round = case.round_estimate(gib)
        if case.solo:
            got = measure_solo(case, args.runs, args.sync)
        else:
            long_case = per_round > LONG_RUN_S
            if long_case:
                read_data(case.reads)
            got = measure(case, args.runs, 0 if long_case else args.warmup, args.sync)
        done_est += plan_estimate([case], gib, args.runs, args.warmup)
        for r in got:
            print_row(r)
        rows += got
    return rows


def save_json(args, rows: list, size: int, qemu: str) -> None:
    rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "size": size, "runs": args.runs, "warmup": args.warmup, "sync": args.sync,
            "python": sys.version.split()[0], "executable": sys.executable,
            "qemu_img": tool_version([qemu, "--version"]), "git": rev.strip(), "only": args.only,
            "rss_floor_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with open(args.json, "w") as f:
        json.dump({"settings": meta, "rows": rows}, f, indent=1)
        f.write("\n")
    print(f"rows saved to {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
