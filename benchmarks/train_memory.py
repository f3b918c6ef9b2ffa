"""Peak memory of each training phase, in a fresh process: where a prefix-lm's RAM goes.

    python benchmarks/train_memory.py --data runs/quickstart/stores/train \\
        --val-data runs/quickstart/stores/validation

The quickstart's recipe (prefix-lm, 2 neighbours, train's default batch) for a few steps, with
an evaluation and a checkpoint on the way; the process's peak resident memory is read after
each phase (the subspace fit happens while the Trainer is built). Writes
benchmarks/results/train_memory.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from logit2prompt.evaluation.results import write_results
from logit2prompt.recipes.quickstart import peak_rss_gb
from logit2prompt.training.trainer import TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results" / "train_memory.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--val-data", required=True)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument(
        "--batch-size", type=int, default=0, help="per-device batch (0: train's default)"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--lora-rank",
        type=int,
        default=TrainConfig.lora_rank,
        help="0: every decoder weight trains (the recipe before LoRA became the default)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    phases: list[tuple[str, float]] = [("start", peak_rss_gb())]
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            data=args.data,
            val_data=args.val_data,
            out=out,
            preset="prefix-lm",
            neighbours=2,
            neighbour_copy=False,
            lora_rank=args.lora_rank,
            gradient_checkpointing=args.gradient_checkpointing,
            per_device_batch_size=args.batch_size,
            max_steps=args.steps,
            eval_every=args.steps // 2,
            save_every=args.steps // 2,
            warmup_steps=1,
            progress=False,
        )
        trainer = Trainer(cfg)
        step_seconds: list[float] = []
        phases.append(("Trainer built (decoder loaded, subspace fitted)", peak_rss_gb()))

        def watched(method, name):
            def wrapper(*a, **k):
                start = time.perf_counter()
                result = method(*a, **k)
                if name == "train step":
                    step_seconds.append(time.perf_counter() - start)
                phases.append((f"{name}, step {trainer.step}", peak_rss_gb()))
                return result

            return wrapper

        for attr, name in (
            ("prepare", "memory built, Accelerate prepared"),
            ("train_step", "train step"),
            ("evaluate", "validation (loss + greedy decoding)"),
            ("save_checkpoint", "checkpoint saved"),
        ):
            setattr(trainer, attr, watched(getattr(trainer, attr), name))
        trainer.run()
    print(f"{'phase':<55} peak RSS so far (GB)")
    for name, gb in phases:
        print(f"{name:<55} {gb:.2f}")
    print(f"seconds per train step: {', '.join(f'{t:.1f}' for t in step_seconds)}")
    write_results(
        args.results,
        {
            "benchmark": "train_memory",
            "data": args.data,
            "steps": args.steps,
            "lora_rank": args.lora_rank,
            "per_device_batch_size": trainer.cfg.per_device_batch_size,
            "gradient_checkpointing": args.gradient_checkpointing,
            "train_step_seconds": step_seconds,
            "phases": [{"phase": n, "peak_rss_gb": gb} for n, gb in phases],
            "wall_s": time.perf_counter() - started,
        },
        command=["python", *sys.argv],
    )
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
