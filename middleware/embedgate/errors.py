"""Errors the gateway answers with, and their rendering in each route's dialect.

    GatewayError                 status, code, param, message; rendered by ``render_error``
    ├── InvalidRequest           400  invalid_request_error (a parameter is named)
    ├── Unauthorized             401  invalid_api_key
    ├── Forbidden                403  model_not_allowed
    ├── NotFound                 404  model_not_found | no_allowed_providers
    ├── PayloadTooLarge          413  request_too_large
    ├── UnsupportedMediaType     415  unsupported_media_type
    ├── BudgetExceeded           429  requests_per_minute_exceeded | token_budget_exceeded | cost_budget_exceeded
    ├── UpstreamError            502  upstream_error (also carries the upstream status, for retry decisions)
    ├── Unavailable              503  no_upstream_available | store_unavailable
    └── UpstreamTimeout          504  upstream_timeout

Foreign exceptions (httpx, redis) are translated where they happen, in the adapter or the store, never here.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any

import orjson

__all__ = [
    "BudgetExceeded",
    "ClientDisconnected",
    "ClientGone",
    "Dialect",
    "Forbidden",
    "GatewayError",
    "InvalidRequest",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "Spent",
    "Unauthorized",
    "Unavailable",
    "UnsupportedMediaType",
    "UpstreamError",
    "UpstreamTimeout",
    "render_error",
]


class Dialect(Enum):
    """Which public API a route speaks; decides the error body shape and response extras."""

    OPENAI = "openai"  # /v1/embeddings
    ORQ = "orq"  # /v2/router/embeddings
    OPENROUTER = "openrouter"  # /api/v1/embeddings


#: Upstream work paid for but not in the answer: ``(model id, tokens, USD per million tokens or None, provider)``.
Spent = tuple[str, int, float | None, str]


class GatewayError(Exception):
    """An error answered to the client, with its HTTP status, error type, code and offending parameter."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"
    #: Where the message goes on with an upstream's own words (which may quote the batch of the request that made
    #: the call): the part before them, which a request that shared the call is told instead (see the pipeline).
    own_part: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers: dict[str, str] = dict(headers or {})

    def extra(self) -> dict[str, Any]:
        """Extra fields of the orq dialect's error body (budget errors add their scope)."""
        return {}


class ClientDisconnected(GatewayError):
    """The client went away before its request was read whole: nothing is answered. Logged, traced and counted as
    nginx's 499 (client closed request), not as a server error."""

    status = 499
    type = "invalid_request_error"
    code = "client_disconnected"
    #: The error the client would have had, had it stayed for its answer (None: a success, or nothing was made yet).
    unsent: GatewayError | None = None


class ClientGone(OSError):
    """Raised by ``embedgate serve``'s ``send`` once the client has left (ASGI 2.4: an ``OSError``), so that the app
    knows its answer did not reach it (the gateway logs such a request as 499). uvicorn's protocols drop the message
    without a word. (Here, not in the compiled protocol: mypyc compiles no subclass of ``OSError``.)"""


class InvalidRequest(GatewayError):
    """The request body or a header is invalid; ``param`` names the offending parameter."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"
    #: The ``name`` and ``model`` the refused body still gives, where they are valid (for its trace and access
    #: line; see ``request.names_of``): set by ``parse_request`` on a body that is a JSON object.
    names: tuple[str | None, str | None] = (None, None)


class Unauthorized(GatewayError):
    """No API key, or one that is not configured; answered with the ``WWW-Authenticate`` challenge a 401 carries
    (RFC 9110, 15.5.2): the bearer scheme the key goes in."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message, param=param, code=code, headers=headers)
        self.headers.setdefault("www-authenticate", "Bearer")


class Forbidden(GatewayError):
    """The key is valid but the model is not granted to it."""

    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class NotFound(GatewayError):
    """The model does not resolve to any provider, or the request's provider preferences leave it no deployment."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    """A method the path does not serve (standalone: mounted, the host app answers it)."""

    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    """The body is larger than ``server.max_body_bytes``."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(GatewayError):
    """The body is not JSON."""

    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class BudgetExceeded(GatewayError):
    """A budget or rate limit refused the request."""

    status = 429
    type = "rate_limit_error"
    code = "requests_per_minute_exceeded"

    def __init__(
        self,
        message: str,
        *,
        code: str,
        scope_kind: str,
        scope_target_id: str,
        dimension: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, code=code, headers=headers)
        self.scope_kind = scope_kind
        self.scope_target_id = scope_target_id
        self.dimension = dimension

    def extra(self) -> dict[str, Any]:
        return {
            "scope_kind": self.scope_kind,
            "scope_target_id": self.scope_target_id,
            "dimension": self.dimension,
        }


class UpstreamError(GatewayError):
    """The upstream failed (bad status, dropped connection, malformed answer) and nothing else served."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        upstream_status: int | None = None,
        retry_after_s: float | None = None,
        code: str | None = None,
        upstream_param: str | None = None,
        rejects_input: bool = False,
        upstream_code: str | None = None,
        served: bool = False,
        served_tokens: int | None = None,
    ) -> None:
        super().__init__(message, code=code)
        #: The upstream served the call (and charged it): its answer held vectors, of no use (of another size), and
        #: ``served_tokens`` the tokens it said it charged, where it said (else None: the router bills its estimate).
        self.served = served
        self.served_tokens = served_tokens
        #: The answer shows the upstream does not do what a parameter of the client asks (vectors of another size
        #: than its ``dimensions``): retried and fallen back from as any malformed answer, but not held against
        #: the deployment's circuit breaker (one client's parameter would take the deployment from every client).
        self.rejects_input = rejects_input
        #: The upstream's own error code (OpenAI's ``error.code``: ``model_not_found``), if it gave one.
        self.upstream_code = upstream_code
        self.upstream_status = upstream_status
        self.retry_after_s = retry_after_s
        #: The request field the upstream's error names (OpenAI's ``error.param``), where it is one the client sent.
        self.upstream_param = upstream_param


class Unavailable(GatewayError):
    """No upstream could be tried (all skipped), or a required store is unreachable."""

    status = 503
    type = "service_unavailable"
    code = "no_upstream_available"


class UpstreamTimeout(GatewayError):
    """The upstream did not answer within the attempt timeout or the overall deadline."""

    status = 504
    type = "timeout_error"
    code = "upstream_timeout"


def render_error(err: GatewayError, dialect: Dialect) -> bytes:
    """The JSON body of ``err`` in the shape the route's SDK parses."""
    if dialect is Dialect.OPENROUTER:
        body: dict[str, Any] = {"code": err.status, "message": err.message}
        meta = {"type": err.type, "code": err.code, "param": err.param, **err.extra()}
        body["metadata"] = {k: v for k, v in meta.items() if v is not None}
        return orjson.dumps({"error": body})
    if dialect is Dialect.ORQ:
        # The orq SDK requires every key present, with ``code`` a string.
        body = {"message": err.message, "type": err.type, "param": err.param, "code": err.code or err.type}
        body.update(err.extra())
        return orjson.dumps({"error": body})
    return orjson.dumps({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}})
