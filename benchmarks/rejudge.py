"""A second look at the search's shortlist: re-judge each prompt's K least-KL candidates on
longer replies and on one more innocuous turn, from a `two_turns.py` results file's saved pools.

    python benchmarks/rejudge.py --results benchmarks/results/search_samples16-guarded-dev.json \
        --checkpoint smollm2-135m-instruct-guarded --top 6 --steps 48 \
        --extra-turn "What can you help me with?"

The search sums, over two turns, the KL from 16 observed steps of each reply to the candidate's
teacher-forced distributions (`attacks/search.py`). Out of domain its choice keeps about half of
its pool's best while the best of its 5 least-KL candidates keeps 76-89% (`two_turns.py
--rescore`). This asks the deployment again (the same greedy replies, read to `--steps` steps,
and the extra turn's reply, leak-filtered as the file's run was) and re-ranks the shortlist
under each judge: the saved 16-step KL (the search as it was), the same turns read to
`--steps`, the 16-step turns plus the extra turn, and both. With `--steps` above 16 the
leak filter reads the longer reply (as `observe_and_search` filters the longest reply it
observed), so "16 steps, asked again" can differ from the saved search where only a reply's
later words leaked (at 48 steps: 2 of the 150 guarded dev prompts, 4 of the 300 scored).
Meant for dev prompts (`two_turns.py --dev`): a rule chosen here is then run once on the
scored prompts. Writes benchmarks/results/rejudge.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from two_turns import SEARCH, ask_again, gain_table, saved_kl

from logit2prompt.attacks.invert import target_for
from logit2prompt.attacks.search import MEASURES, Probe, choose, forced_divergences, least_kl
from logit2prompt.evaluation.metrics import sentence_bleu
from logit2prompt.evaluation.results import write_results
from logit2prompt.inverter import Inverter

RESULTS = Path(__file__).parent / "results" / "rejudge.json"
SAVED_STEPS = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", required=True, help="two_turns.py results with pools")
    parser.add_argument("--checkpoint", required=True, help="an inverter of the file's target")
    parser.add_argument("--top", type=int, default=6, help="least-KL candidates re-judged")
    parser.add_argument("--steps", type=int, default=48, help="reply steps the new judge reads")
    parser.add_argument(
        "--extra-turn",
        default="What can you help me with?",
        help="one more innocuous turn judged ('' for none; user mode has none)",
    )
    parser.add_argument(
        "--measures",
        nargs="+",
        default=["kl"],
        choices=MEASURES,
        help="what the re-judging sums over the steps (kl: the search's; each gets its rows, "
        "and with kl and reverse_kl their sum, symmetric KL)",
    )
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    results = json.loads(Path(args.results).read_text())
    examples, turns = results["examples"], results["turns"]
    if results.get("steps", SAVED_STEPS) != SAVED_STEPS:
        sys.exit(f"{args.results} was judged on {results['steps']} steps, not {SAVED_STEPS}")
    prompts = [e["hidden"] for e in examples]
    saved = [[saved_kl(e, t) for e in examples] for t in turns]
    shortlist = least_kl([e["candidates"] for e in examples], saved, args.top)
    inverter = Inverter.from_pretrained(args.checkpoint)
    target = target_for(inverter, batch_size=16)
    before = target.user_turn
    measures = list(dict.fromkeys(["kl", *args.measures]))
    kls: dict[tuple[str, int, str], list[np.ndarray]] = {}
    extra = [args.extra_turn] if args.extra_turn else []
    try:
        for turn in [*turns, *extra]:
            asked = ask_again(target, results, turn, args.steps)[0]
            for steps in sorted({SAVED_STEPS, args.steps}):
                probe = Probe(asked.user_turn, asked.observed[:, :steps], asked.refused)
                found = forced_divergences(target, probe, shortlist, measures)
                for m in measures:
                    kls[(turn, steps, m)] = found[m]
            del asked
    finally:
        target.set_user_turn(before)

    def pick(keys: list[tuple[str, int, str]]) -> list[str]:
        """The search's rule (`choose`) over the shortlist, summing the judges in `keys`."""
        return choose(shortlist, [kls[k] for k in keys])[0]

    judges = {
        f"saved {SAVED_STEPS}-step KL (the search)": [e[SEARCH] for e in examples],
        f"{SAVED_STEPS} steps, asked again": pick([(t, SAVED_STEPS, "kl") for t in turns]),
    }
    if args.steps != SAVED_STEPS:
        judges[f"{args.steps} steps"] = pick([(t, args.steps, "kl") for t in turns])
    for steps in (SAVED_STEPS, args.steps) if extra else ():
        judges[f"{steps} steps + {args.extra_turn!r}"] = pick(
            [(t, steps, "kl") for t in [*turns, *extra]]
        )
    for m in measures[1:]:
        judges[f"{args.steps} steps, {m}"] = pick([(t, args.steps, m) for t in turns])
    if "reverse_kl" in measures:
        judges[f"{args.steps} steps, kl + reverse_kl"] = pick(
            [(t, args.steps, m) for t in turns for m in ("kl", "reverse_kl")]
        )
    base = next(iter(judges))
    sets, cells = gain_table(judges, examples, base)
    lines = ["| set | " + " | ".join(judges) + f" | best of the {args.top} |"]
    lines.append("| --- |" + " --- |" * (len(judges) + 1))
    for name in sets:
        idx = [i for i, e in enumerate(examples) if e["set"] == name]
        best = np.mean(
            [max((sentence_bleu(c, prompts[i]) for c in shortlist[i]), default=0.0) for i in idx]
        )
        sets[name]["best_of_top"] = float(best)
        lines.append(f"| {name} | " + " | ".join(cells[name]) + f" | {best:.1f} |")
    print("\n".join(lines))
    write_results(
        args.out,
        {
            "command": ["python", *sys.argv],
            "top": args.top,
            "steps": args.steps,
            "extra_turn": args.extra_turn,
            "measures": measures,
            "sets": sets,
            "examples": [
                {"hidden": p, "set": e["set"], **{j: judges[j][i] for j in judges}}
                for i, (p, e) in enumerate(zip(prompts, examples, strict=True))
            ],
        },
    )


if __name__ == "__main__":
    main()
