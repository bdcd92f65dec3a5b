"""A real local HTTP upstream speaking the OpenAI embeddings API, scriptable for fault injection.

It runs an aiohttp server on 127.0.0.1 in a background thread with its own event loop. Vectors are a
deterministic function of (model, item, dimensions), so tests compute the expected answer with
:func:`expected_vector`. Every request is recorded; ``script`` queues behaviours consumed one per request
(``Fault("status", 429, retry_after=1)``, ``Fault("drop")``, ``Fault("slow", delay=2)``, ``Fault("malformed")``,
``Fault("wrong_count")``, ``Fault("wrong_dims")``), optionally only for one upstream model. ``peak_in_flight``
tells how many requests for one upstream model were ever handled at the same time.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from aiohttp import web

__all__ = ["FakeUpstream", "Fault", "expected_vector", "free_port"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _key(item: Any) -> bytes:
    return orjson.dumps(item)


def expected_vector(model: str, item: Any, dims: int = 8) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The vector the fake upstream answers for ``item`` (a string or a token list) under ``model``."""
    seed = int.from_bytes(hashlib.sha256(model.encode() + b"\0" + _key(item)).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dims).astype("<f4")


def tokens_of(item: Any) -> int:
    """The usage the fake upstream reports for one item: words of a string, length of a token list."""
    if isinstance(item, str):
        return max(1, len(item.split()))
    if isinstance(item, list) and item and isinstance(item[0], int):
        return len(item)
    return 5


@dataclass
class Fault:
    """One scripted behaviour: ``status`` (with ``code``, ``retry_after``), ``drop``, ``slow``, ``malformed``,
    ``wrong_count``, ``wrong_dims``, ``floats`` (answer float lists whatever was asked), ``usage`` (answer
    normally with ``usage`` as its usage, none if None), ``raw`` (``code``, ``headers`` and ``body`` as given),
    ``ok`` (answer normally: a place in the script). Each comes ``delay`` seconds late (``slow``: an answer that
    does)."""

    kind: str
    code: int = 500
    retry_after: float | None = None
    delay: float = 0.0
    model: str | None = None  # only for requests for this upstream model
    message: str = "scripted failure"
    usage: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class Recorded:
    """One request the upstream received."""

    body: dict[str, Any]
    headers: dict[str, str]
    outcome: str = "ok"


@dataclass
class FakeUpstream:
    """The fake upstream server; use as a context manager (``with FakeUpstream() as up: up.url``)."""

    dims: int = 8
    calls: list[Recorded] = field(default_factory=list)
    script: deque[Fault] = field(default_factory=deque)
    always_floats: bool = False
    compress: bool = False  # gzip successful answers when the client accepts gzip, as public APIs do
    port: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._peak: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        """Base URL, to be used as a provider's ``base_url``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def calls_for(self, model: str) -> list[Recorded]:
        """The recorded requests for one upstream model."""
        with self._lock:
            return [c for c in self.calls if c.body.get("model") == model]

    def peak_in_flight(self, model: str) -> int:
        """The most requests for one upstream model handled at once since the last :meth:`reset`."""
        with self._lock:
            return self._peak.get(model, 0)

    def reset(self) -> None:
        """Forget recorded calls and pending faults."""
        with self._lock:
            self.calls.clear()
            self.script.clear()
            self._peak.clear()

    def _next_fault(self, model: str) -> Fault | None:
        with self._lock:
            for i, f in enumerate(self.script):
                if f.model is None or f.model == model:
                    del self.script[i]
                    return f
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            model = str(orjson.loads(raw).get("model", ""))
        except (orjson.JSONDecodeError, AttributeError):
            model = ""
        with self._lock:
            self._in_flight[model] = now = self._in_flight.get(model, 0) + 1
            self._peak[model] = max(self._peak.get(model, 0), now)
        try:
            return await self._respond(request, raw)
        finally:
            with self._lock:
                self._in_flight[model] -= 1

    async def _respond(self, request: web.Request, raw: bytes) -> web.StreamResponse:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return web.json_response({"error": {"message": "bad json"}}, status=400)
        rec = Recorded(body=body, headers={k.lower(): v for k, v in request.headers.items()})
        with self._lock:
            self.calls.append(rec)
        model = str(body.get("model", ""))
        fault = self._next_fault(model)
        if fault is not None:
            rec.outcome = fault.kind
            if fault.delay:  # "slow" is only this; any other fault may come late too
                await asyncio.sleep(fault.delay)
            if fault.kind == "status":
                headers = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
                return web.json_response(
                    {"error": {"message": fault.message, "type": "scripted"}}, status=fault.code, headers=headers
                )
            if fault.kind == "drop":
                # Start a response, then cut the connection mid-body.
                resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
                resp.content_length = 100000
                await resp.prepare(request)
                await resp.write(b'{"object": "list", "data": [{"obj')
                assert request.transport is not None
                request.transport.close()
                return resp
            if fault.kind == "malformed":
                return web.Response(body=b'{"object": "list", "data": [', content_type="application/json")
            if fault.kind == "raw":
                return web.Response(body=fault.body, status=fault.code, headers=fault.headers)
        inputs = body.get("input")
        items = [inputs] if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)) else list(inputs)
        dims = int(body.get("dimensions") or self.dims)
        if fault is not None and fault.kind == "wrong_dims":
            dims += 1
        floats = (
            self.always_floats
            or body.get("encoding_format") != "base64"
            or (fault is not None and fault.kind == "floats")
        )
        data = []
        for i, item in enumerate(items):
            vec = expected_vector(model, item, dims)
            emb: Any = vec.tolist() if floats else base64.b64encode(vec.tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        if fault is not None and fault.kind == "wrong_count":
            data = data[:-1] if len(data) > 1 else data + data
        data.reverse()  # indices, not positions, carry the order: the proxy must sort
        tokens = sum(tokens_of(i) for i in items)
        answer = {"object": "list", "data": data, "model": model,
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip
        if fault is not None and fault.kind == "usage":
            del answer["usage"]
            if fault.usage is not None:
                answer["usage"] = fault.usage
        if self.compress and "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(body=gzip.compress(orjson.dumps(answer)), content_type="application/json",
                                headers={"Content-Encoding": "gzip"})  # fmt: skip
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    def __enter__(self) -> FakeUpstream:
        if not self.port:
            self.port = free_port()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake upstream did not start")
        return self

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/v1/embeddings", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        loop.run_until_complete(site.start())
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)


def main() -> None:
    """``python -m tests.fake_upstream --port 9000``: a local OpenAI-compatible upstream for trying the proxy."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--dims", type=int, default=1536)
    args = parser.parse_args()
    with FakeUpstream(dims=args.dims, port=args.port) as up:
        print(f"fake upstream at {up.url} ({args.dims} dimensions); Ctrl-C stops it", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
