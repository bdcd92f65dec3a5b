"""``embedgate serve``'s HTTP/1.1 protocol (``embedgate.serve_protocol``) on real sockets, under uvicorn.

Each raw exchange also goes to uvicorn's own httptools protocol with the same app: a client must not be able to
tell them apart, but for the ``date`` header, the cases where ours answers 500 where uvicorn's can only close
the connection (the app failed after its response start, a header value that would split the head), and those
where uvicorn's departs from the RFCs and ours follows them, as uvicorn's h11 protocol does (tested on ours alone).
"""

from __future__ import annotations

import asyncio
import contextvars
import gzip
import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson
import pytest
import uvicorn

from embedgate.logs import BODY_PARTS, REQUEST_TASK
from embedgate.serve_protocol import HIGH_WATER, GatewayHttpProtocol

from .conftest import free_port

Response = tuple[int, list[tuple[str, str]], bytes]
EVENTS: list[Any] = []  # what the test apps saw, for the tests that look at it
#: Header values the protocol must refuse (a line break of their own, or a control but tab).
BAD_VALUES = {"crlf": b"ok\r\nset-cookie: stolen=1", "lf": b"ok\nset-cookie: stolen=1", "cr": b"ok\rx",
              "nul": b"a\x00b", "esc": b"\x1b[31m", "del": b"\x7f"}  # fmt: skip


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Echoes what it was asked; ``/chunked`` answers without a length, ``/fail*`` and ``/bad-header`` misbehave."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    if path in _ODD_ANSWERS:
        status, headers, body = _ODD_ANSWERS[path]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": 0})
        return
    if path == "/early":  # answers without reading the body it was sent
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"no"})
        return
    body = b""
    sizes = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            EVENTS.append(("disconnect", path))
            return
        body += message["body"]
        sizes.append(len(message["body"]))
        if not message.get("more_body", False):
            break
    if path == "/fail-before":
        raise RuntimeError("the app failed")
    if path == "/silent":
        return
    if path == "/wait-disconnect":
        EVENTS.append(("waiting", path))
        message = await receive()  # nothing more to read: this waits for the client to go away
        EVENTS.append((message["type"], path))
        return
    if path == "/answer-after-disconnect":  # the client gone, answers all the same, and lets the error through
        EVENTS.append(("waiting", path))
        await receive()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        except OSError as exc:
            EVENTS.append(("send raised", type(exc).__name__))
            raise
        EVENTS.append(("send returned", path))
        return
    if path == "/answer-when-cancelled":  # as the gateway: cut by the shutdown, it answers 503, then is cancelled
        EVENTS.append(("waiting", path))
        try:
            await asyncio.sleep(30)  # an upstream call, deaf to the client leaving
        except asyncio.CancelledError as exc:
            cancelled = exc
        try:
            await send({"type": "http.response.start", "status": 503, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
        except OSError:
            EVENTS.append(("send raised", path))
        raise cancelled
    if path == "/streaming":  # Starlette's StreamingResponse, which under ASGI 2.4 turns send's OSError into its own
        from starlette.responses import StreamingResponse

        async def chunks() -> Any:
            for _ in range(100):
                EVENTS.append(("chunk", path))
                yield b"x" * 1000
                await asyncio.sleep(0.02)

        await StreamingResponse(chunks())(scope, receive, send)
        return
    if path == "/wait-disconnect-twice":  # two receive() at once, as a disconnect listener beside a reader
        EVENTS.append(("waiting", path))
        messages = await asyncio.gather(receive(), receive())
        EVENTS.extend((m["type"], path) for m in messages)
        return
    if path == "/slow":
        await asyncio.sleep(0.3)
    out = orjson.dumps({
        "method": scope["method"], "path": path, "raw_path": scope["raw_path"].decode(),
        "query": scope["query_string"].decode(), "http_version": scope["http_version"], "root_path": scope["root_path"],
        "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]], "body_len": len(body),
        "body_sha": hashlib.sha256(body).hexdigest(), "client": scope["client"] is not None, "scheme": scope["scheme"],
    })  # fmt: skip
    if path == "/big":  # more than a transport buffers before it asks the app to wait
        big = bytes(range(256)) * (16 * 1024)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(big))]})
        await send({"type": "http.response.body", "body": big[: len(big) // 2], "more_body": True})
        await send({"type": "http.response.body", "body": big[len(big) // 2 :]})
        return
    if path == "/big-once":  # the same in one body message: sent once the transport has taken it
        big = bytes(range(256)) * (16 * 1024)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(big))]})
        try:
            await send({"type": "http.response.body", "body": big})
        except OSError:
            EVENTS.append(("send raised", path))
            raise
        EVENTS.append(("sent", path))
        return
    if path == "/chunked":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": out[:10], "more_body": True})
        await send({"type": "http.response.body", "body": out[10:], "more_body": False})
        return
    headers = [(b"Content-Type", b"application/json"), (b"content-length", b"%d" % len(out)), (b"X-Test", b"a b ")]
    if path.startswith("/bad-header-"):
        headers.append((b"x-injected", BAD_VALUES[path.removeprefix("/bad-header-")]))
    if path == "/tab-header":
        headers.append((b"x-tab", b"a\tb"))
    if path == "/close":
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 201 if path == "/created" else 200, "headers": headers})
    if path == "/fail-after-start":
        raise RuntimeError("the app failed after starting its answer")
    if path == "/no-body":
        return
    await send({"type": "http.response.body", "body": out})


#: Answers an app should not send, or sends in odd but valid types: path -> (status, headers, body).
_ODD_ANSWERS: dict[str, tuple[int, list[tuple[bytes, bytes]], Any]] = {
    "/no-content-with-body": (204, [], b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nEVIL!"),
    "/negative-length": (200, [(b"content-length", b"-1")], b"x"),
    "/bytearray-body": (200, [(b"content-length", b"2")], bytearray(b"ok")),
    "/memoryview-body": (200, [(b"content-length", b"2")], memoryview(b"ok")),
    "/status-42": (42, [(b"content-length", b"2")], b"ok"),
    "/status-103": (103, [], b"ok"),
}


@contextmanager
def served(http: Any, *, served_app: Any = app, lifespan: str = "on", before: Callable[[], None] | None = None,
           **config: Any) -> Iterator[tuple[int, uvicorn.Server]]:  # fmt: skip
    """``served_app`` (``app``) under uvicorn in a thread, with the given HTTP protocol; yields the port and the
    server. ``before`` runs in that thread before the server does."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(served_app, host="127.0.0.1", port=port, http=http, lifespan=lifespan,
                                           log_level="critical", access_log=False, **config))  # fmt: skip

    def run() -> None:
        if before is not None:
            before()
        server.run()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield port, server
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def uvicorn_log(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Capture what is logged to uvicorn's ``uvicorn.error`` logger meanwhile, from INFO up. Enter it once the server
    is configured: uvicorn sets that logger's level from its ``log_level`` (``served`` says "critical"), and its
    ``uvicorn`` logger does not propagate to the root's, where caplog listens (without this, nothing was caught)."""
    logger = logging.getLogger("uvicorn.error")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)


