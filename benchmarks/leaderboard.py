"""The inverter and every baseline on the BIG-bench test split and three out-of-domain sets.

    python benchmarks/leaderboard.py [--run runs/quality] [--sample 100]
        [--baselines nn,constant,extraction,fewshot,text] [--checkpoint inverter]
        [--num-beams 1] [--no-repeat-ngram-size 3] [--results FILE]

Uses the inverter and training store of benchmarks/quality.py (run it first) and runs
`logit2prompt evaluate` on each set: the BIG-bench test split (never trained or tuned on) and
the chat-style out-of-domain sets of ../shared/data. Each set's full report (HTML, JSON,
predictions) lands in runs/leaderboard/<set>/; the combined table goes to
benchmarks/results/leaderboard.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from logit2prompt.evaluation.evaluate import EvalConfig, evaluate
from logit2prompt.evaluation.results import write_results

RESULTS = Path(__file__).parent / "results" / "leaderboard.json"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = [  # (name, file, split)
    ("bigbench test", "bigbench_prompts.jsonl", "test"),
    ("chatterbot", "chatterbot_first_turns.jsonl", None),
    ("do-not-answer", "donotanswer_questions.jsonl", None),
    ("self-instruct", "self_instruct_seed.jsonl", None),
]
SHOWN = ("bleu", "token_f1", "exact", "cosine", "kl", "top1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/quality", help="output folder of quality.py")
    parser.add_argument("--data", default=str(SHARED), help="folder with the corpus files")
    parser.add_argument("--out", default="runs/leaderboard")
    parser.add_argument("--sample", type=int, default=100, help="random prompts per set")
    parser.add_argument("--baselines", default="nn,constant,extraction,fewshot,text")
    parser.add_argument(
        "--text-checkpoint", default=None, help="default: <run>/text-inverter (train-text)"
    )
    parser.add_argument("--no-repeat-ngram-size", type=int, default=3)
    parser.add_argument("--checkpoint", default="inverter", help="inverter folder under --run")
    parser.add_argument(
        "--num-beams", type=int, default=1, help="4 decodes once for inverter and re-ranking"
    )
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    run, data = Path(args.run), Path(args.data)
    results_path = Path(args.results)
    table: dict[str, dict] = {}
    seconds = {}
    for name, file, split in SETS:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        results = evaluate(
            EvalConfig(
                checkpoint=str(run / args.checkpoint),
                prompts=str(data / file),
                out=str(Path(args.out) / name.replace(" ", "-")),
                baselines=tuple(b for b in args.baselines.split(",") if b),
                train_data=str(run / "train"),
                split=split,
                sample=args.sample,
                no_repeat_ngram_size=args.no_repeat_ngram_size,
                num_beams=args.num_beams,
                text_checkpoint=args.text_checkpoint or str(run / "text-inverter"),
                rerank=True,
            )
        )
        seconds[name] = time.perf_counter() - t0
        table[name] = {
            "n": results["corpus"]["n"],
            "available": results["corpus"]["available"],
            "best_attack": results["best_attack"],
            "methods": {
                m: {k: s[k] for k in SHOWN if k in s} for m, s in results["summary"].items()
            },
        }
    methods = list(next(iter(table.values()))["methods"])
    print("\nBLEU / token F1 / cosine / top-1 % per set (95% CIs in the JSON)")
    width = max(len(m) for m in methods)
    print(f"{'method':{width}} " + " ".join(f"{n:>26}" for n in table))
    for m in methods:
        cells = []
        for entry in table.values():
            s = entry["methods"][m]
            cells.append(
                f"{s['bleu']['mean']:5.1f} / {s['token_f1']['mean']:4.1f} / "
                f"{s.get('cosine', {'mean': float('nan')})['mean']:.2f} / "
                f"{s.get('top1', {'mean': float('nan')})['mean']:4.1f}"
            )
        print(f"{m:{width}} " + " ".join(f"{c:>26}" for c in cells))
    write_results(
        results_path,
        {
            "checkpoint": str(run / args.checkpoint),
            "num_beams": args.num_beams,
            "sample": args.sample,
            "sets": table,
            "seconds": seconds,
        },
        command=["python", *sys.argv],
    )
    print(f"wrote {results_path}")


if __name__ == "__main__":
    main()
