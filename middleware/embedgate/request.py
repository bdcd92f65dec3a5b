"""The one request model of all three routes: strict validation and the orq normalization.

``parse_request`` turns a JSON body into an :class:`EmbeddingRequest` or raises ``InvalidRequest`` naming the
offending parameter (``retry.count``, ``orq.cache.ttl``, ``input[3]``). Normalization happens here, once:
``orq.X`` moves to ``X`` unless the top level sets it, ``orq.contact`` becomes ``identity`` when no identity is
given, a list-form ``load_balancer`` becomes the object form, and the ``X-ORQ-IDENTITY-ID`` header fills in
``identity`` when the body has none.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from .config import RetryPolicy
from .errors import InvalidRequest

__all__ = ["TWO_IDENTITIES", "CacheRequest", "EmbeddingRequest", "ProviderPreferences", "names_of", "parse_request"]

InputItem = str | tuple[int, ...] | dict[str, Any]
HARD_MAX_ITEMS: Final = 1_000_000  # a sanity ceiling; the per-model limit is checked once the model is known

_TOP_FIELDS: Final = frozenset(
    {
        "model", "input", "encoding_format", "dimensions", "user", "name", "input_type", "cache", "fallbacks",
        "fallback_on_codes", "retry", "load_balancer", "timeout", "identity", "orq", "provider", "session_id",
        "trace",
    }
)  # fmt: skip
_ORQ_FIELDS: Final = frozenset(
    {"cache", "fallbacks", "retry", "load_balancer", "timeout", "name", "identity", "contact", "fallback_on_codes"}
)
_IDENTITY_FIELDS: Final = frozenset({"id", "display_name", "email", "metadata", "logo_url", "tags"})
_PROVIDER_FIELDS: Final = frozenset(
    {
        "order", "only", "ignore", "allow_fallbacks", "sort", "max_price", "require_parameters", "data_collection",
        "zdr", "quantizations", "preferred_min_throughput", "preferred_max_latency", "enforce_distillable_text",
        "options",
    }
)  # fmt: skip
_SORTS: Final = ("price", "latency", "throughput", "exacto")
_SORT_FIELDS: Final = frozenset({"by", "partition"})
#: The media parts of OpenRouter's multimodal input besides images (its SDK types them), forwarded as they came.
_MEDIA_PARTS: Final = frozenset({"input_audio", "input_video", "input_file"})
#: ``provider.max_price``'s fields and what each price is for, as OpenRouter documents them.
_MAX_PRICE_UNITS: Final = {"prompt": "per million tokens", "completion": "per million tokens", "image": "per image",
                           "audio": "per audio unit", "request": "per request"}  # fmt: skip


@dataclass(init=False, kw_only=True, slots=True)
class CacheRequest:
    """``cache: {type: exact_match, ttl}``; ``ttl`` None means the gateway's default. Read, never changed
    (``__init__`` written out: a dataclass's generated one stays interpreted in the compiled build)."""

    ttl: int | None = None

    def __init__(self, *, ttl: int | None = None) -> None:
        self.ttl = ttl


@dataclass(frozen=True, kw_only=True, slots=True)
class ProviderPreferences:
    """OpenRouter's ``provider`` object, as far as it chooses among a model's deployments."""

    order: tuple[str, ...] | None = None
    only: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()
    allow_fallbacks: bool = True
    sort: str | None = None  # "price" | "latency" | "throughput" | "exacto" (accepted, no effect)
    max_price: float | None = None  # USD per million prompt tokens
    require_parameters: bool = False  # only deployments that take every parameter sent (here: input_type)


@dataclass(init=False, kw_only=True, slots=True)
class EmbeddingRequest:
    """A validated, normalized embedding request; read, never changed, once parsed.

    Its ``__init__`` is written out: a dataclass's generated one stays interpreted in the compiled build and took
    ~4 us a request (a frozen one sets each of its 17 fields through ``object.__setattr__``)."""

    model: str
    items: tuple[InputItem, ...]
    input_kind: Literal["string", "strings", "tokens", "token_lists", "mixed", "multimodal"]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    name: str | None = None
    input_type: str | None = None
    cache: CacheRequest | None = None
    fallbacks: tuple[str, ...] = ()
    fallback_on_codes: frozenset[int] | None = None
    retry: RetryPolicy | None = None
    load_balancer: tuple[tuple[str, float], ...] | None = None
    timeout_ms: int | None = None
    identity: dict[str, Any] | None = None
    provider: ProviderPreferences | None = None
    session_id: str | None = None
    #: Where the client wrote a normalized field, when not at its own name: ``{"cache": "orq.cache"}``, or
    #: ``{"load_balancer.models": "load_balancer"}`` for the legacy list form. See :meth:`param`.
    written: dict[str, str] | None = None

    def __init__(
        self,
        *,
        model: str,
        items: tuple[InputItem, ...],
        input_kind: Literal["string", "strings", "tokens", "token_lists", "mixed", "multimodal"],
        encoding_format: Literal["float", "base64"] = "float",
        dimensions: int | None = None,
        user: str | None = None,
        name: str | None = None,
        input_type: str | None = None,
        cache: CacheRequest | None = None,
        fallbacks: tuple[str, ...] = (),
        fallback_on_codes: frozenset[int] | None = None,
        retry: RetryPolicy | None = None,
        load_balancer: tuple[tuple[str, float], ...] | None = None,
        timeout_ms: int | None = None,
        identity: dict[str, Any] | None = None,
        provider: ProviderPreferences | None = None,
        session_id: str | None = None,
        written: dict[str, str] | None = None,
    ) -> None:
        self.model = model
        self.items = items
        self.input_kind = input_kind
        self.encoding_format = encoding_format
        self.dimensions = dimensions
        self.user = user
        self.name = name
        self.input_type = input_type
        self.cache = cache
        self.fallbacks = fallbacks
        self.fallback_on_codes = fallback_on_codes
        self.retry = retry
        self.load_balancer = load_balancer
        self.timeout_ms = timeout_ms
        self.identity = identity
        self.provider = provider
        self.session_id = session_id
        self.written = written

    def param(self, name: str) -> str:
        """The parameter ``name`` of the normalized request (``cache.ttl``) as the client wrote it
        (``orq.cache.ttl``): errors found after parsing name what the client sent."""
        written = self.written
        if written:
            for normal, given in written.items():
                if name.startswith(normal):
                    return given + name[len(normal) :]
        return name

    @property
    def is_multimodal(self) -> bool:
        """Whether any item is OpenRouter's multimodal ``{"content": [...]}`` form."""
        return self.input_kind == "multimodal"

    def upstream_input(self, positions: list[int] | None = None) -> Any:
        """The ``input`` to send upstream for the given item positions (all by default), in the client's form."""
        items = self.items if positions is None else [self.items[i] for i in positions]
        if self.input_kind == "string" and len(items) == 1:
            return items[0]
        if self.input_kind == "tokens" and len(items) == 1:
            return list(items[0])
        return [list(i) if isinstance(i, tuple) else i for i in items]


# --- field checks ----------------------------------------------------------------------------------------------


def _bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid '{param}': {message}", param=param)


def _shown(v: Any) -> str:
    """A client's value as it wrote it (JSON: ``null``, ``true``, ``"text"``) for a message, at most 100 characters."""
    try:
        text = orjson.dumps(v).decode()
    except orjson.JSONEncodeError:  # an integer beyond 64 bits, or arrays or objects nested beyond 254 levels
        # (str() of such nesting raised RecursionError, a 500: its type alone is named)
        text = str(v) if type(v) is int and v.bit_length() < 1024 else _type_name(v)
    return text if len(text) <= 100 else text[:97] + "..."


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(v), type(v).__name__)  # fmt: skip


