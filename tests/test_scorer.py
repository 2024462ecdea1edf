"""The cross-encoder scorer on tiny local models: logits read right, truncation, load errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.scorer import CrossEncoder, ModelLoadError, load_scorer, pick_device

from .corpus import DOCS
from .tiny_model import build_tiny_cross_encoder, reference_scores

pytestmark = pytest.mark.slow

PASSAGES = [d["text"] for d in DOCS[:12]]


@pytest.fixture(scope="module")
def two_logit_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("ce2"), PASSAGES, num_labels=2, seed=1)


def test_one_logit_head_scores_with_the_logit(tiny_model: Path) -> None:
    engine = CrossEncoder(str(tiny_model), max_length=128, batch_size=5, device="cpu")
    got = engine.score_sync("coffee with water", PASSAGES)
    want = reference_scores(tiny_model, "coffee with water", PASSAGES, max_length=128)
    assert got == pytest.approx(want, abs=1e-4)
    assert len(set(got)) > 1


def test_two_logit_head_scores_with_the_log_odds(two_logit_model: Path) -> None:
    engine = CrossEncoder(str(two_logit_model), max_length=128, batch_size=4, device="cpu")
    got = engine.score_sync("green tea", PASSAGES)
    assert got == pytest.approx(reference_scores(two_logit_model, "green tea", PASSAGES, 128), abs=1e-4)


def test_batching_and_order_do_not_change_scores(tiny_model: Path) -> None:
    one = CrossEncoder(str(tiny_model), max_length=128, batch_size=1, device="cpu")
    many = CrossEncoder(str(tiny_model), max_length=128, batch_size=64, device="cpu")
    assert one.score_sync("tea", PASSAGES) == pytest.approx(many.score_sync("tea", PASSAGES), abs=1e-4)
    assert many.score_sync("tea", []) == []


def test_long_passages_truncate_and_long_queries_are_clipped(tiny_model: Path) -> None:
    engine = CrossEncoder(str(tiny_model), max_length=32, batch_size=8, device="cpu")
    long_passage = " ".join(PASSAGES)
    # Only the passage's tail is cut: its score equals that of its first tokens that fit.
    got = engine.score_sync("coffee", [long_passage])
    assert got == pytest.approx(
        reference_scores(tiny_model, "coffee", [long_passage], max_length=32), abs=1e-4
    )
    # A query longer than max_length alone would make only_second truncation fail; it is clipped.
    assert len(engine.score_sync(" ".join(PASSAGES[:4]), PASSAGES[:3])) == 3


async def test_load_scorer_runs_async(tiny_model: Path) -> None:
    scorer = await load_scorer(str(tiny_model), max_length=64, batch_size=4, device="cpu")
    try:
        assert len(await scorer.score("coffee", PASSAGES[:3])) == 3
    finally:
        await scorer.aclose()


def test_missing_model_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"^rerank\.model: cannot load"):
        CrossEncoder(str(tmp_path / "nope"), max_length=32, batch_size=1, device="cpu")


def test_head_with_three_labels_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "three"
    build_tiny_cross_encoder(bad, PASSAGES, num_labels=3)
    assert json.loads((bad / "config.json").read_text())["id2label"]
    with pytest.raises(ModelLoadError, match="3 output labels"):
        CrossEncoder(str(bad), max_length=32, batch_size=1, device="cpu")


def test_devices() -> None:
    import torch

    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        assert pick_device("auto") != "cuda"
        with pytest.raises(ModelLoadError, match=r"rerank\.device"):
            pick_device("cuda")
