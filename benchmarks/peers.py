"""The proxy's engine side by side with what users would run instead: same weights, same pairs, one run.

Everybody scores the same (query, passage) pairs (the TREC-DL19 queries with their BM25 top-100, in
rank order, ``max_length`` 256) with the same weights, on the same machine, in one process run:

- **engine**, the proxy's own scorer, loaded through its public path (``build_model``,
  ``limits_of``, ``EngineScorer``) at ``rerank.dtype`` float32 and at ``auto`` (whatever ``auto``
  resolves to on this machine when the run happens; the JSON records it). Searches of 100 pairs,
  submitted concurrently as the proxy does: all at once, and 4 in flight; with ``--compile``, also
  at ``auto`` with ``rerank.compile: true`` (torch.compile; on CPU it needs a C++ compiler);
- **CrossEncoder.predict**, ``sentence_transformers.CrossEncoder(folder).predict(pairs,
  batch_size=32)``, the usage most projects start from (the optional extra ``peers``);
- **infinity-emb**, a real rerank server (PyPI ``infinity-emb[server,torch]``, its own virtual
  environment made once by ``scripts/infinity.sh``), serving the same folder offline on loopback;
  one ``POST /rerank`` per search with its 100 passages, 4 in flight, against the engine at the same
  concurrency.

The measurements are interleaved over ``--rounds`` rounds (the build machines are shared: load that
comes and goes hits every contender alike) and each figure is the median of its rounds. Every
contender's scores are checked against the engine's float32 scores (Spearman rank correlation: the
peers apply a sigmoid, ranks are what a reranker is for), which proves the weights and pairs are the
same; the ``minilm`` model's random head is drawn once and saved into the folder every contender loads.

    python benchmarks/peers.py [--model auto|minilm|tiny|PATH] [--pairs 800] [--rounds 2] [--compile]
                               [--out PATH]

Writes ``benchmarks/results/peers-<model>.json`` and ``.md`` (the table for benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import datasets
from benchmarks.common import ROOT, free_port, machine, model_folder
from benchmarks.throughput import dl19_pairs, searches
from proxy.config import RerankConfig
from proxy.scorer import EngineScorer, build_model, limits_of

Pairs = list[tuple[str, str]]
Work = list[tuple[str, list[str]]]
MAX_LENGTH = 256
IN_FLIGHT = 4
INFINITY_SCRIPT = ROOT / "scripts" / "infinity.sh"


# --- the model folder every contender loads ---------------------------------------------------------------


def fixed_head_folder(source: str, dest: Path) -> str:
    """``source`` (a cross-encoder folder) saved again with its classification head as loaded once.

    The minilm folder has no head weights, so each loader would draw its own random head and the
    contenders' scores could not be compared; saved once, everybody reads the same weights. Only the
    weights and config are written by transformers; the tokenizer files are copied as they are, so
    infinity-emb's older transformers reads them too.
    """
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the missing head is the point here, not news
    hf_logging.disable_progress_bar()
    torch.manual_seed(11)
    net = AutoModelForSequenceClassification.from_pretrained(source)
    dest.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(dest)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, dest / name)
    # infinity-emb truncates at the tokenizer's model_max_length: the same 256 tokens as the others.
    config_path = dest / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config["model_max_length"] = MAX_LENGTH
    config_path.write_text(json.dumps(config, indent=2))
    return str(dest)


# --- contenders ---------------------------------------------------------------------------------------------


class Engine:
    """The proxy's scorer as the proxy loads it, with an unbounded queue and no deadline."""

    def __init__(self, folder: str, dtype: str, compile: bool = False) -> None:
        cfg = RerankConfig(
            model=folder, dtype=dtype, max_length=MAX_LENGTH, max_queued_pairs=10**7, compile=compile
        )
        self.cfg = cfg
        self.model: Any = build_model(cfg)
        self.limits = replace(limits_of(cfg, self.model.device), max_queued=10**7)

    def describe(self) -> dict[str, Any]:
        out = {
            "requested_dtype": self.cfg.dtype,
            "dtype": self.model.dtype,
            "device": self.model.device,
            "compile": self.cfg.compile,
        }
        for extra in ("autocast", "autocast_dtype", "compute_dtype"):
            if hasattr(self.model, extra):
                out[extra] = str(getattr(self.model, extra))
        out["max_batch_tokens"] = self.limits.max_batch_tokens
        return out

    def run(self, work: Work, in_flight: int | None) -> tuple[float, list[float]]:
        """Pairs/s and the scores, searches submitted all at once or ``in_flight`` at a time."""

        async def go() -> tuple[float, list[float]]:
            scorer = EngineScorer(self.model, self.limits)
            gate = asyncio.Semaphore(in_flight or len(work))

            async def one(query: str, passages: list[str]) -> list[float]:
                async with gate:
                    return await scorer.score(query, passages)

            try:
                started = time.perf_counter()
                scores = await asyncio.gather(*(one(q, ps) for q, ps in work))
                elapsed = time.perf_counter() - started
            finally:
                await scorer.aclose()
            return n_pairs(work) / elapsed, [s for search in scores for s in search]

        return asyncio.run(go())


