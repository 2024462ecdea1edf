"""Start-up checks of a model against the configuration, so a mismatch stops the process with one line.

Each check turns a failure that would otherwise surface later, as a traceback in warm-up or as a
failed batch at every search, into a :class:`~proxy.runtime.ModelLoadError` that names the option at
fault, the value and what the model or this machine allows. All are blocking and run once, on the
loading thread.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

from .runtime import ModelLoadError

# Tokenizers without a length of their own report transformers' VERY_LARGE_INTEGER (1e30).
_NO_TOKENIZER_LIMIT = 10**9


def _looks_like_path(model: str) -> bool:
    """A Hugging Face id is ``name`` or ``owner/name`` and never starts with '.', '/' or '~'."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or Path(model).exists()


def check_local_folder(model: str) -> None:
    """A local model folder exists and has a readable ``config.json`` of a known ``model_type``.

    transformers would report these as a Hub repository id error, a truncated tokenizer message or a
    ``TypeError``; Hugging Face ids are left to transformers.
    """
    if not _looks_like_path(model):
        return
    folder = Path(model)
    if not folder.is_dir():
        raise ModelLoadError(f"rerank.model: cannot load {model!r}: no such folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"rerank.model: cannot load {model!r}: the folder has no config.json")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelLoadError(f"rerank.model: cannot load {model!r}: config.json: {exc.strerror}") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ModelLoadError(f"rerank.model: cannot load {model!r}: config.json is not valid JSON") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"rerank.model: cannot load {model!r}: config.json is not a JSON object")
    model_type = config.get("model_type")
    if model_type is not None:
        import transformers
        from transformers import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            raise ModelLoadError(
                f"rerank.model: cannot load {model!r}: model_type {model_type!r} in config.json is not "
                f"an architecture transformers {transformers.__version__} knows"
            )


def check_tokenizer(model: str, tokenizer: Any) -> None:
    """A fast tokenizer with a vocabulary: the scorers need offsets and overflowing windows, which only
    fast tokenizers give, and transformers builds a tokenizer of special tokens alone, silently, for a
    folder without tokenizer files."""
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(
            f"rerank.model: {model!r} has no fast tokenizer ({type(tokenizer).__name__} is Python-only); "
            "the proxy needs one (a tokenizer.json, or files transformers can convert)"
        )
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise ModelLoadError(
            f"rerank.model: {model!r} has no tokenizer vocabulary (no tokenizer.json, vocab.txt or similar)"
        )


def length_limit(net: Any, tokenizer: Any) -> tuple[int, str] | None:
    """The most tokens one sequence of this model may have, and where that limit comes from.

    ``max_position_embeddings`` caps it (learned positions fail beyond it, rotary and relative ones
    were not trained beyond it), less the positions a RoBERTa-style embedding skips (it numbers tokens
    from ``padding_idx + 1``, so 514 positions read 512 tokens); a tokenizer's ``model_max_length``
    caps it too. Special tokens count within the limit, as they do
    within ``rerank.max_length``. ``None`` when the model states no limit.
    """
    limits: list[tuple[int, str]] = []
    positions = getattr(net.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        embeddings = getattr(getattr(net, "base_model", net), "embeddings", None)
        pad = getattr(getattr(embeddings, "position_embeddings", None), "padding_idx", None)
        skipped = pad + 1 if isinstance(pad, int) else 0
        why = f"max_position_embeddings {positions}" + (f", of which {skipped} unused" if skipped else "")
        limits.append((positions - skipped, why))
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max < _NO_TOKENIZER_LIMIT:
        limits.append((tokenizer_max, f"its tokenizer's model_max_length {tokenizer_max}"))
    return min(limits, key=lambda limit: limit[0]) if limits else None  # positions first on a tie


def check_max_length(model: str, max_length: int, net: Any, tokenizer: Any) -> None:
    """``rerank.max_length`` fits the model: longer pairs fail every forward pass (position ids out
    of range), in warm-up or, with warm-up off, at every search."""
    limit = length_limit(net, tokenizer)
    if limit is not None and max_length > limit[0]:
        raise ModelLoadError(
            f"rerank.max_length: {max_length} is more than {model!r} can read: {limit[0]} tokens "
            f"({limit[1]}); set rerank.max_length to {limit[0]} or less"
        )


def check_compiler(device: str) -> None:
    """``rerank.compile`` needs a compiler: inductor builds C++ kernels on CPU with the one torch finds
    (``CXX``, else ``g++``), and Triton builds its CUDA launcher with a C compiler (``CC``, else gcc or
    clang). Both look only at the first call, which would be a warm-up traceback or, with warm-up off,
    a failure at every search. Where torch or Triton lay out their lookup differently, warm-up decides.
    """
    if device == "mps":
        return
    try:
        if device.startswith("cuda"):
            triton_build = importlib.import_module("triton.runtime.build")
            found = shutil.which(triton_build._find_compiler("c")) is not None
        else:
            from torch._inductor import exc as inductor_exc
            from torch._inductor.cpp_builder import get_cpp_compiler

            try:
                get_cpp_compiler()
                found = True
            except inductor_exc.InvalidCxxCompiler:
                found = False
    except ImportError:
        return
    except RuntimeError:  # Triton: "Failed to find C compiler"
        found = False
    if not found:
        kind = "C (CC, gcc or clang, for Triton)" if device.startswith("cuda") else "C++ (CXX or g++)"
        raise ModelLoadError(
            f"rerank.compile: true needs a {kind} compiler for torch.compile on {device}, and none "
            "was found; install one or set rerank.compile: false"
        )
