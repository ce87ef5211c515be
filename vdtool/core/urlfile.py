"""An image read over HTTP or HTTPS: ``HttpFile``, the read side of
ImageFile for ``http://`` and ``https://`` names (standard library only).

Every read is an HTTP Range request (``Range: bytes=A-B``) on one kept-alive
connection.  The first request asks for the first 64 KiB: its
``Content-Range: bytes 0-N/SIZE`` gives the size and proves that the server
honours Range (a server that answers 200 with the whole file is refused, as
is an empty file or an HTML page).  Reads go through a cache of 64 KiB
blocks, CACHE_BYTES for all open URLs together; a miss that continues an earlier read
fetches ahead, doubling up to MAX_FETCH, so a sequential copy costs one
request per 4 MiB and a scattered metadata read one per block.

Transient failures (5xx, 429, 408, timeouts, reset or dropped
connections, a body shorter than promised) are retried with exponential
back-off, at most TRIES times in a row without progress; a body cut short
is resumed from where it stopped.  Redirects are followed (never from https
to http).  Proxies come from the usual ``*_proxy`` variables; https checks
the server's certificate with the default SSL context."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import OrderedDict, deque

from vdtool.core.errors import CorruptImageError, VdError
from vdtool.core.sourcefile import SourceFile

BLOCK = 64 << 10  # cache granule, and the first request's size (the probe's head)
MAX_FETCH = 4 << 20  # the most one request asks for
CACHE_BYTES = 16 << 20  # all open URLs together (a chain of remote images shares it)
TRIES = 6  # attempts in a row that make no progress before giving up
FIRST_DELAY = 0.1  # seconds before the first retry; doubles, up to MAX_DELAY
MAX_DELAY = 2.0
MAX_RETRY_AFTER = 5.0  # longest Retry-After honoured
MAX_RESUMES = 1000  # attempts that made progress (resumed bodies) per request
MAX_REDIRECTS = 5
TIMEOUT_ENV = "VDTOOL_HTTP_TIMEOUT"
DEFAULT_TIMEOUT = 30.0  # seconds to connect, and between bytes of an answer
_ERROR_BODY = 64 << 10  # what is read of an answer that is not the data, to keep the connection
_REDIRECTS = (301, 302, 303, 307, 308)
_TRANSIENT = (408, 425, 429)

# Idle kept-alive connections by origin: the probe, the --untrusted
# inspection and the backend each open the URL, and should not each connect.
_idle: dict = {}
_idle_lock = threading.Lock()


class _BlockCache:
    """The blocks read from every open URL, least recently used evicted
    first, CACHE_BYTES in all: memory stays bounded however long the
    chain of remote images."""

    def __init__(self):
        self._blocks: OrderedDict = OrderedDict()  # (file serial, block number) -> bytes
        self._lock = threading.Lock()
        self._serial = 0

    def new_serial(self) -> int:
        with self._lock:
            self._serial += 1
            return self._serial

    def get(self, key):
        with self._lock:
            blk = self._blocks.get(key)
            if blk is not None:
                self._blocks.move_to_end(key)
            return blk

    def put(self, key, blk: bytes) -> None:
        with self._lock:
            self._blocks[key] = blk
            self._blocks.move_to_end(key)
            while len(self._blocks) * BLOCK > CACHE_BYTES:
                self._blocks.popitem(last=False)

    def has(self, key) -> bool:
        with self._lock:
            return key in self._blocks

    def forget(self, serial: int) -> None:
        with self._lock:
            for key in [k for k in self._blocks if k[0] == serial]:
                del self._blocks[key]

    def bytes_held(self) -> int:
        with self._lock:
            return len(self._blocks) * BLOCK


CACHE = _BlockCache()


class HttpError(VdError):
    """The server refused or failed; ``status`` is the HTTP status (None for
    a network failure)."""

    def __init__(self, message: str, path: str, status=None):
        super().__init__(message, path)
        self.status = status

    @property
    def not_found(self) -> bool:
        return self.status in (404, 410)


class _Transient(Exception):
    """A failure worth retrying; ``retry_after``: the server's wish, seconds."""

    def __init__(self, reason: str, retry_after=None, status=None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.status = status
        self.filled = 0  # how much of the buffer was filled before the failure


def timeout() -> float:
    try:
        value = float(os.environ.get(TIMEOUT_ENV, "") or DEFAULT_TIMEOUT)
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if value > 0 else DEFAULT_TIMEOUT


class HttpFile(SourceFile):
    """The file at ``url``, read-only, through Range requests.  ``requests``
    counts the requests sent (tests use it to show read-ahead works)."""

    def __init__(self, url: str):
        self.path = url
        self._url = url  # where requests go: the last redirect's target
        self._lock = threading.RLock()
        self._conn = None
        self._conn_origin = None
        self._reused = False
        self._serial = CACHE.new_serial()  # this file's blocks in CACHE
        self._ends: deque = deque(maxlen=4)  # where recent reads ended (read-ahead)
        self._window = BLOCK
        self._etag = None
        self._size = None
        self._closed = False
        self.requests = 0
        self._origin_of = (url, _origin(url, url))  # a URL without a host is refused before anything is sent
        try:
            head = self._fetch(0, BLOCK)
        except BaseException:
            self.close()
            raise
        self._store(0, head)

    # -- the file interface --------------------------------------------------------
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; shorter only at the end."""
        if offset < 0 or length < 0:
            raise CorruptImageError(f"read of {length} bytes at offset {offset} is out of range", self.path)
        end = min(offset + length, self._size)
        if offset >= end:
            return b""
        with self._lock:
            sequential = any(e - BLOCK <= offset <= e + BLOCK for e in self._ends)
            self._ends.append(end)
            parts = []
            pos = offset
            while pos < end:
                b = pos // BLOCK
                blk = CACHE.get((self._serial, b))
                if blk is None:
                    blk = self._fill(b, end, sequential)
                lo = pos - b * BLOCK
                hi = min(len(blk), end - b * BLOCK)
                parts.append(blk[lo:hi] if lo or hi < len(blk) else blk)
                pos = b * BLOCK + hi
            return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        CACHE.forget(self._serial)
        conn, self._conn = self._conn, None
        if conn is not None:
            with _idle_lock:
                old = _idle.pop(self._conn_origin, None)
                _idle[self._conn_origin] = conn
            if old is not None:
                old.close()

    # -- the block cache -------------------------------------------------------------
    def _fill(self, block: int, need_end: int, sequential: bool) -> bytes:
        """Fetch the missing run of blocks from ``block``: up to ``need_end``,
        and further while the reads are sequential (the window doubles).
        Returns block ``block`` (the cache may drop it at once for another)."""
        self._window = min(self._window * 2, MAX_FETCH) if sequential else BLOCK
        first = block * BLOCK
        want = min(max(need_end, first + self._window), first + MAX_FETCH, self._size)
        last = -(-want // BLOCK)  # blocks [block, last)
        k = block + 1
        while k < last and not CACHE.has((self._serial, k)):
            k += 1
        end = min(k * BLOCK, self._size)
        data = self._fetch(first, end - first)
        self._store(first, data)
        return data[:BLOCK]

    def _store(self, offset: int, data: bytes) -> None:
        for i in range(0, len(data), BLOCK):
            CACHE.put((self._serial, (offset + i) // BLOCK), data[i:i + BLOCK])

    # -- requests with retries -----------------------------------------------------
    def _fetch(self, start: int, length: int) -> bytes:
        """Bytes [start, start + length) (the first request: up to length),
        resumed and retried until complete or given up."""
        buf = bytearray(length)
        filled = 0
        fails = resumes = 0
        delay = FIRST_DELAY
        while filled < length:
            before = filled
            try:
                filled = self._get_range(start, buf, filled)
                if self._size is not None and start + filled >= self._size:
                    return bytes(buf[:filled]) if filled < length else bytes(buf)
                continue  # a server may send less than asked: ask for the rest
            except HttpError:
                self._drop_connection()  # an answer may be left half read
                raise
            except _Transient as t:
                self._drop_connection()
                filled = max(filled, t.filled)
                if filled > before:
                    resumes += 1
                    fails = 0
                    if resumes <= MAX_RESUMES:
                        continue  # it progressed: resume at once
                fails += 1
                if fails >= TRIES or resumes > MAX_RESUMES:
                    raise HttpError(f"{t.reason} (gave up after {fails + resumes} tries)", self.path,
                                    t.status) from None
                wait = delay
                if t.retry_after is not None:
                    wait = max(wait, min(t.retry_after, MAX_RETRY_AFTER))
                time.sleep(wait)
                delay = min(delay * 2, MAX_DELAY)
        return bytes(buf)

    def _get_range(self, start: int, buf: bytearray, filled: int) -> int:
        """One ranged GET for the rest of ``buf``; returns how much of it is
        filled afterwards (less than asked when the server sent a shorter
        range or the connection dropped: then _Transient is raised)."""
        a = start + filled
        b = start + len(buf) - 1
        resp = self._send(a, b)
        status = resp.status
        if status == 206:
            ra, rb, total = self._content_range(resp, a, b)
            return self._read_body(resp, buf, filled, rb - ra + 1)
        if status == 200 and a == 0 and self._size is None and resp.length is not None \
                and 0 < resp.length <= len(buf):
            # the whole file in one answer, no bigger than asked: a small file needs no more
            self._refuse_html(resp, status)
            self._check_same(resp.length, resp)
            return self._read_body(resp, buf, filled, resp.length)
        self._finish(resp)
        if status == 200:
            self._refuse_html(resp, status)
            if resp.getheader("Content-Length", "").strip() == "0":
                raise HttpError("the server reports an empty file (size 0): there is no image to read",
                                self.path, status)
            raise HttpError(f"the server ignores Range requests (it answered 'Range: bytes={a}-{b}' with "
                            f"the whole file, HTTP 200); vdtool reads URLs only from servers that support "
                            f"Range", self.path, status)
        if status == 416:
            total = _total_of(resp.getheader("Content-Range", ""))
            if total == 0 or (total is None and self._size is None):
                raise HttpError("the server reports an empty file (size 0): there is no image to read",
                                self.path, status)
            self._check_same(total, resp)
            raise HttpError(f"the server refused the range {a}-{b} of a file of {self._size} bytes (HTTP 416)",
                            self.path, status)
        reason = f"HTTP {status} {resp.reason}".rstrip()
        if status >= 500 or status in _TRANSIENT:
            raise _Transient(reason, _retry_after(resp), status)
        raise HttpError(reason, self.path, status)

    def _content_range(self, resp, a: int, b: int) -> tuple:
        """(first, last, total) of a 206 answer, checked against what was asked."""
        self._refuse_html(resp, 206)
        enc = (resp.getheader("Content-Encoding") or "identity").strip().lower()
        if enc not in ("identity", ""):
            raise HttpError(f"the server sent the data encoded ({enc}) although vdtool asked for it as is",
                            self.path, 206)
        text = resp.getheader("Content-Range", "")
        got = _parse_content_range(text)
        if got is None:
            raise HttpError(f"the server's partial answer has no usable Content-Range ({text!r})", self.path, 206)
        ra, rb, total = got
        if total is None or total <= 0:
            raise HttpError(f"the server does not say the file's size (Content-Range {text!r})", self.path, 206)
        self._check_same(total, resp)
        if ra != a or rb > b or rb < ra or rb >= total:
            raise HttpError(f"the server sent bytes {ra}-{rb} of {total} when asked for {a}-{b}", self.path, 206)
        length = resp.getheader("Content-Length")
        if length is not None and length.strip() != str(rb - ra + 1):
            raise HttpError(f"the server's Content-Length ({length.strip()}) does not match its Content-Range "
                            f"({text}: {rb - ra + 1} bytes)", self.path, 206)
        return ra, rb, total

    def _check_same(self, total, resp) -> None:
        """The file must not change (size, ETag) while it is read."""
        etag = resp.getheader("ETag")
        if self._size is None:
            self._size, self._etag = total, etag
            return
        if total is not None and total != self._size:
            raise HttpError(f"the file changed on the server while it was read (size {self._size}, now {total})",
                            self.path)
        if etag and self._etag and etag != self._etag and not etag.startswith("W/"):
            raise HttpError(f"the file changed on the server while it was read (ETag {self._etag}, now {etag})",
                            self.path)

    def _refuse_html(self, resp, status: int) -> None:
        ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
        if ctype in ("text/html", "application/xhtml+xml"):
            raise HttpError(f"the server sent an HTML page (HTTP {status}, Content-Type {ctype}), not an image",
                            self.path, status)

    def _read_body(self, resp, buf: bytearray, filled: int, count: int) -> int:
        """Read ``count`` bytes of the answer into ``buf`` after ``filled``."""
        view = memoryview(buf)
        want = filled + count
        while filled < want:
            try:
                n = resp.readinto(view[filled:want])
            except (OSError, ValueError, _http_errors()) as e:
                t = _Transient(f"the connection failed after {filled} of {len(buf)} bytes ({_why(e)})")
                t.filled = filled
                raise t from None
            if not n:
                t = _Transient(f"the server sent {filled} of the {len(buf)} bytes it promised, then stopped")
                t.filled = filled
                raise t
            filled += n
        self._finish(resp)
        return filled

    # -- one request ------------------------------------------------------------
    def _send(self, a: int, b: int):
        """The answer to ``GET Range: bytes=a-b``, after redirects.  Network
        failures and a dropped kept-alive connection raise _Transient."""
        for _ in range(MAX_REDIRECTS + 1):
            resp = self._request(a, b)
            if resp.status not in _REDIRECTS:
                return resp
            location = resp.getheader("Location")
            self._finish(resp)
            if not location:
                raise HttpError(f"HTTP {resp.status} redirect without a Location", self.path, resp.status)
            from urllib.parse import urljoin

            target = urljoin(self._url, location.strip())
            scheme = target.split(":", 1)[0].lower()
            if scheme not in ("http", "https"):
                raise HttpError(f"redirected to {target!r}: only http and https are followed", self.path)
            if scheme == "http" and self._url.lower().startswith("https:"):
                raise HttpError(f"redirected from https to {target!r}: vdtool does not follow https to http",
                                self.path)
            self._url = target
        raise HttpError(f"more than {MAX_REDIRECTS} redirects", self.path)

    def _request(self, a: int, b: int):
        if self._origin_of[0] != self._url:
            self._origin_of = (self._url, _origin(self._url, self.path))
        origin, target, headers = self._origin_of[1]
        for stale_retry in (True, False):
            conn = self._connection(origin)
            headers = dict(headers, Range=f"bytes={a}-{b}")
            self.requests += 1
            try:
                conn.request("GET", target if not getattr(conn, "_vd_absolute", False) else self._url,
                             headers=headers)
                return conn.getresponse()
            except (OSError, _http_errors()) as e:
                reused = self._reused
                self._drop_connection()
                if isinstance(e, ssl_errors()):
                    raise HttpError(_tls_failure(e), self.path) from None
                if isinstance(e, socket.gaierror):
                    raise HttpError(f"cannot find the host {origin[1]!r} ({_why(e)})", self.path) from None
                if isinstance(e, ConnectionRefusedError) and not reused:
                    # nothing listens there: a wrong port or host, not a passing failure (curl agrees)
                    raise HttpError(f"connection refused by {origin[1]} port {origin[2]}", self.path) from None
                if reused and stale_retry:
                    continue  # the server closed the idle connection: reconnect at once
                raise _Transient(f"{_why(e)}") from None

    def _connection(self, origin):
        if self._conn is not None and self._conn_origin == origin:
            self._reused = True
            return self._conn
        self._drop_connection()
        with _idle_lock:
            conn = _idle.pop(origin, None)
        self._reused = conn is not None
        if conn is None:
            conn = _connect(*origin)
        self._conn, self._conn_origin = conn, origin
        return conn

    def _finish(self, resp) -> None:
        """Read what is left of an answer so the connection can be reused;
        a long one closes the connection instead."""
        try:
            if resp.length is None or resp.length > _ERROR_BODY:
                if not resp.isclosed():
                    self._drop_connection()
            else:
                resp.read()
            if resp.will_close:
                self._drop_connection()
        except (OSError, ValueError, _http_errors()):
            self._drop_connection()

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        self._reused = False
        if conn is not None:
            conn.close()


# -- helpers --------------------------------------------------------------------

def _http_errors():
    import http.client

    return http.client.HTTPException


def ssl_errors():
    try:
        import ssl
    except ImportError:  # a Python without ssl: there is no TLS to fail
        return ()
    return (ssl.SSLCertVerificationError, ssl.SSLError)


def _tls_failure(e: BaseException) -> str:
    if getattr(e, "verify_message", None):
        return (f"TLS failure: certificate verify failed: {e.verify_message} (the certificates trusted are the "
                f"system's; SSL_CERT_FILE can name another bundle)")
    return f"TLS failure: {_why(e)}"


def _why(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return f"no answer within {timeout():g} s"
    if isinstance(e, ssl_errors()):
        return getattr(e, "reason", None) or str(e)
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text if isinstance(e, OSError) or str(e) else type(e).__name__


def _origin(url: str, name: str) -> tuple:
    """((scheme, host, port, proxy), request target, headers) for ``url``."""
    from urllib.parse import unquote, urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise VdError(f"not a usable URL ({e})", name) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise VdError("not a usable URL (vdtool reads http://HOST/PATH and https://HOST/PATH)", name)
    port = port or (443 if scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    from vdtool import __version__

    headers = {"User-Agent": f"vdtool/{__version__}", "Accept-Encoding": "identity"}
    if parts.username is not None:
        import base64

        cred = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(cred).decode("ascii")
    return (scheme, parts.hostname, port, _proxy(scheme, parts.hostname)), target, headers


def _proxy(scheme: str, host: str):
    """(host, port) of the proxy the environment names for ``scheme``, or None."""
    if not any(k.lower().endswith("_proxy") for k in os.environ) or _loopback(host):
        return None  # a proxy cannot reach this machine's loopback
    import urllib.request
    from urllib.parse import urlsplit

    proxy = urllib.request.getproxies_environment().get(scheme)
    if not proxy or urllib.request.proxy_bypass_environment(host):
        return None
    p = urlsplit(proxy if "://" in proxy else "http://" + proxy)
    return (p.hostname, p.port or 8080) if p.hostname else None


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _connect(scheme: str, host: str, port: int, proxy):
    import http.client

    t = timeout()
    if scheme == "https":
        import ssl

        ctx = ssl.create_default_context()
        if proxy:
            conn = http.client.HTTPSConnection(proxy[0], proxy[1], timeout=t, context=ctx)
            conn.set_tunnel(host, port)
            return conn
        return http.client.HTTPSConnection(host, port, timeout=t, context=ctx)
    if proxy:
        conn = http.client.HTTPConnection(proxy[0], proxy[1], timeout=t)
        conn._vd_absolute = True  # a plain-http proxy takes the whole URL as the request target
        return conn
    return http.client.HTTPConnection(host, port, timeout=t)


def _parse_content_range(text: str):
    """'bytes A-B/TOTAL' -> (A, B, TOTAL or None for '*'); None if malformed."""
    unit, _, rest = text.strip().partition(" ")
    rng, _, total = rest.strip().partition("/")
    a, _, b = rng.partition("-")
    if unit.lower() != "bytes" or not (a.isdigit() and b.isdigit()):
        return None
    if total.strip() == "*":
        return int(a), int(b), None
    if not total.strip().isdigit():
        return None
    return int(a), int(b), int(total)


def _total_of(text: str):
    """The size in a 416 answer's 'bytes */TOTAL'."""
    _, _, total = text.partition("/")
    return int(total) if total.strip().isdigit() else None


def _retry_after(resp):
    value = (resp.getheader("Retry-After") or "").strip()
    return float(value) if value.isdigit() else None
