"""Configuration: YAML with ``${VAR}`` / ``${VAR:-default}`` interpolation, validated once at start-up.

Every problem is reported with the YAML path of the bad value (``providers.openai.base_url: ...``), all of
them at once, so ``embedgate check-config`` can print the whole list. The result is a tree of frozen
dataclasses: the hot path reads precomputed attributes and never parses anything.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from collections.abc import Callable, Collection, Hashable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import httpx
import yaml

from .resp import parse_url as parse_redis_url

__all__ = [
    "BudgetConfig",
    "CacheConfig",
    "Config",
    "ConfigError",
    "Deployment",
    "KeyConfig",
    "ModelConfig",
    "ProviderConfig",
    "RetryPolicy",
    "RoutingConfig",
    "ServerConfig",
    "TelemetryConfig",
    "load_config",
    "parse_config",
]

DEFAULT_ON_CODES = (408, 429, 500, 502, 503, 504, 529)
PROVIDER_TYPES = ("openai", "openai_compatible")
BUDGET_SCOPES = ("workspace", "project", "identity", "api_key", "provider", "model")
BUDGET_PERIODS = ("daily", "weekly", "monthly", "yearly", "one_time")
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_CACHE_MAX_BYTES = 256 * 1024 * 1024


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` holds one ``"path: message"`` line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  {e}" for e in errors))
        self.errors = list(errors)


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig:
    """``server:`` section."""

    path_prefix: str = ""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    unknown_fields: Literal["reject", "ignore"] = "reject"
    max_in_flight: int = 0  # embedding requests a process serves at once, past it a 503 (0: no limit)


@dataclass(frozen=True, kw_only=True, slots=True)
class ProviderConfig:
    """One upstream provider; its ``api_key`` never leaves the process except towards that provider."""

    name: str
    type: str
    base_url: str
    api_key: str = field(default="", repr=False)
    timeout_ms: int = 30000
    multimodal: bool = False
    #: Whether the request's ``input_type`` is sent here (OpenAI's API refuses fields it does not know).
    accepts_input_type: bool = True
    #: Headers sent with every call, as given (Azure OpenAI's ``api-key``, a proxy's own); kept as secrets are.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)


@dataclass(frozen=True, kw_only=True, slots=True)
class Deployment:
    """One upstream endpoint serving a model: a provider and the model's name there."""

    provider: str
    upstream_model: str
    price_per_million_tokens: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """A model as clients name it (``<provider>/<name>``) and how it is served."""

    id: str
    deployments: tuple[Deployment, ...]
    price_per_million_tokens: float | None = None
    max_inputs: int = 2048  # per upstream call: larger batches are split and merged back
    max_request_inputs: int = 2048  # per client request (at least 2048)


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyConfig:
    """A client API key, held only as its sha256 hex digest."""

    id: str
    sha256: str = field(repr=False)
    workspace: str = "default"
    project: str = "default"
    models: tuple[str, ...] | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class BudgetConfig:
    """One budget: a hard gate on spend, tokens and/or requests per minute for one scope target."""

    scope: str
    target: str
    period: str = "daily"
    amount_usd: float | None = None
    token_limit: int | None = None
    requests_per_minute: int | None = None
    index: int = 0  # position in the config list: a stable id for the budget's counters


@dataclass(frozen=True, kw_only=True, slots=True)
class CacheConfig:
    """``cache:`` section."""

    enabled_by_default: bool = False
    default_ttl: int = 1800
    max_ttl: int = 259200
    max_bytes: int = DEFAULT_CACHE_MAX_BYTES
    redis_url: str = ""  # the cache's own Redis; empty: the top-level redis_url


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """How often one model is retried, and on which upstream statuses."""

    count: int = 2
    on_codes: frozenset[int] = frozenset(DEFAULT_ON_CODES)


@dataclass(frozen=True, kw_only=True, slots=True)
class RoutingConfig:
    """``routing:`` section."""

    default_retry: RetryPolicy = RetryPolicy()
    fallback_on_codes: frozenset[int] = frozenset(DEFAULT_ON_CODES)
    backoff_base_ms: int = 1000
    max_retry_after_ms: int = 10000
    deadline_ms: int = 120000
    split_concurrency: int = 4
    breaker_failures: int = 5
    breaker_cooldown_ms: int = 30000


@dataclass(frozen=True, kw_only=True, slots=True)
class TelemetryConfig:
    """``telemetry:`` section; the standard ``OTEL_*`` environment variables are honoured on top."""

    service_name: str = "embedgate"
    access_log: bool = True
    access_log_flush_ms: int = 50  # at most how long an access line waits in the output buffer; 0: per loop pass
    export_process: bool = True  # standalone: OTLP encoding in a helper process, off the request path's GIL


@dataclass(frozen=True, kw_only=True, slots=True)
class AdminConfig:
    """``admin:`` section: the key guarding the operator endpoints (``/admin/...``)."""

    sha256: str | None = field(default=None, repr=False)


@dataclass(frozen=True, kw_only=True, slots=True)
class BudgetOptions:
    """``budget_options:`` section."""

    fail_open: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    """The whole, validated configuration."""

    server: ServerConfig = ServerConfig()
    redis_url: str = ""
    providers: Mapping[str, ProviderConfig] = field(default_factory=dict)
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    keys: tuple[KeyConfig, ...] = ()
    budgets: tuple[BudgetConfig, ...] = ()
    cache: CacheConfig = CacheConfig()
    routing: RoutingConfig = RoutingConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    admin: AdminConfig = AdminConfig()
    budget_options: BudgetOptions = BudgetOptions()


# --- interpolation -------------------------------------------------------------------------------------------