def _int(v: Any, param: str, lo: int | None = None, hi: int | None = None) -> int:
    # Older SDKs send integers as floats ("3.0"): integral floats are accepted, others are not. The messages quote
    # the value as parsed (3.0, 1e+300), not its conversion (an integer of 301 digits).
    given = v
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise _bad(param, f"expected an integer, got {_type_name(v)}")
    if lo is not None and v < lo:
        raise _bad(param, f"must be >= {lo}, got {given!r}")
    if hi is not None and v > hi:
        raise _bad(param, f"must be <= {hi}, got {given!r}")
    if given is not v and not -_EXACT <= v <= _EXACT:
        # Beyond 2**53 a float is not the integer it was written as (and JSON integers of more than 64 bits
        # arrive as floats): refused rather than taken as some other number.
        raise _bad(param, f"must be an integer within +-{_EXACT}, got {given!r}")
    return v


_EXACT: Final = 2**53


def _str(v: Any, param: str, *, nonempty: bool = False) -> str:
    if not isinstance(v, str):
        raise _bad(param, f"expected a string, got {_type_name(v)}")
    if nonempty and not v:
        raise _bad(param, "must not be empty")
    return v


def _model(v: Any, param: str) -> str:
    """A model id: a non-empty string of at most :data:`_MAX_MODEL` characters (it names spans, log lines and
    metric labels: a 1 MB one made 1 MB access lines)."""
    model = _str(v, param, nonempty=True)
    if len(model) > _MAX_MODEL:
        raise _bad(param, f"at most {_MAX_MODEL} characters, got {len(model)}")
    return model


