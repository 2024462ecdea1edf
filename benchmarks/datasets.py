"""The evaluation collections in ../shared/data, loaded into one shape for the relevance benchmarks.

The files and their sources are described in ../shared/data/README.md; the build machines cannot
download data, so nothing here fetches anything. Texts are passed on as the collections give them
(stripped of surrounding whitespace) and no collection has a title to prepend:

- ``trec-dl19``: MS MARCO passages have no title; ``corpus.jsonl`` is ``{"id", "text"}``.
- ``noveleval``: ``docid<TAB>text``; 80 passages are CSV-quoted (they contain quotes or tabs), so
  the file is read as tab-separated CSV: splitting lines on the first tab would keep the quoting
  and, for passage ``14-17``, glue a tab-separated table back together wrongly.
- ``xquad-*``: SQuAD's ``title`` is the English Wikipedia article name in *both* languages; it is
  kept out of the text (it would put English into German passages and hand the German->English
  task a lexical shortcut) and used only in the doc id, ``{title}-{paragraph index}``.

Relevance grades, and the ``relevant_min_grade`` the binary measures (MRR, recall) use:

- ``trec-dl19``: 0 irrelevant, 1 related, 2 highly relevant, 3 perfectly relevant. Binary measures
  count grade >= 2, the TREC DL convention; the published BM25 MRR@10 0.7024 is computed that way.
  Qrels judge 9,139 passages, only 4,337 of them in the 14,581-passage pool: nDCG's ideal ranking
  uses all judgements (trec_eval's convention), so a reranker of the pool cannot reach 1.0.
- ``noveleval``: every query-passage pair judged 0 (irrelevant), 1 (partially) or 2 (relevant).
  Binary measures count grade 2 only, by analogy with DL's "related" grade 1: a partially relevant
  passage does not answer the question. Every query has at least one grade-2 passage.
- ``xquad-*``: binary. The paragraph a question was asked on is its one relevant passage (grade 1);
  other paragraphs may happen to answer it too but are unjudged, so scores are lower bounds.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.relevance import read_qrels, read_run

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
XQUAD_LANGS = ("de", "en")


@dataclass(frozen=True)
class Collection:
    """One test collection: what to index (corpus), what to ask (queries) and the judgements."""

    name: str
    queries: dict[str, str]  # qid -> query text
    corpus: dict[str, str]  # docid -> passage text
    qrels: dict[str, dict[str, int]]  # qid -> {docid: grade}
    relevant_min_grade: int  # MRR and recall count a document relevant at this grade or above
    bm25_run: dict[str, dict[str, float]] | None = None  # the published first stage, where supplied


def trec_dl19(root: Path = DEFAULT_ROOT) -> Collection:
    """TREC DL 2019 passages: 43 judged queries, the 14,581-passage pool and Anserini's BM25 top 100."""
    folder = root / "trec-dl19"
    corpus: dict[str, str] = {}
    with open(_need(folder / "corpus.jsonl"), encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                doc = json.loads(line)
                _add_unique(corpus, str(doc["id"]), doc["text"].strip(), f"{f.name}:{lineno}")
    return Collection(
        name="trec-dl19",
        queries=_read_tsv(_need(folder / "queries.tsv")),
        corpus=corpus,
        qrels=read_qrels(_need(folder / "qrels.txt")),
        relevant_min_grade=2,
        bm25_run=read_run(_need(folder / "bm25-top100.run")),
    )


def trec_dl19_or_exit(tool: str, root: Path = DEFAULT_ROOT) -> Collection:
    """:func:`trec_dl19`, or the benchmark ``tool`` stops with one line saying what is missing."""
    try:
        return trec_dl19(root)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"{tool}: {exc}") from None


def noveleval(root: Path = DEFAULT_ROOT) -> Collection:
    """NovelEval-2306: 21 questions on events after mid-2023, 20 judged web passages each."""
    folder = root / "noveleval"
    return Collection(
        name="noveleval",
        queries=_read_tsv(_need(folder / "queries.tsv")),
        corpus=_read_tsv(_need(folder / "corpus.tsv")),
        qrels=read_qrels(_need(folder / "qrels.txt")),
        relevant_min_grade=2,
    )


