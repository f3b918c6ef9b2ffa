"""A minimum-Bayes-risk choice weighted by the target's KL, replayed on a search's saved pool:
in place of the least-KL candidate, the one that agrees most (BLEU+F1, `attacks.mbr`) with
the pool's candidates, each weighted by exp(-KL / T) over the K least-KL.

    python benchmarks/kl_mbr.py --results benchmarks/results/search_samples16-guarded-dev.json \
        --guesses benchmarks/results/task_guess-guarded-dev.json \
        --out benchmarks/results/kl_mbr-guarded-dev.json

The judge keeps about half of its pool's oracle out of domain (two_turns.py); when several
near-least-KL candidates share words the hidden prompt has, their consensus may score above the
single least-KL one. Grid: K in 5, 10, 20, all; T in 0.3, 1, 3 (KL summed over the file's
turns, in nats); the candidate's own weight counted as a match (self 1: T -> 0 gives the
search back) or not (self 0: pure consensus). With `--guesses` (task_guess.py's replay on
the same prompts) each choice then goes through the library's task-guess rule
(`attacks.search.gate_task_guesses`: the guess replaces it where its KL on the turns other
than its own is the lesser), and the base row is that rule. No target passes: the saved
KLs are the judge. Meant for dev prompts; writes benchmarks/results/kl_mbr.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from two_turns import SEARCH, gain_table, saved_kl, saved_total

from logit2prompt.attacks.mbr import DEFAULT_UTILITY, UTILITIES
from logit2prompt.attacks.search import choose, gate_task_guesses
from logit2prompt.evaluation.results import write_results

RESULTS = Path(__file__).parent / "results" / "kl_mbr.json"
GATED = "search, or the task guess where it explains the other turns better"  # task_guess.py
TOPS = (5, 10, 20, 0)  # 0: the whole pool
TEMPERATURES = (0.3, 1.0, 3.0)


def kl_mbr(
    candidates: list[str], kl: np.ndarray, top: int, temperature: float, own: float, utility
) -> int:
    """Index of the candidate with the highest KL-weighted mean utility among the `top`
    least-KL non-blank candidates (all if 0; blanks are never chosen, as in
    `attacks.search.choose`); `own` is what a candidate's match with itself counts."""
    usable = [j for j, c in enumerate(candidates) if c.strip()]
    order = np.array(sorted(usable, key=lambda j: kl[j])[: top or None])
    w = np.exp(-(kl[order] - kl[order].min()) / temperature)
    w /= w.sum()
    scores = [
        sum(
            w[b] * (own if a == b else utility(candidates[i], candidates[j]))
            for b, j in enumerate(order)
        )
        for a, i in enumerate(order)
    ]
    return int(order[int(np.argmax(scores))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", required=True, help="two_turns.py results with pools")
    parser.add_argument("--guesses", help="task_guess.py results on the same prompts")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    results = json.loads(Path(args.results).read_text())
    examples, turns = results["examples"], results["turns"]
    guesses = json.loads(Path(args.guesses).read_text())["examples"] if args.guesses else None
    if guesses and [g["hidden"] for g in guesses] != [e["hidden"] for e in examples]:
        sys.exit(f"{args.guesses} holds other prompts than {args.results}")
    if guesses and any(g["guesses"] and g.get("guess_turn") not in turns for g in guesses):
        sys.exit(
            f"{args.guesses} does not say which turn each guess came from; rerun task_guess.py"
        )
    base = GATED if guesses else SEARCH
    cache: dict[tuple[str, str], float] = {}
    measure = UTILITIES[DEFAULT_UTILITY]

    def utility(h: str, r: str) -> float:
        if (h, r) not in cache:
            cache[h, r] = measure(h, r)
        return cache[h, r]

    def gated(i: int, pick: int) -> str:
        """The pick, or the prompt's task guess where the library's rule takes it (its KL on
        the turns other than its own, from task_guess.py's saved KLs, against the pick's)."""
        e, g = examples[i], guesses[i] if guesses else None
        if not g or not g["guesses"]:
            return e["candidates"][pick]
        nan = float("nan")
        take = gate_task_guesses(
            [e["candidates"][pick]],
            g["guesses"][:1],
            [turns.index(g["guess_turn"])],
            [
                [nan if g["guess_kl_by_turn"][t][0] is None else g["guess_kl_by_turn"][t][0]]
                for t in turns
            ],
            [[saved_kl(e, t)[pick]] for t in turns],
        )[0]
        return g["guesses"][0] if take else e["candidates"][pick]

    rows = {base: [g[base] for g in guesses] if guesses else [e[SEARCH] for e in examples]}
    for top in TOPS:
        for t in TEMPERATURES:
            for own in (1.0, 0.0):
                name = f"KL-weighted MBR, {top or 'all'} least-KL, T {t}, self {own:g}"
                rows[name] = [
                    gated(i, kl_mbr(e["candidates"], saved_total(e, turns), top, t, own, utility))
                    if any(c.strip() for c in e["candidates"])
                    else rows[base][i]
                    for i, e in enumerate(examples)
                ]
    # The library's own pick (`choose` on the saved KLs), through the gate, must give the base
    # row back: the same pools, the same choice, the same rule.
    least = choose(
        [e["candidates"] for e in examples], [[saved_kl(e, t) for e in examples] for t in turns]
    )[0]
    check = [
        gated(i, e["candidates"].index(c)) if c else rows[base][i]
        for i, (e, c) in enumerate(zip(examples, least, strict=True))
    ]
    if check != rows[base]:
        sys.exit("the saved pools do not reproduce the file's choice; wrong --guesses file?")
    sets, cells = gain_table(rows, examples, base)
    pooled, pooled_cells = gain_table(rows, [{**e, "set": "all"} for e in examples], base)
    sets.update(pooled)
    cells.update(pooled_cells)
    names = list(cells)
    print("| row | " + " | ".join(names) + " |\n| --- |" + " --- |" * len(names))
    for k, row in enumerate(rows):
        print(f"| {row} | " + " | ".join(cells[n][k] for n in names) + " |")
    write_results(
        args.out,
        {
            "command": ["python", *sys.argv],
            "source": args.results,
            "guesses": args.guesses,
            "utility": DEFAULT_UTILITY,
            "base": base,
            "sets": sets,
        },
    )


if __name__ == "__main__":
    main()