def _bool(v: Any, param: str) -> bool:
    if not isinstance(v, bool):
        raise _bad(param, f"expected a boolean, got {_type_name(v)}")
    return v


def _obj(v: Any, param: str, allowed: frozenset[str], strict: bool) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _bad(param, f"expected an object, got {_type_name(v)}")
    if strict:
        for key in v:
            if key not in allowed:
                raise InvalidRequest(f"Unrecognized request argument supplied: {param}.{key}", param=f"{param}.{key}",
                                     code="unknown_parameter")  # fmt: skip
    return v


def _list(v: Any, param: str, *, nonempty: bool = False) -> list[Any]:
    if not isinstance(v, list):
        raise _bad(param, f"expected an array, got {_type_name(v)}")
    if nonempty and not v:
        raise _bad(param, "must not be empty")
    return v


def _codes(v: Any, param: str) -> frozenset[int]:
    return frozenset(_int(c, f"{param}[{i}]", 100, 599) for i, c in enumerate(_list(v, param)))


def _strings(v: Any, param: str) -> tuple[str, ...]:
    return tuple(_str(s, f"{param}[{i}]", nonempty=True) for i, s in enumerate(_list(v, param)))


# --- input --------------------------------------------------------------------------------------------------


#: The largest token id taken (uint32: any tokenizer's vocabulary fits many times over). Unbounded, an id above 64
#: bits failed as an internal error on its way upstream (the JSON encoder stops there).
_MAX_TOKEN_ID: Final = 0xFFFFFFFF


def _token_list(v: list[Any], param: str) -> tuple[int, ...]:
    if not v:
        raise _bad(param, "token arrays must not be empty")
    out = []
    for i, t in enumerate(v):
        if isinstance(t, float) and t.is_integer():
            t = int(t)
        if not isinstance(t, int) or isinstance(t, bool) or t < 0 or t > _MAX_TOKEN_ID:
            raise _bad(f"{param}[{i}]", f"token ids are integers from 0 to {_MAX_TOKEN_ID}, got {_shown(t)}"[:200])
        out.append(t)
    return tuple(out)


def _multimodal(v: Any, param: str) -> dict[str, Any]:
    if not isinstance(v, dict) or set(v) != {"content"}:
        raise _bad(param, 'expected {"content": [...]}')
    parts = _list(v["content"], f"{param}.content", nonempty=True)
    for j, part in enumerate(parts):
        p = f"{param}.content[{j}]"
        if not isinstance(part, dict):
            raise _bad(p, f"expected an object, got {_type_name(part)}")
        kind = part.get("type")
        if not isinstance(kind, str):  # a list or an object is no part type (and unhashable: it was a 500)
            raise _bad(f"{p}.type", "expected 'text', 'image_url', 'input_audio', 'input_video' or 'input_file', "
                       f"got {_shown(kind)}"[:200])  # fmt: skip
        if kind == "text":
            _obj(part, p, frozenset({"type", "text"}), True)
            _str(part.get("text"), f"{p}.text", nonempty=True)
        elif kind == "image_url":
            _obj(part, p, frozenset({"type", "image_url"}), True)
            img = _obj(part.get("image_url"), f"{p}.image_url", frozenset({"url", "detail"}), True)
            _str(img.get("url"), f"{p}.image_url.url", nonempty=True)
            if img.get("detail") is not None:  # forwarded upstream: a string, as OpenRouter's API types it
                _str(img["detail"], f"{p}.image_url.detail")
        elif kind in _MEDIA_PARTS:  # {"type": "input_audio", "input_audio": {"data", "format"?}}, as OpenRouter's SDK
            _obj(part, p, frozenset({"type", kind}), True)
            media = _obj(part.get(kind), f"{p}.{kind}", frozenset({"data", "format"}), True)
            _str(media.get("data"), f"{p}.{kind}.data", nonempty=True)
            if media.get("format") is not None:
                _str(media["format"], f"{p}.{kind}.format")
        else:
            raise _bad(f"{p}.type", "expected 'text', 'image_url', 'input_audio', 'input_video' or 'input_file', "
                       f"got {_shown(kind)}"[:200])  # fmt: skip
    return v


