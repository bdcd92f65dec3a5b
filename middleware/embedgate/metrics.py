"""Prometheus metrics of one gateway, rendered at ``/metrics`` (SPEC section 8).

    embedgate_requests_total{route,model,status,cache}         requests answered
    embedgate_upstream_attempts_total{provider,model,status}    upstream calls, by outcome
    embedgate_upstream_latency_seconds{provider,model}          upstream call duration (1 ms .. 30 s buckets)
    embedgate_tokens_total{key,model}                           tokens billed, by key id
    embedgate_spend_usd_total{key,model}                        spend in USD, by key id
    embedgate_budget_rejections_total{scope,dimension}          requests refused by a budget
    embedgate_cache_items_total{result}                         cache lookups per input item: hit | miss
    embedgate_cache_bytes                                       cache size, read from a callback

Each gateway has its own registry by default, so two gateways in one process do not collide. Label values are
the caller's: pass key ids and configured model ids, never a secret or anything a client typed freely. As a
backstop, a metric that reaches ``max_series`` label sets folds further ones into ``other``.

With ``PROMETHEUS_MULTIPROC_DIR`` set (before ``prometheus_client`` is imported), ``render`` aggregates every
worker process's values, as ``embedgate serve --workers N`` needs.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest
from prometheus_client.metrics import MetricWrapperBase

__all__ = ["LATENCY_BUCKETS", "Metrics"]

#: Upstream latency buckets, seconds: an embedding call takes from about a millisecond (a local model) to
#: tens of seconds (a large batch on a slow provider; 30 s is the default timeout).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0)

_M = TypeVar("_M", bound=MetricWrapperBase)
_OTHER = "other"
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class _Children(Generic[_M]):
    """The labelled children of one metric, cached by label tuple: ``.labels()`` costs microseconds."""

    __slots__ = ("_children", "_limit", "_metric")

    def __init__(self, metric: _M, limit: int) -> None:
        self._metric = metric
        self._limit = limit
        self._children: dict[tuple[object, ...], _M] = {}

    def get(self, key: tuple[object, ...]) -> _M:
        child = self._children.get(key)
        if child is None:
            if len(self._children) >= self._limit:
                # Past the limit, new label sets share one "other" series, itself created once past the limit.
                key = (_OTHER,) * len(key)
                child = self._children.get(key)
                if child is not None:
                    return child
            # Keyed by the raw values (an int status is fine); converted to strings once, here.
            child = self._metric.labels(*(str(value) for value in key))
            self._children[key] = child
        return child


class Metrics:
    """The gateway's Prometheus metrics; its ``observe_*`` methods are dict lookups and increments."""

    def __init__(self, registry: CollectorRegistry | None = None, *, max_series: int = 10_000) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._multiprocess = bool(os.environ.get(_MULTIPROC_ENV))
        reg = self.registry
        self._requests = _Children(
            Counter(
                "embedgate_requests_total",
                "Embedding requests answered, by route, model, HTTP status and cache status.",
                ("route", "model", "status", "cache"),
                registry=reg,
            ),
            max_series,
        )
        self._attempts = _Children(
            Counter(
                "embedgate_upstream_attempts_total",
                "Upstream attempts, by provider, model and outcome (HTTP status or error type).",
                ("provider", "model", "status"),
                registry=reg,
            ),
            max_series,
        )
        self._latency = _Children(
            Histogram(
                "embedgate_upstream_latency_seconds",
                "Duration of upstream attempts, in seconds.",
                ("provider", "model"),
                buckets=LATENCY_BUCKETS,
                registry=reg,
            ),
            max_series,
        )
        self._tokens = _Children(
            Counter(
                "embedgate_tokens_total",
                "Tokens billed, by key id and model.",
                ("key", "model"),
                registry=reg,
            ),
            max_series,
        )
        self._spend = _Children(
            Counter(
                "embedgate_spend_usd_total",
                "Spend in USD, by key id and model.",
                ("key", "model"),
                registry=reg,
            ),
            max_series,
        )
        self._rejections = _Children(
            Counter(
                "embedgate_budget_rejections_total",
                "Requests refused by a budget, by budget scope and dimension (requests, tokens, cost).",
                ("scope", "dimension"),
                registry=reg,
            ),
            max_series,
        )
        cache_items = Counter(
            "embedgate_cache_items_total",
            "Cache lookups per input item, by result.",
            ("result",),
            registry=reg,
        )
        self._cache_hits = cache_items.labels("hit")
        self._cache_misses = cache_items.labels("miss")
        self._cache_bytes = Gauge(
            "embedgate_cache_bytes",
            "Bytes held by the embedding cache.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._cache_bytes_source: Callable[[], float] | None = None
        self._cache_bytes_refreshed = 0.0

    def observe_request(self, route: str, model: str, status: int | str, cache: str) -> None:
        """Count one answered request; ``cache`` is hit, miss, partial or bypass."""
        self._requests.get((route, model, status, cache)).inc()
        if self._multiprocess and self._cache_bytes_source is not None:
            self._refresh_cache_bytes()

    def observe_attempt(self, provider: str, model: str, status: int | str, seconds: float) -> None:
        """Count one upstream attempt (``status``: the HTTP status, or ``timeout`` ...) and its duration."""
        self._attempts.get((provider, model, status)).inc()
        self._latency.get((provider, model)).observe(seconds)

    def observe_usage(self, key: str, model: str, tokens: int, cost: float) -> None:
        """Add billed tokens and spend (USD) for a key id and model."""
        if tokens > 0:
            self._tokens.get((key, model)).inc(tokens)
        if cost > 0:
            self._spend.get((key, model)).inc(cost)

    def observe_budget_rejection(self, scope: str, dimension: str) -> None:
        """Count a request refused by a budget of ``scope`` on ``dimension`` (requests, tokens or cost)."""
        self._rejections.get((scope, dimension)).inc()

    def observe_cache_items(self, hits: int, misses: int) -> None:
        """Count the input items answered from the cache and those that were not."""
        if hits > 0:
            self._cache_hits.inc(hits)
        if misses > 0:
            self._cache_misses.inc(misses)

    def set_cache_bytes_source(self, source: Callable[[], float] | None) -> None:
        """Read ``embedgate_cache_bytes`` from ``source`` (sync and cheap: it runs on every scrape)."""
        self._cache_bytes_source = source
        if self._multiprocess:
            # A multi-process scrape reads files, not callbacks: refresh from the request path instead.
            self._cache_bytes_refreshed = 0.0
            if source is not None:
                self._refresh_cache_bytes()
        elif source is None:
            self._cache_bytes.set_function(lambda: 0.0)
        else:
            self._cache_bytes.set_function(lambda: _safe(source))

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The ``/metrics`` body and its content type (OpenMetrics when ``accept`` asks for it)."""
        if self._multiprocess:
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry = self.registry
        if not accept:
            return generate_latest(registry), CONTENT_TYPE_LATEST
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type

    def _refresh_cache_bytes(self) -> None:
        # At most once a second: the source may walk a data structure.
        now = time.monotonic()
        source = self._cache_bytes_source
        if source is not None and now - self._cache_bytes_refreshed >= 1.0:
            self._cache_bytes_refreshed = now
            self._cache_bytes.set(_safe(source))


def _safe(source: Callable[[], float]) -> float:
    # A failing callback must not break the whole scrape.
    try:
        return float(source())
    except Exception:
        return math.nan
