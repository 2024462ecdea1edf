"""The budgets of one forward pass, what its tokens cost, and what a batching queue has counted.

Kept apart from the queue itself (:mod:`proxy.batching`) because the metrics, the scorer's start-up
(the largest batch warm-up runs) and the benchmarks read them without running a queue.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int  # padded tokens per forward pass: items x longest item
    max_batch_pairs: int  # items per forward pass
    max_wait_ms: float  # how long the oldest waiting item may wait for a batch to fill
    max_queued: int  # items admitted and not yet scored, across all jobs


# Upper bounds (seconds) of the queue-wait histogram's buckets; one more bucket holds longer waits.
WAIT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class QueueStats:
    """Counters since start; ``queued`` is the current depth. Read by tests, benchmarks and metrics."""

    queued: int = 0
    jobs: int = 0
    rejected_jobs: int = 0  # refused by the bound (overloaded)
    refused_wait_jobs: int = 0  # refused on arrival by estimated wait (queue_wait)
    dropped_late_jobs: int = 0  # dropped in the queue by deadline (deadline)
    cancelled_items: int = 0
    batches: int = 0
    failed_batches: int = 0
    split_batches: int = 0
    items: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    forward_seconds: float = 0.0
    # Jobs by how long they waited from submission until their first item entered a batch, one count
    # per WAIT_BUCKETS_S bucket (not cumulative) plus one for longer waits, and the waits' sum: what
    # the metrics serve as a histogram, kept here so that no wait before the first scrape is lost.
    wait_counts: list[int] = field(default_factory=lambda: [0] * (len(WAIT_BUCKETS_S) + 1))
    wait_seconds: float = 0.0
    batch_shapes: list[tuple[int, int]] = field(default_factory=list)  # (items, longest), last 1000

    def record(self, n: int, longest: int, real: int, seconds: float) -> None:
        self.batches += 1
        self.items += n
        self.real_tokens += real
        self.padded_tokens += n * longest
        self.forward_seconds += seconds
        self.batch_shapes.append((n, longest))
        del self.batch_shapes[:-1000]

    def record_wait(self, seconds: float) -> None:
        self.wait_counts[bisect.bisect_left(WAIT_BUCKETS_S, seconds)] += 1
        self.wait_seconds += seconds


def batch_size_for(longest: int, limits: BatchLimits) -> int:
    """How many items, all at most ``longest`` tokens, fit one forward pass (at least one)."""
    return max(1, min(limits.max_batch_pairs, limits.max_batch_tokens // max(1, longest)))


def bucket(length: int) -> int:
    """Length bucket: items of 2**(b-1)+1 .. 2**b tokens share bucket b."""
    return max(0, length - 1).bit_length()


class CostModel:
    """Seconds of forward pass per real token, learnt per length bucket of a batch's longest item
    (attention grows with length, so a token of a 256-token batch costs more than one of a 32-token
    batch), and seconds per item overall for estimates made before tokenizing. Moving averages, so a
    machine that slows down (another process on the cores) is followed within a few batches."""

    ALPHA = 0.3

    def __init__(self) -> None:
        self.per_token: dict[int, float] = {}
        self.per_item = 0.0
        self._seconds = 0.0  # moving averages of a batch's seconds and items: per_item is their ratio
        self._items = 0.0

    def forget(self) -> None:
        self.per_token, self.per_item, self._seconds, self._items = {}, 0.0, 0.0, 0.0

    def observe(self, n: int, longest: int, real_tokens: int, seconds: float) -> None:
        b, a = bucket(longest), self.ALPHA
        rate = seconds / max(1, real_tokens)
        old = self.per_token.get(b)
        self.per_token[b] = rate if old is None else (1 - a) * old + a * rate
        # Seconds per item as a ratio of averages, not an average of ratios: a one-pair batch (mostly
        # fixed cost per forward pass) would otherwise count as much as a full one, and a single slow
        # small batch could make every search look too long to admit, with nothing admitted to
        # correct it.
        first = not self._items
        self._seconds = seconds if first else (1 - a) * self._seconds + a * seconds
        self._items = n if first else (1 - a) * self._items + a * n
        self.per_item = self._seconds / self._items

    def token_rate(self, b: int) -> float:
        """Seconds per token in bucket ``b``, from the nearest bucket measured; 0 before any batch."""
        if b in self.per_token:
            return self.per_token[b]
        if not self.per_token:
            return 0.0
        return self.per_token[min(self.per_token, key=lambda k: (abs(k - b), -k))]

    def seconds(self, tokens_by_bucket: dict[int, int]) -> float:
        return sum(tokens * self.token_rate(b) for b, tokens in tokens_by_bucket.items())
