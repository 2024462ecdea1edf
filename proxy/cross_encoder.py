"""A transformers sequence-classification model read as a relevance scorer.

One-logit heads (the MiniLM cross-encoders) score with the logit; two-logit heads (mBERT, NBoost's
BERTs, trained as not-relevant/relevant) score with ``logit[1] - logit[0]``, the log-odds of
relevance. Pairs are truncated on the passage side only, so the query is never cut short unless it
alone would take more than half of ``max_length``.

A passage longer than a pair's room can instead be scored as up to ``max_windows`` overlapping windows,
keeping the best window's score (MaxP, Dai & Callan 2019): an answer deep in a long document still
counts. The fast tokenizer cuts the windows (``return_overflowing_tokens`` with a stride), so this
costs one forward item per window and no extra tokenization pass.

The class is split along the batching queue's seam: :meth:`CrossEncoderModel.encode` tokenizes a
search's pairs (on the tokenizer thread), :meth:`CrossEncoderModel.run_batch` runs one forward pass
over pairs that may come from several searches (on the model thread).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .runtime import Encoded, ModelLoadError, TransformerModel


class CrossEncoderModel(TransformerModel):
    kind = "cross-encoder"

    def __init__(self, model: str, **options: Any) -> None:
        """``options``: those of :class:`~proxy.runtime.TransformerModel`."""
        from transformers import AutoModelForSequenceClassification

        super().__init__(model, AutoModelForSequenceClassification, **options)
        labels = self.net.config.num_labels
        if labels not in (1, 2):
            raise ModelLoadError(
                f"rerank.model: {model!r} has {labels} output labels; a reranker needs 1 or 2"
            )
        self._two_logits = labels == 2
        self._max_query_tokens = max(1, self.max_length // 2)

    def _clip_query(self, query: str) -> tuple[str, int]:
        """The query cut to at most ``max_length // 2`` tokens, and its token count."""
        offsets = self.local_tokenizer()(query, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        if len(offsets) <= self._max_query_tokens:
            return query, len(offsets)
        return query[: offsets[self._max_query_tokens - 1][1]], self._max_query_tokens

    def encode(self, query: str, passages: Sequence[str]) -> tuple[list[Encoded], list[int]]:
        """Tokenize every (query, passage) pair once; blocking, so never on the event loop.

        Returns the queue items and, per item, the index of the passage it belongs to.
        """
        if not passages:
            return [], []
        query, query_tokens = self._clip_query(query)
        windows = self.max_windows > 1
        if not windows:
            return self._encode_pairs(query, passages), list(range(len(passages)))
        extra: dict[str, Any] = {}
        if windows:
            room = self.max_length - query_tokens - self.tokenizer.num_special_tokens_to_add(pair=True)
            extra = {"return_overflowing_tokens": True, "stride": max(0, min(self.window_overlap, room // 2))}
        enc: Any = self.local_tokenizer()(
            [query] * len(passages),
            list(passages),
            truncation="only_second",
            max_length=self.max_length,
            return_attention_mask=False,
            return_token_type_ids=self.uses_types,
            **extra,
        )
        return self.items(enc, len(passages), windows)

    def _encode_pairs(self, query: str, passages: Sequence[str]) -> list[Encoded]:
        """The common case, one item per passage, straight through the Rust tokenizer: the same ids
        as ``tokenizer(..., truncation="only_second")`` at about three quarters of the CPU time
        (``encode_batch_fast`` computes no offsets, and no per-call settings are rebuilt)."""
        backend = self.local_backend()
        if backend.truncation != {**(backend.truncation or {}), "max_length": self.max_length}:
            backend.enable_truncation(self.max_length, strategy="only_second")
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        encodings = encode([(query, p) for p in passages])
        if self.uses_types:
            return [Encoded(e.ids, e.type_ids) for e in encodings]
        return [Encoded(e.ids, None) for e in encodings]

    def reduce(self, results: Sequence[float], owners: list[int], n_passages: int) -> list[float]:
        """One score per passage: its best window's (a single window is the common case)."""
        best = [float("-inf")] * n_passages
        for owner, value in zip(owners, results, strict=True):
            best[owner] = max(best[owner], value)
        return best

    def run_batch(self, batch: list[Encoded]) -> list[float]:
        """One forward pass; blocking, on the model thread."""
        return self.run_prepared(self.prepare(batch))

    def run_prepared(self, tensors: dict[str, Any]) -> list[float]:
        """One forward pass over tensors from :meth:`prepare` (made on the queue's prepare thread
        while the previous batch ran); blocking, on the model thread."""
        import torch

        with torch.inference_mode(), self.precision():
            logits = self.forward(**tensors).logits.float()
            values = logits[:, 1] - logits[:, 0] if self._two_logits else logits[:, 0]
            return [float(v) for v in values.tolist()]

    def warm_up(self, largest: int) -> None:
        """A forward pass of one short pair and one of ``largest`` pairs of ``max_length`` tokens (the
        biggest batch the budget allows), so the first search does not pay for CUDA context creation,
        kernel selection or ``torch.compile``, and a device too small for the budget fails at start."""
        long_text = " ".join(["relevance"] * self.max_length)
        for n, text in ((1, "warm up"), (largest, long_text)):
            self.run_batch(self.encode("warm up query", [text] * n)[0])
