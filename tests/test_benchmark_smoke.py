"""Smoke run of the benchmark harness: every process starts, every scenario runs, every field is reported.

Speed is not asserted (the machine is shared); only that the harness measures what it claims to measure:
200 answers with correct vectors, cache hits that are hits, ratios computed from the run, files written and
no process left behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.benchmarks.loadgen import LoadSpec, body_template
from tests.benchmarks.run import CASES, compute_ratios, embedgate_cli_exists, plan
from tests.redis_util import require_redis

REPO = Path(__file__).resolve().parents[1]
SUMMARY_FIELDS = ("requests", "ok", "errors", "statuses", "duration_s", "rps", "p50_ms", "p99_ms", "max_ms")
Run = tuple[subprocess.CompletedProcess[str], dict[str, Any]]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One ``--quick`` run shared by the tests below (it takes ~30 s)."""
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.run", "--quick", "--engine", "python", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    results = json.loads((out / "results.json").read_text())
    results["_out"] = str(out)
    return proc, results


def expected_systems() -> list[str]:
    """Systems the quick run must measure: embedgate's once its CLI exists."""
    systems = ["direct", "bare"]
    if embedgate_cli_exists():
        systems += ["embedgate_miss", "embedgate_hit"]
    return systems


def test_quick_run_measures_every_scenario(quick_run: Run) -> None:
    proc, results = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    systems = expected_systems()
    for name in systems:
        assert results["systems"][name]["status"] == "measured", results["systems"][name]
        for case, inputs in CASES.items():
            probe = results["systems"][name]["probe"][case]
            assert probe["status"] == 200 and probe["items"] == inputs
    cells = {(r["system"], r["case"], r["connections"]) for r in results["scenarios"]}
    wanted = {(s.system, s.case, s.connections) for s in plan(True, tuple(systems))}
    assert wanted <= cells
    for row in results["scenarios"]:
        for field in SUMMARY_FIELDS:
            assert row[field] is not None, (row["system"], field)
        assert row["ok"] > 0 and row["errors"] == 0 and row["rps"] > 0
        assert row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
        # How much CPU the machine's neighbours took during the cell (figures under heavy steal are not comparable).
        assert 0 <= row["steal_pct"] <= 100, row
        # The system's own CPU time per request (its process tree: the upstream for direct, each proxy else).
        assert row["cpu_us_per_request"] > 0, row
    assert 0 <= results["meta"]["steal_pct"] <= 100
    assert "steal %" in proc.stdout and "CPU us/req" in proc.stdout
    assert results["litellm"] == "not measured"
    assert "litellm: not measured" in proc.stdout
    assert Path(results["_out"], "results.png").stat().st_size > 10_000
    # The harness stopped every server it started (they were reaped, so their /proc entries are gone).
    started = {p["name"] for p in results["processes"]}
    assert {"upstream", "bare"} <= started
    assert [p for p in results["processes"] if Path(f"/proc/{p['pid']}").exists()] == []


@pytest.mark.skipif(not embedgate_cli_exists(), reason="embedgate.cli is not written yet")
def test_quick_run_reports_embedgate_fields(quick_run: Run) -> None:
    _, results = quick_run
    eg = results["embedgate"]
    assert eg["rss_before"]["rss_kib"] > 0 and eg["rss_after"]["rss_kib"] > 0
    # The miss scenario sends fresh inputs and no cache field; the hit scenario is served from the cache.
    hit_rows = [r for r in results["scenarios"] if r["system"] == "embedgate_hit"]
    miss_rows = [r for r in results["scenarios"] if r["system"] == "embedgate_miss"]
    assert all(set(r["cache"]) == {"hit"} for r in hit_rows), [r["cache"] for r in hit_rows]
    assert all("hit" not in r["cache"] for r in miss_rows), [r["cache"] for r in miss_rows]
    # Logging is on (one JSON line per request, never the key) and tracing too (spans reached the sink).
    assert eg["log_lines"] >= eg["requests_sent"] > 0
    assert eg["key_in_log"] is False
    assert eg["trace_exports"] > 0
    ratios = results["ratios"]
    for case in CASES:
        assert ratios["added_p50_ms_vs_direct_1conn"][case]["embedgate_miss"] is not None
    assert ratios["embedgate_miss_vs_bare_rps_16conn"]["single"] is not None
    assert ratios["cache_hit_vs_direct_rps_16conn"]["single"] is not None
    assert ratios["batch_added_latency_pct_1conn"]["embedgate_miss"] is not None
    assert ratios["embedgate_miss_vs_litellm_rps_16conn"]["single"] is None  # LiteLLM was not run
    assert ratios["cpu_per_request_vs_bare_16conn"]["embedgate_miss"]["single"] > 0


