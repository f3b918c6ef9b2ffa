"""The inverter as its own judge: pick among its beams and the nearest training prompts by its
own likelihood, with no target queries.

    python benchmarks/self_rerank.py --checkpoint runs/quality48k/inverter-nn2-prefix-lm \\
        --train runs/quality48k/train --validation runs/quality48k/validation \\
        --test runs/quality48k/test \\
        --test-proposals runs/quality48k/inverter-nn2-prefix-lm/test_predictions_4beams.jsonl

Candidates per prompt: the inverter's beams (quality.py's `beams` column for the test split;
decoded here for the validation split, same settings) and the 3 nearest training prompts by
L2 over log-probs. The inverter scores each by teacher forcing (`rerank.candidate_likelihoods`).
Two families of rules, each on the summed or the per-token NLL:
- *bonus*: the lowest NLL wins after a neighbour's is lowered by a bonus (beam search already
  maximises this likelihood, so its beams start ahead of the neighbours);
- *gate*: the top beam if its NLL is below a threshold (the inverter is confident), else the
  nearest neighbour.
Family, scale and value are chosen on the validation split by BLEU, then applied once to the
test split, beside the top beam, the nearest neighbour, and the per-prompt oracle over the
same candidates.
Per-candidate NLLs are cached next to the checkpoint (`self_rerank_<split>.jsonl`), so a
rerun only re-scores. Writes benchmarks/results/self_rerank.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from logit2prompt.attacks.invert import ensure_same_target, invert_store
from logit2prompt.attacks.nearest import nearest_neighbours
from logit2prompt.attacks.rerank import (
    DEFAULT_CONFIDENCE_NATS,
    DEFAULT_NEIGHBOURS,
    SELF_RERANK_RULES,
    candidate_likelihoods,
    pick_by_inverter,
)
from logit2prompt.data.store import DistributionStore
from logit2prompt.evaluation.metrics import (
    format_gain,
    format_table,
    paired_gain,
    per_example_scores,
    score,
)
from logit2prompt.evaluation.results import write_results
from logit2prompt.models.inverter import Inverter

RESULTS = Path(__file__).parent / "results" / "self_rerank.json"
# Value grids per NLL scale (bonus or gate threshold): up to about what separates a good beam
# from a neighbour, in nats summed over the prompt and per token.
GRID = {"summed": [float(b) for b in range(0, 31)], "per-token": [b / 20 for b in range(41)]}
FAMILIES = ("bonus", "gate")


def proposals_for(inverter, store: DistributionStore, path: Path, beams: int) -> list[list[str]]:
    """The inverter's `beams` beams per prompt of `store`, read from `path` (quality.py's
    predictions JSONL) or decoded and written there."""
    if not path.is_file():
        rows = invert_store(
            inverter, store, num_beams=beams, num_return_sequences=beams, grouped=True
        )
        path.write_text(
            "".join(
                json.dumps({"hidden": h, "beams": b}, ensure_ascii=False) + "\n"
                for h, b in zip(store.prompts, rows, strict=True)
            )
        )
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if [row["hidden"] for row in rows] != store.prompts:
        raise SystemExit(f"{path} holds other prompts than {store.path}")
    return [row["beams"] for row in rows]


def scored_candidates(
    inverter, train, store, proposals, cache: Path, top_only: bool = False
) -> list[dict]:
    """Per prompt: candidates (beams, then neighbours; with `top_only` the top beam and the
    nearest), which are neighbours, summed NLL and token counts; cached in `cache`."""
    if top_only:
        proposals = [p[:1] for p in proposals]
    if cache.is_file():
        rows = [json.loads(line) for line in cache.read_text().splitlines()]
        if [row["hidden"] for row in rows] == store.prompts and all(
            row["candidates"][: len(p)] == p for row, p in zip(rows, proposals, strict=True)
        ):
            return rows
    observed = store.vectors(range(len(store)))
    near = nearest_neighbours(train, observed, DEFAULT_NEIGHBOURS)
    if top_only:
        near = [row[:1] for row in near]
    rows = []
    for hidden, beams, row in zip(store.prompts, proposals, near, strict=True):
        neighbours = [train.prompts[j] for j in row if train.prompts[j] not in beams]
        rows.append(
            {
                "hidden": hidden,
                "candidates": [*beams, *neighbours],
                "neighbour": [False] * len(beams) + [True] * len(neighbours),
                "nearest": train.prompts[row[0]],
            }
        )
    nll, counts = candidate_likelihoods(inverter, observed, [r["candidates"] for r in rows])
    for r, n, c in zip(rows, nll, counts, strict=True):
        r["nll"], r["tokens"] = n.tolist(), c.tolist()
    cache.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def choose(rows: list[dict], family: str, rule: str, value: float) -> list[int]:
    """Per prompt, the index of the candidate a rule picks (see the module docstring)."""
    out = []
    for r in rows:
        nll, tokens, neighbour = (np.array(r[k]) for k in ("nll", "tokens", "neighbour"))
        if family == "bonus":
            out.append(pick_by_inverter(nll, tokens, neighbour, rule, value))
        else:
            top = nll[0] / max(tokens[0], 1) if rule == "per-token" else nll[0]
            out.append(0 if top < value else r["candidates"].index(r["nearest"]))
    return out


def pick(rows: list[dict], family: str, rule: str, value: float) -> list[str]:
    chosen = choose(rows, family, rule, value)
    return [r["candidates"][i] for r, i in zip(rows, chosen, strict=True)]


def oracle(rows: list[dict]) -> list[str]:
    """Per prompt, the candidate with the best BLEU against the hidden prompt (peeks)."""
    out = []
    for r in rows:
        bleu = per_example_scores(r["candidates"], [r["hidden"]] * len(r["candidates"]))["bleu"]
        out.append(r["candidates"][int(np.argmax(bleu))])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--train", required=True, help="training store (the neighbours)")
    parser.add_argument("--validation", required=True, help="store the rule is chosen on")
    parser.add_argument("--test", required=True)
    parser.add_argument(
        "--test-proposals", type=Path, help="quality.py's test_predictions_*beams.jsonl"
    )
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument(
        "--top-only",
        action="store_true",
        help="score only the top beam and the nearest prompt (enough for the gate; ~4x faster)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    inverter = Inverter.from_pretrained(args.checkpoint)
    train = DistributionStore(args.train)
    splits = {}
    for split, path, proposals_path in (
        ("validation", args.validation, None),
        ("test", args.test, args.test_proposals),
    ):
        store = DistributionStore(path)
        ensure_same_target(inverter, store)
        proposals_path = proposals_path or (
            args.checkpoint / f"{split}_predictions_{args.num_beams}beams.jsonl"
        )
        proposals = proposals_for(inverter, store, proposals_path, args.num_beams)
        cache = args.checkpoint / f"self_rerank_{split}{'_top' if args.top_only else ''}.jsonl"
        splits[split] = scored_candidates(inverter, train, store, proposals, cache, args.top_only)
        print(f"{split}: {sum(len(r['candidates']) for r in splits[split])} candidates scored")

    val = splits["validation"]
    val_refs = [r["hidden"] for r in val]
    grid = {
        (family, rule, value): score(pick(val, family, rule, value), val_refs, ci=False)
        for family in FAMILIES
        for rule in SELF_RERANK_RULES
        for value in GRID[rule]
    }
    # Highest validation BLEU; ties go to the first family and rule, then the smaller value.
    best = max(grid, key=lambda k: (grid[k]["bleu"]["mean"], -list(grid).index(k)))
    family, rule, value = best
    described = {
        "bonus": f"lowest {rule} NLL, a neighbour's lowered by {value:g}",
        "gate": f"top beam if its {rule} NLL < {value:g}, else the nearest",
    }[family]
    print(f"chosen on validation ({len(val)} prompts): {described}")

    test = splits["test"]
    refs = [r["hidden"] for r in test]
    nearest = [r["nearest"] for r in test]
    picks = choose(test, family, rule, value)
    chosen = [r["candidates"][i] for r, i in zip(test, picks, strict=True)]
    pool = (
        "the top beam and the nearest"
        if args.top_only
        else f"{args.num_beams} beams + {DEFAULT_NEIGHBOURS} neighbours"
    )
    name = f"picked by the inverter between {pool}: {described}"
    columns = {
        "top beam (the inverter's own output)": [r["candidates"][0] for r in test],
        name: chosen,
        **{
            f"lowest {r} NLL among {pool}, no bonus": pick(test, "bonus", r, 0.0)
            for r in SELF_RERANK_RULES
        },
        "nearest training prompt": nearest,
        "upper bound: per prompt, the best candidate by BLEU vs the hidden prompt": oracle(test),
    }
    if (family, rule, value) != ("gate", "summed", DEFAULT_CONFIDENCE_NATS):
        columns[
            f"top beam if its summed NLL < {DEFAULT_CONFIDENCE_NATS:g} (the library default), "
            "else the nearest"
        ] = pick(test, "gate", "summed", DEFAULT_CONFIDENCE_NATS)
    results = {method: score(preds, refs) for method, preds in columns.items()}
    gain = paired_gain(chosen, nearest, refs)
    print(f"test split ({len(test)} prompts):")
    print(format_table(results))
    print(f"paired gain over nearest neighbour: {format_gain(gain)}")
    picked_neighbour = np.mean([r["neighbour"][i] for r, i in zip(test, picks, strict=True)])
    print(f"the chosen rule answers with a training prompt for {100 * picked_neighbour:.1f}%")
    write_results(
        args.results,
        {
            "benchmark": "self_rerank",
            "checkpoint": str(args.checkpoint),
            "train": args.train,
            "validation": args.validation,
            "test": args.test,
            "num_beams": args.num_beams,
            "top_only": args.top_only,
            "neighbours": DEFAULT_NEIGHBOURS,
            "chosen_on_validation": {"family": family, "rule": rule, "value": value},
            "validation_scores": {
                "prompts": len(val),
                "top_beam": score([r["candidates"][0] for r in val], val_refs, ci=False),
                "nearest": score([r["nearest"] for r in val], val_refs, ci=False),
                "chosen": grid[best],
                "bleu_by_rule": {
                    f"{f} {r} {v:g}": m["bleu"]["mean"] for (f, r, v), m in grid.items()
                },
            },
            "results": results,
            "paired_gain_over_nearest_neighbour": gain,
            "answers_with_training_prompt_pct": 100 * picked_neighbour,
            "wall_s": time.perf_counter() - started,
        },
        command=["python", *sys.argv],
    )
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
