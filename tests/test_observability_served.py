"""``embedgate serve`` as deployed: OTLP export from the standard OTEL_* variables, JSON access lines, no secrets.

One module-scoped run starts a real local OTLP/HTTP receiver and ``embedgate serve`` in a subprocess, sends a
few requests (a named one continuing a caller's trace, a cache hit, a retried one, an upstream error quoting the
input and our provider key, a wrong key), scrapes ``/metrics`` and stops the server; the tests then read what
reached the receiver, the process's stdout/stderr, and the scrape.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
import yaml

from tests.conftest import wait_serving
from tests.fake_upstream import FakeUpstream, Fault, free_port, tokens_of
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
# Distinctive values, so that finding one anywhere cannot be a coincidence.
CLIENT_KEY = "sk-live-CLIENTKEY-7f3a9c1e5d2b4a68"
WRONG_KEY = "sk-live-WRONGKEY-0d9e8f7a6b5c4d3e"
PROVIDER_KEY = "pk-PROVIDERSECRET-51c0ffee9a7b"
BACKUP_PROVIDER_KEY = "pk-BACKUPSECRET-77deadbeef42"
SECRET_TEXT = "Quetzalcoatl-zebra-sapphire diary entry 4417"
SECRET_WORD = "Quetzalcoatl"
SERVICE = "embedgate-e2e"
EMBED_REQUESTS = 5  # the embedding POSTs the run sends


@dataclass
class Run:
    """What one served run produced."""

    responses: list[httpx.Response]
    spans: list[ReceivedSpan]
    stdout: str
    stderr: str
    metrics: str
    upstream_traceparents: list[str]


def send_traffic(url: str, upstream: FakeUpstream) -> tuple[list[httpx.Response], str]:
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    named = {"model": "local/embed-small", "input": [SECRET_TEXT, "second item"], "name": "e2e-search",
             "user": "end-user-1", "cache": {"type": "exact_match"}}  # fmt: skip
    out = []
    with httpx.Client(base_url=url, timeout=10) as c:
        traceparent = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
        out.append(c.post("/v1/embeddings", json=named, headers={**auth, **traceparent}))
        out.append(c.post("/v1/embeddings", json={**named, "name": "e2e-cached"}, headers=auth))
        upstream.script.append(Fault("status", 503))
        retried = {"model": "local/embed-small", "input": SECRET_TEXT, "retry": {"count": 1, "on_codes": [503]}}
        out.append(c.post("/v2/router/embeddings", json=retried, headers=auth))
        # an upstream that quotes the input and echoes our provider key in its error message
        upstream.script.append(Fault("status", 400, message=f"cannot embed '{SECRET_TEXT}' (key {PROVIDER_KEY})"))
        rejected = {"model": "local/embed-small", "input": f"{SECRET_TEXT} again", "name": "e2e-rejected"}
        out.append(c.post("/api/v1/embeddings", json=rejected, headers=auth))
        wrong = {"authorization": f"Bearer {WRONG_KEY}"}
        out.append(c.post("/v1/embeddings", json={**named, "name": "e2e-wrong-key"}, headers=wrong))
        metrics = c.get("/metrics").text
    return out, metrics


@pytest.fixture(scope="module")
def run(upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    upstream = upstream_server
    upstream.reset()
    workdir = tmp_path_factory.mktemp("served")
    config = {
        "providers": {
            "local": {"type": "openai_compatible", "base_url": "${UPSTREAM_URL}", "api_key": "${LOCAL_PROVIDER_KEY}"},
            "backup": {"type": "openai", "base_url": "${UPSTREAM_URL}", "api_key": "${BACKUP_PROVIDER_KEY}"},
        },
        "models": {"local/embed-small": {"price_per_million_tokens": 0.02}},
        "keys": [{"id": "team-a", "key": "${TEAM_A_KEY}", "workspace": "acme", "project": "search"}],
        "routing": {"backoff_base_ms": 10},
        "telemetry": {"service_name": "from-config"},
    }
    path = workdir / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    out_path, err_path = workdir / "stdout.log", workdir / "stderr.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with OtlpReceiver() as receiver, out_path.open("wb") as out, err_path.open("wb") as err:
        # only the standard OTel variables point the gateway at the collector; nothing in its config does
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROMETHEUS_MULTIPROC"))}
        env.update(
            {
                "UPSTREAM_URL": upstream.url,
                "TEAM_A_KEY": CLIENT_KEY,
                "LOCAL_PROVIDER_KEY": PROVIDER_KEY,
                "BACKUP_PROVIDER_KEY": BACKUP_PROVIDER_KEY,
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_SERVICE_NAME": SERVICE,
                "OTEL_BSP_SCHEDULE_DELAY": "100",
            }
        )
        command = [sys.executable, "-m", "embedgate.cli", "serve", "--config", str(path), "--port", str(port)]
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=err)
        try:
            wait_serving(proc, url)
            responses, metrics = send_traffic(url, upstream)
            traceparents = [c.headers.get("traceparent", "") for c in upstream.calls]
            # every embedding request's root span, exported within the 100 ms batch delay
            receiver.wait_for_spans(EMBED_REQUESTS, timeout=15, where=lambda s: s.kind == "SERVER")
        finally:
            proc.terminate()
            proc.wait(timeout=20)
            upstream.reset()
        spans = receiver.spans
    yield Run(
        responses=responses,
        spans=spans,
        stdout=out_path.read_text(),
        stderr=err_path.read_text(),
        metrics=metrics,
        upstream_traceparents=traceparents,
    )


def log_lines(run: Run) -> list[dict[str, Any]]:
    """The JSON lines of stdout (``serve`` first prints its config check as plain text)."""
    return [orjson.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def test_the_served_trace_reaches_the_otlp_receiver_continuing_the_callers_trace(run: Run) -> None:
    named = run.responses[0]
    assert named.status_code == 200, named.text
    assert named.headers["x-embedgate-trace-id"] == CALLER_TRACE
    (root,) = [s for s in run.spans if s.name == "e2e-search"]
    assert root.kind == "SERVER"
    assert root.trace_id == CALLER_TRACE
    assert root.parent_span_id == CALLER_SPAN
    assert root.resource["service.name"] == SERVICE  # OTEL_SERVICE_NAME wins over the config's name
    assert root.scope == "embedgate"
    assert root.attributes["embedgate.key_id"] == "team-a"
    assert root.attributes["embedgate.cache"] == "miss"
    assert root.attributes["http.response.status_code"] == 200

    in_trace = [s for s in run.spans if s.trace_id == CALLER_TRACE]
    stages = {s.name: s for s in in_trace if s.kind == "INTERNAL"}
    assert set(stages) == {"auth", "cache", "budget", "routing"}
    assert all(s.parent_span_id == root.span_id for s in stages.values())
    (attempt,) = [s for s in in_trace if s.kind == "CLIENT"]
    assert attempt.parent_span_id == stages["routing"].span_id
    assert attempt.attributes["gen_ai.provider.name"] == "local"
    assert attempt.attributes["gen_ai.usage.input_tokens"] == tokens_of(SECRET_TEXT) + tokens_of("second item")
    # across processes: the upstream got the attempt span as its parent, in the caller's trace
    assert run.upstream_traceparents[0] == f"00-{CALLER_TRACE}-{attempt.span_id}-01"

    # the other requests are traces of their own, named as asked (or after the model)
    names = {s.name for s in run.spans if s.kind == "SERVER"}
    assert names == {"e2e-search", "e2e-cached", "embeddings local/embed-small", "e2e-rejected", "e2e-wrong-key"}
    assert CALLER_TRACE not in {s.trace_id for s in run.spans if s.kind == "SERVER" and s.name != "e2e-search"}


def test_no_key_input_or_provider_key_in_spans_logs_or_metrics(run: Run) -> None:
    statuses = [r.status_code for r in run.responses]
    assert statuses == [200, 200, 200, 400, 401]
    # the secrets did travel through the gateway: the upstream's message quoting the input came back to its
    # client (its own input), with our provider key scrubbed out
    rejected = run.responses[3].json()["error"]
    assert SECRET_TEXT in rejected["message"]
    assert PROVIDER_KEY not in run.responses[3].text
    assert all(PROVIDER_KEY not in r.text and CLIENT_KEY not in r.text for r in run.responses)

    # there is something to search in each place
    assert len([s for s in run.spans if s.kind == "CLIENT"]) >= 4
    assert len(log_lines(run)) >= EMBED_REQUESTS
    assert "embedgate_requests_total" in run.metrics

    span_text = [s.name for s in run.spans]
    for s in run.spans:
        for attributes in (s.attributes, s.resource):
            span_text += [f"{k}={v!r}" for k, v in attributes.items()]
    places = {"spans": "\n".join(span_text), "stdout": run.stdout, "stderr": run.stderr, "metrics": run.metrics}
    secrets = [CLIENT_KEY, WRONG_KEY, PROVIDER_KEY, BACKUP_PROVIDER_KEY, SECRET_TEXT, SECRET_WORD]
    found = [(secret, place) for secret in secrets for place, text in places.items() if secret in text]
    assert found == []


def test_one_access_line_per_request_with_ids_usage_and_outcome(run: Run) -> None:
    access = [line for line in log_lines(run) if line.get("logger") == "embedgate.access"]
    assert len(access) == EMBED_REQUESTS
    by_request = {line["request_id"]: line for line in access}
    assert set(by_request) == {r.headers["x-request-id"] for r in run.responses}

    named = run.responses[0]
    line = by_request[named.headers["x-request-id"]]
    assert line["event"] == "request"
    assert line["level"] == "info"
    assert line["trace_id"] == CALLER_TRACE
    assert line["key_id"] == "team-a"
    assert line.get("model") == "local/embed-small"
    assert line["cache"] == "miss"
    assert line["tokens"] == named.json()["usage"]["prompt_tokens"] > 0
    assert line["status"] == 200
    assert isinstance(line["latency_ms"], float) and line["latency_ms"] > 0
    assert line["attempts"] == 1
    assert line["cost_usd"] == pytest.approx(line["tokens"] * 0.02 / 1e6)

    cached = by_request[run.responses[1].headers["x-request-id"]]
    assert (cached["cache"], cached["attempts"], cached["status"]) == ("hit", 0, 200)
    assert cached["trace_id"] == run.responses[1].headers["x-embedgate-trace-id"] != CALLER_TRACE
    retried = by_request[run.responses[2].headers["x-request-id"]]
    assert (retried["route"], retried["attempts"], retried["cache"]) == ("orq", 2, "bypass")
    rejected = by_request[run.responses[3].headers["x-request-id"]]
    assert (rejected["status"], rejected["error"], rejected["key_id"]) == (400, "upstream_rejected_input", "team-a")
    unknown = by_request[run.responses[4].headers["x-request-id"]]
    assert unknown["status"] == 401
    assert "key_id" not in unknown  # an unknown key has no id, and the key itself is never logged


def test_a_failed_request_reports_the_upstream_attempts_it_made(run: Run) -> None:
    rejected = run.responses[3]
    (line,) = [ln for ln in log_lines(run) if ln.get("request_id") == rejected.headers["x-request-id"]]
    (root,) = [s for s in run.spans if s.name == "e2e-rejected"]
    assert [s.kind for s in run.spans if s.trace_id == root.trace_id].count("CLIENT") == 1
    assert line["attempts"] == 1
    assert root.attributes["embedgate.attempts"] == 1


def test_a_failed_requests_access_line_names_the_requested_model(run: Run) -> None:
    rejected = run.responses[3]
    (line,) = [ln for ln in log_lines(run) if ln.get("request_id") == rejected.headers["x-request-id"]]
    assert line.get("model") == "local/embed-small"


def test_spans_queued_at_a_sigterm_to_the_process_group_still_reach_the_collector(
    upstream_server: FakeUpstream, tmp_path: Any
) -> None:
    """A service manager (or Ctrl-C) signals the whole process group, the export helper included: the helper
    must outlive the gateway's last flush, so the spans still queued at shutdown are exported, not lost."""
    import signal

    upstream_server.reset()
    config = {
        "providers": {"local": {"type": "openai_compatible", "base_url": upstream_server.url, "api_key": "pk-x"}},
        "keys": [{"id": "team-a", "key": CLIENT_KEY, "workspace": "acme", "project": "search"}],
    }
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROMETHEUS_MULTIPROC"))}
    with OtlpReceiver() as receiver, (tmp_path / "out.log").open("wb") as out:
        # nothing is exported before the shutdown: a minute's batch delay, and fewer spans than a frame
        env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "60000"})
        command = [sys.executable, "-m", "embedgate.cli", "serve", "--config", str(path), "--port", str(port)]
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=out, start_new_session=True)
        try:
            wait_serving(proc, url)
            body = {"model": "local/embed-small", "input": "hello", "name": "last"}
            r = httpx.post(f"{url}/v1/embeddings", json=body, headers={"authorization": f"Bearer {CLIENT_KEY}"},
                           timeout=10)  # fmt: skip
            assert r.status_code == 200, r.text
            assert receiver.spans == []
            os.killpg(proc.pid, signal.SIGTERM)
            # uvicorn shuts down gracefully, then re-raises the signal it caught
            assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        spans = receiver.wait_for_spans(5, timeout=15)
    # no "cache" span: the request bypasses the cache (it asks for none, and the config does not cache by default)
    assert {s.name for s in spans} == {"last", "auth", "budget", "routing", "embeddings embed-small"}
    upstream_server.reset()


def test_every_answer_goes_out_with_its_length_not_in_chunks(run: Run) -> None:
    # Served by uvicorn: without a Content-Length it would frame every answer in chunks (a copy of the body).
    for response in run.responses:
        assert "transfer-encoding" not in response.headers
        assert response.headers["content-length"] == str(len(response.content))
