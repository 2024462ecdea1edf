"""The models one proxy serves: loaded together at start-up, each behind its own queue, closed together.

Every model a search can reach (:meth:`proxy.config.Config.models_in_use`) is loaded through
:func:`proxy.scorer.load_scorer`, one after another, so that each one's memory can be told apart in the
start-up log: the bytes of its parameters and buffers (what the weights take wherever they live) and,
for a model in this process, how much the process's resident memory and the GPU's allocated memory
grew while it loaded and warmed up (tokenizer, the warm-up batch's allocator cache; torch and
transformers are imported first, so their own memory is nobody's model's).
A model that fails to load stops start-up with one line naming its key, ``rerank.model`` for the
default and ``models.<name>.model`` for a named one; those already loaded are closed first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import DEFAULT_MODEL, RerankConfig
from .runtime import ModelLoadError
from .scorer import Scorer, load_scorer

log = logging.getLogger("proxy")

_MB = 1024 * 1024


@dataclass(frozen=True)
class Footprint:
    """What one loaded model takes: ``None`` where it cannot be known (a remote model, no /proc)."""

    parameter_bytes: int | None
    rss_delta_bytes: int | None
    gpu_delta_bytes: int | None


def option_key(name: str, key: str = "model") -> str:
    """Where a model's option lives in the configuration: ``rerank.<key>`` for the default model."""
    return f"rerank.{key}" if name == DEFAULT_MODEL else f"models.{name}.{key}"


def renamed(name: str, exc: ModelLoadError) -> ModelLoadError:
    """A load error as the operator must fix it: the scorer names options ``rerank.<key>``, which for
    a named model are ``models.<name>.<key>``; a message naming no option is put under ``model``."""
    text = str(exc)
    if name == DEFAULT_MODEL:
        return exc
    if text.startswith("rerank."):
        return ModelLoadError(f"models.{name}." + text.removeprefix("rerank."))
    return ModelLoadError(f"{option_key(name)}: {text}")


def parameter_bytes(scorer: Scorer) -> int | None:
    """Bytes of a local model's parameters and buffers (torch tensors), None for any other scorer."""
    net = getattr(getattr(scorer, "model", None), "net", None)
    if net is None or not hasattr(net, "parameters"):
        return None
    tensors = [*net.parameters(), *net.buffers()]
    return int(sum(t.numel() * t.element_size() for t in tensors))


def process_rss() -> int | None:
    """This process's resident memory in bytes (Linux's /proc), None elsewhere."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def gpu_allocated(cfg: RerankConfig) -> int | None:
    """Bytes torch has allocated on the CUDA devices, None when the model cannot be on one."""
    if cfg.backend != "local" or not (cfg.device == "auto" or cfg.device.startswith("cuda")):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return int(sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())))


def _import_frameworks() -> None:
    """Import what every local model needs (hundreds of MiB), before the first model's RSS is read."""
    import torch  # noqa: F401
    import transformers  # noqa: F401


def _delta(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else after - before


def describe(name: str, cfg: RerankConfig, scorer: Scorer, footprint: Footprint) -> str:
    """The start-up line for one loaded model: name, model id, kind, device, dtype, memory."""
    model: Any = getattr(scorer, "model", None)
    if cfg.backend != "local":
        where = f"{cfg.backend} backend, no model memory in this process"
        return f"model {name}: {scorer.name} ({cfg.scorer} via {where})"
    kind = getattr(model, "kind", cfg.scorer)
    device = getattr(model, "device", cfg.device)
    dtype = getattr(model, "dtype", cfg.dtype)
    if getattr(model, "autocast", False):
        dtype = "bfloat16 autocast (linear weights bfloat16, the rest float32)"
    parts = []
    if footprint.parameter_bytes is not None:
        parts.append(f"parameters {footprint.parameter_bytes / _MB:.1f} MiB")
    if footprint.rss_delta_bytes is not None:
        parts.append(f"process RSS {footprint.rss_delta_bytes / _MB:+.1f} MiB")
    if footprint.gpu_delta_bytes is not None:
        parts.append(f"GPU allocated {footprint.gpu_delta_bytes / _MB:+.1f} MiB")
    memory = ", ".join(parts) or "memory unknown"
    return f"model {name}: {scorer.name} ({kind}) on {device}, {dtype}: {memory}"


async def load_models(configs: Mapping[str, RerankConfig]) -> dict[str, Scorer]:
    """Each configured model behind its own batching queue, by name; one line each in the log."""
    loaded: dict[str, Scorer] = {}
    try:
        for name, cfg in configs.items():
            if cfg.backend == "local":  # the frameworks' own memory is nobody's model's
                await asyncio.to_thread(_import_frameworks)
            rss, gpu = process_rss(), gpu_allocated(cfg)
            try:
                scorer: Scorer = await load_scorer(cfg)
            except ModelLoadError as exc:
                raise renamed(name, exc) from exc
            loaded[name] = scorer
            local = cfg.backend == "local"
            footprint = Footprint(
                parameter_bytes(scorer),
                _delta(rss, process_rss()) if local else None,
                _delta(gpu, gpu_allocated(cfg)),
            )
            log.info("%s", describe(name, cfg, scorer, footprint))
    except BaseException:
        with contextlib.suppress(Exception):  # the load error is the one to report
            await close_models(loaded)
        raise
    return loaded


async def close_models(scorers: Mapping[str, Scorer]) -> None:
    """Close every scorer, each even when another fails to close (then the first failure is raised)."""
    failures: list[BaseException] = []
    for scorer in scorers.values():
        try:
            await scorer.aclose()
        except Exception as exc:
            failures.append(exc)
    if failures:
        raise failures[0]
