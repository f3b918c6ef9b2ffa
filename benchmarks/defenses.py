"""Defenses on the default target and corpus: leakage vs utility cost for every defense.

    python benchmarks/defenses.py [--run runs/quality] [--finetune-steps 60] [--limit 128]

Uses the clean inverter and stores of benchmarks/quality.py (run it first), applies each
defense of the default grid to the clean test vectors, scores the clean inverter (naive
attacker) and the clean inverter fine-tuned on defended training vectors (adaptive attacker),
and writes benchmarks/results/defenses.json and defenses.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from logit2prompt.defenses.sweep import DEFAULT_SPECS, SweepConfig, best_tradeoff, run_sweep
from logit2prompt.evaluation.results import write_results

RESULTS = Path(__file__).parent / "results"


def markdown_table(rows: list[dict]) -> str:
    """The README's table: utility cost, then naive and adaptive leakage, one row per spec."""
    lines = [
        "| defense | KL(defended ‖ clean) | total variation | top-1 changed | sampled-reply BLEU "
        "vs clean | naive BLEU | adaptive BLEU | adaptive token F1 | adaptive cosine |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        u, a = r["utility"], r["adaptive"]
        lines.append(
            f"| {r['spec']} | {u['kl']:.3f} | {u['tv']:.3f} | {100 * u['top1_changed']:.1f}% | "
            f"{u.get('reply_bleu', float('nan')):.1f} | {r['naive']['bleu']:.1f} | "
            f"{a['bleu']:.1f} | {a['token_f1']:.1f} | {a.get('cosine', float('nan')):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/quality", help="output folder of quality.py")
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--limit", type=int, default=128)
    parser.add_argument("--specs", nargs="+", default=list(DEFAULT_SPECS))
    parser.add_argument("--reply-prompts", type=int, default=32)
    args = parser.parse_args()
    run = Path(args.run)
    cfg = SweepConfig(
        checkpoint=str(run / "inverter"),
        train_data=str(run / "train"),
        test_data=str(run / "test"),
        out=str(run / "defenses"),
        specs=tuple(args.specs),
        finetune_steps=args.finetune_steps,
        test_limit=args.limit,
        reply_prompts=args.reply_prompts,
    )
    results = run_sweep(cfg)
    rows = results["rows"]
    print(markdown_table(rows))
    best = best_tradeoff(rows)
    if best:
        print(f"most adaptive-BLEU removed per unit of total variation: {best['spec']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    results["best_tradeoff"] = best["spec"] if best else None
    write_results(RESULTS / "defenses.json", results, command=["python", *sys.argv])
    shutil.copy(run / "defenses" / "leakage_vs_utility.png", RESULTS / "defenses.png")
    print(f"wrote {RESULTS / 'defenses.json'} and {RESULTS / 'defenses.png'}")


if __name__ == "__main__":
    main()
