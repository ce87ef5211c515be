"""http:// and https:// URLs as image sources (issue 13, part 3), against a
local HTTP server the tests start (``httpserver.py``) that misbehaves on
demand: no Range support, transient and permanent 5xx, dropped
connections, a Content-Length that lies, 404, HTML pages, redirects, stalls.

Judged by the peers: what vdtool converts from a URL equals byte for byte
what qemu-img converts from the local file; checksums of the URL and the
file are equal; info JSON of the URL equals that of the local file but for
the file names and equals qemu-img's own info of the URL (its curl driver)
key by key.  A remote image never makes vdtool open a local file."""

from __future__ import annotations

import json
import os
import time

import pytest

import peers
from httpserver import serve
from vdrun import cli, vdtool_env
from vdtool.core import urlfile
from vdtool.core.errors import VdError
from vdtool.core.urlfile import HttpError, HttpFile

MiB = 1 << 20
SIZE = 8 * MiB
# qemu-io patterns: data at the start, in the middle and at the end, holes between
WRITES = ("write -P 0x11 0 1M", "write -P 0x5a 3M 64k", "write -P 0x77 7M 1M")
FORMATS = {"qcow2": "qcow2", "vmdk": "vmdk", "vhd": "vpc", "vdi": "vdi", "raw": "raw"}


