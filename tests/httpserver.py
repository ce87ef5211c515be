"""A local HTTP server for tests that read images from URLs: it serves one
folder over HTTP/1.1 (keep-alive) in a thread, honours Range requests, and
misbehaves on demand through the switches of ``Faults``.

    with serve(folder) as srv:
        url = srv.url("disk.qcow2")
        srv.faults.status = [503, 503]     # the next two requests fail
        ...
        srv.count                          # requests answered so far"""

from __future__ import annotations

import os
import re
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Faults:
    """What the server does wrong.  Lists are consumed one item a request."""

    def __init__(self):
        self.ranges = True  # False: ignore Range, answer 200 with the whole file
        self.status: list = []  # statuses to answer the next requests with (transient errors)
        self.always: int = 0  # a status every request gets (a permanent failure)
        self.drop: list = []  # for the next requests: send this many body bytes, then cut the connection
        self.lie: int = 0  # Content-Length this many bytes larger than the body sent (then close)
        self.html: bool = False  # answer every request with a 200 HTML page
        self.stall: list = []  # seconds to wait before answering the next requests
        self.retry_after: str = ""  # Retry-After sent with error statuses


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        with self.server.lock:
            self.server.connections += 1
        super().setup()

    def log_message(self, *args):  # quiet
        pass

    def do_HEAD(self):
        self._answer(head=True)

    def do_GET(self):
        self._answer(head=False)

    def _answer(self, head: bool):
        srv = self.server
        f: Faults = srv.faults
        with srv.lock:
            srv.count += 1
            srv.log.append((self.command, self.path, self.headers.get("Range")))
            status = f.status.pop(0) if f.status else f.always
            drop = f.drop.pop(0) if f.drop else None
            stall = f.stall.pop(0) if f.stall else 0
        if stall:
            time.sleep(stall)
        if self.path.startswith("http://"):  # asked as a proxy: serve the path of the URL
            self.path = "/" + self.path.split("/", 3)[3]
            with srv.lock:
                srv.proxied += 1
        m = re.match(r"^/redirect/(\d+)(/.*)$", self.path)
        if m:
            n = int(m.group(1))
            self._send_empty(302, {"Location": f"/redirect/{n - 1}{m.group(2)}" if n > 1 else m.group(2)})
            return
        if status:
            extra = {"Retry-After": f.retry_after} if f.retry_after else {}
            self._send_body(status, b"<html><body>server error</body></html>", "text/html", extra)
            return
        if f.html:
            self._send_body(200, b"<!DOCTYPE html><html><body>Please log in</body></html>", "text/html")
            return
        path = os.path.join(srv.folder, self.path.split("?", 1)[0].lstrip("/"))
        if not os.path.isfile(path):
            self._send_body(404, b"<html><body>not found</body></html>", "text/html")
            return
        size = os.path.getsize(path)
        rng = self.headers.get("Range")
        start, end, code = 0, size - 1, 200
        if rng and f.ranges:
            m = re.match(r"bytes=(\d+)-(\d*)$", rng)
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            if start >= size:
                self._send_empty(416, {"Content-Range": f"bytes */{size}"})
                return
            code = 206
        with open(path, "rb") as fh:
            fh.seek(start)
            body = fh.read(end - start + 1) if size else b""
        headers = {"Accept-Ranges": "bytes" if f.ranges else "none", "ETag": '"v1"'}
        if code == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._send_body(code, body, "application/octet-stream", headers, head=head, drop=drop, lie=f.lie)

    def _send_empty(self, code: int, headers: dict):
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_body(self, code, body, ctype, headers=None, head=False, drop=None, lie=0):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) + lie))
        if drop is not None or lie:
            self.send_header("Connection", "close")
        self.end_headers()
        if head:
            return
        if drop is not None:
            self.wfile.write(body[:drop])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)
        if lie:
            self.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, folder: str, tls=None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.folder = folder
        self.faults = Faults()
        self.lock = threading.Lock()
        self.count = 0  # requests
        self.connections = 0  # TCP connections accepted
        self.proxied = 0  # requests that named a whole URL (this server used as a proxy)
        self.log: list = []  # (method, path, Range header) of each request
        self.scheme = "http"
        if tls:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.socket = ctx.wrap_socket(self.socket, server_side=True)
            self.scheme = "https"

    def url(self, name: str = "") -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}/{name}"

    def reset(self) -> None:
        with self.lock:
            self.faults = Faults()
            self.count = 0
            self.connections = 0
            self.proxied = 0
            self.log = []


@contextmanager
def serve(folder, tls=None):
    """The server for ``folder``; ``tls``: (certfile, keyfile) to serve https."""
    srv = Server(str(folder), tls)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