def test_ratios_come_from_the_rows() -> None:
    def row(system: str, case: str, connections: int, p50_ms: float, rps: float, cpu: float = 0) -> dict[str, Any]:
        return {
            "system": system,
            "case": case,
            "connections": connections,
            "ok": 10,
            "p50_ms": p50_ms,
            "rps": rps,
            "cpu_us_per_request": cpu or None,
        }

    rows = [
        row("direct", "single", 1, 0.2, 100.0),
        row("embedgate_miss", "single", 1, 0.5, 50.0),
        row("direct", "single", 16, 1.0, 1000.0),
        row("embedgate_hit", "single", 16, 1.0, 800.0),
        row("litellm", "single", 16, 9.0, 100.0, cpu=8000.0),
        row("bare", "single", 16, 0.5, 500.0, cpu=100.0),
        row("embedgate_miss", "single", 16, 0.9, 300.0, cpu=250.0),
        row("direct", "batch", 1, 2.0, 10.0),
        row("embedgate_miss", "batch", 1, 2.5, 8.0),
    ]
    ratios = compute_ratios(rows)
    assert ratios["added_p50_ms_vs_direct_1conn"]["single"]["embedgate_miss"] == pytest.approx(0.3)
    assert ratios["added_p50_ms_vs_direct_1conn"]["single"]["bare"] is None
    assert ratios["cache_hit_vs_direct_rps_16conn"]["single"] == pytest.approx(0.8)
    assert ratios["embedgate_hit_vs_litellm_rps_16conn"]["single"] == pytest.approx(8.0)
    assert ratios["batch_added_latency_pct_1conn"]["embedgate_miss"] == pytest.approx(25.0)
    cpu = ratios["cpu_per_request_vs_bare_16conn"]
    assert cpu["embedgate_miss"]["single"] == pytest.approx(2.5)
    assert cpu["litellm"]["single"] == pytest.approx(80.0)
    assert cpu["embedgate_hit"]["single"] is None  # its row has no CPU figure
    assert cpu["embedgate_miss"]["batch"] is None  # no batch rows at 16 connections


def test_fresh_bodies_differ_per_request_and_fixed_ones_do_not() -> None:
    fresh = LoadSpec(url="http://127.0.0.1:1/v1/embeddings", inputs=256, nonce="n1")
    pieces = body_template(fresh)
    first, second = (json.loads(str(seq).encode().join(pieces)) for seq in (1, 2))
    assert len(first["input"]) == 256 and len(set(first["input"])) == 256
    assert not set(first["input"]) & set(second["input"])  # no cache could answer the second request
    assert "cache" not in first
    fixed = LoadSpec(url="http://127.0.0.1:1/v1/embeddings", inputs=1, fresh=False, cache=True)
    body = json.loads(b"".join(body_template(fixed)))
    assert body_template(fixed) == body_template(replace(fixed, nonce="other"))
    assert body["cache"] == {"type": "exact_match"} and isinstance(body["input"], str)


def run_module(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m tests.benchmarks.<module> <args>`` from the repository, its output captured."""
    return subprocess.run([sys.executable, "-m", f"tests.benchmarks.{module}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip


def test_the_transport_comparison_runs_every_candidate() -> None:
    """``tests/benchmarks/transports.py``: the measurement that chose the upstream transport still runs."""
    proc = run_module("transports", "--seconds", "0.2", "--connections", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for case in ("inputs_1", "inputs_256"):
        assert set(report[case]) >= {"httpx", "aiohttp", "http1", "aiohttp-raw"}
        for row in report[case].values():
            assert row["requests"] > 0 and row["rps"] > 0 and row["cpu_us_per_request"] > 0


def test_the_redis_client_comparison_runs_both_clients() -> None:
    """``tests/benchmarks/redis_client.py``: the measurement behind the budget store's Redis client still runs."""
    proc = run_module("redis_client", "--url", require_redis(), "--calls", "200", "--rounds", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("round 1:")]
    assert [row.split()[2] for row in rows] == ["redis-py", "embedgate.resp"]
    assert all(float(row.split()[3]) > 0 for row in rows)


def test_the_in_process_driver_reports_cpu_per_request_with_parts_switched_off() -> None:
    proc = run_module("inprocess", "--requests", "40", "--warmup", "5", "--rounds", "1", "--off", "budgets,access_log")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "off: access_log,budgets: CPU us per request" in proc.stderr
    assert "embedgate.access" not in proc.stdout  # access lines off
    bad = run_module("inprocess", "--off", "caching", timeout=60)
    assert bad.returncode == 2 and "unknown parts: caching" in bad.stderr


def test_parts_run_serves_every_variant(tmp_path: Path) -> None:
    """``python -m tests.benchmarks.parts``: each variant is a served gateway that answers (no speed asserted)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.parts", "--rounds", "1", "--duration", "0.5", "--warmup", "0.2",
         "--variants", "all,-all,http=httptools", "--engine", "python", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    report = json.loads((tmp_path / "parts.json").read_text())
    assert [r["variant"] for r in report["rows"]] == ["all", "-all", "http=httptools"]
    for row in report["rows"]:
        assert row["rps"] > 0 and row["errors"] == 0 and row["main_us"] > 0, row
    on = yaml.safe_load((tmp_path / "parts-on.yaml").read_text())
    assert on["budgets"] and on["telemetry"].get("access_log", True)  # everything on, as deployed
    off = yaml.safe_load((tmp_path / "parts-off-all.yaml").read_text())
    assert off["budgets"] == [] and off["telemetry"]["access_log"] is False
