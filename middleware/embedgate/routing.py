"""Routing: model resolution, load balancing, retries, timeouts, fallbacks, deployments, batch splitting.

The policy, in one place (README "Routing" says the same):

- The chain of models is ``[primary] + fallbacks``; the primary is the request's ``model``, or a weighted pick
  of ``load_balancer.models`` (then the request's ``model`` is ignored, as in orq).
- Each model gets ``max(1 + retry.count, D)`` attempts, ``D`` its eligible deployments, so that every deployment
  is tried before the model counts as failed. Attempt k goes to the k-th eligible deployment (cycling), so a
  retry fails over to the next endpoint. Going back to a deployment that already failed in this request first
  waits ``backoff_base_ms * 2^(f-1)`` +-25% (``f``: that deployment's failures so far), or the upstream's
  ``Retry-After`` when it sent one, capped at ``routing.max_retry_after_ms``.
- Retried: statuses in ``retry.on_codes``, timeouts, connection errors, malformed answers (bad JSON, wrong count,
  wrong dimensions). Upstream 400/413/422 (the input is bad) end the request at once with a 400 carrying the
  upstream's message. 401/403 (our provider key is wrong) are logged as errors, and the deployment is dropped for
  this request: the next deployment, else the next model, is tried. A non-retried status in
  ``fallback_on_codes`` drops the deployment the same way; any other status ends the request.
- A model has failed when its attempts are spent or its deployments dropped; then the next model of the chain is
  tried with the same policy. All failed: the last upstream error (502, or 504 for a timeout; 503 when no
  deployment could even be tried: none eligible, or every circuit breaker open).
- Every attempt is bounded by ``timeout.call_timeout`` (or the provider's ``timeout_ms``) and by what is left of
  ``routing.deadline_ms``; a backoff that would outlast the deadline is not slept, the next model gets the time.
  So a request never runs longer than the deadline, whatever the retries and fallbacks.
- A batch larger than the model's ``max_inputs`` is split into chunks sent with bounded concurrency
  (``routing.split_concurrency``) and merged in order. A failing chunk is retried like a whole request; when a
  model fails for one chunk, every chunk is served again by the next model (vectors of different models do not
  mix).
- Without ``dimensions`` in the request, the first good answer of a model fixes its dimension count; an answer
  with another count is malformed (three such answers in a row that agree replace the remembered count, so a
  bad first answer cannot poison the process).
- A deployment that failed ``breaker_failures`` times in a row is skipped for ``breaker_cooldown_ms``; then one
  probe request is let through, and its outcome closes or reopens the breaker. ``status()`` (``/readyz``)
  shows every deployment's breaker.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import structlog
from mypy_extensions import mypyc_attr

from .budgets import BUILTIN_PRICES, estimate_tokens, is_bounded
from .config import Config, Deployment, ModelConfig, RetryPolicy
from .errors import (
    BudgetExceeded,
    GatewayError,
    InvalidRequest,
    NotFound,
    Spent,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from .providers import Adapter, Embeddings
from .providers.http1 import SENDING, UNKNOWN, WAITING
from .request import EmbeddingRequest, ProviderPreferences

__all__ = ["AttemptHook", "Attempts", "Breaker", "ResolvedModel", "RouteResult", "Router"]

log = structlog.get_logger("embedgate.routing")

_INPUT_ERRORS: Final = frozenset({400, 413, 422})
_KEY_ERRORS: Final = frozenset({401, 403})
_DIMS_ADOPT_STREAK: Final = 3  # agreeing answers with a new dimension count that replace the remembered one


def _not_the_deployment(err: GatewayError | None) -> bool:
    """Whether an upstream failure is owed to the client's request, not to the deployment: a 400/413/422, or
    well-formed vectors of another size than the request's ``dimensions`` (a model that does not take it). Never
    held against the deployment's breaker, which would refuse every other client's requests."""
    return getattr(err, "upstream_status", None) in _INPUT_ERRORS or bool(getattr(err, "rejects_input", False))


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A model id with everything needed to serve it."""

    id: str
    deployments: tuple[Deployment, ...]
    price_per_million_tokens: float | None
    max_inputs: int
    max_request_inputs: int


@dataclass(init=False, slots=True)
class RouteResult:
    """What the router got: vectors for the asked positions, from one served model (``__init__`` written out:
    a dataclass's generated ``__init__`` stays interpreted in the compiled build)."""

    model: str
    vectors: list[bytes]
    prompt_tokens: int
    attempts: int
    price_per_million_tokens: float | None
    deployment: str = ""
    #: The upstream's base64 text per vector, where it sent one (see ``Embeddings.b64``).
    b64: list[bytes | memoryview | None] | None = None
    #: Paid for, not served: chunks a model of the chain embedded before another chunk of the same batch failed
    #: on it (the whole batch then went to the next model).
    spent: list[Spent] = field(default_factory=list)
    #: The answer's tokens by the provider of the deployment that embedded them: ``(provider, tokens, USD per
    #: million tokens or None)``, one per chunk (a split batch's chunks may go to deployments of several providers).
    charges: list[tuple[str, int, float | None]] = field(default_factory=list)
    #: The served model's place in the request's chain (0 the requested model, then its fallbacks'): a model named
    #: twice is at two places.
    place: int = 0

    def __init__(
        self,
        *,
        model: str,
        vectors: list[bytes],
        prompt_tokens: int,
        attempts: int,
        price_per_million_tokens: float | None,
        deployment: str = "",
        b64: list[bytes | memoryview | None] | None = None,
        spent: list[Spent] | None = None,
        charges: list[tuple[str, int, float | None]] | None = None,
        place: int = 0,
    ) -> None:
        self.model = model
        self.vectors = vectors
        self.prompt_tokens = prompt_tokens
        self.attempts = attempts
        self.price_per_million_tokens = price_per_million_tokens
        self.deployment = deployment
        self.b64 = b64
        self.spent = [] if spent is None else spent
        self.charges = [] if charges is None else charges
        self.place = place


