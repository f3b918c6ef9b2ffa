"""Out-of-domain recovery by the inverters for the default target, per threat model: the
demo's table on more prompts, with paired gains.

    python benchmarks/shipped_ood.py --data ../shared/data --limit 100 \
        [--modes user,guarded,system] [--checkpoint MODE=DIR ...] [--versus RESULTS.json] \
        [--attacks all] [--no-search] [--search-with MODE=DIR[,DIR] ...]

For each set (a seeded sample of LIMIT of the first 200 prompts of each OOD file, the rows the
demo's prompts come from) and each mode, the demo's rows (`recipes/demo.py`): the inverter,
re-ranked by the target, the nearest memorised training prompt, and the best of the demo's
extraction strings (leak-filtered in guarded mode) and the observed reply itself, with the
inverter's paired BLEU gain over the last three; and the search (`attacks/search.py`, on by
default as in the demo; `--no-search`), with its paired gains over them and the inverter.
Default checkpoints: the shipped ones (user, guarded); system mode, for which none is shipped,
needs `--checkpoint system=DIR`. `--attacks all` asks every string of the built-in list instead
of the demo's one: the best-string row is then the best of them over the mode's prompts (a
choice made on the scored prompts, which flatters the baseline), and the per-prompt oracle among
them is one more row; each string is 64-token greedy replies to every prompt (on 2 CPU cores
~3.3 minutes per string for 300 prompts, so `all`, 12 strings, takes ~40 minutes per mode
there). `--versus` pairs the inverter, per prompt, with the inverter row of an earlier run of
this script (e.g. a new checkpoint against the shipped one). Writes
benchmarks/results/shipped_ood.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from logit2prompt.attacks.extraction import load_attacks
from logit2prompt.evaluation.metrics import format_ci, paired_gain
from logit2prompt.evaluation.results import write_results
from logit2prompt.recipes import demo
from logit2prompt.recipes.methods import EXTRACTION_ORACLE, MBR

RESULTS = Path(__file__).parent / "results" / "shipped_ood.json"
SETS = ("chatterbot_first_turns", "donotanswer_questions", "self_instruct_seed")
FIRST = 200  # the rows the OOD stores of the other benchmarks hold
SHORT = {
    demo.INVERTER: "inverter",
    MBR: "inverter (MBR)",
    demo.RERANKED: "re-ranked",
    demo.NEAREST: "nearest",
    demo.EXTRACTION_BEST: "extraction",
    demo.REPLY: "reply",
    EXTRACTION_ORACLE: "extraction oracle",
    demo.SEARCH: "search",
}


def rows_of(data: Path, limit: int, seed: int) -> list[dict]:
    rows = []
    for name in SETS:
        lines = (data / f"{name}.jsonl").read_text().splitlines()[:FIRST]
        # Each prompt once (a repeated line would be drawn, scored and paired twice).
        prompts = list(dict.fromkeys(json.loads(line)["prompt"] for line in lines if line.strip()))
        rng = random.Random(f"{seed}:{name}")
        picked = rng.sample(prompts, min(limit, len(prompts)))
        rows += [{"prompt": p, "set": name} for p in picked]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="folder with the OOD .jsonl files")
    parser.add_argument("--limit", type=int, default=100, help="prompts per set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="user,guarded", help="user, guarded, system")
    parser.add_argument("--checkpoint", nargs="*", default=[], help="MODE=DIR (default: shipped)")
    parser.add_argument(
        "--search-with",
        nargs="*",
        default=[],
        help="MODE=DIR[,DIR...]: the search's further proposers in that mode (default: the "
        "demo's; MODE= for none)",
    )
    parser.add_argument("--versus", help="an earlier results file: paired gain over its inverter")
    parser.add_argument(
        "--attacks", choices=("demo", "all"), default="demo", help="extraction strings asked"
    )
    parser.add_argument(
        "--mbr-samples", type=int, default=0, help="also the MBR choice among this many samples"
    )
    parser.add_argument(
        "--search-samples", type=int, default=0, help="prompts each inverter samples for the search"
    )
    parser.add_argument(
        "--no-search", action="store_true", help="leave out the search (as the demo's flag)"
    )
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    earlier = json.loads(Path(args.versus).read_text())["modes"] if args.versus else {}
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    search_with = {
        mode: tuple(d for d in dirs.split(",") if d)
        for mode, dirs in (item.split("=", 1) for item in args.search_with)
    }
    rows = rows_of(Path(args.data), args.limit, args.seed)
    cfg = demo.DemoConfig(modes=args.modes, progress=False, search=not args.no_search)
    attacks = demo.ATTACKS if args.attacks == "demo" else tuple(load_attacks(None))
    results: dict = {"limit": args.limit, "attacks": len(attacks), "modes": {}}
    if search_with:
        results["search_with"] = {m: list(d) for m, d in search_with.items()}
    if args.search_samples:
        cfg.search_samples = results["search_samples"] = args.search_samples
    if args.mbr_samples:
        cfg.mbr_samples = args.mbr_samples
        results["mbr_samples"] = args.mbr_samples
    shown = demo.shown_rows(attacks, bool(args.mbr_samples), cfg.search)
    # The rows a gain is reported for (those a mode has), and what each is paired with.
    subjects = (demo.INVERTER, *(MBR,) * bool(args.mbr_samples), *(demo.SEARCH,) * cfg.search)
    others = (*demo.ROWS[2:], "earlier inverter") + ((demo.INVERTER,) if len(subjects) > 1 else ())
    lines = [
        "| mode | set | row | "
        + " | ".join(SHORT[m] for m in shown)
        + " | "
        + " | ".join(f"row - {SHORT.get(o, 'earlier')}" for o in others)
        + " |",
        "| --- " * (len(shown) + len(others) + 3) + "|",
    ]
    for mode in cfg.mode_list(checkpoints):
        res = demo.run_mode(
            mode,
            rows,
            cfg,
            checkpoints.get(mode),
            attacks=attacks,
            search_with=search_with.get(mode),
        )
        for group, table in res["sets"].items():
            ex = [e for e in res["examples"] if e["set"] == group]
            refs = [e["hidden"] for e in ex]
            earlier_by_prompt = {}
            if mode in earlier:
                earlier_by_prompt = {
                    e["hidden"]: e[demo.INVERTER] for e in earlier[mode]["examples"]
                }
            cells = [
                f"{table[m]['bleu']['mean']:.1f} / {table[m]['token_f1']['mean']:.1f}"
                if m in table
                else "—"  # a mode without a search
                for m in shown
            ]
            for subject in (s for s in subjects if s in table):
                mine = table[subject]
                preds = [e[subject] for e in ex]
                for other in others:
                    if other == subject:
                        continue
                    if other == "earlier inverter":
                        if not earlier_by_prompt:
                            continue
                        other_preds = [earlier_by_prompt[r] for r in refs]
                        mine["earlier"] = {"checkpoint": earlier[mode]["checkpoint"]}
                    else:
                        other_preds = [e[other] for e in ex]
                    mine[f"gain_over {other}"] = paired_gain(preds, other_preds, refs)
                keys = [f"gain_over {o}" for o in others]
                gains = [format_ci(mine[k]["bleu"], "+.1f") if k in mine else "—" for k in keys]
                row = " | ".join([*cells, *gains])
                lines.append(f"| {mode} | {group} | {SHORT[subject]} | {row} |")
        results["modes"][mode] = res
        write_results(args.out, results, command=["python", *sys.argv])
    print("BLEU per row; gains are paired, with 95% bootstrap CIs")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
