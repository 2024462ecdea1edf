"""Where the proxy's CPU goes under load: the model's forward pass, and everything around it.

The question: at 32 concurrent clients, what share of the proxy process's CPU is spent outside the
model's forward pass (tokenizing, building batch tensors, JSON, HTTP and the event loop, the rest)?

Set-up, as ``throughput.py``'s end-to-end part: the 14,581-passage DL19 pool indexed in a real
Elasticsearch, ``rerank-proxy`` as its own process in front of it with the shipped defaults (top-k 100,
``rerank.timeout_ms`` 5000: searches beyond the model's capacity fall back to Elasticsearch's order, and
their handling is part of what is measured; ``--no-deadline`` starts it as ``throughput.py`` does, so
every search is reranked), and ``--clients`` closed-loop aiohttp clients sending DL19 ``match``
searches (size 10) through it; a warm-up, then ``--seconds`` of measurement. Reranked searches/s and
the outcomes (``X-Rerank-Status``/``X-Rerank-Reason``) of the searches answered in the window, and
``uptime`` before and after, are reported with the CPU split.

Method, over the measured window:

1. py-spy samples the proxy's Python threads (``py-spy record --format raw --rate 100 --threads``;
   idle threads are left out, py-spy's default, and ``--gil`` is not used: the forward pass and the
   tokenizer run without the GIL). Each sample is put in one category by its stack: ``forward`` (under
   ``run_batch``/``run_prepared``, inside the torch module's call), ``batch tensors``
   (``prepare``/``batch_tensors``, on the model thread or the queue's prepare thread),
   ``tokenize`` (``encode``, the tokenizers and transformers tokenization code), ``json`` (orjson,
   ``es_json``, a proxy line that calls them), ``http & event loop`` (innermost frame in aiohttp,
   asyncio, selectors, sockets, multidict, yarl, gzip: aiohttp clients ask for compressed answers),
   ``other`` (the proxy's own code, logging, metrics, the batching queue, thread pools, results read
   back from the model). Samples whose innermost line is a blocking wait (epoll, a thread pool's
   queue, a lock, a condition) are left out: py-spy reports a few per cent of an idle thread's samples
   as active.
2. The kernel's CPU accounting, read from ``/proc``: the whole process (``/proc/PID/stat``, utime +
   stime, every thread, exited ones included) and each thread (``/proc/PID/task/TID/stat``), at the
   start and end of the window.
3. Each Python thread's measured CPU is split over the categories in proportion to its own samples.
   A sample only says that a thread was runnable, not that it had a core: on a busy machine threads
   wait for a CPU, so counting samples x interval would overstate them; the kernel's figure does not.
4. Threads py-spy cannot see are native: torch's intra-op (OpenMP) workers, started by the thread that
   runs the forward passes, and the Rust tokenizer's rayon pool, which does the actual tokenizing while
   the calling Python thread waits. The proxy is started through :func:`launch`, which gives every
   Python thread its name in the kernel (a native thread inherits its creator's name) and starts the
   tokenizer's pool from a thread named ``tokenizers-pool`` before the proxy runs; so native threads
   named after the forward-pass thread count as ``forward``, those of the pool as ``tokenize``. Native
   threads of any other origin are assumed to be torch's workers and count as ``forward`` (listed
   apart in the output); CPU of threads that exited during the window counts as ``other``.

The simpler reading, CPU per category = samples x interval and forward = the forward samples plus all
CPU the samples do not cover, is printed and stored beside it (``samples_x_interval``): it assumes
every sampled thread had a core and every unseen cycle was torch's, neither of which holds here
(tokenizing runs on native threads).

    python benchmarks/cpu_profile.py [--model tiny|minilm|FOLDER] [--es-url URL] [--clients 32] [--seconds 60]
        [--no-deadline] [--proxy-args "--rerank-max-batch-tokens 4096"]

Writes ``benchmarks/results/profile-<model>-cpu.json``. Needs py-spy (``pip install -e '.[profile]'``)
and permission to attach to a process of the same user (ptrace).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import linecache
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from benchmarks import datasets
from benchmarks.common import ROOT, elasticsearch, machine, model_folder, pct, proxy_process, timed_search
from benchmarks.throughput import INDEX, TOP_K, es_candidates, index_pool

CATEGORIES = ("forward", "tokenize", "batch tensors", "json", "http & event loop", "other")
TOKENIZER_POOL = "tokenizers-pool"  # the kernel's name for the tokenizer's rayon threads (15 chars max)
ASSUMPTION = (
    "py-spy sees Python threads only; each one's kernel CPU is split by its samples. Native threads "
    "started by the forward-pass thread (torch's OpenMP workers) count as forward, those of the "
    "tokenizer's rayon pool as tokenize, native threads of any other origin are assumed to be torch's "
    "and count as forward; CPU of threads that exited during the window counts as other."
)


# --- inside the proxy process --------------------------------------------------------------------------


def name_os_thread(name: str) -> None:
    """The calling thread's name in the kernel (``/proc/.../comm``, 15 bytes), which threads it starts
    inherit."""
    with contextlib.suppress(OSError):
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(name[:15])


def launch() -> None:
    """Run ``rerank-proxy`` (``sys.argv`` as its arguments) with named threads: each Python thread
    under its own name in the kernel, the tokenizer's rayon pool under ``tokenizers-pool``. Nothing the
    proxy does changes; its threads become recognisable from ``/proc``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    original_run = threading.Thread.run

    def run(self: threading.Thread) -> None:
        name_os_thread(self.name)
        original_run(self)

    threading.Thread.run = run  # type: ignore[method-assign]
    main_name = Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()
    name_os_thread(TOKENIZER_POOL)
    pool = Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    pool.encode_batch(["start", "the", "pool"])  # rayon's global pool starts here, named after us
    name_os_thread(main_name)
    from proxy.cli import main

    sys.exit(main())


