"""Prometheus metrics: every series the proxy exports, declared here and recorded in one middleware.

Each app has its own :class:`~prometheus_client.CollectorRegistry` (a process may run several apps:
the tests do), served by the admin listener at ``GET /metrics``. Names start with ``rerank_proxy_``.

Three sources:

* per request, :func:`record_middleware` reads the request's
  :class:`~proxy.request_record.RequestRecord` when the answer is done (also on an error or a
  cancelled request) and observes the request, upstream and scoring series;
* per model, :class:`ScorerCollector` reads each loaded scorer's batching-queue counters
  (:class:`~proxy.batch_cost.QueueStats`) and score cache at scrape time, so the queue's hot path never
  touches a metric; :class:`ShadowCollector` reads shadow mode's comparisons the same way (they run
  in the background, after their request's record is closed).

Label values come from closed sets only: a route kind, an outcome, a reason from :data:`REASONS`, a
status class, an upstream error kind, a configured model name. Never an index, a path or query text:
a search on a new index adds no series. A reason outside :data:`REASONS` is exported as ``other``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .batch_cost import WAIT_BUCKETS_S
from .request_record import RequestRecord, record_of, recording
from .search_plan import MSEARCH, MSEARCH_TEMPLATE, search_endpoint

__all__ = ["METRICS_KEY", "REASONS", "Metrics", "ScorerCollector", "record_middleware", "route_kind"]

PREFIX = "rerank_proxy_"
ROUTES = ("search", "msearch", "passthrough")
UPSTREAM_ERRORS = ("timeout", "unavailable", "http_5xx", "http_429")
# Every X-Rerank-Reason the proxy gives (README, "Response headers").
REASONS = frozenset(
    {
        "disabled",
        "scroll",
        "search_after",
        "pit",
        "sort",
        "min_score",
        "size_zero",
        "no_query_text",
        "no_passage_text",
        "window_beyond_top_k",
        "no_source",
        "unsupported_format",
        "invalid_body",
        "invalid_request",
        "shadow",
        "not_sampled",
        "template_not_rendered",
        "template_parameters",
        "upstream_rejected_rewrite",
        "unreadable_response",
        "upstream_status",
        "rerank_error",
        "rerank_timeout",
        "overloaded",
        "queue_wait",
        "deadline",
        "mixed_rules",
        "backend_unavailable",
    }
)
# Seconds: from a cached pass-through (~1 ms) to a search that runs into upstream.timeout_s (60 s).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def route_kind(method: str, path: str) -> str:
    """``search`` (``_search``, ``_search/template``), ``msearch`` (``_msearch``,
    ``_msearch/template``) or ``passthrough`` (everything else)."""
    endpoint = search_endpoint(method, path)
    if endpoint is None:
        return "passthrough"
    return "msearch" if endpoint in (MSEARCH, MSEARCH_TEMPLATE) else "search"


def reason_label(reason: str | None) -> str:
    if reason is None:
        return "none"
    return reason if reason in REASONS else "other"


def status_label(status: int | None) -> str:
    """``2xx``..``5xx``; ``cancelled`` when the client went away before an answer was made."""
    return "cancelled" if status is None else f"{status // 100}xx"


class Metrics:
    """One app's metrics. ``enabled`` false stops the per-request recording (benchmarks/overhead.py
    measures what it costs); the requests' records are still filled for the access log."""

    def __init__(
        self, scorers: Callable[[], Mapping[str, Any]], shadow: Callable[[], Any] | None = None
    ) -> None:
        """``scorers``: the loaded scorers by model name; ``shadow``: shadow mode's running counts
        (:class:`~proxy.stats.ShadowTracker`), both read at scrape time."""
        self.enabled = True
        self.registry = reg = CollectorRegistry()
        self.requests = Counter(
            PREFIX + "requests",
            "Client requests by route kind, rerank outcome (reranked, skipped, none), reason and "
            "status class; a multi-search is reranked when any sub-search was.",
            ["route", "outcome", "reason", "status"],
            registry=reg,
        )
        self.searches = Counter(
            PREFIX + "searches",
            "Searches by rerank outcome and reason, each sub-search of a multi-search counted.",
            ["outcome", "reason"],
            registry=reg,
        )
        self.request_seconds = self._histogram("request_duration_seconds", "Whole client requests.")
        self.upstream_seconds = self._histogram(
            "upstream_duration_seconds", "Time a request waited for Elasticsearch, summed over its calls."
        )
        self.scoring_seconds = self._histogram(
            "scoring_duration_seconds",
            "Time a request's searches spent in the model, queue wait included (requests that scored).",
        )
        self.upstream_errors = Counter(
            PREFIX + "upstream_errors",
            "Calls to Elasticsearch that failed, by kind: timeout, unavailable, http_5xx, http_429.",
            ["kind"],
            registry=reg,
        )
        self.in_flight = Gauge(
            PREFIX + "in_flight_requests", "Client requests being served now.", ["route"], registry=reg
        )
        for kind in UPSTREAM_ERRORS:  # zero from the start, so rate() sees the first error
            self.upstream_errors.labels(kind)
        for route in ROUTES:
            self.in_flight.labels(route)
        reg.register(ScorerCollector(scorers))
        if shadow is not None:
            reg.register(ShadowCollector(shadow))

    def _histogram(self, name: str, doc: str) -> Histogram:
        return Histogram(
            PREFIX + name, doc + " Seconds.", ["route"], registry=self.registry, buckets=LATENCY_BUCKETS
        )

    def observe(self, record: RequestRecord, status: int | None, seconds: float) -> None:
        """One finished request: ``status`` None when it was cancelled."""
        route = record.route
        self.requests.labels(
            route, record.outcome or "none", reason_label(record.reason), status_label(status)
        ).inc()
        self.request_seconds.labels(route).observe(seconds)
        if record.upstream_ms > 0:
            self.upstream_seconds.labels(route).observe(record.upstream_ms / 1000)
        if record.scoring_ms > 0:
            self.scoring_seconds.labels(route).observe(record.scoring_ms / 1000)
        for outcome, reason in record.searches:
            self.searches.labels(outcome, reason_label(reason)).inc()
        for kind in record.upstream_errors:
            self.upstream_errors.labels(kind).inc()


