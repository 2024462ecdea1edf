"""Scoring on a remote inference server: the :class:`~proxy.scorer.Scorer` protocol over HTTP.

Two APIs (``rerank.backend``):

* ``cohere``: ``POST {"model", "query", "documents", "return_documents": false}`` answered with
  ``{"results": [{"index", "relevance_score"}]}``: infinity-emb, vLLM, Jina and Cohere serve it;
* ``tei``: Hugging Face text-embeddings-inference, ``POST {"query", "texts", "truncate": true,
  "raw_scores": true}`` answered with ``[{"index", "score"}]``. Raw scores (logits) are what the local
  engine serves too, and unlike sigmoid outputs they never saturate into ties; ``truncate`` because
  TEI refuses a passage longer than the model's input instead of cutting it, as everyone else does.

Results come back in the server's order (by score, usually) and are mapped back by ``index``; an
answer that is not exactly one finite score per passage sent is an error, never a partial ranking.

A search longer than ``rerank.backend_max_documents`` passages is sent as several calls at once over
one pooled session (``rerank.backend_max_connections``). A rerank call is a pure function, so a call
that got no answer (connection refused or reset, 502, 503) is sent once more at once if its time is not
up; a 4xx, a 500 or a timeout is never retried, since the same call would fail the same way. Every call
runs under a client timeout no longer than what is left of ``rerank.timeout_ms``, which the search
pipeline also applies around :meth:`RemoteScorer.score`.

This module is the only one on this path that sees aiohttp's client exceptions. They leave as the
search pipeline's reasons (``proxy/search.py``): :class:`BackendUnavailable` (``backend_unavailable``),
:class:`BackendOverloaded` and :class:`~proxy.batching.QueueFull` (``overloaded``), ``TimeoutError``
(``rerank_timeout``) and :class:`RemoteError` (``rerank_error``), the cause kept. The API key goes
into the ``Authorization`` header and nowhere else: not in a log line, not in an exception's text.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson

from .batching import QueueFull, Shed
from .config import RerankConfig, mask_url
from .runtime import ModelLoadError
from .score_cache import ScoreCache, through_cache

log = logging.getLogger(__name__)

__all__ = ["BackendOverloaded", "BackendUnavailable", "RemoteError", "RemoteScorer", "open_remote_scorer"]

PROBE_TIMEOUT_S = 30.0  # the start-up call: a server's first call may load or compile its model
_RETRIED_STATUS = frozenset({502, 503})  # a proxy in front found no live server, or it is restarting


class BackendUnavailable(Shed):
    """The rerank server gave no answer: refused, reset, unreachable, or a gateway said 502/503/504."""

    reason = "backend_unavailable"


class BackendOverloaded(Shed):
    """The rerank server answered 429: it is shedding load, so this search is answered unscored."""

    reason = "overloaded"


class RemoteError(RuntimeError):
    """The rerank server answered, but with an error (``status``) or not with a ranking of the
    passages sent (``status`` 200, or None when the HTTP exchange itself broke)."""

    def __init__(self, message: str, status: int | None = 200) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Api:
    """One rerank API: the request body for a call and how to read its answer."""

    body: Callable[[RerankConfig, str, Sequence[str]], dict[str, Any]]
    pairs: Callable[[Any], Iterable[tuple[Any, Any]]]  # (index, score) per result entry


def _cohere_pairs(data: Any) -> Iterable[tuple[Any, Any]]:
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list):
        raise RemoteError('the answer has no "results" list')
    return [(r.get("index"), r.get("relevance_score")) if isinstance(r, dict) else (r, None) for r in results]


def _tei_pairs(data: Any) -> Iterable[tuple[Any, Any]]:
    if not isinstance(data, list):
        raise RemoteError("the answer is not a list of ranks")
    return [(r.get("index"), r.get("score")) if isinstance(r, dict) else (r, None) for r in data]


APIS = {
    "cohere": Api(
        lambda cfg, q, docs: {
            "model": cfg.model,
            "query": q,
            "documents": list(docs),
            "return_documents": False,
        },
        _cohere_pairs,
    ),
    "tei": Api(
        lambda cfg, q, docs: {"query": q, "texts": list(docs), "truncate": True, "raw_scores": True},
        _tei_pairs,
    ),
}


def scores_by_index(pairs: Iterable[tuple[Any, Any]], n: int) -> list[float]:
    """One score per passage sent, in the order sent: every index in ``0..n-1`` exactly once, every
    score a finite number (a NaN would order hits arbitrarily)."""
    scores: list[float | None] = [None] * n
    for index, score in pairs:
        if type(index) is not int or not 0 <= index < n:
            raise RemoteError(f"index {index!r} is not one of the {n} passages sent")
        if scores[index] is not None:
            raise RemoteError(f"index {index} is answered twice")
        if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
            raise RemoteError(f"the score of index {index} is not a finite number: {score!r}")
        scores[index] = float(score)
    missing = sum(s is None for s in scores)
    if missing:
        raise RemoteError(f"{missing} of the {n} passages sent got no score")
    return [s for s in scores if s is not None]


def safe_url(url: str) -> str:
    """The URL for logs and errors: no password, no query string (a key may ride there)."""
    parts = urlsplit(mask_url(url))
    return urlunsplit(parts._replace(query="***" if parts.query else "", fragment=""))


class _NoAnswer(Exception):
    """A call that got no answer; worth one more try while time is left."""


class RemoteScorer:
    """A :class:`~proxy.scorer.Scorer` whose model runs behind ``rerank.backend_url``.

    ``max_queued_pairs`` bounds the passages in flight or waiting for a pooled connection, as it bounds
    the local model's queue; ``cache_entries`` keeps scores keyed by model, query and passage.
    """

    def __init__(self, cfg: RerankConfig) -> None:
        if cfg.backend not in APIS or not cfg.backend_url:
            raise ValueError(f"no remote rerank API {cfg.backend!r} at {cfg.backend_url!r}")
        self.cfg = cfg
        self.name = cfg.model
        self.api = APIS[cfg.backend]
        self.url = cfg.backend_url
        self.where = safe_url(cfg.backend_url)
        self.timeout_s = cfg.timeout_ms / 1000
        self.cache = ScoreCache(cfg.cache_entries) if cfg.cache_entries > 0 else None
        self.pending = 0  # passages sent or waiting for a connection
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if cfg.backend_api_key:
            self._headers["Authorization"] = f"Bearer {cfg.backend_api_key}"
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        """The pooled session, made on first use: a session belongs to the loop it was made on."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.cfg.backend_max_connections),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                headers=self._headers,
            )
        return self._session

    async def score(self, query: str, passages: Sequence[str]) -> list[float]:
        return await self._score(query, passages, self.timeout_s)

    async def _score(self, query: str, passages: Sequence[str], budget_s: float) -> list[float]:
        if not passages:
            return []
        deadline = time.monotonic() + budget_s

        async def call(texts: list[str]) -> list[float]:
            limit = self.cfg.max_queued_pairs
            if self.pending + len(texts) > limit:
                raise QueueFull(
                    f"{self.pending} passages already wait for the rerank server (rerank.max_queued_pairs "
                    f"{limit}); this search has {len(texts)}"
                )
            self.pending += len(texts)
            try:
                return await self._chunks(query, texts, deadline)
            finally:
                self.pending -= len(texts)

        return await through_cache(self.cache, self.name, query, passages, call)

    async def _chunks(self, query: str, texts: list[str], deadline: float) -> list[float]:
        """All chunks at once; the first failure cancels the others (their answers are useless)."""
        size = self.cfg.backend_max_documents
        if len(texts) <= size:
            return await self._call(query, texts, deadline)
        tasks = [
            asyncio.ensure_future(self._call(query, texts[i : i + size], deadline))
            for i in range(0, len(texts), size)
        ]
        try:
            parts = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        return [s for part in parts for s in part]

    async def _call(self, query: str, texts: list[str], deadline: float) -> list[float]:
        body = orjson.dumps(self.api.body(self.cfg, query, texts))
        retried = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no time left for the rerank call to {self.where}")
            try:
                data = await self._post(body, left)
            except _NoAnswer as exc:
                if retried or deadline <= time.monotonic():
                    raise BackendUnavailable(f"{self.where}: {exc}") from exc.__cause__
                log.debug("rerank call to %s got no answer (%s); trying once more", self.where, exc)
                retried = True
                continue
            return scores_by_index(self.api.pairs(data), len(texts))

    async def _post(self, body: bytes, left: float) -> Any:
        """The decoded answer of one call, or why not: :class:`_NoAnswer` for what a retry may cure."""
        try:
            async with self._client().post(
                self.url, data=body, timeout=aiohttp.ClientTimeout(total=left), allow_redirects=False
            ) as resp:
                status, raw = resp.status, await resp.read()
        except TimeoutError as exc:  # aiohttp's own timeouts are TimeoutErrors too
            raise TimeoutError(f"the rerank call to {self.where} took over {left * 1000:.0f} ms") from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise _NoAnswer(f"{type(exc).__name__}: {self._redact(str(exc))}") from exc
        except aiohttp.ClientError as exc:
            detail = f"{type(exc).__name__}: {self._redact(str(exc))}"
            raise RemoteError(f"{self.where}: {detail}", status=None) from exc
        if status in _RETRIED_STATUS:
            raise _NoAnswer(f"HTTP {status}")
        if status == 504:  # a gateway's timeout: retrying would wait as long again
            raise BackendUnavailable(f"{self.where}: HTTP 504")
        if status == 429:
            raise BackendOverloaded(f"{self.where}: HTTP 429 {self._snippet(raw)}")
        if status != 200:
            raise RemoteError(f"{self.where} answered HTTP {status}: {self._snippet(raw)}", status)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise RemoteError(f"{self.where} answered with something that is not JSON: {exc}") from exc

    def _snippet(self, raw: bytes) -> str:
        """The start of an error answer, for the log: servers explain their 4xx there."""
        return self._redact(raw[:300].decode("utf-8", "replace").strip())

    def _redact(self, text: str) -> str:
        key = self.cfg.backend_api_key
        return text.replace(key, "***") if key else text

    async def probe(self) -> None:
        """One tiny rerank call, so a wrong URL, key or API shows at start-up, not at the first search."""
        await self._score("warm up query", ["warm up passage"], max(self.timeout_s, PROBE_TIMEOUT_S))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def open_remote_scorer(cfg: RerankConfig) -> RemoteScorer:
    """The remote scorer, probed when ``rerank.warmup`` is set: a server that cannot answer one rerank
    call stops start-up with one line naming the option at fault, as a local model that cannot load
    does. With ``warmup: false`` the proxy starts regardless (searches fall back until it answers)."""
    scorer = RemoteScorer(cfg)
    key = "an API key" if cfg.backend_api_key else "no API key"
    log.info("scorer %s on the %s rerank server at %s (%s)", cfg.model, cfg.backend, scorer.where, key)
    if not cfg.warmup:
        return scorer
    try:
        await scorer.probe()
    except Exception as exc:
        await scorer.aclose()
        refused = isinstance(exc, RemoteError) and exc.status in (401, 403)
        option = "rerank.backend_api_key" if refused else "rerank.backend_url"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        detail = first.replace(f"{scorer.where}: ", "").replace(f"{scorer.where} ", "")  # named once
        raise ModelLoadError(
            f"{option}: a rerank call to the {cfg.backend} server at {scorer.where} failed: {detail}"
        ) from exc
    except BaseException:
        await scorer.aclose()
        raise
    return scorer
