"""Benchmark embedgate against a direct upstream call, a bare aiohttp ASGI proxy and LiteLLM's proxy.

    python -m tests.benchmarks.run [--quick] [--out DIR] [--litellm VENV] [--duration S] [--publish]
    python -m tests.benchmarks.run --soak 100000

Everything runs on 127.0.0.1 and is bounded (a fixed duration per scenario, or a request count for the soak);
every process started here runs in its own process group and is stopped at the end, also on error or
SIGTERM. Each proxy is started only for its own scenarios, so an idle one never steals CPU from the others.
Writes ``results.json`` and ``results.png`` into ``--out``; see README.md for the method.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import yaml

from tests.benchmarks.fake_upstream import vector
from tests.benchmarks.loadgen import LoadSpec, body_template, wrk_available

__all__ = ["Scenario", "Service", "StartError", "compute_ratios", "cpu_seconds", "main", "plan", "rss_kib"]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
PUBLISHED_PNG = Path(__file__).resolve().parent / "latest.png"
DIMS = 1536
CASES = {"single": 1, "batch": 256}
SYSTEMS = ("direct", "bare", "embedgate_miss", "embedgate_hit", "litellm")
PROXIES = ("bare", "embedgate_miss", "embedgate_hit", "litellm")
UPSTREAM_MODEL = "bench-embed"


class StartError(RuntimeError):
    """A service did not become ready; the message holds the tail of its log."""


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """One measured cell: a system, a case (single input or batch) and a connection count."""

    system: str
    case: str
    connections: int

    @property
    def inputs(self) -> int:
        """Inputs per request."""
        return CASES[self.case]


def plan(quick: bool, systems: tuple[str, ...]) -> list[Scenario]:
    """The scenario matrix, in run order; ``quick`` keeps only what the ratios need."""
    cells = (
        [("single", 1), ("single", 16), ("batch", 1)]
        if quick
        else [("single", 1), ("single", 16), ("batch", 1), ("batch", 16)]
    )
    return [Scenario(system=s, case=c, connections=n) for s in systems for c, n in cells]


# --- processes --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# Every service this run started, reported in results.json so a test can check that none outlived the run.
STARTED: list[dict[str, Any]] = []


class Service:
    """A server subprocess in its own process group, logging to a file, stopped (group-wide) on exit."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        port: int,
        health: str,
        log: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name, self.argv, self.port, self.health, self.log_path = name, argv, port, health, log
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the service."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Service:
        with self.log_path.open("ab") as log:
            # start_new_session: the service and anything it forks share one process group we can stop.
            self.proc = subprocess.Popen(
                self.argv,
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        STARTED.append({"name": self.name, "pid": self.proc.pid})
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Poll the health URL until it answers 200; raise StartError if the process dies or time runs out."""
        assert self.proc is not None, "start the service first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StartError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.health, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise StartError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the service's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after 10 s."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a CLI may fork its server; embedgate has its span-export helper)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS of ``pid`` and its descendants, plus the main process's VmHWM."""
    total = sum(_status_field(p, "VmRSS") for p in process_tree(pid))
    return {"rss_kib": total, "hwm_kib": _status_field(pid, "VmHWM")}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time used so far by ``pid`` and its descendants (from ``/proc/<pid>/stat``)."""
    total, found = 0, False
    for p in process_tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
            found = True
    return total / os.sysconf("SC_CLK_TCK") if found else None


def _status_field(pid: int, name: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


# --- targets ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Target:
    """Where and how a system is called."""

    url: str
    model: str
    api_key: str | None
    cache: bool = False
    fresh: bool = True
    pid: int | None = None  # the system's process (its descendants included) whose CPU time a cell reports


def embedgate_config(upstream: str, key: str, redis_url: str) -> dict[str, Any]:
    """embedgate's benchmark config: one provider, one key, a generous budget, cache on request."""
    return {
        "redis_url": redis_url,
        "providers": {
            "local": {
                "type": "openai_compatible",
                "base_url": upstream + "/v1",
                "api_key": "sk-upstream-bench",
            }
        },
        "models": {f"local/{UPSTREAM_MODEL}": {"price_per_million_tokens": 0.02, "max_inputs": 2048}},
        "keys": [{"id": "bench", "key": key, "workspace": "bench", "project": "bench"}],
        # Limits far above what a run reaches: the budget is checked and settled on every request, never hit.
        "budgets": [
            {
                "scope": "api_key",
                "target": "bench",
                "period": "daily",
                "amount_usd": 1_000_000.0,
                "token_limit": 1_000_000_000_000,
                "requests_per_minute": 1_000_000_000,
            }
        ],
        "cache": {"enabled_by_default": False, "default_ttl": 3600},
        "telemetry": {"service_name": "embedgate-bench"},
    }


def embedgate_env(sink: str) -> dict[str, str]:
    """Tracing on, exported over OTLP/HTTP to the fake upstream's sink: the SDK's batching and protobuf
    encoding run as in production, while the network cost is a local POST that is discarded."""
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": sink + "/v1/traces",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
    }


