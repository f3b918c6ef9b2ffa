"""Multi-step observations (PILS-style): inverters trained on K = 1, 4, 16 steps at one budget.

    python benchmarks/steps.py --train runs/steps/train --val runs/steps/validation \
        --test runs/steps/test --ood runs/steps/chatterbot_first_turns ... --minutes 5

Each K gets the same training budget (`--minutes` of wall time on this machine's threads,
`train --max-minutes`), the prefix-lm preset with 16 pseudo-tokens in all (16 per step at
K = 1, 4 at K = 4, 1 at K = 16), on the first K steps of the same compact training store.
Each model is scored (greedy) on every prompt of the test store and of each OOD store, at
K_test = K, and the K = 16 model also at K_test = 32 (test-time extension): BLEU / token F1 /
exact with 95% CIs and the paired gain over K = 1. Collection prompts/s and bytes per prompt
are measured side by side for each K, full and compact, on `--throughput-prompts` test prompts.
Writes benchmarks/results/steps.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from logit2prompt.attacks.invert import invert_store, target_from_fingerprint
from logit2prompt.data.collect import collect
from logit2prompt.data.corpus import Corpus, PromptRecord
from logit2prompt.data.store import DistributionStore
from logit2prompt.evaluation.metrics import paired_gain, score
from logit2prompt.evaluation.results import write_results
from logit2prompt.models.inverter import Inverter
from logit2prompt.training.config import TrainConfig
from logit2prompt.training.trainer import Trainer, is_trained

RESULTS = Path(__file__).parent / "results" / "steps.json"


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def throughput(store: DistributionStore, n: int, ks: list[int]) -> list[dict]:
    """Collection prompts/s and bytes per prompt on disk, full (fp16) and compact, per K."""
    target = target_from_fingerprint(store.fingerprint, batch_size=16)
    corpus = Corpus([PromptRecord(t, {}) for t in store.prompts[:n]], "throughput sample", {})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            row = {"steps": k, "prompts": n}
            for fmt in ("full", "compact"):
                out = Path(tmp) / f"{fmt}-{k}"
                start = time.perf_counter()
                collect(target, corpus, str(out), steps=k, fmt=fmt, batch_size=16, progress=False)
                seconds = time.perf_counter() - start
                row[fmt] = {
                    "prompts_per_s": round(n / seconds, 2),
                    "bytes_per_prompt": round(dir_bytes(out / "shards") / n),
                }
                shutil.rmtree(out)
            row["size_ratio"] = round(
                row["full"]["bytes_per_prompt"] / row["compact"]["bytes_per_prompt"], 1
            )
            rows.append(row)
            print(
                f"K={k:<3} full {row['full']['prompts_per_s']:5.2f} prompts/s "
                f"{row['full']['bytes_per_prompt']:>10,} B/prompt | compact "
                f"{row['compact']['prompts_per_s']:5.2f} prompts/s "
                f"{row['compact']['bytes_per_prompt']:>8,} B/prompt ({row['size_ratio']}x)"
            )
    return rows


def train(args, k: int) -> tuple[Path, dict]:
    out = Path(args.work) / f"k{k}"
    if not is_trained(out):
        cfg = TrainConfig(
            data=args.train,
            val_data=args.val,
            out=str(out),
            preset="prefix-lm",
            steps=k,
            max_steps=10**6,
            max_minutes=args.minutes,
            per_device_batch_size=args.batch_size,
            lr=1e-3,
            warmup_steps=20,
            eval_every=10**6,
            save_every=10**6,
            mixed_precision="no",
            seed=args.seed,
        )
        Trainer(cfg).run()
    info = json.loads((out / "training_args.json").read_text())
    history = info.get("history", [])
    return out, {
        "steps_trained": history[-1]["step"] if history else None,
        "val_loss": history[-1]["val_loss"] if history else None,
        "minutes_budget": args.minutes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--val", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--ood", nargs="*", default=[])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--extend", type=int, default=32, help="K_test for the largest K")
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget per K")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/steps/models")
    parser.add_argument("--throughput-prompts", type=int, default=32)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    sets = {"bigbench test": DistributionStore(args.test)}
    for path in args.ood:
        sets[Path(path).name] = DistributionStore(path)
    target = None
    for store in sets.values():
        target = target or target_from_fingerprint(store.fingerprint, batch_size=16)
        store.attach(target)

    results: dict = {
        "threads": torch.get_num_threads(),
        "train_store": {"path": args.train, "prompts": len(DistributionStore(args.train))},
        "throughput": throughput(sets["bigbench test"], args.throughput_prompts, [*args.ks, 32]),
        "models": {},
        "sets": {name: len(s) for name, s in sets.items()},
        "scores": {},
    }
    runs = [(k, k) for k in args.ks] + [(max(args.ks), args.extend)]
    predictions: dict = {}
    for k, k_test in runs:
        model_dir, info = train(args, k)
        results["models"][f"K={k}"] = info
        model = Inverter.from_pretrained(model_dir)
        for name, store in sets.items():
            if k_test > store.steps:
                continue
            start = time.perf_counter()
            preds = invert_store(model, store, batch_size=32, steps=k_test)
            seconds = time.perf_counter() - start
            predictions[(k, k_test, name)] = preds
            row = {"K_train": k, "K_test": k_test, **score(preds, store.prompts)}
            row["invert_seconds"] = round(seconds, 1)
            base = predictions.get((args.ks[0], args.ks[0], name))
            if base is not None and (k, k_test) != (args.ks[0], args.ks[0]):
                row["gain_over_K1"] = paired_gain(preds, base, store.prompts)
            row["examples"] = [
                {"hidden": h, "recovered": p}
                for h, p in list(zip(store.prompts, preds, strict=True))[:5]
            ]
            results["scores"].setdefault(name, {})[f"K={k} test {k_test}"] = row
            print(
                f"{name:<24} K={k:<2} test {k_test:<2} BLEU {row['bleu']['mean']:5.1f} "
                f"F1 {row['token_f1']['mean']:5.1f} exact {row['exact']['mean']:4.1f}%"
            )
            write_results(args.out, results, command=["python", *sys.argv])
    write_results(args.out, results, command=["python", *sys.argv])


if __name__ == "__main__":
    main()
