"""The router's attempt hook wired to telemetry and metrics: one CLIENT span and one metric sample per attempt."""

from __future__ import annotations

from typing import Any

from .config import Deployment
from .errors import GatewayError, UpstreamTimeout
from .metrics import Metrics
from .providers import Adapter, Embeddings
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
        base64 = getattr(adapter, "base64", True)
        span = self._telemetry.attempt(
            provider=adapter.gen_ai_provider,
            request_model=deployment.upstream_model,
            server_address=adapter.server_address,
            server_port=adapter.server_port,
            attempt=attempt,
            fallback_index=fallback_index,
            deployment=f"{deployment.provider}/{deployment.upstream_model}",
            # what the call asks for (an adapter whose upstream refused base64 asks for floats: see OpenAIAdapter)
            encoding_format="base64" if base64 else "float",
        )
        return (span, deployment, model, adapter if base64 else None)

    def headers(self, token: Any) -> dict[str, str] | None:
        span: AttemptSpan = token[0]
        return span.trace_headers()

    def end(self, token: Any, *, error: GatewayError | None, result: Embeddings | None, seconds: float,
            outcome: str = "error") -> None:  # fmt: skip
        span: AttemptSpan = token[0]
        deployment: Deployment = token[1]
        adapter = token[3]
        if adapter is not None and not getattr(adapter, "base64", True):
            # The upstream refused base64 answers while this call was out: asked again for floats (every call in
            # flight then is refused alike, and an answer ends its attempt with no await before this)
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
