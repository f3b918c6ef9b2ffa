"""Paired gain of one row of a saved run over a row of another, on the same prompts.

Two runs of `shipped_ood.py` with the same `--data`, `--limit` and `--seed` score the same
prompts; this pairs them per prompt (95% bootstrap CIs, as the script's own gains) without
running anything. E.g. the user-mode search with the reply reader against the search without it:

    python benchmarks/paired_rows.py benchmarks/results/shipped_ood-user-reader.json \\
        benchmarks/results/shipped_ood-user-search2.json --mode user --row search \\
        --out benchmarks/results/paired-user-search-reader.json

Files without modes (`two_turns.py`, `neighbour_round.py`) are read by their top-level
examples, and `--versus` names B's row where it differs from A's, e.g. the 4th conditioned
round against the extraction string of the pools' own run:

    python benchmarks/paired_rows.py benchmarks/results/neighbour_round4-user.json \\
        benchmarks/results/search_samples16-user.json --row "round 4" --versus extraction \\
        --out benchmarks/results/paired-user-round4-extraction.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shipped_ood import SHORT

from logit2prompt.evaluation.metrics import format_ci, paired_gain
from logit2prompt.evaluation.results import write_results

ROWS = {short: row for row, short in SHORT.items()}  # the names shipped_ood.py prints


def examples(path: str, mode: str) -> list[dict]:
    data = json.loads(Path(path).read_text())
    if "modes" not in data:
        return data["examples"]
    modes = data["modes"]
    if mode not in modes:
        sys.exit(f"{path} has no {mode!r} mode (it has {', '.join(modes)})")
    return modes[mode]["examples"]


def row_name(path: str, rows: list[dict], name: str) -> str:
    """`name` as the file spells it: itself, or the full name of a short one."""
    for candidate in (name, ROWS.get(name)):
        if rows and candidate in rows[0]:
            return candidate
    sys.exit(f"{path} has no row {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", help="results of the row to measure")
    parser.add_argument("b", help="results of the row it is paired with")
    parser.add_argument("--mode", default="user")
    parser.add_argument(
        "--row", default="search", help=f"A's row: one of {', '.join(ROWS)} or a full row name"
    )
    parser.add_argument("--versus", help="B's row, if not the same as A's")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    a, b = examples(args.a, args.mode), examples(args.b, args.mode)
    row = row_name(args.a, a, args.row)
    versus = row_name(args.b, b, args.versus or args.row)
    other = {(e["set"], e["hidden"]): e[versus] for e in b}
    if len(other) != len(b):  # a repeated prompt would pair both rows with one
        raise SystemExit(f"{args.b} holds a prompt twice in one set; pairing needs each once")
    results: dict = {
        "a": args.a,
        "b": args.b,
        "mode": args.mode,
        "row": row,
        "versus": versus,
        "sets": {},
    }
    print(f"{args.a} {row!r} - {args.b} {versus!r}, paired, 95% bootstrap CIs")
    groups = {
        group: [e for e in a if e["set"] == group] for group in dict.fromkeys(e["set"] for e in a)
    }
    if len(groups) > 1:
        groups["pooled"] = a  # every prompt of every set: a tighter interval on the shared sign
    for group, ex in groups.items():
        missing = [e["hidden"] for e in ex if (e["set"], e["hidden"]) not in other]
        if missing:
            sys.exit(f"{len(missing)} prompts of {group} are not in {args.b}: not the same sample")
        refs = [e["hidden"] for e in ex]
        base = [other[(e["set"], e["hidden"])] for e in ex]
        gain = paired_gain([e[row] for e in ex], base, refs)
        results["sets"][group] = gain
        print(
            f"{group:26s} BLEU {format_ci(gain['bleu'], '+.1f'):22s} "
            f"F1 {format_ci(gain['token_f1'], '+.1f')}  (n={len(ex)})"
        )
    write_results(args.out, results, command=["python", *sys.argv])


if __name__ == "__main__":
    main()
