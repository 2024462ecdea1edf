"""One batching queue per loaded model: concurrent searches share forward passes.

Every search submits its already-tokenized items (a cross-encoder's pairs, a bi-encoder's texts) and
awaits one future. A single worker task owns everything queued: it drains the queue in *steps*; a step
takes every job waiting at that moment, orders their items longest first and cuts them into batches
whose padded size (items x longest item) stays within ``max_batch_tokens`` and whose item count stays
within ``max_batch_pairs``. Longest first keeps each batch's items of similar length (little padding)
and puts the memory peak at the start of a step. Items that arrive during a step wait for the next
one, so no job can starve behind later ones.

Ways out, each resolving every waiter concerned:

* the queue holds at most ``max_queued`` items: :meth:`BatchQueue.submit` raises :class:`QueueFull`
  at once past it, and the caller answers in Elasticsearch's order (fail-open);
* a cancelled waiter (client gone, rerank timeout) has its items that have not run dropped;
* a forward pass that raises fails the jobs with items in that batch, no others;
* :meth:`BatchQueue.aclose` fails whatever is still queued.

The forward pass itself runs on one dedicated executor thread, so the event loop only does the
bookkeeping and torch never sees two forward passes of the same model at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(RuntimeError):
    """Admitting the job would exceed ``max_queued_pairs``; the search falls back to Elasticsearch's order."""


class QueueClosed(RuntimeError):
    """The scorer is shutting down."""


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int  # padded tokens per forward pass: items x longest item
    max_batch_pairs: int  # items per forward pass
    max_wait_ms: float  # how long the oldest waiting item may wait for a batch to fill
    max_queued: int  # items admitted and not yet scored, across all jobs


@dataclass
class QueueStats:
    """Counters since start; ``queued`` is the current depth. Read by tests, benchmarks and metrics."""

    queued: int = 0
    jobs: int = 0
    rejected_jobs: int = 0
    cancelled_items: int = 0
    batches: int = 0
    failed_batches: int = 0
    items: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    forward_seconds: float = 0.0
    batch_shapes: list[tuple[int, int]] = field(default_factory=list)  # (items, longest), last 1000

    def record(self, n: int, longest: int, real: int, seconds: float) -> None:
        self.batches += 1
        self.items += n
        self.real_tokens += real
        self.padded_tokens += n * longest
        self.forward_seconds += seconds
        self.batch_shapes.append((n, longest))
        del self.batch_shapes[:-1000]


