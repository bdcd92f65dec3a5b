"""A fast fake OpenAI-compatible embeddings upstream, plus a sink that swallows OTLP trace exports.

Raw asyncio (uvloop when installed) rather than a web framework: the upstream must cost almost nothing per
request, or the benchmark measures the fake instead of the proxy in front of it. The answer for each
``(n_inputs, dimensions, encoding_format)`` is built once and reused; only ``model`` and ``usage`` are
spliced in per request.

Routes:
  POST /v1/embeddings   deterministic float32 vectors, one per input (``vector(i, dims)``), float or base64
  POST /v1/traces       OTLP/HTTP sink: answers 200 and discards the body (counted in /stats)
  GET  /healthz         200 ok
  GET  /stats           JSON counters: embeddings requests, trace exports and their bytes

Run: ``python -m tests.benchmarks.fake_upstream --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import signal
from collections import OrderedDict
from typing import Any, cast

import numpy as np
import orjson

__all__ = ["DEFAULT_DIMS", "UpstreamProtocol", "main", "serve", "vector"]

DEFAULT_DIMS = 1536
_MAX_PRECOMPUTED = 64  # (n, dims, format) answers kept; a benchmark uses a handful
_MAX_HEAD = 64 * 1024
_OK_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
_BODY_START = b'{"object":"list","data":'


def vector(index: int, dims: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The deterministic unit float32 vector the fake answers for the input at position ``index``."""
    rng = np.random.default_rng(index * 100_003 + dims)
    v = rng.standard_normal(dims).astype(np.float32)
    out: np.ndarray[Any, np.dtype[np.float32]] = (v / np.linalg.norm(v)).astype(np.float32)
    return out


class _Answers:
    """Precomputed ``"data"`` arrays, bounded LRU by (n_inputs, dims, format)."""

    def __init__(self) -> None:
        self._data: OrderedDict[tuple[int, int, str], bytes] = OrderedDict()

    def get(self, n: int, dims: int, fmt: str) -> bytes:
        key = (n, dims, fmt)
        found = self._data.get(key)
        if found is not None:
            self._data.move_to_end(key)
            return found
        items = []
        for i in range(n):
            v = vector(i, dims)
            emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v
            items.append({"object": "embedding", "index": i, "embedding": emb})
        built = orjson.dumps(items, option=orjson.OPT_SERIALIZE_NUMPY)
        self._data[key] = built
        if len(self._data) > _MAX_PRECOMPUTED:
            self._data.popitem(last=False)
        return built


class _Stats:
    def __init__(self) -> None:
        self.embeddings = 0
        self.trace_posts = 0
        self.trace_bytes = 0
        self.errors = 0


def _tokens(inp: Any) -> tuple[int, int]:
    """(number of inputs, a cheap token estimate: ~4 characters per token, token arrays by length)."""
    if isinstance(inp, str):
        return 1, max(1, len(inp) // 4)
    if isinstance(inp, list) and inp:
        if isinstance(inp[0], int):
            return 1, len(inp)
        total = 0
        for item in inp:
            total += max(1, len(item) // 4) if isinstance(item, str) else len(item) if isinstance(item, list) else 1
        return len(inp), total
    raise ValueError("input must be a non-empty string or array")


def _response(status: int, body: bytes, content_type: bytes = b"application/json") -> list[bytes]:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"Error")
    head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n" % (
        status,
        reason,
        content_type,
        len(body),
    )
    return [head, body]


def _error(status: int, message: str) -> list[bytes]:
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}})
    return _response(status, body)


class UpstreamProtocol(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection; requests are parsed by hand (Content-Length bodies only)."""

    def __init__(self, answers: _Answers, stats: _Stats) -> None:
        self._answers, self._stats = answers, stats
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport to answer on."""
        self._transport = cast(asyncio.Transport, transport)  # a TCP server only ever hands us one

    def data_received(self, data: bytes) -> None:
        """Answer every complete request in the buffer (clients may pipeline)."""
        self._buf += data
        while self._transport is not None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > _MAX_HEAD:
                    self._transport.close()
                return
            head = bytes(self._buf[:end]).lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : stop if stop >= 0 else None])
            if len(self._buf) < end + 4 + length:
                return
            body = bytes(self._buf[end + 4 : end + 4 + length])
            del self._buf[: end + 4 + length]
            line = head[: head.find(b"\r\n")] if b"\r\n" in head else head
            method, _, rest = line.partition(b" ")
            path = rest.partition(b" ")[0]
            self._transport.writelines(self._handle(method, path, body))

    def _handle(self, method: bytes, path: bytes, body: bytes) -> list[bytes]:
        if method == b"post" and path.endswith(b"/embeddings"):
            return self._embeddings(body)
        if method == b"post" and path == b"/v1/traces":
            self._stats.trace_posts += 1
            self._stats.trace_bytes += len(body)
            return _response(200, b"", b"application/x-protobuf")
        if path == b"/healthz":
            return _response(200, b"ok", b"text/plain")
        if path == b"/stats":
            s = self._stats
            return _response(
                200,
                orjson.dumps(
                    {
                        "embeddings": s.embeddings,
                        "trace_posts": s.trace_posts,
                        "trace_bytes": s.trace_bytes,
                        "errors": s.errors,
                    }
                ),
            )
        return _error(404, "not found")

    def _embeddings(self, body: bytes) -> list[bytes]:
        try:
            req = orjson.loads(body)
            n, tokens = _tokens(req["input"])
            dims = int(req.get("dimensions") or DEFAULT_DIMS)
            fmt = req.get("encoding_format") or "float"
            if fmt not in ("float", "base64") or not 0 < dims <= 16384 or n > 4096:
                raise ValueError(f"unsupported encoding_format/dimensions/batch: {fmt!r}/{dims}/{n}")
            model = orjson.dumps(str(req.get("model", "")))
        except (ValueError, KeyError, TypeError) as exc:
            self._stats.errors += 1
            return _error(400, str(exc))
        self._stats.embeddings += 1
        data = self._answers.get(n, dims, fmt)
        tail = b',"model":%s,"usage":{"prompt_tokens":%d,"total_tokens":%d}}' % (model, tokens, tokens)
        head = _OK_HEAD % (len(data) + len(tail) + len(_BODY_START)) + _BODY_START
        return [head, data, tail]


async def serve(host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled (or SIGTERM/SIGINT when run as a program)."""
    answers, stats = _Answers(), _Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: UpstreamProtocol(answers, stats), host, port, backlog=1024)
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # plain asyncio still works, just slower
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
