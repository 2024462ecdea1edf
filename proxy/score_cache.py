"""A bounded LRU of scores, so paging through the same results does not run the model again.

Keyed by model, query text and a hash of the passage: holding the hash rather than the text keeps an
entry at ~100 bytes whatever the passage size. Off by default (``rerank.cache_entries: 0``) because a
changed document keeps its old score only if its text is unchanged, which is the point, but an
operator should choose to hold scores in memory.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence


def passage_key(model: str, query: str, passage: str) -> tuple[str, str, bytes]:
    return model, query, hashlib.blake2b(passage.encode("utf-8"), digest_size=16).digest()


class ScoreCache:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str, bytes], float] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, model: str, query: str, passages: Sequence[str]) -> list[float | None]:
        """One cached score or ``None`` per passage; hits become most recently used."""
        out: list[float | None] = []
        for passage in passages:
            key = passage_key(model, query, passage)
            score = self._entries.get(key)
            if score is None:
                self.misses += 1
            else:
                self.hits += 1
                self._entries.move_to_end(key)
            out.append(score)
        return out

    def store(self, model: str, query: str, passages: Sequence[str], scores: Sequence[float]) -> None:
        if self.max_entries <= 0:
            return
        for passage, score in zip(passages, scores, strict=True):
            key = passage_key(model, query, passage)
            self._entries[key] = score
            self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


async def through_cache(
    cache: ScoreCache | None,
    model: str,
    query: str,
    passages: Sequence[str],
    score: Callable[[list[str]], Awaitable[list[float]]],
) -> list[float]:
    """One score per passage: the cached ones from ``cache`` (none when it is None), the others from
    one call of ``score`` with just those passages, which are then stored. Every scorer kind (local
    engine, remote server) goes through here, so a cache behaves the same whatever scores."""
    found: list[float | None] = (
        cache.lookup(model, query, passages) if cache is not None else [None] * len(passages)
    )
    todo = [i for i, s in enumerate(found) if s is None]
    if todo:
        texts = [passages[i] for i in todo]
        fresh = await score(texts)
        for i, value in zip(todo, fresh, strict=True):
            found[i] = value
        if cache is not None:
            cache.store(model, query, texts, fresh)
    return [float(s) for s in found if s is not None]
