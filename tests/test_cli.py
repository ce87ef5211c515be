"""The command line, end to end: ``python -m vdtool ...`` in a subprocess
(the real entry point, real exit codes, real stderr), plus a few in-process
checks with click's CliRunner for what a subprocess cannot provoke."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest

from helpers import file_bytes, write_at
from vdrun import run_vdtool, vdtool_env

COMMANDS = ["create", "info", "convert", "compact", "resize", "merge", "discard", "check", "rebase"]
MiB = 1 << 20



_env = vdtool_env
vd = run_vdtool  # never a traceback in its output, whatever happened


def one_error_line(proc, *fragments):
    """stderr is exactly one 'vdtool: error: ...' line containing fragments."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vdtool: error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], (f, proc.stderr)
    return lines[0]


def info_json(cwd, path, *extra):
    return json.loads(vd(cwd, "info", "--output", "json", *extra, path, expect=0).stdout)


def pattern(n, seed=1):
    return bytes((i * 31 + seed) & 0xFF for i in range(n))


# -- the group -----------------------------------------------------------------------

def test_version(tmp_path):
    from vdtool import __version__

    proc = vd(tmp_path, "--version", expect=0)
    assert proc.stdout.strip() == f"vdtool {__version__}"


def test_version_imports_nothing_heavy(tmp_path):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "vdtool", "--version"], cwd=tmp_path,
                          capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode == 0
    modules = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    for bad in ("rich", "tqdm", "vdtool.formats", "vdtool.commands", "vdtool.core.ops", "vdtool.core.stack",
                "xxhash", "vdtool.progressbar"):
        assert not any(m == bad or m.startswith(bad + ".") for m in modules), (bad, sorted(modules))