#: The largest amount or price a config may give (USD): budgets count cost in nano-dollars in 64-bit integers
#: (Redis's INCRBY), and an infinite amount failed every budgeted request as a 500.
_MAX_NUMBER: Final = 1e9
_MAX_INTEGER: Final = 2**53  # any count or size beyond is a typo (and some, as a Redis expiry, would fail later)
_MAX_TTL: Final = 10 * 365 * 86400  # seconds: ten years (a Redis expiry of 1e20 s failed every cache write)
_VISIBLE_ASCII: Final = re.compile(r"[\x21-\x7e]*")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Errors(list[str]):
    """The config's errors, and the YAML paths whose value came from the environment (``from_env``): an error
    about such a value does not show it (``${OPENAI_API_KEY}`` given as a provider's ``type``, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.from_env: set[str] = set()


def _told(errors: list[str], *paths: str) -> bool:
    """Whether an error was already reported at one of ``paths`` (a refused ``${...}``, say): said once, not again
    as a missing or empty value."""
    heads = tuple(f"{path}:" for path in paths)
    return any(e.startswith(heads) for e in errors)


#: A number in exponent form, as a whole-number setting may be written (``1e6``, ``2.5e3``).
_EXPONENT: Final = re.compile(r"-?\d{1,20}(?:\.\d{0,20})?[eE][-+]?\d{1,3}")


def _got(v: Any, path: str, errors: list[str]) -> str:
    """``v`` as an error message shows it: its repr, unless the environment gave it."""
    if isinstance(errors, _Errors) and path in errors.from_env:
        return "a value from the environment (not shown)"
    return repr(v)[:200]


#: At most how many values a config holds with its aliases written out: each alias is a copy, and aliases of
#: aliases multiply (seven lines of ten aliases each, 454 bytes, were ten million values: 10 s and 265 MB).
_MAX_VALUES: Final = 1_000_000


def _measure(node: Any, path: str, measured: dict[int, tuple[int, bool]]) -> tuple[int, bool]:
    """How many values ``node`` holds with its aliases written out (itself and mapping keys included; at most one
    more than :data:`_MAX_VALUES`), and whether a ``$`` is in it. Each list and mapping is measured once (``measured``,
    by id), however many aliases name it."""
    if not isinstance(node, dict | list):
        return 1, isinstance(node, str) and "$" in node
    known = measured.get(id(node))
    if known is not None:
        if known[0] == 0:  # still being measured: an alias inside its own anchor (&a [*a]), a structure without end
            raise ConfigError(
                [f"{path or '<root>'}: a structure that contains itself (an alias inside its own anchor)"]
            )
        return known
    measured[id(node)] = (0, False)
    size, dollar = 1, False
    if isinstance(node, dict):
        size += len(node)
        dollar = any(isinstance(k, str) and "$" in k for k in node)
    for at, child in _children(node, path):
        n, d = _measure(child, at, measured)
        size, dollar = min(size + n, _MAX_VALUES + 1), dollar or d
    measured[id(node)] = (size, dollar)
    return size, dollar


def _too_large(node: Any, measured: dict[int, tuple[int, bool]]) -> str:
    """The path of the innermost value of ``node`` that alone is above :data:`_MAX_VALUES`, the first one in the
    document's order."""
    path = ""
    while True:
        inner = [(at, v) for at, v in _children(node, path) if measured.get(id(v), (0,))[0] > _MAX_VALUES]
        if not inner:
            return path or "<root>"
        path, node = inner[0]


def _children(node: dict[Any, Any] | list[Any], path: str) -> list[tuple[str, Any]]:
    """The values of a mapping or list, each with its path."""
    if isinstance(node, dict):
        return [(_join(path, str(k)), v) for k, v in node.items()]
    return [(f"{path}[{i}]", v) for i, v in enumerate(node)]


def _interpolate(node: Any, env: Mapping[str, str], path: str, errors: list[str],
                 measured: dict[int, tuple[int, bool]]) -> Any:  # fmt: skip
    """``node`` with the ``${...}`` of its values and mapping keys read. A list or mapping with no ``$`` in it is
    returned as it is: shared, as its aliases were, not copied again for each (see :func:`_measure`)."""
    if isinstance(node, str):
        if "$" not in node:
            return node
        found: list[str] = []
        out, _ = _expand(node, 0, False, env, path or "<root>", found)
        errors.extend(dict.fromkeys(found))  # each once
        if isinstance(errors, _Errors) and "${" in node.replace("$$", ""):  # ("$${X}" is text, not the environment)
            errors.from_env.add(path)
        return out
    if not isinstance(node, dict | list) or not measured[id(node)][1]:
        return node
    if isinstance(node, list):
        return [_interpolate(v, env, f"{path}[{i}]", errors, measured) for i, v in enumerate(node)]
    out_map: dict[Any, Any] = {}
    first: dict[str, tuple[Any, bool]] = {}  # a key as the config names it -> as written, and whether it was read
    for written, v in node.items():
        key, read = written, isinstance(written, str) and "$" in written
        if read:
            found = []
            key, _ = _expand(written, 0, False, env, _join(path, written), found)
            if found:  # refused: said once, and kept as written (not as an empty name)
                errors.extend(dict.fromkeys(found))
                key = written
        name = str(key)
        if name in first and (read or first[name][1]):  # (two keys as written were told by _twice)
            other = first[name][0]
            errors.append(f"{_join(path, str(written))}: the same key as {_shown_key(str(other))} once their "
                          "${...} are read (a key given twice)")  # fmt: skip
            continue
        first.setdefault(name, (written, read))
        out_map[key] = _interpolate(v, env, _join(path, name), errors, measured)
    return out_map


def _expand(text: str, at: int, nested: bool, env: Mapping[str, str], where: str,
            errors: list[str]) -> tuple[str, int]:  # fmt: skip
    """``text`` from ``at`` with its ``${NAME}`` and ``${NAME:-default}`` replaced, a default itself expanded (as
    docker compose does: ``${A:-${B}}``), only when it is used, and ``$$`` read as one ``$``. Nested (a default), up
    to its closing brace, whose index is returned; -1 when there is none."""
    out: list[str] = []
    i = at
    while i < len(text):
        if text.startswith("$$", i):  # docker compose's escape: one "$" ("$${X}" is the text "${X}")
            out.append("$")
            i += 2
            continue
        if text.startswith("${", i):
            name = _NAME.match(text, i + 2)
            end = name.end() if name is not None else i + 2
            if name is not None and text.startswith("}", end):
                value = env.get(name.group())
                if value is None:
                    errors.append(f"{where}: environment variable {name.group()} is not set "
                                  f"(use ${{{name.group()}:-}})")  # fmt: skip
                out.append(value or "")
                i = end + 1
                continue
            if name is not None and text.startswith(":-", end):
                inner: list[str] = []
                default, close = _expand(text, end + 2, True, env, where, inner)
                if close >= 0:
                    value = env.get(name.group())
                    if value:  # as the shell's and docker compose's ":-": the default when unset or empty
                        out.append(value)
                    else:
                        out.append(default)
                        errors.extend(inner)
                    i = close + 1
                    continue
            # "${K-x}", "${K:x}", "${ K }", an unclosed "${K": an error, never kept as text (it may be a secret)
            errors.append(f"{where}: a '${{' that is not ${{NAME}} or ${{NAME:-default}} (NAME: letters, digits "
                          "and _)")  # fmt: skip
            return "", len(text) if not nested else -1
        if nested and text[i] == "}":
            return "".join(out), i
        out.append(text[i])
        i += 1
    return "".join(out), -1 if nested else i


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