@mypyc_attr(allow_interpreted_subclasses=True)
class AttemptHook:
    """Observes upstream attempts (telemetry and metrics plug in here); the default does nothing.

    ``end`` is called exactly once for every ``start``, also when the attempt is cancelled (a sibling chunk of a
    split batch failed, the request was cancelled): then ``error`` is an ``UpstreamError`` with code
    ``attempt_cancelled``, and ``outcome`` is ``cancelled``.
    """

    def start(self, *, model: str, deployment: Deployment, adapter: Adapter, attempt: int, fallback_index: int,
              request: EmbeddingRequest) -> Any:  # fmt: skip
        """Called before an attempt; returns a token passed to :meth:`end`, and headers to inject upstream."""
        return None

    def headers(self, token: Any) -> dict[str, str] | None:
        """Headers to inject into the upstream request (e.g. ``traceparent``)."""
        return None

    def end(self, token: Any, *, error: GatewayError | None, result: Embeddings | None, seconds: float,
            outcome: str = "error") -> None:  # fmt: skip
        """Called after an attempt, with its error or result; after a failure, ``outcome`` is what the router does
        next: ``retry`` (this model again), ``fallback`` (the next model of the chain) or ``error`` (gives up);
        ``cancelled`` for an attempt cut short, which is not the deployment's failure."""


@dataclass(slots=True)
class Breaker:
    """Consecutive-failure circuit breaker of one deployment, and its measured latency."""

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


@dataclass(init=False, slots=True)
class Attempts:
    """Book-keeping of one ``embed`` call, shared by its chunks; a caller's own (``embed``'s ``attempts``) tells
    it, however the call ended (cancelled included), how many attempts were made and what they were paid for.
    (``__init__`` written out: a dataclass's generated ``__init__`` stays interpreted in the compiled build.)"""

    count: int = 0
    last_error: GatewayError | None = None
    skipped: list[str] = field(default_factory=list)
    models_left: int = 0  # models of the chain after the one being tried
    spent: list[Spent] = field(default_factory=list)  # see RouteResult.spent
    answered: bool = False  # last_error is an upstream's own answer (a 404 for a model it does not know)
    cut_off: list[Spent] = field(default_factory=list)  # calls cancelled after they went out (see Router._estimated)
    #: Chunks of a split batch a model embedded before it failed on another: (its id, the chunk's positions, the
    #: answer). Paid for (in ``spent``), not in the answer: the caller keeps them in the cache.
    embedded: list[tuple[str, list[int], Embeddings]] = field(default_factory=list)

    def __init__(self) -> None:
        self.count = 0
        self.last_error = None
        self.answered = False
        self.cut_off = []
        self.embedded = []
        self.skipped = []
        self.models_left = 0
        self.spent = []


@dataclass(slots=True)
class _Dims:
    """The dimension count a model answers with (no ``dimensions`` asked), and a challenger's streak."""

    known: int
    candidate: int = 0
    streak: int = 0


_WORSE: Final = {"closed": 0, "half_open": 1, "open": 2}


def _failed_with(failure: BaseException | None) -> BaseException | None:
    """The error a chunk's failure carries (``_ModelFailed`` wraps it)."""
    return failure.error if isinstance(failure, _ModelFailed) else failure


def _replaces(attempts: Attempts, failed: _ModelFailed) -> bool:
    """Whether a model's failure is the request's error, rather than an earlier model's (``attempts.last_error``).

    "Nothing could be tried" for this model (every breaker open, no deployment its preferences allow or that takes a
    multimodal input, its providers' budgets spent) must not hide a real upstream error of an earlier one. A model
    only cooling down, or one its providers' budgets refused, replaces one that could not take the request at all
    (InvalidRequest: no multimodal deployment; NotFound: its preferences excluded every deployment): the request is
    fine, the upstream or the budget is not, for now. A budget's refusal leaves an upstream's own answer (a 404 for a
    client's typo) as it is."""
    last, err = attempts.last_error, failed.error
    if last is None or failed.answered:
        return True
    if not isinstance(err, (Unavailable, InvalidRequest, NotFound, BudgetExceeded)):
        return True
    if not isinstance(last, (InvalidRequest, NotFound)):
        return False
    return failed.cooling or (isinstance(err, BudgetExceeded) and not attempts.answered)


def _deployment_id(d: Deployment) -> str:
    return f"{d.provider}/{d.upstream_model}"


