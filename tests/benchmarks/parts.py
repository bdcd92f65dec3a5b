"""What each part of a request costs, served: ``embedgate serve`` with one part switched off at a time.

    python -m tests.benchmarks.parts                          # a miss, 3 rounds of every variant, 5 s each
    python -m tests.benchmarks.parts --mode hit --rounds 2    # the same for a cache hit
    python -m tests.benchmarks.parts --variants all,http=httptools   # embedgate's HTTP protocol against uvicorn's

The variants run in turn, round after round (so a slow minute of the shared machine spreads over all of them),
each a fresh ``embedgate serve`` with the harness's config (one budget, tracing to the fake upstream's sink, the
access line on, memory stores) but for what it switches off: ``-budgets`` (no budget), ``-tracing``
(``OTEL_TRACES_EXPORTER=none``), ``-access_log``, ``-all`` (the three), ``http=httptools`` (uvicorn's own
HTTP protocol). Reported per variant: req/s at ``--connections`` (16) and the CPU microseconds per request of
the gateway's main process (``main``) and of it with its span-export helper (``all``), from ``/proc``; the best
and worst round. Results go to ``<out>/parts.json``.
"""

from __future__ import annotations

import argparse
import json
import secrets
import time
from pathlib import Path
from typing import Any

import yaml

from tests.benchmarks.loadgen import LoadSpec, wrk_available
from tests.benchmarks.run import (
    DEFAULT_OUT,
    UPSTREAM_MODEL,
    Service,
    _python_argv,
    cpu_seconds,
    embedgate_argv,
    embedgate_config,
    embedgate_env,
    free_port,
    process_tree,
    run_load,
)

VARIANTS = ("all", "-budgets", "-tracing", "-access_log", "-all", "http=httptools")
PARTS = ("budgets", "tracing", "access_log")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.parts", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("miss", "hit"), default="miss", help="fresh inputs, or cached ones")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every variant (default: 3)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per run (default: 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run (default: 1)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--inputs", type=int, default=1, help="inputs per request (default: 1)")
    parser.add_argument("--engine", choices=("auto", "python", "wrk"), default="auto", help="load generator")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    a = parser.parse_args(argv)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in a.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    if a.rounds < 1 or a.duration <= 0 or a.warmup < 0 or a.connections < 1 or a.inputs < 1:
        parser.error("--rounds, --connections and --inputs must be >= 1, --duration > 0, --warmup >= 0")
    if a.engine == "auto":
        a.engine = "wrk" if wrk_available() else "python"
    return a


def variant_setup(variant: str, config: dict[str, Any], env: dict[str, str]) -> list[str]:
    """Switch ``variant``'s part off in ``config`` and ``env`` (in place); the extra ``serve`` arguments."""
    off = set(PARTS) if variant == "-all" else {variant[1:]} if variant.startswith("-") else set()
    if "budgets" in off:
        config["budgets"] = []
    if "access_log" in off:
        config["telemetry"]["access_log"] = False
    if "tracing" in off:
        env["OTEL_TRACES_EXPORTER"] = "none"
    return ["--http", variant.partition("=")[2]] if variant.startswith("http=") else []


def run_variant(a: argparse.Namespace, upstream: Service, variant: str, key: str, round_: int) -> dict[str, Any]:
    """One ``embedgate serve`` of ``variant`` under load; its req/s and CPU per request."""
    config = embedgate_config(upstream.url, key, "")
    env = embedgate_env(upstream.url)
    extra = variant_setup(variant, config, env)
    name = "on" if variant == "all" else f"off{variant}" if variant.startswith("-") else variant.replace("=", "-")
    path = a.out / f"parts-{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    while port == upstream.port:
        port = free_port()
    service = Service("embedgate", [*embedgate_argv(path, port), *extra], port=port, health="/healthz",
                      log=a.out / f"parts-{name}.log", env=env)  # fmt: skip
    with service:
        service.wait_ready()
        assert service.proc is not None
        pid = service.proc.pid
        spec = LoadSpec(url=service.url + "/v1/embeddings", connections=a.connections, duration_s=a.duration,
                        warmup_s=a.warmup, model=f"local/{UPSTREAM_MODEL}", api_key=key, inputs=a.inputs,
                        cache=a.mode == "hit", fresh=a.mode == "miss", nonce=f"{round_}-{time.time_ns()}")  # fmt: skip
        # (a hit's first request, in the warm-up, fills the cache: the measured ones are hits)
        tree = process_tree(pid)
        before = {p: cpu_seconds(p) or 0.0 for p in tree}
        started = time.monotonic()
        result = run_load(spec, a.engine)
        elapsed = time.monotonic() - started
        after = {p: cpu_seconds(p) or 0.0 for p in tree}
    served = result["rps"] * elapsed  # warm-up included, at the measured rate
    main = after[pid] - before[pid]
    every = sum(after[p] - before[p] for p in tree)
    return {
        "variant": variant,
        "round": round_,
        "rps": result["rps"],
        "p50_ms": result["p50_ms"],
        "errors": result["errors"],
        "main_us": round(main / served * 1e6, 1) if served else None,
        "all_us": round(every / served * 1e6, 1) if served else None,
    }


def summarize(rows: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """Per variant: best and worst req/s and main-process CPU per request over the rounds."""
    out = []
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        rps = [r["rps"] for r in mine]
        main = [r["main_us"] for r in mine if r["main_us"] is not None]
        out.append({"variant": v, "rps_min": min(rps), "rps_max": max(rps),
                    "main_us_min": min(main, default=None), "main_us_max": max(main, default=None),
                    "errors": sum(r["errors"] for r in mine)})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    key = "sk-bench-" + secrets.token_hex(12)
    port = free_port()
    upstream = Service("upstream", _python_argv("tests.benchmarks.fake_upstream", "--port", str(port)), port=port,
                       health="/healthz", log=a.out / "parts-upstream.log")  # fmt: skip
    rows: list[dict[str, Any]] = []
    with upstream:
        upstream.wait_ready()
        for round_ in range(a.rounds):
            for variant in a.variants:
                row = run_variant(a, upstream, variant, key, round_)
                rows.append(row)
                print(f"  round {round_ + 1} {variant:<15} {row['rps']:>9} req/s  main {row['main_us']} us/req  "
                      f"with helper {row['all_us']} us/req  errors {row['errors']}", flush=True)  # fmt: skip
    summary = summarize(rows, a.variants)
    (a.out / "parts.json").write_text(json.dumps({"mode": a.mode, "engine": a.engine, "rows": rows,
                                                  "summary": summary}, indent=1))  # fmt: skip
    for s in summary:
        print(f"{s['variant']:<15} {s['rps_min']:>9}-{s['rps_max']} req/s  main {s['main_us_min']}-{s['main_us_max']} "
              f"us/req  errors {s['errors']}")  # fmt: skip
    return 1 if any(s["errors"] for s in summary) else 0


if __name__ == "__main__":
    raise SystemExit(main())
