"""proxy.relevance: hand-computed cases per metric, the published DL19 figures, and ir-measures parity."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from proxy.relevance import (
    evaluate,
    evaluate_per_query,
    mrr_at_k,
    ndcg_at_k,
    rank_run,
    read_qrels,
    read_run,
    recall_at_k,
)

DL19 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "trec-dl19"
needs_dl19 = pytest.mark.skipif(
    not (DL19 / "qrels.txt").is_file(), reason=f"TREC DL19 data not found at {DL19} (CI has ../shared/data)"
)

# One query's judgements: d4 is judged best but never retrieved, d5 judged irrelevant.
QRELS = {"d1": 0, "d2": 2, "d3": 1, "d4": 3, "d5": 0}
RANKED = ["d1", "d2", "d3", "x"]  # "x" is unjudged
L3 = math.log2(3)


# --- rank_run ------------------------------------------------------------------------------------


def test_rank_run_orders_by_score_then_docid_descending() -> None:
    assert rank_run({"a": 1.0, "b": 2.0, "c": 1.0, "d": 1.0}) == ["b", "d", "c", "a"]


def test_rank_run_tie_break_is_string_order_not_numeric() -> None:
    # strcmp, as trec_eval: "9" > "10" > "1".
    assert rank_run({"1": 0.5, "10": 0.5, "9": 0.5}) == ["9", "10", "1"]


def test_rank_run_rejects_nan() -> None:
    with pytest.raises(ValueError, match="'b' is NaN"):
        rank_run({"a": 1.0, "b": float("nan")})


# --- nDCG ----------------------------------------------------------------------------------------


def test_ndcg_linear_gain_log2_discount_ideal_from_all_judgements() -> None:
    dcg = 0 + 2 / L3 + 1 / 2  # ranks 1..3: grades 0, 2, 1
    ideal = 3 + 2 / L3 + 1 / 2  # grades 3, 2, 1 (d4 counts though never retrieved)
    assert ndcg_at_k(RANKED, QRELS, 10) == pytest.approx(dcg / ideal, abs=1e-12)


def test_ndcg_cut_at_k_cuts_both_dcg_and_ideal() -> None:
    assert ndcg_at_k(RANKED, QRELS, 1) == 0.0
    assert ndcg_at_k(RANKED, QRELS, 2) == pytest.approx((2 / L3) / (3 + 2 / L3), abs=1e-12)


def test_ndcg_perfect_and_unjudged() -> None:
    assert ndcg_at_k(["d4", "d2", "d3"], QRELS, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["x", "y"], QRELS, 10) == 0.0


def test_ndcg_no_relevant_documents_is_zero() -> None:
    assert ndcg_at_k(["a", "b"], {"a": 0, "b": 0}, 10) == 0.0
    assert ndcg_at_k(["a"], {}, 10) == 0.0
    assert ndcg_at_k([], QRELS, 10) == 0.0


def test_ndcg_gain_is_the_grade_not_exponential() -> None:
    # With 2**g - 1 gains this would be (1 + 3/log2 3) / (7 + 1/log2 3).
    assert ndcg_at_k(["b", "a"], {"a": 3, "b": 1}, 10) == pytest.approx((1 + 3 / L3) / (3 + 1 / L3))


# --- MRR -----------------------------------------------------------------------------------------


def test_mrr_first_document_at_or_above_grade() -> None:
    assert mrr_at_k(RANKED, QRELS, 10) == pytest.approx(1 / 2)
    assert mrr_at_k(["d3", "d1", "d2"], QRELS, 10, min_grade=2) == pytest.approx(1 / 3)
    assert mrr_at_k(["d3"], QRELS, 10, min_grade=3) == 0.0


def test_mrr_cut_at_k() -> None:
    assert mrr_at_k(["x", "d1", "d2"], QRELS, 2) == 0.0
    assert mrr_at_k(["x", "d1", "d2"], QRELS, 3) == pytest.approx(1 / 3)


def test_binary_measures_reject_grade_zero_threshold() -> None:
    with pytest.raises(ValueError, match="min_grade"):
        mrr_at_k(RANKED, QRELS, 10, min_grade=0)
    with pytest.raises(ValueError, match="min_grade"):
        recall_at_k(RANKED, QRELS, 10, min_grade=0)


# --- recall --------------------------------------------------------------------------------------


def test_recall_counts_relevant_found_over_all_relevant() -> None:
    assert recall_at_k(RANKED, QRELS, 10) == pytest.approx(2 / 3)  # d2, d3 of d2, d3, d4
    assert recall_at_k(RANKED, QRELS, 2) == pytest.approx(1 / 3)
    assert recall_at_k(RANKED, QRELS, 10, min_grade=2) == pytest.approx(1 / 2)  # d2 of d2, d4
    assert recall_at_k(["a"], {"a": 0}, 10) == 0.0


def test_rankings_reject_duplicates_and_bad_k() -> None:
    with pytest.raises(ValueError, match="duplicate doc id 'd2'"):
        ndcg_at_k(["d2", "d1", "d2"], QRELS, 10)
    with pytest.raises(ValueError, match="k must be at least 1"):
        recall_at_k(RANKED, QRELS, 0)


# --- evaluate ------------------------------------------------------------------------------------


def test_evaluate_averages_judged_and_ranked_queries_by_default() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"b": 2}, "q3": {"c": 1}, "q4": {"d": 0}}
    run = {"q1": ["a"], "q2": ["x", "b"], "q4": ["d"], "q9": ["a"]}  # q3 unranked, q9 unjudged
    result = evaluate(run, qrels, recall_k=10)
    expected = {
        "ndcg@10": (1 + 1 / L3 + 0) / 3,
        "mrr@10": (1 + 1 / 2 + 0) / 3,
        "recall@10": 2 / 3,
        "num_q": 3,
    }
    assert result == pytest.approx(expected)
    complete = evaluate(run, qrels, recall_k=10, complete=True)
    assert complete["num_q"] == 4
    assert complete["mrr@10"] == pytest.approx(1.5 / 4)
    strict = evaluate_per_query(run, qrels, min_grade=2)  # min_grade leaves nDCG alone
    assert strict["q1"] == {"ndcg@10": 1.0, "mrr@10": 0.0, "recall@100": 0.0}


def test_evaluate_refuses_disjoint_qids() -> None:
    with pytest.raises(ValueError, match="no query is both judged and ranked"):
        evaluate({"1": ["a"]}, {"01": {"a": 1}})


# --- readers -------------------------------------------------------------------------------------


def test_read_qrels_and_run_ignore_iteration_and_rank_columns(tmp_path: Path) -> None:
    (tmp_path / "qrels").write_text("q1 0 a 2\nq1 Q0 b 0\n\nq2 0 c 1\n")
    (tmp_path / "run").write_text("q1 Q0 a 2 0.5 t\nq1 Q0 b 1 0.25 t\n")
    assert read_qrels(tmp_path / "qrels") == {"q1": {"a": 2, "b": 0}, "q2": {"c": 1}}
    run = read_run(tmp_path / "run")
    assert run == {"q1": {"a": 0.5, "b": 0.25}}
    assert rank_run(run["q1"]) == ["a", "b"]  # by score, whatever the rank column says


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("q1 0 a\n", r"qrels:1: expected 'qid iteration docid grade'"),
        ("q1 0 a 1\nq1 0 a 2\n", r"qrels:2: doc 'a' judged twice"),
        ("q1 0 a high\n", r"qrels:1: grade 'high' is not an integer"),
    ],
)
def test_read_qrels_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "qrels").write_text(text)
    with pytest.raises(ValueError, match=message):
        read_qrels(tmp_path / "qrels")


def test_read_run_errors_name_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("q1 Q0 a 1 0.5 t\nq1 Q0 a 2 0.4 t\n")
    with pytest.raises(ValueError, match=r"run:2: doc 'a' listed twice"):
        read_run(tmp_path / "run")
    (tmp_path / "run").write_text("q1 Q0 a 1 0.5\n")
    with pytest.raises(ValueError, match=r"run:1: expected 'qid Q0 docid rank score tag'"):
        read_run(tmp_path / "run")


# --- published figures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dl19() -> tuple[dict[str, dict[str, int]], dict[str, dict[str, float]]]:
    return read_qrels(DL19 / "qrels.txt"), read_run(DL19 / "bm25-top100.run")


@needs_dl19
def test_dl19_bm25_reproduces_published_figures(
    dl19: tuple[dict[str, dict[str, int]], dict[str, dict[str, float]]],
) -> None:
    qrels, scores = dl19
    run = {qid: rank_run(s) for qid, s in scores.items()}
    assert round(evaluate(run, qrels)["ndcg@10"], 4) == 0.5058
    result = evaluate(run, qrels, min_grade=2)
    assert round(result["mrr@10"], 4) == 0.7024
    assert result["num_q"] == 43


# --- parity with ir-measures (pytrec_eval, i.e. trec_eval itself) ---------------------------------
# ir-measures hands RR@k to its msmarco provider, which breaks ties by docid *ascending*; trec_eval's
# recip_rank (no cutoff) orders as we do. So MRR@10 is checked as trec_eval's RR zeroed below 1/10.


def _ir_measures_per_query(
    qrels: dict[str, dict[str, int]], scores: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    ir_measures = pytest.importorskip("ir_measures", reason="ir-measures not installed (dev extra)")
    from ir_measures import RR, R, nDCG

    names = {nDCG @ 10: "ndcg@10", RR(rel=2): "rr", R(rel=2) @ 100: "recall@100"}
    out: dict[str, dict[str, float]] = {}
    for m in ir_measures.iter_calc(list(names), qrels, scores):
        out.setdefault(m.query_id, {})[names[m.measure]] = m.value
    for values in out.values():
        rr = values.pop("rr")
        values["mrr@10"] = rr if rr >= 1 / 10 else 0.0
    return out


def _assert_parity(qrels: dict[str, dict[str, int]], scores: dict[str, dict[str, float]]) -> None:
    theirs = _ir_measures_per_query(qrels, scores)
    ours = evaluate_per_query({q: rank_run(s) for q, s in scores.items()}, qrels, min_grade=2)
    assert set(ours) == set(theirs)
    for qid, values in ours.items():
        assert values == pytest.approx(theirs[qid], abs=1e-9), qid


@needs_dl19
def test_dl19_agrees_with_ir_measures_per_query(
    dl19: tuple[dict[str, dict[str, int]], dict[str, dict[str, float]]],
) -> None:
    _assert_parity(*dl19)


def test_toy_graded_data_with_ties_agrees_with_ir_measures() -> None:
    """NovelEval-shaped (grades 0-2, 20 judged passages a query) plus unjudged docs and heavy ties."""
    rng = random.Random(7)
    qrels: dict[str, dict[str, int]] = {}
    scores: dict[str, dict[str, float]] = {}
    for q in range(40):
        docs = [f"{q}-{i}" for i in range(30)]  # ids like "3-9" vs "3-10": string order matters
        qrels[str(q)] = {d: rng.choice((0, 0, 0, 1, 2)) for d in docs[:20]}
        scores[str(q)] = {d: rng.randint(0, 4) / 2 for d in rng.sample(docs, 25)}  # 5 distinct scores
    qrels["0"] = dict.fromkeys(qrels["0"], 0)  # a judged query without any relevant passage
    scores["unjudged"] = {"a": 1.0}
    _assert_parity(qrels, scores)
