"""The host side of a batch: padded tensors without a step per row, tokenizing on several threads."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from proxy.cross_encoder import CrossEncoderModel
from proxy.runtime import batch_tensors

from .corpus import DOCS


def reference(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (longest - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])
    return ids, mask


def test_batch_tensors_pad_every_row_at_its_right() -> None:
    rng = random.Random(4)
    for _ in range(50):
        rows = [[rng.randint(1, 999) for _ in range(rng.randint(1, 40))] for _ in range(rng.randint(1, 12))]
        types = [[rng.randint(0, 1) for _ in row] for row in rows]
        got = batch_tensors(rows, types, 0, "cpu")
        ids, mask = reference(rows, 0)
        assert torch.equal(got["input_ids"], ids) and torch.equal(got["attention_mask"], mask)
        assert torch.equal(got["token_type_ids"], reference(types, 0)[0])
        assert got["input_ids"].dtype == torch.long and got["attention_mask"].dtype == torch.long
    assert "token_type_ids" not in batch_tensors([[5, 6], [7]], None, 3, "cpu")
    assert batch_tensors([[5, 6], [7]], None, 3, "cpu")["input_ids"].tolist() == [[5, 6], [7, 3]]


@pytest.mark.slow
def test_tokenizing_on_several_threads_gives_what_one_thread_gives(tiny_model: Path) -> None:
    """Each thread has its own tokenizer: a long query clipped without truncation on one thread never
    leaves another thread's pairs untruncated."""
    model = CrossEncoderModel(str(tiny_model), max_length=32, device="cpu", dtype="float32")
    passages = [d["text"] for d in DOCS]
    queries = ["tea", " ".join(["coffee water"] * 40), "bread", " ".join(["ocean"] * 30)]
    serial = [model.encode(q, passages) for q in queries]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            parallel = list(pool.map(lambda q: model.encode(q, passages), queries * 3))
            assert parallel == serial * 3
    assert all(len(item.ids) <= 32 for items, _ in serial for item in items)