def test_info_imports_only_its_own_op(tmp_path):
    """Start-up of `vdtool info` (issue 8: at most 40 ms over bare Python):
    the other ops, their staging and thread pools, importlib.metadata and
    the progress bars stay unloaded."""
    img = tmp_path / "a.qcow2"
    vd(tmp_path, "create", "-q", str(img), "1G", expect=0)
    # sys.modules after the command, not -X importtime: imports made by the
    # ops package's lazy __getattr__ do not show in importtime's log
    code = ("import runpy, sys\nsys.argv = ['vdtool', 'info', sys.argv[1]]\ntry:\n"
            "    runpy.run_module('vdtool', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "sys.stderr.write('\\n'.join(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code, str(img)], cwd=tmp_path,
                          capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = set(proc.stderr.split())
    assert "vdtool.core.ops._info" in modules and "image: " in proc.stdout
    for bad in ("vdtool.core.ops._convert", "vdtool.core.ops._merge", "vdtool.core.ops._check", "vdtool.core.copy",
                "importlib.metadata", "rich", "tqdm", "xxhash", "concurrent.futures", "vdtool.formats.vdi.backend",
                "vdtool.formats.vmdk.backend", "vdtool.formats.qcow2.check", "vdtool.formats.qcow2.create"):
        assert bad not in modules, (bad, sorted(m for m in modules if m.startswith("vdtool")))


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_lists_the_commands(tmp_path, flag):
    proc = vd(tmp_path, flag, expect=0)
    for name in COMMANDS:
        assert f"  {name} " in proc.stdout, name
    assert "--version" in proc.stdout and "--debug" in proc.stdout


def test_no_command_is_a_usage_error(tmp_path):
    proc = vd(tmp_path)
    assert proc.returncode == 2
    assert "Usage:" in proc.stdout + proc.stderr


def test_unknown_command(tmp_path):
    proc = vd(tmp_path, "frobnicate", expect=2)
    assert proc.stderr.startswith("vdtool: error: no such command 'frobnicate'") and proc.stderr.count("\n") == 1


def test_usage_errors_are_one_line_with_a_hint(tmp_path):
    proc = vd(tmp_path, "conver", "a", "b", expect=2)
    assert proc.stderr.count("\n") == 1 and "did you mean 'convert'?" in proc.stderr
    proc = vd(tmp_path, "create", "-f", "qcw2", "x.img", "1M", expect=2)
    assert proc.stderr.count("\n") == 1 and "did you mean 'qcow2'?" in proc.stderr
    assert "(see 'vdtool create --help')" in proc.stderr
    proc = vd(tmp_path, "info", "--outptu", "json", "x", expect=2)
    assert proc.stderr.startswith("vdtool: error: No such option '--outptu'") and "Did you mean" in proc.stderr
    proc = vd(tmp_path, "create", "x.img", "10GB", expect=2)
    assert "ambiguous" in proc.stderr and "10G or 10GiB" in proc.stderr and not (tmp_path / "x.img").exists()


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_subcommand_help(tmp_path, name, flag):
    proc = vd(tmp_path, name, flag, expect=0)
    assert f"vdtool {name}" in proc.stdout
    assert "Examples:" in proc.stdout
    assert "-h, --help" in proc.stdout


@pytest.mark.parametrize("name,options", [
    ("create", ["-f", "--variant", "--block-size", "-b", "--parent", "-F", "--parent-format", "--uuid",
                "--comment", "-o", "--force", "-p", "-q", "--parent-search", "--untrusted"]),
    ("info", ["-f", "--chain", "--output", "-U", "--force-share", "--parent-search", "--untrusted"]),
    ("convert", ["-f", "-O", "--output-format", "--variant", "--block-size", "-c", "--compress", "-b", "-F",
                 "-o", "--verify", "--force", "-p", "-q", "-U", "--parent-search", "--untrusted"]),
    ("compact", ["-f", "-p", "-q", "--parent-search", "--untrusted"]),
    ("resize", ["-f", "--shrink", "-p", "-q", "--parent-search", "--untrusted"]),
    ("merge", ["-f", "--into", "--base", "--keep", "-p", "-q", "--parent-search", "--untrusted"]),
    ("discard", ["-f", "--zeroes", "-p", "-q", "--parent-search", "--untrusted"]),
    ("check", ["-f", "-r", "--repair", "--output", "-U", "--parent-search", "--untrusted"]),
    ("rebase", ["-f", "-u", "--unsafe", "-b", "--parent", "-F", "-p", "-q", "--parent-search", "--untrusted"]),
])
def test_contract_options_are_there(tmp_path, name, options):
    out = vd(tmp_path, name, "--help", expect=0).stdout
    for opt in options:
        assert f" {opt}" in out or f"{opt}," in out, (name, opt)


# -- sizes ----------------------------------------------------------------------------

@pytest.mark.parametrize("text,size", [
    ("512", 512), ("64K", 64 << 10), ("64k", 64 << 10), ("10G", 10 << 30), ("1.5T", 3 << 39),
    ("4MiB", 4 * MiB), ("4mib", 4 * MiB), ("1M", MiB), ("0", 0),
])
def test_size_parsing(tmp_path, text, size):
    vd(tmp_path, "create", "-q", "-f", "raw", "d.img", text, expect=0)
    assert os.path.getsize(tmp_path / "d.img") == size
    assert info_json(tmp_path, "d.img")["virtual-size"] == size


@pytest.mark.parametrize("text", ["10Q", "abc", "1.3", "1..5G", "G", "-5", "1 0M", "0x10", "5iB"])
def test_bad_sizes_are_usage_errors(tmp_path, text):
    proc = vd(tmp_path, "create", "-f", "raw", "d.img", "--", text, expect=2)
    assert "size" in proc.stderr.lower()
    assert not (tmp_path / "d.img").exists()


def test_bad_block_size_is_usage_error(tmp_path):
    vd(tmp_path, "create", "--block-size", "64Q", "d.img", "1M", expect=2)


# -- create ------------------------------------------------------------------------

def test_create_raw(tmp_path):
    proc = vd(tmp_path, "create", "d.img", "1M", expect=0)
    assert "d.img" in proc.stdout and "fmt=raw" in proc.stdout and "size=1048576" in proc.stdout
    assert file_bytes(tmp_path / "d.img") == bytes(MiB)
    # no staging leftovers
    assert sorted(os.listdir(tmp_path)) == ["d.img"]


def test_create_full_variant(tmp_path):
    vd(tmp_path, "create", "-q", "--variant", "full", "d.raw", "256K", expect=0)
    assert file_bytes(tmp_path / "d.raw") == bytes(256 << 10)
    assert os.stat(tmp_path / "d.raw").st_blocks * 512 >= 256 << 10


def test_create_bad_variant(tmp_path):
    proc = vd(tmp_path, "create", "--variant", "fancy", "d.img", "1M", expect=2)
    one_error_line(proc, "fancy", "sparse")


def test_create_quiet_prints_nothing(tmp_path):
    proc = vd(tmp_path, "create", "-q", "d.img", "1M", expect=0)
    assert proc.stdout == "" and proc.stderr == ""


def test_create_refuses_existing_without_force(tmp_path):
    (tmp_path / "d.img").write_bytes(b"precious")
    proc = vd(tmp_path, "create", "d.img", "1M", expect=1)
    one_error_line(proc, "d.img", "already exists", "--force")
    assert (tmp_path / "d.img").read_bytes() == b"precious"
    vd(tmp_path, "create", "--force", "d.img", "1M", expect=0)
    assert os.path.getsize(tmp_path / "d.img") == MiB


def test_create_needs_a_format(tmp_path):
    proc = vd(tmp_path, "create", "disk", "1M", expect=2)
    one_error_line(proc, "disk", "-O/-f", "qcow2")


def test_create_needs_a_size(tmp_path):
    proc = vd(tmp_path, "create", "d.img", expect=2)
    one_error_line(proc, "size")


def test_create_needs_a_file(tmp_path):
    proc = vd(tmp_path, "create", expect=2)
    assert "Missing argument 'FILE'" in proc.stderr


def test_create_vhdx_by_extension(tmp_path):
    # (was: refused as "not implemented yet" while VHDX had no backend)
    vd(tmp_path, "create", "x.vhdx", "1M", expect=0)
    assert (tmp_path / "x.vhdx").read_bytes()[:8] == b"vhdxfile"


def test_create_by_extension(tmp_path):
    # (was: refused as "not implemented yet" while QED had no backend)
    vd(tmp_path, "create", "x.qed", "1M", expect=0)
    assert (tmp_path / "x.qed").read_bytes()[:4] == b"QED\x00"


def test_unknown_format_name_is_usage_error(tmp_path):
    proc = vd(tmp_path, "create", "-f", "floppy", "x.img", "1M", expect=2)
    assert "floppy" in proc.stderr and "qcow2" in proc.stderr


def test_raw_cannot_have_a_parent(tmp_path):
    vd(tmp_path, "create", "-q", "base.img", "1M", expect=0)
    proc = vd(tmp_path, "create", "-f", "raw", "-b", "base.img", "top.img", expect=1)
    one_error_line(proc, "parent", "raw")
    assert not (tmp_path / "top.img").exists()


def test_create_uuid_and_comment_on_raw(tmp_path):
    proc = vd(tmp_path, "create", "--uuid", "12345678-1234-1234-1234-123456789abc", "d.img", "1M", expect=2)
    one_error_line(proc, "--uuid", "raw")
    vd(tmp_path, "create", "--uuid", "not-a-uuid", "d.img", "1M", expect=2)


# -- -o ---------------------------------------------------------------------------------

def test_o_help_raw(tmp_path):
    proc = vd(tmp_path, "create", "-f", "raw", "-o", "help", expect=0)
    assert "raw" in proc.stdout and "sparse" in proc.stdout
    assert not os.listdir(tmp_path)


def test_o_help_from_extension(tmp_path):
    proc = vd(tmp_path, "create", "-o", "help", "d.img", "1M", expect=0)
    assert "raw" in proc.stdout
    assert not os.listdir(tmp_path)


def test_o_help_needs_a_format(tmp_path):
    vd(tmp_path, "create", "-o", "help", expect=2)


def test_o_help_convert(tmp_path):
    proc = vd(tmp_path, "convert", "-O", "raw", "-o", "help", expect=0)
    assert "raw" in proc.stdout


def test_create_read_only_format(tmp_path):
    # (was: refused as "not implemented yet" while DMG had no backend)
    proc = vd(tmp_path, "create", "-f", "dmg", "x.dmg", "1M", expect=1)
    one_error_line(proc, "create is not supported for dmg")
    assert not (tmp_path / "x.dmg").exists()
    proc = vd(tmp_path, "create", "-f", "dmg", "-o", "help", expect=0)
    assert "dmg format has no -o options" in proc.stdout


def test_unknown_o_key(tmp_path):
    proc = vd(tmp_path, "create", "-f", "raw", "-o", "cluster_size=64K", "d.img", "1M", expect=2)
    one_error_line(proc, "cluster_size", "valid options")
    assert not (tmp_path / "d.img").exists()


def test_o_not_key_value(tmp_path):
    proc = vd(tmp_path, "create", "-f", "raw", "-o", "nonsense", "d.img", "1M", expect=2)
    one_error_line(proc, "KEY=VALUE")


def test_o_help_qcow2_lists_options(tmp_path):
    proc = vd(tmp_path, "create", "-f", "qcow2", "-o", "help", expect=0)
    assert "cluster_size" in proc.stdout and "default" in proc.stdout


def test_unknown_o_key_qcow2_names_valid_keys(tmp_path):
    proc = vd(tmp_path, "create", "-f", "qcow2", "-o", "bogus=1", "d.qcow2", "1M", expect=2)
    one_error_line(proc, "bogus", "cluster_size")


# -- info -----------------------------------------------------------------------------

def test_info_text(tmp_path):
    vd(tmp_path, "create", "-q", "d.img", "1M", expect=0)
    out = vd(tmp_path, "info", "d.img", expect=0).stdout
    assert "image: d.img" in out
    assert "file format: raw" in out
    assert "virtual size: 1 MiB (1048576 bytes)" in out
    assert "disk size:" in out


def test_info_json_keys(tmp_path):
    vd(tmp_path, "create", "-q", "d.img", "2M", expect=0)
    write_at(tmp_path / "d.img", 0, pattern(8192))
    d = info_json(tmp_path, "d.img")
    assert d["filename"] == "d.img"
    assert d["format"] == "raw"
    assert d["virtual-size"] == 2 * MiB
    assert d["actual-size"] >= 8192
    raw = vd(tmp_path, "info", "--output", "json", "d.img", expect=0).stdout
    assert raw.startswith("{\n    \"")  # indent 4, like qemu-img


def test_info_chain_json(tmp_path):
    vd(tmp_path, "create", "-q", "d.img", "1M", expect=0)
    d = info_json(tmp_path, "d.img", "--chain")  # --chain: an alias of --backing-chain
    assert isinstance(d, list) and d[0]["format"] == "raw"
    assert info_json(tmp_path, "d.img", "--backing-chain") == d


def test_info_with_f_and_U(tmp_path):
    vd(tmp_path, "create", "-q", "d.img", "1M", expect=0)
    assert info_json(tmp_path, "d.img", "-f", "raw", "-U")["format"] == "raw"


def test_info_probes_content_not_name(tmp_path):
    # a raw image named .qcow2 is still raw (the name is never used to probe)
    (tmp_path / "fake.qcow2").write_bytes(bytes(4096))
    assert info_json(tmp_path, "fake.qcow2")["format"] == "raw"


# -- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [["info"], ["check"], ["compact"], ["resize", "+1M"], ["discard", "--zeroes"],
                                 ["merge"], ["rebase", "-b", ""]])