class Client:
    """A raw HTTP/1.1 client connection that reads whole answers (length, chunked or until close)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 20)
        self.buf += chunk
        return bool(chunk)

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("closed in the middle of an answer")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("closed before a whole line")
        at = self.buf.index(b"\r\n")
        line = bytes(self.buf[:at])
        del self.buf[: at + 2]
        return line

    def response(self, head_request: bool = False) -> Response:
        status_line = self._line()
        status = int(status_line.split()[1])
        headers = []
        while line := self._line():
            name, _, value = line.decode().partition(":")
            headers.append((name, value.strip()))
        if status == 100:
            return status, headers, b""
        found = {k: v for k, v in headers}
        if head_request or status in (204, 304):
            body = b""
        elif "content-length" in found:
            body = self._take(int(found["content-length"]))
        elif found.get("transfer-encoding") == "chunked":
            body = b""
            while size := int(self._line(), 16):
                body += self._take(size)
                assert self._take(2) == b"\r\n"
            assert self._line() == b""
        else:
            while self._fill():
                pass
            body = bytes(self.buf)
            self.buf.clear()
        return status, headers, body

    def closed(self, wait: float = 2.0) -> bool:
        """Whether the server closed the connection (within ``wait`` seconds, with nothing more to read)."""
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def without_date(response: Response) -> Response:
    status, headers, body = response
    return status, [(k, v) for k, v in headers if k != "date"], body


def exchange(port: int, data: bytes, answers: int, head: bool = False) -> tuple[list[Response], bool]:
    """Send ``data`` on a new connection, read ``answers`` answers; also whether the server then closed it."""
    client = Client(port)
    try:
        client.send(data)
        out = [without_date(client.response(head_request=head)) for _ in range(answers)]
        return out, client.closed(wait=0.3)
    finally:
        client.close()


POST = b'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"a": "b"}\n'
CASES: dict[str, tuple[bytes, int, bool]] = {
    "get with a query": (b"GET /echo?x=1&y=%20 HTTP/1.1\r\nHost: x\r\nX-Trailing: v \t\r\n\r\n", 1, False),
    "post with a length": (POST, 1, False),
    "post chunked": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n", 1, False),
    "answer without a length": (b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n", 1, False),
    "head": (b"HEAD /echo HTTP/1.1\r\nHost: x\r\n\r\n", 1, True),
    "http/1.0": (b"GET /echo HTTP/1.0\r\nHost: x\r\n\r\n", 1, False),
    "pipelined": (POST + b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n" + POST.replace(b"/echo", b"/created"), 3, False),
    "percent-encoded path": (b"GET /a%20b/%C3%A9 HTTP/1.1\r\nHost: x\r\n\r\n", 1, False),
    "absolute-form target": (b"GET http://x/abs?q=1#frag HTTP/1.1\r\nHost: x\r\n\r\n", 1, False),
    "absolute-form target without a query": (b"GET http://x/abs#frag HTTP/1.1\r\nHost: x\r\n\r\n", 1, False),
    "connection close": (b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 1, False),
    "app closes": (b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n", 1, False),
    "a tab in a header value": (b"GET /tab-header HTTP/1.1\r\nHost: x\r\n\r\n", 1, False),
    "answered before its body is read": (b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n"
                                         + b"z" * 20000 + b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n", 2, False),
    "malformed": (b"GET /echo HTTP/1.1\r\nHost x\r\n\r\n", 1, False),
    "app fails before answering": (b"GET /fail-before HTTP/1.1\r\nHost: x\r\n\r\n", 1, False),
    "app returns without answering": (b"GET /silent HTTP/1.1\r\nHost: x\r\n\r\n", 1, False),
}  # fmt: skip


@pytest.fixture(scope="module")
def both() -> Iterator[tuple[int, int]]:
    with served(GatewayHttpProtocol) as (ours, _), served("httptools") as (theirs, _):
        yield ours, theirs


@pytest.mark.parametrize("case", list(CASES))
def test_a_client_sees_what_uvicorns_protocol_answers(both: tuple[int, int], case: str) -> None:
    data, answers, head = CASES[case]
    ours, theirs = both
    got = exchange(ours, data, answers, head)
    if case == "malformed":  # the same status; its body in the gateway's error shape (see below), not plain text
        assert [r[0] for r in got[0]] == [r[0] for r in exchange(theirs, data, answers, head)[0]]
    else:
        assert got == exchange(theirs, data, answers, head)
    responses, _ = got
    if case == "malformed":
        assert responses[0][0] == 400
    elif case in ("app fails before answering", "app returns without answering"):
        assert responses[0][0] == 500
    elif case == "answered before its body is read":
        assert [status for status, _, _ in responses] == [413, 200]
    elif answers:
        assert all(status in (200, 201) for status, _, _ in responses)


# Where uvicorn's httptools protocol departs from the RFCs (its h11 protocol does not), ours follows them.


@pytest.mark.parametrize(
    ("head", "status", "param", "code"),
    [
        (b"POST {path} HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, "headers",
         "request_header_fields_too_large"),
        (b"POST {path} HTTP/1.1\r\n\r\n", 400, "host", "invalid_http_request"),
        (b"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "transfer-encoding",
         "unsupported_transfer_coding"),
        (b"POST {path} HTTP/1.1\r\nHost x\r\n\r\n", 400, None, "invalid_http_request"),
    ],
    ids=["431", "no host", "gzip coding", "malformed"],
)  # fmt: skip
def test_a_request_the_protocol_refuses_is_answered_in_the_routes_error_shape(
    head: bytes, status: int, param: str | None, code: str
) -> None:
    # They were plain text ("Request header fields too large."), which no embedding SDK reads as an error body. The
    # shape is the route's as the gateway matches it: under path_prefix /api, /api/v1/embeddings is OpenAI's route
    # (read from the path alone, it was answered in OpenRouter's shape).
    from embedgate import create_app
    from embedgate.config import parse_config
    from tests.conftest import config_dict

    gateway = create_app(parse_config(config_dict("http://127.0.0.1:9/v1", server={"path_prefix": "/api"}), env={}))
    shapes = {"/api/v1/embeddings": "openai", "/api/api/v1/embeddings": "openrouter",
              "/api/v2/router/embeddings": "orq", "/api/api/v1/embeddings/models": "openrouter",
              "/elsewhere": "openai", "http://api/v1/embeddings?x=/v2/router/": "openai"}  # fmt: skip
    with served(GatewayHttpProtocol, served_app=gateway) as (port, _):
        for path, shape in shapes.items():
            [(got, headers, body)], closed = exchange(port, head.replace(b"{path}", path.encode()), 1)
            assert (got, dict(headers)["content-type"], closed) == (status, "application/json", True)
            error = orjson.loads(body)["error"]
            if shape == "openrouter":  # OpenRouter's: the status as its code, the rest in metadata
                metadata = error["metadata"]
                assert (error["code"], metadata["code"], metadata.get("param")) == (status, code, param), path
            else:
                assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error"), path
            assert error["message"]


def test_an_answer_without_a_length_to_http_1_0_ends_with_the_connection(both: tuple[int, int]) -> None:
    # It went out chunked, which an HTTP/1.0 client cannot read: the chunk sizes became part of its body.
    ours, _ = both
    [(status, headers, body)], closed = exchange(ours, b"GET /chunked HTTP/1.0\r\nHost: x\r\n\r\n", 1)
    assert status == 200 and closed
    assert "transfer-encoding" not in dict(headers)
    assert orjson.loads(body)["http_version"] == "1.0"


def test_a_malformed_request_pipelined_behind_another_is_answered_after_it(both: tuple[int, int]) -> None:
    # Its 400 went out at once, in place of the first request's answer, which was lost with the connection.
    ours, _ = both
    data = b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n" + POST + b"GET /echo HTTP/1.1\r\nHost x\r\n\r\n"
    responses, closed = exchange(ours, data, 3)
    assert [status for status, _, _ in responses] == [200, 200, 400]
    assert [orjson.loads(body)["path"] for _, _, body in responses[:2]] == ["/slow", "/echo"]
    assert closed


@pytest.mark.parametrize(
    "head",
    [
        b"GET /echo HTTP/1.1\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /echo HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
    ],
    ids=["HTTP/1.1 without a Host", "two Hosts", "two Hosts in HTTP/1.0"],
)
def test_a_request_without_exactly_one_host_is_a_400(both: tuple[int, int], head: bytes) -> None:
    # Served like any other (as uvicorn does): RFC 9112, 3.2 says a server MUST answer 400, since which host it
    # was meant for is unknown or ambiguous (a cache or a proxy in front may have read the other Host).
    ours, _ = both
    [(status, _, body)], closed = exchange(ours, head, 1)
    assert status == 400 and b"Host" in body and closed
    # behind a pipelined request: that one answered first
    responses, closed = exchange(ours, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n" + head, 2)
    assert [status for status, _, _ in responses] == [200, 400] and closed
    # HTTP/1.0 may go without one
    [(status, _, _)], _ = exchange(ours, b"GET /echo HTTP/1.0\r\n\r\n", 1)
    assert status == 200


@pytest.mark.parametrize(
    "codings",
    [[b"gzip, chunked"], [b"x, chunked"], [b"identity, chunked"], [b"gzip", b"chunked"]],
    ids=["gzip, chunked", "unknown, chunked", "identity, chunked", "two lines"],
)
def test_a_transfer_coding_other_than_chunked_is_a_501(both: tuple[int, int], codings: list[bytes]) -> None:
    # llhttp reads such a body by its last coding, chunked: the app was handed a gzip-coded body as if it were
    # the JSON (RFC 9112, 6.1: a coding the server does not understand is a 501).
    ours, _ = both
    body = gzip.compress(b'{"a": 1}')
    lines = b"".join(b"Transfer-Encoding: %s\r\n" % coding for coding in codings)
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n"
    [(status, _, text)], closed = exchange(ours, head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body), 1)
    assert status == 501 and b"transfer coding" in text and closed
    # chunked alone, in any case, and with empty list elements (RFC 9110, 5.6.1), is read
    for coding in (b"Chunked", b", chunked", b" ,chunked"):
        chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: %s\r\n\r\n2\r\nok\r\n0\r\n\r\n" % coding
        [(status, _, _)], _ = exchange(ours, chunked, 1)
        assert status == 200, coding


def _until(event: tuple[str, str], deadline: float) -> None:
    """Wait (polling) until the test app has recorded ``event``."""
    while event not in EVENTS:
        assert time.monotonic() < deadline, EVENTS
        time.sleep(0.01)


@pytest.mark.parametrize("when", ["with it", "once it waits"])
def test_a_client_leaving_tells_the_request_being_answered_behind_a_pipelined_one(both: tuple[int, int],
                                                                                    when: str) -> None:  # fmt: skip
    # Only the last request read (the pipelined one, waiting its turn) learned of it: the one being answered
    # waited for ever, and its next send raised. Pipelined once it waited, the request paused reading, so the
    # client's leaving was never read at all (the connection, and a graceful shutdown, waited for ever too).
    ours, _ = both
    EVENTS.clear()
    client = Client(ours)
    first = b"POST /wait-disconnect HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    pipelined = b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"
    deadline = time.monotonic() + 5
    if when == "with it":
        client.send(first + pipelined)
        _until(("waiting", "/wait-disconnect"), deadline)
    else:
        client.send(first)
        _until(("waiting", "/wait-disconnect"), deadline)
        client.send(pipelined)
        time.sleep(0.1)
    client.close()
    _until(("http.disconnect", "/wait-disconnect"), deadline)


@pytest.mark.parametrize(
    ("request_bytes", "started", "ended"),
    [
        # ASGI 2.4: send raises an OSError once the client is gone, so the app knows its answer was lost (the gateway
        # logs it as a 499); it returned silently, as uvicorn's does. The app letting it through is no app failure.
        (b"POST /answer-after-disconnect HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
         ("waiting", "/answer-after-disconnect"), ("send raised", "ClientGone")),
        # A host's StreamingResponse (Starlette raises ClientDisconnect when send raises, under ASGI 2.4) to a client
        # that left would be logged as "Exception in ASGI application", with a traceback.
        (b"GET /streaming HTTP/1.1\r\nHost: x\r\n\r\n", ("chunk", "/streaming"), None),
    ],
    ids=["send raises", "a framework's own ClientDisconnect"],
)  # fmt: skip
def test_a_client_leaving_is_told_by_send_and_is_no_app_failure(
    both: tuple[int, int], caplog: pytest.LogCaptureFixture, request_bytes: bytes, started: tuple[str, str],
    ended: tuple[str, str] | None,
) -> None:  # fmt: skip
    ours, _ = both
    EVENTS.clear()
    client = Client(ours)
    client.send(request_bytes)
    deadline = time.monotonic() + 5
    _until(started, deadline)
    with uvicorn_log(caplog):
        client.close()
        if ended is not None:
            _until(ended, deadline)
        time.sleep(0.3)
    assert EVENTS.count(("chunk", "/streaming")) < 100  # a stream stopped
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_graceful_shutdown_cutting_an_answer_being_read_logs_no_app_failure(caplog: pytest.LogCaptureFixture) -> None:
    # The last send waits while the client reads a large answer; cancelled there by the graceful shutdown's timeout,
    # the request was logged as "Exception in ASGI application" with a traceback.
    EVENTS.clear()
    with served(GatewayHttpProtocol, timeout_graceful_shutdown=1) as (port, server):
        with uvicorn_log(caplog):
            client = Client(port)
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.send(b"GET /big-once HTTP/1.1\r\nHost: x\r\n\r\n")  # 4 MB, read by nobody
            time.sleep(0.5)
            server.should_exit = True
            deadline = time.monotonic() + 10
            while server.started and not server.force_exit and time.monotonic() < deadline:
                if not server.server_state.tasks and not server.server_state.connections:
                    break
                time.sleep(0.05)
        client.close()
    assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]


def test_a_graceful_shutdown_cutting_a_request_whose_client_left_logs_no_app_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Cancelled by the graceful shutdown's timeout, the request's answer could not go out (its client had left): the
    # cancellation was logged as "Exception in ASGI application", a traceback on every deploy with a slow upstream.
    EVENTS.clear()
    with served(GatewayHttpProtocol, timeout_graceful_shutdown=1) as (port, server):
        with uvicorn_log(caplog):
            client = Client(port)
            client.send(b"GET /answer-when-cancelled HTTP/1.1\r\nHost: x\r\n\r\n")
            _until(("waiting", "/answer-when-cancelled"), time.monotonic() + 5)
            client.close()
            time.sleep(0.2)
            server.should_exit = True
            _until(("send raised", "/answer-when-cancelled"), time.monotonic() + 5)
            deadline = time.monotonic() + 5
            while server.server_state.tasks and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.1)
    assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]


def test_a_request_head_over_64_kib_is_a_431(both: tuple[int, int]) -> None:
    # A head of any size was read whole: one 64 MB header took ~64 MB of the server's memory.
    ours, _ = both
    near = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 60_000 + b"\r\n\r\n"
    [(status, _, _)], _ = exchange(ours, near, 1)
    assert status == 200
    # a head within the limit in many small writes (measured as more than its bytes, it was refused)
    many = b"GET /echo HTTP/1.1\r\nHost: x\r\n" + b"x:y\r\n" * 11_460 + b"\r\n"
    client = Client(ours)
    try:
        for i in range(0, len(many), 1024):
            client.send(many[i : i + 1024])
        assert client.response()[0] == 200
    finally:
        client.close()
    # in one read too (the read a head began in was not counted: heads of up to ~256 KiB were served)
    over = near.replace(b"a" * 60_000, b"a" * 100_000)
    [(status, _, _)], _ = exchange(ours, over, 1)
    assert status == 431
    # and behind a pipelined request, in the same read: that one answered, then the 431
    responses, closed = exchange(ours, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n" + over, 2)
    assert [status for status, _, _ in responses] == [200, 431] and closed
    client = Client(ours)
    try:
        client.send(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: ")
        status = 0
        for _ in range(100):  # 16 MB at most, in 160 KB pieces
            try:
                client.send(b"a" * 160_000)
            except (BrokenPipeError, ConnectionResetError):
                break
        status, _, _ = client.response()
        assert status == 431
        assert client.closed()
    finally:
        client.close()


def test_a_head_refused_behind_pipelined_requests_is_never_read_on(both: tuple[int, int]) -> None:
    # With two requests queued behind the one answered, reading resumed after the 431 was decided: the rest of the
    # head was read uncounted, and the refused request was served (a 200) before its 431.
    ours, _ = both
    client = Client(ours)
    slow = b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
    data = slow * 3 + b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2_000_000 + b"\r\n\r\n"

    def send() -> None:
        try:
            client.send(data)
        except OSError:  # the server closed the connection after its 431: the rest is not read
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        statuses = [client.response()[0] for _ in range(4)]
        assert statuses == [200, 200, 200, 431]
        assert client.closed()
    finally:
        client.close()
        sender.join(5)


def test_a_status_outside_200_to_599_is_a_500(both: tuple[int, int]) -> None:
    # 42 went out as the status line "HTTP/1.1 42 "; an interim 103 as the final answer, with a body a client
    # then read as the next answer's head.
    ours, _ = both
    for path in (b"/status-42", b"/status-103"):
        [(status, _, _)], _ = exchange(ours, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path, 1)
        assert status == 500, path


def test_an_http_0_9_request_gets_no_chunked_answer(both: tuple[int, int]) -> None:
    ours, _ = both
    # One came chunked (RFC 9112 forbids Transfer-Encoding to a request that is not HTTP/1.1 or later).
    client = Client(ours)
    try:
        client.send(b"GET /chunked\r\n\r\n")
        while client._fill():  # all the server sends, until it closes
            pass
    finally:
        client.close()
    assert client.buf.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in client.buf.lower()


def test_trailers_are_not_merged_into_the_headers_and_count_against_the_limit(both: tuple[int, int]) -> None:
    # A chunked body's trailers were added to the request's headers (RFC 9110 forbids it), without a bound.
    ours, _ = both
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
    [(status, _, body)], _ = exchange(ours, head + b"X-Trailer: injected\r\n\r\n", 1)
    assert status == 200
    assert "x-trailer" not in dict(orjson.loads(body)["headers"])
    [(status, _, _)], _ = exchange(ours, head + b"X-Trailer: " + b"a" * 100_000 + b"\r\n\r\n", 1)
    assert status == 431
    # one trailer line without end, in pieces: llhttp held it all until it ended (a client grew the server's memory
    # by 100 MB, no 431), while a long body of small chunks, framing and all, is no trailer
    client = Client(ours)
    try:
        client.send(head + b"X-Trailer: ")
        for _ in range(100):  # 16 MB at most, in 160 KB pieces
            try:
                client.send(b"a" * 160_000)
            except (BrokenPipeError, ConnectionResetError):
                break
        assert client.response()[0] == 431
        assert client.closed()
    finally:
        client.close()
    chunks = b"A\r\n0123456789\r\n" * 100_000
    [(status, _, _)], _ = exchange(ours, head.replace(b"0\r\n", chunks + b"0\r\n\r\n"), 1)
    assert status == 200


def test_requests_arrive_whole_and_answers_carry_uvicorns_headers(both: tuple[int, int]) -> None:
    ours, _ = both
    client = Client(ours)
    try:
        client.send(POST)
        status, headers, body = client.response()
        echoed = orjson.loads(body)
        assert status == 200 and echoed["body_len"] == 11 and echoed["method"] == "POST"
        assert echoed["body_sha"] == hashlib.sha256(b'{"a": "b"}\n').hexdigest()
        assert ["content-type", "application/json"] in echoed["headers"]  # names in lower case
        names = [k for k, _ in headers]
        assert names[0] == "date" and "content-type" in names and ("x-test", "a b") in headers
        # keep-alive: the same connection serves the next request
        client.send(b"GET /echo?q=2 HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = client.response()
        assert status == 200 and orjson.loads(body)["query"] == "q=2"
        assert not client.closed(wait=0.2)
    finally:
        client.close()


def test_a_large_body_in_pieces_arrives_whole(both: tuple[int, int]) -> None:
    ours, _ = both
    payload = bytes(range(256)) * (4 * HIGH_WATER // 256)  # 4x what is held before reading pauses
    client = Client(ours)
    try:
        client.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(payload))
        for i in range(0, len(payload), 10_000):
            client.send(payload[i : i + 10_000])
        status, _, body = client.response()
        assert status == 200
        assert orjson.loads(body)["body_sha"] == hashlib.sha256(payload).hexdigest()
    finally:
        client.close()


def test_expect_100_continue_is_answered_when_the_app_reads(both: tuple[int, int]) -> None:
    ours, _ = both
    client = Client(ours)
    try:
        client.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        status, _, _ = client.response()
        assert status == 100
        client.send(b"hello")
        status, _, body = client.response()
        assert status == 200 and orjson.loads(body)["body_len"] == 5
    finally:
        client.close()


def leave_while_the_app_waits(port: int, path: str, disconnects: int = 1) -> None:
    """Ask ``path`` (an app route that waits on receive()), go away once it waits, and wait until the app has
    been told ``disconnects`` times."""
    EVENTS.clear()
    client = Client(port)
    client.send(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
    deadline = time.monotonic() + 5
    while ("waiting", path) not in EVENTS:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    client.close()
    while EVENTS.count(("http.disconnect", path)) < disconnects:
        assert time.monotonic() < deadline, EVENTS
        time.sleep(0.01)


def test_the_app_learns_that_the_client_went_away(both: tuple[int, int]) -> None:
    leave_while_the_app_waits(both[0], "/wait-disconnect")


@pytest.mark.parametrize("path", ["/fail-after-start", "/no-body", *(f"/bad-header-{k}" for k in BAD_VALUES)])
def test_an_app_that_fails_after_starting_its_answer_still_gets_a_whole_500(both: tuple[int, int], path: str) -> None:
    """The head waits for the body, so nothing was sent yet: a 500 instead of uvicorn's closed connection, and a
    header value holding CR LF never reaches the client."""
    ours, theirs = both
    (response,), closed = exchange(ours, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode(), 1)
    assert response[0] == 500 and response[2] == b"Internal Server Error" and closed
    assert all(k != "set-cookie" and k != "x-injected" for k, _ in response[1])
    client = Client(theirs)  # uvicorn's: the head may be out, then the connection closes
    try:
        client.send(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
        with pytest.raises(ConnectionError):
            client.response()
    finally:
        client.close()


def test_an_idle_connection_closes_after_the_keep_alive_timeout() -> None:
    with served(GatewayHttpProtocol, timeout_keep_alive=1) as (port, _):
        client = Client(port)
        try:
            for _ in range(3):  # requests keep it open past the timeout
                client.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
                assert client.response()[0] == 200
                time.sleep(0.5)
            started = time.monotonic()
            assert client.closed(wait=3.0)
            assert 0.3 < time.monotonic() - started < 1.5  # 1 s after the last answer, 0.5 s of it slept above
        finally:
            client.close()


def wait_in_flight(server: uvicorn.Server) -> None:
    """Until a request is being answered (its task runs: ``/slow`` for 0.3 s), not a 0.1 s sleep that a loaded
    server may take longer than to start it."""
    deadline = time.monotonic() + 5
    while not server.server_state.tasks:
        assert time.monotonic() < deadline, "the request was not started"
        time.sleep(0.002)


def test_over_the_concurrency_limit_the_answer_is_503() -> None:
    with served(GatewayHttpProtocol, limit_concurrency=2) as (port, server):  # uvicorn counts connections and tasks
        first = Client(port)
        first.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_in_flight(server)
        second = Client(port)
        try:
            second.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body = second.response()
            assert status == 503 and body == b"Service Unavailable"
            assert first.response()[0] == 200
        finally:
            first.close()
            second.close()


def test_shutdown_lets_an_answer_in_flight_finish_and_closes_idle_connections() -> None:
    with served(GatewayHttpProtocol) as (port, server):
        busy, idle = Client(port), Client(port)
        try:
            idle.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            assert idle.response()[0] == 200
            busy.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            wait_in_flight(server)
            server.should_exit = True
            assert idle.closed(wait=2.0)
            status, headers, _ = busy.response()
            assert status == 200 and ("connection", "close") in headers
            assert busy.closed(wait=2.0)
        finally:
            busy.close()
            idle.close()


def test_connections_that_come_and_go_leave_nothing_behind() -> None:
    """Answered, closed by the client mid-request or right after connecting: every connection leaves uvicorn's
    registry and no task is left running (what graceful shutdown waits for, and what a long run would leak)."""
    with served(GatewayHttpProtocol) as (port, server):
        for i in range(150):
            client = Client(port)
            if i % 3 == 0:
                client.send(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert client.response()[0] == 200
            elif i % 3 == 1:
                client.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\npartial")
            client.close()
        deadline = time.monotonic() + 5
        while server.server_state.connections or server.server_state.tasks:
            assert time.monotonic() < deadline, (len(server.server_state.connections), len(server.server_state.tasks))
            time.sleep(0.02)
        assert server.server_state.total_requests >= 50


def read_slowly(port: int, path: bytes, then: bytes) -> tuple[int, bytes, Response]:
    """GET ``path`` with a small receive buffer, read only after a pause; then GET ``then`` on the same connection:
    the first answer's status and body, and the second answer."""
    client = Client(port)
    try:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.send(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
        time.sleep(0.3)
        status, _, body = client.response()
        client.send(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % then)
        return status, body, client.response()
    finally:
        client.close()


def test_a_large_answer_to_a_slow_reader_arrives_whole(both: tuple[int, int]) -> None:
    """4 MB in two body messages (the first more than the transport holds before it pauses the writer) to a
    client that waits before reading: all of it arrives, and the connection serves its next request."""
    ours, _ = both
    status, body, after = read_slowly(ours, b"/big", b"/echo")
    assert status == 200 and body == bytes(range(256)) * (16 * 1024)
    assert after[0] == 200


def test_an_upgrade_request_is_answered_as_http_then_the_connection_closes(both: tuple[int, int]) -> None:
    ours, _ = both
    (response,), closed = exchange(ours, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                                         b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", 1)  # fmt: skip
    assert response[0] == 200 and orjson.loads(response[2])["path"] == "/echo"
    assert closed


LAST_SEEN: contextvars.ContextVar[str | None] = contextvars.ContextVar("last_seen", default=None)


async def context_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers what its context held when the request came (and what its scope's extensions are), then sets it."""
    if scope["type"] != "http":
        return
    out = orjson.dumps({"seen": LAST_SEEN.get(), "extensions": sorted(scope.get("extensions") or {})})
    LAST_SEEN.set(scope["path"])
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(out))]})
    await send({"type": "http.response.body", "body": out})


