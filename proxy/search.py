"""The one search pipeline: plan, widen, ask upstream, score, restore, cut, filter.

``_search``, a rendered ``_search/template``, and every sub-search of ``_msearch`` and
``_msearch/template`` are the same search: :meth:`SearchPipeline.finish` is the step each one goes
through once Elasticsearch has answered its widened request, the way Elasticsearch's multi-search
hands each item to its search action. The endpoints differ only in how the request is read, how many
searches go up in one call, and what is relayed when the rewrite is refused.

Faithfulness rules, each one a promise of the README:

- a request Elasticsearch would refuse (not JSON, a repeated key, a malformed multi-search, an invalid
  option) is never rewritten: it goes up as the client sent it and the client gets Elasticsearch's
  own error;
- when Elasticsearch rejects a *widened* search (4xx other than 429) or answers it unreadably, the
  client's own request is sent instead and that answer relayed (``upstream_rejected_rewrite``,
  ``unreadable_response``); in a multi-search only the refused sub-searches go up again;
- a scorer failure, timeout, overload or non-finite score answers in Elasticsearch's order;
- a rewritten answer is gzip-compressed exactly when Elasticsearch compressed its own answer.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from . import es_json, request_record
from .batching import Shed
from .config import Config
from .errors import ProxyError, RerankFailed
from .filter_path import apply_filter_path
from .fusion import fuse
from .ndjson import parse_pairs, write_pairs
from .outcome import (
    VARIANT_HEADER,
    Outcome,
    multi_headers,
    skipped,
)
from .relay import relay, request_headers, upstream_target, without_params
from .rules import item_indices, path_indices
from .scorer import Scorer
from .search_plan import (
    MSEARCH,
    MSEARCH_TEMPLATE,
    OVERRIDE_HEADERS,
    OVERRIDE_KEY,
    SEARCH,
    Passthrough,
    RerankPlan,
    parse_overrides,
    plan_request,
)
from .search_response import apply_order, candidates, reranked_ids
from .shadow import ShadowComparisons, in_sample
from .source_semantics import Engine
from .stats import ProxyStats
from .templates import TEMPLATE_FLAGS, json_headers, render, template_flags, without_template
from .upstream import Upstream, UpstreamResponse, forwardable

log = logging.getLogger("proxy")

_VARIANT = web.RequestKey("rerank_variant", str)  # the request's A/B variant, for every answer it gets
_JSON_TYPES = ("application/json", "application/vnd.elasticsearch+json", "application/x-ndjson")
_NDJSON_TYPES = ("application/x-ndjson", "application/vnd.elasticsearch+x-ndjson", "application/json")
GZIP_LEVEL = 3  # Elasticsearch's http.compression_level default


def wants_pretty(params: Any) -> bool:
    """Elasticsearch pretty-prints for ``?pretty`` and ``?pretty=true`` (other values are its error)."""
    return "pretty" in params and params.get("pretty") in ("", "true")


def refused(status: int) -> bool:
    """Elasticsearch refused the request itself; 429 is load, and asking again would add to it."""
    return 400 <= status < 500 and status != 429


@dataclass
class Answer:
    """Elasticsearch's answer to a rewritten request, decompressed when it came gzip-compressed."""

    response: UpstreamResponse
    body: bytes | None  # None when it cannot be decoded
    compressed: bool

    @property
    def status(self) -> int:
        return self.response.status

    def json(self) -> Any:
        if self.body is None:
            return None
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None


@dataclass(frozen=True)
class Item:
    """One search of a request: its plan, and the client's body (less ``_rerank``) for relaying."""

    plan: RerankPlan | Passthrough
    body: dict[str, Any]

    @property
    def upstream_body(self) -> dict[str, Any]:
        return self.plan.body if isinstance(self.plan, RerankPlan) else self.body