def _one_error_line(proc, *words):
    err = proc.stderr.strip()
    assert proc.returncode == 1, (proc.returncode, proc.stdout, err)
    assert err.startswith("vdtool: error:") and "\n" not in err, err
    for w in words:
        assert w in err, err
    return err


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder of images made by qemu-img, served over HTTP: a qcow2 over
    a qcow2 backing file named relative (base.qcow2 <- top.qcow2), and the
    same content as vmdk, vhd, vdi and raw."""
    d = tmp_path_factory.mktemp("site")
    peers.qemu_make(d, "base.qcow2", "qcow2", SIZE, *WRITES)
    peers.qemu_make(d, "top.qcow2", "qcow2", None, "write -P 0x33 1536k 512k", "write -z 7M 64k",
                    backing="base.qcow2", backing_fmt="qcow2")
    for ext, drv in FORMATS.items():
        if ext != "qcow2":
            peers.qemu_img("convert", "-O", drv, str(d / "top.qcow2"), str(d / f"disk.{ext}"))
    (d / "empty.raw").write_bytes(b"")
    with serve(d) as srv:
        srv.folder_path = d
        yield srv


@pytest.fixture
def srv(site):
    site.reset()
    yield site
    site.reset()


def _qemu_raw(path, tmp_path, fmt=None):
    return peers.qemu_raw(path, tmp_path, fmt)


# -- content, judged by qemu-img ------------------------------------------------------

@pytest.mark.parametrize("name", ["top.qcow2", "disk.vmdk", "disk.vhd", "disk.vdi", "disk.raw"])
def test_convert_from_url_equals_qemu_convert_of_the_file(srv, tmp_path, name):
    out = tmp_path / "out.raw"
    cli("convert", "-O", "raw", srv.url(name), out, expect=0)
    fmt = FORMATS[name.rsplit(".", 1)[1]]
    assert out.read_bytes() == _qemu_raw(srv.folder_path / name, tmp_path, fmt)


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhd", "vdi"])
def test_convert_from_url_to_every_format(srv, tmp_path, fmt):
    out = tmp_path / f"out.{fmt}"
    cli("convert", "-O", fmt, srv.url("top.qcow2"), out, expect=0)
    peers.assert_qemu_compare(out, srv.folder_path / "top.qcow2", FORMATS[fmt], "qcow2")
    if fmt in ("qcow2", "vdi"):  # the formats qemu-img checks
        peers.assert_qemu_check_clean(out, FORMATS[fmt])


def test_checksum_of_url_equals_checksum_of_file(srv):
    names = ["top.qcow2", "disk.vmdk", "disk.vhd", "disk.vdi", "disk.raw"]
    urls = cli("checksum", *[srv.url(n) for n in names], expect=0).stdout.split()
    files = cli("checksum", *[srv.folder_path / n for n in names], expect=0).stdout.split()
    assert urls[0::2] == files[0::2], (urls, files)
    assert urls[1::2] == [srv.url(n) for n in names]


def _drop_names(d):
    """``d`` without the keys that name files (and actual-size, which a server does not tell)."""
    if isinstance(d, list):
        return [_drop_names(x) for x in d]
    if isinstance(d, dict):
        return {k: _drop_names(v) for k, v in d.items()
                if k not in ("filename", "full-backing-filename", "actual-size")}
    return d


def _assert_subset(theirs, ours, where="info"):
    """Every key qemu-img reports, vdtool reports with the same value (vdtool may report more)."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), (where, ours)
        for k, v in theirs.items():
            assert k in ours, (where, k)
            _assert_subset(v, ours[k], f"{where}.{k}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), (where, ours, theirs)
        for i, (t, o) in enumerate(zip(theirs, ours)):
            _assert_subset(t, o, f"{where}[{i}]")
    else:
        assert ours == theirs, (where, ours, theirs)


@pytest.mark.parametrize("name", ["top.qcow2", "disk.vmdk", "disk.vhd", "disk.vdi"])
def test_info_json_of_url_equals_the_file_and_qemu_img(srv, name):
    url = srv.url(name)
    got = json.loads(cli("info", "--output", "json", "--backing-chain", url, expect=0).stdout)
    local = json.loads(cli("info", "--output", "json", "--backing-chain", srv.folder_path / name,
                           expect=0).stdout)
    assert _drop_names(got) == _drop_names(local)
    assert all("actual-size" not in d for d in got)  # a server does not say (nor does qemu-img)
    theirs = _qemu_info_of_url(url)
    _assert_subset(theirs, got)


def _qemu_info_of_url(url):
    """qemu-img's own info of the URL (its curl driver: package qemu-block-extra)."""
    proc = peers.qemu_img("info", "--output=json", "--backing-chain", url, check=False)
    err = proc.stderr.decode(errors="replace")
    if proc.returncode and ("Unknown protocol" in err or "curl" in err.lower()):
        msg = f"qemu-img cannot read URLs here (apt-get install qemu-block-extra): {err.strip()}"
        if peers.IN_CI:
            pytest.fail(msg + " -- interop tests may not skip in CI")
        pytest.skip(msg)
    assert proc.returncode == 0, err
    return json.loads(proc.stdout)


def test_human_info_of_a_chain_at_urls(srv):
    out = cli("info", "--backing-chain", srv.url("top.qcow2"), expect=0).stdout
    assert f"backing file: base.qcow2 (actual path: {srv.url('base.qcow2')})" in out
    assert f"image: {srv.url('base.qcow2')}" in out and "disk size: unavailable" in out


def test_compare_map_and_check_read_urls(srv):
    cli("compare", srv.url("top.qcow2"), srv.folder_path / "disk.vdi", expect=0)
    cli("compare", srv.url("disk.vhd"), srv.url("disk.raw"), expect=0)
    m_url = json.loads(cli("map", "--output", "json", srv.url("top.qcow2"), expect=0).stdout)
    m_file = json.loads(cli("map", "--output", "json", srv.folder_path / "top.qcow2", expect=0).stdout)
    strip = [{k: v for k, v in e.items() if k != "filename"} for e in m_url]
    assert strip == [{k: v for k, v in e.items() if k != "filename"} for e in m_file]
    assert {e.get("filename") for e in m_url if "filename" in e} <= {srv.url("top.qcow2"), srv.url("base.qcow2")}
    for name in ("top.qcow2", "disk.vmdk", "disk.vhd", "disk.vdi"):
        assert cli("check", srv.url(name), expect=0).stdout == \
            cli("check", srv.folder_path / name, expect=0).stdout.replace(str(srv.folder_path / name), srv.url(name))


# -- bad answers: one line, exit 1 ---------------------------------------------------

def test_server_without_range_support_is_refused(srv):
    srv.faults.ranges = False
    _one_error_line(cli("info", srv.url("disk.raw")), srv.url("disk.raw"), "ignores Range")


def test_a_small_file_sent_whole_needs_no_range(srv):
    small = srv.folder_path / "small.raw"
    small.write_bytes(bytes(range(256)) * 4)
    try:
        for ranges in (True, False):
            srv.faults.ranges = ranges
            f = HttpFile(srv.url("small.raw"))
            try:
                assert f.size() == 1024 and f.pread(1000, 100) == small.read_bytes()[1000:]
            finally:
                f.close()
    finally:
        small.unlink()


def test_transient_5xx_is_retried(srv, tmp_path):
    srv.faults.status = [503, 502, 500]
    srv.faults.retry_after = "0"
    out = tmp_path / "o.raw"
    cli("convert", "-O", "raw", srv.url("top.qcow2"), out, expect=0)
    assert out.read_bytes() == _qemu_raw(srv.folder_path / "top.qcow2", tmp_path)
    srv.reset()
    srv.faults.status = [429]
    cli("info", srv.url("disk.vdi"), expect=0)


@pytest.mark.slow  # 3 s of back-off; test_http_file_gives_up_within_bounds covers it quickly by default
def test_permanent_500_gives_up_soon(srv):
    srv.faults.always = 500
    t = time.monotonic()
    _one_error_line(cli("info", srv.url("disk.raw")), "HTTP 500", "gave up after 6 tries")
    assert time.monotonic() - t < 10
    assert srv.count == urlfile.TRIES


def test_404_403_and_html_pages(srv):
    _one_error_line(cli("convert", "-O", "raw", srv.url("nothere.qcow2"), "x.raw"), "HTTP 404 Not Found")
    srv.faults.always = 403
    _one_error_line(cli("checksum", srv.url("disk.raw")), "HTTP 403 Forbidden")
    srv.reset()
    srv.faults.html = True
    _one_error_line(cli("info", srv.url("disk.raw")), "HTML page")
    assert srv.count == 1  # not retried


def test_dropped_connections_are_resumed(srv, tmp_path):
    # cut after 0 bytes (no progress: retried after a pause), then mid-body (resumed at once)
    srv.faults.drop = [0, 1000, 0, 300000, 70000]
    out = tmp_path / "o.raw"
    cli("convert", "-O", "raw", srv.url("disk.vmdk"), out, expect=0)
    assert out.read_bytes() == _qemu_raw(srv.folder_path / "disk.vmdk", tmp_path)
    assert not srv.faults.drop


def test_body_that_never_comes_gives_up(srv, monkeypatch):
    monkeypatch.setattr(urlfile, "FIRST_DELAY", 0.01)
    srv.faults.drop = [0] * 20
    with pytest.raises(HttpError, match="sent 0 of the 65536 bytes it promised.*gave up after 6 tries"):
        HttpFile(srv.url("disk.raw"))


def test_content_length_that_lies_is_refused(srv):
    srv.faults.lie = 100
    _one_error_line(cli("info", srv.url("disk.raw")), "Content-Length (65636) does not match")


def test_redirects_are_followed_and_parents_resolved_from_the_url_given(srv, tmp_path):
    out = tmp_path / "o.raw"
    url = srv.url("redirect/3/top.qcow2")
    cli("convert", "-O", "raw", url, out, expect=0)
    assert out.read_bytes() == _qemu_raw(srv.folder_path / "top.qcow2", tmp_path)
    info = json.loads(cli("info", "--output", "json", url, expect=0).stdout)
    assert info["full-backing-filename"] == srv.url("redirect/3/base.qcow2")
    _one_error_line(cli("info", srv.url("redirect/9/top.qcow2")), "more than 5 redirects")


def test_a_stalled_server_times_out_and_is_retried(srv, tmp_path):
    srv.faults.stall = [2]
    t = time.monotonic()
    cli("info", srv.url("disk.vdi"), env=vdtool_env(VDTOOL_HTTP_TIMEOUT="0.3"), expect=0)
    assert time.monotonic() - t < 5


def test_http_proxy_from_the_environment(srv):
    proxy = srv.url().rstrip("/")
    env = vdtool_env(http_proxy=proxy, HTTP_PROXY=proxy, no_proxy="", NO_PROXY="")
    out = cli("checksum", "http://vdtool-test.invalid/disk.vdi", env=env, expect=0).stdout.split()[0]
    assert srv.proxied == srv.count > 0
    assert out == cli("checksum", srv.folder_path / "disk.vdi", expect=0).stdout.split()[0]


def test_empty_file_is_refused(srv):
    _one_error_line(cli("info", srv.url("empty.raw")), "empty file (size 0)")


def test_unusable_urls(srv):
    _one_error_line(cli("info", "http:///x.qcow2"), "not a usable URL")
    _one_error_line(cli("info", "http://127.0.0.1:1/x.qcow2"), "connection refused by 127.0.0.1 port 1")


# -- a remote image never opens a local file -------------------------------------------

@pytest.mark.parametrize("backing", ["/etc/passwd", "file:///etc/passwd", "LOCAL", "C:\\disk.vhd"])
def test_remote_image_naming_a_local_backing_file_is_refused(srv, tmp_path, backing):
    if backing == "LOCAL":
        backing = str(srv.folder_path / "base.qcow2")  # exists, readable: still refused
    evil = srv.folder_path / "evil.qcow2"
    peers.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", str(evil), "8M")
    commands = (["info", "--backing-chain"], ["convert", "-O", "raw"], ["checksum"])
    try:
        for args in commands if backing == "/etc/passwd" else commands[:1]:
            extra = [tmp_path / "o.raw"] if args[0] == "convert" else []
            err = _one_error_line(cli(*args, srv.url("evil.qcow2"), *extra), "remote image names",
                                  "may name other files only relative to its URL")
            assert not (tmp_path / "o.raw").exists(), err
        err = _one_error_line(cli("info", "--untrusted", srv.url("evil.qcow2")), "refused by --untrusted")
        assert "external-reference" in err
    finally:
        evil.unlink()


def test_dotdot_in_a_remote_backing_name_stays_on_the_server(srv):
    evil = srv.folder_path / "climb.qcow2"
    peers.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "../../../../etc/passwd", "-F", "raw",
                   str(evil), "8M")
    try:
        d = json.loads(cli("info", "--output", "json", srv.url("climb.qcow2"), expect=0).stdout)
        assert d["parent-found"] is False and srv.url("etc/passwd") in d["parent-problem"]
        _one_error_line(cli("checksum", srv.url("climb.qcow2")), "not found", srv.url("etc/passwd"))
    finally:
        evil.unlink()