def embedgate_argv(config: Path, port: int) -> list[str]:
    """``embedgate serve`` from the running interpreter's environment."""
    script = Path(sys.executable).parent / "embedgate"
    base = [str(script)] if script.exists() else [sys.executable, "-c", "from embedgate.cli import main; main()"]
    return [
        *base,
        "serve",
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def embedgate_cli_exists() -> bool:
    """Whether ``embedgate.cli`` is importable (it is being written alongside this harness)."""
    import importlib.util

    try:
        return importlib.util.find_spec("embedgate.cli") is not None
    except ImportError:
        return False


def litellm_config(upstream: str, key: str) -> dict[str, Any]:
    """LiteLLM proxy config: ``bench-embed`` served by the fake upstream as an OpenAI-compatible model."""
    return {
        "model_list": [
            {
                "model_name": UPSTREAM_MODEL,
                "litellm_params": {
                    "model": f"openai/{UPSTREAM_MODEL}",
                    "api_base": upstream + "/v1",
                    "api_key": "sk-upstream-bench",
                    # LiteLLM refuses ``dimensions`` for OpenAI models not named text-embedding-3-*
                    # unless allowed explicitly; allowing it forwards the request unchanged.
                    "allowed_openai_params": ["dimensions"],
                },
                "model_info": {"mode": "embedding"},
            }
        ],
        "general_settings": {"master_key": key},
    }


def probe(target: Target, inputs: int) -> dict[str, Any]:
    """One request outside the load: checks status, item count and the first vector's values."""
    spec = LoadSpec(
        url=target.url,
        model=target.model,
        api_key=target.api_key,
        inputs=inputs,
        dims=DIMS,
        cache=target.cache,
        fresh=target.fresh,
        nonce="probe",
    )
    body = b"0".join(body_template(spec))
    headers = {"content-type": "application/json"}
    if target.api_key:
        headers["authorization"] = f"Bearer {target.api_key}"
    req = urllib.request.Request(target.url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, payload, cache = (
                resp.status,
                json.loads(resp.read()),
                resp.headers.get("x-embedgate-cache"),
            )
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"probe of {target.url}: HTTP {exc.code}: {exc.read()[:300]!r}") from None
    data = payload.get("data") or []
    if len(data) != inputs:
        raise RuntimeError(f"probe of {target.url}: {len(data)} items for {inputs} inputs")
    emb = data[0]["embedding"]
    got = np.frombuffer(base64.b64decode(emb), "<f4") if isinstance(emb, str) else np.asarray(emb, "<f4")
    if got.shape != (DIMS,) or not np.allclose(got, vector(0, DIMS), atol=1e-6):
        raise RuntimeError(f"probe of {target.url}: the first vector differs from the upstream's")
    return {"status": status, "items": len(data), "cache_header": cache, "usage": payload.get("usage")}


# --- running ----------------------------------------------------------------------------------------------


@dataclass
class Options:
    """Parsed command line."""

    quick: bool
    out: Path
    litellm: Path | None
    duration_s: float
    warmup_s: float
    engine: str
    systems: tuple[str, ...]
    redis_url: str
    publish: bool
    soak: int | None


def run_load(spec: LoadSpec, engine: str) -> dict[str, Any]:
    """Run the load generator in its own process (so it never shares an event loop with anything)."""
    argv = [
        sys.executable,
        "-m",
        "tests.benchmarks.loadgen",
        "--spec",
        json.dumps(asdict(spec)),
        "--engine",
        engine,
    ]
    budget = (spec.duration_s or 0) + spec.warmup_s + 120 + (spec.requests or 0) / 200
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=budget, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def measure(opts: Options, target: Target, scenario: Scenario, nonce: str) -> dict[str, Any]:
    """One scenario; prints a line as it goes."""
    spec = LoadSpec(
        url=target.url,
        connections=scenario.connections,
        duration_s=opts.duration_s,
        warmup_s=opts.warmup_s,
        model=target.model,
        api_key=target.api_key,
        inputs=scenario.inputs,
        dims=DIMS,
        cache=target.cache,
        fresh=target.fresh,
        nonce=nonce,
    )
    before = cpu_ticks()
    cpu_before = cpu_seconds(target.pid) if target.pid else None
    started = time.monotonic()
    result = run_load(spec, opts.engine)
    elapsed = time.monotonic() - started
    cpu_after = cpu_seconds(target.pid) if target.pid else None
    row = {"system": scenario.system, "case": scenario.case, "dims": DIMS, **result,
           "steal_pct": steal_pct(before, cpu_ticks()),
           "cpu_us_per_request": cpu_per_request(cpu_before, cpu_after, elapsed, result["rps"])}  # fmt: skip
    print(
        f"  {scenario.system:<15} {scenario.case:<6} c={scenario.connections:<3} "
        f"p50={row['p50_ms']} ms p99={row['p99_ms']} ms {row['rps']} req/s errors={row['errors']} "
        f"cpu={row['cpu_us_per_request']} us/req steal={row['steal_pct']}%",
        flush=True,
    )
    return row


def cpu_per_request(before: float | None, after: float | None, elapsed_s: float, rps: float) -> float | None:
    """The system's CPU microseconds per request: its CPU seconds per second of load (warm-up included, at
    the same rate) over the measured req/s. CPU time the hypervisor stole is meant to be left out of it, so it
    moves less with the neighbours' load than req/s does (but it moves: compare cells of low steal)."""
    if before is None or after is None or elapsed_s <= 0 or rps <= 0:
        return None
    return round((after - before) / elapsed_s / rps * 1e6, 1)


def cpu_ticks() -> tuple[int, int] | None:
    """(stolen, all) CPU ticks of the machine so far, from ``/proc/stat``; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice, already counted in user and nice]
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_pct(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the machine's CPU time the hypervisor gave to others between two readings: time this
    run's processes wanted and did not get. A cell measured under a few % of steal compares with others;
    one at 20% measures the neighbours as much as the code."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round(100 * (after[0] - before[0]) / (after[1] - before[1]), 1)


def upstream_stats(upstream: str) -> dict[str, int]:
    """The fake upstream's counters."""
    with urllib.request.urlopen(upstream + "/stats", timeout=5) as resp:
        stats: dict[str, int] = json.loads(resp.read())
        return stats


def _python_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def run_matrix(opts: Options, upstream: Service, results: dict[str, Any]) -> None:
    """Start each system in turn, probe it, run its scenarios, stop it; a failing system is recorded as such
    and the others still run."""
    nonce = secrets.token_hex(4)
    scenarios = plan(opts.quick, opts.systems)
    systems: dict[str, dict[str, Any]] = results["systems"]

    def run_system(name: str, target: Target) -> None:
        systems[name] = {"status": "measured", "probe": {c: probe(target, n) for c, n in CASES.items()}}
        for sc in (s for s in scenarios if s.system == name):
            results["scenarios"].append(measure(opts, target, sc, nonce))

    def bare() -> None:
        port = free_port()
        argv = _python_argv(
            "uvicorn",
            "tests.benchmarks.bare_proxy:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--no-access-log",
            "--log-level",
            "warning",
        )
        with Service(
            "bare",
            argv,
            port=port,
            health="/healthz",
            log=opts.out / "bare_proxy.log",
            env={"BENCH_UPSTREAM_URL": upstream.url},
        ) as service:
            service.wait_ready()
            pid = service.proc.pid if service.proc else None
            run_system("bare", Target(url=service.url + "/v1/embeddings", model=UPSTREAM_MODEL, api_key=None, pid=pid))

    groups: list[tuple[tuple[str, ...], Callable[[], None]]] = [
        (
            ("direct",),
            lambda: run_system(
                "direct",
                Target(
                    url=upstream.url + "/v1/embeddings",
                    model=UPSTREAM_MODEL,
                    api_key=None,
                    pid=upstream.proc.pid if upstream.proc else None,
                ),
            ),
        ),
        (("bare",), bare),
        (("embedgate_miss", "embedgate_hit"), lambda: run_embedgate(opts, upstream, results, run_system)),
        (("litellm",), lambda: run_litellm(opts, upstream, systems, run_system)),
    ]
    for names, run_group in groups:
        wanted = [n for n in names if n in opts.systems]
        if not wanted:
            continue
        try:
            run_group()
        except (StartError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
            print(f"{'/'.join(wanted)} failed: {exc}", file=sys.stderr, flush=True)
            for n in wanted:
                systems[n] = {**systems.get(n, {}), "status": "failed", "reason": str(exc)}


def run_embedgate(opts: Options, upstream: Service, results: dict[str, Any], run_system: Any) -> None:
    """The embedgate scenarios against one ``embedgate serve`` process, with its RSS before and after."""
    systems: dict[str, dict[str, Any]] = results["systems"]
    names = [n for n in ("embedgate_miss", "embedgate_hit") if n in opts.systems]
    if not embedgate_cli_exists():
        for n in names:
            systems[n] = {"status": "not measured", "reason": "embedgate.cli is not importable"}
        return
    key = "sk-bench-" + secrets.token_hex(12)
    config = opts.out / "embedgate.yaml"
    config.write_text(yaml.safe_dump(embedgate_config(upstream.url, key, opts.redis_url), sort_keys=False))
    port = free_port()
    service = Service(
        "embedgate",
        embedgate_argv(config, port),
        port=port,
        health="/healthz",
        log=opts.out / "embedgate.log",
        env=embedgate_env(upstream.url),
    )
    with service:
        service.wait_ready()
        assert service.proc is not None
        url = service.url + "/v1/embeddings"
        model = f"local/{UPSTREAM_MODEL}"
        traces_before = upstream_stats(upstream.url)
        info: dict[str, Any] = results["embedgate"]
        info["pid"] = service.proc.pid
        # Before: after start-up and one request of each shape (imports and first-call caches are done).
        for inputs in CASES.values():
            probe(Target(url=url, model=model, api_key=key), inputs)
        info["rss_before"] = rss_kib(service.proc.pid)
        pid = service.proc.pid
        if "embedgate_miss" in names:
            run_system("embedgate_miss", Target(url=url, model=model, api_key=key, pid=pid))
        if "embedgate_hit" in names:
            hit = Target(url=url, model=model, api_key=key, cache=True, fresh=False, pid=pid)
            for inputs in CASES.values():
                probe(hit, inputs)  # the warm-up that stores the fixed inputs
            run_system("embedgate_hit", hit)
            seen = {c: systems["embedgate_hit"]["probe"][c]["cache_header"] for c in CASES}
            if any(h != "hit" for h in seen.values()):
                # Keep the rows (they are what embedgate did) but do not let them pass for cache hits.
                systems["embedgate_hit"].update(
                    status="failed", reason=f"repeated requests were not cache hits: x-embedgate-cache {seen}"
                )
        info["rss_after"] = rss_kib(service.proc.pid)
        # The batch span processor exports every 5 s: wait once for it so the sink count proves tracing ran.
        deadline = time.monotonic() + 7
        while time.monotonic() < deadline:
            traces = upstream_stats(upstream.url)
            if traces["trace_posts"] > traces_before["trace_posts"]:
                break
            time.sleep(0.25)
        info["config"] = str(config)
    # Read after the stop, so spans flushed at shutdown count too.
    traces = upstream_stats(upstream.url)
    info["trace_exports"] = traces["trace_posts"] - traces_before["trace_posts"]
    info["trace_export_bytes"] = traces["trace_bytes"] - traces_before["trace_bytes"]
    # Logging is on as deployed (stdout and stderr to the log file): its line count shows that it ran, and
    # the client key must never appear in it.
    text = service.log_path.read_text(errors="replace")
    info["log_lines"] = text.count("\n")
    info["key_in_log"] = key in text
    info["requests_sent"] = sum(r["requests"] for r in results["scenarios"] if r["system"].startswith("embedgate"))


def run_litellm(opts: Options, upstream: Service, systems: dict[str, Any], run_system: Any) -> None:
    """LiteLLM's proxy from its own virtualenv, one worker; skipped (and said so) when not available."""
    if opts.litellm is None:
        systems["litellm"] = {"status": "not measured", "reason": "--litellm not given"}
        return
    binary = opts.litellm / "bin" / "litellm"
    if not binary.exists():
        systems["litellm"] = {"status": "not measured", "reason": f"no {binary}"}
        return
    key = "sk-bench-" + secrets.token_hex(12)
    config = opts.out / "litellm.yaml"
    config.write_text(yaml.safe_dump(litellm_config(upstream.url, key), sort_keys=False))
    port = free_port()
    argv = [
        str(binary),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False"}
    with Service("litellm", argv, port=port, health="/health/liveliness", log=opts.out / "litellm.log", env=env) as s:
        s.wait_ready(timeout_s=180)
        pid = s.proc.pid if s.proc else None
        run_system("litellm", Target(url=s.url + "/v1/embeddings", model=UPSTREAM_MODEL, api_key=key, pid=pid))
        systems["litellm"]["version"] = _litellm_version(opts.litellm)


def _litellm_version(venv: Path) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import importlib.metadata as m; print(m.version('litellm'))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout.strip()
    return None


def run_soak(opts: Options, upstream: Service, requests: int) -> dict[str, Any]:
    """N cache-miss requests at 16 connections; RSS after the first 10 % and at the end."""
    if not embedgate_cli_exists():
        raise StartError("embedgate.cli is not importable")
    key = "sk-bench-" + secrets.token_hex(12)
    config = opts.out / "embedgate.yaml"
    config.write_text(yaml.safe_dump(embedgate_config(upstream.url, key, opts.redis_url), sort_keys=False))
    port = free_port()
    service = Service(
        "embedgate",
        embedgate_argv(config, port),
        port=port,
        health="/healthz",
        log=opts.out / "embedgate.log",
        env=embedgate_env(upstream.url),
    )
    with service:
        service.wait_ready()
        assert service.proc is not None
        pid = service.proc.pid
        target = Target(url=service.url + "/v1/embeddings", model=f"local/{UPSTREAM_MODEL}", api_key=key)
        probe(target, 1)
        first = max(1, requests // 10)
        spec = LoadSpec(
            url=target.url,
            connections=16,
            duration_s=None,
            requests=first,
            warmup_s=0,
            model=target.model,
            api_key=key,
            inputs=1,
            dims=DIMS,
            nonce=secrets.token_hex(4),
        )
        soak: dict[str, Any] = {"requests": requests, "rss_start": rss_kib(pid)}
        soak["first_10pct"] = run_load(spec, "python")
        soak["rss_after_10pct"] = rss_kib(pid)
        soak["rest"] = run_load(replace(spec, requests=requests - first, nonce=secrets.token_hex(4)), "python")
        soak["rss_end"] = rss_kib(pid)
        soak["rss_growth_after_10pct_kib"] = soak["rss_end"]["rss_kib"] - soak["rss_after_10pct"]["rss_kib"]
        soak["errors"] = soak["first_10pct"]["errors"] + soak["rest"]["errors"]
        return soak


# --- ratios -----------------------------------------------------------------------------------------------


def _cell(rows: list[dict[str, Any]], system: str, case: str, conns: int) -> dict[str, Any] | None:
    for r in rows:
        if r["system"] == system and r["case"] == case and r["connections"] == conns and r["ok"] > 0:
            return r
    return None


def _div(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return round(a / b, digits) if a is not None and b else None


def compute_ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The comparisons, all from this run's own rows (None where a cell was not measured)."""

    def get(system: str, case: str, conns: int, field: str) -> float | None:
        cell = _cell(rows, system, case, conns)
        return None if cell is None else cell.get(field)

    added: dict[str, dict[str, float | None]] = {}
    batch_pct: dict[str, float | None] = {}
    for case in CASES:
        direct = get("direct", case, 1, "p50_ms")
        added[case] = {}
        for p in PROXIES:
            mine = get(p, case, 1, "p50_ms")
            added[case][p] = round(mine - direct, 3) if mine is not None and direct is not None else None
    direct_batch = get("direct", "batch", 1, "p50_ms")
    for p in PROXIES:
        extra = added["batch"][p]
        batch_pct[p] = round(100 * extra / direct_batch, 1) if extra is not None and direct_batch else None

    def rps_ratio(a: str, b: str) -> dict[str, float | None]:
        return {case: _div(get(a, case, 16, "rps"), get(b, case, 16, "rps")) for case in CASES}

    return {
        "added_p50_ms_vs_direct_1conn": added,
        "embedgate_miss_vs_litellm_rps_16conn": rps_ratio("embedgate_miss", "litellm"),
        "embedgate_hit_vs_litellm_rps_16conn": rps_ratio("embedgate_hit", "litellm"),
        "embedgate_miss_vs_bare_rps_16conn": rps_ratio("embedgate_miss", "bare"),
        "embedgate_hit_vs_bare_rps_16conn": rps_ratio("embedgate_hit", "bare"),
        "cache_hit_vs_direct_rps_16conn": rps_ratio("embedgate_hit", "direct"),
        "batch_added_latency_pct_1conn": batch_pct,
        # CPU per request at 16 connections, in multiples of the bare proxy's: less moved by CPU steal than req/s
        "cpu_per_request_vs_bare_16conn": {
            p: {
                case: _div(get(p, case, 16, "cpu_us_per_request"), get("bare", case, 16, "cpu_us_per_request"))
                for case in CASES
            }
            for p in PROXIES
            if p != "bare"
        },
    }


# --- command line -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Options:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1 s per scenario, fewer scenarios (smoke run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    parser.add_argument("--litellm", type=Path, default=None, help="virtualenv with litellm[proxy] installed")
    parser.add_argument("--duration", type=float, default=None, help="seconds measured per scenario")
    parser.add_argument("--warmup", type=float, default=None, help="unmeasured seconds before each scenario")
    parser.add_argument("--engine", choices=("auto", "python", "wrk"), default="auto", help="load generator")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    parser.add_argument("--redis-url", default="", help="run embedgate with this redis_url (default: in memory)")
    parser.add_argument("--publish", action="store_true", help="also copy the chart to tests/benchmarks/latest.png")
    parser.add_argument("--soak", type=int, default=None, metavar="N", help="only send N requests to embedgate")
    a = parser.parse_args(argv)
    systems = tuple(s.strip() for s in a.systems.split(",") if s.strip())
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown systems: {', '.join(unknown)}")
    engine = a.engine
    if engine == "auto":
        engine = "wrk" if wrk_available() else "python"
    elif engine == "wrk" and not wrk_available():
        parser.error("wrk is not installed")
    if engine == "wrk" and a.duration is not None and a.duration < 1:
        parser.error("wrk measures whole seconds: --duration must be >= 1")
    if a.soak is not None and a.soak < 10:
        parser.error("--soak needs at least 10 requests")
    return Options(
        quick=a.quick,
        out=a.out.resolve(),
        litellm=a.litellm.resolve() if a.litellm else None,
        duration_s=a.duration if a.duration is not None else (1.0 if a.quick else 5.0),
        warmup_s=a.warmup if a.warmup is not None else (0.3 if a.quick else 1.0),
        engine=engine,
        systems=systems,
        redis_url=a.redis_url,
        publish=a.publish,
        soak=a.soak,
    )


def _meta(opts: Options) -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": commit or None,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "quick": opts.quick,
        "duration_s": opts.duration_s,
        "warmup_s": opts.warmup_s,
        "engine": opts.engine,
        "dims": DIMS,
        "encoding_format": "base64",
        "cases": CASES,
        "tracing": "embedgate: OTLP http/protobuf to a local sink that discards the spans",
        "store": "redis" if opts.redis_url else "memory",
    }


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so the ``finally`` blocks stop every service we started."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def print_summary(results: dict[str, Any]) -> None:
    """A readable table of the run on stdout."""
    print("\nsystem           case    conns     p50 ms     p99 ms      req/s  errors  CPU us/req  steal %")
    for r in results["scenarios"]:
        print(
            f"{r['system']:<16} {r['case']:<7} {r['connections']:>5} {r['p50_ms']!s:>10} {r['p99_ms']!s:>10} "
            f"{r['rps']:>10} {r['errors']:>7} {r.get('cpu_us_per_request')!s:>11} {r.get('steal_pct')!s:>8}"
        )
    for name, info in results["systems"].items():
        if info["status"] != "measured":
            print(f"{name}: {info['status']} ({info.get('reason')})")
    eg = results.get("embedgate") or {}
    if "rss_before" in eg and "rss_after" in eg:
        print(
            f"embedgate RSS: {eg['rss_before']['rss_kib']} KiB before, "
            f"{eg['rss_after']['rss_kib']} KiB after;"
            f" {eg.get('trace_exports')} trace exports, {eg.get('log_lines')} log lines"
        )
    print("ratios:", json.dumps(results["ratios"], indent=1))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (non-zero when a system that should run failed)."""
    opts = parse_args(argv)
    opts.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"meta": _meta(opts)}
    status = 0
    with _sigterm_as_exit(), contextlib.ExitStack() as stack:
        port = free_port()
        upstream = stack.enter_context(
            Service(
                "upstream",
                _python_argv("tests.benchmarks.fake_upstream", "--port", str(port)),
                port=port,
                health="/healthz",
                log=opts.out / "upstream.log",
            )
        )
        upstream.wait_ready()
        if opts.soak is not None:
            try:
                results["soak"] = run_soak(opts, upstream, opts.soak)
            except (StartError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
                print(f"soak failed: {exc}", file=sys.stderr, flush=True)
                results["soak"] = {"status": "failed", "reason": str(exc), "errors": 1}
            status = 1 if results["soak"]["errors"] else 0
            print(json.dumps(results["soak"], indent=1))
        else:
            results.update(systems={}, scenarios=[], embedgate={})
            before = cpu_ticks()
            run_matrix(opts, upstream, results)
            results["meta"]["steal_pct"] = steal_pct(before, cpu_ticks())
            results["ratios"] = compute_ratios(results["scenarios"])
            results["litellm"] = (
                "measured" if results["systems"].get("litellm", {}).get("status") == "measured" else "not measured"
            )
            failed = any(info["status"] == "failed" for info in results["systems"].values())
            if failed or any(r["errors"] for r in results["scenarios"]):
                status = 1
    results["processes"] = STARTED
    (opts.out / "results.json").write_text(json.dumps(results, indent=2))
    if results.get("scenarios"):
        from tests.benchmarks.chart import draw

        draw(results, opts.out / "results.png")
        if opts.publish:
            shutil.copyfile(opts.out / "results.png", PUBLISHED_PNG)
        print_summary(results)
    print(f"wrote {opts.out / 'results.json'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
