"""What the HTTP side calls to score passages, and how it reaches the batching queue.

The HTTP side sees only the :class:`Scorer` protocol: ``await score(query, passages)``. The local
implementation, :class:`EngineScorer`, looks passages up in the optional score cache, tokenizes the
rest on a tokenizer thread, submits the items to the model's :class:`~proxy.batching.BatchQueue`
and turns the model's per-item results into one score per passage. Each scorer kind (cross-encoder,
bi-encoder) is a :class:`Model`: how to tokenize a search and how to run one batch. With a remote
``rerank.backend``, :class:`~proxy.remote.RemoteScorer` sends the passages to an inference server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from .batch_cost import BatchLimits, batch_size_for
from .batching import BatchQueue
from .config import RerankConfig
from .remote import open_remote_scorer
from .runtime import ModelLoadError, empty_device_cache, out_of_memory_errors, usable_cores
from .score_cache import ScoreCache, through_cache

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["EngineScorer", "Model", "ModelLoadError", "Scorer", "load_scorer"]


class Scorer(Protocol):
    """What the proxy needs from a reranker."""

    name: str

    async def score(self, query: str, passages: Sequence[str]) -> list[float]:
        """One relevance score per passage, higher is better, in the order given."""
        ...

    async def aclose(self) -> None: ...


class Model(Protocol):
    """A scorer kind, split at the queue: ``encode`` per search, ``run_batch`` per forward pass.

    A kind may also split ``run_batch`` into ``prepare(batch)`` (the host side: padded tensors on the
    device) and ``run_prepared(tensors)``; :class:`EngineScorer` then has the queue prepare the next
    batch while the current one runs. Both transformer kinds do; a kind without them runs whole.
    """

    name: str
    kind: str
    device: str

    def encode(self, query: str, passages: Sequence[str]) -> tuple[list[Any], Any]:
        """Queue items for one search and what :meth:`reduce` needs to read their results."""
        ...

    def item_length(self, item: Any) -> int: ...

    def run_batch(self, batch: list[Any]) -> Sequence[Any]: ...

    def reduce(self, results: Sequence[Any], plan: Any, n_passages: int) -> list[float]: ...

    def warm_up(self, largest: int) -> None: ...


def auto_batch_tokens(device: str, max_length: int) -> int:
    """The padded-token budget for ``max_batch_tokens: 0``. Measured (benchmarks/README.md): a GPU
    wants big batches to fill its cores; on CPU, MiniLM-L6 ran ~1.9x faster at 2048 tokens a batch
    than at 16384, whose activations no longer fit in cache."""
    return max(max_length, 32768 if device.startswith("cuda") else 2048)


def limits_of(cfg: RerankConfig, device: str = "cpu") -> BatchLimits:
    return BatchLimits(
        max_batch_tokens=cfg.max_batch_tokens or auto_batch_tokens(device, cfg.max_length),
        max_batch_pairs=cfg.max_batch_pairs,
        max_wait_ms=cfg.max_wait_ms,
        max_queued=cfg.max_queued_pairs,
    )


class EngineScorer:
    """A :class:`Model` behind one batching queue, with an optional score cache in front.

    ``timeout_ms``: each search's deadline, counted from the call to :meth:`score` (the HTTP side
    starts its own ``rerank.timeout_ms`` clock at the same moment); ``None``, no deadline. The queue
    serves searches in deadline order and answers at once one that cannot be scored in time.
    """

    def __init__(
        self, model: Model, limits: BatchLimits, cache_entries: int = 0, timeout_ms: float | None = None
    ) -> None:
        self.model = model
        self.name = model.name
        self.timeout_s = None if timeout_ms is None else timeout_ms / 1000
        self.cache = ScoreCache(cache_entries) if cache_entries > 0 else None
        # A model that splits its host side off (``prepare``) has the next batch's tensors made on
        # the queue's prepare thread while the current batch runs; any other runs whole batches.
        prepare = getattr(model, "prepare", None)
        run_prepared = getattr(model, "run_prepared", None)
        run: Callable[[Any], Sequence[Any]] = model.run_batch
        if prepare is None or run_prepared is None:
            prepare = None
        else:
            run = run_prepared
        self.queue: BatchQueue[Any, Any] = BatchQueue(
            run,
            model.item_length,
            limits,
            prepare=prepare,
            name="rerank-model",
            split_on=out_of_memory_errors(),
            after_split=lambda: empty_device_cache(model.device),
        )
        # The fast tokenizer releases the GIL while it encodes: one thread per usable core lets
        # concurrent searches tokenize in parallel, beside the forward pass.
        self._tokenizer_pool = ThreadPoolExecutor(
            max_workers=usable_cores(), thread_name_prefix="rerank-tokenize"
        )

    async def score(self, query: str, passages: Sequence[str]) -> list[float]:
        if not passages:
            return []

        async def run(texts: list[str]) -> list[float]:
            deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
            # At least one item per passage: refuse before tokenizing, and reserve the estimated work.
            ticket = self.queue.admit(len(texts), deadline)
            loop = asyncio.get_running_loop()
            try:
                items, plan = await loop.run_in_executor(
                    self._tokenizer_pool, self.model.encode, query, texts
                )
                results = await self.queue.submit(items, deadline, ticket)
            finally:
                self.queue.release(ticket)
            return self.model.reduce(results, plan, len(texts))

        return await through_cache(self.cache, self.name, query, passages, run)

    async def calibrate(self, max_length: int, largest: int) -> None:
        """The queue's first cost figures, so admission by estimated wait works from the first
        search: the largest batch the budget allows (``largest`` pairs of ``max_length`` tokens) and
        a one-pair batch, through the queue. The first pass on the queue's fresh model thread pays for
        torch's thread start-up, so it runs twice and the first figures are forgotten."""
        loop = asyncio.get_running_loop()
        long_text = " ".join(["relevance"] * max_length)
        for first, (text, n) in enumerate(((long_text, largest), (long_text, largest), ("warm up", 1))):
            items, _ = await loop.run_in_executor(
                self._tokenizer_pool, self.model.encode, "warm up query", [text] * n
            )
            await self.queue.submit(items)
            if first == 0:
                self.queue.cost.forget()

    async def aclose(self) -> None:
        await self.queue.aclose()
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)


