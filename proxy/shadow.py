"""Shadow mode and the A/B split: trying a model on live traffic without serving it to everyone.

Pure functions. In shadow mode the client gets Elasticsearch's own answer and the model's order of the
same hits is only compared with it: how many of Elasticsearch's top 10 the model keeps in its top 10,
Kendall's tau between the two orders, and where Elasticsearch's top hit lands in the model's order.
The A/B split picks, per search or sticky per key, whether a search is reranked at all.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

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