# --- /proc -------------------------------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def stat_fields(path: Path) -> list[str]:
    """The fields after the command name (which may hold spaces), from field 3 (state) on."""
    return path.read_text().rsplit(")", 1)[1].split()


def cpu_seconds(path: Path) -> float:
    fields = stat_fields(path)
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each live thread's kernel name and CPU seconds so far."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = ((task / "comm").read_text().strip(), cpu_seconds(task / "stat"))
        except (OSError, IndexError, ValueError):  # exited meanwhile
            continue
    return out


def machine_cpu() -> tuple[float, float]:
    """Busy and total CPU seconds of the whole machine so far (``/proc/stat``)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / TICK, sum(values[:8]) / TICK


@dataclass
class Snapshot:
    at: float
    process: float
    threads: dict[int, tuple[str, float]]
    machine: tuple[float, float]

    @classmethod
    def take(cls, pid: int) -> Snapshot:
        return cls(
            time.perf_counter(), cpu_seconds(Path(f"/proc/{pid}/stat")), thread_cpu(pid), machine_cpu()
        )


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# --- py-spy ------------------------------------------------------------------------------------------


def py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if found is None:
        raise SystemExit("cpu_profile.py: py-spy is not installed (pip install -e '.[profile]')")
    return found


async def record(
    pid: int, seconds: float, rate: int, out: Path, nonblocking: bool
) -> tuple[Snapshot, Snapshot]:
    """Sample ``pid`` with py-spy for ``seconds``; the kernel's CPU figures when sampling starts and
    ``seconds`` later."""
    cmd = [py_spy(), "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate), "--threads"]
    cmd += ["--full-filenames", "--duration", str(max(1, round(seconds))), "-o", str(out)]
    cmd += ["--nonblocking"] if nonblocking else []
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    while b"Sampling process" not in (line := await proc.stdout.readline()):
        if not line:
            why = (await proc.stderr.read()).decode(errors="replace").strip()
            raise SystemExit(f"cpu_profile.py: py-spy did not start sampling: {why}")
    start = Snapshot.take(pid)
    await asyncio.sleep(max(1, round(seconds)))
    end = Snapshot.take(pid)
    _, error = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"cpu_profile.py: py-spy failed: {error.decode(errors='replace').strip()}")
    return start, end


def python_threads(pid: int) -> dict[int, str]:
    """The process's Python threads (``py-spy dump``): OS thread id -> Python name."""
    dump = subprocess.run([py_spy(), "dump", "--pid", str(pid)], capture_output=True, text=True)
    found = re.findall(r'^Thread (\d+|0x[0-9a-fA-F]+) \([^)]*\): "(.*)"$', dump.stdout, re.MULTILINE)
    return {int(tid, 0): name for tid, name in found}


