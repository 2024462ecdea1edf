"""Tiny cross-encoders built on the spot, so no test ever downloads weights.

A real WordPiece tokenizer is trained on the test corpus and saved with a randomly initialised
2-layer BERT sequence-classification model. Scores are meaningless but deterministic for a seed,
which is all the proxy's mechanics need: a test can compute the expected order itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def _tokenizer(folder: Path, corpus: Iterable[str]) -> int:
    """A WordPiece tokenizer trained on ``corpus``, saved in ``folder``; returns its vocabulary size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

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
    return int(tok.get_vocab_size())


def _bert_config(vocab_size: int, **kw: object) -> object:
    from transformers import BertConfig

    # Wide random weights: scores must spread far beyond float32 noise (batched vs single-pair
    # passes differ by ~1e-6), or near-ties would make expected orders flaky.
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        initializer_range=0.5,
        **kw,
    )


def build_tiny_cross_encoder(
    folder: Path, corpus: Iterable[str], *, num_labels: int = 1, seed: int = 0, head_std: float = 5.0
) -> Path:
    """``head_std``: the spread of the classification head's weights. The default spreads logits far
    apart (see :func:`_bert_config`); a server that answers with sigmoid scores, as infinity-emb does,
    would flatten such logits into ties at 1.0, so it is served a model with a small head."""
    import torch
    from transformers import BertForSequenceClassification

    vocab = _tokenizer(folder, corpus)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(_bert_config(vocab, num_labels=num_labels)).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, head_std)
    model.save_pretrained(folder)
    return folder


def build_tiny_bi_encoder(
    folder: Path, corpus: Iterable[str], *, pooling: str | None = "mean", seed: int = 0
) -> Path:
    """A random BERT encoder; ``pooling`` cls/mean writes a sentence-transformers layout, None a plain
    transformers folder."""
    import json

    import torch
    from transformers import BertModel

    vocab = _tokenizer(folder, corpus)
    torch.manual_seed(seed)
    BertModel(_bert_config(vocab), add_pooling_layer=False).eval().save_pretrained(folder)  # type: ignore[arg-type]
    if pooling is not None:
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]
        (folder / "modules.json").write_text(json.dumps(modules))
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(
            json.dumps(
                {
                    "word_embedding_dimension": 32,
                    "pooling_mode_cls_token": pooling == "cls",
                    "pooling_mode_mean_tokens": pooling == "mean",
                }
            )
        )
    return folder


def reference_cosines(
    folder: Path, query: str, passages: list[str], pooling: str, max_length: int
) -> list[float]:
    """Cosine scores computed the plain transformers way, one text at a time."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()

    def embed(text: str) -> torch.Tensor:
        enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state[0]
        return hidden[0] if pooling == "cls" else hidden.mean(0)

    q = embed(query)
    return [float(torch.nn.functional.cosine_similarity(q, embed(p), dim=0)) for p in passages]


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