def test_missing_file(tmp_path, cmd):
    args = cmd[:1] + ["nope.img"] + cmd[1:]
    proc = vd(tmp_path, *args, expect=1)
    one_error_line(proc, "nope.img", "no such file")


@pytest.mark.parametrize("cmd", ["info", "check", "compact"])
def test_directory(tmp_path, cmd):
    (tmp_path / "sub").mkdir()
    proc = vd(tmp_path, cmd, "sub", expect=1)
    one_error_line(proc, "sub", "directory")


def test_convert_missing_source(tmp_path):
    proc = vd(tmp_path, "convert", "nope.img", "out.img", expect=1)
    one_error_line(proc, "nope.img")
    assert not (tmp_path / "out.img").exists()


def test_convert_into_directory(tmp_path):
    vd(tmp_path, "create", "-q", "d.img", "1M", expect=0)
    (tmp_path / "sub.img").mkdir()
    proc = vd(tmp_path, "convert", "d.img", "sub.img", expect=1)
    one_error_line(proc, "sub.img")


def test_empty_file_as_qcow2(tmp_path):
    (tmp_path / "empty.qcow2").write_bytes(b"")
    proc = vd(tmp_path, "info", "-f", "qcow2", "empty.qcow2", expect=1)
    line = one_error_line(proc)
    assert "empty.qcow2" in line and "internal error" not in line


