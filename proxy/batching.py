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
from dataclasses import dataclass, field
from typing import Generic, TypeVar

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
class Ticket:
    """Work reserved by :meth:`BatchQueue.admit` until the job is submitted or given up."""

    seconds: float
    released: bool = False


class BatchQueue(Generic[T, R]):
    """Runs ``run_batch`` (blocking: a forward pass) over items from concurrent jobs.

    ``run_batch`` gets a list of items and returns one result per item, in order. ``length`` gives
    an item's token count, known before queueing because items are tokenized first. ``split_on``:
    exceptions of ``run_batch`` after which the batch is retried in halves (out of memory).
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        length: Callable[[T], int],
        limits: BatchLimits,
        *,
        executor: Executor | None = None,
        name: str = "model",
        split_on: tuple[type[BaseException], ...] = (),
        after_split: Callable[[], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._length = length
        self.limits = limits
        self.stats = QueueStats()
        self.cost = CostModel()
        self._split_on = split_on
        self._after_split = after_split
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-forward")
        self._jobs: list[_Job[T, R]] = []  # jobs with pending items, in deadline order
        self._running: list[_Job[T, R]] = []  # jobs with items in the forward pass now
        self._busy_until = 0.0  # estimated end of the forward pass now running
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
        jobs' items while the batch stays within both budgets."""
        lim = self.limits
        batch: list[tuple[_Job[T, R], int]] = []
        longest = 0
        now = time.monotonic()
        for job in self._jobs:
            keep: list[int] = []
            for i in job.pending:
                n, widest = len(batch) + 1, max(longest, job.lengths[i])
                if n <= lim.max_batch_pairs and (n * widest <= lim.max_batch_tokens or not batch):
                    batch.append((job, i))
                    job.take(i)
                    longest = widest
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
            await wake.wait()
            # Let a batch fill, but the oldest waiter never waits more than max_wait_ms for it.
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
            try:
                self._drop_late(time.monotonic())
                batch, longest = self._next_batch()
                if batch:
                    await self._run_one(loop, batch, longest)
            except Exception as exc:  # a bookkeeping bug must not leave waiters hanging
                log.exception("batching step failed")
                for job in [*self._running, *self._jobs]:
                    self._fail(job, exc)
            self._running = []
            if self._jobs:
                wake.set()

    async def _run_one(
        self, loop: asyncio.AbstractEventLoop, batch: list[tuple[_Job[T, R], int]], longest: int
    ) -> None:
        self._running = list({id(j): j for j, _ in batch}.values())
        real = sum(j.lengths[i] for j, i in batch)
        started = time.perf_counter()
        self._busy_until = time.monotonic() + self.cost.seconds({bucket(longest): len(batch) * longest})
        try:
            out = await loop.run_in_executor(self._executor, self._run_batch, [j.items[i] for j, i in batch])
            if len(out) != len(batch):
                raise RuntimeError(f"the model returned {len(out)} results for a batch of {len(batch)}")
        except Exception as exc:
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
            self.stats.failed_batches += 1
            log.warning("a forward pass of %d items failed: %s: %s", len(batch), type(exc).__name__, exc)
            for job in {id(j): j for j, _ in batch}.values():
                self._fail(job, exc)
            return
        self._busy_until = 0.0
        seconds = time.perf_counter() - started
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
        self._jobs, self._running = [], []
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)