Frame = tuple[str, str, int]  # function, file, line
_FRAME = re.compile(r"^(.*) \((.*):(\d+)\)$")
_THREAD = re.compile(r"^thread \((0x[0-9a-fA-F]+|\d+)\)")


def parse_raw(text: str) -> list[tuple[int, list[Frame], int]]:
    """py-spy's raw (folded) output with ``--threads``: (thread id, frames outermost first, samples)."""
    out = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        head = _THREAD.match(parts[0])
        if head is None:
            continue
        frames = []
        for part in parts[1:]:
            m = _FRAME.match(part)
            frames.append((m.group(1), m.group(2), int(m.group(3))) if m else (part, "", 0))
        out.append((int(head.group(1), 0), frames, int(count)))
    return out


# --- categories --------------------------------------------------------------------------------------

_HTTP = (
    *("/aiohttp/", "/asyncio/", "/selectors.py", "/socket.py", "/ssl.py", "/multidict/", "/yarl/"),
    *("/propcache/", "/aiohappyeyeballs/", "/aiosignal/", "/frozenlist/", "/gzip.py", "/zlib"),
)
_JSON_LINE = re.compile(r"\b(orjson|es_json|json)\.|\.json\(")
# A thread blocked here waits (epoll, a thread pool's queue, a lock or condition, a sleep): py-spy still
# reports a few per cent of such samples as active, so they are left out of the threads' work.
_WAIT_LINE = re.compile(r"\.poll\(|\.get\(block=True\)|\.acquire\(|\.wait\(|\bsleep\(")


def waiting(frames: list[Frame]) -> bool:
    """The sample's innermost line is a blocking wait."""
    return bool(frames) and bool(_WAIT_LINE.search(linecache.getline(frames[-1][1], frames[-1][2])))


def in_proxy(file: str, *modules: str) -> bool:
    return "/proxy/" in file and (not modules or Path(file).name in modules)


def short(frame: Frame) -> str:
    func, file, line = frame
    parts = Path(file).parts
    for anchor in ("proxy", "site-packages", "python3.11"):
        if anchor in parts:
            parts = parts[parts.index(anchor) + (anchor != "proxy") :]
            break
    return f"{func} ({'/'.join(parts[-3:])}:{line})"


def classify(frames: list[Frame]) -> str:
    """One sample's category, from its stack (outermost frame first)."""
    method = [func.rpartition(".")[2] for func, _, _ in frames]
    for i, (name, (_, file, _)) in enumerate(zip(method, frames, strict=True)):
        if name in ("run_batch", "run_prepared") and in_proxy(file):
            below = frames[i + 1 :]
            if any(f for _, f, _ in below if "/torch/nn/" in f or "/transformers/" in f or "/_dynamo/" in f):
                return "forward"
            if any(m in ("prepare", "batch_tensors") for m in method[i + 1 :]):
                return "batch tensors"
            return "other"  # results read back, the batch's bookkeeping
    for name, (_, file, _) in zip(method, frames, strict=True):
        if name in ("prepare", "batch_tensors") and in_proxy(file):
            return "batch tensors"
        if (name == "encode" and in_proxy(file)) or "/tokenizers/" in file or "/transformers/tokeniz" in file:
            return "tokenize"
        if in_proxy(file, "es_json.py") or "/orjson/" in file or re.search(r"/json/[^/]+\.py$", file):
            return "json"
    if not frames:
        return "other"
    func, file, line = frames[-1]
    if in_proxy(file) and (func.endswith(".json") or _JSON_LINE.search(linecache.getline(file, line))):
        return "json"
    if any(part in file for part in _HTTP):
        return "http & event loop"
    return "other"