def _input(v: Any) -> tuple[tuple[InputItem, ...], Any]:
    if isinstance(v, str):
        if not v:
            raise _bad("input", "must not be an empty string")
        return (v,), "string"
    if not isinstance(v, list):
        raise _bad("input", f"expected a string or an array, got {_type_name(v)}")
    if not v:
        raise _bad("input", "must not be an empty array")
    if len(v) > HARD_MAX_ITEMS:  # (one array of token ids is one item, of as many tokens)
        first = v[0]
        what = "token ids" if isinstance(first, int | float) and not isinstance(first, bool) else "items"
        raise _bad("input", f"at most {HARD_MAX_ITEMS} {what}, got {len(v)}")
    first = v[0]
    if isinstance(first, int | float) and not isinstance(first, bool):
        return (_token_list(v, "input"),), "tokens"
    if isinstance(first, str | list):
        # Strings and token arrays, mixed too: orq types each item as either (the router sends each kind upstream
        # in a call of its own, since OpenAI-style APIs take only one kind per call).
        items: list[InputItem] = []
        texts = 0
        for i, item in enumerate(v):
            if isinstance(item, str):
                if not item:
                    raise _bad(f"input[{i}]", "must not be an empty string")
                items.append(item)
                texts += 1
            elif isinstance(item, list):
                items.append(_token_list(item, f"input[{i}]"))
            else:
                raise _bad(f"input[{i}]", f"expected a string or a token array like the other items, "
                           f"got {_type_name(item)}")  # fmt: skip
        return tuple(items), "strings" if texts == len(items) else "token_lists" if not texts else "mixed"
    if isinstance(first, dict):
        return tuple(_multimodal(m, f"input[{i}]") for i, m in enumerate(v)), "multimodal"
    raise _bad("input[0]", f"expected a string, a token id, a token array or an object, got {_type_name(first)}")


# --- orq extension objects ----------------------------------------------------------------------------------


def _cache(v: Any, p: str, strict: bool) -> CacheRequest:
    c = _obj(v, p, frozenset({"type", "ttl"}), strict)
    if "type" not in c:
        raise _bad(f"{p}.type", "is required ('exact_match')")
    if c["type"] != "exact_match":
        raise _bad(f"{p}.type", f"expected 'exact_match', got {_shown(c['type'])}"[:200])
    ttl = c.get("ttl")
    return CacheRequest(ttl=None if ttl is None else _int(ttl, f"{p}.ttl", 1))


#: The most fallback models a request may name: each can cost its own attempts (and retries) upstream, so an
#: unbounded list let one request make thousands of upstream calls.
_MAX_FALLBACKS: Final = 10


def _fallbacks(v: Any, p: str, strict: bool) -> tuple[str, ...]:
    if v is None:
        return ()
    given = _list(v, p)
    if len(given) > _MAX_FALLBACKS:
        raise _bad(p, f"at most {_MAX_FALLBACKS} models, got {len(given)}")
    out = []
    for i, f in enumerate(given):
        f = _obj(f, f"{p}[{i}]", frozenset({"model"}), strict)
        if "model" not in f:
            raise _bad(f"{p}[{i}].model", "is required")
        out.append(_model(f["model"], f"{p}[{i}].model"))
    return tuple(out)


def _retry(v: Any, p: str, strict: bool, default: RetryPolicy) -> RetryPolicy:
    r = _obj(v, p, frozenset({"count", "on_codes"}), strict)
    count = _int(r["count"], f"{p}.count", 0, 5) if r.get("count") is not None else default.count
    codes = _codes(r["on_codes"], f"{p}.on_codes") if r.get("on_codes") is not None else default.on_codes
    return RetryPolicy(count=count, on_codes=codes)