def batch_size_for(longest: int, limits: BatchLimits) -> int:
    """How many items, all at most ``longest`` tokens, fit one forward pass (at least one)."""
    return max(1, min(limits.max_batch_pairs, limits.max_batch_tokens // max(1, longest)))


class _Job(Generic[T, R]):
    __slots__ = ("enqueued", "future", "items", "lengths", "remaining", "results")

    def __init__(self, items: Sequence[T], lengths: list[int], future: asyncio.Future[list[R]]) -> None:
        self.items = items
        self.lengths = lengths
        self.results: list[R | None] = [None] * len(items)
        self.remaining = len(items)
        self.future = future
        self.enqueued = time.monotonic()


class BatchQueue(Generic[T, R]):
    """Runs ``run_batch`` (blocking: a forward pass) over items from concurrent jobs.

    ``run_batch`` gets a list of items and returns one result per item, in order. ``length`` gives
    an item's token count, known before queueing because items are tokenized first.
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        length: Callable[[T], int],
        limits: BatchLimits,
        *,
        executor: Executor | None = None,
        name: str = "model",
    ) -> None:
        self._run_batch = run_batch
        self._length = length
        self.limits = limits
        self.stats = QueueStats()
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-forward")
        self._waiting: list[_Job[T, R]] = []
        self._step: list[_Job[T, R]] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    def admit(self, n: int) -> None:
        """Raise :class:`QueueFull` if ``n`` more items would exceed the bound. The one admission
        rule: :meth:`submit` applies it, and a caller may apply it early to skip tokenizing work
        that would be refused anyway."""
        if self._closed:
            raise QueueClosed("the scorer is closed")
        if self.stats.queued + n > self.limits.max_queued:
            self.stats.rejected_jobs += 1
            raise QueueFull(
                f"{self.stats.queued} pairs queued; {n} more would exceed {self.limits.max_queued} "
                "(rerank.max_queued_pairs)"
            )

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Results for ``items`` in their order; raises :class:`QueueFull`, or the batch's error."""
        if not items:
            return []
        n = len(items)
        self.admit(n)
        loop = asyncio.get_running_loop()
        job: _Job[T, R] = _Job(items, [self._length(item) for item in items], loop.create_future())
        self.stats.queued += n
        self.stats.jobs += 1
        self._waiting.append(job)
        self._ensure_worker().set()
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            self._abandon(job)
            raise

    def _ensure_worker(self) -> asyncio.Event:
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work(self._wake))
        return self._wake

    def _abandon(self, job: _Job[T, R]) -> None:
        """The waiter is gone: its items that have not run will not run."""
        if not job.future.done():
            job.future.cancel()
        if job.remaining:
            self.stats.queued -= job.remaining
            self.stats.cancelled_items += job.remaining
            job.remaining = 0
        if job in self._waiting:
            self._waiting.remove(job)

    def _fail(self, job: _Job[T, R], exc: BaseException) -> None:
        self.stats.queued -= job.remaining
        job.remaining = 0
        if not job.future.done():
            job.future.set_exception(exc)

    def _full(self) -> bool:
        items = sum(job.remaining for job in self._waiting)
        tokens = sum(sum(job.lengths) for job in self._waiting)
        return items >= self.limits.max_batch_pairs or tokens >= self.limits.max_batch_tokens

    async def _work(self, wake: asyncio.Event) -> None:
        while True:
            await wake.wait()
            # Let a batch fill, but the oldest waiter never waits more than max_wait_ms for it.
            deadline = self._waiting[0].enqueued + self.limits.max_wait_ms / 1000 if self._waiting else 0.0
            while self._waiting and not self._full():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), left)
                except TimeoutError:
                    break
            self._step, self._waiting = [job for job in self._waiting if job.remaining], []
            wake.clear()
            if self._step:
                try:
                    await self._run_step(self._step)
                except Exception as exc:  # a bookkeeping bug must not leave waiters hanging
                    log.exception("batching step failed")
                    for job in self._step:
                        self._fail(job, exc)
                self._step = []

    async def _run_step(self, step: list[_Job[T, R]]) -> None:
        entries = sorted(
            ((job, i) for job in step for i in range(len(job.items))),
            key=lambda e: e[0].lengths[e[1]],
            reverse=True,
        )
        loop = asyncio.get_running_loop()
        pos = 0
        while pos < len(entries):
            # Drop items of jobs that were cancelled or failed since the step began.
            while pos < len(entries) and not entries[pos][0].remaining:
                pos += 1
            if pos == len(entries):
                break
            longest = entries[pos][0].lengths[entries[pos][1]]
            batch: list[tuple[_Job[T, R], int]] = []
            size = batch_size_for(longest, self.limits)
            while pos < len(entries) and len(batch) < size:
                if entries[pos][0].remaining:
                    batch.append(entries[pos])
                pos += 1
            await self._run_one(loop, batch, longest)

    async def _run_one(
        self, loop: asyncio.AbstractEventLoop, batch: list[tuple[_Job[T, R], int]], longest: int
    ) -> None:
        started = time.perf_counter()
        try:
            out = await loop.run_in_executor(self._executor, self._run_batch, [j.items[i] for j, i in batch])
            if len(out) != len(batch):
                raise RuntimeError(f"the model returned {len(out)} results for a batch of {len(batch)}")
        except Exception as exc:
            self.stats.failed_batches += 1
            log.warning("a forward pass of %d items failed: %s: %s", len(batch), type(exc).__name__, exc)
            for job in {id(j): j for j, _ in batch}.values():
                self._fail(job, exc)
            return
        real = sum(j.lengths[i] for j, i in batch)
        self.stats.record(len(batch), longest, real, time.perf_counter() - started)
        for (job, i), result in zip(batch, out, strict=True):
            if not job.remaining:  # cancelled while its batch ran
                continue
            job.results[i] = result
            job.remaining -= 1
            self.stats.queued -= 1
            if not job.remaining and not job.future.done():
                job.future.set_result(job.results)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        """Fail everything still queued, stop the worker, release the model thread."""
        self._closed = True
        for job in [*self._step, *self._waiting]:
            self._fail(job, QueueClosed("the scorer is closed"))
        self._waiting, self._step = [], []
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)
