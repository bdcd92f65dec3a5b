"""A lean Redis client for the budget store and the cache: one pipelined connection, RESP2, the commands they send.

Every request with a budget runs two Lua scripts in Redis (reserve, then settle). Through redis-py's asyncio
client each call cost ~80-110 us of CPU on this machine (its connection pool and lock, retry wrapper, stream
reader and pure-Python reply parser; ~73-81 us with hiredis); here a call is a write of the packed command and a
future resolved by the protocol when its reply arrives, ~10-17 us compiled (``python -m
tests.benchmarks.redis_client``: ``EVALSHA`` at 16 concurrent callers against the local Redis).

One connection carries every caller's commands at once (pipelining): Redis answers in order, so the protocol
resolves the oldest waiting future with each reply. A command that gets no reply within ``timeout`` fails with
``TimeoutError`` and takes the connection down (with every command still waiting on it): a server that stopped
answering is not asked again on the same socket. The next command connects again. Commands are never retried,
except an ``EVALSHA`` refused with ``NOSCRIPT`` (not run), which loads the script and runs it once more.

URLs: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS), and
``unix://[[user]:password@]/path/to/socket[?db=N]``, as redis-py reads them. Query options: ``db``, and for
``rediss://`` ``ssl_cert_reqs`` (``required``, the default, ``optional`` or ``none``) and ``ssl_ca_certs`` (a CA
file; the system's CAs otherwise). Any other option is refused (:func:`parse_url`), not ignored.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["LeanRedis", "RedisAddress", "RespError", "Script", "parse_url"]

_CRLF = b"\r\n"


class RespError(Exception):
    """An error reply from Redis (``WRONGTYPE ...``, ``NOSCRIPT ...``, a script's own error)."""


class Script:
    """A Lua script, called by its SHA1 (``EVALSHA``) and loaded when the server does not know it."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()  # Redis names scripts by their SHA1


def pack(args: Sequence[bytes | str | int | float]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if type(arg) is bytes:
            data = arg
        elif type(arg) is str:
            data = arg.encode()
        elif type(arg) is int:
            data = b"%d" % arg
        elif isinstance(arg, bool):
            raise TypeError("a Redis command argument must be bytes, str, int or float, not bool")
        elif isinstance(arg, int):
            data = b"%d" % arg
        elif isinstance(arg, float):
            data = repr(float(arg)).encode()
        elif isinstance(arg, bytes):
            data = bytes(arg)
        elif isinstance(arg, str):
            data = str(arg).encode()
        else:
            raise TypeError(f"a Redis command argument must be bytes, str, int or float, not {type(arg).__name__}")
        out.append(b"$%d\r\n" % len(data))
        out.append(data)
        out.append(_CRLF)
    return b"".join(out)


def parse(buf: bytes, pos: int) -> tuple[Any, int] | None:
    """The reply starting at ``buf[pos]`` and the position after it; None when it is not all there yet.

    Integers, simple and bulk strings (bytes), nil (None), arrays (lists); an error reply is a ``RespError``
    value (raised by the caller that sent the command, not here)."""
    end = buf.find(_CRLF, pos)
    if end < 0:
        return None
    kind = buf[pos]
    line = buf[pos + 1 : end]
    pos = end + 2
    if kind == 58:  # ':'
        return int(line), pos
    if kind == 36:  # '$'
        size = int(line)
        if size < 0:
            return None, pos
        if len(buf) < pos + size + 2:
            return None
        return buf[pos : pos + size], pos + size + 2
    if kind == 42:  # '*'
        count = int(line)
        if count < 0:
            return None, pos
        items: list[Any] = []
        for _ in range(count):
            parsed = parse(buf, pos)
            if parsed is None:
                return None
            item, pos = parsed
            items.append(item)
        return items, pos
    if kind == 43:  # '+'
        return line, pos
    if kind == 45:  # '-'
        return RespError(line.decode("utf-8", "replace")), pos
    raise ValueError(f"not a RESP2 reply: type byte {chr(kind)!r}")


class _Pipe(asyncio.Protocol):
    """One connection: commands written as they come, replies matched to their futures in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = self._loop = loop  # a connection serves the event loop that opened it
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        # The start of a reply not all received yet, how far it has been scanned, and the element counts still to
        # come of the arrays open at that point: a big reply (an MGET of a 256 batch, ~1.5 MB in ~24 reads) is
        # gathered and scanned once, in step with its reads, and parsed when whole.
        self._pending = bytearray()
        self._scanned = 0
        self._open: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def call(self, command: bytes) -> asyncio.Future[Any]:
        if self.closed or self._transport is None:
            raise ConnectionError("the connection to Redis is closed")
        future = self._loop.create_future()
        self._transport.write(command)
        self._waiting.append((future, self._loop.time() + self._timeout))
        if self._timer is None:
            self._timer = self._loop.call_at(self._waiting[0][1], self._check_deadline)
        return future

    def call_many(self, commands: Sequence[bytes]) -> list[asyncio.Future[Any]]:
        if self.closed or self._transport is None:
            raise ConnectionError("the connection to Redis is closed")
        self._transport.write(b"".join(commands))
        deadline = self._loop.time() + self._timeout
        futures = []
        for _ in commands:
            future = self._loop.create_future()
            self._waiting.append((future, deadline))
            futures.append(future)
        if self._timer is None and futures:
            self._timer = self._loop.call_at(deadline, self._check_deadline)
        return futures

    def data_received(self, data: bytes) -> None:
        try:
            if self._pending:
                self._pending += data
                if not self._whole_reply():
                    return
                data = bytes(self._pending)  # one reply or more, and perhaps the start of the next
                self._pending, self._scanned, self._open = bytearray(), 0, []
            pos = 0
            waiting = self._waiting
            while waiting:
                parsed = parse(data, pos)
                if parsed is None:
                    break
                value, pos = parsed
                future = waiting.popleft()[0]
                if not future.done():
                    if type(value) is RespError:
                        future.set_exception(value)
                    else:
                        future.set_result(value)
            if pos < len(data):
                if not waiting:
                    self._fail(ConnectionError("Redis sent a reply nobody asked for"))
                    return
                self._pending = bytearray(memoryview(data)[pos:])
                self._whole_reply()  # scans the partial reply as far as it goes (parse found it incomplete)
            elif self.closed and not waiting:  # a connection that had a late reply: every reply is in now
                self._fail(ConnectionError("the connection to Redis is closed"))
        except ValueError as exc:  # not RESP: nothing later on this socket can be trusted
            self._fail(ConnectionError(f"Redis sent an unreadable reply: {exc}"))

    def _whole_reply(self) -> bool:
        """Scan ``_pending`` on from where the last call stopped: whether it now holds a whole reply."""
        buf, pos, stack = self._pending, self._scanned, self._open
        size = len(buf)
        while True:
            end = buf.find(_CRLF, pos)
            if end < 0:
                break
            kind = buf[pos]
            if kind == 36:  # '$': wait for the whole string, then step over it
                length = int(buf[pos + 1 : end])
                after = end + 2 + (length + 2 if length >= 0 else 0)
                if after > size:
                    break
                pos = after
            elif kind == 42:  # '*'
                count = int(buf[pos + 1 : end])
                pos = end + 2
                if count > 0:
                    stack.append(count)
                    continue
            elif kind in (43, 45, 58):  # '+', '-', ':'
                pos = end + 2
            else:
                raise ValueError(f"not a RESP2 reply: type byte {chr(kind)!r}")
            # one element done: close the arrays it completes; none left open means the reply is whole
            while stack:
                stack[-1] -= 1
                if stack[-1]:
                    break
                stack.pop()
            else:
                self._scanned = pos
                return True
        self._scanned = pos
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError("Redis closed the connection"))

    def _check_deadline(self) -> None:
        self._timer = None
        waiting = self._waiting
        if not waiting:
            return
        now = self._loop.time()
        if now < waiting[0][1]:
            self._timer = self._loop.call_at(waiting[0][1], self._check_deadline)
            return
        # The oldest reply is late: the commands past their deadline fail, and the connection takes no new one
        # (it would wait behind them). Those sent since keep theirs: a Redis that pauses (a fork, a slow script)
        # still runs them when it resumes, so failing them at once refused requests whose budget scripts then ran
        # and charged them. The socket goes once every command on it has its reply or is past its deadline.
        self.closed = True
        exc = TimeoutError(f"Redis did not answer within {self._timeout:g} s")
        if waiting[-1][1] <= now:
            self._fail(exc)
            return
        for future, deadline in waiting:  # deadlines grow along the queue
            if deadline > now:
                self._timer = self._loop.call_at(deadline, self._check_deadline)
                break
            if not future.done():
                future.set_exception(exc)

    def _fail(self, exc: BaseException) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, deque()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(exc)
        if self._transport is not None:
            try:
                self._transport.abort()
            except RuntimeError:  # its event loop is already closed: the socket went with it
                pass

    def close(self) -> None:
        self._fail(ConnectionError("the Redis client was closed"))