#: A mapping key an error may show as written: a name, maybe with ``${NAME}`` in it. A value glued to its key
#: (``key=sk-...``, ``key:sk-...``, ``key sk-...``: a typo) holds some other character, or is long: it may be a secret.
_PLAIN_KEY: Final = re.compile(r"(?:[A-Za-z0-9_./-]|\$\{[A-Za-z_][A-Za-z0-9_]*\})*")
_MAX_SHOWN_KEY: Final = 64
_SPACES: Final = {" ": "a space", "\t": "a tab", "\n": "a line break", "\r": "a carriage return"}


def _hidden(key: str) -> str | None:
    """Why an error does not show the mapping key ``key``, or None when it may."""
    if len(key) > _MAX_SHOWN_KEY:
        return f"it is {len(key)} characters long"
    plain = _PLAIN_KEY.match(key)
    if plain is None or plain.end() == len(key):
        return None
    odd = key[plain.end()]
    return f"it holds {_SPACES.get(odd, repr(odd))}"


def _shown_key(key: str) -> str:
    """``key`` as an error names it: quoted, or said to be not shown and why."""
    why = _hidden(key)
    return repr(key) if why is None else f"a key not shown ({why})"


def _meant(key: str, known: Collection[str]) -> str:
    """The hint for a key holding a value glued to it: ``; did you mean `key: ...`?`` when what comes before the
    ``=``, ``:`` or blank is a known key."""
    head = re.split(r"[=:\s]", key, maxsplit=1)[0]
    if head != key and head in known:
        return f"; did you mean `{head}: ...`?"
    return "; a space missing after a colon?" if ":" in key else ""


# --- a small validator that keeps the YAML path --------------------------------------------------------------

T = TypeVar("T")


class _Section:
    """Reads one mapping of the YAML, recording errors with their paths instead of raising at the first."""

    def __init__(self, data: Any, path: str, errors: list[str]) -> None:
        self.path, self.errors = path, errors
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.error(path, f"must be a mapping, got {_kind(data)}")
            data = {}
        self.data: dict[str, Any] = data
        self.seen: set[str] = set()

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path or '<root>'}: {message}")

    def at(self, key: str) -> str:
        return _join(self.path, key)

    def get(self, key: str, check: Callable[[Any, str], T | None], default: T) -> T:
        self.seen.add(key)
        if key not in self.data or self.data[key] is None:
            return default
        if _told(self.errors, self.at(key)):  # a refused ${...}, left as written: said once, not again as its type
            return default
        value = check(self.data[key], self.at(key))
        return default if value is None else value

    def required(self, key: str, check: Callable[[Any, str], T | None], default: T) -> T:
        if key not in self.data or self.data[key] in (None, ""):
            self.seen.add(key)
            if not _told(self.errors, self.at(key)):  # (a refused ${...} is left empty: said once)
                self.error(self.at(key), "is required")
            return default
        return self.get(key, check, default)

    def finish(self) -> None:
        for key in self.data:
            if key not in self.seen:
                why = _hidden(str(key))
                if why is None:
                    self.error(self.at(str(key)), "unknown key")
                else:  # "key=sk-...", "key:sk-..." (no space after the colon): a value glued to its key, maybe a secret
                    hint = _meant(str(key), {k for k in self.seen if isinstance(k, str)})
                    self.error(self.path, f"an unknown key (not shown: {why}{hint})")

    # checks: return the value, or record an error and return None
    def string(self, v: Any, path: str) -> str | None:
        if isinstance(v, str):
            return v
        if isinstance(v, int | float) and not isinstance(v, bool):
            # An id written 42 is "42"; one written 0777, 010, 1_0 or 007 was silently "511", "8", "10" or "7" (as a
            # budget's target, it then matched no one).
            written = _written(v)
            if written != str(v):
                self.error(path, f'YAML reads {written} as the number {v}: quote it ("{written}") to keep it as text')
                return None
            return str(v)
        self.error(path, f"must be a string, got {_kind(v)}")
        return None

    def secret(self, v: Any, path: str) -> str | None:
        """A key or password: a string as written. A YAML number is refused (and not shown): YAML reads 0777 as 511
        and 1.10 as 1.1, so the secret would silently differ from the one the client sends. So is a character an
        HTTP header does not carry as written (a key goes in ``Authorization``): visible ASCII only."""
        if isinstance(v, str):
            if not header_safe(v):
                self.error(path, "must be visible ASCII characters (no spaces, no accents: an HTTP header carries it)")
                return None
            return v
        self.error(path, f"must be a string (quote it: YAML reads an unquoted number its own way), got {_kind(v)}")
        return None

    def boolean(self, v: Any, path: str) -> bool | None:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
            return v.lower() in ("true", "1", "yes")
        self.error(path, f"must be true or false, got {_got(v, path, self.errors)}")
        return None

    def integer(self, lo: int, hi: int | None = None) -> Callable[[Any, str], int | None]:
        def check(v: Any, path: str) -> int | None:
            if isinstance(v, str) and re.fullmatch(r"-?\d{1,30}", v.strip()):
                v = int(v)
            elif isinstance(v, str) and _EXPONENT.fullmatch(v.strip()):
                # 1e6: YAML 1.1 (PyYAML) reads it as a string, where amount_usd's 1e6 is a number. Read exactly: a
                # value that is not a whole number (1e-400, 1.00000000000000001e3) stays refused.
                exact = Decimal(v.strip())
                if exact == exact.to_integral_value():
                    v = int(exact)
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if not isinstance(v, int) or isinstance(v, bool):
                self.error(path, f"must be an integer, got {_kind(v)}")
                return None
            top = _MAX_INTEGER if hi is None else hi
            if not lo <= v <= top:
                self.error(path, f"must be between {lo} and {top}")
                return None
            return int(v)  # (not the loader's _WrittenInt)

        return check

    def number(self, v: Any, path: str) -> float | None:
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass
        if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v <= _MAX_NUMBER:  # NaN fails too
            self.error(path, f"must be a number from 0 to {_MAX_NUMBER:g}, got {_got(v, path, self.errors)}")
            return None
        return float(v)

    def choice(self, options: tuple[str, ...]) -> Callable[[Any, str], str | None]:
        def check(v: Any, path: str) -> str | None:
            if v not in options:
                self.error(path, f"must be one of {', '.join(options)}, got {_got(v, path, self.errors)}")
                return None
            return str(v)

        return check

    def codes(self, v: Any, path: str) -> frozenset[int] | None:
        if not isinstance(v, list):
            self.error(path, f"must be a list of HTTP status codes, got {_kind(v)}")
            return None
        out = set()
        for i, c in enumerate(v):
            code = self.integer(100, 599)(c, f"{path}[{i}]")
            if code is not None:
                out.add(code)
        return frozenset(out)


