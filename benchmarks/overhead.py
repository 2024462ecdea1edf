"""What the proxy itself costs: latency through the proxy vs straight to the same Elasticsearch.

One run, one machine, ratios (this machine is noisy; absolute figures move, ratios much less):
- pass-through: GET /{index}/_doc/{id};
- search with reranking off (X-Rerank-Enabled: false): the search path's parsing and relaying;
- reranked search (top_k as configured, size 10) vs the plain Elasticsearch search, with the time
  the model took (X-Rerank-Took-Ms) reported apart;
- the same reranked search with ``Accept-Encoding: gzip`` (Elasticsearch compresses, so the proxy
  decompresses, reranks and compresses again);
- an ``_msearch`` of 5 reranked searches (their pairs share the model's batches) vs the same
  ``_msearch`` straight to Elasticsearch.

The corpus and queries are NovelEval's (../shared/data/noveleval). The proxy runs as a separate
``rerank-proxy`` process, as in production. Without --model, a tiny random cross-encoder is built
on the spot (mechanics only: its scores mean nothing, and its speed is no real model's).

    python benchmarks/overhead.py [--es-url URL] [--model PATH] [--top-k 100] [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import datasets
from benchmarks.common import ROOT, elasticsearch, machine, model_folder, pct, proxy_process

INDEX = "bench-noveleval"
CASES = (
    "pass_through_get",
    "search_rerank_off",
    "search_reranked",
    "search_reranked_gzip",
    "msearch_5_reranked",
)


def load_noveleval() -> tuple[list[tuple[str, str]], list[str]]:
    try:
        col = datasets.noveleval()
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"overhead.py: {exc}") from None
    return list(col.corpus.items()), list(col.queries.values())


async def timed(session: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    async with session.request(method, url, **kw) as resp:
        await resp.read()  # aiohttp decompresses gzip here, as a client would
        if resp.status >= 400:
            raise SystemExit(f"overhead.py: {method} {url} answered {resp.status}")
        return (time.perf_counter() - start) * 1000, resp.headers


async def compare(
    session: aiohttp.ClientSession, es: str, proxy: str, n: int, request: Any
) -> dict[str, Any]:
    """Interleave direct and proxied requests so drift on the machine hits both alike."""
    direct, proxied, took = [], [], []
    for i in range(n):
        method, path, kw = request(i)
        direct.append((await timed(session, method, es + path, **kw))[0])
        ms, headers = await timed(session, method, proxy + path, **kw)
        proxied.append(ms)
        if "X-Rerank-Took-Ms" in headers:
            took.append(float(headers["X-Rerank-Took-Ms"]))
    out = {
        "direct_p50_ms": statistics.median(direct),
        "proxy_p50_ms": statistics.median(proxied),
        "direct_p95_ms": pct(direct, 0.95),
        "proxy_p95_ms": pct(proxied, 0.95),
        "p50_ratio": statistics.median(proxied) / statistics.median(direct),
        "added_p50_ms": statistics.median(proxied) - statistics.median(direct),
    }
    if took:
        out["scoring_p50_ms"] = statistics.median(took)
        out["added_p50_ms_excluding_scoring"] = out["added_p50_ms"] - out["scoring_p50_ms"]
    return out


async def run(es: str, proxy: str, n: int, docs: list[tuple[str, str]], queries: list[str]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        await session.delete(f"{es}/{INDEX}")
        await session.put(f"{es}/{INDEX}", json={"settings": {"number_of_replicas": 0}})
        bulk = "".join(
            json.dumps({"index": {"_index": INDEX, "_id": i}}) + "\n" + json.dumps({"text": t}) + "\n"
            for i, t in docs
        )
        await session.post(
            f"{es}/_bulk?refresh=true", data=bulk, headers={"Content-Type": "application/x-ndjson"}
        )
        ids = [d[0] for d in docs]

        def get(i: int) -> Any:
            return "GET", f"/{INDEX}/_doc/{ids[i % len(ids)]}", {}

        def search(headers: dict[str, str]) -> Any:
            def make(i: int) -> Any:
                body = {"query": {"match": {"text": queries[i % len(queries)]}}, "size": 10}
                return "POST", f"/{INDEX}/_search", {"json": body, "headers": headers}

            return make

        def msearch(i: int) -> Any:
            lines = "".join(
                json.dumps({"index": INDEX})
                + "\n"
                + json.dumps({"query": {"match": {"text": queries[(i * 5 + j) % len(queries)]}}, "size": 10})
                + "\n"
                for j in range(5)
            )
            headers = {"Content-Type": "application/x-ndjson", **plain}
            return "POST", "/_msearch", {"data": lines, "headers": headers}

        plain = {"Accept-Encoding": "identity"}  # aiohttp asks for gzip unless told otherwise
        await compare(session, es, proxy, 10, search(plain))  # warm-up: model, pools, ES caches
        reranked = max(20, n // 5)
        return {
            "pass_through_get": await compare(session, es, proxy, n, get),
            "search_rerank_off": await compare(
                session, es, proxy, n, search({**plain, "X-Rerank-Enabled": "false"})
            ),
            "search_reranked": await compare(session, es, proxy, reranked, search(plain)),
            "search_reranked_gzip": await compare(
                session, es, proxy, reranked, search({"Accept-Encoding": "gzip"})
            ),
            "msearch_5_reranked": await compare(session, es, proxy, max(10, reranked // 4), msearch),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--es-url", help="a running Elasticsearch (default: start one with scripts/elasticsearch.sh)"
    )
    ap.add_argument("--model", help="cross-encoder folder or id (default: a tiny local one)")
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "overhead.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    docs, queries = load_noveleval()

    with elasticsearch(args.es_url) as es_url, tempfile.TemporaryDirectory() as tmp:
        model, _, _ = model_folder(args.model or "tiny", Path(tmp), [t for _, t in docs])
        flags = ["--rerank-top-k", str(args.top_k), "--rerank-timeout-ms", "60000"]
        with proxy_process(es_url, model, *flags) as (proxy_url, _proc):
            result = asyncio.run(run(es_url, proxy_url, args.requests, docs, queries))
    result["setup"] = {
        "model": args.model or "tiny random BERT (2 layers, hidden 32), built locally",
        "top_k": args.top_k,
        "requests": args.requests,
        "corpus": "NovelEval (420 passages, 21 queries)",
        "machine": machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'case':<20}{'direct p50':>12}{'proxy p50':>12}{'ratio':>8}{'added ms':>10}{'scoring':>10}")
    for case in CASES:
        r = result[case]
        print(
            f"{case:<20}{r['direct_p50_ms']:>12.2f}{r['proxy_p50_ms']:>12.2f}{r['p50_ratio']:>8.2f}"
            f"{r['added_p50_ms']:>10.2f}{r.get('scoring_p50_ms', float('nan')):>10.2f}"
        )
    gzip_cost = result["search_reranked_gzip"]["added_p50_ms_excluding_scoring"]
    plain_cost = result["search_reranked"]["added_p50_ms_excluding_scoring"]
    print(
        f"compression costs the proxy {gzip_cost - plain_cost:.2f} ms a reranked search "
        "(p50, scoring excluded)"
    )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
