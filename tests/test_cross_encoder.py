"""The cross-encoder model on tiny local models: logits read right, truncation, MaxP, load errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy import runtime
from proxy.cross_encoder import CrossEncoderModel
from proxy.runtime import ModelLoadError, pick_device, pick_dtype

from .corpus import DOCS
from .tiny_model import build_tiny_cross_encoder, reference_scores, reference_window_scores

pytestmark = pytest.mark.slow

PASSAGES = [d["text"] for d in DOCS[:12]]


def score(model: CrossEncoderModel, query: str, passages: list[str]) -> list[float]:
    """Straight through the model's two halves, without the queue."""
    items, owners = model.encode(query, passages)
    return model.reduce(model.run_batch(items), owners, len(passages))


@pytest.fixture(scope="module")
def two_logit_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("ce2"), PASSAGES, num_labels=2, seed=1)


def test_one_logit_head_scores_with_the_logit(tiny_model: Path) -> None:
    model = CrossEncoderModel(str(tiny_model), max_length=128, device="cpu", dtype="float32")
    got = score(model, "coffee with water", PASSAGES)
    assert got == pytest.approx(reference_scores(tiny_model, "coffee with water", PASSAGES, 128), abs=1e-4)
    assert len(set(got)) > 1


def test_two_logit_head_scores_with_the_log_odds(two_logit_model: Path) -> None:
    model = CrossEncoderModel(str(two_logit_model), max_length=128, device="cpu", dtype="float32")
    got = score(model, "green tea", PASSAGES)
    assert got == pytest.approx(reference_scores(two_logit_model, "green tea", PASSAGES, 128), abs=1e-4)


def test_padding_in_a_batch_does_not_change_scores(tiny_model: Path) -> None:
    model = CrossEncoderModel(str(tiny_model), max_length=128, device="cpu", dtype="float32")
    items, _ = model.encode("tea", PASSAGES)
    alone = [model.run_batch([item])[0] for item in items]
    assert model.run_batch(items) == pytest.approx(alone, abs=1e-4)
    assert model.encode("tea", []) == ([], [])


def test_long_passages_truncate_and_long_queries_are_clipped(tiny_model: Path) -> None:
    model = CrossEncoderModel(str(tiny_model), max_length=32, device="cpu", dtype="float32")
    long_passage = " ".join(PASSAGES)
    items, _ = model.encode("coffee", [long_passage])
    assert len(items) == 1 and len(items[0].ids) == 32
    assert score(model, "coffee", [long_passage]) == pytest.approx(
        reference_scores(tiny_model, "coffee", [long_passage], max_length=32), abs=1e-4
    )
    # A query longer than max_length alone would make only_second truncation fail; it is clipped.
    assert len(score(model, " ".join(PASSAGES[:4]), PASSAGES[:3])) == 3


def test_maxp_scores_a_long_passage_by_its_best_window(tiny_model: Path) -> None:
    query = "coffee brewed"
    # Bury a passage after filler so that some later window outscores the first one. The tiny
    # model's tokenizer is trained afresh per run, so the pair is searched for, not hard-coded.
    plain = CrossEncoderModel(str(tiny_model), max_length=48, device="cpu", dtype="float32")
    scores = score(plain, query, PASSAGES)
    by_score = sorted(PASSAGES, key=lambda p: scores[PASSAGES.index(p)])
    for worst, best in ((w, b) for w in by_score for b in reversed(by_score) if w != b):
        long_doc = " ".join([worst] * 4 + [best])
        windows = reference_window_scores(tiny_model, query, long_doc, max_length=48, overlap=8)
        if max(windows) > windows[0] + 1.0:
            break
    assert len(windows) >= 3 and max(windows) > windows[0], "the answer must sit past the first window"

    maxp = CrossEncoderModel(
        str(tiny_model), max_length=48, device="cpu", dtype="float32", max_windows=50, window_overlap=8
    )
    items, owners = maxp.encode(query, [long_doc, worst])
    assert owners.count(0) == len(windows) and owners.count(1) == 1
    got = maxp.reduce(maxp.run_batch(items), owners, 2)
    assert got[0] == pytest.approx(max(windows), abs=1e-4)
    assert got[0] > score(plain, query, [long_doc])[0], "truncation sees only the filler"

    capped = CrossEncoderModel(
        str(tiny_model), max_length=48, device="cpu", dtype="float32", max_windows=2, window_overlap=8
    )
    items, owners = capped.encode(query, [long_doc])
    assert owners == [0, 0]
    assert capped.reduce(capped.run_batch(items), owners, 1)[0] == pytest.approx(max(windows[:2]), abs=1e-4)