def test_remote_vmdk_descriptor_naming_a_local_extent_is_refused(srv):
    desc = srv.folder_path / "evil.vmdk"
    desc.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                    'createType="monolithicFlat"\n\nRW 16 FLAT "/etc/passwd" 0\n\n'
                    'ddb.virtualHWVersion = "4"\n')
    try:
        _one_error_line(cli("checksum", srv.url("evil.vmdk")), "remote image names an absolute local path",
                        "extent")
    finally:
        desc.unlink()


def test_remote_flat_vmdk_reads_its_extent_from_the_server(srv, tmp_path):
    d = srv.folder_path
    peers.qemu_img("convert", "-O", "vmdk", "-o", "subformat=monolithicFlat", str(d / "top.qcow2"),
                   str(d / "flat.vmdk"))
    try:
        out = tmp_path / "o.raw"
        cli("convert", "-O", "raw", srv.url("flat.vmdk"), out, expect=0)
        assert out.read_bytes() == _qemu_raw(d / "top.qcow2", tmp_path)
    finally:
        for p in d.glob("flat*.vmdk"):
            p.unlink()


def test_local_overlay_of_a_remote_base(srv, tmp_path):
    ov = tmp_path / "ov.qcow2"
    cli("create", "-f", "qcow2", "-b", srv.url("top.qcow2"), "-F", "qcow2", ov, expect=0)
    assert peers.qemu_info(ov)["backing-filename"] == srv.url("top.qcow2")
    cli("compare", ov, srv.folder_path / "top.qcow2", expect=0)
    peers.assert_qemu_compare(ov, srv.folder_path / "top.qcow2")


