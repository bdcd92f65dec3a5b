"""structlog JSON lines: one access line per request, and request fields bound for every log line (SPEC 8).

``bind_request`` puts the request's ids in structlog's contextvars, so any structlog line logged while the
request runs, the host app's included, carries them (through ``merge_contextvars``, first in the chain here
and in structlog's own default chain). ``access_log`` writes the one line per request on ``embedgate.access``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import os
import queue
import select
import stat
import sys
import threading
import time
from datetime import UTC, datetime
from typing import IO, Any, BinaryIO, Final, TextIO, cast

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import Processor

__all__ = [
    "ACCESS_LOGGER",
    "BODY_PARTS",
    "REQUEST_TASK",
    "access_log",
    "bind_request",
    "bind_task",
    "clear_request",
    "configure_logging",
    "flush_access_lines",
    "set_access_flush_delay",
]

ACCESS_LOGGER: Final = "embedgate.access"
#: The ASGI scope extension of a server that runs each request in an asyncio task of its own (``embedgate serve``'s
#: protocol): what the request binds in its context ends with the task, so the gateway binds with ``bind_task``.
REQUEST_TASK: Final = "embedgate.request_task"
#: The ASGI scope extension of a server that takes an answer's body as pieces: a message
#: ``{"type": BODY_PARTS, "parts": [bytes-like, ...], "more_body": bool}`` sends the pieces in order, as one
#: ``http.response.body`` of their concatenation would, without that copy (``embedgate serve``'s protocol writes
#: them with one ``writev``). The gateway sends a 256-vector answer, ~2.1 MB, as 515 pieces so, but only to the
#: server's own ``send``: a host middleware wrapped around the app under that server would not know the message.
BODY_PARTS: Final = "embedgate.body_parts"

# The processor list of the configuration this module installed, to tell ours from a host app's later one.
_installed: list[Processor] | None = None
_installed_args: tuple[object, ...] | None = None
_access: Any = structlog.get_logger(ACCESS_LOGGER)
# With our own JSON configuration installed: its output and minimum level, for the access line's direct path,
# and its processors as they were (structlog's capture_logs swaps the list's contents in place).
_direct: tuple[BinaryIO, int] | None = None
_direct_chain: tuple[Processor, ...] = ()
_LEVELS: Final = {"info": logging.INFO, "warning": logging.WARNING}

# The tokens of this request's bindings, so clear_request restores a host app's own values of the same keys
# instead of wiping every contextvar the host bound.
_bound: contextvars.ContextVar[tuple[dict[str, contextvars.Token[Any]], ...]] = contextvars.ContextVar(
    "embedgate_log_bindings", default=()
)
# structlog's context variable of each key bound so far (taken from the first binding's token: structlog keeps one
# variable per key for good), and the prefix of their names.
_vars: dict[str, contextvars.ContextVar[Any]] = {}
_PREFIX: Final[str] = getattr(structlog.contextvars, "STRUCTLOG_KEY_PREFIX", "structlog_")
_PREFIX_LEN: Final = len(_PREFIX)


class _Lines:
    """structlog's bytes logger, taking a rendered str too: a host app that later configures structlog with a str
    renderer (its console, say) but not its logger factory keeps this one (``BytesLogger`` raised TypeError)."""

    def __init__(self, file: BinaryIO) -> None:
        # Our own writer needs no BytesLogger (which keeps a lock per file by weak reference: a compiled class
        # takes none, and every line raised TypeError).
        self._sink: _Sink | None = file if isinstance(file, _Sink) else None
        self._out = structlog.BytesLogger(file) if self._sink is None else None

    def msg(self, message: bytes | str) -> None:
        line = message.encode() if isinstance(message, str) else message
        sink = self._sink
        if sink is not None:
            # Our own stdout writer, thread-safe itself: not under BytesLogger's lock, which a forked child could
            # inherit held (its first line then waited for ever), and a signal handler logging within a write wait on.
            sink.write(line + b"\n")
            sink.flush()
            return
        try:
            if self._out is not None:
                self._out.msg(line)
        except (OSError, ValueError):  # an output gone, full or closed: the line is lost, not what logged it
            pass

    def debug(self, message: bytes | str) -> None:
        self.msg(message)

    def info(self, message: bytes | str) -> None:
        self.msg(message)

    def warning(self, message: bytes | str) -> None:
        self.msg(message)

    def warn(self, message: bytes | str) -> None:
        self.msg(message)

    def error(self, message: bytes | str) -> None:
        self.msg(message)

    def exception(self, message: bytes | str) -> None:
        self.msg(message)

    def critical(self, message: bytes | str) -> None:
        self.msg(message)

    def fatal(self, message: bytes | str) -> None:
        self.msg(message)

    def log(self, message: bytes | str) -> None:
        self.msg(message)


class _LinesFactory:
    def __init__(self, file: BinaryIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _Lines:
        return _Lines(self._file)


_TRACEBACKS: Final = structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))


def configure_logging(
    json: bool = True,
    *,
    replace_host_config: bool = False,
    level: int = logging.INFO,
    file: IO[Any] | None = None,
    keep_installed: bool = False,
) -> bool:
    """Configure structlog for JSON lines (or console lines with ``json=False``); True if this call did.

    Idempotent: calling it again with the same arguments changes nothing. A configuration the host app made
    (structlog already configured, and not by this function) is kept unless ``replace_host_config``: mounted,
    the gateway's lines then go through the host's processors. ``file`` defaults to stdout (binary for JSON).
    With ``keep_installed``, a configuration this function installed before, with other arguments, is kept too (a
    mounted gateway in a process whose standalone one configured it).
    """
    global _access, _installed, _installed_args, _direct, _direct_chain
    args = (json, level, file)
    current = structlog.get_config()["processors"]
    # Ours, and as we left it: structlog.testing.capture_logs empties the installed list in place (and fills it
    # again after), so a list of the same identity may hold another's processors: reconfigured then, the capture
    # (a test's) stopped seeing the lines.
    ours = _installed is not None and current is _installed and tuple(current) == _direct_chain
    if ours and (args == _installed_args or keep_installed):
        return False
    if structlog.is_configured() and not ours and not replace_host_config:
        return False
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        # structlog's dict_tracebacks shows every frame's local variables (a request's headers: its API key);
        # the traceback without them.
        processors += [_TRACEBACKS, structlog.processors.JSONRenderer(orjson.dumps)]
        out = cast(BinaryIO, file) if file is not None else _stdout()
        factory: Any = _LinesFactory(out)
    else:
        processors += [structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)]
        factory = structlog.PrintLoggerFactory(cast(TextIO | None, file))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        context_class=dict,
        logger_factory=factory,
        # Not cached: a module's logger cached on its first line kept that configuration for good (what a host, or
        # structlog.testing.capture_logs, configured later never reached it); the access line, on every request,
        # does not go through these proxies (see access_log).
        cache_logger_on_first_use=False,
    )
    _installed, _installed_args = processors, args
    _direct = (out, level) if json else None
    _direct_chain = tuple(processors)
    # A fresh proxy: the old one may have cached a logger bound to the previous configuration.
    _access = structlog.get_logger(ACCESS_LOGGER)
    return True


_own_stdout: _Sink | None = None
_PIPE_BUF: Final = getattr(select, "PIPE_BUF", 4096)  # POSIX's bound of a pipe write kept in one piece
#: Bytes of lines a flush hands to the writer thread at the latest (between flushes the lines wait in a list).
_HANDOFF_BYTES: Final = 64 * 1024
#: Bytes of lines handed off and not yet written, at most: beyond it, lines are dropped (and counted), not kept.
MAX_PENDING_BYTES: Final = 16 * 1024 * 1024
#: How long the process's exit waits for the lines still to be written (not Final: a test shortens it).
_exit_wait_s = 10.0


class _Sink:
    """stdout for the log lines, written by a thread of its own: the event loop never waits on it. A pipe that
    nobody reads (a stalled log shipper) or a full disk used to stop the whole gateway in a blocking write, health
    checks included. Lines wait in a list until a flush; a flush hands them to the thread, which writes whole
    lines, to a pipe at most PIPE_BUF bytes at a time (``--workers N`` share one stdout: a pipe keeps such a write
    in one piece, a larger one could be cut by another worker's lines), to a file a chunk at a time. When more
    than ``MAX_PENDING_BYTES`` wait for the thread, further lines are dropped, and the thread says how many (a line
    of its own) once it catches up; a write that fails (a reader gone, a full disk) loses its lines, never the
    request that logged them."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        # A regular file takes a chunk in one write (Linux appends each write whole, also for processes sharing the
        # file): fewer system calls and GIL hand-offs for the thread; a pipe, a socket or a terminal PIPE_BUF bytes.
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            regular = False
        self._piece = _HANDOFF_BYTES * 2 if regular else _PIPE_BUF
        # Reentrant: a signal handler that logs while this thread is within write() would wait for itself.
        self._lock = threading.RLock()
        self._lines: list[bytes] = []
        self._size = 0
        self._pending = 0  # handed to the thread, not yet written
        self._dropped = 0  # lines dropped since the thread last said so
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._closed = False  # past the exit's close: lines are written by whoever logs them, at once
        self._until = 0.0  # until when (time.monotonic()) such lines may wait for the output
        self._idle = threading.Event()  # set while the thread holds nothing to write
        self._idle.set()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        """In a forked child: the parent's lines, waiting or handed off, are the parent's to write (the child wrote
        them once more), and its thread and lock are not the child's."""
        self._lock = threading.RLock()
        self._lines, self._size, self._pending, self._dropped = [], 0, 0, 0
        self._queue = queue.SimpleQueue()
        self._writer = None
        self._closed = False
        self._idle = threading.Event()
        self._idle.set()

    def write(self, data: bytes) -> int:
        with self._lock:
            self._lines.append(data)
            self._size += len(data)
            full = self._size >= _HANDOFF_BYTES
        if full:
            self.flush()
        return len(data)

    def flush(self) -> None:
        with self._lock:
            if not self._lines:
                return
            lines, self._lines, self._size = self._lines, [], 0
            chunk = b"".join(lines)
            if self._pending + len(chunk) > MAX_PENDING_BYTES:
                self._dropped += chunk.count(b"\n")
                return
            if not self._closed:
                self._pending += len(chunk)
                self._idle.clear()
                thread = self._writer
                if thread is None or not thread.is_alive():
                    thread = self._writer = threading.Thread(target=self._run, name="embedgate-log-writer",
                                                             daemon=True)  # fmt: skip
                    thread.start()
                self._queue.put(chunk)  # under the lock: chunks queued in the order their lines came
                return
        # Logged after the exit's close (another atexit handler, a daemon thread): a thread started now would never
        # run before the interpreter ends. Written here, within the exit's wait (a pipe nobody reads stops no exit).
        self._write_out(chunk, until=self._until)

    def drain(self, timeout: float) -> None:
        """Hand over what waits, and wait (``timeout`` seconds at most) until the thread has written all it holds."""
        self.flush()
        self._idle.wait(timeout)

    def close(self) -> None:
        """Write out what waits (at the process's exit), for ``_exit_wait_s`` at most."""
        self.flush()
        with self._lock:
            self._closed = True
            self._until = time.monotonic() + _exit_wait_s
            thread = self._writer
            if thread is not None and thread.is_alive():
                self._queue.put(None)
        if thread is not None:
            try:
                thread.join(_exit_wait_s)
            except KeyboardInterrupt:  # Ctrl-C during the wait: stop waiting (no traceback at exit)
                pass

    def _run(self) -> None:
        while True:
            chunk = self._queue.get()
            if chunk is None:
                return
            self._write_out(chunk)
            with self._lock:
                self._pending -= len(chunk)
                dropped = self._dropped if self._pending == 0 else 0
                self._dropped -= dropped
                if self._pending == 0 and not dropped:
                    self._idle.set()
            if dropped:
                note = {"logger": "embedgate", "event": "log lines dropped: their output was not taken in time (a "
                        "full pipe or disk, or a reader gone)", "dropped": dropped, "level": "warning",
                        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z")}  # fmt: skip
                self._write_out(orjson.dumps(note) + b"\n", counted=False)
                with self._lock:
                    if self._pending == 0:
                        self._idle.set()

    def _write_out(self, chunk: bytes, *, counted: bool = True, until: float | None = None) -> None:
        """Write ``chunk`` whole lines at a time; a write that fails, or (``until``, a ``time.monotonic()``) that
        cannot start in time, loses the rest, counted."""
        start, end, size = 0, 0, len(chunk)
        view = memoryview(chunk)
        while start < size:
            end = start + self._piece
            if end < size:
                cut = chunk.rfind(b"\n", start, end)
                end = cut + 1 if cut >= start else (chunk.find(b"\n", end) + 1 or size)  # a long line alone
            else:
                end = size
            piece = view[start:end]
            try:
                while piece:
                    if (
                        until is not None
                        and not select.select([], [self._fd], [], max(0.0, until - time.monotonic()))[1]
                    ):
                        raise BlockingIOError("the output took nothing in time")
                    written = os.write(self._fd, piece)  # (not in the slice: compiled, its call ran twice)
                    piece = piece[written:]
            except (OSError, ValueError):  # (ValueError: select on a descriptor it cannot watch)
                if counted:
                    with self._lock:
                        self._dropped += chunk.count(b"\n", start)
                return
            start = end


def _stdout() -> BinaryIO:
    """stdout, through a writer of our own (see :class:`_Sink`): with ``PYTHONUNBUFFERED`` set (Docker images set
    it, ours too), ``sys.stdout.buffer`` is the raw file and every line would be a write call (~12 us of CPU per
    request in place). Flushed as the access lines need it, at the gateway's shutdown and at exit. A stdout that
    is not a file (replaced by a test harness, say) is used as it is."""
    global _own_stdout
    if _own_stdout is None:
        try:
            fd = sys.stdout.fileno()
        except (AttributeError, OSError, ValueError):
            if sys.stdout is None:  # no stdout at all (closed when the process started): the lines go nowhere
                _own_stdout = _Sink(os.open(os.devnull, os.O_WRONLY))
                return cast(BinaryIO, _own_stdout)
            return cast(BinaryIO, sys.stdout.buffer)
        _own_stdout = _Sink(fd)  # the descriptor is sys.stdout's, never closed here
        atexit.register(_own_stdout.close)
    return cast(BinaryIO, _own_stdout)


def bind_request(**fields: Any) -> None:
    """Bind fields (request_id, trace_id, span_id, key_id, ...) to every log line of the current request.

    May be called several times per request (ids first, key id after authentication); ``clear_request``
    undoes them all. Bind ids, never secrets or input text.
    """
    tokens: dict[str, contextvars.Token[Any]] = {}
    for key, value in fields.items():
        var = _vars.get(key)
        if var is None:  # structlog makes the key's variable on its first binding; it keeps it for good
            token = structlog.contextvars.bind_contextvars(**{key: value})[key]
            _vars[key] = token.var
        else:  # what bind_contextvars does, without its Python call and key formatting per request
            token = var.set(value)
        tokens[key] = token
    _bound.set((*_bound.get(), tokens))


def bind_task(**fields: Any) -> None:
    """``bind_request`` for a request that runs in an asyncio task of its own (``embedgate serve``'s): the
    bindings end with the task's context, so nothing is kept to undo them (``clear_request`` leaves them)."""
    for key, value in fields.items():
        var = _vars.get(key)
        if var is None:
            _vars[key] = structlog.contextvars.bind_contextvars(**{key: value})[key].var
        else:
            var.set(value)


def bind_more(**fields: Any) -> None:
    """Bind more fields to the current request (its key id, once authenticated) the way its ids were bound:
    undone by ``clear_request`` after ``bind_request``, ended with the task after ``bind_task``."""
    bound = _bound.get()
    if not bound:
        bind_task(**fields)
        return
    tokens = bound[-1]  # this request's own: its tokens join them (one context variable set less than bind_request)
    for key, value in fields.items():
        var = _vars.get(key)
        if var is None or key in tokens:
            bind_request(**{key: value})
        else:
            tokens[key] = var.set(value)


def clear_request() -> None:
    """Undo this request's ``bind_request`` calls, restoring any value a host app had bound on those keys."""
    bindings = _bound.get()
    if not bindings:
        return
    for i in range(len(bindings) - 1, -1, -1):  # newest first (an index loop: mypyc 2.4.1 fails on reversed() here)
        for key, token in bindings[i].items():
            try:
                token.var.reset(token)  # what structlog's reset_contextvars does with it
            except (ValueError, RuntimeError):
                # Bound in another context (a token resets only where it was made), or reset already (uvicorn's
                # own protocols run a pipelined request within its predecessor's task, bindings and all): unbind
                # the key instead.
                structlog.contextvars.unbind_contextvars(key)
    _bound.set(())


def _bound_fields() -> dict[str, Any]:
    """structlog's ``get_contextvars()``, the same loop compiled: the fields bound in this context."""
    fields: dict[str, Any] = {}
    for var, value in contextvars.copy_context().items():  # pairs: no second lookup per variable
        name: str = var.name
        if value is not Ellipsis and name.startswith(_PREFIX):
            fields[name[_PREFIX_LEN:]] = value
    return fields


def access_log(
    *,
    status: int,
    latency_ms: float,
    request_id: str | None = None,
    trace_id: str | None = None,
    span_id: str | None = None,
    route: str | None = None,
    key_id: str | None = None,
    identity: str | None = None,
    model: str | None = None,
    cache: str | None = None,
    tokens: int | None = None,
    billed_tokens: int | None = None,
    cost_usd: float | None = None,
    attempts: int | None = None,
    **fields: Any,
) -> None:
    """Write the request's access line (event ``request``) on ``embedgate.access``; None values are left out.

    Fields already bound with ``bind_request`` appear too, so the ids need not be repeated here. A 5xx is
    logged at warning level, the rest at info.
    """
    # Milliseconds to the microsecond: round(x, 3) goes through a decimal conversion; a latency needs no tie rule.
    latency = int(latency_ms * 1000.0 + 0.5) / 1000.0
    # Named in the line itself: with structlog's non-stdlib loggers the logger name is not rendered.
    line: dict[str, Any] = {"logger": ACCESS_LOGGER, "status": status, "latency_ms": latency}
    # Only the fields given, each set in its turn (not a full dict filtered afterwards).
    if request_id is not None:
        line["request_id"] = request_id
    if trace_id is not None:
        line["trace_id"] = trace_id
    if span_id is not None:
        line["span_id"] = span_id
    if route is not None:
        line["route"] = route
    if key_id is not None:
        line["key_id"] = key_id
    if identity is not None:
        line["identity"] = identity
    if model is not None:
        line["model"] = model
    if cache is not None:
        line["cache"] = cache
    if tokens is not None:
        line["tokens"] = tokens
    if billed_tokens is not None:
        line["billed_tokens"] = billed_tokens
    if cost_usd is not None:
        line["cost_usd"] = cost_usd
    if attempts is not None:
        line["attempts"] = attempts
    if fields:
        for key, value in fields.items():
            if value is not None:
                line[key] = value
            else:
                line.pop(key, None)  # as the update then the filter did: None for a named field leaves it out
    method = "warning" if status >= 500 else "info"
    direct = _direct
    if direct is not None and tuple(structlog.get_config()["processors"]) == _direct_chain:
        _write_direct(direct, method, line)
    elif method == "warning":
        _access.warning("request", **line)
    else:
        _access.info("request", **line)


def _write_direct(direct: tuple[BinaryIO, int], method: str, line: dict[str, Any]) -> None:
    """The access line exactly as this module's structlog chain writes it (``configure_logging(json=True)``:
    contextvars merged, level, ISO UTC timestamp, orjson, one line), without the chain's generic
    machinery: the line is written on every request, and measured in place it cost ~60 us through structlog.
    Used only while that configuration is the installed one (not under a host's, nor ``capture_logs``)."""
    out, min_level = direct
    if _LEVELS[method] < min_level:
        return
    line["event"] = "request"
    for key, value in _bound_fields().items():
        line.setdefault(key, value)
    line["level"] = method
    line["timestamp"] = _utc_now_iso()
    try:
        out.write(orjson.dumps(line, default=repr) + b"\n")
    except (OSError, ValueError):  # stdout closed or gone (a reader that went away): the line is lost, not the answer
        return
    # Not flushed per line (a write call per line cost ~12 us of CPU per request in place): the lines wait in the
    # output's buffer, which writes itself out whole lines at a time when full (4 KiB on stdout, ~10 lines), and
    # are flushed ``_flush_delay`` seconds after the first of them at the latest (0: once the event loop is done
    # with what is ready now), and at shutdown.
    global _flush_loop
    pending = _flush_loop
    if pending is not None and not pending.is_closed():
        return  # a flush is due on a live loop: it writes this line out too (no get_running_loop(), a getpid call)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        out.flush()
        return
    # Keyed by loop: a loop closed with its flush still pending (a test's, say) must not hold back the next one's.
    _flush_loop = loop
    if _flush_delay > 0:
        loop.call_later(_flush_delay, _flush, out)
    else:
        loop.call_soon(_flush, out)


_flush_loop: asyncio.AbstractEventLoop | None = None
_flush_delay = 0.05


def set_access_flush_delay(seconds: float) -> None:
    """At most how long an access line waits in the output buffer (``telemetry.access_log_flush_ms``); 0 flushes
    once per event-loop pass."""
    global _flush_delay
    _flush_delay = max(0.0, seconds)


def flush_access_lines() -> None:
    """Write out the access lines still waiting (the gateway calls it at shutdown), and wait for stdout's writer to
    have written them, ``_exit_wait_s`` at most: a worker of ``embedgate serve --workers N`` ends by uvicorn's
    SIGTERM raised again after its shutdown, and no exit handler of its runs."""
    global _flush_loop
    _flush_loop = None
    if _direct is not None:
        _flush(_direct[0])
    sink = _own_stdout
    if sink is not None:
        sink.drain(_exit_wait_s)


def _flush(out: BinaryIO) -> None:
    global _flush_loop
    _flush_loop = None
    try:
        out.flush()
    except (OSError, ValueError):  # closed, or a full pipe: as a failed write would, lose the lines, not the loop
        pass


_stamp_second = -1
_stamp_prefix = ""
_time: Final = time.time


def _utc_now_iso() -> str:
    """``TimeStamper(fmt="iso", utc=True)``'s text for now (no fraction on a whole second, as isoformat)."""
    global _stamp_second, _stamp_prefix
    now = _time()
    second = int(now)
    micros = int((now - second) * 1_000_000)
    if second != _stamp_second:
        _stamp_second, _stamp_prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    if not micros:
        return _stamp_prefix + "Z"
    # The six digits as str(1_000_000 + micros) without its leading 1: a format spec ("06d") is the slow path of
    # an f-string in the compiled build (~a third of the access line's own cost, measured with callgrind).
    return _stamp_prefix + "." + str(1_000_000 + micros)[1:] + "Z"
