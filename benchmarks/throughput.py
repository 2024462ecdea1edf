"""How fast the inference engine scores, standalone and through the proxy, in one run.

1. Scorer pairs/s, the engine (``EngineScorer``: tokenizer thread, batching queue, length grouping,
   token budget) against a naive loop (tokenize + forward in fixed batches of 32 in arrival order),
   same model object, same pairs, on three length mixes:
   - ``mix``: short DL19 queries with passages of 20-400 tokens (log-uniform, cut from DL19 passages),
     ``max_length`` 512 so no passage is truncated;
   - ``dl19``: the TREC-DL19 queries with their BM25 top-100 passages (``max_length`` 256);
   - ``fixed256``: every pair exactly 256 tokens.
   Pairs are grouped into searches of 100 by query and submitted concurrently, as the proxy does.
2. pairs/s against the batch budget (``max_batch_tokens``) on the ``dl19`` mix.
3. End to end: the DL19 passage pool indexed in a real Elasticsearch; searches (size 10, top-k 100)
   straight to Elasticsearch and through ``rerank-proxy`` (its own process) at 1, 8 and 32
   concurrent clients: p50/p95/p99 latency and searches/s; the share of the scorer's standalone
   throughput (measured on the very same pairs) that the proxy keeps at 32 clients; and the proxy
   process's peak memory.
4. On a GPU, each scorer figure is also given as a share of the device's dense bf16/fp16 peak,
   counting the model's useful FLOPs (every pair at its own length, no padding).

    python benchmarks/throughput.py [--model auto|tiny|minilm|PATH] [--es-url URL] [--quick]

Writes ``benchmarks/results/throughput-<model>-<device>.json`` and a PNG beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from benchmarks import datasets
from benchmarks.common import (
    ROOT,
    baseline_module,
    baseline_proxy,
    elasticsearch,
    machine,
    model_folder,
    pct,
    peak_rss_mib,
    proxy_process,
    timed_search,
)
from proxy.batch_cost import BatchLimits
from proxy.config import RerankConfig
from proxy.cross_encoder import CrossEncoderModel
from proxy.scorer import EngineScorer, limits_of

Pairs = list[tuple[str, str]]
INDEX = "bench-dl19"
TOP_K = 100
# Dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendors' data sheets, no sparsity.
PEAK_FLOPS = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


# --- pairs -------------------------------------------------------------------------------------------


def dl19_pairs(col: datasets.Collection, limit: int) -> Pairs:
    """Each DL19 query with its BM25 top-100, in rank order: the proxy's real workload."""
    assert col.bm25_run is not None
    out: Pairs = []
    for qid, docs in col.bm25_run.items():
        ranked = sorted(docs, key=lambda d: -docs[d])[:TOP_K]
        out += [(col.queries[qid], col.corpus[d]) for d in ranked if d in col.corpus]
    return out[:limit]


