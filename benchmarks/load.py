"""The engine under load, before and after a change, in one run: a burst and a sustained load.

The searches are the proxy's own: each DL19 query's top-100 from a real Elasticsearch (the DL19 pool
indexed as ``throughput.py`` does), scored as the proxy scores them: ``scorer.score`` under
``asyncio.wait_for(rerank.timeout_ms)``, a :class:`~proxy.batching.Shed` read as its reason, a timeout
as ``rerank_timeout`` (``proxy/search.py``). Both engines share one model object and the shipped
defaults (``max_batch_tokens`` 2048 on CPU, ``max_queued_pairs`` 10,000, ``timeout_ms`` 5,000); the
"before" engine is ``proxy/`` at ``--before`` (a git ref) loaded beside today's.

1. Capacity: what the engine can score, 16 searches submitted together with no deadline (searches/s).
2. Burst: ``--burst`` searches at once (8): how many are reranked, how long each fallback took.
3. Sustained: ``--clients`` closed-loop clients (32) for ``--seconds`` (60): each waits
   ``--upstream-ms`` (the Elasticsearch round trip, simulated so that a fallback answered at once does
   not turn the clients into a CPU-bound loop on the machine that runs the model), then scores its
   next search. Reranked searches/s, p50/p95/p99 latency of the scoring step, outcomes.

    python benchmarks/load.py --before 2abe78a --es-url http://127.0.0.1:9200

Writes ``benchmarks/results/load-<model>-<device>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import datasets
from benchmarks.common import ROOT, baseline_module, baseline_proxy, elasticsearch, machine, model_folder, pct
from benchmarks.throughput import es_candidates, index_pool
from proxy.config import RerankConfig
from proxy.cross_encoder import CrossEncoderModel
from proxy.scorer import EngineScorer, largest_batch, limits_of

Work = list[tuple[str, list[str]]]


def load_note() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


async def rerank(scorer: Any, query: str, passages: list[str], timeout_s: float) -> tuple[str, float]:
    """What ``proxy/search.py`` does around the scorer: the outcome (reason) and seconds taken."""
    started = time.perf_counter()
    try:
        await asyncio.wait_for(scorer.score(query, passages), timeout_s)
        outcome = "reranked"
    except TimeoutError:
        outcome = "rerank_timeout"
    except Exception as exc:
        reason = getattr(exc, "reason", None)
        outcome = (
            reason
            if isinstance(reason, str)
            else "overloaded"
            if type(exc).__name__ == "QueueFull"
            else "rerank_error"
        )
    return outcome, time.perf_counter() - started


async def make_scorer(kind: str, model: Any, cfg: RerankConfig, before: Any, deadlines: bool = True) -> Any:
    if kind == "before":
        old_scorer, old_config = baseline_module(before, "scorer"), baseline_module(before, "config")
        old_cfg = old_config.RerankConfig(max_length=cfg.max_length)
        return old_scorer.EngineScorer(model, old_scorer.limits_of(old_cfg, "cpu"))
    scorer = EngineScorer(model, limits_of(cfg, "cpu"), 0, cfg.timeout_ms if deadlines else None)
    await scorer.calibrate(cfg.max_length, largest_batch(cfg, "cpu"))  # as load_scorer does
    return scorer


async def settle(scorer: Any) -> None:
    """Close the scorer and let a forward pass still on its thread end before the next phase."""
    await scorer.aclose()
    await asyncio.sleep(1.0)


async def capacity(kind: str, model: Any, cfg: RerankConfig, before: Any, work: Work) -> dict[str, Any]:
    scorer = await make_scorer(kind, model, cfg, before, deadlines=False)
    try:
        await scorer.score(*work[0])
        started = time.perf_counter()
        await asyncio.gather(*(scorer.score(q, ps) for q, ps in work[:16]))
        elapsed = time.perf_counter() - started
    finally:
        await settle(scorer)
    pairs = sum(len(ps) for _, ps in work[:16])
    return {"searches": 16, "pairs": pairs, "pairs_per_s": pairs / elapsed, "searches_per_s": 16 / elapsed}


async def burst(kind: str, model: Any, cfg: RerankConfig, before: Any, work: Work, n: int) -> dict[str, Any]:
    scorer = await make_scorer(kind, model, cfg, before)
    try:
        await rerank(scorer, *work[-1], cfg.timeout_ms / 1000)  # the engine has run real traffic
        got = await asyncio.gather(*(rerank(scorer, q, ps, cfg.timeout_ms / 1000) for q, ps in work[:n]))
    finally:
        await settle(scorer)
    fallbacks = [s * 1000 for outcome, s in got if outcome != "reranked"]
    return {
        "searches": n,
        "reranked": sum(outcome == "reranked" for outcome, _ in got),
        "outcomes": [outcome for outcome, _ in got],
        "latencies_ms": [round(s * 1000, 1) for _, s in got],
        "slowest_fallback_ms": max(fallbacks, default=None),
    }


async def sustained(
    kind: str,
    model: Any,
    cfg: RerankConfig,
    before: Any,
    work: Work,
    clients: int,
    seconds: float,
    upstream_ms: float,
) -> dict[str, Any]:
    scorer = await make_scorer(kind, model, cfg, before)
    results: list[tuple[str, float]] = []
    counter = iter(range(10**9))
    started = time.perf_counter()
    stop = started + seconds

    async def client() -> None:
        for i in counter:
            await asyncio.sleep(upstream_ms / 1000)
            if time.perf_counter() >= stop:
                return
            results.append(await rerank(scorer, *work[i % len(work)], cfg.timeout_ms / 1000))

    try:
        await asyncio.gather(*(client() for _ in range(clients)))
    finally:
        await settle(scorer)
    elapsed = time.perf_counter() - started
    outcomes: dict[str, int] = {}
    for outcome, _ in results:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    latencies = [s * 1000 for _, s in results]
    return {
        "clients": clients,
        "seconds": elapsed,
        "searches": len(results),
        "reranked_per_s": outcomes.get("reranked", 0) / elapsed,
        "p50_ms": statistics.median(latencies),
        "p95_ms": pct(latencies, 0.95),
        "p99_ms": pct(latencies, 0.99),
        "max_ms": max(latencies),
        "outcomes": outcomes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="git ref of the engine to compare with (e.g. a commit)")
    ap.add_argument("--model", default="minilm", help="tiny, minilm, or a cross-encoder folder")
    ap.add_argument("--es-url", help="a running Elasticsearch (default: start one with the project's script)")
    ap.add_argument("--burst", type=int, default=8)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--upstream-ms", type=float, default=20.0)
    ap.add_argument(
        "--timeout-ms",
        type=int,
        default=RerankConfig().timeout_ms,
        help="rerank.timeout_ms (default: the shipped one); on a machine busy with other work, a longer "
        "one keeps the timeout's ratio to one search's model time",
    )
    ap.add_argument("--data", type=Path, default=datasets.DEFAULT_ROOT)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    col = datasets.trec_dl19_or_exit("load.py", args.data)
    cfg = RerankConfig(max_length=256, timeout_ms=args.timeout_ms)
    with tempfile.TemporaryDirectory() as tmp:
        before = baseline_proxy(args.before, Path(tmp))
        folder, described, label = model_folder(args.model, Path(tmp), list(col.corpus.values())[:2000])
        model = CrossEncoderModel(folder, max_length=cfg.max_length, device="cpu")
        model.warm_up(largest_batch(cfg, "cpu"))
        with elasticsearch(args.es_url) as es:
            asyncio.run(index_pool(es, col))
            work = asyncio.run(es_candidates(es, list(col.queries.values())))
        work = [(q, ps) for q, ps in work if len(ps) == 100]
        print(f"model: {described}\n{machine()}; {len(work)} searches of 100 pairs\nload: {load_note()}")
        result: dict[str, Any] = {
            "setup": {
                "model": described,
                "before": args.before,
                "after": subprocess.run(
                    ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
                ).stdout.strip()
                + " + working tree",
                "machine": machine(),
                "torch_threads": __import__("torch").get_num_threads(),
                "timeout_ms": cfg.timeout_ms,
                "upstream_ms": args.upstream_ms,
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "load_at_start": load_note(),
                "command": "python benchmarks/load.py " + " ".join(sys.argv[1:]),
            }
        }
        for kind in ("before", "after"):
            row: dict[str, Any] = {"capacity": asyncio.run(capacity(kind, model, cfg, before, work))}
            print(
                f"{kind}: capacity {row['capacity']['searches_per_s']:.3f} searches/s "
                f"({row['capacity']['pairs_per_s']:.1f} pairs/s over {row['capacity']['pairs']} pairs)"
            )
            row["burst"] = asyncio.run(burst(kind, model, cfg, before, work, args.burst))
            b = row["burst"]
            print(
                f"  burst of {b['searches']}: {b['reranked']} reranked; outcomes {b['outcomes']}; "
                f"latencies {b['latencies_ms']} ms"
            )
            row["sustained"] = asyncio.run(
                sustained(kind, model, cfg, before, work, args.clients, args.seconds, args.upstream_ms)
            )
            s = row["sustained"]
            s["reranked_share_of_capacity"] = s["reranked_per_s"] / row["capacity"]["searches_per_s"]
            print(
                f"  {s['clients']} clients {s['seconds']:.0f} s: {s['reranked_per_s']:.3f} reranked/s "
                f"({s['reranked_share_of_capacity']:.0%} of capacity), p50 {s['p50_ms']:.0f} "
                f"p95 {s['p95_ms']:.0f} p99 {s['p99_ms']:.0f} max {s['max_ms']:.0f} ms, {s['outcomes']}"
            )
            result[kind] = row
        result["setup"]["load_at_end"] = load_note()
    after = result["after"]
    limit_ms = cfg.timeout_ms + 100
    result["targets"] = {
        "burst_reranks_at_least_3": after["burst"]["reranked"] >= 3,
        "burst_fallbacks_under_100ms": (after["burst"]["slowest_fallback_ms"] or 0) < 100,
        f"sustained_p99_at_most_{limit_ms}ms": after["sustained"]["p99_ms"] <= limit_ms,
        "sustained_reranked_at_least_90pct_of_capacity": after["sustained"]["reranked_share_of_capacity"]
        >= 0.9,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"load-{label}-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, ok in result["targets"].items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")
    print(f"load: {result['setup']['load_at_end']}\nwritten: {out}")


if __name__ == "__main__":
    main()
