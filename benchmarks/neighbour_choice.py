"""Which of the nearest training prompts to answer with: L2 distance alone, or the inverter's
likelihood of each candidate given the observed vector.

    python benchmarks/neighbour_choice.py [--run runs/quality] [--k 10]

Uses the stores and inverters of benchmarks/quality.py. Candidates are the k nearest training
prompts by L2 over log-probs; the inverter scores each by teacher forcing (no target queries)
and the lowest NLL wins, summed or per token. The variant is chosen on the validation split,
then every variant is reported on the whole test split, the chosen one marked. An upper bound
beside them picks, per prompt, the candidate with the best BLEU against the hidden prompt: how
much any chooser among the k nearest could gain over L2.
Writes benchmarks/results/neighbour_choice.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from logit2prompt.attacks.nearest import nearest_neighbours
from logit2prompt.attacks.rerank import neighbour_likelihoods, pick_by_likelihood
from logit2prompt.data.store import DistributionStore
from logit2prompt.evaluation.metrics import format_table, score, sentence_bleu
from logit2prompt.evaluation.results import write_results
from logit2prompt.models.inverter import Inverter

RESULTS = Path(__file__).parent / "results" / "neighbour_choice.json"
UPPER_BOUND = "upper bound: the best of the {k} nearest by BLEU vs the hidden prompt"


def variants(inverters: dict, train, store, k: int) -> dict[str, list[str]]:
    """Predictions of every variant on one store, keyed by name, and the upper bound (not a
    variant: it peeks at the hidden prompt)."""
    vectors = store.vectors(range(len(store)))
    near = nearest_neighbours(train, vectors, k)
    out = {"nearest neighbour (L2)": [train.prompts[row[0]] for row in near]}
    out[UPPER_BOUND.format(k=k)] = [
        max((train.prompts[j] for j in row), key=lambda c, r=ref: sentence_bleu(c, r))
        for row, ref in zip(near, store.prompts, strict=True)
    ]
    for name, inverter in inverters.items():
        near, nll, counts = neighbour_likelihoods(inverter, train, vectors, k, near=near)
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
    choosable = [m for m in val_scores if m != UPPER_BOUND.format(k=args.k)]
    chosen = max(choosable, key=lambda m: val_scores[m]["bleu"]["mean"])
    print(f"validation split ({len(val)} prompts):")
    print(format_table(val_scores))
    print(f"chosen on validation: {chosen}")
    test = DistributionStore(run / "test")
    test_scores = {
        m: score(p, test.prompts) for m, p in variants(inverters, train, test, args.k).items()
    }
    print(f"\ntest split ({len(test)} prompts):")
    print(format_table(test_scores))
    write_results(
        RESULTS,
        {
            "benchmark": "neighbour_choice",
            "k": args.k,
            "train_prompts": len(train),
            "chosen_on_validation": chosen,
            "validation": val_scores,
            "test": test_scores,
            "wall_s": time.perf_counter() - started,
        },
        command=["python", *sys.argv],
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