# -- writing to a URL is refused ---------------------------------------------------

@pytest.mark.parametrize("args", [["resize", "URL", "16M"], ["compact", "URL"], ["check", "-r", "all", "URL"],
                                  ["rebase", "-u", "-b", "x.qcow2", "URL"]])
def test_writing_to_a_url_is_refused(srv, args):
    url = srv.url("top.qcow2")
    _one_error_line(cli(*[url if a == "URL" else a for a in args]), url, "read-only")


def test_creating_at_a_url_is_refused(srv, tmp_path):
    url = srv.url("new.qcow2")
    _one_error_line(cli("create", "-f", "qcow2", url, "1M", cwd=tmp_path), url, "cannot be written")
    assert not os.listdir(tmp_path)


# -- requests: read-ahead, probing, bounded cache -----------------------------------------

def test_read_ahead_keeps_requests_few(srv, tmp_path):
    big = srv.folder_path / "big.raw"
    with open(big, "wb") as f:
        for i in range(64):
            f.write(bytes([i + 1]) * 4096 + bytes(MiB - 4096))
    try:
        out = tmp_path / "big.qcow2"
        cli("convert", "-O", "qcow2", srv.url("big.raw"), out, expect=0)
        assert srv.count < 100, srv.count
        assert srv.connections <= 4, srv.connections  # kept alive: one per open of the URL at most
        peers.assert_qemu_compare(out, big, "qcow2", "raw")
    finally:
        big.unlink()


