"""OTLP protobuf encoding of packed spans, straight to wire bytes, for the export helper process.

The SDK's exporters encode ``ReadableSpan`` objects through ``encode_spans``: rebuilding those objects from the
packed spans and building one protobuf object per attribute costs ~65 us a span, so at a few thousand spans a
second the helper needs most of a core. Writing the protobuf wire format directly costs a fraction of it. The
bytes are parsed back into the exporter's own ``ExportTraceServiceRequest`` (one C call), so the OTLP exporters
send exactly what they would have built, with their own endpoint, headers, compression, retries and TLS.

Wire format reference: opentelemetry-proto ``trace/v1/trace.proto`` and ``common/v1/common.proto``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

__all__ = ["encode_request"]

_MASK64: Final = (1 << 64) - 1
_DOUBLE: Final = struct.Struct("<d")
_FIXED64: Final = struct.Struct("<Q")
_FIXED32: Final = struct.Struct("<I")
_TRACE_ID: Final = struct.Struct(">QQ")  # high and low halves, big-endian, as OTLP wants
_SPAN_ID: Final = struct.Struct(">Q")
_FLAGS_LOCAL: Final = b"\x85\x01" + _FIXED32.pack(0x100)  # field 16: "has is_remote", parent not remote
_FLAGS_REMOTE: Final = b"\x85\x01" + _FIXED32.pack(0x300)  # ... and the parent is remote


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its one-byte tag, the length, the payload."""
    return tag + _varint(len(payload)) + payload


def _any_value(value: Any) -> bytes:
    """An ``AnyValue`` message (string 1, bool 2, int 3, double 4, array 5); empty for None."""
    kind = type(value)
    if value is None:  # not an attribute value the lean tracer keeps; an empty AnyValue rather than a failure
        return b""
    if kind is str:
        return _field(b"\x0a", value.encode("utf-8", "replace"))
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int:
        return b"\x18" + _varint(value & _MASK64)
    if kind is float:
        return b"\x21" + _DOUBLE.pack(value)
    if kind is list or kind is tuple:
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any_value(v)) for v in value))
    return _field(b"\x0a", str(value).encode("utf-8", "replace"))


# Encoded ``KeyValue.key`` fields, by key (the same few dozen names repeat in every span).
_KEYS: Final[dict[str, bytes]] = {}


def _key(key: str) -> bytes:
    encoded = _KEYS.get(key)
    if encoded is None:
        encoded = _field(b"\x0a", key.encode("utf-8", "replace"))
        if len(_KEYS) < 4096:
            _KEYS[key] = encoded
    return encoded


# Whole encoded ``KeyValue`` fields of str and int attributes, by (tag, key, value): most attribute values repeat
# from span to span (operation, route, model, provider, cache outcome, status code). Not bools: True == 1 as a dict
# key. Cleared when full, so that unique values (request ids) cannot crowd it out for good.
_PAIRS: Final[dict[tuple[bytes, str, Any], bytes]] = {}
_MAX_PAIRS: Final = 8192


def _attributes(tag: bytes, attributes: Mapping[str, Any]) -> bytes:
    """Repeated ``KeyValue`` fields under ``tag``."""
    pairs = _PAIRS
    out = []
    for k, v in attributes.items():
        kind = type(v)
        if kind is str or kind is int:
            pair = (tag, k, v)
            encoded = pairs.get(pair)
            if encoded is None:
                encoded = _field(tag, _key(k) + _field(b"\x12", _any_value(v)))
                if len(pairs) >= _MAX_PAIRS:
                    pairs.clear()
                pairs[pair] = encoded
        else:
            encoded = _field(tag, _key(k) + _field(b"\x12", _any_value(v)))
        out.append(encoded)
    return b"".join(out)


def _span(packed: list[Any]) -> bytes:
    name, high, low, span_id, _flags, parent, kind, start, end, attrs, status, events, _scope = packed
    out = [b"\x0a\x10", _TRACE_ID.pack(high, low), b"\x12\x08", _SPAN_ID.pack(span_id)]
    if parent is not None:
        out += (b"\x22\x08", _SPAN_ID.pack(parent[0]))
    out += (
        _field(b"\x2a", name.encode("utf-8", "replace")),
        b"\x30", _varint(kind + 1),  # OTLP's SpanKind counts from UNSPECIFIED = 0
        b"\x39", _FIXED64.pack(start),
        b"\x41", _FIXED64.pack(end),
    )  # fmt: skip
    if attrs:
        out.append(_attributes(b"\x4a", attrs))
    for event_name, timestamp, event_attrs in events:
        body = b"\x09" + _FIXED64.pack(timestamp) + _field(b"\x12", event_name.encode("utf-8", "replace"))
        out.append(_field(b"\x5a", body + _attributes(b"\x1a", event_attrs)))
    code, message = status
    if code or message:
        body = (_field(b"\x12", message.encode("utf-8", "replace")) if message else b"") + b"\x18" + _varint(code)
        out.append(_field(b"\x7a", body))
    else:
        out.append(b"\x7a\x00")  # an empty Status, as the SDK's encoder writes it
    out.append(_FLAGS_LOCAL if parent is None or not parent[1] else _FLAGS_REMOTE)
    return b"".join(out)


def _scope(scope: list[Any] | None) -> bytes:
    if scope is None:
        return b""
    name, version = scope
    body = _field(b"\x0a", (name or "").encode("utf-8", "replace"))
    if version:
        body += _field(b"\x12", version.encode("utf-8", "replace"))
    return _field(b"\x0a", body)


#: Spans encoded between two calls of ``encode_request``'s ``pause`` (~100 us of work on the benchmark machine).
PAUSE_EVERY: Final = 32


def encode_request(
    spans: Iterable[list[Any]], resource_attributes: Mapping[str, Any], pause: Callable[[], object] | None = None
) -> bytes:
    """An ``ExportTraceServiceRequest`` holding ``spans`` (packed, see ``span_export``) under one resource.

    ``pause``, if given, is called after every :data:`PAUSE_EVERY` spans (the helper passes ``os.sched_yield``)."""
    by_scope: dict[tuple[Any, ...], list[bytes]] = {}
    done = 0
    for packed in spans:
        done += 1
        if pause is not None and done % PAUSE_EVERY == 0:
            pause()
        scope = packed[12]
        by_scope.setdefault(tuple(scope) if scope is not None else (), []).append(_span(packed))
    resource = _field(b"\x0a", _attributes(b"\x0a", resource_attributes))
    scope_spans = b"".join(
        _field(b"\x12", _scope(list(scope) if scope else None) + b"".join(_field(b"\x12", s) for s in encoded))
        for scope, encoded in by_scope.items()
    )
    return _field(b"\x0a", resource + scope_spans)
