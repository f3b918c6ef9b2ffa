"""Which lengths of the observed reply the user-mode search should propose, chosen on
validation prompts (not the OOD sets).

    python benchmarks/user_replies.py --data ../shared/data --limit 120

The shipped user inverter's search (its greedy output and 4 nearest memorised prompts) on a
seeded LIMIT of BIG-bench's validation split, judged on the first 16 steps of the reply to the
hidden prompt, with the reply's first N tokens as candidates for N in 8, 16, 24, 32 (read from
32 observed steps); each combination is replayed from one judging. Writes
benchmarks/results/user_replies.json.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from logit2prompt.attacks.invert import target_for
from logit2prompt.attacks.search import Probe, choose, forced_kl, proposals
from logit2prompt.data.corpus import load_corpus
from logit2prompt.evaluation.metrics import score
from logit2prompt.evaluation.results import write_results
from logit2prompt.inverter import Inverter
from logit2prompt.recipes.methods import MethodContext

RESULTS = Path(__file__).parent / "results" / "user_replies.json"
JUDGED = 16
LENGTHS = (16, 8, 24, 32)
COMBINATIONS = ((16,), (16, 8), (16, 32), (16, 24, 32), (8, 16, 24, 32), (32,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="folder with bigbench_prompts.jsonl")
    parser.add_argument("--limit", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    prompts = load_corpus(str(Path(args.data) / "bigbench_prompts.jsonl"), split="validation").texts
    random.Random(args.seed).shuffle(prompts)
    prompts = prompts[: args.limit]
    inverter = Inverter.from_pretrained("smollm2-135m-instruct")
    target = target_for(inverter, batch_size=48)
    full = target.next_token_logprobs(prompts, steps=max(LENGTHS)).numpy()
    observed = full[:, :JUDGED]
    replies = {n: MethodContext(None, full[:, :n], target=target).replies() for n in LENGTHS}
    candidates, kinds = [], []
    for i, row in enumerate(proposals(inverter, observed, 4)[0]):
        row, kind = list(row), ["inverter"] + ["memory"] * (len(row) - 1)
        for n in LENGTHS:
            if replies[n][i] and replies[n][i] not in row:
                row.append(replies[n][i])
                kind.append(n)
        candidates.append(row)
        kinds.append(kind)
    t0 = time.perf_counter()
    kl = forced_kl(target, Probe(None, observed), candidates)
    results: dict = {"n": len(prompts), "judge_seconds": round(time.perf_counter() - t0, 1)}
    for combo in COMBINATIONS:
        allowed = [[isinstance(k, str) or k in combo for k in row] for row in kinds]
        chosen = choose(candidates, [kl], allowed)[0]
        s = score(chosen, prompts, ci=False)
        key = "replies " + "+".join(map(str, combo))
        results[key] = {
            "bleu": round(s["bleu"]["mean"], 2),
            "token_f1": round(s["token_f1"]["mean"], 2),
        }
    for n in (16, 32):
        s = score(replies[n], prompts, ci=False)
        results[f"the {n}-token reply alone"] = {
            "bleu": round(s["bleu"]["mean"], 2),
            "token_f1": round(s["token_f1"]["mean"], 2),
        }
    write_results(args.out, results, command=["python", *sys.argv])
    for key, value in results.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
