"""Routing: model resolution, load balancing, retries, timeouts, fallbacks, deployments, batch splitting.

The policy, in one place (README "Routing" says the same):

- The chain of models is ``[primary] + fallbacks``; the primary is the request's ``model``, or a weighted pick
  of ``load_balancer.models`` (then the request's ``model`` is ignored, as in orq).
- Each model gets ``1 + retry.count`` attempts. Attempt k goes to the k-th eligible deployment (cycling), so a
  retry fails over to the next endpoint; a retry on the same endpoint first waits
  ``backoff_base_ms * 2^(n-1)`` +-25%, or the upstream's ``Retry-After`` when it sent one, capped at
  ``routing.max_retry_after_ms``.
- Retried: statuses in ``retry.on_codes``, timeouts, connection errors, malformed answers. Upstream 400/413/422
  (the input is bad) end the request at once with a 400 carrying the upstream's message. 401/403 (our provider
  key is wrong) are logged loudly and skip straight to the next deployment or fallback.
- A model has failed when its attempts are spent, or on a non-retried failure whose status is in
  ``fallback_on_codes``; then the next model of the chain is tried with the same policy. Other failures end the
  request. All failed: the last error (502, or 504 for a timeout; 503 when no deployment could even be tried).
- Every attempt is bounded by ``timeout.call_timeout`` (or the provider's ``timeout_ms``) and by what is left of
  ``routing.deadline_ms``, so a request never runs longer than the deadline, whatever the retries and fallbacks.
- A batch larger than the model's ``max_inputs`` is split into chunks sent with bounded concurrency and merged
  in order; all chunks of a response come from one model (vectors of different models do not mix).
- A deployment that failed ``breaker_failures`` times in a row is skipped for ``breaker_cooldown_ms``; then one
  probe request is let through, and its outcome closes or reopens the breaker.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from .config import Config, Deployment, ModelConfig, RetryPolicy
from .errors import (
    GatewayError,
    InvalidRequest,
    NotFound,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from .providers import Adapter, Embeddings
from .request import EmbeddingRequest, ProviderPreferences

__all__ = ["AttemptHook", "Breaker", "ResolvedModel", "RouteResult", "Router"]

log = structlog.get_logger("embedgate.routing")

_INPUT_ERRORS = frozenset({400, 413, 422})
_KEY_ERRORS = frozenset({401, 403})


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A model id with everything needed to serve it."""

    id: str
    deployments: tuple[Deployment, ...]
    price_per_million_tokens: float | None
    max_inputs: int
    max_request_inputs: int


@dataclass(slots=True)
class RouteResult:
    """What the router got: vectors for the asked positions, from one served model."""

    model: str
    vectors: list[bytes]
    prompt_tokens: int
    attempts: int
    price_per_million_tokens: float | None
    deployment: str = ""


class AttemptHook:
    """Observes upstream attempts (telemetry and metrics plug in here); the default does nothing."""

    def start(self, *, model: str, deployment: Deployment, adapter: Adapter, attempt: int, fallback_index: int,
              request: EmbeddingRequest) -> Any:  # fmt: skip
        """Called before an attempt; returns a token passed to :meth:`end`, and headers to inject upstream."""
        return None

    def headers(self, token: Any) -> dict[str, str] | None:
        """Headers to inject into the upstream request (e.g. ``traceparent``)."""
        return None

    def end(self, token: Any, *, error: GatewayError | None, result: Embeddings | None, seconds: float) -> None:
        """Called after an attempt, with its error or result."""


@dataclass(slots=True)
class Breaker:
    """Consecutive-failure circuit breaker of one deployment."""

    failures: int = 0
    open_until: float = 0.0
    probing: bool = False
    latency_ewma_s: float | None = None
    last_error: str = ""

    def state(self, now: float) -> str:
        """closed | open | half_open."""
        if self.open_until == 0.0:
            return "closed"
        return "open" if now < self.open_until else "half_open"


@dataclass(slots=True)
class _Attempts:
    count: int = 0
    last_error: GatewayError | None = None
    tried_any: bool = False
    skipped: list[str] = field(default_factory=list)


def _deployment_id(d: Deployment) -> str:
    return f"{d.provider}/{d.upstream_model}"