def test_probing_reads_only_the_head_and_tail(srv):
    cli("info", srv.url("disk.raw"), expect=0)
    spans = []
    for method, path, rng in srv.log:
        assert method == "GET" and rng, (method, rng)
        a, b = map(int, rng.split("=")[1].split("-"))
        spans.append((a, b))
    assert all(b - a + 1 <= 64 << 10 for a, b in spans), spans
    assert {a for a, _ in spans} <= {0, SIZE - (64 << 10)}, spans


def test_http_file_cache_and_read_ahead(srv):
    f = HttpFile(srv.url("disk.raw"))
    try:
        local = (srv.folder_path / "disk.raw").read_bytes()
        start = f.requests
        for off in range(0, SIZE, 64 << 10):  # sequential small reads: windows grow to 4 MiB
            assert f.pread(off, 64 << 10) == local[off:off + (64 << 10)]
        assert f.requests - start <= 8, f.requests - start
        assert urlfile.CACHE.bytes_held() <= urlfile.CACHE_BYTES
        import random

        rnd = random.Random(5)
        for _ in range(200):
            off, n = rnd.randrange(SIZE + 100), rnd.randrange(200000)
            assert f.pread(off, n) == local[off:off + n]
        assert urlfile.CACHE.bytes_held() <= urlfile.CACHE_BYTES
        assert f.pread(SIZE - 10, 100) == local[-10:] and f.pread(SIZE, 10) == b""
        with pytest.raises(VdError):
            f.pread(-1, 10)
    finally:
        f.close()
    assert urlfile.CACHE.bytes_held() == 0
    files = [HttpFile(srv.url("disk.raw")) for _ in range(3)]
    try:  # three opens read whole at once share one budget
        for off in range(0, SIZE, MiB):
            for g in files:
                assert len(g.pread(off, MiB)) == MiB
                assert urlfile.CACHE.bytes_held() <= urlfile.CACHE_BYTES
    finally:
        for g in files:
            g.close()


def test_http_file_gives_up_within_bounds(srv, monkeypatch):
    monkeypatch.setattr(urlfile, "FIRST_DELAY", 0.01)
    srv.faults.always = 503
    with pytest.raises(HttpError) as e:
        HttpFile(srv.url("disk.raw"))
    assert "HTTP 503" in str(e.value) and srv.count == urlfile.TRIES
    srv.reset()
    f = HttpFile(srv.url("disk.raw"))
    try:
        srv.faults.always = 500
        with pytest.raises(HttpError, match="HTTP 500"):
            f.pread(5 * MiB, 10)
        srv.faults.always = 0
        assert f.pread(5 * MiB, 10) == (srv.folder_path / "disk.raw").read_bytes()[5 * MiB:5 * MiB + 10]
    finally:
        f.close()


def test_a_file_that_changes_while_read_is_refused(srv):
    path = srv.folder_path / "changing.raw"
    path.write_bytes(bytes(2 * MiB))
    try:
        f = HttpFile(srv.url("changing.raw"))
        try:
            path.write_bytes(bytes(3 * MiB))
            with pytest.raises(HttpError, match="changed on the server"):
                f.pread(MiB, 10)
        finally:
            f.close()
    finally:
        path.unlink()


