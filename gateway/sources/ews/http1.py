"""One HTTP/1.1 request and its whole answer on a connected socket (RFC 9112): the read path's exchange with
Exchange on a connection NTLM has authenticated (sources/ews/transport.py).

urllib3 and http.client spend about 250 µs of CPU a request besides the bytes (some 900 Python calls: each header
checked and written on its own, the answer's head parsed by the email package, the answer wrapped twice and its body
read through two layers of buffers), and an import makes four requests a room. Here a request is one ``sendall`` and
its answer a few ``recv`` into one buffer, split where HTTP/1.1 says: a status line, header lines, then the body by
its chunks, by Content-Length, or up to the close.

Anything it does not expect (a malformed or oversized head, an answer cut short, folded header lines) is a
``ProtocolError``, a connection closed before any answer an OSError: the caller closes the connection and sends a
read the usual way, where urllib3 and requests judge the answer as they always did. A body in a content coding is
decoded by urllib3's decoders.
"""

from __future__ import annotations

import io
import socket
from dataclasses import dataclass

from urllib3 import HTTPHeaderDict, HTTPResponse

MAX_HEAD = 65536  # bytes of an answer's status line and headers (http.client allows a line this long)
MAX_HEADERS = 100  # header lines (http.client's limit)
MAX_INTERIM = 10  # 1xx answers before the real one (a server sending them for ever is not waited for)
_RECV = 262144  # bytes asked of the socket at a time (a room's answer is some 100 KB)


class ProtocolError(Exception):
    """The answer is not one this reads (the caller sends the request the usual way)."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    reason: str
    headers: HTTPHeaderDict  # as urllib3 gives them: by name, a repeated header's values joined by ", "
    head: bytes  # the header lines as they came (for the cookie jar, which reads Set-Cookie from them)
    body: bytes  # decoded, when it came in a content coding
    keep_alive: bool  # whether the connection can carry the next request


def request_head(path: str, host: str, headers: dict[str, str]) -> bytes:
    """The head of a POST as http.client writes it: the request line, Host, then ``headers`` in their order (which
    must hold User-Agent, Accept-Encoding and Content-Length, as the read path's do: urllib3 and http.client add
    their own otherwise)."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def exchange(sock: socket.socket, request: bytes, timeout: float) -> Answer:
    """Send ``request`` (head and body) and read its answer whole. OSError (TimeoutError among them) as the socket
    raises it; ProtocolError for an answer this does not read."""
    sock.settimeout(timeout)
    sock.sendall(request)
    reader = _Reader(sock)
    for _ in range(MAX_INTERIM + 1):
        status, reason, version, headers, head = reader.head()
        if not 100 <= status < 200:
            break  # (an interim answer, 100 Continue: the real one follows, as http.client skips it)
    else:
        raise ProtocolError(f"more than {MAX_INTERIM} interim answers")
    connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = ("close" not in connection) if version == "HTTP/1.1" else ("keep-alive" in connection)
    if status in (204, 304):
        body = b""
    elif "transfer-encoding" in headers:
        codings = [t.strip().lower() for t in headers["transfer-encoding"].split(",")]
        if codings[-1] != "chunked":
            raise ProtocolError(f"transfer coding {headers['transfer-encoding']!r}")
        body = reader.chunked()
    elif "content-length" in headers:
        lengths = {v.strip() for v in headers["content-length"].split(",")}
        if len(lengths) != 1 or not next(iter(lengths)).isdigit():
            raise ProtocolError(f"Content-Length {headers['content-length']!r}")
        body = reader.exactly(int(lengths.pop()))
    else:
        body = reader.to_close()
        keep_alive = False
    if reader.left():
        keep_alive = False  # (bytes after the answer: the connection cannot say where the next one starts)
    coding = headers.get("content-encoding", "").strip().lower()
    if coding and coding != "identity":
        body = _decoded(body, status, headers)
    return Answer(status, reason, headers, head, body, keep_alive)