def test_missing_model_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"^rerank\.model: cannot load"):
        CrossEncoderModel(str(tmp_path / "nope"), max_length=32, device="cpu", dtype="float32")


def test_head_with_three_labels_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "three"
    build_tiny_cross_encoder(bad, PASSAGES, num_labels=3)
    assert json.loads((bad / "config.json").read_text())["id2label"]
    with pytest.raises(ModelLoadError, match="3 output labels"):
        CrossEncoderModel(str(bad), max_length=32, device="cpu", dtype="float32")


def test_warm_up_and_compile_flag_leave_scores_alone(tiny_model: Path) -> None:
    model = CrossEncoderModel(str(tiny_model), max_length=64, device="cpu", dtype="float32", threads=1)
    model.warm_up(4)
    assert score(model, "tea", PASSAGES[:3]) == pytest.approx(
        reference_scores(tiny_model, "tea", PASSAGES[:3], 64), abs=1e-4
    )
    assert model.dtype == "float32"


def test_devices_and_precision() -> None:
    import torch

    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        assert pick_device("auto") != "cuda"
        with pytest.raises(ModelLoadError, match=r"rerank\.device"):
            pick_device("cuda")
    assert pick_dtype("auto", "cuda", (9, 0)) == "bfloat16"  # H100
    assert pick_dtype("auto", "cuda", (8, 0)) == "bfloat16"  # A100
    assert pick_dtype("auto", "cuda:1", (7, 5)) == "float16"  # T4: bf16 only emulated
    assert pick_dtype("auto", "cuda", (7, 0)) == "float16"  # V100
    assert pick_dtype("auto", "cpu", None) == "float32"
    assert pick_dtype("float16", "cuda", (9, 0)) == "float16"
    assert pick_dtype("bfloat16", "cuda", (7, 0)) == "bfloat16"  # an explicit choice stands


def test_torch_compile_path_gives_the_same_scores(tiny_model: Path) -> None:
    model = CrossEncoderModel(str(tiny_model), max_length=64, device="cpu", dtype="float32", compile=True)
    model.warm_up(4)  # compiles here, at start-up, not on the first search
    assert score(model, "tea", PASSAGES[:5]) == pytest.approx(
        reference_scores(tiny_model, "tea", PASSAGES[:5], 64), abs=1e-3
    )


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_uses_bf16_autocast_only_where_the_cpu_has_it(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """``auto`` on CPU: float32 weights, bf16 autocast on a CPU with native bf16; scores stay those
    of float32 up to bf16 rounding (the ranking is what matters: rank correlation near 1)."""
    monkeypatch.setattr(runtime, "cpu_bf16_native", lambda: native)
    auto = CrossEncoderModel(str(tiny_model), max_length=64, device="cpu", dtype="auto")
    plain = CrossEncoderModel(str(tiny_model), max_length=64, device="cpu", dtype="float32")
    assert (auto.dtype, auto.autocast, plain.autocast) == ("float32", native, False)
    passages = [f"{p} {i}" for i, p in enumerate(PASSAGES * 4)]
    items, plan = auto.encode("coffee brewed with water", passages)
    got = auto.reduce(auto.run_batch(items), plan, len(passages))
    want = plain.reduce(plain.run_batch(items), plan, len(passages))
    if native:
        assert got != want  # bf16 arithmetic really ran
        ranks = [sorted(range(len(xs)), key=lambda i: xs[i]) for xs in (got, want)]
        position = [{i: r for r, i in enumerate(order)} for order in ranks]
        n = len(got)
        d2 = sum((position[0][i] - position[1][i]) ** 2 for i in range(n))
        assert 1 - 6 * d2 / (n * (n * n - 1)) > 0.98  # Spearman's rank correlation
    else:
        assert got == want


def test_autocast_model_keeps_linear_weights_in_bf16_with_autocasts_own_scores(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under CPU autocast the Linear weights are cast once at load; the scores are exactly those of
    float32 weights cast by autocast on every pass, and the norms stay float32."""
    import torch

    monkeypatch.setattr(runtime, "cpu_bf16_native", lambda: True)
    auto = CrossEncoderModel(str(tiny_model), max_length=64, device="cpu", dtype="auto")
    plain = CrossEncoderModel(str(tiny_model), max_length=64, device="cpu", dtype="float32")
    kinds = {type(m).__name__: m for m in auto.net.modules()}
    linear = [m for m in auto.net.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)
    assert kinds["LayerNorm"].weight.dtype == torch.float32
    items, _ = auto.encode("coffee brewed with water", PASSAGES)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = plain.net(**plain.prepare(items)).logits.float()[:, 0].tolist()
    assert auto.run_batch(items) == want
