"""Text-only inversion baseline (output2prompt-style): the same T5 sizes, but the encoder reads
the target's greedy *output text* instead of its next-token distribution.

This is what an attacker without log-probs can do. Trained with the same preset, batch size,
learning rate and number of steps as the log-prob inverter it is compared with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from .config import InverterConfig, T5InverterConfig
from .inverter import encode_labels, pad_labels
from .t5_inverter import decode_labels, new_t5

FORMAT = "logit2prompt-text-inverter"
META_NAME = "text_inverter.json"
OUTPUT_TOKENS = 32  # greedy reply tokens the attacker sees
WARMUP_FRACTION = 0.05
CLIP_NORM = 1.0


def target_outputs(
    target, prompts: Sequence[str], max_new_tokens: int = OUTPUT_TOKENS
) -> list[str]:
    """The target's greedy reply to each prompt, rendered by its threat model."""
    return target.complete([target.render(p) for p in prompts], max_new_tokens)


def text_config(config: InverterConfig) -> T5InverterConfig:
    """The T5 sizes of a log-prob inverter's config; a prefix-lm has none, so it gets the T5
    defaults (the `small` preset's sizes, which version-1 prefix-lm configs carried)."""
    if isinstance(config, T5InverterConfig):
        return T5InverterConfig(**config.to_dict())
    shared = {
        k: v for k, v in config.to_dict().items() if k in T5InverterConfig.__dataclass_fields__
    }
    return T5InverterConfig(**{**shared, "decoder": "t5"})


class TextInverter(nn.Module):
    """T5 from the inverter preset's sizes; input and output share the target's tokenizer."""

    def __init__(self, config: T5InverterConfig, tokenizer, fingerprint: dict | None = None):
        super().__init__()
        self.config, self.tokenizer, self.fingerprint = config, tokenizer, fingerprint
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad
        # Same sizes and initialisation as the log-prob inverter, so the comparison is fair.
        self.t5 = new_t5(config, len(tokenizer), pad, eos, pad)

    def _inputs(self, texts: Sequence[str]) -> dict:
        enc = self.tokenizer(
            [t or " " for t in texts],
            add_special_tokens=False,
            truncation=True,
            max_length=OUTPUT_TOKENS * 2,
            padding=True,
            return_tensors="pt",
        )
        device = next(self.parameters()).device
        return {
            "input_ids": enc["input_ids"].to(device),
            "attention_mask": enc["attention_mask"].to(device),
        }

    def loss(self, outputs: Sequence[str], prompts: Sequence[str]) -> torch.Tensor:
        """Mean token cross-entropy; like the inverter, only real label positions go through
        the 49k-wide output projection (it dominates the step)."""
        labels = pad_labels(encode_labels(self.tokenizer, prompts, self.config.max_length))
        labels = labels.to(next(self.parameters()).device)
        inputs = self._inputs(outputs)
        encoded = self.t5.encoder(**inputs).last_hidden_state
        decoded = decode_labels(self.t5, encoded, inputs["attention_mask"], labels)
        keep = labels != -100
        logits = self.t5.lm_head(decoded[keep]).float()
        return nn.functional.cross_entropy(logits, labels[keep])

    @torch.inference_mode()
    def invert(self, outputs: Sequence[str], batch_size: int = 64) -> list[str]:
        """Recovered prompts from the target's output texts (greedy decoding)."""
        self.eval()
        out: list[str] = []
        for start in range(0, len(outputs), batch_size):
            ids = self.t5.generate(
                **self._inputs(outputs[start : start + batch_size]),
                max_new_tokens=self.config.max_length,
                do_sample=False,
            )
            out.extend(self.tokenizer.batch_decode(ids, skip_special_tokens=True))
        return [x.strip() for x in out]

    def save_pretrained(self, directory: str | Path, training: dict | None = None) -> None:
        directory = Path(directory)
        self.t5.save_pretrained(directory / "t5", safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        meta = {
            "format": FORMAT,
            "config": self.config.to_dict(),
            "fingerprint": self.fingerprint,
            "training": training or {},
        }
        (directory / META_NAME).write_text(json.dumps(meta, indent=1))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> TextInverter:
        from transformers import AutoTokenizer, T5ForConditionalGeneration

        directory = Path(directory)
        meta_path = directory / META_NAME
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{directory} is not a text-inverter checkpoint: {exc}") from exc
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{meta_path} is not a {FORMAT} checkpoint")
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        config = text_config(InverterConfig.from_dict(meta["config"]))
        model = cls(config, tokenizer, meta.get("fingerprint"))
        try:
            model.t5 = T5ForConditionalGeneration.from_pretrained(str(directory / "t5"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{directory}/t5 is missing or corrupted: {exc}") from exc
        return model.eval()
