"""The search against the extraction string on more prompts: the scored rows of `two_turns.py`
results pooled with its `--dev` rows (disjoint prompts of the same sets), paired per prompt.

    R=benchmarks/results/search_samples16; python benchmarks/pooled_search.py \
        --mode guarded=$R-guarded.json,$R-guarded-dev.json --mode user=$R-user.json,$R-user-dev.json

Valid only while nothing in the search was chosen on the dev rows; rows chosen on dev pool
with `--fresh` draws instead, and `--row FILE=ROW` names the row a file holds the search in
(e.g. `task_guess.py`'s replay of a rule on a scored run), and `--baseline-from FILE=SOURCE`
reads the extraction string's replies from the run SOURCE where FILE holds none
(`neighbour_round.py`'s rounds over a `two_turns.py` run's pools). Each mode also gets a line
over all its sets. No target passes. Writes benchmarks/results/pooled_search.json.

    cd benchmarks; R12=results/neighbour_round12-user
    python pooled_search.py --mode "user=$R12.json,$R12-fresh.json" \
        --row "$R12.json=round 12" --row "$R12-fresh.json=round 12" \
        --baseline-from $R12.json=results/search_samples16-user.json \
        --baseline-from $R12-fresh.json=results/search_samples16-user-fresh.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from two_turns import SEARCH, extraction_row

from logit2prompt.evaluation.metrics import format_ci, paired_gain
from logit2prompt.evaluation.results import write_results

RESULTS = Path(__file__).parent / "results" / "pooled_search.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", action="append", required=True, help="NAME=FILE,FILE...")
    parser.add_argument(
        "--row",
        action="append",
        default=[],
        help=f"FILE=ROW: the row FILE holds the search in (default {SEARCH!r})",
    )
    parser.add_argument(
        "--baseline-from",
        action="append",
        default=[],
        help="FILE=SOURCE: the extraction baseline of FILE's prompts is SOURCE's",
    )
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    rows_of = dict(spec.split("=", 1) for spec in args.row)
    baseline_of = dict(spec.split("=", 1) for spec in args.baseline_from)
    out: dict[str, dict] = {}
    lines = ["| mode | set | prompts | BLEU | token F1 |", "| --- | --- | --- | --- | --- |"]
    for spec in args.mode:
        name, _, files = spec.partition("=")
        examples, baselines = [], set()
        for f in files.split(","):
            results = json.loads(Path(f).read_text())
            row = rows_of.get(f, SEARCH)
            if row not in results["examples"][0]:
                sys.exit(f"{f} has no row {row!r}")
            if f in baseline_of:
                results = with_baseline(f, results, baseline_of[f])
            examples += [{**e, SEARCH: e[row]} for e in results["examples"]]
            baselines.add(extraction_row(results))
        if len(baselines) > 1:
            sys.exit(f"{name}: the files' extraction baselines differ ({sorted(baselines)})")
        (ext,) = baselines
        hidden = [e["hidden"] for e in examples]
        if len(set(hidden)) != len(hidden):
            sys.exit(f"{name}: the files share prompts")
        out[name] = {"files": files.split(","), "baseline": ext, "sets": {}}
        sets = list(dict.fromkeys(e["set"] for e in examples))
        for s in [*sets, *(["all"] if len(sets) > 1 else [])]:
            rows = [e for e in examples if s in ("all", e["set"])]
            refs = [e["hidden"] for e in rows]
            gain = paired_gain([e[SEARCH] for e in rows], [e[ext] for e in rows], refs)
            out[name]["sets"][s] = {"n": len(rows), "search - extraction": gain}
            lines.append(
                f"| {name} | {s} | {len(rows)} | {format_ci(gain['bleu'], '+.1f')} | "
                f"{format_ci(gain['token_f1'], '+.1f')} |"
            )
    print("\n".join(lines))
    write_results(args.out, {"command": ["python", *sys.argv], "modes": out})


def with_baseline(path: str, results: dict, source: str) -> dict:
    """`results` with the extraction replies (and leak filter) of the run `source`, whose
    prompts must include every one of `path`'s."""
    other = json.loads(Path(source).read_text())
    ext = extraction_row(other)
    by_prompt = {(e["set"], e["hidden"]): e[ext] for e in other["examples"]}
    if len(by_prompt) != len(other["examples"]):  # a repeated prompt would pair both with one
        raise SystemExit("a prompt appears twice in one set; pairing needs each once")
    missing = [e["hidden"] for e in results["examples"] if (e["set"], e["hidden"]) not in by_prompt]
    if missing:
        sys.exit(f"{source} lacks {len(missing)} of {path}'s prompts, e.g. {missing[0]!r}")
    examples = [{**e, ext: by_prompt[e["set"], e["hidden"]]} for e in results["examples"]]
    return {**results, "leak_filter": other["leak_filter"], "examples": examples}


if __name__ == "__main__":
    main()
