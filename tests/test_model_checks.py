"""Start-up checks of a model against the settings, in process: what the machine cannot show.

tests/test_startup_errors.py runs the real command for each failure this machine can produce; here
torch's view of the hardware is faked (a CPU-only build, two GPUs, an Apple GPU that is missing),
limits are checked at their edge, and the warm-up backstop is exercised.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from proxy import runtime
from proxy.config import RerankConfig
from proxy.cross_encoder import CrossEncoderModel
from proxy.model_checks import check_compiler, check_local_folder, length_limit
from proxy.runtime import (
    ModelLoadError,
    cgroup_cpu_limit,
    cuda_capability,
    pick_device,
    pick_dtype,
    set_cpu_threads,
    usable_cores,
)
from proxy.scorer import build_model

from .tiny_model import build_tiny_cross_encoder

TEXTS = ["coffee beans and espresso", "green tea leaves", "a long walk in the park"]


@pytest.fixture
def torch_sees(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Set what torch reports about CUDA and MPS."""
    import torch

    def see(*, cuda_built: bool = True, gpus: int = 0, mps_built: bool = False) -> None:
        monkeypatch.setattr(torch.version, "cuda", "12.8" if cuda_built else None)
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.backends.mps, "is_built", lambda: mps_built)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)

    return see


def test_cuda_on_a_cpu_only_torch_build(torch_sees: Any) -> None:
    torch_sees(cuda_built=False)
    with pytest.raises(
        ModelLoadError, match=r"^rerank\.device: 'cuda' .*this torch build has no CUDA support"
    ):
        pick_device("cuda")


def test_cuda_without_a_visible_device(torch_sees: Any) -> None:
    torch_sees(gpus=0)
    with pytest.raises(
        ModelLoadError, match=r"^rerank\.device: 'cuda:0' asked for but no CUDA device is visible"
    ):
        pick_device("cuda:0")


def test_cuda_index_beyond_the_device_count(torch_sees: Any) -> None:
    torch_sees(gpus=2)
    assert pick_device("cuda") == "cuda"
    assert pick_device("cuda:1") == "cuda:1"
    with pytest.raises(
        ModelLoadError,
        match=r"^rerank\.device: 'cuda:2' .*only 2 CUDA devices are visible \(cuda:0, cuda:1\)",
    ):
        pick_device("cuda:2")
    torch_sees(gpus=1)
    with pytest.raises(
        ModelLoadError, match=r"'cuda:5' asked for but only 1 CUDA device is visible \(cuda:0\)"
    ):
        pick_device("cuda:5")


@pytest.mark.parametrize(("built", "why"), [(True, "no usable Apple GPU"), (False, "no MPS support")])
def test_mps_where_it_is_not_available(torch_sees: Any, built: bool, why: str) -> None:
    torch_sees(mps_built=built)
    with pytest.raises(
        ModelLoadError, match=rf"^rerank\.device: 'mps' asked for but it is not available: .*{why}"
    ):
        pick_device("mps")


@pytest.mark.slow
def test_length_limit_is_exact_for_bert(tiny_model: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"^rerank\.max_length: 513 is more than .* 512 tokens"):
        CrossEncoderModel(str(tiny_model), max_length=513, device="cpu", dtype="float32")
    model = CrossEncoderModel(str(tiny_model), max_length=512, device="cpu", dtype="float32")
    model.warm_up(2)  # a pair of exactly 512 tokens runs
    model.tokenizer.model_max_length = 100
    assert length_limit(model.net, model.tokenizer) == (100, "its tokenizer's model_max_length 100")
    model.tokenizer.model_max_length = int(1e30)  # transformers' "no limit"
    assert length_limit(model.net, model.tokenizer) == (512, "max_position_embeddings 512")


@pytest.mark.slow
def test_length_limit_skips_robertas_unused_positions(tiny_model: Path, tmp_path: Path) -> None:
    """RoBERTa numbers positions from padding_idx + 1: 40 positions with pad id 0 read 39 tokens."""
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    folder = tmp_path / "roberta"
    shutil.copytree(tiny_model, folder)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
        pad_token_id=0,  # the tiny tokenizer's [PAD]
        num_labels=1,
    )
    (folder / "model.safetensors").unlink()
    (folder / "config.json").unlink()
    RobertaForSequenceClassification(config).save_pretrained(folder)
    with pytest.raises(
        ModelLoadError,
        match=r"40 is more than .* 39 tokens \(max_position_embeddings 40, of which 1 unused\)",
    ):
        CrossEncoderModel(str(folder), max_length=40, device="cpu", dtype="float32")
    CrossEncoderModel(str(folder), max_length=39, device="cpu", dtype="float32").warm_up(2)


@pytest.mark.parametrize(
    ("config", "why"),
    [
        ("[1, 2]", "config.json is not a JSON object"),
        ('{"model_type": "bert"', "config.json is not valid JSON"),
        (b"\xff\xfe", "config.json is not valid JSON"),
        ('{"model_type": "no-such-architecture"}', "model_type 'no-such-architecture' in config.json is not"),
    ],
)
def test_broken_config_json(tmp_path: Path, config: str | bytes, why: str) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(config if isinstance(config, bytes) else config.encode())
    with pytest.raises(ModelLoadError, match=rf"^rerank\.model: cannot load '{tmp_path}': {why}"):
        check_local_folder(str(tmp_path))


def test_hub_ids_are_left_to_transformers(tmp_path: Path) -> None:
    check_local_folder("cross-encoder/msmarco-MiniLM-L6-en-de-v1")
    check_local_folder("bert-base-uncased")
    with pytest.raises(ModelLoadError, match="no such folder"):
        check_local_folder(str(tmp_path / "a" / "b"))
    with pytest.raises(ModelLoadError, match=r"the folder has no config\.json"):
        check_local_folder(str(tmp_path))