def _decoded(body: bytes, status: int, headers: HTTPHeaderDict) -> bytes:
    """The body in its content coding, decoded as urllib3 decodes it (gzip of several members, deflate with or
    without its zlib header, and br or zstd where their modules are installed)."""
    try:
        return HTTPResponse(body=io.BytesIO(body), headers=headers, status=status, preload_content=False,
                            decode_content=True).read()
    except Exception as e:  # (urllib3's DecodeError, or a coding it does not know)
        raise ProtocolError(f"content coding {headers.get('content-encoding')!r}: {e}") from e


class _Reader:
    """An answer's bytes as they arrive: one buffer, read from by position."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.at = 0

    def _more(self, what: str) -> None:
        chunk = self.sock.recv(_RECV)
        if not chunk:
            if not self.buf:  # (a kept connection the server had closed meanwhile, as http.client says it)
                raise ConnectionAbortedError("Remote end closed connection without response")
            raise ProtocolError(f"the connection closed in the answer's {what}")
        if self.at > _RECV and self.at * 2 > len(self.buf):  # (what was read is dropped, now and then)
            del self.buf[:self.at]
            self.at = 0
        self.buf += chunk

    def head(self) -> tuple[int, str, str, HTTPHeaderDict, bytes]:
        while (end := self.buf.find(b"\r\n\r\n", self.at)) < 0:
            if len(self.buf) - self.at > MAX_HEAD:
                raise ProtocolError("an answer's head over 64 KiB")
            self._more("head")
        if end - self.at > MAX_HEAD:
            raise ProtocolError("an answer's head over 64 KiB")
        text = self.buf[self.at:end].decode("iso-8859-1")
        self.at = end + 4
        status_line, _, rest = text.partition("\r\n")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
            raise ProtocolError(f"status line {status_line[:100]!r}")
        headers = HTTPHeaderDict()
        lines = rest.split("\r\n") if rest else []
        if len(lines) > MAX_HEADERS:
            raise ProtocolError(f"{len(lines)} header lines")
        for line in lines:
            name, colon, value = line.partition(":")
            if not colon or not name or name[0] in " \t" or name[-1] in " \t":
                raise ProtocolError(f"header line {line[:100]!r}")  # (folded lines too: obsolete, and refused)
            headers.add(name, value.strip(" \t"))
        return int(parts[1]), parts[2] if len(parts) > 2 else "", parts[0], headers, rest.encode("iso-8859-1")

    def exactly(self, n: int) -> bytes:
        while len(self.buf) - self.at < n:
            self._more("body")
        with memoryview(self.buf) as view:  # (one copy: a slice of the bytearray would be another)
            out = bytes(view[self.at:self.at + n])
        self.at += n
        return out

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n", self.at)) < 0:
            if len(self.buf) - self.at > MAX_HEAD:
                raise ProtocolError("a chunk line over 64 KiB")
            self._more("chunks")
        line = bytes(self.buf[self.at:end])
        self.at = end + 2
        return line

    def chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size_text = self._line().split(b";", 1)[0].strip(b" \t")
            if not size_text or size_text.strip(b"0123456789abcdefABCDEF"):  # (int() would take 0x, _ and signs)
                raise ProtocolError(f"chunk size {size_text[:20]!r}")
            size = int(size_text, 16)
            if size == 0:
                while self._line():  # (trailer fields, if any, up to the empty line)
                    pass
                return b"".join(parts)
            parts.append(self.exactly(size))
            if self.exactly(2) != b"\r\n":
                raise ProtocolError("a chunk longer than its size")

    def to_close(self) -> bytes:
        while chunk := self.sock.recv(_RECV):
            self.buf += chunk
        with memoryview(self.buf) as view:
            out = bytes(view[self.at:])
        self.at = len(self.buf)
        return out

    def left(self) -> bool:
        """Whether bytes came after the answer."""
        return len(self.buf) > self.at