def _or_inf(price: float | None) -> float:
    return float("inf") if price is None else price


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
        self._dims: dict[str, _Dims] = {}
        self._usage_warned: set[str] = set()  # providers whose usage was replaced, told once each
        # Every configured endpoint is listed at /readyz from the start, not only once it has been used.
        self.breakers: dict[str, Breaker] = {
            _deployment_id(d): Breaker() for m in config.models.values() for d in m.deployments
        }
        # Named as themselves at /readyz (no key needed there): the configured deployments and the built-in list's
        # names. Any other "<provider>/<name>" is a client's own string, shown folded as "<provider>/*".
        self._listed: frozenset[str] = frozenset(self.breakers) | frozenset(BUILTIN_PRICES)

    @staticmethod
    def _resolved(m: ModelConfig) -> ResolvedModel:
        price = m.price_per_million_tokens
        return ResolvedModel(
            id=m.id,
            deployments=m.deployments,
            price_per_million_tokens=price if price is not None else BUILTIN_PRICES.get(m.id),
            max_inputs=m.max_inputs,
            max_request_inputs=max(2048, m.max_request_inputs),
        )

    def resolve(self, model_id: str, param: str = "model") -> ResolvedModel:
        """The model's deployments, from ``models`` or, for ``<provider>/<name>``, the provider itself."""
        found = self._models.get(model_id)
        if found is not None:
            return found
        provider, _, name = model_id.partition("/")
        if name and name != "*" and provider in self._adapters:  # "<provider>/*" is how /v1/models lists it
            resolved = ResolvedModel(
                id=model_id,
                deployments=(Deployment(provider=provider, upstream_model=name),),
                price_per_million_tokens=BUILTIN_PRICES.get(model_id),
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
            resolved = [self.resolve(m, request.param(f"load_balancer.models[{i}].model"))
                        for i, m in enumerate(models)]  # fmt: skip
            # Picked among the models that may take the request (its provider preferences, a multimodal input, its
            # item count within the model's max_request_inputs): a model that may not was picked at its weight, and
            # the request failed (404, 400) where another could serve it. None may: among all, and the answer says
            # why. Then among those with a deployment that may be tried now (its circuit breaker closed, or
            # half-open with no probe out): one whose every deployment cools down was picked at its weight too, and
            # answered 503 (or fell back) where another would serve. None may be tried: by weight again.
            usable = [self.usable(r, request) for r in resolved]
            n = len(request.items)
            may = [w if deps and n <= r.max_request_inputs else 0.0
                   for r, deps, w in zip(resolved, usable, weights, strict=True)]  # fmt: skip
            if any(may):
                weights = may
                ready = [w if w and self._pickable(deps, 0, set()) is not None else 0.0
                         for deps, w in zip(usable, may, strict=True)]  # fmt: skip
                if any(ready):
                    weights = ready
            # random.choices normalizes the weights itself (cumulative sums over their total).
            primary = self._rng.choices(models, weights=weights)[0]
        else:
            primary = request.model
        out = [self.resolve(primary)]
        for i, fb in enumerate(request.fallbacks):
            out.append(self.resolve(fb, request.param(f"fallbacks[{i}].model")))
        return out

    def eligible(self, model: ResolvedModel, prefs: ProviderPreferences | None, input_type: bool = False
                 ) -> list[Deployment]:  # fmt: skip
        """The model's deployments in the order they are tried, as OpenRouter's ``provider`` asks (``input_type``:
        the request has one, which ``require_parameters`` sends only to providers that take it).

        Provider names compare case-insensitively (OpenRouter's slugs do). A deployment without a known price
        passes ``max_price`` (nothing says it is above) and sorts last by price.
        """
        deps = list(model.deployments)
        if prefs is None:
            return deps
        if input_type and prefs.require_parameters:  # the pool, before any order or cut (as OpenRouter filters it)
            providers = self._config.providers
            deps = [d for d in deps if providers[d.provider].accepts_input_type]
        if prefs.only is not None:
            only = {p.lower() for p in prefs.only}
            deps = [d for d in deps if d.provider.lower() in only]
        if prefs.ignore:
            ignore = {p.lower() for p in prefs.ignore}
            deps = [d for d in deps if d.provider.lower() not in ignore]
        if prefs.max_price is not None:
            limit = prefs.max_price
            deps = [d for d in deps if (self._price(model, d) or 0.0) <= limit]
        if prefs.sort == "price":
            deps.sort(key=lambda d: _or_inf(self._price(model, d)))
        elif prefs.sort in ("latency", "throughput"):
            deps.sort(key=self._latency)  # unmeasured deployments last, in config order (the sort is stable)
        if prefs.order is not None:
            rank = {p.lower(): i for i, p in enumerate(prefs.order)}
            deps.sort(key=lambda d: rank.get(d.provider.lower(), len(rank)))  # stable: keeps the sort within a rank
        if not prefs.allow_fallbacks:
            if prefs.order:  # OpenRouter's "only the primary/custom provider": those named in `order`, in turn
                named = {p.lower() for p in prefs.order}
                deps = [d for d in deps if d.provider.lower() in named]
            else:
                deps = deps[:1]
        return deps

    def _price(self, model: ResolvedModel, d: Deployment) -> float | None:
        return d.price_per_million_tokens if d.price_per_million_tokens is not None else model.price_per_million_tokens

    def _latency(self, d: Deployment) -> float:
        b = self.breakers.get(_deployment_id(d))
        return b.latency_ewma_s if b is not None and b.latency_ewma_s is not None else float("inf")

    # --- serving ----------------------------------------------------------------------------------------------

    def deadline(self) -> float:
        """The overall deadline of a request whose first upstream call starts now (``routing.deadline_ms``)."""
        return self._clock() + self._routing.deadline_ms / 1000

    def left(self, deadline: float) -> float:
        """The seconds left until ``deadline`` (from :meth:`deadline`)."""
        return deadline - self._clock()

    def deadline_reached(self) -> UpstreamTimeout:
        """The error of a request whose overall deadline passed."""
        return UpstreamTimeout(f"The overall deadline of {self._routing.deadline_ms} ms was reached")

    async def embed(
        self,
        request: EmbeddingRequest,
        positions: list[int],
        chain: Sequence[ResolvedModel] | None = None,
        deadline: float | None = None,
        attempts: Attempts | None = None,
        first_index: int = 0,
        skipped: Collection[int] = (),
        refused: Mapping[int, Mapping[str, GatewayError]] | None = None,
    ) -> RouteResult:
        """Embed the items at ``positions`` of ``request``; vectors come back in that order. ``deadline`` (from
        :meth:`deadline`) is shared by the calls of one request (a fallback embedding a partial hit's cached items
        again); by default the call has a deadline of its own. The models at the places in ``skipped`` of the
        request's chain (fallback indexes: a fallback whose budget is spent) are not tried; the others keep theirs.
        ``refused``, by place: providers whose budget refused the request there, with the refusal; the model's
        deployments of those providers are not tried (all of them refused: the model fails with the refusal)."""
        chain = chain or self.chain(request)
        retry = request.retry or self._routing.default_retry
        fallback_codes = (
            request.fallback_on_codes if request.fallback_on_codes is not None else self._routing.fallback_on_codes
        )
        if deadline is None:
            deadline = self.deadline()
        if attempts is None:
            attempts = Attempts()
        try:
            tried = [(k, m) for k, m in enumerate(chain) if first_index + k not in skipped] if skipped else (
                list(enumerate(chain)))  # fmt: skip
            for n, (k, model) in enumerate(tried):
                fallback_index = first_index + k  # ``first_index``: the chain is the tail of the request's, from there
                attempts.models_left = len(tried) - 1 - n
                try:
                    result = await self._serve_model(request, positions, model, fallback_index, retry, deadline,
                                                     attempts, refused.get(fallback_index) if refused else None
                                                     )  # fmt: skip
                    result.place = fallback_index
                    return result
                except _ModelFailed as failed:
                    err = failed.error
                    if _replaces(attempts, failed):
                        attempts.last_error = err
                        attempts.answered = failed.answered
                    status = getattr(err, "upstream_status", None)
                    if not failed.spent and status not in fallback_codes and status not in _KEY_ERRORS:
                        break
                    if self._clock() >= deadline:
                        break
                    if n + 1 < len(tried):
                        log.warning("model failed, falling back", model=model.id, fallback=tried[n + 1][1].id,
                                    error=err.code, upstream_status=status)  # fmt: skip
            if attempts.last_error is None:
                reason = "; ".join(attempts.skipped) or "no deployment matches the provider preferences"
                raise Unavailable(f"No upstream available: {reason}")
            raise attempts.last_error
        except GatewayError as err:  # its attempts and what they were paid for: in the caller's ``attempts``
            wait = getattr(err, "retry_after_s", None)
            if wait is not None and "retry-after" not in err.headers:
                # The upstream's own Retry-After (a 429, a 503), capped as the router caps it: the client's SDK
                # waits that long before it retries, instead of its own short backoff into the same refusal.
                err.headers["retry-after"] = str(max(1, math.ceil(min(wait, self._routing.max_retry_after_ms / 1000))))
            raise

    async def _serve_model(
        self,
        request: EmbeddingRequest,
        positions: list[int],
        model: ResolvedModel,
        fallback_index: int,
        retry: RetryPolicy,
        deadline: float,
        attempts: Attempts,
        refused: Mapping[str, GatewayError] | None = None,
    ) -> RouteResult:
        deployments = self.eligible(model, request.provider, request.input_type is not None)
        if request.is_multimodal:
            deployments = [d for d in deployments if self._multimodal(d)]
            if not any(self._multimodal(d) for d in model.deployments):
                # nothing could be tried (else the preferences excluded it: the 404 below); a fallback may take
                # it, and it hides no earlier error
                raise _ModelFailed(
                    InvalidRequest(
                        f"The model '{model.id}' has no deployment that accepts multimodal input", param="input"
                    ),
                    True,
                )
        if not deployments:
            # The request's own preferences exclude every deployment: no retry can change that (a 503 had SDKs
            # retrying it for up to an hour). A 404, as OpenRouter answers it; a fallback may still take the request.
            attempts.skipped.append(f"{model.id}: no deployment matches the provider preferences")
            raise _ModelFailed(NotFound(f"No deployment of '{model.id}' matches the provider preferences",
                                        code="no_allowed_providers", param="provider"), True)  # fmt: skip
        if refused:
            allowed = [d for d in deployments if d.provider not in refused]
            if not allowed:
                attempts.skipped.append(f"{model.id}: its providers' budgets are spent")
                raise _ModelFailed(refused[deployments[0].provider], True)
            deployments = allowed
        size = max(1, model.max_inputs)
        groups = [positions]
        if request.input_kind == "mixed":  # strings and token arrays: each kind in calls of its own
            texts = [p for p in positions if isinstance(request.items[p], str)]
            groups = [texts, [p for p in positions if not isinstance(request.items[p], str)]]
        chunks = [g[i : i + size] for g in groups for i in range(0, len(g), size)]

        async def one(chunk: list[int]) -> tuple[Embeddings, Deployment]:
            return await self._serve_chunk(request, chunk, model, deployments, fallback_index, retry, deadline,
                                           attempts)  # fmt: skip

        if len(chunks) == 1:
            results = [await one(chunks[0])]
        else:
            gate = asyncio.Semaphore(self._routing.split_concurrency)
            failed: list[bool] = []
            # No deployment's breaker closed: the first chunk goes alone, as the one probe a half-open breaker lets
            # through; its success closes the breaker for its siblings (which, sent beside it, found the probe
            # taken, failed, and cancelled it: a split batch never closed the breaker).
            probe_first = self._cooling(deployments)
            first_done = asyncio.Event()

            async def gated(chunk: list[int], k: int) -> tuple[Embeddings, Deployment]:
                if probe_first and k:
                    await first_done.wait()
                async with gate:
                    # Set before the gate is released, so a waiting chunk never starts after a sibling failed.
                    if failed:
                        raise _Skipped
                    try:
                        return await one(chunk)
                    except BaseException:
                        failed.append(True)
                        raise
                    finally:
                        if not k:
                            first_done.set()

            tasks = [asyncio.ensure_future(gated(c, k)) for k, c in enumerate(chunks)]
            failure: BaseException | None = None
            try:
                results = list(await asyncio.gather(*tasks))
            except BaseException as exc:
                failure = exc  # handled below, outside the handler: no await inside one (see _native's docstring)
            if failure is not None:
                # One chunk failed for this model: the others are worthless (the next model redoes all of them).
                for t in tasks:
                    t.cancel()
                with anyio.CancelScope(shield=True):  # a host's anyio scope, cancelling, would cancel this wait too
                    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
                cause: BaseException | None = failure
                if isinstance(failure, _Skipped):  # not the cause: the failure that made the others skip
                    cause = next((o for o in outcomes if isinstance(o, Exception) and not isinstance(o, _Skipped)),
                                 None)  # fmt: skip
                # Cut off in flight by the router while their upstream was serving this batch (a sibling chunk came
                # back embedded, or with vectors of no use): billed at their estimate. Not when the request itself was
                # cancelled, nor when nothing shows the upstream serving (it hangs, drops, refuses our key, rate
                # limits or fails every call): see _estimated.
                serving = getattr(_failed_with(cause), "served", False) or any(isinstance(o, tuple) for o in outcomes)
                if serving and not isinstance(failure, asyncio.CancelledError):
                    attempts.spent += attempts.cut_off
                attempts.cut_off.clear()
                # The chunks this model did embed were paid for upstream: billed, though the next model serves them,
                # and handed to the caller, which keeps them in the cache (asked again, this model's are hits).
                for chunk, outcome in zip(chunks, outcomes, strict=True):
                    if isinstance(outcome, tuple):
                        emb, d = outcome
                        attempts.spent.append((model.id, emb.prompt_tokens, self._price(model, d), d.provider))
                        attempts.embedded.append((model.id, chunk, emb))
                if isinstance(failure, _Skipped) and cause is not None:
                    raise cause from None
                raise failure
        sizes = sorted({emb.dimensions for emb, _ in results}) if len(results) > 1 else []
        if len(sizes) > 1:
            # One answer never mixes vector sizes: chunks answered at a change of the model's dimension count
            # (each passed the per-model check in its turn). Paid for, and failed as a malformed answer.
            for emb, d in results:
                attempts.spent.append((model.id, emb.prompt_tokens, self._price(model, d), d.provider))
            raise _ModelFailed(UpstreamError(f"'{model.id}' answered the chunks of one batch with {sizes[0]} and "
                                             f"{sizes[-1]} dimensions", code="upstream_malformed"), True)  # fmt: skip
        tokens = sum(emb.prompt_tokens for emb, _ in results)
        vectors = [v for emb, _ in results for v in emb.vectors]
        b64 = [t for emb, _ in results for t in (emb.b64 or [None] * len(emb.vectors))]
        if len(groups) > 1:  # back in the order of ``positions``
            at = {p: k for k, p in enumerate(p for c in chunks for p in c)}
            vectors = [vectors[at[p]] for p in positions]
            b64 = [b64[at[p]] for p in positions]
        return RouteResult(
            model=model.id,
            vectors=vectors,
            b64=b64,
            prompt_tokens=tokens,
            attempts=attempts.count,
            price_per_million_tokens=self._blended_price(model, results, tokens),
            deployment=_deployment_id(results[-1][1]),
            spent=list(attempts.spent),
            charges=[(d.provider, emb.prompt_tokens, self._price(model, d)) for emb, d in results],
        )

    def _blended_price(self, model: ResolvedModel, results: list[tuple[Embeddings, Deployment]],
                       tokens: int) -> float | None:  # fmt: skip
        """One price for the whole answer: chunks served by deployments of different prices, token-weighted."""
        prices = [(emb.prompt_tokens, self._price(model, d)) for emb, d in results]
        if all(p is None for _, p in prices):
            return None
        if tokens == 0 or len({p for _, p in prices}) == 1:
            return prices[-1][1]
        return sum(t * (p or 0.0) for t, p in prices) / tokens

    def sends_input_type(self, chain: Sequence[ResolvedModel], request: EmbeddingRequest) -> bool | None:
        """Whether the request's ``input_type`` reaches the upstream, whichever deployment of ``chain`` serves it:
        True for every one, False for none, None when it depends on the deployment (see ``accepts_input_type``)."""
        providers, multimodal = self._config.providers, request.is_multimodal
        seen = {providers[d.provider].accepts_input_type
                for m in chain for d in self.eligible(m, request.provider, True)
                if not multimodal or self._multimodal(d)}  # fmt: skip
        return None if len(seen) > 1 else (seen.pop() if seen else True)

    def first_servable(self, chain: Sequence[ResolvedModel], request: EmbeddingRequest) -> ResolvedModel | None:
        """The first model of ``chain`` with a deployment that may take ``request`` (its ``provider`` preferences,
        a multimodal input), as :meth:`embed` passes the others over: the model that serves it while no upstream
        fails; None when none can (routing then answers why)."""
        for model in chain:
            if self.usable(model, request):
                return model
        return None

    def usable(self, model: ResolvedModel, request: EmbeddingRequest) -> list[Deployment]:
        """The deployments of ``model`` that may take ``request``: its ``provider`` preferences, a multimodal input."""
        deployments = self.eligible(model, request.provider, request.input_type is not None)
        if request.is_multimodal:
            return [d for d in deployments if self._multimodal(d)]
        return deployments

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
        attempts: Attempts,
    ) -> tuple[Embeddings, Deployment]:
        last: GatewayError | None = None
        dropped: set[int] = set()  # deployments out for this request: our key refused, or a non-retried status
        failures: dict[int, int] = {}
        ready_at: dict[int, float] = {}  # when a failed deployment may be tried again (backoff / Retry-After)
        payload = request.upstream_input(chunk if len(chunk) != len(request.items) else None)
        fallback_codes = (
            request.fallback_on_codes if request.fallback_on_codes is not None else self._routing.fallback_on_codes
        )
        tries = max(1 + retry.count, len(deployments))
        planned: dict[int, float] = {}  # a retry's backoff, drawn when the failed attempt's span was told of it

        def next_step(err: GatewayError) -> str:
            """What the handling below does after the current attempt ``n`` failed with ``err``, for its span.

            Called from within ``_attempt`` (after the deployment's breaker counted the failure), so ``n``, ``index``
            and ``dropped`` are still the current attempt's. A retry is told only where one follows: a deployment
            left to pick (not every breaker open), whose backoff ends before the deadline."""
            status = getattr(err, "upstream_status", None)
            if status in _INPUT_ERRORS:
                return "error"
            now = self._clock()
            if now >= deadline:  # the request's deadline is spent: neither a retry nor a fallback follows
                return "error"
            # In the order the handling below checks them: our key refused is never retried (even if on_codes lists it)
            backoff: float | None = None
            if status in _KEY_ERRORS or (status is not None and status not in retry.on_codes
                                         and status in fallback_codes):  # fmt: skip
                out = dropped | {index}  # this deployment is dropped
                more = n + 1 < tries and len(out) < len(deployments)
            elif status is None or status in retry.on_codes:
                out = dropped
                more = n + 1 < tries
                backoff = planned[index] = self._backoff(failures.get(index, 0) + 1, getattr(err, "retry_after_s",
                                                                                              None))  # fmt: skip
            else:
                return "error"
            if more:  # (this attempt's own probe, released after it, is no other request's: free for its retry)
                following = self._pickable(deployments, n + 1, out, index if probe else None)
                if following is not None:
                    wait = backoff if following == index and backoff is not None else ready_at.get(following, 0.0) - now
                    if wait <= 0 or wait < deadline - now:  # as the loop below decides it
                        return "retry"
            return "fallback" if attempts.models_left else "error"

        for n in range(tries):
            picked = self._pick(deployments, n, dropped)
            if picked is None:
                if last is None:
                    attempts.skipped.append(f"{model.id}: every deployment's circuit breaker is open")
                    cooling = Unavailable(f"Every deployment of '{model.id}' is cooling down",
                                          headers={"retry-after": str(self._cooldown_left(deployments))})  # fmt: skip
                    raise _ModelFailed(cooling, True, cooling=True)
                break
            index, probe = picked
            deployment = deployments[index]
            # No break/continue inside this try/finally (mypyc compiles none): the outcome is noted, then acted on.
            served: tuple[Embeddings, Deployment] | None = None
            stop = False
            try:
                wait = ready_at.get(index, 0.0) - self._clock()
                if wait > 0 and wait >= deadline - self._clock():
                    stop = True  # sleeping would outlast the deadline: leave the time to the fallbacks
                else:
                    if wait > 0:
                        await self._sleep(wait)
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        last = self.deadline_reached()
                        stop = True
                    else:
                        attempts.count += 1
                        sending = [UNKNOWN, 0]  # where the call stands, as the transport tells (see SENDING)
                        token = SENDING.set(sending)
                        try:
                            result = await self._attempt(request, payload, len(chunk), model, deployment, n + 1,
                                                         fallback_index, remaining, next_step)  # fmt: skip
                        except asyncio.CancelledError:
                            if sending[0] != WAITING:  # (billed if the router cut it off: see _serve_model)
                                attempts.cut_off.append(self._estimated(request, chunk, model, deployment))
                            raise
                        except UpstreamError as err:
                            if err.served:  # answered, and so charged, but of no use: its usage, else its estimate
                                spent = self._estimated(request, chunk, model, deployment)
                                given = err.served_tokens
                                if given is not None and len(chunk) <= given < spent[1]:  # (as _check_usage bounds it)
                                    spent = (spent[0], given, spent[2], spent[3])
                                attempts.spent.append(spent)
                            raise
                        finally:
                            SENDING.reset(token)
                        served = result, deployment
            except (UpstreamError, UpstreamTimeout) as err:
                status = getattr(err, "upstream_status", None)
                if status in _INPUT_ERRORS:
                    # named as the upstream names it, where that is a field the client sent (else the input)
                    param = getattr(err, "upstream_param", None) or "input"
                    what = "the input" if param == "input" else f"'{param}'"
                    raise InvalidRequest(f"The upstream rejected {what}: {err.message}", param=param,
                                         code="upstream_rejected_input") from None  # fmt: skip
                last = err
                if status in _KEY_ERRORS:
                    # Our provider key is wrong: an operator must know, and retrying it cannot help (even if
                    # on_codes lists the status).
                    log.error("upstream rejected our provider key", provider=deployment.provider, status=status,
                              deployment=_deployment_id(deployment), model=model.id)  # fmt: skip
                    dropped.add(index)
                elif status is None or status in retry.on_codes:
                    failures[index] = failures.get(index, 0) + 1
                    backoff = planned.pop(index, None)  # (none drawn for an attempt the deadline cut: it says error)
                    if backoff is None:
                        backoff = self._backoff(failures[index], getattr(err, "retry_after_s", None))
                    ready_at[index] = self._clock() + backoff
                elif status in fallback_codes:
                    dropped.add(index)
                elif self._unknown_upstream(model, err):
                    # The upstream does not know the model the client named (a typo through "<provider>/<name>"):
                    # the client's error, as OpenAI and OpenRouter answer it, not a 502 its SDK retries. (A model of
                    # the config stays a 502: its upstream_model is the operator's to mend.)
                    raise _ModelFailed(self._not_served(request, model, fallback_index, err), False,
                                       answered=True) from None  # fmt: skip
                else:
                    raise _ModelFailed(err, False) from None
            finally:
                if probe:
                    self._release(deployment)
            if served is not None:
                return served
            if stop:
                break
        if last is not None and self._unknown_upstream(model, last):  # dropped (fallback_on_codes lists 404)
            raise _ModelFailed(self._not_served(request, model, fallback_index, last), True, answered=True)
        raise _ModelFailed(last or UpstreamTimeout("The overall deadline was reached"), True)

    def _estimated(self, request: EmbeddingRequest, chunk: list[int], model: ResolvedModel,
                   deployment: Deployment) -> Spent:  # fmt: skip
        """What a call whose usage never arrived is billed: its estimate (an upper bound). For a call the upstream
        served and charged whole (an answer of no use: vectors of another size), or one the router cut off while the
        upstream was serving this batch (a sibling chunk failed, and another came back embedded, or of no use): a
        budget errs on the side of refusing, never of overspending. Not for a call that timed out, lost its
        connection, was cancelled with its request, or got an answer that is none (bad JSON, a wrong count: a proxy's
        error page, say), nor for one cut off while nothing showed the upstream serving: an upstream that hangs,
        refuses our key, rate limits every call, or a base_url that is no provider, makes them by the thousand, and
        counted so they would spend a day's budget on calls never served."""
        estimate = estimate_tokens([request.items[p] for p in chunk])
        return (model.id, estimate, self._price(model, deployment), deployment.provider)

    def _unknown_upstream(self, model: ResolvedModel, err: GatewayError) -> bool:
        """An upstream 404 ``model_not_found`` for a model the config does not list: the client's typo."""
        code = getattr(err, "upstream_code", None)
        return (
            getattr(err, "upstream_status", None) == 404
            and code == "model_not_found"
            and model.id not in self._config.models
        )

    def _not_served(self, request: EmbeddingRequest, model: ResolvedModel, fallback_index: int,
                    err: GatewayError) -> NotFound:  # fmt: skip
        """The client's 404 for a model the upstream does not know, naming the field that named the model."""
        if fallback_index:
            param = request.param(f"fallbacks[{fallback_index - 1}].model")
        elif request.load_balancer:  # the weighted pick replaced the request's ``model``
            i = next((i for i, (m, _) in enumerate(request.load_balancer) if m == model.id), 0)
            param = request.param(f"load_balancer.models[{i}].model")
        else:
            param = "model"
        found = NotFound(f"The model '{model.id}' is not served upstream: {err.message}", param=param)
        found.own_part = f"The model '{model.id}' is not served upstream"
        return found

    async def _attempt(
        self,
        request: EmbeddingRequest,
        payload: Any,
        n_items: int,
        model: ResolvedModel,
        deployment: Deployment,
        attempt: int,
        fallback_index: int,
        remaining: float,
        next_step: Callable[[GatewayError], str],
    ) -> Embeddings:
        """One upstream call: hook, adapter, answer checks and the deployment's breaker; raises on failure."""
        adapter = self._adapters[deployment.provider]
        provider = self._config.providers[deployment.provider]
        call_timeout_s = (request.timeout_ms or provider.timeout_ms) / 1000
        timeout_s = min(call_timeout_s, remaining)
        # Cut short by what was left of the request's deadline (under half of what a request's first attempt gets,
        # its call timeout or the whole deadline_ms, whichever is shorter), a timeout is the request's, not the
        # deployment's. One given (about) all a request can give is the deployment's: with deadline_ms below the
        # call timeout, every attempt is "cut", and a hung deployment never opened its breaker.
        full_s = min(call_timeout_s, self._routing.deadline_ms / 1000)  # what a request's first attempt gets
        cut_by_deadline = remaining < call_timeout_s and remaining < 0.5 * full_s
        token = self._hook.start(model=model.id, deployment=deployment, adapter=adapter, attempt=attempt,
                                 fallback_index=fallback_index, request=request)  # fmt: skip
        started = self._clock()
        try:
            result = await adapter.embed(
                upstream_model=deployment.upstream_model,
                input=payload,
                n_items=n_items,
                dimensions=request.dimensions,
                user=request.user,
                # left out where the provider does not take it, as OpenRouter leaves out what a provider does not
                # support (OpenAI's API answers 400 to a field it does not know)
                input_type=request.input_type if provider.accepts_input_type else None,
                timeout_s=timeout_s,
                headers=self._hook.headers(token),
            )
            if request.dimensions is None:
                self._check_dims(model.id, deployment, result)
            self._check_usage(deployment.provider, payload, n_items, result)
        except (UpstreamError, UpstreamTimeout) as err:
            elapsed = self._clock() - started
            cut = cut_by_deadline and isinstance(err, UpstreamTimeout)  # the request's deadline: nothing follows
            # a client's typo through "<provider>/<name>" is not the deployment's failure either: counted, the typo's
            # breaker opened, and its next requests were 503s with a Retry-After, which SDKs retry
            short = isinstance(err, UpstreamTimeout) and self._short(provider.timeout_ms, deployment, timeout_s)
            if not (cut or short) and not self._unknown_upstream(model, err):
                self._record(deployment, ok=False, seconds=elapsed, error=err)  # (first: it may open the breaker)
            self._hook.end(token, error=err, result=None, seconds=elapsed, outcome="error" if cut else next_step(err))
            raise
        except BaseException as exc:
            # Cancelled (a sibling chunk failed, the request was cancelled), or an unexpected bug: the span must still
            # end, and says which; the deployment is not blamed for our cancellation, nor for our bug.
            if isinstance(exc, asyncio.CancelledError):
                ended: GatewayError = UpstreamError("The attempt was cancelled", code="attempt_cancelled")
                outcome = "cancelled"
            else:
                ended, outcome = GatewayError("The attempt failed in the gateway", code="internal_error"), "error"
            self._hook.end(token, error=ended, result=None, seconds=self._clock() - started, outcome=outcome)
            raise
        elapsed = self._clock() - started
        self._hook.end(token, error=None, result=result, seconds=elapsed)
        self._record(deployment, ok=True, seconds=elapsed, error=None)
        return result

    def _short(self, timeout_ms: int, deployment: Deployment, timeout_s: float) -> bool:
        """Whether an attempt's timeout of ``timeout_s`` was the request's, not the deployment's: under half of the
        deployment's own (its provider's ``timeout_ms``, or ``deadline_ms`` if shorter), by the client's own
        ``timeout.call_timeout`` (a 1 ms one opened a shared deployment's breaker for every client and workspace) or
        by what its deadline left, and under four times the deployment's measured latency. Four times that is ample
        for a deployment that answers: one that stops answering still opens its breaker under clients' short
        timeouts (one never measured, through requests that give it its own)."""
        if timeout_s >= 0.5 * min(timeout_ms, self._routing.deadline_ms) / 1000:
            return False
        b = self.breakers.get(_deployment_id(deployment))
        return b is None or b.latency_ewma_s is None or timeout_s < 4 * b.latency_ewma_s

    def _check_usage(self, provider: str, payload: Any, n_items: int, result: Embeddings) -> None:
        """The answer's token count as budgets will charge it: the upstream's, unless it gave none (or fewer than
        one per input, or one not a whole number), or more than the estimate's upper bound for text and token ids
        (an image's allowance is no bound): then the estimate, which the request reserved."""
        tokens = result.prompt_tokens
        estimate = estimate_tokens(payload)
        if tokens >= n_items and (tokens <= estimate or not is_bounded(payload)):
            return
        if provider not in self._usage_warned and len(self._usage_warned) < 1000:
            self._usage_warned.add(provider)
            log.warning("the upstream's token count was missing or out of bounds: the estimate is charged instead "
                        "(told once per provider)", provider=provider, reported=tokens, estimate=estimate)  # fmt: skip
        result.prompt_tokens = result.total_tokens = estimate

    def known_dimensions(self, model_id: str) -> int | None:
        """The dimension count ``model_id`` answers with when no ``dimensions`` is asked, as its answers in this
        process showed it (None before one came)."""
        seen = self._dims.get(model_id)
        return seen.known if seen is not None else None

    def _check_dims(self, model_id: str, deployment: Deployment, result: Embeddings) -> None:
        """Reject an answer whose dimension count differs from the model's (see the module docstring)."""
        seen = self._dims.get(model_id)
        if seen is None:
            if len(self._dims) < 10000:  # bounded: model ids may come from clients
                self._dims[model_id] = _Dims(known=result.dimensions)
            return
        if result.dimensions == seen.known:
            seen.streak = 0
            return
        if result.dimensions == seen.candidate:
            seen.streak += 1
        else:
            seen.candidate, seen.streak = result.dimensions, 1
        if seen.streak >= _DIMS_ADOPT_STREAK:
            log.warning("model changed its dimension count", model=model_id, was=seen.known, now=result.dimensions)
            seen.known, seen.streak = result.dimensions, 0
            return
        raise UpstreamError(
            f"{deployment.provider} sent a malformed answer: {result.dimensions} dimensions where '{model_id}' "
            f"answers {seen.known}",
            code="upstream_malformed",
            served=True,
            served_tokens=result.prompt_tokens if result.prompt_tokens > 0 else None,
        )

    def _cooldown_left(self, deployments: list[Deployment]) -> int:
        """Whole seconds (at least 1) until the first of ``deployments`` may be tried again."""
        now = self._clock()
        left = math.inf
        for d in deployments:
            b = self.breakers.get(_deployment_id(d))
            if b is not None and b.open_until > now:
                left = min(left, b.open_until - now)
        return max(1, math.ceil(left)) if left < math.inf else 1

    def _cooling(self, deployments: list[Deployment]) -> bool:
        """Whether no deployment's circuit breaker is closed (each open, or half-open for one probe)."""
        now = self._clock()
        for d in deployments:
            b = self.breakers.get(_deployment_id(d))
            if b is None or b.state(now) == "closed":
                return False
        return True

    def _pick(self, deployments: list[Deployment], n: int, dropped: set[int]) -> tuple[int, bool] | None:
        """The deployment of attempt ``n`` (cycling, skipping dropped and cooling ones); whether it is a probe."""
        index = self._pickable(deployments, n, dropped)
        if index is None:
            return None
        b = self.breakers.get(_deployment_id(deployments[index]))
        if b is not None and b.state(self._clock()) == "half_open":
            b.probing = True  # one probe at a time; its outcome closes or reopens the breaker
            return index, True
        return index, False

    def _pickable(self, deployments: list[Deployment], n: int, dropped: set[int], own_probe: int | None = None
                  ) -> int | None:  # fmt: skip
        """The deployment attempt ``n`` would take, if any (:meth:`_pick` without claiming a probe; ``own_probe``
        the deployment whose probe the caller holds, taken as free)."""
        now = self._clock()
        count = len(deployments)
        for i in range(count):
            index = (n + i) % count
            if index in dropped:
                continue
            b = self.breakers.get(_deployment_id(deployments[index]))
            if b is None:
                return index
            state = b.state(now)
            if state == "closed" or (state == "half_open" and (not b.probing or index == own_probe)):
                return index
        return None

    def _release(self, d: Deployment) -> None:
        """End a probe that was claimed, whatever happened to it (recorded, or never sent)."""
        b = self.breakers.get(_deployment_id(d))
        if b is not None:
            b.probing = False

    def _backoff(self, failures: int, retry_after_s: float | None) -> float:
        cap = self._routing.max_retry_after_ms / 1000
        if retry_after_s is not None:
            return min(retry_after_s, cap)
        base = self._routing.backoff_base_ms / 1000 * 2.0 ** (failures - 1)
        return min(base * self._rng.uniform(0.75, 1.25), cap)

    def _record(self, d: Deployment, *, ok: bool, seconds: float, error: GatewayError | None) -> None:
        name = _deployment_id(d)
        b = self.breakers.get(name)
        if b is None:
            if len(self.breakers) >= 10000:  # bounded: ad-hoc "<provider>/<name>" ids come from clients
                return
            b = self.breakers[name] = Breaker()
        if ok:
            b.failures, b.open_until = 0, 0.0
            b.latency_ewma_s = seconds if b.latency_ewma_s is None else 0.8 * b.latency_ewma_s + 0.2 * seconds
            return
        if _not_the_deployment(error):
            return  # the client's input was bad, not the deployment
        b.failures += 1
        b.last_error = _summary(error) if error else ""
        if b.failures >= self._routing.breaker_failures:
            if b.state(self._clock()) != "open":
                log.warning("circuit breaker opened", deployment=name, consecutive_failures=b.failures,
                            cooldown_ms=self._routing.breaker_cooldown_ms, error=b.last_error)  # fmt: skip
            b.open_until = self._clock() + self._routing.breaker_cooldown_ms / 1000

    def status(self) -> dict[str, Any]:
        """Circuit-breaker state of every deployment (configured or used), for ``/readyz``; the deployments of
        names a client made up, per provider as ``<provider>/*``: the one in the worst state."""
        now = self._clock()
        out: dict[str, Any] = {}
        for name, b in self.breakers.items():
            state = b.state(now)
            if name not in self._listed:
                name = name.partition("/")[0] + "/*"
                shown = out.get(name)
                worse = (_WORSE[state], b.failures)
                if shown is not None and (_WORSE[shown["state"]], shown["consecutive_failures"]) >= worse:
                    continue
            entry: dict[str, Any] = {
                "state": state,
                "consecutive_failures": b.failures,
                "latency_ms": None if b.latency_ewma_s is None else round(b.latency_ewma_s * 1000, 2),
            }
            if state == "open":
                entry["retry_in_ms"] = round((b.open_until - now) * 1000)
            if b.last_error:
                entry["last_error"] = b.last_error
            out[name] = entry
        return out


class _ModelFailed(Exception):
    """A model of the chain failed; ``spent`` says whether its attempts ran out (always fall back then);
    ``cooling``, that it could not be tried only because its circuit breakers are open (a passing state)."""

    def __init__(self, error: GatewayError, spent: bool, *, cooling: bool = False, answered: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.spent = spent
        self.cooling = cooling
        #: ``error`` is an upstream's own answer (a 404 for a model it does not know), not "nothing could be tried"
        self.answered = answered


class _Skipped(Exception):
    """A chunk of a split batch not sent because a sibling chunk already failed for the same model."""


def _summary(error: GatewayError) -> str:
    """An attempt's failure as ``/readyz`` (no key needed) and the breaker's warning show it: its code and the
    upstream's status, never the upstream's message (it may quote a client's input)."""
    status = getattr(error, "upstream_status", None)
    return f"{error.code} (upstream answered {status})" if status else str(error.code)
