"""benchmarks.datasets: the collections load with their documented sizes, XQuAD de/en stay aligned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.datasets import DEFAULT_ROOT, Collection, load, noveleval, trec_dl19, xquad
from proxy.relevance import evaluate, rank_run

needs_data = pytest.mark.skipif(
    not (DEFAULT_ROOT / "README.md").is_file(),
    reason=f"evaluation data not found at {DEFAULT_ROOT} (CI has ../shared/data)",
)


def _judgements(c: Collection) -> int:
    return sum(len(judged) for judged in c.qrels.values())


@pytest.fixture(scope="module")
def dl19() -> Collection:
    return trec_dl19()


@pytest.fixture(scope="module")
def de_de() -> Collection:
    return xquad(query_lang="de", passage_lang="de")


@pytest.fixture(scope="module")
def de_en() -> Collection:
    return xquad(query_lang="de", passage_lang="en")


@needs_data
def test_trec_dl19_sizes_and_grades(dl19: Collection) -> None:
    assert (len(dl19.queries), len(dl19.corpus), len(dl19.qrels), _judgements(dl19)) == (
        43,
        14_581,
        43,
        9_260,
    )
    assert set(dl19.queries) == set(dl19.qrels)
    assert {g for judged in dl19.qrels.values() for g in judged.values()} == {0, 1, 2, 3}
    assert dl19.relevant_min_grade == 2
    assert dl19.bm25_run is not None
    assert set(dl19.bm25_run) == set(dl19.qrels)
    assert all(len(scores) == 100 for scores in dl19.bm25_run.values())
    # The pool holds every BM25 top-100 passage, so the run can be replayed through Elasticsearch.
    assert all(doc in dl19.corpus for scores in dl19.bm25_run.values() for doc in scores)
    assert all(text for text in dl19.corpus.values())


@needs_data
def test_trec_dl19_bm25_run_scores_the_published_figures(dl19: Collection) -> None:
    assert dl19.bm25_run is not None
    run = {qid: rank_run(scores) for qid, scores in dl19.bm25_run.items()}
    result = evaluate(run, dl19.qrels, min_grade=dl19.relevant_min_grade)
    assert (round(result["ndcg@10"], 4), round(result["mrr@10"], 4)) == (0.5058, 0.7024)


@needs_data
def test_noveleval_sizes_and_quoted_passages() -> None:
    c = noveleval()
    assert (len(c.queries), len(c.corpus), len(c.qrels), _judgements(c)) == (21, 420, 21, 420)
    assert all(len(judged) == 20 and set(judged) <= set(c.corpus) for judged in c.qrels.values())
    assert c.bm25_run is None and c.relevant_min_grade == 2
    assert all(any(g >= 2 for g in judged.values()) for judged in c.qrels.values())
    # CSV-quoted in the file: the quotes are unwrapped, doubled quotes collapsed, inner tabs kept.
    assert c.corpus["0-4"].startswith('"The exact number? Oh boy,')
    assert c.corpus["14-17"].startswith("Top earning footballers June/July 2023 Player\tClub\t")
    assert not any(text.startswith('"""') for text in c.corpus.values())


@needs_data
@pytest.mark.parametrize("lang", ["de", "en"])
def test_xquad_sizes_per_language(lang: str) -> None:
    c = xquad(query_lang=lang, passage_lang=lang)
    assert c.name == f"xquad-{lang}-{lang}"
    assert (len(c.queries), len(c.corpus), len(c.qrels)) == (1_190, 240, 1_190)
    assert all(
        judged.keys() <= c.corpus.keys() and list(judged.values()) == [1] for judged in c.qrels.values()
    )
    assert c.relevant_min_grade == 1


@needs_data
def test_xquad_cross_lingual_pairs_german_questions_with_english_paragraphs(
    de_de: Collection, de_en: Collection
) -> None:
    assert de_en.name == "xquad-de-en"
    assert de_en.queries == de_de.queries  # German questions in both
    assert de_en.qrels == de_de.qrels  # the same paragraph ids are relevant
    assert de_en.corpus.keys() == de_de.corpus.keys()
    assert all(de_en.corpus[d] != de_de.corpus[d] for d in de_en.corpus)  # but in English
    assert de_de.corpus["Super_Bowl_50-0"].startswith("Die Verteidigung der Panthers")
    assert de_en.corpus["Super_Bowl_50-0"].startswith("The Panthers defense")


@needs_data
@pytest.mark.parametrize("lang", ["de", "en"])
def test_xquad_relevant_passage_contains_the_answer(de_de: Collection, de_en: Collection, lang: str) -> None:
    """Alignment checked on content: each question's answer, in `lang`, is in its relevant passage."""
    collection = de_de if lang == "de" else de_en
    data = json.loads((DEFAULT_ROOT / "xquad" / f"xquad.{lang}.json").read_text(encoding="utf-8"))
    answers = {
        qa["id"]: qa["answers"][0]["text"] for a in data["data"] for p in a["paragraphs"] for qa in p["qas"]
    }
    assert answers.keys() == collection.qrels.keys()
    for qid, judged in collection.qrels.items():
        (doc_id,) = judged
        assert answers[qid] in collection.corpus[doc_id], qid


def test_missing_data_folder_names_the_missing_file(tmp_path: Path) -> None:
    for loader, missing in (
        (trec_dl19, "corpus.jsonl"),
        (noveleval, "queries.tsv"),
        (xquad, "xquad.de.json"),
    ):
        with pytest.raises(FileNotFoundError, match=missing) as err:
            loader(tmp_path / "absent")
        assert "\n" not in str(err.value)


def _squad(path: Path, title: str, question_ids: list[str]) -> None:
    qas = [{"id": q, "question": f"question {q}?", "answers": []} for q in question_ids]
    article = {"title": title, "paragraphs": [{"context": f"context of {title}", "qas": qas}]}
    path.write_text(json.dumps({"version": "1.1", "data": [article]}), encoding="utf-8")


def test_xquad_refuses_files_that_are_not_parallel(tmp_path: Path) -> None:
    folder = tmp_path / "xquad"
    folder.mkdir()
    _squad(folder / "xquad.de.json", "A", ["q1", "q2"])
    _squad(folder / "xquad.en.json", "A", ["q1", "q3"])
    assert xquad(tmp_path, "de", "de").qrels == {"q1": {"A-0": 1}, "q2": {"A-0": 1}}
    with pytest.raises(ValueError, match="different question ids"):
        xquad(tmp_path, "de", "en")
    _squad(folder / "xquad.en.json", "B", ["q1", "q2"])
    with pytest.raises(ValueError, match="different articles"):
        xquad(tmp_path, "de", "en")


def test_unknown_names_and_languages_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown collection 'msmarco'"):
        load("msmarco", tmp_path)
    with pytest.raises(ValueError, match="language 'fr' not available"):
        xquad(tmp_path, "fr", "en")
