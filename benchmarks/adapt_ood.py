"""In-domain adaptation (PILS's recipe): fine-tune the shipped user-mode inverter on ~50
prompts of a new domain and measure what it gains there.

    python benchmarks/adapt_ood.py --data ../shared/data [--adapt 50 --steps 64]

For each out-of-domain set the evaluation prompts are those of shipped_ood.py (a seeded 100
of the first 200 rows); the adaptation prompts are a seeded ADAPT of the other rows (of the
rows after the first 200 where the file has enough), with near duplicates of any evaluation
prompt removed (`data mix --exclude`'s index). Three rows per set, greedy, no target queries
at inversion:

- shipped: the shipped inverter as it is (its memory: 6,000 mix prompts);
- memory swapped: the same weights, its neighbour memory rebuilt from the adaptation
  prompts (what retrieval alone gains);
- fine-tuned: `train --init-from smollm2-135m-instruct` on the adaptation prompts (their
  memory too), STEPS steps of 4.

Writes benchmarks/results/adapt_ood.json (paired gains over `shipped` with 95% CIs).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from logit2prompt.data.collect import collect
from logit2prompt.data.corpus import load_corpus
from logit2prompt.data.mix import NearDuplicateIndex
from logit2prompt.data.store import DistributionStore
from logit2prompt.evaluation.metrics import paired_gain, score
from logit2prompt.evaluation.results import write_results
from logit2prompt.models.inverter import Inverter
from logit2prompt.models.retrieval import NeighbourMemory
from logit2prompt.targets import DEFAULT_TARGET, load_target
from logit2prompt.training.config import TrainConfig
from logit2prompt.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from shipped_ood import FIRST, SETS, rows_of  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "adapt_ood.json"
SHIPPED = "smollm2-135m-instruct"


def adaptation_prompts(path: Path, evaluated: list[str], n: int, seed: int) -> list[str]:
    """A seeded `n` of the file's rows that are not evaluated, after the first FIRST rows
    where enough remain, with near duplicates of evaluated prompts removed."""
    rows = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
    index = NearDuplicateIndex(evaluated)
    later = [p for p in rows[FIRST:] if not index.matches(p)]
    pool = later if len(later) >= n else [p for p in rows if not index.matches(p)]
    pool = list(dict.fromkeys(pool))  # exact repeats once
    return random.Random(f"{seed}:adapt:{path.stem}").sample(pool, min(n, len(pool)))


def store_of(target, prompts: list[str], out: Path, steps: int) -> DistributionStore:
    if not (out / "manifest.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        path = out.with_suffix(".jsonl")
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        corpus = load_corpus(str(path), count_tokens=target.count_tokens, max_tokens=None)
        collect(target, corpus, str(out), steps=steps, batch_size=16, progress=False)
    store = DistributionStore(out)
    store.attach(target)
    return store


def invert(model: Inverter, store: DistributionStore) -> list[str]:
    steps = model.config.steps
    x = torch.from_numpy(store.vectors(range(len(store)), steps))
    return model.invert(x.view(len(store), steps, -1), batch_size=32)


def swap_memory(model: Inverter, store: DistributionStore) -> None:
    """Rebuild the neighbour memory from `store`'s prompts (as `train --init-from` does)."""
    steps = model.config.steps
    vectors = store.vectors(range(len(store)), steps).reshape(len(store), -1)
    memory = NeighbourMemory.build(
        store.prompts, [vectors], model.config.dim, dims=model.config.neighbour_dims
    )
    model.set_memory(memory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="folder with the OOD .jsonl files")
    parser.add_argument("--limit", type=int, default=100, help="evaluated prompts per set")
    parser.add_argument("--adapt", type=int, default=50, help="adaptation prompts per set")
    parser.add_argument("--steps", type=int, default=64, help="fine-tuning steps of 4")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/adapt")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    data, work = Path(args.data), Path(args.work)
    target = load_target(DEFAULT_TARGET, dtype="float32", batch_size=16)
    shipped = Inverter.from_pretrained(SHIPPED)
    obs_steps = shipped.config.steps
    results: dict = {
        "adapt": args.adapt,
        "steps": args.steps,
        "lr": args.lr,
        "limit": args.limit,
        "sets": {},
    }
    lines = [
        "| set | shipped | memory swapped | fine-tuned | fine-tuned - shipped (BLEU) "
        "| fine-tuned - shipped (F1) | minutes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    every = rows_of(data, args.limit, args.seed)
    for name in SETS:
        evaluated = [r["prompt"] for r in every if r["set"] == name]
        adapt = adaptation_prompts(data / f"{name}.jsonl", evaluated, args.adapt, args.seed)
        test = store_of(target, evaluated, work / name / "test", obs_steps)
        train = store_of(target, adapt, work / name / "adapt", obs_steps)
        refs = test.prompts
        preds = {"shipped": invert(Inverter.from_pretrained(SHIPPED), test)}
        swapped = Inverter.from_pretrained(SHIPPED)
        swap_memory(swapped, train)
        preds["memory swapped"] = invert(swapped, test)
        out = work / name / "inverter"
        cfg = TrainConfig(
            data=str(train.path),
            out=str(out),
            init_from=SHIPPED,
            preset="prefix-lm",
            neighbours=2,
            max_steps=args.steps,
            lr=args.lr,
            warmup_steps=max(1, args.steps // 10),
            save_every=args.steps,
            progress=False,
            seed=args.seed,
        )
        t0 = time.perf_counter()
        Trainer(cfg).run(resume=True)
        minutes = (time.perf_counter() - t0) / 60
        preds["fine-tuned"] = invert(Inverter.from_pretrained(out), test)
        entry = {
            "evaluated": len(refs),
            "adaptation_prompts": len(adapt),
            "adaptation_examples": adapt[:3],
            "fine_tune_minutes": minutes,
            "rows": {k: score(v, refs) for k, v in preds.items()},
            "gain_over_shipped": {
                k: paired_gain(preds[k], preds["shipped"], refs) for k in preds if k != "shipped"
            },
            "examples": [
                {"hidden": h, **{k: v[i] for k, v in preds.items()}} for i, h in enumerate(refs[:5])
            ],
        }
        results["sets"][name] = entry
        write_results(args.out, results, command=["python", *sys.argv])
        rows = entry["rows"]
        gain = entry["gain_over_shipped"]["fine-tuned"]
        cell = lambda g: f"{g['mean']:+.1f} [{g['ci95'][0]:+.1f}, {g['ci95'][1]:+.1f}]"  # noqa: E731
        lines.append(
            f"| {name} | "
            + " | ".join(
                f"{rows[k]['bleu']['mean']:.1f} / {rows[k]['token_f1']['mean']:.1f}"
                for k in ("shipped", "memory swapped", "fine-tuned")
            )
            + f" | {cell(gain['bleu'])} | {cell(gain['token_f1'])} | {minutes:.1f} |"
        )
        print(lines[-1], flush=True)
    print("BLEU / token F1 per row; gains paired per prompt, 95% bootstrap CIs")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
