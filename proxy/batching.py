"""One batching queue per loaded model: concurrent searches share forward passes, earliest deadline first.

Every search submits its already-tokenized items (a cross-encoder's pairs, a bi-encoder's texts) with
its deadline (a ``time.monotonic()`` instant, ``None`` for none) and awaits one future. A single worker
task owns everything queued. It serves jobs in deadline order (oldest first when every search has the
same timeout) and cuts one batch at a time from the head of the queue: the head job's items longest
first, topped up from the next jobs while the padded size (items x longest item) stays within
``max_batch_tokens`` and the item count within ``max_batch_pairs``. So the first search finishes after
its own work, not after everyone's, and a later search cannot starve an earlier one.

A :class:`CostModel` learns what a token costs from the batches that ran, by length, so the queue knows
its pending work in seconds. That decides two early answers, both before any model time is spent:

* admission by estimated wait: a search whose work, queued behind everything due before it, would end
  past its deadline is refused at once (:class:`WaitTooLong`); :meth:`BatchQueue.admit` applies the
  same rule before tokenizing with an estimate from the item count, and reserves that much work;
* early drop: before each batch, a queued job that can no longer finish by its deadline is failed
  with :class:`DeadlineMissed` and its items never run.

Ways out, each resolving every waiter concerned:

* the queue holds at most ``max_queued`` items: past it :class:`QueueFull` is raised at once;
* a cancelled waiter (client gone, rerank timeout) has its items that have not run dropped;
* a forward pass that raises one of ``split_on`` (CUDA out of memory) is split in halves and retried;
  otherwise, or for a single item, it fails the jobs with items in that batch, no others;
* :meth:`BatchQueue.aclose` fails whatever is still queued.

Every early answer is a :class:`Shed` whose ``reason`` is the ``X-Rerank-Reason`` the search gets.
The forward pass runs on one dedicated executor thread, so the event loop only does the bookkeeping.

With a ``prepare`` step (padding a batch into tensors, on cuda copying them to the device), the host
work of the next batch overlaps the forward pass of the current one: while a batch runs and the queue
still holds at least a full batch, the next one is cut and prepared on a second thread, and starts
the moment the model thread is free. A queue with less than a full batch waiting keeps filling
instead (a batch cut early would run half empty). On cuda the prepared tensors are queued on the
same stream as the running forward pass, so they are never read before they are written.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .batch_cost import BatchLimits, CostModel, QueueStats, bucket

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Shed(RuntimeError):
    """The queue answered without scoring; ``reason`` names why (the search's ``X-Rerank-Reason``)."""

    reason = "overloaded"


class QueueFull(Shed):
    """Admitting the job would exceed ``max_queued_pairs``."""

    reason = "overloaded"


class WaitTooLong(Shed):
    """The queue's estimated wait plus the job's own work ends past the job's deadline."""

    reason = "queue_wait"


class DeadlineMissed(Shed):
    """Admitted, then dropped before its items ran: it could no longer finish by its deadline."""

    reason = "deadline"


class QueueClosed(RuntimeError):
    """The scorer is shutting down."""


class _Job(Generic[T, R]):
    __slots__ = (
        "deadline",
        "enqueued",
        "future",
        "items",
        "lengths",
        "pending",
        "remaining",
        "results",
        "seq",
        "started",
        "tokens",
    )

    def __init__(
        self,
        items: Sequence[T],
        lengths: list[int],
        future: asyncio.Future[list[R]],
        deadline: float,
        seq: int,
    ) -> None:
        self.items = items
        self.lengths = lengths
        self.results: list[R | None] = [None] * len(items)
        self.remaining = len(items)  # items without a result yet (queued or running)
        self.pending = sorted(range(len(items)), key=lambda i: -lengths[i])  # not yet in a batch
        self.tokens: dict[int, int] = {}  # pending tokens by length bucket
        for n in lengths:
            self.tokens[bucket(n)] = self.tokens.get(bucket(n), 0) + n
        self.future = future
        self.deadline = deadline
        self.seq = seq
        self.enqueued = time.monotonic()
        self.started = False  # an item of it has entered a batch (its queue wait is recorded)

    def key(self) -> tuple[float, int]:
        return self.deadline, self.seq

    def take(self, i: int) -> None:
        b = bucket(self.lengths[i])
        self.tokens[b] -= self.lengths[i]


@dataclass
class _Staged(Generic[T, R]):
    """The next batch, cut from the queue and being prepared while the current one runs."""

    batch: list[tuple[_Job[T, R], int]]
    longest: int
    payload: asyncio.Future[Any]


@dataclass
class Ticket:
    """Work reserved by :meth:`BatchQueue.admit` until the job is submitted or given up."""

    seconds: float
    released: bool = False


class BatchQueue(Generic[T, R]):
    """Runs ``run_batch`` (blocking: a forward pass) over items from concurrent jobs.

    ``run_batch`` gets a list of items and returns one result per item, in order; with ``prepare``,
    it gets what ``prepare`` made of that list instead (tensors), and ``prepare`` of the next batch
    may run on its own thread while ``run_batch`` runs. ``length`` gives an item's token count, known
    before queueing because items are tokenized first. ``split_on``: exceptions of ``run_batch`` after
    which the batch is retried in halves (out of memory).
    """

    def __init__(
        self,
        run_batch: Callable[[Any], Sequence[R]],
        length: Callable[[T], int],
        limits: BatchLimits,
        *,
        prepare: Callable[[list[T]], Any] | None = None,
        executor: Executor | None = None,
        name: str = "model",
        split_on: tuple[type[BaseException], ...] = (),
        after_split: Callable[[], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._prepare = prepare
        self._prepare_executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-prepare") if prepare else None
        )
        self._staged: _Staged[T, R] | None = None
        self._current: list[tuple[_Job[T, R], int]] | None = None  # the batch in the forward pass
        self._length = length
        self.limits = limits
        self.stats = QueueStats()
        self.cost = CostModel()
        self._split_on = split_on
        self._after_split = after_split
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-forward")
        self._jobs: list[_Job[T, R]] = []  # jobs with pending items, in deadline order
        self._running: list[_Job[T, R]] = []  # jobs with items in the forward pass now (or staged)
        self._busy_until = 0.0  # estimated end of the forward pass now running (and the staged one)
        self._reserved = 0.0  # seconds of work admitted and not yet submitted
        self._seq = itertools.count()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    # --- admission ----------------------------------------------------------------------------------

    def _ahead(self, now: float, deadline: float) -> float:
        """Estimated seconds of work that runs before a job due at ``deadline``."""
        running = max(0.0, self._busy_until - now)
        due_first = sum(self.cost.seconds(j.tokens) for j in self._jobs if j.deadline <= deadline)
        return running + due_first + self._reserved

    def admit(self, n: int, deadline: float | None = None) -> Ticket:
        """Raise :class:`QueueFull` if ``n`` more items would exceed the bound, :class:`WaitTooLong` if
        the work already due before ``deadline`` ends past it. Applied by the scorer before tokenizing
        (so a refused search costs no tokenizer time); the returned ticket reserves ``n`` items' worth
        of estimated work until :meth:`submit` or :meth:`release`."""
        if self._closed:
            raise QueueClosed("the scorer is closed")
        if self.stats.queued + n > self.limits.max_queued:
            self.stats.rejected_jobs += 1
            raise QueueFull(
                f"{self.stats.queued} pairs queued; {n} more would exceed {self.limits.max_queued} "
                "(rerank.max_queued_pairs)"
            )
        own = n * self.cost.per_item
        if deadline is not None:
            # The search's own work counts too: one admitted here only to be refused after tokenizing
            # (at submit) costs the tokenizer's CPU, which under a sustained overload is the model's.
            now = time.monotonic()
            ahead = self._ahead(now, deadline)
            if ahead > 0 and now + ahead + own > deadline:
                self.stats.refused_wait_jobs += 1
                raise WaitTooLong(
                    f"about {ahead * 1000:.0f} ms of queued work is due first, its own is about "
                    f"{own * 1000:.0f} ms and {max(0.0, deadline - now) * 1000:.0f} ms are left"
                )
        ticket = Ticket(own)
        self._reserved += ticket.seconds
        return ticket

    def release(self, ticket: Ticket) -> None:
        if not ticket.released:
            ticket.released = True
            self._reserved = max(0.0, self._reserved - ticket.seconds)

    async def submit(
        self, items: Sequence[T], deadline: float | None = None, ticket: Ticket | None = None
    ) -> list[R]:
        """Results for ``items`` in their order; raises a :class:`Shed`, or the batch's error."""
        if ticket is not None:
            self.release(ticket)
        if not items:
            return []
        n = len(items)
        self.release(self.admit(n))  # the bound
        loop = asyncio.get_running_loop()
        due = math.inf if deadline is None else deadline
        job: _Job[T, R] = _Job(
            items, [self._length(i) for i in items], loop.create_future(), due, next(self._seq)
        )
        if deadline is not None:
            # An idle queue admits anything: a search that runs is how a wrong estimate gets corrected.
            now = time.monotonic()
            ahead = self._ahead(now, deadline)
            ahead = ahead + self.cost.seconds(job.tokens) if ahead > 0 else 0.0
            if now + ahead > deadline:
                self.stats.refused_wait_jobs += 1
                raise WaitTooLong(
                    f"its {n} items would end about {ahead * 1000:.0f} ms from now, "
                    f"{max(0.0, deadline - now) * 1000:.0f} ms are left"
                )
        self.stats.queued += n
        self.stats.jobs += 1
        bisect.insort(self._jobs, job, key=_Job.key)
        self._ensure_worker().set()
        if self._current is not None:  # a forward pass is running: the next batch may be cut now
            self._stage_next(loop, self._current)
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            self._abandon(job)
            raise

    # --- ways out -----------------------------------------------------------------------------------

    def _ensure_worker(self) -> asyncio.Event:
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work(self._wake))
        return self._wake

    def _forget(self, job: _Job[T, R]) -> None:
        self.stats.queued -= job.remaining
        job.remaining = 0
        job.pending = []
        job.tokens = {}
        with contextlib.suppress(ValueError):
            self._jobs.remove(job)

    def _abandon(self, job: _Job[T, R]) -> None:
        """The waiter is gone: its items that have not run will not run."""
        if not job.future.done():
            job.future.cancel()
        self.stats.cancelled_items += job.remaining
        self._forget(job)

    def _fail(self, job: _Job[T, R], exc: BaseException) -> None:
        self._forget(job)
        if not job.future.done():
            job.future.set_exception(exc)

    def _drop_late(self, now: float) -> None:
        """Fail every queued job that can no longer finish by its deadline, in deadline order: the
        work due before it, the forward pass running now, and its own pending work. The head of the
        queue is never dropped on an estimate alone (it would never be corrected): it runs, or
        meets its caller's own timeout."""
        done_at = now + max(0.0, self._busy_until - now)
        for job in list(self._jobs):
            own = self.cost.seconds(job.tokens)
            if (done_at > now and done_at + own > job.deadline) or now > job.deadline:
                self.stats.dropped_late_jobs += 1
                late = (done_at + own - job.deadline) * 1000
                self._fail(job, DeadlineMissed(f"it would finish about {late:.0f} ms past its deadline"))
            else:
                done_at += own

    # --- the worker ---------------------------------------------------------------------------------

    def _full(self) -> bool:
        items = sum(len(job.pending) for job in self._jobs)
        tokens = sum(sum(job.tokens.values()) for job in self._jobs)
        return items >= self.limits.max_batch_pairs or tokens >= self.limits.max_batch_tokens

    def _next_batch(self) -> tuple[list[tuple[_Job[T, R], int]], int]:
        """One batch from the head of the queue: the earliest job's items longest first, then the next
        jobs' items while the batch stays within both budgets.

        An item joins a started batch only if it is no longer than the batch's longest item: topping
        a batch up with a later job's longest items would pad every item already in it to their
        length (five 30-token pairs padded to 256 to ride with three long ones). A later job's
        shorter items fill the room instead, and its long ones lead a batch of their own."""
        lim = self.limits
        batch: list[tuple[_Job[T, R], int]] = []
        longest = 0
        now = time.monotonic()
        for job in self._jobs:
            keep: list[int] = []
            for i in job.pending:
                n, length = len(batch) + 1, job.lengths[i]
                if not batch or (
                    n <= lim.max_batch_pairs and length <= longest and n * longest <= lim.max_batch_tokens
                ):
                    batch.append((job, i))
                    job.take(i)
                    longest = max(longest, length)
                else:
                    keep.append(i)
            if not job.started and len(keep) < len(job.pending):
                job.started = True
                self.stats.record_wait(now - job.enqueued)
            job.pending = keep
            if len(batch) >= lim.max_batch_pairs or (len(batch) + 1) * longest > lim.max_batch_tokens:
                break
        self._jobs = [job for job in self._jobs if job.pending]
        return batch, longest

    async def _work(self, wake: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while True:
            staged, self._staged = self._staged, None
            if staged is None:
                await self._fill(wake)
            try:
                if staged is not None:
                    await self._run_staged(loop, staged)
                else:
                    self._drop_late(time.monotonic())
                    batch, longest = self._next_batch()
                    if batch:
                        await self._run_one(loop, batch, longest)
            except Exception as exc:  # a bookkeeping bug must not leave waiters hanging
                log.exception("batching step failed")
                for job in [*self._running, *self._jobs]:
                    self._fail(job, exc)
                self._staged = None
            self._running = self._jobs_of(self._staged.batch) if self._staged else []
            if self._jobs:
                wake.set()

    async def _fill(self, wake: asyncio.Event) -> None:
        """Until there is work, then let a batch fill, but the oldest waiter never waits more than
        max_wait_ms for it."""
        await wake.wait()
        oldest = min((job.enqueued for job in self._jobs), default=0.0)
        deadline = oldest + self.limits.max_wait_ms / 1000
        while self._jobs and not self._full():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), left)
            except TimeoutError:
                break
        wake.clear()

    @staticmethod
    def _jobs_of(batch: list[tuple[_Job[T, R], int]]) -> list[_Job[T, R]]:
        return list({id(j): j for j, _ in batch}.values())

    def _estimate(self, batch: list[tuple[_Job[T, R], int]], longest: int) -> float:
        return self.cost.seconds({bucket(longest): len(batch) * longest})

    def _stage_next(self, loop: asyncio.AbstractEventLoop, running: list[tuple[_Job[T, R], int]]) -> None:
        """While a forward pass runs: cut the next batch and prepare it on the prepare thread, when
        the queue holds at least a full batch (less, and it is better left to fill)."""
        if self._prepare is None or self._prepare_executor is None or self._staged is not None:
            return
        if not self._jobs or not self._full():
            return
        self._drop_late(time.monotonic())
        batch, longest = self._next_batch()
        if not batch:
            return
        items = [j.items[i] for j, i in batch]
        payload = loop.run_in_executor(self._prepare_executor, self._prepare, items)
        self._staged = _Staged(batch, longest, payload)
        self._running = self._jobs_of(running + batch)
        self._busy_until += self._estimate(batch, longest)

    async def _run_staged(self, loop: asyncio.AbstractEventLoop, staged: _Staged[T, R]) -> None:
        """Run a batch prepared ahead, unless every job in it went away meanwhile."""
        try:
            payload = await staged.payload
        except Exception as exc:
            self._batch_failed(staged.batch, exc)
            return
        live = [(j, i) for j, i in staged.batch if j.remaining]
        if live:
            await self._run_one(loop, staged.batch, staged.longest, payload)

    def _batch_failed(self, batch: list[tuple[_Job[T, R], int]], exc: BaseException) -> None:
        self.stats.failed_batches += 1
        log.warning("a forward pass of %d items failed: %s: %s", len(batch), type(exc).__name__, exc)
        for job in self._jobs_of(batch):
            self._fail(job, exc)

    def _forward(self, items: list[T], payload: Any) -> Callable[[], Sequence[R]]:
        """The model thread's call: prepared ahead, or preparing there and then."""
        if payload is not None:
            return lambda: self._run_batch(payload)
        prepare = self._prepare
        if prepare is None:
            return lambda: self._run_batch(items)
        return lambda: self._run_batch(prepare(items))

    async def _run_one(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[_Job[T, R], int]],
        longest: int,
        payload: Any = None,
    ) -> None:
        self._running = self._jobs_of(batch + (self._staged.batch if self._staged else []))
        real = sum(j.lengths[i] for j, i in batch)
        started = time.perf_counter()
        self._busy_until = time.monotonic() + self._estimate(batch, longest)
        forward = loop.run_in_executor(self._executor, self._forward([j.items[i] for j, i in batch], payload))
        self._current = batch
        try:
            self._stage_next(loop, batch)
            out = await forward
            if len(out) != len(batch):
                raise RuntimeError(f"the model returned {len(out)} results for a batch of {len(batch)}")
        except Exception as exc:
            self._current = None
            self._busy_until = 0.0
            if isinstance(exc, self._split_on) and len(batch) > 1:
                self.stats.split_batches += 1
                log.warning("a forward pass of %d items ran out of memory; retrying in halves", len(batch))
                if self._after_split is not None:
                    await loop.run_in_executor(self._executor, self._after_split)
                half = len(batch) // 2
                for part in (batch[:half], batch[half:]):
                    live = [(j, i) for j, i in part if j.remaining]
                    if live:
                        await self._run_one(loop, live, max(j.lengths[i] for j, i in live))
                return
            self._batch_failed(batch, exc)
            return
        self._current = None
        seconds = time.perf_counter() - started
        staged = self._staged
        self._busy_until = time.monotonic() + self._estimate(staged.batch, staged.longest) if staged else 0.0
        self.stats.record(len(batch), longest, real, seconds)
        self.cost.observe(len(batch), longest, real, seconds)
        for (job, i), result in zip(batch, out, strict=True):
            if not job.remaining:  # cancelled, failed or dropped while its batch ran
                continue
            job.results[i] = result
            job.remaining -= 1
            self.stats.queued -= 1
            if not job.remaining and not job.future.done():
                job.future.set_result(job.results)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        """Fail everything still queued, stop the worker, release the model thread."""
        self._closed = True
        for job in [*self._running, *self._jobs]:
            self._fail(job, QueueClosed("the scorer is closed"))
        self._jobs, self._running, self._staged, self._current = [], [], None, None
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._prepare_executor is not None:
            self._prepare_executor.shutdown(wait=False, cancel_futures=True)
