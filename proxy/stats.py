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
from .shadow import OrderDiff

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
class ShadowTracker:
    """Shadow mode's running figures: searches compared, and what the model would have changed."""

    compared: int = 0
    dropped: int = 0  # the model's queue was full or the scoring failed: the search was not compared
    unscorable: int = 0  # no hit carried passage text (or the answer could not be read)
    sums: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("overlap@10", "kendall_tau", "es_top_hit_rank"), 0.0)
    )

    def record(self, diff: OrderDiff) -> None:
        self.compared += 1
        self.sums["overlap@10"] += diff.overlap_at_10
        self.sums["kendall_tau"] += diff.kendall_tau
        self.sums["es_top_hit_rank"] += diff.es_top_hit_rank

    def snapshot(self) -> dict[str, Any]:
        means = {f"mean_{k}": (v / self.compared if self.compared else None) for k, v in self.sums.items()}
        return {"compared": self.compared, "dropped": self.dropped, "unscorable": self.unscorable, **means}


@dataclass
class ProxyStats:
    reranked: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    relevance: RelevanceTracker = field(default_factory=RelevanceTracker)
    shadow: ShadowTracker = field(default_factory=ShadowTracker)

    def outcome(self, status: str, reason: str | None) -> None:
        if status == "reranked":
            self.reranked += 1
        else:
            self.skipped[reason or "unknown"] += 1

    def snapshot(self, queue: Any = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "searches": {"reranked": self.reranked, "skipped": dict(self.skipped)},
            "relevance": self.relevance.snapshot(),
            "shadow": self.shadow.snapshot(),
        }
        if queue is not None:
            out["queue"] = self.queue_figures(queue)
        return out

    @staticmethod
    def queue_figures(queue: Any) -> dict[str, Any]:
        """A batching queue's counters, less what is too long for JSON stats (the recent batch shapes,
        the wait histogram's buckets, which /metrics serves)."""
        stats = asdict(queue)
        stats.pop("batch_shapes", None)
        stats.pop("wait_counts", None)
        return stats