def _kind(v: Any) -> str:
    if isinstance(v, int | float) and not isinstance(v, bool):
        return "int" if isinstance(v, int) else "float"  # (the loader's _WrittenInt too)
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), type(v).__name__
    )


def _url(sec: _Section) -> Callable[[Any, str], str | None]:
    def check(v: Any, path: str) -> str | None:
        s = sec.string(v, path)
        if s is None:
            return None
        if not re.match(r"^https?://[^/\s]+", s):
            # (not shown when it may hold user:password@, as a valid URL's are not)
            shown = _got(s, path, sec.errors) if "@" not in s else "a value with '@' in it (not shown)"
            sec.error(path, f"must be an http(s) URL, got {shown}")
            return None
        try:  # as the adapter reads it at start-up (a bad port or host failed there, without a YAML path)
            parts = urllib.parse.urlsplit(s)
            url = httpx.URL(s)
            ok = bool(url.host) and (url.port is None or 0 < url.port < 65536)
        except (httpx.InvalidURL, ValueError):
            ok = False
        if not ok or re.search(r"\s", s):
            sec.error(path, "must be an http(s) URL with a valid host and port (1-65535), and no blanks")
            return None
        if "#" in s or "@" in parts.netloc:  # a fragment is never sent, nor are credentials in a URL
            sec.error(path, "must hold no fragment (#...) and no user:password@ (the key goes in api_key)")
            return None
        return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/")))  # the query as it is

    return check


def _sha256_hex(sec: _Section) -> Callable[[Any, str], str | None]:
    def check(v: Any, path: str) -> str | None:
        s = sec.string(v, path)
        if s is None:
            return None
        s = s.lower().removeprefix("sha256:")
        if not re.fullmatch(r"[0-9a-f]{64}", s):
            sec.error(path, "must be 64 hex digits (use `embedgate hash-key KEY`)")
            return None
        return s

    return check


def header_safe(secret: str) -> bool:
    """Whether ``secret`` is visible ASCII only, as an HTTP header (``Authorization``) carries it as written."""
    return _VISIBLE_ASCII.fullmatch(secret) is not None


def hash_key(key: str) -> str:
    """The sha256 hex digest under which a client key is configured and matched."""
    return hashlib.sha256(key.encode()).hexdigest()


# --- sections ---------------------------------------------------------------------------------------------


#: ``server.path_prefix``: "/" and path segments, as the gateway compares them with the request's decoded path (so a
#: letter "ü" or a blank matches a client's "%C3%BC" or "%20"). No "%" (no decoded path holds "%20" for a "%20" the
#: prefix would mean), "?" or "#" (a client's query and fragment), control character, nor "." or ".." segment (which a
#: client removes before sending).
_PATH_PREFIX: Final = re.compile(r"(?:/[^/?#%\x00-\x1f\x7f]+)+")


def _server(data: Any, errors: list[str]) -> ServerConfig:
    s = _Section(data, "server", errors)
    prefix = s.get("path_prefix", s.string, "")
    if prefix and (not _PATH_PREFIX.fullmatch(prefix) or {".", ".."} & set(prefix.split("/"))):
        at = s.at("path_prefix")
        s.error(at, "must be '/' and path segments (no '%', '?', '#' or control character), with no '/' at the end "
                f"and no empty, '.' or '..' segment, got {_got(prefix, at, errors)}")  # fmt: skip
    cfg = ServerConfig(
        path_prefix=prefix,
        max_body_bytes=s.get("max_body_bytes", s.integer(1024), DEFAULT_MAX_BODY_BYTES),
        unknown_fields=s.get("unknown_fields", s.choice(("reject", "ignore")), "reject"),  # type: ignore[arg-type]
        max_in_flight=s.get("max_in_flight", s.integer(0, 1_000_000), 0),
    )
    s.finish()
    return cfg


def _providers(data: Any, errors: list[str]) -> dict[str, ProviderConfig]:
    top = _Section(data, "providers", errors)
    out: dict[str, ProviderConfig] = {}
    for name, body in top.data.items():
        top.seen.add(name)
        s = _Section(body, top.at(str(name)), errors)
        if _written(name) != str(name):  # "007:" was the provider "7"
            s.error(s.path, f"YAML reads the name {_written(name)} as the number {name}: quote it")
        elif not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
            s.error(s.path, "provider names may hold letters, digits, '_', '.', '-'")
        kind = s.required("type", s.choice(PROVIDER_TYPES), "openai")
        out[str(name)] = ProviderConfig(
            name=str(name),
            type=kind,
            base_url=s.required("base_url", _url(s), ""),
            api_key=s.get("api_key", s.secret, ""),
            timeout_ms=s.get("timeout_ms", s.integer(1, 600000), 30000),
            multimodal=s.get("multimodal", s.boolean, False),
            # OpenAI's API answers 400 to a field it does not know; servers that speak its API may take more
            accepts_input_type=s.get("accepts_input_type", s.boolean, kind != "openai"),
            headers=s.get("headers", _provider_headers(s), ()),
        )
        if out[str(name)].api_key and any(n.lower() == "authorization" for n, _ in out[str(name)].headers):
            s.error(s.at("headers"), "give api_key (sent as 'Authorization: Bearer') or an Authorization header, "
                    "not both")  # fmt: skip
        s.finish()
    return out


