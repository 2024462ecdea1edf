"""The batching queue with a fake forward pass: routing, budgets, bounds, cancellation, failures."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Sequence

import pytest

from proxy.batch_cost import BatchLimits, CostModel, batch_size_for
from proxy.batching import BatchQueue, DeadlineMissed, QueueClosed, QueueFull, WaitTooLong


class Forward:
    """Items are ``(job, index, length)``; the result names the item, so misrouting shows."""

    def __init__(self, poison: str | None = None) -> None:
        self.batches: list[list[tuple[str, int, int]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.poison = poison

    def __call__(self, batch: list[tuple[str, int, int]]) -> Sequence[str]:
        self.entered.set()
        self.gate.wait(10)
        self.batches.append(batch)
        if self.poison is not None and any(job == self.poison for job, _, _ in batch):
            raise RuntimeError("CUDA out of memory (simulated)")
        return [f"{job}:{i}" for job, i, _ in batch]

    def ran(self, job: str) -> list[int]:
        return sorted(i for b in self.batches for j, i, _ in b if j == job)


def limits(tokens: int = 1000, pairs: int = 16, wait_ms: float = 1.0, queued: int = 10_000) -> BatchLimits:
    return BatchLimits(max_batch_tokens=tokens, max_batch_pairs=pairs, max_wait_ms=wait_ms, max_queued=queued)


def items(job: str, lengths: Sequence[int]) -> list[tuple[str, int, int]]:
    return [(job, i, n) for i, n in enumerate(lengths)]


def queue(forward: Forward, lim: BatchLimits) -> BatchQueue[tuple[str, int, int], str]:
    return BatchQueue(forward, lambda item: item[2], lim)


def test_batch_size_for_respects_both_bounds() -> None:
    assert batch_size_for(100, limits(tokens=1000, pairs=16)) == 10
    assert batch_size_for(10, limits(tokens=1000, pairs=16)) == 16
    assert batch_size_for(5000, limits(tokens=1000, pairs=16)) == 1  # one oversize item still runs


async def test_concurrent_jobs_share_batches_and_get_their_own_results_in_order() -> None:
    forward, rng = Forward(), random.Random(7)
    q = queue(forward, limits(tokens=2000, pairs=32, wait_ms=20))
    jobs = {f"j{n}": [rng.randint(3, 300) for _ in range(rng.randint(1, 60))] for n in range(24)}

    async def one(name: str) -> list[str]:
        await asyncio.sleep(rng.random() / 100)
        return await q.submit(items(name, jobs[name]))

    results = await asyncio.gather(*(one(name) for name in jobs))
    for name, got in zip(jobs, results, strict=True):
        assert got == [f"{name}:{i}" for i in range(len(jobs[name]))]
    assert any(len({j for j, _, _ in b}) > 1 for b in forward.batches), "no batch mixed two searches"
    assert q.stats.queued == 0 and q.stats.items == sum(map(len, jobs.values()))
    await q.aclose()


async def test_token_budget_and_pair_cap_hold_for_every_batch() -> None:
    forward, rng = Forward(), random.Random(3)
    lim = limits(tokens=1024, pairs=20, wait_ms=5)
    q = queue(forward, lim)
    await asyncio.gather(
        *(q.submit(items(f"j{n}", [rng.randint(8, 256) for _ in range(50)])) for n in range(10))
    )
    for batch in forward.batches:
        longest = max(n for _, _, n in batch)
        assert len(batch) <= lim.max_batch_pairs
        assert len(batch) * longest <= lim.max_batch_tokens
    # Length grouping: padding is a small share of what fixed batches in arrival order would pad.
    padded = sum(len(b) * max(n for _, _, n in b) for b in forward.batches)
    real = sum(n for b in forward.batches for _, _, n in b)
    assert padded / real < 1.25, (padded, real)
    await q.aclose()


async def test_past_the_bound_a_job_is_refused_at_once_and_the_queue_keeps_working() -> None:
    forward = Forward()
    forward.gate.clear()  # hold the first batch in the model
    q = queue(forward, limits(pairs=4, queued=10))
    first = asyncio.ensure_future(q.submit(items("a", [5] * 8)))
    await asyncio.to_thread(forward.entered.wait, 5)
    with pytest.raises(QueueFull, match="max_queued_pairs"):
        await q.submit(items("b", [5] * 3))
    assert q.stats.rejected_jobs == 1
    forward.gate.set()
    assert await first == [f"a:{i}" for i in range(8)]
    assert await q.submit(items("c", [5] * 10)) == [f"c:{i}" for i in range(10)]
    assert forward.ran("b") == []
    await q.aclose()


async def test_a_cancelled_waiter_has_its_pending_items_dropped() -> None:
    forward = Forward()
    forward.gate.clear()
    q = queue(forward, limits(pairs=2))
    running = asyncio.ensure_future(q.submit(items("a", [9, 9])))
    await asyncio.to_thread(forward.entered.wait, 5)  # a's batch is in the model now
    gone = asyncio.ensure_future(q.submit(items("b", [5] * 6)))
    await asyncio.sleep(0.01)
    assert q.stats.queued == 8
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert q.stats.queued == 2 and q.stats.cancelled_items == 6
    forward.gate.set()
    assert await running == ["a:0", "a:1"]
    assert await q.submit(items("c", [4])) == ["c:0"]
    assert forward.ran("b") == [], "a cancelled job's items reached the model"
    assert q.stats.queued == 0
    await q.aclose()


async def test_a_timeout_cancels_like_a_disconnect() -> None:
    forward = Forward()
    forward.gate.clear()
    q = queue(forward, limits(pairs=1))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(q.submit(items("a", [5, 5, 5])), 0.05)
    forward.gate.set()
    assert await q.submit(items("b", [5])) == ["b:0"]
    assert forward.ran("a") == [0]  # only the batch already in the model when the waiter left
    await q.aclose()


async def test_a_failing_batch_fails_only_its_own_jobs() -> None:
    forward = Forward(poison="bad")
    forward.gate.clear()
    q = queue(forward, limits(tokens=1000, pairs=2, wait_ms=50))
    blocker = asyncio.ensure_future(q.submit(items("first", [1])))
    await asyncio.to_thread(forward.entered.wait, 5)
    # Next step: bad's long items sort into their own batch, good's short ones into another.
    bad = asyncio.ensure_future(q.submit(items("bad", [400, 400])))
    good = asyncio.ensure_future(q.submit(items("good", [10, 10, 10])))
    await asyncio.sleep(0.01)
    forward.gate.set()
    assert await blocker == ["first:0"]
    with pytest.raises(RuntimeError, match="out of memory"):
        await bad
    assert await good == ["good:0", "good:1", "good:2"]
    assert q.stats.failed_batches == 1 and q.stats.queued == 0
    assert await q.submit(items("after", [3])) == ["after:0"]
    await q.aclose()


async def test_a_wrong_number_of_results_is_an_error_not_a_misrouting() -> None:
    q: BatchQueue[int, int] = BatchQueue(lambda batch: batch[:-1], lambda item: 1, limits())
    with pytest.raises(RuntimeError, match="returned 2 results for a batch of 3"):
        await q.submit([1, 2, 3])
    await q.aclose()


async def test_a_batch_waits_for_company_up_to_max_wait_ms() -> None:
    forward = Forward()
    q = queue(forward, limits(pairs=64, wait_ms=300))
    first = asyncio.ensure_future(q.submit(items("a", [5, 5])))
    await asyncio.sleep(0.03)
    second = asyncio.ensure_future(q.submit(items("b", [5])))
    await asyncio.gather(first, second)
    assert len(forward.batches) == 1 and len(forward.batches[0]) == 3


async def test_a_full_batch_does_not_wait() -> None:
    forward = Forward()
    q = queue(forward, limits(pairs=4, wait_ms=60_000))
    started = time.monotonic()
    assert await q.submit(items("a", [5] * 4)) == [f"a:{i}" for i in range(4)]
    assert time.monotonic() - started < 5
    await q.aclose()


async def test_close_fails_what_is_still_queued() -> None:
    forward = Forward()
    forward.gate.clear()
    q = queue(forward, limits(pairs=1))
    running = asyncio.ensure_future(q.submit(items("a", [5, 5])))
    await asyncio.to_thread(forward.entered.wait, 5)
    waiting = asyncio.ensure_future(q.submit(items("b", [5])))
    await asyncio.sleep(0.01)
    await q.aclose()
    forward.gate.set()
    for fut in (running, waiting):
        with pytest.raises(QueueClosed):
            await fut
    with pytest.raises(QueueClosed):
        await q.submit(items("c", [1]))


# --- deadlines ---------------------------------------------------------------------------------------


class Clocked(Forward):
    """A forward pass that takes ``seconds_per_token`` per padded token, so the queue's cost model
    learns a known rate."""

    def __init__(self, seconds_per_token: float) -> None:
        super().__init__()
        self.rate = seconds_per_token

    def __call__(self, batch: list[tuple[str, int, int]]) -> Sequence[str]:
        time.sleep(self.rate * len(batch) * max(n for _, _, n in batch))
        return super().__call__(batch)


async def test_searches_are_served_in_deadline_order_each_finishing_after_its_own_work() -> None:
    forward = Forward()
    forward.gate.clear()
    q = queue(forward, limits(tokens=1000, pairs=4))
    blocker = asyncio.ensure_future(q.submit(items("first", [10])))
    await asyncio.to_thread(forward.entered.wait, 5)
    now = time.monotonic()
    # Submitted latest-deadline first: the queue must still serve c (due first), then a, then b.
    order = [("b", 30.0), ("a", 20.0), ("c", 10.0)]
    done: list[str] = []

    async def one(name: str, due: float) -> None:
        await q.submit(items(name, [10, 30, 20, 10, 40, 10]), deadline=now + due)
        done.append(name)

    tasks = [asyncio.ensure_future(one(name, due)) for name, due in order]
    await asyncio.sleep(0.01)
    forward.gate.set()
    await asyncio.gather(blocker, *tasks)
    assert done == ["c", "a", "b"]
    jobs_per_batch = [[job for job, _, _ in b] for b in forward.batches[1:]]
    # c's six items run in the first two batches (4, then 2 topped up by a's longest two); a's
    # left-overs come before any of b's.
    assert jobs_per_batch[:2] == [["c"] * 4, ["c", "c", "a", "a"]]
    last_c = max(k for k, b in enumerate(jobs_per_batch) if "c" in b)
    first_b = min(k for k, b in enumerate(jobs_per_batch) if "b" in b)
    last_a = max(k for k, b in enumerate(jobs_per_batch) if "a" in b)
    assert last_c < first_b and last_a <= first_b
    assert forward.batches[1][0][2] == 40, "the head job's items run longest first"
    await q.aclose()


async def head_then_tail(
    lim: BatchLimits, head: list[int], tail: list[int]
) -> list[list[tuple[str, int, int]]]:
    """The batches cut when a search due first (``head``) and one due later (``tail``) queue up
    together behind a running batch (left out of what is returned)."""
    forward = Forward()
    forward.gate.clear()
    q = queue(forward, lim)
    blocker = asyncio.ensure_future(q.submit(items("first", [10])))
    await asyncio.to_thread(forward.entered.wait, 5)
    now = time.monotonic()
    first = asyncio.ensure_future(q.submit(items("head", head), deadline=now + 10))
    later = asyncio.ensure_future(q.submit(items("tail", tail), deadline=now + 20))
    await asyncio.sleep(0.01)
    forward.gate.set()
    await asyncio.gather(blocker, first, later)
    await q.aclose()
    return forward.batches[1:]


async def test_batches_are_cut_longest_first_from_the_head_within_the_budget() -> None:
    batches = await head_then_tail(limits(tokens=120, pairs=8), [40, 5], [100, 30, 20, 10])
    # head's two items and, within 120 padded tokens at width 40, tail's 30 (3 x 40 = 120).
    assert batches[0] == [("head", 0, 40), ("head", 1, 5), ("tail", 1, 30)]
    for batch in batches:
        assert len(batch) * max(n for _, _, n in batch) <= 120 or len(batch) == 1


async def test_a_later_search_tops_a_batch_up_without_widening_it() -> None:
    batches = await head_then_tail(limits(tokens=2048, pairs=64), [30] * 5, [256, 256, 256, 28, 20])
    # Not head's five 30-token pairs padded to 256 beside tail's three long ones (8 x 256 = 2048
    # fits the budget): tail's short pairs ride along, its long ones get a batch of their own.
    assert [n for _, _, n in batches[0]] == [30] * 5 + [28, 20]
    assert [n for _, _, n in batches[1]] == [256] * 3


async def test_a_search_that_cannot_finish_in_time_is_dropped_before_it_runs() -> None:
    forward = Clocked(seconds_per_token=0.001)  # a 100-token item costs 0.1 s
    q = queue(forward, limits(tokens=100, pairs=1))
    await q.submit(items("learn", [100]))  # the cost model's first figure
    assert q.cost.per_item == pytest.approx(0.1, rel=0.5)
    forward.gate.clear()
    forward.entered.clear()
    now = time.monotonic()
    a = asyncio.ensure_future(q.submit(items("a", [100] * 3), deadline=now + 10))
    await asyncio.to_thread(forward.entered.wait, 5)
    # Admitted with time to spare (0.3 s of work, 0.5 s left), then the model stalls.
    b = asyncio.ensure_future(q.submit(items("b", [100] * 2), deadline=now + 0.5))
    await asyncio.sleep(0.01)
    assert q.stats.refused_wait_jobs == 0 and q.stats.queued == 5
    await asyncio.sleep(0.4)  # b's 0.2 s of work no longer fits
    forward.gate.set()
    with pytest.raises(DeadlineMissed) as caught:
        await b
    assert caught.value.reason == "deadline"
    await a
    assert forward.ran("b") == [], "a search past its deadline spent model time"
    assert q.stats.dropped_late_jobs == 1 and q.stats.queued == 0
    await q.aclose()


async def test_admission_by_estimated_wait() -> None:
    forward = Forward()
    q = queue(forward, limits(tokens=100, pairs=1))
    await q.submit(items("learn", [100]))
    q.cost.per_token, q.cost.per_item = {7: 0.01}, 1.0  # a 100-token item costs 1 s, by estimate
    forward.gate.clear()
    forward.entered.clear()
    now = time.monotonic()
    a = asyncio.ensure_future(q.submit(items("a", [100] * 4), deadline=now + 5))
    await asyncio.to_thread(forward.entered.wait, 5)  # one item in the model, 3 s of a's queued
    # Due after a, 3 s of its own: 6 s of work before a 5.5 s deadline. Refused at once, nothing queued.
    started = time.monotonic()
    with pytest.raises(WaitTooLong) as caught:
        await q.submit(items("late", [100] * 3), deadline=now + 5.5)
    assert caught.value.reason == "queue_wait" and time.monotonic() - started < 0.05
    assert q.stats.refused_wait_jobs == 1 and q.stats.queued == 4
    # Before tokenizing, from what is due first alone: a ticket reserves the search's estimated work.
    ticket = q.admit(3, deadline=now + 20)
    assert ticket.seconds == pytest.approx(3.0)
    with pytest.raises(WaitTooLong):  # 3 s queued + 3 s reserved are due first
        q.admit(1, deadline=now + 5.5)
    q.release(ticket)
    q.release(ticket)  # releasing twice is harmless
    with pytest.raises(WaitTooLong):  # 3 s queued fit a 5.5 s deadline; with its own 3 s they do not
        q.admit(3, deadline=now + 5.5)
    q.release(q.admit(1, deadline=now + 5.5))
    fits = asyncio.ensure_future(q.submit(items("fits", [100]), deadline=now + 9))
    await asyncio.sleep(0.01)
    forward.gate.set()
    assert await fits == ["fits:0"]
    await a
    assert forward.ran("late") == [] and q.stats.refused_wait_jobs == 3
    # Without a deadline nothing is refused by wait.
    assert await q.submit(items("none", [100])) == ["none:0"]
    await q.aclose()


async def test_out_of_memory_splits_the_batch_and_only_what_still_fails_falls_back() -> None:
    import torch

    class SmallCard(Forward):
        """Runs out of memory above 2 items, and on any batch holding ``huge``'s item."""

        def __call__(self, batch: list[tuple[str, int, int]]) -> Sequence[str]:
            if len(batch) > 2 or any(job == "huge" for job, _, _ in batch):
                self.batches.append([("OOM", len(batch), 0)])
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().__call__(batch)

    forward = SmallCard()
    emptied: list[bool] = []
    q: BatchQueue[tuple[str, int, int], str] = BatchQueue(
        forward,
        lambda item: item[2],
        limits(tokens=1000, pairs=8, wait_ms=50),
        split_on=(torch.cuda.OutOfMemoryError,),
        after_split=lambda: emptied.append(True),
    )
    a = asyncio.ensure_future(q.submit(items("a", [10] * 5)))
    huge = asyncio.ensure_future(q.submit(items("huge", [10])))
    b = asyncio.ensure_future(q.submit(items("b", [10] * 2)))
    assert await a == [f"a:{i}" for i in range(5)]
    assert await b == ["b:0", "b:1"]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        await huge
    assert q.stats.split_batches >= 2 and emptied and q.stats.failed_batches == 1
    assert all(len(batch) <= 2 for batch in forward.batches if batch[0][0] != "OOM")
    assert q.stats.queued == 0
    await q.aclose()


def test_seconds_per_item_is_not_pulled_up_by_a_small_batch() -> None:
    """A one-pair forward pass costs mostly its fixed overhead: after a full batch at 10 ms a pair, a
    one-pair batch of 50 ms must not make a 100-pair search look twice as long as it is (admission by
    estimated wait would then refuse searches that fit)."""
    cost = CostModel()
    cost.observe(64, 100, 6400, 0.64)
    cost.observe(1, 100, 100, 0.05)
    assert cost.per_item == pytest.approx(0.0103, rel=0.02)
    cost.forget()
    assert cost.per_item == 0.0
    cost.observe(2, 10, 20, 0.5)
    assert cost.per_item == pytest.approx(0.25)
