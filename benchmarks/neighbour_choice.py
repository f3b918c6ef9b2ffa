"""Which of the nearest training prompts to answer with: L2 distance alone, or the inverter's
likelihood of each candidate given the observed vector.

    python benchmarks/neighbour_choice.py [--run runs/quality] [--k 10]

Uses the stores and inverters of benchmarks/quality.py. Candidates are the k nearest training
prompts by L2 over log-probs; the inverter scores each by teacher forcing (no target queries)
and the lowest NLL wins, summed or per token. The variant is chosen on the validation split,
then every variant is reported on the whole test split, the chosen one marked.
Writes benchmarks/results/neighbour_choice.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from logit2prompt.baselines import nearest_neighbour
from logit2prompt.inverter import Inverter
from logit2prompt.metrics import format_table, score
from logit2prompt.rerank import neighbour_likelihoods, pick_by_likelihood
from logit2prompt.store import DistributionStore

RESULTS = Path(__file__).parent / "results" / "neighbour_choice.json"


def variants(inverters: dict, train, store, k: int) -> dict[str, list[str]]:
    """Predictions of every variant on one store, keyed by name."""
    vectors = store.vectors(range(len(store)))
    out = {"nearest neighbour (L2)": nearest_neighbour(train, vectors)}
    for name, inverter in inverters.items():
        near, nll, counts = neighbour_likelihoods(inverter, train, vectors, k)
        for mean in (False, True):
            label = f"{k} nearest, picked by the {name}'s {'per-token' if mean else 'summed'} NLL"
            out[label] = pick_by_likelihood(train, near, nll, counts, mean)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/quality", help="output folder of quality.py")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    run = Path(args.run)
    started = time.perf_counter()
    train = DistributionStore(run / "train")
    inverters = {
        name: Inverter.from_pretrained(run / folder)
        for name, folder in (("inverter", "inverter"), ("retrieval inverter", "inverter-nn2"))
        if (run / folder / "inverter_config.json").is_file()
    }
    val = DistributionStore(run / "validation")
    val_scores = {
        m: score(p, val.prompts) for m, p in variants(inverters, train, val, args.k).items()
    }
    chosen = max(val_scores, key=lambda m: val_scores[m]["bleu"]["mean"])
    print(f"validation split ({len(val)} prompts):")
    print(format_table(val_scores))
    print(f"chosen on validation: {chosen}")
    test = DistributionStore(run / "test")
    test_scores = {
        m: score(p, test.prompts) for m, p in variants(inverters, train, test, args.k).items()
    }
    print(f"\ntest split ({len(test)} prompts):")
    print(format_table(test_scores))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "neighbour_choice",
                "k": args.k,
                "train_prompts": len(train),
                "chosen_on_validation": chosen,
                "validation": val_scores,
                "test": test_scores,
                "wall_s": time.perf_counter() - started,
            },
            indent=1,
        )
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
