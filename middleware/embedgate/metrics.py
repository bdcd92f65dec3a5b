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
worker process's values, as ``embedgate serve --workers N`` needs: the series are prometheus_client's own metrics,
whose values live in its per-process files. In one process, the series of the request path (all but the budget
rejections and the cache size) are plain numbers in dicts of this module, exposed by a collector of the registry
in the exposition prometheus_client writes for its own metrics (same names, samples and ``_created`` series):
prometheus_client's ``inc`` and ``observe`` are Python with a lock per value, ~2.4 us for a request's five samples,
~4.6% of a cache miss's instructions.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Final, Generic, Protocol, TypeVar

import prometheus_client.metrics
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

__all__ = ["LATENCY_BUCKETS", "Metrics"]

#: Upstream latency buckets, seconds: an embedding call takes from about a millisecond (a local model) to
#: tens of seconds (a large batch on a slow provider; 30 s is the default timeout).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0)

_M = TypeVar("_M", bound=MetricWrapperBase)
_OTHER: Final = "other"
_MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
_HIT: Final = ("hit",)
_MISS: Final = ("miss",)


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


class _Series(Protocol):
    """A labelled counter or histogram on the request path: ``add(labels, amount)`` (a histogram observes it)."""

    def add(self, key: tuple[object, ...], amount: float) -> None: ...


class _PromCounter:
    """A prometheus_client counter (multi-process mode: its values live in prometheus_client's files)."""

    def __init__(self, counter: Counter, limit: int) -> None:
        self._children = _Children(counter, limit)

    def add(self, key: tuple[object, ...], amount: float) -> None:
        self._children.get(key).inc(amount)


class _PromHistogram:
    """A prometheus_client histogram (multi-process mode)."""

    def __init__(self, histogram: Histogram, limit: int) -> None:
        self._children = _Children(histogram, limit)

    def add(self, key: tuple[object, ...], amount: float) -> None:
        self._children.get(key).observe(amount)


class _Labels:
    """Raw label tuples (an int status, say) to their strings, once each; past ``limit`` series, ``other``."""

    def __init__(self, width: int, limit: int) -> None:
        self._seen: dict[tuple[object, ...], tuple[str, ...]] = {}
        self._count = 0
        self._limit = limit
        self._other = (_OTHER,) * width

    def get(self, key: tuple[object, ...]) -> tuple[str, ...] | None:
        """The series' label strings, or None when the key is new (then call ``new``)."""
        return self._seen.get(key)

    def new(self, key: tuple[object, ...], series: dict[tuple[str, ...], list[float]]) -> tuple[str, ...]:
        labels = tuple(str(value) for value in key)
        if labels not in series and len(series) >= self._limit:
            labels = self._other  # as _Children folds them
        if len(self._seen) < 4 * self._limit:  # a bounded memo: keys past it are converted again, not kept
            self._seen[key] = labels
        return labels


class _FastCounter:
    """A labelled counter as a dict of label strings -> [value, created]; exposed by ``collect``."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], limit: int) -> None:
        self.name = name[: -len("_total")] if name.endswith("_total") else name
        self.documentation = documentation
        self.labelnames = labelnames
        self._labels = _Labels(len(labelnames), limit)
        self.series: dict[tuple[str, ...], list[float]] = {}

    def add(self, key: tuple[object, ...], amount: float) -> None:
        labels = self._labels.get(key)
        if labels is None:
            labels = self._labels.new(key, self.series)
        entry = self.series.get(labels)
        if entry is None:
            self.series[labels] = [amount, time.time()]
        else:
            entry[0] += amount

    def collect(self, created: bool) -> Metric:
        metric = Metric(self.name, self.documentation, "counter")
        for labels, (value, since) in list(self.series.items()):
            named = dict(zip(self.labelnames, labels, strict=True))
            metric.add_sample(self.name + "_total", named, value)
            if created:
                metric.add_sample(self.name + "_created", dict(named), since)
        return metric


class _FastHistogram:
    """A labelled histogram as a dict of label strings -> [count per bucket ..., sum, created]."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], buckets: tuple[float, ...],
                 limit: int) -> None:  # fmt: skip
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        bounds = [float(b) for b in buckets]
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = bounds
        self.le = [str(floatToGoString(b)) for b in bounds]  # type: ignore[no-untyped-call]  # "30.0", "+Inf"
        self._labels = _Labels(len(labelnames), limit)
        self.series: dict[tuple[str, ...], list[float]] = {}

    def add(self, key: tuple[object, ...], amount: float) -> None:
        labels = self._labels.get(key)
        if labels is None:
            labels = self._labels.new(key, self.series)
        entry = self.series.get(labels)
        n = len(self.bounds)
        if entry is None:
            entry = self.series[labels] = [0.0] * n + [0.0, time.time()]
        entry[bisect.bisect_left(self.bounds, amount)] += 1  # the first bucket whose bound is >= amount
        entry[n] += amount

    def collect(self, created: bool) -> Metric:
        metric = Metric(self.name, self.documentation, "histogram")
        n = len(self.bounds)
        for labels, entry in list(self.series.items()):
            named = dict(zip(self.labelnames, labels, strict=True))
            acc = 0.0
            for i in range(n):
                acc += entry[i]
                metric.add_sample(self.name + "_bucket", {**named, "le": self.le[i]}, acc)
            metric.add_sample(self.name + "_count", dict(named), acc)
            if self.bounds[0] >= 0:
                metric.add_sample(self.name + "_sum", dict(named), entry[n])
            if created:
                metric.add_sample(self.name + "_created", dict(named), entry[n + 1])
        return metric


