"""A second round of proposals, conditioned on the search's best: a retrieval-augmented
inverter reads the K candidates the target judged closest in place of its memory's nearest,
proposes again (greedy and sampled), and the target judges the new candidates beside the pool.

    python benchmarks/neighbour_round.py \
        --results benchmarks/results/search_samples16-guarded-dev.json \
        --checkpoint smollm2-135m-instruct-guarded --samples 16 --rounds 1

The shipped v1 inverters were trained to read their 2 nearest training prompts beside the
observation and to copy what fits. Out of domain those neighbours are far: the pool's best
candidate by the target's KL is closer (two_turns.py's oracle and judge rows). Here they are
replaced by that pool's least-KL candidates (`Inverter.invert(neighbours=...)`), so the
inverter edits the search's best guesses rather than memorised prompts; no training. Each round
asks the deployment nothing new: the observed replies (greedy, the same as the file's run, the
leak filter applied as there) are observed again locally, the new candidates are judged by the
same summed KL (`forced_kl` on each turn's 16 steps), and the pool's choice is the least KL over
old and new. Rows per set: the search as saved, each round's choice, and the best candidate of
the grown pool (oracle), with paired gains. Meant for dev prompts (`two_turns.py --dev`) first;
writes benchmarks/results/neighbour_round.json. These are `observe_and_search(rounds=N)`'s
rounds for one neighbour-reading inverter (of the shipped ones only `default` and `-guarded`
read neighbours, so the library's rounds use the same one), without the task-guess rule
(task_guess.py): gains are over the file's search without task guesses where it had some.

`--pools FILE` writes the grown pools after every round (full-precision KLs, too large to
commit: put it under runs/); given back as `--results`, the run goes on from the rounds it holds
up to `--rounds` in all, as if never stopped, so a killed run loses one round at most and a
4-round run extends to 8 without redoing 4.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from two_turns import NO_GUESSES, SEARCH, ask_again, gain_table, saved_kl

from logit2prompt.attacks.invert import target_for, user_turn_of
from logit2prompt.attacks.search import (
    HIDDEN_TURN,
    Probe,
    choose,
    conditioned_proposals,
    forced_kl,
    least_kl,
)
from logit2prompt.evaluation.metrics import sentence_bleu
from logit2prompt.evaluation.results import write_results
from logit2prompt.inverter import Inverter
from logit2prompt.models.inverter import native_bf16

RESULTS = Path(__file__).parent / "results" / "neighbour_round.json"
STEPS = 16  # what the saved KLs read
MAX_DRIFT = 1e-2  # saved KLs are rounded to 4 decimals; task_guess.py saw 1.7e-4 across CPUs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", required=True, help="two_turns.py results with pools")
    parser.add_argument(
        "--checkpoint", required=True, help="a neighbour-reading inverter of the file's target"
    )
    parser.add_argument("--samples", type=int, default=16, help="sampled per prompt and round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1, help="not the first round's seed (0)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--pools", help="write the grown pools here after every round (runs/...)")
    parser.add_argument("--limit", type=int, help="only the first N prompts of each set")
    args = parser.parse_args()
    results = json.loads(Path(args.results).read_text())
    examples, turns = results["examples"], results["turns"]
    if results.get("steps", STEPS) != STEPS:
        sys.exit(f"{args.results} was judged on {results['steps']} steps, not {STEPS}")
    done = results.get("rounds_done", 0)  # a --pools file of an earlier run: go on from it
    if done > args.rounds:
        sys.exit(f"{args.results} holds {done} rounds already: ask for --rounds {done} or more")
    if done:
        for key in ("checkpoint", "samples", "seed", "limit"):
            if results[key] != getattr(args, key):
                given = getattr(args, key)
                sys.exit(f"{args.results} was grown with --{key} {results[key]}, not {given}")
    elif args.limit:
        kept: list[dict] = []
        per_set: Counter[str] = Counter()
        for e in examples:
            if per_set[e["set"]] < args.limit:
                kept.append(e)
                per_set[e["set"]] += 1
        examples = kept
    prompts = [e["hidden"] for e in examples]
    pools = [list(e["candidates"]) for e in examples]
    round_of = [list(e.get("round_of", [0] * len(e["candidates"]))) for e in examples]
    inverter = Inverter.from_pretrained(args.checkpoint)
    if not inverter.config.neighbours:
        sys.exit(f"{args.checkpoint} reads no neighbours")
    k = inverter.config.neighbours
    target = target_for(inverter, batch_size=16)
    before = target.user_turn
    own = user_turn_of(inverter.fingerprint.template, target) or HIDDEN_TURN
    if own not in turns:
        sys.exit(f"{args.checkpoint} reads the reply to {own!r}, not one of the file's {turns}")

    # The deployment's replies, observed again (greedy, so the same as the file's run).
    probes: dict[str, Probe] = {}
    try:
        for turn in turns:
            # the kept rows only (`--limit`): row i of a probe is row i of the pools
            probes[turn] = ask_again(target, {**results, "examples": examples}, turn, STEPS)[0]
    finally:
        target.set_user_turn(before)

    # The saved KLs in `judge`'s shape (per turn, per row): None (not observed) adds nothing.
    kls = [[saved_kl(e, t) for e in examples] for t in turns]
    # Each pool's least-KL candidate judged again must give its saved KL back: the replies
    # observed again are the file's, row for row.
    least = least_kl(pools, kls, 1)
    for t, turn in enumerate(turns):
        again = forced_kl(target, probes[turn], least, progress=False)
        drift = max(
            (
                abs(float(kl[0]) - kls[t][i][pools[i].index(row[0])])
                for i, (row, kl) in enumerate(zip(least, again, strict=True))
                if row and np.isfinite(kl[0])
            ),
            default=0.0,
        )
        if drift > MAX_DRIFT:
            sys.exit(
                f"{turn!r} observed again does not match {args.results} (KL drift {drift:.3g})"
            )
    # The rounds choose by KL alone; where the file's search let task guesses take choices
    # (guarded runs since the rule), its choice without them is the row they are paired with.
    base = NO_GUESSES if NO_GUESSES in examples[0] else SEARCH
    chosen = {row: [e[row] for e in examples] for row in dict.fromkeys([SEARCH, base])}
    chosen.update({f"round {r}": [e[f"round {r}"] for e in examples] for r in range(1, done + 1)})
    seconds = list(results.get("round_seconds", []))
    for r in range(done + 1, args.rounds + 1):
        start = time.perf_counter()
        best = least_kl(pools, kls, inverter.config.neighbours)
        seen = [i for i in range(len(prompts)) if probes[own].seen(i) and best[i]]
        texts = conditioned_proposals(
            inverter,
            probes[own].observed[seen],
            [best[i] for i in seen],
            samples=args.samples,
            seed=args.seed + r - 1,
            batch_size=16,
            bf16=native_bf16("cpu"),  # as two_turns.py's search: emulated bf16 is slower
        )
        new: list[list[str]] = [[] for _ in prompts]
        for i, row in zip(seen, texts, strict=True):
            new[i] = [t for t in row if t not in pools[i]]
        for t, turn in enumerate(turns):
            for i, kl in enumerate(forced_kl(target, probes[turn], new)):
                kls[t][i] = np.concatenate([kls[t][i], np.nan_to_num(kl, nan=0.0)])
        for i, row in enumerate(new):
            pools[i] += row
            round_of[i] += [r] * len(row)
        chosen[f"round {r}"] = choose(pools, kls)[0]
        seconds.append(time.perf_counter() - start)
        print(f"round {r}: {sum(map(len, new))} new candidates, {seconds[-1]:.0f} s", flush=True)
        if args.pools:
            write_results(
                args.pools,
                {
                    "turns": turns,
                    "steps": STEPS,
                    "leak_filter": results.get("leak_filter"),
                    "checkpoint": args.checkpoint,
                    "samples": args.samples,
                    "seed": args.seed,
                    "limit": args.limit,
                    "rounds_done": r,
                    "round_seconds": seconds,
                    "examples": [
                        {
                            "hidden": p,
                            "set": e["set"],
                            **{row: chosen[row][i] for row in chosen},
                            "candidates": pools[i],
                            "round_of": round_of[i],
                            # Full precision: the next round's least-KL and choice as unbroken.
                            "kl": {t: [float(v) for v in kls[j][i]] for j, t in enumerate(turns)},
                        }
                        for i, (p, e) in enumerate(zip(prompts, examples, strict=True))
                    ],
                },
                command=["python", *sys.argv],
            )

    oracle = [
        max(pool, key=lambda c: sentence_bleu(c, p)) if pool else ""
        for pool, p in zip(pools, prompts, strict=True)
    ]
    first = [
        max(
            (c for c, k in zip(pool, of, strict=True) if k == 0),
            key=lambda c: sentence_bleu(c, p),
            default="",
        )
        for pool, of, p in zip(pools, round_of, prompts, strict=True)
    ]
    rows = {
        **chosen,
        "best candidate of the first pool (oracle)": first,
        "best candidate of the grown pool (oracle)": oracle,
    }
    sets, cells = gain_table(rows, examples, base)
    lines = ["| set | " + " | ".join(rows) + " |", "| --- |" + " --- |" * len(rows)]
    last = f"round {args.rounds}"
    for name in sets:
        idx = [i for i, e in enumerate(examples) if e["set"] == name]
        sets[name]["new_chosen"] = int(
            sum(round_of[i][pools[i].index(chosen[last][i])] > 0 for i in idx if chosen[last][i])
        )
        lines.append(f"| {name} | " + " | ".join(cells[name]) + " |")
    print("\n".join(lines))
    write_results(
        args.out,
        {
            "command": ["python", *sys.argv],
            "samples": args.samples,
            "rounds": args.rounds,
            "limit": args.limit,
            "neighbours": k,
            "round_seconds": seconds,
            "sets": sets,
            "examples": [
                {"hidden": p, "set": e["set"], **{row: rows[row][i] for row in rows}}
                for i, (p, e) in enumerate(zip(prompts, examples, strict=True))
            ],
        },
    )


if __name__ == "__main__":
    main()
