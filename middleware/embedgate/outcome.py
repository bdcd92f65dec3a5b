"""What the gateway makes of one embedding request's outcome, once the pipeline is done with it: the response
headers, the root span's attributes, the metrics and the access line. Also the few request headers it reads.

Sync code run on every request, kept apart from the gateway's ASGI entry (both are compiled by the build, see
``embedgate._native.COMPILED``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from opentelemetry.util.types import AttributeValue

from .errors import BudgetExceeded, ClientDisconnected, GatewayError
from .logs import access_log
from .metrics import Metrics
from .pipeline import Call, one_authorization
from .request import TWO_IDENTITIES
from .telemetry import RequestSpan

__all__ = ["JSON_CONTENT_TYPE", "account", "annotate", "embed_headers", "response_headers"]

# The request headers an embedding POST reads: only these are decoded (an SDK sends a dozen more).
_EMBED_HEADERS: Final = {
    name.encode(): name
    for name in ("authorization", "content-type", "content-length", "content-encoding", "x-request-id",
                 "x-orq-identity-id", "x-orq-contact-id", "cache-control")
}  # fmt: skip
JSON_CONTENT_TYPE: Final = (b"content-type", b"application/json")


def embed_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The headers of :data:`_EMBED_HEADERS` in the ASGI ``raw`` headers, by lowercase name: the last one of a
    repeated name, but ``Cache-Control``'s lines joined with commas, as one list (RFC 9110, 5.3), two
    ``Authorization`` lines as :func:`~embedgate.pipeline.one_authorization` reads them, and two different identity
    headers of one name as :data:`~embedgate.request.TWO_IDENTITIES`."""
    out: dict[str, str] = {}
    for key, value in raw:
        name = _EMBED_HEADERS.get(key)
        if name is None:
            if key.islower():  # ASGI servers lowercase names
                continue
            name = _EMBED_HEADERS.get(key.lower())
            if name is None:
                continue
        try:  # as clients send non-ASCII text (curl, browsers, the SDKs): the body's "jöhn" is the header's
            text = value.decode()
        except UnicodeDecodeError:
            text = value.decode("latin-1")
        if name in out:
            if name == "cache-control":
                text = f"{out[name]}, {text}"
            elif name == "authorization":
                text = one_authorization(out[name], text)  # which of two keys is the client's? (a 401 says so)
            elif name in ("x-orq-identity-id", "x-orq-contact-id"):
                if not text:  # an empty one (no identity) beside one that names it: that one
                    continue
                if out[name] and text != out[name]:
                    text = TWO_IDENTITIES  # whose request is it? (a 400 says so, unless the body names the identity)
        out[name] = text
    return out


def response_headers(call: Call, body_length: int, trace_id_hex: str) -> list[tuple[bytes, bytes]]:
    """The answer's headers: JSON with its length (one body, no chunked framing), the request and trace ids, the
    cache outcome, then the stages' own (budget, fallback ...)."""
    out = [
        JSON_CONTENT_TYPE,
        (b"content-length", str(body_length).encode()),
        (b"x-request-id", call.request_id.encode()),
        (b"x-embedgate-trace-id", trace_id_hex.encode()),
        (b"x-embedgate-cache", call.cache_status.encode()),
    ]
    for name, value in call.headers.items():
        out.append((name.encode(), value.encode()))
    return out