class _FastCollector:
    """The registry's view of the fast series, as prometheus_client's collectors are seen."""

    def __init__(self, counters: list[_FastCounter], histograms: list[_FastHistogram]) -> None:
        self._counters = counters
        self._histograms = histograms

    def describe(self) -> list[Metric]:
        return [Metric(c.name, c.documentation, "counter") for c in self._counters] + [
            Metric(h.name, h.documentation, "histogram") for h in self._histograms
        ]

    def collect(self) -> list[Metric]:
        created = bool(getattr(prometheus_client.metrics, "_use_created", True))
        return [c.collect(created) for c in self._counters] + [h.collect(created) for h in self._histograms]


class Metrics:
    """The gateway's Prometheus metrics; its ``observe_*`` methods are dict lookups and increments."""

    def __init__(self, registry: CollectorRegistry | None = None, *, max_series: int = 10_000) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._multiprocess = bool(os.environ.get(_MULTIPROC_ENV))
        self._known: frozenset[str] | None = None  # see set_known_models
        reg = self.registry
        requests = (
            "embedgate_requests_total",
            "Embedding requests answered, by route, model, HTTP status and cache status.",
            ("route", "model", "status", "cache"),
        )
        attempts = (
            "embedgate_upstream_attempts_total",
            "Upstream attempts, by provider, model and outcome (HTTP status or error type).",
            ("provider", "model", "status"),
        )
        latency = (
            "embedgate_upstream_latency_seconds",
            "Duration of upstream attempts, in seconds.",
            ("provider", "model"),
        )
        tokens = ("embedgate_tokens_total", "Tokens billed, by key id and model.", ("key", "model"))
        spend = ("embedgate_spend_usd_total", "Spend in USD, by key id and model.", ("key", "model"))
        cache_items = ("embedgate_cache_items_total", "Cache lookups per input item, by result.", ("result",))
        self._requests: _Series
        self._attempts: _Series
        self._latency: _Series
        self._tokens: _Series
        self._spend: _Series
        self._cache_items: _Series
        if self._multiprocess:
            self._requests = _PromCounter(Counter(*requests, registry=reg), max_series)
            self._attempts = _PromCounter(Counter(*attempts, registry=reg), max_series)
            self._latency = _PromHistogram(Histogram(*latency, buckets=LATENCY_BUCKETS, registry=reg), max_series)
            self._tokens = _PromCounter(Counter(*tokens, registry=reg), max_series)
            self._spend = _PromCounter(Counter(*spend, registry=reg), max_series)
            self._cache_items = _PromCounter(Counter(*cache_items, registry=reg), max_series)
        else:
            counters = [
                _FastCounter(name, doc, labelnames, max_series)
                for name, doc, labelnames in (requests, attempts, tokens, spend, cache_items)
            ]
            histogram = _FastHistogram(latency[0], latency[1], latency[2], LATENCY_BUCKETS, max_series)
            self._requests, self._attempts, self._tokens, self._spend, self._cache_items = counters
            self._latency = histogram
            reg.register(_FastCollector(counters, [histogram]))
        self._rejections = _Children(
            Counter(
                "embedgate_budget_rejections_total",
                "Requests refused by a budget, by budget scope and dimension (requests, tokens, cost).",
                ("scope", "dimension"),
                registry=reg,
            ),
            max_series,
        )
        self._cache_bytes = Gauge(
            "embedgate_cache_bytes",
            "Bytes held by the embedding cache.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._cache_bytes_source: Callable[[], float] | None = None
        self._cache_bytes_refreshed = 0.0
        self._cache_bytes_later: asyncio.TimerHandle | None = None  # the refresh a throttled one put off

    def set_known_models(self, ids: Iterable[str]) -> None:
        """Label models with their id only when they are among ``ids`` (the configured and well-known ones); any
        other ``<provider>/<name>``, which clients make up at will and which routes by its prefix, is labelled
        ``<provider>/*``. Until this is called, every id is its own label."""
        self._known = frozenset(ids)

    def _model(self, model: str) -> str:
        known = self._known
        if known is None or not model or model in known:
            return model
        return model.partition("/")[0] + "/*"

    def observe_request(self, route: str, model: str, status: int | str, cache: str) -> None:
        """Count one answered request; ``cache`` is hit, miss, partial or bypass."""
        self._requests.add((route, self._model(model), status, cache), 1.0)
        if self._multiprocess and self._cache_bytes_source is not None:
            self._refresh_cache_bytes()

    def observe_attempt(self, provider: str, model: str, status: int | str, seconds: float) -> None:
        """Count one upstream attempt (``status``: the HTTP status, or ``timeout`` ...) and its duration."""
        model = self._model(model)
        self._attempts.add((provider, model, status), 1.0)
        self._latency.add((provider, model), seconds)

    def observe_usage(self, key: str, model: str, tokens: int, cost: float) -> None:
        """Add billed tokens and spend (USD) for a key id and model."""
        model = self._model(model)
        if tokens > 0:
            self._tokens.add((key, model), float(tokens))
        if cost > 0:
            self._spend.add((key, model), cost)

    def observe_budget_rejection(self, scope: str, dimension: str) -> None:
        """Count a request refused by a budget of ``scope`` on ``dimension`` (requests, tokens or cost)."""
        self._rejections.get((scope, dimension)).inc()

    def observe_cache_items(self, hits: int, misses: int) -> None:
        """Count the input items answered from the cache and those that were not."""
        if hits > 0:
            self._cache_items.add(_HIT, float(hits))
        if misses > 0:
            self._cache_items.add(_MISS, float(misses))

    def set_cache_bytes_source(self, source: Callable[[], float] | None) -> None:
        """Read ``embedgate_cache_bytes`` from ``source`` (sync and cheap: it runs on every scrape)."""
        self._cache_bytes_source = source
        if self._multiprocess:
            # A multi-process scrape reads files, not callbacks: refresh from the request path instead.
            self._cache_bytes_refreshed = 0.0
            if source is not None:
                self._refresh_cache_bytes()
            else:
                self._cache_bytes.set(0.0)
        elif source is None:
            self._cache_bytes.set_function(lambda: 0.0)
        else:
            self._cache_bytes.set_function(lambda: _safe(source))

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The ``/metrics`` body and its content type (OpenMetrics when ``accept`` asks for it)."""
        if self._multiprocess:
            from prometheus_client.multiprocess import MultiProcessCollector

            self._refresh_cache_bytes(force=True)  # this worker's, as of now
            _forget_dead_workers()
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry = self.registry
        if not accept:
            return generate_latest(registry), CONTENT_TYPE_LATEST
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type

    def _refresh_cache_bytes(self, force: bool = False) -> None:
        # At most once a second (the source may walk a data structure); one put off is done a second later, so a
        # worker that goes quiet after a burst does not keep its value of the burst's start.
        now = time.monotonic()
        source = self._cache_bytes_source
        if source is None:
            return
        wait = 1.0 - (now - self._cache_bytes_refreshed)
        if force or wait <= 0:
            self._cache_bytes_refreshed = now
            self._cache_bytes.set(_safe(source))
        elif self._cache_bytes_later is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._cache_bytes_later = loop.call_later(wait, self._refresh_later)

    def _refresh_later(self) -> None:
        self._cache_bytes_later = None
        self._refresh_cache_bytes()

    def close(self) -> None:
        """At the gateway's shutdown, with ``PROMETHEUS_MULTIPROC_DIR``: this worker's gauge no longer counts
        (``prometheus_client.multiprocess.mark_process_dead``); its counters stay, as they should."""
        if self._cache_bytes_later is not None:
            self._cache_bytes_later.cancel()
            self._cache_bytes_later = None
        if self._multiprocess:
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def _safe(source: Callable[[], float]) -> float:
    # A failing callback must not break the whole scrape.
    try:
        return float(source())
    except Exception:
        return math.nan


def _forget_dead_workers() -> None:
    """Drop the live gauges of worker processes that are gone (killed: they never said so), as
    ``mark_process_dead`` would have: their last cache size would be summed for ever."""
    from prometheus_client.multiprocess import mark_process_dead

    directory = os.environ.get(_MULTIPROC_ENV, "")
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not name.startswith("gauge_live") or not name.endswith(".db"):
            continue
        pid_text = name[: -len(".db")].rpartition("_")[2]
        if not (pid_text.isascii() and pid_text.isdigit()):
            continue
        pid = int(pid_text)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
        except OSError:  # another user's process: alive
            pass