# -- https ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_site(site, tmp_path_factory):
    """The same folder over https, with a self-signed certificate for 127.0.0.1."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    peers.run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
              "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
              "-addext", "subjectAltName=IP:127.0.0.1")
    with serve(site.folder_path, tls=(str(cert), str(key))) as srv:
        srv.cert, srv.folder_path = cert, site.folder_path
        yield srv


def test_https_checks_the_certificate(tls_site, tmp_path):
    url = tls_site.url("top.qcow2")
    _one_error_line(cli("info", url), url, "TLS failure", "certificate verify failed")
    out = tmp_path / "o.raw"
    cli("convert", "-O", "raw", url, out, env=vdtool_env(SSL_CERT_FILE=str(tls_site.cert)), expect=0)
    assert out.read_bytes() == _qemu_raw(tls_site.folder_path / "top.qcow2", tmp_path)


# -- parents of other formats -------------------------------------------------------

def test_vmdk_and_vhd_children_find_their_parents_on_the_server(srv, tmp_path):
    d = srv.folder_path
    made = [d / "cbase.vmdk", d / "child.vmdk", d / "cbase.vhd", d / "child.vhd"]
    try:
        peers.qemu_img("convert", "-O", "vmdk", str(d / "base.qcow2"), str(made[0]))
        peers.qemu_make(d, "child.vmdk", "vmdk", None, "write -P 0x66 2M 256k", backing="cbase.vmdk",
                        backing_fmt="vmdk")
        cli("convert", "-O", "vhd", d / "base.qcow2", made[2], expect=0)
        cli("create", "-f", "vhd", "-b", made[2], made[3], expect=0)  # relative and absolute locators
        out = tmp_path / "o.raw"
        cli("convert", "-O", "raw", srv.url("child.vmdk"), out, expect=0)
        assert out.read_bytes() == _qemu_raw(made[1], tmp_path)
        sums = cli("checksum", srv.url("child.vhd"), made[3], expect=0).stdout.split()
        assert sums[0] == sums[2]
        info = json.loads(cli("info", "--output", "json", srv.url("child.vhd"), expect=0).stdout)
        assert info["parent-found"] is True
    finally:
        for p in made:
            p.unlink(missing_ok=True)


def test_remote_vdi_child_named_by_uuid_only_is_not_searched_for(srv):
    d = srv.folder_path
    made = [d / "ubase.vdi", d / "uchild.vdi"]
    try:
        cli("create", "-f", "vdi", made[0], "4M", expect=0)
        cli("create", "-f", "vdi", "-b", made[0], made[1], expect=0)  # VirtualBox's way: the parent's UUID only
        d_info = json.loads(cli("info", "--output", "json", srv.url("uchild.vdi"), expect=0).stdout)
        assert d_info["parent-found"] is False and "not searched for" in d_info["parent-problem"]
        _one_error_line(cli("checksum", srv.url("uchild.vdi")), "names only by UUID is not searched for")
    finally:
        for p in made:
            p.unlink(missing_ok=True)


@pytest.mark.slow
def test_big_remote_image_converts_in_bounded_memory(srv, tmp_path):
    """1 GiB read from a URL: peak RSS stays far below the image (the block
    cache is bounded) and a request fetches 4 MiB."""
    import subprocess
    import sys

    big = srv.folder_path / "huge.raw"
    with open(big, "wb") as f:
        f.truncate(1 << 30)
        for i in range(16):
            f.seek(i * 64 * MiB)
            f.write(bytes([i + 1]) * MiB)
    try:
        out = tmp_path / "huge.qcow2"
        proc = subprocess.Popen([sys.executable, "-m", "vdtool", "convert", "-O", "qcow2", srv.url("huge.raw"),
                                 str(out)], env=vdtool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 0, proc.stderr.read()
        assert usage.ru_maxrss < 100 * 1024, usage.ru_maxrss  # KiB
        assert srv.count < (1 << 30) // (4 * MiB) + 20, srv.count
        peers.assert_qemu_compare(out, big, "qcow2", "raw")
    finally:
        big.unlink()


def test_names_in_a_remote_image():
    from vdtool.core import urlnames

    base = "https://h.example/d/x/top.qcow2?sig=1"
    assert urlnames.join(base, "base.qcow2") == "https://h.example/d/x/base.qcow2"
    assert urlnames.join(base, "../b/base image#1.qcow2") == "https://h.example/d/b/base%20image%231.qcow2"
    assert urlnames.join(base, "../../../../etc/passwd") == "https://h.example/etc/passwd"  # stays on the host
    assert urlnames.join(base, ".\\sub\\p.vhd") == "https://h.example/d/x/sub/p.vhd"
    assert urlnames.join(base, "http://other.example/b.qcow2") == "http://other.example/b.qcow2"
    for local in ("/etc/passwd", "\\\\server\\share\\p.vhd", "C:\\disks\\p.vhd", "file:///etc/passwd",
                  "json:{\"file.filename\": \"/etc/passwd\"}", "nbd:localhost:10809"):
        with pytest.raises(urlnames.LocalReference, match="may name other files only relative to its URL"):
            urlnames.join(base, local)
    # VHD records an absolute locator first and a relative one after it: the relative one is used
    assert urlnames.parent_url(base, ["C:\\vms\\p.vhd", "p.vhd"]) == "https://h.example/d/x/p.vhd"
    assert urlnames.parent_url(base, []) is None
