"""Configuration loading and validation, and the embedgate command line."""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
import yaml

from embedgate.cli import main as cli_main
from embedgate.config import ConfigError, hash_key, load_config, parse_config
from tests.conftest import KEY, config_dict, wait_serving
from tests.fake_upstream import FakeUpstream, Fault, free_port
from tests.redis_util import require_redis

EMBEDGATE = [sys.executable, "-m", "embedgate.cli"]

GOOD = """
server: {path_prefix: "", unknown_fields: reject}
redis_url: ${EMBEDGATE_TEST_REDIS:-}
providers:
  local:
    type: openai_compatible
    base_url: ${UPSTREAM_URL}
    api_key: ${LOCAL_KEY:-}
models:
  local/embed-small: {price_per_million_tokens: 0.02, max_inputs: 512}
keys:
  - {id: team-a, key: "${TEAM_A_KEY}", workspace: acme, models: ["local/*"]}
budgets:
  - {scope: api_key, target: team-a, period: daily, token_limit: 1000}
cache: {enabled_by_default: false, default_ttl: 60}
routing: {default_retry: {count: 1, on_codes: [500]}, backoff_base_ms: 5}
telemetry: {service_name: test-gw}
"""


BUDGET = "budgets:\n  - {scope: api_key, target: team-a, period: daily, token_limit: 1000}\n"
assert BUDGET in GOOD


def test_interpolation_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD)
    cfg = load_config(path, env={"UPSTREAM_URL": "http://127.0.0.1:9/v1", "TEAM_A_KEY": "sk-a"})
    assert cfg.redis_url == ""
    assert cfg.providers["local"].base_url == "http://127.0.0.1:9/v1"
    assert cfg.providers["local"].api_key == ""
    assert cfg.keys[0].sha256 == hashlib.sha256(b"sk-a").hexdigest()
    assert "sk-a" not in repr(cfg)  # a key never shows in a repr (or a log of the config)
    assert cfg.models["local/embed-small"].max_inputs == 512
    assert cfg.routing.default_retry.count == 1
    assert cfg.routing.fallback_on_codes == frozenset({408, 429, 500, 502, 503, 504, 529})
    assert cfg.cache.max_ttl == 259200
    assert cfg.telemetry.access_log_flush_ms == 50


def test_every_error_has_its_yaml_path() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "server": {"max_body_bytes": "lots", "colour": 1},
                "providers": {"p": {"type": "grpc", "base_url": "ftp://x", "accepts_input_type": "maybe"}},
                "models": {"p/m": {"deployments": [{"provider": "q"}]}},
                "keys": [{"id": "a"}, {"id": "a", "key": "k", "sha256": "00"}],
                "budgets": [{"scope": "galaxy", "target": "*"}],
                "cache": {"default_ttl": 10, "max_ttl": 5},
                "routing": {"default_retry": {"count": 9}},
                "telemetry": {"access_log_flush_ms": -1},
            },
            env={},
        )
    errors = "\n".join(info.value.errors)
    for expected in [
        "server.max_body_bytes: must be an integer",
        "server.colour: unknown key",
        "providers.p.type: must be one of",
        "providers.p.base_url: must be an http(s) URL",
        "providers.p.accepts_input_type: must be",
        "models.p/m.deployments[0].provider: no provider named 'q'",
        "keys[0]: needs key or sha256",
        "keys[1].id: duplicate key id",
        "keys[1].sha256: must be 64 hex digits",
        "budgets[0].scope: must be one of",
        "budgets[0]: sets no limit",
        "cache.default_ttl: is above max_ttl",
        "routing.default_retry.count: must be between 0 and 5",
        "telemetry.access_log_flush_ms: must be",
    ]:
        assert expected in errors, f"{expected!r} missing from:\n{errors}"


def test_a_deployment_listed_twice_in_a_model_is_an_error() -> None:
    """One endpoint has one breaker and one backoff: listed twice, it was called again at once after it failed,
    and with the key it had just refused (a dropped deployment is dropped by its place in the list)."""
    providers = {"p": {"type": "openai_compatible", "base_url": "http://127.0.0.1:9/v1"}}
    twice = [{"provider": "p", "upstream_model": "m"}, {"provider": "p"}, {"provider": "p", "upstream_model": "n"}]
    with pytest.raises(ConfigError) as info:
        parse_config({"providers": providers, "models": {"p/m": {"deployments": twice}}}, env={})
    assert info.value.errors == [
        "models.p/m.deployments[1]: the same deployment as deployments[0] (provider 'p', upstream_model 'm')"
    ]
    parse_config({"providers": providers, "models": {"p/m": {"deployments": [twice[0], twice[2]]}}}, env={})
    # A value from the environment is not shown, here either (the same wrong variable twice: a secret, say).
    secret = "sk-proj-TOPSECRET123"
    twice = [{"provider": "p", "upstream_model": "${UPSTREAM_KEY}"}] * 2
    with pytest.raises(ConfigError) as info:
        parse_config({"providers": providers, "models": {"p/m": {"deployments": twice}}}, env={"UPSTREAM_KEY": secret})
    assert info.value.errors == ["models.p/m.deployments[1]: the same deployment as deployments[0] (provider 'p', "
                                 "upstream_model a value from the environment (not shown))"]  # fmt: skip


def test_two_keys_with_one_secret_are_an_error() -> None:
    """A client would authenticate as only one of them: its budgets and usage would go to the wrong key."""
    secret = "sk-shared-secret-123"
    keys = [{"id": "a", "key": secret}, {"id": "b", "sha256": hash_key(secret).upper()}, {"id": "c", "key": secret}]
    with pytest.raises(ConfigError) as info:
        parse_config({"keys": keys}, env={})
    assert info.value.errors == [
        "keys[1].sha256: the same secret as keys[0]",
        "keys[2].key: the same secret as keys[0]",
    ]
    assert secret not in str(info.value) and hash_key(secret) not in str(info.value)
    parse_config({"keys": [keys[0], {"id": "b", "key": secret + "-other"}]}, env={})  # distinct secrets: fine


def test_a_provider_s_headers_are_checked_and_never_shown() -> None:
    def errors(headers: Any, api_key: str = "") -> list[str]:
        provider = {"type": "openai", "base_url": "https://x.example/v1", "api_key": api_key, "headers": headers}
        try:
            parse_config({"providers": {"az": provider}}, env={})
        except ConfigError as exc:
            return exc.errors
        return []

    assert errors({"api-key": "s3cret value", "X-Title": "acme"}) == []
    assert errors(["api-key"]) == ["providers.az.headers: must be a mapping of header names to values"]
    assert errors({"Host": "x", "Content-Length": "1", "traceparent": "t"}) == [
        "providers.az.headers.Host: is set by the gateway itself",
        "providers.az.headers.Content-Length: is set by the gateway itself",
        "providers.az.headers.traceparent: is set by the gateway itself",
    ]
    assert errors({"bad/name": "x"}) == ["providers.az.headers: 'bad/name' is no HTTP header name"]
    assert errors({"Authorization Bearer sk-secret-123": None}) == [  # a name with a blank may hold a secret
        "providers.az.headers: a name that is no HTTP header name (not shown: it holds a space; did you mean "
        "`Authorization: ...`?)"
    ]
    assert errors({"api-key": "a", "API-KEY": "b"}) == [
        "providers.az.headers.API-KEY: is given twice (header names are case-insensitive)"
    ]
    bad = errors({"api-key": "secret\r\nX-Evil: 1", "x-n": 7})
    assert bad == [
        "providers.az.headers.api-key: must be a string of visible ASCII characters and spaces (no line breaks, no "
        "accents, none at either end)",
        "providers.az.headers.x-n: must be a string, got int (quote it: YAML reads an unquoted number or yes/no its "
        "own way)",
    ]
    # "{api-key:SECRET}" (no space after the colon) is one name holding the secret: not shown
    (colon,) = errors({"api-key:sk-secret-123": None})
    assert "sk-secret" not in colon and "did you mean `api-key: ...`?" in colon
    assert errors({"Accept": "text/plain"}) == ["providers.az.headers.Accept: is set by the gateway itself"]
    assert errors({"api-key": ""}) == ["providers.az.headers.api-key: is empty (is its environment variable set?)"]
    assert errors({"api-key": "${AZURE_KEY_UNSET}"}) == [
        "providers.az.headers.api-key: environment variable AZURE_KEY_UNSET is not set (use ${AZURE_KEY_UNSET:-})"
    ]
    assert errors({"Authorization": "Basic abc"}) == []  # a scheme of its own, with no api_key
    assert errors({"authorization": "Basic abc"}, api_key="sk-x") == [
        "providers.az.headers: give api_key (sent as 'Authorization: Bearer') or an Authorization header, not both"
    ]


