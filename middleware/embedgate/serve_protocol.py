"""``embedgate serve``'s HTTP/1.1 protocol for uvicorn: uvicorn's httptools protocol, compiled and leaner.

``uvicorn.run(..., http=GatewayHttpProtocol)``: uvicorn still runs the server (sockets, workers, lifespan,
signals, the ``date`` header, graceful shutdown); this class parses each connection's requests with httptools
(llhttp, as uvicorn's does) and runs the ASGI app for each, as ``uvicorn.protocols.http.httptools_impl`` does.
Measured on the served gateway (py-spy under wrk, 2026-12-04), uvicorn's protocol ran as Python on every request:
its header callbacks, scope and cycle objects, an ``asyncio.Event`` per request, two regular expressions per
response header and a keep-alive timer armed and cancelled per request. Here the build compiles it (see
``embedgate._native``), and:

- the answer's head waits for its first body message, and both leave in one write (``writelines``);
- the keep-alive timeout is one timer per idle period that re-arms itself, not a timer per request;
- a body already received is handed over without waiting on an event, as bytes without a copy;
- the scope carries the extension ``embedgate.request_task`` (``embedgate.logs.REQUEST_TASK``): each request runs
  in a task of its own, started from a copy of the connection's context (a pipelined request too, though its
  predecessor's task starts it), so the gateway need not undo its context bindings at the end;
- response header names are checked once per distinct name, and the values of a head in one pass over it (no
  line break of their own, no control but tab: uvicorn's check per value), before anything is sent: a header
  that fails it gets the client a 500, not half a head.

What it does not do: WebSocket upgrades (an ``Upgrade`` request is served as plain HTTP and the connection closed
after it; the gateway serves no WebSocket route) and uvicorn's own access log (the gateway writes its own line;
``embedgate serve`` turns uvicorn's off). Everything else an HTTP/1.1 client sees is uvicorn's behaviour:
keep-alive, pipelining, ``Expect: 100-continue``, chunked bodies both ways, ``HEAD``, flow control both ways,
``limit_concurrency``, 400 on a malformed request, 500 when the app fails before answering.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, cast

import httptools
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, service_unavailable
from uvicorn.protocols.http.httptools_impl import HEADER_RE, STATUS_LINE
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl

from .errors import ClientGone, Dialect, InvalidRequest, render_error
from .logs import BODY_PARTS, REQUEST_TASK

__all__ = ["GatewayHttpProtocol"]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]

HIGH_WATER: Final = HIGH_WATER_LIMIT  # request body bytes held before reading pauses, as in uvicorn
#: The largest request head (request line and headers) read: a larger one is a 431 (llhttp holds it all in memory,
#: and a client could send gigabytes of one header). Node's limit is 16 KiB, nginx's 32 KiB by default.
MAX_HEAD_BYTES: Final = 64 * 1024
#: Requests read ahead, pipelined behind the one being answered, before reading pauses.
MAX_PIPELINED: Final = 8
# A request's body that stops coming, or an answer the client stops reading, for this long: the connection is
# dropped (nginx's client_body_timeout and send_timeout; uvicorn's protocol waits for ever). Not Final: tests set it.
STALL_TIMEOUT_S = 60.0
_NAME_CACHE_MAX: Final = 512
#: The controls no header value may hold (all but tab), CR and LF among them. A head holds exactly the CRs and LFs
#: of its line ends, so deleting these bytes from it must take away exactly two bytes a line: uvicorn's check of
#: each value (no control but tab), done once per head in one byte translation (~1 us on a 400-byte head; one
#: regular expression doing the same took ~9 us, three counts and a translation ~1.5 us).
_CONTROLS: Final = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
#: The most buffers an answer is written in at once: uvloop refuses a write of over 2^20 (EINVAL: the answer never
#: went, a base64 answer of over 524,285 vectors), so more are joined into as many blocks (a batch's two a vector:
#: up to ~32,000 vectors an answer goes as it is, not copied).
_MAX_PARTS: Final = 65536
_CLOSE: Final = b"connection: close\r\n"
_CHUNKED: Final = b"transfer-encoding: chunked\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"
_NO_BODY_STATUS: Final = (204, 304)
_ERROR_HEADERS: Final = ((b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21"),
                         (b"connection", b"close"))  # fmt: skip

_log: Final = logging.getLogger("uvicorn.error")  # where uvicorn's protocol reports the app's failures


_good_names: Final[dict[bytes, bytes]] = {}  # response header names seen valid, to their lower case


def _header_name(name: bytes) -> bytes:
    lowered = _good_names.get(name)
    if lowered is not None:
        return lowered
    if HEADER_RE.search(name):
        raise RuntimeError("Invalid HTTP header name.")
    lowered = name.lower()
    if len(_good_names) < _NAME_CACHE_MAX:
        _good_names[name] = lowered
    return lowered


class GatewayHttpProtocol(asyncio.Protocol):
    """One client connection (uvicorn makes one per connection with its config and server state)."""

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:  # fmt: skip
        if not config.loaded:
            config.load()
        self.config = config
        self.app: App = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.server_state = server_state
        self.connections: set[Any] = server_state.connections
        self.tasks: set[Any] = server_state.tasks
        self.app_state = app_state
        self.root_path: str = config.root_path
        self.asgi_version: str = config.asgi_version
        self.limit_concurrency: int | None = config.limit_concurrency
        self.timeout_keep_alive: float = config.timeout_keep_alive
        self.parser = httptools.HttpRequestParser(self)
        try:  # answer the first of pipelined requests even when data follows a "connection: close" one
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        except AttributeError:  # httptools < 0.6.3
            pass
        self.transport: asyncio.Transport | None = None
        self.server: tuple[str, int | None] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme = "http"
        self.read_paused = False
        self.write_paused = False
        self.drain_waiters: list[asyncio.Future[None]] = []
        self.pipeline: deque[tuple[RequestCycle, App]] = deque()
        self.cycle: RequestCycle | None = None  # the request parsed last
        self.serving: RequestCycle | None = None  # the request answered now (pipelined ones wait behind it)
        self.in_message = False  # between a request's first byte and its last
        # The request head being read: since which data_received (a count of them), and its bytes since.
        self.in_head = False
        self.feeds = 0
        self.head_feed = 0
        self.head_bytes = 0
        self.unbodied = 0  # bytes read in a body since it last grew: chunk framing and trailers
        self.begun = 0  # requests whose first byte was read
        self.read_len = 0  # bytes of the read being parsed
        self.pending_error: tuple[int, bytes] | None = None  # an answer owed after the earlier requests' answers
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.expect_continue = False
        self.hosts = 0  # Host header lines of the request head being read
        self.codings: list[bytes] = []  # its transfer codings, of every Transfer-Encoding line
        self.content_length = 0  # its Content-Length, 0 if none
        self.upgrade_body_left = 0  # bytes still to come of the body of an Upgrade request (see data_received)
        self.idle_since = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None
        self.stall_timer: asyncio.TimerHandle | None = None
        self.unsent = 0  # the answer's bytes not yet taken by the client, at the last look
        self.unsent_since = 0.0  # when that changed last
        self.closed = False
        # The context the connection's callbacks run in: each request's task starts from a copy of it, never
        # from the task of the request before it (whose send starts a pipelined request). With uvicorn's
        # ``--reset-contextvars`` (newer uvicorns), an empty one, as uvicorn's own protocol then does.
        reset = getattr(config, "reset_contextvars", False)
        self.context = contextvars.Context() if reset else contextvars.copy_context()

    # --- asyncio.Protocol -------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connections.add(self)
        self.transport = transport  # type: ignore[assignment]
        self.server = get_local_addr(transport)  # type: ignore[arg-type]
        self.client = get_remote_addr(transport)  # type: ignore[arg-type]
        self.scheme = "https" if is_ssl(transport) else "http"  # type: ignore[arg-type]
        # A new connection whose first request does not come (or whose head stalls) is closed after the
        # keep-alive timeout, as one is after an answer: held for ever, such connections added up.
        self.idle_since = self.loop.time()
        self.idle_timer = self.loop.call_later(self.timeout_keep_alive, self._idle_check)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.closed = True
        # the request being answered as well as the last parsed (pipelined behind it): each learns the client left
        for cycle in (self.serving, self.cycle):
            if cycle is not None:
                if not cycle.complete:
                    cycle.disconnected = True
                cycle.wake()
        self.resume_writing()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None
        if exc is None and self.transport is not None:
            self.transport.close()

    def eof_received(self) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        if self.idle_timer is not None and self.in_message and not self.in_head:
            # The keep-alive timeout counts from the last byte of a body (uvicorn's from any byte), and from a head's
            # first (see on_message_begin): a head trickled a byte at a time, or blank lines between requests (which
            # begin none), held the connection for as long as the client liked.
            self.idle_since = self.loop.time()
        if self.pending_error is not None:
            return  # a request refused, its answer owed after those before it: nothing after it is read
        if self.upgrade_body_left:  # the rest of an Upgrade request's body (see below), past the parser
            self._upgrade_body(data)
            return
        self.feeds += 1
        self.read_len = len(data)
        # whether this read holds nothing of an earlier request: it starts between two, and begins only one
        between = not self.in_message
        begun = self.begun
        in_body = self.in_message and not self.in_head
        if in_body:
            self.unbodied += len(data)  # (on_body sets it back to 0)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # Served as plain HTTP (no WebSocket, no h2c here), then the connection closes. httptools reads no body
            # of such a request (a POST of `curl --http2 http://...`, say, whose body was lost: a 400 "not valid
            # JSON"): its Content-Length bytes are taken here, from what follows the head.
            cycle = self.cycle
            if cycle is not None:
                cycle.keep_alive = False
                length = self.content_length
                if length and not self.codings and cycle.more_body:
                    self.upgrade_body_left = length
                    offset = upgrade.args[0] if upgrade.args and isinstance(upgrade.args[0], int) else len(data)
                    self._upgrade_body(data[offset:])
                else:
                    cycle.more_body = False
                    cycle.wake()
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._refuse_head_too_large()
            elif isinstance(exc.__context__, _BadHost):
                _log.warning("Request without exactly one Host header received.")
                self._refuse(400, "A request must have exactly one Host header.", "host")
            elif isinstance(exc.__context__, _BadCoding):
                _log.warning("Request with an unsupported transfer coding received.")
                self._refuse(501, "Unsupported transfer coding: only chunked is.", "transfer-encoding")
            else:
                _log.warning("Invalid HTTP request received.")
                self._refuse(400, "Invalid HTTP request received.")
            return
        if self.in_head:
            # A head still coming: bounded (the parser holds all of it). The read that began it is all head when it
            # started between requests and began no other; one that also held the end of an earlier (pipelined)
            # request is not counted (the limit may then be passed by up to that read, 256 KiB at most).
            if self.head_feed != self.feeds:
                self.head_bytes += len(data)
            elif between and self.begun == begun + 1:
                self.head_bytes = len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._refuse_head_too_large()
                self.in_head = False
        elif in_body and self.in_message and self.unbodied > MAX_HEAD_BYTES:
            # A chunked body's trailer line still coming, which llhttp holds until it ends (on_header counts whole
            # ones): one endless line grew the server's memory by all a client sent. Bounded by the bytes read since
            # the body last grew (a read more, 256 KiB at most, may pass the limit).
            self._refuse_head_too_large()

    def _upgrade_body(self, data: bytes) -> None:
        """Hand the body of a request served in spite of its ``Upgrade`` to its cycle, up to its Content-Length
        (anything after it is not HTTP, and the connection closes after the answer)."""
        left = self.upgrade_body_left
        piece = data[:left] if len(data) > left else data
        if piece:
            self.upgrade_body_left = left - len(piece)
            self.on_body(piece)
        if not self.upgrade_body_left:
            self._message_complete()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        if self.write_paused:
            self.write_paused = False
            waiters, self.drain_waiters = self.drain_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def drain(self) -> None:
        """Wait until the transport takes writes again (or the connection is gone: dropped once the client has
        read nothing for ``STALL_TIMEOUT_S``)."""
        if self.write_paused and not self.closed:
            waiter: asyncio.Future[None] = self.loop.create_future()
            self.drain_waiters.append(waiter)
            self._watch_unsent()
            try:
                await waiter
            finally:
                self._unwatch()

    async def body_bounded(self, waiter: asyncio.Future[None]) -> None:
        """Await ``waiter``, which the client's bytes resolve; once the client has sent nothing for
        ``STALL_TIMEOUT_S``, the connection is dropped (which resolves it: the request learns the client is gone)."""
        timer = self.loop.call_later(STALL_TIMEOUT_S, self._drop_if_waiting, waiter)
        try:
            await waiter
        finally:
            timer.cancel()

    def _drop_if_waiting(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done() and self.transport is not None:
            self.transport.abort()  # not close(): that would wait to write what the client does not read

    # What the client has not read of the answer is looked at every quarter of STALL_TIMEOUT_S (progress is seen
    # only as the transport's buffer shrinking: the kernel's buffers hide the rest); the connection is dropped
    # once the buffer has not moved for STALL_TIMEOUT_S.

    def _watch_unsent(self) -> None:
        if self.stall_timer is None and self.transport is not None:
            self.unsent, self.unsent_since = self.transport.get_write_buffer_size(), self.loop.time()
            self.stall_timer = self.loop.call_later(STALL_TIMEOUT_S / 4, self._check_unsent)

    def _unwatch(self) -> None:
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None

    def _check_unsent(self) -> None:
        self.stall_timer = None
        transport = self.transport
        if transport is None or self.closed or not transport.get_write_buffer_size():
            return
        if self._write_stalled():
            transport.abort()  # not close(): that would wait to write what the client does not read
        else:
            self.stall_timer = self.loop.call_later(STALL_TIMEOUT_S / 4, self._check_unsent)

    def _write_stalled(self) -> bool:
        """Whether the client has read nothing of the answer for ``STALL_TIMEOUT_S`` (as far as can be seen)."""
        assert self.transport is not None
        unsent, now = self.transport.get_write_buffer_size(), self.loop.time()
        if unsent != self.unsent:
            self.unsent, self.unsent_since = unsent, now
        return now - self.unsent_since >= STALL_TIMEOUT_S

    def close_when_sent(self) -> None:
        """Close the connection once what it holds is written, or drop it once the client has read none of that
        for ``STALL_TIMEOUT_S``: a closing transport waits for ever to write what the client does not read."""
        transport = self.transport
        if transport is None:
            return
        transport.close()
        if transport.get_write_buffer_size() and not self.closed:
            self._watch_unsent()

    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()

    # --- httptools callbacks ----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.idle_since = self.loop.time()
        self.in_message = True
        self.in_head = True
        self.head_feed = self.feeds
        self.head_bytes = 0
        self.begun += 1
        self.url = b""
        self.headers = []
        self.expect_continue = False
        self.hosts = 0
        self.content_length = 0
        if self.codings:
            self.codings = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            # A trailer of a chunked body: not merged into the request's headers (RFC 9110, 6.5.1), and counted
            # against the head's limit (a client could send gigabytes of one).
            self.head_bytes += len(name) + len(value) + 3
            if self.head_bytes > MAX_HEAD_BYTES:
                raise _HeadTooLarge
            return
        name = name.lower()
        value = value.rstrip(b" \t")  # llhttp keeps trailing whitespace, which is not part of the value (RFC 9110)
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_continue = True
        elif name == b"host":
            self.hosts += 1
        elif name == b"content-length":
            self.content_length = int(value) if value.isdigit() else 0  # (llhttp refuses a bad one, or two)
        elif name == b"transfer-encoding":
            # (an empty element of the list counts for nothing: RFC 9110, 5.6.1)
            self.codings += [coding for coding in (c.strip() for c in value.lower().split(b",")) if coding]
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.head_feed != self.feeds or self.read_len > MAX_HEAD_BYTES:  # a head that may be over the limit
            # At least its bytes ("name:value" and CRLF; the blanks around a value, dropped by the parser, aside):
            # a head within the limit is never refused, however it arrives.
            size = len(self.url) + sum([len(name) + len(value) + 3 for name, value in self.headers])
            if size > MAX_HEAD_BYTES:
                raise _HeadTooLarge  # stops the parser: a 431 (see data_received), for a request with no cycle
        parser = self.parser
        version = parser.get_http_version()
        if self.hosts != 1 and (self.hosts or version == "1.1"):
            raise _BadHost  # RFC 9112, 3.2: an HTTP/1.1 request without a Host, or any with two, is a 400
        if self.codings and self.codings != [b"chunked"]:
            # RFC 9112, 6.1: a coding not understood is a 501. llhttp reads such a body by its last coding, chunked,
            # and the app got it still coded (gzip), or refuses it only when chunked is not last.
            raise _BadCoding
        self.in_head = False
        url = self.url
        if url[:1] == b"/" and b"?" not in url and b"#" not in url:
            raw_path, query = url, b""
        else:
            # Any: httptools' stub says its query is bytes, but a target without one has None, which the compiled
            # build, trusting the stub, refused (an absolute-form target without a query was answered 400).
            parsed: Any = httptools.parse_url(url)
            raw_path, query = parsed.path, parsed.query or b""
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.4"},
            "http_version": version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "method": parser.get_method().decode("ascii"),
            "root_path": self.root_path,
            "path": self.root_path + path,
            "raw_path": self.root_path.encode("ascii") + raw_path,
            "query_string": query,
            "headers": self.headers,
            "state": self.app_state.copy(),
            # Each request runs in an asyncio task of its own: what the app sets in its context ends with it.
            # Its answer's body may come in pieces, written without being joined first (BODY_PARTS).
            "extensions": {REQUEST_TASK: {}, BODY_PARTS: {}},
        }
        app = self.app
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            _log.warning("Exceeded concurrency limit.")
            app = cast(App, service_unavailable)
        keep_alive = version != "1.0" and parser.should_keep_alive() and not parser.should_upgrade()
        previous = self.cycle
        cycle = RequestCycle(self, scope, keep_alive, self.expect_continue)
        self.cycle = cycle
        if previous is None or previous.complete:
            self._start(cycle, app)
        else:  # pipelined behind an answer still being written: it waits its turn
            self.pipeline.appendleft((cycle, app))
            # Read on for a few: a client that leaves is seen (the request being answered learns it), which a
            # paused transport would not tell.
            if len(self.pipeline) >= MAX_PIPELINED:
                self.pause_reading()

    def on_body(self, body: bytes) -> None:
        self.unbodied = 0
        cycle = self.cycle
        if cycle is None or cycle.complete:
            return
        cycle.body.append(body)
        cycle.body_size += len(body)
        if cycle.body_size > HIGH_WATER:
            self.pause_reading()
        cycle.wake()

    def on_message_complete(self) -> None:
        if self.content_length and not self.codings and self.parser.should_upgrade():
            return  # an Upgrade request, whose body httptools does not read: it comes after (see data_received)
        self._message_complete()

    def _message_complete(self) -> None:
        self.in_message = False
        cycle = self.cycle
        if cycle is None or cycle.complete:
            return
        cycle.more_body = False
        cycle.wake()

    # --- requests and answers ---------------------------------------------------------------------------------

    def _start(self, cycle: RequestCycle, app: App) -> None:
        self.serving = cycle
        # A copy of the connection's context: a pipelined request is started from within its predecessor's task
        # (its last send), whose context holds that request's own state (its span, its log bindings).
        task = self.loop.create_task(cycle.run(app), context=self.context.copy())
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def response_complete(self) -> None:
        """The cycle's answer is written: start a pipelined request, or wait for the next one."""
        self.server_state.total_requests += 1
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size():  # the answer is not all out: dropped if the client stops reading
            self._watch_unsent()
        if self.pipeline:
            if self.pending_error is None:
                self.resume_reading()
            cycle, app = self.pipeline.pop()
            self._start(cycle, app)
            return
        if self.pending_error is not None:  # a bad request pipelined behind the ones answered: its turn now
            self._send_error(*self.pending_error)
            return
        self.resume_reading()
        self.idle_since = self.loop.time()
        if self.idle_timer is None:
            self.idle_timer = self.loop.call_later(self.timeout_keep_alive, self._idle_check)

    def _idle_check(self) -> None:
        # uvicorn's keep-alive timeout without a timer per request: one timer per idle period, re-armed while
        # requests keep coming; the connection closes once it has been idle for timeout_keep_alive seconds.
        self.idle_timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        cycle = self.cycle
        if (cycle is not None and not cycle.complete) or self.pipeline:
            return  # busy: the next answer re-arms it
        if transport.get_write_buffer_size():
            # The last answer is still going out: not idle (and dropped once the client reads none of it for
            # STALL_TIMEOUT_S: closing would wait for ever to write it).
            self._watch_unsent()
            self.idle_since = self.loop.time()
            self.idle_timer = self.loop.call_later(self.timeout_keep_alive, self._idle_check)
            return
        self._unwatch()
        # Idle, or receiving what no request is being served for (the rest of a body already answered, a head
        # that stalls): closed once no byte came for timeout_keep_alive seconds.
        remaining = self.idle_since + self.timeout_keep_alive - self.loop.time()
        if remaining > 0:
            self.idle_timer = self.loop.call_later(remaining, self._idle_check)
        else:
            transport.close()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: an idle connection closes now, a busy one after its answer."""
        cycle = self.cycle
        if cycle is None or cycle.complete:
            self.close_when_sent()
        else:
            cycle.keep_alive = False

    def _refuse_head_too_large(self) -> None:
        """A 431: a head (or a chunked body's trailers) over ``MAX_HEAD_BYTES``."""
        _log.warning("Request head larger than %d bytes received.", MAX_HEAD_BYTES)
        self._refuse(431, f"Request header fields too large: at most {MAX_HEAD_BYTES} bytes of request line and "
                          "headers.", "headers")  # fmt: skip

    def _refuse(self, status: int, msg: str, param: str | None = None) -> None:
        """Answer a request that cannot be read (400, 431) and close: after the answers owed to the requests
        pipelined before it, in order (RFC 9112, 9.3.2); at once if it is the one being answered (its body broken)."""
        bad = self.cycle if self.in_message and not self.in_head else None  # its head was read: queued or started
        if bad is not None and not bad.complete and bad is not self.serving:
            self.pipeline = deque(queued for queued in self.pipeline if queued[0] is not bad)  # never started
        serving = self.serving
        body = _error_body(status, msg, param, _route_dialect(self.app, self.url))  # (the url read, if any)
        if bad is not serving and ((serving is not None and not serving.complete) or self.pipeline):
            self.pending_error = (status, body)
            self.pause_reading()  # nothing after it can be read
        else:
            self._send_error(status, body)

    def _send_error(self, status: int, body: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head.append(name + b": " + value + b"\r\n")
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
        head.append(b"connection: close\r\n\r\n")
        head.append(body)
        transport.write(b"".join(head))
        transport.close()


#: The codes of the requests this protocol refuses before any app sees them.
_REFUSED: Final = {
    400: "invalid_http_request",
    431: "request_header_fields_too_large",
    501: "unsupported_transfer_coding",
}


def _error_body(status: int, msg: str, param: str | None, dialect: Dialect) -> bytes:
    """A refusal's body in a route's error shape, as the gateway's own errors are: every client's SDK reads it."""
    err = InvalidRequest(msg, param=param, code=_REFUSED.get(status, "invalid_http_request"))
    err.status = status
    return render_error(err, dialect)


def _route_dialect(app: Any, url: bytes) -> Dialect:
    """The dialect of the gateway's route the request target ``url`` names, as the gateway matches it (its
    ``dialect_for``: ``server.path_prefix`` and all); OpenAI's for any other path, or another app."""
    try:
        raw = url.partition(b"?")[0] if url[:1] == b"/" else (httptools.parse_url(url).path or b"")
        path = urllib.parse.unquote(raw.decode("latin-1"))
    except Exception:  # a target httptools cannot read: no route
        return Dialect.OPENAI
    for _ in range(8):  # the gateway, under the middlewares uvicorn may wrap it in (proxy headers, ...)
        finder = getattr(app, "dialect_for", None)
        if finder is not None:
            found = finder(path)
            return found if isinstance(found, Dialect) else Dialect.OPENAI
        app = getattr(app, "app", None)
        if app is None:
            break
    return Dialect.OPENAI


class _HeadTooLarge(Exception):
    """A request head over ``MAX_HEAD_BYTES``, found once it is whole."""


class _BadHost(Exception):
    """An HTTP/1.1 request head without a Host header, or any request head with more than one."""


class _BadCoding(Exception):
    """A request head whose transfer codings are other than ``chunked`` alone."""


class RequestCycle:
    """One request and its answer: the ASGI ``receive`` and ``send`` the app is given."""

    def __init__(self, conn: GatewayHttpProtocol, scope: dict[str, Any], keep_alive: bool,
                 expect_continue: bool) -> None:  # fmt: skip
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.waiting_for_continue = expect_continue
        self.head_request = scope["method"] == "HEAD"
        self.http10 = scope["http_version"] != "1.1"  # no chunked answers (1.0, 0.9): the close ends the body
        self.body: list[bytes] = []
        self.body_size = 0
        self.more_body = True
        self.body_done = False  # the last of the body was handed to the app
        self.waiters: list[asyncio.Future[None]] = []  # receive() calls waiting (an app may run two at once)
        self.disconnected = False
        self.started = False
        self.complete = False
        self.head: bytes | None = None  # the answer's head, written with its first body message
        self.chunked = False
        self.length = -1  # Content-Length still to come; -1: not given

    def wake(self) -> None:
        if self.waiters:
            waiters, self.waiters = self.waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def run(self, app: App) -> None:
        failed: BaseException | None = None
        try:
            await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            failed = exc
        # What follows awaits: outside the handler (a compiled coroutine loses the exception across an await in it).
        # The head waits for the body, so an app that fails after its "http.response.start" has sent nothing yet:
        # the client still gets a whole 500 answer, where uvicorn's protocol can only close the connection.
        nothing_sent = not self.started or self.head is not None
        transport = self.conn.transport
        if isinstance(failed, asyncio.CancelledError) and (self.complete or self.disconnected):
            # Answered, or its client gone, then cancelled: the server stopping after its graceful timeout (see cli).
            return
        if self.disconnected and (isinstance(failed, OSError) or type(failed).__name__ == "ClientDisconnect"):
            # The app let our word that the client left go through (ClientGone, an OSError), or its framework's
            # form of it (Starlette's ClientDisconnect, raised for it under ASGI 2.4): nothing to log, nor to answer.
            return
        if failed is not None:
            _log.error("Exception in ASGI application\n", exc_info=failed)
        elif self.complete:
            return
        elif self.disconnected:  # the client left first (a timeout, say): nothing to log, as uvicorn does
            return
        elif not self.started:
            _log.error("ASGI callable returned without starting response.")
        else:
            _log.error("ASGI callable returned without completing response.")
        if self.disconnected or self.complete:
            return
        if nothing_sent:
            await self._send_500()
        elif transport is not None:
            transport.close()

    async def _send_500(self) -> None:
        self.head = None
        self.started = False
        try:
            await self.send({"type": "http.response.start", "status": 500, "headers": list(_ERROR_HEADERS)})
            await self.send({"type": "http.response.body", "body": b"Internal Server Error"})
        except ClientGone:  # left while the answer waited for room
            pass

    async def receive(self) -> Message:
        conn = self.conn
        if self.waiting_for_continue:
            self.waiting_for_continue = False
            if conn.transport is not None and not conn.transport.is_closing():
                conn.transport.write(_CONTINUE)
        if not self.disconnected and not self.complete and (self.body_done or (not self.body and self.more_body)):
            conn.resume_reading()
            waiter: asyncio.Future[None] = conn.loop.create_future()
            self.waiters.append(waiter)
            if self.body_done:  # the body is in: this waits for the client to leave, for as long as it takes
                await waiter
            else:
                await conn.body_bounded(waiter)
        if self.disconnected or self.complete:
            return {"type": "http.disconnect"}
        chunks = self.body
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.body = []
        self.body_size = 0
        if not self.more_body:
            self.body_done = True
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    async def send(self, message: Message) -> None:
        conn = self.conn
        if conn.write_paused and not self.disconnected:
            await conn.drain()
        if self.disconnected:
            raise ClientGone("The client left before the answer was sent")
        kind = message["type"]
        if not self.started:
            if kind != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{kind}'.")
            self.head = self._head(message["status"], message.get("headers", ()))
            self.started = True
            self.waiting_for_continue = False
            return
        if self.complete:
            raise RuntimeError(f"Unexpected ASGI message '{kind}' sent, after response already completed.")
        pieces: list[bytes | bytearray | memoryview]
        if kind == "http.response.body":
            body: bytes | bytearray | memoryview = message.get("body", b"")  # bytes-like, as uvicorn takes it
            pieces = [body] if body else []
            size = len(body)
        elif kind == BODY_PARTS:
            pieces = [p for p in message["parts"] if len(p)]
            size = sum([len(p) for p in pieces])
        else:
            raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{kind}'.")
        more_body = bool(message.get("more_body", False))
        if size and self.length >= 0 and not self.head_request and size > self.length:
            raise RuntimeError("Response content longer than Content-Length")  # the head still unsent: a 500
        head, self.head = self.head, None
        out: list[bytes | bytearray | memoryview] = [] if head is None else [head]
        if self.head_request:
            self.length = 0
        elif self.chunked:
            if size:
                out.append(b"%x\r\n" % size)
                out += pieces
                out.append(b"\r\n")
            if not more_body:
                out.append(_LAST_CHUNK)
        elif size:
            if self.length >= 0:
                self.length -= size
            out += pieces
        transport = conn.transport
        if out and transport is not None:
            if len(out) == 1:
                transport.write(out[0])
            else:
                if len(out) > _MAX_PARTS:
                    step = -(-len(out) // _MAX_PARTS)
                    out = [b"".join(out[i : i + step]) for i in range(0, len(out), step)]
                transport.writelines(out)  # the head and the body in one send
        if not more_body:
            if self.length > 0:
                raise RuntimeError("Response content shorter than Content-Length")
            if conn.write_paused and not self.disconnected:
                # The answer waits in the transport's buffer (a client reading slowly, or not at all): not sent yet.
                # A client that leaves, or is dropped after STALL_TIMEOUT_S of reading nothing, did not get it.
                try:
                    await conn.drain()
                except asyncio.CancelledError:
                    # The server stopping (its graceful timeout passed) while the client still reads: the request
                    # ends as answered (run() then ends it without a traceback), its connection dropped at once (a
                    # close would wait for the client to read the rest, past the server's end).
                    self.complete = True
                    if conn.transport is not None:
                        conn.transport.abort()
                    raise
                if self.disconnected:
                    raise ClientGone("The client left before the answer was sent")
            self.complete = True
            self.wake()
            if not self.keep_alive:
                conn.close_when_sent()
            conn.response_complete()

    def _head(self, status: int, headers: Any) -> bytes:
        line = STATUS_LINE.get(status)
        if line is None or status < 200:
            # A 500 instead (the head is not sent yet): no status line for it, or an interim one (1xx), which
            # cannot end a request (RFC 9110, 15.2).
            if type(status) is not int or not 200 <= status <= 599:
                raise RuntimeError(f"Invalid HTTP status code {status!r} in the response.")
            line = b"HTTP/1.1 %d \r\n" % status
        out = [line]
        lines = 1
        for name, value in self.conn.server_state.default_headers:
            out.append(name)  # four appends: no list made and concatenated per header
            out.append(b": ")
            out.append(value)
            out.append(b"\r\n")
            lines += 1
        closing = False
        length = -1
        chunked = False
        for raw_name, value in headers:
            name = _header_name(raw_name)
            lines += 1
            if name == b"content-length" and length < 0 and not chunked:
                if not value.isdigit():  # "-1" read as none: both Content-Length and chunked went out
                    raise RuntimeError("Invalid Content-Length header value.")
                length = int(value)
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                length, chunked = -1, True
            elif name == b"connection" and b"close" in [t.strip() for t in value.lower().split(b",")]:
                self.keep_alive = False
                closing = True
            out.append(name)
            out.append(b": ")
            out.append(value)
            out.append(b"\r\n")
        if status in _NO_BODY_STATUS:
            length, chunked = 0, False  # a body would be read as the next answer: refused, as uvicorn does
        elif length < 0 and not chunked and not self.head_request:
            if self.http10:
                self.keep_alive = False  # the close ends the body
            else:
                chunked = True
                out.append(_CHUNKED)
                lines += 1
        if not self.keep_alive and not closing:
            out.append(_CLOSE)
            lines += 1
        out.append(b"\r\n")
        head = b"".join(out)
        # Every line ends with the CRLF written here, and the head with one more: those are the only controls the
        # translation may take out (names were checked above), any control of a value but tab is one more.
        if len(head) - len(head.translate(None, _CONTROLS)) != 2 * (lines + 1):
            raise RuntimeError("Invalid HTTP header value.")
        self.length = length
        self.chunked = chunked
        return head
