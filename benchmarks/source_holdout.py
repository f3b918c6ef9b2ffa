"""Whole-source holdout (issue 19, item 4): an inverter trained on the mix without one source,
against one trained with it, on that source's prompts that neither trained on.

    python benchmarks/source_holdout.py --mix runs/mix/mix.jsonl --source evals \
        --without runs/holdout/export [--with default] [--limit 150]

`--without` is the shipped user inverter's recipe (its model card) run on the mix less
`--source`; `--with` (default: the shipped user inverter) had the source in its data. Test
prompts: the source's rows outside the validation split, up to 64 target tokens, that are in
neither inverter's neighbour memory (which holds exactly its training prompts); a seeded sample
of `--limit`. Rows as in the demo (user mode): the inverter, re-ranked by the target, the
nearest memorised prompt, the extraction string; paired BLEU / token F1 gains with 95% CIs.
Writes benchmarks/results/source_holdout-SOURCE.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from logit2prompt.data.corpus import DEFAULT_MAX_TOKENS, split_of
from logit2prompt.evaluation.metrics import format_ci, paired_gain
from logit2prompt.evaluation.results import write_results
from logit2prompt.inverter import Inverter
from logit2prompt.recipes import demo
from logit2prompt.targets import DEFAULT_TARGET, load_target

RESULTS = Path(__file__).parent / "results"


def held_out_rows(
    source_prompts: list[str], memories: list[set[str]], limit: int, seed: int, source: str
) -> tuple[list[dict], int]:
    """A seeded sample of the source's prompts outside validation, up to 64 target tokens,
    that no inverter memorised; and how many there were to sample from."""
    seen = set().union(*memories)
    pool = [p for p in source_prompts if split_of(p) != "validation" and p not in seen]
    counts = load_target(DEFAULT_TARGET).count_tokens(pool)
    pool = [p for p, n in zip(pool, counts, strict=True) if n <= DEFAULT_MAX_TOKENS]
    picked = random.Random(f"{seed}:{source}").sample(pool, min(limit, len(pool)))
    return [{"prompt": p, "set": source} for p in picked], len(pool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mix", required=True, help="the mix JSONL both inverters came from")
    parser.add_argument("--source", required=True, help="the source held out of --without")
    parser.add_argument("--without", required=True, help="inverter trained without the source")
    parser.add_argument("--with", dest="with_", default="default", help="trained with it")
    parser.add_argument("--limit", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    arms = {"with": args.with_, "without": args.without}
    memories = {k: set(Inverter.from_pretrained(v).memory.prompts) for k, v in arms.items()}
    lines = Path(args.mix).read_text(encoding="utf-8").splitlines()
    mix = [json.loads(line) for line in lines if line.strip()]
    source_prompts = [r["prompt"] for r in mix if r["source"] == args.source]
    if not source_prompts:
        raise SystemExit(f"{args.mix} has no prompts of source {args.source!r}")
    trained_on = {arm: len(memories[arm].intersection(source_prompts)) for arm in arms}
    if trained_on["without"]:
        raise SystemExit(f"--without trained on {trained_on['without']} prompts of {args.source}")
    rows, pool = held_out_rows(
        source_prompts, list(memories.values()), args.limit, args.seed, args.source
    )
    refs = [r["prompt"] for r in rows]
    cfg = demo.DemoConfig(modes="user", progress=False)
    results: dict = {"source": args.source, "pool": pool, "n": len(rows), "arms": {}}
    for arm, checkpoint in arms.items():
        res = demo.run_mode("user", rows, cfg, None if checkpoint == "default" else checkpoint)
        res["trained_on_source"] = trained_on[arm]
        results["arms"][arm] = res
    ex = {arm: res["examples"] for arm, res in results["arms"].items()}
    col = {arm: [e[demo.INVERTER] for e in ex[arm]] for arm in arms}
    gains = {
        "without - with (inverter)": paired_gain(col["without"], col["with"], refs),
        "without - extraction": paired_gain(
            col["without"], [e[demo.EXTRACTION_BEST] for e in ex["without"]], refs
        ),
        "without - nearest": paired_gain(
            col["without"], [e[demo.NEAREST] for e in ex["without"]], refs
        ),
        "with - extraction": paired_gain(
            col["with"], [e[demo.EXTRACTION_BEST] for e in ex["with"]], refs
        ),
    }
    results["gains"] = gains
    out = args.out or RESULTS / f"source_holdout-{args.source}.json"
    write_results(out, results, command=["python", *sys.argv])
    print(f"{args.source}: {len(rows)} of {pool} unseen prompts; BLEU / token F1")
    print("| inverter | source in training | inverter | re-ranked | nearest | extraction |")
    print("| --- | --- | --- | --- | --- | --- |")
    for res in results["arms"].values():
        table = res["all"]
        cells = [
            f"{table[m]['bleu']['mean']:.1f} / {table[m]['token_f1']['mean']:.1f}"
            for m in demo.ROWS
        ]
        trained = f"{res['trained_on_source']} prompts"
        print(f"| {res['checkpoint']} | {trained} | " + " | ".join(cells) + " |")
    for name, gain in gains.items():
        bleu, f1 = format_ci(gain["bleu"], "+.1f"), format_ci(gain["token_f1"], "+.1f")
        print(f"{name}: BLEU {bleu}, token F1 {f1}")


if __name__ == "__main__":
    main()