_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


class RedisAddress(NamedTuple):
    """Where and how to connect, from a Redis URL (see the module)."""

    host: str
    port: int
    unix_path: str | None
    db: int
    username: str | None
    password: str | None
    tls: bool
    cert_reqs: ssl.VerifyMode
    ca_file: str | None


def parse_url(url: str) -> RedisAddress:
    """Read a Redis URL; ``ValueError`` names what is wrong (never the URL itself: it may hold a password)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("a Redis URL starts with redis://, rediss:// or unix://")
    query = parse_qs(parts.query)  # as redis-py: a blank value is none, and the first of a repeated one counts
    allowed = {"db", "ssl_cert_reqs", "ssl_ca_certs"} if parts.scheme == "rediss" else {"db"}
    for name in query:
        if name not in allowed:
            raise ValueError(f"the Redis URL option {name!r} is not supported (only {', '.join(sorted(allowed))})")
    # The query's db wins over the path's, as redis-py reads it (the identity store's client is redis-py's: two
    # readings put budgets and identities in two databases).
    db = query["db"][0] if "db" in query else parts.path.lstrip("/") if parts.scheme != "unix" else ""
    db = db or "0"
    if not (db.isascii() and db.isdigit()):
        raise ValueError("the Redis database in the URL must be a number")
    cert_reqs = query.get("ssl_cert_reqs", ["required"])[0].lower()
    if cert_reqs not in _CERT_REQS:
        raise ValueError("ssl_cert_reqs in the Redis URL must be required, optional or none")
    if parts.scheme == "unix" and not parts.path:
        raise ValueError("a unix:// Redis URL needs the socket's path")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError("the Redis port in the URL must be a number from 1 to 65535") from None
    return RedisAddress(
        host=unquote(parts.hostname) if parts.hostname else "localhost",
        port=port,
        unix_path=unquote(parts.path) if parts.scheme == "unix" else None,
        db=int(db),
        # as redis-py: an empty user or password is none (redis://:@host, a template's empty variable)
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=parts.scheme == "rediss",
        cert_reqs=_CERT_REQS[cert_reqs],
        ca_file=query["ssl_ca_certs"][0] if "ssl_ca_certs" in query else None,
    )


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _tls_context(address: RedisAddress) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=address.ca_file)
    if address.cert_reqs != ssl.CERT_REQUIRED:
        context.check_hostname = False
        context.verify_mode = address.cert_reqs
    return context


class LeanRedis:
    """Commands to one Redis over one pipelined connection, (re)connected on first use (see the module)."""

    def __init__(self, url: str, *, timeout: float = 1.0) -> None:
        self._address = parse_url(url)
        self._timeout = timeout
        self._pipe: _Pipe | None = None
        self._connecting: asyncio.Future[_Pipe] | None = None
        self._closed = False

    async def execute(self, *args: bytes | str | int | float, written: list[bool] | None = None) -> Any:
        """Send one command and return its reply; ``RespError`` for an error reply, ``OSError`` (connection)
        or ``TimeoutError`` when Redis cannot be reached or does not answer in time. ``written[0]`` is set once the
        command went out (a failure before it: Redis never saw the command)."""
        pipe = self._pipe
        if pipe is None or pipe.closed or pipe.loop is not asyncio.get_running_loop():
            pipe = await self._connection()
        reply = pipe.call(pack(args))
        if written is not None:
            written[0] = True
        return await reply

    async def execute_many(self, commands: Sequence[Sequence[bytes | str | int | float]]) -> list[Any]:
        """Send ``commands`` in one write and return their replies in order; raises the first failure, once
        every reply is in (nothing is left unawaited)."""
        pipe = self._pipe
        if pipe is None or pipe.closed or pipe.loop is not asyncio.get_running_loop():
            pipe = await self._connection()
        futures = pipe.call_many([pack(c) for c in commands])
        replies: list[Any] = []
        failure: BaseException | None = None
        try:
            for future in futures:
                try:
                    replies.append(await future)
                except (RespError, OSError, TimeoutError) as exc:
                    failure = failure or exc
        except BaseException:  # cancelled: the replies still to come are nobody's (no "never retrieved" noise)
            for future in futures:
                if not future.done():
                    future.add_done_callback(_retrieved)
            raise
        if failure is not None:
            raise failure
        return replies

    async def evalsha(self, script: Script, keys: Sequence[str], args: Sequence[bytes | str | int | float], *,
                      written: list[bool] | None = None) -> Any:  # fmt: skip
        """Run ``script`` (``EVALSHA``), loading it first if the server has not seen it (a restart flushes them);
        ``written`` as :meth:`execute` sets it, for the run that may have run it."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self.execute(*command, written=written)
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        if written is not None:
            written[0] = False  # Redis did not know the script: it ran nothing
        await self.execute("SCRIPT", "LOAD", script.source)
        return await self.execute(*command, written=written)

    async def aclose(self) -> None:
        """Close the connection; later commands fail."""
        self._closed = True
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None

    async def _connection(self) -> _Pipe:
        if self._closed:
            raise ConnectionError("the Redis client was closed")
        loop = asyncio.get_running_loop()
        stale = self._connecting
        if stale is not None and stale.done():
            # Left by a caller cancelled while it connected: its pipe has closed since (else it would be in use)
            # or it failed then; either way an old outcome, not this call's.
            self._connecting = None
            if not stale.cancelled():
                stale.exception()  # retrieved: no "never retrieved" warning at its collection
        if self._connecting is None or self._connecting.get_loop() is not loop:  # one connect for every caller
            if self._pipe is not None and self._pipe.loop is not loop:
                self._pipe.close()  # opened under another event loop (a test's, a reloaded app's)
            self._connecting = loop.create_task(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> _Pipe:
        try:
            return await self._connect_within()
        except TimeoutError as exc:  # asyncio.timeout's says nothing (a log line, /readyz showed "TimeoutError: ")
            if str(exc):
                raise
            raise TimeoutError(f"no connection to Redis within {self._timeout:g} s") from None

    async def _connect_within(self) -> _Pipe:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._timeout):
            address = self._address
            if address.unix_path is not None:
                _, pipe = await loop.create_unix_connection(lambda: _Pipe(loop, self._timeout), address.unix_path)
            else:
                tls = _tls_context(address) if address.tls else None
                _, pipe = await loop.create_connection(lambda: _Pipe(loop, self._timeout), address.host,
                                                       address.port, ssl=tls)  # fmt: skip
            try:
                user, password = address.username, address.password
                if user is not None:  # an ACL user, with its password or none (a nopass user takes any)
                    await pipe.call(pack(("AUTH", user, password or "")))
                elif password is not None:
                    await pipe.call(pack(("AUTH", password)))
                if address.db:
                    await pipe.call(pack(("SELECT", address.db)))
            except BaseException:
                pipe.close()
                raise
        if self._closed:  # closed while connecting
            pipe.close()
            raise ConnectionError("the Redis client was closed")
        self._pipe = pipe
        return pipe
