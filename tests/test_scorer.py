"""The engine scorer: the real tiny model behind the batching queue, the score cache, overload."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy.batching import QueueFull
from proxy.config import RerankConfig
from proxy.cross_encoder import CrossEncoderModel
from proxy.scorer import EngineScorer, auto_batch_tokens, limits_of, load_scorer

from .corpus import DOCS
from .tiny_model import reference_scores

pytestmark = pytest.mark.slow

PASSAGES = [d["text"] for d in DOCS]
QUERIES = ["coffee with water", "green tea", "bread baked", "cheese", "ocean waves at night", "tea"]


def config(model: Path, **kw: object) -> RerankConfig:
    return RerankConfig(model=str(model), device="cpu", dtype="float32", max_length=64, **kw)  # type: ignore[arg-type]


async def test_concurrent_searches_get_exactly_their_own_scores(tiny_model: Path) -> None:
    scorer = await load_scorer(config(tiny_model, max_batch_tokens=512, max_wait_ms=20))
    try:
        calibration = scorer.queue.stats.items  # the start-up batches that teach the queue its costs
        assert calibration == 2 * (512 // 64) + 1 and scorer.queue.cost.per_item > 0
        got = await asyncio.gather(*(scorer.score(q, PASSAGES) for q in QUERIES))
        for query, scores in zip(QUERIES, got, strict=True):
            assert scores == pytest.approx(reference_scores(tiny_model, query, PASSAGES, 64), abs=1e-4)
        stats = scorer.queue.stats
        assert stats.items == calibration + len(QUERIES) * len(PASSAGES) and stats.queued == 0
        assert all(n * longest <= 512 for n, longest in stats.batch_shapes)
        assert await scorer.score("tea", []) == []
    finally:
        await scorer.aclose()


async def test_the_cache_makes_a_repeated_search_free_and_stays_bounded(tiny_model: Path) -> None:
    scorer = await load_scorer(config(tiny_model, cache_entries=30))
    try:
        first = await scorer.score("coffee", PASSAGES[:20])
        ran = scorer.queue.stats.items
        assert await scorer.score("coffee", PASSAGES[:20]) == first
        assert scorer.queue.stats.items == ran, "a cached page ran the model again"
        # Half cached, half new: only the new half is scored, and the order is the caller's.
        mixed = PASSAGES[10:30]
        got = await scorer.score("coffee", mixed)
        assert scorer.queue.stats.items == ran + 10
        assert got == pytest.approx(reference_scores(tiny_model, "coffee", mixed, 64), abs=1e-4)
        assert scorer.cache is not None and len(scorer.cache) == 30
        # Another query is another key.
        await scorer.score("tea", PASSAGES[:5])
        assert scorer.queue.stats.items == ran + 15
    finally:
        await scorer.aclose()


async def test_no_cache_by_default(tiny_model: Path) -> None:
    scorer = await load_scorer(config(tiny_model, warmup=False))
    try:
        assert scorer.cache is None
        await scorer.score("coffee", PASSAGES[:4])
        await scorer.score("coffee", PASSAGES[:4])
        assert scorer.queue.stats.items == 8
    finally:
        await scorer.aclose()


async def test_overload_is_refused_before_tokenizing(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = CrossEncoderModel(str(tiny_model), max_length=64, device="cpu", dtype="float32")
    scorer = EngineScorer(model, limits_of(config(tiny_model, max_queued_pairs=10)))
    tokenized: list[int] = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda q, ps: tokenized.append(len(ps)) or encode(q, ps))
    try:
        with pytest.raises(QueueFull):
            await scorer.score("coffee", PASSAGES[:11])
        assert tokenized == [] and scorer.queue.stats.rejected_jobs == 1
        assert len(await scorer.score("coffee", PASSAGES[:10])) == 10
        assert tokenized == [10]
    finally:
        await scorer.aclose()


def test_batch_budget_defaults_to_the_device_and_an_explicit_one_wins() -> None:
    assert limits_of(RerankConfig(), "cuda").max_batch_tokens == 32768
    assert limits_of(RerankConfig(), "cpu").max_batch_tokens == 2048
    assert limits_of(RerankConfig(max_length=512), "cpu").max_batch_tokens == 2048
    assert auto_batch_tokens("cpu", 4096) == 4096  # one whole pair always fits
    assert limits_of(RerankConfig(max_batch_tokens=700), "cuda:1").max_batch_tokens == 700
