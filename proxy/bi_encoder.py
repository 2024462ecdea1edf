"""A bi-encoder read as a relevance scorer: the cosine of query and passage embeddings.

Cheaper than a cross-encoder in two ways the proxy uses: the query is embedded once per search (one
queue item, not one per pair), and a passage's embedding does not depend on the query, so it is kept
in an LRU (``rerank.cache_entries``) and a passage seen by an earlier search costs nothing.

Reads a sentence-transformers folder (``modules.json``; the ``Pooling`` module's config says CLS or
mean pooling; a ``Normalize`` module is moot for a cosine) or a plain transformers encoder folder,
which gets mean pooling, the sentence-transformers default.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .runtime import Encoded, TransformerModel, describe_load_error
from .score_cache import passage_key

log = logging.getLogger(__name__)

QUERY = -1  # owner of the query's item in a search's plan


class Plan(NamedTuple):
    owners: list[int]  # per queue item: the passage index, or QUERY
    cached: dict[int, Any]  # passage index -> embedding already known
    new: list[tuple[str, int]]  # (passage text, index) of passages embedded by this search


def pooling_of(folder: Path) -> str:
    """``cls`` or ``mean``, from a sentence-transformers folder's Pooling module; ``mean`` otherwise."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return "mean"
    for module in json.loads(modules.read_text()):
        if module.get("type", "").endswith("Pooling"):
            config = json.loads((folder / module.get("path", "") / "config.json").read_text())
            if config.get("pooling_mode_cls_token"):
                return "cls"
            if config.get("pooling_mode_mean_tokens", True):
                return "mean"
            raise ValueError(f"unsupported pooling in {module.get('path')}: {config}")
    return "mean"


class BiEncoderModel(TransformerModel):
    kind = "bi-encoder"

    def __init__(self, model: str, *, cache_entries: int = 0, **options: Any) -> None:
        """``options``: those of :class:`~proxy.runtime.TransformerModel`."""
        from transformers import AutoModel

        super().__init__(model, AutoModel, **options)
        try:
            self.pooling = pooling_of(Path(self.path)) if Path(self.path).is_dir() else "mean"
        except (OSError, ValueError) as exc:
            raise describe_load_error("rerank.model", model, exc) from exc
        self._cache: OrderedDict[tuple[str, str, bytes], Any] = OrderedDict()
        self._cache_entries = cache_entries
        self._lock = threading.Lock()  # encode runs on the tokenizer thread, reduce on the loop

    def _tokenize(self, texts: list[str], windows: bool) -> tuple[list[Encoded], list[int]]:
        extra: dict[str, Any] = {}
        if windows:
            stride = min(self.window_overlap, self.max_length // 4)
            extra = {"return_overflowing_tokens": True, "stride": stride}
        enc: Any = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=False,
            return_token_type_ids=self.uses_types,
            **extra,
        )
        return self.items(enc, len(texts), windows)

    def encode(self, query: str, passages: Sequence[str]) -> tuple[list[Encoded], Plan]:
        """The query's item, then items for the passages whose embedding is not cached yet."""
        cached: dict[int, Any] = {}
        with self._lock:
            for i, passage in enumerate(passages):
                hit = self._cache.get(passage_key(self.name, "", passage))
                if hit is not None:
                    cached[i] = hit
        todo = [i for i in range(len(passages)) if i not in cached]
        q_items, _ = self._tokenize([query], windows=False)
        p_items: list[Encoded] = []
        p_owners: list[int] = []
        if todo:
            p_items, p_owners = self._tokenize([passages[i] for i in todo], self.max_windows > 1)
        owners = [QUERY] + [todo[o] for o in p_owners]
        return q_items + p_items, Plan(owners, cached, [(passages[i], i) for i in todo])

    def run_batch(self, batch: list[Encoded]) -> list[Any]:
        """Embeddings (float32, on the CPU) of one batch; blocking, on the model thread."""
        import torch

        tensors = self.tensors(batch)
        with torch.inference_mode():
            hidden = self.forward(**tensors).last_hidden_state
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = tensors["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()
            return list(pooled.unbind(0))

    def reduce(self, results: Sequence[Any], plan: Plan, n_passages: int) -> list[float]:
        """Cosine of the query with each passage (its best window), caching new passage embeddings."""
        import torch

        query = results[plan.owners.index(QUERY)]
        windows: dict[int, list[Any]] = {}
        for owner, emb in zip(plan.owners, results, strict=True):
            if owner != QUERY:
                windows.setdefault(owner, []).append(emb)
        new = {i: torch.stack(embs) for i, embs in windows.items()}
        if self._cache_entries > 0 and new:
            with self._lock:
                for text, i in plan.new:
                    key = passage_key(self.name, "", text)
                    self._cache[key] = new[i]
                    self._cache.move_to_end(key)
                while len(self._cache) > self._cache_entries:
                    self._cache.popitem(last=False)
        out = []
        for i in range(n_passages):
            embs = plan.cached[i] if i in plan.cached else new[i]
            out.append(float((embs @ query).max()))
        return out

    def warm_up(self, max_batch_pairs: int) -> None:
        long_text = " ".join(["relevance"] * self.max_length)
        items, _ = self.encode("warm up query", [long_text] * min(max_batch_pairs, 8))
        self.run_batch(items)
        self._cache.clear()