def _load_balancer(v: Any, p: str, strict: bool) -> tuple[tuple[str, float], ...]:
    listed = p  # where the models are listed: errors about them as a whole name it
    if isinstance(v, list):  # the legacy list form: [{type, model, weight}]
        entries = []
        for i, e in enumerate(v):
            e = _obj(e, f"{p}[{i}]", frozenset({"type", "model", "weight"}), strict)
            if e.get("type", "weight_based") != "weight_based":
                raise _bad(f"{p}[{i}].type", f"expected 'weight_based', got {_shown(e.get('type'))}"[:200])
            entries.append((f"{p}[{i}]", e))
    else:
        lb = _obj(v, p, frozenset({"type", "models"}), strict)
        if lb.get("type") != "weight_based":
            raise _bad(f"{p}.type", f"expected 'weight_based', got {_shown(lb.get('type'))}"[:200])
        if "models" not in lb:  # the schema requires it (type and models); null is allowed
            raise _bad(f"{p}.models", "is required (the models to balance, or null for none)")
        if lb["models"] is None:  # orq types it [array, null]: no models, no load balancing
            return ()
        listed = f"{p}.models"
        models = _list(lb.get("models"), listed)
        entries = [(f"{p}.models[{i}]", _obj(e, f"{p}.models[{i}]", frozenset({"model", "weight"}), strict))
                   for i, e in enumerate(models)]  # fmt: skip
    if not entries:
        raise _bad(listed, "needs at least one model")
    out = []
    for ep, e in entries:
        model = _model(e.get("model"), f"{ep}.model")
        weight = e.get("weight")
        if not isinstance(weight, int | float) or isinstance(weight, bool) or not 0 <= weight < math.inf:
            raise _bad(f"{ep}.weight", f"expected a number >= 0, got {_shown(weight)}"[:200])
        out.append((model, float(weight)))
    top = max(w for _, w in out)
    if top <= 0:
        raise _bad(listed, "the weights must not all be zero")
    # Relative to the largest: weights near a float's limit (1e308 twice) would sum to infinity.
    return tuple((model, w / top) for model, w in out)


def _timeout(v: Any, p: str, strict: bool) -> int:
    t = _obj(v, p, frozenset({"call_timeout"}), strict)
    if "call_timeout" not in t:
        raise _bad(f"{p}.call_timeout", "is required (milliseconds)")
    return _int(t["call_timeout"], f"{p}.call_timeout", 1, 600000)


#: The longest ``name`` taken: it names the request's trace, sent to the tracing backend with every span of it.
_MAX_NAME: Final = 1024
_MAX_MODEL: Final = 256


def _name(v: Any, p: str) -> str:
    name = _str(v, p)
    if len(name) > _MAX_NAME:
        raise _bad(p, f"at most {_MAX_NAME} characters, got {len(name)}")
    return name


#: An identity is kept (the in-memory store holds up to 100,000, Redis all) and its id names spans, log lines and
#: budget counters: bounded, so that one client cannot fill the gateway's memory with made-up profiles.
_MAX_IDENTITY_ID: Final = 256  # characters: an email address (254 at most), a UUID, an orq contact id all fit
_MAX_IDENTITY_BYTES: Final = 8192  # the whole profile, as JSON
#: The identity header of a request that sent two different ones (no header value holds a line feed): whose is it?
TWO_IDENTITIES: Final = "\n"


def _identity(v: Any, p: str, strict: bool) -> dict[str, Any]:
    ident = _obj(v, p, _IDENTITY_FIELDS, strict)
    if "id" not in ident:
        raise _bad(f"{p}.id", "is required")
    out: dict[str, Any] = {"id": _str(ident["id"], f"{p}.id", nonempty=True)}
    for key in ("display_name", "email", "logo_url"):
        if ident.get(key) is not None:
            out[key] = _str(ident[key], f"{p}.{key}")
    if ident.get("metadata") is not None:
        meta = _list(ident["metadata"], f"{p}.metadata")
        for i, m in enumerate(meta):
            if not isinstance(m, dict):
                raise _bad(f"{p}.metadata[{i}]", f"expected an object, got {_type_name(m)}")
        out["metadata"] = meta
    if ident.get("tags") is not None:
        # strings, empty ones included (orq types a tag as any string)
        out["tags"] = [_str(t, f"{p}.tags[{i}]") for i, t in enumerate(_list(ident["tags"], f"{p}.tags"))]
    if len(out["id"]) > _MAX_IDENTITY_ID:
        raise _bad(f"{p}.id", f"at most {_MAX_IDENTITY_ID} characters, got {len(out['id'])}")
    try:
        size = len(orjson.dumps(out))
    except orjson.JSONEncodeError:  # read up to 1024 levels deep, written up to 255
        raise _bad(f"{p}.metadata", "nested too deeply (at most 255 levels)") from None
    if size > _MAX_IDENTITY_BYTES:
        raise _bad(p, f"at most {_MAX_IDENTITY_BYTES} bytes as JSON, got {size}")
    return out


_DECIMAL: Final = re.compile(r"\d+(\.\d*)?([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?")


