"""Target-verified search with K observed steps: does re-ranking become decisive?

    python benchmarks/steps_rerank.py --models runs/steps/models --train runs/steps/train \
        --test runs/steps/test --n 100

For the K = 1 and K = 16 inverters of benchmarks/steps.py, on the first `--n` prompts of the
test store: the inverter's best of 4 beams, the nearest training prompt (L2 over the K steps),
and the 4 beams + 3 nearest training prompts re-ranked by the target on all K observed steps
(an exact candidate reproduces every step). Writes benchmarks/results/steps_rerank.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from logit2prompt.attacks.invert import target_from_fingerprint
from logit2prompt.data.store import DistributionStore
from logit2prompt.evaluation.metrics import score
from logit2prompt.evaluation.results import write_results
from logit2prompt.models.inverter import Inverter
from logit2prompt.recipes.methods import MethodContext, run_methods

RESULTS = Path(__file__).parent / "results" / "steps_rerank.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="runs/steps/models")
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    test, train = DistributionStore(args.test), DistributionStore(args.train)
    target = target_from_fingerprint(test.fingerprint, batch_size=16)
    test.attach(target)
    train.attach(target)
    n = min(args.n, len(test))
    references = test.prompts[:n]
    results: dict = {"prompts": n, "train_prompts": len(train), "beams": args.beams, "rows": {}}
    for k in args.ks:
        inverter = Inverter.from_pretrained(Path(args.models) / f"k{k}")
        ctx = MethodContext(
            inverter,
            test.vectors(range(n), k),
            target=target,
            train=train,
            references=references,
            num_beams=args.beams,
            rerank_beams=args.beams,
            batch_size=16,
        )
        start = time.perf_counter()
        preds = run_methods(["inverter", "nn", "rerank"], ctx)
        seconds = time.perf_counter() - start
        for name, p in preds.items():
            row = score(p, references)
            results["rows"][f"K={k}: {name}"] = row
            print(
                f"K={k:<2} {name:<52} BLEU {row['bleu']['mean']:5.1f} "
                f"F1 {row['token_f1']['mean']:5.1f} exact {row['exact']['mean']:4.1f}%"
            )
        results["rows"][f"K={k}: seconds"] = round(seconds, 1)
    write_results(args.out, results, command=["python", *sys.argv])


if __name__ == "__main__":
    main()