def test_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    vd(tmp_path, "create", "-q", "d.img", "1M", expect=0)
    os.chmod(tmp_path / "d.img", 0)
    proc = vd(tmp_path, "info", "d.img", expect=1)
    one_error_line(proc, "d.img", "permission denied")


def test_untrusted(tmp_path):
    """--untrusted and VDTOOL_UNTRUSTED=1 apply the rules (tests/test_untrusted.py has the rest)."""
    vd(tmp_path, "create", "-q", "d.img", "1M", expect=0)
    vd(tmp_path, "info", "--untrusted", "d.img", expect=0)
    vd(tmp_path, "create", "-q", "-f", "qcow2", "-b", "d.img", "-F", "raw", "o.qcow2", expect=0)
    proc = vd(tmp_path, "info", "--untrusted", "o.qcow2", expect=1)
    one_error_line(proc, "--untrusted", "rule external-reference", "d.img")
    proc = vd(tmp_path, "check", "o.qcow2", env=_env(VDTOOL_UNTRUSTED="1"), expect=1)
    one_error_line(proc, "--untrusted", "rule external-reference")
    vd(tmp_path, "info", "o.qcow2", env=_env(VDTOOL_UNTRUSTED="0"), expect=0)


def test_parent_search_must_be_a_folder(tmp_path):
    vd(tmp_path, "create", "-q", "d.img", "1M", expect=0)
    vd(tmp_path, "info", "--parent-search", "d.img", "d.img", expect=2)
    (tmp_path / "dir").mkdir()
    vd(tmp_path, "info", "--parent-search", "dir", "--parent-search", ".", "d.img", expect=0)