def _price(v: Any, param: str, unit: str = "per million tokens") -> float:
    """A price in USD (per million tokens unless ``unit`` says): a number or, as OpenRouter writes big numbers, a
    numeric string; >= 0."""
    price = -1.0
    if isinstance(v, int | float) and not isinstance(v, bool):
        price = float(v)
    elif isinstance(v, str) and _DECIMAL.fullmatch(v):  # not float()'s "1_0", "inf", " 1 " or "1e999"
        price = float(v)
    if not 0.0 <= price < math.inf:  # NaN is not >= 0
        raise _bad(param, f"expected a price >= 0 (USD {unit}, a number or a numeric string), got {_shown(v)}")
    return price


def _provider(v: Any, strict: bool) -> ProviderPreferences:
    p = _obj(v, "provider", _PROVIDER_FIELDS, strict)

    def names(key: str) -> tuple[str, ...] | None:
        return None if p.get(key) is None else _strings(p[key], f"provider.{key}")

    sort, sort_param = p.get("sort"), "provider.sort"
    if isinstance(sort, dict):  # {by, partition}: a partition (an open set of names in the SDK) has no effect here
        sort_obj = _obj(sort, sort_param, _SORT_FIELDS, strict)
        if sort_obj.get("partition") is not None:
            _str(sort_obj["partition"], "provider.sort.partition")
        sort, sort_param = sort_obj.get("by"), "provider.sort.by"
    if sort is not None and sort not in _SORTS:
        raise _bad(sort_param, f"expected 'price', 'latency', 'throughput' or 'exacto', got {_shown(sort)}")
    max_price = None
    if p.get("max_price") is not None:
        mp = _obj(p["max_price"], "provider.max_price", frozenset(_MAX_PRICE_UNITS), strict)
        for key, unit in _MAX_PRICE_UNITS.items():  # only the prompt's price chooses here; all are checked
            if mp.get(key) is not None:
                price = _price(mp[key], f"provider.max_price.{key}", unit)
                if key == "prompt":
                    max_price = price
    # require_parameters keeps only the deployments that take every parameter sent (see routing); the other two
    # have no effect here (there is one gateway's deployments to choose from), but all are checked as OpenRouter
    # types them: a misspelt value is an error, not silently a default.
    for flag in ("require_parameters", "zdr", "enforce_distillable_text"):
        if p.get(flag) is not None:
            _bool(p[flag], f"provider.{flag}")
    require = p.get("require_parameters") is True
    if p.get("data_collection") is not None and p["data_collection"] not in ("deny", "allow"):
        raise _bad("provider.data_collection", f"expected 'deny' or 'allow', got {_shown(p['data_collection'])}")
    if p.get("quantizations") is not None:  # an open set of names (OpenRouter adds new ones: mxfp4, nvfp4 ...)
        names("quantizations")
    if p.get("options") is not None:  # options per provider slug: {slug: {...}}
        for slug, options in _obj(p["options"], "provider.options", frozenset(), False).items():
            _obj(options, f"provider.options.{slug}", frozenset(), False)
    return ProviderPreferences(
        order=names("order"),
        only=names("only"),
        ignore=names("ignore") or (),
        allow_fallbacks=True
        if p.get("allow_fallbacks") is None
        else _bool(p["allow_fallbacks"], "provider.allow_fallbacks"),
        sort=sort,
        max_price=max_price,
        require_parameters=require,
    )


# --- the whole body -----------------------------------------------------------------------------------------


def _pick(data: dict[str, Any], orq: dict[str, Any], key: str) -> tuple[Any, str]:
    """A field's value and the parameter it came from: the top level wins; the deprecated ``orq.X`` fills in only
    what the top level leaves unset (a module function, not a closure: a compiled closure's call costs ~2x)."""
    value = data.get(key)
    if value is not None:
        return value, key
    value = orq.get(key)
    if value is not None:
        return value, f"orq.{key}"
    return None, key


