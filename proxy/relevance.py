"""Ranking-quality metrics with trec_eval's conventions, so our figures are comparable to published ones.

Pure functions over plain dicts and lists, no third-party imports: the proxy calls them at request
time to track relevance online, and the benchmarks call them offline over whole collections.

Conventions (trec_eval 9.x, as wrapped by pytrec_eval and ir-measures), and why each matters:

- **Ranking.** trec_eval ignores a run's rank column and re-sorts every query by score descending,
  ties broken by docid *descending* (``strcmp(p2->docno, p1->docno)`` in ``form_res_rels.c``).
  :func:`rank_run` does the same; any other tie-break moves tied documents across the cutoff and
  changes the figures.
- **nDCG@k** (``ndcg_cut.k``): gain is the judged grade itself (linear, not ``2**grade - 1``), the
  discount is ``log2(rank + 1)`` with ranks from 1, and the ideal DCG is built from *every* judged
  document of the query with grade > 0, retrieved or not. Unjudged documents have gain 0.
- **Binary measures** (MRR@k, recall@k) count a document as relevant when its grade is at least
  ``min_grade``: trec_eval's ``-l`` option. TREC DL passage figures use ``min_grade=2``.
- **Averaging.** A query counts when it is judged *and* ranked (trec_eval's default); with
  ``complete=True`` every judged query counts and one missing from the run scores 0 (trec_eval ``-c``).
  A judged query without any relevant document is averaged in with 0, as trec_eval does.

Verified: the TREC DL19 BM25 top-100 run gives nDCG@10 0.5058 and MRR@10 (grade >= 2) 0.7024, the
published figures, and every measure here agrees per query with trec_eval (through ir-measures).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

Qrels = Mapping[str, Mapping[str, int]]


def rank_run(scores: Mapping[str, float]) -> list[str]:
    """Doc ids best first, ordered exactly as trec_eval orders a run (see the module docstring).

    Python compares str by code point, which is the byte order strcmp sees in UTF-8, so non-ASCII
    ids tie-break as trec_eval does too. A NaN score has no place in an order and raises ValueError.
    """
    for doc_id, score in scores.items():
        if math.isnan(score):
            raise ValueError(f"score of {doc_id!r} is NaN")
    return sorted(scores, key=lambda doc_id: (scores[doc_id], doc_id), reverse=True)


def _top(ranked_ids: Sequence[str], k: int) -> Sequence[str]:
    """The first k ids; rejects k < 1, and duplicates, which trec_eval refuses (they would count twice)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    top = ranked_ids[:k]
    seen: set[str] = set()
    for doc_id in top:
        if doc_id in seen:
            raise ValueError(f"duplicate doc id {doc_id!r} in ranking")
        seen.add(doc_id)
    return top


def _check_min_grade(min_grade: int) -> None:
    # Grade 0 is "judged non-relevant", and unjudged documents read as 0: a threshold of 0 would
    # make every document relevant.
    if min_grade < 1:
        raise ValueError(f"min_grade must be at least 1, got {min_grade}")


def ndcg_at_k(ranked_ids: Sequence[str], qrels: Mapping[str, int], k: int = 10) -> float:
    """trec_eval's ``ndcg_cut.k`` for one query; 0.0 when the query has no document with grade > 0.

    ``qrels`` is this query's ``{doc_id: grade}``. The ideal ranking comes from all of them, so a
    reranker over a pool that misses judged relevant documents cannot reach 1.0, as it should not.
    """
    top = _top(ranked_ids, k)
    ideal = sorted((g for g in qrels.values() if g > 0), reverse=True)[:k]
    ideal_dcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    if ideal_dcg == 0.0:
        return 0.0
    dcg = 0.0
    for i, doc_id in enumerate(top):
        gain = qrels.get(doc_id, 0)
        if gain > 0:
            dcg += gain / math.log2(i + 2)
    return dcg / ideal_dcg


def mrr_at_k(ranked_ids: Sequence[str], qrels: Mapping[str, int], k: int = 10, min_grade: int = 1) -> float:
    """Reciprocal rank of the first document with grade >= min_grade in the top k, else 0.0.

    Its mean is MRR@k. trec_eval's ``recip_rank`` has no cutoff (0.7036 instead of 0.7024 on DL19
    BM25); ir-measures' ``RR(rel=min_grade)@k`` cuts, but breaks score ties by docid ascending (the
    MS MARCO script's order), so it can differ from this on tied scores.
    """
    _check_min_grade(min_grade)
    for i, doc_id in enumerate(_top(ranked_ids, k)):
        if qrels.get(doc_id, 0) >= min_grade:
            return 1.0 / (i + 1)
    return 0.0