def test_check_raw_has_no_check(tmp_path):
    vd(tmp_path, "create", "-q", "d.img", "1M", expect=0)
    proc = vd(tmp_path, "check", "d.img", expect=63)
    one_error_line(proc, "d.img", "check", "raw")
    vd(tmp_path, "check", "--output", "json", "d.img", expect=63)


def test_check_U_with_repair_is_usage_error(tmp_path):
    vd(tmp_path, "create", "-q", "d.img", "1M", expect=0)
    vd(tmp_path, "check", "-U", "-r", "leaks", "d.img", expect=2)


def test_merge_and_rebase_standalone_raw(tmp_path):
    vd(tmp_path, "create", "-q", "d.img", "1M", expect=0)
    one_error_line(vd(tmp_path, "merge", "d.img", expect=2), "no parent")
    one_error_line(vd(tmp_path, "rebase", "-b", "", "d.img", expect=1), "d.img", "raw")
    vd(tmp_path, "rebase", "d.img", expect=2)  # -b is required
    vd(tmp_path, "merge", "--into", "sideways", "d.img", expect=2)


# -- convert --------------------------------------------------------------------------------

def test_convert_raw_to_raw(tmp_path):
    vd(tmp_path, "create", "-q", "src.img", "4M", expect=0)
    data = pattern(MiB)
    write_at(tmp_path / "src.img", MiB, data)
    proc = vd(tmp_path, "convert", "src.img", "dst.img", expect=0)
    assert "dst.img" in proc.stdout
    assert file_bytes(tmp_path / "dst.img") == file_bytes(tmp_path / "src.img")
    # zeros are not allocated
    assert os.stat(tmp_path / "dst.img").st_blocks * 512 < 3 * MiB
    assert sorted(os.listdir(tmp_path)) == ["dst.img", "src.img"]


def test_convert_verify_prints_digests(tmp_path):
    vd(tmp_path, "create", "-q", "src.img", "1M", expect=0)
    write_at(tmp_path / "src.img", 4096, pattern(10000))
    proc = vd(tmp_path, "convert", "--verify", "src.img", "dst.raw", expect=0)
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if "xxh3-128" in line)
    assert set(lines) == {"source xxh3-128", "output xxh3-128"}
    assert lines["source xxh3-128"] == lines["output xxh3-128"]
    assert len(lines["source xxh3-128"]) == 32


def test_convert_refuses_existing_destination(tmp_path):
    vd(tmp_path, "create", "-q", "src.img", "1M", expect=0)
    (tmp_path / "dst.img").write_bytes(b"keep me")
    one_error_line(vd(tmp_path, "convert", "src.img", "dst.img", expect=1), "dst.img", "already exists")
    assert (tmp_path / "dst.img").read_bytes() == b"keep me"
    vd(tmp_path, "convert", "-q", "--force", "src.img", "dst.img", expect=0)
    assert os.path.getsize(tmp_path / "dst.img") == MiB


def test_convert_same_file(tmp_path):
    vd(tmp_path, "create", "-q", "src.img", "1M", expect=0)
    vd(tmp_path, "convert", "--force", "src.img", "src.img", expect=1)
    assert os.path.getsize(tmp_path / "src.img") == MiB


def test_convert_output_format_needed(tmp_path):
    vd(tmp_path, "create", "-q", "src.img", "1M", expect=0)
    one_error_line(vd(tmp_path, "convert", "src.img", "out.bin", expect=2), "out.bin", "formats")
    vd(tmp_path, "convert", "-q", "-O", "raw", "src.img", "out.bin", expect=0)
    assert os.path.getsize(tmp_path / "out.bin") == MiB


def test_convert_compress_raw_not_supported(tmp_path):
    vd(tmp_path, "create", "-q", "src.img", "1M", expect=0)
    one_error_line(vd(tmp_path, "convert", "-c", "src.img", "dst.img", expect=1), "raw")
    assert not (tmp_path / "dst.img").exists()


def test_convert_missing_arguments(tmp_path):
    assert "Missing argument 'SRC'" in vd(tmp_path, "convert", expect=2).stderr
    assert "Missing argument 'DST'" in vd(tmp_path, "convert", "a.img", expect=2).stderr


