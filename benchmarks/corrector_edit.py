"""Does an inverter improve on the near misses it reads? Held-out prompts of a store, each
given the 2 closest of `default`'s own greedy output, 3 samples and 4 memory neighbours (the
near misses `logit2prompt hypotheses` writes, closest to the true prompt first); each
checkpoint decodes greedily reading them, and reading its memory's nearest instead.

    python benchmarks/corrector_edit.py --data runs/mix/validation \
        --checkpoint smollm2-135m-instruct runs/mix/corr --hypotheses runs/mix/hyp-val.jsonl

A search round (neighbour_round.py) only gains where a proposal beats the pool's best; the row
"the first near miss itself" is that bar. Writes benchmarks/results/corrector_edit.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from logit2prompt.data.store import DistributionStore
from logit2prompt.evaluation.metrics import format_ci, paired_gain, score
from logit2prompt.evaluation.results import write_results
from logit2prompt.inverter import Inverter
from logit2prompt.models.inverter import native_bf16
from logit2prompt.training.corrector import read_neighbour_texts, write_hypotheses

RESULTS = Path(__file__).parent / "results" / "corrector_edit.json"
BAR = "the first near miss itself"  # what a proposal must beat to change a search's choice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a held-out store of the target")
    parser.add_argument("--checkpoint", nargs="+", required=True, help="first: the proposer")
    parser.add_argument("--hypotheses", required=True, help="written here by the first if absent")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    store = DistributionStore(args.data)
    models = {c: Inverter.from_pretrained(c) for c in args.checkpoint}
    bf16 = native_bf16()
    first = models[args.checkpoint[0]]
    write_hypotheses(first, store, args.hypotheses, batch_size=32, bf16=bf16, progress=False)
    refs = list(store.prompts)
    near = read_neighbour_texts(args.hypotheses, refs)
    x = torch.from_numpy(store.vectors(range(len(store))))[:, : first.config.steps]
    rows = {BAR: [n[0] for n in near]}
    for name, model in models.items():
        rows[f"{name}, memory neighbours"] = model.invert(x, batch_size=32, bf16=bf16)
        rows[f"{name}, given near misses"] = model.invert(
            x, neighbours=near, batch_size=32, bf16=bf16
        )
    results = {}
    for row, predictions in rows.items():
        results[row] = score(predictions, refs)
        if row != BAR:
            results[row]["gain over the first near miss"] = paired_gain(
                predictions, rows[BAR], refs
            )
    if len(models) == 2:
        a, b = (f"{c}, given near misses" for c in args.checkpoint)
        results[b][f"gain over {a}"] = paired_gain(rows[b], rows[a], refs)
    print(f"{len(refs)} prompts of {args.data}; BLEU / token F1")
    for row, entry in results.items():
        print(f"  {row:60} {entry['bleu']['mean']:5.1f} / {entry['token_f1']['mean']:5.1f}")
        for key, gain in entry.items():
            if key.startswith("gain"):
                bleu, f1 = (format_ci(gain[k], "+.1f") for k in ("bleu", "token_f1"))
                print(f"    {key}: BLEU {bleu}, F1 {f1}")
    write_results(
        args.out,
        {
            "prompts": len(refs),
            "rows": results,
            "examples": [
                {"hidden": r, "near misses": n, **{k: v[i] for k, v in rows.items()}}
                for i, (r, n) in enumerate(zip(refs, near, strict=True))
            ],
        },
        command=["python", *sys.argv],
    )


if __name__ == "__main__":
    main()