class Predict:
    """``sentence_transformers.CrossEncoder(folder).predict(pairs, batch_size=32)``."""

    def __init__(self, folder: str) -> None:
        from sentence_transformers import CrossEncoder

        self.net = CrossEncoder(folder, max_length=MAX_LENGTH, device="cpu", local_files_only=True)

    def run(self, work: Work) -> tuple[float, list[float]]:
        pairs = [(q, p) for q, ps in work for p in ps]
        started = time.perf_counter()
        scores = self.net.predict(pairs, batch_size=32, show_progress_bar=False)
        return len(pairs) / (time.perf_counter() - started), [float(s) for s in scores]


def infinity_command() -> tuple[str | None, str]:
    """The ``infinity_emb`` command from ``scripts/infinity.sh`` (which creates its venv once), or
    None and why not."""
    try:
        made = subprocess.run(
            ["bash", str(INFINITY_SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=1800
        )
    except subprocess.TimeoutExpired:
        return None, "scripts/infinity.sh took more than 30 min"
    if made.returncode != 0:
        tail = (made.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"scripts/infinity.sh failed: {tail}"
    return made.stdout.strip().splitlines()[-1], ""


@contextlib.contextmanager
def infinity_server(command: str, folder: str, log_path: Path) -> Iterator[tuple[str, int]]:
    """``infinity_emb v2`` serving ``folder`` on a loopback port, offline, no telemetry; yields its
    URL and process id once ``/health`` answers (at most 5 min), and stops it afterwards."""
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
        "DO_NOT_TRACK": "1",
    }
    cmd = [command, "v2", "--model-id", folder, "--engine", "torch", "--device", "cpu", "--dtype", "float32"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    cmd += ["--no-bettertransformer"]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=2)
                    break
                except Exception:
                    if proc.poll() is not None:
                        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
                        raise RuntimeError(
                            f"infinity_emb exited during start-up: {' | '.join(tail)}"
                        ) from None
                    if time.monotonic() > deadline:
                        raise RuntimeError("infinity_emb did not answer /health within 5 min") from None
                    time.sleep(0.5)
            yield url, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)


def infinity_run(url: str, work: Work, in_flight: int) -> tuple[float, list[float]]:
    """One ``POST /rerank`` per search, ``in_flight`` at a time; pairs/s and the scores."""
    import aiohttp

    async def go() -> tuple[float, list[float]]:
        gate = asyncio.Semaphore(in_flight)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def one(query: str, passages: list[str]) -> list[float]:
                async with gate:
                    body = {"query": query, "documents": passages, "return_documents": False}
                    async with session.post(f"{url}/rerank", json=body) as resp:
                        if resp.status != 200:
                            raise RuntimeError(f"infinity /rerank: HTTP {resp.status}: {await resp.text()}")
                        answer = await resp.json()
                scores = [0.0] * len(passages)
                for hit in answer["results"]:
                    scores[hit["index"]] = float(hit["relevance_score"])
                return scores

            started = time.perf_counter()
            scores = await asyncio.gather(*(one(q, ps) for q, ps in work))
            elapsed = time.perf_counter() - started
        return n_pairs(work) / elapsed, [s for search in scores for s in search]

    return asyncio.run(go())


# --- figures ------------------------------------------------------------------------------------------------


def n_pairs(work: Work) -> int:
    return sum(len(ps) for _, ps in work)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Rank correlation (ties are not expected between float scores)."""
    import numpy as np

    ra = np.argsort(np.argsort(np.asarray(a)))
    rb = np.argsort(np.argsort(np.asarray(b)))
    return float(np.corrcoef(ra, rb)[0, 1])


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux), to show an idle server stayed idle."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def load_average() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


ROWS = [
    ("engine_float32_all", "engine, float32", "all searches at once"),
    ("engine_auto_all", "engine, `auto` dtype", "all searches at once"),
    ("engine_float32_4", "engine, float32", f"{IN_FLIGHT} searches in flight"),
    ("engine_auto_4", "engine, `auto` dtype", f"{IN_FLIGHT} searches in flight"),
    ("engine_compiled_all", "engine, `auto` dtype, `rerank.compile: true`", "all searches at once"),
    ("engine_compiled_4", "engine, `auto` dtype, `rerank.compile: true`", f"{IN_FLIGHT} searches in flight"),
    ("predict", "`CrossEncoder.predict(pairs, batch_size=32)`", "one call, every pair"),
    ("infinity", "infinity-emb over HTTP, float32", f"{IN_FLIGHT} `POST /rerank` in flight"),
]
# Like with like: predict gets every pair at once, so the engine's all-at-once figure is compared;
# infinity gets 4 searches in flight, so the engine's figure at 4 in flight is.
ENGINES = ("float32", "auto", "compiled")  # compiled: auto dtype with rerank.compile (--compile)
RATIOS = [
    ("CrossEncoder.predict", "predict", "all"),
    (f"infinity-emb, both {IN_FLIGHT} searches in flight", "infinity", "4"),
]


def table(result: dict[str, Any]) -> str:
    """The Markdown tables for benchmarks/README.md: pairs/s, then the engine's ratio to each peer."""
    c = result["contenders"]
    rate = {k: v["pairs_per_s"] for k, v in c.items() if "pairs_per_s" in v}
    auto = result["setup"]["auto_dtype"]
    lines = [
        f"| contender ({result['setup']['pairs']} DL19 pairs, searches of <= 100, one run) | submitted "
        "| pairs/s | Spearman vs engine float32 |",
        "|---|---|---|---|",
    ]
    for key, name, how in ROWS:
        row = c.get(key)
        if row is None:
            continue
        label = name.replace("`auto` dtype", f"`auto` dtype (resolved to {auto})")
        if "pairs_per_s" not in row:
            lines.append(f"| {label} | {how} | not measured: {row['error']} | - |")
            continue
        rho = "(reference)" if key == "engine_float32_all" else f"{row['spearman_vs_engine_float32']:.5f}"
        lines.append(f"| {label} | {how} | {rate[key]:.1f} | {rho} |")
    kinds = [k for k in ENGINES if any(key.startswith(f"engine_{k}_") for key in rate)]
    heads = {
        "float32": "engine float32",
        "auto": "engine `auto` dtype",
        "compiled": "engine `auto` + compile",
    }
    lines += ["", "| engine / peer | " + " | ".join(heads[k] for k in kinds) + " |"]
    lines.append("|---|" + "---|" * len(kinds))
    for name, peer, level in RATIOS:
        if peer not in rate:
            continue
        cells = [
            f"**{rate[f'engine_{kind}_{level}'] / rate[peer]:.2f}x**"
            if f"engine_{kind}_{level}" in rate
            else "-"
            for kind in kinds
        ]
        lines.append(f"| vs {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ratios(result: dict[str, Any]) -> dict[str, float]:
    rate = {k: v["pairs_per_s"] for k, v in result["contenders"].items() if "pairs_per_s" in v}
    out = {}
    for _, peer, level in RATIOS:
        for kind in ENGINES:
            engine = f"engine_{kind}_{level}"
            if peer in rate and engine in rate:
                out[f"{engine}_vs_{peer}"] = rate[engine] / rate[peer]
    return out


def median_row(samples: list[tuple[float, list[float]]], reference: list[float] | None) -> dict[str, Any]:
    rates = [r for r, _ in samples]
    row: dict[str, Any] = {"pairs_per_s": statistics.median(rates), "rounds_pairs_per_s": rates}
    if reference is not None:
        row["spearman_vs_engine_float32"] = spearman(reference, samples[-1][1])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="auto", help="auto (minilm if installed), tiny, minilm, or a folder")
    ap.add_argument("--pairs", type=int, default=800, help="DL19 query/passage pairs (default 800)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; figures are medians")
    ap.add_argument("--no-infinity", action="store_true", help="leave infinity-emb out")
    ap.add_argument("--no-predict", action="store_true", help="leave CrossEncoder.predict out")
    ap.add_argument(
        "--compile", action="store_true", help="also the engine at auto dtype with rerank.compile: true"
    )
    ap.add_argument("--data", type=Path, default=datasets.DEFAULT_ROOT)
    ap.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/peers-<model>.json)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    col = datasets.trec_dl19_or_exit("peers.py", args.data)
    work = searches(dl19_pairs(col, args.pairs))
    load_before = load_average()
    print(f"{n_pairs(work)} pairs in {len(work)} searches; {machine()}\n{load_before}")

    with tempfile.TemporaryDirectory() as tmp:
        source, described, label = model_folder(args.model, Path(tmp), list(col.corpus.values())[:2000])
        folder = fixed_head_folder(source, Path(tmp) / "cross-encoder")
        engines = {"float32": Engine(folder, "float32"), "auto": Engine(folder, "auto")}
        if args.compile:
            engines["compiled"] = Engine(folder, "auto", compile=True)
        import torch

        result: dict[str, Any] = {
            "setup": {
                "model": described,
                "model_name": label,
                "pairs": n_pairs(work),
                "searches": len(work),
                "max_length": MAX_LENGTH,
                "in_flight": IN_FLIGHT,
                "rounds": args.rounds,
                "auto_dtype": engines["auto"].model.dtype
                + (
                    " under bf16 autocast, linear weights bf16"
                    if getattr(engines["auto"].model, "autocast", False)
                    else ""
                ),
                "engines": {k: e.describe() for k, e in engines.items()},
                "machine": machine(),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "date": time.strftime("%Y-%m-%d"),
                "command": " ".join(["python benchmarks/peers.py", *sys.argv[1:]]),
                "uptime_before": load_before,
            },
            "contenders": {},
        }
        contenders = result["contenders"]
        runs: dict[str, Callable[[Work], tuple[float, list[float]]]] = {}
        for name, engine in engines.items():
            runs[f"engine_{name}_all"] = functools.partial(engine.run, in_flight=None)
            runs[f"engine_{name}_4"] = functools.partial(engine.run, in_flight=IN_FLIGHT)
        if not args.no_predict:
            try:
                predict = Predict(folder)
                runs["predict"] = predict.run
                import sentence_transformers

                result["setup"]["sentence_transformers"] = sentence_transformers.__version__
            except ImportError as exc:
                contenders["predict"] = {
                    "error": f"sentence-transformers not installed ({exc}): pip install '.[peers]'"
                }

        with contextlib.ExitStack() as stack:
            server: tuple[str, int] | None = None
            if not args.no_infinity:
                command, why = infinity_command()
                if command is None:
                    contenders["infinity"] = {"error": why}
                else:
                    log_path = ROOT / "benchmarks" / "results" / "peers-infinity.log.tmp"
                    log_path.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        server = stack.enter_context(infinity_server(command, folder, log_path))
                        runs["infinity"] = functools.partial(infinity_run, server[0], in_flight=IN_FLIGHT)
                        result["setup"]["infinity_emb"] = infinity_version(command)
                    except RuntimeError as exc:
                        contenders["infinity"] = {"error": str(exc)}
            samples: dict[str, list[tuple[float, list[float]]]] = {k: [] for k in runs}
            for key, fn in runs.items():  # one search each to warm up, not timed
                print(f"  warm-up {key}", flush=True)
                fn(work[:1])
            idle_cpu = 0.0
            for r in range(args.rounds):
                for key, fn in runs.items():
                    before = cpu_seconds(server[1]) if server and key != "infinity" else None
                    samples[key].append(fn(work))
                    after = cpu_seconds(server[1]) if server and key != "infinity" else None
                    if before is not None and after is not None:
                        idle_cpu += after - before
                    print(f"  round {r + 1} {key:<20} {samples[key][-1][0]:8.1f} pairs/s", flush=True)
            if server:
                result["setup"]["infinity_cpu_s_while_others_ran"] = round(idle_cpu, 2)
        reference = samples["engine_float32_all"][-1][1]
        for key in runs:
            contenders[key] = median_row(samples[key], None if key == "engine_float32_all" else reference)
    result["setup"]["uptime_after"] = load_average()
    result["ratios"] = ratios(result)
    result["targets"] = {
        f"{key.split('_vs_')[0].rsplit('_', 1)[0]} >= 2x {peer}": value >= 2
        for key, value in result["ratios"].items()
        if key.startswith(("engine_auto", "engine_compiled"))
        for peer in [key.split("_vs_")[1]]
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"peers-{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    md = table(result)
    setup = result["setup"]
    head = (
        f"`{setup['command']}`, {setup['date']}, {setup['machine']}, "
        f"torch {setup['torch']} ({setup['torch_threads']} threads); model: {described}.\n"
        f"Before: `{load_before}`. After: `{result['setup']['uptime_after']}`.\n\n"
    )
    out.with_suffix(".md").write_text(head + md)
    print("\n" + md + result["setup"]["uptime_after"])
    for name, ok in result["targets"].items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")
    print(f"written: {out} and {out.with_suffix('.md')}")


def infinity_version(command: str) -> str:
    python = Path(command).parent / "python"
    found = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('infinity-emb'))"],
        capture_output=True,
        text=True,
    )
    return found.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