def attribute(
    stacks: list[tuple[int, list[Frame], int]],
    start: Snapshot,
    end: Snapshot,
    py_threads: dict[int, str],
    interval: float,
) -> dict[str, Any]:
    """CPU seconds per category over the window, and how they were found."""
    samples: dict[int, Counter[str]] = defaultdict(Counter)
    waits: dict[int, Counter[str]] = defaultdict(Counter)
    top: dict[str, Counter[str]] = {c: Counter() for c in (*CATEGORIES, "waiting")}
    for tid, frames, count in stacks:
        category = classify(frames)
        (waits if waiting(frames) else samples)[tid][category] += count
        if frames:
            top["waiting" if waiting(frames) else category][short(frames[-1])] += count
    python = set(py_threads) | set(samples) | set(waits)
    used = {
        tid: (comm, seconds - start.threads.get(tid, (comm, 0.0))[1])
        for tid, (comm, seconds) in end.threads.items()
    }
    forward_threads = {
        used[tid][0] for tid, c in samples.items() if tid in used and c["forward"] > sum(c.values()) / 2
    }
    cpu: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
    threads = []
    unsampled_python = native_forward = native_tokenize = native_unknown = 0.0
    for tid, (comm, seconds) in sorted(used.items(), key=lambda kv: -kv[1][1]):
        row: dict[str, Any] = {"tid": tid, "name": py_threads.get(tid, comm), "cpu_s": round(seconds, 3)}
        if tid in python:
            # A thread seen only waiting: its little CPU goes where it waits (epoll: the event loop).
            mix = samples.get(tid) or waits.get(tid, Counter())
            total = sum(mix.values())
            row.update(kind="python", samples=dict(samples.get(tid, {})), waiting=dict(waits.get(tid, {})))
            if total == 0:
                cpu["other"] += seconds
                unsampled_python += seconds
            for category, n in mix.items():
                cpu[category] += seconds * n / total
        elif comm == TOKENIZER_POOL:
            row.update(kind="native, tokenizer pool", counted_as="tokenize")
            cpu["tokenize"] += seconds
            native_tokenize += seconds
        elif comm in forward_threads:
            row.update(kind="native, started by the forward-pass thread", counted_as="forward")
            cpu["forward"] += seconds
            native_forward += seconds
        else:
            row.update(kind="native, other origin (assumed torch)", counted_as="forward")
            cpu["forward"] += seconds
            native_unknown += seconds
        if seconds > 0 or tid in samples or tid in waits:
            threads.append(row)
    process = end.process - start.process
    exited = max(0.0, process - sum(s for _, s in used.values()))
    cpu["other"] += exited
    total_cpu = sum(cpu.values())
    # The simpler reading: samples x interval, and every unseen cycle counted as forward.
    sampled = {c: sum(m[c] for m in samples.values()) * interval for c in CATEGORIES}
    unseen = process - sum(sampled.values())
    naive = dict(sampled)
    naive["forward"] += max(0.0, unseen)
    naive_total = sum(naive.values())
    return {
        "cpu_s": cpu,
        "share": {c: cpu[c] / total_cpu if total_cpu else 0.0 for c in CATEGORIES},
        "outside_forward_share": 1 - cpu["forward"] / total_cpu if total_cpu else 0.0,
        "process_cpu_s": process,
        "attributed_cpu_s": total_cpu,
        "native_cpu_s": {
            "forward_workers": native_forward,
            "tokenizer_pool": native_tokenize,
            "other_origin_counted_as_forward": native_unknown,
        },
        "python_cpu_without_samples_s": unsampled_python,
        "exited_threads_cpu_s": exited,
        "samples": {c: sum(m[c] for m in samples.values()) for c in CATEGORIES},
        "waiting_samples_left_out": sum(sum(m.values()) for m in waits.values()),
        "sample_interval_s": interval,
        "samples_x_interval": {
            "cpu_s": naive,
            "sampled_cpu_s": sampled,
            "unseen_cpu_s": unseen,
            "share": {c: naive[c] / naive_total if naive_total else 0.0 for c in CATEGORIES},
            "outside_forward_share": 1 - naive["forward"] / naive_total if naive_total else 0.0,
        },
        "threads": threads,
        "top_frames": {c: dict(top[c].most_common(10)) for c in top},
    }