def cut_pairs(model: CrossEncoderModel, col: datasets.Collection, limit: int, lengths: list[int]) -> Pairs:
    """Passages of the given token lengths, cut from consecutive DL19 passages joined together."""
    tok = model.tokenizer
    texts = list(col.corpus.values())
    queries = list(col.queries.values())
    rng = random.Random(11)
    out: Pairs = []
    for i, want in enumerate(lengths[:limit]):
        start = rng.randrange(len(texts) - 20)
        text = " ".join(texts[start : start + 12])
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        end = enc["offset_mapping"][min(want, len(enc["offset_mapping"])) - 1][1]
        out.append((queries[(i // TOP_K) % len(queries)], text[:end]))  # searches of TOP_K pairs
    return out


def mix_lengths(n: int) -> list[int]:
    rng = random.Random(5)
    return [round(math.exp(rng.uniform(math.log(20), math.log(400)))) for _ in range(n)]


def searches(pairs: Pairs) -> list[tuple[str, list[str]]]:
    """Consecutive pairs of one query, at most 100 to a search."""
    out: list[tuple[str, list[str]]] = []
    for query, passage in pairs:
        if out and out[-1][0] == query and len(out[-1][1]) < TOP_K:
            out[-1][1].append(passage)
        else:
            out.append((query, [passage]))
    return out


def shipped_limits(device: str, max_length: int) -> BatchLimits:
    """The proxy's default batching for this device, with an unbounded queue."""
    return replace(limits_of(RerankConfig(max_length=max_length), device), max_queued=10**7)


# --- scorer ------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def naive_loop(model: CrossEncoderModel, pairs: Pairs, max_length: int) -> float:
    """Tokenize and forward in fixed batches of 32, arrival order, padded to each batch's longest; in
    the model's own precision (bf16 autocast where ``auto`` chose it), as the engine runs it."""
    import torch

    started = time.perf_counter()
    with torch.inference_mode(), model.precision():
        for lo in range(0, len(pairs), 32):
            chunk = pairs[lo : lo + 32]
            enc = model.tokenizer(
                [q for q, _ in chunk],
                [p for _, p in chunk],
                truncation="only_second",
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            ).to(model.device)
            model.forward(**enc).logits.float().cpu()
    sync(model.device)
    return len(pairs) / (time.perf_counter() - started)


async def _engine(scorer: EngineScorer, work: list[tuple[str, list[str]]]) -> float:
    started = time.perf_counter()
    await asyncio.gather(*(scorer.score(q, ps) for q, ps in work))
    return sum(len(ps) for _, ps in work) / (time.perf_counter() - started)


def engine_rate(model: CrossEncoderModel, pairs: Pairs, limits: BatchLimits) -> tuple[float, float]:
    """Pairs/s through the engine, and its padding overhead (padded / real tokens)."""

    async def run() -> tuple[float, float]:
        scorer = EngineScorer(model, limits)
        try:
            rate = await _engine(scorer, searches(pairs))
            stats = scorer.queue.stats
            return rate, stats.padded_tokens / max(1, stats.real_tokens)
        finally:
            await scorer.aclose()

    return asyncio.run(run())


def useful_flops(model: CrossEncoderModel, pairs: Pairs) -> float:
    """Forward FLOPs of every pair at its own length: 2*params-per-token matmuls plus attention."""
    cfg = model.net.config
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    total = 0.0
    for query, passages in searches(pairs):
        items, _ = model.encode(query, passages)
        for item in items:
            n = len(item.ids)
            total += layers * (2 * n * (4 * h * h + 2 * h * inter) + 4 * n * n * h)
    return total


def peak_flops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def scorer_section(model: CrossEncoderModel, col: datasets.Collection, quick: bool) -> dict[str, Any]:
    gpu = model.device.startswith("cuda")
    n = 20_000 if gpu else (300 if quick else 800)
    mixes: dict[str, tuple[Pairs, int]] = {
        "mix": (cut_pairs(model, col, n, mix_lengths(n)), 512),
        "dl19": (dl19_pairs(col, n), 256),
        "fixed256": (cut_pairs(model, col, n, [400] * n), 256),
    }
    peak = peak_flops(model.device)
    out: dict[str, Any] = {}
    for name, (pairs, max_length) in mixes.items():
        model.max_length = max_length
        limits = shipped_limits(model.device, max_length)
        engine_rate(model, pairs[: min(len(pairs), 400)], limits)  # warm-up at these shapes
        naive = naive_loop(model, pairs, max_length)
        engine, padding = engine_rate(model, pairs, limits)
        flops = useful_flops(model, pairs) / len(pairs)
        work = searches(pairs)
        row = {
            "pairs": len(pairs),
            "searches": len(work),
            "pairs_per_search": len(pairs) / len(work),
            "max_length": max_length,
            "naive_pairs_per_s": naive,
            "engine_pairs_per_s": engine,
            "engine_vs_naive": engine / naive,
            "engine_padding_overhead": padding,
            "max_batch_tokens": limits.max_batch_tokens,
            "useful_gflop_per_pair": flops / 1e9,
        }
        if peak:
            row["engine_share_of_peak_flops"] = engine * flops / peak
        out[name] = row
        print(
            f"  {name:<9} naive {naive:9.1f} pairs/s  engine {engine:9.1f} pairs/s  x{engine / naive:.2f}"
            f"  (over {len(pairs)} pairs, {len(work)} searches)"
        )
    model.max_length = 256
    budgets = [8192, 32768, 65536, 131072] if gpu else [512, 2048, 16384]
    pairs = mixes["dl19"][0]
    sweep = []
    for budget in budgets:
        lim = BatchLimits(budget, max(8, budget // 16), max_wait_ms=2, max_queued=10**7)
        rate, _ = engine_rate(model, pairs, lim)
        sweep.append({"max_batch_tokens": budget, "engine_pairs_per_s": rate, "pairs": len(pairs)})
        print(f"  budget {budget:>7} tokens: {rate:9.1f} pairs/s (over {len(pairs)} pairs)")
    out["budget_sweep_dl19"] = sweep
    return out


# --- the host side's ceiling --------------------------------------------------------------------------


def noop_forward(**tensors: Any) -> Any:
    """A forward pass that costs nothing: one zero logit per row, so only the host side is measured
    (tokenizing, batching, tensors, reading results)."""
    import torch

    return SimpleNamespace(logits=torch.zeros((tensors["input_ids"].shape[0], 1)))


def noop_ceiling(
    folder: str, col: datasets.Collection, before_ref: str | None, rounds: int
) -> dict[str, Any]:
    """Pairs/s of the engine with the forward pass replaced by :func:`noop_forward`, on the DL19
    searches (top-100 each, all submitted at once, ``rounds`` times over), today's engine and, with
    ``before_ref``, the engine (model class, queue and scorer) as it was at that git ref."""
    from proxy.runtime import usable_cores

    pairs = dl19_pairs(col, 10**6)
    work = searches(pairs) * rounds
    n = sum(len(ps) for _, ps in work)
    stacks: dict[str, tuple[Any, Any, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if before_ref:
            before = baseline_proxy(before_ref, Path(tmp))
            old = {m: baseline_module(before, m) for m in ("cross_encoder", "scorer", "config")}
            old_limits = old["scorer"].limits_of(old["config"].RerankConfig(max_length=256), "cpu")
            stacks["before"] = (
                old["cross_encoder"].CrossEncoderModel,
                old["scorer"].EngineScorer,
                old_limits,
            )
        stacks["after"] = (CrossEncoderModel, EngineScorer, shipped_limits("cpu", 256))
        cores = usable_cores()
        out: dict[str, Any] = {"pairs": n, "searches": len(work), "cores": cores}
        for name, (model_class, scorer_class, limits) in stacks.items():
            model = model_class(folder, max_length=256, device="cpu")
            model.forward = noop_forward

            async def run(
                model: Any = model, scorer_class: Any = scorer_class, limits: Any = limits
            ) -> float:
                scorer = scorer_class(model, replace(limits, max_queued=10**7))
                try:
                    await _engine(scorer, work[:8])  # tokenizer threads and queue warmed
                    return await _engine(scorer, work)
                finally:
                    await scorer.aclose()

            rate = asyncio.run(run())
            out[name] = {"pairs_per_s": rate, "pairs_per_s_per_core": rate / cores}
            print(
                f"  no-op forward, {name}: {rate:9.1f} pairs/s, {rate / cores:8.1f} per core (over {n} pairs)"
            )
        if "before" in out:
            out["after_vs_before"] = out["after"]["pairs_per_s"] / out["before"]["pairs_per_s"]
            print(f"  after / before: x{out['after_vs_before']:.2f}")
    return out


# --- end to end ---------------------------------------------------------------------------------------


async def index_pool(es: str, col: datasets.Collection) -> None:
    async with aiohttp.ClientSession() as session:
        await session.delete(f"{es}/{INDEX}")
        await session.put(
            f"{es}/{INDEX}", json={"settings": {"number_of_replicas": 0, "number_of_shards": 1}}
        )
        docs = list(col.corpus.items())
        for lo in range(0, len(docs), 2000):
            bulk = "".join(
                json.dumps({"index": {"_index": INDEX, "_id": d}}) + "\n" + json.dumps({"text": t}) + "\n"
                for d, t in docs[lo : lo + 2000]
            )
            async with session.post(
                f"{es}/_bulk", data=bulk, headers={"Content-Type": "application/x-ndjson"}
            ) as resp:
                if resp.status != 200 or (await resp.json())["errors"]:
                    raise SystemExit("throughput.py: bulk indexing into Elasticsearch failed")
        await session.post(f"{es}/{INDEX}/_refresh")


async def es_candidates(es: str, queries: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Each query's top-100 texts straight from Elasticsearch: exactly what the proxy will score."""
    out = []
    async with aiohttp.ClientSession() as session:
        for q in queries:
            body = {"query": {"match": {"text": q}}, "size": TOP_K}
            async with session.post(f"{es}/{INDEX}/_search", json=body) as resp:
                hits = (await resp.json())["hits"]["hits"]
            out.append((q, [h["_source"]["text"] for h in hits]))
    return out


async def load(url: str, queries: Sequence[str], clients: int, total: int) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    counter = iter(range(total))

    async def client(session: aiohttp.ClientSession) -> None:
        for i in counter:
            status, ms = await timed_search(session, url, INDEX, queries[i % len(queries)], "throughput.py")
            latencies.append(ms)
            statuses[status] = statuses.get(status, 0) + 1

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        "searches": total,
        "searches_per_s": total / elapsed,
        "p50_ms": statistics.median(latencies),
        "p95_ms": pct(latencies, 0.95),
        "p99_ms": pct(latencies, 0.99),
        "statuses": statuses,
    }


def end_to_end(
    model: CrossEncoderModel, model_dir: str, col: datasets.Collection, es: str, quick: bool
) -> dict[str, Any]:
    gpu = model.device.startswith("cuda")
    asyncio.run(index_pool(es, col))
    queries = list(col.queries.values())
    work = asyncio.run(es_candidates(es, queries))
    pairs_per_search = statistics.mean(len(ps) for _, ps in work)
    # Standalone: the same 32-way concurrent load the proxy will get, in this process, before the
    # proxy starts (two model copies must not fight over the CPU).
    limits = shipped_limits(model.device, 256)
    model.max_length = 256
    standalone = asyncio.run(_standalone(model, limits, [work[i % len(work)] for i in range(32)]))
    print(f"  standalone engine on the proxy's pairs: {standalone:.1f} pairs/s")
    rounds = 8 if gpu else (1 if quick else 2)
    levels = {}
    flags = ["--rerank-top-k", str(TOP_K), "--rerank-timeout-ms", "3600000", "--rerank-device", model.device]
    flags += ["--rerank-max-queued-pairs", "1000000"]
    with proxy_process(es, model_dir, *flags) as (proxy_url, proc):
        asyncio.run(load(proxy_url, queries, 2, 4))  # warm-up
        for clients in (1, 8, 32):
            total = max(4, clients * rounds)
            direct = asyncio.run(load(es, queries, clients, max(total, 50)))
            proxied = asyncio.run(load(proxy_url, queries, clients, total))
            levels[str(clients)] = {"direct": direct, "proxy": proxied}
            print(
                f"  {clients:>2} clients: direct {direct['searches_per_s']:8.1f}/s"
                f" p50 {direct['p50_ms']:7.1f} ms"
                f" | proxy {proxied['searches_per_s']:7.2f}/s p50 {proxied['p50_ms']:8.1f}"
                f" p95 {proxied['p95_ms']:8.1f} p99 {proxied['p99_ms']:8.1f} ms {proxied['statuses']}"
            )
        peak = peak_rss_mib(proc.pid)
    kept = levels["32"]["proxy"]["searches_per_s"] * pairs_per_search / standalone
    return {
        "pairs_per_search": pairs_per_search,
        "standalone_pairs_per_s": standalone,
        "levels": levels,
        "proxy_share_of_standalone_at_32": kept,
        "proxy_peak_rss_mib": peak,
    }


async def _standalone(
    model: CrossEncoderModel, limits: BatchLimits, work: list[tuple[str, list[str]]]
) -> float:
    scorer = EngineScorer(model, limits)
    try:
        await _engine(scorer, work[:4])  # warm-up
        return await _engine(scorer, work)
    finally:
        await scorer.aclose()


# --- report -------------------------------------------------------------------------------------------


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if "end_to_end" in result:
        levels = result["end_to_end"]["levels"]
        xs = [int(c) for c in levels]
        for who, style in (("direct", "--"), ("proxy", "-")):
            for q in ("p50_ms", "p95_ms", "p99_ms"):
                left.plot(xs, [levels[c][who][q] for c in levels], style, marker="o", label=f"{who} {q[:3]}")
        left.set_xscale("log", base=2)
        left.set_yscale("log")
        left.set_xlabel("concurrent clients")
        left.set_ylabel("latency (ms)")
        left.set_title("search latency, top-k 100")
        left.legend(fontsize=7)
    sweep = result["scorer"]["budget_sweep_dl19"]
    right.plot([s["max_batch_tokens"] for s in sweep], [s["engine_pairs_per_s"] for s in sweep], marker="o")
    right.set_xscale("log", base=2)
    right.set_xlabel("max_batch_tokens")
    right.set_ylabel("pairs/s (DL19 mix)")
    right.set_title("engine throughput vs batch budget")
    fig.suptitle(f"{result['setup']['model_name']} on {result['setup']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def targets(result: dict[str, Any]) -> dict[str, Any]:
    s = result["scorer"]
    out: dict[str, Any] = {}
    if result["setup"]["device"] == "cpu":
        out["cpu_engine_vs_naive_on_mix >= 2"] = s["mix"]["engine_vs_naive"] >= 2
    else:
        out["gpu_dl19_pairs_per_s >= 50000"] = s["dl19"]["engine_pairs_per_s"] >= 50_000
        out["gpu_fixed256_pairs_per_s >= 20000"] = s["fixed256"]["engine_pairs_per_s"] >= 20_000
    if "end_to_end" in result:
        out["proxy_keeps_80pct_at_32_clients"] = (
            result["end_to_end"]["proxy_share_of_standalone_at_32"] >= 0.8
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="auto", help="auto (minilm if installed), tiny, minilm, or a folder")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--es-url", help="a running Elasticsearch (default: start one with the project's script)")
    ap.add_argument("--no-end-to-end", action="store_true", help="scorer figures only (no Elasticsearch)")
    ap.add_argument("--quick", action="store_true", help="fewer pairs and searches (CPU smoke run)")
    ap.add_argument(
        "--noop-ceiling",
        action="store_true",
        help="only the host side's ceiling: the forward pass replaced by a no-op (DL19 searches)",
    )
    ap.add_argument("--before", help="with --noop-ceiling: a git ref whose engine to measure beside today's")
    ap.add_argument(
        "--rounds", type=int, default=3, help="with --noop-ceiling: passes over the DL19 searches"
    )
    ap.add_argument("--data", type=Path, default=datasets.DEFAULT_ROOT)
    ap.add_argument(
        "--out", type=Path, help="JSON path (default: benchmarks/results/throughput-<model>-<device>.json)"
    )
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    col = datasets.trec_dl19_or_exit("throughput.py", args.data)

    with tempfile.TemporaryDirectory() as tmp:
        folder, described, label = model_folder(args.model, Path(tmp), list(col.corpus.values())[:2000])
        if args.noop_ceiling:
            print(f"model: {described}\n{machine()}\nhost-side ceiling (pairs/s):")
            noop = noop_ceiling(folder, col, args.before, args.rounds)
            noop["setup"] = {
                "model": described,
                "machine": machine(),
                "before": args.before,
                "load_average": os.getloadavg(),
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
            }
            out = args.out or ROOT / "benchmarks" / "results" / f"throughput-noop-{label}-cpu.json"
            out.write_text(json.dumps(noop, indent=2) + "\n")
            print(f"written: {out}")
            return
        model = CrossEncoderModel(folder, max_length=512, device=args.device)
        model.warm_up(32)
        print(f"model: {described}\ndevice: {model.device} ({model.dtype}), {machine()}")
        result: dict[str, Any] = {
            "setup": {
                "model": described,
                "model_name": label,
                "device": model.device,
                "dtype": model.dtype,
                "machine": machine(),
                "torch_threads": __import__("torch").get_num_threads(),
                "date": time.strftime("%Y-%m-%d"),
                "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
            }
        }
        print("scorer (pairs/s):")
        result["scorer"] = scorer_section(model, col, args.quick)
        if not args.no_end_to_end:
            print("end to end (DL19 pool, size 10, top-k 100):")
            with elasticsearch(args.es_url) as es:
                result["end_to_end"] = end_to_end(model, folder, col, es, args.quick)
        del model
        gc.collect()
    result["targets"] = targets(result)
    out = args.out or ROOT / "benchmarks" / "results" / f"throughput-{label}-{result['setup']['device']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    for name, ok in result["targets"].items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")
    print(f"written: {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
