"""The one search pipeline: plan, widen, ask upstream, score, restore, cut.

A ``_search`` request goes through :meth:`SearchPipeline.search`; the reranking of one parsed answer
(:meth:`SearchPipeline.rerank`) is the step every other kind of search reuses, the way
Elasticsearch's multi-search hands each item to its search action.

Faithfulness rules, each one a promise of the README:

- a body Elasticsearch would refuse (not JSON, a repeated key, a compatible-with mismatch) is never
  rewritten: it goes up as the client sent it, so the client gets Elasticsearch's own error;
- when Elasticsearch rejects the *widened* request (4xx other than 429) or answers it unreadably, the
  client's original request is sent instead and that answer relayed, byte for byte
  (``upstream_rejected_rewrite``, ``unreadable_response``);
- a scorer failure, timeout, overload or non-finite score answers in Elasticsearch's order.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from . import es_json
from .batching import QueueFull
from .config import Config
from .errors import RerankFailed
from .relay import buffered, relay, request_headers, upstream_target, without_params
from .scorer import Scorer
from .search_plan import OVERRIDE_HEADERS, OVERRIDE_KEY, Passthrough, RerankPlan, parse_overrides, plan_search
from .search_response import apply_order, candidates, reranked_ids
from .stats import ProxyStats
from .upstream import Upstream, forwardable

log = logging.getLogger("proxy")

STATUS_HEADER = "X-Rerank-Status"  # "reranked" or "skipped"
REASON_HEADER = "X-Rerank-Reason"  # why it was skipped
TOOK_HEADER = "X-Rerank-Took-Ms"  # scoring time of a reranked search
_JSON_TYPES = ("application/json", "application/vnd.elasticsearch+json", "application/x-ndjson")


@dataclass(frozen=True)
class Outcome:
    """What happened to one search: ``reranked``, or ``skipped`` with a reason."""

    status: str
    reason: str | None = None
    took_ms: float | None = None

    def headers(self) -> dict[str, str]:
        out = {STATUS_HEADER: self.status}
        if self.reason is not None:
            out[REASON_HEADER] = self.reason
        if self.took_ms is not None:
            out[TOOK_HEADER] = f"{self.took_ms:.1f}"
        return out


def skipped(reason: str) -> Outcome:
    return Outcome("skipped", reason)


def wants_pretty(params: Any) -> bool:
    """Elasticsearch pretty-prints for ``?pretty`` and ``?pretty=true`` (other values are its error)."""
    return "pretty" in params and params.get("pretty") in ("", "true")


def _wants_json(request: web.Request) -> bool:
    fmt = request.query.get("format")
    if fmt is not None and fmt.lower() != "json":
        return False
    accept = request.headers.get("Accept", "")
    return not accept or "*/*" in accept or any(t in accept for t in _JSON_TYPES)


def _upstream_search_headers(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """Headers for the widened search: the client's own, less ``Accept-Encoding`` (the proxy must read
    the answer). ``Content-Type`` is the client's, never repaired: a pair Elasticsearch refuses is
    refused for the rewrite too, and then the original goes up. A search sent without a body (``q=``)
    gets the media type its ``Accept`` names."""
    out = forwardable(headers, drop=("Accept-Encoding",))
    if "Content-Type" not in out:
        accept = headers.get("Accept", "")
        out["Content-Type"] = accept if "compatible-with" in accept else "application/json"
    return out


class SearchPipeline:
    """One per app: the upstream, the scorer and the counters every search shares."""

    def __init__(self, cfg: Config, upstream: Upstream, scorer: Scorer | None, stats: ProxyStats) -> None:
        self.cfg = cfg
        self.upstream = upstream
        self.scorer = scorer
        self.stats = stats

    async def search(self, request: web.Request, raw: bytes) -> web.StreamResponse:
        """A ``_search`` request, answered reranked or exactly as Elasticsearch answers it."""
        headers = request_headers(request, drop=OVERRIDE_HEADERS)
        ctype = request.headers.get("Content-Type", "")
        if not _wants_json(request) or (raw and ctype and not any(t in ctype for t in _JSON_TYPES)):
            return await self._relay(request, raw or None, headers, skipped("unsupported_format"))
        try:
            parsed = es_json.parse_body(raw) if raw.strip() else {}
        except (orjson.JSONDecodeError, es_json.DuplicateKey):
            parsed = None
        if not isinstance(parsed, dict):  # let Elasticsearch answer with its own parse error
            return await self._relay(request, raw or None, headers, skipped("invalid_body"))

        overrides = parse_overrides(request.headers, parsed)
        if OVERRIDE_KEY in parsed:  # the reserved key never reaches Elasticsearch, whatever its value
            del parsed[OVERRIDE_KEY]
            raw = orjson.dumps(parsed)
        plan = plan_search(list(request.query.items()), parsed, self.cfg.rerank, overrides)
        if isinstance(plan, Passthrough):
            return await self._relay(request, raw or None, headers, skipped(plan.reason))

        resp = await self.upstream.request(
            request.method,
            without_params(upstream_target(request), plan.dropped_params),
            _upstream_search_headers(headers),
            orjson.dumps(plan.body),
        )
        if 400 <= resp.status < 500 and resp.status != 429:
            # Elasticsearch refused the widened request (a result window limit, a bad option): the
            # client's own request gets Elasticsearch's own answer, error positions included.
            return await self._relay(request, raw or None, headers, skipped("upstream_rejected_rewrite"))
        if resp.status != 200:
            outcome = skipped("upstream_status")
            self.stats.outcome(outcome.status, outcome.reason)
            return buffered(resp, outcome.headers())
        try:
            data = orjson.loads(resp.body)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):  # e.g. an intermediary compressed it: ask again, relay that
            return await self._relay(request, raw or None, headers, skipped("unreadable_response"))

        outcome = await self.rerank(plan, data)
        out = forwardable(resp.headers, drop=("Content-Encoding",))
        out.update(outcome.headers())
        body = es_json.dumps(data, pretty=wants_pretty(request.query))
        return web.Response(status=200, body=body, headers=out)

    async def _relay(
        self, request: web.Request, body: bytes | None, headers: CIMultiDict[str], outcome: Outcome
    ) -> web.StreamResponse:
        self.stats.outcome(outcome.status, outcome.reason)
        return await relay(self.upstream, request, body, headers, outcome.headers())

    async def rerank(self, plan: RerankPlan, data: dict[str, Any]) -> Outcome:
        """Score Elasticsearch's widened answer ``data`` and cut it to the client's window, in place.

        Hits without passage text are not scored (an empty passage would get a meaningless score):
        when no candidate has text the search is ``no_passage_text``, in Elasticsearch's order.
        """
        texts = candidates(data, plan)
        present = [i for i, text in enumerate(texts) if text]
        started = time.perf_counter()
        outcome: Outcome
        scores: list[float | None] | None = None
        if texts and not present:
            outcome = skipped("no_passage_text")
        else:
            try:
                found = await self._score(plan.query, [texts[i] for i in present])
                scores = [None] * len(texts)
                for i, score in zip(present, found, strict=True):
                    scores[i] = score
                outcome = Outcome("reranked")
            except RerankFailed as exc:
                log.warning("reranking skipped (%s): %s", exc.reason, exc)
                outcome = skipped(exc.reason)
        outcome = Outcome(outcome.status, outcome.reason, (time.perf_counter() - started) * 1000)
        if scores is not None and plan.relevant is not None:
            self._track_relevance(plan.relevant, data, plan, scores)
        apply_order(data, plan, scores)
        self.stats.outcome(outcome.status, outcome.reason)
        return outcome

    async def _score(self, query: str, texts: list[str]) -> list[float]:
        """Scores for the passages; any failure becomes :class:`RerankFailed` so the search survives."""
        if not texts:
            return []
        if self.scorer is None:
            raise RerankFailed("rerank_error", "no scorer is loaded")
        timeout_ms = self.cfg.rerank.timeout_ms
        try:
            scores = await asyncio.wait_for(self.scorer.score(query, texts), timeout_ms / 1000)
        except TimeoutError as exc:
            raise RerankFailed("rerank_timeout", f"scoring took over {timeout_ms} ms") from exc
        except QueueFull as exc:
            raise RerankFailed("overloaded", str(exc)) from exc
        except Exception as exc:  # the model is third-party code: any failure falls back to ES order
            raise RerankFailed("rerank_error", f"{type(exc).__name__}: {exc}") from exc
        if len(scores) != len(texts):
            detail = f"scorer returned {len(scores)} scores for {len(texts)} passages"
            raise RerankFailed("rerank_error", detail)
        if not all(math.isfinite(s) for s in scores):
            # fp16 overflow or a broken model: such scores order hits arbitrarily
            raise RerankFailed("rerank_error", "the model returned a NaN or infinite score")
        return scores

    def _track_relevance(
        self, qrels: dict[str, int], data: dict[str, Any], plan: RerankPlan, scores: list[float | None]
    ) -> None:
        original, reranked = reranked_ids(data, plan, scores)
        try:
            figures = self.stats.relevance.record(qrels, original, reranked)
        except ValueError as exc:  # e.g. one _id from two indices: the ranking is not a ranking of ids
            log.info("relevance not tracked for this search: %s", exc)
            return
        log.debug("judged search: %s", figures)
