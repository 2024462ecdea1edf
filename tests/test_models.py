"""Loading the models a proxy serves (proxy/models.py): each named on failure, each one's memory told."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from proxy import models
from proxy.config import DEFAULT_MODEL, RerankConfig
from proxy.models import Footprint, close_models, describe, load_models, option_key, renamed
from proxy.runtime import ModelLoadError

CPU = RerankConfig(device="cpu", dtype="float32", warmup=False)


@pytest.mark.parametrize(
    ("name", "message", "expected"),
    [
        (DEFAULT_MODEL, "rerank.model: cannot load '/x': no such folder", "rerank.model: cannot load"),
        ("german", "rerank.model: cannot load '/x': no such folder", "models.german.model: cannot load"),
        ("german", "rerank.device: 'cuda:3' asked for", "models.german.device: 'cuda:3' asked for"),
        ("german", "the server answered 401", "models.german.model: the server answered 401"),
    ],
)
def test_a_load_error_names_the_models_key(name: str, message: str, expected: str) -> None:
    assert str(renamed(name, ModelLoadError(message))).startswith(expected)


def test_option_keys() -> None:
    assert option_key(DEFAULT_MODEL) == "rerank.model"
    assert option_key("german", "backend_url") == "models.german.backend_url"


class Fake:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self._log = name, log

    async def score(self, query: str, passages: Sequence[str]) -> list[float]:
        return [0.0] * len(passages)

    async def aclose(self) -> None:
        self._log.append(self.name)


async def test_a_model_that_fails_to_load_stops_start_up_and_closes_those_loaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    closed: list[str] = []

    async def load(cfg: RerankConfig) -> Fake:
        if cfg.model == "broken":
            raise ModelLoadError(f"rerank.model: cannot load {cfg.model!r}: no such folder")
        return Fake(cfg.model, closed)

    monkeypatch.setattr(models, "load_scorer", load)
    configs = {DEFAULT_MODEL: replace(CPU, model="first"), "german": replace(CPU, model="broken")}
    with pytest.raises(ModelLoadError, match=r"^models\.german\.model: cannot load 'broken'"):
        await load_models(configs)
    assert closed == ["first"]


async def test_a_missing_folder_is_named_by_its_key(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"^models\.german\.model: cannot load .*no such folder"):
        await load_models({"german": replace(CPU, model=str(tmp_path / "missing"))})


async def test_every_scorer_is_closed_even_when_one_fails_to_close() -> None:
    closed: list[str] = []

    class Stuck(Fake):
        async def aclose(self) -> None:
            raise RuntimeError("stuck")

    with pytest.raises(RuntimeError, match="stuck"):
        await close_models({"a": Stuck("a", closed), "b": Fake("b", closed)})
    assert closed == ["b"]


async def test_each_model_gets_one_line_with_its_memory(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    caplog.set_level(logging.INFO, logger="proxy")
    loaded = await load_models({DEFAULT_MODEL: replace(CPU, model=str(tiny_model))})
    try:
        net = loaded[DEFAULT_MODEL].model.net  # type: ignore[attr-defined]
        tensors: list[torch.Tensor] = [*net.parameters(), *net.buffers()]
        size = sum(t.numel() * t.element_size() for t in tensors) / 1024 / 1024
    finally:
        await close_models(loaded)
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy"]
    assert len(lines) == 1
    assert lines[0].startswith(f"model default: {tiny_model} (cross-encoder) on cpu, float32: ")
    assert f"parameters {size:.1f} MiB" in lines[0]
    assert "process RSS " in lines[0]


def test_a_remote_model_has_no_memory_here() -> None:
    remote = replace(CPU, model="bge-reranker", backend="tei", backend_url="http://tei:8080/rerank")
    line = describe("shared", remote, Fake("bge-reranker", []), Footprint(None, None, None))
    assert (
        line == "model shared: bge-reranker (cross-encoder via tei backend, no model memory in this process)"
    )


def test_memory_figures_in_the_line() -> None:
    footprint = Footprint(3 * 1024 * 1024, 5 * 1024 * 1024 + 1024 * 512, None)
    line = describe("german", replace(CPU, model="m"), Fake("m", []), footprint)
    assert line == "model german: m (cross-encoder) on cpu, float32: parameters 3.0 MiB, process RSS +5.5 MiB"
