"""The current OpenTelemetry span, read and made current in one step each.

``trace.get_current_span`` and ``context.attach(trace.set_span_in_context(span))`` go through four or five layers
of the API (runtime context, ``get_value``, ``set_value``) to read or set one ``ContextVar``; a request does that
a dozen times (six spans, five of them made current). When OTel's default runtime context is in use (contextvars,
as almost always), these functions touch its ``ContextVar`` directly, with the same result: the same ``Context``
contents, the same token semantics. With any other runtime context (``OTEL_PYTHON_CONTEXT``) they call the API.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from typing import Final

from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.trace import INVALID_SPAN, Span
from opentelemetry.trace import propagation as _propagation

__all__ = ["attach_root", "attach_span", "current_span", "detach", "has_baggage", "is_inherited_root"]


def _fast_path() -> tuple[ContextVar[Context], str] | None:
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    var = getattr(runtime, "_current_context", None) if type(runtime) is ContextVarsRuntimeContext else None
    key = getattr(_propagation, "_SPAN_KEY", None)
    return (var, key) if isinstance(var, ContextVar) and isinstance(key, str) else None


class _Runtime:
    """Where the direct path finds OTel's context (``fast``: its ``ContextVar`` and the span's key), or None."""

    __slots__ = ("fast",)

    def __init__(self) -> None:
        self.fast = _fast_path()


# Final: the compiled build keeps these in C variables (a plain module global is a dict lookup on every use).
_RUNTIME: Final = _Runtime()
_BAGGAGE_KEY: Final = getattr(otel_baggage, "_BAGGAGE_KEY", None)  # where the API keeps the baggage in a Context
_INVALID_SPAN: Final = INVALID_SPAN
_Context: Final = Context
_ROOT_KEY: Final = otel_context.create_key("embedgate-request-root")
# Span classes seen in the context: ``isinstance`` against the ``Span`` ABC goes through ``ABCMeta`` in Python
# (~1% of a request's CPU, called for every span); a class already checked is found in this set instead.
_SPAN_TYPES: Final[set[type]] = set()


def current_span(context: Context | None = None) -> Span:
    """``trace.get_current_span(context)``."""
    fast = _RUNTIME.fast
    if fast is None:
        return trace.get_current_span(context)
    var, key = fast
    span = (var.get() if context is None else context).get(key)
    if type(span) in _SPAN_TYPES:
        return span  # type: ignore[return-value]
    if span is None or not isinstance(span, Span):
        return _INVALID_SPAN
    if len(_SPAN_TYPES) < 64:  # bounded: span classes are few, but a context is anyone's to fill
        _SPAN_TYPES.add(type(span))
    return span


def attach_span(span: Span) -> Token[Context]:
    """``context.attach(trace.set_span_in_context(span))``: ``span`` is current until :func:`detach`."""
    fast = _RUNTIME.fast
    if fast is None:
        return otel_context.attach(trace.set_span_in_context(span))
    var, key = fast
    return var.set(_Context({**var.get(), key: span}))


def attach_root(span: Span) -> Token[Context]:
    """:func:`attach_span` for a request's root span, marked as such in the context (see :func:`is_inherited_root`)."""
    fast = _RUNTIME.fast
    if fast is None:
        return otel_context.attach(otel_context.set_value(_ROOT_KEY, span, trace.set_span_in_context(span)))
    var, key = fast
    return var.set(_Context({**var.get(), key: span, _ROOT_KEY: span}))


def is_inherited_root(span: Span) -> bool:
    """Whether ``span``, the current one, is the root span of a request of the gateway's: a request started in its
    predecessor's context (uvicorn's protocols start a pipelined request so), not in a host's span."""
    fast = _RUNTIME.fast
    context = otel_context.get_current() if fast is None else fast[0].get()
    return context.get(_ROOT_KEY) is span


def detach(token: Token[Context]) -> None:
    """``context.detach(token)`` (a token of another context is logged by the API, not raised)."""
    fast = _RUNTIME.fast
    if fast is None:
        otel_context.detach(token)
        return
    try:
        fast[0].reset(token)
    except ValueError:
        otel_context.detach(token)


def has_baggage() -> bool:
    """``bool(baggage.get_all())``: whether the current context carries baggage."""
    fast = _RUNTIME.fast
    if fast is None or not isinstance(_BAGGAGE_KEY, str):
        return bool(otel_baggage.get_all())
    value = fast[0].get().get(_BAGGAGE_KEY)
    return isinstance(value, dict) and bool(value)