def build_model(cfg: RerankConfig) -> Model:
    """Load the configured model; blocking (seconds), so call it off the event loop."""
    from .bi_encoder import BiEncoderModel
    from .cross_encoder import CrossEncoderModel

    common: dict[str, Any] = {
        "max_length": cfg.max_length,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "compile": cfg.compile,
        "threads": cfg.threads,
        "max_windows": cfg.max_windows,
        "window_overlap": cfg.window_overlap,
    }
    model: Model
    if cfg.scorer == "bi-encoder":
        model = BiEncoderModel(cfg.model, cache_entries=cfg.cache_entries, **common)
    else:
        model = CrossEncoderModel(cfg.model, **common)
    if cfg.warmup:
        try:
            model.warm_up(largest_batch(cfg, model.device))
        except Exception as exc:
            raise warm_up_error(cfg, exc) from exc
    return model


def largest_batch(cfg: RerankConfig, device: str) -> int:
    """Pairs of ``max_length`` tokens in one forward pass at the configured budget: warm-up runs it,
    so a card too small for the budget fails at start, not at the first busy moment."""
    return batch_size_for(cfg.max_length, limits_of(cfg, device))


def warm_up_error(cfg: RerankConfig, exc: Exception) -> ModelLoadError:
    """A failed warm-up as one start-up line: torch.compile's failures name ``rerank.compile``,
    anything else the model. The traceback goes to the debug log."""
    log.debug("warm-up failed", exc_info=exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    compiling = cfg.compile and type(exc).__module__.startswith(("torch._dynamo", "torch._inductor"))
    if compiling:
        return ModelLoadError(f"rerank.compile: torch.compile failed while warming up: {first}")
    return ModelLoadError(f"rerank.model: {cfg.model!r} failed on a warm-up batch: {first}")


async def in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a thread of its own that does not keep the process alive: a model load or
    download can take minutes, and a proxy told to stop during start-up (nothing served yet) must not
    wait for it, as it would for the event loop's executor threads, which exit waits on."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, exc: BaseException | None) -> None:
        if done.cancelled():
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(value)  # type: ignore[arg-type]

    def body() -> None:
        try:
            value, exc = fn(*args), None
        except BaseException as error:  # handed to the awaiting task, which raises it
            value, exc = None, error
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
            loop.call_soon_threadsafe(settle, value, exc)

    threading.Thread(target=body, name="rerank-load", daemon=True).start()
    return await done


async def load_scorer(cfg: RerankConfig) -> Scorer:
    """Load and warm the model off the event loop, then put it behind its batching queue; with a
    remote ``rerank.backend`` nothing is loaded here, the server at ``rerank.backend_url`` scores."""
    if cfg.backend != "local":
        return await open_remote_scorer(cfg)
    model = await in_daemon_thread(build_model, cfg)
    log.info("scorer %s (%s) ready", model.name, model.kind)
    # A bi-encoder caches passage embeddings itself, which serves every query; a score cache on top
    # would only hold copies.
    scores_cached = cfg.cache_entries if model.kind == "cross-encoder" else 0
    scorer = EngineScorer(model, limits_of(cfg, model.device), scores_cached, cfg.timeout_ms)
    if cfg.warmup:  # the queue's cost figures, so admission by estimated wait works from the start
        await scorer.calibrate(cfg.max_length, largest_batch(cfg, model.device))
    return scorer
