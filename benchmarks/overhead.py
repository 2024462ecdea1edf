"""What the proxy itself costs: latency through the proxy vs straight to the same Elasticsearch.

One run, one machine, ratios (this machine is noisy; absolute figures move, ratios much less):
- pass-through: GET /{index}/_doc/{id};
- search with reranking off (X-Rerank-Enabled: false): the search path's parsing and relaying;
- reranked search (top_k as configured, size 10) vs the plain Elasticsearch search, with the time
  the model took (X-Rerank-Took-Ms) reported apart;
- the same reranked search with ``Accept-Encoding: gzip`` (Elasticsearch compresses, so the proxy
  decompresses, reranks and compresses again);
- an ``_msearch`` of 5 reranked searches (their pairs share the model's batches) vs the same
  ``_msearch`` straight to Elasticsearch;
- shadow mode: a second proxy process started with ``--rerank-mode shadow`` answers the same search
  with Elasticsearch's own answer and scores its hits in the background; interleaved with the search
  straight to Elasticsearch, the serving proxy's pass-through (``X-Rerank-Enabled: false``) and the
  shadow proxy's own pass-through, so what shadow mode adds over a pass-through is read in one run;
- observability: what the metrics and the access log cost a request. Two more proxy processes, both
  logging at info level to a file: one as shipped (metrics recorded, an access line per request), one
  with ``--server-access-log false`` and the metrics' recording turned off (this script launches it
  through :func:`serve_without_metrics`); the same requests to both, interleaved.

The corpus and queries are NovelEval's (../shared/data/noveleval). The proxy runs as a separate
``rerank-proxy`` process, as in production. Without --model, a tiny random cross-encoder is built
on the spot (mechanics only: its scores mean nothing, and its speed is no real model's).

    python benchmarks/overhead.py [--es-url URL] [--model PATH] [--top-k 100] [--requests 200]
        [--cases ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import datasets
from benchmarks.common import ROOT, elasticsearch, free_port, machine, model_folder, pct, proxy_process

INDEX = "bench-noveleval"
CASES = (
    "pass_through_get",
    "search_rerank_off",
    "search_reranked",
    "search_reranked_gzip",
    "msearch_5_reranked",
)
SHADOW_CASE = "search_shadow"
OBSERVABILITY_CASE = "observability"
WITHOUT_METRICS = "--serve-without-metrics"  # argv[1] of this script when it runs a proxy itself


def serve_without_metrics(argv: list[str]) -> None:
    """``rerank-proxy`` with the metrics' recording turned off, for the observability case only: the
    command has no such setting, since a served proxy always records them."""
    import proxy.app
    from proxy.cli import main as cli_main
    from proxy.metrics import METRICS_KEY

    make = proxy.app.create_app

    def without_metrics(*args: Any, **kwargs: Any) -> Any:
        app = make(*args, **kwargs)
        app[METRICS_KEY].enabled = False
        return app

    proxy.app.create_app = without_metrics
    raise SystemExit(cli_main(argv))


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


async def compare_shadow(
    session: aiohttp.ClientSession,
    es: str,
    serve: str,
    shadow: tuple[str, str],
    n: int,
    request: Any,
) -> dict[str, Any]:
    """The same search four ways per round: straight to Elasticsearch, the serving proxy's
    pass-through, the shadow proxy's pass-through, and the shadow proxy in shadow mode, the order
    rotated every round so no way always follows the shadow search's background work. What the
    shadow search adds over each, at p50 and as the median of the per-round differences. Then the
    shadow proxy's own count of the comparisons it made (the background work really ran), once they
    are all done (or after 60 s). ``shadow``: the shadow proxy's URL and its admin listener's."""
    shadow, shadow_admin = shadow
    off = {"X-Rerank-Enabled": "false"}
    ways = ("direct", "serve_off", "shadow_off", "shadow")
    times: dict[str, list[float]] = {way: [] for way in ways}
    statuses: set[str] = set()
    async with session.get(f"{shadow_admin}/_rerank/stats") as resp:
        before = (await resp.json())["shadow"]
    for i in range(n):
        method, path, kw = request(i)
        headers = kw.get("headers", {})
        for way in ways[i % 4 :] + ways[: i % 4]:
            base = es if way == "direct" else serve if way == "serve_off" else shadow
            sent = kw if way in ("direct", "shadow") else {**kw, "headers": {**headers, **off}}
            ms, got = await timed(session, method, base + path, **sent)
            times[way].append(ms)
            if way == "shadow":
                statuses.add(f"{got.get('X-Rerank-Status')}/{got.get('X-Rerank-Reason')}")
    done = 0
    for _ in range(600):  # the comparisons run after the answers: wait for them before reading
        async with session.get(f"{shadow_admin}/_rerank/stats") as resp:
            stats = await resp.json()
        done = sum(stats["shadow"][k] - before[k] for k in ("compared", "dropped", "unscorable"))
        if done >= n:
            break
        await asyncio.sleep(0.1)
    p50 = {k: statistics.median(v) for k, v in times.items()}

    def paired(a: str, b: str) -> float:
        return statistics.median(x - y for x, y in zip(times[a], times[b], strict=True))

    return {
        **{f"{k}_p50_ms": v for k, v in p50.items()},
        **{f"{k}_p95_ms": pct(v, 0.95) for k, v in times.items()},
        "shadow_added_p50_ms_vs_direct": p50["shadow"] - p50["direct"],
        "shadow_added_p50_ms_vs_pass_through": p50["shadow"] - p50["serve_off"],
        "shadow_added_p50_ms_vs_own_pass_through": p50["shadow"] - p50["shadow_off"],
        "pass_through_added_p50_ms_vs_direct": p50["serve_off"] - p50["direct"],
        "paired_median_ms_shadow_minus_pass_through": paired("shadow", "serve_off"),
        "paired_median_ms_shadow_minus_own_pass_through": paired("shadow", "shadow_off"),
        "paired_median_ms_pass_through_minus_direct": paired("serve_off", "direct"),
        "searches": n,
        "comparisons_finished": done,
        "shadow_statuses": sorted(statuses),
        "shadow_stats": stats.get("shadow"),
    }


async def compare_observability(
    session: aiohttp.ClientSession, on: str, off: str, n: int, request: Any
) -> dict[str, Any]:
    """The same request to the proxy as shipped (``on``) and to one without metrics or access log
    (``off``), the order swapped every round; p50s and the median of the per-round differences."""
    times: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(n):
        method, path, kw = request(i)
        for way in ("on", "off") if i % 2 == 0 else ("off", "on"):
            times[way].append((await timed(session, method, (on if way == "on" else off) + path, **kw))[0])
    return {
        "on_p50_ms": statistics.median(times["on"]),
        "off_p50_ms": statistics.median(times["off"]),
        "added_p50_ms": statistics.median(times["on"]) - statistics.median(times["off"]),
        "paired_median_ms_on_minus_off": statistics.median(
            a - b for a, b in zip(times["on"], times["off"], strict=True)
        ),
        "requests": n,
    }


async def requests_recorded(session: aiohttp.ClientSession, admin: str) -> float:
    """The sum of ``rerank_proxy_requests_total`` on a proxy's admin listener."""
    async with session.get(f"{admin}/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("rerank_proxy_requests_total{")
    )


async def run(
    es: str,
    proxy: str,
    n: int,
    docs: list[tuple[str, str]],
    queries: list[str],
    shadow: tuple[str, str] | None = None,
    cases: Sequence[str] = (*CASES, SHADOW_CASE),
    observed: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """The chosen cases, in :data:`CASES` order with shadow mode first (it needs ``shadow``: the
    shadow proxy's URL and admin URL) and the observability case last (``observed``: the URLs of the
    proxy as shipped and of the one without metrics or access log, then their admin URLs)."""
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
        out: dict[str, Any] = {}
        if SHADOW_CASE in cases and shadow is not None:
            await compare_shadow(session, es, proxy, shadow, 10, search(plain))  # warm-up
            out[SHADOW_CASE] = await compare_shadow(session, es, proxy, shadow, n, search(plain))
        runs: dict[str, tuple[int, Any]] = {
            "pass_through_get": (n, get),
            "search_rerank_off": (n, search({**plain, "X-Rerank-Enabled": "false"})),
            "search_reranked": (reranked, search(plain)),
            "search_reranked_gzip": (reranked, search({"Accept-Encoding": "gzip"})),
            "msearch_5_reranked": (max(10, reranked // 4), msearch),
        }
        for case, (count, request) in runs.items():
            if case in cases:
                out[case] = await compare(session, es, proxy, count, request)
        if OBSERVABILITY_CASE in cases and observed is not None:
            on, off, on_admin, off_admin = observed
            await compare_observability(session, on, off, 10, search(plain))  # warm-up
            out[OBSERVABILITY_CASE] = {
                case: await compare_observability(session, on, off, count, request)
                for case, (count, request) in runs.items()
                if case in ("pass_through_get", "search_rerank_off", "search_reranked")
            }
            # Proof that the two differ as intended: what each one's metrics counted.
            out[OBSERVABILITY_CASE]["requests_recorded"] = {
                "on": await requests_recorded(session, on_admin),
                "off": await requests_recorded(session, off_admin),
            }
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--es-url", help="a running Elasticsearch (default: start one with scripts/elasticsearch.sh)"
    )
    ap.add_argument("--model", help="cross-encoder folder or id (default: a tiny local one)")
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "overhead.json"))
    ap.add_argument(
        "--cases",
        nargs="+",
        choices=(*CASES, SHADOW_CASE, OBSERVABILITY_CASE),
        default=[*CASES, SHADOW_CASE, OBSERVABILITY_CASE],
        help="(default: all)",
    )
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    docs, queries = load_noveleval()

    with elasticsearch(args.es_url) as es_url, tempfile.TemporaryDirectory() as tmp:
        model, _, _ = model_folder(args.model or "tiny", Path(tmp), [t for _, t in docs])
        flags = ["--rerank-top-k", str(args.top_k), "--rerank-timeout-ms", "60000"]
        with contextlib.ExitStack() as stack:
            proxy_url, _ = stack.enter_context(proxy_process(es_url, model, *flags))
            shadow = observed = None
            if SHADOW_CASE in args.cases:
                admin = free_port()
                shadow_flags = (*flags, "--rerank-mode", "shadow", "--server-admin-port", str(admin))
                shadow_url, _ = stack.enter_context(proxy_process(es_url, model, *shadow_flags))
                shadow = (shadow_url, f"http://127.0.0.1:{admin}")
            if OBSERVABILITY_CASE in args.cases:
                log = stack.enter_context(open(Path(tmp) / "proxies.log", "w"))
                info = (*flags, "--server-log-level", "info")
                admins = free_port(), free_port()
                on, _ = stack.enter_context(
                    proxy_process(es_url, model, *info, "--server-admin-port", str(admins[0]), stderr=log)
                )
                off, _ = stack.enter_context(
                    proxy_process(
                        es_url,
                        model,
                        *info,
                        "--server-access-log",
                        "false",
                        "--server-admin-port",
                        str(admins[1]),
                        launcher=(__file__, WITHOUT_METRICS),
                        stderr=log,
                    )
                )
                observed = (on, off, *(f"http://127.0.0.1:{port}" for port in admins))
            result = asyncio.run(
                run(es_url, proxy_url, args.requests, docs, queries, shadow, args.cases, observed)
            )
    result["setup"] = {
        "model": args.model or "tiny random BERT (2 layers, hidden 32), built locally",
        "top_k": args.top_k,
        "requests": args.requests,
        "corpus": "NovelEval (420 passages, 21 queries)",
        "machine": machine(),
        "load_average_after": os.getloadavg(),
        "cases": args.cases,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'case':<20}{'direct p50':>12}{'proxy p50':>12}{'ratio':>8}{'added ms':>10}{'scoring':>10}")
    for case in (c for c in CASES if c in result):
        r = result[case]
        print(
            f"{case:<20}{r['direct_p50_ms']:>12.2f}{r['proxy_p50_ms']:>12.2f}{r['p50_ratio']:>8.2f}"
            f"{r['added_p50_ms']:>10.2f}{r.get('scoring_p50_ms', float('nan')):>10.2f}"
        )
    if "search_reranked_gzip" in result and "search_reranked" in result:
        gzip_cost = result["search_reranked_gzip"]["added_p50_ms_excluding_scoring"]
        plain_cost = result["search_reranked"]["added_p50_ms_excluding_scoring"]
        print(
            f"compression costs the proxy {gzip_cost - plain_cost:.2f} ms a reranked search "
            "(p50, scoring excluded)"
        )
    r = result.get(SHADOW_CASE)
    if r:
        added = r["shadow_added_p50_ms_vs_pass_through"]
        own = r["shadow_added_p50_ms_vs_own_pass_through"]
        print(
            f"shadow mode: p50 direct {r['direct_p50_ms']:.2f} ms, pass-through {r['serve_off_p50_ms']:.2f}"
            f" ms, shadow {r['shadow_p50_ms']:.2f} ms: adds {added:.2f} ms over pass-through ({own:.2f} ms"
            f" over its own), {r['shadow_added_p50_ms_vs_direct']:.2f} ms over direct; paired medians:"
            f" {r['paired_median_ms_shadow_minus_pass_through']:.2f} ms over pass-through,"
            f" {r['paired_median_ms_shadow_minus_own_pass_through']:.2f} ms over its own;"
            f" shadow stats {r['shadow_stats']}"
        )
    for case, r in result.get(OBSERVABILITY_CASE, {}).items():
        if case == "requests_recorded":
            continue
        print(
            f"metrics and access log, {case}: p50 {r['on_p50_ms']:.3f} ms on, {r['off_p50_ms']:.3f} ms off;"
            f" median per-round difference {r['paired_median_ms_on_minus_off']:.3f} ms"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    if sys.argv[1:2] == [WITHOUT_METRICS]:
        serve_without_metrics(sys.argv[2:])
    main()
