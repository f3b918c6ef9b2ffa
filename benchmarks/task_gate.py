"""How much a better choice between the guarded search's pick and the task guess could give,
and whether the guess's own turn can make that choice: a replay of `task_guess.py` results on
their `two_turns.py` pools (saved KLs only, no target passes).

    python benchmarks/task_gate.py --results benchmarks/results/search_samples16-guarded-dev.json \
        --guesses benchmarks/results/task_guess-guarded-dev.json \
        --out benchmarks/results/task_gate-guarded-dev.json

Rows: the search without guesses; the library's gate (`attacks.search.gate_task_guesses`: the
guess where its KL on the *other* turn is the lesser; replayed, and checked against the
`task_guess.py` row); the guess wherever there is one; the guess where its KL on its *own*
turn is at most the pick's plus a margin (the gate `prefer_task_guesses` rejects as biased:
a guess made of a reply's words is near-certain on them); the better of pick and guess by
sentence BLEU (an oracle: the most any gate between the two could give); the filtered
extraction string. Writes benchmarks/results/task_gate.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from two_turns import EXTRACTION, SEARCH, gain_table

from logit2prompt.attacks.search import gate_task_guesses
from logit2prompt.evaluation.metrics import format_ci, paired_gain, sentence_bleu, token_f1
from logit2prompt.evaluation.results import write_results

RESULTS = Path(__file__).parent / "results" / "task_gate.json"
GATED = "search, or the task guess where it explains the other turns better"  # task_guess.py
ALWAYS = "the task guess wherever there is one"
OWN = "the task guess where its own turn's KL is at most the pick's + {} nats"
ORACLE = "the better of pick and guess (oracle gate)"
MARGINS = (0.0, 4.0, 8.0, 15.0, 30.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", required=True, help="guarded two_turns.py results (pools)")
    parser.add_argument("--guesses", required=True, help="task_guess.py results of that file")
    parser.add_argument("--margins", type=float, nargs="+", default=list(MARGINS))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    pools = json.loads(Path(args.results).read_text())
    found = json.loads(Path(args.guesses).read_text())
    examples, turns = pools["examples"], pools["turns"]
    rows_of = found["examples"]
    if [e["hidden"] for e in examples] != [g["hidden"] for g in rows_of]:
        sys.exit(f"{args.guesses} is not task_guess.py's replay of {args.results}")
    if any(g["guesses"] and g.get("guess_turn") is None for g in rows_of):
        sys.exit(f"{args.guesses} has no guess_turn: rerun task_guess.py")
    picks = [e[SEARCH] for e in examples]
    guesses = [g["guesses"][0] if g["guesses"] else "" for g in rows_of]
    source = [turns.index(g["guess_turn"]) if g["guesses"] else -1 for g in rows_of]
    # Per turn, the guess's KL and the pick's saved KL (NaN: not judged / not observed).
    guess_kl = np.array(
        [[g["guess_kl_by_turn"][t][0] if g["guesses"] else None for g in rows_of] for t in turns],
        dtype=float,
    )
    pick_kl = np.full_like(guess_kl, np.nan)
    for i, e in enumerate(examples):
        if picks[i] in e["candidates"]:
            j = e["candidates"].index(picks[i])
            for p, t in enumerate(turns):
                if e["kl"][t][j] is not None:  # else NaN: not observed
                    pick_kl[p, i] = e["kl"][t][j]
    # The library's gate reads the other turns only; where a turn never judged the guess
    # (the task_guess.py file judged it on every turn), NaN leaves it out as the library does.
    gated = gate_task_guesses(picks, guesses, source, guess_kl, pick_kl)
    replay = [g if take else p for p, g, take in zip(picks, guesses, gated, strict=True)]
    mismatch = sum(a != g[GATED] for a, g in zip(replay, rows_of, strict=True))
    if mismatch:
        sys.exit(f"the gate's replay differs from {args.guesses} on {mismatch} rows")
    rows = {SEARCH: picks, GATED: replay}
    rows[ALWAYS] = [g or p for p, g in zip(picks, guesses, strict=True)]
    for m in args.margins:
        rows[OWN.format(f"{m:g}")] = [
            g
            if g and (not p or (np.isfinite(pick_kl[s, i]) and guess_kl[s, i] <= pick_kl[s, i] + m))
            else p
            for i, (p, g, s) in enumerate(zip(picks, guesses, source, strict=True))
        ]
    rows[ORACLE] = [
        max(
            (p, g) if g else (p,),
            key=lambda c: (sentence_bleu(c, e["hidden"]), token_f1(c, e["hidden"])),
        )
        for p, g, e in zip(picks, guesses, examples, strict=True)
    ]
    rows[EXTRACTION] = [e[EXTRACTION] for e in examples]
    sets, cells = gain_table(rows, examples, SEARCH)
    for name in sets:
        idx = [i for i, e in enumerate(examples) if e["set"] == name]
        refs = [examples[i]["hidden"] for i in idx]
        for row in rows:
            if row not in (SEARCH, EXTRACTION):
                sets[name][row]["gain_over_gate"] = paired_gain(
                    [rows[row][i] for i in idx], [rows[GATED][i] for i in idx], refs
                )
        sets[name]["guesses"] = sum(bool(guesses[i]) for i in idx)
    print("| row | " + " | ".join(sets) + " |")
    print("| --- |" + " --- |" * len(sets))
    for k, row in enumerate(rows):
        print(f"| {row} | " + " | ".join(cells[name][k] for name in sets) + " |")
    for name in sets:
        g = sets[name][ORACLE]["gain_over_gate"]
        print(
            f"{name}: oracle gate - library gate BLEU {format_ci(g['bleu'], '+.1f')}, "
            f"F1 {format_ci(g['token_f1'], '+.1f')}"
        )
    write_results(
        args.out,
        {
            "command": ["python", *sys.argv],
            "results": pools.get("command"),
            "guesses": found.get("command"),
            "turns": turns,
            "margins": args.margins,
            "sets": sets,
            "examples": [
                {"hidden": e["hidden"], "set": e["set"], **{r: rows[r][i] for r in rows}}
                for i, e in enumerate(examples)
            ],
        },
    )


if __name__ == "__main__":
    main()
