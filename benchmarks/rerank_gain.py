"""Paired gain of an inverter's target-re-ranked candidates over the nearest neighbour.

    python benchmarks/rerank_gain.py --checkpoint runs/quality/inverter-prefix-lm \\
        --train runs/quality/train --test runs/quality/test

The quality benchmark reports each method's own confidence interval; this scores the same test
prompts both ways and bootstraps the per-prompt difference. Candidates per prompt: the
inverter's beams (no repeated 3-grams) and the nearest training prompts, re-ranked by the target
(`rerank.inverter_with_neighbours`, as in quality.py). `--proposals FILE` re-ranks candidates
already decoded instead (the `beams` column of quality.py's `test_predictions_*.jsonl`), which
costs only the target queries; it also scores the top proposal alone and, per prompt, the better
of it and the nearest neighbour by BLEU against the hidden prompt: an upper bound on any rule that
chooses between the two without querying the target. Writes benchmarks/results/rerank_gain.json
and every prediction to `<checkpoint>/rerank_gain_predictions.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from logit2prompt.attacks.invert import target_for
from logit2prompt.attacks.nearest import nearest_neighbours
from logit2prompt.attacks.rerank import (
    DEFAULT_BEAMS,
    DEFAULT_NEIGHBOURS,
    inverter_with_neighbours,
    proposals_with_neighbours,
)
from logit2prompt.data.store import DistributionStore
from logit2prompt.evaluation.metrics import (
    format_gain,
    format_table,
    paired_gain,
    score,
    sentence_bleu,
)
from logit2prompt.evaluation.results import write_results
from logit2prompt.models.inverter import Inverter

RESULTS = Path(__file__).parent / "results" / "rerank_gain.json"
ORACLE = "upper bound: per prompt, the better of the top proposal and the nearest by BLEU"
NO_REPEAT_NGRAM = 3  # as in quality.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--train", required=True, help="training store (the neighbours)")
    parser.add_argument(
        "--proposals",
        type=Path,
        help="quality.py's test_predictions_*.jsonl: re-rank its `beams` instead of decoding",
    )
    parser.add_argument("--test", required=True, help="store of the hidden prompts")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    inverter = Inverter.from_pretrained(args.checkpoint)
    train, test = DistributionStore(args.train), DistributionStore(args.test)
    diffs = inverter.fingerprint.differences(test.fingerprint) if inverter.fingerprint else []
    if diffs:
        raise SystemExit(f"{args.test} comes from another target: {'; '.join(diffs)}")
    target = target_for(inverter)
    observed = test.vectors(range(len(test)))
    refs = test.prompts
    # One pass over the training store: the baseline is the first column.
    near = nearest_neighbours(train, observed, DEFAULT_NEIGHBOURS)
    if args.proposals:
        rows = [json.loads(line) for line in args.proposals.read_text().splitlines()]
        if [row["hidden"] for row in rows] != refs:
            raise SystemExit(f"{args.proposals} holds other prompts than {args.test}")
        if any("beams" not in row for row in rows):
            raise SystemExit(f"{args.proposals} has no `beams` column (write it with quality.py)")
        method = f"{args.proposals.name} + {DEFAULT_NEIGHBOURS} neighbours, re-ranked by the target"
        proposals = [row["beams"] for row in rows]
        reranked = proposals_with_neighbours(target, train, observed, proposals, near=near)
    else:
        method = f"{DEFAULT_BEAMS} beams + {DEFAULT_NEIGHBOURS} neighbours, re-ranked by the target"
        reranked = inverter_with_neighbours(
            inverter, target, train, observed, no_repeat_ngram_size=NO_REPEAT_NGRAM, near=near
        )
    nearest = [train.prompts[row[0]] for row in near]
    results = {
        method: score(reranked, refs),
        "nearest training prompt": score(nearest, refs),
    }
    if args.proposals:
        top = [p[0] for p in proposals]
        results["top proposal alone (no target queries)"] = score(top, refs)
        results[ORACLE] = score(
            [
                max((t, n), key=lambda c, r=r: sentence_bleu(c, r))
                for t, n, r in zip(top, nearest, refs, strict=True)
            ],
            refs,
        )
    gain = paired_gain(reranked, nearest, refs)
    print(format_table(results))
    print(f"paired gain over nearest neighbour: {format_gain(gain)}")
    Path(args.checkpoint, "rerank_gain_predictions.jsonl").write_text(
        "".join(
            json.dumps({"hidden": r, "reranked": p, "nearest": n}) + "\n"
            for r, p, n in zip(refs, reranked, nearest, strict=True)
        )
    )
    write_results(
        args.results,
        {
            "benchmark": "rerank_gain",
            "checkpoint": args.checkpoint,
            "train": args.train,
            "test": args.test,
            "target": test.fingerprint.to_dict(),
            "results": results,
            "paired_gain_over_nearest_neighbour": gain,
            "wall_s": time.perf_counter() - started,
        },
        command=["python", *sys.argv],
    )
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
