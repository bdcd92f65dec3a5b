"""The router's attempt hook wired to telemetry and metrics: one CLIENT span and one metric sample per attempt."""

from __future__ import annotations

from typing import Any

from .config import Deployment
from .errors import GatewayError, UpstreamTimeout
from .metrics import Metrics
from .providers import Adapter, Embeddings
from .providers.http1 import SENDING
from .request import EmbeddingRequest
from .routing import AttemptHook
from .telemetry import AttemptSpan, Telemetry

__all__ = ["ObservedAttempts"]


class ObservedAttempts(AttemptHook):
    """Starts an attempt span (child of the current ``routing`` stage span) and records the attempt's metrics."""

    def __init__(self, telemetry: Telemetry, metrics: Metrics) -> None:
        self._telemetry = telemetry
        self._metrics = metrics

    def start(self, *, model: str, deployment: Deployment, adapter: Adapter, attempt: int, fallback_index: int,
              request: EmbeddingRequest) -> Any:  # fmt: skip
        span = self._telemetry.attempt(
            provider=adapter.gen_ai_provider,
            request_model=deployment.upstream_model,
            server_address=adapter.server_address,
            server_port=adapter.server_port,
            attempt=attempt,
            fallback_index=fallback_index,
            deployment=f"{deployment.provider}/{deployment.upstream_model}",
            # what the call asks for (an adapter whose upstream refused base64 asks for floats: see OpenAIAdapter)
            encoding_format="base64" if getattr(adapter, "base64", True) else "float",
        )
        return (span, deployment, model)

    def headers(self, token: Any) -> dict[str, str] | None:
        span: AttemptSpan = token[0]
        return span.trace_headers()

    def end(self, token: Any, *, error: GatewayError | None, result: Embeddings | None, seconds: float,
            outcome: str = "error") -> None:  # fmt: skip
        span: AttemptSpan = token[0]
        deployment: Deployment = token[1]
        told = SENDING.get()  # (the router's cell around this attempt)
        if told is not None and len(told) > 1 and told[1]:  # its upstream refused base64: asked again for floats
            span.asked_for("float")
        if error is None and result is not None:
            span.succeed(response_model=result.model or deployment.upstream_model, input_tokens=result.prompt_tokens,
                         dimension_count=result.dimensions)  # fmt: skip
            status: int | str = 200
        else:
            upstream_status = getattr(error, "upstream_status", None)
            if upstream_status is not None:
                kind = str(upstream_status)
            elif isinstance(error, UpstreamTimeout):
                kind = "timeout"
            else:
                kind = error.code if error is not None and error.code else "error"
            span.fail(kind, status_code=upstream_status, outcome=outcome)
            status = kind
        span.end()
        self._metrics.observe_attempt(deployment.provider, token[2], status, seconds)