def names_of(body: bytes) -> tuple[str | None, str | None]:
    """The ``name`` (the top level's, else ``orq.name``) and ``model`` a body that failed validation still gives,
    where they are valid, for its trace and access line: ``(None, None)`` if it is not a JSON object."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    return _names(data)


def _names(data: dict[str, Any]) -> tuple[str | None, str | None]:
    """:func:`names_of` of a body read."""
    orq = data.get("orq")
    name, _ = _pick(data, orq if isinstance(orq, dict) else {}, "name")
    model = data.get("model")
    return (name if isinstance(name, str) and 0 < len(name) <= _MAX_NAME else None,
            model if isinstance(model, str) and 0 < len(model) <= _MAX_MODEL else None)  # fmt: skip


def parse_request(
    body: bytes,
    *,
    identity_header: str | None = None,
    identity_header_name: str = "x-orq-identity-id",
    unknown_fields: str = "reject",
    default_retry: RetryPolicy | None = None,
) -> EmbeddingRequest:
    """Validate and normalize a request body; raises ``InvalidRequest`` naming the parameter."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        found = _unreadable(body, str(exc))
        if found is not None:
            raise InvalidRequest(f"Invalid '{found[0]}': {found[1]}", param=found[0]) from None
        try:  # orjson calls bytes that are not UTF-8 "surrogates" (a Latin-1 "\xff", say): say what they are
            bytes(body).decode()
        except UnicodeDecodeError as bad:
            raise InvalidRequest(f"The request body is not valid UTF-8 (byte 0x{body[bad.start]:02x} at offset "
                                 f"{bad.start}); JSON is sent as UTF-8", param=None, code="invalid_json"
                                 ) from None  # fmt: skip
        raise InvalidRequest(f"The request body is not valid JSON: {exc}", param=None, code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"The request body must be a JSON object, got {_type_name(data)}", param=None)
    try:
        return _request_of(data, identity_header, identity_header_name, unknown_fields, default_retry)
    except InvalidRequest as refused:
        refused.names = _names(data)  # (its trace's name, read once: reading the body again cost a second parse)
        raise


def _request_of(data: dict[str, Any], identity_header: str | None, identity_header_name: str, unknown_fields: str,
                default_retry: RetryPolicy | None) -> EmbeddingRequest:  # fmt: skip
    """:func:`parse_request` of a body read as a JSON object."""
    strict = unknown_fields == "reject"
    if strict:
        for key in data:
            if key not in _TOP_FIELDS:
                raise InvalidRequest(f"Unrecognized request argument supplied: {key}", param=key,
                                     code="unknown_parameter")  # fmt: skip
    retry_default = default_retry or RetryPolicy()

    if "model" not in data:
        raise _bad("model", "is required")
    model = _model(data["model"], "model")
    if "input" not in data:
        raise _bad("input", "is required")
    items, kind = _input(data["input"])

    fmt = data.get("encoding_format")
    if fmt is None:
        fmt = "float"
    elif fmt not in ("float", "base64"):
        raise _bad("encoding_format", f"expected 'float' or 'base64', got {_shown(fmt)}"[:200])

    orq: dict[str, Any] = {}
    if data.get("orq") is not None:
        orq = _obj(data["orq"], "orq", _ORQ_FIELDS, strict)

    cache_v, cache_p = _pick(data, orq, "cache")
    fb_v, fb_p = _pick(data, orq, "fallbacks")
    codes_v, codes_p = _pick(data, orq, "fallback_on_codes")
    retry_v, retry_p = _pick(data, orq, "retry")
    lb_v, lb_p = _pick(data, orq, "load_balancer")
    to_v, to_p = _pick(data, orq, "timeout")
    name_v, name_p = _pick(data, orq, "name")
    ident_v, ident_p = _pick(data, orq, "identity")
    if ident_v is None and orq.get("contact") is not None:
        ident_v, ident_p = orq["contact"], "orq.contact"
    identity = _identity(ident_v, ident_p, strict) if ident_v is not None else None
    if identity is None and identity_header:
        if identity_header == TWO_IDENTITIES:  # one of them would be dropped unseen: the client says which
            raise InvalidRequest(f"Invalid '{identity_header_name}': sent twice with different values; send one",
                                 param=identity_header_name)  # fmt: skip
        if len(identity_header) > _MAX_IDENTITY_ID:
            raise InvalidRequest(f"Invalid '{identity_header_name}': at most {_MAX_IDENTITY_ID} characters, got "
                                 f"{len(identity_header)}", param=identity_header_name)  # fmt: skip
        identity = {"id": identity_header}

    if data.get("trace") is not None:
        _obj(data["trace"], "trace", frozenset(), False)  # OpenRouter's trace metadata: accepted, not forwarded
    dims = data.get("dimensions")
    return EmbeddingRequest(
        model=model,
        items=items,
        input_kind=kind,
        encoding_format="base64" if fmt == "base64" else "float",
        dimensions=None if dims is None else _int(dims, "dimensions", 1, 65536),
        user=None if data.get("user") is None else _str(data["user"], "user"),
        name=None if name_v is None else _name(name_v, name_p),
        input_type=None if data.get("input_type") is None else _str(data["input_type"], "input_type", nonempty=True),
        cache=None if cache_v is None else _cache(cache_v, cache_p, strict),
        fallbacks=_fallbacks(fb_v, fb_p, strict),
        fallback_on_codes=None if codes_v is None else _codes(codes_v, codes_p),
        retry=None if retry_v is None else _retry(retry_v, retry_p, strict, retry_default),
        load_balancer=None if lb_v is None else _load_balancer(lb_v, lb_p, strict),
        timeout_ms=None if to_v is None else _timeout(to_v, to_p, strict),
        identity=identity,
        provider=None if data.get("provider") is None else _provider(data["provider"], strict),
        session_id=None if data.get("session_id") is None else _str(data["session_id"], "session_id"),
        written=_written(cache_p, fb_p, lb_p, lb_v),
    )