def annotate(root: RequestSpan, call: Call, error: GatewayError | None) -> None:
    """Span attributes of the request: ids, cache and budget outcome; never a key or the input."""
    if not root.is_recording:
        return
    req, key = call.request, call.key
    # a budget's refusal the client left before it was sent is a refusal all the same
    refusal = error.unsent if type(error) is ClientDisconnected else error
    attrs: dict[str, AttributeValue] = {
        "gen_ai.operation.name": "embeddings",
        "embedgate.request_id": call.request_id,
        "embedgate.route": call.dialect._value_,  # the member's value without Enum's Python-level property
        "embedgate.cache": call.cache_status,
        "embedgate.budget.decision": "rejected" if isinstance(refusal, BudgetExceeded) else call.budget_decision,
        "embedgate.attempts": call.attempts,
    }
    if req is not None:
        if req.load_balancer and call.chain:  # the request's model is ignored: the one the balancer picked
            attrs["gen_ai.request.model"] = picked = call.chain[0].id
            if not req.name:
                root.rename(f"embeddings {picked}")
        else:
            attrs["gen_ai.request.model"] = req.model
        attrs["embedgate.input_count"] = len(req.items)
        attrs["embedgate.encoding_format"] = req.encoding_format
        if req.identity:
            attrs["embedgate.identity_id"] = req.identity["id"]
    if key is not None:
        attrs["embedgate.key_id"] = key.id
        attrs["embedgate.workspace"] = key.workspace
        attrs["embedgate.project"] = key.project
    if isinstance(refusal, BudgetExceeded):
        attrs["embedgate.budget.scope"] = refusal.scope_kind
        attrs["embedgate.budget.dimension"] = refusal.dimension
    if error is not None and error.code:
        attrs["embedgate.error.code"] = error.code
    if error is None:
        attrs["gen_ai.response.model"] = call.served_model
        attrs["gen_ai.usage.input_tokens"] = call.prompt_tokens
        attrs["embedgate.cost_usd"] = call.cost_usd
    elif call.billed_tokens:  # failed, but paid for upstream (see account)
        attrs["embedgate.cost_usd"] = call.cost_usd
    if call.billed_tokens:
        attrs["embedgate.billed_tokens"] = call.billed_tokens
    root.set_many(attrs)


def account(metrics: Metrics, write_access_line: bool, call: Call, status: int, error: GatewayError | None,
            answered: float, trace_id: str | None = None, span_id: str | None = None,
            sent_model: str | None = None) -> None:  # fmt: skip
    """Metrics and the one access line of the request, ``answered`` (``perf_counter``) once its answer was sent;
    ``sent_model``: the model a body refused before it was parsed whole names (for the access line only).

    The line names the request's ids itself: it must not depend on a host's structlog chain merging the bound
    contextvars, nor on the request having bound any (a gateway that could not start binds none)."""
    req, key = call.request, call.key
    # Labelled only with a model that resolved (or served): a name that resolved to nothing (a 404) is the client's
    # own string, and spraying such names would use up the metric's label sets (capped, then folded into "other").
    model = call.served_model or (call.chain[0].id if call.chain else "")
    route: str = call.dialect._value_  # the member's value without Enum's Python-level property
    metrics.observe_request(route, model if key is not None else "", status, call.cache_status)
    if key is not None and call.billed_tokens:
        if call.spent:  # tokens other models charged (chunks of a split batch they embedded before failing)
            _observe_spent(metrics, key.id, model, call)
        else:
            metrics.observe_usage(key.id, model, call.billed_tokens, call.cost_usd)
    # Lookups of an answer made, sent or not (a client gone before it: its items were fetched, paid for, cached)
    if call.cache_status != "bypass" and (
        error is None or (type(error) is ClientDisconnected and error.unsent is None)
    ):
        metrics.observe_cache_items(len(call.vectors) - call.items_fetched, call.items_fetched)
    if write_access_line:
        access_log(
            status=status,
            latency_ms=(answered - call.started) * 1000,  # rounded by access_log
            request_id=call.request_id,
            trace_id=trace_id,
            span_id=span_id,
            route=route,
            key_id=key.id if key is not None else None,
            identity=req.identity["id"] if req is not None and req.identity else None,
            # none served: the model it was routed to (a load balancer's pick: the request's `model` is ignored
            # then), as the metrics and the root span name it; the model as sent when it resolved to none (404)
            model=call.served_model
            or (call.chain[0].id if call.chain else req.model if req is not None else sent_model),
            cache=call.cache_status,
            # The answer's usage; what was billed (its budgets and metrics count it): on a cache hit nothing, and a
            # request may be billed for chunks of a split batch a model embedded before it failed, failed or not.
            tokens=call.prompt_tokens if error is None else None,
            billed_tokens=call.billed_tokens or None,
            cost_usd=call.cost_usd if error is None else call.cost_usd or None,
            attempts=call.attempts,
            error=error.code if error is not None else None,
        )


def _observe_spent(metrics: Metrics, key_id: str, model: str, call: Call) -> None:
    """Usage metrics labelled with the model that charged each part: the spending models' own, the rest the
    serving (or requested) model's."""
    tokens, cost = call.billed_tokens, call.cost_usd
    for spender, spent_tokens, spent_cost in call.spent:
        metrics.observe_usage(key_id, spender, spent_tokens, spent_cost)
        tokens -= spent_tokens
        cost -= spent_cost
    if tokens > 0:
        metrics.observe_usage(key_id, model, tokens, cost)