# --- load --------------------------------------------------------------------------------------------


@dataclass
class Done:
    at: float
    outcome: str
    ms: float


async def clients_loop(
    url: str, queries: list[str], clients: int, stop: asyncio.Event, done: list[Done]
) -> None:
    """``clients`` closed-loop clients sending DL19 searches until ``stop`` is set."""
    counter = iter(range(10**9))

    async def client(session: aiohttp.ClientSession) -> None:
        for i in counter:
            if stop.is_set():
                return
            query = queries[i % len(queries)]
            outcome, ms = await timed_search(session, url, INDEX, query, "cpu_profile.py", plain="none")
            done.append(Done(time.perf_counter(), outcome, ms))

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=3600)
    ) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))


async def measure(
    url: str, pid: int, queries: list[str], args: argparse.Namespace, raw_path: Path
) -> tuple[Snapshot, Snapshot, list[Done]]:
    stop, done = asyncio.Event(), list[Done]()
    load = asyncio.create_task(clients_loop(url, queries, args.clients, stop, done))
    try:
        await asyncio.sleep(args.warmup)
        if load.done():
            load.result()
        start, end = await record(pid, args.seconds, args.rate, raw_path, args.nonblocking)
    finally:
        stop.set()
        await load
    return start, end, done


def traffic(done: list[Done], start: Snapshot, end: Snapshot, pairs_per_search: float) -> dict[str, Any]:
    window = [d for d in done if start.at <= d.at <= end.at]
    seconds = end.at - start.at
    outcomes = Counter(d.outcome for d in window)
    latencies = [d.ms for d in window] or [0.0]
    return {
        "searches": len(window),
        "searches_per_s": len(window) / seconds,
        "reranked_per_s": outcomes["reranked"] / seconds,
        "reranked_pairs_per_s": outcomes["reranked"] * pairs_per_search / seconds,
        "p50_ms": statistics.median(latencies),
        "p95_ms": pct(latencies, 0.95),
        "outcomes": dict(outcomes),
    }


# --- report ------------------------------------------------------------------------------------------