#: The largest finite double, as a whole number: a larger one reads as infinity.
_MAX_DOUBLE: Final = int(1.7976931348623157e308)
#: A UTF-16 surrogate code point (a regex escape: mypyc takes no surrogate in a string literal).
_SURROGATE: Final = re.compile(r"[\ud800-\udfff]")


def _whole(digits: str) -> int | float:
    """A JSON whole number for ``_unreadable``: one of 400 digits or more as a double (infinity), as orjson reads it."""
    return int(digits) if len(digits) < 400 else float(digits)


class _Members:
    """A JSON object as ``_unreadable`` reads it: every member, in order, those of a repeated name too (a dict keeps
    only the last: the refused value of an earlier one was lost, and the body called invalid JSON)."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self.pairs = pairs


def _unreadable(body: bytes, reason: str) -> tuple[str, str] | None:
    """Where a body that is JSON but for what orjson refuses holds it (``input[3]``), and what it is: a lone UTF-16
    surrogate, or a number beyond a double's range (``1e400``). orjson refuses the whole body, so this error path
    alone re-reads it with the standard library, which keeps both (the number as infinity)."""
    surrogate = "surrogate" in reason
    if not surrogate and "infinity" not in reason:
        return None
    try:
        # (a whole number of over 4,300 digits is a ValueError to int(): read as a double, infinity, as orjson did)
        data = json.loads(bytes(body).decode("utf-8", "surrogatepass"), parse_int=_whole, object_pairs_hook=_Members)
    except (ValueError, RecursionError):
        return None
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            bad = _SURROGATE.search(v) if surrogate else None
            if bad is not None:
                return (
                    path or "body",
                    f"contains a lone UTF-16 surrogate (\\u{ord(bad.group()):04x}), which is not valid Unicode",
                )
        elif isinstance(v, (float, int)):
            # (orjson reads a whole number of more than 64 bits as a double: one past a double's range is infinity)
            if not surrogate and (math.isinf(v) if isinstance(v, float) else abs(v) > _MAX_DOUBLE):
                return path or "body", "is a number out of range (beyond +-1.8e308)"
        elif isinstance(v, list):
            items: list[Any] = v
            for i in range(len(items) - 1, -1, -1):  # (index loops: mypyc 2.4 fails on reversed(enumerate) here)
                stack.append((f"{path}[{i}]", items[i]))
        elif isinstance(v, _Members):
            pairs: list[tuple[str, Any]] = v.pairs
            for key, _ in pairs:
                if surrogate and _SURROGATE.search(key):  # such a key can't be named: name its place
                    return path or "body", "holds a field name with a lone UTF-16 surrogate, which is not valid Unicode"
            for j in range(len(pairs) - 1, -1, -1):
                key, x = pairs[j]
                stack.append((f"{path}.{key}" if path else key, x))
    return None


def _written(cache_p: str, fb_p: str, lb_p: str, lb_v: Any) -> dict[str, str] | None:
    """``EmbeddingRequest.written``: where the fields checked after parsing were written, if not at their name."""
    legacy_lb = isinstance(lb_v, list)  # the legacy form lists the models itself
    if cache_p == "cache" and fb_p == "fallbacks" and lb_p == "load_balancer" and not legacy_lb:
        return None  # the usual request: nothing built
    out: dict[str, str] = {}
    if cache_p != "cache":
        out["cache"] = cache_p
    if fb_p != "fallbacks":
        out["fallbacks"] = fb_p
    lb_models = lb_p if legacy_lb else f"{lb_p}.models"
    if lb_models != "load_balancer.models":
        out["load_balancer.models"] = lb_models
    return out