def recall_at_k(ranked_ids: Sequence[str], qrels: Mapping[str, int], k: int, min_grade: int = 1) -> float:
    """Share of the query's relevant documents (grade >= min_grade) found in the top k; 0.0 if none exist."""
    _check_min_grade(min_grade)
    top = _top(ranked_ids, k)
    relevant = sum(1 for g in qrels.values() if g >= min_grade)
    if relevant == 0:
        return 0.0
    return sum(1 for doc_id in top if qrels.get(doc_id, 0) >= min_grade) / relevant


def evaluate_per_query(
    run: Mapping[str, Sequence[str]],
    qrels: Qrels,
    *,
    ndcg_k: int = 10,
    mrr_k: int = 10,
    recall_k: int = 100,
    min_grade: int = 1,
    complete: bool = False,
) -> dict[str, dict[str, float]]:
    """``{qid: {"ndcg@10": .., "mrr@10": .., "recall@100": ..}}`` over the queries that count.

    ``run`` maps each qid to its doc ids best first (:func:`rank_run` turns scores into that).
    Per-query values are what paired significance tests and per-query regressions need.
    ``min_grade`` applies to MRR and recall only; nDCG always uses the grades themselves.
    """
    qids = list(qrels) if complete else [q for q in qrels if q in run]
    if not qids:
        raise ValueError("no query is both judged and ranked: do the run's qids match the qrels'?")
    names = (f"ndcg@{ndcg_k}", f"mrr@{mrr_k}", f"recall@{recall_k}")
    out: dict[str, dict[str, float]] = {}
    for qid in qids:
        ranked, judged = run.get(qid, ()), qrels[qid]
        values = (
            ndcg_at_k(ranked, judged, ndcg_k),
            mrr_at_k(ranked, judged, mrr_k, min_grade),
            recall_at_k(ranked, judged, recall_k, min_grade),
        )
        out[qid] = dict(zip(names, values, strict=True))
    return out


def evaluate(
    run: Mapping[str, Sequence[str]],
    qrels: Qrels,
    *,
    ndcg_k: int = 10,
    mrr_k: int = 10,
    recall_k: int = 100,
    min_grade: int = 1,
    complete: bool = False,
) -> dict[str, float]:
    """Means of :func:`evaluate_per_query`, plus ``num_q``: how many queries were averaged.

    ``num_q`` is reported because a qid mismatch silently shrinks the average otherwise; trec_eval
    prints it for the same reason.
    """
    per_query = evaluate_per_query(
        run,
        qrels,
        ndcg_k=ndcg_k,
        mrr_k=mrr_k,
        recall_k=recall_k,
        min_grade=min_grade,
        complete=complete,
    )
    n = len(per_query)
    names = next(iter(per_query.values())).keys()
    means = {name: math.fsum(v[name] for v in per_query.values()) / n for name in names}
    return {**means, "num_q": float(n)}


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """TREC qrels, ``qid iteration docid grade`` per line; the iteration column is ignored.

    A repeated (qid, docid) raises ValueError, as in trec_eval: which grade wins would be arbitrary.
    """
    qrels: dict[str, dict[str, int]] = {}
    for lineno, fields in _rows(path, 4, "qid iteration docid grade"):
        qid, _, doc_id, grade = fields
        judged = qrels.setdefault(qid, {})
        if doc_id in judged:
            raise ValueError(f"{path}:{lineno}: doc {doc_id!r} judged twice for query {qid!r}")
        try:
            judged[doc_id] = int(grade)
        except ValueError:
            raise ValueError(f"{path}:{lineno}: grade {grade!r} is not an integer") from None
    return qrels


def read_run(path: str | Path) -> dict[str, dict[str, float]]:
    """TREC run, ``qid Q0 docid rank score tag`` per line, as ``{qid: {docid: score}}``.

    The rank column is dropped on purpose: trec_eval orders by score (:func:`rank_run`), and a run
    whose ranks disagree with its scores is scored by its scores.
    """
    run: dict[str, dict[str, float]] = {}
    for lineno, fields in _rows(path, 6, "qid Q0 docid rank score tag"):
        qid, _, doc_id, _, score, _ = fields
        scores = run.setdefault(qid, {})
        if doc_id in scores:
            raise ValueError(f"{path}:{lineno}: doc {doc_id!r} listed twice for query {qid!r}")
        try:
            scores[doc_id] = float(score)
        except ValueError:
            raise ValueError(f"{path}:{lineno}: score {score!r} is not a number") from None
    return run


def _rows(path: str | Path, width: int, layout: str) -> list[tuple[int, list[str]]]:
    """Whitespace-split non-blank lines with their 1-based numbers, each exactly ``width`` fields."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != width:
                raise ValueError(f"{path}:{lineno}: expected '{layout}', got {line.strip()!r}")
            rows.append((lineno, fields))
    return rows
