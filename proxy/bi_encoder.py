"""A bi-encoder read as a relevance scorer: the cosine of query and passage embeddings.

Cheaper than a cross-encoder in two ways the proxy uses: the query is embedded once per search (one
queue item, not one per pair), and a passage's embedding does not depend on the query, so it is kept
in an LRU (``rerank.cache_entries``) and a passage seen by an earlier search costs nothing.

Reads a sentence-transformers model (``modules.json``; the ``Pooling`` module's config says CLS or
mean pooling; a ``Normalize`` module is moot for a cosine; ``max_seq_length`` caps the length) or a
plain transformers encoder, which gets mean pooling, the sentence-transformers default. Local folders
and Hugging Face ids alike.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
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


_SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class Layout:
    """What a sentence-transformers model adds to its transformer: pooling and a length limit."""

    pooling: str  # "cls" or "mean"
    max_seq_length: int | None = None


def model_file(model: str, name: str) -> Path | None:
    """``name`` inside a local model folder, or from the Hugging Face cache/Hub for a model id."""
    folder = Path(model)
    if folder.is_dir():
        return folder / name if (folder / name).is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model, name))
    except Exception:  # not in the repository, or offline without it in the cache
        return None


def read_layout(model: str) -> Layout:
    """The sentence-transformers layout of ``model``; a plain encoder gets mean pooling.

    Only what this scorer reproduces exactly is accepted: a Transformer, one Pooling (CLS or mean,
    not both: sentence-transformers would concatenate them), an optional Normalize (moot for a
    cosine). Anything else (a Dense projection, other pooling modes) raises ValueError rather than
    scoring with silently wrong embeddings.
    """
    modules_file = model_file(model, "modules.json")
    if modules_file is None:
        return Layout("mean")
    pooling = "mean"
    for module in json.loads(modules_file.read_text()):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _SUPPORTED_MODULES:
            raise ValueError(f"sentence-transformers module {module.get('path')!r} ({kind}) is not supported")
        if kind == "Pooling":
            config_file = model_file(model, f"{module.get('path', '')}/config.json".lstrip("/"))
            config = json.loads(config_file.read_text()) if config_file else {}
            modes = sorted(k for k, v in config.items() if k.startswith("pooling_mode_") and v)
            if modes == ["pooling_mode_cls_token"]:
                pooling = "cls"
            elif modes != ["pooling_mode_mean_tokens"]:
                raise ValueError(f"pooling {modes or 'unspecified'} is not supported; CLS or mean only")
    st_config = model_file(model, "sentence_bert_config.json")
    limit = json.loads(st_config.read_text()).get("max_seq_length") if st_config else None
    return Layout(pooling, int(limit) if limit else None)


class BiEncoderModel(TransformerModel):
    kind = "bi-encoder"

    def __init__(self, model: str, *, cache_entries: int = 0, **options: Any) -> None:
        """``options``: those of :class:`~proxy.runtime.TransformerModel`."""
        from transformers import AutoModel

        super().__init__(model, AutoModel, **options)
        try:
            layout = read_layout(self.path)
        except (OSError, ValueError) as exc:
            raise describe_load_error("rerank.model", model, exc) from exc
        self.pooling = layout.pooling
        if layout.max_seq_length and layout.max_seq_length < self.max_length:
            log.info(
                "%s was trained on %d tokens: rerank.max_length lowered to that", model, layout.max_seq_length
            )
            self.max_length = layout.max_seq_length
        self._cache: OrderedDict[tuple[str, str, bytes], Any] = OrderedDict()
        self._cache_entries = cache_entries
        self._lock = threading.Lock()  # encode runs on the tokenizer thread, reduce on the loop

    def _tokenize(self, texts: list[str], windows: bool) -> tuple[list[Encoded], list[int]]:
        extra: dict[str, Any] = {}
        if windows:
            stride = min(self.window_overlap, self.max_length // 4)
            extra = {"return_overflowing_tokens": True, "stride": stride}
        enc: Any = self.local_tokenizer()(
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
                key = passage_key(self.name, "", passage)
                hit = self._cache.get(key)
                if hit is not None:
                    cached[i] = hit
                    self._cache.move_to_end(key)
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
        return self.run_prepared(self.prepare(batch))

    def run_prepared(self, tensors: dict[str, Any]) -> list[Any]:
        """Embeddings of a batch from :meth:`prepare`; blocking, on the model thread."""
        import torch

        with torch.inference_mode(), self.precision():
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

    def warm_up(self, largest: int) -> None:
        """One batch of ``largest`` texts of ``max_length`` tokens, the biggest the budget allows."""
        long_text = " ".join(["relevance"] * self.max_length)
        items, _ = self.encode("warm up query", [long_text] * max(1, largest - 1))
        self.run_batch(items)
