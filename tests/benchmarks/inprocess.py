"""The gateway driven in-process: CPU (or instructions) per request, without uvicorn, sockets to clients or wrk.

    python -m tests.benchmarks.inprocess --mode miss                 # CPU us per request, best of 3 rounds
    python -m tests.benchmarks.inprocess --mode miss --off budgets   # the same with budgets off (also: tracing,
                                                                     # access_log), to see what a part costs
    python -m tests.benchmarks.inprocess --mode hit --cprofile       # where the time goes, by function

``EmbeddingGateway`` is called as uvicorn would call it (a scope, ``receive``, ``send``), with ``--concurrency``
requests in flight, as deployed: the benchmark config of ``run.py`` (one budget, tracing to the fake upstream's
OTLP sink through the export helper, JSON access lines on stdout), standalone. The upstream is the harness's fake
one, in its own process. CPU is this process's (the span-export helper runs in another). Repeated runs of the same
code move by ~10 us on a shared machine; instruction counts do not: run it under callgrind twice, with two request
counts, and divide the difference (see ``tests/benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import orjson
import yaml

from tests.benchmarks.run import UPSTREAM_MODEL, Service, _python_argv, embedgate_config, embedgate_env, free_port

Message = MutableMapping[str, Any]
PARTS = ("budgets", "tracing", "access_log")
KEY = "sk-bench-inprocess-key"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.inprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("miss", "hit"), default="miss", help="fresh inputs, or cached ones")
    parser.add_argument("--inputs", type=int, default=1, help="inputs per request (default: 1)")
    parser.add_argument("--requests", type=int, default=4000, help="requests per measured round (default: 4000)")
    parser.add_argument("--warmup", type=int, default=500, help="requests before measuring (default: 500)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds; the best is reported (default: 3)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: 16)")
    parser.add_argument("--off", default="", help=f"comma-separated parts to switch off: {', '.join(PARTS)}")
    parser.add_argument("--cprofile", action="store_true", help="profile the measured rounds, print the top functions")
    a = parser.parse_args(argv)
    off = {p.strip() for p in a.off.split(",") if p.strip()}
    if off - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(off - set(PARTS)))}")
    if min(a.inputs, a.rounds, a.concurrency) < 1 or min(a.requests, a.warmup) < 0:
        parser.error("--inputs, --rounds and --concurrency must be >= 1; --requests and --warmup >= 0")
    a.off = off
    return a


def gateway_config(upstream_url: str, off: set[str], directory: Path) -> Path:
    """The harness's embedgate config, with the parts in ``off`` switched off, written to ``directory``."""
    config = embedgate_config(upstream_url, KEY, "")
    if "budgets" in off:
        config["budgets"] = []
    if "access_log" in off:
        config["telemetry"]["access_log"] = False
    path = directory / "embedgate.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def request_body(mode: str, inputs: int, n: int) -> bytes:
    """The body of request ``n``: fresh inputs on a miss, the same cached ones on a hit."""
    tag = "cached" if mode == "hit" else str(n)
    items: Any = f"hello {tag}" if inputs == 1 else [f"hello {tag} {i}" for i in range(inputs)]
    body: dict[str, Any] = {"model": f"local/{UPSTREAM_MODEL}", "input": items, "encoding_format": "base64"}
    if mode == "hit":
        body["cache"] = {"type": "exact_match"}
    return orjson.dumps(body)


async def drive(gateway: Callable[..., Awaitable[None]], a: argparse.Namespace) -> list[float]:
    """Warm up, then ``a.rounds`` rounds; CPU us per request of each round."""
    sent = 0

    async def one() -> None:
        nonlocal sent
        sent += 1
        body = request_body(a.mode, a.inputs, sent)
        scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "query_string": b"",
                 "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                             (b"authorization", f"Bearer {KEY}".encode()),
                             (b"content-length", str(len(body)).encode())]}  # fmt: skip
        messages: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
        statuses: list[int] = []

        async def receive() -> Message:
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await gateway(scope, receive, send)
        if statuses != [200]:
            raise RuntimeError(f"request {sent} answered {statuses}")

    async def run(n: int) -> None:
        per, extra = divmod(n, a.concurrency)

        async def worker(k: int) -> None:
            for _ in range(k):
                await one()

        await asyncio.gather(*(worker(per + (i < extra)) for i in range(a.concurrency)))

    await run(a.warmup)
    profile = cProfile.Profile() if a.cprofile else None
    rounds: list[float] = []
    for _ in range(a.rounds):
        started = time.process_time()
        if profile is not None:
            profile.enable()
        await run(a.requests)
        if profile is not None:
            profile.disable()
        rounds.append((time.process_time() - started) / max(1, a.requests) * 1e6)
    if profile is not None:
        pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(30)
    return rounds


async def measure(upstream_url: str, a: argparse.Namespace, directory: Path) -> list[float]:
    """Build the gateway as ``embedgate serve`` does (standalone), drive it, shut it down."""
    os.environ.update(embedgate_env(upstream_url))
    if "tracing" in a.off:
        os.environ["OTEL_TRACES_EXPORTER"] = "none"
    from embedgate.config import load_config
    from embedgate.gateway import EmbeddingGateway

    async def host(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("the driver only sends embedding requests")

    gateway = EmbeddingGateway(host, config=load_config(str(gateway_config(upstream_url, a.off, directory))),
                               standalone=True)  # fmt: skip
    await gateway.startup()
    try:
        return await drive(gateway, a)
    finally:
        await gateway.shutdown()


def main(argv: list[str] | None = None) -> int:
    """Start the fake upstream, drive the gateway, print the CPU per request (stderr: stdout has the logs)."""
    a = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="embedgate-inprocess-") as tmp:
        directory = Path(tmp)
        port = free_port()
        argv_up = _python_argv("tests.benchmarks.fake_upstream", "--port", str(port))
        with Service("upstream", argv_up, port=port, health="/healthz", log=directory / "upstream.log") as up:
            up.wait_ready()
            rounds = asyncio.run(measure(up.url, a, directory))
    off = ",".join(sorted(a.off)) or "nothing"
    print(f"{a.mode}, {a.inputs} input(s), {a.concurrency} in flight, off: {off}: "
          f"CPU us per request {' '.join(f'{r:.1f}' for r in rounds)}; best {min(rounds):.1f}",
          file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
