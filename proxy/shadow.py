"""Shadow mode and the A/B split: trying a model on live traffic without serving it to everyone.

In shadow mode the client gets Elasticsearch's own answer and the model's order of the
same hits is only compared with it: how many of Elasticsearch's top 10 the model keeps in its top 10,
Kendall's tau between the two orders, and where Elasticsearch's top hit lands in the model's order.
The A/B split picks, per search or sticky per key, whether a search is reranked at all. The
comparison functions and the draw are pure; :class:`ShadowComparisons` runs a comparison once the
client has its answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from multidict import CIMultiDict

from .errors import ProxyError, RerankFailed
from .ndjson import write_pairs
from .relay import without_params
from .search_plan import Passthrough, RerankPlan
from .search_response import passage_text

if TYPE_CHECKING:
    from .stats import ProxyStats

log = logging.getLogger("proxy")

K = 10


@dataclass(frozen=True)
class OrderDiff:
    """How the model would have reordered one search's hits."""

    overlap_at_10: float  # share of Elasticsearch's top 10 that the model's top 10 keeps
    kendall_tau: float  # 1: same order, -1: reversed, 0: unrelated (ties count for neither side)
    es_top_hit_rank: int  # 1-based position of Elasticsearch's first hit in the model's order


def model_order(scores: Sequence[float]) -> list[int]:
    """Positions (Elasticsearch's ranks, from 0) in the model's order; ties keep Elasticsearch's."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def order_diff(scores: Sequence[float]) -> OrderDiff:
    """Compare Elasticsearch's order (the order of ``scores``) with the model's (by ``scores``)."""
    n = len(scores)
    if n == 0:
        raise ValueError("no hits to compare")
    order = model_order(scores)
    top = min(K, n)
    overlap = len(set(order[:top]) & set(range(top))) / top
    pairs = n * (n - 1) // 2
    balance = 0
    for i in range(n):
        for j in range(i + 1, n):  # Elasticsearch ranks i above j
            balance += (scores[i] > scores[j]) - (scores[i] < scores[j])
    tau = balance / pairs if pairs else 1.0
    return OrderDiff(overlap, tau, order.index(0) + 1)


def in_sample(key: str | None, rate: float) -> bool:
    """Whether a search is reranked under ``rerank.sample_rate``: a stable hash of ``key`` when there
    is one (the same user always lands on the same side), else a fresh draw."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    if key is None:
        return random.random() < rate
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < rate


# Sends a widened search (method, target, headers, body) and gives Elasticsearch's parsed answer, None
# unless a readable 200; raises ProxyError when the cluster cannot be reached.
Fetch = Callable[[str, str, CIMultiDict[str], bytes], Awaitable[Any]]


class ShadowComparisons:
    """Fetches, after the client has its answer, the head serving would rerank and scores it through
    the same scorers and queues as served searches (``score`` raises :class:`RerankFailed` when a queue
    is full or a model fails: the comparison is dropped), and records how the model's order differs."""

    def __init__(
        self,
        score: Callable[[RerankPlan, list[str]], Awaitable[list[float]]],
        fetch: Fetch,
        stats: ProxyStats,
    ) -> None:
        self._score = score
        self._fetch = fetch
        self._stats = stats
        self._background: set[asyncio.Task[None]] = set()  # comparisons under way

    def start(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        plans: Sequence[RerankPlan | Passthrough],
        header_lines: Sequence[bytes] | None = None,
    ) -> None:
        """Compare, in the background, the plans that would have been reranked: their widened searches
        go up in one request to ``target`` (the client's URL), as one ``_msearch`` when
        ``header_lines`` (one per plan) are given."""
        chosen = [(i, p) for i, p in enumerate(plans) if isinstance(p, RerankPlan)]
        if not chosen:
            return
        if header_lines is not None:
            body = write_pairs((header_lines[i], p.body) for i, p in chosen)
            widened = without_params(target, frozenset({"filter_path"}))
        else:
            body = orjson.dumps(chosen[0][1].body)
            widened = without_params(target, chosen[0][1].dropped_params)
        multi = header_lines is not None
        fetched = self._fetched(method, widened, headers, body, [p for _, p in chosen], multi)
        task = asyncio.create_task(fetched)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        """Stop the comparisons still under way (before the scorers close under them)."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _fetched(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes,
        plans: list[RerankPlan],
        multi: bool,
    ) -> None:
        try:
            data = await self._fetch(method, target, headers, body)
        except ProxyError as exc:
            log.info("shadow comparison dropped: %s", exc.reason)
            self._stats.shadow.dropped += len(plans)
            return
        answers = (data.get("responses") if isinstance(data, dict) else None) if multi else [data]
        await self.compare(plans, answers)

    async def compare(self, plans: list[RerankPlan], answers: Any) -> None:
        """``answers``: Elasticsearch's answers to the plans' widened searches, one per plan."""
        if not isinstance(answers, list) or len(answers) != len(plans):
            self._stats.shadow.unscorable += len(plans)
            return
        await asyncio.gather(*(self._compare_one(p, a) for p, a in zip(plans, answers, strict=True)))

    async def _compare_one(self, plan: RerankPlan, answer: Any) -> None:
        hits = answer.get("hits", {}).get("hits") if isinstance(answer, dict) else None
        readable = [h for h in hits or [] if isinstance(h, dict) and passage_text(h, plan.fields)][
            : plan.top_k
        ]
        if not readable:
            self._stats.shadow.unscorable += 1
            return
        try:
            scores = await self._score(plan, [passage_text(h, plan.fields) for h in readable])
        except RerankFailed as exc:
            log.info("shadow comparison dropped (%s): %s", exc.reason, exc)
            self._stats.shadow.dropped += 1
            return
        self._stats.shadow.record(order_diff(scores))
        if plan.relevant is not None:
            ids = [str(h.get("_id")) for h in readable]
            try:
                self._stats.relevance.record(plan.relevant, ids, [ids[i] for i in model_order(scores)])
            except ValueError as exc:
                log.info("relevance not tracked for this search: %s", exc)