def xquad(root: Path = DEFAULT_ROOT, query_lang: str = "de", passage_lang: str = "de") -> Collection:
    """XQuAD as retrieval: 1,190 questions over the 240 paragraphs they were asked on.

    The language files are parallel (same articles, paragraphs and question ids, in the same order),
    which is what lets ``query_lang != passage_lang`` pair a German question with the English
    translation of its paragraph; that structure is checked, not assumed.
    """
    for lang in (query_lang, passage_lang):
        if lang not in XQUAD_LANGS:
            raise ValueError(f"xquad: language {lang!r} not available, choose from {XQUAD_LANGS}")
    folder = root / "xquad"
    asked = _squad_articles(_need(folder / f"xquad.{query_lang}.json"))
    answered = _squad_articles(_need(folder / f"xquad.{passage_lang}.json"))
    if [a["title"] for a in asked] != [a["title"] for a in answered]:
        raise ValueError(f"xquad: {query_lang} and {passage_lang} files list different articles")
    queries: dict[str, str] = {}
    corpus: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for q_article, p_article in zip(asked, answered, strict=True):
        title, q_paras, p_paras = q_article["title"], q_article["paragraphs"], p_article["paragraphs"]
        if len(q_paras) != len(p_paras):
            raise ValueError(f"xquad: article {title!r} has a different paragraph count per language")
        for j, (q_para, p_para) in enumerate(zip(q_paras, p_paras, strict=True)):
            doc_id = f"{title}-{j}"
            if [qa["id"] for qa in q_para["qas"]] != [qa["id"] for qa in p_para["qas"]]:
                raise ValueError(f"xquad: paragraph {doc_id!r} has different question ids per language")
            _add_unique(corpus, doc_id, p_para["context"].strip(), "xquad")
            for qa in q_para["qas"]:
                _add_unique(queries, qa["id"], qa["question"].strip(), "xquad")
                qrels[qa["id"]] = {doc_id: 1}
    return Collection(
        name=f"xquad-{query_lang}-{passage_lang}",
        queries=queries,
        corpus=corpus,
        qrels=qrels,
        relevant_min_grade=1,
    )


LOADERS: dict[str, Callable[[Path], Collection]] = {
    "trec-dl19": trec_dl19,
    "noveleval": noveleval,
    "xquad-de-de": lambda root: xquad(root, "de", "de"),
    "xquad-de-en": lambda root: xquad(root, "de", "en"),
    "xquad-en-en": lambda root: xquad(root, "en", "en"),
}


def load(name: str, root: Path = DEFAULT_ROOT) -> Collection:
    """A collection by its name (the keys of LOADERS), for command lines."""
    try:
        loader = LOADERS[name]
    except KeyError:
        raise ValueError(f"unknown collection {name!r}, choose from {sorted(LOADERS)}") from None
    return loader(root)


def _need(path: Path) -> Path:
    """The path itself, or one readable line saying which data file is missing and where to look."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found (the evaluation data is described in ../shared/data/README.md)"
        )
    return path


def _read_tsv(path: Path) -> dict[str, str]:
    """``id<TAB>text`` rows as a dict; fields may be CSV-quoted (NovelEval quotes 80 passages)."""
    rows: dict[str, str] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row:
                continue
            if len(row) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'id<TAB>text', got {len(row)} fields")
            _add_unique(rows, row[0], row[1].strip(), f"{path}:{lineno}")
    return rows


def _squad_articles(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    articles = data.get("data") if isinstance(data, dict) else None
    if not isinstance(articles, list):
        raise ValueError(f"{path}: not SQuAD format (no top-level 'data' list)")
    return articles


def _add_unique(into: dict[str, str], key: str, text: str, where: str) -> None:
    # A repeated id would silently replace a passage or query and shift every count and score.
    if key in into:
        raise ValueError(f"{where}: id {key!r} appears twice")
    into[key] = text
