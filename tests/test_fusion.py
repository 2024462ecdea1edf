"""Fusion arithmetic, shadow-mode order comparison and the A/B split, on hand-computed examples."""

from __future__ import annotations

import pytest

from proxy.fusion import Fusion, fuse
from proxy.shadow import in_sample, model_order, order_diff

ES = [10.0, 8.0, 6.0, 4.0]  # Elasticsearch's head, in its order
MODEL = [0.1, 0.9, None, 0.5]  # the third hit had no passage text


def test_none_is_the_models_scores() -> None:
    assert fuse(ES, MODEL, Fusion("none")) == MODEL


def test_rrf_by_hand() -> None:
    # ES ranks 1, 2, 3, 4; model ranks among scored hits: hit1 -> 1, hit3 -> 2, hit0 -> 3.
    k = 60
    expected = [1 / (k + 1) + 1 / (k + 3), 1 / (k + 2) + 1 / (k + 1), None, 1 / (k + 4) + 1 / (k + 2)]
    assert fuse(ES, MODEL, Fusion("rrf", k=k)) == pytest.approx(expected)  # type: ignore[arg-type]


def test_rrf_k_changes_how_much_the_top_counts() -> None:
    got = fuse([3.0, 2.0], [0.0, 1.0], Fusion("rrf", k=1))
    assert got == pytest.approx([1 / 2 + 1 / 3, 1 / 3 + 1 / 2])  # a tie: ES's order stands


def test_linear_by_hand() -> None:
    # Normalised over the scored hits only: ES 10, 8, 4 -> 1, 2/3, 0; model 0.1, 0.9, 0.5 -> 0, 1, 0.5.
    got = fuse(ES, MODEL, Fusion("linear", weight=0.25))
    assert got == pytest.approx([0.75 * 1.0, 0.25 * 1 + 0.75 * (2 / 3), None, 0.25 * 0.5])  # type: ignore[arg-type]


@pytest.mark.parametrize(("weight", "winner"), [(0.0, 0), (1.0, 1)])
def test_linear_weight_ends_are_each_ranking(weight: float, winner: int) -> None:
    got = fuse(ES, MODEL, Fusion("linear", weight=weight))
    scored = [(s, i) for i, s in enumerate(got) if s is not None]
    assert max(scored)[1] == winner


def test_equal_scores_normalise_to_one() -> None:
    assert fuse([2.0, 2.0], [5.0, 5.0], Fusion("linear", weight=0.5)) == [1.0, 1.0]


@pytest.mark.parametrize("bad", [{"mode": "max"}, {"mode": "rrf", "k": 0}, {"mode": "linear", "weight": 1.5}])
def test_invalid_fusion(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Fusion(**bad)  # type: ignore[arg-type]


def test_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 model scores for 3 hits"):
        fuse([1.0, 2.0, 3.0], [1.0, 2.0], Fusion("rrf"))


def test_order_diff_by_hand() -> None:
    # ES order a b c d; the model prefers d > a > b > c (scores in ES order: a=3, b=2, c=1, d=4).
    diff = order_diff([3.0, 2.0, 1.0, 4.0])
    assert model_order([3.0, 2.0, 1.0, 4.0]) == [3, 0, 1, 2]
    assert diff.overlap_at_10 == 1.0  # fewer than 10 hits: the same set
    # pairs (i<j): ab +, ac +, ad -, bc +, bd -, cd -  -> (3 - 3) / 6
    assert diff.kendall_tau == 0.0
    assert diff.es_top_hit_rank == 2


def test_order_diff_same_and_reversed() -> None:
    assert order_diff([4.0, 3.0, 2.0, 1.0]).kendall_tau == 1.0
    reversed_ = order_diff([1.0, 2.0, 3.0, 4.0])
    assert (reversed_.kendall_tau, reversed_.es_top_hit_rank) == (-1.0, 4)


def test_overlap_at_10_counts_the_top_ten_only() -> None:
    scores = [float(i) for i in range(20)]  # the model reverses 20 hits: its top 10 is ES's bottom 10
    assert order_diff(scores).overlap_at_10 == 0.0


def test_sample_is_sticky_per_key_and_near_its_rate() -> None:
    keys = [f"session-{i}" for i in range(20000)]
    first = [in_sample(k, 0.3) for k in keys]
    assert [in_sample(k, 0.3) for k in keys] == first  # the same user always lands on the same side
    assert abs(sum(first) / len(keys) - 0.3) < 0.015


def test_sample_rate_ends_and_random_draws() -> None:
    assert all(in_sample(None, 1.0) for _ in range(100))
    assert not any(in_sample("k", 0.0) for _ in range(100))
    draws = [in_sample(None, 0.5) for _ in range(4000)]
    assert 0.45 < sum(draws) / len(draws) < 0.55