#: Headers the gateway writes itself on an upstream call: a provider's ``headers`` may not set them.
_OWN_HEADERS: Final = frozenset({"host", "content-length", "content-type", "transfer-encoding", "connection", "accept",
                                 "accept-encoding", "te", "upgrade", "traceparent", "tracestate"})  # fmt: skip
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE: Final = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")


def _provider_headers(s: _Section) -> Callable[[Any, str], tuple[tuple[str, str], ...] | None]:
    def check(v: Any, path: str) -> tuple[tuple[str, str], ...] | None:
        if not isinstance(v, dict):
            s.error(path, "must be a mapping of header names to values")
            return None
        out: list[tuple[str, str]] = []
        seen: set[str] = set()
        for name, value in v.items():
            at = f"{path}.{name}"
            if not isinstance(name, str) or not _TOKEN.fullmatch(name):
                why = _hidden(str(name))
                if why is None:
                    s.error(path, f"{str(name)!r} is no HTTP header name")
                else:  # "{api-key:SECRET}", "{api-key=SECRET}": one name holding the value, not shown
                    head = re.split(r"[=:\s]", str(name), maxsplit=1)[0]
                    hint = _meant(str(name), {head} if _TOKEN.fullmatch(head) else set())
                    s.error(path, f"a name that is no HTTP header name (not shown: {why}{hint})")
            elif name.lower() in _OWN_HEADERS:
                s.error(at, "is set by the gateway itself")
            elif name.lower() in seen:
                s.error(at, "is given twice (header names are case-insensitive)")
            elif _told(s.errors, at):
                pass  # its ${...} was refused
            elif value == "":
                s.error(at, "is empty (is its environment variable set?)")
            elif not isinstance(value, str):
                s.error(at, f"must be a string, got {_kind(value)} (quote it: YAML reads an unquoted number or "
                        "yes/no its own way)")  # fmt: skip
            elif not _HEADER_VALUE.fullmatch(value):
                # not shown: it may be a secret (an api-key)
                s.error(at, "must be a string of visible ASCII characters and spaces (no line breaks, no accents, "
                        "none at either end)")  # fmt: skip
            else:
                seen.add(name.lower())
                out.append((name, value))
        return tuple(out)

    return check


def _models(data: Any, providers: Mapping[str, ProviderConfig], errors: list[str]) -> dict[str, ModelConfig]:
    top = _Section(data, "models", errors)
    out: dict[str, ModelConfig] = {}
    for model_id, body in top.data.items():
        top.seen.add(model_id)
        mid = str(model_id)
        s = _Section(body, top.at(mid), errors)
        prefix, _, name = mid.partition("/")
        deployments: list[Deployment] = []
        raw = s.get("deployments", lambda v, p: v, None)
        if raw is None:
            if not name:
                s.error(s.path, "model ids are '<provider>/<name>'")
            elif prefix not in providers:
                s.error(s.path, f"no provider named {prefix!r} (and no deployments listed)")
            else:
                deployments.append(Deployment(provider=prefix, upstream_model=name))
        elif not isinstance(raw, list) or not raw:
            s.error(s.at("deployments"), "must be a non-empty list")
        else:
            listed: dict[tuple[str, str], int] = {}
            for i, d in enumerate(raw):
                ds = _Section(d, f"{s.at('deployments')}[{i}]", errors)
                provider = ds.required("provider", ds.string, "")
                if provider and provider not in providers:
                    ds.error(ds.at("provider"), f"no provider named {_got(provider, ds.at('provider'), errors)}")
                deployment = Deployment(
                    provider=provider,
                    upstream_model=ds.get("upstream_model", ds.string, name or mid),
                    price_per_million_tokens=ds.get("price_per_million_tokens", ds.number, None),
                )
                # One endpoint has one breaker, backoff and dropped key: listed twice, it was called again at once,
                # with a key it had just refused.
                first = listed.setdefault((deployment.provider, deployment.upstream_model), i)
                if first != i:
                    shown = _got(deployment.upstream_model, ds.at("upstream_model"), errors)  # (the env.: not shown)
                    same = f"provider {_got(deployment.provider, ds.at('provider'), errors)}, upstream_model {shown}"
                    ds.error(ds.path, f"the same deployment as deployments[{first}] ({same})")
                deployments.append(deployment)
                ds.finish()
        out[mid] = ModelConfig(
            id=mid,
            deployments=tuple(deployments),
            price_per_million_tokens=s.get("price_per_million_tokens", s.number, None),
            max_inputs=s.get("max_inputs", s.integer(1, 1_000_000), 2048),
            # below 2048 it would refuse what the OpenAI API takes in one request: a setting that did nothing
            max_request_inputs=s.get("max_request_inputs", s.integer(2048, 1_000_000), 2048),
        )
        s.finish()
    return out


