"""Scoring (query, passage) pairs with a transformers cross-encoder.

The HTTP side sees only the :class:`Scorer` protocol: ``await score(query, passages)``. The model
runs on one dedicated worker thread so the event loop keeps serving other requests while a forward
pass runs, and so torch never sees two forward passes of one model at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The configured model cannot be loaded; the message names ``rerank.model``."""


class Scorer(Protocol):
    """What the proxy needs from a reranker."""

    name: str

    async def score(self, query: str, passages: Sequence[str]) -> list[float]:
        """One relevance score per passage, higher is better, in the order given."""
        ...

    async def aclose(self) -> None: ...


def pick_device(requested: str) -> str:
    """``auto`` means cuda, else Apple's mps, else cpu; an explicit device is checked to exist."""
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"rerank.device: {requested!r} asked for but no CUDA device is visible")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("rerank.device: 'mps' asked for but it is not available")
    return requested


class CrossEncoder:
    """A sequence-classification model read as a relevance scorer.

    One-logit heads (the MiniLM cross-encoders) score with the logit; two-logit heads (mBERT, NBoost's
    BERTs, trained as not-relevant/relevant) score with ``logit[1] - logit[0]``, the log-odds of
    relevance. Pairs are truncated on the passage side only, so the query is never cut short unless
    it alone would take more than half of ``max_length``.
    """

    def __init__(self, model: str, *, max_length: int, batch_size: int, device: str = "auto") -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = model
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = pick_device(device)
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self.model = AutoModelForSequenceClassification.from_pretrained(model, dtype=dtype)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"rerank.model: cannot load {model!r}: {first}") from exc
        labels = self.model.config.num_labels
        if labels not in (1, 2):
            raise ModelLoadError(
                f"rerank.model: {model!r} has {labels} output labels; a reranker needs 1 or 2"
            )
        if not getattr(self.tokenizer, "is_fast", False):
            log.warning("model %s has no fast tokenizer; scoring will be slower", model)
        self.model.to(self.device).eval()
        self._two_logits = labels == 2
        self._max_query_tokens = max(1, max_length // 2)

    def _clip_query(self, query: str) -> str:
        enc = self.tokenizer(query, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) <= self._max_query_tokens:
            return query
        return query[: offsets[self._max_query_tokens - 1][1]]

    def score_sync(self, query: str, passages: Sequence[str]) -> list[float]:
        """Blocking: run on a worker thread, never on the event loop."""
        import torch

        if not passages:
            return []
        query = self._clip_query(query)
        # Length-sorted batches keep padding small; scores are put back in the caller's order.
        order = sorted(range(len(passages)), key=lambda i: len(passages[i]))
        scores: list[float] = [0.0] * len(passages)
        with torch.inference_mode():
            for lo in range(0, len(order), self.batch_size):
                idx = order[lo : lo + self.batch_size]
                batch: Any = self.tokenizer(
                    [query] * len(idx),
                    [passages[i] for i in idx],
                    truncation="only_second",
                    max_length=self.max_length,
                    padding=True,
                    return_tensors="pt",
                ).to(self.device)
                logits = self.model(**batch).logits.float()
                values = logits[:, 1] - logits[:, 0] if self._two_logits else logits[:, 0]
                for i, value in zip(idx, values.tolist(), strict=True):
                    scores[i] = value
        return scores


class ThreadedScorer:
    """Adapts a blocking ``score_sync`` to the async :class:`Scorer` protocol on one worker thread."""

    def __init__(self, engine: CrossEncoder) -> None:
        self.engine = engine
        self.name = engine.name
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank-model")

    async def score(self, query: str, passages: Sequence[str]) -> list[float]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.engine.score_sync, query, list(passages))

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


async def load_scorer(model: str, *, max_length: int, batch_size: int, device: str) -> ThreadedScorer:
    """Load the model off the event loop (it takes seconds) and wrap it for async use."""
    engine = await asyncio.to_thread(
        CrossEncoder, model, max_length=max_length, batch_size=batch_size, device=device
    )
    return ThreadedScorer(engine)