def test_a_refused_secret_is_one_error_not_three() -> None:
    """A key refused as given (a space, a bad ${...}, an unset variable) was also said to be missing or empty."""
    keys = [{"id": "a", "key": "sk one"}, {"id": "b", "key": "${X-y}"}, {"id": "c"},
            {"id": "d", "key": "${UNSET_IN_TEST}"}, {"id": "e", "key": "${EMPTY_IN_TEST:-}"}]  # fmt: skip
    with pytest.raises(ConfigError) as info:
        parse_config({"keys": keys}, env={})
    assert sorted(info.value.errors) == [
        "keys[0].key: must be visible ASCII characters (no spaces, no accents: an HTTP header carries it)",
        "keys[1].key: a '${' that is not ${NAME} or ${NAME:-default} (NAME: letters, digits and _)",
        "keys[2]: needs key or sha256",
        "keys[3].key: environment variable UNSET_IN_TEST is not set (use ${UNSET_IN_TEST:-})",
        "keys[4].key: is empty (is its environment variable set?)",
    ]


def test_a_workspace_nested_in_another_is_an_error() -> None:
    """Projects and identities are counted (and identities stored) as "<workspace>/<id>": a client of "acme" sending
    the identity "team/bob" spent, and in Redis rewrote the profile of, workspace "acme/team"'s "bob"."""
    keys = [{"id": "a", "key": "sk-a-1111111111", "workspace": "acme"},
            {"id": "b", "key": "sk-b-2222222222", "workspace": "acme/team"},
            {"id": "c", "key": "sk-c-3333333333", "workspace": "acme/team"},
            {"id": "d", "key": "sk-d-4444444444", "workspace": "acmeteam/x"}]  # fmt: skip
    with pytest.raises(ConfigError) as info:
        parse_config({"keys": keys}, env={})
    assert info.value.errors == [
        "keys[1].workspace: 'acme/team' is keys[0].workspace ('acme') and '/' more: their projects and identities "
        "would share names ('<workspace>/<id>'); rename one"
    ]
    parse_config({"keys": [keys[1], keys[2], keys[3]]}, env={})  # a '/' alone is fine: only a nesting is ambiguous


def test_the_admin_key_is_no_client_key() -> None:
    """A client holding it would also read every key's usage and every identity."""
    secret = "sk-shared-secret-123"
    with pytest.raises(ConfigError) as info:
        parse_config({"keys": [{"id": "a", "key": "sk-other"}, {"id": "b", "key": secret}],
                      "admin": {"key": secret}}, env={})  # fmt: skip
    assert info.value.errors == ["admin: the same secret as keys[1]"]
    with pytest.raises(ConfigError) as info:
        parse_config({"admin": {"key": secret, "sha256": hash_key(secret)}}, env={})
    assert info.value.errors == ["admin: give either key or sha256, not both"]
    assert parse_config({"keys": [{"id": "a", "key": "sk-other"}], "admin": {"key": secret}}, env={}).admin.sha256


