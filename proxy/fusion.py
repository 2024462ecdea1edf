"""Score fusion: how much of Elasticsearch's own ranking survives in the served order.

Pure functions. Reranking alone replaces Elasticsearch's order with the model's, which costs relevance
when the model is out of its domain; fusing the two limits the damage:

- ``none``: the model's score decides (the default);
- ``rrf``: reciprocal rank fusion, ``1/(k + rank_es) + 1/(k + rank_model)`` with ranks from 1 within
  the reranked head; robust because it never compares the two score scales;
- ``linear``: ``w * model' + (1 - w) * es'`` where each score is min-max normalised over this search's
  head, ``w`` the model's weight.

The fused value is the served ``_score``. Hits the model did not score (no passage text) stay
unscored, as without fusion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

FUSIONS = ("none", "rrf", "linear")


@dataclass(frozen=True)
class Fusion:
    mode: str = "none"
    k: int = 60  # rrf's rank constant (the value of the RRF paper and of Elasticsearch's rrf retriever)
    weight: float = 0.5  # linear: the model's share

    def __post_init__(self) -> None:
        if self.mode not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got [{self.mode}]")
        if self.k < 1:
            raise ValueError(f"fusion k must be >= 1, got [{self.k}]")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"fusion weight must be between 0 and 1, got [{self.weight}]")


def _ranks(scores: Sequence[float | None]) -> dict[int, int]:
    """1-based rank of each scored position, best first; ties keep the given order."""
    order = sorted((i for i, s in enumerate(scores) if s is not None), key=lambda i: -scores[i])  # type: ignore[operator]
    return {i: rank for rank, i in enumerate(order, start=1)}


def _normalised(scores: Sequence[float | None]) -> list[float | None]:
    present = [s for s in scores if s is not None]
    if not present:
        return list(scores)
    low, high = min(present), max(present)
    span = high - low
    return [None if s is None else ((s - low) / span if span > 0 else 1.0) for s in scores]


def fuse(
    es_scores: Sequence[float | None], model_scores: Sequence[float | None], fusion: Fusion
) -> list[float | None]:
    """The served score of each hit of the head, in Elasticsearch's order.

    ``es_scores[i]`` is Elasticsearch's ``_score`` of the i-th hit (its rank is its position: the head
    arrives in Elasticsearch's order); ``model_scores[i]`` is None where the model did not score it.
    """
    if len(es_scores) != len(model_scores):
        raise ValueError(f"got {len(model_scores)} model scores for {len(es_scores)} hits")
    if fusion.mode == "none":
        return list(model_scores)
    if fusion.mode == "rrf":
        model_rank = _ranks(model_scores)
        return [
            None if s is None else 1.0 / (fusion.k + i + 1) + 1.0 / (fusion.k + model_rank[i])
            for i, s in enumerate(model_scores)
        ]
    es = _normalised([e if m is not None else None for e, m in zip(es_scores, model_scores, strict=True)])
    model = _normalised(model_scores)
    return [
        None if m is None or e is None else fusion.weight * m + (1.0 - fusion.weight) * e
        for e, m in zip(es, model, strict=True)
    ]
