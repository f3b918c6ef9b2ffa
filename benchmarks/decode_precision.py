"""Decoding in bf16 autocast vs fp32: speed and quality side by side, on the same prompts.

    python benchmarks/decode_precision.py --checkpoint runs/quality/inverter-nn2-prefix-lm \\
        --test runs/quality/test [--limit 192] [--beams 1 4]

Beam search over a whole test split costs most of an evaluation on a CPU (53 minutes for 4
beams of the 2-neighbour prefix-lm); this measures whether bf16 autocast buys its speed without
losing quality, before any default changes. Writes benchmarks/results/decode_precision.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from logit2prompt.data.store import DistributionStore
from logit2prompt.evaluation.metrics import format_table, paired_gain, score
from logit2prompt.evaluation.results import write_results
from logit2prompt.models.inverter import Inverter

RESULTS = Path(__file__).parent / "results" / "decode_precision.json"
PRECISIONS = {"fp32": False, "bf16 autocast": True}  # Inverter.invert(bf16=...)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--test", required=True, help="store of the hidden prompts")
    parser.add_argument("--limit", type=int, default=192, help="first N test prompts")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    inverter = Inverter.from_pretrained(args.checkpoint)
    test = DistributionStore(args.test)
    n = min(args.limit, len(test))
    vectors = torch.from_numpy(test.vectors(range(n)))
    refs = test.prompts[:n]
    results, rows = {}, []
    for beams in args.beams:
        outputs, seconds = {}, {}
        for precision, bf16 in PRECISIONS.items():
            t0 = time.perf_counter()
            outputs[precision] = inverter.invert(
                vectors, num_beams=beams, batch_size=args.batch_size, bf16=bf16
            )
            seconds[precision] = time.perf_counter() - t0
            results[f"{beams} beam(s), {precision}"] = score(outputs[precision], refs)
        same = sum(a == b for a, b in zip(*outputs.values(), strict=True)) / n
        gain = paired_gain(outputs["bf16 autocast"], outputs["fp32"], refs)
        rows.append(
            {
                "beams": beams,
                "fp32_s": seconds["fp32"],
                "bf16_s": seconds["bf16 autocast"],
                "speedup": seconds["fp32"] / seconds["bf16 autocast"],
                "identical_outputs": same,
                "bf16_minus_fp32": gain,
            }
        )
    print(f"{n} test prompts of {args.test}, {args.checkpoint}")
    print(format_table(results))
    for row in rows:
        g = row["bf16_minus_fp32"]["bleu"]
        print(
            f"{row['beams']} beam(s): fp32 {row['fp32_s']:.0f} s, bf16 {row['bf16_s']:.0f} s "
            f"(x{row['speedup']:.2f}); identical outputs {100 * row['identical_outputs']:.0f}%; "
            f"BLEU bf16 - fp32 {g['mean']:+.2f} [{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}]"
        )
    write_results(
        args.results,
        {
            "benchmark": "decode_precision",
            "checkpoint": args.checkpoint,
            "test": args.test,
            "prompts": n,
            "results": results,
            "side_by_side": rows,
        },
        command=["python", *sys.argv],
    )
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
