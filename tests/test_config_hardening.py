"""The config loader against what a typo, a hostile file or YAML's own reading makes of a config: every problem is
an error naming its YAML path, quickly, without a traceback and without showing a secret."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedgate.config import ConfigError, load_config, parse_config

EMBEDGATE = [sys.executable, "-m", "embedgate.cli"]
PROVIDER = "providers:\n  local: {type: openai_compatible, base_url: 'http://127.0.0.1:9/v1'}\n"
KEYS = "keys:\n  - {id: a, key: sk-aaaaaaaa}\n"
SECRET = "sk-SUPERSECRET123"


def errors_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as bad:
        load_config(path, env={} if env is None else env)
    return bad.value.errors


def test_aliases_of_aliases_are_refused_at_once(tmp_path: Path) -> None:
    # 454 bytes that write out as ten million values took 10 s and 265 MB; one more line never finished.
    lines = ["x-l0: &l0 [" + ", ".join(["aaaaaaaaaa"] * 10) + "]"]
    lines += [f"x-l{n}: &l{n} [" + ", ".join([f"*l{n - 1}"] * 10) + "]" for n in range(1, 7)]
    started = time.monotonic()
    assert errors_of(tmp_path, "\n".join(lines) + "\n") == [
        "x-l5: its aliases write it out as more than 1,000,000 values (aliases of aliases multiply); no config needs "
        "so many"
    ]
    assert time.monotonic() - started < 3
    # A hundred thousand values are read, and aliased blocks without any ${...} are not copied for each alias.
    started = time.monotonic()
    load_config(_write(tmp_path, PROVIDER + KEYS + "\n".join(lines[:5]) + "\n"), env={})
    assert time.monotonic() - started < 3


def test_an_aliased_block_is_read_at_each_place_it_is_used() -> None:
    # Each use is its own path: an error names it, and a value from the environment stays hidden at every one.
    block = {"type": "${T}", "base_url": "http://127.0.0.1:9/v1"}
    with pytest.raises(ConfigError) as bad:
        parse_config({"providers": {"a": block, "b": block}}, env={"T": SECRET})
    assert [e.split(": ")[0] for e in bad.value.errors] == ["providers.a.type", "providers.b.type"]
    assert SECRET not in str(bad.value) and "a value from the environment (not shown)" in bad.value.errors[1]
    loop: list[object] = [{"id": "x"}]
    loop.append(loop)
    with pytest.raises(ConfigError) as bad:
        parse_config({"keys": loop}, env={})
    assert bad.value.errors == ["keys[1]: a structure that contains itself (an alias inside its own anchor)"]


@pytest.mark.parametrize(
    ("yaml_text", "error"),
    [
        ("keys:\n  - {id: a, key=" + SECRET + "}\n", "keys[0]: an unknown key (not shown: it holds '='; did you mean "
         "`key: ...`?)"),
        ("keys:\n  - {id: a, key " + SECRET + "}\n", "keys[0]: an unknown key (not shown: it holds a space; did you "
         "mean `key: ...`?)"),
        ("admin: {key=" + SECRET + "}\n", "admin: an unknown key (not shown: it holds '='; did you mean `key: ...`?)"),
        ("providers:\n  local: {type: openai, base_url: 'http://h:1/v1', api_key=" + SECRET + "}\n",
         "providers.local: an unknown key (not shown: it holds '='; did you mean `api_key: ...`?)"),
        ("server: {" + "s" * 80 + ": 1}\n", "server: an unknown key (not shown: it is 80 characters long)"),
        ("providers:\n  local: {type: openai, base_url: 'http://h:1/v1', headers: {api-key=" + SECRET + "}}\n",
         "providers.local.headers: a name that is no HTTP header name (not shown: it holds '='; did you mean "
         "`api-key: ...`?)"),
        ("providers:\n  local: {type: openai, base_url: 'http://h:1/v1', headers: {'Authorization Bearer " + SECRET
         + "': x}}\n", "providers.local.headers: a name that is no HTTP header name (not shown: it holds a space; did "
         "you mean `Authorization: ...`?)"),
        ("server: {colour: 1}\n", "server.colour: unknown key"),  # a plain name is shown
    ],
    ids=["key=", "key-space", "admin-key=", "api_key=", "long", "header=", "header-space", "plain"],
)  # fmt: skip
def test_a_key_holding_a_value_glued_to_it_is_not_shown(tmp_path: Path, yaml_text: str, error: str) -> None:
    # "keys[0].key=sk-SUPERSECRET123: unknown key" printed the secret (only "key:sk-..." was hidden).
    errors = errors_of(tmp_path, yaml_text)
    assert error in errors
    assert SECRET not in "\n".join(errors)


def test_a_variable_in_a_mapping_key_is_read_as_in_a_value(tmp_path: Path) -> None:
    # "local/${M}" stayed that text as a model id, while a budget's target "local/${M}" became "local/embed".
    text = (PROVIDER + KEYS + "models:\n  local/${M}: {max_inputs: 5}\n"
            "budgets:\n  - {scope: model, target: 'local/${M}', amount_usd: 1}\n")  # fmt: skip
    config = load_config(_write(tmp_path, text), env={"M": "embed"})
    assert list(config.models) == ["local/embed"] and config.models["local/embed"].max_inputs == 5
    assert config.budgets[0].target == "local/embed"
    assert errors_of(tmp_path, text) == [
        "models.local/${M}: environment variable M is not set (use ${M:-})",
        "budgets[0].target: environment variable M is not set (use ${M:-})",
    ]
    twice = PROVIDER + KEYS + "models:\n  local/embed: {}\n  local/${M}: {}\n"
    assert errors_of(tmp_path, twice, env={"M": "embed"}) == [
        "models.local/${M}: the same key as 'local/embed' once their ${...} are read (a key given twice)"
    ]


def test_dollar_dollar_is_a_dollar_as_in_docker_compose() -> None:
    # No "${" could be written: it was always read as a variable.
    def name(value: str, env: dict[str, str] | None = None) -> str:
        return parse_config({"telemetry": {"service_name": value}}, env=env or {}).telemetry.service_name

    assert name("$${X}") == "${X}"
    assert name("a$$b") == "a$b"
    assert name("a$b$") == "a$b$"  # a "$" that opens nothing stays
    assert name("$$${X}", {"X": "v"}) == "$v"
    assert name("${X:-$$}") == "$"
    with pytest.raises(ConfigError) as bad:  # an escaped "${" is text, shown as written
        parse_config({"providers": {"p": {"type": "$${X}", "base_url": "http://h:1/v1"}}}, env={})
    assert bad.value.errors == ["providers.p.type: must be one of openai, openai_compatible, got '${X}'"]


def test_a_value_yaml_cannot_read_is_an_error_at_its_path(tmp_path: Path) -> None:
    # Each was "<yaml>: ..." or "<yaml ?>: ... position 148", without a path; the huge number named
    # sys.set_int_max_str_digits().
    config = load_config(_write(tmp_path, PROVIDER + KEYS + "telemetry: {service_name: 2024-02-30}\n"), env={})
    assert config.telemetry.service_name == "2024-02-30"  # no setting is a date: a date is text
    config = load_config(_write(tmp_path, PROVIDER + KEYS + "telemetry: {service_name: 2024-02-03}\n"), env={})
    assert config.telemetry.service_name == "2024-02-03"
    assert errors_of(tmp_path, PROVIDER + KEYS + "telemetry: {service_name: a\x00b}\n") == [
        "<yaml line 5, column 28>: the character #x0000 is not allowed (special characters are not allowed)"
    ]
    assert errors_of(tmp_path, PROVIDER + KEYS + "cache:\n  max_bytes: " + "9" * 5000 + "\n") == [
        "cache.max_bytes: is a number 5000 characters long, far beyond any setting; quote it if it is text (line 6)"
    ]
    assert errors_of(tmp_path, PROVIDER + "keys:\n  - {id: a, key: !!int " + SECRET + "}\n") == [
        "keys[0].key: is no valid !!int (line 4)"  # (Python's message quoted the value)
    ]
    assert errors_of(tmp_path, PROVIDER + KEYS + "telemetry: {service_name: !foo x}\n") == [
        "telemetry.service_name: could not determine a constructor for the tag '!foo' (line 5)"
    ]


@pytest.mark.parametrize("written", ["0777", "010", "1_0", "007", "0x1F", "+5", "-0", "1:30", "1.10"])
def test_an_id_that_yaml_reads_as_another_number_is_an_error(tmp_path: Path, written: str) -> None:
    # "id: 0777" was the key id "511", "workspace: 010" "8", a budget's "target: 007" "7" (matching no one).
    text = (PROVIDER + f"keys:\n  - {{id: {written}, key: sk-a, workspace: {written}, project: {written}}}\n"
            f"budgets:\n  - {{scope: identity, target: {written}, amount_usd: 1}}\n")  # fmt: skip
    errors = errors_of(tmp_path, text)
    for path in ("keys[0].id", "keys[0].workspace", "keys[0].project", "budgets[0].target"):
        assert any(e.startswith(f"{path}: YAML reads {written} as the number ") and f'quote it ("{written}")' in e
                   for e in errors), (path, errors)  # fmt: skip
    provider = f"providers:\n  {written}: {{type: openai, base_url: 'http://h:1/v1'}}\n"
    assert any(e.startswith("providers.") and f"YAML reads the name {written} as the number" in e
               for e in errors_of(tmp_path, provider))  # fmt: skip


@pytest.mark.parametrize("written", ["42", "-5", "0", "1.5", "1e3", "0o17"])  # (YAML 1.1: 1e3, 0o17 are text)
def test_an_id_written_as_its_own_number_is_kept(tmp_path: Path, written: str) -> None:
    text = PROVIDER + f"keys:\n  - {{id: {written}, key: sk-a, workspace: {written}}}\n"
    config = load_config(_write(tmp_path, text), env={})
    assert (config.keys[0].id, config.keys[0].workspace) == (written, written)


@pytest.mark.parametrize("prefix", ["/ai?x", "/ai#x", "//ai", "/a\ti", "/a%20i", "/ai/", "ai", "/", "/./ai", "/ai/.."])
def test_a_path_prefix_no_request_path_matches_is_an_error(prefix: str) -> None:
    with pytest.raises(ConfigError) as bad:
        parse_config({"server": {"path_prefix": prefix}}, env={})
    (error,) = bad.value.errors
    assert error.startswith("server.path_prefix: must be '/' and path segments"), error


@pytest.mark.parametrize("prefix", ["/ai", "/ai/v1", "/a-b_c.d~e", "/@x:y", "/ai..x", "/über", "/a b"])
def test_a_path_prefix_of_path_segments_is_read(prefix: str) -> None:
    # (a letter or a blank in the decoded path a request's "%C3%BC" or "%20" gives: they worked before, and match)
    assert parse_config({"server": {"path_prefix": prefix}}, env={}).server.path_prefix == prefix


def test_merge_keys_merge_as_yaml_says(tmp_path: Path) -> None:
    # PyYAML 6.0.x let the later of `<<: [*a, *b]` win for a key longer than one character (its issue #953).
    text = ("x-a: &a {type: openai_compatible, timeout_ms: 5}\n"
            "x-b: &b {type: openai, timeout_ms: 7, multimodal: true}\n"
            "x-c: &c {<<: *b, timeout_ms: 9}\n" + KEYS + "providers:\n"
            "  p: {<<: [*a, *b], base_url: 'http://h:1/v1'}\n"
            "  q: {<<: [*b, *a], base_url: 'http://h:1/v1', timeout_ms: 3}\n"
            "  r: {<<: [*c, *a], base_url: 'http://h:1/v1'}\n")  # fmt: skip
    providers = load_config(_write(tmp_path, text), env={}).providers
    assert (providers["p"].type, providers["p"].timeout_ms, providers["p"].multimodal) == ("openai_compatible", 5, True)
    assert (providers["q"].type, providers["q"].timeout_ms) == ("openai", 3)  # the mapping's own key wins
    assert (providers["r"].type, providers["r"].timeout_ms) == ("openai", 9)  # a merged mapping's own merge
    assert errors_of(tmp_path, KEYS + "server:\n  <<: 5\n") == [
        "server: expected a mapping or list of mappings for merging, but found scalar (line 4)"
    ]
    # two merge keys in one mapping: a key given twice (the loader took the first, PyYAML the last)
    (error,) = errors_of(tmp_path, "x-a: &a {timeout_ms: 5}\n" + KEYS + "providers:\n  p:\n    <<: *a\n    <<: *a\n")
    assert error.startswith("providers.p: found the merge key '<<' given twice"), error


def test_hash_key_reads_the_key_from_stdin() -> None:
    # `hash-key -` hashed "-"; a key on the command line is seen by `ps` and kept in the shell's history.
    def run(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*EMBEDGATE, "hash-key", *args], input=stdin, capture_output=True, text=True, timeout=60)

    digest = hashlib.sha256(b"sk-secret").hexdigest() + "\n"
    assert run("-", stdin="sk-secret\n").stdout == digest
    assert run("-", stdin="sk-secret").stdout == digest
    assert run(stdin="sk-secret\n").stdout == digest  # no argument, stdin no terminal
    for stdin, said in (("", "is empty"), ("\n", "is empty"), ("sk-a\nsk-b\n", "more than one line"),
                        ("sk-a\n\n", "more than one line"), ("sk a\n", "visible ASCII")):  # fmt: skip
        r = run("-", stdin=stdin)
        assert (r.returncode, r.stdout) == (2, "") and said in r.stderr and "Traceback" not in r.stderr, (stdin, r)


def test_the_uvicorn_factory_tells_a_bad_config_as_serve_does(tmp_path: Path) -> None:
    # `EMBEDGATE_CONFIG=bad.yaml uvicorn 'embedgate:create_app' --factory` printed 17 lines of traceback first.
    bad = _write(tmp_path, "providers:\n  p: {type: nope}\n")
    code = "from embedgate.cli import factory_config; factory_config()"
    for env, said in (({"EMBEDGATE_CONFIG": str(bad)}, f"{bad}: invalid configuration\n  providers.p.type: must be"),
                      ({}, "embedgate: invalid configuration\n  <env>: EMBEDGATE_CONFIG is not set")):  # fmt: skip
        environ = {k: v for k, v in os.environ.items() if k != "EMBEDGATE_CONFIG"} | env
        r = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and said in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_uvicorn_with_a_bad_config_exits_1_without_a_traceback(tmp_path: Path) -> None:
    bad = _write(tmp_path, "providers:\n  p: {type: nope}\n")
    env = {**os.environ, "EMBEDGATE_CONFIG": str(bad)}
    r = subprocess.run([sys.executable, "-m", "uvicorn", "embedgate:create_app", "--factory", "--port", "9"],
                       env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and "providers.p.type: must be" in r.stderr and "Traceback" not in r.stderr


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path
