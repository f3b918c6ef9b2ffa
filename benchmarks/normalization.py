"""Which feature normalisation trains the better inverter: the paper's mean subtraction,
per-entry standardisation, or none. Same data, steps, seed and sizes for each.

    python benchmarks/normalization.py --data STORE --val-data STORE [--steps 250]

Writes benchmarks/results/normalization.json; the winner on validation loss is the default
(`InverterConfig.normalization`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from logit2prompt.evaluation.results import write_results
from logit2prompt.models.features import NORMALIZATIONS
from logit2prompt.training.trainer import TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results" / "normalization.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--val-data", required=True)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--normalizations", nargs="+", default=list(NORMALIZATIONS))
    args = parser.parse_args()
    rows = []
    for name in args.normalizations:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(
                data=args.data,
                val_data=args.val_data,
                out=tmp,
                preset=args.preset,
                normalization=name,
                max_steps=args.steps,
                eval_every=args.steps,
                save_every=10**9,
                warmup_steps=args.steps // 10,
                progress=False,
            )
            t0 = time.perf_counter()
            trainer = Trainer(cfg)
            trainer.run()
            final = trainer.history[-1]
            rows.append(
                {
                    "normalization": name,
                    "steps": args.steps,
                    "seconds": time.perf_counter() - t0,
                    **{k: final[k] for k in ("val_loss", "val_bleu", "val_token_f1", "val_exact")},
                }
            )
            print(rows[-1], flush=True)
    print(f"\n{'normalization':14} {'val loss':>9} {'BLEU':>6} {'token F1':>9} {'exact %':>8}")
    for r in rows:
        print(
            f"{r['normalization']:14} {r['val_loss']:9.3f} {r['val_bleu']:6.1f} "
            f"{r['val_token_f1']:9.1f} {r['val_exact']:8.1f}"
        )
    best = min(rows, key=lambda r: r["val_loss"])["normalization"]
    print(f"best on validation loss: {best}")
    write_results(
        RESULTS,
        {
            "benchmark": "normalization",
            "data": args.data,
            "val_data": args.val_data,
            "rows": rows,
            "best": best,
        },
        command=["python", *sys.argv],
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