@pytest.mark.slow
def test_missing_weights_is_one_line(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_model, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"^rerank\.model: cannot load .*model\.safetensors") as info:
        CrossEncoderModel(str(folder), max_length=32, device="cpu", dtype="float32")
    assert "\n" not in str(info.value)


def test_compiler_lookup() -> None:
    from torch._inductor import config as inductor_config

    # config.patch, not monkeypatch: undoing a monkeypatch deletes the option from torch's config.
    with (
        inductor_config.patch({"cpp.cxx": (None, "/nonexistent/g++")}),
        pytest.raises(ModelLoadError, match=r"^rerank\.compile: true needs a C\+\+ .* compiler .* on cpu"),
    ):
        check_compiler("cpu")
    if shutil.which("g++"):
        with inductor_config.patch({"cpp.cxx": (None, "g++")}):
            check_compiler("cpu")
    check_compiler("mps")  # Metal kernels: no C compiler involved


def test_compiler_lookup_for_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    build = pytest.importorskip("triton.runtime.build")

    def missing(language: str) -> str:
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable")

    monkeypatch.setattr(build, "_find_compiler", missing)
    with pytest.raises(ModelLoadError, match=r"^rerank\.compile: true needs a C \(CC, gcc or clang"):
        check_compiler("cuda")
    monkeypatch.setattr(build, "_find_compiler", lambda language: "/nonexistent/cc")
    with pytest.raises(ModelLoadError, match=r"^rerank\.compile"):
        check_compiler("cuda:1")


@pytest.mark.slow
def test_a_failing_warm_up_is_one_line(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: CrossEncoderModel, max_batch_pairs: int) -> None:
        raise RuntimeError("CUDA error: an illegal memory access\nmore detail")

    monkeypatch.setattr(CrossEncoderModel, "warm_up", boom)
    cfg = RerankConfig(model=str(tiny_model), device="cpu", dtype="float32")
    with pytest.raises(ModelLoadError) as info:
        build_model(cfg)
    assert (
        str(info.value)
        == f"rerank.model: '{tiny_model}' failed on a warm-up batch: CUDA error: an illegal memory access"
    )


@pytest.mark.slow
def test_compile_failing_in_warm_up_names_rerank_compile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backstop where the up-front lookup cannot see the failure: inductor's own error, at the
    first compiled call, becomes one line naming rerank.compile."""
    import torch
    from torch._inductor import config as inductor_config

    import proxy.model_checks

    model = build_tiny_cross_encoder(tmp_path / "ce", TEXTS, seed=3)  # a model no cache has seen
    monkeypatch.setattr(proxy.model_checks, "check_compiler", lambda device: None)
    torch._dynamo.reset()
    try:
        with (
            inductor_config.patch({"cpp.cxx": (None, "/nonexistent/g++"), "fx_graph_cache": False}),
            pytest.raises(
                ModelLoadError, match=r"^rerank\.compile: torch\.compile failed while warming up: "
            ),
        ):
            build_model(
                RerankConfig(model=str(model), device="cpu", dtype="float32", compile=True, max_length=32)
            )
    finally:
        torch._dynamo.reset()


def test_auto_device_falling_back_to_cpu_says_why(torch_sees: Any, caplog: pytest.LogCaptureFixture) -> None:
    torch_sees(cuda_built=False)
    with caplog.at_level(logging.INFO, logger="proxy.runtime"):
        assert pick_device("auto") == "cpu"
    assert "using cpu because this torch build" in caplog.text and "no CUDA support" in caplog.text
    caplog.clear()
    torch_sees(cuda_built=True, gpus=0)
    with caplog.at_level(logging.INFO, logger="proxy.runtime"):
        assert pick_device("auto") == "cpu"
    assert "torch sees no CUDA device" in caplog.text


@pytest.mark.parametrize(
    ("capability", "dtype"),
    [
        ((9, 0), "bfloat16"),
        ((8, 6), "bfloat16"),
        ((8, 0), "bfloat16"),
        ((7, 5), "float16"),
        ((7, 0), "float16"),
    ],
)
def test_auto_dtype_by_compute_capability(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], dtype: str
) -> None:
    """T4 (7.5) and V100 (7.0) report bf16 as supported but only emulate it: float16 there."""
    import torch

    asked: list[int] = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: asked.append(i) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert cuda_capability("cuda:1") == capability and asked == [1]
    assert pick_dtype("auto", "cuda:1", cuda_capability("cuda:1")) == dtype
    assert cuda_capability("cpu") is None


@pytest.mark.parametrize(
    ("cpu_max", "limit"),
    [
        ("200000 100000\n", 2),
        ("150000 100000\n", 2),  # 1.5 CPUs: two threads, each busy three quarters of the time
        ("50000 100000\n", 1),
        ("max 100000\n", None),
        ("garbage\n", None),
        (None, None),  # no cgroup v2 file
    ],
)
def test_cpu_threads_follow_the_cgroup_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_max: str | None, limit: int | None
) -> None:
    import os

    import torch

    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    assert cgroup_cpu_limit(path) == limit
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))  # a 64-core node
    assert usable_cores(path) == (limit or 64)
    monkeypatch.setattr(runtime, "CGROUP_CPU_MAX", path)
    before = torch.get_num_threads()
    try:
        assert set_cpu_threads(0) == (limit or 64)
        assert set_cpu_threads(3) == 3  # rerank.threads set explicitly wins
    finally:
        torch.set_num_threads(before)
