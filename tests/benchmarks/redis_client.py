"""CPU per budget-script call: redis-py's asyncio client against the budget store's own (``embedgate.resp``).

    python -m tests.benchmarks.redis_client                 # the local Redis, 16 concurrent callers
    python -m tests.benchmarks.redis_client --calls 4000 --url redis://127.0.0.1:6379/0

Both run the same small Lua script by ``EVALSHA`` (as the budget store's reserve and settle do), in turn, for
``--rounds`` rounds of ``--calls`` calls each, on uvloop; it prints this process's CPU time per call and the calls
per second of each round. redis-py is set up as the budget store used it before: a blocking pool of up to 64
connections, no retries. Only 127.0.0.1 is used; the run ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
import uvloop
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from embedgate.resp import LeanRedis, Script

_SOURCE = "return {1, redis.call('INCRBY', KEYS[1], ARGV[1])}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    prog, description = "python -m tests.benchmarks.redis_client", __doc__.splitlines()[0]
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--calls", type=int, default=8000, help="calls per round (default: 8000)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    a = parser.parse_args(argv)
    if min(a.calls, a.concurrency, a.rounds) < 1:
        parser.error("--calls, --concurrency and --rounds must be >= 1")
    return a


async def measure(call: Callable[[], Awaitable[object]], calls: int, concurrency: int) -> tuple[float, float]:
    """(CPU us per call, calls per second) of ``calls`` calls made by ``concurrency`` callers."""

    async def caller(n: int) -> None:
        for _ in range(n):
            await call()

    share = [calls // concurrency + (i < calls % concurrency) for i in range(concurrency)]
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller(n) for n in share))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / calls * 1e6, calls / wall


async def run(a: argparse.Namespace) -> None:
    key = f"eg:bench:redis-client:{uuid.uuid4().hex}"
    pool = aioredis.BlockingConnectionPool.from_url(
        a.url, max_connections=64, timeout=1.0, socket_timeout=1.0, retry=Retry(NoBackoff(), 0)
    )
    redis_py = aioredis.Redis.from_pool(pool)
    script = redis_py.register_script(_SOURCE)
    lean = LeanRedis(a.url)
    lean_script = Script(_SOURCE)
    clients: dict[str, Callable[[], Awaitable[object]]] = {
        "redis-py": lambda: script(keys=[key], args=[1]),
        "embedgate.resp": lambda: lean.evalsha(lean_script, [key], [1]),
    }
    try:
        for call in clients.values():  # warm up: connections open, scripts loaded
            await measure(call, 200, a.concurrency)
        for r in range(a.rounds):
            for name, call in clients.items():
                cpu, rate = await measure(call, a.calls, a.concurrency)
                print(f"round {r + 1}: {name:15} {cpu:7.1f} us CPU per call, {rate:9.0f} calls/s")
    finally:
        await lean.execute("DEL", key)
        await lean.aclose()
        await redis_py.aclose()


def main(argv: list[str] | None = None) -> None:
    uvloop.run(run(parse_args(argv)))


if __name__ == "__main__":
    main()