@pytest.mark.parametrize("reset", [False, True])
def test_uvicorns_reset_contextvars_starts_every_request_from_an_empty_context(reset: bool) -> None:
    """What the server's own context holds reaches the requests, unless ``--reset-contextvars`` says otherwise."""

    def before() -> None:
        LAST_SEEN.set("set by the server's thread")

    with served(GatewayHttpProtocol, served_app=context_app, lifespan="off", before=before,
                reset_contextvars=reset) as (port, _):  # fmt: skip
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /one HTTP/1.1\r\nhost: t\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                data += sock.recv(65536)
    seen = orjson.loads(data.partition(b"\r\n\r\n")[2])["seen"]
    assert seen == (None if reset else "set by the server's thread")


def test_each_request_runs_in_a_context_of_its_own_and_the_scope_says_so() -> None:
    """What a request sets in its context (the gateway's log bindings) never reaches the next request on the same
    connection: the promise of the ``embedgate.request_task`` extension, which lets the gateway skip undoing them."""
    with served(GatewayHttpProtocol, served_app=context_app, lifespan="off") as (port, _):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            answers = []
            for path in ("/first", "/second"):
                sock.sendall(b"GET %s HTTP/1.1\r\nhost: t\r\n\r\n" % path.encode())
                data = b""
                while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                    data += sock.recv(65536)
                answers.append(orjson.loads(data.partition(b"\r\n\r\n")[2]))
            # Pipelined: the second is started from within the first one's task, as its answer goes out.
            sock.sendall(b"GET /third HTTP/1.1\r\nhost: t\r\n\r\nGET /fourth HTTP/1.1\r\nhost: t\r\n\r\n")
            data = b""
            while data.count(b"}") < 2:
                data += sock.recv(65536)
            answers += [orjson.loads(part.partition(b"\r\n\r\n")[2]) for part in data.split(b"HTTP/1.1 ")[1:]]
    assert answers == [{"seen": None, "extensions": sorted([BODY_PARTS, REQUEST_TASK])}] * 4