def report(result: dict[str, Any]) -> None:
    cpu = result["cpu"]
    window = result["window"]
    print(f"\nproxy process CPU over {window['seconds']:.1f} s: {cpu['process_cpu_s']:.1f} s")
    print(f"{'category':<20}{'CPU s':>9}{'share':>9}   (samples x interval: share)")
    for c in CATEGORIES:
        naive = cpu["samples_x_interval"]["share"][c]
        print(f"{c:<20}{cpu['cpu_s'][c]:>9.2f}{cpu['share'][c]:>9.1%}   ({naive:.1%})")
    native = cpu["native_cpu_s"]
    print(
        f"  of which native threads: forward workers {native['forward_workers']:.2f} s, tokenizer pool "
        f"{native['tokenizer_pool']:.2f} s, other origin (counted as forward) "
        f"{native['other_origin_counted_as_forward']:.2f} s; "
        f"exited threads {cpu['exited_threads_cpu_s']:.2f} s"
    )
    print(f"assumption: {ASSUMPTION}")
    t = result["traffic"]
    print(
        f"traffic in the window: {t['searches']} searches, {t['reranked_per_s']:.2f} reranked/s "
        f"({t['reranked_pairs_per_s']:.0f} pairs/s), p50 {t['p50_ms']:.0f} ms, outcomes {t['outcomes']}"
    )
    print(
        f"machine busy {window['machine_busy_share']:.0%} of its CPU, the proxy "
        f"{window['proxy_share_of_machine']:.0%}; the clients' process used "
        f"{window['clients_process_cpu_s_whole_run']:.2f} s over warm-up and window\n"
        f"uptime: {result['setup']['uptime_start']} -> {result['setup']['uptime_end']}"
    )
    print(
        f"outside the forward pass: {cpu['outside_forward_share']:.1%} "
        f"(samples x interval: {cpu['samples_x_interval']['outside_forward_share']:.1%})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm", help="tiny, minilm, or a cross-encoder folder")
    ap.add_argument("--es-url", help="a running Elasticsearch (default: start one with the project's script)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0, help="the measured window (whole seconds)")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of load before the window")
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--nonblocking", action="store_true", help="py-spy does not pause the proxy to sample")
    ap.add_argument(
        "--no-deadline",
        action="store_true",
        help="start the proxy as throughput.py does: no rerank deadline and an unbounded queue, so every "
        "search is reranked (with the shipped defaults, searches beyond the model's capacity fall back)",
    )
    ap.add_argument(
        "--proxy-args", default="", help="more rerank-proxy options, one string (default: shipped defaults)"
    )
    ap.add_argument("--data", type=Path, default=datasets.DEFAULT_ROOT)
    ap.add_argument(
        "--out", type=Path, help="JSON path (default: benchmarks/results/profile-<model>-cpu.json)"
    )
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    col = datasets.trec_dl19_or_exit("cpu_profile.py", args.data)
    py_spy()
    flags = ["--rerank-top-k", str(TOP_K), "--rerank-device", "cpu"]
    if args.no_deadline:
        flags += ["--rerank-timeout-ms", "3600000", "--rerank-max-queued-pairs", "1000000"]
    flags += shlex.split(args.proxy_args)
    queries = list(col.queries.values())
    with tempfile.TemporaryDirectory() as tmp, elasticsearch(args.es_url) as es:
        folder, described, label = model_folder(args.model, Path(tmp), list(col.corpus.values())[:2000])
        asyncio.run(index_pool(es, col))
        work = asyncio.run(es_candidates(es, queries))
        pairs_per_search = statistics.mean(len(ps) for _, ps in work)
        print(f"model: {described}\n{machine()}\nload: {uptime()}")
        launcher = ("-c", "from benchmarks.cpu_profile import launch; launch()")
        raw_path = Path(tmp) / "py-spy.txt"
        with proxy_process(es, folder, *flags, launcher=launcher) as (url, proc):
            load_start = uptime()
            print(f"{args.clients} clients: {args.warmup:.0f} s warm-up, {args.seconds:.0f} s sampled")
            own_before = cpu_seconds(Path("/proc/self/stat"))
            start, end, done = asyncio.run(measure(url, proc.pid, queries, args, raw_path))
            own = cpu_seconds(Path("/proc/self/stat")) - own_before
            py_threads = python_threads(proc.pid)
            load_end = uptime()
        stacks = parse_raw(raw_path.read_text())
    cpu = attribute(stacks, start, end, py_threads, 1 / args.rate)
    seconds = end.at - start.at
    busy = end.machine[0] - start.machine[0]
    result: dict[str, Any] = {
        "setup": {
            "model": described,
            "model_name": label,
            "machine": machine(),
            "clients": args.clients,
            "warmup_s": args.warmup,
            "py_spy_rate": args.rate,
            "py_spy_nonblocking": args.nonblocking,
            "proxy_flags": flags,
            "pairs_per_search": pairs_per_search,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "uptime_start": load_start,
            "uptime_end": load_end,
            "command": "python benchmarks/cpu_profile.py " + " ".join(sys.argv[1:]),
            "assumption": ASSUMPTION,
        },
        "window": {
            "seconds": seconds,
            "machine_busy_share": busy / max(1e-9, end.machine[1] - start.machine[1]),
            "proxy_share_of_machine": cpu["process_cpu_s"] / max(1e-9, end.machine[1] - start.machine[1]),
            "clients_process_cpu_s_whole_run": own,
        },
        "traffic": traffic(done, start, end, pairs_per_search),
        "cpu": cpu,
    }
    report(result)
    out = args.out or ROOT / "benchmarks" / "results" / f"profile-{label}-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
