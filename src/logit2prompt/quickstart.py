"""The quickstart: default corpus -> collect -> train -> evaluate on the test split.

Each step writes to its own directory under `out` and is reused on a second run: collection
resumes shard by shard, training resumes from its last checkpoint, evaluation reruns.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .baselines import baseline_predictions
from .bigbench import build_bigbench_corpus
from .collect import collect
from .invert import invert_store
from .inverter import Inverter
from .metrics import format_table, per_example_scores, score
from .prompts import load_corpus
from .store import DistributionStore
from .targets import DEFAULT_TARGET, load_target
from .train import TrainConfig, Trainer, is_trained

# Sized for about 20 minutes on a 2-core CPU at scale 1 (see README for measured times).
BASE_TRAIN_PROMPTS = 4000
BASE_STEPS = 600
VAL_PROMPTS = 128
TEST_PROMPTS = 256
NUM_EXAMPLES = 10
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


@dataclass
class QuickstartConfig:
    out: str = "runs/quickstart"
    scale: float = 1.0
    dtype: str = "bf16"
    target: str = DEFAULT_TARGET
    batch_size: int = 32
    progress: bool = True

    @property
    def train_prompts(self) -> int:
        return max(64, int(BASE_TRAIN_PROMPTS * self.scale))

    @property
    def steps(self) -> int:
        return max(10, int(BASE_STEPS * self.scale))


def _log(msg: str) -> None:
    print(f"[quickstart {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_quickstart(cfg: QuickstartConfig) -> dict:
    """Run every step (reusing finished ones) and print the metrics table and examples."""
    out = Path(cfg.out)
    t0 = time.perf_counter()
    _log("building the default corpus (BIG-bench task inputs; downloaded once, then cached)")
    corpus_path = str(build_bigbench_corpus())
    target = load_target(cfg.target, dtype=DTYPES[cfg.dtype], batch_size=cfg.batch_size)
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
            batch_size=cfg.batch_size,
            progress=cfg.progress,
        )
        stores[split] = DistributionStore(out / "stores" / split)

    model_dir = out / "inverter"
    if is_trained(model_dir):
        _log(f"reusing the trained inverter in {model_dir}")
    else:
        _log(f"training the inverter for {cfg.steps} steps -> {model_dir}")
        train_cfg = TrainConfig(
            data=str(out / "stores" / "train"),
            val_data=str(out / "stores" / "validation"),
            out=str(model_dir),
            max_steps=cfg.steps,
            eval_every=max(cfg.steps // 4, 1),
            save_every=max(cfg.steps // 6, 1),
            warmup_steps=min(100, cfg.steps // 10),
            progress=cfg.progress,
        )
        Trainer(train_cfg).run(resume=True)
    inverter = Inverter.from_pretrained(model_dir)

    _log("evaluating on the test split")
    test = stores["test"]
    references = test.prompts
    predictions = invert_store(inverter, test, progress=cfg.progress)
    results = {
        "inverter": score(predictions, references),
        **{
            name: score(preds, references)
            for name, preds in baseline_predictions(stores["train"], test).items()
        },
    }
    table = format_table(results)
    per = per_example_scores(predictions, references)
    order = np.argsort(per["bleu"])[::-1]
    picks = order[:: max(1, len(order) // NUM_EXAMPLES)][:NUM_EXAMPLES].tolist()  # best first
    examples = [
        {"hidden": references[i], "recovered": predictions[i], "bleu": per["bleu"][i]}
        for i in picks
    ]
    print()
    print(f"Test split: {len(references)} hidden prompts; target {target.fingerprint.describe()}")
    print(table)
    print()
    print(f"{NUM_EXAMPLES} examples across the BLEU range (hidden -> recovered):")
    for ex in examples:
        print(f"  [{ex['bleu']:5.1f}] {ex['hidden']!r}\n          -> {ex['recovered']!r}")
    elapsed = time.perf_counter() - t0
    report = {
        "config": asdict(cfg),
        "results": results,
        "examples": examples,
        "seconds": elapsed,
        "checkpoint": str(model_dir),
        "target": target.fingerprint.to_dict(),
    }
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "predictions.jsonl").write_text(
        "".join(
            json.dumps({"hidden": r, "recovered": p}) + "\n"
            for r, p in zip(references, predictions, strict=True)
        )
    )
    print()
    _log(f"done in {elapsed / 60:.1f} min; results in {out / 'results.json'}")
    print(
        f'Try: logit2prompt invert --checkpoint {model_dir} --text "What is the capital of France?"'
    )
    return report