def _keys(data: Any, errors: list[str]) -> tuple[KeyConfig, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        errors.append("keys: must be a list")
        return ()
    out: list[KeyConfig] = []
    ids: set[str] = set()
    secrets: dict[str, int] = {}  # sha256 -> the first key holding it
    for i, body in enumerate(data):
        s = _Section(body, f"keys[{i}]", errors)
        kid = s.required("id", s.string, f"key-{i}")
        if kid in ids:
            s.error(s.at("id"), f"duplicate key id {_got(kid, s.at('id'), errors)}")
        ids.add(kid)
        clear = s.get("key", s.secret, None)
        digest = s.get("sha256", _sha256_hex(s), None)
        sha = digest or hash_key(clear or "")
        if _told(errors, s.at("key"), s.at("sha256")):
            pass  # the secret given was refused, or its ${...}
        elif clear is not None and digest is not None:
            s.error(s.path, "give either key or sha256, not both")
        elif clear is None and digest is None:
            s.error(s.path, "needs key or sha256")
        elif clear == "":
            s.error(s.at("key"), "is empty (is its environment variable set?)")
        else:
            first = secrets.setdefault(sha, i)
            if first != i:  # one secret, two keys: a client would be counted (budgets, usage) as only one of them
                s.error(s.at("key" if clear is not None else "sha256"), f"the same secret as keys[{first}]")
        models = s.get("models", lambda v, p: v, None)
        if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
            s.error(s.at("models"), "must be a list of model globs")
            models = None
        out.append(
            KeyConfig(
                id=kid,
                sha256=sha,
                workspace=s.get("workspace", s.string, "default"),
                project=s.get("project", s.string, "default"),
                models=tuple(models) if models is not None else None,
            )
        )
        s.finish()
    return tuple(out)


def _budgets(data: Any, errors: list[str]) -> tuple[BudgetConfig, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        errors.append("budgets: must be a list")
        return ()
    out = []
    for i, body in enumerate(data):
        s = _Section(body, f"budgets[{i}]", errors)
        b = BudgetConfig(
            scope=s.required("scope", s.choice(BUDGET_SCOPES), ""),  # (none told of its target then)
            target=s.required("target", s.string, "*"),
            period=s.get("period", s.choice(BUDGET_PERIODS), "daily"),
            amount_usd=s.get("amount_usd", s.number, None),
            token_limit=s.get("token_limit", s.integer(0), None),
            requests_per_minute=s.get("requests_per_minute", s.integer(0), None),
            index=i,
        )
        limits = ("amount_usd", "token_limit", "requests_per_minute")
        if all(s.data.get(k) is None for k in limits):  # (one given but refused has its own error)
            s.error(s.path, "sets no limit: give amount_usd, token_limit or requests_per_minute")
        out.append(b)
        s.finish()
    return tuple(out)


def _cache(data: Any, errors: list[str]) -> CacheConfig:
    s = _Section(data, "cache", errors)
    cfg = CacheConfig(
        enabled_by_default=s.get("enabled_by_default", s.boolean, False),
        default_ttl=s.get("default_ttl", s.integer(1, _MAX_TTL), 1800),
        max_ttl=s.get("max_ttl", s.integer(1, _MAX_TTL), 259200),
        max_bytes=s.get("max_bytes", s.integer(0), DEFAULT_CACHE_MAX_BYTES),
        redis_url=s.get("redis_url", s.string, "") or "",
    )
    if cfg.default_ttl > cfg.max_ttl:
        s.error(s.at("default_ttl"), f"is above max_ttl ({cfg.max_ttl})")
    if cfg.redis_url:
        try:
            parse_redis_url(cfg.redis_url)
        except ValueError as exc:  # the message never repeats the URL: it may hold a password
            s.error(s.at("redis_url"), str(exc))
    s.finish()
    return cfg


def _retry(data: Any, path: str, errors: list[str]) -> RetryPolicy:
    s = _Section(data, path, errors)
    cfg = RetryPolicy(
        count=s.get("count", s.integer(0, 5), 2),
        on_codes=s.get("on_codes", s.codes, frozenset(DEFAULT_ON_CODES)),
    )
    s.finish()
    return cfg


def _routing(data: Any, errors: list[str]) -> RoutingConfig:
    s = _Section(data, "routing", errors)
    s.seen.add("default_retry")
    cfg = RoutingConfig(
        default_retry=_retry(s.data.get("default_retry"), s.at("default_retry"), errors),
        fallback_on_codes=s.get("fallback_on_codes", s.codes, frozenset(DEFAULT_ON_CODES)),
        backoff_base_ms=s.get("backoff_base_ms", s.integer(0, 60000), 1000),
        max_retry_after_ms=s.get("max_retry_after_ms", s.integer(0, 600000), 10000),
        deadline_ms=s.get("deadline_ms", s.integer(1, 3600000), 120000),
        split_concurrency=s.get("split_concurrency", s.integer(1, 64), 4),
        breaker_failures=s.get("breaker_failures", s.integer(1, 1000), 5),
        breaker_cooldown_ms=s.get("breaker_cooldown_ms", s.integer(0, 3600000), 30000),
    )
    s.finish()
    return cfg


def _telemetry(data: Any, errors: list[str]) -> TelemetryConfig:
    s = _Section(data, "telemetry", errors)
    cfg = TelemetryConfig(
        service_name=s.get("service_name", s.string, "embedgate"),
        access_log=s.get("access_log", s.boolean, True),
        access_log_flush_ms=s.get("access_log_flush_ms", s.integer(0, 60000), 50),
        export_process=s.get("export_process", s.boolean, True),
    )
    s.finish()
    return cfg


def _admin(data: Any, errors: list[str]) -> AdminConfig:
    s = _Section(data, "admin", errors)
    clear = s.get("key", s.secret, None)
    digest = s.get("sha256", _sha256_hex(s), None)
    s.finish()
    if clear and digest is not None:
        s.error(s.path, "give either key or sha256, not both")
    if clear:
        return AdminConfig(sha256=hash_key(clear))
    return AdminConfig(sha256=digest)


def _budget_options(data: Any, errors: list[str]) -> BudgetOptions:
    s = _Section(data, "budget_options", errors)
    cfg = BudgetOptions(fail_open=s.get("fail_open", s.boolean, False))
    s.finish()
    return cfg


def parse_config(data: Any, env: Mapping[str, str] | None = None) -> Config:
    """Validate an already-loaded YAML document (a dict) and build the :class:`Config`."""
    errors = _Errors()
    measured: dict[int, tuple[int, bool]] = {}
    try:
        if _measure(data, "", measured)[0] > _MAX_VALUES:  # told alone: reading on would take minutes, and gigabytes
            raise ConfigError([f"{_too_large(data, measured)}: its aliases write it out as more than {_MAX_VALUES:,} "
                               "values (aliases of aliases multiply); no config needs so many"])  # fmt: skip
        data = _interpolate(data, os.environ if env is None else env, "", errors, measured)
    except RecursionError:  # nested too deeply for Python's stack (a document of Python lists, say)
        raise ConfigError(["<root>: nested too deeply"]) from None
    root = _Section(data, "", errors)
    for key in ("server", "redis_url", "providers", "models", "keys", "budgets", "cache", "routing"):
        root.seen.add(key)
    root.seen.update(("telemetry", "admin", "budget_options"))
    # Top-level "x-..." keys are read by no one, as docker compose's extension fields: a place for the anchors that
    # providers and models share (an unknown key elsewhere, they could only sit on a real provider or model).
    root.seen.update(k for k in root.data if isinstance(k, str) and k.startswith("x-"))
    providers = _providers(root.data.get("providers"), errors)
    redis_url = root.get("redis_url", root.string, "")  # `{}` or `false` were "no Redis"
    if redis_url:
        try:
            parse_redis_url(str(redis_url))
        except ValueError as exc:  # the message never repeats the URL: it may hold a password
            errors.append(f"redis_url: {exc}")
    config = Config(
        server=_server(root.data.get("server"), errors),
        redis_url=str(redis_url),
        providers=providers,
        models=_models(root.data.get("models"), providers, errors),
        keys=_keys(root.data.get("keys"), errors),
        budgets=_budgets(root.data.get("budgets"), errors),
        cache=_cache(root.data.get("cache"), errors),
        routing=_routing(root.data.get("routing"), errors),
        telemetry=_telemetry(root.data.get("telemetry"), errors),
        admin=_admin(root.data.get("admin"), errors),
        budget_options=_budget_options(root.data.get("budget_options"), errors),
    )
    root.finish()
    errors += _nested_workspaces(config.keys, errors)
    for i, client in enumerate(config.keys):
        if config.admin.sha256 is not None and client.sha256 == config.admin.sha256:
            # That client would also read the operator endpoints (every key's usage, every identity).
            errors.append(f"admin: the same secret as keys[{i}]")
    errors += _dead_budgets(config, errors)
    if errors:
        raise ConfigError(errors)
    return config


def _nested_workspaces(keys: tuple[KeyConfig, ...], errors: list[str]) -> list[str]:
    """A workspace named as another and "/" more (``acme`` and ``acme/team``): projects and identities are counted
    (and identities stored) as ``<workspace>/<id>``, and a client of ``acme`` sending the identity ``team/bob`` would
    spend, and rewrite, ``acme/team``'s ``bob``."""
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key.workspace, i)
    out = []
    for name, i in first.items():
        outer = next((o for o in first if name.startswith(o + "/")), None)
        if outer is not None:
            path, other = f"keys[{i}].workspace", f"keys[{first[outer]}].workspace"
            out.append(f"{path}: {_got(name, path, errors)} is {other} ({_got(outer, other, errors)}) and '/' more: "
                       "their projects and identities would share names ('<workspace>/<id>'); rename one")  # fmt: skip
    return out


def _dead_budgets(config: Config, errors: list[str]) -> list[str]:
    """Budgets of a key's scope whose target no key has (a typo, ``team-A`` for ``team-a``): a hard gate that would
    never apply, silently."""
    ids = {k.id for k in config.keys}
    workspaces = {k.workspace for k in config.keys}
    projects = {k.project for k in config.keys} | {f"{k.workspace}/{k.project}" for k in config.keys}
    known = {"api_key": (ids, "key id"), "workspace": (workspaces, "workspace"), "project": (projects, "project")}
    # A request's provider is its model id's prefix; a model id is one of `models` or any name under a provider.
    providers = set(config.providers) | {m.partition("/")[0] for m in config.models}
    out = []
    for b in config.budgets:
        if b.target == "*" or b.scope not in BUDGET_SCOPES:  # a bad scope is told: not its target as well
            continue
        path = f"budgets[{b.index}].target"
        target = _got(b.target, path, errors)
        names, what = known.get(b.scope, (None, ""))
        if names is not None and b.target not in names:
            out.append(f"{path}: no key has the {what} {target}, so this budget never applies")
        elif b.scope == "provider" and b.target not in providers:
            out.append(f"{path}: no provider {target} is configured, so this budget never applies")
        elif b.scope == "model" and b.target not in config.models and not _askable(b.target, providers):
            out.append(f"{path}: no model {target} can be asked for (a model id is <provider>/<name>, with a "
                       "configured provider), so this budget never applies")  # fmt: skip
    return out


def _askable(model: str, providers: Collection[str]) -> bool:
    """Whether ``model`` is ``<provider>/<name>`` with a configured provider and a name."""
    provider, _, name = model.partition("/")
    return provider in providers and bool(name)


_MERGE: Final = "tag:yaml.org,2002:merge"
_TIMESTAMP: Final = "tag:yaml.org,2002:timestamp"
_MAX_NUMBER_TEXT: Final = 100  # characters: far beyond any setting, and below Python's 4300 digits for an int


class _WrittenInt(int):
    """A YAML integer that keeps its text as written: YAML reads ``0777`` as 511, ``1_0`` as 10 (see
    :meth:`_Section.string`)."""

    written = ""


class _WrittenFloat(float):
    """A YAML float that keeps its text as written (``1.10`` is 1.1)."""

    written = ""


def _written(value: Any) -> str:
    """``value`` as the YAML wrote it: a number's own text, else ``str(value)``."""
    return value.written if isinstance(value, _WrittenInt | _WrittenFloat) and value.written else str(value)


class _Unreadable(Exception):
    """A YAML value the loader cannot read (``!!int x``, a number of 5000 digits): told at its YAML path, without
    the value (it may be a secret)."""

    def __init__(self, node: yaml.Node, message: str) -> None:
        super().__init__(message)
        self.node, self.message = node, message


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader as the config reads it. A mapping key must be a scalar (a key given twice: see
    :func:`_twice`). No value is a date: no setting is one, and ``service_name: 2024-02-03`` is that text (an
    impossible date, ``2024-02-30``, was an error without a path). Numbers keep their text (:class:`_WrittenInt`).
    Merge keys merge as YAML says: the mapping's own keys win, then the earliest mapping merged (PyYAML 6.0.x let the
    last one win for keys of more than one character: its issue #953)."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.constructor.ConstructorError as exc:  # an unknown tag, say (its message names the tag)
            raise _Unreadable(node, str(exc.problem)) from None
        except (ValueError, TypeError, OverflowError):  # a bad value of an explicit tag (!!int x): the message shows it
            raise _Unreadable(node, f"is no valid !!{node.tag.rpartition(':')[2]}") from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:  # "<<: *anchor": merged below, overridable
                continue
            if not isinstance(self.construct_object(key_node, deep=deep), Hashable):
                raise _Unreadable(key_node, "a mapping key must be a scalar")
        try:
            return super().construct_mapping(node, deep=deep)
        except yaml.constructor.ConstructorError as exc:  # a merge of no mapping (<<: 5)
            raise _Unreadable(node, str(exc.problem)) from None

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        own: list[tuple[yaml.Node, yaml.Node]] = []
        merged: list[list[tuple[yaml.Node, yaml.Node]]] = []
        merges = 0
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                merges += 1
                if merges == 2:  # as any key given twice (PyYAML took the last; which one was meant?)
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        "found the merge key '<<' given twice: merge several with '<<: [*a, *b]'", key_node.start_mark,
                    )  # fmt: skip
            if key_node.tag != _MERGE:
                if key_node.tag == "tag:yaml.org,2002:value":  # a key "=" (as PyYAML reads it)
                    key_node.tag = "tag:yaml.org,2002:str"
                own.append((key_node, value_node))
                continue
            for source in value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]:
                if not isinstance(source, yaml.MappingNode):
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"expected a mapping or list of mappings for merging, but found {source.id}", source.start_mark,
                    )  # fmt: skip
                self.flatten_mapping(source)
                merged.append(source.value)
        if merged:  # the last of a key wins as the mapping is built: the earliest merged goes last, its own keys after
            node.value = [pair for pairs in reversed(merged) for pair in pairs] + own

    def construct_written_int(self, node: yaml.ScalarNode) -> int:
        written = self.construct_scalar(node)
        if len(written) > _MAX_NUMBER_TEXT:  # (Python reads no integer of more than 4300 digits)
            raise _Unreadable(node, f"is a number {len(written)} characters long, far beyond any setting; quote it "
                              "if it is text")  # fmt: skip
        number = _WrittenInt(self.construct_yaml_int(node))
        number.written = written
        return number

    def construct_written_float(self, node: yaml.ScalarNode) -> float:
        number = _WrittenFloat(self.construct_yaml_float(node))
        number.written = self.construct_scalar(node)
        return number


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_written_int)
_ConfigLoader.add_constructor("tag:yaml.org,2002:float", _ConfigLoader.construct_written_float)


