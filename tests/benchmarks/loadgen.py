"""Load generator: N keep-alive connections POSTing embedding requests for a fixed time or request count.

Two engines, same request bodies and the same JSON summary:
  * ``wrk`` (if installed): C, one thread, bodies built by a generated Lua script;
  * ``python``: one asyncio process (uvloop when installed) with a hand-rolled HTTP/1.1 client protocol.
    Not aiohttp's client: its ~100 us of per-request overhead in the generator caps what can be measured
    against the direct upstream on a 2-core machine (the generator and the target share the CPUs), while a
    raw protocol writes precomputed request bytes and only scans responses for the end of the body.
    It records every request's latency (from writing the request to the last byte of the answer).

Request bodies: ``fresh`` bodies carry a new input text per request (a counter inside the text) so no cache
can answer them; otherwise every request is the same body (with ``cache: {type: exact_match}`` when asked).
Building a fresh body is one ``bytes.join`` over a precomputed template, so the generator's cost does not
differ between cases.

Run as a program it reads a JSON spec (``--spec '{...}'``, fields of :class:`LoadSpec`) and prints a JSON
summary (:func:`summarize`) on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import orjson

__all__ = ["LoadSpec", "body_template", "main", "run_python", "run_wrk", "summarize", "wrk_available"]


@dataclass(frozen=True, kw_only=True)
class LoadSpec:
    """One load run."""

    url: str  # e.g. http://127.0.0.1:9000/v1/embeddings
    connections: int = 1
    duration_s: float | None = 5.0  # measured phase; ignored when ``requests`` is set
    requests: int | None = None  # measured phase as a fixed request count (python engine only)
    warmup_s: float = 1.0  # unrecorded load before measuring
    model: str = "bench-embed"
    api_key: str | None = None
    inputs: int = 1  # inputs per request: 1 sends a string, more send an array
    dims: int | None = 1536  # None: no "dimensions" field
    encoding_format: str = "base64"  # what openai-python sends by default
    cache: bool = False  # add "cache": {"type": "exact_match"}
    fresh: bool = True  # a new input text per request
    nonce: str = "0"  # makes fresh inputs unique across runs
    timeout_s: float = 30.0  # one request slower than this counts as an error and ends the connection


def body_template(spec: LoadSpec) -> list[bytes]:
    """Pieces whose ``seq.join(pieces)`` is a request body; a fixed body is one piece.

    Fresh bodies put the sequence number inside every input text, so each request is new to any cache.
    """
    marker = "@@SEQ@@"  # survives JSON encoding unchanged, unlike control characters

    def text(i: int) -> str:
        lead = f"bench {spec.nonce} {marker}" if spec.fresh else "bench fixed"
        return f"{lead}-{i}: the quick brown fox jumps over the lazy dog, embedding benchmark input"

    inp: Any = text(0) if spec.inputs == 1 else [text(i) for i in range(spec.inputs)]
    body: dict[str, Any] = {"model": spec.model, "input": inp, "encoding_format": spec.encoding_format}
    if spec.dims is not None:
        body["dimensions"] = spec.dims
    if spec.cache:
        body["cache"] = {"type": "exact_match"}
    raw = orjson.dumps(body).decode()
    pieces = [p.encode() for p in raw.split(marker)]
    if spec.fresh and len(pieces) != spec.inputs + 1:
        raise ValueError("the sequence marker was not found in the body template")
    return pieces


def _request_head(spec: LoadSpec) -> bytes:
    parts = urlsplit(spec.url)
    lines = [
        f"POST {parts.path or '/'} HTTP/1.1",
        f"host: {parts.netloc}",
        "content-type: application/json",
        "accept: application/json",
    ]
    if spec.api_key:
        lines.append(f"authorization: Bearer {spec.api_key}")
    return ("\r\n".join(lines) + "\r\ncontent-length: ").encode()


# --- python engine ----------------------------------------------------------------------------------------


class _Client(asyncio.Protocol):
    """One keep-alive connection that waits for exactly one response at a time."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._head_end = -1
        self._status = 0
        self._head = b""
        self._length = -1  # -1: chunked
        self._chunk_at = 0  # chunked: where the next chunk-size line starts
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport to write requests on."""
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail the pending request, if any."""
        self.transport = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("connection closed by the server"))

    def send(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        """Write one request; the future gives (status, lower-cased head) when its body has arrived."""
        if self.transport is None:
            raise ConnectionError("not connected")
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        """Accumulate until the response is complete (Content-Length or chunked)."""
        self._buf += data
        if self._head_end < 0:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self._head_end = end + 4
            self._head = bytes(self._buf[:end]).lower()
            self._status = int(self._head[9:12])
            at = self._head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = self._head.find(b"\r\n", at + 2)
                self._length = int(self._head[at + 17 : stop if stop >= 0 else None])
            else:
                self._length = -1
                self._chunk_at = self._head_end
        total = self._complete()
        if total < 0:
            return
        del self._buf[:total]
        self._head_end = -1
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result((self._status, self._head))

    def _complete(self) -> int:
        """Bytes of the whole response once it is all buffered, else -1."""
        if self._length >= 0:
            total = self._head_end + self._length
            return total if len(self._buf) >= total else -1
        while True:
            eol = self._buf.find(b"\r\n", self._chunk_at)
            if eol < 0:
                return -1
            size = int(bytes(self._buf[self._chunk_at : eol]).split(b";")[0], 16)
            if size == 0:
                trailer_end = self._buf.find(b"\r\n\r\n", eol)
                return trailer_end + 4 if trailer_end >= 0 else -1
            after = eol + 2 + size + 2
            if len(self._buf) < after:
                return -1
            self._chunk_at = after


@dataclass
class _Run:
    """State shared by the connections of one run (single-threaded: no locks needed)."""

    spec: LoadSpec
    latencies_ns: list[int] = dataclasses.field(default_factory=list)
    statuses: Counter[int] = dataclasses.field(default_factory=Counter)
    cache: Counter[str] = dataclasses.field(default_factory=Counter)
    errors: list[str] = dataclasses.field(default_factory=list)
    seq: int = 0
    issued: int = 0
    record_from_ns: int = 0
    stop_at_ns: int = 0
    last_end_ns: int = 0
    recording: bool = False
    done: bool = False


async def _connection(run: _Run, make_body: Callable[[int], bytes], head: bytes) -> None:
    parts = urlsplit(run.spec.url)
    loop = asyncio.get_running_loop()
    client: _Client | None = None
    try:
        while not run.done:
            if client is None or client.transport is None:
                _, client = await loop.create_connection(_Client, parts.hostname or "127.0.0.1", parts.port or 80)
            if run.recording and run.spec.requests is not None:
                if run.issued >= run.spec.requests:
                    return
                run.issued += 1
            run.seq += 1
            body = make_body(run.seq)
            t0 = time.perf_counter_ns()
            try:
                status, resp_head = await asyncio.wait_for(
                    client.send(head + b"%d\r\n\r\n" % len(body) + body), run.spec.timeout_s
                )
            except (ConnectionError, TimeoutError) as exc:
                if t0 >= run.record_from_ns and run.recording:
                    run.errors.append(type(exc).__name__)
                if client.transport is not None:
                    client.transport.close()
                client = None
                continue
            t1 = time.perf_counter_ns()
            if run.recording and t0 >= run.record_from_ns:
                run.latencies_ns.append(t1 - t0)
                run.statuses[status] += 1
                at = resp_head.find(b"\r\nx-embedgate-cache:")
                if at >= 0:
                    stop = resp_head.find(b"\r\n", at + 2)
                    run.cache[resp_head[at + 20 : stop if stop >= 0 else None].strip().decode()] += 1
                run.last_end_ns = t1
            if run.stop_at_ns and t1 >= run.stop_at_ns:
                return
    finally:
        if client is not None and client.transport is not None:
            client.transport.close()


async def _run_python(spec: LoadSpec) -> dict[str, Any]:
    pieces = body_template(spec)
    make_body: Callable[[int], bytes]
    if len(pieces) == 1:
        fixed = pieces[0]
        make_body = lambda _seq: fixed  # noqa: E731 - the cheapest callable for the hot loop
    else:
        make_body = lambda seq: str(seq).encode().join(pieces)  # noqa: E731
    head = _request_head(spec)
    run = _Run(spec=spec)
    tasks = [asyncio.ensure_future(_connection(run, make_body, head)) for _ in range(spec.connections)]
    try:
        if spec.warmup_s > 0:
            await asyncio.sleep(spec.warmup_s)
        run.record_from_ns = time.perf_counter_ns()
        run.recording = True
        if spec.requests is None:
            run.stop_at_ns = run.record_from_ns + int((spec.duration_s or 1.0) * 1e9)
            await asyncio.sleep(spec.duration_s or 1.0)
            run.done = True
        await asyncio.gather(*tasks)
    finally:
        run.done = True
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    elapsed_ns = max(run.last_end_ns - run.record_from_ns, 1)
    return summarize(
        latencies_ms=[x / 1e6 for x in run.latencies_ns],
        duration_s=elapsed_ns / 1e9,
        statuses=dict(run.statuses),
        transport_errors=len(run.errors),
        cache=dict(run.cache),
        engine="python",
        spec=spec,
    )


def run_python(spec: LoadSpec) -> dict[str, Any]:
    """Run the load in this process with the asyncio engine and return the summary."""
    try:
        import uvloop
    except ImportError:  # plain asyncio works, with less headroom
        return asyncio.run(_run_python(spec))
    return uvloop.run(_run_python(spec))


def summarize(
    *,
    latencies_ms: list[float],
    duration_s: float,
    statuses: dict[int, int],
    transport_errors: int,
    cache: dict[str, int],
    engine: str,
    spec: LoadSpec,
    percentiles: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The summary every engine reports: counts, req/s and latency percentiles in ms."""
    ok = sum(n for s, n in statuses.items() if 200 <= s < 300)
    total = sum(statuses.values())
    out: dict[str, Any] = {
        "engine": engine,
        "connections": spec.connections,
        "inputs": spec.inputs,
        "requests": total,
        "ok": ok,
        "errors": total - ok + transport_errors,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "cache": cache,
        "duration_s": round(duration_s, 3),
        "rps": round(ok / duration_s, 1) if duration_s > 0 else 0.0,
    }
    if percentiles is not None:
        out.update(percentiles)
        return out
    lat = sorted(latencies_ms)

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None

    out.update(
        p50_ms=pct(0.50),
        p90_ms=pct(0.90),
        p99_ms=pct(0.99),
        mean_ms=round(sum(lat) / len(lat), 3) if lat else None,
        max_ms=round(lat[-1], 3) if lat else None,
    )
    return out


# --- wrk engine -------------------------------------------------------------------------------------------


def wrk_available() -> bool:
    """Whether a ``wrk`` binary is on PATH."""
    return shutil.which("wrk") is not None


def _lua_string(b: bytes) -> str:
    text = b.decode()
    level = "=" * 4
    if f"]{level}]" in text:
        raise ValueError("body not representable as a Lua long string")
    return f"[{level}[{text}]{level}]"


def _wrk_script(spec: LoadSpec) -> str:
    pieces = body_template(spec)
    headers = {"Content-Type": "application/json"}
    if spec.api_key:
        headers["Authorization"] = f"Bearer {spec.api_key}"
    hdr = ", ".join(f'["{k}"] = "{v}"' for k, v in headers.items())
    path = urlsplit(spec.url).path
    return f"""
local pieces = {{{", ".join(_lua_string(p) for p in pieces)}}}
local headers = {{{hdr}}}
local counter = 0
local fixed = nil
request = function()
  -- Built on first use: wrk sets the Host header in init, after this script is loaded.
  if #pieces == 1 then
    if not fixed then fixed = wrk.format("POST", "{path}", headers, pieces[1]) end
    return fixed
  end
  counter = counter + 1
  return wrk.format("POST", "{path}", headers, table.concat(pieces, tostring(counter)))
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nWRKJSON {{"requests": %d, "duration_us": %d, "status_errors": %d, "socket_errors": %d, '
    .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %f, "max_us": %d}}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


def run_wrk(spec: LoadSpec) -> dict[str, Any]:
    """Run the load with ``wrk`` (duration mode only) and return the summary."""
    if spec.requests is not None:
        raise ValueError("wrk runs for a duration; use the python engine for a request count")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_wrk_script(spec))
        script = f.name
    try:
        base = ["wrk", "-t1", f"-c{spec.connections}", "-s", script, f"--timeout={int(spec.timeout_s)}s"]
        if spec.warmup_s > 0:
            warm = max(1, round(spec.warmup_s))
            subprocess.run([*base, f"-d{warm}s", spec.url], capture_output=True, check=True)
        duration = max(1, round(spec.duration_s or 1.0))
        proc = subprocess.run([*base, f"-d{duration}s", spec.url], capture_output=True, text=True, check=True)
    finally:
        os.unlink(script)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("WRKJSON "))
    w = json.loads(line.removeprefix("WRKJSON "))
    ok = w["requests"] - w["status_errors"]
    return summarize(
        latencies_ms=[],
        duration_s=w["duration_us"] / 1e6,
        statuses={200: ok, 0: w["status_errors"]} if w["status_errors"] else {200: ok},
        transport_errors=w["socket_errors"],
        cache={},
        engine="wrk",
        spec=spec,
        percentiles={
            "p50_ms": w["p50_us"] / 1000,
            "p90_ms": w["p90_us"] / 1000,
            "p99_ms": w["p99_us"] / 1000,
            "mean_ms": round(w["mean_us"] / 1000, 3),
            "max_ms": w["max_us"] / 1000,
        },
    )


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``--spec JSON [--engine python|wrk]``, prints the summary as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="JSON object with LoadSpec fields")
    parser.add_argument("--engine", choices=("python", "wrk"), default="python")
    args = parser.parse_args(argv)
    spec = LoadSpec(**json.loads(args.spec))
    result = run_wrk(spec) if args.engine == "wrk" else run_python(spec)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
