"""benchmarks/peers.py runs from a fresh clone: tiny model, engine and CrossEncoder.predict, offline.

infinity-emb is left out (``--no-infinity``): starting the server takes longer than the rest of the
run, and tests/test_remote_infinity.py already runs it for real. Figures are not asserted; what is
checked is that every contender ran on the same weights and pairs (its ranks agree with the engine's
float32 scores) and that the JSON and the Markdown table were written.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from .conftest import ROOT
from .test_benchmarks import run_benchmark

pytestmark = pytest.mark.slow

DATA = ROOT.parent / "shared" / "data" / "trec-dl19"


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data/trec-dl19 is not beside the clone")
@pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None,
    reason="sentence-transformers (the optional extra 'peers') is not installed",
)
def test_peers_benchmark_runs_offline(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    args = ["--model", "tiny", "--pairs", "200", "--rounds", "1", "--no-infinity", "--out", str(out)]
    result = run_benchmark("peers.py", *args, out=out, timeout=240)
    contenders = result["contenders"]
    assert set(contenders) == {
        "engine_float32_all",
        "engine_float32_4",
        "engine_auto_all",
        "engine_auto_4",
        "predict",
    }
    assert all(row["pairs_per_s"] > 0 for row in contenders.values())
    for key, row in contenders.items():
        if key != "engine_float32_all":  # the same weights and pairs: the same order
            assert row["spearman_vs_engine_float32"] > 0.99, (key, row)
    assert result["setup"]["pairs"] == 200 and result["setup"]["engines"]["float32"]["dtype"] == "float32"
    assert set(result["ratios"]) == {"engine_float32_all_vs_predict", "engine_auto_all_vs_predict"}
    table = out.with_suffix(".md").read_text()
    assert "CrossEncoder.predict" in table and "load average" in table
