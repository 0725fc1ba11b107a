"""Reading shards and indexes that live behind a URL (object stores, HTTP), without shell pipes.

``open_stream(url)`` gives a read-only byte stream of any shard or ``dataset.json``:

* local paths: the file itself;
* ``http://`` / ``https://``: a small stdlib (``urllib``) reader that resumes an interrupted
  body with an HTTP ``Range`` request. fsspec's HTTP back-end needs ``aiohttp`` (and its
  async stack: ``yarl``, ``multidict``, ``frozenlist``, ...) and runs an event-loop thread
  in each process, which forked DataLoader workers would have to re-create; a sequential
  reader needs none of it, and Range-resume is the only part of HTTP it needs;
* every other scheme fsspec knows (``s3://``, ``gs://``, ``az://``, ``hf://``, ``memory://``,
  ...): the fsspec file system, whose back-end reads credentials from its usual environment
  / config files (``AWS_*``, ``~/.aws``, ``GOOGLE_APPLICATION_CREDENTIALS``, ``HF_TOKEN``, ...),
  never from maevit's configs;
* ``pipe:``: webdataset's ``gopen`` (callers refuse it unless ``data.allow_pipe``).

Remote streams are read by one background thread per open shard, at most
``READ_AHEAD`` chunks of ``CHUNK`` bytes ahead of the tar reader (bounded memory,
network time overlapped with decoding). A failed open or read is retried from the
byte where it stopped, ``RETRIES`` times with exponential back-off; a network call
waits at most ``TIMEOUT_S``. When a shard stays unreachable, the stream ends at
the last good byte and its ``error`` (a ``RemoteReadError``) names the (redacted) URL,
the tries and the last cause: the tar reader counts the samples it did not get as
``unreadable_shard``, exactly as for a local tar truncated at that byte.

Credentials never travel in maevit's URLs: the sources refuse a URL that holds them
(:func:`holds_credentials`: ``user:password@``, a token / signature / key in the query),
since the run's ``config.yaml`` would keep it; printed URLs go through :func:`redact`
(``user:password@`` and every query value become ``***``).
"""
from __future__ import annotations

import io
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from typing import IO, Callable

CHUNK = 1 << 20  # bytes per network read
READ_AHEAD = 8  # chunks buffered ahead of the reader, per open shard (8 MiB)
TIMEOUT_S = 60.0  # one connect / read may wait this long
RETRIES = 5  # tries after the first, from the byte where the last one stopped
BACKOFF_S = 0.5  # wait before retry k: BACKOFF_S * 2**k, at most 30 s

_PERMANENT_HTTP = {400, 401, 403, 404, 405, 410, 416}  # retrying cannot help


class RemoteReadError(OSError):
    """A remote shard or index could not be read (after retries); the message names the URL and the cause."""


def is_remote(url: str) -> bool:
    """A URL with a scheme (``s3://``, ``http://``, ``memory://``, ...) other than ``file://`` and ``pipe:``."""
    return "://" in url and not url.startswith("file://")


_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_QUERY_VALUE = re.compile(r"([?&][^=&#\s]+=)[^&#\s]*")


_SECRET_PARAM = re.compile(r"[?&](?:[^=&#]*(?:token|sig|signature|secret|password|passwd|credential|key)[^=&#]*"
                           r"|X-Amz-[^=&#]*|X-Goog-[^=&#]*|se|sp|sv)=", re.IGNORECASE)


def holds_credentials(url: str) -> bool:
    """Whether ``url`` carries credentials: ``user:password@`` or a query parameter named like a token,
    signature or key (signed URLs), which maevit would otherwise save in the run's config."""
    return "@" in url.split("://", 1)[-1].split("/", 1)[0] or bool(_SECRET_PARAM.search(url))


def redact(text: str) -> str:
    """``text`` with the credentials of any URL in it replaced by ``***`` (user:password, query values)."""
    return _QUERY_VALUE.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


def _filesystem(url: str):
    """The fsspec file system and path of ``url``; a clear error when its back-end is missing."""
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as exn:
        extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure",
                 "abfss": "azure", "hf": "hf"}.get(protocol)
        hint = f"pip install 'maevit[{extra}]'" if extra else "install the fsspec back-end it names"
        raise RemoteReadError(f"{redact(url)}: reading {protocol}:// needs an fsspec back-end that is not "
                              f"installed ({exn}); {hint}.") from None
    except ValueError as exn:
        raise RemoteReadError(f"{redact(url)}: unknown URL scheme {protocol}:// ({exn}).") from None
    return fs, path


