"""Instructions per request of the gateway as served: ``embedgate serve`` under callgrind, HTTP protocol included.

    python -m tests.benchmarks.served_instructions --mode miss               # 200 and 1,200 requests, difference
    python -m tests.benchmarks.served_instructions --mode hit --pythonpath /tmp/other-checkout/middleware

CPU time on the shared benchmark machine moves by 10-40% between runs of the same code; instruction counts do not.
This runs ``embedgate serve`` (the harness's config: one budget, tracing to the fake upstream's OTLP sink, the access
line on, memory stores) under ``valgrind --tool=callgrind`` twice, sends ``--requests`` and then ``--requests`` +
1,000 sequential requests over one keep-alive connection (after ``--warmup`` more), and prints the difference
divided by 1,000: the instructions one request costs the gateway's process, from the socket read to the access
line, start-up and shutdown left out. The span-export helper is another process and is not counted (callgrind
does not follow children). ``--pythonpath`` serves another checkout's build (its compiled modules built in place
with ``python setup.py build_ext --inplace``), to compare two versions of the code. Takes ~3 minutes.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import secrets
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import orjson
import yaml

from tests.benchmarks.run import (
    UPSTREAM_MODEL,
    Service,
    _python_argv,
    embedgate_argv,
    embedgate_config,
    embedgate_env,
    free_port,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.served_instructions",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--mode", choices=("miss", "hit"), default="miss", help="fresh inputs, or a cached one")
    parser.add_argument("--requests", type=int, default=200, help="requests of the shorter run (default: 200)")
    parser.add_argument("--warmup", type=int, default=100, help="requests before those, in both runs (default: 100)")
    parser.add_argument("--pythonpath", default="", help="serve the embedgate package found there instead")
    a = parser.parse_args(argv)
    if a.requests < 1 or a.warmup < 1:
        parser.error("--requests and --warmup must be >= 1")
    return a


def instructions(a: argparse.Namespace, upstream: Service, requests: int, out: Path) -> int:
    """Instructions callgrind counted in ``embedgate serve`` over its whole life, serving ``requests`` + warm-up."""
    key = "sk-bench-" + secrets.token_hex(12)
    config = out / "embedgate.yaml"
    config.write_text(yaml.safe_dump(embedgate_config(upstream.url, key, "")))
    env = {**os.environ, **embedgate_env(upstream.url)}
    if a.pythonpath:
        env["PYTHONPATH"] = a.pythonpath
    port = free_port()
    log = out / f"embedgate-{requests}.log"
    argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *embedgate_argv(config, port)]
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        conn = _connect(port, proc)
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        for i in range(a.warmup + requests):
            text = "the same input" if a.mode == "hit" else f"fresh input {i}"
            body: dict[str, object] = {"model": f"local/{UPSTREAM_MODEL}", "encoding_format": "base64", "input": text}
            if a.mode == "hit":
                body["cache"] = {"type": "exact_match"}
            conn.request("POST", "/v1/embeddings", orjson.dumps(body), headers)
            answer = conn.getresponse()
            answer.read()
            if answer.status != 200:
                raise RuntimeError(f"request {i} answered {answer.status}; see {log}")
        conn.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    counted = re.findall(r"Collected : (\d+)", log.read_text(errors="replace"))
    if not counted:
        raise RuntimeError(f"callgrind reported no total; see {log}")
    return int(counted[0])


def _connect(port: int, proc: subprocess.Popen[bytes]) -> http.client.HTTPConnection:
    deadline = time.monotonic() + 300  # the gateway starts ~50x slower under callgrind
    while True:
        if proc.poll() is not None:
            raise RuntimeError("embedgate serve exited under callgrind")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            return conn
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="embedgate-served-instructions-") as tmp:
        out = Path(tmp)
        port = free_port()
        upstream = Service("upstream", _python_argv("tests.benchmarks.fake_upstream", "--port", str(port)), port=port,
                           health="/healthz", log=out / "upstream.log")  # fmt: skip
        with upstream:
            upstream.wait_ready()
            short = instructions(a, upstream, a.requests, out)
            long = instructions(a, upstream, a.requests + 1000, out)
    print(f"{a.mode}: {(long - short) / 1000:,.0f} instructions per request served "
          f"({short:,} over {a.requests} requests, {long:,} over {a.requests + 1000})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