PIECES = [b'{"a":', memoryview(b"xx[1,2]yy")[2:7], b"", bytearray(b',"b":"'), b"c" * 100_000, b'"}']
WHOLE = b"".join(PIECES)


def big_pieces() -> list[Any]:
    """``[``, then 256 times a view of a block from its i-th byte and ``i,``."""
    block = bytes(range(256)) * 32
    pieces: list[Any] = [b"["]
    for i in range(256):
        pieces += [memoryview(block)[i:], b"%d," % i]
    return pieces


MANY = 2**20 + 2


async def parts_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers ``PIECES`` as one ``embedgate.body_parts`` message (with a length), as two (chunked), or as more than
    its length says."""
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/big":  # 2 MB in 513 pieces, views among them: more than the transport takes before it waits
        pieces = big_pieces()
        size = sum(len(p) for p in pieces)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % size)]})
        await send({"type": BODY_PARTS, "parts": pieces})
        return
    if path == "/many":  # more pieces than uvloop writes at once (2^20): the answer never went, the log said 200
        pieces = [b"x", b"y"] * (MANY // 2)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % MANY)]})
        await send({"type": BODY_PARTS, "parts": pieces})
        return
    length = len(WHOLE) - 1 if path == "/too-long" else len(WHOLE)
    headers = [] if path == "/chunked" else [(b"content-length", b"%d" % length)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    if path == "/chunked":
        await send({"type": BODY_PARTS, "parts": PIECES[:3], "more_body": True})
        await send({"type": BODY_PARTS, "parts": PIECES[3:]})
    else:
        await send({"type": BODY_PARTS, "parts": PIECES})


@pytest.mark.parametrize("path", ["/length", "/chunked"])
def test_an_answer_sent_in_pieces_reaches_the_client_whole(path: str) -> None:
    """The ``embedgate.body_parts`` extension: the pieces, bytes or views, go out in order, framed as one body."""
    with served(GatewayHttpProtocol, served_app=parts_app, lifespan="off") as (port, _):
        r = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
    assert r.status_code == 200 and r.content == WHOLE
    assert r.headers.get("transfer-encoding") == ("chunked" if path == "/chunked" else None)


def test_an_answer_in_more_pieces_than_the_event_loop_writes_at_once_arrives_whole() -> None:
    # A base64 answer of over 524,285 vectors (two pieces each) never reached its client under uvloop.
    with served(GatewayHttpProtocol, served_app=parts_app, lifespan="off") as (port, _):
        r = httpx.get(f"http://127.0.0.1:{port}/many", timeout=30)
    assert r.status_code == 200 and r.content == b"xy" * (MANY // 2)


def test_an_answer_in_pieces_to_a_slow_reader_arrives_whole() -> None:
    """The transport keeps the pieces it could not write yet (the client waits before reading) and writes them
    unchanged, in order, as the client reads."""
    expected = b"".join(bytes(p) for p in big_pieces())
    with served(GatewayHttpProtocol, served_app=parts_app, lifespan="off") as (port, _):
        status, body, after = read_slowly(port, b"/big", b"/length")
    assert status == 200 and body == expected
    assert after[2] == WHOLE  # and the connection goes on


def test_pieces_longer_than_the_answers_length_are_a_500() -> None:
    with served(GatewayHttpProtocol, served_app=parts_app, lifespan="off") as (port, _):
        r = httpx.get(f"http://127.0.0.1:{port}/too-long", timeout=5)
    assert r.status_code == 500


@pytest.mark.parametrize("path", ["/no-content-with-body", "/negative-length"])
def test_a_body_an_answer_cannot_carry_is_a_500_not_a_second_answer(both: tuple[int, int], path: str) -> None:
    # A 204's body went out as if it were the next answer (a forged response on a kept-alive connection); a
    # Content-Length of -1 went out with chunked framing as well.
    ours, _ = both
    (response,), closed = exchange(ours, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode(), 1)
    assert response[0] == 500 and response[2] == b"Internal Server Error" and closed


@pytest.mark.parametrize("path", ["/bytearray-body", "/memoryview-body"])
def test_bytes_like_bodies_and_a_number_for_more_body_are_taken(both: tuple[int, int], path: str) -> None:
    # the compiled protocol answered 500 to these (bytes and bool declared); uvicorn's takes them
    for port in both:
        (response,), _ = exchange(port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode(), 1)
        assert (response[0], response[2]) == (200, b"ok")


def test_two_receives_at_once_both_learn_that_the_client_went_away(both: tuple[int, int]) -> None:
    # only the last receive() was woken: the other waited for ever
    leave_while_the_app_waits(both[0], "/wait-disconnect-twice", disconnects=2)


def test_a_client_gone_before_the_answer_is_not_an_error_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    # "ASGI callable returned without starting response." at ERROR for every client that timed out: any client
    # could flood the error log (uvicorn's protocol logs nothing then).
    with served(GatewayHttpProtocol) as (port, _), uvicorn_log(caplog):
        leave_while_the_app_waits(port, "/wait-disconnect")
        time.sleep(0.1)
    assert [r.getMessage() for r in caplog.records if r.name == "uvicorn.error" and r.levelno >= logging.ERROR] == []


def test_the_keep_alive_timeout_counts_from_the_last_byte_received() -> None:
    with served(GatewayHttpProtocol, timeout_keep_alive=1) as (port, _):
        # answered at once, the rest of the body trickles in for longer than the timeout: still open after it
        client = Client(port)
        try:
            client.send(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\nz")
            assert client.response()[0] == 413
            for _ in range(6):
                time.sleep(0.3)
                client.send(b"z")
            client.send(b"zGET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            assert client.response()[0] == 200
        finally:
            client.close()
        # a head that stalls after a whole request (in the same packet) is closed after the timeout
        client = Client(port)
        try:
            client.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\nGET /ec")
            assert client.response()[0] == 200
            assert client.closed(wait=3.0)
        finally:
            client.close()


def test_a_new_connection_that_sends_no_whole_head_is_closed_after_the_keep_alive_timeout() -> None:
    # Only a connection that had been answered was timed: one that connected and sent nothing, or half a head,
    # was held for ever (a few hundred of them held the server's memory and file descriptors).
    with served(GatewayHttpProtocol, timeout_keep_alive=1) as (port, _):
        silent, partial = Client(port), Client(port)
        try:
            partial.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Le")
            started = time.monotonic()
            assert silent.closed(wait=3.0) and partial.closed(wait=3.0)
            assert 0.5 < time.monotonic() - started < 2.5
        finally:
            silent.close()
            partial.close()


def closed_while_trickling(port: int, pieces: list[bytes]) -> float:
    """Send ``pieces`` one every 0.1 s on a new connection until the server closes it: how long it took (it must)."""
    client = Client(port)
    try:
        started = time.monotonic()
        for piece in pieces:
            try:
                client.send(piece)
            except OSError:
                break
            if client.closed(wait=0.1):
                break
        else:
            raise AssertionError("still open after every piece")
        return time.monotonic() - started
    finally:
        client.close()


def test_a_head_trickled_byte_by_byte_is_closed_after_the_keep_alive_timeout_from_its_first_byte() -> None:
    # The timeout counted from the last byte: a head sent a byte every 0.3 s held its connection for as long as the
    # client went on (up to the 64 KiB head limit, hours at that pace). A head that arrives whole is still served.
    with served(GatewayHttpProtocol, timeout_keep_alive=1) as (port, _):
        head = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40
        assert 0.5 < closed_while_trickling(port, [bytes([byte]) for byte in head]) < 3.0  # of 4.6 s
        # blank lines between requests begin none, and count for nothing either
        assert closed_while_trickling(port, [b"\r\n"] * 40) < 3.0  # of 4 s
        client = Client(port)
        try:
            client.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            assert client.response()[0] == 200
        finally:
            client.close()


def test_a_body_that_stops_coming_or_an_answer_not_read_drops_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    from embedgate import serve_protocol

    monkeypatch.setattr(serve_protocol, "STALL_TIMEOUT_S", 1.0)
    EVENTS.clear()
    with served(GatewayHttpProtocol, timeout_keep_alive=1) as (port, server):
        stalled_body, not_reading, not_reading_either = Client(port), Client(port), Client(port)
        try:
            stalled_body.send(b"POST /stalled HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhalf")
            for client, path in ((not_reading, b"/big"), (not_reading_either, b"/big-once")):
                client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                client.send(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)  # 4 MB, and the client reads none of it
            started = time.monotonic()
            assert stalled_body.closed(wait=4.0)
            assert 0.5 < time.monotonic() - started < 3
            deadline = time.monotonic() + 6
            while server.server_state.connections or server.server_state.tasks:  # the big answer's too
                assert time.monotonic() < deadline, (len(server.server_state.connections), server.server_state.tasks)
                time.sleep(0.05)
        finally:
            stalled_body.close()
            not_reading.close()
            not_reading_either.close()
        for path in (b"/big", b"/big-once"):  # a client that reads slowly, but reads, gets it all
            slow = Client(port)
            try:
                slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
                slow.send(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
                got = b""
                while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < 4 * 1024 * 1024:
                    chunk = slow.sock.recv(64 * 1024)
                    assert chunk, f"{path!r} cut after {len(got)} bytes"
                    got += chunk
                    time.sleep(0.03)  # at most ~2 MB/s: 2 s or more for the answer, past the stall timeout
                assert got.partition(b"\r\n\r\n")[2] == bytes(range(256)) * (16 * 1024)
            finally:
                slow.close()
    assert ("disconnect", "/stalled") in EVENTS  # the app learnt that the client was gone
    # and that its answer was not sent (in one message, it was taken as sent at once: the gateway logged a 200)
    assert EVENTS.count(("send raised", "/big-once")) == 1 and EVENTS.count(("sent", "/big-once")) == 1


def test_an_app_listening_for_the_client_to_leave_is_not_cut_by_the_stall_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Only a body still to come is bounded: a receive() after the whole body waits for a disconnect (the gateway's
    # listener during a long upstream call), which may come long after.
    from embedgate import serve_protocol

    monkeypatch.setattr(serve_protocol, "STALL_TIMEOUT_S", 0.3)
    EVENTS.clear()
    with served(GatewayHttpProtocol, timeout_keep_alive=1) as (port, _):
        client = Client(port)
        try:
            client.send(b"POST /wait-disconnect HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok")
            time.sleep(1.5)
            assert not client.closed(wait=0.1)
            assert EVENTS == [("waiting", "/wait-disconnect")]
        finally:
            client.close()
        deadline = time.monotonic() + 3
        while ("http.disconnect", "/wait-disconnect") not in EVENTS:
            assert time.monotonic() < deadline, EVENTS
            time.sleep(0.02)


@pytest.mark.parametrize(
    ("request_bytes", "within"),
    [
        (b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n", 3.3),  # the app waits to write its second half: one stall timeout
        (b"GET /big-once HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 3.3),  # written, then closing
        (b"GET /big-once HTTP/1.0\r\nHost: x\r\n\r\n", 3.3),
    ],
    ids=["drain", "connection-close", "http-1.0"],
)
def test_an_unread_answer_is_dropped_after_one_stall_timeout(
    monkeypatch: pytest.MonkeyPatch, request_bytes: bytes, within: float
) -> None:
    # A closing connection waited for ever to write what the client did not read, and the drain's first look
    # counted as progress (two timeouts, not one).
    from embedgate import serve_protocol

    monkeypatch.setattr(serve_protocol, "STALL_TIMEOUT_S", 2.0)
    with served(GatewayHttpProtocol, timeout_keep_alive=30) as (port, server):
        client = Client(port)
        try:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.send(request_bytes)  # 4 MB, and the client reads none of it
            started = time.monotonic()
            while not server.server_state.connections:  # accepted
                assert time.monotonic() - started < 2
                time.sleep(0.01)
            while server.server_state.connections or server.server_state.tasks:
                assert time.monotonic() - started < within, "still held"
                time.sleep(0.05)
            assert time.monotonic() - started > 1.5  # not before the client had its time
        finally:
            client.close()


@pytest.mark.parametrize("http", ["httptools", "embedgate"])
def test_the_gateway_answers_pipelined_requests_on_either_protocol(make_config: Any, http: str) -> None:
    # uvicorn's protocol runs a pipelined request inside its predecessor's task: the gateway's log bindings were
    # then undone twice, and from the second request on the connection closed without an answer.
    from embedgate.app import create_app

    from .conftest import KEY, serve

    body = orjson.dumps({"model": "local/embed-small", "input": "pipelined"})
    one = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s") % (KEY.encode(), len(body), body)  # fmt: skip
    protocol = GatewayHttpProtocol if http == "embedgate" else http
    with serve(create_app(make_config()), http=protocol) as url:
        client = Client(int(url.rsplit(":", 1)[1]))
        try:
            client.send(one * 5)
            assert [client.response()[0] for _ in range(5)] == [200] * 5
        finally:
            client.close()


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_host_middleware_around_the_gateway_gets_a_body_it_knows(make_config: Any, wrapped: bool) -> None:
    """Served with embedgate's protocol, a base64 answer goes to the server in pieces; wrapped in a host middleware
    (Starlette's GZipMiddleware), the gateway sent those pieces through the middleware, which knows no such message:
    a 500 for the client, a 200 in the gateway's own access line."""
    from starlette.middleware.gzip import GZipMiddleware

    from embedgate.app import create_app

    from .conftest import KEY, serve

    app = create_app(make_config())
    body = {"model": "local/embed-small", "input": ["one", "two"], "encoding_format": "base64"}
    with serve(GZipMiddleware(app, minimum_size=10) if wrapped else app, http=GatewayHttpProtocol) as url:
        r = httpx.post(url + "/v1/embeddings", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 200, r.text
    assert [d["index"] for d in r.json()["data"]] == [0, 1]
    assert r.headers.get("content-encoding") == ("gzip" if wrapped else None)


UPGRADES = {"h2c": b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABk\r\n",
            "websocket": b"Connection: Upgrade\r\nUpgrade: websocket\r\n"}  # fmt: skip


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("upgrade", list(UPGRADES.values()), ids=list(UPGRADES))
def test_an_upgrade_request_with_a_body_is_served_its_body(both: tuple[int, int], upgrade: bytes, split: bool) -> None:
    # What `curl --http2 http://...` sends with a POST: httptools reads no body of a request asking for an Upgrade,
    # and the app got an empty one (the gateway answered 400 "not valid JSON"); the body, in the head's read or after.
    ours, _ = both
    body = b'{"model": "m", "input": "hi"}'
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n" % (len(body), upgrade)
    client = Client(ours)
    try:
        if split:
            client.send(head + body[:5])
            time.sleep(0.1)
            client.send(body[5:] + b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")  # after its body: not HTTP any more
        else:
            client.send(head + body)
        status, _, answer = client.response()
        echoed = orjson.loads(answer)
        assert (status, echoed["body_len"], echoed["body_sha"]) == (200, len(body), hashlib.sha256(body).hexdigest())
        assert client.closed(wait=0.3)
    finally:
        client.close()