def _client_body(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The body without the reserved key, which never reaches Elasticsearch whatever its value."""
    if OVERRIDE_KEY not in body:
        return body, False
    return {k: v for k, v in body.items() if k != OVERRIDE_KEY}, True


def _search_headers(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """Headers for a widened search: the client's own. ``Content-Type`` is never repaired (a pair
    Elasticsearch refuses is refused for the rewrite too, and then the original goes up); a search
    sent without a body (``q=``) gets the media type its ``Accept`` names."""
    out = forwardable(headers)
    if "Content-Type" not in out:
        out["Content-Type"] = json_headers(headers)["Content-Type"]
    return out


class SearchPipeline:
    """One per app: the upstream, the scorers (by model name) and the counters every search shares."""

    def __init__(
        self, cfg: Config, upstream: Upstream, scorers: Mapping[str, Scorer], stats: ProxyStats
    ) -> None:
        self.cfg = cfg
        self.upstream = upstream
        self.scorers = scorers
        self.stats = stats
        self.engine: Engine | None = None  # learnt from the first answer, see _engine
        self.comparisons = ShadowComparisons(self._score, self._fetch, stats)

    async def aclose(self) -> None:
        """Stop shadow comparisons still under way (before the scorers close under them)."""
        await self.comparisons.aclose()

    def _sampled(self, request: web.Request) -> bool:
        """The A/B split (``rerank.sample_rate``): False puts the request in the control group,
        answered as a pass-through; the variant goes back in :data:`VARIANT_HEADER`."""
        rate = self.cfg.rerank.sample_rate
        if rate >= 1.0:
            return True
        header = self.cfg.rerank.sample_key_header
        chosen = in_sample(request.headers.get(header) if header else None, rate)
        request[_VARIANT] = "rerank" if chosen else "control"
        return chosen

    async def _engine(self, headers: CIMultiDict[str]) -> Engine:
        """Whose ``_source`` filtering rules apply upstream. Elasticsearch names itself in
        ``X-Elastic-Product`` on every answer, errors included (the integ-test zip's 405 to ``GET /``
        too); OpenSearch never does. Asked once, with the client's credentials."""
        if self.engine is None:
            probe = forwardable(headers, drop=("Content-Type", "Accept-Encoding"))
            try:
                resp = await self.upstream.request("GET", "/", probe, None)
            except ProxyError:
                return "elasticsearch"  # not cached: the next search asks again
            product = resp.headers.get("X-Elastic-Product", "")
            self.engine = "elasticsearch" if product == "Elasticsearch" else "opensearch"
        return self.engine

    async def handle(self, request: web.Request, raw: bytes, endpoint: str) -> web.StreamResponse:
        """A request to one of the search APIs, answered reranked or exactly as Elasticsearch answers."""
        headers = request_headers(request, drop=OVERRIDE_HEADERS)
        multi = endpoint in (MSEARCH, MSEARCH_TEMPLATE)
        if not self._readable(request, raw, _NDJSON_TYPES if multi else _JSON_TYPES):
            return await self._relay(request, raw, headers, [skipped("unsupported_format")])
        if multi:
            return await self._multi(request, raw, headers, template=endpoint == MSEARCH_TEMPLATE)
        return await self._single(request, raw, headers, template=endpoint != SEARCH)

    @staticmethod
    def _readable(request: web.Request, raw: bytes, types: tuple[str, ...]) -> bool:
        fmt = request.query.get("format")
        if fmt is not None and fmt.lower() != "json":
            return False
        accept = request.headers.get("Accept", "")
        if accept and "*/*" not in accept and not any(t in accept for t in _JSON_TYPES):
            return False
        ctype = request.headers.get("Content-Type", "")
        return not (raw and ctype and not any(t in ctype for t in types))

    # -- one search: _search and _search/template ----------------------------------------------------

    async def _single(
        self, request: web.Request, raw: bytes, headers: CIMultiDict[str], template: bool
    ) -> web.StreamResponse:
        try:
            parsed = es_json.parse_body(raw) if raw.strip() else {}
        except (orjson.JSONDecodeError, es_json.DuplicateKey):
            parsed = None
        if not isinstance(parsed, dict):  # let Elasticsearch answer with its own parse error
            return await self._relay(request, raw, headers, [skipped("invalid_body")])
        overrides = parse_overrides(request.headers, parsed)
        body, changed = _client_body(parsed)
        original = orjson.dumps(body) if changed else raw
        if not self._sampled(request):
            return await self._relay(request, original, headers, [skipped("not_sampled")])
        target = upstream_target(request)
        if template:
            flags = template_flags(request.query)
            if flags is None:
                return await self._relay(request, original, headers, [skipped("template_parameters")])
            rendered = await render(self.upstream, headers, body)
            if rendered is None:  # no template engine, a missing template...: Elasticsearch's answer
                return await self._relay(request, original, headers, [skipped("template_not_rendered")])
            body = {**rendered, **flags}
            target = without_params(without_template(target), frozenset(TEMPLATE_FLAGS))

        engine = await self._engine(headers)
        indices = path_indices(request.rel_url.raw_path)
        plan = plan_request(list(request.query.items()), body, self.cfg, overrides, engine, indices)
        if isinstance(plan, Passthrough):
            return await self._relay(request, original, headers, [skipped(plan.reason)])
        if self.cfg.rerank.mode == "shadow":
            return await self._shadow(request, original, headers, [plan], target)
        answer = await self._ask(
            request.method, without_params(target, plan.dropped_params), headers, orjson.dumps(plan.body)
        )
        if refused(answer.status):
            # Elasticsearch refused the widened request (a result window limit, say): the client's own
            # request gets Elasticsearch's own answer, error positions included.
            return await self._relay(request, original, headers, [skipped("upstream_rejected_rewrite")])
        if answer.status != 200:
            return self._error(request, answer, plan.filter_path)
        data = answer.json()
        if not isinstance(data, dict):  # an intermediary's encoding, a truncated body...: ask again
            return await self._relay(request, original, headers, [skipped("unreadable_response")])
        outcome = await self.finish(plan, data)
        if plan.filter_path is not None:
            data = apply_filter_path(data, plan.filter_path)
        return self._respond(request, answer, data, outcome.headers())

    # -- many searches: _msearch and _msearch/template ----------------------------------------------

    async def _multi(
        self, request: web.Request, raw: bytes, headers: CIMultiDict[str], template: bool
    ) -> web.StreamResponse:
        pairs = parse_pairs(raw)
        if pairs is None:
            return await self._relay(request, raw, headers, [skipped("invalid_body")])
        overrides = [parse_overrides(request.headers, pair.body) for pair in pairs]
        stripped = [_client_body(pair.body) for pair in pairs]
        bodies = [body for body, _ in stripped]
        original = write_pairs((p.header_line, b) for p, b in zip(pairs, bodies, strict=True))
        original = original if any(changed for _, changed in stripped) else raw
        if not self._sampled(request):
            return await self._relay(
                request, original, headers, [skipped("not_sampled")] * len(pairs), multi=True
            )
        target = upstream_target(request)
        if template:
            rendered = await asyncio.gather(*(render(self.upstream, headers, body) for body in bodies))
            if any(r is None for r in rendered):
                return await self._relay(
                    request, original, headers, [skipped("template_not_rendered")] * len(pairs), multi=True
                )
            bodies, target = [r for r in rendered if r is not None], without_template(target)

        engine = await self._engine(headers)
        url_indices = path_indices(request.rel_url.raw_path)
        items = [
            Item(plan_request([], body, self.cfg, over, engine, item_indices(p.header, url_indices)), body)
            for p, body, over in zip(pairs, bodies, overrides, strict=True)
        ]
        if self.cfg.rerank.mode == "shadow" and any(isinstance(item.plan, RerankPlan) for item in items):
            lines = [pair.header_line for pair in pairs]
            return await self._shadow(
                request, original, headers, [item.plan for item in items], target, lines
            )
        if not any(isinstance(item.plan, RerankPlan) for item in items):
            reasons = [skipped(item.plan.reason) for item in items if isinstance(item.plan, Passthrough)]
            return await self._relay(request, original, headers, reasons, multi=True)
        target = without_params(target, frozenset({"filter_path"}))
        widened = write_pairs(
            (p.header_line, item.upstream_body) for p, item in zip(pairs, items, strict=True)
        )
        answer = await self._ask(request.method, target, headers, widened)
        if refused(answer.status):
            return await self._relay(
                request, original, headers, [skipped("upstream_rejected_rewrite")] * len(items), multi=True
            )
        filter_path = request.query.get("filter_path")
        if answer.status != 200:
            return self._error(request, answer, filter_path, items=len(items))
        data = answer.json()
        responses = data.get("responses") if isinstance(data, dict) else None
        if not isinstance(responses, list) or len(responses) != len(items):
            return await self._relay(
                request, original, headers, [skipped("unreadable_response")] * len(items), multi=True
            )

        # Sub-searches whose widened form Elasticsearch refused go up again as the client sent them.
        again = [
            i
            for i, item in enumerate(items)
            if isinstance(item.plan, RerankPlan) and _item_refused(responses[i])
        ]
        if again:
            retry = await self._ask(
                request.method,
                target,
                headers,
                write_pairs((pairs[i].header_line, items[i].body) for i in again),
            )
            redone = retry.json() if retry.status == 200 else None
            redone_items = redone.get("responses") if isinstance(redone, dict) else None
            if not isinstance(redone_items, list) or len(redone_items) != len(again):
                return await self._relay(
                    request,
                    original,
                    headers,
                    [skipped("upstream_rejected_rewrite")] * len(items),
                    multi=True,
                )
            for i, item_answer in zip(again, redone_items, strict=True):
                responses[i] = item_answer

        started = time.perf_counter()
        outcomes = await asyncio.gather(
            *(self._finish_item(item, responses[i], i in again) for i, item in enumerate(items))
        )
        took = (time.perf_counter() - started) * 1000
        if filter_path is not None:
            data = apply_filter_path(data, filter_path)
        return self._respond(request, answer, data, multi_headers(list(outcomes), took))

    async def _finish_item(self, item: Item, response: Any, asked_again: bool) -> Outcome:
        if isinstance(item.plan, Passthrough):
            return self._count(skipped(item.plan.reason))
        if asked_again:
            return self._count(skipped("upstream_rejected_rewrite"))
        if not isinstance(response, dict) or response.get("status", 200) != 200 or "hits" not in response:
            return self._count(skipped("upstream_status"))
        return await self.finish(item.plan, response)

    # -- the shared steps ------------------------------------------------------------------------------

    async def finish(self, plan: RerankPlan, data: dict[str, Any]) -> Outcome:
        """Score Elasticsearch's widened answer ``data``, restore ``_source`` and cut it to the client's
        window, in place.

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
                found = await self._score(plan, [texts[i] for i in present])
                model: list[float | None] = [None] * len(texts)
                for i, score in zip(present, found, strict=True):
                    model[i] = score
                head = data["hits"]["hits"][: len(texts)]
                es = [h.get("_score") if isinstance(h.get("_score"), (int, float)) else None for h in head]
                scores = fuse(es, model, plan.fusion)
                outcome = Outcome("reranked")
            except RerankFailed as exc:
                log.warning("reranking skipped (%s): %s", exc.reason, exc)
                outcome = skipped(exc.reason)
        outcome = Outcome(outcome.status, outcome.reason, (time.perf_counter() - started) * 1000)
        if present:  # the scorer was called
            request_record.note_scoring(outcome.took_ms or 0.0)
        if scores is not None and plan.relevant is not None:
            self._track_relevance(plan.relevant, data, plan, scores)
        apply_order(data, plan, scores)
        return self._count(outcome)

    def _count(self, outcome: Outcome) -> Outcome:
        """The one place each (sub-)search's outcome is counted: the stats and the request's record."""
        self.stats.outcome(outcome.status, outcome.reason)
        request_record.note_search(outcome.status, outcome.reason)
        return outcome

    async def _ask(self, method: str, target: str, headers: CIMultiDict[str], body: bytes) -> Answer:
        """Send a rewritten request with the client's own headers, ``Accept-Encoding`` included, so
        Elasticsearch compresses exactly when it would have for this client; decode what it sends."""
        resp = await self.upstream.request(method, target, _search_headers(headers), body)
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding == "identity":
            return Answer(resp, resp.body, compressed=False)
        if encoding == "gzip":
            try:
                return Answer(resp, gzip.decompress(resp.body), compressed=True)
            except (OSError, EOFError):
                pass
        return Answer(resp, None, compressed=False)

    def _respond(
        self, request: web.Request, answer: Answer, data: Any, extra: dict[str, str], status: int = 200
    ) -> web.Response:
        out = forwardable(answer.response.headers, drop=("Content-Encoding",))
        out.update(_with_variant(request, extra))
        body = es_json.dumps(data, pretty=wants_pretty(request.query))
        if answer.compressed:
            body = gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)
            out["Content-Encoding"] = "gzip"
        return web.Response(status=status, body=body, headers=out)

    def _error(
        self, request: web.Request, answer: Answer, filter_path: str | None, items: int | None = None
    ) -> web.Response:
        """Elasticsearch's error (5xx, 429) to the widened request, as it came, filtered if asked.
        ``items``: the sub-searches of a multi-search it answers."""
        outcomes = [self._count(skipped("upstream_status")) for _ in range(items or 1)]
        extra = outcomes[0].headers() if items is None else multi_headers(outcomes)
        data = answer.json() if filter_path is not None else None
        if isinstance(data, dict) and filter_path is not None:
            return self._respond(request, answer, apply_filter_path(data, filter_path), extra, answer.status)
        out = forwardable(answer.response.headers)
        out.update(_with_variant(request, extra))
        return web.Response(status=answer.status, body=answer.response.body, headers=out)

    async def _relay(
        self,
        request: web.Request,
        body: bytes,
        headers: CIMultiDict[str],
        outcomes: list[Outcome],
        multi: bool = False,
    ) -> web.StreamResponse:
        """The client's request as it is (``_rerank`` aside), Elasticsearch's answer streamed back."""
        for outcome in outcomes:
            self._count(outcome)
        extra = _with_variant(request, multi_headers(outcomes) if multi else outcomes[0].headers())
        return await relay(self.upstream, request, body or None, headers, extra)

    # -- shadow mode ---------------------------------------------------------------------------------

    async def _shadow(
        self,
        request: web.Request,
        original: bytes,
        headers: CIMultiDict[str],
        plans: list[RerankPlan | Passthrough],
        target: str,
        header_lines: list[bytes] | None = None,
    ) -> web.StreamResponse:
        """Elasticsearch's own answer to the client's own request, at once and unchanged. Afterwards,
        in the background, what serving would have reranked (the widened top_k) is fetched and scored
        through the same queue (a full queue drops the comparison, never the search), and the model's
        order compared with Elasticsearch's. ``header_lines``: a multi-search's, one per plan."""
        outcomes = [self._count(skipped("shadow" if isinstance(p, RerankPlan) else p.reason)) for p in plans]
        multi = header_lines is not None
        extra = _with_variant(request, multi_headers(outcomes) if multi else outcomes[0].headers())
        response = await relay(self.upstream, request, original or None, headers, extra)
        if response.status == 200:
            self.comparisons.start(request.method, target, headers, plans, header_lines)
        return response

    async def _fetch(self, method: str, target: str, headers: CIMultiDict[str], body: bytes) -> Any:
        """Elasticsearch's parsed answer to a widened search; None unless it is a readable 200."""
        answer = await self._ask(method, target, headers, body)
        return answer.json() if answer.status == 200 else None

    async def _score(self, plan: RerankPlan, texts: list[str]) -> list[float]:
        """The plan's model's scores for the passages; any failure becomes :class:`RerankFailed` so the
        search survives."""
        if not texts:
            return []
        scorer = self.scorers.get(plan.model)
        if scorer is None:
            raise RerankFailed("rerank_error", f"no scorer is loaded for model {plan.model!r}")
        timeout_ms = self.cfg.rerank.timeout_ms
        try:
            scores = await asyncio.wait_for(scorer.score(plan.query, texts), timeout_ms / 1000)
        except TimeoutError as exc:
            raise RerankFailed("rerank_timeout", f"scoring took over {timeout_ms} ms") from exc
        except Shed as exc:  # answered without scoring: overloaded, queue_wait or deadline
            raise RerankFailed(exc.reason, str(exc)) from exc
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


def _with_variant(request: web.Request, extra: dict[str, str]) -> dict[str, str]:
    variant = request.get(_VARIANT)
    return {**extra, VARIANT_HEADER: variant} if variant is not None else extra


def _item_refused(response: Any) -> bool:
    status = response.get("status") if isinstance(response, dict) else None
    return isinstance(status, int) and refused(status)