def _twice(loader: yaml.SafeLoader, root: yaml.Node, paths: dict[int, str]) -> list[str]:
    """The keys given twice in one mapping (the last silently won), each named by its YAML path and line, from the
    composed document. Keys are compared as YAML reads them (``1`` and ``0x1``, ``true`` and ``yes`` are one key) and
    as the config names them (``1`` and ``"1"`` name one provider). Walked in document order, each node once: an
    anchored node is named where it is defined (an alias comes after its anchor), and a merge key's mappings
    (``<<: [*a, *b]``) under the mapping they merge into. Each node's path goes in ``paths`` (by id), where
    :class:`_Unreadable` finds it."""
    found: list[tuple[int, str]] = []  # (line, error)
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in paths:
            continue
        paths[id(node)] = path
        children: list[tuple[yaml.Node, str]] = []
        if isinstance(node, yaml.MappingNode):
            values: set[Any] = set()
            names: set[str] = set()
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE:  # merged in, its keys overridable
                    items = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                    children += [(item, path) for item in items]
                    continue
                paths.setdefault(id(key_node), path or "<root>")  # (a key's error names the mapping holding it)
                if not isinstance(key_node, yaml.ScalarNode):  # (refused as it is constructed)
                    children.append((value_node, path))
                    continue
                at = _join(path, key_node.value)
                key = loader.construct_object(key_node)
                if key in values or str(key) in names:
                    line = key_node.start_mark.line + 1
                    why = _hidden(key_node.value)
                    if why is None:
                        found.append((line, f"{at}: the key {key_node.value!r} is given twice (line {line})"))
                    else:  # "key:sk-..." (no space after the colon) holds a value, maybe a secret
                        found.append(
                            (line, f"{path or '<root>'}: a key (not shown: {why}) is given twice (line {line})")
                        )
                values.add(key)
                names.add(str(key))
                children.append((value_node, at))
        elif isinstance(node, yaml.SequenceNode):
            children = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        stack.extend(reversed(children))  # the first child is walked first: document order
    return [error for _, error in sorted(found)]


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate a YAML config file; raises :class:`ConfigError` listing every problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"<file>: cannot read {path}: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"<file>: {path} is not UTF-8 text (byte {exc.start})"]) from None
    twice: list[str] = []
    paths: dict[int, str] = {}  # a node's id -> its YAML path
    try:
        loader = _ConfigLoader(text)  # a SafeLoader: builds no Python objects
        try:
            node = loader.get_single_node()
            twice = _twice(loader, node, paths) if node is not None else []
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except RecursionError:  # PyYAML's parser recurses: ~600 nested lists were a traceback
        raise ConfigError(["<yaml>: nested too deeply"]) from None
    except _Unreadable as exc:
        where = paths.get(id(exc.node), "<yaml>")
        raise ConfigError([f"{where}: {exc.message} (line {exc.node.start_mark.line + 1})"]) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not take (a NUL): PyYAML tells its offset only
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - text.rfind("\n", 0, exc.position)
        code = ord(exc.character) if isinstance(exc.character, str) else exc.character
        raise ConfigError([f"<yaml line {line}, column {column}>: the character #x{code:04x} is not allowed "
                           f"({exc.reason})"]) from None  # fmt: skip
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise ConfigError([f"<yaml {where}>: {getattr(exc, 'problem', exc)}"]) from None
    try:
        config = parse_config({} if data is None else data, env)  # an empty file (only comments): no settings; `[]`,
        # `false` or `0` are not a config (they were read as an empty one)
    except ConfigError as exc:
        raise ConfigError([*twice, *exc.errors]) from None  # every error at once, the keys given twice first
    if twice:
        raise ConfigError(twice)
    return config