METRICS_KEY = web.AppKey("metrics", Metrics)


@web.middleware
async def record_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The request's record, current while it is served; the metrics once it is answered. Outermost,
    so it sees the status the error middleware renders."""
    record = record_of(request)
    record.route = route_kind(request.method, request.path)
    metrics = request.app[METRICS_KEY]
    if not metrics.enabled:
        with recording(record):
            return await handler(request)
    started = time.perf_counter()
    status: int | None = 500  # an exception the app does not render becomes aiohttp's 500
    gauge = metrics.in_flight.labels(record.route)
    gauge.inc()
    try:
        with recording(record):
            response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = None
        raise
    finally:
        gauge.dec()
        metrics.observe(record, status, time.perf_counter() - started)


class ScorerCollector(Collector):
    """Per loaded model, read at scrape time: its identity, its batching queue and its score cache.

    Reads attributes defensively: a local :class:`~proxy.scorer.EngineScorer` has ``model`` (kind,
    device, dtype), ``queue`` and maybe ``cache``; a remote backend or a test's fake may have none.
    """

    def __init__(self, scorers: Callable[[], Mapping[str, Any]]) -> None:
        self._scorers = scorers

    def collect(self) -> Iterable[Metric]:
        scorers = dict(self._scorers())
        info = GaugeMetricFamily(
            PREFIX + "model_info",
            "The loaded models, one series each (value 1): configured name, model, where it runs (local or "
            "a remote API), scorer kind, device, dtype.",
            labels=["model", "name", "backend", "kind", "device", "dtype"],
        )
        depth = GaugeMetricFamily(PREFIX + "queue_depth", "Items waiting for the model.", labels=["model"])
        counters = {
            key: CounterMetricFamily(PREFIX + key, doc, labels=labels)
            for key, doc, labels in (
                ("batches", "Forward passes run.", ["model"]),
                ("batch_items", "Items (pairs or passages) scored in forward passes.", ["model"]),
                (
                    "batch_tokens",
                    "Tokens in forward passes: real, or padded (items x longest).",
                    ["model", "kind"],
                ),
                ("forward_seconds", "Time spent in forward passes.", ["model"]),
                ("failed_batches", "Forward passes that raised.", ["model"]),
                ("shed_jobs", "Searches answered without scoring, by reason.", ["model", "reason"]),
                ("cancelled_items", "Queued items dropped because their search went away.", ["model"]),
                ("score_cache_lookups", "Score cache lookups by result (hit, miss).", ["model", "result"]),
            )
        }
        wait = HistogramMetricFamily(
            PREFIX + "queue_wait_seconds",
            "Time a search's items waited in the model's queue before the first entered a batch. Seconds.",
            labels=["model"],
        )
        for key, scorer in sorted(scorers.items()):
            model = getattr(scorer, "model", None)
            remote = getattr(getattr(scorer, "cfg", None), "backend", None)  # proxy.remote's scorer
            info.add_metric(
                [
                    key,
                    str(getattr(scorer, "name", key)),
                    "local" if model is not None else _text(remote or "unknown"),
                    _text(getattr(model, "kind", None) or getattr(scorer, "kind", None) or "unknown"),
                    _text(getattr(model, "device", None) or "none"),
                    _text(getattr(model, "compute_dtype", None) or getattr(model, "dtype", None) or "none"),
                ],
                1,
            )
            stats = getattr(getattr(scorer, "queue", None), "stats", None)
            if stats is not None:
                depth.add_metric([key], stats.queued)
                counters["batches"].add_metric([key], stats.batches)
                counters["batch_items"].add_metric([key], stats.items)
                counters["batch_tokens"].add_metric([key, "real"], stats.real_tokens)
                counters["batch_tokens"].add_metric([key, "padded"], stats.padded_tokens)
                counters["forward_seconds"].add_metric([key], stats.forward_seconds)
                counters["failed_batches"].add_metric([key], stats.failed_batches)
                for reason, count in (
                    ("overloaded", stats.rejected_jobs),
                    ("queue_wait", stats.refused_wait_jobs),
                    ("deadline", stats.dropped_late_jobs),
                ):
                    counters["shed_jobs"].add_metric([key, reason], count)
                counters["cancelled_items"].add_metric([key], stats.cancelled_items)
                wait.add_metric([key], _buckets(stats.wait_counts), stats.wait_seconds)
            cache = getattr(scorer, "cache", None)
            if cache is not None:
                counters["score_cache_lookups"].add_metric([key, "hit"], cache.hits)
                counters["score_cache_lookups"].add_metric([key, "miss"], cache.misses)
        yield info
        yield depth
        yield from counters.values()
        yield wait


class ShadowCollector(Collector):
    """Shadow mode's background comparisons by result: ``compared``, ``dropped`` (the queue was full,
    the model failed or Elasticsearch could not be asked) and ``unscorable`` (no hit had passage
    text). A dropped comparison never costs a search, so only this shows how many there are."""

    RESULTS = ("compared", "dropped", "unscorable")

    def __init__(self, tracker: Callable[[], Any]) -> None:
        self._tracker = tracker

    def collect(self) -> Iterable[Metric]:
        tracker = self._tracker()
        family = CounterMetricFamily(
            PREFIX + "shadow_comparisons",
            "Shadow mode's comparisons of the model's order with Elasticsearch's, by result.",
            labels=["result"],
        )
        for result in self.RESULTS:
            family.add_metric([result], getattr(tracker, result, 0))
        yield family


def _text(value: Any) -> str:
    """A label value from a string or a torch dtype (``torch.float32`` -> ``float32``)."""
    return str(value).removeprefix("torch.")


def _buckets(counts: list[int]) -> list[tuple[str, float]]:
    """QueueStats' per-bucket counts as Prometheus' cumulative ``le`` buckets, ``+Inf`` last."""
    out, total = [], 0
    for bound, count in zip([*map(str, WAIT_BUCKETS_S), "+Inf"], counts, strict=True):
        total += count
        out.append((bound, float(total)))
    return out
