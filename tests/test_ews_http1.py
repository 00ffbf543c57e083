"""The read path's HTTP/1.1 exchange (gateway/sources/ews/http1.py), on a real socket pair: what it sends, and every
way an answer can be framed, coded, cut or malformed. Through the EWS source end to end: tests/test_ews_wire.py."""

from __future__ import annotations

import gzip
import http.client
import io
import socket
import threading
import time
import zlib
from collections.abc import Iterator

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st
from requests.cookies import extract_cookies_to_jar

from gateway.sources.ews import http1, transport

REQUEST = http1.request_head("/EWS/Exchange.asmx", "mail.contoso.com",
                             {"User-Agent": "ua", "Accept-Encoding": "gzip, deflate", "Content-Length": "4"}) + b"body"


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def answered(pair: tuple[socket.socket, socket.socket], *parts: bytes, close: bool = False,
             timeout: float = 5) -> http1.Answer:
    """The exchange, with the server's answer written in ``parts`` (each a separate send) once the request came."""
    ours, theirs = pair
    got = bytearray()

    def server() -> None:
        while not got.endswith(b"body"):
            got.extend(theirs.recv(65536))
        for part in parts:
            theirs.sendall(part)
        if close:
            theirs.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=server)
    t.start()
    try:
        return http1.exchange(ours, REQUEST, timeout)
    finally:
        t.join()
        assert bytes(got) == REQUEST


def test_a_request_is_written_as_http_client_writes_it() -> None:
    assert REQUEST == (b"POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: mail.contoso.com\r\nUser-Agent: ua\r\n"
                       b"Accept-Encoding: gzip, deflate\r\nContent-Length: 4\r\n\r\nbody")


def test_an_answer_by_content_length_in_pieces_keeps_the_connection(pair) -> None:  # type: ignore[no-untyped-def]
    a = answered(pair, b"HTTP/1.1 200 OK\r\nContent-Type: text/xml; charset=utf-8\r\nContent-Len",
                 b"gth: 10\r\n\r\n01234", b"56789")
    assert (a.status, a.reason, a.body, a.keep_alive) == (200, "OK", b"0123456789", True)
    assert a.headers["content-type"] == "text/xml; charset=utf-8"


def test_a_chunked_answer_with_extensions_and_trailers_is_joined(pair) -> None:  # type: ignore[no-untyped-def]
    a = answered(pair, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n",
                 b"1", b"\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n")
    assert (a.body, a.keep_alive) == (b"hello 0123456789", True)


@pytest.mark.parametrize("coding,encode", [("gzip", gzip.compress), ("deflate", zlib.compress),
                                           ("deflate", lambda b: zlib.compress(b)[2:-4])])  # (raw deflate too)
def test_a_body_in_a_content_coding_is_decoded(pair, coding, encode) -> None:  # type: ignore[no-untyped-def]
    body = encode(b"<xml>" * 1000)
    a = answered(pair, b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s"
                 % (coding.encode(), len(body), body))
    assert a.body == b"<xml>" * 1000


