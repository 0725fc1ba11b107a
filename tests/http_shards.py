"""Test helper: a real HTTP server on loopback (stdlib, threaded, port 0) serving a shard folder,
with faults a user meets on real networks: a connection cut mid-shard, 500s that recover."""
from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ShardServer:
    """Serves the files of ``root`` at ``url``; supports ``Range: bytes=N-``.

    Args:
        root: the folder served.
        cut: file name -> byte offset: every response for it stops at that absolute byte and the
            connection is closed (its Content-Length still promises the whole body).
        cut_once: like ``cut``, only for the first request of that file (a resumed read succeeds).
        fail_first: file name -> how many requests answer 500 before it is served.
        stall_first: file name -> how many requests send their headers, then nothing for ``stall_s``.
        ranges: honour ``Range`` (False: answer 200 with the whole file, as some servers do).
    """

    def __init__(self, root: Path, cut: dict[str, int] | None = None, cut_once: dict[str, int] | None = None,
                 fail_first: dict[str, int] | None = None, stall_first: dict[str, int] | None = None,
                 stall_s: float = 2.0, ranges: bool = True) -> None:
        self.root, self.cut, self.cut_once = Path(root), dict(cut or {}), dict(cut_once or {})
        self.fail_first = dict(fail_first or {})
        self.stall_first, self.stall_s = dict(stall_first or {}), stall_s
        self.ranges = ranges
        self.requests: list[tuple[str, str, int]] = []  # (name, Range header or "", status)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "ShardServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/").split("?", 1)[0]
                rng = self.headers.get("Range", "") if server.ranges else ""
                with server._lock:
                    failing = server.fail_first.get(name, 0) > 0
                    if failing:
                        server.fail_first[name] -= 1
                    cut = server.cut.get(name, server.cut_once.pop(name, None))
                    stall = server.stall_first.get(name, 0) > 0
                    if stall:
                        server.stall_first[name] -= 1
                path = server.root / name
                status = 500 if failing else 404 if not path.is_file() else 206 if rng else 200
                server.requests.append((name, rng, status))
                if status >= 400:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    return
                data = path.read_bytes()
                start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng else 0
                self.send_response(status)
                self.send_header("Content-Length", str(len(data) - start))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Connection", "close")
                self.end_headers()
                if stall:
                    self.wfile.flush()
                    time.sleep(server.stall_s)
                    self.close_connection = True
                    return
                end = len(data) if cut is None else max(start, cut)
                self.wfile.write(data[start:end])
                self.wfile.flush()
                self.close_connection = True

        return Handler
