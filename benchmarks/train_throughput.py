"""Training throughput: the full training step vs the bare model step on in-memory batches.

    python benchmarks/train_throughput.py --data STORE [--steps 20] [--preset small]
                                          [--neighbours K] [--results FILE]

(a) full: `Trainer.train_step()` as training runs it: global batch from the seeded
    permutation, vectors read from the memory-mapped store (float16 -> float32), labels padded,
    then forward, backward, clipping and the optimizer step.
(b) bare: the same step on the same batches already in memory as device tensors.
Both alternate step by step in one process, so machine noise hits them alike. The target is
(a) >= 0.9 x (b): feature building and data loading add at most 10%. With `--neighbours K`
(a retrieval-augmented inverter) (a) also looks up and tokenises each example's K neighbours.
Writes benchmarks/results/train_throughput.json (or `--results`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from logit2prompt.evaluation.results import write_results
from logit2prompt.training.trainer import TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results" / "train_throughput.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a training store")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mixed-precision", default="auto")
    parser.add_argument("--neighbours", type=int, default=0, help="retrieval-augmented: K")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            data=args.data,
            out=tmp,
            preset=args.preset,
            progress=False,
            per_device_batch_size=args.batch_size,
            max_steps=10**6,
            mixed_precision=args.mixed_precision,
            neighbours=args.neighbours,
        )
        trainer = Trainer(cfg)
        trainer.prepare()
        device = trainer.accelerator.device
        full, bare = [], []
        for step in range(args.warmup + args.steps):
            batches = trainer.micro_batches(step)
            tensors = [trainer._batch_tensors(b[: args.batch_size], device) for b in batches]
            t0 = time.perf_counter()
            trainer.train_step(batches, tensors=tensors)
            t1 = time.perf_counter()
            trainer.train_step(batches)
            t2 = time.perf_counter()
            if step >= args.warmup:
                bare.append(t1 - t0)
                full.append(t2 - t1)
        mixed = trainer.accelerator.mixed_precision
    examples = trainer.global_micro * cfg.grad_accum
    row = {
        "preset": args.preset,
        "neighbours": args.neighbours,
        "batch_size": examples,
        "mixed_precision": mixed,
        "steps": args.steps,
        "full_examples_per_s": examples * len(full) / sum(full),
        "bare_examples_per_s": examples * len(bare) / sum(bare),
    }
    row["full_vs_bare"] = row["full_examples_per_s"] / row["bare_examples_per_s"]
    print(
        f"{'preset':8} {'batch':>5} {'precision':>9} {'full ex/s':>10} {'bare ex/s':>10} "
        f"{'full/bare':>9}"
    )
    print(
        f"{row['preset']:8} {row['batch_size']:5d} {row['mixed_precision']:>9} "
        f"{row['full_examples_per_s']:10.2f} {row['bare_examples_per_s']:10.2f} "
        f"{row['full_vs_bare']:9.3f}"
    )
    write_results(
        args.results,
        {
            "benchmark": "train_throughput",
            "data": args.data,
            "rows": [row],
        },
        command=["python", *sys.argv],
    )
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
