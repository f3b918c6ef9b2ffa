"""How many memorised prompts each inverter should propose to the search, chosen on
validation prompts: fewer candidates mean fewer target passes.

    python benchmarks/search_neighbours.py --data ../shared/data --limit 120

Guarded mode: replayed from the per-prompt pools and KLs that `two_turns.py` saved (the mix's
validation prompts, `two_turns-validation.json`; and, as a check off the OOD sets, never used
to choose, `two_turns.json`), keeping each turn's N nearest memorised prompts, with the demo's
shortlist (K = 4) and without. User mode: the search of the shipped user inverter run on a
seeded LIMIT of BIG-bench's validation split (the 8 nearest proposed, then replayed for fewer).
Writes benchmarks/results/search_neighbours.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

from logit2prompt.attacks.invert import target_for
from logit2prompt.attacks.search import _spread, choose, observe_and_search, shortlisted
from logit2prompt.data.corpus import load_corpus
from logit2prompt.evaluation.metrics import score
from logit2prompt.evaluation.results import write_results
from logit2prompt.inverter import Inverter

HERE = Path(__file__).parent / "results"
RESULTS = HERE / "search_neighbours.json"
COUNTS = (8, 6, 4, 2, 0)


def kept(origins: list[str], n: int) -> np.ndarray:
    """Per candidate: not a memorised prompt, or among its turn's `n` nearest."""
    rank: dict[str, int] = {}
    keep = []
    for origin in origins:
        kind, turn = origin.split(":", 1)
        if kind == "memory":
            rank[turn] = rank.get(turn, -1) + 1
        keep.append(kind != "memory" or rank[turn] < n)
    return np.array(keep)


def metrics(chosen: list[str], hidden: list[str]) -> dict:
    out = score(chosen, hidden, ci=False)
    return {"bleu": round(out["bleu"]["mean"], 2), "token_f1": round(out["token_f1"]["mean"], 2)}


def replay_guarded(path: Path, shortlist: int = 4) -> dict:
    examples = json.loads(path.read_text())["examples"]
    turns = list(examples[0]["kl"])
    sets = list(dict.fromkeys(e.get("set", "validation") for e in examples))
    rows = {}
    for n in COUNTS:
        candidates, kls = [], [[] for _ in turns]
        for e in examples:
            keep = kept(e["origins"], n)
            candidates.append([c for c, k in zip(e["candidates"], keep, strict=True) if k])
            for t, turn in enumerate(turns):
                kl = np.array([np.nan if x is None else x for x in e["kl"][turn]], dtype=float)
                kls[t].append(kl[keep])
        masks = shortlisted(candidates, [kls[0]], shortlist)
        later = [[_spread(kl[m], m) for kl, m in zip(k, masks, strict=True)] for k in kls[1:]]
        short = [kls[0], *later]
        row = {"candidates_per_prompt": round(sum(map(len, candidates)) / len(candidates), 2)}
        for name, use in (("full", kls), (f"shortlist {shortlist}", short)):
            chosen = choose(candidates, use)[0]
            group = [e.get("set", "validation") for e in examples]
            row[name] = {
                s: metrics(
                    [c for c, g in zip(chosen, group, strict=True) if g == s],
                    [e["hidden"] for e, g in zip(examples, group, strict=True) if g == s],
                )
                for s in sets
            }
        rows[str(n)] = row
    return rows


def user_validation(data: Path, limit: int, seed: int) -> dict:
    prompts = load_corpus(str(data / "bigbench_prompts.jsonl"), split="validation").texts
    random.Random(seed).shuffle(prompts)
    prompts = prompts[:limit]
    inverter = Inverter.from_pretrained("smollm2-135m-instruct")
    target = target_for(inverter, batch_size=48)
    t0 = time.perf_counter()
    found = observe_and_search([inverter], prompts, target=target, neighbours=max(COUNTS))
    rows = {"seconds": round(time.perf_counter() - t0, 1), "n": len(prompts)}
    for n in COUNTS:
        allowed = [kept(o, n) for o in found.origins]
        chosen = choose(found.candidates, found.kls, allowed)[0]
        rows[str(n)] = {
            "candidates_per_prompt": round(sum(int(a.sum()) for a in allowed) / len(prompts), 2),
            **metrics(chosen, prompts),
        }
    rows["inverter alone"] = metrics([row[0] for row in found.candidates], prompts)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="folder with bigbench_prompts.jsonl")
    parser.add_argument("--limit", type=int, default=120, help="BIG-bench validation prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    results = {
        "guarded, mix validation": replay_guarded(HERE / "two_turns-validation.json"),
        "guarded, OOD (check only)": replay_guarded(HERE / "two_turns.json"),
    }
    results["user, BIG-bench validation"] = user_validation(Path(args.data), args.limit, args.seed)
    write_results(args.out, results, command=["python", *sys.argv])
    for name, rows in results.items():
        print(f"== {name}")
        for n, row in rows.items():
            print(f"  {n}: {json.dumps(row)}")


if __name__ == "__main__":
    main()