def _http_open(url: str, offset: int) -> tuple[IO[bytes], int | None]:
    """An HTTP response body from byte ``offset`` and the number of bytes it should hold (None: unknown)."""
    headers = {"User-Agent": "maevit"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    length = resp.headers.get("Content-Length")
    length = int(length) if length is not None else None
    if offset and resp.status != 206:  # the server ignored Range: the whole body again, skip what was read
        skipped = 0
        while skipped < offset:
            got = len(resp.read(min(CHUNK, offset - skipped)))
            if not got:
                raise ConnectionError(f"the body ended at byte {skipped} while skipping to {offset}")
            skipped += got
        length = None if length is None else length - offset
    return resp, length


def _fsspec_open(url: str, offset: int) -> tuple[IO[bytes], int | None]:
    fs, path = _filesystem(url)
    f = fs.open(path, "rb", block_size=CHUNK)
    f.seek(offset)
    size = getattr(f, "size", None)
    return f, (size - offset) if size is not None else None


def _retryable(exn: BaseException) -> bool:
    if isinstance(exn, urllib.error.HTTPError):
        return exn.code not in _PERMANENT_HTTP
    return not isinstance(exn, (FileNotFoundError, PermissionError, IsADirectoryError, RemoteReadError))


def _cause(exn: BaseException) -> str:
    if isinstance(exn, urllib.error.HTTPError):
        return f"HTTP {exn.code} {exn.reason}"
    return f"{type(exn).__name__}: {exn}"


class _Chunks:
    """Chunks of a remote body in order, reopening at the byte where a failed read stopped."""

    def __init__(self, url: str, opener: Callable[[str, int], tuple[IO[bytes], int | None]], retries: int) -> None:
        self.url, self.opener, self.retries = url, opener, retries
        self.offset = 0

    def __iter__(self):
        tries, last = 0, None
        while True:
            try:
                body, length = self.opener(self.url, self.offset)
                with body:
                    end = None if length is None else self.offset + length
                    while True:
                        data = body.read(CHUNK)
                        if not data:
                            if end is not None and self.offset < end:  # urllib returns b"" on a cut body
                                raise ConnectionError(f"connection closed at byte {self.offset} of {end}")
                            return
                        self.offset += len(data)
                        tries = 0  # progress: the next failure gets all its tries again
                        yield data
            except Exception as exn:  # noqa: BLE001 - every failure is retried or reported with its URL
                last = exn
                if not _retryable(exn) or tries >= self.retries:
                    at = f" at byte {self.offset}" if self.offset else ""
                    raise RemoteReadError(
                        f"{redact(self.url)}: unreachable{at} after {tries + 1} tries ({redact(_cause(last))})"
                    ) from None
                time.sleep(min(30.0, BACKOFF_S * 2 ** tries))
                tries += 1


class RemoteStream(io.RawIOBase):
    """A read-only stream of a remote body, read by a background thread at most ``read_ahead`` chunks ahead.

    When the body stays unreadable (after the retries), the stream ends where the good bytes end and
    ``error`` holds the ``RemoteReadError``: the tar reader then sees exactly what it sees in a local
    tar cut at that byte, and counts the same samples as lost. ``close`` stops the thread.
    """

    def __init__(self, url: str, opener: Callable[[str, int], tuple[IO[bytes], int | None]],
                 retries: int | None = None, read_ahead: int = READ_AHEAD) -> None:
        super().__init__()
        self.url = url
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, read_ahead))
        self._stop = threading.Event()
        self._buf, self._at, self._done = memoryview(b""), 0, False
        self._thread = threading.Thread(target=self._fill, args=(_Chunks(url, opener, RETRIES if retries is None else retries),), daemon=True,
                                        name=f"maevit-read {redact(url)}")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, chunks: _Chunks) -> None:
        try:
            for data in chunks:
                if not self._put(data):
                    return
            self._put(b"")
        except BaseException as exn:  # handed to the reader
            self._put(exn)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._at >= len(self._buf) and not self._done:
            wait = TIMEOUT_S * (RETRIES + 2) + 60  # the thread's reads time out; this guards a back-end that hangs
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = RemoteReadError(f"{redact(self.url)}: no data for {wait:.0f} s")
            if isinstance(item, BaseException):
                self.error, item = item, b""
            self._done = not item
            self._buf, self._at = memoryview(item), 0
        n = min(len(b), len(self._buf) - self._at)
        b[:n] = self._buf[self._at:self._at + n]
        self._at += n
        return n

    def close(self) -> None:
        self._stop.set()
        super().close()


def open_stream(url: str, retries: int | None = None) -> IO[bytes]:
    """A binary stream of ``url`` (local path, remote URL, or ``pipe:`` command) from its start."""
    if url.startswith("pipe:"):
        import webdataset as wds

        return wds.gopen(url, "rb")
    if url.startswith("file://"):
        url = url[len("file://"):]
    if not is_remote(url):
        return open(url, "rb")
    if url.startswith(("http://", "https://")):
        return RemoteStream(url, _http_open, retries)
    _filesystem(url)  # a missing back-end is reported now, not as a lost shard
    return RemoteStream(url, _fsspec_open, retries)


def read_bytes(url: str) -> bytes:
    """The whole content of ``url`` (an index: small); ``RemoteReadError`` / ``OSError`` when unreadable."""
    with open_stream(url) as f:
        data = f.read()
        if getattr(f, "error", None) is not None:
            raise f.error
        return data


def upload(local: str, url: str) -> None:
    """Copy a local file to ``url`` (any fsspec scheme) with the same retries as reading."""
    fs, path = _filesystem(url)
    for tries in range(RETRIES + 1):  # noqa: B007
        try:
            fs.put_file(local, path)
            return
        except Exception as exn:  # noqa: BLE001
            if not _retryable(exn) or tries == RETRIES:
                raise RemoteReadError(f"{redact(url)}: upload failed after {tries + 1} tries "
                                      f"({redact(_cause(exn))})") from None
            time.sleep(min(30.0, BACKOFF_S * 2 ** tries))
