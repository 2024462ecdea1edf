"""The batching queue's prepare step: the next batch's host work overlaps the current forward pass.

A fake model whose ``prepare`` records the thread it ran on and whose forward pass blocks on a gate,
so a test can look at the queue while a batch is "on the device".
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from proxy.batch_cost import BatchLimits
from proxy.batching import BatchQueue, QueueClosed, WaitTooLong

Item = tuple[str, int]  # (job, index); every item is 10 tokens long


@dataclass
class Prepared:
    items: list[Item]
    thread: str


class StagedModel:
    def __init__(self, bad_job: str | None = None) -> None:
        self.prepared: list[Prepared] = []
        self.ran: list[Prepared] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)
        self.bad_job = bad_job

    def prepare(self, batch: list[Item]) -> Prepared:
        if any(job == self.bad_job for job, _ in batch):
            raise ValueError("cannot pad this batch (simulated)")
        made = Prepared(batch, threading.current_thread().name)
        self.prepared.append(made)
        return made

    def run(self, payload: Prepared) -> Sequence[str]:
        self.entered.release()
        self.gate.wait(10)
        self.ran.append(payload)
        return [f"{job}:{i}" for job, i in payload.items]


def make_queue(model: StagedModel, pairs: int = 4) -> BatchQueue[Item, str]:
    lim = BatchLimits(max_batch_tokens=10_000, max_batch_pairs=pairs, max_wait_ms=1.0, max_queued=10_000)
    return BatchQueue(model.run, lambda item: 10, lim, prepare=model.prepare, name="fake")


def job(name: str, n: int) -> list[Item]:
    return [(name, i) for i in range(n)]


async def entered(model: StagedModel) -> None:
    """Until the model thread is inside a forward pass."""
    assert await asyncio.to_thread(model.entered.acquire, True, 10)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0.005)


async def a_running() -> tuple[StagedModel, BatchQueue[Item, str], asyncio.Task[list[str]]]:
    """A queue of four-item batches whose first batch, search a's, is held in the forward pass."""
    model = StagedModel()
    q = make_queue(model, pairs=4)
    model.gate.clear()
    first = asyncio.create_task(q.submit(job("a", 4)))
    await entered(model)
    return model, q, first


async def a_running_b_staged() -> tuple[
    StagedModel, BatchQueue[Item, str], asyncio.Task[list[str]], asyncio.Task[list[str]]
]:
    """Search a's batch held in the forward pass, search b's cut and prepared behind it."""
    model, q, first = await a_running()
    staged = asyncio.create_task(q.submit(job("b", 4)))
    await settle()
    assert [p.items[0][0] for p in model.prepared] == ["a", "b"]
    return model, q, first, staged


async def test_next_batch_is_prepared_on_its_own_thread_while_the_current_one_runs() -> None:
    model, q, first = await a_running()  # a was prepared on the model thread itself
    rest = [asyncio.create_task(q.submit(job(name, 4))) for name in ("b", "c")]
    await settle()
    # b is cut and prepared ahead, on the prepare thread; c waits (one batch ahead, no more).
    assert [p.items[0][0] for p in model.prepared] == ["a", "b"]
    assert model.prepared[0].thread.startswith("fake-forward")
    assert model.prepared[1].thread.startswith("fake-prepare")
    assert model.ran == []
    model.gate.set()
    assert await first == [f"a:{i}" for i in range(4)]
    assert await asyncio.gather(*rest) == [[f"{n}:{i}" for i in range(4)] for n in ("b", "c")]
    assert model.ran[1] is model.prepared[1], "the forward pass did not get the tensors made ahead"
    await q.aclose()


async def test_less_than_a_full_batch_waiting_is_left_to_fill() -> None:
    model, q, first = await a_running()
    small = asyncio.create_task(q.submit(job("b", 2)))
    await settle()
    assert [p.items[0][0] for p in model.prepared] == ["a"], "a half-empty batch was cut early"
    more = asyncio.create_task(q.submit(job("c", 2)))
    await settle()
    model.gate.set()
    await asyncio.gather(first, small, more)
    # b and c, which arrived while a ran, shared one batch.
    assert [sorted({j for j, _ in p.items}) for p in model.ran] == [["a"], ["b", "c"]]
    await q.aclose()


async def test_a_prepare_failure_fails_only_the_searches_in_that_batch() -> None:
    model = StagedModel(bad_job="b")
    q = make_queue(model, pairs=4)
    model.gate.clear()
    tasks = [asyncio.create_task(q.submit(job(name, 4))) for name in ("a", "b", "c")]
    await entered(model)
    model.gate.set()
    a, b, c = await asyncio.gather(*tasks, return_exceptions=True)
    assert a == [f"a:{i}" for i in range(4)] and c == [f"c:{i}" for i in range(4)]
    assert isinstance(b, ValueError)
    assert q.stats.failed_batches == 1 and q.stats.queued == 0
    await q.aclose()


async def test_a_staged_batch_whose_searches_all_left_never_runs() -> None:
    model, q, first, gone = await a_running_b_staged()
    gone.cancel()
    await settle()
    model.gate.set()
    await first
    after = await q.submit(job("c", 1))
    assert after == ["c:0"]
    assert [p.items[0][0] for p in model.ran] == ["a", "c"], "the abandoned batch reached the model"
    assert q.stats.queued == 0 and q.stats.cancelled_items == 4
    await q.aclose()


async def test_closing_fails_the_searches_in_a_staged_batch() -> None:
    model, q, first, staged = await a_running_b_staged()
    await q.aclose()
    model.gate.set()
    for task in (first, staged):
        with pytest.raises(QueueClosed):
            await task


async def test_the_staged_batch_counts_in_the_estimated_wait() -> None:
    model = StagedModel()
    q = make_queue(model, pairs=4)
    q.cost.observe(4, 10, 40, 0.4)  # 10 ms a token: a batch of four 10-token items is 0.4 s
    model.gate.clear()
    first = asyncio.create_task(q.submit(job("a", 4)))
    await entered(model)
    q.release(q.admit(4, time.monotonic() + 0.9))  # a running (0.4 s) + its own (0.4 s): fits
    second = asyncio.create_task(q.submit(job("b", 4)))
    await settle()
    assert len(model.prepared) == 2  # b left the queue for the staged batch, its work did not vanish
    with pytest.raises(WaitTooLong):
        q.admit(4, time.monotonic() + 0.9)  # a + b staged + its own: 1.2 s
    model.gate.set()
    await asyncio.gather(first, second)
    await q.aclose()