def test_a_gzip_body_of_two_members_is_decoded_whole(pair) -> None:  # type: ignore[no-untyped-def]
    body = gzip.compress(b"first ") + gzip.compress(b"second")
    a = answered(pair, b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    assert a.body == b"first second"


def test_connection_close_and_http_1_0_end_the_connection(pair) -> None:  # type: ignore[no-untyped-def]
    a = answered(pair, b"HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\nContent-Length: 2\r\n\r\nno")
    assert (a.status, a.body, a.keep_alive) == (500, b"no", False)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        b = answered((ours, theirs), b"HTTP/1.0 200 OK\r\n\r\nto the end", close=True)
    assert (b.body, b.keep_alive) == (b"to the end", False)


def test_repeated_headers_are_joined_and_the_head_kept_for_the_cookie_jar(pair) -> None:  # type: ignore[no-untyped-def]
    a = answered(pair, b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; path=/\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n")
    assert a.headers["set-cookie"] == "a=1; path=/, b=2"
    assert a.head == b"Set-Cookie: a=1; path=/\r\nSet-Cookie: b=2\r\nContent-Length: 0"


_NAMES = st.sampled_from(["Set-Cookie", "set-cookie", "SET-COOKIE", "Set-Cookie2", "Content-Length", "X-Other"])
_VALUES = st.text(st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=40)
_SPACES = st.sampled_from(["", " ", "  ", "\t", " \t"])


@given(st.lists(st.tuples(_NAMES, _SPACES, _VALUES), max_size=8))
def test_the_cookie_jar_reads_a_head_as_http_client_parses_it(lines: list[tuple[str, str, str]]) -> None:
    """transport.HeadLines stands in for http.client's parsed head when the jar takes an answer's cookies."""
    head = "\r\n".join(f"{name}:{space}{value}" for name, space, value in lines).encode("iso-8859-1")
    parsed = http.client.parse_headers(io.BytesIO(head + b"\r\n\r\n"))
    ours = transport.HeadLines(head)
    for name in ("Set-Cookie", "set-cookie", "Set-Cookie2", "X-Absent"):
        assert ours.get_all(name, []) == parsed.get_all(name, [])
        assert ours.get_all(name) == parsed.get_all(name)
    request = transport._as_request("https://mail.contoso.com/EWS/Exchange.asmx", {})
    jars = [requests.cookies.RequestsCookieJar(), requests.cookies.RequestsCookieJar()]
    for jar, msg in zip(jars, (parsed, ours), strict=True):
        extract_cookies_to_jar(jar, request, type("R", (), {"_original_response": type("O", (), {"msg": msg})}))
    assert [vars(c) for c in jars[0]] == [vars(c) for c in jars[1]]


def test_an_answers_routing_cookies_reach_the_jar_from_its_head_lines() -> None:
    head = (b"Content-Length: 0\r\nSet-Cookie: X-BackEndCookie=route-1; path=/; HttpOnly\r\n"
            b"set-cookie:\tb=2; expires=Tue, 09 Jun 2099 10:18:14 GMT")
    jar = requests.cookies.RequestsCookieJar()
    original = type("R", (), {"_original_response": type("O", (), {"msg": transport.HeadLines(head)})})
    extract_cookies_to_jar(jar, transport._as_request("https://mail.contoso.com/EWS/Exchange.asmx", {}), original)
    assert jar.get_dict() == {"X-BackEndCookie": "route-1", "b": "2"}


def test_the_cookie_header_is_made_again_only_when_the_jars_cookies_change_or_expire(
        monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str | None] = []
    real = transport.get_cookie_header

    def counted(jar, request):  # type: ignore[no-untyped-def]
        made.append(real(jar, request))
        return made[-1]
    monkeypatch.setattr(transport, "get_cookie_header", counted)
    url, other = "https://mail.contoso.com/EWS/Exchange.asmx", "https://mail.fabrikam.com/EWS/Exchange.asmx"
    session = requests.Session()
    jar = session.cookies
    jar.set("X-BackEndCookie", "route-1", domain="mail.contoso.com", path="/")

    def header(to: str = url) -> str | None:
        return transport._cookie_header(session, to, {})
    assert [header(), header()] == ["X-BackEndCookie=route-1"] * 2 and len(made) == 1
    jar.set("X-BackEndCookie", "route-2", domain="mail.contoso.com", path="/")  # a new value
    assert [header(), header()] == ["X-BackEndCookie=route-2"] * 2 and len(made) == 2
    next(iter(jar)).secure = True  # a cookie changed in place: https still gets it
    assert header() == "X-BackEndCookie=route-2" and len(made) == 3
    assert header(other) is None and len(made) == 4  # another host: not its cookie
    now = time.time()
    jar.set("b", "2", domain="mail.contoso.com", path="/", expires=int(now) + 60)
    assert header() == "X-BackEndCookie=route-2; b=2" and len(made) == 5
    monkeypatch.setattr(time, "time", lambda: now + 61)  # b has expired: not sent, and dropped from the jar
    assert [header(), header()] == ["X-BackEndCookie=route-2"] * 2 and len(made) == 6
    assert [c.name for c in jar] == ["X-BackEndCookie"]


def test_an_interim_answer_is_skipped_and_a_204_has_no_body(pair) -> None:  # type: ignore[no-untyped-def]
    a = answered(pair, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    assert (a.status, a.body, a.keep_alive) == (204, b"", True)


def test_bytes_after_the_answer_end_the_connection(pair) -> None:  # type: ignore[no-untyped-def]
    a = answered(pair, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
    assert (a.body, a.keep_alive) == (b"ok", False)


@pytest.mark.parametrize("answer,says", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "closed in the answer's body"),
    (b"HTTP/1.1 200 OK\r\nContent-Le", "closed in the answer's head"),
    (b"ICY 200 OK\r\n\r\n", "status line"),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "status line"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "header line"),
    (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n", "header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "transfer coding"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n", "chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n", "chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n", "longer than its size"),
    (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nbad", "content coding"),
    (b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"x" * 70000 + b"\r\n\r\n", "head over 64 KiB"),
    (b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", "101 header lines"),
    (b"HTTP/1.1 100 Continue\r\n\r\n" * 11 + b"HTTP/1.1 200 OK\r\n\r\n", "more than 10 interim answers"),
])
def test_an_answer_it_does_not_read_is_a_protocol_error(pair, answer, says) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(http1.ProtocolError, match=says):
        answered(pair, answer, close=True)


def test_an_answer_that_does_not_come_times_out(pair) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TimeoutError):
        answered(pair, b"HTTP/1.1 200 OK\r\n", timeout=0.2)


def test_a_connection_closed_before_any_answer_is_a_connection_error(pair) -> None:  # type: ignore[no-untyped-def]
    # (a kept connection the server had closed meanwhile: a read is sent again the usual way, a Subscribe is not)
    with pytest.raises(ConnectionAbortedError, match="without response"):
        answered(pair, close=True)