def test_missing_env_var_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"keys": [{"id": "a", "key": "${NOT_SET_ANYWHERE}"}]}, env={})
    assert any("keys[0].key: environment variable NOT_SET_ANYWHERE is not set" in e for e in info.value.errors)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("a: " + "[" * 600 + "]" * 600, "<yaml>: nested too deeply"),  # was a RecursionError's traceback
        ("[]\n", "<root>: must be a mapping, got a list"),  # these four were read as an empty config: "ok"
        ("false\n", "<root>: must be a mapping, got a boolean"),
        ("0\n", "<root>: must be a mapping, got int"),
        ("''\n", "<root>: must be a mapping, got a string"),
        ("redis_url: {}\n", "redis_url: must be a string, got a mapping"),  # was "no Redis"
    ],
    ids=["deep", "list", "false", "zero", "empty-string", "redis-url-mapping"],
)
def test_a_file_that_is_no_config_is_an_error(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.errors == [error]
    path.write_text("# nothing set yet\n")
    assert load_config(path, env={}).keys == ()  # an empty file is still an empty config


def test_a_mistyped_url_scheme_does_not_show_its_credentials_nor_a_bad_scope_a_second_error() -> None:
    providers = {"p": {"type": "openai", "base_url": "htps://user:SECRETPW@api.example.com/v1"}}
    with pytest.raises(ConfigError) as info:
        parse_config({"providers": providers}, env={})
    assert info.value.errors == ["providers.p.base_url: must be an http(s) URL, got a value with '@' in it (not shown)"]
    # A scope typo was told, then its target checked as a workspace's: "no key has the workspace 'dev'".
    with pytest.raises(ConfigError) as info:
        parse_config({"keys": [{"id": "dev", "key": "sk-dev-1"}],
                      "budgets": [{"scope": "apikey", "target": "dev", "amount_usd": 1}]}, env={})  # fmt: skip
    assert len(info.value.errors) == 1 and info.value.errors[0].startswith("budgets[0].scope: must be one of")


def test_a_top_level_x_key_holds_shared_anchors(tmp_path: Path) -> None:
    # A compose-style "x-defaults: &d {...}" was an unknown key: anchors could only sit on a real provider or model.
    path = tmp_path / "c.yaml"
    path.write_text("x-defaults: &d {type: openai_compatible, timeout_ms: 7000}\n"
                    "providers:\n  a: {<<: *d, base_url: 'http://127.0.0.1:9/v1'}\n"
                    "  b: {<<: *d, base_url: 'http://127.0.0.1:10/v1', timeout_ms: 9000}\n")  # fmt: skip
    config = load_config(path, env={})
    assert (config.providers["a"].timeout_ms, config.providers["b"].timeout_ms) == (7000, 9000)
    path.write_text("y-defaults: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "unknown key" in info.value.errors[0]


def test_check_config_cli(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers:\n  p: {type: nope}\n")
    r = subprocess.run([*EMBEDGATE, "check-config", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "providers.p.type: must be one of" in r.stderr
    assert "providers.p.base_url: is required" in r.stderr
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    env = {**os.environ, "UPSTREAM_URL": "http://127.0.0.1:9/v1", "TEAM_A_KEY": "sk-a"}
    r = subprocess.run([*EMBEDGATE, "check-config", str(good)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_hash_key_cli() -> None:
    r = subprocess.run([*EMBEDGATE, "hash-key", "sk-secret"], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == hashlib.sha256(b"sk-secret").hexdigest()


@contextmanager
def started(argv: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A serving command that the block stops (and reads with ``communicate``); killed at the block's end if it is
    still running."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@contextmanager
def serving(argv: list[str], port: int, env: dict[str, str], output: list[bytes] | None = None) -> Iterator[str]:
    """Run a serving command on ``port`` until the block ends; yields its URL once it answers. What it printed
    is appended to ``output``."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_serving(proc, f"http://127.0.0.1:{port}")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        if output is not None:
            output.append(out)


def embed(url: str) -> httpx.Response:
    """One embedding request with team-a's key."""
    return httpx.post(f"{url}/v1/embeddings", json={"model": "local/embed-small", "input": "x"},
                      headers={"authorization": "Bearer sk-a"}, timeout=10)  # fmt: skip


def wait_for(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.1)


def embed_in_flight(url: str, upstream: FakeUpstream) -> tuple[threading.Thread, list[httpx.Response]]:
    """``embed(url)`` sent from a thread, once the (slowed) upstream has it; the thread and where its answer goes."""
    answers: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answers.append(embed(url)))
    sender.start()
    wait_for(lambda: upstream.calls, "the request to reach the upstream", timeout=10)
    return sender, answers


@pytest.mark.parametrize("http", [[], ["--http", "httptools"]], ids=["embedgate-protocol", "uvicorn-httptools"])
def test_serve_cli_serves(tmp_path: Path, upstream: FakeUpstream, http: list[str]) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD)
    port = free_port()
    env = {**os.environ, "UPSTREAM_URL": upstream.url, "TEAM_A_KEY": "sk-a", "OTEL_TRACES_EXPORTER": "none"}
    with serving([*EMBEDGATE, "serve", "--config", str(path), "--port", str(port), *http], port, env) as url:
        r = embed(url)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "local/embed-small"


def test_serve_goes_on_serving_while_nobody_reads_its_log_output(tmp_path: Path, upstream: FakeUpstream) -> None:
    # A stdout pipe nobody read (a stalled log shipper) filled after ~140 access lines, and the server stopped in
    # its write: every request and /healthz with it, until the reader came back.
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD)
    port = free_port()
    env = {**os.environ, "UPSTREAM_URL": upstream.url, "TEAM_A_KEY": "sk-a", "OTEL_TRACES_EXPORTER": "none"}
    output: list[bytes] = []
    with serving([*EMBEDGATE, "serve", "--config", str(path), "--port", str(port)], port, env, output) as url:
        with httpx.Client(base_url=url, timeout=5) as c:  # (serving reads the output only once it ends)
            for i in range(400):
                r = c.post("/v1/embeddings", json={"model": "local/embed-small", "input": f"x{i}"},
                           headers={"authorization": "Bearer sk-a"})  # fmt: skip
                assert r.status_code == 200, (i, r.text)
            assert c.get("/healthz").status_code == 200
    lines = [orjson.loads(x) for x in output[0].splitlines() if x.startswith(b'{"logger":"embedgate.access"')]
    assert len(lines) == 400  # written once the pipe was read: none lost


def test_serve_starts_with_a_stdout_that_takes_nothing(tmp_path: Path, upstream: FakeUpstream) -> None:
    # The "config ok" line's print raised on a full stdout: a traceback and exit status 1, read as a bad config.
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD)
    port = free_port()
    env = {**os.environ, "UPSTREAM_URL": upstream.url, "TEAM_A_KEY": "sk-a", "OTEL_TRACES_EXPORTER": "none"}
    with open("/dev/full", "wb") as full:
        proc = subprocess.Popen([*EMBEDGATE, "serve", "--config", str(path), "--port", str(port)], env=env,
                                stdout=full, stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_serving(proc, f"http://127.0.0.1:{port}")
        assert embed(f"http://127.0.0.1:{port}").status_code == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err


def test_uvicorn_serves_the_app_on_embedgates_http_protocol(tmp_path: Path, upstream: FakeUpstream) -> None:
    """The README's ``uvicorn 'embedgate:create_app' --factory --http embedgate.serve_protocol:GatewayHttpProtocol``."""
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD)
    port = free_port()
    env = {**os.environ, "UPSTREAM_URL": upstream.url, "TEAM_A_KEY": "sk-a", "OTEL_TRACES_EXPORTER": "none",
           "EMBEDGATE_CONFIG": str(path)}  # fmt: skip
    argv = [sys.executable, "-m", "uvicorn", "embedgate:create_app", "--factory", "--port", str(port),
            "--http", "embedgate.serve_protocol:GatewayHttpProtocol"]  # fmt: skip
    output: list[bytes] = []
    with serving(argv, port, env, output) as url:
        r = embed(url)
        assert r.status_code == 200, r.text
    assert b"Traceback" not in output[0]


def test_serve_refuses_an_unknown_http_protocol(tmp_path: Path) -> None:
    r = subprocess.run([*EMBEDGATE, "serve", "--config", str(tmp_path / "gw.yaml"), "--http", "h3"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2
    assert "--http" in r.stderr and "'h3'" in r.stderr


@pytest.mark.parametrize("value", ["abc", "-1", "inf"])
def test_serve_refuses_a_graceful_shutdown_timeout_that_is_no_number_of_seconds(value: str,
                                                                                capsys: pytest.CaptureFixture[str]
                                                                                ) -> None:  # fmt: skip
    # "abc" was "invalid _seconds value: 'abc'", the name of a function of ours
    with pytest.raises(SystemExit) as exited:
        cli_main(["serve", "--config", "gw.yaml", "--timeout-graceful-shutdown", value])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert f"--timeout-graceful-shutdown: must be a number of seconds >= 0, got {value}" in err, err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_exits_when_the_gateway_cannot_start(tmp_path: Path, workers: str) -> None:
    """An error while the gateway opens its resources (here an unusable proxy URL) stops the server with the
    reason and status 3, rather than serving 500s; the proxy's credentials are not shown. With workers, uvicorn's
    supervisor stopped and exited 0."""
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD.replace(BUDGET, ""))
    env = {**os.environ, "UPSTREAM_URL": "http://127.0.0.1:9/v1", "TEAM_A_KEY": "sk-a", "OTEL_TRACES_EXPORTER": "none",
           "HTTPS_PROXY": "ftp://user:pr0xy-pass@proxy.internal:2121"}  # fmt: skip
    r = subprocess.run([*EMBEDGATE, "serve", "--config", str(path), "--port", str(free_port()), "--workers", workers],
                       capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert r.returncode == 3, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert "https_proxy ftp://proxy.internal:2121: not an http, https or socks5 proxy URL" in out
    assert "Application startup failed" in out
    assert "pr0xy-pass" not in out
    # told as every other line is, one JSON object (it was a console line and a traceback over many lines)
    told = [json.loads(line) for line in r.stdout.splitlines() if "could not start" in line]  # (by each worker)
    assert told and all(t["event"] == "the gateway could not start" and t["level"] == "error" for t in told)
    assert all("not an http, https or socks5 proxy URL" in json.dumps(t["exception"]) for t in told)


def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("keys: {}\n")
    r = subprocess.run([*EMBEDGATE, "serve", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "keys: must be a list" in r.stderr


def test_example_config_is_valid() -> None:
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([*EMBEDGATE, "check-config", str(root / "examples" / "embedgate.yaml")],
                       capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items()
                                                                        if not k.startswith("EMBEDGATE_")})  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_serve_refuses_workers_with_budgets_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD)
    env = {**os.environ, "UPSTREAM_URL": "http://127.0.0.1:9/v1", "TEAM_A_KEY": "sk-a"}
    r = subprocess.run([*EMBEDGATE, "serve", "--config", str(path), "--workers", "2"], capture_output=True,
                       text=True, timeout=60, env=env)  # fmt: skip
    assert r.returncode == 1
    assert "needs redis_url" in r.stderr


def test_serve_with_two_workers_serves(tmp_path: Path, upstream: FakeUpstream) -> None:
    """``--workers 2`` spawns worker processes that take uvicorn's config, the HTTP protocol class included
    (no budget here: in memory, workers would each count their own)."""
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD.replace(BUDGET, ""))
    port = free_port()
    env = {**os.environ, "UPSTREAM_URL": upstream.url, "TEAM_A_KEY": "sk-a", "OTEL_TRACES_EXPORTER": "none"}
    output: list[bytes] = []
    with serving([*EMBEDGATE, "serve", "--config", str(path), "--port", str(port), "--workers", "2"], port, env,
                 output) as url:  # fmt: skip
        for _ in range(6):  # new connections: the kernel spreads them over the workers
            r = embed(url)
            assert r.status_code == 200, r.text
    assert b"Traceback" not in output[0]


def _descendants(pid: int) -> set[int]:
    """The processes below ``pid`` (from /proc: its children's, their children's ...)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = {int(c) for c in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += children - found
            found |= children
    return found


def test_workers_whose_supervisor_was_killed_stop_and_free_the_port(tmp_path: Path, upstream: FakeUpstream) -> None:
    # Killed with SIGKILL (the OOM killer, a process manager escalating), the supervisor left its workers and their
    # export helpers serving for good, unsupervised, on the port: the server could not be started again.
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD.replace(BUDGET, ""))
    port = free_port()
    env = {**os.environ, "UPSTREAM_URL": upstream.url, "TEAM_A_KEY": "sk-a"}
    argv = [*EMBEDGATE, "serve", "--config", str(path), "--port", str(port), "--workers", "2"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_serving(proc, f"http://127.0.0.1:{port}")
        below = _descendants(proc.pid)
        assert len(below) >= 2
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 20
        while below & {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}:
            assert time.monotonic() < deadline, "workers still running after their supervisor was killed"
            time.sleep(0.2)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://:s3cret@cache:6379/0", "starts with redis://"),
        ("redis://:s3cret@cache:6379/zero", "database in the URL must be a number"),
        ("redis://:s3cret@cache:6379/0?socket_timeout=5", "option 'socket_timeout' is not supported"),
        ("redis://:s3cret@cache:6379/0?ssl_cert_reqs=none", "option 'ssl_cert_reqs' is not supported"),
        ("rediss://:s3cret@cache:6379/0?ssl_cert_reqs=maybe", "ssl_cert_reqs in the Redis URL must be"),
        ("redis://:s3cret@cache:99999/0", "port in the URL must be a number"),
        ("unix://:s3cret@", "needs the socket's path"),
    ],
)
def test_bad_redis_urls_are_refused_without_showing_the_url(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"redis_url": url}, env={})
    text = str(info.value)
    assert "redis_url" in text and message in text
    assert "s3cret" not in text and "cache:" not in text


def test_redis_url_forms_that_are_read() -> None:
    from embedgate.resp import parse_url

    plain = parse_url("redis://user:p%40ss@cache.internal:6380/4")
    assert (plain.host, plain.port, plain.db, plain.username, plain.password, plain.tls) == (
        "cache.internal", 6380, 4, "user", "p@ss", False,
    )  # fmt: skip
    assert parse_url("redis://cache?db=3").db == 3 and parse_url("redis://cache").port == 6379
    tls = parse_url("rediss://:pw@cache:6380/0?ssl_cert_reqs=none&ssl_ca_certs=/etc/ca.pem")
    assert tls.tls and tls.cert_reqs == ssl.CERT_NONE and tls.ca_file == "/etc/ca.pem" and tls.username is None
    assert parse_url("rediss://cache").cert_reqs == ssl.CERT_REQUIRED
    sock = parse_url("unix:///run/redis.sock?db=2")
    assert (sock.unix_path, sock.db) == ("/run/redis.sock", 2)
    assert parse_config({"redis_url": "rediss://:pw@cache:6380/1?ssl_cert_reqs=optional"}, env={}).redis_url


def test_a_request_cut_by_the_shutdown_is_a_503_in_its_shape_and_releases_its_reservation(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    # Past --timeout-graceful-shutdown, uvicorn cancels the requests still running: they got a bare text/plain 500
    # (a CancelledError traceback in the log) and their budget reservations stayed taken in Redis.
    redis_url = require_redis()
    workspace = f"ws-stop-{uuid.uuid4().hex[:12]}"
    data = config_dict(upstream.url, redis_url=redis_url)
    data["keys"] = [{"id": "stopper", "key": "sk-stop-0123456789", "workspace": workspace, "project": "p"}]
    data["budgets"] = [{"scope": "workspace", "target": workspace, "period": "daily", "token_limit": 100000}]
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(data))
    upstream.script.append(Fault("slow", delay=8, model="embed-small"))
    port = free_port()
    argv = [*EMBEDGATE, "serve", "--config", str(path), "--port", str(port), "--timeout-graceful-shutdown", "0.5"]
    answers: list[httpx.Response] = []
    with started(argv, {**os.environ, "OTEL_TRACES_EXPORTER": "none"}) as proc:
        wait_serving(proc, f"http://127.0.0.1:{port}")
        body = {"model": "local/embed-small", "input": "a slow one"}
        sender = threading.Thread(target=lambda: answers.append(httpx.post(
            f"http://127.0.0.1:{port}/v2/router/embeddings", json=body,
            headers={"authorization": "Bearer sk-stop-0123456789"}, timeout=20)))  # fmt: skip
        sender.start()
        deadline = time.monotonic() + 5
        while not upstream.calls and time.monotonic() < deadline:  # the request is upstream, its tokens reserved
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        sender.join(timeout=20)
        out, _ = proc.communicate(timeout=20)
    store = redis.Redis.from_url(redis_url)
    counters = store.keys(f"eg:b:workspace:{workspace}:*")
    values = [int(store.get(k) or 0) for k in counters if k.endswith(b":tokens")]
    if counters:
        store.delete(*counters)
    store.close()
    assert len(answers) == 1, out.decode(errors="replace")[-2000:]
    r = answers[0]
    assert r.status_code == 503 and r.headers["content-type"] == "application/json"
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "gateway_stopping" and "param" in r.json()["error"]  # the orq shape
    assert values and all(v == 0 for v in values)  # reserved, then released
    assert b"Traceback" not in out and b'"status":503' in out  # no traceback; the access line was written


def test_the_workers_write_every_access_line_before_they_end(tmp_path: Path, upstream: FakeUpstream) -> None:
    # A worker of --workers N ends by uvicorn's SIGTERM raised again after its shutdown: no exit handler of its
    # runs, and the access lines its log writer still held (the 503s of the requests the shutdown cut) were lost.
    data = config_dict(upstream.url)
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(data))
    upstream.script.extend([Fault("slow", delay=4, model="embed-small")] * 6)
    port = free_port()
    argv = [*EMBEDGATE, "serve", "--config", str(path), "--port", str(port), "--workers", "2",
            "--timeout-graceful-shutdown", "0.5"]  # fmt: skip
    answers: list[httpx.Response] = []
    with started(argv, {**os.environ, "OTEL_TRACES_EXPORTER": "none"}) as proc:
        wait_serving(proc, f"http://127.0.0.1:{port}")
        body = {"model": "local/embed-small", "input": "a slow one"}
        senders = [threading.Thread(target=lambda i=i: answers.append(httpx.post(
            f"http://127.0.0.1:{port}/v1/embeddings", json=body,
            headers={"authorization": f"Bearer {KEY}", "x-request-id": f"cut-{i}"}, timeout=20)))
            for i in range(6)]  # fmt: skip
        for sender in senders:
            sender.start()
        wait_for(lambda: len(upstream.calls) == 6, "the requests to reach the upstream", timeout=10)
        proc.send_signal(signal.SIGTERM)
        for sender in senders:
            sender.join(timeout=20)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and [r.status_code for r in answers] == [503] * 6
    lines = [orjson.loads(x) for x in out.splitlines() if x.startswith(b'{"logger":"embedgate.access"')]
    assert sorted(line["request_id"] for line in lines) == [f"cut-{i}" for i in range(6)], out.decode()[-3000:]


def test_serve_runs_with_stdout_and_stderr_closed(tmp_path: Path, upstream: FakeUpstream) -> None:
    # `embedgate serve ... >&- 2>&-`: uvicorn's log setup failed on the missing stdout (a traceback, exit 1).
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD)
    port = free_port()
    env = {**os.environ, "UPSTREAM_URL": upstream.url, "TEAM_A_KEY": "sk-a", "OTEL_TRACES_EXPORTER": "none"}
    proc = subprocess.Popen([*EMBEDGATE, "serve", "--config", str(path), "--port", str(port)], env=env,
                            stdin=subprocess.DEVNULL, preexec_fn=lambda: (os.close(1), os.close(2)))  # fmt: skip
    try:
        wait_serving(proc, f"http://127.0.0.1:{port}")
        assert embed(f"http://127.0.0.1:{port}").status_code == 200
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_stops_taking_connections_at_sigterm_and_exits_0_once_drained(
    tmp_path: Path, upstream: FakeUpstream, workers: str
) -> None:
    # With workers, uvicorn's supervisor held the listening socket until the last worker had drained: the kernel
    # accepted connections no worker would read, reset seconds later. With one worker, the process ended by the
    # SIGTERM that uvicorn raised again once done (status 143), where workers exited 0.
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD.replace(BUDGET, ""))
    upstream.script.append(Fault("slow", delay=4, model="embed-small"))
    port = free_port()
    argv = [*EMBEDGATE, "serve", "--config", str(path), "--port", str(port), "--workers", workers]
    env = {**os.environ, "UPSTREAM_URL": upstream.url, "TEAM_A_KEY": "sk-a", "OTEL_TRACES_EXPORTER": "none"}
    with started(argv, env) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_serving(proc, url)
        sender, answers = embed_in_flight(url, upstream)  # it waits on the slow upstream
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 3  # well before the request in flight ends (4 s)
        while True:  # until every worker has heard: then a connection is refused, not accepted and held
            try:
                httpx.get(f"{url}/healthz", timeout=0.5)
            except httpx.TimeoutException:  # accepted and held: what this test is about, if it lasts
                pass
            except httpx.TransportError:  # refused; or, arriving just as a worker closed its listener, reset
                break
            assert time.monotonic() < deadline, "connections were still taken"
            time.sleep(0.1)
        sender.join(timeout=20)
        out, _ = proc.communicate(timeout=30)
    assert [r.status_code for r in answers] == [200]  # the request in flight finished
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]


def test_a_worker_that_cannot_build_the_gateway_is_a_startup_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The config checked by `serve` may change on disk before a worker reads it: uvicorn's supervisor started a
    # worker whose app raised again and again, and the server neither served nor exited.
    from embedgate.cli import served_app

    path = tmp_path / "gw.yaml"
    path.write_text("keys: {}\n")
    monkeypatch.setenv("EMBEDGATE_CONFIG", str(path))
    with pytest.raises(SystemExit) as stop:
        served_app()
    assert stop.value.code == 3
    assert "keys: must be a list" in capsys.readouterr().err
    monkeypatch.setenv("EMBEDGATE_SERVE_SERVING", "1")  # once the server has served: one worker's failure only
    with pytest.raises(SystemExit) as stop:
        served_app()
    assert stop.value.code == 1


def test_a_worker_replaced_while_the_config_on_disk_is_broken_does_not_stop_the_others(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    # A worker that died (OOM-killed, say) while the file was being edited was replaced by one that could not
    # build the app: taken for a startup failure, it stopped the whole server, healthy workers included.
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD.replace(BUDGET, ""))
    port = free_port()
    env = {**os.environ, "UPSTREAM_URL": upstream.url, "TEAM_A_KEY": "sk-a", "OTEL_TRACES_EXPORTER": "none"}
    env.pop("EMBEDGATE_SERVE_SERVING", None)
    argv = [*EMBEDGATE, "serve", "--config", str(path), "--port", str(port), "--workers", "2"]
    with started(argv, env) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_serving(proc, url)
        time.sleep(1.5)  # the supervisor has looked at its workers
        path.write_text("keys: {}\n")
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True,
                                                    check=False).stdout.split()]  # fmt: skip
        served = [pid for pid in workers if Path(f"/proc/{pid}/cmdline").read_bytes().count(b"multiprocessing") and
                  b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]  # fmt: skip
        assert len(served) == 2, workers
        os.kill(served[0], signal.SIGKILL)
        # Replaced by one that fails to build the app, again and again: a second failure shows that the supervisor
        # took the first for a worker's, not a startup failure. (A 3 s sleep was too short where starting a worker
        # takes seconds: the message was not out yet.)
        seen = bytearray()
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while seen.count(b"keys: must be a list") < 2:
            assert proc.poll() is None, seen.decode(errors="replace")[-2000:]
            assert time.monotonic() < deadline, seen.decode(errors="replace")[-2000:]
            if select.select([proc.stdout], [], [], 0.5)[0]:
                seen += os.read(proc.stdout.fileno(), 65536)
        assert proc.poll() is None
        assert all(embed(url).status_code == 200 for _ in range(4))  # the other worker serves
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        out = bytes(seen) + out
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]


def test_serve_refuses_a_metrics_directory_it_cannot_write(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD.replace(BUDGET, ""))
    env = {**os.environ, "UPSTREAM_URL": "http://127.0.0.1:9/v1", "TEAM_A_KEY": "sk-a",
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "missing")}  # fmt: skip
    r = subprocess.run([*EMBEDGATE, "serve", "--config", str(path), "--workers", "2"], capture_output=True,
                       text=True, timeout=60, env=env)  # fmt: skip
    assert r.returncode == 1
    assert f"PROMETHEUS_MULTIPROC_DIR={tmp_path / 'missing'} is not a writable directory" in r.stderr


def test_serve_with_workers_removes_its_metrics_directory(tmp_path: Path, upstream: FakeUpstream) -> None:
    # Each --workers run left a /tmp/embedgate-metrics-* directory of per-worker files behind.
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "UPSTREAM_URL": upstream.url,
        "TEAM_A_KEY": "sk-a",
        "OTEL_TRACES_EXPORTER": "none",
        "TMPDIR": str(scratch),
        "EMBEDGATE_TEST_REDIS": require_redis(),
    }  # workers share budgets in Redis
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    argv = [*EMBEDGATE, "serve", "--config", str(path), "--port", str(port), "--workers", "2"]
    with serving(argv, port, env) as url:
        assert embed(url).status_code == 200
        assert [p.name[:18] for p in scratch.iterdir()] == ["embedgate-metrics-"]
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/v1#part", "https://user:s3cret@api.example/v1"])
def test_a_base_url_with_a_fragment_or_credentials_is_refused(url: str) -> None:
    # Both were taken and dropped without a word: a fragment is never sent, nor is a URL's user:password.
    with pytest.raises(ConfigError) as bad:
        parse_config({"providers": {"p": {"type": "openai_compatible", "base_url": url}}}, env={})
    assert any(e.startswith("providers.p.base_url: must hold no fragment") for e in bad.value.errors)
    assert "s3cret" not in str(bad.value)
    # a query is kept (Azure's api-version), and an "@" in the path is no credential
    for fine, kept in (("https://x.example/openai/deployments/d?api-version=2024-02-01", None),
                       ("http://x.example/v1/@team/", "http://x.example/v1/@team"),
                       ("https://x.example?sig=a@b", None),  # an "@" in the query is no credential
                       ("https://x.example/v1?next=/", None)):  # the query kept whole (its "/" was cut)  # fmt: skip
        config = parse_config({"providers": {"p": {"type": "openai", "base_url": fine}}}, env={})
        assert config.providers["p"].base_url == (kept or fine)


def test_interpolation_reads_as_the_shell_and_refuses_what_it_cannot_read() -> None:
    base = {"providers": {"p": {"type": "openai_compatible", "base_url": "${URL:-http://127.0.0.1:9/v1}"}}}
    # ":-" takes the default for an empty variable too (as the shell and docker compose do)
    assert parse_config(base, env={"URL": ""}).providers["p"].base_url == "http://127.0.0.1:9/v1"
    assert parse_config(base, env={"URL": "http://x:1/v1"}).providers["p"].base_url == "http://x:1/v1"
    for written in ("${K2-fallback}", "${K:default}", "${ K }", "${K:?msg}", "prefix ${K"):
        # kept as literal text before, here as a client key's secret
        with pytest.raises(ConfigError) as bad:
            parse_config({**base, "keys": [{"id": "a", "key": written}]}, env={"K": "sk-from-env"})
        assert any(e.startswith("keys[0].key: a '${' that is not") for e in bad.value.errors), bad.value.errors
        assert "sk-from-env" not in str(bad.value)
    # one error, not a second saying the value it left empty is required
    with pytest.raises(ConfigError) as bad:
        parse_config({"providers": {"p": {"type": "openai_compatible", "base_url": "${URL-x}"}}}, env={})
    assert [e.partition(":")[0] for e in bad.value.errors] == ["providers.p.base_url"], bad.value.errors


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({"budgets": [{"scope": "api_key", "target": "a", "amount_usd": float("inf")}]}, "budgets[0].amount_usd"),
        ({"budgets": [{"scope": "api_key", "target": "a", "amount_usd": 1e308}]}, "budgets[0].amount_usd"),
        ({"models": {"p/m": {"price_per_million_tokens": float("inf")}}}, "models.p/m.price_per_million_tokens"),
        ({"cache": {"default_ttl": 10**20, "max_ttl": 10**20}}, "cache.default_ttl"),
        ({"server": {"max_body_bytes": "9" * 5000}}, "server.max_body_bytes"),
        # read as 2048 all the same: a setting that did nothing, without a word
        ({"models": {"p/m": {"max_request_inputs": 3}}}, "models.p/m.max_request_inputs"),
        ({"server": {"max_in_flight": -1}}, "server.max_in_flight"),
    ],
    ids=[
        "amount-inf",
        "amount-1e308",
        "price-inf",
        "ttl-1e20",
        "5000-digits",
        "request-inputs-under-2048",
        "negative-in-flight",
    ],
)
def test_numbers_out_of_any_use_are_config_errors(changes: dict[str, Any], path: str) -> None:
    # Accepted before: an infinite amount or price failed every budgeted request as a 500 (OverflowError), a TTL
    # of 1e20 s every Redis cache write, a 5000-digit integer was a traceback.
    data = {"providers": {"p": {"type": "openai_compatible", "base_url": "http://127.0.0.1:9/v1"}},
            "keys": [{"id": "a", "key": "sk-a"}], **changes}  # fmt: skip
    with pytest.raises(ConfigError) as bad:
        parse_config(data, env={})
    assert any(e.startswith(path + ":") for e in bad.value.errors), bad.value.errors


def test_a_file_that_is_not_utf8_or_holds_a_huge_number_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b'server:\n  path_prefix: "/\xff"\n')
    huge = tmp_path / "huge.yaml"
    huge.write_text("server:\n  max_body_bytes: " + "9" * 5000 + "\n")
    for path, said in ((latin, "is not UTF-8"), (huge, "server.max_body_bytes: is a number 5000 characters long")):
        r = subprocess.run([*EMBEDGATE, "check-config", str(path)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and said in r.stdout + r.stderr and "Traceback" not in r.stdout + r.stderr


@pytest.mark.parametrize(
    "flags",
    [["--port", "99999"], ["--port", "0"], ["--workers", "0"], ["--log-level", "bogus"]],
    ids=["port-99999", "port-0", "workers-0", "log-level"],
)
def test_serve_refuses_flags_out_of_range(tmp_path: Path, flags: list[str]) -> None:
    # --port 99999 served on another port than it said, --workers 0 ran one, --log-level bogus was a traceback.
    path = tmp_path / "gw.yaml"
    path.write_text("providers: {}\n")
    r = subprocess.run([*EMBEDGATE, "serve", "--config", str(path), *flags], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 2 and f"argument {flags[0]}" in r.stderr and "Traceback" not in r.stderr


def test_usage_cli_never_prints_the_urls_password_nor_a_traceback() -> None:
    for url in ("http://user:pa55word@[::1", "http://user:pa55word@127.0.0.1:9", "http://admin:pa55/word@127.0.0.1:9"):
        r = subprocess.run([*EMBEDGATE, "usage", "--url", url, "--admin-key", "k"], capture_output=True, text=True,
                           timeout=60)  # fmt: skip
        assert r.returncode == 1 and "cannot reach http://" in r.stderr
        assert "pa55" not in r.stderr and "Traceback" not in r.stderr


def test_a_budget_whose_target_no_key_has_is_an_error() -> None:
    # A typo (team-A for team-a) made a hard gate that never applied, and check-config said ok.
    keys = [{"id": "team-a", "key": "sk-a", "workspace": "acme", "project": "search"}]
    for scope, target in (("api_key", "team-A"), ("workspace", "acme-corp"), ("project", "acme/serch")):
        with pytest.raises(ConfigError) as bad:
            parse_config({"keys": keys, "budgets": [{"scope": scope, "target": target, "token_limit": 5}]}, env={})
        assert bad.value.errors == [f"budgets[0].target: no key has the {dict(api_key='key id').get(scope, scope)} "
                                    f"'{target}', so this budget never applies"]  # fmt: skip
    for scope, target in (("api_key", "team-a"), ("workspace", "acme"), ("project", "search"),
                          ("project", "acme/search"), ("api_key", "*"), ("identity", "anyone")):  # fmt: skip
        parse_config({"keys": keys, "budgets": [{"scope": scope, "target": target, "token_limit": 5}]}, env={})


def test_a_whole_number_in_exponent_form_is_a_count_and_a_refused_limit_is_said_once(tmp_path: Path) -> None:
    # PyYAML reads 1e3 as a string: token_limit refused it as "a string" (amount_usd took it), and added that the
    # budget "sets no limit".
    path = tmp_path / "gw.yaml"
    keys = "keys: [{id: a, key: sk-a}]\n"
    path.write_text(keys + "budgets: [{scope: api_key, target: a, token_limit: 1e3, requests_per_minute: 2.5E+1}]\n")
    (budget,) = load_config(path, env={}).budgets
    assert (budget.token_limit, budget.requests_per_minute) == (1000, 25)
    for inexact in ("2.5e0", "1e-400", "1.00000000000000001e3"):  # no whole number, or not the one written
        path.write_text(keys + f"budgets: [{{scope: api_key, target: a, token_limit: {inexact}}}]\n")
        with pytest.raises(ConfigError) as bad:
            load_config(path, env={})
        assert [e.split(",")[0] for e in bad.value.errors] == ["budgets[0].token_limit: must be an integer"], inexact
    path.write_text(keys + "budgets: [{scope: api_key, target: a, token_limit: '${LIMIT}'}]\n")  # unset: said once
    with pytest.raises(ConfigError) as bad:
        load_config(path, env={})
    assert bad.value.errors == ["budgets[0].token_limit: environment variable LIMIT is not set (use ${LIMIT:-})"]
    path.write_text(keys + "budgets: [{scope: api_key, target: a, token_limit: lots}]\n")
    with pytest.raises(ConfigError) as bad:
        load_config(path, env={})
    assert [e.split(",")[0] for e in bad.value.errors] == ["budgets[0].token_limit: must be an integer"]


def test_a_budget_on_a_provider_or_model_that_cannot_be_asked_for_is_an_error() -> None:
    # A provider target that names no provider (openAI for openai), or a model whose prefix is no provider, never
    # applied: check-config said ok.
    base = {"providers": {"openai": {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": "sk-p"}},
            "models": {"team/embed": {"deployments": [{"provider": "openai", "upstream_model": "m"}]}}}  # fmt: skip
    for scope, target, said in (("provider", "openAI", "no provider 'openAI' is configured"),
                                ("model", "azure/text-embedding-3-small", "no model 'azure/text-embedding-3-small'"),
                                ("model", "text-embedding-3-small", "no model 'text-embedding-3-small'"),
                                ("model", "openai", "no model 'openai'"),  # a provider's name alone was taken
                                ("model", "openai/", "no model 'openai/'")):  # fmt: skip
        with pytest.raises(ConfigError) as bad:
            parse_config({**base, "budgets": [{"scope": scope, "target": target, "token_limit": 5}]}, env={})
        assert len(bad.value.errors) == 1 and bad.value.errors[0].startswith(f"budgets[0].target: {said}")
        assert bad.value.errors[0].endswith("so this budget never applies")
    for scope, target in (("provider", "openai"), ("provider", "team"), ("model", "openai/made-up"),
                          ("model", "team/embed"), ("model", "*"), ("provider", "*")):  # fmt: skip
        parse_config({**base, "budgets": [{"scope": scope, "target": target, "token_limit": 5}]}, env={})


def test_yaml_merge_keys_are_read_and_a_key_that_is_no_scalar_is_an_error(tmp_path: Path) -> None:
    # "<<: *anchor" (valid YAML, which PyYAML's safe loader merges) was refused; "? [a, b]" was a traceback.
    merged = tmp_path / "merged.yaml"
    merged.write_text("providers:\n  a: &base {type: openai_compatible, base_url: 'http://127.0.0.1:9/v1', "
                      "timeout_ms: 5}\n  b:\n    <<: *base\n    base_url: 'http://127.0.0.1:8/v1'\n")  # fmt: skip
    config = load_config(merged, env={})
    assert (config.providers["b"].base_url, config.providers["b"].timeout_ms) == ("http://127.0.0.1:8/v1", 5)
    complex_key = tmp_path / "complex.yaml"
    complex_key.write_text("providers:\n  ? [a, b]\n  : {type: openai}\n")
    with pytest.raises(ConfigError) as bad:
        load_config(complex_key, env={})
    assert "a mapping key must be a scalar" in str(bad.value)


@pytest.mark.parametrize("url", ["http://[::1/v1", "http://127.0.0.1:abc/v1", "http://127.0.0.1:99999/v1",
                                 "http://127.0.0.1:9/v 1"])  # fmt: skip
def test_a_base_url_no_client_can_reach_is_a_config_error(url: str) -> None:
    # check-config said ok; serve then stopped with a traceback and no YAML path (or every request was a 502).
    with pytest.raises(ConfigError) as bad:
        parse_config({"providers": {"p": {"type": "openai", "base_url": url}}}, env={})
    assert bad.value.errors == [
        "providers.p.base_url: must be an http(s) URL with a valid host and port (1-65535), and no blanks"
    ]
    parse_config({"providers": {"p": {"type": "openai", "base_url": "http://[::1]:8000/v1"}}}, env={})


def test_a_default_may_itself_be_a_variable_as_in_docker_compose() -> None:
    # "${TEAM_A_KEY:-${DEV_KEY}}" was read up to the inner "}": the key became "sk-team-a}" (or "${DEV_KEY}" as text).
    data = {"keys": [{"id": "a", "key": "${TEAM_A_KEY:-${DEV_KEY}}"}]}
    assert parse_config(data, env={"TEAM_A_KEY": "sk-team-a"}).keys[0].sha256 == hash_key("sk-team-a")
    assert parse_config(data, env={"DEV_KEY": "sk-dev"}).keys[0].sha256 == hash_key("sk-dev")
    assert parse_config(data, env={"TEAM_A_KEY": "", "DEV_KEY": "sk-dev"}).keys[0].sha256 == hash_key("sk-dev")
    with pytest.raises(ConfigError) as bad:  # neither set: the inner one is reported
        parse_config(data, env={})
    assert bad.value.errors[0] == "keys[0].key: environment variable DEV_KEY is not set (use ${DEV_KEY:-})"
    deep = {"keys": [{"id": "a", "key": "${A:-${B:-sk}-${C:-x}}!"}]}
    assert parse_config(deep, env={"C": "y"}).keys[0].sha256 == hash_key("sk-y!")


def test_a_key_given_twice_or_a_value_glued_to_its_key_is_an_error(tmp_path: Path) -> None:
    twice = tmp_path / "twice.yaml"
    twice.write_text("providers:\n  p:\n    type: openai\n    timeout_ms: 5\n    timeout_ms: 6\n")
    with pytest.raises(ConfigError) as bad:
        load_config(twice, env={})
    assert "the key 'timeout_ms' is given twice" in str(bad.value)  # the last one silently won
    # Each named by its path, with the config's other errors, all at once (the first one alone was told, by line).
    twice.write_text(
        "providers:\n  s: {type: openai}\n  s: {type: openai}\nservr: {}\n"
        "keys: [{id: a, key: sk-aaa, key: sk-bbb}, {id: b, key:sk-live-SECRET1, key:sk-live-SECRET1}]\n"
    )
    with pytest.raises(ConfigError) as bad:
        load_config(twice, env={})
    assert bad.value.errors[:3] == ["providers.s: the key 's' is given twice (line 3)",
                                    "keys[0].key: the key 'key' is given twice (line 5)",
                                    "keys[1]: a key (not shown: it holds ':') is given twice (line 5)"]  # fmt: skip
    assert "servr: unknown key" in bad.value.errors and "SECRET1" not in str(bad.value)
    # One key in two spellings (as YAML reads it, or as the config names it); a duplicate in an anchored block named
    # where it is written, and a merge's keys under the mapping they merge into (and overriding them is allowed).
    for spelling, line in (("1:", 2), ("0x1:", 3), ('"1":', 3)):
        twice.write_text(f"providers:\n  1: {{type: openai}}\n  {spelling} {{type: openai}}\n" if line == 3 else
                         "providers:\n  1: {type: openai, type: openai}\n")  # fmt: skip
        with pytest.raises(ConfigError) as bad:
            load_config(twice, env={})
        assert any(e.startswith("providers.") and f"given twice (line {line})" in e for e in bad.value.errors), (
            spelling, bad.value.errors)  # fmt: skip
    twice.write_text("x-a: &a {type: openai, timeout_ms: 5, timeout_ms: 6}\nx-b: &b {base_url: 'http://a.example'}\n"
                     "providers:\n  p: *a\n  q: {<<: [*a, *b], type: openai_compatible, type: openai}\n")  # fmt: skip
    with pytest.raises(ConfigError) as bad:
        load_config(twice, env={})
    assert [e for e in bad.value.errors if "given twice" in e] == [
        "x-a.timeout_ms: the key 'timeout_ms' is given twice (line 1)",
        "providers.q.type: the key 'type' is given twice (line 5)",
    ]
    twice.write_text("x-a: &a {type: openai, base_url: 'http://a.example'}\nproviders:\n  q: {<<: *a, type: openai}\n")
    load_config(twice, env={})
    glued = tmp_path / "glued.yaml"  # no space after "key:": one key named "key:sk-live-..."
    glued.write_text("keys:\n  - {id: a, key:sk-live-SECRET2}\n")
    with pytest.raises(ConfigError) as bad:
        load_config(glued, env={})
    assert "keys[0]: an unknown key (not shown: it holds ':'; did you mean `key: ...`?)" in bad.value.errors
    assert "SECRET2" not in str(bad.value)


def test_a_secret_written_as_a_yaml_number_is_an_error(tmp_path: Path) -> None:
    # YAML reads 0777 as 511 and 1.10 as 1.1: the key was silently another than the one the client sends.
    path = tmp_path / "numbers.yaml"
    path.write_text("providers:\n  p: {type: openai, base_url: 'http://127.0.0.1:9/v1', api_key: 0777}\n"
                    "keys:\n  - {id: a, key: 1.10}\nadmin: {key: 123456}\n")  # fmt: skip
    with pytest.raises(ConfigError) as bad:
        load_config(path, env={})
    said = "\n".join(bad.value.errors)
    for where in ("providers.p.api_key", "keys[0].key", "admin.key"):
        assert f"{where}: must be a string (quote it" in said
    assert "511" not in said and "1.1" not in said and "123456" not in said


def test_an_error_about_a_value_from_the_environment_does_not_show_it() -> None:
    # `type: ${OPENAI_API_KEY}` (a slip of the variable) printed the key in check-config's and serve's output.
    secret = "sk-live-1234567890abcdef"
    doc = {
        "server": {"path_prefix": "${S}", "unknown_fields": "${S}"},
        "providers": {
            "p": {"type": "${S}", "base_url": "${S}", "api_key": "k"},
            "q": {"type": "openai", "base_url": "https://${S}", "api_key": "k"},
        },
        "cache": {"enabled_by_default": "${S}", "default_ttl": "${S}"},
        "models": {"p/m": {"deployments": [{"provider": "${S}"}]}},
        "keys": [{"id": "${S}", "key": "k1"}, {"id": "${S}", "key": "k2"}],
        "budgets": [
            {"scope": "workspace", "target": "*", "amount_usd": "${S}"},
            *({"scope": scope, "target": "${S}", "token_limit": 1} for scope in ("workspace", "provider", "model")),
        ],
    }
    with pytest.raises(ConfigError) as bad:
        parse_config(doc, env={"S": secret})
    text = str(bad.value)
    assert secret not in text and "1234567890" not in text
    for path in ("server.path_prefix", "server.unknown_fields", "providers.p.type", "providers.p.base_url",
                 "cache.enabled_by_default", "budgets[0].amount_usd", "models.p/m.deployments[0].provider",
                 "keys[1].id", "budgets[1].target", "budgets[2].target", "budgets[3].target"):  # fmt: skip
        (line,) = [e for e in bad.value.errors if e.startswith(f"{path}: ")]
        assert "a value from the environment (not shown)" in line, line
    # written in the file, a bad value is shown: the operator sees what to fix
    with pytest.raises(ConfigError) as bad:
        parse_config({"providers": {"p": {"type": "opnai", "base_url": "http://h/v1"}}}, env={})
    assert bad.value.errors == ["providers.p.type: must be one of openai, openai_compatible, got 'opnai'"]


def test_a_key_an_http_header_cannot_carry_is_an_error(tmp_path: Path) -> None:
    # "sk-é" never matched (a header arrives as bytes, read as latin-1); a key from a secret file with its newline
    # ("sk-a\n") neither; hash-key printed a traceback for a non-UTF-8 argument.
    for bad in ("sk-é", "sk-a\n", "sk a"):
        with pytest.raises(ConfigError) as err:
            parse_config({"keys": [{"id": "a", "key": "${K}"}], "admin": {"key": bad}}, env={"K": bad})
        assert [e.split(":")[0] for e in err.value.errors if "visible ASCII" in e] == ["keys[0].key", "admin.key"]
    r = subprocess.run([*EMBEDGATE, "hash-key", "sk-\udcff"], capture_output=True, text=True, timeout=60,
                       errors="surrogateescape")  # fmt: skip
    assert r.returncode == 2 and "visible ASCII" in r.stderr and "Traceback" not in r.stderr
    assert subprocess.run([*EMBEDGATE, "hash-key", "sk-ok"], capture_output=True, text=True, timeout=60).stdout == (
        hashlib.sha256(b"sk-ok").hexdigest() + "\n"
    )


def test_a_yaml_structure_that_contains_itself_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text("keys: &a [{id: x, key: sk-x, extra: *a}]\n")
    r = subprocess.run([*EMBEDGATE, "check-config", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "contains itself" in r.stdout + r.stderr and "Traceback" not in r.stderr


def served_workers(supervisor: int) -> set[int]:
    """The worker processes of ``embedgate serve --workers N`` (its multiprocessing children, not the tracker)."""
    children = subprocess.run(["pgrep", "-P", str(supervisor)], capture_output=True, text=True, check=False)
    workers = set()
    for pid in map(int, children.stdout.split()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # it ended meanwhile
            continue
        if b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
            workers.add(pid)
    return workers


def listed_models(url: str) -> list[str]:
    r = httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer sk-a"}, timeout=10)
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["data"]]


def test_sighup_and_sigttin_with_one_worker_are_logged_and_the_server_goes_on(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    # SIGHUP's default action ended the process at once (a request in flight cut, its reservation left taken):
    # `systemctl reload` or a terminal closing took the gateway down.
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD)
    upstream.script.append(Fault("slow", delay=1.5, model="embed-small"))
    port = free_port()
    argv = [*EMBEDGATE, "serve", "--config", str(path), "--port", str(port)]
    env = {**os.environ, "UPSTREAM_URL": upstream.url, "TEAM_A_KEY": "sk-a", "OTEL_TRACES_EXPORTER": "none"}
    with started(argv, env) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_serving(proc, url)
        sender, answers = embed_in_flight(url, upstream)
        proc.send_signal(signal.SIGHUP)
        sender.join(timeout=20)
        assert [r.status_code for r in answers] == [200]
        assert proc.poll() is None
        assert embed(url).status_code == 200
        proc.send_signal(signal.SIGTTIN)  # its default action stopped the process: no answer any more
        assert embed(url).status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    assert b"Received SIGHUP: with --workers 1 there is no worker to replace" in out
    assert b"Received SIGTTIN: with --workers 1 workers are added and removed only with --workers 2" in out


def test_sighup_with_workers_replaces_them_with_the_config_on_disk_and_keeps_them_if_it_is_broken(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """uvicorn's supervisor replaces each worker once its replacement serves: a reload of the config file without
    a refused connection; a replacement that cannot build the app leaves the old workers serving."""
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD.replace(BUDGET, ""))
    port = free_port()
    argv = [*EMBEDGATE, "serve", "--config", str(path), "--port", str(port), "--workers", "2"]
    env = {**os.environ, "UPSTREAM_URL": upstream.url, "TEAM_A_KEY": "sk-a", "OTEL_TRACES_EXPORTER": "none"}
    env.pop("EMBEDGATE_SERVE_SERVING", None)
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_serving(proc, url)
        wait_for(lambda: len(served_workers(proc.pid)) == 2, "two workers")
        first = served_workers(proc.pid)
        assert "local/embed-large" not in listed_models(url)
        path.write_text(GOOD.replace(BUDGET, "").replace(
            "models:\n", "models:\n  local/embed-large: {price_per_million_tokens: 0.13}\n"))  # fmt: skip
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(served_workers(proc.pid)) == 2 and not served_workers(proc.pid) & first,
                 "both workers replaced")  # fmt: skip
        assert all("local/embed-large" in listed_models(url) for _ in range(6))
        second = served_workers(proc.pid)
        path.write_text("keys: {}\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: b"aborting the restart" in log.read_bytes(), "the restart to be given up")
        assert served_workers(proc.pid) == second
        assert all("local/embed-large" in listed_models(url) for _ in range(6))
        assert embed(url).status_code == 200
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_bytes()
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    assert b"keys: must be a list" in out and b"Traceback" not in out
