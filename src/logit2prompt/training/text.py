"""Training the text-only inversion baseline (models/text_inverter.py): the target's greedy
replies to a store's prompts, cached, then the log-prob inverter's recipe and budget (AdamW,
linear warmup then cosine decay, clipping, bf16 where native)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError
from ..models.config import T5InverterConfig
from ..models.text_inverter import (
    CLIP_NORM,
    WARMUP_FRACTION,
    TextInverter,
    target_outputs,
    text_config,
)
from .config import resolve_mixed_precision


def train_text_inverter(
    outputs: Sequence[str],
    prompts: Sequence[str],
    config: T5InverterConfig,
    tokenizer,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int | None = None,
    weight_decay: float = 0.01,
    mixed_precision: str = "auto",
    seed: int = 0,
    fingerprint: dict | None = None,
    progress: bool = True,
) -> TextInverter:
    """AdamW, linear warmup then cosine decay, gradient clipping: the inverter's recipe."""
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    if len(outputs) != len(prompts) or not prompts:
        raise CheckpointError("text inversion needs as many outputs as prompts, and at least one")
    torch.manual_seed(seed)
    model = TextInverter(config, tokenizer, fingerprint).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, warmup_steps if warmup_steps is not None else int(steps * WARMUP_FRACTION))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    # The same precision rule as the log-prob inverter's trainer (bf16 where native).
    device = next(model.parameters()).device.type
    autocast = (
        torch.autocast(device, dtype=torch.bfloat16)
        if resolve_mixed_precision(mixed_precision) == "bf16"
        else nullcontext()
    )
    rng = np.random.default_rng(seed)
    order: list[int] = []
    bar = tqdm(range(steps), desc="train text inverter", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        if len(order) < batch_size:
            order += rng.permutation(len(prompts)).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        with autocast:
            loss = model.loss([outputs[i] for i in idx], [prompts[i] for i in idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def steps_done(training: dict) -> int:
    """The optimizer steps a run took (a --max-minutes budget can stop it before
    max_steps): recorded since they were, else its last validation step, else max_steps."""
    if "steps_done" in training:
        return int(training["steps_done"])
    history = training.get("history") or []
    return int(history[-1]["step"]) if history else int(training["max_steps"])


def build_text_inverter(
    data: str,
    out: str,
    *,
    like: str,
    steps: int | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> TextInverter:
    """Generate the target's replies to a store's prompts (cached in out/outputs.jsonl) and
    train a text inverter with the budget of the log-prob inverter at `like`."""
    from ..attacks.invert import target_from_fingerprint
    from ..data.corpus import whole_lines
    from ..data.store import DistributionStore
    from ..models.inverter import Inverter
    from ..models.pretrained import resolve_checkpoint

    store = DistributionStore(data)
    reference = Inverter.from_pretrained(like)
    training = json.loads((resolve_checkpoint(like) / "training_args.json").read_text())
    prompts = store.prompts[:limit] if limit else store.prompts
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / "outputs.jsonl"
    done: dict[str, str] = {}
    for line in whole_lines(cache):  # a killed run's half line is asked again
        row = json.loads(line)
        done[row["prompt"]] = row["output"]
    todo = [p for p in prompts if p not in done]
    if todo:
        target = target_from_fingerprint(store.fingerprint)
        chunk = 256  # append as we go: a killed run keeps what it generated
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="target replies", disable=not progress)
        with open(cache, "a", encoding="utf-8") as f:
            for start in range(0, len(todo), chunk):
                batch = todo[start : start + chunk]
                for p, o in zip(batch, target_outputs(target, batch), strict=True):
                    done[p] = o
                    f.write(json.dumps({"prompt": p, "output": o}, ensure_ascii=False) + "\n")
                f.flush()
                bar.update(len(batch))
        bar.close()
    config = text_config(reference.config)
    n_steps = steps or steps_done(training)
    # The global batch of a single-process run (multi-process runs record the same per-device
    # size; pass --steps to adjust).
    batch = int(training["per_device_batch_size"]) * int(training.get("grad_accum", 1))
    model = train_text_inverter(
        [done[p] for p in prompts],
        prompts,
        config,
        reference.tokenizer,
        steps=n_steps,
        batch_size=batch,
        lr=float(training["lr"]),
        warmup_steps=int(training.get("warmup_steps", 0)) if steps is None else None,
        weight_decay=float(training.get("weight_decay", 0.01)),
        mixed_precision=str(training.get("mixed_precision", "auto")),
        fingerprint=store.fingerprint.to_dict(),
        progress=progress,
    )
    model.save_pretrained(
        out_dir,
        {
            "steps": n_steps,
            "batch_size": batch,
            "lr": training["lr"],
            "like": like,
            "prompts": len(prompts),
        },
    )
    return model
