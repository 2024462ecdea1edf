"""What the client is told about reranking: the outcome of each search, as response headers.

A search is ``reranked`` or ``skipped`` with a short machine-readable reason; a multi-search cannot
carry headers per item, so :data:`ITEMS_HEADER` lists one outcome per sub-search, in order.
"""

from __future__ import annotations

from dataclasses import dataclass

STATUS_HEADER = "X-Rerank-Status"  # "reranked" or "skipped"; for a multi-search, reranked if any was
REASON_HEADER = "X-Rerank-Reason"  # why it was skipped
TOOK_HEADER = "X-Rerank-Took-Ms"  # scoring time
ITEMS_HEADER = "X-Rerank-Items"  # multi-search: one outcome per sub-search, in order
VARIANT_HEADER = "X-Rerank-Variant"  # with rerank.sample_rate < 1: "rerank" or "control"


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

    def item(self) -> str:
        """This outcome as one entry of :data:`ITEMS_HEADER`: ``reranked`` or ``skipped:<reason>``."""
        return self.status if self.reason is None else f"{self.status}:{self.reason}"


def skipped(reason: str) -> Outcome:
    return Outcome("skipped", reason)


def multi_headers(outcomes: list[Outcome], took_ms: float | None = None) -> dict[str, str]:
    """A multi-search's outcome headers: headers cannot be per item, so one list says each."""
    reranked = any(o.status == "reranked" for o in outcomes)
    out = {
        STATUS_HEADER: "reranked" if reranked else "skipped",
        ITEMS_HEADER: ",".join(o.item() for o in outcomes),
    }
    if took_ms is not None:
        out[TOOK_HEADER] = f"{took_ms:.1f}"
    return out