def test_convert_progress_forced_and_quiet(tmp_path):
    vd(tmp_path, "create", "-q", "src.img", "8M", expect=0)
    write_at(tmp_path / "src.img", 0, pattern(MiB))
    # -p without a terminal: qemu-img -p's lines (the bar is for terminals)
    proc = vd(tmp_path, "convert", "-p", "src.img", "a.img", expect=0)
    assert "(100.00/100%)" in proc.stderr
    # not a terminal and no -p: no bar
    proc = vd(tmp_path, "convert", "src.img", "b.img", expect=0)
    assert proc.stderr == ""
    # -q wins over -p and silences the confirmation
    proc = vd(tmp_path, "convert", "-q", "-p", "src.img", "c.img", expect=0)
    assert proc.stderr == "" and proc.stdout == ""


# -- resize --------------------------------------------------------------------------------

def test_resize_grow_and_shrink(tmp_path):
    vd(tmp_path, "create", "-q", "d.img", "1M", expect=0)
    data = pattern(4096)
    write_at(tmp_path / "d.img", 0, data)
    proc = vd(tmp_path, "resize", "d.img", "+1M", expect=0)
    assert "2097152" in proc.stdout
    assert os.path.getsize(tmp_path / "d.img") == 2 * MiB
    assert file_bytes(tmp_path / "d.img")[:4096] == data
    assert file_bytes(tmp_path / "d.img")[4096:] == bytes(2 * MiB - 4096)

    one_error_line(vd(tmp_path, "resize", "d.img", "-512K", expect=2), "--shrink")
    assert os.path.getsize(tmp_path / "d.img") == 2 * MiB

    # '-SIZE' is a size, not an option, wherever it stands
    vd(tmp_path, "resize", "d.img", "-512K", "--shrink", expect=0)
    assert os.path.getsize(tmp_path / "d.img") == 1536 << 10
    vd(tmp_path, "resize", "--shrink", "d.img", "-512K", expect=0)
    assert os.path.getsize(tmp_path / "d.img") == MiB
    vd(tmp_path, "resize", "-q", "d.img", "3M", expect=0)
    assert os.path.getsize(tmp_path / "d.img") == 3 * MiB
    assert file_bytes(tmp_path / "d.img")[:4096] == data


def test_resize_shrink_reports_lost_data(tmp_path):
    vd(tmp_path, "create", "-q", "d.img", "1M", expect=0)
    write_at(tmp_path / "d.img", MiB - 8192, pattern(8192))
    proc = vd(tmp_path, "resize", "--shrink", "d.img", "512K", expect=0)
    assert "vdtool: warning:" in proc.stderr and "allocated data" in proc.stderr
    assert os.path.getsize(tmp_path / "d.img") == 512 << 10
    assert vd(tmp_path, "resize", "-q", "--shrink", "d.img", "4K", expect=0).stderr == ""


def test_resize_bad_sizes(tmp_path):
    vd(tmp_path, "create", "-q", "d.img", "1M", expect=0)
    vd(tmp_path, "resize", "d.img", "+1Q", expect=2)
    vd(tmp_path, "resize", "--shrink", "d.img", "--", "-2M", expect=2)  # after --: literal, still checked
    one_error_line(vd(tmp_path, "resize", "--shrink", "d.img", "-2M", expect=2), "smaller than zero")
    assert os.path.getsize(tmp_path / "d.img") == MiB
    vd(tmp_path, "resize", "d.img", "--bogus", expect=2)


# -- discard / compact ----------------------------------------------------------------------

def test_discard_ranges(tmp_path):
    vd(tmp_path, "create", "-q", "d.img", "1M", expect=0)
    data = pattern(MiB)
    write_at(tmp_path / "d.img", 0, data)
    proc = vd(tmp_path, "discard", "d.img", "64K:64K", "512K:4K", expect=0)
    assert "69632" in proc.stdout
    got = file_bytes(tmp_path / "d.img")
    expect = bytearray(data)
    expect[64 << 10:128 << 10] = bytes(64 << 10)
    expect[512 << 10:516 << 10] = bytes(4096)
    assert got == bytes(expect)


def test_discard_bad_ranges(tmp_path):
    vd(tmp_path, "create", "-q", "d.img", "1M", expect=0)
    vd(tmp_path, "discard", "d.img", "nonsense", expect=2)
    vd(tmp_path, "discard", "d.img", "1Q:4K", expect=2)
    one_error_line(vd(tmp_path, "discard", "d.img", "1M:4K", expect=2), "past the end")
    vd(tmp_path, "discard", "d.img", expect=2)


