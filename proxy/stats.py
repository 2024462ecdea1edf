"""What the proxy counts, served as JSON at ``GET /_rerank/stats``.

Counters of searches by outcome, the batching queue's figures, and online relevance: a search may
carry judgements (``"_rerank": {"relevant": [...]}``); the proxy then scores the order Elasticsearch
gave and the order it served with MRR@10 and nDCG@10 (:mod:`proxy.relevance`, trec_eval's
conventions), so an operator sees on live traffic whether reranking helps, as NBoost users did.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .relevance import mrr_at_k, ndcg_at_k

K = 10


@dataclass
class RelevanceTracker:
    judged: int = 0
    sums: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("original_mrr@10", "original_ndcg@10", "reranked_mrr@10", "reranked_ndcg@10"), 0.0
        )
    )

    def record(
        self, qrels: Mapping[str, int], original: Sequence[str], reranked: Sequence[str]
    ) -> dict[str, float]:
        """Add one judged search; returns its own figures. Raises ValueError on duplicate ids."""
        figures = {
            "original_mrr@10": mrr_at_k(original, qrels, K),
            "original_ndcg@10": ndcg_at_k(original, qrels, K),
            "reranked_mrr@10": mrr_at_k(reranked, qrels, K),
            "reranked_ndcg@10": ndcg_at_k(reranked, qrels, K),
        }
        self.judged += 1
        for key, value in figures.items():
            self.sums[key] += value
        return figures

    def snapshot(self) -> dict[str, Any]:
        means = {k: (v / self.judged if self.judged else None) for k, v in self.sums.items()}
        return {"judged_searches": self.judged, **means}


@dataclass
class ProxyStats:
    reranked: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    relevance: RelevanceTracker = field(default_factory=RelevanceTracker)

    def outcome(self, status: str, reason: str | None) -> None:
        if status == "reranked":
            self.reranked += 1
        else:
            self.skipped[reason or "unknown"] += 1

    def snapshot(self, queue: Any = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "searches": {"reranked": self.reranked, "skipped": dict(self.skipped)},
            "relevance": self.relevance.snapshot(),
        }
        if queue is not None:
            stats = asdict(queue)
            stats.pop("batch_shapes", None)
            out["queue"] = stats
        return out
