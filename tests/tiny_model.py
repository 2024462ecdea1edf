"""Tiny cross-encoders built on the spot, so no test ever downloads weights.

A real WordPiece tokenizer is trained on the test corpus and saved with a randomly initialised
2-layer BERT sequence-classification model. Scores are meaningless but deterministic for a seed,
which is all the proxy's mechanics need: a test can compute the expected order itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def build_tiny_cross_encoder(
    folder: Path, corpus: Iterable[str], *, num_labels: int = 1, seed: int = 0
) -> Path:
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(list(corpus), trainers.WordPieceTrainer(vocab_size=400, special_tokens=special))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = BertTokenizerFast(tokenizer_object=tok, model_max_length=512)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=num_labels,
        # Wide random weights: scores must spread far beyond float32 noise (batched vs single-pair
        # passes differ by ~1e-6), or near-ties would make expected orders flaky.
        initializer_range=0.5,
    )
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 5.0)
    model.save_pretrained(folder)
    return folder


def reference_scores(folder: Path, query: str, passages: list[str], max_length: int = 256) -> list[float]:
    """Scores computed the plain transformers way, independent of the proxy's scorer code."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for passage in passages:
            enc = tokenizer(
                query, passage, truncation="only_second", max_length=max_length, return_tensors="pt"
            )
            logits = model(**enc).logits[0]
            out.append(float(logits[1] - logits[0]) if logits.numel() == 2 else float(logits[0]))
    return out


def reference_window_scores(
    folder: Path, query: str, passage: str, max_length: int, overlap: int
) -> list[float]:
    """One score per window of ``passage`` (MaxP), windows cut by hand from the passage's tokens:
    each holds as many passage tokens as fit beside the query, and shares ``overlap`` with the last."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    q = tokenizer(query, add_special_tokens=False)["input_ids"]
    p = tokenizer(passage, add_special_tokens=False)["input_ids"]
    room = max_length - len(q) - 3
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    out, start = [], 0
    while True:
        window = p[start : start + room]
        ids = [cls, *q, sep, *window, sep]
        types = [0] * (len(q) + 2) + [1] * (len(window) + 1)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits[0]
        out.append(float(logits[0]))
        if start + room >= len(p):
            return out
        start += room - overlap