class Router:
    """Serves embedding requests from the configured providers with the policy of this module's docstring."""

    def __init__(
        self,
        config: Config,
        adapters: Mapping[str, Adapter],
        *,
        hook: AttemptHook | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self._config = config
        self._routing = config.routing
        self._adapters = adapters
        self._hook = hook or AttemptHook()
        self._rng = rng or random.Random()
        self._clock = clock
        self._sleep = sleep
        self._models: dict[str, ResolvedModel] = {m.id: self._resolved(m) for m in config.models.values()}
        self.breakers: dict[str, Breaker] = {}

    @staticmethod
    def _resolved(m: ModelConfig) -> ResolvedModel:
        return ResolvedModel(
            id=m.id,
            deployments=m.deployments,
            price_per_million_tokens=m.price_per_million_tokens,
            max_inputs=m.max_inputs,
            max_request_inputs=max(2048, m.max_request_inputs),
        )

    def resolve(self, model_id: str, param: str = "model") -> ResolvedModel:
        """The model's deployments, from ``models`` or, for ``<provider>/<name>``, the provider itself."""
        found = self._models.get(model_id)
        if found is not None:
            return found
        provider, _, name = model_id.partition("/")
        if name and provider in self._adapters:
            resolved = ResolvedModel(
                id=model_id,
                deployments=(Deployment(provider=provider, upstream_model=name),),
                price_per_million_tokens=None,
                max_inputs=2048,
                max_request_inputs=2048,
            )
            if len(self._models) < 10000:  # remember, bounded: ids come from clients
                self._models[model_id] = resolved
            return resolved
        raise NotFound(f"The model '{model_id}' ({param}) does not exist or is not served here", param=param)

    def chain(self, request: EmbeddingRequest) -> list[ResolvedModel]:
        """Primary model (load-balanced when asked) followed by the fallbacks, all resolved (404 otherwise)."""
        if request.load_balancer:
            models = [m for m, _ in request.load_balancer]
            weights = [w for _, w in request.load_balancer]
            for i, m in enumerate(models):
                self.resolve(m, f"load_balancer.models[{i}].model")
            primary = self._rng.choices(models, weights=weights)[0]
        else:
            primary = request.model
        out = [self.resolve(primary)]
        for i, fb in enumerate(request.fallbacks):
            out.append(self.resolve(fb, f"fallbacks[{i}].model"))
        return out

    def eligible(self, model: ResolvedModel, prefs: ProviderPreferences | None) -> list[Deployment]:
        """The model's deployments in the order they are tried, as OpenRouter's ``provider`` asks."""
        deps = list(model.deployments)
        if prefs is None:
            return deps
        if prefs.only is not None:
            deps = [d for d in deps if d.provider in prefs.only]
        if prefs.ignore:
            deps = [d for d in deps if d.provider not in prefs.ignore]
        if prefs.max_price is not None:
            deps = [d for d in deps if (self._price(model, d) or 0.0) <= prefs.max_price]
        if prefs.sort == "price":
            deps.sort(key=lambda d: self._price(model, d) or 0.0)
        elif prefs.sort in ("latency", "throughput"):
            deps.sort(key=lambda d: self._latency(d))
        if prefs.order is not None:
            rank = {p: i for i, p in enumerate(prefs.order)}
            deps.sort(key=lambda d: rank.get(d.provider, len(rank)))  # stable: keeps the sort within a rank
        if not prefs.allow_fallbacks:
            deps = deps[:1]
        return deps

    def _price(self, model: ResolvedModel, d: Deployment) -> float | None:
        return d.price_per_million_tokens if d.price_per_million_tokens is not None else model.price_per_million_tokens

    def _latency(self, d: Deployment) -> float:
        b = self.breakers.get(_deployment_id(d))
        return b.latency_ewma_s if b is not None and b.latency_ewma_s is not None else float("inf")

    # --- serving ----------------------------------------------------------------------------------------------

    async def embed(
        self, request: EmbeddingRequest, positions: list[int], chain: Sequence[ResolvedModel] | None = None
    ) -> RouteResult:
        """Embed the items at ``positions`` of ``request``; vectors come back in that order."""
        chain = chain or self.chain(request)
        retry = request.retry or self._routing.default_retry
        fallback_codes = (
            request.fallback_on_codes if request.fallback_on_codes is not None else self._routing.fallback_on_codes
        )
        deadline = self._clock() + self._routing.deadline_ms / 1000
        attempts = _Attempts()
        for fallback_index, model in enumerate(chain):
            try:
                return await self._serve_model(request, positions, model, fallback_index, retry, deadline, attempts)
            except _ModelFailed as failed:
                err = failed.error
                attempts.last_error = err
                status = getattr(err, "upstream_status", None)
                spent = failed.spent
                if not spent and status is not None and status not in fallback_codes and status not in _KEY_ERRORS:
                    break
                if self._clock() >= deadline:
                    break
        if attempts.last_error is None:
            reason = "; ".join(attempts.skipped) or "no deployment matches the provider preferences"
            raise Unavailable(f"No upstream available: {reason}")
        raise attempts.last_error

    async def _serve_model(
        self,
        request: EmbeddingRequest,
        positions: list[int],
        model: ResolvedModel,
        fallback_index: int,
        retry: RetryPolicy,
        deadline: float,
        attempts: _Attempts,
    ) -> RouteResult:
        deployments = self.eligible(model, request.provider)
        if request.is_multimodal:
            deployments = [d for d in deployments if self._multimodal(d)]
            if not deployments:
                raise InvalidRequest(
                    f"The model '{model.id}' has no deployment that accepts multimodal input", param="input"
                )
        if not deployments:
            attempts.skipped.append(f"{model.id}: no deployment matches the provider preferences")
            raise _ModelFailed(Unavailable(f"No deployment of '{model.id}' matches the provider preferences"), True)
        size = max(1, model.max_inputs)
        chunks = [positions[i : i + size] for i in range(0, len(positions), size)]
        if len(chunks) == 1:
            results = [await self._serve_chunk(request, chunks[0], model, deployments, fallback_index, retry,
                                               deadline, attempts)]  # fmt: skip
        else:
            gate = asyncio.Semaphore(self._routing.split_concurrency)

            async def one(chunk: list[int]) -> tuple[Embeddings, str]:
                async with gate:
                    return await self._serve_chunk(request, chunk, model, deployments, fallback_index, retry,
                                                   deadline, attempts)  # fmt: skip

            tasks = [asyncio.ensure_future(one(c)) for c in chunks]
            try:
                results = list(await asyncio.gather(*tasks))
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        vectors = [v for emb, _ in results for v in emb.vectors]
        return RouteResult(
            model=model.id,
            vectors=vectors,
            prompt_tokens=sum(emb.prompt_tokens for emb, _ in results),
            attempts=attempts.count,
            price_per_million_tokens=self._price(model, deployments[0]) if len(deployments) == 1 else
            _first_price(model, results, deployments),
            deployment=results[-1][1],
        )  # fmt: skip

    def _multimodal(self, d: Deployment) -> bool:
        provider = self._config.providers.get(d.provider)
        return bool(provider and provider.multimodal)

    async def _serve_chunk(
        self,
        request: EmbeddingRequest,
        chunk: list[int],
        model: ResolvedModel,
        deployments: list[Deployment],
        fallback_index: int,
        retry: RetryPolicy,
        deadline: float,
        attempts: _Attempts,
    ) -> tuple[Embeddings, str]:
        last: GatewayError | None = None
        previous: Deployment | None = None
        wait_s = 0.0
        payload = request.upstream_input(chunk if len(chunk) != len(request.items) else None)
        for n in range(1 + retry.count):
            deployment = self._pick(deployments, n)
            if deployment is None:
                attempts.skipped.append(f"{model.id}: every deployment's circuit breaker is open")
                raise _ModelFailed(last or Unavailable(f"Every deployment of '{model.id}' is cooling down"), True)
            if n and deployment == previous and wait_s > 0:
                remaining = deadline - self._clock()
                if wait_s >= remaining:
                    break
                await self._sleep(wait_s)
            previous = deployment
            remaining = deadline - self._clock()
            if remaining <= 0:
                last = UpstreamTimeout(f"The overall deadline of {self._routing.deadline_ms} ms was reached")
                break
            adapter = self._adapters[deployment.provider]
            provider = self._config.providers[deployment.provider]
            timeout_s = min((request.timeout_ms or provider.timeout_ms) / 1000, remaining)
            attempts.count += 1
            token = self._hook.start(model=model.id, deployment=deployment, adapter=adapter, attempt=n + 1,
                                     fallback_index=fallback_index, request=request)  # fmt: skip
            started = self._clock()
            try:
                result = await adapter.embed(
                    upstream_model=deployment.upstream_model,
                    input=payload,
                    n_items=len(chunk),
                    dimensions=request.dimensions,
                    user=request.user,
                    input_type=request.input_type,
                    timeout_s=timeout_s,
                    headers=self._hook.headers(token),
                )
            except (UpstreamError, UpstreamTimeout) as err:
                elapsed = self._clock() - started
                self._hook.end(token, error=err, result=None, seconds=elapsed)
                self._record(deployment, ok=False, seconds=elapsed, error=err)
                status = getattr(err, "upstream_status", None)
                if status in _INPUT_ERRORS:
                    raise InvalidRequest(f"The upstream rejected the input: {err.message}", param="input",
                                         code="upstream_rejected_input") from None  # fmt: skip
                last = err
                if status in _KEY_ERRORS:
                    log.error("upstream rejected our provider key", provider=deployment.provider, status=status,
                              model=model.id)  # fmt: skip
                    if len(deployments) == 1:
                        raise _ModelFailed(err, False) from None
                    wait_s = 0.0
                    continue
                retryable = status is None or status in retry.on_codes
                if not retryable:
                    raise _ModelFailed(err, False) from None
                wait_s = self._backoff(n + 1, getattr(err, "retry_after_s", None))
                continue
            elapsed = self._clock() - started
            self._hook.end(token, error=None, result=result, seconds=elapsed)
            self._record(deployment, ok=True, seconds=elapsed, error=None)
            return result, _deployment_id(deployment)
        raise _ModelFailed(last or UpstreamTimeout("The overall deadline was reached"), True)

    def _pick(self, deployments: list[Deployment], n: int) -> Deployment | None:
        now = self._clock()
        count = len(deployments)
        for i in range(count):
            d = deployments[(n + i) % count]
            b = self.breakers.get(_deployment_id(d))
            if b is None:
                return d
            state = b.state(now)
            if state == "closed":
                return d
            if state == "half_open" and not b.probing:
                b.probing = True  # one probe at a time; its outcome closes or reopens the breaker
                return d
        return None

    def _backoff(self, n: int, retry_after_s: float | None) -> float:
        cap = self._routing.max_retry_after_ms / 1000
        if retry_after_s is not None:
            return min(retry_after_s, cap)
        base = self._routing.backoff_base_ms / 1000 * 2 ** (n - 1)
        return min(base * self._rng.uniform(0.75, 1.25), cap)

    def _record(self, d: Deployment, *, ok: bool, seconds: float, error: GatewayError | None) -> None:
        b = self.breakers.setdefault(_deployment_id(d), Breaker())
        b.probing = False
        if ok:
            b.failures, b.open_until = 0, 0.0
            b.latency_ewma_s = seconds if b.latency_ewma_s is None else 0.8 * b.latency_ewma_s + 0.2 * seconds
            return
        if getattr(error, "upstream_status", None) in _INPUT_ERRORS:
            return  # the client's input was bad, not the deployment
        b.failures += 1
        b.last_error = error.message[:200] if error else ""
        if b.failures >= self._routing.breaker_failures:
            b.open_until = self._clock() + self._routing.breaker_cooldown_ms / 1000

    def status(self) -> dict[str, Any]:
        """Circuit-breaker state of every deployment that has been used, for ``/readyz``."""
        now = self._clock()
        return {
            name: {"state": b.state(now), "consecutive_failures": b.failures,
                   "latency_ms": None if b.latency_ewma_s is None else round(b.latency_ewma_s * 1000, 2)}
            for name, b in self.breakers.items()
        }  # fmt: skip


def _first_price(model: ResolvedModel, results: list[tuple[Embeddings, str]], deps: list[Deployment]) -> float | None:
    served = results[-1][1]
    for d in deps:
        if _deployment_id(d) == served:
            return d.price_per_million_tokens if d.price_per_million_tokens is not None else model.price_per_million_tokens
    return model.price_per_million_tokens


class _ModelFailed(Exception):
    """A model of the chain failed; ``spent`` says whether its attempts ran out (always fall back then)."""

    def __init__(self, error: GatewayError, spent: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.spent = spent
