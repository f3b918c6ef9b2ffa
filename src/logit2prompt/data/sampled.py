"""Prompts sampled from the target itself: user turns drawn from its chat prior at the user
position, and system prompts it writes when asked for one.

Unlimited, licence-clean (the samples inherit the model's licence) and shaped like what the
target expects to read. Sampling is batched with left padding and an attention mask, seeded
per batch, and cached batch by batch, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..cache import atomic_open, cache_dir
from ..errors import CorpusError
from .sources import Row

logger = logging.getLogger(__name__)

KINDS = ("user", "system")
_SENTINEL = "\u2063PROMPT\u2063"
# Asked as the user turn; the assistant's reply is the sampled system prompt.
SYSTEM_REQUEST = (
    "Write the system prompt for a new AI assistant that a company will deploy. Say who the "
    "assistant is, what it helps with, its tone, and what it must not do. Reply with the "
    "system prompt only."
)


@dataclass(frozen=True)
class SamplingConfig:
    """How samples are drawn; every field is part of the cache key and the manifest."""

    kind: str = "user"
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 96
    seed: int = 0
    batch_size: int = 64


def _prefix(target, config: SamplingConfig) -> str:
    """The chat text that ends where the sampled prompt starts."""
    tokenizer = target.tokenizer
    if config.kind == "user":
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}], tokenize=False
        )
        return text[: text.index(_SENTINEL)]
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": SYSTEM_REQUEST}], tokenize=False, add_generation_prompt=True
    )


def _cache_file(target, config: SamplingConfig) -> Path:
    key = json.dumps([target.fingerprint.id, asdict(config)], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir("corpora", "samples") / f"{config.kind}-{digest}.jsonl"


def _cached_batches(path: Path) -> list[list[dict]]:
    batches: list[list[dict]] = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a batch cut off by a kill: sampled again
            if record.get("batch") != len(batches):
                break
            batches.append(record["samples"])
    return batches


def sample_target_prompts(target, n: int, config: SamplingConfig | None = None) -> list[Row]:
    """`n` samples (before any filtering) from a local chat target; only samples that ended
    with the end-of-turn token are returned, as `Row`s of `config.kind`."""
    config = config or SamplingConfig()
    if config.kind not in KINDS:
        raise CorpusError(f"unknown sample kind {config.kind!r}; choose one of {KINDS}")
    if not hasattr(target, "model") or not getattr(target.tokenizer, "chat_template", None):
        raise CorpusError("sampling prompts needs a local target with a chat template")
    if n <= 0:
        return []
    import torch

    tokenizer, model = target.tokenizer, target.model
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    prefix = tokenizer(_prefix(target, config), add_special_tokens=False)["input_ids"]
    path = _cache_file(target, config)
    batches = _cached_batches(path)
    total = -(-n // config.batch_size)
    if len(batches) < total:
        # Rewrite what was read, so a torn last line is gone before appending.
        with atomic_open(path) as f:
            f.writelines(
                json.dumps({"batch": i, "samples": b}) + "\n" for i, b in enumerate(batches)
            )
        with (
            open(path, "a", encoding="utf-8") as f,
            tqdm(
                total=total,
                initial=len(batches),
                desc=f"sample {config.kind} prompts",
                unit="batch",
            ) as bar,
        ):
            for index in range(len(batches), total):
                with torch.inference_mode():
                    batch = _sample_batch(model, tokenizer, prefix, eos_ids, config, index)
                f.write(json.dumps({"batch": index, "samples": batch}) + "\n")
                f.flush()
                batches.append(batch)
                bar.update(1)
    samples = [s for batch in batches[:total] for s in batch][:n]
    rows = [Row(s["text"], config.kind, f"sampled/{config.kind}") for s in samples if s["finished"]]
    logger.info("%d of %d sampled %s prompts ended by themselves", len(rows), n, config.kind)
    return rows


def _sample_batch(model, tokenizer, prefix, eos_ids, config: SamplingConfig, index: int):
    import torch

    ids = torch.tensor([prefix] * config.batch_size, dtype=torch.long, device=model.device)
    generator_seed = config.seed * 1_000_003 + index
    torch.manual_seed(generator_seed)
    generated = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=0,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=sorted(eos_ids),
        pad_token_id=tokenizer.pad_token_id,
    )[:, len(prefix) :]
    out = []
    for row in generated.tolist():
        finished = any(t in eos_ids for t in row)
        text = tokenizer.decode(row, skip_special_tokens=True).strip()
        out.append({"text": text, "finished": finished})
    return out
