"""Refinement by the target: the nearest training prompt, edited token by token where the
inverter proposes and the target's distance decides (src/logit2prompt/refine.py).

    python benchmarks/refine.py [--run runs/quality] [--split test] [--rounds 3] [--proposals 24]

Uses the stores and the inverter checkpoint of benchmarks/quality.py (no training here). Reports
the nearest-neighbour baseline and the prompts after each round on the whole split, with the
paired per-prompt gain over nearest neighbour (95% bootstrap CI) and the target queries spent.
State is saved after every round (`<run>/refine-<split>.json`); a rerun with the same settings
resumes from the last finished round. Writes benchmarks/results/refine.json (or
refine-<split>.json for another split).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from logit2prompt.attacks.refine import RefineConfig, Refined, nearest_start, propose, refine
from logit2prompt.data.store import DistributionStore, write_json
from logit2prompt.evaluation.metrics import (
    format_gain,
    format_table,
    paired_gain,
    score,
    sentence_bleu,
)
from logit2prompt.evaluation.results import write_results
from logit2prompt.models.inverter import Inverter
from logit2prompt.recipes.methods import NEAREST
from logit2prompt.targets import DEFAULT_TARGET, load_target

RESULTS_DIR = Path(__file__).parent / "results"
EXAMPLES = 20


def accepted_edits(before: list[str], after: list[str], refs: list[str]) -> dict:
    """What one round's accepted edits (each nearer the observed vector) did to BLEU."""
    changed = [i for i, (b, a) in enumerate(zip(before, after, strict=True)) if b != a]
    delta = [sentence_bleu(after[i], refs[i]) - sentence_bleu(before[i], refs[i]) for i in changed]
    return {
        "changed": len(changed),
        "bleu_up": sum(d > 0 for d in delta),
        "bleu_down": sum(d < 0 for d in delta),
        "mean_bleu_change": float(np.mean(delta)) if delta else 0.0,
    }


def one_edit_oracle(inverter, observed, start: list[str], refs: list[str], cfg) -> list[str]:
    """Per prompt, the best of round 1's proposals by BLEU against the hidden prompt (or the
    start prompt if none is better): what a perfect verifier could pick in round 1."""
    flat = inverter.as_batch(observed)
    best = []
    for s in range(0, len(start), cfg.inverter_batch):
        rows = range(s, min(s + cfg.inverter_batch, len(start)))
        proposals = propose(inverter, flat[list(rows)], [start[i] for i in rows], cfg)
        for i, p in zip(rows, proposals, strict=True):
            best.append(max([start[i], *p], key=lambda c, r=refs[i]: sentence_bleu(c, r)))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/quality", help="output folder of quality.py")
    parser.add_argument("--inverter", default="inverter", help="checkpoint folder in --run")
    parser.add_argument("--split", default="test", choices=("test", "validation"))
    parser.add_argument("--limit", type=int, default=None, help="first N prompts of the split")
    parser.add_argument("--rounds", type=int, default=RefineConfig.rounds)
    parser.add_argument("--proposals", type=int, default=RefineConfig.proposals)
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--dtype", default="bfloat16", help="as the stores were collected")
    args = parser.parse_args()
    run = Path(args.run)
    started = time.perf_counter()
    train, store = DistributionStore(run / "train"), DistributionStore(run / args.split)
    n = len(store) if args.limit is None else min(args.limit, len(store))
    observed = store.vectors(range(n))
    refs = store.prompts[:n]
    target = load_target(args.target, dtype=args.dtype)
    if target.fingerprint.id != store.fingerprint.id:
        raise SystemExit(
            f"the store was collected from {store.fingerprint.describe()}, not from "
            f"{target.fingerprint.describe()}; pass the same --target and --dtype"
        )
    inverter = Inverter.from_pretrained(run / args.inverter)
    cfg = RefineConfig(rounds=args.rounds, proposals=args.proposals)
    settings = {"inverter": args.inverter, "n": n, "proposals": cfg.proposals}
    state_path = run / f"refine-{args.split}.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if state is not None and state.pop("settings") != settings:
        print(f"{state_path} has other settings; starting over")
        state = None
    if state is None:
        start, distances = nearest_start(train, observed)
        state = {"start": start, "rounds": [], "distances": distances.tolist(), "queries": 0}
    else:
        print(f"resuming after round {len(state['rounds'])} of {cfg.rounds}")
    state.setdefault("refine_s", 0.0)  # summed over resumed runs
    before = (list(state["rounds"]), state["queries"], state["refine_s"])

    def save(_: int, result: Refined) -> None:
        state.update(
            rounds=[*before[0], *result.rounds],
            distances=result.distances.tolist(),
            queries=before[1] + result.queries,
            refine_s=before[2] + time.perf_counter() - t0,
        )
        write_json(state_path, {"settings": settings, **state})

    t0 = time.perf_counter()
    left = cfg.rounds - len(state["rounds"])
    if left > 0 and not state.get("converged"):
        current = state["rounds"][-1] if state["rounds"] else state["start"]
        more = RefineConfig(rounds=left, proposals=cfg.proposals)
        result = refine(inverter, target, observed, current, np.array(state["distances"]), more,
                        on_round=save)  # fmt: skip
        if len(result.rounds) < left:  # a round changed nothing: more rounds would not either
            state["converged"] = True
            write_json(state_path, {"settings": settings, **state})
    start, rounds = state["start"], state["rounds"][: cfg.rounds]
    results = {NEAREST: score(start, refs)}
    for r, prompts in enumerate(rounds):
        results[f"nearest neighbour refined, round {r + 1}"] = score(prompts, refs)
    edits = [
        accepted_edits(([start, *rounds])[r], prompts, refs) for r, prompts in enumerate(rounds)
    ]
    oracle = one_edit_oracle(inverter, observed, start, refs, cfg)
    results["upper bound of round 1: its best proposal by BLEU vs the hidden prompt"] = score(
        oracle, refs
    )
    final = rounds[-1] if rounds else start
    gain = paired_gain(final, start, refs)
    print(f"BIG-bench {args.split} split ({n} prompts), proposals from {args.inverter}")
    print(format_table(results))
    print(f"paired gain over nearest neighbour: {format_gain(gain)}")
    for r, e in enumerate(edits):
        print(
            f"round {r + 1}: {e['changed']} prompts edited (each nearer the observed vector); "
            f"BLEU up for {e['bleu_up']}, down for {e['bleu_down']}, "
            f"mean change {e['mean_bleu_change']:+.2f}"
        )
    print(f"target queries: {state['queries']} ({state['queries'] / max(n, 1):.0f} per prompt)")
    name = "refine.json" if args.split == "test" else f"refine-{args.split}.json"
    write_results(
        RESULTS_DIR / name,
        {
            "benchmark": "refine",
            "split": args.split,
            "train_prompts": len(train),
            "settings": settings,
            "rounds": cfg.rounds,
            "target": target.fingerprint.to_dict(),
            "results": results,
            "paired_gain_over_nearest_neighbour": gain,
            "accepted_edits_per_round": edits,
            "target_queries": state["queries"],
            "refine_s": state["refine_s"],
            "wall_s": time.perf_counter() - started,
            "examples": [
                {"hidden": h, "nearest": s, "refined": p}
                for h, s, p in list(zip(refs, start, final, strict=True))[:EXAMPLES]
            ],
        },
        command=["python", *sys.argv],
    )
    print(f"wrote {RESULTS_DIR / name}")


if __name__ == "__main__":
    main()
