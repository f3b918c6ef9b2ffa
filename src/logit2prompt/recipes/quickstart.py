"""The quickstart: default corpus -> collect -> train -> evaluate on the test split.

Each step writes to its own directory under `out` and is reused on a second run: collection
resumes shard by shard, training resumes from its last checkpoint, evaluation reruns.
The recipe is the CPU's best in small (README, *Quality*): the target's own LM as the
decoder (`prefix-lm`) reading the 2 nearest training prompts, then the target re-ranking its
output beside those neighbours; a row beside it keeps the inverter's output only where the
inverter is confident of it and answers with the nearest train prompt elsewhere (no queries).
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..attacks.invert import ensure_same_target
from ..data.bigbench import build_bigbench_corpus
from ..data.collect import DEFAULT_STEPS, collect
from ..data.corpus import load_corpus
from ..data.mix import build_mix
from ..data.store import DistributionStore
from ..errors import CheckpointError, PackageUnavailable
from ..evaluation.metrics import format_table, per_example_scores, score
from ..models.inverter import Inverter, native_bf16
from ..targets import DEFAULT_TARGET, load_target
from ..targets.base import TargetFingerprint
from ..training.trainer import CHECKPOINT_DIR, TrainConfig, Trainer, is_trained
from .methods import FALLBACK, RERANKED, MethodContext, run_methods

logger = logging.getLogger(__name__)

# A prefix-lm sees 960 examples at scale 1 (240 steps of train's default batch of 4; it was 60
# steps of 16): ~2.6 s a step with 2 neighbours, ~4.5 s with gradient checkpointing (measured at
# scale 0.25, benchmarks/README.md#quickstart). A `small` T5 step of 32 takes ~1 s.
BASE_TRAIN_PROMPTS = 4000
BASE_STEPS = {"prefix-lm": 240}
BASE_STEPS_T5 = 600
VAL_PROMPTS = 128
TEST_PROMPTS = 256
NUM_EXAMPLES = 10
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# The rows the quickstart reports (registry keys, see methods.py), and its inverter's decode
# batch (that of `invert_store`, which it decoded with before the registry).
METHODS = ("inverter", "fallback", "rerank", "nn", "constant")
DECODE_BATCH = 64
# Training settings the reuse check compares: a checkpoint trained otherwise is not reused.
RECIPE_KEYS = ("preset", "neighbours", "max_steps", "steps")


@dataclass
class QuickstartConfig:
    out: str = field(
        default="runs/quickstart",
        metadata={"help": "run directory, one subdirectory per step (rerun to reuse)"},
    )
    scale: float = field(default=1.0, metadata={"help": "multiply corpus size and training steps"})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "target weights (collection, re-ranking); auto: bf16 where the hardware "
            "has it natively, else fp32 (emulated bf16 collects several times slower)",
            "choices": ("auto", *DTYPES),
        },
    )
    target: str = field(
        default=DEFAULT_TARGET,
        metadata={"help": "built-in name, local directory, .gguf file or hub id"},
    )
    batch_size: int = field(default=32, metadata={"help": "target batch (collection, re-ranking)"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})
    corpus: str | None = field(
        default=None,
        metadata={
            "help": "a corpus file (default: BIG-bench, built on first use; the mix where the "
            "package index no longer serves BIG-bench)"
        },
    )
    preset: str = field(default="prefix-lm", metadata={"help": "inverter preset"})
    observation_steps: int = field(
        default=DEFAULT_STEPS,
        metadata={"help": "greedy generation steps observed per prompt (collect --steps)"},
    )
    neighbours: int = field(
        default=2, metadata={"help": "nearest training prompts the inverter reads"}
    )
    train_batch_size: int | None = field(
        default=None,
        metadata={"help": "training batch (default: train's, 4 for prefix-lm, 32 for T5)"},
    )
    base_steps: int | None = field(
        default=None,
        metadata={"help": "training steps at scale 1 (default: 240 for prefix-lm, 600 for T5)"},
    )
    gradient_checkpointing: bool = field(
        default=True,
        metadata={
            "help": "recompute activations in training's backward pass: at --scale 0.25 the "
            "training peak fell from 11.5 to 7.0 GB at batch 16 (benchmarks/quickstart_memory.py); "
            "the whole run peaks at 4.2 GB with it at batch 4"
        },
    )
    bf16_decoding: bool = field(
        default=True,
        metadata={
            "help": "decode in bf16 where the hardware has it natively (AMX, AVX512-BF16, GPU): "
            "1.8x faster there, no loss; emulated bf16 is 4x slower (decode_precision.py)"
        },
    )

    @property
    def train_prompts(self) -> int:
        return max(64, int(BASE_TRAIN_PROMPTS * self.scale))

    @property
    def steps(self) -> int:
        base = self.base_steps or BASE_STEPS.get(self.preset, BASE_STEPS_T5)
        return max(10, int(base * self.scale))


def _check_reusable(model_dir: Path, train_cfg: TrainConfig) -> None:
    """Refuse to reuse a trained inverter made by another recipe (an older quickstart, or
    another --scale), rather than silently report its numbers as this run's."""
    try:
        recorded = json.loads((model_dir / "training_args.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{model_dir} is marked trained but its training_args.json is unreadable: {e}"
        ) from e
    wanted = {k: getattr(train_cfg, k) for k in RECIPE_KEYS}
    found = {k: recorded.get(k) for k in RECIPE_KEYS}
    if found != wanted:
        raise CheckpointError(
            f"{model_dir} holds an inverter trained with {found}, this quickstart trains "
            f"{wanted}; remove that folder or pass another --out"
        )


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (GB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Bytes on macOS, kB on Linux (as /usr/bin/time prints it; the README divides by 1e6 too).
    return peak / 1e9 if sys.platform == "darwin" else peak / 1e6


def _log(msg: str) -> None:
    # The peak so far tells a user with less memory which step needs it.
    stamp = f"{time.strftime('%H:%M:%S')}, peak {peak_rss_gb():.1f} GB"
    logger.info("[quickstart %s] %s", stamp, msg)


def format_report(report: dict) -> str:
    """The metrics table, examples across the BLEU range and the next command to try, as the
    quickstart command prints them."""
    target = TargetFingerprint.from_dict(report["target"]).describe()
    n = report["results"]["inverter"]["n"]["mean"]
    lines = [
        "",
        f"Test split: {n} hidden prompts; target {target}",
        format_table(report["results"]),
        "",
        f"{len(report['examples'])} examples across the BLEU range (hidden -> recovered):",
        *(
            f"  [{ex['bleu']:5.1f}] {ex['hidden']!r}\n          -> {ex['recovered']!r}"
            for ex in report["examples"]
        ),
        "",
        f"results in {Path(report['config']['out']) / 'results.json'}",
        f"Try: logit2prompt invert --checkpoint {report['checkpoint']} "
        '--text "What is the capital of France?"',
    ]
    return "\n".join(lines)


def default_corpus() -> str:
    """BIG-bench task inputs; where the package index no longer serves that release, the
    default mix (less any source the index does not serve), with a warning."""
    try:
        return str(build_bigbench_corpus())
    except PackageUnavailable as exc:
        logger.warning("%s; the quickstart trains on the default mix instead", exc)
        return str(build_mix(skip_unavailable=True))


def run_quickstart(cfg: QuickstartConfig) -> dict:
    """Run every step (reusing finished ones) and return the report; progress is logged,
    `format_report` renders the table and examples (the `quickstart` command prints it)."""
    out = Path(cfg.out)
    t0 = time.perf_counter()
    if cfg.corpus:
        corpus_path = cfg.corpus
    else:
        _log("building the default corpus (BIG-bench task inputs; downloaded once, then cached)")
        corpus_path = default_corpus()
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bf16" if native_bf16() else "fp32"
    target = load_target(cfg.target, dtype=DTYPES[dtype], batch_size=cfg.batch_size)
    _log(f"target: {target.fingerprint.describe()}")
    stores = {}
    for split, n in (
        ("train", cfg.train_prompts),
        ("validation", VAL_PROMPTS),
        ("test", TEST_PROMPTS),
    ):
        corpus = load_corpus(corpus_path, count_tokens=target.count_tokens, split=split, limit=n)
        _log(f"collecting {len(corpus)} {split} prompts -> {out / 'stores' / split}")
        collect(
            target,
            corpus,
            str(out / "stores" / split),
            split=split,
            steps=cfg.observation_steps,
            batch_size=cfg.batch_size,
            progress=cfg.progress,
        )
        stores[split] = DistributionStore(out / "stores" / split)
        stores[split].attach(target)

    model_dir = out / "inverter"
    train_cfg = TrainConfig(
        data=str(out / "stores" / "train"),
        val_data=str(out / "stores" / "validation"),
        out=str(model_dir),
        preset=cfg.preset,
        steps=cfg.observation_steps,
        neighbours=cfg.neighbours,
        # A prefix-lm reads its neighbours as text and copies by attention (README).
        neighbour_copy=cfg.preset != "prefix-lm",
        per_device_batch_size=cfg.train_batch_size or 0,  # 0: the Trainer's preset default
        gradient_checkpointing=cfg.gradient_checkpointing,
        max_steps=cfg.steps,
        eval_every=max(cfg.steps // 2, 1),
        save_every=max(cfg.steps // 3, 1),
        warmup_steps=min(100, cfg.steps // 10),
        progress=cfg.progress,
    )
    if is_trained(model_dir):
        _check_reusable(model_dir, train_cfg)
        _log(f"reusing the trained inverter in {model_dir}")
    else:
        _log(f"training the inverter ({cfg.preset}) for {cfg.steps} steps -> {model_dir}")
        Trainer(train_cfg).run(resume=True)
        # Resume checkpoints hold the optimizer state too (~1.9 GB each for a prefix-lm) and
        # are of no use once the final weights are written.
        shutil.rmtree(model_dir / CHECKPOINT_DIR, ignore_errors=True)
    inverter = Inverter.from_pretrained(model_dir)

    _log("evaluating on the test split")
    train, test = stores["train"], stores["test"]
    references = test.prompts
    ensure_same_target(inverter, test)
    # The inverter decodes greedily; the target re-ranks that output beside the nearest train
    # prompts, and the fallback row keeps it only where the inverter is confident.
    ctx = MethodContext(
        inverter,
        test.vectors(range(len(test))),
        target=target,
        train=train,
        references=references,
        num_beams=1,
        rerank_beams=1,
        batch_size=cfg.batch_size,
        decode_batch_size=DECODE_BATCH,
        bf16=cfg.bf16_decoding and native_bf16(inverter.feature_mean.device.type),
        progress=cfg.progress,
    )
    preds = run_methods(METHODS, ctx)
    kept = ctx.notes["fallback_kept"]
    predictions, fallback, reranked = preds["inverter"], preds[FALLBACK], preds[RERANKED]
    results = {name: score(p, references) for name, p in preds.items()}
    per = per_example_scores(predictions, references)
    order = np.argsort(per["bleu"])[::-1]
    picks = order[:: max(1, len(order) // NUM_EXAMPLES)][:NUM_EXAMPLES].tolist()  # best first
    examples = [
        {"hidden": references[i], "recovered": predictions[i], "bleu": per["bleu"][i]}
        for i in picks
    ]
    elapsed = time.perf_counter() - t0
    report = {
        "config": asdict(cfg),
        "results": results,
        "examples": examples,
        "seconds": elapsed,
        "fallback_kept_own": int(kept.sum()),
        "peak_rss_gb": peak_rss_gb(),
        "checkpoint": str(model_dir),
        "target": target.fingerprint.to_dict(),
    }
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "predictions.jsonl").write_text(
        "".join(
            json.dumps({"hidden": r, "recovered": p, "fallback": f, "reranked": q}) + "\n"
            for r, p, f, q in zip(references, predictions, fallback, reranked, strict=True)
        )
    )
    _log(f"done in {elapsed / 60:.1f} min; results in {out / 'results.json'}")
    return report
