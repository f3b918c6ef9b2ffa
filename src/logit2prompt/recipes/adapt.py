"""Adapt a trained inverter to a domain: observe ~50 of its prompts, then fine-tune (PILS's
in-domain recipe).

    prompts (a file) -> the inverter's own target, in its own threat model -> store
    -> `train --init-from CHECKPOINT` (neighbour memory rebuilt from these prompts) -> inverter

The shipped user-mode inverter went from 3.7 to 21.3 BLEU on a held-out conversational set
this way in 1–2 CPU minutes (benchmarks/adapt_ood.py). Both steps resume: a rerun skips the
shards already collected and continues training from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from ..data.corpus import DEFAULT_FIELD, DEFAULT_MAX_TOKENS, load_corpus, resolve_corpus
from ..errors import CorpusError

logger = logging.getLogger(__name__)

MIN_PROMPTS = 8  # below this a fine-tune mostly memorises


@dataclass
class AdaptConfig:
    prompts: str = dataclasses.field(
        metadata={"help": "JSONL or text file of the domain's prompts (~50)"}
    )
    out: str = dataclasses.field(
        metadata={"help": "work folder: store/ and inverter/ (rerun to resume)"}
    )
    checkpoint: str = dataclasses.field(
        default="default",
        metadata={"help": "the inverter to adapt: a shipped name or a checkpoint folder"},
    )
    field: str = dataclasses.field(
        default=DEFAULT_FIELD, metadata={"help": "text field of a JSONL file"}
    )
    limit: int | None = dataclasses.field(
        default=None, metadata={"help": "keep the first N prompts"}
    )
    max_tokens: int = dataclasses.field(
        default=DEFAULT_MAX_TOKENS, metadata={"help": "drop prompts longer than this"}
    )
    max_steps: int = dataclasses.field(default=64, metadata={"help": "fine-tuning steps"})
    batch_size: int = dataclasses.field(default=4, metadata={"help": "prompts per step"})
    lr: float = dataclasses.field(
        default=5e-4, metadata={"help": "learning rate of the inverter's weights"}
    )
    seed: int = 0
    progress: bool = dataclasses.field(default=True, metadata={"help": "progress bars"})


def adapt(cfg: AdaptConfig) -> Path:
    """Collect the prompts from the checkpoint's target and fine-tune it on them; returns
    the adapted checkpoint's folder."""
    from ..attacks.invert import target_for
    from ..data.collect import collect
    from ..models.inverter import Inverter
    from ..training.trainer import Trainer, is_trained

    inverter = Inverter.from_pretrained(cfg.checkpoint)
    # The target exactly as the inverter saw it: weights, dtype and threat model.
    target = target_for(inverter, batch_size=16)
    corpus = load_corpus(
        resolve_corpus(cfg.prompts),
        field_name=cfg.field,
        count_tokens=target.count_tokens,
        max_tokens=cfg.max_tokens,
        limit=cfg.limit,
    )
    if len(corpus) < MIN_PROMPTS:
        raise CorpusError(
            f"{cfg.prompts}: {len(corpus)} usable prompts; adapting needs at least {MIN_PROMPTS} "
            "(~50 is the tested recipe)"
        )
    out = Path(cfg.out)
    store = out / "store"
    logger.info(
        "observing %d prompts of %s on %s", len(corpus), cfg.prompts, target.fingerprint.describe()
    )
    collect(
        target,
        corpus,
        str(store),
        steps=inverter.config.steps,
        batch_size=16,
        progress=cfg.progress,
    )
    train = fine_tune_config(cfg, inverter, store, out / "inverter")
    del inverter  # the trainer loads its own copy
    if is_trained(train.out):
        logger.info("%s is already adapted (delete it to adapt again)", train.out)
        return Path(train.out)
    trainer = Trainer(train)
    trainer.run(resume=True)
    logger.info(
        "adapted %s in %.1f training minutes: %s", cfg.checkpoint, trainer.train_seconds / 60, out
    )
    return out / "inverter"


def fine_tune_config(cfg: AdaptConfig, inverter, store: Path, out: Path):
    """The `TrainConfig` that fine-tunes `cfg.checkpoint` (loaded as `inverter`) on `store`:
    its own architecture and neighbours, `cfg`'s steps, batch, learning rate and seed."""
    from ..training.config import TrainConfig

    return TrainConfig(
        data=str(store),
        out=str(out),
        init_from=cfg.checkpoint,
        neighbours=inverter.config.neighbours,
        per_device_batch_size=cfg.batch_size,
        max_steps=cfg.max_steps,
        lr=cfg.lr,
        warmup_steps=max(1, cfg.max_steps // 10),
        save_every=cfg.max_steps,
        progress=cfg.progress,
        seed=cfg.seed,
        **({"preset": "prefix-lm"} if inverter.causal else {}),
    )
