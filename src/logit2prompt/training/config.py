"""Every training setting as data: the CLI generates `train`'s flags from `TrainConfig` and
every checkpoint records it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    """Every training setting; the CLI fills it and the checkpoint records it."""

    data: str = field(metadata={"help": "training store"})
    out: str = field(metadata={"help": "output directory (checkpoints, logs, final)"})
    val_data: str | None = field(
        default=None,
        metadata={"help": "validation store, scored every --eval-every steps (default: none)"},
    )
    preset: str = field(
        default="small",
        metadata={"help": "inverter preset: tiny, small, prefix-lm, base (models/config.py)"},
    )
    normalization: str = field(
        default="standardize",
        metadata={"help": "log-prob normalization: mean, standardize or none"},
    )
    t5_init: str | None = field(
        default=None,
        metadata={"help": "hub id or directory of a pretrained T5 to start from (default: random)"},
    )
    # preset "prefix-lm": the causal LM to start the decoder from (default: the target's own
    # weights) and its learning rate (pretrained weights want a smaller one than `lr`)
    decoder_init: str | None = field(
        default=None,
        metadata={"help": "prefix-lm: the decoder's causal LM (default: the target's own weights)"},
    )
    decoder_lr: float = field(
        default=1e-4,
        metadata={"help": "prefix-lm: the decoder's own weights' learning rate (--lora-rank 0)"},
    )
    lora_rank: int = field(
        default=16,
        metadata={
            "help": "prefix-lm: LoRA adapters of this rank on a frozen decoder, trained at --lr "
            "(0: train every decoder weight at --decoder-lr)"
        },
    )
    steps: int | None = field(
        default=None,
        metadata={
            "help": "observation steps per prompt to train on, the first K of the store's "
            "(default: all of them)"
        },
    )
    neighbours: int = field(
        default=0,
        metadata={"help": "read this many nearest training prompts (retrieval-augmented; 0: off)"},
    )
    neighbour_copy: bool = field(
        default=True,
        metadata={"help": "with --neighbours: pointer-generator output (copy or generate)"},
    )
    neighbour_texts: str | None = field(
        default=None,
        metadata={
            "help": "with --neighbours: JSONL of {prompt, neighbours} giving each training prompt "
            "the texts it reads in place of its memory's nearest, e.g. an inverter's own "
            "hypotheses (`training.corrector`: a corrector for search rounds)"
        },
    )
    output_tokenizer: str | None = field(
        default=None,
        metadata={"help": "tokenizer of the recovered text (default: the target's own)"},
    )
    init_from: str | None = field(
        default=None, metadata={"help": "an inverter checkpoint to fine-tune (weights and stats)"}
    )
    defense: str | None = field(
        default=None, metadata={"help": "defense spec applied to every vector (adaptive attacker)"}
    )
    subset_size: int = field(
        default=0,
        metadata={
            "help": "read the centred log-probs of a seeded subset of this many tokens instead "
            "of whole vectors, so the inverter applies to what an API gives in ~N/(k-1) queries "
            "per step (the hidden size + 100 is lossless: 676 for the default target; 0: whole "
            "vectors; a `collect --format subset` store brings its own)"
        },
    )
    subset_seed: int = field(default=0, metadata={"help": "seed that draws --subset-size tokens"})
    bucket_lengths: bool = field(
        default=True,
        metadata={
            "help": "sort each window of batches by token count, so a batch carries little "
            "padding (the order of batches stays random)"
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "recompute the decoder's activations in the backward pass instead of keeping "
            "them: less memory per step, more time (benchmarks/train_memory.py measures both)"
        },
    )
    per_device_batch_size: int = field(
        default=0,
        metadata={
            "help": "examples per process per micro-batch (0: the preset's, 4 for prefix-lm "
            "and 32 for T5 presets; benchmarks/train_efficiency.py)"
        },
    )
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=2000, metadata={"help": "optimizer steps"})
    max_minutes: float | None = field(
        default=None,
        metadata={
            "help": "also stop after this many minutes of training steps in this run (a time "
            "budget; validation and checkpoints not counted; the final checkpoint is written "
            "as at max_steps)"
        },
    )
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=100, metadata={"help": "learning-rate warmup steps"})
    schedule: str = field(
        default="cosine",
        metadata={"help": "learning-rate schedule (a transformers scheduler name)"},
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    eval_every: int = field(default=250, metadata={"help": "validate every N steps"})
    eval_samples: int = field(default=64, metadata={"help": "validation prompts scored"})
    save_every: int = field(default=500, metadata={"help": "save a checkpoint every N steps"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept"})
    log_every: int = field(default=10, metadata={"help": "log every N steps"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    mixed_precision: str = field(
        default="auto",
        metadata={"help": "no, fp16, bf16, or auto: bf16 where the hardware runs it natively"},
    )
    stats_sample: int = field(
        default=4096, metadata={"help": "training vectors sampled for the normalization statistics"}
    )
    progress: bool = field(default=True, metadata={"help": "progress bars"})
    overrides: dict = field(
        default_factory=dict,
        metadata={"help": "InverterConfig fields over the preset (--set KEY=VALUE)"},
    )


# Micro-batch per process when `per_device_batch_size` is 0. A prefix-lm step is ~30x a T5
# step on a CPU, so a 40-minute run takes a few hundred steps: batches of 4 buy four times the
# updates per example of 16 and reached the old recipe's 40-minute validation loss in 0.54x its
# time, against 0.70x at 16 (benchmarks/results/train_efficiency.json).
DEFAULT_BATCH = {"prefix-lm": 4}
DEFAULT_BATCH_T5 = 32


def default_batch(preset: str) -> int:
    return DEFAULT_BATCH.get(preset, DEFAULT_BATCH_T5)


# What a resumed run must share with the checkpoint for "continues exactly" to hold: the model,
# its inputs, the optimizer and the data order. Left out on purpose: the data and output paths
# (a run directory may move; the number of training prompts is compared instead), max_steps
# (extending a run is a common, deliberate choice), precision and logging.
RECIPE_FIELDS = (
    "preset",
    "steps",
    "normalization",
    "t5_init",
    "decoder_init",
    "decoder_lr",
    "lora_rank",
    "neighbours",
    "neighbour_copy",
    "neighbour_texts",
    "output_tokenizer",
    "init_from",
    "defense",
    "bucket_lengths",
    "subset_size",
    "subset_seed",
    "lr",
    "weight_decay",
    "warmup_steps",
    "schedule",
    "max_grad_norm",
    "seed",
    "overrides",
)


# What checkpoints written before a recipe field existed did (they do not record it).
RECIPE_DEFAULTS_BEFORE = {
    "neighbour_texts": None,
    "lora_rank": 0,
    "bucket_lengths": False,
    "subset_size": 0,
    "subset_seed": 0,
}


def resolve_mixed_precision(choice: str) -> str:
    """'auto': bf16 autocast where the hardware runs it natively (Ampere+ GPUs, CPUs with
    AVX512-BF16 or AMX, measured ~1.5x faster per step there), else fp32."""
    if choice != "auto":
        return choice
    from ..models.inverter import native_bf16

    return "bf16" if native_bf16() else "no"