def test_discard_zeroes_and_compact_keep_content(tmp_path):
    vd(tmp_path, "create", "-q", "d.img", "4M", expect=0)
    data = pattern(MiB)
    with open(tmp_path / "d.img", "r+b") as f:
        f.write(bytes(MiB))  # allocated zeros
        f.write(data)
        f.write(bytes(MiB))
    before = file_bytes(tmp_path / "d.img")
    vd(tmp_path, "discard", "--zeroes", "d.img", expect=0)
    assert file_bytes(tmp_path / "d.img") == before
    allocated = os.stat(tmp_path / "d.img").st_blocks * 512
    assert allocated < 2 * MiB
    proc = vd(tmp_path, "compact", "d.img", expect=0)
    assert "Compacted" in proc.stdout
    assert file_bytes(tmp_path / "d.img") == before
    assert vd(tmp_path, "compact", "-q", "-f", "raw", "d.img", expect=0).stdout == ""


# -- in process: what a subprocess cannot provoke -------------------------------------------

def _runner():
    from click.testing import CliRunner

    return CliRunner()


def _invoke(args):
    from vdtool.cli import main

    return _runner().invoke(main, args, prog_name="vdtool")


@pytest.mark.parametrize("exc,code,fragment", [
    (ValueError("boom"), 1, "internal error: ValueError: boom (run with --debug for the traceback)"),
    (OSError(28, "No space left on device", "out.img"), 1, "out.img: No space left on device"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_exceptions_become_one_line(tmp_path, monkeypatch, exc, code, fragment):
    info_mod = importlib.import_module("vdtool.core.ops")  # commands import the public names

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(info_mod, "info", boom)
    result = _invoke(["info", str(tmp_path / "x")])
    assert result.exit_code == code
    assert result.stderr.strip() == f"vdtool: error: {fragment}"
    assert "Traceback" not in result.output


def test_operation_cancelled_exit_130(tmp_path, monkeypatch):
    compact_mod = importlib.import_module("vdtool.core.ops")  # commands import the public names
    from vdtool.core.errors import OperationCancelled

    def cancelled(*a, **k):
        raise OperationCancelled("interrupted")

    monkeypatch.setattr(compact_mod, "compact", cancelled)
    result = _invoke(["compact", str(tmp_path / "x")])
    assert result.exit_code == 130
    assert result.stderr.strip() == "vdtool: error: interrupted"


def test_debug_shows_traceback(tmp_path, monkeypatch):
    info_mod = importlib.import_module("vdtool.core.ops")  # commands import the public names

    def boom(*a, **k):
        raise ValueError("boom")

    monkeypatch.setattr(info_mod, "info", boom)
    result = _invoke(["--debug", "info", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "ValueError: boom" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("vdtool: error: internal error: ValueError")


def test_debug_subprocess_vderror(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vdtool", "--debug", "info", "nope.img"], cwd=tmp_path,
                          capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and proc.stderr.strip().endswith("vdtool: error: nope.img: no such file")


def test_ctrl_c_stops_at_next_progress_report():
    """First SIGINT: the op stops at its next progress report with
    OperationCancelled; the previous handler comes back afterwards."""
    from vdtool.core.errors import OperationCancelled
    from vdtool.progressbar import operation

    before = signal.getsignal(signal.SIGINT)
    reports = []
    with pytest.raises(OperationCancelled):
        with operation("Testing", quiet=True) as progress:
            progress.update(10, 100)
            reports.append(1)
            os.kill(os.getpid(), signal.SIGINT)
            progress.update(20, 100)
            reports.append(2)
    assert reports == [1]
    assert signal.getsignal(signal.SIGINT) is before


def test_progress_finish_is_not_cancelled():
    from vdtool.progressbar import operation

    with operation("Testing", quiet=True) as progress:
        os.kill(os.getpid(), signal.SIGINT)
        progress.finish(100)  # the work is done: success stays success


def test_ctrl_c_during_convert(tmp_path):
    """A real SIGINT during convert: exit 130, one clean line, no DST."""
    size = 256 * MiB
    with open(tmp_path / "src.img", "wb") as f:
        chunk = os.urandom(MiB)
        for _ in range(size // MiB):
            f.write(chunk)
    proc = subprocess.Popen([sys.executable, "-m", "vdtool", "convert", "-p", "--verify", "src.img", "dst.img"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    # wait for the bar: the op is running
    buf = ""
    while "Converting" not in buf:
        ch = proc.stderr.read(1)
        if not ch:
            break
        buf += ch
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    err = buf + err
    assert "Traceback" not in err
    if proc.returncode == 0:
        pytest.skip("convert finished before the signal arrived")
    assert proc.returncode == 130, err
    assert err.rstrip().endswith("vdtool: error: interrupted")
    assert sorted(os.listdir(tmp_path)) == ["src.img"]


def test_broken_pipe_is_quiet(tmp_path):
    vd(tmp_path, "create", "-q", "d.img", "1M", expect=0)
    proc = subprocess.Popen([sys.executable, "-m", "vdtool", "info", "--chain", "d.img"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_check_text_report():
    from vdtool.commands.check import text_report
    from vdtool.core.backend import CheckResult

    assert text_report(CheckResult()) == ["No errors were found on the image."]
    r = CheckResult(leaks=3, image_end_offset=327680, total_clusters=16, allocated_clusters=8,
                    fragmented_clusters=2)
    lines = text_report(r)
    assert "3 leaked clusters were found on the image." in lines
    assert "8/16 = 50.00% allocated, 25.00% fragmented, 0.00% compressed clusters" in lines
    assert lines[-1] == "Image end offset: 327680"
    r = CheckResult(corruptions=2, leaks=1, messages=["ERROR cluster 5 refcount=0 reference=1"])
    lines = text_report(r)
    assert lines[0].startswith("ERROR") and "2 errors were found on the image." in lines
    r = CheckResult(leaks=4, leaks_fixed=4)
    lines = text_report(r)
    assert "The following inconsistencies were found and repaired:" in lines
    assert "    4 leaked clusters" in lines and lines[-1] == "No errors were found on the image."


# -- qcow2, judged by qemu-img ---------------------------------------------------------------

def test_create_qcow2_judged_by_qemu(tmp_path):
    from peers import assert_qemu_check_clean, qemu_info

    proc = vd(tmp_path, "create", "d.qcow2", "64M", expect=0)
    assert "fmt=qcow2" in proc.stdout
    assert_qemu_check_clean(tmp_path / "d.qcow2")
    q = qemu_info(tmp_path / "d.qcow2")
    assert q["format"] == "qcow2" and q["virtual-size"] == 64 * MiB
    d = info_json(tmp_path, "d.qcow2")
    assert d["format"] == "qcow2" and d["virtual-size"] == 64 * MiB and d["cluster-size"] == q["cluster-size"]
    out = vd(tmp_path, "check", "d.qcow2", expect=0).stdout
    assert "No errors were found on the image." in out
    j = json.loads(vd(tmp_path, "check", "--output", "json", "d.qcow2", expect=0).stdout)
    assert j["filename"] == "d.qcow2" and j["format"] == "qcow2" and j["check-errors"] == 0


def test_convert_raw_qcow2_raw_judged_by_qemu(tmp_path):
    from peers import assert_qemu_check_clean, assert_qemu_compare

    vd(tmp_path, "create", "-q", "src.img", "8M", expect=0)
    write_at(tmp_path / "src.img", 3 * MiB + 512, pattern(200000))
    vd(tmp_path, "convert", "--verify", "src.img", "mid.qcow2", expect=0)
    assert_qemu_check_clean(tmp_path / "mid.qcow2")
    assert_qemu_compare(tmp_path / "src.img", tmp_path / "mid.qcow2")
    vd(tmp_path, "convert", "-q", "mid.qcow2", "back.img", expect=0)
    assert file_bytes(tmp_path / "back.img") == file_bytes(tmp_path / "src.img")


def test_qcow2_overlay_merge_rebase(tmp_path):
    from peers import assert_qemu_check_clean, qemu_io

    vd(tmp_path, "create", "-q", "base.qcow2", "4M", expect=0)
    qemu_io(tmp_path / "base.qcow2", "write -P 0x11 0 1M", fmt="qcow2")
    vd(tmp_path, "create", "-q", "-b", "base.qcow2", "top.qcow2", expect=0)
    assert info_json(tmp_path, "top.qcow2")["virtual-size"] == 4 * MiB
    qemu_io(tmp_path / "top.qcow2", "write -P 0x22 512K 1M", fmt="qcow2")
    vd(tmp_path, "convert", "-q", "top.qcow2", "flat.img", expect=0)
    flat = file_bytes(tmp_path / "flat.img")
    assert flat[:512 << 10] == b"\x11" * (512 << 10) and flat[512 << 10:1536 << 10] == b"\x22" * MiB
    chain = info_json(tmp_path, "top.qcow2", "--chain")
    assert [c["filename"].split("/")[-1] for c in chain] == ["top.qcow2", "base.qcow2"]
    vd(tmp_path, "merge", "-q", "top.qcow2", expect=0)
    assert not (tmp_path / "top.qcow2").exists()
    assert_qemu_check_clean(tmp_path / "base.qcow2")
    vd(tmp_path, "convert", "-q", "base.qcow2", "merged.img", expect=0)
    assert file_bytes(tmp_path / "merged.img") == flat


def test_empty_file_f_raw_is_fine(tmp_path):
    (tmp_path / "empty.img").write_bytes(b"")
    assert info_json(tmp_path, "empty.img", "-f", "raw")["virtual-size"] == 0
